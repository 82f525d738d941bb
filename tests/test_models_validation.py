"""Bad inputs to the models (crosslayer.models) fail at the call with a message naming
the argument or config field; and chunked prefill, which they used to get wrong, works.

  (a) MUDDFormer / MUDDPythia cached inference: a prefill chunk that continues the
      cache (positions start > 0) attends causally to the cached positions and itself:
      chunked prefill + decode equals the training forward (and the reference);
      input_pos outside [0, max_seq_length), non-increasing or with a gap, not an
      integer tensor, or starting past what the cache holds, is a ValueError.
  (b) Configs (MUDDFormerConfig, MUDDPythiaConfig, LMConfig, one shared helper): wrong
      JSON types (a str, None, a float such as 64.0, a bool) are a TypeError and values
      out of range (sizes < 1, an intermediate_size that rounds an FFN to zero width)
      a ValueError, at construction, naming <Class>.<field>; a config changed after
      construction is caught by the model.
  (c) Forward inputs: an out-of-vocabulary token id (CrossLayerLM, MUDDFormer), an
      empty batch or sequence (CrossLayerLM) is a ValueError naming it.
  (d) The MUDD checkpoint-hint hook leaves a key layers.<not a number>... and a value
      that is no tensor to load_state_dict's own error report.
"""

import re

import numpy as np
import pytest
import torch

from crosslayer.models import CrossLayerLM, LMConfig, MUDDFormer, MUDDFormerConfig, MUDDPythia, MUDDPythiaConfig
from muddformer_reference import ReferenceMUDDFormer
from muddpythia_reference import ReferenceMUDDPythia
import mudd_model_checks as checks
from mudd_model_checks import F64, RELEASED, Family
from policy import assert_policy

FAMS = {"muddformer": Family(MUDDFormerConfig, MUDDFormer, ReferenceMUDDFormer),
        "muddpythia": Family(MUDDPythiaConfig, MUDDPythia, ReferenceMUDDPythia)}
TINY = dict(block_size=64, vocab_size=97, n_layer=3, n_head=4, dim=64)


def _re(v):
    """A regex matching repr(v)."""
    return re.escape(repr(v))


@pytest.fixture(params=list(FAMS))
def fam(request):
    return FAMS[request.param]


def cached_model(fam, max_seq_length=16, dtype=torch.float32, **kw):
    m = fam.model(fam.tiny(**kw)).to(dtype)
    m.setup_caches(2, max_seq_length)
    return m


# ------------------------------------------------------------ (a) cached inference


def test_chunked_prefill_and_decode_match_training_forward(fam):
    """Chunks 0..3, 4..6, a decode step at 7, then 8..10 (each continuing the cache):
    the logits equal the reference's full forward, float64 to 1e-10, float32 by
    DESIGN's policy. (Before: a chunk at start > 0 attended only within itself, with no
    causal mask: off by ~0.4.)"""
    cfg = fam.tiny(**RELEASED)
    ref, ours = checks.pair(fam, cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 11))
    ref64, ref32 = ref(idx).detach(), ref.float()(idx).detach()
    spans = [(0, 4), (4, 7), (7, 8), (8, 11)]
    for dtype in (F64, torch.float32):
        ours.to(dtype).setup_caches(max_batch_size=2, max_seq_length=16)
        out = torch.cat([ours(idx[:, a:b], torch.arange(a, b)) for a, b in spans], 1)
        if dtype == F64:
            torch.testing.assert_close(out, ref64, rtol=0, atol=1e-10)
            torch.testing.assert_close(out, ours(idx), rtol=0, atol=1e-10)
        else:
            assert_policy("chunked prefill", out, ref32, ref64)


def test_a_new_sequence_rewinds_the_cache(fam):
    """start = 0 begins a new sequence over an old one; a smaller start rewinds."""
    m = cached_model(fam, dtype=F64)
    a, b = torch.randint(0, 97, (2, 1, 9))
    m(a, torch.arange(9))
    out = torch.cat([m(b[:, :5], torch.arange(5)), m(b[:, 5:], torch.arange(5, 9))], 1)
    torch.testing.assert_close(out, m(b), rtol=0, atol=1e-10)
    out = m(a[:, 3:6], torch.arange(3, 6))  # rewind into b: positions 0..2 are b's
    torch.testing.assert_close(out, m(torch.cat([b[:, :3], a[:, 3:6]], 1))[:, 3:], rtol=0, atol=1e-10)


