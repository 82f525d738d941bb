"""mhc_coeffs on the GPU: the mHC coefficient custom ops over crosslayer._C, their
autograd, and the public function that mirrors `crosslayer.ref.mhc_coeffs`.

Layers, bottom up:
  _C.mhc_coeffs_fwd / _bwd                 pybind11 launchers (csrc/mhc_coeffs.cu)
  torch.ops.crosslayer.mhc_coeffs          custom op + fake + autograd: (alpha, beta, u,
                                           r); u = xf·phi and r = rsqrt(mean xf² + eps)
                                           are saved for the backward, not differentiable
  torch.ops.crosslayer.mhc_pre             custom op: (x, alpha, beta, u, r), the
                                           connection's pre in the coefficients' pass
  torch.ops.crosslayer.mhc_coeffs_bwd      custom op: dH (=|+=|= prior +) in place; (dphi, da_pre,
                                           da_post, da_res, db)
  mhc_coeffs(H, phi, a_pre, a_post, a_res, b, ...)
                                           validates once, then the op above on CUDA (the
                                           oracle on CPU, without the extension, or for
                                           float64 parameters with lower-precision H)

The mixing that follows reuses the HC ops: x = stream_mix(H, alpha[..., 0]) and
H' = hc_post(H, y, alpha, beta) (H'_k = post_k·y + Σ_j comb[j, k]·H_j).
`mhc_pre_for_post` is the connection's pre in one autograd node: its backward adds the
stream_mix's and the coefficients' dH to the one hc_post's backward wrote, in place, and
hands the stream_mix's dw to the coefficient kernel as a second gradient of
alpha[..., 0] (no autograd sums of H-sized tensors).

H: (*lead, n, d) with any token and stream strides. alpha, beta, u, r are contiguous in
the arithmetic dtype (float64 for float64 H, float32 otherwise); dH is allocated like
H; parameter gradients are summed over tokens (deterministically) and come back in each
parameter's dtype.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from crosslayer import ref
from crosslayer._autograd import first_order_backward, no_double_backward_message, oracle_first_order
from crosslayer._checks import acc_dtype
from crosslayer._extension import kernels_for
from crosslayer.ops._common import Scalar, fusable, scalar_tensor
from crosslayer.contracts import validate_mhc_coeffs
from crosslayer.ops.stream_mix import stream_mix, stream_mix_dots_op, stream_mix_op


def _projection(H: Tensor, phi: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """The oracle's (u, r) in the arithmetic dtype: u = xf·phi, r = rsqrt(mean xf² + eps)."""
    acc = acc_dtype(H.dtype)
    xf = H.to(acc).flatten(-2)
    return (xf @ phi.to(acc)).contiguous(), torch.rsqrt(xf.square().mean(-1) + eps).contiguous()


