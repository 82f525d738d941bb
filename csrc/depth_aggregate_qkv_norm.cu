// Launchers for depth_aggregate_qkv_norm (kernels in kernels/depth_aggregate_qkv_norm.cuh).
//
//   depth_aggregate_qkv_norm_fwd(S (l, N, d), A (N, 4, l) | (4, l), g (3, d), eps)
//       -> {Out (4, N, d), rstd (3, N)}
//   depth_aggregate_qkv_norm_bwd(dOut (4, N, d), S, A, g, rstd, dS (l, N, d) mutated,
//       accumulate) -> {dA, dg}
//
// Shapes are checked by one validator shared by both directions. A and g are converted
// to the accumulator dtype (float64 for float64 activations, float32 otherwise), g
// padded to (3, ld) with zeros; rstd is in the accumulator dtype; dA comes back in A's
// dtype and shape (summed over tokens for static (4, l) weights), dg in g's dtype,
// summed over the per-(block, row) workspace slices by at::sum (deterministic).
// Grids are persistent (what the device holds at once): every block row owns one
// workspace slice. Every launch runs on the current stream and is followed by a launch
// check; no host synchronisation.

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/layout.h"
#include "common/launch.h"
#include "kernels/depth_aggregate_qkv_norm.cuh"
#include "ops.h"

namespace crosslayer {
namespace {

struct DaNormShape {
  int64_t l, N, d;
  bool static_weights;
};

DaNormShape check_depth_aggregate_qkv_norm_inputs(const at::Tensor& S, const at::Tensor& A,
                                              const at::Tensor& g) {
  CL_CHECK_CUDA(S, "S");
  CL_CHECK_SAME_DEVICE(A, S, "A", "S");
  CL_CHECK_SAME_DEVICE(g, S, "norm_weights", "S");
  CL_CHECK_FLOATING(S, "S");
  CL_CHECK_FLOATING(A, "A");
  CL_CHECK_FLOATING(g, "norm_weights");
  CL_CHECK_DIM(S, "S", 3);
  CL_CHECK_DIM(A, "A", 2, 3);
  DaNormShape sh;
  sh.l = S.size(0);
  sh.N = S.size(1);
  sh.d = S.size(2);
  sh.static_weights = A.dim() == 2;
  TORCH_CHECK(sh.l >= 1 && sh.l <= kMaxSlots, "S must hold 1 to ", kMaxSlots,
              " slots along dim 0, got ", sh.l);
  if (sh.static_weights) {
    CL_CHECK_SHAPE(A, "A", "(4, l)", kDaNormWays, sh.l);
  } else {
    CL_CHECK_SHAPE(A, "A", "(N, 4, l)", sh.N, kDaNormWays, sh.l);
  }
  CL_CHECK_SHAPE(g, "norm_weights", "(3, d)", kDaNormNormed, sh.d);
  return sh;
}

void set_weight_strides(DaNormParams& p, const at::Tensor& A) {
  const bool per_token = A.dim() == 3;
  p.a_token_stride = per_token ? A.stride(0) : 0;
  p.a_way_stride = A.stride(per_token ? 1 : 0);
  p.a_slot_stride = A.stride(per_token ? 2 : 1);
}

// The norm weights in the accumulator dtype, zero-padded to (3, ld).
at::Tensor padded_weights(const at::Tensor& g, at::ScalarType acc_type, int64_t ld) {
  return at::constant_pad_nd(g.to(acc_type), {0, ld - g.size(1)}, 0).contiguous();
}

struct DaNormLaunch {
  int threads_x, rows, smem_bytes;
  bool bufs_in_smem;
  int64_t grid;
};

// Block shape: a row of whole warps per token covering d in one pass of chunks where d
// allows (at most 256 threads), several tokens per block for small d; the rows' buffers
// in shared memory while they fit the device's opt-in limit (fewer rows first).
template <typename acc>
DaNormLaunch da_norm_block(int64_t N, int64_t d, int l, int64_t ld, int vec, bool backward, int device) {
  DaNormLaunch b;
  const int64_t chunks = (d + vec - 1) / vec;
  b.threads_x = static_cast<int>(std::min<int64_t>(kDaNormThreads, std::max<int64_t>(32, (chunks + 31) / 32 * 32)));
  b.rows = static_cast<int>(std::min<int64_t>(std::max(1, kDaNormThreads / b.threads_x), N));
  const int warps = b.threads_x / 32;
  const int64_t optin = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  auto bytes = [&](int rows, bool in_smem) {
    return da_norm_smem_layout(rows, warps, l, ld, backward, in_smem).total * static_cast<int64_t>(sizeof(acc));
  };
  b.bufs_in_smem = true;
  while (b.rows > 1 && bytes(b.rows, true) > optin) --b.rows;
  if (bytes(b.rows, true) > optin) b.bufs_in_smem = false;  // rows == 1 here
  const int64_t total = bytes(b.rows, b.bufs_in_smem);
  TORCH_CHECK(total <= optin, "depth_aggregate_qkv_norm: needs ", total,
              " bytes of shared memory, the device allows ", optin);
  b.smem_bytes = static_cast<int>(total);
  b.grid = (N + b.rows - 1) / b.rows;
  return b;
}

// Persistent grid: at most what the device holds at once (each block row owns one
// workspace slice); with the buffers in global memory at most 4 blocks per SM, which
// bounds the workspaces at 4·SMs·3·ld accumulator elements each.
template <typename Kernel>
int64_t persistent_grid(Kernel kernel, const DaNormLaunch& b, int device) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, b.threads_x * b.rows,
                                                               b.smem_bytes));
  per_sm = std::max(per_sm, 1);
  if (!b.bufs_in_smem) per_sm = std::min(per_sm, 4);
  const int64_t sms = device_attribute(cudaDevAttrMultiProcessorCount, device);
  return std::min<int64_t>(b.grid, per_sm * sms);
}

}  // namespace

