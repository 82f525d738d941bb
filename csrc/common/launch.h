// Host-side launch helpers shared by the launchers: device attributes and the opt-in
// to more than 48 KB of dynamic shared memory. Neither touches a stream, so both are
// legal while a CUDA graph is being captured.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>

namespace crosslayer {

// An attribute of `device` (cudaDevAttrMultiProcessorCount, ...MaxSharedMemoryPerBlockOptin).
inline int device_attribute(cudaDeviceAttr attr, int device) {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, attr, device));
  return v;
}

// Lets `kernel` launch with `bytes` of dynamic shared memory (needed above 48 KB).
template <typename Kernel>
void allow_smem(Kernel kernel, int bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  }
}

}  // namespace crosslayer
