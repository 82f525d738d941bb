// Tensor-core (mma.sync m16n8k16, 16-bit inputs, fp32 accumulators, sm_80+) primitives of
// the torch-free kernels: the instruction, 16-bit row loads as fragment words, the bf16
// hi/lo split of fp32 operands, and the warp tiles shared by the projection kernels
// (X·W: mudd_weights' proj, mhc_coeffs' proj) and the backward kernels' G·Wᵀ − s·X and
// Xᵀ·G tiles (mudd_weights' dx, mhc_coeffs' dh). The host side (packing the projections'
// W into fragments) is common/mma_pack.h.
//
// Fragment layout (PTX ISA, mma.m16n8k16, row.col): lane = 4·grp + tig;
//   A (16×16): a0 = (row grp, k 2tig..+1), a1 = (row grp+8, same k),
//              a2 = (row grp, k 2tig+8..+9), a3 = (row grp+8, k 2tig+8..+9)
//   B (16×8):  b0 = (k 2tig..+1, col grp), b1 = (k 2tig+8..+9, col grp)
//   C (16×8):  c0, c1 = (row grp, cols 2tig..+1), c2, c3 = (row grp+8, same cols)
// The order of the reduction index inside a k-step and of the columns inside a tile
// is free as long as both operands agree; the operands are laid out to these maps:
//   proj: A = x rows (16 tokens of a warp). A 32-feature chunk, thread (grp, tig)
//         loads features 8tig..8tig+7 of rows grp and grp+8 as one 16-byte vector
//         each (words w0..w3); k-step s of the chunk uses a0 = w[2s], a2 = w[2s+1], so
//         logical k 2tig+j is feature 8tig+4s+j and 2tig+8+j is 8tig+4s+2+j.
//         Wf (packed): [chunk][s][n-tile][lane] × uint4 {hi b0, hi b1, lo b0, lo b1}
//         with b0 = W[32c+8tig+4s+{0,1}, 8nt+grp], b1 = W[32c+8tig+4s+{2,3}, ...].
//   G·Wᵀ: A = g rows (16 tokens), natural k order (hidden 16ks + 2tig + {0,1}, +8).
//         Output chunk of 32 features, n-tile j: logical col n is feature
//         32c + 8(n/2) + 2j + n%2, so thread (grp, tig) ends with features
//         32c + 8tig .. +7 of rows grp and grp+8: 16-byte x loads and dx stores.
//         W is read as fp32 (mma_chunk_g_w32, which permutes the k order so that G
//         and W are float4 loads), split into bf16 hi + lo in registers.
//
//   Xᵀ·G (mma_xt_g_tile): A = Xᵀ of a 16-token tile (rows = the chunk's features, k =
//         tokens), staged transposed through the warp's shared memory; B = G's rows of
//         the same tokens (fp32, split into bf16 hi + lo), n-tile j = columns col0 + 8j
//         + grp. C row r of m-tile mt is feature 16mt + r of the chunk.
//
// Warp tiles: warp w of a block owns 16 token rows; thread (grp, tig) holds rows grp
// (a) and grp + 8 (b) of every fragment (MmaRows). Rows past the last token carry zeros
// and are never written. Every phase below is called by all 32 lanes of the warp (the
// mma and the shuffles are warp-wide) and has no barrier.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/std.cuh"

#include "common/reduce.cuh"
#include "common/vec.cuh"

