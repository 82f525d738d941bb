"""First derivatives only: the autograd pieces behind crosslayer's one refusal of second
derivatives (README "Second derivatives"; issue 14).

crosslayer's ops differentiate once, on every path. A gradient taken through one with
create_graph=True is exact and may be used as a value (a gradient penalty's norm, a
logged statistic), but differentiating it again raises a RuntimeError that names the op
and points to its crosslayer.ref oracle, which differentiates to any order. The paths:

  kernel path (CUDA; CPU tensors inside `emulate(module)`): the fused backward kernels
      have no derivative of their own. A functional backward custom op (`*_bwd` without
      mutated arguments, `stream_mix_dots`) takes `refusing_backward(...)` as its
      autograd formula, so its outputs refuse. A mutating one (its gradient buffer is
      written in place: `depth_aggregate_bwd`, `hc_pre_bwd`, ...) cannot take an
      autograd formula (torch.library refuses register_autograd on a non-functional
      schema), so the backward that calls it is wrapped in `first_order_backward(...,
      connect_saved=True)`: it runs without grad mode and hands each gradient on through
      RefuseSecondDerivative.
  oracle path (CPU tensors outside emulate, CUDA without the extension, dtype mixes the
      kernels do not cover): the public function runs crosslayer.ref through
      `oracle_first_order`, which routes the differentiable inputs through an identity
      node whose backward refuses; without it plain PyTorch differentiated the oracle to
      any order, and the two paths disagreed.
  DepthStack: its in-place backward chain is wrapped in `first_order_backward` with its
      own message (nn/depth_stack.py).

First derivatives never change: the refusal nodes pass values through (a copy), and
with create_graph=False (grad mode off inside backward) the wrappers do nothing at all,
so torch.compile traces the same graphs as before.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["no_double_backward_message", "RefuseSecondDerivative", "first_order_backward", "refusing_backward",
           "oracle_first_order"]


def no_double_backward_message(op: str, oracle: Optional[str] = None, detail: Optional[str] = None) -> str:
    """The refusal of crosslayer.ops.<op>; `oracle`: the crosslayer.ref function that
    differentiates to any order (default: op's namesake); `detail`: a parenthesis after
    the op (e.g. which backward op refused)."""
    why = f" ({detail})" if detail else ""
    return (f"crosslayer.ops.{op} does not support double backward{why}: a gradient taken through it with "
            f"create_graph=True is exact and can be used as a value, but not differentiated again "
            f"(crosslayer's ops are first-order only on every path: fused CUDA kernels, the emulator and "
            f"the CPU oracle alike). For second and higher derivatives use crosslayer.ref.{oracle or op}, "
            f"the pure-PyTorch oracle, which differentiates to any order.")


class RefuseSecondDerivative(torch.autograd.Function):
    """value, returned as a copy whose gradient is an error: the node joins the graph of
    `connected` (tensors that require grad: the first backward's incoming gradients, the
    op's saved inputs), so a second derivative through it reaches backward() and raises
    RuntimeError(message)."""

    @staticmethod
    def forward(ctx, message: str, value: Tensor, *connected: Tensor) -> Tensor:
        ctx.message = message
        return value.clone()  # not a view: later backward nodes may add into it in place

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


def first_order_backward(message: str, connect_saved: bool = False) -> Callable:
    """Decorator of a backward (an autograd.Function's, or a custom op's registered
    formula) that is first-order only. With grad mode off (create_graph=False, and every
    torch.compile trace) it runs as it is. With grad mode on it runs without grad mode,
    and when something the result depends on requires grad (an incoming gradient, or a
    saved tensor with `connect_saved`) each returned tensor is handed on through
    RefuseSecondDerivative: the first derivative is exact, differentiating it raises
    `message`. torch's once_differentiable is not used: its error node hangs off fresh
    leaves, so a second derivative with respect to the inputs reports them as unused
    (or, with allow_unused, returns None) instead of raising."""

    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            if not torch.is_grad_enabled():
                return backward(ctx, *grads)
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            connected = [g for g in grads if isinstance(g, Tensor) and g.requires_grad]
            if connect_saved:
                connected += [t for t in ctx.saved_tensors if t is not None and t.requires_grad]
            if not connected:
                return outputs
            return tuple(RefuseSecondDerivative.apply(message, v, *connected) if isinstance(v, Tensor) else v
                         for v in outputs)

        return wrapper

    return decorate


def refusing_backward(op: str, backward_op: str, oracle: Optional[str] = None) -> Callable:
    """The autograd formula of a functional backward custom op (`crosslayer::<op>_bwd`):
    differentiating its outputs raises the refusal of crosslayer.ops.<op>."""
    message = no_double_backward_message(op, oracle, f"its backward op crosslayer::{backward_op} has no derivative")

    def backward(ctx, *grads):
        raise RuntimeError(message)

    return backward


class _FirstOrderInputs(torch.autograd.Function):
    """The oracle path's entry: the inputs, as views (values and strides unchanged).
    Backward hands the gradients on unchanged; with grad mode on (create_graph=True) a
    gradient that requires grad -- it does whenever the oracle's backward depends on an
    input -- is handed on through RefuseSecondDerivative, so the first derivative is
    exact and differentiating it raises."""

    @staticmethod
    def forward(ctx, message: str, *tensors: Tensor):
        ctx.message = message
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        if torch.is_grad_enabled():
            grads = tuple(RefuseSecondDerivative.apply(ctx.message, g, g)
                          if isinstance(g, Tensor) and g.requires_grad else g for g in grads)
        return (None, *grads)


def oracle_first_order(op: str, fn: Callable, *args, oracle: Optional[str] = None, **kwargs):
    """fn(*args, **kwargs) -- a crosslayer.ref function, the oracle path of the public
    function crosslayer.ops.<op> -- first-order only: the tensor arguments that require
    grad enter through one identity node whose backward refuses a second derivative
    (no_double_backward_message(op, oracle)). Outputs the oracle returns as they are
    (a parameter passed through) are the caller's tensors again, as on the kernel path.
    Without grad mode, or with nothing requiring grad, this is fn(*args, **kwargs)."""
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    where = [i for i, a in enumerate(args) if isinstance(a, Tensor) and a.requires_grad]
    if not where:
        return fn(*args, **kwargs)
    views = _FirstOrderInputs.apply(no_double_backward_message(op, oracle), *(args[i] for i in where))
    originals = [args[i] for i in where]
    args = list(args)
    for i, v in zip(where, views):
        args[i] = v

    def caller_tensor(o):
        for v, a in zip(views, originals):
            if o is v:
                return a
        return o

    out = fn(*args, **kwargs)
    return tuple(caller_tensor(o) for o in out) if isinstance(out, tuple) else caller_tensor(out)
