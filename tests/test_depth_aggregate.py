"""crosslayer.ops.depth_aggregate against the oracle.

CPU tests (run everywhere): the custom ops'
registration (schema, fake, autograd, mutation) passes opcheck and compiles with
fullgraph=True through their CPU path; bad input raises clear errors.

GPU tests (marked `gpu`): the fused kernels against the float64 oracle under
DESIGN.md's policy (tests/policy.py): odd shapes, every dtype, strided and misaligned
slots, static and per-token weights, C > 4, poisoned outputs, in-place accumulation,
gradcheck.

The checks every op shares (oracle agreement on every backend, opcheck, torch.compile,
CUDA graphs, the current stream, determinism, the launchers' messages) run over every
op in tests/test_contract.py; this file keeps what only this op has.
"""

import pytest
import torch

from crosslayer import ops, ref
from crosslayer.ops.depth_aggregate import depth_aggregate_bwd_op
from op_specs import DEPTH_SHAPES, depth_slots
from policy import accumulated, assert_policy, oracle_pair

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def make_inputs(l, tok, d, C, *, dtype, device, static=False, layout="contiguous"):
    """S (l, *tok, d) in one of several layouts and A per token or static, random."""
    S = depth_slots(l, tok, d, dtype, device, layout)
    shape_A = (C, l) if static else (*tok, C, l)
    A = torch.randn(shape_A, device=device)
    return S, A


def check_backward(dS, dA, dY, S, A, dS0, accumulate):
    """dS (written, or added to dS0 when accumulate) and dA of the backward op under the
    policy, against the oracle at the inputs' dtype and in float64."""

    def oracle(dY, S, A, dS0):
        dS_ref, dA_ref = ref.depth_aggregate_bwd(dY, S, A)
        return (accumulated(dS0, dS_ref) if accumulate else dS_ref), dA_ref.to(A.dtype)

    low, high = oracle_pair(oracle, dY, S, A, dS0)
    assert_policy("dS", dS, low[0], high[0])
    assert_policy("dA", dA, low[1], high[1])


# --------------------------------------------------------------------------- CPU


def test_cpu_gradients_flow_through_oracle():
    S, A = make_inputs(3, (6,), 5, 2, dtype=torch.float64, device="cpu")
    S.requires_grad_(True)
    A.requires_grad_(True)
    dY = torch.randn(2, 6, 5, dtype=torch.float64)
    ops.depth_aggregate(S, A).backward(dY)
    dS, dA = ref.depth_aggregate_bwd(dY, S.detach(), A.detach())
    torch.testing.assert_close(S.grad, dS)
    torch.testing.assert_close(A.grad, dA.to(A.dtype))


@pytest.mark.parametrize(
    "S_shape, A_shape, match",
    [
        ((3, 4, 8), (4, 2, 2), r"A must have shape"),  # l mismatch
        ((3, 4, 8), (5, 2, 3), r"A must have shape"),  # token mismatch
        ((3, 8), (2, 3), r"S must have shape \(l, \*tok, d\)"),  # no token dim
        ((129, 2, 4), (1, 129), r"S must have 1 to 128"),
        ((3, 4, 8), (4, 1, 2, 3), r"A must have 2 dims"),
    ],
)
def test_bad_shapes_raise(S_shape, A_shape, match):
    with pytest.raises(ValueError, match=match):
        ops.depth_aggregate(torch.randn(S_shape), torch.randn(A_shape))


def test_bad_dtype_raises():
    with pytest.raises(TypeError, match=r"S must have dtype"):
        ops.depth_aggregate(torch.ones(3, 4, 8, dtype=torch.int32), torch.randn(4, 2, 3))


def test_custom_op_bwd_accumulates_cpu():
    S, A = make_inputs(3, (5,), 4, 2, dtype=torch.float64, device="cpu")
    dY = torch.randn(2, 5, 4, dtype=torch.float64)
    dS0 = torch.randn(3, 5, 4, dtype=torch.float64)
    dS = dS0.clone()
    dA = depth_aggregate_bwd_op(dY, S.unbind(0), A, dS, True)
    want_dS, want_dA = ref.depth_aggregate_bwd(dY, S, A)
    torch.testing.assert_close(dS, dS0 + want_dS)
    torch.testing.assert_close(dA, want_dA.to(A.dtype))


# --------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu


@pytest.fixture
def cuda(gpu_device):
    return gpu_device("depth_aggregate")


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", DEPTH_SHAPES)
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("accumulate", [False, True])
def test_backward_op_matches_oracle(cuda, dtype, shape, static, accumulate):
    l, tok, d, C = shape
    S, A = make_inputs(l, tok, d, C, dtype=dtype, device=cuda, static=static)
    N = S[0].numel() // d
    S3 = S.reshape(l, N, d)
    A3 = A if static else A.reshape(N, C, l)
    dY = torch.randn(C, N, d, device=cuda).to(dtype)
    dS0 = torch.randn(l, N, d, device=cuda).to(dtype)
    dS = dS0.clone() if accumulate else torch.full_like(dS0, float("nan"))
    dA = depth_aggregate_bwd_op(dY, S3.unbind(0), A3, dS, accumulate)
    check_backward(dS, dA, dY, S3, A3, dS0, accumulate)


