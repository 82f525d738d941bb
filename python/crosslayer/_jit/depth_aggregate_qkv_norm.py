"""csrc/depth_aggregate_qkv_norm.cu: depth_aggregate_qkv_norm's launchers."""

from __future__ import annotations

import ctypes
import math
from typing import List, NamedTuple, Sequence

import torch

from crosslayer._checks import acc_dtype
from crosslayer._jit import layout as L
from crosslayer._jit.common import WARP_SIZE, kernel_type, vec16
from crosslayer._jit.runtime import device_model, launch, resident_grid
from crosslayer._jit.slots import (SlotRowsPath, SlotShape, SlotTable, TokenRows, check_slots, fill_slot_params,
                                   kernel_slots, slot_row_span, slot_rows_path)
from crosslayer._jit.structs import Params, c_bool, c_int, c_int64, c_void_p, header_constant

HEADER = "kernels/depth_aggregate_qkv_norm.cuh"
WAYS = header_constant("kDepthAggregateQkvNormWays", HEADER)
NORMED = header_constant("kDepthAggregateQkvNormNormed", HEADER)
THREADS = header_constant("kDepthAggregateQkvNormThreads", HEADER)
DOTS = header_constant("kDepthAggregateQkvNormDots", HEADER)
BWD_MIN_BLOCKS = header_constant("kDepthAggregateQkvNormBwdMinBlocks", HEADER)
RESERVED_PER_BLOCK = header_constant("kReservedPerBlock", "depth_aggregate_qkv_norm.cu")
WORKSPACE_BLOCKS_PER_SM = header_constant("kWorkspaceBlocksPerSm", "depth_aggregate_qkv_norm.cu")


class DepthAggregateQkvNormParams(Params):
    """kernels/depth_aggregate_qkv_norm.cuh."""
    _fields_ = [("n_tokens", c_int64), ("d", c_int64), ("ld", c_int64), ("n_slots", c_int), ("s", SlotTable),
                ("a_token_stride", c_int64), ("a_way_stride", c_int64), ("a_slot_stride", c_int64),
                ("out_way_stride", c_int64), ("out_token_stride", c_int64), ("dout_way_stride", c_int64),
                ("dout_token_stride", c_int64), ("ds_slot_stride", c_int64), ("ds_token_stride", c_int64),
                ("eps", ctypes.c_double), ("accumulate_ds", c_bool), ("bufs_in_smem", c_bool), ("a_ptr", c_void_p),
                ("g_ptr", c_void_p), ("out_ptr", c_void_p), ("rstd_ptr", c_void_p), ("dout_ptr", c_void_p),
                ("ds_ptr", c_void_p), ("da_ptr", c_void_p), ("dg_ws_ptr", c_void_p), ("stash_ws_ptr", c_void_p)]


PARAMS = {"depth_aggregate_qkv_norm_fwd_kernel": DepthAggregateQkvNormParams,
          "depth_aggregate_qkv_norm_bwd_kernel": DepthAggregateQkvNormParams}


def round8(x: int) -> int:
    """kernels/depth_aggregate_qkv_norm.cuh depth_aggregate_qkv_norm_round8."""
    return (x + 7) // 8 * 8


class QkvNormSmem(NamedTuple):
    """kernels/depth_aggregate_qkv_norm.cuh DepthAggregateQkvNormSmem: offsets in
    accumulator elements."""
    a: int
    red: int
    part: int
    stash: int
    dg: int
    stage: int
    total: int


def smem_layout(rows: int, warps: int, l: int, ld: int, backward: bool, bufs_in_smem: bool, stage_entry_bytes: int,
                acc_bytes: int) -> QkvNormSmem:
    """kernels/depth_aggregate_qkv_norm.cuh depth_aggregate_qkv_norm_smem_layout."""
    a = 0
    red = round8(a + rows * WAYS * l)
    part = round8(red + rows * warps * NORMED)
    stash = round8(part + rows * warps * DOTS * l) if backward else part
    dg = stash + (rows * NORMED * ld if bufs_in_smem else 0)
    off = dg + (rows * NORMED * ld if backward and bufs_in_smem else 0)
    stage = round8(off)
    total = stage
    if backward and stage_entry_bytes > 0:
        total += (l * rows * warps * WARP_SIZE * stage_entry_bytes + acc_bytes - 1) // acc_bytes
    return QkvNormSmem(a, red, part, stash, dg, stage, total)


def padded_weights(g: torch.Tensor, acc: torch.dtype, ld: int) -> torch.Tensor:
    """csrc/depth_aggregate_qkv_norm.cu padded_weights: g in the accumulator dtype,
    zero-padded to (3, ld)."""
    return torch.nn.functional.pad(g.to(acc), (0, ld - g.size(1)), value=0.0).contiguous()


