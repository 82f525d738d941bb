"""hc_boundary on the GPU: connection i's post fused with connection i+1's pre (DHC or SHC), the
custom ops over crosslayer._C, their autograd, and the public function that mirrors
`crosslayer.ref.hc_boundary`.

Layers, bottom up:
  _C.hc_boundary_fwd / _bwd, _C.hc_boundary_mix_fwd / _bwd
                                         pybind11 launchers (csrc/hc_boundary_fwd.cu, _bwd.cu)
  torch.ops.crosslayer.hc_boundary       custom op + fake + autograd: (H', x', alpha',
                                         beta', q, r, Wt); q, r, Wt as hc_pre's (saved
                                         for the backward, not differentiable)
  torch.ops.crosslayer.hc_boundary_bwd   custom op: (dH, dy, dalpha, dbeta, dA, dB, dW,
                                         ds_a, ds_b)
  torch.ops.crosslayer.hc_boundary_mix   the static (SHC) pre: custom op + fake + autograd,
                                         (H', x' = Σ_k A'[k, 0]·H'_k), A' = connection
                                         i+1's A
  torch.ops.crosslayer.hc_boundary_mix_bwd   custom op: (dH, dy, dalpha, dbeta, dA')
  hc_boundary(H, y, alpha, beta, A, B, W, s_a, s_b, eps)
                                         validates once, then the op above on CUDA (the
                                         oracle on CPU, without the extension, or for
                                         float64 parameters with lower-precision H)

In a chain of sublayers, connection i+1's pre reads H' = post_i(y_i) straight from the
kernel that wrote it, and its backward adds hc_pre's dH term to the later gradient of
H' in registers: per sublayer 2n·d + 2d elements forward and 3n·d + 3d backward, where
the unfused post + pre move 3n·d + 2d and 6n·d + 3d (DESIGN.md's chain floor).

H: (*lead, n, d) with any token and stream strides; y: (*lead, d); alpha, beta:
connection i's coefficients, per token (*lead, n, n+1), (*lead, n) or static (n, n+1),
(n,). H' and dH are allocated like H, x' and dy contiguous; alpha', beta', q, r
contiguous in the arithmetic dtype (float64 for float64 H, float32 otherwise).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from crosslayer import ref
from crosslayer._autograd import oracle_first_order, refusing_backward
from crosslayer._checks import acc_dtype, compute_dtype
from crosslayer._extension import kernels_for
from crosslayer.contracts import validate_hc_boundary
from crosslayer.ops._common import Scalar, fusable, lead_d, like, scalar_tensor
from crosslayer.ops.hc_pre import _packed_w_fake, _projection, packed_w


@torch.library.custom_op("crosslayer::hc_boundary", mutates_args=())
def hc_boundary_op(H: Tensor, y: Tensor, alpha: Tensor, beta: Tensor, A: Tensor, B: Tensor, W: Tensor,
                   s_a: Tensor, s_b: Tensor,
                   eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(H', x', alpha', beta', q, r, Wt): H' = hc_post(H, y, alpha, beta), then hc_pre(H', A,
    B, W, s_a, s_b)'s outputs (q = H'·W: (*lead, n, n+2), r = rsqrt(mean_d H'² + eps):
    (*lead, n), Wt = packed_w(W))."""
    kernels = kernels_for(H, "hc_boundary")
    if kernels is not None:
        H_next, x, alpha_next, beta_next, q, r, Wt = kernels.hc_boundary_fwd(H, y, alpha, beta, A, B, W, s_a, s_b,
                                                                             eps)
        return H_next, x, alpha_next, beta_next, q, r, Wt
    acc = acc_dtype(H.dtype)
    H_next, x, alpha_next, beta_next = ref.hc_boundary(H, y, alpha.to(acc), beta.to(acc), A.to(acc), B.to(acc),
                                                       W.to(acc), s_a.to(acc), s_b.to(acc), eps)
    q, r = _projection(H_next, W, eps)
    return (like(H, H_next), x.contiguous(), alpha_next.contiguous(), beta_next.contiguous(), q, r,
            packed_w(W, acc))


@hc_boundary_op.register_fake
def _hc_boundary_fake(H, y, alpha, beta, A, B, W, s_a, s_b, eps):
    lead, n = H.shape[:-2], H.shape[-2]
    acc = acc_dtype(H.dtype)
    return (torch.empty_like(H), H.new_empty(lead_d(H)), H.new_empty((*lead, n, n + 1), dtype=acc),
            H.new_empty((*lead, n), dtype=acc), H.new_empty((*lead, n, n + 2), dtype=acc),
            H.new_empty((*lead, n), dtype=acc), _packed_w_fake(W, acc))


