"""DepthStack: one preallocated depth stack per forward pass, one gradient buffer per
backward pass (DESIGN.md "MUDD family", memory rule).

    stack = DepthStack.start(x0, n_slots=L + 1)   # (L+1, *tok, d) buffer, slot 0 = x0
    for i, block in enumerate(blocks):
        x = block(inputs)                          # block i's output
        stack.push(x)                              # copied into slot i+1, in place
        Y = stack.aggregate(A, slice(0, i + 2))    # (C, *tok, d) from a view of the buffer
        # or, for a MUDDFormer block input (q, k, v RMS-normed, r raw):
        X = stack.aggregate_qkv_norm(A, g, eps, slice(0, i + 2))   # (4, *tok, d)

Forward. `push` copies a block's output into the next free slot of the buffer; an
aggregation reads a view of the buffer (`buf[:l]`, or a strided DWA view such as
`buf[1:l:2]`), never a stacked or concatenated copy. Memory: the buffer, (L+1)·N·d.

Backward. ONE gradient buffer G of the buffer's shape per backward pass, accumulated
in place: every aggregation backward adds Σ_c A[.., c, j]·dY_c into G[j] for the slots
j it read (`crosslayer::depth_aggregate_bwd_op` on CUDA; a slot-by-slot in-place
fallback elsewhere that never forms an l·N·d tensor) and returns dA; the push of slot
j hands G[j] to the pushed tensor as its gradient. So no l·N·d gradient is
materialised per layer, and the stack and its gradient stay O(L·N·d).

Autograd design: the buffer is threaded through a linear chain of in-place
autograd.Functions (ctx.mark_dirty), one per push and one per aggregation:

    buf_1 = _Push.apply(x_j, buf_0, j, ...)                  forward: buf[j] = x_j
    Y, buf_2 = _Aggregate.apply(buf_1, A, start, stop, step) forward: Y = agg(buf[s], A)
    X, buf_3 = _AggregateQKVNorm.apply(buf_2, A, g, ..., eps)  (the same, q/k/v normed)

buf_0, buf_1, ... are one tensor (the same storage; each call returns its input marked
dirty), so the graph is a chain and G is that chain's gradient: the first aggregation
backward of a pass (the newest buffer version has no consumer, so it gets None)
allocates G and writes its slots (`=`); every later node receives G, adds its slots
in place (`+=`) and passes it on; each push's backward gives its slot's view to x_j.
Nothing lives outside the graph, so torch.compile traces the stack with no graph
break (the forward's copies into slots and the backward's in-place additions become
select_scatter / in-place custom ops, which inductor re-inplaces: one stack buffer,
one G; "aot_eager", which does not re-inplace, copies the buffer per step).

Invariants:
  I1  Slot j is written exactly once per forward pass, before any aggregation reads
      it (`push` fills slots in order; `aggregate` may only read filled slots).
  I2  Every push and aggregation takes the newest buffer version and returns the next
      one, so backward visits them in exactly the reverse order: when push j's
      backward runs, every aggregation that read slot j has added into G[j].
  I3  A slot is never rewritten after it is read (I1), so aggregations keep the
      buffer as a ctx attribute rather than a saved tensor (a saved tensor would trip
      the version counter on later pushes; the slots it reads never change under it).
  I4  G belongs to one backward pass (it travels along the chain), so a second
      backward (retain_graph=True) or a partial one (autograd.grad on some inputs)
      starts a fresh one. Only slots the first aggregation does not read are zeroed
      (none for MUDD). A slot no aggregation read gets a zero gradient, or none when
      no aggregation after its push took part in the pass. Compiled, the traced
      backward starts from a zero G instead (one (L+1)·N·d fill; Dynamo traces the
      backward with a gradient for every output).
  I5  The gradient handed to x_j is a view of G (no copy), cast to x_j's dtype if the
      stack has another dtype; a leaf x_j gets a copy, so its .grad does not pin G.
      G is freed once the chain's root has run and the slot views are consumed.

  I6  No reference cycle: the nodes keep a detached alias of the buffer (I3), never
      the DepthStack, which keeps the newest buffer version (and so the graph); the
      buffers are freed as soon as the graph and the DepthStack are dropped.

  I7  Grad mode: a push under torch.no_grad() still joins the chain (its x gets no
      gradient, the earlier slots keep theirs); an aggregation under no_grad adds no
      node and leaves the chain as it is. Second derivatives are refused: every
      backward here is first-order only, and differentiating its outputs again
      (create_graph=True, then another grad) raises a RuntimeError that says so.

Limits: one DepthStack per forward pass (it cannot be reused or rewound); do not
put pushes and aggregations inside activation checkpointing (a recomputed push would
rewrite a slot); no double backward (I7).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from crosslayer import ops
from crosslayer._autograd import first_order_backward
from crosslayer._checks import check_tensor, compute_dtype
from crosslayer._extension import runs_kernels
from crosslayer.ops._common import fusable
from crosslayer.ops.depth_aggregate import depth_aggregate_bwd_op
from crosslayer.ops.depth_aggregate_qkv_norm import depth_aggregate_qkv_norm_bwd_op, depth_aggregate_qkv_norm_op
from crosslayer.contracts import validate_depth_aggregate, validate_depth_aggregate_qkv_norm
from crosslayer.ref.mudd import qkv_norm_bwd

__all__ = ["DepthStack", "aggregate_bwd_into", "stack_bytes"]


def aggregate_bwd_into(dY: Tensor, S: Tensor, A: Tensor, dS: Tensor, accumulate: bool) -> Tensor:
    """Backward of depth_aggregate into a given buffer; returns dA (A's shape and dtype).

    dY: (C, *tok, d); S: (l, *tok, d); A: (*tok, C, l) or (C, l); dS: (l, *tok, d) in
    S's dtype, written in place: dS_j (+)= Σ_c A[.., c, j]·dY_c (`+=` when accumulate).
    CUDA with the extension built: `crosslayer::depth_aggregate_bwd_op`. Otherwise a
    slot-by-slot oracle that adds into dS in place (baddbmm_/addmm_ on slot views);
    its largest temporaries are dY transposed (C·N·d) and, for half-precision stacks,
    one slot (N·d) in float32 -- never an l·N·d tensor.
    """
    l, d, C = S.shape[0], S.shape[-1], A.shape[-2]
    static = A.dim() == 2
    if runs_kernels(S):
        N = S.shape[1:-1].numel()  # not -1: reshape cannot infer it when d = 0
        A3 = A if static else A.reshape(N, C, l)
        dA = depth_aggregate_bwd_op(dY.reshape(C, N, d), S.reshape(l, N, d), A3,
                                    dS.view(l, N, d), accumulate)
        return dA.view(A.shape)

    cd = compute_dtype(dY, S, A)
    M = S[0].numel() // d if d else 0
    dY2 = dY.to(cd).reshape(C, M, d)
    Ac = A.to(cd).reshape(C, l) if static else A.to(cd).reshape(M, C, l)
    in_place = dS.dtype == cd
    if static:
        dA = torch.empty(C, l, dtype=cd, device=S.device)
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
        dA = torch.empty(M, C, l, dtype=cd, device=S.device)
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


_NO_DOUBLE_BACKWARD = (
    "crosslayer.DepthStack does not support double backward (a gradient of a gradient, "
    "create_graph=True, through a push or an aggregation): its backward adds every "
    "aggregation's slot gradients into one shared buffer in place, which autograd cannot "
    "differentiate again. First derivatives with create_graph=True are exact; "
    "differentiating them raises this error.")


# Every backward of the chain: run without grad mode, refuse a second derivative
# (crosslayer._autograd.first_order_backward). Without this, a second backward silently got
# wrong values (the slot gradients are computed from a detached buffer).
_first_order_only = first_order_backward(_NO_DOUBLE_BACKWARD)


def _as_slice(start: int, stop: int, step: int) -> slice:
    return slice(start, stop, step)


def _stack_grad(G: Optional[Tensor], buf: Tensor, slots: slice) -> tuple:
    """(G, accumulate) for an aggregation backward. G is None for the first one of a
    backward pass (autograd passes None for the newest buffer version, which nothing
    consumes; the Functions do not materialise zeros): then G is allocated here, the
    slots this aggregation reads are written (`=`) and only the others zeroed (none
    for MUDD, whose last aggregation reads every slot). Later ones add (`+=`)."""
    if G is not None:
        return G, True
    G = torch.empty_like(buf)
    read = range(buf.shape[0])[slots]
    for j in range(buf.shape[0]):
        if j not in read:
            G[j].zero_()
    return G, False


def _hold_buffer(ctx, buf: Tensor, slots: slice, *saved: Tensor) -> None:
    """An aggregation's forward bookkeeping: the buffer as a ctx attribute, a detached
    alias (I3, I6: not a saved tensor), the slots it reads, `saved` saved for backward,
    buf marked dirty (returned as the next version, I2) and no zero-filled gradients (a
    None G starts the pass's gradient buffer, I4)."""
    ctx.buf, ctx.slots = buf.detach(), slots
    ctx.save_for_backward(*saved)
    ctx.mark_dirty(buf)
    ctx.set_materialize_grads(False)


class _Push(torch.autograd.Function):
    """buf[j] = x in place; returns buf (dirty). Backward: G[j] -> x, G -> the older buf."""

    @staticmethod
    def forward(ctx, x: Tensor, buf: Tensor, j: int, x_is_leaf: bool) -> Tensor:
        buf[j].copy_(x)
        ctx.mark_dirty(buf)
        ctx.set_materialize_grads(False)
        ctx.j, ctx.x_dtype, ctx.x_is_leaf = j, x.dtype, x_is_leaf
        return buf

    @staticmethod
    @_first_order_only
    def backward(ctx, G: Optional[Tensor]):
        if G is None:  # no aggregation after this push took part in this backward pass
            return None, None, None, None
        g = G[ctx.j]
        if ctx.x_is_leaf or g.dtype != ctx.x_dtype:
            g = g.to(ctx.x_dtype, copy=True)
        return g, G, None, None


class _Aggregate(torch.autograd.Function):
    """Y = depth_aggregate(buf[start:stop:step], A); returns (Y, buf (dirty, unchanged)).
    Backward: G[slots] += A·dY in place, returns (G, dA)."""

    @staticmethod
    def forward(ctx, buf: Tensor, A: Tensor, start: int, stop: int, step: int):
        slots = _as_slice(start, stop, step)
        Y = ops.depth_aggregate(buf[slots], A)
        _hold_buffer(ctx, buf, slots, A)
        return Y, buf

    @staticmethod
    @_first_order_only
    def backward(ctx, dY: Optional[Tensor], G: Optional[Tensor]):
        if dY is None:
            return G, None, None, None, None
        (A,) = ctx.saved_tensors
        G, accumulate = _stack_grad(G, ctx.buf, ctx.slots)
        dA = aggregate_bwd_into(dY, ctx.buf[ctx.slots], A, G[ctx.slots], accumulate)
        return G, (dA if ctx.needs_input_grad[1] else None), None, None, None


class _AggregateQKVNorm(torch.autograd.Function):
    """X = depth_aggregate_qkv_norm(buf[slots], A, g, eps); returns (X, buf (dirty,
    unchanged)). Backward: G[slots] += the slots' gradient in place, returns (G, dA,
    dg). Fused: the kernels, rstd saved from the forward. Otherwise: the norm backward
    gives dY (4·N·d), then aggregate_bwd_into's in-place slot-by-slot fallback (never
    an l·N·d tensor)."""

    @staticmethod
    def forward(ctx, buf: Tensor, A: Tensor, g: Tensor, start: int, stop: int, step: int,
                eps: float):
        slots = _as_slice(start, stop, step)
        S = buf[slots]
        l, d, tok = S.shape[0], S.shape[-1], S.shape[1:-1]
        ctx.fused = fusable(S, A, g)  # the dispatch rule of ops.depth_aggregate_qkv_norm
        if ctx.fused:
            N = tok.numel()
            A3 = A if A.dim() == 2 else A.reshape(N, 4, l)
            X, rstd = depth_aggregate_qkv_norm_op(S.reshape(l, N, d), A3, g, float(eps))
            X = X.view(4, *tok, d)
        else:
            X = ops.depth_aggregate_qkv_norm(S, A, g, eps)
            rstd = A.new_empty(0)
        _hold_buffer(ctx, buf, slots, A, g, rstd)
        ctx.eps = eps
        return X, buf

    @staticmethod
    @_first_order_only
    def backward(ctx, dX: Optional[Tensor], G: Optional[Tensor]):
        if dX is None:
            return G, None, None, None, None, None, None
        A, g, rstd = ctx.saved_tensors
        G, accumulate = _stack_grad(G, ctx.buf, ctx.slots)
        S, dS = ctx.buf[ctx.slots], G[ctx.slots]
        if ctx.fused:
            l, d, N = S.shape[0], S.shape[-1], S.shape[1:-1].numel()
            A3 = A if A.dim() == 2 else A.reshape(N, 4, l)
            dA, dg = depth_aggregate_qkv_norm_bwd_op(dX.reshape(4, N, d), S.reshape(l, N, d), A3, g,
                                                     rstd, dS.view(l, N, d), accumulate, float(ctx.eps))
            dA = dA.view(A.shape)
        else:
            dY, dg = qkv_norm_bwd(dX, S, A, g, ctx.eps)
            dA = aggregate_bwd_into(dY, S, A, dS, accumulate)
            dg = dg.to(g.dtype)
        return (G, dA if ctx.needs_input_grad[1] else None,
                dg if ctx.needs_input_grad[2] else None, None, None, None, None)


class DepthStack:
    """The depth stack of one forward pass: slot 0 = embedding, slot j = output of
    block j-1, in one preallocated (n_slots, *tok, d) buffer (module docstring).

    n_slots:    L + 1 for an L-block model
    slot_shape: (*tok, d) of every slot
    dtype, device: of the buffer (the activation dtype)
    """

    def __init__(self, n_slots: int, slot_shape: Sequence[int], *,
                 dtype: torch.dtype = torch.float32, device=None):
        if isinstance(n_slots, bool) or not isinstance(n_slots, int) or n_slots < 1:
            raise ValueError(f"n_slots must be a positive int, got {n_slots!r}")
        slot_shape = tuple(int(s) for s in slot_shape)
        if len(slot_shape) < 2:
            raise ValueError(f"slot_shape must be (*tok, d) with at least one token dim, "
                             f"got {slot_shape}")
        self._buf = torch.empty(n_slots, *slot_shape, dtype=dtype, device=device)
        self._len = 0
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
        return self._buf.shape[0]

    @property
    def slot_shape(self) -> tuple:
        return tuple(self._buf.shape[1:])

    @property
    def dtype(self) -> torch.dtype:
        return self._buf.dtype

    @property
    def device(self) -> torch.device:
        return self._buf.device

    def __len__(self) -> int:
        """Number of filled slots."""
        return self._len

    @property
    def newest(self) -> Tensor:
        """The tensor pushed last (autograd-tracked; not the buffer's copy)."""
        if self._newest is None:
            raise RuntimeError("the stack is empty: push a tensor first")
        return self._newest

    @property
    def buffer(self) -> Tensor:
        """The whole (n_slots, *tok, d) buffer, detached (for inspection only)."""
        return self._buf.detach()

    def __repr__(self) -> str:
        return (f"DepthStack({self._len}/{self.n_slots} slots of {self.slot_shape}, "
                f"{self.dtype}, {self.device})")

    # ------------------------------------------------------------------ forward
    def push(self, x: Tensor) -> None:
        """Copy x (*tok, d) into the next free slot, in place."""
        check_tensor("x", x)
        if self._len >= self.n_slots:
            raise RuntimeError(f"the stack is full ({self.n_slots} slots); a DepthStack "
                               "holds one forward pass")
        if tuple(x.shape) != self.slot_shape:
            raise ValueError(f"x must have the stack's slot shape {self.slot_shape}, "
                             f"got {tuple(x.shape)}")
        if x.device != self.device:
            raise ValueError(f"x is on {x.device} but the stack is on {self.device}")
        j = self._len
        # The newest buffer version (the same storage) replaces the old one (module doc).
        # Under no_grad (a frozen block) x gets no gradient, as in PyTorch, but the push
        # still joins the chain: an untracked buffer version would cut every earlier
        # slot off from the aggregations that follow.
        tracked = torch.is_grad_enabled()
        with torch.enable_grad():
            self._buf = _Push.apply(x if tracked else x.detach(), self._buf, j,
                                    tracked and x.requires_grad and x.is_leaf)
        self._newest = x
        self._len += 1

    def _slots(self, slots: Optional[slice]) -> slice:
        if slots is None:
            return slice(0, self._len)
        if not isinstance(slots, slice):
            raise TypeError(f"slots must be a slice or None, got {type(slots).__name__}")
        idx = range(self.n_slots)[slots]
        if len(idx) == 0:
            raise ValueError(f"slots {slots} select no slot")
        if max(idx) >= self._len:
            raise ValueError(f"slots {slots} read slot {max(idx)} but only "
                             f"{self._len} slots are filled")
        return slice(idx.start, idx.stop, idx.step)

    def aggregate(self, A: Tensor, slots: Optional[slice] = None) -> Tensor:
        """Y_c = Σ_j A[.., c, j]·S_j over S = buf[slots] (default: every filled slot).

        A: (*tok, C, l) per token or (C, l) static, l = number of selected slots.
        returns Y: (C, *tok, d) in the stack's dtype.
        """
        s = self._slots(slots)
        validate_depth_aggregate(self._buf[s], A)
        if not torch.is_grad_enabled():  # no node: the buffer's chain stays as it is
            return ops.depth_aggregate(self._buf[s].detach(), A)
        Y, self._buf = _Aggregate.apply(self._buf, A, s.start, s.stop, s.step)
        return Y

    def aggregate_qkv_norm(self, A: Tensor, norm_weights: Tensor, eps: float = 1e-6,
                           slots: Optional[slice] = None) -> Tensor:
        """A MUDDFormer block input (ops.depth_aggregate_qkv_norm) over S = buf[slots]:
        Out_c = rms_norm(Y_c)·g_c for the ways q, k, v (c < 3), Out_3 = Y_3 (r, raw),
        Y_c = Σ_j A[.., c, j]·S_j.

        A: (*tok, 4, l) or (4, l); norm_weights: (3, d); eps: the RMSNorm epsilon.
        returns Out: (4, *tok, d) in the stack's dtype.
        """
        s = self._slots(slots)
        validate_depth_aggregate_qkv_norm(self._buf[s], A, norm_weights)
        if not torch.is_grad_enabled():  # no node: the buffer's chain stays as it is
            return ops.depth_aggregate_qkv_norm(self._buf[s].detach(), A, norm_weights, eps)
        X, self._buf = _AggregateQKVNorm.apply(self._buf, A, norm_weights, s.start, s.stop, s.step, eps)
        return X


def stack_bytes(n_slots: int, slot_shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes of one buffer (the forward stack, or its gradient)."""
    return n_slots * math.prod(slot_shape) * torch.empty((), dtype=dtype).element_size()
