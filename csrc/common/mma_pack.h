// Host-side (ATen) helpers of the tensor-core launchers (mudd_weights.cu, mhc_coeffs.cu):
// packing of fp32 weights into mma.sync m16n8k16 B fragments (hi + lo 16-bit parts; the
// element maps are documented in common/mma.cuh; pack_fragments does it in one launch of
// kernels/mma_pack.cuh), the
// power-of-two scaling that keeps fp16 parts normal, and the 16-bit GEMMs with fp32
// output of the backward passes. Everything here is stream-ordered ATen work on the
// operands' device: no host syncs.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "common/launch.h"
#include "kernels/mma_pack.cuh"

#ifdef CUEMU
#include "cuemu_aten.h"  // tools/cuemu/include
#endif

namespace crosslayer {

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// a·b for 16-bit a and b of one dtype with an fp32 result: exact 16-bit products summed
// in fp32, as cuBLAS computes it (at::mm's out_dtype overload, aten::mm.dtype, which
// exists for CUDA only; the CPU emulator tools/cuemu supplies its own).
inline at::Tensor mm_f32_out(const at::Tensor& a, const at::Tensor& b) {
#ifdef CUEMU
  return ::cuemu::mm_f32_out(a, b);
#else
  return at::mm(a, b, at::kFloat);
#endif
}

// Power-of-two scaling for an fp16 hi + lo split of the fp32 tensor t: 0-dim fp32
// tensors {scale = 2^k, unscale = 2^-k} on t's device, computed there (no host sync),
// with max|t|·2^k in [2^14, 2^15) (log2's last-bit rounding next to a power of two can
// move it by a factor 2 either way; 2^16 would still be below fp16's 65504 after hi's
// rounding). Why: fp16 has 5 exponent bits, normal down to 2^-14 only; unscaled, the lo
// part (~2^-11 of hi) of t ~ 1e-4 is subnormal and for t ~ 1e-6 hi is too (W1 ~ 1e-6
// left A 100x outside the policy). Scaled, both parts of every element within 2^-17 of
// max|t| are normal and smaller elements are off by at most half a subnormal step,
// 2^-25 absolute = 2^-39 of max|t|·2^k. A power of two is exact (barring fp32 overflow
// or underflow), so hi·2^-k + lo·2^-k is the split of t itself. An all-zero t gets
// 2^114 (the 1e-30 clamp); a non-finite max|t| gives NaN / inf outputs rather than
// zeros. bf16 shares fp32's exponent range and needs no scaling.
struct Pow2Scale {
  at::Tensor scale, unscale;
};
inline Pow2Scale fp16_split_scale(const at::Tensor& t) {
  const at::Tensor e = at::floor(at::log2(at::clamp_min(t.abs().amax().to(at::kFloat), 1e-30)));
  return {at::exp2(14.0 - e), at::exp2(e - 14.0)};
}

// a·g for a 16-bit matrix a (m, N) and an fp32 matrix g (N, n), fp32 result, on 16-bit
// tensor cores: g is split into parts of a's dtype, g = hi + lo + rest with
// |rest| <= 2^-16 |g| (bf16: 8 significant bits a part) or 2^-22 |g| (fp16: 11), rest
// dropped, and one GEMM against cat(hi, lo) (N, 2n) gives a·hi and a·lo, added in fp32.
// For fp16 a, g is scaled by fp16_split_scale(g) first (its lo would be subnormal
// otherwise; a small gradient would lose hi too) and the sum scaled back, both exactly.
// The products are exact in fp32; the error is the dropped rest and the fp32 sums.
inline at::Tensor mm_f32_split(const at::Tensor& a, const at::Tensor& g) {
  const at::ScalarType part = a.scalar_type();
  TORCH_CHECK(part == at::kHalf || part == at::kBFloat16, "mm_f32_split: a must be 16-bit, got ", part);
  TORCH_CHECK(g.scalar_type() == at::kFloat, "mm_f32_split: g must be float32, got ", g.scalar_type());
  const int64_t n = g.size(1);
  at::Tensor gs = g;
  Pow2Scale sc;
  if (part == at::kHalf) {
    sc = fp16_split_scale(g);
    gs = g * sc.scale;
  }
  const at::Tensor hi = gs.to(part);
  const at::Tensor lo = (gs - hi.to(at::kFloat)).to(part);
  const at::Tensor both = mm_f32_out(a, at::cat({hi, lo}, 1));  // (m, 2n)
  at::Tensor out = both.narrow(1, 0, n) + both.narrow(1, n, n);
  if (part == at::kHalf) out = out * sc.unscale;
  return out;
}

// W (streams·d, cols) packed in one launch (kernels/mma_pack.cuh): rows padded per block
// of d to d_pad (a multiple of 32), columns to col_pad; `layout` kMmaPackProj with
// `parts` 2 or 4, or kMmaPackDx (parts 2, bf16); part dtype `part`; `scale` a 0-dim
// fp32 device tensor multiplying every element (fp16), or undefined. Orders: the
// kernel's header (the element maps of common/mma.cuh).
inline at::Tensor pack_fragments(const at::Tensor& W, int64_t streams, int64_t d_pad, int64_t col_pad,
                                 MmaPackLayout layout, int parts, at::ScalarType part, const at::Tensor& scale) {
  const at::Tensor w = W.to(at::kFloat).contiguous();
  const int64_t rows = streams * d_pad;
  at::Tensor out = at::empty({rows * col_pad * parts}, W.options().dtype(part));
  MmaPackParams p{};
  p.w = w.data_ptr<float>();
  p.scale = scale.defined() ? scale.data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  p.ld = w.size(1);
  p.d = w.size(0) / streams;
  p.d_pad = d_pad;
  p.cols = w.size(1);
  p.col_pad = col_pad;
  p.total = out.numel();
  p.streams = static_cast<int>(streams);
  p.parts = parts;
  p.layout = layout;
  const dim3 grid = cover_grid(std::min<int64_t>(p.total, int64_t{1} << 22), kMmaPackThreads);
  if (part == at::kHalf) {
    launch(mma_pack_kernel<__half>, grid, dim3(kMmaPackThreads), 0, p);
  } else {
    launch(mma_pack_kernel<__nv_bfloat16>, grid, dim3(kMmaPackThreads), 0, p);
  }
  return out;
}

}  // namespace crosslayer
