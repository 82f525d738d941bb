"""crosslayer.ops.mhc_coeffs (mHC coefficients) against the oracle (crosslayer.ref.mhc).

CPU tests (run everywhere): the custom ops'
registration (schema, fakes, autograd with non-differentiable u and r) passes opcheck,
matches the hand-derived backward and compiles with fullgraph=True through the CPU
path; the kernel's Sinkhorn-backward scheme (scale vectors saved, iterates rebuilt
backwards by multiplication) is exact against autograd in float64; bad input raises
clear errors.

GPU tests (marked `gpu`): the fused kernels against the float64 oracle under
DESIGN.md's policy (tests/policy.py): n in {1, 2, 4, 5, 8} (4 is the fast path, the
others the generic instantiation), odd d (1 and 7 take the at::mm path for 16-bit H,
129 and 4099 the tensor-core path with tails) and N, every dtype, random parameters and
random (far from converged) Sinkhorn logits, optional dalpha/dbeta, strided / folded /
padded / misaligned layouts, the Sinkhorn scale buffer in shared and in global memory,
the whole mHC sublayer with stream_mix and hc_post, empty shapes, gradcheck.

The checks every op shares (oracle agreement on every backend, opcheck, torch.compile,
CUDA graphs, the current stream, determinism, the launchers' messages) run over every
op in tests/test_contract.py; this file keeps what only this op has.
"""

import math

import pytest
import torch

from crosslayer import ops, ref
from crosslayer.ops.mhc_coeffs import mhc_coeffs_bwd_op, mhc_coeffs_op
from hc_inputs import make_streams
from policy import assert_policy

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
EPS, PRE_EPS, POST_MULT, ITERS, SK_EPS = 1e-6, 1e-6, 2.0, 20, 1e-6
FLOATS = (EPS, PRE_EPS, POST_MULT, ITERS, SK_EPS)


def make_params(n, d, *, dtype, device, b_scale=1.0):
    """Random phi (n·d, n²+2n), a_pre, a_post, a_res (0-dim), b (n²+2n) in the arithmetic
    dtype. phi ~ N(0, 1/(n·d)) keeps z = r·xf·phi of order one; a_* in [0.5, 1.5] and
    b ~ N(0, b_scale²) make the Sinkhorn logits O(1) and random (not near a doubly
    stochastic fixed point), so every iterate matters in the backward."""
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    m = n * n + 2 * n
    phi = torch.randn(n * d, m, device=device, dtype=cd) / math.sqrt(n * d)
    a = [torch.rand((), device=device, dtype=cd) + 0.5 for _ in range(3)]
    b = torch.randn(m, device=device, dtype=cd) * b_scale
    return (phi, *a, b)


def make_grads(lead, n, *, dtype, device):
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    return (torch.randn(*lead, n, n + 1, device=device, dtype=cd),
            torch.randn(*lead, n, device=device, dtype=cd))


def double(ts):
    return [t.double() if isinstance(t, torch.Tensor) else t for t in ts]


def oracle(H, params, iters=ITERS):
    return ref.mhc_coeffs(H, *params, EPS, PRE_EPS, POST_MULT, iters, SK_EPS)


def run_bwd(bwd, dalpha, dbeta, H, params, u, r, *floats, prior=None, dpre=None, dx=None):
    """(dH, dphi, da_pre, da_post, da_res, db) from a backward launcher or custom op
    (dH in place): dH written into a NaN-filled tensor like H, or, given `prior` (another
    op's contribution), added to a copy of it."""
    dH = torch.full_like(H, float("nan")) if prior is None else prior.clone()
    grads = bwd(dH, prior is not None, None, dalpha, dbeta, dpre, dx, H, *params, u, r, *floats)
    return (dH, *grads)


def oracle_bwd(dalpha, dbeta, H, params, iters=ITERS):
    return ref.mhc_coeffs_bwd(dalpha, dbeta, H, *params, EPS, PRE_EPS, POST_MULT, iters, SK_EPS)


GRAD_NAMES = ("dH", "dphi", "da_pre", "da_post", "da_res", "db")


