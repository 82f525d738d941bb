// Launchers for hc_pre of dynamic Hyper-Connections (kernels in kernels/hc_pre.cuh).
//
//   hc_pre_fwd(H (*, n, d), A (n, n+1), B (n), W (d, n+2), s_a, s_b, eps)
//       -> {x (*, d), alpha (*, n, n+1), beta (*, n), q (*, n, n+2), r (*, n)}
//   hc_pre_bwd(dx (*, d), dalpha?, dbeta?, H, A, B, W, s_a, s_b, q, r)
//       -> {dH (*, n, d), dA, dB, dW, ds_a, ds_b}
//
// One validator serves both directions. H's token dims may have any strides that
// collapse to two (TokenLayout); otherwise H is copied once. Coefficients, W, q and r
// are in the accumulator dtype (float64 for float64 H, float32 otherwise); parameter
// gradients come back in their parameter's dtype, summed over tokens from per-block
// partials by at::sum (deterministic). Every launch runs on the current stream and is
// followed by a launch check. Static HC (no W) is stream_mix (stream_mix.cu).

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/launch.h"
#include "common/layout.h"
#include "kernels/hc_pre.cuh"
#include "ops.h"

namespace crosslayer {
namespace {

using HcPreShape = StreamShape;

HcPreShape check_hc_pre_inputs(const at::Tensor& H, const at::Tensor& A, const at::Tensor& B,
                               const at::Tensor& W, const at::Tensor& s_a, const at::Tensor& s_b) {
  const HcPreShape sh = check_streams(H);
  TORCH_CHECK(sh.d >= 1, "H must have d >= 1 features for dynamic HC (its rms is over d), got ",
              H.sizes());
  check_input(A, "A", H);
  check_input(B, "B", H);
  check_input(W, "W", H);
  CL_CHECK_SHAPE(A, "A", "(n, n+1)", sh.n, sh.n + 1);
  CL_CHECK_SHAPE(B, "B", "(n,)", sh.n);
  CL_CHECK_SHAPE(W, "W", "(d, n+2)", sh.d, sh.n + 2);
  check_scalar_tensor(s_a, "s_a", H);
  check_scalar_tensor(s_b, "s_b", H);
  return sh;
}

// The inputs both directions read: params with H, W, A, B, s_a and s_b set, and the
// tensors they point into (kept alive until the launch).
struct HcPreInputs {
  HcPreParams p;
  at::Tensor H, Wt, A, B, sa, sb;
};

HcPreInputs hc_pre_params(const HcPreShape& sh, const at::Tensor& H_in, const at::Tensor& A, const at::Tensor& B,
                          const at::Tensor& W, const at::Tensor& s_a, const at::Tensor& s_b) {
  const at::ScalarType acc_type = acc_dtype(H_in.scalar_type());
  HcPreInputs in{};
  HcPreParams& p = in.p;
  in.H = readable(H_in, 2, &p.h_tok);
  p.n_tokens = sh.N;
  p.d = sh.d;
  p.n = static_cast<int>(sh.n);
  p.ldw = (sh.d + 7) / 8 * 8;
  // W transposed to (n+2, ldw), zero-padded, accumulator dtype: a thread's W chunk for
  // projection j is one aligned vector.
  in.Wt = at::constant_pad_nd(W.to(acc_type).t(), {0, p.ldw - sh.d}, 0).contiguous();
  in.A = A.to(acc_type).contiguous();
  in.B = B.to(acc_type).contiguous();
  in.sa = s_a.to(acc_type);
  in.sb = s_b.to(acc_type);
  p.h_stream_stride = stream_stride(in.H);
  p.h_ptr = in.H.data_ptr();
  p.wt_ptr = in.Wt.data_ptr();
  p.a_ptr = in.A.data_ptr();
  p.b_ptr = in.B.data_ptr();
  p.sa_ptr = in.sa.data_ptr();
  p.sb_ptr = in.sb.data_ptr();
  return in;
}

struct HcPreLaunch {
  int threads_x, rows, smem_bytes;
  bool dw_in_smem;
  int64_t grid;
};

// Block shape: a row of whole warps per token covering d in one pass of chunks where
// d allows (at most 256 threads), several tokens per block for small d.
template <typename acc, int kN>
HcPreLaunch hc_pre_block(int64_t N, int64_t d, int vec, int64_t ldw, bool backward, int device) {
  HcPreLaunch b;
  const int64_t chunks = (d + vec - 1) / vec;
  b.threads_x = static_cast<int>(std::min<int64_t>(kHcPreThreads, std::max<int64_t>(32, (chunks + 31) / 32 * 32)));
  b.rows = std::max(1, kHcPreThreads / b.threads_x);
  b.rows = static_cast<int>(std::min<int64_t>(b.rows, N));
  const int warps = b.threads_x / 32;
  const int optin = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  b.dw_in_smem = backward;
  auto bytes = [&](int rows, bool dw_in_smem) {
    return static_cast<int64_t>(hc_pre_smem_layout<kN>(rows, warps, ldw, backward, dw_in_smem).total) *
           static_cast<int64_t>(sizeof(acc));
  };
  while (b.rows > 1 && bytes(b.rows, b.dw_in_smem) > optin) --b.rows;
  if (bytes(b.rows, b.dw_in_smem) > optin) b.dw_in_smem = false;  // rows == 1 here
  const int64_t total = bytes(b.rows, b.dw_in_smem);
  TORCH_CHECK(total <= optin, "hc_pre: needs ", total, " bytes of shared memory, the device allows ",
              optin);
  b.smem_bytes = static_cast<int>(total);
  b.grid = (N + b.rows - 1) / b.rows;
  return b;
}

}  // namespace

std::vector<at::Tensor> hc_pre_fwd(const at::Tensor& H_in, const at::Tensor& A, const at::Tensor& B,
                                       const at::Tensor& W, const at::Tensor& s_a, const at::Tensor& s_b,
                                       double eps) {
  const HcPreShape sh = check_hc_pre_inputs(H_in, A, B, W, s_a, s_b);
  const c10::cuda::CUDAGuard guard(H_in.device());
  const at::ScalarType acc_type = acc_dtype(H_in.scalar_type());
  const auto acc_opts = H_in.options().dtype(acc_type);
  const int64_t n = sh.n, d = sh.d, J = n + 2;
  at::Tensor x = at::empty(with_tail(sh.lead, {d}), H_in.options());
  at::Tensor alpha = at::empty(with_tail(sh.lead, {n, n + 1}), acc_opts);
  at::Tensor beta = at::empty(with_tail(sh.lead, {n}), acc_opts);
  at::Tensor q = at::empty(with_tail(sh.lead, {n, J}), acc_opts);
  at::Tensor r = at::empty(with_tail(sh.lead, {n}), acc_opts);
  if (sh.N == 0) return {x, alpha, beta, q, r};

  HcPreInputs in = hc_pre_params(sh, H_in, A, B, W, s_a, s_b);
  HcPreParams& p = in.p;
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
        const HcPreLaunch b = hc_pre_block<acc, kN>(sh.N, d, kVec, p.ldw, false, device);
        auto kernel = hc_pre_fwd_kernel<scalar_t, kVec, kN>;
        allow_smem(kernel, b.smem_bytes);
        launch(kernel, cover_grid(b.grid, 1), dim3(b.threads_x, b.rows), b.smem_bytes, p);
      });
    });
  });
  return {x, alpha, beta, q, r};
}

