"""MUDDPythia (Caiyun-AI, arXiv 2502.12170: MUDD connections on the Pythia architecture)
with the released PyTorch checkpoints' state_dict (Caiyun-AI/MUDDPythia-1.4B, -2.8B),
running its dense connections on crosslayer's ops.

Source: Caiyun-AI/MUDDFormer pytorch/muddpythia/modeling_muddpythia.py and
configuration_muddpythia.py, read at the mirror ArthurWANGZHE/MUDDFormer @9aa4b78
(config_1p4b.json / config_2p8b.json @87967d3). Written anew on MUDDFormer's machinery
(muddformer.py: MUDDDecoder, the DA weight MLP, attention, caches, forward); only what
the Pythia file does differently is here. Its checkpoints load with
`load_state_dict(strict=True)` from a plain tensor dict.

What differs from MUDDFormer (muddformer.py's docstring has the rest, which is equal):
  - Norms: nn.LayerNorm(dim, eps=norm_eps) with weight and bias for norm, ffn_norm,
    attention_norm (block 0) and the three attention_norms.{0,1,2} of the multiway
    blocks. The DA's weight-free RMSnormNoscale and the per-head q_norm / k_norm
    (use_qk_norm) stay RMSNorms, as in the release.
  - Linear biases: attention.{wq,wk,wv,wo}.bias always (the release hard-codes
    bias=True there); feed_forward.{w1,w2}.bias with use_linear_bias. output has none.
  - FFN: w2(GELU(w1(x))), exact erf GELU, width F_i by MUDDFormer's rule
    (scale_with_layer, round128) from intermediate_size = 4·dim by default.
  - Parallel residual (use_parallel_residual): h = X̄_R + attn(q, k, v) and
    out = h + ffn(ffn_norm(X̄_R)); otherwise out = h + ffn(ffn_norm(h)).
  - Partial rotary: the first r = int(head_dim·rotary_pct) features of each head are
    rotated ('half' pairing over those r), the rest pass; the table has frequencies
    base^(-2i/r) and is rounded to float16 (MUDDFormer: bfloat16).
  - norm_eps 1e-5 default (LayerNorms, q/k norms and the DA norm alike).
  - The q/k/v inputs: LayerNorm with bias is no RMSNorm, so the fused
    depth_aggregate_qkv_norm cannot express it; the block aggregates the 4 ways with
    DepthStack.aggregate (or the decode layer cache's) and then runs its three
    LayerNorms (F.layer_norm) on Y_q, Y_k, Y_v. In bf16 the aggregate is rounded to
    bf16 before the norm, as in the release.
  - The release softmaxes in the activation dtype with a float16-min mask; here
    F.scaled_dot_product_attention (equal math in float32 / float64).

Checkpoint conversion: the release's match_weight_muddpythia (from the Pax training
checkpoint) adds 1 to every LayerNorm weight (Pax stores scale - 1; not to q_norm /
k_norm). The released state_dicts are that function's output, holding plain
nn.LayerNorm weights, so they load here unchanged; no +1 is applied on load.

Released configs (config_1p4b.json / config_2p8b.json): use_qk_norm, expand_last,
round64 True; norm_eps 1e-5; rotary_pct 0.25; vocab 50432. 1.4B: L=24, dim 2048, 16
heads of 128 (32 rotated), I=8192. 2.8B: L=32, dim 2560, 32 heads of 80 (20 rotated),
I=10240.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crosslayer.models._validation import Bound, config_error
from crosslayer.models.muddformer import _MUDD_RULES, MUDDDecoder, MUDDFormerConfig, TransformerBlock, ffn_width

__all__ = ["MUDDPythiaConfig", "MUDDPythia"]


@dataclass
class MUDDPythiaConfig(MUDDFormerConfig):
    """The release's MUDDPythiaConfig: MUDDFormerConfig's fields with its own defaults
    (vocab_size 32000, norm_eps 1e-5; intermediate_size None -> 4·dim) and three more
    (parallel residual, linear biases, the rotary share of a head). Checked as
    MUDDFormerConfig is, and rotary_pct in (0, 1] with int(head_dim·rotary_pct) even."""

    _rules = {**_MUDD_RULES, "rotary_pct": Bound(0, 1, lo_open=True, why="the rotated share of a head")}

    vocab_size: int = 32000
    norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    use_linear_bias: bool = True
    rotary_pct: float = 0.25

    def default_intermediate_size(self) -> int:
        return 4 * self.dim

    def rotary_dims(self) -> int:
        """The release's rotary_ndims = int(head_dim·rotary_pct)."""
        return int(self.head_dim * self.rotary_pct)

    def _check_rotary(self) -> None:
        r = self.rotary_dims()
        if r % 2 or r <= 0:
            raise config_error(self, "rotary_pct", (
                f"int(head_dim·rotary_pct) rotated features per head ({r} of head_dim = dim // n_head = "
                f"{self.head_dim}) even and > 0 (RoPE rotates pairs)"))


class GeluFeedForward(nn.Module):
    """The release's Pythia FeedForward: w2(GELU(w1(x))), biases with use_linear_bias."""

    def __init__(self, cfg: MUDDPythiaConfig, lidx: int):
        super().__init__()
        hid = ffn_width(cfg, lidx)
        self.w1 = nn.Linear(cfg.dim, hid, bias=cfg.use_linear_bias)
        self.w2 = nn.Linear(hid, cfg.dim, bias=cfg.use_linear_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.gelu(self.w1(x)))


class PythiaBlock(TransformerBlock):
    """The release's Pythia TransformerBlock: LayerNorms, biased attention, GELU FFN and
    (use_parallel_residual) out = h + ffn(ffn_norm(X̄_R))."""

    attention_bias = True
    feed_forward_class = GeluFeedForward

    def __init__(self, cfg: MUDDPythiaConfig, lidx: int):
        super().__init__(cfg, lidx)
        self.parallel_residual = cfg.use_parallel_residual

    @staticmethod
    def make_norm(cfg) -> nn.Module:
        return nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def gather(self, stack, A: Tensor, slots: slice) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """(q, k, v, r) for this block (lidx > 0): Y = stack.aggregate(A, slots), 4 ways,
        then LayerNorm_c(Y_c) for q, k, v (attention_norms, or the one attention_norm
        without sepln); r raw. Not the fused depth_aggregate_qkv_norm: that op's norm is
        an RMSNorm, and these are LayerNorms with bias."""
        Y = stack.aggregate(A, slots)
        norms = self.attention_norms if hasattr(self, "attention_norms") else [self.attention_norm] * 3
        return (*(norm(y) for norm, y in zip(norms, Y[:3])), Y[3])


class MUDDPythia(MUDDDecoder):
    """MUDDPythia language model (module docstring: state dict, math, differences); the
    API is MUDDFormer's (its docstring shows the calls), with a MUDDPythiaConfig."""

    config_class = MUDDPythiaConfig
    block_class = PythiaBlock
    rope_round_to = torch.float16
    flag_markers = MUDDDecoder.flag_markers + (("use_linear_bias", ".feed_forward.w1.bias"),)
    foreign_marker = (".feed_forward.w3.", "it has feed_forward.w3 (SwiGLU) weights: a MUDDFormer "
                                           "checkpoint, which crosslayer.models.MUDDFormer loads")
