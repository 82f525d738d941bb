// Launchers for the hc_mix family (kernels in kernels/hc_mix.cuh).
//
//   hc_post_fwd(H (*lead, n, d), y (*lead, d), alpha, beta) -> H' (H's layout)
//   hc_post_bwd(dH', H, y, alpha, beta) -> {dH (H's layout), dy (*lead, d), dalpha, dbeta}
//   stream_mix_fwd(H, w) -> x (*lead, d)
//   stream_mix_bwd(dx, H, w) -> {dH (H's layout), dw}
//
// alpha: (*lead, n, n+1) per token or (n, n+1) static; beta, w: (*lead, n) or (n,).
// Activations share one dtype (H's); coefficients of any float dtype are converted to
// the accumulator dtype (float64 for float64 H, float32 otherwise) and their gradients
// come back in it, with the coefficient's shape (summed over tokens when static, by
// at::sum: deterministic, no atomics). Any number of leading token dims with any
// strides that collapse to a TokenLayout runs without a copy (e.g. streams folded into
// the batch dim); other token layouts and a non-unit feature stride are copied once.
// Every launch runs on the current stream and is followed by a launch check.

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/layout.h"
#include "kernels/hc_mix.cuh"
#include "ops.h"

namespace crosslayer {
namespace {

struct HcMixShape {
  std::vector<int64_t> lead;  // token dims of H
  int64_t N, n, d;
};

void check_shape(const at::Tensor& t, const char* name, const char* what, at::IntArrayRef want) {
  TORCH_CHECK(t.sizes() == want, name, " must have shape ", what, " = ", want, ", got ", t.sizes());
}

HcMixShape check_streams(const at::Tensor& H) {
  CL_CHECK_CUDA(H, "H");
  CL_CHECK_FLOATING(H, "H");
  TORCH_CHECK(H.dim() >= 2, "H must have shape (*lead, n, d) with at least 2 dims, got ", H.sizes());
  HcMixShape sh;
  sh.n = H.size(-2);
  sh.d = H.size(-1);
  TORCH_CHECK(sh.n >= 1 && sh.n <= kMaxStreams, "H must have 1 to ", kMaxStreams,
              " streams (dim -2 of (*lead, n, d)), got n = ", sh.n, " (shape ", H.sizes(), ")");
  sh.lead.assign(H.sizes().begin(), H.sizes().end() - 2);
  sh.N = 1;
  for (int64_t s : sh.lead) sh.N *= s;
  return sh;
}

// An activation input of H's device and dtype with the given shape.
void check_activation(const at::Tensor& t, const char* name, const at::Tensor& H, const char* what,
                      at::IntArrayRef want) {
  check_same_device(t, name, H);
  TORCH_CHECK(t.scalar_type() == H.scalar_type(), name, " must have H's dtype ", H.scalar_type(),
              ", got ", t.scalar_type());
  check_shape(t, name, what, want);
}

// A coefficient: static shape or lead + static shape; returns true when static.
bool check_coeff(const at::Tensor& t, const char* name, const at::Tensor& H, const HcMixShape& sh,
                 const char* static_what, const char* token_what, std::vector<int64_t> static_shape) {
  check_same_device(t, name, H);
  check_floating(t, name);
  if (t.sizes() == at::IntArrayRef(static_shape)) return true;
  const std::vector<int64_t> per_token = [&] {
    std::vector<int64_t> v(sh.lead);
    v.insert(v.end(), static_shape.begin(), static_shape.end());
    return v;
  }();
  TORCH_CHECK(t.sizes() == at::IntArrayRef(per_token), name, " must have shape ", token_what, " = ",
              at::IntArrayRef(per_token), " (per token) or ", static_what, " = ",
              at::IntArrayRef(static_shape), " (static), got ", t.sizes());
  return false;
}

struct HcPostShape : HcMixShape {
  bool static_alpha, static_beta;
};

HcPostShape check_hc_post_inputs(const at::Tensor& H, const at::Tensor& y, const at::Tensor& alpha,
                                 const at::Tensor& beta) {
  HcPostShape sh;
  static_cast<HcMixShape&>(sh) = check_streams(H);
  check_activation(y, "y", H, "(*lead, d)", with_tail(sh.lead, {sh.d}));
  sh.static_alpha = check_coeff(alpha, "alpha", H, sh, "(n, n+1)", "(*lead, n, n+1)", {sh.n, sh.n + 1});
  sh.static_beta = check_coeff(beta, "beta", H, sh, "(n,)", "(*lead, n)", {sh.n});
  return sh;
}

struct StreamMixShape : HcMixShape {
  bool static_w;
};

StreamMixShape check_stream_mix_inputs(const at::Tensor& H, const at::Tensor& w) {
  StreamMixShape sh;
  static_cast<HcMixShape&>(sh) = check_streams(H);
  sh.static_w = check_coeff(w, "w", H, sh, "(n,)", "(*lead, n)", {sh.n});
  return sh;
}

// Coefficients in the accumulator dtype, one contiguous row per token.
at::Tensor coeff_rows(const at::Tensor& t, at::ScalarType acc) { return t.to(acc).contiguous(); }

dim3 grid_for(int64_t n_tokens, int rows) {
  const int64_t tiles = (n_tokens + rows - 1) / rows;
  return dim3(static_cast<unsigned>(std::min<int64_t>(tiles, std::numeric_limits<int>::max())));
}

// Runs `f` with `constexpr int kN` = n for n in {2, 4, 8}, 0 (generic) otherwise.
template <typename F>
void dispatch_streams(int n, F&& f) {
  switch (n) {
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: f(std::integral_constant<int, 0>{}); break;
  }
}

template <typename T, bool kBackward>
void launch_hc_post(const HcPostParams& p, bool vectorize) {
  using acc = acc_t<T>;
  const int n = p.n;
  const HcMixBlock b = hc_mix_block(p.n_tokens, p.d, vectorize ? kVec16<T> : 1, n * (n + 2),
                                    kBackward ? n * (n + 1) : 0, sizeof(acc));
  const dim3 block(b.threads_x, b.rows);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  CL_BOOL_SWITCH(vectorize, kVectorize, [&] {
    constexpr int kVec = kVectorize ? kVec16<T> : 1;
    dispatch_streams(n, [&](auto kn) {
      constexpr int kN = decltype(kn)::value;
      if constexpr (kBackward) {
        hc_post_bwd_kernel<T, kVec, kN><<<grid_for(p.n_tokens, b.rows), block, b.smem_bytes, stream>>>(p);
      } else {
        hc_post_fwd_kernel<T, kVec, kN><<<grid_for(p.n_tokens, b.rows), block, b.smem_bytes, stream>>>(p);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

template <typename T, bool kBackward>
void launch_stream_mix(const StreamMixParams& p, bool vectorize) {
  using acc = acc_t<T>;
  const int n = p.n;
  const HcMixBlock b = hc_mix_block(p.n_tokens, p.d, vectorize ? kVec16<T> : 1, n,
                                    kBackward ? n : 0, sizeof(acc));
  const dim3 block(b.threads_x, b.rows);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  CL_BOOL_SWITCH(vectorize, kVectorize, [&] {
    constexpr int kVec = kVectorize ? kVec16<T> : 1;
    dispatch_streams(n, [&](auto kn) {
      constexpr int kN = decltype(kn)::value;
      if constexpr (kBackward) {
        stream_mix_bwd_kernel<T, kVec, kN><<<grid_for(p.n_tokens, b.rows), block, b.smem_bytes, stream>>>(p);
      } else {
        stream_mix_fwd_kernel<T, kVec, kN><<<grid_for(p.n_tokens, b.rows), block, b.smem_bytes, stream>>>(p);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  const at::ScalarType acc = acc_dtype(H_in.scalar_type());

  HcPostParams p{};
  p.n_tokens = sh.N;
  p.d = sh.d;
  p.n = static_cast<int>(sh.n);
  const at::Tensor H = readable(H_in, 2, &p.h_tok);
  const at::Tensor y = readable(y_in, 1, &p.y_tok);
  const at::Tensor alpha = coeff_rows(alpha_in, acc);
  const at::Tensor beta = coeff_rows(beta_in, acc);
  at::Tensor o = writable(out, 2, &p.out_tok);
  p.h_stream_stride = stream_stride(H);
  p.out_stream_stride = stream_stride(o);
  p.a_token_stride = sh.static_alpha ? 0 : sh.n * (sh.n + 1);
  p.b_token_stride = sh.static_beta ? 0 : sh.n;
  p.h_ptr = H.data_ptr();
  p.y_ptr = y.data_ptr();
  p.a_ptr = alpha.data_ptr();
  p.b_ptr = beta.data_ptr();
  p.out_ptr = o.data_ptr();

  CL_DISPATCH_FLOATING(H.scalar_type(), "hc_post_fwd", [&] {
    const int vec = kVec16<scalar_t>;
    const bool vectorize = vec_ok(p.h_ptr, p.h_tok, p.h_stream_stride, vec) &&
                           vec_ok(p.y_ptr, p.y_tok, 0, vec) &&
                           vec_ok(p.out_ptr, p.out_tok, p.out_stream_stride, vec);
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
  const at::ScalarType acc = acc_dtype(H_in.scalar_type());
  const at::TensorOptions acc_opts = H_in.options().dtype(acc);
  at::Tensor dH = at::empty_like(H_in);
  at::Tensor dy = at::empty(with_tail(sh.lead, {sh.d}), y_in.options());
  if (sh.N == 0 || sh.d == 0) {  // dH and dy are empty; the dots over nothing are 0
    return {dH, dy, at::zeros(alpha_in.sizes(), acc_opts), at::zeros(beta_in.sizes(), acc_opts)};
  }
  at::Tensor dalpha_tok = at::empty({sh.N, sh.n, sh.n + 1}, acc_opts);
  at::Tensor dbeta_tok = at::empty({sh.N, sh.n}, acc_opts);

  HcPostParams p{};
  p.n_tokens = sh.N;
  p.d = sh.d;
  p.n = static_cast<int>(sh.n);
  const at::Tensor H = readable(H_in, 2, &p.h_tok);
  const at::Tensor y = readable(y_in, 1, &p.y_tok);
  const at::Tensor g = readable(dHn_in, 2, &p.g_tok);
  const at::Tensor alpha = coeff_rows(alpha_in, acc);
  const at::Tensor beta = coeff_rows(beta_in, acc);
  at::Tensor dh = writable(dH, 2, &p.dh_tok);
  collapse_token_dims(dy.sizes().data(), dy.strides().data(), static_cast<int>(sh.lead.size()), &p.dy_tok);
  p.h_stream_stride = stream_stride(H);
  p.g_stream_stride = stream_stride(g);
  p.dh_stream_stride = stream_stride(dh);
  p.a_token_stride = sh.static_alpha ? 0 : sh.n * (sh.n + 1);
  p.b_token_stride = sh.static_beta ? 0 : sh.n;
  p.h_ptr = H.data_ptr();
  p.y_ptr = y.data_ptr();
  p.g_ptr = g.data_ptr();
  p.a_ptr = alpha.data_ptr();
  p.b_ptr = beta.data_ptr();
  p.dh_ptr = dh.data_ptr();
  p.dy_ptr = dy.data_ptr();
  p.da_ptr = dalpha_tok.data_ptr();
  p.db_ptr = dbeta_tok.data_ptr();

  CL_DISPATCH_FLOATING(H.scalar_type(), "hc_post_bwd", [&] {
    const int vec = kVec16<scalar_t>;
    const bool vectorize = vec_ok(p.h_ptr, p.h_tok, p.h_stream_stride, vec) &&
                           vec_ok(p.y_ptr, p.y_tok, 0, vec) &&
                           vec_ok(p.g_ptr, p.g_tok, p.g_stream_stride, vec) &&
                           vec_ok(p.dh_ptr, p.dh_tok, p.dh_stream_stride, vec) &&
                           vec_ok(p.dy_ptr, p.dy_tok, 0, vec);
    launch_hc_post<scalar_t, true>(p, vectorize);
  });
  copy_back(dH, dh);
  at::Tensor dalpha = sh.static_alpha ? dalpha_tok.sum(0) : dalpha_tok.view(alpha_in.sizes());
  at::Tensor dbeta = sh.static_beta ? dbeta_tok.sum(0) : dbeta_tok.view(beta_in.sizes());
  return {dH, dy, dalpha, dbeta};
}

at::Tensor stream_mix_fwd(const at::Tensor& H_in, const at::Tensor& w_in) {
  const StreamMixShape sh = check_stream_mix_inputs(H_in, w_in);
  const c10::cuda::CUDAGuard guard(H_in.device());
  at::Tensor x = at::empty(with_tail(sh.lead, {sh.d}), H_in.options());
  if (sh.N == 0 || sh.d == 0) return x;

  StreamMixParams p{};
  p.n_tokens = sh.N;
  p.d = sh.d;
  p.n = static_cast<int>(sh.n);
  const at::Tensor H = readable(H_in, 2, &p.h_tok);
  const at::Tensor w = coeff_rows(w_in, acc_dtype(H_in.scalar_type()));
  collapse_token_dims(x.sizes().data(), x.strides().data(), static_cast<int>(sh.lead.size()), &p.x_tok);
  p.h_stream_stride = stream_stride(H);
  p.w_token_stride = sh.static_w ? 0 : sh.n;
  p.h_ptr = H.data_ptr();
  p.w_ptr = w.data_ptr();
  p.x_ptr = x.data_ptr();

  CL_DISPATCH_FLOATING(H.scalar_type(), "stream_mix_fwd", [&] {
    const int vec = kVec16<scalar_t>;
    const bool vectorize = vec_ok(p.h_ptr, p.h_tok, p.h_stream_stride, vec) &&
                           vec_ok(p.x_ptr, p.x_tok, 0, vec);
    launch_stream_mix<scalar_t, false>(p, vectorize);
  });
  return x;
}

std::vector<at::Tensor> stream_mix_bwd(const at::Tensor& dx_in, const at::Tensor& H_in,
                                       const at::Tensor& w_in) {
  const StreamMixShape sh = check_stream_mix_inputs(H_in, w_in);
  check_activation(dx_in, "dx", H_in, "(*lead, d)", with_tail(sh.lead, {sh.d}));
  const c10::cuda::CUDAGuard guard(H_in.device());
  const at::ScalarType acc = acc_dtype(H_in.scalar_type());
  const at::TensorOptions acc_opts = H_in.options().dtype(acc);
  at::Tensor dH = at::empty_like(H_in);
  if (sh.N == 0 || sh.d == 0) return {dH, at::zeros(w_in.sizes(), acc_opts)};
  at::Tensor dw_tok = at::empty({sh.N, sh.n}, acc_opts);

  StreamMixParams p{};
  p.n_tokens = sh.N;
  p.d = sh.d;
  p.n = static_cast<int>(sh.n);
  const at::Tensor H = readable(H_in, 2, &p.h_tok);
  const at::Tensor g = readable(dx_in, 1, &p.g_tok);
  const at::Tensor w = coeff_rows(w_in, acc);
  at::Tensor dh = writable(dH, 2, &p.dh_tok);
  p.h_stream_stride = stream_stride(H);
  p.dh_stream_stride = stream_stride(dh);
  p.w_token_stride = sh.static_w ? 0 : sh.n;
  p.h_ptr = H.data_ptr();
  p.w_ptr = w.data_ptr();
  p.g_ptr = g.data_ptr();
  p.dh_ptr = dh.data_ptr();
  p.dw_ptr = dw_tok.data_ptr();

  CL_DISPATCH_FLOATING(H.scalar_type(), "stream_mix_bwd", [&] {
    const int vec = kVec16<scalar_t>;
    const bool vectorize = vec_ok(p.h_ptr, p.h_tok, p.h_stream_stride, vec) &&
                           vec_ok(p.g_ptr, p.g_tok, 0, vec) &&
                           vec_ok(p.dh_ptr, p.dh_tok, p.dh_stream_stride, vec);
    launch_stream_mix<scalar_t, true>(p, vectorize);
  });
  copy_back(dH, dh);
  at::Tensor dw = sh.static_w ? dw_tok.sum(0) : dw_tok.view(w_in.sizes());
  return {dH, dw};
}

}  // namespace crosslayer
