"""The launchers' shared host rules (csrc/common/dispatch.h, vec.cuh, tokens.cuh):
the kernels' element types, the 16-byte vector path, the stream-count dispatch and the
token-tile block."""

from __future__ import annotations

from typing import Sequence, Tuple

import torch

from crosslayer._jit import layout as L
from crosslayer._jit.structs import header_constant

KERNEL_TYPES = {torch.float32: "float", torch.float64: "double", torch.float16: "__half",
                torch.bfloat16: "__nv_bfloat16"}
TOKEN_TILE_THREADS = header_constant("kTokenTileThreads", "common/tokens.cuh")
MAX_STREAMS = header_constant("kMaxStreams", "common/limits.h")
WARP_SIZE = header_constant("kWarpSize", "common/reduce.cuh")
SMEM_BUDGET = 48 * 1024  # token_tile_block's


def kernel_type(dtype: torch.dtype) -> str:
    if dtype not in KERNEL_TYPES:
        raise TypeError(f"crosslayer's kernels take float32, float64, float16 or bfloat16 tensors, got {dtype}")
    return KERNEL_TYPES[dtype]


def vec16(dtype: torch.dtype) -> int:
    """common/vec.cuh kVec16<T>: elements in 16 bytes."""
    return 16 // dtype.itemsize


def vectorizable(dtype: torch.dtype, *accesses) -> bool:
    """The launchers' 16-byte path test: vec_ok of every (pointer, TokenLayout, stream
    stride) the kernel reads or writes."""
    vec = vec16(dtype)
    return all(L.vec_ok(ptr, tok, stream, vec) for ptr, tok, stream in accesses)


def dispatch_streams(n: int, exact: Sequence[int], generic: int) -> int:
    """common/dispatch.h dispatch_streams<generic, exact...>(n): n when exact, else generic."""
    return n if n in exact else generic


def token_tile_block(n_tokens: int, d: int, vec: int, row_bytes: int, warp_bytes: int) -> Tuple[int, int, int]:
    """common/tokens.cuh: (threads_x, rows, smem_bytes) of a token-tile kernel."""
    chunks = (d + vec - 1) // vec
    rounded = (chunks + 31) // 32 * 32
    threads_x = max(32, rounded) if rounded < TOKEN_TILE_THREADS else TOKEN_TILE_THREADS
    row_total = row_bytes + (threads_x // 32) * warp_bytes
    rows = TOKEN_TILE_THREADS // threads_x
    rows = min(rows, SMEM_BUDGET // row_total, n_tokens)
    rows = max(rows, 1)
    return threads_x, rows, rows * row_total
