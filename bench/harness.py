"""Shared benchmark harness for crosslayer's microbenchmarks.

Every bench script follows the same recipe (DESIGN.md "Traffic floors" and
"Performance yardsticks"; .library/device/METHOD.md):

0. `bench_parser()` / `parse_bench_args()`: the options every script takes (--quick,
   --dtype, --variants, --csv, --warmup-ms, --rep-ms) and the checks of its name lists.
1. `require_cuda()` first, before crosslayer is imported: no GPU -> a clear message
   and exit status 2.
2. `measure_copy_bandwidth()`: the bytes/s of a 1 GiB device-to-device copy
   (bytes read + bytes written), measured once per process. Every floor is
   floor_bytes / this number.
3. For each size: `run_gated()` of every variant, one `Row` each: a correctness gate
   (`check_outputs`) against the eager oracle's outputs, then `bench()`.
4. `finalize_rows()` adds the derived columns (GB/s, % of copy bandwidth, floor ms,
   x floor, speedups vs the eager and compiled oracles); a `Report` prints them
   (`print_table()`), appends them with the machine's metadata (`append_csv()`) and
   ends with the SUMMARY lines (`summary_lines()`) and the exit status.

Cache policy: the L2 is FLUSHED before every timed run (triton.testing.do_bench's
way): `flush_l2()` writes a buffer of max(256 MiB, 4 x L2) bytes outside the timed
region, so every run starts with a cold L2 (50 MB on an H100). Inputs are not
rotated; with the flush one input set is enough, at any size.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import functools
import math
import os
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

NO_GPU_MESSAGE = "no CUDA device; benchmarks need a GPU"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CSV = REPO_ROOT / "bench" / "results" / "results.csv"

# Relative error ||out - ref|| / ||ref|| a variant may have against the eager oracle
# (fp32 math) before its row is marked WRONG. bf16 is the brief's 1e-2; the others
# are a few times the dtype's rounding of the output.
REL_TOL = {
    torch.bfloat16: 1e-2,
    torch.float16: 5e-3,
    torch.float32: 1e-4,
    torch.float64: 1e-10,
}

DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
               torch.float64: "fp64"}

L2_FLUSH_MIN_BYTES = 256 << 20

# Every bench's modes and oracle variants (a script may add variants after these). The
# eager oracle runs first: it is the reference every other variant is gated against.
MODES = ("fwd", "fwd+bwd")
VARIANTS = ("eager_oracle", "fused", "compile_oracle")
DISPLAY_ORDER = ("fused", "eager_oracle", "compile_oracle")


# --------------------------------------------------------------------------- device

def require_cuda() -> None:
    """Exit with status 2 and a clear message when no CUDA device is present."""
    if not torch.cuda.is_available():
        print(NO_GPU_MESSAGE, file=sys.stderr, flush=True)
        sys.exit(2)


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise SystemExit(f"unknown dtype {name!r}; expected one of {sorted(set(DTYPES))}")


@functools.cache
def _flush_buffer() -> torch.Tensor:
    l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()),
                 "L2_cache_size", 0)
    nbytes = max(L2_FLUSH_MIN_BYTES, 4 * int(l2))
    return torch.empty(nbytes // 4, dtype=torch.int32, device="cuda")


def flush_l2() -> None:
    """Evict the L2 by writing a buffer several times its size (stream-ordered)."""
    _flush_buffer().zero_()


def l2_policy() -> str:
    return f"flush {_flush_buffer().numel() * 4 >> 20} MiB before each run"


# --------------------------------------------------------------------------- args

def name_list(text: str) -> list[str]:
    """argparse type of a comma-separated list of names."""
    return [v.strip() for v in text.split(",") if v.strip()]


def bench_parser(doc: str, quick_help: str, variants: Sequence[str]) -> argparse.ArgumentParser:
    """The options every bench script takes: --quick, --dtype, --variants (default all of
    `variants`), --csv, --warmup-ms, --rep-ms; the description is the first line of the
    script's docstring. The script adds its sizes and ops, then calls parse_bench_args."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--dtype", default="bf16", help="activation dtype: bf16, fp16, fp32")
    p.add_argument("--variants", type=name_list, default=list(variants),
                   help=f"comma-separated subset of {','.join(variants)}")
    p.add_argument("--csv", default=str(DEFAULT_CSV),
                   help="CSV file the rows are appended to (default bench/results/results.csv)")
    p.add_argument("--warmup-ms", type=float, default=None)
    p.add_argument("--rep-ms", type=float, default=None)
    return p


