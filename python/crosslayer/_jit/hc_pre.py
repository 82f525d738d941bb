"""csrc/hc_pre.cu and hc_pre.h: dynamic HC's hc_pre launchers and the host side they
share with the boundary's (crosslayer._jit.hc_boundary): the params, W's packing, the
block shape, the backward's persistent grid, workspaces and parameter gradients."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Optional

import torch

from crosslayer._checks import acc_dtype
from crosslayer._jit import layout as L
from crosslayer._jit.common import MAX_STREAMS, dispatch_streams, kernel_type, vectorizable, vec16
from crosslayer._jit.hc_tile import stream_shape
from crosslayer._jit.runtime import cover_grid, device_model, launch, resident_grid
from crosslayer._jit.structs import Params, TokenLayout, c_bool, c_int, c_int64, c_void_p, header_constant

c_double = ctypes.c_double

HEADER = "kernels/hc_pre.cuh"
HC_PRE_THREADS = header_constant("kHcPreThreads", HEADER)
PARAM_GRADS_THREADS = header_constant("kHcPreParamGradsThreads", "hc_pre.h")


class HcPreParams(Params):
    """kernels/hc_pre.cuh."""
    _fields_ = [("n_tokens", c_int64), ("d", c_int64), ("n", c_int), ("ldw", c_int64), ("h_tok", TokenLayout),
                ("h_stream_stride", c_int64), ("x_tok", TokenLayout), ("dh_tok", TokenLayout),
                ("dh_stream_stride", c_int64), ("eps", c_double), ("h_ptr", c_void_p), ("wt_ptr", c_void_p),
                ("a_ptr", c_void_p), ("b_ptr", c_void_p), ("sa_ptr", c_void_p), ("sb_ptr", c_void_p),
                ("x_ptr", c_void_p), ("alpha_ptr", c_void_p), ("beta_ptr", c_void_p), ("q_ptr", c_void_p),
                ("r_ptr", c_void_p), ("dx_ptr", c_void_p), ("dalpha_ptr", c_void_p), ("dbeta_ptr", c_void_p),
                ("dh_ptr", c_void_p), ("dw_ws_ptr", c_void_p), ("coef_ws_ptr", c_void_p),
                ("accumulate_dh", c_bool), ("dw_in_smem", c_bool)]


class HcPreGradsParams(Params):
    """kernels/hc_pre.cuh."""
    _fields_ = [("d", c_int64), ("ldw", c_int64), ("blocks", c_int64), ("n", c_int), ("dw_ws_ptr", c_void_p),
                ("coef_ws_ptr", c_void_p), ("dw_ptr", c_void_p), ("da_ptr", c_void_p), ("db_ptr", c_void_p),
                ("dsa_ptr", c_void_p), ("dsb_ptr", c_void_p)]


PARAMS = {"hc_pre_fwd_kernel": HcPreParams, "hc_pre_bwd_kernel": HcPreParams,
          "hc_pre_param_grads_kernel": HcPreGradsParams}


def hc_pre_coef_stride(n: int) -> int:
    """kernels/hc_pre.cuh hc_pre_coef_stride: coefficient-partial entries a stream
    (dA[i, 0..n], dB[i], ds_a, ds_b)."""
    return n + 4


class HcPreSmem(NamedTuple):
    """kernels/hc_pre.cuh HcPreSmem: a block's shared-memory layout in accumulator
    elements (offsets from the start)."""
    part: int
    coef: int
    dq: int
    scale: int
    cpart: int
    term: int
    dw: int
    total: int


def hc_pre_smem_layout(kn: int, rows: int, warps: int, ldw: int, backward: bool, dw_in_smem: bool) -> HcPreSmem:
    """kernels/hc_pre.cuh hc_pre_smem_layout<kN>."""
    kj = kn + 2
    off = 0
    part = off
    off += rows * warps * kn * (kj + 1)
    coef = off
    off += rows * kn
    dq = scale = cpart = term = dw = off
    if backward:
        dq = off
        off += rows * kn * kj
        scale = off
        off += rows * kn
        cpart = off
        off += rows * kn * hc_pre_coef_stride(kn)
        term = off
        off += rows * kn * kj * 2
        off = (off + 7) // 8 * 8  # 32-byte alignment of the dW rows (fp32)
        dw = off
        if dw_in_smem:
            off += rows * kj * ldw
    return HcPreSmem(part, coef, dq, scale, cpart, term, dw, off)


def check_hc_pre_inputs(H: torch.Tensor):
    """csrc/hc_pre.h check_hc_pre_inputs: (lead, N, n, d) of H (the public functions have
    validated A, B, W, s_a and s_b)."""
    lead, N, n, d = stream_shape(H)
    assert d >= 1, f"H must have d >= 1 features for dynamic HC (its rms is over d), got {tuple(H.shape)}"
    return lead, N, n, d


class HcPreBwdCoefs(NamedTuple):
    """csrc/hc_pre.h HcPreBwdCoefs: q, r, dalpha, dbeta as the backward kernels read them."""
    q: torch.Tensor
    r: torch.Tensor
    dalpha: Optional[torch.Tensor]
    dbeta: Optional[torch.Tensor]


def hc_pre_bwd_coef_inputs(p: HcPreParams, acc: torch.dtype, dalpha: Optional[torch.Tensor],
                           dbeta: Optional[torch.Tensor], q: torch.Tensor, r: torch.Tensor) -> HcPreBwdCoefs:
    """csrc/hc_pre.h hc_pre_bwd_coef_inputs: in the accumulator dtype, contiguous, p
    pointed at them (null for an absent dalpha / dbeta: zero)."""
    c = HcPreBwdCoefs(q.to(acc).contiguous(), r.to(acc).contiguous(),
                      dalpha.to(acc).contiguous() if dalpha is not None else None,
                      dbeta.to(acc).contiguous() if dbeta is not None else None)
    p.q_ptr = c.q.data_ptr()
    p.r_ptr = c.r.data_ptr()
    p.dalpha_ptr = c.dalpha.data_ptr() if dalpha is not None else None
    p.dbeta_ptr = c.dbeta.data_ptr() if dbeta is not None else None
    return c


def hc_pre_ldw(d: int) -> int:
    """csrc/hc_pre.h hc_pre_ldw: the packed W's row stride, d rounded up to 8."""
    return (d + 7) // 8 * 8


