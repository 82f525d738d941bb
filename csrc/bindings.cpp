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

// Launchers are bound by pointer (pybind11 deduces their types) and called positionally:
// each signature is written in ops.h (declaration), its .cu (definition) and the
// custom op of python/crosslayer/ops/<op>.py (the schema torch.library infers from it).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "crosslayer CUDA kernels (use crosslayer.ops, not this module)";
  m.attr("MAX_STREAMS") = crosslayer::kMaxStreams;  // n of the HC ops (crosslayer.ref.hc.MAX_STREAMS)
  m.attr("MAX_SLOTS") = crosslayer::kMaxSlots;      // l of the depth ops (crosslayer.ref.mudd.MAX_SLOTS)
  m.def("built_torch_version", &built_torch_version,
        "major.minor.patch of the torch headers this module was compiled against");
  m.def("built_cuda_version", &built_cuda_version, "CUDA runtime version of the build");
  m.def("depth_aggregate_fwd", &crosslayer::depth_aggregate_fwd, "Y = Σ_j A[.., c, j]·S_j");
  m.def("depth_aggregate_bwd", &crosslayer::depth_aggregate_bwd, "dS (=|+=) Σ_c A·dY_c in place; returns dA");
  m.def("depth_aggregate_qkv_norm_fwd", &crosslayer::depth_aggregate_qkv_norm_fwd,
        "[Out, rstd]: 4-way depth aggregate, ways 0..2 RMS-normed");
  m.def("depth_aggregate_qkv_norm_bwd", &crosslayer::depth_aggregate_qkv_norm_bwd,
        "dS (=|+=) in place; returns [dA, dnorm_weights]");
  m.def("hc_post_fwd", &crosslayer::hc_post_fwd, "H'_k = beta_k·y + Σ_i alpha[i, 1+k]·H_i");
  m.def("hc_post_bwd", &crosslayer::hc_post_bwd, "[dH, dy, dalpha, dbeta] of hc_post");
  m.def("stream_mix_fwd", &crosslayer::stream_mix_fwd, "x = Σ_i w_i·H_i");
  m.def("stream_mix_bwd", &crosslayer::stream_mix_bwd, "dH (=|+=) in place; returns dw of stream_mix");
  m.def("stream_mix_dots", &crosslayer::stream_mix_dots, "dw_i = <dx, H_i> per token (stream_mix_bwd's dots alone)");
  m.def("hc_boundary_fwd", &crosslayer::hc_boundary_fwd,
        "[H', x', alpha', beta', q, r, Wt]: DHC connection i's post fused with connection i+1's pre");
  m.def("hc_boundary_bwd", &crosslayer::hc_boundary_bwd,
        "[dH, dy, dalpha, dbeta, dA, dB, dW, ds_a, ds_b] of hc_boundary");
  m.def("hc_boundary_mix_fwd", &crosslayer::hc_boundary_mix_fwd,
        "[H', x']: connection i's post fused with a static pre x' = Σ_k A'[k, 0]·H'_k (SHC)");
  m.def("hc_boundary_mix_bwd", &crosslayer::hc_boundary_mix_bwd, "[dH, dy, dalpha, dbeta, dA'] of hc_boundary_mix");
  m.def("hc_pre_fwd", &crosslayer::hc_pre_fwd, "[x, alpha, beta, q, r, Wt] of dynamic-HC hc_pre");
  m.def("hc_pre_bwd", &crosslayer::hc_pre_bwd, "dH (=|+=) in place; returns [dA, dB, dW, ds_a, ds_b] of dynamic-HC hc_pre");
  m.def("mhc_coeffs_fwd", &crosslayer::mhc_coeffs_fwd, "[alpha, beta, u, r] of the mHC coefficients");
  m.def("mhc_pre_fwd", &crosslayer::mhc_pre_fwd, "[x, alpha, beta, u, r]: the mHC pre, x in the coefficients' pass");
  m.def("mhc_boundary_fwd", &crosslayer::mhc_boundary_fwd,
        "[H', x', alpha', beta', u, r]: connection i's post fused with the mHC pre of H'");
  m.def("mhc_boundary_bwd", &crosslayer::mhc_boundary_bwd,
        "[dH, dy, dalpha, dbeta, dphi, da_pre, da_post, da_res, db] of mhc_boundary");
  m.def("mhc_coeffs_bwd", &crosslayer::mhc_coeffs_bwd,
        "dH (=|+=) in place; returns [dphi, da_pre, da_post, da_res, db] of the mHC coefficients");
  m.def("mudd_weights_fwd", &crosslayer::mudd_weights_fwd, "[A, u, r] of mudd_weights");
  m.def("mudd_weights_bwd", &crosslayer::mudd_weights_bwd, "[dx, dW1, dW2b = [dW2; dbias]] of mudd_weights");
}