def parse_bench_args(p: argparse.ArgumentParser, argv, **allowed: Sequence[str]) -> argparse.Namespace:
    """p.parse_args(argv); then each name list `dest` of `allowed` (e.g. variants=VARIANTS,
    ops=OPS; None: not given) must hold only allowed names (else a usage error), and
    eager_oracle, the correctness reference, is put first in args.variants if missing."""
    args = p.parse_args(argv)
    for dest, names in allowed.items():
        for v in getattr(args, dest) or []:
            if v not in names:
                p.error(f"unknown {dest.removesuffix('s')} {v!r}; choose from {tuple(names)}")
    if "eager_oracle" not in args.variants:
        args.variants.insert(0, "eager_oracle")
    return args


# --------------------------------------------------------------------------- timing

@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    n_reps: int
    clocks: dict = field(default_factory=dict)  # SM/memory clocks read right after


def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of an already sorted list."""
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def _timed_runs(fn: Callable[[], object], setup: Callable[[], None] | None,
                n: int) -> list[float]:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        if setup is not None:
            setup()
        flush_l2()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def bench(fn: Callable[[], object], *, setup: Callable[[], None] | None = None,
          warmup_ms: float = 25.0, rep_ms: float = 200.0,
          min_reps: int = 5, max_reps: int = 1000) -> Timing:
    """Time `fn()` on the current stream with CUDA events.

    Each timed run: `setup()` (untimed: e.g. set input grads to None), `flush_l2()`
    (untimed), start event, `fn()`, end event. Returns the median and the 20th/80th
    percentiles in ms over n runs, n = rep_ms / (estimated time) clamped to
    [min_reps, max_reps]; warm-up runs (warmup_ms worth, at least one, plus the
    first call that triggers module load / compilation) come first, untimed.

    Forward-only: `fn` runs the forward. Forward+backward: use `fwd_bwd()`, whose
    `fn` runs the forward then `torch.autograd.backward` with a pre-made gradient,
    and whose `setup` sets the inputs' .grad to None so that autograd stores the
    fresh gradient instead of accumulating (+=) into the last run's, which would add
    a read and a write of every gradient to the timed traffic.
    """
    if setup is not None:
        setup()
    fn()  # first call: lazy init, compilation, allocator warm-up
    torch.cuda.synchronize()
    # Estimate: one timed run, more only while they are cheap.
    est = _timed_runs(fn, setup, 1)[0]
    if est < 20.0:
        est = _quantile(sorted(_timed_runs(fn, setup, 5)), 0.5)
    est = max(est, 1e-3)
    n_warmup = max(1, int(warmup_ms / est))
    n_rep = int(min(max_reps, max(min_reps, rep_ms / est)))
    _timed_runs(fn, setup, n_warmup)
    times = sorted(_timed_runs(fn, setup, n_rep))
    return Timing(
        median_ms=_quantile(times, 0.5),
        p20_ms=_quantile(times, 0.2),
        p80_ms=_quantile(times, 0.8),
        n_reps=n_rep,
        clocks=current_clocks(),
    )


def fwd_bwd(forward: Callable[[], torch.Tensor | Sequence[torch.Tensor]],
            grad_outputs: torch.Tensor | Sequence[torch.Tensor],
            inputs: Sequence[torch.Tensor]) -> tuple[Callable[[], None], Callable[[], None]]:
    """(fn, setup) for bench() of forward + backward.

    fn: out = forward(); torch.autograd.backward(out, grad_outputs).
    setup: every input's .grad = None, so each timed backward writes fresh gradients
    (no accumulation traffic from the previous run; DESIGN.md's "fresh gradient
    outputs" floor).
    """
    def fn() -> None:
        out = forward()
        torch.autograd.backward(out, grad_outputs)

    def setup() -> None:
        for t in inputs:
            t.grad = None

    return fn, setup


def timer(forward: Callable[[], object], mode: str, grad_outputs=None, inputs: Sequence[torch.Tensor] = (),
          **timing_kw) -> Callable[[], Timing]:
    """A zero-argument callable timing `forward` ("fwd") or forward + backward into
    `inputs`' fresh gradients ("fwd+bwd", see fwd_bwd) with bench(**timing_kw)."""
    if mode == "fwd":
        return lambda: bench(forward, **timing_kw)

    def timed() -> Timing:
        fn, setup = fwd_bwd(forward, grad_outputs, inputs)
        return bench(fn, setup=setup, **timing_kw)

    return timed


def timing_kwargs(quick: bool, warmup_ms: float | None = None, rep_ms: float | None = None) -> dict:
    """bench()'s warm-up and repetition budget: short with --quick; --warmup-ms and
    --rep-ms override."""
    kw = dict(warmup_ms=10.0, rep_ms=60.0, min_reps=3) if quick else dict(warmup_ms=25.0, rep_ms=200.0, min_reps=5)
    if warmup_ms is not None:
        kw["warmup_ms"] = warmup_ms
    if rep_ms is not None:
        kw["rep_ms"] = rep_ms
    return kw


@functools.cache
def measure_copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB bf16 device-to-device copy, counting read + write bytes.

    Median over many runs (same bench() as every op, L2 flushed); cached per
    process. This is the bandwidth every floor in DESIGN.md is measured against.
    """
    n = (1 << 30) // 2
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), warmup_ms=50.0, rep_ms=300.0, min_reps=20)
    nbytes = 2 * src.numel() * src.element_size()
    del src, dst
    torch.cuda.empty_cache()
    return nbytes / (t.median_ms * 1e-3)


# --------------------------------------------------------------------------- gate

def rel_err(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, int]:
    """(||out - ref|| / ||ref||, number of non-finite elements of out).

    Chunked so that a multi-GB output never needs a full fp32 copy.
    """
    out, ref = out.detach(), ref.detach()
    if out.shape != ref.shape:
        raise ValueError(f"shape mismatch: out {tuple(out.shape)} vs ref {tuple(ref.shape)}")
    o, r = out.reshape(-1), ref.reshape(-1)
    chunk = 1 << 26
    num = torch.zeros((), dtype=torch.float64, device=out.device)
    den = torch.zeros((), dtype=torch.float64, device=out.device)
    bad = torch.zeros((), dtype=torch.int64, device=out.device)
    for i in range(0, o.numel(), chunk):
        oc = o[i:i + chunk].float()
        rc = r[i:i + chunk].float()
        bad += (~torch.isfinite(oc)).sum()
        num += (oc - rc).square().sum(dtype=torch.float64)
        den += rc.square().sum(dtype=torch.float64)
    num_v, den_v, bad_v = num.item(), den.item(), int(bad.item())
    err = math.sqrt(num_v / den_v) if den_v > 0 else math.sqrt(num_v)
    return err, bad_v


def check_outputs(outs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor],
                  dtype: torch.dtype, names: Sequence[str] | None = None
                  ) -> tuple[bool, float, str]:
    """Correctness gate: every output within REL_TOL[dtype] of the oracle, no NaN/inf.

    Returns (ok, worst relative error, message).
    """
    tol = REL_TOL[dtype]
    names = names or [f"out{i}" for i in range(len(outs))]
    worst, msgs, ok = 0.0, [], True
    for name, o, r in zip(names, outs, refs, strict=True):
        if o is None or r is None:
            ok = False
            msgs.append(f"{name}: missing ({'out' if o is None else 'ref'} is None)")
            continue
        err, bad = rel_err(o, r)
        worst = max(worst, err if math.isfinite(err) else math.inf)
        if bad or not math.isfinite(err) or err >= tol:
            ok = False
            msgs.append(f"{name}: rel err {err:.3e} (tol {tol:.0e}), {bad} non-finite")
    return ok, worst, "; ".join(msgs) if msgs else f"rel err {worst:.2e} < {tol:.0e}"


# --------------------------------------------------------------------------- rows

@dataclass
class Row:
    op: str
    variant: str
    mode: str                   # "fwd" or "fwd+bwd"
    shape: str                  # "l=25 N=16384 d=2048 C=4 A=per_token"
    dtype: str
    floor_bytes: int | None     # None: no traffic floor (a whole model's step)
    timing: Timing | None = None
    status: str = "ok"          # ok | ref | WRONG | failed: <Exc> | not-fused
    rel_err: float | None = None
    note: str = ""
    derived: dict = field(default_factory=dict)

    @property
    def time_ms(self) -> float | None:
        return self.timing.median_ms if self.timing is not None else None

    @property
    def failed(self) -> bool:
        return self.timing is None


def run_variant(row: Row, gate: Callable[[], tuple[bool, float, str]] | None,
                timed: Callable[[], Timing], time_wrong: bool = True) -> Row:
    """Fill `row`: run the gate (if any), then the timing; never raise.

    A gate failure marks the row WRONG (printed, and still timed, so the row says
    what a wrong kernel costs, unless time_wrong=False). Any exception marks the row
    "failed: <ExceptionType>" and prints the traceback to stderr.
    """
    try:
        if gate is not None:
            ok, err, msg = gate()
            row.rel_err = err
            if not ok:
                row.status = "WRONG"
                row.note = msg
                print(f"WRONG: {row.op} {row.variant} {row.mode} {row.shape} {row.dtype}: "
                      f"{msg}", file=sys.stderr, flush=True)
                if not time_wrong:
                    return row
        row.timing = timed()
    except Exception as e:  # noqa: BLE001 -- recorded in the row, never skipped
        row.timing = None
        row.status = f"failed: {type(e).__name__}"
        row.note = (str(e).splitlines() or [""])[0][:200]
        print(f"FAILED: {row.op} {row.variant} {row.mode} {row.shape} {row.dtype}: "
              f"{type(e).__name__}: {row.note}", file=sys.stderr)
        traceback.print_exc(limit=4, file=sys.stderr)
        sys.stderr.flush()
        if isinstance(e, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
    return row


def run_gated(row: Row, outputs: Callable[[], Sequence[torch.Tensor | None]],
              timed: Callable[[], Timing], refs: list | None, dtype: torch.dtype,
              names: Sequence[str]) -> list | None:
    """Gate and time the row of one variant (run_variant) against the eager oracle's row,
    which comes first; `outputs()` runs the variant once and returns what the gate
    compares. Returns the reference outputs for the rows after this one.

    eager_oracle: its outputs become the reference; status "ref". Any other variant:
    "failed: no reference" (not run) when `refs` is None, else check_outputs against
    `refs`; a compile_oracle row's note gets the time of its first call (the compile).
    """
    if row.variant == "eager_oracle":
        got = []

        def reference():
            got.append([t.detach() if t is not None else None for t in outputs()])
            return True, 0.0, "reference"

        run_variant(row, reference, timed)
        if row.status == "ok":
            row.status, row.rel_err = "ref", None
        return got[0] if got else None
    if refs is None:
        row.status = "failed: no reference"
        row.note = "the eager oracle failed, so nothing was checked or timed"
        return None
    first_call_s = []

    def gate():
        t0 = time.perf_counter()
        outs = outputs()
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        first_call_s.append(time.perf_counter() - t0)
        return check_outputs(outs, refs, dtype, names)

    run_variant(row, gate, timed)
    if row.variant == "compile_oracle" and first_call_s:
        row.note = (row.note + "; " if row.note else "") + f"first call (compile) {first_call_s[0]:.1f} s"
    return refs


def exit_status(rows: Sequence[Row]) -> int:
    """0 when every fused row is ok (or none ran), 3 otherwise."""
    bad = [r for r in rows if r.variant == "fused" and (r.status != "ok" or r.failed)]
    return 3 if bad else 0


def finalize_rows(rows: Sequence[Row], copy_bw: float) -> None:
    """Derived columns. Rows of one (op, mode, shape, dtype) group share the
    eager_oracle and compile_oracle times for their speedup columns."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.op, r.mode, r.shape, r.dtype), []).append(r)
    for group in groups.values():
        ref_t = {r.variant: r.time_ms for r in group}
        for r in group:
            d = {}
            t = r.time_ms
            if r.floor_bytes is not None:
                d["floor_ms"] = r.floor_bytes / copy_bw * 1e3
            if t is not None and t > 0:
                if r.floor_bytes is not None:
                    gbps = r.floor_bytes / (t * 1e-3) / 1e9
                    d["gbps"] = gbps
                    d["pct_copy_bw"] = 100.0 * gbps * 1e9 / copy_bw
                    d["x_floor"] = t / d["floor_ms"]
                for key, variant in (("speedup_vs_eager", "eager_oracle"),
                                     ("speedup_vs_compile", "compile_oracle")):
                    base = ref_t.get(variant)
                    if base is not None:
                        d[key] = base / t
            r.derived = d


# --------------------------------------------------------------------------- output

def _fmt(v, spec: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return format(v, spec)


TABLE_COLUMNS = [
    # header, getter(row) -> str
    ("op", lambda r: r.op),
    ("shape", lambda r: r.shape),
    ("dtype", lambda r: r.dtype),
    ("mode", lambda r: r.mode),
    ("variant", lambda r: r.variant),
    ("ms", lambda r: _fmt(r.time_ms, ".3f") if not r.failed else r.status),
    ("p20-p80", lambda r: (f"{r.timing.p20_ms:.3f}-{r.timing.p80_ms:.3f}"
                           if r.timing else "-")),
    ("GB/s", lambda r: _fmt(r.derived.get("gbps"), ".0f")),
    ("%copyBW", lambda r: _fmt(r.derived.get("pct_copy_bw"), ".1f")),
    ("floor ms", lambda r: _fmt(r.derived.get("floor_ms"), ".3f")),
    ("x floor", lambda r: _fmt(r.derived.get("x_floor"), ".2f")),
    ("vs eager", lambda r: _fmt(r.derived.get("speedup_vs_eager"), ".2f")),
    ("vs compile", lambda r: _fmt(r.derived.get("speedup_vs_compile"), ".2f")),
    ("rel err", lambda r: _fmt(r.rel_err, ".1e")),
    ("status", lambda r: r.status),
]
_LEFT = {"op", "shape", "dtype", "mode", "variant", "status"}


def format_table(rows: Sequence[Row], columns=TABLE_COLUMNS) -> str:
    """Fixed-width table: text columns left-aligned, numbers right-aligned."""
    cells = [[get(r) for _, get in columns] for r in rows]
    heads = [h for h, _ in columns]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(heads)]

    def line(vals):
        return "  ".join(v.ljust(w) if h in _LEFT else v.rjust(w)
                         for v, w, h in zip(vals, widths, heads)).rstrip()

    out = [line(heads), "  ".join("-" * w for w in widths)]
    out += [line(c) for c in cells]
    return "\n".join(out)


def print_table(rows: Sequence[Row], columns=TABLE_COLUMNS) -> None:
    print(format_table(rows, columns), flush=True)


def summary_lines(rows: Sequence[Row], dname: str,
                  describe: Callable[[str, dict], tuple[str, bool] | None]) -> tuple[list[str], bool]:
    """One "SUMMARY <op> <dtype> <shape> | <part> | ... | OK" line per (op, shape) of
    `rows`, in the order they first appear: a part per mode with rows (same order),
    describe(mode, {variant: row}) -> (text, ok), or None to leave the mode out. The
    verdict is FUSED NOT OK when a part is not ok. Returns (lines, all ok)."""
    groups: dict[tuple[str, str], dict[str, dict[str, Row]]] = {}
    for r in rows:
        groups.setdefault((r.op, r.shape), {}).setdefault(r.mode, {})[r.variant] = r
    lines, all_ok = [], True
    for (op, shape), modes in groups.items():
        parts = [part for part in (describe(mode, by) for mode, by in modes.items()) if part is not None]
        ok = all(part_ok for _, part_ok in parts)
        lines.append(f"SUMMARY {op} {dname} {shape} | " + " | ".join(text for text, _ in parts)
                     + (" | OK" if ok else " | FUSED NOT OK"))
        all_ok &= ok
    return lines, all_ok


class Report:
    """The end of every bench's main(): add() prints a batch of finished rows as a table,
    appends them to the CSV and keeps their SUMMARY lines (`summarize(rows)`); finish()
    prints where the rows went, the total time and the SUMMARY lines, and returns the
    exit status (exit_status over every row)."""

    def __init__(self, csv_path: str | os.PathLike, summarize: Callable[[list[Row]], list[str]]):
        self.csv_path, self.summarize = csv_path, summarize
        self.rows: list[Row] = []
        self.summaries: list[str] = []
        self.appended_to: Path | None = None
        self.started = time.perf_counter()

    def add(self, rows: list[Row], copy_bw: float) -> None:
        print_table(rows)
        self.appended_to = append_csv(rows, self.csv_path, copy_bw)
        self.summaries += self.summarize(rows)
        self.rows += rows
        print(flush=True)

    def finish(self) -> int:
        print(f"rows appended to {self.appended_to}; total {time.perf_counter() - self.started:.0f} s")
        for line in self.summaries:
            print(line)
        sys.stdout.flush()
        return exit_status(self.rows)


# --------------------------------------------------------------------------- metadata

_NVML_HANDLE = None
_NVML_STATUS = "not initialised"


def _nvml_handle():
    """The NVML handle of the current torch device (matched by UUID, then PCI bus
    id, then index), or None with _NVML_STATUS saying why."""
    global _NVML_HANDLE, _NVML_STATUS
    if _NVML_HANDLE is not None or _NVML_STATUS != "not initialised":
        return _NVML_HANDLE
    try:
        import pynvml
        pynvml.nvmlInit()
        dev = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(dev)
        handle = None
        uuid = getattr(props, "uuid", None)
        if uuid is not None:
            try:
                handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
            except Exception:  # noqa: BLE001
                handle = None
        if handle is None and hasattr(props, "pci_bus_id"):
            try:
                bus = (f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:"
                       f"{props.pci_device_id:02x}.0")
                handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus)
            except Exception:  # noqa: BLE001
                handle = None
        if handle is None:
            handle = pynvml.nvmlDeviceGetHandleByIndex(dev)
        _NVML_HANDLE, _NVML_STATUS = handle, "ok"
    except Exception as e:  # noqa: BLE001
        _NVML_STATUS = f"pynvml failed: {type(e).__name__}: {e}"[:200]
        print(f"warning: {_NVML_STATUS}; clocks, bus width and driver recorded as "
              f"'unknown'", file=sys.stderr)
    return _NVML_HANDLE


