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
//   backward  (1) per chunk: pass 1 over the slots for Y_n, each slot's chunk also
//                 kept in the thread's entries of the slot stage in shared memory
//                 (kStage); dOut read; dg, D partials; Y_n stashed; then two passes
//                 over the slots from the stage (without one: S again, an L1/L2 hit),
//                 P_cj = <z_c, S_j> and then, Y_n read back from the stash, Q_nj =
//                 <Y_n, S_j>, each reduced a batch of slots at a time by one
//                 reduce-scatter (4 values a slot) into per-warp partials in smem;
//             (2) after a barrier, dA from the partials (warp order), k_n; per chunk,
//                 dY from the stash and dOut (re-read: an L2 hit), dS written (or
//                 accumulated) a batch of slots at a time.
// Every slot loop issues the loads of kSlotBatch slots (phases/slot_tile.cuh) before it
// uses any: four 16-byte loads in flight per thread and stream.
// The stage is [l][rows·threads_x] chunks (l·16 B a thread: 100 KB a block at l = 25);
// the launcher stages the slots only while 2 blocks still fit an SM (so up to l = 26
// with 256 threads), with the row buffers moved to global workspaces first if that
// makes room.
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
// accumulates). With the stage the backward reads S once; without it the dot passes'
// reads of S, and dOut's second read (phase 2) in any case, come from L1/L2.
//
// Shifted rows (kShifted: d or a token stride not a multiple of kVec, or the bases off a
// 16-byte boundary; phases/slot_tile.cuh): token t's chunks start at e = −h_t, so the
// HBM streams (S, Out, dOut, dS) keep their 16-byte accesses for any d; the row buffers
// (g, stash, dg), indexed by feature and shared by tokens of different shifts, are then
// read and written element by element (row_buf_load / row_buf_store: shared memory or
// L1, not HBM).
//
// Assumptions (checked by the launcher):
//   1) features have unit stride in S, Out, dOut and dS; every other stride is free;
//   2) with kVec > 1, every row of a token in S, Out, dOut and dS has the same shift
//      (slot_rows_path, common/slots.h), zero unless kShifted, so each whole chunk is one aligned
//      16-byte access;
//   3) 1 <= l <= kMaxSlots; A, g (padded to (3, ld) with zeros), rstd, dA and the
//      workspaces in the accumulator dtype, contiguous; ld >= d, a multiple of 8.
#pragma once

#include "common/std.cuh"

#include "common/limits.h"
#include "common/math.cuh"
#include "common/reduce.cuh"
#include "common/tokens.cuh"
#include "common/vec.cuh"
#include "kernels/phases/slot_tile.cuh"

namespace crosslayer {

constexpr int kDepthAggregateQkvNormWays = 4;    // q, k, v, r
constexpr int kDepthAggregateQkvNormNormed = 3;  // q, k, v
constexpr int kDepthAggregateQkvNormThreads = 256;
constexpr int kDepthAggregateQkvNormDots = 8;    // rows of a warp's partials: P_0..P_3, Q_0..Q_2, one unused
// Resident 256-thread blocks asked of ptxas for the backward (at most 128 registers).
constexpr int kDepthAggregateQkvNormBwdMinBlocks = 2;
constexpr int kDepthAggregateQkvNormFwdMinBlocks = 2;

struct DepthAggregateQkvNormParams {
  using index_t = int64_t;
  index_t n_tokens;  // N
  index_t d;         // features
  index_t ld;        // row stride of g, the stash and the dg buffers (>= d, multiple of 8)
  int n_slots;       // l
  // S: l slots of (N, d), activation dtype, as a pointer table.
  SlotTable s;
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
  int64_t stage;  // [l][rows·threads_x]    backward, kStage: chunks of S, stage_entry_bytes each
  int64_t total;
};

__host__ __device__ inline int64_t depth_aggregate_qkv_norm_round8(int64_t x) { return (x + 7) / 8 * 8; }

// Features [e, e + kVec) of way c's row in a row buffer (g, stash or dg: [3][ld], d
// features a row): one vector access, or with kShifted (e not a multiple of kVec)
// element by element, zero outside [0, d).
template <typename acc, int kVec, bool kShifted>
__device__ __forceinline__ Vec<acc, kVec> row_buf_load(const acc* buf, int64_t ld, int c, int64_t e,
                                                       int64_t d) {
  if constexpr (kShifted) {
    Vec<acc, kVec> v;
#pragma unroll
    for (int k = 0; k < kVec; ++k) v.v[k] = element_in_row(e + k, d) ? buf[c * ld + e + k] : acc(0);
    return v;
  } else {
    return *reinterpret_cast<const Vec<acc, kVec>*>(buf + (c * ld + e));
  }
}

// Stores features [e, e + kVec) of way c's row in a row buffer: one vector access, or
// with kShifted element by element, only those in [0, d).
template <typename acc, int kVec, bool kShifted>
__device__ __forceinline__ void row_buf_store(acc* buf, int64_t ld, int c, int64_t e, int64_t d,
                                              const Vec<acc, kVec>& v) {
  if constexpr (kShifted) {
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      if (element_in_row(e + k, d)) buf[c * ld + e + k] = v.v[k];
    }
  } else {
    *reinterpret_cast<Vec<acc, kVec>*>(buf + (c * ld + e)) = v;
  }
}

