"""depth_aggregate's CUDA launchers and kernels on the CPU emulator (tools/cuemu).

The launchers (csrc/depth_aggregate.cu) and kernels (csrc/kernels/depth_aggregate.cuh)
run unchanged on CPU tensors; each result is held to DESIGN.md's policy against the
float64 oracle, outputs poisoned with NaN, on the GPU tests' odd shapes, every dtype,
static and per-token weights, C > 4, strided and misaligned slots (the scalar path),
shifted rows (any d on the 16-byte path) and in-place accumulation. What only a GPU shows (speed, streams, graphs, the
hardware's own scheduling) stays with the `gpu` tests in test_depth_aggregate.py.
"""

import pytest
import torch

from crosslayer import ref
from policy import assert_policy
from test_depth_aggregate import DTYPES, check_backward, make_inputs

pytestmark = pytest.mark.cuemu

SHAPES = [  # (l, N, d, C): d = 1, odd, not a multiple of the vector width, > one row of threads
    (1, 1, 1, 1),
    (3, 5, 7, 4),
    (13, 9, 129, 4),
    (2, 3, 4099, 3),
    (25, 4, 2048, 4),
    (5, 6, 300, 6),  # C > 4: two way groups
    (128, 2, 33, 1),
    # N·d a multiple of 8: every slot at the same shift, so the 16-byte path on shifted
    # rows (d not a multiple of the vector width); (2, 3, 4099, 3) above is the scalar path.
    (4, 8, 4099, 4),  # rows at shifts 0-7, a cut first and last chunk in each
    (3, 16, 3, 4),  # d below the vector width: some tokens' rows inside one chunk, some across two
    (2, 8, 300, 1),  # shifts 0 and 4 alternating
]


def _ids(shape):
    return "l%d-N%d-d%d-C%d" % shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("static", [False, True])
def test_forward(cuemu, poisoned, dtype, shape, static):
    l, N, d, C = shape
    S, A = make_inputs(l, (N,), d, C, dtype=dtype, device="cpu", static=static)
    Y = cuemu.depth_aggregate_fwd(S.unbind(0), A)
    assert_policy("Y", Y, ref.depth_aggregate(S, A), ref.depth_aggregate(S.double(), A.double()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("accumulate", [False, True])
def test_backward(cuemu, poisoned, dtype, shape, static, accumulate):
    l, N, d, C = shape
    S, A = make_inputs(l, (N,), d, C, dtype=dtype, device="cpu", static=static)
    dY = torch.randn(C, N, d).to(dtype)
    dS0 = torch.randn(l, N, d).to(dtype)
    dS = dS0.clone() if accumulate else torch.full_like(dS0, float("nan"))
    dA = cuemu.depth_aggregate_bwd(dY, S.unbind(0), A, dS, accumulate)
    check_backward(dS, dA, dY, S, A, dS0, accumulate)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mix", ["separate", "one_misaligned", "one_strided"])
def test_slots_anywhere(cuemu, poisoned, dtype, mix):
    """The slots as separate tensors (a DepthStack's): read where they lie through the
    pointer table; a misaligned slot sends the call down the scalar path, a slot of
    another token stride is copied (kernel_slots) -- the results follow the policy
    either way."""
    l, N, d = 5, 9, 136
    S = [torch.randn(N, d).to(dtype) for _ in range(l)]
    if mix == "one_misaligned":
        S[2] = torch.randn(N * d + 1).to(dtype)[1:].view(N, d)
    elif mix == "one_strided":
        S[3] = torch.randn(N, d + 8).to(dtype)[:, :d]
    A = torch.randn(N, 4, l)
    St = torch.stack(S)
    Y = cuemu.depth_aggregate_fwd(S, A)
    assert_policy("Y", Y, ref.depth_aggregate(St, A), ref.depth_aggregate(St.double(), A.double()))
    dY = torch.randn(4, N, d).to(dtype)
    dS = torch.full((l, N, d), float("nan")).to(dtype)
    dA = cuemu.depth_aggregate_bwd(dY, S, A, dS, False)
    dS_low, dA_low = ref.depth_aggregate_bwd(dY, St, A)
    dS_hi, dA_hi = ref.depth_aggregate_bwd(dY.double(), St.double(), A.double())
    assert_policy("dS", dS, dS_low, dS_hi)
    assert_policy("dA", dA, dA_low, dA_hi)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["stride2", "misaligned"])
def test_strided_layouts(cuemu, poisoned, dtype, layout):
    S, A = make_inputs(6, (7,), 131, 4, dtype=dtype, device="cpu", layout=layout)
    assert not S.is_contiguous()
    Y = cuemu.depth_aggregate_fwd(S.unbind(0), A)
    assert_policy("Y", Y, ref.depth_aggregate(S, A), ref.depth_aggregate(S.double(), A.double()))
    dY = torch.randn(4, 7, 131).to(dtype)
    dS = torch.full_like(S, float("nan"))  # same strides as S
    dA = cuemu.depth_aggregate_bwd(dY, S.unbind(0), A, dS, False)
    dS_low, dA_low = ref.depth_aggregate_bwd(dY, S, A)
    dS_hi, dA_hi = ref.depth_aggregate_bwd(dY.double(), S.double(), A.double())
    assert_policy("dS", dS, dS_low, dS_hi)
    assert_policy("dA", dA, dA_low, dA_hi)




@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C", [1, 4])
def test_backward_vector_path_with_cut_chunk(cuemu, poisoned, dtype, C):
    """d = 131 in rows padded to 136 for S, dY and dS: the backward takes the vector
    path (16-byte chunks, slots in batches) with a chunk cut by d at each row end and
    idle lanes past it; l = 6 leaves a part-empty slot batch. dS (= and +=) is written
    through its view and nowhere else."""
    l, N, d, row = 6, 5, 131, 136
    S, A = make_inputs(l, (N,), row, C, dtype=dtype, device="cpu")
    S = S[..., :d]
    dY = torch.randn(C, N, row).to(dtype)[..., :d]
    for accumulate in (False, True):
        buf = torch.randn(l, N, row).to(dtype)
        untouched = buf.clone()
        dS = buf[..., :d]
        dS0 = dS.clone()
        if not accumulate:
            dS.fill_(float("nan"))
        dA = cuemu.depth_aggregate_bwd(dY, S.unbind(0), A, dS, accumulate)
        dS_low, dA_low = ref.depth_aggregate_bwd(dY, S, A)
        dS_hi, dA_hi = ref.depth_aggregate_bwd(dY.double(), S.double(), A.double())
        if accumulate:
            dS_low, dS_hi = dS_low + dS0, dS_hi + dS0.double()
        assert_policy("dS", dS, dS_low, dS_hi)
        assert_policy("dA", dA, dA_low, dA_hi)
        untouched[..., :d] = dS
        assert torch.equal(buf, untouched), "dS written outside its view"