@torch.library.custom_op("crosslayer::hc_boundary_bwd", mutates_args=())
def hc_boundary_bwd_op(dH_next: Tensor, dx: Tensor, dalpha_next: Optional[Tensor], dbeta_next: Optional[Tensor],
                       H: Tensor, y: Tensor, alpha: Tensor, beta: Tensor, A: Tensor, B: Tensor, W: Tensor,
                       Wt: Tensor, s_a: Tensor, s_b: Tensor, q: Tensor, r: Tensor,
                       eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dH, dy, dalpha, dbeta, dA, dB, dW, ds_a, ds_b) of hc_boundary.

    dH_next: H's shape and dtype, the gradient of H' from its later readers; dx: (*lead,
    d); dalpha_next: (*lead, n, n+1) or None; dbeta_next: (*lead, n) or None (None =
    zero); Wt, q, r: from hc_boundary_op (the CPU path recomputes from H and W). dalpha, dbeta have
    the coefficients' shapes in the arithmetic dtype; the parameter gradients are summed
    over tokens, each in its parameter's dtype.
    """
    kernels = kernels_for(H, "hc_boundary")
    if kernels is not None:
        grads = kernels.hc_boundary_bwd(dH_next, dx, dalpha_next, dbeta_next, H, y, alpha, beta, A, B, W,
                                        Wt, s_a, s_b, q, r)
        return tuple(grads)
    acc = acc_dtype(H.dtype)
    dH, dy, dalpha, dbeta, dA, dB, dW, ds_a, ds_b = ref.hc_boundary_bwd(
        dH_next, dx, dalpha_next, dbeta_next, H, y, alpha.to(acc), beta.to(acc), A.to(acc), B.to(acc), W.to(acc),
        s_a.to(acc), s_b.to(acc), eps)
    return (like(H, dH), dy.contiguous(), dalpha.contiguous(), dbeta.contiguous(), dA.to(A.dtype).contiguous(),
            dB.to(B.dtype).contiguous(), dW.to(W.dtype).contiguous(), ds_a.to(s_a.dtype), ds_b.to(s_b.dtype))


@hc_boundary_bwd_op.register_fake
def _hc_boundary_bwd_fake(dH_next, dx, dalpha_next, dbeta_next, H, y, alpha, beta, A, B, W, Wt, s_a, s_b, q, r,
                          eps):
    acc = acc_dtype(H.dtype)
    return (torch.empty_like(H), y.new_empty(lead_d(H)), alpha.new_empty(alpha.shape, dtype=acc),
            beta.new_empty(beta.shape, dtype=acc), A.new_empty(A.shape), B.new_empty(B.shape), W.new_empty(W.shape),
            s_a.new_empty(()), s_b.new_empty(()))


def _hc_boundary_setup(ctx, inputs, output) -> None:
    H, y, alpha, beta, A, B, W, s_a, s_b, eps = inputs
    _, _, _, _, q, r, Wt = output
    ctx.mark_non_differentiable(q, r, Wt)
    # Absent gradients arrive as None, not as zeros autograd would fill (q, r and Wt
    # never get one: three fills a call).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(H, y, alpha, beta, A, B, W, Wt, s_a, s_b, q, r)
    ctx.eps = eps


def _hc_boundary_backward(ctx, dH_next, dx, dalpha_next, dbeta_next, dq, dr, dWt):
    H, y, alpha, beta, A, B, W, Wt, s_a, s_b, q, r = ctx.saved_tensors
    if dH_next is None:
        dH_next = torch.zeros_like(H)
    if dx is None:
        dx = H.new_zeros(lead_d(H))
    grads = hc_boundary_bwd_op(dH_next, dx, dalpha_next, dbeta_next, H, y, alpha, beta, A, B, W, Wt, s_a, s_b, q,
                               r, ctx.eps)
    return (*grads, None)


hc_boundary_op.register_autograd(_hc_boundary_backward, setup_context=_hc_boundary_setup)
hc_boundary_bwd_op.register_autograd(refusing_backward("hc_boundary", "hc_boundary_bwd"))  # first order only


@torch.library.custom_op("crosslayer::hc_boundary_mix", mutates_args=())
def hc_boundary_mix_op(H: Tensor, y: Tensor, alpha: Tensor, beta: Tensor, A_next: Tensor) -> Tuple[Tensor, Tensor]:
    """The static pre's boundary: (H', x') with H' = hc_post(H, y, alpha, beta) and
    x' = Σ_k A_next[k, 0]·H'_k; A_next: (n, n+1), connection i+1's static A (SHC)."""
    kernels = kernels_for(H, "hc_boundary")
    if kernels is not None:
        H_next, x = kernels.hc_boundary_mix_fwd(H, y, alpha, beta, A_next)
        return H_next, x
    H_next = ref.hc_post(H, y, alpha, beta)
    return like(H, H_next), ref.stream_mix(H_next, A_next[:, 0]).contiguous()


@hc_boundary_mix_op.register_fake
def _hc_boundary_mix_fake(H, y, alpha, beta, A_next):
    return torch.empty_like(H), H.new_empty(lead_d(H))


