// Host-side packing of fp32 weights into mma.sync m16n8k16 B fragments (hi + lo 16-bit
// parts), shared by the tensor-core launchers (mudd_weights.cu, mhc_coeffs.cu). The
// element maps are documented in kernels/mudd_weights.cuh ("Fragment layout").
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace crosslayer {

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// W1 (d, K) as proj fragments: zero-padded to (32·chunks, k_pad) fp32, split into hi and
// lo parts of dtype `part`, ordered [chunk][s][n-tile][grp][tig][part][half][j] (the
// element map in kernels/mudd_weights.cuh), i.e. one uint4 per (chunk, s, n-tile, lane).
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
