"""`python -m crosslayer.info`: what this install was built with and what runs fused.

Prints torch and CUDA versions, whether crosslayer._C was built and for which
architectures, the GPU seen (and whether the build covers it), whether the JIT path
(NVRTC through CuPy) can run, and which backend runs each op now -- with no GPU visible,
the oracle for all, and then also which backend each would take on a GPU.
"""

from __future__ import annotations

import argparse
import os

import torch

from crosslayer import _nvrtc, ops
from crosslayer._extension import _C, archs_cover, forced_backend, jit_backend, recorded_archs
from crosslayer._extension import build_info as _recorded_build_info


def build_info() -> dict:
    """The build record plus what is loaded now.

    Keys: torch_version, torch_cuda (the running torch's), built_cuda (the extension is
    loaded), archs (list of "major.minor" it was compiled for), built_torch_version,
    nvcc_version, cuda_home, skip_reason, extension_disabled.
    """
    rec = _recorded_build_info()
    archs = recorded_archs(rec)
    return {
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "built_cuda": _C is not None,
        "archs": archs,
        "built_torch_version": rec.get("torch_version"),
        "nvcc_version": rec.get("nvcc_version"),
        "cuda_home": rec.get("cuda_home"),
        "skip_reason": rec.get("skip_reason", "no build record (run setup.py / pip install)"),
        "extension_disabled": os.environ.get("CROSSLAYER_DISABLE_EXTENSION") == "1",
    }


def _covered(names) -> str:
    return "every op" if sorted(names) == sorted(ops.ALL_OPS) else ", ".join(names)


def report() -> str:
    info = build_info()
    lines = [
        f"torch            {info['torch_version']} (CUDA {info['torch_cuda']})",
        f"crosslayer._C    {'built' if info['built_cuda'] else 'not built'}"
        + (f" for sm {', '.join(info['archs'])}, nvcc {info['nvcc_version']}, "
           f"against torch {info['built_torch_version']}" if info["built_cuda"] else ""),
    ]
    if not info["built_cuda"]:
        reason = "CROSSLAYER_DISABLE_EXTENSION=1" if info["extension_disabled"] else info["skip_reason"]
        lines.append(f"                 reason: {reason}")
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        cap = f"{major}.{minor}"
        # Only a loaded extension covers anything: with CROSSLAYER_DISABLE_EXTENSION=1 the
        # build record still lists archs, but every op runs on the oracle.
        covered = info["built_cuda"] and archs_cover(info["archs"], (major, minor))
        lines.append(
            f"GPU              {torch.cuda.get_device_name()} (sm {cap}); "
            + ("the build covers it" if covered else
               f"NOT covered by the build's architectures {info['archs']}: rebuild with "
               f"TORCH_CUDA_ARCH_LIST={cap}" if info["built_cuda"] else "no extension")
        )
    else:
        lines.append("GPU              none visible")
    jit, why = jit_backend()
    lines.append("JIT path         " + (f"available (NVRTC {_nvrtc.nvrtc_version()} through CuPy; covers "
                                        f"{_covered(jit.OPS)}; cache {_nvrtc.cache_dir()})" if jit is not None
                                        else f"unavailable: {why}"))
    forced = forced_backend()
    backends = "                 " + ", ".join(f"{op}: {backend}" for op, backend in ops.backends().items())
    forced_note = f", forced by CROSSLAYER_BACKEND={forced}" if forced else ""
    if torch.cuda.is_available():
        lines.append(f"runs now         on {torch.cuda.get_device_name()}{forced_note}:")
        lines.append(backends)
    else:
        # Built is not running: without a GPU no tensor is a CUDA tensor, and CPU tensors
        # always take the oracle.
        lines.append("runs now         every op on the oracle: no GPU visible (CPU tensors always run the oracle)")
        lines.append(f"on a GPU         what would run on one the build covers{forced_note}:")
        lines.append(backends)
    return "\n".join(lines)


def main(argv=None) -> None:
    # No flags but -h: argparse refuses anything else (exit status 2) instead of ignoring it.
    argparse.ArgumentParser(prog="python -m crosslayer.info", description=__doc__.split("\n\n")[0]).parse_args(argv)
    print(report())


if __name__ == "__main__":
    main()
