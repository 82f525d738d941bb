"""csrc/mudd_weights.cu: mudd_weights' launchers."""

from __future__ import annotations

import ctypes
import math
from typing import List, NamedTuple, Optional

import torch

from crosslayer._checks import acc_dtype
from crosslayer._jit import layout as L
from crosslayer._jit.common import WARP_SIZE, kernel_type
from crosslayer._jit.mma_pack import (fp16_split_scale, fp32_rows_ld4, mma_xt_stage_elems, pack_fragments, round_up,
                                      token_groups)
from crosslayer._jit.runtime import cover_grid, device_model, has_mma_sync_16bit, launch
from crosslayer._jit.slots import MAX_SLOTS
from crosslayer._jit.structs import Params, TokenLayout, c_bool, c_int, c_int64, c_void_p, header_constant

HEADER = "kernels/mudd_weights.cuh"
WARPS = header_constant("kMuddWeightsWarps", HEADER)
THREADS = WARPS * WARP_SIZE  # kMuddWeightsThreads
PROJ_WARPS = header_constant("kMuddWeightsProjWarps", HEADER)
PROJ_THREADS = PROJ_WARPS * WARP_SIZE  # kMuddWeightsProjThreads
PROJ_COLS = header_constant("kMuddWeightsProjCols", HEADER)
DW1_TILES = header_constant("kMuddWeightsDw1Tiles", HEADER)
HEAD_THREADS = header_constant("kMuddWeightsHeadThreads", HEADER)
HEAD_TOKENS = header_constant("kMuddWeightsHeadTokens", HEADER)
MMA_MIN_D = header_constant("kMmaMinD", "mudd_weights.cu")


class MuddWeightsParams(Params):
    """kernels/mudd_weights.cuh."""
    _fields_ = [("n_tokens", c_int64), ("d", c_int64), ("K", c_int), ("Cl", c_int), ("ldg", c_int), ("k_pad", c_int),
                ("tanh_gelu", c_bool), ("eps", ctypes.c_double), ("x_tok", TokenLayout), ("dx_tok", TokenLayout),
                ("x_ptr", c_void_p), ("w1f_ptr", c_void_p), ("w1f_unscale_ptr", c_void_p), ("w1_ptr", c_void_p),
                ("w1_ld", c_int64), ("w2_ptr", c_void_p), ("bias_ptr", c_void_p), ("u_ptr", c_void_p),
                ("r_ptr", c_void_p), ("a_ptr", c_void_p), ("da_ptr", c_void_p), ("h_ptr", c_void_p),
                ("dw2_ptr", c_void_p), ("tickets", c_void_p), ("g_ptr", c_void_p), ("s_ptr", c_void_p),
                ("dx_ptr", c_void_p), ("accumulate_dx", c_bool), ("token_groups", c_int64),
                ("tiles_per_group", c_int64), ("dw1_passes", c_int), ("dw1_ptr", c_void_p)]


PARAMS = {"mudd_weights_fwd_proj_kernel": MuddWeightsParams, "mudd_weights_bwd_dx_kernel": MuddWeightsParams,
          "mudd_weights_fwd_head_kernel": MuddWeightsParams, "mudd_weights_bwd_head_kernel": MuddWeightsParams}


class MuddShape(NamedTuple):
    """csrc/mudd_weights.cu MuddShape: the token dims (common/layout.h TokenDims), d, the
    hidden width K, the C·l outputs, C and l."""
    lead: list
    N: int
    d: int
    K: int
    Cl: int
    C: int
    l: int