std::vector<at::Tensor> depth_aggregate_qkv_norm_fwd(const at::Tensor& S_in, const at::Tensor& A_in,
                                                 const at::Tensor& g_in, double eps) {
  const DaNormShape sh = check_depth_aggregate_qkv_norm_inputs(S_in, A_in, g_in);
  const c10::cuda::CUDAGuard guard(S_in.device());
  const at::Tensor S = features_contiguous(S_in);
  const at::ScalarType acc_type = acc_dtype(S.scalar_type());
  const at::Tensor A = A_in.to(acc_type);
  at::Tensor Out = at::empty({kDaNormWays, sh.N, sh.d}, S.options());
  at::Tensor rstd = at::empty({kDaNormNormed, sh.N}, S.options().dtype(acc_type));
  if (sh.N == 0) return {Out, rstd};
  if (sh.d == 0) {  // mean over no features: rsqrt(eps), as the oracle's mean of zeros would give
    rstd.fill_(1.0 / std::sqrt(eps));
    return {Out, rstd};
  }
  const int64_t ld = da_norm_round8(sh.d);
  const at::Tensor g = padded_weights(g_in, acc_type, ld);

  DaNormParams p{};
  p.n_tokens = sh.N;
  p.d = sh.d;
  p.ld = ld;
  p.n_slots = static_cast<int>(sh.l);
  p.s_slot_stride = S.stride(0);
  p.s_token_stride = S.stride(1);
  set_weight_strides(p, A);
  p.out_way_stride = Out.stride(0);
  p.out_token_stride = Out.stride(1);
  p.eps = eps;
  p.s_ptr = S.data_ptr();
  p.a_ptr = A.data_ptr();
  p.g_ptr = g.data_ptr();
  p.out_ptr = Out.data_ptr();
  p.rstd_ptr = rstd.data_ptr();

  const int device = S.device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor stash_ws;
  CL_DISPATCH_FLOATING(S.scalar_type(), "depth_aggregate_qkv_norm_fwd", [&] {
    using acc = acc_t<scalar_t>;
    const int vec = kVec16<scalar_t>;
    const bool vectorize = vec_ok(p.s_ptr, {{sh.l, p.s_slot_stride}, {sh.N, p.s_token_stride}}, vec) &&
                           vec_ok(p.out_ptr, {{kDaNormWays, p.out_way_stride}, {sh.N, p.out_token_stride}}, vec);
    CL_BOOL_SWITCH(vectorize, kVectorize, [&] {
      constexpr int kVec = kVectorize ? kVec16<scalar_t> : 1;
      DaNormLaunch b = da_norm_block<acc>(sh.N, sh.d, p.n_slots, ld, kVec, false, device);
      auto kernel = depth_aggregate_qkv_norm_fwd_kernel<scalar_t, kVec>;
      allow_smem(kernel, b.smem_bytes);
      b.grid = persistent_grid(kernel, b, device);
      p.bufs_in_smem = b.bufs_in_smem;
      if (!b.bufs_in_smem) {
        stash_ws = at::empty({b.grid * b.rows, kDaNormNormed, ld}, S.options().dtype(acc_type));
        p.stash_ws_ptr = stash_ws.data_ptr();
      }
      kernel<<<dim3(static_cast<unsigned>(b.grid)), dim3(b.threads_x, b.rows), b.smem_bytes, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {Out, rstd};
}

std::vector<at::Tensor> depth_aggregate_qkv_norm_bwd(const at::Tensor& dOut_in, const at::Tensor& S_in,
                                                 const at::Tensor& A_in, const at::Tensor& g_in,
                                                 const at::Tensor& rstd_in, const at::Tensor& dS,
                                                 bool accumulate) {
  const DaNormShape sh = check_depth_aggregate_qkv_norm_inputs(S_in, A_in, g_in);
  CL_CHECK_SAME_DEVICE(dOut_in, S_in, "dOut", "S");
  CL_CHECK_SAME_DEVICE(rstd_in, S_in, "rstd", "S");
  CL_CHECK_SAME_DEVICE(dS, S_in, "dS", "S");
  CL_CHECK_SHAPE(dOut_in, "dOut", "(4, N, d)", kDaNormWays, sh.N, sh.d);
  CL_CHECK_SHAPE(rstd_in, "rstd", "(3, N)", kDaNormNormed, sh.N);
  CL_CHECK_SHAPE(dS, "dS", "(l, N, d)", sh.l, sh.N, sh.d);
  TORCH_CHECK(dOut_in.scalar_type() == S_in.scalar_type(), "dOut must have S's dtype ",
              S_in.scalar_type(), ", got ", dOut_in.scalar_type());
  TORCH_CHECK(dS.scalar_type() == S_in.scalar_type(), "dS must have S's dtype ", S_in.scalar_type(),
              ", got ", dS.scalar_type());
  TORCH_CHECK(sh.d <= 1 || dS.stride(2) == 1,
              "dS must have unit stride along its feature dim (it is written in place), got strides ",
              dS.strides());
  const c10::cuda::CUDAGuard guard(S_in.device());
  const at::Tensor S = features_contiguous(S_in);
  const at::Tensor dOut = features_contiguous(dOut_in);
  const at::ScalarType acc_type = acc_dtype(S.scalar_type());
  const at::Tensor A = A_in.to(acc_type);
  const at::Tensor rstd = rstd_in.to(acc_type).contiguous();
  if (sh.N == 0 || sh.d == 0) {
    // Nothing to read: dS keeps (accumulate) or takes (=) a zero contribution; dA, dg = 0.
    if (!accumulate) dS.zero_();
    return {at::zeros(A_in.sizes(), A_in.options()), at::zeros(g_in.sizes(), g_in.options())};
  }
  const int64_t ld = da_norm_round8(sh.d);
  const at::Tensor g = padded_weights(g_in, acc_type, ld);
  at::Tensor dA_tok = at::empty({sh.N, kDaNormWays, sh.l}, A.options());

  DaNormParams p{};
  p.n_tokens = sh.N;
  p.d = sh.d;
  p.ld = ld;
  p.n_slots = static_cast<int>(sh.l);
  p.s_slot_stride = S.stride(0);
  p.s_token_stride = S.stride(1);
  set_weight_strides(p, A);
  p.dout_way_stride = dOut.stride(0);
  p.dout_token_stride = dOut.stride(1);
  p.ds_slot_stride = dS.stride(0);
  p.ds_token_stride = dS.stride(1);
  p.accumulate_ds = accumulate;
  p.s_ptr = S.data_ptr();
  p.a_ptr = A.data_ptr();
  p.g_ptr = g.data_ptr();
  p.rstd_ptr = const_cast<void*>(rstd.data_ptr());
  p.dout_ptr = dOut.data_ptr();
  p.ds_ptr = dS.data_ptr();
  p.da_ptr = dA_tok.data_ptr();

  const int device = S.device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor dg_ws, stash_ws;
  CL_DISPATCH_FLOATING(S.scalar_type(), "depth_aggregate_qkv_norm_bwd", [&] {
    using acc = acc_t<scalar_t>;
    const int vec = kVec16<scalar_t>;
    const bool vectorize =
        vec_ok(p.s_ptr, {{sh.l, p.s_slot_stride}, {sh.N, p.s_token_stride}}, vec) &&
        vec_ok(p.dout_ptr, {{kDaNormWays, p.dout_way_stride}, {sh.N, p.dout_token_stride}}, vec) &&
        vec_ok(p.ds_ptr, {{sh.l, p.ds_slot_stride}, {sh.N, p.ds_token_stride}}, vec);
    CL_BOOL_SWITCH(vectorize, kVectorize, [&] {
      constexpr int kVec = kVectorize ? kVec16<scalar_t> : 1;
      DaNormLaunch b = da_norm_block<acc>(sh.N, sh.d, p.n_slots, ld, kVec, true, device);
      auto kernel = depth_aggregate_qkv_norm_bwd_kernel<scalar_t, kVec>;
      allow_smem(kernel, b.smem_bytes);
      b.grid = persistent_grid(kernel, b, device);
      p.bufs_in_smem = b.bufs_in_smem;
      const auto ws_opts = S.options().dtype(acc_type);
      dg_ws = at::empty({b.grid * b.rows, kDaNormNormed, ld}, ws_opts);
      p.dg_ws_ptr = dg_ws.data_ptr();
      if (!b.bufs_in_smem) {
        stash_ws = at::empty({b.grid * b.rows, kDaNormNormed, ld}, ws_opts);
        p.stash_ws_ptr = stash_ws.data_ptr();
      }
      kernel<<<dim3(static_cast<unsigned>(b.grid)), dim3(b.threads_x, b.rows), b.smem_bytes, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  const at::Tensor dA = sh.static_weights ? dA_tok.sum(0) : dA_tok;
  const at::Tensor dg = dg_ws.sum(0).narrow(1, 0, sh.d);
  return {dA.to(A_in.scalar_type()), dg.to(g_in.scalar_type()).contiguous()};
}

}  // namespace crosslayer
