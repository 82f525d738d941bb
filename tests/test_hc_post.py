"""crosslayer.ops.hc_post and crosslayer.ops.stream_mix against the oracle.

CPU tests (run everywhere): the custom ops'
registration (schema, fakes, autograd) matches the oracle through the CPU path; the streams-folded-into-batch layout keeps its strides; bad
input raises clear errors.

GPU tests (marked `gpu`): the fused kernels against the float64 oracle under
DESIGN.md's policy (tests/policy.py): n in {1, 2, 3, 4, 8, 16} (1, 3 and 16 run the
generic instantiation), odd d and N, every dtype, static and per-token random
coefficients, poisoned outputs, strided / folded / padded / misaligned layouts, empty
shapes, gradcheck.

The checks every op shares (oracle agreement on every backend, opcheck, torch.compile,
CUDA graphs, the current stream, determinism, the launchers' messages) run over every
op in tests/test_contract.py; this file keeps what only this op has.
"""


import pytest
import torch

from crosslayer import ops, ref
from crosslayer._extension import _C
from crosslayer.ops.hc_post import hc_post_bwd_op, hc_post_op
from crosslayer.ops.stream_mix import stream_mix_bwd_op
from hc_inputs import make_streams, make_vec
from policy import assert_policy, oracle_pair

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def make_coeffs(lead, n, *, dtype, device, static):
    """Random alpha (n, n+1) / (*lead, n, n+1) and beta (n,) / (*lead, n) in the
    arithmetic dtype (float64 for float64 activations), not the init values."""
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    shape = () if static else tuple(lead)
    alpha = torch.randn(*shape, n, n + 1, device=device, dtype=cd)
    beta = torch.randn(*shape, n, device=device, dtype=cd)
    return alpha, beta


def make_hc_post(lead, n, d, *, dtype, device, static=False, layout="contiguous"):
    H = make_streams(lead, n, d, dtype=dtype, device=device, layout=layout)
    y = make_vec(lead, d, dtype=dtype, device=device, misaligned=layout == "misaligned")
    alpha, beta = make_coeffs(lead, n, dtype=dtype, device=device, static=static)
    return H, y, alpha, beta


def make_stream_mix(lead, n, d, *, dtype, device, static=False, layout="contiguous"):
    H = make_streams(lead, n, d, dtype=dtype, device=device, layout=layout)
    w = make_coeffs(lead, n, dtype=dtype, device=device, static=static)[1]
    return H, w


# --------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "folded"])
def test_cpu_gradients_flow_through_oracle(static, layout):
    H, y, alpha, beta = make_hc_post((2, 3), 3, 5, dtype=torch.float64, device="cpu",
                                     static=static, layout=layout)
    leaves = [t.detach().requires_grad_(True) for t in (H, y, alpha, beta)]
    dHn = torch.randn(2, 3, 3, 5, dtype=torch.float64)
    ops.hc_post(*leaves).backward(dHn)
    want = ref.hc_post_bwd(dHn, H, y, alpha, beta)
    for name, leaf, g in zip(("H", "y", "alpha", "beta"), leaves, want):
        torch.testing.assert_close(leaf.grad, g, msg=lambda m: f"d{name}: {m}")

    H, w = make_stream_mix((2, 3), 3, 5, dtype=torch.float64, device="cpu", static=static, layout=layout)
    Hl, wl = H.detach().requires_grad_(True), w.detach().requires_grad_(True)
    dx = torch.randn(2, 3, 5, dtype=torch.float64)
    ops.stream_mix(Hl, wl).backward(dx)
    dH, dw = ref.stream_mix_bwd(dx, H, w)
    torch.testing.assert_close(Hl.grad, dH)
    torch.testing.assert_close(wl.grad, dw)


def test_custom_ops_bwd_match_oracle_cpu():
    H, y, alpha, beta = make_hc_post((4,), 3, 8, dtype=torch.bfloat16, device="cpu")
    dHn = torch.randn(4, 3, 8).to(torch.bfloat16)
    got = hc_post_bwd_op(dHn, H, y, alpha, beta)
    want = ref.hc_post_bwd(dHn, H, y, alpha, beta)
    assert [g.dtype for g in got] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    dx = torch.randn(4, 8).to(torch.bfloat16)
    got = stream_mix_grads(stream_mix_bwd_op, dx, H, beta)
    want = ref.stream_mix_bwd(dx, H, beta)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_folded_layout_cpu():
    """The hyper-connections package's layout: outputs keep H's strides (the fakes say
    so too) and the values are the oracle's."""
    H, y, alpha, beta = make_hc_post((2, 5), 4, 8, dtype=torch.float32, device="cpu", layout="folded")
    assert not H.is_contiguous()
    out = hc_post_op(H, y, alpha, beta)
    assert out.stride() == H.stride()
    torch.testing.assert_close(out, ref.hc_post(H, y, alpha, beta), rtol=0, atol=0)
    torch.testing.assert_close(ops.hc_post(H, y, alpha, beta), ref.hc_post(H.contiguous(), y, alpha, beta))
    dH, *_ = hc_post_bwd_op(torch.randn_like(H), H, y, alpha, beta)
    assert dH.stride() == H.stride()
    torch.testing.assert_close(ops.stream_mix(H, beta), ref.stream_mix(H.contiguous(), beta))


