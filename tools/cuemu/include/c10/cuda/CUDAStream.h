// cuemu stand-in for <c10/cuda/CUDAStream.h>: one stream, the emulator's (null) stream.
#pragma once
#include "cuemu.h"

namespace c10 {
namespace cuda {
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(int device_index = -1) {
  (void)device_index;
  return {};
}
}  // namespace cuda
}  // namespace c10
