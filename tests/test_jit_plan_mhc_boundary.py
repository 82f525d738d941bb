"""The JIT path's launch plans against the C++ launchers' (crosslayer._jit.mhc_boundary vs
csrc/mhc_coeffs.cu's mhc_boundary_fwd and csrc/mhc_boundary_bwd.cu) for the mHC
boundary: fused (16-bit H, d >= 32; the backward n <= 4 and the Sinkhorn scales within
160 KB) and composed, every dtype, n = 1..16, odd d, no to a few hundred tokens,
permuted / misaligned / uncollapsible layouts (H' and dH written through a scratch),
static and per-token post coefficients, SM counts, Sinkhorn iterations and every
optional gradient (tests/jit_plan_support.py compares; the helpers are the mhc_coeffs
plan test's)."""

import pytest
import torch

from jit_plan_support import emulator, same_plans
from test_jit_plan_mhc_coeffs import acc_of, floats, layout_streams, mhc_parameters, saved

pytestmark = pytest.mark.cuemu
__all__ = ["emulator"]  # the fixture

# dtype, lead, n, d, layout
CASES = [
    (torch.float32, (5,), 4, 7, "contiguous"),
    (torch.float64, (3, 2), 3, 5, "permuted"),
    (torch.bfloat16, (40,), 4, 64, "contiguous"),
    (torch.float16, (7,), 3, 33, "contiguous"),
    (torch.bfloat16, (6,), 2, 64, "misaligned"),
    (torch.float16, (2, 5), 4, 48, "streams_outer"),
    (torch.bfloat16, (3, 4, 2), 4, 40, "scrambled"),
    (torch.float16, (2, 3, 3, 4), 2, 32, "sliced"),
    (torch.bfloat16, (5,), 3, 40, "feature_strided"),
    (torch.bfloat16, (9,), 1, 129, "contiguous"),
    (torch.bfloat16, (5,), 4, 31, "contiguous"),
    (torch.float16, (30,), 8, 33, "contiguous"),
    (torch.bfloat16, (3,), 16, 32, "contiguous"),
    (torch.bfloat16, (), 4, 40, "contiguous"),
    (torch.float32, (), 2, 3, "contiguous"),
    (torch.bfloat16, (300,), 4, 32, "contiguous"),
    (torch.bfloat16, (0,), 4, 64, "contiguous"),
    (torch.float32, (0, 3), 3, 7, "contiguous"),
]
CASE_IDS = [f"{str(c[0])[6:]}-{'x'.join(map(str, c[1])) or 'one'}-n{c[2]}-d{c[3]}-{c[4]}" for c in CASES]


def post_coefficients(lead, n, kind):
    """Connection i's alpha, beta: "token" (fp32 per token), "static" (fp32 (n, n+1),
    (n,)), "bf16" (per token, converted), "strided" (static, a strided view and a column)."""
    if kind == "static":
        return torch.randn(n, n + 1), torch.randn(n)
    if kind == "strided":
        return torch.randn(n + 1, n).t(), torch.randn(n, 2)[:, 1]
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    return torch.randn((*lead, n, n + 1), dtype=dtype), torch.randn((*lead, n), dtype=dtype)


def activation(dtype, lead, d, layout="contiguous"):
    """y or dx (*lead, d): contiguous or misaligned (one element off 16 bytes)."""
    N = 1
    for s in lead:
        N *= s
    if layout == "misaligned":
        return torch.randn(N * d + 1, dtype=dtype)[1:].view(*lead, d)
    return torch.randn((*lead, d), dtype=dtype)


def forward_args(dtype, lead, n, d, layout, coef="token", iters=20, y_layout="contiguous"):
    alpha, beta = post_coefficients(lead, n, coef)
    return (layout_streams(dtype, lead, n, d, layout), activation(dtype, lead, d, y_layout), alpha, beta,
            *mhc_parameters(n, d, acc_of(dtype)), *floats(iters))


# dH_next, dx, dalpha_next, dbeta_next: the op's (all, or the ones a graph leaves None).
GRADS = {
    "all": (True, True, True, True),
    "none": (False, False, False, False),
    "dH_next": (True, False, False, False),
    "dx_dbeta": (False, True, False, True),
    "dalpha": (False, False, True, False),
}


def backward_args(dtype, lead, n, d, layout, grads, coef="token", iters=20, dh_layout=None,
                  next_layout="contiguous", dx_layout="contiguous"):
    """The arguments of mhc_boundary_bwd; H in `layout`, dH_next in dh_layout (H's by
    default), H' in next_layout, dx contiguous or misaligned."""
    with_dh, with_dx, with_dalpha, with_dbeta = GRADS[grads]
    acc = acc_of(dtype)
    H, y, alpha, beta, *rest = forward_args(dtype, lead, n, d, layout, coef, iters)
    dH_next = layout_streams(dtype, lead, n, d, dh_layout or layout) if with_dh else None
    dx = activation(dtype, lead, d, dx_layout) if with_dx else None
    dalpha = torch.randn((*lead, n, n + 1), dtype=acc) if with_dalpha else None
    dbeta = torch.randn((*lead, n), dtype=acc) if with_dbeta else None
    H_next = layout_streams(dtype, lead, n, d, next_layout)
    u, r = saved(lead, n, acc)
    return (dH_next, dx, dalpha, dbeta, H, y, alpha, beta, H_next, *rest[:5], u, r, *rest[5:])


