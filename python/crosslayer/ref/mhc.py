r"""Oracle for manifold-constrained Hyper-Connections (mHC, arXiv 2512.24880) coefficients.

One token's state H: (n, d) is flattened to xf = vec(H) ∈ R^{n·d} (stream-major) and

    r = rsqrt(mean(xf²) + eps),   z = r·(xf·phi),   phi: (n·d, n²+2n)
    pre_i  = sigmoid(a_pre·z_i + b_i) + pre_eps                     i < n
    post_k = post_mult·sigmoid(a_post·z_{n+k} + b_{n+k})            k < n
    comb   = sinkhorn((a_res·z_{2n:} + b_{2n:}).view(n, n))          row-major

alpha[i, 0] = pre_i, alpha[j, 1+k] = comb[j, k], beta = post, so the HC mixing ops
apply them: x = stream_mix(H, alpha[..., 0]), H' = hc_post(H, y, alpha, beta)
(H'_k = post_k·y + Σ_j comb[j,k]·H_j: combᵀ is applied, and columns of comb sum to 1).

Sinkhorn (the DeepSeek convention, pinned): P = softmax(L, -1) + eps;
P = P / (colsum(P) + eps); then (iters − 1) × (P = P / (rowsum(P) + eps);
P = P / (colsum(P) + eps)).

Hand-derived backward. Each normalisation Q = P / (s + eps), s = Σ_axis P, gives

    dP = (dQ − Σ_axis(dQ·Q)) / (s + eps)

(exact, eps included), applied from the last iterate back to the first (the iterates
are recomputed, not replaced by the converged point); the softmax S gives
dL = S·(dS − Σ_-1(dS·S)), with dS = dP₀ since the + eps is a constant shift.
Then with h = [a_pre·z_pre + b_pre, a_post·z_post + b_post, a_res·z_res + b_res]:

    dh_pre = dpre·σ(1−σ);  dh_post = post_mult·dpost·σ(1−σ)
    dh_res = sinkhorn_bwd(dcomb)
    db = Σ_tokens dh;  da_* = Σ dh_*·z_*;  dz = [a_pre·dh_pre, a_post·dh_post, a_res·dh_res]
    du = r·dz (u = xf·phi);  dr = <dz, u>;  dphi = Σ_tokens xfᵀ·du
    dxf = du·phiᵀ − dr·r³·xf/(n·d)

All arithmetic is in float32 (float64 when any input is float64); coefficients and
their gradients come back in the arithmetic dtype, dH in the dtype of H.
"""

from __future__ import annotations


import torch

from crosslayer._checks import check_same_device, check_shape, check_tensor, compute_dtype
from crosslayer.contracts import (check_coeff_grads, tensors_only, validate_mhc_boundary, validate_mhc_coeffs,
                                  validate_sinkhorn)
from crosslayer.ref.hc import as_scalar, check_boundary_grads, hc_post, hc_post_bwd, stream_mix, stream_mix_bwd


# --------------------------------------------------------------------------- sinkhorn


def _sinkhorn_trace(L: torch.Tensor, iters: int, eps: float):
    """Forward with every iterate kept: softmax S, output P, [(axis, Q, s + eps), ...]."""
    S = torch.softmax(L, dim=-1)
    P = S + eps
    trace = []
    axes = [-2] + [-1, -2] * (iters - 1)
    for axis in axes:
        s = P.sum(axis, keepdim=True) + eps
        P = P / s
        trace.append((axis, P, s))
    return S, P, trace


def sinkhorn(logits, iters: int = 20, eps: float = 1e-6):
    """Sinkhorn-Knopp normalisation towards a doubly stochastic matrix.

    logits: (..., n, n); iters: an int >= 1; eps: a finite float > 0 (it keeps every
    normalisation away from 0/0, crosslayer.contracts.check_sinkhorn_eps). Returns P:
    (..., n, n) in the arithmetic dtype.
    """
    validate_sinkhorn(logits, iters, eps)
    _, P, _ = _sinkhorn_trace(logits.to(compute_dtype(logits)), iters, eps)
    return P


def sinkhorn_bwd(dP, logits, iters: int = 20, eps: float = 1e-6):
    """Exact hand-derived backward of `sinkhorn` (the iterates are recomputed).

    dP: (..., n, n); logits: (..., n, n). Returns dlogits: (..., n, n) in the
    arithmetic dtype.
    """
    validate_sinkhorn(logits, iters, eps)
    check_tensor("dP", dP)
    check_shape("dP", dP, tuple(logits.shape), "(the shape of logits)")
    check_same_device(logits=logits, dP=dP)
    ct = compute_dtype(dP, logits)
    S, _, trace = _sinkhorn_trace(logits.to(ct), iters, eps)
    g = dP.to(ct)
    for axis, Q, s in reversed(trace):
        g = (g - (g * Q).sum(axis, keepdim=True)) / s
    return S * (g - (g * S).sum(-1, keepdim=True))


# ------------------------------------------------------------------------- mhc_coeffs


