"""crosslayer.ops.hc_pre (static and dynamic HC) against the oracle.

CPU tests (run everywhere): the public op dispatches to the oracle; the dynamic-HC
custom ops' registration (schema, fakes, autograd with non-differentiable q and r)
passes opcheck, matches the hand-derived backward and compiles with fullgraph=True
through their CPU path; bad input raises clear errors.

GPU tests (marked `gpu`): the fused kernels against the float64 oracle under
DESIGN.md's policy (tests/policy.py): n in {1, 2, 3, 4, 8, 16} (1, 3 and 16 run the
generic instantiation), odd d and N, every dtype, random parameters (W far from its
zero init, so every term of the backward is exercised), optional dalpha/dbeta,
strided / folded / padded / misaligned layouts, dW partials in shared memory and in
the global-workspace fallback, empty shapes, gradcheck, opcheck, torch.compile, CUDA
graphs, side streams, bit-identical backward runs and the launchers' messages.
"""

import math

import pytest
import torch
from torch.library import opcheck

from crosslayer import ops, ref
from crosslayer._extension import _C
from crosslayer.ops.hc_pre import hc_pre_bwd_op, hc_pre_op
from hc_inputs import make_streams, make_vec
from compile_check import assert_compiles_like_eager
from policy import assert_policy, poison_allocator

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
LAYOUTS = ["padded", "stream_stride", "folded", "tokens_transposed", "misaligned"]
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
def test_cpu_dispatches_to_oracle(dynamic):
    H = torch.randn(3, 5, 4, 9)
    A, B, W, s_a, s_b = make_params(4, 9, dtype=torch.float32, device="cpu")
    args = (H, A, B, W, s_a, s_b) if dynamic else (H, A, B)
    for got, want in zip(ops.hc_pre(*args), ref.hc_pre(*args)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


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
    x, alpha, beta, q, r = hc_pre_op(*leaves, EPS)
    assert not q.requires_grad and not r.requires_grad
    dx, dalpha, dbeta = make_grads(lead, n, d, dtype=torch.float64, device="cpu")
    loss = (x * dx).sum()
    if with_coeff_grads:
        loss = loss + (alpha * dalpha).sum() + (beta * dbeta).sum()
    loss.backward()
    want = ref.hc_pre_bwd(dx, dalpha if with_coeff_grads else None,
                          dbeta if with_coeff_grads else None, H, *params, eps=EPS)
    for name, leaf, g in zip(("H", "A", "B", "W", "s_a", "s_b"), leaves, want):
        torch.testing.assert_close(leaf.grad, g, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("layout", ["contiguous", "folded", "stream_stride"])
def test_custom_ops_opcheck_cpu(layout):
    lead, n, d = (3, 5), 4, 6
    H = make_streams(lead, n, d, dtype=torch.float32, device="cpu", layout=layout)
    params = make_params(n, d, dtype=torch.float32, device="cpu")
    opcheck(hc_pre_op, (H, *params, EPS))
    opcheck(hc_pre_op, (*[t.detach().clone().requires_grad_(True) for t in (H, *params)], EPS))
    _, _, _, q, r = hc_pre_op(H, *params, EPS)
    dx, dalpha, dbeta = make_grads(lead, n, d, dtype=torch.float32, device="cpu")
    opcheck(hc_pre_bwd_op, (dx, dalpha, dbeta, H, *params, q, r, EPS))
    opcheck(hc_pre_bwd_op, (dx, None, None, H, *params, q, r, EPS))


@pytest.mark.compile
def test_custom_op_compiles_fullgraph_cpu():
    H = torch.randn(10, 4, 8)
    params = make_params(4, 8, dtype=torch.float32, device="cpu")

    def f(H, A, B, W, s_a, s_b):
        x, alpha, beta = ops.hc_pre(H, A, B, W, s_a, s_b)
        return x.square().sum() + alpha.sum() + beta.square().sum()

    assert_compiles_like_eager(f, (H, *params))


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


@pytest.mark.skipif(_C is None, reason="extension not built")
def test_launcher_rejects_cpu_tensors():
    H = torch.randn(3, 4, 8)
    params = make_params(4, 8, dtype=torch.float32, device="cpu")
    with pytest.raises(RuntimeError, match="H must be a CUDA tensor"):
        _C.hc_pre_fwd(H, *params, EPS)


# --------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu


@pytest.fixture
def cuda(gpu_device):
    return gpu_device("hc_pre")


NS = [1, 2, 3, 4, 8, 16]
SHAPES = [((1,), 1), ((5,), 7), ((37,), 129), ((3, 11), 4099), ((64,), 2048)]  # (lead, d)


def fwd_oracle(H, A, B, W, s_a, s_b):
    return ref.hc_pre(H, A, B, W, s_a, s_b, EPS)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_oracle(cuda, dtype, n, shape):
    lead, d = shape
    H = torch.randn(*lead, n, d, device=cuda).to(dtype)
    params = make_params(n, d, dtype=dtype, device=cuda)
    poison_allocator(cuda)
    x, alpha, beta, q, r = hc_pre_op(H, *params, EPS)
    low = fwd_oracle(H, *params)
    high = fwd_oracle(*double((H, *params)))
    for name, got, lo, hi in zip(("x", "alpha", "beta"), (x, alpha, beta), low, high):
        assert_policy(name, got, lo, hi)
    # q and r are what the backward consumes: the oracle's projection.
    Hc = H.to(alpha.dtype)
    assert_policy("q", q, Hc @ params[2], H.double() @ params[2].double())
    assert_policy("r", r, torch.rsqrt(Hc.square().mean(-1) + EPS),
                  torch.rsqrt(H.double().square().mean(-1) + EPS))


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("coeff_grads", [True, False])
def test_backward_op_matches_oracle(cuda, dtype, n, shape, coeff_grads):
    lead, d = shape
    H = torch.randn(*lead, n, d, device=cuda).to(dtype)
    params = make_params(n, d, dtype=dtype, device=cuda)
    dx, dalpha, dbeta = make_grads(lead, n, d, dtype=dtype, device=cuda)
    if not coeff_grads:
        dalpha = dbeta = None
    _, _, _, q, r = hc_pre_op(H, *params, EPS)
    poison_allocator(cuda)
    got = hc_pre_bwd_op(dx, dalpha, dbeta, H, *params, q, r, EPS)
    low = ref.hc_pre_bwd(dx, dalpha, dbeta, H, *params, eps=EPS)
    high = ref.hc_pre_bwd(*double((dx, dalpha, dbeta, H, *params)), eps=EPS)
    for name, g, lo, hi in zip(("dH", "dA", "dB", "dW", "ds_a", "ds_b"), got, low, high):
        assert_policy(name, g, lo, hi)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n", [4, 3])
def test_autograd_strided_layouts(cuda, dtype, layout, n):
    lead, d = (5, 7), 131
    H = make_streams(lead, n, d, dtype=dtype, device=cuda, layout=layout)
    assert not H.is_contiguous()
    params = make_params(n, d, dtype=dtype, device=cuda)
    leaves = [t.detach().requires_grad_(True) for t in (H, *params)]
    x, alpha, beta = ops.hc_pre(*leaves)
    low = fwd_oracle(H, *params)
    high = fwd_oracle(*double((H, *params)))
    for name, got, lo, hi in zip(("x", "alpha", "beta"), (x, alpha, beta), low, high):
        assert_policy(name, got, lo, hi)
    dx = make_vec(lead, d, dtype=dtype, device=cuda, misaligned=layout == "misaligned")
    _, dalpha, dbeta = make_grads(lead, n, d, dtype=dtype, device=cuda)
    ((x.to(alpha.dtype) * dx.to(alpha.dtype)).sum() + (alpha * dalpha).sum()
     + (beta * dbeta).sum()).backward()
    low = ref.hc_pre_bwd(dx, dalpha, dbeta, H, *params, eps=EPS)
    high = ref.hc_pre_bwd(*double((dx, dalpha, dbeta, H, *params)), eps=EPS)
    for name, leaf, lo, hi in zip(("dH", "dA", "dB", "dW", "ds_a", "ds_b"), leaves, low, high):
        assert_policy(name, leaf.grad, lo, hi)


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
    _, _, _, q, r = hc_pre_op(H, *params, EPS)
    got = hc_pre_bwd_op(dx, dalpha, dbeta, H, *params, q, r, EPS)
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


@gpu
def test_empty_tokens(cuda):
    H = torch.randn(0, 4, 8, device=cuda, requires_grad=True)
    params = [t.requires_grad_(True) for t in make_params(4, 8, dtype=torch.float32, device=cuda)]
    x, alpha, beta = ops.hc_pre(H, *params)
    assert x.shape == (0, 8) and alpha.shape == (0, 4, 5) and beta.shape == (0, 4)
    (x.sum() + alpha.sum() + beta.sum()).backward()
    for p in params:
        assert torch.equal(p.grad, torch.zeros_like(p))


@gpu
@pytest.mark.parametrize("n", [2, 3])
def test_gradcheck_fp64(cuda, n):
    H = torch.randn(2, 3, n, 5, device=cuda, dtype=torch.float64, requires_grad=True)
    params = [t.requires_grad_(True) for t in make_params(n, 5, dtype=torch.float64, device=cuda)]
    assert torch.autograd.gradcheck(lambda *a: ops.hc_pre(*a), (H, *params))


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_cuda(cuda, dtype):
    lead, n, d = (33,), 4, 70
    H = torch.randn(*lead, n, d, device=cuda).to(dtype)
    params = make_params(n, d, dtype=dtype, device=cuda)
    opcheck(hc_pre_op, (H, *params, EPS))
    opcheck(hc_pre_op, (*[t.detach().clone().requires_grad_(True) for t in (H, *params)], EPS))
    _, _, _, q, r = hc_pre_op(H, *params, EPS)
    dx, dalpha, dbeta = make_grads(lead, n, d, dtype=dtype, device=cuda)
    opcheck(hc_pre_bwd_op, (dx, dalpha, dbeta, H, *params, q, r, EPS))
    opcheck(hc_pre_bwd_op, (dx, None, None, H, *params, q, r, EPS))


@gpu
@pytest.mark.compile
def test_compile_fullgraph_cuda(cuda):
    H = torch.randn(4, 9, 4, 136, device=cuda).to(torch.bfloat16)
    params = make_params(4, 136, dtype=torch.bfloat16, device=cuda)

    def f(H, A, B, W, s_a, s_b):
        x, alpha, beta = ops.hc_pre(H, A, B, W, s_a, s_b)
        return (x.float() * 2).sum() + alpha.square().sum() + beta.sum()

    assert_compiles_like_eager(f, (H, *params), exact_grads=(0,))


@gpu
def test_cuda_graph_capture(cuda):
    lead, n, d = (300,), 4, 256
    H = torch.randn(*lead, n, d, device=cuda).to(torch.bfloat16)
    params = make_params(n, d, dtype=torch.bfloat16, device=cuda)
    dx, dalpha, dbeta = make_grads(lead, n, d, dtype=torch.bfloat16, device=cuda)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the graph
        outs = hc_pre_op(H, *params, EPS)
        hc_pre_bwd_op(dx, dalpha, dbeta, H, *params, outs[3], outs[4], EPS)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = hc_pre_op(H, *params, EPS)
        grads = hc_pre_bwd_op(dx, dalpha, dbeta, H, *params, outs[3], outs[4], EPS)
    for _ in range(2):  # new inputs copied into the captured buffers
        H.copy_(torch.randn_like(H, dtype=torch.float32))
        for p, fresh in zip(params, make_params(n, d, dtype=torch.bfloat16, device=cuda)):
            p.copy_(fresh)
        dx.copy_(torch.randn_like(dx, dtype=torch.float32))
        graph.replay()
        torch.cuda.synchronize()
        low, high = fwd_oracle(H, *params), fwd_oracle(*double((H, *params)))
        for name, got, lo, hi in zip(("x", "alpha", "beta"), outs[:3], low, high):
            assert_policy(name, got, lo, hi)
        low = ref.hc_pre_bwd(dx, dalpha, dbeta, H, *params, eps=EPS)
        high = ref.hc_pre_bwd(*double((dx, dalpha, dbeta, H, *params)), eps=EPS)
        for name, g, lo, hi in zip(("dH", "dA", "dB", "dW", "ds_a", "ds_b"), grads, low, high):
            assert_policy(name, g, lo, hi)


@gpu
def test_runs_on_current_stream(cuda):
    """Inputs produced on a side stream and consumed there: a kernel launched on the
    default stream instead would race with the producer."""
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # keep the side stream busy before the inputs exist
        H = torch.randn(4096, 4, 512, device=cuda).to(torch.bfloat16)
        params = make_params(4, 512, dtype=torch.bfloat16, device=cuda)
        x, alpha, beta, _, _ = hc_pre_op(H, *params, EPS)
    torch.cuda.synchronize()
    low, high = fwd_oracle(H, *params), fwd_oracle(*double((H, *params)))
    for name, got, lo, hi in zip(("x", "alpha", "beta"), (x, alpha, beta), low, high):
        assert_policy(name, got, lo, hi)


@gpu
@pytest.mark.parametrize("n, d", [(4, 2048), (8, 1024), (3, 512)])
def test_backward_deterministic(cuda, n, d):
    lead = (4099,)
    H = torch.randn(*lead, n, d, device=cuda).to(torch.bfloat16)
    params = make_params(n, d, dtype=torch.bfloat16, device=cuda)
    dx, dalpha, dbeta = make_grads(lead, n, d, dtype=torch.bfloat16, device=cuda)
    _, _, _, q, r = hc_pre_op(H, *params, EPS)
    first = hc_pre_bwd_op(dx, dalpha, dbeta, H, *params, q, r, EPS)
    second = hc_pre_bwd_op(dx, dalpha, dbeta, H, *params, q, r, EPS)
    for name, a, b in zip(("dH", "dA", "dB", "dW", "ds_a", "ds_b"), first, second):
        assert torch.equal(a, b), f"{name} differs between two runs"


@gpu
def test_launcher_errors_are_messaged(cuda):
    H = torch.randn(3, 4, 8, device=cuda)
    A, B, W, s_a, s_b = make_params(4, 8, dtype=torch.float32, device=cuda)
    with pytest.raises(RuntimeError, match=r"W must have shape \(d, n\+2\)"):
        _C.hc_pre_fwd(H, A, B, W[:, :5], s_a, s_b, EPS)
    with pytest.raises(RuntimeError, match=r"s_a must be a 0-dim tensor"):
        _C.hc_pre_fwd(H, A, B, W, s_a.reshape(1), s_b, EPS)
    with pytest.raises(RuntimeError, match="d >= 1"):
        _C.hc_pre_fwd(H[..., :0], A, B, W[:0], s_a, s_b, EPS)
    x, alpha, beta, q, r = _C.hc_pre_fwd(H, A, B, W, s_a, s_b, EPS)
    with pytest.raises(RuntimeError, match=r"dalpha must have shape \(\.\.\., n, n\+1\)"):
        _C.hc_pre_bwd(torch.randn(3, 8, device=cuda), alpha[:, :, :4], None, H, A, B, W,
                          s_a, s_b, q, r)
    with pytest.raises(RuntimeError, match="dx must have H's dtype"):
        _C.hc_pre_bwd(torch.randn(3, 8, device=cuda, dtype=torch.float64), None, None, H, A,
                          B, W, s_a, s_b, q, r)
