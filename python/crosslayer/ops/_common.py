"""Helpers the ops/ modules share: the fusability rule of the public functions, and
the CPU paths' output layouts (what the fakes promise)."""

from __future__ import annotations

from typing import Tuple, Union

import torch
from torch import Tensor

from crosslayer._checks import acc_dtype, compute_dtype
from crosslayer._extension import runs_kernels

Scalar = Union[Tensor, float]


def fusable(op: str, H: Tensor, *others: Tensor) -> bool:
    """The fused kernels cover this call of `op`: runs_kernels(H, op), and the arithmetic
    dtype of all inputs is the kernels' (no float64 coefficient with lower-precision H)."""
    if not runs_kernels(H, op):
        return False
    return compute_dtype(H, *others) == acc_dtype(H.dtype)


def like(H: Tensor, value: Tensor) -> Tensor:
    """`value` copied into a fresh tensor allocated like H (the fakes' layout)."""
    out = torch.empty_like(H)
    out.copy_(value)
    return out


def lead_d(H: Tensor) -> Tuple[int, ...]:
    """(*lead, d) of streams H (*lead, n, d): the shape of a layer input or output."""
    return (*H.shape[:-2], H.shape[-1])


def scalar_tensor(v: Scalar, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A python float as a 0-dim tensor (a fill kernel, no host-to-device copy); tensors
    pass through, so their gradient flows."""
    if isinstance(v, Tensor):
        return v
    return torch.full((), float(v), dtype=dtype, device=device)
