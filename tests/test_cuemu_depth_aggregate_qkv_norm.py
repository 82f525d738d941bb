"""depth_aggregate_qkv_norm's CUDA launchers and kernels on the CPU emulator (tools/cuemu).

The launchers (csrc/depth_aggregate_qkv_norm.cu) and kernels
(csrc/kernels/depth_aggregate_qkv_norm.cuh) run unchanged on CPU tensors, called the way the
custom ops in crosslayer/ops/depth_aggregate_qkv_norm.py call them; every result (Out, rstd,
dS written and accumulated, dA, dnorm_weights) is held to DESIGN.md's policy against the
float64 oracle, outputs poisoned with NaN, for every dtype, static and per-token weights,
the GPU tests' odd sizes (d = 1, 7, 129, 2048, 4099; l = 1 .. 128) at small N, the
backward with its slots staged in shared memory and without (l = 40 at d = 2048), block
configurations with unused token rows and partly idle warps, strided and misaligned slots
(the scalar path), shifted rows (any d on the 16-byte path), strided dOut / dS, the global-workspace path (row buffers too big for
shared memory), the persistent grid's token loop, and the launchers' messages. What only
a GPU shows (speed, streams, graphs, compile) stays with the `gpu` tests in
test_depth_aggregate_qkv_norm.py.
"""

import pytest
import torch

from crosslayer.ops.depth_aggregate_qkv_norm import _rstd
from policy import assert_policy, oracle_pair
from test_depth_aggregate_qkv_norm import DTYPES, EPS, F64, check_backward, eps_for, fwd_oracle, make_inputs

pytestmark = pytest.mark.cuemu

SHAPES = [  # (l, N, d) and the block (threads_x x rows) the launcher picks
    # An odd d with N·d not a multiple of 8: the slots of the stack start at different
    # shifts from a 16-byte boundary, so the scalar path (kVec = 1).
    (1, 1, 1),  # 32 x 1, one token
    (3, 13, 7),  # 32 x 8: the second block has 5 of 8 token rows
    (25, 9, 129),  # 160 x 1: warp 4 has one lane with a feature
    (128, 2, 33),  # 64 x 2, warp 1 one lane; the largest l: weight tile and P/Q partials
    (2, 2, 4099),  # 256 x 1: 17 passes over d, 3 lanes busy in the last
    # The vector path (16-byte chunks): d a multiple of 8.
    (5, 11, 64),  # 32 x 8 (bf16: 8 lanes, fp64: 32): the second block has 3 rows
    (4, 2, 2048),  # 256 x 1: one pass (bf16), two (fp32), four (fp64), no idle lane
    # 256 x 1 with 40 slots: the backward's slot stage (40 x 256 x 16 B) would leave room
    # for one block an SM, so its second pass over the slots re-reads S (kStage false);
    # every shape above stages them.
    (40, 3, 2048),
    # Shifted rows: d not a multiple of 8 but N·d one, so every slot starts at the same
    # shift and each token's rows at theirs (0-7): the 16-byte path with a cut first and
    # last chunk per row, g, stash and dg element by element (kShifted).
    (3, 8, 7),  # 32 x 8: rows inside one chunk or across two
    (25, 8, 129),  # 32 x 8 (bf16): the span d + 7 in 17 chunks, lanes 0-16 busy
    (2, 8, 4099),  # 256 x 1: three passes, in the first only warp 0's chunks are cut
    (40, 8, 2050),  # 256 x 1, two passes, no slot stage
]


def _ids(shape):
    return "l%d-N%d-d%d" % shape


def _check_forward(cuemu, S, A, g, eps):
    """The forward launcher on (l, N, d) S: Out and rstd against the oracle."""
    Out, rstd = cuemu.depth_aggregate_qkv_norm_fwd(S.unbind(0), A, g, eps)
    assert_policy("Out", Out, *oracle_pair(lambda *t: fwd_oracle(*t, eps), S, A, g))
    assert_policy("rstd", rstd, _rstd(S, A, eps), _rstd(S.double(), A.double(), eps))
    return rstd


