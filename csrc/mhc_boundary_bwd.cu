// Launcher of the mHC boundary's backward (kernels/mhc_boundary.cuh; the forward,
// mhc_boundary_fwd, is in mhc_coeffs.cu).
//
//   mhc_boundary_bwd(dH'?, dx'?, dalpha'?, dbeta'?, H, y, alpha, beta, H', phi, a_pre,
//                    a_post, a_res, b, u, r, eps, pre_eps, post_mult, iters, sinkhorn_eps)
//       -> {dH (H's layout), dy (*lead, d), dalpha, dbeta (the post's coefficients'
//           shapes, accumulator dtype), dphi, da_pre, da_post, da_res, db (each in its
//           parameter's dtype)}
//   H, y, alpha, beta: connection i's post (as hc_post_bwd); H', u, r: the forward's
//   outputs; an absent gradient is zero.
//
// Fused (bf16/fp16, d >= 32, n <= 4, sm 8.0+): mhc_boundary_bwd_kernel (dpre, the
// coefficients' backward, dH' in fp32 folded into hc_post's backward: H, y, dx' and
// dH' read, dH and dy written), one token_sums launch (the coefficient sums of both
// connections), mhc_coeffs_bwd_dh_kernel's dphi pass over H' (and at::sum of its token
// groups' partials past 64 tokens): 3 launches at decode sizes, 3n·d + 3d + n·d
// elements a token. dH' is never rounded to the activation dtype (the composed path
// rounds it once, as the unfused ops do).
// Composed otherwise (fp32/fp64, d < 32, n > 4, an sm below 8.0, a Sinkhorn scale buffer
// past shared memory): stream_mix_dots, mhc_coeffs_bwd writing dH' = dH_next + its
// terms into a new tensor (in the activation dtype, as the unfused ops round it),
// hc_post_bwd.
// Every launch runs on the current stream and is followed by a launch check; no host
// syncs.

#include <c10/cuda/CUDAGuard.h>

#include <optional>
#include <vector>

#include "common/dispatch.h"  // CL_BOOL_SWITCH
#include "hc_post.h"
#include "kernels/mhc_boundary.cuh"
#include "mhc_coeffs.h"
#include "ops.h"
#include "token_sums.h"

