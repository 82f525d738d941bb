// mudd_weights: MUDD dynamic depth weights A = GELU(rms(x)·W1)·W2 + bias, forward and
// backward (launchers in mudd_weights.cu).
//
// Math, per token t (x: d features, W1: (d, K), W2: (K, Cl), Cl = C·l):
//   forward
//     r     = rsqrt(Σ_e x[e]² / d + eps)
//     u[k]  = r·Σ_e x[e]·W1[e, k]                 (= written, saved for the backward)
//     A[o]  = bias[o] + Σ_k GELU(u[k])·W2[k, o]     (= written)
//   backward (dA given)
//     h[k]  = GELU(u[k])                            (= written: dW2 = hᵀ·dA by cuBLAS)
//     du[k] = GELU'(u[k])·Σ_o dA[o]·W2[k, o]
//     g[k]  = r·du[k]                               (= written)
//     s     = r·Σ_k g[k]·u[k] / d                   (= written)
//     dx[e] = Σ_k g[k]·W1[e, k] − s·x[e]            (= written)
//   The last line is r·(dxn − xn·mean_d(dxn·xn)) of the oracle: Σ_e dxn·xn equals
//   Σ_k du·u, so the per-token mean needs no pass over d. dW1 = xᵀ·g (a GEMM over
//   tokens) and dW2, dbias are summed over tokens by the launcher (cuBLAS / at::sum:
//   deterministic).
//
// Kernels
//   mudd_proj_mma_kernel<T>    bf16/fp16 x: r and u, x·W1 on tensor cores
//                              (mma.sync m16n8k16, fp32 accumulate, sm_80+).
//   mudd_dx_mma_kernel<T>      bf16/fp16 x: dx = g·W1ᵀ − s·x on tensor cores.
//   mudd_head_fwd_kernel<acc>  A from u (CUDA cores; K·Cl MACs a token).
//   mudd_head_bwd_kernel<acc>  h, g, s from dA and u (CUDA cores).
//   (fp32/fp64 x: the launcher computes x·W1 and g·W1ᵀ with at::mm; they are the
//   correctness dtypes.)
//
// Accuracy of the tensor-core products. W1 is fp32; rounding it to 16 bits (2^-9) is
// far outside DESIGN.md's policy, so W1 is split into hi + lo 16-bit parts (x's own
// dtype: x is exact in it) and x·W1 = x·W1_hi + x·W1_lo, two mma per fragment into one
// fp32 accumulator (residual 2^-17 relative; hi alone is far outside the policy).
// fp16: W1·2^k is split, k chosen on the device so that max|W1|·2^k lies in
// [2^14, 2^15) (common/mma_pack.h, fp16_split_scale), and the kernel scales u by 2^-k
// (exact): unscaled, a small W1 has subnormal lo (and hi) parts. bf16 needs no scaling,
// and hi + lo suffice here (unlike mhc_coeffs, whose scalar parameter gradients take a
// third part of phi). In dx both operands are fp32 (g and W1): bf16 hi/lo of each and
// g_hi·W_hi + g_lo·W_hi + g_hi·W_lo (three mma; one alone fails the policy for fp16 dx).
//
// Fragment layout (PTX ISA, mma.m16n8k16, row.col): lane = 4·grp + tig;
//   A (16×16): a0 = (row grp, k 2tig..+1), a1 = (row grp+8, same k),
//              a2 = (row grp, k 2tig+8..+9), a3 = (row grp+8, k 2tig+8..+9)
//   B (16×8):  b0 = (k 2tig..+1, col grp), b1 = (k 2tig+8..+9, col grp)
//   C (16×8):  c0, c1 = (row grp, cols 2tig..+1), c2, c3 = (row grp+8, same cols)
// The order of the reduction index inside a k-step and of the columns inside a tile
// is free as long as both operands agree; the launcher packs W1 to match these maps:
//   proj: A = x rows (16 tokens of a warp). A 32-feature chunk, thread (grp, tig)
//         loads features 8tig..8tig+7 of rows grp and grp+8 as one 16-byte vector
//         each (words w0..w3); k-step s of the chunk uses a0 = w[2s], a2 = w[2s+1], so
//         logical k 2tig+j is feature 8tig+4s+j and 2tig+8+j is 8tig+4s+2+j.
//         W1f (packed): [chunk][s][n-tile][lane] × uint4 {hi b0, hi b1, lo b0, lo b1}
//         with b0 = W1[32c+8tig+4s+{0,1}, 8nt+grp], b1 = W1[32c+8tig+4s+{2,3}, ...].
//   dx:   A = g rows (16 tokens), natural k order (hidden 16ks + 2tig + {0,1}, +8).
//         Output chunk of 32 features, n-tile j: logical col n is feature
//         32c + 8(n/2) + 2j + n%2, so thread (grp, tig) ends with features
//         32c + 8tig .. +7 of rows grp and grp+8: 16-byte x loads and dx stores.
//         W1b (packed): [chunk][ks][j][lane] × uint4 {hi b0, hi b1, lo b0, lo b1}
//         with b0 = W1[feature(grp), 16ks+2tig+{0,1}], b1 = W1[feature(grp), ...+8].
//
// Thread mapping
//   proj: block of kMuddWarps warps, warp w owns tokens 16·(blockIdx·kMuddWarps + w)
//         + 0..15; the hidden columns are done kProjCols (128) at a time (64 fp32
//         accumulators a thread); x is re-read for each further column pass (L2).
//         The block's warps walk W1f in step, so its fragments are L1 hits for all
//         but the first warp.
//   dx:   same token ownership; 32 features at a time (4 n-tiles, 16 accumulators).
//   head fwd/bwd: a block of kHeadThreads threads owns kHeadTokens tokens at a time;
//         the tokens' u (and dA) are staged in shared memory and thread i computes the
//         (token, output) pairs i, i + kHeadThreads, ...; per-token sums over k are
//         reduced by one warp per token in a fixed order (deterministic).
//
// Assumptions (checked or arranged by the launcher):
//   1) x and dx: features unit-stride, tokens through TokenLayout; for 16-byte access
//      (kVec) base 16-byte aligned and token strides multiples of 8 elements, else the
//      scalar path (kVec = false) is used;
//   2) W1f / W1b packed as above, zero-padded to whole chunks / tiles; for fp16 x W1f
//      packs W1·2^k and w1f_unscale_ptr points to 2^-k (null: no scaling);
//   3) u, g, h, s, r, A, dA contiguous in the accumulator dtype; g has row stride
//      ldg = K rounded up to 16, zero-padded.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/math.cuh"
#include "common/mma.cuh"
#include "common/reduce.cuh"
#include "common/tokens.cuh"
#include "common/vec.cuh"

