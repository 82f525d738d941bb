// Launchers of stream_mix (kernels in kernels/stream_mix.cuh).
//
//   stream_mix_fwd(H (*lead, n, d), w) -> x (*lead, d), contiguous
//   stream_mix_bwd(dH, accumulate, dx, H, w) -> dw; dH (H's shape) written (=) or added
//   to (+=) in place
//   stream_mix_dots(dx, H) -> dw (*lead, n) per token: the backward's dots alone
//
// w: (*lead, n) per token or (n,) static, any float dtype, converted to the accumulator
// dtype (float64 for float64 H, float32 otherwise); dw comes back in it with w's shape
// (summed over tokens when static, by token_sums: deterministic). Token layouts as in
// hc_post.cu. Every launch runs on the current stream and is followed by a launch check.

#include <c10/cuda/CUDAGuard.h>

#include <vector>

#include "hc_tile.h"
#include "kernels/stream_mix.cuh"
#include "ops.h"
#include "token_sums.h"

namespace crosslayer {
namespace {

// The checked inputs of both directions, the tensors the kernels read and the params
// both directions share.
struct StreamMixInputs {
  StreamShape sh;
  bool static_w;
  at::Tensor H, w;
  StreamMixParams p{};
};

StreamMixInputs stream_mix_inputs(const at::Tensor& H, const at::Tensor& w) {
  StreamMixInputs in;
  in.sh = check_streams(H);
  const StreamShape& sh = in.sh;
  in.static_w = check_coefficient(w, "w", H, sh.lead, "(n,)", "(*lead, n)", {sh.n});
  if (sh.N == 0 || sh.d == 0) return in;
  StreamMixParams& p = in.p;
  in.H = fill_tile_streams(p, sh, H);
  // Static w in the accumulator dtype is read where it lies (any element stride: SHC
  // passes a column of alpha); anything else as contiguous rows (a copy when it is not).
  const at::ScalarType acc = acc_dtype(H.scalar_type());
  in.w = in.static_w && w.scalar_type() == acc ? w : acc_rows(w, acc);
  p.w_token_stride = in.static_w ? 0 : sh.n;
  p.w_col_stride = in.static_w ? in.w.stride(-1) : 1;
  p.w_ptr = in.w.data_ptr();
  return in;
}

}  // namespace

at::Tensor stream_mix_fwd(const at::Tensor& H_in, const at::Tensor& w_in) {
  StreamMixInputs in = stream_mix_inputs(H_in, w_in);
  const c10::cuda::CUDAGuard guard(H_in.device());
  at::Tensor x = at::empty(with_tail(in.sh.lead, {in.sh.d}), H_in.options());
  if (in.sh.N == 0 || in.sh.d == 0) return x;
  StreamMixParams& p = in.p;
  collapse_token_dims(x.sizes().data(), x.strides().data(), static_cast<int>(in.sh.lead.size()), &p.x_tok);
  p.x_ptr = x.data_ptr();
  CL_DISPATCH_FLOATING(H_in.scalar_type(), "stream_mix_fwd", [&] {
    const int vec = kVec16<scalar_t>;
    const bool vectorize = vec_ok(p.h_ptr, p.h_tok, p.h_stream_stride, vec) && vec_ok(p.x_ptr, p.x_tok, 0, vec);
    launch_hc_tile<scalar_t>(p, vectorize, p.n, 0, [](auto kvec, auto kn) {
      return stream_mix_fwd_kernel<scalar_t, decltype(kvec)::value, decltype(kn)::value>;
    });
  });
  return x;
}

at::Tensor stream_mix_bwd(at::Tensor& dH, bool accumulate, const at::Tensor& dx_in, const at::Tensor& H_in,
                          const at::Tensor& w_in) {
  StreamMixInputs in = stream_mix_inputs(H_in, w_in);
  const StreamShape& sh = in.sh;
  check_activation(dH, "dH", H_in, "(*lead, n, d)", H_in.sizes());
  check_activation(dx_in, "dx", H_in, "(*lead, d)", with_tail(sh.lead, {sh.d}));
  const c10::cuda::CUDAGuard guard(H_in.device());
  const at::TensorOptions acc_opts = H_in.options().dtype(acc_dtype(H_in.scalar_type()));
  if (sh.N == 0 || sh.d == 0) return at::zeros(w_in.sizes(), acc_opts);
  at::Tensor dw_tok = at::empty({sh.N, sh.n}, acc_opts);
  StreamMixParams& p = in.p;
  const at::Tensor g = readable(dx_in, 1, &p.g_tok);
  // dH in place where the kernel can address it, else through a scratch (holding dH
  // first when the kernel adds to it) copied back.
  at::Tensor dh = writable(dH, 2, &p.dh_tok, accumulate);
  p.dh_stream_stride = stream_stride(dh);
  p.accumulate_dh = accumulate;
  p.g_ptr = g.data_ptr();
  p.dh_ptr = dh.data_ptr();
  p.dw_ptr = dw_tok.data_ptr();
  CL_DISPATCH_FLOATING(H_in.scalar_type(), "stream_mix_bwd", [&] {
    const int vec = kVec16<scalar_t>;
    const bool vectorize = vec_ok(p.h_ptr, p.h_tok, p.h_stream_stride, vec) && vec_ok(p.g_ptr, p.g_tok, 0, vec) &&
                           vec_ok(p.dh_ptr, p.dh_tok, p.dh_stream_stride, vec);
    launch_hc_tile<scalar_t>(p, vectorize, p.n, p.n, [](auto kvec, auto kn) {
      return stream_mix_bwd_kernel<scalar_t, decltype(kvec)::value, decltype(kn)::value>;
    });
  });
  copy_back(dH, dh);
  TokenSums sums(sh.N);
  const at::Tensor dw = sums.grad(dw_tok, in.static_w, w_in.sizes());
  sums.run();
  return dw;
}

at::Tensor stream_mix_dots(const at::Tensor& dx_in, const at::Tensor& H_in) {
  const StreamShape sh = check_streams(H_in);
  check_activation(dx_in, "dx", H_in, "(*lead, d)", with_tail(sh.lead, {sh.d}));
  const c10::cuda::CUDAGuard guard(H_in.device());
  const at::TensorOptions acc_opts = H_in.options().dtype(acc_dtype(H_in.scalar_type()));
  if (sh.N == 0 || sh.d == 0) return at::zeros(with_tail(sh.lead, {sh.n}), acc_opts);
  at::Tensor dw = at::empty(with_tail(sh.lead, {sh.n}), acc_opts);
  StreamMixParams p{};
  const at::Tensor H = fill_tile_streams(p, sh, H_in);
  const at::Tensor g = readable(dx_in, 1, &p.g_tok);
  p.g_ptr = g.data_ptr();
  p.dw_ptr = dw.data_ptr();  // w_ptr, dh_ptr null: the dots alone
  CL_DISPATCH_FLOATING(H_in.scalar_type(), "stream_mix_dots", [&] {
    const int vec = kVec16<scalar_t>;
    const bool vectorize = vec_ok(p.h_ptr, p.h_tok, p.h_stream_stride, vec) && vec_ok(p.g_ptr, p.g_tok, 0, vec);
    launch_hc_tile<scalar_t>(p, vectorize, p.n, p.n, [](auto kvec, auto kn) {
      return stream_mix_bwd_kernel<scalar_t, decltype(kvec)::value, decltype(kn)::value>;
    });
  });
  return dw;
}

}  // namespace crosslayer
