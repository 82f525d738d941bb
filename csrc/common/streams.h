// Host-side checks and shapes shared by the launchers of the HC family (hc_pre,
// hc_post, stream_mix, mhc_coeffs): the streams H (*lead, n, d), per-token activations
// and coefficients beside it, and the token-tile grid. Messages name the argument, the
// expected and the received shape, dtype or device.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/layout.h"
#include "common/limits.h"

namespace crosslayer {

struct StreamsShape {
  std::vector<int64_t> lead;  // token dims of H
  int64_t N, n, d;            // tokens (product of lead), streams, features
};

// H is a CUDA float tensor (*lead, n, d) with 1 <= n <= kMaxStreams; with
// `need_features`, d >= 1 (the ops whose rms is over the features).
inline StreamsShape check_streams(const at::Tensor& H, bool need_features) {
  CL_CHECK_CUDA(H, "H");
  CL_CHECK_FLOATING(H, "H");
  TORCH_CHECK(H.dim() >= 2, "H must have shape (*lead, n, d) with at least 2 dims, got ", H.sizes());
  StreamsShape sh;
  sh.n = H.size(-2);
  sh.d = H.size(-1);
  TORCH_CHECK(sh.n >= 1 && sh.n <= kMaxStreams, "H must have 1 to ", kMaxStreams,
              " streams (dim -2 of (*lead, n, d)), got n = ", sh.n, " (shape ", H.sizes(), ")");
  TORCH_CHECK(!need_features || sh.d >= 1, "H must have d >= 1 features (the rms is over them), got ",
              H.sizes());
  sh.lead.assign(H.sizes().begin(), H.sizes().end() - 2);
  sh.N = 1;
  for (int64_t s : sh.lead) sh.N *= s;
  return sh;
}

// An activation input of H's device and dtype with shape `want` (spelled `what`).
inline void check_activation(const at::Tensor& t, const char* name, const at::Tensor& H, const char* what,
                             at::IntArrayRef want) {
  check_same_device(t, name, H);
  TORCH_CHECK(t.scalar_type() == H.scalar_type(), name, " must have H's dtype ", H.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == want, name, " must have shape ", what, " = ", want, ", got ", t.sizes());
}

// A coefficient of static shape `static_shape` or per-token shape lead + static_shape;
// returns true when static.
inline bool check_coeff(const at::Tensor& t, const char* name, const at::Tensor& H, const StreamsShape& sh,
                        const char* static_what, const char* token_what, std::vector<int64_t> static_shape) {
  check_same_device(t, name, H);
  check_floating(t, name);
  if (t.sizes() == at::IntArrayRef(static_shape)) return true;
  std::vector<int64_t> per_token(sh.lead);
  per_token.insert(per_token.end(), static_shape.begin(), static_shape.end());
  TORCH_CHECK(t.sizes() == at::IntArrayRef(per_token), name, " must have shape ", token_what, " = ",
              at::IntArrayRef(per_token), " (per token) or ", static_what, " = ",
              at::IntArrayRef(static_shape), " (static), got ", t.sizes());
  return false;
}

// A 0-dim float scalar on H's device (the dynamic scales of DHC and mHC).
inline void check_scalar_tensor(const at::Tensor& s, const char* name, const at::Tensor& H) {
  TORCH_CHECK(s.dim() == 0, name, " must be a 0-dim tensor, got shape ", s.sizes());
  check_floating(s, name);
  check_same_device(s, name, H);
}

// Coefficients in the accumulator dtype, one contiguous row per token.
inline at::Tensor coeff_rows(const at::Tensor& t, at::ScalarType acc) { return t.to(acc).contiguous(); }

// One block per tile of `rows` tokens, capped at the grid's x limit (the kernels loop).
inline dim3 token_tile_grid(int64_t n_tokens, int rows) {
  const int64_t tiles = (n_tokens + rows - 1) / rows;
  return dim3(static_cast<unsigned>(std::min<int64_t>(tiles, std::numeric_limits<int>::max())));
}

}  // namespace crosslayer
