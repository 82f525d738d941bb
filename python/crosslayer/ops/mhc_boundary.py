"""mhc_boundary on the GPU: connection i's post fused with mHC connection i+1's pre, the
custom op over crosslayer._C, its autograd, and the public function that mirrors
`crosslayer.ref.mhc_boundary`.

Layers, bottom up:
  _C.mhc_boundary_fwd                    pybind11 launcher (csrc/mhc_coeffs.cu)
  torch.ops.crosslayer.mhc_boundary      custom op + fake + autograd: (H', x', alpha',
                                         beta', u, r); u, r as mhc_coeffs_op's (saved for
                                         the backward, not differentiable)
  torch.ops.crosslayer.mhc_boundary_bwd  custom op + fake: its backward (_C.mhc_boundary_bwd,
                                         csrc/mhc_boundary_bwd.cu)
  mhc_boundary(H, y, alpha, beta, phi, a_pre, a_post, a_res, b, ...)
                                         validates once, then the op above on CUDA (the
                                         oracle on CPU, without the extension, or for
                                         float64 parameters with lower-precision H)

Forward: one kernel over 16-token tiles mixes H' = hc_post(H, y, alpha, beta), writes
it, projects it for the coefficients and mixes x' from it while the tile is in L2:
2n·d + 2d elements a token (the unfused post + pre: 3n·d + 2d).
Backward (torch.ops.crosslayer.mhc_boundary_bwd; fused for 16-bit H with n <= 4 and
d >= 32): one kernel over 16-token tiles takes <dx', H'_i> (H' mixed again from H and
y), the coefficients' backward, dH' = dH_next + its terms in fp32 (never stored) and
hc_post's backward of it (dH, dy, the post's coefficient rows); one token_sums launch;
the dphi pass over H'. 3n·d + 3d + n·d elements a token in 3 launches at decode sizes.
Otherwise composed of the unfused ops (stream_mix_dots, the coefficient kernels writing
dH' = dH_next + their terms into a new tensor, hc_post's backward).

H: (*lead, n, d) with any token and stream strides; y: (*lead, d); alpha, beta:
connection i's coefficients, per token (*lead, n, n+1), (*lead, n) or static (n, n+1),
(n,). H' is allocated like H, x' contiguous; alpha', beta', u, r contiguous in the
arithmetic dtype (float64 for float64 H, float32 otherwise).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from crosslayer import ref
from crosslayer._autograd import oracle_first_order, refusing_backward
from crosslayer._checks import acc_dtype
from crosslayer._extension import kernels_for
from crosslayer.contracts import validate_mhc_boundary
from crosslayer.ops._common import Scalar, fusable, lead_d, like, scalar_tensor
from crosslayer.ops.hc_post import hc_post_bwd_op
from crosslayer.ops.mhc_coeffs import _mhc_coeffs_fake, _projection, mhc_coeffs_bwd_op
from crosslayer.ops.stream_mix import stream_mix_dots_op


@torch.library.custom_op("crosslayer::mhc_boundary", mutates_args=())
def mhc_boundary_op(H: Tensor, y: Tensor, alpha: Tensor, beta: Tensor, phi: Tensor, a_pre: Tensor,
                    a_post: Tensor, a_res: Tensor, b: Tensor, eps: float, pre_eps: float, post_mult: float,
                    iters: int, sinkhorn_eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(H', x', alpha', beta', u, r): H' = hc_post(H, y, alpha, beta), then the mHC pre
    of H' (mhc_coeffs_op's u = xf'·phi: (*lead, n²+2n), r = rsqrt(mean xf'² + eps):
    (*lead,))."""
    kernels = kernels_for(H, "mhc_boundary")
    if kernels is not None:
        H_next, x, alpha_next, beta_next, u, r = kernels.mhc_boundary_fwd(
            H, y, alpha, beta, phi, a_pre, a_post, a_res, b, eps, pre_eps, post_mult, iters, sinkhorn_eps)
        return H_next, x, alpha_next, beta_next, u, r
    acc = acc_dtype(H.dtype)
    H_next, x, alpha_next, beta_next = ref.mhc_boundary(H, y, alpha.to(acc), beta.to(acc), phi.to(acc),
                                                        a_pre.to(acc), a_post.to(acc), a_res.to(acc), b.to(acc),
                                                        eps, pre_eps, post_mult, iters, sinkhorn_eps)
    u, r = _projection(H_next, phi, eps)
    return like(H, H_next), x.contiguous(), alpha_next.contiguous(), beta_next.contiguous(), u, r


