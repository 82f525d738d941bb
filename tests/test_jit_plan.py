"""The JIT path's launch plans against the C++ launchers' (crosslayer._jit vs csrc/*.cu)
for hc_post and stream_mix, over shapes, dtypes, stream counts, static and per-token
coefficients, permuted and misaligned tensors (tests/jit_plan_support.py compares)."""

import pytest
import torch

from jit_plan_support import CASES, coefficients, emulator, same_plans, streams

pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="needs CuPy (pip install cupy-cuda13x)")

from crosslayer._jit import launchers  # noqa: E402

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


def gpu_inputs(op: str, dtype):
    """The differentiable inputs of a JIT op's GPU test: per-token coefficients for
    hc_post, a static w for stream_mix."""
    def leaf(*shape, dt=torch.float32):
        return torch.randn(*shape, device="cuda", dtype=dt, requires_grad=True)
    if op == "hc_post":
        return [leaf(37, 4, 256, dt=dtype), leaf(37, 256, dt=dtype), leaf(37, 4, 5), leaf(37, 4)]
    return [leaf(5, 7, 4, 200, dt=dtype), leaf(4)]


@pytest.mark.gpu
@pytest.mark.parametrize("op", launchers.OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_jit_ops_run_on_the_gpu(monkeypatch, op, dtype):
    """CROSSLAYER_BACKEND=jit on a GPU: the op's forward and backward through the
    NVRTC-compiled kernels, against the float64 oracle."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from crosslayer import _extension, ops, ref

    monkeypatch.setenv("CROSSLAYER_BACKEND", "jit")
    inputs = gpu_inputs(op, dtype)
    assert _extension.backend_for(inputs[0], op) == "jit"
    out = getattr(ops, op)(*inputs)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, g)
    inputs64 = [t.detach().double().requires_grad_(True) for t in inputs]
    want = getattr(ref, op)(*inputs64)
    want_grads = torch.autograd.grad(want, inputs64, g.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    for got, ref_grad in zip(grads, want_grads):  # the coefficient gradients sum over d or tokens
        torch.testing.assert_close(got.double(), ref_grad, rtol=tol, atol=tol * 50)
