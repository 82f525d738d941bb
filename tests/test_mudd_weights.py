"""crosslayer.ops.mudd_weights against the oracle.

CPU tests (run everywhere): the custom ops'
registration (schema, fakes, autograd with non-differentiable u and r) passes opcheck,
matches the hand-derived backward and compiles with fullgraph=True through their CPU
path; bad input raises clear errors.

GPU tests (marked `gpu`): the fused kernels against the float64 oracle under
DESIGN.md's policy (tests/policy.py): every dtype, both GELU forms, d in {1, 7, 129,
2048, 4099} (d < 32 takes the fp32 at::mm path for 16-bit x, the rest the tensor-core
kernels), K in {1, 5, 64, 128, 200} (K > 128 runs two column passes), C in {1, 4},
l in {1, 3, 25}, odd N, token-strided x, poisoned outputs, empty N, gradcheck.

The checks every op shares (oracle agreement on every backend, opcheck, torch.compile,
CUDA graphs, the current stream, determinism, the launchers' messages) run over every
op in tests/test_contract.py; this file keeps what only this op has.
"""

import math

import pytest
import torch

from crosslayer import ops, ref
from crosslayer._extension import _C
from crosslayer.ops.mudd_weights import mudd_weights_op
from policy import assert_policy

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
EPS = 1e-6


def make_params(d, K, C, l, *, dtype, device, bias_2d=False):
    """W1 ~ N(0, 1/d) (u of order one), W2 ~ N(0, 1/K), bias ~ N(0, 1), in the
    arithmetic dtype: far from the zero-W2 init so every backward term is exercised."""
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    W1 = torch.randn(d, K, device=device, dtype=cd) / math.sqrt(d)
    W2 = torch.randn(K, C * l, device=device, dtype=cd) / math.sqrt(K)
    bias = torch.randn(*((C, l) if bias_2d else (C * l,)), device=device, dtype=cd)
    return W1, W2, bias


def make_x(lead, d, *, dtype, device, strided=False):
    if strided:  # token stride d + 3: rows padded, features contiguous
        x = torch.randn(*lead, d + 3, device=device).to(dtype)[..., :d]
        assert not x.is_contiguous()
        return x
    return torch.randn(*lead, d, device=device).to(dtype)


def make_dA(lead, C, l, *, dtype, device):
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.randn(*lead, C, l, device=device, dtype=cd)


def double(ts):
    return [t.double() if isinstance(t, torch.Tensor) else t for t in ts]


# --------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_custom_op_autograd_matches_hand_derived_cpu(approximate):
    """The custom op's CPU path through its registered autograd (not the oracle's)."""
    lead, d, K, C, l = (2, 7), 6, 5, 4, 3
    x = torch.randn(*lead, d, dtype=torch.float64)
    params = make_params(d, K, C, l, dtype=torch.float64, device="cpu", bias_2d=True)
    leaves = [t.clone().requires_grad_(True) for t in (x, *params)]
    A, u, r = mudd_weights_op(*leaves, C, EPS, approximate)
    assert not u.requires_grad and not r.requires_grad
    assert A.shape == (*lead, C, l) and u.shape == (*lead, K) and r.shape == lead
    dA = make_dA(lead, C, l, dtype=torch.float64, device="cpu")
    (A * dA).sum().backward()
    want = ref.mudd_weights_bwd(dA, x, *params, C, EPS, approximate)
    for name, leaf, g in zip(("x", "W1", "W2", "bias"), leaves, want):
        torch.testing.assert_close(leaf.grad, g, msg=lambda m: f"d{name}: {m}")


def test_cpu_projection_outputs_match_oracle():
    x = torch.randn(11, 8)
    W1, W2, bias = make_params(8, 5, 1, 2, dtype=torch.float32, device="cpu")
    _, u, r = mudd_weights_op(x, W1, W2, bias, 1, EPS, "none")
    want_r = torch.rsqrt(x.square().mean(-1) + EPS)
    torch.testing.assert_close(r, want_r)
    torch.testing.assert_close(u, (x * want_r[:, None]) @ W1)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(W1_shape=(9, 6)), ValueError, r"W1 must have shape \(8, "),
        (dict(W2_shape=(5, 12)), ValueError, r"W2 must have shape \(6, "),
        (dict(W2_shape=(6, 10)), ValueError, r"W2 must have shape \(K, C\*l\)"),
        (dict(bias_shape=(11,)), ValueError, r"bias must have shape \(12\) \(C\*l,\) with C = 4, l = 3"),
        (dict(n_ways=0), ValueError, r"n_ways must be >= 1"),
        (dict(int_x=True), TypeError, r"x must have dtype"),
        (dict(approximate="sigmoid"), ValueError, r"approximate must be 'none' or 'tanh'"),
    ],
)
def test_bad_input_raises(kwargs, exc, match):
    x = torch.randn(3, 8)
    if kwargs.get("int_x"):
        x = x.to(torch.int32)
    W1 = torch.randn(*kwargs.get("W1_shape", (8, 6)))
    W2 = torch.randn(*kwargs.get("W2_shape", (6, 12)))
    bias = torch.randn(*kwargs.get("bias_shape", (4, 3)))
    with pytest.raises(exc, match=match):
        ops.mudd_weights(x, W1, W2, bias, kwargs.get("n_ways", 4), approximate=kwargs.get("approximate", "none"))


def test_fused_ops_lists_mudd_weights():
    """Fused where either backend runs: the extension, or the JIT path (which covers
    every op) when it is available."""
    from crosslayer._extension import jit_backend

    assert ops.fused_ops()["mudd_weights"] == (_C is not None or jit_backend()[0] is not None)


# --------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu


@pytest.fixture
def cuda(gpu_device):
    return gpu_device("mudd_weights")


# (lead, d, K, C, l): odd N everywhere; d = 1, 7 (fp32 path for 16-bit x), 129, 2048,
# 4099 (tensor cores); K = 200 is two column passes of the projection.


def fwd_pair(x, W1, W2, bias, C, approximate):
    low = ref.mudd_weights(x, W1, W2, bias, C, EPS, approximate)
    high = ref.mudd_weights(*double((x, W1, W2, bias)), C, EPS, approximate)
    return low, high


def check_forward(outputs, x, params, C, approximate):
    """A, u, r of the forward op under the policy: A against the oracle, u and r (what
    the backward consumes) against the oracle's projection."""
    A, u, r = outputs
    low, high = fwd_pair(x, *params, C, approximate)
    assert_policy("A", A, low, high)
    xc, x64 = x.to(A.dtype), x.double()
    r_lo = torch.rsqrt(xc.square().mean(-1) + EPS)
    r_hi = torch.rsqrt(x64.square().mean(-1) + EPS)
    assert_policy("r", r, r_lo, r_hi)
    assert_policy("u", u, (xc * r_lo[..., None]) @ params[0], (x64 * r_hi[..., None]) @ params[0].double())


def bwd_pair(dA, x, W1, W2, bias, C, approximate):
    low = ref.mudd_weights_bwd(dA, x, W1, W2, bias, C, EPS, approximate)
    high = ref.mudd_weights_bwd(*double((dA, x, W1, W2, bias)), C, EPS, approximate)
    return low, high


