"""NVRTC compilation of crosslayer's kernel headers through CuPy's NVRTC binding: the
compiler of the no-build (JIT) path. It needs no nvcc and no GPU: the headers in csrc/
(torch-free, NVRTC-clean: common/std.cuh), the toolkit's bf16/fp16 headers and libcu++.

    compiled = compile_kernels("kernels/hc_post.cuh",
                               ["crosslayer::hc_post_fwd_kernel<__nv_bfloat16, 8, 4>"], "sm_90")
    compiled.cubin                      # bytes, for cuModuleLoadData
    compiled.lowered[name]              # the kernel's mangled name in the cubin

One NVRTC program per call: the header, every requested instantiation as a name
expression, the options of csrc/build_flags.json ("nvrtc" and "defines"). Results are
cached on disk, keyed by the kernel sources (every file under csrc/kernels and
csrc/common), the options, the architecture, the NVRTC version and the names: the
directory $CROSSLAYER_JIT_CACHE, else $XDG_CACHE_HOME/crosslayer/jit, else
~/.cache/crosslayer/jit.

Found on a machine without a GPU (cupy-cuda13x 14.2, torch 2.14.1's CUDA 13 wheels):
CuPy's high-level compile_using_nvrtc asks the driver for the architecture and fails
there; the binding used here (cupy_backends.cuda.libs.nvrtc) does not.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib.util
import json
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class JitUnavailable(RuntimeError):
    """The NVRTC path cannot compile here (no CuPy, no kernel headers, no CUDA headers):
    the message says which and what to install."""


@dataclass
class Compiled:
    """One NVRTC program's output: the cubin and each name expression's mangled name."""

    cubin: bytes
    lowered: Dict[str, str]
    arch: str
    seconds: float = 0.0        # compile time (0 when read from the cache)
    cached: bool = False
    log: str = field(default="", repr=False)


def _binding():
    try:
        from cupy_backends.cuda.libs import nvrtc
    except ImportError as e:
        raise JitUnavailable(
            f"crosslayer's JIT path needs CuPy's NVRTC binding ({e}): pip install cupy-cuda13x "
            "(cupy-cuda12x for a CUDA 12 torch)") from e
    return nvrtc


def nvrtc_version() -> str:
    major, minor = _binding().getVersion()
    return f"{major}.{minor}"


def csrc_dir() -> str:
    """The kernel headers: crosslayer/csrc inside an installed package, else the checkout's
    csrc/ (an editable install)."""
    for path in (os.path.join(PACKAGE_DIR, "csrc"), os.path.join(os.path.dirname(os.path.dirname(PACKAGE_DIR)), "csrc")):
        if os.path.isfile(os.path.join(path, "build_flags.json")) and os.path.isdir(os.path.join(path, "kernels")):
            return path
    raise JitUnavailable(f"crosslayer's kernel headers (csrc/) are not next to the package at {PACKAGE_DIR}")


@functools.lru_cache(maxsize=None)
def build_flags() -> dict:
    with open(os.path.join(csrc_dir(), "build_flags.json")) as f:
        return json.load(f)


def _package_dir(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _cuda_include_dir() -> str:
    """A directory with cuda_bf16.h: $CUDA_PATH or $CUDA_HOME's include, the CUDA 13 or 12
    runtime headers of pip's nvidia packages (torch's CUDA wheels), /usr/local/cuda."""
    candidates = [os.path.join(os.environ[v], "include") for v in ("CUDA_PATH", "CUDA_HOME") if os.environ.get(v)]
    nvidia = _package_dir("nvidia")
    if nvidia is not None:
        candidates += [os.path.join(nvidia, "cu13", "include"), os.path.join(nvidia, "cuda_runtime", "include")]
    candidates.append("/usr/local/cuda/include")
    for path in candidates:
        if os.path.isfile(os.path.join(path, "cuda_bf16.h")):
            return path
    raise JitUnavailable("no CUDA headers (cuda_bf16.h) found: set CUDA_PATH to a toolkit, or install torch's "
                         f"CUDA wheels (nvidia-cuda-runtime); looked in {', '.join(candidates)}")


def _libcudacxx_dir() -> str:
    """libcu++ (<cuda/std/...>) as CuPy ships it, else the toolkit's CCCL."""
    candidates = []
    cupy = _package_dir("cupy")
    if cupy is not None:
        candidates.append(os.path.join(cupy, "_core", "include", "cupy", "_cccl", "libcudacxx"))
    cuda = _cuda_include_dir()
    candidates += [os.path.join(cuda, "cccl"), cuda]
    for path in candidates:
        if os.path.isfile(os.path.join(path, "cuda", "std", "cstdint")):
            return path
    raise JitUnavailable(f"no libcu++ (cuda/std/cstdint) found; looked in {', '.join(candidates)}")


