"""csrc/common/mma_pack.h: the host side of the tensor-core launchers (mhc_coeffs,
mudd_weights) -- fp32 weights packed into mma.sync m16n8k16 B fragments in one launch of
kernels/mma_pack.cuh, the power-of-two scaling that keeps fp16 parts normal, and the
token groups of the backward kernels. Every function is the C++ one of the same name
(the reasons for each rule are in the header); all of it is stream-ordered torch work
on the operands' device, no host syncs."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from crosslayer._jit.common import kernel_type
from crosslayer._jit.runtime import cover_grid, launch
from crosslayer._jit.structs import Params, c_int, c_int64, c_void_p, header_constant

MMA_PACK_THREADS = header_constant("kMmaPackThreads", "kernels/mma_pack.cuh")
GROUP_WARPS_PER_SM = header_constant("kGroupWarpsPerSm", "common/mma_pack.h")
MMA_XT_STRIDE = header_constant("kMmaXtStride", "common/mma.cuh")


class MmaPackParams(Params):
    """kernels/mma_pack.cuh."""
    _fields_ = [("w", c_void_p), ("scale", c_void_p), ("out", c_void_p), ("ld", c_int64), ("d", c_int64),
                ("d_pad", c_int64), ("cols", c_int64), ("col_pad", c_int64), ("total", c_int64),
                ("streams", c_int), ("parts", c_int)]


PARAMS = {"mma_pack_kernel": MmaPackParams}


def mma_xt_stage_elems(dtype: torch.dtype) -> int:
    """common/mma.cuh kMmaXtStageElems<T> (kMmaXtParts<T>: 1 for bf16, 2 for fp16)."""
    return (1 if dtype == torch.bfloat16 else 2) * 32 * MMA_XT_STRIDE


def round_up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


class Pow2Scale(NamedTuple):
    scale: torch.Tensor
    unscale: torch.Tensor


def fp16_split_scale(t: torch.Tensor) -> Pow2Scale:
    """0-dim fp32 tensors {2^k, 2^-k} with max|t|·2^k in [2^14, 2^15), on t's device."""
    e = torch.floor(torch.log2(torch.clamp_min(t.abs().amax().to(torch.float32), 1e-30)))
    return Pow2Scale(torch.exp2(14.0 - e), torch.exp2(e - 14.0))


class RowsLd4(NamedTuple):
    t: torch.Tensor
    ld: int


def fp32_rows_ld4(W: torch.Tensor) -> RowsLd4:
    """W (rows, cols) as fp32 with a row stride that is a multiple of 4 floats, a 16-byte
    aligned base and zeros in the padding columns: W itself when it already is, else one
    padded copy."""
    cols = W.size(1)
    ld = round_up(cols, 4)
    w = W.to(torch.float32).contiguous()
    if ld != cols:
        w = torch.nn.functional.pad(w, (0, ld - cols))
    elif w.data_ptr() % 16 != 0:
        w = w.clone()
    return RowsLd4(w, ld)


class TokenGroups(NamedTuple):
    groups: int
    tiles_per_group: int


def token_groups(n_tokens: int, chunks: int, sms: int, min_tiles: int) -> TokenGroups:
    """Groups of consecutive 16-token tiles a backward kernel's partials cover."""
    tiles = (n_tokens + 15) // 16
    groups = min((tiles + min_tiles - 1) // min_tiles, max(1, (sms * GROUP_WARPS_PER_SM + chunks - 1) // chunks))
    groups = max(groups, 1)
    per_group = (tiles + groups - 1) // groups
    return TokenGroups((tiles + per_group - 1) // per_group, per_group)


def sum_partials(part: torch.Tensor) -> torch.Tensor:
    """The sum over the leading dim of per-group partials: the one partial itself when
    there is one group (no launch)."""
    return part[0] if part.size(0) == 1 else part.sum(0)


def pack_fragments(W: torch.Tensor, streams: int, d_pad: int, col_pad: int, parts: int, part: torch.dtype,
                   scale: Optional[torch.Tensor]) -> torch.Tensor:
    """W (streams·d, cols) packed in one launch: rows padded per block of d to d_pad,
    columns to col_pad, `parts` 2 or 4 parts of dtype `part`, every element times the
    0-dim fp32 `scale` when given."""
    w = W.to(torch.float32).contiguous()
    rows = streams * d_pad
    out = torch.empty(rows * col_pad * parts, dtype=part, device=W.device)
    p = MmaPackParams()
    p.w = w.data_ptr()
    p.scale = scale.data_ptr() if scale is not None else None
    p.out = out.data_ptr()
    p.ld = w.size(1)
    p.d = w.size(0) // streams
    p.d_pad = d_pad
    p.cols = w.size(1)
    p.col_pad = col_pad
    p.total = out.numel()
    p.streams = streams
    p.parts = parts
    launch("kernels/mma_pack.cuh", f"crosslayer::mma_pack_kernel<{kernel_type(part)}>",
           (cover_grid(min(p.total, 1 << 22), MMA_PACK_THREADS),), (MMA_PACK_THREADS,), 0, p, W.device)
    return out
