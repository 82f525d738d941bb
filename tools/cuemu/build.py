"""Build crosslayer's launchers and kernels as a CPU extension that emulates the GPU.

    python tools/cuemu/build.py            # builds (incrementally) and prints the module path
    from tools.cuemu.build import load     # in tests: the module, same functions as crosslayer._C

The module `crosslayer_cuemu` has the functions of `crosslayer._C` (csrc/bindings.cpp),
taking CPU tensors where `_C` takes CUDA tensors. It is made from csrc/ by copying the
sources into the build directory with five mechanical rewrites, and nothing else:

  kernel<<<grid, block, smem, stream>>>(args);  ->  ::cuemu::Launch(grid, block, smem, stream).run("kernel", kernel, args);
  extern __shared__ __align__(A) unsigned char s[];  ->  unsigned char* s = ::cuemu::dynamic_smem();
  asm volatile("mma.sync..." : outs : ins);     ->  ::cuemu::mma_sync("mma.sync...", outs..., ins...);
  x.is_cuda()                                    ->  x.is_cpu()   (the emulated device is the CPU)
  __global__ void __launch_bounds__(B) k(...) {  ->  __global__ void k(...) { ::cuemu::check_launch_bounds(B);

then compiling them with g++ (torch.utils.cpp_extension.load, so ninja rebuilds only what
changed), with tools/cuemu/cuemu.h force-included and tools/cuemu/include/ ahead of the
CUDA and c10/cuda headers. See cuemu.h for the execution model and what it checks.

Every memory access of the emulated code calls the traffic counter (module cuemu_count,
tools/cuemu/count_rt.cpp, built first and linked by path): the sources are compiled with
AddressSanitizer's instrumentation in call mode, whose callbacks are the counter's. When
nothing is being counted a callback returns at once; see count_rt.cpp for what it counts.

Environment: CUEMU_BUILD_DIR (default build/cuemu under the repo), MAX_JOBS.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")
# The defines every compiler of crosslayer's CUDA code gets (csrc/build_flags.json).
with open(os.path.join(CSRC, "build_flags.json")) as _f:
    DEFINES = json.load(_f)["defines"]
MODULE = "crosslayer_cuemu"
COUNTER = "cuemu_count"


def _kernel_expr_start(src: str, end: int) -> int:
    """Start of the kernel expression that ends at `end` (just before `<<<`): an
    identifier path, optionally followed by one balanced template argument list."""
    i = end
    while i > 0 and src[i - 1].isspace():
        i -= 1
    if i > 0 and src[i - 1] == ">":
        depth = 0
        while i > 0:
            i -= 1
            if src[i] == ">":
                depth += 1
            elif src[i] == "<":
                depth -= 1
                if depth == 0:
                    break
    while i > 0 and (src[i - 1].isalnum() or src[i - 1] in "_:"):
        i -= 1
    return i


def _balanced(src: str, open_at: int) -> int:
    """Index just past the parenthesis that closes the one at `open_at`."""
    depth = 0
    for j in range(open_at, len(src)):
        if src[j] == "(":
            depth += 1
        elif src[j] == ")":
            depth -= 1
            if depth == 0:
                return j + 1
    raise ValueError("unbalanced parentheses")


def rewrite_launches(src: str) -> str:
    out = []
    pos = 0
    while True:
        k = src.find("<<<", pos)
        if k < 0:
            out.append(src[pos:])
            return "".join(out)
        start = _kernel_expr_start(src, k)
        kernel = src[start:k].strip()
        cfg_end = src.index(">>>", k)
        config = src[k + 3 : cfg_end].strip()
        paren = src.index("(", cfg_end)
        close = _balanced(src, paren)
        args = src[paren + 1 : close - 1].strip()
        name = " ".join(kernel.split())
        call = f"::cuemu::Launch({config}).run(\"{name}\", {kernel}{', ' + args if args else ''})"
        call = call.replace("\n", " ") + "\n" * src.count("\n", start, close)  # keep line numbers
        out.append(src[pos:start])
        out.append(call)
        pos = close


_SMEM = re.compile(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?unsigned\s+char\s+(\w+)\s*\[\s*\]\s*;")
_ASM = re.compile(r"asm\s+volatile\s*\(\s*((?:\"[^\"]*\"\s*)+):([^:]*):([^;]*?)\)\s*;", re.S)
_OPERAND = re.compile(r"\"[^\"]*\"\s*\(([^()]*(?:\([^()]*\)[^()]*)*)\)")


def _rewrite_asm(m: re.Match) -> str:
    instr = "".join(re.findall(r"\"([^\"]*)\"", m.group(1)))
    outs = _OPERAND.findall(m.group(2))
    ins = _OPERAND.findall(m.group(3))
    if not instr.startswith("mma.sync") or len(outs) != 4 or len(ins) != 6:
        raise ValueError(f"cuemu cannot emulate this inline asm: {m.group(0)!r}")
    instr = instr.replace("\\n", "")
    operands = ", ".join(" ".join(o.split()) for o in outs + ins)
    return f'::cuemu::mma_sync("{instr}", {operands});' + "\n" * m.group(0).count("\n")


_BOUNDS = re.compile(r"(__global__\s+void\s+)__launch_bounds__\(")


def rewrite_launch_bounds(src: str) -> str:
    """`__global__ void __launch_bounds__(B...) name(...) {` -> the bounds checked at run
    time as the body's first statement (a block above them fails to launch on a GPU)."""
    while True:
        m = _BOUNDS.search(src)
        if not m:
            return src
        open_at = m.end() - 1
        close = _balanced(src, open_at)
        bounds = src[open_at + 1 : close - 1]
        body = src.index("{", close)
        src = (src[: m.start()] + m.group(1) + src[close:body + 1]
               + f" ::cuemu::check_launch_bounds({bounds});" + src[body + 1 :])