@mhc_boundary_op.register_fake
def _mhc_boundary_fake(H, y, alpha, beta, phi, a_pre, a_post, a_res, b, eps, pre_eps, post_mult, iters,
                       sinkhorn_eps):
    alpha_next, beta_next, u, r = _mhc_coeffs_fake(H, phi, a_pre, a_post, a_res, b, eps, pre_eps, post_mult,
                                                   iters, sinkhorn_eps)
    return torch.empty_like(H), H.new_empty((*H.shape[:-2], H.shape[-1])), alpha_next, beta_next, u, r


def _mhc_boundary_setup(ctx, inputs, output) -> None:
    H, y, alpha, beta, phi, a_pre, a_post, a_res, b, eps, pre_eps, post_mult, iters, sinkhorn_eps = inputs
    H_next, _, _, _, u, r = output
    ctx.mark_non_differentiable(u, r)
    ctx.set_materialize_grads(False)  # absent output gradients stay None: no zero fills
    ctx.save_for_backward(H, y, alpha, beta, H_next, phi, a_pre, a_post, a_res, b, u, r)
    ctx.floats = (eps, pre_eps, post_mult, iters, sinkhorn_eps)


@torch.library.custom_op("crosslayer::mhc_boundary_bwd", mutates_args=())
def mhc_boundary_bwd_op(dH_next: Optional[Tensor], dx: Optional[Tensor], dalpha_next: Optional[Tensor],
                        dbeta_next: Optional[Tensor], H: Tensor, y: Tensor, alpha: Tensor, beta: Tensor,
                        H_next: Tensor, phi: Tensor, a_pre: Tensor, a_post: Tensor, a_res: Tensor, b: Tensor,
                        u: Tensor, r: Tensor, eps: float, pre_eps: float, post_mult: float, iters: int,
                        sinkhorn_eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                      Tensor, Tensor]:
    """(dH, dy, dalpha, dbeta, dphi, da_pre, da_post, da_res, db) of mhc_boundary_op.

    dH_next: H's shape or None (H''s gradient from later ops); dx: (*lead, d) or None;
    dalpha_next, dbeta_next: (*lead, n, n+1), (*lead, n) or None (None = zero); H, y,
    alpha, beta: connection i's post; H_next, u, r: the forward's H', u, r. dH is
    allocated like H, dy contiguous; dalpha, dbeta in the post's coefficient shapes
    (summed over tokens when static) in the arithmetic dtype; the parameter gradients
    summed over tokens, each in its parameter's dtype.
    """
    kernels = kernels_for(H, "mhc_boundary")
    if kernels is not None:
        return tuple(kernels.mhc_boundary_bwd(dH_next, dx, dalpha_next, dbeta_next, H, y, alpha, beta, H_next, phi,
                                              a_pre, a_post, a_res, b, u, r, eps, pre_eps, post_mult, iters,
                                              sinkhorn_eps))
    dpre = stream_mix_dots_op(dx, H_next) if dx is not None else None
    g = torch.empty_like(H_next)  # dH' = dH_next + the pre's terms (dH_next only read)
    grads_next = mhc_coeffs_bwd_op(g, False, dH_next, dalpha_next, dbeta_next, dpre, dx, H_next, phi, a_pre,
                                   a_post, a_res, b, u, r, eps, pre_eps, post_mult, iters, sinkhorn_eps)
    return (*hc_post_bwd_op(g, H, y, alpha, beta), *grads_next)


