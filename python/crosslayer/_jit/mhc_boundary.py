"""csrc/mhc_boundary_bwd.cu and the part of csrc/mhc_coeffs.cu that is the boundary's:
the mHC boundary's launchers (connection i's post fused with mHC connection i+1's pre)."""

from __future__ import annotations

from typing import List, Optional

import torch

from crosslayer._jit import layout as L
from crosslayer._jit.common import WARP_SIZE, kernel_type
from crosslayer._jit.hc_post import HcPostInputs, hc_post_bwd, hc_post_coef_grads, hc_post_fwd
from crosslayer._jit.mhc_coeffs import (MhcCoeffsParams, check_mhc_inputs, mhc_base_params, mhc_coef_sums,
                                        mhc_coeffs_bwd, mhc_coeffs_dh_pass, mhc_coeffs_fwd_impl, mhc_scale_inputs,
                                        mhc_tile_grid, use_mma)
from crosslayer._jit.mma_pack import fp32_rows_ld4, round_up
from crosslayer._jit.runtime import device_model, launch
from crosslayer._jit.stream_mix import stream_mix_dots
from crosslayer._jit.structs import header_constant
from crosslayer._jit.token_sums import TokenSums

HEADER = "kernels/mhc_boundary.cuh"
MHC_BOUNDARY_BWD_WARPS = header_constant("kMhcBoundaryBwdWarps", HEADER)
MHC_BOUNDARY_BWD_THREADS = MHC_BOUNDARY_BWD_WARPS * WARP_SIZE  # kMhcBoundaryBwdThreads
MHC_BOUNDARY_BWD_N = header_constant("kMhcBoundaryBwdN", HEADER)
MHC_BOUNDARY_BWD_CHUNKS = header_constant("kMhcBoundaryBwdChunks", HEADER)
MHC_BOUNDARY_BWD_ROW = MHC_BOUNDARY_BWD_N * 32 * MHC_BOUNDARY_BWD_CHUNKS + 4  # kMhcBoundaryBwdRow
MHC_BOUNDARY_BWD_SMEM_MAX = header_constant("kMhcBoundaryBwdSmemMax", "mhc_boundary_bwd.cu")

PARAMS = {"mhc_boundary_bwd_kernel": MhcCoeffsParams}


def bwd_smem_floats(iters: int) -> int:
    """kernels/mhc_boundary.cuh mhc_boundary_bwd_smem_floats(iters)."""
    kn = MHC_BOUNDARY_BWD_N
    return 16 * MHC_BOUNDARY_BWD_ROW + 16 * kn * (kn + 1) + 3 * 16 * kn + 16 + (2 * iters - 1) * 16 * kn


def mhc_boundary_fwd(H: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, phi: torch.Tensor,
                     a_pre: torch.Tensor, a_post: torch.Tensor, a_res: torch.Tensor, b: torch.Tensor, eps: float,
                     pre_eps: float, post_mult: float, iters: int, sinkhorn_eps: float) -> List[torch.Tensor]:
    """csrc/mhc_coeffs.cu mhc_boundary_fwd: [H' (H's layout), x', alpha', beta', u, r]."""
    post = HcPostInputs(H, y, alpha, beta)
    check_mhc_inputs(H, iters)
    # H' allocated like H; the kernel writes it in place when its token dims collapse,
    # else a contiguous scratch copied back.
    H_next = torch.empty_like(H)
    H_k, _ = L.writable(H_next, 2)
    fused = post.N > 0 and use_mma(H, H.device)
    if not fused and post.N > 0:
        H_k.copy_(hc_post_fwd(H, y, alpha, beta))
    out = mhc_coeffs_fwd_impl(H_k, phi, a_pre, a_post, a_res, b, eps, pre_eps, post_mult, iters, sinkhorn_eps,
                              True, post if fused else None)
    L.copy_back(H_next, H_k)
    # [alpha', beta', u, r, x'] -> [H', x', alpha', beta', u, r]
    return [H_next, out[4], out[0], out[1], out[2], out[3]]


