// mhc_coeffs: manifold-constrained Hyper-Connections (mHC) coefficients, forward and
// backward (launchers in mhc_coeffs.cu; the oracle is crosslayer/ref/mhc.py).
//
// Math, per token t: xf = vec(H_t) ∈ R^{n·d} (stream-major), phi: (n·d, M)
//   forward
//     u   = xf·phi                       (M values, = written: the backward takes them)
//     r   = rsqrt(Σ xf² / (n·d) + eps)   (= written)
//     h   = [a_pre·r·u_pre, a_post·r·u_post, a_res·r·u_res] + b
//     alpha[i, 0]   = sigmoid(h_pre[i]) + pre_eps
//     beta[i]       = post_mult·sigmoid(h_post[i])
//     alpha[i, 1+j] = Sinkhorn(h_res as n×n, row-major)[i, j]
//   Sinkhorn (DESIGN.md, pinned): P = softmax(L, -1) + eps; P /= colsum(P) + eps; then
//   (iters − 1) × (P /= rowsum(P) + eps; P /= colsum(P) + eps). Step k of the 2·iters − 1
//   normalisations is a column step for even k, a row step for odd k.
//   backward (dalpha, dbeta; zero when absent; dpre, when given, adds to dalpha[:, :, 0])
//     Sinkhorn: each step Q = P / c (c = sum + eps along the axis) has
//       dP = (dQ − Σ_axis(dQ·Q)) / c; applied from the last step to the first, where
//       Q_{k−1} = Q_k·c_k is rebuilt from the saved scale vectors c_k (exact up to one
//       rounding a step: the iterates themselves, not the converged point); the softmax
//       S gives dL = S·(dS − Σ_row(dS·S)).
//     dh_pre = dpre·σ(1−σ); dh_post = post_mult·dpost·σ(1−σ); dh_res = dL
//     dz = a·dh; du = r·dz (= written); s = <dz, u>·r³/(n·d) (= written)
//     G[t] = [dh, dh·z] (= written; the launcher sums it over tokens with token_sums for db
//            and da_*: deterministic, no atomics)
//     dxf = du·phiᵀ − s·xf                (= plus a prior gradient, which may be dH itself:
//                                          +=; mhc_coeffs_bwd_dh_kernel or at::mm;
//                                          + alpha[i, 0]·dx with the pre's dx: the
//                                          stream_mix's dH, folded into the same pass)
//     dphi = Σ_t xfᵀ·du                   (the dH kernel: partials of token groups, summed
//                                          in group order by the launcher; at::mm on the
//                                          at::mm path)
//
// Kernels
//   mhc_coeffs_fwd_kernel<T, kVec, kN, kPost>  bf16/fp16 H, the whole forward in one
//       pass over H a 16-token tile: u and Σ xf², x·phi on tensor cores (mma.sync
//       m16n8k16, fp32 accumulate) with phi as 16-bit parts of H's own dtype (H is exact
//       in it):
//       fp16: hi + lo of phi·2^k, k chosen on the device so that max|phi|·2^k lies in
//             [2^14, 2^15) (fp16's narrow exponent range would flush the lo parts of a
//             small phi to subnormals), the partials scaled back by 2^-k (exact);
//             residual 2^-22 relative;
//       bf16: hi + lo + rest (the bf16 of phi − hi − lo), three mma a fragment: hi + lo
//             alone leaves 2^-17 relative in u, which the parameter gradients (sums over
//             tokens, fp32 outputs, floor 1e-5) do not absorb; residual 2^-25.
//       kNT n-tiles (8 columns each) a pass: 3 for n = 4 (M = 24, one pass), 8 for the
//       generic instantiation (passes of 64 columns; the tile is re-read per pass, from
//       L1/L2); then the epilogue below on the tile, and (the connection's pre) x =
//       Σ_i alpha[:, i, 0]·H_i from the tile again (L1/L2). kPost: the boundary, H
//       itself mixed from connection i's post wherever it is needed, written once.
//   mhc_coeffs_fwd_epilogue_kernel<acc, kN>  the at::mm path's epilogue: rms scale,
//       gates and Sinkhorn in registers; writes alpha, beta, u, r.
//   mhc_coeffs_bwd_epilogue_kernel<acc, kN>  Sinkhorn backward and the chain above;
//       writes du, s, G.
//   mhc_coeffs_bwd_dh_kernel<T, kVec, kDT>  bf16/fp16 H: dH = du·phiᵀ − s·xf on tensor
//       cores (du and phi both fp32, split into bf16 hi/lo in the kernel, three mma:
//       hi·hi + lo·hi + hi·lo; common/mma.cuh's mma_chunk_g_w32), and in the same pass over H the dphi partials xfᵀ·du (xf staged
//       transposed through shared memory, du in bf16 hi + lo: common/mma.cuh's Xᵀ·G), H
//       read once. kDT n-tiles of dphi a pass: 3 for n = 4 (all of M), 8 otherwise (column
//       passes of 64 in grid.y: H is re-read per extra pass, from n = 8 on).
//   (fp32/fp64 H, the correctness dtypes: the launcher computes u, Σ xf², dH with at::mm
//   in the arithmetic dtype and runs the epilogue kernels; x by stream_mix.)
//
// Fragment layouts (PTX ISA mma.m16n8k16 row.col; lane = 4·grp + tig) and the packing
// of phif are those of common/mma.cuh (proj: Wf) with W := phi
// padded per stream to d_pad = d rounded up to 32 rows (zero rows), so reduction chunk
// c of 32 features is stream c / cps, features 32·(c % cps) + 0..31 (cps = d_pad / 32),
// and no chunk straddles two streams.
//
// Thread mapping
//   fwd: a block of kMhcFwdWarps warps on one 16-token tile at a time (rows grp and grp
//       + 8 of the fragments); warp w takes chunks w, w + warps, ... of the reduction
//       (partials in shared memory, summed in warp order); see the kernel.
//   dh: warp u = blockIdx.x·warps + w owns one chunk (u % (n·cps)) and one token group
//       (u / (n·cps)), whose 16-token tiles it walks in order: dH outputs are disjoint,
//       dphi accumulates in the warp's registers over the group (no atomics).
//   epilogues: a group of kN lanes per token (kN = 4 for n = 4, 16 otherwise; groups
//       are aligned inside a warp): lane i of the group owns row i of the n×n Sinkhorn
//       matrix (and pre_i, post_i) in registers; row sums are local, column sums are
//       xor-butterfly sums over the group (the same bits in every lane). Every lane of
//       every warp runs the same loop counts (n, iters uniform), so the full-mask
//       shuffles are safe; lanes of rows >= n or tokens >= N carry zeros.
//   The backward keeps each step's scale c_k (one value a lane) in a buffer `cbuf` at
//   cbuf[k·cstride + lane id]: shared memory ([step][thread]) when it fits, else a global
//   workspace ([step][global thread]).
//
// Assumptions (checked or arranged by the launcher):
//   1) H, dH: features unit-stride; tokens through TokenLayout, streams any stride; with
//      kVec, base 16-byte aligned and token/stream strides multiples of 8 elements;
//   2) phif packed as above (bf16: each lane's uint4 followed by the one of the rest,
//      {hi b0, hi b1, unused, unused}), zero-padded (rows to d_pad per stream, columns to
//      m_pad); phi (the dH pass) fp32 contiguous; 1 <= n <= 16, d >= 1;
//   3) workspaces and u, r, du, s, G, alpha, beta contiguous in the accumulator dtype
//      (the split partials of the mma path are fp32 = its accumulator dtype).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/std.cuh"