def depth_aggregate_qkv_norm_params(sh: SlotShape, S: Sequence[torch.Tensor], A: torch.Tensor, g: torch.Tensor,
                                    ld: int) -> DepthAggregateQkvNormParams:
    """csrc/depth_aggregate_qkv_norm.cu depth_aggregate_qkv_norm_params: the fields both
    directions set."""
    p = DepthAggregateQkvNormParams()
    fill_slot_params(p, sh, S, A)
    p.ld = ld
    p.g_ptr = g.data_ptr()
    return p


class QkvNormLaunch(NamedTuple):
    """csrc/depth_aggregate_qkv_norm.cu DepthAggregateQkvNormLaunch."""
    threads_x: int
    rows: int
    smem_bytes: int
    bufs_in_smem: bool
    stage_slots: bool
    grid: int


def depth_aggregate_qkv_norm_block(acc: torch.dtype, N: int, d: int, l: int, ld: int, vec: int, entry_bytes: int,
                                   backward: bool, device: torch.device) -> QkvNormLaunch:
    """csrc/depth_aggregate_qkv_norm.cu depth_aggregate_qkv_norm_block<acc>: a row of
    whole warps a token, several tokens a block for small d; shared memory for the
    backward's slot stage with the row buffers, then the stage alone, while
    kDepthAggregateQkvNormBwdMinBlocks blocks fit an SM; else the buffers while they fit
    the opt-in limit (fewer rows first), else global workspaces."""
    chunks = (d + vec - 1) // vec
    threads_x = min(THREADS, max(32, (chunks + 31) // 32 * 32))
    rows = min(max(1, THREADS // threads_x), N)
    warps = threads_x // 32
    model = device_model(device)
    optin = model.smem_optin

    def nbytes(rows: int, in_smem: bool, stage: bool) -> int:
        return smem_layout(rows, warps, l, ld, backward, in_smem, entry_bytes if stage else 0,
                           acc.itemsize).total * acc.itemsize

    stage_slots = False
    bufs_in_smem = True
    if backward:
        per_block = min(optin, model.smem_per_sm // BWD_MIN_BLOCKS - RESERVED_PER_BLOCK)
        for in_smem in (True, False):
            if nbytes(rows, in_smem, True) <= per_block:
                bufs_in_smem = in_smem
                stage_slots = True
                break
    if not stage_slots:
        while rows > 1 and nbytes(rows, True, False) > optin:
            rows -= 1
        if nbytes(rows, True, False) > optin:
            bufs_in_smem = False  # rows == 1 here
    total = nbytes(rows, bufs_in_smem, stage_slots)
    if total > optin:
        raise RuntimeError(f"depth_aggregate_qkv_norm: needs {total} bytes of shared memory, the device allows {optin}")
    return QkvNormLaunch(threads_x, rows, total, bufs_in_smem, stage_slots, (N + rows - 1) // rows)


def launch_depth_aggregate_qkv_norm(dtype: torch.dtype, backward: bool, p: DepthAggregateQkvNormParams,
                                    path: SlotRowsPath, device: torch.device) -> torch.Tensor | None:
    """csrc/depth_aggregate_qkv_norm.cu launch_depth_aggregate_qkv_norm<T, kBackward>:
    the kernel (one element at a time, 16-byte chunks, or shifted 16-byte chunks) on a
    persistent grid, a workspace slice each block row; returns the backward's dg
    workspace (None for the forward)."""
    acc = acc_dtype(dtype)
    vec = vec16(dtype) if path.vectorize else 1
    shifted = path.vectorize and path.shifted
    b = depth_aggregate_qkv_norm_block(acc, p.n_tokens, slot_row_span(p.d, path, vec), p.n_slots, p.ld, vec,
                                       vec * dtype.itemsize, backward, device)
    args = f"{kernel_type(dtype)}, {vec}, {str(shifted).lower()}"
    kernel = (f"crosslayer::depth_aggregate_qkv_norm_bwd_kernel<{args}, {str(b.stage_slots).lower()}>" if backward
              else f"crosslayer::depth_aggregate_qkv_norm_fwd_kernel<{args}>")
    grid = resident_grid(HEADER, kernel, b.grid, b.threads_x * b.rows, b.smem_bytes, device,
                         None if b.bufs_in_smem else WORKSPACE_BLOCKS_PER_SM)
    p.bufs_in_smem = b.bufs_in_smem
    slices = grid * b.rows
    dg_ws = None
    if backward:
        dg_ws = torch.empty((slices, NORMED, p.ld), dtype=acc, device=device)
        p.dg_ws_ptr = dg_ws.data_ptr()
    if not b.bufs_in_smem:
        stash_ws = torch.empty((slices, NORMED, p.ld), dtype=acc, device=device)
        p.stash_ws_ptr = stash_ws.data_ptr()
    launch(HEADER, kernel, (grid,), (b.threads_x, b.rows), b.smem_bytes, p, device)
    return dg_ws


def depth_aggregate_qkv_norm_fwd(S_in: List[torch.Tensor], A_in: torch.Tensor, g_in: torch.Tensor,
                                 eps: float) -> List[torch.Tensor]:
    """csrc/depth_aggregate_qkv_norm.cu depth_aggregate_qkv_norm_fwd: [Out (4, N, d),
    rstd (3, N) in the accumulator dtype]."""
    sh = check_slots(S_in, A_in)
    S = kernel_slots(S_in)
    acc = acc_dtype(S[0].dtype)
    A = A_in.to(acc)
    Out = torch.empty((WAYS, sh.N, sh.d), dtype=S[0].dtype, device=S[0].device)
    rstd = torch.empty((NORMED, sh.N), dtype=acc, device=S[0].device)
    if sh.N == 0:
        return [Out, rstd]
    if sh.d == 0:  # mean over no features: rsqrt(eps), as the oracle's mean of zeros would give
        rstd.fill_(1.0 / math.sqrt(eps))
        return [Out, rstd]
    ld = round8(sh.d)
    g = padded_weights(g_in, acc, ld)

    p = depth_aggregate_qkv_norm_params(sh, S, A, g, ld)
    p.out_way_stride = Out.stride(0)
    p.out_token_stride = Out.stride(1)
    p.eps = eps
    p.out_ptr = Out.data_ptr()
    p.rstd_ptr = rstd.data_ptr()

    dtype = S[0].dtype
    path = slot_rows_path(p.s, sh.l, sh.N, dtype.itemsize, vec16(dtype),
                          [TokenRows(p.out_ptr, p.out_token_stride, WAYS, p.out_way_stride)])
    launch_depth_aggregate_qkv_norm(dtype, False, p, path, S[0].device)
    return [Out, rstd]


def depth_aggregate_qkv_norm_bwd(dOut_in: torch.Tensor, S_in: List[torch.Tensor], A_in: torch.Tensor,
                                 g_in: torch.Tensor, rstd_in: torch.Tensor, dS: torch.Tensor,
                                 accumulate: bool) -> List[torch.Tensor]:
    """csrc/depth_aggregate_qkv_norm.cu depth_aggregate_qkv_norm_bwd: dS (l, N, d) written
    (=) or added to (+=) in place; [dA in A's dtype and shape (summed over tokens for
    static weights), dg in g's dtype, summed over the workspace slices]."""
    sh = check_slots(S_in, A_in)
    S = kernel_slots(S_in)
    dOut = L.features_contiguous(dOut_in)
    acc = acc_dtype(S[0].dtype)
    A = A_in.to(acc)
    rstd = rstd_in.to(acc).contiguous()
    if sh.N == 0 or sh.d == 0:
        # Nothing to read: dS keeps (accumulate) or takes (=) a zero contribution; dA, dg = 0.
        if not accumulate:
            dS.zero_()
        return [torch.zeros(A_in.shape, dtype=A_in.dtype, device=A_in.device),
                torch.zeros(g_in.shape, dtype=g_in.dtype, device=g_in.device)]
    ld = round8(sh.d)
    g = padded_weights(g_in, acc, ld)
    dA_tok = torch.empty((sh.N, WAYS, sh.l), dtype=acc, device=A.device)

    p = depth_aggregate_qkv_norm_params(sh, S, A, g, ld)
    p.dout_way_stride = dOut.stride(0)
    p.dout_token_stride = dOut.stride(1)
    p.ds_slot_stride = dS.stride(0)
    p.ds_token_stride = dS.stride(1)
    p.accumulate_ds = accumulate
    p.rstd_ptr = rstd.data_ptr()
    p.dout_ptr = dOut.data_ptr()
    p.ds_ptr = dS.data_ptr()
    p.da_ptr = dA_tok.data_ptr()

    dtype = S[0].dtype
    path = slot_rows_path(p.s, sh.l, sh.N, dtype.itemsize, vec16(dtype),
                          [TokenRows(p.dout_ptr, p.dout_token_stride, WAYS, p.dout_way_stride),
                           TokenRows(p.ds_ptr, p.ds_token_stride, sh.l, p.ds_slot_stride)])
    dg_ws = launch_depth_aggregate_qkv_norm(dtype, True, p, path, S[0].device)
    dA = dA_tok.sum(0) if sh.static_weights else dA_tok
    dg = dg_ws.sum(0).narrow(1, 0, sh.d)
    return [dA.to(A_in.dtype), dg.to(g_in.dtype).contiguous()]
