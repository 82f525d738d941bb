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
import mudd_model_checks as checks
from mudd_model_checks import F64, RELEASED, Family

FAM = Family(MUDDPythiaConfig, MUDDPythia, ReferenceMUDDPythia)

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

CONFIGS = {
    "released": RELEASED,
    "defaults": {},
    "no_sepln": dict(RELEASED, sepln=False),
    "sequential_no_bias": dict(RELEASED, use_parallel_residual=False, use_linear_bias=False),
    "full_rotary": dict(RELEASED, rotary_pct=1.0),
}


def tiny(**kw):
    return FAM.tiny(**kw)


def pair(cfg, dtype=F64):
    return checks.pair(FAM, cfg, dtype)


shapes = checks.shapes


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
    checks.check_forward(FAM, name, tiny(**CONFIGS[name]))


@pytest.mark.parametrize("name", ["released", "sequential_no_bias"])
def test_prefill_then_decode_matches_full_forward(name):
    checks.check_prefill_decode(FAM, name, tiny(**CONFIGS[name]))


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
    checks.check_gradients(FAM, tiny(**CONFIGS[name], use_gradient_checkpointing=remat))


# --------------------------------------------------------------------------- (d) errors


@pytest.mark.parametrize("other, match", [
    (dict(use_linear_bias=False), r"lacks 'feed_forward\.w1\.bias' weights: use_linear_bias = False"),
    (dict(round64=False), r"dynamic_dense\.0\.w1\.weight is \(8, 64\).*round64 / expand_last"),
    (dict(n_layer=4), r"it has 4 layers \(layers\.\*\), config\.n_layer = 3"),
    (dict(use_qk_norm=False), r"lacks 'attention\.q_norm' weights: use_qk_norm = False"),
    (dict(intermediate_size=512), r"layers\.0\.feed_forward\.w1\.weight is \(256, 64\).*intermediate_size"),
])
def test_mismatched_checkpoint_names_the_config_field(other, match):
    checks.check_mismatched_checkpoint(FAM, other, match)


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
    (dict(rotary_pct=0.1), r"MUDDPythiaConfig\.rotary_pct = 0\.1: expected int\(head_dim·rotary_pct\) rotated "
                           r"features per head \(1 of head_dim = dim // n_head = 16\) even and > 0"),
    (dict(rotary_pct=0.0), r"MUDDPythiaConfig\.rotary_pct = 0\.0: expected a number in \(0, 1\]"),
    (dict(dense_type="l"), "crosslayer's MUDDPythia implements the released configuration"),
    (dict(n_local_heads=2), "n_local_heads must equal n_head"),
])
def test_unsupported_config(kw, match):
    with pytest.raises(ValueError, match=match):
        MUDDPythia(tiny(**kw))


# --------------------------------------------------------------------------- GPU




def test_bf16_cpu_vs_fp64():
    """The low-precision check on CPU (the oracle ops): the dtype plumbing and the
    bounds the GPU test uses."""
    checks.check_lowp_vs_fp64(FAM, "cpu", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_vs_fp64_cpu(gpu_device, dtype):
    checks.check_lowp_vs_fp64(FAM, gpu_device("mudd_weights", "depth_aggregate", "depth_aggregate_qkv_norm"), dtype)