#include "common/limits.h"
#include "common/math.cuh"
#include "common/mma.cuh"
#include "common/reduce.cuh"
#include "common/tokens.cuh"
#include "common/vec.cuh"

namespace crosslayer {

constexpr int kMhcCoeffsWarps = 4;  // warps a block (dh)
constexpr int kMhcCoeffsThreads = kMhcCoeffsWarps * kWarpSize;
constexpr int kMhcCoeffsEpiThreads = 128;  // threads a block (epilogues)
constexpr int kMhcCoeffsDhTiles = 4;       // n-tiles a dh chunk (32 features)

struct MhcCoeffsParams {
  using index_t = int64_t;
  index_t n_tokens;          // N
  index_t d;                 // features a stream
  int n;                     // streams
  int M;                     // n² + 2n projections
  int m_pad;                 // columns of the packed phif (and the row stride of up)
  int ldu;                   // row stride of du (M rounded up to 16)
  index_t cps;               // chunks of 32 features a stream (d_pad / 32)
  int iters;                 // Sinkhorn iterations (>= 1)
  double eps, pre_eps, post_mult, sinkhorn_eps;
  TokenLayout h_tok;         // H (N, n, d): tokens
  index_t h_stream_stride;
  TokenLayout dh_tok;        // dH (N, n, d): tokens
  index_t dh_stream_stride;
  const void* __restrict__ h_ptr;
  const void* __restrict__ phif_ptr;  // proj: packed phi (uint4 fragments; bf16: 2 uint4)
  const float* __restrict__ proj_unscale_ptr;  // proj, fp16: 2^-k (device scalar), or null
  const void* __restrict__ a_pre_ptr;  // 0-dim scales, accumulator dtype
  const void* __restrict__ a_post_ptr;
  const void* __restrict__ a_res_ptr;
  const void* __restrict__ b_ptr;     // (M) accumulator dtype
  // forward
  void* __restrict__ up_ptr;     // at::mm path: (N, m_pad) u, for the epilogue kernel
  void* __restrict__ ssp_ptr;    // at::mm path: (N) Σ xf²
  TokenLayout x_tok;             // fused forward: the pre's x = Σ_i alpha[:, i, 0]·H_i
  void* __restrict__ x_ptr;      // (N, d), or null (the coefficients alone)
  // The boundary's forward (mhc_coeffs_fwd_kernel<..., kPost = true>): H' = hc_post(
  // post_h, post_y, post_a, post_b), connection i's post, mixed wherever it is needed and
  // written (=) once to hn_ptr through h_tok (h_ptr itself is not read); post_a (N, n,
  // n+1) / post_b (N, n) in the accumulator dtype, token strides n(n+1) / n, or 0
  // (static coefficients).
  void* hn_ptr;
  const void* __restrict__ post_h_ptr;
  TokenLayout post_h_tok;
  index_t post_h_stream_stride;
  const void* __restrict__ post_y_ptr;
  TokenLayout post_y_tok;
  const void* __restrict__ post_a_ptr;
  const void* __restrict__ post_b_ptr;
  index_t post_a_token_stride, post_b_token_stride;
  void* __restrict__ alpha_ptr;  // (N, n, n+1)
  void* __restrict__ beta_ptr;   // (N, n)
  void* __restrict__ u_ptr;      // (N, M)   forward output, backward input
  void* __restrict__ r_ptr;      // (N)      forward output, backward input
  // backward
  const void* __restrict__ dalpha_ptr;  // (N, n, n+1) or null (zero)
  const void* __restrict__ dbeta_ptr;   // (N, n) or null (zero)
  const void* __restrict__ dpre_ptr;    // (N, n) or null (zero): a second gradient of
                                        // alpha[:, :, 0] (the pre's stream_mix), added
  void* __restrict__ du_ptr;     // (N, ldu), all written by the backward epilogue
  void* __restrict__ s_ptr;      // (N)
  void* __restrict__ g_ptr;      // (N, 2M) [dh, dh·z]
  void* __restrict__ cbuf_ptr;   // global Sinkhorn scale buffer, or null (shared memory)
  void* dh_ptr;                  // dH = prior + the terms below (prior null: none)
  const void* dh_prior_ptr;      // another op's contribution to H's gradient; may be
  TokenLayout prior_tok;         // dh_ptr itself (then dH += in place)
  index_t prior_stream_stride;
  // dphi partials of the dH pass: token_groups slices (n·d, M) fp32, each the sum over
  // its tiles_per_group 16-token tiles.
  int64_t token_groups, tiles_per_group;
  void* __restrict__ dphi_part_ptr;
  // The pre's mix x = Σ_i alpha[:, i, 0]·H_i folded into the dH pass: gx (*lead, d) its
  // gradient dx, or null (no such term: then w_pre is not written either); w_pre (N, n)
  // alpha[:, :, 0], written by the backward epilogue for the dh kernel.
  TokenLayout gx_tok;
  const void* __restrict__ gx_ptr;
  void* __restrict__ w_pre_ptr;
  // phi itself, fp32 (n·d, M) row-major with row stride phi_ld (a multiple of 4, zero
  // padded: common/mma_pack.h's fp32_rows_ld4): du·phiᵀ of the dH pass and of the
  // boundary's backward (kernels/mhc_boundary.cuh) without a packing launch. The boundary's
  // backward also writes the outputs of connection i's post (post_* inputs): dH through dh_tok / dh_stream_stride at dh_ptr,
  // dy (*lead, d), and the coefficient gradient rows (N, n, n+1) / (N, n), fp32.
  const float* __restrict__ phi_ptr;
  int64_t phi_ld;
  TokenLayout dy_tok;
  void* __restrict__ dy_ptr;
  void* __restrict__ post_da_ptr;
  void* __restrict__ post_db_ptr;
};

// n = 4 (M = 24): 3 n-tiles in one pass; any other n: 8 n-tiles (64 columns) a pass.
template <int kN>
struct MhcCoeffsProjTiles {
  static constexpr int value = kN == 4 ? 3 : 8;
};

// The gates' scales a_pre, a_post, a_res.
template <typename acc>
struct MhcScales {
  acc pre, post, res;
};

template <typename acc>
__device__ __forceinline__ MhcScales<acc> mhc_scales(const MhcCoeffsParams& p) {
  return {*static_cast<const acc*>(p.a_pre_ptr), *static_cast<const acc*>(p.a_post_ptr),
          *static_cast<const acc*>(p.a_res_ptr)};
}

// The chunk c of the n·cps reduction chunks of 32 features: stream i = c / cps, this
// thread's first feature e within the stream (8 features from e, 8tig into the chunk).
__device__ __forceinline__ void mhc_coeffs_chunk(int64_t c, int64_t cps, int tig, int64_t& i, int64_t& e) {
  i = c / cps;
  e = (c - i * cps) * 32 + tig * 8;
}

// ------------------------------------------------------------------------ Sinkhorn

// Sum of v over the kN aligned lanes of the caller's group, the same bits in each lane.
// Every lane of the warp must call it.
template <int kN, typename acc>
__device__ __forceinline__ acc group_sum(acc v) {
#pragma unroll
  for (int o = kN / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Forward Sinkhorn of the caller's row L (entries j < n; the row is active when the lane
// owns a row i < n of a real token). S = softmax(L) (zero when inactive), P = the output
// row. With cbuf, the scale c_k of step k owned by this lane (column step: the sum of
// column `row` + eps; row step: the row sum + eps) goes to cbuf[k·cstride]. Every lane
// of the warp must call it (group sums).
template <typename acc, int kN>
__device__ __forceinline__ void mhc_sinkhorn_fwd(const acc (&L)[kN], int n, int row, bool active,
                                                 int iters, acc eps, acc (&S)[kN], acc (&P)[kN],
                                                 acc* cbuf, int64_t cstride) {
  acc mx = L[0];
#pragma unroll
  for (int j = 1; j < kN; ++j) mx = (j < n && L[j] > mx) ? L[j] : mx;
  acc sum = acc(0);
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    S[j] = j < n ? acc_exp(L[j] - mx) : acc(0);
    sum += S[j];
  }
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    S[j] = active ? S[j] / sum : acc(0);
    P[j] = (active && j < n) ? S[j] + eps : acc(0);
  }
  const int steps = 2 * iters - 1;
  for (int k = 0; k < steps; ++k) {
    acc c_own;
    if (k % 2 == 0) {  // column step
      c_own = eps;
#pragma unroll
      for (int j = 0; j < kN; ++j) {
        const acc c = group_sum<kN>(P[j]) + eps;
        P[j] = P[j] / c;
        if (j == row) c_own = c;
      }
    } else {  // row step
      acc s = acc(0);
#pragma unroll
      for (int j = 0; j < kN; ++j) s += P[j];
      c_own = s + eps;
#pragma unroll
      for (int j = 0; j < kN; ++j) P[j] = P[j] / c_own;
    }
    if (cbuf != nullptr) cbuf[k * cstride] = c_own;
  }
}

// Backward Sinkhorn of the caller's row: g = dP of the last iterate P on entry (row i
// of dcomb), rebuilt back to the first iterate from the saved scales cbuf[k·cstride]
// (P is walked back with them), then through the softmax S: dh_res = S·(g − <g, S>).
// g stays 0 outside the n×n matrix (rows >= n, columns >= n, tokens >= N): there P = 0
// and the scale is eps (an empty sum), so a row step would give column j >= n g =
// −dot/c, the next column step divide it by eps, and so on: g would grow by 1/eps every
// other step, overflow and poison the dots of the real entries with inf·0 = NaN. Every
// lane of the warp must call it (group sums, shuffles).
template <typename acc, int kN>
__device__ __forceinline__ void mhc_sinkhorn_bwd(acc (&g)[kN], acc (&P)[kN], const acc (&S)[kN], int n,
                                                 bool active, int iters, const acc* cbuf, int64_t cstride,
                                                 acc (&dh_res)[kN]) {
  const int steps = 2 * iters - 1;
  for (int k = steps - 1; k >= 0; --k) {
    const acc c_own = cbuf[k * cstride];
    if (k % 2 == 0) {  // column step: column j's scale is owned by lane j of the group
#pragma unroll
      for (int j = 0; j < kN; ++j) {
        const acc dot = group_sum<kN>(g[j] * P[j]);
        const acc c = __shfl_sync(0xffffffffu, c_own, j, kN);
        g[j] = (active && j < n) ? (g[j] - dot) / c : acc(0);
        P[j] = P[j] * c;
      }
    } else {
      acc dot = acc(0);
#pragma unroll
      for (int j = 0; j < kN; ++j) dot += g[j] * P[j];
#pragma unroll
      for (int j = 0; j < kN; ++j) {
        g[j] = (active && j < n) ? (g[j] - dot) / c_own : acc(0);
        P[j] = P[j] * c_own;
      }
    }
  }
  acc dot = acc(0);
#pragma unroll
  for (int j = 0; j < kN; ++j) dot += g[j] * S[j];
#pragma unroll
  for (int j = 0; j < kN; ++j) dh_res[j] = S[j] * (g[j] - dot);
}

// ----------------------------------------------------------------------- epilogues

// The epilogues' lane mapping: a group of kN lanes a token (groups aligned inside a
// warp), lane `row` of the group owns row `row` of the token's n×n matrix; `active` when
// the token exists and row < n. tc, rr: clamped token and row for addressing.
struct MhcCoeffsLane {
  int64_t gt, t, tc;
  int row, rr;
  bool valid, active;
};

// The lane of global index gt: token gt / kN, row gt % kN.
template <int kN>
__device__ __forceinline__ MhcCoeffsLane mhc_coeffs_lane_at(int64_t gt, int64_t n_tokens, int n) {
  MhcCoeffsLane l;
  l.gt = gt;
  l.t = l.gt / kN;
  l.row = static_cast<int>(l.gt % kN);
  l.valid = l.t < n_tokens;
  l.active = l.valid && l.row < n;
  l.tc = l.valid ? l.t : 0;
  l.rr = l.active ? l.row : 0;
  return l;
}

// The epilogue kernels' lane: one a thread of the grid.
template <int kN>
__device__ __forceinline__ MhcCoeffsLane mhc_coeffs_lane(int64_t n_tokens, int n) {
  return mhc_coeffs_lane_at<kN>(static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x, n_tokens, n);
}

// The lane's slice of a token: pre_i, post_i and row i of the residual logits.
template <typename acc, int kN>
struct MhcRow {
  acc pre, post, res[kN];
};

// The lane's row of u (zeros when inactive): u[row], u[n + row], u[2n + row·n + j].
template <typename acc, int kN>
__device__ __forceinline__ MhcRow<acc, kN> mhc_load_row(const acc* __restrict__ us, int n, int row, bool active) {
  MhcRow<acc, kN> u;
  u.pre = active ? us[row] : acc(0);
  u.post = active ? us[n + row] : acc(0);
#pragma unroll
  for (int j = 0; j < kN; ++j) u.res[j] = (active && j < n) ? us[2 * n + row * n + j] : acc(0);
  return u;
}

// The lane's row of residual logits L[j] = a_res·zres[j] + b_res[row, j], zres = r·u_res
// (zero outside the n×n matrix).
template <typename acc, int kN>
__device__ __forceinline__ void mhc_coeffs_res_logits(const MhcCoeffsParams& p, const MhcCoeffsLane& l,
                                                      const MhcRow<acc, kN>& u, acc r, acc (&zres)[kN],
                                                      acc (&L)[kN]) {
  const int n = p.n;
  const acc* __restrict__ b = static_cast<const acc*>(p.b_ptr);
  const acc a_res = *static_cast<const acc*>(p.a_res_ptr);
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    zres[j] = r * u.res[j];
    L[j] = (l.active && j < n) ? a_res * zres[j] + b[2 * n + l.rr * n + j] : acc(0);
  }
}

