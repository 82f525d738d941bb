// Host entry points of crosslayer._C, one block per op. Each is implemented in the op's
// launcher (<op>.cu) and bound in bindings.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

namespace crosslayer {

// depth_aggregate.cu
//   S: l slots (N, d) of activations (a list: anywhere in memory, common/slots.h);
//   A (N, C, l) per-token or (C, l) static weights.
//   Returns Y (C, N, d) with Y_c = Σ_j A[.., c, j]·S_j.
at::Tensor depth_aggregate_fwd(const std::vector<at::Tensor>& S, const at::Tensor& A);
//   dY (C, N, d). Writes (accumulate = false) or adds (true) Σ_c A[.., c, j]·dY_c into
//   dS (l, N, d) in place; returns dA with A's shape and dtype (summed over tokens for
//   static A).
at::Tensor depth_aggregate_bwd(const at::Tensor& dY, const std::vector<at::Tensor>& S, const at::Tensor& A,
                               const at::Tensor& dS, bool accumulate);

// depth_aggregate_qkv_norm.cu (MUDD block input: 4 ways q, k, v, r; q, k, v RMS-normed)
//   S: l slots (N, d); A (N, 4, l) or (4, l); norm_weights (3, d). Returns {Out (4, N, d) in S's
//   dtype, Out_c = Y_c·rsqrt(mean Y_c² + eps)·g_c (c < 3), Out_3 = Y_3 with
//   Y_c = Σ_j A[.., c, j]·S_j; rstd (3, N) in the accumulator dtype, for the backward}.
std::vector<at::Tensor> depth_aggregate_qkv_norm_fwd(const std::vector<at::Tensor>& S, const at::Tensor& A,
                                                 const at::Tensor& norm_weights, double eps);
//   dOut (4, N, d); rstd from the forward (Y is recomputed from S). Writes (accumulate =
//   false) or adds (true) the slots' gradient into dS (l, N, d) in place; returns {dA
//   (A's shape and dtype, summed over tokens for static A), dnorm_weights (3, d)}.
std::vector<at::Tensor> depth_aggregate_qkv_norm_bwd(const at::Tensor& dOut, const std::vector<at::Tensor>& S,
                                                 const at::Tensor& A, const at::Tensor& norm_weights,
                                                 const at::Tensor& rstd, const at::Tensor& dS,
                                                 bool accumulate);

// hc_post.cu, stream_mix.cu
//   H (*lead, n, d), 1 <= n <= 16, any token/stream strides; y (*lead, d) of H's dtype;
//   alpha (*lead, n, n+1) or (n, n+1); beta (*lead, n) or (n,) (coefficients of any
//   float dtype, computed in float32, float64 for float64 H).
//   Returns H' (H's layout, as empty_like(H)) with H'_k = beta_k·y + Σ_i alpha[i, 1+k]·H_i.
at::Tensor hc_post_fwd(const at::Tensor& H, const at::Tensor& y, const at::Tensor& alpha,
                       const at::Tensor& beta);
//   dH_new: H's shape and dtype. Returns {dH (H's layout), dy (*lead, d), dalpha, dbeta};
//   the coefficient grads have the coefficients' shapes (summed over tokens when static)
//   in the accumulator dtype, dalpha[..., 0] = 0.
std::vector<at::Tensor> hc_post_bwd(const at::Tensor& dH_new, const at::Tensor& H,
                                    const at::Tensor& y, const at::Tensor& alpha,
                                    const at::Tensor& beta);
// stream_mix.cu
//   H as for hc_post; w (*lead, n) or (n,). Returns x (*lead, d) = Σ_i w_i·H_i, contiguous.
at::Tensor stream_mix_fwd(const at::Tensor& H, const at::Tensor& w);
//   dH (*lead, n, d) of H's dtype, in place: dH_i = w_i·dx (accumulate false) or += (true:
//   another op's contribution to H's gradient is there); dx (*lead, d) of H's dtype.
//   Returns dw = <dx, H_i> (w's shape, summed over tokens when static, accumulator dtype).
at::Tensor stream_mix_bwd(at::Tensor& dH, bool accumulate, const at::Tensor& dx, const at::Tensor& H,
                          const at::Tensor& w);
//   dw_i = <dx, H_i> per token, (*lead, n) in the accumulator dtype: stream_mix_bwd's dots
//   without its dH (the mHC pre adds that term in mhc_coeffs_bwd's dH pass).
at::Tensor stream_mix_dots(const at::Tensor& dx, const at::Tensor& H);

// hc_pre.cu (dynamic HC; static HC is stream_mix with w = A[:, 0])
//   H (*lead, n, d), 1 <= n <= 16, d >= 1, any token/stream strides; A (n, n+1); B (n);
//   W (d, n+2); s_a, s_b 0-dim. Returns {x (*lead, d) in H's dtype, alpha (*lead, n, n+1),
//   beta (*lead, n), q = H·W (*lead, n, n+2), r = rsqrt(mean H² + eps) (*lead, n), Wt},
//   all but x in the accumulator dtype; q, r and Wt (W packed for the kernels: (n+2,
//   ldw), hc_pre.h) are what the backward needs.
std::vector<at::Tensor> hc_pre_fwd(const at::Tensor& H, const at::Tensor& A, const at::Tensor& B,
                                       const at::Tensor& W, const at::Tensor& s_a, const at::Tensor& s_b,
                                       double eps);
//   dH (*lead, n, d) of H's dtype, written in place: dH = (accumulate false) or dH +=
//   (accumulate true: another op's contribution to H's gradient is already there) the
//   gradient through hc_pre; dx (*lead, d) in H's dtype; dalpha (*lead, n, n+1) and dbeta
//   (*lead, n) optional (zero when absent); Wt, q, r from the forward. Returns {dA, dB,
//   dW, ds_a, ds_b}, summed over tokens, each in its parameter's dtype.
std::vector<at::Tensor> hc_pre_bwd(at::Tensor& dH, bool accumulate, const at::Tensor& dx,
                                   const std::optional<at::Tensor>& dalpha, const std::optional<at::Tensor>& dbeta,
                                   const at::Tensor& H, const at::Tensor& A, const at::Tensor& B,
                                   const at::Tensor& W, const at::Tensor& Wt, const at::Tensor& s_a,
                                   const at::Tensor& s_b, const at::Tensor& q, const at::Tensor& r);

// hc_boundary_fwd.cu, hc_boundary_bwd.cu (connection i's post fused with connection i+1's pre)
//   H (*lead, n, d) and y (*lead, d) as for hc_post, alpha/beta connection i's
//   coefficients (per token or static); A, B, W, s_a, s_b connection i+1's parameters as
//   for hc_pre. Returns {H' (H's layout, as empty_like(H)), x', alpha', beta', q, r, Wt}:
//   H' = hc_post(H, y, alpha, beta) and the rest hc_pre_fwd(H', ...).
std::vector<at::Tensor> hc_boundary_fwd(const at::Tensor& H, const at::Tensor& y, const at::Tensor& alpha,
                                        const at::Tensor& beta, const at::Tensor& A, const at::Tensor& B,
                                        const at::Tensor& W, const at::Tensor& s_a, const at::Tensor& s_b,
                                        double eps);
//   dH_next: the gradient of H' from its later readers (H's shape and dtype); dx' as
//   for hc_pre_bwd; dalpha', dbeta' optional (zero when absent); Wt, q, r from the forward.
//   Returns {dH (H's layout), dy (*lead, d), dalpha, dbeta, dA, dB, dW, ds_a, ds_b}:
//   dalpha, dbeta as hc_post_bwd's, the rest as hc_pre_bwd's.
std::vector<at::Tensor> hc_boundary_bwd(const at::Tensor& dH_next, const at::Tensor& dx,
                                        const std::optional<at::Tensor>& dalpha_next,
                                        const std::optional<at::Tensor>& dbeta_next, const at::Tensor& H,
                                        const at::Tensor& y, const at::Tensor& alpha, const at::Tensor& beta,
                                        const at::Tensor& A, const at::Tensor& B, const at::Tensor& W,
                                        const at::Tensor& Wt, const at::Tensor& s_a, const at::Tensor& s_b,
                                        const at::Tensor& q, const at::Tensor& r);

//   The static pre (SHC): H' as above and x' = Σ_k A'[k, 0]·H'_k, A' connection i+1's
//   (n, n+1) parameter. Returns {H', x'}; the backward {dH, dy, dalpha, dbeta, dA'} (dA'
//   of A's shape: column 0 summed over tokens, the rest 0).
std::vector<at::Tensor> hc_boundary_mix_fwd(const at::Tensor& H, const at::Tensor& y, const at::Tensor& alpha,
                                            const at::Tensor& beta, const at::Tensor& A_next);
std::vector<at::Tensor> hc_boundary_mix_bwd(const at::Tensor& dH_next, const at::Tensor& dx, const at::Tensor& H,
                                            const at::Tensor& y, const at::Tensor& alpha, const at::Tensor& beta,
                                            const at::Tensor& A_next);

// mhc_coeffs.cu (mHC coefficients; the mixing itself is stream_mix / hc_post above)
//   H (*lead, n, d), 1 <= n <= 16, d >= 1, any token/stream strides; phi (n·d, n²+2n);
//   a_pre, a_post, a_res 0-dim; b (n²+2n); iters >= 1. Returns {alpha (*lead, n, n+1)
//   (column 0 = pre, columns 1.. = Sinkhorn comb), beta (*lead, n) (= post), u = xf·phi
//   (*lead, n²+2n), r = rsqrt(mean xf² + eps) (*lead)}, all in the accumulator dtype; u
//   and r are what the backward needs.
std::vector<at::Tensor> mhc_coeffs_fwd(const at::Tensor& H, const at::Tensor& phi, const at::Tensor& a_pre,
                                       const at::Tensor& a_post, const at::Tensor& a_res, const at::Tensor& b,
                                       double eps, double pre_eps, double post_mult, int64_t iters,
                                       double sinkhorn_eps);
//   The connection's pre: {x (*lead, d) in H's dtype, alpha, beta, u, r}, x = Σ_i
//   alpha[..., i, 0]·H_i computed in the coefficients' pass over H (16-bit H, d >= 32).
std::vector<at::Tensor> mhc_pre_fwd(const at::Tensor& H, const at::Tensor& phi, const at::Tensor& a_pre,
                                    const at::Tensor& a_post, const at::Tensor& a_res, const at::Tensor& b,
                                    double eps, double pre_eps, double post_mult, int64_t iters,
                                    double sinkhorn_eps);
//   The boundary: H, y, alpha, beta connection i's post (as hc_post_fwd's), the rest as
//   mhc_coeffs_fwd's; {H' (H's layout) = hc_post(H, y, alpha, beta), x', alpha', beta',
//   u, r} of the mHC pre of H', H' mixed, written and projected in one kernel.
std::vector<at::Tensor> mhc_boundary_fwd(const at::Tensor& H, const at::Tensor& y, const at::Tensor& alpha,
                                         const at::Tensor& beta, const at::Tensor& phi, const at::Tensor& a_pre,
                                         const at::Tensor& a_post, const at::Tensor& a_res, const at::Tensor& b,
                                         double eps, double pre_eps, double post_mult, int64_t iters,
                                         double sinkhorn_eps);
// mhc_boundary_bwd.cu
//   The boundary's backward: dH_next (H''s gradient from later ops), dx', dalpha',
//   dbeta' optional (zero when absent); H, y, alpha, beta connection i's post; H', u, r
//   the forward's outputs. Returns {dH (H's layout), dy (*lead, d), dalpha, dbeta (the
//   post's coefficient shapes, accumulator dtype, summed over tokens when static),
//   dphi, da_pre, da_post, da_res, db (each in its parameter's dtype)}.
std::vector<at::Tensor> mhc_boundary_bwd(const std::optional<at::Tensor>& dH_next,
                                         const std::optional<at::Tensor>& dx,
                                         const std::optional<at::Tensor>& dalpha_next,
                                         const std::optional<at::Tensor>& dbeta_next, const at::Tensor& H,
                                         const at::Tensor& y, const at::Tensor& alpha, const at::Tensor& beta,
                                         const at::Tensor& H_next, const at::Tensor& phi, const at::Tensor& a_pre,
                                         const at::Tensor& a_post, const at::Tensor& a_res, const at::Tensor& b,
                                         const at::Tensor& u, const at::Tensor& r, double eps, double pre_eps,
                                         double post_mult, int64_t iters, double sinkhorn_eps);
//   dH (*lead, n, d) of H's dtype, written (=) or, with `accumulate`, added to (+=) in
//   place, or with `prior` (H's shape and dtype, only read) written as prior + the
//   terms; dalpha (*lead, n, n+1), dbeta (*lead, n) optional (zero when absent); dpre
//   (*lead, n) optional, a second gradient of alpha[..., 0] added to dalpha's; dx
//   (*lead, d) optional, the gradient of the pre's x = Σ_i alpha[..., i, 0]·H_i, whose dH
//   term is added in the same pass; u, r from the forward. Returns {dphi, da_pre,
//   da_post, da_res, db}, parameter gradients summed over tokens (deterministic), each in
//   its parameter's dtype.
std::vector<at::Tensor> mhc_coeffs_bwd(at::Tensor& dH, bool accumulate, const std::optional<at::Tensor>& prior,
                                       const std::optional<at::Tensor>& dalpha,
                                       const std::optional<at::Tensor>& dbeta,
                                       const std::optional<at::Tensor>& dpre,
                                       const std::optional<at::Tensor>& dx, const at::Tensor& H,
                                       const at::Tensor& phi, const at::Tensor& a_pre, const at::Tensor& a_post,
                                       const at::Tensor& a_res, const at::Tensor& b, const at::Tensor& u,
                                       const at::Tensor& r, double eps, double pre_eps, double post_mult,
                                       int64_t iters, double sinkhorn_eps);

// mudd_weights.cu
//   x (*tok, d), d >= 1, any token strides; W1 (d, K), K >= 1; W2 (K, C*l); bias (C*l,) or
//   (C, l); n_ways = C; approximate "none" (erf GELU) or "tanh". Returns {A (*tok, C, l),
//   u = rms(x)·W1 (*tok, K), r = rsqrt(mean x² + eps) (*tok)}, all in the accumulator
//   dtype; u and r are what the backward needs.
std::vector<at::Tensor> mudd_weights_fwd(const at::Tensor& x, const at::Tensor& W1, const at::Tensor& W2,
                                         const at::Tensor& bias, int64_t n_ways, double eps,
                                         const std::string& approximate);
//   dA (*tok, C, l) any float dtype; u, r from the forward. Returns {dx (*tok, d) in x's
//   dtype, dW1 in W1's dtype, dW2b (K + 1, C·l) in the arithmetic dtype: rows 0..K-1 dW2,
//   row K dbias (C-major, flattened)}, parameter gradients summed over tokens
//   (deterministic). With dx_acc (x's shape and dtype, unit feature stride or copied
//   back), dx is added into it in place (+=) and the returned dx is dx_acc.
std::vector<at::Tensor> mudd_weights_bwd(const at::Tensor& dA, const at::Tensor& x, const at::Tensor& W1,
                                         const at::Tensor& W2, const at::Tensor& bias, const at::Tensor& u,
                                         const at::Tensor& r, int64_t n_ways, double eps,
                                         const std::string& approximate, const std::optional<at::Tensor>& dx_acc);

}  // namespace crosslayer