std::vector<at::Tensor> hc_pre_bwd(at::Tensor& dH, bool accumulate, const at::Tensor& dx_in,
                                   const std::optional<at::Tensor>& dalpha, const std::optional<at::Tensor>& dbeta,
                                   const at::Tensor& H_in, const at::Tensor& A, const at::Tensor& B,
                                   const at::Tensor& W, const at::Tensor& s_a, const at::Tensor& s_b,
                                   const at::Tensor& q, const at::Tensor& r) {
  const HcPreShape sh = check_hc_pre_inputs(H_in, A, B, W, s_a, s_b);
  check_activation(dH, "dH", H_in, "(..., n, d)", H_in.sizes());
  const int64_t n = sh.n, d = sh.d, J = n + 2;
  const at::ScalarType acc_type = acc_dtype(H_in.scalar_type());
  check_activation(dx_in, "dx", H_in, "(..., d)", with_tail(sh.lead, {d}));
  if (dalpha) check_per_token(*dalpha, "dalpha", "(..., n, n+1)", with_tail(sh.lead, {n, n + 1}), H_in);
  if (dbeta) check_per_token(*dbeta, "dbeta", "(..., n)", with_tail(sh.lead, {n}), H_in);
  check_per_token(q, "q", "(..., n, n+2)", with_tail(sh.lead, {n, J}), H_in);
  check_per_token(r, "r", "(..., n)", with_tail(sh.lead, {n}), H_in);
  const c10::cuda::CUDAGuard guard(H_in.device());
  const auto acc_opts = H_in.options().dtype(acc_type);

  if (sh.N == 0) {
    return {at::zeros(A.sizes(), A.options()), at::zeros(B.sizes(), B.options()),
            at::zeros(W.sizes(), W.options()), at::zeros({}, s_a.options()), at::zeros({}, s_b.options())};
  }
  HcPreInputs in = hc_pre_params(sh, H_in, A, B, W, s_a, s_b);
  HcPreParams& p = in.p;
  const at::Tensor dx = readable(dx_in, 1, &p.x_tok);
  // The kernel writes dH in place when it can address it (any layout whose token dims
  // collapse, e.g. the folded one), else a scratch copied back (holding dH first when
  // the kernel adds to it).
  at::Tensor dH_k = writable(dH, 2, &p.dh_tok, accumulate);
  p.accumulate_dh = accumulate;
  const at::Tensor q_ = q.to(acc_type).contiguous();
  const at::Tensor r_ = r.to(acc_type).contiguous();
  const at::Tensor dalpha_ = dalpha ? dalpha->to(acc_type).contiguous() : at::Tensor();
  const at::Tensor dbeta_ = dbeta ? dbeta->to(acc_type).contiguous() : at::Tensor();
  p.dh_stream_stride = stream_stride(dH_k);
  p.dx_ptr = dx.data_ptr();
  p.dh_ptr = dH_k.data_ptr();
  p.q_ptr = q_.data_ptr();
  p.r_ptr = r_.data_ptr();
  p.dalpha_ptr = dalpha ? dalpha_.data_ptr() : nullptr;
  p.dbeta_ptr = dbeta ? dbeta_.data_ptr() : nullptr;

  at::Tensor dw_ws, coef_ws;
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
        HcPreLaunch b = hc_pre_block<acc, kN>(sh.N, d, kVec, p.ldw, true, device);
        auto kernel = hc_pre_bwd_kernel<scalar_t, kVec, kN>;
        allow_smem(kernel, b.smem_bytes);
        // A persistent grid: every block writes one slice of partial sums, so the
        // grid is what the device holds at once, not one block per token tile.
        b.grid = resident_grid(kernel, b.grid, b.threads_x * b.rows, b.smem_bytes, device);
        p.dw_in_smem = b.dw_in_smem;
        dw_ws = b.dw_in_smem ? at::empty({b.grid, J, p.ldw}, acc_opts) : at::zeros({b.grid, J, p.ldw}, acc_opts);
        coef_ws = at::empty({b.grid, n, static_cast<int64_t>(hc_pre_coef_stride(static_cast<int>(n)))}, acc_opts);
        p.dw_ws_ptr = dw_ws.data_ptr();
        p.coef_ws_ptr = coef_ws.data_ptr();
        launch(kernel, dim3(static_cast<unsigned>(b.grid)), dim3(b.threads_x, b.rows), b.smem_bytes, p);
      });
    });
  });
  copy_back(dH, dH_k);
  const at::Tensor dWt = dw_ws.sum(0);                  // (J, ldw)
  const at::Tensor coef = coef_ws.sum(0);               // (n, n+4)
  const at::Tensor dW = dWt.narrow(1, 0, d).t().contiguous().to(W.scalar_type());
  // Copies (copy = true), never views of coef: at n = 1 both slices are contiguous and
  // .contiguous()/.to() would return views, two outputs of the custom op sharing storage,
  // which torch.library refuses.
  const at::Tensor dA = coef.narrow(1, 0, n + 1).to(A.scalar_type(), false, true);
  const at::Tensor dB = coef.select(1, n + 1).to(B.scalar_type(), false, true);
  const at::Tensor ds_a = coef.select(1, n + 2).sum().to(s_a.scalar_type());
  const at::Tensor ds_b = coef.select(1, n + 3).sum().to(s_b.scalar_type());
  return {dA, dB, dW, ds_a, ds_b};
}

}  // namespace crosslayer
