// Scalar math of the torch-free kernels in the accumulator dtype (float or double): one
// overload per dtype of each function the kernels use, so a kernel templated on `acc`
// calls the float intrinsic for float and the double one for double.
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

// GELU(u): the tanh approximation when tanh_form, else the exact erf form.
template <typename acc>
__device__ __forceinline__ acc gelu_fwd(acc u, bool tanh_form) {
  if (tanh_form) {
    const acc c0 = acc(0.7978845608028654), c1 = acc(0.044715);
    return acc(0.5) * u * (acc(1) + acc_tanh(c0 * (u + c1 * u * u * u)));
  }
  return acc(0.5) * u * (acc(1) + acc_erf(u * acc(0.7071067811865476)));
}

// GELU'(u) of the same form.
template <typename acc>
__device__ __forceinline__ acc gelu_grad(acc u, bool tanh_form) {
  if (tanh_form) {
    const acc c0 = acc(0.7978845608028654), c1 = acc(0.044715);
    const acc t = acc_tanh(c0 * (u + c1 * u * u * u));
    return acc(0.5) * (acc(1) + t) + acc(0.5) * u * (acc(1) - t * t) * c0 * (acc(1) + acc(3) * c1 * u * u);
  }
  const acc cdf = acc(0.5) * (acc(1) + acc_erf(u * acc(0.7071067811865476)));
  const acc pdf = acc_exp(acc(-0.5) * u * u) * acc(0.3989422804014327);
  return cdf + u * pdf;
}

}  // namespace crosslayer