// Forward outputs of an active lane (=): alpha[t, row, 0] = sigmoid(h_pre) + pre_eps,
// alpha[t, row, 1..n] = P, beta[t, row] = post_mult·sigmoid(h_post), the lane's u row,
// and r (row 0). Returns alpha[t, row, 0] (the pre's mixing weight).
template <typename acc, int kN>
__device__ __forceinline__ acc mhc_coeffs_write_fwd(const MhcCoeffsParams& p, const MhcCoeffsLane& l,
                                                     const MhcRow<acc, kN>& u, acc r, const acc (&P)[kN]) {
  const int n = p.n, row = l.row;
  const int64_t t = l.t;
  const acc* __restrict__ b = static_cast<const acc*>(p.b_ptr);
  const MhcScales<acc> sc = mhc_scales<acc>(p);
  const acc h_pre = sc.pre * (r * u.pre) + b[row];
  const acc h_post = sc.post * (r * u.post) + b[n + row];
  acc* __restrict__ alpha = static_cast<acc*>(p.alpha_ptr) + (t * n + row) * (n + 1);
  const acc w = acc_sigmoid(h_pre) + static_cast<acc>(p.pre_eps);
  alpha[0] = w;
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    if (j < n) alpha[1 + j] = P[j];
  }
  static_cast<acc*>(p.beta_ptr)[t * n + row] = static_cast<acc>(p.post_mult) * acc_sigmoid(h_post);
  acc* __restrict__ uo = static_cast<acc*>(p.u_ptr) + t * p.M;
  uo[row] = u.pre;
  uo[n + row] = u.post;
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    if (j < n) uo[2 * n + row * n + j] = u.res[j];
  }
  if (row == 0) static_cast<acc*>(p.r_ptr)[t] = r;
  return w;
}