// The first chunk of token t's rows: −h_t with kShifted (slot 0's row start), else 0.
template <typename T, int kVec, bool kShifted, typename Params>
__device__ __forceinline__ int64_t qkv_norm_first_chunk(const Params& p, int64_t t) {
  if constexpr (kShifted) {
    return -row_shift<T, kVec>(table_rows<T>(p.s, t).at(0));
  } else {
    return 0;
  }
}

// stage_entry_bytes: one thread's chunk of one slot (kVec·sizeof(T)) when the backward
// stages the slots, else 0; acc_bytes = sizeof(acc).
__host__ __device__ inline DepthAggregateQkvNormSmem depth_aggregate_qkv_norm_smem_layout(int rows, int warps, int l, int64_t ld,
                                                          bool backward, bool bufs_in_smem,
                                                          int stage_entry_bytes, int acc_bytes) {
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
  off = depth_aggregate_qkv_norm_round8(off);
  s.stage = off;
  if (backward && stage_entry_bytes > 0) {
    const int64_t bytes = static_cast<int64_t>(l) * rows * warps * kWarpSize * stage_entry_bytes;
    off += (bytes + acc_bytes - 1) / acc_bytes;
  }
  s.total = off;
  return s;
}

// This row's views of the block's shared memory and workspaces (thread row ty): every
// row's P/Q partials part_all, the weight tile a_s of all rows, and the row's warp
// totals red [warps][3], P/Q partials part [warps][8][l] (backward), stash and dg
// [3][ld] (shared memory or its workspace slice), dg_ws, its dg workspace slice
// (backward), and the thread's slot-0 entry of the stage (backward with kStage).
template <typename acc>
struct QkvNormRow {
  acc* part_all;  // every row's P/Q partials (the block's part region)
  acc* a_s;
  acc* red;
  acc* part;
  acc* stash;
  acc* dg;
  acc* dg_ws;
  void* stage;  // backward, kStage: this thread's entry of slot 0 (slot j: + j·rows·threads_x entries)
};

template <typename T, int kVec, bool kBackward, bool kStage>
__device__ __forceinline__ QkvNormRow<acc_t<T>> qkv_norm_row(const DepthAggregateQkvNormParams& p, acc_t<T>* smem) {
  using acc = acc_t<T>;
  const int rows = blockDim.y;
  const int warps = blockDim.x / kWarpSize;
  const int ty = threadIdx.y;
  const int64_t slice = (static_cast<int64_t>(blockIdx.x) * rows + ty) * kDepthAggregateQkvNormNormed * p.ld;
  QkvNormRow<acc> r;
  const DepthAggregateQkvNormSmem L = depth_aggregate_qkv_norm_smem_layout(
      rows, warps, p.n_slots, p.ld, kBackward, p.bufs_in_smem, kStage ? kVec * static_cast<int>(sizeof(T)) : 0,
      static_cast<int>(sizeof(acc)));
  r.part_all = smem + L.part;
  r.a_s = smem + L.a;
  r.red = smem + L.red + ty * warps * kDepthAggregateQkvNormNormed;
  r.part = r.part_all + ty * warps * kDepthAggregateQkvNormDots * p.n_slots;
  r.stash = p.bufs_in_smem ? smem + L.stash + ty * kDepthAggregateQkvNormNormed * p.ld
                           : static_cast<acc*>(p.stash_ws_ptr) + slice;
  r.dg_ws = kBackward ? static_cast<acc*>(p.dg_ws_ptr) + slice : nullptr;
  r.dg = p.bufs_in_smem ? smem + L.dg + ty * kDepthAggregateQkvNormNormed * p.ld : r.dg_ws;
  r.stage = (kBackward && kStage)
                ? reinterpret_cast<Vec<T, kVec>*>(smem + L.stage) + ty * blockDim.x + threadIdx.x
                : nullptr;
  return r;
}

