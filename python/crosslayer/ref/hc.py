r"""Oracle for Hyper-Connections (HC, arXiv 2409.19606): static (SHC) and dynamic (DHC).

The hidden state of one token is a stack of n streams, H: (n, d). A layer T reads one
vector x = Σ_i alpha[i,0]·H_i, computes y = T(x), and writes back

    H'_k = beta_k·y + Σ_i alpha[i,1+k]·H_i              (k = 0..n-1).

In the paper's notation HC = [[0, B], [A_m, A_r]] ∈ R^{(n+1)×(n+1)}, and here
alpha = [A_m | A_r] ∈ R^{n×(n+1)}, beta = B ∈ R^n.

SHC: alpha = A, beta = B (static, shared by every token).
DHC: per stream i, with r_i = rsqrt(mean_d H_i² + eps) and p_i = r_i·(H_i·W) ∈ R^{n+2}
(W: (d, n+2), the norm weight folded into W),

    alpha[i,:] = A[i,:] + s_a·tanh(p_i[:n+1]),    beta[i] = B[i] + s_b·tanh(p_i[n+1]).

Hand-derived backward (no autograd), for the loss <dx,x> + <dalpha,alpha> + <dbeta,beta>:

    Galpha = dalpha, plus Galpha[i,0] += <dx, H_i>;   Gbeta = dbeta
    dA = Σ_tokens Galpha;  dB = Σ_tokens Gbeta
    dH_i = alpha[i,0]·dx                                        (SHC: nothing else)
    t = tanh(p);  dt = [s_a·Galpha, s_b·Gbeta]
    ds_a = Σ Galpha·t[:n+1];  ds_b = Σ Gbeta·t[n+1]
    dp = dt·(1 − t²);  dq = r·dp (q = H_i·W);  dr_i = <dp_i, q_i>
    dW = Σ_tokens Σ_i H_iᵀ·dq_i
    dH_i += dq_i·Wᵀ − dr_i·r_i³·H_i/d                 (since d r_i/d H_i = −r_i³·H_i/d)

hc_post backward: dy = Σ_k beta_k·dH'_k; dH_i = Σ_k alpha[i,1+k]·dH'_k;
dalpha[i,1+k] = <H_i, dH'_k> (dalpha[:,0] = 0); dbeta_k = <dH'_k, y>; static
coefficients get their gradient summed over tokens.

All arithmetic is in float32 (float64 when any input is float64); activations come
back in the dtype of H (of y for dy), coefficients and their gradients in the
arithmetic dtype.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from crosslayer._checks import check_index, check_same_device, check_shape, check_tensor, compute_dtype
from crosslayer.contracts import (
    MAX_STREAMS,
    check_coeff,
    check_coeff_grads,
    check_streams,
    tensors_only,
    validate_hc_boundary,
    validate_hc_post,
    validate_hc_pre,
    validate_stream_mix,
)

Scalar = Union[torch.Tensor, float]


def as_scalar(v: Scalar, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 0-dim tensor of `dtype` on `device` holding `v`."""
    if isinstance(v, torch.Tensor):
        return v.to(device=device, dtype=dtype)
    return torch.tensor(float(v), dtype=dtype, device=device)


