// Launchers for depth_aggregate_qkv_norm (kernels in kernels/depth_aggregate_qkv_norm.cuh).
//
//   depth_aggregate_qkv_norm_fwd(S: l slots (N, d), A (N, 4, l) | (4, l), g (3, d), eps)
//       -> {Out (4, N, d), rstd (3, N)}
//   depth_aggregate_qkv_norm_bwd(dOut (4, N, d), S, A, g, rstd, dS (l, N, d) mutated,
//       accumulate) -> {dA, dg}
//
// S is a list of slot tensors (common/slots.h; a stack (l, N, d) is passed as its
// unbound views). Shapes are checked by one validator shared by both directions. A and g are converted
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
#include "common/launch.h"
#include "common/layout.h"
#include "common/slots.h"
#include "kernels/depth_aggregate_qkv_norm.cuh"
#include "ops.h"

namespace crosslayer {
namespace {

using DepthAggregateQkvNormShape = SlotShape;

DepthAggregateQkvNormShape check_depth_aggregate_qkv_norm_inputs(const std::vector<at::Tensor>& S,
                                                                 const at::Tensor& A, const at::Tensor& g) {
  const DepthAggregateQkvNormShape sh = check_slots(S, A);
  CL_CHECK_SAME_DEVICE(g, S[0], "norm_weights", "S");
  CL_CHECK_FLOATING(g, "norm_weights");
  if (sh.static_weights) {
    CL_CHECK_SHAPE(A, "A", "(4, l)", kDepthAggregateQkvNormWays, sh.l);
  } else {
    CL_CHECK_SHAPE(A, "A", "(N, 4, l)", sh.N, kDepthAggregateQkvNormWays, sh.l);
  }
  CL_CHECK_SHAPE(g, "norm_weights", "(3, d)", kDepthAggregateQkvNormNormed, sh.d);
  return sh;
}

// The fields both directions set: sizes, S, A and the padded norm weights g.
DepthAggregateQkvNormParams depth_aggregate_qkv_norm_params(const DepthAggregateQkvNormShape& sh,
                                                            const std::vector<at::Tensor>& S, const at::Tensor& A,
                                                            const at::Tensor& g, int64_t ld) {
  DepthAggregateQkvNormParams p{};
  fill_slot_params(p, sh, S, A);
  p.ld = ld;
  p.g_ptr = g.data_ptr();
  return p;
}

// The norm weights in the accumulator dtype, zero-padded to (3, ld).
at::Tensor padded_weights(const at::Tensor& g, at::ScalarType acc_type, int64_t ld) {
  return at::constant_pad_nd(g.to(acc_type), {0, ld - g.size(1)}, 0).contiguous();
}

struct DepthAggregateQkvNormLaunch {
  int threads_x, rows, smem_bytes;
  bool bufs_in_smem, stage_slots;
  int64_t grid;
};

// Block shape: a row of whole warps per token covering d in one pass of chunks where d
// allows (at most 256 threads), several tokens per block for small d. Shared memory, in
// order of preference:
//   backward: the slot stage and the rows' buffers, then the stage alone (buffers in
//     global workspaces), each only while kDepthAggregateQkvNormBwdMinBlocks blocks
//     still fit an SM: the stage saves a second read of l·d elements a token, which the
//     occupancy it costs must not give back;
//   then (forward, or no stage) the buffers while they fit the device's opt-in limit
//   (fewer rows first), else the buffers in global workspaces.
// entry_bytes: one thread's chunk of one slot, kVec·sizeof(T).
template <typename acc>
DepthAggregateQkvNormLaunch depth_aggregate_qkv_norm_block(int64_t N, int64_t d, int l, int64_t ld, int vec,
                                                           int entry_bytes, bool backward, int device) {
  DepthAggregateQkvNormLaunch b;
  const int64_t chunks = (d + vec - 1) / vec;
  b.threads_x = static_cast<int>(std::min<int64_t>(kDepthAggregateQkvNormThreads, std::max<int64_t>(32, (chunks + 31) / 32 * 32)));
  b.rows = static_cast<int>(std::min<int64_t>(std::max(1, kDepthAggregateQkvNormThreads / b.threads_x), N));
  const int warps = b.threads_x / 32;
  const int64_t optin = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  auto bytes = [&](int rows, bool in_smem, bool stage) {
    return depth_aggregate_qkv_norm_smem_layout(rows, warps, l, ld, backward, in_smem, stage ? entry_bytes : 0,
                                                static_cast<int>(sizeof(acc))).total *
           static_cast<int64_t>(sizeof(acc));
  };
  b.stage_slots = false;
  b.bufs_in_smem = true;
  if (backward) {
    constexpr int64_t kReservedPerBlock = 1024;  // taken by the driver from every block
    const int64_t per_block =
        std::min<int64_t>(optin, device_attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor, device) /
                                         kDepthAggregateQkvNormBwdMinBlocks - kReservedPerBlock);
    for (const bool in_smem : {true, false}) {
      if (bytes(b.rows, in_smem, true) <= per_block) {
        b.bufs_in_smem = in_smem;
        b.stage_slots = true;
        break;
      }
    }
  }
  if (!b.stage_slots) {
    while (b.rows > 1 && bytes(b.rows, true, false) > optin) --b.rows;
    if (bytes(b.rows, true, false) > optin) b.bufs_in_smem = false;  // rows == 1 here
  }
  const int64_t total = bytes(b.rows, b.bufs_in_smem, b.stage_slots);
  TORCH_CHECK(total <= optin, "depth_aggregate_qkv_norm: needs ", total,
              " bytes of shared memory, the device allows ", optin);
  b.smem_bytes = static_cast<int>(total);
  b.grid = (N + b.rows - 1) / b.rows;
  return b;
}

// Launches the forward or the backward kernel on a persistent grid: each block row owns
// one workspace slice; with the buffers in global memory at most kWorkspaceBlocksPerSm
// blocks per SM, which bounds the workspaces at 4·SMs·3·ld accumulator elements each. Returns the backward's
// dg workspace (one partial per block row, for the caller to sum); the stash workspace
// is released after the launch (the allocator is stream-ordered).
constexpr int kWorkspaceBlocksPerSm = 4;
template <typename T, bool kBackward>
at::Tensor launch_depth_aggregate_qkv_norm(DepthAggregateQkvNormParams& p, const SlotRowsPath& path,
                                           const at::TensorOptions& ws_opts, int device) {
  at::Tensor dg_ws, stash_ws;
  // Three kernels per direction: one element at a time, 16-byte chunks, shifted 16-byte
  // chunks (any d).
  CL_BOOL_SWITCH(path.vectorize, kVectorize, [&] {
    CL_BOOL_SWITCH(path.shifted, kShiftedRows, [&] {
      constexpr int kVec = kVectorize ? kVec16<T> : 1;
      constexpr bool kShifted = kVectorize && kShiftedRows;
      DepthAggregateQkvNormLaunch b = depth_aggregate_qkv_norm_block<acc_t<T>>(
          p.n_tokens, slot_row_span(p.d, path, kVec), p.n_slots, p.ld, kVec, kVec * static_cast<int>(sizeof(T)),
          kBackward, device);
      auto kernel = !kBackward      ? depth_aggregate_qkv_norm_fwd_kernel<T, kVec, kShifted>
                    : b.stage_slots ? depth_aggregate_qkv_norm_bwd_kernel<T, kVec, kShifted, true>
                                    : depth_aggregate_qkv_norm_bwd_kernel<T, kVec, kShifted, false>;
      allow_smem(kernel, b.smem_bytes);
      b.grid = resident_grid(kernel, b.grid, b.threads_x * b.rows, b.smem_bytes, device,
                             b.bufs_in_smem ? std::numeric_limits<int>::max() : kWorkspaceBlocksPerSm);
      p.bufs_in_smem = b.bufs_in_smem;
      const int64_t slices = b.grid * b.rows;
      if (kBackward) {
        dg_ws = at::empty({slices, kDepthAggregateQkvNormNormed, p.ld}, ws_opts);
        p.dg_ws_ptr = dg_ws.data_ptr();
      }
      if (!b.bufs_in_smem) {
        stash_ws = at::empty({slices, kDepthAggregateQkvNormNormed, p.ld}, ws_opts);
        p.stash_ws_ptr = stash_ws.data_ptr();
      }
      launch(kernel, dim3(static_cast<unsigned>(b.grid)), dim3(b.threads_x, b.rows), b.smem_bytes, p);
    });
  });
  return dg_ws;
}

}  // namespace

