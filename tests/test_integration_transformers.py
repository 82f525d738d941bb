"""crosslayer.integrations.transformers on Hugging Face's DeepSeek-V4 (tiny random configs,
CPU): the accelerated model against the model's own forward in float64 (logits and every
parameter gradient), greedy generate() with its cache, restore(), strict mode, and
refusals."""

import copy
import os

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.23.0")
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM  # noqa: E402

from transformers.models.deepseek_v4 import modeling_deepseek_v4 as dsv4  # noqa: E402

from crosslayer.integrations import transformers as cl_hf  # noqa: E402

F64 = torch.float64


@pytest.fixture
def model_math_in_float64():
    """The model's own forward at float64 (its float32 casts lifted): the reference."""
    with cl_hf.model_math_in_float64():
        yield


def test_model_math_in_float64_lifts_and_restores_the_casts():
    """Inside the block a float64 connection's coefficients keep float64 (its own
    forward rounds them through float32); after it the model's forward is back, bit for
    bit."""
    hc = tiny_model().model.layers[0].attn_hc
    H = torch.randn(2, 3, 4, 64, dtype=F64)
    own = hc(H)
    with cl_hf.model_math_in_float64():
        lifted = hc(H)
    assert 0 < (lifted[1] - own[1]).abs().max() < 1e-5  # comb: float32's rounding, gone
    assert all(torch.equal(a, b) for a, b in zip(hc(H), own))


def tiny_config(hc_mult=4, layers=2):
    cfg = DeepseekV4Config(
        hidden_size=64, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        q_lora_rank=32, o_lora_rank=32, o_groups=1, qk_rope_head_dim=16, index_head_dim=16, index_n_heads=2,
        index_topk=8, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        vocab_size=101, hc_mult=hc_mult, num_nextn_predict_layers=0, default_num_hash_layers=0, sliding_window=8,
        max_position_embeddings=256)
    cfg._experts_implementation = "eager"  # grouped_mm has no float64
    return cfg


def tiny_model(hc_mult=4, layers=2, seed=0):
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(tiny_config(hc_mult, layers)).to(F64)
    with torch.no_grad():  # the init leaves base at 0 and scale at 1: make every term count
        for name, p in model.named_parameters():
            if name.endswith(("hc.base", "hc.scale", "hc_base", "hc_scale")):
                p.add_(0.3 * torch.randn_like(p))
    return model


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(ids).logits
    (logits * torch.linspace(-1, 1, logits.shape[-1], dtype=logits.dtype)).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("hc_mult", [2, 4])
def test_float64_logits_and_gradients_match_the_model(model_math_in_float64, hc_mult):
    model = tiny_model(hc_mult, layers=3)
    ids = torch.randint(0, 101, (2, 9))
    want_logits, want_grads = loss_and_grads(model, ids)
    report = cl_hf.accelerate(model, strict=True)
    assert sorted(report.accelerated) == ["model.hc_head"] + [f"model.layers.{i}" for i in range(3)]
    assert not report.unsupported
    assert report.fused_boundaries == ["model.layers.0 -> model.layers.1", "model.layers.1 -> model.layers.2"]
    assert type(model.model.layers[0]) is cl_hf.FusedDeepseekV4DecoderLayer
    got_logits, got_grads = loss_and_grads(model, ids)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-10, atol=1e-10)
    assert got_grads.keys() == want_grads.keys()
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-9, atol=1e-10, msg=name)


def count_connection_ops(monkeypatch) -> dict:
    """Calls of each crosslayer op the decoder layers use, counted as the model runs."""
    from crosslayer import ops

    calls = dict.fromkeys(("mhc_pre_for_post", "mhc_boundary", "hc_post"), 0)
    for name in calls:
        def counted(*args, _op=getattr(ops, name), _name=name, **kwargs):
            calls[_name] += 1
            return _op(*args, **kwargs)
        monkeypatch.setattr(ops, name, counted)
    return calls


