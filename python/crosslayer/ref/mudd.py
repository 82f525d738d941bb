"""Oracle for the MUDD / DenseFormer family: depth aggregation and MUDD weights.

Depth stack. ``S: (l, *tok, d)`` holds l depth slots; in a model it is a view of one
preallocated ``(L+1, N, d)`` buffer where slot 0 is the embedding and slot j the
output of block j-1. Slot (dim 0) and token strides are arbitrary; the oracle also
accepts any feature stride, the fused kernels want features contiguous.

depth_aggregate (C ways, l slots; A per token ``(*tok, C, l)`` or static ``(C, l)``)::

    forward   Y_c     = sum_j A[..., c, j] * S_j                       Y: (C, *tok, d)
    backward  dS_j    = sum_c A[..., c, j] * dY_c                      (shape of S)
              dA[c,j] = <dY_c, S_j>_d        per token; summed over tokens when static

depth_aggregate_qkv_norm (MUDDFormer's block input: C = 4 ways q, k, v, r; the q, k
and v aggregates each through their own pre-attention RMSNorm, weight g_c: (3, d))::

    forward   Y_c  = sum_j A[..., c, j] * S_j                          (c < 4)
              r_c  = rsqrt(mean_d(Y_c^2) + eps)                        (c < 3)
              Out_c = Y_c * r_c * g_c   (c < 3);   Out_3 = Y_3         Out: (4, *tok, d)
    backward  Yh_c = Y_c * r_c
              dY_c = r_c * (g_c*dOut_c - Yh_c * mean_d(g_c*dOut_c*Yh_c))   (c < 3)
              dY_3 = dOut_3
              dg_c = sum_tok dOut_c * Yh_c
              then dS, dA from depth_aggregate_bwd(dY, S, A)

DenseFormer DWA is depth_aggregate with static weights, C = 1, and the slots picked
by `dwa_slots` (dilation k, period p); `dwa_init_weights` starts at the identity.

mudd_weights (x: (*tok, d), W1: (d, K), W2: (K, C*l), bias: (C*l,) or (C, l))::

    r  = rsqrt(mean_d(x^2) + eps)            (*tok, 1)   rms norm, no weight
    xn = x * r                               (*tok, d)
    u  = xn @ W1                             (*tok, K)   (= (x @ W1) * r)
    h  = GELU(u)                             (*tok, K)
    A  = h @ W2 + bias                       (*tok, C*l) -> (*tok, C, l), index c*l + j

    backward, with dA flattened to (*tok, C*l):
    dbias = sum_tok dA                       dW2 = sum_tok h^T dA
    du    = (dA @ W2^T) * GELU'(u)           dW1 = sum_tok xn^T du
    dxn   = du @ W1^T
    dx    = r * (dxn - xn * mean_d(dxn * xn))

    GELU'(u), exact:  Phi(u) + u * phi(u),  Phi(u) = (1 + erf(u / sqrt 2)) / 2,
                      phi(u) = exp(-u^2 / 2) / sqrt(2 pi)
    GELU'(u), tanh:   t = tanh(c0 * (u + c1 u^3)),  c0 = sqrt(2 / pi), c1 = 0.044715
                      (1 + t) / 2 + u (1 - t^2) c0 (1 + 3 c1 u^2) / 2

Dtypes. Arithmetic runs in `compute_dtype` of all inputs (float64 if any is float64,
else float32); coefficient and weight inputs of any float dtype are cast to it.
Activations (Y, dS, dx) come back in the activation dtype (S's, x's); coefficients
and weight gradients (A, dA, dW1, dW2, dbias) in the arithmetic dtype.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from crosslayer._checks import check_same_device, check_shape, check_tensor, compute_dtype
from crosslayer.contracts import (
    MAX_SLOTS,
    QKV_NORM_WAYS,
    check_approximate,
    check_int,
    validate_depth_aggregate,
    validate_depth_aggregate_qkv_norm,
    validate_mudd_weights,
)


__all__ = [
    "MAX_SLOTS",
    "depth_aggregate",
    "depth_aggregate_bwd",
    "validate_depth_aggregate",
    "depth_aggregate_qkv_norm",
    "depth_aggregate_qkv_norm_bwd",
    "qkv_norm",
    "qkv_norm_bwd",
    "qkv_norm_bwd_y",
    "validate_depth_aggregate_qkv_norm",
    "QKV_NORM_WAYS",
    "dwa_slots",
    "dwa_init_weights",
    "mudd_weights",
    "mudd_weights_bwd",
    "mudd_init_weights",
    "validate_mudd_weights",
]


# ---------------------------------------------------------------------------
# depth_aggregate
# ---------------------------------------------------------------------------


def depth_aggregate(S: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Weighted sums of depth slots: Y_c = sum_j A[..., c, j] * S_j.

    S: (l, *tok, d)               depth slots, any strides (e.g. full[:l], full[1::2])
    A: (*tok, C, l) or (C, l)     per-token or static weights, any float dtype
    returns Y: (C, *tok, d)       dtype of S
    """
    validate_depth_aggregate(S, A)
    cd = compute_dtype(S, A)
    Sf, Af = S.to(cd), A.to(cd)
    if A.dim() == 2:
        Y = torch.einsum("j...d,cj->c...d", Sf, Af)
    else:
        Y = torch.einsum("j...d,...cj->c...d", Sf, Af)
    return Y.to(S.dtype)


