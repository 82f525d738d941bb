// Host-side launch helpers shared by the launchers: device attributes, the opt-in to
// more than 48 KB of dynamic shared memory, grid sizes, and the one launch path (the
// current stream, then a launch check). Only `launch` touches a stream, so the others
// are legal while a CUDA graph is being captured.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <limits>

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

// Blocks of `per_block` work items covering `items`, capped at the grid's x limit
// (kernels that cover more stride over it).
inline dim3 cover_grid(int64_t items, int64_t per_block) {
  const int64_t blocks = (items + per_block - 1) / per_block;
  return dim3(static_cast<unsigned>(std::min<int64_t>(blocks, std::numeric_limits<int>::max())));
}

// A persistent grid: at most `blocks`, at most what `device` holds at once of `kernel`
// with `threads` threads and `smem` bytes (at most `per_sm_cap` a multiprocessor).
template <typename Kernel>
int64_t resident_grid(Kernel kernel, int64_t blocks, int threads, int smem, int device,
                      int per_sm_cap = std::numeric_limits<int>::max()) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
  per_sm = std::min(std::max(per_sm, 1), per_sm_cap);
  const int64_t sms = device_attribute(cudaDevAttrMultiProcessorCount, device);
  return std::min<int64_t>(blocks, per_sm * sms);
}

// Launches `kernel(params)` on the current stream, then checks the launch.
template <typename Kernel, typename Params>
void launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, const Params& params) {
  kernel<<<grid, block, smem, c10::cuda::getCurrentCUDAStream()>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace crosslayer