def _nvml(call: str, *args):
    h = _nvml_handle()
    if h is None:
        return "unknown"
    try:
        import pynvml
        v = getattr(pynvml, call)(h, *args)
        return v.decode() if isinstance(v, bytes) else v
    except Exception:  # noqa: BLE001
        return "unknown"


def current_clocks() -> dict:
    """SM/memory clocks (MHz), temperature and clock-event reasons, read now."""
    if _nvml_handle() is None:
        return {"sm_clock_mhz": "unknown", "mem_clock_mhz": "unknown",
                "temp_c": "unknown", "clock_event_reasons": "unknown"}
    import pynvml
    reasons = _nvml("nvmlDeviceGetCurrentClocksEventReasons")
    if reasons == "unknown":
        reasons = _nvml("nvmlDeviceGetCurrentClocksThrottleReasons")
    return {
        "sm_clock_mhz": _nvml("nvmlDeviceGetClockInfo", pynvml.NVML_CLOCK_SM),
        "mem_clock_mhz": _nvml("nvmlDeviceGetClockInfo", pynvml.NVML_CLOCK_MEM),
        "temp_c": _nvml("nvmlDeviceGetTemperature", pynvml.NVML_TEMPERATURE_GPU),
        "clock_event_reasons": (hex(reasons) if isinstance(reasons, int) else reasons),
    }


