"""The JIT path's launch plans against the C++ launchers' (crosslayer._jit.depth_aggregate
and depth_aggregate_qkv_norm vs csrc/depth_aggregate.cu, depth_aggregate_qkv_norm.cu):
every dtype, one way / ways in groups of 4, 1 to 128 slots, odd d, no to a few thousand
tokens, slot lists of one stack, separate tensors, interleaved, misaligned or of
different layouts (the 16-byte, shifted and scalar paths; kernel_slots' copies), static
and per-token weights, permuted / strided / misaligned gradients, dS written or
accumulated, and for the normed op every shared-memory regime of its block (the slot
stage, the row buffers in shared memory above 48 KB or in global workspaces) with the
persistent grid over SM counts (tests/jit_plan_support.py compares)."""

import pytest
import torch

from crosslayer._jit.depth_aggregate_qkv_norm import DepthAggregateQkvNormParams
from jit_plan_support import cpp_launches, emulator, jit_launches, same_plans

pytestmark = pytest.mark.cuemu
__all__ = ["emulator"]  # the fixture

EPS = 3e-5  # not the default, so it must reach the params


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def slots(dtype, l, N, d, layout):
    """l slots (N, d): "stack" (a stack's unbind: one token stride), "separate" (one
    tensor each), "token_major" ((N, l, d) unbound along l: interleaved rows), "misaligned"
    (a stack one element off 16 bytes: the shifted path when the rows keep one shift),
    "odd_shift" (separate, the last one element off: the scalar path), "mixed" (a stack's
    slots and one sliced from a wider tensor: another token stride, copied),
    "feature_strided" (one slot every other feature: copied), "transposed" (every slot a
    transposed (d, N): all copied)."""
    if layout == "stack":
        return list(torch.randn((l, N, d), dtype=dtype).unbind(0))
    if layout == "separate":
        return [torch.randn((N, d), dtype=dtype) for _ in range(l)]
    if layout == "token_major":
        return list(torch.randn((N, l, d), dtype=dtype).unbind(1))
    if layout == "misaligned":
        return list(torch.randn(l * N * d + 1, dtype=dtype)[1:].view(l, N, d).unbind(0))
    if layout == "odd_shift":
        return [torch.randn((N, d), dtype=dtype) for _ in range(l - 1)] + \
            [torch.randn(N * d + 1, dtype=dtype)[1:].view(N, d)]
    if layout == "mixed":
        return list(torch.randn((l - 1, N, d), dtype=dtype).unbind(0)) + [torch.randn((N, d + 3), dtype=dtype)[:, :d]]
    if layout == "feature_strided":
        return [torch.randn((N, 2 * d), dtype=dtype)[:, ::2]] + list(torch.randn((l - 1, N, d), dtype=dtype).unbind(0))
    if layout == "transposed":
        return [torch.randn((d, N), dtype=dtype).t() for _ in range(l)]
    raise ValueError(layout)


def weights(N, C, l, static, dtype=torch.float32, layout="contiguous"):
    """A (C, l) or (N, C, l); "permuted": per token from (C, N, l), static from (l, C)."""
    if layout == "permuted":
        return (torch.randn((l, C), dtype=dtype).t() if static
                else torch.randn((C, N, l), dtype=dtype).transpose(0, 1))
    return torch.randn((C, l) if static else (N, C, l), dtype=dtype)


def rows(shape, dtype, layout="contiguous"):
    """A gradient (R, N, d) (dY, dOut, dS): "permuted" from (N, R, d), "feature_strided",
    "misaligned" (one element off 16 bytes), "padded" (token stride d + 3), "row_gap" (the
    R rows of a token by N·d + 1: token strides aligned, the stride between rows not)."""
    R, N, d = shape
    if layout == "permuted":
        return torch.randn((N, R, d), dtype=dtype).transpose(0, 1)
    if layout == "feature_strided":
        return torch.randn((R, N, 2 * d), dtype=dtype)[..., ::2]
    if layout == "misaligned":
        return torch.randn(R * N * d + 1, dtype=dtype)[1:].view(R, N, d)
    if layout == "padded":
        return torch.randn((R, N, d + 3), dtype=dtype)[..., :d]
    if layout == "row_gap":
        return torch.randn((R, N * d + 1), dtype=dtype)[:, :N * d].view(R, N, d)
    return torch.randn(shape, dtype=dtype)


