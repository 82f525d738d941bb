// hc_post: the write-back of the Hyper-Connections family (HC, DHC, mHC): the layer
// output y and the streams H mixed into the new streams H'.
//
// Math, per token t (N tokens, d features, n streams, 1 <= n <= 16):
//   forward   H'_k    = beta_k·y + Σ_i alpha[i, 1+k]·H_i                    (k < n)
//   backward  dH_i    = Σ_k alpha[i, 1+k]·dH'_k                             (activation dtype)
//             dy      = Σ_k beta_k·dH'_k                                    (activation dtype)
//             dalpha[i, 1+k] = <H_i, dH'_k>,  dalpha[i, 0] = 0              (accumulator dtype)
//             dbeta_k = <dH'_k, y>                                          (accumulator dtype)
// Every output is written (`=`), never accumulated: H', dH, dy once per element and the
// coefficient gradients as one row per token. Static coefficients are per-token ones
// with token stride 0; the launcher sums their gradient rows over tokens.
//
// Thread mapping, coefficient staging and the backward's dot partials: the HC stream
// tile (kernels/phases/hc_stream_tile.cuh).
//
// Registers: chunks are kept as loaded (Vec<T, kVec>: 16 bytes, 4 registers, whatever
// T) and widened at each use; sums run in acc_t<T> (float; double for double).
//   forward    the n chunks of H and y's chunk stay in registers; the n outputs are
//              produced one at a time (kVec accumulators live).
//   backward   the n chunks of dH' stay in registers; y, then each H_i, is loaded once
//              and produces dy (resp. dH_i) plus n dot partials, reduced one at a time
//              (one accumulator live).
// n is a template parameter kN for n = 2, 4, 8; kN = 0 is the generic instantiation for
// every other n in 1..16: loops run to kMaxStreams, fully unrolled and predicated on
// `i < n`, so register arrays are only ever indexed by constants (a dynamically indexed
// array would live in local memory).
//
// Assumptions (checked by the launcher):
//   1) features have unit stride in every activation tensor; token strides are
//      described by a TokenLayout, stream strides are free;
//   2) with kVec > 1, every base pointer is 16-byte aligned and every token and stream
//      stride is a multiple of kVec elements, so each full chunk is one 16-byte access;
//   3) 1 <= n <= kMaxStreams; alpha (n·(n+1)) and beta (n) are in the accumulator dtype,
//      one contiguous row per token; gradient rows likewise.
#pragma once

#include <cstdint>

#include "common/limits.h"
#include "common/reduce.cuh"
#include "common/tokens.cuh"
#include "common/vec.cuh"
#include "kernels/phases/hc_stream_tile.cuh"

