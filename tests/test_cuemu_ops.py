"""The ops' CUDA code path end to end on the CPU emulator (tools/cuemu).

Inside `crosslayer._extension.emulate(cuemu)` the public ops send CPU tensors where they
send CUDA tensors on a GPU: through the custom ops, their fakes and autograd, into the
launchers and kernels. So this file checks, without a GPU, what the per-family cuemu
tests (launchers called directly) cannot: the Python layers' reshapes and views, the
custom ops' registration against the real kernels' outputs (opcheck), the gradients
autograd assembles from the backward kernels, DepthStack's in-place gradient buffer,
and whole models, each against the float64 oracle or the same model on the oracle.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from crosslayer import nn as clnn
from crosslayer import ops, ref
from crosslayer._extension import emulate
from crosslayer.models import CONNECTIONS, CrossLayerLM, LMConfig
from crosslayer.ops.depth_aggregate import depth_aggregate_bwd_op, depth_aggregate_op
from crosslayer.ops.depth_aggregate_qkv_norm import depth_aggregate_qkv_norm_bwd_op, depth_aggregate_qkv_norm_op
from crosslayer.ops.hc_post import hc_post_bwd_op, hc_post_op
from crosslayer.ops.stream_mix import stream_mix_bwd_op, stream_mix_op
from crosslayer.ops.hc_pre import hc_pre_bwd_op, hc_pre_op
from crosslayer.ops.mhc_coeffs import mhc_coeffs_bwd_op, mhc_coeffs_op
from crosslayer.ops.mudd_weights import mudd_weights_bwd_op, mudd_weights_op
from policy import assert_policy

pytestmark = pytest.mark.cuemu


@pytest.fixture
def emulated(cuemu):
    with emulate(cuemu):
        yield cuemu


def _grads(fn, inputs, douts):
    """fn(*inputs) and the gradients of Σ <out, dout> with respect to every input."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(list(outs), [g.to(o.dtype) for o, g in zip(outs, douts)])
    return [o.detach() for o in outs], [t.grad for t in leaves]


def _check(name, fast, oracle, inputs, douts):
    """Outputs and input gradients of `fast` (emulated kernels) against `oracle` at the
    inputs' dtype and in float64, under the policy."""
    outs, grads = _grads(fast, inputs, douts)
    with emulate(None):
        low_outs, low_grads = _grads(oracle, inputs, douts)
        hi_outs, hi_grads = _grads(oracle, [t.double() for t in inputs], [g.double() for g in douts])
    for i, (o, lo, hi) in enumerate(zip(outs, low_outs, hi_outs)):
        assert_policy(f"{name} out{i}", o, lo, hi)
    for i, (g, lo, hi) in enumerate(zip(grads, low_grads, hi_grads)):
        assert_policy(f"{name} d(input {i})", g, lo, hi)


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_depth_aggregate_autograd(emulated, dtype):
    S = torch.randn(5, 3, 4, 37).to(dtype)  # two token dims
    A = torch.randn(3, 4, 4, 5)
    douts = [torch.randn(4, 3, 4, 37)]
    _check("depth_aggregate", ops.depth_aggregate, ref.depth_aggregate, [S, A], douts)


@pytest.mark.parametrize("dtype", DTYPES)
def test_depth_aggregate_qkv_norm_autograd(emulated, dtype):
    S = torch.randn(3, 6, 70).to(dtype)
    A = torch.randn(6, 4, 3)
    g = 1 + 0.1 * torch.randn(3, 70)
    douts = [torch.randn(4, 6, 70)]
    _check("depth_aggregate_qkv_norm", ops.depth_aggregate_qkv_norm, ref.depth_aggregate_qkv_norm,
           [S, A, g], douts)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("static", [False, True])
