// Host-side checks shared by the launchers of the depth-slot ops (depth_aggregate,
// depth_aggregate_qkv_norm): the stack S (l, N, d) with its weights A, and the slot
// gradient dS written in place.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "common/checks.h"
#include "common/limits.h"

namespace crosslayer {

struct SlotShape {
  int64_t l, N, d;
  bool static_weights;  // A is (C, l), not (N, C, l)
};

// S (l, N, d): a CUDA tensor of an activation dtype, 1 <= l <= kMaxSlots; A: 2 or 3
// dims of a floating dtype on S's device (its shape is the caller's to check).
inline SlotShape check_slots(const at::Tensor& S, const at::Tensor& A) {
  CL_CHECK_CUDA(S, "S");
  CL_CHECK_SAME_DEVICE(A, S, "A", "S");
  CL_CHECK_FLOATING(S, "S");
  CL_CHECK_FLOATING(A, "A");
  CL_CHECK_DIM(S, "S", 3);
  CL_CHECK_DIM(A, "A", 2, 3);
  SlotShape sh;
  sh.l = S.size(0);
  sh.N = S.size(1);
  sh.d = S.size(2);
  sh.static_weights = A.dim() == 2;
  TORCH_CHECK(sh.l >= 1 && sh.l <= kMaxSlots, "S must hold 1 to ", kMaxSlots, " slots along dim 0, got ", sh.l);
  return sh;
}

// dS (l, N, d), accumulated or written in place: S's device, shape and dtype, and unit
// feature stride (it is not copied).
inline void check_slot_grad(const at::Tensor& dS, const at::Tensor& S, const SlotShape& sh) {
  CL_CHECK_SAME_DEVICE(dS, S, "dS", "S");
  CL_CHECK_SHAPE(dS, "dS", "(l, N, d)", sh.l, sh.N, sh.d);
  check_same_dtype(dS, "dS", S, "S");
  TORCH_CHECK(sh.d <= 1 || dS.stride(2) == 1,
              "dS must have unit stride along its feature dim (it is written in place), got strides ",
              dS.strides());
}

// The fields every slot kernel's params share: sizes, the stack S (l, N, d) and its
// weights A (a_token_stride = 0 for static (C, l) weights).
template <typename Params>
void fill_slot_params(Params& p, const SlotShape& sh, const at::Tensor& S, const at::Tensor& A) {
  const bool per_token = A.dim() == 3;
  p.n_tokens = sh.N;
  p.d = sh.d;
  p.n_slots = static_cast<int>(sh.l);
  p.s_slot_stride = S.stride(0);
  p.s_token_stride = S.stride(1);
  p.a_token_stride = per_token ? A.stride(0) : 0;
  p.a_way_stride = A.stride(per_token ? 1 : 0);
  p.a_slot_stride = A.stride(per_token ? 2 : 1);
  p.s_ptr = S.data_ptr();
  p.a_ptr = A.data_ptr();
}

}  // namespace crosslayer
