"""The JIT path's launch plans against the C++ launchers' (crosslayer._jit.launchers vs
csrc/*.cu): for every covered op, over shapes, dtypes, stream counts, static and
per-token coefficients, permuted and misaligned tensors, both paths make the same
launches -- the same kernel instantiation, grid, block and dynamic shared memory, and
the same params bytes (pointers to the inputs equal, to fresh outputs both set or both
null). The C++ launches are recorded by the CPU emulator (tools/cuemu) with their
argument bytes; the JIT path plans on the same CPU tensors without launching."""

import ctypes
import sys
from pathlib import Path

import pytest
import torch

from bench_scripts import import_traffic

pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="needs CuPy (pip install cupy-cuda13x)")

from crosslayer._jit import launchers, runtime, structs  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from nvrtc_check import name_expression  # noqa: E402

pytestmark = pytest.mark.cuemu

STRUCTS = {"hc_post_fwd_kernel": structs.HcPostParams, "hc_post_bwd_kernel": structs.HcPostParams,
           "stream_mix_fwd_kernel": structs.StreamMixParams, "stream_mix_bwd_kernel": structs.StreamMixParams,
           "token_sums_kernel": structs.TokenSumsParams}


@pytest.fixture(scope="module")
def emulator():
    traffic = import_traffic()
    counter, module = traffic.cuemu_count.load()
    return traffic.cuemu_count, counter, module


def cpp_launches(emulator, fn, *args):
    count_mod, counter, module = emulator
    with count_mod.counting(counter) as count:
        getattr(module, fn)(*args)
    return [r.detail for r in count.kernels()]


def jit_launches(fn, *args):
    with runtime.planning() as planned:
        getattr(launchers, fn)(*args)
    return planned


def flat_values(struct_bytes: bytes, struct: type, prefix: str = ""):
    """(field path, ctype, value) of every scalar field, nested structures and arrays flattened."""
    obj = struct.from_buffer_copy(struct_bytes)
    out = []

    def walk(o, cls, path):
        for name, ctype in structs.all_fields(cls):
            v = getattr(o, name)
            if isinstance(v, ctypes.Array):
                for i, item in enumerate(v):
                    walk(item, type(item), f"{path}{name}[{i}].")
            elif isinstance(v, ctypes.Structure):
                walk(v, type(v), f"{path}{name}.")
            else:
                out.append((path + name, ctype, v))
    walk(obj, struct, prefix)
    return out


def inside(ptr, tensors) -> bool:
    for t in tensors:
        if t.numel() == 0:
            continue
        start = t.untyped_storage().data_ptr()
        if start <= ptr < start + t.untyped_storage().nbytes():
            return True
    return False


def assert_same_plan(cpp, jit, inputs):
    assert [name_expression(r["name"]) for r in cpp] == [j.kernel for j in jit]
    for r, j in zip(cpp, jit):
        where = j.kernel
        assert tuple(r["grid"]) == j.grid and tuple(r["block"]) == j.block and r["smem"] == j.smem, where
        struct = STRUCTS[j.kernel.split("::")[1].split("<")[0]]
        assert len(r["args"]) == ctypes.sizeof(struct) == len(j.args), where
        for (path, ctype, want), (_, _, got) in zip(flat_values(r["args"], struct), flat_values(j.args, struct)):
            if ctype is ctypes.c_void_p and want and not inside(want, inputs):
                assert got, f"{where}: {path} null in the JIT plan"
            else:
                assert got == want, f"{where}: {path} = {got}, the C++ launcher's {want}"


def coefficients(lead, n, static, dtype=torch.float32):
    shape_a, shape_b = ((n, n + 1), (n,)) if static else ((*lead, n, n + 1), (*lead, n))
    return torch.randn(shape_a, dtype=dtype), torch.randn(shape_b, dtype=dtype)


CASES = [
    # dtype, lead, n, d, static, layout
    (torch.float32, (5,), 4, 64, False, "contiguous"),
    (torch.bfloat16, (2, 3), 4, 100, True, "contiguous"),
    (torch.float16, (7,), 3, 33, False, "contiguous"),
    (torch.float64, (4,), 8, 20, True, "contiguous"),
    (torch.float32, (3, 2), 16, 7, False, "permuted"),
    (torch.bfloat16, (9,), 1, 512, False, "contiguous"),
    (torch.bfloat16, (6,), 2, 64, False, "misaligned"),
    (torch.float32, (2, 5), 4, 300, True, "streams_outer"),
    (torch.bfloat16, (1, 1), 5, 2048, False, "contiguous"),
]


def streams(dtype, lead, n, d, layout):
    if layout == "permuted":  # token dims swapped: two strided token dims
        return torch.randn((*reversed(lead), n, d), dtype=dtype).transpose(0, 1)
    if layout == "misaligned":  # one element off the 16-byte boundary: the scalar path
        return torch.randn(int(torch.tensor(lead).prod()) * n * d + 1, dtype=dtype)[1:].view(*lead, n, d)
    if layout == "streams_outer":  # (n, *lead, d) moved to (*lead, n, d)
        return torch.randn((n, *lead, d), dtype=dtype).movedim(0, -2)
    return torch.randn((*lead, n, d), dtype=dtype)


@pytest.mark.parametrize("dtype,lead,n,d,static,layout", CASES, ids=lambda v: str(v))
def test_hc_post_plans_match(emulator, dtype, lead, n, d, static, layout):
    H = streams(dtype, lead, n, d, layout)
    y = torch.randn((*lead, d), dtype=dtype)
    alpha, beta = coefficients(lead, n, static)
    inputs = [H, y, alpha, beta]
    assert_same_plan(cpp_launches(emulator, "hc_post_fwd", *inputs), jit_launches("hc_post_fwd", *inputs), inputs)
    g = streams(dtype, lead, n, d, layout)
    assert_same_plan(cpp_launches(emulator, "hc_post_bwd", g, *inputs), jit_launches("hc_post_bwd", g, *inputs),
                     [g, *inputs])


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
    assert_same_plan(cpp_launches(emulator, "stream_mix_fwd", H, w), jit_launches("stream_mix_fwd", H, w), [H, w])
    dx = torch.randn((*lead, d), dtype=dtype)
    for accumulate in (False, True):
        dH = streams(dtype, lead, n, d, layout)
        args = (dH, accumulate, dx, H, w)
        assert_same_plan(cpp_launches(emulator, "stream_mix_bwd", *args), jit_launches("stream_mix_bwd", *args),
                         [dH, dx, H, w])
    assert_same_plan(cpp_launches(emulator, "stream_mix_dots", dx, H), jit_launches("stream_mix_dots", dx, H),
                     [dx, H])


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
