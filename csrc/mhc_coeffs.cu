// Launchers for the mHC coefficients (kernels in kernels/mhc_coeffs.cuh).
//
//   mhc_coeffs_fwd(H (*, n, d), phi (n·d, M), a_pre, a_post, a_res (0-dim), b (M), eps,
//                  pre_eps, post_mult, iters, sinkhorn_eps)
//       -> {alpha (*, n, n+1), beta (*, n), u = xf·phi (*, M), r (*)}
//   mhc_pre_fwd(<the same>) -> {x (*, d), alpha, beta, u, r}: the connection's pre, x =
//       Σ_i alpha[..., i, 0]·H_i in the same pass over H
//   mhc_boundary_fwd(H, y, alpha, beta (connection i's post, as hc_post_fwd's), <the
//                    same as mhc_coeffs_fwd from phi on>)
//       -> {H' (H's layout), x', alpha', beta', u, r}: H' = hc_post(H, y, alpha, beta)
//          mixed, written and projected in the same kernel (16-bit H, d >= 32)
//   mhc_coeffs_bwd(dH, accumulate, prior?, dalpha?, dbeta?, dpre?, dx?, H, phi, a_pre, a_post,
//                  a_res, b, u, r, <same floats>)
//       -> dH (*, n, d) written (=), added to (+=, `accumulate`) in place, or written as
//          prior + the terms (`prior`: another op's gradient of H, only read);
//          {dphi, da_pre, da_post, da_res, db}
//   (the connection's pre x = Σ_i alpha[..., i, 0]·H_i folded in: dpre (*, n) = <dx, H_i>,
//   a second gradient of alpha[..., 0] added to dalpha's column 0 in the kernel instead
//   of by autograd; dx (*, d): its dH term alpha[..., i, 0]·dx added in the dH pass)
//
// M = n² + 2n. alpha, beta, u, r are in the accumulator dtype (float64 for float64 H,
// float32 otherwise); u and r are what the backward needs (it never recomputes x·phi).
// Work split:
//   bf16/fp16 H, d >= 32   forward: mhc_coeffs_fwd_kernel (u, Σ xf², the epilogue and x
//                          a 16-token tile, one pass over H); backward:
//                          mhc_coeffs_bwd_epilogue_kernel (du, s, G), mhc_coeffs_bwd_dh_kernel
//                          (dH and the dphi = xfᵀ·du partials of token groups, in one pass
//                          over H), at::sum of the partials when there is more than one group.
//   fp32/fp64 H (the correctness dtypes) and 16-bit H with d < 32 (where the rms
//   Jacobian cancels and the hi/lo products' 2^-17 would show): u, Σ xf², dH and dphi by
//   at::mm in the accumulator dtype, the same epilogue kernels, x by stream_mix.
// Parameter gradients are sums over tokens of the per-token G = [dh, dh·z] (one
// token_sums launch) and the dH kernel's dphi partials: deterministic, no atomics. Every
// launch runs on the current stream and is followed by a launch check; no host syncs.

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"  // CL_BOOL_SWITCH
#include "common/launch.h"
#include "common/layout.h"
#include "common/mma_pack.h"
#include "hc_post.h"
#include "token_sums.h"
#include "mhc_coeffs.h"
#include "ops.h"

