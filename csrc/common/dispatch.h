// Compile-time dispatch for the launchers: a torch dtype to the CUDA element type the
// torch-free kernels use (float, double, __half, __nv_bfloat16; the accumulator type
// comes from AccType<scalar_t> in vec.cuh: double for double, float otherwise), a bool
// to a constexpr, and a stream count n to a kernel's stream bound kN.
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#define CL_DISPATCH_CASE(ENUM, TYPE, ...) \
  case ENUM: {                            \
    using scalar_t = TYPE;                \
    return __VA_ARGS__();                 \
  }

#define CL_DISPATCH_FLOATING(TYPE, NAME, ...)                             \
  [&] {                                                                   \
    switch (TYPE) {                                                       \
      CL_DISPATCH_CASE(at::kFloat, float, __VA_ARGS__)                    \
      CL_DISPATCH_CASE(at::kDouble, double, __VA_ARGS__)                  \
      CL_DISPATCH_CASE(at::kHalf, __half, __VA_ARGS__)                    \
      CL_DISPATCH_CASE(at::kBFloat16, __nv_bfloat16, __VA_ARGS__)         \
      default:                                                            \
        TORCH_CHECK(false, NAME ": unsupported dtype ", TYPE,             \
                    " (expected float32, bfloat16, float16 or float64)"); \
    }                                                                     \
  }()

// BOOL_SWITCH(cond, CONST, ...) runs the lambda with `constexpr bool CONST = cond`.
#define CL_BOOL_SWITCH(COND, CONST, ...) \
  [&] {                                  \
    if (COND) {                          \
      constexpr bool CONST = true;       \
      return __VA_ARGS__();              \
    } else {                             \
      constexpr bool CONST = false;      \
      return __VA_ARGS__();              \
    }                                    \
  }()

namespace crosslayer {

// Runs f(std::integral_constant<int, kN>{}) with kN = n when n is one of kExact, else
// with kN = kGeneric (the instantiation for every other n; what it means is the
// kernel's: 0 = "n at run time", kMaxStreams = "a bound, n at run time").
//   dispatch_streams<0, 2, 4, 8>(n, [&](auto kn) { constexpr int kN = decltype(kn)::value; ... });
template <int kGeneric, int... kExact, typename F>
void dispatch_streams(int n, F&& f) {
  const bool exact = ((n == kExact ? (f(std::integral_constant<int, kExact>{}), true) : false) || ...);
  if (!exact) f(std::integral_constant<int, kGeneric>{});
}

}  // namespace crosslayer
