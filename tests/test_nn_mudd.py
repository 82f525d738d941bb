"""crosslayer.nn: DepthStack, MUDDConnection, DenseFormerDWA on the CPU.

The reference is autograd through a plain list-and-stack oracle model written here
(a Python list of slot tensors, torch.stack, crosslayer.ref) in float64: outputs and
the gradients of the embedding, of every block's parameters and of every connection's
weights must match the DepthStack model. Also: the identity start reproduces the plain
residual stream, the MUDDFormer parameter sizes, DWA slot selection, repeated and
partial backward passes, and the in-place backward fallback against the oracle.
"""

import pytest
import torch

from crosslayer import nn as cnn
from crosslayer import ref
from crosslayer.nn.depth_stack import aggregate_bwd_into
from crosslayer.nn.mudd import mudd_hidden
from crosslayer.ref import mudd as ref_mudd

F64 = torch.float64


# --------------------------------------------------------------------------- toy model


class ToyBlocks(torch.nn.Module):
    """Block i: one input (block 0, or a DWA model) x -> x + tanh(x W0); several ways
    (q, k, v, r) -> r + tanh(q Wq)·sigmoid(k Wk) + v Wv, so every way gets a gradient."""

    def __init__(self, L, d, dtype=F64):
        super().__init__()
        self.W = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(3, d, d, dtype=dtype) / d**0.5) for _ in range(L)]
        )

    def forward(self, i, h):
        """h: a tensor (one input) or a tuple of ways (q, k, v, r) or (r,)."""
        W = self.W[i]
        if isinstance(h, tuple) and len(h) == 1:
            h = h[0]
        if not isinstance(h, tuple):
            return h + torch.tanh(h @ W[0])
        q, k, v, r = h
        return r + torch.tanh(q @ W[0]) * torch.sigmoid(k @ W[1]) + v @ W[2]


def perturb(conns, scale=0.3):
    """Move the connections off their identity start so every weight matters."""
    with torch.no_grad():
        for c in conns:
            for p in c.parameters():
                p.add_(scale * torch.randn_like(p))


def ways_of(c, Y):
    """A MUDD connection's (C, *tok, d) output as the tuple of ways a block takes."""
    return tuple(Y.unbind(0)) if isinstance(c, cnn.MUDDConnection) else Y


def run_stack(x0, blocks, conns):
    """The DepthStack model: returns the last connection's output."""
    L = len(conns)
    stack = cnn.DepthStack.start(x0, n_slots=L + 1)
    h = x0
    for i in range(L):
        stack.push(blocks(i, ways_of(conns[i - 1], h) if i else h))
        h = conns[i](stack)
    return h


def run_oracle(x0, blocks, conns):
    """The list-and-stack oracle model, written with crosslayer.ref only."""
    slots = [x0]
    h = x0
    for i, c in enumerate(conns):
        slots.append(blocks(i, ways_of(conns[i - 1], h) if i else h))
        if isinstance(c, cnn.MUDDConnection):
            A = ref.mudd_weights(slots[-1], c.W1, c.W2, c.bias, c.n_ways, c.eps, c.gelu)
            h = ref.depth_aggregate(torch.stack(slots), A)
        elif c.active:
            h = ref.depth_aggregate(torch.stack(slots[c.slots]), c.alpha)[0]
        else:
            h = slots[-1]
    return h


def grads_of(out, dout, tensors):
    return torch.autograd.grad(out, tensors, dout, allow_unused=True, materialize_grads=True)


def assert_same_model(x0, blocks, conns, tok):
    params = [x0] + list(blocks.parameters()) + [p for c in conns for p in c.parameters()]
    out = run_stack(x0, blocks, conns)
    out_ref = run_oracle(x0, blocks, conns)
    torch.testing.assert_close(out, out_ref)
    dout = torch.randn_like(out_ref)
    g = grads_of(out, dout, params)
    g_ref = grads_of(out_ref, dout, params)
    for k, (a, b) in enumerate(zip(g, g_ref)):
        torch.testing.assert_close(a, b, msg=lambda m: f"gradient {k}: {m}")
    return g


# --------------------------------------------------------------------------- MUDD


