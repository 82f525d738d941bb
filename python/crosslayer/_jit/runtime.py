"""Launching NVRTC-compiled kernels (crosslayer._nvrtc) from Python on torch's current
stream, through CuPy's driver binding: the JIT path's `launch` (csrc/common/launch.h's).

`launch(header, kernel, grid, block, smem, params, device)` compiles the instantiation `kernel`
(a name expression, "crosslayer::hc_post_fwd_kernel<float, 4, 4>") of the template in
`header` for the current device's architecture once a process (the cubin also cached on
disk by _nvrtc), loads it, opts in to more than 48 KB of dynamic shared memory where
asked, and launches it with the params structure by value. The launchers ask the
device what common/launch.h asks it (`device_model`: SM count, shared memory, L2) and
how many blocks of a kernel it holds (`resident_grid`). Inside `planning(model)` nothing
is compiled or launched: each launch is recorded instead, and `model` answers for the
device (the plan-equality test gives the CPU emulator's).
A kernel's first launch loads its module, which a CUDA graph capture does not allow:
run a call once before capturing, as for any lazily loaded kernel."""

from __future__ import annotations

import contextlib
import ctypes
import functools
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from crosslayer import _nvrtc

CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8


@dataclass
class Launch:
    """One launch as planned: the kernel's name expression, grid, block, dynamic shared
    memory, the params structure's bytes and the header (under csrc/) that defines it."""
    kernel: str
    grid: Tuple[int, int, int]
    block: Tuple[int, int, int]
    smem: int
    args: bytes
    header: str


@dataclass(frozen=True)
class DeviceModel:
    """The device attributes the launchers use (cudaDeviceGetAttribute's) and its
    occupancy rule: occupancy(threads, smem) = resident blocks an SM of a kernel; None
    for a real GPU, where the driver answers for the compiled kernel itself."""
    sms: int
    smem_optin: int
    smem_per_sm: int
    l2_bytes: int
    capability: Tuple[int, int]
    occupancy: Optional[Callable[[int, int], int]] = None


_planned: Optional[List[Launch]] = None
_planned_device: Optional[DeviceModel] = None


@contextlib.contextmanager
def planning(device: DeviceModel) -> Iterator[List[Launch]]:
    """Within the block, launches are recorded into the yielded list, not run, and
    `device` (its occupancy rule given) stands for the GPU: the tensors may be on the CPU."""
    global _planned, _planned_device
    if device.occupancy is None:
        raise ValueError("planning: the device model needs an occupancy rule")
    previous = _planned, _planned_device
    _planned, _planned_device = [], device
    try:
        yield _planned
    finally:
        _planned, _planned_device = previous


@functools.lru_cache(maxsize=None)
def _cuda_device_model(index: int) -> DeviceModel:
    props = torch.cuda.get_device_properties(index)
    return DeviceModel(props.multi_processor_count, props.shared_memory_per_block_optin,
                       props.shared_memory_per_multiprocessor, props.L2_cache_size, (props.major, props.minor))


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def device_model(device: torch.device) -> DeviceModel:
    """common/launch.h device_attribute: the planned device inside planning(), else the
    GPU `device`'s attributes."""
    if _planned_device is not None:
        return _planned_device
    return _cuda_device_model(_device_index(device))


def has_mma_sync_16bit(device: torch.device) -> bool:
    """common/launch.h: the device runs the bf16/fp16 mma.sync kernels (sm 8.0 on)."""
    return device_model(device).capability[0] >= 8


def resident_grid(header: str, kernel: str, blocks: int, threads: int, smem: int, device: torch.device,
                  per_sm_cap: Optional[int] = None) -> int:
    """common/launch.h resident_grid: at most `blocks`, at most what the device holds at
    once of `kernel` with `threads` threads and `smem` bytes (at most `per_sm_cap` an SM)."""
    model = device_model(device)
    if model.occupancy is not None:
        per_sm = model.occupancy(threads, smem)
    else:
        from cupy_backends.cuda.api import driver

        index = _device_index(device)
        with torch.cuda.device(index):
            function = _prepared(header, kernel, index, smem)
            per_sm = driver.occupancyMaxActiveBlocksPerMultiprocessor(function.ptr, threads, smem)
    per_sm = max(per_sm, 1)
    if per_sm_cap is not None:
        per_sm = min(per_sm, per_sm_cap)
    return min(blocks, per_sm * model.sms)


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


def device_arch(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


# The largest dynamic shared memory each loaded kernel (by its function pointer) has
# been allowed: the attribute is a maximum, so one driver call per new high, not one a
# launch.
_smem_allowed: Dict[int, int] = {}


def _prepared(header: str, kernel: str, index: int, smem: int):
    """The loaded kernel on device `index` (current), allowed `smem` bytes of dynamic
    shared memory (common/launch.h allow_smem: the opt-in above 48 KB)."""
    from cupy_backends.cuda.api import driver

    _, function = _function(header, kernel, device_arch(index), index)
    if smem > max(48 * 1024, _smem_allowed.get(function.ptr, 0)):
        driver.funcSetAttribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, function.ptr, smem)
        _smem_allowed[function.ptr] = smem
    return function


def launch(header: str, kernel: str, grid, block, smem: int, params: ctypes.Structure, device: torch.device) -> None:
    grid = tuple(grid) + (1,) * (3 - len(grid))
    block = tuple(block) + (1,) * (3 - len(block))
    if _planned is not None:
        _planned.append(Launch(kernel, grid, block, smem, bytes(params), header))
        return
    from cupy_backends.cuda.api import driver

    index = _device_index(device)
    # The module is loaded into, and the launch made in, the tensors' device's primary
    # context (torch's), whatever device is current.
    with torch.cuda.device(index):
        function = _prepared(header, kernel, index, smem)
        args = (ctypes.c_void_p * 1)(ctypes.addressof(params))
        stream = torch.cuda.current_stream(index).cuda_stream
        driver.launchKernel(function.ptr, *grid, *block, smem, stream, ctypes.addressof(args), 0)
