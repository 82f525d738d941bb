"""The JIT path's launchers: the functions of crosslayer._C that it covers, with the
same signatures and results, written in Python over torch tensors and launching the
NVRTC-compiled kernels (runtime.launch). Each mirrors the C++ launcher of the same name
line for line (csrc/hc_post.cu, hc_post.h, stream_mix.cu, hc_tile.h, token_sums.h); the
plan-equality test (tests/test_jit_plan.py) holds every launch -- kernel, grid, block,
shared memory, params bytes -- to the C++ launcher's on the CPU emulator."""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch

from crosslayer._checks import acc_dtype
from crosslayer._jit import layout as L
from crosslayer._jit.runtime import cover_grid, launch
from crosslayer._jit.structs import (HcPostParams, HcTileParams, StreamMixParams, TokenSumsParams, TokenSumsSegment,
                                     header_constant)

# The ops whose launchers this module has (crosslayer._extension's backend choice).
OPS = ("hc_post", "stream_mix")

KERNEL_TYPES = {torch.float32: "float", torch.float64: "double", torch.float16: "__half",
                torch.bfloat16: "__nv_bfloat16"}
TOKEN_TILE_THREADS = header_constant("kTokenTileThreads", "common/tokens.cuh")
TOKEN_SUMS_THREADS = header_constant("kTokenSumsThreads", "kernels/token_sums.cuh")
TOKEN_SUMS_MAX_SEGMENTS = header_constant("kTokenSumsMaxSegments", "kernels/token_sums.cuh")
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


def launch_hc_tile(kernel: str, header: str, dtype: torch.dtype, p, vectorize: bool, coef_per_row: int,
                   dots_per_warp: int, device: torch.device) -> None:
    """csrc/hc_tile.h launch_hc_tile."""
    acc_bytes = acc_dtype(dtype).itemsize
    vec = vec16(dtype) if vectorize else 1
    threads_x, rows, smem = token_tile_block(p.n_tokens, p.d, vec, acc_bytes * coef_per_row,
                                             acc_bytes * dots_per_warp)
    kn = dispatch_streams(p.n, (2, 4, 8), 0)
    launch(header, f"crosslayer::{kernel}<{kernel_type(dtype)}, {vec}, {kn}>", (cover_grid(p.n_tokens, rows),),
           (threads_x, rows), smem, p, device)


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


class _HcPostInputs:
    """csrc/hc_post.h hc_post_inputs: the checked inputs, the tensors the kernels read and
    the params both directions share."""

    def __init__(self, H, y, alpha, beta):
        self.lead, self.N, self.n, self.d = stream_shape(H)
        n = self.n
        self.static_alpha = tuple(alpha.shape) == (n, n + 1)
        self.static_beta = tuple(beta.shape) == (n,)
        self.p = p = HcPostParams()
        if self.N == 0 or self.d == 0:
            return
        acc = acc_dtype(H.dtype)
        self.H = fill_tile_streams(p, self.N, n, self.d, H)
        self.y, p.y_tok = L.readable(y, 1)
        self.alpha = alpha.to(acc).contiguous()
        self.beta = beta.to(acc).contiguous()
        p.a_token_stride = 0 if self.static_alpha else n * (n + 1)
        p.b_token_stride = 0 if self.static_beta else n
        p.y_ptr, p.a_ptr, p.b_ptr = self.y.data_ptr(), self.alpha.data_ptr(), self.beta.data_ptr()