// Entries between one slot's and the next in a thread's stage (the stage is
// [l][rows·threads_x]).
__device__ __forceinline__ int64_t qkv_norm_stage_stride() { return static_cast<int64_t>(blockDim.x) * blockDim.y; }

// Block-wide, between two barriers (the first: the previous tile's readers are done):
// the weight tile of tokens t0.. staged in a_s and, in the backward, every row's P/Q
// partials zeroed.
template <typename acc, bool kBackward>
__device__ __forceinline__ void qkv_norm_stage_tile(const DepthAggregateQkvNormParams& p, const QkvNormRow<acc>& row,
                                                    int64_t t0) {
  __syncthreads();
  slot_tile_load_weights<kDepthAggregateQkvNormWays>(row.a_s, static_cast<const acc*>(p.a_ptr), p.a_token_stride,
                                                     p.a_way_stride, p.a_slot_stride, p.n_tokens,
                                                     kDepthAggregateQkvNormWays, p.n_slots, t0, 0);
  if (kBackward) {
    const int n_part = blockDim.y * (blockDim.x / kWarpSize) * kDepthAggregateQkvNormDots * p.n_slots;
    for (int i = threadIdx.y * blockDim.x + threadIdx.x; i < n_part; i += blockDim.x * blockDim.y) {
      row.part_all[i] = acc(0);
    }
  }
  __syncthreads();
}

// The warp sums of this thread's three values v_n stored (=) at red[warp][n] by lane 0.
template <typename acc>
__device__ __forceinline__ void qkv_norm_warp_totals(const acc (&v)[kDepthAggregateQkvNormNormed], acc* red) {
#pragma unroll
  for (int c = 0; c < kDepthAggregateQkvNormNormed; ++c) {
    const acc s = warp_sum(v[c]);
    if (threadIdx.x % kWarpSize == 0) red[(threadIdx.x / kWarpSize) * kDepthAggregateQkvNormNormed + c] = s;
  }
}

// Σ over the row's warps, in warp order, of red[w][c] (after the barrier that follows
// qkv_norm_warp_totals).
template <typename acc>
__device__ __forceinline__ acc qkv_norm_row_total(const acc* red, int c) {
  acc s = acc(0);
  for (int w = 0; w < static_cast<int>(blockDim.x / kWarpSize); ++w) s += red[w * kDepthAggregateQkvNormNormed + c];
  return s;
}

// Forward pass 1 of token t, per chunk: Y_c over the l slots, Out_3 written (=), Y_n
// stashed, Σ Y_n² accumulated in ss (this thread's chunks).
template <typename T, int kVec, bool kShifted>
__device__ __forceinline__ void qkv_norm_fwd_aggregate(const DepthAggregateQkvNormParams& p,
                                                       const QkvNormRow<acc_t<T>>& row,
                                                       const acc_t<T>* __restrict__ a_row, int64_t t,
                                                       acc_t<T> (&ss)[kDepthAggregateQkvNormNormed]) {
  using acc = acc_t<T>;
  const TableRows<T> s_rows = table_rows<T>(p.s, t);
  T* __restrict__ out_tok = static_cast<T*>(p.out_ptr) + t * p.out_token_stride;
  for (int64_t e = qkv_norm_first_chunk<T, kVec, kShifted>(p, t) + threadIdx.x * kVec; e < p.d;
       e += static_cast<int64_t>(blockDim.x) * kVec) {
    acc y[kDepthAggregateQkvNormWays][kVec] = {};
    slot_aggregate<T, kVec, kDepthAggregateQkvNormWays>(s_rows, a_row, p.n_slots, e, p.d, y);
    store_chunk<T, kVec>(out_tok + 3 * p.out_way_stride, e, p.d, y[3]);
#pragma unroll
    for (int c = 0; c < kDepthAggregateQkvNormNormed; ++c) {
      Vec<acc, kVec> v;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        ss[c] += y[c][k] * y[c][k];  // zero outside the row (the loads zero-fill)
        v.v[k] = y[c][k];
      }
      row_buf_store<acc, kVec, kShifted>(row.stash, p.ld, c, e, p.d, v);
    }
  }
}

