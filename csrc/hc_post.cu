// Launchers for hc_post (kernels in kernels/hc_post.cuh).
//
//   hc_post_fwd(H (*lead, n, d), y (*lead, d), alpha, beta) -> H' (H's layout)
//   hc_post_bwd(dH', H, y, alpha, beta) -> {dH (H's layout), dy (*lead, d), dalpha, dbeta}
//
// alpha: (*lead, n, n+1) per token or (n, n+1) static; beta: (*lead, n) or (n,).
// Activations share one dtype (H's); coefficients of any float dtype are converted to
// the accumulator dtype (float64 for float64 H, float32 otherwise) and their gradients
// come back in it, with the coefficient's shape (summed over tokens when static, by
// at::sum: deterministic, no atomics). Any number of leading token dims with any
// strides that collapse to a TokenLayout runs without a copy (e.g. streams folded into
// the batch dim); other token layouts and a non-unit feature stride are copied once.
// Every launch runs on the current stream and is followed by a launch check.

#include <c10/cuda/CUDAGuard.h>

#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/launch.h"
#include "common/layout.h"
#include "kernels/hc_post.cuh"
#include "ops.h"

namespace crosslayer {
namespace {

struct HcPostShape : StreamShape {
  bool static_alpha, static_beta;
};

HcPostShape check_hc_post_inputs(const at::Tensor& H, const at::Tensor& y, const at::Tensor& alpha,
                                 const at::Tensor& beta) {
  HcPostShape sh;
  static_cast<StreamShape&>(sh) = check_streams(H, "(*lead, n, d)");
  check_activation(y, "y", H, "(*lead, d)", with_tail(sh.lead, {sh.d}));
  sh.static_alpha = check_coefficient(alpha, "alpha", H, sh.lead, "(n, n+1)", "(*lead, n, n+1)", {sh.n, sh.n + 1});
  sh.static_beta = check_coefficient(beta, "beta", H, sh.lead, "(n,)", "(*lead, n)", {sh.n});
  return sh;
}

// The inputs both directions read: params with H, y, alpha and beta set, and the
// tensors they point into (kept alive until the launch).
struct HcPostInputs {
  HcPostParams p;
  at::Tensor H, y, alpha, beta;
};

HcPostInputs hc_post_params(const HcPostShape& sh, const at::Tensor& H_in, const at::Tensor& y_in,
                            const at::Tensor& alpha_in, const at::Tensor& beta_in) {
  const at::ScalarType acc = acc_dtype(H_in.scalar_type());
  HcPostInputs in{};
  HcPostParams& p = in.p;
  p.n_tokens = sh.N;
  p.d = sh.d;
  p.n = static_cast<int>(sh.n);
  in.H = readable(H_in, 2, &p.h_tok);
  in.y = readable(y_in, 1, &p.y_tok);
  in.alpha = acc_rows(alpha_in, acc);
  in.beta = acc_rows(beta_in, acc);
  p.h_stream_stride = stream_stride(in.H);
  p.a_token_stride = sh.static_alpha ? 0 : sh.n * (sh.n + 1);
  p.b_token_stride = sh.static_beta ? 0 : sh.n;
  p.h_ptr = in.H.data_ptr();
  p.y_ptr = in.y.data_ptr();
  p.a_ptr = in.alpha.data_ptr();
  p.b_ptr = in.beta.data_ptr();
  return in;
}

// The 16-byte path for H and y (the outputs are checked by each direction).
bool inputs_vec_ok(const HcPostParams& p, int vec) {
  return vec_ok(p.h_ptr, p.h_tok, p.h_stream_stride, vec) && vec_ok(p.y_ptr, p.y_tok, 0, vec);
}

template <typename T, bool kBackward>
void launch_hc_post(const HcPostParams& p, bool vectorize) {
  const int n = p.n;
  const HcStreamTile b = hc_stream_tile(p.n_tokens, p.d, vectorize ? kVec16<T> : 1, hc_post_coefs_per_row(n),
                                        kBackward ? n * (n + 1) : 0, sizeof(acc_t<T>));
  CL_BOOL_SWITCH(vectorize, kVectorize, [&] {
    constexpr int kVec = kVectorize ? kVec16<T> : 1;
    dispatch_streams<0, 2, 4, 8>(n, [&](auto kn) {
      constexpr int kN = decltype(kn)::value;
      launch(kBackward ? hc_post_bwd_kernel<T, kVec, kN> : hc_post_fwd_kernel<T, kVec, kN>,
             cover_grid(p.n_tokens, b.rows), dim3(b.threads_x, b.rows), b.smem_bytes, p);
    });
  });
}

}  // namespace

at::Tensor hc_post_fwd(const at::Tensor& H_in, const at::Tensor& y_in, const at::Tensor& alpha_in,
                       const at::Tensor& beta_in) {
  const HcPostShape sh = check_hc_post_inputs(H_in, y_in, alpha_in, beta_in);
  const c10::cuda::CUDAGuard guard(H_in.device());
  at::Tensor out = at::empty_like(H_in);
  if (sh.N == 0 || sh.d == 0) return out;

  HcPostInputs in = hc_post_params(sh, H_in, y_in, alpha_in, beta_in);
  HcPostParams& p = in.p;
  at::Tensor o = writable(out, 2, &p.out_tok);
  p.out_stream_stride = stream_stride(o);
  p.out_ptr = o.data_ptr();

  CL_DISPATCH_FLOATING(H_in.scalar_type(), "hc_post_fwd", [&] {
    const int vec = kVec16<scalar_t>;
    const bool vectorize = inputs_vec_ok(p, vec) && vec_ok(p.out_ptr, p.out_tok, p.out_stream_stride, vec);
    launch_hc_post<scalar_t, false>(p, vectorize);
  });
  copy_back(out, o);
  return out;
}

std::vector<at::Tensor> hc_post_bwd(const at::Tensor& dHn_in, const at::Tensor& H_in,
                                    const at::Tensor& y_in, const at::Tensor& alpha_in,
                                    const at::Tensor& beta_in) {
  const HcPostShape sh = check_hc_post_inputs(H_in, y_in, alpha_in, beta_in);
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

  HcPostInputs in = hc_post_params(sh, H_in, y_in, alpha_in, beta_in);
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
    const bool vectorize = inputs_vec_ok(p, vec) && vec_ok(p.g_ptr, p.g_tok, p.g_stream_stride, vec) &&
                           vec_ok(p.dh_ptr, p.dh_tok, p.dh_stream_stride, vec) &&
                           vec_ok(p.dy_ptr, p.dy_tok, 0, vec);
    launch_hc_post<scalar_t, true>(p, vectorize);
  });
  copy_back(dH, dh);
  at::Tensor dalpha = sh.static_alpha ? dalpha_tok.sum(0) : dalpha_tok.view(alpha_in.sizes());
  at::Tensor dbeta = sh.static_beta ? dbeta_tok.sum(0) : dbeta_tok.view(beta_in.sizes());
  return {dH, dy, dalpha, dbeta};
}

}  // namespace crosslayer