def _mhc_forward(H, phi, a_pre, a_post, a_res, b, eps, ct):
    """xf: (..., n·d), r: (...,), u = xf·phi, z = r·u, h: (..., n²+2n) pre-activations."""
    n = H.shape[-2]
    xf = H.to(ct).flatten(-2)
    r = torch.rsqrt(xf.square().mean(-1) + eps)
    u = xf @ phi.to(ct)
    z = r.unsqueeze(-1) * u
    a = [as_scalar(v, ct, H.device) for v in (a_pre, a_post, a_res)]
    scale = torch.cat([a[0].expand(n), a[1].expand(n), a[2].expand(n * n)])
    h = scale * z + b.to(ct)
    return xf, r, u, z, scale, h


def mhc_coeffs(H, phi, a_pre, a_post, a_res, b, eps: float = 1e-6, pre_eps: float = 1e-6,
               post_mult: float = 2.0, iters: int = 20, sinkhorn_eps: float = 1e-6):
    """mHC coefficients in HC form.

    H: (..., n, d) with d >= 1 (d = 0 is refused: the rms over n·d would be 0/0);
    phi: (n·d, n²+2n); a_pre, a_post, a_res: 0-dim or finite floats; b: (n²+2n,);
    eps, sinkhorn_eps > 0, pre_eps >= 0, post_mult > 0 (finite floats), iters >= 1
    (crosslayer.contracts says why). Returns alpha: (..., n, n+1) (column 0 = pre, columns 1.. = comb)
    and beta: (..., n) (= post), in the arithmetic dtype.
    """
    validate_mhc_coeffs(H, phi, a_pre, a_post, a_res, b, iters, eps=eps, pre_eps=pre_eps, post_mult=post_mult,
                        sinkhorn_eps=sinkhorn_eps)
    ct = compute_dtype(H, phi, b, *tensors_only(a_pre=a_pre, a_post=a_post, a_res=a_res).values())
    n = H.shape[-2]
    *_, h = _mhc_forward(H, phi, a_pre, a_post, a_res, b, eps, ct)
    pre = torch.sigmoid(h[..., :n]) + pre_eps
    post = post_mult * torch.sigmoid(h[..., n : 2 * n])
    comb = sinkhorn(h[..., 2 * n :].unflatten(-1, (n, n)), iters, sinkhorn_eps)
    alpha = torch.cat([pre.unsqueeze(-1), comb], dim=-1)
    return alpha, post


def mhc_coeffs_bwd(dalpha, dbeta, H, phi, a_pre, a_post, a_res, b, eps: float = 1e-6,
                   pre_eps: float = 1e-6, post_mult: float = 2.0, iters: int = 20,
                   sinkhorn_eps: float = 1e-6):
    """Hand-derived backward of `mhc_coeffs`.

    dalpha: (..., n, n+1) or None; dbeta: (..., n) or None; the rest as in `mhc_coeffs`.
    Returns dH: (..., n, d) in H.dtype; dphi: (n·d, n²+2n); da_pre, da_post, da_res:
    0-dim; db: (n²+2n,) (parameter gradients summed over tokens).
    """
    validate_mhc_coeffs(H, phi, a_pre, a_post, a_res, b, iters, eps=eps, pre_eps=pre_eps, post_mult=post_mult,
                        sinkhorn_eps=sinkhorn_eps)
    lead, n, d = H.shape[:-2], H.shape[-2], H.shape[-1]
    check_coeff_grads(dalpha, dbeta, lead, n)
    check_same_device(**tensors_only(H=H, dalpha=dalpha, dbeta=dbeta))
    ct = compute_dtype(H, phi, b, dalpha, dbeta,
                       *tensors_only(a_pre=a_pre, a_post=a_post, a_res=a_res).values())
    xf, r, u, z, scale, h = _mhc_forward(H, phi, a_pre, a_post, a_res, b, eps, ct)
    if dalpha is None:
        dalpha = torch.zeros(*lead, n, n + 1, dtype=ct, device=H.device)
    if dbeta is None:
        dbeta = torch.zeros(*lead, n, dtype=ct, device=H.device)
    dpre, dcomb, dpost = dalpha[..., 0].to(ct), dalpha[..., 1:].to(ct), dbeta.to(ct)

    sig_pre = torch.sigmoid(h[..., :n])
    sig_post = torch.sigmoid(h[..., n : 2 * n])
    dh = torch.cat([
        dpre * sig_pre * (1 - sig_pre),
        post_mult * dpost * sig_post * (1 - sig_post),
        sinkhorn_bwd(dcomb, h[..., 2 * n :].unflatten(-1, (n, n)), iters,
                     sinkhorn_eps).flatten(-2),
    ], dim=-1)
    db = dh.reshape(-1, dh.shape[-1]).sum(0)
    dhz = dh * z
    da_pre = dhz[..., :n].sum()
    da_post = dhz[..., n : 2 * n].sum()
    da_res = dhz[..., 2 * n :].sum()
    dz = scale * dh
    du = r.unsqueeze(-1) * dz
    dr = (dz * u).sum(-1)
    phic = phi.to(ct)
    dphi = torch.einsum("...a,...j->aj", xf, du)
    dxf = du @ phic.transpose(0, 1) - (dr * r.pow(3) / (n * d)).unsqueeze(-1) * xf
    dH = dxf.unflatten(-1, (n, d))
    return dH.to(H.dtype), dphi, da_pre, da_post, da_res, db