def test_hc_post_and_stream_mix_autograd(emulated, dtype, static):
    n, d = 4, 45
    H = torch.randn(2, 3, n, d).to(dtype)
    y = torch.randn(2, 3, d).to(dtype)
    alpha = torch.randn(n, n + 1) if static else torch.randn(2, 3, n, n + 1)
    beta = torch.randn(n) if static else torch.randn(2, 3, n)
    _check("hc_post", ops.hc_post, ref.hc_post, [H, y, alpha, beta], [torch.randn(2, 3, n, d)])
    w = torch.randn(n) if static else torch.randn(2, 3, n)
    _check("stream_mix", ops.stream_mix, ref.stream_mix, [H, w], [torch.randn(2, 3, d)])


@pytest.mark.parametrize("dtype", DTYPES)
def test_hc_pre_autograd(emulated, dtype):
    n, d = 4, 45
    H = torch.randn(5, n, d).to(dtype)
    A = ref.hc_init_static(n, 1)[0] + 0.1 * torch.randn(n, n + 1)
    B = torch.ones(n) + 0.1 * torch.randn(n)
    W = 0.1 * torch.randn(d, n + 2)
    s_a, s_b = torch.tensor(0.3), torch.tensor(0.2)
    douts = [torch.randn(5, d), torch.randn(5, n, n + 1), torch.randn(5, n)]
    _check("hc_pre", ops.hc_pre, ref.hc_pre, [H, A, B, W, s_a, s_b], douts)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mhc_coeffs_autograd(emulated, dtype):
    n, d = 4, 24
    H = torch.randn(7, n, d).to(dtype)
    phi = torch.randn(n * d, n * n + 2 * n) / (n * d) ** 0.5
    a_pre, a_post, a_res = torch.tensor(0.7), torch.tensor(0.8), torch.tensor(0.9)
    b = torch.randn(n * n + 2 * n)
    douts = [torch.randn(7, n, n + 1), torch.randn(7, n)]
    _check("mhc_coeffs", ops.mhc_coeffs, ref.mhc_coeffs, [H, phi, a_pre, a_post, a_res, b], douts)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_mudd_weights_autograd(emulated, dtype, approximate):
    d, K, C, l = 40, 24, 4, 3
    x = torch.randn(2, 9, d).to(dtype)
    W1 = torch.randn(d, K) / d ** 0.5
    W2 = torch.randn(K, C * l) / K ** 0.5
    bias = torch.randn(C * l)

    def fast(x, W1, W2, bias):
        return ops.mudd_weights(x, W1, W2, bias, C, approximate=approximate)

    def oracle(x, W1, W2, bias):
        return ref.mudd_weights(x, W1, W2, bias, C, approximate=approximate)

    _check("mudd_weights", fast, oracle, [x, W1, W2, bias], [torch.randn(2, 9, C, l)])