namespace crosslayer {

constexpr int kMuddWarps = 8;                    // warps a block (proj, dx)
constexpr int kMuddThreads = kMuddWarps * kWarpSize;
constexpr int kProjCols = 128;                   // hidden columns a proj pass
constexpr int kProjTiles = kProjCols / 8;        // n-tiles a pass
constexpr int kDxTiles = 4;                      // n-tiles a dx chunk (32 features)
constexpr int kHeadThreads = 256;
constexpr int kHeadTokens = 8;                   // tokens a head tile

struct MuddWeightsParams {
  using index_t = int64_t;
  index_t n_tokens;  // N
  index_t d;         // features
  int K;             // hidden
  int Cl;            // C·l outputs
  int ldg;           // row stride of g (K rounded up to 16)
  int k_pad;         // K rounded up to kProjCols (columns of W1f)
  bool tanh_gelu;    // GELU form: tanh approximation (else exact erf)
  double eps;
  TokenLayout x_tok;   // x (N, d)
  TokenLayout dx_tok;  // dx (N, d)
  const void* __restrict__ x_ptr;
  const void* __restrict__ w1f_ptr;  // proj: packed W1 (uint4 fragments)
  const float* __restrict__ w1f_unscale_ptr;  // proj, fp16: 2^-k of W1f (device scalar), or null
  const void* __restrict__ w1b_ptr;  // dx: packed W1 (uint4 fragments)
  const void* __restrict__ w2_ptr;   // W2 (K, Cl), accumulator dtype, contiguous
  const void* __restrict__ w2t_ptr;  // W2ᵀ (Cl, K), accumulator dtype, contiguous
  const void* __restrict__ bias_ptr; // (Cl), accumulator dtype
  // forward outputs / backward inputs, accumulator dtype
  void* __restrict__ u_ptr;  // (N, K)
  void* __restrict__ r_ptr;  // (N)
  void* __restrict__ a_ptr;  // (N, Cl)
  // backward
  const void* __restrict__ da_ptr;  // (N, Cl)
  void* __restrict__ h_ptr;         // (N, K)
  void* __restrict__ g_ptr;         // (N, ldg)
  void* __restrict__ s_ptr;         // (N)
  void* __restrict__ dx_ptr;
};

// ----------------------------------------------------------------------------- GELU

template <typename acc>
__device__ __forceinline__ acc gelu_fwd(acc u, bool tanh_form) {
  if (tanh_form) {
    const acc c0 = acc(0.7978845608028654), c1 = acc(0.044715);
    return acc(0.5) * u * (acc(1) + acc_tanh(c0 * (u + c1 * u * u * u)));
  }
  return acc(0.5) * u * (acc(1) + acc_erf(u * acc(0.7071067811865476)));
}

template <typename acc>
__device__ __forceinline__ acc gelu_grad(acc u, bool tanh_form) {
  if (tanh_form) {
    const acc c0 = acc(0.7978845608028654), c1 = acc(0.044715);
    const acc t = acc_tanh(c0 * (u + c1 * u * u * u));
    return acc(0.5) * (acc(1) + t) + acc(0.5) * u * (acc(1) - t * t) * c0 * (acc(1) + acc(3) * c1 * u * u);
  }
  const acc cdf = acc(0.5) * (acc(1) + acc_erf(u * acc(0.7071067811865476)));
  const acc pdf = acc_exp(acc(-0.5) * u * u) * acc(0.3989422804014327);
  return cdf + u * pdf;
}

// r and u = r·(x·W1) for bf16/fp16 x.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kMuddThreads) mudd_proj_mma_kernel(const MuddWeightsParams p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int grp = lane / 4, tig = lane % 4;
  const int64_t t0 = (static_cast<int64_t>(blockIdx.x) * kMuddWarps + warp) * 16;
  if (t0 >= p.n_tokens) return;
  const int64_t d = p.d;
  const int64_t ta = t0 + grp, tb = t0 + grp + 8;  // the thread's two rows
  const bool va = ta < p.n_tokens, vb = tb < p.n_tokens;
  const T* __restrict__ X = static_cast<const T*>(p.x_ptr);
  const T* __restrict__ xa = X + (va ? p.x_tok.offset(ta) : 0);
  const T* __restrict__ xb = X + (vb ? p.x_tok.offset(tb) : 0);
  const uint4* __restrict__ W = static_cast<const uint4*>(p.w1f_ptr);
  float* __restrict__ U = static_cast<float*>(p.u_ptr);
  const int64_t chunks = (d + 31) / 32;
  const int n_tiles = p.k_pad / 8;  // per chunk-step row of W1f
  float ssa = 0.f, ssb = 0.f;
  float ra = 0.f, rb = 0.f;

