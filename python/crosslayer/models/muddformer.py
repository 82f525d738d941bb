"""MUDDFormer (Caiyun-AI, arXiv 2502.12170) with the released PyTorch checkpoints'
state_dict, running its dense connections on crosslayer's ops.

Source: Caiyun-AI/MUDDFormer pytorch/muddformer/modeling_muddformer.py and
configuration_muddformer.py, read at the mirror ArthurWANGZHE/MUDDFormer @9aa4b78 /
@87967d3 (shared/notes/mudd.md section 1: Caiyun-AI @fc067b2). Written anew; the
module tree and parameter names follow the release so its checkpoints load with
`load_state_dict(strict=True)` (transformers is not needed: pass the tensors dict,
e.g. from `safetensors.torch.load_file` or `torch.load`).

State dict (L = n_layer, D = dim, V = vocab_size, H = n_head, hd = D / H, C = 4 ways,
l_i = i + 2 slots, K_i the DA hidden width, F_i the FFN width of layer i):
    tok_embeddings.weight (V, D)         norm.weight (D,)        output.weight (V, D)
    layers.i.attention.{wq,wk,wv,wo}.weight (D, D)
    layers.i.attention.{q_norm,k_norm}.weight (hd,)                 use_qk_norm only
    layers.i.attention_norm.weight (D,)                             i = 0, or not sepln
    layers.i.attention_norms.{0,1,2}.weight (D,)                    i > 0 with sepln
    layers.i.ffn_norm.weight (D,)
    layers.i.feed_forward.{w1,w3}.weight (F_i, D), .w2.weight (D, F_i)
        F_i = round(I·(i/(L-1) + 1/2) / 128)·128   (Python round; I = intermediate_size)
    dense_bs.i (C, l_i); last layer (1, l_{L-1})
    dynamic_dense.i.w1.weight (K_i, D), .w2.weight (C·l_i, K_i)     rows of w2 C-major
        K_i = C·l_i (×4 on the last layer with expand_last), then (K//64 + 1)·64 with round64

Forward (tokens (B, T); the release's MUDDFormer.forward and TransformerBlock.forward):
    S_0 = tok_embeddings(idx)
    block 0:  h = S_0 + attn(q=k=v=attention_norm(S_0));  S_1 = h + ffn(ffn_norm(h))
    after block i (output S_{i+1}):
        A_i = GELU(rmsnorm_noscale(S_{i+1}) @ w1ᵀ) @ w2ᵀ + dense_bs[i]     (B, T, C, l_i)
            -> crosslayer.ops.mudd_weights(S_{i+1}, w1.weight.T, w2.weight.T, dense_bs[i])
        Y_c = Σ_j A_i[.., c, j]·S_j                                        c = q, k, v, r
    block i+1: its attention_norms[0..2] on Y_q, Y_k, Y_v, the residual is Y_r
            -> DepthStack.aggregate_qkv_norm / ops.depth_aggregate_qkv_norm (one pass;
               the RMSNorm is the release's: Y·rsqrt(mean Y² + norm_eps)·g)
        h = Y_r + attn(q, k, v);  S_{i+2} = h + ffn(ffn_norm(h))
    last layer: one way, out = Y_r -> norm -> output (logits (B, T, V))
Attention: wq/wk/wv, optional per-head q_norm/k_norm, RoPE (the release's bf16-rounded
cos/sin table, 'half' pairing), causal softmax(q·kᵀ/√hd)·v, wo.

Differences from the release, all deliberate:
  - forward(idx) returns the logits tensor (no namedtuple) and, without input_pos, is
    the training forward: no caches needed or touched, gradients flow through
    everything, and the depth stack is one DepthStack buffer (O(L·N·D), no per-layer
    stacking). With input_pos (after setup_caches) it is the cached inference path:
    prefill (T > 1; positions 0..T-1 attend within the chunk, as in the release) and
    single-token decode over the KV cache and the preallocated (L+1, B, 1, D) layer
    cache, both under torch.no_grad. Beyond the release: a prefill chunk may continue
    the cache (positions start..start+T-1, start > 0: chunked prefill, attending
    causally over the cached positions and itself), and input_pos is validated
    (consecutive, inside [0, max_seq_length), continuing what the cache holds; a
    ValueError otherwise), as are the token ids (in [0, vocab_size)) and the config
    (models/_validation.py).
  - Caches are not in the state_dict, take any batch up to max_batch_size, and
    default to the parameters' dtype (the release: always bfloat16).
  - Attention is F.scaled_dot_product_attention (the release materialises q·kᵀ in the
    activation dtype, then softmaxes in float32).
  - In bf16/fp16 the DA runs in float32 (weights, aggregate and the q/k/v norms: one
    rounding at the end); the release rounds dw, the aggregate and the normed value to
    the activation dtype. Identical math in float32; float64 stays float64 where the
    release would drop to float32 (its `.float()` upcasts).
  - A fresh model starts the DA at the identity (w1 ~ N(0, 1/D), w2 = 0, dense_bs
    one-hot on the newest slot: a plain pre-norm residual stream); the release draws
    dense_bs from randn, fit only for loading checkpoints.
  - MUDDFormerConfig only (a MUDDPythiaConfig is a TypeError), and only the released
    configuration: dense, dynamic_dense, dense_type 'qkvr',
    n_local_heads == n_head. stack_hidden, use_layer_cache and is_training only pick an
    implementation in the release and change nothing here; tie_word_embeddings is
    ignored as in the release (its tie_weights is a no-op).

The machinery is the class MUDDDecoder, shared with crosslayer.models.MUDDPythia
(muddpythia.py), which swaps in its own block (LayerNorm, biases, GELU FFN, parallel
residual), RoPE table and load hints.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from crosslayer import ops
from crosslayer.contracts import MAX_SLOTS
from crosslayer.models._validation import Bound, OneOf, at_least, check_fields, check_idx, config_error, \
    host_ints, positive, raise_bad_token_ids, token_id_stats
from crosslayer.nn.depth_stack import DepthStack
from crosslayer.nn.mudd import mudd_hidden
from crosslayer.ref.mudd import mudd_init_weights

__all__ = ["MUDDFormerConfig", "MUDDFormer"]

# Keys transformers writes into a config.json that are no model settings.
_HF_METADATA = frozenset({"architectures", "auto_map", "model_type", "torch_dtype",
                          "transformers_version", "_name_or_path"})


def _find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


class _ConfigIO:
    """from_dict / from_json for the config dataclasses (shared with MUDDPythiaConfig)."""

    @classmethod
    def from_dict(cls, d: dict):
        """From a released config.json's dict; transformers' metadata keys are skipped,
        any other unknown key is an error."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names - _HF_METADATA)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(names)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, path):
        with open(path) as f:
            return cls.from_dict(json.load(f))