def git_commit() -> str:
    """`git rev-parse --short HEAD`, plus "-dirty" when tracked files differ from
    HEAD (untracked files such as results are ignored); "unknown" if git fails.
    $BENCH_GIT_COMMIT overrides it (for a copy of the tree without .git, such as
    the lent GPU machine's)."""
    if os.environ.get("BENCH_GIT_COMMIT"):
        return os.environ["BENCH_GIT_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10, check=True
                             ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=30,
                               check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "") if sha else "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


@functools.cache
def static_metadata() -> dict:
    """Per-process metadata stored with every row."""
    meta = {
        "gpu_name": torch.cuda.get_device_name(),
        "sm_clock_max_mhz": "unknown",
        "mem_clock_max_mhz": "unknown",
        "mem_bus_width_bits": "unknown",
        "nvml_peak_bw_gbps": "unknown",
        "driver_version": "unknown",
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda or "unknown",
        "crosslayer_build": "unknown",
        "git_commit": git_commit(),
        "argv": " ".join(shlex.quote(a) for a in sys.argv),
    }
    h = _nvml_handle()
    meta["nvml_status"] = _NVML_STATUS
    if h is not None:
        import pynvml
        name = _nvml("nvmlDeviceGetName")
        if name != "unknown":
            meta["gpu_name"] = name
        meta["sm_clock_max_mhz"] = _nvml("nvmlDeviceGetMaxClockInfo", pynvml.NVML_CLOCK_SM)
        meta["mem_clock_max_mhz"] = _nvml("nvmlDeviceGetMaxClockInfo", pynvml.NVML_CLOCK_MEM)
        meta["mem_bus_width_bits"] = _nvml("nvmlDeviceGetMemoryBusWidth")
        try:
            meta["driver_version"] = pynvml.nvmlSystemGetDriverVersion()
            if isinstance(meta["driver_version"], bytes):
                meta["driver_version"] = meta["driver_version"].decode()
        except Exception:  # noqa: BLE001
            pass
        mclk, bus = meta["mem_clock_max_mhz"], meta["mem_bus_width_bits"]
        if isinstance(mclk, int) and isinstance(bus, int):
            # DDR: two transfers per clock -> 2 * clock * width / 8 bytes/s.
            meta["nvml_peak_bw_gbps"] = round(2 * mclk * 1e6 * bus / 8 / 1e9, 1)
    try:
        from crosslayer.info import build_info
        bi = build_info()
        meta["crosslayer_build"] = (f"built_cuda={bi.get('built_cuda')} "
                                    f"archs={bi.get('archs')}")
    except Exception as e:  # noqa: BLE001
        meta["crosslayer_build"] = f"unknown ({type(e).__name__})"
    return meta