namespace crosslayer {

// D += A·B, m16n8k16, T (bf16 or fp16) inputs, fp32 accumulators.
template <typename T>
struct MmaOp {
  static_assert(is_same_v<T, __nv_bfloat16> || is_same_v<T, __half>, "mma.sync inputs are bf16 or fp16");
  __device__ __forceinline__ static void run(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                             uint32_t a3, uint32_t b0, uint32_t b1) {
    if constexpr (is_same_v<T, __nv_bfloat16>) {
      asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                   : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    } else {
      asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                   : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
  }
};

// The warp's token rows: 16 tokens from t0 (warp w of the block: 16·(blockIdx.x·warps +
// w)); this thread's rows ta = t0 + grp and tb = t0 + grp + 8, va / vb when they exist.
struct MmaRows {
  int lane, grp, tig;
  int64_t t0, ta, tb;
  bool va, vb;
};

__device__ __forceinline__ MmaRows mma_rows(int warps_per_block, int64_t n_tokens) {
  MmaRows r;
  r.lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  r.grp = r.lane / 4;
  r.tig = r.lane % 4;
  r.t0 = (static_cast<int64_t>(blockIdx.x) * warps_per_block + warp) * 16;
  r.ta = r.t0 + r.grp;
  r.tb = r.t0 + r.grp + 8;
  r.va = r.ta < n_tokens;
  r.vb = r.tb < n_tokens;
  return r;
}

// Sum of v over the 4 lanes of a fragment row (tig), the same bits in each, fixed order.
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  return v;
}

// 8 elements [e, e + 8) of a 16-bit row as four 32-bit words; zero past d. With kVec
// one 16-byte load, else element by element.
template <typename T, bool kVec>
__device__ __forceinline__ uint4 load8(const T* __restrict__ row, int64_t e, int64_t d) {
  if (kVec && e + 8 <= d) return *reinterpret_cast<const uint4*>(row + e);
  Vec<T, 8> v;
#pragma unroll
  for (int k = 0; k < 8; ++k) v.v[k] = (e + k < d) ? row[e + k] : T(0.0f);
  return *reinterpret_cast<const uint4*>(&v);
}

// The 8 16-bit elements of w stored to row[e, e + 8), those past d skipped. With kVec
// (and e + 8 <= d) one 16-byte store.
template <typename T, bool kVec>
__device__ __forceinline__ void store8(T* row, int64_t e, int64_t d, const uint4& w) {
  if (kVec && e + 8 <= d) {
    *reinterpret_cast<uint4*>(row + e) = w;
    return;
  }
  const T* v = reinterpret_cast<const T*>(&w);
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    if (e + k < d) row[e + k] = v[k];
  }
}

// Σ of the squares of the 8 16-bit elements of w, in fp32.
template <typename T>
__device__ __forceinline__ float sumsq8(const uint4& w) {
  const T* v = reinterpret_cast<const T*>(&w);
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const float f = to_acc(v[k]);
    s += f * f;
  }
  return s;
}

// Two fp32 values as bf16x2 hi and the bf16x2 of their remainders lo.
__device__ __forceinline__ void split_bf16x2(float v0, float v1, uint32_t& hi, uint32_t& lo) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(v0, v1);
  const float2 hf = __bfloat1622float2(h);
  const __nv_bfloat162 l = __floats2bfloat162_rn(v0 - hf.x, v1 - hf.y);
  hi = *reinterpret_cast<const uint32_t*>(&h);
  lo = *reinterpret_cast<const uint32_t*>(&l);
}

// acc[j][0..3] = 0 for the kTiles C fragments.
template <int kTiles>
__device__ __forceinline__ void mma_zero(float (&acc)[kTiles][4]) {
#pragma unroll
  for (int j = 0; j < kTiles; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
}

// proj, one 32-feature chunk c: acc[j] += X_chunk·W_chunk for the kTiles n-tiles from
// column col0, with wa / wb this thread's 16-byte words of rows a / b (load8). W packed
// [chunk][s][n-tile][lane] (n_tiles tiles a row), kRec uint4 a record: {hi b0, hi b1,
// lo b0, lo b1}, then with kRest {rest b0, rest b1, -, -}; each part one mma. With
// kSkipPad, tiles from column live_cols on (all padding: a warp-uniform test) are skipped.
template <typename T, int kTiles, bool kRest, bool kSkipPad>
__device__ __forceinline__ void mma_proj_chunk(float (&acc)[kTiles][4], const uint4& wa, const uint4& wb,
                                               const uint4* __restrict__ W, int64_t c, int n_tiles, int col0,
                                               int live_cols, int lane) {
  constexpr int kRec = kRest ? 2 : 1;
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    const uint32_t a0 = s ? wa.z : wa.x, a2 = s ? wa.w : wa.y;
    const uint32_t a1 = s ? wb.z : wb.x, a3 = s ? wb.w : wb.y;
    const int64_t widx = ((c * 2 + s) * n_tiles + col0 / 8) * kWarpSize + lane;
#pragma unroll
    for (int j = 0; j < kTiles; ++j) {
      if (!kSkipPad || col0 + 8 * j < live_cols) {
        const uint4* __restrict__ wl = W + (widx + j * kWarpSize) * kRec;
        const uint4 b = __ldg(wl);
        MmaOp<T>::run(acc[j], a0, a1, a2, a3, b.x, b.y);
        MmaOp<T>::run(acc[j], a0, a1, a2, a3, b.z, b.w);
        if (kRest) {
          const uint4 br = __ldg(wl + 1);
          MmaOp<T>::run(acc[j], a0, a1, a2, a3, br.x, br.y);
        }
      }
    }
  }
}