@pytest.mark.parametrize(
    "H_shape, y_shape, a_shape, b_shape, match",
    [
        ((3, 4, 8), (3, 7), (4, 5), (4,), r"y must have shape \(3, 8\)"),
        ((3, 4, 8), (3, 8), (4, 4), (4,), r"alpha must have shape \(3, 4, 5\)"),
        ((3, 4, 8), (3, 8), (2, 4, 5), (4,), r"alpha must have shape \(3, 4, 5\)"),
        ((3, 4, 8), (3, 8), (4, 5), (3, 5), r"beta must have shape \(3, 4\)"),
        ((3, 17, 8), (3, 8), (17, 18), (17,), r"H must have 1 to 16 streams"),
        ((8,), (8,), (1, 2), (1,), r"H must have shape \(\.\.\., n, d\)"),
    ],
)
def test_hc_post_bad_shapes_raise(H_shape, y_shape, a_shape, b_shape, match):
    with pytest.raises(ValueError, match=match):
        ops.hc_post(torch.randn(H_shape), torch.randn(y_shape), torch.randn(a_shape), torch.randn(b_shape))


def test_stream_mix_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"w must have shape \(3, 4\)"):
        ops.stream_mix(torch.randn(3, 4, 8), torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"H must have 1 to 16 streams"):
        ops.stream_mix(torch.randn(2, 0, 8), torch.randn(0))


def test_bad_dtypes_and_devices_raise():
    H = torch.randn(3, 4, 8)
    with pytest.raises(TypeError, match=r"H must have dtype"):
        ops.hc_post(H.int(), torch.randn(3, 8), torch.randn(4, 5), torch.randn(4))
    with pytest.raises(TypeError, match=r"beta must have dtype"):
        ops.hc_post(H, torch.randn(3, 8), torch.randn(4, 5), torch.ones(4, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"w must have dtype"):
        ops.stream_mix(H, torch.ones(4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"alpha is on meta but H is on cpu"):
        ops.hc_post(H, torch.randn(3, 8), torch.randn(4, 5, device="meta"), torch.randn(4))
    with pytest.raises(ValueError, match=r"w is on meta but H is on cpu"):
        ops.stream_mix(H, torch.randn(4, device="meta"))


@pytest.mark.skipif(_C is None, reason="extension not built")
def test_fused_ops_lists_hc_post_and_stream_mix():
    assert ops.fused_ops()["hc_post"] and ops.fused_ops()["stream_mix"]


# --------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu


@pytest.fixture
def cuda(gpu_device):
    return gpu_device("hc_post", "stream_mix")


def check_hc_post_bwd(dHn, H, y, alpha, beta, got):
    low = ref.hc_post_bwd(dHn, H, y, alpha, beta)
    high = ref.hc_post_bwd(*[t.double() for t in (dHn, H, y, alpha, beta)])
    for name, g, lo, hi in zip(("dH", "dy", "dalpha", "dbeta"), got, low, high):
        assert_policy(name, g, lo, hi)


def stream_mix_grads(bwd, dx, H, w, prior=None):
    """(dH, dw) from a stream_mix backward bwd(dH, accumulate, dx, H, w) -> dw (the
    launcher or the custom op): dH written into a NaN-filled tensor like H, or, given
    `prior` (another op's contribution), added to a copy of it."""
    dH = torch.full_like(H, float("nan")) if prior is None else prior.clone()
    dw = bwd(dH, prior is not None, dx, H, w)
    return dH, dw


def check_stream_mix_bwd(dx, H, w, got, prior=None):
    low = list(ref.stream_mix_bwd(dx, H, w))
    high = list(ref.stream_mix_bwd(dx.double(), H.double(), w.double()))
    if prior is not None:
        low[0] = low[0] + prior
        high[0] = high[0] + prior.double()
    for name, g, lo, hi in zip(("dH", "dw"), got, low, high):
        assert_policy(name, g, lo, hi)


@gpu
def test_mixed_dtypes_use_oracle(cuda):
    H, y, alpha, beta = make_hc_post((5,), 4, 33, dtype=torch.float32, device=cuda)
    y16 = y.to(torch.bfloat16)
    torch.testing.assert_close(ops.hc_post(H, y16, alpha, beta), ref.hc_post(H, y16, alpha, beta), rtol=0, atol=0)
    a64 = alpha.double()
    torch.testing.assert_close(ops.hc_post(H, y, a64, beta), ref.hc_post(H, y, a64, beta), rtol=0, atol=0)
    # bfloat16 coefficients with float32 H run fused (computed in float32).
    ab = alpha.to(torch.bfloat16)
    assert_policy("H'", ops.hc_post(H, y, ab, beta), *oracle_pair(ref.hc_post, H, y, ab, beta))


