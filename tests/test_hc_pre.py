"""crosslayer.ops.hc_pre (static and dynamic HC) against the oracle.

CPU tests (run everywhere): the dynamic-HC
custom ops' registration (schema, fakes, autograd with non-differentiable q and r)
passes opcheck, matches the hand-derived backward and compiles with fullgraph=True
through their CPU path; bad input raises clear errors.

GPU tests (marked `gpu`): the fused kernels against the float64 oracle under
DESIGN.md's policy (tests/policy.py): n in {1, 2, 3, 4, 8, 16} (1, 3 and 16 run the
generic instantiation), odd d and N, every dtype, random parameters (W far from its
zero init, so every term of the backward is exercised), optional dalpha/dbeta,
strided / folded / padded / misaligned layouts, dW partials in shared memory and in
the global-workspace fallback, empty shapes, gradcheck.

The checks every op shares (oracle agreement on every backend, opcheck, torch.compile,
CUDA graphs, the current stream, determinism, the launchers' messages) run over every
op in tests/test_contract.py; this file keeps what only this op has.
"""

import math

import pytest
import torch

from crosslayer import ops, ref
from crosslayer.ops.hc_pre import hc_pre_bwd_op, hc_pre_op
from hc_inputs import make_streams
from policy import assert_policy

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
EPS = 1e-6


def make_params(n, d, *, dtype, device):
    """Random A (n, n+1), B (n,), W (d, n+2), s_a, s_b in the arithmetic dtype.

    W ~ N(0, 1/d) keeps r·(H·W) of order one (tanh neither linear nor saturated) and
    the scales are of order one, so the dynamic terms dominate the static ones.
    """
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    A = torch.randn(n, n + 1, device=device, dtype=cd)
    B = torch.randn(n, device=device, dtype=cd)
    W = torch.randn(d, n + 2, device=device, dtype=cd) / math.sqrt(d)
    s_a = torch.rand((), device=device, dtype=cd) + 0.5
    s_b = torch.rand((), device=device, dtype=cd) + 0.5
    return A, B, W, s_a, s_b


def make_grads(lead, n, d, *, dtype, device):
    """Random dx (*lead, d) in the activation dtype, dalpha, dbeta in the arithmetic dtype."""
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    dx = torch.randn(*lead, d, device=device).to(dtype)
    dalpha = torch.randn(*lead, n, n + 1, device=device, dtype=cd)
    dbeta = torch.randn(*lead, n, device=device, dtype=cd)
    return dx, dalpha, dbeta


def double(ts):
    return [t.double() if isinstance(t, torch.Tensor) else t for t in ts]


# --------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "folded"])
def test_cpu_gradients_flow_through_oracle(dynamic, layout):
    lead, n, d = (2, 3), 3, 5
    H = make_streams(lead, n, d, dtype=torch.float64, device="cpu", layout=layout)
    params = make_params(n, d, dtype=torch.float64, device="cpu")
    A, B, W, s_a, s_b = [p.requires_grad_(True) for p in params]
    Hl = H.detach().requires_grad_(True)
    args = (Hl, A, B, W, s_a, s_b) if dynamic else (Hl, A, B)
    x, alpha, beta = ops.hc_pre(*args)
    dx = torch.randn_like(x)
    dalpha, dbeta = torch.randn_like(alpha), torch.randn_like(beta)
    ((x * dx).sum() + (alpha * dalpha).sum() + (beta * dbeta).sum()).backward()
    want = ref.hc_pre_bwd(dx, dalpha, dbeta, H, *[p.detach() for p in args[1:]])
    torch.testing.assert_close(Hl.grad, want[0])
    torch.testing.assert_close(A.grad, want[1])
    torch.testing.assert_close(B.grad, want[2])
    if dynamic:
        torch.testing.assert_close(W.grad, want[3])
        torch.testing.assert_close(s_a.grad, want[4])
        torch.testing.assert_close(s_b.grad, want[5])


