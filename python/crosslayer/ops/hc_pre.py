"""hc_pre on the GPU: the dynamic-HC custom ops over crosslayer._C, their autograd, and
the public function that mirrors `crosslayer.ref.hc_pre`.

Layers, bottom up:
  _C.hc_pre_fwd / _bwd                 pybind11 launchers (csrc/hc_pre.cu)
  torch.ops.crosslayer.hc_pre          custom op + fake + autograd: (x, alpha, beta,
                                           q, r, Wt); q = H·W, r = rsqrt(mean H² + eps)
                                           and Wt (W packed for the kernels) are saved
                                           for the backward, not differentiable
  torch.ops.crosslayer.hc_pre_bwd      custom op: dH (=|+=) in place; (dA, dB, dW, ds_a, ds_b)
  hc_pre(H, A, B, W, s_a, s_b, eps)        validates once; DHC -> the op above; SHC ->
                                           stream_mix(H, A[:, 0]) (one fused kernel each
                                           way) and A and B as alpha and beta
  hc_pre_for_post(...)                     the same plus the H its connection's hc_post
                                           reads: H's gradient accumulates in one tensor

H: (*lead, n, d) with any number of token dims and any token/stream strides. x is
contiguous (*lead, d); alpha, beta, q, r are contiguous in the arithmetic dtype (float64
for float64 H, float32 otherwise); dH is allocated like H; parameter gradients are
summed over tokens (deterministically) and come back in each parameter's dtype.

The custom ops run the fused kernels on CUDA tensors and the oracle on CPU tensors, so
their registration is exercised by opcheck and torch.compile on any machine.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from crosslayer import ref
from crosslayer._autograd import first_order_backward, no_double_backward_message, oracle_first_order
from crosslayer._checks import acc_dtype, compute_dtype
from crosslayer._extension import kernels_for
from crosslayer.ops._common import Scalar, fusable, scalar_tensor
from crosslayer.ops.stream_mix import stream_mix, stream_mix_for_post
from crosslayer.contracts import validate_hc_pre


def _ldw(d: int) -> int:
    """The packed W's row length: d rounded up to 8 (csrc/hc_pre.h's hc_pre_ldw)."""
    return (d + 7) // 8 * 8


def packed_w(W: Tensor, acc: torch.dtype) -> Tensor:
    """W as the kernels read it (csrc/hc_pre.h's hc_pre_pack_w): transposed to (n+2,
    ldw) in the arithmetic dtype, rows zero-padded from d to ldw. The forward packs it
    once; the backward takes it back."""
    d = W.shape[0]
    return torch.nn.functional.pad(W.to(acc).t(), (0, _ldw(d) - d)).contiguous()


def _packed_w_fake(W: Tensor, acc: torch.dtype) -> Tensor:
    d, J = W.shape
    return W.new_empty((J, _ldw(d)), dtype=acc)


def _projection(H: Tensor, W: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """The oracle's (q, r) in the arithmetic dtype: q = H·W, r = rsqrt(mean_d H² + eps)."""
    acc = acc_dtype(H.dtype)
    Hc = H.to(acc)
    r = torch.rsqrt(Hc.square().mean(-1) + eps)
    return (Hc @ W.to(acc)).contiguous(), r.contiguous()


