"""Hyper-Connections modules: SHC / DHC (arXiv 2409.19606) and mHC (arXiv 2512.24880).

The residual stream becomes n streams, H: (*tok, n, d) (streams next to features, the
layout the kernels read in one pass). A block's sublayer (attention, FFN) is wrapped:

    H = expand_streams(x, n)                    # entry: the embedding repeated n times
    for layer in layers:                        # each sublayer has its own connection
        H = layer.hc(H, layer.branch)           # or, in two steps:
        # x, post = layer.hc.pre(H); H = post(layer.branch(x))
    x = reduce_streams(H)                       # exit: the sum of the streams, then the final norm

`hc.pre(H)` returns the sublayer input x (*tok, d) and `post`, a callable that takes the
sublayer output y (*tok, d) and returns the new streams H' (*tok, n, d):

    x = Σ_i alpha[i,0]·H_i,        H'_k = beta_k·y + Σ_i alpha[i,1+k]·H_i.

Chains of sublayers: `post.defer(y)` (or `hc(H, branch, defer_post=True)`) returns
PendingStreams instead of H', and the next connection's `pre` takes it in place of H.
An HC connection (SHC or DHC) then runs the pending post fused with its own pre in one
kernel each way (crosslayer.ops.hc_boundary): H' is written once and never read back,
and its gradient is summed in registers, per sublayer 2n·d + 2d elements forward and
3n·d + 3d backward instead of 3n·d + 2d and 6n·d + 3d. Every other consumer (mHC,
reduce_streams, PendingStreams.resolve) computes H' = post(y) first; the values are
the same either way.

    H = expand_streams(x, n)
    for layer in layers:
        H = layer.hc(H, layer.branch, defer_post=True)   # PendingStreams after the first
    x = reduce_streams(H)

HyperConnections computes alpha, beta with `crosslayer.ops.hc_pre` (static or dynamic),
ManifoldHyperConnections with `crosslayer.ops.mhc_coeffs` (one rms over vec(H), sigmoid gates and a
Sinkhorn-projected mixing matrix); both mix with `crosslayer.ops.stream_mix` /
`hc_post`. The ops run fused kernels for CUDA tensors when the extension is built and
the oracle (crosslayer.ref) otherwise, so the modules run anywhere.

Static connection parameters (HC: A, B and the dynamic scales; mHC: b and the scales)
should get no weight decay (HC §4: decaying them destabilises DHC): `param_groups`
builds the two optimizer groups.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from crosslayer import ops, ref
from crosslayer._checks import check_real
from crosslayer.contracts import MAX_STREAMS, check_norm_eps, check_sinkhorn_eps, check_streams, validate_hc_post

__all__ = ["HyperConnections", "ManifoldHyperConnections", "PendingStreams", "StreamPost", "expand_streams",
           "reduce_streams", "static_connection_parameters", "param_groups"]


class PendingStreams:
    """The streams H' = post(y) of a connection, not computed yet: connection i's
    H (*tok, n, d), its coefficients alpha, beta and sublayer i's output y (*tok, d).
    The next connection's `pre` takes it in place of H (an SHC or DHC pre fuses the
    post with itself); `resolve()` computes H'. Every call computes it anew: nothing is
    cached on the object, so activation checkpointing recomputes exactly what the
    forward ran."""

    __slots__ = ("H", "y", "alpha", "beta")

    def __init__(self, H: Tensor, y: Tensor, alpha: Tensor, beta: Tensor):
        self.H, self.y, self.alpha, self.beta = H, y, alpha, beta

    @property
    def shape(self) -> torch.Size:
        """The shape of H', (*tok, n, d)."""
        return self.H.shape

    def resolve(self) -> Tensor:
        """H' (*tok, n, d) = hc_post(H, y, alpha, beta)."""
        return ops.hc_post(self.H, self.y, self.alpha, self.beta)


Streams = Union[Tensor, PendingStreams]


def resolve_streams(H: Streams) -> Tensor:
    """H itself, or the streams a PendingStreams stands for."""
    return H.resolve() if isinstance(H, PendingStreams) else H


class StreamPost:
    """A connection's post: post(y) -> H' (*tok, n, d) = hc_post(H, y, alpha, beta);
    post.defer(y) -> PendingStreams for the next connection's pre to consume."""

    __slots__ = ("H", "alpha", "beta")

    def __init__(self, H: Tensor, alpha: Tensor, beta: Tensor):
        self.H, self.alpha, self.beta = H, alpha, beta

    def __call__(self, y: Tensor) -> Tensor:
        return ops.hc_post(self.H, y, self.alpha, self.beta)

    def defer(self, y: Tensor) -> PendingStreams:
        validate_hc_post(self.H, y, self.alpha, self.beta)  # errors here, not at the next pre
        return PendingStreams(self.H, y, self.alpha, self.beta)


