"""The bench/ scripts as the tests load and run them (they are scripts, not a package),
and a CPU stand-in for their timer."""

import importlib
import importlib.util
import os
import re
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


def import_traffic():
    """bench/traffic.py as the module `bench_traffic`, loaded once (bench/ stays on
    sys.path: its run() imports bench/harness.py when it runs)."""
    if "bench_traffic" in sys.modules:
        return sys.modules["bench_traffic"]
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_traffic", BENCH / "traffic.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_traffic"] = module
    spec.loader.exec_module(module)
    return module


def run_bench(name: str, *args: str, hide_gpu: bool = False) -> subprocess.CompletedProcess:
    """`python bench/<name>.py *args` in a subprocess (the source tree's package first on
    PYTHONPATH; with hide_gpu, CUDA_VISIBLE_DEVICES=""), output captured as text."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if hide_gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run([sys.executable, str(BENCH / f"{name}.py"), *args], env=env,
                          capture_output=True, text=True, timeout=300)


def check_exits_2_without_gpu(name: str) -> None:
    """`python bench/<name>.py --quick` with no visible GPU exits with status 2 and says why
    (before importing crosslayer, so it also holds where the extension is not built)."""
    p = run_bench(name, "--quick", hide_gpu=True)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "no CUDA device" in p.stderr


def docstring_row(doc: str, label: str) -> tuple[int, list[str]]:
    """Row `label` of a bench script's napkin-math table: (its elements per token as a
    multiple of d, the numbers of the "<x> GB" / "<x> ms" cells that follow, in order)."""
    m = re.search(rf"^\s+{re.escape(label)}\s+(\d+)d((?:\s+[\d.]+ (?:GB|ms))+)", doc, re.MULTILINE)
    assert m, f"docstring has no row {label!r}"
    return int(m.group(1)), re.findall(r"([\d.]+) (?:GB|ms)", m.group(2))


def floor_cells(nbytes: int, copy_bw: float = 3.00e12) -> list[str]:
    """The table's GB and ms cells of a floor of `nbytes` at `copy_bw` bytes/s."""
    return [f"{nbytes / 1e9:.3f}", f"{nbytes / copy_bw * 1e3:.3f}"]


def check_stream_table(bench, rows: dict) -> None:
    """The docstring table of an HC-family bench (n = 4, N = 16384, bf16; d = 2048 and
    4096 columns): every row {label: (op, mode)} has the elements and cells its
    floor_elements / floor_bytes give."""
    for label, (op, mode) in rows.items():
        elems, cells = docstring_row(bench.__doc__, label)
        assert elems * 2048 == bench.floor_elements(op, mode, 4, 2048), label
        assert cells == [c for d in (2048, 4096)
                         for c in floor_cells(bench.floor_bytes(op, mode, 16384, 4, d, 2))], label


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