def depth_aggregate_bwd(
    dY: torch.Tensor, S: torch.Tensor, A: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Backward of `depth_aggregate`.

    dY: (C, *tok, d)              gradient of Y, any float dtype
    S:  (l, *tok, d)              as in the forward
    A:  (*tok, C, l) or (C, l)    as in the forward
    returns
      dS: (l, *tok, d)            dS_j = sum_c A[..., c, j] * dY_c, dtype of S
      dA: shape of A              dA[..., c, j] = <dY_c, S_j>_d (summed over tokens
                                  when A is static), arithmetic dtype
    """
    validate_depth_aggregate(S, A)
    check_tensor("dY", dY)
    C = A.shape[-2]
    check_shape("dY", dY, (C, *S.shape[1:]), "(C, *tok, d) like the forward output Y")
    check_same_device(S=S, dY=dY)
    cd = compute_dtype(dY, S, A)
    dYf, Sf, Af = dY.to(cd), S.to(cd), A.to(cd)
    if A.dim() == 2:
        dS = torch.einsum("c...d,cj->j...d", dYf, Af)
        dA = torch.einsum("c...d,j...d->cj", dYf, Sf)
    else:
        dS = torch.einsum("c...d,...cj->j...d", dYf, Af)
        dA = torch.einsum("c...d,j...d->...cj", dYf, Sf)
    return dS.to(S.dtype), dA


# ---------------------------------------------------------------------------
# depth_aggregate_qkv_norm
# ---------------------------------------------------------------------------


def _qkv_aggregate(S, A, cd):
    """Y (4, *tok, d) = the depth aggregate in the arithmetic dtype."""
    Sf, Af = S.to(cd), A.to(cd)
    if A.dim() == 2:
        return torch.einsum("j...d,cj->c...d", Sf, Af)
    return torch.einsum("j...d,...cj->c...d", Sf, Af)


def _expand_weights(norm_weights: torch.Tensor, ndim: int, cd) -> torch.Tensor:
    """(3, d) -> (3, 1, ..., 1, d) broadcasting against (3, *tok, d)."""
    g = norm_weights.to(cd)
    return g.reshape(g.shape[0], *([1] * (ndim - 2)), g.shape[1])


def depth_aggregate_qkv_norm(
    S: torch.Tensor, A: torch.Tensor, norm_weights: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """MUDD block input: 4-way depth aggregate with q, k, v each RMS-normalised.

    S: (l, *tok, d)               depth slots, any strides
    A: (*tok, 4, l) or (4, l)     per-token or static weights, ways (q, k, v, r)
    norm_weights: (3, d)          RMSNorm weights g_q, g_k, g_v
    eps: RMSNorm epsilon
    returns Out: (4, *tok, d)     dtype of S; Out_c = rms_norm(Y_c) * g_c for c < 3,
                                  Out_3 = Y_3 (the residual way, not normalised)
    """
    validate_depth_aggregate_qkv_norm(S, A, norm_weights, eps)
    cd = compute_dtype(S, A, norm_weights)
    Y = _qkv_aggregate(S, A, cd)
    return qkv_norm(Y, norm_weights, eps).to(S.dtype)


def qkv_norm(Y: torch.Tensor, norm_weights: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The norm half of `depth_aggregate_qkv_norm`, on the raw aggregate Y (4, *tok, d) in
    the arithmetic dtype: (4, *tok, d) in Y's dtype, rms_norm(Y_c)·g_c for c < 3, Y_3."""
    r = torch.rsqrt(Y[:3].square().mean(-1, keepdim=True) + eps)
    g = _expand_weights(norm_weights, Y.dim(), Y.dtype)
    return torch.cat([Y[:3] * r * g, Y[3:]], 0)


def depth_aggregate_qkv_norm_bwd(
    dOut: torch.Tensor, S: torch.Tensor, A: torch.Tensor, norm_weights: torch.Tensor, eps: float = 1e-6
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of `depth_aggregate_qkv_norm` (formulas in the module docstring).

    dOut: (4, *tok, d)            gradient of Out, any float dtype
    S, A, norm_weights, eps: as in the forward (Y is recomputed from S)
    returns
      dS: (l, *tok, d)            dtype of S
      dA: shape of A              arithmetic dtype (summed over tokens when static)
      dg: (3, d)                  arithmetic dtype, summed over tokens
    """
    dY, dg = qkv_norm_bwd(dOut, S, A, norm_weights, eps)
    cd = dY.dtype
    dS, dA = depth_aggregate_bwd(dY, S.to(cd), A.to(cd))
    return dS.to(S.dtype), dA, dg


def qkv_norm_bwd(
    dOut: torch.Tensor, S: torch.Tensor, A: torch.Tensor, norm_weights: torch.Tensor, eps: float = 1e-6
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The norm half of `depth_aggregate_qkv_norm_bwd`: the gradient of the raw
    aggregate Y, before it goes through `depth_aggregate_bwd`.

    Same arguments; Y (4, *tok, d) is recomputed from S and A.
    returns
      dY: (4, *tok, d)            arithmetic dtype (dY_3 = dOut_3)
      dg: (3, d)                  arithmetic dtype, summed over tokens
    """
    validate_depth_aggregate_qkv_norm(S, A, norm_weights, eps)
    check_tensor("dOut", dOut)
    check_shape("dOut", dOut, (QKV_NORM_WAYS, *S.shape[1:]), "(4, *tok, d) like the forward output")
    check_same_device(S=S, dOut=dOut)
    cd = compute_dtype(dOut, S, A, norm_weights)
    Y = _qkv_aggregate(S, A, cd)
    return qkv_norm_bwd_y(dOut, Y, norm_weights, eps)


def qkv_norm_bwd_y(
    dOut: torch.Tensor, Y: torch.Tensor, norm_weights: torch.Tensor, eps: float = 1e-6
) -> Tuple[torch.Tensor, torch.Tensor]:
    """`qkv_norm_bwd` given the raw aggregate Y (4, *tok, d) in the arithmetic dtype
    (the caller computed it): returns (dY, dg) in Y's dtype."""
    cd = Y.dtype
    r = torch.rsqrt(Y[:3].square().mean(-1, keepdim=True) + eps)
    g = _expand_weights(norm_weights, Y.dim(), cd)
    dO = dOut.to(cd)
    Yh = Y[:3] * r
    dYh = g * dO[:3]
    dY_n = r * (dYh - Yh * (dYh * Yh).mean(-1, keepdim=True))
    dY = torch.cat([dY_n, dO[3:]], 0)
    tok_dims = tuple(range(1, Y.dim() - 1))
    dg = (dO[:3] * Yh).sum(tok_dims)
    return dY, dg


# ---------------------------------------------------------------------------
# DenseFormer slot selection and init
# ---------------------------------------------------------------------------


def dwa_slots(block_index: int, dilation: int = 1, period: int = 1) -> Optional[slice]:
    """Depth slots DenseFormer's DWA after block `block_index` averages, or None.

    Slot convention: slot 0 = embedding, slot j = output of block j-1, so after
    block i (0-based) slots 0..i+1 are filled. Returns None when there is no DWA
    after block i ((i+1) % period != 0); otherwise the slots j <= i+1 with
    j = i+1 (mod dilation), as slice((i+1) % dilation, i+2, dilation). That is
    (i+1+dilation) // dilation slots, oldest first and the newest (i+1) last, the
    layout of epfml/DenseFormer's alphas[i]. S_full[dwa_slots(i, k, p)] is a
    strided view of the (L+1, *tok, d) stack usable directly as S.
    """
    check_int("block_index", block_index, 0)
    check_int("dilation", dilation, 1)
    check_int("period", period, 1)
    if (block_index + 1) % period != 0:
        return None
    return slice((block_index + 1) % dilation, block_index + 2, dilation)


def dwa_init_weights(
    block_index: int, dilation: int = 1, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Identity-start static DWA weights for the slots `dwa_slots(block_index, dilation)`.

    returns (1, l), l = (block_index + 1 + dilation) // dilation: zeros with 1 on the
    newest slot (the last entry), so at init the DWA returns block i's output.
    """
    check_int("block_index", block_index, 0)
    check_int("dilation", dilation, 1)
    l = (block_index + 1 + dilation) // dilation
    w = torch.zeros(1, l, dtype=dtype)
    w[0, -1] = 1
    return w


# ---------------------------------------------------------------------------
# mudd_weights
# ---------------------------------------------------------------------------


def _gelu_grad(u: torch.Tensor, approximate: str) -> torch.Tensor:
    """d GELU(u) / du, exact (erf) or tanh form."""
    if approximate == "tanh":
        c0 = math.sqrt(2.0 / math.pi)
        c1 = 0.044715
        t = torch.tanh(c0 * (u + c1 * u * u * u))
        return 0.5 * (1 + t) + 0.5 * u * (1 - t * t) * c0 * (1 + 3 * c1 * u * u)
    cdf = 0.5 * (1 + torch.erf(u * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * u * u) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + u * pdf


def mudd_weights(
    x: torch.Tensor,
    W1: torch.Tensor,
    W2: torch.Tensor,
    bias: torch.Tensor,
    n_ways: int,
    eps: float = 1e-6,
    approximate: str = "none",
) -> torch.Tensor:
    """MUDD dynamic depth weights A = GELU(rms(x) @ W1) @ W2 + bias, C-major.

    x:    (*tok, d)               block output the weights are computed from
    W1:   (d, K)
    W2:   (K, C*l)                column c*l + j is way c, slot j
    bias: (C*l,) or (C, l)
    n_ways: C; eps: rms epsilon; approximate: "none" (erf GELU) or "tanh"
    returns A: (*tok, C, l)       arithmetic dtype
    """
    validate_mudd_weights(x, W1, W2, bias, n_ways, eps)
    check_approximate(approximate)
    cd = compute_dtype(x, W1, W2, bias)
    xf = x.to(cd)
    r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    u = (xf * r) @ W1.to(cd)
    h = F.gelu(u, approximate=approximate)
    A = h @ W2.to(cd) + bias.to(cd).reshape(-1)
    return A.reshape(*x.shape[:-1], n_ways, W2.shape[1] // n_ways)


def mudd_weights_bwd(
    dA: torch.Tensor,
    x: torch.Tensor,
    W1: torch.Tensor,
    W2: torch.Tensor,
    bias: torch.Tensor,
    n_ways: int,
    eps: float = 1e-6,
    approximate: str = "none",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of `mudd_weights` (formulas in the module docstring).

    dA:   (*tok, C, l)            gradient of A, any float dtype
    x, W1, W2, bias, n_ways, eps, approximate: as in the forward
    returns
      dx:    (*tok, d)            dtype of x
      dW1:   (d, K)               arithmetic dtype
      dW2:   (K, C*l)             arithmetic dtype
      dbias: shape of bias        arithmetic dtype
    """
    validate_mudd_weights(x, W1, W2, bias, n_ways, eps)
    check_approximate(approximate)
    check_tensor("dA", dA)
    Cl = W2.shape[1]
    check_shape("dA", dA, (*x.shape[:-1], n_ways, Cl // n_ways), "(*tok, C, l) like the forward output A")
    check_same_device(x=x, dA=dA)
    cd = compute_dtype(dA, x, W1, W2, bias)
    d = x.shape[-1]
    W1f, W2f = W1.to(cd), W2.to(cd)
    xf = x.to(cd).reshape(-1, d)
    g = dA.to(cd).reshape(-1, Cl)

    r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    xn = xf * r
    u = xn @ W1f
    h = F.gelu(u, approximate=approximate)

    dbias = g.sum(0).reshape(bias.shape)
    dW2 = h.transpose(0, 1) @ g
    du = (g @ W2f.transpose(0, 1)) * _gelu_grad(u, approximate)
    dW1 = xn.transpose(0, 1) @ du
    dxn = du @ W1f.transpose(0, 1)
    dx = r * (dxn - xn * (dxn * xn).mean(-1, keepdim=True))
    return dx.reshape(x.shape).to(x.dtype), dW1, dW2, dbias


def mudd_init_weights(
    d: int,
    l: int,
    n_ways: int,
    hidden: int,
    dtype: torch.dtype = torch.float32,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Identity-start MUDD weight-MLP parameters (MUDDFormer's training init).

    returns
      W1:   (d, hidden)           N(0, 1/d) (fan-in normal)
      W2:   (hidden, C*l)         zeros, so A = bias at init
      bias: (C, l)                zeros with 1 on the newest slot j = l-1 of every way,
                                  so every way of the aggregate equals slot l-1
    """
    check_int("d", d, 1)
    check_int("l", l, 1)
    check_int("n_ways", n_ways, 1)
    check_int("hidden", hidden, 1)
    if l > MAX_SLOTS:
        raise ValueError(f"l must be <= {MAX_SLOTS}, got {l}")
    W1 = (torch.randn(d, hidden, generator=generator, dtype=torch.float32) / math.sqrt(d)).to(dtype)
    W2 = torch.zeros(hidden, n_ways * l, dtype=dtype)
    bias = torch.zeros(n_ways, l, dtype=dtype)
    bias[:, -1] = 1
    return W1, W2, bias
