// Dtype dispatch for the launchers: maps a torch dtype to the CUDA element type the
// torch-free kernels use (float, double, __half, __nv_bfloat16). The accumulator type
// comes from AccType<scalar_t> in vec.cuh (double for double, float otherwise).
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#define CL_DISPATCH_FLOATING(TYPE, NAME, ...)                                            \
  [&] {                                                                                  \
    switch (TYPE) {                                                                      \
      case at::kFloat: {                                                                 \
        using scalar_t = float;                                                          \
        return __VA_ARGS__();                                                            \
      }                                                                                  \
      case at::kDouble: {                                                                \
        using scalar_t = double;                                                         \
        return __VA_ARGS__();                                                            \
      }                                                                                  \
      case at::kHalf: {                                                                  \
        using scalar_t = __half;                                                         \
        return __VA_ARGS__();                                                            \
      }                                                                                  \
      case at::kBFloat16: {                                                              \
        using scalar_t = __nv_bfloat16;                                                  \
        return __VA_ARGS__();                                                            \
      }                                                                                  \
      default:                                                                           \
        TORCH_CHECK(false, NAME ": unsupported dtype ", TYPE,                            \
                    " (expected float32, bfloat16, float16 or float64)");                \
    }                                                                                    \
  }()

// dispatch_streams<kGeneric, kExact...>(n, f) runs f(std::integral_constant<int, kN>{})
// with kN = n when n is one of kExact (instantiations unrolled for that stream count),
// else kN = kGeneric (the instantiation for every other n; 0 or kMaxStreams by the
// kernel family's convention).
template <int kGeneric, int... kExact, typename F>
void dispatch_streams(int n, F&& f) {
  const bool exact = ((n == kExact ? (f(std::integral_constant<int, kExact>{}), true) : false) || ...);
  if (!exact) f(std::integral_constant<int, kGeneric>{});
}

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
