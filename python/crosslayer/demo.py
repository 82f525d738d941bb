"""The main job: train CrossLayerLM with several connection schemes on the same data and
token budget, then compare them.

    python -m crosslayer.demo                      # CPU-sized defaults, a few minutes
    python -m crosslayer.demo --preset gpu         # a real size on a GPU
    python -m crosslayer.demo --schemes residual,dhc,mudd --steps 300 --out runs/demo

Data: byte-level text of the Python standard library's source files on this machine
(no download): every *.py under the stdlib directory in sorted path order, files
numbered in that order, every tenth file (index ≡ 0 mod 10) held out for validation.
Each file is followed by a NUL byte. The byte stream differs between Python versions.

Every scheme trains in its own process from the same seed: identical trunk init (the
trunk is built before the connection modules, from the same generator state), identical
batches (a generator seeded for the data alone), identical optimizer and schedule
(AdamW, linear warmup then cosine decay, gradient clipping at 1, no weight decay on
static connection parameters). Reported per scheme: final train loss (mean of the last
10% of steps), validation loss (fixed held-out batches), tokens/s of the training steps
after the first 10% (warm-up and torch.compile excluded; evaluation excluded), peak memory (CUDA: max allocated bytes; CPU: the process's peak
resident set, which includes the Python/torch baseline of a few hundred MiB), and the
parameter count. Writes <out>/results.json and <out>/loss_curves.png.

Robustness: every flag is checked before any work (a bad value exits with status 2 and
a message naming the flag, the value and the allowed range), and so is the output
directory (created if missing, then a temporary file is written in it). Each scheme's
result is written, atomically, to <out>/scheme-<name>.json as soon as it finishes,
with the settings it was made with. A scheme whose worker fails -- an exception (its
full traceback is printed), or a worker that dies without reporting (OOM killer,
segfault, CUDA abort: reported with its exit code or signal) -- is marked failed and
the other schemes go on; the table shows the finished ones, lists the failed ones, and
the exit status is 1. `--resume` reuses the saved results made with the same settings.

Test hook (for tests/test_demo_robustness.py only): CROSSLAYER_DEMO_TEST_FAIL =
"<scheme>:kill" or "<scheme>:raise" (comma-separated for several) makes that scheme's
worker SIGKILL itself, or raise, after its first training step.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import signal
import sys
import sysconfig
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from crosslayer.models import CONNECTIONS, CrossLayerLM, LMConfig

PRESETS = {
    # a 6-layer d=64 byte model, 0.2 M tokens: about 3 minutes for all six schemes on
    # 2 idle CPU cores
    "cpu": dict(d_model=64, n_layers=6, n_heads=4, seq_len=64, batch_size=16, steps=200,
                lr=3e-3, eval_batches=8, eval_every=25, dtype="float32"),
    # a 12-layer d=768 model (GPT-2 small's shape), 16k tokens a step, bf16 autocast
    "gpu": dict(d_model=768, n_layers=12, n_heads=12, seq_len=1024, batch_size=16, steps=2000,
                lr=1e-3, eval_batches=32, eval_every=250, dtype="bfloat16"),
}
DEFAULT_SCHEMES = ("residual", "shc", "dhc", "mhc", "dwa", "mudd")
VALID_EVERY_FILE = 10
MiB = 1 << 20


# ---------------------------------------------------------------------------- data


def stdlib_files() -> List[Path]:
    """The standard library's *.py files in sorted relative-path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file()),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise RuntimeError(f"no *.py files under the standard library directory {root}")
    return files


def stdlib_bytes(max_train_bytes: int, max_valid_bytes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train, valid) uint8 tensors of the stdlib's source bytes: file i goes to valid
    when i % 10 == 0, each file followed by a NUL byte, each split cut at its cap."""
    parts = {True: [], False: []}
    size = {True: 0, False: 0}
    cap = {True: max_valid_bytes, False: max_train_bytes}
    for i, path in enumerate(stdlib_files()):
        valid = i % VALID_EVERY_FILE == 0
        if size[valid] >= cap[valid]:
            if size[not valid] >= cap[not valid]:
                break
            continue
        data = path.read_bytes() + b"\0"
        parts[valid].append(data)
        size[valid] += len(data)
    train = b"".join(parts[False])[:max_train_bytes]
    valid = b"".join(parts[True])[:max_valid_bytes]
    return (torch.frombuffer(bytearray(train), dtype=torch.uint8),
            torch.frombuffer(bytearray(valid), dtype=torch.uint8))


def batches(data: torch.Tensor, n: int, batch_size: int, seq_len: int, seed: int):
    """n batches (x, y) of random windows, y = x shifted by one byte; the same for a seed."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=g)
        win = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()]).long()
        yield win[:, :-1], win[:, 1:]


