"""depth_aggregate on the GPU: custom ops over crosslayer._C, their autograd, and the
public function that mirrors `crosslayer.ref.depth_aggregate`.

Layers, bottom up:
  _C.depth_aggregate_fwd / _bwd                 pybind11 launchers (csrc/depth_aggregate.cu);
                                                S is a list of l slots (N, d)
  torch.ops.crosslayer.depth_aggregate          custom op + fake + autograd; S (l, N, d)
  torch.ops.crosslayer.depth_aggregate_slots    custom op + fake, no autograd; S a list of
                                                slots anywhere in memory (DepthStack's,
                                                whose Functions differentiate it)
  torch.ops.crosslayer.depth_aggregate_bwd      custom op mutating dS (= or +=), returns dA;
                                                S a list of slots
  depth_aggregate(S, A)                         any token dims; validates; dispatches

The custom ops run the fused kernels on CUDA tensors and the oracle on CPU tensors, so
their registration (schema, fake, autograd, mutation) is exercised by opcheck and
torch.compile on any machine. The public function sends CPU tensors, and CUDA tensors
when the extension is not built, straight to the oracle.
"""

from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from crosslayer import ref
from crosslayer._autograd import first_order_backward, no_double_backward_message, oracle_first_order
from crosslayer._checks import check_tensor
from crosslayer._extension import kernels_for, runs_kernels
from crosslayer.contracts import validate_depth_aggregate


def check_flat_slots(op: str, S) -> None:
    """S of a custom op over flattened tokens: a float tensor (l, N, d), 3 dims (the public
    function flattens any token dims into one before it calls the op)."""
    check_tensor("S", S)
    if S.dim() != 3:
        raise ValueError(f"{op}: S must have shape (l, N, d), the token dims flattened into one "
                         f"(3 dims; the public function takes any token dims), got shape {tuple(S.shape)}")


def check_depth_aggregate_op(S, A) -> None:
    """What crosslayer::depth_aggregate and its fake both check (one function, so the op
    never returns a result its fake does not declare): S (l, N, d), A (N, C, l) or
    (C, l), as validate_depth_aggregate states them. Metadata only, no device sync."""
    check_flat_slots("crosslayer::depth_aggregate", S)
    validate_depth_aggregate(S, A)


@torch.library.custom_op("crosslayer::depth_aggregate", mutates_args=())
def depth_aggregate_op(S: Tensor, A: Tensor) -> Tensor:
    """Y_c = Σ_j A[.., c, j]·S_j.  S: (l, N, d); A: (N, C, l) or (C, l) -> Y: (C, N, d).
    Refuses other ranks (check_depth_aggregate_op), as its fake does."""
    check_depth_aggregate_op(S, A)
    kernels = kernels_for(S, "depth_aggregate")
    if kernels is not None:
        return kernels.depth_aggregate_fwd(S.unbind(0), A)
    # A custom op's output must not alias an input and must match the fake (contiguous).
    return ref.depth_aggregate(S, A).clone(memory_format=torch.contiguous_format)


@depth_aggregate_op.register_fake
def _depth_aggregate_fake(S: Tensor, A: Tensor) -> Tensor:
    check_depth_aggregate_op(S, A)
    return S.new_empty((A.shape[-2], S.shape[1], S.shape[2]))


@torch.library.custom_op("crosslayer::depth_aggregate_slots", mutates_args=())
def depth_aggregate_slots_op(S: List[Tensor], A: Tensor) -> Tensor:
    """Y_c = Σ_j A[.., c, j]·S[j] over l slots anywhere in memory (read where they lie).

    S: l tensors (N, d) of one shape and dtype; A: (N, C, l) or (C, l) -> Y: (C, N, d).
    No autograd formula: DepthStack's Functions differentiate it.
    """
    kernels = kernels_for(S[0], "depth_aggregate")
    if kernels is not None:
        return kernels.depth_aggregate_fwd(S, A)
    return ref.depth_aggregate(torch.stack(S), A).contiguous()


@depth_aggregate_slots_op.register_fake
def _depth_aggregate_slots_fake(S: List[Tensor], A: Tensor) -> Tensor:
    return S[0].new_empty((A.shape[-2], *S[0].shape))


@torch.library.custom_op("crosslayer::depth_aggregate_bwd", mutates_args=("dS",))
def depth_aggregate_bwd_op(dY: Tensor, S: List[Tensor], A: Tensor, dS: Tensor, accumulate: bool) -> Tensor:
    """dS (+)= Σ_c A[.., c, j]·dY_c in place (`+=` when accumulate, else `=`); returns dA.

    dY: (C, N, d); S: l slots (N, d) (a stack's unbind); A: (N, C, l) or (C, l);
    dS: (l, N, d), the slots' dtype. dA has A's shape and dtype; for static A it is
    summed over tokens.
    """
    kernels = kernels_for(S[0], "depth_aggregate")
    if kernels is not None:
        return kernels.depth_aggregate_bwd(dY, S, A, dS, accumulate)
    dS_new, dA = ref.depth_aggregate_bwd(dY, torch.stack(S), A)
    if accumulate:
        dS.add_(dS_new)
    else:
        dS.copy_(dS_new)
    return dA.to(A.dtype)


@depth_aggregate_bwd_op.register_fake
def _depth_aggregate_bwd_fake(dY: Tensor, S: List[Tensor], A: Tensor, dS: Tensor, accumulate: bool) -> Tensor:
    return A.new_empty(A.shape)


def _setup_context(ctx, inputs, output) -> None:
    S, A = inputs
    ctx.save_for_backward(S, A)


# depth_aggregate_bwd mutates dS, so it cannot take an autograd formula (torch.library
# refuses one on a non-functional schema): its caller refuses second derivatives instead.
@first_order_backward(no_double_backward_message("depth_aggregate"), connect_saved=True)
def _backward(ctx, dY: Tensor):
    S, A = ctx.saved_tensors
    dS = torch.empty(S.shape, dtype=S.dtype, device=S.device)
    dA = depth_aggregate_bwd_op(dY, S.unbind(0), A, dS, False)
    return dS, dA


depth_aggregate_op.register_autograd(_backward, setup_context=_setup_context)


def depth_aggregate(S: Tensor, A: Tensor) -> Tensor:
    """Weighted sums of depth slots: Y_c = Σ_j A[..., c, j]·S_j (see crosslayer.ref).

    S: (l, *tok, d)               depth slots, any slot and token strides (e.g. full[:l],
                                  full[1::2]); a feature dim with non-unit stride is
                                  copied once before the kernel reads it
    A: (*tok, C, l) or (C, l)     per-token or static weights; the kernel computes in
                                  float32 (float64 for float64 S)
    returns Y: (C, *tok, d)       dtype of S

    Fused on CUDA when the extension is built; the oracle otherwise. First derivatives
    only, on every path (crosslayer.ref.depth_aggregate differentiates to any order).
    """
    validate_depth_aggregate(S, A)
    if not runs_kernels(S, "depth_aggregate"):
        return oracle_first_order("depth_aggregate", ref.depth_aggregate, S, A)
    l, d, C = S.shape[0], S.shape[-1], A.shape[-2]
    tok = S.shape[1:-1]
    N = tok.numel()  # not -1: reshape cannot infer it when d = 0
    Y = depth_aggregate_op(S.reshape(l, N, d), A if A.dim() == 2 else A.reshape(N, C, l))
    return Y.view(C, *tok, d)
