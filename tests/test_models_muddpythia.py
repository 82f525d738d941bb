"""crosslayer.models.MUDDPythia against the released MUDDPythia.

The oracle is tests/muddpythia_reference.py, a transcription of the release's
modeling_muddpythia.py (training / prefill forward). On tiny random configs:
  (a) state_dict keys and shapes equal the reference's, plus hand-computed widths for
      the tiny config and for the released 1.4B / 2.8B configs (meta device);
  (b) the reference's random state_dict (norm weights and every bias off their init)
      loads with strict=True, and the logits match in float64 (1e-10) and float32
      (DESIGN's policy vs the reference in float32): the training forward, and a
      prefill followed by decode steps, against the reference's full forward;
  (c) every parameter's gradient matches the reference's autograd (float64), also
      with gradient checkpointing;
  (d) mismatched checkpoints (including a MUDDFormer's) and unsupported configs fail
      with messages naming the cause.
GPU tests (bf16 and fp32 on CUDA vs the float64 CPU reference) skip without CUDA.
"""

import pytest
import torch

from crosslayer.models import MUDDFormer, MUDDFormerConfig, MUDDPythia, MUDDPythiaConfig
from muddformer_reference import ReferenceMUDDFormer
from muddpythia_reference import ReferenceMUDDPythia
from policy import assert_policy

F64 = torch.float64

# The released config.json of Caiyun-AI/MUDDPythia-1.4B (pytorch/muddpythia/config_1p4b.json);
# config_2p8b.json differs in dim 2560, head_dim 80, intermediate_size 10240, n_head 32,
# n_local_heads 32, n_layer 32.
RELEASED_1P4B = {
    "architectures": ["MUDDPythia"],
    "auto_map": {"AutoConfig": "configuration_muddpythia.MUDDPythiaConfig",
                 "AutoModelForCausalLM": "modeling_muddpythia.MUDDPythia"},
    "block_size": 2048, "bos_token_id": 0, "dense": True, "dense_type": "qkvr", "dim": 2048,
    "dynamic_dense": True, "eos_token_id": 0, "expand_last": True, "head_dim": 128,
    "intermediate_size": 8192, "is_training": False, "model_type": "muddpythia", "n_head": 16,
    "n_layer": 24, "n_local_heads": 16, "norm_eps": 1e-05, "rope_base": 10000, "rotary_pct": 0.25,
    "round64": True, "sepln": True, "stack_hidden": False, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.35.0", "use_gradient_checkpointing": False,
    "use_layer_cache": True, "use_linear_bias": True, "use_parallel_residual": True,
    "use_qk_norm": True, "vocab_size": 50432,
}
RELEASED_2P8B = dict(RELEASED_1P4B, dim=2560, head_dim=80, intermediate_size=10240, n_head=32,
                     n_local_heads=32, n_layer=32)

RELEASED = dict(use_qk_norm=True, expand_last=True, round64=True)  # the released flags
CONFIGS = {
    "released": RELEASED,
    "defaults": {},
    "no_sepln": dict(RELEASED, sepln=False),
    "sequential_no_bias": dict(RELEASED, use_parallel_residual=False, use_linear_bias=False),
    "full_rotary": dict(RELEASED, rotary_pct=1.0),
}


def tiny(**kw):
    """head_dim 16: 4 rotated features at rotary_pct 0.25."""
    base = dict(block_size=64, vocab_size=97, n_layer=3, n_head=4, dim=64)
    return MUDDPythiaConfig(**{**base, **kw})


