"""csrc/hc_tile.h: the host side of kernels/hc_tile.cuh, shared by the launchers of the
token-tile kernels (hc_post, stream_mix): their params' streams part, the stream shape
and the launch."""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch

from crosslayer._checks import acc_dtype
from crosslayer._jit import layout as L
from crosslayer._jit.common import MAX_STREAMS, dispatch_streams, kernel_type, token_tile_block, vec16
from crosslayer._jit.runtime import cover_grid, launch
from crosslayer._jit.structs import Params, TokenLayout, c_int, c_int64, c_void_p


class HcTileParams(Params):
    """kernels/hc_tile.cuh."""
    _fields_ = [("n_tokens", c_int64), ("d", c_int64), ("n", c_int), ("h_tok", TokenLayout),
                ("h_stream_stride", c_int64), ("h_ptr", c_void_p)]


def launch_hc_tile(kernel: str, header: str, dtype: torch.dtype, p, vectorize: bool, coef_per_row: int,
                   dots_per_warp: int, device: torch.device,
                   kernel_vec: Optional[Callable[[int, int], int]] = None) -> None:
    """csrc/hc_tile.h launch_hc_tile: `kernel`<T, kvec, kn>, or <T, kernel_vec(kvec, kn),
    kn> where the C++ launcher's kernel_for narrows the vector width."""
    acc_bytes = acc_dtype(dtype).itemsize
    vec = vec16(dtype) if vectorize else 1
    threads_x, rows, smem = token_tile_block(p.n_tokens, p.d, vec, acc_bytes * coef_per_row,
                                             acc_bytes * dots_per_warp)
    kn = dispatch_streams(p.n, (2, 4, 8), 0)
    kvec = kernel_vec(vec, kn) if kernel_vec is not None else vec
    launch(header, f"crosslayer::{kernel}<{kernel_type(dtype)}, {kvec}, {kn}>", (cover_grid(p.n_tokens, rows),),
           (threads_x, rows), smem, p, device)


def stream_shape(H: torch.Tensor) -> Tuple[list, int, int, int]:
    """(lead, N, n, d) of the streams H (*lead, n, d), 1 <= n <= kMaxStreams
    (common/layout.h check_streams; the public functions have validated the rest)."""
    lead = list(H.shape[:-2])
    n = H.size(-2)
    assert 1 <= n <= MAX_STREAMS, f"H must have 1 to {MAX_STREAMS} streams, got {n}"
    return lead, math.prod(lead), n, H.size(-1)


def fill_tile_streams(p: HcTileParams, N: int, n: int, d: int, H: torch.Tensor) -> torch.Tensor:
    """csrc/hc_tile.h: the streams part of a tile kernel's params; the tensor it reads."""
    p.n_tokens, p.d, p.n = N, d, n
    h, p.h_tok = L.readable(H, 2)
    p.h_stream_stride = L.stream_stride(h)
    p.h_ptr = h.data_ptr()
    return h
