"""The JIT path's coverage (every op, every launcher), and its launch plans against the
C++ launchers' (crosslayer._jit vs csrc/*.cu) for hc_post and stream_mix (the other ops:
tests/test_jit_plan_<op>.py), over shapes, dtypes, stream counts, static and per-token
coefficients, permuted and misaligned tensors (tests/jit_plan_support.py compares)."""

import inspect

import pytest
import torch

from jit_plan_support import CASES, coefficients, emulator, same_plans, streams

from crosslayer import ops
from crosslayer._jit import launchers

pytestmark = pytest.mark.cuemu
__all__ = ["emulator"]  # the fixture


def test_the_jit_path_covers_every_op_and_launcher(emulator):
    """Every public op has JIT launchers, and every launcher function of crosslayer._C
    (its emulated build: the same bindings) has a JIT function of the same name whose
    parameters are the binding's in number (pybind11's functions take them positionally)."""
    assert sorted(launchers.OPS) == sorted(ops.ALL_OPS)
    module = emulator[2]
    names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))
             and not n.startswith("built_")]
    assert sorted(names) == sorted(n for n in launchers.__all__ if n not in ("OPS", "PARAMS"))
    for name in names:
        arity = getattr(module, name).__doc__.split("\n")[0].count(": ")  # "f(arg0: T, arg1: T) -> R"
        assert len(inspect.signature(getattr(launchers, name)).parameters) == arity, name


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
