"""What one call of crosslayer's ops would move on a GPU, counted on the CPU emulator.

    from tools.cuemu.count import load, counting
    counter, module = load()                # the counter first: it registers allocations
    with emulate(module), counting(counter) as c:
        ...                                 # forward, backward: anything on CPU tensors
    c.rows                                  # one Row per kernel launch or ATen op
    c.bytes(), c.launches()

Two sources of rows, in call order:
- kernel: a launch of an emulated kernel. Bytes are the HBM estimate: unique 32-byte
  sectors read and written per allocation (nothing kept in L2 between launches; within
  a launch, a sector read twice is read once, and one read after the launch wrote it is
  an L2 hit, not read). The row also carries the requests, their
  sectors (Nsight Compute's sectors/request), and per allocation the bytes requested and
  the sectors of every request (the L1-to-L2 traffic with no L1 hits): count_rt.cpp.
- aten: an ATen op the launchers, the custom ops, the Python code and autograd run
  (copies, casts, fills, sums of gradient contributions, weight packing, GEMMs), seen by
  a TorchDispatchMode. Bytes are logical: every tensor input read once (a broadcast
  input's stride-0 dims counted once), every output written once; a mutated argument is
  read and written, except by ops that only write (copy_'s and fill_'s self, out=).
  Views and allocations move nothing and are no launch; any op that moves bytes is one
  launch (a GPU may split some, e.g. a two-pass reduction, into more).
A crosslayer custom op is counted through what it runs (its kernels and ATen ops),
never as a row of its own.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HERE = os.path.dirname(os.path.abspath(__file__))
SECTOR = 32

# ATen ops whose mutated `self` is written without being read.
_WRITE_ONLY_SELF = {"copy_", "fill_", "zero_", "normal_", "uniform_", "random_", "bernoulli_",
                    "exponential_"}
# Ops that allocate or describe memory and move none.
_NO_TRAFFIC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
               "empty_permuted", "resize_", "set_", "_has_compatible_shallow_copy_type",
               "is_same_size", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset"}


def load(verbose: bool = False):
    """(counter, emulated crosslayer module), built incrementally; the counter is imported
    first so every tensor allocated afterwards is in its registry."""
    sys.path.insert(0, HERE)
    try:
        import build
    finally:
        sys.path.remove(HERE)
    module = build.load(verbose)  # imports the counter before it builds the module
    return build.load_counter(verbose), module


def unique_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a view addresses (stride-0 dims once)."""
    if t.numel() == 0:
        return 0
    return math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0) * t.element_size()


@dataclass
class Row:
    kind: str                 # "kernel" or "aten"
    name: str
    read: int                 # bytes (kernels: unique sectors x 32)
    written: int
    launch: bool              # a launch on a GPU
    detail: dict = field(default_factory=dict)  # kernels: the counter's record

    @property
    def bytes(self) -> int:
        return self.read + self.written


def _tensors(v) -> list:
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (list, tuple)):
        return [t for x in v for t in _tensors(x)]
    return []


def _aliases_an_input(args, kwargs, out) -> bool:
    """Whether every tensor `out` holds shares storage with an input: an op whose schema
    may return an alias (contiguous, reshape, to, ...) copies when it cannot view, and
    that copy is traffic and a launch like any other."""
    storages = {t.untyped_storage().data_ptr() for t in _tensors(list(args) + list(kwargs.values()))}
    return all(t.untyped_storage().data_ptr() in storages for t in _tensors(out))


