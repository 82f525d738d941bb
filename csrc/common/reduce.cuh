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

// One butterfly step of a warp reduce-scatter, exchanging with lane ^ O: lanes with bit
// O set keep the upper Half of their first 2·Half values and add their partner's; the
// others keep the lower Half. warp_reduce_scatter uses Half = O; shorter arrays (M < 32
// values) halve faster than the lane bits (e.g. Half = 4 at O = 16 for 8 values).
template <int O, int Half = O, typename T, int M>
__device__ __forceinline__ void butterfly_step(T (&a)[M], int lane) {
  static_assert(2 * Half <= M, "a butterfly step reads 2·Half values");
  const bool upper = (lane & O) != 0;
#pragma unroll
  for (int k = 0; k < Half; ++k) {
    const T send = upper ? a[k] : a[k + Half];
    const T keep = upper ? a[k + Half] : a[k];
    a[k] = keep + __shfl_xor_sync(0xffffffffu, send, O);
  }
}

// Butterfly reduce-scatter of M per-lane values: afterwards lane l holds, in out[b],
// the warp-wide sum of v[32·b + l] (zero for 32·b + l >= M). Every lane of the warp
// takes part; `lane` is the caller's lane index. Each batch of 32 values costs 31
// shuffles (16 + 8 + 4 + 2 + 1: each step exchanges half of the values still held),
// against 160 for 32 separate warp_sums. The order of additions is fixed.
template <int M, typename T>
__device__ __forceinline__ void warp_reduce_scatter(const T (&v)[M], int lane,
                                                    T (&out)[(M + kWarpSize - 1) / kWarpSize]) {
#pragma unroll
  for (int b = 0; b < (M + kWarpSize - 1) / kWarpSize; ++b) {
    T a[kWarpSize];
#pragma unroll
    for (int k = 0; k < kWarpSize; ++k) a[k] = (b * kWarpSize + k < M) ? v[b * kWarpSize + k] : T(0);
    butterfly_step<16>(a, lane);
    butterfly_step<8>(a, lane);
    butterfly_step<4>(a, lane);
    butterfly_step<2>(a, lane);
    butterfly_step<1>(a, lane);
    out[b] = a[0];
  }
}

// The halving steps of warp_reduce_scatter_pow2: exchange with lane ^ O keeping Half of
// the values, down to one.
template <int O, int Half, typename T, int M>
__device__ __forceinline__ void reduce_scatter_halvings(T (&a)[M], int lane) {
  butterfly_step<O, Half>(a, lane);
  if constexpr (Half > 1) reduce_scatter_halvings<O / 2, Half / 2>(a, lane);
}

// Warp reduce-scatter of M per-lane values, M a power of two in [1, 32]: returns, in
// every lane, the warp-wide sum of a[lane / (32 / M)]. log2(M) halving steps (M − 1
// shuffles) and log2(32 / M) plain ones: 16 shuffles for 16 values against 80 for
// 16 warp_sums (M = 1 is warp_sum). The order of additions is fixed; `a` is clobbered.
template <int M, typename T>
__device__ __forceinline__ T warp_reduce_scatter_pow2(T (&a)[M], int lane) {
  static_assert(M >= 1 && M <= kWarpSize && (M & (M - 1)) == 0, "M is a power of two in [1, 32]");
  if constexpr (M > 1) reduce_scatter_halvings<kWarpSize / 2, M / 2>(a, lane);
  T v = a[0];
#pragma unroll
  for (int o = kWarpSize / M / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

}  // namespace crosslayer