// Forward pass 2 of token t (after the barrier): r_n from the row's warp totals, written
// (=) to rstd by thread 0; Out_n = Y_n·r_n·g_n (=) from the stash (own entries).
template <typename T, int kVec, bool kShifted>
__device__ __forceinline__ void qkv_norm_fwd_normalize(const DepthAggregateQkvNormParams& p,
                                                       const QkvNormRow<acc_t<T>>& row, int64_t t) {
  using acc = acc_t<T>;
  const acc* __restrict__ g = static_cast<const acc*>(p.g_ptr);
  T* __restrict__ out_tok = static_cast<T*>(p.out_ptr) + t * p.out_token_stride;
  acc r[kDepthAggregateQkvNormNormed];
#pragma unroll
  for (int c = 0; c < kDepthAggregateQkvNormNormed; ++c) {
    r[c] = acc_rsqrt(qkv_norm_row_total(row.red, c) / static_cast<acc>(p.d) + static_cast<acc>(p.eps));
    if (threadIdx.x == 0) static_cast<acc*>(p.rstd_ptr)[c * p.n_tokens + t] = r[c];
  }
  for (int64_t e = qkv_norm_first_chunk<T, kVec, kShifted>(p, t) + threadIdx.x * kVec; e < p.d;
       e += static_cast<int64_t>(blockDim.x) * kVec) {
#pragma unroll
    for (int c = 0; c < kDepthAggregateQkvNormNormed; ++c) {
      const Vec<acc, kVec> y = row_buf_load<acc, kVec, kShifted>(row.stash, p.ld, c, e, p.d);
      const Vec<acc, kVec> gv = row_buf_load<acc, kVec, kShifted>(g, p.ld, c, e, p.d);
      acc o[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) o[k] = y.v[k] * r[c] * gv.v[k];
      store_chunk<T, kVec>(out_tok + c * p.out_way_stride, e, p.d, o);
    }
  }
}

template <typename T, int kVec, bool kShifted>
__global__ void __launch_bounds__(kDepthAggregateQkvNormThreads, kDepthAggregateQkvNormFwdMinBlocks)
    depth_aggregate_qkv_norm_fwd_kernel(const __grid_constant__ DepthAggregateQkvNormParams p) {
  using acc = acc_t<T>;
  extern __shared__ __align__(32) unsigned char daqn_smem[];
  const QkvNormRow<acc> row = qkv_norm_row<T, kVec, false, false>(p, reinterpret_cast<acc*>(daqn_smem));
  for (int64_t t0 = first_token_tile(blockDim.y); t0 < p.n_tokens; t0 += token_tile_stride(blockDim.y)) {
    const int64_t t = t0 + threadIdx.y;
    const bool valid = t < p.n_tokens;  // uniform over the row (whole warps)
    qkv_norm_stage_tile<acc, false>(p, row, t0);
    acc ss[kDepthAggregateQkvNormNormed] = {};
    if (valid) {
      qkv_norm_fwd_aggregate<T, kVec, kShifted>(
          p, row, row.a_s + threadIdx.y * kDepthAggregateQkvNormWays * p.n_slots, t, ss);
    }
    qkv_norm_warp_totals(ss, row.red);
    __syncthreads();
    if (valid) qkv_norm_fwd_normalize<T, kVec, kShifted>(p, row, t);
  }
}

