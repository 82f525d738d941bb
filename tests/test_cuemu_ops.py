"""The ops' CUDA code path end to end on the CPU emulator (tools/cuemu).

Inside `crosslayer._extension.emulate(cuemu)` the public ops send CPU tensors where they
send CUDA tensors on a GPU: through the custom ops, their fakes and autograd, into the
launchers and kernels. So this file checks, without a GPU, what the per-family cuemu
tests (launchers called directly) cannot: the Python layers' reshapes and views, the
custom ops' registration against the real kernels' outputs (opcheck), the gradients
autograd assembles from the backward kernels, DepthStack's in-place gradient buffer,
and whole models, each against the float64 oracle or the same model on the oracle.

The checks every op shares (oracle agreement on every backend, opcheck, torch.compile,
CUDA graphs, the current stream, determinism, the launchers' messages) run over every
op in tests/test_contract.py; this file keeps what only this op has.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from crosslayer import nn as clnn
from crosslayer._extension import emulate
from crosslayer.models import CONNECTIONS, CrossLayerLM, LMConfig
from crosslayer.ops.hc_pre import hc_pre_bwd_op, hc_pre_op
from policy import assert_policy

pytestmark = pytest.mark.cuemu


@pytest.fixture
def emulated(cuemu):
    with emulate(cuemu):
        yield cuemu


DTYPES = [torch.float32, torch.bfloat16]


def _tiny(connection):
    return LMConfig(vocab_size=61, d_model=32, n_layers=3, n_heads=2, max_seq_len=16, connection=connection)


@pytest.mark.parametrize("connection", CONNECTIONS)
def test_model_step_matches_the_oracle_model(emulated, connection):
    """CrossLayerLM's loss and every parameter gradient, the connections on the
    emulated kernels against the same model on the oracle (float32)."""
    torch.manual_seed(0)
    model = CrossLayerLM(_tiny(connection))
    with torch.no_grad():  # away from the identity start, so every coefficient matters
        for p in model.connections.parameters():
            p.add_(0.2 * torch.randn_like(p))
    idx = torch.randint(0, 61, (2, 16))

    def step():
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    loss, grads = step()
    with emulate(None):
        want_loss, want_grads = step()
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    for k, g in grads.items():
        torch.testing.assert_close(g, want_grads[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("kind", ["mudd", "mudd_qkv_norm", "dwa_dilated"])
def test_depth_stack_accumulates_in_place(emulated, kind):
    """DepthStack on the emulated kernels: aggregates over a growing stack read through
    the slot table (the blocks' outputs where they lie; DWA with dilation 2: every other
    slot, dS a strided view of G), the weight MLP's x gradient added into G, and G
    itself (one in-place buffer, first write = then +=): output, input gradient and
    every parameter gradient under the policy against the list-and-stack oracle in
    float32 and float64."""
    L, N, d = 4, 6, 24
    x0 = torch.randn(N, d)
    blocks = [torch.randn(d, d) / d ** 0.5 for _ in range(L)]
    if kind == "dwa_dilated":
        conns = [clnn.DenseFormerDWA(i, dilation=2) for i in range(L)]
    else:
        conns = [clnn.MUDDConnection(d, i, L) for i in range(L)]
    g = 1 + 0.1 * torch.randn(3, d)
    with torch.no_grad():
        for c in conns:
            for p in c.parameters():
                p.add_(0.1 * torch.randn_like(p))

    def run(use_stack, dtype):
        x = x0.to(dtype).detach().requires_grad_(True)
        mods = [copy.deepcopy(c).to(dtype) for c in conns]
        h = x
        stack = clnn.DepthStack.start(x, n_slots=L + 1) if use_stack else [x]
        for i in range(L):
            out = torch.tanh(h @ blocks[i].to(dtype))
            if use_stack:
                stack.push(out)
            else:
                stack.append(out)
            if kind == "mudd_qkv_norm" and i + 1 < L:
                h = mods[i](stack, norm_weights=g.to(dtype)).sum(0)
            else:
                h = mods[i](stack)
            h = h[0] if h.dim() == 3 else h
        h.square().sum().backward()
        return [h.detach(), x.grad] + [p.grad for m in mods for p in m.parameters()]

    got = run(True, torch.float32)
    with emulate(None):
        low, high = run(False, torch.float32), run(False, torch.float64)
    for k, (a, lo, hi) in enumerate(zip(got, low, high)):
        assert_policy(f"output {k}", a, lo, hi)


def test_hc_pre_bwd_outputs_are_distinct_at_one_stream(emulated):
    """n = 1: dA (1, 2) and dB (1,) are contiguous slices of one coefficient sum; the
    launcher must return copies (torch.library refuses outputs that share storage)."""
    n, d = 1, 9
    H, A, B, W, s = torch.randn(4, n, d), torch.randn(n, n + 1), torch.randn(n), torch.randn(d, n + 2), torch.tensor(0.5)
    _, _, _, q, r, Wt = hc_pre_op(H, A, B, W, s, s, 1e-6)
    dA, dB, *_ = hc_pre_bwd_op(torch.empty_like(H), False, torch.randn(4, d), torch.randn(4, n, n + 1),
                               torch.randn(4, n), H, A, B, W, Wt, s, s, q, r, 1e-6)
    assert dA.untyped_storage().data_ptr() != dB.untyped_storage().data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("use_post", [True, False])
@pytest.mark.parametrize("kind", ["dhc", "shc", "mhc"])
def test_connection_gradient_in_one_tensor(emulated, kind, dtype, use_post):
    """A connection (pre, branch, post) on the emulated kernels: hc_post's backward
    writes H's gradient and the pre's backward kernel (hc_pre for DHC, stream_mix for
    SHC and mHC's layer input) adds to it in place (ops.hc_pre_for_post,
    ops.stream_mix_for_post), equal to the oracle's; and when post is never called, the
    pre's gradient alone."""
    torch.manual_seed(0)
    n, d = 4, 40
    hc = (clnn.ManifoldHyperConnections(d, n) if kind == "mhc"
          else clnn.HyperConnections(d, n, layer_index=1, dynamic=kind == "dhc"))
    with torch.no_grad():
        for p in hc.parameters():
            p.add_(0.2 * torch.randn_like(p))
    H0 = torch.randn(3, 5, n, d).to(dtype)
    w = torch.randn(d, d, dtype=dtype) / d ** 0.5

    def run():
        hc.zero_grad(set_to_none=True)
        H = H0.clone().requires_grad_(True)
        x, post = hc.pre(H)
        out = post(torch.tanh(x @ w)) if use_post else torch.tanh(x @ w)
        (out.float() ** 2).sum().backward()
        return H.grad, [p.grad for p in hc.parameters()]

    got = run()
    with emulate(None):
        want = run()
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[0], want[0], **tol)
    for g, w_, p in zip(got[1], want[1], hc.parameters()):
        # Without post, beta is unused: its parameters' gradient is None on one path and
        # zeros on the other (a fused backward returns zeros for an unused coefficient).
        zero = torch.zeros_like(p)
        torch.testing.assert_close(zero if g is None else g, zero if w_ is None else w_, **tol)
