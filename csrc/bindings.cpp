// The pybind11 module crosslayer._C: the launchers of every op family plus the
// versions it was built against (crosslayer/_extension.py compares them with the
// running torch before any op is used).
#include <cuda_runtime_api.h>
#include <torch/extension.h>
#include <torch/version.h>

#include <string>

#include "common/limits.h"
#include "ops.h"

namespace {

std::string built_torch_version() {
  return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
         std::to_string(TORCH_VERSION_PATCH);
}

std::string built_cuda_version() {
  return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "crosslayer CUDA kernels (use crosslayer.ops, not this module)";
  m.attr("MAX_STREAMS") = crosslayer::kMaxStreams;  // n of the HC ops (crosslayer.ref.hc.MAX_STREAMS)
  m.attr("MAX_SLOTS") = crosslayer::kMaxSlots;      // l of the depth ops (crosslayer.ref.mudd.MAX_SLOTS)
  m.def("built_torch_version", &built_torch_version,
        "major.minor.patch of the torch headers this module was compiled against");
  m.def("built_cuda_version", &built_cuda_version, "CUDA runtime version of the build");
  m.def("depth_aggregate_fwd", &crosslayer::depth_aggregate_fwd, "Y = Σ_j A[.., c, j]·S_j",
        pybind11::arg("S"), pybind11::arg("A"));
  m.def("depth_aggregate_bwd", &crosslayer::depth_aggregate_bwd,
        "dS (=|+=) Σ_c A·dY_c in place; returns dA", pybind11::arg("dY"), pybind11::arg("S"),
        pybind11::arg("A"), pybind11::arg("dS"), pybind11::arg("accumulate"));
  m.def("depth_aggregate_qkv_norm_fwd", &crosslayer::depth_aggregate_qkv_norm_fwd,
        "[Out, rstd]: 4-way depth aggregate, ways 0..2 RMS-normed", pybind11::arg("S"),
        pybind11::arg("A"), pybind11::arg("norm_weights"), pybind11::arg("eps"));
  m.def("depth_aggregate_qkv_norm_bwd", &crosslayer::depth_aggregate_qkv_norm_bwd,
        "dS (=|+=) in place; returns [dA, dnorm_weights]", pybind11::arg("dOut"), pybind11::arg("S"),
        pybind11::arg("A"), pybind11::arg("norm_weights"), pybind11::arg("rstd"), pybind11::arg("dS"),
        pybind11::arg("accumulate"));
  m.def("hc_post_fwd", &crosslayer::hc_post_fwd, "H'_k = beta_k·y + Σ_i alpha[i, 1+k]·H_i",
        pybind11::arg("H"), pybind11::arg("y"), pybind11::arg("alpha"), pybind11::arg("beta"));
  m.def("hc_post_bwd", &crosslayer::hc_post_bwd, "[dH, dy, dalpha, dbeta] of hc_post",
        pybind11::arg("dH_new"), pybind11::arg("H"), pybind11::arg("y"), pybind11::arg("alpha"),
        pybind11::arg("beta"));
  m.def("stream_mix_fwd", &crosslayer::stream_mix_fwd, "x = Σ_i w_i·H_i", pybind11::arg("H"),
        pybind11::arg("w"));
  m.def("stream_mix_bwd", &crosslayer::stream_mix_bwd, "[dH, dw] of stream_mix",
        pybind11::arg("dx"), pybind11::arg("H"), pybind11::arg("w"));
  m.def("hc_pre_fwd", &crosslayer::hc_pre_fwd,
        "[x, alpha, beta, q, r] of dynamic-HC hc_pre", pybind11::arg("H"), pybind11::arg("A"),
        pybind11::arg("B"), pybind11::arg("W"), pybind11::arg("s_a"), pybind11::arg("s_b"),
        pybind11::arg("eps"));
  m.def("hc_pre_bwd", &crosslayer::hc_pre_bwd,
        "[dH, dA, dB, dW, ds_a, ds_b] of dynamic-HC hc_pre", pybind11::arg("dx"),
        pybind11::arg("dalpha"), pybind11::arg("dbeta"), pybind11::arg("H"), pybind11::arg("A"),
        pybind11::arg("B"), pybind11::arg("W"), pybind11::arg("s_a"), pybind11::arg("s_b"),
        pybind11::arg("q"), pybind11::arg("r"));
  m.def("mhc_coeffs_fwd", &crosslayer::mhc_coeffs_fwd, "[alpha, beta, u, r] of the mHC coefficients",
        pybind11::arg("H"), pybind11::arg("phi"), pybind11::arg("a_pre"), pybind11::arg("a_post"),
        pybind11::arg("a_res"), pybind11::arg("b"), pybind11::arg("eps"), pybind11::arg("pre_eps"),
        pybind11::arg("post_mult"), pybind11::arg("iters"), pybind11::arg("sinkhorn_eps"));
  m.def("mhc_coeffs_bwd", &crosslayer::mhc_coeffs_bwd,
        "[dH, dphi, da_pre, da_post, da_res, db] of the mHC coefficients", pybind11::arg("dalpha"),
        pybind11::arg("dbeta"), pybind11::arg("H"), pybind11::arg("phi"), pybind11::arg("a_pre"),
        pybind11::arg("a_post"), pybind11::arg("a_res"), pybind11::arg("b"), pybind11::arg("u"),
        pybind11::arg("r"), pybind11::arg("eps"), pybind11::arg("pre_eps"), pybind11::arg("post_mult"),
        pybind11::arg("iters"), pybind11::arg("sinkhorn_eps"));
  m.def("mudd_weights_fwd", &crosslayer::mudd_weights_fwd, "[A, u, r] of mudd_weights",
        pybind11::arg("x"), pybind11::arg("W1"), pybind11::arg("W2"), pybind11::arg("bias"),
        pybind11::arg("n_ways"), pybind11::arg("eps"), pybind11::arg("approximate"));
  m.def("mudd_weights_bwd", &crosslayer::mudd_weights_bwd, "[dx, dW1, dW2, dbias] of mudd_weights",
        pybind11::arg("dA"), pybind11::arg("x"), pybind11::arg("W1"), pybind11::arg("W2"),
        pybind11::arg("bias"), pybind11::arg("u"), pybind11::arg("r"), pybind11::arg("n_ways"),
        pybind11::arg("eps"), pybind11::arg("approximate"));
}
