// The token tile of the HC stream-mixing kernels (hc_post, stream_mix; a fused hc_post
// + hc_pre kernel reuses it): block shape, coefficient staging, and the per-warp dot
// partials of the backward written as one row per token.
//
// Thread mapping: a block is (threads_x, rows). Each row of threads (whole warps:
// threads_x is a multiple of 32) owns one token at a time and walks its d features in
// chunks of kVec contiguous elements, one chunk per thread per round; blocks grid-stride
// over tokens, `rows` tokens per tile (t0 = the tile's first token). The tile's
// coefficients are staged in shared memory first; afterwards every read of them is a
// warp-uniform broadcast (one address per warp), so there are no bank conflicts.
//
// Backward dots: per chunk round each partial is reduced across the warp by shuffles
// and lane 0 adds it to the warp's own slot in shared memory (part[row][warp][slot]);
// after the token the warps' slots are summed in warp order. The order of every
// addition is fixed: results are bit-identical run to run.
#pragma once

#include <cstdint>

#include "common/reduce.cuh"

namespace crosslayer {

constexpr int kHcStreamTileThreads = 256;
constexpr int kHcStreamTileSmemBudget = 48 * 1024;
// Resident blocks asked of every kernel: 1, stated explicitly (with the thread bound
// alone ptxas may pick a register target that makes the backward variants spill; with
// a minimum of 1 it uses what it needs).
constexpr int kHcStreamTileMinBlocks = 1;

// Block shape for a launch: threads_x covers the feature chunks of one token (a
// multiple of 32, at most 256); rows = tokens per tile, filling 256 threads when d is
// small, within the shared-memory budget. Shared memory per row: `coef_per_row`
// coefficients plus, in the backward, `dots_per_warp` partials per warp.
struct HcStreamTile {
  int threads_x;
  int rows;
  int smem_bytes;
};

inline HcStreamTile hc_stream_tile(int64_t n_tokens, int64_t d, int vec, int coef_per_row,
                                   int dots_per_warp, int acc_bytes) {
  const int64_t chunks = (d + vec - 1) / vec;
  const int64_t rounded = ((chunks + 31) / 32) * 32;
  HcStreamTile b;
  b.threads_x = static_cast<int>(rounded < kHcStreamTileThreads ? rounded : kHcStreamTileThreads);
  if (b.threads_x < 32) b.threads_x = 32;
  const int warps_per_row = b.threads_x / 32;
  const int row_bytes = acc_bytes * (coef_per_row + warps_per_row * dots_per_warp);
  int rows = kHcStreamTileThreads / b.threads_x;
  if (rows > kHcStreamTileSmemBudget / row_bytes) rows = kHcStreamTileSmemBudget / row_bytes;
  if (rows > n_tokens) rows = static_cast<int>(n_tokens);
  if (rows < 1) rows = 1;
  b.rows = rows;
  b.smem_bytes = rows * row_bytes;
  return b;
}

// Copies `per_row` coefficients of each token t0 + r of the tile into dst[r][per_row]
// (r < rows): the first `split` from `first` (row stride s0), the rest from `second`
// (row stride s1; a stride 0 row is static). Tokens past the end read as zero. Strided
// over the block's threads: call between two __syncthreads.
template <typename acc>
__device__ __forceinline__ void hc_stream_tile_load_coefs(acc* __restrict__ dst, int64_t t0,
                                                          int64_t n_tokens, int per_row, int split,
                                                          const acc* __restrict__ first, int64_t s0,
                                                          const acc* __restrict__ second, int64_t s1) {
  const int total = blockDim.y * per_row;
  for (int i = threadIdx.y * blockDim.x + threadIdx.x; i < total; i += blockDim.x * blockDim.y) {
    const int r = i / per_row;
    const int j = i % per_row;
    const int64_t t = t0 + r;
    acc v = acc(0);
    if (t < n_tokens) v = j < split ? first[t * s0 + j] : second[t * s1 + (j - split)];
    dst[i] = v;
  }
}

// part[i] = 0 for i < count, strided over the block's threads (between two barriers).
template <typename acc>
__device__ __forceinline__ void hc_stream_tile_zero(acc* __restrict__ part, int count) {
  for (int i = threadIdx.y * blockDim.x + threadIdx.x; i < count; i += blockDim.x * blockDim.y) {
    part[i] = acc(0);
  }
}

// lane 0 of the warp adds the warp-wide sum of `dot` to *slot. Every lane must call it
// (a warp_sum of shuffles).
template <typename acc>
__device__ __forceinline__ void hc_stream_tile_add_dot(acc dot, acc* __restrict__ slot, int lane) {
  dot = warp_sum(dot);
  if (lane == 0) *slot += dot;
}

// Sums the per-warp partials part[row][warp][dots_per_warp] of the tile in warp order
// and writes (=) one row per token: `cols` values, where value j comes from partial slot
// slot_of(j) (negative: a structural zero), to out + t·cols + j. Strided over the
// block's threads; call after a barrier that follows the last partial's update.
template <typename acc, typename SlotOf>
__device__ __forceinline__ void hc_stream_tile_write_dots(const acc* __restrict__ part, int64_t t0,
                                                          int64_t n_tokens, int warps_per_row,
                                                          int dots_per_warp, int cols, SlotOf slot_of,
                                                          acc* __restrict__ out) {
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
