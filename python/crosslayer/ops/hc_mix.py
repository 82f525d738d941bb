"""hc_post and stream_mix on the GPU: custom ops over crosslayer._C, their autograd, and
the public functions that mirror `crosslayer.ref.hc_post` / `crosslayer.ref.stream_mix`.

Layers, bottom up:
  _C.hc_post_fwd / _bwd, _C.stream_mix_fwd / _bwd   pybind11 launchers (csrc/hc_mix.cu)
  torch.ops.crosslayer.hc_post (+ _bwd)             custom ops + fakes + autograd
  torch.ops.crosslayer.stream_mix (+ _bwd)
  hc_post(H, y, alpha, beta), stream_mix(H, w)      validate once; dispatch

Every op takes H: (*lead, n, d) with any number of token dims and any token/stream
strides (the streams-folded-into-batch layout runs without a copy). H' and dH are
allocated like H (`empty_like`: a dense permuted H keeps its layout); x and dy are
contiguous (*lead, d). Coefficient gradients come back in the arithmetic dtype
(float64 for float64 H, float32 otherwise) with the coefficients' shapes, summed over
tokens for static coefficients.

The custom ops run the fused kernels on CUDA tensors and the oracle on CPU tensors, so
their registration is exercised by opcheck and torch.compile on any machine. The
public functions send CPU tensors, CUDA tensors when the extension is not built, and
mixed-precision calls the kernels do not cover (y or a coefficient in another dtype
family than H, e.g. float64 coefficients with float32 H) to the oracle.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from crosslayer import ref
from crosslayer._checks import acc_dtype, compute_dtype
from crosslayer._extension import kernels_for, runs_kernels
from crosslayer.ref.hc import validate_hc_post, validate_stream_mix


def _like(H: Tensor, value: Tensor) -> Tensor:
    """`value` copied into a fresh tensor allocated like H (the fakes' layout)."""
    out = torch.empty_like(H)
    out.copy_(value)
    return out


def _lead_d(H: Tensor) -> Tuple[int, ...]:
    return (*H.shape[:-2], H.shape[-1])


# ---------------------------------------------------------------------------- hc_post


@torch.library.custom_op("crosslayer::hc_post", mutates_args=())
def hc_post_op(H: Tensor, y: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """H'_k = beta_k·y + Σ_i alpha[.., i, 1+k]·H_i.

    H: (*lead, n, d); y: (*lead, d) (H's dtype on CUDA); alpha: (*lead, n, n+1) or
    (n, n+1); beta: (*lead, n) or (n,) -> H': allocated like H.
    """
    kernels = kernels_for(H, "hc_post")
    if kernels is not None:
        return kernels.hc_post_fwd(H, y, alpha, beta)
    return _like(H, ref.hc_post(H, y, alpha, beta))


@hc_post_op.register_fake
def _hc_post_fake(H: Tensor, y: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    return torch.empty_like(H)


@torch.library.custom_op("crosslayer::hc_post_bwd", mutates_args=())
def hc_post_bwd_op(dH_new: Tensor, H: Tensor, y: Tensor, alpha: Tensor,
                   beta: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dH, dy, dalpha, dbeta) of hc_post for the output gradient dH_new (H's shape).

    dH is allocated like H, dy is contiguous (*lead, d) in y's dtype; dalpha and dbeta
    have alpha's and beta's shapes (summed over tokens when static), dalpha[..., 0] = 0,
    in the arithmetic dtype (float64 for float64 H, float32 otherwise).
    """
    kernels = kernels_for(H, "hc_post")
    if kernels is not None:
        dH, dy, dalpha, dbeta = kernels.hc_post_bwd(dH_new, H, y, alpha, beta)
        return dH, dy, dalpha, dbeta
    dH, dy, dalpha, dbeta = ref.hc_post_bwd(dH_new, H, y, alpha, beta)
    acc = acc_dtype(H.dtype)
    return _like(H, dH), dy.contiguous(), dalpha.to(acc).contiguous(), dbeta.to(acc).contiguous()


@hc_post_bwd_op.register_fake
def _hc_post_bwd_fake(dH_new: Tensor, H: Tensor, y: Tensor, alpha: Tensor, beta: Tensor):
    acc = acc_dtype(H.dtype)
    return (torch.empty_like(H), y.new_empty(_lead_d(H)), alpha.new_empty(alpha.shape, dtype=acc),
            beta.new_empty(beta.shape, dtype=acc))


def _hc_post_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _hc_post_backward(ctx, dH_new: Optional[Tensor]):
    H, y, alpha, beta = ctx.saved_tensors
    if dH_new is None:
        return None, None, None, None
    dH, dy, dalpha, dbeta = hc_post_bwd_op(dH_new, H, y, alpha, beta)
    return dH, dy, dalpha.to(alpha.dtype), dbeta.to(beta.dtype)


hc_post_op.register_autograd(_hc_post_backward, setup_context=_hc_post_setup)


# ------------------------------------------------------------------------- stream_mix


@torch.library.custom_op("crosslayer::stream_mix", mutates_args=())
def stream_mix_op(H: Tensor, w: Tensor) -> Tensor:
    """x = Σ_i w[.., i]·H_i.  H: (*lead, n, d); w: (*lead, n) or (n,) -> x: (*lead, d)."""
    kernels = kernels_for(H, "stream_mix")
    if kernels is not None:
        return kernels.stream_mix_fwd(H, w)
    return ref.stream_mix(H, w).contiguous()


@stream_mix_op.register_fake
def _stream_mix_fake(H: Tensor, w: Tensor) -> Tensor:
    return H.new_empty(_lead_d(H))


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
    return _like(H, dH), dw.to(acc_dtype(H.dtype)).contiguous()


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


# ----------------------------------------------------------------------------- public


def _fusable(H: Tensor, *others: Tensor) -> bool:
    """The fused kernels cover this call: runs_kernels(H), one activation dtype,
    and an arithmetic dtype the kernels use (no float64 coefficient with lower-precision H)."""
    if not runs_kernels(H):
        return False
    return compute_dtype(H, *others) == acc_dtype(H.dtype)


def hc_post(H: Tensor, y: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """Width and depth connection: H'_k = beta_k·y + Σ_i alpha[..., i, 1+k]·H_i
    (see crosslayer.ref.hc_post).

    H: (..., n, d), 1 <= n <= 16    the streams; any token and stream strides (e.g.
                                     h.view(b, n, t, d).permute(0, 2, 1, 3)); a feature
                                     dim with non-unit stride is copied once
    y: (..., d)                      the layer output
    alpha: (..., n, n+1) or (n, n+1) per-token or static coefficients (column 0 unused)
    beta: (..., n) or (n,)           per-token or static
    returns H': (..., n, d)          dtype of H, allocated like H

    Computed in float32 (float64 for float64 H). Fused on CUDA when the extension is
    built; the oracle otherwise, and for y in another dtype than H.
    """
    validate_hc_post(H, y, alpha, beta)
    if not (_fusable(H, y, alpha, beta) and y.dtype == H.dtype):
        return ref.hc_post(H, y, alpha, beta)
    return hc_post_op(H, y, alpha, beta)


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
    if not _fusable(H, w):
        return ref.stream_mix(H, w)
    return stream_mix_op(H, w)