def expand_streams(x: Tensor, n: int) -> Tensor:
    """Entry: x (*tok, d) repeated into n streams, (*tok, n, d), contiguous. n: an int
    in 1..16 (TypeError for a float such as 2.0)."""
    return ref.expand_streams(x, n)


def reduce_streams(H: Streams) -> Tensor:
    """Exit: the sum of the streams, (*tok, n, d) -> (*tok, d) in H's dtype (one fused
    pass on CUDA: stream_mix with unit weights). H may be PendingStreams."""
    H = resolve_streams(H)
    check_streams("H", H)
    return ops.stream_mix(H, H.new_ones(H.shape[-2], dtype=torch.float32))


def _check_int(name: str, v, lo: int, hi: Optional[int] = None) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise ValueError(f"{name} must be an int {rng}, got {v!r}")


class _StreamConnection(nn.Module):
    """What HC and mHC share: the two call forms over `pre`, and the stream check."""

    # Names of the parameters that get no weight decay (see `param_groups`).
    static_parameter_names: Tuple[str, ...] = ()

    def __init__(self, d: int, n: int, branch: Optional[nn.Module]):
        super().__init__()
        _check_int("d", d, 1)
        _check_int("n", n, 1, MAX_STREAMS)
        self.d, self.n = d, n
        self.branch = branch

    def _check_H(self, H: Streams) -> None:
        if not isinstance(H, (Tensor, PendingStreams)) or len(H.shape) < 2 or tuple(H.shape[-2:]) != (self.n, self.d):
            got = tuple(H.shape) if isinstance(H, (Tensor, PendingStreams)) else type(H).__name__
            raise ValueError(f"{type(self).__name__}: H must have shape (..., n, d) = "
                             f"(..., {self.n}, {self.d}), got {got}")

    def pre(self, H: Streams) -> Tuple[Tensor, StreamPost]:
        raise NotImplementedError

    def forward(self, H: Streams, branch: Optional[Callable[[Tensor], Tensor]] = None,
                *args, defer_post: bool = False, **kwargs) -> Streams:
        """H' = post(branch(x, *args, **kwargs)) with x, post = pre(H); `branch`
        defaults to the module given at construction. H may be PendingStreams; with
        `defer_post`, returns post.defer(y) (PendingStreams) for the next connection."""
        fn = branch if branch is not None else self.branch
        if fn is None:
            raise ValueError(f"{type(self).__name__}: no branch: pass one to forward "
                             f"(hc(H, branch)) or at construction, or use hc.pre(H)")
        x, post = self.pre(H)
        y = fn(x, *args, **kwargs)
        return post.defer(y) if defer_post else post(y)


