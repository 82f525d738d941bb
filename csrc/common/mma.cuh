// Tensor-core primitives (mma.sync m16n8k16, 16-bit inputs, fp32 accumulators) and
// the 16-bit row loads that feed them, shared by the mudd_weights and mhc_coeffs
// kernels. Fragment layouts are those of the PTX ISA for m16n8k16 (row.col): a lane
// `lane` holds rows grp = lane / 4 and grp + 8, column pairs 2·tig (tig = lane % 4).
// The bodies compile for sm 8.0 and later only; the launchers check the device.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/reduce.cuh"
#include "common/vec.cuh"

namespace crosslayer {

template <typename T>
struct MmaOp;

// D += A·B, m16n8k16, 16-bit inputs, fp32 accumulators.
template <>
struct MmaOp<__nv_bfloat16> {
  __device__ __forceinline__ static void run(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                             uint32_t a3, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
};
template <>
struct MmaOp<__half> {
  __device__ __forceinline__ static void run(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                             uint32_t a3, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
};

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


// One 32-feature output chunk c of G·Wᵀ for a warp's 16 rows: this thread's rows a
// and b (rows grp and grp + 8 of the m16n8k16 tile; va / vb false past the last
// token: zeros) of the fp32 matrix G (row pointers ga, gb; ksteps·16 columns), times
// the packed bf16 W (uint4 per lane: {hi.b0, hi.b1, lo.b0, lo.b1}, laid out
// [chunk][kstep][tile][lane]). G is split into bf16 hi + lo here; a tile gets
// G_hi·W_hi + G_lo·W_hi + G_hi·W_lo (G_lo·W_lo, 2^-16 relative, is dropped).
// acc[j] = the C fragment of output tile j (8 features), overwritten (=).
template <int kTiles>
__device__ __forceinline__ void mma_chunk_g_wt(float (&acc)[kTiles][4], const float* __restrict__ ga,
                                               const float* __restrict__ gb, bool va, bool vb,
                                               const uint4* __restrict__ W, int64_t c, int ksteps,
                                               int tig, int lane) {
#pragma unroll
  for (int j = 0; j < kTiles; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  for (int ks = 0; ks < ksteps; ++ks) {
    const int k = ks * 16 + tig * 2;
    const float2 g0 = va ? __ldg(reinterpret_cast<const float2*>(ga + k)) : make_float2(0.f, 0.f);
    const float2 g1 = vb ? __ldg(reinterpret_cast<const float2*>(gb + k)) : make_float2(0.f, 0.f);
    const float2 g2 = va ? __ldg(reinterpret_cast<const float2*>(ga + k + 8)) : make_float2(0.f, 0.f);
    const float2 g3 = vb ? __ldg(reinterpret_cast<const float2*>(gb + k + 8)) : make_float2(0.f, 0.f);
    uint32_t h0, h1, h2, h3, l0, l1, l2, l3;
    split_bf16x2(g0.x, g0.y, h0, l0);
    split_bf16x2(g1.x, g1.y, h1, l1);
    split_bf16x2(g2.x, g2.y, h2, l2);
    split_bf16x2(g3.x, g3.y, h3, l3);
    const uint4* __restrict__ wrow = W + ((c * ksteps + ks) * kTiles) * kWarpSize + lane;
#pragma unroll
    for (int j = 0; j < kTiles; ++j) {
      const uint4 b = __ldg(wrow + j * kWarpSize);
      MmaOp<__nv_bfloat16>::run(acc[j], h0, h1, h2, h3, b.x, b.y);
      MmaOp<__nv_bfloat16>::run(acc[j], l0, l1, l2, l3, b.x, b.y);
      MmaOp<__nv_bfloat16>::run(acc[j], h0, h1, h2, h3, b.z, b.w);
    }
  }
}

// Row rw (0: a, 1: b) of an mma_chunk_g_wt result minus s·x, written to this thread's 8
// features [e, e + 8) of dst (features 8tig + 2j + {0, 1} of the chunk: acc[j][2rw + q]
// is feature e + 2j + q); x read at the same features. Features past d are skipped.
template <typename T, bool kVec, int kTiles>
__device__ __forceinline__ void store_g_wt_minus_sx(const float (&acc)[kTiles][4], int rw,
                                                    const T* __restrict__ x, float s,
                                                    T* __restrict__ dst, int64_t e, int64_t d) {
  static_assert(2 * kTiles == 8, "a thread holds 8 features of a 32-feature chunk");
  const uint4 xw = load8<T, kVec>(x, e, d);
  const T* xv = reinterpret_cast<const T*>(&xw);
  Vec<T, 8> out;
#pragma unroll
  for (int j = 0; j < kTiles; ++j) {
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      out.v[2 * j + q] = from_acc<T>(acc[j][2 * rw + q] - s * to_acc(xv[2 * j + q]));
    }
  }
  if (kVec && e + 8 <= d) {
    *reinterpret_cast<Vec<T, 8>*>(dst + e) = out;
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      if (e + k < d) dst[e + k] = out.v[k];
    }
  }
}

}  // namespace crosslayer
