// hc_boundary: the post of DHC connection i fused with the pre of DHC connection i+1 at
// the boundary of two sublayers, forward and backward, composed from the phases of
// kernels/hc_post.cuh (the mix) and kernels/hc_pre.cuh (the coefficients).
//
// Math, per token t (n streams of d features; alpha, beta: connection i's per-token
// or static coefficients; A, B, W, s_a, s_b: connection i+1's parameters):
//   forward   H'_k  = beta_k·y + Σ_i alpha[i, 1+k]·H_i            (= H_{i+1}, activation dtype)
//             x', alpha', beta', q, r = hc_pre(H', A, B, W, s_a, s_b)   (kernels/hc_pre.cuh)
//   backward, for G = the later gradient of H' (the next boundary's dH, or the end's),
//   dx' and the later coefficient gradients dalpha', dbeta' (optional):
//             dH'_k = G_k + [hc_pre's dH term of stream k]     (one rounding, never stored)
//             dH_i, dy, dalpha[i, 1+k], dbeta_k = hc_post's backward from dH'
//             dA, dB, dW, ds_a, ds_b as in hc_pre (per-block partials, summed in order)
// HBM per token: forward reads H and y and writes H' and x' (2n·d + 2d; the unfused
// post + pre read H' back: 3n·d + 2d); backward reads G, dx', H and y and writes dH and
// dy (3n·d + 3d against 6n·d + 3d). H' is recomputed from H and y wherever it is needed
// (hc_post_mix, in hc_post's order: the bits the forward stored); the re-reads of H and
// y within a token hit L1/L2.
//
// Thread mapping: hc_pre's (a row of whole warps per token, blocks of 256 threads, a
// thread owns the chunks x, x + threads_x, ... of kVec features); the tile's post
// coefficients are staged in shared memory after hc_pre's layout (hc_tile_stage), and
// the backward's per-warp dot partials of the post after them. Gradients: dH, dy and
// the per-token dalpha, dbeta rows written (`=`); the parameter partials as hc_pre's
// (`=` per block slice). No atomics: reruns are bit-identical.
//
// Assumptions (checked by the launcher): hc_pre's and hc_tile's (features unit stride,
// 16-byte alignment with kVec > 1); H' and x' are outputs the launcher allocates.
#pragma once

#include "common/std.cuh"

#include "kernels/hc_post.cuh"
#include "kernels/hc_pre.cuh"