// Dot products <u_c, S_j> of this thread's chunk, for every slot j and c < kN (kN <= 4),
// added (+=) to the warp's partials part[warp][m0 + c][j]. The slots' chunks come from
// the stage (the thread's own entries, written in pass 1: no barrier) or, without one,
// from S (an L1/L2 hit), slot_batch<kWhole>() slots' loads issued before any is used;
// each batch's dot products (4 a slot, zero-padded past kN) are reduced together by one
// reduce-scatter. Every lane of the warp calls it; lanes past the row end (in_row
// false) add zeros.
template <typename T, int kVec, bool kWhole, bool kStage, int kN>
__device__ __forceinline__ void qkv_norm_bwd_slot_dots(const DepthAggregateQkvNormParams& p,
                                                       const QkvNormRow<acc_t<T>>& row, const TableRows<T>& s_rows,
                                                       int64_t e, bool in_row, const acc_t<T> (&u)[kN][kVec],
                                                       int m0) {
  using acc = acc_t<T>;
  constexpr int kPerSlot = 4;
  static_assert(kN <= kPerSlot, "at most 4 vectors a pass");
  constexpr int kBatch = slot_batch<kWhole>();
  constexpr int kValues = kBatch * kPerSlot;  // [b][c]
  constexpr int kLanesPerValue = kWarpSize / kValues;
  const int l = p.n_slots;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const Vec<T, kVec>* __restrict__ stage = static_cast<const Vec<T, kVec>*>(row.stage);
  const int64_t stage_stride = qkv_norm_stage_stride();
  for (int j0 = 0; j0 < l; j0 += kBatch) {
    Vec<T, kVec> sb[kBatch];
    if constexpr (kStage) {
#pragma unroll
      for (int b = 0; b < kBatch; ++b) sb[b] = (j0 + b < l && in_row) ? stage[(j0 + b) * stage_stride] : Vec<T, kVec>{};
    } else {
      slot_batch_load<T, kVec, kWhole>(s_rows, j0, l, e, p.d, sb);
    }
    acc v[kValues];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
#pragma unroll
      for (int c = 0; c < kPerSlot; ++c) {
        acc dt = acc(0);
        if (c < kN) {
#pragma unroll
          for (int k = 0; k < kVec; ++k) dt += u[c < kN ? c : 0][k] * to_acc(sb[b].v[k]);
        }
        v[b * kPerSlot + c] = dt;
      }
    }
    const acc sum = warp_reduce_scatter_pow2<kValues>(v, lane);
    const int i = lane / kLanesPerValue;
    const int b = i / kPerSlot;
    const int c = i % kPerSlot;
    if (lane % kLanesPerValue == 0 && c < kN && j0 + b < l) row.part[(warp * kDepthAggregateQkvNormDots + m0 + c) * l + j0 + b] += sum;
  }
}

// Backward, one chunk [e, e + kVec) of token t: pass 1 over the slots for Y_n (with the
// stage: each slot's chunk also kept in the thread's stage entries), z_c from dOut, the
// D_n partials (+=) and the row's dg partial (+=), Y_n stashed; then the dot products
// P_cj = <z_c, S_j> (c < 4) and, with Y_n read back from the stash, Q_nj = <Y_n, S_j>
// (n < 3), in two passes over the slots (qkv_norm_bwd_slot_dots) so that z and Y are
// never live at once. Every lane of the warp calls it (kWhole: every chunk of the warp
// lies inside the row, a warp-uniform test; otherwise lanes past the row end work on
// zeros and touch no buffer).
template <typename T, int kVec, bool kShifted, bool kWhole, bool kStage>
__device__ __forceinline__ void qkv_norm_bwd_dots_chunk(const DepthAggregateQkvNormParams& p,
                                                        const QkvNormRow<acc_t<T>>& row,
                                                        const acc_t<T>* __restrict__ a_row, int64_t t, int64_t e,
                                                        const acc_t<T> (&r)[kDepthAggregateQkvNormNormed],
                                                        acc_t<T> (&D)[kDepthAggregateQkvNormNormed]) {
  using acc = acc_t<T>;
  constexpr int kWays = kDepthAggregateQkvNormWays;
  constexpr int kNormed = kDepthAggregateQkvNormNormed;
  const int l = p.n_slots;
  const int64_t d = p.d;
  const bool in_row = e < d;
  const acc* __restrict__ g = static_cast<const acc*>(p.g_ptr);
  const TableRows<T> s_rows = table_rows<T>(p.s, t);
  const T* __restrict__ do_tok = static_cast<const T*>(p.dout_ptr) + t * p.dout_token_stride;
  acc z[kWays][kVec];
  {
    acc y[kNormed][kVec] = {};
    if (in_row) {
      slot_aggregate_as<T, kVec, kNormed, kWhole>(s_rows, a_row, l, e, d, y,
                                                  kStage ? static_cast<Vec<T, kVec>*>(row.stage) : nullptr,
                                                  qkv_norm_stage_stride());
    }
#pragma unroll
    for (int c = 0; c < kWays; ++c) {
      const Vec<T, kVec> go = load_chunk_as<T, kVec, kWhole>(do_tok + c * p.dout_way_stride, e, d);
      if (c < kNormed) {
        const Vec<acc, kVec> gv = in_row ? row_buf_load<acc, kVec, kShifted>(g, p.ld, c, e, d) : Vec<acc, kVec>{};
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          z[c][k] = gv.v[k] * to_acc(go.v[k]);
          D[c] += z[c][k] * y[c][k];
        }
        if (in_row) {
          Vec<acc, kVec> dgv = row_buf_load<acc, kVec, kShifted>(row.dg, p.ld, c, e, d);
          Vec<acc, kVec> sy;
#pragma unroll
          for (int k = 0; k < kVec; ++k) {
            dgv.v[k] += to_acc(go.v[k]) * y[c][k] * r[c];
            sy.v[k] = y[c][k];
          }
          row_buf_store<acc, kVec, kShifted>(row.dg, p.ld, c, e, d, dgv);
          row_buf_store<acc, kVec, kShifted>(row.stash, p.ld, c, e, d, sy);
        }
      } else {
#pragma unroll
        for (int k = 0; k < kVec; ++k) z[c][k] = to_acc(go.v[k]);
      }
    }
  }
  qkv_norm_bwd_slot_dots<T, kVec, kWhole, kStage, kWays>(p, row, s_rows, e, in_row, z, 0);
  acc y[kNormed][kVec];