@pytest.mark.parametrize("tok", [(7,), (2, 3)])
@pytest.mark.parametrize("ways", ["qkvr", "r"])
def test_mudd_stack_matches_list_and_stack_oracle_fp64(tok, ways):
    L, d = 5, 6
    blocks = ToyBlocks(L, d)
    conns = [cnn.MUDDConnection(d, i, L, ways=ways, hidden_expand_last=4, dtype=F64)
             for i in range(L)]
    perturb(conns)
    x0 = torch.randn(*tok, d, dtype=F64, requires_grad=True)
    g = assert_same_model(x0, blocks, conns, tok)
    assert all(t.abs().max() > 0 for t in g[1 + L:]), "every connection weight is exercised"


def test_mudd_module_list_path_is_the_oracle():
    L, d = 3, 5
    blocks = ToyBlocks(L, d)
    conns = [cnn.MUDDConnection(d, i, L, gelu="tanh", round64=True, dtype=F64) for i in range(L)]
    perturb(conns)
    x0 = torch.randn(4, d, dtype=F64)
    slots, h = [x0], x0
    for i, c in enumerate(conns):
        slots.append(blocks(i, ways_of(c, h) if i else h))
        h = c(slots)
    torch.testing.assert_close(h, run_oracle(x0, blocks, conns), rtol=0, atol=0)


def test_mudd_identity_start_is_the_residual_stream():
    L, d = 6, 16
    blocks = ToyBlocks(L, d)
    conns = [cnn.MUDDConnection(d, i, L, round64=True, dtype=F64) for i in range(L)]
    x0 = torch.randn(3, 5, d, dtype=F64)
    out = run_stack(x0, blocks, conns)
    x = x0
    for i in range(L):  # plain residual: every way is the current stream
        x = blocks(i, x if i == 0 else (x, x, x, x))
    assert out.shape == (1, 3, 5, d)
    torch.testing.assert_close(out[0], x, rtol=1e-14, atol=1e-14)


def test_mudd_parameter_shapes_muddformer_2p8b():
    """Released 2.8B (notes/mudd.md): L=32, D=2560, round64, expand_last: hidden/out
    i=0 64/8, i=14 128/64, i=30 192/128, last 192/33; DA params ≈ 8.78M (0.35%)."""
    L, D = 32, 2560
    conns = [cnn.MUDDConnection(D, i, L, round64=True, device="meta") for i in range(L)]
    want = {0: (64, 8), 14: (128, 64), 30: (192, 128), 31: (192, 33)}
    for i, (K, out) in want.items():
        c = conns[i]
        C, l = c.n_ways, c.n_slots
        assert (c.hidden, C * l) == (K, out)
        assert c.W1.shape == (D, K) and c.W2.shape == (K, C * l) and c.bias.shape == (C, l)
    assert conns[-1].ways == "r" and conns[0].ways == "qkvr"
    total = sum(p.numel() for c in conns for p in c.parameters())
    assert round(total / 1e6, 2) == 8.78
    assert round(100 * total / (12 * L * D * D), 2) == 0.35


def test_mudd_hidden_rounding():
    assert mudd_hidden(4, 2) == 8 and mudd_hidden(4, 2, round64=True) == 64
    assert mudd_hidden(4, 16, round64=True) == 128  # 64 rounds up to 128
    assert mudd_hidden(1, 33, expand=4) == 132 and mudd_hidden(1, 33, 4, True) == 192


def test_mudd_init_is_identity_start():
    c = cnn.MUDDConnection(10, 3, 8)
    assert torch.equal(c.W2, torch.zeros_like(c.W2))
    want = torch.zeros(4, 5)
    want[:, -1] = 1
    assert torch.equal(c.bias, want)
    assert 0.2 < c.W1.std() * 10**0.5 < 5
    assert c.W1.dtype == torch.float32


def test_mudd_bad_arguments():
    with pytest.raises(ValueError, match="layer_index must be < n_layers"):
        cnn.MUDDConnection(8, 4, 4)
    with pytest.raises(ValueError, match="ways must be"):
        cnn.MUDDConnection(8, 0, 4, ways="qq")
    with pytest.raises(ValueError, match="gelu must be"):
        cnn.MUDDConnection(8, 0, 4, gelu="erf")
    c = cnn.MUDDConnection(8, 1, 4)
    stack = cnn.DepthStack.start(torch.randn(2, 8), 5)
    stack.push(torch.randn(2, 8))
    with pytest.raises(ValueError, match="expects a stack with 3 filled slots"):
        c(stack)



