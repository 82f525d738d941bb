"""csrc/mhc_coeffs.cu and mhc_coeffs.h: the mHC coefficients' launchers and the host side
they share with the boundary's (crosslayer._jit.mhc_boundary; its forward,
mhc_boundary_fwd, is in mhc_coeffs.cu and runs mhc_coeffs_fwd_impl)."""

from __future__ import annotations

import ctypes
from typing import List, NamedTuple, Optional

import torch

from crosslayer._checks import acc_dtype
from crosslayer._jit import layout as L
from crosslayer._jit.common import MAX_STREAMS, WARP_SIZE, dispatch_streams, kernel_type
from crosslayer._jit.hc_post import HcPostInputs
from crosslayer._jit.hc_tile import stream_shape
from crosslayer._jit.mma_pack import (fp16_split_scale, fp32_rows_ld4, mma_xt_stage_elems, pack_fragments, round_up,
                                      sum_partials, token_groups)
from crosslayer._jit.runtime import device_model, has_mma_sync_16bit, launch
from crosslayer._jit.stream_mix import stream_mix_fwd
from crosslayer._jit.structs import Params, TokenLayout, c_int, c_int64, c_void_p, header_constant
from crosslayer._jit.token_sums import TokenSums

c_double = ctypes.c_double

HEADER = "kernels/mhc_coeffs.cuh"
MMA_MIN_D = header_constant("kMmaMinD", "mhc_coeffs.h")
MIN_TILES_PER_GROUP = header_constant("kMinTilesPerGroup", "mhc_coeffs.cu")
CBUF_SMEM_MAX = header_constant("kCbufSmemMax", "mhc_coeffs.cu")
MHC_COEFFS_WARPS = header_constant("kMhcCoeffsWarps", HEADER)
MHC_COEFFS_THREADS = MHC_COEFFS_WARPS * WARP_SIZE  # kMhcCoeffsThreads
MHC_COEFFS_EPI_THREADS = header_constant("kMhcCoeffsEpiThreads", HEADER)
MHC_FWD_WARPS = header_constant("kMhcFwdWarps", HEADER)
MHC_FWD_THREADS = MHC_FWD_WARPS * WARP_SIZE  # kMhcFwdThreads


class MhcCoeffsParams(Params):
    """kernels/mhc_coeffs.cuh."""
    _fields_ = [("n_tokens", c_int64), ("d", c_int64), ("n", c_int), ("M", c_int), ("m_pad", c_int), ("ldu", c_int),
                ("cps", c_int64), ("iters", c_int), ("eps", c_double), ("pre_eps", c_double),
                ("post_mult", c_double), ("sinkhorn_eps", c_double), ("h_tok", TokenLayout),
                ("h_stream_stride", c_int64), ("dh_tok", TokenLayout), ("dh_stream_stride", c_int64),
                ("h_ptr", c_void_p), ("phif_ptr", c_void_p), ("proj_unscale_ptr", c_void_p), ("a_pre_ptr", c_void_p),
                ("a_post_ptr", c_void_p), ("a_res_ptr", c_void_p), ("b_ptr", c_void_p), ("up_ptr", c_void_p),
                ("ssp_ptr", c_void_p), ("x_tok", TokenLayout), ("x_ptr", c_void_p), ("hn_ptr", c_void_p),
                ("post_h_ptr", c_void_p), ("post_h_tok", TokenLayout), ("post_h_stream_stride", c_int64),
                ("post_y_ptr", c_void_p), ("post_y_tok", TokenLayout), ("post_a_ptr", c_void_p),
                ("post_b_ptr", c_void_p), ("post_a_token_stride", c_int64), ("post_b_token_stride", c_int64),
                ("alpha_ptr", c_void_p), ("beta_ptr", c_void_p), ("u_ptr", c_void_p), ("r_ptr", c_void_p),
                ("dalpha_ptr", c_void_p), ("dbeta_ptr", c_void_p), ("dpre_ptr", c_void_p), ("du_ptr", c_void_p),
                ("s_ptr", c_void_p), ("g_ptr", c_void_p), ("cbuf_ptr", c_void_p), ("dh_ptr", c_void_p),
                ("dh_prior_ptr", c_void_p), ("prior_tok", TokenLayout), ("prior_stream_stride", c_int64),
                ("token_groups", c_int64), ("tiles_per_group", c_int64), ("dphi_part_ptr", c_void_p),
                ("gx_tok", TokenLayout), ("gx_ptr", c_void_p), ("w_pre_ptr", c_void_p), ("phi_ptr", c_void_p),
                ("phi_ld", c_int64), ("dy_tok", TokenLayout), ("dy_ptr", c_void_p), ("post_da_ptr", c_void_p),
                ("post_db_ptr", c_void_p)]