# ----------------------------------------------------------------------- mhc_boundary


def mhc_boundary(H, y, alpha, beta, phi, a_pre, a_post, a_res, b, eps: float = 1e-6, pre_eps: float = 1e-6,
                 post_mult: float = 2.0, iters: int = 20, sinkhorn_eps: float = 1e-6):
    """Connection i's post fused with mHC connection i+1's pre, at the boundary of two
    sublayers: H' = hc_post(H, y, alpha, beta), alpha', beta' = mhc_coeffs(H', phi, ...),
    x' = stream_mix(H', alpha'[..., 0]).

    H: (..., n, d); y: (..., d); alpha: (..., n, n+1) or (n, n+1); beta: (..., n) or (n,)
    (connection i's coefficients); phi, a_pre, a_post, a_res, b and the floats:
    connection i+1's, as in `mhc_coeffs`.
    Returns H' (..., n, d) and x' (..., d) in H.dtype; alpha' (..., n, n+1) and beta'
    (..., n) in the arithmetic dtype.
    """
    validate_mhc_boundary(H, y, alpha, beta, phi, a_pre, a_post, a_res, b, iters, eps=eps, pre_eps=pre_eps,
                          post_mult=post_mult, sinkhorn_eps=sinkhorn_eps)
    H_next = hc_post(H, y, alpha, beta)
    alpha_next, beta_next = mhc_coeffs(H_next, phi, a_pre, a_post, a_res, b, eps, pre_eps, post_mult, iters,
                                       sinkhorn_eps)
    return H_next, stream_mix(H_next, alpha_next[..., 0]), alpha_next, beta_next


def mhc_boundary_bwd(dH_next, dx_next, dalpha_next, dbeta_next, H, y, alpha, beta, phi, a_pre, a_post, a_res, b,
                     eps: float = 1e-6, pre_eps: float = 1e-6, post_mult: float = 2.0, iters: int = 20,
                     sinkhorn_eps: float = 1e-6):
    """Hand-derived backward of `mhc_boundary`: the total gradient of H' is dH_next (from
    its later readers) plus the pre's two dH terms (the coefficients', and the mix's
    alpha'[..., i, 0]·dx'), summed in the arithmetic dtype, then hc_post's backward
    from it. The mix's dw = <dx', H'_i> joins dalpha'[..., 0].

    dH_next: (..., n, d) or None (zero); dx_next: (..., d) or None (zero); dalpha_next,
    dbeta_next: (..., n, n+1), (..., n) or None; the rest as in `mhc_boundary`.
    Returns dH (H.dtype), dy (y.dtype), dalpha, dbeta (the coefficients' shapes, summed
    over tokens when static), dphi, da_pre, da_post, da_res, db (summed over tokens).
    """
    validate_mhc_boundary(H, y, alpha, beta, phi, a_pre, a_post, a_res, b, iters, eps=eps, pre_eps=pre_eps,
                          post_mult=post_mult, sinkhorn_eps=sinkhorn_eps)
    check_boundary_grads(H, dH_next, dx_next)
    ct = compute_dtype(H, y, alpha, beta, phi, b, *tensors_only(a_pre=a_pre, a_post=a_post, a_res=a_res).values())
    lead, n, d = H.shape[:-2], H.shape[-2], H.shape[-1]
    # H' in the arithmetic dtype (exact: the stored values widened), so that the pre's
    # dH terms come back unrounded.
    H_next = hc_post(H, y, alpha, beta).to(ct)
    alpha_next, _ = mhc_coeffs(H_next, phi, a_pre, a_post, a_res, b, eps, pre_eps, post_mult, iters, sinkhorn_eps)
    if dalpha_next is None:
        dalpha_next = torch.zeros(*lead, n, n + 1, dtype=ct, device=H.device)
    dalpha_all = dalpha_next.to(ct).clone()
    g = torch.zeros(*lead, n, d, dtype=ct, device=H.device) if dH_next is None else dH_next.to(ct)
    if dx_next is not None:
        dH_mix, dw = stream_mix_bwd(dx_next.to(ct), H_next, alpha_next[..., 0])
        dalpha_all[..., 0] += dw
        g = g + dH_mix
    dH_pre, dphi, da_pre, da_post, da_res, db = mhc_coeffs_bwd(dalpha_all, dbeta_next, H_next, phi, a_pre, a_post,
                                                                a_res, b, eps, pre_eps, post_mult, iters,
                                                                sinkhorn_eps)
    dH, dy, dalpha, dbeta = hc_post_bwd(g + dH_pre, H, y, alpha, beta)
    return dH, dy, dalpha, dbeta, dphi, da_pre, da_post, da_res, db
