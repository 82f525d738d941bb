"""crosslayer.models.MUDDFormer against the released MUDDFormer.

The oracle is tests/muddformer_reference.py, a transcription of the release's
modeling_muddformer.py (training / prefill forward). On tiny random configs:
  (a) state_dict keys and shapes equal the reference's, plus hand-computed widths for
      the tiny config and for the released 2.8B config.json (built on the meta device);
  (b) the reference's random state_dict loads with strict=True, and the logits match
      in float64 (1e-10) and float32 (DESIGN's policy vs the reference in float32): the training forward, and a prefill followed by decode
      steps, against the reference's full forward;
  (c) every parameter's gradient matches the reference's autograd (float64), also
      with gradient checkpointing; no saved activation holds a stack of depth slots;
  (d) mismatched checkpoints and bad calls fail with messages naming the cause.
GPU tests (bf16 and fp32 on CUDA vs the float64 CPU reference) skip without CUDA.
"""

import pytest
import torch

from crosslayer.models import MUDDFormer, MUDDFormerConfig
from muddformer_reference import ReferenceMUDDFormer
import mudd_model_checks as checks
from mudd_model_checks import F64, RELEASED, Family

FAM = Family(MUDDFormerConfig, MUDDFormer, ReferenceMUDDFormer)

# The released MUDDFormer-2.8B config.json (Caiyun-AI/MUDDFormer pytorch/muddformer).
RELEASED_2P8B = {
    "architectures": ["MUDDFormer"],
    "auto_map": {"AutoConfig": "configuration_muddformer.MUDDFormerConfig",
                 "AutoModelForCausalLM": "modeling_muddformer.MUDDFormer"},
    "block_size": 2048, "bos_token_id": 1, "dense": True, "dense_type": "qkvr", "dim": 2560,
    "dynamic_dense": True, "eos_token_id": 2, "expand_last": True, "head_dim": 80,
    "intermediate_size": 6912, "is_training": False, "model_type": "muddformer", "n_head": 32,
    "n_layer": 32, "n_local_heads": 32, "norm_eps": 1e-06, "rope_base": 10000, "round64": True,
    "sepln": True, "stack_hidden": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.35.0", "use_gradient_checkpointing": False, "use_layer_cache": True,
    "use_qk_norm": True, "vocab_size": 50432,
}