@functools.lru_cache(maxsize=None)
def include_dirs() -> Tuple[str, ...]:
    """csrc/, libcu++ and the CUDA headers: found once a process (every compile and cache
    key reads them)."""
    return csrc_dir(), _libcudacxx_dir(), _cuda_include_dir()


def options(arch: str) -> List[str]:
    """NVRTC's options for `arch` ("sm_90"): build_flags.json's, the include directories."""
    flags = build_flags()
    return [f"-arch={arch}", *flags["nvrtc"], *flags["defines"], *(f"-I{d}" for d in include_dirs())]


def kernel_sources(root: str) -> List[str]:
    """The kernel-side sources under `root` (a csrc/): build_flags.json's
    `kernel_sources` globs, sorted, relative to root."""
    files = set()
    for pattern in build_flags()["kernel_sources"]:
        files.update(os.path.relpath(f, root) for f in glob.glob(os.path.join(root, pattern), recursive=True))
    return sorted(files)


@functools.lru_cache(maxsize=None)
def _sources_digest() -> str:
    """sha256 over every kernel-side source (kernel_sources), paths included."""
    h = hashlib.sha256()
    root = csrc_dir()
    for rel in kernel_sources(root):
        h.update(rel.encode() + b"\0")
        with open(os.path.join(root, rel), "rb") as f:
            h.update(f.read() + b"\0")
    return h.hexdigest()


def cache_dir() -> str:
    if os.environ.get("CROSSLAYER_JIT_CACHE"):
        return os.environ["CROSSLAYER_JIT_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "crosslayer", "jit")


def cache_key(header: str, names: Sequence[str], arch: str) -> str:
    h = hashlib.sha256()
    for part in (_sources_digest(), nvrtc_version(), arch, header, json.dumps(options(arch)), *names):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:32]


def _read_cache(key: str, arch: str) -> Compiled | None:
    base = os.path.join(cache_dir(), key)
    try:
        with open(base + ".json") as f:
            lowered = json.load(f)
        with open(base + ".cubin", "rb") as f:
            cubin = f.read()
    except (OSError, ValueError):
        return None
    return Compiled(cubin, lowered, arch, cached=True)


def _write_cache(key: str, compiled: Compiled) -> None:
    """Both files written under temporary names and renamed, the cubin first: a reader
    finds the pair complete or misses."""
    os.makedirs(cache_dir(), exist_ok=True)
    base = os.path.join(cache_dir(), key)
    for suffix, data in ((".cubin", compiled.cubin), (".json", json.dumps(compiled.lowered).encode())):
        tmp = f"{base}{suffix}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, base + suffix)


def compile_kernels(header: str, names: Sequence[str], arch: str, use_cache: bool = True) -> Compiled:
    """The instantiations `names` (name expressions: "crosslayer::kernel<args>") of the
    kernel templates declared by `header` (relative to csrc/), compiled for `arch`
    ("sm_80", "sm_90", ...) in one NVRTC program, or read from the cache. Raises
    JitUnavailable when NVRTC or the headers are missing, RuntimeError with NVRTC's log
    when the program does not compile."""
    names = list(dict.fromkeys(names))
    if not names:
        raise ValueError("compile_kernels: no kernel names")
    key = cache_key(header, names, arch) if use_cache else None
    if key is not None:
        hit = _read_cache(key, arch)
        if hit is not None and set(hit.lowered) == set(names):
            return hit
    nvrtc = _binding()
    opts = options(arch)
    source = f'#include "{header}"\n'
    start = time.perf_counter()
    prog = nvrtc.createProgram(source, f"crosslayer_{os.path.basename(header)}.cu", [], [])
    try:
        for name in names:
            nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, opts)
        except nvrtc.NVRTCError as e:
            raise RuntimeError(f"NVRTC could not compile {header} for {arch} ({e}):\n"
                               f"{nvrtc.getProgramLog(prog)}") from e
        lowered = {name: nvrtc.getLoweredName(prog, name) for name in names}
        compiled = Compiled(nvrtc.getCUBIN(prog), lowered, arch, seconds=time.perf_counter() - start,
                            log=nvrtc.getProgramLog(prog))
    finally:
        nvrtc.destroyProgram(prog)
    if key is not None:
        _write_cache(key, compiled)
    return compiled
