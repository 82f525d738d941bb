// Host side of kernels/hc_post.cuh, shared by the launchers that run hc_post's phases
// (hc_post.cu, hc_boundary.h): the checked inputs of the post and the params they fill.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "hc_tile.h"
#include "token_sums.h"
#include "kernels/hc_post.cuh"

namespace crosslayer {

// The checked inputs of both directions, the tensors the kernels read (copies where a
// layout needs one; they must outlive the launch) and the params both directions share.
struct HcPostInputs {
  StreamShape sh;
  bool static_alpha, static_beta;
  at::Tensor H, y, alpha, beta;
  HcPostParams p{};
};

inline HcPostInputs hc_post_inputs(const at::Tensor& H, const at::Tensor& y, const at::Tensor& alpha,
                                   const at::Tensor& beta) {
  HcPostInputs in;
  in.sh = check_streams(H);
  const StreamShape& sh = in.sh;
  check_activation(y, "y", H, "(*lead, d)", with_tail(sh.lead, {sh.d}));
  in.static_alpha = check_coefficient(alpha, "alpha", H, sh.lead, "(n, n+1)", "(*lead, n, n+1)", {sh.n, sh.n + 1});
  in.static_beta = check_coefficient(beta, "beta", H, sh.lead, "(n,)", "(*lead, n)", {sh.n});
  if (sh.N == 0 || sh.d == 0) return in;
  HcPostParams& p = in.p;
  const at::ScalarType acc = acc_dtype(H.scalar_type());
  in.H = fill_tile_streams(p, sh, H);
  in.y = readable(y, 1, &p.y_tok);
  in.alpha = acc_rows(alpha, acc);
  in.beta = acc_rows(beta, acc);
  p.a_token_stride = in.static_alpha ? 0 : sh.n * (sh.n + 1);
  p.b_token_stride = in.static_beta ? 0 : sh.n;
  p.y_ptr = in.y.data_ptr();
  p.a_ptr = in.alpha.data_ptr();
  p.b_ptr = in.beta.data_ptr();
  return in;
}

// The backward's per-token coefficient gradient rows (N, n, n+1) and (N, n) as the
// gradients of alpha and beta (TokenSums::grad: summed over tokens for static
// coefficients, deterministic, else viewed in the coefficient's shape); the sums run
// with the caller's next TokenSums::run.
inline std::vector<at::Tensor> hc_post_coef_grads(const HcPostInputs& in, const at::Tensor& dalpha_tok,
                                                  const at::Tensor& dbeta_tok, const at::Tensor& alpha,
                                                  const at::Tensor& beta, TokenSums& sums) {
  return {sums.grad(dalpha_tok.view({in.sh.N, -1}), in.static_alpha, alpha.sizes()),
          sums.grad(dbeta_tok, in.static_beta, beta.sizes())};
}

}  // namespace crosslayer
