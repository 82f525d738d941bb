// stream_mix: the streams H mixed into one layer input with per-stream weights w (static
// HC's pre-mix, mHC's pre-mix with w = alpha[:, 0]).
//
// Math, per token t (N tokens, d features, n streams, 1 <= n <= 16):
//   forward   x    = Σ_i w_i·H_i                         (activation dtype)
//   backward  dH_i = w_i·dx                              (activation dtype)
//             dw_i = <dx, H_i>                           (accumulator dtype)
// Every output is written (`=`), never accumulated: x and dH once per element, dw as one
// row per token. A static w is a per-token one with token stride 0; the launcher sums
// its gradient rows over tokens.
//
// Thread mapping, coefficient staging and the backward's dot partials: the HC stream
// tile (kernels/phases/hc_stream_tile.cuh). One input chunk live a thread (kept as
// loaded, widened at each use), kVec accumulators. n is a template parameter kN for
// n = 2, 4, 8; kN = 0 is the generic instantiation for every other n in 1..16 (loops to
// kMaxStreams, unrolled and predicated on `i < n`: register arrays are indexed by
// constants only).
//
// Assumptions (checked by the launcher):
//   1) features have unit stride in every activation tensor; token strides are
//      described by a TokenLayout, stream strides are free;
//   2) with kVec > 1, every base pointer is 16-byte aligned and every token and stream
//      stride is a multiple of kVec elements, so each full chunk is one 16-byte access;
//   3) 1 <= n <= kMaxStreams; w (n) is in the accumulator dtype, one contiguous row per
//      token; dw rows likewise.
#pragma once

#include <cstdint>

#include "common/limits.h"
#include "common/reduce.cuh"
#include "common/tokens.cuh"
#include "common/vec.cuh"
#include "kernels/phases/hc_stream_tile.cuh"

