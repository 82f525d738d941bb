"""crosslayer.nn Hyper-Connections modules: HyperConnections (SHC, DHC),
ManifoldHyperConnections (mHC), expand/reduce_streams and param_groups.

CPU tests run the modules through the oracle and compare with the ref functions
composed by hand; GPU tests compare the fused path (bf16/fp32) with the fp64 oracle."""

import pytest
import torch
from torch import nn

from crosslayer import ref
from crosslayer._extension import emulate
from crosslayer.nn import (DenseFormerDWA, HyperConnections, ManifoldHyperConnections, MUDDConnection,
                           expand_streams, param_groups, reduce_streams, static_connection_parameters)
from policy import assert_policy


def _randomise(module: nn.Module, scale: float = 0.5) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


class Affine(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d, dtype=torch.float64)

    def forward(self, x, shift=0.0):
        return torch.tanh(self.lin(x)) + shift


# ------------------------------------------------------------------ HyperConnections


@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("n,layer_index", [(1, 0), (4, 5), (3, 2)])
def test_hc_init_is_a_prenorm_residual(dynamic, n, layer_index):
    d = 7
    hc = HyperConnections(d, n, layer_index, dynamic=dynamic, dtype=torch.float64)
    branch = Affine(d)
    h = torch.randn(2, 3, d, dtype=torch.float64)
    H = expand_streams(h, n)
    out = hc(H, branch)
    torch.testing.assert_close(out, expand_streams(h + branch(h), n))
    torch.testing.assert_close(reduce_streams(out), n * (h + branch(h)))


@pytest.mark.parametrize("dynamic", [True, False])
def test_hc_matches_the_oracle_composition(dynamic):
    d, n = 9, 4
    hc = HyperConnections(d, n, layer_index=1, dynamic=dynamic, dtype=torch.float64)
    _randomise(hc)
    branch = Affine(d)
    H = torch.randn(3, 5, n, d, dtype=torch.float64, requires_grad=True)

    out = hc(H, branch)
    x, alpha, beta = ref.hc_pre(H, hc.A, hc.B, hc.W, hc.s_a, hc.s_b, hc.eps)
    want = ref.hc_post(H, branch(x), alpha, beta)
    torch.testing.assert_close(out, want)

    params = [H] + list(hc.parameters()) + list(branch.parameters())
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, params, g)
    exp = torch.autograd.grad(want, params, g)
    for p, a, b in zip(params, got, exp):
        torch.testing.assert_close(a, b, msg=lambda m: f"{tuple(p.shape)}: {m}")


def test_hc_two_step_form_and_branch_arguments():
    d, n = 6, 3
    hc = HyperConnections(d, n, layer_index=2, dtype=torch.float64, branch=Affine(d))
    _randomise(hc)
    H = torch.randn(4, n, d, dtype=torch.float64)
    x, post = hc.pre(H)
    assert x.shape == (4, d)
    torch.testing.assert_close(post(hc.branch(x, shift=0.5)), hc(H, shift=0.5))
    other = Affine(d)
    torch.testing.assert_close(hc(H, other), post(other(x)))


def test_hc_parameters_and_repr():
    dhc = HyperConnections(16, 4, layer_index=6)
    assert dict((k, tuple(v.shape)) for k, v in dhc.named_parameters()) == {
        "A": (4, 5), "B": (4,), "W": (16, 6), "s_a": (), "s_b": ()}
    assert dhc.A[2, 0] == 1 and dhc.A[:, 0].sum() == 1  # stream 6 mod 4
    torch.testing.assert_close(dhc.A[:, 1:], torch.eye(4))
    assert dhc.s_a.item() == pytest.approx(0.01) and not dhc.W.any()
    shc = HyperConnections(16, 2, dynamic=False)
    assert [k for k, _ in shc.named_parameters()] == ["A", "B"]
    assert "DHC" in repr(dhc) and "SHC" in repr(shc)


def test_hc_bad_input_raises_clear_errors():
    hc = HyperConnections(8, 4)
    with pytest.raises(ValueError, match=r"H must have shape \(\.\.\., n, d\) = \(\.\.\., 4, 8\), got \(2, 3, 8\)"):
        hc.pre(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="no branch"):
        hc(torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match=r"n must be an int in 1\.\.16, got 17"):
        HyperConnections(8, 17)
    with pytest.raises(ValueError, match="d must be an int >= 1"):
        HyperConnections(0, 2)
    with pytest.raises(ValueError, match="layer_index must be an int >= 0"):
        HyperConnections(8, 2, layer_index=-1)


def test_expand_and_reduce_streams():
    x = torch.randn(2, 3, 5)
    H = expand_streams(x, 4)
    assert H.shape == (2, 3, 4, 5) and H.is_contiguous()
    torch.testing.assert_close(reduce_streams(H), 4 * x)
    Hr = torch.randn(3, 6, 4, 5).transpose(0, 1)  # non-contiguous tokens
    torch.testing.assert_close(reduce_streams(Hr), Hr.sum(-2))
    with pytest.raises(ValueError, match="n must be in 1..16"):
        expand_streams(x, 0)


# ------------------------------------------------------------------ mHC


@pytest.mark.parametrize("n", [1, 2, 4])
def test_mhc_init_is_a_prenorm_residual(n):
    d = 5
    m = ManifoldHyperConnections(d, n, dtype=torch.float64)
    branch = Affine(d)
    h = torch.randn(3, d, dtype=torch.float64)
    out = m(expand_streams(h, n), branch)
    # pre sums to 1 + n·pre_eps (and sigmoid(16) for n = 1): within 1e-5 of a residual
    torch.testing.assert_close(out, expand_streams(h + branch(h), n), atol=1e-5, rtol=1e-5)
    alpha, beta = m.coefficients(expand_streams(h, n))
    torch.testing.assert_close(beta, torch.ones_like(beta))
    if n > 1:
        torch.testing.assert_close(alpha[..., 1:].diagonal(dim1=-2, dim2=-1),
                                   torch.full((3, n), 0.9, dtype=torch.float64), atol=1e-5, rtol=0)