@torch.library.custom_op("crosslayer::hc_boundary_mix_bwd", mutates_args=())
def hc_boundary_mix_bwd_op(dH_next: Tensor, dx: Tensor, H: Tensor, y: Tensor, alpha: Tensor, beta: Tensor,
                           A_next: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dH, dy, dalpha, dbeta, dA_next) of hc_boundary_mix: dH'_k = dH_next_k + w_k·dx
    (w = A_next[:, 0]), then hc_post's backward; dA_next[k, 0] = Σ_t <dx, H'_k>, its
    other columns 0. The coefficient gradients have the coefficients' shapes (summed over
    tokens when static) in the arithmetic dtype."""
    kernels = kernels_for(H, "hc_boundary")
    if kernels is not None:
        dH, dy, dalpha, dbeta, dA_next = kernels.hc_boundary_mix_bwd(dH_next, dx, H, y, alpha, beta, A_next)
        return dH, dy, dalpha, dbeta, dA_next
    acc = acc_dtype(H.dtype)
    w = A_next[:, 0].to(acc)
    H_next = ref.hc_post(H, y, alpha, beta)
    g_mix, dw = ref.stream_mix_bwd(dx, H_next, w)
    g = dH_next.to(acc) + w.unsqueeze(-1) * dx.to(acc).unsqueeze(-2)
    dH, dy, dalpha, dbeta = ref.hc_post_bwd(g, H, y, alpha.to(acc), beta.to(acc))
    dA_next = torch.zeros(A_next.shape, dtype=acc, device=A_next.device)
    dA_next[:, 0] = dw
    return like(H, dH), dy.contiguous(), dalpha.contiguous(), dbeta.contiguous(), dA_next


@hc_boundary_mix_bwd_op.register_fake
def _hc_boundary_mix_bwd_fake(dH_next, dx, H, y, alpha, beta, A_next):
    acc = acc_dtype(H.dtype)
    return (torch.empty_like(H), y.new_empty(lead_d(H)), alpha.new_empty(alpha.shape, dtype=acc),
            beta.new_empty(beta.shape, dtype=acc), A_next.new_empty(A_next.shape, dtype=acc))


def _hc_boundary_mix_setup(ctx, inputs, output) -> None:
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*inputs)


def _hc_boundary_mix_backward(ctx, dH_next, dx):
    H, y, alpha, beta, A_next = ctx.saved_tensors
    if dH_next is None:
        dH_next = torch.zeros_like(H)
    if dx is None:
        dx = H.new_zeros(lead_d(H))
    return hc_boundary_mix_bwd_op(dH_next, dx, H, y, alpha, beta, A_next)


hc_boundary_mix_op.register_autograd(_hc_boundary_mix_backward, setup_context=_hc_boundary_mix_setup)
hc_boundary_mix_bwd_op.register_autograd(refusing_backward("hc_boundary", "hc_boundary_mix_bwd"))  # first order only


def hc_boundary(H: Tensor, y: Tensor, alpha: Tensor, beta: Tensor, A: Tensor, B: Tensor, W: Optional[Tensor] = None,
                s_a: Optional[Scalar] = None, s_b: Optional[Scalar] = None, eps: float = 1e-6):
    """Connection i's post fused with connection i+1's pre (see
    crosslayer.ref.hc_boundary).

    H: (..., n, d), 1 <= n <= 16    connection i's streams; any token and stream strides
    y: (..., d)                      sublayer i's output
    alpha: (..., n, n+1) or (n, n+1); beta: (..., n) or (n,)   connection i's coefficients
    A: (n, n+1); B: (n,); W: (d, n+2) or None (SHC); s_a, s_b: 0-dim tensors or floats
                                     connection i+1's parameters, as for `hc_pre`
    returns H': (..., n, d) and x': (..., d) in H's dtype; alpha', beta' as `hc_pre`'s
            (DHC: (..., n, n+1), (..., n); SHC: A and B in the arithmetic dtype, as
            `hc_pre`'s: the parameters themselves, not copies, when already in it)

    Fused on CUDA when the extension is built (one kernel each way: DHC's coefficient
    pass over H', or SHC's single pass); the oracle otherwise, and for float64
    parameters with lower-precision H. First derivatives only, on every path
    (crosslayer.ref.hc_boundary differentiates to any order).
    """
    validate_hc_boundary(H, y, alpha, beta, A, B, W, s_a, s_b, eps)
    scales = [v for v in (s_a, s_b) if isinstance(v, Tensor)]
    if not fusable("hc_boundary", H, y, alpha, beta, A, B, W, *scales):
        return oracle_first_order("hc_boundary", ref.hc_boundary, H, y, alpha, beta, A, B, W, s_a, s_b, eps)
    ct = compute_dtype(H, A, B, W, *scales)
    if W is None:  # SHC: x' mixes with A[:, 0]; alpha', beta' are A and B, as hc_pre's
        alpha_next, beta_next = A.to(ct), B.to(ct)
        H_next, x = hc_boundary_mix_op(H, y, alpha, beta, alpha_next)
        return H_next, x, alpha_next, beta_next
    sa = scalar_tensor(s_a, ct, H.device)
    sb = scalar_tensor(s_b, ct, H.device)
    H_next, x, alpha_next, beta_next = hc_boundary_op(H, y, alpha, beta, A, B, W, sa, sb, eps)[:4]
    return H_next, x, alpha_next, beta_next
