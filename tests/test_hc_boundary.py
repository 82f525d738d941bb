"""hc_boundary (connection i's post fused with connection i+1's DHC pre) beyond the
contract checks of tests/test_contract.py: the oracle's hand-derived backward against
autograd, and chains of connections (PendingStreams, `defer_post`) on the emulated
kernels against the same chain unfused on the oracle.
"""

import copy

import pytest
import torch

from crosslayer import nn as clnn
from crosslayer import ref
from crosslayer._extension import emulate
from op_specs import hc_coeffs, hc_pre_params
from policy import FLOOR, assert_policy

EPS = 1e-6


@pytest.mark.parametrize("dynamic", [True, False], ids=["dhc", "shc"])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("with_coef_grads", [False, True])
def test_ref_bwd_matches_autograd(dynamic, static, with_coef_grads):
    torch.manual_seed(0)
    lead, n, d = (2, 3), 3, 7
    H = torch.randn(*lead, n, d, dtype=torch.float64, requires_grad=True)
    y = torch.randn(*lead, d, dtype=torch.float64, requires_grad=True)
    alpha, beta = (t.double().requires_grad_(True) for t in hc_coeffs(lead, n, torch.float64, "cpu", static))
    params = [p.requires_grad_(True) for p in hc_pre_params(n, d, torch.float64, "cpu", dynamic=dynamic)]
    outs = ref.hc_boundary(H, y, alpha, beta, *params, eps=EPS)
    dH_next, dx = torch.randn_like(outs[0]), torch.randn_like(outs[1])
    dalpha, dbeta = (torch.randn_like(outs[2]), torch.randn_like(outs[3])) if with_coef_grads else (None, None)
    grad_outs = [dH_next, dx] + ([dalpha, dbeta] if with_coef_grads else [])
    inputs = [H, y, alpha, beta, *params]
    want = torch.autograd.grad(outs[:len(grad_outs)], inputs, grad_outs, allow_unused=True)
    want = [torch.zeros_like(t) if w is None else w for t, w in zip(inputs, want)]  # B without dbeta
    got = ref.hc_boundary_bwd(dH_next, dx, dalpha, dbeta, H, y, alpha, beta, *params, eps=EPS)
    names = ("dH", "dy", "dalpha", "dbeta", "dA", "dB", "dW", "ds_a", "ds_b")
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=name)
    if not dynamic:
        assert got[6:] == (None, None, None)


def _chain(kinds, n, d, dtype, seed=0):
    """Connections of the given kinds ("dhc", "shc", "mhc"), parameters moved off their
    init so that every coefficient and gradient term matters."""
    torch.manual_seed(seed)
    hcs = []
    for j, kind in enumerate(kinds):
        hc = (clnn.ManifoldHyperConnections(d, n) if kind == "mhc"
              else clnn.HyperConnections(d, n, layer_index=j, dynamic=kind == "dhc"))
        with torch.no_grad():
            for p in hc.parameters():
                p.add_(0.3 * torch.randn_like(p))
        hcs.append(hc)
    return hcs


def _run_chain(hcs, H0, ws, defer):
    """Forward and backward of the chain with tanh(x·w_j) branches; returns the loss,
    H0's gradient and every parameter's gradient."""
    for hc in hcs:
        hc.zero_grad(set_to_none=True)
    H0 = H0.clone().requires_grad_(True)
    H = H0
    for hc, w in zip(hcs, ws):
        H = hc(H, lambda x, w=w: torch.tanh(x @ w), defer_post=defer)
    out = clnn.reduce_streams(H)
    loss = (out.double() ** 2).sum()
    loss.backward()
    return [loss.detach(), H0.grad] + [p.grad for hc in hcs for p in hc.parameters()]


@pytest.mark.cuemu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kinds", [("dhc",) * 4, ("shc",) * 4, ("mhc",) * 4,
                                   ("shc", "dhc", "mhc", "dhc", "shc", "mhc", "shc")],
                         ids=["dhc4", "shc4", "mhc4", "mixed"])
def test_chain_matches_unfused_oracle(cuemu, poisoned, dtype, kinds):
    """A chain whose posts are deferred (SHC and DHC pres fuse the pending post through
    hc_boundary's kernels, mHC pres through mhc_boundary's) against the float64 oracle of
    the same chain, with the bound set by the same chain called unfused on the emulated kernels (each
    op checked against the oracle by test_contract.py): fusing keeps the error of the
    unfused kernels. Checked: the loss, H0's gradient and every parameter's gradient."""
    n, d = 4, 40
    hcs = _chain(kinds, n, d, dtype)
    hcs64 = [copy.deepcopy(hc).double() for hc in hcs]
    H0 = torch.randn(3, 5, n, d).to(dtype)
    ws = [(torch.randn(d, d) / d ** 0.5).to(dtype) for _ in hcs]
    with emulate(cuemu):
        got = _run_chain(hcs, H0, ws, defer=True)
        unfused = _run_chain(hcs, H0, ws, defer=False)
    high = _run_chain(hcs64, H0.double(), [w.double() for w in ws], defer=False)
    # Every output, fp32 parameter gradients included, sums terms rounded to the
    # activation dtype across the chain (the fused path rounds H's total gradient once
    # where the unfused one rounds twice): the floor is the activation dtype's.
    for k, (g, lo, hi) in enumerate(zip(got, unfused, high)):
        assert_policy(f"output {k}", g, lo, hi, floor=FLOOR[dtype])


def test_pending_streams_forms():
    """post.defer(y) checks y at once; PendingStreams resolves to post(y), anew on
    every call; SHC, mHC and reduce_streams take it; a DHC pre gives the values of the
    unfused call."""
    torch.manual_seed(0)
    n, d = 3, 8
    dhc, shc, mhc = _chain(("dhc", "shc", "mhc"), n, d, torch.float64)
    for hc in (dhc, shc, mhc):
        hc.double()
    H = torch.randn(2, n, d, dtype=torch.float64)
    x, post = dhc.pre(H)
    with pytest.raises(ValueError, match="y must have shape"):
        post.defer(torch.randn(2, d + 1, dtype=torch.float64))
    pending = post.defer(torch.tanh(x))
    assert isinstance(pending, clnn.PendingStreams) and pending.shape == H.shape
    H1 = pending.resolve()
    assert pending.resolve() is not H1
    torch.testing.assert_close(pending.resolve(), H1, rtol=0, atol=0)
    torch.testing.assert_close(H1, post(torch.tanh(x)))
    torch.testing.assert_close(clnn.reduce_streams(pending), H1.sum(-2))
    for hc in (dhc, shc, mhc):
        x_p, post_p = hc.pre(pending)
        x_u, post_u = hc.pre(H1)
        torch.testing.assert_close(x_p, x_u)
        torch.testing.assert_close(post_p(x_p), post_u(x_u))
    with pytest.raises(ValueError, match=r"H must have shape \(\.\.\., n, d\)"):
        clnn.HyperConnections(d + 1, n).pre(pending)
