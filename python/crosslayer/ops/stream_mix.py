"""stream_mix on the GPU: the custom ops over crosslayer._C, their autograd, and the
public function that mirrors `crosslayer.ref.stream_mix` (static HC's hc_pre and the mHC
layer input are stream_mix calls).

Layers, bottom up:
  _C.stream_mix_fwd / _bwd                   pybind11 launchers (csrc/stream_mix.cu)
  torch.ops.crosslayer.stream_mix (+ _bwd)   custom ops + fakes + autograd; _bwd writes
                                             or adds to dH in place
  stream_mix(H, w)                           validates once; dispatches
  stream_mix_for_post(H, w)                  the same plus the H its connection's hc_post
                                             reads: H's gradient accumulates in one tensor

H: (*lead, n, d) with any token/stream strides; x is contiguous (*lead, d); dH is
allocated like H; dw comes back in the arithmetic dtype with w's shape, summed over
tokens for static w. CPU tensors and CUDA tensors without the extension run the oracle.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from crosslayer import ref
from crosslayer._autograd import first_order_backward, no_double_backward_message, oracle_first_order, refusing_backward
from crosslayer._checks import acc_dtype
from crosslayer._extension import kernels_for
from crosslayer.ops._common import fusable, lead_d
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


@torch.library.custom_op("crosslayer::stream_mix_bwd", mutates_args=("dH",))
def stream_mix_bwd_op(dH: Tensor, accumulate: bool, dx: Tensor, H: Tensor, w: Tensor) -> Tensor:
    """The gradient through stream_mix for the output gradient dx (*lead, d): dH_i =
    w_i·dx written (=) into dH, or added (+=) with `accumulate` (another op's
    contribution to H's gradient already there); returns dw_i = <dx, H_i> with w's shape
    (summed over tokens when static) in the arithmetic dtype (float64 for float64 H,
    float32 otherwise).
    """
    kernels = kernels_for(H, "stream_mix")
    if kernels is not None:
        return kernels.stream_mix_bwd(dH, accumulate, dx, H, w)
    g, dw = ref.stream_mix_bwd(dx, H, w)
    if accumulate:
        dH.copy_(dH.to(g.dtype) + g)
    else:
        dH.copy_(g)
    return dw.to(acc_dtype(H.dtype)).contiguous()


@stream_mix_bwd_op.register_fake
def _stream_mix_bwd_fake(dH: Tensor, accumulate: bool, dx: Tensor, H: Tensor, w: Tensor):
    return w.new_empty(w.shape, dtype=acc_dtype(H.dtype))


@torch.library.custom_op("crosslayer::stream_mix_dots", mutates_args=())
def stream_mix_dots_op(dx: Tensor, H: Tensor) -> Tensor:
    """dw_i = <dx, H_i> per token: (*lead, n) in the arithmetic dtype (stream_mix_bwd's
    dots without its dH; the mHC pre adds that term in mhc_coeffs_bwd's dH pass)."""
    kernels = kernels_for(H, "stream_mix")
    if kernels is not None:
        return kernels.stream_mix_dots(dx, H)
    acc = acc_dtype(H.dtype)
    return (H.to(acc) * dx.to(acc).unsqueeze(-2)).sum(-1).contiguous()


@stream_mix_dots_op.register_fake
def _stream_mix_dots_fake(dx: Tensor, H: Tensor) -> Tensor:
    return H.new_empty(H.shape[:-1], dtype=acc_dtype(H.dtype))


def _stream_mix_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _stream_mix_grads(ctx, dx: Optional[Tensor], dH: Optional[Tensor]):
    """(dH, dw): the gradient through stream_mix added to `dH` in place when given
    (another op's contribution to H's gradient), else written to a new tensor like H."""
    H, w = ctx.saved_tensors
    if dx is None:
        return dH, None
    accumulate = dH is not None
    if not accumulate:
        dH = torch.empty_like(H)
    dw = stream_mix_bwd_op(dH, accumulate, dx, H, w)
    return dH, dw.to(w.dtype)


# stream_mix_bwd mutates dH, so it cannot take an autograd formula (torch.library refuses one
# on a non-functional schema): its callers' backward refuses second derivatives instead.
@first_order_backward(no_double_backward_message("stream_mix"), connect_saved=True)
def _stream_mix_backward(ctx, dx: Optional[Tensor]):
    return _stream_mix_grads(ctx, dx, None)


stream_mix_op.register_autograd(_stream_mix_backward, setup_context=_stream_mix_setup)
# The mHC pre's backward runs stream_mix_dots: first order only, like every backward op.
stream_mix_dots_op.register_autograd(refusing_backward("stream_mix", "stream_mix_dots"))


class _StreamMixForPost(torch.autograd.Function):
    """stream_mix returning H as a second output for the connection's hc_post to read:
    hc_post's dH arrives as that output's gradient and stream_mix's backward adds its
    own term to it in place (one tensor for H's gradient, no autograd sum)."""

    @staticmethod
    def forward(ctx, H, w):
        x = stream_mix_op(H, w)
        _stream_mix_setup(ctx, (H, w), x)
        return x, H

    @staticmethod
    @first_order_backward(no_double_backward_message("stream_mix_for_post", "stream_mix"), connect_saved=True)
    def backward(ctx, dx, dH_post):
        return _stream_mix_grads(ctx, dx, dH_post)


def stream_mix(H: Tensor, w: Tensor) -> Tensor:
    """Weighted sum of the streams: x = Σ_i w[..., i]·H_i (see crosslayer.ref.stream_mix).

    H: (..., n, d), 1 <= n <= 16    any token and stream strides; a feature dim with
                                     non-unit stride is copied once
    w: (..., n) or (n,)              per-token or static weights
    returns x: (..., d)              dtype of H, contiguous

    Computed in float32 (float64 for float64 H). Fused on CUDA when the extension is
    built; the oracle otherwise. First derivatives only, on every path
    (crosslayer.ref.stream_mix differentiates to any order).
    """
    validate_stream_mix(H, w)
    if not fusable("stream_mix", H, w):
        return oracle_first_order("stream_mix", ref.stream_mix, H, w)
    return stream_mix_op(H, w)


def stream_mix_for_post(H: Tensor, w: Tensor) -> Tuple[Tensor, Tensor]:
    """`stream_mix` for a connection's layer input: (x, H_post), where H_post (H's
    values) is the tensor the connection's `hc_post` must read. Fused, stream_mix's dH is
    added to the one hc_post's backward wrote, in place; elsewhere H_post is H and
    autograd sums the two. Arguments and x as in `stream_mix`."""
    validate_stream_mix(H, w)
    if not fusable("stream_mix", H, w):
        return oracle_first_order("stream_mix_for_post", ref.stream_mix, H, w, oracle="stream_mix"), H
    return _StreamMixForPost.apply(H, w)