PARAMS = {"mhc_coeffs_fwd_kernel": MhcCoeffsParams, "mhc_coeffs_fwd_epilogue_kernel": MhcCoeffsParams,
          "mhc_coeffs_bwd_epilogue_kernel": MhcCoeffsParams, "mhc_coeffs_bwd_dh_kernel": MhcCoeffsParams}


def proj_tiles(kn: int) -> int:
    """kernels/mhc_coeffs.cuh MhcCoeffsProjTiles<kN>::value: n-tiles of the forward's pass."""
    return 3 if kn == 4 else 8


def dphi_tiles(kn: int) -> int:
    """kernels/mhc_coeffs.cuh MhcCoeffsDphiTiles<kN>::value: n-tiles of dphi a column pass."""
    return 3 if kn == 4 else 8


def fwd_smem_floats(kn: int, m_pad: int) -> int:
    """kernels/mhc_coeffs.cuh mhc_coeffs_fwd_smem_floats<kN>(m_pad)."""
    return MHC_FWD_WARPS * 16 * 8 * proj_tiles(kn) + 16 * m_pad + MHC_FWD_WARPS * 16 + 16 + 16 * kn


class MhcShape(NamedTuple):
    """csrc/mhc_coeffs.h MhcShape: the streams' shape and M = n² + 2n."""
    lead: list
    N: int
    n: int
    d: int
    M: int


def check_mhc_inputs(H: torch.Tensor, iters: int) -> MhcShape:
    """csrc/mhc_coeffs.h check_mhc_inputs: the shape (the public functions have validated
    phi, b and the scales)."""
    lead, N, n, d = stream_shape(H)
    assert d >= 1, f"H must have d >= 1 features (its rms is over n·d), got {tuple(H.shape)}"
    assert iters >= 1, f"iters must be >= 1, got {iters}"
    return MhcShape(lead, N, n, d, n * n + 2 * n)


def use_mma(H: torch.Tensor, device: torch.device) -> bool:
    """csrc/mhc_coeffs.h use_mma: 16-bit H, d >= kMmaMinD, a device with 16-bit mma.sync."""
    return H.dtype in (torch.bfloat16, torch.float16) and H.size(-1) >= MMA_MIN_D and has_mma_sync_16bit(device)


class MhcScaleTensors(NamedTuple):
    pre: torch.Tensor
    post: torch.Tensor
    res: torch.Tensor


def mhc_scale_inputs(p: MhcCoeffsParams, acc: torch.dtype, a_pre: torch.Tensor, a_post: torch.Tensor,
                     a_res: torch.Tensor) -> MhcScaleTensors:
    """csrc/mhc_coeffs.h mhc_scale_inputs: the scales in the accumulator dtype, p pointed at them."""
    t = MhcScaleTensors(a_pre.to(acc), a_post.to(acc), a_res.to(acc))
    p.a_pre_ptr, p.a_post_ptr, p.a_res_ptr = t.pre.data_ptr(), t.post.data_ptr(), t.res.data_ptr()
    return t


def mhc_base_params(sh: MhcShape, eps: float, pre_eps: float, post_mult: float, iters: int,
                    sinkhorn_eps: float) -> MhcCoeffsParams:
    """csrc/mhc_coeffs.h mhc_base_params: the fields every launch shares."""
    p = MhcCoeffsParams()
    p.n_tokens, p.d, p.n, p.M = sh.N, sh.d, sh.n, sh.M
    p.cps = round_up(sh.d, 32) // 32
    p.iters = iters
    p.eps, p.pre_eps, p.post_mult, p.sinkhorn_eps = eps, pre_eps, post_mult, sinkhorn_eps
    return p