namespace crosslayer {

struct HcPostParams {
  using index_t = int64_t;
  index_t n_tokens;  // N
  index_t d;         // features (unit stride everywhere)
  int n;             // streams
  // H (*lead, n, d), activation dtype.
  TokenLayout h_tok;
  index_t h_stream_stride;
  // y (*lead, d).
  TokenLayout y_tok;
  // alpha (N, n, n+1) and beta (N, n), accumulator dtype, contiguous rows;
  // token stride 0 for static coefficients.
  index_t a_token_stride, b_token_stride;
  // H' (*lead, n, d), forward output.
  TokenLayout out_tok;
  index_t out_stream_stride;
  // dH' (*lead, n, d), backward input.
  TokenLayout g_tok;
  index_t g_stream_stride;
  // dH (*lead, n, d) and dy (*lead, d), backward outputs.
  TokenLayout dh_tok;
  index_t dh_stream_stride;
  TokenLayout dy_tok;
  // dalpha (N, n, n+1) and dbeta (N, n): contiguous rows, accumulator dtype.
  const void* __restrict__ h_ptr;
  const void* __restrict__ y_ptr;
  const void* __restrict__ a_ptr;
  const void* __restrict__ b_ptr;
  void* __restrict__ out_ptr;
  const void* __restrict__ g_ptr;
  void* __restrict__ dh_ptr;
  void* __restrict__ dy_ptr;
  void* __restrict__ da_ptr;
  void* __restrict__ db_ptr;
};

// Coefficients staged a token row: alpha n·(n+1) (alpha[i][c] at i(n+1) + c), beta n.
__host__ __device__ inline int hc_post_coefs_per_row(int n) { return n * (n + 2); }

// Stages the tile's alpha and beta rows in coef_s[rows][alpha | beta] (block-wide,
// between two barriers).
template <typename acc>
__device__ __forceinline__ void hc_post_load_coefs(const HcPostParams& p, acc* __restrict__ coef_s,
                                                   int64_t t0, int n) {
  hc_stream_tile_load_coefs(coef_s, t0, p.n_tokens, hc_post_coefs_per_row(n), n * (n + 1),
                            static_cast<const acc*>(p.a_ptr), p.a_token_stride,
                            static_cast<const acc*>(p.b_ptr), p.b_token_stride);
}

// Forward write pass of token t by the calling row of threads: every chunk of H'_k
// (k < n) written (=) from the chunks of H_i and y. No shuffles or barriers.
template <typename T, int kVec, int kN>
__device__ __forceinline__ void hc_post_fwd_token(const HcPostParams& p, int64_t t, int n,
                                                  const acc_t<T>* __restrict__ a_row,
                                                  const acc_t<T>* __restrict__ b_row) {
  using acc = acc_t<T>;
  constexpr int kMax = kN > 0 ? kN : kMaxStreams;
  const T* __restrict__ h_tok = static_cast<const T*>(p.h_ptr) + p.h_tok.offset(t);
  const T* __restrict__ y_tok = static_cast<const T*>(p.y_ptr) + p.y_tok.offset(t);
  T* __restrict__ out_tok = static_cast<T*>(p.out_ptr) + p.out_tok.offset(t);
  for (int64_t e = threadIdx.x * kVec; e < p.d; e += blockDim.x * kVec) {
    Vec<T, kVec> h[kMax];
#pragma unroll
    for (int i = 0; i < kMax; ++i) {
      if (i < n) h[i] = load_chunk_raw<T, kVec>(h_tok + i * p.h_stream_stride, e, p.d);
    }
    const Vec<T, kVec> yv = load_chunk_raw<T, kVec>(y_tok, e, p.d);
#pragma unroll(kN > 0 ? kN : 1)
    for (int k = 0; k < n; ++k) {
      const acc b = b_row[k];
      acc o[kVec];
#pragma unroll
      for (int v = 0; v < kVec; ++v) o[v] = b * to_acc(yv.v[v]);
#pragma unroll
      for (int i = 0; i < kMax; ++i) {
        if (i < n) {
          const acc a = a_row[i * (n + 1) + 1 + k];
#pragma unroll
          for (int v = 0; v < kVec; ++v) o[v] += a * to_acc(h[i].v[v]);
        }
      }
      store_chunk<T, kVec>(out_tok + k * p.out_stream_stride, e, p.d, o);
    }
  }
}

// hc_post backward, one chunk: out[v] = Σ_k w[k]·g_k[v] over this thread's kVec
// elements of the n stream gradients g_k (= dH'_k), and part[k] += <g_k, x> summed over
// the warp's chunk (lane 0 adds). Used with (w, x) = (beta, y) for dy and dbeta, and with
// (alpha[i, 1:], H_i) for dH_i and dalpha[i, 1:]. Every lane must call it (warp_sum).
template <typename T, int kVec, int kMax, typename acc>
__device__ __forceinline__ void hc_post_mix_grads_and_dot(const Vec<T, kVec> (&g)[kMax], int n,
                                                          const acc* __restrict__ w, const Vec<T, kVec>& x,
                                                          acc (&out)[kVec], acc* __restrict__ part, int lane) {
#pragma unroll
  for (int v = 0; v < kVec; ++v) out[v] = acc(0);
#pragma unroll
  for (int k = 0; k < kMax; ++k) {
    if (k < n) {
      const acc wk = w[k];
      acc dot = acc(0);
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
        const acc gv = to_acc(g[k].v[v]);
        out[v] += wk * gv;
        dot += gv * to_acc(x.v[v]);
      }
      hc_stream_tile_add_dot(dot, part + k, lane);
    }
  }
}

// Backward pass of token t by the calling row of threads: dy and every dH_i written (=)
// chunk by chunk; the warp's dot partials part[i·n + k] (dalpha[i, 1+k]) and
// part[n² + k] (dbeta_k) accumulated (+=). Every lane of the row must call it (the
// chunk loop is warp-uniform; lanes past the row end work on zeros).
template <typename T, int kVec, int kN>
__device__ __forceinline__ void hc_post_bwd_token(const HcPostParams& p, int64_t t, int n,
                                                  const acc_t<T>* __restrict__ a_row,
                                                  const acc_t<T>* __restrict__ b_row,
                                                  acc_t<T>* __restrict__ part, int lane) {
  using acc = acc_t<T>;
  constexpr int kMax = kN > 0 ? kN : kMaxStreams;
  const T* __restrict__ h_tok = static_cast<const T*>(p.h_ptr) + p.h_tok.offset(t);
  const T* __restrict__ y_tok = static_cast<const T*>(p.y_ptr) + p.y_tok.offset(t);
  const T* __restrict__ g_tok = static_cast<const T*>(p.g_ptr) + p.g_tok.offset(t);
  T* __restrict__ dh_tok = static_cast<T*>(p.dh_ptr) + p.dh_tok.offset(t);
  T* __restrict__ dy_tok = static_cast<T*>(p.dy_ptr) + p.dy_tok.offset(t);
  for (int64_t e0 = 0; e0 < p.d; e0 += static_cast<int64_t>(blockDim.x) * kVec) {
    const int64_t e = e0 + threadIdx.x * kVec;
    Vec<T, kVec> g[kMax];
#pragma unroll
    for (int k = 0; k < kMax; ++k) {
      if (k < n) g[k] = load_chunk_raw<T, kVec>(g_tok + k * p.g_stream_stride, e, p.d);
    }
    // dy and dbeta from y's chunk.
    {
      const Vec<T, kVec> yv = load_chunk_raw<T, kVec>(y_tok, e, p.d);
      acc dy[kVec];
      hc_post_mix_grads_and_dot<T, kVec, kMax>(g, n, b_row, yv, dy, part + n * n, lane);
      store_chunk<T, kVec>(dy_tok, e, p.d, dy);
    }
    // dH_i and dalpha[i, 1 + k] from H_i's chunk, one stream at a time.
#pragma unroll(kN > 0 ? kN : 1)
    for (int i = 0; i < n; ++i) {
      const Vec<T, kVec> hv = load_chunk_raw<T, kVec>(h_tok + i * p.h_stream_stride, e, p.d);
      acc dh[kVec];
      hc_post_mix_grads_and_dot<T, kVec, kMax>(g, n, a_row + i * (n + 1) + 1, hv, dh, part + i * n, lane);
      store_chunk<T, kVec>(dh_tok + i * p.dh_stream_stride, e, p.d, dh);
    }
  }
}

