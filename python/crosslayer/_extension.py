"""Loading of the compiled extension `crosslayer._C`, with clear errors.

`load_extension()` returns the module, or None when the package was installed without
it (pure-Python build, or CROSSLAYER_DISABLE_EXTENSION=1). An extension that was built
against another torch is refused with a message saying what was built against what
and how to rebuild, instead of an undefined-symbol traceback from the dynamic loader.

`kernels_for(t, op)` / `runs_kernels(t)` are the one dispatch rule of every op: CUDA
tensors run on `_C`, CPU tensors on the oracle -- or, inside `emulate(module)`, on the
module built by tools/cuemu (the CUDA launchers and kernels compiled for the CPU
emulator), so tests on a machine without a GPU run the ops' CUDA code path end to end.
"""

from __future__ import annotations

import importlib
import os
import contextlib
from types import ModuleType
from typing import Iterator, Optional

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


def runs_kernels(t: torch.Tensor) -> bool:
    """True when the ops run `t` on kernels: a CUDA tensor with _C built, or a CPU
    tensor inside emulate(); False sends it to the oracle."""
    return (_C is not None) if t.is_cuda else (_emulated is not None)


def kernels_for(t: torch.Tensor, op: str) -> Optional[ModuleType]:
    """The launcher module that runs the custom op `op` on `t`: _C for a CUDA tensor,
    the emulated module for a CPU tensor inside emulate(), None for a CPU tensor
    otherwise (the custom op runs the oracle). A CUDA tensor without _C is an error:
    the public functions never send one to a custom op."""
    if not t.is_cuda:
        return _emulated
    if _C is None:
        raise RuntimeError(
            f"crosslayer._C is not built, so the fused {op} cannot run on CUDA tensors; "
            f"`python -m crosslayer.info` says why. crosslayer.ops.{op} uses the oracle in that case."
        )
    return _C


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