template <typename acc, int kN>
__global__ void __launch_bounds__(kMhcCoeffsEpiThreads) mhc_coeffs_fwd_epilogue_kernel(const MhcCoeffsParams p) {
  const int64_t N = p.n_tokens;
  const int n = p.n;
  const MhcCoeffsLane l = mhc_coeffs_lane<kN>(N, n);
  const acc ss = static_cast<const acc*>(p.ssp_ptr)[l.tc];
  const MhcRow<acc, kN> u =
      mhc_load_row<acc, kN>(static_cast<const acc*>(p.up_ptr) + l.tc * p.m_pad, n, l.row, l.active);
  const acc r = acc_rsqrt(ss / static_cast<acc>(static_cast<int64_t>(n) * p.d) + static_cast<acc>(p.eps));
  acc zres[kN], L[kN], S[kN], P[kN];
  mhc_coeffs_res_logits<acc, kN>(p, l, u, r, zres, L);
  mhc_sinkhorn_fwd<acc, kN>(L, n, l.row, l.active, p.iters, static_cast<acc>(p.sinkhorn_eps), S, P, nullptr, 0);
  if (!l.active) return;  // after the last shuffle
  mhc_coeffs_write_fwd<acc, kN>(p, l, u, r, P);
}

// ------------------------------------------------------------------ fused forward

