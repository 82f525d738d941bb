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
// The backward reduces dA within each warp by shuffles and across the warps of a row
// through shared memory in a fixed order: results are bit-identical run to run.
//
// Assumptions (checked by the launcher):
//   1) features have unit stride in S, Y, dY and dS; every other stride is free;
//   2) with kVec > 1, every base pointer is 16-byte aligned and every stride is a
//      multiple of kVec elements, so each full chunk is one 16-byte access;
//   3) 1 <= l <= kMaxSlots, C >= 1; A and dA are in the accumulator dtype.
#pragma once

#include <cstdint>

#include "common/limits.h"
#include "common/reduce.cuh"
#include "common/tokens.cuh"
#include "common/vec.cuh"
#include "kernels/phases/slot_tile.cuh"

namespace crosslayer {

// Resident 256-thread blocks asked of the backward (at most 128 registers a thread):
// its unrolled slot loop keeps up to four 16-byte loads (S_j, dS_j for two slots) in
// flight per thread, 32 KB per SM, enough to cover HBM latency; more blocks would cap
// the registers below what the 16-bit 4-way variant needs without spilling.
constexpr int kDepthAggregateBwdMinBlocks = 2;

struct DepthAggregateParams {
  using index_t = int64_t;
  index_t n_tokens;  // N
  index_t d;         // features (unit stride everywhere)
  int n_slots;       // l
  int n_ways;        // C
  // S (l, N, d), activation dtype.
  index_t s_slot_stride, s_token_stride;
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
  const void* __restrict__ s_ptr;
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
  const T* __restrict__ s_tok = static_cast<const T*>(p.s_ptr) + t * p.s_token_stride;
  T* __restrict__ Y = static_cast<T*>(p.y_ptr);
  for (int64_t e = threadIdx.x * kVec; e < p.d; e += blockDim.x * kVec) {
    acc y[kWays][kVec] = {};
    slot_aggregate<T, kVec, kWays>(s_tok, p.s_slot_stride, a_row, p.n_slots, e, p.d, y);
#pragma unroll
    for (int c = 0; c < kWays; ++c) {
      if (c0 + c < p.n_ways) {
        store_chunk<T, kVec>(Y + (c0 + c) * p.y_way_stride + t * p.y_token_stride, e, p.d, y[c]);
      }
    }
  }
}

template <typename T, int kVec, int kWays>
__global__ void __launch_bounds__(kTokenTileThreads)
    depth_aggregate_fwd_kernel(const DepthAggregateParams p) {
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

// Backward pass of token t, ways c0 .. c0 + kWays, by the calling row of threads: per
// chunk, dS_j = (accumulate ? dS_j : 0) + Σ_c A[c, j]·dY_c written for every slot, and
// the warp's partials part[c·l + j] of <dY_c, S_j> accumulated (+=, lane 0). Every lane
// of the row must call it (the chunk loop is warp-uniform; lanes past the row end work
// on zeros).
template <typename T, int kVec, int kWays>
__device__ __forceinline__ void depth_aggregate_bwd_token(const DepthAggregateParams& p, int64_t t, int c0,
                                                          bool accumulate, const acc_t<T>* __restrict__ a_row,
                                                          acc_t<T>* __restrict__ part, int lane) {
  using acc = acc_t<T>;
  const int l = p.n_slots;
  const T* __restrict__ s_tok = static_cast<const T*>(p.s_ptr) + t * p.s_token_stride;
  const T* __restrict__ dY = static_cast<const T*>(p.dy_ptr);
  T* __restrict__ ds_tok = static_cast<T*>(p.ds_ptr) + t * p.ds_token_stride;
  for (int64_t e0 = 0; e0 < p.d; e0 += static_cast<int64_t>(blockDim.x) * kVec) {
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
#pragma unroll 2
    for (int j = 0; j < l; ++j) {
      acc s[kVec];
      load_chunk<T, kVec>(s_tok + j * p.s_slot_stride, e, p.d, s);
      acc ds[kVec];
      T* __restrict__ ds_row = ds_tok + j * p.ds_slot_stride;
      if (accumulate) {
        load_chunk<T, kVec>(ds_row, e, p.d, ds);
      } else {
#pragma unroll
        for (int k = 0; k < kVec; ++k) ds[k] = acc(0);
      }
      acc dot[kWays];
#pragma unroll
      for (int c = 0; c < kWays; ++c) {
        const acc w = a_row[c * l + j];
        dot[c] = acc(0);
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          const acc gk = to_acc(g[c].v[k]);
          ds[k] += w * gk;
          dot[c] += gk * s[k];
        }
      }
      store_chunk<T, kVec>(ds_row, e, p.d, ds);
#pragma unroll
      for (int c = 0; c < kWays; ++c) dot[c] = warp_sum(dot[c]);
      if (lane == 0) {
#pragma unroll
        for (int c = 0; c < kWays; ++c) part[c * l + j] += dot[c];
      }
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
    depth_aggregate_bwd_kernel(const DepthAggregateParams p) {
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