def aten_row(func, args, kwargs, out) -> Row:
    """The Row of one ATen op from its schema: what it reads and writes (an op that may
    return a view counts as a copy when its output is new storage)."""
    schema = func._schema
    base = schema.name.split("::")[-1]
    name = f"{schema.name}" + (f".{schema.overload_name}" if schema.overload_name else "")
    returns_alias = any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
    if base in _NO_TRAFFIC or (returns_alias and _aliases_an_input(args, kwargs, out) and not any(
            a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)):
        return Row("aten", name, 0, 0, False)
    read = written = 0
    bound = dict(zip((a.name for a in schema.arguments), args))
    bound.update(kwargs)
    written_ids = set()
    for a in schema.arguments:
        if a.name not in bound:
            continue
        for t in _tensors(bound[a.name]):
            nbytes = unique_bytes(t)
            if a.alias_info is not None and a.alias_info.is_write:
                written += nbytes
                written_ids.add(id(t))
                if not (a.name == "out" or a.kwarg_only or (a.name == "self" and base in _WRITE_ONLY_SELF)):
                    read += nbytes
            else:
                read += nbytes
    inputs = {id(t) for t in _tensors(list(bound.values()))}
    for t in _tensors(out):
        if id(t) not in written_ids and id(t) not in inputs:  # a new tensor, not an alias of an argument
            written += unique_bytes(t)
    return Row("aten", name, read, written, read + written > 0)


def kernel_row(rec: dict) -> Row:
    read = sum(a["ld_unique_sectors"] for a in rec["allocs"]) * SECTOR
    written = sum(a["st_unique_sectors"] for a in rec["allocs"]) * SECTOR
    return Row("kernel", rec["name"], read, written, True, rec)


class Count:
    """The rows of one counted region and their sums."""

    def __init__(self):
        self.rows: list[Row] = []

    def bytes(self, kind: Optional[str] = None) -> int:
        return sum(r.bytes for r in self.rows if kind is None or r.kind == kind)

    def launches(self, kind: Optional[str] = None) -> int:
        return sum(r.launch for r in self.rows if kind is None or r.kind == kind)

    def kernels(self) -> list[Row]:
        return [r for r in self.rows if r.kind == "kernel"]

    def name_allocations(self, counter, named: dict) -> None:
        """Labels the kernels' per-allocation entries with the names of `named`'s tensors
        (name -> tensor, alive now); the others keep name None."""
        ids = {}
        for n, t in named.items():
            found = counter.allocation_of(t.data_ptr()) if t.numel() else ()
            if found:
                ids[found[0]] = n
        for r in self.kernels():
            for a in r.detail["allocs"]:
                a["name"] = ids.get(a["id"])


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, counter, count: Count):
        super().__init__()
        self.counter, self.count = counter, count
        self.paused = False

    def drain(self) -> None:
        for rec in self.counter.drain():
            self.count.rows.append(kernel_row(rec))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        self.drain()
        if func.namespace == "crosslayer":
            from torch._library.custom_ops import OPDEFS
            opdef = OPDEFS[func._schema.name]
            with self:  # what the op runs is counted, op by op
                out = opdef._init_fn(*args, **kwargs)
            self.drain()
            return out
        out = func(*args, **kwargs)
        self.count.rows.append(aten_row(func, args, kwargs, out))
        return out


_active: Optional[_DispatchCounter] = None  # the counting region running now


@contextlib.contextmanager
def counting(counter) -> Iterator[Count]:
    """Counts every kernel launch and ATen op inside the block."""
    global _active
    if _active is not None:
        raise RuntimeError("counting regions do not nest")
    count = Count()
    mode = _DispatchCounter(counter, count)
    counter.begin()
    _active = mode
    try:
        with mode:
            yield count
    finally:
        _active = None
        counter.end()
        mode.drain()


@contextlib.contextmanager
def excluded() -> Iterator[None]:
    """Nothing inside the block is counted by the region running now (if any), e.g. a
    stand-in for a model's own layers between the connections being counted: the forward
    of an autograd Function and, in the backward's region, its backward."""
    mode = _active
    if mode is None or mode.paused:
        yield
        return
    mode.drain()
    mode.paused = True
    mode.counter.end()
    try:
        yield
    finally:
        mode.paused = False
        mode.counter.begin()


@contextlib.contextmanager
def device_sms(counter, sms: int) -> Iterator[None]:
    """The emulated device reports `sms` SMs inside the block (grids sized by the SM
    count, persistent or split-K, scale with it)."""
    previous = counter.sm_count()
    counter.set_sm_count(sms)
    try:
        yield
    finally:
        counter.set_sm_count(previous)