namespace crosslayer {

// Elements per chunk for T and kN streams: 8 bytes up to 4 streams, 4 for 8 and 2 for
// 16 (at least one element). The backward keeps dH' of every stream of a chunk, the
// streams' chunks and hc_pre's group arrays live at once; with 16-byte chunks that is
// beyond the 128 registers of two resident blocks (ptxas spills 500 bytes at n = 4,
// bf16). A warp's access is still 64 contiguous bytes or more: whole sectors.
template <typename T, int kN>
constexpr int kHcBoundaryVec = kVec16<T> * 2 / (kN <= 4 ? 4 : kN) > 1 ? kVec16<T> * 2 / (kN <= 4 ? 4 : kN) : 1;

struct HcBoundaryParams {
  // Connection i's post: H (h_*), y, alpha / beta (a_ptr / b_ptr, token stride 0 when
  // static); forward: out = H'; backward: g = G, and the outputs dh, dy, da, db.
  HcPostParams post;
  // Connection i+1's pre: W, A, B, s_a, s_b, eps; forward: x = x', alpha', beta', q, r;
  // backward: q, r, dx = dx', dalpha', dbeta', the partial workspaces. Its h fields are
  // unused (H' is recomputed) and its n_tokens, d, n equal post's.
  HcPreParams pre;
};

// Shared memory of a block beyond hc_pre's layout, in accumulator elements: the staged
// post coefficients [rows][n(n+2)] and (backward) the post's dot partials
// [rows][warps][n(n+1)], in this order after hc_pre's.
__host__ __device__ inline int hc_boundary_extra_smem(int rows, int warps, int n, bool backward) {
  return rows * n * (n + 2) + (backward ? rows * warps * n * (n + 1) : 0);
}

// H'_{g0+k} (k < kG) of one chunk rounded to T (zero for streams >= n), from the
// streams' chunks h and y's chunk yv.
template <typename T, int kVec, int kN, int kG, typename acc>
__device__ __forceinline__ void hc_boundary_mix_group(const Vec<T, kVec> (&h)[kN], const Vec<T, kVec>& yv,
                                                      const acc* __restrict__ a_row, const acc* __restrict__ b_row,
                                                      int n, int g0, Vec<T, kVec> (&out)[kG]) {
#pragma unroll
  for (int k = 0; k < kG; ++k) {
    if (g0 + k < n) {
      acc o[kVec];
      hc_post_mix<T, kVec, kN>(h, yv, a_row, b_row[g0 + k], n, g0 + k, o);
#pragma unroll
      for (int v = 0; v < kVec; ++v) out[k].v[v] = from_acc<T>(o[v]);
    } else {
      out[k] = Vec<T, kVec>{};
    }
  }
}

// Forward phase 1, token reduction over H': for each group of streams, H' of every
// chunk is mixed, written (=) and accumulated into hc_pre's partial sums (q[i][j] =
// <H'_i, W_j>, q[i][kJ] = <H'_i, H'_i>), reduced and stored to part as in
// hc_pre_fwd_reduce. An invalid row stores zeros. Every lane of the warp calls it.
template <typename T, int kVec, int kN>
__device__ __forceinline__ void hc_boundary_fwd_reduce(const HcBoundaryParams& p, int64_t t, bool valid,
                                                       const acc_t<T>* __restrict__ a_row,
                                                       const acc_t<T>* __restrict__ b_row,
                                                       acc_t<T>* __restrict__ part, int warp, int lane) {
  using acc = acc_t<T>;
  using Cfg = HcPreConfig<kN, acc>;
  constexpr int kG = Cfg::kG;
  constexpr int kJ = Cfg::kJ;
  const HcPostParams& post = p.post;
  const int n = p.pre.n, J = n + 2;
  const int64_t d = p.pre.d;
  const int64_t step = static_cast<int64_t>(blockDim.x) * kVec;
  const acc* __restrict__ wt = static_cast<const acc*>(p.pre.wt_ptr);
  const T* __restrict__ h_tok = static_cast<const T*>(post.h_ptr) + (valid ? post.h_tok.offset(t) : 0);
  const T* __restrict__ y_tok = static_cast<const T*>(post.y_ptr) + (valid ? post.y_tok.offset(t) : 0);
  T* __restrict__ out_tok = static_cast<T*>(post.out_ptr) + (valid ? post.out_tok.offset(t) : 0);
#pragma unroll
  for (int g0 = 0; g0 < kN; g0 += kG) {
    if (g0 < n) {
      acc q[kG][kJ + 1];
      hc_pre_zero_partials(q);
      if (valid) {
        for (int64_t e = threadIdx.x * kVec; e < d; e += step) {
          Vec<T, kVec> h[kN];
          load_stream_chunks<T, kVec, kN>(h, h_tok, post.h_stream_stride, n, e, d);
          const Vec<T, kVec> yv = load_chunk_raw<T, kVec>(y_tok, e, d);
          Vec<T, kVec> hn[kG];
          hc_boundary_mix_group<T, kVec, kN, kG>(h, yv, a_row, b_row, n, g0, hn);
#pragma unroll
          for (int k = 0; k < kG; ++k) {
            if (g0 + k < n) store_chunk_raw<T, kVec>(out_tok + (g0 + k) * post.out_stream_stride, e, d, hn[k]);
          }
          hc_pre_accumulate<T, kVec, kG, kJ>(hn, wt, p.pre.ldw, J, e, q);
        }
      }
      hc_pre_store_partials<kN>(q, g0, part, warp, lane);
    }
  }
}

// Forward phase 3 (after hc_pre_fwd_coefs and a barrier): x' = Σ_k alpha'[k, 0]·H'_k
// written (=), H' recomputed from H and y (L1/L2 hits). No shuffles.
template <typename T, int kVec, int kN>
__device__ __forceinline__ void hc_boundary_fwd_write_x(const HcBoundaryParams& p, int64_t t,
                                                        const acc_t<T>* __restrict__ a_row,
                                                        const acc_t<T>* __restrict__ b_row,
                                                        const acc_t<T>* __restrict__ coef) {
  using acc = acc_t<T>;
  const HcPostParams& post = p.post;
  const int n = p.pre.n;
  const int64_t d = p.pre.d;
  const T* __restrict__ h_tok = static_cast<const T*>(post.h_ptr) + post.h_tok.offset(t);
  const T* __restrict__ y_tok = static_cast<const T*>(post.y_ptr) + post.y_tok.offset(t);
  T* __restrict__ x_tok = static_cast<T*>(p.pre.x_ptr) + p.pre.x_tok.offset(t);
  acc a0[kN];
#pragma unroll
  for (int i = 0; i < kN; ++i) a0[i] = i < n ? coef[i] : acc(0);
  for (int64_t e = threadIdx.x * kVec; e < d; e += static_cast<int64_t>(blockDim.x) * kVec) {
    Vec<T, kVec> h[kN];
    load_stream_chunks<T, kVec, kN>(h, h_tok, post.h_stream_stride, n, e, d);
    const Vec<T, kVec> yv = load_chunk_raw<T, kVec>(y_tok, e, d);
    acc x[kVec] = {};
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      if (k < n) {
        acc o[kVec];
        hc_post_mix<T, kVec, kN>(h, yv, a_row, b_row[k], n, k, o);
#pragma unroll
        for (int v = 0; v < kVec; ++v) x[v] += a0[k] * to_acc(from_acc<T>(o[v]));
      }
    }
    store_chunk<T, kVec>(x_tok, e, d, x);
  }
}

