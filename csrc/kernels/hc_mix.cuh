// hc_mix: the stream-mixing ops of the Hyper-Connections family (HC, DHC, mHC).
//
// Math, per token t (N tokens, d features, n streams, 1 <= n <= 16):
//   hc_post     forward   H'_k    = beta_k·y + Σ_i alpha[i, 1+k]·H_i           (k < n)
//               backward  dH_i    = Σ_k alpha[i, 1+k]·dH'_k                    (activation dtype)
//                         dy      = Σ_k beta_k·dH'_k                           (activation dtype)
//                         dalpha[i, 1+k] = <H_i, dH'_k>,  dalpha[i, 0] = 0     (accumulator dtype)
//                         dbeta_k = <dH'_k, y>                                 (accumulator dtype)
//   stream_mix  forward   x       = Σ_i w_i·H_i
//               backward  dH_i    = w_i·dx;   dw_i = <dx, H_i>
// Every output is written (`=`), never accumulated: H', x, dH, dy once per element and
// the coefficient gradients as one row per token. Static coefficients are per-token
// ones with token stride 0; the launcher sums their gradient rows over tokens.
//
// Thread mapping (as depth_aggregate): a block is (threads_x, rows). Each row of threads
// (whole warps: threads_x is a multiple of 32) owns one token at a time and walks its d
// features in chunks of kVec contiguous elements, one chunk per thread per round;
// blocks grid-stride over tokens, `rows` tokens per tile. The tile's coefficients are
// staged in shared memory first; afterwards every read of them is a warp-uniform
// broadcast (one address per warp), so there are no bank conflicts.
//
// Registers: chunks are kept as loaded (Vec<T, kVec>: 16 bytes, 4 registers, whatever
// T) and widened at each use; sums run in acc_t<T> (float; double for double).
//   hc_post fwd    the n chunks of H and y's chunk stay in registers; the n outputs are
//                  produced one at a time (kVec accumulators live).
//   hc_post bwd    the n chunks of dH' stay in registers; y, then each H_i, is loaded
//                  once and produces dy (resp. dH_i) plus n dot partials, reduced one
//                  at a time (one accumulator live).
//   stream_mix     one input chunk live; kVec accumulators.
// n is a template parameter kN for n = 2, 4, 8; kN = 0 is the generic instantiation for
// every other n in 1..16: loops run to kMaxStreams, fully unrolled and predicated
// on `i < n`, so register arrays are only ever indexed by constants (a dynamically
// indexed array would live in local memory).
//
// Backward dots (n² + n for hc_post, n for stream_mix): per chunk round each partial is
// reduced across the warp by shuffles and lane 0 adds it to the warp's own slot in
// shared memory; after the token the warps' slots are summed in warp order. The order
// of every addition is fixed: results are bit-identical run to run.
//
// Assumptions (checked by the launcher):
//   1) features have unit stride in every activation tensor; token strides are
//      described by a TokenLayout, stream strides are free;
//   2) with kVec > 1, every base pointer is 16-byte aligned and every token and stream
//      stride is a multiple of kVec elements, so each full chunk is one 16-byte access;
//   3) 1 <= n <= kMaxStreams; coefficients are in the accumulator dtype, one
//      contiguous row per token (alpha n·(n+1), beta n, w n); gradient rows likewise.
#pragma once

#include <cstdint>

#include "common/limits.h"
#include "common/reduce.cuh"
#include "common/tokens.cuh"
#include "common/vec.cuh"

