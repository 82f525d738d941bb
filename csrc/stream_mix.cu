// Launchers for stream_mix (kernels in kernels/stream_mix.cuh).
//
//   stream_mix_fwd(H (*lead, n, d), w) -> x (*lead, d)
//   stream_mix_bwd(dx, H, w) -> {dH (H's layout), dw}
//
// w: (*lead, n) per token or (n,) static, of any float dtype, converted to the
// accumulator dtype (float64 for float64 H, float32 otherwise); dw comes back in it with
// w's shape (summed over tokens when static, by at::sum: deterministic, no atomics). Any
// number of leading token dims with any strides that collapse to a TokenLayout runs
// without a copy; other token layouts and a non-unit feature stride are copied once.
// Every launch runs on the current stream and is followed by a launch check.

#include <c10/cuda/CUDAGuard.h>

#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/launch.h"
#include "common/layout.h"
#include "kernels/stream_mix.cuh"
#include "ops.h"

namespace crosslayer {
namespace {

struct StreamMixShape : StreamShape {
  bool static_w;
};

StreamMixShape check_stream_mix_inputs(const at::Tensor& H, const at::Tensor& w) {
  StreamMixShape sh;
  static_cast<StreamShape&>(sh) = check_streams(H, "(*lead, n, d)");
  sh.static_w = check_coefficient(w, "w", H, sh.lead, "(n,)", "(*lead, n)", {sh.n});
  return sh;
}

// The inputs both directions read: params with H and w set, and the tensors they point
// into (kept alive until the launch).
struct StreamMixInputs {
  StreamMixParams p;
  at::Tensor H, w;
};

StreamMixInputs stream_mix_params(const StreamMixShape& sh, const at::Tensor& H_in, const at::Tensor& w_in) {
  StreamMixInputs in{};
  StreamMixParams& p = in.p;
  p.n_tokens = sh.N;
  p.d = sh.d;
  p.n = static_cast<int>(sh.n);
  in.H = readable(H_in, 2, &p.h_tok);
  in.w = acc_rows(w_in, acc_dtype(H_in.scalar_type()));
  p.h_stream_stride = stream_stride(in.H);
  p.w_token_stride = sh.static_w ? 0 : sh.n;
  p.h_ptr = in.H.data_ptr();
  p.w_ptr = in.w.data_ptr();
  return in;
}

template <typename T, bool kBackward>
void launch_stream_mix(const StreamMixParams& p, bool vectorize) {
  const int n = p.n;
  const HcStreamTile b =
      hc_stream_tile(p.n_tokens, p.d, vectorize ? kVec16<T> : 1, n, kBackward ? n : 0, sizeof(acc_t<T>));
  CL_BOOL_SWITCH(vectorize, kVectorize, [&] {
    constexpr int kVec = kVectorize ? kVec16<T> : 1;
    dispatch_streams<0, 2, 4, 8>(n, [&](auto kn) {
      constexpr int kN = decltype(kn)::value;
      launch(kBackward ? stream_mix_bwd_kernel<T, kVec, kN> : stream_mix_fwd_kernel<T, kVec, kN>,
             cover_grid(p.n_tokens, b.rows), dim3(b.threads_x, b.rows), b.smem_bytes, p);
    });
  });
}

}  // namespace

at::Tensor stream_mix_fwd(const at::Tensor& H_in, const at::Tensor& w_in) {
  const StreamMixShape sh = check_stream_mix_inputs(H_in, w_in);
  const c10::cuda::CUDAGuard guard(H_in.device());
  at::Tensor x = at::empty(with_tail(sh.lead, {sh.d}), H_in.options());
  if (sh.N == 0 || sh.d == 0) return x;

  StreamMixInputs in = stream_mix_params(sh, H_in, w_in);
  StreamMixParams& p = in.p;
  collapse_token_dims(x.sizes().data(), x.strides().data(), static_cast<int>(sh.lead.size()), &p.x_tok);
  p.x_ptr = x.data_ptr();

  CL_DISPATCH_FLOATING(H_in.scalar_type(), "stream_mix_fwd", [&] {
    const int vec = kVec16<scalar_t>;
    const bool vectorize = vec_ok(p.h_ptr, p.h_tok, p.h_stream_stride, vec) && vec_ok(p.x_ptr, p.x_tok, 0, vec);
    launch_stream_mix<scalar_t, false>(p, vectorize);
  });
  return x;
}

std::vector<at::Tensor> stream_mix_bwd(const at::Tensor& dx_in, const at::Tensor& H_in,
                                       const at::Tensor& w_in) {
  const StreamMixShape sh = check_stream_mix_inputs(H_in, w_in);
  check_activation(dx_in, "dx", H_in, "(*lead, d)", with_tail(sh.lead, {sh.d}));
  const c10::cuda::CUDAGuard guard(H_in.device());
  const at::TensorOptions acc_opts = H_in.options().dtype(acc_dtype(H_in.scalar_type()));
  at::Tensor dH = at::empty_like(H_in);
  if (sh.N == 0 || sh.d == 0) return {dH, at::zeros(w_in.sizes(), acc_opts)};
  at::Tensor dw_tok = at::empty({sh.N, sh.n}, acc_opts);

  StreamMixInputs in = stream_mix_params(sh, H_in, w_in);
  StreamMixParams& p = in.p;
  const at::Tensor g = readable(dx_in, 1, &p.g_tok);
  at::Tensor dh = writable(dH, 2, &p.dh_tok);
  p.dh_stream_stride = stream_stride(dh);
  p.g_ptr = g.data_ptr();
  p.dh_ptr = dh.data_ptr();
  p.dw_ptr = dw_tok.data_ptr();

  CL_DISPATCH_FLOATING(H_in.scalar_type(), "stream_mix_bwd", [&] {
    const int vec = kVec16<scalar_t>;
    const bool vectorize = vec_ok(p.h_ptr, p.h_tok, p.h_stream_stride, vec) && vec_ok(p.g_ptr, p.g_tok, 0, vec) &&
                           vec_ok(p.dh_ptr, p.dh_tok, p.dh_stream_stride, vec);
    launch_stream_mix<scalar_t, true>(p, vectorize);
  });
  copy_back(dH, dh);
  at::Tensor dw = sh.static_w ? dw_tok.sum(0) : dw_tok.view(w_in.sizes());
  return {dH, dw};
}

}  // namespace crosslayer
