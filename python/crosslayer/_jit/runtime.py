"""Launching NVRTC-compiled kernels (crosslayer._nvrtc) from Python on torch's current
stream, through CuPy's driver binding: the JIT path's `launch` (csrc/common/launch.h's).

`launch(header, kernel, grid, block, smem, params)` compiles the instantiation `kernel`
(a name expression, "crosslayer::hc_post_fwd_kernel<float, 4, 4>") of the template in
`header` for the current device's architecture once a process (the cubin also cached on
disk by _nvrtc), loads it, opts in to more than 48 KB of dynamic shared memory where
asked, and launches it with the params structure by value. Inside `planning()` nothing
is compiled or launched: each launch is recorded instead (the plan-equality test).
A kernel's first launch loads its module, which a CUDA graph capture does not allow:
run a call once before capturing, as for any lazily loaded kernel."""

from __future__ import annotations

import contextlib
import ctypes
import functools
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch

from crosslayer import _nvrtc

CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8


@dataclass
class Launch:
    """One launch as planned: the kernel's name expression, grid, block, dynamic shared
    memory and the params structure's bytes."""
    kernel: str
    grid: Tuple[int, int, int]
    block: Tuple[int, int, int]
    smem: int
    args: bytes


_planned: Optional[List[Launch]] = None


@contextlib.contextmanager
def planning() -> Iterator[List[Launch]]:
    """Within the block, launches are recorded into the yielded list, not run (the
    tensors may be on the CPU)."""
    global _planned
    previous, _planned = _planned, []
    try:
        yield _planned
    finally:
        _planned = previous


def cover_grid(items: int, per_block: int) -> int:
    """common/launch.h: blocks of `per_block` covering `items`, capped at the x limit."""
    return min((items + per_block - 1) // per_block, 2 ** 31 - 1)


@functools.lru_cache(maxsize=None)
def _function(header: str, kernel: str, arch: str, device: int):
    """The loaded kernel (cupy Function) on `device`: compiled once a process a kernel."""
    from cupy.cuda import function as cupy_function

    compiled = _nvrtc.compile_kernels(header, [kernel], arch)
    module = cupy_function.Module()
    module.load(compiled.cubin)
    return module, module.get_function(compiled.lowered[kernel])


def device_arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def launch(header: str, kernel: str, grid, block, smem: int, params: ctypes.Structure, device: torch.device) -> None:
    grid = tuple(grid) + (1,) * (3 - len(grid))
    block = tuple(block) + (1,) * (3 - len(block))
    if _planned is not None:
        _planned.append(Launch(kernel, grid, block, smem, bytes(params)))
        return
    from cupy_backends.cuda.api import driver

    index = device.index if device.index is not None else torch.cuda.current_device()
    # The module is loaded into, and the launch made in, the tensors' device's primary
    # context (torch's), whatever device is current.
    with torch.cuda.device(index):
        _, function = _function(header, kernel, device_arch(device), index)
        if smem > 48 * 1024:
            driver.funcSetAttribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, function.ptr, smem)
        args = (ctypes.c_void_p * 1)(ctypes.addressof(params))
        stream = torch.cuda.current_stream(index).cuda_stream
        driver.launchKernel(function.ptr, *grid, *block, smem, stream, ctypes.addressof(args), 0)
