"""mudd_weights on the GPU: the custom ops over crosslayer._C, their autograd, and the
public function that mirrors `crosslayer.ref.mudd_weights`.

Layers, bottom up:
  _C.mudd_weights_fwd / _bwd              pybind11 launchers (csrc/mudd_weights.cu)
  torch.ops.crosslayer.mudd_weights       custom op + fake + autograd: (A, u, r);
                                          u = rms(x)·W1 and r = rsqrt(mean x² + eps) are
                                          saved for the backward, not differentiable
  torch.ops.crosslayer.mudd_weights_bwd   custom op: (dx, dW1, dW2b = [dW2; dbias]), split
                                          by split_dW2b (summed together; outputs of a custom
                                          op may not alias each other)
  mudd_weights(x, W1, W2, bias, n_ways, eps, approximate)
                                          validates once, then the op above (CUDA, _C
                                          built, parameters no wider than the arithmetic
                                          dtype) or the oracle

x: (*tok, d) with any token strides. A, u, r are contiguous in the arithmetic dtype
(float64 for float64 x, float32 otherwise); dx is contiguous in x's dtype; parameter
gradients are summed over tokens (deterministically) and come back in each parameter's
dtype.

The custom ops run the fused kernels on CUDA tensors and the oracle on CPU tensors, so
their registration is exercised by opcheck and torch.compile on any machine.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from crosslayer import ref
from crosslayer._autograd import oracle_first_order, refusing_backward
from crosslayer._checks import acc_dtype
from crosslayer._extension import kernels_for
from crosslayer.ops._common import fusable
from crosslayer.contracts import check_approximate, validate_mudd_weights


def _projection(x: Tensor, W1: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """The oracle's (u, r) in the arithmetic dtype: r = rsqrt(mean_d x² + eps), u = (x·r)·W1."""
    acc = acc_dtype(x.dtype)
    xf = x.to(acc)
    r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return ((xf * r) @ W1.to(acc)).contiguous(), r.squeeze(-1).contiguous()