namespace crosslayer {
namespace {

// Fewest 16-token tiles a token group of the dH kernel walks (its dphi partial is
// n·d·M fp32 written and summed again: worth it only over several tiles).
constexpr int64_t kMinTilesPerGroup = 4;
// Largest shared-memory Sinkhorn scale buffer (no opt-in needed); beyond it, global.
constexpr int64_t kCbufSmemMax = 48 * 1024;


template <typename Kernel>
void launch_epilogue(Kernel kernel, const MhcCoeffsParams& p, int group, int smem) {
  const int64_t blocks = (p.n_tokens * group + kMhcCoeffsEpiThreads - 1) / kMhcCoeffsEpiThreads;
  allow_smem(kernel, smem);
  launch(kernel, dim3(static_cast<unsigned>(blocks)), dim3(kMhcCoeffsEpiThreads), smem, p);
}

// The forward, with x = Σ_i alpha[..., i, 0]·H_i when `with_x`: {alpha, beta, u, r}
// and then x. With `post` (the boundary), H_in is H' = hc_post(post's H, y, alpha,
// beta), allocated by the caller and written here on the tensor-core path (the caller
// has written it on the other).
std::vector<at::Tensor> mhc_coeffs_fwd_impl(const at::Tensor& H_in, const at::Tensor& phi, const at::Tensor& a_pre,
                                            const at::Tensor& a_post, const at::Tensor& a_res, const at::Tensor& b,
                                            double eps, double pre_eps, double post_mult, int64_t iters,
                                            double sinkhorn_eps, bool with_x, const HcPostInputs* post) {
  const MhcShape sh = check_mhc_inputs(H_in, phi, a_pre, a_post, a_res, b, iters);
  const c10::cuda::CUDAGuard guard(H_in.device());
  const at::ScalarType acc_type = acc_dtype(H_in.scalar_type());
  const auto acc_opts = H_in.options().dtype(acc_type);
  const int64_t n = sh.n, d = sh.d, N = sh.N, M = sh.M;
  at::Tensor alpha = at::empty(with_tail(sh.lead, {n, n + 1}), acc_opts);
  at::Tensor beta = at::empty(with_tail(sh.lead, {n}), acc_opts);
  at::Tensor u = at::empty(with_tail(sh.lead, {M}), acc_opts);
  at::Tensor r = at::empty(sh.lead, acc_opts);
  std::vector<at::Tensor> out{alpha, beta, u, r};
  if (N == 0) {
    if (with_x) out.push_back(at::empty(with_tail(sh.lead, {d}), H_in.options()));
    return out;
  }

  MhcCoeffsParams p = mhc_base_params(sh, eps, pre_eps, post_mult, iters, sinkhorn_eps);
  const MhcScaleTensors scales = mhc_scale_inputs(p, acc_type, a_pre, a_post, a_res);
  const at::Tensor b_ = b.to(acc_type).contiguous();
  p.b_ptr = b_.data_ptr();
  p.alpha_ptr = alpha.data_ptr();
  p.beta_ptr = beta.data_ptr();
  p.u_ptr = u.data_ptr();
  p.r_ptr = r.data_ptr();
  const int device = H_in.device().index();

  if (use_mma(H_in, device)) {
    const at::Tensor H = readable(H_in, 2, &p.h_tok);
    p.h_ptr = H.data_ptr();
    p.h_stream_stride = stream_stride(H);
    if (post != nullptr) {
      TORCH_INTERNAL_ASSERT(H.is_same(H_in), "mhc_boundary_fwd: H' must be writable in place");
      p.hn_ptr = H.data_ptr();  // written through its layout p.h_tok
      p.post_h_ptr = post->p.h_ptr;
      p.post_h_tok = post->p.h_tok;
      p.post_h_stream_stride = post->p.h_stream_stride;
      p.post_y_ptr = post->p.y_ptr;
      p.post_y_tok = post->p.y_tok;
      p.post_a_ptr = post->p.a_ptr;
      p.post_b_ptr = post->p.b_ptr;
      p.post_a_token_stride = post->p.a_token_stride;
      p.post_b_token_stride = post->p.b_token_stride;
    }
    at::Tensor x;
    if (with_x) {
      x = at::empty(with_tail(sh.lead, {d}), H_in.options());
      with_token_layout(x, 1, &p.x_tok);
      p.x_ptr = x.data_ptr();
    }
    const int kNT = n == 4 ? MhcCoeffsProjTiles<4>::value : MhcCoeffsProjTiles<kMaxStreams>::value;
    p.m_pad = static_cast<int>(round_up(M, 8 * kNT));
    // phi in 16-bit parts (see the kernel's header), packed in one launch
    // (kernels/mma_pack.cuh): fp16 scaled by a power of two 2^k with max|phi|·2^k in
    // [2^14, 2^15) first (computed on the device: no sync), parts {hi, lo}; bf16 parts
    // {hi, lo, rest, rest's own lo (unused)}, rest the bf16 of phi − hi − lo.
    Pow2Scale sc;
    const bool fp16 = H.scalar_type() == at::kHalf;
    if (fp16) {
      sc = fp16_split_scale(phi);
      p.proj_unscale_ptr = sc.unscale.data_ptr<float>();
    }
    const at::Tensor phif = pack_fragments(phi, n, p.cps * 32, p.m_pad, fp16 ? 2 : 4,
                                           H.scalar_type(), sc.scale);
    p.phif_ptr = phif.data_ptr();
    // Tiles in flight (mhc_tile_grid): phase 3 re-reads the tile (16 tokens of H). Wide
    // tokens (16·n·d·2 bytes past L2 / 2 / SMs, ~194 KB on an H100: n·d > ~6200, so n =
    // 4, d = 2048 already) get one block an SM (132 tiles of 256 KB: 68 % of the L2).
    const int64_t blocks = mhc_tile_grid(N, 16 * n * d * static_cast<int64_t>(H.element_size()), device);
    const bool vectorize = vec_ok(p.h_ptr, p.h_tok, p.h_stream_stride, 8) &&
                           (!with_x || vec_ok(p.x_ptr, p.x_tok, 0, 8)) &&
                           (post == nullptr || (vec_ok(p.post_h_ptr, p.post_h_tok, p.post_h_stream_stride, 8) &&
                                                vec_ok(p.post_y_ptr, p.post_y_tok, 0, 8)));
    const bool bf16 = H.scalar_type() == at::kBFloat16;
    CL_BOOL_SWITCH(vectorize, kVec, [&] {
      CL_BOOL_SWITCH(post != nullptr, kPost, [&] {
        dispatch_streams<kMaxStreams, 4>(static_cast<int>(n), [&](auto kn) {
          constexpr int kN = decltype(kn)::value;
          const int smem = mhc_coeffs_fwd_smem_floats<kN>(p.m_pad) * static_cast<int>(sizeof(float));
          const auto kernel = bf16 ? mhc_coeffs_fwd_kernel<__nv_bfloat16, kVec, kN, kPost>
                                   : mhc_coeffs_fwd_kernel<__half, kVec, kN, kPost>;
          allow_smem(kernel, smem);
          launch(kernel, dim3(static_cast<unsigned>(blocks)), dim3(kMhcFwdThreads), smem, p);
        });
      });
    });
    if (with_x) out.push_back(x);
    return out;
  }

  // The oracle's sequence: u = xf·phi, Σ xf² in the accumulator dtype, the epilogue
  // kernel, then x by stream_mix.
  const at::Tensor xf = H_in.reshape({N, n * d}).to(acc_type);
  const at::Tensor up = at::mm(xf, phi.to(acc_type)).contiguous();
  const at::Tensor ssp = xf.square().sum(1);
  p.m_pad = static_cast<int>(M);
  p.up_ptr = up.data_ptr();
  p.ssp_ptr = ssp.data_ptr();
  dispatch_streams<kMaxStreams, 4>(static_cast<int>(n), [&](auto kn) {
    constexpr int kN = decltype(kn)::value;
    launch_epilogue(acc_type == at::kDouble ? mhc_coeffs_fwd_epilogue_kernel<double, kN>
                                            : mhc_coeffs_fwd_epilogue_kernel<float, kN>, p, kN, 0);
  });
  if (with_x) out.push_back(stream_mix_fwd(H_in, alpha.select(-1, 0)));
  return out;
}

}  // namespace

std::vector<at::Tensor> mhc_coeffs_fwd(const at::Tensor& H, const at::Tensor& phi, const at::Tensor& a_pre,
                                       const at::Tensor& a_post, const at::Tensor& a_res, const at::Tensor& b,
                                       double eps, double pre_eps, double post_mult, int64_t iters,
                                       double sinkhorn_eps) {
  return mhc_coeffs_fwd_impl(H, phi, a_pre, a_post, a_res, b, eps, pre_eps, post_mult, iters, sinkhorn_eps, false,
                             nullptr);
}

std::vector<at::Tensor> mhc_pre_fwd(const at::Tensor& H, const at::Tensor& phi, const at::Tensor& a_pre,
                                    const at::Tensor& a_post, const at::Tensor& a_res, const at::Tensor& b,
                                    double eps, double pre_eps, double post_mult, int64_t iters,
                                    double sinkhorn_eps) {
  std::vector<at::Tensor> out =
      mhc_coeffs_fwd_impl(H, phi, a_pre, a_post, a_res, b, eps, pre_eps, post_mult, iters, sinkhorn_eps, true,
                          nullptr);
  std::rotate(out.begin(), out.end() - 1, out.end());  // x first
  return out;
}

std::vector<at::Tensor> mhc_boundary_fwd(const at::Tensor& H, const at::Tensor& y, const at::Tensor& alpha,
                                         const at::Tensor& beta, const at::Tensor& phi, const at::Tensor& a_pre,
                                         const at::Tensor& a_post, const at::Tensor& a_res, const at::Tensor& b,
                                         double eps, double pre_eps, double post_mult, int64_t iters,
                                         double sinkhorn_eps) {
  const HcPostInputs post = hc_post_inputs(H, y, alpha, beta);
  check_mhc_inputs(H, phi, a_pre, a_post, a_res, b, iters);
  const c10::cuda::CUDAGuard guard(H.device());
  // H' allocated like H; the kernel writes it in place when its token dims collapse,
  // else a contiguous scratch copied back.
  at::Tensor H_next = at::empty_like(H);
  TokenLayout layout;
  const at::Tensor H_k = writable(H_next, 2, &layout);
  const bool fused = post.sh.N > 0 && use_mma(H, H.device().index());
  if (!fused && post.sh.N > 0) H_k.copy_(hc_post_fwd(H, y, alpha, beta));
  std::vector<at::Tensor> out = mhc_coeffs_fwd_impl(H_k, phi, a_pre, a_post, a_res, b, eps, pre_eps, post_mult,
                                                    iters, sinkhorn_eps, true, fused ? &post : nullptr);
  copy_back(H_next, H_k);
  // {alpha', beta', u, r, x'} -> {H', x', alpha', beta', u, r}
  return {H_next, out[4], out[0], out[1], out[2], out[3]};
}

at::Tensor mhc_coeffs_dh_pass(MhcCoeffsParams& p, const at::Tensor& H_in, const at::Tensor& phi) {
  const int64_t n = p.n, d = p.d, N = p.n_tokens, M = p.M;
  const int device = H_in.device().index();
  const at::Tensor H = readable(H_in, 2, &p.h_tok);
  p.h_ptr = H.data_ptr();
  p.h_stream_stride = stream_stride(H);
  const RowsLd4 phi32 = fp32_rows_ld4(phi);  // read as fp32 (no packing launch)
  p.phi_ptr = phi32.t.data_ptr<float>();
  p.phi_ld = phi32.ld;
  // Token groups (common/mma_pack.h), at least kMinTilesPerGroup tiles a group (up to 64
  // tokens one group: no partial sum launch at decode sizes).
  const int64_t chunks = p.cps * n;
  const int64_t sms = device_attribute(cudaDevAttrMultiProcessorCount, device);
  const TokenGroups tg = token_groups(N, chunks, sms, kMinTilesPerGroup);
  p.token_groups = tg.groups;
  p.tiles_per_group = tg.tiles_per_group;
  at::Tensor part = at::empty({p.token_groups, n * d, M}, H.options().dtype(at::kFloat));
  p.dphi_part_ptr = part.data_ptr();
  const bool vectorize =
      vec_ok(p.h_ptr, p.h_tok, p.h_stream_stride, 8) &&
      (p.dh_ptr == nullptr || vec_ok(p.dh_ptr, p.dh_tok, p.dh_stream_stride, 8)) &&
      (p.gx_ptr == nullptr || vec_ok(p.gx_ptr, p.gx_tok, 0, 8)) &&
      (p.dh_prior_ptr == nullptr || vec_ok(p.dh_prior_ptr, p.prior_tok, p.prior_stream_stride, 8));
  const bool bf16 = H.scalar_type() == at::kBFloat16;
  const int64_t blocks = (chunks * p.token_groups + kMhcCoeffsWarps - 1) / kMhcCoeffsWarps;
  const int smem = kMhcCoeffsWarps * (bf16 ? kMmaXtStageElems<__nv_bfloat16> : kMmaXtStageElems<__half>) *
                   static_cast<int>(sizeof(__nv_bfloat16));
  CL_BOOL_SWITCH(vectorize, kVec, [&] {
    dispatch_streams<kMaxStreams, 4>(static_cast<int>(n), [&](auto kn) {
      constexpr int kDT = MhcCoeffsDphiTiles<decltype(kn)::value>::value;
      const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>((M + 8 * kDT - 1) / (8 * kDT)));
      launch(bf16 ? mhc_coeffs_bwd_dh_kernel<__nv_bfloat16, kVec, kDT> : mhc_coeffs_bwd_dh_kernel<__half, kVec, kDT>,
             grid, dim3(kMhcCoeffsThreads), smem, p);
    });
  });
  // dphi: the token groups' partials summed in group order (one group: the partial).
  return sum_partials(part);
}