# MUDDFormerConfig's range rules (the types come from the annotations; head_dim is
# derived, the flags have no rule beyond bool; token ids only need to be ints).
_MUDD_RULES = dict(
    block_size=at_least(1, "the RoPE table's length"), vocab_size=at_least(1),
    n_layer=Bound(2, MAX_SLOTS - 1, why=f"the FFN width rule divides by n_layer - 1, and the depth "
                                        f"ops take n_layer + 1 <= {MAX_SLOTS} slots"),
    n_head=at_least(1), dim=at_least(1), intermediate_size=at_least(1),
    n_local_heads=OneOf((-1,), or_bound=at_least(1)), rope_base=positive(), norm_eps=at_least(0),
)


@dataclass
class MUDDFormerConfig(_ConfigIO):
    """The release's MUDDFormerConfig fields and defaults; `__post_init__` is its
    "post init" (n_local_heads -1 -> n_head; intermediate_size None -> 2/3 of 4·dim
    rounded up to 256; head_dim = dim // n_head, whatever was given). The released
    2.8B config.json overrides: use_qk_norm, expand_last, round64 True; head_dim 80;
    intermediate_size 6912.

    Checked at construction (`validate`, run again by the model): each field's type
    from its annotation (an int field takes an int: not a bool, float such as 64.0, str
    or None unless Optional; a float field a finite int or float; a bool field True /
    False) is a TypeError; a value out of range (sizes >= 1, 2 <= n_layer <= 127,
    rope_base > 0, norm_eps >= 0) or a derived size that does not work out (dim a
    multiple of n_head, an even number of rotated features per head, every layer's FFN
    width > 0) a ValueError; both name <Class>.<field> and its value
    (models/_validation.py)."""

    _rules = _MUDD_RULES  # no annotation: a class attribute, not a field

    block_size: int = 2048
    vocab_size: int = 50432
    n_layer: int = 32
    n_head: int = 32
    dim: int = 2560
    intermediate_size: Optional[int] = None
    n_local_heads: int = -1
    head_dim: int = 64
    rope_base: float = 10000
    norm_eps: float = 1e-6
    use_gradient_checkpointing: bool = False
    is_training: bool = False
    use_qk_norm: bool = False
    pad_token_id: Optional[int] = None
    bos_token_id: int = 1
    eos_token_id: int = 2
    tie_word_embeddings: bool = False
    use_layer_cache: bool = True
    stack_hidden: bool = False
    dense: bool = True
    dynamic_dense: bool = True
    sepln: bool = True
    dense_type: str = "qkvr"
    expand_last: bool = False
    round64: bool = False

    def __post_init__(self) -> None:
        check_fields(self, self._rules)
        if self.n_local_heads == -1:
            self.n_local_heads = self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = self.default_intermediate_size()
        self.head_dim = self.dim // self.n_head
        self._check_derived()

    def validate(self) -> None:
        """The construction checks again, on the current values (a field may have been
        changed since); the models call it."""
        check_fields(self, self._rules)
        self._check_derived()

    def default_intermediate_size(self) -> int:
        return _find_multiple(int(2 * (4 * self.dim) / 3), 256)

    def rotary_dims(self) -> int:
        """Rotated features per head: all of head_dim (MUDDPythiaConfig: a share)."""
        return self.head_dim

    def _check_derived(self) -> None:
        if self.dim % self.n_head:
            raise config_error(self, "dim", f"a multiple of n_head = {self.n_head} (head_dim = dim // n_head)")
        if self.head_dim != self.dim // self.n_head:
            raise config_error(self, "head_dim", f"dim // n_head = {self.dim // self.n_head} (head_dim is "
                                                 f"derived at construction; dim or n_head changed since)")
        self._check_rotary()
        if self.intermediate_size is None or self.n_local_heads == -1:
            name = "intermediate_size" if self.intermediate_size is None else "n_local_heads"
            raise config_error(self, name, "an int (construction resolves the default; it was reset since)")
        zero = [i for i in range(self.n_layer) if ffn_width(self, i) <= 0]
        if zero:
            raise config_error(self, "intermediate_size", (
                f"an int >= 129: layers {zero} would get a zero-width FFN (width F_i = "
                f"round(intermediate_size·(i/(n_layer-1) + 1/2) / 128)·128)"))

    def _check_rotary(self) -> None:
        r = self.rotary_dims()
        if r % 2:
            raise config_error(self, "dim", f"dim // n_head (head_dim = {self.head_dim}) even: RoPE "
                                            f"rotates pairs of features")


