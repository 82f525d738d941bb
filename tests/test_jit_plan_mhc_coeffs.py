"""The JIT path's launch plans against the C++ launchers' (crosslayer._jit.mhc_coeffs vs
csrc/mhc_coeffs.cu) for mhc_coeffs_fwd, mhc_pre_fwd and mhc_coeffs_bwd: both paths
(tensor cores for 16-bit H with d >= 32, at::mm otherwise), every dtype, n = 1..16 (the
n = 4 and generic instantiations), odd d, no to a few thousand tokens (token groups),
permuted / misaligned / uncollapsible / feature-strided layouts, parameters that need
a copy, SM counts, Sinkhorn iterations (the scale buffer in shared or global memory)
and every optional gradient (tests/jit_plan_support.py compares)."""

import pytest
import torch

from jit_plan_support import emulator, same_plans, streams

pytestmark = pytest.mark.cuemu
__all__ = ["emulator"]  # the fixture

# eps, pre_eps, post_mult, sinkhorn_eps: none of them the default, so each must reach the params.
EPS, PRE_EPS, POST_MULT, SINKHORN_EPS = 2e-5, 3e-4, 1.75, 5e-6


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def layout_streams(dtype, lead, n, d, layout):
    """streams() of jit_plan_support (H (n, d) for lead ()), and layouts it lacks, which no
    TokenLayout addresses (a copy or a scratch): "sliced" (four token dims, each > 1,
    sliced from a bigger tensor: three strided dims), "scrambled" (three token dims, each
    > 1, dense but permuted: empty_like keeps it) and "feature_strided" (every other
    feature)."""
    if layout == "sliced":
        a, b, c, e = lead  # each > 1
        return torch.randn((a, b + 1, c, e + 1, n, d), dtype=dtype)[:, :b, :, :e]
    if layout == "scrambled":
        a, b, c = lead  # each > 1
        return torch.randn((b, a, c, n, d), dtype=dtype).permute(1, 0, 2, 3, 4)
    if layout == "feature_strided":
        return torch.randn((*lead, n, 2 * d), dtype=dtype)[..., ::2]
    if not lead:
        return torch.randn((n, d), dtype=dtype)
    return streams(dtype, lead, n, d, layout)


def mhc_parameters(n, d, acc, kind="plain"):
    """phi, a_pre, a_post, a_res, b. kind: "plain" (the accumulator dtype, contiguous:
    read where they lie), "bf16" (every one converted), "strided" (phi transposed, b a
    strided view: copies), "misaligned" (fp32 phi 4 bytes off 16: fp32_rows_ld4's clone)."""
    M = n * n + 2 * n
    dtype = torch.bfloat16 if kind == "bf16" else acc
    if kind == "strided":
        phi = torch.randn((M, n * d), dtype=dtype).t() * 0.05
        b = torch.randn((M, 2), dtype=dtype)[:, 0]
    elif kind == "misaligned":
        phi = torch.randn(n * d * M + 1, dtype=torch.float32)[1:].view(n * d, M) * 0.05
        b = torch.randn(M, dtype=dtype)
    else:
        phi = torch.randn((n * d, M), dtype=dtype) * 0.05
        b = torch.randn(M, dtype=dtype)
    a = [torch.tensor(v, dtype=dtype) for v in (0.7, 0.4, 1.3)]
    return (phi, *a, b)


def floats(iters):
    return EPS, PRE_EPS, POST_MULT, iters, SINKHORN_EPS


def saved(lead, n, acc):
    """u (*lead, n²+2n) and r (*lead) of the forward (values do not matter to the plan)."""
    return torch.randn((*lead, n * n + 2 * n), dtype=acc), torch.rand(lead, dtype=acc) + 0.5


