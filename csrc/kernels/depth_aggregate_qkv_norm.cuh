// depth_aggregate_qkv_norm: MUDDFormer's block input in one pass over the depth stack.
// The 4-way depth aggregate (ways q, k, v, r) with the q, k and v aggregates each
// through their own RMSNorm (weight g_c), the r way raw.
//
// Math, per token t (N tokens, d features, l slots; c < 4 ways, n < 3 normed ways):
//   forward
//     Y_c[e]    = Σ_j A[t, c, j]·S_j[t, e]
//     r_n       = rsqrt(Σ_e Y_n[e]² / d + eps)                              (= rstd[n, t])
//     Out_n[e]  = Y_n[e]·r_n·g_n[e];   Out_3[e] = Y_3[e]                    (= Out)
//   backward (Y recomputed from S; r from the forward)
//     z_n[e]    = g_n[e]·dOut_n[e];    z_3 = dOut_3
//     D_n       = Σ_e z_n[e]·Y_n[e];    k_n = r_n³·D_n / d
//     dY_n[e]   = r_n·z_n[e] − k_n·Y_n[e]   (= r_n·(g_n·dOut_n − Ŷ_n·mean(g_n·dOut_n·Ŷ_n)), Ŷ = r·Y)
//     dY_3      = dOut_3
//     dS_j[e]  (=|+=) Σ_c A[t, c, j]·dY_c[e]                                (activation dtype)
//     dA[t,c,j] = <dY_c, S_j> = r_c·P_cj − k_c·Q_cj  (c < 3),  P_3j  (c = 3)   (= per token)
//                 with P_cj = <z_c, S_j>, Q_cj = <Y_c, S_j>
//     dg_n[e]  += dOut_n[e]·Y_n[e]·r_n   over the tokens of a row of threads    (partials)
//   dA is split into P and Q so that it is formed from the chunk's S values while they
//   are in registers or L1: dY needs k_n, which needs all of d first.
//   The dg partials are one slice per (block, row): the `+=` above runs over the row's
//   tokens in order, starting from zero; the launcher sums the slices with at::sum.
//   No atomics anywhere: results are bit-identical run to run.
//
// Thread mapping: a block is (threads_x, rows). Each row of threads (whole warps) owns
// one token at a time and walks its d features in chunks of kVec contiguous elements
// (16-byte accesses), chunk e/kVec by thread (e/kVec) mod threads_x; blocks stride over
// tokens (a persistent grid). Per token:
//   forward   (1) per chunk: Y_c over the l slots (each slot element read once), Out_3
//                 written, the three normed Y_n stashed in fp32 in the row's buffer,
//                 Σ Y_n² accumulated; a warp sum, the warps' values in shared memory;
//             (2) after a barrier, each thread sums the row's warps in warp order (r_n)
//                 and writes its chunks of Out_n from the stash (its own entries: no
//                 barrier needed for the stash itself).
//   backward  (1) per chunk: pass 1 over the slots for Y_n; dOut read; dg, D partials;
//                 Y_n stashed; pass 2 over the slots (the chunk's S again, an L1/L2 hit)
//                 for the 7 dot products P_cj, Q_nj, reduced by an 8-value butterfly
//                 reduce-scatter (9 shuffles a slot) into per-warp partials in smem;
//             (2) after a barrier, dA from the partials (warp order), k_n; per chunk,
//                 dY from the stash and dOut (re-read: an L2 hit), dS written.
// The backward's chunk loop is warp-uniform (every lane reaches the shuffles); lanes
// past the row end work on zeros and touch no buffer. The forward has no shuffles in
// its chunk loop.
// The row's buffers (stash: 3 × ld, backward dg: 3 × ld, fp32 / fp64) are in shared
// memory when they fit the device's opt-in limit (fewer token rows per block first),
// else in global workspace slices of the block's rows (`bufs_in_smem` = false, from
// d ≈ 9.6K with fp32 accumulators in the backward, ≈ 19K in the forward; grid capped
// at 4 blocks per SM there); both are indexed [n][e] with ld a multiple of 8.
// Registers: 256 threads, at least 2 blocks per SM asked of ptxas (<= 128 a thread).
//
// HBM traffic per token (elements of the activation dtype): forward l·d read + 4·d
// written; backward l·d (S) + 4·d (dOut) read, l·d written (+ l·d read when dS
// accumulates). The second reads of S (backward pass 2) and dOut (backward phase 2)
// come from L1/L2.
//
// Assumptions (checked by the launcher):
//   1) features have unit stride in S, Out, dOut and dS; every other stride is free;
//   2) with kVec > 1, every base pointer is 16-byte aligned and every stride a multiple
//      of kVec elements, so each full chunk is one 16-byte access;
//   3) 1 <= l <= kMaxSlots; A, g (padded to (3, ld) with zeros), rstd, dA and the
//      workspaces in the accumulator dtype, contiguous; ld >= d, a multiple of 8.
#pragma once

