// mudd_weights: MUDD dynamic depth weights A = GELU(rms(x)·W1)·W2 + bias, forward and
// backward (launchers in mudd_weights.cu).
//
// Math, per token t (x: d features, W1: (d, K), W2: (K, Cl), Cl = C·l):
//   forward
//     r     = rsqrt(Σ_e x[e]² / d + eps)
//     u[k]  = r·Σ_e x[e]·W1[e, k]                 (= written, saved for the backward)
//     A[o]  = bias[o] + Σ_k GELU(u[k])·W2[k, o]     (= written)
//   backward (dA given)
//     h[k]  = GELU(u[k]), h[K] = 1                  ([dW2; dbias] = Σ_t hᵀ·dA)
//     du[k] = GELU'(u[k])·Σ_o dA[o]·W2[k, o]
//     g[k]  = r·du[k]                               (= written)
//     s     = r·Σ_k g[k]·u[k] / d                   (= written)
//     dx[e] = Σ_k g[k]·W1[e, k] − s·x[e]            (= written)
//   The last line is r·(dxn − xn·mean_d(dxn·xn)) of the oracle: Σ_e dxn·xn equals
//   Σ_k du·u, so the per-token mean needs no pass over d. dW1 = Σ_t x[t]ᵀ·g[t]: for
//   bf16/fp16 x the dx kernel sums each token group's tiles (in the pass over x that
//   writes dx: x is read once) and adds the groups into dW1 in group order
//   (common/ticket.cuh); [dW2; dbias] = Σ_t [h, 1]ᵀ·dA[t] is summed by the backward
//   head kernel (per-block sums, added into it in block order) or, when those do not
//   fit its shared memory, one cuBLAS GEMM over h written with a column of ones. All
//   deterministic; no partial buffers, no sum launches.
//
// Kernels
//   mudd_weights_fwd_proj_kernel<T, kVec>  bf16/fp16 x: r, u and A in one launch, x·W1 and
//                                          GELU(u)·W2 on tensor cores (mma.sync m16n8k16,
//                                          fp32 accumulate, sm_80+).
//   mudd_weights_fwd_head_kernel<acc>      fp32/fp64 x: A from u (CUDA cores; K·Cl MACs a
//                                          token).
//   mudd_weights_bwd_head_kernel<acc>      g, s and [dW2; dbias] (or h) from dA and u (CUDA
//                                          cores).
//   mudd_weights_bwd_dx_kernel<T, kVec>    bf16/fp16 x: dx = g·W1ᵀ − s·x and dW1 = xᵀ·g
//                                          (token groups in order), on tensor cores.
//   (fp32/fp64 x: the launcher computes x·W1, g·W1ᵀ and xᵀ·g with at::mm; they are the
//   correctness dtypes.)
//
// Accuracy of the tensor-core products. W1 is fp32; rounded to 16 bits (2^-9) it would
// be far outside DESIGN.md's policy, so W1 is split into hi + lo 16-bit parts (x's own
// dtype: x is exact in it) and x·W1 = x·W1_hi + x·W1_lo, two mma per fragment into one
// fp32 accumulator (residual 2^-17 relative). fp16: W1·2^k is split, k chosen on the
// device so that max|W1|·2^k lies in [2^14, 2^15) (common/mma_pack.h,
// fp16_split_scale), and the kernel scales u by 2^-k (exact): unscaled, a small W1
// (~1e-4/√d) has subnormal lo (and hi) parts. bf16 shares fp32's exponent range: no
// scaling, and hi + lo suffice for every output here (mhc_coeffs, whose parameter
// gradients are sums of 2^-17 errors over tokens, needs a third part). In dx both
// operands are fp32 (g and W1, read as fp32 and split in registers): bf16 hi/lo of each
// and g_hi·W_hi + g_lo·W_hi + g_hi·W_lo (three mma; one alone fails the policy for fp16
// dx). In dW1, x is exact in bf16 parts (one for bf16, hi + lo for fp16) and g is bf16
// hi + lo: bf16's exponent range needs no scaling of g. The proj's head: GELU(u) and W2
// (fp32) in bf16 hi + lo, all four products (three leave 2^-16 relative, above the fp32
// oracle's own error). Fragment layouts and the packing of W1 for the proj (W1f):
// common/mma.cuh. (Measurements: bench/NOTES.md.)
//
// Thread mapping
//   proj: block of kMuddWeightsProjWarps (2) warps, warp w owns tokens 16·(blockIdx·2 +
//         w) + 0..15 (N / 32 blocks: 512 at N = 16384, ~4 an SM on 132 SMs); the hidden
//         columns are done kMuddWeightsProjCols (64) at a time (32 fp32 accumulators a
//         thread, x loaded a chunk ahead); x is re-read for each further column pass
//         (L1/L2). Warps on an SM walk W1f in step, so its fragments are mostly L1 hits.
//         After the passes, the warp's head: A of its 16 tokens from the u it stored.
//   dx:   warp u = blockIdx.x·warps + w owns column pass u % passes (dW1 columns 32·pass
//         .. + 31; passes = ceil(K / 32)) of the 32-feature chunk (u / passes) % chunks
//         of token group u / (passes·chunks) (tiles_per_group consecutive 16-token
//         tiles). A block's warps are consecutive passes and chunks of one group: the
//         passes of a chunk read the same x rows at the same time (HBM once, then L1)
//         and all of them the same g rows. Per tile: dx of the chunk (pass 0 only) and
//         xᵀ·g of the pass's columns into registers (32 fp32: a pass holds 32 columns
//         so that the kernel fits 128 registers, 2 blocks an SM), added into dW1 at the
//         end after the previous group's warp of the same pass and chunk.
//   head fwd (fp32/fp64 x) / bwd: a block of kMuddWeightsHeadThreads threads owns
//         kMuddWeightsHeadTokens tokens at a time; the tokens' u (fwd) or dA (bwd) are
//         staged in shared memory. fwd: thread i computes the (token, output) pairs i,
//         i + kMuddWeightsHeadThreads, ...; bwd: a warp per (token, 32 hidden units),
//         lanes over the C·l outputs (mudd_weights_head_grads). Per-token sums are
//         reduced in a fixed order (deterministic).
//
// Assumptions (checked or arranged by the launcher):
//   1) x and dx: features unit-stride, tokens through TokenLayout; for 16-byte access
//      (kVec) base 16-byte aligned and token strides multiples of 8 elements, else the
//      scalar path (kVec = false) is used;
//   2) W1f packed as above, zero-padded to whole chunks / tiles; for fp16 x it packs
//      W1·2^k and w1f_unscale_ptr points to 2^-k (null: no scaling); w1_ptr: W1 fp32
//      (d, K) with a row stride w1_ld (a multiple of 4, zero padded: fp32_rows_ld4);
//   3) u, g, h, s, r, A, dA contiguous in the accumulator dtype; g has row stride
//      ldg = K rounded up to 16, zero-padded.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/std.cuh"