def test_mhc_matches_the_oracle_composition():
    d, n = 7, 4
    m = ManifoldHyperConnections(d, n, iters=7, post_mult=2.5, dtype=torch.float64)
    _randomise(m)
    branch = Affine(d)
    H = torch.randn(2, 3, n, d, dtype=torch.float64, requires_grad=True)
    out = m(H, branch)
    alpha, beta = ref.mhc_coeffs(H, m.phi, m.a_pre, m.a_post, m.a_res, m.b, m.eps, m.pre_eps,
                                 2.5, 7, m.sinkhorn_eps)
    x = ref.stream_mix(H, alpha[..., 0])
    want = ref.hc_post(H, branch(x), alpha, beta)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(alpha[..., 1:].sum(-2), torch.ones(2, 3, n, dtype=torch.float64),
                               atol=1e-4, rtol=0)  # comb columns: doubly stochastic
    params = [H] + list(m.parameters())
    g = torch.randn_like(out)
    for p, a, b in zip(params, torch.autograd.grad(out, params, g), torch.autograd.grad(want, params, g)):
        torch.testing.assert_close(a, b, msg=lambda msg: f"{tuple(p.shape)}: {msg}")
        assert a.abs().sum() > 0


def test_mhc_options_are_checked():
    with pytest.raises(ValueError, match="iters must be an int >= 1"):
        ManifoldHyperConnections(8, 4, iters=0)
    with pytest.raises(ValueError, match="post_mult must be > 1"):
        ManifoldHyperConnections(8, 4, post_mult=1.0)
    assert dict((k, tuple(v.shape)) for k, v in ManifoldHyperConnections(8, 4).named_parameters()) == {
        "phi": (32, 24), "a_pre": (), "a_post": (), "a_res": (), "b": (24,)}


# ------------------------------------------------------------------ param groups


def test_param_groups_exempt_exactly_the_static_connection_parameters():
    d = 8
    model = nn.ModuleDict({
        "hc": HyperConnections(d, 4), "shc": HyperConnections(d, 2, dynamic=False),
        "mhc": ManifoldHyperConnections(d, 4), "mudd": MUDDConnection(d, 1, 3),
        "dwa": DenseFormerDWA(2), "lin": nn.Linear(d, d), "frozen": nn.Linear(d, d),
    })
    model["frozen"].requires_grad_(False)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    want_static = [model["hc"].A, model["hc"].B, model["hc"].s_a, model["hc"].s_b,
                   model["shc"].A, model["shc"].B, model["mhc"].a_pre, model["mhc"].a_post,
                   model["mhc"].a_res, model["mhc"].b, model["mudd"].bias, model["dwa"].alpha]
    assert ids(no_decay["params"]) == ids(want_static)
    assert ids(decay["params"]) == ids([model["hc"].W, model["mhc"].phi, model["mudd"].W1,
                                        model["mudd"].W2, model["lin"].weight, model["lin"].bias])
    assert len(list(static_connection_parameters(model))) == len(want_static)
    torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)  # accepted as optimizer groups


# ------------------------------------------------------------------ compile


def test_hc_modules_compile_without_graph_breaks():
    d, n = 8, 4
    hc = HyperConnections(d, n, layer_index=1)
    m = ManifoldHyperConnections(d, n, iters=5)
    _randomise(hc, 0.1)
    lin = nn.Linear(d, d)

    def step(H):
        return m(hc(H, lin), lin).sum()

    H = torch.randn(2, 3, n, d, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(H)
    out.backward()
    g = H.grad.clone()
    H.grad = None
    step(H).backward()
    torch.testing.assert_close(out, step(H))
    torch.testing.assert_close(g, H.grad)


# ------------------------------------------------------------------ GPU: the fused path


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["dhc", "shc", "mhc"])
def test_modules_on_cuda_follow_the_policy(gpu_device, kind, dtype):
    d, n = 129, 4
    if kind == "mhc":
        mod = ManifoldHyperConnections(d, n)
    else:
        mod = HyperConnections(d, n, layer_index=3, dynamic=kind == "dhc")
    _randomise(mod, 0.3)
    lin = nn.Linear(d, d)
    H = torch.randn(37, n, d)

    def run(device, dt, act_dt):
        m = mod.to(device=device, dtype=dt)
        b = lin.to(device=device, dtype=act_dt)
        # detach first: .to() returns H itself when nothing changes, and a leaf H that
        # requires grad would make the later runs' conversions non-leaves without .grad
        Hd = H.detach().to(device=device, dtype=act_dt).requires_grad_(True)
        out = m(Hd, b)
        out.backward(torch.ones_like(out))
        return out.detach(), Hd.grad

    out, dH = run(gpu_device("hc_pre", "hc_post", "stream_mix", "mhc_coeffs"), torch.float32, dtype)
    with emulate(None):  # the references on the oracle, also when the GPU tests are emulated
        ref_low, dH_low = run("cpu", torch.float32, dtype)
        ref64, dH64 = run("cpu", torch.float64, torch.float64)
    assert_policy(f"{kind} out", out.cpu(), ref_low, ref64)
    assert_policy(f"{kind} dH", dH.cpu(), dH_low, dH64)
