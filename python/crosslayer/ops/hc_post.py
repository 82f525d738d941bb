"""hc_post on the GPU: the custom ops over crosslayer._C, their autograd, and the public
function that mirrors `crosslayer.ref.hc_post`.

Layers, bottom up:
  _C.hc_post_fwd / _bwd                   pybind11 launchers (csrc/hc_post.cu)
  torch.ops.crosslayer.hc_post (+ _bwd)   custom ops + fakes + autograd
  hc_post(H, y, alpha, beta)              validates once; dispatches

H: (*lead, n, d) with any number of token dims and any token/stream strides (the
streams-folded-into-batch layout runs without a copy). H' and dH are allocated like H
(`empty_like`: a dense permuted H keeps its layout); dy is contiguous (*lead, d).
Coefficient gradients come back in the arithmetic dtype (float64 for float64 H, float32
otherwise) with the coefficients' shapes, summed over tokens for static coefficients.

The custom ops run the fused kernels on CUDA tensors and the oracle on CPU tensors, so
their registration is exercised by opcheck and torch.compile on any machine. The public
function sends CPU tensors, CUDA tensors when the extension is not built, and
mixed-precision calls the kernels do not cover (y or a coefficient in another dtype
family than H) to the oracle.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from crosslayer import ref
from crosslayer._autograd import oracle_first_order, refusing_backward
from crosslayer._checks import acc_dtype
from crosslayer._extension import kernels_for
from crosslayer.ops._common import fusable, lead_d, like
from crosslayer.contracts import validate_hc_post


@torch.library.custom_op("crosslayer::hc_post", mutates_args=())
def hc_post_op(H: Tensor, y: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """H'_k = beta_k·y + Σ_i alpha[.., i, 1+k]·H_i.

    H: (*lead, n, d); y: (*lead, d) (H's dtype on CUDA); alpha: (*lead, n, n+1) or
    (n, n+1); beta: (*lead, n) or (n,) -> H': allocated like H.
    """
    kernels = kernels_for(H, "hc_post")
    if kernels is not None:
        return kernels.hc_post_fwd(H, y, alpha, beta)
    return like(H, ref.hc_post(H, y, alpha, beta))


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
    return like(H, dH), dy.contiguous(), dalpha.to(acc).contiguous(), dbeta.to(acc).contiguous()


@hc_post_bwd_op.register_fake
def _hc_post_bwd_fake(dH_new: Tensor, H: Tensor, y: Tensor, alpha: Tensor, beta: Tensor):
    acc = acc_dtype(H.dtype)
    return (torch.empty_like(H), y.new_empty(lead_d(H)), alpha.new_empty(alpha.shape, dtype=acc),
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
hc_post_bwd_op.register_autograd(refusing_backward("hc_post", "hc_post_bwd"))  # first order only


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
    built; the oracle otherwise, and for y in another dtype than H. First derivatives only,
    on every path (crosslayer.ref.hc_post differentiates to any order).
    """
    validate_hc_post(H, y, alpha, beta)
    if not (fusable("hc_post", H, y, alpha, beta) and y.dtype == H.dtype):
        return oracle_first_order("hc_post", ref.hc_post, H, y, alpha, beta)
    return hc_post_op(H, y, alpha, beta)
