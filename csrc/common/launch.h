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

// True when `device` runs the bf16/fp16 mma.sync (m16n8k16) tensor-core kernels, which
// exist from compute capability 8.0 on (their bodies compile empty below it, so the
// launchers must take their at::mm paths on such a device, never launch them).
inline bool has_mma_sync_16bit(int device) {
  return device_attribute(cudaDevAttrComputeCapabilityMajor, device) >= 8;
}

// Lets `kernel` launch with `bytes` of dynamic shared memory (needed above 48 KB).
template <typename Kernel>
void allow_smem(Kernel kernel, int bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  }
}

}  // namespace crosslayer