# dtype, l, N, d, C, static, slot layout
CASES = [
    (torch.float32, 3, 10, 64, 4, False, "stack"),
    (torch.float32, 1, 7, 33, 1, True, "stack"),
    (torch.float64, 5, 9, 20, 2, False, "separate"),
    (torch.float16, 4, 6, 40, 4, True, "token_major"),
    (torch.float16, 3, 6, 37, 4, False, "token_major"),
    (torch.bfloat16, 2, 12, 129, 7, False, "stack"),
    (torch.bfloat16, 6, 5, 24, 4, True, "misaligned"),
    (torch.bfloat16, 3, 8, 37, 4, False, "stack"),  # shifted rows: odd d, N·d a multiple of 8
    (torch.float32, 4, 4, 33, 4, True, "stack"),
    (torch.float32, 3, 4, 127, 4, False, "stack"),  # shifted: the cut first chunk takes a 33rd lane
    (torch.bfloat16, 2, 8, 255, 1, True, "stack"),
    (torch.bfloat16, 3, 5, 24, 1, False, "odd_shift"),
    (torch.float32, 4, 8, 16, 3, True, "mixed"),
    (torch.bfloat16, 4, 8, 48, 4, False, "feature_strided"),
    (torch.float64, 3, 4, 5, 4, False, "transposed"),
    (torch.bfloat16, 128, 3, 16, 4, False, "stack"),
    (torch.float64, 128, 2, 8, 4, True, "stack"),
    (torch.float64, 17, 2, 8, 1, False, "separate"),
    (torch.bfloat16, 2, 1, 300, 4, False, "stack"),
    (torch.float32, 2, 2000, 8, 4, True, "stack"),
    (torch.bfloat16, 2, 3, 3000, 4, False, "stack"),
    (torch.float16, 2, 4, 1, 1, False, "separate"),
    (torch.float16, 3, 0, 16, 4, False, "stack"),
    (torch.float32, 2, 5, 0, 4, True, "stack"),
]
CASE_IDS = [f"{str(c[0])[6:]}-l{c[1]}-N{c[2]}-d{c[3]}-C{c[4]}-{'static' if c[5] else 'tok'}-{c[6]}" for c in CASES]


@pytest.mark.parametrize("dtype,l,N,d,C,static,layout", CASES, ids=CASE_IDS)
def test_depth_aggregate_plans_match(emulator, dtype, l, N, d, C, static, layout):
    S = slots(dtype, l, N, d, layout)
    A = weights(N, C, l, static, acc_of(dtype))
    same_plans(emulator, "depth_aggregate_fwd", S, A)
    dY = rows((C, N, d), dtype)
    for accumulate in (False, True):
        same_plans(emulator, "depth_aggregate_bwd", dY, S, A, rows((l, N, d), dtype), accumulate)


