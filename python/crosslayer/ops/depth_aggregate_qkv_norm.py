"""depth_aggregate_qkv_norm on the GPU: custom ops over crosslayer._C, their autograd,
and the public function that mirrors `crosslayer.ref.depth_aggregate_qkv_norm`.

Layers, bottom up:
  _C.depth_aggregate_qkv_norm_fwd / _bwd              pybind11 launchers (csrc/depth_aggregate_qkv_norm.cu)
  torch.ops.crosslayer.depth_aggregate_qkv_norm   custom op + fake + autograd: (Out, rstd);
                                                  rstd (3, N) = rsqrt(mean Y_c² + eps) is
                                                  saved for the backward, not differentiable
  torch.ops.crosslayer.depth_aggregate_qkv_norm_slots
                                                  custom op + fake, no autograd: (Out, rstd)
                                                  over a list of slots anywhere in memory
                                                  (DepthStack's, whose Functions
                                                  differentiate it)
  torch.ops.crosslayer.depth_aggregate_qkv_norm_bwd
                                                  custom op mutating dS (= or +=); returns
                                                  (dA, dnorm_weights); S a list of slots
  depth_aggregate_qkv_norm(S, A, norm_weights)    any token dims; validates; dispatches

The backward saves S, A, norm_weights and rstd, not Y: the kernel recomputes Y from S,
which it reads anyway. The custom ops run the fused kernels on CUDA tensors and the
oracle on CPU tensors, so their registration is exercised by opcheck and torch.compile
on any machine.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor

from crosslayer import ref
from crosslayer._autograd import first_order_backward, no_double_backward_message, oracle_first_order
from crosslayer._checks import acc_dtype
from crosslayer._extension import kernels_for
from crosslayer.ops._common import fusable
from crosslayer.contracts import validate_depth_aggregate_qkv_norm
from crosslayer.ops.depth_aggregate import check_flat_slots


def check_depth_aggregate_qkv_norm_op(S, A, norm_weights, eps) -> None:
    """What crosslayer::depth_aggregate_qkv_norm and its fake both check (one function, so
    the op never returns a result its fake does not declare): S (l, N, d), A (N, 4, l) or
    (4, l), norm_weights (3, d), eps > 0. Metadata and Python numbers only."""
    check_flat_slots("crosslayer::depth_aggregate_qkv_norm", S)
    validate_depth_aggregate_qkv_norm(S, A, norm_weights, eps)


def _rstd(S: Tensor, A: Tensor, eps: float) -> Tensor:
    """The oracle's rstd (3, N) in the arithmetic dtype (CPU path of the forward op)."""
    acc = acc_dtype(S.dtype)
    Y = ref.depth_aggregate(S.to(acc), A.to(acc))[:3]
    return torch.rsqrt(Y.square().mean(-1) + eps).contiguous()


