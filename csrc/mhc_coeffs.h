// Host side of the mHC coefficients (kernels/mhc_coeffs.cuh), shared by their launchers
// (mhc_coeffs.cu; mhc_boundary_bwd.cu, the boundary's backward): the checked inputs,
// the tensor-core rule, the params every launch shares, and the dH pass.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>

#include "common/checks.h"
#include "common/launch.h"
#include "common/layout.h"
#include "common/mma_pack.h"
#include "kernels/mhc_coeffs.cuh"

namespace crosslayer {

// Smallest d on the tensor-core path (mhc_coeffs.cu's header comment).
constexpr int64_t kMmaMinD = 32;
struct MhcShape : StreamShape {
  int64_t M;
};

inline MhcShape check_mhc_inputs(const at::Tensor& H, const at::Tensor& phi, const at::Tensor& a_pre,
                          const at::Tensor& a_post, const at::Tensor& a_res, const at::Tensor& b,
                          int64_t iters) {
  MhcShape sh;
  static_cast<StreamShape&>(sh) = check_streams(H);
  TORCH_CHECK(sh.d >= 1, "H must have d >= 1 features (its rms is over n·d), got ", H.sizes());
  sh.M = sh.n * sh.n + 2 * sh.n;
  check_input(phi, "phi", H);
  CL_CHECK_SHAPE(phi, "phi", "(n·d, n²+2n)", sh.n * sh.d, sh.M);
  check_input(b, "b", H);
  CL_CHECK_SHAPE(b, "b", "(n²+2n,)", sh.M);
  check_scalar_tensor(a_pre, "a_pre", H);
  check_scalar_tensor(a_post, "a_post", H);
  check_scalar_tensor(a_res, "a_res", H);
  TORCH_CHECK(iters >= 1, "iters must be >= 1, got ", iters);
  return sh;
}

// The tensor-core path: 16-bit activations, d >= kMmaMinD, and a device with 16-bit
// mma.sync (sm 8.0+); otherwise the at::mm path computes the same product in fp32.
inline bool use_mma(const at::Tensor& H, int device) {
  const at::ScalarType t = H.scalar_type();
  return (t == at::kBFloat16 || t == at::kHalf) && H.size(-1) >= kMmaMinD && has_mma_sync_16bit(device);
}

// a_pre, a_post, a_res in the accumulator dtype (the tensors themselves when already in
// it; kept alive until the launches), with p pointed at them.
struct MhcScaleTensors {
  at::Tensor pre, post, res;
};

inline MhcScaleTensors mhc_scale_inputs(MhcCoeffsParams& p, at::ScalarType acc_type, const at::Tensor& a_pre,
                                 const at::Tensor& a_post, const at::Tensor& a_res) {
  MhcScaleTensors t{a_pre.to(acc_type), a_post.to(acc_type), a_res.to(acc_type)};
  p.a_pre_ptr = t.pre.data_ptr();
  p.a_post_ptr = t.post.data_ptr();
  p.a_res_ptr = t.res.data_ptr();
  return t;
}

// Shared fields of the params struct.
inline MhcCoeffsParams mhc_base_params(const MhcShape& sh, double eps, double pre_eps, double post_mult, int64_t iters,
                      double sinkhorn_eps) {
  MhcCoeffsParams p{};
  p.n_tokens = sh.N;
  p.d = sh.d;
  p.n = static_cast<int>(sh.n);
  p.M = static_cast<int>(sh.M);
  p.cps = round_up(sh.d, 32) / 32;
  p.iters = static_cast<int>(iters);
  p.eps = eps;
  p.pre_eps = pre_eps;
  p.post_mult = post_mult;
  p.sinkhorn_eps = sinkhorn_eps;
  return p;
}

// Blocks of a tile kernel that reads each 16-token tile (tile_bytes) a second time
// while it works on it (the fused forward, the boundary's backward): two an SM while
// their tiles take at most half the L2, so that the re-read finds them there; never
// fewer than one an SM (wide tokens then trade a part of the re-read going to HBM for
// every SM busy); never more than the tiles.
inline int64_t mhc_tile_grid(int64_t n_tokens, int64_t tile_bytes, int device) {
  const int64_t tiles = (n_tokens + 15) / 16;
  const int64_t sms = device_attribute(cudaDevAttrMultiProcessorCount, device);
  const int64_t l2 = device_attribute(cudaDevAttrL2CacheSize, device);
  return std::min({tiles, 2 * sms, std::max<int64_t>(sms, l2 / 2 / tile_bytes)});
}

// The checks both backward launchers (mhc_coeffs_bwd, mhc_boundary_bwd) make of the
// gradients they take (each optional) and of the forward's saved u and r.
inline void check_mhc_grads(const MhcShape& sh, const at::Tensor& H, const std::optional<at::Tensor>& dalpha,
                            const std::optional<at::Tensor>& dbeta, const std::optional<at::Tensor>& dx,
                            const at::Tensor& u, const at::Tensor& r) {
  if (dalpha) check_per_token(*dalpha, "dalpha", "(..., n, n+1)", with_tail(sh.lead, {sh.n, sh.n + 1}), H);
  if (dbeta) check_per_token(*dbeta, "dbeta", "(..., n)", with_tail(sh.lead, {sh.n}), H);
  if (dx) check_activation(*dx, "dx", H, "(..., d)", with_tail(sh.lead, {sh.d}));
  check_per_token(u, "u", "(..., n²+2n)", with_tail(sh.lead, {sh.M}), H);
  check_per_token(r, "r", "(...)", sh.lead, H);
}

// The dH pass of the tensor-core path (mhc_coeffs_bwd_dh_kernel over H, bf16/fp16, d >=
// kMmaMinD): dphi = Σ_t xfᵀ·du (n·d, M) fp32, returned (the token groups' partials summed
// in group order), and, when p.dh_ptr is set, dH = prior + du·phiᵀ − s·xf (+ w_pre·gx)
// through p's dh / prior / gx fields (phi read as fp32, rows padded to 4 floats when
// they are not: fp32_rows_ld4; p.phi_ptr / phi_ld set here). p's du_ptr, s_ptr, ldu
// (and w_pre_ptr with gx) are the caller's; h_ptr / h_tok / h_stream_stride are set here
// from H.
at::Tensor mhc_coeffs_dh_pass(MhcCoeffsParams& p, const at::Tensor& H, const at::Tensor& phi);

}  // namespace crosslayer
