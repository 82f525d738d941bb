// Launchers of hc_boundary, forward (host helpers in hc_boundary.h, kernels in
// kernels/hc_boundary.cuh).

#include <c10/cuda/CUDAGuard.h>

#include <optional>
#include <vector>

#include "hc_boundary.h"
#include "ops.h"

namespace crosslayer {

std::vector<at::Tensor> hc_boundary_fwd(const at::Tensor& H_in, const at::Tensor& y, const at::Tensor& alpha,
                                        const at::Tensor& beta, const at::Tensor& A, const at::Tensor& B,
                                        const at::Tensor& W, const at::Tensor& s_a, const at::Tensor& s_b,
                                        double eps) {
  // Checks first (a CPU tensor gets the message, not the guard's error); ATen's ops (W's
  // packing) guard their device themselves.
  HcBoundaryInputs in = hc_boundary_inputs(H_in, y, alpha, beta, A, B, W, at::Tensor(), s_a, s_b);
  const StreamShape& sh = in.post.sh;
  const c10::cuda::CUDAGuard guard(H_in.device());
  const auto acc_opts = H_in.options().dtype(acc_dtype(H_in.scalar_type()));
  const int64_t n = sh.n, d = sh.d;
  at::Tensor H_next = at::empty_like(H_in);
  at::Tensor x = at::empty(with_tail(sh.lead, {d}), H_in.options());
  at::Tensor alpha_next = at::empty(with_tail(sh.lead, {n, n + 1}), acc_opts);
  at::Tensor beta_next = at::empty(with_tail(sh.lead, {n}), acc_opts);
  at::Tensor q = at::empty(with_tail(sh.lead, {n, n + 2}), acc_opts);
  at::Tensor r = at::empty(with_tail(sh.lead, {n}), acc_opts);
  if (sh.N == 0) return {H_next, x, alpha_next, beta_next, q, r, in.weights.Wt};

  HcBoundaryParams& p = in.p;
  const at::Tensor out = writable(H_next, 2, &p.post.out_tok);
  p.post.out_stream_stride = stream_stride(out);
  p.post.out_ptr = out.data_ptr();
  with_token_layout(x, 1, &p.pre.x_tok);
  p.pre.eps = eps;
  p.pre.x_ptr = x.data_ptr();
  p.pre.alpha_ptr = alpha_next.data_ptr();
  p.pre.beta_ptr = beta_next.data_ptr();
  p.pre.q_ptr = q.data_ptr();
  p.pre.r_ptr = r.data_ptr();
  const int device = H_in.device().index();
  CL_DISPATCH_FLOATING(H_in.scalar_type(), "hc_boundary_fwd", [&] {
    using acc = acc_t<scalar_t>;
    const int vec = kVec16<scalar_t>;
    const HcPostParams& po = p.post;
    const bool vectorize = vec_ok(po.h_ptr, po.h_tok, po.h_stream_stride, vec) && vec_ok(po.y_ptr, po.y_tok, 0, vec) &&
                           vec_ok(po.out_ptr, po.out_tok, po.out_stream_stride, vec) &&
                           vec_ok(p.pre.x_ptr, p.pre.x_tok, 0, vec);
    dispatch_boundary<scalar_t>(vectorize, p.pre.n, [&](auto kvec, auto kn) {
      constexpr int kVec = decltype(kvec)::value, kN = decltype(kn)::value;
      const HcPreLaunch b = hc_pre_block<acc, kN>("hc_boundary", sh.N, d, kVec, p.pre.ldw, false, device,
                                                  boundary_extra_smem(p.pre.n, false));
      auto kernel = hc_boundary_fwd_kernel<scalar_t, kVec, kN>;
      allow_smem(kernel, b.smem_bytes);
      launch(kernel, cover_grid(b.grid, 1), dim3(b.threads_x, b.rows), b.smem_bytes, p);
    });
  });
  copy_back(H_next, out);
  return {H_next, x, alpha_next, beta_next, q, r, in.weights.Wt};
}

std::vector<at::Tensor> hc_boundary_mix_fwd(const at::Tensor& H_in, const at::Tensor& y, const at::Tensor& alpha,
                                            const at::Tensor& beta, const at::Tensor& A_next) {
  HcBoundaryMixInputs in = hc_boundary_mix_inputs(H_in, y, alpha, beta, A_next);
  const StreamShape& sh = in.post.sh;
  const c10::cuda::CUDAGuard guard(H_in.device());
  at::Tensor H_next = at::empty_like(H_in);
  at::Tensor x = at::empty(with_tail(sh.lead, {sh.d}), H_in.options());
  if (sh.N == 0 || sh.d == 0) return {H_next, x};
  HcBoundaryMixParams& p = in.p;
  const at::Tensor out = writable(H_next, 2, &p.out_tok);
  p.out_stream_stride = stream_stride(out);
  p.out_ptr = out.data_ptr();
  collapse_token_dims(x.sizes().data(), x.strides().data(), static_cast<int>(sh.lead.size()), &p.x_tok);
  p.x_ptr = x.data_ptr();
  CL_DISPATCH_FLOATING(H_in.scalar_type(), "hc_boundary_mix_fwd", [&] {
    const int vec = kVec16<scalar_t>;
    const bool vectorize = vec_ok(p.h_ptr, p.h_tok, p.h_stream_stride, vec) && vec_ok(p.y_ptr, p.y_tok, 0, vec) &&
                           vec_ok(p.out_ptr, p.out_tok, p.out_stream_stride, vec) && vec_ok(p.x_ptr, p.x_tok, 0, vec);
    launch_hc_tile<scalar_t>(p, vectorize, p.n * (p.n + 3), 0, [](auto kvec, auto kn) {
      return hc_boundary_mix_fwd_kernel<scalar_t, decltype(kvec)::value, decltype(kn)::value>;
    });
  });
  copy_back(H_next, out);
  return {H_next, x};
}

}  // namespace crosslayer