@torch.library.custom_op("crosslayer::mhc_coeffs", mutates_args=())
def mhc_coeffs_op(H: Tensor, phi: Tensor, a_pre: Tensor, a_post: Tensor, a_res: Tensor, b: Tensor,
                  eps: float, pre_eps: float, post_mult: float, iters: int,
                  sinkhorn_eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """mHC coefficients: (alpha, beta, u, r).

    H: (*lead, n, d); phi: (n·d, n²+2n); a_pre, a_post, a_res: 0-dim; b: (n²+2n,).
    alpha: (*lead, n, n+1); beta: (*lead, n); u = xf·phi: (*lead, n²+2n);
    r = rsqrt(mean xf² + eps): (*lead,) (arithmetic dtype).
    """
    kernels = kernels_for(H, "mhc_coeffs")
    if kernels is not None:
        alpha, beta, u, r = kernels.mhc_coeffs_fwd(H, phi, a_pre, a_post, a_res, b, eps, pre_eps,
                                                    post_mult, iters, sinkhorn_eps)
        return alpha, beta, u, r
    acc = acc_dtype(H.dtype)
    alpha, beta = ref.mhc_coeffs(H, phi.to(acc), a_pre.to(acc), a_post.to(acc), a_res.to(acc),
                                 b.to(acc), eps, pre_eps, post_mult, iters, sinkhorn_eps)
    u, r = _projection(H, phi, eps)
    return alpha.contiguous(), beta.contiguous(), u, r


@mhc_coeffs_op.register_fake
def _mhc_coeffs_fake(H, phi, a_pre, a_post, a_res, b, eps, pre_eps, post_mult, iters, sinkhorn_eps):
    lead, n = H.shape[:-2], H.shape[-2]
    acc = acc_dtype(H.dtype)
    return (H.new_empty((*lead, n, n + 1), dtype=acc), H.new_empty((*lead, n), dtype=acc),
            H.new_empty((*lead, n * n + 2 * n), dtype=acc), H.new_empty(tuple(lead), dtype=acc))


@torch.library.custom_op("crosslayer::mhc_pre", mutates_args=())
def mhc_pre_op(H: Tensor, phi: Tensor, a_pre: Tensor, a_post: Tensor, a_res: Tensor, b: Tensor,
               eps: float, pre_eps: float, post_mult: float, iters: int,
               sinkhorn_eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The mHC connection's pre forward: (x, alpha, beta, u, r), mhc_coeffs_op's outputs
    and x = Σ_i alpha[..., i, 0]·H_i: (*lead, d) in H's dtype, fused on CUDA into the
    coefficients' pass over H (H read once). Arguments as mhc_coeffs_op."""
    kernels = kernels_for(H, "mhc_coeffs")
    if kernels is not None:
        x, alpha, beta, u, r = kernels.mhc_pre_fwd(H, phi, a_pre, a_post, a_res, b, eps, pre_eps, post_mult,
                                                   iters, sinkhorn_eps)
        return x, alpha, beta, u, r
    alpha, beta, u, r = mhc_coeffs_op(H, phi, a_pre, a_post, a_res, b, eps, pre_eps, post_mult, iters,
                                      sinkhorn_eps)
    return stream_mix_op(H, alpha[..., 0]), alpha, beta, u, r


@mhc_pre_op.register_fake
def _mhc_pre_fake(H, phi, a_pre, a_post, a_res, b, eps, pre_eps, post_mult, iters, sinkhorn_eps):
    alpha, beta, u, r = _mhc_coeffs_fake(H, phi, a_pre, a_post, a_res, b, eps, pre_eps, post_mult, iters,
                                         sinkhorn_eps)
    return H.new_empty((*H.shape[:-2], H.shape[-1])), alpha, beta, u, r


@torch.library.custom_op("crosslayer::mhc_coeffs_bwd", mutates_args=("dH",))
def mhc_coeffs_bwd_op(dH: Tensor, accumulate: bool, prior: Optional[Tensor], dalpha: Optional[Tensor],
                      dbeta: Optional[Tensor], dpre: Optional[Tensor], dx: Optional[Tensor], H: Tensor,
                      phi: Tensor, a_pre: Tensor, a_post: Tensor, a_res: Tensor, b: Tensor, u: Tensor, r: Tensor,
                      eps: float, pre_eps: float, post_mult: float, iters: int,
                      sinkhorn_eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradient through mhc_coeffs: dH (=, += with `accumulate`, or = prior + with
    `prior`) in place, and (dphi, da_pre, da_post, da_res, db).

    dH: H's shape and dtype (with `accumulate`, another op's contribution to H's gradient
    already there); prior: H's shape and dtype or None, another op's contribution given
    as its own tensor (only read; exclusive with `accumulate`); dalpha: (*lead, n, n+1)
    or None; dbeta: (*lead, n) or None (None = zero); dpre: (*lead, n) or None, a second
    gradient of alpha[..., 0] (added to dalpha's); dx: (*lead, d) or None, the gradient
    of the pre's x = Σ_i alpha[..., i, 0]·H_i, whose dH term alpha[..., i, 0]·dx is
    added in the same pass (dpre then is <dx, H_i>, stream_mix_dots); u, r: from
    mhc_coeffs_op (the CPU path recomputes them from H). The parameter gradients are
    summed over tokens, each in its parameter's dtype.
    """
    kernels = kernels_for(H, "mhc_coeffs")
    if kernels is not None:
        dphi, da_pre, da_post, da_res, db = kernels.mhc_coeffs_bwd(
            dH, accumulate, prior, dalpha, dbeta, dpre, dx, H, phi, a_pre, a_post, a_res, b, u, r, eps, pre_eps,
            post_mult, iters, sinkhorn_eps)
        return dphi, da_pre, da_post, da_res, db
    acc = acc_dtype(H.dtype)
    if dpre is not None:  # dpre as column 0 of an (n, n+1) gradient, added to dalpha
        dpre_col0 = torch.nn.functional.pad(dpre.to(acc).unsqueeze(-1), (0, dpre.shape[-1]))
        dalpha = dpre_col0 if dalpha is None else dalpha.to(acc) + dpre_col0
    g, dphi, da_pre, da_post, da_res, db = ref.mhc_coeffs_bwd(
        dalpha, dbeta, H, phi.to(acc), a_pre.to(acc), a_post.to(acc), a_res.to(acc), b.to(acc),
        eps, pre_eps, post_mult, iters, sinkhorn_eps)
    if dx is not None:
        w = ref.mhc_coeffs(H, phi.to(acc), a_pre.to(acc), a_post.to(acc), a_res.to(acc), b.to(acc), eps, pre_eps,
                           post_mult, iters, sinkhorn_eps)[0][..., 0]
        g = g.to(acc) + w.unsqueeze(-1) * dx.to(acc).unsqueeze(-2)
    if accumulate:
        dH.add_(g.to(dH.dtype))
    elif prior is not None:
        dH.copy_(g.to(acc) + prior.to(acc))
    else:
        dH.copy_(g)
    return (dphi.to(phi.dtype).contiguous(), da_pre.to(a_pre.dtype), da_post.to(a_post.dtype),
            da_res.to(a_res.dtype), db.to(b.dtype).contiguous())


@mhc_coeffs_bwd_op.register_fake
def _mhc_coeffs_bwd_fake(dH, accumulate, prior, dalpha, dbeta, dpre, dx, H, phi, a_pre, a_post, a_res, b, u, r, eps,
                         pre_eps, post_mult, iters, sinkhorn_eps):
    return (phi.new_empty(phi.shape), a_pre.new_empty(()), a_post.new_empty(()), a_res.new_empty(()),
            b.new_empty(b.shape))


def _mhc_setup(ctx, inputs, output) -> None:
    H, phi, a_pre, a_post, a_res, b, eps, pre_eps, post_mult, iters, sinkhorn_eps = inputs
    _, _, u, r = output
    ctx.mark_non_differentiable(u, r)
    ctx.set_materialize_grads(False)  # absent output gradients stay None: no zero fills
    ctx.save_for_backward(H, phi, a_pre, a_post, a_res, b, u, r)
    ctx.floats = (eps, pre_eps, post_mult, iters, sinkhorn_eps)


# mhc_coeffs_bwd mutates dH, so it cannot take an autograd formula (torch.library refuses one
# on a non-functional schema): its callers' backward refuses second derivatives instead.
@first_order_backward(no_double_backward_message("mhc_coeffs"), connect_saved=True)
def _mhc_backward(ctx, dalpha, dbeta, du, dr):
    H, phi, a_pre, a_post, a_res, b, u, r = ctx.saved_tensors
    dH = torch.empty_like(H)
    grads = mhc_coeffs_bwd_op(dH, False, None, dalpha, dbeta, None, None, H, phi, a_pre, a_post, a_res, b, u, r,
                              *ctx.floats)
    return (dH, *grads, None, None, None, None, None)


mhc_coeffs_op.register_autograd(_mhc_backward, setup_context=_mhc_setup)


class _MhcPreForPost(torch.autograd.Function):
    """The mHC connection's pre, (x, alpha, beta, H_post): mhc_pre_op (the coefficients
    and x = stream_mix(H, alpha[..., 0]) in one pass over H); H_post is H, for the
    connection's hc_post to read. The
    backward receives hc_post's dH as H_post's gradient; stream_mix_dots gives <dx, H_i>
    (dpre, a second gradient of alpha[..., 0]) and the coefficient kernel adds its own dH
    term and the mix's alpha[..., i, 0]·dx in one pass: H's gradient is one tensor, every
    contribution added in place (DESIGN.md's floor)."""

    @staticmethod
    def forward(ctx, H, phi, a_pre, a_post, a_res, b, eps, pre_eps, post_mult, iters, sinkhorn_eps):
        x, alpha, beta, u, r = mhc_pre_op(H, phi, a_pre, a_post, a_res, b, eps, pre_eps, post_mult, iters,
                                          sinkhorn_eps)
        ctx.set_materialize_grads(False)  # absent output gradients stay None: no zero fills
        ctx.save_for_backward(H, phi, a_pre, a_post, a_res, b, u, r)
        ctx.floats = (eps, pre_eps, post_mult, iters, sinkhorn_eps)
        return x, alpha, beta, H

    @staticmethod
    @first_order_backward(no_double_backward_message("mhc_pre_for_post", "mhc_coeffs"), connect_saved=True)
    def backward(ctx, dx, dalpha, dbeta, dH_post):
        H, phi, a_pre, a_post, a_res, b, u, r = ctx.saved_tensors
        accumulate = dH_post is not None
        dH = dH_post if accumulate else torch.empty_like(H)
        dpre = stream_mix_dots_op(dx, H) if dx is not None else None
        grads = mhc_coeffs_bwd_op(dH, accumulate, None, dalpha, dbeta, dpre, dx, H, phi, a_pre, a_post, a_res, b, u, r,
                                  *ctx.floats)
        return (dH, *grads, None, None, None, None, None)


def mhc_coeffs(H: Tensor, phi: Tensor, a_pre: Scalar, a_post: Scalar, a_res: Scalar, b: Tensor,
               eps: float = 1e-6, pre_eps: float = 1e-6, post_mult: float = 2.0, iters: int = 20,
               sinkhorn_eps: float = 1e-6):
    """mHC coefficients in HC form (see crosslayer.ref.mhc_coeffs).

    H: (..., n, d), 1 <= n <= 16     the streams; any token and stream strides; a feature
                                      dim with non-unit stride is copied once; d >= 1
                                      (d = 0 is refused with a ValueError on every
                                      backend: the rms over n·d would be 0/0)
    phi: (n·d, n²+2n)                 projection (RMSNorm weight folded in)
    a_pre, a_post, a_res: 0-dim tensors or finite floats (a tensor is checked for dtype
                                      and shape only, never its value); b: (n²+2n,)
    eps, sinkhorn_eps: finite floats > 0; pre_eps: a finite float >= 0; post_mult: a
                                      finite float > 0; iters: an int >= 1
                                      (crosslayer.contracts says why)
    returns alpha: (..., n, n+1) (column 0 = pre, columns 1.. = comb) and beta: (..., n)
            (= post), in the arithmetic dtype (float32; float64 for float64 inputs)

    Fused on CUDA when the extension is built (forward: the projection and sum of
    squares in one pass over H, then gates and Sinkhorn in registers; backward: the exact
    Sinkhorn backward, dH and dphi in one pass over H); the oracle otherwise, and for
    float64 parameters with lower-precision H. First derivatives only, on every path
    (crosslayer.ref.mhc_coeffs differentiates to any order).
    """
    validate_mhc_coeffs(H, phi, a_pre, a_post, a_res, b, iters, eps=eps, pre_eps=pre_eps, post_mult=post_mult,
                        sinkhorn_eps=sinkhorn_eps)
    scalars = [v for v in (a_pre, a_post, a_res) if isinstance(v, Tensor)]
    if not fusable("mhc_coeffs", H, phi, b, *scalars):
        return oracle_first_order("mhc_coeffs", ref.mhc_coeffs, H, phi, a_pre, a_post, a_res, b, eps, pre_eps,
                                  post_mult, iters, sinkhorn_eps)
    a = [scalar_tensor(v, acc_dtype(H.dtype), H.device) for v in (a_pre, a_post, a_res)]
    alpha, beta, _, _ = mhc_coeffs_op(H, phi, *a, b, eps, pre_eps, post_mult, iters, sinkhorn_eps)
    return alpha, beta


def mhc_pre_for_post(H: Tensor, phi: Tensor, a_pre: Scalar, a_post: Scalar, a_res: Scalar, b: Tensor,
                     eps: float = 1e-6, pre_eps: float = 1e-6, post_mult: float = 2.0, iters: int = 20,
                     sinkhorn_eps: float = 1e-6):
    """The mHC connection's pre: (x, alpha, beta, H_post), x = stream_mix(H, alpha[..., 0])
    with (alpha, beta) = mhc_coeffs(H, ...) (arguments as there), H_post (H's values) the
    tensor the connection's `hc_post` must read. Fused, the backward adds every dH term
    to the one hc_post's backward wrote, in place (_MhcPreForPost); elsewhere H_post is H
    and autograd sums the terms."""
    validate_mhc_coeffs(H, phi, a_pre, a_post, a_res, b, iters, eps=eps, pre_eps=pre_eps, post_mult=post_mult,
                        sinkhorn_eps=sinkhorn_eps, op="mhc_pre_for_post")
    scalars = [v for v in (a_pre, a_post, a_res) if isinstance(v, Tensor)]
    if not fusable("mhc_coeffs", H, phi, b, *scalars):
        alpha, beta = oracle_first_order("mhc_pre_for_post", ref.mhc_coeffs, H, phi, a_pre, a_post, a_res, b, eps,
                                         pre_eps, post_mult, iters, sinkhorn_eps, oracle="mhc_coeffs")
        return stream_mix(H, alpha[..., 0]), alpha, beta, H
    a = [scalar_tensor(v, acc_dtype(H.dtype), H.device) for v in (a_pre, a_post, a_res)]
    return _MhcPreForPost.apply(H, phi, *a, b, eps, pre_eps, post_mult, iters, sinkhorn_eps)