def test_opcheck_every_custom_op(emulated):
    """Schema, fake, autograd registration and mutation against the real kernels."""
    S, A = torch.randn(4, 9, 20), torch.randn(9, 3, 4)
    opcheck(depth_aggregate_op, (S, A))
    opcheck(depth_aggregate_bwd_op, (torch.randn(3, 9, 20), S, A, torch.randn(4, 9, 20), True))
    A4, g = torch.randn(9, 4, 4), torch.ones(3, 20)
    opcheck(depth_aggregate_qkv_norm_op, (S, A4, g, 1e-6))
    out, rstd = depth_aggregate_qkv_norm_op(S, A4, g, 1e-6)
    opcheck(depth_aggregate_qkv_norm_bwd_op,
            (torch.randn(4, 9, 20), S, A4, g, rstd, torch.randn(4, 9, 20), False, 1e-6))
    n, d = 3, 20
    H, y = torch.randn(6, n, d), torch.randn(6, d)
    alpha, beta = torch.randn(6, n, n + 1), torch.randn(6, n)
    opcheck(hc_post_op, (H, y, alpha, beta))
    opcheck(hc_post_bwd_op, (torch.randn(6, n, d), H, y, alpha, beta))
    opcheck(stream_mix_op, (H, beta))
    opcheck(stream_mix_bwd_op, (torch.randn(6, d), H, beta))
    A_hc, B_hc, W = torch.randn(n, n + 1), torch.randn(n), torch.randn(d, n + 2)
    s = torch.tensor(0.5)
    x, al, be, q, r = hc_pre_op(H, A_hc, B_hc, W, s, s, 1e-6)
    opcheck(hc_pre_op, (H, A_hc, B_hc, W, s, s, 1e-6))
    opcheck(hc_pre_bwd_op, (torch.randn(6, d), torch.randn(6, n, n + 1), torch.randn(6, n), H, A_hc, B_hc,
                                W, s, s, q, r, 1e-6))
    phi, bm = torch.randn(n * d, n * n + 2 * n) / 8, torch.randn(n * n + 2 * n)
    mhc_args = (H, phi, s, s, s, bm, 1e-6, 1e-6, 2.0, 5, 1e-6)
    opcheck(mhc_coeffs_op, mhc_args)
    al, be, u, r = mhc_coeffs_op(*mhc_args)
    opcheck(mhc_coeffs_bwd_op, (torch.randn(6, n, n + 1), torch.randn(6, n), H, phi, s, s, s, bm, u, r,
                                1e-6, 1e-6, 2.0, 5, 1e-6))
    x = torch.randn(7, d)
    W1, W2, bias = torch.randn(d, 16) / 4, torch.randn(16, 8) / 4, torch.randn(8)
    A_m, u, r = mudd_weights_op(x, W1, W2, bias, 4, 1e-6, "none")
    opcheck(mudd_weights_op, (x, W1, W2, bias, 4, 1e-6, "none"))
    opcheck(mudd_weights_bwd_op, (torch.randn(7, 4, 2), x, W1, W2, bias, u, r, 4, 1e-6, "none"))


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


def test_depth_stack_accumulates_in_place(emulated):
    """DepthStack on the emulated kernels: aggregates over a growing stack, gradient
    of the stack buffer (one in-place buffer, first write = then +=) against the
    list-and-stack oracle."""
    L, N, d = 4, 6, 24
    x0 = torch.randn(N, d)
    blocks = [torch.randn(d, d) / d ** 0.5 for _ in range(L)]
    conns = [clnn.MUDDConnection(d, i, L) for i in range(L)]
    with torch.no_grad():
        for c in conns:
            for p in c.parameters():
                p.add_(0.1 * torch.randn_like(p))

    def run(use_stack):
        x = x0.clone().requires_grad_(True)
        h = x
        stack = clnn.DepthStack.start(x, n_slots=L + 1) if use_stack else [x]
        for i in range(L):
            out = torch.tanh(h @ blocks[i])
            if use_stack:
                stack.push(out)
            else:
                stack.append(out)
            h = conns[i](stack)
            h = h[0] if h.dim() == 3 else h
        h.square().sum().backward()
        return h.detach(), x.grad, [p.grad.clone() for c in conns for p in c.parameters()]

    got = run(True)
    for c in conns:
        c.zero_grad(set_to_none=True)
    with emulate(None):
        want = run(False)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5)
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_hc_pre_bwd_outputs_are_distinct_at_one_stream(emulated):
    """n = 1: dA (1, 2) and dB (1,) are contiguous slices of one coefficient sum; the
    launcher must return copies (torch.library refuses outputs that share storage)."""
    n, d = 1, 9
    H, A, B, W, s = torch.randn(4, n, d), torch.randn(n, n + 1), torch.randn(n), torch.randn(d, n + 2), torch.tensor(0.5)
    _, _, _, q, r = hc_pre_op(H, A, B, W, s, s, 1e-6)
    grads = hc_pre_bwd_op(torch.randn(4, d), torch.randn(4, n, n + 1), torch.randn(4, n), H, A, B, W, s, s,
                              q, r, 1e-6)
    assert grads[1].untyped_storage().data_ptr() != grads[2].untyped_storage().data_ptr()