#include "common/math.cuh"
#include "common/mma.cuh"
#include "common/reduce.cuh"
#include "common/ticket.cuh"
#include "common/tokens.cuh"
#include "common/vec.cuh"

namespace crosslayer {

constexpr int kMuddWeightsWarps = 8;  // warps a block (dx)
constexpr int kMuddWeightsThreads = kMuddWeightsWarps * kWarpSize;
constexpr int kMuddWeightsProjWarps = 2;  // warps a block (proj): 32 tokens, N / 32 blocks
constexpr int kMuddWeightsProjThreads = kMuddWeightsProjWarps * kWarpSize;
// Register cap of the proj (__maxnreg__: it cannot be combined with __launch_bounds__):
// 112 fits 8 blocks of 2 warps an SM (4 warps a 16K-register sub-partition), as 104
// would; 96 (10 blocks) spills 52 B.
#define MUDD_WEIGHTS_PROJ_MAX_REGS 112
constexpr int kMuddWeightsProjCols = 64;                           // hidden columns a proj pass
constexpr int kMuddWeightsProjTiles = kMuddWeightsProjCols / 8;    // n-tiles a pass
constexpr int kMuddWeightsHeadCols = 32;                           // outputs o a head step (4 n-tiles)
constexpr int kMuddWeightsDxTiles = 4;                             // n-tiles a dx chunk (32 features)
constexpr int kMuddWeightsDw1Tiles = 4;                            // n-tiles a dW1 column pass (32 columns)
constexpr int kMuddWeightsHeadThreads = 256;
constexpr int kMuddWeightsHeadTokens = 8;                          // tokens a head tile

struct MuddWeightsParams {
  using index_t = int64_t;
  index_t n_tokens;  // N
  index_t d;         // features
  int K;             // hidden
  int Cl;            // C·l outputs
  int ldg;           // row stride of g (K rounded up to 16)
  int k_pad;         // K rounded up to kMuddWeightsProjCols (columns of W1f)
  bool tanh_gelu;    // GELU form: tanh approximation (else exact erf)
  double eps;
  TokenLayout x_tok;   // x (N, d)
  TokenLayout dx_tok;  // dx (N, d)
  const void* __restrict__ x_ptr;
  const void* __restrict__ w1f_ptr;  // proj: packed W1 (uint4 fragments)
  const float* __restrict__ w1f_unscale_ptr;  // proj, fp16: 2^-k of W1f (device scalar), or null
  const float* __restrict__ w1_ptr;  // dx: W1 (d, K) fp32, row stride w1_ld (fp32_rows_ld4)
  int64_t w1_ld;
  const void* __restrict__ w2_ptr;   // W2 (K, Cl), accumulator dtype, contiguous
  const void* __restrict__ bias_ptr; // (Cl), accumulator dtype
  // forward outputs / backward inputs, accumulator dtype
  void* __restrict__ u_ptr;  // (N, K)
  void* __restrict__ r_ptr;  // (N)
  void* __restrict__ a_ptr;  // (N, Cl)
  // backward
  const void* __restrict__ da_ptr;  // (N, Cl)
  void* __restrict__ h_ptr;         // (N, K + 1), the last column ones (when dw2_ptr is null)
  void* __restrict__ dw2_ptr;       // (K + 1, Cl): [dW2; dbias] summed by the head blocks in order, or null
  int* __restrict__ tickets;        // zeroed: [0] the head blocks' dW2 turn, [1 + u] dW1 unit u's (dx)
  void* __restrict__ g_ptr;         // (N, ldg)
  void* __restrict__ s_ptr;         // (N)
  void* __restrict__ dx_ptr;
  bool accumulate_dx;  // dx += (a depth stack's gradient buffer) or dx =
  // dW1 (d, K) fp32 of the dx kernel: the token groups' sums (each over its
  // tiles_per_group 16-token tiles) added in group order; dw1_passes column passes of
  // 8·kMuddWeightsDw1Tiles.
  int64_t token_groups, tiles_per_group;
  int dw1_passes;
  float* __restrict__ dw1_ptr;
};

// ---------------------------------------------------------------------------- proj

// One column pass of the proj: acc = x·W1f over the `chunks` chunks of d for the warp's
// rows (=, from zero), columns col0 .. col0 + kMuddWeightsProjCols of W (packed W1,
// n_tiles tiles a chunk-step row); with `sumsq` (the first pass) also ssa / ssb += Σ x²
// of rows a / b. x is loaded a chunk ahead (HBM latency). The loop invariants (W,
// chunks, n_tiles, d) come from the caller, hoisted out of its column loop. Warp-wide.
template <typename T, bool kVec>
__device__ __forceinline__ void mudd_weights_proj_pass(const MmaRows& r, const T* __restrict__ xa,
                                                       const T* __restrict__ xb, int64_t d,
                                                       const uint4* __restrict__ W, int64_t chunks, int n_tiles,
                                                       int col0, bool sumsq, float (&acc)[kMuddWeightsProjTiles][4],
                                                       float& ssa, float& ssb) {
  mma_zero(acc);
  const int64_t e0 = r.tig * 8;
  uint4 na = r.va ? load8<T, kVec>(xa, e0, d) : make_uint4(0, 0, 0, 0);
  uint4 nb = r.vb ? load8<T, kVec>(xb, e0, d) : make_uint4(0, 0, 0, 0);
  for (int64_t c = 0; c < chunks; ++c) {
    const uint4 wa = na, wb = nb;
    if (c + 1 < chunks) {
      const int64_t e = (c + 1) * 32 + e0;
      na = r.va ? load8<T, kVec>(xa, e, d) : make_uint4(0, 0, 0, 0);
      nb = r.vb ? load8<T, kVec>(xb, e, d) : make_uint4(0, 0, 0, 0);
    }
    if (sumsq) {
      ssa += sumsq8<T>(wa);
      ssb += sumsq8<T>(wb);
    }
    mma_proj_chunk<T, kMuddWeightsProjTiles, false, false>(acc, wa, wb, W, c, n_tiles, col0, 0, r.lane);
  }
}

// u = acc·unscale·r (=) for the pass's columns k < K of rows a (ra) and b (rb).
__device__ __forceinline__ void mudd_weights_store_u(const MuddWeightsParams& p, const MmaRows& r,
                                                     const float (&acc)[kMuddWeightsProjTiles][4], int col0,
                                                     float unscale, float ra, float rb) {
  float* __restrict__ U = static_cast<float*>(p.u_ptr);
#pragma unroll
  for (int j = 0; j < kMuddWeightsProjTiles; ++j) {
    const int k = col0 + j * 8 + r.tig * 2;
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      if (k + q < p.K) {
        if (r.va) U[r.ta * p.K + k + q] = acc[j][q] * unscale * ra;
        if (r.vb) U[r.tb * p.K + k + q] = acc[j][2 + q] * unscale * rb;
      }
    }
  }
}

