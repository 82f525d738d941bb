// Launchers of hc_boundary, backward (host helpers in hc_boundary.h, kernels in
// kernels/hc_boundary.cuh).

#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "hc_boundary.h"
#include "ops.h"

namespace crosslayer {

std::vector<at::Tensor> hc_boundary_bwd(const at::Tensor& dH_next_in, const at::Tensor& dx_in,
                                        const std::optional<at::Tensor>& dalpha_next,
                                        const std::optional<at::Tensor>& dbeta_next, const at::Tensor& H_in,
                                        const at::Tensor& y, const at::Tensor& alpha, const at::Tensor& beta,
                                        const at::Tensor& A, const at::Tensor& B, const at::Tensor& W,
                                        const at::Tensor& Wt, const at::Tensor& s_a, const at::Tensor& s_b,
                                        const at::Tensor& q, const at::Tensor& r) {
  TORCH_CHECK(Wt.defined(), "hc_boundary_bwd: Wt (the forward's packed W) is required");
  HcBoundaryInputs in = hc_boundary_inputs(H_in, y, alpha, beta, A, B, W, Wt, s_a, s_b);
  const StreamShape& sh = in.post.sh;
  const int64_t n = sh.n, d = sh.d;
  check_activation(dH_next_in, "dH_next", H_in, "(..., n, d)", H_in.sizes());
  check_activation(dx_in, "dx", H_in, "(..., d)", with_tail(sh.lead, {d}));
  check_hc_pre_bwd_coefs(sh, H_in, dalpha_next, dbeta_next, q, r);
  const c10::cuda::CUDAGuard guard(H_in.device());
  const at::ScalarType acc_type = acc_dtype(H_in.scalar_type());
  const auto acc_opts = H_in.options().dtype(acc_type);
  at::Tensor dH = at::empty_like(H_in);
  at::Tensor dy = at::empty(with_tail(sh.lead, {d}), y.options());
  if (sh.N == 0) {
    return {dH, dy, at::zeros(alpha.sizes(), acc_opts), at::zeros(beta.sizes(), acc_opts),
            at::zeros(A.sizes(), A.options()), at::zeros(B.sizes(), B.options()), at::zeros(W.sizes(), W.options()),
            at::zeros({}, s_a.options()), at::zeros({}, s_b.options())};
  }
  at::Tensor dalpha_tok = at::empty({sh.N, n, n + 1}, acc_opts);
  at::Tensor dbeta_tok = at::empty({sh.N, n}, acc_opts);
  HcBoundaryParams& p = in.p;
  const at::Tensor g = readable(dH_next_in, 2, &p.post.g_tok);
  const at::Tensor dx = readable(dx_in, 1, &p.pre.x_tok);
  at::Tensor dh = writable(dH, 2, &p.post.dh_tok);
  collapse_token_dims(dy.sizes().data(), dy.strides().data(), static_cast<int>(sh.lead.size()), &p.post.dy_tok);
  p.post.g_stream_stride = stream_stride(g);
  p.post.dh_stream_stride = stream_stride(dh);
  p.post.g_ptr = g.data_ptr();
  p.post.dh_ptr = dh.data_ptr();
  p.post.dy_ptr = dy.data_ptr();
  p.post.da_ptr = dalpha_tok.data_ptr();
  p.post.db_ptr = dbeta_tok.data_ptr();
  p.pre.dx_ptr = dx.data_ptr();
  const HcPreBwdCoefs coefs = hc_pre_bwd_coef_inputs(p.pre, acc_type, dalpha_next, dbeta_next, q, r);

  HcPreWorkspaces ws;
  const int device = H_in.device().index();
  CL_DISPATCH_FLOATING(H_in.scalar_type(), "hc_boundary_bwd", [&] {
    using acc = acc_t<scalar_t>;
    const int vec = kVec16<scalar_t>;
    const HcPostParams& po = p.post;
    const bool vectorize = vec_ok(po.h_ptr, po.h_tok, po.h_stream_stride, vec) && vec_ok(po.y_ptr, po.y_tok, 0, vec) &&
                           vec_ok(po.g_ptr, po.g_tok, po.g_stream_stride, vec) &&
                           vec_ok(po.dh_ptr, po.dh_tok, po.dh_stream_stride, vec) &&
                           vec_ok(po.dy_ptr, po.dy_tok, 0, vec) && vec_ok(p.pre.dx_ptr, p.pre.x_tok, 0, vec);
    dispatch_boundary<scalar_t>(vectorize, p.pre.n, [&](auto kvec, auto kn) {
      constexpr int kVec = decltype(kvec)::value, kN = decltype(kn)::value;
      HcPreLaunch b = hc_pre_block<acc, kN>("hc_boundary", sh.N, d, kVec, p.pre.ldw, true, device,
                                            boundary_extra_smem(p.pre.n, true));
      auto kernel = hc_boundary_bwd_kernel<scalar_t, kVec, kN>;
      allow_smem(kernel, b.smem_bytes);
      ws = hc_pre_workspaces(p.pre, b, kernel, acc_opts, device);
      launch(kernel, dim3(static_cast<unsigned>(b.grid)), dim3(b.threads_x, b.rows), b.smem_bytes, p);
    });
  });
  copy_back(dH, dh);
  TokenSums sums(sh.N);
  const std::vector<at::Tensor> dcoef = hc_post_coef_grads(in.post, dalpha_tok, dbeta_tok, alpha, beta, sums);
  sums.run();
  const std::vector<at::Tensor> dparams = hc_pre_param_grads(ws, n, d, A, B, W, s_a, s_b);
  return {dH, dy, dcoef[0], dcoef[1], dparams[0], dparams[1], dparams[2], dparams[3], dparams[4]};
}

std::vector<at::Tensor> hc_boundary_mix_bwd(const at::Tensor& dH_next_in, const at::Tensor& dx_in,
                                            const at::Tensor& H_in, const at::Tensor& y, const at::Tensor& alpha,
                                            const at::Tensor& beta, const at::Tensor& A_next) {
  HcBoundaryMixInputs in = hc_boundary_mix_inputs(H_in, y, alpha, beta, A_next);
  const StreamShape& sh = in.post.sh;
  check_activation(dH_next_in, "dH_next", H_in, "(*lead, n, d)", H_in.sizes());
  check_activation(dx_in, "dx", H_in, "(*lead, d)", with_tail(sh.lead, {sh.d}));
  const c10::cuda::CUDAGuard guard(H_in.device());
  const at::TensorOptions acc_opts = H_in.options().dtype(acc_dtype(H_in.scalar_type()));
  at::Tensor dH = at::empty_like(H_in);
  at::Tensor dy = at::empty(with_tail(sh.lead, {sh.d}), y.options());
  if (sh.N == 0 || sh.d == 0) {  // dH and dy are empty; the dots over nothing are 0
    return {dH, dy, at::zeros(alpha.sizes(), acc_opts), at::zeros(beta.sizes(), acc_opts),
            at::zeros(A_next.sizes(), acc_opts)};
  }
  const int64_t n = sh.n;
  at::Tensor dalpha_tok = at::empty({sh.N, n, n + 1}, acc_opts);
  at::Tensor dbeta_tok = at::empty({sh.N, n}, acc_opts);
  at::Tensor dw_tok = at::empty({sh.N, n}, acc_opts);
  HcBoundaryMixParams& p = in.p;
  const at::Tensor g = readable(dH_next_in, 2, &p.g_tok);
  const at::Tensor dx = readable(dx_in, 1, &p.dx_tok);
  at::Tensor dh = writable(dH, 2, &p.dh_tok);
  collapse_token_dims(dy.sizes().data(), dy.strides().data(), static_cast<int>(sh.lead.size()), &p.dy_tok);
  p.g_stream_stride = stream_stride(g);
  p.dh_stream_stride = stream_stride(dh);
  p.g_ptr = g.data_ptr();
  p.dx_ptr = dx.data_ptr();
  p.dh_ptr = dh.data_ptr();
  p.dy_ptr = dy.data_ptr();
  p.da_ptr = dalpha_tok.data_ptr();
  p.db_ptr = dbeta_tok.data_ptr();
  p.dw_ptr = dw_tok.data_ptr();
  CL_DISPATCH_FLOATING(H_in.scalar_type(), "hc_boundary_mix_bwd", [&] {
    const int vec = kVec16<scalar_t>;
    const bool vectorize = vec_ok(p.h_ptr, p.h_tok, p.h_stream_stride, vec) && vec_ok(p.y_ptr, p.y_tok, 0, vec) &&
                           vec_ok(p.g_ptr, p.g_tok, p.g_stream_stride, vec) && vec_ok(p.dx_ptr, p.dx_tok, 0, vec) &&
                           vec_ok(p.dh_ptr, p.dh_tok, p.dh_stream_stride, vec) && vec_ok(p.dy_ptr, p.dy_tok, 0, vec);
    // The generic-n instantiation (kn = 0, up to 16 streams) keeps every stream's chunk of
    // dH' and H live: with 16-byte chunks that is beyond 255 registers (ptxas spilled
    // 3 KB a thread), so it takes hc_boundary's generic chunk (kHcBoundaryVec<T, 16>).
    launch_hc_tile<scalar_t>(p, vectorize, p.n * (p.n + 3), p.n * (p.n + 2), [](auto kvec, auto kn) {
      constexpr int kN = decltype(kn)::value;
      constexpr int kV = kN == 0 ? std::min<int>(decltype(kvec)::value, kHcBoundaryVec<scalar_t, kMaxStreams>)
                                 : decltype(kvec)::value;
      return hc_boundary_mix_bwd_kernel<scalar_t, kV, kN>;
    });
  });
  copy_back(dH, dh);
  TokenSums sums(sh.N);
  const std::vector<at::Tensor> dcoef = hc_post_coef_grads(in.post, dalpha_tok, dbeta_tok, alpha, beta, sums);
  const at::Tensor dA_next = sums.grad(dw_tok, true, A_next.sizes(), n + 1);
  sums.run();
  return {dH, dy, dcoef[0], dcoef[1], dA_next};
}

}  // namespace crosslayer
