"""The bench/ scripts as the tests load and run them (they are scripts, not a package)."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def import_bench(name: str):
    """bench/<name>.py imported as a module (bench/ on sys.path only while importing)."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def run_bench(name: str, *args: str, hide_gpu: bool = False) -> subprocess.CompletedProcess:
    """`python bench/<name>.py *args` in a subprocess (the source tree's package first on
    PYTHONPATH; with hide_gpu, CUDA_VISIBLE_DEVICES=""), output captured as text."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if hide_gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run([sys.executable, str(BENCH / f"{name}.py"), *args], env=env,
                          capture_output=True, text=True, timeout=300)
