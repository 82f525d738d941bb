"""csrc/hc_boundary.h, hc_boundary_fwd.cu and hc_boundary_bwd.cu: hc_boundary's launchers
(connection i's post fused with connection i+1's pre, dynamic or static). The post's
inputs are laid out by hc_post's host code (crosslayer._jit.hc_post), the pre's
parameters and workspaces by hc_pre's (crosslayer._jit.hc_pre)."""

from __future__ import annotations

import ctypes
from typing import Callable, List, Optional, Tuple

import torch

from crosslayer._checks import acc_dtype
from crosslayer._jit import layout as L
from crosslayer._jit.common import MAX_STREAMS, dispatch_streams, vectorizable, vec16
from crosslayer._jit.hc_post import (HcPostInputs, HcPostParams, hc_post_accesses, hc_post_bwd_operands,
                                     hc_post_coef_grads, hc_post_fwd_output)
from crosslayer._jit.hc_pre import (HcPreParams, check_hc_pre_inputs, hc_pre_block, hc_pre_bwd_coef_inputs,
                                    hc_pre_kernel, hc_pre_pack_w, hc_pre_param_grads, hc_pre_weights,
                                    hc_pre_workspaces)
from crosslayer._jit.hc_tile import launch_hc_tile
from crosslayer._jit.runtime import cover_grid, launch
from crosslayer._jit.structs import Params, TokenLayout, c_void_p
from crosslayer._jit.token_sums import TokenSums

HEADER = "kernels/hc_boundary.cuh"


class HcBoundaryParams(Params):
    """kernels/hc_boundary.cuh."""
    _fields_ = [("post", HcPostParams), ("pre", HcPreParams)]


class HcBoundaryMixParams(HcPostParams):
    """kernels/hc_boundary.cuh (HcPostParams' fields first, as the C++ base)."""
    _fields_ = [("x_tok", TokenLayout), ("dx_tok", TokenLayout), ("a_next_ptr", c_void_p), ("x_ptr", c_void_p),
                ("dx_ptr", c_void_p), ("dw_ptr", c_void_p)]


PARAMS = {"hc_boundary_fwd_kernel": HcBoundaryParams, "hc_boundary_bwd_kernel": HcBoundaryParams,
          "hc_boundary_mix_fwd_kernel": HcBoundaryMixParams, "hc_boundary_mix_bwd_kernel": HcBoundaryMixParams}


def hc_boundary_vec(dtype: torch.dtype, kn: int) -> int:
    """kernels/hc_boundary.cuh kHcBoundaryVec<T, kN>: elements a chunk, 8 bytes up to 4
    streams, 4 for 8 and 2 for 16 (at least one)."""
    v = vec16(dtype) * 2 // (4 if kn <= 4 else kn)
    return v if v > 1 else 1


def hc_boundary_extra_smem(rows: int, warps: int, n: int, backward: bool) -> int:
    """kernels/hc_boundary.cuh hc_boundary_extra_smem: accumulator elements of a block
    beyond hc_pre's layout."""
    return rows * n * (n + 2) + (rows * warps * n * (n + 1) if backward else 0)


def dispatch_boundary(dtype: torch.dtype, vectorize: bool, n: int) -> Tuple[int, int]:
    """csrc/hc_boundary.h dispatch_boundary: (kvec, kn), kn from n (2, 4, 8 exact, 16
    generic) and kvec = kHcBoundaryVec<T, kn> when `vectorize`, else 1."""
    kn = dispatch_streams(n, (2, 4, 8), MAX_STREAMS)
    return (hc_boundary_vec(dtype, kn) if vectorize else 1), kn


def boundary_extra_smem(n: int, backward: bool) -> Callable[[int, int], int]:
    """csrc/hc_boundary.h boundary_extra_smem: hc_pre_block's `extra`."""
    return lambda rows, warps: hc_boundary_extra_smem(rows, warps, n, backward)


