"""The checks every op shares, run over every op of tests/op_specs.py and every backend.

Backends (the `backend` fixture):
  oracle  CPU tensors without kernels: the public op and its custom ops' CPU path
          must give the oracle's results exactly (dispatch, wrappers, autograd wiring)
  cuemu   CPU tensors on the CUDA launchers and kernels compiled for the emulator
          (tools/cuemu), every torch.empty NaN-poisoned so unwritten outputs fail
  cuda    the built extension on a GPU (skipped without one)

Checks: outputs and input gradients against the float64 oracle under DESIGN.md's policy
(tests/policy.py), bit-identical reruns, opcheck of every custom op, the launchers'
messaged errors, torch.compile(fullgraph=True) against eager (marker `compile`), and on
CUDA the current stream and graph capture. The representative cases run by default;
`--exhaustive` adds every op's exhaustive cases (see conftest.py).
"""

import pytest
import torch
from torch.library import opcheck

from crosslayer import ops, ref
from crosslayer._extension import _C, emulate
from compile_check import assert_compiles_like_eager
from op_specs import SPECS, case_params
from policy import assert_policy

HAS_CUDA = torch.cuda.is_available()
BACKENDS = ["oracle", pytest.param("cuemu", marks=pytest.mark.cuemu),
            pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device"))]
KERNEL_BACKENDS = BACKENDS[1:]
SPEC_IDS = [s.name for s in SPECS]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """(name, device): the ops run their kernels (cuemu, cuda) or the oracle path."""
    name = request.param
    if name == "cuda":
        assert _C is not None, "a GPU is present but crosslayer._C is not built"
        yield name, torch.device("cuda")
    elif name == "cuemu":
        module = request.getfixturevalue("cuemu")
        request.getfixturevalue("poisoned")
        with emulate(module):
            yield name, torch.device("cpu")
    else:
        yield name, torch.device("cpu")


@pytest.fixture(params=KERNEL_BACKENDS)
def kernels(request):
    """(launcher module, device) of a backend that runs kernels."""
    if request.param == "cuda":
        assert _C is not None, "a GPU is present but crosslayer._C is not built"
        return _C, torch.device("cuda")
    return request.getfixturevalue("cuemu"), torch.device("cpu")


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def run(call, module, tensors, grads=None, grad_outputs=None):
    """Outputs of call(module, *tensors) and the gradients of Σ <out, grad> with
    respect to every input (fresh random grads when None, returned for reuse), over the
    outputs listed in grad_outputs (default all: the others get no gradient)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    outs = as_tuple(call(module, *leaves))
    if grads is None:
        grads = [torch.randn(o.shape, device=o.device) for o in outs]
    chosen = range(len(outs)) if grad_outputs is None else grad_outputs
    torch.autograd.backward([outs[i] for i in chosen], [grads[i].to(outs[i].dtype) for i in chosen])
    grads_in = [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]
    return [o.detach() for o in outs], grads_in, grads


def oracle_run(call, tensors, grads, grad_outputs=None):
    with emulate(None):
        low = run(call, ref, tensors, grads, grad_outputs)
        high = run(call, ref, [t.double() for t in tensors], [g.double() for g in grads], grad_outputs)
    return low, high


def dtypes_for(name):
    return {"oracle": [torch.float32], "cuemu": [torch.float32, torch.bfloat16],
            "cuda": [torch.float32, torch.bfloat16, torch.float16, torch.float64]}[name]


def check_against_oracle(spec, case, dtype, device, exact=False):
    """Outputs and input gradients of the public op against the oracle at the inputs'
    dtype and in float64 under the policy (exact: equal to the oracle's bits)."""
    sample = spec.sample(case, dtype, device)
    which = case.get("grad_outputs")
    outs, grads, douts = run(sample.call, ops, sample.tensors, grad_outputs=which)
    if exact:
        want_outs, want_grads, _ = run(sample.call, ref, sample.tensors, douts, which)
        for what, got, want in zip(("out", "grad"), (outs, grads), (want_outs, want_grads)):
            for i, (g, w) in enumerate(zip(got, want)):
                torch.testing.assert_close(g, w, rtol=0, atol=0, msg=lambda m: f"{what} {i}: {m}")
        return
    (lo_outs, lo_grads, _), (hi_outs, hi_grads, _) = oracle_run(sample.call, sample.tensors, douts, which)
    for i, (o, lo, hi) in enumerate(zip(outs, lo_outs, hi_outs)):
        assert_policy(f"{spec.name} {dtype} output {i}", o, lo, hi)
    for i, (g, lo, hi) in enumerate(zip(grads, lo_grads, hi_grads)):
        assert_policy(f"{spec.name} {dtype} grad of input {i}", g, lo, hi)


@pytest.mark.parametrize("spec, case", case_params(SPECS, exhaustive=True))
def test_matches_oracle(backend, spec, case):
    """Every case on the oracle path (bit-equal: dispatch and wrappers only), the
    emulator and CUDA (under the policy, outputs NaN-poisoned on the emulator). On
    CUDA the exhaustive cases, the GPU matrices, always run (conftest)."""
    name, device = backend
    for dtype in dtypes_for(name):
        check_against_oracle(spec, case, dtype, device, exact=name == "oracle")


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_empty_token_sets(backend, spec):
    """Zero tokens: outputs and gradients of the right (empty) shapes, no launch error;
    parameter gradients of a sum over no tokens are zero."""
    _, device = backend
    sample = spec.sample(spec.empty, torch.float32, device)
    outs, grads, _ = run(sample.call, ops, sample.tensors)
    want_outs, want_grads, _ = run(sample.call, ref, [t.cpu() for t in sample.tensors])
    for got, want in zip(outs + grads, want_outs + want_grads):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert torch.equal(got.cpu(), want), "an empty token set must give the oracle's (zero) values"


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS, indirect=True)
def test_gradcheck_fp64(backend, spec):
    """The kernels' backward against finite differences of their forward, in float64."""
    _, device = backend
    sample = spec.sample(spec.tiny, torch.float64, device)
    leaves = [t.detach().clone().requires_grad_(True) for t in sample.tensors]
    assert torch.autograd.gradcheck(lambda *t: sample.call(ops, *t), leaves)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS, indirect=True)
