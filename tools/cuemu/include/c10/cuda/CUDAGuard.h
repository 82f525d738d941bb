// cuemu stand-in for <c10/cuda/CUDAGuard.h>: the emulated device is the CPU; nothing to switch.
#pragma once
#include <c10/core/Device.h>

#include "cuemu.h"

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(int) {}
};
struct OptionalCUDAGuard {
  OptionalCUDAGuard() = default;
  explicit OptionalCUDAGuard(c10::Device) {}
};
}  // namespace cuda
}  // namespace c10