// A block's shared memory, hc_pre's layout then hc_boundary_extra_smem's, and this
// thread row's slices of it.
template <typename acc, int kN>
struct HcBoundaryBlock {
  HcPreSmem L;
  HcPreRowSmem<acc, kN> rs;
  acc* coef_s;  // [rows][alpha n(n+1) | beta n]: the post's coefficients of the tile
  acc* part_s;  // [rows][warps][n(n+1)]: the post's dot partials (backward)
  const acc* a_row;
  const acc* b_row;
};

template <typename acc, int kN>
__device__ __forceinline__ HcBoundaryBlock<acc, kN> hc_boundary_block(const HcBoundaryParams& p, acc* smem,
                                                                      bool backward) {
  const int rows = blockDim.y;
  const int warps = blockDim.x / kWarpSize;
  const int n = p.pre.n;
  HcBoundaryBlock<acc, kN> b;
  b.L = hc_pre_smem_layout<kN>(rows, warps, p.pre.ldw, backward, backward && p.pre.dw_in_smem);
  b.rs = hc_pre_row_smem<acc, kN>(smem, b.L, warps, threadIdx.y);
  b.coef_s = smem + b.L.total;
  b.part_s = b.coef_s + rows * n * (n + 2);
  b.a_row = b.coef_s + threadIdx.y * n * (n + 2);
  b.b_row = b.a_row + n * (n + 1);
  return b;
}

// Starts tile t0: the post's coefficients of its tokens staged (hc_tile_stage; with
// kPartials the post's dot partials zeroed too).
template <bool kPartials, typename acc, int kN>
__device__ __forceinline__ void hc_boundary_stage(const HcBoundaryParams& p, const HcBoundaryBlock<acc, kN>& b,
                                                  int64_t t0) {
  const int n = p.pre.n;
  hc_tile_stage<kPartials>(b.coef_s, t0, p.pre.n_tokens, n * (n + 2), n * (n + 1),
                           static_cast<const acc*>(p.post.a_ptr), p.post.a_token_stride, 1,
                           static_cast<const acc*>(p.post.b_ptr), p.post.b_token_stride, b.part_s,
                           kPartials ? static_cast<int>(blockDim.y * (blockDim.x / kWarpSize)) * n * (n + 1) : 0);
}

