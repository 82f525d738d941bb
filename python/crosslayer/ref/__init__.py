"""The oracle: one plain-PyTorch function per op of DESIGN.md.

Each op computes in float32 (float64 when an input is float64) and returns
activations in the activation dtype and coefficients in the arithmetic dtype.
Beside each op is its hand-derived backward (`<op>_bwd`), the formulas the CUDA
backward kernels implement; tests check every one against autograd in float64.
"""

from crosslayer.ref.hc import (
    expand_streams,
    hc_boundary,
    hc_boundary_bwd,
    hc_init_static,
    hc_post,
    hc_post_bwd,
    hc_pre,
    hc_pre_bwd,
    reduce_streams,
    stream_mix,
    stream_mix_bwd,
    validate_hc_boundary,
    validate_hc_post,
    validate_hc_pre,
    validate_stream_mix,
)
from crosslayer.ref.mhc import (
    mhc_boundary,
    mhc_boundary_bwd,
    mhc_coeffs,
    mhc_coeffs_bwd,
    sinkhorn,
    sinkhorn_bwd,
    validate_mhc_boundary,
    validate_mhc_coeffs,
    validate_sinkhorn,
)
from crosslayer.ref.mudd import (
    depth_aggregate,
    depth_aggregate_bwd,
    depth_aggregate_qkv_norm,
    depth_aggregate_qkv_norm_bwd,
    dwa_init_weights,
    dwa_slots,
    mudd_weights,
    mudd_weights_bwd,
    validate_depth_aggregate,
    validate_depth_aggregate_qkv_norm,
    validate_mudd_weights,
)

__all__ = [
    "hc_pre", "hc_pre_bwd", "hc_post", "hc_post_bwd", "hc_boundary", "hc_boundary_bwd",
    "stream_mix", "stream_mix_bwd",
    "mhc_coeffs", "mhc_coeffs_bwd", "mhc_boundary", "mhc_boundary_bwd", "sinkhorn", "sinkhorn_bwd",
    "depth_aggregate", "depth_aggregate_bwd", "depth_aggregate_qkv_norm",
    "depth_aggregate_qkv_norm_bwd", "dwa_slots", "dwa_init_weights", "mudd_weights", "mudd_weights_bwd",
    "validate_hc_pre", "validate_hc_post", "validate_hc_boundary", "validate_stream_mix", "validate_mhc_coeffs",
    "validate_mhc_boundary",
    "validate_depth_aggregate", "validate_depth_aggregate_qkv_norm", "validate_mudd_weights",
    "hc_init_static", "expand_streams", "reduce_streams", "validate_sinkhorn",
]