def hc_pre_pack_w(W: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """csrc/hc_pre.h hc_pre_pack_w: W (d, n+2) transposed to (n+2, ldw) in the accumulator
    dtype, rows zero-padded from d to ldw, contiguous (one copy either way)."""
    d = W.size(0)
    ldw = hc_pre_ldw(d)
    wt = W.to(acc).t()
    return wt.contiguous() if ldw == d else torch.constant_pad_nd(wt, (0, ldw - d), 0).contiguous()


class HcPreWeights(NamedTuple):
    """csrc/hc_pre.h HcPreWeights: the parameter tensors the kernels read."""
    Wt: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    sa: torch.Tensor
    sb: torch.Tensor


def hc_pre_weights(p: HcPreParams, N: int, n: int, d: int, acc: torch.dtype, A: torch.Tensor, B: torch.Tensor,
                   Wt: torch.Tensor, s_a: torch.Tensor, s_b: torch.Tensor) -> HcPreWeights:
    """csrc/hc_pre.h hc_pre_weights: the sizes and parameter pointers of p (not H's fields)
    for N tokens of n streams of d features."""
    p.n_tokens = N
    p.d = d
    p.n = n
    p.ldw = hc_pre_ldw(d)
    w = HcPreWeights(Wt, A.to(acc).contiguous(), B.to(acc).contiguous(), s_a.to(acc), s_b.to(acc))
    p.wt_ptr = w.Wt.data_ptr()
    p.a_ptr = w.A.data_ptr()
    p.b_ptr = w.B.data_ptr()
    p.sa_ptr = w.sa.data_ptr()
    p.sb_ptr = w.sb.data_ptr()
    return w


def hc_pre_streams(p: HcPreParams, H: torch.Tensor) -> torch.Tensor:
    """csrc/hc_pre.h hc_pre_streams: H's fields of p; the tensor the kernel reads (H, or
    its copy when the token dims need one)."""
    h, p.h_tok = L.readable(H, 2)
    p.h_stream_stride = L.stream_stride(h)
    p.h_ptr = h.data_ptr()
    return h


@dataclass
class HcPreLaunch:
    """csrc/hc_pre.h HcPreLaunch."""
    threads_x: int
    rows: int
    smem_bytes: int
    dw_in_smem: bool
    grid: int


def no_extra_smem(rows: int, warps: int) -> int:
    """csrc/hc_pre.h no_extra_smem: hc_pre_block's `extra` for a kernel with no shared
    memory beyond hc_pre's."""
    return 0


def hc_pre_block(op: str, acc: torch.dtype, kn: int, N: int, d: int, vec: int, ldw: int, backward: bool,
                 device: torch.device, extra: Callable[[int, int], int]) -> HcPreLaunch:
    """csrc/hc_pre.h hc_pre_block<acc, kN>: a row of whole warps per token, several tokens
    a block for small d; rows shrink, then the backward's dW partials leave shared
    memory, until hc_pre's layout plus `extra(rows, warps)` elements fit the device."""
    chunks = (d + vec - 1) // vec
    threads_x = min(HC_PRE_THREADS, max(32, (chunks + 31) // 32 * 32))
    rows = max(1, HC_PRE_THREADS // threads_x)
    rows = min(rows, N)
    warps = threads_x // 32
    optin = device_model(device).smem_optin
    dw_in_smem = backward

    def nbytes(rows: int, dw_in_smem: bool) -> int:
        return (hc_pre_smem_layout(kn, rows, warps, ldw, backward, dw_in_smem).total + extra(rows, warps)) \
            * acc.itemsize

    while rows > 1 and nbytes(rows, dw_in_smem) > optin:
        rows -= 1
    if nbytes(rows, dw_in_smem) > optin:
        dw_in_smem = False  # rows == 1 here
    total = nbytes(rows, dw_in_smem)
    if total > optin:
        raise RuntimeError(f"{op}: needs {total} bytes of shared memory, the device allows {optin}")
    return HcPreLaunch(threads_x, rows, total, dw_in_smem, (N + rows - 1) // rows)


class HcPreWorkspaces(NamedTuple):
    """csrc/hc_pre.h HcPreWorkspaces: the backward's per-block partials."""
    dw: torch.Tensor
    coef: torch.Tensor


def hc_pre_workspaces(p: HcPreParams, b: HcPreLaunch, header: str, kernel: str, acc: torch.dtype,
                      device: torch.device) -> HcPreWorkspaces:
    """csrc/hc_pre.h hc_pre_workspaces: the backward grid made persistent (what the device
    holds at once of `kernel`), a partials slice a block, p pointed at them; the dW slices
    zeroed only when the kernel accumulates them in place (not in shared memory)."""
    b.grid = resident_grid(header, kernel, b.grid, b.threads_x * b.rows, b.smem_bytes, device)
    p.dw_in_smem = b.dw_in_smem
    J = p.n + 2
    alloc = torch.empty if b.dw_in_smem else torch.zeros
    ws = HcPreWorkspaces(alloc((b.grid, J, p.ldw), dtype=acc, device=device),
                         torch.empty((b.grid, p.n, hc_pre_coef_stride(p.n)), dtype=acc, device=device))
    p.dw_ws_ptr = ws.dw.data_ptr()
    p.coef_ws_ptr = ws.coef.data_ptr()
    return ws


def hc_pre_param_grads(ws: HcPreWorkspaces, n: int, d: int, A: torch.Tensor, B: torch.Tensor, W: torch.Tensor,
                       s_a: torch.Tensor, s_b: torch.Tensor) -> List[torch.Tensor]:
    """csrc/hc_pre.h hc_pre_param_grads: [dA, dB, dW, ds_a, ds_b] from the workspaces in
    one launch of hc_pre_param_grads_kernel, each in its parameter's dtype."""
    acc, device = ws.dw.dtype, ws.dw.device
    dA = torch.empty((n, n + 1), dtype=acc, device=device)
    dB = torch.empty((n,), dtype=acc, device=device)
    dW = torch.empty((d, n + 2), dtype=acc, device=device)
    ds_a = torch.empty((), dtype=acc, device=device)
    ds_b = torch.empty((), dtype=acc, device=device)
    g = HcPreGradsParams()
    g.d = d
    g.ldw = ws.dw.size(2)
    g.blocks = ws.dw.size(0)
    g.n = n
    g.dw_ws_ptr = ws.dw.data_ptr()
    g.coef_ws_ptr = ws.coef.data_ptr()
    g.dw_ptr = dW.data_ptr()
    g.da_ptr = dA.data_ptr()
    g.db_ptr = dB.data_ptr()
    g.dsa_ptr = ds_a.data_ptr()
    g.dsb_ptr = ds_b.data_ptr()
    outputs = d * (n + 2) + n * (n + 2) + 2
    launch(HEADER, f"crosslayer::hc_pre_param_grads_kernel<{kernel_type(acc)}>",
           (cover_grid(outputs, PARAM_GRADS_THREADS),), (PARAM_GRADS_THREADS,), 0, g, device)
    return [dA.to(A.dtype), dB.to(B.dtype), dW.to(W.dtype), ds_a.to(s_a.dtype), ds_b.to(s_b.dtype)]


def hc_pre_kernel(kernel: str, dtype: torch.dtype, vec: int, kn: int) -> str:
    """The name expression of `kernel`<scalar_t, kVec, kN> (hc_pre's and hc_boundary's kernels)."""
    return f"crosslayer::{kernel}<{kernel_type(dtype)}, {vec}, {kn}>"


def hc_pre_fwd(H: torch.Tensor, A: torch.Tensor, B: torch.Tensor, W: torch.Tensor, s_a: torch.Tensor,
               s_b: torch.Tensor, eps: float) -> List[torch.Tensor]:
    """csrc/hc_pre.cu hc_pre_fwd: [x, alpha, beta, q, r, Wt]."""
    lead, N, n, d = check_hc_pre_inputs(H)
    acc = acc_dtype(H.dtype)
    dev = H.device
    J = n + 2
    x = torch.empty((*lead, d), dtype=H.dtype, device=dev)
    alpha = torch.empty((*lead, n, n + 1), dtype=acc, device=dev)
    beta = torch.empty((*lead, n), dtype=acc, device=dev)
    q = torch.empty((*lead, n, J), dtype=acc, device=dev)
    r = torch.empty((*lead, n), dtype=acc, device=dev)
    Wt = hc_pre_pack_w(W, acc)
    if N == 0:
        return [x, alpha, beta, q, r, Wt]

    p = HcPreParams()
    w = hc_pre_weights(p, N, n, d, acc, A, B, Wt, s_a, s_b)
    h = hc_pre_streams(p, H)
    _, p.x_tok = L.with_token_layout(x, 1)
    p.eps = eps
    p.x_ptr = x.data_ptr()
    p.alpha_ptr = alpha.data_ptr()
    p.beta_ptr = beta.data_ptr()
    p.q_ptr = q.data_ptr()
    p.r_ptr = r.data_ptr()

    vectorize = vectorizable(H.dtype, (p.h_ptr, p.h_tok, p.h_stream_stride), (p.x_ptr, p.x_tok, 0))
    vec = vec16(H.dtype) if vectorize else 1
    kn = dispatch_streams(n, (2, 4, 8), MAX_STREAMS)
    b = hc_pre_block("hc_pre", acc, kn, N, d, vec, p.ldw, False, dev, no_extra_smem)
    launch(HEADER, hc_pre_kernel("hc_pre_fwd_kernel", H.dtype, vec, kn), (cover_grid(b.grid, 1),),
           (b.threads_x, b.rows), b.smem_bytes, p, dev)
    del w, h  # the tensors the kernel reads live until its launch is queued
    return [x, alpha, beta, q, r, Wt]


def hc_pre_bwd(dH: torch.Tensor, accumulate: bool, dx_in: torch.Tensor, dalpha: Optional[torch.Tensor],
               dbeta: Optional[torch.Tensor], H: torch.Tensor, A: torch.Tensor, B: torch.Tensor, W: torch.Tensor,
               Wt: torch.Tensor, s_a: torch.Tensor, s_b: torch.Tensor, q: torch.Tensor,
               r: torch.Tensor) -> List[torch.Tensor]:
    """csrc/hc_pre.cu hc_pre_bwd: dH written (=) or added to (+=) in place; [dA, dB, dW,
    ds_a, ds_b]."""
    lead, N, n, d = check_hc_pre_inputs(H)
    acc = acc_dtype(H.dtype)
    dev = H.device
    if N == 0:
        return [torch.zeros(A.shape, dtype=A.dtype, device=A.device),
                torch.zeros(B.shape, dtype=B.dtype, device=B.device),
                torch.zeros(W.shape, dtype=W.dtype, device=W.device),
                torch.zeros((), dtype=s_a.dtype, device=s_a.device),
                torch.zeros((), dtype=s_b.dtype, device=s_b.device)]
    p = HcPreParams()
    w = hc_pre_weights(p, N, n, d, acc, A, B, Wt, s_a, s_b)
    h = hc_pre_streams(p, H)
    dx, p.x_tok = L.readable(dx_in, 1)
    # The kernel writes dH in place when it can address it, else a scratch copied back
    # (holding dH first when the kernel adds to it).
    dH_k, p.dh_tok = L.writable(dH, 2, keep_values=accumulate)
    p.accumulate_dh = accumulate
    coefs = hc_pre_bwd_coef_inputs(p, acc, dalpha, dbeta, q, r)
    p.dh_stream_stride = L.stream_stride(dH_k)
    p.dx_ptr = dx.data_ptr()
    p.dh_ptr = dH_k.data_ptr()

    vectorize = vectorizable(H.dtype, (p.h_ptr, p.h_tok, p.h_stream_stride), (p.dx_ptr, p.x_tok, 0),
                             (p.dh_ptr, p.dh_tok, p.dh_stream_stride))
    vec = vec16(H.dtype) if vectorize else 1
    kn = dispatch_streams(n, (2, 4, 8), MAX_STREAMS)
    b = hc_pre_block("hc_pre", acc, kn, N, d, vec, p.ldw, True, dev, no_extra_smem)
    kernel = hc_pre_kernel("hc_pre_bwd_kernel", H.dtype, vec, kn)
    ws = hc_pre_workspaces(p, b, HEADER, kernel, acc, dev)
    launch(HEADER, kernel, (b.grid,), (b.threads_x, b.rows), b.smem_bytes, p, dev)
    L.copy_back(dH, dH_k)
    del w, h, dx, coefs  # the tensors the kernel reads live until its launch is queued
    return hc_pre_param_grads(ws, n, d, A, B, W, s_a, s_b)