class HyperConnections(_StreamConnection):
    """Static (SHC) or dynamic (DHC) hyper-connection around one sublayer.

    d:            model width
    n:            streams (expansion rate), 1..16
    layer_index:  index of this sublayer in the network (attention and FFN count
                  separately); the init reads stream layer_index mod n
    dynamic:      DHC (per-token coefficients from a tanh projection) or SHC
    branch:       optional sublayer for the `hc(H)` call form
    eps:          epsilon of the per-stream rms in DHC

    Parameters (float32 unless dtype is given), the paper's init (HC §2.3: exactly a
    pre-norm residual at init):
        A (n, n+1): A[:,0] one-hot at layer_index mod n, A[:,1:] = I
        B (n,):     ones
        DHC only: W (d, n+2) = 0 (columns: n+1 alpha logits, 1 beta logit; the
                  per-stream norm's weight is folded into W), s_a = s_b = 0.01 (0-dim)
    """

    static_parameter_names = ("A", "B", "s_a", "s_b")

    def __init__(self, d: int, n: int = 4, layer_index: int = 0, dynamic: bool = True,
                 branch: Optional[nn.Module] = None, eps: float = 1e-6, *,
                 device=None, dtype: Optional[torch.dtype] = None):
        super().__init__(d, n, branch)
        _check_int("layer_index", layer_index, 0)
        check_norm_eps("HyperConnections", eps)
        self.layer_index, self.dynamic, self.eps = layer_index, bool(dynamic), eps
        kw = dict(device=device, dtype=dtype or torch.float32)
        self.A = nn.Parameter(torch.empty(n, n + 1, **kw))
        self.B = nn.Parameter(torch.empty(n, **kw))
        if self.dynamic:
            self.W = nn.Parameter(torch.empty(d, n + 2, **kw))
            self.s_a = nn.Parameter(torch.empty((), **kw))
            self.s_b = nn.Parameter(torch.empty((), **kw))
        else:
            self.register_parameter("W", None)
            self.register_parameter("s_a", None)
            self.register_parameter("s_b", None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        A, B = ref.hc_init_static(self.n, self.layer_index)
        self.A.copy_(A)
        self.B.copy_(B)
        if self.dynamic:
            self.W.zero_()
            self.s_a.fill_(0.01)
            self.s_b.fill_(0.01)

    def extra_repr(self) -> str:
        return (f"d={self.d}, n={self.n}, layer_index={self.layer_index}, "
                f"{'DHC' if self.dynamic else 'SHC'}")

    def coefficients(self, H: Streams) -> Tuple[Tensor, Tensor, Tensor]:
        """(x, alpha, beta) of `crosslayer.ops.hc_pre`: x (*tok, d); alpha (*tok, n, n+1)
        and beta (*tok, n) for DHC, (n, n+1) and (n,) for SHC."""
        self._check_H(H)
        return ops.hc_pre(resolve_streams(H), self.A, self.B, self.W, self.s_a, self.s_b, self.eps)

    def pre(self, H: Streams) -> Tuple[Tensor, StreamPost]:
        """x (*tok, d), the sublayer input, and post: y (*tok, d) -> H' (*tok, n, d).
        H's gradient through pre and post accumulates in one tensor (ops.hc_pre_for_post).
        H may be PendingStreams: the pending post runs fused with this pre
        (ops.hc_boundary)."""
        self._check_H(H)
        if isinstance(H, PendingStreams):
            H_next, x, alpha, beta = ops.hc_boundary(H.H, H.y, H.alpha, H.beta, self.A, self.B, self.W,
                                                     self.s_a, self.s_b, self.eps)
            return x, StreamPost(H_next, alpha, beta)
        x, alpha, beta, H_post = ops.hc_pre_for_post(resolve_streams(H), self.A, self.B, self.W, self.s_a,
                                                     self.s_b, self.eps)
        return x, StreamPost(H_post, alpha, beta)


class ManifoldHyperConnections(_StreamConnection):
    """Manifold-constrained hyper-connection (mHC, DeepSeek's convention) around one sublayer.

    One rms over vec(H) (n·d), z = rms·(vec(H)·phi), then per token
    pre = sigmoid(a_pre·z_pre + b_pre) + pre_eps, post = post_mult·sigmoid(a_post·z_post +
    b_post), comb = Sinkhorn(a_res·z_res + b_res) (n×n, `iters` iterations), used as
    alpha = [pre | comb], beta = post (crosslayer.ref.mhc).

    d, n, branch:  as in HyperConnections (n in 1..16)
    iters:         Sinkhorn iterations (20 in the paper and DeepSeek-V4)
    pre_eps:       added to the pre gates
    post_mult:     scale of the post gates (2: post in (0, 2))
    eps:           epsilon of the rms over vec(H); sinkhorn_eps: of the Sinkhorn steps

    Parameters (float32 unless dtype is given): phi (n·d, n²+2n) = 0 (the rms weight
    folded in); a_pre = a_post = a_res = 0.01 (0-dim; mHC §4.1); b (n²+2n,). The paper
    leaves b's init open; we pick the one that makes mHC a pre-norm residual at init:
    b_pre = logit(1/n) (x = the mean of the streams, which are all equal after
    expand_streams), b_post = logit(1/post_mult) (post = 1), and b_res with log(9(n−1))
    on the diagonal and 0 elsewhere, so comb starts at 0.9 on the diagonal (doubly
    stochastic already; streams keep their identity, as HC's A_r = I). With equal
    streams every doubly stochastic comb leaves them equal, so the function at init is
    exactly x = h, H'_k = h + y, up to pre_eps.
    """

    static_parameter_names = ("a_pre", "a_post", "a_res", "b")

    def __init__(self, d: int, n: int = 4, branch: Optional[nn.Module] = None, iters: int = 20,
                 pre_eps: float = 1e-6, post_mult: float = 2.0, eps: float = 1e-6,
                 sinkhorn_eps: float = 1e-6, *, device=None, dtype: Optional[torch.dtype] = None):
        super().__init__(d, n, branch)
        _check_int("iters", iters, 1)
        who = "ManifoldHyperConnections"
        check_real(who, "post_mult", post_mult, gt=1,
                   why="post = post_mult·sigmoid(·) must be able to reach 1, the identity start")
        check_real(who, "pre_eps", pre_eps, ge=0, why="pre = sigmoid(·) + pre_eps is a positive gate")
        check_norm_eps(who, eps)
        check_sinkhorn_eps(who, sinkhorn_eps)
        self.iters, self.pre_eps, self.post_mult = iters, pre_eps, float(post_mult)
        self.eps, self.sinkhorn_eps = eps, sinkhorn_eps
        kw = dict(device=device, dtype=dtype or torch.float32)
        m = n * n + 2 * n
        self.phi = nn.Parameter(torch.empty(n * d, m, **kw))
        self.a_pre = nn.Parameter(torch.empty((), **kw))
        self.a_post = nn.Parameter(torch.empty((), **kw))
        self.a_res = nn.Parameter(torch.empty((), **kw))
        self.b = nn.Parameter(torch.empty(m, **kw))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        n = self.n
        self.phi.zero_()
        for a in (self.a_pre, self.a_post, self.a_res):
            a.fill_(0.01)
        # n = 1: pre must be ~1; sigmoid(16) = 1 - 1.1e-7.
        b_pre = -math.log(n - 1) if n > 1 else 16.0
        b_post = -math.log(self.post_mult - 1.0)  # logit(1 / post_mult)
        b_res = torch.zeros(n, n)
        if n > 1:
            b_res.fill_diagonal_(math.log(9.0 * (n - 1)))
        self.b.copy_(torch.cat([torch.full((n,), b_pre), torch.full((n,), b_post), b_res.flatten()]))

    def extra_repr(self) -> str:
        return f"d={self.d}, n={self.n}, iters={self.iters}, post_mult={self.post_mult}"

    def coefficients(self, H: Streams) -> Tuple[Tensor, Tensor]:
        """alpha (*tok, n, n+1) = [pre | comb] and beta (*tok, n) = post, fp32 (fp64 for fp64)."""
        self._check_H(H)
        return ops.mhc_coeffs(resolve_streams(H), self.phi, self.a_pre, self.a_post, self.a_res, self.b, self.eps,
                              self.pre_eps, self.post_mult, self.iters, self.sinkhorn_eps)

    def pre(self, H: Streams) -> Tuple[Tensor, StreamPost]:
        """x (*tok, d), the sublayer input, and post: y (*tok, d) -> H' (*tok, n, d). H's
        gradient through pre and post accumulates in one tensor (ops.mhc_pre_for_post).
        H may be PendingStreams: the pending post runs fused with this pre
        (ops.mhc_boundary)."""
        self._check_H(H)
        args = (self.phi, self.a_pre, self.a_post, self.a_res, self.b, self.eps, self.pre_eps, self.post_mult,
                self.iters, self.sinkhorn_eps)
        if isinstance(H, PendingStreams):
            H_next, x, alpha, beta = ops.mhc_boundary(H.H, H.y, H.alpha, H.beta, *args)
            return x, StreamPost(H_next, alpha, beta)
        x, alpha, beta, H_post = ops.mhc_pre_for_post(H, *args)
        return x, StreamPost(H_post, alpha, beta)


def _check_module(who: str, model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: model must be a torch.nn.Module (the static connection parameters "
                        f"are found by module), got {type(model).__name__}; wrap a list of modules in "
                        f"nn.ModuleList")


def static_connection_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The static connection parameters of every crosslayer connection module in `model`
    (HC: A, B, s_a, s_b; mHC: a_*, b; MUDD: bias; DWA: alpha), each once. model: an
    nn.Module (TypeError otherwise)."""
    _check_module("static_connection_parameters", model)
    seen = set()
    for module in model.modules():
        for name in getattr(module, "static_parameter_names", ()):
            p = getattr(module, name, None)
            if isinstance(p, nn.Parameter) and id(p) not in seen:
                seen.add(id(p))
                yield p


def param_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    """Two optimizer groups: every trainable parameter of `model` with `weight_decay`,
    except the static connection parameters (`static_connection_parameters`), which get
    none. Use: torch.optim.AdamW(param_groups(model, 0.1), lr=...).

    model: an nn.Module (the connection modules are found among its submodules: a list
    of parameters or modules is refused, wrap it in nn.ModuleList); weight_decay: a
    finite float >= 0."""
    _check_module("param_groups", model)
    check_real("param_groups", "weight_decay", weight_decay, ge=0)
    static = {id(p) for p in static_connection_parameters(model)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if id(p) in static else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
