// hc_post: the width and depth connection of Hyper-Connections (HC, DHC, mHC), forward
// and backward. Phases: kernels/hc_tile.cuh (token tiles, staging, dot rows).
//
// Math, per token t (N tokens, d features, n streams, 1 <= n <= 16):
//   forward   H'_k           = beta_k·y + Σ_i alpha[i, 1+k]·H_i           (k < n)
//   backward  dH_i           = Σ_k alpha[i, 1+k]·dH'_k                    (activation dtype)
//             dy             = Σ_k beta_k·dH'_k                           (activation dtype)
//             dalpha[i, 1+k] = <H_i, dH'_k>,  dalpha[i, 0] = 0            (accumulator dtype)
//             dbeta_k        = <dH'_k, y>                                 (accumulator dtype)
// Every output is written (`=`), never accumulated: H', dH, dy once per element and the
// coefficient gradients as one row per token. Static coefficients are per-token ones
// with token stride 0; the launcher sums their gradient rows over tokens.
//
// Registers: forward, the n chunks of H and y's chunk stay in registers and the n
// outputs are produced one at a time (kVec accumulators live); backward, the n chunks
// of dH' stay in registers, y and then each H_i is loaded once and produces dy (resp.
// dH_i) plus n dot partials, reduced one at a time (one accumulator live). kN: 2, 4, 8
// exact, 0 generic.
#pragma once

#include "common/std.cuh"

#include "kernels/hc_tile.cuh"

namespace crosslayer {

struct HcPostParams : HcTileParams {  // H
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

// Output k of the mix over one chunk, in the accumulator dtype: o = beta_k·y +
// Σ_i alpha[i, 1+k]·H_i (b = beta_k; h[0..n) the streams' chunks), summed in this order,
// so a kernel that recomputes H' from H and y gets the bits hc_post stores.
template <typename T, int kVec, int kMax, typename acc>
__device__ __forceinline__ void hc_post_mix(const Vec<T, kVec> (&h)[kMax], const Vec<T, kVec>& yv,
                                            const acc* __restrict__ a_row, acc b, int n, int k, acc (&o)[kVec]) {
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
}

// Forward of token t by its row of threads: H'_k = beta_k·y + Σ_i alpha[i, 1+k]·H_i over
// the d features (`=`), a_row / b_row the token's staged alpha / beta. No barrier, no
// shuffle. Phases take the params by reference, so sizes and strides stay
// constant-bank operands instead of registers.
template <typename T, int kVec, int kN, typename acc>
__device__ __forceinline__ void hc_post_token(const HcPostParams& p, int64_t t, const acc* __restrict__ a_row,
                                              const acc* __restrict__ b_row, int n) {
  constexpr int kMax = kN > 0 ? kN : kMaxStreams;
  const T* __restrict__ h_tok = static_cast<const T*>(p.h_ptr) + p.h_tok.offset(t);
  const T* __restrict__ y_tok = static_cast<const T*>(p.y_ptr) + p.y_tok.offset(t);
  T* __restrict__ out_tok = static_cast<T*>(p.out_ptr) + p.out_tok.offset(t);
  for (int64_t e = threadIdx.x * kVec; e < p.d; e += blockDim.x * kVec) {
    Vec<T, kVec> h[kMax];
    load_stream_chunks<T, kVec, kMax>(h, h_tok, p.h_stream_stride, n, e, p.d);
    const Vec<T, kVec> yv = load_chunk_raw<T, kVec>(y_tok, e, p.d);
#pragma unroll(kN > 0 ? kN : 1)
    for (int k = 0; k < n; ++k) {
      acc o[kVec];
      hc_post_mix<T, kVec, kMax>(h, yv, a_row, b_row[k], n, k, o);
      store_chunk<T, kVec>(out_tok + k * p.out_stream_stride, e, p.d, o);
    }
  }
}

// One chunk of the backward: out[v] = Σ_k w[k]·g_k[v] over this thread's kVec elements
// of the n stream gradients g_k (= dH'_k), and part[k] += <g_k, x> summed over the
// warp's chunk (lane 0 adds). With (w, x) = (beta, y): dy and dbeta; with
// (alpha[i, 1:], H_i): dH_i and dalpha[i, 1:]. Every lane must call it (warp_sum).
template <typename T, int kVec, int kMax, typename acc>
__device__ __forceinline__ void mix_grads_and_dot(const Vec<T, kVec> (&g)[kMax], int n, const acc* __restrict__ w,
                                                  const Vec<T, kVec>& x, acc (&out)[kVec], acc* __restrict__ part,
                                                  int lane) {
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
      dot = warp_sum(dot);
      if (lane == 0) part[k] += dot;
    }
  }
}

