"""stream_mix on the GPU: the custom ops over crosslayer._C, their autograd, and the
public function that mirrors `crosslayer.ref.stream_mix` (static HC's hc_pre and the mHC
layer input are stream_mix calls).

Layers, bottom up:
  _C.stream_mix_fwd / _bwd                   pybind11 launchers (csrc/stream_mix.cu)
  torch.ops.crosslayer.stream_mix (+ _bwd)   custom ops + fakes + autograd
  stream_mix(H, w)                           validates once; dispatches

H: (*lead, n, d) with any token/stream strides; x is contiguous (*lead, d); dH is
allocated like H; dw comes back in the arithmetic dtype with w's shape, summed over
tokens for static w. CPU tensors and CUDA tensors without the extension run the oracle.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from crosslayer import ref
from crosslayer._checks import acc_dtype
from crosslayer._extension import kernels_for
from crosslayer.ops._common import fusable, lead_d, like
from crosslayer.contracts import validate_stream_mix


@torch.library.custom_op("crosslayer::stream_mix", mutates_args=())
def stream_mix_op(H: Tensor, w: Tensor) -> Tensor:
    """x = Σ_i w[.., i]·H_i.  H: (*lead, n, d); w: (*lead, n) or (n,) -> x: (*lead, d)."""
    kernels = kernels_for(H, "stream_mix")
    if kernels is not None:
        return kernels.stream_mix_fwd(H, w)
    return ref.stream_mix(H, w).contiguous()


@stream_mix_op.register_fake
def _stream_mix_fake(H: Tensor, w: Tensor) -> Tensor:
    return H.new_empty(lead_d(H))


@torch.library.custom_op("crosslayer::stream_mix_bwd", mutates_args=())
def stream_mix_bwd_op(dx: Tensor, H: Tensor, w: Tensor) -> Tuple[Tensor, Tensor]:
    """(dH = w_i·dx, dw_i = <dx, H_i>) of stream_mix for the output gradient dx (*lead, d).

    dH is allocated like H; dw has w's shape (summed over tokens when static) in the
    arithmetic dtype (float64 for float64 H, float32 otherwise).
    """
    kernels = kernels_for(H, "stream_mix")
    if kernels is not None:
        dH, dw = kernels.stream_mix_bwd(dx, H, w)
        return dH, dw
    dH, dw = ref.stream_mix_bwd(dx, H, w)
    return like(H, dH), dw.to(acc_dtype(H.dtype)).contiguous()


@stream_mix_bwd_op.register_fake
def _stream_mix_bwd_fake(dx: Tensor, H: Tensor, w: Tensor):
    return torch.empty_like(H), w.new_empty(w.shape, dtype=acc_dtype(H.dtype))


def _stream_mix_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _stream_mix_backward(ctx, dx: Optional[Tensor]):
    H, w = ctx.saved_tensors
    if dx is None:
        return None, None
    dH, dw = stream_mix_bwd_op(dx, H, w)
    return dH, dw.to(w.dtype)


stream_mix_op.register_autograd(_stream_mix_backward, setup_context=_stream_mix_setup)


def stream_mix(H: Tensor, w: Tensor) -> Tensor:
    """Weighted sum of the streams: x = Σ_i w[..., i]·H_i (see crosslayer.ref.stream_mix).

    H: (..., n, d), 1 <= n <= 16    any token and stream strides; a feature dim with
                                     non-unit stride is copied once
    w: (..., n) or (n,)              per-token or static weights
    returns x: (..., d)              dtype of H, contiguous

    Computed in float32 (float64 for float64 H). Fused on CUDA when the extension is
    built; the oracle otherwise.
    """
    validate_stream_mix(H, w)
    if not fusable(H, w):
        return ref.stream_mix(H, w)
    return stream_mix_op(H, w)