#pragma unroll
  for (int c = 0; c < kNormed; ++c) {
    const Vec<acc, kVec> sy = in_row ? row_buf_load<acc, kVec, kShifted>(row.stash, p.ld, c, e, d) : Vec<acc, kVec>{};
#pragma unroll
    for (int k = 0; k < kVec; ++k) y[c][k] = sy.v[k];
  }
  qkv_norm_bwd_slot_dots<T, kVec, kWhole, kStage, kNormed>(p, row, s_rows, e, in_row, y, kWays);
}

// Backward pass 1 and 2 of token t over the row's chunks (qkv_norm_bwd_dots_chunk), the
// whole-chunk test made once per chunk and warp. Every lane of the row calls it.
template <typename T, int kVec, bool kShifted, bool kStage>
__device__ __forceinline__ void qkv_norm_bwd_dots(const DepthAggregateQkvNormParams& p,
                                                  const QkvNormRow<acc_t<T>>& row,
                                                  const acc_t<T>* __restrict__ a_row, int64_t t,
                                                  const acc_t<T> (&r)[kDepthAggregateQkvNormNormed],
                                                  acc_t<T> (&D)[kDepthAggregateQkvNormNormed]) {
  const int64_t step = static_cast<int64_t>(blockDim.x) * kVec;
  for (int64_t e0 = qkv_norm_first_chunk<T, kVec, kShifted>(p, t); e0 < p.d; e0 += step) {
    const int64_t e = e0 + threadIdx.x * kVec;
    if (kShifted ? warp_chunks_whole<kVec>(e0, p.d) : e0 + step <= p.d) {
      qkv_norm_bwd_dots_chunk<T, kVec, kShifted, true, kStage>(p, row, a_row, t, e, r, D);
    } else {
      qkv_norm_bwd_dots_chunk<T, kVec, kShifted, false, kStage>(p, row, a_row, t, e, r, D);
    }
  }
}

// Backward, dA of token t (after the barrier) from the row's P/Q partials in warp
// order: dA[t, c, j] = r_c·P_cj − k_c·Q_cj (c < 3), P_3j (= per token).
template <typename acc>
__device__ __forceinline__ void qkv_norm_bwd_da(const DepthAggregateQkvNormParams& p, const QkvNormRow<acc>& row,
                                                int64_t t, const acc (&r)[kDepthAggregateQkvNormNormed],
                                                const acc (&kn)[kDepthAggregateQkvNormNormed]) {
  constexpr int kDots = kDepthAggregateQkvNormDots;
  const int l = p.n_slots;
  acc* __restrict__ dA = static_cast<acc*>(p.da_ptr) + t * kDepthAggregateQkvNormWays * l;
  for (int i = threadIdx.x; i < kDepthAggregateQkvNormWays * l; i += blockDim.x) {
    const int c = i / l;
    const int j = i % l;
    acc P = acc(0), Q = acc(0);
    for (int w = 0; w < static_cast<int>(blockDim.x / kWarpSize); ++w) {
      P += row.part[(w * kDots + c) * l + j];
      if (c < kDepthAggregateQkvNormNormed) Q += row.part[(w * kDots + kDepthAggregateQkvNormWays + c) * l + j];
    }
    acc val = P;
    if (c == 0) val = r[0] * P - kn[0] * Q;
    if (c == 1) val = r[1] * P - kn[1] * Q;
    if (c == 2) val = r[2] * P - kn[2] * Q;
    dA[i] = val;
  }
}

