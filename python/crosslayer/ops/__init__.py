"""The ops of DESIGN.md, fused on CUDA where a kernel exists, with the oracle's
signatures and semantics (crosslayer.ref is the spec)."""

import torch

from crosslayer import _extension
from crosslayer.ops.depth_aggregate import depth_aggregate
from crosslayer.ops.depth_aggregate_qkv_norm import depth_aggregate_qkv_norm
from crosslayer.ops.hc_boundary import hc_boundary
from crosslayer.ops.hc_post import hc_post
from crosslayer.ops.hc_pre import hc_pre, hc_pre_for_post
from crosslayer.ops.mhc_boundary import mhc_boundary
from crosslayer.ops.mhc_coeffs import mhc_coeffs, mhc_pre_for_post
from crosslayer.ops.mudd_weights import mudd_weights
from crosslayer.ops.stream_mix import stream_mix, stream_mix_for_post

ALL_OPS = ("hc_pre", "hc_post", "hc_boundary", "stream_mix", "mhc_coeffs", "mhc_boundary", "depth_aggregate",
           "depth_aggregate_qkv_norm", "mudd_weights")


def backends() -> dict:
    """{op name: the backend that runs it on CUDA tensors here}: "extension", "jit" or
    "oracle" (crosslayer._extension.select_backend) for the current GPU; with none
    visible, for one the extension was built for."""
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    return {op: _extension.select_backend(op, capability) for op in ALL_OPS}


def fused_ops() -> dict:
    """{op name: True when it runs fused kernels on CUDA tensors in this install}
    (backends() is not "oracle")."""
    return {op: backend != "oracle" for op, backend in backends().items()}


__all__ = ["depth_aggregate", "depth_aggregate_qkv_norm", "hc_boundary", "hc_pre", "hc_pre_for_post", "hc_post",
           "stream_mix", "stream_mix_for_post", "mhc_coeffs", "mhc_boundary", "mhc_pre_for_post", "mudd_weights", "fused_ops",
           "backends", "ALL_OPS"]