def test_chunk_past_the_cache_is_refused(fam):
    """A chunk may only start where the cache's written positions end, per batch row.
    (Before: computed, attending to unwritten cache rows.)"""
    m = cached_model(fam)
    idx = torch.randint(0, 97, (2, 4))
    with pytest.raises(ValueError, match=r"input_pos must continue the cache: it holds no positions for batch "
                                         r"rows 0\.\.1, so input_pos must start at 0, got start 4"):
        m(idx, torch.arange(4, 8))
    m(idx[:1], torch.arange(4))  # row 0 only
    m(idx[:1, :1], torch.tensor([4]))
    with pytest.raises(ValueError, match=r"it holds positions 0\.\.4 for batch row 0, so input_pos can start at "
                                         r"0\.\.5 \(a smaller start rewinds\), got start 7"):
        m(idx[:1, :2], torch.tensor([7, 8]))
    with pytest.raises(ValueError, match=r"it holds no positions for batch rows 0\.\.1.*got start 5"):
        m(idx[:, :1], torch.tensor([5]))  # row 1 holds nothing


@pytest.mark.parametrize("pos, match", [
    ([-1], r"input_pos must lie in \[0, 16\) \(max_seq_length of the caches.*got position -1"),
    ([16], r"input_pos must lie in \[0, 16\).*got position 16"),
    ([70], r"input_pos must lie in \[0, 16\).*got position 70"),
    ([14, 15, 16], r"input_pos must lie in \[0, 16\).*got positions 14\.\.16"),
    ([-2, -1, 0], r"input_pos must lie in \[0, 16\).*got positions -2\.\.0"),
    ([2, 1, 0], r"input_pos must be consecutive positions .* in \[0, 16\); got non-increasing: "
                r"input_pos\[0\] = 2, input_pos\[1\] = 1"),
    ([0, 1, 1], r"got non-increasing: input_pos\[1\] = 1, input_pos\[2\] = 1"),
    ([0, 2, 3], r"input_pos must be consecutive.*got not consecutive \(a gap\): input_pos\[0\] = 0, "
                r"input_pos\[1\] = 2"),
])
def test_input_pos_out_of_range_or_not_consecutive(fam, pos, match):
    """(Before: -1 and non-consecutive positions were accepted, a position past the
    cache was a raw IndexError from the cache or the RoPE table.)"""
    m = cached_model(fam)
    idx = torch.randint(0, 97, (1, len(pos)))
    with pytest.raises(ValueError, match=match):
        m(idx, torch.tensor(pos))


def test_input_pos_limit_is_the_rope_table_when_the_cache_rounds_past_it(fam):
    """max_seq_length is rounded up to a multiple of 8 (18 -> 24) but block_size = 20
    rows of RoPE exist: positions stop at 20. (Before: IndexError from the RoPE table.)"""
    m = cached_model(fam, max_seq_length=18, block_size=20)
    m(torch.randint(0, 97, (1, 20)), torch.arange(20))
    with pytest.raises(ValueError, match=r"input_pos must lie in \[0, 20\).*block_size = 20\), got position 20"):
        m(torch.randint(0, 97, (1, 1)), torch.tensor([20]))


@pytest.mark.parametrize("pos, got", [
    (torch.tensor([False]), r"torch\.bool of shape \(1,\)"),
    (torch.tensor([0.0]), r"torch\.float32 of shape \(1,\)"),
    (torch.tensor([0j]), r"torch\.complex64 of shape \(1,\)"),
    (torch.tensor(0), r"torch\.int64 of shape \(\)"),
    ([0], "list"),
    (0, "int"),
])
def test_input_pos_must_be_an_integer_tensor(fam, pos, got):
    """(Before: a bool tensor was an IndexError, a list or an int an AttributeError.)"""
    m = cached_model(fam)
    with pytest.raises(ValueError, match=r"input_pos must be \(1,\) integer positions for idx of shape "
                                         r"\(1, 1\), got " + got):
        m(torch.zeros(1, 1, dtype=torch.long), pos)


def test_input_pos_of_any_integer_dtype(fam):
    m = cached_model(fam, dtype=F64)
    idx = torch.randint(0, 97, (1, 5))
    want = m(idx)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        torch.testing.assert_close(m(idx, torch.arange(5, dtype=dtype)), want, rtol=0, atol=1e-10)


# ------------------------------------------------------------ (b) configs