// One chunk [e, e + kVec) of the backward from the stream gradients g[0..n) (dH'_k):
// dy and dH_i written (=) to dy_tok / dh_tok, the warp's dot partials added (+=) to
// part (dalpha[i][k] at i·n + k, dbeta[k] at n² + k); yv is y's chunk and load_h(i)
// returns H_i's. A chunk past d (lanes past the row end) works on zeros and stores
// nothing. Every lane of the warp must call it (shuffles).
template <typename T, int kVec, int kMax, typename acc, typename LoadH>
__device__ __forceinline__ void hc_post_bwd_chunk(const HcPostParams& p, const Vec<T, kVec> (&g)[kMax],
                                                  const Vec<T, kVec>& yv, LoadH&& load_h, T* __restrict__ dh_tok,
                                                  T* __restrict__ dy_tok, int64_t e, const acc* __restrict__ a_row,
                                                  const acc* __restrict__ b_row, int n, acc* __restrict__ part,
                                                  int lane) {
  {  // dy and dbeta from y's chunk
    acc dy[kVec];
    mix_grads_and_dot<T, kVec, kMax>(g, n, b_row, yv, dy, part + n * n, lane);
    store_chunk<T, kVec>(dy_tok, e, p.d, dy);
  }
  // dH_i and dalpha[i, 1 + k] from H_i's chunk, one stream at a time.
#pragma unroll(kMax < kMaxStreams ? kMax : 1)
  for (int i = 0; i < n; ++i) {
    const Vec<T, kVec> hv = load_h(i);
    acc dh[kVec];
    mix_grads_and_dot<T, kVec, kMax>(g, n, a_row + i * (n + 1) + 1, hv, dh, part + i * n, lane);
    store_chunk<T, kVec>(dh_tok + i * p.dh_stream_stride, e, p.d, dh);
  }
}

// Token t's rows of the backward's tensors: H, y and dH' (g) read, dH and dy written.
template <typename T>
struct HcPostTokenBwd {
  const T* __restrict__ h;
  const T* __restrict__ y;
  const T* __restrict__ g;
  T* __restrict__ dh;
  T* __restrict__ dy;
};

template <typename T>
__device__ __forceinline__ HcPostTokenBwd<T> hc_post_token_bwd_rows(const HcPostParams& p, int64_t t) {
  return {static_cast<const T*>(p.h_ptr) + p.h_tok.offset(t), static_cast<const T*>(p.y_ptr) + p.y_tok.offset(t),
          static_cast<const T*>(p.g_ptr) + p.g_tok.offset(t), static_cast<T*>(p.dh_ptr) + p.dh_tok.offset(t),
          static_cast<T*>(p.dy_ptr) + p.dy_tok.offset(t)};
}

// Backward of token t by its row of threads: dy and dH_i (`=`) over the d features, the
// warp's dot partials added (`+=`) to part (hc_post_bwd_chunk). Every lane of the row
// calls it: the chunk loop is warp-uniform.
template <typename T, int kVec, int kN, typename acc>
__device__ __forceinline__ void hc_post_token_bwd(const HcPostParams& p, int64_t t, const acc* __restrict__ a_row,
                                                  const acc* __restrict__ b_row, int n, acc* __restrict__ part,
                                                  int lane) {
  constexpr int kMax = kN > 0 ? kN : kMaxStreams;
  const HcPostTokenBwd<T> r = hc_post_token_bwd_rows<T>(p, t);
  for (int64_t e0 = 0; e0 < p.d; e0 += static_cast<int64_t>(blockDim.x) * kVec) {
    const int64_t e = e0 + threadIdx.x * kVec;
    Vec<T, kVec> g[kMax];
    load_stream_chunks<T, kVec, kMax>(g, r.g, p.g_stream_stride, n, e, p.d);
    const Vec<T, kVec> yv = load_chunk_raw<T, kVec>(r.y, e, p.d);
    hc_post_bwd_chunk<T, kVec, kMax>(
        p, g, yv, [&](int i) { return load_chunk_raw<T, kVec>(r.h + i * p.h_stream_stride, e, p.d); }, r.dh, r.dy,
        e, a_row, b_row, n, part, lane);
  }
}

