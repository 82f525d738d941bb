// Messaged argument checks for the launchers. Every failure names the argument, the
// expected property and what was received, e.g.
//   "A must have shape (N, C, l) = (16384, 4, 25), got [16384, 4, 24]".
// Each check is one function; the CL_CHECK_* macros are their forms for string-literal
// names (they paste the name or the shape spelling into the message).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <initializer_list>

#include "common/tokens.cuh"

#define CL_CHECK_CUDA(x, name) \
  TORCH_CHECK((x).is_cuda(), name " must be a CUDA tensor, got device ", (x).device())

#define CL_CHECK_SAME_DEVICE(x, y, xname, yname) ::crosslayer::check_same_device((x), xname, (y), yname)

#define CL_CHECK_DIM(x, name, ...)                                                  \
  TORCH_CHECK(::crosslayer::dim_in((x).dim(), {__VA_ARGS__}), name " must have " #__VA_ARGS__ \
              " dims, got ", (x).dim(), " (shape ", (x).sizes(), ")")

#define CL_CHECK_FLOATING(x, name) ::crosslayer::check_floating((x), name)

#define CL_CHECK_SHAPE(x, name, shape_str, ...) \
  ::crosslayer::check_shape((x), name, shape_str, at::IntArrayRef({__VA_ARGS__}))

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

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_activation_dtype(t.scalar_type()), name,
              " must have dtype float32, bfloat16, float16 or float64, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                              const char* ref_name = "H") {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device(), "; all inputs must be on one device");
}

// `t` has the dtype of the activation `ref` (spelled "<ref_name>'s dtype").
inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref,
                             const char* ref_name = "H") {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have ", ref_name, "'s dtype ",
              ref.scalar_type(), ", got ", t.scalar_type());
}

// `t` has shape `want`, spelled `what` in the message ("(N, C, l)").
inline void check_shape(const at::Tensor& t, const char* name, const char* what, at::IntArrayRef want) {
  TORCH_CHECK(t.sizes() == want, name, " must have shape ", what, " = ", want, ", got ", t.sizes());
}

// An activation input beside `ref`: on its device, of its dtype, with shape `want`
// (spelled `what`).
inline void check_activation(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* what,
                             at::IntArrayRef want, const char* ref_name = "H") {
  check_same_device(t, name, ref, ref_name);
  check_same_dtype(t, name, ref, ref_name);
  check_shape(t, name, what, want);
}

// A parameter or coefficient input: any floating dtype, on `ref`'s device.
inline void check_input(const at::Tensor& t, const char* name, const at::Tensor& ref,
                        const char* ref_name = "H") {
  check_floating(t, name);
  check_same_device(t, name, ref, ref_name);
}

// A 0-dim parameter (a scale): floating, on `ref`'s device.
inline void check_scalar_tensor(const at::Tensor& s, const char* name, const at::Tensor& ref,
                                const char* ref_name = "H") {
  TORCH_CHECK(s.dim() == 0, name, " must be a 0-dim tensor, got shape ", s.sizes());
  check_input(s, name, ref, ref_name);
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
