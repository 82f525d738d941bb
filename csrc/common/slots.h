// Host-side checks and layout shared by the launchers of the depth-slot ops
// (depth_aggregate, depth_aggregate_qkv_norm): the slots S with their weights A, and
// the slot gradient dS written in place.
//
// The launchers take the slots as a list of l tensors (N, d): a DepthStack's slots are
// the blocks' outputs where they lie, never copied into one stack; a stack (l, N, d)
// comes as its unbound views (no copy). The kernels read the list as one SlotTable of
// base pointers with one token stride.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common/checks.h"
#include "common/limits.h"
#include "kernels/phases/slot_tile.cuh"

namespace crosslayer {

struct SlotShape {
  int64_t l, N, d;
  bool static_weights;  // A is (C, l), not (N, C, l)
};

// S: 1 <= l <= kMaxSlots CUDA tensors (N, d) of one activation dtype, shape and device;
// A: 2 or 3 dims of a floating dtype on their device (its shape is the caller's to
// check).
inline SlotShape check_slots(const std::vector<at::Tensor>& S, const at::Tensor& A) {
  TORCH_CHECK(!S.empty() && S.size() <= static_cast<size_t>(kMaxSlots), "S must hold 1 to ", kMaxSlots,
              " slots, got ", S.size());
  const at::Tensor& S0 = S[0];
  CL_CHECK_CUDA(S0, "S[0]");
  CL_CHECK_FLOATING(S0, "S[0]");
  CL_CHECK_DIM(S0, "S[0]", 2);
  for (size_t j = 1; j < S.size(); ++j) {
    const std::string name = "S[" + std::to_string(j) + "]";
    check_same_device(S[j], name.c_str(), S0, "S[0]");
    check_same_dtype(S[j], name.c_str(), S0, "S[0]");
    TORCH_CHECK(S[j].sizes() == S0.sizes(), name, " must have S[0]'s shape (N, d) = ", S0.sizes(), ", got ",
                S[j].sizes());
  }
  CL_CHECK_SAME_DEVICE(A, S0, "A", "S");
  CL_CHECK_FLOATING(A, "A");
  CL_CHECK_DIM(A, "A", 2, 3);
  SlotShape sh;
  sh.l = static_cast<int64_t>(S.size());
  sh.N = S0.size(0);
  sh.d = S0.size(1);
  sh.static_weights = A.dim() == 2;
  return sh;
}

// The slots as the kernels read them: unit feature stride and one token stride. When
// some slot breaks either, every slot that is not contiguous is copied (documented in
// the ops: a strided feature dim or slots of different layouts cost one copy each).
inline std::vector<at::Tensor> kernel_slots(const std::vector<at::Tensor>& S) {
  const auto unit = [](const at::Tensor& s) { return s.size(1) <= 1 || s.stride(1) == 1; };
  bool shared = unit(S[0]);
  for (const at::Tensor& s : S) shared = shared && unit(s) && (s.size(0) <= 1 || s.stride(0) == S[0].stride(0));
  if (shared) return S;
  std::vector<at::Tensor> out;
  out.reserve(S.size());
  for (const at::Tensor& s : S) out.push_back(s.contiguous());
  return out;
}

// The kernels' table of kernel_slots' base pointers.
inline SlotTable slot_table(const std::vector<at::Tensor>& S) {
  SlotTable t{};
  for (size_t j = 0; j < S.size(); ++j) t.ptr[j] = S[j].data_ptr();
  t.token_stride = S[0].size(0) <= 1 ? 0 : S[0].stride(0);
  return t;
}

// A tensor whose token rows a slot kernel walks besides the slots (Y, dY, dS): base
// pointer, token stride, and the stride between a token's rows in it (ways, slots).
struct TokenRows {
  const void* ptr;
  int64_t token_stride;
  int64_t n_rows, row_stride;  // row_stride is ignored for one row
};

// How a slot kernel may read its rows (phases/slot_tile.cuh): in 16-byte chunks
// (vectorize) when every row of a token, in the slots and in each of `others`, lies at
// the same shift from a 16-byte boundary: one shift class of the base pointers, token
// strides equal modulo vec, the strides between rows multiples of vec. `shifted`: some
// token's rows do not start on a boundary (d or a token stride not a multiple of vec,
// or the bases off one), so the kernels' chunks start at −h_t and the rows span up to
// vec − 1 more elements.
struct SlotRowsPath {
  bool vectorize, shifted;
};

inline SlotRowsPath slot_rows_path(const SlotTable& t, int64_t l, int64_t N, int64_t elem_bytes, int vec,
                                   std::initializer_list<TokenRows> others) {
  const auto mod = [vec](int64_t x) { return ((x % vec) + vec) % vec; };
  const auto shift = [&](const void* ptr) -> int64_t {  // -1: not even element-aligned
    const auto a = static_cast<int64_t>(reinterpret_cast<uintptr_t>(ptr));
    return a % elem_bytes != 0 ? -1 : mod(a / elem_bytes);
  };
  const int64_t base = shift(t.ptr[0]);
  const int64_t token = N > 1 ? mod(t.token_stride) : 0;
  bool same = base >= 0;
  for (int64_t j = 1; j < l; ++j) same = same && shift(t.ptr[j]) == base;
  for (const TokenRows& r : others) {
    same = same && shift(r.ptr) == base && (N <= 1 || mod(r.token_stride) == token) &&
           (r.n_rows <= 1 || mod(r.row_stride) == 0);
  }
  if (!same) return {false, false};
  return {true, base != 0 || token != 0};
}

// The elements a row of threads covers for a row of d on `path`: d, or d + vec − 1 when
// the rows are shifted (the cut first chunk).
inline int64_t slot_row_span(int64_t d, const SlotRowsPath& path, int vec) {
  return path.vectorize && path.shifted ? d + vec - 1 : d;
}

// dS (l, N, d), accumulated or written in place: the slots' device, shape and dtype
// (S0: slot 0), and unit feature stride (it is not copied).
inline void check_slot_grad(const at::Tensor& dS, const at::Tensor& S0, const SlotShape& sh) {
  CL_CHECK_SAME_DEVICE(dS, S0, "dS", "S");
  CL_CHECK_SHAPE(dS, "dS", "(l, N, d)", sh.l, sh.N, sh.d);
  check_same_dtype(dS, "dS", S0, "S");
  TORCH_CHECK(sh.d <= 1 || dS.stride(2) == 1,
              "dS must have unit stride along its feature dim (it is written in place), got strides ",
              dS.strides());
}

// The fields every slot kernel's params share: sizes, the slots' table (S: kernel_slots)
// and their weights A (a_token_stride = 0 for static (C, l) weights).
template <typename Params>
void fill_slot_params(Params& p, const SlotShape& sh, const std::vector<at::Tensor>& S, const at::Tensor& A) {
  const bool per_token = A.dim() == 3;
  p.n_tokens = sh.N;
  p.d = sh.d;
  p.n_slots = static_cast<int>(sh.l);
  p.s = slot_table(S);
  p.a_token_stride = per_token ? A.stride(0) : 0;
  p.a_way_stride = A.stride(per_token ? 1 : 0);
  p.a_slot_stride = A.stride(per_token ? 2 : 1);
  p.a_ptr = A.data_ptr();
}

}  // namespace crosslayer
