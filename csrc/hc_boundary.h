// Host side of hc_boundary (kernels/hc_boundary.cuh), shared by its launchers
// (hc_boundary_fwd.cu, hc_boundary_bwd.cu: one file a direction, so that nvcc compiles
// them in parallel): the checked inputs and the params they fill, the kernel dispatch.
//
// The launchers: connection i's post fused with connection i+1's pre.
//
// Dynamic (DHC) pre:
//   hc_boundary_fwd(H, y, alpha, beta, A, B, W, s_a, s_b, eps)
//       -> {H' (H's layout), x', alpha', beta', q, r}
//   hc_boundary_bwd(dH', dx', dalpha'?, dbeta'?, H, y, alpha, beta, A, B, W, s_a, s_b, q, r)
//       -> {dH (H's layout), dy, dalpha, dbeta, dA, dB, dW, ds_a, ds_b}
// Static pre, x' = Σ_k w_k·H'_k (SHC: w = A[:, 0]):
//   hc_boundary_mix_fwd(H, y, alpha, beta, w) -> {H', x'}
//   hc_boundary_mix_bwd(dH', dx', H, y, alpha, beta, w) -> {dH, dy, dalpha, dbeta, dw}
//   (w (n,) or (*lead, n); dw in w's shape, summed over tokens when static)
//
// The post's inputs are checked and laid out by hc_post's host code (hc_post.h), the
// pre's parameters and workspaces by hc_pre's (hc_pre.h): the same messages, limits and
// layouts as the unfused ops. H' is allocated like H (empty_like), x' contiguous; dH
// like H. Every launch runs on the current stream and is followed by a launch check.

#pragma once

#include <ATen/ATen.h>

#include <type_traits>
#include <vector>

#include "common/dispatch.h"
#include "hc_post.h"
#include "hc_pre.h"
#include "hc_tile.h"
#include "kernels/hc_boundary.cuh"

namespace crosslayer {

// The checked inputs of both directions and the params they fill (post: H, y, alpha,
// beta; pre: sizes and parameters).
struct HcBoundaryInputs {
  HcPostInputs post;
  HcPreWeights weights;
  HcBoundaryParams p{};
};

inline HcBoundaryInputs hc_boundary_inputs(const at::Tensor& H, const at::Tensor& y, const at::Tensor& alpha,
                                           const at::Tensor& beta, const at::Tensor& A, const at::Tensor& B,
                                           const at::Tensor& W, const at::Tensor& s_a, const at::Tensor& s_b) {
  HcBoundaryInputs in;
  check_hc_pre_inputs(H, A, B, W, s_a, s_b);
  in.post = hc_post_inputs(H, y, alpha, beta);
  if (in.post.sh.N == 0) return in;
  in.p.post = in.post.p;
  in.weights = hc_pre_weights(in.p.pre, in.post.sh, acc_dtype(H.scalar_type()), A, B, W, s_a, s_b);
  return in;
}

// Calls f(kvec, kn) (std::integral_constant<int, ...>) for T: kn from n (2, 4, 8 exact,
// 16 generic) and kvec = kHcBoundaryVec<T, kn> when `vectorize`, else 1.
template <typename T, typename F>
void dispatch_boundary(bool vectorize, int n, F&& f) {
  CL_BOOL_SWITCH(vectorize, kVectorize, [&] {
    dispatch_streams<kMaxStreams, 2, 4, 8>(n, [&](auto kn) {
      constexpr int kN = decltype(kn)::value;
      f(std::integral_constant<int, kVectorize ? kHcBoundaryVec<T, kN> : 1>{}, kn);
    });
  });
}

// hc_pre_block's `extra`: hc_boundary_extra_smem.
inline auto boundary_extra_smem(int n, bool backward) {
  return [n, backward](int rows, int warps) { return hc_boundary_extra_smem(rows, warps, n, backward); };
}

// The checked inputs of the static-pre boundary: hc_post's, and w (n,) or (*lead, n).
struct HcBoundaryMixInputs {
  HcPostInputs post;
  bool static_w;
  at::Tensor w;
  HcBoundaryMixParams p{};
};

inline HcBoundaryMixInputs hc_boundary_mix_inputs(const at::Tensor& H, const at::Tensor& y,
                                                  const at::Tensor& alpha, const at::Tensor& beta,
                                                  const at::Tensor& w) {
  HcBoundaryMixInputs in;
  in.post = hc_post_inputs(H, y, alpha, beta);
  const StreamShape& sh = in.post.sh;
  in.static_w = check_coefficient(w, "w", H, sh.lead, "(n,)", "(*lead, n)", {sh.n});
  if (sh.N == 0 || sh.d == 0) return in;
  static_cast<HcPostParams&>(in.p) = in.post.p;
  in.w = acc_rows(w, acc_dtype(H.scalar_type()));
  in.p.w_token_stride = in.static_w ? 0 : sh.n;
  in.p.w_ptr = in.w.data_ptr();
  return in;
}

}  // namespace crosslayer
