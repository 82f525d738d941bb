// Messaged argument checks for the launchers. Every failure names the argument, the
// expected property and what was received, e.g.
//   "A must have shape (N, C, l) = (16384, 4, 25), got [16384, 4, 24]".
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "common/tokens.cuh"

#define CL_CHECK_CUDA(x, name) \
  TORCH_CHECK((x).is_cuda(), name " must be a CUDA tensor, got device ", (x).device())

#define CL_CHECK_SAME_DEVICE(x, y, xname, yname)                                         \
  TORCH_CHECK((x).device() == (y).device(), xname " is on ", (x).device(), " but " yname \
              " is on ", (y).device(), "; all inputs must be on one device")

#define CL_CHECK_DIM(x, name, ...)                                                  \
  TORCH_CHECK(::crosslayer::dim_in((x).dim(), {__VA_ARGS__}), name " must have " #__VA_ARGS__ \
              " dims, got ", (x).dim(), " (shape ", (x).sizes(), ")")

#define CL_CHECK_FLOATING(x, name)                                                        \
  TORCH_CHECK(::crosslayer::is_activation_dtype((x).scalar_type()),                        \
              name " must have dtype float32, bfloat16, float16 or float64, got ", \
              (x).scalar_type())

#define CL_CHECK_SHAPE(x, name, shape_str, ...)                                      \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), name " must have shape " \
              shape_str " = ", at::IntArrayRef({__VA_ARGS__}), ", got ", (x).sizes())

namespace crosslayer {

inline bool dim_in(int64_t dim, std::initializer_list<int64_t> allowed) {
  for (int64_t a : allowed) {
    if (dim == a) return true;
  }
  return false;
}

inline bool is_activation_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

// The arithmetic dtype of an op on activations of dtype `t`: float64 for float64,
// float32 otherwise. Coefficients are converted to it before a kernel reads them.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Kernels read the feature dim with unit stride; other strides are free. A tensor
// whose last dim is strided is copied once here (documented, not silent: the ops'
// docstrings say so).
inline at::Tensor features_contiguous(const at::Tensor& x) {
  return (x.size(-1) <= 1 || x.stride(-1) == 1) ? x : x.contiguous();
}

// `t` with its leading t.dim() - trailing dims (the tokens) addressable by one
// TokenLayout, written to *layout: `t` itself when its token dims collapse to at most
// two strided dims, else a contiguous copy (features stay unit-stride either way).
// Requires t.numel() > 0.
inline at::Tensor with_token_layout(const at::Tensor& t, int trailing, TokenLayout* layout) {
  const int lead = static_cast<int>(t.dim()) - trailing;
  if (collapse_token_dims(t.sizes().data(), t.strides().data(), lead, layout)) return t;
  const at::Tensor c = t.contiguous();
  const bool ok = collapse_token_dims(c.sizes().data(), c.strides().data(), lead, layout);
  TORCH_INTERNAL_ASSERT(ok, "a contiguous tensor's token dims always collapse");
  return c;
}

}  // namespace crosslayer