@pytest.mark.parametrize("checkpointing", [False, True])
def test_boundaries_fused_unless_checkpointed(model_math_in_float64, monkeypatch, checkpointing):
    """Three layers: one pre, five fused boundaries (one inside each layer, one between
    each pair of layers) and one post. Under activation checkpointing each layer runs its
    own pre, its inner boundary and its post, twice (the backward recomputes it). The
    gradients are the model's either way."""
    model = tiny_model(4, layers=3)
    ids = torch.randint(0, 101, (2, 9))
    if checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    want_logits, want_grads = loss_and_grads(model, ids)
    cl_hf.accelerate(model, strict=True)
    calls = count_connection_ops(monkeypatch)
    got_logits, got_grads = loss_and_grads(model, ids)
    per_forward = {"mhc_pre_for_post": 3, "mhc_boundary": 3, "hc_post": 3} if checkpointing else \
        {"mhc_pre_for_post": 1, "mhc_boundary": 5, "hc_post": 1}
    recomputed = 2 if checkpointing else 1  # the backward replays each checkpointed layer
    assert calls == {k: v * recomputed for k, v in per_forward.items()}
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-10, atol=1e-10)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-9, atol=1e-10, msg=name)


def test_a_layer_wrapped_after_accelerate_is_not_handed_a_pre(model_math_in_float64, monkeypatch):
    """FSDP2's fully_shard swaps a layer's class for a subclass (its parameters sharded
    until its own forward): no boundary into or out of such a layer is fused, the others
    still are, and the gradients are the model's."""
    model = tiny_model(4, layers=3)
    ids = torch.randint(0, 101, (2, 9))
    want_logits, want_grads = loss_and_grads(model, ids)
    cl_hf.accelerate(model, strict=True)
    layer = model.model.layers[2]
    layer.__class__ = type("FSDPFusedDeepseekV4DecoderLayer", (cl_hf.FusedDeepseekV4DecoderLayer,), {})
    calls = count_connection_ops(monkeypatch)
    got_logits, got_grads = loss_and_grads(model, ids)
    assert calls == {"mhc_pre_for_post": 2, "mhc_boundary": 4, "hc_post": 2}
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-10, atol=1e-10)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-9, atol=1e-10, msg=name)


def test_a_changed_hidden_state_is_not_taken_for_the_handed_one(model_math_in_float64, monkeypatch):
    """A forward hook that replaces layer 0's output: layer 1 gets another tensor than the
    H' layer 0 fused its pre for, so it computes its own pre from what it gets."""
    model = tiny_model(4, layers=2)
    ids = torch.randint(0, 101, (1, 7))
    model.model.layers[0].register_forward_hook(lambda m, args, out: out * 0.5)
    want = model(ids).logits
    cl_hf.accelerate(model, strict=True)
    calls = count_connection_ops(monkeypatch)
    torch.testing.assert_close(model(ids).logits, want, rtol=1e-10, atol=1e-10)
    assert calls == {"mhc_pre_for_post": 2, "mhc_boundary": 3, "hc_post": 1}


def test_state_dict_parameters_and_restore_unchanged():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    ids = torch.randint(0, 101, (1, 7))
    want = model(ids).logits
    cl_hf.accelerate(model)
    assert model.state_dict().keys() == before.keys()
    assert [id(p) for p in model.parameters()] == params
    assert sorted(cl_hf.restore(model)) == ["model.hc_head", "model.layers.0", "model.layers.1"]
    assert all(type(m).__name__ != "FusedDeepseekV4DecoderLayer" for m in model.modules())
    assert not any("_boundary_in" in vars(m) or "_boundary_out" in vars(m) for m in model.modules())
    assert torch.equal(model(ids).logits, want)  # the model's own forward, bit for bit
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_generate_with_cache_gives_the_same_tokens():
    model = tiny_model()
    ids = torch.randint(2, 101, (1, 6))
    want = model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
    cl_hf.accelerate(model)
    got = model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
    assert torch.equal(got, want)