// H'_i of token t at this thread's 8 features [e, e + 8), rounded to T (zeros past d):
// beta_i·y + Σ_j alpha[j, 1+i]·H_j of connection i's post (post_* fields), in
// hc_post_mix's order, so the bits are those hc_post stores.
template <typename T, bool kVec>
__device__ __forceinline__ uint4 mhc_post_chunk(const MhcCoeffsParams& p, int64_t t, int64_t i, int64_t e) {
  const int n = p.n;
  const T* __restrict__ h = static_cast<const T*>(p.post_h_ptr) + p.post_h_tok.offset(t);
  const float* __restrict__ a = static_cast<const float*>(p.post_a_ptr) + t * p.post_a_token_stride;
  const float b = static_cast<const float*>(p.post_b_ptr)[t * p.post_b_token_stride + i];
  const uint4 yw = load8<T, kVec>(static_cast<const T*>(p.post_y_ptr) + p.post_y_tok.offset(t), e, p.d);
  const T* yv = reinterpret_cast<const T*>(&yw);
  float o[8];
#pragma unroll
  for (int v = 0; v < 8; ++v) o[v] = b * to_acc(yv[v]);
  for (int j = 0; j < n; ++j) {
    const float aj = a[j * (n + 1) + 1 + i];
    const uint4 hw = load8<T, kVec>(h + j * p.post_h_stream_stride, e, p.d);
    const T* hv = reinterpret_cast<const T*>(&hw);
#pragma unroll
    for (int v = 0; v < 8; ++v) o[v] += aj * to_acc(hv[v]);
  }
  Vec<T, 8> out;
#pragma unroll
  for (int v = 0; v < 8; ++v) out.v[v] = from_acc<T>(o[v]);
  return *reinterpret_cast<const uint4*>(&out);
}

constexpr int kMhcFwdWarps = 8;  // warps a block of the fused forward
constexpr int kMhcFwdThreads = kMhcFwdWarps * kWarpSize;

// Shared memory of mhc_coeffs_fwd_kernel<T, kVec, kN>, in floats: the warps' u partials
// of a column pass [warps][16][8·kNT], the tile's u [16][m_pad], the warps' Σ xf²
// partials [warps][16], the tile's Σ xf² [16] and its pre weights [16][kN].
template <int kN>
__host__ __device__ constexpr int mhc_coeffs_fwd_smem_floats(int m_pad) {
  return kMhcFwdWarps * 16 * 8 * MhcCoeffsProjTiles<kN>::value + 16 * m_pad + kMhcFwdWarps * 16 + 16 + 16 * kN;
}

