"""Shared by the JIT path's plan-equality tests (tests/test_jit_plan*.py): the C++
launchers' launches recorded by the CPU emulator (tools/cuemu) with their argument bytes,
the JIT launchers' planned on the same CPU tensors and the emulator's device model, and
the comparison -- the same kernel instantiation, grid, block and dynamic shared memory,
and the same params bytes (pointers to the inputs equal, to fresh outputs both set or
both null) -- with the input layouts the tests share."""

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


@pytest.fixture(scope="module")
def emulator():
    traffic = import_traffic()
    counter, module = traffic.cuemu_count.load()
    return traffic.cuemu_count, counter, module


def emulated_device(counter) -> runtime.DeviceModel:
    """The emulator's device (its SM count as set now) and occupancy rule."""
    return runtime.DeviceModel(**counter.device(), occupancy=counter.occupancy)


def cpp_launches(emulator, fn, *args):
    count_mod, counter, module = emulator
    with count_mod.counting(counter) as count:
        getattr(module, fn)(*args)
    return [r.detail for r in count.kernels()]


def jit_launches(emulator, fn, *args):
    with runtime.planning(emulated_device(emulator[1])) as planned:
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
                    if isinstance(item, ctypes.Structure):
                        walk(item, type(item), f"{path}{name}[{i}].")
                    else:  # an array of scalars (SlotTable's pointers): each element
                        out.append((f"{path}{name}[{i}]", v._type_, item))
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
    """The launches agree; a pointer field equals the C++ one where that points into an
    input, else both are set and the JIT's does not point into an input either (a copy
    or conversion only the C++ launcher makes shows)."""
    assert [name_expression(r["name"]) for r in cpp] == [j.kernel for j in jit]
    for r, j in zip(cpp, jit):
        where = j.kernel
        assert tuple(r["grid"]) == j.grid and tuple(r["block"]) == j.block and r["smem"] == j.smem, where
        struct = launchers.PARAMS[j.kernel.split("::")[1].split("<")[0]]
        assert len(r["args"]) == ctypes.sizeof(struct) == len(j.args), where
        for (path, ctype, want), (_, _, got) in zip(flat_values(r["args"], struct), flat_values(j.args, struct)):
            if ctype is ctypes.c_void_p and want and not inside(want, inputs):
                assert got, f"{where}: {path} null in the JIT plan"
                assert not inside(got, inputs), f"{where}: {path} into an input in the JIT plan"
            else:
                assert got == want, f"{where}: {path} = {got}, the C++ launcher's {want}"


def coefficients(lead, n, static, dtype=torch.float32):
    shape_a, shape_b = ((n, n + 1), (n,)) if static else ((*lead, n, n + 1), (*lead, n))
    return torch.randn(shape_a, dtype=dtype), torch.randn(shape_b, dtype=dtype)


def same_plans(emulator, fn, *args, inputs=None):
    """The C++ and JIT launches of launcher `fn` on `args` agree (assert_same_plan;
    `inputs`: the tensors that are read, by default every tensor among args and in
    lists among them)."""
    if inputs is None:
        inputs = [t for a in args for t in (a if isinstance(a, list) else [a]) if isinstance(t, torch.Tensor)]
    assert_same_plan(cpp_launches(emulator, fn, *args), jit_launches(emulator, fn, *args), inputs)


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