# --------------------------------------------------------------------------- CSV

CSV_COLUMNS = [
    "timestamp_utc", "op", "variant", "mode", "shape", "dtype", "status", "rel_err",
    "time_ms", "time_p20_ms", "time_p80_ms", "n_reps",
    "floor_bytes", "gbps", "pct_copy_bw", "floor_ms", "x_floor",
    "speedup_vs_eager", "speedup_vs_compile", "copy_bw_gbps", "l2_policy",
    "gpu_name", "sm_clock_mhz", "sm_clock_max_mhz", "mem_clock_mhz", "mem_clock_max_mhz",
    "mem_bus_width_bits", "nvml_peak_bw_gbps", "temp_c", "clock_event_reasons",
    "driver_version", "nvml_status", "torch_version", "cuda_version", "crosslayer_build",
    "git_commit", "argv", "note",
]


def _csv_value(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def row_to_record(r: Row, copy_bw: float, timestamp: str) -> dict:
    meta = static_metadata()
    clocks = r.timing.clocks if r.timing is not None else current_clocks()
    rec = {
        "timestamp_utc": timestamp, "op": r.op, "variant": r.variant, "mode": r.mode,
        "shape": r.shape, "dtype": r.dtype, "status": r.status, "rel_err": r.rel_err,
        "time_ms": r.time_ms if r.timing is not None else r.status,
        "time_p20_ms": r.timing.p20_ms if r.timing else None,
        "time_p80_ms": r.timing.p80_ms if r.timing else None,
        "n_reps": r.timing.n_reps if r.timing else None,
        "floor_bytes": r.floor_bytes,
        "copy_bw_gbps": copy_bw / 1e9, "l2_policy": l2_policy(), "note": r.note,
        **{k: r.derived.get(k) for k in ("gbps", "pct_copy_bw", "floor_ms", "x_floor",
                                         "speedup_vs_eager", "speedup_vs_compile")},
        **clocks, **meta,
    }
    return {k: _csv_value(rec.get(k)) for k in CSV_COLUMNS}


def append_csv(rows: Sequence[Row], path: str | os.PathLike, copy_bw: float) -> Path:
    """Append rows to `path` (header written when the file is new). If an existing
    file has another header, the rows go to `<stem>.<n>.csv` beside it instead."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ",".join(CSV_COLUMNS)
    n = 1
    while path.exists() and path.stat().st_size > 0:
        with open(path, newline="") as f:
            first = f.readline().rstrip("\r\n")
        if first == header:
            break
        alt = path.with_name(f"{path.stem.split('.')[0]}.{n}{path.suffix}")
        print(f"warning: {path} has another header; appending to {alt}", file=sys.stderr)
        path, n = alt, n + 1
    new = not path.exists() or path.stat().st_size == 0
    ts = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow(row_to_record(r, copy_bw, ts))
    return path


def print_header(copy_bw: float) -> None:
    """One block of context above every table."""
    m = static_metadata()
    c = current_clocks()
    print(f"GPU {m['gpu_name']} | driver {m['driver_version']} | torch {m['torch_version']}"
          f" | CUDA {m['cuda_version']} | crosslayer {m['crosslayer_build']}"
          f" | git {m['git_commit']}")
    print(f"SM clock {c['sm_clock_mhz']}/{m['sm_clock_max_mhz']} MHz | memory clock "
          f"{c['mem_clock_mhz']}/{m['mem_clock_max_mhz']} MHz | bus {m['mem_bus_width_bits']}"
          f" bit (NVML peak {m['nvml_peak_bw_gbps']} GB/s) | nvml {m['nvml_status']}")
    print(f"measured copy bandwidth {copy_bw / 1e12:.3f} TB/s (1 GiB bf16 copy, read + "
          f"write) | L2: {l2_policy()}", flush=True)