@pytest.mark.parametrize("coef", ["token", "static"])
@pytest.mark.parametrize("dtype,lead,n,d,layout", CASES, ids=CASE_IDS)
def test_mhc_boundary_fwd_plans_match(emulator, dtype, lead, n, d, layout, coef):
    same_plans(emulator, "mhc_boundary_fwd", *forward_args(dtype, lead, n, d, layout, coef))


# All and none of the gradients on every case, the other combinations on a few (CASES'
# indices); odd n with static post coefficients.
FEW = ("float32-5-n4-d7-contiguous", "bfloat16-40-n4-d64-contiguous", "bfloat16-3x4x2-n4-d40-scrambled",
       "float16-2x3x3x4-n2-d32-sliced", "float16-30-n8-d33-contiguous", "bfloat16-300-n4-d32-contiguous")
BWD = [(i, grads) for i in range(len(CASES)) for grads in GRADS if grads in ("all", "none") or CASE_IDS[i] in FEW]


@pytest.mark.parametrize("case,grads", [(CASES[i], g) for i, g in BWD], ids=[f"{CASE_IDS[i]}-{g}" for i, g in BWD])
def test_mhc_boundary_bwd_plans_match(emulator, case, grads):
    same_plans(emulator, "mhc_boundary_bwd", *backward_args(*case, grads, coef="static" if case[2] % 2 else "token"))


# Operands apart from H's layout: post coefficients converted or strided, y / dx /
# dH_next misaligned (the vector path lost to one), dH_next and H' uncollapsible (copies).
VARIANTS = {
    "bf16_coefficients": dict(coef="bf16"),
    "strided_coefficients": dict(coef="strided"),
    "misaligned_y": dict(y_layout="misaligned"),
    "misaligned_dx": dict(dx_layout="misaligned"),
    "misaligned_dh_next": dict(dh_layout="misaligned"),
    "scrambled_dh_next": dict(dh_layout="scrambled"),
    "scrambled_h_next": dict(next_layout="scrambled"),
    "misaligned_h_next": dict(next_layout="misaligned"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mhc_boundary_operand_plans_match(emulator, dtype, variant):
    lead, n, d = (3, 4, 2), 4, 40
    kw = VARIANTS[variant]
    fwd = {k: v for k, v in kw.items() if k in ("coef", "y_layout")}
    bwd = {k: v for k, v in kw.items() if k != "y_layout"}
    same_plans(emulator, "mhc_boundary_fwd", *forward_args(dtype, lead, n, d, "contiguous", **fwd))
    same_plans(emulator, "mhc_boundary_bwd", *backward_args(dtype, lead, n, d, "contiguous", "all", **bwd))


# Sinkhorn iterations: the fused backward's shared memory grows 256 bytes an iteration
# past 35 KB; 251 is the last within kMhcBoundaryBwdSmemMax (160 KB), 252 composed.
@pytest.mark.parametrize("iters", [1, 20, 251, 252])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_mhc_boundary_iters_plans_match(emulator, dtype, iters):
    lead, n, d = (5,), 4, 32
    same_plans(emulator, "mhc_boundary_fwd", *forward_args(dtype, lead, n, d, "contiguous", iters=iters))
    same_plans(emulator, "mhc_boundary_bwd", *backward_args(dtype, lead, n, d, "contiguous", "all", iters=iters))


# SM counts: the tile grids (forward and backward) and the dphi pass's token groups.
@pytest.mark.parametrize("sms", [1, 3, 8, 1000])
@pytest.mark.parametrize("dtype,lead,n,d", [(torch.bfloat16, (300,), 4, 129), (torch.float16, (100,), 2, 512)])
def test_mhc_boundary_sms_plans_match(emulator, sms, dtype, lead, n, d):
    count_mod, counter, _ = emulator
    with count_mod.device_sms(counter, sms):
        same_plans(emulator, "mhc_boundary_fwd", *forward_args(dtype, lead, n, d, "contiguous", "static"))
        same_plans(emulator, "mhc_boundary_bwd", *backward_args(dtype, lead, n, d, "contiguous", "all"))


def test_mhc_boundary_bwd_l2_bound_tile_grid(emulator):
    """The fused backward's tile grid bound by the L2 term: 16 tokens of H, y and dx'
    (n + 2 rows of d = 2048 bf16) are 384 KB, 66 of them half of the emulated 50 MB L2;
    40 SMs: min(67 tiles, 80, max(40, 66)) = 66 blocks."""
    count_mod, counter, _ = emulator
    with count_mod.device_sms(counter, 40):
        same_plans(emulator, "mhc_boundary_bwd", *backward_args(torch.bfloat16, (1072,), 4, 2048, "contiguous",
                                                                "none", iters=1))
