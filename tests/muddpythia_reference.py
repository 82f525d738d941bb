"""Test-local oracle: the released MUDDPythia's training / prefill forward, in plain
PyTorch, transcribed module for module so its state_dict keys and shapes are the
release's.

Source: Caiyun-AI/MUDDFormer, pytorch/muddpythia/modeling_muddpythia.py and
configuration_muddpythia.py, read at the mirror ArthurWANGZHE/MUDDFormer @9aa4b78
(config_1p4b.json / config_2p8b.json @87967d3).

Reused from muddformer_reference.py, where the Pythia file's code is the same:
RMSNorm (q_norm / k_norm), MultiwayDynamicDenseBlock (RMSnormNoscale, w1, exact GELU,
w2, the 'B T (C L) -> C B T L' split, layer_mix as a Python sum), apply_rotary_emb
('half' mode; it casts the table to x's float dtype, where the Pythia file lets
float16 * float32 promote: the same values).

Kept from the Pythia file: nn.LayerNorm(dim, eps=norm_eps) for norm, ffn_norm,
attention_norm and attention_norms.0-2; Attention's wq / wk / wv / wo with bias=True;
the partial rotary (rotary_ndims = int(head_dim·rotary_pct), rotate q[..., :r], cat
the rest) with a float16-rounded table over r features; logits q·kᵀ·scale masked with
float16's min and softmaxed in the activation dtype; FeedForward w2(gelu(w1(x))) with
use_linear_bias biases and the scale_with_layer / round128 width; the parallel
residual `h + ffn(ffn_norm(res if use_parallel_residual else h))`; dense_bs from randn.

Changed or left out: `.float()` upcasts become `_up` (float64 stays float64, as in
muddformer_reference.py); no KV cache, layer cache, generate, HF PreTrainedModel, the
wqkv load_hook (dense_type 'l' only) or match_weight_muddpythia (Pax conversion): only
the no-cache forward over positions 0..T-1 (the release's prefill), returning logits;
only dense, dynamic_dense, dense_type 'qkvr'. The config is any object with the
MUDDPythiaConfig field names.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from muddformer_reference import MultiwayDynamicDenseBlock, RMSNorm, apply_rotary_emb


def precompute_freqs_cis(seq_len, n_elem, base):
    freqs = 1.0 / (base ** (torch.arange(0, n_elem, 2)[: (n_elem // 2)].float() / n_elem))
    freqs = torch.outer(torch.arange(seq_len, device=freqs.device), freqs)
    freqs_cis = torch.polar(torch.ones_like(freqs), freqs)
    return torch.stack([freqs_cis.real, freqs_cis.imag], dim=-1).to(torch.float16)


class Attention(nn.Module):
    def __init__(self, cfg, lidx):
        super().__init__()
        self.wq = nn.Linear(cfg.dim, cfg.n_head * cfg.head_dim, bias=True)
        self.wk = nn.Linear(cfg.dim, cfg.n_local_heads * cfg.head_dim, bias=True)
        self.wv = nn.Linear(cfg.dim, cfg.n_local_heads * cfg.head_dim, bias=True)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=True)
        self.lidx, self.cfg = lidx, cfg
        if cfg.use_qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.rotary_ndims = int(cfg.head_dim * cfg.rotary_pct)

    def forward(self, x, freqs_cis, mask):
        cfg, r = self.cfg, self.rotary_ndims
        xq, xk, xv = (x, x, x) if self.lidx == 0 else (x[0], x[1], x[2])
        B, T, _ = xq.shape
        q = self.wq(xq).view(B, T, cfg.n_head, cfg.head_dim)
        k = self.wk(xk).view(B, T, cfg.n_local_heads, cfg.head_dim)
        v = self.wv(xv).view(B, T, cfg.n_local_heads, cfg.head_dim)
        if cfg.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if r == cfg.head_dim:
            q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
        else:
            q = torch.cat((apply_rotary_emb(q[..., :r], freqs_cis), q[..., r:]), dim=-1)
            k = torch.cat((apply_rotary_emb(k[..., :r], freqs_cis), k[..., r:]), dim=-1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        logits = q @ k.transpose(-2, -1) * (1 / math.sqrt(cfg.head_dim))
        logits = torch.where(mask[:, :, :, :T], logits, torch.finfo(torch.float16).min)
        y = logits.softmax(-1) @ v
        return self.wo(y.transpose(1, 2).contiguous().view(B, T, cfg.dim))


class FeedForward(nn.Module):
    def __init__(self, cfg, lidx):
        super().__init__()
        hid = cfg.intermediate_size * (lidx / (cfg.n_layer - 1) + 0.5)
        hid = round(hid / 128) * 128
        self.w1 = nn.Linear(cfg.dim, hid, bias=cfg.use_linear_bias)
        self.w2 = nn.Linear(hid, cfg.dim, bias=cfg.use_linear_bias)

    def forward(self, x):
        return self.w2(F.gelu(self.w1(x)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg, lidx):
        super().__init__()
        self.lidx, self.cfg = lidx, cfg
        self.attention = Attention(cfg, lidx)
        self.feed_forward = FeedForward(cfg, lidx)
        self.ffn_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        if cfg.sepln and lidx > 0:
            self.attention_norms = nn.ModuleList([nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) for _ in range(3)])
        else:
            self.attention_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, x, freqs_cis, mask):
        if self.lidx == 0:
            res, normed = x, self.attention_norm(x)
        else:
            res = x[-1]
            if self.cfg.sepln:
                normed = tuple(n(t) for n, t in zip(self.attention_norms, x[:3]))
            else:  # one norm for all three (the release reaches this only with stack_hidden)
                normed = tuple(self.attention_norm(t) for t in x[:3])
        h = res + self.attention(normed, freqs_cis, mask)
        return h + self.feed_forward(self.ffn_norm(res if self.cfg.use_parallel_residual else h))


class ReferenceMUDDPythia(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        L, C = cfg.n_layer, len(cfg.dense_type)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(L))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.dense_bs = nn.ParameterList(
            [nn.Parameter(torch.randn(C if i != L - 1 else 1, i + 2)) for i in range(L)])
        self.dynamic_dense = nn.ModuleList(
            [MultiwayDynamicDenseBlock(cfg, i, last_layer=i == L - 1) for i in range(L)])

    def forward(self, idx):
        cfg = self.cfg
        T = idx.shape[-1]
        rotary_ndims = int(cfg.head_dim * cfg.rotary_pct)
        freqs_cis = precompute_freqs_cis(cfg.block_size, rotary_ndims, cfg.rope_base).to(idx.device)[:T]
        mask = torch.tril(torch.ones(T, T, dtype=torch.bool, device=idx.device))[None, None]
        x = self.tok_embeddings(idx)
        hiddens = [x]
        for i, layer in enumerate(self.layers):
            x = layer(x, freqs_cis, mask)
            hiddens.append(x)
            dw = self.dynamic_dense[i](x) + self.dense_bs[i][:, None, None, :]
            x = self.dynamic_dense[i].layer_mix(hiddens, dw)
        return self.output(self.norm(x[0]))
