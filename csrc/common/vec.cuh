// Element conversion and 16-byte vector access for the torch-free kernels.
//
// Vec<T, N> is N elements of T loaded or stored as one access of N·sizeof(T) bytes
// (16 bytes when N = 16 / sizeof(T)). Callers guarantee alignment: the launchers pick
// N = 1 whenever a base pointer or a stride is not a multiple of the vector width.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/std.cuh"

namespace crosslayer {

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Largest element count of a 16-byte access.
template <typename T>
constexpr int kVec16 = 16 / sizeof(T);

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// The N elements of `base` from i as one Vec (a 16-byte-aligned buffer entry).
template <typename T, int N>
__device__ __forceinline__ Vec<T, N>& vec_at(T* base, int64_t i) {
  return *reinterpret_cast<Vec<T, N>*>(base + i);
}

// The chunk helpers below take elements [e, e + N) of a row of d elements. A chunk may
// be cut by the row's end (e + N > d) or, on the shifted rows of the depth kernels
// (phases/slot_tile.cuh: row_shift), by its start (e < 0): only the elements in [0, d)
// are read or written, the others read as zero. A whole chunk is one N-element access
// (16-byte aligned at row + e: the caller's contract).

// Whether element e + k of a row of d lies in it (0 <= e + k < d, one compare).
__device__ __forceinline__ bool element_in_row(int64_t i, int64_t d) {
  return static_cast<uint64_t>(i) < static_cast<uint64_t>(d);
}

// Whether the chunk [e, e + n) lies in the row.
__device__ __forceinline__ bool whole_chunk(int64_t e, int64_t n, int64_t d) { return e >= 0 && e + n <= d; }

// Loads elements [e, e + N) of `row` into fp-accumulator registers, zero outside [0, d).
template <typename T, int N>
__device__ __forceinline__ void load_chunk(const T* __restrict__ row, int64_t e, int64_t d,
                                           acc_t<T> (&out)[N]) {
  if (whole_chunk(e, N, d)) {
    const Vec<T, N> x = *reinterpret_cast<const Vec<T, N>*>(row + e);
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = to_acc(x.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = element_in_row(e + k, d) ? to_acc(row[e + k]) : acc_t<T>(0);
  }
}

// Loads elements [e, e + N) of `row` as stored (no widening); zero outside [0, d).
template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_chunk_raw(const T* __restrict__ row, int64_t e, int64_t d) {
  if (whole_chunk(e, N, d)) return *reinterpret_cast<const Vec<T, N>*>(row + e);
  Vec<T, N> x;
#pragma unroll
  for (int k = 0; k < N; ++k) x.v[k] = element_in_row(e + k, d) ? row[e + k] : T(0.0f);
  return x;
}

// load_chunk_raw where the caller knows whether the chunk is whole (kWhole: in [0, d),
// one 16-byte access, no check) or may be cut (the checked path).
template <typename T, int N, bool kWhole>
__device__ __forceinline__ Vec<T, N> load_chunk_as(const T* __restrict__ row, int64_t e, int64_t d) {
  if constexpr (kWhole) {
    return *reinterpret_cast<const Vec<T, N>*>(row + e);
  } else {
    return load_chunk_raw<T, N>(row, e, d);
  }
}

// Stores elements [e, e + N) of `row` from accumulator registers, cut to [0, d).
template <typename T, int N>
__device__ __forceinline__ void store_chunk(T* __restrict__ row, int64_t e, int64_t d,
                                            const acc_t<T> (&in)[N]) {
  if (whole_chunk(e, N, d)) {
    Vec<T, N> x;
#pragma unroll
    for (int k = 0; k < N; ++k) x.v[k] = from_acc<T>(in[k]);
    *reinterpret_cast<Vec<T, N>*>(row + e) = x;
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (element_in_row(e + k, d)) row[e + k] = from_acc<T>(in[k]);
    }
  }
}

// store_chunk with the caller's knowledge of the chunk (see load_chunk_as).
template <typename T, int N, bool kWhole>
__device__ __forceinline__ void store_chunk_as(T* __restrict__ row, int64_t e, int64_t d,
                                               const acc_t<T> (&in)[N]) {
  if constexpr (kWhole) {
    Vec<T, N> x;
#pragma unroll
    for (int k = 0; k < N; ++k) x.v[k] = from_acc<T>(in[k]);
    *reinterpret_cast<Vec<T, N>*>(row + e) = x;
  } else {
    store_chunk<T, N>(row, e, d, in);
  }
}

// Stores the raw elements [e, e + N) of `row`, cut to [0, d).
template <typename T, int N>
__device__ __forceinline__ void store_chunk_raw(T* __restrict__ row, int64_t e, int64_t d,
                                                const Vec<T, N>& x) {
  if (whole_chunk(e, N, d)) {
    *reinterpret_cast<Vec<T, N>*>(row + e) = x;
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (element_in_row(e + k, d)) row[e + k] = x.v[k];
    }
  }
}

}  // namespace crosslayer
