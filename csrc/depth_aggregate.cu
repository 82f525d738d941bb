// Launchers for depth_aggregate (kernels in kernels/depth_aggregate.cuh).
//
//   depth_aggregate_fwd(S: l slots (N, d), A (N, C, l) | (C, l)) -> Y (C, N, d)
//   depth_aggregate_bwd(dY (C, N, d), S, A, dS (l, N, d) mutated, accumulate) -> dA
//
// S is a list of slot tensors (common/slots.h; a stack (l, N, d) is passed as its
// unbound views).
// Shapes are checked by one validator shared by both directions. A is converted to the
// accumulator dtype (float64 for float64 activations, float32 otherwise); dA is
// returned in A's dtype and shape (summed over tokens for static (C, l) weights).
// Every launch runs on the current stream and is followed by a launch check.

#include <c10/cuda/CUDAGuard.h>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/launch.h"
#include "common/layout.h"
#include "common/slots.h"
#include "kernels/depth_aggregate.cuh"
#include "ops.h"

namespace crosslayer {
namespace {

struct DepthAggregateShape : SlotShape {
  int64_t C;
};

DepthAggregateShape check_depth_aggregate_inputs(const std::vector<at::Tensor>& S, const at::Tensor& A) {
  DepthAggregateShape sh;
  static_cast<SlotShape&>(sh) = check_slots(S, A);
  sh.C = A.size(-2);
  TORCH_CHECK(sh.C >= 1, "A must have at least one way (dim -2), got shape ", A.sizes());
  if (sh.static_weights) {
    CL_CHECK_SHAPE(A, "A", "(C, l)", sh.C, sh.l);
  } else {
    CL_CHECK_SHAPE(A, "A", "(N, C, l)", sh.N, sh.C, sh.l);
  }
  return sh;
}

// The fields both directions set: sizes, S and A.
DepthAggregateParams depth_aggregate_params(const DepthAggregateShape& sh, const std::vector<at::Tensor>& S,
                                            const at::Tensor& A) {
  DepthAggregateParams p{};
  fill_slot_params(p, sh, S, A);
  p.n_ways = static_cast<int>(sh.C);
  return p;
}

// The 16-byte path (shifted rows, any d) when the rows of a token share their shift in
// S and in `others`; else one element at a time.
template <typename T, bool kBackward>
void launch_depth_aggregate(const DepthAggregateParams& p, std::initializer_list<TokenRows> others) {
  using acc = acc_t<T>;
  const SlotRowsPath path = slot_rows_path(p.s, p.n_slots, p.n_tokens, sizeof(T), kVec16<T>, others);
  const bool vectorize = path.vectorize;
  const int vec = vectorize ? kVec16<T> : 1;
  const int ways_per_group = p.n_ways == 1 ? 1 : 4;
  // Shared memory: the weight tile a row, plus one dA partial a warp in the backward.
  const int tile_bytes = static_cast<int>(sizeof(acc)) * ways_per_group * p.n_slots;
  const TokenTileBlock b = token_tile_block(p.n_tokens, slot_row_span(p.d, path, vec), vec, tile_bytes,
                                            kBackward ? tile_bytes : 0);
  CL_BOOL_SWITCH(vectorize, kVectorize, [&] {
    constexpr int kVec = kVectorize ? kVec16<T> : 1;
    CL_BOOL_SWITCH(p.n_ways == 1, kOneWay, [&] {
      constexpr int kWays = kOneWay ? 1 : 4;
      launch(kBackward ? depth_aggregate_bwd_kernel<T, kVec, kWays> : depth_aggregate_fwd_kernel<T, kVec, kWays>,
             cover_grid(p.n_tokens, b.rows), dim3(b.threads_x, b.rows), b.smem_bytes, p);
    });
  });
}

}  // namespace

at::Tensor depth_aggregate_fwd(const std::vector<at::Tensor>& S_in, const at::Tensor& A_in) {
  const DepthAggregateShape sh = check_depth_aggregate_inputs(S_in, A_in);
  const c10::cuda::CUDAGuard guard(S_in[0].device());
  const std::vector<at::Tensor> S = kernel_slots(S_in);
  const at::Tensor A = A_in.to(acc_dtype(S[0].scalar_type()));
  at::Tensor Y = at::empty({sh.C, sh.N, sh.d}, S[0].options());
  if (sh.N == 0 || sh.d == 0) return Y;

  DepthAggregateParams p = depth_aggregate_params(sh, S, A);
  p.y_way_stride = Y.stride(0);
  p.y_token_stride = Y.stride(1);
  p.y_ptr = Y.data_ptr();

  CL_DISPATCH_FLOATING(S[0].scalar_type(), "depth_aggregate_fwd", [&] {
    launch_depth_aggregate<scalar_t, false>(p, {{p.y_ptr, p.y_token_stride, sh.C, p.y_way_stride}});
  });
  return Y;
}

at::Tensor depth_aggregate_bwd(const at::Tensor& dY_in, const std::vector<at::Tensor>& S_in,
                               const at::Tensor& A_in, const at::Tensor& dS, bool accumulate) {
  const DepthAggregateShape sh = check_depth_aggregate_inputs(S_in, A_in);
  check_activation(dY_in, "dY", S_in[0], "(C, N, d)", {sh.C, sh.N, sh.d}, "S");
  check_slot_grad(dS, S_in[0], sh);
  const c10::cuda::CUDAGuard guard(S_in[0].device());
  const std::vector<at::Tensor> S = kernel_slots(S_in);
  const at::Tensor dY = features_contiguous(dY_in);
  const at::ScalarType acc_type = acc_dtype(S[0].scalar_type());
  const at::Tensor A = A_in.to(acc_type);
  if (sh.N == 0 || sh.d == 0) {
    // Nothing to read: dS keeps (accumulate) or takes (=) a zero contribution; dA = 0.
    if (!accumulate) dS.zero_();
    return at::zeros(A_in.sizes(), A_in.options());
  }
  at::Tensor dA_tok = at::empty({sh.N, sh.C, sh.l}, A.options());

  DepthAggregateParams p = depth_aggregate_params(sh, S, A);
  p.dy_way_stride = dY.stride(0);
  p.dy_token_stride = dY.stride(1);
  p.ds_slot_stride = dS.stride(0);
  p.ds_token_stride = dS.stride(1);
  p.da_token_stride = dA_tok.stride(0);
  p.da_way_stride = dA_tok.stride(1);
  p.da_slot_stride = dA_tok.stride(2);
  p.accumulate_ds = accumulate;
  p.dy_ptr = dY.data_ptr();
  p.ds_ptr = dS.data_ptr();
  p.da_ptr = dA_tok.data_ptr();

  CL_DISPATCH_FLOATING(S[0].scalar_type(), "depth_aggregate_bwd", [&] {
    launch_depth_aggregate<scalar_t, true>(p, {{p.dy_ptr, p.dy_token_stride, sh.C, p.dy_way_stride},
                                               {p.ds_ptr, p.ds_token_stride, sh.l, p.ds_slot_stride}});
  });
  at::Tensor dA = sh.static_weights ? dA_tok.sum(0) : dA_tok;
  return dA.to(A_in.scalar_type());
}

}  // namespace crosslayer