# dtype, lead, n, d, layout
CASES = [
    (torch.float32, (5,), 4, 7, "contiguous"),
    (torch.float64, (3, 2), 16, 5, "permuted"),
    (torch.float32, (2, 3, 3, 4), 3, 9, "sliced"),
    (torch.float16, (7,), 3, 33, "contiguous"),
    (torch.bfloat16, (40,), 4, 64, "contiguous"),
    (torch.bfloat16, (6,), 2, 64, "misaligned"),
    (torch.float16, (2, 5), 4, 48, "streams_outer"),
    (torch.bfloat16, (3, 2), 16, 32, "permuted"),
    (torch.bfloat16, (2, 3, 3, 4), 4, 40, "sliced"),
    (torch.float16, (3, 4, 2), 2, 32, "scrambled"),
    (torch.float32, (), 3, 5, "contiguous"),
    (torch.float16, (4,), 2, 8, "contiguous"),
    (torch.float16, (5,), 8, 40, "feature_strided"),
    (torch.bfloat16, (), 4, 40, "contiguous"),
    (torch.bfloat16, (9,), 1, 129, "contiguous"),
    (torch.bfloat16, (5,), 4, 31, "contiguous"),
    (torch.float16, (100,), 8, 32, "contiguous"),
    (torch.float16, (1, 1), 4, 2048, "contiguous"),
    (torch.float32, (2000,), 4, 16, "contiguous"),
    (torch.bfloat16, (1000,), 4, 32, "contiguous"),
    (torch.bfloat16, (0,), 4, 64, "contiguous"),
    (torch.float32, (0, 3), 3, 7, "contiguous"),
]
CASE_IDS = [f"{str(c[0])[6:]}-{'x'.join(map(str, c[1])) or 'one'}-n{c[2]}-d{c[3]}-{c[4]}" for c in CASES]


@pytest.mark.parametrize("dtype,lead,n,d,layout", CASES, ids=CASE_IDS)
def test_mhc_coeffs_fwd_plans_match(emulator, dtype, lead, n, d, layout):
    H = layout_streams(dtype, lead, n, d, layout)
    params = mhc_parameters(n, d, acc_of(dtype))
    same_plans(emulator, "mhc_coeffs_fwd", H, *params, *floats(20))
    same_plans(emulator, "mhc_pre_fwd", H, *params, *floats(3))


# accumulate, prior, dalpha, dbeta, dpre, dx: the ops' uses (mhc_coeffs' backward: dalpha,
# dbeta; the pre's: accumulate with dpre and dx; the boundary's composed backward: prior)
# and the rest of the combinations.
GRADS = {
    "coeffs": (False, False, True, True, False, False),
    "pre": (True, False, True, True, True, True),
    "boundary": (False, True, True, True, True, True),
    "none": (False, False, False, False, False, False),
    "dbeta_dx": (False, False, False, True, False, True),
    "accumulate_dalpha": (True, False, True, False, False, False),
    "prior_dpre": (False, True, False, False, True, False),
}


def backward_args(dtype, lead, n, d, layout, grads, iters=20, params="plain", grad_dtype=None,
                  dh_layout=None, prior_layout=None, dx_layout="contiguous"):
    """The arguments of mhc_coeffs_bwd; dH in dh_layout (H's by default), the prior in
    prior_layout, dx contiguous or misaligned, the per-token gradients in grad_dtype
    (the accumulator dtype by default)."""
    accumulate, with_prior, with_dalpha, with_dbeta, with_dpre, with_dx = GRADS[grads]
    acc = acc_of(dtype)
    gd = grad_dtype or acc
    H = layout_streams(dtype, lead, n, d, layout)
    dH = layout_streams(dtype, lead, n, d, dh_layout or layout)
    prior = layout_streams(dtype, lead, n, d, prior_layout or layout) if with_prior else None
    dalpha = torch.randn((*lead, n, n + 1), dtype=gd) if with_dalpha else None
    dbeta = torch.randn((*lead, n), dtype=gd) if with_dbeta else None
    dpre = torch.randn((*lead, n), dtype=gd) if with_dpre else None
    dx = None
    if with_dx:
        N = 1
        for s in lead:
            N *= s
        dx = (torch.randn(N * d + 1, dtype=dtype)[1:].view(*lead, d) if dx_layout == "misaligned"
              else torch.randn((*lead, d), dtype=dtype))
    u, r = saved(lead, n, acc)
    return (dH, accumulate, prior, dalpha, dbeta, dpre, dx, H, *mhc_parameters(n, d, acc, params), u, r,
            *floats(iters))


# The ops' uses on every case, the other combinations on a few.
FEW = ("float32-5-n4-d7-contiguous", "float16-7-n3-d33-contiguous", "bfloat16-40-n4-d64-contiguous",
       "bfloat16-3x2-n16-d32-permuted", "bfloat16-2x3x3x4-n4-d40-sliced")
BWD = [(i, grads) for i in range(len(CASES)) for grads in GRADS
       if grads in ("coeffs", "pre", "boundary") or CASE_IDS[i] in FEW]