std::vector<at::Tensor> mhc_coeffs_bwd(at::Tensor& dH, bool accumulate, const std::optional<at::Tensor>& prior,
                                       const std::optional<at::Tensor>& dalpha,
                                       const std::optional<at::Tensor>& dbeta,
                                       const std::optional<at::Tensor>& dpre,
                                       const std::optional<at::Tensor>& dx, const at::Tensor& H_in,
                                       const at::Tensor& phi, const at::Tensor& a_pre, const at::Tensor& a_post,
                                       const at::Tensor& a_res, const at::Tensor& b, const at::Tensor& u_in,
                                       const at::Tensor& r_in, double eps, double pre_eps, double post_mult,
                                       int64_t iters, double sinkhorn_eps) {
  const MhcShape sh = check_mhc_inputs(H_in, phi, a_pre, a_post, a_res, b, iters);
  const int64_t n = sh.n, d = sh.d, N = sh.N, M = sh.M;
  check_mhc_grads(sh, H_in, dalpha, dbeta, dx, u_in, r_in);
  if (dpre) check_per_token(*dpre, "dpre", "(..., n)", with_tail(sh.lead, {n}), H_in);
  check_activation(dH, "dH", H_in, "(..., n, d)", H_in.sizes());
  TORCH_CHECK(!(accumulate && prior), "mhc_coeffs_bwd: accumulate (dH += ...) and prior (dH = prior + ...) "
              "are exclusive");
  if (prior) check_activation(*prior, "prior", H_in, "(..., n, d)", H_in.sizes());
  const c10::cuda::CUDAGuard guard(H_in.device());
  const at::ScalarType acc_type = acc_dtype(H_in.scalar_type());
  const auto acc_opts = H_in.options().dtype(acc_type);

  if (N == 0) {
    return {at::zeros(phi.sizes(), phi.options()), at::zeros({}, a_pre.options()),
            at::zeros({}, a_post.options()), at::zeros({}, a_res.options()), at::zeros(b.sizes(), b.options())};
  }
  MhcCoeffsParams p = mhc_base_params(sh, eps, pre_eps, post_mult, iters, sinkhorn_eps);
  const MhcScaleTensors scales = mhc_scale_inputs(p, acc_type, a_pre, a_post, a_res);
  const at::Tensor b_ = b.to(acc_type).contiguous();
  const at::Tensor u = u_in.to(acc_type).contiguous();
  const at::Tensor r = r_in.to(acc_type).contiguous();
  const at::Tensor dalpha_ = dalpha ? dalpha->to(acc_type).contiguous() : at::Tensor();
  const at::Tensor dbeta_ = dbeta ? dbeta->to(acc_type).contiguous() : at::Tensor();
  const at::Tensor dpre_ = dpre ? dpre->to(acc_type).contiguous() : at::Tensor();
  p.ldu = static_cast<int>(round_up(M, 16));
  at::Tensor du = at::empty({N, p.ldu}, acc_opts);  // padding columns: zeros by the epilogue
  at::Tensor s = at::empty({N}, acc_opts);
  at::Tensor G = at::empty({N, 2 * M}, acc_opts);
  p.b_ptr = b_.data_ptr();
  p.u_ptr = const_cast<void*>(u.data_ptr());
  p.r_ptr = const_cast<void*>(r.data_ptr());
  p.dalpha_ptr = dalpha ? dalpha_.data_ptr() : nullptr;
  p.dbeta_ptr = dbeta ? dbeta_.data_ptr() : nullptr;
  p.dpre_ptr = dpre ? dpre_.data_ptr() : nullptr;
  const at::Tensor w_pre = dx ? at::empty({N, n}, acc_opts) : at::Tensor();
  p.w_pre_ptr = dx ? w_pre.data_ptr() : nullptr;
  p.du_ptr = du.data_ptr();
  p.s_ptr = s.data_ptr();
  p.g_ptr = G.data_ptr();
  const int device = H_in.device().index();

  // Sinkhorn scales: shared memory [steps][threads] when small, else a global workspace.
  const int64_t steps = 2 * iters - 1;
  const int64_t group = n == 4 ? 4 : kMaxStreams;
  const int64_t blocks = (N * group + kMhcCoeffsEpiThreads - 1) / kMhcCoeffsEpiThreads;
  const int64_t cbuf_bytes = steps * kMhcCoeffsEpiThreads * static_cast<int64_t>(at::elementSize(acc_type));
  at::Tensor cbuf;
  int smem = 0;
  if (cbuf_bytes <= kCbufSmemMax) {
    smem = static_cast<int>(cbuf_bytes);
  } else {
    cbuf = at::empty({steps, blocks * kMhcCoeffsEpiThreads}, acc_opts);
    p.cbuf_ptr = cbuf.data_ptr();
  }
  dispatch_streams<kMaxStreams, 4>(static_cast<int>(n), [&](auto kn) {
    constexpr int kN = decltype(kn)::value;
    launch_epilogue(acc_type == at::kDouble ? mhc_coeffs_bwd_epilogue_kernel<double, kN>
                                            : mhc_coeffs_bwd_epilogue_kernel<float, kN>, p, kN, smem);
  });

  // db = Σ_t dh; da_* = Σ_t Σ_{m in the group} dh·z: one token_sums launch.
  TokenSums sums(N);
  const at::Tensor db = sums.sum(G, {M}, 1, 0, 1);
  const at::Tensor da_pre = sums.sum(G, {}, 1, M, n);
  const at::Tensor da_post = sums.sum(G, {}, 1, M + n, n);
  const at::Tensor da_res = sums.sum(G, {}, 1, M + 2 * n, n * n);
  sums.run();
  const at::Tensor duM = du.narrow(1, 0, M);

  at::Tensor dphi;
  if (use_mma(H_in, device)) {
    // dH in place when its token dims collapse, else a scratch copied back (holding dH
    // first when the kernel adds to it).
    at::Tensor dH_k = writable(dH, 2, &p.dh_tok, accumulate);
    const at::Tensor prior_k = accumulate ? dH_k : prior ? readable(*prior, 2, &p.prior_tok) : at::Tensor();
    if (accumulate) p.prior_tok = p.dh_tok;
    p.dh_prior_ptr = prior_k.defined() ? prior_k.data_ptr() : nullptr;
    p.prior_stream_stride = prior_k.defined() ? stream_stride(prior_k) : 0;
    p.dh_ptr = dH_k.data_ptr();
    p.dh_stream_stride = stream_stride(dH_k);
    const at::Tensor gx = dx ? readable(*dx, 1, &p.gx_tok) : at::Tensor();
    p.gx_ptr = dx ? gx.data_ptr() : nullptr;
    dphi = mhc_coeffs_dh_pass(p, H_in, phi);
    copy_back(dH, dH_k);
  } else {
    // The oracle's form: dxf = du·phiᵀ − s·xf, dphi = xfᵀ·du, in the accumulator dtype.
    const at::Tensor xf = H_in.reshape({N, n * d}).to(acc_type);
    at::Tensor dxf = at::mm(duM, phi.to(acc_type).t()) - s.unsqueeze(1) * xf;
    if (dx) dxf = dxf + (w_pre.unsqueeze(2) * dx->reshape({N, 1, d}).to(acc_type)).view({N, n * d});
    if (accumulate) {
      dH.add_(dxf.view(H_in.sizes()));
    } else if (prior) {
      dH.copy_(dxf.view(H_in.sizes()) + prior->to(acc_type));
    } else {
      dH.copy_(dxf.view(H_in.sizes()));
    }
    dphi = at::mm(xf.t(), duM);
  }
  return {dphi.to(phi.scalar_type()).contiguous(), da_pre.to(a_pre.scalar_type()),
          da_post.to(a_post.scalar_type()), da_res.to(a_res.scalar_type()), db.to(b.scalar_type()).contiguous()};
}

}  // namespace crosslayer
