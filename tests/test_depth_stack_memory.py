"""Memory of the connection state: DepthStack is O(L·N·d), list-and-stack is O(L²·N·d).

For an L-layer stack of identity blocks (x_{i+1} = the connection's output; the r way
for MUDD) the test measures, on the CPU:

  saved     bytes autograd keeps for the backward: every saved tensor's storage, each
            storage counted once (saved_tensors_hooks), plus the DepthStack's slots
            (the pushed tensors, or their copies);
            parameters are excluded. DWA weights (1, l) are trained; the MUDD weight
            MLPs are frozen here, because their gradients are O(parameters) (W1 is
            d x K with K ∝ l), not connection state; x and A still get gradients
  bwd alloc bytes of every storage newly allocated during backward, each once (a
            TorchDispatchMode sees every op; outputs that alias an input are views
            or in-place results, not allocations): the gradient buffers, the per-layer
            dY / dA, and any l·N·d gradient a layer materialises
  bwd peak  the largest live sum of those backward allocations (storages tracked
            with weakref finalizers)

and asserts bytes(48) / bytes(24) < 2.2 for DepthStack (linear) and > 3 for the
list-and-stack oracle (quadratic: each layer saves its own stacked copy of l slots and
materialises an l·N·d gradient in backward). Run with -s for the table.
"""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from crosslayer import nn as cnn

LS = (12, 24, 48)
N, D = 16, 2048
MiB = 1 << 20


class AllocCounter(TorchDispatchMode):
    """Sums the storages newly allocated by ops run under it (total and peak live)."""

    def __init__(self):
        super().__init__()
        self.total = self.live = self.peak = 0
        self._live = {}

    def _free(self, ptr):
        self.live -= self._live.pop(ptr, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
               if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            ptr, n = st.data_ptr(), st.nbytes()
            if n == 0 or ptr in ins or ptr in self._live:
                continue
            self._live[ptr] = n
            self.total += n
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(st, self._free, ptr)
        return out


def build(kind, L):
    if kind == "dwa":
        return [cnn.DenseFormerDWA(i) for i in range(L)]
    conns = [cnn.MUDDConnection(D, i, L, round64=True) for i in range(L)]
    for c in conns:
        c.requires_grad_(False)
    return conns


def forward(kind, approach, conns, x0):
    """Identity blocks: block 0 returns x0, block i > 0 its input (the r way)."""
    L = len(conns)
    stack = cnn.DepthStack.start(x0, L + 1) if approach == "DepthStack" else [x0]
    h = x0
    for i in range(L):
        x = h if i == 0 or kind == "dwa" else h[-1]
        stack.push(x) if approach == "DepthStack" else stack.append(x)
        h = conns[i](stack)
    return (h[0] if kind == "mudd" else h), stack


def measure(kind, approach, L):
    conns = build(kind, L)
    params = {p.untyped_storage().data_ptr() for c in conns for p in c.parameters()}
    x0 = torch.randn(N, D, requires_grad=True)
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, stack = forward(kind, approach, conns, x0)
    if isinstance(stack, cnn.DepthStack):  # its slots (the pushed tensors, or copies)
        for slot in stack.slots:
            st = slot.untyped_storage()
            saved[st.data_ptr()] = st.nbytes()
    dout = torch.randn_like(out)
    with AllocCounter() as m:
        out.backward(dout)
    assert x0.grad is not None and x0.grad.abs().max() > 0
    return {"saved": sum(saved.values()), "bwd_alloc": m.total, "bwd_peak": m.peak}


@pytest.fixture(scope="module")
def table():
    res = {}
    for kind in ("dwa", "mudd"):
        for approach in ("DepthStack", "list+stack"):
            for L in LS:
                res[kind, approach, L] = measure(kind, approach, L)
    slot = N * D * 4
    lines = [f"connection state, identity blocks, N={N} d={D} fp32 "
             f"(one slot = {slot / MiB:.3f} MiB); MiB",
             f"{'model':<5} {'approach':<11} {'L':>3} {'saved':>9} {'bwd alloc':>10} "
             f"{'bwd peak':>9} {'saved+alloc':>12} {'ratio vs L/2':>12}"]
    for kind in ("dwa", "mudd"):
        for approach in ("DepthStack", "list+stack"):
            for L in LS:
                r = res[kind, approach, L]
                tot = r["saved"] + r["bwd_alloc"]
                half = res.get((kind, approach, L // 2))
                ratio = f"{tot / (half['saved'] + half['bwd_alloc']):.2f}" if half else "-"
                lines.append(f"{kind:<5} {approach:<11} {L:>3} {r['saved'] / MiB:>9.1f} "
                             f"{r['bwd_alloc'] / MiB:>10.1f} {r['bwd_peak'] / MiB:>9.1f} "
                             f"{tot / MiB:>12.1f} {ratio:>12}")
    print("\n" + "\n".join(lines))
    return res


def _ratio(res, kind, approach, key=None):
    def b(L):
        r = res[kind, approach, L]
        return r[key] if key else r["saved"] + r["bwd_alloc"]
    return b(48) / b(24)


@pytest.mark.parametrize("kind", ["dwa", "mudd"])
def test_depth_stack_grows_linearly(table, kind):
    assert _ratio(table, kind, "DepthStack") < 2.2
    assert _ratio(table, kind, "DepthStack", "saved") < 2.2
    assert _ratio(table, kind, "DepthStack", "bwd_alloc") < 2.2  # no l·N·d grad per layer


@pytest.mark.parametrize("kind", ["dwa", "mudd"])
def test_list_and_stack_grows_quadratically(table, kind):
    """The measurement sees the difference: the baseline's state is quadratic."""
    assert _ratio(table, kind, "list+stack") > 3
    assert _ratio(table, kind, "list+stack", "saved") > 3
    assert _ratio(table, kind, "list+stack", "bwd_alloc") > 3


@pytest.mark.parametrize("kind", ["dwa", "mudd"])
def test_depth_stack_is_smaller_at_depth(table, kind):
    def tot(approach):
        r = table[kind, approach, 48]
        return r["saved"] + r["bwd_alloc"]
    assert tot("list+stack") > 3 * tot("DepthStack")
    assert table[kind, "list+stack", 48]["saved"] > 4 * table[kind, "DepthStack", 48]["saved"]