// Backward, dS of one chunk [e, e + kVec) of token t: dY_n = r_n·g_n·dOut_n − k_n·Y_n
// (Y_n from the stash, dOut re-read: an L2 hit), dY_3 = dOut_3; dS_j (=, or += with
// kAccumulate) Σ_c A[t, c, j]·dY_c, slot_batch<kWhole>() slots' dS loads issued before
// any is used. kWhole as in load_chunk_as.
template <typename T, int kVec, bool kShifted, bool kWhole, bool kAccumulate>
__device__ __forceinline__ void qkv_norm_bwd_ds_chunk(const DepthAggregateQkvNormParams& p,
                                                      const QkvNormRow<acc_t<T>>& row,
                                                      const acc_t<T>* __restrict__ a_row, int64_t t, int64_t e,
                                                      const acc_t<T> (&r)[kDepthAggregateQkvNormNormed],
                                                      const acc_t<T> (&kn)[kDepthAggregateQkvNormNormed]) {
  using acc = acc_t<T>;
  constexpr int kWays = kDepthAggregateQkvNormWays;
  constexpr int kBatch = slot_batch<kWhole>();
  const int l = p.n_slots;
  const int64_t d = p.d;
  const acc* __restrict__ g = static_cast<const acc*>(p.g_ptr);
  const T* __restrict__ do_tok = static_cast<const T*>(p.dout_ptr) + t * p.dout_token_stride;
  const StridedRows<T> ds_rows{static_cast<T*>(p.ds_ptr) + t * p.ds_token_stride, p.ds_slot_stride};
  acc dy[kWays][kVec];
#pragma unroll
  for (int c = 0; c < kWays; ++c) {
    const Vec<T, kVec> go = load_chunk_as<T, kVec, kWhole>(do_tok + c * p.dout_way_stride, e, d);
    if (c < kDepthAggregateQkvNormNormed) {
      const Vec<acc, kVec> gv = row_buf_load<acc, kVec, kShifted>(g, p.ld, c, e, d);
      const Vec<acc, kVec> y = row_buf_load<acc, kVec, kShifted>(row.stash, p.ld, c, e, d);
#pragma unroll
      for (int k = 0; k < kVec; ++k) dy[c][k] = r[c] * gv.v[k] * to_acc(go.v[k]) - kn[c] * y.v[k];
    } else {
#pragma unroll
      for (int k = 0; k < kVec; ++k) dy[c][k] = to_acc(go.v[k]);
    }
  }
  for (int j0 = 0; j0 < l; j0 += kBatch) {
    Vec<T, kVec> prior[kBatch];
    if constexpr (kAccumulate) {
      slot_batch_load<T, kVec, kWhole>(ds_rows, j0, l, e, d, prior);
    } else {
#pragma unroll
      for (int b = 0; b < kBatch; ++b) prior[b] = Vec<T, kVec>{};
    }
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      if (j0 + b < l) {
        acc ds[kVec];
#pragma unroll
        for (int k = 0; k < kVec; ++k) ds[k] = to_acc(prior[b].v[k]);
#pragma unroll
        for (int c = 0; c < kWays; ++c) {
          const acc w = a_row[c * l + j0 + b];
#pragma unroll
          for (int k = 0; k < kVec; ++k) ds[k] += w * dy[c][k];
        }
        store_chunk_as<T, kVec, kWhole>(ds_rows.at(j0 + b), e, d, ds);
      }
    }
  }
}

