// Phases of the depth-slot kernels (depth_aggregate, depth_aggregate_qkv_norm): a row of
// threads (whole warps) owns one token t and walks its d features in chunks of kVec
// contiguous elements; for each chunk a thread loops over the l slots S_j. The weights
// of the tile's tokens are staged in shared memory, [row][way][slot], and read as
// warp-uniform broadcasts.
#pragma once

#include <cstdint>

#include "common/vec.cuh"

namespace crosslayer {

// Copies the (rows × kWays × l) weight tile of tokens t0 + r and ways c0 + c from A
// (strides in elements; token stride 0: static) into a_s; missing tokens or ways
// (c0 + c >= n_ways) read as zero. Strided over the block's threads: call between two
// __syncthreads.
template <int kWays, typename acc>
__device__ __forceinline__ void slot_tile_load_weights(acc* __restrict__ a_s, const acc* __restrict__ A,
                                                       int64_t token_stride, int64_t way_stride,
                                                       int64_t slot_stride, int64_t n_tokens, int n_ways,
                                                       int l, int64_t t0, int c0) {
  const int per_row = kWays * l;
  const int n = blockDim.y * per_row;
  for (int i = threadIdx.y * blockDim.x + threadIdx.x; i < n; i += blockDim.x * blockDim.y) {
    const int r = i / per_row;
    const int c = (i / l) % kWays;
    const int j = i % l;
    const int64_t t = t0 + r;
    a_s[i] = (t < n_tokens && c0 + c < n_ways) ? A[t * token_stride + (c0 + c) * way_stride + j * slot_stride]
                                                : acc(0);
  }
}

// y[c] += Σ_j a_row[c·l + j]·S_j[e, e + kVec) for c < kWays, over the l slots of one
// token (s_tok: slot 0's row; reads cut at d, zero past it). Per thread, no shuffles.
template <typename T, int kVec, int kWays>
__device__ __forceinline__ void slot_aggregate(const T* __restrict__ s_tok, int64_t slot_stride,
                                               const acc_t<T>* __restrict__ a_row, int l, int64_t e, int64_t d,
                                               acc_t<T> (&y)[kWays][kVec]) {
  using acc = acc_t<T>;
#pragma unroll 4
  for (int j = 0; j < l; ++j) {
    acc s[kVec];
    load_chunk<T, kVec>(s_tok + j * slot_stride, e, d, s);
#pragma unroll
    for (int c = 0; c < kWays; ++c) {
      const acc w = a_row[c * l + j];
#pragma unroll
      for (int k = 0; k < kVec; ++k) y[c][k] += w * s[k];
    }
  }
}

}  // namespace crosslayer