# --------------------------------------------------------------------------- DWA


@pytest.mark.parametrize("dilation,period", [(1, 1), (2, 1), (1, 2), (3, 2)])
def test_dwa_stack_matches_list_and_stack_oracle_fp64(dilation, period):
    L, d = 7, 5
    blocks = ToyBlocks(L, d)
    conns = [cnn.DenseFormerDWA(i, dilation, period, dtype=F64) for i in range(L)]
    assert [c.active for c in conns] == [(i + 1) % period == 0 for i in range(L)]
    perturb([c for c in conns if c.active])
    x0 = torch.randn(6, d, dtype=F64, requires_grad=True)
    assert_same_model(x0, blocks, conns, (6,))


def test_dwa_identity_start_is_the_plain_stack():
    L, d = 5, 8
    blocks = ToyBlocks(L, d)
    conns = [cnn.DenseFormerDWA(i, 2, 1, dtype=F64) for i in range(L)]
    x0 = torch.randn(4, d, dtype=F64)
    x = x0
    for i in range(L):
        x = blocks(i, x)
    torch.testing.assert_close(run_stack(x0, blocks, conns), x, rtol=0, atol=0)
    assert conns[2].alpha.shape == (1, 2) and conns[2].slots == slice(1, 4, 2)


# --------------------------------------------------------------------------- DepthStack


def test_stack_aggregate_reads_views_and_matches_oracle():
    x = [torch.randn(3, 4, 6, dtype=F64) for _ in range(5)]
    stack = cnn.DepthStack.start(x[0], 6)
    for t in x[1:]:
        stack.push(t)
    assert len(stack) == 5 and stack.newest is x[-1]
    # the slots are the pushed tensors themselves: no copy, no stack buffer
    assert [s.data_ptr() for s in stack.slots] == [t.data_ptr() for t in x]
    A = torch.randn(3, 4, 2, 3, dtype=F64)
    torch.testing.assert_close(stack.aggregate(A, slice(0, 5, 2)),
                               ref.depth_aggregate(torch.stack(x[0:5:2]), A))
    As = torch.randn(2, 5, dtype=F64)
    torch.testing.assert_close(stack.aggregate(As), ref.depth_aggregate(torch.stack(x), As))


def test_stack_push_copies_only_what_it_must():
    """push keeps a contiguous, non-view tensor of the stack's dtype as the slot; a view
    (it would pin its base), a strided tensor or another dtype is copied once, and the
    gradient still reaches the pushed tensor (cast back to its dtype)."""
    base = torch.randn(2, 3, 4, dtype=F64, requires_grad=True)
    fresh = torch.randn(3, 4, dtype=F64, requires_grad=True)
    other = torch.randn(3, 4, dtype=torch.float32, requires_grad=True)
    strided = torch.randn(4, 3, dtype=F64).t().requires_grad_()
    stack = cnn.DepthStack.start(fresh, 5)
    view = base[1]
    for x in (view, other, strided):
        stack.push(x)
    assert stack.slots[0].data_ptr() == fresh.data_ptr()
    assert all(s.data_ptr() != x.data_ptr() for s, x in zip(stack.slots[1:], (view, other, strided)))
    assert all(s.dtype == F64 and s.is_contiguous() for s in stack.slots)
    A = torch.randn(3, 2, 4, dtype=F64)
    stack.aggregate(A).square().sum().backward()
    xs = [fresh, view, other, strided]
    S = torch.stack([t.detach().to(F64) for t in xs]).requires_grad_()
    ref.depth_aggregate(S, A).square().sum().backward()
    torch.testing.assert_close(fresh.grad, S.grad[0])
    torch.testing.assert_close(base.grad[1], S.grad[1])
    assert other.grad.dtype == torch.float32
    torch.testing.assert_close(other.grad, S.grad[2].float())
    torch.testing.assert_close(strided.grad, S.grad[3])


def test_stack_refuses_a_slot_modified_after_push():
    """A slot is the pushed tensor itself: changing it in place afterwards is refused by
    the next aggregation that reads it (before), or by autograd (after an aggregation
    saved it), never silently used."""
    x0, x1 = torch.randn(3, 4), torch.randn(3, 4)
    stack = cnn.DepthStack.start(x0, 3)
    stack.push(x1)
    x1.add_(1)
    with pytest.raises(RuntimeError, match="slot 1 of the DepthStack was modified in place"):
        stack.aggregate(torch.randn(1, 2))
    x0 = torch.randn(3, 4, requires_grad=True)
    x1 = torch.randn(3, 4)
    stack = cnn.DepthStack.start(x0 * 1, 3)
    stack.push(x1)
    Y = stack.aggregate(torch.randn(1, 2))
    x1.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        Y.sum().backward()