// Backward, dS of token t over this thread's chunks (no shuffles: per-thread tests).
template <typename T, int kVec, bool kShifted>
__device__ __forceinline__ void qkv_norm_bwd_ds(const DepthAggregateQkvNormParams& p,
                                                const QkvNormRow<acc_t<T>>& row,
                                                const acc_t<T>* __restrict__ a_row, int64_t t,
                                                const acc_t<T> (&r)[kDepthAggregateQkvNormNormed],
                                                const acc_t<T> (&kn)[kDepthAggregateQkvNormNormed]) {
  for (int64_t e = qkv_norm_first_chunk<T, kVec, kShifted>(p, t) + threadIdx.x * kVec; e < p.d;
       e += static_cast<int64_t>(blockDim.x) * kVec) {
    const bool whole = kShifted ? whole_chunk(e, kVec, p.d) : e + kVec <= p.d;
    if (whole && p.accumulate_ds) {
      qkv_norm_bwd_ds_chunk<T, kVec, kShifted, true, true>(p, row, a_row, t, e, r, kn);
    } else if (whole) {
      qkv_norm_bwd_ds_chunk<T, kVec, kShifted, true, false>(p, row, a_row, t, e, r, kn);
    } else if (p.accumulate_ds) {
      qkv_norm_bwd_ds_chunk<T, kVec, kShifted, false, true>(p, row, a_row, t, e, r, kn);
    } else {
      qkv_norm_bwd_ds_chunk<T, kVec, kShifted, false, false>(p, row, a_row, t, e, r, kn);
    }
  }
}

// The row's dg partial, this thread's chunks of features (never shifted): zeroed (kFlush
// false, before the first token's barrier) or, with buffers in shared memory, copied (=)
// to the row's workspace slice (kFlush true, after the barrier that follows the last
// token: with shifted rows a thread's chunks were accumulated by its neighbours too).
template <typename acc, int kVec, bool kFlush>
__device__ __forceinline__ void qkv_norm_bwd_dg_chunks(const DepthAggregateQkvNormParams& p,
                                                       const QkvNormRow<acc>& row) {
  if (kFlush && !p.bufs_in_smem) return;
  for (int64_t e = threadIdx.x * kVec; e < p.d; e += static_cast<int64_t>(blockDim.x) * kVec) {
#pragma unroll
    for (int c = 0; c < kDepthAggregateQkvNormNormed; ++c) {
      vec_at<acc, kVec>(kFlush ? row.dg_ws : row.dg, c * p.ld + e) =
          kFlush ? vec_at<acc, kVec>(row.dg, c * p.ld + e) : Vec<acc, kVec>{};
    }
  }
}

template <typename T, int kVec, bool kShifted, bool kStage>
__global__ void __launch_bounds__(kDepthAggregateQkvNormThreads, kDepthAggregateQkvNormBwdMinBlocks)
    depth_aggregate_qkv_norm_bwd_kernel(const __grid_constant__ DepthAggregateQkvNormParams p) {
  using acc = acc_t<T>;
  constexpr int kNormed = kDepthAggregateQkvNormNormed;
  extern __shared__ __align__(32) unsigned char daqn_smem[];
  const QkvNormRow<acc> row = qkv_norm_row<T, kVec, true, kStage>(p, reinterpret_cast<acc*>(daqn_smem));
  const acc* __restrict__ rstd = static_cast<const acc*>(p.rstd_ptr);
  qkv_norm_bwd_dg_chunks<acc, kVec, false>(p, row);
  for (int64_t t0 = first_token_tile(blockDim.y); t0 < p.n_tokens; t0 += token_tile_stride(blockDim.y)) {
    const int64_t t = t0 + threadIdx.y;
    const bool valid = t < p.n_tokens;  // uniform over the row (whole warps)
    qkv_norm_stage_tile<acc, true>(p, row, t0);
    const acc* __restrict__ a_row = row.a_s + threadIdx.y * kDepthAggregateQkvNormWays * p.n_slots;
    acc r[kNormed];
#pragma unroll
    for (int c = 0; c < kNormed; ++c) r[c] = valid ? rstd[c * p.n_tokens + t] : acc(0);
    acc D[kNormed] = {};
    if (valid) qkv_norm_bwd_dots<T, kVec, kShifted, kStage>(p, row, a_row, t, r, D);
    qkv_norm_warp_totals(D, row.red);
    __syncthreads();
    if (valid) {
      acc kn[kNormed];
#pragma unroll
      for (int c = 0; c < kNormed; ++c) kn[c] = r[c] * r[c] * r[c] * qkv_norm_row_total(row.red, c) / static_cast<acc>(p.d);
      qkv_norm_bwd_da(p, row, t, r, kn);
      qkv_norm_bwd_ds<T, kVec, kShifted>(p, row, a_row, t, r, kn);
    }
  }
  if constexpr (kShifted) __syncthreads();
  qkv_norm_bwd_dg_chunks<acc, kVec, true>(p, row);
}

}  // namespace crosslayer
