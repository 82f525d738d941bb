"""The bench/ scripts as the tests load and run them (they are scripts, not a package),
and a CPU stand-in for their timer."""

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


FAKE_MS = 2.0


def run_on_cpu_with_fake_timer(bench, harness, monkeypatch):
    """`bench` (an imported bench script) allocates on the CPU, harness.bench runs the
    timed function once and reports FAKE_MS, torch.compile is the identity: the row
    building, checking and reporting run without a GPU or a compiler."""
    import torch

    monkeypatch.setattr(bench, "DEVICE", "cpu")

    def fake_bench(fn, *, setup=None, **kw):
        if setup is not None:
            setup()
        fn()
        return harness.Timing(median_ms=FAKE_MS, p20_ms=FAKE_MS, p80_ms=FAKE_MS, n_reps=1)

    monkeypatch.setattr(harness, "bench", fake_bench)
    monkeypatch.setattr(torch, "compile", lambda f, **kw: f)
    return bench