@torch.library.custom_op("crosslayer::depth_aggregate_qkv_norm", mutates_args=())
def depth_aggregate_qkv_norm_op(S: Tensor, A: Tensor, norm_weights: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """(Out, rstd). S: (l, N, d); A: (N, 4, l) or (4, l); norm_weights: (3, d).

    Out: (4, N, d) in S's dtype; rstd: (3, N) in the arithmetic dtype. Refuses other
    ranks (check_depth_aggregate_qkv_norm_op), as its fake does.
    """
    check_depth_aggregate_qkv_norm_op(S, A, norm_weights, eps)
    kernels = kernels_for(S, "depth_aggregate_qkv_norm")
    if kernels is not None:
        out, rstd = kernels.depth_aggregate_qkv_norm_fwd(S.unbind(0), A, norm_weights, eps)
        return out, rstd
    acc = acc_dtype(S.dtype)
    out = ref.depth_aggregate_qkv_norm(S, A.to(acc), norm_weights.to(acc), eps)
    return out.clone(memory_format=torch.contiguous_format), _rstd(S, A, eps)


@depth_aggregate_qkv_norm_op.register_fake
def _depth_aggregate_qkv_norm_fake(S, A, norm_weights, eps):
    check_depth_aggregate_qkv_norm_op(S, A, norm_weights, eps)
    return S.new_empty((4, S.shape[1], S.shape[2])), S.new_empty((3, S.shape[1]), dtype=acc_dtype(S.dtype))


@torch.library.custom_op("crosslayer::depth_aggregate_qkv_norm_slots", mutates_args=())
def depth_aggregate_qkv_norm_slots_op(S: List[Tensor], A: Tensor, norm_weights: Tensor,
                                      eps: float) -> Tuple[Tensor, Tensor]:
    """depth_aggregate_qkv_norm_op over l slots anywhere in memory (read where they lie).

    S: l tensors (N, d) of one shape and dtype; the rest as depth_aggregate_qkv_norm_op.
    No autograd formula: DepthStack's Functions differentiate it.
    """
    kernels = kernels_for(S[0], "depth_aggregate_qkv_norm")
    if kernels is not None:
        out, rstd = kernels.depth_aggregate_qkv_norm_fwd(S, A, norm_weights, eps)
        return out, rstd
    return depth_aggregate_qkv_norm_op(torch.stack(S), A, norm_weights, eps)


@depth_aggregate_qkv_norm_slots_op.register_fake
def _depth_aggregate_qkv_norm_slots_fake(S, A, norm_weights, eps):
    return S[0].new_empty((4, *S[0].shape)), S[0].new_empty((3, S[0].shape[0]), dtype=acc_dtype(S[0].dtype))


@torch.library.custom_op("crosslayer::depth_aggregate_qkv_norm_bwd", mutates_args=("dS",))
def depth_aggregate_qkv_norm_bwd_op(dOut: Tensor, S: List[Tensor], A: Tensor, norm_weights: Tensor, rstd: Tensor,
                                    dS: Tensor, accumulate: bool, eps: float) -> Tuple[Tensor, Tensor]:
    """dS (+)= the slots' gradient in place (`+=` when accumulate, else `=`); returns
    (dA, dnorm_weights).

    dOut: (4, N, d) in the slots' dtype; S: l slots (N, d) (a stack's unbind); rstd:
    (3, N) from the forward; eps: the forward's (the CPU path recomputes from S). dA has A's shape and dtype (summed over tokens for
    static A); dnorm_weights has norm_weights' shape and dtype.
    """
    kernels = kernels_for(S[0], "depth_aggregate_qkv_norm")
    if kernels is not None:
        dA, dg = kernels.depth_aggregate_qkv_norm_bwd(dOut, S, A, norm_weights, rstd, dS, accumulate)
        return dA, dg
    acc = acc_dtype(S[0].dtype)
    dS_new, dA, dg = ref.depth_aggregate_qkv_norm_bwd(dOut, torch.stack(S), A.to(acc), norm_weights.to(acc), eps)
    if accumulate:
        dS.add_(dS_new)
    else:
        dS.copy_(dS_new)
    return dA.to(A.dtype).contiguous(), dg.to(norm_weights.dtype).contiguous()


@depth_aggregate_qkv_norm_bwd_op.register_fake
def _depth_aggregate_qkv_norm_bwd_fake(dOut, S, A, norm_weights, rstd, dS, accumulate, eps):
    return A.new_empty(A.shape), norm_weights.new_empty(norm_weights.shape)


def _setup_context(ctx, inputs, output) -> None:
    S, A, norm_weights, eps = inputs
    _, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(S, A, norm_weights, rstd)
    ctx.eps = eps


# depth_aggregate_qkv_norm_bwd mutates dS, so it cannot take an autograd formula (torch.library refuses one
# on a non-functional schema): its callers' backward refuses second derivatives instead.
@first_order_backward(no_double_backward_message("depth_aggregate_qkv_norm"), connect_saved=True)
def _backward(ctx, dOut: Tensor, drstd):
    S, A, norm_weights, rstd = ctx.saved_tensors
    dS = torch.empty(S.shape, dtype=S.dtype, device=S.device)
    dA, dg = depth_aggregate_qkv_norm_bwd_op(dOut, S.unbind(0), A, norm_weights, rstd, dS, False, ctx.eps)
    return dS, dA, dg, None


depth_aggregate_qkv_norm_op.register_autograd(_backward, setup_context=_setup_context)


def depth_aggregate_qkv_norm(S: Tensor, A: Tensor, norm_weights: Tensor, eps: float = 1e-6) -> Tensor:
    """MUDD block input: 4-way depth aggregate, q, k, v RMS-normed (see crosslayer.ref).

    S: (l, *tok, d)               depth slots, any slot and token strides (e.g. full[:l]);
                                  a feature dim with non-unit stride is copied once
    A: (*tok, 4, l) or (4, l)     per-token or static weights, ways (q, k, v, r)
    norm_weights: (3, d)          RMSNorm weights of q, k, v
    eps: RMSNorm epsilon
    returns Out: (4, *tok, d)     dtype of S: rms_norm(Y_c)·g_c for c < 3, Y_3 raw

    Fused on CUDA when the extension is built (one kernel each way); the oracle
    otherwise, and for float64 weights with lower-precision S (the kernel computes in
    float32 for those). First derivatives only, on every path
    (crosslayer.ref.depth_aggregate_qkv_norm differentiates to any order).
    """
    validate_depth_aggregate_qkv_norm(S, A, norm_weights, eps)
    if not fusable("depth_aggregate_qkv_norm", S, A, norm_weights):
        return oracle_first_order("depth_aggregate_qkv_norm", ref.depth_aggregate_qkv_norm, S, A, norm_weights, eps)
    l, d = S.shape[0], S.shape[-1]
    tok = S.shape[1:-1]
    N = tok.numel()  # not -1: reshape cannot infer it when d = 0
    Out, _ = depth_aggregate_qkv_norm_op(S.reshape(l, N, d), A if A.dim() == 2 else A.reshape(N, 4, l),
                                         norm_weights, float(eps))
    return Out.view(4, *tok, d)