def test_unsupported_modules_are_reported_and_strict_refuses():
    model = tiny_model()

    class Custom(type(model.model.layers[1])):
        pass

    model.model.layers[1].__class__ = Custom
    report = cl_hf.accelerate(model)
    assert "model.layers.1" in report.unsupported and "subclass (Custom)" in report.unsupported["model.layers.1"]
    assert "model.layers.0" in report.accelerated
    cl_hf.restore(model)
    with pytest.raises(cl_hf.UnsupportedModel, match=r"model.layers.1: a subclass \(Custom\).*nothing was converted|nothing was converted"):
        cl_hf.accelerate(model, strict=True)
    assert type(model.model.layers[0]).__name__ == "DeepseekV4DecoderLayer"  # nothing converted


def test_unexpected_forward_signature_is_refused(monkeypatch):
    def forward(self, hidden_states, position_embeddings, **kwargs):  # a later transformers' form
        raise AssertionError("not called")

    monkeypatch.setattr(dsv4.DeepseekV4DecoderLayer, "forward", forward)
    with pytest.raises(cl_hf.UnsupportedModel, match=r"DeepseekV4DecoderLayer.forward takes .*5\.23\.0"):
        cl_hf.accelerate(tiny_model())


@pytest.mark.cuemu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_kernels_follow_the_policy(cuemu, dtype):
    """A float32 / bf16 model accelerated on the emulated CUDA kernels (ops on CPU
    tensors run the kernels; bf16: the coefficients' projection on the tensor-core path):
    logits and every parameter gradient under DESIGN.md's policy, against the model's own
    forward in that dtype (the oracle at the inputs' precision) and its math at float64.
    In bf16 the model rounds post and comb to bf16 and crosslayer does not."""
    from crosslayer._extension import emulate
    from policy import assert_policy

    model = tiny_model(4, layers=2)
    ids = torch.randint(0, 101, (2, 9))
    model_lp = copy.deepcopy(model).to(dtype)
    low_logits, low_grads = loss_and_grads(model_lp, ids)
    with cl_hf.model_math_in_float64():
        high_logits, high_grads = loss_and_grads(model, ids)
    cl_hf.accelerate(model_lp, strict=True)
    with emulate(cuemu):
        got_logits, got_grads = loss_and_grads(model_lp, ids)
    assert_policy("logits", got_logits, low_logits, high_logits)
    assert got_grads.keys() == high_grads.keys()
    for name, g in high_grads.items():
        assert_policy(name, got_grads[name], low_grads[name], g)


def test_connections_compile_without_graph_breaks():
    """torch.compile sees a chain of accelerated connections (the first pre, a layer's
    inner boundary, the boundary into the next layer with its hand-off, the last post)
    and the hyper head as one graph each: crosslayer's ops are custom ops with fakes and
    the hand-off is plain Python state, nothing in them breaks the graph."""
    from crosslayer import ops

    model = tiny_model(4, layers=2).float()
    report = cl_hf.accelerate(model)
    assert report.fused_boundaries == ["model.layers.0 -> model.layers.1"]
    layer, link = model.model.layers[0], model.model.layers[0]._boundary_out
    H, y1, y2 = torch.randn(2, 5, 4, 64), torch.randn(2, 5, 64), torch.randn(2, 5, 64)

    def chain(H, y1, y2):
        x, alpha, beta, H = cl_hf._pre(layer.attn_hc, H)
        H, x2, alpha, beta = cl_hf._boundary(layer.ffn_hc, H, y1, alpha, beta)
        link.pending = cl_hf._boundary(link.next_layer.attn_hc, H, y2, alpha, beta)
        x3, alpha, beta, H = link.take(link.pending[0])
        return x, x2, x3, ops.hc_post(H, y1, alpha, beta)

    for fn, args in ((chain, (H, y1, y2)), (model.model.hc_head, (H,))):
        explained = torch._dynamo.explain(fn)(*args)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    assert link.pending is None


def test_model_graph_breaks_are_the_models_own():
    """The whole accelerated model under torch.compile breaks its graph only where the
    model's own code does (its eager experts' data-dependent loop), never in crosslayer."""
    model = tiny_model(4, layers=2).float()
    cl_hf.accelerate(model)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model.model)(torch.randint(0, 101, (2, 9)))
    frames = [r.user_stack[-1].filename for r in explained.break_reasons if r.user_stack]
    assert frames and not [f for f in frames if f"{os.sep}crosslayer{os.sep}" in f], explained.break_reasons
