// depth_aggregate: weighted sums over a stack of depth slots (MUDD, DenseFormer).
//
// Math, per token t (N tokens, d features, l slots, C ways):
//   forward   Y_c[t]      = Σ_j A[t, c, j] · S_j[t]                     (c < C, j < l)
//   backward  dS_j[t]    (=|+=) Σ_c A[t, c, j] · dY_c[t]                (activation dtype)
//             dA[t, c, j] =  <dY_c[t], S_j[t]>  over the d features       (accumulator dtype)
// dS is written (`=`) or accumulated in place (`+=`, a depth stack's gradient buffer)
// per `accumulate_ds`; dA is always written (`=`), one row per token. Static (C, l)
// weights are per-token weights with a_token_stride = 0; the launcher sums dA over
// tokens for them.
//
// Thread mapping: a block is (threads_x, rows). Each row of threads (whole warps:
// threads_x is a multiple of 32) owns one token at a time and walks its d features in
// chunks of kVec contiguous elements, one chunk per thread per round; blocks stride
// over tokens. For each chunk a thread loops over the l slots, so every slot element is
// read once and every output element written once. A block loads the weights of its
// tokens into shared memory first (a warp-uniform broadcast read afterwards). Ways are
// processed kWays at a time (kWays = 1 for C = 1, else 4); for C > 4 the slots are read
// once per group of four ways, and later groups accumulate into dS.
//
// Slots are read kSlotBatch at a time (phases/slot_tile.cuh): the batch's loads are all
// issued before any is used. The backward reduces the batch's dA partials within each
// warp by one reduce-scatter and across the warps of a row through shared memory, in a
// fixed order: results are bit-identical run to run. The test whether a chunk is whole
// (inside the row) is made once per chunk and warp, not per slot.
//
// S is a table of slot pointers (SlotTable: one token stride, the slots anywhere); dS is
// one strided stack. Rows are shifted (phases/slot_tile.cuh): token t's chunks start at
// e = −h_t, so any d takes the 16-byte path, its cut first and last chunks checked.
//
// Assumptions (checked by the launcher):
//   1) features have unit stride in S, Y, dY and dS; every other stride is free;
//   2) with kVec > 1, every row of a token in S, Y, dY and dS has the same shift
//      (slot_rows_path, common/slots.h), so each whole chunk is one aligned 16-byte access;
//   3) 1 <= l <= kMaxSlots, C >= 1; A and dA are in the accumulator dtype.
#pragma once

#include "common/std.cuh"

#include "common/limits.h"
#include "common/reduce.cuh"
#include "common/tokens.cuh"
#include "common/vec.cuh"
#include "kernels/phases/slot_tile.cuh"