// The forward for bf16/fp16 H in one pass over H: a block walks 16-token tiles (tile
// blockIdx.x, then + gridDim.x, ...); per tile
//   1. u = xf·phi and Σ xf² on tensor cores: the n·cps chunks split over the warps in
//      feature-major order (chunk k: stream k % n, feature chunk k / n), each warp's
//      partial in shared memory, summed in warp order (column passes of 8·kNT when
//      m_pad is wider; the tile is re-read per pass from L1/L2);
//   2. the epilogue (gates, Sinkhorn) on the first 16·kN threads, whole warps: thread
//      (token tt, row) as the epilogue kernels' lane; writes alpha, beta, u, r;
//   3. with x_ptr, x = Σ_i alpha[:, i, 0]·H_i of the tile, features walked downward
//      (the data phase 1 read last first: L1, then L2 hits; one HBM read of H a tile
//      as long as the tiles in flight fit the L2, which the launcher's grid ensures).
// With kPost (the boundary: connection i's post fused before this pre), phase 1 mixes
// each chunk of H' = hc_post(post_h, post_y, post_a, post_b) instead of loading it and
// writes it (=, first pass) to hn_ptr; later passes and phase 3 mix it again from H and
// y, which the tile has just read (L1/L2), instead of reading H' back: H' is written,
// never read (2n·d + 2d a token, DESIGN.md's boundary floor).
// Dynamic shared memory: mhc_coeffs_fwd_smem_floats<kN>(m_pad) floats.
template <typename T, bool kVec, int kN, bool kPost>
__global__ void __launch_bounds__(kMhcFwdThreads) mhc_coeffs_fwd_kernel(const MhcCoeffsParams p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr int kNT = MhcCoeffsProjTiles<kN>::value;
  constexpr int kCols = 8 * kNT;
  constexpr bool kRest = is_same_v<T, __nv_bfloat16>;  // third part of phi
  extern __shared__ __align__(16) unsigned char mhc_fwd_smem[];
  float* __restrict__ part = reinterpret_cast<float*>(mhc_fwd_smem);  // [warps][16][kCols]
  float* __restrict__ u_tile = part + kMhcFwdWarps * 16 * kCols;       // [16][m_pad]
  float* __restrict__ ss_part = u_tile + 16 * p.m_pad;                 // [warps][16]
  float* __restrict__ ss_tile = ss_part + kMhcFwdWarps * 16;           // [16]
  float* __restrict__ w_tile = ss_tile + 16;                           // [16][kN]
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int grp = lane / 4, tig = lane % 4;
  const int n = p.n;
  const int64_t N = p.n_tokens, d = p.d;
  const int64_t c_total = p.cps * n;
  const int64_t tiles = (N + 15) / 16;
  const T* __restrict__ H = static_cast<const T*>(p.h_ptr);  // unused with kPost
  const uint4* __restrict__ W = static_cast<const uint4*>(p.phif_ptr);
  const int n_tiles = p.m_pad / 8;  // per chunk-step row of phif
  const float unscale = p.proj_unscale_ptr != nullptr ? *p.proj_unscale_ptr : 1.f;

  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t t0 = tile * 16, ta = t0 + grp, tb = t0 + grp + 8;
    const bool va = ta < N, vb = tb < N;
    const T* __restrict__ xa = H + (va ? p.h_tok.offset(ta) : 0);
    const T* __restrict__ xb = H + (vb ? p.h_tok.offset(tb) : 0);
    float ssa = 0.f, ssb = 0.f;
    for (int col0 = 0; col0 < p.m_pad; col0 += kCols) {
      float acc[kNT][4];
      mma_zero(acc);
      // Two chunks in flight; one for bf16 (kRest: phi's third part), whose loop body
      // with two would not fit the register budget.
#pragma unroll(kRest ? 1 : 2)
      for (int64_t k = warp; k < c_total; k += kMhcFwdWarps) {
        const int64_t i = k % n, f = k / n;
        const int64_t e = f * 32 + tig * 8;
        const int64_t so = i * p.h_stream_stride;
        uint4 wa = make_uint4(0, 0, 0, 0), wb = make_uint4(0, 0, 0, 0);
        if (kPost) {  // H' mixed again in later passes (H and y: L1/L2), written in the first
          T* HN = static_cast<T*>(p.hn_ptr) + so;
          if (va) {
            wa = mhc_post_chunk<T, kVec>(p, ta, i, e);
            if (col0 == 0) store8<T, kVec>(HN + p.h_tok.offset(ta), e, d, wa);
          }
          if (vb) {
            wb = mhc_post_chunk<T, kVec>(p, tb, i, e);
            if (col0 == 0) store8<T, kVec>(HN + p.h_tok.offset(tb), e, d, wb);
          }
        } else {
          if (va) wa = load8<T, kVec>(xa + so, e, d);
          if (vb) wb = load8<T, kVec>(xb + so, e, d);
        }
        if (col0 == 0) {
          ssa += sumsq8<T>(wa);
          ssb += sumsq8<T>(wb);
        }
        mma_proj_chunk<T, kNT, kRest, true>(acc, wa, wb, W, i * p.cps + f, n_tiles, col0, p.M, lane);
      }
      float* __restrict__ pw = part + warp * 16 * kCols;
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          pw[grp * kCols + 8 * j + 2 * tig + q] = acc[j][q];
          pw[(grp + 8) * kCols + 8 * j + 2 * tig + q] = acc[j][2 + q];
        }
      }
      if (col0 == 0) {  // row sums over the 4 threads of a row (tig), fixed order
        ssa = quad_sum(ssa);
        ssb = quad_sum(ssb);
        if (tig == 0) {
          ss_part[warp * 16 + grp] = ssa;
          ss_part[warp * 16 + grp + 8] = ssb;
        }
      }
      __syncthreads();
      for (int idx = threadIdx.x; idx < 16 * kCols; idx += kMhcFwdThreads) {  // warp order
        float sum = 0.f;
        for (int w = 0; w < kMhcFwdWarps; ++w) sum += part[w * 16 * kCols + idx];
        u_tile[(idx / kCols) * p.m_pad + col0 + idx % kCols] = sum * unscale;
      }
      if (col0 == 0 && threadIdx.x < 16) {
        float sum = 0.f;
        for (int w = 0; w < kMhcFwdWarps; ++w) sum += ss_part[w * 16 + threadIdx.x];
        ss_tile[threadIdx.x] = sum;
      }
      __syncthreads();
    }

    if (threadIdx.x < 16 * kN) {  // whole warps: 64 or 256 threads
      const int tt = threadIdx.x / kN;
      const MhcCoeffsLane l = mhc_coeffs_lane_at<kN>(t0 * kN + threadIdx.x, N, n);  // token t0 + tt
      const MhcRow<float, kN> u = mhc_load_row<float, kN>(u_tile + tt * p.m_pad, n, l.row, l.active);
      const float r = acc_rsqrt(ss_tile[tt] / static_cast<float>(static_cast<int64_t>(n) * d) +
                                static_cast<float>(p.eps));
      float zres[kN], L[kN], S[kN], P[kN];
      mhc_coeffs_res_logits<float, kN>(p, l, u, r, zres, L);
      mhc_sinkhorn_fwd<float, kN>(L, n, l.row, l.active, p.iters, static_cast<float>(p.sinkhorn_eps), S, P,
                                  nullptr, 0);
      w_tile[threadIdx.x] = l.active ? mhc_coeffs_write_fwd<float, kN>(p, l, u, r, P) : 0.f;
    }
    __syncthreads();

    if (p.x_ptr != nullptr) {
      T* __restrict__ X = static_cast<T*>(p.x_ptr);
      const int64_t nv = (d + 7) / 8;
      for (int64_t idx = threadIdx.x; idx < 16 * nv; idx += kMhcFwdThreads) {
        const int tt = static_cast<int>(idx % 16);
        const int64_t t = t0 + tt, e = (nv - 1 - idx / 16) * 8;
        if (t >= N) continue;
        float x8[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) x8[k] = 0.f;
        for (int i = 0; i < n; ++i) {
          // kPost: H'_i mixed again from H and y (L1/L2: this tile's phase 1 read them),
          // the bits phase 1 stored.
          const uint4 hw = kPost ? mhc_post_chunk<T, kVec>(p, t, i, e)
                                 : load8<T, kVec>(H + p.h_tok.offset(t) + i * p.h_stream_stride, e, d);
          const T* hv = reinterpret_cast<const T*>(&hw);
          const float wi = w_tile[tt * kN + i];
#pragma unroll
          for (int k = 0; k < 8; ++k) x8[k] += wi * to_acc(hv[k]);
        }
        Vec<T, 8> out;
#pragma unroll
        for (int k = 0; k < 8; ++k) out.v[k] = from_acc<T>(x8[k]);
        store8<T, kVec>(X + p.x_tok.offset(t), e, d, *reinterpret_cast<const uint4*>(&out));
      }
    }
    __syncthreads();  // the next tile reuses the shared memory
  }
#endif
}

// The gates' backward of an active lane (zero otherwise): z = r·u of pre and post,
// dh_pre = dpre·σ'(h_pre), dh_post = post_mult·dpost·σ'(h_post) (dpre: the caller's sum
// of alpha[t, row, 0]'s gradients), and w = σ(h_pre) + pre_eps, the pre gate
// alpha[t, row, 0] (the dH pass's weight of dx).
template <typename acc, int kN>
__device__ __forceinline__ void mhc_coeffs_gates_bwd(const MhcCoeffsParams& p, const MhcCoeffsLane& l,
                                                     const MhcRow<acc, kN>& u, acc r, acc dpre, acc& z_pre,
                                                     acc& z_post, acc& dh_pre, acc& dh_post, acc& w) {
  dh_pre = dh_post = z_pre = z_post = w = acc(0);
  if (!l.active) return;
  const int n = p.n;
  const acc* __restrict__ b = static_cast<const acc*>(p.b_ptr);
  const MhcScales<acc> sc = mhc_scales<acc>(p);
  const acc* __restrict__ dbeta = static_cast<const acc*>(p.dbeta_ptr);
  z_pre = r * u.pre;
  z_post = r * u.post;
  const acc sp = acc_sigmoid(sc.pre * z_pre + b[l.row]);
  const acc so = acc_sigmoid(sc.post * z_post + b[n + l.row]);
  const acc dpost = dbeta != nullptr ? dbeta[l.t * n + l.row] : acc(0);
  dh_pre = dpre * sp * (acc(1) - sp);
  w = sp + static_cast<acc>(p.pre_eps);
  dh_post = static_cast<acc>(p.post_mult) * dpost * so * (acc(1) - so);
}