// The end of a backward tile (after a barrier that makes every warp's partials
// visible): the tile's per-token coefficient gradients, dalpha (column 0 = 0) and
// dbeta, summed over the warps in warp order from part_s (`dots` partials a warp, the
// post's n(n+1) first) and written (=) one row per token.
template <typename acc>
__device__ __forceinline__ void hc_post_write_coef_grads(const HcPostParams& p, const acc* __restrict__ part_s,
                                                         int64_t t0, int n, int warps_per_row, int dots) {
  const int np1 = n + 1;
  hc_tile_write_dots(part_s, t0, p.n_tokens, warps_per_row, dots, n * np1,
                     [n, np1](int j) { return j % np1 == 0 ? -1 : (j / np1) * n + j % np1 - 1; },
                     static_cast<acc*>(p.da_ptr));
  hc_tile_write_dots(part_s, t0, p.n_tokens, warps_per_row, dots, n, [n](int j) { return n * n + j; },
                     static_cast<acc*>(p.db_ptr));
}

template <typename T, int kVec, int kN>
__global__ void __launch_bounds__(kTokenTileThreads, kHcTileMinBlocks) hc_post_fwd_kernel(const HcPostParams p) {
  using acc = acc_t<T>;
  const int n = kN > 0 ? kN : p.n;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc* __restrict__ coef_s = reinterpret_cast<acc*>(smem_raw);  // [rows][alpha n(n+1) | beta n]
  const int per_row = n * (n + 2);
  const int64_t rows = blockDim.y;
  for (int64_t t0 = first_token_tile(rows); t0 < p.n_tokens; t0 += token_tile_stride(rows)) {
    hc_tile_stage<false>(coef_s, t0, p.n_tokens, per_row, n * (n + 1), static_cast<const acc*>(p.a_ptr),
                         p.a_token_stride, 1, static_cast<const acc*>(p.b_ptr), p.b_token_stride, coef_s, 0);
    const int64_t t = t0 + threadIdx.y;
    if (t >= p.n_tokens) continue;
    const acc* __restrict__ a_row = coef_s + threadIdx.y * per_row;  // alpha[i][c] at i(n+1)+c
    hc_post_token<T, kVec, kN>(p, t, a_row, a_row + n * (n + 1), n);
  }
}

template <typename T, int kVec, int kN>
__global__ void __launch_bounds__(kTokenTileThreads, kHcTileMinBlocks) hc_post_bwd_kernel(const HcPostParams p) {
  using acc = acc_t<T>;
  const int n = kN > 0 ? kN : p.n;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int rows = blockDim.y;
  const int warps_per_row = blockDim.x / kWarpSize;
  const int per_row = n * (n + 2);
  const int dots = n * (n + 1);
  acc* __restrict__ coef_s = reinterpret_cast<acc*>(smem_raw);  // [rows][alpha | beta]
  acc* __restrict__ part_s = coef_s + rows * per_row;            // [rows][warps][dots]
  for (int64_t t0 = first_token_tile(rows); t0 < p.n_tokens; t0 += token_tile_stride(rows)) {
    hc_tile_stage<true>(coef_s, t0, p.n_tokens, per_row, n * (n + 1), static_cast<const acc*>(p.a_ptr),
                        p.a_token_stride, 1, static_cast<const acc*>(p.b_ptr), p.b_token_stride, part_s,
                        rows * warps_per_row * dots);
    const int64_t t = t0 + threadIdx.y;
    // Rows are whole warps, so this branch is warp-uniform (the shuffles need every
    // lane); lanes past the row end work on zeros.
    if (t < p.n_tokens) {
      const acc* __restrict__ a_row = coef_s + threadIdx.y * per_row;
      acc* __restrict__ part = part_s + (threadIdx.y * warps_per_row + threadIdx.x / kWarpSize) * dots;
      hc_post_token_bwd<T, kVec, kN>(p, t, a_row, a_row + n * (n + 1), n, part, threadIdx.x % kWarpSize);
    }
    __syncthreads();
    hc_post_write_coef_grads(p, part_s, t0, n, warps_per_row, dots);
  }
}

}  // namespace crosslayer
