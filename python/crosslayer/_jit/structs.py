"""The kernels' params structs as ctypes structures, field for field (csrc/kernels/*.cuh
and common/tokens.cuh), and the header constants the plans use, read from the headers
themselves. ctypes lays a structure out as the x86-64 / aarch64 C ABI does, which is
the layout nvcc gives a kernel parameter; tests/test_jit_plan.py compares the bytes with
the ones the C++ launchers pass (recorded by the CPU emulator)."""

from __future__ import annotations

import ctypes
import functools
import os
import re

from crosslayer import _nvrtc

c_int64, c_int, c_void_p = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p


@functools.lru_cache(maxsize=None)
def header_constant(name: str, header: str) -> int:
    """`constexpr int <name> = <integer>;` of csrc/<header>."""
    with open(os.path.join(_nvrtc.csrc_dir(), header)) as f:
        m = re.search(rf"constexpr\s+int\s+{name}\s*=\s*(\d+)\s*;", f.read())
    if m is None:
        raise RuntimeError(f"crosslayer's JIT path: no `constexpr int {name} = ...;` in csrc/{header}")
    return int(m.group(1))


class TokenLayout(ctypes.Structure):
    """common/tokens.cuh: token t at (t / inner)·outer_stride + (t % inner)·inner_stride;
    its C++ default is inner = 1."""
    _fields_ = [("inner", c_int64), ("outer_stride", c_int64), ("inner_stride", c_int64)]

    def __init__(self, inner: int = 1, outer_stride: int = 0, inner_stride: int = 0):
        super().__init__(inner, outer_stride, inner_stride)


class Params(ctypes.Structure):
    """A params struct value-initialised as the launchers' `P p{}`: zeros, and the C++
    default member initialisers of its TokenLayout fields."""

    def __init__(self):
        super().__init__()
        for name, ctype in all_fields(type(self)):
            if ctype is TokenLayout:
                setattr(self, name, TokenLayout())


class HcTileParams(Params):
    """kernels/hc_tile.cuh."""
    _fields_ = [("n_tokens", c_int64), ("d", c_int64), ("n", c_int), ("h_tok", TokenLayout),
                ("h_stream_stride", c_int64), ("h_ptr", c_void_p)]


class HcPostParams(HcTileParams):
    """kernels/hc_post.cuh (HcTileParams' fields first, as the C++ base)."""
    _fields_ = [("y_tok", TokenLayout), ("a_token_stride", c_int64), ("b_token_stride", c_int64),
                ("out_tok", TokenLayout), ("out_stream_stride", c_int64), ("g_tok", TokenLayout),
                ("g_stream_stride", c_int64), ("dh_tok", TokenLayout), ("dh_stream_stride", c_int64),
                ("dy_tok", TokenLayout), ("y_ptr", c_void_p), ("a_ptr", c_void_p), ("b_ptr", c_void_p),
                ("out_ptr", c_void_p), ("g_ptr", c_void_p), ("dh_ptr", c_void_p), ("dy_ptr", c_void_p),
                ("da_ptr", c_void_p), ("db_ptr", c_void_p)]


class StreamMixParams(HcTileParams):
    """kernels/stream_mix.cuh."""
    _fields_ = [("w_token_stride", c_int64), ("w_col_stride", c_int64), ("x_tok", TokenLayout), ("g_tok", TokenLayout),
                ("dh_tok", TokenLayout), ("dh_stream_stride", c_int64), ("accumulate_dh", ctypes.c_bool),
                ("w_ptr", c_void_p), ("x_ptr", c_void_p), ("g_ptr", c_void_p), ("dh_ptr", c_void_p),
                ("dw_ptr", c_void_p)]


class TokenSumsSegment(ctypes.Structure):
    """kernels/token_sums.cuh."""
    _fields_ = [("rows", c_void_p), ("cols", c_int64), ("out", c_void_p), ("outputs", c_int64), ("div", c_int64),
                ("col0", c_int64), ("width", c_int64)]


class TokenSumsParams(Params):
    """kernels/token_sums.cuh."""
    _fields_ = [("n_tokens", c_int64), ("segments", c_int),
                ("seg", TokenSumsSegment * header_constant("kTokenSumsMaxSegments", "kernels/token_sums.cuh"))]


def all_fields(struct: type) -> list:
    """(name, ctype) of every field of a structure, its bases' first (the C++ layout)."""
    fields = []
    for cls in reversed(struct.__mro__):
        fields += list(cls.__dict__.get("_fields_", []))
    return fields