// One 32-feature output chunk of G·Wᵀ for a warp's 16 rows: this thread's rows a and b
// (rows grp and grp + 8 of the m16n8k16 tile; va / vb false past the last token: zeros)
// of the fp32 matrix G (row pointers ga, gb, 16-byte aligned; ksteps·16 columns, zero
// past W's), times W read as fp32 and split here (no packing launch): W (rows, ldw)
// row-major, ldw a multiple of 4 and W 16-byte aligned (common/mma_pack.h,
// fp32_rows_ld4: columns past W's own are zero); this chunk's 32 features from row0 =
// i·d + f0, those at f0 + 0..31 >= d read as 0. The reduction order inside a k-step is
// permuted so that every operand is one 16-byte load: logical k 2tig + {0, 1} is column
// 16ks + 4tig + {0, 1} and 2tig + 8 + {0, 1} is 16ks + 4tig + {2, 3}, in G and W alike
// (a0 / a2 from ga's float4, b0 / b1 from W[feature(grp), 16ks + 4tig .. + 3], feature(grp)
// = f0 + 8(grp / 2) + 2j + grp % 2: 64 contiguous bytes a row a request). G and W are
// split into bf16 hi + lo; a tile gets G_hi·W_hi + G_lo·W_hi + G_hi·W_lo (G_lo·W_lo,
// 2^-16 relative, is dropped). acc[j] = the C fragment of output tile j (8 features),
// overwritten (=). For kernels that need the product once per tile of a weight that
// L1/L2 holds (4 B an element read, as packed hi + lo would be). G rows are read with
// plain loads (they may have been written by the same kernel).
template <int kTiles>
__device__ __forceinline__ void mma_chunk_g_w32(float (&acc)[kTiles][4], const float* ga, const float* gb, bool va,
                                                bool vb, const float* __restrict__ W, int64_t ldw, int64_t row0,
                                                int64_t f0, int64_t d, int ksteps, int grp, int tig) {
  mma_zero(acc);
  const float4 zero = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int ks = 0; ks < ksteps; ++ks) {
    const int k = ks * 16 + tig * 4;
    const float4 g0 = va ? *reinterpret_cast<const float4*>(ga + k) : zero;
    const float4 g1 = vb ? *reinterpret_cast<const float4*>(gb + k) : zero;
    uint32_t h0, h1, h2, h3, l0, l1, l2, l3;
    split_bf16x2(g0.x, g0.y, h0, l0);
    split_bf16x2(g1.x, g1.y, h1, l1);
    split_bf16x2(g0.z, g0.w, h2, l2);
    split_bf16x2(g1.z, g1.w, h3, l3);
#pragma unroll
    for (int j = 0; j < kTiles; ++j) {
      const int fo = 8 * (grp / 2) + 2 * j + grp % 2;
      const float4 w = (f0 + fo < d && k < ldw) ? __ldg(reinterpret_cast<const float4*>(W + (row0 + fo) * ldw + k))
                                                : zero;
      uint32_t bh0, bl0, bh1, bl1;
      split_bf16x2(w.x, w.y, bh0, bl0);
      split_bf16x2(w.z, w.w, bh1, bl1);
      MmaOp<__nv_bfloat16>::run(acc[j], h0, h1, h2, h3, bh0, bh1);
      MmaOp<__nv_bfloat16>::run(acc[j], l0, l1, l2, l3, bh0, bh1);
      MmaOp<__nv_bfloat16>::run(acc[j], h0, h1, h2, h3, bl0, bl1);
    }
  }
}