namespace crosslayer {

constexpr int kHcMixMaxThreads = 256;
constexpr int kHcMixSmemBudget = 48 * 1024;
// Resident blocks asked of every kernel. Stated explicitly: with __launch_bounds__(256)
// alone, ptxas 13.0 picked a 64-80 register target for several backward variants and
// spilled; with a minimum of 1 it uses what it needs (at most 199 registers, the generic
// n <= 16 backward in 16-bit) and spills nothing.
constexpr int kHcMixMinBlocks = 1;

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

// Block shape for a launch: threads_x covers the feature chunks of one token (a
// multiple of 32, at most 256); rows = tokens per tile, filling 256 threads when d is
// small, within the shared-memory budget. Shared memory per row: `coef_per_row`
// coefficients plus, in the backward, `dots_per_warp` partials per warp.
struct HcMixBlock {
  int threads_x;
  int rows;
  int smem_bytes;
};

inline HcMixBlock hc_mix_block(int64_t n_tokens, int64_t d, int vec, int coef_per_row,
                               int dots_per_warp, int acc_bytes) {
  const int64_t chunks = (d + vec - 1) / vec;
  const int64_t rounded = ((chunks + 31) / 32) * 32;
  HcMixBlock b;
  b.threads_x = static_cast<int>(rounded < kHcMixMaxThreads ? rounded : kHcMixMaxThreads);
  if (b.threads_x < 32) b.threads_x = 32;
  const int warps_per_row = b.threads_x / 32;
  const int row_bytes = acc_bytes * (coef_per_row + warps_per_row * dots_per_warp);
  int rows = kHcMixMaxThreads / b.threads_x;
  if (rows > kHcMixSmemBudget / row_bytes) rows = kHcMixSmemBudget / row_bytes;
  if (rows > n_tokens) rows = static_cast<int>(n_tokens);
  if (rows < 1) rows = 1;
  b.rows = rows;
  b.smem_bytes = rows * row_bytes;
  return b;
}

// Copies `per_row` coefficients of each token t0 + r of the tile into smem (r < rows):
// the first `split` from `first` (row stride s0), the rest from `second` (row stride
// s1). Tokens past the end read as zero.
template <typename acc>
__device__ __forceinline__ void hc_mix_load_coefs(acc* __restrict__ dst, int64_t t0,
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

// Sums the per-warp partials of the tile's dots in warp order and writes one row per
// token: `cols` values, where value j comes from partial slot slot_of(j) (negative:
// a structural zero), to out + t·cols + j.
template <typename acc, typename SlotOf>
__device__ __forceinline__ void hc_mix_write_dots(const acc* __restrict__ part, int64_t t0,
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

// ------------------------------------------------------------------------- hc_post

template <typename T, int kVec, int kN>
__global__ void __launch_bounds__(kHcMixMaxThreads, kHcMixMinBlocks) hc_post_fwd_kernel(const HcPostParams p) {
  using acc = acc_t<T>;
  constexpr int kMax = kN > 0 ? kN : kMaxStreams;
  const int n = kN > 0 ? kN : p.n;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc* __restrict__ coef_s = reinterpret_cast<acc*>(smem_raw);  // [rows][alpha n(n+1) | beta n]
  const int per_row = n * (n + 2);

  const T* __restrict__ H = static_cast<const T*>(p.h_ptr);
  const T* __restrict__ Y = static_cast<const T*>(p.y_ptr);
  T* __restrict__ out = static_cast<T*>(p.out_ptr);
  const int64_t rows = blockDim.y;

  for (int64_t t0 = blockIdx.x * rows; t0 < p.n_tokens; t0 += gridDim.x * rows) {
    __syncthreads();  // the previous tile's readers are done with coef_s
    hc_mix_load_coefs(coef_s, t0, p.n_tokens, per_row, n * (n + 1),
                      static_cast<const acc*>(p.a_ptr), p.a_token_stride,
                      static_cast<const acc*>(p.b_ptr), p.b_token_stride);
    __syncthreads();
    const int64_t t = t0 + threadIdx.y;
    if (t >= p.n_tokens) continue;
    const acc* __restrict__ a_row = coef_s + threadIdx.y * per_row;  // alpha[i][c] at i(n+1)+c
    const acc* __restrict__ b_row = a_row + n * (n + 1);
    const T* __restrict__ h_tok = H + p.h_tok.offset(t);
    const T* __restrict__ y_tok = Y + p.y_tok.offset(t);
    T* __restrict__ out_tok = out + p.out_tok.offset(t);
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
}

// hc_post backward, one chunk: out[v] = Σ_k w[k]·g_k[v] over this thread's kVec
// elements of the n stream gradients g_k (= dH'_k), and part[k] += <g_k, x> summed over
// the warp's chunk (lane 0 adds). Used with (w, x) = (beta, y) for dy and dbeta, and with
// (alpha[i, 1:], H_i) for dH_i and dalpha[i, 1:]. Every lane must call it (warp_sum).
template <typename T, int kVec, int kMax, typename acc>
__device__ __forceinline__ void mix_grads_and_dot(const Vec<T, kVec> (&g)[kMax], int n,
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
      dot = warp_sum(dot);
      if (lane == 0) part[k] += dot;
    }
  }
}

template <typename T, int kVec, int kN>
__global__ void __launch_bounds__(kHcMixMaxThreads, kHcMixMinBlocks) hc_post_bwd_kernel(const HcPostParams p) {
  using acc = acc_t<T>;
  constexpr int kMax = kN > 0 ? kN : kMaxStreams;
  const int n = kN > 0 ? kN : p.n;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int rows = blockDim.y;
  const int warps_per_row = blockDim.x / kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int per_row = n * (n + 2);
  const int dots = n * (n + 1);  // dalpha[i][k] at i·n + k, dbeta[k] at n² + k
  acc* __restrict__ coef_s = reinterpret_cast<acc*>(smem_raw);  // [rows][alpha | beta]
  acc* __restrict__ part_s = coef_s + rows * per_row;            // [rows][warps][dots]

  const T* __restrict__ H = static_cast<const T*>(p.h_ptr);
  const T* __restrict__ Y = static_cast<const T*>(p.y_ptr);
  const T* __restrict__ G = static_cast<const T*>(p.g_ptr);
  T* __restrict__ dH = static_cast<T*>(p.dh_ptr);
  T* __restrict__ dY = static_cast<T*>(p.dy_ptr);

  for (int64_t t0 = static_cast<int64_t>(blockIdx.x) * rows; t0 < p.n_tokens;
       t0 += static_cast<int64_t>(gridDim.x) * rows) {
    __syncthreads();  // the previous tile's readers are done with coef_s and part_s
    hc_mix_load_coefs(coef_s, t0, p.n_tokens, per_row, n * (n + 1),
                      static_cast<const acc*>(p.a_ptr), p.a_token_stride,
                      static_cast<const acc*>(p.b_ptr), p.b_token_stride);
    for (int i = threadIdx.y * blockDim.x + threadIdx.x; i < rows * warps_per_row * dots;
         i += blockDim.x * blockDim.y) {
      part_s[i] = acc(0);
    }
    __syncthreads();
    const int64_t t = t0 + threadIdx.y;
    // Rows are whole warps, so this branch and the chunk loop are warp-uniform (the
    // shuffles need every lane); lanes past the row end work on zeros.
    if (t < p.n_tokens) {
      const acc* __restrict__ a_row = coef_s + threadIdx.y * per_row;
      const acc* __restrict__ b_row = a_row + n * (n + 1);
      acc* __restrict__ part = part_s + (threadIdx.y * warps_per_row + warp) * dots;
      const T* __restrict__ h_tok = H + p.h_tok.offset(t);
      const T* __restrict__ y_tok = Y + p.y_tok.offset(t);
      const T* __restrict__ g_tok = G + p.g_tok.offset(t);
      T* __restrict__ dh_tok = dH + p.dh_tok.offset(t);
      T* __restrict__ dy_tok = dY + p.dy_tok.offset(t);
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
          mix_grads_and_dot<T, kVec, kMax>(g, n, b_row, yv, dy, part + n * n, lane);
          store_chunk<T, kVec>(dy_tok, e, p.d, dy);
        }
        // dH_i and dalpha[i, 1 + k] from H_i's chunk, one stream at a time.
#pragma unroll(kN > 0 ? kN : 1)
        for (int i = 0; i < n; ++i) {
          const Vec<T, kVec> hv = load_chunk_raw<T, kVec>(h_tok + i * p.h_stream_stride, e, p.d);
          acc dh[kVec];
          mix_grads_and_dot<T, kVec, kMax>(g, n, a_row + i * (n + 1) + 1, hv, dh, part + i * n, lane);
          store_chunk<T, kVec>(dh_tok + i * p.dh_stream_stride, e, p.d, dh);
        }
      }
    }
    __syncthreads();
    const int np1 = n + 1;
    hc_mix_write_dots(part_s, t0, p.n_tokens, warps_per_row, dots, n * np1,
                      [n, np1](int j) { return j % np1 == 0 ? -1 : (j / np1) * n + j % np1 - 1; },
                      static_cast<acc*>(p.da_ptr));
    hc_mix_write_dots(part_s, t0, p.n_tokens, warps_per_row, dots, n,
                      [n](int j) { return n * n + j; }, static_cast<acc*>(p.db_ptr));
  }
}