std::vector<at::Tensor> depth_aggregate_qkv_norm_fwd(const std::vector<at::Tensor>& S_in, const at::Tensor& A_in,
                                                 const at::Tensor& g_in, double eps) {
  const DepthAggregateQkvNormShape sh = check_depth_aggregate_qkv_norm_inputs(S_in, A_in, g_in);
  const c10::cuda::CUDAGuard guard(S_in[0].device());
  const std::vector<at::Tensor> S = kernel_slots(S_in);
  const at::ScalarType acc_type = acc_dtype(S[0].scalar_type());
  const at::Tensor A = A_in.to(acc_type);
  at::Tensor Out = at::empty({kDepthAggregateQkvNormWays, sh.N, sh.d}, S[0].options());
  at::Tensor rstd = at::empty({kDepthAggregateQkvNormNormed, sh.N}, S[0].options().dtype(acc_type));
  if (sh.N == 0) return {Out, rstd};
  if (sh.d == 0) {  // mean over no features: rsqrt(eps), as the oracle's mean of zeros would give
    rstd.fill_(1.0 / std::sqrt(eps));
    return {Out, rstd};
  }
  const int64_t ld = depth_aggregate_qkv_norm_round8(sh.d);
  const at::Tensor g = padded_weights(g_in, acc_type, ld);

  DepthAggregateQkvNormParams p = depth_aggregate_qkv_norm_params(sh, S, A, g, ld);
  p.out_way_stride = Out.stride(0);
  p.out_token_stride = Out.stride(1);
  p.eps = eps;
  p.out_ptr = Out.data_ptr();
  p.rstd_ptr = rstd.data_ptr();

  const int device = S[0].device().index();
  CL_DISPATCH_FLOATING(S[0].scalar_type(), "depth_aggregate_qkv_norm_fwd", [&] {
    const SlotRowsPath path = slot_rows_path(p.s, sh.l, sh.N, sizeof(scalar_t), kVec16<scalar_t>,
                                             {{p.out_ptr, p.out_token_stride, kDepthAggregateQkvNormWays, p.out_way_stride}});
    launch_depth_aggregate_qkv_norm<scalar_t, false>(p, path, S[0].options().dtype(acc_type), device);
  });
  return {Out, rstd};
}