def test_stack_errors():
    stack = cnn.DepthStack(2, (3, 4))
    with pytest.raises(RuntimeError, match="empty"):
        stack.newest
    with pytest.raises(ValueError, match="slot shape"):
        stack.push(torch.randn(3, 5))
    stack.push(torch.randn(3, 4))
    with pytest.raises(ValueError, match="only 1 slots are filled"):
        stack.aggregate(torch.randn(1, 2), slice(0, 2))
    with pytest.raises(ValueError, match="A must have shape"):
        stack.aggregate(torch.randn(1, 2), slice(0, 1))
    stack.push(torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="full"):
        stack.push(torch.randn(3, 4))
    with pytest.raises(ValueError, match="slot_shape"):
        cnn.DepthStack(2, (4,))


def test_stack_refuses_double_backward():
    """Issue 14's repro: a second derivative through an aggregation raised nothing and
    returned 2.0 (the oracle's is 8.0). First derivatives with create_graph=True stay
    exact; differentiating them raises a clear error, through aggregate and
    aggregate_qkv_norm alike."""
    x0 = torch.tensor([[1.0]], dtype=F64, requires_grad=True)
    x1 = torch.tensor([[2.0]], dtype=F64, requires_grad=True)
    A = torch.tensor([[1.0, 1.0]], dtype=F64, requires_grad=True)
    s = cnn.DepthStack.start(x0, 2)
    s.push(x1)
    loss = (s.aggregate(A) ** 2).sum()
    gA = torch.autograd.grad(loss, A, create_graph=True)[0]
    torch.testing.assert_close(gA, torch.tensor([[6.0, 12.0]], dtype=F64))  # 2·Y·x_j, Y = 3
    with pytest.raises(RuntimeError, match="DepthStack does not support double backward"):
        torch.autograd.grad(gA[0, 0], x0)

    d = 8
    xs = [torch.randn(2, d, dtype=F64, requires_grad=True) for _ in range(3)]
    s = cnn.DepthStack.start(xs[0], 3)
    for x in xs[1:]:
        s.push(x * 2)
    A4 = torch.randn(4, 3, dtype=F64, requires_grad=True)
    out = s.aggregate_qkv_norm(A4, torch.ones(3, d, dtype=F64))
    g = torch.autograd.grad(out.square().sum(), xs[1], create_graph=True)[0]
    with pytest.raises(RuntimeError, match="DepthStack does not support double backward"):
        torch.autograd.grad(g.sum(), A4)


def test_stack_push_under_no_grad_keeps_earlier_slots():
    """A frozen block (its push under torch.no_grad()) gets no gradient, as in plain
    PyTorch, but the slots pushed before it keep theirs (they were cut off: x0.grad was
    None); an aggregation under no_grad adds no node and breaks nothing either."""
    d = 5
    x0 = torch.randn(3, d, dtype=F64, requires_grad=True)
    w = torch.randn(d, d, dtype=F64, requires_grad=True)
    A = torch.randn(2, 3, dtype=F64, requires_grad=True)

    def run(use_stack):
        if use_stack:
            s = cnn.DepthStack.start(x0, 3)
        else:
            s = [x0]
        h1 = x0 @ w
        s.push(h1) if use_stack else s.append(h1)
        with torch.no_grad():  # a frozen block, and a look at the stack in between
            h2 = torch.tanh(h1)
            if use_stack:
                s.aggregate(A[:, :2], slice(0, 2))
            s.push(h2) if use_stack else s.append(h2)
        y = s.aggregate(A) if use_stack else ref.depth_aggregate(torch.stack(s), A)
        return (y * y.sin()).sum()

    g = torch.autograd.grad(run(True), [x0, w, A])
    g_ref = torch.autograd.grad(run(False), [x0, w, A])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def _raw_stack_model(xs_leaf, As, readers, stack_dtype=F64):
    """Generic graph: slot j = f_j(previous aggregate); readers[i] = slot slice of
    aggregate i (several per layer allowed). Returns (stack loss, oracle loss)."""

    def run(use_stack):
        if use_stack:
            st = cnn.DepthStack.start(xs_leaf[0], len(xs_leaf))
        else:
            st = [xs_leaf[0]]
        loss = 0
        h = None
        for i, (A, sl) in enumerate(zip(As, readers)):
            n = len(range(len(xs_leaf))[sl]) and max(range(len(xs_leaf))[sl]) + 1
            while len(st) < n:
                j = len(st)
                x = xs_leaf[j] * (1 if h is None else torch.sigmoid(h.sum(0)))
                st.push(x) if use_stack else st.append(x)
            if use_stack:
                h = st.aggregate(A, sl)
            else:
                h = ref.depth_aggregate(torch.stack(st[sl]), A)
            loss = loss + (h * h.cos()).sum()
        return loss

    return run(True), run(False)


