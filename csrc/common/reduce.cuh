// Warp-level reductions for the torch-free kernels. All lanes of the warp take part
// and all receive the result; the order of additions is fixed, so results are
// bit-reproducible run to run.
#pragma once

namespace crosslayer {

constexpr int kWarpSize = 32;

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  return x;
}

}  // namespace crosslayer