def pair(cfg, dtype=F64):
    """(reference with random weights, ours loaded from its state_dict with strict=True)."""
    ref = ReferenceMUDDPythia(cfg).to(dtype)
    with torch.no_grad():  # norm weights off 1, LayerNorm biases off 0: every weight matters
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    ours = MUDDPythia(cfg).to(dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def shapes(m):
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


# --------------------------------------------------------------------------- (a) keys


@pytest.mark.parametrize("name", CONFIGS)
def test_state_dict_matches_release(name):
    cfg = tiny(**CONFIGS[name])
    assert shapes(MUDDPythia(cfg)) == shapes(ReferenceMUDDPythia(cfg))


def test_state_dict_tiny_widths():
    """Hand-computed from the release's rules for L=3, dim 64, released flags."""
    s = shapes(MUDDPythia(tiny(**RELEASED)))
    # top: tok_embeddings, norm weight + bias, output; per layer: wq wk wv wo weight +
    # bias, q_norm k_norm, ffn w1 w2 weight + bias, ffn_norm weight + bias; attention
    # LayerNorms (1 + 3 + 3) x 2; dense_bs 3; DA MLPs 2 per layer
    assert len(s) == 4 + 3 * 16 + 14 + 3 + 3 * 2
    assert [s[f"dynamic_dense.{i}.w2.weight"] for i in range(3)] == [(8, 64), (12, 64), (4, 64)]
    assert [s[f"dense_bs.{i}"] for i in range(3)] == [(4, 2), (4, 3), (1, 4)]
    # FFN: intermediate 4·64 = 256 × (i/2 + 1/2), rounded to 128; biased
    assert [s[f"layers.{i}.feed_forward.w1.weight"] for i in range(3)] == [(128, 64), (256, 64), (384, 64)]
    assert s["layers.2.feed_forward.w1.bias"] == (384,) and s["layers.2.feed_forward.w2.bias"] == (64,)
    assert s["layers.0.attention.wq.bias"] == s["layers.0.attention.wo.bias"] == (64,)
    assert s["layers.0.attention_norm.bias"] == s["layers.2.attention_norms.2.bias"] == (64,)
    assert s["norm.bias"] == s["layers.1.ffn_norm.bias"] == (64,)
    assert s["layers.1.attention.q_norm.weight"] == (16,) and "layers.1.attention.q_norm.bias" not in s
    assert "output.bias" not in s


@pytest.mark.parametrize("cfg_json, L, F0, F_last, n_rot", [
    (RELEASED_1P4B, 24, 4096, 12288, 32),
    (RELEASED_2P8B, 32, 5120, 15360, 20),
])
def test_released_config_shapes(cfg_json, L, F0, F_last, n_rot):
    """The released config.json builds the tree (meta device: no memory): FFN widths
    I·(i/(L-1) + 1/2) at the ends, RoPE over int(head_dim/4) features, DA widths."""
    cfg = MUDDPythiaConfig.from_dict(cfg_json)
    D = cfg.dim
    with torch.device("meta"):
        m = MUDDPythia(cfg)
    s = shapes(m)
    assert s["layers.0.feed_forward.w1.weight"] == (F0, D)
    assert s[f"layers.{L - 1}.feed_forward.w2.weight"] == (D, F_last)
    assert m.rope.shape == (2048, n_rot // 2, 2)
    # DA: i=0 C·l = 8 -> 64; last: 1·(L+1)·4 -> rounded up to a multiple of 64
    assert s["dynamic_dense.0.w1.weight"] == (64, D) and s["dynamic_dense.0.w2.weight"] == (8, 64)
    K = (4 * (L + 1) // 64 + 1) * 64
    assert s[f"dynamic_dense.{L - 1}.w1.weight"] == (K, D) and s[f"dense_bs.{L - 1}"] == (1, L + 1)


def test_config_post_init_and_from_dict():
    cfg = MUDDPythiaConfig(dim=64, n_head=4, head_dim=99)
    assert (cfg.intermediate_size, cfg.head_dim, cfg.n_local_heads, cfg.norm_eps) == (256, 16, 4, 1e-5)
    with pytest.raises(ValueError, match=r"unknown MUDDPythiaConfig field\(s\) \['rope_scaling'\]"):
        MUDDPythiaConfig.from_dict({**RELEASED_1P4B, "rope_scaling": None})


def test_config_classes_do_not_mix():
    with pytest.raises(TypeError, match="MUDDPythia takes a MUDDPythiaConfig, got MUDDFormerConfig"):
        MUDDPythia(MUDDFormerConfig(n_layer=2, n_head=4, dim=64))
    with pytest.raises(TypeError, match="MUDDFormer takes a MUDDFormerConfig, got MUDDPythiaConfig"):
        MUDDFormer(tiny())


# --------------------------------------------------------------------------- (b) logits


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_matches_release(name):
    cfg = tiny(**CONFIGS[name])
    ref, ours = pair(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 13))
    ref64, out64 = ref(idx), ours(idx)
    ref32, out32 = ref.float()(idx), ours.float()(idx)
    torch.testing.assert_close(out64, ref64, rtol=0, atol=1e-10)
    assert_policy(f"{name} logits", out32, ref32, ref64)


@pytest.mark.parametrize("name", ["released", "sequential_no_bias"])
def test_prefill_then_decode_matches_full_forward(name):
    """Prefill 6 tokens, decode 5 one at a time, batch 2 in caches for 3: every step's
    logits equal the reference's full forward at that position."""
    cfg = tiny(**CONFIGS[name])
    ref, ours = pair(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 11))
    P = 6
    ref64, ref32 = ref(idx).detach(), ref.float()(idx).detach()
    for dtype in (F64, torch.float32):
        ours.to(dtype).setup_caches(max_batch_size=3, max_seq_length=20)
        steps = [ours(idx[:, :P], torch.arange(P))]
        steps += [ours(idx[:, t:t + 1], torch.tensor([t])) for t in range(P, idx.shape[1])]
        out = torch.cat(steps, 1)
        assert not out.requires_grad  # cached inference builds no graph
        if dtype == F64:
            torch.testing.assert_close(out, ref64, rtol=0, atol=1e-10)
        else:
            assert_policy(f"{name} prefill+decode", out, ref32, ref64)


def test_fresh_model_starts_as_residual_stream():
    """Identity start: every connection returns its newest slot (a plain parallel-
    residual Pythia), checked through the reference loaded with those weights."""
    cfg = tiny(**RELEASED)
    ours = MUDDPythia(cfg).double()
    for b in ours.dense_bs:
        assert torch.equal(b, torch.eye(b.shape[1], dtype=F64)[-1].expand_as(b))
    ref = ReferenceMUDDPythia(cfg).double()
    ref.load_state_dict(ours.state_dict(), strict=True)
    idx = torch.randint(0, cfg.vocab_size, (1, 7))
    torch.testing.assert_close(ours(idx), ref(idx), rtol=0, atol=1e-10)


# --------------------------------------------------------------------------- (c) grads


@pytest.mark.parametrize("name, remat", [(n, False) for n in CONFIGS] + [("released", True)])
def test_gradients_match_release(name, remat):
    cfg = tiny(**CONFIGS[name], use_gradient_checkpointing=remat)
    ref, ours = pair(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 9))
    dlogits = torch.randn(2, 9, cfg.vocab_size, dtype=F64)
    (ref(idx) * dlogits).sum().backward()
    (ours(idx) * dlogits).sum().backward()
    ref_grads = dict(ref.named_parameters())
    for k, p in ours.named_parameters():
        assert p.grad is not None, f"{k} got no gradient"
        g = ref_grads[k].grad
        torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-11, msg=lambda m: f"{k}: {m}")


