// Launchers for hc_pre of dynamic Hyper-Connections (kernels in kernels/hc_pre.cuh).
//
//   hc_pre_fwd(H (*, n, d), A (n, n+1), B (n), W (d, n+2), s_a, s_b, eps)
//       -> {x (*, d), alpha (*, n, n+1), beta (*, n), q (*, n, n+2), r (*, n), Wt}
//   hc_pre_bwd(dH, accumulate, dx (*, d), dalpha?, dbeta?, H, A, B, W, Wt, s_a, s_b, q, r)
//       -> dH (*, n, d) (= or +=) in place; {dA, dB, dW, ds_a, ds_b}
//   (Wt: W packed for the kernels, hc_pre.h's hc_pre_pack_w; the forward's goes back
//   to the backward, which does not pack again)
//
// One validator serves both directions. H's token dims may have any strides that
// collapse to two (TokenLayout); otherwise H is copied once. Coefficients, W, q and r
// are in the accumulator dtype (float64 for float64 H, float32 otherwise); parameter
// gradients come back in their parameter's dtype, summed over tokens from per-block
// partials by hc_pre_param_grads_kernel (one launch, deterministic). Every launch runs on the current stream and is
// followed by a launch check. Static HC (no W) is stream_mix (stream_mix.cu).

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <vector>

#include "common/dispatch.h"
#include "hc_pre.h"
#include "ops.h"