def mhc_tile_grid(n_tokens: int, tile_bytes: int, device: torch.device) -> int:
    """csrc/mhc_coeffs.h mhc_tile_grid: blocks of a tile kernel that re-reads its tile."""
    model = device_model(device)
    tiles = (n_tokens + 15) // 16
    return min(tiles, 2 * model.sms, max(model.sms, model.l2_bytes // 2 // tile_bytes))


def _launch_epilogue(kernel: str, acc: torch.dtype, kn: int, p: MhcCoeffsParams, group: int, smem: int,
                     device: torch.device) -> None:
    """csrc/mhc_coeffs.cu launch_epilogue (of the kernel instantiated for acc, kn)."""
    blocks = (p.n_tokens * group + MHC_COEFFS_EPI_THREADS - 1) // MHC_COEFFS_EPI_THREADS
    launch(HEADER, f"crosslayer::{kernel}<{kernel_type(acc)}, {kn}>", (blocks,), (MHC_COEFFS_EPI_THREADS,), smem, p,
           device)


def mhc_coeffs_fwd_impl(H_in: torch.Tensor, phi: torch.Tensor, a_pre: torch.Tensor, a_post: torch.Tensor,
                        a_res: torch.Tensor, b: torch.Tensor, eps: float, pre_eps: float, post_mult: float,
                        iters: int, sinkhorn_eps: float, with_x: bool,
                        post: Optional[HcPostInputs]) -> List[torch.Tensor]:
    """csrc/mhc_coeffs.cu mhc_coeffs_fwd_impl: [alpha, beta, u, r] and, with_x, x. With
    `post` (the boundary), H_in is H' = hc_post(post's H, y, alpha, beta), allocated by
    the caller and written here on the tensor-core path (the caller has written it on
    the other)."""
    sh = check_mhc_inputs(H_in, iters)
    acc = acc_dtype(H_in.dtype)
    n, d, N, M = sh.n, sh.d, sh.N, sh.M
    dev = H_in.device
    alpha = torch.empty((*sh.lead, n, n + 1), dtype=acc, device=dev)
    beta = torch.empty((*sh.lead, n), dtype=acc, device=dev)
    u = torch.empty((*sh.lead, M), dtype=acc, device=dev)
    r = torch.empty(sh.lead, dtype=acc, device=dev)
    out = [alpha, beta, u, r]
    if N == 0:
        if with_x:
            out.append(torch.empty((*sh.lead, d), dtype=H_in.dtype, device=dev))
        return out

    p = mhc_base_params(sh, eps, pre_eps, post_mult, iters, sinkhorn_eps)
    scales = mhc_scale_inputs(p, acc, a_pre, a_post, a_res)
    b_ = b.to(acc).contiguous()
    p.b_ptr = b_.data_ptr()
    p.alpha_ptr, p.beta_ptr, p.u_ptr, p.r_ptr = alpha.data_ptr(), beta.data_ptr(), u.data_ptr(), r.data_ptr()

    if use_mma(H_in, dev):
        H, p.h_tok = L.readable(H_in, 2)
        p.h_ptr = H.data_ptr()
        p.h_stream_stride = L.stream_stride(H)
        if post is not None:
            assert H is H_in, "mhc_boundary_fwd: H' must be writable in place"
            p.hn_ptr = H.data_ptr()  # written through its layout p.h_tok
            q = post.p
            p.post_h_ptr, p.post_h_tok, p.post_h_stream_stride = q.h_ptr, q.h_tok, q.h_stream_stride
            p.post_y_ptr, p.post_y_tok = q.y_ptr, q.y_tok
            p.post_a_ptr, p.post_b_ptr = q.a_ptr, q.b_ptr
            p.post_a_token_stride, p.post_b_token_stride = q.a_token_stride, q.b_token_stride
        x = None
        if with_x:
            x = torch.empty((*sh.lead, d), dtype=H_in.dtype, device=dev)
            x, p.x_tok = L.with_token_layout(x, 1)
            p.x_ptr = x.data_ptr()
        kNT = proj_tiles(4) if n == 4 else proj_tiles(MAX_STREAMS)
        p.m_pad = round_up(M, 8 * kNT)
        # phi in 16-bit parts, packed in one launch: fp16 scaled by a power of two first
        # (on the device), parts {hi, lo}; bf16 parts {hi, lo, rest, unused}.
        fp16 = H.dtype == torch.float16
        sc = fp16_split_scale(phi) if fp16 else None
        if fp16:
            p.proj_unscale_ptr = sc.unscale.data_ptr()
        phif = pack_fragments(phi, n, p.cps * 32, p.m_pad, 2 if fp16 else 4, H.dtype,
                              sc.scale if fp16 else None)
        p.phif_ptr = phif.data_ptr()
        # Tiles in flight (mhc_tile_grid): phase 3 re-reads the tile (16 tokens of H).
        blocks = mhc_tile_grid(N, 16 * n * d * H.element_size(), dev)
        vectorize = (L.vec_ok(p.h_ptr, p.h_tok, p.h_stream_stride, 8)
                     and (not with_x or L.vec_ok(p.x_ptr, p.x_tok, 0, 8))
                     and (post is None or (L.vec_ok(p.post_h_ptr, p.post_h_tok, p.post_h_stream_stride, 8)
                                           and L.vec_ok(p.post_y_ptr, p.post_y_tok, 0, 8))))
        kn = dispatch_streams(n, (4,), MAX_STREAMS)
        smem = fwd_smem_floats(kn, p.m_pad) * torch.float32.itemsize
        kernel = (f"crosslayer::mhc_coeffs_fwd_kernel<{kernel_type(H.dtype)}, {str(vectorize).lower()}, {kn}, "
                  f"{str(post is not None).lower()}>")
        launch(HEADER, kernel, (blocks,), (MHC_FWD_THREADS,), smem, p, dev)
        del scales  # the tensors the kernels read live until their launches are queued
        if with_x:
            out.append(x)
        return out

    # The oracle's sequence: u = xf·phi, Σ xf² in the accumulator dtype, the epilogue
    # kernel, then x by stream_mix.
    xf = H_in.reshape(N, n * d).to(acc)
    up = torch.mm(xf, phi.to(acc)).contiguous()
    ssp = xf.square().sum(1)
    p.m_pad = M
    p.up_ptr, p.ssp_ptr = up.data_ptr(), ssp.data_ptr()
    kn = dispatch_streams(n, (4,), MAX_STREAMS)
    _launch_epilogue("mhc_coeffs_fwd_epilogue_kernel", acc, kn, p, kn, 0, dev)
    del scales  # the tensors the kernels read live until their launches are queued
    if with_x:
        out.append(stream_mix_fwd(H_in, alpha.select(-1, 0)))
    return out


def mhc_coeffs_fwd(H: torch.Tensor, phi: torch.Tensor, a_pre: torch.Tensor, a_post: torch.Tensor,
                   a_res: torch.Tensor, b: torch.Tensor, eps: float, pre_eps: float, post_mult: float, iters: int,
                   sinkhorn_eps: float) -> List[torch.Tensor]:
    """csrc/mhc_coeffs.cu mhc_coeffs_fwd: [alpha, beta, u, r]."""
    return mhc_coeffs_fwd_impl(H, phi, a_pre, a_post, a_res, b, eps, pre_eps, post_mult, iters, sinkhorn_eps,
                               False, None)


def mhc_pre_fwd(H: torch.Tensor, phi: torch.Tensor, a_pre: torch.Tensor, a_post: torch.Tensor, a_res: torch.Tensor,
                b: torch.Tensor, eps: float, pre_eps: float, post_mult: float, iters: int,
                sinkhorn_eps: float) -> List[torch.Tensor]:
    """csrc/mhc_coeffs.cu mhc_pre_fwd: [x, alpha, beta, u, r]."""
    out = mhc_coeffs_fwd_impl(H, phi, a_pre, a_post, a_res, b, eps, pre_eps, post_mult, iters, sinkhorn_eps,
                              True, None)
    return out[-1:] + out[:-1]  # x first


def mhc_coeffs_dh_pass(p: MhcCoeffsParams, H_in: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """csrc/mhc_coeffs.cu mhc_coeffs_dh_pass: dphi (n·d, M) fp32 (the token groups'
    partials summed), and dH through p's dh fields when p.dh_ptr is set."""
    n, d, N, M = p.n, p.d, p.n_tokens, p.M
    dev = H_in.device
    H, p.h_tok = L.readable(H_in, 2)
    p.h_ptr = H.data_ptr()
    p.h_stream_stride = L.stream_stride(H)
    phi32 = fp32_rows_ld4(phi)  # read as fp32 (no packing launch)
    p.phi_ptr = phi32.t.data_ptr()
    p.phi_ld = phi32.ld
    # Token groups, at least kMinTilesPerGroup tiles a group.
    chunks = p.cps * n
    tg = token_groups(N, chunks, device_model(dev).sms, MIN_TILES_PER_GROUP)
    p.token_groups, p.tiles_per_group = tg.groups, tg.tiles_per_group
    part = torch.empty((p.token_groups, n * d, M), dtype=torch.float32, device=dev)
    p.dphi_part_ptr = part.data_ptr()
    vectorize = (L.vec_ok(p.h_ptr, p.h_tok, p.h_stream_stride, 8)
                 and (p.dh_ptr is None or L.vec_ok(p.dh_ptr, p.dh_tok, p.dh_stream_stride, 8))
                 and (p.gx_ptr is None or L.vec_ok(p.gx_ptr, p.gx_tok, 0, 8))
                 and (p.dh_prior_ptr is None or L.vec_ok(p.dh_prior_ptr, p.prior_tok, p.prior_stream_stride, 8)))
    blocks = (chunks * p.token_groups + MHC_COEFFS_WARPS - 1) // MHC_COEFFS_WARPS
    smem = MHC_COEFFS_WARPS * mma_xt_stage_elems(H.dtype) * torch.bfloat16.itemsize
    kdt = dphi_tiles(dispatch_streams(n, (4,), MAX_STREAMS))
    grid = (blocks, (M + 8 * kdt - 1) // (8 * kdt))
    launch(HEADER, f"crosslayer::mhc_coeffs_bwd_dh_kernel<{kernel_type(H.dtype)}, {str(vectorize).lower()}, {kdt}>",
           grid, (MHC_COEFFS_THREADS,), smem, p, dev)
    # dphi: the token groups' partials summed in group order (one group: the partial).
    return sum_partials(part)


def mhc_coef_sums(sums: TokenSums, G: torch.Tensor, M: int, n: int) -> List[torch.Tensor]:
    """The epilogue's per-token rows G (N, 2M) summed by `sums` (its next run()): db =
    Σ_t dh (M,), and da_pre, da_post, da_res = Σ_t Σ_{m in the group} dh·z (0-dim), as
    mhc_coeffs.cu and mhc_boundary_bwd.cu sum them."""
    return [sums.sum(G, (M,), 1, 0, 1), sums.sum(G, (), 1, M, n), sums.sum(G, (), 1, M + n, n),
            sums.sum(G, (), 1, M + 2 * n, n * n)]


def mhc_coeffs_bwd(dH: torch.Tensor, accumulate: bool, prior: Optional[torch.Tensor], dalpha: Optional[torch.Tensor],
                   dbeta: Optional[torch.Tensor], dpre: Optional[torch.Tensor], dx: Optional[torch.Tensor],
                   H_in: torch.Tensor, phi: torch.Tensor, a_pre: torch.Tensor, a_post: torch.Tensor,
                   a_res: torch.Tensor, b: torch.Tensor, u_in: torch.Tensor, r_in: torch.Tensor, eps: float,
                   pre_eps: float, post_mult: float, iters: int, sinkhorn_eps: float) -> List[torch.Tensor]:
    """csrc/mhc_coeffs.cu mhc_coeffs_bwd: dH written (=), added to (+=, `accumulate`) or
    written as prior + the terms, in place; [dphi, da_pre, da_post, da_res, db]."""
    sh = check_mhc_inputs(H_in, iters)
    n, d, N, M = sh.n, sh.d, sh.N, sh.M
    assert not (accumulate and prior is not None), \
        "mhc_coeffs_bwd: accumulate (dH += ...) and prior (dH = prior + ...) are exclusive"
    acc = acc_dtype(H_in.dtype)
    dev = H_in.device

    if N == 0:
        return [torch.zeros(phi.shape, dtype=phi.dtype, device=phi.device),
                torch.zeros((), dtype=a_pre.dtype, device=a_pre.device),
                torch.zeros((), dtype=a_post.dtype, device=a_post.device),
                torch.zeros((), dtype=a_res.dtype, device=a_res.device),
                torch.zeros(b.shape, dtype=b.dtype, device=b.device)]
    p = mhc_base_params(sh, eps, pre_eps, post_mult, iters, sinkhorn_eps)
    scales = mhc_scale_inputs(p, acc, a_pre, a_post, a_res)
    b_ = b.to(acc).contiguous()
    u = u_in.to(acc).contiguous()
    r = r_in.to(acc).contiguous()
    dalpha_ = dalpha.to(acc).contiguous() if dalpha is not None else None
    dbeta_ = dbeta.to(acc).contiguous() if dbeta is not None else None
    dpre_ = dpre.to(acc).contiguous() if dpre is not None else None
    p.ldu = round_up(M, 16)
    du = torch.empty((N, p.ldu), dtype=acc, device=dev)  # padding columns: zeros by the epilogue
    s = torch.empty(N, dtype=acc, device=dev)
    G = torch.empty((N, 2 * M), dtype=acc, device=dev)
    p.b_ptr, p.u_ptr, p.r_ptr = b_.data_ptr(), u.data_ptr(), r.data_ptr()
    p.dalpha_ptr = dalpha_.data_ptr() if dalpha is not None else None
    p.dbeta_ptr = dbeta_.data_ptr() if dbeta is not None else None
    p.dpre_ptr = dpre_.data_ptr() if dpre is not None else None
    w_pre = torch.empty((N, n), dtype=acc, device=dev) if dx is not None else None
    p.w_pre_ptr = w_pre.data_ptr() if dx is not None else None
    p.du_ptr, p.s_ptr, p.g_ptr = du.data_ptr(), s.data_ptr(), G.data_ptr()

    # Sinkhorn scales: shared memory [steps][threads] when small, else a global workspace.
    steps = 2 * iters - 1
    group = 4 if n == 4 else MAX_STREAMS
    blocks = (N * group + MHC_COEFFS_EPI_THREADS - 1) // MHC_COEFFS_EPI_THREADS
    cbuf_bytes = steps * MHC_COEFFS_EPI_THREADS * acc.itemsize
    cbuf = None
    smem = 0
    if cbuf_bytes <= CBUF_SMEM_MAX:
        smem = cbuf_bytes
    else:
        cbuf = torch.empty((steps, blocks * MHC_COEFFS_EPI_THREADS), dtype=acc, device=dev)
        p.cbuf_ptr = cbuf.data_ptr()
    kn = dispatch_streams(n, (4,), MAX_STREAMS)
    _launch_epilogue("mhc_coeffs_bwd_epilogue_kernel", acc, kn, p, kn, smem, dev)
    del scales, cbuf  # the tensors the kernels read live until their launches are queued

    # db = Σ_t dh; da_* = Σ_t Σ_{m in the group} dh·z: one token_sums launch.
    sums = TokenSums(N)
    db, da_pre, da_post, da_res = mhc_coef_sums(sums, G, M, n)
    sums.run()
    duM = du.narrow(1, 0, M)

    if use_mma(H_in, dev):
        # dH in place when its token dims collapse, else a scratch copied back (holding dH
        # first when the kernel adds to it).
        dH_k, p.dh_tok = L.writable(dH, 2, keep_values=accumulate)
        if accumulate:
            prior_k = dH_k
            p.prior_tok = p.dh_tok
        elif prior is not None:
            prior_k, p.prior_tok = L.readable(prior, 2)
        else:
            prior_k = None
        p.dh_prior_ptr = prior_k.data_ptr() if prior_k is not None else None
        p.prior_stream_stride = L.stream_stride(prior_k) if prior_k is not None else 0
        p.dh_ptr = dH_k.data_ptr()
        p.dh_stream_stride = L.stream_stride(dH_k)
        gx = None
        if dx is not None:
            gx, p.gx_tok = L.readable(dx, 1)
            p.gx_ptr = gx.data_ptr()
        dphi = mhc_coeffs_dh_pass(p, H_in, phi)
        L.copy_back(dH, dH_k)
    else:
        # The oracle's form: dxf = du·phiᵀ − s·xf, dphi = xfᵀ·du, in the accumulator dtype.
        xf = H_in.reshape(N, n * d).to(acc)
        dxf = torch.mm(duM, phi.to(acc).t()) - s.unsqueeze(1) * xf
        if dx is not None:
            dxf = dxf + (w_pre.unsqueeze(2) * dx.reshape(N, 1, d).to(acc)).view(N, n * d)
        if accumulate:
            dH.add_(dxf.view(H_in.shape))
        elif prior is not None:
            dH.copy_(dxf.view(H_in.shape) + prior.to(acc))
        else:
            dH.copy_(dxf.view(H_in.shape))
        dphi = torch.mm(xf.t(), duM)
    return [dphi.to(phi.dtype).contiguous(), da_pre.to(a_pre.dtype), da_post.to(a_post.dtype),
            da_res.to(a_res.dtype), db.to(b.dtype).contiguous()]
