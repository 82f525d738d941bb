// Host side of hc_boundary (kernels/hc_boundary.cuh), shared by its launchers
// (hc_boundary_fwd.cu, hc_boundary_bwd.cu: one file a direction, so that nvcc compiles
// them in parallel): the checked inputs and the params they fill, the kernel dispatch.
//
// The launchers: connection i's post fused with connection i+1's pre.
//
// Dynamic (DHC) pre:
//   hc_boundary_fwd(H, y, alpha, beta, A, B, W, s_a, s_b, eps)
//       -> {H' (H's layout), x', alpha', beta', q, r, Wt}
//   hc_boundary_bwd(dH', dx', dalpha'?, dbeta'?, H, y, alpha, beta, A, B, W, Wt, s_a, s_b, q, r)
//       -> {dH (H's layout), dy, dalpha, dbeta, dA, dB, dW, ds_a, ds_b}
// Static pre, x' = Σ_k A'[k, 0]·H'_k (SHC; A' connection i+1's (n, n+1) parameter):
//   hc_boundary_mix_fwd(H, y, alpha, beta, A') -> {H', x'}
//   hc_boundary_mix_bwd(dH', dx', H, y, alpha, beta, A') -> {dH, dy, dalpha, dbeta, dA'}
//   (dA' (n, n+1): column 0 the sums over tokens of <dx', H'_k>, the rest 0; the static
//   coefficients' sums in one token_sums launch)
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
// beta; pre: sizes and parameters). Wt: W packed by the forward (hc_pre_pack_w), handed
// back to the backward; undefined in the forward, which packs it here.
struct HcBoundaryInputs {
  HcPostInputs post;
  HcPreWeights weights;
  HcBoundaryParams p{};
};

inline HcBoundaryInputs hc_boundary_inputs(const at::Tensor& H, const at::Tensor& y, const at::Tensor& alpha,
                                           const at::Tensor& beta, const at::Tensor& A, const at::Tensor& B,
                                           const at::Tensor& W, const at::Tensor& Wt, const at::Tensor& s_a,
                                           const at::Tensor& s_b) {
  HcBoundaryInputs in;
  check_hc_pre_inputs(H, A, B, W, s_a, s_b);
  in.post = hc_post_inputs(H, y, alpha, beta);
  const at::ScalarType acc_type = acc_dtype(H.scalar_type());
  if (Wt.defined()) check_hc_pre_packed_w(Wt, in.post.sh, acc_type, H);
  const at::Tensor packed = Wt.defined() ? Wt : hc_pre_pack_w(W, acc_type);
  in.weights.Wt = packed;
  if (in.post.sh.N == 0) return in;
  in.p.post = in.post.p;
  in.weights = hc_pre_weights(in.p.pre, in.post.sh, acc_type, A, B, packed, s_a, s_b);
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

// The checked inputs of the static-pre boundary: hc_post's, and connection i+1's static
// A' (n, n+1), of which the kernels read column 0.
struct HcBoundaryMixInputs {
  HcPostInputs post;
  at::Tensor A_next;
  HcBoundaryMixParams p{};
};

inline HcBoundaryMixInputs hc_boundary_mix_inputs(const at::Tensor& H, const at::Tensor& y,
                                                  const at::Tensor& alpha, const at::Tensor& beta,
                                                  const at::Tensor& A_next) {
  HcBoundaryMixInputs in;
  in.post = hc_post_inputs(H, y, alpha, beta);
  const StreamShape& sh = in.post.sh;
  check_input(A_next, "A_next", H);
  CL_CHECK_SHAPE(A_next, "A_next", "(n, n+1)", sh.n, sh.n + 1);
  if (sh.N == 0 || sh.d == 0) return in;
  static_cast<HcPostParams&>(in.p) = in.post.p;
  in.A_next = acc_rows(A_next, acc_dtype(H.scalar_type()));
  in.p.a_next_ptr = in.A_next.data_ptr();
  return in;
}

}  // namespace crosslayer
