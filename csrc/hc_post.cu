// Launchers of hc_post (kernels in kernels/hc_post.cuh).
//
//   hc_post_fwd(H (*lead, n, d), y (*lead, d), alpha, beta) -> H' (H's layout)
//   hc_post_bwd(dH', H, y, alpha, beta) -> {dH (H's layout), dy (*lead, d), dalpha, dbeta}
//
// alpha: (*lead, n, n+1) per token or (n, n+1) static; beta: (*lead, n) or (n,).
// Activations share one dtype (H's); coefficients of any float dtype are converted to
// the accumulator dtype (float64 for float64 H, float32 otherwise) and their gradients
// come back in it, with the coefficient's shape (summed over tokens when static, both
// in one token_sums launch: deterministic, no atomics). Any number of leading token dims with any
// strides that collapse to a TokenLayout runs without a copy (e.g. streams folded into
// the batch dim); other token layouts and a non-unit feature stride are copied once.
// Every launch runs on the current stream and is followed by a launch check.

#include <c10/cuda/CUDAGuard.h>

#include <vector>

#include "hc_post.h"
#include "ops.h"

namespace crosslayer {

at::Tensor hc_post_fwd(const at::Tensor& H_in, const at::Tensor& y_in, const at::Tensor& alpha_in,
                       const at::Tensor& beta_in) {
  HcPostInputs in = hc_post_inputs(H_in, y_in, alpha_in, beta_in);
  const c10::cuda::CUDAGuard guard(H_in.device());
  at::Tensor out = at::empty_like(H_in);
  if (in.sh.N == 0 || in.sh.d == 0) return out;
  HcPostParams& p = in.p;
  at::Tensor o = writable(out, 2, &p.out_tok);
  p.out_stream_stride = stream_stride(o);
  p.out_ptr = o.data_ptr();
  CL_DISPATCH_FLOATING(H_in.scalar_type(), "hc_post_fwd", [&] {
    const int vec = kVec16<scalar_t>;
    const bool vectorize = vec_ok(p.h_ptr, p.h_tok, p.h_stream_stride, vec) && vec_ok(p.y_ptr, p.y_tok, 0, vec) &&
                           vec_ok(p.out_ptr, p.out_tok, p.out_stream_stride, vec);
    launch_hc_tile<scalar_t>(p, vectorize, p.n * (p.n + 2), 0, [](auto kvec, auto kn) {
      return hc_post_fwd_kernel<scalar_t, decltype(kvec)::value, decltype(kn)::value>;
    });
  });
  copy_back(out, o);
  return out;
}

std::vector<at::Tensor> hc_post_bwd(const at::Tensor& dHn_in, const at::Tensor& H_in, const at::Tensor& y_in,
                                    const at::Tensor& alpha_in, const at::Tensor& beta_in) {
  HcPostInputs in = hc_post_inputs(H_in, y_in, alpha_in, beta_in);
  const StreamShape& sh = in.sh;
  check_activation(dHn_in, "dH_new", H_in, "(*lead, n, d)", H_in.sizes());
  const c10::cuda::CUDAGuard guard(H_in.device());
  const at::TensorOptions acc_opts = H_in.options().dtype(acc_dtype(H_in.scalar_type()));
  at::Tensor dH = at::empty_like(H_in);
  at::Tensor dy = at::empty(with_tail(sh.lead, {sh.d}), y_in.options());
  if (sh.N == 0 || sh.d == 0) {  // dH and dy are empty; the dots over nothing are 0
    return {dH, dy, at::zeros(alpha_in.sizes(), acc_opts), at::zeros(beta_in.sizes(), acc_opts)};
  }
  at::Tensor dalpha_tok = at::empty({sh.N, sh.n, sh.n + 1}, acc_opts);
  at::Tensor dbeta_tok = at::empty({sh.N, sh.n}, acc_opts);
  HcPostParams& p = in.p;
  const at::Tensor g = readable(dHn_in, 2, &p.g_tok);
  at::Tensor dh = writable(dH, 2, &p.dh_tok);
  collapse_token_dims(dy.sizes().data(), dy.strides().data(), static_cast<int>(sh.lead.size()), &p.dy_tok);
  p.g_stream_stride = stream_stride(g);
  p.dh_stream_stride = stream_stride(dh);
  p.g_ptr = g.data_ptr();
  p.dh_ptr = dh.data_ptr();
  p.dy_ptr = dy.data_ptr();
  p.da_ptr = dalpha_tok.data_ptr();
  p.db_ptr = dbeta_tok.data_ptr();
  CL_DISPATCH_FLOATING(H_in.scalar_type(), "hc_post_bwd", [&] {
    const int vec = kVec16<scalar_t>;
    const bool vectorize = vec_ok(p.h_ptr, p.h_tok, p.h_stream_stride, vec) && vec_ok(p.y_ptr, p.y_tok, 0, vec) &&
                           vec_ok(p.g_ptr, p.g_tok, p.g_stream_stride, vec) &&
                           vec_ok(p.dh_ptr, p.dh_tok, p.dh_stream_stride, vec) && vec_ok(p.dy_ptr, p.dy_tok, 0, vec);
    launch_hc_tile<scalar_t>(p, vectorize, p.n * (p.n + 2), p.n * (p.n + 1),
                             [](auto kvec, auto kn) {
      return hc_post_bwd_kernel<scalar_t, decltype(kvec)::value, decltype(kn)::value>;
    });
  });
  copy_back(dH, dh);
  TokenSums sums(in.sh.N);
  const std::vector<at::Tensor> dcoef = hc_post_coef_grads(in, dalpha_tok, dbeta_tok, alpha_in, beta_in, sums);
  sums.run();
  return {dH, dy, dcoef[0], dcoef[1]};
}

}  // namespace crosslayer