def _mhc_boundary_bwd_composed(dH_next, dx, dalpha_next, dbeta_next, H, y, alpha, beta, H_next, phi, a_pre, a_post,
                               a_res, b, u, r, eps, pre_eps, post_mult, iters, sinkhorn_eps) -> List[torch.Tensor]:
    """csrc/mhc_boundary_bwd.cu mhc_boundary_bwd_composed: stream_mix_dots, mhc_coeffs_bwd
    writing dH' = dH_next + its terms into a new tensor, hc_post_bwd."""
    dpre = stream_mix_dots(dx, H_next) if dx is not None else None
    g = torch.empty_like(H_next)  # dH' = dH_next + the pre's terms (dH_next only read)
    nxt = mhc_coeffs_bwd(g, False, dH_next, dalpha_next, dbeta_next, dpre, dx, H_next, phi, a_pre, a_post, a_res, b,
                         u, r, eps, pre_eps, post_mult, iters, sinkhorn_eps)
    return hc_post_bwd(g, H, y, alpha, beta) + nxt


def mhc_boundary_bwd(dH_next: Optional[torch.Tensor], dx: Optional[torch.Tensor],
                     dalpha_next: Optional[torch.Tensor], dbeta_next: Optional[torch.Tensor], H: torch.Tensor,
                     y: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, H_next: torch.Tensor,
                     phi: torch.Tensor, a_pre: torch.Tensor, a_post: torch.Tensor, a_res: torch.Tensor,
                     b: torch.Tensor, u_in: torch.Tensor, r_in: torch.Tensor, eps: float, pre_eps: float,
                     post_mult: float, iters: int, sinkhorn_eps: float) -> List[torch.Tensor]:
    """csrc/mhc_boundary_bwd.cu mhc_boundary_bwd: [dH (H's layout), dy, dalpha, dbeta,
    dphi, da_pre, da_post, da_res, db]."""
    post = HcPostInputs(H, y, alpha, beta)
    sh = check_mhc_inputs(H_next, iters)
    n, d, N, M = sh.n, sh.d, sh.N, sh.M
    dev = H.device
    smem_bytes = bwd_smem_floats(iters) * torch.float32.itemsize
    fused = (N > 0 and n <= MHC_BOUNDARY_BWD_N and use_mma(H, dev) and smem_bytes <= MHC_BOUNDARY_BWD_SMEM_MAX
             and smem_bytes <= device_model(dev).smem_optin)
    if not fused:
        return _mhc_boundary_bwd_composed(dH_next, dx, dalpha_next, dbeta_next, H, y, alpha, beta, H_next, phi,
                                          a_pre, a_post, a_res, b, u_in, r_in, eps, pre_eps, post_mult, iters,
                                          sinkhorn_eps)

    f32 = torch.float32
    p = mhc_base_params(sh, eps, pre_eps, post_mult, iters, sinkhorn_eps)
    scales = mhc_scale_inputs(p, f32, a_pre, a_post, a_res)
    b_ = b.to(f32).contiguous()
    u = u_in.to(f32).contiguous()
    r = r_in.to(f32).contiguous()
    phi_ = fp32_rows_ld4(phi)
    dalpha_ = dalpha_next.to(f32).contiguous() if dalpha_next is not None else None
    dbeta_ = dbeta_next.to(f32).contiguous() if dbeta_next is not None else None
    p.b_ptr, p.u_ptr, p.r_ptr = b_.data_ptr(), u.data_ptr(), r.data_ptr()
    p.phi_ptr = phi_.t.data_ptr()
    p.phi_ld = phi_.ld
    p.dalpha_ptr = dalpha_.data_ptr() if dalpha_next is not None else None
    p.dbeta_ptr = dbeta_.data_ptr() if dbeta_next is not None else None
    p.ldu = round_up(M, 16)
    du = torch.empty((N, p.ldu), dtype=f32, device=dev)  # padding columns: zeros by the kernel
    G = torch.empty((N, 2 * M), dtype=f32, device=dev)
    p.du_ptr, p.g_ptr = du.data_ptr(), G.data_ptr()

    # Connection i's post: its inputs as hc_post_inputs laid them out, its outputs.
    q = post.p
    p.post_h_ptr, p.post_h_tok, p.post_h_stream_stride = q.h_ptr, q.h_tok, q.h_stream_stride
    p.post_y_ptr, p.post_y_tok = q.y_ptr, q.y_tok
    p.post_a_ptr, p.post_b_ptr = q.a_ptr, q.b_ptr
    p.post_a_token_stride, p.post_b_token_stride = q.a_token_stride, q.b_token_stride
    dH = torch.empty_like(H)
    dy = torch.empty((*sh.lead, d), dtype=y.dtype, device=y.device)
    dH_k, p.dh_tok = L.writable(dH, 2)
    p.dh_ptr = dH_k.data_ptr()
    p.dh_stream_stride = L.stream_stride(dH_k)
    p.dy_tok = L.collapse_token_dims(dy.shape[:-1], dy.stride()[:-1])
    p.dy_ptr = dy.data_ptr()
    dalpha_tok = torch.empty((N, n, n + 1), dtype=f32, device=dev)
    dbeta_tok = torch.empty((N, n), dtype=f32, device=dev)
    p.post_da_ptr, p.post_db_ptr = dalpha_tok.data_ptr(), dbeta_tok.data_ptr()
    dhn = None
    if dH_next is not None:
        dhn, p.prior_tok = L.readable(dH_next, 2)
        p.dh_prior_ptr = dhn.data_ptr()
        p.prior_stream_stride = L.stream_stride(dhn)
    gx = None
    if dx is not None:
        gx, p.gx_tok = L.readable(dx, 1)
        p.gx_ptr = gx.data_ptr()

    # Tiles in flight (mhc_tile_grid): phase 3 re-reads the tile's H, y and dx'.
    blocks = mhc_tile_grid(N, 16 * (n + 2) * d * H.element_size(), dev)
    vectorize = (L.vec_ok(p.post_h_ptr, p.post_h_tok, p.post_h_stream_stride, 8)
                 and L.vec_ok(p.post_y_ptr, p.post_y_tok, 0, 8) and L.vec_ok(p.dh_ptr, p.dh_tok, p.dh_stream_stride, 8)
                 and L.vec_ok(p.dy_ptr, p.dy_tok, 0, 8)
                 and (dH_next is None or L.vec_ok(p.dh_prior_ptr, p.prior_tok, p.prior_stream_stride, 8))
                 and (dx is None or L.vec_ok(p.gx_ptr, p.gx_tok, 0, 8)))
    kernel = f"crosslayer::mhc_boundary_bwd_kernel<{kernel_type(H.dtype)}, {str(vectorize).lower()}>"
    launch(HEADER, kernel, (blocks,), (MHC_BOUNDARY_BWD_THREADS,), smem_bytes, p, dev)
    L.copy_back(dH, dH_k)
    del scales, dhn, gx  # the tensors the kernels read live until their launches are queued

    # Both connections' coefficient sums in one token_sums launch: db = Σ_t dh, da_* =
    # Σ_t Σ_{m in the group} dh·z (connection i+1), the post's static coefficients.
    sums = TokenSums(N)
    db, da_pre, da_post, da_res = mhc_coef_sums(sums, G, M, n)
    dalpha, dbeta = hc_post_coef_grads(post, dalpha_tok, dbeta_tok, alpha, beta, sums)
    sums.run()

    # dphi = Σ_t H'ᵀ·du over the H' the forward wrote (the dH pass without dH).
    p.dh_ptr = None
    p.dh_prior_ptr = None
    p.gx_ptr = None
    dphi = mhc_coeffs_dh_pass(p, H_next, phi_.t)  # phi_: already fp32 and padded, not again
    return [dH, dy, dalpha, dbeta, dphi.to(phi.dtype).contiguous(), da_pre.to(a_pre.dtype),
            da_post.to(a_post.dtype), da_res.to(a_res.dtype), db.to(b.dtype).contiguous()]