// Row rw (0: a, 1: b) of an mma_chunk_g_w32 result minus s·x plus c·y, written to this
// thread's 8 features [e, e + 8) of dst (features 8tig + 2j + {0, 1} of the chunk:
// acc[j][2rw + q] is feature e + 2j + q) `=`, plus `prior` (null: none; it may be dst
// itself, for `+=`) added in fp32 before the one rounding; xw: x's 8 features (load8),
// y (null: no c·y term) and prior read at the same features. Features past d are skipped.
template <typename T, bool kVec, int kTiles>
__device__ __forceinline__ void store_g_wt_minus_sx(const float (&acc)[kTiles][4], int rw, const uint4& xw,
                                                    float s, const T* y, float c, const T* prior, T* dst,
                                                    int64_t e, int64_t d) {
  static_assert(2 * kTiles == 8, "a thread holds 8 features of a 32-feature chunk");
  const T* xv = reinterpret_cast<const T*>(&xw);
  const uint4 yw = y != nullptr ? load8<T, kVec>(y, e, d) : make_uint4(0, 0, 0, 0);
  const T* yv = reinterpret_cast<const T*>(&yw);
  const uint4 pw = prior != nullptr ? load8<T, kVec>(prior, e, d) : make_uint4(0, 0, 0, 0);
  const T* pv = reinterpret_cast<const T*>(&pw);
  Vec<T, 8> out;
#pragma unroll
  for (int j = 0; j < kTiles; ++j) {
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const float before = prior != nullptr ? to_acc(pv[2 * j + q]) : 0.f;
      const float extra = y != nullptr ? c * to_acc(yv[2 * j + q]) : 0.f;
      out.v[2 * j + q] = from_acc<T>(acc[j][2 * rw + q] - s * to_acc(xv[2 * j + q]) + extra + before);
    }
  }
  store8<T, kVec>(dst, e, d, *reinterpret_cast<const uint4*>(&out));
}

// Shared memory a warp needs for mma_xt_g_tile<T>, in bf16 elements: the tile
// transposed, [part][32 features][kMmaXtStride tokens] (parts: bf16 X is exact in one,
// fp16 X is hi + lo in bf16, also exact: 11 significant bits, 8 + 3). The row stride of
// 24 tokens (16 + 8 of padding) makes the fragment loads of a warp conflict-free.
constexpr int kMmaXtStride = 24;
template <typename T>
constexpr int kMmaXtParts = is_same_v<T, __nv_bfloat16> ? 1 : 2;
template <typename T>
constexpr int kMmaXtStageElems = kMmaXtParts<T> * 32 * kMmaXtStride;

// acc[mt][j] += Xᵀ·G over one 16-token tile (tokens t0 + 0..15): X's 32-feature chunk
// as this thread's 16-byte words xa / xb (load8 of rows grp and grp + 8; zeros for
// tokens past the last), G fp32 with row stride ldg, columns col0 + 8j + grp (j < kDT;
// columns >= cols and tokens >= n_tokens read as 0). acc[mt][j] is the C fragment of
// features 16mt + (grp, grp + 8) × columns col0 + 8j + 2tig + {0, 1}. G is split into
// bf16 hi + lo; a fragment gets X_hi·G_hi + X_hi·G_lo (+ X_lo·G_hi for fp16 X; the
// dropped products are 2^-16 relative). `stage`: the warp's kMmaXtStageElems<T>
// elements of shared memory. Called by all 32 lanes; __syncwarp only.
template <typename T, int kDT>
__device__ __forceinline__ void mma_xt_g_tile(float (&acc)[2][kDT][4], const uint4& xa, const uint4& xb,
                                              const float* __restrict__ g, int64_t ldg, int64_t t0,
                                              int64_t n_tokens, int col0, int cols,
                                              __nv_bfloat16* __restrict__ stage, int grp, int tig) {
  constexpr int kParts = kMmaXtParts<T>;
  const T* xv[2] = {reinterpret_cast<const T*>(&xa), reinterpret_cast<const T*>(&xb)};
  __syncwarp();  // the previous tile's fragment loads are done
#pragma unroll
  for (int k = 0; k < 8; ++k) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float v = to_acc(xv[h][k]);
      const __nv_bfloat16 hi = __float2bfloat16_rn(v);
      __nv_bfloat16* row = stage + (tig * 8 + k) * kMmaXtStride + grp + 8 * h;
      row[0] = hi;
      if (kParts == 2) row[32 * kMmaXtStride] = __float2bfloat16_rn(v - __bfloat162float(hi));
    }
  }
  __syncwarp();
  // A fragments of both m-tiles and parts: a0 / a1 rows grp / grp + 8, k 2tig..+1;
  // a2 / a3 the same rows, k 2tig + 8..+9 (two tokens a 32-bit word).
  uint32_t a[kParts][2][4];
