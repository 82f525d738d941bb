// Host-side helpers shared by the launchers: the shapes of stream (H) and per-token
// inputs, reading and writing activations through TokenLayout (common/tokens.cuh), and
// the eligibility of a tensor for the kernels' 16-byte vector path.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "common/limits.h"
#include "common/tokens.cuh"

namespace crosslayer {

// `lead` followed by `tail`: the shape of a per-token tensor.
inline std::vector<int64_t> with_tail(const std::vector<int64_t>& lead,
                                      std::initializer_list<int64_t> tail) {
  std::vector<int64_t> out(lead);
  out.insert(out.end(), tail);
  return out;
}

// The token dims of `t` (all but its last `trailing` dims) and their product.
struct TokenDims {
  std::vector<int64_t> lead;
  int64_t N;
};

inline TokenDims token_dims(const at::Tensor& t, int trailing) {
  TokenDims tok;
  tok.lead.assign(t.sizes().begin(), t.sizes().end() - trailing);
  tok.N = 1;
  for (int64_t s : tok.lead) tok.N *= s;
  return tok;
}

// The streams H (*lead, n, d) of the HC ops: a CUDA tensor of an activation dtype with
// 1 <= n <= kMaxStreams.
struct StreamShape : TokenDims {
  int64_t n, d;
};

inline StreamShape check_streams(const at::Tensor& H) {
  CL_CHECK_CUDA(H, "H");
  CL_CHECK_FLOATING(H, "H");
  TORCH_CHECK(H.dim() >= 2, "H must have shape (*lead, n, d) with at least 2 dims, got ", H.sizes());
  StreamShape sh;
  static_cast<TokenDims&>(sh) = token_dims(H, 2);
  sh.n = H.size(-2);
  sh.d = H.size(-1);
  TORCH_CHECK(sh.n >= 1 && sh.n <= kMaxStreams, "H must have 1 to ", kMaxStreams,
              " streams (dim -2 of (*lead, n, d)), got n = ", sh.n, " (shape ", H.sizes(), ")");
  return sh;
}

// A per-token input of a backward launcher (saved statistics, output gradients): shape
// `expected` (spelled `what` in the message), a floating dtype, on `ref`'s device.
inline void check_per_token(const at::Tensor& t, const char* name, const char* what,
                            const std::vector<int64_t>& expected, const at::Tensor& ref,
                            const char* ref_name = "H") {
  check_shape(t, name, what, expected);
  check_input(t, name, ref, ref_name);
}

// A coefficient of the HC mixing ops: `static_shape` (spelled `static_what`) or one
// such block per token, lead + static_shape (spelled `token_what`); a floating dtype on
// H's device. Returns true when static.
inline bool check_coefficient(const at::Tensor& t, const char* name, const at::Tensor& H,
                              const std::vector<int64_t>& lead, const char* static_what,
                              const char* token_what, std::initializer_list<int64_t> static_shape) {
  check_input(t, name, H);
  if (t.sizes() == at::IntArrayRef(static_shape)) return true;
  std::vector<int64_t> per_token(lead);
  per_token.insert(per_token.end(), static_shape);
  TORCH_CHECK(t.sizes() == at::IntArrayRef(per_token), name, " must have shape ", token_what, " = ",
              at::IntArrayRef(per_token), " (per token) or ", static_what, " = ",
              at::IntArrayRef(static_shape), " (static), got ", t.sizes());
  return false;
}

// Coefficients in the accumulator dtype `acc`, one contiguous row per token.
inline at::Tensor acc_rows(const at::Tensor& t, at::ScalarType acc) { return t.to(acc).contiguous(); }

// An activation input whose tokens one TokenLayout addresses and whose features have
// unit stride: the tensor itself when possible, else one copy.
inline at::Tensor readable(const at::Tensor& t, int trailing, TokenLayout* layout) {
  return with_token_layout(features_contiguous(t), trailing, layout);
}

// Where a kernel writes an output allocated by the caller's rule (empty_like keeps a
// dense permuted layout): `out` itself when the kernel can address it, else a
// contiguous scratch tensor that the caller copies into `out` afterwards (copy_back).
// With `keep_values` (a kernel that adds to `out`) the scratch starts as out's copy.
inline at::Tensor writable(const at::Tensor& out, int trailing, TokenLayout* layout, bool keep_values = false) {
  const int lead = static_cast<int>(out.dim()) - trailing;
  if ((out.size(-1) <= 1 || out.stride(-1) == 1) &&
      collapse_token_dims(out.sizes().data(), out.strides().data(), lead, layout)) {
    return out;
  }
  at::Tensor scratch = at::empty(out.sizes(), out.options());
  collapse_token_dims(scratch.sizes().data(), scratch.strides().data(), lead, layout);
  if (keep_values) scratch.copy_(out);
  return scratch;
}

inline void copy_back(at::Tensor& out, const at::Tensor& written) {
  if (!written.is_same(out)) out.copy_(written);
}

// Stride between streams, 0 when there is one stream (any stride is then fine).
inline int64_t stream_stride(const at::Tensor& t) { return t.size(-2) > 1 ? t.stride(-2) : 0; }

// 16-byte vector access is safe for a tensor when its base is 16-byte aligned and the
// stride of every dim that is walked (size > 1) is a multiple of the vector width.
// `size_strides`: (size, stride in elements) per non-feature dim.
inline bool vec_ok(const void* ptr, std::initializer_list<std::pair<int64_t, int64_t>> size_strides,
                   int vec) {
  if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  for (const auto& ss : size_strides) {
    if (ss.first > 1 && ss.second % vec != 0) return false;
  }
  return true;
}

// The same for a tensor whose tokens `tok` addresses, streams `stream` apart (0: none);
// both token strides count as walked.
inline bool vec_ok(const void* ptr, const TokenLayout& tok, int64_t stream, int vec) {
  return vec_ok(ptr, {{2, tok.inner_stride}, {2, tok.outer_stride}, {2, stream}}, vec);
}

}  // namespace crosslayer