template <typename T, int kVec, int kN>
__global__ void __launch_bounds__(kHcPreThreads, HcPreConfig<kN, acc_t<T>>::kMinBlocks)
    hc_boundary_fwd_kernel(const HcBoundaryParams p) {
  using acc = acc_t<T>;
  extern __shared__ __align__(32) unsigned char hc_boundary_smem[];
  const HcBoundaryBlock<acc, kN> b = hc_boundary_block<acc, kN>(p, reinterpret_cast<acc*>(hc_boundary_smem), false);
  const int rows = blockDim.y;
  for (int64_t t0 = first_token_tile(rows); t0 < p.pre.n_tokens; t0 += token_tile_stride(rows)) {
    hc_boundary_stage<false>(p, b, t0);
    const int64_t t = t0 + threadIdx.y;
    const bool valid = t < p.pre.n_tokens;  // uniform over the row (whole warps)
    hc_boundary_fwd_reduce<T, kVec, kN>(p, t, valid, b.a_row, b.b_row, b.rs.part, threadIdx.x / kWarpSize,
                                        threadIdx.x % kWarpSize);
    __syncthreads();
    if (valid) hc_pre_fwd_coefs<acc, kN>(p.pre, t, b.rs.part, b.rs.coef, blockDim.x / kWarpSize);
    __syncthreads();
    if (valid) hc_boundary_fwd_write_x<T, kVec, kN>(p, t, b.a_row, b.b_row, b.rs.coef);
  }
}

