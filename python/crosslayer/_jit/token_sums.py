"""csrc/token_sums.h: the gradients of a launcher's coefficients from the per-token
rows its backward kernel wrote, every static one summed over tokens in one launch."""

from __future__ import annotations

import ctypes
from typing import List

import torch

from crosslayer._jit.common import WARP_SIZE, kernel_type
from crosslayer._jit.runtime import cover_grid, launch
from crosslayer._jit.structs import Params, c_int, c_int64, c_void_p, header_constant

TOKEN_SUMS_THREADS = header_constant("kTokenSumsThreads", "kernels/token_sums.cuh")
TOKEN_SUMS_MAX_SEGMENTS = header_constant("kTokenSumsMaxSegments", "kernels/token_sums.cuh")


class TokenSumsSegment(ctypes.Structure):
    """kernels/token_sums.cuh."""
    _fields_ = [("rows", c_void_p), ("cols", c_int64), ("out", c_void_p), ("outputs", c_int64), ("div", c_int64),
                ("col0", c_int64), ("width", c_int64)]


class TokenSumsParams(Params):
    """kernels/token_sums.cuh."""
    _fields_ = [("n_tokens", c_int64), ("segments", c_int), ("seg", TokenSumsSegment * TOKEN_SUMS_MAX_SEGMENTS)]


PARAMS = {"token_sums_kernel": TokenSumsParams}


class TokenSums:
    """csrc/token_sums.h: per-token rows summed over tokens, segments in one launch."""

    def __init__(self, n_tokens: int):
        self.n_tokens = n_tokens
        self.segs: List[tuple] = []

    def grad(self, rows: torch.Tensor, is_static: bool, shape, div: int = 1) -> torch.Tensor:
        if not is_static:
            return rows.view(shape)
        return self.sum(rows, shape, div, 0, 1)

    def sum(self, rows: torch.Tensor, shape, div: int, col0: int, width: int) -> torch.Tensor:
        assert len(self.segs) < TOKEN_SUMS_MAX_SEGMENTS, "token_sums: too many segments"
        out = torch.empty(shape, dtype=rows.dtype, device=rows.device)
        self.segs.append((rows, out, div, col0, width))
        return out

    def run(self) -> None:
        if not self.segs:
            return
        p = TokenSumsParams()
        p.n_tokens = self.n_tokens
        p.segments = len(self.segs)
        outputs = 0
        for s, (rows, out, div, col0, width) in enumerate(self.segs):
            p.seg[s] = TokenSumsSegment(rows.data_ptr(), rows.size(1), out.data_ptr(), out.numel(), div, col0, width)
            outputs += out.numel()
        rows = self.segs[0][0]
        warp_sums = TOKEN_SUMS_THREADS // WARP_SIZE * torch.float64.itemsize  # a double a warp
        launch("kernels/token_sums.cuh", f"crosslayer::token_sums_kernel<{kernel_type(rows.dtype)}>",
               (cover_grid(outputs, 1),), (TOKEN_SUMS_THREADS,), warp_sums, p, rows.device)
        self.segs.clear()