# --------------------------------------------------------------------------- (d) errors


@pytest.mark.parametrize("other, match", [
    (dict(use_linear_bias=False), r"lacks 'feed_forward\.w1\.bias' weights: use_linear_bias = False"),
    (dict(round64=False), r"dynamic_dense\.0\.w1\.weight is \(8, 64\).*round64 / expand_last"),
    (dict(n_layer=4), r"it has 4 layers \(layers\.\*\), config\.n_layer = 3"),
    (dict(use_qk_norm=False), r"lacks 'attention\.q_norm' weights: use_qk_norm = False"),
    (dict(intermediate_size=512), r"layers\.0\.feed_forward\.w1\.weight is \(256, 64\).*intermediate_size"),
])
def test_mismatched_checkpoint_names_the_config_field(other, match):
    ckpt = ReferenceMUDDPythia(tiny(**{**RELEASED, **other})).state_dict()
    ours = MUDDPythia(tiny(**RELEASED))
    with pytest.raises(RuntimeError, match="does not fit this MUDDPythiaConfig") as e:
        ours.load_state_dict(ckpt, strict=True)
    assert e.match(match)


def test_checkpoint_of_the_other_family_is_named():
    """A MUDDFormer checkpoint into MUDDPythia, and the reverse, say which class loads it."""
    mf = dict(block_size=64, vocab_size=97, n_layer=3, n_head=4, dim=64, **RELEASED)
    with pytest.raises(RuntimeError, match=r"feed_forward\.w3 \(SwiGLU\) weights: a MUDDFormer checkpoint"):
        MUDDPythia(tiny(**RELEASED)).load_state_dict(ReferenceMUDDFormer(MUDDFormerConfig(**mf)).state_dict())
    with pytest.raises(RuntimeError, match=r"LayerNorm biases \(norm\.bias\): a MUDDPythia checkpoint"):
        MUDDFormer(MUDDFormerConfig(**mf)).load_state_dict(ReferenceMUDDPythia(tiny(**RELEASED)).state_dict())


