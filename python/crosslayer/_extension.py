"""Loading of the compiled extension `crosslayer._C`, with clear errors.

`load_extension()` returns the module, or None when the package was installed without
it (pure-Python build, or CROSSLAYER_DISABLE_EXTENSION=1). An extension that was built
against another torch is refused with a message saying what was built against what
and how to rebuild, instead of an undefined-symbol traceback from the dynamic loader.

`kernels_for(t, op)` / `runs_kernels(t, op)` are the one dispatch rule of every op: CUDA
tensors run on the backend `backend_for` picks -- `_C` when built for the GPU, else the
JIT path (crosslayer._jit: kernels NVRTC-compiled through CuPy at first use) for the ops
it covers, else the oracle; CROSSLAYER_BACKEND forces one -- and CPU tensors on the
oracle, or, inside `emulate(module)`, on the module built by tools/cuemu (the CUDA
launchers and kernels compiled for the CPU emulator), so tests on a machine without a
GPU run the ops' CUDA code path end to end.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import re
from types import ModuleType
from typing import Iterator, Optional, Tuple

import torch

REBUILD_HINT = (
    "Rebuild it against the torch you run, from the crosslayer source tree:\n"
    "    CUDA_HOME=/path/to/cuda pip install --no-build-isolation -e .\n"
    "or set CROSSLAYER_DISABLE_EXTENSION=1 to run every op on the PyTorch oracle."
)


class ExtensionMismatchError(ImportError):
    """crosslayer._C does not match the running torch."""


def build_info() -> dict:
    """What setup.py recorded at build time ({} when it never ran, e.g. a bare checkout)."""
    try:
        from crosslayer import _build_info
    except ImportError:
        return {}
    return {k.lower(): v for k, v in vars(_build_info).items() if k.isupper()}


def _base_version(version: str) -> str:
    return version.split("+")[0]


def check_build_matches(info: dict, running_torch: str, running_cuda: Optional[str]) -> None:
    """Raise ExtensionMismatchError when the recorded build does not match the running torch."""
    built = info.get("torch_version")
    if built is not None and built != running_torch:
        raise ExtensionMismatchError(
            f"crosslayer._C was built against torch {built} (CUDA {info.get('torch_cuda')}) "
            f"but torch {running_torch} (CUDA {running_cuda}) is installed. {REBUILD_HINT}"
        )


def load_extension() -> Optional[ModuleType]:
    if os.environ.get("CROSSLAYER_DISABLE_EXTENSION") == "1":
        return None
    info = build_info()
    if info and not info.get("built_cuda", False):
        return None
    check_build_matches(info, torch.__version__, torch.version.cuda)
    try:
        # import_module, not `from crosslayer import _C`: while crosslayer is still
        # initialising, the `from` form turns a missing submodule into a plain
        # ImportError ("cannot import name '_C' from partially initialized module"),
        # which would be mistaken for a broken build below.
        _C = importlib.import_module("crosslayer._C")
    except ModuleNotFoundError as e:
        if e.name != "crosslayer._C":  # _C exists but something it needs is missing
            raise ExtensionMismatchError(
                f"crosslayer._C failed to load: {e}. {REBUILD_HINT}"
            ) from e
        if info:  # setup.py said it built the extension: a missing module is an error.
            raise ImportError(
                f"crosslayer was built with its CUDA extension but crosslayer._C is missing ({e}). "
                f"{REBUILD_HINT}"
            ) from e
        return None
    except ImportError as e:
        raise ExtensionMismatchError(
            f"crosslayer._C failed to load: {e}. The usual cause is a build against another "
            f"torch (running {torch.__version__}, CUDA {torch.version.cuda}; recorded build: "
            f"{info.get('torch_version', 'unknown')}). {REBUILD_HINT}"
        ) from e
    built = _C.built_torch_version()
    if built != _base_version(torch.__version__):
        raise ExtensionMismatchError(
            f"crosslayer._C was compiled with torch {built} headers but torch "
            f"{torch.__version__} is installed. {REBUILD_HINT}"
        )
    return _C


_C = load_extension()


# The kernels CPU tensors run on inside emulate(); None: the oracle.
_emulated: Optional[ModuleType] = None

BACKENDS = ("extension", "jit", "oracle")


def forced_backend() -> Optional[str]:
    """$CROSSLAYER_BACKEND: the backend every op is forced onto for CUDA tensors
    ("extension", "jit" or "oracle"), None when unset (the automatic choice)."""
    value = os.environ.get("CROSSLAYER_BACKEND", "").strip()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"CROSSLAYER_BACKEND={value!r}: choose one of {', '.join(BACKENDS)} (or leave it unset)")
    return value


@functools.lru_cache(maxsize=None)
def jit_backend() -> Tuple[Optional[ModuleType], str]:
    """(crosslayer._jit.launchers, "") when the JIT path can run here (CuPy's NVRTC, the
    kernel headers and the CUDA headers found), else (None, why not)."""
    try:
        from crosslayer import _nvrtc
        from crosslayer._jit import launchers

        _nvrtc.nvrtc_version()
        _nvrtc.include_dirs()
        import cupy  # noqa: F401  (the launches go through CuPy's driver binding)
    except ImportError as e:
        return None, f"CuPy is not importable ({e}): pip install cupy-cuda13x"
    except Exception as e:  # JitUnavailable, NVRTC or CuPy failing to initialise: say which
        return None, f"{type(e).__name__}: {e}"
    return launchers, ""


def recorded_archs(record: dict) -> list:
    """The architectures a build record lists ("8.0", "9.0+PTX", ...; TORCH_CUDA_ARCH_LIST's
    separators: ";", "," or spaces)."""
    return [a for a in re.split(r"[;,\s]+", record.get("cuda_archs", "")) if a]


def archs_cover(archs: list, capability: Tuple[int, int]) -> bool:
    """Whether a build for `archs` holds code compiled for a GPU of `capability`: one of
    them is its architecture ("9.0", or "9.0a" / "9.0+PTX" for 9.0). No list (no build
    record, as after a CMake build): trusted."""
    if not archs:
        return True
    want = f"{capability[0]}.{capability[1]}"
    return any(a.split("+")[0].rstrip("a") == want for a in archs)


@functools.lru_cache(maxsize=None)
def extension_covers(capability: Tuple[int, int]) -> bool:
    """Whether the loaded _C holds code compiled for a GPU of `capability` (archs_cover
    of its build record)."""
    return _C is not None and archs_cover(recorded_archs(build_info()), capability)


def select_backend(op: str, capability: Optional[Tuple[int, int]]) -> str:
    """The backend that runs the op `op` on CUDA tensors of a GPU of `capability` (None:
    not known, as without a visible GPU; the extension is then taken to cover it):
    "extension" (_C, when loaded and built for the GPU), else "jit" (when CuPy can
    compile here and crosslayer._jit covers the op), else "oracle". CROSSLAYER_BACKEND
    forces one: a forced backend that cannot run here is an error, and a forced "jit"
    runs the ops it does not cover on the oracle."""
    forced = forced_backend()
    if forced == "oracle":
        return "oracle"
    if forced == "extension":
        if _C is None:
            raise RuntimeError("CROSSLAYER_BACKEND=extension but crosslayer._C is not built or not loaded; "
                               "`python -m crosslayer.info` says why")
        return "extension"
    jit, why = jit_backend()
    if forced == "jit":
        if jit is None:
            raise RuntimeError(f"CROSSLAYER_BACKEND=jit but the JIT path cannot run here: {why}")
        return "jit" if op in jit.OPS else "oracle"
    if _C is not None and (capability is None or extension_covers(capability)):
        return "extension"
    return "jit" if jit is not None and op in jit.OPS else "oracle"


@torch.compiler.assume_constant_result
def _device_backend(op: str, device_index: int) -> str:
    return select_backend(op, torch.cuda.get_device_capability(device_index))


def backend_for(t: torch.Tensor, op: str) -> str:
    """select_backend for the GPU of the CUDA tensor `t`. Under torch.compile the choice
    is made once, at trace time, and is a constant of the graph (as the extension's
    presence was): set CROSSLAYER_BACKEND before compiling."""
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return _device_backend(op, index)


def runs_kernels(t: torch.Tensor, op: str) -> bool:
    """True when the op `op` runs `t` on kernels: a CUDA tensor whose backend is not
    the oracle (backend_for), or a CPU tensor inside emulate(); False sends it to the
    oracle."""
    return backend_for(t, op) != "oracle" if t.is_cuda else (_emulated is not None)


def kernels_for(t: torch.Tensor, op: str) -> Optional[ModuleType]:
    """The launcher module that runs the custom op `op` on `t`: _C or crosslayer._jit's
    launchers for a CUDA tensor (backend_for), the emulated module for a CPU tensor
    inside emulate(), None for a CPU tensor otherwise (the custom op runs the oracle).
    A CUDA tensor whose backend is the oracle is an error: the public functions never
    send one to a custom op."""
    if not t.is_cuda:
        return _emulated
    backend = backend_for(t, op)
    if backend == "extension":
        return _C
    if backend == "jit":
        return jit_backend()[0]
    raise RuntimeError(
        f"no kernels run the fused {op} on this GPU: crosslayer._C is not built for it and the JIT path "
        f"does not cover it; `python -m crosslayer.info` says why. crosslayer.ops.{op} uses the oracle in that case."
    )


@contextlib.contextmanager
def emulate(module: Optional[ModuleType]) -> Iterator[None]:
    """Within the block, CPU tensors run on `module`'s launchers (tools/cuemu's build of
    csrc/ for the CPU emulator) instead of the oracle; None: on the oracle again (nested
    blocks restore the outer setting). For tests without a GPU."""
    global _emulated
    previous, _emulated = _emulated, module
    try:
        yield
    finally:
        _emulated = previous