@torch.library.custom_op("crosslayer::hc_pre", mutates_args=())
def hc_pre_op(H: Tensor, A: Tensor, B: Tensor, W: Tensor, s_a: Tensor, s_b: Tensor,
                  eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Dynamic HC: (x, alpha, beta, q, r, Wt).

    H: (*lead, n, d); A: (n, n+1); B: (n,); W: (d, n+2); s_a, s_b: 0-dim.
    x: (*lead, d) in H's dtype; alpha: (*lead, n, n+1); beta: (*lead, n);
    q = H·W: (*lead, n, n+2); r = rsqrt(mean_d H² + eps): (*lead, n); Wt = packed_w(W):
    (n+2, ldw) (arithmetic dtype).
    """
    kernels = kernels_for(H, "hc_pre")
    if kernels is not None:
        x, alpha, beta, q, r, Wt = kernels.hc_pre_fwd(H, A, B, W, s_a, s_b, eps)
        return x, alpha, beta, q, r, Wt
    acc = acc_dtype(H.dtype)
    x, alpha, beta = ref.hc_pre(H, A.to(acc), B.to(acc), W.to(acc), s_a.to(acc), s_b.to(acc), eps)
    q, r = _projection(H, W, eps)
    return x.contiguous(), alpha.contiguous(), beta.contiguous(), q, r, packed_w(W, acc)


@hc_pre_op.register_fake
def _hc_pre_fake(H, A, B, W, s_a, s_b, eps):
    lead, n, d = H.shape[:-2], H.shape[-2], H.shape[-1]
    acc = acc_dtype(H.dtype)
    return (H.new_empty((*lead, d)), H.new_empty((*lead, n, n + 1), dtype=acc),
            H.new_empty((*lead, n), dtype=acc), H.new_empty((*lead, n, n + 2), dtype=acc),
            H.new_empty((*lead, n), dtype=acc), _packed_w_fake(W, acc))


@torch.library.custom_op("crosslayer::hc_pre_bwd", mutates_args=("dH",))
def hc_pre_bwd_op(dH: Tensor, accumulate: bool, dx: Tensor, dalpha: Optional[Tensor], dbeta: Optional[Tensor],
                  H: Tensor, A: Tensor, B: Tensor, W: Tensor, Wt: Tensor, s_a: Tensor, s_b: Tensor,
                  q: Tensor, r: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradient through dynamic HC: dH (=, or += with `accumulate`) in place, and
    (dA, dB, dW, ds_a, ds_b).

    dH: H's shape and dtype (with `accumulate`, another op's contribution to H's
    gradient, e.g. hc_post's); dx: (*lead, d) in H's dtype; dalpha: (*lead, n, n+1) or
    None; dbeta: (*lead, n) or None (None = zero); Wt, q, r: from hc_pre; eps: the
    forward's (the CPU path recomputes from H and W). The parameter gradients are summed over tokens,
    each in its parameter's dtype.
    """
    kernels = kernels_for(H, "hc_pre")
    if kernels is not None:
        dA, dB, dW, ds_a, ds_b = kernels.hc_pre_bwd(dH, accumulate, dx, dalpha, dbeta, H, A, B, W, Wt, s_a, s_b,
                                                    q, r)
        return dA, dB, dW, ds_a, ds_b
    acc = acc_dtype(H.dtype)
    g, dA, dB, dW, ds_a, ds_b = ref.hc_pre_bwd(
        dx, dalpha, dbeta, H, A.to(acc), B.to(acc), W.to(acc), s_a.to(acc), s_b.to(acc), eps)
    if accumulate:
        dH.add_(g.to(dH.dtype))
    else:
        dH.copy_(g)
    return (dA.to(A.dtype).contiguous(), dB.to(B.dtype).contiguous(), dW.to(W.dtype).contiguous(),
            ds_a.to(s_a.dtype), ds_b.to(s_b.dtype))


@hc_pre_bwd_op.register_fake
def _hc_pre_bwd_fake(dH, accumulate, dx, dalpha, dbeta, H, A, B, W, Wt, s_a, s_b, q, r, eps):
    return A.new_empty(A.shape), B.new_empty(B.shape), W.new_empty(W.shape), s_a.new_empty(()), s_b.new_empty(())


def _hc_pre_setup(ctx, inputs, output) -> None:
    H, A, B, W, s_a, s_b, eps = inputs
    _, _, _, q, r, Wt = output
    ctx.mark_non_differentiable(q, r, Wt)
    ctx.save_for_backward(H, A, B, W, Wt, s_a, s_b, q, r)
    ctx.eps = eps


def _hc_pre_grads(ctx, dx: Optional[Tensor], dalpha: Optional[Tensor], dbeta: Optional[Tensor],
                  dH: Optional[Tensor]):
    """(dH, dA, dB, dW, ds_a, ds_b, None): the gradient through hc_pre added to `dH` in
    place when given (another op's contribution to H's gradient), else written to a new
    tensor like H."""
    H, A, B, W, Wt, s_a, s_b, q, r = ctx.saved_tensors
    if dx is None:
        dx = H.new_zeros((*H.shape[:-2], H.shape[-1]))
    accumulate = dH is not None
    if not accumulate:
        dH = torch.empty_like(H)
    dA, dB, dW, ds_a, ds_b = hc_pre_bwd_op(dH, accumulate, dx, dalpha, dbeta, H, A, B, W, Wt, s_a, s_b, q,
                                           r, ctx.eps)
    return dH, dA, dB, dW, ds_a, ds_b, None


# hc_pre_bwd mutates dH, so it cannot take an autograd formula (torch.library refuses one
# on a non-functional schema): its callers' backward refuses second derivatives instead.
@first_order_backward(no_double_backward_message("hc_pre"), connect_saved=True)
def _hc_pre_backward(ctx, dx, dalpha, dbeta, dq, dr, dWt):
    return _hc_pre_grads(ctx, dx, dalpha, dbeta, None)


hc_pre_op.register_autograd(_hc_pre_backward, setup_context=_hc_pre_setup)


class _HcPreForPost(torch.autograd.Function):
    """hc_pre returning H as a fourth output for the connection's hc_post to read: the
    post's dH then arrives here as that output's gradient and hc_pre's backward kernel
    adds its own contribution to it in place, so H's gradient is one tensor written
    twice, not two tensors autograd sums (DESIGN.md's sublayer floor)."""

    @staticmethod
    def forward(ctx, H, A, B, W, s_a, s_b, eps):
        outputs = hc_pre_op(H, A, B, W, s_a, s_b, eps)
        _hc_pre_setup(ctx, (H, A, B, W, s_a, s_b, eps), outputs)
        x, alpha, beta = outputs[:3]
        return x, alpha, beta, H

    @staticmethod
    @first_order_backward(no_double_backward_message("hc_pre_for_post", "hc_pre"), connect_saved=True)
    def backward(ctx, dx, dalpha, dbeta, dH_post):
        return _hc_pre_grads(ctx, dx, dalpha, dbeta, dH_post)


def hc_pre(H: Tensor, A: Tensor, B: Tensor, W: Optional[Tensor] = None,
           s_a: Optional[Scalar] = None, s_b: Optional[Scalar] = None, eps: float = 1e-6):
    """Layer input and HC coefficients (see crosslayer.ref.hc_pre).

    H: (..., n, d), 1 <= n <= 16     the streams; any token and stream strides (e.g.
                                      h.view(b, n, t, d).permute(0, 2, 1, 3)); a feature
                                      dim with non-unit stride is copied once
    A: (n, n+1); B: (n,)              static coefficients
    W: (d, n+2) or None               dynamic projection (norm weight folded in); None = SHC
    s_a, s_b: 0-dim tensors or floats dynamic scales (DHC only); a float must be finite
                                      (a tensor is checked for dtype and shape only: its
                                      value is never read on the host)
    eps: a finite float > 0           the per-stream rms's epsilon (DHC)
    d = 0: DHC refuses it (ValueError, on every backend: r = rsqrt(mean_d H² + eps) is a
           mean over no features); SHC returns x (..., 0), alpha = A, beta = B
    returns x: (..., d) in H's dtype; alpha: (..., n, n+1) for DHC, (n, n+1) for SHC;
            beta: (..., n) for DHC, (n,) for SHC (arithmetic dtype: float32, float64
            for float64 inputs)

    Fused on CUDA when the extension is built (DHC: one kernel each way; SHC: the
    stream_mix kernels); the oracle otherwise, and for float64 parameters with
    lower-precision H. First derivatives only, on every path (crosslayer.ref.hc_pre
    differentiates to any order).
    """
    return _hc_pre(H, A, B, W, s_a, s_b, eps, for_post=False)[:3]


def hc_pre_for_post(H: Tensor, A: Tensor, B: Tensor, W: Optional[Tensor] = None,
                    s_a: Optional[Scalar] = None, s_b: Optional[Scalar] = None, eps: float = 1e-6):
    """`hc_pre` for a connection: (x, alpha, beta, H_post), where H_post (H's values) is
    the tensor the connection's `hc_post` must read. Fused (DHC: hc_pre's kernel; SHC:
    stream_mix's), the backward adds its dH to the one hc_post's backward wrote, in
    place; elsewhere H_post is H and autograd sums the two. Arguments and the first
    three results as in `hc_pre`."""
    return _hc_pre(H, A, B, W, s_a, s_b, eps, for_post=True)


def _hc_pre(H: Tensor, A: Tensor, B: Tensor, W: Optional[Tensor], s_a: Optional[Scalar],
            s_b: Optional[Scalar], eps: float, for_post: bool):
    """(x, alpha, beta, H_post) of `hc_pre` / `hc_pre_for_post`: H_post is what the
    connection's hc_post reads, the fused pre's extra output with `for_post`, else H."""
    validate_hc_pre(H, A, B, W, s_a, s_b, eps, op="hc_pre_for_post" if for_post else "hc_pre")
    scales = [v for v in (s_a, s_b) if isinstance(v, Tensor)]
    ct = compute_dtype(H, A, B, W, *scales)
    if W is None:
        alpha, beta = A.to(ct), B.to(ct)  # the parameters themselves when already in ct
        x, H_post = stream_mix_for_post(H, alpha[:, 0]) if for_post else (stream_mix(H, alpha[:, 0]), H)
        return x, alpha, beta, H_post
    if not fusable("hc_pre", H, A, B, W, *scales):
        op = "hc_pre_for_post" if for_post else "hc_pre"
        return (*oracle_first_order(op, ref.hc_pre, H, A, B, W, s_a, s_b, eps, oracle="hc_pre"), H)
    sa = scalar_tensor(s_a, ct, H.device)
    sb = scalar_tensor(s_b, ct, H.device)
    if for_post:
        return _HcPreForPost.apply(H, A, B, W, sa, sb, eps)
    x, alpha, beta = hc_pre_op(H, A, B, W, sa, sb, eps)[:3]
    return x, alpha, beta, H