class _HcBoundaryInputs:
    """csrc/hc_boundary.h hc_boundary_inputs: the post's checked inputs, the pre's
    parameters (Wt: the forward's packed W, None in the forward, which packs it here) and
    the params they fill."""

    def __init__(self, H, y, alpha, beta, A, B, W, Wt, s_a, s_b):
        check_hc_pre_inputs(H)
        self.post = post = HcPostInputs(H, y, alpha, beta)
        acc = acc_dtype(H.dtype)
        self.Wt = Wt if Wt is not None else hc_pre_pack_w(W, acc)
        self.p = p = HcBoundaryParams()
        if post.N == 0:
            return
        p.post = post.p
        self.weights = hc_pre_weights(p.pre, post.N, post.n, post.d, acc, A, B, self.Wt, s_a, s_b)


def hc_boundary_fwd(H: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, A: torch.Tensor,
                    B: torch.Tensor, W: torch.Tensor, s_a: torch.Tensor, s_b: torch.Tensor,
                    eps: float) -> List[torch.Tensor]:
    """csrc/hc_boundary_fwd.cu hc_boundary_fwd: [H' (H's layout), x', alpha', beta', q, r, Wt]."""
    inp = _HcBoundaryInputs(H, y, alpha, beta, A, B, W, None, s_a, s_b)
    lead, N, n, d = inp.post.lead, inp.post.N, inp.post.n, inp.post.d
    acc = acc_dtype(H.dtype)
    dev = H.device
    H_next = torch.empty_like(H)
    x = torch.empty((*lead, d), dtype=H.dtype, device=dev)
    alpha_next = torch.empty((*lead, n, n + 1), dtype=acc, device=dev)
    beta_next = torch.empty((*lead, n), dtype=acc, device=dev)
    q = torch.empty((*lead, n, n + 2), dtype=acc, device=dev)
    r = torch.empty((*lead, n), dtype=acc, device=dev)
    if N == 0:
        return [H_next, x, alpha_next, beta_next, q, r, inp.Wt]

    p = inp.p
    out = hc_post_fwd_output(p.post, H_next)
    _, p.pre.x_tok = L.with_token_layout(x, 1)
    p.pre.eps = eps
    p.pre.x_ptr = x.data_ptr()
    p.pre.alpha_ptr = alpha_next.data_ptr()
    p.pre.beta_ptr = beta_next.data_ptr()
    p.pre.q_ptr = q.data_ptr()
    p.pre.r_ptr = r.data_ptr()
    vectorize = vectorizable(H.dtype, *hc_post_accesses(p.post, backward=False), (p.pre.x_ptr, p.pre.x_tok, 0))
    vec, kn = dispatch_boundary(H.dtype, vectorize, p.pre.n)
    b = hc_pre_block("hc_boundary", acc, kn, N, d, vec, p.pre.ldw, False, dev, boundary_extra_smem(p.pre.n, False))
    launch(HEADER, hc_pre_kernel("hc_boundary_fwd_kernel", H.dtype, vec, kn), (cover_grid(b.grid, 1),),
           (b.threads_x, b.rows), b.smem_bytes, p, dev)
    L.copy_back(H_next, out)
    return [H_next, x, alpha_next, beta_next, q, r, inp.Wt]


