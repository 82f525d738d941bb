"""CrossLayerLM under torch.compile on the CPU (the ops run the oracle inside custom ops).

- residual / shc / dhc / mhc: the whole model compiles with fullgraph=True (zero graph
  breaks), forward and backward match eager.
- dwa / mudd: the DepthStack's autograd.Functions keep Python state across backward
  nodes, so a whole-model compile graph-breaks there (and only there) and still runs
  correctly; `compile_blocks` (regional compilation, fullgraph inside each region)
  is the supported way to compile them (crosslayer.models.lm docstring).
- activation checkpointing combined with compile, for one HC and one DepthStack scheme.

Backend "aot_eager" (Dynamo + AOTAutograd, no codegen) keeps these fast; one test
runs the default inductor backend when a C++ compiler is present.
"""

import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from crosslayer.models import CONNECTIONS, CrossLayerLM, LMConfig

HC_SCHEMES = ("residual", "shc", "dhc", "mhc")
STACK_SCHEMES = ("dwa", "mudd")
TOL = dict(atol=2e-5, rtol=1e-4)  # float32; the compiled graph may reorder reductions


def tiny(connection, **kw):
    kw.setdefault("n_layers", 2)
    kw.setdefault("mhc_iters", 5)  # Sinkhorn unrolls into the graph: fewer iterations, faster tracing
    return LMConfig(vocab_size=61, d_model=32, n_heads=2, max_seq_len=16, connection=connection, **kw)


def make_pair(connection, **kw):
    """Two identical models (the second to compile), connections moved off their
    identity start so every connection parameter matters."""
    torch.manual_seed(0)
    eager = CrossLayerLM(tiny(connection, **kw))
    with torch.no_grad():
        for p in eager.connections.parameters():
            p.add_(0.2 * torch.randn_like(p))
    other = CrossLayerLM(tiny(connection, **kw))
    other.load_state_dict(eager.state_dict())
    return eager, other


def loss_and_grads(fn, model, idx):
    loss = F.cross_entropy(fn(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def assert_same(got, want):
    (loss, grads), (loss_ref, grads_ref) = got, want
    torch.testing.assert_close(loss, loss_ref, **TOL)
    assert grads.keys() == grads_ref.keys()
    for k in grads_ref:
        torch.testing.assert_close(grads[k], grads_ref[k], **TOL, msg=lambda m: f"grad of {k}: {m}")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def idx_batch():
    return torch.randint(0, 61, (2, 17))


@pytest.mark.parametrize("connection", HC_SCHEMES)
def test_whole_model_compiles_without_graph_breaks(connection):
    eager, other = make_pair(connection)
    idx = idx_batch()
    compiled = torch.compile(other, fullgraph=True, backend="aot_eager")
    got = loss_and_grads(compiled, other, idx)
    assert_same(got, loss_and_grads(eager, eager, idx))
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1


def _cxx_compiler():
    from torch._inductor import config
    cxx = config.cpp.cxx
    names = cxx if isinstance(cxx, (tuple, list)) else (cxx,)
    names = [n for n in names if n] + [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    return next((shutil.which(n) for n in names if n and shutil.which(n)), None)


@pytest.mark.skipif(_cxx_compiler() is None,
                    reason="inductor's CPU backend needs a C++ compiler (g++/c++/clang++ or $CXX); none found")
def test_whole_model_compiles_with_inductor():
    """The default backend end to end (codegen + C++ build: ~40 s cold on 2 cores)."""
    eager, other = make_pair("dhc", n_layers=1)
    idx = idx_batch()
    compiled = torch.compile(other, fullgraph=True)
    assert_same(loss_and_grads(compiled, other, idx), loss_and_grads(eager, eager, idx))
    assert sum(counters["graph_break"].values()) == 0


@pytest.mark.parametrize("connection", STACK_SCHEMES)
def test_whole_model_compile_breaks_only_at_the_depth_stack(connection):
    eager, other = make_pair(connection)
    idx = idx_batch()
    compiled = torch.compile(other, backend="aot_eager")
    assert_same(loss_and_grads(compiled, other, idx), loss_and_grads(eager, eager, idx))

    torch._dynamo.reset()
    explained = torch._dynamo.explain(other)(idx[:, :-1])
    assert explained.graph_break_count > 0  # when this fails, DepthStack traces: update the docs
    for br in explained.break_reasons:
        frames = [f.filename for f in br.user_stack]
        assert any(f.endswith(os.path.join("nn", "depth_stack.py")) for f in frames), \
            f"graph break outside the DepthStack: {br.reason}\n{frames}"


@pytest.mark.parametrize("connection", CONNECTIONS)
def test_compile_blocks_matches_eager(connection):
    eager, other = make_pair(connection, n_layers=3)
    idx = idx_batch()
    assert other.compile_blocks(backend="aot_eager") is other
    got = loss_and_grads(other, other, idx)
    assert_same(got, loss_and_grads(eager, eager, idx))
    # fullgraph=True: a break inside a region would have raised; none was recorded.
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    # One graph per sublayer kind, shared by the 3 blocks: attention branch, FFN branch,
    # and for MUDD 'qkvr' the attention of blocks 1.. (their norms run in the connection).
    assert counters["stats"]["unique_graphs"] == (3 if connection == "mudd" else 2)
    assert "recompiles" not in counters or not counters["recompiles"]
    # The state_dict is the eager model's (compiled callables are not module state).
    assert other.state_dict().keys() == eager.state_dict().keys()


@pytest.mark.parametrize("connection, how", [("dhc", "whole"), ("mudd", "blocks")])
def test_activation_checkpointing_under_compile(connection, how):
    eager, _ = make_pair(connection)
    _, other = make_pair(connection, activation_checkpointing=True)
    idx = idx_batch()
    if how == "whole":
        fn = torch.compile(other, fullgraph=True, backend="aot_eager")
    else:
        fn = other.compile_blocks(backend="aot_eager")
    assert_same(loss_and_grads(fn, other, idx), loss_and_grads(eager, eager, idx))
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