def test_stack_gradients_many_readers_fp64():
    """Several aggregations per layer, strided and partial slot ranges, static and per
    token weights, leaf slots: the stack's gradients equal the list-and-stack oracle."""
    tok, d, n = (5,), 4, 6
    xs = [torch.randn(*tok, d, dtype=F64, requires_grad=True) for _ in range(n)]
    readers = [slice(0, 2), slice(1, 2), slice(0, 3, 2), slice(0, 4), slice(1, 6, 2),
               slice(0, 6), slice(3, 4)]
    As = []
    for sl in readers:
        l = len(range(n)[sl])
        shape = (2, l) if len(As) % 2 else (*tok, 3, l)
        As.append(torch.randn(shape, dtype=F64, requires_grad=True))
    loss, loss_ref = _raw_stack_model(xs, As, readers)
    torch.testing.assert_close(loss, loss_ref)
    g = torch.autograd.grad(loss, xs + As)
    g_ref = torch.autograd.grad(loss_ref, xs + As)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def test_stack_repeated_and_partial_backward():
    """retain_graph twice gives the same gradients (no stale accumulation), and a
    partial autograd.grad before a full backward does not leak into it."""
    L, d = 4, 5
    blocks = ToyBlocks(L, d)
    conns = [cnn.MUDDConnection(d, i, L, dtype=F64) for i in range(L)]
    perturb(conns)
    x0 = torch.randn(3, d, dtype=F64, requires_grad=True)
    out = run_stack(x0, blocks, conns)
    loss = out.square().sum()
    params = [x0] + list(blocks.parameters())
    g_part = torch.autograd.grad(loss, [conns[-1].W1], retain_graph=True)[0]
    g1 = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True,
                             materialize_grads=True)
    g2 = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
    out_ref = run_oracle(x0, blocks, conns)
    g_ref = torch.autograd.grad(out_ref.square().sum(), params, allow_unused=True,
                                materialize_grads=True)
    for a, b, c in zip(g1, g2, g_ref):
        torch.testing.assert_close(a, c)
        torch.testing.assert_close(b, c)
    assert g_part.abs().max() > 0


def test_stack_leaf_grad_is_a_copy():
    L, d = 3, 4
    blocks = ToyBlocks(L, d)
    conns = [cnn.MUDDConnection(d, i, L, dtype=F64) for i in range(L)]
    x0 = torch.randn(2, d, dtype=F64, requires_grad=True)
    stack = cnn.DepthStack.start(x0, L + 1)
    h = x0
    for i in range(L):
        stack.push(blocks(i, ways_of(conns[i - 1], h) if i else h))
        h = conns[i](stack)
    h.sum().backward()
    assert x0.grad is not None and x0.grad._base is None


