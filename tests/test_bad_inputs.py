"""The standing check on bad input: every public entry point refuses each kind of bad
argument with a clear error, on every path.

The walker enumerates the public entry points programmatically -- the public callables
of crosslayer.ops, crosslayer.ref, crosslayer.nn and crosslayer.models (their __all__
plus every public function or class defined in crosslayer), those of
crosslayer.integrations.* (their __all__) and the custom ops registered under
torch.ops.crosslayer -- and requires each one to have a table of bad-input cases here
(CASES) or an explicit exemption with its reason (EXEMPT). A new entry point without
either fails `test_every_entry_point_has_cases_or_an_exemption`: add its cases.

A case is one call with one bad argument, the exception type it must raise and a regex
the message must contain (naming the argument). Kinds: wrong dtype, wrong shape or
rank, wrong device (a meta tensor beside CPU ones), not a tensor, an out-of-domain
scalar (eps <= 0, NaN, inf, ...), a wrong Python type for ints / floats / bools, and
empty dims where the math is undefined. Each entry also has a good call (GOOD), which
must run: the bad cases then fail because of their one bad argument.

The cases of issue parts 3 and 5 (labels starting "p3:" / "p5:") failed before the
validators checked scalar domains and d = 0, and before the depth_aggregate custom op
and its fake shared one check. Most others passed already and stay here so they keep
passing; a few more the sweep found were fixed with them (the boundary backwards'
dH_next / dx_next, which broadcast silently; int arguments of hc_init_static,
mudd_hidden and DenseFormerDWA given as floats or strs; param_groups' weight_decay;
static_connection_parameters on a list; a float slice bound in DepthStack).

The d = 0 decisions and the domain checks are also run on the emulator path
(`emulate(cuemu)`: the CUDA launchers and kernels on the CPU), where they must raise the
same error before any launcher runs.
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple, Union

import pytest
import torch

from crosslayer import models, nn as cnn, ops, ref
from crosslayer._extension import emulate

NAN, INF = float("nan"), float("inf")
N_, D_ = 4, 8  # streams and features of the HC samples
M_ = N_ * N_ + 2 * N_  # mHC's n² + 2n


# ---------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Bad:
    label: str
    call: Callable[[], object]
    exc: Union[type, Tuple[type, ...]]
    match: str  # a regex searched in the message; it names the bad argument


class From:
    """A replacement computed from the good keyword arguments."""

    def __init__(self, fn):
        self.fn = fn


def _call(fn, make, over=None):
    def thunk():
        kw = make()
        for k, v in (over or {}).items():
            kw[k] = v.fn(kw) if isinstance(v, From) else v
        return fn(**kw)
    return thunk


def bad(fn, make, label, exc, match, **over) -> Bad:
    return Bad(label, _call(fn, make, over), exc, match)


def tensor_sweep(fn, make, names, first) -> List[Bad]:
    """For each tensor argument: an int dtype, a list in its place, and (but the first
    tensor, which the device check compares the others with) a meta tensor."""
    out = []
    for name in names:
        out.append(bad(fn, make, f"{name}: int dtype", TypeError, rf"\b{name} must have dtype",
                       **{name: From(lambda kw, n=name: kw[n].to(torch.int32))}))
        out.append(bad(fn, make, f"{name}: not a tensor", TypeError, rf"\b{name} must be a torch\.Tensor",
                       **{name: From(lambda kw, n=name: kw[n].tolist())}))
        if name != first:
            out.append(bad(fn, make, f"{name}: on meta", ValueError, rf"\b{name} is on meta",
                           **{name: From(lambda kw, n=name: kw[n].to("meta"))}))
    return out


def positive_float_sweep(fn, make, op, name, tag="") -> List[Bad]:
    """A float parameter whose domain is > 0 and finite (eps, sinkhorn_eps, post_mult)."""
    out = [bad(fn, make, f"{tag}{name} = {v!r}", ValueError, rf"{op}: {name} must be > 0 and finite", **{name: v})
           for v in (0.0, -1e-6, NAN, INF)]
    out += [bad(fn, make, f"{tag}{name}: str", TypeError, rf"{op}: {name} must be a Python float", **{name: "1e-6"}),
            bad(fn, make, f"{tag}{name}: tensor", TypeError, rf"{op}: {name} must be a Python float",
                **{name: torch.tensor(1e-6)})]
    return out


def scale_sweep(fn, make, op, name, tag="") -> List[Bad]:
    """A scale that may be a float or a 0-dim tensor (s_a, a_pre, ...): a float must be
    finite (a tensor is checked for shape only); a str or a (1,) tensor is refused."""
    return [bad(fn, make, f"{tag}{name} = {v!r}", ValueError, rf"{op}: {name} must be a finite float", **{name: v})
            for v in (NAN, INF)] + [
        bad(fn, make, f"{name}: str", TypeError, rf"\b{name} must be a float or a 0-dim", **{name: "0.1"}),
        bad(fn, make, f"{name}: shape (1,)", ValueError, rf"\b{name} must be a 0-dim tensor", **{name: torch.ones(1)}),
    ]


def iters_sweep(fn, make, name="iters") -> List[Bad]:
    return [bad(fn, make, f"{name} = 0", ValueError, rf"{name} must be >= 1", **{name: 0}),
            bad(fn, make, f"{name} = 2.0", TypeError, rf"{name} must be an int", **{name: 2.0}),
            bad(fn, make, f"{name} = True", TypeError, rf"{name} must be an int", **{name: True})]


# --------------------------------------------------------------------- inputs


def _r(*shape):
    return torch.randn(*shape)


def streams_kw(n=N_, d=D_):
    return dict(H=_r(3, n, d))


def hc_pre_kw(n=N_, d=D_):
    return dict(H=_r(3, n, d), A=_r(n, n + 1), B=_r(n), W=_r(d, n + 2) / math.sqrt(max(d, 1)), s_a=0.1, s_b=0.1,
                eps=1e-6)


def hc_pre_bwd_kw():
    return dict(dx=_r(3, D_), dalpha=_r(3, N_, N_ + 1), dbeta=_r(3, N_), **hc_pre_kw())


def hc_post_kw():
    return dict(H=_r(3, N_, D_), y=_r(3, D_), alpha=_r(3, N_, N_ + 1), beta=_r(3, N_))


def hc_boundary_kw(d=D_):
    kw = hc_pre_kw(d=d)
    return dict(H=kw.pop("H"), y=_r(3, d), alpha=_r(3, N_, N_ + 1), beta=_r(3, N_), **kw)


def hc_boundary_bwd_kw():
    return dict(dH_next=_r(3, N_, D_), dx_next=_r(3, D_), dalpha_next=None, dbeta_next=None, **hc_boundary_kw())


def stream_mix_kw():
    return dict(H=_r(3, N_, D_), w=_r(3, N_))


def mhc_kw(n=N_, d=D_):
    m = n * n + 2 * n
    return dict(H=_r(3, n, d), phi=_r(n * d, m) / math.sqrt(max(n * d, 1)), a_pre=0.5, a_post=0.5, a_res=0.5,
                b=_r(m), eps=1e-6, pre_eps=1e-6, post_mult=2.0, iters=5, sinkhorn_eps=1e-6)


def mhc_bwd_kw():
    return dict(dalpha=_r(3, N_, N_ + 1), dbeta=_r(3, N_), **mhc_kw())


def mhc_boundary_kw(d=D_):
    kw = mhc_kw(d=d)
    return dict(H=kw.pop("H"), y=_r(3, d), alpha=_r(3, N_, N_ + 1), beta=_r(3, N_), **kw)


def mhc_boundary_bwd_kw():
    return dict(dH_next=_r(3, N_, D_), dx_next=_r(3, D_), dalpha_next=None, dbeta_next=None, **mhc_boundary_kw())


def sinkhorn_kw():
    return dict(logits=_r(3, N_, N_), iters=5, eps=1e-6)


def da_kw(static=False):
    return dict(S=_r(3, 5, D_), A=_r(2, 3) if static else _r(5, 2, 3))


def qkv_kw():
    return dict(S=_r(3, 5, D_), A=_r(5, 4, 3), norm_weights=_r(3, D_), eps=1e-6)


def mw_kw():
    return dict(x=_r(5, D_), W1=_r(D_, 4), W2=_r(4, 6), bias=_r(6), n_ways=2, eps=1e-6, approximate="none")


# ------------------------------------------------------------------- the tables

CASES: Dict[str, Callable[[], List[Bad]]] = {}
GOOD: Dict[str, Callable[[], object]] = {}


def entry(name, good=None):
    def register(builder):
        CASES[name] = builder
        if good is not None:
            GOOD[name] = good
        return builder
    return register


def stream_shape_cases(fn, make, name="H"):
    return [
        bad(fn, make, f"{name}: 0 streams", ValueError, rf"{name} must have 1 to 16 streams",
            **{name: From(lambda kw: kw[name][..., :0, :])}),
        bad(fn, make, f"{name}: 1-D", ValueError, rf"{name} must have shape \(\.\.\., n, d\)",
            **{name: From(lambda kw: kw[name][0, 0])}),
    ]


def hc_pre_cases(fn, make, op):
    return [
        *tensor_sweep(fn, make, ("H", "A", "B", "W"), "H"),
        *stream_shape_cases(fn, make),
        bad(fn, make, "A: (n, n)", ValueError, r"\bA must have shape", A=From(lambda kw: kw["A"][:, 1:])),
        bad(fn, make, "B: (n+1,)", ValueError, r"\bB must have shape", B=_r(N_ + 1)),
        bad(fn, make, "W: (d, n+1)", ValueError, r"\bW must have shape", W=From(lambda kw: kw["W"][:, 1:])),
        bad(fn, make, "s_a None with W", ValueError, r"s_a is required", s_a=None),
        *scale_sweep(fn, make, op, "s_a", "p3:"), *scale_sweep(fn, make, op, "s_b", "p3:"),
        *positive_float_sweep(fn, make, op, "eps", "p3:"),
        bad(fn, lambda: hc_pre_kw(d=0), "p3:d = 0 (DHC)", ValueError, rf"{op}: H must have d >= 1 features"),
    ]


for _op, _fn in (("hc_pre", ops.hc_pre), ("hc_pre_for_post", ops.hc_pre_for_post)):
    entry(f"ops.{_op}", good=_call(_fn, hc_pre_kw))(lambda fn=_fn, op=_op: hc_pre_cases(fn, hc_pre_kw, op))
entry("ref.hc_pre", good=_call(ref.hc_pre, hc_pre_kw))(lambda: hc_pre_cases(ref.hc_pre, hc_pre_kw, "hc_pre"))


@entry("ref.hc_pre_bwd", good=_call(ref.hc_pre_bwd, hc_pre_bwd_kw))
def _():
    fn, mk = ref.hc_pre_bwd, hc_pre_bwd_kw
    return [*tensor_sweep(fn, mk, ("dx", "dalpha", "dbeta", "H", "W"), "H"),
            bad(fn, mk, "dx: (..., d+1)", ValueError, r"\bdx must have shape", dx=_r(3, D_ + 1)),
            bad(fn, mk, "dalpha: static shape", ValueError, r"\bdalpha must have shape", dalpha=_r(N_, N_ + 1)),
            *positive_float_sweep(fn, mk, "hc_pre", "eps", "p3:"),
            bad(fn, lambda: dict(hc_pre_kw(d=0), dx=_r(3, 0), dalpha=None, dbeta=None), "p3:d = 0 (DHC)",
                ValueError, r"hc_pre: H must have d >= 1 features")]


def hc_post_cases(fn, make):
    return [*tensor_sweep(fn, make, ("H", "y", "alpha", "beta"), "H"),
            *stream_shape_cases(fn, make),
            bad(fn, make, "y: (..., d+1)", ValueError, r"\by must have shape", y=_r(3, D_ + 1)),
            bad(fn, make, "alpha: (n, n)", ValueError, r"\balpha must have shape", alpha=_r(N_, N_)),
            bad(fn, make, "beta: (n+1,)", ValueError, r"\bbeta must have shape", beta=_r(N_ + 1))]


entry("ops.hc_post", good=_call(ops.hc_post, hc_post_kw))(lambda: hc_post_cases(ops.hc_post, hc_post_kw))
entry("ref.hc_post", good=_call(ref.hc_post, hc_post_kw))(lambda: hc_post_cases(ref.hc_post, hc_post_kw))


@entry("ref.hc_post_bwd", good=_call(ref.hc_post_bwd, lambda: dict(dH_new=_r(3, N_, D_), **hc_post_kw())))
def _():
    mk = lambda: dict(dH_new=_r(3, N_, D_), **hc_post_kw())  # noqa: E731
    return [*tensor_sweep(ref.hc_post_bwd, mk, ("dH_new",), "H"), *hc_post_cases(ref.hc_post_bwd, mk),
            bad(ref.hc_post_bwd, mk, "dH_new: (..., n, d+1)", ValueError, r"\bdH_new must have shape",
                dH_new=_r(3, N_, D_ + 1))]


def hc_boundary_cases(fn, make, make_d0=lambda: hc_boundary_kw(d=0)):
    return [*tensor_sweep(fn, make, ("H", "y", "alpha", "beta", "A", "B", "W"), "H"),
            *stream_shape_cases(fn, make),
            bad(fn, make, "y: (..., d+1)", ValueError, r"\by must have shape", y=_r(3, D_ + 1)),
            bad(fn, make, "A: (n, n)", ValueError, r"\bA must have shape", A=_r(N_, N_)),
            *scale_sweep(fn, make, "hc_boundary", "s_a", "p3:"),
            *positive_float_sweep(fn, make, "hc_boundary", "eps", "p3:"),
            bad(fn, make_d0, "p3:d = 0 (DHC)", ValueError,
                r"hc_boundary: H must have d >= 1 features")]


entry("ops.hc_boundary", good=_call(ops.hc_boundary, hc_boundary_kw))(
    lambda: hc_boundary_cases(ops.hc_boundary, hc_boundary_kw))
entry("ref.hc_boundary", good=_call(ref.hc_boundary, hc_boundary_kw))(
    lambda: hc_boundary_cases(ref.hc_boundary, hc_boundary_kw))


@entry("ref.hc_boundary_bwd", good=_call(ref.hc_boundary_bwd, hc_boundary_bwd_kw))
def _():
    fn, mk = ref.hc_boundary_bwd, hc_boundary_bwd_kw
    d0 = lambda: dict(hc_boundary_kw(d=0), dH_next=None, dx_next=None, dalpha_next=None,  # noqa: E731
                      dbeta_next=None)
    return [*hc_boundary_cases(fn, mk, d0), *tensor_sweep(fn, mk, ("dH_next", "dx_next"), "H"),
            bad(fn, mk, "dH_next: (n, d) (would broadcast)", ValueError, r"\bdH_next must have shape",
                dH_next=_r(N_, D_)),
            bad(fn, mk, "dx_next: (..., d+1)", ValueError, r"\bdx_next must have shape", dx_next=_r(3, D_ + 1))]


def stream_mix_cases(fn, make):
    return [*tensor_sweep(fn, make, ("H", "w"), "H"), *stream_shape_cases(fn, make),
            bad(fn, make, "w: (n+1,)", ValueError, r"\bw must have shape", w=_r(N_ + 1))]


for _name, _fn in (("ops.stream_mix", ops.stream_mix), ("ops.stream_mix_for_post", ops.stream_mix_for_post),
                   ("ref.stream_mix", ref.stream_mix)):
    entry(_name, good=_call(_fn, stream_mix_kw))(lambda fn=_fn: stream_mix_cases(fn, stream_mix_kw))


@entry("ref.stream_mix_bwd", good=_call(ref.stream_mix_bwd, lambda: dict(dx=_r(3, D_), **stream_mix_kw())))
def _():
    mk = lambda: dict(dx=_r(3, D_), **stream_mix_kw())  # noqa: E731
    return [*stream_mix_cases(ref.stream_mix_bwd, mk), *tensor_sweep(ref.stream_mix_bwd, mk, ("dx",), "H"),
            bad(ref.stream_mix_bwd, mk, "dx: (..., d+1)", ValueError, r"\bdx must have shape", dx=_r(3, D_ + 1))]


def mhc_cases(fn, make, op, make_d0, *, light=False):
    cases = [*tensor_sweep(fn, make, ("H", "phi", "b"), "H"),
             *stream_shape_cases(fn, make),
             bad(fn, make, "phi: (n·d, m-1)", ValueError, r"\bphi must have shape",
                 phi=From(lambda kw: kw["phi"][:, 1:])),
             bad(fn, make, "b: (m+1,)", ValueError, r"\bb must have shape", b=_r(M_ + 1)),
             bad(fn, make, "a_res None", TypeError, r"\ba_res must be a float or a 0-dim", a_res=None),
             *iters_sweep(fn, make),
             *positive_float_sweep(fn, make, op, "eps", "p3:"),
             *positive_float_sweep(fn, make, op, "sinkhorn_eps", "p3:"),
             *positive_float_sweep(fn, make, op, "post_mult", "p3:"),
             *(bad(fn, make, f"p3:pre_eps = {v!r}", ValueError, rf"{op}: pre_eps must be >= 0 and finite", pre_eps=v)
               for v in (-1e-3, NAN, INF)),
             bad(fn, make_d0, "p3:d = 0", ValueError, rf"{op}: H must have d >= 1 features")]
    if not light:
        for a in ("a_pre", "a_post", "a_res"):
            cases += scale_sweep(fn, make, op, a, "p3:")
    return cases


for _name, _fn, _op in (("ops.mhc_coeffs", ops.mhc_coeffs, "mhc_coeffs"),
                        ("ops.mhc_pre_for_post", ops.mhc_pre_for_post, "mhc_pre_for_post"),
                        ("ref.mhc_coeffs", ref.mhc_coeffs, "mhc_coeffs")):
    entry(_name, good=_call(_fn, mhc_kw))(lambda fn=_fn, op=_op: mhc_cases(fn, mhc_kw, op, lambda: mhc_kw(d=0)))


@entry("ref.mhc_coeffs_bwd", good=_call(ref.mhc_coeffs_bwd, mhc_bwd_kw))
def _():
    fn, mk = ref.mhc_coeffs_bwd, mhc_bwd_kw
    d0 = lambda: dict(mhc_kw(d=0), dalpha=None, dbeta=None)  # noqa: E731
    return [*mhc_cases(fn, mk, "mhc_coeffs", d0, light=True), *tensor_sweep(fn, mk, ("dalpha", "dbeta"), "H"),
            bad(fn, mk, "dalpha: static shape", ValueError, r"\bdalpha must have shape", dalpha=_r(N_, N_ + 1))]


def mhc_boundary_cases(fn, make, make_d0, light=False):
    return [*mhc_cases(fn, make, "mhc_boundary", make_d0, light=light),
            *tensor_sweep(fn, make, ("y", "alpha", "beta"), "H"),
            bad(fn, make, "y: (..., d+1)", ValueError, r"\by must have shape", y=_r(3, D_ + 1))]


entry("ops.mhc_boundary", good=_call(ops.mhc_boundary, mhc_boundary_kw))(
    lambda: mhc_boundary_cases(ops.mhc_boundary, mhc_boundary_kw, lambda: mhc_boundary_kw(d=0)))
entry("ref.mhc_boundary", good=_call(ref.mhc_boundary, mhc_boundary_kw))(
    lambda: mhc_boundary_cases(ref.mhc_boundary, mhc_boundary_kw, lambda: mhc_boundary_kw(d=0)))


@entry("ref.mhc_boundary_bwd", good=_call(ref.mhc_boundary_bwd, mhc_boundary_bwd_kw))
def _():
    fn, mk = ref.mhc_boundary_bwd, mhc_boundary_bwd_kw
    d0 = lambda: dict(mhc_boundary_kw(d=0), dH_next=None, dx_next=None, dalpha_next=None,  # noqa: E731
                      dbeta_next=None)
    return [*mhc_boundary_cases(fn, mk, d0, light=True), *tensor_sweep(fn, mk, ("dH_next", "dx_next"), "H"),
            bad(fn, mk, "dH_next: (n, d) (would broadcast)", ValueError, r"\bdH_next must have shape",
                dH_next=_r(N_, D_))]


def sinkhorn_cases(fn, make):
    return [*tensor_sweep(fn, make, ("logits",), "logits"),
            bad(fn, make, "logits: (..., n, n+1)", ValueError, r"\blogits must have shape \(\.\.\., n, n\)",
                logits=_r(3, N_, N_ + 1)),
            bad(fn, make, "logits: n = 17", ValueError, r"\blogits must be n x n with 1 <= n <= 16",
                logits=_r(17, 17)),
            *iters_sweep(fn, make),
            *positive_float_sweep(fn, make, "sinkhorn", "eps", "p3:")]


entry("ref.sinkhorn", good=_call(ref.sinkhorn, sinkhorn_kw))(lambda: sinkhorn_cases(ref.sinkhorn, sinkhorn_kw))


@entry("ref.sinkhorn_bwd", good=_call(ref.sinkhorn_bwd, lambda: dict(dP=_r(3, N_, N_), **sinkhorn_kw())))
def _():
    mk = lambda: dict(dP=_r(3, N_, N_), **sinkhorn_kw())  # noqa: E731
    return [*sinkhorn_cases(ref.sinkhorn_bwd, mk),
            bad(ref.sinkhorn_bwd, mk, "dP: (n, n+1)", ValueError, r"\bdP must have shape", dP=_r(N_, N_ + 1))]


def da_cases(fn, make):
    return [*tensor_sweep(fn, make, ("S", "A"), "S"),
            bad(fn, make, "S: 2-D", ValueError, r"\bS must have shape \(l, \*tok, d\)", S=_r(3, D_)),
            bad(fn, make, "S: 0 slots", ValueError, r"\bS must have 1 to 128 depth slots",
                S=From(lambda kw: kw["S"][:0]), A=From(lambda kw: kw["A"][..., :0])),
            bad(fn, make, "S: 129 slots", ValueError, r"\bS must have 1 to 128 depth slots",
                S=_r(129, 5, D_), A=_r(2, 129)),
            bad(fn, make, "A: wrong l", ValueError, r"\bA must have shape", A=_r(5, 2, 4)),
            bad(fn, make, "A: wrong tokens", ValueError, r"\bA must have shape", A=_r(6, 2, 3)),
            bad(fn, make, "A: 4-D", ValueError, r"\bA must have 2 dims", A=_r(1, 5, 2, 3)),
            bad(fn, make, "A: C = 0", ValueError, r"\bA must have C >= 1", A=_r(0, 3))]


for _name, _fn in (("ops.depth_aggregate", ops.depth_aggregate), ("ref.depth_aggregate", ref.depth_aggregate)):
    entry(_name, good=_call(_fn, da_kw))(lambda fn=_fn: da_cases(fn, da_kw))


@entry("ref.depth_aggregate_bwd", good=_call(ref.depth_aggregate_bwd, lambda: dict(dY=_r(2, 5, D_), **da_kw())))
def _():
    mk = lambda: dict(dY=_r(2, 5, D_), **da_kw())  # noqa: E731
    return [*da_cases(ref.depth_aggregate_bwd, mk), *tensor_sweep(ref.depth_aggregate_bwd, mk, ("dY",), "S"),
            bad(ref.depth_aggregate_bwd, mk, "dY: (C+1, N, d)", ValueError, r"\bdY must have shape", dY=_r(3, 5, D_))]


def qkv_cases(fn, make, op="depth_aggregate_qkv_norm"):
    return [*tensor_sweep(fn, make, ("S", "A", "norm_weights"), "S"),
            bad(fn, make, "S: 2-D", ValueError, r"\bS must have shape", S=_r(3, D_)),
            bad(fn, make, "A: C = 2", ValueError, r"\bA must have C = 4 ways", A=_r(5, 2, 3)),
            bad(fn, make, "norm_weights: (4, d)", ValueError, r"\bnorm_weights must have shape \(3, 8\)",
                norm_weights=_r(4, D_)),
            *positive_float_sweep(fn, make, op, "eps", "p3:")]


for _name, _fn in (("ops.depth_aggregate_qkv_norm", ops.depth_aggregate_qkv_norm),
                   ("ref.depth_aggregate_qkv_norm", ref.depth_aggregate_qkv_norm)):
    entry(_name, good=_call(_fn, qkv_kw))(lambda fn=_fn: qkv_cases(fn, qkv_kw))


@entry("ref.depth_aggregate_qkv_norm_bwd",
       good=_call(ref.depth_aggregate_qkv_norm_bwd, lambda: dict(dOut=_r(4, 5, D_), **qkv_kw())))
def _():
    mk = lambda: dict(dOut=_r(4, 5, D_), **qkv_kw())  # noqa: E731
    fn = ref.depth_aggregate_qkv_norm_bwd
    return [*qkv_cases(fn, mk), *tensor_sweep(fn, mk, ("dOut",), "S"),
            bad(fn, mk, "dOut: (3, N, d)", ValueError, r"\bdOut must have shape", dOut=_r(3, 5, D_))]


def mw_cases(fn, make):
    return [*tensor_sweep(fn, make, ("x", "W1", "W2", "bias"), "x"),
            bad(fn, make, "x: 1-D", ValueError, r"\bx must have shape \(\*tok, d\)", x=_r(D_)),
            bad(fn, make, "W1: (d+1, K)", ValueError, r"\bW1 must have shape", W1=_r(D_ + 1, 4)),
            bad(fn, make, "W1: 3-D", ValueError, r"\bW1 must have 2 dims", W1=_r(1, D_, 4)),
            bad(fn, make, "W2: (K+1, C·l)", ValueError, r"\bW2 must have shape", W2=_r(5, 6)),
            bad(fn, make, "W2: C·l not a multiple of C", ValueError, r"\bW2 must have shape", W2=_r(4, 7)),
            bad(fn, make, "bias: (C·l+1,)", ValueError, r"\bbias must have shape", bias=_r(7)),
            bad(fn, make, "n_ways = 0", ValueError, r"\bn_ways must be >= 1", n_ways=0),
            bad(fn, make, "n_ways = 2.0", TypeError, r"\bn_ways must be an int", n_ways=2.0),
            bad(fn, make, "approximate = 'erf'", ValueError, r"\bapproximate must be 'none' or 'tanh'",
                approximate="erf"),
            *positive_float_sweep(fn, make, "mudd_weights", "eps", "p3:")]


for _name, _fn in (("ops.mudd_weights", ops.mudd_weights), ("ref.mudd_weights", ref.mudd_weights)):
    entry(_name, good=_call(_fn, mw_kw))(lambda fn=_fn: mw_cases(fn, mw_kw))


@entry("ref.mudd_weights_bwd", good=_call(ref.mudd_weights_bwd, lambda: dict(dA=_r(5, 2, 3), **mw_kw())))
def _():
    mk = lambda: dict(dA=_r(5, 2, 3), **mw_kw())  # noqa: E731
    return [*mw_cases(ref.mudd_weights_bwd, mk), *tensor_sweep(ref.mudd_weights_bwd, mk, ("dA",), "x"),
            bad(ref.mudd_weights_bwd, mk, "dA: (N, C, l+1)", ValueError, r"\bdA must have shape", dA=_r(5, 2, 4))]


@entry("ref.dwa_slots", good=lambda: ref.dwa_slots(3, 2, 1))
def _():
    mk = lambda: dict(block_index=3, dilation=2, period=1)  # noqa: E731
    fn = ref.dwa_slots
    return [bad(fn, mk, "block_index = -1", ValueError, r"\bblock_index must be >= 0", block_index=-1),
            bad(fn, mk, "block_index = 1.0", TypeError, r"\bblock_index must be an int", block_index=1.0),
            bad(fn, mk, "dilation = 0", ValueError, r"\bdilation must be >= 1", dilation=0),
            bad(fn, mk, "period = '1'", TypeError, r"\bperiod must be an int", period="1")]


@entry("ref.dwa_init_weights", good=lambda: ref.dwa_init_weights(3, 2))
def _():
    mk = lambda: dict(block_index=3, dilation=2)  # noqa: E731
    fn = ref.dwa_init_weights
    return [bad(fn, mk, "block_index = -1", ValueError, r"\bblock_index must be >= 0", block_index=-1),
            bad(fn, mk, "dilation = 1.5", TypeError, r"\bdilation must be an int", dilation=1.5)]


@entry("ref.hc_init_static", good=lambda: ref.hc_init_static(4, 1))
def _():
    mk = lambda: dict(n=4, layer_index=1)  # noqa: E731
    fn = ref.hc_init_static
    return [bad(fn, mk, "n = 0", ValueError, r"\bn must be in 1\.\.16", n=0),
            bad(fn, mk, "n = 17", ValueError, r"\bn must be in 1\.\.16", n=17),
            bad(fn, mk, "n = 2.0", TypeError, r"\bn must be an int", n=2.0),
            bad(fn, mk, "layer_index = -1", ValueError, r"\blayer_index must be >= 0", layer_index=-1),
            bad(fn, mk, "layer_index = 1.0", TypeError, r"\blayer_index must be an int", layer_index=1.0)]


def expand_cases(fn):
    mk = lambda: dict(x=_r(3, D_), n=4)  # noqa: E731
    return [*tensor_sweep(fn, mk, ("x",), "x"),
            bad(fn, mk, "x: 0-dim", ValueError, r"\bx must have shape \(\.\.\., d\)", x=torch.tensor(1.0)),
            bad(fn, mk, "n = 0", ValueError, r"\bn must be in 1\.\.16", n=0),
            bad(fn, mk, "n = 17", ValueError, r"\bn must be in 1\.\.16", n=17),
            bad(fn, mk, "p5:n = 2.0", TypeError, r"expand_streams: n must be an int", n=2.0),
            bad(fn, mk, "p5:n = '2'", TypeError, r"expand_streams: n must be an int", n="2")]


entry("ref.expand_streams", good=lambda: ref.expand_streams(_r(3, D_), 4))(lambda: expand_cases(ref.expand_streams))
entry("nn.expand_streams", good=lambda: cnn.expand_streams(_r(3, D_), 4))(lambda: expand_cases(cnn.expand_streams))


def reduce_cases(fn):
    return [*tensor_sweep(fn, streams_kw, ("H",), "H"), *stream_shape_cases(fn, streams_kw)]


entry("ref.reduce_streams", good=_call(ref.reduce_streams, streams_kw))(lambda: reduce_cases(ref.reduce_streams))
entry("nn.reduce_streams", good=_call(cnn.reduce_streams, streams_kw))(lambda: reduce_cases(cnn.reduce_streams))


# The validators the oracle exports: the contract itself, called with the public op's arguments.
def _validator_cases(fn, make, tensors, first, extra):
    return [*tensor_sweep(fn, make, tensors, first), *extra(fn, make)]


_VALIDATORS = {
    "validate_hc_pre": (lambda: {k: v for k, v in hc_pre_kw().items()}, ("H", "A", "B", "W"), "H",
                        lambda fn, mk: [*positive_float_sweep(fn, mk, "hc_pre", "eps", "p3:"),
                                        bad(fn, lambda: hc_pre_kw(d=0), "p3:d = 0", ValueError, r"d >= 1 features")]),
    "validate_hc_post": (hc_post_kw, ("H", "y", "alpha", "beta"), "H",
                         lambda fn, mk: [bad(fn, mk, "y: (..., d+1)", ValueError, r"\by must have shape",
                                             y=_r(3, D_ + 1))]),
    "validate_hc_boundary": (hc_boundary_kw, ("H", "y", "A", "W"), "H",
                             lambda fn, mk: positive_float_sweep(fn, mk, "hc_boundary", "eps", "p3:")),
    "validate_stream_mix": (stream_mix_kw, ("H", "w"), "H", lambda fn, mk: stream_shape_cases(fn, mk)),
    "validate_sinkhorn": (sinkhorn_kw, ("logits",), "logits",
                          lambda fn, mk: [*iters_sweep(fn, mk),
                                          *positive_float_sweep(fn, mk, "sinkhorn", "eps", "p3:")]),
    "validate_mhc_coeffs": (mhc_kw, ("H", "phi", "b"), "H",
                            lambda fn, mk: [*positive_float_sweep(fn, mk, "mhc_coeffs", "sinkhorn_eps", "p3:"),
                                            *positive_float_sweep(fn, mk, "mhc_coeffs", "post_mult", "p3:"),
                                            bad(fn, lambda: mhc_kw(d=0), "p3:d = 0", ValueError, r"d >= 1 features")]),
    "validate_mhc_boundary": (mhc_boundary_kw, ("H", "y", "phi"), "H",
                              lambda fn, mk: positive_float_sweep(fn, mk, "mhc_boundary", "eps", "p3:")),
    "validate_depth_aggregate": (da_kw, ("S", "A"), "S",
                                 lambda fn, mk: [bad(fn, mk, "A: 4-D", ValueError, r"\bA must have 2 dims",
                                                     A=_r(1, 5, 2, 3))]),
    "validate_depth_aggregate_qkv_norm": (qkv_kw, ("S", "A", "norm_weights"), "S",
                                          lambda fn, mk: positive_float_sweep(fn, mk, "depth_aggregate_qkv_norm",
                                                                              "eps", "p3:")),
    "validate_mudd_weights": (lambda: {k: v for k, v in mw_kw().items() if k != "approximate"},
                              ("x", "W1", "W2", "bias"), "x",
                              lambda fn, mk: [*positive_float_sweep(fn, mk, "mudd_weights", "eps", "p3:"),
                                              bad(fn, mk, "n_ways = 2.0", TypeError, r"\bn_ways must be an int",
                                                  n_ways=2.0)]),
}
for _name, (_mk, _tensors, _first, _extra) in _VALIDATORS.items():
    _fn = getattr(ref, _name)
    entry(f"ref.{_name}", good=_call(_fn, _mk))(
        lambda fn=_fn, mk=_mk, t=_tensors, f=_first, x=_extra: _validator_cases(fn, mk, t, f, x))


# --------------------------------------------------------------- custom ops (part 5)

CUSTOM_OP = "torch.ops.crosslayer::"


def _da_op(S, A):
    return torch.ops.crosslayer.depth_aggregate(S, A)


def _qkv_op(S, A, norm_weights, eps):
    return torch.ops.crosslayer.depth_aggregate_qkv_norm(S, A, norm_weights, eps)


@entry(CUSTOM_OP + "depth_aggregate", good=_call(_da_op, da_kw))
def _():
    mk = da_kw
    return [bad(_da_op, mk, "p5:S: rank 4 (tokens not flattened)", ValueError,
                r"crosslayer::depth_aggregate: S must have shape \(l, N, d\)", S=_r(3, 2, 5, D_), A=_r(2, 5, 2, 3)),
            bad(_da_op, mk, "S: rank 2", ValueError, r"\bS must have shape \(l, ", S=_r(3, D_)),
            bad(_da_op, mk, "A: rank 4", ValueError, r"\bA must have 2 dims", A=_r(1, 5, 2, 3)),
            bad(_da_op, mk, "A: wrong l", ValueError, r"\bA must have shape", A=_r(5, 2, 4)),
            bad(_da_op, mk, "S: int dtype", TypeError, r"\bS must have dtype", S=From(lambda kw: kw["S"].int()))]


@entry(CUSTOM_OP + "depth_aggregate_qkv_norm", good=_call(_qkv_op, qkv_kw))
def _():
    mk = qkv_kw
    return [bad(_qkv_op, mk, "p5:S: rank 4 (tokens not flattened)", ValueError,
                r"crosslayer::depth_aggregate_qkv_norm: S must have shape \(l, N, d\)",
                S=_r(3, 2, 5, D_), A=_r(2, 5, 4, 3)),
            bad(_qkv_op, mk, "A: C = 2", ValueError, r"\bA must have C = 4 ways", A=_r(5, 2, 3)),
            bad(_qkv_op, mk, "norm_weights: (4, d)", ValueError, r"\bnorm_weights must have shape",
                norm_weights=_r(4, D_)),
            bad(_qkv_op, mk, "p3:eps = 0", ValueError, r"depth_aggregate_qkv_norm: eps must be > 0", eps=0.0)]


# ------------------------------------------------------------------------ modules


@entry("nn.HyperConnections", good=lambda: cnn.HyperConnections(D_, N_).pre(_r(3, N_, D_)))
def _():
    fn = cnn.HyperConnections
    mk = lambda: dict(d=D_, n=N_)  # noqa: E731
    return [bad(fn, mk, "d = '8'", ValueError, r"\bd must be an int >= 1", d="8"),
            bad(fn, mk, "d = 0", ValueError, r"\bd must be an int >= 1", d=0),
            bad(fn, mk, "n = 2.0", ValueError, r"\bn must be an int in 1\.\.16", n=2.0),
            bad(fn, mk, "n = 17", ValueError, r"\bn must be an int in 1\.\.16", n=17),
            bad(fn, mk, "layer_index = -1", ValueError, r"\blayer_index must be an int >= 0", layer_index=-1),
            *(bad(fn, mk, f"p3:eps = {v!r}", ValueError, r"HyperConnections: eps must be > 0", eps=v)
              for v in (0.0, -1.0, NAN)),
            bad(fn, mk, "p3:eps: str", TypeError, r"HyperConnections: eps must be a Python float", eps="1e-6"),
            Bad("pre: H of the wrong shape", lambda: cnn.HyperConnections(D_, N_).pre(_r(3, N_ - 1, D_)),
                ValueError, r"H must have shape \(\.\.\., n, d\) = \(\.\.\., 4, 8\)"),
            Bad("pre: H not a tensor", lambda: cnn.HyperConnections(D_, N_).pre([[0.0] * D_] * N_),
                ValueError, r"H must have shape"),
            Bad("forward: no branch", lambda: cnn.HyperConnections(D_, N_)(_r(3, N_, D_)), ValueError, r"no branch")]


@entry("nn.ManifoldHyperConnections", good=lambda: cnn.ManifoldHyperConnections(D_, N_).pre(_r(3, N_, D_)))
def _():
    fn = cnn.ManifoldHyperConnections
    mk = lambda: dict(d=D_, n=N_)  # noqa: E731
    who = "ManifoldHyperConnections"
    return [bad(fn, mk, "d = 8.0", ValueError, r"\bd must be an int >= 1", d=8.0),
            bad(fn, mk, "iters = 0", ValueError, r"\biters must be an int >= 1", iters=0),
            bad(fn, mk, "post_mult = 1", ValueError, rf"{who}: post_mult must be > 1", post_mult=1.0),
            bad(fn, mk, "p3:post_mult = inf", ValueError, rf"{who}: post_mult must be > 1 and finite", post_mult=INF),
            bad(fn, mk, "p3:post_mult: str", TypeError, rf"{who}: post_mult must be a Python float", post_mult="2"),
            bad(fn, mk, "p3:pre_eps = -1", ValueError, rf"{who}: pre_eps must be >= 0", pre_eps=-1.0),
            bad(fn, mk, "p3:eps = 0", ValueError, rf"{who}: eps must be > 0", eps=0.0),
            bad(fn, mk, "p3:sinkhorn_eps = -1e-6", ValueError, rf"{who}: sinkhorn_eps must be > 0", sinkhorn_eps=-1e-6),
            Bad("pre: H of the wrong shape", lambda: cnn.ManifoldHyperConnections(D_, N_).pre(_r(3, N_, D_ + 1)),
                ValueError, r"H must have shape")]


def _pending(**over):
    kw = {**dict(H=_r(3, N_, D_), y=_r(3, D_), alpha=_r(3, N_, N_ + 1), beta=_r(3, N_)), **over}
    return cnn.PendingStreams(**kw)


@entry("nn.PendingStreams", good=lambda: _pending().resolve())
def _():
    return [Bad("resolve: y of the wrong shape", lambda: _pending(y=_r(3, D_ + 1)).resolve(), ValueError,
                r"\by must have shape"),
            Bad("resolve: alpha int", lambda: _pending(alpha=torch.ones(3, N_, N_ + 1, dtype=torch.int64)).resolve(),
                TypeError, r"\balpha must have dtype")]


def _post(**over):
    kw = {**dict(H=_r(3, N_, D_), alpha=_r(3, N_, N_ + 1), beta=_r(3, N_)), **over}
    return cnn.StreamPost(**kw)


@entry("nn.StreamPost", good=lambda: _post()(_r(3, D_)))
def _():
    return [Bad("call: y of the wrong shape", lambda: _post()(_r(3, D_ + 1)), ValueError, r"\by must have shape"),
            Bad("defer: y not a tensor", lambda: _post().defer([0.0] * D_), TypeError, r"\by must be a torch\.Tensor"),
            Bad("call: beta of the wrong shape", lambda: _post(beta=_r(N_ + 1))(_r(3, D_)), ValueError,
                r"\bbeta must have shape")]


@entry("nn.param_groups", good=lambda: cnn.param_groups(torch.nn.Linear(2, 2), 0.1))
def _():
    fn = cnn.param_groups
    mk = lambda: dict(model=torch.nn.Linear(2, 2), weight_decay=0.1)  # noqa: E731
    return [bad(fn, mk, "p5:model: a list", TypeError, r"param_groups: model must be a torch\.nn\.Module",
                model=[torch.nn.Linear(2, 2)]),
            bad(fn, mk, "p5:model: parameters()", TypeError, r"param_groups: model must be a torch\.nn\.Module",
                model=From(lambda kw: kw["model"].parameters())),
            bad(fn, mk, "weight_decay: str", TypeError, r"param_groups: weight_decay must be a Python float",
                weight_decay="0.1"),
            bad(fn, mk, "weight_decay = -0.1", ValueError, r"param_groups: weight_decay must be >= 0",
                weight_decay=-0.1)]


@entry("nn.static_connection_parameters",
       good=lambda: list(cnn.static_connection_parameters(cnn.HyperConnections(D_, N_))))
def _():
    return [Bad("model: a list", lambda: list(cnn.static_connection_parameters([cnn.HyperConnections(D_, N_)])),
                TypeError, r"static_connection_parameters: model must be a torch\.nn\.Module")]


def _stack(filled=4, n_slots=6):
    stack = cnn.DepthStack.start(_r(5, D_), n_slots)
    for _ in range(filled - 1):
        stack.push(_r(5, D_))
    return stack


@entry("nn.DepthStack", good=lambda: _stack().aggregate(_r(2, 4), slice(0, 4)))
def _():
    DS = cnn.DepthStack
    return [Bad("n_slots = 0", lambda: DS(0, (5, D_)), ValueError, r"\bn_slots must be a positive int"),
            Bad("n_slots = 2.0", lambda: DS(2.0, (5, D_)), ValueError, r"\bn_slots must be a positive int"),
            Bad("slot_shape: (d,)", lambda: DS(3, (D_,)), ValueError, r"\bslot_shape must be \(\*tok, d\)"),
            Bad("start: x0 not a tensor", lambda: DS.start([0.0] * D_, 3), TypeError, r"\bx0 must be a torch\.Tensor"),
            Bad("push: x of the wrong shape", lambda: _stack().push(_r(5, D_ + 1)), ValueError,
                r"\bx must have the stack's slot shape"),
            Bad("push: x int", lambda: _stack().push(torch.ones(5, D_, dtype=torch.int64)), TypeError,
                r"\bx must have dtype"),
            Bad("aggregate: slots not a slice", lambda: _stack().aggregate(_r(2, 4), [0, 1, 2, 3]), TypeError,
                r"\bslots must be a slice or None"),
            Bad("p5:aggregate: reversed slice", lambda: _stack().aggregate(_r(2, 3), slice(3, 0, -1)), ValueError,
                r"DepthStack: slots must be a slice with step >= 1"),
            Bad("p5:aggregate: reversed slice, no stop", lambda: _stack().aggregate(_r(2, 4), slice(None, None, -1)),
                ValueError, r"DepthStack: slots must be a slice with step >= 1"),
            Bad("aggregate: float slice bound", lambda: _stack().aggregate(_r(2, 2), slice(0, 2.0)), TypeError,
                r"DepthStack: slots\.stop must be an int or None"),
            Bad("aggregate: unfilled slot", lambda: _stack().aggregate(_r(2, 5), slice(0, 5)), ValueError,
                r"only 4 slots are filled"),
            Bad("aggregate: A of the wrong l", lambda: _stack().aggregate(_r(2, 3), slice(0, 4)), ValueError,
                r"\bA must have shape"),
            Bad("p3:mudd_weights: eps = 0", lambda: _stack().mudd_weights(_r(D_, 4), _r(4, 8), _r(8), 2, eps=0.0),
                ValueError, r"mudd_weights: eps must be > 0"),
            Bad("mudd_weights: W1 of the wrong shape", lambda: _stack().mudd_weights(_r(D_ + 1, 4), _r(4, 8), _r(8), 2),
                ValueError, r"\bW1 must have shape"),
            Bad("p3:aggregate_qkv_norm: eps = -1",
                lambda: _stack().aggregate_qkv_norm(_r(4, 4), _r(3, D_), -1.0), ValueError,
                r"depth_aggregate_qkv_norm: eps must be > 0"),
            Bad("aggregate_qkv_norm: norm_weights (3, d+1)",
                lambda: _stack().aggregate_qkv_norm(_r(4, 4), _r(3, D_ + 1)), ValueError,
                r"\bnorm_weights must have shape")]


@entry("nn.MUDDConnection", good=lambda: cnn.MUDDConnection(D_, 2, 4)(_stack(4)))
def _():
    fn = cnn.MUDDConnection
    mk = lambda: dict(d=D_, layer_index=2, n_layers=4)  # noqa: E731
    return [bad(fn, mk, "d = '8'", ValueError, r"\bd must be an int >= 1", d="8"),
            bad(fn, mk, "layer_index = n_layers", ValueError, r"\blayer_index must be < n_layers", layer_index=4),
            bad(fn, mk, "n_layers = 4.0", ValueError, r"\bn_layers must be an int >= 1", n_layers=4.0),
            bad(fn, mk, "ways = ''", ValueError, r"\bways must be a non-empty string", ways=""),
            bad(fn, mk, "gelu = 'erf'", ValueError, r"\bgelu must be 'none' or 'tanh'", gelu="erf"),
            bad(fn, mk, "p3:eps = 0", ValueError, r"MUDDConnection: eps must be > 0", eps=0.0),
            bad(fn, mk, "round64 = 1", TypeError, r"\bround64 must be a bool", round64=1),
            Bad("forward: a stack with the wrong fill", lambda: cnn.MUDDConnection(D_, 2, 4)(_stack(3)), ValueError,
                r"expects a stack with 4 filled slots"),
            Bad("p3:forward: norm_eps = 0", lambda: cnn.MUDDConnection(D_, 2, 4)(_stack(4), _r(3, D_), 0.0), ValueError,
                r"depth_aggregate_qkv_norm: eps must be > 0")]


@entry("nn.DenseFormerDWA", good=lambda: cnn.DenseFormerDWA(2)(_stack(4)))
def _():
    fn = cnn.DenseFormerDWA
    mk = lambda: dict(layer_index=2)  # noqa: E731
    return [bad(fn, mk, "layer_index = -1", ValueError, r"DenseFormerDWA: layer_index must be >= 0", layer_index=-1),
            bad(fn, mk, "layer_index = 1.0", TypeError, r"DenseFormerDWA: layer_index must be an int", layer_index=1.0),
            bad(fn, mk, "dilation = 0", ValueError, r"DenseFormerDWA: dilation must be >= 1", dilation=0),
            bad(fn, mk, "period = '2'", TypeError, r"DenseFormerDWA: period must be an int", period="2"),
            Bad("forward: a stack with the wrong fill", lambda: cnn.DenseFormerDWA(2)(_stack(3)), ValueError,
                r"expects a stack with 4 filled slots")]


@entry("nn.mudd_hidden", good=lambda: cnn.mudd_hidden(4, 3))
def _():
    fn = cnn.mudd_hidden
    mk = lambda: dict(n_ways=4, n_slots=3)  # noqa: E731
    return [bad(fn, mk, "n_ways = '4'", TypeError, r"mudd_hidden: n_ways must be an int", n_ways="4"),
            bad(fn, mk, "n_slots = 0", ValueError, r"mudd_hidden: n_slots must be >= 1", n_slots=0),
            bad(fn, mk, "expand = 1.0", TypeError, r"mudd_hidden: expand must be an int", expand=1.0),
            bad(fn, mk, "round64 = 'yes'", TypeError, r"mudd_hidden: round64 must be a bool", round64="yes")]


# ------------------------------------------------------------------------- models
# Config fields given the wrong JSON-ish type (a str, None, a float for an int) or a
# negative size: a TypeError / ValueError naming the field.

_CFG_ERRORS = (TypeError, ValueError)


def config_cases(cls, size_field, more):
    fn = cls
    mk = dict
    out = [bad(fn, mk, f"{size_field} = '64'", TypeError, rf"\b{size_field}\b", **{size_field: "64"}),
           bad(fn, mk, f"{size_field} = None", TypeError, rf"\b{size_field}\b", **{size_field: None}),
           bad(fn, mk, f"{size_field} = 64.0", TypeError, rf"\b{size_field}\b", **{size_field: 64.0}),
           bad(fn, mk, f"{size_field} = -64", ValueError, rf"\b{size_field}\b", **{size_field: -64})]
    out += [bad(fn, mk, f"{k} = {v!r}", exc, rf"\b{k}\b", **{k: v}) for k, v, exc in more]
    return out


_LM_TINY = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=2, max_seq_len=16)


@entry("models.LMConfig", good=lambda: models.LMConfig(**_LM_TINY))
def _():
    return config_cases(models.LMConfig, "d_model", [
        ("n_layers", 0, ValueError), ("n_heads", "2", TypeError), ("vocab_size", None, TypeError),
        ("connection", "resnet", ValueError), ("hc_streams", 17, ValueError), ("mhc_iters", 2.0, TypeError),
        ("norm_eps", "1e-6", TypeError), ("mudd_round64", 1, TypeError), ("max_seq_len", -1, ValueError)])


@entry("models.CrossLayerLM", good=lambda: models.CrossLayerLM(models.LMConfig(**_LM_TINY))(torch.zeros(1, 4).long()))
def _():
    model = lambda: models.CrossLayerLM(models.LMConfig(**_LM_TINY))  # noqa: E731
    return [Bad("cfg: a dict", lambda: models.CrossLayerLM(dict(_LM_TINY)), TypeError, r"\bLMConfig\b"),
            Bad("forward: float idx", lambda: model()(torch.zeros(1, 4)), _CFG_ERRORS, r"\bidx\b"),
            Bad("forward: 1-D idx", lambda: model()(torch.zeros(4).long()), _CFG_ERRORS, r"\bidx\b")]


_MUDD_MORE = [("n_layer", "2", TypeError), ("n_head", 0, ValueError), ("vocab_size", None, TypeError),
              ("block_size", -1, ValueError), ("norm_eps", "1e-6", TypeError), ("use_qk_norm", "yes", TypeError),
              ("intermediate_size", 256.0, TypeError), ("rope_base", None, TypeError)]
_MUDD_TINY = dict(block_size=16, vocab_size=32, n_layer=2, n_head=2, dim=64)


@entry("models.MUDDFormerConfig", good=lambda: models.MUDDFormerConfig(**_MUDD_TINY))
def _():
    return config_cases(models.MUDDFormerConfig, "dim", _MUDD_MORE)


@entry("models.MUDDPythiaConfig", good=lambda: models.MUDDPythiaConfig(**_MUDD_TINY))
def _():
    return config_cases(models.MUDDPythiaConfig, "dim", _MUDD_MORE + [
        ("rotary_pct", "0.25", TypeError), ("use_parallel_residual", "yes", TypeError)])


def _mudd_model_cases(model_cls, cfg_cls, other_cfg_cls):
    tiny = lambda: model_cls(cfg_cls(**_MUDD_TINY))  # noqa: E731
    return [Bad("config: a dict", lambda: model_cls(dict(_MUDD_TINY)), TypeError, cfg_cls.__name__),
            Bad(f"config: a {other_cfg_cls.__name__}", lambda: model_cls(other_cfg_cls(**_MUDD_TINY)), TypeError,
                cfg_cls.__name__),
            Bad("forward: float idx", lambda: tiny()(torch.zeros(1, 4)), _CFG_ERRORS, r"\bidx\b")]


entry("models.MUDDFormer", good=lambda: models.MUDDFormer(models.MUDDFormerConfig(**_MUDD_TINY)))(
    lambda: _mudd_model_cases(models.MUDDFormer, models.MUDDFormerConfig, models.MUDDPythiaConfig))
entry("models.MUDDPythia", good=lambda: models.MUDDPythia(models.MUDDPythiaConfig(**_MUDD_TINY)))(
    lambda: _mudd_model_cases(models.MUDDPythia, models.MUDDPythiaConfig, models.MUDDFormerConfig))


# ------------------------------------------------------------------- integrations

INTEGRATIONS = ("hyper_connections", "transformers")


def _integration(name):
    try:
        return importlib.import_module(f"crosslayer.integrations.{name}")
    except ImportError:  # its package is not installed: nothing of it to walk
        return None


def _model_cases(name, fn_name):
    def cases():
        fn = getattr(_integration(name), fn_name)
        return [Bad(f"p5:model = {v!r}", lambda v=v: fn(v), TypeError, rf"{fn_name}: model must be a torch\.nn\.Module")
                for v in ("str", None, [torch.nn.Linear(2, 2)])]
    return cases


for _m in INTEGRATIONS:
    if _integration(_m) is not None:
        for _fn in ("accelerate", "restore"):
            entry(f"integrations.{_m}.{_fn}",
                  good=lambda m=_m, f=_fn: getattr(_integration(m), f)(torch.nn.Linear(2, 2)))(_model_cases(_m, _fn))


def _fused_hc_cases():
    cls = _integration("hyper_connections").FusedHyperConnections
    return [Bad("tanh = False", lambda: cls(4, dim=16, tanh=False), ValueError, r"tanh = False"),
            Bad("num_residual_streams = 17", lambda: cls(17, dim=16), ValueError, r"num_residual_streams = 17")]


if _integration("hyper_connections") is not None:
    entry("integrations.hyper_connections.FusedHyperConnections",
          good=lambda: _integration("hyper_connections").FusedHyperConnections(4, dim=16, layer_index=0))(
        _fused_hc_cases)


# --------------------------------------------------------------------- exemptions

_INTERNAL_OP = ("internal custom op behind a public crosslayer.ops function, which validates its arguments "
                "first; the launchers TORCH_CHECK what reaches them")
EXEMPT: Dict[str, str] = {
    "ops.backends": "takes no arguments",
    "ops.fused_ops": "takes no arguments",
    "integrations.hyper_connections.AccelerationReport": "the record accelerate() returns, not built by users",
    "integrations.hyper_connections.UnsupportedHyperConnections": "an exception class",
    "integrations.transformers.UnsupportedModel": "an exception class",
    "integrations.transformers.model_math_in_float64": "a context manager without arguments",
    "integrations.transformers.FusedDeepseekV4DecoderLayer": (
        "made by accelerate() swapping the class of an existing layer; its constructor is transformers' own"),
    "integrations.transformers.FusedDeepseekV4HyperHead": (
        "made by accelerate() swapping the class of an existing head; its constructor is transformers' own"),
    **{CUSTOM_OP + op: _INTERNAL_OP for op in (
        "depth_aggregate_bwd", "depth_aggregate_qkv_norm_bwd", "depth_aggregate_qkv_norm_slots",
        "depth_aggregate_slots", "hc_boundary", "hc_boundary_bwd", "hc_boundary_mix", "hc_boundary_mix_bwd",
        "hc_post", "hc_post_bwd", "hc_pre", "hc_pre_bwd", "mhc_boundary", "mhc_boundary_bwd", "mhc_coeffs",
        "mhc_coeffs_bwd", "mhc_pre", "mudd_weights", "mudd_weights_bwd", "mudd_weights_bwd_into", "stream_mix",
        "stream_mix_bwd", "stream_mix_dots")},
}


# ----------------------------------------------------------------------- the walk


def _public_callables(module) -> List[str]:
    """The module's __all__ callables and every public function or class it holds that
    crosslayer defines (so an entry point missing from __all__ is walked too)."""
    names = set()
    for name in getattr(module, "__all__", ()):
        if callable(getattr(module, name, None)) and not inspect.ismodule(getattr(module, name)):
            names.add(name)
    for name, obj in vars(module).items():
        if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        if getattr(obj, "__module__", "").startswith("crosslayer"):
            names.add(name)
    return sorted(names)


def entry_points() -> List[str]:
    found = []
    for prefix, module in (("ops", ops), ("ref", ref), ("nn", cnn), ("models", models)):
        found += [f"{prefix}.{n}" for n in _public_callables(module)]
    for m in INTEGRATIONS:
        module = _integration(m)
        if module is not None:
            found += [f"integrations.{m}.{n}" for n in module.__all__ if callable(getattr(module, n))]
    ops_registered = getattr(torch._C, "_dispatch_get_all_op_names", lambda: [])()
    found += [CUSTOM_OP + n.split("::", 1)[1] for n in ops_registered if n.startswith("crosslayer::")]
    return sorted(set(found))


def _all_cases() -> List[Tuple[str, Bad]]:
    return [(name, case) for name in sorted(CASES) for case in CASES[name]()]


ALL_CASES = _all_cases()


def test_every_entry_point_has_cases_or_an_exemption():
    found = entry_points()
    missing = [n for n in found if n not in CASES and n not in EXEMPT]
    assert not missing, (f"public entry points without bad-input cases or an exemption: {missing}; "
                         "add their cases to tests/test_bad_inputs.py (CASES) or an exemption with its reason")
    stale = sorted(n for n in (*CASES, *EXEMPT) if n not in found and not n.startswith("integrations."))
    assert not stale, f"cases or exemptions for entry points that no longer exist: {stale}"
    both = sorted(set(CASES) & set(EXEMPT))
    assert not both, f"entry points both exempt and with cases: {both}"
    assert all(CASES[n]() for n in CASES), "an entry in CASES with no case"
    assert all(reason for reason in EXEMPT.values())


def test_the_walk_finds_what_it_must():
    """The enumeration itself: a sample of each kind of entry point is found."""
    found = set(entry_points())
    for name in ("ops.hc_pre", "ref.hc_boundary", "ref.validate_sinkhorn", "nn.DepthStack", "nn.param_groups",
                 "models.MUDDFormerConfig", CUSTOM_OP + "depth_aggregate"):
        assert name in found, name


@pytest.mark.parametrize("name", sorted(GOOD))
def test_good_call_runs(name):
    """The call every bad case of `name` departs from runs (so each bad case fails
    because of its one bad argument)."""
    GOOD[name]()


@pytest.mark.parametrize("name, case", ALL_CASES, ids=[f"{n}-{c.label}" for n, c in ALL_CASES])
def test_bad_input_is_refused(name, case):
    with pytest.raises(case.exc, match=case.match):
        case.call()


# -------------------------------------------------- part 3: d = 0 and domains on every path


def _paths(cuemu):
    """(label, context, function namespace): the oracle called directly, the public op on
    the oracle path, the public op on the emulated launchers and kernels."""
    return [("ref", emulate(None), ref), ("ops/oracle", emulate(None), ops), ("ops/emulator", emulate(cuemu), ops)]


_D0_REFUSED = [
    ("hc_pre", lambda m: m.hc_pre(**hc_pre_kw(d=0)), "hc_pre"),
    ("hc_boundary", lambda m: m.hc_boundary(**hc_boundary_kw(d=0)), "hc_boundary"),
    ("mhc_coeffs", lambda m: m.mhc_coeffs(**mhc_kw(d=0)), "mhc_coeffs"),
    ("mhc_boundary", lambda m: m.mhc_boundary(**mhc_boundary_kw(d=0)), "mhc_boundary"),
]


@pytest.mark.cuemu
@pytest.mark.parametrize("op, call, who", _D0_REFUSED, ids=[c[0] for c in _D0_REFUSED])
def test_d0_is_refused_the_same_on_every_path(cuemu, op, call, who):
    """DHC and mHC normalise over the features: d = 0 is a ValueError, the same message
    on the oracle, the public op's oracle path and the emulated kernels (before: NaN
    coefficients from the oracle, a RuntimeError from the launchers)."""
    messages = set()
    for label, ctx, m in _paths(cuemu):
        with ctx, pytest.raises(ValueError, match=rf"{who}: H must have d >= 1 features") as info:
            call(m)
        messages.add(str(info.value))
    assert len(messages) == 1, messages


_BAD_SCALARS = [
    ("hc_pre eps=0", lambda m: m.hc_pre(**{**hc_pre_kw(), "eps": 0.0}), "hc_pre: eps"),
    ("hc_pre s_a=inf", lambda m: m.hc_pre(**{**hc_pre_kw(), "s_a": INF}), "hc_pre: s_a"),
    ("mhc eps=-1", lambda m: m.mhc_coeffs(**{**mhc_kw(), "eps": -1.0}), "mhc_coeffs: eps"),
    ("mhc sinkhorn_eps=-1", lambda m: m.mhc_coeffs(**{**mhc_kw(), "sinkhorn_eps": -1.0}), "mhc_coeffs: sinkhorn_eps"),
    ("mhc post_mult=inf", lambda m: m.mhc_coeffs(**{**mhc_kw(), "post_mult": INF}), "mhc_coeffs: post_mult"),
    ("mhc_boundary sinkhorn_eps=0", lambda m: m.mhc_boundary(**{**mhc_boundary_kw(), "sinkhorn_eps": 0.0}),
     "mhc_boundary: sinkhorn_eps"),
    ("qkv_norm eps=0", lambda m: m.depth_aggregate_qkv_norm(**{**qkv_kw(), "eps": 0.0}),
     "depth_aggregate_qkv_norm: eps"),
    ("mudd_weights eps=nan", lambda m: m.mudd_weights(**{**mw_kw(), "eps": NAN}), "mudd_weights: eps"),
]


@pytest.mark.cuemu
@pytest.mark.parametrize("label, call, who", _BAD_SCALARS, ids=[c[0] for c in _BAD_SCALARS])
def test_out_of_domain_scalars_are_refused_on_every_path(cuemu, label, call, who):
    for _, ctx, m in _paths(cuemu):
        with ctx, pytest.raises(ValueError, match=who):
            call(m)


@pytest.mark.cuemu
def test_d0_where_the_math_is_defined_is_the_same_on_every_path(cuemu):
    """Where no rms over the features is taken, d = 0 gives what the math gives, the same
    on every path: SHC hc_pre x (..., 0) with alpha = A, beta = B; mudd_weights A = bias
    (rms(x)·W1 is a sum over no features, GELU(0) = 0); hc_post and the depth ops empty
    outputs."""
    A, B = _r(N_, N_ + 1), _r(N_)
    bias = _r(6)
    for _, ctx, m in _paths(cuemu):
        with ctx:
            x, alpha, beta = m.hc_pre(torch.randn(3, N_, 0), A, B)
            assert x.shape == (3, 0) and torch.equal(alpha, A) and torch.equal(beta, B)
            got = m.mudd_weights(torch.randn(5, 0), torch.randn(0, 4), _r(4, 6), bias, 2)
            assert torch.equal(got, bias.view(2, 3).expand(5, 2, 3))
            assert m.hc_post(torch.randn(3, N_, 0), torch.randn(3, 0), _r(3, N_, N_ + 1), _r(3, N_)).shape == (3, N_, 0)
            assert m.depth_aggregate(torch.randn(3, 5, 0), _r(5, 2, 3)).shape == (2, 5, 0)
            assert m.depth_aggregate_qkv_norm(torch.randn(3, 5, 0), _r(5, 4, 3), torch.randn(3, 0)).shape == (4, 5, 0)


def test_small_positive_eps_is_accepted():
    """The domains are open at 0 only: tiny positive eps (the hyper-connections
    integration passes 1e-24 / d) and pre_eps = 0 run."""
    ops.hc_pre(**{**hc_pre_kw(), "eps": 1e-24 / D_})
    alpha, beta = ops.mhc_coeffs(**{**mhc_kw(), "pre_eps": 0.0, "sinkhorn_eps": 1e-12, "post_mult": 0.5})
    assert torch.isfinite(alpha).all() and torch.isfinite(beta).all()


# ------------------------------------------------- part 5: the custom op and its fake agree


_FLAT_OPS = [
    ("depth_aggregate", _da_op, da_kw),
    ("depth_aggregate_qkv_norm", _qkv_op, qkv_kw),
]


@pytest.mark.parametrize("op, call, make", _FLAT_OPS, ids=[o[0] for o in _FLAT_OPS])
def test_custom_op_and_its_fake_refuse_the_same(op, call, make):
    """A rank-4 S straight to the custom op: the op and its fake raise the same error
    (before: the op returned a 4-D result while the fake declared 3-D, so torch.compile
    would have planned the wrong shape)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    kw = make()
    kw["S"] = _r(3, 2, 5, D_)
    kw["A"] = _r(2, 5, kw["A"].shape[-2], 3)
    with pytest.raises(ValueError, match=r"S must have shape \(l, N, d\)") as real:
        call(**kw)
    with FakeTensorMode() as mode:
        fake_kw = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        with pytest.raises(ValueError, match=r"S must have shape \(l, N, d\)") as fake:
            call(**fake_kw)
    assert str(real.value) == str(fake.value)


@pytest.mark.parametrize("op, call, make", _FLAT_OPS, ids=[o[0] for o in _FLAT_OPS])
@pytest.mark.parametrize("static", [False, True])
def test_custom_op_result_matches_its_fake(op, call, make, static):
    from torch._subclasses.fake_tensor import FakeTensorMode

    kw = make()
    if static:
        kw["A"] = kw["A"][0]
    real = call(**kw)
    with FakeTensorMode() as mode:
        fake = call(**{k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
    real, fake = (real, fake) if isinstance(real, tuple) else ((real,), (fake,))
    assert [tuple(t.shape) for t in real] == [tuple(t.shape) for t in fake]
    assert [t.dtype for t in real] == [t.dtype for t in fake]

