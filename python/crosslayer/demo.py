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
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import sys
import sysconfig
import time
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
        "train_curve": train_curve, "val_curve": val_curve, "config": cfg.to_dict(),
    }


def _child(spec: RunSpec, queue) -> None:
    try:
        queue.put(("ok", train_one(spec)))
    except BaseException as e:  # reported by the parent, which fails the run
        queue.put(("error", f"{type(e).__name__}: {e}"))


def run_isolated(spec: RunSpec) -> dict:
    """train_one in a fresh process, so peak memory is the scheme's own."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(spec, queue))
    proc.start()
    status, payload = queue.get()
    proc.join()
    if status != "ok":
        raise RuntimeError(f"scheme {spec.scheme!r} failed: {payload}")
    return payload


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
    fig.savefig(path, dpi=120)
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


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m crosslayer.demo", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--schemes", default=",".join(DEFAULT_SCHEMES),
                    help=f"comma-separated, from {', '.join(CONNECTIONS)}")
    ap.add_argument("--steps", type=int, help="training steps (default: the preset's)")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--d-model", type=int)
    ap.add_argument("--n-layers", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda[:i]")
    ap.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--max-train-mib", type=float, default=16.0)
    ap.add_argument("--max-valid-mib", type=float, default=1.0)
    ap.add_argument("--out", default="demo_results", help="directory for results.json and loss_curves.png")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    bad = [s for s in schemes if s not in CONNECTIONS]
    if bad or not schemes:
        ap.error(f"--schemes: unknown {bad}; choose from {', '.join(CONNECTIONS)}")
    args.schemes = schemes
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    _require_demo_deps()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.preset == "gpu" and not device.startswith("cuda"):
        raise SystemExit("--preset gpu needs a CUDA device (torch.cuda.is_available() is False)")
    preset = dict(PRESETS[args.preset])
    for key in ("steps", "batch_size", "seq_len", "d_model", "n_layers"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, valid = stdlib_bytes(int(args.max_train_mib * MiB), int(args.max_valid_mib * MiB))
    print(f"data: Python {platform.python_version()} stdlib source, {train.numel() / MiB:.1f} MiB train, "
          f"{valid.numel() / MiB:.2f} MiB valid (every {VALID_EVERY_FILE}th file)")
    print(f"model: d={preset['d_model']} L={preset['n_layers']} heads={preset['n_heads']} "
          f"seq={preset['seq_len']} batch={preset['batch_size']} steps={preset['steps']} "
          f"({preset['steps'] * preset['batch_size'] * preset['seq_len'] / 1e6:.2f} M tokens) on {device}, "
          f"seed {args.seed}")
    results = []
    t0 = time.time()
    for scheme in args.schemes:
        spec = RunSpec(scheme, preset, args.seed, device, int(args.max_train_mib * MiB),
                       int(args.max_valid_mib * MiB), args.compile, not args.no_progress)
        r = run_isolated(spec)
        results.append(r)
        print(f"  {scheme:<8} val {r['val_loss']:.4f}  {r['tokens_per_s']:,.0f} tok/s", flush=True)
    device_name = torch.cuda.get_device_name(device) if device.startswith("cuda") else cpu_name()
    meta = {"preset": args.preset, "settings": preset, "device": device, "device_name": device_name,
            "torch": torch.__version__, "python": platform.python_version(), "seed": args.seed,
            "compile": args.compile, "wall_s": time.time() - t0}
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    plot(results, out / "loss_curves.png",
         f"CrossLayerLM, {preset['n_layers']} layers d={preset['d_model']}, {device_name}")
    print()
    print(table(results))
    print(f"\nwrote {out / 'results.json'} and {out / 'loss_curves.png'} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
