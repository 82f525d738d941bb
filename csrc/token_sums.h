// Host side of kernels/token_sums.cuh: the gradients of a launcher's coefficients from
// the per-token rows its backward kernel wrote, every static one summed over tokens in
// one launch (hc_post.h, hc_boundary_bwd.cu, stream_mix.cu, mhc_coeffs.cu).
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "common/checks.h"
#include "common/launch.h"
#include "kernels/token_sums.cuh"

namespace crosslayer {

class TokenSums {
 public:
  explicit TokenSums(int64_t n_tokens) : n_tokens_(n_tokens) {}

  // The gradient of a coefficient of shape `shape` from its rows (N, cols), contiguous
  // in the accumulator dtype: the rows viewed as `shape` when the coefficient is per
  // token, else a new tensor of `shape` that run() fills with the sums over tokens
  // (element j from column j / div when j % div == 0, else 0: token_sums.cuh).
  at::Tensor grad(const at::Tensor& rows, bool is_static, at::IntArrayRef shape, int64_t div = 1) {
    if (!is_static) return rows.view(shape);
    return sum(rows, shape, div, 0, 1);
  }

  // A new tensor of `shape` that run() fills with out[j] = Σ_t Σ_{w < width} rows[t,
  // col0 + j / div + w] (j % div == 0; else 0): a group of `width` columns from col0 on
  // summed into each output.
  at::Tensor sum(const at::Tensor& rows, at::IntArrayRef shape, int64_t div, int64_t col0, int64_t width) {
    TORCH_INTERNAL_ASSERT(static_cast<int>(segs_.size()) < kTokenSumsMaxSegments, "token_sums: too many segments");
    at::Tensor out = at::empty(shape, rows.options());
    segs_.push_back({rows, out, div, col0, width});
    return out;
  }

  // One launch for every sum asked of grad() and sum() (none when there is none).
  void run() {
    if (segs_.empty()) return;
    TokenSumsParams p{};
    p.n_tokens = n_tokens_;
    p.segments = static_cast<int>(segs_.size());
    int64_t outputs = 0;
    for (size_t s = 0; s < segs_.size(); ++s) {
      const Seg& g = segs_[s];
      p.seg[s] = {g.rows.data_ptr(), g.rows.size(1), g.out.data_ptr(), g.out.numel(), g.div, g.col0, g.width};
      outputs += g.out.numel();
    }
    AT_DISPATCH_FLOATING_TYPES(segs_[0].rows.scalar_type(), "token_sums", [&] {
      launch(token_sums_kernel<scalar_t>, cover_grid(outputs, 1), dim3(kTokenSumsThreads),
             kTokenSumsThreads / kWarpSize * sizeof(double), p);
    });
    segs_.clear();
  }

 private:
  struct Seg {
    at::Tensor rows, out;
    int64_t div, col0, width;
  };
  int64_t n_tokens_;
  std::vector<Seg> segs_;
};

}  // namespace crosslayer
