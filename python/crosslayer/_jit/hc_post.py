"""csrc/hc_post.cu and hc_post.h: hc_post's launchers."""

from __future__ import annotations

from typing import List, Tuple

import torch

from crosslayer._checks import acc_dtype
from crosslayer._jit import layout as L
from crosslayer._jit.common import vectorizable
from crosslayer._jit.hc_tile import HcTileParams, fill_tile_streams, launch_hc_tile, stream_shape
from crosslayer._jit.structs import TokenLayout, c_int64, c_void_p
from crosslayer._jit.token_sums import TokenSums


class HcPostParams(HcTileParams):
    """kernels/hc_post.cuh (HcTileParams' fields first, as the C++ base)."""
    _fields_ = [("y_tok", TokenLayout), ("a_token_stride", c_int64), ("b_token_stride", c_int64),
                ("out_tok", TokenLayout), ("out_stream_stride", c_int64), ("g_tok", TokenLayout),
                ("g_stream_stride", c_int64), ("dh_tok", TokenLayout), ("dh_stream_stride", c_int64),
                ("dy_tok", TokenLayout), ("y_ptr", c_void_p), ("a_ptr", c_void_p), ("b_ptr", c_void_p),
                ("out_ptr", c_void_p), ("g_ptr", c_void_p), ("dh_ptr", c_void_p), ("dy_ptr", c_void_p),
                ("da_ptr", c_void_p), ("db_ptr", c_void_p)]


PARAMS = {"hc_post_fwd_kernel": HcPostParams, "hc_post_bwd_kernel": HcPostParams}


class HcPostInputs:
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


def hc_post_coef_grads(inp: HcPostInputs, dalpha_tok: torch.Tensor, dbeta_tok: torch.Tensor, alpha: torch.Tensor,
                       beta: torch.Tensor, sums: TokenSums) -> List[torch.Tensor]:
    """csrc/hc_post.h hc_post_coef_grads: the per-token rows (N, n, n+1), (N, n) as the
    gradients of alpha and beta (summed over tokens by the caller's next sums.run() for
    static coefficients, else viewed in the coefficient's shape)."""
    return [sums.grad(dalpha_tok.view(inp.N, -1), inp.static_alpha, alpha.shape),
            sums.grad(dbeta_tok, inp.static_beta, beta.shape)]


def hc_post_fwd_output(p: HcPostParams, H_next: torch.Tensor) -> torch.Tensor:
    """The post's output H' in p (out_tok, out_stream_stride, out_ptr), as hc_post.cu and
    hc_boundary_fwd.cu fill it: returns the tensor the kernel writes (H', or a scratch
    for L.copy_back)."""
    out, p.out_tok = L.writable(H_next, 2)
    p.out_stream_stride = L.stream_stride(out)
    p.out_ptr = out.data_ptr()
    return out


def hc_post_bwd_operands(p: HcPostParams, dH_next: torch.Tensor, dH: torch.Tensor, dy: torch.Tensor,
                         dalpha_tok: torch.Tensor, dbeta_tok: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The post's backward operands in p (g: dH', dh: dH, dy and the per-token coefficient
    rows), as hc_post.cu and hc_boundary_bwd.cu fill them: returns (g, dh), the tensors
    the kernel reads and writes (copies / a scratch for L.copy_back where needed)."""
    g, p.g_tok = L.readable(dH_next, 2)
    dh, p.dh_tok = L.writable(dH, 2)
    p.dy_tok = L.collapse_token_dims(dy.shape[:-1], dy.stride()[:-1])
    p.g_stream_stride = L.stream_stride(g)
    p.dh_stream_stride = L.stream_stride(dh)
    p.g_ptr, p.dh_ptr, p.dy_ptr = g.data_ptr(), dh.data_ptr(), dy.data_ptr()
    p.da_ptr, p.db_ptr = dalpha_tok.data_ptr(), dbeta_tok.data_ptr()
    return g, dh


def hc_post_accesses(p: HcPostParams, backward: bool) -> list:
    """The post's (pointer, TokenLayout, stream stride) accesses for vectorizable: H and
    y, then H' (forward) or dH', dH and dy (backward)."""
    accesses = [(p.h_ptr, p.h_tok, p.h_stream_stride), (p.y_ptr, p.y_tok, 0)]
    if backward:
        return accesses + [(p.g_ptr, p.g_tok, p.g_stream_stride), (p.dh_ptr, p.dh_tok, p.dh_stream_stride),
                           (p.dy_ptr, p.dy_tok, 0)]
    return accesses + [(p.out_ptr, p.out_tok, p.out_stream_stride)]


def hc_post_fwd(H: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """csrc/hc_post.cu hc_post_fwd: H' = hc_post(H, y, alpha, beta), allocated like H."""
    inp = HcPostInputs(H, y, alpha, beta)
    out = torch.empty_like(H)
    if inp.N == 0 or inp.d == 0:
        return out
    p = inp.p
    o = hc_post_fwd_output(p, out)
    vectorize = vectorizable(H.dtype, *hc_post_accesses(p, backward=False))
    launch_hc_tile("hc_post_fwd_kernel", "kernels/hc_post.cuh", H.dtype, p, vectorize, p.n * (p.n + 2), 0, H.device)
    L.copy_back(out, o)
    return out


def hc_post_bwd(dHn: torch.Tensor, H: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor,
                beta: torch.Tensor) -> List[torch.Tensor]:
    """csrc/hc_post.cu hc_post_bwd: [dH (H's layout), dy, dalpha, dbeta]."""
    inp = HcPostInputs(H, y, alpha, beta)
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
    g, dh = hc_post_bwd_operands(p, dHn, dH, dy, dalpha_tok, dbeta_tok)
    vectorize = vectorizable(H.dtype, *hc_post_accesses(p, backward=True))
    launch_hc_tile("hc_post_bwd_kernel", "kernels/hc_post.cuh", H.dtype, p, vectorize, n * (n + 2), n * (n + 1),
                   H.device)
    L.copy_back(dH, dh)
    sums = TokenSums(inp.N)
    dalpha, dbeta = hc_post_coef_grads(inp, dalpha_tok, dbeta_tok, alpha, beta, sums)
    sums.run()
    return [dH, dy, dalpha, dbeta]