// s = dr·r³/(n·d): the rms term's scale of dH (= du·phiᵀ − s·xf), dr the token's
// <dz, u>.
template <typename acc>
__device__ __forceinline__ acc mhc_rms_grad_scale(acc dr, acc r, int n, int64_t d) {
  return dr * r * r * r / static_cast<acc>(static_cast<int64_t>(n) * d);
}

// Backward outputs of an active lane (=): du = r·a·dh, G = [dh, dh·z] of its entries,
// and du's padding columns M..ldu (0) by row 0.
template <typename acc, int kN>
__device__ __forceinline__ void mhc_coeffs_write_bwd(const MhcCoeffsParams& p, const MhcCoeffsLane& l, acc r,
                                                     acc dh_pre, acc dh_post, acc z_pre, acc z_post,
                                                     const acc (&dh_res)[kN], const acc (&zres)[kN]) {
  const int n = p.n, M = p.M, row = l.row;
  const int64_t t = l.t;
  const MhcScales<acc> sc = mhc_scales<acc>(p);
  acc* __restrict__ du = static_cast<acc*>(p.du_ptr) + t * p.ldu;
  acc* __restrict__ G = static_cast<acc*>(p.g_ptr) + t * 2 * M;
  du[row] = r * sc.pre * dh_pre;
  du[n + row] = r * sc.post * dh_post;
  G[row] = dh_pre;
  G[n + row] = dh_post;
  G[M + row] = dh_pre * z_pre;
  G[M + n + row] = dh_post * z_post;
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    if (j < n) {
      const int m = 2 * n + row * n + j;
      du[m] = r * sc.res * dh_res[j];
      G[m] = dh_res[j];
      G[M + m] = dh_res[j] * zres[j];
    }
  }
  if (row == 0) {
    for (int m = M; m < p.ldu; ++m) du[m] = acc(0);  // du's padding columns
  }
}

// dr = <dz, u> of the token, the same bits in every lane of its group: the lane's row
// summed, then the group's rows (group_sum). Every lane of the warp must call it.
template <typename acc, int kN>
__device__ __forceinline__ acc mhc_coeffs_dr(const MhcScales<acc>& sc, const MhcRow<acc, kN>& u, acc dh_pre,
                                             acc dh_post, const acc (&dh_res)[kN]) {
  acc dr = sc.pre * dh_pre * u.pre + sc.post * dh_post * u.post;
#pragma unroll
  for (int j = 0; j < kN; ++j) dr += sc.res * dh_res[j] * u.res[j];
  return group_sum<kN>(dr);
}

// Dynamic shared memory: the Sinkhorn scales [2·iters − 1][blockDim.x] when cbuf_ptr is
// null (else none).
template <typename acc, int kN>
__global__ void __launch_bounds__(kMhcCoeffsEpiThreads) mhc_coeffs_bwd_epilogue_kernel(const MhcCoeffsParams p) {
  extern __shared__ __align__(16) unsigned char mhc_smem[];
  const int n = p.n;
  const MhcCoeffsLane l = mhc_coeffs_lane<kN>(p.n_tokens, n);
  const bool global_cbuf = p.cbuf_ptr != nullptr;
  acc* cbuf = global_cbuf ? static_cast<acc*>(p.cbuf_ptr) + l.gt : reinterpret_cast<acc*>(mhc_smem) + threadIdx.x;
  const int64_t cstride = global_cbuf ? static_cast<int64_t>(gridDim.x) * blockDim.x : blockDim.x;
  const MhcScales<acc> sc = mhc_scales<acc>(p);
  const acc* __restrict__ dalpha = static_cast<const acc*>(p.dalpha_ptr);

  const MhcRow<acc, kN> u = mhc_load_row<acc, kN>(static_cast<const acc*>(p.u_ptr) + l.tc * p.M, n, l.row, l.active);
  const acc r = static_cast<const acc*>(p.r_ptr)[l.tc];
  acc zres[kN], L[kN], S[kN], P[kN];
  mhc_coeffs_res_logits<acc, kN>(p, l, u, r, zres, L);
  mhc_sinkhorn_fwd<acc, kN>(L, n, l.row, l.active, p.iters, static_cast<acc>(p.sinkhorn_eps), S, P, cbuf, cstride);

  // g = the lane's dcomb row; P walks back from the last iterate to the first.
  const acc* __restrict__ da_row = dalpha != nullptr ? dalpha + (l.tc * n + l.rr) * (n + 1) : nullptr;
  acc g[kN], dh_res[kN];
#pragma unroll
  for (int j = 0; j < kN; ++j) g[j] = (l.active && j < n && da_row != nullptr) ? da_row[1 + j] : acc(0);
  mhc_sinkhorn_bwd<acc, kN>(g, P, S, n, l.active, p.iters, cbuf, cstride, dh_res);

  const acc* __restrict__ dpre_extra = static_cast<const acc*>(p.dpre_ptr);
  const acc dpre = l.active ? (da_row != nullptr ? da_row[0] : acc(0)) +
                                  (dpre_extra != nullptr ? dpre_extra[l.t * n + l.row] : acc(0))
                            : acc(0);
  acc z_pre, z_post, dh_pre, dh_post, w;
  mhc_coeffs_gates_bwd<acc, kN>(p, l, u, r, dpre, z_pre, z_post, dh_pre, dh_post, w);
  const acc dr = mhc_coeffs_dr<acc, kN>(sc, u, dh_pre, dh_post, dh_res);
  if (!l.active) return;  // after the last shuffle
  if (p.w_pre_ptr != nullptr) static_cast<acc*>(p.w_pre_ptr)[l.t * n + l.row] = w;
  if (l.row == 0) static_cast<acc*>(p.s_ptr)[l.t] = mhc_rms_grad_scale(dr, r, n, p.d);
  mhc_coeffs_write_bwd<acc, kN>(p, l, r, dh_pre, dh_post, z_pre, z_post, dh_res, zres);
}