#include <cstdint>

#include "common/limits.h"
#include "common/math.cuh"
#include "common/reduce.cuh"
#include "common/vec.cuh"
#include "kernels/phases/slot_tile.cuh"

namespace crosslayer {

constexpr int kDepthAggregateQkvNormWays = 4;    // q, k, v, r
constexpr int kDepthAggregateQkvNormNormed = 3;  // q, k, v
constexpr int kDepthAggregateQkvNormThreads = 256;
constexpr int kDepthAggregateQkvNormDots = 8;    // P_0..P_3, Q_0..Q_2, one zero: the reduce-scatter width
// Resident 256-thread blocks asked of ptxas for the backward (at most 128 registers).
constexpr int kDepthAggregateQkvNormBwdMinBlocks = 2;
constexpr int kDepthAggregateQkvNormFwdMinBlocks = 2;

struct DepthAggregateQkvNormParams {
  using index_t = int64_t;
  index_t n_tokens;  // N
  index_t d;         // features
  index_t ld;        // row stride of g, the stash and the dg buffers (>= d, multiple of 8)
  int n_slots;       // l
  // S (l, N, d), activation dtype.
  index_t s_slot_stride, s_token_stride;
  // A (N, 4, l), accumulator dtype; a_token_stride = 0 for static (4, l) weights.
  index_t a_token_stride, a_way_stride, a_slot_stride;
  // Out (4, N, d), forward output; dOut (4, N, d), backward input.
  index_t out_way_stride, out_token_stride;
  index_t dout_way_stride, dout_token_stride;
  // dS (l, N, d), backward output.
  index_t ds_slot_stride, ds_token_stride;
  double eps;
  bool accumulate_ds;  // dS += (true) or dS = (false)
  bool bufs_in_smem;   // the rows' stash / dg buffers in shared memory (else workspaces)
  const void* __restrict__ s_ptr;
  const void* __restrict__ a_ptr;
  const void* __restrict__ g_ptr;   // norm weights (3, ld), zero-padded
  void* __restrict__ out_ptr;
  void* __restrict__ rstd_ptr;      // (3, N): written by the forward, read by the backward
  const void* __restrict__ dout_ptr;
  void* __restrict__ ds_ptr;
  void* __restrict__ da_ptr;        // (N, 4, l) contiguous, = per token
  void* __restrict__ dg_ws_ptr;     // (grid·rows, 3, ld): one dg partial per (block, row)
  void* __restrict__ stash_ws_ptr;  // (grid·rows, 3, ld) when !bufs_in_smem
};

// Shared-memory layout of a block, offsets in accumulator elements.
struct DepthAggregateQkvNormSmem {
  int64_t a;      // [rows][4][l]           the tile's weights
  int64_t red;    // [rows][warps][3]       warp partials of Σ Y² (fwd) / D (bwd)
  int64_t part;   // [rows][warps][8][l]    backward: warp partials of P, Q
  int64_t stash;  // [rows][3][ld]          bufs_in_smem: Y_n
  int64_t dg;     // [rows][3][ld]          backward, bufs_in_smem: dg partials
  int64_t total;
};

__host__ __device__ inline int64_t depth_aggregate_qkv_norm_round8(int64_t x) { return (x + 7) / 8 * 8; }

__host__ __device__ inline DepthAggregateQkvNormSmem depth_aggregate_qkv_norm_smem_layout(int rows, int warps, int l, int64_t ld,
                                                          bool backward, bool bufs_in_smem) {
  DepthAggregateQkvNormSmem s;
  int64_t off = 0;
  s.a = off;
  off = depth_aggregate_qkv_norm_round8(off + static_cast<int64_t>(rows) * kDepthAggregateQkvNormWays * l);
  s.red = off;
  off = depth_aggregate_qkv_norm_round8(off + static_cast<int64_t>(rows) * warps * kDepthAggregateQkvNormNormed);
  s.part = off;
  if (backward) off = depth_aggregate_qkv_norm_round8(off + static_cast<int64_t>(rows) * warps * kDepthAggregateQkvNormDots * l);
  s.stash = off;
  if (bufs_in_smem) off += static_cast<int64_t>(rows) * kDepthAggregateQkvNormNormed * ld;
  s.dg = off;
  if (backward && bufs_in_smem) off += static_cast<int64_t>(rows) * kDepthAggregateQkvNormNormed * ld;
  s.total = off;
  return s;
}

// Stages the (rows × 4 × l) weight tile of tokens t0.. in a_s (block-wide, between two
// barriers); missing tokens read 0.
template <typename acc>
__device__ __forceinline__ void depth_aggregate_qkv_norm_load_weights(const DepthAggregateQkvNormParams& p,
                                                                      acc* __restrict__ a_s, int64_t t0) {
  slot_tile_load_weights<kDepthAggregateQkvNormWays>(a_s, static_cast<const acc*>(p.a_ptr), p.a_token_stride,
                                                     p.a_way_stride, p.a_slot_stride, p.n_tokens,
                                                     kDepthAggregateQkvNormWays, p.n_slots, t0, 0);
}

// Warp reduce-scatter of 8 per-lane values in 9 shuffles (4 + 2 + 1 halving steps, then
// 2 plain ones): returns, in every lane, the warp-wide sum of a[lane >> 2]. Fixed order.
template <typename T>
__device__ __forceinline__ T depth_aggregate_qkv_norm_reduce_scatter8(T (&a)[kDepthAggregateQkvNormDots], int lane) {
  butterfly_step<16, 4>(a, lane);
  butterfly_step<8, 2>(a, lane);
  butterfly_step<4, 1>(a, lane);
  T v = a[0];
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v;
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kDepthAggregateQkvNormThreads, kDepthAggregateQkvNormFwdMinBlocks)
    depth_aggregate_qkv_norm_fwd_kernel(const DepthAggregateQkvNormParams p) {
  using acc = acc_t<T>;
  extern __shared__ __align__(32) unsigned char daqn_smem[];
  acc* smem = reinterpret_cast<acc*>(daqn_smem);
  const int l = p.n_slots;
  const int64_t d = p.d;
  const int64_t ld = p.ld;
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int rows = blockDim.y;
  const int warps = blockDim.x / kWarpSize;
  const int warp = tx / kWarpSize;
  const int lane = tx % kWarpSize;
  const int64_t step = static_cast<int64_t>(blockDim.x) * kVec;
  const DepthAggregateQkvNormSmem L = depth_aggregate_qkv_norm_smem_layout(rows, warps, l, ld, false, p.bufs_in_smem);
  acc* __restrict__ a_s = smem + L.a;
  acc* __restrict__ red = smem + L.red + ty * warps * kDepthAggregateQkvNormNormed;  // [warps][3]
  acc* __restrict__ stash =
      p.bufs_in_smem ? smem + L.stash + ty * kDepthAggregateQkvNormNormed * ld
                     : static_cast<acc*>(p.stash_ws_ptr) +
                           (static_cast<int64_t>(blockIdx.x) * rows + ty) * kDepthAggregateQkvNormNormed * ld;

  const T* __restrict__ S = static_cast<const T*>(p.s_ptr);
  const acc* __restrict__ g = static_cast<const acc*>(p.g_ptr);
  T* __restrict__ Out = static_cast<T*>(p.out_ptr);
  acc* __restrict__ rstd = static_cast<acc*>(p.rstd_ptr);

  for (int64_t t0 = static_cast<int64_t>(blockIdx.x) * rows; t0 < p.n_tokens;
       t0 += static_cast<int64_t>(gridDim.x) * rows) {
    const int64_t t = t0 + ty;
    const bool valid = t < p.n_tokens;  // uniform over the row (whole warps)
    __syncthreads();  // the previous tile's readers are done with a_s and red
    depth_aggregate_qkv_norm_load_weights(p, a_s, t0);
    __syncthreads();
    const acc* __restrict__ a_row = a_s + ty * kDepthAggregateQkvNormWays * l;

    // (1) Y per chunk; Out_3 written, Y_n stashed, Σ Y_n² accumulated.
    acc ss[kDepthAggregateQkvNormNormed] = {};
    if (valid) {
      const T* __restrict__ s_tok = S + t * p.s_token_stride;
      for (int64_t e = tx * kVec; e < d; e += step) {
        acc y[kDepthAggregateQkvNormWays][kVec] = {};
        slot_aggregate<T, kVec, kDepthAggregateQkvNormWays>(s_tok, p.s_slot_stride, a_row, l, e, d, y);
        store_chunk<T, kVec>(Out + 3 * p.out_way_stride + t * p.out_token_stride, e, d, y[3]);
#pragma unroll
        for (int c = 0; c < kDepthAggregateQkvNormNormed; ++c) {
          Vec<acc, kVec> v;
#pragma unroll
          for (int k = 0; k < kVec; ++k) {
            ss[c] += y[c][k] * y[c][k];  // zero past d (load_chunk zero-fills)
            v.v[k] = y[c][k];
          }
          vec_at<acc, kVec>(stash, c * ld + e) = v;
        }
      }
    }
#pragma unroll
    for (int c = 0; c < kDepthAggregateQkvNormNormed; ++c) {
      const acc v = warp_sum(ss[c]);
      if (lane == 0) red[warp * kDepthAggregateQkvNormNormed + c] = v;
    }
    __syncthreads();

    // (2) r_n from the warps' sums in warp order; Out_n from the stash.
    if (valid) {
      acc r[kDepthAggregateQkvNormNormed];
#pragma unroll
      for (int c = 0; c < kDepthAggregateQkvNormNormed; ++c) {
        acc s = acc(0);
        for (int w = 0; w < warps; ++w) s += red[w * kDepthAggregateQkvNormNormed + c];
        r[c] = acc_rsqrt(s / static_cast<acc>(d) + static_cast<acc>(p.eps));
        if (tx == 0) rstd[c * p.n_tokens + t] = r[c];
      }
      for (int64_t e = tx * kVec; e < d; e += step) {
#pragma unroll
        for (int c = 0; c < kDepthAggregateQkvNormNormed; ++c) {
          const Vec<acc, kVec> y = vec_at<acc, kVec>(stash, c * ld + e);
          const Vec<acc, kVec> gv = *reinterpret_cast<const Vec<acc, kVec>*>(g + c * ld + e);
          acc o[kVec];
#pragma unroll
          for (int k = 0; k < kVec; ++k) o[k] = y.v[k] * r[c] * gv.v[k];
          store_chunk<T, kVec>(Out + c * p.out_way_stride + t * p.out_token_stride, e, d, o);
        }
      }
    }
  }
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kDepthAggregateQkvNormThreads, kDepthAggregateQkvNormBwdMinBlocks)
    depth_aggregate_qkv_norm_bwd_kernel(const DepthAggregateQkvNormParams p) {
  using acc = acc_t<T>;
  extern __shared__ __align__(32) unsigned char daqn_smem[];
  acc* smem = reinterpret_cast<acc*>(daqn_smem);
  const int l = p.n_slots;
  const int64_t d = p.d;
  const int64_t ld = p.ld;
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int rows = blockDim.y;
  const int warps = blockDim.x / kWarpSize;
  const int warp = tx / kWarpSize;
  const int lane = tx % kWarpSize;
  const int tid = ty * blockDim.x + tx;
  const int nthreads = blockDim.x * rows;
  const int64_t step = static_cast<int64_t>(blockDim.x) * kVec;
  const DepthAggregateQkvNormSmem L = depth_aggregate_qkv_norm_smem_layout(rows, warps, l, ld, true, p.bufs_in_smem);
  acc* __restrict__ a_s = smem + L.a;
  acc* __restrict__ red = smem + L.red + ty * warps * kDepthAggregateQkvNormNormed;  // [warps][3]
  // part_all / part, dg_ws / dg alias each other: no __restrict__ on them.
  acc* part_all = smem + L.part;                        // [rows][warps][8][l]
  acc* part = part_all + ty * warps * kDepthAggregateQkvNormDots * l;  // [warps][8][l]
  const int64_t slice = (static_cast<int64_t>(blockIdx.x) * rows + ty) * kDepthAggregateQkvNormNormed * ld;
  acc* dg_ws = static_cast<acc*>(p.dg_ws_ptr) + slice;
  acc* __restrict__ stash =
      p.bufs_in_smem ? smem + L.stash + ty * kDepthAggregateQkvNormNormed * ld : static_cast<acc*>(p.stash_ws_ptr) + slice;
  acc* dg = p.bufs_in_smem ? smem + L.dg + ty * kDepthAggregateQkvNormNormed * ld : dg_ws;

  const T* __restrict__ S = static_cast<const T*>(p.s_ptr);
  const T* __restrict__ dOut = static_cast<const T*>(p.dout_ptr);
  const acc* __restrict__ g = static_cast<const acc*>(p.g_ptr);
  const acc* __restrict__ rstd = static_cast<const acc*>(p.rstd_ptr);
  T* __restrict__ dS = static_cast<T*>(p.ds_ptr);
  acc* __restrict__ dA = static_cast<acc*>(p.da_ptr);

  // The row's dg partial starts at zero (each thread owns its chunks' entries).
  for (int64_t e = tx * kVec; e < d; e += step) {
#pragma unroll
    for (int c = 0; c < kDepthAggregateQkvNormNormed; ++c) vec_at<acc, kVec>(dg, c * ld + e) = Vec<acc, kVec>{};
  }

  for (int64_t t0 = static_cast<int64_t>(blockIdx.x) * rows; t0 < p.n_tokens;
       t0 += static_cast<int64_t>(gridDim.x) * rows) {
    const int64_t t = t0 + ty;
    const bool valid = t < p.n_tokens;  // uniform over the row (whole warps)
    __syncthreads();  // the previous tile's readers are done with a_s, red and part
    depth_aggregate_qkv_norm_load_weights(p, a_s, t0);
    for (int i = tid; i < rows * warps * kDepthAggregateQkvNormDots * l; i += nthreads) part_all[i] = acc(0);
    __syncthreads();
    const acc* __restrict__ a_row = a_s + ty * kDepthAggregateQkvNormWays * l;
    const T* __restrict__ s_tok = S + (valid ? t : 0) * p.s_token_stride;
    const T* __restrict__ do_tok = dOut + (valid ? t : 0) * p.dout_token_stride;
    acc r[kDepthAggregateQkvNormNormed];
#pragma unroll
    for (int c = 0; c < kDepthAggregateQkvNormNormed; ++c) r[c] = valid ? rstd[c * p.n_tokens + t] : acc(0);

    // (1) per chunk: Y_n; dg and D partials; the stash; P and Q per slot.
    acc D[kDepthAggregateQkvNormNormed] = {};
    // The chunk loop is warp-uniform (the shuffles in pass 2 need every lane): lanes
    // past the row end (e >= d) work on zeros and touch no buffer.
    if (valid) {
      for (int64_t e0 = 0; e0 < d; e0 += step) {
        const int64_t e = e0 + tx * kVec;
        const bool in_row = e < d;
        acc y[kDepthAggregateQkvNormNormed][kVec] = {};
        if (in_row) slot_aggregate<T, kVec, kDepthAggregateQkvNormNormed>(s_tok, p.s_slot_stride, a_row, l, e, d, y);
        acc z[kDepthAggregateQkvNormWays][kVec];
#pragma unroll
        for (int c = 0; c < kDepthAggregateQkvNormWays; ++c) {
          const Vec<T, kVec> go = load_chunk_raw<T, kVec>(do_tok + c * p.dout_way_stride, e, d);
          if (c < kDepthAggregateQkvNormNormed) {
            const Vec<acc, kVec> gv =
                in_row ? *reinterpret_cast<const Vec<acc, kVec>*>(g + c * ld + e) : Vec<acc, kVec>{};
#pragma unroll
            for (int k = 0; k < kVec; ++k) {
              z[c][k] = gv.v[k] * to_acc(go.v[k]);
              D[c] += z[c][k] * y[c][k];
            }
            if (in_row) {
              Vec<acc, kVec>& dgv = vec_at<acc, kVec>(dg, c * ld + e);
              Vec<acc, kVec> sy;
#pragma unroll
              for (int k = 0; k < kVec; ++k) {
                dgv.v[k] += to_acc(go.v[k]) * y[c][k] * r[c];
                sy.v[k] = y[c][k];
              }
              vec_at<acc, kVec>(stash, c * ld + e) = sy;
            }
          } else {
#pragma unroll
            for (int k = 0; k < kVec; ++k) z[c][k] = to_acc(go.v[k]);
          }
        }
        // Pass 2 over the slots: P_cj = <z_c, S_j>, Q_nj = <Y_n, S_j>.
#pragma unroll 2
        for (int j = 0; j < l; ++j) {
          acc s[kVec];
          load_chunk<T, kVec>(s_tok + j * p.s_slot_stride, e, d, s);
          acc v[kDepthAggregateQkvNormDots];
#pragma unroll
          for (int c = 0; c < kDepthAggregateQkvNormWays; ++c) {
            v[c] = acc(0);
#pragma unroll
            for (int k = 0; k < kVec; ++k) v[c] += z[c][k] * s[k];
          }
#pragma unroll
          for (int c = 0; c < kDepthAggregateQkvNormNormed; ++c) {
            v[kDepthAggregateQkvNormWays + c] = acc(0);
#pragma unroll
            for (int k = 0; k < kVec; ++k) v[kDepthAggregateQkvNormWays + c] += y[c][k] * s[k];
          }
          v[kDepthAggregateQkvNormDots - 1] = acc(0);
          const acc sum = depth_aggregate_qkv_norm_reduce_scatter8(v, lane);
          const int m = lane >> 2;
          if ((lane & 3) == 0 && m < kDepthAggregateQkvNormDots - 1) part[(warp * kDepthAggregateQkvNormDots + m) * l + j] += sum;
        }
      }
    }
#pragma unroll
    for (int c = 0; c < kDepthAggregateQkvNormNormed; ++c) {
      const acc v = warp_sum(D[c]);
      if (lane == 0) red[warp * kDepthAggregateQkvNormNormed + c] = v;
    }
    __syncthreads();

    // (2) k_n and dA from the warps' partials in warp order; dY and dS per chunk.
    if (valid) {
      acc kn[kDepthAggregateQkvNormNormed];
#pragma unroll
      for (int c = 0; c < kDepthAggregateQkvNormNormed; ++c) {
        acc s = acc(0);
        for (int w = 0; w < warps; ++w) s += red[w * kDepthAggregateQkvNormNormed + c];
        kn[c] = r[c] * r[c] * r[c] * s / static_cast<acc>(d);
      }
      for (int i = tx; i < kDepthAggregateQkvNormWays * l; i += blockDim.x) {
        const int c = i / l;
        const int j = i % l;
        acc P = acc(0), Q = acc(0);
        for (int w = 0; w < warps; ++w) {
          P += part[(w * kDepthAggregateQkvNormDots + c) * l + j];
          if (c < kDepthAggregateQkvNormNormed) Q += part[(w * kDepthAggregateQkvNormDots + kDepthAggregateQkvNormWays + c) * l + j];
        }
        acc val = P;
        if (c == 0) val = r[0] * P - kn[0] * Q;
        if (c == 1) val = r[1] * P - kn[1] * Q;
        if (c == 2) val = r[2] * P - kn[2] * Q;
        dA[t * kDepthAggregateQkvNormWays * l + i] = val;
      }
      T* __restrict__ ds_tok = dS + t * p.ds_token_stride;
      for (int64_t e = tx * kVec; e < d; e += step) {
        acc dy[kDepthAggregateQkvNormWays][kVec];
#pragma unroll
        for (int c = 0; c < kDepthAggregateQkvNormWays; ++c) {
          const Vec<T, kVec> go = load_chunk_raw<T, kVec>(do_tok + c * p.dout_way_stride, e, d);
          if (c < kDepthAggregateQkvNormNormed) {
            const Vec<acc, kVec> gv = *reinterpret_cast<const Vec<acc, kVec>*>(g + c * ld + e);
            const Vec<acc, kVec> y = vec_at<acc, kVec>(stash, c * ld + e);
#pragma unroll
            for (int k = 0; k < kVec; ++k) dy[c][k] = r[c] * gv.v[k] * to_acc(go.v[k]) - kn[c] * y.v[k];
          } else {
#pragma unroll
            for (int k = 0; k < kVec; ++k) dy[c][k] = to_acc(go.v[k]);
          }
        }
#pragma unroll 2
        for (int j = 0; j < l; ++j) {
          T* __restrict__ ds_row = ds_tok + j * p.ds_slot_stride;
          acc ds[kVec];
          if (p.accumulate_ds) {
            load_chunk<T, kVec>(ds_row, e, d, ds);
          } else {
#pragma unroll
            for (int k = 0; k < kVec; ++k) ds[k] = acc(0);
          }
#pragma unroll
          for (int c = 0; c < kDepthAggregateQkvNormWays; ++c) {
            const acc w = a_row[c * l + j];
#pragma unroll
            for (int k = 0; k < kVec; ++k) ds[k] += w * dy[c][k];
          }
          store_chunk<T, kVec>(ds_row, e, d, ds);
        }
      }
    }
  }

  // The row's dg partial to its workspace slice (own entries: no barrier needed).
  if (p.bufs_in_smem) {
    for (int64_t e = tx * kVec; e < d; e += step) {
#pragma unroll
      for (int c = 0; c < kDepthAggregateQkvNormNormed; ++c) {
        vec_at<acc, kVec>(dg_ws, c * ld + e) = vec_at<acc, kVec>(dg, c * ld + e);
      }
    }
  }
}

}  // namespace crosslayer