@mhc_boundary_bwd_op.register_fake
def _mhc_boundary_bwd_fake(dH_next, dx, dalpha_next, dbeta_next, H, y, alpha, beta, H_next, phi, a_pre, a_post,
                           a_res, b, u, r, eps, pre_eps, post_mult, iters, sinkhorn_eps):
    acc = acc_dtype(H.dtype)
    return (torch.empty_like(H), y.new_empty(lead_d(H)), alpha.new_empty(alpha.shape, dtype=acc),
            beta.new_empty(beta.shape, dtype=acc), phi.new_empty(phi.shape), a_pre.new_empty(()),
            a_post.new_empty(()), a_res.new_empty(()), b.new_empty(b.shape))


def _mhc_boundary_backward(ctx, dH_next, dx, dalpha_next, dbeta_next, du, dr):
    H, y, alpha, beta, H_next, phi, a_pre, a_post, a_res, b, u, r = ctx.saved_tensors
    dH, dy, dalpha, dbeta, *grads_next = mhc_boundary_bwd_op(dH_next, dx, dalpha_next, dbeta_next, H, y, alpha,
                                                             beta, H_next, phi, a_pre, a_post, a_res, b, u, r,
                                                             *ctx.floats)
    return (dH, dy, dalpha.to(alpha.dtype), dbeta.to(beta.dtype), *grads_next, None, None, None, None, None)


mhc_boundary_op.register_autograd(_mhc_boundary_backward, setup_context=_mhc_boundary_setup)
mhc_boundary_bwd_op.register_autograd(refusing_backward("mhc_boundary", "mhc_boundary_bwd"))  # first order only


def mhc_boundary(H: Tensor, y: Tensor, alpha: Tensor, beta: Tensor, phi: Tensor, a_pre: Scalar, a_post: Scalar,
                 a_res: Scalar, b: Tensor, eps: float = 1e-6, pre_eps: float = 1e-6, post_mult: float = 2.0,
                 iters: int = 20, sinkhorn_eps: float = 1e-6):
    """Connection i's post fused with mHC connection i+1's pre (see
    crosslayer.ref.mhc_boundary).

    H: (..., n, d), 1 <= n <= 16    connection i's streams; any token and stream strides
    y: (..., d)                      sublayer i's output
    alpha: (..., n, n+1) or (n, n+1); beta: (..., n) or (n,)   connection i's coefficients
    phi: (n·d, n²+2n); a_pre, a_post, a_res: 0-dim tensors or floats; b: (n²+2n,); the
    floats: connection i+1's, as for `mhc_coeffs`
    returns H': (..., n, d) and x': (..., d) in H's dtype; alpha' (..., n, n+1) and beta'
            (..., n) in the arithmetic dtype

    Fused on CUDA when the extension is built (forward: one pass over a 16-token tile
    of H and y; backward: one pass over the tile for 16-bit H with n <= 4 and d >= 32,
    then the dphi pass over H'; the unfused ops' kernels otherwise); the oracle
    otherwise, and for float64 parameters with lower-precision H. First derivatives only,
    on every path (crosslayer.ref.mhc_boundary differentiates to any order).
    """
    validate_mhc_boundary(H, y, alpha, beta, phi, a_pre, a_post, a_res, b, iters, eps=eps, pre_eps=pre_eps,
                          post_mult=post_mult, sinkhorn_eps=sinkhorn_eps)
    scalars = [v for v in (a_pre, a_post, a_res) if isinstance(v, Tensor)]
    if not fusable("mhc_boundary", H, y, alpha, beta, phi, b, *scalars):
        return oracle_first_order("mhc_boundary", ref.mhc_boundary, H, y, alpha, beta, phi, a_pre, a_post, a_res,
                                  b, eps, pre_eps, post_mult, iters, sinkhorn_eps)
    a = [scalar_tensor(v, acc_dtype(H.dtype), H.device) for v in (a_pre, a_post, a_res)]
    return mhc_boundary_op(H, y, alpha, beta, phi, *a, b, eps, pre_eps, post_mult, iters, sinkhorn_eps)[:4]
