"""The JIT path's first-call cost, op by op: what a user without the compiled extension
waits for the first time an op runs (afterwards the disk cache answers in milliseconds).

    python bench/jit_first_call.py [--arch sm_90] [--dtype bfloat16] [--ops hc_post,...]

For each op the JIT path covers, the kernels of one training call -- forward and
backward of the op's `big` case in tests/op_specs.py (4099 tokens at d = 2048, n = 4
streams or its analogue) -- are found by planning the call on the CPU: crosslayer.ops
with the JIT launchers in runtime.planning(), the CPU emulator's device model (an H100)
standing in for the GPU, nothing launched. Each kernel is then compiled by NVRTC for
--arch without the disk cache, one program per kernel, as the JIT path compiles them at
first use; no GPU is needed. Prints, per op, the kernels, their total and the slowest.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "tools", "cuemu"))

import build as cuemu_build  # noqa: E402  (tools/cuemu/build.py)
from op_specs import SPECS  # noqa: E402  (tests/op_specs.py)

from crosslayer import _nvrtc  # noqa: E402
from crosslayer._extension import emulate  # noqa: E402
from crosslayer._jit import launchers, runtime  # noqa: E402
from crosslayer import ops  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def planned_kernels(spec, dtype: torch.dtype, device_model: runtime.DeviceModel) -> list:
    """(header, kernel) of every launch of one forward and backward of spec's big case, in
    launch order, each once."""
    sample = spec.sample(spec.big, dtype, torch.device("cpu"))
    for t in sample.tensors:
        t.requires_grad_(True)
    with emulate(launchers), runtime.planning(device_model) as planned:
        out = sample.call(ops, *sample.tensors)
        outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
        torch.autograd.grad(outs, [t for t in sample.tensors if t.requires_grad],
                            [torch.zeros_like(o) for o in outs], allow_unused=True)
    seen = []
    for launch in planned:
        if (launch.header, launch.kernel) not in seen:
            seen.append((launch.header, launch.kernel))
    return seen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sm_90", help="NVRTC's -arch (default sm_90)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--ops", default=",".join(launchers.OPS),
                        help=f"comma-separated, of the ops the JIT path covers ({', '.join(launchers.OPS)})")
    args = parser.parse_args(argv)
    wanted = [op for op in args.ops.split(",") if op]
    unknown = [op for op in wanted if op not in launchers.OPS]
    if unknown:
        parser.error(f"--ops: {', '.join(unknown)} not covered by the JIT path ({', '.join(launchers.OPS)})")
    counter = cuemu_build.load_counter()
    device_model = runtime.DeviceModel(**counter.device(), occupancy=counter.occupancy)
    print(f"NVRTC {_nvrtc.nvrtc_version()}, {args.arch}, {args.dtype}: one forward + backward of each op's "
          f"big case, each kernel compiled once, uncached")
    print(f"{'op':<26} {'kernels':>7} {'first call s':>12}  slowest kernel")
    total = 0.0
    for spec in SPECS:
        if spec.name not in wanted:
            continue
        times = []
        for header, kernel in planned_kernels(spec, DTYPES[args.dtype], device_model):
            start = time.perf_counter()
            _nvrtc.compile_kernels(header, [kernel], args.arch, use_cache=False)
            times.append((time.perf_counter() - start, kernel))
        op_total = sum(t for t, _ in times)
        total += op_total
        slowest_s, slowest = max(times)
        print(f"{spec.name:<26} {len(times):>7} {op_total:>12.2f}  {slowest} ({slowest_s:.2f} s)")
    print(f"{'all of them':<26} {'':>7} {total:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