namespace crosslayer {

// Resident 256-thread blocks asked of the backward (at most 128 registers a thread):
// its slot loop keeps kSlotBatch 16-byte loads in flight per thread (S, or S and dS when
// dS accumulates), 32 KB per SM, enough to cover HBM latency without a third block
// (whose 80-register cap the 16-bit 4-way variant's batch does not fit).
constexpr int kDepthAggregateBwdMinBlocks = 2;
// The forward's: without it ptxas aims at 4 blocks (64 registers) and spills the 16-bit
// 4-way variant's batch; 3 blocks keep 48 KB of slot loads in flight per SM.
constexpr int kDepthAggregateFwdMinBlocks = 3;

struct DepthAggregateParams {
  using index_t = int64_t;
  index_t n_tokens;  // N
  index_t d;         // features (unit stride everywhere)
  int n_slots;       // l
  int n_ways;        // C
  // S: l slots of (N, d), activation dtype, as a pointer table.
  SlotTable s;
  // A (N, C, l), accumulator dtype; a_token_stride = 0 for static (C, l) weights.
  index_t a_token_stride, a_way_stride, a_slot_stride;
  // Y (C, N, d), forward output.
  index_t y_way_stride, y_token_stride;
  // dY (C, N, d), backward input.
  index_t dy_way_stride, dy_token_stride;
  // dS (l, N, d), backward output.
  index_t ds_slot_stride, ds_token_stride;
  // dA (N, C, l), accumulator dtype, one row per token.
  index_t da_token_stride, da_way_stride, da_slot_stride;
  bool accumulate_ds;  // dS += (true) or dS = (false)
  const void* __restrict__ a_ptr;
  void* __restrict__ y_ptr;
  const void* __restrict__ dy_ptr;
  void* __restrict__ ds_ptr;
  void* __restrict__ da_ptr;
};

// Stages the (rows × kWays × l) weight tile of tokens t0.. and ways c0.. in a_s
// (block-wide, between two barriers); missing tokens or ways read as zero.
template <int kWays, typename acc>
__device__ __forceinline__ void depth_aggregate_load_weights(const DepthAggregateParams& p,
                                                             acc* __restrict__ a_s, int64_t t0, int c0) {
  slot_tile_load_weights<kWays>(a_s, static_cast<const acc*>(p.a_ptr), p.a_token_stride, p.a_way_stride,
                                p.a_slot_stride, p.n_tokens, p.n_ways, p.n_slots, t0, c0);
}

// Forward pass of token t, ways c0 .. c0 + kWays, by the calling row of threads: every
// chunk of Y_c written (=). No shuffles or barriers.
template <typename T, int kVec, int kWays>
__device__ __forceinline__ void depth_aggregate_fwd_token(const DepthAggregateParams& p, int64_t t, int c0,
                                                          const acc_t<T>* __restrict__ a_row) {
  using acc = acc_t<T>;
  const TableRows<T> s_rows = table_rows<T>(p.s, t);
  T* __restrict__ Y = static_cast<T*>(p.y_ptr);
  for (int64_t e = threadIdx.x * kVec - row_shift<T, kVec>(s_rows.at(0)); e < p.d; e += blockDim.x * kVec) {
    acc y[kWays][kVec] = {};
    slot_aggregate<T, kVec, kWays>(s_rows, a_row, p.n_slots, e, p.d, y);
#pragma unroll
    for (int c = 0; c < kWays; ++c) {
      if (c0 + c < p.n_ways) {
        store_chunk<T, kVec>(Y + (c0 + c) * p.y_way_stride + t * p.y_token_stride, e, p.d, y[c]);
      }
    }
  }
}

template <typename T, int kVec, int kWays>
__global__ void __launch_bounds__(kTokenTileThreads, kDepthAggregateFwdMinBlocks)
    depth_aggregate_fwd_kernel(const __grid_constant__ DepthAggregateParams p) {
  using acc = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc* __restrict__ a_s = reinterpret_cast<acc*>(smem_raw);  // [rows][kWays][l]
  const int64_t rows = blockDim.y;
  for (int64_t t0 = first_token_tile(rows); t0 < p.n_tokens; t0 += token_tile_stride(rows)) {
    const int64_t t = t0 + threadIdx.y;
    for (int c0 = 0; c0 < p.n_ways; c0 += kWays) {
      __syncthreads();  // the previous tile's readers are done with a_s
      depth_aggregate_load_weights<kWays>(p, a_s, t0, c0);
      __syncthreads();
      if (t >= p.n_tokens) continue;
      depth_aggregate_fwd_token<T, kVec, kWays>(p, t, c0, a_s + threadIdx.y * kWays * p.n_slots);
    }
  }
}

// Backward of one chunk [e, e + kVec) of token t for ways c0 .. c0 + kWays, dY_c's chunk
// in g: for every slot, dS_j = (kAccumulate ? dS_j : 0) + Σ_c A[c, j]·dY_c written, and
// the warp's partials part[c·l + j] of <dY_c, S_j> accumulated (+=). Slots go kBatch at
// a time: the batch's S loads (and, accumulating, its dS loads) are issued before any
// is used, kSlotBatch 16-byte loads per thread in flight either way (an accumulating
// batch of kSlotBatch slots would not fit 128 registers with 16-bit 4-way data), and
// the batch's dot products are reduced together by one reduce-scatter (16 shuffles for
// 4 slots of 4 ways, against 80 for separate warp sums), lane groups writing one
// partial each. A cut chunk goes one slot at a time (slot_batch). Every lane of the
// warp must call it (kWhole: every lane's chunk lies inside the row, a warp-uniform
// test; otherwise the checked path, where lanes outside the row work on zeros and store
// nothing).
template <typename T, int kVec, int kWays, bool kWhole, bool kAccumulate>
__device__ __forceinline__ void depth_aggregate_bwd_chunk(const DepthAggregateParams& p, const TableRows<T>& s_rows,
                                                          const StridedRows<T>& ds_rows, int64_t e,
                                                          const Vec<T, kVec> (&g)[kWays],
                                                          const acc_t<T>* __restrict__ a_row,
                                                          acc_t<T>* __restrict__ part, int lane) {
  using acc = acc_t<T>;
  constexpr int kBatch = kWhole ? (kAccumulate ? kSlotBatch / 2 : kSlotBatch) : 1;
  constexpr int kDots = kBatch * kWays;  // [b][c]: slot j0 + b, way c
  constexpr int kLanesPerDot = kWarpSize / kDots;
  const int l = p.n_slots;
  for (int j0 = 0; j0 < l; j0 += kBatch) {
    Vec<T, kVec> s[kBatch];
    Vec<T, kVec> prior[kBatch];
    slot_batch_load<T, kVec, kWhole>(s_rows, j0, l, e, p.d, s);
    if constexpr (kAccumulate) {
      slot_batch_load<T, kVec, kWhole>(ds_rows, j0, l, e, p.d, prior);
    } else {
#pragma unroll
      for (int b = 0; b < kBatch; ++b) prior[b] = Vec<T, kVec>{};
    }
    acc dot[kDots];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const bool live = j0 + b < l;
      acc ds[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) ds[k] = to_acc(prior[b].v[k]);
#pragma unroll
      for (int c = 0; c < kWays; ++c) {
        const acc w = live ? a_row[c * l + j0 + b] : acc(0);
        acc dt = acc(0);
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          const acc gk = to_acc(g[c].v[k]);
          ds[k] += w * gk;
          dt += gk * to_acc(s[b].v[k]);
        }
        dot[b * kWays + c] = dt;
      }
      if (live) store_chunk_as<T, kVec, kWhole>(ds_rows.at(j0 + b), e, p.d, ds);
    }
    const acc sum = warp_reduce_scatter_pow2<kDots>(dot, lane);
    const int i = lane / kLanesPerDot;
    const int b = i / kWays;
    if (lane % kLanesPerDot == 0 && j0 + b < l) part[(i % kWays) * l + j0 + b] += sum;
  }
}