# --------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("layout", ["contiguous", "folded"])
def test_cpu_gradients_flow_through_oracle(layout):
    lead, n, d = (2, 3), 3, 5
    H = make_streams(lead, n, d, dtype=torch.float64, device="cpu", layout=layout)
    params = [p.requires_grad_(True) for p in make_params(n, d, dtype=torch.float64, device="cpu")]
    Hl = H.detach().requires_grad_(True)
    alpha, beta = ops.mhc_coeffs(Hl, *params)
    dalpha, dbeta = torch.randn_like(alpha), torch.randn_like(beta)
    ((alpha * dalpha).sum() + (beta * dbeta).sum()).backward()
    want = oracle_bwd(dalpha, dbeta, H, [p.detach() for p in params])
    for name, leaf, w in zip(GRAD_NAMES, (Hl, *params), want):
        torch.testing.assert_close(leaf.grad, w, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("which", ["both", "alpha", "beta"])
def test_custom_op_autograd_matches_hand_derived_cpu(which):
    """The custom op's CPU path through its registered autograd (not the oracle's)."""
    lead, n, d = (7,), 4, 6
    H = torch.randn(*lead, n, d, dtype=torch.float64)
    params = make_params(n, d, dtype=torch.float64, device="cpu")
    leaves = [t.clone().requires_grad_(True) for t in (H, *params)]
    alpha, beta, u, r = mhc_coeffs_op(*leaves, *FLOATS)
    assert not u.requires_grad and not r.requires_grad
    dalpha, dbeta = make_grads(lead, n, dtype=torch.float64, device="cpu")
    dalpha = dalpha if which != "beta" else None
    dbeta = dbeta if which != "alpha" else None
    loss = sum((o * g).sum() for o, g in ((alpha, dalpha), (beta, dbeta)) if g is not None)
    loss.backward()
    want = oracle_bwd(dalpha, dbeta, H, params)
    for name, leaf, g in zip(GRAD_NAMES, leaves, want):
        torch.testing.assert_close(leaf.grad, g, msg=lambda m: f"{name}: {m}")


def kernel_scheme_sinkhorn_bwd(dP, L, iters, eps):
    """The backward of kernels/mhc_coeffs.cuh, step for step, on (..., n, n) tensors:
    the forward keeps only each step's scale vector c_k (sum + eps); the backward walks
    from the last iterate Q_K, rebuilding Q_{k-1} = Q_k·c_k by multiplication."""
    S = torch.softmax(L, -1)
    P = S + eps
    scales = []
    for k in range(2 * iters - 1):
        axis = -2 if k % 2 == 0 else -1
        c = P.sum(axis, keepdim=True) + eps
        P = P / c
        scales.append((axis, c))
    g = dP
    for axis, c in reversed(scales):
        g = (g - (g * P).sum(axis, keepdim=True)) / c
        P = P * c
    return S * (g - (g * S).sum(-1, keepdim=True))


@pytest.mark.parametrize("n", [1, 2, 4, 5, 16])
def test_kernel_sinkhorn_scheme_is_exact_fp64(n):
    """At 20 iterations on random logits of scale 3 (far from converged), the kernel's
    scheme equals autograd through the oracle to float64 rounding."""
    L = (torch.randn(64, n, n, dtype=torch.float64) * 3).requires_grad_(True)
    dP = torch.randn(64, n, n, dtype=torch.float64)
    (want,) = torch.autograd.grad((ref.sinkhorn(L, 20, SK_EPS) * dP).sum(), L)
    got = kernel_scheme_sinkhorn_bwd(dP, L.detach(), 20, SK_EPS)
    if n > 1:  # (a 1 x 1 softmax is constant: its gradient is exactly zero)
        assert want.abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(phi_shape=(32, 23)), ValueError, r"phi must have shape \(32, 24\)"),
        (dict(b_shape=(25,)), ValueError, r"b must have shape \(24\)"),
        (dict(n=17), ValueError, r"1 to 16 streams"),
        (dict(int_H=True), TypeError, r"H must have dtype"),
        (dict(a_shape=(1,)), ValueError, r"a_pre must be a 0-dim tensor"),
        (dict(iters=0), ValueError, r"iters must be >= 1"),
    ],
)
def test_bad_input_raises(kwargs, exc, match):
    n, d = kwargs.get("n", 4), 8
    m = n * n + 2 * n
    H = torch.randn(3, n, d)
    if kwargs.get("int_H"):
        H = H.to(torch.int32)
    phi = torch.randn(*kwargs.get("phi_shape", (n * d, m)))
    b = torch.randn(*kwargs.get("b_shape", (m,)))
    a_pre = torch.rand(*kwargs["a_shape"]) if "a_shape" in kwargs else 0.5
    with pytest.raises(exc, match=match):
        ops.mhc_coeffs(H, phi, a_pre, 0.5, 0.5, b, iters=kwargs.get("iters", 20))


# --------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu


@pytest.fixture
def cuda(gpu_device):
    return gpu_device("mhc_coeffs")


