"""CrossLayerLM: a small Llama-style decoder with a switchable cross-layer connection.

Trunk: token embedding -> L blocks -> final RMSNorm -> LM head. A block is pre-norm
attention (RoPE, causal SDPA, no biases) then a pre-norm SwiGLU FFN. `connection`
decides how blocks are wired:

    residual  h = h + attn(norm(h));  h = h + ffn(norm(h))
    shc, dhc  n streams H (*tok, n, d); every sublayer (attention and FFN separately, so
              layer_index = 2i and 2i+1) wrapped in a HyperConnections:
              H = hc(H, sublayer, defer_post=True) (each post runs in the next
              connection's pre: SHC and DHC fuse the two, ops.hc_boundary); entry
              expand_streams(emb), exit reduce_streams
    mhc       the same with ManifoldHyperConnections (Sinkhorn-projected mixing; the
              boundaries fused by ops.mhc_boundary)
    dwa       DenseFormer: block i's output pushed into a DepthStack, the next block's
              input = DenseFormerDWA_i(stack) (dilation, period)
    mudd      MUDDFormer: after block i a MUDDConnection makes the next block's inputs
              from the stack. Ways 'qkvr': q, k, v go through the next block's three
              pre-attention RMSNorms in the same fused pass (DepthStack.aggregate_qkv_norm)
              into separate q/k/v projections, r is the residual: h = r + attn;
              out = h + ffn(norm(h)). Ways 'r': one dynamic dense way per block. The last
              connection has one way (r) with a 4x wider weight MLP; its output goes to
              the final norm.

Every connection runs crosslayer's fused ops for CUDA tensors (when the extension is
built) and the oracle on CPU; at init every scheme is exactly a pre-norm residual
network (up to mHC's pre_eps), so schemes differ only through what they learn.

Init: embeddings and linear weights N(0, init_std²); the output projections (attention
out, FFN down) N(0, init_std²/(2L)) (GPT-2); norms 1; connections their own identity
starts. The same for every scheme, so a comparison isolates the connection.

Activation checkpointing (`activation_checkpointing=True`) recomputes each sublayer
(HC: the connection and its sublayer together) in the backward pass; the DepthStack's
pushes and aggregations stay outside checkpoints (a recomputed push would rewrite a
slot), as in MUDDFormer, which checkpoints only the block.

Scale-out (tests/test_compile.py, tests/test_distributed.py; CPU, oracle ops):
  torch.compile(model, fullgraph=True)  every scheme, dwa/mudd included: no graph break
                    (the DepthStack traces: nn/depth_stack.py), same loss and gradients
                    as eager; under inductor the stack keeps one buffer and one gradient
                    buffer. With activation checkpointing too.
  compile_blocks()  regional compilation: each block's attention and FFN branches
                    compiled (fullgraph), connections and DepthStack eager (fused kernels
                    already); one graph per sublayer kind for all blocks, so compile time
                    does not grow with depth. With activation checkpointing too.
  DDP               wrap the model as is (2 gloo processes == one process on the whole
                    batch, every scheme).
  FSDP2             model.fully_shard(**fsdp_kwargs), not fully_shard per Block: the HC
                    and MUDD connections use a block's parameters outside Block.__call__,
                    and fully_shard refuses 0-dim parameters (HC s_a/s_b, mHC a_*); see
                    fully_shard. Matches one process, full state_dict included.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from crosslayer import nn as cnn
from crosslayer.contracts import MAX_SLOTS, MAX_STREAMS
from crosslayer.models._validation import Bound, OneOf, at_least, check_fields, check_idx, check_token_ids, \
    config_error, positive

__all__ = ["CONNECTIONS", "LMConfig", "CrossLayerLM"]

CONNECTIONS = ("residual", "shc", "dhc", "mhc", "dwa", "mudd")


@dataclass
class LMConfig:
    """Sizes and the connection scheme of a CrossLayerLM.

    ffn_hidden: SwiGLU width; None = 8/3·d_model rounded up to a multiple of 64.
    hc_streams: n for shc/dhc/mhc. mhc_iters: Sinkhorn iterations.
    mudd_ways: 'qkvr' (MUDDFormer) or 'r'. mudd_round64: MUDDFormer's hidden rounding.
    dwa_dilation, dwa_period: DenseFormer's sparsity options.

    Checked at construction (and again by CrossLayerLM): each field's type (an int field
    takes an int, not a bool, float or str; a float field a finite int or float; a bool
    field True / False) is a TypeError, a value out of range (sizes >= 1, norm_eps and
    init_std >= 0, rope_theta > 0, hc_streams <= 16, connection / mudd_ways one of
    theirs, d_model = n_heads · an even head size, n_layers <= 127 for dwa / mudd) a
    ValueError, both naming LMConfig.<field> and its value (models/_validation.py).
    """

    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    ffn_hidden: Optional[int] = None
    max_seq_len: int = 512
    connection: str = "residual"
    hc_streams: int = 4
    mhc_iters: int = 20
    mudd_ways: str = "qkvr"
    mudd_round64: bool = True
    dwa_dilation: int = 1
    dwa_period: int = 1
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    init_std: float = 0.02
    activation_checkpointing: bool = False

    def __post_init__(self):
        self.validate()
        if self.ffn_hidden is None:
            self.ffn_hidden = 64 * math.ceil(8 * self.d_model / 3 / 64)

    def validate(self) -> None:
        """Types and ranges of every field, and the derived sizes (models/_validation.py:
        TypeError for a wrong type, ValueError for a bad value, naming the field)."""
        check_fields(self, _LM_RULES)
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise config_error(self, "d_model", f"n_heads ({self.n_heads}) times an even head size "
                                                f"(RoPE rotates pairs)")
        if self.connection in ("dwa", "mudd") and self.n_layers + 1 > MAX_SLOTS:
            raise config_error(self, "n_layers", f"an int <= {MAX_SLOTS - 1} with connection "
                                                 f"{self.connection!r} (its depth stack holds n_layers + 1 "
                                                 f"<= {MAX_SLOTS} slots)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# LMConfig's range rules (its field types come from the annotations; bools and
# activation_checkpointing have no rule beyond their type).
_LM_RULES = dict(
    vocab_size=at_least(1), d_model=at_least(1), n_layers=at_least(1), n_heads=at_least(1),
    ffn_hidden=at_least(1, "the SwiGLU width"), max_seq_len=at_least(1),
    connection=OneOf(CONNECTIONS), hc_streams=Bound(1, MAX_STREAMS, why="the HC ops' stream limit"),
    mhc_iters=at_least(1, "Sinkhorn iterations"), mudd_ways=OneOf(("qkvr", "r")),
    dwa_dilation=at_least(1), dwa_period=at_least(1), norm_eps=at_least(0), rope_theta=positive(),
    init_std=at_least(0),
)


class RoPE(nn.Module):
    """Rotary position embedding on (B, heads, T, head_dim), rotating (first half,
    second half) pairs (the Llama/NeoX convention)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        ang = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        T, half = x.shape[-2], x.shape[-1] // 2
        cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    """Causal multi-head attention with separate q/k/v inputs (MUDD feeds three ways)."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)
        self.rope = RoPE(d // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)

    def forward(self, xq: Tensor, xk: Tensor, xv: Tensor) -> Tensor:
        B, T, d = xq.shape
        heads = lambda t: t.view(B, T, self.n_heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = heads(self.wq(xq)), heads(self.wk(xk)), heads(self.wv(xv))
        y = F.scaled_dot_product_attention(self.rope(q), self.rope(k), v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, d))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) · w3 x)."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """One decoder block. `multiway`: its attention takes MUDD's q, k, v, r ways, and
    `qkv_norm` (3, d) holds the three pre-attention RMSNorm weights (applied by the
    connection's fused pass); otherwise `attn_norm` normalises the one input."""

    def __init__(self, cfg: LMConfig, multiway: bool):
        super().__init__()
        self.eps = cfg.norm_eps
        self.multiway = multiway
        if multiway:
            self.qkv_norm = nn.Parameter(torch.ones(3, cfg.d_model))
        else:
            self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = FeedForward(cfg)

    def attn_branch(self, x: Tensor) -> Tensor:
        h = self.attn_norm(x)
        return self.attn(h, h, h)

    def ffn_branch(self, x: Tensor) -> Tensor:
        return self.ffn(self.ffn_norm(x))

    def forward(self, x: Tensor) -> Tensor:
        """Residual block on one input (*tok, d)."""
        h = x + self.attn_branch(x)
        return h + self.ffn_branch(h)

    def forward_ways(self, q: Tensor, k: Tensor, v: Tensor, r: Tensor) -> Tensor:
        """MUDD block: q, k, v already RMS-normed (weights qkv_norm), r raw."""
        h = r + self.attn(q, k, v)
        return h + self.ffn_branch(h)

    def compile_sublayers(self, **compile_kwargs) -> None:
        """torch.compile this block's sublayers in place (CrossLayerLM.compile_blocks):
        the attention branch (attn_norm + attention; attention alone for a multiway
        block, whose norms run inside the connection's fused pass) and the FFN branch
        (ffn_norm + SwiGLU). The compiled callables shadow the methods on this instance,
        so every caller (forward, forward_ways, an HC connection given blk.attn_branch)
        runs them; parameters and the state_dict are unchanged."""
        if self.multiway:
            self.attn.compile(**compile_kwargs)
        else:
            self.attn_branch = torch.compile(self.attn_branch, **compile_kwargs)
        self.ffn_branch = torch.compile(self.ffn_branch, **compile_kwargs)


class _ScalarGradSync:
    """Averages the gradients of `params` (replicated, outside FSDP) over `mesh` (every
    dim; None = the default process group) once per backward pass: the first gradient
    accumulated into one of them queues an autograd-engine callback, which runs after
    the pass and does one all-reduce of all of them (ranks without a gradient for one
    contribute zero)."""

    def __init__(self, params, mesh=None):
        import torch.distributed as dist
        self.dist, self.params = dist, list(params)
        self.groups = [None] if mesh is None else [mesh.get_group(i) for i in range(mesh.ndim)]
        self.queued = False
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._on_grad)

    def _on_grad(self, _param) -> None:
        if not self.queued:
            self.queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._sync)

    def _sync(self) -> None:
        self.queued = False
        flat = torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params])
        for group in self.groups:  # gloo has no AVG: sum, then divide
            self.dist.all_reduce(flat, group=group)
            flat /= self.dist.get_world_size(group)
        for p, g in zip(self.params, flat.unbind(0)):
            if p.grad is not None:
                p.grad.copy_(g)