CONFIG_CASES = [
    # field, value, exception, what the message expects
    ("dim", "64", TypeError, r"expected an int, got str"),
    ("dim", None, TypeError, r"expected an int, got NoneType"),
    ("dim", 64.0, TypeError, r"expected an int, got float"),
    ("dim", -64, ValueError, r"expected an int >= 1"),
    ("dim", 0, ValueError, r"expected an int >= 1"),
    ("dim", 65, ValueError, r"expected a multiple of n_head = 4"),
    ("n_layer", True, TypeError, r"expected an int, got bool"),
    ("n_layer", 200, ValueError, r"expected an int in \[2, 127\]"),
    ("vocab_size", 0, ValueError, r"expected an int >= 1"),
    ("block_size", -1, ValueError, r"expected an int >= 1"),
    ("n_head", 0, ValueError, r"expected an int >= 1"),
    ("n_local_heads", 0, ValueError, r"expected -1 or >= 1"),
    ("intermediate_size", "256", TypeError, r"expected an int or None, got str"),
    ("intermediate_size", -5, ValueError, r"expected an int >= 1"),
    ("rope_base", "1e4", TypeError, r"expected a finite number \(int or float\), got str"),
    ("rope_base", 0.0, ValueError, r"expected a number > 0"),
    ("norm_eps", float("nan"), ValueError, r"expected a finite number"),
    ("norm_eps", -1e-6, ValueError, r"expected a number >= 0"),
    ("use_qk_norm", "yes", TypeError, r"expected a bool \(True / False\), got str"),
    ("sepln", 1, TypeError, r"expected a bool \(True / False\), got int"),
    ("dense_type", None, TypeError, r"expected a str, got NoneType"),
    ("pad_token_id", 1.5, TypeError, r"expected an int or None, got float"),
]


@pytest.mark.parametrize("field, value, exc, expected", CONFIG_CASES)
@pytest.mark.parametrize("cls", [MUDDFormerConfig, MUDDPythiaConfig])
def test_mudd_config_field_types_and_ranges(cls, field, value, exc, expected):
    """At construction and through from_dict (a config.json), the message names the
    class, the field and the value. (Before: built, or failed inside the model with
    e.g. "unsupported operand type(s) for /: 'str' and 'int'".)"""
    msg = rf"{cls.__name__}\.{field} = {_re(value)}: {expected}"
    with pytest.raises(exc, match=msg):
        cls(**{**TINY, field: value})
    with pytest.raises(exc, match=msg):
        cls.from_dict({**TINY, field: value})


@pytest.mark.parametrize("cls", [MUDDFormerConfig, MUDDPythiaConfig])
@pytest.mark.parametrize("size", [1, 100, 128])
def test_intermediate_size_that_rounds_an_ffn_to_zero_width(cls, size):
    """Layer 0's width round(I/2 / 128)·128 is 0 for I <= 128. (Before: built a model
    with a (0, dim) FFN.)"""
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.intermediate_size = {size}: expected an int >= "
                                         rf"129: layers \[0[^]]*\] would get a zero-width FFN"):
        cls(**TINY, intermediate_size=size)
    assert cls(**TINY, intermediate_size=129).intermediate_size == 129


def test_mudd_config_rotary_checks():
    with pytest.raises(ValueError, match=r"MUDDPythiaConfig\.rotary_pct = 1\.5: expected a number in \(0, 1\]"):
        MUDDPythiaConfig(**TINY, rotary_pct=1.5)
    with pytest.raises(ValueError, match=r"MUDDFormerConfig\.dim = 36: expected dim // n_head \(head_dim = 9\) "
                                         r"even"):
        MUDDFormerConfig(**{**TINY, "dim": 36})


def test_config_values_are_normalised():
    """Integral types (numpy) become int, ints in float fields float; the released JSON's
    "rope_base": 10000 is fine."""
    cfg = MUDDFormerConfig(**{**TINY, "dim": np.int64(64), "rope_base": 10000})
    assert type(cfg.dim) is int and type(cfg.rope_base) is float
    lm = LMConfig(d_model=np.int32(64), rope_theta=500)
    assert type(lm.d_model) is int and type(lm.rope_theta) is float