  for (int col0 = 0; col0 < p.k_pad; col0 += kProjCols) {
    float acc[kProjTiles][4];
#pragma unroll
    for (int j = 0; j < kProjTiles; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t e = c * 32 + tig * 8;
      const uint4 wa = va ? load8<T, kVec>(xa, e, d) : make_uint4(0, 0, 0, 0);
      const uint4 wb = vb ? load8<T, kVec>(xb, e, d) : make_uint4(0, 0, 0, 0);
      if (col0 == 0) {
        ssa += sumsq8<T>(wa);
        ssb += sumsq8<T>(wb);
      }
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        const uint32_t a0 = s ? wa.z : wa.x, a2 = s ? wa.w : wa.y;
        const uint32_t a1 = s ? wb.z : wb.x, a3 = s ? wb.w : wb.y;
        const uint4* __restrict__ wrow = W + ((c * 2 + s) * n_tiles + col0 / 8) * kWarpSize + lane;
#pragma unroll
        for (int j = 0; j < kProjTiles; ++j) {
          const uint4 b = __ldg(wrow + j * kWarpSize);
          MmaOp<T>::run(acc[j], a0, a1, a2, a3, b.x, b.y);
          MmaOp<T>::run(acc[j], a0, a1, a2, a3, b.z, b.w);
        }
      }
    }
    const float unscale = p.w1f_unscale_ptr != nullptr ? *p.w1f_unscale_ptr : 1.f;
    if (col0 == 0) {
      // Row sums over the 4 threads of a row (tig), fixed order.
      ssa += __shfl_xor_sync(0xffffffffu, ssa, 1);
      ssa += __shfl_xor_sync(0xffffffffu, ssa, 2);
      ssb += __shfl_xor_sync(0xffffffffu, ssb, 1);
      ssb += __shfl_xor_sync(0xffffffffu, ssb, 2);
      ra = rsqrtf(ssa / static_cast<float>(d) + static_cast<float>(p.eps));
      rb = rsqrtf(ssb / static_cast<float>(d) + static_cast<float>(p.eps));
      if (tig == 0) {
        if (va) static_cast<float*>(p.r_ptr)[ta] = ra;
        if (vb) static_cast<float*>(p.r_ptr)[tb] = rb;
      }
    }
#pragma unroll
    for (int j = 0; j < kProjTiles; ++j) {
      const int k = col0 + j * 8 + tig * 2;
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        if (k + q < p.K) {
          if (va) U[ta * p.K + k + q] = acc[j][q] * unscale * ra;
          if (vb) U[tb * p.K + k + q] = acc[j][2 + q] * unscale * rb;
        }
      }
    }
  }