std::vector<at::Tensor> depth_aggregate_qkv_norm_bwd(const at::Tensor& dOut_in, const std::vector<at::Tensor>& S_in,
                                                 const at::Tensor& A_in, const at::Tensor& g_in,
                                                 const at::Tensor& rstd_in, const at::Tensor& dS,
                                                 bool accumulate) {
  const DepthAggregateQkvNormShape sh = check_depth_aggregate_qkv_norm_inputs(S_in, A_in, g_in);
  check_activation(dOut_in, "dOut", S_in[0], "(4, N, d)", {kDepthAggregateQkvNormWays, sh.N, sh.d}, "S");
  CL_CHECK_SAME_DEVICE(rstd_in, S_in[0], "rstd", "S");
  CL_CHECK_SHAPE(rstd_in, "rstd", "(3, N)", kDepthAggregateQkvNormNormed, sh.N);
  check_slot_grad(dS, S_in[0], sh);
  const c10::cuda::CUDAGuard guard(S_in[0].device());
  const std::vector<at::Tensor> S = kernel_slots(S_in);
  const at::Tensor dOut = features_contiguous(dOut_in);
  const at::ScalarType acc_type = acc_dtype(S[0].scalar_type());
  const at::Tensor A = A_in.to(acc_type);
  const at::Tensor rstd = rstd_in.to(acc_type).contiguous();
  if (sh.N == 0 || sh.d == 0) {
    // Nothing to read: dS keeps (accumulate) or takes (=) a zero contribution; dA, dg = 0.
    if (!accumulate) dS.zero_();
    return {at::zeros(A_in.sizes(), A_in.options()), at::zeros(g_in.sizes(), g_in.options())};
  }
  const int64_t ld = depth_aggregate_qkv_norm_round8(sh.d);
  const at::Tensor g = padded_weights(g_in, acc_type, ld);
  at::Tensor dA_tok = at::empty({sh.N, kDepthAggregateQkvNormWays, sh.l}, A.options());

  DepthAggregateQkvNormParams p = depth_aggregate_qkv_norm_params(sh, S, A, g, ld);
  p.dout_way_stride = dOut.stride(0);
  p.dout_token_stride = dOut.stride(1);
  p.ds_slot_stride = dS.stride(0);
  p.ds_token_stride = dS.stride(1);
  p.accumulate_ds = accumulate;
  p.rstd_ptr = const_cast<void*>(rstd.data_ptr());
  p.dout_ptr = dOut.data_ptr();
  p.ds_ptr = dS.data_ptr();
  p.da_ptr = dA_tok.data_ptr();

  const int device = S[0].device().index();
  at::Tensor dg_ws;
  CL_DISPATCH_FLOATING(S[0].scalar_type(), "depth_aggregate_qkv_norm_bwd", [&] {
    const SlotRowsPath path =
        slot_rows_path(p.s, sh.l, sh.N, sizeof(scalar_t), kVec16<scalar_t>,
                       {{p.dout_ptr, p.dout_token_stride, kDepthAggregateQkvNormWays, p.dout_way_stride},
                        {p.ds_ptr, p.ds_token_stride, sh.l, p.ds_slot_stride}});
    dg_ws = launch_depth_aggregate_qkv_norm<scalar_t, true>(p, path, S[0].options().dtype(acc_type), device);
  });
  const at::Tensor dA = sh.static_weights ? dA_tok.sum(0) : dA_tok;
  const at::Tensor dg = dg_ws.sum(0).narrow(1, 0, sh.d);
  return {dA.to(A_in.scalar_type()), dg.to(g_in.scalar_type()).contiguous()};
}

}  // namespace crosslayer