def test_cpu_scalar_scales_are_accepted():
    H = torch.randn(6, 2, 8)
    A, B, W, _, _ = make_params(2, 8, dtype=torch.float32, device="cpu")
    for got, want in zip(ops.hc_pre(H, A, B, W, 0.3, 0.7), ref.hc_pre(H, A, B, W, 0.3, 0.7)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("with_coeff_grads", [False, True])
def test_custom_op_autograd_matches_hand_derived_cpu(with_coeff_grads):
    """The custom op's CPU path through its registered autograd (not the oracle's)."""
    lead, n, d = (7,), 4, 6
    H = torch.randn(*lead, n, d, dtype=torch.float64)
    params = make_params(n, d, dtype=torch.float64, device="cpu")
    leaves = [t.clone().requires_grad_(True) for t in (H, *params)]
    x, alpha, beta, q, r, Wt = hc_pre_op(*leaves, EPS)
    assert not q.requires_grad and not r.requires_grad and not Wt.requires_grad
    dx, dalpha, dbeta = make_grads(lead, n, d, dtype=torch.float64, device="cpu")
    loss = (x * dx).sum()
    if with_coeff_grads:
        loss = loss + (alpha * dalpha).sum() + (beta * dbeta).sum()
    loss.backward()
    want = ref.hc_pre_bwd(dx, dalpha if with_coeff_grads else None,
                          dbeta if with_coeff_grads else None, H, *params, eps=EPS)
    for name, leaf, g in zip(("H", "A", "B", "W", "s_a", "s_b"), leaves, want):
        torch.testing.assert_close(leaf.grad, g, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(W_shape=(8, 5)), ValueError, r"W must have shape \(8, 6\)"),
        (dict(A_shape=(4, 4)), ValueError, r"A must have shape \(4, 5\)"),
        (dict(drop_s_a=True), ValueError, r"s_a is required"),
        (dict(n=17), ValueError, r"1 to 16 streams"),
        (dict(int_H=True), TypeError, r"H must have dtype"),
    ],
)
def test_bad_input_raises(kwargs, exc, match):
    n = kwargs.get("n", 4)
    H = torch.randn(3, n, 8)
    if kwargs.get("int_H"):
        H = H.to(torch.int32)
    A = torch.randn(*kwargs.get("A_shape", (n, n + 1)))
    B = torch.randn(n)
    W = torch.randn(*kwargs.get("W_shape", (8, n + 2)))
    s_a = None if kwargs.get("drop_s_a") else 0.01
    with pytest.raises(exc, match=match):
        ops.hc_pre(H, A, B, W, s_a, 0.01)


# --------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu


@pytest.fixture
def cuda(gpu_device):
    return gpu_device("hc_pre")


def fwd_oracle(H, A, B, W, s_a, s_b):
    return ref.hc_pre(H, A, B, W, s_a, s_b, EPS)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, d", [(16, 8192), (8, 8192), (5, 12289)])
def test_backward_dw_in_global_workspace(cuda, dtype, n, d):
    """(n+2)·d fp32 partials beyond shared memory: the kernel accumulates dW in its
    global workspace slice instead."""
    lead = (6,)
    H = torch.randn(*lead, n, d, device=cuda).to(dtype)
    params = make_params(n, d, dtype=dtype, device=cuda)
    dx, dalpha, dbeta = make_grads(lead, n, d, dtype=dtype, device=cuda)
    _, _, _, q, r, Wt = hc_pre_op(H, *params, EPS)
    dH = torch.empty_like(H)
    A, B, W, s_a, s_b = params
    got = (dH, *hc_pre_bwd_op(dH, False, dx, dalpha, dbeta, H, A, B, W, Wt, s_a, s_b, q, r, EPS))
    low = ref.hc_pre_bwd(dx, dalpha, dbeta, H, *params, eps=EPS)
    high = ref.hc_pre_bwd(*double((dx, dalpha, dbeta, H, *params)), eps=EPS)
    for name, g, lo, hi in zip(("dH", "dA", "dB", "dW", "ds_a", "ds_b"), got, low, high):
        assert_policy(name, g, lo, hi)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_static_hc_through_stream_mix(cuda, dtype):
    lead, n, d = (9, 4), 4, 130
    H = torch.randn(*lead, n, d, device=cuda).to(dtype)
    A, B, _, _, _ = make_params(n, d, dtype=dtype, device=cuda)
    leaves = [t.detach().requires_grad_(True) for t in (H, A, B)]
    x, alpha, beta = ops.hc_pre(*leaves)
    low, high = ref.hc_pre(H, A, B), ref.hc_pre(*double((H, A, B)))
    for name, got, lo, hi in zip(("x", "alpha", "beta"), (x, alpha, beta), low, high):
        assert_policy(name, got, lo, hi)
    dx = torch.randn(*lead, d, device=cuda).to(dtype)
    dalpha, dbeta = torch.randn_like(alpha), torch.randn_like(beta)
    ((x.to(alpha.dtype) * dx.to(alpha.dtype)).sum() + (alpha * dalpha).sum()
     + (beta * dbeta).sum()).backward()
    low = ref.hc_pre_bwd(dx, dalpha, dbeta, H, A, B)
    high = ref.hc_pre_bwd(*double((dx, dalpha, dbeta, H, A, B)))
    for name, leaf, lo, hi in zip(("dH", "dA", "dB"), leaves, low[:3], high[:3]):
        assert_policy(name, leaf.grad, lo, hi)


