"""Second derivatives: crosslayer's ops are first-order only, on every path, with one
clear error (issue 14; README "Second derivatives").

Every public function of crosslayer.ops, on the oracle path (CPU tensors: the public
function runs crosslayer.ref) and on the kernel path (CPU tensors inside
`emulate(cuemu)`: the CUDA launchers and kernels on the emulator, as on a GPU):
  (a) a first derivative taken with create_graph=True equals the plain one (bitwise),
      for a linear loss (the incoming gradients are constants) and a quadratic one
      (they depend on the inputs);
  (b) differentiating it again raises a RuntimeError that says the op "does not support
      double backward" and points to crosslayer.ref -- never torch's "no autograd
      formula was registered", never a silent second derivative.
And every functional custom op that runs inside a backward refuses the same when
differentiated directly.
"""

import pytest
import torch

from crosslayer import ops
from crosslayer._extension import emulate
from op_specs import BY_NAME, EPS, Case, SPECS

REFUSED = r"crosslayer\.\S+ does not support double backward.*crosslayer\.ref\."
DTYPES = [torch.float64, torch.bfloat16]


@pytest.fixture(params=["oracle", pytest.param("cuemu", marks=pytest.mark.cuemu)])
def backend(request):
    """The oracle path (CPU) or the kernel path (CPU on the emulated kernels)."""
    if request.param == "cuemu":
        with emulate(request.getfixturevalue("cuemu")):
            yield request.param
    else:
        yield request.param


def _spec_case(name, **overrides):
    """dtype -> a Sample of op `name`'s tiny case with `overrides` (tests/op_specs.py)."""
    spec = BY_NAME[name]
    case = Case(spec.tiny.id, {**spec.tiny.p, **overrides})
    return lambda dtype: spec.sample(case, dtype, torch.device("cpu"))


def _float64_weights(name):
    """Op `name`'s tiny case with float64 weights: the oracle path even inside emulate
    (a dtype mix the kernels do not cover) for 16-bit slots."""
    build = _spec_case(name)

    def sample(dtype):
        s = build(dtype)
        s.tensors = [s.tensors[0], *(t.double() for t in s.tensors[1:])]
        return s

    return sample


def _for_post(name, fn, overrides=None, **kw):
    """A `*_for_post` function on the inputs of op `name`'s tiny case."""
    build = _spec_case(name, **(overrides or {}))

    def sample(dtype):
        s = build(dtype)
        s.call = lambda m, *t: fn(*t, **kw)
        return s

    return sample


# Every public function, each dispatch branch it has (DHC / SHC, the mix boundary).
CASES = {spec.name: _spec_case(spec.name) for spec in SPECS}
CASES.update({
    "hc_pre-shc": _spec_case("hc_pre", static=True),
    "hc_boundary-shc": _spec_case("hc_boundary", shc=True),
    "depth_aggregate_qkv_norm-f64-weights": _float64_weights("depth_aggregate_qkv_norm"),
    "hc_pre_for_post": _for_post("hc_pre", ops.hc_pre_for_post, eps=EPS),
    "hc_pre_for_post-shc": _for_post("hc_pre", ops.hc_pre_for_post, dict(static=True)),
    "stream_mix_for_post": _for_post("stream_mix", ops.stream_mix_for_post),
    "mhc_pre_for_post": _for_post("mhc_coeffs", ops.mhc_pre_for_post, iters=BY_NAME["mhc_coeffs"].tiny["iters"]),
})


# Inputs whose gradient is nothing but an output gradient passed through: SHC's beta is B
# itself (hc_pre, and hc_boundary's kernel path), so d loss / dB is the loss's own
# derivative, exact to any order; the oracle's copy of B refuses instead. Either is
# allowed ("exact or refused"); the sum of all gradients refuses on every path.
PASSTHROUGH = {"hc_pre-shc": {2}, "hc_pre_for_post-shc": {2}, "hc_boundary-shc": {5}}


def test_every_public_function_has_a_case():
    public = {name for name in ops.__all__ if callable(getattr(ops, name)) and name not in ("fused_ops", "backends")}
    assert public <= {case.split("-")[0] for case in CASES}


def _outputs(out):
    out = out if isinstance(out, tuple) else (out,)
    return [o for o in out if isinstance(o, torch.Tensor) and o.requires_grad]