// Backward pass of token t, ways c0 .. c0 + kWays, by the calling row of threads: per
// chunk, dY_c's chunk read, then depth_aggregate_bwd_chunk, whole or checked by warp.
// Every lane of the row must call it (the chunk loop is warp-uniform).
template <typename T, int kVec, int kWays>
__device__ __forceinline__ void depth_aggregate_bwd_token(const DepthAggregateParams& p, int64_t t, int c0,
                                                          bool accumulate, const acc_t<T>* __restrict__ a_row,
                                                          acc_t<T>* __restrict__ part, int lane) {
  const TableRows<T> s_rows = table_rows<T>(p.s, t);
  const T* __restrict__ dY = static_cast<const T*>(p.dy_ptr);
  const StridedRows<T> ds_rows{static_cast<T*>(p.ds_ptr) + t * p.ds_token_stride, p.ds_slot_stride};
  const int64_t step = static_cast<int64_t>(blockDim.x) * kVec;
  for (int64_t e0 = -row_shift<T, kVec>(s_rows.at(0)); e0 < p.d; e0 += step) {
    const int64_t e = e0 + threadIdx.x * kVec;
    // dY stays in the activation dtype in registers (half the registers of fp32 for
    // 16-bit types) and is widened at each use.
    Vec<T, kVec> g[kWays];
#pragma unroll
    for (int c = 0; c < kWays; ++c) {
      g[c] = (c0 + c < p.n_ways)
                 ? load_chunk_raw<T, kVec>(dY + (c0 + c) * p.dy_way_stride + t * p.dy_token_stride, e, p.d)
                 : Vec<T, kVec>{};
    }
    const bool whole = warp_chunks_whole<kVec>(e0, p.d);
    if (whole && accumulate) {
      depth_aggregate_bwd_chunk<T, kVec, kWays, true, true>(p, s_rows, ds_rows, e, g, a_row, part, lane);
    } else if (whole) {
      depth_aggregate_bwd_chunk<T, kVec, kWays, true, false>(p, s_rows, ds_rows, e, g, a_row, part, lane);
    } else if (accumulate) {
      depth_aggregate_bwd_chunk<T, kVec, kWays, false, true>(p, s_rows, ds_rows, e, g, a_row, part, lane);
    } else {
      depth_aggregate_bwd_chunk<T, kVec, kWays, false, false>(p, s_rows, ds_rows, e, g, a_row, part, lane);
    }
  }
}