@pytest.mark.parametrize("model, cfg, field, value, exc", [
    (MUDDFormer, lambda: MUDDFormerConfig(**TINY), "dim", "64", TypeError),
    (MUDDPythia, lambda: MUDDPythiaConfig(**TINY), "intermediate_size", 64, ValueError),
    (CrossLayerLM, lambda: LMConfig(d_model=32, n_heads=2), "ffn_hidden", 0, ValueError),
])
def test_config_changed_after_construction_is_checked_by_the_model(model, cfg, field, value, exc):
    c = cfg()
    setattr(c, field, value)
    with pytest.raises(exc, match=rf"{type(c).__name__}\.{field} = {_re(value)}: expected"):
        model(c)


LM_CASES = [
    ("d_model", "32", TypeError, r"expected an int, got str"),
    ("d_model", 32.0, TypeError, r"expected an int, got float"),
    ("d_model", None, TypeError, r"expected an int, got NoneType"),
    ("n_layers", 0, ValueError, r"expected an int >= 1"),
    ("ffn_hidden", 0, ValueError, r"expected an int >= 1 \(the SwiGLU width\)"),
    ("ffn_hidden", -5, ValueError, r"expected an int >= 1"),
    ("ffn_hidden", 64.0, TypeError, r"expected an int or None, got float"),
    ("hc_streams", 17, ValueError, r"expected an int in \[1, 16\]"),
    ("mhc_iters", 0, ValueError, r"expected an int >= 1"),
    ("dwa_period", 0, ValueError, r"expected an int >= 1"),
    ("norm_eps", -1.0, ValueError, r"expected a number >= 0"),
    ("rope_theta", 0.0, ValueError, r"expected a number > 0"),
    ("init_std", float("inf"), ValueError, r"expected a finite number"),
    ("tie_embeddings", "no", TypeError, r"expected a bool \(True / False\), got str"),
    ("activation_checkpointing", 1, TypeError, r"expected a bool \(True / False\), got int"),
    ("connection", None, TypeError, r"expected a str, got NoneType"),
]


@pytest.mark.parametrize("field, value, exc, expected", LM_CASES)
def test_lm_config_field_types_and_ranges(field, value, exc, expected):
    """(Before: ffn_hidden=0, norm_eps < 0, rope_theta = 0, a str flag built; ffn_hidden
    64.0 or -5 failed in torch; the messages did not name LMConfig.)"""
    with pytest.raises(exc, match=rf"LMConfig\.{field} = {_re(value)}: {expected}"):
        LMConfig(**{"d_model": 32, "n_heads": 2, field: value})


def test_lm_config_depth_limit():
    with pytest.raises(ValueError, match=r"LMConfig\.n_layers = 200: expected an int <= 127 with connection 'mudd'"):
        LMConfig(d_model=32, n_heads=2, n_layers=200, connection="mudd")
    assert LMConfig(d_model=32, n_heads=2, n_layers=200).n_layers == 200  # residual: no depth stack


# ------------------------------------------------------------ (c) forward inputs


def tiny_lm(**kw):
    return CrossLayerLM(LMConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, **kw))


@pytest.mark.parametrize("bad, first", [(61, "idx[0, 2] = 61"), (-1, "idx[0, 2] = -1"), (10**6, "idx[0, 2] = 1000000")])
def test_out_of_vocabulary_ids(bad, first):
    """(Before: IndexError: index out of range in self.)"""
    idx = torch.tensor([[1, 2, bad, 3]])
    lo, hi = min(bad, 1), max(bad, 3)
    with pytest.raises(ValueError, match=rf"CrossLayerLM: token ids must be in \[0, vocab_size = 61\), got ids "
                                         rf"in \[{lo}, {hi}\] \(first: {re.escape(first)}\)"):
        tiny_lm()(idx)
    m = MUDDFormer(MUDDFormerConfig(**TINY))
    idx97 = torch.tensor([[1, 2, bad + 36 if bad > 0 else bad, 3]])
    with pytest.raises(ValueError, match=r"MUDDFormer: token ids must be in \[0, vocab_size = 97\)"):
        m(idx97)
    m.setup_caches(1, 8)
    with pytest.raises(ValueError, match=r"MUDDFormer: token ids must be in \[0, vocab_size = 97\)"):
        m(idx97, torch.arange(4))


def test_token_id_check_can_be_skipped():
    m = tiny_lm()
    m.validate_token_ids = False
    with pytest.raises(IndexError):  # the embedding's own error
        m(torch.tensor([[61]]))


