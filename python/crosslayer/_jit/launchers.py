"""The JIT path's launchers: the functions of crosslayer._C that it covers, with the
same signatures and results, written in Python over torch tensors and launching the
NVRTC-compiled kernels (runtime.launch). Each op's module mirrors its C++ launcher line
for line (crosslayer._jit.hc_post: csrc/hc_post.cu, ...); the plan-equality tests
(tests/test_jit_plan*.py) hold every launch -- kernel, grid, block, shared memory,
params bytes -- to the C++ launcher's on the CPU emulator. This module gathers them:
crosslayer._extension uses it where it would use _C."""

from crosslayer._jit import (depth_aggregate, depth_aggregate_qkv_norm, hc_boundary, hc_post, hc_pre, mhc_boundary,
                             mhc_coeffs, mma_pack, mudd_weights, stream_mix, token_sums)
from crosslayer._jit.depth_aggregate import depth_aggregate_bwd, depth_aggregate_fwd
from crosslayer._jit.depth_aggregate_qkv_norm import depth_aggregate_qkv_norm_bwd, depth_aggregate_qkv_norm_fwd
from crosslayer._jit.hc_boundary import hc_boundary_bwd, hc_boundary_fwd, hc_boundary_mix_bwd, hc_boundary_mix_fwd
from crosslayer._jit.hc_post import hc_post_bwd, hc_post_fwd
from crosslayer._jit.hc_pre import hc_pre_bwd, hc_pre_fwd
from crosslayer._jit.mhc_boundary import mhc_boundary_bwd, mhc_boundary_fwd
from crosslayer._jit.mhc_coeffs import mhc_coeffs_bwd, mhc_coeffs_fwd, mhc_pre_fwd
from crosslayer._jit.mudd_weights import mudd_weights_bwd, mudd_weights_fwd
from crosslayer._jit.stream_mix import stream_mix_bwd, stream_mix_dots, stream_mix_fwd

# The ops whose launchers the JIT path has (crosslayer._extension's backend choice).
OPS = ("hc_post", "stream_mix", "mhc_coeffs", "mhc_boundary", "hc_pre", "hc_boundary", "depth_aggregate",
       "depth_aggregate_qkv_norm", "mudd_weights")

# The params structure of every kernel the launchers launch, by kernel name.
PARAMS = {**hc_post.PARAMS, **stream_mix.PARAMS, **token_sums.PARAMS, **mma_pack.PARAMS, **mhc_coeffs.PARAMS,
          **mhc_boundary.PARAMS, **hc_pre.PARAMS, **hc_boundary.PARAMS,
          **depth_aggregate.PARAMS, **depth_aggregate_qkv_norm.PARAMS, **mudd_weights.PARAMS}

__all__ = ["OPS", "PARAMS", "hc_post_fwd", "hc_post_bwd", "stream_mix_fwd", "stream_mix_bwd", "stream_mix_dots",
           "mhc_coeffs_fwd", "mhc_pre_fwd", "mhc_coeffs_bwd", "mhc_boundary_fwd", "mhc_boundary_bwd",
           "hc_pre_fwd", "hc_pre_bwd", "hc_boundary_fwd", "hc_boundary_bwd", "hc_boundary_mix_fwd",
           "hc_boundary_mix_bwd", "depth_aggregate_fwd", "depth_aggregate_bwd", "depth_aggregate_qkv_norm_fwd",
           "depth_aggregate_qkv_norm_bwd", "mudd_weights_fwd", "mudd_weights_bwd"]