// The head for the warp's 16 rows once their u is stored (by this warp; __syncwarp
// before): A = bias + GELU(u)·W2 (=), on tensor cores. kMuddWeightsHeadCols outputs at a
// time; for each k-step, the A fragments are GELU(u) of rows grp / grp + 8 and hidden
// 16ks + 2tig + {0, 1} (+8), read back from u (L1), the B fragments W2[k, o]; both are
// split into bf16 hi + lo and all four products summed (the dropped part of either is
// 2^-16 relative: with three the head's error would exceed the fp32 oracle's). Hidden
// units k >= K and outputs o >= Cl read as zero.
__device__ __forceinline__ void mudd_weights_proj_head(const MuddWeightsParams& p, const MmaRows& r) {
  const float* U = static_cast<const float*>(p.u_ptr);  // written by this warp: plain loads
  const float* __restrict__ W2 = static_cast<const float*>(p.w2_ptr);
  const float* __restrict__ bias = static_cast<const float*>(p.bias_ptr);
  float* __restrict__ A = static_cast<float*>(p.a_ptr);
  const int K = p.K, Cl = p.Cl;
  const int ksteps = (K + 15) / 16;
  for (int o0 = 0; o0 < Cl; o0 += kMuddWeightsHeadCols) {
    float out[kMuddWeightsHeadCols / 8][4];
    mma_zero(out);
    for (int ks = 0; ks < ksteps; ++ks) {
      const int k = ks * 16 + r.tig * 2;
      // h of (row, hidden): words a0 (a, k..k+1), a1 (b, k..k+1), a2 (a, k+8..), a3 (b, k+8..)
      float h[8];
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        const int kq = k + (q / 4) * 8 + q % 2;
        const bool row_a = (q / 2) % 2 == 0;
        const bool valid = kq < K && (row_a ? r.va : r.vb);
        h[q] = valid ? gelu_fwd<float>(U[(row_a ? r.ta : r.tb) * K + kq], p.tanh_gelu) : 0.f;
      }
      uint32_t ah[4], al[4];
#pragma unroll
      for (int w = 0; w < 4; ++w) split_bf16x2(h[2 * w], h[2 * w + 1], ah[w], al[w]);
#pragma unroll
      for (int j = 0; j < kMuddWeightsHeadCols / 8; ++j) {
        const int o = o0 + j * 8 + r.grp;
        float w[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int kq = k + (q / 2) * 8 + q % 2;
          w[q] = (kq < K && o < Cl) ? __ldg(W2 + static_cast<int64_t>(kq) * Cl + o) : 0.f;
        }
        uint32_t bh0, bl0, bh1, bl1;
        split_bf16x2(w[0], w[1], bh0, bl0);
        split_bf16x2(w[2], w[3], bh1, bl1);
        MmaOp<__nv_bfloat16>::run(out[j], ah[0], ah[1], ah[2], ah[3], bh0, bh1);
        MmaOp<__nv_bfloat16>::run(out[j], al[0], al[1], al[2], al[3], bh0, bh1);
        MmaOp<__nv_bfloat16>::run(out[j], ah[0], ah[1], ah[2], ah[3], bl0, bl1);
        MmaOp<__nv_bfloat16>::run(out[j], al[0], al[1], al[2], al[3], bl0, bl1);
      }
    }
#pragma unroll
    for (int j = 0; j < kMuddWeightsHeadCols / 8; ++j) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int o = o0 + j * 8 + r.tig * 2 + q % 2;
        const bool row_valid = q < 2 ? r.va : r.vb;
        if (o < Cl && row_valid) A[(q < 2 ? r.ta : r.tb) * Cl + o] = out[j][q] + bias[o];
      }
    }
  }
}