@pytest.mark.parametrize("case,grads", [(CASES[i], g) for i, g in BWD], ids=[f"{CASE_IDS[i]}-{g}" for i, g in BWD])
def test_mhc_coeffs_bwd_plans_match(emulator, case, grads):
    same_plans(emulator, "mhc_coeffs_bwd", *backward_args(*case, grads))


# Sinkhorn scales: (2·iters − 1)·128 threads·acc bytes in shared memory up to 48 KB, else
# a global workspace (fp32: iters 49 on; fp64: 25 on).
@pytest.mark.parametrize("dtype,iters", [(torch.float32, 1), (torch.float32, 48), (torch.float32, 49),
                                         (torch.float64, 24), (torch.float64, 25), (torch.bfloat16, 2),
                                         (torch.bfloat16, 60), (torch.float16, 49)])
@pytest.mark.parametrize("n", [4, 5])
def test_mhc_coeffs_iters_plans_match(emulator, dtype, iters, n):
    d = 7 if dtype in (torch.float32, torch.float64) else 40
    same_plans(emulator, "mhc_coeffs_fwd", torch.randn((9, n, d), dtype=dtype),
               *mhc_parameters(n, d, acc_of(dtype)), *floats(iters))
    same_plans(emulator, "mhc_coeffs_bwd", *backward_args(dtype, (9,), n, d, "contiguous", "pre", iters=iters))


# Parameters and gradients needing a copy or conversion, dH / prior / dx layouts apart
# from H's (a scratch dH, accumulated or not; the vector path lost to one operand).
VARIANTS = {
    "bf16_params": dict(params="bf16"),
    "strided_params": dict(params="strided"),
    "misaligned_phi": dict(params="misaligned"),
    "bf16_grads": dict(grad_dtype=torch.bfloat16),
    "sliced_dh": dict(dh_layout="sliced", grads="coeffs"),
    "sliced_dh_accumulate": dict(dh_layout="sliced", grads="pre"),
    "misaligned_dh": dict(dh_layout="misaligned", grads="coeffs"),
    "misaligned_prior": dict(prior_layout="misaligned"),
    "feature_strided_prior": dict(prior_layout="feature_strided"),
    "misaligned_dx": dict(dx_layout="misaligned"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mhc_coeffs_operand_plans_match(emulator, dtype, variant):
    lead, n, d = (2, 3, 3, 4), 4, 40
    kw = dict(VARIANTS[variant])
    params = kw.pop("params", "plain")
    grads = kw.pop("grads", "boundary")
    same_plans(emulator, "mhc_coeffs_fwd", layout_streams(dtype, lead, n, d, "contiguous"),
               *mhc_parameters(n, d, acc_of(dtype), params), *floats(20))
    same_plans(emulator, "mhc_coeffs_bwd", *backward_args(dtype, lead, n, d, "contiguous", grads, params=params, **kw))


# SM counts: the forward's tile grid (min(tiles, 2·SMs, max(SMs, L2 / 2 / tile bytes)))
# and the dH pass's token groups (min(tiles / 4, SMs·16 / chunks)) with the SMs.
@pytest.mark.parametrize("sms", [1, 3, 8, 1000])
@pytest.mark.parametrize("dtype,lead,n,d", [(torch.bfloat16, (300,), 4, 129), (torch.bfloat16, (40,), 2, 1000)])
def test_mhc_coeffs_sms_plans_match(emulator, sms, dtype, lead, n, d):
    count_mod, counter, _ = emulator
    H = torch.randn((*lead, n, d), dtype=dtype)
    with count_mod.device_sms(counter, sms):
        same_plans(emulator, "mhc_pre_fwd", H, *mhc_parameters(n, d, torch.float32), *floats(20))
        same_plans(emulator, "mhc_coeffs_bwd", *backward_args(dtype, lead, n, d, "contiguous", "coeffs"))


def test_mhc_coeffs_l2_bound_tile_grid(emulator):
    """The forward's tile grid bound by the L2 term: 16 tokens of n = 4, d = 2048 bf16
    are 256 KB, 100 of them half of the emulated 50 MB L2; 60 SMs: min(101 tiles, 120,
    max(60, 100)) = 100 blocks."""
    count_mod, counter, _ = emulator
    n, d = 4, 2048
    H = torch.randn((1616, n, d), dtype=torch.bfloat16)
    with count_mod.device_sms(counter, 60):
        same_plans(emulator, "mhc_coeffs_fwd", H, *mhc_parameters(n, d, torch.float32), *floats(1))
