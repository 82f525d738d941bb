"""The JIT path's launchers: the functions of crosslayer._C that it covers, with the
same signatures and results, written in Python over torch tensors and launching the
NVRTC-compiled kernels (runtime.launch). Each op's module mirrors its C++ launcher line
for line (crosslayer._jit.hc_post: csrc/hc_post.cu, ...); the plan-equality tests
(tests/test_jit_plan*.py) hold every launch -- kernel, grid, block, shared memory,
params bytes -- to the C++ launcher's on the CPU emulator. This module gathers them:
crosslayer._extension uses it where it would use _C."""

from crosslayer._jit import hc_post, stream_mix, token_sums
from crosslayer._jit.hc_post import hc_post_bwd, hc_post_fwd
from crosslayer._jit.stream_mix import stream_mix_bwd, stream_mix_dots, stream_mix_fwd

# The ops whose launchers the JIT path has (crosslayer._extension's backend choice).
OPS = ("hc_post", "stream_mix")

# The params structure of every kernel the launchers launch, by kernel name.
PARAMS = {**hc_post.PARAMS, **stream_mix.PARAMS, **token_sums.PARAMS}

__all__ = ["OPS", "PARAMS", "hc_post_fwd", "hc_post_bwd", "stream_mix_fwd", "stream_mix_bwd", "stream_mix_dots"]