CONFIGS = {
    "released": RELEASED,
    "defaults": {},
    "no_sepln": dict(RELEASED, sepln=False),
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
    assert shapes(MUDDFormer(cfg)) == shapes(ReferenceMUDDFormer(cfg))


def test_state_dict_tiny_widths():
    """Hand-computed from the release's rules for L=3, dim 64, released flags."""
    s = shapes(MUDDFormer(tiny(**RELEASED)))
    # top 3; per layer wq wk wv wo q_norm k_norm, w1 w3 w2, ffn_norm; attention norms
    # 1 + 3 + 3; dense_bs 3; DA MLPs 2 per layer
    assert len(s) == 3 + 3 * 10 + 7 + 3 + 3 * 2
    # DA MLP: C·l = 8, 12, then 1·4·4 (expand_last) = 16; round64 always rounds up to 64
    assert [s[f"dynamic_dense.{i}.w1.weight"] for i in range(3)] == [(64, 64)] * 3
    assert [s[f"dynamic_dense.{i}.w2.weight"] for i in range(3)] == [(8, 64), (12, 64), (4, 64)]
    assert [s[f"dense_bs.{i}"] for i in range(3)] == [(4, 2), (4, 3), (1, 4)]
    # FFN: intermediate 256 (2/3 of 4·64 up to 256) × (i/2 + 1/2), rounded to 128
    assert [s[f"layers.{i}.feed_forward.w1.weight"] for i in range(3)] == [(128, 64), (256, 64), (384, 64)]
    assert s["layers.0.attention_norm.weight"] == (64,)
    assert "layers.0.attention_norms.0.weight" not in s
    assert s["layers.2.attention_norms.2.weight"] == (64,)
    assert s["layers.1.attention.q_norm.weight"] == (16,)
    assert s["tok_embeddings.weight"] == s["output.weight"] == (97, 64)


def test_released_2p8b_config_shapes():
    """The released config.json builds the 2.8B tree (meta device: no memory); DA widths
    as in shared/notes/mudd.md: hidden/out i=0 64/8, i=14 128/64, i=30 192/128, last 192/33."""
    cfg = MUDDFormerConfig.from_dict(RELEASED_2P8B)
    assert (cfg.head_dim, cfg.intermediate_size, cfg.n_local_heads) == (80, 6912, 32)
    with torch.device("meta"):
        m = MUDDFormer(cfg)
    s = shapes(m)
    for i, (hid, out) in {0: (64, 8), 14: (128, 64), 30: (192, 128), 31: (192, 33)}.items():
        assert s[f"dynamic_dense.{i}.w1.weight"] == (hid, 2560)
        assert s[f"dynamic_dense.{i}.w2.weight"] == (out, hid)
    assert s["dense_bs.31"] == (1, 33)
    da = sum(p.numel() for n, p in m.named_parameters() if n.startswith(("dynamic_dense", "dense_bs")))
    assert abs(da - 8.78e6) < 0.01e6


def test_config_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown MUDDFormerConfig field\(s\) \['rotary_pct'\]"):
        MUDDFormerConfig.from_dict({**RELEASED_2P8B, "rotary_pct": 0.25})


# --------------------------------------------------------------------------- (b) logits


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_matches_release(name):
    checks.check_forward(FAM, name, tiny(**CONFIGS[name]))


@pytest.mark.parametrize("name", ["released", "defaults"])
def test_prefill_then_decode_matches_full_forward(name):
    """Prefill, then decode one token at a time (mudd_model_checks.check_prefill_decode);
    the caches have the requested sizes (max_seq_length rounded up to a multiple of 8)."""

    def sizes(m):
        assert m.max_seq_length == 24 and m.layer_cache.shape == (4, 3, 1, 64)

    checks.check_prefill_decode(FAM, name, tiny(**CONFIGS[name]), sizes)


def test_decode_layer_cache_holds_the_depth_stack():
    """After a decode step the layer cache holds the embedding and every block's output
    (the release's LBTD cache), for the batch rows the step ran on."""
    cfg = tiny(**RELEASED)
    ref, ours = pair(cfg)
    ours.setup_caches(2, 8)
    idx = torch.randint(0, cfg.vocab_size, (1, 4))
    ours(idx[:, :3], torch.arange(3))
    ours(idx[:, 3:], torch.tensor([3]))
    hids = []
    for layer in ref.layers:
        layer.register_forward_hook(lambda m, i, o: hids.append(o[:, -1:]))
    ref(idx)
    want = torch.stack([ref.tok_embeddings(idx[:, 3:])] + hids)
    torch.testing.assert_close(ours.layer_cache[:, :1], want, rtol=0, atol=1e-10)
    assert ours.layer_cache[:, 1].abs().max() == 0  # batch row 1 untouched


# --------------------------------------------------------------------------- (c) grads


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("remat", [False, True])
def test_gradients_match_release(name, remat):
    checks.check_gradients(FAM, tiny(**CONFIGS[name], use_gradient_checkpointing=remat))


def test_training_saves_no_stack_of_depth_slots():
    """Autograd saves no tensor larger than 4·N·D (the 4 ways) although the stack has
    up to L + 1 = 7 slots: the depth stack lives in one DepthStack buffer, outside the
    saved tensors (and its backward adds into one gradient buffer)."""
    cfg = tiny(n_layer=6, intermediate_size=192)  # FFN widths 128..256 = 4·D
    ours = MUDDFormer(cfg).double()
    params = {p.untyped_storage().data_ptr() for p in ours.parameters()}
    B, T = 2, 11
    sizes = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:  # activations only
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = ours(torch.randint(0, cfg.vocab_size, (B, T)))
    assert max(sizes) <= 4 * B * T * cfg.dim
    logits.sum().backward()


def test_fresh_model_starts_as_residual_stream():
    """Identity start: every connection returns its newest slot, so the model equals a
    plain pre-norm transformer (run here through the reference with those weights)."""
    cfg = tiny(**RELEASED)
    ours = MUDDFormer(cfg).double()
    for i, b in enumerate(ours.dense_bs):
        assert torch.equal(b, torch.eye(b.shape[1], dtype=F64)[-1].expand_as(b))
        assert ours.dynamic_dense[i].w2.weight.abs().max() == 0
    ref = ReferenceMUDDFormer(cfg).double()
    ref.load_state_dict(ours.state_dict(), strict=True)
    idx = torch.randint(0, cfg.vocab_size, (1, 7))
    torch.testing.assert_close(ours(idx), ref(idx), rtol=0, atol=1e-10)


# --------------------------------------------------------------------------- (d) errors


@pytest.mark.parametrize("other, match", [
    (dict(round64=False), r"dynamic_dense\.0\.w1\.weight is \(8, 64\).*round64 / expand_last"),
    (dict(n_layer=4), r"it has 4 layers \(layers\.\*\), config\.n_layer = 3"),
    (dict(use_qk_norm=False), r"lacks 'attention\.q_norm' weights: use_qk_norm = False"),
    (dict(sepln=False), r"sepln = False, config\.sepln = True"),
    (dict(dim=32, n_head=2), r"tok_embeddings\.weight is \(97, 32\), config \(vocab_size, dim\) = \(97, 64\)"),
    (dict(intermediate_size=512), r"layers\.0\.feed_forward\.w1\.weight is \(256, 64\).*intermediate_size"),
])
def test_mismatched_checkpoint_names_the_config_field(other, match):
    checks.check_mismatched_checkpoint(FAM, other, match)


def test_missing_key_is_reported():
    ckpt = ReferenceMUDDFormer(tiny(**RELEASED)).state_dict()
    del ckpt["dense_bs.1"]
    with pytest.raises(RuntimeError, match=r'Missing key\(s\).*"dense_bs\.1"'):
        MUDDFormer(tiny(**RELEASED)).load_state_dict(ckpt, strict=True)


def test_non_strict_load_adds_no_hints():
    ckpt = ReferenceMUDDFormer(tiny(**RELEASED)).state_dict()
    del ckpt["layers.2.ffn_norm.weight"]
    ckpt["extra"] = torch.zeros(1)
    res = MUDDFormer(tiny(**RELEASED)).load_state_dict(ckpt, strict=False)
    assert res.missing_keys == ["layers.2.ffn_norm.weight"] and res.unexpected_keys == ["extra"]


@pytest.mark.parametrize("kw, match", [
    (dict(dense_type="l"), "dense_type='qkvr'"),
    (dict(dynamic_dense=False), "dynamic_dense=True"),
    (dict(n_local_heads=2), "n_local_heads must equal n_head"),
    (dict(n_layer=1), r"MUDDFormerConfig\.n_layer = 1: expected an int in \[2, 127\]"),
])
def test_unsupported_config(kw, match):
    with pytest.raises(ValueError, match=match):
        MUDDFormer(tiny(**kw))


def test_bad_calls():
    m = MUDDFormer(tiny())
    idx = torch.randint(0, 97, (2, 5))
    with pytest.raises(RuntimeError, match="call setup_caches"):
        m(idx, torch.arange(5))
    m.setup_caches(2, 8)
    with pytest.raises(ValueError, match=r"input_pos must be \(5,\) integer positions"):
        m(idx, torch.arange(4))
    with pytest.raises(ValueError, match="exceeds the caches: max_batch_size = 2"):
        m(torch.randint(0, 97, (3, 1)), torch.tensor([0]))
    with pytest.raises(ValueError, match="token ids"):
        m(idx.float())
    with pytest.raises(ValueError, match="exceed block_size = 64"):
        m(torch.randint(0, 97, (1, 65)))
    with pytest.raises(ValueError, match="max_seq_length must be <= block_size"):
        m.setup_caches(1, 65)
    m.double()
    with pytest.raises(RuntimeError, match="call setup_caches again"):
        m(idx[:, :1], torch.tensor([0]))


# --------------------------------------------------------------------------- GPU




def test_bf16_cpu_vs_fp64():
    """The low-precision check on CPU (the oracle ops): the dtype plumbing and the
    bounds the GPU test uses."""
    checks.check_lowp_vs_fp64(FAM, "cpu", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_vs_fp64_cpu(gpu_device, dtype):
    checks.check_lowp_vs_fp64(FAM, gpu_device("mudd_weights", "depth_aggregate", "depth_aggregate_qkv_norm"), dtype)