namespace crosslayer {

struct StreamMixParams {
  using index_t = int64_t;
  index_t n_tokens;  // N
  index_t d;         // features (unit stride everywhere)
  int n;             // streams
  // H (*lead, n, d), activation dtype.
  TokenLayout h_tok;
  index_t h_stream_stride;
  // w (N, n), accumulator dtype, contiguous rows; token stride 0 for static w.
  index_t w_token_stride;
  // x (*lead, d), forward output; dx (*lead, d), backward input.
  TokenLayout x_tok;
  TokenLayout g_tok;
  // dH (*lead, n, d), backward output; dw (N, n) contiguous rows, accumulator dtype.
  TokenLayout dh_tok;
  index_t dh_stream_stride;
  const void* __restrict__ h_ptr;
  const void* __restrict__ w_ptr;
  void* __restrict__ x_ptr;
  const void* __restrict__ g_ptr;
  void* __restrict__ dh_ptr;
  void* __restrict__ dw_ptr;
};

// Stages the tile's w rows in w_s[rows][n] (block-wide, between two barriers).
template <typename acc>
__device__ __forceinline__ void stream_mix_load_weights(const StreamMixParams& p, acc* __restrict__ w_s,
                                                        int64_t t0, int n) {
  const acc* __restrict__ w = static_cast<const acc*>(p.w_ptr);
  hc_stream_tile_load_coefs(w_s, t0, p.n_tokens, n, n, w, p.w_token_stride, w, p.w_token_stride);
}

// Forward pass of token t by the calling row of threads: every chunk of x written (=).
// No shuffles or barriers.
template <typename T, int kVec, int kN>
__device__ __forceinline__ void stream_mix_fwd_token(const StreamMixParams& p, int64_t t, int n,
                                                     const acc_t<T>* __restrict__ w_row) {
  using acc = acc_t<T>;
  constexpr int kMax = kN > 0 ? kN : kMaxStreams;
  const T* __restrict__ h_tok = static_cast<const T*>(p.h_ptr) + p.h_tok.offset(t);
  T* __restrict__ x_tok = static_cast<T*>(p.x_ptr) + p.x_tok.offset(t);
  for (int64_t e = threadIdx.x * kVec; e < p.d; e += blockDim.x * kVec) {
    acc x[kVec];
#pragma unroll
    for (int v = 0; v < kVec; ++v) x[v] = acc(0);
#pragma unroll
    for (int i = 0; i < kMax; ++i) {
      if (i < n) {
        const Vec<T, kVec> hv = load_chunk_raw<T, kVec>(h_tok + i * p.h_stream_stride, e, p.d);
        const acc w = w_row[i];
#pragma unroll
        for (int v = 0; v < kVec; ++v) x[v] += w * to_acc(hv.v[v]);
      }
    }
    store_chunk<T, kVec>(x_tok, e, p.d, x);
  }
}

// Backward pass of token t by the calling row of threads: every chunk of dH_i written
// (=); the warp's partials part[i] of dw_i accumulated (+=). Every lane of the row must
// call it (warp-uniform chunk loop; lanes past the row end work on zeros).
template <typename T, int kVec, int kN>
__device__ __forceinline__ void stream_mix_bwd_token(const StreamMixParams& p, int64_t t, int n,
                                                     const acc_t<T>* __restrict__ w_row,
                                                     acc_t<T>* __restrict__ part, int lane) {
  using acc = acc_t<T>;
  constexpr int kMax = kN > 0 ? kN : kMaxStreams;
  const T* __restrict__ h_tok = static_cast<const T*>(p.h_ptr) + p.h_tok.offset(t);
  const T* __restrict__ g_tok = static_cast<const T*>(p.g_ptr) + p.g_tok.offset(t);
  T* __restrict__ dh_tok = static_cast<T*>(p.dh_ptr) + p.dh_tok.offset(t);
  for (int64_t e0 = 0; e0 < p.d; e0 += static_cast<int64_t>(blockDim.x) * kVec) {
    const int64_t e = e0 + threadIdx.x * kVec;
    const Vec<T, kVec> gv = load_chunk_raw<T, kVec>(g_tok, e, p.d);
#pragma unroll
    for (int i = 0; i < kMax; ++i) {
      if (i < n) {
        const Vec<T, kVec> hv = load_chunk_raw<T, kVec>(h_tok + i * p.h_stream_stride, e, p.d);
        const acc w = w_row[i];
        acc dh[kVec];
        acc dot = acc(0);
#pragma unroll
        for (int v = 0; v < kVec; ++v) {
          const acc g = to_acc(gv.v[v]);
          dh[v] = w * g;
          dot += g * to_acc(hv.v[v]);
        }
        store_chunk<T, kVec>(dh_tok + i * p.dh_stream_stride, e, p.d, dh);
        hc_stream_tile_add_dot(dot, part + i, lane);
      }
    }
  }
}

template <typename T, int kVec, int kN>
__global__ void __launch_bounds__(kHcStreamTileThreads, kHcStreamTileMinBlocks)
    stream_mix_fwd_kernel(const StreamMixParams p) {
  using acc = acc_t<T>;
  const int n = kN > 0 ? kN : p.n;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc* __restrict__ w_s = reinterpret_cast<acc*>(smem_raw);  // [rows][n]
  const int64_t rows = blockDim.y;
  for (int64_t t0 = blockIdx.x * rows; t0 < p.n_tokens; t0 += gridDim.x * rows) {
    __syncthreads();  // the previous tile's readers are done with w_s
    stream_mix_load_weights(p, w_s, t0, n);
    __syncthreads();
    const int64_t t = t0 + threadIdx.y;
    if (t >= p.n_tokens) continue;
    stream_mix_fwd_token<T, kVec, kN>(p, t, n, w_s + threadIdx.y * n);
  }
}

template <typename T, int kVec, int kN>
__global__ void __launch_bounds__(kHcStreamTileThreads, kHcStreamTileMinBlocks)
    stream_mix_bwd_kernel(const StreamMixParams p) {
  using acc = acc_t<T>;
  const int n = kN > 0 ? kN : p.n;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int rows = blockDim.y;
  const int warps_per_row = blockDim.x / kWarpSize;
  acc* __restrict__ w_s = reinterpret_cast<acc*>(smem_raw);  // [rows][n]
  acc* __restrict__ part_s = w_s + rows * n;                  // [rows][warps][n]
  for (int64_t t0 = static_cast<int64_t>(blockIdx.x) * rows; t0 < p.n_tokens;
       t0 += static_cast<int64_t>(gridDim.x) * rows) {
    __syncthreads();  // the previous tile's readers are done with w_s and part_s
    stream_mix_load_weights(p, w_s, t0, n);
    hc_stream_tile_zero(part_s, rows * warps_per_row * n);
    __syncthreads();
    const int64_t t = t0 + threadIdx.y;
    if (t < p.n_tokens) {  // uniform over the row (whole warps): the shuffles need every lane
      acc* __restrict__ part = part_s + (threadIdx.y * warps_per_row + threadIdx.x / kWarpSize) * n;
      stream_mix_bwd_token<T, kVec, kN>(p, t, n, w_s + threadIdx.y * n, part, threadIdx.x % kWarpSize);
    }
    __syncthreads();
    hc_stream_tile_write_dots(part_s, t0, p.n_tokens, warps_per_row, n, n, [](int j) { return j; },
                              static_cast<acc*>(p.dw_ptr));
  }
}

}  // namespace crosslayer