def hc_boundary_bwd(dH_next: torch.Tensor, dx_in: torch.Tensor, dalpha_next: Optional[torch.Tensor],
                    dbeta_next: Optional[torch.Tensor], H: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor,
                    beta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, W: torch.Tensor, Wt: torch.Tensor,
                    s_a: torch.Tensor, s_b: torch.Tensor, q: torch.Tensor, r: torch.Tensor) -> List[torch.Tensor]:
    """csrc/hc_boundary_bwd.cu hc_boundary_bwd: [dH (H's layout), dy, dalpha, dbeta, dA, dB,
    dW, ds_a, ds_b]."""
    if Wt is None:
        raise RuntimeError("hc_boundary_bwd: Wt (the forward's packed W) is required")
    inp = _HcBoundaryInputs(H, y, alpha, beta, A, B, W, Wt, s_a, s_b)
    lead, N, n, d = inp.post.lead, inp.post.N, inp.post.n, inp.post.d
    acc = acc_dtype(H.dtype)
    dev = H.device
    dH = torch.empty_like(H)
    dy = torch.empty((*lead, d), dtype=y.dtype, device=y.device)
    if N == 0:
        return [dH, dy, torch.zeros(alpha.shape, dtype=acc, device=dev), torch.zeros(beta.shape, dtype=acc, device=dev),
                torch.zeros(A.shape, dtype=A.dtype, device=A.device),
                torch.zeros(B.shape, dtype=B.dtype, device=B.device),
                torch.zeros(W.shape, dtype=W.dtype, device=W.device),
                torch.zeros((), dtype=s_a.dtype, device=s_a.device),
                torch.zeros((), dtype=s_b.dtype, device=s_b.device)]
    dalpha_tok = torch.empty((N, n, n + 1), dtype=acc, device=dev)
    dbeta_tok = torch.empty((N, n), dtype=acc, device=dev)
    p = inp.p
    g, dh = hc_post_bwd_operands(p.post, dH_next, dH, dy, dalpha_tok, dbeta_tok)
    dx, p.pre.x_tok = L.readable(dx_in, 1)
    p.pre.dx_ptr = dx.data_ptr()
    coefs = hc_pre_bwd_coef_inputs(p.pre, acc, dalpha_next, dbeta_next, q, r)

    vectorize = vectorizable(H.dtype, *hc_post_accesses(p.post, backward=True), (p.pre.dx_ptr, p.pre.x_tok, 0))
    vec, kn = dispatch_boundary(H.dtype, vectorize, p.pre.n)
    b = hc_pre_block("hc_boundary", acc, kn, N, d, vec, p.pre.ldw, True, dev, boundary_extra_smem(p.pre.n, True))
    kernel = hc_pre_kernel("hc_boundary_bwd_kernel", H.dtype, vec, kn)
    ws = hc_pre_workspaces(p.pre, b, HEADER, kernel, acc, dev)
    launch(HEADER, kernel, (b.grid,), (b.threads_x, b.rows), b.smem_bytes, p, dev)
    L.copy_back(dH, dh)
    del g, dx, coefs  # the tensors the kernel reads live until its launch is queued
    sums = TokenSums(N)
    dalpha, dbeta = hc_post_coef_grads(inp.post, dalpha_tok, dbeta_tok, alpha, beta, sums)
    sums.run()
    return [dH, dy, dalpha, dbeta, *hc_pre_param_grads(ws, n, d, A, B, W, s_a, s_b)]


class _HcBoundaryMixInputs:
    """csrc/hc_boundary.h hc_boundary_mix_inputs: hc_post's checked inputs, connection
    i+1's static A' (n, n+1) (the kernels read column 0) and the params they fill."""

    def __init__(self, H, y, alpha, beta, A_next):
        self.post = post = HcPostInputs(H, y, alpha, beta)
        self.p = p = HcBoundaryMixParams()
        if post.N == 0 or post.d == 0:
            return
        # static_cast<HcPostParams&>(p) = post.p: the base part of p.
        ctypes.memmove(ctypes.addressof(p), ctypes.addressof(post.p), ctypes.sizeof(HcPostParams))
        self.A_next = A_next.to(acc_dtype(H.dtype)).contiguous()
        p.a_next_ptr = self.A_next.data_ptr()


def _mix_bwd_vec(dtype: torch.dtype) -> Callable[[int, int], int]:
    """csrc/hc_boundary_bwd.cu hc_boundary_mix_bwd's kernel_for: the generic-n
    instantiation (kn = 0) takes hc_boundary's generic chunk, kHcBoundaryVec<T, 16>, at
    most (its 16-byte one spills)."""
    return lambda kvec, kn: min(kvec, hc_boundary_vec(dtype, MAX_STREAMS)) if kn == 0 else kvec