// dA[t, c0 + c, j] = Σ over the warps of token t's row of da_part, in warp order (=),
// for the tile's tokens (block-wide, after a barrier).
template <int kWays, typename acc>
__device__ __forceinline__ void depth_aggregate_write_da(const DepthAggregateParams& p,
                                                         const acc* __restrict__ da_part, int64_t t0, int c0,
                                                         int warps_per_row) {
  const int l = p.n_slots;
  acc* __restrict__ dA = static_cast<acc*>(p.da_ptr);
  for (int i = threadIdx.y * blockDim.x + threadIdx.x; i < blockDim.y * kWays * l; i += blockDim.x * blockDim.y) {
    const int r = i / (kWays * l);
    const int c = (i / l) % kWays;
    const int j = i % l;
    const int64_t tt = t0 + r;
    if (tt < p.n_tokens && c0 + c < p.n_ways) {
      acc sum = acc(0);
      for (int w = 0; w < warps_per_row; ++w) sum += da_part[((r * warps_per_row + w) * kWays + c) * l + j];
      dA[tt * p.da_token_stride + (c0 + c) * p.da_way_stride + j * p.da_slot_stride] = sum;
    }
  }
}

template <typename T, int kVec, int kWays>
__global__ void __launch_bounds__(kTokenTileThreads, kDepthAggregateBwdMinBlocks)
    depth_aggregate_bwd_kernel(const __grid_constant__ DepthAggregateParams p) {
  using acc = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int l = p.n_slots;
  const int rows = blockDim.y;
  const int warps_per_row = blockDim.x / kWarpSize;
  acc* __restrict__ a_s = reinterpret_cast<acc*>(smem_raw);  // [rows][kWays][l]
  acc* __restrict__ da_part = a_s + rows * kWays * l;         // [rows][warps_per_row][kWays][l]
  for (int64_t t0 = first_token_tile(rows); t0 < p.n_tokens; t0 += token_tile_stride(rows)) {
    const int64_t t = t0 + threadIdx.y;
    for (int c0 = 0; c0 < p.n_ways; c0 += kWays) {
      __syncthreads();  // the previous tile's readers are done with a_s and da_part
      depth_aggregate_load_weights<kWays>(p, a_s, t0, c0);
      for (int i = threadIdx.y * blockDim.x + threadIdx.x; i < rows * warps_per_row * kWays * l;
           i += blockDim.x * blockDim.y) {
        da_part[i] = acc(0);
      }
      __syncthreads();
      if (t < p.n_tokens) {  // uniform over the row (whole warps): the shuffles need every lane
        // The first group of ways writes dS unless the caller accumulates; later groups add.
        acc* __restrict__ part = da_part + (threadIdx.y * warps_per_row + threadIdx.x / kWarpSize) * kWays * l;
        depth_aggregate_bwd_token<T, kVec, kWays>(p, t, c0, p.accumulate_ds || c0 > 0,
                                                  a_s + threadIdx.y * kWays * l, part, threadIdx.x % kWarpSize);
      }
      __syncthreads();
      depth_aggregate_write_da<kWays>(p, da_part, t0, c0, warps_per_row);
    }
  }
}

}  // namespace crosslayer