// r, u = r·(x·W1) and A = bias + GELU(u)·W2 for bf16/fp16 x, one launch: warp w of block
// b owns tokens 16·(b·kMuddWeightsProjWarps + w) + 0..15 and walks the hidden columns
// kMuddWeightsProjCols at a time (x re-read from L1/L2 after the first pass), storing u,
// then computes the tokens' A from it (mudd_weights_proj_head). No shared memory, no
// block barriers.
template <typename T, bool kVec>
__global__ void __maxnreg__(MUDD_WEIGHTS_PROJ_MAX_REGS)
    mudd_weights_fwd_proj_kernel(const MuddWeightsParams p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  const MmaRows r = mma_rows(kMuddWeightsProjWarps, p.n_tokens);
  if (r.t0 >= p.n_tokens) return;
  const T* __restrict__ X = static_cast<const T*>(p.x_ptr);
  const T* __restrict__ xa = X + (r.va ? p.x_tok.offset(r.ta) : 0);
  const T* __restrict__ xb = X + (r.vb ? p.x_tok.offset(r.tb) : 0);
  const int64_t d = p.d;
  const uint4* __restrict__ W = static_cast<const uint4*>(p.w1f_ptr);
  const int64_t chunks = (d + 31) / 32;
  const int n_tiles = p.k_pad / 8;  // per chunk-step row of W1f
  const float unscale = p.w1f_unscale_ptr != nullptr ? *p.w1f_unscale_ptr : 1.f;
  float ssa = 0.f, ssb = 0.f;
  float ra = 0.f, rb = 0.f;
  for (int col0 = 0; col0 < p.k_pad; col0 += kMuddWeightsProjCols) {
    float acc[kMuddWeightsProjTiles][4];
    mudd_weights_proj_pass<T, kVec>(r, xa, xb, d, W, chunks, n_tiles, col0, col0 == 0, acc, ssa, ssb);
    if (col0 == 0) {
      ra = rsqrtf(quad_sum(ssa) / static_cast<float>(d) + static_cast<float>(p.eps));
      rb = rsqrtf(quad_sum(ssb) / static_cast<float>(d) + static_cast<float>(p.eps));
      if (r.tig == 0) {
        if (r.va) static_cast<float*>(p.r_ptr)[r.ta] = ra;
        if (r.vb) static_cast<float*>(p.r_ptr)[r.tb] = rb;
      }
    }
    mudd_weights_store_u(p, r, acc, col0, unscale, ra, rb);
  }
  __syncwarp();  // every lane's u stores are visible to the warp
  mudd_weights_proj_head(p, r);
#endif
}

