// Host-side (ATen) helpers of the tensor-core launchers (mudd_weights.cu, mhc_coeffs.cu):
// packing of fp32 weights into mma.sync m16n8k16 B fragments (hi + lo 16-bit parts; the
// element maps are documented in common/mma.cuh; pack_fragments does it in one launch of
// kernels/mma_pack.cuh), the power-of-two scaling that keeps fp16 parts normal, and the
// token groups of the backward kernels that sum Xᵀ·G over tokens in partials.
// Everything here is stream-ordered ATen work on the
// operands' device: no host syncs.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

#include "common/launch.h"
#include "kernels/mma_pack.cuh"

namespace crosslayer {

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

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

// W (rows, cols) as fp32 with a row stride `ld` that is a multiple of 4 floats, a
// 16-byte aligned base and zeros in columns [cols, ld): what mma_chunk_g_w32 reads
// with 16-byte loads. W itself when it already is (fp32, contiguous, cols % 4 == 0,
// aligned), else one padded copy (a launch; the fp32 cast, if any, another).
struct RowsLd4 {
  at::Tensor t;
  int64_t ld;
};
inline RowsLd4 fp32_rows_ld4(const at::Tensor& W) {
  const int64_t cols = W.size(1), ld = round_up(cols, 4);
  at::Tensor w = W.to(at::kFloat).contiguous();
  if (ld != cols) {
    w = at::constant_pad_nd(w, {0, ld - cols});
  } else if (reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 != 0) {
    w = w.clone();
  }
  return {w, ld};
}

// Token groups of a backward kernel whose warps each own one of `chunks` feature chunks
// of one group of consecutive 16-token tiles and write that group's Σ_t Xᵀ·G as a
// partial (fp32, summed over the groups afterwards): enough groups that chunks × groups
// warps give kGroupWarpsPerSm warps an SM (bytes in flight for HBM), none under
// `min_tiles` tiles (each group's partial is written and read again: the caller sets
// what it is worth), and the tiles spread evenly.
constexpr int64_t kGroupWarpsPerSm = 16;
struct TokenGroups {
  int64_t groups, tiles_per_group;
};
inline TokenGroups token_groups(int64_t n_tokens, int64_t chunks, int64_t sms, int64_t min_tiles) {
  const int64_t tiles = (n_tokens + 15) / 16;
  int64_t groups = std::min((tiles + min_tiles - 1) / min_tiles,
                            std::max<int64_t>(1, (sms * kGroupWarpsPerSm + chunks - 1) / chunks));
  groups = std::max<int64_t>(groups, 1);
  const int64_t per_group = (tiles + groups - 1) / groups;
  return {(tiles + per_group - 1) / per_group, per_group};
}

// The sum over the leading dim of per-group partials (groups, ...), in group order: the
// one partial itself when there is one group (no launch).
inline at::Tensor sum_partials(const at::Tensor& part) { return part.size(0) == 1 ? part[0] : part.sum(0); }

// W (streams·d, cols) packed in one launch (kernels/mma_pack.cuh): rows padded per block
// of d to d_pad (a multiple of 32), columns to col_pad; `parts` 2 or 4 of dtype `part`
// (the layout of mma_proj_chunk's W); `scale` a 0-dim
// fp32 device tensor multiplying every element (fp16), or undefined. Orders: the
// kernel's header (the element maps of common/mma.cuh).
inline at::Tensor pack_fragments(const at::Tensor& W, int64_t streams, int64_t d_pad, int64_t col_pad,
                                 int parts, at::ScalarType part, const at::Tensor& scale) {
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
  const dim3 grid = cover_grid(std::min<int64_t>(p.total, int64_t{1} << 22), kMmaPackThreads);
  if (part == at::kHalf) {
    launch(mma_pack_kernel<__half>, grid, dim3(kMmaPackThreads), 0, p);
  } else {
    launch(mma_pack_kernel<__nv_bfloat16>, grid, dim3(kMmaPackThreads), 0, p);
  }
  return out;
}

}  // namespace crosslayer
