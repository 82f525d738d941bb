// stream_mix: the weighted sum of the streams (static HC's hc_pre, the mHC layer
// input), forward and backward. Phases: kernels/hc_tile.cuh.
//
// Math, per token t (N tokens, d features, n streams, 1 <= n <= 16):
//   forward   x    = Σ_i w_i·H_i
//   backward  dH_i = w_i·dx                  (activation dtype)
//             dw_i = <dx, H_i>               (accumulator dtype)
// Every output is written (`=`): x and dH once per element, dw as one row per token.
// Static w is per-token w with token stride 0; the launcher sums its gradient rows.
// With dh_ptr null the backward computes dw alone (stream_mix_dots: w not read, dH not
// written; the mHC pre folds its dH term into mhc_coeffs' dH pass).
//
// Registers: one input chunk live and kVec accumulators. kN: 2, 4, 8 exact, 0 generic.
#pragma once

#include "common/std.cuh"

#include "kernels/hc_tile.cuh"

namespace crosslayer {

struct StreamMixParams : HcTileParams {  // H
  // w (N, n), accumulator dtype: contiguous rows (column stride 1), or static w (n,) with
  // token stride 0 and its own element stride (e.g. a column of SHC's alpha, no copy).
  index_t w_token_stride, w_col_stride;
  // x (*lead, d), forward output; dx (*lead, d), backward input.
  TokenLayout x_tok;
  TokenLayout g_tok;
  // dH (*lead, n, d), backward output; dw (N, n) contiguous rows, accumulator dtype.
  TokenLayout dh_tok;
  index_t dh_stream_stride;
  bool accumulate_dh;  // dH += (true: another op's dH contribution is there) or dH = (false)
  const void* __restrict__ w_ptr;
  void* __restrict__ x_ptr;
  const void* __restrict__ g_ptr;
  void* __restrict__ dh_ptr;
  void* __restrict__ dw_ptr;
};

// Forward of token t by its row of threads: x = Σ_i w_row[i]·H_i over the d features
// (`=`). No barrier, no shuffle. Params by reference, as in hc_post.cuh.
template <typename T, int kVec, int kN, typename acc>
__device__ __forceinline__ void stream_mix_token(const StreamMixParams& p, int64_t t, const acc* __restrict__ w_row,
                                                 int n) {
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

// Backward of token t by its row of threads: dH_i = w_row[i]·dx (`=`, or `+=` with
// accumulate_dh: one rounding of the sum) over the d features, and part[i] += <dx, H_i> summed over the warp's chunks (lane 0 adds).
// Every lane of the row calls it: the chunk loop is warp-uniform (warp_sum).
template <typename T, int kVec, int kN, typename acc>
__device__ __forceinline__ void stream_mix_token_bwd(const StreamMixParams& p, int64_t t,
                                                     const acc* __restrict__ w_row, int n, acc* __restrict__ part,
                                                     int lane) {
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
        acc dot = acc(0);
#pragma unroll
        for (int v = 0; v < kVec; ++v) dot += to_acc(gv.v[v]) * to_acc(hv.v[v]);
        if (p.dh_ptr != nullptr) {  // uniform
          const acc w = w_row[i];
          acc dh[kVec];
#pragma unroll
          for (int v = 0; v < kVec; ++v) dh[v] = w * to_acc(gv.v[v]);
          if (p.accumulate_dh) {
            const Vec<T, kVec> prior = load_chunk_raw<T, kVec>(dh_tok + i * p.dh_stream_stride, e, p.d);
#pragma unroll
            for (int v = 0; v < kVec; ++v) dh[v] += to_acc(prior.v[v]);
          }
          store_chunk<T, kVec>(dh_tok + i * p.dh_stream_stride, e, p.d, dh);
        }
        dot = warp_sum(dot);
        if (lane == 0) part[i] += dot;
      }
    }
  }
}

template <typename T, int kVec, int kN>
__global__ void __launch_bounds__(kTokenTileThreads, kHcTileMinBlocks) stream_mix_fwd_kernel(const StreamMixParams p) {
  using acc = acc_t<T>;
  const int n = kN > 0 ? kN : p.n;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc* __restrict__ w_s = reinterpret_cast<acc*>(smem_raw);  // [rows][n]
  const acc* __restrict__ w = static_cast<const acc*>(p.w_ptr);
  const int64_t rows = blockDim.y;
  for (int64_t t0 = first_token_tile(rows); t0 < p.n_tokens; t0 += token_tile_stride(rows)) {
    hc_tile_stage<false>(w_s, t0, p.n_tokens, n, n, w, p.w_token_stride, p.w_col_stride, w, p.w_token_stride, w_s, 0);
    const int64_t t = t0 + threadIdx.y;
    if (t >= p.n_tokens) continue;
    stream_mix_token<T, kVec, kN>(p, t, w_s + threadIdx.y * n, n);
  }
}

template <typename T, int kVec, int kN>
__global__ void __launch_bounds__(kTokenTileThreads, kHcTileMinBlocks) stream_mix_bwd_kernel(const StreamMixParams p) {
  using acc = acc_t<T>;
  const int n = kN > 0 ? kN : p.n;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int rows = blockDim.y;
  const int warps_per_row = blockDim.x / kWarpSize;
  acc* __restrict__ w_s = reinterpret_cast<acc*>(smem_raw);  // [rows][n]
  acc* __restrict__ part_s = w_s + rows * n;                  // [rows][warps][n]
  const acc* __restrict__ w = static_cast<const acc*>(p.w_ptr);
  const int w_cols = w != nullptr ? n : 0;  // stream_mix_dots: no w
  for (int64_t t0 = first_token_tile(rows); t0 < p.n_tokens; t0 += token_tile_stride(rows)) {
    hc_tile_stage<true>(w_s, t0, p.n_tokens, w_cols, w_cols, w, p.w_token_stride, p.w_col_stride, w, p.w_token_stride, part_s,
                        rows * warps_per_row * n);
    const int64_t t = t0 + threadIdx.y;
    if (t < p.n_tokens) {  // warp-uniform: rows are whole warps
      acc* __restrict__ part = part_s + (threadIdx.y * warps_per_row + threadIdx.x / kWarpSize) * n;
      stream_mix_token_bwd<T, kVec, kN>(p, t, w_s + threadIdx.y * n, n, part, threadIdx.x % kWarpSize);
    }
    __syncthreads();
    hc_tile_write_dots(part_s, t0, p.n_tokens, warps_per_row, n, n, [](int j) { return j; },
                       static_cast<acc*>(p.dw_ptr));
  }
}

}  // namespace crosslayer