def _first_derivatives(sample, weights, square, create_graph):
    """(leaves, d loss / d leaves) with loss = Σ_k <w_k, f(out_k)>, f = identity or square."""
    leaves = [t.detach().clone().requires_grad_(True) for t in sample.tensors]
    outs = _outputs(sample.call(ops, *leaves))
    loss = sum(((o.double().square() if square else o.double()) * w).sum() for o, w in zip(outs, weights))
    grads = torch.autograd.grad(loss, leaves, create_graph=create_graph, allow_unused=True)
    return leaves, grads


def _sample_and_weights(case, dtype):
    sample = CASES[case](dtype)
    probe = _outputs(sample.call(ops, *[t.detach().clone().requires_grad_(True) for t in sample.tensors]))
    return sample, [torch.randn(o.shape, dtype=torch.float64) for o in probe]


@pytest.mark.parametrize("square", [False, True], ids=["linear", "square"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_first_derivative_with_create_graph_is_exact_and_refuses_a_second(backend, case, dtype, square):
    sample, weights = _sample_and_weights(case, dtype)
    _, plain = _first_derivatives(sample, weights, square, create_graph=False)
    leaves, grads = _first_derivatives(sample, weights, square, create_graph=True)
    for i, (g, want) in enumerate(zip(grads, plain)):  # (a)
        assert (g is None) == (want is None), f"input {i}"
        if g is not None:
            assert g.dtype == want.dtype and g.shape == want.shape, f"input {i}"
            assert torch.equal(g, want), f"input {i}: create_graph=True changed the first derivative"
    differentiable = [g for g in grads if g is not None and g.requires_grad]
    assert differentiable, "no first derivative is connected to the inputs: nothing to refuse"
    for i, g in enumerate(grads):  # (b), each gradient on its own
        if g is None or not g.requires_grad or i in PASSTHROUGH.get(case, ()):
            continue
        with pytest.raises(RuntimeError, match=REFUSED):
            torch.autograd.grad((g.double() * torch.randn(g.shape, dtype=torch.float64)).sum(), leaves,
                                allow_unused=True)
    with pytest.raises(RuntimeError, match=REFUSED):  # and all of them together
        torch.autograd.grad(sum(g.double().square().sum() for g in differentiable), leaves, allow_unused=True)


@pytest.mark.parametrize("case", ["hc_post", "depth_aggregate", "mhc_pre_for_post"])
def test_the_message_names_the_op_and_its_oracle(backend, case):
    """The refusal says which op refused and which crosslayer.ref function differentiates
    to any order; hc_pre_for_post and the like name the oracle of the op they run."""
    sample, weights = _sample_and_weights(case, torch.float64)
    leaves, grads = _first_derivatives(sample, weights, True, create_graph=True)
    op = "mhc_coeffs" if case == "mhc_pre_for_post" else case
    with pytest.raises(RuntimeError, match=rf"crosslayer\.\S*{case.split('_for_post')[0]}\S* does not support "
                                           rf"double backward.*crosslayer\.ref\.{op}\b"):
        torch.autograd.grad(sum(g.sum() for g in grads if g is not None and g.requires_grad), leaves,
                            allow_unused=True)


def test_first_derivatives_outside_create_graph_stay_plain(backend):
    """Without create_graph nothing changes: the gradients are plain tensors (no graph)."""
    sample, weights = _sample_and_weights("depth_aggregate", torch.float64)
    _, grads = _first_derivatives(sample, weights, True, create_graph=False)
    assert all(g is not None and not g.requires_grad for g in grads)


def _backward_ops():
    """(op, args) of every functional custom op that runs inside a backward, from the
    specs' opcheck calls (the mutating ones cannot take an autograd formula: their
    callers' backward refuses instead, checked above)."""
    seen, calls = set(), []
    for spec in SPECS:
        for op, args in spec.opcheck_calls(torch.float64, torch.device("cpu")):
            name = op._qualname if hasattr(op, "_qualname") else str(op)
            if not (name.endswith("_bwd") or name.endswith("_dots")) or name in seen:
                continue
            if op._opoverload._schema.is_mutable:
                continue
            seen.add(name)
            calls.append(pytest.param(op, args, id=name.split("::")[-1]))
    return calls


@pytest.mark.parametrize("op, args", _backward_ops())
def test_backward_ops_refuse_their_own_derivative(op, args):
    """hc_post_bwd, hc_boundary_bwd, ... differentiated directly: the same refusal, not
    torch's "no autograd formula was registered"."""
    args = [a.detach().clone().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in args]
    out = op(*args)
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
    assert outs
    with pytest.raises(RuntimeError, match=REFUSED):
        torch.autograd.grad(sum(o.double().sum() for o in outs), [a for a in args if isinstance(a, torch.Tensor)
                                                                   and a.requires_grad], allow_unused=True)
