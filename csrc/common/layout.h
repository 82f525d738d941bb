// Host-side helpers shared by the launchers: run-time-named checks, and reading and
// writing activations through TokenLayout (kernels/..., common/tokens.cuh).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "common/tokens.cuh"

namespace crosslayer {

// CL_CHECK_FLOATING / CL_CHECK_SAME_DEVICE for names known at run time (the macros
// paste string literals).
inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_activation_dtype(t.scalar_type()), name,
              " must have dtype float32, bfloat16, float16 or float64, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                              const char* ref_name = "H") {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device(), "; all inputs must be on one device");
}

// `lead` followed by `tail`: the shape of a per-token tensor.
inline std::vector<int64_t> with_tail(const std::vector<int64_t>& lead,
                                      std::initializer_list<int64_t> tail) {
  std::vector<int64_t> out(lead);
  out.insert(out.end(), tail);
  return out;
}

// A per-token input of a backward launcher (saved statistics, output gradients): shape
// `expected` (spelled `what` in the message), a floating dtype, on `ref`'s device.
inline void check_per_token(const at::Tensor& t, const char* name, const char* what,
                            const std::vector<int64_t>& expected, const at::Tensor& ref,
                            const char* ref_name = "H") {
  TORCH_CHECK(t.sizes() == at::IntArrayRef(expected), name, " must have shape ", what, " = ",
              at::IntArrayRef(expected), ", got ", t.sizes());
  check_same_device(t, name, ref, ref_name);
  check_floating(t, name);
}

// An activation input whose tokens one TokenLayout addresses and whose features have
// unit stride: the tensor itself when possible, else one copy.
inline at::Tensor readable(const at::Tensor& t, int trailing, TokenLayout* layout) {
  return with_token_layout(features_contiguous(t), trailing, layout);
}

// Where a kernel writes an output allocated by the caller's rule (empty_like keeps a
// dense permuted layout): `out` itself when the kernel can address it, else a
// contiguous scratch tensor that the caller copies into `out` afterwards (copy_back).
inline at::Tensor writable(const at::Tensor& out, int trailing, TokenLayout* layout) {
  const int lead = static_cast<int>(out.dim()) - trailing;
  if ((out.size(-1) <= 1 || out.stride(-1) == 1) &&
      collapse_token_dims(out.sizes().data(), out.strides().data(), lead, layout)) {
    return out;
  }
  at::Tensor scratch = at::empty(out.sizes(), out.options());
  collapse_token_dims(scratch.sizes().data(), scratch.strides().data(), lead, layout);
  return scratch;
}

inline void copy_back(at::Tensor& out, const at::Tensor& written) {
  if (!written.is_same(out)) out.copy_(written);
}

// Stride between streams, 0 when there is one stream (any stride is then fine).
inline int64_t stream_stride(const at::Tensor& t) { return t.size(-2) > 1 ? t.stride(-2) : 0; }

// 16-byte vector access is safe for a tensor when its base is 16-byte aligned and its
// token and stream strides are multiples of the vector width.
inline bool vec_ok(const void* ptr, const TokenLayout& tok, int64_t stream, int vec) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && tok.inner_stride % vec == 0 &&
         tok.outer_stride % vec == 0 && stream % vec == 0;
}

// The same for a tensor described by (size, stride) pairs of its non-feature dims (a
// dim of size 1 never steps, so its stride does not matter).
inline bool vec_ok(const void* ptr, std::initializer_list<std::pair<int64_t, int64_t>> size_strides, int vec) {
  if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  for (const auto& ss : size_strides) {
    if (ss.first > 1 && ss.second % vec != 0) return false;
  }
  return true;
}

}  // namespace crosslayer