def _check_supported(cfg, name: str) -> None:
    """The configurations `name` (MUDDFormer / MUDDPythia) implements, on a config that
    passes its validate()."""
    cfg.validate()
    if not (cfg.dense and cfg.dynamic_dense and cfg.dense_type == "qkvr"):
        raise ValueError(
            f"crosslayer's {name} implements the released configuration dense=True, "
            f"dynamic_dense=True, dense_type='qkvr'; got dense={cfg.dense}, "
            f"dynamic_dense={cfg.dynamic_dense}, dense_type={cfg.dense_type!r}")
    if cfg.n_local_heads != cfg.n_head:
        raise ValueError(f"n_local_heads must equal n_head (the release's attention has no grouped "
                         f"heads), got n_local_heads={cfg.n_local_heads}, n_head={cfg.n_head}")


def _up(x: Tensor) -> Tensor:
    """The release's `.float()` upcast, keeping float64."""
    return x if x.dtype == torch.float64 else x.float()


def rope_table(n_pos: int, n_rot: int, base: float, round_to: torch.dtype = torch.bfloat16) -> Tensor:
    """(n_pos, n_rot/2, 2) [cos, sin] of pos·base^(-2i/n_rot), computed in float32 and
    rounded to `round_to` as the release's precompute_freqs_cis does (MUDDFormer:
    bfloat16, MUDDPythia: float16), kept in float32."""
    inv = 1.0 / (base ** (torch.arange(0, n_rot, 2)[: n_rot // 2].float() / n_rot))
    ang = torch.outer(torch.arange(n_pos), inv)
    rot = torch.polar(torch.ones_like(ang), ang)
    return torch.stack([rot.real, rot.imag], -1).to(round_to).float()


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """x (B, T, H, hd) rotated on its first r = 2·table.shape[-2] features by table
    (T, r/2, 2), the release's 'half' mode: pair i is (x_i, x_{i+r/2}); the output is
    written interleaved (pair i at 2i, 2i+1), as the release writes it (q and k get the
    same permutation, so q·k is unchanged). Features r.. pass unchanged (MUDDPythia's
    partial rotary, rotary_pct < 1: torch.cat((rotated, passed), -1) as the release)."""
    r = 2 * table.shape[-2]
    if r < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :r], table), x[..., r:]], -1)
    xs = _up(x).unflatten(-1, (2, -1)).transpose(-1, -2)  # (B, T, H, r/2, 2)
    cos, sin = table.to(xs.dtype)[:, None].unbind(-1)     # (T, 1, hd/2)
    x0, x1 = xs.unbind(-1)
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], -1).flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    """The release's RMSNorm: (x·rsqrt(mean x² + eps)) in float32 (float64 kept), cast
    back to x's dtype, then times weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = _up(x)
        return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    """The release's multiway Attention: separate wq / wk / wv (no fused wqkv), and wo;
    with biases in MUDDPythia (bias=True there whatever use_linear_bias says)."""

    def __init__(self, cfg, bias: bool = False):
        super().__init__()
        self.n_head, self.head_dim, self.dim = cfg.n_head, cfg.head_dim, cfg.dim
        self.wq = nn.Linear(cfg.dim, cfg.n_head * cfg.head_dim, bias=bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_local_heads * cfg.head_dim, bias=bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_local_heads * cfg.head_dim, bias=bias)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=bias)
        if cfg.use_qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.use_qk_norm = cfg.use_qk_norm

    def forward(self, xq: Tensor, xk: Tensor, xv: Tensor, rope: Tensor,
                kv_cache: Optional[Tuple[Tensor, Tensor]], start: int) -> Tensor:
        """x*: (B, T, D), already normed; rope: (T, r/2, 2) for positions start..start+T-1.
        kv_cache None: causal attention over the T tokens (start = 0). Otherwise (k, v)
        caches (max_B, H, S, hd): this chunk's k, v are written at positions
        start..start+T-1, and its queries attend causally over the cache's keys 0..start-1
        (the earlier chunks) and the chunk's own: query start+i sees keys <= start+i.
        start = 0 is the release's prefill (within the chunk), T = 1 its decode step."""
        B, T, _ = xq.shape
        q = self.wq(xq).view(B, T, self.n_head, self.head_dim)
        k = self.wk(xk).view(B, T, self.n_head, self.head_dim)
        v = self.wv(xv).view(B, T, self.n_head, self.head_dim)
        if self.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if kv_cache is None or start == 0:
            if kv_cache is not None:
                kv_cache[0][:B, :, :T] = k
                kv_cache[1][:B, :, :T] = v
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            end = start + T
            k_cache, v_cache = kv_cache
            k_cache[:B, :, start:end] = k
            v_cache[:B, :, start:end] = v
            k, v = k_cache[:B, :, :end], v_cache[:B, :, :end]
            mask = None
            if T > 1:  # (T, end): query start+i sees keys 0..start+i
                pos = torch.arange(end, device=q.device)
                mask = pos <= pos[start:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.dim))


