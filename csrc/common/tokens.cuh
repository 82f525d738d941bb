// Token addressing for tensors of shape (*lead, ..., d) whose leading (token) dims do
// not collapse to one stride, e.g. the "streams folded into batch" layout of the
// hyper-connections package, H = h.view(b, n, t, d).permute(0, 2, 1, 3): tokens (b, t)
// have strides (n·t·d, d) and no single stride walks them.
//
// Every token dim layout the launchers accept collapses to at most two dims,
// token t = t_outer·inner + t_inner, element offset t_outer·outer_stride +
// t_inner·inner_stride. One integer division per token, none per element.
#pragma once

#include "common/std.cuh"

#ifdef __CUDACC__
#define CL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CL_HOST_DEVICE inline
#endif

namespace crosslayer {

struct TokenLayout {
  int64_t inner = 1;         // size of the inner token dim (>= 1)
  int64_t outer_stride = 0;  // elements between consecutive outer indices
  int64_t inner_stride = 0;  // elements between consecutive inner indices

  CL_HOST_DEVICE int64_t offset(int64_t t) const {
    return (t / inner) * outer_stride + (t % inner) * inner_stride;
  }
};

// Collapses `ndim` token dims (sizes, strides in elements) into a TokenLayout.
// Size-1 dims are dropped and dim i merges into dim i+1 when
// stride[i] == size[i+1]·stride[i+1]. Returns false when more than two dims remain
// (the caller then copies the tensor to a contiguous one). Sizes are >= 1: launchers
// return before reaching here for empty tensors.
inline bool collapse_token_dims(const int64_t* sizes, const int64_t* strides, int ndim,
                                TokenLayout* out) {
  int64_t sz[2] = {1, 1};
  int64_t st[2] = {0, 0};
  int kept = 0;  // dims kept so far, innermost last
  // Walk from the innermost dim outwards, merging where the strides allow.
  int64_t cur_size = 1, cur_stride = 0;
  bool have = false;
  for (int i = ndim - 1; i >= 0; --i) {
    if (sizes[i] == 1) continue;
    if (!have) {
      cur_size = sizes[i];
      cur_stride = strides[i];
      have = true;
    } else if (strides[i] == cur_size * cur_stride) {
      cur_size *= sizes[i];
    } else {
      if (kept == 1) return false;  // a third dim would be needed
      sz[1] = cur_size;
      st[1] = cur_stride;
      kept = 1;
      cur_size = sizes[i];
      cur_stride = strides[i];
    }
  }
  TokenLayout l;
  if (!have) {  // every token dim has size 1 (or there are none): one token
    l.inner = 1;
    l.outer_stride = 0;
    l.inner_stride = 0;
  } else if (kept == 0) {  // one dim: all tokens on the inner index
    l.inner = cur_size;
    l.inner_stride = cur_stride;
    l.outer_stride = cur_size * cur_stride;
  } else {  // two dims: cur is the outer one
    l.inner = sz[1];
    l.inner_stride = st[1];
    l.outer_stride = cur_stride;
  }
  *out = l;
  return true;
}

// Block shape of the token-tile kernels (hc_post, stream_mix, depth_aggregate): threads_x
// covers the feature chunks of one token (d features, vec a chunk; a multiple of 32, at
// most 256); rows = tokens a tile, filling 256 threads when d is small, within 48 KB of
// shared memory at row_bytes + warp_bytes per warp of the row.
constexpr int kTokenTileThreads = 256;

struct TokenTileBlock {
  int threads_x;
  int rows;
  int smem_bytes;
};

inline TokenTileBlock token_tile_block(int64_t n_tokens, int64_t d, int vec, int row_bytes, int warp_bytes) {
  constexpr int kSmemBudget = 48 * 1024;
  const int64_t chunks = (d + vec - 1) / vec;
  const int64_t rounded = ((chunks + 31) / 32) * 32;
  TokenTileBlock b;
  b.threads_x = static_cast<int>(rounded < kTokenTileThreads ? (rounded < 32 ? 32 : rounded) : kTokenTileThreads);
  const int bytes = row_bytes + (b.threads_x / 32) * warp_bytes;
  int rows = kTokenTileThreads / b.threads_x;
  if (rows > kSmemBudget / bytes) rows = kSmemBudget / bytes;
  if (rows > n_tokens) rows = static_cast<int>(n_tokens);
  if (rows < 1) rows = 1;
  b.rows = rows;
  b.smem_bytes = rows * bytes;
  return b;
}

// Grid-stride tiles of `rows` tokens: this block's first tile start and the stride
// between its tiles, in 64 bits (blockIdx.x·rows may not fit 32). Kernels loop over
// them with a plain `for`, not a lambda body (ptxas then spills some locals the lambda
// captures: bench/NOTES.md, issue 12).
__device__ __forceinline__ int64_t first_token_tile(int64_t rows) { return static_cast<int64_t>(blockIdx.x) * rows; }
__device__ __forceinline__ int64_t token_tile_stride(int64_t rows) { return static_cast<int64_t>(gridDim.x) * rows; }

}  // namespace crosslayer