@torch.library.custom_op("crosslayer::mudd_weights", mutates_args=())
def mudd_weights_op(x: Tensor, W1: Tensor, W2: Tensor, bias: Tensor, n_ways: int, eps: float,
                    approximate: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(A, u, r) of mudd_weights.

    x: (*tok, d); W1: (d, K); W2: (K, C*l); bias: (C*l,) or (C, l); n_ways = C.
    A: (*tok, C, l); u = rms(x)·W1: (*tok, K); r = rsqrt(mean_d x² + eps): (*tok,)
    (arithmetic dtype).
    """
    kernels = kernels_for(x, "mudd_weights")
    if kernels is not None:
        A, u, r = kernels.mudd_weights_fwd(x, W1, W2, bias, n_ways, eps, approximate)
        return A, u, r
    acc = acc_dtype(x.dtype)
    A = ref.mudd_weights(x, W1.to(acc), W2.to(acc), bias.to(acc), n_ways, eps, approximate)
    u, r = _projection(x, W1, eps)
    return A.contiguous(), u, r


@mudd_weights_op.register_fake
def _mudd_weights_fake(x, W1, W2, bias, n_ways, eps, approximate):
    lead, K, Cl = x.shape[:-1], W1.shape[1], W2.shape[1]
    acc = acc_dtype(x.dtype)
    return (x.new_empty((*lead, n_ways, Cl // n_ways), dtype=acc), x.new_empty((*lead, K), dtype=acc),
            x.new_empty(lead, dtype=acc))


@torch.library.custom_op("crosslayer::mudd_weights_bwd", mutates_args=())
def mudd_weights_bwd_op(dA: Tensor, x: Tensor, W1: Tensor, W2: Tensor, bias: Tensor, u: Tensor,
                        r: Tensor, n_ways: int, eps: float,
                        approximate: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dW1, dW2b) of mudd_weights.

    dA: (*tok, C, l); u, r: from mudd_weights_op; eps, approximate: the forward's (the
    CPU path recomputes from x). dx is contiguous in x's dtype, dW1 in W1's; dW2b:
    (K + 1, C*l) in the arithmetic dtype, rows :K dW2 and row K dbias (split_dW2b).
    Parameter gradients are summed over tokens.
    """
    kernels = kernels_for(x, "mudd_weights")
    if kernels is not None:
        dx, dW1, dW2b = kernels.mudd_weights_bwd(dA, x, W1, W2, bias, u, r, n_ways, eps, approximate, None)
        return dx, dW1, dW2b
    dx, dW1, dW2b = _bwd_oracle(dA, x, W1, W2, bias, n_ways, eps, approximate)
    return dx.contiguous(), dW1, dW2b


def _bwd_oracle(dA, x, W1, W2, bias, n_ways, eps, approximate) -> Tuple[Tensor, Tensor, Tensor]:
    """The CPU path of the backward ops: (dx, dW1 in W1's dtype, dW2b) from the oracle in
    the arithmetic dtype."""
    acc = acc_dtype(x.dtype)
    dx, dW1, dW2, dbias = ref.mudd_weights_bwd(dA.to(acc), x, W1.to(acc), W2.to(acc), bias.to(acc),
                                               n_ways, eps, approximate)
    return dx, dW1.to(W1.dtype).contiguous(), torch.cat([dW2, dbias.reshape(1, -1)])


@mudd_weights_bwd_op.register_fake
def _mudd_weights_bwd_fake(dA, x, W1, W2, bias, u, r, n_ways, eps, approximate):
    return (x.new_empty(x.shape), W1.new_empty(W1.shape),
            x.new_empty((W2.shape[0] + 1, W2.shape[1]), dtype=acc_dtype(x.dtype)))


@torch.library.custom_op("crosslayer::mudd_weights_bwd_into", mutates_args=("dx",))
def mudd_weights_bwd_into_op(dA: Tensor, x: Tensor, W1: Tensor, W2: Tensor, bias: Tensor, u: Tensor,
                             r: Tensor, n_ways: int, eps: float, approximate: str,
                             dx: Tensor) -> Tuple[Tensor, Tensor]:
    """mudd_weights_bwd_op with dx added into a given tensor in place (dx += ..., a depth
    stack's gradient buffer: no dx of its own, no separate add); returns (dW1, dW2b).

    dx: x's shape and dtype. The rest as mudd_weights_bwd_op.
    """
    kernels = kernels_for(x, "mudd_weights")
    if kernels is not None:
        _, dW1, dW2b = kernels.mudd_weights_bwd(dA, x, W1, W2, bias, u, r, n_ways, eps, approximate, dx)
        return dW1, dW2b
    dx_new, dW1, dW2b = _bwd_oracle(dA, x, W1, W2, bias, n_ways, eps, approximate)
    dx.add_(dx_new)
    return dW1, dW2b


@mudd_weights_bwd_into_op.register_fake
def _mudd_weights_bwd_into_fake(dA, x, W1, W2, bias, u, r, n_ways, eps, approximate, dx):
    return W1.new_empty(W1.shape), x.new_empty((W2.shape[0] + 1, W2.shape[1]), dtype=acc_dtype(x.dtype))


def split_dW2b(dW2b: Tensor, W2: Tensor, bias: Tensor) -> Tuple[Tensor, Tensor]:
    """(dW2, dbias) from mudd_weights_bwd_op's dW2b, each in its parameter's dtype and
    shape: views of dW2b when the dtypes already agree (no copy)."""
    K = W2.shape[0]
    return dW2b[:K].to(W2.dtype), dW2b[K].reshape(bias.shape).to(bias.dtype)


def _mudd_weights_setup(ctx, inputs, output) -> None:
    x, W1, W2, bias, n_ways, eps, approximate = inputs
    _, u, r = output
    ctx.mark_non_differentiable(u, r)
    # u and r only carry the forward's work to the backward: no zero gradients are
    # materialised for them (two fill launches a call); dA may then be None too.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, W1, W2, bias, u, r)
    ctx.n_ways, ctx.eps, ctx.approximate = n_ways, eps, approximate


def _mudd_weights_backward(ctx, dA, du, dr):
    x, W1, W2, bias, u, r = ctx.saved_tensors
    if dA is None:
        dA = u.new_zeros((*x.shape[:-1], ctx.n_ways, W2.shape[1] // ctx.n_ways))
    dx, dW1, dW2b = mudd_weights_bwd_op(dA, x, W1, W2, bias, u, r, ctx.n_ways, ctx.eps, ctx.approximate)
    return (dx, dW1, *split_dW2b(dW2b, W2, bias), None, None, None)


mudd_weights_op.register_autograd(_mudd_weights_backward, setup_context=_mudd_weights_setup)
mudd_weights_bwd_op.register_autograd(refusing_backward("mudd_weights", "mudd_weights_bwd"))  # first order only


def mudd_weights(x: Tensor, W1: Tensor, W2: Tensor, bias: Tensor, n_ways: int, eps: float = 1e-6,
                 approximate: str = "none") -> Tensor:
    """MUDD dynamic depth weights A = GELU(rms(x) @ W1) @ W2 + bias, C-major
    (see crosslayer.ref.mudd_weights).

    x:    (*tok, d)               block output the weights are computed from; any token
                                  strides (a feature dim with non-unit stride is copied once)
    W1:   (d, K)
    W2:   (K, C*l)                column c*l + j is way c, slot j
    bias: (C*l,) or (C, l)
    n_ways: C; eps: rms epsilon; approximate: "none" (erf GELU) or "tanh"
    returns A: (*tok, C, l)       arithmetic dtype (float32; float64 for float64 x)

    Fused on CUDA when the extension is built (bf16/fp16 x: tensor-core kernels with W1
    split into 16-bit hi + lo parts; fp32/fp64 x: at::mm for the projections); the
    oracle otherwise, and for float64 parameters with lower-precision x. First derivatives
    only, on every path (crosslayer.ref.mudd_weights differentiates to any order).
    """
    validate_mudd_weights(x, W1, W2, bias, n_ways, eps)
    check_approximate(approximate)
    if not (fusable("mudd_weights", x, W1, W2, bias) and x.shape[-1] >= 1 and W1.shape[1] >= 1):
        return oracle_first_order("mudd_weights", ref.mudd_weights, x, W1, W2, bias, n_ways, eps, approximate)
    A, _, _ = mudd_weights_op(x, W1, W2, bias, n_ways, eps, approximate)
    return A