def hc_boundary_mix_fwd(H: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                        A_next: torch.Tensor) -> List[torch.Tensor]:
    """csrc/hc_boundary_fwd.cu hc_boundary_mix_fwd: [H' (H's layout), x' = Σ_k A'[k, 0]·H'_k]."""
    inp = _HcBoundaryMixInputs(H, y, alpha, beta, A_next)
    post = inp.post
    H_next = torch.empty_like(H)
    x = torch.empty((*post.lead, post.d), dtype=H.dtype, device=H.device)
    if post.N == 0 or post.d == 0:
        return [H_next, x]
    p = inp.p
    out = hc_post_fwd_output(p, H_next)
    p.x_tok = L.collapse_token_dims(x.shape[:-1], x.stride()[:-1])
    p.x_ptr = x.data_ptr()
    vectorize = vectorizable(H.dtype, *hc_post_accesses(p, backward=False), (p.x_ptr, p.x_tok, 0))
    launch_hc_tile("hc_boundary_mix_fwd_kernel", HEADER, H.dtype, p, vectorize, p.n * (p.n + 3), 0, H.device)
    L.copy_back(H_next, out)
    return [H_next, x]


def hc_boundary_mix_bwd(dH_next: torch.Tensor, dx_in: torch.Tensor, H: torch.Tensor, y: torch.Tensor,
                        alpha: torch.Tensor, beta: torch.Tensor, A_next: torch.Tensor) -> List[torch.Tensor]:
    """csrc/hc_boundary_bwd.cu hc_boundary_mix_bwd: [dH (H's layout), dy, dalpha, dbeta, dA']."""
    inp = _HcBoundaryMixInputs(H, y, alpha, beta, A_next)
    post = inp.post
    acc = acc_dtype(H.dtype)
    dev = H.device
    dH = torch.empty_like(H)
    dy = torch.empty((*post.lead, post.d), dtype=y.dtype, device=y.device)
    if post.N == 0 or post.d == 0:  # dH and dy are empty; the dots over nothing are 0
        return [dH, dy, torch.zeros(alpha.shape, dtype=acc, device=dev), torch.zeros(beta.shape, dtype=acc, device=dev),
                torch.zeros(A_next.shape, dtype=acc, device=dev)]
    N, n = post.N, post.n
    dalpha_tok = torch.empty((N, n, n + 1), dtype=acc, device=dev)
    dbeta_tok = torch.empty((N, n), dtype=acc, device=dev)
    dw_tok = torch.empty((N, n), dtype=acc, device=dev)
    p = inp.p
    g, dh = hc_post_bwd_operands(p, dH_next, dH, dy, dalpha_tok, dbeta_tok)
    dx, p.dx_tok = L.readable(dx_in, 1)
    p.dx_ptr = dx.data_ptr()
    p.dw_ptr = dw_tok.data_ptr()
    vectorize = vectorizable(H.dtype, *hc_post_accesses(p, backward=True), (p.dx_ptr, p.dx_tok, 0))
    launch_hc_tile("hc_boundary_mix_bwd_kernel", HEADER, H.dtype, p, vectorize, p.n * (p.n + 3), p.n * (p.n + 2),
                   dev, kernel_vec=_mix_bwd_vec(H.dtype))
    L.copy_back(dH, dh)
    del g, dx  # the tensors the kernel reads live until its launch is queued
    sums = TokenSums(N)
    dalpha, dbeta = hc_post_coef_grads(post, dalpha_tok, dbeta_tok, alpha, beta, sums)
    dA_next = sums.grad(dw_tok, True, A_next.shape, n + 1)
    sums.run()
    return [dH, dy, dalpha, dbeta, dA_next]