class CrossLayerLM(nn.Module):
    """Decoder LM over byte/token ids: forward(idx (B, T) int64) -> logits (B, T, vocab)."""

    # Check that token ids lie in [0, vocab_size) (a host read of idx's min / max: one
    # synchronisation per forward on CUDA); False skips it (e.g. for CUDA-graph capture).
    validate_token_ids: bool = True

    def __init__(self, cfg: LMConfig):
        super().__init__()
        if not isinstance(cfg, LMConfig):
            raise TypeError(f"CrossLayerLM takes an LMConfig, got {type(cfg).__name__}")
        cfg.validate()  # again: fields may have been changed since construction
        self.cfg = cfg
        L, d, kind = cfg.n_layers, cfg.d_model, cfg.connection
        self.embed = nn.Embedding(cfg.vocab_size, d)
        multiway = kind == "mudd" and cfg.mudd_ways == "qkvr"
        self.blocks = nn.ModuleList(Block(cfg, multiway and i > 0) for i in range(L))
        self.norm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        self._init_trunk()
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

        if kind in ("shc", "dhc"):
            self.connections = nn.ModuleList(
                cnn.HyperConnections(d, cfg.hc_streams, layer_index=j, dynamic=kind == "dhc",
                                     eps=cfg.norm_eps) for j in range(2 * L))
        elif kind == "mhc":
            self.connections = nn.ModuleList(
                cnn.ManifoldHyperConnections(d, cfg.hc_streams, iters=cfg.mhc_iters)
                for _ in range(2 * L))
        elif kind == "dwa":
            self.connections = nn.ModuleList(
                cnn.DenseFormerDWA(i, cfg.dwa_dilation, cfg.dwa_period) for i in range(L))
        elif kind == "mudd":
            self.connections = nn.ModuleList(
                cnn.MUDDConnection(d, i, L, ways=cfg.mudd_ways, round64=cfg.mudd_round64,
                                   eps=cfg.norm_eps) for i in range(L))
        else:
            self.connections = nn.ModuleList()

    @torch.no_grad()
    def _init_trunk(self) -> None:
        std, L = self.cfg.init_std, self.cfg.n_layers
        nn.init.normal_(self.embed.weight, std=std)
        nn.init.normal_(self.head.weight, std=std)
        for blk in self.blocks:
            for lin in (blk.attn.wq, blk.attn.wk, blk.attn.wv, blk.ffn.w1, blk.ffn.w3):
                nn.init.normal_(lin.weight, std=std)
            for lin in (blk.attn.wo, blk.ffn.w2):
                nn.init.normal_(lin.weight, std=std / math.sqrt(2 * L))

    def compile_blocks(self, **compile_kwargs) -> "CrossLayerLM":
        """Regional compilation: torch.compile every block's sublayers (attention and FFN
        branches, with their norms) with fullgraph=True unless compile_kwargs says
        otherwise; embedding, connections, DepthStack, final norm and head stay eager
        (the connections are fused kernels already). Every connection scheme. Blocks of
        one model share one compiled graph per sublayer kind, so compile time does not
        grow with depth (a whole-model torch.compile also works, fullgraph, but traces
        every layer). Returns self."""
        compile_kwargs.setdefault("fullgraph", True)
        for blk in self.blocks:
            blk.compile_sublayers(**compile_kwargs)
        return self

    def fully_shard(self, **fsdp_kwargs) -> "CrossLayerLM":
        """FSDP2 (torch.distributed.fsdp.fully_shard) over the units this model needs.
        Call it after init_process_group and before building the optimizer; every
        fsdp_kwarg (mesh, reshard_after_forward, mp_policy, ...) goes to each
        fully_shard call. Returns self (now also an FSDPModule).

        Units: each block's attention and FFN modules, then the root (embedding, head,
        norms, connections, MUDD's qkv_norm). Not the Block: HC connections call a
        block's branches, and a MUDD connection reads the next block's qkv_norm, without
        going through Block.__call__, where FSDP2 would gather the unit's parameters (they
        would meet still-sharded DTensors: "aten.mul.Tensor got mixed torch.Tensor and
        DTensor").

        0-dim parameters (HC: s_a, s_b; mHC: a_pre, a_post, a_res): fully_shard refuses
        them ("fully_shard doesn't support scalar parameters"), so the root ignores them
        (ignored_params: replicated, unsharded, not reduced by FSDP) and their gradients
        are averaged over the mesh in one all-reduce at the end of each backward pass,
        as DDP would (_ScalarGradSync).
        """
        from torch.distributed.fsdp import fully_shard  # public since torch 2.6, our minimum
        scalars = [p for p in self.parameters() if p.dim() == 0]
        for blk in self.blocks:
            fully_shard(blk.attn, **fsdp_kwargs)
            fully_shard(blk.ffn, **fsdp_kwargs)
        fully_shard(self, ignored_params=set(scalars), **fsdp_kwargs)
        if scalars:
            self._scalar_grad_sync = _ScalarGradSync(scalars, fsdp_kwargs.get("mesh"))
        return self

    def param_groups(self, weight_decay: float) -> list:
        """Optimizer groups: static connection parameters without weight decay
        (crosslayer.nn.param_groups)."""
        return cnn.param_groups(self, weight_decay)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _deferred(self, j: int):
        """Connection j called with its post deferred to the next connection."""
        return functools.partial(self.connections[j], defer_post=True)

    def _call(self, fn, *args):
        if self.cfg.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, idx: Tensor) -> Tensor:
        """idx (batch, seq) int64 / int32 token ids in [0, vocab_size), batch and seq >= 1,
        seq <= max_seq_len -> logits (batch, seq, vocab_size). An id outside the vocabulary
        is a ValueError naming it: the check reads idx's min and max, one device
        synchronisation per call on CUDA; `validate_token_ids = False` skips it
        (models/_validation.py)."""
        check_idx("CrossLayerLM", idx)
        if idx.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {idx.shape[1]} > max_seq_len {self.cfg.max_seq_len}")
        if self.validate_token_ids:
            check_token_ids("CrossLayerLM", idx, self.cfg.vocab_size)
        x = self.embed(idx)
        kind = self.cfg.connection
        if kind == "residual":
            h = x
            for blk in self.blocks:
                h = self._call(blk, h)
        elif kind in ("shc", "dhc", "mhc"):
            # Each connection's post is deferred to the next one's pre (PendingStreams):
            # they run fused at every sublayer boundary (ops.hc_boundary for SHC and DHC,
            # ops.mhc_boundary for mHC).
            H = cnn.expand_streams(x, self.cfg.hc_streams)
            for i, blk in enumerate(self.blocks):
                H = self._call(self._deferred(2 * i), H, blk.attn_branch)
                H = self._call(self._deferred(2 * i + 1), H, blk.ffn_branch)
            h = cnn.reduce_streams(H)
        elif kind == "dwa":
            h = self._depth_dwa(x)
        else:
            h = self._depth_mudd(x)
        return self.head(self.norm(h))

    def _depth_dwa(self, x: Tensor) -> Tensor:
        stack = cnn.DepthStack.start(x, self.cfg.n_layers + 1)
        h = x
        for blk, dwa in zip(self.blocks, self.connections):
            stack.push(self._call(blk, h))
            h = dwa(stack)
        return h

    def _depth_mudd(self, x: Tensor) -> Tensor:
        L = self.cfg.n_layers
        stack = cnn.DepthStack.start(x, L + 1)
        ways = None
        for i, (blk, conn) in enumerate(zip(self.blocks, self.connections)):
            if ways is None:
                out = self._call(blk, x)
            elif blk.multiway:
                out = self._call(blk.forward_ways, *ways.unbind(0))
            else:
                out = self._call(blk, ways[0])
            stack.push(out)
            if i + 1 < L and self.blocks[i + 1].multiway:
                ways = conn(stack, norm_weights=self.blocks[i + 1].qkv_norm,
                            norm_eps=self.cfg.norm_eps)
            else:
                ways = conn(stack)
        return ways[0]
