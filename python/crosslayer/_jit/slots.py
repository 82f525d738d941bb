"""csrc/common/slots.h: the host side shared by the launchers of the depth-slot ops
(depth_aggregate, depth_aggregate_qkv_norm) -- the slots S as one table of base pointers
with one token stride (kernels/phases/slot_tile.cuh SlotTable), the 16-byte path test
of their rows and the params fields every slot kernel shares. Each function is the C++
one of the same name; the checks that only refuse bad input are the public functions'."""

from __future__ import annotations

import ctypes
from typing import Iterable, List, NamedTuple, Sequence

import torch

from crosslayer._jit.structs import c_int64, c_void_p, header_constant

MAX_SLOTS = header_constant("kMaxSlots", "common/limits.h")


class SlotTable(ctypes.Structure):
    """kernels/phases/slot_tile.cuh."""
    _fields_ = [("ptr", c_void_p * MAX_SLOTS), ("token_stride", c_int64)]


class SlotShape(NamedTuple):
    """common/slots.h SlotShape: static_weights when A is (C, l), not (N, C, l)."""
    l: int
    N: int
    d: int
    static_weights: bool


def check_slots(S: Sequence[torch.Tensor], A: torch.Tensor) -> SlotShape:
    """common/slots.h check_slots: the shape of 1 <= l <= kMaxSlots slots (N, d) and of
    their weights A (the public functions have validated the rest)."""
    assert 1 <= len(S) <= MAX_SLOTS, f"S must hold 1 to {MAX_SLOTS} slots, got {len(S)}"
    return SlotShape(len(S), S[0].size(0), S[0].size(1), A.dim() == 2)


def kernel_slots(S: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """common/slots.h kernel_slots: S itself when every slot has unit feature stride and
    slot 0's token stride, else every slot contiguous (a copy of those that are not)."""
    def unit(s: torch.Tensor) -> bool:
        return s.size(1) <= 1 or s.stride(1) == 1

    shared = unit(S[0])
    for s in S:
        shared = shared and unit(s) and (s.size(0) <= 1 or s.stride(0) == S[0].stride(0))
    if shared:
        return list(S)
    return [s.contiguous() for s in S]


def slot_table(S: Sequence[torch.Tensor]) -> SlotTable:
    """common/slots.h slot_table: kernel_slots' base pointers and token stride."""
    t = SlotTable()
    for j, s in enumerate(S):
        t.ptr[j] = s.data_ptr()
    t.token_stride = 0 if S[0].size(0) <= 1 else S[0].stride(0)
    return t


class TokenRows(NamedTuple):
    """common/slots.h TokenRows: a tensor whose token rows a slot kernel walks besides the
    slots (base pointer, token stride, rows a token and the stride between them)."""
    ptr: int
    token_stride: int
    n_rows: int
    row_stride: int


class SlotRowsPath(NamedTuple):
    """common/slots.h SlotRowsPath."""
    vectorize: bool
    shifted: bool


def slot_rows_path(t: SlotTable, l: int, N: int, elem_bytes: int, vec: int,
                   others: Iterable[TokenRows]) -> SlotRowsPath:
    """common/slots.h slot_rows_path: the 16-byte path when every row of a token, in the
    slots and in `others`, lies at one shift from a 16-byte boundary; shifted when that
    shift is not zero for some token."""
    def shift(ptr) -> int:  # -1: not even element-aligned
        a = ptr or 0
        return -1 if a % elem_bytes != 0 else (a // elem_bytes) % vec

    base = shift(t.ptr[0])
    token = t.token_stride % vec if N > 1 else 0
    same = base >= 0
    for j in range(1, l):
        same = same and shift(t.ptr[j]) == base
    for r in others:
        same = (same and shift(r.ptr) == base and (N <= 1 or r.token_stride % vec == token)
                and (r.n_rows <= 1 or r.row_stride % vec == 0))
    if not same:
        return SlotRowsPath(False, False)
    return SlotRowsPath(True, base != 0 or token != 0)


def slot_row_span(d: int, path: SlotRowsPath, vec: int) -> int:
    """common/slots.h slot_row_span: d, or d + vec - 1 on shifted rows."""
    return d + vec - 1 if path.vectorize and path.shifted else d


def fill_slot_params(p, sh: SlotShape, S: Sequence[torch.Tensor], A: torch.Tensor) -> None:
    """common/slots.h fill_slot_params: sizes, the slots' table (S: kernel_slots) and
    their weights A (a_token_stride 0 for static (C, l) weights)."""
    per_token = A.dim() == 3
    p.n_tokens = sh.N
    p.d = sh.d
    p.n_slots = sh.l
    p.s = slot_table(S)
    p.a_token_stride = A.stride(0) if per_token else 0
    p.a_way_stride = A.stride(1 if per_token else 0)
    p.a_slot_stride = A.stride(2 if per_token else 1)
    p.a_ptr = A.data_ptr()
