// Device math on the accumulator type (float, or double for double activations): one
// overload set per function, so a kernel templated on `acc` calls the right precision.
#pragma once

namespace crosslayer {

__device__ __forceinline__ float acc_rsqrt(float x) { return rsqrtf(x); }
__device__ __forceinline__ double acc_rsqrt(double x) { return rsqrt(x); }
__device__ __forceinline__ float acc_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double acc_tanh(double x) { return tanh(x); }
__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_erf(float x) { return erff(x); }
__device__ __forceinline__ double acc_erf(double x) { return erf(x); }
__device__ __forceinline__ float acc_sigmoid(float x) { return 1.f / (1.f + expf(-x)); }
__device__ __forceinline__ double acc_sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }

}  // namespace crosslayer
