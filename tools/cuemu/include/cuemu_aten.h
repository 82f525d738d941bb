// cuemu stand-ins for the library calls of the launchers that have no CPU kernel.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

namespace cuemu {

// at::mm(a, b, at::kFloat) (aten::mm.dtype: 16-bit operands, exact products summed in
// fp32, one cuBLAS call) exists on CUDA only. The emulator widens the operands (a 16-bit
// value, and the product of two, is exact in fp32: the same result up to the order of
// the sums), hidden from a Python dispatch mode, and reports the GPU's call to the
// traffic counter instead: one launch that reads a and b and writes the product.
inline at::Tensor mm_f32_out(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out;
  {
    const c10::impl::ExcludeDispatchKeyGuard hidden(
        c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot}));
    out = at::mm(a.to(at::kFloat), b.to(at::kFloat));
  }
  cuemu_rt_library_call("aten::mm.dtype", a.nbytes() + b.nbytes(), out.nbytes());
  return out;
}

}  // namespace cuemu
