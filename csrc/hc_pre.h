// Host side of kernels/hc_pre.cuh, shared by the launchers that run hc_pre's phases
// (hc_pre.cu, hc_boundary.h): the validator of DHC's parameters, the params they fill,
// the block shape, and the backward's workspaces and their reduction to the parameter
// gradients.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "common/checks.h"
#include "common/launch.h"
#include "common/layout.h"
#include "kernels/hc_pre.cuh"

namespace crosslayer {

// Checks H (*lead, n, d) and DHC's parameters A (n, n+1), B (n,), W (d, n+2), s_a, s_b.
inline StreamShape check_hc_pre_inputs(const at::Tensor& H, const at::Tensor& A, const at::Tensor& B,
                                       const at::Tensor& W, const at::Tensor& s_a, const at::Tensor& s_b) {
  const StreamShape sh = check_streams(H);
  TORCH_CHECK(sh.d >= 1, "H must have d >= 1 features for dynamic HC (its rms is over d), got ", H.sizes());
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

// Checks the per-token inputs of hc_pre's backward coefficient phase: q (*lead, n, n+2),
// r (*lead, n) and the optional dalpha (*lead, n, n+1), dbeta (*lead, n).
inline void check_hc_pre_bwd_coefs(const StreamShape& sh, const at::Tensor& H,
                                   const std::optional<at::Tensor>& dalpha, const std::optional<at::Tensor>& dbeta,
                                   const at::Tensor& q, const at::Tensor& r) {
  const int64_t n = sh.n;
  if (dalpha) check_per_token(*dalpha, "dalpha", "(..., n, n+1)", with_tail(sh.lead, {n, n + 1}), H);
  if (dbeta) check_per_token(*dbeta, "dbeta", "(..., n)", with_tail(sh.lead, {n}), H);
  check_per_token(q, "q", "(..., n, n+2)", with_tail(sh.lead, {n, n + 2}), H);
  check_per_token(r, "r", "(..., n)", with_tail(sh.lead, {n}), H);
}

// q, r, dalpha, dbeta as the backward kernels read them (accumulator dtype,
// contiguous; kept alive until the launch), with p pointed at them (null for an absent
// dalpha / dbeta: zero).
struct HcPreBwdCoefs {
  at::Tensor q, r, dalpha, dbeta;
};

inline HcPreBwdCoefs hc_pre_bwd_coef_inputs(HcPreParams& p, at::ScalarType acc_type,
                                            const std::optional<at::Tensor>& dalpha,
                                            const std::optional<at::Tensor>& dbeta, const at::Tensor& q,
                                            const at::Tensor& r) {
  HcPreBwdCoefs c;
  c.q = q.to(acc_type).contiguous();
  c.r = r.to(acc_type).contiguous();
  if (dalpha) c.dalpha = dalpha->to(acc_type).contiguous();
  if (dbeta) c.dbeta = dbeta->to(acc_type).contiguous();
  p.q_ptr = c.q.data_ptr();
  p.r_ptr = c.r.data_ptr();
  p.dalpha_ptr = dalpha ? c.dalpha.data_ptr() : nullptr;
  p.dbeta_ptr = dbeta ? c.dbeta.data_ptr() : nullptr;
  return c;
}

// W as the kernels read it: transposed to (n+2, ldw) in the accumulator dtype, each row
// zero-padded from d to ldw = d rounded up to 8, so a thread's W chunk for projection j
// is one aligned vector. The forward launchers pack it (one launch) and return it; the
// backward takes that tensor back instead of packing again.
inline int64_t hc_pre_ldw(int64_t d) { return (d + 7) / 8 * 8; }

// One copy either way: constant_pad_nd writes a contiguous tensor when it pads, but
// with nothing to pad it clones its (transposed) input as it is, which a second copy
// would then make contiguous.
inline at::Tensor hc_pre_pack_w(const at::Tensor& W, at::ScalarType acc_type) {
  const int64_t d = W.size(0), ldw = hc_pre_ldw(d);
  const at::Tensor wt = W.to(acc_type).t();
  return ldw == d ? wt.contiguous() : at::constant_pad_nd(wt, {0, ldw - d}, 0).contiguous();
}

// Checks a packed W handed back to a backward launcher (hc_pre_pack_w's layout).
inline void check_hc_pre_packed_w(const at::Tensor& Wt, const StreamShape& sh, at::ScalarType acc_type,
                                  const at::Tensor& H) {
  check_input(Wt, "Wt", H);
  CL_CHECK_SHAPE(Wt, "Wt (W packed by the forward)", "(n+2, ldw)", sh.n + 2, hc_pre_ldw(sh.d));
  TORCH_CHECK(Wt.scalar_type() == acc_type && Wt.is_contiguous(),
              "Wt must be the forward's packed W: contiguous ", acc_type, ", got ", Wt.scalar_type(),
              Wt.is_contiguous() ? "" : " (not contiguous)");
}

// The parameter tensors the kernels read, in the accumulator dtype (kept alive until
// the launch); Wt packed by hc_pre_pack_w.
struct HcPreWeights {
  at::Tensor Wt, A, B, sa, sb;
};

// Sets the sizes and parameter pointers of p (not H's fields) for N tokens of shape sh.
inline HcPreWeights hc_pre_weights(HcPreParams& p, const StreamShape& sh, at::ScalarType acc_type,
                                   const at::Tensor& A, const at::Tensor& B, const at::Tensor& Wt,
                                   const at::Tensor& s_a, const at::Tensor& s_b) {
  HcPreWeights w;
  p.n_tokens = sh.N;
  p.d = sh.d;
  p.n = static_cast<int>(sh.n);
  p.ldw = hc_pre_ldw(sh.d);
  w.Wt = Wt;
  w.A = A.to(acc_type).contiguous();
  w.B = B.to(acc_type).contiguous();
  w.sa = s_a.to(acc_type);
  w.sb = s_b.to(acc_type);
  p.wt_ptr = w.Wt.data_ptr();
  p.a_ptr = w.A.data_ptr();
  p.b_ptr = w.B.data_ptr();
  p.sa_ptr = w.sa.data_ptr();
  p.sb_ptr = w.sb.data_ptr();
  return w;
}

// Sets H's fields of p; returns the tensor the kernel reads (H, or its copy when the
// token dims need one: keep it alive until the launch).
inline at::Tensor hc_pre_streams(HcPreParams& p, const at::Tensor& H) {
  at::Tensor h = readable(H, 2, &p.h_tok);
  p.h_stream_stride = stream_stride(h);
  p.h_ptr = h.data_ptr();
  return h;
}

struct HcPreLaunch {
  int threads_x, rows, smem_bytes;
  bool dw_in_smem;
  int64_t grid;
};

// Block shape: a row of whole warps per token covering d in one pass of chunks where
// d allows (at most 256 threads), several tokens per block for small d. Shared memory:
// hc_pre's layout plus `extra(rows, warps)` accumulator elements (a fused kernel's
// own); rows shrink, then the backward's dW partials leave shared memory, until it
// fits the device.
template <typename acc, int kN, typename Extra>
HcPreLaunch hc_pre_block(const char* op, int64_t N, int64_t d, int vec, int64_t ldw, bool backward, int device,
                         Extra&& extra) {
  HcPreLaunch b;
  const int64_t chunks = (d + vec - 1) / vec;
  b.threads_x = static_cast<int>(std::min<int64_t>(kHcPreThreads, std::max<int64_t>(32, (chunks + 31) / 32 * 32)));
  b.rows = std::max(1, kHcPreThreads / b.threads_x);
  b.rows = static_cast<int>(std::min<int64_t>(b.rows, N));
  const int warps = b.threads_x / 32;
  const int optin = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  b.dw_in_smem = backward;
  auto bytes = [&](int rows, bool dw_in_smem) {
    return (static_cast<int64_t>(hc_pre_smem_layout<kN>(rows, warps, ldw, backward, dw_in_smem).total) +
            static_cast<int64_t>(extra(rows, warps))) *
           static_cast<int64_t>(sizeof(acc));
  };
  while (b.rows > 1 && bytes(b.rows, b.dw_in_smem) > optin) --b.rows;
  if (bytes(b.rows, b.dw_in_smem) > optin) b.dw_in_smem = false;  // rows == 1 here
  const int64_t total = bytes(b.rows, b.dw_in_smem);
  TORCH_CHECK(total <= optin, op, ": needs ", total, " bytes of shared memory, the device allows ", optin);
  b.smem_bytes = static_cast<int>(total);
  b.grid = (N + b.rows - 1) / b.rows;
  return b;
}

// hc_pre_block's `extra` for a kernel with no shared memory beyond hc_pre's.
inline int no_extra_smem(int, int) { return 0; }

// The backward's per-block partial workspaces (kept alive until the reduction).
struct HcPreWorkspaces {
  at::Tensor dw, coef;
};

// Makes the backward grid persistent (every block writes one slice of partial sums, so
// the grid is what the device holds at once), allocates the slices and points p at
// them; dW slices start zeroed only when the kernel accumulates them in place.
template <typename Kernel>
HcPreWorkspaces hc_pre_workspaces(HcPreParams& p, HcPreLaunch& b, Kernel kernel, const at::TensorOptions& acc_opts,
                                  int device) {
  b.grid = resident_grid(kernel, b.grid, b.threads_x * b.rows, b.smem_bytes, device);
  p.dw_in_smem = b.dw_in_smem;
  const int64_t J = p.n + 2;
  HcPreWorkspaces ws;
  ws.dw = b.dw_in_smem ? at::empty({b.grid, J, p.ldw}, acc_opts) : at::zeros({b.grid, J, p.ldw}, acc_opts);
  ws.coef = at::empty({b.grid, p.n, static_cast<int64_t>(hc_pre_coef_stride(p.n))}, acc_opts);
  p.dw_ws_ptr = ws.dw.data_ptr();
  p.coef_ws_ptr = ws.coef.data_ptr();
  return ws;
}

// Threads a block of hc_pre_param_grads_kernel.
constexpr int kHcPreParamGradsThreads = 256;

// {dA, dB, dW, ds_a, ds_b}, each in its parameter's dtype: the workspaces summed over
// blocks by hc_pre_param_grads_kernel (one launch, deterministic), then converted where
// a parameter's dtype is not the accumulator's.
inline std::vector<at::Tensor> hc_pre_param_grads(const HcPreWorkspaces& ws, int64_t n, int64_t d,
                                                  const at::Tensor& A, const at::Tensor& B, const at::Tensor& W,
                                                  const at::Tensor& s_a, const at::Tensor& s_b) {
  const at::TensorOptions acc_opts = ws.dw.options();
  at::Tensor dA = at::empty({n, n + 1}, acc_opts);
  at::Tensor dB = at::empty({n}, acc_opts);
  at::Tensor dW = at::empty({d, n + 2}, acc_opts);
  at::Tensor ds_a = at::empty({}, acc_opts);
  at::Tensor ds_b = at::empty({}, acc_opts);
  HcPreGradsParams g{};
  g.d = d;
  g.ldw = ws.dw.size(2);
  g.blocks = ws.dw.size(0);
  g.n = static_cast<int>(n);
  g.dw_ws_ptr = ws.dw.data_ptr();
  g.coef_ws_ptr = ws.coef.data_ptr();
  g.dw_ptr = dW.data_ptr();
  g.da_ptr = dA.data_ptr();
  g.db_ptr = dB.data_ptr();
  g.dsa_ptr = ds_a.data_ptr();
  g.dsb_ptr = ds_b.data_ptr();
  const int64_t outputs = d * (n + 2) + n * (n + 2) + 2;
  AT_DISPATCH_FLOATING_TYPES(ws.dw.scalar_type(), "hc_pre_param_grads", [&] {
    launch(hc_pre_param_grads_kernel<scalar_t>, cover_grid(outputs, kHcPreParamGradsThreads),
           dim3(kHcPreParamGradsThreads), 0, g);
  });
  return {dA.to(A.scalar_type()), dB.to(B.scalar_type()), dW.to(W.scalar_type()), ds_a.to(s_a.scalar_type()),
          ds_b.to(s_b.scalar_type())};
}

}  // namespace crosslayer
