"""csrc/depth_aggregate.cu: depth_aggregate's launchers."""

from __future__ import annotations

from typing import List, NamedTuple, Sequence

import torch

from crosslayer._checks import acc_dtype
from crosslayer._jit import layout as L
from crosslayer._jit.common import kernel_type, token_tile_block, vec16
from crosslayer._jit.runtime import cover_grid, launch
from crosslayer._jit.slots import (SlotTable, TokenRows, check_slots, fill_slot_params, kernel_slots, slot_row_span,
                                   slot_rows_path)
from crosslayer._jit.structs import Params, c_bool, c_int, c_int64, c_void_p

HEADER = "kernels/depth_aggregate.cuh"


class DepthAggregateParams(Params):
    """kernels/depth_aggregate.cuh."""
    _fields_ = [("n_tokens", c_int64), ("d", c_int64), ("n_slots", c_int), ("n_ways", c_int), ("s", SlotTable),
                ("a_token_stride", c_int64), ("a_way_stride", c_int64), ("a_slot_stride", c_int64),
                ("y_way_stride", c_int64), ("y_token_stride", c_int64), ("dy_way_stride", c_int64),
                ("dy_token_stride", c_int64), ("ds_slot_stride", c_int64), ("ds_token_stride", c_int64),
                ("da_token_stride", c_int64), ("da_way_stride", c_int64), ("da_slot_stride", c_int64),
                ("accumulate_ds", c_bool), ("a_ptr", c_void_p), ("y_ptr", c_void_p), ("dy_ptr", c_void_p),
                ("ds_ptr", c_void_p), ("da_ptr", c_void_p)]


PARAMS = {"depth_aggregate_fwd_kernel": DepthAggregateParams, "depth_aggregate_bwd_kernel": DepthAggregateParams}


class DepthAggregateShape(NamedTuple):
    """csrc/depth_aggregate.cu DepthAggregateShape: common/slots.h SlotShape and C."""
    l: int
    N: int
    d: int
    static_weights: bool
    C: int


def check_depth_aggregate_inputs(S: Sequence[torch.Tensor], A: torch.Tensor) -> DepthAggregateShape:
    """csrc/depth_aggregate.cu check_depth_aggregate_inputs: the slots' shape and the
    ways C of A (N, C, l) or (C, l)."""
    return DepthAggregateShape(*check_slots(S, A), A.size(-2))


def depth_aggregate_params(sh: DepthAggregateShape, S: Sequence[torch.Tensor], A: torch.Tensor) -> DepthAggregateParams:
    """csrc/depth_aggregate.cu depth_aggregate_params: the fields both directions set."""
    p = DepthAggregateParams()
    fill_slot_params(p, sh, S, A)
    p.n_ways = sh.C
    return p


def launch_depth_aggregate(dtype: torch.dtype, backward: bool, p: DepthAggregateParams, others: Sequence[TokenRows],
                           device: torch.device) -> None:
    """csrc/depth_aggregate.cu launch_depth_aggregate<T, kBackward>: the 16-byte path
    (shifted rows, any d) when the rows of a token share their shift in S and `others`,
    else one element at a time; one way, or ways in groups of 4."""
    acc = acc_dtype(dtype)
    path = slot_rows_path(p.s, p.n_slots, p.n_tokens, dtype.itemsize, vec16(dtype), others)
    vec = vec16(dtype) if path.vectorize else 1
    ways_per_group = 1 if p.n_ways == 1 else 4
    # Shared memory: the weight tile a row, plus one dA partial a warp in the backward.
    tile_bytes = acc.itemsize * ways_per_group * p.n_slots
    threads_x, rows, smem = token_tile_block(p.n_tokens, slot_row_span(p.d, path, vec), vec, tile_bytes,
                                             tile_bytes if backward else 0)
    kernel = "depth_aggregate_bwd_kernel" if backward else "depth_aggregate_fwd_kernel"
    launch(HEADER, f"crosslayer::{kernel}<{kernel_type(dtype)}, {vec}, {ways_per_group}>",
           (cover_grid(p.n_tokens, rows),), (threads_x, rows), smem, p, device)


def depth_aggregate_fwd(S_in: List[torch.Tensor], A_in: torch.Tensor) -> torch.Tensor:
    """csrc/depth_aggregate.cu depth_aggregate_fwd: Y (C, N, d) = Σ_j A[.., c, j]·S_j."""
    sh = check_depth_aggregate_inputs(S_in, A_in)
    S = kernel_slots(S_in)
    A = A_in.to(acc_dtype(S[0].dtype))
    Y = torch.empty((sh.C, sh.N, sh.d), dtype=S[0].dtype, device=S[0].device)
    if sh.N == 0 or sh.d == 0:
        return Y

    p = depth_aggregate_params(sh, S, A)
    p.y_way_stride = Y.stride(0)
    p.y_token_stride = Y.stride(1)
    p.y_ptr = Y.data_ptr()

    launch_depth_aggregate(S[0].dtype, False, p, [TokenRows(p.y_ptr, p.y_token_stride, sh.C, p.y_way_stride)],
                           S[0].device)
    return Y


def depth_aggregate_bwd(dY_in: torch.Tensor, S_in: List[torch.Tensor], A_in: torch.Tensor, dS: torch.Tensor,
                        accumulate: bool) -> torch.Tensor:
    """csrc/depth_aggregate.cu depth_aggregate_bwd: dS (l, N, d) written (=) or added to
    (+=) in place; dA in A's dtype and shape (summed over tokens for static weights)."""
    sh = check_depth_aggregate_inputs(S_in, A_in)
    S = kernel_slots(S_in)
    dY = L.features_contiguous(dY_in)
    acc = acc_dtype(S[0].dtype)
    A = A_in.to(acc)
    if sh.N == 0 or sh.d == 0:
        # Nothing to read: dS keeps (accumulate) or takes (=) a zero contribution; dA = 0.
        if not accumulate:
            dS.zero_()
        return torch.zeros(A_in.shape, dtype=A_in.dtype, device=A_in.device)
    dA_tok = torch.empty((sh.N, sh.C, sh.l), dtype=acc, device=A.device)

    p = depth_aggregate_params(sh, S, A)
    p.dy_way_stride = dY.stride(0)
    p.dy_token_stride = dY.stride(1)
    p.ds_slot_stride = dS.stride(0)
    p.ds_token_stride = dS.stride(1)
    p.da_token_stride = dA_tok.stride(0)
    p.da_way_stride = dA_tok.stride(1)
    p.da_slot_stride = dA_tok.stride(2)
    p.accumulate_ds = accumulate
    p.dy_ptr = dY.data_ptr()
    p.ds_ptr = dS.data_ptr()
    p.da_ptr = dA_tok.data_ptr()

    launch_depth_aggregate(S[0].dtype, True, p, [TokenRows(p.dy_ptr, p.dy_token_stride, sh.C, p.dy_way_stride),
                                                 TokenRows(p.ds_ptr, p.ds_token_stride, sh.l, p.ds_slot_stride)],
                           S[0].device)
    dA = dA_tok.sum(0) if sh.static_weights else dA_tok
    return dA.to(A_in.dtype)