// ----------------------------------------------------------------------------- dH

// n-tiles (8 columns) of dphi a warp accumulates: all M = 24 columns for n = 4, 64 a
// column pass (gridDim.y passes) for the generic instantiation.
template <int kN>
struct MhcCoeffsDphiTiles {
  static constexpr int value = kN == 4 ? 3 : 8;
};

// dH = prior + du·phiᵀ − s·xf (+ w_pre_i·gx with gx) (=; prior when given), and the dphi
// partials Σ_t xfᵀ·du of a token group, for bf16/fp16 H. Warp u = blockIdx.x·warps + w
// owns chunk c = u % (n·cps) and token group g = u / (n·cps): it walks the group's
// 16-token tiles [g·tiles_per_group, ...) in order, writes the chunk's dH of each (column
// pass 0 only; none when dh_ptr is null: the dphi pass alone) and accumulates xfᵀ·du for columns [col0, col0 + 8·kDT) (col0 = 8·kDT ·
// blockIdx.y) in registers, then writes them (=) to dphi_part[g] (the launcher sums the
// groups in group order). Dynamic shared memory: kMhcCoeffsWarps × kMmaXtStageElems<T>
// bf16 (each warp's transposed tile).
template <typename T, bool kVec, int kDT>
__global__ void __launch_bounds__(kMhcCoeffsThreads) mhc_coeffs_bwd_dh_kernel(const MhcCoeffsParams p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  extern __shared__ __align__(16) unsigned char mhc_dh_smem[];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int grp = lane / 4, tig = lane % 4;
  const int64_t c_total = p.cps * p.n;
  const int64_t unit = static_cast<int64_t>(blockIdx.x) * kMhcCoeffsWarps + warp;
  const int64_t c = unit % c_total, g = unit / c_total;
  if (g >= p.token_groups) return;  // no block barriers in this kernel
  __nv_bfloat16* stage = reinterpret_cast<__nv_bfloat16*>(mhc_dh_smem) + warp * kMmaXtStageElems<T>;
  const int64_t N = p.n_tokens, d = p.d;
  const int64_t tiles = (N + 15) / 16;
  const int64_t tile_begin = g * p.tiles_per_group;
  const int64_t tile_end = tile_begin + p.tiles_per_group < tiles ? tile_begin + p.tiles_per_group : tiles;
  int64_t i, e;
  mhc_coeffs_chunk(c, p.cps, tig, i, e);  // this thread: features e..e+7 of stream i
  const int64_t f0 = (c - i * p.cps) * 32;  // the chunk's first feature in stream i
  const bool write_dh = blockIdx.y == 0 && p.dh_ptr != nullptr;  // warp-uniform
  const int col0 = static_cast<int>(blockIdx.y) * 8 * kDT;
  const T* __restrict__ H = static_cast<const T*>(p.h_ptr) + i * p.h_stream_stride;
  T* DH = static_cast<T*>(p.dh_ptr) + i * p.dh_stream_stride;
  const float* __restrict__ DU = static_cast<const float*>(p.du_ptr);
  const float* __restrict__ S = static_cast<const float*>(p.s_ptr);
  const T* __restrict__ GX = static_cast<const T*>(p.gx_ptr);
  const float* __restrict__ Wp = static_cast<const float*>(p.w_pre_ptr);
  const T* PRIOR = p.dh_prior_ptr != nullptr ? static_cast<const T*>(p.dh_prior_ptr) + i * p.prior_stream_stride
                                             : nullptr;
  float dphi[2][kDT][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) mma_zero(dphi[mt]);

  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t t0 = tile * 16, ta = t0 + grp, tb = t0 + grp + 8;
    const bool va = ta < N, vb = tb < N;
    const uint4 xa = va ? load8<T, kVec>(H + p.h_tok.offset(ta), e, d) : make_uint4(0, 0, 0, 0);
    const uint4 xb = vb ? load8<T, kVec>(H + p.h_tok.offset(tb), e, d) : make_uint4(0, 0, 0, 0);
    if (write_dh) {
      float acc[kMhcCoeffsDhTiles][4];
      mma_chunk_g_w32<kMhcCoeffsDhTiles>(acc, DU + (va ? ta : 0) * p.ldu, DU + (vb ? tb : 0) * p.ldu, va, vb,
                                         p.phi_ptr, p.phi_ld, i * d + f0, f0, d, p.ldu / 16, grp, tig);
      if (va) {
        store_g_wt_minus_sx<T, kVec>(acc, 0, xa, S[ta], GX != nullptr ? GX + p.gx_tok.offset(ta) : nullptr,
                                     GX != nullptr ? Wp[ta * p.n + i] : 0.f,
                                     PRIOR != nullptr ? PRIOR + p.prior_tok.offset(ta) : nullptr,
                                     DH + p.dh_tok.offset(ta), e, d);
      }
      if (vb) {
        store_g_wt_minus_sx<T, kVec>(acc, 1, xb, S[tb], GX != nullptr ? GX + p.gx_tok.offset(tb) : nullptr,
                                     GX != nullptr ? Wp[tb * p.n + i] : 0.f,
                                     PRIOR != nullptr ? PRIOR + p.prior_tok.offset(tb) : nullptr,
                                     DH + p.dh_tok.offset(tb), e, d);
      }
    }
    mma_xt_g_tile<T, kDT>(dphi, xa, xb, DU, p.ldu, t0, N, col0, p.M, stage, grp, tig);
  }

  // C row r of m-tile mt: feature f0 + 16mt + r of stream i, dphi row i·d + f.
  mma_xt_g_store<kDT>(static_cast<float*>(p.dphi_part_ptr) + g * (p.n * d * p.M), dphi, i * d, f0, d, col0, p.M,
                      grp, tig);
#endif
}

}  // namespace crosslayer
