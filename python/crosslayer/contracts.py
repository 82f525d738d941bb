"""The contract of every op, in one place: its argument validator, its shape limits and
its traffic floor (DESIGN.md). Data flows one way through it:

    crosslayer.ops.<op>  ->  crosslayer.contracts (validate)  ->  _C kernels, or crosslayer.ref
    crosslayer.ref.<op>  ->  crosslayer.contracts (validate)  ->  plain PyTorch

The tests' op registry (tests/op_specs.py), bench/*.py and bench/traffic.py read the
floors from CONTRACTS; csrc/common/limits.h holds the same limits for the kernels
(exported as _C.MAX_STREAMS / _C.MAX_SLOTS, checked against these by tests/test_build.py).

Every validator message names the argument, what was expected and what was received.
Validators look at shapes, dtypes and devices only, and at the values of the scalar
parameters that are Python numbers (eps, sinkhorn_eps, pre_eps, post_mult, iters and the
scales when given as floats): they never synchronise. A scale given as a tensor (a
learnable s_a, a_pre, ...) is checked for its dtype and shape only, never its value.

Domains of the scalar parameters (DESIGN.md's formulas), the same on every backend since
the validators run before the dispatch:
  eps (every rms: hc_pre's DHC, mhc_coeffs, mudd_weights, depth_aggregate_qkv_norm)
      > 0 and finite: r = rsqrt(mean(x²) + eps) must be finite for an all-zero row
  sinkhorn_eps > 0 and finite: it is what keeps every Sinkhorn division away from 0/0
      (softmax entries underflow to 0 in floating point; eps = 0 gives NaN there)
  pre_eps >= 0 and finite (pre = sigmoid(·) + pre_eps is a positive gate)
  post_mult > 0 and finite (post = post_mult·sigmoid(·) in (0, post_mult); inf·0 = NaN)
  iters: an int >= 1
  d (features) >= 1 where an op normalises over them (DHC hc_pre / hc_boundary,
      mhc_coeffs / mhc_boundary): mean over an empty feature dim is 0/0. Elsewhere
      d = 0 is allowed and gives what the math gives (empty outputs; mudd_weights: A =
      bias, since rms(x)·W1 is a sum over no features).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from crosslayer._checks import check_real, check_same_device, check_shape, check_tensor

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


def check_scalar(name: str, v, op: Optional[str] = None) -> None:
    """`v` is a finite python float/int or a 0-dim float tensor. A tensor (a learnable
    scale) is checked for its dtype and shape only: its value lives on the device and
    reading it would synchronise."""
    if isinstance(v, bool):
        raise TypeError(f"{name} must be a float or a 0-dim float tensor, got bool")
    if isinstance(v, (int, float)):
        if not math.isfinite(v):
            where = f"{op}: " if op else ""
            raise ValueError(f"{where}{name} must be a finite float or a 0-dim float tensor, got {v!r}")
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


def check_iters(iters, op: Optional[str] = None) -> None:
    """`iters` is a python int >= 1."""
    where = f"{op}: " if op else ""
    if isinstance(iters, bool) or not isinstance(iters, int):
        raise TypeError(f"{where}iters must be an int, got {type(iters).__name__} ({iters!r}); iters >= 1")
    if iters < 1:
        raise ValueError(f"{where}iters must be >= 1, got {iters}")


def check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_norm_eps(op: str, eps, name: str = "eps") -> None:
    """The epsilon of an rms over the features, r = rsqrt(mean(x²) + eps): > 0 and
    finite, so that r is finite for an all-zero row (zero-initialised or padded tokens)."""
    check_real(op, name, eps, gt=0, why="r = rsqrt(mean(x²) + eps) must be finite for an all-zero row")


def check_sinkhorn_eps(op: str, eps, name: str = "sinkhorn_eps") -> None:
    """Sinkhorn's epsilon: > 0 and finite. P = softmax(L) + eps makes every entry >= eps,
    so every row and column sum + eps is > 0 and no normalisation divides 0 by 0. With
    eps = 0 the math alone would do in exact arithmetic (softmax > 0), but in floating
    point a column of softmax entries underflows to 0 for logits spread by ~100 (fp32),
    and 0/0 is NaN: so 0 is refused, as is a negative eps (P no longer positive, the
    result no longer doubly stochastic)."""
    check_real(op, name, eps, gt=0, why="it keeps every Sinkhorn normalisation away from 0/0")


def check_features(op: str, H, what: str) -> None:
    """H (..., n, d) has d >= 1 features: ops that normalise over them (`what`) are
    undefined for d = 0 (a mean over no features is 0/0). Refused on every backend."""
    if H.shape[-1] < 1:
        raise ValueError(f"{op}: H must have d >= 1 features ({what} is undefined for d = 0: a "
                         f"mean over no features is 0/0), got shape {tuple(H.shape)}")


def check_approximate(approximate) -> None:
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")


# ------------------------------------------------------------------- HC family


def validate_hc_pre(H, A, B, W=None, s_a=None, s_b=None, eps=None, *, op: str = "hc_pre") -> None:
    """Checks for `hc_pre` / `hc_pre_bwd`.

    H: (..., n, d), 1 <= n <= 16, d >= 1 when W is given (DHC's rms is over d);
    A: (n, n+1); B: (n,); W: (d, n+2) or None; s_a, s_b: 0-dim tensors or finite
    floats, required when W is given; eps (when given): a finite float > 0.
    `op` names the public op in the messages of the domain checks.
    """
    check_streams("H", H)
    n, d = H.shape[-2], H.shape[-1]
    if W is not None:
        check_features(op, H, "dynamic HC's r = rsqrt(mean_d H² + eps)")
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
        check_scalar("s_a", s_a, op)
        check_scalar("s_b", s_b, op)
    if eps is not None:
        check_norm_eps(op, eps)
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


def validate_hc_boundary(H, y, alpha, beta, A, B, W=None, s_a=None, s_b=None, eps=None) -> None:
    """Checks for `hc_boundary` / `hc_boundary_bwd`: connection i's post (H, y, alpha,
    beta as for `hc_post`) and connection i+1's pre (A, B, W, s_a, s_b, eps as for
    `hc_pre`; W None: static)."""
    validate_hc_post(H, y, alpha, beta)
    validate_hc_pre(H, A, B, W, s_a, s_b, eps, op="hc_boundary")


def validate_mhc_boundary(H, y, alpha, beta, phi, a_pre, a_post, a_res, b, iters: Optional[int] = None, *,
                          eps=None, pre_eps=None, post_mult=None, sinkhorn_eps=None) -> None:
    """Checks for `mhc_boundary` / `mhc_boundary_bwd`: connection i's post (H, y, alpha,
    beta as for `hc_post`) and mHC connection i+1's pre (phi, a_*, b, iters and the
    floats as for `mhc_coeffs`)."""
    validate_hc_post(H, y, alpha, beta)
    validate_mhc_coeffs(H, phi, a_pre, a_post, a_res, b, iters, eps=eps, pre_eps=pre_eps, post_mult=post_mult,
                        sinkhorn_eps=sinkhorn_eps, op="mhc_boundary")


def validate_stream_mix(H, w) -> None:
    """Checks for `stream_mix` / `stream_mix_bwd`. H: (..., n, d); w: (n,) or (..., n)."""
    check_streams("H", H)
    check_coeff("w", w, (H.shape[-2],), H.shape[:-2])
    check_same_device(H=H, w=w)


def validate_sinkhorn(logits, iters: int = 20, eps=None, *, op: str = "sinkhorn") -> None:
    """Checks for `sinkhorn` / `sinkhorn_bwd`. logits: (..., n, n), 1 <= n <= 16; iters >= 1;
    eps (when given): a finite float > 0 (check_sinkhorn_eps says why not >= 0)."""
    check_tensor("logits", logits)
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"logits must have shape (..., n, n), got {tuple(logits.shape)}")
    n = logits.shape[-1]
    if not 1 <= n <= MAX_STREAMS:
        raise ValueError(
            f"logits must be n x n with 1 <= n <= {MAX_STREAMS}, got n = {n} "
            f"(shape {tuple(logits.shape)})"
        )
    check_iters(iters, op)
    if eps is not None:
        check_sinkhorn_eps(op, eps, "eps")


def validate_mhc_coeffs(H, phi, a_pre, a_post, a_res, b, iters: Optional[int] = None, *, eps=None, pre_eps=None,
                        post_mult=None, sinkhorn_eps=None, op: str = "mhc_coeffs") -> None:
    """Checks for `mhc_coeffs` / `mhc_coeffs_bwd`.

    H: (..., n, d), 1 <= n <= 16, d >= 1 (the rms is over n·d); phi: (n·d, n²+2n);
    a_pre, a_post, a_res: 0-dim tensors or finite floats; b: (n²+2n,); when given:
    iters an int >= 1, eps and sinkhorn_eps finite floats > 0, pre_eps a finite float
    >= 0, post_mult a finite float > 0 (the module docstring says why).
    `op` names the public op in the messages of the domain checks.
    """
    check_streams("H", H)
    n, d = H.shape[-2], H.shape[-1]
    check_features(op, H, "mHC's r = rsqrt(mean(vec(H)²) + eps)")
    m = n * n + 2 * n
    check_tensor("phi", phi)
    check_shape("phi", phi, (n * d, m), "(n·d, n²+2n) for H of shape (..., n, d)")
    check_scalar("a_pre", a_pre, op)
    check_scalar("a_post", a_post, op)
    check_scalar("a_res", a_res, op)
    check_tensor("b", b)
    check_shape("b", b, (m,), "(n²+2n,) for H with n streams")
    if iters is not None:
        check_iters(iters, op)
    if eps is not None:
        check_norm_eps(op, eps)
    if pre_eps is not None:
        check_real(op, "pre_eps", pre_eps, ge=0, why="pre = sigmoid(·) + pre_eps is a positive gate")
    if post_mult is not None:
        check_real(op, "post_mult", post_mult, gt=0, why="post = post_mult·sigmoid(·) is a positive gate")
    if sinkhorn_eps is not None:
        check_sinkhorn_eps(op, sinkhorn_eps)
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


def validate_depth_aggregate_qkv_norm(S: torch.Tensor, A: torch.Tensor, norm_weights: torch.Tensor,
                                      eps=None) -> None:
    """Check the arguments of `depth_aggregate_qkv_norm` (shared by the oracle and the
    fused op): those of `validate_depth_aggregate` with C = 4 ways (q, k, v, r), and
    norm_weights: (3, d) float on S's device; eps (when given): a finite float > 0.
    Looks at metadata and Python numbers only (no device sync).
    """
    validate_depth_aggregate(S, A)
    if A.shape[-2] != QKV_NORM_WAYS:
        raise ValueError(
            f"A must have C = {QKV_NORM_WAYS} ways (q, k, v, r) along dim -2, got shape {tuple(A.shape)}"
        )
    check_tensor("norm_weights", norm_weights)
    d = S.shape[-1]
    check_shape("norm_weights", norm_weights, (QKV_NORM_WAYS - 1, d), f"(3, d) with d = S.shape[-1] = {d}")
    if eps is not None:
        check_norm_eps("depth_aggregate_qkv_norm", eps)
    check_same_device(S=S, norm_weights=norm_weights)


def validate_mudd_weights(
    x: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor, bias: torch.Tensor, n_ways: int, eps=None
) -> None:
    """Check the arguments of `mudd_weights` (shared by the oracle and the fused op).

    x: (*tok, d) with at least one token dim (x.dim() >= 2); W1: (d, K);
    W2: (K, C*l) with C = n_ways >= 1 and 1 <= l <= 128; bias: (C*l,) or (C, l).
    All float, on one device; eps (when given): a finite float > 0. d = 0 is allowed:
    rms(x)·W1 is then a sum over no features, so A = GELU(0)·W2 + bias = bias.
    Looks at metadata and Python numbers only (no device sync).
    """
    check_int("n_ways", n_ways, 1)
    if eps is not None:
        check_norm_eps("mudd_weights", eps)
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

