"""Benchmark of the MUDD connection path: mudd_weights, one aggregation on a DepthStack,
and a whole L-layer connection stack (crosslayer.nn), plus the connection state's
peak memory, DepthStack vs list-and-stack.

Napkin math (DESIGN.md "Traffic floors"; activation-dtype elements per token, as a
multiple of d; weights, coefficients A / dA and their gradients left out):

    mudd_weights      fwd: read x                                    1
                      bwd: read x, write dx                          2   fwd+bwd 3
    aggregate         fwd: read l slots, write C ways                l + C
    (one connection   bwd, fresh gradient buffer: read S, dY,
     on a DepthStack)  write G[:l]                                   2l + C
    stack of L        per layer i (l = i + 2; C = 4, the last layer C = 1):
    connections       fwd: push (read x, write slot) 2 + weights 1 + (l + C)
                      bwd: weights 2 + read S, dY (l + C) + G[:l] read and
                           written in place (2l), written only by the last layer
                           (the first to touch it in backward: l)
                      (the identity blocks' own gradient plumbing is left out)

    floor time = N * elements * d * bytes per element / measured copy bandwidth

H100 80GB HBM3, copy bandwidth 3.00 TB/s (read + write), bf16 (2 bytes), d = 2048,
N = 16384 (one d-row of all tokens: 16384 * 2048 * 2 B = 0.0671 GB, 0.0224 ms):

    row                         elems      bytes      floor
    mudd_weights fwd+bwd          3d     0.201 GB   0.067 ms   (DESIGN.md 0.07 ms)
    aggregate l=13 fwd           17d     1.141 GB   0.380 ms
    aggregate l=13 fwd+bwd       47d     3.154 GB   1.051 ms
    aggregate l=25 fwd           29d     1.946 GB   0.649 ms
    aggregate l=25 fwd+bwd       83d     5.570 GB   1.857 ms
    aggregate l=49 fwd           53d     3.557 GB   1.186 ms
    aggregate l=49 fwd+bwd      155d    10.402 GB   3.467 ms
    stack L=24 fwd              489d    32.816 GB  10.939 ms
    stack L=24 fwd+bwd         1577d   105.831 GB  35.277 ms

    e.g. stack fwd, L = 24: sum over layers of 3 + l + C = 72 + 324 + 93 = 489;
    bwd: 48 + (324 + 93) + 2 * (324 - 25) + 25 = 1088; 489 + 1088 = 1577.
    The script recomputes every floor from the copy bandwidth it measures.

Arithmetic: the weight MLP does 2*d*K + 2*K*C*l FLOPs per token (K ~ C*l, ~0.4 MFLOP
at l = 25, d = 2048): a few % of an H100's bf16 tensor throughput per byte moved, so
memory-bound; the aggregation is 2*l*C FLOPs per element read (0.05 FLOP/byte).

Rows (op / variant):
  mudd_weights    fused = crosslayer.ops.mudd_weights (looked up at run time: absent
                  until its kernel lands -> "failed: missing op", exit 3),
                  eager_oracle = crosslayer.ref.mudd_weights, compile_oracle
                  (l = 25, C = 4, K = C*l; x random, W1 ~ N(0, 1/d), W2, bias ~ N(0, 0.02))
  aggregate       fused = DepthStack.aggregate on a stack of l pushed slots (backward
                  into the stack's gradient buffer), eager_oracle = list of slots ->
                  torch.stack -> ref.depth_aggregate, compile_oracle of that; the
                  gradients of A and of every slot are computed and compared
  stack           L = 24 MUDDConnection layers with identity blocks (x_{i+1} = the r
                  way): fused = DepthStack + crosslayer.ops, eager_oracle = the modules'
                  list-and-stack path, compile_oracle = torch.compile of that
                  (fullgraph); gate: output and the gradients of x0 and every weight
Memory table: torch.cuda.max_memory_allocated over one fwd+bwd of the L-layer stack
(L = 12, 24, 48; N = 4096 so the quadratic baseline fits), minus what was allocated
before, DepthStack vs list-and-stack.

Run: python bench/bench_mudd.py [--quick] [--dtype bf16] [--N 16384] [--d 2048]
     [--ops mudd_weights,aggregate,stack,memory]
Exit: 0 ok; 2 no CUDA device; 3 a fused row was WRONG, failed, missing or not fused.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
import torch  # noqa: E402
from crosslayer.contracts import CONTRACTS  # noqa: E402
from harness import DISPLAY_ORDER, MODES, VARIANTS  # noqa: E402

OPS = ("mudd_weights", "aggregate", "stack", "memory")
C_WAYS = 4
WEIGHTS_L = 25
AGG_LS = (13, 25, 49)
QUICK_AGG_LS = (25,)
STACK_L = 24
MEMORY_LS = (12, 24, 48)
MEMORY_N = 4096
DEVICE = "cuda"  # tests of the row building set it to "cpu"

# --------------------------------------------------------------------------- floors


def weights_floor_elements(mode: str) -> int:
    """mudd_weights: elements per token as a multiple of d."""
    _check_mode(mode)
    return CONTRACTS["mudd_weights"].floor_elements(mode, d=1)


def aggregate_floor_elements(mode: str, l: int, C: int = C_WAYS) -> int:
    """One aggregation on a DepthStack, fresh gradient buffer (multiple of d)."""
    _check_mode(mode)
    return CONTRACTS["depth_aggregate"].floor_elements(mode, d=1, l=l, C=C)


def stack_floor_elements(mode: str, L: int, C: int = C_WAYS) -> int:
    """L connection layers (push + weights + aggregate each), multiple of d."""
    _check_mode(mode)
    fwd = bwd = 0
    for i in range(L):
        l, c = i + 2, (C if i < L - 1 else 1)
        fwd += 2 + 1 + l + c
        bwd += 2 + l + c + (2 * l if i < L - 1 else l)
    return fwd if mode == "fwd" else fwd + bwd


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def floor_bytes(elements: int, N: int, d: int, elem_bytes: int) -> int:
    return N * elements * d * elem_bytes


# --------------------------------------------------------------------------- args


def parse_args(argv=None) -> argparse.Namespace:
    p = harness.bench_parser(__doc__, "aggregate at l=25 only, fewer repetitions", VARIANTS)
    p.add_argument("--N", type=int, default=16384, help="tokens (default 16384)")
    p.add_argument("--d", type=int, default=2048, help="model width (default 2048)")
    p.add_argument("--ops", type=harness.name_list, default=list(OPS),
                   help=f"comma-separated subset of {','.join(OPS)}")
    args = harness.parse_bench_args(p, argv, variants=VARIANTS, ops=OPS)
    if args.N < 1 or args.d < 1:
        p.error("--N and --d must be positive")
    args.agg_ls = QUICK_AGG_LS if args.quick else AGG_LS
    return args


# --------------------------------------------------------------------------- cases


class Case:
    """A variant-independent workload: make(variant) -> (forward fn, leaves), plus the
    gradient of its output for fwd+bwd."""

    def __init__(self, op, shape, elements, make, dout):
        self.op, self.shape, self.elements, self.make, self.dout = op, shape, elements, make, dout


def weights_case(N, d, dtype, ops, ref):
    dev, f32 = DEVICE, torch.float32
    C, l = C_WAYS, WEIGHTS_L
    K = C * l
    x = torch.randn(N, d, device=dev, dtype=dtype)
    W1 = torch.randn(d, K, device=dev, dtype=f32) / d**0.5
    W2 = 0.02 * torch.randn(K, C * l, device=dev, dtype=f32)
    bias = 0.02 * torch.randn(C, l, device=dev, dtype=f32)
    dA = torch.randn(N, C, l, device=dev, dtype=f32)
    fused = getattr(ops, "mudd_weights", None)

    def make(variant, mode):
        leaves = [t.detach().requires_grad_(mode != "fwd") for t in (x, W1, W2, bias)]
        f = {"eager_oracle": ref.mudd_weights, "fused": fused,
             "compile_oracle": _compile(ref.mudd_weights)}[variant]
        if f is None:
            return None, leaves
        return (lambda: f(*leaves, C)), leaves

    return Case("mudd_weights", f"l={l} N={N} d={d} C={C} K={K}",
                weights_floor_elements, make, dA)


def aggregate_case(l, N, d, dtype, ops, ref, cnn):
    dev, C = DEVICE, C_WAYS
    slots = [torch.randn(N, d, device=dev, dtype=dtype) for _ in range(l)]
    A = torch.randn(N, C, l, device=dev, dtype=torch.float32)
    dY = torch.randn(C, N, d, device=dev, dtype=dtype)

    def list_agg(A_, *xs):
        return ref.depth_aggregate(torch.stack(xs), A_)

    def make(variant, mode):
        grad = mode != "fwd"
        xs = [s.detach().requires_grad_(grad) for s in slots]
        A_ = A.detach().requires_grad_(grad)
        if variant == "fused":
            def f():
                stack = cnn.DepthStack(l, (N, d), dtype=dtype, device=dev)
                for x in xs:
                    stack.push(x)
                return stack.aggregate(A_)
            return f, [A_] + xs
        g = list_agg if variant == "eager_oracle" else _compile(list_agg)
        return (lambda: g(A_, *xs)), [A_] + xs

    # The fused forward also pushes the l slots (2l*d): it is charged to the row.
    return Case("aggregate", f"l={l} N={N} d={d} C={C}",
                lambda mode: aggregate_floor_elements(mode, l), make, dY)


def stack_model(L, d, dtype, cnn, seed=0):
    g = torch.Generator().manual_seed(seed)
    conns = [cnn.MUDDConnection(d, i, L) for i in range(L)]
    with torch.no_grad():
        for c in conns:
            c.reset_parameters(generator=g)
            c.W2.add_(0.02 * torch.randn(c.W2.shape, generator=g))
            c.bias.add_(0.02 * torch.randn(c.bias.shape, generator=g))
    return torch.nn.ModuleList(conns).to(DEVICE)


def run_connections(conns, x0, use_stack: bool):
    """Identity blocks: x_1 = x0, x_{i+1} = the r way of connection i-1."""
    from crosslayer.nn import DepthStack

    L = len(conns)
    stack = DepthStack.start(x0, L + 1) if use_stack else [x0]
    h = x0
    for i in range(L):
        x = h if i == 0 else h[-1]
        stack.push(x) if use_stack else stack.append(x)
        h = conns[i](stack)
    return h[0]


def stack_case(L, N, d, dtype, cnn):
    conns = stack_model(L, d, dtype, cnn)
    x0 = torch.randn(N, d, device=DEVICE, dtype=dtype)
    dout = torch.randn(N, d, device=DEVICE, dtype=dtype)

    def list_model(x):
        return run_connections(conns, x, False)

    def make(variant, mode):
        x = x0.detach().requires_grad_(mode != "fwd")
        leaves = [x] + list(conns.parameters()) if mode != "fwd" else [x]
        if variant == "fused":
            return (lambda: run_connections(conns, x, True)), leaves
        f = list_model if variant == "eager_oracle" else _compile(list_model)
        return (lambda: f(x)), leaves

    return Case("stack", f"L={L} N={N} d={d} C={C_WAYS}",
                lambda mode: stack_floor_elements(mode, L), make, dout)


def _compile(f):
    return torch.compile(f, fullgraph=True, dynamic=False)


# --------------------------------------------------------------------------- rows


def run_case(case: Case, modes, variants, dtype, timing_kw, fused_ok: bool) -> list:
    dname = harness.DTYPE_NAMES[dtype]
    elem = torch.empty((), dtype=dtype).element_size()
    rows = []
    for mode in modes:
        torch._dynamo.reset()
        refs = None
        group = []
        N, d = _N_d(case.shape)
        for variant in variants:
            row = harness.Row(op=case.op, variant=variant, mode=mode, shape=case.shape,
                              dtype=dname,
                              floor_bytes=floor_bytes(case.elements(mode), N, d, elem))
            fn, leaves = case.make(variant, mode)
            if fn is None:
                row.status = "failed: missing op"
                row.note = f"crosslayer.ops has no {case.op}"
                print(f"FAILED: {case.op} {variant} {mode} {case.shape}: {row.note}",
                      file=sys.stderr, flush=True)
                group.append(row)
                continue

            def outputs(fn=fn, leaves=leaves):
                out = fn()
                if mode == "fwd":
                    return [out.detach()]
                for t in leaves:
                    t.grad = None
                torch.autograd.backward(out, case.dout)
                res = [out.detach()] + [t.grad for t in leaves]
                for t in leaves:
                    t.grad = None
                return res

            if mode == "fwd":
                def timed(fn=fn):
                    with torch.no_grad():
                        return harness.bench(fn, **timing_kw)
            else:
                def timed(fn=fn, leaves=leaves):
                    f, setup = harness.fwd_bwd(fn, case.dout, leaves)
                    return harness.bench(f, setup=setup, **timing_kw)

            names = ["out"] + ([f"grad{k}" for k in range(len(leaves))] if mode != "fwd" else [])
            refs = harness.run_gated(row, outputs, timed, refs, dtype, names)
            if variant == "fused" and row.status == "ok" and not fused_ok:
                row.status = "not-fused"
            t = f"{row.time_ms:.3f} ms" if row.time_ms is not None else "-"
            print(f"  [{case.op} {case.shape} {dname} {mode}] {variant:<15} {t:>12}  "
                  f"{row.status}", flush=True)
            group.append(row)
        refs = None
        group.sort(key=lambda r: DISPLAY_ORDER.index(r.variant))
        rows += group
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return rows


def _N_d(shape: str) -> tuple:
    kv = dict(item.split("=") for item in shape.split())
    return int(kv["N"]), int(kv["d"])


def memory_table(N, d, dtype, cnn) -> tuple[str, list]:
    """Peak CUDA memory of one fwd+bwd of the L-layer stack, minus the baseline."""
    lines = [f"connection-state peak memory, fwd+bwd, identity blocks, N={N} d={d} "
             f"{harness.DTYPE_NAMES[dtype]} (GiB above the inputs and weights)",
             f"{'L':>3} {'DepthStack':>11} {'list+stack':>11} {'ratio':>6}"]
    results = []
    for L in MEMORY_LS:
        conns = stack_model(L, d, dtype, cnn)
        peaks = {}
        for name, use_stack in (("DepthStack", True), ("list+stack", False)):
            x0 = torch.randn(N, d, device=DEVICE, dtype=dtype, requires_grad=True)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            try:
                run_connections(conns, x0, use_stack).float().sum().backward()
                torch.cuda.synchronize()
                peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**30
            except torch.cuda.OutOfMemoryError:
                peaks[name] = float("inf")
            for p in conns.parameters():
                p.grad = None
            del x0
        results.append((L, peaks["DepthStack"], peaks["list+stack"]))
        lines.append(f"{L:>3} {peaks['DepthStack']:>11.2f} {peaks['list+stack']:>11.2f} "
                     f"{peaks['list+stack'] / peaks['DepthStack']:>6.2f}")
        del conns
        torch.cuda.empty_cache()
    return "\n".join(lines), results


def summary_lines(rows: Sequence[harness.Row], dname: str) -> tuple[list, bool]:
    """One SUMMARY line per (op, shape): per mode the floor and every variant's time (x
    floor); not ok when the fused row is not ok."""
    return harness.summary_lines(rows, dname, _summary_part)


def _summary_part(mode: str, by: dict) -> tuple[str, bool]:
    ok = True
    floor = next(iter(by.values())).derived.get("floor_ms")
    s = f"{mode}: floor {floor:.3f} ms" if floor is not None else f"{mode}:"
    for v in DISPLAY_ORDER:
        r = by.get(v)
        if r is None:
            continue
        if r.time_ms is None or r.status not in ("ok", "ref"):
            s += f", {v} {r.status}"
            ok = ok and v != "fused"
        else:
            s += f", {v} {r.time_ms:.3f} ms"
            if "x_floor" in r.derived:
                s += f" ({r.derived['x_floor']:.2f}x floor)"
    return s, ok


def main(argv=None) -> int:
    args = parse_args(argv)
    harness.require_cuda()  # before crosslayer is imported: exit 2 without a GPU
    dtype = harness.parse_dtype(args.dtype)

    import crosslayer.nn as cnn
    import crosslayer.ops as ops
    import crosslayer.ref as ref

    fused = ops.fused_ops()
    timing_kw = harness.timing_kwargs(args.quick, args.warmup_ms, args.rep_ms)

    dname = harness.DTYPE_NAMES[dtype]
    report = harness.Report(args.csv, lambda rows: summary_lines(rows, dname)[0])
    copy_bw = harness.measure_copy_bandwidth()
    harness.print_header(copy_bw)
    N, d = args.N, args.d
    cases = []
    if "mudd_weights" in args.ops:
        cases.append((lambda: weights_case(N, d, dtype, ops, ref), MODES,
                      fused.get("mudd_weights", False)))
    if "aggregate" in args.ops:
        for l in args.agg_ls:
            cases.append((lambda l=l: aggregate_case(l, N, d, dtype, ops, ref, cnn), MODES,
                          fused.get("depth_aggregate", False)))
    if "stack" in args.ops:
        cases.append((lambda: stack_case(STACK_L, N, d, dtype, cnn), ("fwd+bwd",),
                      fused.get("depth_aggregate", False) and fused.get("mudd_weights", False)))
    for make_case, modes, fused_ok in cases:
        case = make_case()
        rows = run_case(case, modes, args.variants, dtype, timing_kw, fused_ok)
        del case
        harness.finalize_rows(rows, copy_bw)
        report.add(rows, copy_bw)
        torch.cuda.empty_cache()
    if "memory" in args.ops:
        text, results = memory_table(MEMORY_N, d, dtype, cnn)
        print(text, flush=True)
        report.summaries.append("SUMMARY memory " + " | ".join(
            f"L={L}: DepthStack {a:.2f} GiB, list+stack {b:.2f} GiB" for L, a, b in results))
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
