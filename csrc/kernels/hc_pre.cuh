// hc_pre for dynamic Hyper-Connections (DHC): coefficients and layer input in one pass.
//
// Math, per token t (n streams H_i of d features; W: (d, n+2); J = n + 2):
//   forward
//     r_i        = rsqrt(Σ_e H_i[e]² / d + eps)                    (n values)
//     q_ij       = Σ_e H_i[e]·W[e, j]                                (n·J values)
//     t_ij       = tanh(r_i·q_ij)
//     alpha[i,j] = A[i,j] + s_a·t_ij      (j <= n)                   (= per token)
//     beta[i]    = B[i]   + s_b·t_i,n+1                              (= per token)
//     x[e]       = Σ_i alpha[i,0]·H_i[e]                             (= activation dtype)
//   q and r are written too (= per token, accumulator dtype): the backward takes them
//   instead of recomputing the projection.
//   backward, for dx, dalpha, dbeta (dalpha/dbeta optional: zero when absent)
//     g0_i   = <dx, H_i>
//     G_ij   = dalpha[i,j] + [j == 0]·g0_i (j <= n),  G_i,n+1 = dbeta[i]
//     dq_ij  = r_i·s_j·G_ij·(1 − t_ij²)    with s_j = s_a (j <= n), s_b (j = n+1)
//     dr_i   = Σ_j s_j·G_ij·(1 − t_ij²)·q_ij
//     dH_i[e] = alpha[i,0]·dx[e] + Σ_j dq_ij·W[e,j] − dr_i·r_i³/d·H_i[e]
//                                         (= written; += with accumulate_dh, the sum
//                                          rounded from the two activation-dtype terms)
//     dW[e,j] += Σ_i H_i[e]·dq_ij;   dA[i,j] += G_ij;   dB[i] += G_i,n+1;
//     ds_a += Σ_{i, j<=n} G_ij·t_ij;  ds_b += Σ_i G_i,n+1·t_i,n+1     (over tokens)
//   The token sums are per-block partials (the `+=` above accumulate over a block's
//   tokens in a fixed order, starting from zero), written to a workspace of one slice
//   per block; the launcher sums the slices with at::sum. No atomics: two runs give
//   bit-identical gradients.
//
// Thread mapping: a block is (threads_x, rows). Each row of threads (whole warps) owns
// one token at a time; thread x handles the feature chunks x, x + threads_x, ... of
// kVec contiguous elements (16-byte accesses), the first kCache of them kept in
// registers (raw, not widened) between the reduction and the write pass, the rest
// re-read (from L2, as the token was just read). Blocks stride over tokens.
// Per token: (1) each thread accumulates its partial sums, a warp reduces them by
// shuffles and lane 0 stores the warp's value in shared memory; (2) after a barrier,
// the threads of the row sum the warps' values in warp order and compute the per-token
// coefficients (the backward: one (stream, projection) pair a thread, then after a
// barrier one stream a thread for the sums over projections); (3) after another
// barrier, the write pass.
// W and the dW partials are stored transposed, (J, ldw) with ldw a multiple of 8
// (zero padding), so a thread's W chunk for projection j is one aligned vector and the
// W chunk of a projection is read once for all streams of a group.
// n is a template bound kN (2, 4, 8 exact; 16 for any other n <= 16, with runtime
// predicates `if (i < n)`); streams are processed in groups of kG <= 4 (HcPreConfig)
// and every register array is indexed by compile-time constants only (fully unrolled
// loops). The chunk math works on 16-byte sub-chunks of the accumulator dtype.
//
// Assumptions (checked by the launcher):
//   1) features have unit stride in H, dH and dx; token and stream strides are free
//      (tokens addressed through TokenLayout);
//   2) with kVec > 1, every base pointer is 16-byte aligned and every token/stream
//      stride is a multiple of kVec, so each full chunk is one 16-byte access;
//   3) 1 <= n <= 16, d >= 1; coefficients, W, q, r in the accumulator dtype, contiguous.
#pragma once

#include "common/std.cuh"

#include "common/limits.h"
#include "common/math.cuh"
#include "common/reduce.cuh"
#include "common/tokens.cuh"
#include "common/vec.cuh"

