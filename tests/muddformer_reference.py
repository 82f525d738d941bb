"""Test-local oracle: the released MUDDFormer's training / prefill forward, in plain
PyTorch, transcribed module for module so its state_dict keys and shapes are the
release's.

Source: Caiyun-AI/MUDDFormer, pytorch/muddformer/modeling_muddformer.py and
configuration_muddformer.py, read at the mirror ArthurWANGZHE/MUDDFormer @9aa4b78
(modeling) / @87967d3 (configuration, config.json); shared/notes/mudd.md section 1
describes the same code at Caiyun-AI @fc067b2.

Kept: the module tree and parameter names (tok_embeddings, layers.i.{attention.{wq,
wk,wv,wo,q_norm,k_norm}, feed_forward.{w1,w3,w2}, ffn_norm, attention_norm |
attention_norms.0-2}, norm, output, dense_bs.i, dynamic_dense.i.{w1,w2}); the
dense_bs init (randn, not identity); the FeedForward width rule (scale_with_layer,
round128, Python's round); RMSNorm as `_norm(x.float()).type_as(x) * weight`; the
weight-free RMSnormNoscale in the input dtype; exact GELU; the C-major 'B T (C L)'
split of the DA weights plus dense_bs; `layer_mix` as a Python sum over a list of
hidden states; the bf16-rounded RoPE table and the 'half' rotary layout; attention
logits q·kᵀ·scale, masked and softmaxed in float32.

Changed, and why:
  - `.float()` / `.to(float32)` upcasts become `_up`: float32 for bf16 / fp16 / fp32
    (the release's dtypes, so identical there), float64 kept as float64 so the fp64
    tests compare against a float64 oracle instead of a float32 one.
  - No KV cache, layer cache, generate or HF PreTrainedModel: only the no-cache
    forward over positions 0..T-1 (the release's prefill), returning logits.
  - Only the configuration the release ships (dense, dynamic_dense, dense_type 'qkvr');
    the config is any object with the MUDDFormerConfig field names.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def _up(x):
    return x if x.dtype == torch.float64 else x.float()


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = _up(x)
        return (xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class RMSnormNoscale(nn.Module):
    def __init__(self, epsilon):
        super().__init__()
        self.epsilon = epsilon

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.epsilon)


class MultiwayDynamicDenseBlock(nn.Module):
    def __init__(self, cfg, lidx, last_layer):
        super().__init__()
        self.norm = RMSnormNoscale(cfg.norm_eps)
        self.C = 1 if last_layer else len(cfg.dense_type)
        self.lidx = lidx
        l = lidx + 2
        hid, out = l * self.C, l * self.C
        if last_layer and cfg.expand_last:
            hid *= 4
        if cfg.round64:
            hid = (hid // 64 + 1) * 64
        self.w1 = nn.Linear(cfg.dim, hid, bias=False)
        self.act = nn.GELU()
        self.w2 = nn.Linear(hid, out, bias=False)

    def forward(self, x):
        dw = self.w2(self.act(self.w1(self.norm(x))))  # B T (C L)
        B, T, _ = dw.shape
        return dw.view(B, T, self.C, -1).permute(2, 0, 1, 3)  # C B T L

    def layer_mix(self, hids, dw):
        return tuple(sum(dw[c, :, :, j, None] * hids[j] for j in range(self.lidx + 2)) for c in range(self.C))


def precompute_freqs_cis(seq_len, n_elem, base):
    freqs = 1.0 / (base ** (torch.arange(0, n_elem, 2)[: (n_elem // 2)].float() / n_elem))
    freqs = torch.outer(torch.arange(seq_len, device=freqs.device), freqs)
    freqs_cis = torch.polar(torch.ones_like(freqs), freqs)
    return torch.stack([freqs_cis.real, freqs_cis.imag], dim=-1).to(torch.bfloat16)


def apply_rotary_emb(x, freqs_cis):
    xs = _up(x).reshape(*x.shape[:-1], 2, -1).transpose(-1, -2)  # 'half' mode
    fc = freqs_cis.view(-1, xs.size(1), 1, xs.size(3), 2).to(xs.dtype)
    out = torch.stack([xs[..., 0] * fc[..., 0] - xs[..., 1] * fc[..., 1],
                       xs[..., 1] * fc[..., 0] + xs[..., 0] * fc[..., 1]], -1)
    return out.flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg, lidx):
        super().__init__()
        self.wq = nn.Linear(cfg.dim, cfg.n_head * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_local_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_local_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.lidx, self.cfg = lidx, cfg
        if cfg.use_qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(self, x, freqs_cis, mask):
        cfg = self.cfg
        xq, xk, xv = (x, x, x) if self.lidx == 0 else (x[0], x[1], x[2])
        B, T, _ = xq.shape
        q = self.wq(xq).view(B, T, cfg.n_head, cfg.head_dim)
        k = self.wk(xk).view(B, T, cfg.n_local_heads, cfg.head_dim)
        v = self.wv(xv).view(B, T, cfg.n_local_heads, cfg.head_dim)
        if cfg.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        logits = q @ k.transpose(-2, -1) * (1 / math.sqrt(cfg.head_dim))
        dtype = logits.dtype
        logits = _up(logits)
        logits = torch.where(mask[:, :, :, :T], logits, torch.finfo(torch.float32).min)
        y = logits.softmax(-1).to(dtype) @ v
        return self.wo(y.transpose(1, 2).contiguous().view(B, T, cfg.dim))


class FeedForward(nn.Module):
    def __init__(self, cfg, lidx):
        super().__init__()
        hid = cfg.intermediate_size * (lidx / (cfg.n_layer - 1) + 0.5)
        hid = round(hid / 128) * 128
        self.w1 = nn.Linear(cfg.dim, hid, bias=False)
        self.w3 = nn.Linear(cfg.dim, hid, bias=False)
        self.w2 = nn.Linear(hid, cfg.dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg, lidx):
        super().__init__()
        self.lidx, self.cfg = lidx, cfg
        self.attention = Attention(cfg, lidx)
        self.feed_forward = FeedForward(cfg, lidx)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.sepln and lidx > 0:
            self.attention_norms = nn.ModuleList([RMSNorm(cfg.dim, cfg.norm_eps) for _ in range(3)])
        else:
            self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)

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
        return h + self.feed_forward(self.ffn_norm(h))


class ReferenceMUDDFormer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        L, C = cfg.n_layer, len(cfg.dense_type)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(L))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.dense_bs = nn.ParameterList(
            [nn.Parameter(torch.randn(C if i != L - 1 else 1, i + 2)) for i in range(L)])
        self.dynamic_dense = nn.ModuleList(
            [MultiwayDynamicDenseBlock(cfg, i, last_layer=i == L - 1) for i in range(L)])

    def forward(self, idx):
        cfg = self.cfg
        T = idx.shape[-1]
        freqs_cis = precompute_freqs_cis(cfg.block_size, cfg.head_dim, cfg.rope_base).to(idx.device)[:T]
        mask = torch.tril(torch.ones(T, T, dtype=torch.bool, device=idx.device))[None, None]
        x = self.tok_embeddings(idx)
        hiddens = [x]
        for i, layer in enumerate(self.layers):
            x = layer(x, freqs_cis, mask)
            hiddens.append(x)
            dw = self.dynamic_dense[i](x) + self.dense_bs[i][:, None, None, :]
            x = self.dynamic_dense[i].layer_mix(hiddens, dw)
        return self.output(self.norm(x[0]))
