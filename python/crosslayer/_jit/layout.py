"""The launchers' host-side layout rules in Python (csrc/common/tokens.cuh, checks.h,
layout.h): how a tensor's token dims become one TokenLayout, when an input is copied or
an output written through a scratch tensor, and when the 16-byte vector path is safe.
Each function is the C++ one of the same name."""

from __future__ import annotations

from typing import Iterable, Tuple

import torch

from crosslayer._jit.structs import TokenLayout


def collapse_token_dims(sizes, strides) -> TokenLayout | None:
    """common/tokens.cuh: the token dims (sizes, strides in elements) as one TokenLayout,
    None when more than two strided dims remain."""
    kept = None  # the inner dim kept so far (size, stride)
    cur = None
    for size, stride in zip(reversed(list(sizes)), reversed(list(strides))):
        if size == 1:
            continue
        if cur is None:
            cur = [size, stride]
        elif stride == cur[0] * cur[1]:
            cur[0] *= size
        else:
            if kept is not None:
                return None
            kept = tuple(cur)
            cur = [size, stride]
    if cur is None:
        return TokenLayout(1, 0, 0)
    if kept is None:
        return TokenLayout(cur[0], cur[0] * cur[1], cur[1])
    return TokenLayout(kept[0], cur[1], kept[1])


def features_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if (x.size(-1) <= 1 or x.stride(-1) == 1) else x.contiguous()


def with_token_layout(t: torch.Tensor, trailing: int) -> Tuple[torch.Tensor, TokenLayout]:
    lead = t.dim() - trailing
    layout = collapse_token_dims(t.shape[:lead], t.stride()[:lead])
    if layout is not None:
        return t, layout
    c = t.contiguous()
    return c, collapse_token_dims(c.shape[:lead], c.stride()[:lead])


def readable(t: torch.Tensor, trailing: int) -> Tuple[torch.Tensor, TokenLayout]:
    return with_token_layout(features_contiguous(t), trailing)


def writable(out: torch.Tensor, trailing: int, keep_values: bool = False) -> Tuple[torch.Tensor, TokenLayout]:
    """`out` when the kernel can address it, else a contiguous scratch (holding out's
    values first with keep_values: a kernel that adds to it) for copy_back."""
    lead = out.dim() - trailing
    if out.size(-1) <= 1 or out.stride(-1) == 1:
        layout = collapse_token_dims(out.shape[:lead], out.stride()[:lead])
        if layout is not None:
            return out, layout
    scratch = torch.empty(out.shape, dtype=out.dtype, device=out.device)
    if keep_values:
        scratch.copy_(out)
    return scratch, collapse_token_dims(scratch.shape[:lead], scratch.stride()[:lead])


def copy_back(out: torch.Tensor, written: torch.Tensor) -> None:
    if written is not out:
        out.copy_(written)


def stream_stride(t: torch.Tensor) -> int:
    return t.stride(-2) if t.size(-2) > 1 else 0


def vec_ok_strides(ptr: int, size_strides: Iterable[Tuple[int, int]], vec: int) -> bool:
    if ptr % 16 != 0:
        return False
    return all(size <= 1 or stride % vec == 0 for size, stride in size_strides)


def vec_ok(ptr: int, tok: TokenLayout, stream: int, vec: int) -> bool:
    return vec_ok_strides(ptr, ((2, tok.inner_stride), (2, tok.outer_stride), (2, stream)), vec)