@pytest.mark.parametrize("shape", [(2, 0), (0, 4), (0, 0)])
def test_empty_batch_or_sequence(shape):
    """(Before: "cannot reshape tensor of 0 elements" from the attention.)"""
    for connection in ("residual", "mudd"):
        with pytest.raises(ValueError, match=rf"CrossLayerLM: idx has no tokens \(shape {re.escape(str(shape))}\)"):
            tiny_lm(connection=connection)(torch.zeros(shape, dtype=torch.long))
    m = MUDDFormer(MUDDFormerConfig(**TINY))
    assert m(torch.zeros(shape, dtype=torch.long)).shape == (*shape, 97)  # the training forward handles it
    m.setup_caches(1, 8)
    with pytest.raises(ValueError, match=r"MUDDFormer: idx has no tokens"):
        m(torch.zeros(shape, dtype=torch.long), torch.arange(shape[1]))


@pytest.mark.parametrize("idx", [torch.zeros(1, 3, dtype=torch.bool), torch.zeros(1, 3, dtype=torch.int16),
                                 [[1, 2]]])
def test_idx_type(idx):
    for m in (tiny_lm(), MUDDFormer(MUDDFormerConfig(**TINY))):
        with pytest.raises(ValueError, match=r"idx must be \(batch, seq\) int64 \(or int32\) token ids"):
            m(idx)


# ------------------------------------------------------------ (d) checkpoint hints


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd.update({"layers.x.attention.wq.weight": torch.zeros(1)}),
     r'Unexpected key\(s\) in state_dict: "layers\.x\.attention\.wq\.weight"'),
    (lambda sd: sd.update({"layers": torch.zeros(1), "layers.": torch.zeros(1), "layers.1x.w": torch.zeros(1)}),
     r'Unexpected key\(s\) in state_dict: "layers", "layers\.", "layers\.1x\.w"'),
    (lambda sd: sd.update({"tok_embeddings.weight": [1, 2]}),
     r'While copying the parameter named "tok_embeddings\.weight", expected torch\.Tensor'),
    (lambda sd: sd.update({"layers.0.feed_forward.w1.weight": 3.0}),
     r'While copying the parameter named "layers\.0\.feed_forward\.w1\.weight", expected torch\.Tensor'),
])
def test_checkpoint_hints_leave_unreadable_entries_to_load_state_dict(fam, edit, match):
    """(Before: the hint hook itself raised ValueError: invalid literal for int() with
    base 10: 'x', or AttributeError: 'list' object has no attribute 'shape'.)"""
    m = fam.model(fam.tiny())
    sd = dict(m.state_dict())
    edit(sd)
    with pytest.raises(RuntimeError, match=match) as e:
        m.load_state_dict(sd, strict=True)
    assert "does not fit" not in str(e.value)  # no spurious hint: the structure fits


def test_checkpoint_hints_still_count_layers_beside_a_bad_key(fam):
    m = fam.model(fam.tiny())
    sd = fam.model(fam.tiny(n_layer=4)).state_dict()
    sd["layers.x"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"it has 4 layers \(layers\.\*\), config\.n_layer = 3"):
        m.load_state_dict(sd, strict=True)


# ------------------------------------------------------------ GPU


@pytest.mark.gpu
def test_gpu_validation_and_chunked_prefill(gpu_device):
    """On CUDA: an out-of-vocabulary id is a ValueError (not a device-side assert, which
    would end the process's CUDA context), input_pos is checked, and chunked prefill +
    decode equals the training forward (float32)."""
    dev = gpu_device("mudd_weights", "depth_aggregate", "depth_aggregate_qkv_norm")
    lm = tiny_lm().to(dev)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, vocab_size = 61\)"):
        lm(torch.tensor([[1, 61]], device=dev))
    m = MUDDFormer(MUDDFormerConfig(**TINY, **RELEASED)).to(dev)
    with torch.no_grad():
        for p in m.dynamic_dense.parameters():
            p.add_(0.1 * torch.randn_like(p))
    idx = torch.randint(0, 97, (2, 11), device=dev)
    with torch.no_grad():
        want = m(idx)
    m.setup_caches(2, 16)
    out = torch.cat([m(idx[:, a:b], torch.arange(a, b, device=dev)) for a, b in [(0, 4), (4, 7), (7, 8), (8, 11)]], 1)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"input_pos must lie in \[0, 16\)"):
        m(idx[:, :1], torch.tensor([-1], device=dev))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, vocab_size = 97\)"):
        m(torch.full((1, 1), 97, device=dev), torch.tensor([0], device=dev))
    lm(torch.tensor([[1, 60]], device=dev))  # the context still works