// dx = g·W1ᵀ − s·x (=, or += with accumulate_dx: added in fp32 before the one rounding)
// and dW1 = Σ_t x[t]ᵀ·g[t] (group 0's sums =, each later group's += in group order) for
// bf16/fp16 x; products in bf16 parts, fp32 accumulators. Mapping: the header. Dynamic
// shared memory: kMuddWeightsWarps × kMmaXtStageElems<T> bf16 (each warp's transposed x
// tile). No block barriers (warps leave independently; a warp waits only for the same
// unit's warp of the previous group: an earlier warp, common/ticket.cuh).
template <typename T, bool kVec>
__global__ void __launch_bounds__(kMuddWeightsThreads, 2) mudd_weights_bwd_dx_kernel(const MuddWeightsParams p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  extern __shared__ __align__(16) unsigned char mudd_dx_smem[];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int grp = lane / 4, tig = lane % 4;
  const int64_t N = p.n_tokens, d = p.d;
  const int64_t chunks = (d + 31) / 32;
  const int64_t unit = static_cast<int64_t>(blockIdx.x) * kMuddWeightsWarps + warp;
  const int pass = static_cast<int>(unit % p.dw1_passes);
  const int64_t c = (unit / p.dw1_passes) % chunks, group = unit / (p.dw1_passes * chunks);
  if (group >= p.token_groups) return;
  __nv_bfloat16* stage = reinterpret_cast<__nv_bfloat16*>(mudd_dx_smem) + warp * kMmaXtStageElems<T>;
  const int64_t tiles = (N + 15) / 16;
  const int64_t tile_begin = group * p.tiles_per_group;
  const int64_t tile_end = tile_begin + p.tiles_per_group < tiles ? tile_begin + p.tiles_per_group : tiles;
  const int64_t f0 = c * 32, e = f0 + tig * 8;  // this thread: features e .. e + 7
  const bool write_dx = pass == 0;              // warp-uniform
  const int col0 = pass * 8 * kMuddWeightsDw1Tiles;
  const T* __restrict__ X = static_cast<const T*>(p.x_ptr);
  T* __restrict__ DX = static_cast<T*>(p.dx_ptr);
  const float* __restrict__ G = static_cast<const float*>(p.g_ptr);
  const float* __restrict__ S = static_cast<const float*>(p.s_ptr);
  float dw[2][kMuddWeightsDw1Tiles][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) mma_zero(dw[mt]);

  // x of a tile: this thread's 8 features of rows grp (a) and grp + 8 (b), zeros past N.
  const auto load_x = [&](int64_t t0, uint4& xa, uint4& xb) {
    xa = t0 + grp < N ? load8<T, kVec>(X + p.x_tok.offset(t0 + grp), e, d) : make_uint4(0, 0, 0, 0);
    xb = t0 + grp + 8 < N ? load8<T, kVec>(X + p.x_tok.offset(t0 + grp + 8), e, d) : make_uint4(0, 0, 0, 0);
  };
  uint4 xa_next, xb_next;  // the next tile's x, loaded a tile ahead (HBM latency)
  if (tile_begin < tile_end) load_x(tile_begin * 16, xa_next, xb_next);
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t t0 = tile * 16, ta = t0 + grp, tb = t0 + grp + 8;
    const bool va = ta < N, vb = tb < N;
    const uint4 xa = xa_next, xb = xb_next;
    if (tile + 1 < tile_end) load_x(t0 + 16, xa_next, xb_next);
    if (write_dx) {
      float acc[kMuddWeightsDxTiles][4];
      mma_chunk_g_w32<kMuddWeightsDxTiles>(acc, G + (va ? ta : 0) * p.ldg, G + (vb ? tb : 0) * p.ldg, va, vb,
                                           p.w1_ptr, p.w1_ld, f0, f0, d, p.ldg / 16, grp, tig);
      if (va) {
        T* dst = DX + p.dx_tok.offset(ta);
        store_g_wt_minus_sx<T, kVec>(acc, 0, xa, S[ta], nullptr, 0.f, p.accumulate_dx ? dst : nullptr, dst, e, d);
      }
      if (vb) {
        T* dst = DX + p.dx_tok.offset(tb);
        store_g_wt_minus_sx<T, kVec>(acc, 1, xb, S[tb], nullptr, 0.f, p.accumulate_dx ? dst : nullptr, dst, e, d);
      }
    }
    mma_xt_g_tile<T, kMuddWeightsDw1Tiles>(dw, xa, xb, G, p.ldg, t0, N, col0, p.K, stage, grp, tig);
  }
  // dW1 (=, group 0 | +=) this group's sums, after group − 1's: the ticket of the unit
  // (pass, chunk). Both are taken again from values live in the loop (col0, f0,
  // tile_end), not kept across it: the loop uses every register.
  const int turn = static_cast<int>((tile_end - 1) / p.tiles_per_group);
  int* ticket = p.tickets + 1 + col0 / (8 * kMuddWeightsDw1Tiles) + p.dw1_passes * (f0 / 32);
  if (lane == 0) ticket_wait(ticket, turn);
  __syncwarp();
  mma_xt_g_store<kMuddWeightsDw1Tiles>(p.dw1_ptr, dw, 0, f0, d, col0, p.K, grp, tig, turn > 0);
  __threadfence();
  __syncwarp();
  if (lane == 0) ticket_release(ticket, turn + 1);