#pragma unroll
  for (int q = 0; q < kParts; ++q) {
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      const __nv_bfloat16* s0 = stage + (q * 32 + mt * 16 + grp) * kMmaXtStride + 2 * tig;
      const __nv_bfloat16* s1 = s0 + 8 * kMmaXtStride;
      a[q][mt][0] = *reinterpret_cast<const uint32_t*>(s0);
      a[q][mt][1] = *reinterpret_cast<const uint32_t*>(s1);
      a[q][mt][2] = *reinterpret_cast<const uint32_t*>(s0 + 8);
      a[q][mt][3] = *reinterpret_cast<const uint32_t*>(s1 + 8);
    }
  }
  const int64_t tk[4] = {t0 + 2 * tig, t0 + 2 * tig + 1, t0 + 2 * tig + 8, t0 + 2 * tig + 9};
#pragma unroll
  for (int j = 0; j < kDT; ++j) {
    const int col = col0 + 8 * j + grp;
    float gv[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) gv[k] = (col < cols && tk[k] < n_tokens) ? __ldg(g + tk[k] * ldg + col) : 0.f;
    uint32_t h0, h1, l0, l1;
    split_bf16x2(gv[0], gv[1], h0, l0);
    split_bf16x2(gv[2], gv[3], h1, l1);
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      const uint32_t(&x0)[4] = a[0][mt];
      MmaOp<__nv_bfloat16>::run(acc[mt][j], x0[0], x0[1], x0[2], x0[3], h0, h1);
      MmaOp<__nv_bfloat16>::run(acc[mt][j], x0[0], x0[1], x0[2], x0[3], l0, l1);
      if (kParts == 2) {
        const uint32_t(&x1)[4] = a[kParts - 1][mt];
        MmaOp<__nv_bfloat16>::run(acc[mt][j], x1[0], x1[1], x1[2], x1[3], h0, h1);
      }
    }
  }
}

// The accumulators of mma_xt_g_tile written (=) or, with `accumulate`, added (+=, the
// prior value read past L1: another SM may have written it, common/ticket.cuh) to P
// (rows × cols, row-major fp32): C row r of m-tile mt is feature f0 + 16mt + r of the
// chunk, stored at row row0 + f0 + 16mt + r; columns col0 + 8j + 2tig + {0, 1}. Features
// >= d and columns >= cols (padding) are skipped.
template <int kDT>
__device__ __forceinline__ void mma_xt_g_store(float* __restrict__ P, const float (&acc)[2][kDT][4], int64_t row0,
                                               int64_t f0, int64_t d, int col0, int cols, int grp, int tig,
                                               bool accumulate = false) {
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t f = f0 + mt * 16 + grp + 8 * h;
      if (f >= d) continue;
#pragma unroll
      for (int j = 0; j < kDT; ++j) {
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          const int m = col0 + 8 * j + 2 * tig + q;
          if (m < cols) {
            float* dst = P + (row0 + f) * cols + m;
            *dst = accumulate ? __ldcg(dst) + acc[mt][j][2 * h + q] : acc[mt][j][2 * h + q];
          }
        }
      }
    }
  }
}

}  // namespace crosslayer