namespace crosslayer {

constexpr int kHcPreThreads = 256;

// Streams per group and chunks cached in registers, by compile-time stream bound kN.
// A raw chunk is 4 registers whatever the dtype. Groups of at most 4 streams keep the
// per-thread partial sums (kG·(kJ + 1)), the widened chunk values (kG·kVec) and the dH
// accumulators (kG·kVec) within the register budget of 2 blocks of 256 threads per SM;
// for n = 8 the W chunks are read twice per token (from L1).
template <int kN, typename acc>
struct HcPreConfig {
  // fp64 (gradcheck and tests, not speed) halves the group: its registers are twice as wide.
  // The generic instantiation (kJ = 18) also halves it: its partial sums are kG·19.
  static constexpr int kG = kN < 4 ? kN : (sizeof(acc) == 8 || kN == kMaxStreams ? 2 : 4);
  // Resident 256-thread blocks asked of ptxas: 2 (at most 128 registers a thread); 1 for
  // fp64, a correctness dtype whose generic instantiation does not fit 128.
  static constexpr int kMinBlocks = sizeof(acc) == 8 ? 1 : 2;
  static constexpr int kJ = kN + 2;  // bound on the projections per stream
  // Chunks kept in registers between the reduction and the write pass: only for n = 2
  // (beyond it they do not fit 128 registers); otherwise the write pass re-reads the
  // token's H (an L2 hit: the same block read it a few microseconds earlier).
  static constexpr int kFwdCache = kN == 2 ? 1 : 0;
  static constexpr int kBwdCache = kN == 2 ? 1 : 0;
};

struct HcPreParams {
  using index_t = int64_t;
  index_t n_tokens;  // N
  index_t d;         // features
  int n;             // streams
  index_t ldw;       // row stride of the transposed W / dW partials (multiple of 8)
  // H (N, n, d) activation dtype: tokens via h_tok, streams h_stream_stride apart.
  TokenLayout h_tok;
  index_t h_stream_stride;
  // x / dx (N, d): tokens via x_tok.
  TokenLayout x_tok;
  // dH (N, n, d), backward output.
  TokenLayout dh_tok;
  index_t dh_stream_stride;
  double eps;
  const void* __restrict__ h_ptr;
  const void* __restrict__ wt_ptr;  // W transposed (J, ldw), accumulator dtype
  const void* __restrict__ a_ptr;   // A (n, n+1)
  const void* __restrict__ b_ptr;   // B (n)
  const void* __restrict__ sa_ptr;  // s_a, 0-dim
  const void* __restrict__ sb_ptr;  // s_b, 0-dim
  // forward outputs
  void* __restrict__ x_ptr;      // x (N, d) activation dtype
  void* __restrict__ alpha_ptr;  // (N, n, n+1) contiguous
  void* __restrict__ beta_ptr;   // (N, n)
  void* __restrict__ q_ptr;      // (N, n, J)
  void* __restrict__ r_ptr;      // (N, n)
  // backward inputs (q_ptr, r_ptr above are read) and outputs
  const void* __restrict__ dx_ptr;
  const void* __restrict__ dalpha_ptr;  // (N, n, n+1) contiguous, or null (zero)
  const void* __restrict__ dbeta_ptr;   // (N, n) contiguous, or null (zero)
  void* __restrict__ dh_ptr;
  // Per-block partials: dW slices (grid, J, ldw) and coefficient slices (grid, n, n+4)
  // holding, per stream i, dA[i, 0..n], dB[i], ds_a part, ds_b part.
  void* __restrict__ dw_ws_ptr;
  void* __restrict__ coef_ws_ptr;
  bool accumulate_dh;  // dH += (true: another op's dH contribution is there) or dH = (false)
  bool dw_in_smem;  // dW partial of each row in shared memory (else in dw_ws, rows = 1)
};

// Number of coefficient-partial entries per stream: dA[i, 0..n], dB[i], ds_a, ds_b.
__host__ __device__ constexpr int hc_pre_coef_stride(int n) { return n + 4; }

// Shared-memory layout of a block, in accumulator elements (offsets from the start).
struct HcPreSmem {
  int part;    // [rows][warps][kN][kJ + 1]   warp partial sums
  int coef;    // [rows][kN]                   alpha[i, 0] of the row's token
  int dq;      // [rows][kN][kJ]               backward: dq of the row's token
  int scale;   // [rows][kN]                   backward: dr_i·r_i³/d
  int cpart;   // [rows][kN][kN + 4]           backward: coefficient partials
  int term;    // [rows][kN][kJ][2]            backward: dp_ij·q_ij and G_ij·tanh_ij
  int dw;      // [rows][kJ][ldw]              backward, dw_in_smem: dW partials
  int total;
};

template <int kN>
__host__ __device__ inline HcPreSmem hc_pre_smem_layout(int rows, int warps, int64_t ldw,
                                                        bool backward, bool dw_in_smem) {
  constexpr int kJ = kN + 2;
  HcPreSmem s;
  int off = 0;
  s.part = off;
  off += rows * warps * kN * (kJ + 1);
  s.coef = off;
  off += rows * kN;
  s.dq = off;
  s.scale = off;
  s.cpart = off;
  s.term = off;
  s.dw = off;
  if (backward) {
    s.dq = off;
    off += rows * kN * kJ;
    s.scale = off;
    off += rows * kN;
    s.cpart = off;
    off += rows * kN * hc_pre_coef_stride(kN);
    s.term = off;
    off += rows * kN * kJ * 2;
    off = (off + 7) / 8 * 8;  // 32-byte alignment of the dW rows (fp32)
    s.dw = off;
    if (dw_in_smem) off += static_cast<int>(rows * kJ * ldw);
  }
  s.total = off;
  return s;
}

// The accumulator-dtype chunk [e, e + kVec) of row `row` of a transposed (J, ldw)
// matrix; ldw is a multiple of 8 and the storage zero-padded, so no tail check.
template <typename acc, int kVec>
__device__ __forceinline__ Vec<acc, kVec> load_w_chunk(const acc* row, int64_t e) {
  return *reinterpret_cast<const Vec<acc, kVec>*>(row + e);
}

// Loads the group's stream chunks [e, e + kVec) of one token (zero for streams >= n).
template <typename T, int kVec, int kG>
__device__ __forceinline__ void hc_load_streams(const T* __restrict__ h_tok, int64_t stream_stride,
                                                int g0, int n, int64_t e, int64_t d,
                                                Vec<T, kVec> (&h)[kG]) {
#pragma unroll
  for (int i = 0; i < kG; ++i) {
    h[i] = (g0 + i < n) ? load_chunk_raw<T, kVec>(h_tok + (g0 + i) * stream_stride, e, d)
                        : Vec<T, kVec>{};
  }
}

// Width of the sub-chunks the chunk math works on: one 16-byte vector of the
// accumulator dtype (4 floats, 2 doubles), so that a 16-bit chunk of 8 elements is
// widened half at a time and the widened values stay within the register budget.
template <typename T, int kVec>
constexpr int kHcSub = kVec < 16 / static_cast<int>(sizeof(acc_t<T>)) ? kVec : 16 / static_cast<int>(sizeof(acc_t<T>));

// Forward partial sums of one chunk: q[i][j] += <H_i, W_j>, q[i][kJ] += <H_i, H_i>.
template <typename T, int kVec, int kG, int kJ>
__device__ __forceinline__ void hc_pre_accumulate(const Vec<T, kVec> (&h)[kG],
                                                  const acc_t<T>* __restrict__ wt, int64_t ldw,
                                                  int J, int64_t e, acc_t<T> (&q)[kG][kJ + 1]) {
  using acc = acc_t<T>;
  constexpr int kSub = kHcSub<T, kVec>;
#pragma unroll
  for (int s = 0; s < kVec; s += kSub) {
    acc hv[kG][kSub];
#pragma unroll
    for (int i = 0; i < kG; ++i) {
#pragma unroll
      for (int k = 0; k < kSub; ++k) {
        hv[i][k] = to_acc(h[i].v[s + k]);
        q[i][kJ] += hv[i][k] * hv[i][k];
      }
    }
#pragma unroll
    for (int j = 0; j < kJ; ++j) {
      if (j < J) {
        const Vec<acc, kSub> w = load_w_chunk<acc, kSub>(wt + j * ldw, e + s);
#pragma unroll
        for (int i = 0; i < kG; ++i) {
#pragma unroll
          for (int k = 0; k < kSub; ++k) q[i][j] += hv[i][k] * w.v[k];
        }
      }
    }
  }
}

// The per-row shared-memory slices of a block (thread row ty); dq, scale and cpart are
// the backward's.
template <typename acc, int kN>
struct HcPreRowSmem {
  acc* part;   // [warps][kN][kJ + 1]  warp partial sums
  acc* coef;   // [kN]                 alpha[i, 0] of the row's token
  acc* dq;     // [kN][kJ]
  acc* scale;  // [kN]                 dr_i·r_i³/d
  acc* cpart;  // [kN][kN + 4]         coefficient partials
  acc* term;   // [kN][kJ][2]          dp_ij·q_ij, G_ij·tanh_ij
};

template <typename acc, int kN>
__device__ __forceinline__ HcPreRowSmem<acc, kN> hc_pre_row_smem(acc* smem, const HcPreSmem& L, int warps, int ty) {
  constexpr int kJ = kN + 2;
  HcPreRowSmem<acc, kN> r;
  r.part = smem + L.part + ty * warps * kN * (kJ + 1);
  r.coef = smem + L.coef + ty * kN;
  r.dq = smem + L.dq + ty * kN * kJ;
  r.scale = smem + L.scale + ty * kN;
  r.cpart = smem + L.cpart + ty * kN * hc_pre_coef_stride(kN);
  r.term = smem + L.term + ty * kN * kJ * 2;
  return r;
}

// Zeroes a group's partial sums q[kG][kJ + 1] before its token reduction.
template <int kG, int kJ1, typename acc>
__device__ __forceinline__ void hc_pre_zero_partials(acc (&q)[kG][kJ1]) {
#pragma unroll
  for (int i = 0; i < kG; ++i) {
#pragma unroll
    for (int j = 0; j < kJ1; ++j) q[i][j] = acc(0);
  }
}

// The end of a group's token reduction: the thread's partial sums q[i][j] of streams
// g0 .. g0 + kG reduced across the warp by a reduce-scatter; lane l stores (=) the
// warp's value l (i = l / (kJ + 1), j = l % (kJ + 1)) at part[warp][g0·(kJ + 1) + l].
// kJ1 = kJ + 1. Every lane of the warp must call it (shuffles).
template <int kN, int kG, int kJ1, typename acc>
__device__ __forceinline__ void hc_pre_store_partials(const acc (&q)[kG][kJ1], int g0, acc* __restrict__ part,
                                                      int warp, int lane) {
  constexpr int kM = kG * kJ1;
  constexpr int kB = (kM + kWarpSize - 1) / kWarpSize;
  acc flat[kM];
#pragma unroll
  for (int i = 0; i < kG; ++i) {
#pragma unroll
    for (int j = 0; j < kJ1; ++j) flat[i * kJ1 + j] = q[i][j];
  }
  acc sums[kB];
  warp_reduce_scatter<kM>(flat, lane, sums);
#pragma unroll
  for (int b = 0; b < kB; ++b) {
    const int m = b * kWarpSize + lane;
    if (m < kM) part[(warp * kN + g0) * kJ1 + m] = sums[b];
  }
}

// Forward phase 1, token reduction: for each group of streams, q[i][j] = <H_i, W_j>
// (j < J) and q[i][kJ] = <H_i, H_i> over this thread's chunks, warp-reduced by a
// reduce-scatter; lane l of the warp stores (=) the warp's value l of the group at
// part[warp][g0·(kJ+1) + l]. The first kCache chunks are kept in `cache` (raw). An
// invalid row (no token) stores zeros. Every lane of the warp must call it (shuffles).
template <typename T, int kVec, int kN, int kCacheSlots>
__device__ __forceinline__ void hc_pre_fwd_reduce(const HcPreParams& p, const T* __restrict__ h_tok, bool valid,
                                                  acc_t<T>* __restrict__ part, Vec<T, kVec> (&cache)[kCacheSlots][kN],
                                                  int warp, int lane) {
  using acc = acc_t<T>;
  using Cfg = HcPreConfig<kN, acc>;
  constexpr int kG = Cfg::kG;
  constexpr int kJ = Cfg::kJ;
  constexpr int kCache = Cfg::kFwdCache;
  const int n = p.n, J = n + 2;
  const int64_t d = p.d;
  const int64_t step = static_cast<int64_t>(blockDim.x) * kVec;
  const acc* __restrict__ wt = static_cast<const acc*>(p.wt_ptr);
#pragma unroll
  for (int g0 = 0; g0 < kN; g0 += kG) {
    if (g0 < n) {
      acc q[kG][kJ + 1];
      hc_pre_zero_partials(q);
      if (valid) {
#pragma unroll
        for (int c = 0; c < kCache; ++c) {
          const int64_t e = threadIdx.x * kVec + c * step;
          Vec<T, kVec> h[kG];
          hc_load_streams<T, kVec, kG>(h_tok, p.h_stream_stride, g0, n, e < d ? e : d, d, h);
#pragma unroll
          for (int i = 0; i < kG; ++i) cache[c][g0 + i] = h[i];
          if (e < d) hc_pre_accumulate<T, kVec, kG, kJ>(h, wt, p.ldw, J, e, q);
        }
        for (int64_t e = threadIdx.x * kVec + kCache * step; e < d; e += step) {
          Vec<T, kVec> h[kG];
          hc_load_streams<T, kVec, kG>(h_tok, p.h_stream_stride, g0, n, e, d, h);
          hc_pre_accumulate<T, kVec, kG, kJ>(h, wt, p.ldw, J, e, q);
        }
      }
      hc_pre_store_partials<kN>(q, g0, part, warp, lane);
    }
  }
}

// Forward phase 2, per-token coefficients (after a barrier), one (stream, projection)
// pair per thread of the row: the warps' sums in warp order give r_i and q_ij;
// t_ij = tanh(r_i·q_ij); q, r, alpha, beta of token t written (=), alpha[i, 0] also to
// coef[i]. No shuffles.
template <typename acc, int kN>
__device__ __forceinline__ void hc_pre_fwd_coefs(const HcPreParams& p, int64_t t, const acc* __restrict__ part,
                                                 acc* __restrict__ coef, int warps) {
  constexpr int kJ = kN + 2;
  const int n = p.n, J = n + 2;
  const acc* __restrict__ A = static_cast<const acc*>(p.a_ptr);
  const acc* __restrict__ B = static_cast<const acc*>(p.b_ptr);
  const acc s_a = *static_cast<const acc*>(p.sa_ptr);
  const acc s_b = *static_cast<const acc*>(p.sb_ptr);
  for (int idx = threadIdx.x; idx < n * J; idx += blockDim.x) {
    const int i = idx / J;
    const int j = idx % J;
    acc ss = acc(0), qij = acc(0);
    for (int w = 0; w < warps; ++w) {
      const acc* pw = part + (w * kN + i) * (kJ + 1);
      ss += pw[kJ];
      qij += pw[j];
    }
    const acc r = acc_rsqrt(ss / static_cast<acc>(p.d) + static_cast<acc>(p.eps));
    const acc th = acc_tanh(r * qij);
    static_cast<acc*>(p.q_ptr)[(t * n + i) * J + j] = qij;
    if (j == 0) static_cast<acc*>(p.r_ptr)[t * n + i] = r;
    if (j <= n) {
      const acc a = A[i * (n + 1) + j] + s_a * th;
      static_cast<acc*>(p.alpha_ptr)[(t * n + i) * (n + 1) + j] = a;
      if (j == 0) coef[i] = a;
    } else {
      static_cast<acc*>(p.beta_ptr)[t * n + i] = B[i] + s_b * th;
    }
  }
}

// Forward phase 3, the write pass (after a barrier): x = Σ_i alpha[i, 0]·H_i written (=)
// chunk by chunk, from `cache` for the first kCache chunks, re-read otherwise. No
// shuffles.
template <typename T, int kVec, int kN, int kCacheSlots>
__device__ __forceinline__ void hc_pre_fwd_write_x(const HcPreParams& p, int64_t t, const T* __restrict__ h_tok,
                                                   const acc_t<T>* __restrict__ coef,
                                                   const Vec<T, kVec> (&cache)[kCacheSlots][kN]) {
  using acc = acc_t<T>;
  using Cfg = HcPreConfig<kN, acc>;
  constexpr int kG = Cfg::kG;
  constexpr int kCache = Cfg::kFwdCache;
  const int n = p.n;
  const int64_t d = p.d;
  const int64_t step = static_cast<int64_t>(blockDim.x) * kVec;
  T* __restrict__ x_tok = static_cast<T*>(p.x_ptr) + p.x_tok.offset(t);
  acc a0[kN];
#pragma unroll
  for (int i = 0; i < kN; ++i) a0[i] = i < n ? coef[i] : acc(0);
#pragma unroll
  for (int c = 0; c < kCache; ++c) {
    const int64_t e = threadIdx.x * kVec + c * step;
    if (e < d) {
      acc x[kVec] = {};
#pragma unroll
      for (int i = 0; i < kN; ++i) {
        if (i < n) {
#pragma unroll
          for (int k = 0; k < kVec; ++k) x[k] += a0[i] * to_acc(cache[c][i].v[k]);
        }
      }
      store_chunk<T, kVec>(x_tok, e, d, x);
    }
  }
  for (int64_t e = threadIdx.x * kVec + kCache * step; e < d; e += step) {
    acc x[kVec] = {};
#pragma unroll
    for (int g0 = 0; g0 < kN; g0 += kG) {
      if (g0 < n) {
        Vec<T, kVec> h[kG];
        hc_load_streams<T, kVec, kG>(h_tok, p.h_stream_stride, g0, n, e, d, h);
#pragma unroll
        for (int i = 0; i < kG; ++i) {
#pragma unroll
          for (int k = 0; k < kVec; ++k) x[k] += a0[g0 + i] * to_acc(h[i].v[k]);
        }
      }
    }
    store_chunk<T, kVec>(x_tok, e, d, x);
  }
}

template <typename T, int kVec, int kN>
__global__ void __launch_bounds__(kHcPreThreads, HcPreConfig<kN, acc_t<T>>::kMinBlocks)
    hc_pre_fwd_kernel(const HcPreParams p) {
  using acc = acc_t<T>;
  constexpr int kCacheSlots = HcPreConfig<kN, acc>::kFwdCache > 0 ? HcPreConfig<kN, acc>::kFwdCache : 1;
  extern __shared__ __align__(32) unsigned char hc_pre_smem[];
  acc* smem = reinterpret_cast<acc*>(hc_pre_smem);
  const int rows = blockDim.y;
  const int warps = blockDim.x / kWarpSize;
  const HcPreSmem L = hc_pre_smem_layout<kN>(rows, warps, p.ldw, false, false);
  const HcPreRowSmem<acc, kN> rs = hc_pre_row_smem<acc, kN>(smem, L, warps, threadIdx.y);
  const T* __restrict__ H = static_cast<const T*>(p.h_ptr);
  for (int64_t t0 = first_token_tile(rows); t0 < p.n_tokens; t0 += token_tile_stride(rows)) {
    const int64_t t = t0 + threadIdx.y;
    const bool valid = t < p.n_tokens;  // uniform over the row (whole warps)
    const T* __restrict__ h_tok = H + (valid ? p.h_tok.offset(t) : 0);
    Vec<T, kVec> cache[kCacheSlots][kN];
    // (1) partial sums, one group of streams at a time.
    hc_pre_fwd_reduce<T, kVec, kN>(p, h_tok, valid, rs.part, cache, threadIdx.x / kWarpSize,
                                   threadIdx.x % kWarpSize);
    __syncthreads();
    // (2) coefficients.
    if (valid) hc_pre_fwd_coefs<acc, kN>(p, t, rs.part, rs.coef, warps);
    __syncthreads();
    // (3) x = Σ_i alpha[i, 0]·H_i.
    if (valid) hc_pre_fwd_write_x<T, kVec, kN>(p, t, h_tok, rs.coef, cache);
  }
}

// Backward phase 1, token reduction: g0_i = <dx, H_i> over this thread's chunks,
// warp-summed; lane 0 stores (=) the warp's value at part[warp][i][0]. The first kCache
// chunks of H (hc) and dx (gc) are kept in registers. An invalid row stores zeros. No
// barrier needed before it: a thread writing `part` here has passed the barrier after
// phase 2 of the previous tile, so its readers are done. Every lane of the warp must
// call it (shuffles).
template <typename T, int kVec, int kN, int kCacheSlots>
__device__ __forceinline__ void hc_pre_bwd_reduce(const HcPreParams& p, const T* __restrict__ h_tok,
                                                  const T* __restrict__ dx_tok, bool valid,
                                                  acc_t<T>* __restrict__ part, Vec<T, kVec> (&hc)[kCacheSlots][kN],
                                                  Vec<T, kVec> (&gc)[kCacheSlots], int warp, int lane) {
  using acc = acc_t<T>;
  using Cfg = HcPreConfig<kN, acc>;
  constexpr int kG = Cfg::kG;
  constexpr int kJ = Cfg::kJ;
  constexpr int kCache = Cfg::kBwdCache;
  const int n = p.n;
  const int64_t d = p.d;
  const int64_t step = static_cast<int64_t>(blockDim.x) * kVec;
#pragma unroll
  for (int g0 = 0; g0 < kN; g0 += kG) {
    if (g0 < n) {
      acc g[kG];
#pragma unroll
      for (int i = 0; i < kG; ++i) g[i] = acc(0);
      if (valid) {
#pragma unroll
        for (int c = 0; c < kCache; ++c) {
          const int64_t e = threadIdx.x * kVec + c * step;
          const int64_t ec = e < d ? e : d;
          Vec<T, kVec> h[kG];
          hc_load_streams<T, kVec, kG>(h_tok, p.h_stream_stride, g0, n, ec, d, h);
          if (g0 == 0) gc[c] = load_chunk_raw<T, kVec>(dx_tok, ec, d);
#pragma unroll
          for (int i = 0; i < kG; ++i) {
            hc[c][g0 + i] = h[i];
#pragma unroll
            for (int k = 0; k < kVec; ++k) g[i] += to_acc(h[i].v[k]) * to_acc(gc[c].v[k]);
          }
        }
        for (int64_t e = threadIdx.x * kVec + kCache * step; e < d; e += step) {
          Vec<T, kVec> h[kG];
          hc_load_streams<T, kVec, kG>(h_tok, p.h_stream_stride, g0, n, e, d, h);
          const Vec<T, kVec> gx = load_chunk_raw<T, kVec>(dx_tok, e, d);
#pragma unroll
          for (int i = 0; i < kG; ++i) {
#pragma unroll
            for (int k = 0; k < kVec; ++k) g[i] += to_acc(h[i].v[k]) * to_acc(gx.v[k]);
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kG; ++i) {
        const acc v = warp_sum(g[i]);
        if (lane == 0 && g0 + i < kN) part[(warp * kN + g0 + i) * (kJ + 1)] = v;
      }
    }
  }
}

// Backward phase 2a, per-token coefficients (after a barrier): one (stream i, projection
// j) pair per thread of the row (pairs x, x + blockDim.x, ... of the n·(n+2)), so every
// thread issues its q_ij, dalpha_ij (dbeta_i), r_i loads at once instead of a thread a
// stream walking j: G_ij, dq_ij (= to dq), the terms dp_ij·q_ij and G_ij·tanh_ij (= to
// term, for phase 2b), dA[i, j] / dB[i] (+= to cpart[i][j], the pair's own entry) and,
// for j = 0, alpha[i, 0] (= to coef). No shuffles.
template <typename acc, int kN>
__device__ __forceinline__ void hc_pre_bwd_coef_terms(const HcPreParams& p, int64_t t,
                                                      const HcPreRowSmem<acc, kN>& rs, int warps) {
  constexpr int kJ = kN + 2;
  const int n = p.n, J = n + 2;
  const acc* __restrict__ A = static_cast<const acc*>(p.a_ptr);
  const acc* __restrict__ q_in = static_cast<const acc*>(p.q_ptr);
  const acc* __restrict__ r_in = static_cast<const acc*>(p.r_ptr);
  const acc* __restrict__ dalpha = static_cast<const acc*>(p.dalpha_ptr);
  const acc* __restrict__ dbeta = static_cast<const acc*>(p.dbeta_ptr);
  const acc s_a = *static_cast<const acc*>(p.sa_ptr);
  const acc s_b = *static_cast<const acc*>(p.sb_ptr);
  for (int x = threadIdx.x; x < n * J; x += blockDim.x) {
    const int i = x / J, j = x % J;
    const acc qij = q_in[(t * n + i) * J + j];
    const acc r = r_in[t * n + i];
    acc G = j <= n ? (dalpha != nullptr ? dalpha[(t * n + i) * (n + 1) + j] : acc(0))
                   : (dbeta != nullptr ? dbeta[t * n + i] : acc(0));
    if (j == 0) {
      acc g0v = acc(0);
      for (int w = 0; w < warps; ++w) g0v += rs.part[(w * kN + i) * (kJ + 1)];
      G += g0v;
    }
    const acc th = acc_tanh(r * qij);
    const acc s = j <= n ? s_a : s_b;
    if (j == 0) rs.coef[i] = A[i * (n + 1)] + s_a * th;
    rs.cpart[i * hc_pre_coef_stride(kN) + j] += G;  // dA[i, j] for j <= n, dB[i] at j = n + 1
    const acc dp = s * G * (acc(1) - th * th);
    rs.dq[i * kJ + j] = r * dp;
    rs.term[(i * kJ + j) * 2] = dp * qij;
    rs.term[(i * kJ + j) * 2 + 1] = G * th;
  }
}

// Backward phase 2b (after a barrier), one stream i per thread of the row: the sums over
// j of phase 2a's terms, in j order: scale_i = dr_i·r_i³/d (=, dr_i = Σ_j dp_ij·q_ij),
// ds_a += Σ_{j<=n} G_ij·tanh_ij and ds_b += G_i,n+1·tanh_i,n+1 (cpart[i]).
template <typename acc, int kN>
__device__ __forceinline__ void hc_pre_bwd_coef_sums(const HcPreParams& p, int64_t t,
                                                     const HcPreRowSmem<acc, kN>& rs) {
  constexpr int kJ = kN + 2;
  const int n = p.n;
  const acc* __restrict__ r_in = static_cast<const acc*>(p.r_ptr);
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const acc* __restrict__ tm = rs.term + i * kJ * 2;
    acc dr = acc(0), ga = acc(0);
    for (int j = 0; j <= n; ++j) {
      dr += tm[2 * j];
      ga += tm[2 * j + 1];
    }
    dr += tm[2 * (n + 1)];
    acc* cp = rs.cpart + i * hc_pre_coef_stride(kN);
    cp[n + 2] += ga;                    // ds_a
    cp[n + 3] += tm[2 * (n + 1) + 1];  // ds_b
    const acc r = r_in[t * n + i];
    rs.scale[i] = dr * r * r * r / static_cast<acc>(p.d);
  }
}

// Backward phase 3, one chunk [e, e + kVec) of the write pass: for each group of
// streams (values from load_group(g0, h): the register cache, memory, or recomputed),
// the term dH_i = alpha[i, 0]·dx − scale_i·H_i + Σ_j dq_ij·W_j in the accumulator dtype,
// handed out a 16-byte sub-chunk at a time, emit(g0, s, dh) with dh[i][k] the term of
// stream g0 + i at feature e + s + k, then flush(g0) once the group is complete; and
// dw[j] += Σ_i dq_ij·H_i (the row's dW partial: this thread's own entries). No shuffles.
template <typename T, int kVec, int kN, typename LoadGroup, typename Emit, typename Flush>
__device__ __forceinline__ void hc_pre_bwd_chunk(const HcPreParams& p, const HcPreRowSmem<acc_t<T>, kN>& rs,
                                                 acc_t<T>* dw, int64_t e, const Vec<T, kVec>& gx,
                                                 LoadGroup&& load_group, Emit&& emit, Flush&& flush) {
  using acc = acc_t<T>;
  using Cfg = HcPreConfig<kN, acc>;
  constexpr int kG = Cfg::kG;
  constexpr int kJ = Cfg::kJ;
  constexpr int kSub = kHcSub<T, kVec>;
  const int n = p.n, J = n + 2;
  const int64_t ldw = p.ldw;
  const acc* __restrict__ wt = static_cast<const acc*>(p.wt_ptr);
#pragma unroll
  for (int g0 = 0; g0 < kN; g0 += kG) {
    if (g0 < n) {
      Vec<T, kVec> h[kG];
      load_group(g0, h);
#pragma unroll
      for (int s = 0; s < kVec; s += kSub) {
        acc hv[kG][kSub];
        acc dh[kG][kSub];
#pragma unroll
        for (int i = 0; i < kG; ++i) {
          const acc a0 = g0 + i < n ? rs.coef[g0 + i] : acc(0);
          const acc sc = g0 + i < n ? rs.scale[g0 + i] : acc(0);
#pragma unroll
          for (int k = 0; k < kSub; ++k) {
            hv[i][k] = to_acc(h[i].v[s + k]);
            dh[i][k] = a0 * to_acc(gx.v[s + k]) - sc * hv[i][k];
          }
        }
#pragma unroll
        for (int j = 0; j < kJ; ++j) {
          if (j < J) {
            const Vec<acc, kSub> w = load_w_chunk<acc, kSub>(wt + j * ldw, e + s);
            Vec<acc, kSub>& dwv = vec_at<acc, kSub>(dw, j * ldw + e + s);
            Vec<acc, kSub> acc_dw = dwv;
#pragma unroll
            for (int i = 0; i < kG; ++i) {
              const acc dq = g0 + i < n ? rs.dq[(g0 + i) * kJ + j] : acc(0);
#pragma unroll
              for (int k = 0; k < kSub; ++k) {
                dh[i][k] += dq * w.v[k];
                acc_dw.v[k] += dq * hv[i][k];
              }
            }
            dwv = acc_dw;
          }
        }
        emit(g0, s, dh);
      }
      flush(g0);
    }
  }
}

// hc_pre's sink of the dH terms of one chunk: the group's terms rounded to T in `out`
// (emit), then written (=), or added to dH's chunk (+=, accumulate_dh) (flush).
template <typename T, int kVec, int kG>
struct HcPreDhSink {
  const HcPreParams& p;
  T* __restrict__ dh_tok;
  int64_t e;
  Vec<T, kVec> out[kG];

  template <int kSub>
  __device__ __forceinline__ void emit(int, int s, const acc_t<T> (&dh)[kG][kSub]) {
#pragma unroll
    for (int i = 0; i < kG; ++i) {
#pragma unroll
      for (int k = 0; k < kSub; ++k) out[i].v[s + k] = from_acc<T>(dh[i][k]);
    }
  }

  __device__ __forceinline__ void flush(int g0) {
#pragma unroll
    for (int i = 0; i < kG; ++i) {
      if (g0 + i < p.n) {
        T* __restrict__ dst = dh_tok + (g0 + i) * p.dh_stream_stride;
        if (p.accumulate_dh) {
          const Vec<T, kVec> prev = load_chunk_raw<T, kVec>(dst, e, p.d);
#pragma unroll
          for (int k = 0; k < kVec; ++k) out[i].v[k] = from_acc<T>(to_acc(out[i].v[k]) + to_acc(prev.v[k]));
        }
        store_chunk_raw<T, kVec>(dst, e, p.d, out[i]);
      }
    }
  }
};

// Backward phase 3 of token t (after a barrier): every chunk through hc_pre_bwd_chunk,
// the first kCache from the register caches hc / gc, the rest re-read.
template <typename T, int kVec, int kN, int kCacheSlots>
__device__ __forceinline__ void hc_pre_bwd_write(const HcPreParams& p, int64_t t, const T* __restrict__ h_tok,
                                                 const T* __restrict__ dx_tok, const HcPreRowSmem<acc_t<T>, kN>& rs,
                                                 acc_t<T>* dw, const Vec<T, kVec> (&hc)[kCacheSlots][kN],
                                                 const Vec<T, kVec> (&gc)[kCacheSlots]) {
  constexpr int kG = HcPreConfig<kN, acc_t<T>>::kG;
  constexpr int kCache = HcPreConfig<kN, acc_t<T>>::kBwdCache;
  const int64_t d = p.d;
  const int64_t step = static_cast<int64_t>(blockDim.x) * kVec;
  T* __restrict__ dh_tok = static_cast<T*>(p.dh_ptr) + p.dh_tok.offset(t);
#pragma unroll
  for (int c = 0; c < kCache; ++c) {
    const int64_t e = threadIdx.x * kVec + c * step;
    if (e < d) {
      HcPreDhSink<T, kVec, kG> sink{p, dh_tok, e};
      hc_pre_bwd_chunk<T, kVec, kN>(
          p, rs, dw, e, gc[c],
          [&](int g0, Vec<T, kVec>(&h)[kG]) {
#pragma unroll
            for (int i = 0; i < kG; ++i) h[i] = hc[c][g0 + i];
          },
          [&](int g0, int s, const auto& dh) { sink.emit(g0, s, dh); }, [&](int g0) { sink.flush(g0); });
    }
  }
  for (int64_t e = threadIdx.x * kVec + kCache * step; e < d; e += step) {
    const Vec<T, kVec> gx = load_chunk_raw<T, kVec>(dx_tok, e, d);
    HcPreDhSink<T, kVec, kG> sink{p, dh_tok, e};
    hc_pre_bwd_chunk<T, kVec, kN>(
        p, rs, dw, e, gx,
        [&](int g0, Vec<T, kVec>(&h)[kG]) { hc_load_streams<T, kVec, kG>(h_tok, p.h_stream_stride, g0, p.n, e, d, h); },
        [&](int g0, int s, const auto& dh) { sink.emit(g0, s, dh); }, [&](int g0) { sink.flush(g0); });
  }
}

// This block's dW workspace slice, (J, ldw).
template <typename acc>
__device__ __forceinline__ acc* hc_pre_dw_slice(const HcPreParams& p) {
  return static_cast<acc*>(p.dw_ws_ptr) + blockIdx.x * static_cast<int64_t>(p.n + 2) * p.ldw;
}

// The start of a backward kernel (every thread calls it; the first barrier after it
// makes the zeros visible): zeroes the partials the block accumulates over its tokens
// and returns this row's dW partial, (J, ldw): in shared memory, or the block's
// workspace slice (zeroed by the launcher when dw_in_smem is false).
template <typename acc, int kN>
__device__ __forceinline__ acc* hc_pre_bwd_begin(const HcPreParams& p, acc* smem, const HcPreSmem& L) {
  constexpr int kJ = kN + 2;
  const int rows = blockDim.y;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int nthreads = blockDim.x * rows;
  for (int i = tid; i < rows * kN * hc_pre_coef_stride(kN); i += nthreads) smem[L.cpart + i] = acc(0);
  if (!p.dw_in_smem) return hc_pre_dw_slice<acc>(p);
  for (int64_t i = tid; i < rows * kJ * p.ldw; i += nthreads) smem[L.dw + i] = acc(0);
  return smem + L.dw + threadIdx.y * static_cast<int64_t>(kJ) * p.ldw;
}

// The block's partials (after a barrier): the rows' coefficient partials and (dW in
// shared memory) dW partials summed in row order and written (=) to the block's slices.
template <typename acc, int kN>
__device__ __forceinline__ void hc_pre_bwd_flush(const HcPreParams& p, const acc* smem, const HcPreSmem& L) {
  constexpr int kJ = kN + 2;
  constexpr int kCS = hc_pre_coef_stride(kN);
  const int n = p.n, J = n + 2, CS = hc_pre_coef_stride(n);
  const int rows = blockDim.y;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int nthreads = blockDim.x * rows;
  acc* __restrict__ coef_ws = static_cast<acc*>(p.coef_ws_ptr) + blockIdx.x * static_cast<int64_t>(n) * CS;
  for (int idx = tid; idx < n * CS; idx += nthreads) {
    const int i = idx / CS;
    const int j = idx % CS;
    acc s = acc(0);
    for (int r = 0; r < rows; ++r) s += smem[L.cpart + (r * kN + i) * kCS + j];
    coef_ws[idx] = s;
  }
  if (p.dw_in_smem) {
    acc* __restrict__ dw_ws = hc_pre_dw_slice<acc>(p);
    for (int64_t idx = tid; idx < static_cast<int64_t>(J) * p.ldw; idx += nthreads) {
      acc s = acc(0);
      for (int r = 0; r < rows; ++r) s += smem[L.dw + r * static_cast<int64_t>(kJ) * p.ldw + idx];
      dw_ws[idx] = s;
    }
  }
}

// The parameter gradients from the backward's per-block slices, in one launch:
//   dW[e, j] = Σ_b dw_ws[b, j, e]  (e < d, j < J; dW is (d, J) row-major)
//   dA[i, j] = Σ_b coef_ws[b, i, j] (j <= n),  dB[i] = Σ_b coef_ws[b, i, n+1]
//   ds_a = Σ_b Σ_i coef_ws[b, i, n+2],  ds_b = Σ_b Σ_i coef_ws[b, i, n+3]
// every output written (=), sums in slice order (then stream order): deterministic.
// Thread mapping: one output per thread, grid-stride; dW's outputs come first, j-major
// (consecutive threads read consecutive e of one slice row), then dA, dB, ds_a, ds_b.
struct HcPreGradsParams {
  int64_t d, ldw, blocks;
  int n;
  const void* __restrict__ dw_ws_ptr;    // (blocks, J, ldw)
  const void* __restrict__ coef_ws_ptr;  // (blocks, n, n+4)
  void* __restrict__ dw_ptr;             // (d, J)
  void* __restrict__ da_ptr;             // (n, n+1)
  void* __restrict__ db_ptr;             // (n,)
  void* __restrict__ dsa_ptr;            // ()
  void* __restrict__ dsb_ptr;            // ()
};

template <typename acc>
__global__ void hc_pre_param_grads_kernel(const HcPreGradsParams p) {
  const int n = p.n, J = n + 2, CS = hc_pre_coef_stride(n);
  const int64_t n_dw = p.d * J;
  const int64_t total = n_dw + n * (n + 2) + 2;
  const acc* __restrict__ dw_ws = static_cast<const acc*>(p.dw_ws_ptr);
  const acc* __restrict__ coef_ws = static_cast<const acc*>(p.coef_ws_ptr);
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc s = acc(0);
    if (idx < n_dw) {
      const int64_t j = idx / p.d, e = idx % p.d;
      for (int64_t b = 0; b < p.blocks; ++b) s += dw_ws[(b * J + j) * p.ldw + e];
      static_cast<acc*>(p.dw_ptr)[e * J + j] = s;
      continue;
    }
    const int64_t k = idx - n_dw;
    if (k < n * (n + 2)) {  // dA[i, 0..n] and dB[i]: column c of stream i's partials
      const int64_t i = k / (n + 2), c = k % (n + 2);
      for (int64_t b = 0; b < p.blocks; ++b) s += coef_ws[(b * n + i) * CS + c];
      if (c <= n) {
        static_cast<acc*>(p.da_ptr)[i * (n + 1) + c] = s;
      } else {
        static_cast<acc*>(p.db_ptr)[i] = s;
      }
      continue;
    }
    const int c = static_cast<int>(k - n * (n + 2)) + n + 2;  // ds_a (n+2), ds_b (n+3)
    for (int64_t b = 0; b < p.blocks; ++b) {
      for (int i = 0; i < n; ++i) s += coef_ws[(b * n + i) * CS + c];
    }
    *static_cast<acc*>(c == n + 2 ? p.dsa_ptr : p.dsb_ptr) = s;
  }
}

template <typename T, int kVec, int kN>
__global__ void __launch_bounds__(kHcPreThreads, HcPreConfig<kN, acc_t<T>>::kMinBlocks)
    hc_pre_bwd_kernel(const HcPreParams p) {
  using acc = acc_t<T>;
  constexpr int kCacheSlots = HcPreConfig<kN, acc>::kBwdCache > 0 ? HcPreConfig<kN, acc>::kBwdCache : 1;
  extern __shared__ __align__(32) unsigned char hc_pre_smem[];
  acc* smem = reinterpret_cast<acc*>(hc_pre_smem);
  const int rows = blockDim.y;
  const int warps = blockDim.x / kWarpSize;
  const HcPreSmem L = hc_pre_smem_layout<kN>(rows, warps, p.ldw, true, p.dw_in_smem);
  const HcPreRowSmem<acc, kN> rs = hc_pre_row_smem<acc, kN>(smem, L, warps, threadIdx.y);
  acc* dw = hc_pre_bwd_begin<acc, kN>(p, smem, L);
  const T* __restrict__ H = static_cast<const T*>(p.h_ptr);
  const T* __restrict__ dX = static_cast<const T*>(p.dx_ptr);
  for (int64_t t0 = first_token_tile(rows); t0 < p.n_tokens; t0 += token_tile_stride(rows)) {
    const int64_t t = t0 + threadIdx.y;
    const bool valid = t < p.n_tokens;  // uniform over the row (whole warps)
    const T* __restrict__ h_tok = H + (valid ? p.h_tok.offset(t) : 0);
    const T* __restrict__ dx_tok = dX + (valid ? p.x_tok.offset(t) : 0);
    Vec<T, kVec> hc[kCacheSlots][kN];
    Vec<T, kVec> gc[kCacheSlots];
    hc_pre_bwd_reduce<T, kVec, kN>(p, h_tok, dx_tok, valid, rs.part, hc, gc, threadIdx.x / kWarpSize,
                                   threadIdx.x % kWarpSize);
    __syncthreads();
    if (valid) hc_pre_bwd_coef_terms<acc, kN>(p, t, rs, warps);
    __syncthreads();
    if (valid) hc_pre_bwd_coef_sums<acc, kN>(p, t, rs);
    __syncthreads();
    if (valid) hc_pre_bwd_write<T, kVec, kN>(p, t, h_tok, dx_tok, rs, dw, hc, gc);
  }
  __syncthreads();
  hc_pre_bwd_flush<acc, kN>(p, smem, L);
}

}  // namespace crosslayer