#endif
}

// ------------------------------------------------------------------------ the head

// Tokens of the head tile from t0: at most kMuddWeightsHeadTokens.
__device__ __forceinline__ int mudd_weights_head_count(int64_t n_tokens, int64_t t0) {
  return static_cast<int>(n_tokens - t0 < kMuddWeightsHeadTokens ? n_tokens - t0 : kMuddWeightsHeadTokens);
}

// A = bias + GELU(u)·W2, kMuddWeightsHeadTokens tokens a tile. Shared memory:
// h [kMuddWeightsHeadTokens][K].
template <typename acc>
__global__ void __launch_bounds__(kMuddWeightsHeadThreads) mudd_weights_fwd_head_kernel(const MuddWeightsParams p) {
  extern __shared__ __align__(16) unsigned char mudd_head_smem[];
  acc* __restrict__ hs = reinterpret_cast<acc*>(mudd_head_smem);
  const int K = p.K, Cl = p.Cl;
  const acc* __restrict__ U = static_cast<const acc*>(p.u_ptr);
  const acc* __restrict__ W2 = static_cast<const acc*>(p.w2_ptr);
  const acc* __restrict__ bias = static_cast<const acc*>(p.bias_ptr);
  acc* __restrict__ A = static_cast<acc*>(p.a_ptr);
  for (int64_t t0 = static_cast<int64_t>(blockIdx.x) * kMuddWeightsHeadTokens; t0 < p.n_tokens;
       t0 += static_cast<int64_t>(gridDim.x) * kMuddWeightsHeadTokens) {
    const int tt = mudd_weights_head_count(p.n_tokens, t0);
    __syncthreads();  // the previous tile's readers are done with hs
    for (int i = threadIdx.x; i < tt * K; i += kMuddWeightsHeadThreads) {
      hs[i] = gelu_fwd<acc>(U[t0 * K + i], p.tanh_gelu);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < tt * Cl; i += kMuddWeightsHeadThreads) {
      const int t = i / Cl, o = i % Cl;
      const acc* h = hs + t * K;
      acc a = bias[o];
      for (int k = 0; k < K; ++k) a += h[k] * W2[static_cast<int64_t>(k) * Cl + o];
      A[t0 * Cl + i] = a;
    }
  }
}