def ffn_width(cfg, lidx: int) -> int:
    """F_i of layer lidx: the release's FeedForward scale_with_layer and round128
    (MUDDFormer and MUDDPythia alike)."""
    hid = cfg.intermediate_size * (lidx / (cfg.n_layer - 1) + 0.5)
    return round(hid / 128) * 128


class FeedForward(nn.Module):
    def __init__(self, cfg: MUDDFormerConfig, lidx: int):
        super().__init__()
        hid = ffn_width(cfg, lidx)
        self.w1 = nn.Linear(cfg.dim, hid, bias=False)
        self.w3 = nn.Linear(cfg.dim, hid, bias=False)
        self.w2 = nn.Linear(hid, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """MUDDFormer's block (pre-norm, sequential residual). MUDDPythia's block subclasses
    it through make_norm, attention_bias, feed_forward_class, parallel_residual and gather."""

    parallel_residual = False
    attention_bias = False
    feed_forward_class: type = FeedForward

    def __init__(self, cfg, lidx: int):
        super().__init__()
        self.lidx, self.norm_eps = lidx, cfg.norm_eps
        self.attention = Attention(cfg, bias=self.attention_bias)
        self.feed_forward = self.feed_forward_class(cfg, lidx)
        self.ffn_norm = self.make_norm(cfg)
        if cfg.sepln and lidx > 0:
            self.attention_norms = nn.ModuleList([self.make_norm(cfg) for _ in range(3)])
        else:
            self.attention_norm = self.make_norm(cfg)

    @staticmethod
    def make_norm(cfg) -> nn.Module:
        """The model's norms (block and final): RMSNorm in MUDDFormer."""
        return RMSNorm(cfg.dim, cfg.norm_eps)

    def gather(self, stack, A: Tensor, slots: slice) -> Tensor:
        """This block's input from the connection before it (lidx > 0): (4, B, T, D), the
        ways q, k, v through this block's attention norms, r raw. One fused pass for
        RMSNorm: stack.aggregate_qkv_norm (DepthStack, or the decode _LayerCache)."""
        return stack.aggregate_qkv_norm(A, self.qkv_norm_weights(), self.norm_eps, slots)

    def qkv_norm_weights(self) -> Tensor:
        """(3, D): the weights of this block's q, k, v input norms (one shared norm
        without sepln), for depth_aggregate_qkv_norm."""
        if hasattr(self, "attention_norms"):
            return torch.stack([n.weight for n in self.attention_norms])
        return self.attention_norm.weight.expand(3, -1)

    def forward(self, x: Tensor, rope: Tensor, kv_cache: Optional[Tuple[Tensor, Tensor]],
                start: int) -> Tensor:
        """x: block 0: (B, T, D), normed here; block i > 0: gather's 4 ways (q, k, v
        already through this block's input norms, r raw). Sequential residual:
        out = h + ffn(ffn_norm(h)); parallel (MUDDPythia): out = h + ffn(ffn_norm(r)),
        h = r + attn."""
        if self.lidx == 0:
            res = x
            xq = xk = xv = self.attention_norm(x)
        else:
            xq, xk, xv, res = x
        h = res + self.attention(xq, xk, xv, rope, kv_cache, start)
        return h + self.feed_forward(self.ffn_norm(res if self.parallel_residual else h))


class MultiwayDynamicDense(nn.Module):
    """The weight MLP of the connection after block `lidx`, in the release's layout
    (MultiwayDynamicDenseBlock): w1 (K, D), w2 (C·l, K), no biases; the bias (C, l) is
    the model's dense_bs[lidx]. crosslayer's mudd_weights takes W1 = w1.weight.T and
    W2 = w2.weight.T (transposed views, no copies)."""

    def __init__(self, cfg, lidx: int):
        super().__init__()
        last = lidx == cfg.n_layer - 1
        self.n_ways = 1 if last else len(cfg.dense_type)
        self.n_slots = lidx + 2
        K = mudd_hidden(self.n_ways, self.n_slots, 4 if last and cfg.expand_last else 1, cfg.round64)
        self.w1 = nn.Linear(cfg.dim, K, bias=False)
        self.w2 = nn.Linear(K, self.n_ways * self.n_slots, bias=False)

    def weights(self, x: Tensor, bias: Tensor, eps: float) -> Tensor:
        """A (B, T, C, l) = GELU(rms(x) @ w1ᵀ) @ w2ᵀ + bias, float32 (float64 for float64 x)."""
        return ops.mudd_weights(x, self.w1.weight.t(), self.w2.weight.t(), bias, self.n_ways, eps, "none")


class _LayerCache:
    """The decode depth stack: DepthStack's push/aggregate over a view of the
    preallocated (L+1, B, 1, D) layer cache (the release's LayerCache, 'LBTD'). No
    autograd: it runs under torch.no_grad."""

    def __init__(self, buf: Tensor, x0: Tensor):
        self._buf, self._len = buf, 0
        self.push(x0)

    def push(self, x: Tensor) -> None:
        self._buf[self._len].copy_(x)
        self._len += 1

    def aggregate(self, A: Tensor, slots: slice) -> Tensor:
        return ops.depth_aggregate(self._buf[slots], A)

    def aggregate_qkv_norm(self, A: Tensor, norm_weights: Tensor, eps: float, slots: slice) -> Tensor:
        return ops.depth_aggregate_qkv_norm(self._buf[slots], A, norm_weights, eps)


class MUDDDecoder(nn.Module):
    """What MUDDFormer and MUDDPythia share: the module tree, the dense connections over
    one DepthStack (training, prefill) or the layer cache (decode), the KV caches, the
    forward and the checkpoint hints. A subclass names its config class, its block class
    (which makes the norms, attention and FFN, and gathers its input from the stack), its
    RoPE (rotated features per head, the table's rounding dtype) and its load hints."""

    config_class: type = MUDDFormerConfig
    block_class: type = TransformerBlock
    rope_round_to: torch.dtype = torch.bfloat16
    # (config flag, key marker): the checkpoint has the marker in some key iff flag is set
    flag_markers: Tuple[Tuple[str, str], ...] = (("use_qk_norm", ".attention.q_norm."),
                                                  ("sepln", ".attention_norms."))
    # (key marker, hint): a key with the marker means another model family's checkpoint
    foreign_marker: Optional[Tuple[str, str]] = None

    # Check that token ids lie in [0, vocab_size) (a host read of idx's min / max: one
    # synchronisation per forward on CUDA, shared with input_pos's check in cached
    # inference); False skips it (models/_validation.py).
    validate_token_ids: bool = True

    @staticmethod
    def rope_dims(cfg) -> int:
        """Rotated features per head (cfg.rotary_dims(): MUDDPythia rotates a share)."""
        return cfg.rotary_dims()

    def __init__(self, config):
        super().__init__()
        name = type(self).__name__
        if type(config) is not self.config_class:  # exact: MUDDPythiaConfig extends MUDDFormerConfig
            raise TypeError(f"{name} takes a {self.config_class.__name__}, got {type(config).__name__}")
        _check_supported(config, name)
        self.config = cfg = config
        L = cfg.n_layer
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(self.block_class(cfg, i) for i in range(L))
        self.norm = self.block_class.make_norm(cfg)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.dynamic_dense = nn.ModuleList(MultiwayDynamicDense(cfg, i) for i in range(L))
        self.dense_bs = nn.ParameterList(
            nn.Parameter(torch.empty(dd.n_ways, dd.n_slots)) for dd in self.dynamic_dense)
        rope = rope_table(cfg.block_size, self.rope_dims(cfg), cfg.rope_base, self.rope_round_to)
        self.register_buffer("rope", rope, persistent=False)
        self.reset_dense_parameters()
        self.kv_caches: Optional[List[Tuple[Tensor, Tensor]]] = None
        self.layer_cache: Optional[Tensor] = None
        self.max_batch_size = self.max_seq_length = -1
        self._cache_fill: List[int] = []  # per cache batch row: positions 0..fill-1 are written
        self.register_load_state_dict_pre_hook(_checkpoint_hints)

    @torch.no_grad()
    def reset_dense_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """Identity start of every connection (crosslayer.ref.mudd_init_weights)."""
        for dd, b in zip(self.dynamic_dense, self.dense_bs):
            W1, W2, bias = mudd_init_weights(self.config.dim, dd.n_slots, dd.n_ways, dd.w1.out_features,
                                             generator=generator)
            dd.w1.weight.copy_(W1.t())
            dd.w2.weight.copy_(W2.t())
            b.copy_(bias)

    def setup_caches(self, max_batch_size: int, max_seq_length: int, dtype: Optional[torch.dtype] = None) -> None:
        """Allocate the KV caches (max_batch_size, H, S, hd) per layer and the layer
        cache (L+1, max_batch_size, 1, D), S = max_seq_length rounded up to a multiple
        of 8, on the parameters' device, in `dtype` (default: the parameters'). Keeps
        the current caches when they are large enough (as the release does)."""
        cfg = self.config
        for name, v in (("max_batch_size", max_batch_size), ("max_seq_length", max_seq_length)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"setup_caches: {name} must be an int >= 1, got {v!r}")
        if max_seq_length > cfg.block_size:
            raise ValueError(f"max_seq_length must be <= block_size = {cfg.block_size} (the RoPE "
                             f"table's length), got {max_seq_length}")
        w = self.tok_embeddings.weight
        dtype = dtype or w.dtype
        if (self.layer_cache is not None and self.layer_cache.dtype == dtype and self.layer_cache.device == w.device
                and self.max_batch_size >= max_batch_size and self.max_seq_length >= max_seq_length):
            return
        S = _find_multiple(max_seq_length, 8)
        kv_shape = (max_batch_size, cfg.n_head, S, cfg.head_dim)
        self.kv_caches = [(torch.zeros(kv_shape, dtype=dtype, device=w.device),
                           torch.zeros(kv_shape, dtype=dtype, device=w.device)) for _ in range(cfg.n_layer)]
        self.layer_cache = torch.zeros(cfg.n_layer + 1, max_batch_size, 1, cfg.dim, dtype=dtype, device=w.device)
        self.max_batch_size, self.max_seq_length = max_batch_size, S
        self._cache_fill = [0] * max_batch_size

    def forward(self, idx: Tensor, input_pos: Optional[Tensor] = None) -> Tensor:
        """idx (B, T) int64 / int32 token ids in [0, vocab_size) -> logits (B, T, V) in the
        parameters' dtype.

        input_pos None: the training forward over positions 0..T-1 (T <= block_size).
        input_pos (T,) integer tensor: cached inference (setup_caches first) of the
        consecutive positions input_pos = start, start+1, ..., start+T-1, all in
        [0, min(max_seq_length, block_size)). start = 0 begins a sequence (the release's
        prefill); start > 0 continues the one in the cache: a decode step (T = 1) or a
        further prefill chunk (T > 1), attending causally to the cached positions
        0..start-1 and to itself, so chunked prefill + decode equals the training
        forward. start must be <= the number of positions the cache holds for these batch
        rows (no gap; a smaller start rewinds). Anything else is a ValueError naming
        input_pos. Validating reads input_pos (and idx's id range) on the host: one
        synchronisation per call where they are on CUDA.
        """
        name = type(self).__name__
        if input_pos is None:
            check_idx(name, idx, allow_empty=True)
            if idx.shape[1] > self.config.block_size:
                raise ValueError(f"T = {idx.shape[1]} tokens exceed block_size = {self.config.block_size}")
            stats = token_id_stats(idx) if self.validate_token_ids else None
            if stats is not None:
                raise_bad_token_ids(name, idx, *stats.tolist(), self.config.vocab_size)
            return self._forward(idx, 0, cached=False)
        start = self._check_cached_call(idx, input_pos)
        with torch.no_grad():
            out = self._forward(idx, start, cached=True)
        B, T = idx.shape
        self._cache_fill[:B] = [start + T] * B
        return out

    def _check_cached_call(self, idx: Tensor, input_pos: Tensor) -> int:
        """Validate a cached-inference call; its first position."""
        name = type(self).__name__
        check_idx(name, idx)
        if self.layer_cache is None:
            raise RuntimeError("forward with input_pos is cached inference: call "
                               "setup_caches(max_batch_size, max_seq_length) first")
        B, T = idx.shape
        if (not isinstance(input_pos, Tensor) or input_pos.shape != (T,) or input_pos.dtype == torch.bool
                or input_pos.dtype.is_floating_point or input_pos.dtype.is_complex):
            got = (f"{input_pos.dtype} of shape {tuple(input_pos.shape)}" if isinstance(input_pos, Tensor)
                   else type(input_pos).__name__)
            raise ValueError(f"input_pos must be ({T},) integer positions for idx of shape {tuple(idx.shape)}, "
                             f"got {got}")
        limit = min(self.max_seq_length, self.config.block_size)
        if B > self.max_batch_size or T > limit:
            raise ValueError(f"idx {tuple(idx.shape)} exceeds the caches: max_batch_size = "
                             f"{self.max_batch_size}, max_seq_length = {limit}")
        w = self.tok_embeddings.weight
        if self.layer_cache.dtype != w.dtype or self.layer_cache.device != w.device:
            raise RuntimeError(f"the caches are {self.layer_cache.dtype} on {self.layer_cache.device} but the "
                               f"model is {w.dtype} on {w.device}: call setup_caches again")
        # One host read: first and last position, the smallest and largest step, idx's id range.
        pos = input_pos.to(torch.int64)
        parts = [pos[:1], pos[-1:]]
        if T > 1:
            d = pos[1:] - pos[:-1]
            parts += [d.min().reshape(1), d.max().reshape(1)]
        ids = token_id_stats(idx) if self.validate_token_ids else None
        vals = host_ints(parts + ([ids] if ids is not None else []))
        first, last = vals[:2]
        if T > 1 and (vals[2] != 1 or vals[3] != 1):
            d = pos[1:] - pos[:-1]
            i = int(((d <= 0) if vals[2] <= 0 else (d != 1)).nonzero()[0])
            what = "non-increasing" if vals[2] <= 0 else "not consecutive (a gap)"
            raise ValueError(f"input_pos must be consecutive positions start, start+1, ..., start+{T - 1} "
                             f"in [0, {limit}); got {what}: input_pos[{i}] = {int(pos[i])}, "
                             f"input_pos[{i + 1}] = {int(pos[i + 1])}")
        if first < 0 or last >= limit:
            got = f"position {first}" if T == 1 else f"positions {first}..{last}"
            raise ValueError(f"input_pos must lie in [0, {limit}) (max_seq_length of the caches, at most "
                             f"block_size = {self.config.block_size}), got {got}")
        filled = min(self._cache_fill[:B])
        if first > filled:
            rows = "batch row 0" if B == 1 else f"batch rows 0..{B - 1}"
            held = f"no positions for {rows}, so input_pos must start at 0" if filled == 0 else (
                f"positions 0..{filled - 1} for {rows}, so input_pos can start at 0..{filled} (a smaller "
                f"start rewinds)")
            raise ValueError(f"input_pos must continue the cache: it holds {held}, got start {first}")
        if ids is not None:
            raise_bad_token_ids(name, idx, vals[-2], vals[-1], self.config.vocab_size)
        return first

    def _forward(self, idx: Tensor, start: int, cached: bool) -> Tensor:
        """Positions start..start+T-1 (start = 0 without caches)."""
        cfg, L = self.config, self.config.n_layer
        x = self.tok_embeddings(idx)
        rope = self.rope[start:start + idx.shape[1]]
        if cached and idx.shape[1] == 1:
            stack = _LayerCache(self.layer_cache[:, : idx.shape[0]], x)
        else:
            stack = DepthStack.start(x, n_slots=L + 1)
        remat = cfg.use_gradient_checkpointing and not cached and torch.is_grad_enabled()
        h = x
        for i, layer in enumerate(self.layers):
            kv = self.kv_caches[i] if cached else None
            if remat:  # the block only: pushes and aggregations stay outside (DepthStack's rule)
                out = checkpoint(layer, h, rope, kv, start, use_reentrant=False)
            else:
                out = layer(h, rope, kv, start)
            stack.push(out)
            A = self.dynamic_dense[i].weights(out, self.dense_bs[i], cfg.norm_eps)
            if i + 1 < L:
                h = self.layers[i + 1].gather(stack, A, slice(0, i + 2))
            else:
                h = stack.aggregate(A, slice(0, L + 1))[0]
        return self.output(self.norm(h))


class MUDDFormer(MUDDDecoder):
    """MUDDFormer language model (module docstring: state dict, math, differences).

        model = MUDDFormer(MUDDFormerConfig.from_json("config.json"))
        model.load_state_dict(state_dict, strict=True)      # the release's keys
        logits = model(idx)                                  # training: (B, T, V)

        model.setup_caches(max_batch_size=B, max_seq_length=S)
        logits = model(prompt, torch.arange(T))              # prefill, positions 0..T-1
        logits = model(next_tok, torch.tensor([T]))          # decode, one token
        logits = model(more, torch.arange(T + 1, T + 1 + M)) # a further prefill chunk
    """

    foreign_marker = ("norm.bias", "it has LayerNorm biases (norm.bias): a MUDDPythia checkpoint, "
                                   "which crosslayer.models.MUDDPythia loads")


_LAYER_KEY = re.compile(r"layers\.([0-9]+)\.")


def _checkpoint_hints(model: MUDDDecoder, state_dict, prefix, local_metadata, strict, missing_keys,
                      unexpected_keys, error_msgs) -> None:
    """load_state_dict pre-hook (strict loads): when the checkpoint's structure does not
    fit model.config, add one message naming the config fields that differ; torch then
    raises it along with its missing / unexpected / size-mismatch lists. Keys and values
    it cannot read (a key layers.<not a number>..., a value that is no tensor) are left
    to that normal reporting: the hints look only at tensors under well-formed keys."""
    if not strict:
        return
    cfg = model.config
    keys = [k[len(prefix):] for k in state_dict if isinstance(k, str) and k.startswith(prefix)]
    got = {k: state_dict[prefix + k] for k in keys if isinstance(state_dict[prefix + k], Tensor)}  # shapes
    own = {k: v.shape for k, v in model.state_dict().items()}
    hints = []
    layer_ids = (_LAYER_KEY.match(k) for k in keys)
    n = 1 + max((int(m.group(1)) for m in layer_ids if m), default=-1)
    if n != cfg.n_layer:
        hints.append(f"it has {n} layers (layers.*), config.n_layer = {cfg.n_layer}")
    emb = got.get("tok_embeddings.weight")
    if emb is not None and tuple(emb.shape) != tuple(own["tok_embeddings.weight"]):
        hints.append(f"tok_embeddings.weight is {tuple(emb.shape)}, config (vocab_size, dim) = "
                     f"{(cfg.vocab_size, cfg.dim)}")
    if model.foreign_marker is not None and any(model.foreign_marker[0] in k for k in keys):
        hints.append(model.foreign_marker[1])
    if any(".attention.wqkv." in k for k in keys):
        hints.append("it has fused attention.wqkv weights: a model without dense connections "
                     "(dense=False or dense_type='l'), which this class does not implement")
    for flag, marker in model.flag_markers:
        has = any(marker in k for k in keys)
        if has != getattr(cfg, flag):
            hints.append(f"it {'has' if has else 'lacks'} '{marker.strip('.')}' weights: {flag} = {has}, "
                         f"config.{flag} = {getattr(cfg, flag)}")
    for key_fmt, fields_ in (("dynamic_dense.{}.w1.weight", "round64 / expand_last"),
                             ("layers.{}.feed_forward.w1.weight", "intermediate_size")):
        for i in range(min(n, cfg.n_layer)):
            k = key_fmt.format(i)
            if k in got and tuple(got[k].shape) != tuple(own[k]):
                hints.append(f"{k} is {tuple(got[k].shape)}, the config gives {tuple(own[k])}: check {fields_}")
                break
    if hints:
        error_msgs.append(f"the checkpoint does not fit this {type(cfg).__name__}: " + "; ".join(hints))
