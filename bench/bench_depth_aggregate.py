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
from harness import MODES  # noqa: E402

OP = "depth_aggregate"
VARIANTS = harness.VARIANTS + ("einsum",)
DISPLAY_ORDER = harness.DISPLAY_ORDER + ("einsum",)
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
    p = harness.bench_parser(__doc__, "only l=25 (N=16384) and l=49 (N=8192), fewer repetitions", VARIANTS)
    p.add_argument("--d", type=int, default=2048, help="model width (default 2048)")
    p.add_argument("--C", type=int, default=4, help="MUDD ways (default 4)")
    p.add_argument("--sizes", type=parse_sizes, default=None,
                   help="comma-separated l:N pairs (default 13:16384,25:16384,49:8192)")
    p.add_argument("--static", action="store_true",
                   help="static coefficients A (C, l) instead of per-token (N, C, l)")
    p.add_argument("--modes", type=harness.name_list, default=list(MODES),
                   help="comma-separated: fwd,fwd+bwd")
    args = harness.parse_bench_args(p, argv, variants=VARIANTS, modes=MODES)
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
            refs = harness.run_gated(row, lambda f=f: outputs(f), timed, refs, dtype, names)
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


def summary_lines(rows: list[harness.Row], dname: str) -> tuple[list[str], bool]:
    """One line per size: fused vs floor and vs the best other variant, per mode."""
    return harness.summary_lines(rows, dname, _summary_part)


def _summary_part(mode: str, by: dict) -> tuple[str, bool] | None:
    fused = by.get("fused")
    if fused is None:
        return None
    others = [r for r in by.values() if r.variant != "fused" and r.status in ("ok", "ref")
              and r.time_ms is not None]
    best = min(others, key=lambda r: r.time_ms, default=None)
    floor_ms = fused.derived.get("floor_ms")
    if fused.status != "ok" or fused.time_ms is None:
        t = f"{fused.time_ms:.3f} ms " if fused.time_ms is not None else ""
        return f"{mode}: fused {t}{fused.status} (floor {floor_ms:.3f} ms)", False
    s = (f"{mode}: fused {fused.time_ms:.3f} ms = {fused.derived['x_floor']:.2f}x floor "
         f"({floor_ms:.3f} ms)")
    if best is not None:
        s += f", {best.time_ms / fused.time_ms:.2f}x vs best other ({best.variant} " \
             f"{best.time_ms:.3f} ms)"
    return s, True


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

    dname = harness.DTYPE_NAMES[dtype]
    report = harness.Report(args.csv, lambda rows: summary_lines(rows, dname)[0])
    copy_bw = harness.measure_copy_bandwidth()
    harness.print_header(copy_bw)
    for l, N in args.sizes:
        report.add(bench_size(args, l, N, dtype, copy_bw, timing_kw, ops, ref, fused_available), copy_bw)
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