// The head backward's per-(token, k) pass over the tile (after the tile's dA is staged
// in das [tokens][Cl]): h = GELU(u) (=; into hs [tokens][K] in shared memory when given,
// else the global h, row stride K + 1), g = r·GELU'(u)·(dA·W2ᵀ) (=;
// zero padding for K <= k < ldg) and prod[t][k] = g·u (=, shared memory). Warp w takes
// the (token, 32 k's) units w, w + warps, ...: lane o accumulates da[o]·W2[k, o] for the
// 32 k's over o = lane, lane + 32, ... (W2 rows read as stored, coalesced over o), and
// one reduce-scatter leaves lane i with dh of k = k0 + i (fixed order: deterministic).
template <typename acc>
__device__ __forceinline__ void mudd_weights_head_grads(const MuddWeightsParams& p, int64_t t0, int tt,
                                                        const acc* __restrict__ das, acc* __restrict__ prod,
                                                        acc* __restrict__ hs) {
  const int K = p.K, Cl = p.Cl, ldg = p.ldg;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int kgroups = (ldg + kWarpSize - 1) / kWarpSize;
  const acc* __restrict__ U = static_cast<const acc*>(p.u_ptr);
  const acc* __restrict__ R = static_cast<const acc*>(p.r_ptr);
  const acc* __restrict__ W2 = static_cast<const acc*>(p.w2_ptr);
  acc* __restrict__ H = static_cast<acc*>(p.h_ptr);
  acc* __restrict__ G = static_cast<acc*>(p.g_ptr);
  for (int unit = warp; unit < tt * kgroups; unit += kMuddWeightsHeadThreads / kWarpSize) {
    const int t = unit / kgroups, k0 = (unit % kgroups) * kWarpSize;
    const int live = K - k0 < kWarpSize ? K - k0 : kWarpSize;  // k's of the unit below K (warp-uniform)
    const acc* da = das + t * Cl;
    acc part[kWarpSize];
#pragma unroll
    for (int i = 0; i < kWarpSize; ++i) part[i] = acc(0);
    for (int o = lane; o < Cl; o += kWarpSize) {
      const acc a = da[o];
      const acc* w = W2 + static_cast<int64_t>(k0) * Cl + o;
#pragma unroll
      for (int i = 0; i < kWarpSize; ++i) {
        if (i < live) part[i] += a * w[static_cast<int64_t>(i) * Cl];
      }
    }
    const acc dh = warp_reduce_scatter_pow2<kWarpSize>(part, lane);
    const int k = k0 + lane;
    const int64_t tok = t0 + t;
    if (k < K) {
      const acc u = U[tok * K + k];
      const acc gv = R[tok] * dh * gelu_grad<acc>(u, p.tanh_gelu);
      const acc h = gelu_fwd<acc>(u, p.tanh_gelu);
      if (hs != nullptr) {
        hs[t * K + k] = h;
      } else {
        H[tok * (K + 1) + k] = h;
      }
      G[tok * ldg + k] = gv;
      prod[t * K + k] = gv * u;
    } else if (k < ldg) {
      G[tok * ldg + k] = acc(0);
    }
  }
}

