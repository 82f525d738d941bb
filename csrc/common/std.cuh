// The standard-library names the kernel headers use, from headers both compilers have:
// the host library under nvcc (and the CPU emulator's C++ compiler), libcu++ under NVRTC
// (the JIT path; NVRTC has no host headers, and libcu++'s <cuda/std/cstdint> also
// declares the fixed-width integer types at global scope there, as <cstdint> does).
// Kernel code includes this instead of <cstdint> / <type_traits>.
#pragma once

#if defined(__CUDACC_RTC__)
#include <cuda/std/cstdint>
#include <cuda/std/type_traits>
#else
#include <cstdint>
#include <type_traits>
#endif

namespace crosslayer {

#if defined(__CUDACC_RTC__)
template <typename A, typename B>
inline constexpr bool is_same_v = cuda::std::is_same_v<A, B>;
#else
template <typename A, typename B>
inline constexpr bool is_same_v = std::is_same_v<A, B>;
#endif

}  // namespace crosslayer