# ---------------------------------------------------------------------------- training


@dataclass
class RunSpec:
    scheme: str
    preset: dict
    seed: int
    device: str
    max_train_bytes: int
    max_valid_bytes: int
    compile: bool
    progress: bool
    threads: Optional[int] = None  # torch.set_num_threads in the worker; None: torch's default


def lr_at(step: int, steps: int, lr: float) -> float:
    warmup = max(1, steps // 10)
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=False, file=sys.stderr)


def train_one(spec: RunSpec) -> dict:
    """Train one scheme; returns its metrics and curves."""
    p = spec.preset
    if spec.threads:
        torch.set_num_threads(spec.threads)
    device = torch.device(spec.device)
    amp = p["dtype"] != "float32" and device.type == "cuda"
    torch.manual_seed(spec.seed)
    cfg = LMConfig(vocab_size=256, d_model=p["d_model"], n_layers=p["n_layers"], n_heads=p["n_heads"],
                   max_seq_len=p["seq_len"], connection=spec.scheme)
    model = CrossLayerLM(cfg).to(device)
    step_fn = torch.compile(model) if spec.compile else model
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=p["lr"], betas=(0.9, 0.95),
                            fused=device.type == "cuda")
    train, valid = stdlib_bytes(spec.max_train_bytes, spec.max_valid_bytes)
    val_batches = list(batches(valid, p["eval_batches"], p["batch_size"], p["seq_len"], spec.seed + 1))

    def loss_of(x, y):
        with torch.autocast(device.type, dtype=getattr(torch, p["dtype"]), enabled=amp):
            logits = step_fn(x.to(device, non_blocking=True))
        return F.cross_entropy(logits.float().flatten(0, 1), y.to(device, non_blocking=True).flatten())

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        tot = sum(loss_of(x, y).item() for x, y in val_batches) / len(val_batches)
        model.train()
        return tot

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_curve, val_curve = [], []
    train_time, tokens = 0.0, 0
    warmup_steps = min(max(1, p["steps"] // 10), p["steps"] - 1)  # untimed: compile, allocator
    bar = _progress(p["steps"], f"{spec.scheme:>8}", spec.progress)
    for step, (x, y) in enumerate(batches(train, p["steps"], p["batch_size"], p["seq_len"], spec.seed)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, p["steps"], p["lr"])
        t0 = time.perf_counter()
        loss = loss_of(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_value = loss.item()  # syncs, so the step's time is complete
        if step >= warmup_steps:
            train_time += time.perf_counter() - t0
            tokens += x.numel()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"{spec.scheme}: loss became {loss_value} at step {step}")
        train_curve.append(loss_value)
        if step == 0:
            _test_failure_hook(spec.scheme)
        if (step + 1) % p["eval_every"] == 0 or step + 1 == p["steps"]:
            val_curve.append((step + 1, evaluate()))
        if bar is not None:
            bar.set_postfix(loss=f"{loss_value:.3f}", val=f"{val_curve[-1][1]:.3f}" if val_curve else "-")
            bar.update()
    if bar is not None:
        bar.close()
    tail = max(1, len(train_curve) // 10)
    if device.type == "cuda":
        peak, peak_kind = torch.cuda.max_memory_allocated(device), "cuda max allocated"
    else:
        peak, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu peak rss"
    return {
        "scheme": spec.scheme, "params": model.num_parameters(),
        "train_loss": sum(train_curve[-tail:]) / tail, "val_loss": val_curve[-1][1],
        "tokens_per_s": tokens / train_time, "peak_mib": peak / MiB, "peak_kind": peak_kind,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "train_curve": train_curve, "val_curve": val_curve, "config": cfg.to_dict(),
    }


TEST_FAIL_ENV = "CROSSLAYER_DEMO_TEST_FAIL"


def _test_failure_hook(scheme: str) -> None:
    """Test hook, a no-op unless CROSSLAYER_DEMO_TEST_FAIL is set (tests only): with
    "<scheme>:kill" this scheme's worker SIGKILLs itself (what the OOM killer does),
    with "<scheme>:raise" it raises; entries comma-separated."""
    for entry in filter(None, os.environ.get(TEST_FAIL_ENV, "").split(",")):
        target, _, how = entry.strip().partition(":")
        if target != scheme:
            continue
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if how == "raise":
            raise RuntimeError(f"{TEST_FAIL_ENV} asked scheme {scheme!r} to fail")


def _child(spec: RunSpec, conn) -> None:
    """The worker: sends ("ok", result) or ("error", the full traceback text)."""
    try:
        message = ("ok", train_one(spec))
    except BaseException:  # reported by the parent, which marks the scheme failed
        message = ("error", traceback.format_exc())
    try:
        conn.send(message)
    finally:
        conn.close()


def describe_exit(exitcode: Optional[int]) -> str:
    """A worker's exit: 'exit code 3', 'killed by SIGKILL' (a negative exitcode is the
    signal that ended it)."""
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (the OOM killer sends SIGKILL)" if -exitcode == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit code {exitcode}"


def run_isolated(spec: RunSpec, poll_s: float = 1.0) -> Tuple[str, object]:
    """train_one in a fresh process, so peak memory is the scheme's own.

    Returns ("ok", result), ("error", the worker's traceback text) or ("died", how it
    ended: exit code or signal). Never blocks on a dead worker: the parent waits on the
    pipe at most poll_s at a time and checks the worker is alive in between (a worker
    that dies closes its end, which also wakes the wait)."""
    ctx = mp.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(spec, child_conn), name=f"crosslayer-demo-{spec.scheme}")
    proc.start()
    child_conn.close()  # the worker holds the only write end: its death is EOF here
    message = None
    try:
        while message is None:
            if parent_conn.poll(poll_s):
                try:
                    message = parent_conn.recv()
                except (EOFError, OSError):  # died before or while sending
                    break
            elif not proc.is_alive():
                # died without a word; a message sent just before exiting is still read
                if parent_conn.poll(0):
                    try:
                        message = parent_conn.recv()
                    except (EOFError, OSError):
                        pass
                break
        proc.join(timeout=None if message is None else 60)
    finally:
        if proc.is_alive():  # KeyboardInterrupt in the parent, or a worker stuck after reporting
            proc.terminate()
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        parent_conn.close()
    if message is None:
        return "died", f"the worker died without reporting a result: {describe_exit(proc.exitcode)}"
    return message


# ---------------------------------------------------------------------------- report


def table(results: List[dict]) -> str:
    base = next((r for r in results if r["scheme"] == "residual"), None)
    head = (f"{'scheme':<9} {'params':>9} {'train loss':>10} {'val loss':>9} {'Δval':>7} "
            f"{'tokens/s':>10} {'peak MiB':>9}")
    rows = [head, "-" * len(head)]
    for r in results:
        delta = f"{r['val_loss'] - base['val_loss']:+.3f}" if base else "-"
        rows.append(f"{r['scheme']:<9} {r['params']:>9,} {r['train_loss']:>10.4f} {r['val_loss']:>9.4f} "
                    f"{delta:>7} {r['tokens_per_s']:>10,.0f} {r['peak_mib']:>9.0f}")
    return "\n".join(rows)


def plot(results: List[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        curve = r["train_curve"]
        w = max(1, len(curve) // 50)
        smooth = [sum(curve[max(0, i - w + 1) : i + 1]) / len(curve[max(0, i - w + 1) : i + 1])
                  for i in range(len(curve))]
        ax_t.plot(range(1, len(curve) + 1), smooth, label=r["scheme"])
        steps, vals = zip(*r["val_curve"])
        ax_v.plot(steps, vals, marker="o", label=r["scheme"])
    for ax, name in ((ax_t, "train loss (smoothed)"), (ax_v, "validation loss")):
        ax.set_xlabel("step")
        ax.set_ylabel(name + " (nats/byte)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, dpi=120, format="png")
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    finally:
        plt.close(fig)


def cpu_name() -> str:
    """The CPU's model name and the threads torch uses, e.g. 'AMD EPYC 9654 (2 threads)'."""
    name = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name or 'cpu'} ({torch.get_num_threads()} threads)"


def _require_demo_deps() -> None:
    missing = [m for m in ("tqdm", "matplotlib") if __import__("importlib").util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"crosslayer.demo needs {', '.join(missing)}: pip install "
                         f"{' '.join(missing)}  (or install crosslayer with the [demo] extra)")


# ---------------------------------------------------------------------------- files


def _remove_quietly(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _file_mode() -> int:
    """0o666 less the umask: what open() would give (mkstemp makes 0o600)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomic(path: Path, text: str) -> None:
    """Write text to path through a temporary file in the same directory and os.replace:
    a reader (or a rerun after a crash) sees the old file or the new one, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


def scheme_path(out: Path, scheme: str) -> Path:
    """Where a scheme's result is saved as soon as it finishes."""
    return out / f"scheme-{scheme}.json"


def check_out_dir(out: str, schemes: List[str]) -> Path:
    """The output directory, created when missing, checked to be a directory we can
    write (a temporary file is created and removed in it). Raises ValueError naming
    --out and the reason; runs before any training."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {out!r} is not a directory (a file of that name exists)")
    blocker = next((a for a in path.parents if a.exists() and not a.is_dir()), None)
    if blocker is not None:
        raise ValueError(f"--out {out!r} cannot be created: {str(blocker)!r} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out!r} cannot be created: {e.strerror or e}") from None
    try:
        fd, tmp = tempfile.mkstemp(dir=path, prefix=".write-test.", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ValueError(f"--out {out!r} is not writable: {e.strerror or e}") from None
    for target in [scheme_path(path, s) for s in schemes] + [path / "results.json", path / "loss_curves.png"]:
        if target.is_dir():
            raise ValueError(f"--out {out!r}: {target.name} is a directory, where the demo writes a file")
    return path


def run_settings(args: argparse.Namespace, device: str, device_name: str) -> dict:
    """Everything a scheme's result depends on, saved with it: --resume reuses a result
    only when these are equal (a different value retrains the scheme)."""
    import crosslayer

    return {"preset": args.preset, "model_and_training": dict(args.settings), "seed": args.seed,
            "device": device, "device_name": device_name, "threads": torch.get_num_threads(),
            "max_train_bytes": int(args.max_train_mib * MiB), "max_valid_bytes": int(args.max_valid_mib * MiB),
            "compile": args.compile, "torch": torch.__version__, "python": platform.python_version(),
            "crosslayer": crosslayer.__version__}


def load_saved(path: Path, settings: dict) -> Tuple[Optional[dict], str]:
    """(result, "") when path holds a result made with these settings; otherwise
    (None, why it cannot be reused) -- why is "" when there is no saved result."""
    if not path.exists():
        return None, ""
    try:
        saved = json.loads(path.read_text())
        saved_settings, result = saved["settings"], saved["result"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"the saved result {path} is unreadable ({type(e).__name__}: {e})"
    want = json.loads(json.dumps(settings))  # as it reads back from JSON
    if saved_settings != want:
        diffs = []
        for key in sorted(set(want) | set(saved_settings)):
            old, new = saved_settings.get(key), want.get(key)
            if isinstance(old, dict) and isinstance(new, dict):
                diffs += [f"{key}.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                          if old.get(k) != new.get(k)]
            elif old != new:
                diffs.append(f"{key}: {old!r} -> {new!r}")
        return None, f"the saved result was made with different settings ({'; '.join(diffs)})"
    return result, ""


# ---------------------------------------------------------------------------- flags


SEED_RANGE = (-(1 << 63), (1 << 64) - 2)  # torch's seed range; the validation batches use seed + 1
DEVICE_HELP = "auto (cuda when available), cpu or cuda[:i]"


def _min_mib(n_bytes: int) -> str:
    """The shortest decimal MiB value whose int(v * MiB) >= n_bytes."""
    for digits in range(2, 18):
        text = f"{n_bytes / MiB:.{digits}g}"
        if int(float(text) * MiB) >= n_bytes:
            return text
    return repr(n_bytes / MiB)


def resolve_device(flag: str) -> str:
    """--device to a torch device string ('cpu', 'cuda', 'cuda:1'); ValueError naming
    the flag when it is not one of DEVICE_HELP or the GPU is not there."""
    if flag == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(flag)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device must be {DEVICE_HELP}, got {flag!r}") from None
    if dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise ValueError(f"--device must be {DEVICE_HELP}, got {flag!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {flag!r} needs CUDA, and torch.cuda.is_available() is False")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"--device {flag!r}: the index must be in [0, {count - 1}] "
                             f"({count} CUDA device(s) visible)")
    return "cpu" if dev.type == "cpu" else str(dev)


def validate(args: argparse.Namespace) -> List[str]:
    """Every flag's problems, each naming the flag, the value and what is allowed
    (empty when all are fine). Fills args.settings (the preset with the flags applied)
    and args.device_resolved."""
    errors = []
    preset = dict(PRESETS[args.preset])

    def at_least(flag: str, value, lo) -> bool:
        if value is not None and value < lo:
            errors.append(f"{flag} must be >= {lo}, got {value}")
            return False
        return True

    for flag, key in (("--steps", "steps"), ("--batch-size", "batch_size"), ("--seq-len", "seq_len"),
                      ("--d-model", "d_model"), ("--n-layers", "n_layers")):
        value = getattr(args, key)
        if at_least(flag, value, 1) and value is not None:
            preset[key] = value
    args.settings = preset
    at_least("--threads", args.threads, 1)
    if not SEED_RANGE[0] <= args.seed <= SEED_RANGE[1]:
        errors.append(f"--seed must be in [-2**63, 2**64 - 2] (torch's seed range, and seed + 1 seeds the "
                      f"validation batches), got {args.seed}")

    if len(set(args.schemes)) != len(args.schemes):
        dup = sorted({s for s in args.schemes if args.schemes.count(s) > 1})
        errors.append(f"--schemes lists {', '.join(dup)} more than once")

    # the model's own checks on the sizes (d_model a multiple of n_heads with an even head
    # size, the depth limit of the dwa / mudd stacks), for every scheme asked for
    if not any(e.startswith(("--d-model", "--n-layers", "--seq-len")) for e in errors):
        for scheme in args.schemes:
            try:
                LMConfig(vocab_size=256, d_model=preset["d_model"], n_layers=preset["n_layers"],
                         n_heads=preset["n_heads"], max_seq_len=preset["seq_len"], connection=scheme)
            except (ValueError, TypeError) as e:
                field = next((f for f in ("d_model", "n_layers", "max_seq_len") if f"LMConfig.{f} " in str(e)),
                             None)
                flag, key = {"d_model": ("--d-model", "d_model"), "n_layers": ("--n-layers", "n_layers"),
                             "max_seq_len": ("--seq-len", "seq_len")}.get(field, ("--d-model", "d_model"))
                errors.append(f"{flag} {preset[key]} is refused by the model for scheme {scheme!r} (preset "
                              f"{args.preset!r}: {preset['n_heads']} heads): {e}")
                break

    # the data caps: each split needs one window of seq_len + 1 bytes, drawn from a start
    # in [0, bytes - seq_len - 1), so at least seq_len + 2 bytes
    need = preset["seq_len"] + 2
    for flag, value in (("--max-train-mib", args.max_train_mib), ("--max-valid-mib", args.max_valid_mib)):
        if not math.isfinite(value):
            errors.append(f"{flag} must be a finite number of MiB, got {value}")
        elif int(value * MiB) < need:
            errors.append(f"{flag} must be >= {_min_mib(need)} (one window: --seq-len {preset['seq_len']} + 2 = "
                          f"{need} bytes), got {value} ({max(0, int(value * MiB))} bytes)")

    try:
        args.device_resolved = resolve_device(args.device)
    except ValueError as e:
        errors.append(str(e))
        args.device_resolved = None
    if args.preset == "gpu" and args.device_resolved is not None and not args.device_resolved.startswith("cuda"):
        errors.append(f"--preset gpu needs a CUDA device, got --device {args.device!r} "
                      f"(torch.cuda.is_available() is {torch.cuda.is_available()})")
    return errors


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The flags, all validated (exits with status 2 and every problem otherwise)."""
    ap = argparse.ArgumentParser(prog="python -m crosslayer.demo", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Every flag is checked before any work; results are saved per scheme as "
                                        "each finishes (<out>/scheme-<name>.json).")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--schemes", default=",".join(DEFAULT_SCHEMES),
                    help=f"comma-separated, from {', '.join(CONNECTIONS)}")
    ap.add_argument("--steps", type=int, help="training steps, >= 1 (default: the preset's)")
    ap.add_argument("--batch-size", type=int, help=">= 1 (default: the preset's)")
    ap.add_argument("--seq-len", type=int, help=">= 1 (default: the preset's)")
    ap.add_argument("--d-model", type=int, help="the preset's head count times an even head size "
                                                "(default: the preset's)")
    ap.add_argument("--n-layers", type=int, help=">= 1 (default: the preset's)")
    ap.add_argument("--seed", type=int, default=0, help="in [-2**63, 2**64 - 2] (torch's range)")
    ap.add_argument("--device", default="auto", help=DEVICE_HELP)
    ap.add_argument("--threads", type=int, help="CPU threads, >= 1 (torch.set_num_threads)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--max-train-mib", type=float, default=16.0,
                    help="cap on the training text (MiB); at least --seq-len + 2 bytes")
    ap.add_argument("--max-valid-mib", type=float, default=1.0,
                    help="cap on the validation text (MiB); at least --seq-len + 2 bytes")
    ap.add_argument("--out", default="demo_results",
                    help="directory for results.json, loss_curves.png and the per-scheme results "
                         "scheme-<name>.json (created if missing; checked writable before training)")
    ap.add_argument("--resume", action="store_true",
                    help="reuse each scheme's saved result in --out when it was made with the same settings "
                         "(model, data, seed, device, threads, versions); a scheme with none, or with "
                         "different settings, trains. Off by default: a saved result cannot see a rebuilt "
                         "extension or edited code, so a plain rerun measures afresh")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    args.schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    bad = [s for s in args.schemes if s not in CONNECTIONS]
    if bad or not args.schemes:
        ap.error(f"--schemes: unknown {bad}; choose from {', '.join(CONNECTIONS)}")
    errors = validate(args)
    if errors:
        ap.error("\n  ".join(errors))
    return args


def _fail(message: str, code: int = 2) -> SystemExit:
    print(f"python -m crosslayer.demo: error: {message}", file=sys.stderr)
    return SystemExit(code)


# ---------------------------------------------------------------------------- main


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)  # every flag, before any work
    _require_demo_deps()
    try:
        out = check_out_dir(args.out, args.schemes)  # before any training
    except ValueError as e:
        raise _fail(str(e)) from None
    device, preset = args.device_resolved, args.settings
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    max_train, max_valid = int(args.max_train_mib * MiB), int(args.max_valid_mib * MiB)
    train, valid = stdlib_bytes(max_train, max_valid)
    for name, split in (("training", train), ("validation", valid)):
        if split.numel() < preset["seq_len"] + 2:
            raise _fail(f"the standard library here has only {split.numel()} bytes of {name} text, fewer than "
                        f"one window (--seq-len {preset['seq_len']} + 2 bytes)", code=1)
    print(f"data: Python {platform.python_version()} stdlib source, {train.numel() / MiB:.1f} MiB train, "
          f"{valid.numel() / MiB:.2f} MiB valid (every {VALID_EVERY_FILE}th file)")
    print(f"model: d={preset['d_model']} L={preset['n_layers']} heads={preset['n_heads']} "
          f"seq={preset['seq_len']} batch={preset['batch_size']} steps={preset['steps']} "
          f"({preset['steps'] * preset['batch_size'] * preset['seq_len'] / 1e6:.2f} M tokens) on {device}, "
          f"seed {args.seed}")
    # On CUDA the name comes from the first worker's result, so the parent does not
    # initialise CUDA while workers train; only --resume, comparing a saved result before
    # any worker ran, asks for it here.
    device_name = cpu_name() if device == "cpu" else None

    def settings() -> dict:
        nonlocal device_name
        if device_name is None:
            device_name = torch.cuda.get_device_name(device)
        return run_settings(args, device, device_name)

    if not args.resume:
        saved = [s for s in args.schemes if scheme_path(out, s).exists()]
        if saved:
            print(f"note: {out} holds saved results for {', '.join(saved)}; they are retrained and replaced "
                  f"(--resume reuses those made with the same settings)")

    results, resumed, failed, write_errors, saved_ok = [], [], [], [], []
    interrupted = False
    t0 = time.time()
    try:
        for scheme in args.schemes:
            path = scheme_path(out, scheme)
            if args.resume:
                saved, why = load_saved(path, settings()) if path.exists() else (None, "")
                if saved is not None:
                    results.append(saved)
                    resumed.append(scheme)
                    saved_ok.append(scheme)
                    print(f"  {scheme:<8} val {saved['val_loss']:.4f}  {saved['tokens_per_s']:,.0f} tok/s  "
                          f"(resumed: saved result with the same settings, {path})", flush=True)
                    continue
                if why:
                    print(f"  {scheme:<8} {why}: training it again", flush=True)
            spec = RunSpec(scheme, preset, args.seed, device, max_train, max_valid, args.compile,
                           not args.no_progress, args.threads)
            status, payload = run_isolated(spec)
            if status != "ok":
                summary = payload.strip().splitlines()[-1] if status == "error" else payload
                failed.append({"scheme": scheme, "status": status, "error": payload})
                print(f"  {scheme:<8} FAILED: {summary}", flush=True)
                if status == "error":
                    print(f"--- {scheme}: the worker's traceback\n{payload.rstrip()}\n--- end of {scheme}'s traceback",
                          file=sys.stderr, flush=True)
                continue
            results.append(payload)
            if device_name is None:
                device_name = payload["device_name"]
            try:
                write_atomic(path, json.dumps({"settings": settings(), "result": payload,
                                               "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1))
                where = f"saved to {path}"
                saved_ok.append(scheme)
            except OSError as e:
                write_errors.append(f"{path}: {e}")
                where = f"NOT saved ({path}: {e})"
            print(f"  {scheme:<8} val {payload['val_loss']:.4f}  {payload['tokens_per_s']:,.0f} tok/s  ({where})",
                  flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted: reporting the schemes that finished", file=sys.stderr, flush=True)
        interrupted = True
        done = {r["scheme"] for r in results} | {f["scheme"] for f in failed}
        failed += [{"scheme": s, "status": "interrupted", "error": "not run (interrupted)"}
                   for s in args.schemes if s not in done]

    print()
    print(table(results) if results else "no scheme finished")
    if resumed:
        print(f"resumed from saved results: {', '.join(resumed)}")
    if failed:
        print("failed:")
        for f in failed:
            why = f["error"].strip().splitlines()[-1] if f["status"] == "error" else f["error"]
            print(f"  {f['scheme']:<8} {why}")
    if device_name is None:  # no worker finished; none runs now
        try:
            device_name = torch.cuda.get_device_name(device)
        except Exception as e:  # a broken CUDA must not cost the report
            device_name = f"{device} (name unavailable: {type(e).__name__})"
    meta = {"preset": args.preset, "settings": preset, "device": device, "device_name": device_name,
            "torch": torch.__version__, "python": platform.python_version(), "seed": args.seed,
            "compile": args.compile, "wall_s": time.time() - t0, "resumed": resumed}
    written = []
    try:
        write_atomic(out / "results.json", json.dumps({"meta": meta, "results": results, "failed": failed},
                                                      indent=1))
        written.append(str(out / "results.json"))
    except OSError as e:
        write_errors.append(f"{out / 'results.json'}: {e}")
    if results:
        try:
            plot(results, out / "loss_curves.png",
                 f"CrossLayerLM, {preset['n_layers']} layers d={preset['d_model']}, {device_name}")
            written.append(str(out / "loss_curves.png"))
        except Exception as e:  # the table above is what matters; say why the plot is missing
            write_errors.append(f"{out / 'loss_curves.png'}: {type(e).__name__}: {e}")
    if written:
        print(f"\nwrote {' and '.join(written)} ({time.time() - t0:.0f} s)")
    for err in write_errors:
        print(f"could not write {err}", file=sys.stderr)
    if failed:
        print(f"\n{len(failed)} of {len(args.schemes)} schemes failed"
              + (f"; rerun with the same flags and --resume to keep {', '.join(saved_ok)} and retry the rest"
                 if saved_ok else ""), file=sys.stderr)
    return 130 if interrupted else 1 if failed or write_errors else 0


if __name__ == "__main__":
    sys.exit(main())