// g = r·GELU'(u)·(dA·W2ᵀ), s = r·(g·u)/d and [dW2; dbias] = Σ_t [GELU(u), 1]ᵀ·dA,
// kMuddWeightsHeadTokens tokens a tile. With dw2_ptr set, the block sums its tokens'
// [h, 1]ᵀ·dA in shared memory (thread i owns the (k, o) slots i, i +
// kMuddWeightsHeadThreads, ..., adding each tile's sum over its tokens in token order)
// and adds it into dw2 at the end, after block blockIdx.x − 1 (block 0: =; the ticket
// tickets[0], common/ticket.cuh); without, h = [GELU(u), 1] is written to global memory
// for a GEMM. Shared memory: dA [tokens][Cl], the products g·u [tokens][K], then with
// dw2 h [tokens][K] and the sums [K + 1][Cl]; s is one warp's fixed-order sum a token.
template <typename acc>
__global__ void __launch_bounds__(kMuddWeightsHeadThreads) mudd_weights_bwd_head_kernel(const MuddWeightsParams p) {
  extern __shared__ __align__(16) unsigned char mudd_head_smem[];
  const int K = p.K, Cl = p.Cl;
  acc* __restrict__ das = reinterpret_cast<acc*>(mudd_head_smem);
  acc* __restrict__ prod = das + kMuddWeightsHeadTokens * Cl;
  acc* __restrict__ DW2 = static_cast<acc*>(p.dw2_ptr);
  acc* __restrict__ hs = DW2 != nullptr ? prod + kMuddWeightsHeadTokens * K : nullptr;
  acc* __restrict__ dw2_s = DW2 != nullptr ? hs + kMuddWeightsHeadTokens * K : nullptr;
  const int dw2_slots = (K + 1) * Cl;
  const acc* __restrict__ R = static_cast<const acc*>(p.r_ptr);
  const acc* __restrict__ dA = static_cast<const acc*>(p.da_ptr);
  acc* __restrict__ S = static_cast<acc*>(p.s_ptr);
  acc* __restrict__ H = static_cast<acc*>(p.h_ptr);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  if (DW2 != nullptr) {
    for (int i = threadIdx.x; i < dw2_slots; i += kMuddWeightsHeadThreads) dw2_s[i] = acc(0);
  }
  for (int64_t t0 = static_cast<int64_t>(blockIdx.x) * kMuddWeightsHeadTokens; t0 < p.n_tokens;
       t0 += static_cast<int64_t>(gridDim.x) * kMuddWeightsHeadTokens) {
    const int tt = mudd_weights_head_count(p.n_tokens, t0);
    __syncthreads();  // the previous tile's readers are done with das, prod and hs
    for (int i = threadIdx.x; i < tt * Cl; i += kMuddWeightsHeadThreads) das[i] = dA[t0 * Cl + i];
    __syncthreads();
    mudd_weights_head_grads(p, t0, tt, das, prod, hs);
    __syncthreads();
    for (int t = warp; t < tt; t += kMuddWeightsHeadThreads / kWarpSize) {
      acc sum = acc(0);
      for (int k = lane; k < K; k += kWarpSize) sum += prod[t * K + k];
      sum = warp_sum(sum);
      if (lane == 0) {
        S[t0 + t] = R[t0 + t] * sum / static_cast<acc>(p.d);
        if (DW2 == nullptr) H[(t0 + t) * (K + 1) + K] = acc(1);  // dbias from the same GEMM as dW2
      }
    }
    if (DW2 != nullptr) {
      for (int i = threadIdx.x; i < dw2_slots; i += kMuddWeightsHeadThreads) {
        const int k = i / Cl, o = i % Cl;
        acc v = acc(0);
        for (int t = 0; t < tt; ++t) v += (k < K ? hs[t * K + k] : acc(1)) * das[t * Cl + o];
        dw2_s[i] += v;
      }
    }
  }
  if (DW2 != nullptr) {  // [dW2; dbias] (=, block 0 | +=) this block's sums, after block − 1's
    if (threadIdx.x == 0) ticket_wait(p.tickets, static_cast<int>(blockIdx.x));
    __syncthreads();
    for (int i = threadIdx.x; i < dw2_slots; i += kMuddWeightsHeadThreads) {
      DW2[i] = blockIdx.x == 0 ? dw2_s[i] : __ldcg(DW2 + i) + dw2_s[i];
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) ticket_release(p.tickets, static_cast<int>(blockIdx.x) + 1);
  }
}

}  // namespace crosslayer