def check_mudd_inputs(x: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor, n_ways: int) -> MuddShape:
    """csrc/mudd_weights.cu check_mudd_inputs: the shape of x (*tok, d), W1 (d, K), W2
    (K, C·l) with C = n_ways and 1 <= l <= kMaxSlots (the public functions have validated
    the rest)."""
    lead = list(x.shape[:-1])
    Cl = W2.size(1)
    assert n_ways >= 1 and Cl % n_ways == 0 and 1 <= Cl // n_ways <= MAX_SLOTS, \
        f"W2 must have shape (K, C*l) with C = n_ways = {n_ways} and 1 <= l <= {MAX_SLOTS}, got {tuple(W2.shape)}"
    return MuddShape(lead, math.prod(lead), x.size(-1), W1.size(1), Cl, n_ways, Cl // n_ways)


def tanh_form(approximate: str) -> bool:
    """csrc/mudd_weights.cu tanh_form: the GELU form, "none" (erf) or "tanh"."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got '{approximate}'")
    return approximate == "tanh"


def use_mma(x: torch.Tensor, device: torch.device) -> bool:
    """csrc/mudd_weights.cu use_mma: the tensor-core path (16-bit x, d >= kMmaMinD, a
    device with 16-bit mma.sync); otherwise the at::mm path computes the same in fp32."""
    return x.dtype in (torch.bfloat16, torch.float16) and x.size(-1) >= MMA_MIN_D and has_mma_sync_16bit(device)


def check_head_smem(smem: int, p: MuddWeightsParams, device: torch.device, what: str) -> None:
    """csrc/mudd_weights.cu check_head_smem: refuses more dynamic shared memory than the
    device's."""
    optin = device_model(device).smem_optin
    if smem > optin:
        raise RuntimeError(f"{what}: needs {smem} bytes of shared memory (K = {p.K}, C*l = {p.Cl}), "
                           f"the device allows {optin}")


def head_blocks(n_tokens: int, device: torch.device, blocks_per_sm: int) -> int:
    """csrc/mudd_weights.cu head_blocks: min(tiles, SMs × blocks_per_sm)."""
    tiles = (n_tokens + HEAD_TOKENS - 1) // HEAD_TOKENS
    return min(tiles, device_model(device).sms * blocks_per_sm)


def launch_head(kernel: str, p: MuddWeightsParams, smem: int, blocks: int, device: torch.device, what: str) -> None:
    """csrc/mudd_weights.cu launch_head: a head kernel over N tokens with `smem` bytes of
    dynamic shared memory."""
    check_head_smem(smem, p, device, what)
    launch(HEADER, kernel, (blocks,), (HEAD_THREADS,), smem, p, device)


def mudd_weights_params(sh: MuddShape, tanh_gelu: bool) -> MuddWeightsParams:
    """csrc/mudd_weights.cu mudd_weights_params: the fields both directions set."""
    p = MuddWeightsParams()
    p.n_tokens = sh.N
    p.d = sh.d
    p.K = sh.K
    p.Cl = sh.Cl
    p.ldg = round_up(sh.K, 16)
    p.k_pad = round_up(sh.K, PROJ_COLS)
    p.tanh_gelu = tanh_gelu
    return p


def mudd_dw1_passes(sh: MuddShape) -> int:
    """csrc/mudd_weights.cu mudd_dw1_passes: dW1 column passes of the dx kernel."""
    return (sh.K + 8 * DW1_TILES - 1) // (8 * DW1_TILES)


def mudd_dx_units(sh: MuddShape) -> int:
    """csrc/mudd_weights.cu mudd_dx_units: warps of one token group of the dx kernel."""
    return (sh.d + 31) // 32 * mudd_dw1_passes(sh)


def mudd_weights_dx_pass(p: MuddWeightsParams, sh: MuddShape, x_in: torch.Tensor, W1: torch.Tensor,
                         dx: torch.Tensor) -> torch.Tensor:
    """csrc/mudd_weights.cu mudd_weights_dx_pass: dx (=, or += with p.accumulate_dx;
    through writable / copy_back) and dW1 (d, K) fp32, returned, for bf16/fp16 x from the
    head's g and s, over token groups of at least K tiles."""
    device = x_in.device
    x, p.x_tok = L.readable(x_in, 1)
    dx_k, p.dx_tok = L.writable(dx, 1, p.accumulate_dx)
    w1 = fp32_rows_ld4(W1)  # read as fp32: no packing launch
    p.x_ptr = x.data_ptr()
    p.dx_ptr = dx_k.data_ptr()
    p.w1_ptr = w1.t.data_ptr()
    p.w1_ld = w1.ld
    p.dw1_passes = mudd_dw1_passes(sh)
    units = mudd_dx_units(sh)
    tg = token_groups(sh.N, units, device_model(device).sms, max(4, sh.K))
    p.token_groups = tg.groups
    p.tiles_per_group = tg.tiles_per_group
    dW1 = torch.empty((sh.d, sh.K), dtype=torch.float32, device=x.device)
    p.dw1_ptr = dW1.data_ptr()
    vectorize = L.vec_ok(p.x_ptr, p.x_tok, 0, 8) and L.vec_ok(p.dx_ptr, p.dx_tok, 0, 8)
    blocks = (units * tg.groups + WARPS - 1) // WARPS
    smem = WARPS * mma_xt_stage_elems(x.dtype) * torch.bfloat16.itemsize
    launch(HEADER, f"crosslayer::mudd_weights_bwd_dx_kernel<{kernel_type(x.dtype)}, {str(vectorize).lower()}>",
           (blocks,), (THREADS,), smem, p, device)
    L.copy_back(dx, dx_k)
    return dW1


def mudd_weights_fwd(x_in: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor, bias: torch.Tensor, n_ways: int,
                     eps: float, approximate: str) -> List[torch.Tensor]:
    """csrc/mudd_weights.cu mudd_weights_fwd: [A (*tok, C, l), u (*tok, K), r (*tok)] in
    the accumulator dtype."""
    sh = check_mudd_inputs(x_in, W1, W2, n_ways)
    tanh_gelu = tanh_form(approximate)
    acc = acc_dtype(x_in.dtype)
    A = torch.empty((*sh.lead, sh.C, sh.l), dtype=acc, device=x_in.device)
    u = torch.empty((*sh.lead, sh.K), dtype=acc, device=x_in.device)
    r = torch.empty(sh.lead, dtype=acc, device=x_in.device)
    if sh.N == 0:
        return [A, u, r]

    p = mudd_weights_params(sh, tanh_gelu)
    p.eps = eps
    W2_ = W2.to(acc).contiguous()
    b_ = bias.to(acc).reshape(sh.Cl).contiguous()
    p.w2_ptr = W2_.data_ptr()
    p.bias_ptr = b_.data_ptr()
    p.u_ptr = u.data_ptr()
    p.r_ptr = r.data_ptr()
    p.a_ptr = A.data_ptr()
    device = x_in.device

    if use_mma(x_in, device):
        x, p.x_tok = L.readable(x_in, 1)
        # W1 in hi + lo parts of x's dtype; fp16 scaled by 2^k first (max|W1|·2^k in
        # [2^14, 2^15), on the device: no sync), the kernel scaling u back by 2^-k.
        sc = None
        if x.dtype == torch.float16:
            sc = fp16_split_scale(W1)
            p.w1f_unscale_ptr = sc.unscale.data_ptr()
        w1f = pack_fragments(W1, 1, round_up(sh.d, 32), p.k_pad, 2, x.dtype, sc.scale if sc is not None else None)
        p.x_ptr = x.data_ptr()
        p.w1f_ptr = w1f.data_ptr()
        vectorize = L.vec_ok(p.x_ptr, p.x_tok, 0, 8)
        launch(HEADER, f"crosslayer::mudd_weights_fwd_proj_kernel<{kernel_type(x.dtype)}, {str(vectorize).lower()}>",
               (cover_grid(sh.N, 16 * PROJ_WARPS),), (PROJ_THREADS,), 0, p, device)
        return [A, u, r]
    # The oracle's own sequence of operations: r = rsqrt(mean x² + eps), u = (x·r)·W1.
    x2 = x_in.reshape(sh.N, sh.d).to(acc)
    r2 = torch.rsqrt(x2.square().mean(1, keepdim=True) + eps)
    u.view(sh.N, sh.K).copy_(torch.mm(x2 * r2, W1.to(acc)))
    r.view(sh.N).copy_(r2.view(sh.N))
    smem = HEAD_TOKENS * sh.K * acc.itemsize
    launch_head(f"crosslayer::mudd_weights_fwd_head_kernel<{kernel_type(acc)}>", p, smem,
                head_blocks(sh.N, device, 8), device, "mudd_weights_fwd")
    return [A, u, r]


def mudd_weights_bwd(dA_in: torch.Tensor, x_in: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor,
                     bias: torch.Tensor, u_in: torch.Tensor, r_in: torch.Tensor, n_ways: int, eps: float,
                     approximate: str, dx_acc: Optional[torch.Tensor]) -> List[torch.Tensor]:
    """csrc/mudd_weights.cu mudd_weights_bwd: [dx (*tok, d) in x's dtype (dx_acc, added
    into in place, when given), dW1 in W1's dtype, dW2b = [dW2; dbias] (K + 1, C·l) in
    the accumulator dtype]; eps unused (r carries it)."""
    sh = check_mudd_inputs(x_in, W1, W2, n_ways)
    tanh_gelu = tanh_form(approximate)
    acc = acc_dtype(x_in.dtype)
    dx = dx_acc if dx_acc is not None else torch.empty((*sh.lead, sh.d), dtype=x_in.dtype, device=x_in.device)
    if sh.N == 0:
        return [dx, torch.zeros(W1.shape, dtype=W1.dtype, device=W1.device),
                torch.zeros((sh.K + 1, sh.Cl), dtype=acc, device=x_in.device)]
    ldg = round_up(sh.K, 16)
    dA = dA_in.to(acc).reshape(sh.N, sh.Cl).contiguous()
    u = u_in.to(acc).reshape(sh.N, sh.K).contiguous()
    r = r_in.to(acc).reshape(sh.N).contiguous()
    W2_ = W2.to(acc).contiguous()
    g = torch.empty((sh.N, ldg), dtype=acc, device=x_in.device)
    s = torch.empty((sh.N,), dtype=acc, device=x_in.device)

    p = mudd_weights_params(sh, tanh_gelu)
    p.accumulate_dx = dx_acc is not None
    p.w2_ptr = W2_.data_ptr()
    p.u_ptr = u.data_ptr()
    p.r_ptr = r.data_ptr()
    p.da_ptr = dA.data_ptr()
    p.g_ptr = g.data_ptr()
    p.s_ptr = s.data_ptr()
    device = x_in.device

    # [dW2; dbias] in the head kernel (per-block sums in shared memory, one block an SM,
    # added into dW2b in block order) when its sums fit next to the tile buffers; else
    # h = [GELU(u), 1] for one GEMM.
    es = acc.itemsize
    smem = HEAD_TOKENS * (sh.Cl + sh.K) * es
    smem_dw2 = smem + (HEAD_TOKENS * sh.K + (sh.K + 1) * sh.Cl) * es
    check_head_smem(smem, p, device, "mudd_weights_bwd")
    dw2_in_head = smem_dw2 <= device_model(device).smem_optin
    mma = use_mma(x_in, device)
    blocks = head_blocks(sh.N, device, 1 if dw2_in_head else 8)
    # The turns of the ordered sums (common/ticket.cuh): [0] the head blocks', [1 + u] the
    # dx kernel's unit u; one memset.
    if dw2_in_head or mma:
        tickets = torch.zeros(1 + (mudd_dx_units(sh) if mma else 0), dtype=torch.int32, device=x_in.device)
        p.tickets = tickets.data_ptr()
    if dw2_in_head:
        dW2b = torch.empty((sh.K + 1, sh.Cl), dtype=acc, device=x_in.device)
        p.dw2_ptr = dW2b.data_ptr()
    else:
        h = torch.empty((sh.N, sh.K + 1), dtype=acc, device=x_in.device)  # [GELU(u), 1]
        p.h_ptr = h.data_ptr()
    launch_head(f"crosslayer::mudd_weights_bwd_head_kernel<{kernel_type(acc)}>", p,
                smem_dw2 if dw2_in_head else smem, blocks, device, "mudd_weights_bwd")

    gK = g.narrow(1, 0, sh.K)
    if mma:
        dW1 = mudd_weights_dx_pass(p, sh, x_in, W1, dx)
    else:
        # dx in the oracle's form r·(dxn − xn·mean(dxn·xn)), not g·W1ᵀ − s·x: at d = 1 the
        # two terms cancel to O(eps), and only the oracle's form keeps their rounding
        # errors correlated (so its error stays at the oracle's).
        x2 = x_in.reshape(sh.N, sh.d).to(acc)
        r2 = r.unsqueeze(1)
        xn = x2 * r2
        dxn = torch.mm(gK / r2, W1.to(acc).t())
        dW1 = torch.mm(x2.t(), gK)
        dx_new = (r2 * (dxn - xn * (dxn * xn).mean(1, keepdim=True))).view(dx.shape)
        if p.accumulate_dx:
            dx.add_(dx_new)
        else:
            dx.copy_(dx_new)
    # [dW2; dbias] without the head: hᵀ·dA in one GEMM (h's last column is ones).
    if not dw2_in_head:
        dW2b = torch.mm(h.t(), dA)
    return [dx, dW1.to(W1.dtype).contiguous(), dW2b]
