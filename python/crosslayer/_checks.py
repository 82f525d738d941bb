"""Argument validation shared by the oracle (`crosslayer.ref`) and the fused ops.

Every message names the argument, what was expected and what was received, so a
wrong call fails at the Python boundary with a readable error instead of deep in a
kernel. Validators never synchronise with the device: they look at shapes, dtypes
and devices only.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_tensor(name: str, t, *, ndim: Optional[Sequence[int] | int] = None) -> None:
    """`t` is a floating tensor of an activation dtype (and `ndim` dims if given)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have dtype float32, bfloat16, float16 or float64, got {t.dtype}"
        )
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(
                f"{name} must have {want} dims, got {t.dim()} (shape {tuple(t.shape)})"
            )


def check_shape(name: str, t: torch.Tensor, expected: Sequence[Optional[int]], what: str = "") -> None:
    """`t.shape` equals `expected`; `None` entries match any size."""
    ok = t.dim() == len(expected) and all(
        e is None or s == e for s, e in zip(t.shape, expected)
    )
    if not ok:
        shown = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        hint = f" {what}" if what else ""
        raise ValueError(f"{name} must have shape {shown}{hint}, got {tuple(t.shape)}")


def check_same_device(**tensors: torch.Tensor) -> None:
    """All given tensors live on one device."""
    items = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = items[0]
    for k, v in items[1:]:
        if v.device != first.device:
            raise ValueError(
                f"{k} is on {v.device} but {first_name} is on {first.device}; "
                "all inputs must be on the same device"
            )


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """The oracle's arithmetic dtype: float64 if any input is float64, else float32."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' arithmetic dtype for activations of `dtype`: float64 for float64,
    float32 otherwise (coefficients, accumulators and parameter gradients)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_real(op: str, name: str, value, *, gt: Optional[float] = None, ge: Optional[float] = None,
               why: str = "") -> None:
    """`value` is a finite Python real number (int or float, not bool), > `gt` / >= `ge`
    when given: the scalar parameters of an op that are never tensors (eps,
    sinkhorn_eps, pre_eps, post_mult: the kernels take them by value). A host check of a
    Python number, no device sync. `why` (optional) says why the domain is what it is.

    Raises TypeError (not a Python number) or ValueError (NaN, inf, out of the domain),
    the message naming the op, the parameter, its value and the allowed domain."""
    bounds = [f"> {gt:g}"] if gt is not None else []
    bounds += [f">= {ge:g}"] if ge is not None else []
    domain = " and ".join(bounds + ["finite"])
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a Python float ({domain}), got {type(value).__name__} ({value!r})")
    if not math.isfinite(value) or (gt is not None and not value > gt) or (ge is not None and not value >= ge):
        hint = f" ({why})" if why else ""
        raise ValueError(f"{op}: {name} must be {domain}{hint}, got {value!r}")


def check_index(op: str, name: str, value, lo: int, hi: Optional[int] = None) -> None:
    """`value` is an integer (a Python int or a numpy integer; not a bool, not a float such
    as 2.0) in lo..hi (hi None: no upper bound); TypeError / ValueError naming the op, the
    argument and the range."""
    rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an int {rng}, got {type(value).__name__} ({value!r})")
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{op}: {name} must be {rng}, got {value!r}")