@gpu
@pytest.mark.parametrize("n", [1, 2, 4, 5, 16])
@pytest.mark.parametrize("iters", [20, 1, 45])
def test_sinkhorn_backward_exact_fp64(cuda, n, iters):
    """fp64 at 20 iterations (and 1, and 45: the scale buffer in global memory) on
    random logits of scale 3: the kernel's gradients equal autograd through the oracle
    to float64 rounding, not merely near the converged point."""
    lead, d = (23,), 5
    H = torch.randn(*lead, n, d, device=cuda, dtype=torch.float64)
    params = make_params(n, d, dtype=torch.float64, device=cuda, b_scale=3.0)
    leaves = [t.clone().requires_grad_(True) for t in (H, *params)]
    alpha, beta = ref.mhc_coeffs(*leaves, EPS, PRE_EPS, POST_MULT, iters, SK_EPS)
    dalpha, dbeta = make_grads(lead, n, dtype=torch.float64, device=cuda)
    want = torch.autograd.grad((alpha * dalpha).sum() + (beta * dbeta).sum(), leaves)
    _, _, u, r = mhc_coeffs_op(H, *params, EPS, PRE_EPS, POST_MULT, iters, SK_EPS)
    got = run_bwd(mhc_coeffs_bwd_op, dalpha, dbeta, H, params, u, r, EPS, PRE_EPS, POST_MULT, iters, SK_EPS)
    assert want[-1].abs().max() > 1e-3
    for name, g, w in zip(GRAD_NAMES, got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_buffer_in_global_memory(cuda, dtype):
    """iters = 60: (2·60 − 1) steps × 128 threads × 4 B > 48 KB, so the Sinkhorn scales
    go to the global workspace."""
    lead, n, d = (45,), 4, 256
    H = torch.randn(*lead, n, d, device=cuda).to(dtype)
    params = make_params(n, d, dtype=dtype, device=cuda)
    dalpha, dbeta = make_grads(lead, n, dtype=dtype, device=cuda)
    alpha, beta, u, r = mhc_coeffs_op(H, *params, EPS, PRE_EPS, POST_MULT, 60, SK_EPS)
    for name, got, lo, hi in zip(("alpha", "beta"), (alpha, beta), oracle(H, params, 60),
                                 oracle(*double((H,)), double(params), 60)):
        assert_policy(name, got, lo, hi)
    got = run_bwd(mhc_coeffs_bwd_op, dalpha, dbeta, H, params, u, r, EPS, PRE_EPS, POST_MULT, 60, SK_EPS)
    low = oracle_bwd(dalpha, dbeta, H, params, 60)
    high = oracle_bwd(*double((dalpha, dbeta, H)), double(params), 60)
    for name, g, lo, hi in zip(GRAD_NAMES, got, low, high):
        assert_policy(name, g, lo, hi)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mhc_sublayer_with_hc_mixing_ops(cuda, dtype):
    """coeffs -> x = stream_mix(H, alpha[..., 0]) -> y = x (identity branch) ->
    H' = hc_post(H, y, alpha, beta), forward and backward, against the same chain of
    oracles."""
    lead, n, d = (6, 9), 4, 160
    H = torch.randn(*lead, n, d, device=cuda).to(dtype)
    params = make_params(n, d, dtype=dtype, device=cuda)
    dHn = torch.randn(*lead, n, d, device=cuda).to(dtype)

    def chain(mod_coeffs, mix, post, H, params):
        leaves = [t.detach().clone().requires_grad_(True) for t in (H, *params)]
        alpha, beta = mod_coeffs(*leaves)
        y = mix(leaves[0], alpha[..., 0])
        out = post(leaves[0], y, alpha, beta)
        (out.to(alpha.dtype) * dHn.to(alpha.dtype)).sum().backward()
        return (out, *[leaf.grad for leaf in leaves])

    got = chain(ops.mhc_coeffs, ops.stream_mix, ops.hc_post, H, params)
    low = chain(ref.mhc_coeffs, ref.stream_mix, ref.hc_post, H, params)
    high = chain(ref.mhc_coeffs, ref.stream_mix, ref.hc_post, H.double(), double(params))
    for name, g, lo, hi in zip(("H'",) + GRAD_NAMES, got, low, high):
        assert_policy(name, g, lo, hi)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_strided_parameters(cuda, dtype):
    """phi as a transposed view and b as a strided slice: the launcher reads any strides."""
    lead, n, d = (40,), 4, 96
    H = torch.randn(*lead, n, d, device=cuda).to(dtype)
    phi, a_pre, a_post, a_res, b = make_params(n, d, dtype=dtype, device=cuda)
    phi_t = phi.t().contiguous().t()
    b_s = torch.stack([b, b], 1)[:, 0]
    assert not phi_t.is_contiguous() and not b_s.is_contiguous()
    params = (phi_t, a_pre, a_post, a_res, b_s)
    alpha, beta, _, _ = mhc_coeffs_op(H, *params, *FLOATS)
    for name, got, lo, hi in zip(("alpha", "beta"), (alpha, beta), oracle(H, params),
                                 oracle(*double((H,)), double(params))):
        assert_policy(name, got, lo, hi)