def test_stack_no_grad_and_mixed_dtype():
    x0 = torch.randn(3, 4)
    with torch.no_grad():
        stack = cnn.DepthStack.start(x0, 3)
        stack.push(x0 * 2)
        Y = stack.aggregate(torch.ones(1, 2))
    torch.testing.assert_close(Y[0], 3 * x0)
    # a float32 input into a float64 stack: gradient comes back in float32
    x = torch.randn(3, 4, requires_grad=True)
    stack = cnn.DepthStack(2, (3, 4), dtype=F64)
    stack.push(x)
    stack.aggregate(torch.full((1, 1), 2.0)).sum().backward()
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
def test_in_place_backward_fallback_matches_oracle(static, accumulate, dtype):
    l, tok, d, C = 5, (3, 4), 7, 3
    full = torch.randn(2 * l, *tok, d).to(dtype)
    S = full[::2]  # strided slots, as a DWA view
    A = torch.randn((C, l) if static else (*tok, C, l))
    dY = torch.randn(C, *tok, d).to(dtype)
    G = torch.randn(2 * l, *tok, d).to(dtype)
    G0 = G.clone()
    dA = aggregate_bwd_into(dY, S, A, G[::2], accumulate)
    dS_ref, dA_ref = ref.depth_aggregate_bwd(dY.double(), S.double(), A.double())
    want = dS_ref + (G0[::2].double() if accumulate else 0)
    tol = {F64: {}, torch.float32: dict(rtol=1e-5, atol=1e-5),
           torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}[dtype]
    torch.testing.assert_close(G[::2].double(), want, **tol)
    assert torch.equal(G[1::2], G0[1::2])  # untouched slots
    assert dA.dtype == A.dtype
    torch.testing.assert_close(dA.double(), dA_ref, **(dict(rtol=1e-5, atol=1e-5) if tol else {}))


def test_dwa_init_weights_match_ref():
    m = cnn.DenseFormerDWA(4, 2, 1)
    assert torch.equal(m.alpha.detach(), ref_mudd.dwa_init_weights(4, 2))
    assert cnn.DenseFormerDWA(2, 1, 2).alpha is None


def test_stack_gradients_with_frozen_embedding():
    """x0 needs no gradient: the link chain starts at the first block's push."""
    L, d = 4, 5
    blocks = ToyBlocks(L, d)
    conns = [cnn.MUDDConnection(d, i, L, dtype=F64) for i in range(L)]
    perturb(conns)
    x0 = torch.randn(3, d, dtype=F64)
    params = list(blocks.parameters()) + [p for c in conns for p in c.parameters()]
    g = grads_of(run_stack(x0, blocks, conns).sum(), None, params)
    g_ref = grads_of(run_oracle(x0, blocks, conns).sum(), None, params)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------- qkv-normed ways from the stack


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("stack_dtype", [F64, torch.float32])
def test_stack_aggregate_qkv_norm_matches_oracle(static, stack_dtype):
    """DepthStack.aggregate_qkv_norm (the custom op on CPU, its backward adding into the
    one gradient buffer) against ref.depth_aggregate_qkv_norm on a stacked copy, with
    several readers so slots are accumulated into more than once."""
    L, tok, d = 4, (2, 3), 5
    xs = [torch.randn(*tok, d, dtype=stack_dtype, requires_grad=True) for _ in range(L + 1)]
    As = [(torch.randn(4, l) if static else torch.randn(*tok, 4, l)).requires_grad_(True)
          for l in range(2, L + 2)]
    g = torch.randn(3, d, requires_grad=True)

    def model(use_stack):
        st = cnn.DepthStack.start(xs[0], L + 1) if use_stack else [xs[0]]
        outs = []
        for i in range(L):
            if use_stack:
                st.push(xs[i + 1])
                outs.append(st.aggregate_qkv_norm(As[i], g, 1e-5))
            else:
                st.append(xs[i + 1])
                outs.append(ref.depth_aggregate_qkv_norm(torch.stack(st), As[i], g, 1e-5))
        return outs

    outs, outs_ref = model(True), model(False)
    douts = [torch.randn_like(o) for o in outs_ref]
    params = xs + As + [g]
    grads = torch.autograd.grad(outs, params, douts)
    grads_ref = torch.autograd.grad(outs_ref, params, douts)
    tol = dict(atol=1e-5, rtol=1e-5) if stack_dtype == torch.float32 else {}
    for a, b in zip(outs, outs_ref):
        assert a.dtype == stack_dtype
        torch.testing.assert_close(a, b, **tol)
    for k, (a, b) in enumerate(zip(grads, grads_ref)):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"gradient {k}: {m}")


