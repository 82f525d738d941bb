"""The JIT path's launch plans against the C++ launcher's (crosslayer._jit.hc_pre vs
csrc/hc_pre.cu) for dynamic HC's hc_pre, forward and backward: every dtype, exact and
generic stream counts, odd and large d (opt-in shared memory, dW partials in and out of
it), parameters converted or read in place, permuted, misaligned and copied layouts,
dH written (=) or added to (+=), absent or given dalpha / dbeta, and the backward's
persistent grid on devices of several SM counts (tests/jit_plan_support.py compares)."""

import pytest
import torch

from jit_plan_support import CASES, emulator, same_plans, streams

from crosslayer._checks import acc_dtype
from crosslayer._jit.hc_pre import hc_pre_pack_w

pytestmark = pytest.mark.cuemu
__all__ = ["emulator"]  # the fixture

# dtype, lead, n, d, layout: jit_plan_support's CASES and the large-d ones (the dW
# partials of d = 4096, n = 16 leave the emulated device's 227 KB of shared memory).
PRE_CASES = [(dtype, lead, n, d, layout) for dtype, lead, n, d, _, layout in CASES] + [
    (torch.float16, (3,), 16, 2048, "misaligned"),
    (torch.float32, (2,), 16, 4096, "contiguous"),
    (torch.float64, (3,), 4, 1000, "contiguous"),
    (torch.float16, (4,), 8, 64, "contiguous"),
    (torch.float64, (5,), 3, 7, "contiguous"),
]


def parameters(n, d, dtype=torch.float32):
    """A (n, n+1), B (n,), W (d, n+2), s_a, s_b."""
    return (torch.randn(n, n + 1, dtype=dtype), torch.randn(n, dtype=dtype), torch.randn(d, n + 2, dtype=dtype),
            torch.tensor(0.5, dtype=dtype), torch.tensor(0.25, dtype=dtype))


def saved(H, W, lead, n):
    """What the backward takes from the forward: Wt, q, r (random values of its layout)."""
    acc = acc_dtype(H.dtype)
    return hc_pre_pack_w(W, acc), torch.randn((*lead, n, n + 2), dtype=acc), torch.randn((*lead, n), dtype=acc)


def coef_grads(lead, n, which, dtype=torch.float32):
    """dalpha (*lead, n, n+1), dbeta (*lead, n): "both", "alpha", "beta" or "none" given."""
    dalpha = torch.randn((*lead, n, n + 1), dtype=dtype) if which in ("both", "alpha") else None
    dbeta = torch.randn((*lead, n), dtype=dtype) if which in ("both", "beta") else None
    return dalpha, dbeta


def check_pre(emulator, H, dH, dx, lead, n, d, params, grads, accumulate):
    A, B, W, s_a, s_b = params
    same_plans(emulator, "hc_pre_fwd", H, A, B, W, s_a, s_b, 1e-6)
    Wt, q, r = saved(H, W, lead, n)
    same_plans(emulator, "hc_pre_bwd", dH, accumulate, dx, *coef_grads(lead, n, grads), H, A, B, W, Wt, s_a, s_b, q,
               r)


@pytest.mark.parametrize("dtype,lead,n,d,layout", PRE_CASES, ids=lambda v: str(v))
def test_hc_pre_plans_match(emulator, dtype, lead, n, d, layout):
    H = streams(dtype, lead, n, d, layout)
    dx = torch.randn((*lead, d), dtype=dtype)
    # bf16 parameters of a float32-accumulating H are converted; float32 ones read in place.
    params = parameters(n, d, torch.bfloat16 if dtype == torch.float16 else torch.float32)
    for accumulate, grads in ((False, "both"), (True, "beta")):
        check_pre(emulator, H, streams(dtype, lead, n, d, layout), dx, lead, n, d, params, grads, accumulate)


@pytest.mark.parametrize("grads", ["none", "alpha"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 16])
def test_hc_pre_stream_counts(emulator, n, grads):
    lead, d = (6,), 40
    H = streams(torch.bfloat16, lead, n, d, "contiguous")
    check_pre(emulator, H, torch.empty_like(H), torch.randn((*lead, d), dtype=torch.bfloat16), lead, n, d,
              parameters(n, d), grads, False)


@pytest.mark.parametrize("sms", [1, 2, 132])
@pytest.mark.parametrize("dtype,d", [(torch.float32, 256), (torch.bfloat16, 2048)])
def test_hc_pre_persistent_grid(emulator, sms, dtype, d):
    """The backward's grid is what the device holds at once: fewer blocks than token rows
    on a small device (the emulator's SM count), one a row on a large one."""
    count_mod, counter, _ = emulator
    lead, n = (37,), 4
    H = streams(dtype, lead, n, d, "contiguous")
    with count_mod.device_sms(counter, sms):
        check_pre(emulator, H, torch.empty_like(H), torch.randn((*lead, d), dtype=dtype), lead, n, d,
                  parameters(n, d), "both", True)


def test_hc_pre_copied_layouts(emulator):
    """Token dims that do not collapse (H copied), a feature-strided dH (written through a
    scratch, holding dH first when added to) and dx (copied), float64 parameters."""
    lead, n, d = (2, 3, 4), 3, 24
    H = torch.randn((4, 3, 2, n, d)).permute(2, 1, 0, 3, 4)
    dx = torch.randn((*lead, 2 * d))[..., ::2]
    params = parameters(n, d, torch.float64)
    for accumulate in (False, True):
        dH = torch.randn((*lead, n, 2 * d))[..., ::2]
        check_pre(emulator, H, dH, dx, lead, n, d, params, "both", accumulate)


def activation(dtype, lead, d, layout):
    """x-like (*lead, d) in one of jit_plan_support's layouts."""
    return streams(dtype, lead, 1, d, layout).squeeze(-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h_layout,dh_layout,dx_layout", [("contiguous", "streams_outer", "misaligned"),
                                                          ("streams_outer", "permuted", "contiguous"),
                                                          ("permuted", "contiguous", "permuted")])
def test_hc_pre_mixed_layouts(emulator, dtype, h_layout, dh_layout, dx_layout):
    """H, dH and dx each in its own layout (their token and stream strides differ)."""
    lead, n, d = (2, 5), 4, 64
    H = streams(dtype, lead, n, d, h_layout)
    check_pre(emulator, H, streams(dtype, lead, n, d, dh_layout), activation(dtype, lead, d, dx_layout), lead, n, d,
              parameters(n, d), "both", True)


@pytest.mark.parametrize("lead", [(0,), (2, 0), ()])
def test_hc_pre_token_counts(emulator, lead):
    """No tokens (no launch: empty outputs, zero gradients) and one token without token dims."""
    n, d = 4, 16
    H = torch.randn((*lead, n, d))
    check_pre(emulator, H, torch.empty_like(H), torch.randn((*lead, d)), lead, n, d, parameters(n, d), "both", True)
