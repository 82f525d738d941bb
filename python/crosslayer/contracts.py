"""The contract of every op, in one place: its argument validator, its shape limits and
its traffic floor (DESIGN.md). Data flows one way through it:

    crosslayer.ops.<op>  ->  crosslayer.contracts (validate)  ->  _C kernels, or crosslayer.ref
    crosslayer.ref.<op>  ->  crosslayer.contracts (validate)  ->  plain PyTorch

The tests' op registry (tests/op_specs.py), bench/*.py and bench/traffic.py read the
floors from CONTRACTS; csrc/common/limits.h holds the same limits for the kernels
(exported as _C.MAX_STREAMS / _C.MAX_SLOTS, checked against these by tests/test_build.py).

Every validator message names the argument, what was expected and what was received.
Validators look at shapes, dtypes and devices only: they never synchronise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from crosslayer._checks import check_same_device, check_shape, check_tensor

MAX_STREAMS = 16  # n of the HC ops; csrc/common/limits.h kMaxStreams (_C.MAX_STREAMS)
MAX_SLOTS = 128  # l of the depth ops; csrc/common/limits.h kMaxSlots (_C.MAX_SLOTS)
QKV_NORM_WAYS = 4  # q, k, v (normed) and r (raw)
GELU_APPROXIMATIONS = ("none", "tanh")


# ------------------------------------------------------------- argument checks


def check_streams(name: str, H) -> None:
    """`H` is a float tensor (..., n, d) with 1 <= n <= 16 streams."""
    check_tensor(name, H)
    if H.dim() < 2:
        raise ValueError(
            f"{name} must have shape (..., n, d) with at least 2 dims, got {tuple(H.shape)}"
        )
    n = H.shape[-2]
    if not 1 <= n <= MAX_STREAMS:
        raise ValueError(
            f"{name} must have 1 to {MAX_STREAMS} streams (dim -2 of (..., n, d)), "
            f"got n = {n} (shape {tuple(H.shape)})"
        )


def check_scalar(name: str, v) -> None:
    """`v` is a python float/int or a 0-dim float tensor."""
    if isinstance(v, bool):
        raise TypeError(f"{name} must be a float or a 0-dim float tensor, got bool")
    if isinstance(v, (int, float)):
        return
    if not isinstance(v, torch.Tensor):
        raise TypeError(
            f"{name} must be a float or a 0-dim float tensor, got {type(v).__name__}"
        )
    check_tensor(name, v)
    if v.dim() != 0:
        raise ValueError(f"{name} must be a 0-dim tensor, got shape {tuple(v.shape)}")


def check_coeff(name: str, t, static_shape: tuple, lead: tuple) -> None:
    """`t` has the static shape or the per-token shape lead + static_shape."""
    check_tensor(name, t)
    if tuple(t.shape) != tuple(static_shape):
        check_shape(name, t, tuple(lead) + tuple(static_shape),
                    f"(per token) or {tuple(static_shape)} (static)")


def check_coeff_grads(dalpha, dbeta, lead: tuple, n: int) -> None:
    """The gradients of per-token HC coefficients, each optional (None = zero):
    dalpha (*lead, n, n+1) like alpha, dbeta (*lead, n) like beta."""
    if dalpha is not None:
        check_tensor("dalpha", dalpha)
        check_shape("dalpha", dalpha, tuple(lead) + (n, n + 1), "(the shape of alpha)")
    if dbeta is not None:
        check_tensor("dbeta", dbeta)
        check_shape("dbeta", dbeta, tuple(lead) + (n,), "(the shape of beta)")


def tensors_only(**kw) -> dict:
    """The keyword arguments that are tensors (python scalars and None dropped)."""
    return {k: v for k, v in kw.items() if isinstance(v, torch.Tensor)}


def check_iters(iters) -> None:
    """`iters` is a python int >= 1."""
    if isinstance(iters, bool) or not isinstance(iters, int):
        raise TypeError(f"iters must be an int, got {type(iters).__name__}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")


def check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_approximate(approximate) -> None:
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")


# ------------------------------------------------------------------- HC family


def validate_hc_pre(H, A, B, W=None, s_a=None, s_b=None) -> None:
    """Checks for `hc_pre` / `hc_pre_bwd`.

    H: (..., n, d), 1 <= n <= 16; A: (n, n+1); B: (n,); W: (d, n+2) or None;
    s_a, s_b: 0-dim tensors or floats, required when W is given.
    """
    check_streams("H", H)
    n, d = H.shape[-2], H.shape[-1]
    check_tensor("A", A)
    check_shape("A", A, (n, n + 1), "(n, n+1) for H with n streams")
    check_tensor("B", B)
    check_shape("B", B, (n,), "(n,) for H with n streams")
    if W is not None:
        check_tensor("W", W)
        check_shape("W", W, (d, n + 2), "(d, n+2) for H of shape (..., n, d)")
        if s_a is None:
            raise ValueError("s_a is required when W is given (dynamic HC)")
        if s_b is None:
            raise ValueError("s_b is required when W is given (dynamic HC)")
        check_scalar("s_a", s_a)
        check_scalar("s_b", s_b)
    check_same_device(**tensors_only(H=H, A=A, B=B, W=W, s_a=s_a, s_b=s_b))


def validate_hc_post(H, y, alpha, beta) -> None:
    """Checks for `hc_post` / `hc_post_bwd`.

    H: (..., n, d), 1 <= n <= 16; y: (..., d); alpha: (n, n+1) or (..., n, n+1);
    beta: (n,) or (..., n).
    """
    check_streams("H", H)
    lead, n, d = H.shape[:-2], H.shape[-2], H.shape[-1]
    check_tensor("y", y)
    check_shape("y", y, tuple(lead) + (d,), "(..., d) for H of shape (..., n, d)")
    check_coeff("alpha", alpha, (n, n + 1), lead)
    check_coeff("beta", beta, (n,), lead)
    check_same_device(H=H, y=y, alpha=alpha, beta=beta)


def validate_hc_boundary(H, y, alpha, beta, A, B, W=None, s_a=None, s_b=None) -> None:
    """Checks for `hc_boundary` / `hc_boundary_bwd`: connection i's post (H, y, alpha,
    beta as for `hc_post`) and connection i+1's pre (A, B, W, s_a, s_b as for `hc_pre`;
    W None: static)."""
    validate_hc_post(H, y, alpha, beta)
    validate_hc_pre(H, A, B, W, s_a, s_b)


def validate_mhc_boundary(H, y, alpha, beta, phi, a_pre, a_post, a_res, b, iters: Optional[int] = None) -> None:
    """Checks for `mhc_boundary` / `mhc_boundary_bwd`: connection i's post (H, y, alpha,
    beta as for `hc_post`) and mHC connection i+1's pre (phi, a_*, b, iters as for
    `mhc_coeffs`)."""
    validate_hc_post(H, y, alpha, beta)
    validate_mhc_coeffs(H, phi, a_pre, a_post, a_res, b, iters)


def validate_stream_mix(H, w) -> None:
    """Checks for `stream_mix` / `stream_mix_bwd`. H: (..., n, d); w: (n,) or (..., n)."""
    check_streams("H", H)
    check_coeff("w", w, (H.shape[-2],), H.shape[:-2])
    check_same_device(H=H, w=w)


def validate_sinkhorn(logits, iters: int = 20) -> None:
    """Checks for `sinkhorn` / `sinkhorn_bwd`. logits: (..., n, n), 1 <= n <= 16; iters >= 1."""
    check_tensor("logits", logits)
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"logits must have shape (..., n, n), got {tuple(logits.shape)}")
    n = logits.shape[-1]
    if not 1 <= n <= MAX_STREAMS:
        raise ValueError(
            f"logits must be n x n with 1 <= n <= {MAX_STREAMS}, got n = {n} "
            f"(shape {tuple(logits.shape)})"
        )
    check_iters(iters)


def validate_mhc_coeffs(H, phi, a_pre, a_post, a_res, b, iters: Optional[int] = None) -> None:
    """Checks for `mhc_coeffs` / `mhc_coeffs_bwd`.

    H: (..., n, d), 1 <= n <= 16; phi: (n·d, n²+2n); a_pre, a_post, a_res: 0-dim
    tensors or floats; b: (n²+2n,); iters (when given): int >= 1.
    """
    check_streams("H", H)
    n, d = H.shape[-2], H.shape[-1]
    m = n * n + 2 * n
    check_tensor("phi", phi)
    check_shape("phi", phi, (n * d, m), "(n·d, n²+2n) for H of shape (..., n, d)")
    check_scalar("a_pre", a_pre)
    check_scalar("a_post", a_post)
    check_scalar("a_res", a_res)
    check_tensor("b", b)
    check_shape("b", b, (m,), "(n²+2n,) for H with n streams")
    if iters is not None:
        check_iters(iters)
    check_same_device(**tensors_only(H=H, phi=phi, a_pre=a_pre, a_post=a_post,
                                     a_res=a_res, b=b))


# ----------------------------------------------------------------- MUDD family


def validate_depth_aggregate(S: torch.Tensor, A: torch.Tensor) -> None:
    """Check the arguments of `depth_aggregate` (shared by the oracle and the fused op).

    S: (l, *tok, d) float tensor with at least one token dim (S.dim() >= 3) and
       1 <= l <= 128 slots; any strides.
    A: (*tok, C, l) per token (A.dim() == S.dim(), token dims equal to S's) or
       (C, l) static; C >= 1; float; on S's device.
    Raises TypeError / ValueError naming the argument, the expected and the actual
    shape, dtype or device. Looks at metadata only (no device sync).
    """
    check_tensor("S", S)
    check_tensor("A", A)
    if S.dim() < 3:
        raise ValueError(
            f"S must have shape (l, *tok, d) with at least one token dim (>= 3 dims), "
            f"got {S.dim()} dims (shape {tuple(S.shape)})"
        )
    l = S.shape[0]
    if not 1 <= l <= MAX_SLOTS:
        raise ValueError(
            f"S must have 1 to {MAX_SLOTS} depth slots (dim 0), got {l} (shape {tuple(S.shape)})"
        )
    if A.dim() == 2:
        check_shape("A", A, (None, l), f"(static (C, l), l = S.shape[0] = {l})")
    elif A.dim() == S.dim():
        tok = tuple(S.shape[1:-1])
        check_shape("A", A, (*tok, None, l), f"(per token (*tok, C, l), tok = S.shape[1:-1] = {tok}, l = {l})")
    else:
        raise ValueError(
            f"A must have 2 dims (static (C, l)) or {S.dim()} dims (per token (*tok, C, l) "
            f"for S of shape {tuple(S.shape)}), got shape {tuple(A.shape)}"
        )
    if A.shape[-2] < 1:
        raise ValueError(f"A must have C >= 1 ways (dim -2), got shape {tuple(A.shape)}")
    check_same_device(S=S, A=A)


def validate_depth_aggregate_qkv_norm(S: torch.Tensor, A: torch.Tensor, norm_weights: torch.Tensor) -> None:
    """Check the arguments of `depth_aggregate_qkv_norm` (shared by the oracle and the
    fused op): those of `validate_depth_aggregate` with C = 4 ways (q, k, v, r), and
    norm_weights: (3, d) float on S's device. Looks at metadata only (no device sync).
    """
    validate_depth_aggregate(S, A)
    if A.shape[-2] != QKV_NORM_WAYS:
        raise ValueError(
            f"A must have C = {QKV_NORM_WAYS} ways (q, k, v, r) along dim -2, got shape {tuple(A.shape)}"
        )
    check_tensor("norm_weights", norm_weights)
    d = S.shape[-1]
    check_shape("norm_weights", norm_weights, (QKV_NORM_WAYS - 1, d), f"(3, d) with d = S.shape[-1] = {d}")
    check_same_device(S=S, norm_weights=norm_weights)


def validate_mudd_weights(
    x: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor, bias: torch.Tensor, n_ways: int
) -> None:
    """Check the arguments of `mudd_weights` (shared by the oracle and the fused op).

    x: (*tok, d) with at least one token dim (x.dim() >= 2); W1: (d, K);
    W2: (K, C*l) with C = n_ways >= 1 and 1 <= l <= 128; bias: (C*l,) or (C, l).
    All float, on one device. Looks at metadata only (no device sync).
    """
    check_int("n_ways", n_ways, 1)
    check_tensor("x", x)
    check_tensor("W1", W1, ndim=2)
    check_tensor("W2", W2, ndim=2)
    check_tensor("bias", bias, ndim=(1, 2))
    if x.dim() < 2:
        raise ValueError(
            f"x must have shape (*tok, d) with at least one token dim (>= 2 dims), "
            f"got {x.dim()} dims (shape {tuple(x.shape)})"
        )
    d = x.shape[-1]
    check_shape("W1", W1, (d, None), f"(d, K) with d = x.shape[-1] = {d}")
    K = W1.shape[1]
    check_shape("W2", W2, (K, None), f"(K, C*l) with K = W1.shape[1] = {K}")
    Cl = W2.shape[1]
    if Cl % n_ways != 0 or not 1 <= Cl // n_ways <= MAX_SLOTS:
        raise ValueError(
            f"W2 must have shape (K, C*l) with C = n_ways = {n_ways} and 1 <= l <= {MAX_SLOTS}, "
            f"got {tuple(W2.shape)}"
        )
    l = Cl // n_ways
    if bias.dim() == 1:
        check_shape("bias", bias, (Cl,), f"(C*l,) with C = {n_ways}, l = {l}")
    else:
        check_shape("bias", bias, (n_ways, l), f"(C, l) with C = {n_ways}, l = {l}")
    check_same_device(x=x, W1=W1, W2=W2, bias=bias)


# ------------------------------------------------------------------------ traffic floors


@dataclass(frozen=True)
class Floor:
    """Activation-dtype elements an op must move per token (DESIGN.md "Traffic floors"):
    nd·n·d + dd·d + ld·l·d + cd·C·d (coefficients, weights and their gradients are
    negligible and left out)."""

    nd: int = 0
    dd: int = 0
    ld: int = 0
    cd: int = 0

    def elements(self, *, d: int, n: int = 0, l: int = 0, C: int = 0) -> int:
        return (self.nd * n + self.dd + self.ld * l + self.cd * C) * d

    def __add__(self, other: "Floor") -> "Floor":
        return Floor(self.nd + other.nd, self.dd + other.dd, self.ld + other.ld, self.cd + other.cd)


MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Contract:
    """One op's contract. `validate` checks the public op's arguments (the oracle's and
    the fused op's); `fwd` / `bwd` are its traffic floors (bwd for fresh gradient outputs;
    `bwd_accumulate` where the backward adds into an existing gradient in place)."""

    name: str
    validate: Optional[Callable[..., None]]
    fwd: Floor
    bwd: Floor
    bwd_accumulate: Optional[Floor] = None

    def floor(self, mode: str, accumulate: bool = False) -> Floor:
        """The floor of `mode` ("fwd" or "fwd+bwd")."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "fwd":
            return self.fwd
        bwd = self.bwd_accumulate if accumulate and self.bwd_accumulate is not None else self.bwd
        return self.fwd + bwd

    def floor_elements(self, mode: str, *, d: int, n: int = 0, l: int = 0, C: int = 0,
                       accumulate: bool = False) -> int:
        return self.floor(mode, accumulate).elements(d=d, n=n, l=l, C=C)


CONTRACTS: Dict[str, Contract] = {c.name: c for c in (
    Contract("hc_pre", validate_hc_pre, fwd=Floor(nd=1, dd=1), bwd=Floor(nd=2, dd=1)),
    Contract("hc_post", validate_hc_post, fwd=Floor(nd=2, dd=1), bwd=Floor(nd=3, dd=2)),
    Contract("stream_mix", validate_stream_mix, fwd=Floor(nd=1, dd=1), bwd=Floor(nd=2, dd=1)),
    Contract("mhc_coeffs", validate_mhc_coeffs, fwd=Floor(nd=1), bwd=Floor(nd=2)),
    Contract("depth_aggregate", validate_depth_aggregate, fwd=Floor(ld=1, cd=1),
             bwd=Floor(ld=2, cd=1), bwd_accumulate=Floor(ld=3, cd=1)),
    Contract("depth_aggregate_qkv_norm", validate_depth_aggregate_qkv_norm, fwd=Floor(ld=1, cd=1),
             bwd=Floor(ld=2, cd=1), bwd_accumulate=Floor(ld=3, cd=1)),
    Contract("mudd_weights", validate_mudd_weights, fwd=Floor(dd=1), bwd=Floor(dd=2)),
    # Connection i's post fused with connection i+1's pre: reads H, y, writes H', x'
    # (backward: reads dH', dx', H, y, writes dH, dy); H' is never read back.
    Contract("hc_boundary", validate_hc_boundary, fwd=Floor(nd=2, dd=2), bwd=Floor(nd=3, dd=3)),
    Contract("mhc_boundary", validate_mhc_boundary, fwd=Floor(nd=2, dd=2), bwd=Floor(nd=3, dd=3)),
    # A composition the benches time (no op of its own): pre + identity branch + post
    # with dH accumulated in one tensor.
    Contract("hc_sublayer", None, fwd=Floor(nd=3, dd=2), bwd=Floor(nd=6, dd=3)),
)}