def test_missing_key_is_reported():
    ckpt = ReferenceMUDDPythia(tiny(**RELEASED)).state_dict()
    del ckpt["layers.1.attention_norms.0.bias"]
    with pytest.raises(RuntimeError, match=r'Missing key\(s\).*"layers\.1\.attention_norms\.0\.bias"'):
        MUDDPythia(tiny(**RELEASED)).load_state_dict(ckpt, strict=True)


@pytest.mark.parametrize("kw, match", [
    (dict(rotary_pct=0.1), r"rotated features per head \(1 of head_dim = dim // n_head = 16\) even and > 0"),
    (dict(rotary_pct=0.0), r"rotated features per head \(0 of head_dim"),
    (dict(dense_type="l"), "crosslayer's MUDDPythia implements the released configuration"),
    (dict(n_local_heads=2), "n_local_heads must equal n_head"),
])
def test_unsupported_config(kw, match):
    with pytest.raises(ValueError, match=match):
        MUDDPythia(tiny(**kw))


# --------------------------------------------------------------------------- GPU


def check_lowp_vs_fp64(device, dtype):
    """Ours on `device` in `dtype` (the fused ops on CUDA) against the float64 CPU
    reference: logits (training forward, and prefill + decode) by DESIGN's policy with
    the reference itself run on `device` in `dtype` as the low-precision oracle;
    gradients by relative 2-norm error (a max is too noisy at bf16), same rule."""
    cfg = tiny(**RELEASED)
    ref, ours = pair(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 37))
    dlogits = torch.randn(2, 37, cfg.vocab_size, dtype=F64)
    ref64 = ref(idx)
    (ref64 * dlogits).sum().backward()
    ref_lp = ReferenceMUDDPythia(cfg).to(device, dtype)
    ref_lp.load_state_dict(ref.state_dict())
    ours = ours.to(device, dtype)
    ic, dc = idx.to(device), dlogits.to(device, dtype)
    out, out_lp = ours(ic), ref_lp(ic)
    assert_policy(f"logits {dtype}", out.cpu(), out_lp.detach().cpu(), ref64.detach())
    (out * dc).sum().backward()
    (out_lp * dc).sum().backward()
    lp_grads, ref_grads = dict(ref_lp.named_parameters()), dict(ref.named_parameters())
    for k, p in ours.named_parameters():
        g64 = ref_grads[k].grad
        err, err_lp = (float((g.cpu().double() - g64).norm() / g64.norm()) for g in (p.grad, lp_grads[k].grad))
        assert err <= 2 * err_lp + 1e-3, f"grad {k} {dtype}: relative error {err:.3e} > 2 x {err_lp:.3e} + 1e-3"
    ours.setup_caches(2, 40)
    steps = [ours(ic[:, :30], torch.arange(30, device=device))]
    steps += [ours(ic[:, t:t + 1], torch.tensor([t], device=device)) for t in range(30, 37)]
    assert_policy(f"prefill+decode {dtype}", torch.cat(steps, 1).cpu(), out_lp.detach().cpu(), ref64.detach())


def test_bf16_cpu_vs_fp64():
    """The low-precision check on CPU (the oracle ops): the dtype plumbing and the
    bounds the GPU test uses."""
    check_lowp_vs_fp64("cpu", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_vs_fp64_cpu(dtype):
    check_lowp_vs_fp64("cuda", dtype)
