// Host entry points of crosslayer._C, one block per op family. Each is implemented in
// the family's launcher (<family>.cu) and bound in bindings.cpp.
#pragma once

#include <ATen/ATen.h>

namespace crosslayer {

// depth_aggregate.cu
//   S (l, N, d) activations; A (N, C, l) per-token or (C, l) static weights.
//   Returns Y (C, N, d) with Y_c = Σ_j A[.., c, j]·S_j.
at::Tensor depth_aggregate_fwd(const at::Tensor& S, const at::Tensor& A);
//   dY (C, N, d). Writes (accumulate = false) or adds (true) Σ_c A[.., c, j]·dY_c into
//   dS (l, N, d) in place; returns dA with A's shape and dtype (summed over tokens for
//   static A).
at::Tensor depth_aggregate_bwd(const at::Tensor& dY, const at::Tensor& S, const at::Tensor& A,
                               const at::Tensor& dS, bool accumulate);

}  // namespace crosslayer