def _check_backward(cuemu, S, A, g, dtype, accumulate, *, dOut=None, dS=None, eps=None, rstd=None):
    """The backward launcher: dS (= or +=), dA, dnorm_weights against the oracle.
    `dS`: the tensor the launcher mutates (any strides; its values are the ones
    accumulated into), a fresh contiguous one by default. `rstd`: the forward's
    (3, N) output; by default the oracle's (what the op's CPU path saves), which the
    forward tests hold the kernel's rstd to, so that a backward test runs one launch."""
    l, N, d = S.shape
    eps = eps_for(d) if eps is None else eps
    if rstd is None:
        rstd = _rstd(S, A, eps)
    if dOut is None:
        dOut = torch.randn(4, N, d).to(dtype)
    if dS is None:
        dS = torch.randn(l, N, d).to(dtype)
    dS0 = dS.clone()
    if not accumulate:
        dS.fill_(float("nan"))  # every element must be written
    dA, dg = cuemu.depth_aggregate_qkv_norm_bwd(dOut, S.unbind(0), A, g, rstd, dS, accumulate)
    assert dA.shape == A.shape and dA.dtype == A.dtype
    assert dg.shape == g.shape and dg.dtype == g.dtype
    check_backward(dS, dA, dg, dOut, S, A, g, dS0, accumulate, eps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("static", [False, True])
def test_forward(cuemu, poisoned, dtype, shape, static):
    l, N, d = shape
    S, A, g = make_inputs(l, (N,), d, dtype=dtype, device="cpu", static=static)
    _check_forward(cuemu, S, A, g, eps_for(d))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("accumulate", [False, True])
def test_backward(cuemu, poisoned, dtype, shape, static, accumulate):
    l, N, d = shape
    S, A, g = make_inputs(l, (N,), d, dtype=dtype, device="cpu", static=static)
    _check_backward(cuemu, S, A, g, dtype, accumulate)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["stride2", "misaligned", "slot_minor"])
def test_strided_layouts(cuemu, poisoned, dtype, layout):
    """Slots that are views of a bigger stack. d = 131 with stride2 / misaligned: the
    scalar path (strides or base not a multiple of the vector width); slot_minor
    (token stride l·d, slot stride d) with d = 136, per-token weights transposed
    (slot stride 4): the vector path on out-of-order strides. (The GPU tests'
    tokens_transposed layout is a copy made by the op's reshape before the launcher.)"""
    l, N = 6, 7
    if layout == "slot_minor":
        d = 136
        S = torch.randn(N, l, d).to(dtype).transpose(0, 1)
        A = torch.randn(N, l, 4, dtype=F64 if dtype == F64 else torch.float32).transpose(1, 2)
        g = 1 + 0.5 * torch.randn(3, d, dtype=A.dtype)
        assert not A.is_contiguous()
    else:
        S, A, g = make_inputs(l, (N,), 131, dtype=dtype, device="cpu", layout=layout)
    assert not S.is_contiguous()
    _check_forward(cuemu, S, A, g, EPS)
    _check_backward(cuemu, S, A, g, dtype, False, eps=EPS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["scalar", "vector", "vector_tail", "dout_misaligned"])
def test_strided_gradients(cuemu, poisoned, dtype, layout):
    """dOut a strided view (way and token strides padded), dS every other slot of a
    bigger buffer (written in place through its strides, nothing outside it).
    scalar: d = 131, odd strides; vector: d = 136; vector_tail: d = 131 in rows padded
    to 136 for S, dOut and dS, so the backward takes the vector path with a cut chunk
    at each row end and idle lanes past it (the forward cannot: its own output is
    dense); dout_misaligned: d = 136, S and dS aligned, dOut's base one element off,
    so dOut alone sends the launch to the scalar path."""
    l, N = 5, 6
    d = 131 if layout in ("scalar", "vector_tail") else 136
    row = 136 if layout == "vector_tail" else d
    S, A, g = make_inputs(l, (N,), row, dtype=dtype, device="cpu")
    S, g = S[..., :d], g[:, :d].contiguous()
    if layout == "dout_misaligned":
        dOut = torch.randn(4, N, d + 1).to(dtype)[..., 1:]
    else:
        dOut = torch.randn(5, N, row + 8).to(dtype)[1:, :, :d]
    assert not dOut.is_contiguous()
    for accumulate in (False, True):
        buf = torch.randn(2 * l, N, row).to(dtype)
        untouched = buf.clone()
        _check_backward(cuemu, S, A, g, dtype, accumulate, dOut=dOut, dS=buf[::2, :, :d], eps=EPS)
        untouched[::2, :, :d] = buf[::2, :, :d]
        assert torch.equal(buf, untouched), "dS written outside its view"


