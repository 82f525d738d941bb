"""What the kernels' params structs are built from as ctypes structures (each op's
module declares its own, field for field with csrc/kernels/*.cuh): TokenLayout
(common/tokens.cuh), the value-initialised Params base, and the header constants the
plans use, read from the headers themselves. ctypes lays a structure out as the x86-64 /
aarch64 C ABI does, which is the layout nvcc gives a kernel parameter; the plan tests
compare the bytes with the ones the C++ launchers pass (recorded by the CPU emulator)."""

from __future__ import annotations

import ctypes
import functools
import os
import re

from crosslayer import _nvrtc

c_int64, c_int, c_void_p, c_bool = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_bool


_CONSTANT_VALUE = re.compile(r"[0-9\s*+()-]+")


@functools.lru_cache(maxsize=None)
def header_constant(name: str, header: str) -> int:
    """`constexpr int <name> = <value>;` (or int64_t) of csrc/<header>, the value an
    integer or a product / sum of integers (`48 * 1024`)."""
    with open(os.path.join(_nvrtc.csrc_dir(), header)) as f:
        m = re.search(rf"constexpr\s+int(?:64_t)?\s+{name}\s*=\s*([^;]+);", f.read())
    if m is None or not _CONSTANT_VALUE.fullmatch(m.group(1)):
        raise RuntimeError(f"crosslayer's JIT path: no `constexpr int {name} = <integer expression>;` "
                           f"in csrc/{header}")
    return int(eval(m.group(1), {"__builtins__": {}}))  # digits, + - * and parentheses only


class TokenLayout(ctypes.Structure):
    """common/tokens.cuh: token t at (t / inner)·outer_stride + (t % inner)·inner_stride;
    its C++ default is inner = 1."""
    _fields_ = [("inner", c_int64), ("outer_stride", c_int64), ("inner_stride", c_int64)]

    def __init__(self, inner: int = 1, outer_stride: int = 0, inner_stride: int = 0):
        super().__init__(inner, outer_stride, inner_stride)


class Params(ctypes.Structure):
    """A params struct value-initialised as the launchers' `P p{}`: zeros, and the C++
    default member initialisers of its TokenLayout fields (a member params struct's too)."""

    def __init__(self):
        super().__init__()
        for name, ctype in all_fields(type(self)):
            if ctype is TokenLayout or issubclass(ctype, Params):
                setattr(self, name, ctype())


def all_fields(struct: type) -> list:
    """(name, ctype) of every field of a structure, its bases' first (the C++ layout)."""
    fields = []
    for cls in reversed(struct.__mro__):
        fields += list(cls.__dict__.get("_fields_", []))
    return fields
