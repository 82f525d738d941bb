// hc_tile: the token-tile phases the HC mixing kernels compose (hc_post, stream_mix, and
// hc_boundary's static-pre kernels: a post fused with the next connection's stream_mix).
//
// Thread mapping: a block is (threads_x, rows). Each row of threads (whole warps:
// threads_x is a multiple of 32) owns one token at a time and walks its d features in
// chunks of kVec contiguous elements, one chunk per thread per round; blocks
// grid-stride over tokens, `rows` tokens per tile. The tile's coefficients are staged
// in shared memory first (hc_tile_stage); afterwards every read of them is a
// warp-uniform broadcast (one address per warp), so there are no bank conflicts.
//
// Registers: chunks are kept as loaded (Vec<T, kVec>: 16 bytes, 4 registers, whatever
// T) and widened at each use; sums run in acc_t<T> (float; double for double). n is a
// template parameter kN for the exact instantiations; kN = 0 is the generic one for
// every other n in 1..16: loops run to kMaxStreams, fully unrolled and predicated on
// `i < n`, so register arrays are only ever indexed by constants (a dynamically
// indexed array would live in local memory).
//
// Reductions (coefficient gradients): per chunk round each dot is reduced across the
// warp by shuffles and lane 0 adds it to the warp's own slot in shared memory; after
// the token the warps' slots are summed in warp order (hc_tile_write_dots). The order of
// every addition is fixed: results are bit-identical run to run.
//
// Assumptions (checked by the launchers):
//   1) features have unit stride in every activation tensor; token strides are
//      described by a TokenLayout, stream strides are free;
//   2) with kVec > 1, every base pointer is 16-byte aligned and every token and stream
//      stride is a multiple of kVec elements, so each full chunk is one 16-byte access;
//   3) 1 <= n <= kMaxStreams; coefficients are in the accumulator dtype, one contiguous
//      row per token (token stride 0 for static coefficients).
#pragma once

#include "common/std.cuh"

#include "common/limits.h"
#include "common/reduce.cuh"
#include "common/tokens.cuh"
#include "common/vec.cuh"

namespace crosslayer {

// Resident blocks asked of every tile kernel: 1, so that ptxas gives each variant the
// registers it needs (a higher minimum makes it cap registers and spill in the generic
// n <= 16 backward).
constexpr int kHcTileMinBlocks = 1;

// The streams every tile kernel reads: H (*lead, n, d) in the activation dtype, tokens
// through h_tok, streams h_stream_stride apart (features unit stride).
struct HcTileParams {
  using index_t = int64_t;
  index_t n_tokens;  // N
  index_t d;         // features (unit stride everywhere)
  int n;             // streams
  TokenLayout h_tok;
  index_t h_stream_stride;
  const void* __restrict__ h_ptr;
};

// Starts tile t0 (every thread of the block calls it: two barriers). Waits until the
// previous tile's readers are done with shared memory, copies `per_row` coefficients of
// each token t0 + r (r < rows) into coef_s (`=`): the first `split` from `first` (row
// stride s0, column stride c0), the rest from `second` (row stride s1, unit column
// stride), tokens past the end as zero; sets
// the `n_part` partial slots at part_s to zero (backward kernels, kPartials; compiled out
// otherwise, where it would cost registers); and waits until all of it is visible.
template <bool kPartials, typename acc>
__device__ __forceinline__ void hc_tile_stage(acc* __restrict__ coef_s, int64_t t0, int64_t n_tokens,
                                              int per_row, int split, const acc* __restrict__ first,
                                              int64_t s0, int64_t c0, const acc* __restrict__ second, int64_t s1,
                                              acc* __restrict__ part_s, int n_part) {
  __syncthreads();
  const int total = blockDim.y * per_row;
  for (int i = threadIdx.y * blockDim.x + threadIdx.x; i < total; i += blockDim.x * blockDim.y) {
    const int r = i / per_row;
    const int j = i % per_row;
    const int64_t t = t0 + r;
    acc v = acc(0);
    if (t < n_tokens) v = j < split ? first[t * s0 + j * c0] : second[t * s1 + (j - split)];
    coef_s[i] = v;
  }
  if constexpr (kPartials) {
    for (int i = threadIdx.y * blockDim.x + threadIdx.x; i < n_part; i += blockDim.x * blockDim.y) part_s[i] = acc(0);
  }
  __syncthreads();
}

// Loads this thread's chunk at feature e of the n streams of one token (stream i at
// tok + i·stream_stride) into h[0..n).
template <typename T, int kVec, int kMax>
__device__ __forceinline__ void load_stream_chunks(Vec<T, kVec> (&h)[kMax], const T* __restrict__ tok,
                                                   int64_t stream_stride, int n, int64_t e, int64_t d) {
#pragma unroll
  for (int i = 0; i < kMax; ++i) {
    if (i < n) h[i] = load_chunk_raw<T, kVec>(tok + i * stream_stride, e, d);
  }
}

// Finishes a backward tile, after a barrier that makes every warp's partials visible:
// sums the per-warp partials of the tile's dots in warp order and writes one row per
// token (`=`): `cols` values, value j from partial slot slot_of(j) (negative: a
// structural zero), to out + t·cols + j.
template <typename acc, typename SlotOf>
__device__ __forceinline__ void hc_tile_write_dots(const acc* __restrict__ part, int64_t t0, int64_t n_tokens,
                                                   int warps_per_row, int dots_per_warp, int cols,
                                                   SlotOf slot_of, acc* __restrict__ out) {
  const int total = blockDim.y * cols;
  for (int i = threadIdx.y * blockDim.x + threadIdx.x; i < total; i += blockDim.x * blockDim.y) {
    const int r = i / cols;
    const int j = i % cols;
    const int64_t t = t0 + r;
    if (t >= n_tokens) continue;
    const int slot = slot_of(j);
    acc sum = acc(0);
    if (slot >= 0) {
      for (int w = 0; w < warps_per_row; ++w) sum += part[(r * warps_per_row + w) * dots_per_warp + slot];
    }
    out[t * cols + j] = sum;
  }
}

}  // namespace crosslayer