@pytest.mark.parametrize("dtype, static", [(torch.bfloat16, False), (torch.float16, True)])
def test_low_precision_weights(cuemu, poisoned, dtype, static):
    """A and norm_weights in the activation dtype (a model cast with .to(bf16)): the
    launchers widen them to fp32 and hand dA and dnorm_weights back in their dtypes."""
    S, A, g = make_inputs(3, (10,), 70, dtype=dtype, device="cpu", static=static)
    A, g = A.to(dtype), g.to(dtype)
    rstd = _check_forward(cuemu, S, A, g, EPS)
    _check_backward(cuemu, S, A, g, dtype, True, eps=EPS, rstd=rstd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_global_workspace_path(cuemu, poisoned, dtype):
    """d so large that the rows' stash and dg buffers leave shared memory for global
    workspaces (fp32 accumulators: 2·3·d·4 bytes > 227 KB in the backward, 3·d·4 in
    the forward), as the GPU test does, at N = 2."""
    d = 12_008 if dtype != F64 else 6_008  # backward buffers global, forward's in smem; vector path
    S, A, g = make_inputs(2, (2,), d, dtype=dtype, device="cpu")
    rstd = _check_forward(cuemu, S, A, g, EPS)
    _check_backward(cuemu, S, A, g, dtype, True, eps=EPS, rstd=rstd)
    d = 20_011 if dtype != F64 else 10_007  # the forward's stash global too; scalar path
    S, A, g = make_inputs(2, (2,), d, dtype=dtype, device="cpu", static=True)
    _check_forward(cuemu, S, A, g, EPS)


def test_persistent_grid_loops_over_tokens(cuemu, poisoned):
    """More tokens than the persistent grid holds at once (132 SMs x 8 blocks of 8 token
    rows for d = 7): some rows take a second token, so the dg partial of a row sums two
    tokens and the tile barriers are crossed again."""
    l, d = 2, 7
    N = 132 * 8 * 8 + 29
    S, A, g = make_inputs(l, (N,), d, dtype=torch.float32, device="cpu")
    rstd = _check_forward(cuemu, S, A, g, EPS)
    _check_backward(cuemu, S, A, g, torch.float32, True, eps=EPS, rstd=rstd)


def test_empty_shapes(cuemu):
    S = torch.randn(3, 0, 8)
    Out, rstd = cuemu.depth_aggregate_qkv_norm_fwd(S.unbind(0), torch.randn(0, 4, 3), torch.randn(3, 8), EPS)
    assert Out.shape == (4, 0, 8) and rstd.shape == (3, 0)
    S = torch.randn(3, 4, 0)
    A = torch.randn(4, 4, 3)
    g = torch.randn(3, 0)
    Out, rstd = cuemu.depth_aggregate_qkv_norm_fwd(S.unbind(0), A, g, EPS)
    assert Out.shape == (4, 4, 0)
    torch.testing.assert_close(rstd, torch.full((3, 4), EPS ** -0.5))
    dS = torch.full((3, 4, 0), float("nan"))
    dA, dg = cuemu.depth_aggregate_qkv_norm_bwd(torch.randn(4, 4, 0), S.unbind(0), A, g, rstd, dS, False)
    assert torch.equal(dA, torch.zeros_like(A)) and dg.shape == (3, 0)
    S = torch.randn(3, 0, 8)  # no tokens, static weights: dA and dg are sums over nothing
    A = torch.randn(4, 3)
    dA, dg = cuemu.depth_aggregate_qkv_norm_bwd(torch.randn(4, 0, 8), S.unbind(0), A, torch.randn(3, 8), torch.ones(3, 0),
                                            torch.empty(3, 0, 8), True)
    assert torch.equal(dA, torch.zeros(4, 3)) and torch.equal(dg, torch.zeros(3, 8))




@pytest.mark.parametrize("static", [False, True])
def test_dA_whose_terms_cancel(cuemu, poisoned, static):
    """l = 1, d = 7, bf16 over 60 seeds: S_0 is parallel to Y, so every dA sums terms
    that cancel to ~1/1000 of their magnitude (seed 19 with static weights: |dA| 2.45
    from terms of 2750). The kernel's r·P − k·Q is another association of those terms;
    check_backward bounds its rounding relative to them (the default bound, relative to
    |dA|, failed seed 19 at 7.7e-5 against 3.7e-5 while the error was 3e-8 of the terms)."""
    for seed in range(60):
        torch.manual_seed(seed)
        S, A, g = make_inputs(1, (37,), 7, dtype=torch.bfloat16, device="cpu", static=static)
        _check_backward(cuemu, S, A, g, torch.bfloat16, False)
