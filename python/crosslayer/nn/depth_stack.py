"""DepthStack: the depth stack of one forward pass, its slots the blocks' outputs where
they lie, and one gradient buffer per backward pass (DESIGN.md "MUDD family", memory
rule).

    stack = DepthStack.start(x0, n_slots=L + 1)   # slot 0 = x0
    for i, block in enumerate(blocks):
        x = block(inputs)                          # block i's output
        stack.push(x)                              # slot i+1 = x itself (no copy)
        A = stack.mudd_weights(W1, W2, bias, C)    # (*tok, C, l) from the newest slot
        Y = stack.aggregate(A, slice(0, i + 2))    # (C, *tok, d), the slots read in place
        # or, for a MUDDFormer block input (q, k, v RMS-normed, r raw):
        X = stack.aggregate_qkv_norm(A, g, eps, slice(0, i + 2))   # (4, *tok, d)

Forward. `push` keeps the pushed tensor as the slot: a contiguous tensor of the stack's
dtype that is not a view is the slot itself (no copy, no stack buffer); anything else
(another dtype, strided, a view that would pin its base) is copied once into a fresh
slot. An aggregation reads the slots where they lie: the fused kernels take a table of
slot pointers (a strided DWA selection such as slots 1, 3, 5 is a pick from the table),
never a stacked or concatenated copy. Memory: the slots, (L+1)·N·d, which the blocks'
outputs occupy anyway.

Backward. ONE gradient buffer G of shape (n_slots, *tok, d) per backward pass,
accumulated in place: every aggregation backward adds Σ_c A[.., c, j]·dY_c into G[j]
for the slots j it read (`crosslayer::depth_aggregate_bwd`; on CPU a slot-by-slot
in-place oracle that never forms an l·N·d tensor) and returns dA; `mudd_weights` adds
its x gradient into G[newest] in place (`crosslayer::mudd_weights_bwd_into`), so a
block output's two gradients are never summed by autograd; the push of slot j hands
G[j] to the pushed tensor as its gradient. So no l·N·d gradient is materialised per
layer, and the stack and its gradient stay O(L·N·d).

Autograd design: a chain tensor ("ghost": a zero-stride expand of one element, the
shape of G, no memory) is threaded through a linear chain of autograd.Functions, one
per push, weight computation and aggregation; each takes the newest ghost and returns
a fresh one, and the gradient that flows back along the chain is G:

    c_1 = _Push.apply(x_j, c_0, j, ...)                        backward: G[j] -> x_j
    A, c_2 = _MuddWeights.apply(c_1, W1, W2, bias, x_j, ...)   backward: G[j] += dx
    Y, c_3 = _Aggregate.apply(c_2, A, start, stop, step, *S)   backward: G[s] += A·dY
    X, c_4 = _AggregateQKVNorm.apply(c_3, A, g, ..., *S)       (the same, q/k/v normed)

The slots go into each Function as inputs that need no gradient (detached aliases of
the pushed tensors), saved for backward: autograd's version check refuses a slot that
was modified in place after an aggregation read it, and an aggregation refuses a slot
modified after its push. The first node of a backward pass to need G (the newest ghost
has no consumer, so it gets None) allocates it and writes its slots (`=`); every later
node receives G, adds in place (`+=`) and passes it on. Nothing lives outside the
graph, so torch.compile traces the stack with no graph break.

Invariants:
  I1  Slot j is filled exactly once per forward pass, before any aggregation reads it
      (`push` fills slots in order; `aggregate` may only read filled slots), and is not
      modified in place afterwards (refused, above).
  I2  Every node takes the newest ghost and returns the next one, so backward visits
      them in exactly the reverse order: when push j's backward runs, every
      aggregation that read slot j and the weights computed from it have added into
      G[j].
  I3  The Functions hold the slots as saved tensors (no copies) and never the
      DepthStack, which holds the newest ghost (and so the graph): no reference cycle;
      the slots are freed when the graph and the DepthStack are dropped.
  I4  G belongs to one backward pass (it travels along the chain), so a second
      backward (retain_graph=True) or a partial one (autograd.grad on some inputs)
      starts a fresh one. Only slots the first aggregation does not read are zeroed
      (none for MUDD). A slot no aggregation read gets a zero gradient, or none when
      no node after its push took part in the pass. Compiled, the traced backward
      starts from a zero G instead (one (L+1)·N·d fill; Dynamo traces the backward with
      a gradient for every output).
  I5  The gradient handed to x_j is a view of G (no copy), cast to x_j's dtype if the
      stack has another dtype; a leaf x_j gets a copy, so its .grad does not pin G.
      G is freed once the chain's root has run and the slot views are consumed.
  I6  Grad mode: a push under torch.no_grad() still joins the chain (its x gets no
      gradient, the earlier slots keep theirs); an aggregation or weight computation
      under no_grad adds no node. Second derivatives are refused: every backward here
      is first-order only, and differentiating its outputs again (create_graph=True,
      then another grad) raises a RuntimeError that says so.

Limits: one DepthStack per forward pass (it cannot be reused or rewound); do not
put pushes and aggregations inside activation checkpointing (a recomputed push would
refill a slot); no double backward (I6).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from crosslayer import ops
from crosslayer._autograd import first_order_backward
from crosslayer._checks import check_tensor, compute_dtype
from crosslayer._extension import runs_kernels
from crosslayer.ops._common import fusable
from crosslayer.ops.depth_aggregate import depth_aggregate_bwd_op, depth_aggregate_slots_op
from crosslayer.ops.depth_aggregate_qkv_norm import (depth_aggregate_qkv_norm_bwd_op,
                                                     depth_aggregate_qkv_norm_slots_op)
from crosslayer.ops.mudd_weights import mudd_weights_bwd_into_op, mudd_weights_op, split_dW2b
from crosslayer.contracts import (check_approximate, validate_depth_aggregate,
                                  validate_depth_aggregate_qkv_norm, validate_mudd_weights)
from crosslayer.ref import mudd as ref_mudd

__all__ = ["DepthStack", "aggregate_bwd_into", "stack_bytes"]


def _tokens(S: Sequence[Tensor]) -> int:
    """N of slots (*tok, d) (not numel // d: d may be 0)."""
    return S[0].shape[:-1].numel()


def _flat(S: Sequence[Tensor]) -> List[Tensor]:
    """The slots as (N, d) views."""
    N, d = _tokens(S), S[0].shape[-1]
    return [s.reshape(N, d) for s in S]


def aggregate_bwd_into(dY: Tensor, S: Sequence[Tensor], A: Tensor, dS: Tensor, accumulate: bool) -> Tensor:
    """Backward of depth_aggregate into a given buffer; returns dA (A's shape and dtype).

    dY: (C, *tok, d); S: l slots (*tok, d) (a list, or a stack's unbind); A: (*tok, C, l)
    or (C, l); dS: (l, *tok, d) in the slots' dtype, written in place: dS_j (+)= Σ_c
    A[.., c, j]·dY_c (`+=` when accumulate).
    CUDA with the extension built: `crosslayer::depth_aggregate_bwd`. Otherwise a
    slot-by-slot oracle that adds into dS in place (baddbmm_/addmm_ on slot views);
    its largest temporaries are dY transposed (C·N·d) and, for half-precision stacks,
    one slot (N·d) in float32 -- never an l·N·d tensor.
    """
    l, d, C = len(S), S[0].shape[-1], A.shape[-2]
    static = A.dim() == 2
    M = _tokens(S)
    if runs_kernels(S[0], "depth_aggregate"):
        A3 = A if static else A.reshape(M, C, l)
        dA = depth_aggregate_bwd_op(dY.reshape(C, M, d), _flat(S), A3, dS.view(l, M, d), accumulate)
        return dA.view(A.shape)

    cd = compute_dtype(dY, S[0], A)
    dY2 = dY.to(cd).reshape(C, M, d)
    Ac = A.to(cd).reshape(C, l) if static else A.to(cd).reshape(M, C, l)
    in_place = dS.dtype == cd
    if static:
        dA = torch.empty(C, l, dtype=cd, device=dY.device)
        dYf = dY2.reshape(C, M * d)
        for j in range(l):
            Sj = S[j].to(cd).reshape(M * d)
            dA[:, j] = torch.mv(dYf, Sj)  # not out=dA[:, j]: Dynamo traces setitem, not out= views
            a = Ac[:, j].reshape(1, C)
            if in_place:
                dS[j].view(1, M * d).addmm_(a, dYf, beta=1 if accumulate else 0)
            else:
                g = (a @ dYf).reshape(dS[j].shape)
                dS[j].add_(g) if accumulate else dS[j].copy_(g)
    else:
        dA = torch.empty(M, C, l, dtype=cd, device=dY.device)
        dYt = dY2.transpose(0, 1).contiguous()  # (M, C, d)
        for j in range(l):
            Sj = S[j].to(cd).reshape(M, d, 1)
            dA[:, :, j] = torch.bmm(dYt, Sj).reshape(M, C)
            a = Ac[:, :, j].reshape(M, 1, C)
            if in_place:
                dS[j].view(M, 1, d).baddbmm_(a, dYt, beta=1 if accumulate else 0)
            else:
                g = torch.bmm(a, dYt).reshape(dS[j].shape)
                dS[j].add_(g) if accumulate else dS[j].copy_(g)
    return dA.reshape(A.shape).to(A.dtype)


def _aggregate_oracle(S: Sequence[Tensor], A: Tensor, cd: torch.dtype) -> Tensor:
    """ref.depth_aggregate over slots, slot by slot (never an l·N·d tensor): Y (C, *tok,
    d) in the arithmetic dtype cd."""
    C, l = A.shape[-2], A.shape[-1]
    W = A.to(cd).movedim(-2, 0)  # (C, *tok, l) or (C, l)
    lead = (1,) * S[0].dim()
    Y = None
    for j in range(l):
        w = W[..., j].reshape(C, *lead) if A.dim() == 2 else W[..., j].unsqueeze(-1)
        Y = w * S[j].to(cd) if Y is None else Y.addcmul_(w, S[j].to(cd))
    return Y


_NO_DOUBLE_BACKWARD = (
    "crosslayer.DepthStack does not support double backward (a gradient of a gradient, "
    "create_graph=True, through a push, a weight computation or an aggregation): its "
    "backward adds every node's slot gradients into one shared buffer in place, which "
    "autograd cannot differentiate again. First derivatives with create_graph=True are "
    "exact; differentiating them raises this error.")


# Every backward of the chain: run without grad mode, refuse a second derivative
# (crosslayer._autograd.first_order_backward). Without this, a second backward silently got
# wrong values (the slot gradients are computed from detached slots).
_first_order_only = first_order_backward(_NO_DOUBLE_BACKWARD)


def _ghost(shape: Sequence[int], dtype: torch.dtype, device) -> Tensor:
    """The chain tensor: G's shape and dtype, one element of memory (module docstring)."""
    return torch.empty((), dtype=dtype, device=device).expand(*shape)


def _live(G: Optional[Tensor]) -> Optional[Tensor]:
    """G, or None where no node has written it yet: None itself, or a ghost-shaped zero
    tangent with a zero stride (a compiled graph's backward gets one for the newest
    ghost, in the ghost's layout; it cannot be added into in place)."""
    if G is None or 0 in G.stride():
        return None
    return G


def _stack_grad(ctx, G: Optional[Tensor]) -> tuple:
    """(G, accumulate) for a node that adds into its slots ctx.slots. G is None for the
    first one of a backward pass (autograd passes None for the newest ghost, which
    nothing consumes; the Functions do not materialise zeros; _live): then G is allocated here,
    the slots this node writes are written (`=`) and only the others zeroed (none for
    MUDD, whose last aggregation reads every slot). Later ones add (`+=`)."""
    G = _live(G)
    if G is not None:
        return G, True
    G = _new_stack_grad(ctx, torch.empty)
    written = range(G.shape[0])[ctx.slots]
    for j in range(G.shape[0]):
        if j not in written:
            G[j].zero_()
    return G, False


def _new_stack_grad(ctx, alloc) -> Tensor:
    """A fresh G (alloc: torch.empty or torch.zeros) of the chain's shape, dtype and device."""
    return alloc(ctx.ghost_shape, dtype=ctx.ghost_dtype, device=ctx.ghost_device)


def _chain_node(ctx, ghost: Tensor, slots: slice, *saved: Tensor) -> Tensor:
    """A node's forward bookkeeping: the slots it reads or adds into, `saved` saved for
    backward, no zero-filled gradients (a None G starts the pass's gradient buffer, I4);
    returns the next ghost (I2)."""
    ctx.ghost_shape, ctx.ghost_dtype, ctx.ghost_device = ghost.shape, ghost.dtype, ghost.device
    ctx.slots = slots
    ctx.save_for_backward(*saved)
    ctx.set_materialize_grads(False)
    return _ghost(ghost.shape, ghost.dtype, ghost.device)


class _Push(torch.autograd.Function):
    """Slot j filled (by the caller); returns the next ghost. Backward: G[j] -> x, G -> the
    older ghost."""

    @staticmethod
    def forward(ctx, x: Tensor, ghost: Tensor, j: int, x_is_leaf: bool) -> Tensor:
        ctx.j, ctx.x_dtype, ctx.x_is_leaf = j, x.dtype, x_is_leaf
        ctx.set_materialize_grads(False)
        return _ghost(ghost.shape, ghost.dtype, ghost.device)

    @staticmethod
    @_first_order_only
    def backward(ctx, G: Optional[Tensor]):
        G = _live(G)
        if G is None:  # no node after this push took part in this backward pass
            return None, None, None, None
        g = G[ctx.j]
        if ctx.x_is_leaf or g.dtype != ctx.x_dtype:
            g = g.to(ctx.x_dtype, copy=True)
        return g, G, None, None


class _MuddWeights(torch.autograd.Function):
    """A = mudd_weights(slot j, W1, W2, bias) (ops.mudd_weights' custom ops); returns (A,
    the next ghost). Backward: G[j] += dx in place, returns (G, dW1, dW2, dbias)."""

    @staticmethod
    def forward(ctx, ghost: Tensor, W1: Tensor, W2: Tensor, bias: Tensor, x: Tensor, j: int, n_ways: int,
                eps: float, approximate: str):
        A, u, r = mudd_weights_op(x, W1, W2, bias, n_ways, eps, approximate)
        ctx.mark_non_differentiable(u, r)
        ctx.n_ways, ctx.eps, ctx.approximate = n_ways, eps, approximate
        return A, _chain_node(ctx, ghost, slice(j, j + 1), x, W1, W2, bias, u, r)

    @staticmethod
    @_first_order_only
    def backward(ctx, dA: Optional[Tensor], G: Optional[Tensor]):
        if dA is None:
            return G, None, None, None, None, None, None, None, None
        x, W1, W2, bias, u, r = ctx.saved_tensors
        G = _live(G)
        if G is None:  # the weights are used, but no aggregation after them took part
            G = _new_stack_grad(ctx, torch.zeros)
        dW1, dW2b = mudd_weights_bwd_into_op(dA, x, W1, W2, bias, u, r, ctx.n_ways, ctx.eps, ctx.approximate,
                                             G[ctx.slots.start])
        dW2, dbias = split_dW2b(dW2b, W2, bias)
        need = ctx.needs_input_grad
        return (G, dW1 if need[1] else None, dW2 if need[2] else None, dbias if need[3] else None,
                None, None, None, None, None)


def _aggregate_fwd(S: Sequence[Tensor], A: Tensor) -> Tensor:
    """Y (C, *tok, d) = depth_aggregate over the slots S: the fused op on slot pointers, or
    the slot-by-slot oracle."""
    C, l = A.shape[-2], len(S)
    if runs_kernels(S[0], "depth_aggregate"):
        Y = depth_aggregate_slots_op(_flat(S), A if A.dim() == 2 else A.reshape(_tokens(S), C, l))
        return Y.view(C, *S[0].shape)
    return _aggregate_oracle(S, A, compute_dtype(S[0], A)).to(S[0].dtype)


def _aggregate_qkv_norm_fwd(S: Sequence[Tensor], A: Tensor, g: Tensor, eps: float) -> tuple:
    """(X (4, *tok, d), rstd, fused) of depth_aggregate_qkv_norm over the slots S: the fused
    op on slot pointers (rstd (3, N) for its backward), or the oracle slot by slot
    (rstd empty). The dispatch rule of ops.depth_aggregate_qkv_norm."""
    if fusable("depth_aggregate_qkv_norm", S[0], A, g):
        l = len(S)
        A3 = A if A.dim() == 2 else A.reshape(_tokens(S), 4, l)
        X, rstd = depth_aggregate_qkv_norm_slots_op(_flat(S), A3, g, float(eps))
        return X.view(4, *S[0].shape), rstd, True
    Y = _aggregate_oracle(S, A, compute_dtype(S[0], A, g))
    return ref_mudd.qkv_norm(Y, g, eps).to(S[0].dtype), A.new_empty(0), False


def _stacked_meta(S: Sequence[Tensor]) -> Tensor:
    """An (l, *tok, d) tensor with the slots' metadata (slot 0 expanded, no copy) for the
    ops' validators, which look at metadata only."""
    return S[0].expand(len(S), *S[0].shape)


class _Aggregate(torch.autograd.Function):
    """Y = depth_aggregate(S, A) over the slots S (start:stop:step of the stack, passed
    after the other inputs); returns (Y, the next ghost). Backward: G[slots] += A·dY in
    place, returns (G, dA)."""

    @staticmethod
    def forward(ctx, ghost: Tensor, A: Tensor, start: int, stop: int, step: int, *S: Tensor):
        Y = _aggregate_fwd(S, A)
        return Y, _chain_node(ctx, ghost, slice(start, stop, step), A, *S)

    @staticmethod
    @_first_order_only
    def backward(ctx, dY: Optional[Tensor], G: Optional[Tensor]):
        n_inputs = len(ctx.needs_input_grad)
        if dY is None:
            return (G,) + (None,) * (n_inputs - 1)
        A, *S = ctx.saved_tensors
        G, accumulate = _stack_grad(ctx, G)
        dA = aggregate_bwd_into(dY, S, A, G[ctx.slots], accumulate)
        return (G, dA if ctx.needs_input_grad[1] else None) + (None,) * (n_inputs - 2)


class _AggregateQKVNorm(torch.autograd.Function):
    """X = depth_aggregate_qkv_norm(S, A, g, eps) over the slots S (passed after the other
    inputs); returns (X, the next ghost). Backward: G[slots] += the slots' gradient in
    place, returns (G, dA, dg). Fused: the kernels, rstd saved from the forward.
    Otherwise: the oracle slot by slot, the norm backward giving dY (4·N·d) from Y
    recomputed, then aggregate_bwd_into's in-place slot-by-slot fallback (never an l·N·d
    tensor)."""

    @staticmethod
    def forward(ctx, ghost: Tensor, A: Tensor, g: Tensor, start: int, stop: int, step: int, eps: float,
                *S: Tensor):
        X, rstd, ctx.fused = _aggregate_qkv_norm_fwd(S, A, g, eps)
        ctx.eps = eps
        return X, _chain_node(ctx, ghost, slice(start, stop, step), A, g, rstd, *S)

    @staticmethod
    @_first_order_only
    def backward(ctx, dX: Optional[Tensor], G: Optional[Tensor]):
        n_inputs = len(ctx.needs_input_grad)
        if dX is None:
            return (G,) + (None,) * (n_inputs - 1)
        A, g, rstd, *S = ctx.saved_tensors
        G, accumulate = _stack_grad(ctx, G)
        if ctx.fused:
            l, d, N = len(S), S[0].shape[-1], _tokens(S)
            A3 = A if A.dim() == 2 else A.reshape(N, 4, l)
            dA, dg = depth_aggregate_qkv_norm_bwd_op(dX.reshape(4, N, d), _flat(S), A3, g, rstd,
                                                     G[ctx.slots].view(l, N, d), accumulate, float(ctx.eps))
            dA = dA.view(A.shape)
        else:
            Y = _aggregate_oracle(S, A, compute_dtype(dX, S[0], A, g))
            dY, dg = ref_mudd.qkv_norm_bwd_y(dX, Y, g, ctx.eps)
            dA = aggregate_bwd_into(dY, S, A, G[ctx.slots], accumulate)
            dg = dg.to(g.dtype)
        need = ctx.needs_input_grad
        return (G, dA if need[1] else None, dg if need[2] else None) + (None,) * (n_inputs - 3)


class DepthStack:
    """The depth stack of one forward pass: slot 0 = embedding, slot j = output of block
    j-1, each slot the pushed tensor itself where it can be (module docstring).

    n_slots:    L + 1 for an L-block model
    slot_shape: (*tok, d) of every slot
    dtype, device: of the slots (the activation dtype); a tensor of another dtype is
                copied into its slot
    """

    def __init__(self, n_slots: int, slot_shape: Sequence[int], *,
                 dtype: torch.dtype = torch.float32, device=None):
        if isinstance(n_slots, bool) or not isinstance(n_slots, int) or n_slots < 1:
            raise ValueError(f"n_slots must be a positive int, got {n_slots!r}")
        slot_shape = tuple(int(s) for s in slot_shape)
        if len(slot_shape) < 2:
            raise ValueError(f"slot_shape must be (*tok, d) with at least one token dim, "
                             f"got {slot_shape}")
        self._n_slots, self._slot_shape = n_slots, slot_shape
        self._ghost = _ghost((n_slots, *slot_shape), dtype, device)  # device=None: torch's default device
        self._dtype, self._device = dtype, self._ghost.device
        self._slots: List[Tensor] = []     # detached aliases (or copies) of the pushed tensors
        self._versions: List[int] = []     # each slot's version counter at its push (I1)
        self._newest: Optional[Tensor] = None

    @classmethod
    def start(cls, x0: Tensor, n_slots: int) -> "DepthStack":
        """A stack with x0's slot shape, dtype and device, x0 pushed into slot 0."""
        check_tensor("x0", x0)
        stack = cls(n_slots, x0.shape, dtype=x0.dtype, device=x0.device)
        stack.push(x0)
        return stack

    # ------------------------------------------------------------------ state
    @property
    def n_slots(self) -> int:
        return self._n_slots

    @property
    def slot_shape(self) -> tuple:
        return self._slot_shape

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def __len__(self) -> int:
        """Number of filled slots."""
        return len(self._slots)

    @property
    def newest(self) -> Tensor:
        """The tensor pushed last (autograd-tracked; not the slot's detached alias)."""
        if self._newest is None:
            raise RuntimeError("the stack is empty: push a tensor first")
        return self._newest

    @property
    def slots(self) -> tuple:
        """The filled slots, detached (for inspection only): the pushed tensors' storage,
        or their copies where push had to copy."""
        return tuple(self._slots)

    def __repr__(self) -> str:
        return (f"DepthStack({len(self)}/{self.n_slots} slots of {self.slot_shape}, "
                f"{self.dtype}, {self.device})")

    # ------------------------------------------------------------------ forward
    def push(self, x: Tensor) -> None:
        """Fill the next free slot with x (*tok, d): x itself when it is a contiguous
        tensor of the stack's dtype that is not a view (a block's output), else a copy
        (a view would keep its whole base alive). x must not be modified in place
        afterwards (the aggregations refuse a changed slot)."""
        check_tensor("x", x)
        if len(self) >= self.n_slots:
            raise RuntimeError(f"the stack is full ({self.n_slots} slots); a DepthStack "
                               "holds one forward pass")
        if tuple(x.shape) != self.slot_shape:
            raise ValueError(f"x must have the stack's slot shape {self.slot_shape}, "
                             f"got {tuple(x.shape)}")
        if x.device != self.device:
            raise ValueError(f"x is on {x.device} but the stack is on {self.device}")
        j = len(self)
        keep = x.dtype == self.dtype and x.is_contiguous()
        if keep and not torch.compiler.is_compiling():  # compiled, inductor plans the memory
            keep = not x._is_view()
        if keep:
            slot = x.detach()
        else:
            slot = torch.empty(self.slot_shape, dtype=self.dtype, device=self.device)
            slot.copy_(x.detach())
        # Under no_grad (a frozen block) x gets no gradient, as in PyTorch, but the push
        # still joins the chain: an untracked ghost would cut every earlier slot off from
        # the nodes that follow.
        tracked = torch.is_grad_enabled()
        with torch.enable_grad():
            self._ghost = _Push.apply(x if tracked else x.detach(), self._ghost, j,
                                      tracked and x.requires_grad and x.is_leaf)
        self._slots.append(slot)
        self._versions.append(slot._version)
        self._newest = x

    def _read(self, slots: Optional[slice]) -> tuple:
        """(slice, the slots it selects), each unchanged since its push (I1)."""
        n = len(self)
        if slots is None:
            s = slice(0, n, 1)
        else:
            if not isinstance(slots, slice):
                raise TypeError(f"slots must be a slice or None, got {type(slots).__name__}")
            for part in ("start", "stop", "step"):
                v = getattr(slots, part)
                if v is not None and (isinstance(v, bool) or not hasattr(type(v), "__index__")):
                    raise TypeError(f"DepthStack: slots.{part} must be an int or None, got "
                                    f"{type(v).__name__} ({v!r}) in {slots}")
            if slots.step is not None and slots.step < 1:
                raise ValueError(f"DepthStack: slots must be a slice with step >= 1 (slots are read "
                                 f"oldest first, the order of A's last dim), got {slots}; to weight "
                                 f"the slots in reverse order, reverse A's last dim instead")
            idx = range(self.n_slots)[slots]
            if len(idx) == 0:
                raise ValueError(f"slots {slots} select no slot")
            if max(idx) >= n:
                raise ValueError(f"slots {slots} read slot {max(idx)} but only {n} slots are filled")
            s = slice(idx.start, idx.stop, idx.step)
        picked = range(self.n_slots)[s]
        if not torch.compiler.is_compiling():
            for j in picked:
                if self._slots[j]._version != self._versions[j]:
                    raise RuntimeError(
                        f"slot {j} of the DepthStack was modified in place after it was pushed; "
                        "the stack reads the pushed tensor itself, not a copy: push a copy "
                        "(x.clone()) if x must change afterwards")
        return s, [self._slots[j] for j in picked]

    def mudd_weights(self, W1: Tensor, W2: Tensor, bias: Tensor, n_ways: int, eps: float = 1e-6,
                     approximate: str = "none") -> Tensor:
        """A = ops.mudd_weights(x, W1, W2, bias, n_ways, eps, approximate) of the newest
        slot x, (*tok, C, l) in the arithmetic dtype. Fused (ops.mudd_weights' dispatch
        rule), its x gradient is added into the stack's gradient buffer in place (no
        gradient of its own for x, no sum of x's two gradients). Otherwise (the CPU,
        float64 parameters with lower-precision slots, d = 0 or K = 0) it is
        ops.mudd_weights on the pushed tensor, differentiated by autograd (only the
        gradients asked for)."""
        x = self.newest
        validate_mudd_weights(x, W1, W2, bias, n_ways, eps)
        check_approximate(approximate)
        s, (slot,) = self._read(slice(len(self) - 1, len(self)))
        chained = fusable("mudd_weights", slot, W1, W2, bias) and x.shape[-1] >= 1 and W1.shape[1] >= 1
        if not (chained and torch.is_grad_enabled()):
            return ops.mudd_weights(x if torch.is_grad_enabled() else slot, W1, W2, bias, n_ways, eps,
                                    approximate)
        A, self._ghost = _MuddWeights.apply(self._ghost, W1, W2, bias, slot, s.start, n_ways, float(eps),
                                            approximate)
        return A

    def aggregate(self, A: Tensor, slots: Optional[slice] = None) -> Tensor:
        """Y_c = Σ_j A[.., c, j]·S_j over the slots S = stack[slots] (default: every filled
        slot). slots: a slice with int bounds and step >= 1 (oldest slot first; a reversed
        slice is refused: reverse A's last dim instead), selecting filled slots only.

        A: (*tok, C, l) per token or (C, l) static, l = number of selected slots.
        returns Y: (C, *tok, d) in the stack's dtype.
        """
        s, S = self._read(slots)
        validate_depth_aggregate(_stacked_meta(S), A)
        if not torch.is_grad_enabled():  # no node: the chain stays as it is
            return _aggregate_fwd(S, A)
        Y, self._ghost = _Aggregate.apply(self._ghost, A, s.start, s.stop, s.step, *S)
        return Y

    def aggregate_qkv_norm(self, A: Tensor, norm_weights: Tensor, eps: float = 1e-6,
                           slots: Optional[slice] = None) -> Tensor:
        """A MUDDFormer block input (ops.depth_aggregate_qkv_norm) over S = stack[slots]:
        Out_c = rms_norm(Y_c)·g_c for the ways q, k, v (c < 3), Out_3 = Y_3 (r, raw),
        Y_c = Σ_j A[.., c, j]·S_j.

        A: (*tok, 4, l) or (4, l); norm_weights: (3, d); eps: the RMSNorm epsilon.
        returns Out: (4, *tok, d) in the stack's dtype.
        """
        s, S = self._read(slots)
        validate_depth_aggregate_qkv_norm(_stacked_meta(S), A, norm_weights, eps)
        if not torch.is_grad_enabled():  # no node: the chain stays as it is
            return _aggregate_qkv_norm_fwd(S, A, norm_weights, eps)[0]
        X, self._ghost = _AggregateQKVNorm.apply(self._ghost, A, norm_weights, s.start, s.stop, s.step, eps, *S)
        return X


def stack_bytes(n_slots: int, slot_shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes of one stack's slots (or of its gradient buffer)."""
    return n_slots * math.prod(slot_shape) * torch.empty((), dtype=dtype).element_size()