def rewrite(src: str) -> str:
    src = rewrite_launch_bounds(src)
    src = rewrite_launches(src)
    src = _SMEM.sub(r"unsigned char* \1 = ::cuemu::dynamic_smem();", src)
    src = _ASM.sub(_rewrite_asm, src)
    src = src.replace(".is_cuda()", ".is_cpu()")
    return src


def build_dir() -> str:
    return os.environ.get("CUEMU_BUILD_DIR", os.path.join(ROOT, "build", "cuemu"))


def write_sources(dst: str, src_root: str = CSRC) -> list[str]:
    """Rewritten copies of src_root's files under dst/src; returns the translation units
    (its top-level .cu and .cpp files). Files whose text is unchanged are not rewritten,
    so ninja rebuilds only what changed."""
    sources = []
    for path in sorted(glob.glob(os.path.join(src_root, "**", "*"), recursive=True)):
        if os.path.isdir(path):
            continue
        rel = os.path.relpath(path, src_root)
        with open(path, encoding="utf-8") as f:
            text = rewrite(f.read())
        ext = os.path.splitext(rel)[1]
        if ext == ".cu":
            rel = rel[:-3] + ".cu.cpp"
        target = os.path.join(dst, "src", rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        old = None
        if os.path.exists(target):
            with open(target, encoding="utf-8") as f:
                old = f.read()
        if old != text:
            with open(target, "w", encoding="utf-8") as f:
                f.write(text)
        if rel.endswith((".cu.cpp", ".cpp")) and os.path.dirname(rel) == "":
            sources.append(target)
    return sources


# Every access through a callback of the counter (count_rt.cpp): AddressSanitizer's
# instrumentation in call mode, without its stack and global redzones; frame pointers so
# the counter can name an access by its call site and its caller's. (And in the flags
# below, -fno-tree-sra: a Vec<T, N> loaded whole and read by element stays one 16-byte
# access, as nvcc's LDG.128, instead of N narrow ones; -finline-small-functions for speed.)
INSTRUMENT = ["-fsanitize=address", "--param", "asan-instrumentation-with-call-threshold=0",
              "--param", "asan-stack=0", "--param", "asan-globals=0", "-fno-omit-frame-pointer"]


@functools.lru_cache(maxsize=None)
def load_counter(verbose: bool = False):
    """Builds (incrementally) and imports the traffic counter, module cuemu_count, once a
    process. Import it before allocating the tensors to count: its allocator registers them."""
    from torch.utils.cpp_extension import load as load_ext

    dst = os.path.join(build_dir(), COUNTER)
    os.makedirs(dst, exist_ok=True)
    return load_ext(
        name=COUNTER,
        sources=[os.path.join(HERE, "count_rt.cpp")],
        extra_cflags=["-O2", "-fno-omit-frame-pointer"],
        build_directory=dst,
        with_cuda=False,
        verbose=verbose,
    )


def load(verbose: bool = False, name: str = MODULE, src_root: str = CSRC):
    """Builds (incrementally) and imports the emulated extension: crosslayer's csrc/ by
    default, or the sources under `src_root` as module `name` (the emulator's own tests).
    The counter (load_counter) is built and imported first: the module links against it."""
    from torch.utils.cpp_extension import load as load_ext

    counter = load_counter(verbose)
    dst = build_dir() if src_root == CSRC else os.path.join(build_dir(), name)
    sources = write_sources(dst, src_root)
    os.makedirs(os.path.join(dst, "obj"), exist_ok=True)
    return load_ext(
        name=name,
        sources=sources,
        extra_include_paths=[os.path.join(HERE, "include"), HERE, os.path.join(dst, "src")],
        extra_cflags=["-O1", "-finline-small-functions", "-fno-tree-sra", "-include", os.path.join(HERE, "cuemu.h"), "-Wno-unused-variable",
                      "-Wno-attributes", "-Wno-ignored-attributes", *DEFINES, *INSTRUMENT],
        extra_ldflags=["-Wl,--allow-multiple-definition", counter.__file__],
        build_directory=os.path.join(dst, "obj"),
        with_cuda=False,
        verbose=verbose,
    )


if __name__ == "__main__":
    mod = load(verbose="-v" in sys.argv)
    print(mod.__file__)
