"""Argument checks shared by the models (LMConfig, MUDDFormerConfig, MUDDPythiaConfig and
their models): one helper for the configs' fields, one for the token ids a forward takes.

Configs (`check_fields`): every dataclass field is checked against its annotation, then
against the config's range rule for it, at construction (`__post_init__`), before any
size reaches a tensor constructor. The annotation decides the type:

    int             a real int (numbers.Integral, normalised to int); not a bool, not a
                    float (64.0 is refused: JSON "dim": 64.0 is a config error), not a str
    float           an int or a float (normalised to float), finite; not a bool
    bool            True or False only (not 0 / 1, not "true")
    str             a str
    Optional[X]     None or X

A wrong type is a TypeError, a value outside its rule (or a derived quantity that does
not work out, `config_error`) a ValueError; both messages read

    <ConfigClass>.<field> = <value!r>: expected <what>[, got <type>]

Token ids (`check_idx`): a (batch, seq) int64 / int32 tensor whose ids lie in
[0, vocab_size). The range check reads the ids' min and max on the host: free on the
CPU, one device synchronisation per forward on CUDA (the price of a clear error instead
of the embedding's device-side assert, after which the CUDA context is unusable). A
model's `validate_token_ids = False` skips that read (for CUDA-graph capture or when the
data pipeline guarantees the range); under torch.compile tracing it is skipped too (a
data-dependent branch would break the graph).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import typing
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["Bound", "OneOf", "at_least", "positive", "check_fields", "config_error", "check_idx",
           "token_id_stats", "raise_bad_token_ids", "check_token_ids", "host_ints"]


# ------------------------------------------------------------------ range rules


@dataclass(frozen=True)
class Bound:
    """lo <= v (lo < v if lo_open) and v <= hi (v < hi if hi_open); None: unbounded.
    `why`: the reason, appended to the message in parentheses."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    why: str = ""

    def ok(self, v) -> bool:
        if self.lo is not None and not (v > self.lo if self.lo_open else v >= self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            s = f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            s = f"{'>' if self.lo_open else '>='} {self.lo}"
        elif self.hi is not None:
            s = f"{'<' if self.hi_open else '<='} {self.hi}"
        else:
            s = "any value"
        return f"{s} ({self.why})" if self.why else s


@dataclass(frozen=True)
class OneOf:
    """v is one of `choices` (or, with `or_bound`, satisfies that Bound)."""

    choices: tuple
    or_bound: Optional[Bound] = None

    def ok(self, v) -> bool:
        return v in self.choices or (self.or_bound is not None and self.or_bound.ok(v))

    def describe(self) -> str:
        s = f"one of {self.choices}" if len(self.choices) > 1 else f"{self.choices[0]!r}"
        return f"{s} or {self.or_bound.describe()}" if self.or_bound is not None else s


def at_least(lo, why: str = "") -> Bound:
    return Bound(lo=lo, why=why)


def positive(why: str = "") -> Bound:
    return Bound(lo=0, lo_open=True, why=why)


# ------------------------------------------------------------------ config fields


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict:
    """{field name: (base type, optional)} from the dataclass's resolved annotations."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        tp, optional = hints[f.name], False
        if typing.get_origin(tp) is typing.Union:
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            optional = len(args) < len(typing.get_args(tp))
            if len(args) != 1:
                raise TypeError(f"{cls.__name__}.{f.name}: check_fields handles X and Optional[X], got {tp}")
            tp = args[0]
        if tp not in (int, float, bool, str):
            raise TypeError(f"{cls.__name__}.{f.name}: check_fields handles int, float, bool and str, got {tp}")
        out[f.name] = (tp, optional)
    return out


_TYPE_WORDS = {int: "an int", float: "a finite number (int or float)", bool: "a bool (True / False)",
               str: "a str"}


def _normalised(tp: type, v) -> Any:
    """v converted to tp's canonical Python type, or raise _Reject."""
    if tp is bool:
        if isinstance(v, bool):
            return v
    elif tp is int:
        if isinstance(v, numbers.Integral) and not isinstance(v, bool):
            return int(v)
    elif tp is float:
        if isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    elif isinstance(v, str):
        return v
    raise _Reject


class _Reject(Exception):
    pass


def config_error(cfg, name: str, expected: str, exc: type = ValueError) -> Exception:
    """The error for field `name` of config `cfg`: '<Class>.<name> = <value>: expected ...'."""
    return exc(f"{type(cfg).__name__}.{name} = {getattr(cfg, name)!r}: expected {expected}")


def check_fields(cfg, rules: Mapping[str, Any]) -> None:
    """Check (and normalise in place) every dataclass field of `cfg`: its type from the
    annotation (TypeError), then rules[name].ok(value) where a rule is given and the
    value is not None (ValueError with rules[name].describe()). Fields are checked in
    declaration order, so the first bad one is reported."""
    types = _field_types(type(cfg))
    unknown = set(rules) - set(types)
    if unknown:  # a typo in a rule table would silently check nothing
        raise TypeError(f"rules for unknown {type(cfg).__name__} field(s) {sorted(unknown)}")
    for name, (tp, optional) in types.items():
        v = getattr(cfg, name)
        if v is None and optional:
            continue
        try:
            setattr(cfg, name, _normalised(tp, v))
        except _Reject:
            what = _TYPE_WORDS[tp] + (" or None" if optional else "")
            if tp is float and isinstance(v, numbers.Real) and not isinstance(v, bool):
                raise config_error(cfg, name, what, ValueError) from None  # nan / inf
            raise config_error(cfg, name, f"{what}, got {type(v).__name__}", TypeError) from None
        rule = rules.get(name)
        if rule is not None and not rule.ok(getattr(cfg, name)):
            word = "" if isinstance(rule, OneOf) else {int: "an int ", float: "a number "}.get(tp, "")
            raise config_error(cfg, name, word + rule.describe())


# ------------------------------------------------------------------ token ids


def check_idx(who: str, idx, allow_empty: bool = False) -> None:
    """idx is a (batch, seq) int64 / int32 tensor (what nn.Embedding takes), non-empty
    unless allow_empty. Shapes and dtypes only: no synchronisation."""
    if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
        got = f"{idx.dtype} of shape {tuple(idx.shape)}" if isinstance(idx, Tensor) else type(idx).__name__
        raise ValueError(f"{who}: idx must be (batch, seq) int64 (or int32) token ids, got {got}")
    if idx.numel() == 0 and not allow_empty:
        raise ValueError(f"{who}: idx has no tokens (shape {tuple(idx.shape)}): batch and seq must be >= 1")


def token_id_stats(idx: Tensor) -> Optional[Tensor]:
    """(2,) int64 [min, max] of idx on its device (no synchronisation), or None where
    the check is skipped: an empty idx, or inside torch.compile tracing."""
    if idx.numel() == 0 or torch.compiler.is_compiling():
        return None
    lo, hi = torch.aminmax(idx)
    return torch.stack([lo, hi]).to(torch.int64)


def raise_bad_token_ids(who: str, idx: Tensor, lo: int, hi: int, vocab_size: int) -> None:
    """Raise when [lo, hi] (the host copy of token_id_stats) leaves [0, vocab_size),
    naming the first offending id (the error path may synchronise again)."""
    if lo >= 0 and hi < vocab_size:
        return
    first = ((idx < 0) | (idx >= vocab_size)).nonzero()[0].tolist()
    raise ValueError(f"{who}: token ids must be in [0, vocab_size = {vocab_size}), got ids in [{lo}, {hi}] "
                     f"(first: idx[{first[0]}, {first[1]}] = {int(idx[first[0], first[1]])})")


def check_token_ids(who: str, idx: Tensor, vocab_size: int) -> None:
    """The id range check on its own (one host read of [min, max]; see the module doc)."""
    stats = token_id_stats(idx)
    if stats is not None:
        raise_bad_token_ids(who, idx, *stats.tolist(), vocab_size)


def host_ints(parts: Sequence[Tensor]) -> list:
    """The elements of integer tensors (any shapes and devices), flattened and read to
    the host in one transfer
    (one synchronisation when any is on CUDA)."""
    if not parts:
        return []
    dev = next((p.device for p in parts if p.device.type != "cpu"), parts[0].device)
    return torch.cat([p.reshape(-1).to(dev, torch.int64) for p in parts]).tolist()