// ---------------------------------------------------------------------- stream_mix

template <typename T, int kVec, int kN>
__global__ void __launch_bounds__(kHcMixMaxThreads, kHcMixMinBlocks) stream_mix_fwd_kernel(const StreamMixParams p) {
  using acc = acc_t<T>;
  constexpr int kMax = kN > 0 ? kN : kMaxStreams;
  const int n = kN > 0 ? kN : p.n;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc* __restrict__ w_s = reinterpret_cast<acc*>(smem_raw);  // [rows][n]

  const T* __restrict__ H = static_cast<const T*>(p.h_ptr);
  T* __restrict__ X = static_cast<T*>(p.x_ptr);
  const int64_t rows = blockDim.y;

  for (int64_t t0 = blockIdx.x * rows; t0 < p.n_tokens; t0 += gridDim.x * rows) {
    __syncthreads();  // the previous tile's readers are done with w_s
    hc_mix_load_coefs(w_s, t0, p.n_tokens, n, n, static_cast<const acc*>(p.w_ptr),
                      p.w_token_stride, static_cast<const acc*>(p.w_ptr), p.w_token_stride);
    __syncthreads();
    const int64_t t = t0 + threadIdx.y;
    if (t >= p.n_tokens) continue;
    const acc* __restrict__ w_row = w_s + threadIdx.y * n;
    const T* __restrict__ h_tok = H + p.h_tok.offset(t);
    T* __restrict__ x_tok = X + p.x_tok.offset(t);
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
}

template <typename T, int kVec, int kN>
__global__ void __launch_bounds__(kHcMixMaxThreads, kHcMixMinBlocks) stream_mix_bwd_kernel(const StreamMixParams p) {
  using acc = acc_t<T>;
  constexpr int kMax = kN > 0 ? kN : kMaxStreams;
  const int n = kN > 0 ? kN : p.n;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int rows = blockDim.y;
  const int warps_per_row = blockDim.x / kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  acc* __restrict__ w_s = reinterpret_cast<acc*>(smem_raw);  // [rows][n]
  acc* __restrict__ part_s = w_s + rows * n;                  // [rows][warps][n]

  const T* __restrict__ H = static_cast<const T*>(p.h_ptr);
  const T* __restrict__ G = static_cast<const T*>(p.g_ptr);
  T* __restrict__ dH = static_cast<T*>(p.dh_ptr);

  for (int64_t t0 = static_cast<int64_t>(blockIdx.x) * rows; t0 < p.n_tokens;
       t0 += static_cast<int64_t>(gridDim.x) * rows) {
    __syncthreads();  // the previous tile's readers are done with w_s and part_s
    hc_mix_load_coefs(w_s, t0, p.n_tokens, n, n, static_cast<const acc*>(p.w_ptr),
                      p.w_token_stride, static_cast<const acc*>(p.w_ptr), p.w_token_stride);
    for (int i = threadIdx.y * blockDim.x + threadIdx.x; i < rows * warps_per_row * n;
         i += blockDim.x * blockDim.y) {
      part_s[i] = acc(0);
    }
    __syncthreads();
    const int64_t t = t0 + threadIdx.y;
    // Warp-uniform, as in hc_post_bwd_kernel.
    if (t < p.n_tokens) {
      const acc* __restrict__ w_row = w_s + threadIdx.y * n;
      acc* __restrict__ part = part_s + (threadIdx.y * warps_per_row + warp) * n;
      const T* __restrict__ h_tok = H + p.h_tok.offset(t);
      const T* __restrict__ g_tok = G + p.g_tok.offset(t);
      T* __restrict__ dh_tok = dH + p.dh_tok.offset(t);
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
            dot = warp_sum(dot);
            if (lane == 0) part[i] += dot;
          }
        }
      }
    }
    __syncthreads();
    hc_mix_write_dots(part_s, t0, p.n_tokens, warps_per_row, n, n, [](int j) { return j; },
                      static_cast<acc*>(p.dw_ptr));
  }
}

}  // namespace crosslayer