namespace crosslayer {
namespace {

// Largest dynamic shared memory the fused kernel asks for (the Sinkhorn scales grow with
// iters: 2·iters − 1 steps of 256 bytes; 160 KB is ~500 iterations).
constexpr int64_t kMhcBoundaryBwdSmemMax = 160 * 1024;

std::vector<at::Tensor> mhc_boundary_bwd_composed(
    const std::optional<at::Tensor>& dH_next, const std::optional<at::Tensor>& dx,
    const std::optional<at::Tensor>& dalpha_next, const std::optional<at::Tensor>& dbeta_next, const at::Tensor& H,
    const at::Tensor& y, const at::Tensor& alpha, const at::Tensor& beta, const at::Tensor& H_next,
    const at::Tensor& phi, const at::Tensor& a_pre, const at::Tensor& a_post, const at::Tensor& a_res,
    const at::Tensor& b, const at::Tensor& u, const at::Tensor& r, double eps, double pre_eps, double post_mult,
    int64_t iters, double sinkhorn_eps) {
  const std::optional<at::Tensor> dpre =
      dx ? std::optional<at::Tensor>(stream_mix_dots(*dx, H_next)) : std::optional<at::Tensor>();
  at::Tensor g = at::empty_like(H_next);  // dH' = dH_next + the pre's terms (dH_next only read)
  const std::vector<at::Tensor> next = mhc_coeffs_bwd(g, false, dH_next, dalpha_next, dbeta_next, dpre, dx, H_next,
                                                      phi, a_pre, a_post, a_res, b, u, r, eps, pre_eps, post_mult,
                                                      iters, sinkhorn_eps);
  std::vector<at::Tensor> out = hc_post_bwd(g, H, y, alpha, beta);
  out.insert(out.end(), next.begin(), next.end());
  return out;
}

}  // namespace

std::vector<at::Tensor> mhc_boundary_bwd(const std::optional<at::Tensor>& dH_next,
                                         const std::optional<at::Tensor>& dx,
                                         const std::optional<at::Tensor>& dalpha_next,
                                         const std::optional<at::Tensor>& dbeta_next, const at::Tensor& H,
                                         const at::Tensor& y, const at::Tensor& alpha, const at::Tensor& beta,
                                         const at::Tensor& H_next, const at::Tensor& phi, const at::Tensor& a_pre,
                                         const at::Tensor& a_post, const at::Tensor& a_res, const at::Tensor& b,
                                         const at::Tensor& u_in, const at::Tensor& r_in, double eps, double pre_eps,
                                         double post_mult, int64_t iters, double sinkhorn_eps) {
  const HcPostInputs post = hc_post_inputs(H, y, alpha, beta);
  check_activation(H_next, "H_next", H, "(..., n, d)", H.sizes());
  const MhcShape sh = check_mhc_inputs(H_next, phi, a_pre, a_post, a_res, b, iters);
  check_mhc_grads(sh, H_next, dalpha_next, dbeta_next, dx, u_in, r_in);
  if (dH_next) check_activation(*dH_next, "dH_next", H, "(..., n, d)", H.sizes());
  const c10::cuda::CUDAGuard guard(H.device());
  const int64_t n = sh.n, d = sh.d, N = sh.N, M = sh.M;
  const int64_t smem_bytes = mhc_boundary_bwd_smem_floats(iters) * static_cast<int64_t>(sizeof(float));
  const int device = H.device().index();
  const bool fused = N > 0 && n <= kMhcBoundaryBwdN && use_mma(H, device) && smem_bytes <= kMhcBoundaryBwdSmemMax &&
                     smem_bytes <= device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (!fused) {
    return mhc_boundary_bwd_composed(dH_next, dx, dalpha_next, dbeta_next, H, y, alpha, beta, H_next, phi, a_pre,
                                     a_post, a_res, b, u_in, r_in, eps, pre_eps, post_mult, iters, sinkhorn_eps);
  }

  const auto f32 = H.options().dtype(at::kFloat);
  MhcCoeffsParams p = mhc_base_params(sh, eps, pre_eps, post_mult, iters, sinkhorn_eps);
  const MhcScaleTensors scales = mhc_scale_inputs(p, at::kFloat, a_pre, a_post, a_res);
  const at::Tensor b_ = b.to(at::kFloat).contiguous();
  const at::Tensor u = u_in.to(at::kFloat).contiguous();
  const at::Tensor r = r_in.to(at::kFloat).contiguous();
  const RowsLd4 phi_ = fp32_rows_ld4(phi);
  const at::Tensor dalpha_ = dalpha_next ? dalpha_next->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor dbeta_ = dbeta_next ? dbeta_next->to(at::kFloat).contiguous() : at::Tensor();
  p.b_ptr = b_.data_ptr();
  p.u_ptr = const_cast<void*>(u.data_ptr());
  p.r_ptr = const_cast<void*>(r.data_ptr());
  p.phi_ptr = phi_.t.data_ptr<float>();
  p.phi_ld = phi_.ld;
  p.dalpha_ptr = dalpha_next ? dalpha_.data_ptr() : nullptr;
  p.dbeta_ptr = dbeta_next ? dbeta_.data_ptr() : nullptr;
  p.ldu = static_cast<int>(round_up(M, 16));
  at::Tensor du = at::empty({N, p.ldu}, f32);  // padding columns: zeros by the kernel
  at::Tensor G = at::empty({N, 2 * M}, f32);
  p.du_ptr = du.data_ptr();
  p.g_ptr = G.data_ptr();

  // Connection i's post: its inputs as hc_post_inputs laid them out, its outputs.
  p.post_h_ptr = post.p.h_ptr;
  p.post_h_tok = post.p.h_tok;
  p.post_h_stream_stride = post.p.h_stream_stride;
  p.post_y_ptr = post.p.y_ptr;
  p.post_y_tok = post.p.y_tok;
  p.post_a_ptr = post.p.a_ptr;
  p.post_b_ptr = post.p.b_ptr;
  p.post_a_token_stride = post.p.a_token_stride;
  p.post_b_token_stride = post.p.b_token_stride;
  at::Tensor dH = at::empty_like(H);
  at::Tensor dy = at::empty(with_tail(sh.lead, {d}), y.options());
  const at::Tensor dH_k = writable(dH, 2, &p.dh_tok);
  p.dh_ptr = dH_k.data_ptr();
  p.dh_stream_stride = stream_stride(dH_k);
  collapse_token_dims(dy.sizes().data(), dy.strides().data(), static_cast<int>(sh.lead.size()), &p.dy_tok);
  p.dy_ptr = dy.data_ptr();
  at::Tensor dalpha_tok = at::empty({N, n, n + 1}, f32);
  at::Tensor dbeta_tok = at::empty({N, n}, f32);
  p.post_da_ptr = dalpha_tok.data_ptr();
  p.post_db_ptr = dbeta_tok.data_ptr();
  const at::Tensor dhn = dH_next ? readable(*dH_next, 2, &p.prior_tok) : at::Tensor();
  p.dh_prior_ptr = dH_next ? dhn.data_ptr() : nullptr;
  p.prior_stream_stride = dH_next ? stream_stride(dhn) : 0;
  const at::Tensor gx = dx ? readable(*dx, 1, &p.gx_tok) : at::Tensor();
  p.gx_ptr = dx ? gx.data_ptr() : nullptr;

  // Tiles in flight (mhc_tile_grid): phase 3 re-reads the tile's H, y and dx'.
  const int64_t blocks = mhc_tile_grid(N, 16 * (n + 2) * d * static_cast<int64_t>(H.element_size()), device);
  const bool vectorize = vec_ok(p.post_h_ptr, p.post_h_tok, p.post_h_stream_stride, 8) &&
                         vec_ok(p.post_y_ptr, p.post_y_tok, 0, 8) && vec_ok(p.dh_ptr, p.dh_tok, p.dh_stream_stride, 8) &&
                         vec_ok(p.dy_ptr, p.dy_tok, 0, 8) &&
                         (!dH_next || vec_ok(p.dh_prior_ptr, p.prior_tok, p.prior_stream_stride, 8)) &&
                         (!dx || vec_ok(p.gx_ptr, p.gx_tok, 0, 8));
  const int smem = static_cast<int>(smem_bytes);
  const bool bf16 = H.scalar_type() == at::kBFloat16;
  CL_BOOL_SWITCH(vectorize, kVec, [&] {
    const auto kernel = bf16 ? mhc_boundary_bwd_kernel<__nv_bfloat16, kVec> : mhc_boundary_bwd_kernel<__half, kVec>;
    allow_smem(kernel, smem);
    launch(kernel, dim3(static_cast<unsigned>(blocks)), dim3(kMhcBoundaryBwdThreads), smem, p);
  });
  copy_back(dH, dH_k);

  // Both connections' coefficient sums in one token_sums launch: db = Σ_t dh, da_* =
  // Σ_t Σ_{m in the group} dh·z (connection i+1), the post's static coefficients.
  TokenSums sums(N);
  const at::Tensor db = sums.sum(G, {M}, 1, 0, 1);
  const at::Tensor da_pre = sums.sum(G, {}, 1, M, n);
  const at::Tensor da_post = sums.sum(G, {}, 1, M + n, n);
  const at::Tensor da_res = sums.sum(G, {}, 1, M + 2 * n, n * n);
  const std::vector<at::Tensor> dcoef = hc_post_coef_grads(post, dalpha_tok, dbeta_tok, alpha, beta, sums);
  sums.run();

  // dphi = Σ_t H'ᵀ·du over the H' the forward wrote (the dH pass without dH).
  p.dh_ptr = nullptr;
  p.dh_prior_ptr = nullptr;
  p.gx_ptr = nullptr;
  const at::Tensor dphi = mhc_coeffs_dh_pass(p, H_next, phi_.t);  // phi_: already fp32 and padded, not again
  return {dH,
          dy,
          dcoef[0],
          dcoef[1],
          dphi.to(phi.scalar_type()).contiguous(),
          da_pre.to(a_pre.scalar_type()),
          da_post.to(a_post.scalar_type()),
          da_res.to(a_res.scalar_type()),
          db.to(b.scalar_type()).contiguous()};
}

}  // namespace crosslayer