namespace crosslayer {

std::vector<at::Tensor> hc_pre_fwd(const at::Tensor& H_in, const at::Tensor& A, const at::Tensor& B,
                                       const at::Tensor& W, const at::Tensor& s_a, const at::Tensor& s_b,
                                       double eps) {
  const StreamShape sh = check_hc_pre_inputs(H_in, A, B, W, s_a, s_b);
  const c10::cuda::CUDAGuard guard(H_in.device());
  const at::ScalarType acc_type = acc_dtype(H_in.scalar_type());
  const auto acc_opts = H_in.options().dtype(acc_type);
  const int64_t n = sh.n, d = sh.d, J = n + 2;
  at::Tensor x = at::empty(with_tail(sh.lead, {d}), H_in.options());
  at::Tensor alpha = at::empty(with_tail(sh.lead, {n, n + 1}), acc_opts);
  at::Tensor beta = at::empty(with_tail(sh.lead, {n}), acc_opts);
  at::Tensor q = at::empty(with_tail(sh.lead, {n, J}), acc_opts);
  at::Tensor r = at::empty(with_tail(sh.lead, {n}), acc_opts);
  at::Tensor Wt = hc_pre_pack_w(W, acc_type);
  if (sh.N == 0) return {x, alpha, beta, q, r, Wt};

  HcPreParams p{};
  const HcPreWeights w = hc_pre_weights(p, sh, acc_type, A, B, Wt, s_a, s_b);
  const at::Tensor H = hc_pre_streams(p, H_in);
  with_token_layout(x, 1, &p.x_tok);
  p.eps = eps;
  p.x_ptr = x.data_ptr();
  p.alpha_ptr = alpha.data_ptr();
  p.beta_ptr = beta.data_ptr();
  p.q_ptr = q.data_ptr();
  p.r_ptr = r.data_ptr();

  const int device = H_in.device().index();
  CL_DISPATCH_FLOATING(H_in.scalar_type(), "hc_pre_fwd", [&] {
    using acc = acc_t<scalar_t>;
    const int vec = kVec16<scalar_t>;
    const bool vectorize = vec_ok(p.h_ptr, p.h_tok, p.h_stream_stride, vec) && vec_ok(p.x_ptr, p.x_tok, 0, vec);
    CL_BOOL_SWITCH(vectorize, kVectorize, [&] {
      constexpr int kVec = kVectorize ? kVec16<scalar_t> : 1;
      dispatch_streams<kMaxStreams, 2, 4, 8>(p.n, [&](auto kn) {
        constexpr int kN = decltype(kn)::value;
        const HcPreLaunch b = hc_pre_block<acc, kN>("hc_pre", sh.N, d, kVec, p.ldw, false, device, no_extra_smem);
        auto kernel = hc_pre_fwd_kernel<scalar_t, kVec, kN>;
        allow_smem(kernel, b.smem_bytes);
        launch(kernel, cover_grid(b.grid, 1), dim3(b.threads_x, b.rows), b.smem_bytes, p);
      });
    });
  });
  return {x, alpha, beta, q, r, Wt};
}

std::vector<at::Tensor> hc_pre_bwd(at::Tensor& dH, bool accumulate, const at::Tensor& dx_in,
                                   const std::optional<at::Tensor>& dalpha, const std::optional<at::Tensor>& dbeta,
                                   const at::Tensor& H_in, const at::Tensor& A, const at::Tensor& B,
                                   const at::Tensor& W, const at::Tensor& Wt, const at::Tensor& s_a,
                                   const at::Tensor& s_b, const at::Tensor& q, const at::Tensor& r) {
  const StreamShape sh = check_hc_pre_inputs(H_in, A, B, W, s_a, s_b);
  check_activation(dH, "dH", H_in, "(..., n, d)", H_in.sizes());
  const int64_t n = sh.n, d = sh.d;
  const at::ScalarType acc_type = acc_dtype(H_in.scalar_type());
  check_hc_pre_packed_w(Wt, sh, acc_type, H_in);
  check_activation(dx_in, "dx", H_in, "(..., d)", with_tail(sh.lead, {d}));
  check_hc_pre_bwd_coefs(sh, H_in, dalpha, dbeta, q, r);
  const c10::cuda::CUDAGuard guard(H_in.device());
  const auto acc_opts = H_in.options().dtype(acc_type);

  if (sh.N == 0) {
    return {at::zeros(A.sizes(), A.options()), at::zeros(B.sizes(), B.options()),
            at::zeros(W.sizes(), W.options()), at::zeros({}, s_a.options()), at::zeros({}, s_b.options())};
  }
  HcPreParams p{};
  const HcPreWeights w = hc_pre_weights(p, sh, acc_type, A, B, Wt, s_a, s_b);
  const at::Tensor H = hc_pre_streams(p, H_in);
  const at::Tensor dx = readable(dx_in, 1, &p.x_tok);
  // The kernel writes dH in place when it can address it (any layout whose token dims
  // collapse, e.g. the folded one), else a scratch copied back (holding dH first when
  // the kernel adds to it).
  at::Tensor dH_k = writable(dH, 2, &p.dh_tok, accumulate);
  p.accumulate_dh = accumulate;
  const HcPreBwdCoefs coefs = hc_pre_bwd_coef_inputs(p, acc_type, dalpha, dbeta, q, r);
  p.dh_stream_stride = stream_stride(dH_k);
  p.dx_ptr = dx.data_ptr();
  p.dh_ptr = dH_k.data_ptr();

  HcPreWorkspaces ws;
  const int device = H_in.device().index();
  CL_DISPATCH_FLOATING(H_in.scalar_type(), "hc_pre_bwd", [&] {
    using acc = acc_t<scalar_t>;
    const int vec = kVec16<scalar_t>;
    const bool vectorize = vec_ok(p.h_ptr, p.h_tok, p.h_stream_stride, vec) && vec_ok(p.dx_ptr, p.x_tok, 0, vec) &&
                           vec_ok(p.dh_ptr, p.dh_tok, p.dh_stream_stride, vec);
    CL_BOOL_SWITCH(vectorize, kVectorize, [&] {
      constexpr int kVec = kVectorize ? kVec16<scalar_t> : 1;
      dispatch_streams<kMaxStreams, 2, 4, 8>(p.n, [&](auto kn) {
        constexpr int kN = decltype(kn)::value;
        HcPreLaunch b = hc_pre_block<acc, kN>("hc_pre", sh.N, d, kVec, p.ldw, true, device, no_extra_smem);
        auto kernel = hc_pre_bwd_kernel<scalar_t, kVec, kN>;
        allow_smem(kernel, b.smem_bytes);
        ws = hc_pre_workspaces(p, b, kernel, acc_opts, device);
        launch(kernel, dim3(static_cast<unsigned>(b.grid)), dim3(b.threads_x, b.rows), b.smem_bytes, p);
      });
    });
  });
  copy_back(dH, dH_k);
  return hc_pre_param_grads(ws, n, d, A, B, W, s_a, s_b);
}

}  // namespace crosslayer