def test_reruns_are_bit_identical(backend, spec):
    """Forward and backward are deterministic: no atomics, fixed reduction orders (on a
    GPU at a size with many blocks; the emulator runs blocks in order, so there it
    catches reads of uninitialised memory)."""
    name, device = backend
    sample = spec.sample(spec.big if name == "cuda" else spec.cases[0], torch.bfloat16, device)
    first_outs, first_grads, douts = run(sample.call, ops, sample.tensors)
    second_outs, second_grads, _ = run(sample.call, ops, sample.tensors, douts)
    for i, (a, b) in enumerate(zip(first_outs + first_grads, second_outs + second_grads)):
        assert torch.equal(a, b), f"{spec.name}: result {i} differs between two runs"


@pytest.mark.cuemu
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_results_do_not_depend_on_thread_order(cuemu, poisoned, spec, monkeypatch):
    """Every output and gradient bit-identical whether the emulator runs a block's
    threads highest first (its default) or lowest first: no result depends on the order
    in which threads reach shared memory (what the determinism check asks of a GPU's
    scheduling). The wide case has several warps a token and several tokens a block."""
    sample = spec.sample(spec.wide, torch.bfloat16, torch.device("cpu"))
    results = []
    with emulate(cuemu):
        for order in ("reverse", "forward"):
            monkeypatch.setenv("CUEMU_ORDER", order)
            outs, grads, douts = run(sample.call, ops, sample.tensors, results[0][2] if results else None)
            results.append((outs, grads, douts))
    (outs1, grads1, _), (outs2, grads2, _) = results
    for k, (a, b) in enumerate(zip(outs1 + grads1, outs2 + grads2)):
        assert not torch.isnan(a).any() and torch.equal(a, b), f"{spec.name}: result {k} differs between thread orders"


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_custom_ops_pass_opcheck(backend, spec):
    """Schema, fake, autograd registration and mutation of every custom op of the op."""
    _, device = backend
    for op, args in spec.opcheck_calls(torch.float32, device):
        opcheck(op, args)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_launcher_errors_are_messaged(kernels, spec):
    module, device = kernels
    for call, message in spec.launcher_errors(module, device):
        with pytest.raises(RuntimeError, match=message):
            call()


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_launchers_refuse_cpu_tensors(spec):
    """The real extension's launchers take CUDA tensors only (CPU tensors run the oracle)."""
    if _C is None:
        pytest.skip("crosslayer._C is not built")
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        for call, _ in spec.launcher_errors(_C, torch.device("cpu")):
            call()


@pytest.mark.compile
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS, indirect=True)
def test_compiles_fullgraph_like_eager(backend, spec):
    """The custom ops trace into one graph (fullgraph=True: a graph break fails) and
    the compiled function gives eager's values and gradients."""
    _, device = backend
    sample = spec.sample(spec.cases[0], torch.float32, device)

    def loss(*tensors):
        return sum((o.float() * (i + 1)).sum() for i, o in enumerate(as_tuple(sample.call(ops, *tensors))))

    assert_compiles_like_eager(loss, sample.tensors)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_runs_on_current_stream(spec):
    """Inputs produced on a busy side stream and consumed there: a kernel launched on
    the default stream instead would race with the producer."""
    assert _C is not None, "a GPU is present but crosslayer._C is not built"
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        sample = spec.sample(spec.big, torch.bfloat16, torch.device("cuda"))
        outs, grads, douts = run(sample.call, ops, sample.tensors)
    torch.cuda.synchronize()
    (lo_outs, lo_grads, _), (hi_outs, hi_grads, _) = oracle_run(sample.call, sample.tensors, douts)
    for i, (g, lo, hi) in enumerate(zip(outs + grads, lo_outs + lo_grads, hi_outs + hi_grads)):
        assert_policy(f"{spec.name} result {i}", g, lo, hi)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_graph_capture_and_replay(spec):
    """Forward and backward captured in one CUDA graph, replayed on new inputs copied
    into the captured buffers: results follow the inputs (no host sync, no stale state)."""
    assert _C is not None, "a GPU is present but crosslayer._C is not built"
    device = torch.device("cuda")
    sample = spec.sample(spec.cases[0], torch.bfloat16, device)
    leaves = [t.detach().clone().requires_grad_(True) for t in sample.tensors]
    probe = as_tuple(sample.call(ops, *leaves))
    douts = [torch.randn_like(o) for o in probe]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the graph
        torch.autograd.grad(as_tuple(sample.call(ops, *leaves)), leaves, douts, allow_unused=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = as_tuple(sample.call(ops, *leaves))
        grads = torch.autograd.grad(outs, leaves, douts, allow_unused=True)
    for _ in range(2):
        fresh = spec.sample(spec.cases[0], torch.bfloat16, device).tensors
        with torch.no_grad():
            for leaf, new in zip(leaves, fresh):
                leaf.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        (lo_outs, lo_grads, _), (hi_outs, hi_grads, _) = oracle_run(sample.call, fresh, douts)
        for i, (g, lo, hi) in enumerate(zip(list(outs) + list(grads), lo_outs + lo_grads, hi_outs + hi_grads)):
            assert_policy(f"{spec.name} result {i}", g.detach(), lo, hi)