# Operands apart from the slots: weights converted or strided, dY / dS in layouts that keep
# or lose the 16-byte path (dY is copied when its features are strided, dS never).
OPERANDS = {
    "A_bf16": dict(a_dtype=torch.bfloat16),
    "A_permuted": dict(a_layout="permuted"),
    "A_static_permuted": dict(a_layout="permuted", static=True),
    "dY_permuted": dict(dy="permuted"),
    "dY_feature_strided": dict(dy="feature_strided"),
    "dY_misaligned": dict(dy="misaligned"),
    "dS_permuted": dict(ds="permuted"),
    "dS_misaligned": dict(ds="misaligned"),
    "dS_padded": dict(ds="padded"),
    "dS_row_gap": dict(ds="row_gap"),
    "dY_row_gap": dict(dy="row_gap"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", list(OPERANDS))
def test_depth_aggregate_operand_plans_match(emulator, dtype, variant):
    kw = OPERANDS[variant]
    l, N, d, C = 3, 6, 40, 4
    S = slots(dtype, l, N, d, "stack")
    A = weights(N, C, l, kw.get("static", False), kw.get("a_dtype", acc_of(dtype)), kw.get("a_layout", "contiguous"))
    same_plans(emulator, "depth_aggregate_fwd", S, A)
    for accumulate in (False, True):
        same_plans(emulator, "depth_aggregate_bwd", rows((C, N, d), dtype, kw.get("dy", "contiguous")), S, A,
              rows((l, N, d), dtype, kw.get("ds", "contiguous")), accumulate)


def qkv_norm_args(dtype, l, N, d, static, layout="stack", a_dtype=None, g_dtype=None):
    S = slots(dtype, l, N, d, layout)
    A = weights(N, 4, l, static, a_dtype or acc_of(dtype))
    g = torch.randn((3, d), dtype=g_dtype or dtype)
    return S, A, g


def qkv_norm_plans(emulator, dtype, l, N, d, static, layout="stack", a_dtype=None, g_dtype=None, rstd="contiguous",
                   dout="contiguous", ds="contiguous"):
    S, A, g = qkv_norm_args(dtype, l, N, d, static, layout, a_dtype, g_dtype)
    same_plans(emulator, "depth_aggregate_qkv_norm_fwd", S, A, g, EPS)
    r = torch.rand((N, 3), dtype=acc_of(dtype)).t() if rstd == "transposed" else \
        torch.rand((3, N), dtype=torch.bfloat16 if rstd == "bf16" else acc_of(dtype))
    for accumulate in (False, True):
        same_plans(emulator, "depth_aggregate_qkv_norm_bwd", rows((4, N, d), dtype, dout), S, A, g, r,
              rows((l, N, d), dtype, ds), accumulate)


@pytest.mark.parametrize("dtype,l,N,d,C,static,layout", [c for c in CASES if c[4] == 4],
                         ids=[i for i, c in zip(CASE_IDS, CASES) if c[4] == 4])
def test_depth_aggregate_qkv_norm_plans_match(emulator, dtype, l, N, d, C, static, layout):
    qkv_norm_plans(emulator, dtype, l, N, d, static, layout)


QKV_OPERANDS = {
    "A_bf16": dict(a_dtype=torch.bfloat16),
    "g_fp64": dict(g_dtype=torch.float64),
    "g_bf16": dict(g_dtype=torch.bfloat16),
    "rstd_bf16": dict(rstd="bf16"),
    "rstd_transposed": dict(rstd="transposed"),
    "dOut_permuted": dict(dout="permuted"),
    "dOut_feature_strided": dict(dout="feature_strided"),
    "dOut_misaligned": dict(dout="misaligned"),
    "dS_permuted": dict(ds="permuted"),
    "dS_misaligned": dict(ds="misaligned"),
    "dS_padded": dict(ds="padded"),
    "dS_row_gap": dict(ds="row_gap"),
    "dOut_row_gap": dict(dout="row_gap"),
    "slots_odd_shift": dict(layout="odd_shift"),
    "slots_misaligned": dict(layout="misaligned"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", list(QKV_OPERANDS))
def test_depth_aggregate_qkv_norm_operand_plans_match(emulator, dtype, variant):
    qkv_norm_plans(emulator, dtype, 3, 6, 40, False, **QKV_OPERANDS[variant])


def qkv_norm_regime(emulator, fn, *args):
    """(slot stage, bufs_in_smem, dynamic smem, grid) of the one launch of `fn`, the C++ and
    JIT plans compared first."""
    same_plans(emulator, fn, *args)
    (launch,) = jit_launches(emulator, fn, *args)
    p = DepthAggregateQkvNormParams.from_buffer_copy(launch.args)
    return launch.kernel.endswith("true>") and "bwd" in launch.kernel, bool(p.bufs_in_smem), launch.smem, launch.grid[0]


# The block's shared-memory regimes on the emulated device (227 KB opt-in, 228 KB an SM):
# dtype, l, N, d, and the (stage, bufs_in_smem) expected of the forward and the backward.
# (The forward's fewer-rows step is not reachable there: the buffers of a multi-row block
# fit any opt-in limit of 64 KB or more.)
REGIMES = [
    (torch.bfloat16, 4, 4, 512, (False, True), (True, True)),       # the stage with the buffers
    (torch.bfloat16, 16, 8, 256, (False, True), (True, False)),     # the stage alone
    (torch.bfloat16, 27, 8, 8, (False, True), (False, True)),       # no stage (l > 26)
    (torch.float32, 26, 8, 8, (False, True), (False, True)),        # no stage: 8 rows' stage too big
    (torch.float32, 27, 1, 9400, (False, True), (False, False)),    # no stage, buffers global; fwd > 48 KB
    (torch.float64, 25, 1, 4600, (False, True), (False, False)),
    (torch.float32, 1, 2, 5000, (False, True), (True, False)),      # fwd 60 KB (opt-in)
    (torch.float32, 1, 2, 20000, (False, False), (True, False)),    # fwd buffers global
    (torch.float64, 2, 3, 10000, (False, False), (True, False)),
    (torch.bfloat16, 128, 2, 8, (False, True), (False, True)),
]


@pytest.mark.parametrize("dtype,l,N,d,fwd,bwd", REGIMES,
                         ids=[f"{str(r[0])[6:]}-l{r[1]}-N{r[2]}-d{r[3]}" for r in REGIMES])
def test_depth_aggregate_qkv_norm_smem_regimes(emulator, dtype, l, N, d, fwd, bwd):
    S, A, g = qkv_norm_args(dtype, l, N, d, True)
    assert qkv_norm_regime(emulator, "depth_aggregate_qkv_norm_fwd", S, A, g, EPS)[:2] == fwd
    dOut = rows((4, N, d), dtype)
    r = torch.rand((3, N), dtype=acc_of(dtype))
    assert qkv_norm_regime(emulator, "depth_aggregate_qkv_norm_bwd", dOut, S, A, g, r, rows((l, N, d), dtype),
                           True)[:2] == bwd


# The persistent grid: what the SMs hold at once (at most 4 blocks an SM with the buffers
# in global workspaces), every block row a workspace slice.
@pytest.mark.parametrize("sms", [1, 3, 132])
def test_depth_aggregate_qkv_norm_sms(emulator, sms):
    count_mod, counter, _ = emulator
    with count_mod.device_sms(counter, sms):
        S, A, g = qkv_norm_args(torch.bfloat16, 3, 2000, 8, False)
        _, _, smem, grid = qkv_norm_regime(emulator, "depth_aggregate_qkv_norm_fwd", S, A, g, EPS)
        assert grid == min(250, counter.occupancy(256, smem) * sms)  # 8 rows a block
        r = torch.rand((3, 2000))
        qkv_norm_regime(emulator, "depth_aggregate_qkv_norm_bwd", rows((4, 2000, 8), torch.bfloat16), S, A, g, r,
                        rows((3, 2000, 8), torch.bfloat16), False)
        S, A, g = qkv_norm_args(torch.float64, 1, 6, 10000, True)
        _, in_smem, _, grid = qkv_norm_regime(emulator, "depth_aggregate_qkv_norm_fwd", S, A, g, EPS)
        assert not in_smem and grid == min(6, 4 * sms)


def test_depth_aggregate_qkv_norm_empty(emulator):
    """No tokens, no features (the forward's rstd = rsqrt(eps)): no launch either side."""
    for N, d in ((0, 16), (5, 0)):
        for static in (False, True):
            qkv_norm_plans(emulator, torch.float32, 2, N, d, static)
    S, A, g = qkv_norm_args(torch.float32, 2, 5, 0, False)
    assert cpp_launches(emulator, "depth_aggregate_qkv_norm_fwd", S, A, g, EPS) == []