#endif
}

// dx = g·W1ᵀ − s·x for bf16/fp16 x (products in bf16 hi/lo, fp32 accumulators).
template <typename T, bool kVec>
__global__ void __launch_bounds__(kMuddThreads) mudd_dx_mma_kernel(const MuddWeightsParams p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int grp = lane / 4, tig = lane % 4;
  const int64_t t0 = (static_cast<int64_t>(blockIdx.x) * kMuddWarps + warp) * 16;
  if (t0 >= p.n_tokens) return;
  const int64_t d = p.d;
  const int64_t ta = t0 + grp, tb = t0 + grp + 8;
  const bool va = ta < p.n_tokens, vb = tb < p.n_tokens;
  const T* __restrict__ X = static_cast<const T*>(p.x_ptr);
  T* __restrict__ DX = static_cast<T*>(p.dx_ptr);
  const T* __restrict__ xa = X + (va ? p.x_tok.offset(ta) : 0);
  const T* __restrict__ xb = X + (vb ? p.x_tok.offset(tb) : 0);
  T* __restrict__ dxa = DX + (va ? p.dx_tok.offset(ta) : 0);
  T* __restrict__ dxb = DX + (vb ? p.dx_tok.offset(tb) : 0);
  const float* __restrict__ G = static_cast<const float*>(p.g_ptr);
  const float* __restrict__ ga = G + (va ? ta : 0) * p.ldg;
  const float* __restrict__ gb = G + (vb ? tb : 0) * p.ldg;
  const float sa = va ? static_cast<const float*>(p.s_ptr)[ta] : 0.f;
  const float sb = vb ? static_cast<const float*>(p.s_ptr)[tb] : 0.f;
  const uint4* __restrict__ W = static_cast<const uint4*>(p.w1b_ptr);
  const int ksteps = p.ldg / 16;
  const int64_t chunks = (d + 31) / 32;

  for (int64_t c = 0; c < chunks; ++c) {
    float acc[kDxTiles][4];
    mma_chunk_g_wt<kDxTiles>(acc, ga, gb, va, vb, W, c, ksteps, tig, lane);
    // Thread holds features 32c + 8tig + 2j + {0, 1} of rows a (c0, c1) and b (c2, c3).
    const int64_t e = c * 32 + tig * 8;
    if (va) store_g_wt_minus_sx<T, kVec>(acc, 0, xa, sa, dxa, e, d);
    if (vb) store_g_wt_minus_sx<T, kVec>(acc, 1, xb, sb, dxb, e, d);
  }
#endif
}

// ------------------------------------------------------------------------ the head