// The tile's dalpha and dbeta rows (=) from the warps' partials (block-wide, after a
// barrier).
template <typename acc>
__device__ __forceinline__ void hc_post_write_coef_grads(const HcPostParams& p, const acc* __restrict__ part_s,
                                                         int64_t t0, int n, int warps_per_row) {
  const int np1 = n + 1;
  const int dots = n * np1;
  hc_stream_tile_write_dots(part_s, t0, p.n_tokens, warps_per_row, dots, n * np1,
                            [n, np1](int j) { return j % np1 == 0 ? -1 : (j / np1) * n + j % np1 - 1; },
                            static_cast<acc*>(p.da_ptr));
  hc_stream_tile_write_dots(part_s, t0, p.n_tokens, warps_per_row, dots, n,
                            [n](int j) { return n * n + j; }, static_cast<acc*>(p.db_ptr));
}

template <typename T, int kVec, int kN>
__global__ void __launch_bounds__(kHcStreamTileThreads, kHcStreamTileMinBlocks)
    hc_post_fwd_kernel(const HcPostParams p) {
  using acc = acc_t<T>;
  const int n = kN > 0 ? kN : p.n;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc* __restrict__ coef_s = reinterpret_cast<acc*>(smem_raw);  // [rows][alpha | beta]
  const int64_t rows = blockDim.y;
  for (int64_t t0 = blockIdx.x * rows; t0 < p.n_tokens; t0 += gridDim.x * rows) {
    __syncthreads();  // the previous tile's readers are done with coef_s
    hc_post_load_coefs(p, coef_s, t0, n);
    __syncthreads();
    const int64_t t = t0 + threadIdx.y;
    if (t >= p.n_tokens) continue;
    const acc* __restrict__ a_row = coef_s + threadIdx.y * hc_post_coefs_per_row(n);
    hc_post_fwd_token<T, kVec, kN>(p, t, n, a_row, a_row + n * (n + 1));
  }
}

template <typename T, int kVec, int kN>
__global__ void __launch_bounds__(kHcStreamTileThreads, kHcStreamTileMinBlocks)
    hc_post_bwd_kernel(const HcPostParams p) {
  using acc = acc_t<T>;
  const int n = kN > 0 ? kN : p.n;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int rows = blockDim.y;
  const int warps_per_row = blockDim.x / kWarpSize;
  const int dots = n * (n + 1);  // dalpha[i][k] at i·n + k, dbeta[k] at n² + k
  acc* __restrict__ coef_s = reinterpret_cast<acc*>(smem_raw);           // [rows][alpha | beta]
  acc* __restrict__ part_s = coef_s + rows * hc_post_coefs_per_row(n);  // [rows][warps][dots]
  for (int64_t t0 = static_cast<int64_t>(blockIdx.x) * rows; t0 < p.n_tokens;
       t0 += static_cast<int64_t>(gridDim.x) * rows) {
    __syncthreads();  // the previous tile's readers are done with coef_s and part_s
    hc_post_load_coefs(p, coef_s, t0, n);
    hc_stream_tile_zero(part_s, rows * warps_per_row * dots);
    __syncthreads();
    const int64_t t = t0 + threadIdx.y;
    if (t < p.n_tokens) {  // uniform over the row (whole warps): the shuffles need every lane
      const acc* __restrict__ a_row = coef_s + threadIdx.y * hc_post_coefs_per_row(n);
      acc* __restrict__ part = part_s + (threadIdx.y * warps_per_row + threadIdx.x / kWarpSize) * dots;
      hc_post_bwd_token<T, kVec, kN>(p, t, n, a_row, a_row + n * (n + 1), part, threadIdx.x % kWarpSize);
    }
    __syncthreads();
    hc_post_write_coef_grads(p, part_s, t0, n, warps_per_row);
  }
}

}  // namespace crosslayer
