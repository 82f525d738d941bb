"""csrc/stream_mix.cu: stream_mix's launchers."""

from __future__ import annotations

import torch

from crosslayer._checks import acc_dtype
from crosslayer._jit import layout as L
from crosslayer._jit.common import vectorizable
from crosslayer._jit.hc_tile import HcTileParams, fill_tile_streams, launch_hc_tile, stream_shape
from crosslayer._jit.structs import TokenLayout, c_bool, c_int64, c_void_p
from crosslayer._jit.token_sums import TokenSums


class StreamMixParams(HcTileParams):
    """kernels/stream_mix.cuh."""
    _fields_ = [("w_token_stride", c_int64), ("w_col_stride", c_int64), ("x_tok", TokenLayout), ("g_tok", TokenLayout),
                ("dh_tok", TokenLayout), ("dh_stream_stride", c_int64), ("accumulate_dh", c_bool),
                ("w_ptr", c_void_p), ("x_ptr", c_void_p), ("g_ptr", c_void_p), ("dh_ptr", c_void_p),
                ("dw_ptr", c_void_p)]


PARAMS = {"stream_mix_fwd_kernel": StreamMixParams, "stream_mix_bwd_kernel": StreamMixParams}


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
