// cuemu stand-in for <c10/cuda/CUDAException.h>: a failed launch or API call throws the
// emulator's message (what went wrong, in which thread, at which source line).
#pragma once
#include <c10/util/Exception.h>

#include "cuemu.h"

#define C10_CUDA_CHECK(EXPR)                                                              \
  do {                                                                                    \
    const cudaError_t cuemu_err_ = (EXPR);                                                \
    if (cuemu_err_ != cudaSuccess) (void)cudaGetLastError(); /* reported here, not again */ \
    TORCH_CHECK(cuemu_err_ == cudaSuccess, "CUDA error (cuemu): ",                        \
                cudaGetErrorString(cuemu_err_), " [", #EXPR, " at ", __FILE__, ":", __LINE__, "]"); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