def sum_to(g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum the leading dims of `g` away until it has `shape` (static coefficients)."""
    if g.shape == shape:
        return g
    return g.reshape(-1, *shape).sum(0)


# ----------------------------------------------------------------------------- hc_pre


def _dhc_projection(Hc, W, eps):
    """r: (..., n), q = H·W: (..., n, n+2), t = tanh(r·q): (..., n, n+2)."""
    r = torch.rsqrt(Hc.square().mean(-1) + eps)
    q = Hc @ W
    t = torch.tanh(r.unsqueeze(-1) * q)
    return r, q, t


def hc_pre(H, A, B, W=None, s_a=None, s_b=None, eps: float = 1e-6):
    """Layer input and HC coefficients.

    H: (..., n, d); A: (n, n+1); B: (n,); W: (d, n+2) or None (SHC);
    s_a, s_b: 0-dim tensors or finite floats (DHC only); eps: a finite float > 0.
    d = 0: refused for DHC (ValueError: the rms is a mean over no features); SHC gives
    x (..., 0), alpha = A, beta = B.
    Returns x: (..., d) in H.dtype; alpha: (n, n+1) for SHC (a copy of A),
    (..., n, n+1) for DHC; beta: (n,) for SHC, (..., n) for DHC (coefficients in the
    arithmetic dtype).
    """
    validate_hc_pre(H, A, B, W, s_a, s_b, eps)
    ct = compute_dtype(H, A, B, W, *tensors_only(s_a=s_a, s_b=s_b).values())
    Hc = H.to(ct)
    A, B = A.to(ct), B.to(ct)
    if W is None:
        alpha, beta = A.clone(), B.clone()
    else:
        n = H.shape[-2]
        sa, sb = as_scalar(s_a, ct, H.device), as_scalar(s_b, ct, H.device)
        _, _, t = _dhc_projection(Hc, W.to(ct), eps)
        alpha = A + sa * t[..., : n + 1]
        beta = B + sb * t[..., n + 1]
    x = (alpha[..., 0].unsqueeze(-1) * Hc).sum(-2)
    return x.to(H.dtype), alpha, beta


def hc_pre_bwd(dx, dalpha, dbeta, H, A, B, W=None, s_a=None, s_b=None, eps: float = 1e-6):
    """Hand-derived backward of `hc_pre`.

    dx: (..., d); dalpha: alpha's shape ((n, n+1) static or (..., n, n+1)) or None;
    dbeta: beta's shape ((n,) or (..., n)) or None; the rest as in `hc_pre`.
    Returns dH: (..., n, d) in H.dtype; dA: (n, n+1); dB: (n,); dW: (d, n+2);
    ds_a, ds_b: 0-dim (dW, ds_a, ds_b are None for SHC). Parameter gradients are
    summed over tokens.
    """
    validate_hc_pre(H, A, B, W, s_a, s_b, eps)
    lead, n, d = H.shape[:-2], H.shape[-2], H.shape[-1]
    check_tensor("dx", dx)
    check_shape("dx", dx, tuple(lead) + (d,), "(..., d) for H of shape (..., n, d)")
    if W is None:
        if dalpha is not None:
            check_coeff("dalpha", dalpha, (n, n + 1), lead)
        if dbeta is not None:
            check_coeff("dbeta", dbeta, (n,), lead)
    else:
        check_coeff_grads(dalpha, dbeta, lead, n)
    check_same_device(**tensors_only(H=H, dx=dx, dalpha=dalpha, dbeta=dbeta))
    ct = compute_dtype(H, A, B, W, dx, dalpha, dbeta,
                       *tensors_only(s_a=s_a, s_b=s_b).values())
    Hc, dxc, A = H.to(ct), dx.to(ct), A.to(ct)
    g0 = torch.einsum("...d,...id->...i", dxc, Hc)

    if W is None:
        dA = torch.zeros(n, n + 1, dtype=ct, device=H.device)
        dA[:, 0] = sum_to(g0, torch.Size((n,)))
        if dalpha is not None:
            dA = dA + sum_to(dalpha.to(ct), dA.shape)
        dB = torch.zeros(n, dtype=ct, device=H.device)
        if dbeta is not None:
            dB = dB + sum_to(dbeta.to(ct), dB.shape)
        dH = A[:, 0].unsqueeze(-1) * dxc.unsqueeze(-2)
        return dH.to(H.dtype), dA, dB, None, None, None

    Galpha = torch.zeros(*lead, n, n + 1, dtype=ct, device=H.device)
    if dalpha is not None:
        Galpha = Galpha + dalpha.to(ct)
    Galpha[..., 0] += g0
    Gbeta = torch.zeros(*lead, n, dtype=ct, device=H.device)
    if dbeta is not None:
        Gbeta = Gbeta + dbeta.to(ct)
    dA = sum_to(Galpha, A.shape)
    dB = sum_to(Gbeta, B.shape)

    Wc = W.to(ct)
    sa, sb = as_scalar(s_a, ct, H.device), as_scalar(s_b, ct, H.device)
    r, q, t = _dhc_projection(Hc, Wc, eps)
    alpha0 = A[:, 0] + sa * t[..., 0]
    ds_a = (Galpha * t[..., : n + 1]).sum()
    ds_b = (Gbeta * t[..., n + 1]).sum()
    dt = torch.cat([sa * Galpha, (sb * Gbeta).unsqueeze(-1)], dim=-1)
    dp = dt * (1 - t.square())
    dq = r.unsqueeze(-1) * dp
    dr = (dp * q).sum(-1)
    dW = torch.einsum("...id,...ij->dj", Hc, dq)
    dH = (
        alpha0.unsqueeze(-1) * dxc.unsqueeze(-2)
        + dq @ Wc.transpose(0, 1)
        - (dr * r.pow(3) / d).unsqueeze(-1) * Hc
    )
    return dH.to(H.dtype), dA, dB, dW, ds_a, ds_b


# ---------------------------------------------------------------------------- hc_post


def hc_post(H, y, alpha, beta):
    """Width and depth connection: H'_k = beta_k·y + Σ_i alpha[i,1+k]·H_i.

    H: (..., n, d); y: (..., d); alpha: (..., n, n+1) or (n, n+1) (column 0 unused);
    beta: (..., n) or (n,). Returns H': (..., n, d) in H.dtype.
    """
    validate_hc_post(H, y, alpha, beta)
    ct = compute_dtype(H, y, alpha, beta)
    Hc, yc = H.to(ct), y.to(ct)
    mix = alpha.to(ct)[..., 1:].transpose(-1, -2) @ Hc
    out = beta.to(ct).unsqueeze(-1) * yc.unsqueeze(-2) + mix
    return out.to(H.dtype)


def hc_post_bwd(dH_new, H, y, alpha, beta):
    """Hand-derived backward of `hc_post`.

    dH_new: (..., n, d); the rest as in `hc_post`.
    Returns dH: (..., n, d) in H.dtype; dy: (..., d) in y.dtype; dalpha: alpha's shape
    with dalpha[..., 0] = 0; dbeta: beta's shape (static ones summed over tokens).
    """
    validate_hc_post(H, y, alpha, beta)
    check_tensor("dH_new", dH_new)
    check_shape("dH_new", dH_new, tuple(H.shape), "(the shape of H)")
    check_same_device(H=H, dH_new=dH_new)
    ct = compute_dtype(dH_new, H, y, alpha, beta)
    g, Hc, yc = dH_new.to(ct), H.to(ct), y.to(ct)
    a, b = alpha.to(ct), beta.to(ct)
    dy = (b.unsqueeze(-1) * g).sum(-2)
    dH = a[..., 1:] @ g
    dmix = torch.einsum("...id,...kd->...ik", Hc, g)
    dalpha = torch.cat([torch.zeros_like(dmix[..., :1]), dmix], dim=-1)
    dbeta = torch.einsum("...kd,...d->...k", g, yc)
    return dH.to(H.dtype), dy.to(y.dtype), sum_to(dalpha, alpha.shape), sum_to(dbeta, beta.shape)


# ------------------------------------------------------------------------ hc_boundary


def check_boundary_grads(H, dH_next, dx_next) -> None:
    """The gradients a boundary's backward takes of H' and x', each optional (None =
    zero): dH_next (..., n, d) like H, dx_next (..., d); on H's device. (Broadcasting
    would otherwise accept a wrong shape silently.)"""
    lead, d = H.shape[:-2], H.shape[-1]
    if dH_next is not None:
        check_tensor("dH_next", dH_next)
        check_shape("dH_next", dH_next, tuple(H.shape), "(the shape of H' = the shape of H)")
    if dx_next is not None:
        check_tensor("dx_next", dx_next)
        check_shape("dx_next", dx_next, tuple(lead) + (d,), "(..., d) for H of shape (..., n, d)")
    check_same_device(**tensors_only(H=H, dH_next=dH_next, dx_next=dx_next))


def hc_boundary(H, y, alpha, beta, A, B, W=None, s_a=None, s_b=None, eps: float = 1e-6):
    """Connection i's post fused with connection i+1's pre, at the boundary of two
    sublayers: H' = hc_post(H, y, alpha, beta), then x', alpha', beta' = hc_pre(H', A, B,
    W, s_a, s_b, eps).

    H: (..., n, d); y: (..., d); alpha: (..., n, n+1) or (n, n+1); beta: (..., n) or (n,);
    A: (n, n+1); B: (n,); W: (d, n+2) or None (SHC); s_a, s_b: 0-dim tensors or floats
    (DHC only).
    Returns H': (..., n, d) in H.dtype; x': (..., d) in H.dtype; alpha', beta' as
    `hc_pre`'s ((..., n, n+1), (..., n) for DHC; copies of A, B for SHC; arithmetic dtype).
    """
    validate_hc_boundary(H, y, alpha, beta, A, B, W, s_a, s_b, eps)
    H_next = hc_post(H, y, alpha, beta)
    x, alpha_next, beta_next = hc_pre(H_next, A, B, W, s_a, s_b, eps)
    return H_next, x, alpha_next, beta_next


def hc_boundary_bwd(dH_next, dx_next, dalpha_next, dbeta_next, H, y, alpha, beta, A, B, W=None, s_a=None,
                    s_b=None, eps: float = 1e-6):
    """Hand-derived backward of `hc_boundary`: the total gradient of H' is dH_next (from
    its later readers) plus hc_pre's dH term, summed in the arithmetic dtype (the
    kernels round the sum once, never store it), then hc_post's backward from it.

    dH_next: (..., n, d) or None (zero); dx_next: (..., d) or None (zero); dalpha_next,
    dbeta_next: the shapes of alpha' and beta', or None; the rest as in `hc_boundary`.
    Returns dH (H.dtype), dy (y.dtype), dalpha, dbeta (the coefficients' shapes, summed
    over tokens when static), dA, dB, dW, ds_a, ds_b (summed over tokens; the last three
    None for SHC).
    """
    validate_hc_boundary(H, y, alpha, beta, A, B, W, s_a, s_b, eps)
    check_boundary_grads(H, dH_next, dx_next)
    ct = compute_dtype(H, y, alpha, beta, A, B, W, *tensors_only(s_a=s_a, s_b=s_b).values())
    H_next = hc_post(H, y, alpha, beta)
    lead, d = H.shape[:-2], H.shape[-1]
    if dx_next is None:
        dx_next = H.new_zeros(*lead, d)
    # H' in the arithmetic dtype (exact: the stored values widened) so that hc_pre's dH
    # term comes back unrounded.
    dH_pre, dA, dB, dW, ds_a, ds_b = hc_pre_bwd(dx_next, dalpha_next, dbeta_next, H_next.to(ct), A, B, W,
                                                s_a, s_b, eps)
    g = dH_pre if dH_next is None else dH_pre + dH_next.to(ct)
    dH, dy, dalpha, dbeta = hc_post_bwd(g, H, y, alpha, beta)
    return dH, dy, dalpha, dbeta, dA, dB, dW, ds_a, ds_b


# ------------------------------------------------------------------------- stream_mix


def stream_mix(H, w):
    """Weighted sum of the streams: x = Σ_i w[..., i]·H_i.

    H: (..., n, d); w: (..., n) or (n,). Returns x: (..., d) in H.dtype.
    """
    validate_stream_mix(H, w)
    ct = compute_dtype(H, w)
    x = (w.to(ct).unsqueeze(-1) * H.to(ct)).sum(-2)
    return x.to(H.dtype)


def stream_mix_bwd(dx, H, w):
    """Hand-derived backward of `stream_mix`.

    dx: (..., d); H: (..., n, d); w: (..., n) or (n,).
    Returns dH = w_i·dx: (..., n, d) in H.dtype; dw_i = <dx, H_i>: w's shape
    (summed over tokens when w is static).
    """
    validate_stream_mix(H, w)
    check_tensor("dx", dx)
    check_shape("dx", dx, tuple(H.shape[:-2]) + (H.shape[-1],),
                "(..., d) for H of shape (..., n, d)")
    check_same_device(H=H, dx=dx)
    ct = compute_dtype(dx, H, w)
    g, Hc, wc = dx.to(ct), H.to(ct), w.to(ct)
    dH = wc.unsqueeze(-1) * g.unsqueeze(-2)
    dw = torch.einsum("...d,...id->...i", g, Hc)
    return dH.to(H.dtype), sum_to(dw, w.shape)


# --------------------------------------------------------------- init, entry and exit


def hc_init_static(n: int, layer_index: int, dtype: torch.dtype = torch.float32,
                   device: Optional[torch.device] = None):
    """The paper's initialisation (HC §2.3), which makes HC a pre-norm residual.

    Returns A: (n, n+1) with A[:, 0] one-hot at layer_index mod n and A[:, 1:] = I;
    B: (n,) ones. (For DHC also set W = 0 and s_a = s_b = 0.01.)
    """
    check_index("hc_init_static", "n", n, 1, MAX_STREAMS)
    check_index("hc_init_static", "layer_index", layer_index, 0)
    A = torch.zeros(n, n + 1, dtype=dtype, device=device)
    A[layer_index % n, 0] = 1
    A[:, 1:] = torch.eye(n, dtype=dtype, device=device)
    B = torch.ones(n, dtype=dtype, device=device)
    return A, B


def expand_streams(x, n: int):
    """Entry: the hidden state repeated into n streams. x: (..., d) -> (..., n, d);
    n: an int in 1..16 (a float such as 2.0 is refused)."""
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x must have shape (..., d), got {tuple(x.shape)}")
    check_index("expand_streams", "n", n, 1, MAX_STREAMS)
    return x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1]).clone(
        memory_format=torch.contiguous_format)


def reduce_streams(H):
    """Exit: the sum of the streams. H: (..., n, d) -> (..., d) in H.dtype."""
    check_streams("H", H)
    return H.to(compute_dtype(H)).sum(-2).to(H.dtype)