// A = bias + GELU(u)·W2, kHeadTokens tokens a tile. Shared memory: h [kHeadTokens][K].
template <typename acc>
__global__ void __launch_bounds__(kHeadThreads) mudd_head_fwd_kernel(const MuddWeightsParams p) {
  extern __shared__ __align__(16) unsigned char mudd_head_smem[];
  acc* __restrict__ hs = reinterpret_cast<acc*>(mudd_head_smem);
  const int K = p.K, Cl = p.Cl;
  const acc* __restrict__ U = static_cast<const acc*>(p.u_ptr);
  const acc* __restrict__ W2 = static_cast<const acc*>(p.w2_ptr);
  const acc* __restrict__ bias = static_cast<const acc*>(p.bias_ptr);
  acc* __restrict__ A = static_cast<acc*>(p.a_ptr);
  for (int64_t t0 = static_cast<int64_t>(blockIdx.x) * kHeadTokens; t0 < p.n_tokens;
       t0 += static_cast<int64_t>(gridDim.x) * kHeadTokens) {
    const int tt = static_cast<int>(p.n_tokens - t0 < kHeadTokens ? p.n_tokens - t0 : kHeadTokens);
    __syncthreads();  // the previous tile's readers are done with hs
    for (int i = threadIdx.x; i < tt * K; i += kHeadThreads) {
      hs[i] = gelu_fwd<acc>(U[t0 * K + i], p.tanh_gelu);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < tt * Cl; i += kHeadThreads) {
      const int t = i / Cl, o = i % Cl;
      const acc* h = hs + t * K;
      acc a = bias[o];
      for (int k = 0; k < K; ++k) a += h[k] * W2[static_cast<int64_t>(k) * Cl + o];
      A[t0 * Cl + i] = a;
    }
  }
}

// h = GELU(u), g = r·GELU'(u)·(dA·W2ᵀ), s = r·(g·u)/d, kHeadTokens tokens a tile.
// Shared memory: dA [kHeadTokens][Cl], then the products g·u [kHeadTokens][K].
template <typename acc>
__global__ void __launch_bounds__(kHeadThreads) mudd_head_bwd_kernel(const MuddWeightsParams p) {
  extern __shared__ __align__(16) unsigned char mudd_head_smem[];
  const int K = p.K, Cl = p.Cl, ldg = p.ldg;
  acc* __restrict__ das = reinterpret_cast<acc*>(mudd_head_smem);
  acc* __restrict__ prod = das + kHeadTokens * Cl;
  const acc* __restrict__ U = static_cast<const acc*>(p.u_ptr);
  const acc* __restrict__ R = static_cast<const acc*>(p.r_ptr);
  const acc* __restrict__ W2t = static_cast<const acc*>(p.w2t_ptr);
  const acc* __restrict__ dA = static_cast<const acc*>(p.da_ptr);
  acc* __restrict__ H = static_cast<acc*>(p.h_ptr);
  acc* __restrict__ G = static_cast<acc*>(p.g_ptr);
  acc* __restrict__ S = static_cast<acc*>(p.s_ptr);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  for (int64_t t0 = static_cast<int64_t>(blockIdx.x) * kHeadTokens; t0 < p.n_tokens;
       t0 += static_cast<int64_t>(gridDim.x) * kHeadTokens) {
    const int tt = static_cast<int>(p.n_tokens - t0 < kHeadTokens ? p.n_tokens - t0 : kHeadTokens);
    __syncthreads();  // the previous tile's readers are done with das and prod
    for (int i = threadIdx.x; i < tt * Cl; i += kHeadThreads) das[i] = dA[t0 * Cl + i];
    __syncthreads();
    for (int i = threadIdx.x; i < tt * ldg; i += kHeadThreads) {
      const int t = i / ldg, k = i % ldg;
      acc gv = acc(0), pv = acc(0);
      if (k < K) {
        const acc* da = das + t * Cl;
        const acc* w = W2t + k;
        acc dh = acc(0);
        for (int o = 0; o < Cl; ++o) dh += da[o] * w[static_cast<int64_t>(o) * K];
        const acc u = U[(t0 + t) * K + k];
        const acc r = R[t0 + t];
        gv = r * dh * gelu_grad<acc>(u, p.tanh_gelu);
        pv = gv * u;
        H[(t0 + t) * K + k] = gelu_fwd<acc>(u, p.tanh_gelu);
        prod[t * K + k] = pv;
      }
      G[(t0 + t) * ldg + k] = gv;  // zero padding for k >= K
    }
    __syncthreads();
    for (int t = warp; t < tt; t += kHeadThreads / kWarpSize) {
      acc sum = acc(0);
      for (int k = lane; k < K; k += kWarpSize) sum += prod[t * K + k];
      sum = warp_sum(sum);
      if (lane == 0) S[t0 + t] = R[t0 + t] * sum / static_cast<acc>(p.d);
    }
  }
}

}  // namespace crosslayer