// Backward phase 1, token reduction: g0_k = <dx', H'_k> over this thread's chunks (H'
// recomputed), warp-summed; lane 0 stores (=) the warp's value at part[warp][k][0] as
// hc_pre_bwd_reduce. An invalid row stores zeros. Every lane of the warp calls it.
template <typename T, int kVec, int kN>
__device__ __forceinline__ void hc_boundary_bwd_reduce(const HcBoundaryParams& p, int64_t t, bool valid,
                                                       const acc_t<T>* __restrict__ a_row,
                                                       const acc_t<T>* __restrict__ b_row,
                                                       acc_t<T>* __restrict__ part, int warp, int lane) {
  using acc = acc_t<T>;
  constexpr int kJ = HcPreConfig<kN, acc>::kJ;
  const HcPostParams& post = p.post;
  const int n = p.pre.n;
  const int64_t d = p.pre.d;
  acc g[kN];
#pragma unroll
  for (int k = 0; k < kN; ++k) g[k] = acc(0);
  if (valid) {
    const T* __restrict__ h_tok = static_cast<const T*>(post.h_ptr) + post.h_tok.offset(t);
    const T* __restrict__ y_tok = static_cast<const T*>(post.y_ptr) + post.y_tok.offset(t);
    const T* __restrict__ dx_tok = static_cast<const T*>(p.pre.dx_ptr) + p.pre.x_tok.offset(t);
    for (int64_t e = threadIdx.x * kVec; e < d; e += static_cast<int64_t>(blockDim.x) * kVec) {
      Vec<T, kVec> h[kN];
      load_stream_chunks<T, kVec, kN>(h, h_tok, post.h_stream_stride, n, e, d);
      const Vec<T, kVec> yv = load_chunk_raw<T, kVec>(y_tok, e, d);
      const Vec<T, kVec> gx = load_chunk_raw<T, kVec>(dx_tok, e, d);
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        if (k < n) {
          acc o[kVec];
          hc_post_mix<T, kVec, kN>(h, yv, a_row, b_row[k], n, k, o);
#pragma unroll
          for (int v = 0; v < kVec; ++v) g[k] += to_acc(from_acc<T>(o[v])) * to_acc(gx.v[v]);
        }
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kN; ++k) {
    if (k < n) {
      const acc v = warp_sum(g[k]);
      if (lane == 0) part[(warp * kN + k) * (kJ + 1)] = v;
    }
  }
}

// Backward phase 3 (after hc_pre_bwd_coef_sums and a barrier), chunk by chunk in a
// warp-uniform loop: dH'_k = G_k + hc_pre's term (hc_pre_bwd_chunk, which also adds the
// row's dW partial), rounded once to T and kept in registers; then hc_post's backward
// of the chunk from dH' (dy, dH written, the post's dot partials added to part).
template <typename T, int kVec, int kN>
__device__ __forceinline__ void hc_boundary_bwd_write(const HcBoundaryParams& p, int64_t t,
                                                      const acc_t<T>* __restrict__ a_row,
                                                      const acc_t<T>* __restrict__ b_row,
                                                      const HcPreRowSmem<acc_t<T>, kN>& rs, acc_t<T>* dw,
                                                      acc_t<T>* __restrict__ part, int lane) {
  using acc = acc_t<T>;
  constexpr int kG = HcPreConfig<kN, acc>::kG;
  const HcPostParams& post = p.post;
  const int n = p.pre.n;
  const int64_t d = p.pre.d;
  const HcPostTokenBwd<T> r = hc_post_token_bwd_rows<T>(post, t);
  const T* __restrict__ dx_tok = static_cast<const T*>(p.pre.dx_ptr) + p.pre.x_tok.offset(t);
  for (int64_t e0 = 0; e0 < d; e0 += static_cast<int64_t>(blockDim.x) * kVec) {
    const int64_t e = e0 + threadIdx.x * kVec;
    Vec<T, kVec> gn[kN];  // dH'
#pragma unroll
    for (int k = 0; k < kN; ++k) gn[k] = Vec<T, kVec>{};
    Vec<T, kVec> yv{};
    if (e < d) {
      Vec<T, kVec> h[kN];
      load_stream_chunks<T, kVec, kN>(h, r.h, post.h_stream_stride, n, e, d);
      yv = load_chunk_raw<T, kVec>(r.y, e, d);
      const Vec<T, kVec> gx = load_chunk_raw<T, kVec>(dx_tok, e, d);
      // gn holds G until hc_pre's term is added to it in place.
      hc_pre_bwd_chunk<T, kVec, kN>(
          p.pre, rs, dw, e, gx,
          [&](int g0, Vec<T, kVec>(&hg)[kG]) {
            hc_boundary_mix_group<T, kVec, kN, kG>(h, yv, a_row, b_row, n, g0, hg);
#pragma unroll
            for (int k = 0; k < kG; ++k) {
              if (g0 + k < n) gn[g0 + k] = load_chunk_raw<T, kVec>(r.g + (g0 + k) * post.g_stream_stride, e, d);
            }
          },
          [&](int g0, int s, const auto& dh) {
            constexpr int kSub = kHcSub<T, kVec>;
#pragma unroll
            for (int k = 0; k < kG; ++k) {
#pragma unroll
              for (int v = 0; v < kSub; ++v) {
                gn[g0 + k].v[s + v] = from_acc<T>(dh[k][v] + to_acc(gn[g0 + k].v[s + v]));
              }
            }
          },
          [](int) {});
    }
    hc_post_bwd_chunk<T, kVec, kN>(
        post, gn, yv, [&](int i) { return load_chunk_raw<T, kVec>(r.h + i * post.h_stream_stride, e, d); }, r.dh,
        r.dy, e, a_row, b_row, n, part, lane);
  }
}

template <typename T, int kVec, int kN>
__global__ void __launch_bounds__(kHcPreThreads, HcPreConfig<kN, acc_t<T>>::kMinBlocks)
    hc_boundary_bwd_kernel(const HcBoundaryParams p) {
  using acc = acc_t<T>;
  extern __shared__ __align__(32) unsigned char hc_boundary_smem[];
  acc* smem = reinterpret_cast<acc*>(hc_boundary_smem);
  const HcBoundaryBlock<acc, kN> b = hc_boundary_block<acc, kN>(p, smem, true);
  const int rows = blockDim.y;
  const int warps = blockDim.x / kWarpSize;
  const int n = p.pre.n;
  const int dots = n * (n + 1);
  acc* __restrict__ part = b.part_s + (threadIdx.y * warps + threadIdx.x / kWarpSize) * dots;
  acc* dw = hc_pre_bwd_begin<acc, kN>(p.pre, smem, b.L);
  for (int64_t t0 = first_token_tile(rows); t0 < p.pre.n_tokens; t0 += token_tile_stride(rows)) {
    hc_boundary_stage<true>(p, b, t0);
    const int64_t t = t0 + threadIdx.y;
    const bool valid = t < p.pre.n_tokens;  // uniform over the row (whole warps)
    hc_boundary_bwd_reduce<T, kVec, kN>(p, t, valid, b.a_row, b.b_row, b.rs.part, threadIdx.x / kWarpSize,
                                        threadIdx.x % kWarpSize);
    __syncthreads();
    if (valid) hc_pre_bwd_coef_terms<acc, kN>(p.pre, t, b.rs, warps);
    __syncthreads();
    if (valid) hc_pre_bwd_coef_sums<acc, kN>(p.pre, t, b.rs);
    __syncthreads();
    if (valid) hc_boundary_bwd_write<T, kVec, kN>(p, t, b.a_row, b.b_row, b.rs, dw, part, threadIdx.x % kWarpSize);
    __syncthreads();
    hc_post_write_coef_grads(p.post, b.part_s, t0, n, warps, dots);
  }
  __syncthreads();
  hc_pre_bwd_flush<acc, kN>(p.pre, smem, b.L);
}

// ---------------------------------------------------------------------------------
// The static (SHC) pre: connection i+1's pre is x' = Σ_k w_k·H'_k with w = A'[:, 0] (A'
// its static (n, n+1) parameter), a stream_mix, so the boundary needs no per-token
// reduction before x': one pass of hc_tile's mapping (kernels/hc_tile.cuh) each way.
//   forward   H'_k = beta_k·y + Σ_i alpha[i, 1+k]·H_i,  x' = Σ_k w_k·H'_k  (both written)
//   backward  dH'_k = G_k + w_k·dx'                      (one rounding, never stored)
//             dH_i, dy, dalpha, dbeta = hc_post's backward from dH'
//             dw_k = <dx', H'_k>                          (a row per token, as stream_mix's;
//                                                          the launcher sums them into dA')
// HBM per token as the dynamic boundary's: 2n·d + 2d forward, 3n·d + 3d backward.

struct HcBoundaryMixParams : HcPostParams {  // the post: H, y, alpha / beta, out = H'; g = G, dh, dy, da, db
  // x' (*lead, d), forward output; dx' (*lead, d), backward input.
  TokenLayout x_tok;
  TokenLayout dx_tok;
  const void* __restrict__ a_next_ptr;  // A' (n, n+1) contiguous, accumulator dtype: w = column 0
  void* __restrict__ x_ptr;
  const void* __restrict__ dx_ptr;
  void* __restrict__ dw_ptr;  // (N, n) contiguous rows, accumulator dtype
};

// Stages w = A'[:, 0] into w_s[0..n) once a block (every thread calls it; a barrier
// follows in the first hc_tile_stage).
template <typename acc>
__device__ __forceinline__ void hc_boundary_mix_stage_w(const HcBoundaryMixParams& p, int n, acc* __restrict__ w_s) {
  const acc* __restrict__ a_next = static_cast<const acc*>(p.a_next_ptr);
  for (int k = threadIdx.y * blockDim.x + threadIdx.x; k < n; k += blockDim.x * blockDim.y) w_s[k] = a_next[k * (n + 1)];
}

// Forward of token t by its row of threads: H' and x' over the d features (=). No
// barrier, no shuffle.
template <typename T, int kVec, int kN, typename acc>
__device__ __forceinline__ void hc_boundary_mix_token(const HcBoundaryMixParams& p, int64_t t,
                                                      const acc* __restrict__ a_row, const acc* __restrict__ b_row,
                                                      const acc* __restrict__ w_row, int n) {
  constexpr int kMax = kN > 0 ? kN : kMaxStreams;
  const T* __restrict__ h_tok = static_cast<const T*>(p.h_ptr) + p.h_tok.offset(t);
  const T* __restrict__ y_tok = static_cast<const T*>(p.y_ptr) + p.y_tok.offset(t);
  T* __restrict__ out_tok = static_cast<T*>(p.out_ptr) + p.out_tok.offset(t);
  T* __restrict__ x_tok = static_cast<T*>(p.x_ptr) + p.x_tok.offset(t);
  for (int64_t e = threadIdx.x * kVec; e < p.d; e += blockDim.x * kVec) {
    Vec<T, kVec> h[kMax];
    load_stream_chunks<T, kVec, kMax>(h, h_tok, p.h_stream_stride, n, e, p.d);
    const Vec<T, kVec> yv = load_chunk_raw<T, kVec>(y_tok, e, p.d);
    acc x[kVec];
#pragma unroll
    for (int v = 0; v < kVec; ++v) x[v] = acc(0);
#pragma unroll
    for (int k = 0; k < kMax; ++k) {
      if (k < n) {
        acc o[kVec];
        hc_post_mix<T, kVec, kMax>(h, yv, a_row, b_row[k], n, k, o);
        Vec<T, kVec> hk;
#pragma unroll
        for (int v = 0; v < kVec; ++v) {
          hk.v[v] = from_acc<T>(o[v]);
          x[v] += w_row[k] * to_acc(hk.v[v]);
        }
        store_chunk_raw<T, kVec>(out_tok + k * p.out_stream_stride, e, p.d, hk);
      }
    }
    store_chunk<T, kVec>(x_tok, e, p.d, x);
  }
}

// Backward of token t by its row of threads: dH' in registers, then hc_post's backward
// of the chunk; part holds the post's dots (hc_post_bwd_chunk) and dw's at n(n+1) + k
// (+=, lane 0). Every lane of the row calls it: the chunk loop is warp-uniform.
template <typename T, int kVec, int kN, typename acc>
__device__ __forceinline__ void hc_boundary_mix_token_bwd(const HcBoundaryMixParams& p, int64_t t,
                                                          const acc* __restrict__ a_row,
                                                          const acc* __restrict__ b_row,
                                                          const acc* __restrict__ w_row, int n,
                                                          acc* __restrict__ part, int lane) {
  constexpr int kMax = kN > 0 ? kN : kMaxStreams;
  const HcPostTokenBwd<T> r = hc_post_token_bwd_rows<T>(p, t);
  const T* __restrict__ dx_tok = static_cast<const T*>(p.dx_ptr) + p.dx_tok.offset(t);
  for (int64_t e0 = 0; e0 < p.d; e0 += static_cast<int64_t>(blockDim.x) * kVec) {
    const int64_t e = e0 + threadIdx.x * kVec;
    Vec<T, kVec> h[kMax];
    load_stream_chunks<T, kVec, kMax>(h, r.h, p.h_stream_stride, n, e, p.d);
    const Vec<T, kVec> yv = load_chunk_raw<T, kVec>(r.y, e, p.d);
    const Vec<T, kVec> gx = load_chunk_raw<T, kVec>(dx_tok, e, p.d);
    Vec<T, kVec> gn[kMax];  // dH'
    load_stream_chunks<T, kVec, kMax>(gn, r.g, p.g_stream_stride, n, e, p.d);
#pragma unroll
    for (int k = 0; k < kMax; ++k) {
      if (k < n) {
        acc o[kVec];
        hc_post_mix<T, kVec, kMax>(h, yv, a_row, b_row[k], n, k, o);
        const acc w = w_row[k];
        acc dot = acc(0);
#pragma unroll
        for (int v = 0; v < kVec; ++v) {
          const acc g = to_acc(gx.v[v]);
          dot += to_acc(from_acc<T>(o[v])) * g;
          gn[k].v[v] = from_acc<T>(to_acc(gn[k].v[v]) + w * g);
        }
        dot = warp_sum(dot);
        if (lane == 0) part[n * (n + 1) + k] += dot;
      }
    }
    hc_post_bwd_chunk<T, kVec, kMax>(
        p, gn, yv, [&](int i) { return load_chunk_raw<T, kVec>(r.h + i * p.h_stream_stride, e, p.d); }, r.dh, r.dy,
        e, a_row, b_row, n, part, lane);
  }
}

template <typename T, int kVec, int kN>
__global__ void __launch_bounds__(kTokenTileThreads, kHcTileMinBlocks)
    hc_boundary_mix_fwd_kernel(const HcBoundaryMixParams p) {
  using acc = acc_t<T>;
  const int n = kN > 0 ? kN : p.n;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int rows = blockDim.y;
  const int per_row = n * (n + 2);
  acc* __restrict__ coef_s = reinterpret_cast<acc*>(smem_raw);  // [rows][alpha n(n+1) | beta n]
  acc* __restrict__ w_s = coef_s + rows * per_row;               // [n]
  hc_boundary_mix_stage_w(p, n, w_s);
  for (int64_t t0 = first_token_tile(rows); t0 < p.n_tokens; t0 += token_tile_stride(rows)) {
    hc_tile_stage<false>(coef_s, t0, p.n_tokens, per_row, n * (n + 1), static_cast<const acc*>(p.a_ptr),
                         p.a_token_stride, 1, static_cast<const acc*>(p.b_ptr), p.b_token_stride, coef_s, 0);
    const int64_t t = t0 + threadIdx.y;
    if (t >= p.n_tokens) continue;
    const acc* __restrict__ a_row = coef_s + threadIdx.y * per_row;
    hc_boundary_mix_token<T, kVec, kN>(p, t, a_row, a_row + n * (n + 1), w_s, n);
  }
}

template <typename T, int kVec, int kN>
__global__ void __launch_bounds__(kTokenTileThreads, kHcTileMinBlocks)
    hc_boundary_mix_bwd_kernel(const HcBoundaryMixParams p) {
  using acc = acc_t<T>;
  const int n = kN > 0 ? kN : p.n;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int rows = blockDim.y;
  const int warps_per_row = blockDim.x / kWarpSize;
  const int per_row = n * (n + 2);
  const int dots = n * (n + 2);  // the post's n(n+1), then dw's n
  acc* __restrict__ coef_s = reinterpret_cast<acc*>(smem_raw);  // [rows][alpha | beta]
  acc* __restrict__ w_s = coef_s + rows * per_row;               // [n]
  acc* __restrict__ part_s = w_s + n;                            // [rows][warps][dots]
  hc_boundary_mix_stage_w(p, n, w_s);
  for (int64_t t0 = first_token_tile(rows); t0 < p.n_tokens; t0 += token_tile_stride(rows)) {
    hc_tile_stage<true>(coef_s, t0, p.n_tokens, per_row, n * (n + 1), static_cast<const acc*>(p.a_ptr),
                        p.a_token_stride, 1, static_cast<const acc*>(p.b_ptr), p.b_token_stride, part_s,
                        rows * warps_per_row * dots);
    const int64_t t = t0 + threadIdx.y;
    if (t < p.n_tokens) {  // warp-uniform: rows are whole warps
      const acc* __restrict__ a_row = coef_s + threadIdx.y * per_row;
      acc* __restrict__ part = part_s + (threadIdx.y * warps_per_row + threadIdx.x / kWarpSize) * dots;
      hc_boundary_mix_token_bwd<T, kVec, kN>(p, t, a_row, a_row + n * (n + 1), w_s, n, part,
                                             threadIdx.x % kWarpSize);
    }
    __syncthreads();
    hc_post_write_coef_grads(p, part_s, t0, n, warps_per_row, dots);
    hc_tile_write_dots(part_s, t0, p.n_tokens, warps_per_row, dots, n, [n](int j) { return n * (n + 1) + j; },
                       static_cast<acc*>(p.dw_ptr));
  }
}

}  // namespace crosslayer