def test_mudd_connection_norm_weights():
    d, tok = 6, (4,)
    c = cnn.MUDDConnection(d, 1, 4)
    perturb([c])
    xs = [torch.randn(*tok, d, dtype=F64) for _ in range(3)]
    g = torch.randn(3, d, dtype=F64)
    stack = cnn.DepthStack.start(xs[0], 3)
    stack.push(xs[1])
    stack.push(xs[2])
    got = c(stack, norm_weights=g, norm_eps=1e-5)
    torch.testing.assert_close(got, c(xs, norm_weights=g, norm_eps=1e-5))
    A = ref.mudd_weights(xs[2], c.W1, c.W2, c.bias, 4, c.eps, c.gelu)
    torch.testing.assert_close(got, ref.depth_aggregate_qkv_norm(torch.stack(xs), A, g, 1e-5))
    last = cnn.MUDDConnection(d, 3, 4)
    with pytest.raises(ValueError, match="norm_weights need the ways 'qkvr'"):
        last([torch.randn(*tok, d) for _ in range(5)], norm_weights=g)

@pytest.mark.parametrize("static", [False, True])
def test_stack_aggregate_qkv_norm_gradients_fp64(static):
    """DepthStack.aggregate_qkv_norm mixed with plain aggregations over shared slots:
    output and the gradients of slots, weights and norm weights equal autograd through
    the oracle on a stacked copy."""
    tok, d, n = (2, 3), 5, 4
    xs = [torch.randn(*tok, d, dtype=F64, requires_grad=True) for _ in range(n)]
    g = (1 + 0.3 * torch.randn(3, d, dtype=F64)).requires_grad_()
    readers = [slice(0, 2), slice(0, 3), slice(1, 4), slice(0, 4)]
    As = [torch.randn(*(() if static else tok), 4, len(range(n)[sl]), dtype=F64, requires_grad=True)
          for sl in readers]

    def run(use_stack):
        stack = cnn.DepthStack.start(xs[0], n) if use_stack else None
        loss = 0
        for k, (sl, A) in enumerate(zip(readers, As)):
            while use_stack and len(stack) <= range(n)[sl][-1]:
                stack.push(xs[len(stack)])
            if k % 2 == 0:
                out = (stack.aggregate_qkv_norm(A, g, 1e-5, sl) if use_stack
                       else ref.depth_aggregate_qkv_norm(torch.stack(xs[sl]), A, g, 1e-5))
            else:
                out = stack.aggregate(A, sl) if use_stack else ref.depth_aggregate(torch.stack(xs[sl]), A)
            loss = loss + (out * out.sin()).sum()
        return loss

    loss, loss_ref = run(True), run(False)
    torch.testing.assert_close(loss, loss_ref)
    for a, b in zip(torch.autograd.grad(loss, xs + As + [g]), torch.autograd.grad(loss_ref, xs + As + [g])):
        torch.testing.assert_close(a, b)


def test_stack_aggregate_qkv_norm_errors():
    stack = cnn.DepthStack.start(torch.randn(3, 4), 3)
    with pytest.raises(ValueError, match="C = 4 ways"):
        stack.aggregate_qkv_norm(torch.randn(3, 2, 1), torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"norm_weights must have shape \(3, 4\)"):
        stack.aggregate_qkv_norm(torch.randn(3, 4, 1), torch.ones(3, 5))
    with pytest.raises(ValueError, match="only 1 slots are filled"):
        stack.aggregate_qkv_norm(torch.randn(3, 4, 2), torch.ones(3, 4), slots=slice(0, 2))


@pytest.mark.parametrize("backward", [True, False])
def test_stack_is_freed_by_refcount_alone(backward):
    """No reference cycle between the DepthStack, its slots and the autograd graph
    (invariant I3): with the garbage collector off, dropping the output frees the
    stack and its newest slot (a block output), after a backward pass or without one."""
    import gc
    import weakref

    L, d = 3, 8
    blocks = ToyBlocks(L, d)
    conns = [cnn.MUDDConnection(d, i, L, dtype=F64) for i in range(L)]
    x0 = torch.randn(5, d, dtype=F64, requires_grad=True)
    gc.collect()
    gc.disable()
    try:
        stack = cnn.DepthStack.start(x0, n_slots=L + 1)
        h = x0
        for i in range(L):
            stack.push(blocks(i, ways_of(conns[i - 1], h) if i else h))
            h = conns[i](stack)
        refs = [weakref.ref(stack), weakref.ref(stack.slots[-1].untyped_storage())]
        out = h.sum()
        if backward:
            out.backward()
        del stack, h, out
        assert [r() is None for r in refs] == [True, True]
    finally:
        gc.enable()
