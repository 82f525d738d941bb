"""Every kernel instantiation nvcc built into the extension, compiled again through NVRTC
(crosslayer._nvrtc, CuPy's binding): the JIT path can build exactly what the extension
holds, from the same headers, on a machine without a GPU.

    python tools/nvrtc_check.py [--so PATH] [--arch sm_80,sm_90] [--jobs 2] [--kernel REGEX]

The instantiations are read from the built extension's symbols (`nm`: the host side of
every __global__ function has the kernel's mangled name; without the extension, from the
CPU emulator's module, which instantiates them from the same launchers), each mapped to the header
under csrc/kernels that defines its template, and compiled in NVRTC programs of up to
--chunk instantiations each (one header, one architecture), --jobs at a time, without
the disk cache. Prints one line per header and architecture (instantiations, seconds)
and exits 1 if any program fails or warns (nvcc compiles the same code without a
warning), with NVRTC's log.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import os
import re
import subprocess
import sys
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
sys.path.insert(0, os.path.join(ROOT, "python"))

from crosslayer import _nvrtc  # noqa: E402

# `__global__ void [__launch_bounds__(...) | __maxnreg__(...)] name(`, the qualifier's
# arguments one level of parentheses deep at most.
GLOBAL = re.compile(r"__global__\s+void\s+(?:(?:__launch_bounds__|__maxnreg__)\s*\((?:[^()]|\([^()]*\))*\)\s*)?(\w+)\s*\(")


def kernel_headers() -> dict[str, str]:
    """Kernel template name -> the header (relative to csrc/) that defines it."""
    out = {}
    for path in sorted(glob.glob(os.path.join(CSRC, "kernels", "**", "*.cuh"), recursive=True)):
        with open(path) as f:
            for name in GLOBAL.findall(f.read()):
                out[name] = os.path.relpath(path, CSRC)
    return out


def default_so() -> str:
    """The built extension, else the CPU emulator's module (tools/cuemu/build.py), which
    instantiates the same kernel templates from the same launchers (as C++ functions of
    the same names)."""
    found = sorted(glob.glob(os.path.join(ROOT, "python", "crosslayer", "_C*.so")))
    found += sorted(glob.glob(os.path.join(ROOT, "build", "cuemu", "obj", "crosslayer_cuemu*.so")))
    if not found:
        raise SystemExit("no built python/crosslayer/_C*.so and no emulator module: build either "
                         "(pip install -e . or python tools/cuemu/build.py) or pass --so")
    return found[0]


def name_expression(demangled: str) -> str | None:
    """`void crosslayer::k<T, 1>(crosslayer::P)` -> `crosslayer::k<T, 1>`; None for a
    symbol that is not a template instantiation in crosslayer's namespace."""
    if not demangled.startswith("void crosslayer::") or not demangled.endswith(")"):
        return None
    depth = 0
    for i in range(len(demangled) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(demangled[i], 0)
        if depth == 0:
            name = demangled[len("void "):i]
            return name if name.endswith(">") else None
    return None


def instantiations(so: str) -> dict[str, list[str]]:
    """Header -> the name expressions of the kernels in `so` whose templates it defines."""
    headers = kernel_headers()
    out = subprocess.run(["nm", "-C", "--defined-only", so], capture_output=True, text=True, check=True).stdout
    found: dict[str, set] = defaultdict(set)
    for line in out.splitlines():
        parts = line.split(" ", 2)
        if len(parts) < 3:
            continue
        expr = name_expression(parts[2])
        if expr is None:
            continue
        template = expr[len("crosslayer::"):].split("<", 1)[0]
        if template in headers:
            found[headers[template]].add(expr)
    return {h: sorted(names) for h, names in sorted(found.items())}


def compile_chunk(header: str, names: list[str], arch: str) -> tuple[str, str, int, float, str, str]:
    """(header, arch, instantiations, seconds, error, NVRTC's warnings)."""
    try:
        c = _nvrtc.compile_kernels(header, names, arch, use_cache=False)
    except RuntimeError as e:
        return header, arch, len(names), 0.0, str(e), ""
    return header, arch, len(names), c.seconds, "", c.log.strip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--so", help="the built extension (default: python/crosslayer/_C*.so)")
    ap.add_argument("--arch", default="sm_80,sm_90")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--chunk", type=int, default=24, help="instantiations per NVRTC program")
    ap.add_argument("--kernel", help="regex: only the instantiations it matches")
    args = ap.parse_args(argv)
    per_header = instantiations(args.so or default_so())
    if args.kernel:
        per_header = {h: [n for n in names if re.search(args.kernel, n)] for h, names in per_header.items()}
        per_header = {h: names for h, names in per_header.items() if names}
    total = sum(len(v) for v in per_header.values())
    if total == 0:
        print("no crosslayer kernel instantiations found")
        return 1
    archs = args.arch.split(",")
    print(f"NVRTC {_nvrtc.nvrtc_version()}: {total} instantiations in {len(per_header)} headers, "
          f"{', '.join(archs)}, {args.jobs} jobs")
    jobs = [(h, names[i:i + args.chunk], arch) for arch in archs for h, names in per_header.items()
            for i in range(0, len(names), args.chunk)]
    start = time.perf_counter()
    done: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    failures, warnings = [], {}
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for header, arch, n, seconds, error, log in pool.map(compile_chunk, *zip(*jobs)):
            done[(header, arch)][0] += n
            done[(header, arch)][1] += seconds
            if error:
                failures.append(error)
            if log:
                warnings.setdefault(header, log)
    for (header, arch), (n, seconds) in sorted(done.items()):
        print(f"  {arch}  {header:42s} {n:4d} instantiations  {seconds:7.1f} s")
    print(f"{total * len(archs)} compiled in {time.perf_counter() - start:.0f} s wall, {len(failures)} programs failed, "
          f"{len(warnings)} headers with warnings")
    for header, log in warnings.items():
        print(f"-- warnings, {header} (the first program's log):\n{log[:2000]}")
    for error in failures:
        print(error[:4000])
    return 1 if failures or warnings else 0


if __name__ == "__main__":
    sys.exit(main())
