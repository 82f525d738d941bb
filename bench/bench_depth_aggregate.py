"""Benchmark of depth_aggregate (MUDD / DenseFormer): Y_c = sum_j A[..., c, j] * S_j.

Napkin math (DESIGN.md "Traffic floors"; activation-dtype elements per token,
coefficients A and dA left out as negligible: l*C fp32 per token vs (l + C)*d):

    forward              read S (l*d), write Y (C*d)                  (l + C)*d
    backward, fresh dS   read S (l*d) and dY (C*d), write dS (l*d)   (2l + C)*d
    backward, dS += ...  also read the old dS (l*d)                  (3l + C)*d

    floor time = N * elements * bytes per element / measured copy bandwidth

H100 80GB HBM3, copy bandwidth 3.00 TB/s (read + write), bf16 (2 bytes), d = 2048,
C = 4; fwd+bwd = forward + backward with a FRESH dS (this is what the DESIGN.md
yardsticks assume and what this script measures: each timed backward writes new
gradient tensors, the inputs' .grad set to None between runs):

    size            fwd elems  fwd bytes  fwd floor   fwd+bwd elems  bytes    floor
    l=13, N=16384      17      1.141 GB   0.380 ms    17+30 = 47     3.154 GB  1.05 ms
    l=25, N=16384      29      1.946 GB   0.65 ms     29+54 = 83     5.570 GB  1.86 ms
    l=49, N=8192       53      1.778 GB   0.593 ms    53+102 = 155   5.201 GB  1.73 ms

    e.g. fwd l=25: 16384 * 29 * 2048 * 2 B = 1.946 GB / 3.00 TB/s = 0.649 ms.
    With dS accumulated in place the fwd+bwd floors would be 60/108/204 elements:
    1.34 / 2.42 / 2.28 ms. All floors here are recomputed from the measured copy
    bandwidth of the machine at hand, not from 3.00 TB/s.

Arithmetic is 2*l*C FLOPs per feature forward (~0.05 FLOP/byte): memory-bound.

Variants: fused (crosslayer.ops.depth_aggregate), eager_oracle (crosslayer.ref),
compile_oracle (torch.compile(ref, fullgraph=True, dynamic=False)), einsum
(torch.einsum('lnd,ncl->cnd', S, A.to(S.dtype)), DESIGN.md's "einsum" yardstick).
Inputs: S = S_full[:l], a view of a preallocated (l + 1, N, d) stack (slot stride
N*d); A per token (N, C, l) float32 (or static (C, l) with --static); dY random.
Every variant is checked against the eager oracle before it is timed.

Run: python bench/bench_depth_aggregate.py [--quick] [--sizes 25:16384,49:8192]
Exit: 0 ok; 2 no CUDA device; 3 the fused op was WRONG, failed or not fused.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
import torch  # noqa: E402
from crosslayer.contracts import CONTRACTS  # noqa: E402

OP = "depth_aggregate"
VARIANTS = ("eager_oracle", "fused", "compile_oracle", "einsum")
DISPLAY_ORDER = ("fused", "eager_oracle", "compile_oracle", "einsum")
MODES = ("fwd", "fwd+bwd")
DEFAULT_SIZES = [(13, 16384), (25, 16384), (49, 8192)]
QUICK_SIZES = [(25, 16384), (49, 8192)]


def floor_elements(mode: str, l: int, C: int) -> int:
    """Activation elements per token per feature (x d), fresh-gradient backward."""
    return CONTRACTS["depth_aggregate"].floor_elements(mode, d=1, l=l, C=C)


def floor_bytes(mode: str, l: int, N: int, d: int, C: int, elem_bytes: int) -> int:
    return N * floor_elements(mode, l, C) * d * elem_bytes


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            l, N = (int(v) for v in item.split(":"))
        except ValueError:
            raise SystemExit(f"--sizes: bad item {item!r}; expected l:N, e.g. 25:16384")
        if l < 1 or N < 1:
            raise SystemExit(f"--sizes: l and N must be positive, got {item!r}")
        sizes.append((l, N))
    if not sizes:
        raise SystemExit("--sizes: no sizes given")
    return sizes


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="only l=25 (N=16384) and l=49 (N=8192), fewer repetitions")
    p.add_argument("--dtype", default="bf16", help="activation dtype: bf16, fp16, fp32")
    p.add_argument("--d", type=int, default=2048, help="model width (default 2048)")
    p.add_argument("--C", type=int, default=4, help="MUDD ways (default 4)")
    p.add_argument("--sizes", type=parse_sizes, default=None,
                   help="comma-separated l:N pairs (default 13:16384,25:16384,49:8192)")
    p.add_argument("--static", action="store_true",
                   help="static coefficients A (C, l) instead of per-token (N, C, l)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated: fwd,fwd+bwd")
    p.add_argument("--csv", default=str(harness.DEFAULT_CSV),
                   help="CSV file the rows are appended to (default bench/results/results.csv)")
    p.add_argument("--warmup-ms", type=float, default=None)
    p.add_argument("--rep-ms", type=float, default=None)
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    args.modes = [m for m in args.modes.split(",") if m]
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {VARIANTS}")
    for m in args.modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}; choose from {MODES}")
    if "eager_oracle" not in args.variants:
        args.variants.insert(0, "eager_oracle")  # the correctness reference
    if args.sizes is None:
        args.sizes = QUICK_SIZES if args.quick else DEFAULT_SIZES
    if args.d < 1 or args.C < 1:
        p.error("--d and --C must be positive")
    return args


def bench_size(args, l: int, N: int, dtype: torch.dtype, copy_bw: float,
               timing_kw: dict, ops, ref, fused_available: bool) -> list[harness.Row]:
    d, C = args.d, args.C
    dev = "cuda"
    shape = f"l={l} N={N} d={d} C={C} A={'static' if args.static else 'per_token'}"
    dname = harness.DTYPE_NAMES[dtype]
    elem = torch.empty((), dtype=dtype).element_size()

    # The depth stack (l + 1, N, d); S is its first l slots, a view (slot stride N*d).
    S_full = torch.randn(l + 1, N, d, device=dev, dtype=dtype)
    S = S_full[:l]
    A = torch.randn(*((C, l) if args.static else (N, C, l)), device=dev,
                    dtype=torch.float32)
    eq = "lnd,cl->cnd" if args.static else "lnd,ncl->cnd"

    def einsum(S_, A_):
        return torch.einsum(eq, S_, A_.to(S_.dtype))

    rows: list[harness.Row] = []
    for mode in args.modes:
        if mode == "fwd":
            S_in, A_in, dY = S, A, None
        else:
            # Leaves sharing the stack's memory (same strides); their .grad is fresh.
            S_in = S.detach().requires_grad_(True)
            A_in = A.detach().requires_grad_(True)
            dY = torch.randn(C, N, d, device=dev, dtype=dtype)

        def outputs(f):
            """Run f once; the tensors the gate compares: Y (and dS, dA)."""
            if mode == "fwd":
                return [f(S_in, A_in)]
            S_in.grad = A_in.grad = None
            Y = f(S_in, A_in)
            torch.autograd.backward(Y, dY)
            outs = [Y.detach(), S_in.grad, A_in.grad]
            S_in.grad = A_in.grad = None
            return outs

        names = ["Y"] if mode == "fwd" else ["Y", "dS", "dA"]
        torch._dynamo.reset()  # fresh compile cache per group: no recompile limit
        fns = {
            "eager_oracle": ref.depth_aggregate,
            "fused": ops.depth_aggregate,
            "compile_oracle": torch.compile(ref.depth_aggregate, fullgraph=True,
                                            dynamic=False),
            "einsum": einsum,
        }
        refs: list[torch.Tensor] | None = None
        group: list[harness.Row] = []
        for variant in args.variants:
            f = fns[variant]
            row = harness.Row(op=OP, variant=variant, mode=mode, shape=shape, dtype=dname,
                              floor_bytes=floor_bytes(mode, l, N, d, C, elem))

            timed = harness.timer(lambda f=f: f(S_in, A_in), mode, dY, [S_in, A_in], **timing_kw)

            if variant == "eager_oracle":
                def gate():
                    nonlocal refs
                    refs = [t.detach() for t in outputs(f)]
                    return True, 0.0, "reference"
                harness.run_variant(row, gate, timed)
                if row.status == "ok":
                    row.status = "ref"
                    row.rel_err = None
            elif refs is None:
                row.status = "failed: no reference"
                row.note = "the eager oracle failed, so nothing was checked or timed"
            else:
                def gate(f=f):
                    outs = outputs(f)
                    res = harness.check_outputs(outs, refs, dtype, names)
                    del outs
                    return res
                harness.run_variant(row, gate, timed)
                if variant == "fused" and row.status == "ok" and not fused_available:
                    row.status = "not-fused"
                    row.note = "crosslayer.ops.fused_ops()['depth_aggregate'] is False"
            t = f"{row.time_ms:.3f} ms" if row.time_ms is not None else "-"
            print(f"  [{shape} {dname} {mode}] {variant:<15} {t:>12}  {row.status}",
                  flush=True)
            group.append(row)
        del refs
        group.sort(key=lambda r: DISPLAY_ORDER.index(r.variant))
        rows += group
        del S_in, A_in, dY
        torch.cuda.empty_cache()

    del S_full, S, A
    torch.cuda.empty_cache()
    harness.finalize_rows(rows, copy_bw)
    return rows


def summary_line(rows: list[harness.Row], dname: str, args) -> tuple[str, bool]:
    """One line per size: fused vs floor and vs the best other variant, per mode."""
    shape = rows[0].shape
    parts, ok = [], True
    for mode in args.modes:
        group = [r for r in rows if r.mode == mode]
        fused = next((r for r in group if r.variant == "fused"), None)
        if fused is None:
            continue
        others = [r for r in group if r.variant != "fused" and r.status in ("ok", "ref")
                  and r.time_ms is not None]
        best = min(others, key=lambda r: r.time_ms, default=None)
        floor_ms = fused.derived.get("floor_ms")
        if fused.status != "ok" or fused.time_ms is None:
            ok = False
            t = f"{fused.time_ms:.3f} ms " if fused.time_ms is not None else ""
            parts.append(f"{mode}: fused {t}{fused.status} (floor {floor_ms:.3f} ms)")
            continue
        s = (f"{mode}: fused {fused.time_ms:.3f} ms = {fused.derived['x_floor']:.2f}x floor "
             f"({floor_ms:.3f} ms)")
        if best is not None:
            s += f", {best.time_ms / fused.time_ms:.2f}x vs best other ({best.variant} " \
                 f"{best.time_ms:.3f} ms)"
        parts.append(s)
    verdict = "OK" if ok else "FUSED NOT OK"
    return f"SUMMARY {OP} {dname} {shape} | " + " | ".join(parts) + f" | {verdict}", ok


def main(argv=None) -> int:
    args = parse_args(argv)
    harness.require_cuda()  # before crosslayer is imported: exit 2 without a GPU
    dtype = harness.parse_dtype(args.dtype)

    import crosslayer.ops as ops
    import crosslayer.ref as ref

    fused_available = bool(ops.fused_ops().get(OP, False))
    if not fused_available:
        print(f"warning: crosslayer.ops.fused_ops()[{OP!r}] is False: the 'fused' rows "
              f"time the fallback, and are marked not-fused", file=sys.stderr)
    timing_kw = harness.timing_kwargs(args.quick, args.warmup_ms, args.rep_ms)

    copy_bw = harness.measure_copy_bandwidth()
    harness.print_header(copy_bw)
    dname = harness.DTYPE_NAMES[dtype]
    summaries, all_ok, csv_path = [], True, None
    for l, N in args.sizes:
        rows = bench_size(args, l, N, dtype, copy_bw, timing_kw, ops, ref, fused_available)
        harness.print_table(rows)
        csv_path = harness.append_csv(rows, args.csv, copy_bw)
        line, ok = summary_line(rows, dname, args)
        summaries.append(line)
        all_ok &= ok
        print(flush=True)
    print(f"rows appended to {csv_path}")
    for line in summaries:
        print(line)
    sys.stdout.flush()
    return 0 if all_ok else 3


if __name__ == "__main__":
    sys.exit(main())
