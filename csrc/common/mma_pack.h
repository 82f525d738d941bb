// Host-side (ATen) helpers of the tensor-core launchers (mudd_weights.cu, mhc_coeffs.cu):
// packing of fp32 weights into mma.sync m16n8k16 B fragments (hi + lo 16-bit parts; the
// element maps are documented in common/mma.cuh), the
// power-of-two scaling that keeps fp16 parts normal, and the 16-bit GEMMs with fp32
// output of the backward passes. Everything here is stream-ordered ATen work on the
// operands' device: no host syncs.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

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

// W1 (d, K) as proj fragments: zero-padded to (32·chunks, k_pad) fp32, split into hi and
// lo parts of dtype `part`, ordered [chunk][s][n-tile][grp][tig][part][half][j] (the
// element map in common/mma.cuh), i.e. one uint4 per (chunk, s, n-tile, lane).
inline at::Tensor pack_w1_proj(const at::Tensor& W1, at::ScalarType part, int64_t k_pad) {
  const int64_t d = W1.size(0), K = W1.size(1), dp = round_up(d, 32) / 32;
  const at::Tensor W = at::constant_pad_nd(W1.to(at::kFloat), {0, k_pad - K, 0, dp * 32 - d}, 0);
  const at::Tensor hi = W.to(part);
  const at::Tensor lo = (W - hi.to(at::kFloat)).to(part);
  // dims: part, chunk, tig, s, half, j, n-tile, grp
  return at::stack({hi, lo}, 0)
      .view({2, dp, 4, 2, 2, 2, k_pad / 8, 8})
      .permute({1, 3, 6, 7, 2, 0, 4, 5})
      .contiguous();
}

// W1 as dx fragments (bf16 hi/lo): hidden padded to ldg, features to 32·chunks, ordered
// [chunk][ks][j][g2][gb][tig][part][half][jj]: feature 32c + 8·g2 + 2j + gb (column
// n = 2·g2 + gb = grp of n-tile j), hidden 16ks + 8half + 2tig + jj.
inline at::Tensor pack_w1_dx(const at::Tensor& W1, int64_t ldg) {
  const int64_t d = W1.size(0), K = W1.size(1), dp = round_up(d, 32) / 32;
  const at::Tensor W = at::constant_pad_nd(W1.to(at::kFloat), {0, ldg - K, 0, dp * 32 - d}, 0);
  const at::Tensor hi = W.to(at::kBFloat16);
  const at::Tensor lo = (W - hi.to(at::kFloat)).to(at::kBFloat16);
  // dims: part, chunk, g2, j, gb, ks, half, tig, jj
  return at::stack({hi, lo}, 0)
      .view({2, dp, 4, 4, 2, ldg / 16, 2, 4, 2})
      .permute({1, 5, 3, 2, 4, 7, 0, 6, 8})
      .contiguous();
}

}  // namespace crosslayer
