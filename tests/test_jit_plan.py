"""The JIT path's launch plans against the C++ launchers' (crosslayer._jit vs csrc/*.cu)
for hc_post and stream_mix, over shapes, dtypes, stream counts, static and per-token
coefficients, permuted and misaligned tensors (tests/jit_plan_support.py compares)."""

import pytest
import torch

from jit_plan_support import CASES, coefficients, emulator, same_plans, streams

pytestmark = pytest.mark.cuemu
__all__ = ["emulator"]  # the fixture


@pytest.mark.parametrize("dtype,lead,n,d,static,layout", CASES, ids=lambda v: str(v))
def test_hc_post_plans_match(emulator, dtype, lead, n, d, static, layout):
    H = streams(dtype, lead, n, d, layout)
    y = torch.randn((*lead, d), dtype=dtype)
    alpha, beta = coefficients(lead, n, static)
    same_plans(emulator, "hc_post_fwd", H, y, alpha, beta)
    same_plans(emulator, "hc_post_bwd", streams(dtype, lead, n, d, layout), H, y, alpha, beta)


def mixing_weights(lead, n, kind):
    """w of stream_mix: per token, static, or static as a strided column (SHC's alpha[:, 0])."""
    if kind == "column":
        return torch.randn(n, n + 1)[:, 0]
    if kind == "bf16":
        return torch.randn((*lead, n), dtype=torch.bfloat16)
    return torch.randn((n,) if kind == "static" else (*lead, n))


@pytest.mark.parametrize("kind", ["per_token", "static", "column", "bf16"])
@pytest.mark.parametrize("dtype,lead,n,d,static,layout", CASES, ids=lambda v: str(v))
def test_stream_mix_plans_match(emulator, dtype, lead, n, d, static, layout, kind):
    H = streams(dtype, lead, n, d, layout)
    w = mixing_weights(lead, n, kind)
    same_plans(emulator, "stream_mix_fwd", H, w)
    dx = torch.randn((*lead, d), dtype=dtype)
    for accumulate in (False, True):
        dH = streams(dtype, lead, n, d, layout)
        same_plans(emulator, "stream_mix_bwd", dH, accumulate, dx, H, w)
    same_plans(emulator, "stream_mix_dots", dx, H)