def hc_post_fwd(H: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """csrc/hc_post.cu hc_post_fwd: H' = hc_post(H, y, alpha, beta), allocated like H."""
    inp = _HcPostInputs(H, y, alpha, beta)
    out = torch.empty_like(H)
    if inp.N == 0 or inp.d == 0:
        return out
    p = inp.p
    o, p.out_tok = L.writable(out, 2)
    p.out_stream_stride = L.stream_stride(o)
    p.out_ptr = o.data_ptr()
    vectorize = vectorizable(H.dtype, (p.h_ptr, p.h_tok, p.h_stream_stride), (p.y_ptr, p.y_tok, 0),
                             (p.out_ptr, p.out_tok, p.out_stream_stride))
    launch_hc_tile("hc_post_fwd_kernel", "kernels/hc_post.cuh", H.dtype, p, vectorize, p.n * (p.n + 2), 0, H.device)
    L.copy_back(out, o)
    return out


def hc_post_bwd(dHn: torch.Tensor, H: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor,
                beta: torch.Tensor) -> List[torch.Tensor]:
    """csrc/hc_post.cu hc_post_bwd: [dH (H's layout), dy, dalpha, dbeta]."""
    inp = _HcPostInputs(H, y, alpha, beta)
    acc = acc_dtype(H.dtype)
    dH = torch.empty_like(H)
    dy = torch.empty((*inp.lead, inp.d), dtype=y.dtype, device=y.device)
    if inp.N == 0 or inp.d == 0:
        return [dH, dy, torch.zeros(alpha.shape, dtype=acc, device=H.device),
                torch.zeros(beta.shape, dtype=acc, device=H.device)]
    n = inp.n
    dalpha_tok = torch.empty((inp.N, n, n + 1), dtype=acc, device=H.device)
    dbeta_tok = torch.empty((inp.N, n), dtype=acc, device=H.device)
    p = inp.p
    g, p.g_tok = L.readable(dHn, 2)
    dh, p.dh_tok = L.writable(dH, 2)
    p.dy_tok = L.collapse_token_dims(dy.shape[:-1], dy.stride()[:-1])
    p.g_stream_stride = L.stream_stride(g)
    p.dh_stream_stride = L.stream_stride(dh)
    p.g_ptr, p.dh_ptr, p.dy_ptr = g.data_ptr(), dh.data_ptr(), dy.data_ptr()
    p.da_ptr, p.db_ptr = dalpha_tok.data_ptr(), dbeta_tok.data_ptr()
    vectorize = vectorizable(H.dtype, (p.h_ptr, p.h_tok, p.h_stream_stride), (p.y_ptr, p.y_tok, 0),
                             (p.g_ptr, p.g_tok, p.g_stream_stride), (p.dh_ptr, p.dh_tok, p.dh_stream_stride),
                             (p.dy_ptr, p.dy_tok, 0))
    launch_hc_tile("hc_post_bwd_kernel", "kernels/hc_post.cuh", H.dtype, p, vectorize, n * (n + 2), n * (n + 1),
                   H.device)
    L.copy_back(dH, dh)
    sums = TokenSums(inp.N)
    dalpha = sums.grad(dalpha_tok.view(inp.N, -1), inp.static_alpha, alpha.shape)
    dbeta = sums.grad(dbeta_tok, inp.static_beta, beta.shape)
    sums.run()
    return [dH, dy, dalpha, dbeta]


class _StreamMixInputs:
    """csrc/stream_mix.cu stream_mix_inputs."""

    def __init__(self, H, w):
        self.lead, self.N, self.n, self.d = stream_shape(H)
        n = self.n
        self.static_w = tuple(w.shape) == (n,)
        self.p = p = StreamMixParams()
        if self.N == 0 or self.d == 0:
            return
        self.H = fill_tile_streams(p, self.N, n, self.d, H)
        # Static w in the accumulator dtype is read where it lies (any element stride),
        # anything else as contiguous rows.
        acc = acc_dtype(H.dtype)
        self.w = w if self.static_w and w.dtype == acc else w.to(acc).contiguous()
        p.w_token_stride = 0 if self.static_w else n
        p.w_col_stride = self.w.stride(-1) if self.static_w else 1
        p.w_ptr = self.w.data_ptr()


def _launch_stream_mix(kernel: str, dtype: torch.dtype, p, vectorize: bool, dots: int, device) -> None:
    launch_hc_tile(kernel, "kernels/stream_mix.cuh", dtype, p, vectorize, p.n, dots, device)


def stream_mix_fwd(H: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """csrc/stream_mix.cu stream_mix_fwd: x (*lead, d) = Σ_i w_i·H_i, contiguous."""
    inp = _StreamMixInputs(H, w)
    x = torch.empty((*inp.lead, inp.d), dtype=H.dtype, device=H.device)
    if inp.N == 0 or inp.d == 0:
        return x
    p = inp.p
    p.x_tok = L.collapse_token_dims(x.shape[:-1], x.stride()[:-1])
    p.x_ptr = x.data_ptr()
    vectorize = vectorizable(H.dtype, (p.h_ptr, p.h_tok, p.h_stream_stride), (p.x_ptr, p.x_tok, 0))
    _launch_stream_mix("stream_mix_fwd_kernel", H.dtype, p, vectorize, 0, H.device)
    return x


def stream_mix_bwd(dH: torch.Tensor, accumulate: bool, dx: torch.Tensor, H: torch.Tensor,
                   w: torch.Tensor) -> torch.Tensor:
    """csrc/stream_mix.cu stream_mix_bwd: dH written (=) or added to (+=) in place; dw."""
    inp = _StreamMixInputs(H, w)
    acc = acc_dtype(H.dtype)
    if inp.N == 0 or inp.d == 0:
        return torch.zeros(w.shape, dtype=acc, device=H.device)
    dw_tok = torch.empty((inp.N, inp.n), dtype=acc, device=H.device)
    p = inp.p
    g, p.g_tok = L.readable(dx, 1)
    dh, p.dh_tok = L.writable(dH, 2, keep_values=accumulate)
    p.dh_stream_stride = L.stream_stride(dh)
    p.accumulate_dh = accumulate
    p.g_ptr, p.dh_ptr, p.dw_ptr = g.data_ptr(), dh.data_ptr(), dw_tok.data_ptr()
    vectorize = vectorizable(H.dtype, (p.h_ptr, p.h_tok, p.h_stream_stride), (p.g_ptr, p.g_tok, 0),
                             (p.dh_ptr, p.dh_tok, p.dh_stream_stride))
    _launch_stream_mix("stream_mix_bwd_kernel", H.dtype, p, vectorize, p.n, H.device)
    L.copy_back(dH, dh)
    sums = TokenSums(inp.N)
    dw = sums.grad(dw_tok, inp.static_w, w.shape)
    sums.run()
    return dw


def stream_mix_dots(dx: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """csrc/stream_mix.cu stream_mix_dots: dw (*lead, n) = <dx, H_i> per token."""
    lead, N, n, d = stream_shape(H)
    acc = acc_dtype(H.dtype)
    if N == 0 or d == 0:
        return torch.zeros((*lead, n), dtype=acc, device=H.device)
    dw = torch.empty((*lead, n), dtype=acc, device=H.device)
    p = StreamMixParams()
    h = fill_tile_streams(p, N, n, d, H)
    g, p.g_tok = L.readable(dx, 1)
    p.g_ptr, p.dw_ptr = g.data_ptr(), dw.data_ptr()  # w_ptr, dh_ptr null: the dots alone
    vectorize = vectorizable(H.dtype, (p.h_ptr, p.h_tok, p.h_stream_stride), (p.g_ptr, p.g_tok, 0))
    _launch_stream_mix("stream_mix_bwd_kernel", H.dtype, p, vectorize, p.n, H.device)
    del h  # the tensor the kernel reads (H or its copy) lives until the launch is queued
    return dw
