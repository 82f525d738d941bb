"""The JIT path's launch plans against the C++ launchers' (crosslayer._jit.hc_boundary vs
csrc/hc_boundary_fwd.cu, hc_boundary_bwd.cu) for hc_boundary, dynamic (DHC) and static
(SHC, the _mix launchers) pre, forward and backward: every dtype, exact and generic
stream counts (the mix backward's narrowed generic chunk), static and per-token post
coefficients, odd and large d (opt-in shared memory, dW partials in and out of it),
permuted, misaligned and copied layouts, absent or given dalpha' / dbeta', and the
backward's persistent grid on devices of several SM counts (tests/jit_plan_support.py
compares)."""

import pytest
import torch

from jit_plan_support import CASES, coefficients, emulator, same_plans, streams
from test_jit_plan_hc_pre import activation, coef_grads, parameters, saved

pytestmark = pytest.mark.cuemu
__all__ = ["emulator"]  # the fixture

# jit_plan_support's CASES and large-d ones (the dW partials of d = 4096, n = 16 leave
# the emulated device's 227 KB of shared memory).
BOUNDARY_CASES = CASES + [
    (torch.float16, (3,), 16, 2048, True, "misaligned"),
    (torch.float32, (2,), 16, 4096, False, "contiguous"),
    (torch.float64, (3,), 4, 1000, False, "contiguous"),
    (torch.float16, (4,), 8, 64, True, "contiguous"),
    (torch.float64, (5,), 3, 7, True, "contiguous"),
]


def check_boundary(emulator, H, y, dH_next, dx, lead, n, d, coefs, params, grads):
    alpha, beta = coefs
    A, B, W, s_a, s_b = params
    same_plans(emulator, "hc_boundary_fwd", H, y, alpha, beta, A, B, W, s_a, s_b, 1e-6)
    Wt, q, r = saved(H, W, lead, n)
    same_plans(emulator, "hc_boundary_bwd", dH_next, dx, *coef_grads(lead, n, grads), H, y, alpha, beta, A, B, W, Wt,
               s_a, s_b, q, r)


def check_mix(emulator, H, y, dH_next, dx, coefs, A_next):
    alpha, beta = coefs
    same_plans(emulator, "hc_boundary_mix_fwd", H, y, alpha, beta, A_next)
    same_plans(emulator, "hc_boundary_mix_bwd", dH_next, dx, H, y, alpha, beta, A_next)


@pytest.mark.parametrize("dtype,lead,n,d,static,layout", BOUNDARY_CASES, ids=lambda v: str(v))
def test_hc_boundary_plans_match(emulator, dtype, lead, n, d, static, layout):
    H = streams(dtype, lead, n, d, layout)
    y = torch.randn((*lead, d), dtype=dtype)
    dx = torch.randn((*lead, d), dtype=dtype)
    coefs = coefficients(lead, n, static)
    params = parameters(n, d, torch.bfloat16 if dtype == torch.float16 else torch.float32)
    check_boundary(emulator, H, y, streams(dtype, lead, n, d, layout), dx, lead, n, d, coefs, params,
                   "beta" if static else "both")
    check_mix(emulator, H, y, streams(dtype, lead, n, d, layout), dx, coefs, params[0])


@pytest.mark.parametrize("grads", ["none", "alpha"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hc_boundary_stream_counts(emulator, dtype, n, grads):
    lead, d = (6,), 48
    H = streams(dtype, lead, n, d, "contiguous")
    y, dx = torch.randn((*lead, d), dtype=dtype), torch.randn((*lead, d), dtype=dtype)
    coefs = coefficients(lead, n, grads == "none")
    params = parameters(n, d)
    check_boundary(emulator, H, y, torch.randn_like(H), dx, lead, n, d, coefs, params, grads)
    check_mix(emulator, H, y, torch.randn_like(H), dx, coefs, params[0])


@pytest.mark.parametrize("sms", [1, 2, 132])
@pytest.mark.parametrize("dtype,d", [(torch.float32, 256), (torch.bfloat16, 2048)])
def test_hc_boundary_persistent_grid(emulator, sms, dtype, d):
    """The backward's grid is what the device holds at once: fewer blocks than token rows
    on a small device (the emulator's SM count), one a row on a large one."""
    count_mod, counter, _ = emulator
    lead, n = (37,), 4
    H = streams(dtype, lead, n, d, "contiguous")
    y, dx = torch.randn((*lead, d), dtype=dtype), torch.randn((*lead, d), dtype=dtype)
    with count_mod.device_sms(counter, sms):
        check_boundary(emulator, H, y, torch.randn_like(H), dx, lead, n, d, coefficients(lead, n, False),
                       parameters(n, d), "both")


def test_hc_boundary_copied_layouts(emulator):
    """Token dims that do not collapse (H copied, H' and dH written through a scratch),
    feature-strided y, dH' and dx (copied), float64 parameters and coefficients."""
    lead, n, d = (2, 3, 4), 3, 24
    H = torch.randn((4, 3, 2, n, d)).permute(2, 1, 0, 3, 4)
    y = torch.randn((*lead, 2 * d))[..., ::2]
    dH_next = torch.randn((*lead, n, 2 * d))[..., ::2]
    dx = torch.randn((*lead, 2 * d))[..., ::2]
    coefs = coefficients(lead, n, False, torch.float64)
    params = parameters(n, d, torch.float64)
    check_boundary(emulator, H, y, dH_next, dx, lead, n, d, coefs, params, "both")
    check_mix(emulator, H, y, dH_next, dx, coefs, params[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h_layout,y_layout,g_layout,dx_layout", [
    ("contiguous", "misaligned", "streams_outer", "permuted"),
    ("streams_outer", "contiguous", "permuted", "misaligned"),
    ("permuted", "permuted", "contiguous", "contiguous"),
])
def test_hc_boundary_mixed_layouts(emulator, dtype, h_layout, y_layout, g_layout, dx_layout):
    """H (and H', dH allocated like it), y, dH' and dx each in its own layout (their token
    and stream strides differ)."""
    lead, n, d = (2, 5), 4, 64
    H = streams(dtype, lead, n, d, h_layout)
    y, dx = activation(dtype, lead, d, y_layout), activation(dtype, lead, d, dx_layout)
    g = streams(dtype, lead, n, d, g_layout)
    coefs = coefficients(lead, n, False)
    params = parameters(n, d)
    check_boundary(emulator, H, y, g, dx, lead, n, d, coefs, params, "both")
    check_mix(emulator, H, y, g, dx, coefs, params[0])


@pytest.mark.parametrize("lead,d", [((0,), 16), ((2, 0), 16), ((), 16), ((3,), 0)])
def test_hc_boundary_token_counts(emulator, lead, d):
    """No tokens or no features (no launch: empty outputs, zero gradients) and one token
    without token dims; d = 0 only for the static pre (the dynamic one needs d >= 1)."""
    n = 4
    H = torch.randn((*lead, n, d))
    y, dx = torch.randn((*lead, d)), torch.randn((*lead, d))
    coefs = coefficients(lead, n, True)
    params = parameters(n, d)
    if d > 0:
        check_boundary(emulator, H, y, torch.randn_like(H), dx, lead, n, d, coefs, params, "both")
    check_mix(emulator, H, y, torch.randn_like(H), dx, coefs, params[0])
