"""Benchmark of the Hyper-Connections ops (HC, DESIGN.md "HC family"): hc_pre (DHC and
SHC), hc_post, and the whole sublayer (DHC pre -> identity branch -> post).

Napkin math (DESIGN.md "Traffic floors"; activation-dtype elements per token;
coefficients alpha (n, n+1), beta (n), W (d, n+2) and their gradients are fp32 and
left out as negligible: n*(n+2)*4 = 96 B per token at n = 4 vs 20 KB of activations):

    op           forward                        backward (fresh grads)            fwd+bwd
    hc_pre       read H, write x: n*d + d       read H, dx; write dH: 2n*d + d     3n*d + 2d
    hc_post      read H, y; write H': 2n*d + d  read dH', H, y; write dH, dy:      5n*d + 3d
                                                3n*d + 2d
    sublayer     pre + post: 3n*d + 2d          post bwd + pre bwd, dH summed:     9n*d + 5d
    (DHC pre -> y = x -> post)                  6n*d + 3d

    floor time = N * elements * bytes per element / measured copy bandwidth

SHC and DHC hc_pre have the same floor (DHC's projection H_i.W reads the same H).
H100 80GB HBM3, copy bandwidth 3.00 TB/s (read + write), bf16 (2 bytes), N = 16384,
n = 4 (elements per token as a multiple of d):

    op / mode            elems    d = 2048: bytes  floor      d = 4096: bytes  floor
    hc_pre fwd            5d      0.336 GB    0.112 ms        0.671 GB    0.224 ms
    hc_pre fwd+bwd       14d      0.940 GB    0.313 ms        1.879 GB    0.626 ms
    hc_post fwd           9d      0.604 GB    0.201 ms        1.208 GB    0.403 ms
    hc_post fwd+bwd      23d      1.544 GB    0.515 ms        3.087 GB    1.029 ms
    sublayer fwd         14d      0.940 GB    0.313 ms        1.879 GB    0.626 ms
    sublayer fwd+bwd     41d      2.751 GB    0.917 ms        5.503 GB    1.834 ms

    e.g. sublayer fwd+bwd, d = 2048: 16384 * (9*4 + 5) * 2048 * 2 B = 2.751 GB
    / 3.00 TB/s = 0.917 ms, DESIGN.md's 0.92 ms yardstick (1.83 ms at d = 4096).
    The script recomputes every floor from the copy bandwidth it measures on the
    machine at hand (printed before the first table), not from 3.00 TB/s.

Arithmetic: DHC pre does 2*(n+2) FLOPs per element of H for the projection plus the
norm and the mix (~15 FLOP per 2-byte element, ~7 FLOP/byte at n = 4); the H100 has
~60 TFLOP/s of fp32 FMA (non-tensor) against 3 TB/s, 20 FLOP/byte, so even DHC pre is
memory-bound, as long as the projection is not done with scalar loads.

Ops (rows' `op`): hc_pre (W given), hc_pre_shc, hc_post (per-token alpha and beta
from a DHC pre), hc_sublayer (DHC pre -> y = x -> post, DESIGN.md's yardstick:
torch.compile oracle 8.2 ms at d=2048, 15.9 ms at d=4096, n=4). Modes: fwd, fwd+bwd
(gradients w.r.t. H, W, A, B, s_a, s_b; and y, alpha, beta for hc_post; hc_pre's
fwd+bwd also feeds random gradients to alpha and beta so every backward path runs).
Variants: fused (crosslayer.ops.hc_pre / hc_post, looked up at run time: a missing op
or fused_ops()[name] False makes the row failed / not-fused and the exit status 3),
eager_oracle (crosslayer.ref), compile_oracle (torch.compile(oracle, fullgraph=True,
dynamic=False), compiled afresh for each op, mode and size; the sublayer is compiled
as one graph). Inputs: H ~ N(0, 1); A, B = hc_init_static + N(0, 0.02) noise;
W ~ N(0, 0.02) (W = 0 would make the tanh terms vanish); s_a = s_b = 0.01 as fp32
0-dim tensors. Every variant is checked against the eager oracle before it is timed.

Run: python bench/bench_hc.py [--quick] [--dtype bf16] [--d 1024,2048,4096,8192]
     [--n 2,4,8] [--N 16384] [--ops hc_pre,hc_pre_shc,hc_post,hc_sublayer]
--quick: n=4: every op at d=2048, and the sublayer fwd+bwd at d=4096.
Exit: 0 ok; 2 no CUDA device; 3 a fused op was WRONG, failed, missing or not fused.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
import torch  # noqa: E402
from crosslayer.contracts import CONTRACTS  # noqa: E402
from harness import DISPLAY_ORDER, MODES, VARIANTS  # noqa: E402

OPS = ("hc_pre", "hc_pre_shc", "hc_post", "hc_sublayer")
DEFAULT_N_TOKENS = 16384
DEFAULT_DS = (1024, 2048, 4096, 8192)
DEFAULT_NS = (2, 4, 8)
# --quick: (n, d, ops, modes). Covers issue 3's targets: DHC sublayer fwd+bwd at n=4,
# d=2048 and d=4096. 9 groups, each compiled once (compile dominates quick's time).
QUICK_PLAN = (
    (4, 2048, OPS, MODES),
    (4, 4096, ("hc_sublayer",), ("fwd+bwd",)),
)
# The crosslayer.ops functions each op's fused variant needs.
FUSED_NEEDS = {
    "hc_pre": ("hc_pre",),
    "hc_pre_shc": ("hc_pre",),
    "hc_post": ("hc_post",),
    "hc_sublayer": ("hc_pre", "hc_post"),
}
# Device the bench allocates on; tests of the row building set it to "cpu".
DEVICE = "cuda"

# --------------------------------------------------------------------------- floors



def floor_kind(op: str) -> str:
    """The floor family of a row's op: hc_pre / hc_pre_shc -> hc_pre."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    return "hc_pre" if op.startswith("hc_pre") else op


def floor_elements(op: str, mode: str, n: int, d: int) -> int:
    """Activation elements moved per token (fresh-gradient backward)."""
    kind = floor_kind(op)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    return CONTRACTS[kind].floor_elements(mode, d=d, n=n)


def floor_bytes(op: str, mode: str, N: int, n: int, d: int, elem_bytes: int) -> int:
    return N * floor_elements(op, mode, n, d) * elem_bytes


def floor_ms(op: str, mode: str, N: int, n: int, d: int, elem_bytes: int,
             copy_bw: float) -> float:
    """Floor time in ms at `copy_bw` bytes/s (read + write)."""
    return floor_bytes(op, mode, N, n, d, elem_bytes) / copy_bw * 1e3


def shape_str(N: int, n: int, d: int) -> str:
    return f"N={N} n={n} d={d}"


def floor_table(plan, N: int, elem_bytes: int, copy_bw: float) -> str:
    """The napkin-math table of the docstring for `plan`, at `copy_bw`."""
    lines = [f"floors at {copy_bw / 1e12:.3f} TB/s, {elem_bytes} B/element, N={N} "
             "(elements per token as a multiple of d):"]
    for n, d, ops, modes in plan:
        for op in ops:
            for mode in modes:
                e = floor_elements(op, mode, n, d)
                b = floor_bytes(op, mode, N, n, d, elem_bytes)
                lines.append(f"    {op:<12} {mode:<8} n={n} d={d:<5} {e // d:>3}d "
                             f"{b / 1e9:8.3f} GB  {b / copy_bw * 1e3:8.3f} ms")
    return "\n".join(lines)


# --------------------------------------------------------------------------- args

def _int_list(name: str) -> Callable[[str], tuple[int, ...]]:
    def parse(text: str) -> tuple[int, ...]:
        try:
            vals = tuple(int(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected comma-separated integers, "
                                             f"got {text!r}")
        if not vals or any(v < 1 for v in vals):
            raise argparse.ArgumentTypeError(f"{name}: expected positive integers, got {text!r}")
        return vals
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = harness.bench_parser(__doc__, "n=4: every op at d=2048 and the sublayer fwd+bwd at d=4096, "
                                      "fewer repetitions (unless --d/--n/--ops are given)", VARIANTS)
    p.add_argument("--N", type=int, default=DEFAULT_N_TOKENS, help="tokens (default 16384)")
    p.add_argument("--d", type=_int_list("--d"), default=None,
                   help="model widths (default 1024,2048,4096,8192)")
    p.add_argument("--n", type=_int_list("--n"), default=None,
                   help="HC streams (default 2,4,8)")
    p.add_argument("--ops", type=harness.name_list, default=None,
                   help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--modes", type=harness.name_list, default=None,
                   help="comma-separated: fwd,fwd+bwd")
    args = harness.parse_bench_args(p, argv, variants=VARIANTS, ops=OPS, modes=MODES)
    if args.N < 1:
        p.error("--N must be positive")
    for n in args.n or []:
        if n > 16:
            p.error(f"--n: at most 16 streams, got {n}")
    args.plan = make_plan(args)
    return args


def make_plan(args) -> list[tuple[int, int, tuple[str, ...], tuple[str, ...]]]:
    """[(n, d, ops, modes)] in run order. --quick uses QUICK_PLAN unless the sizes or
    ops are given explicitly; --modes restricts any plan."""
    explicit = args.d is not None or args.n is not None or args.ops is not None
    if args.quick and not explicit:
        plan = [(n, d, tuple(ops), tuple(modes)) for n, d, ops, modes in QUICK_PLAN]
    else:
        ops = tuple(args.ops or OPS)
        plan = [(n, d, ops, MODES) for d in (args.d or DEFAULT_DS)
                for n in (args.n or DEFAULT_NS)]
    if args.modes:
        plan = [(n, d, ops, tuple(m for m in modes if m in args.modes))
                for n, d, ops, modes in plan]
    return [entry for entry in plan if entry[2] and entry[3]]


# --------------------------------------------------------------------------- inputs

def make_base_inputs(N: int, n: int, d: int, dtype: torch.dtype, ref) -> dict:
    """Realistic random inputs shared by every op of one size (never zeros)."""
    dev = DEVICE
    f32 = torch.float32
    A, B = ref.hc_init_static(n, layer_index=1, dtype=f32, device=dev)
    base = {
        "H": torch.randn(N, n, d, device=dev, dtype=dtype),
        "A": A + 0.02 * torch.randn(n, n + 1, device=dev, dtype=f32),
        "B": B + 0.02 * torch.randn(n, device=dev, dtype=f32),
        "W": 0.02 * torch.randn(d, n + 2, device=dev, dtype=f32),
        "s_a": torch.tensor(0.01, device=dev, dtype=f32),
        "s_b": torch.tensor(0.01, device=dev, dtype=f32),
        "y": torch.randn(N, d, device=dev, dtype=dtype),
    }
    with torch.no_grad():  # per-token coefficients as a DHC layer makes them
        _, alpha, beta = ref.hc_pre(base["H"], base["A"], base["B"], base["W"],
                                    base["s_a"], base["s_b"])
    base["alpha"], base["beta"] = alpha.contiguous(), beta.contiguous()
    return base


def make_base_grads(N: int, n: int, d: int, dtype: torch.dtype) -> dict:
    dev, f32 = DEVICE, torch.float32
    return {
        "dx": torch.randn(N, d, device=dev, dtype=dtype),
        "dalpha": 0.1 * torch.randn(N, n, n + 1, device=dev, dtype=f32),
        "dbeta": 0.1 * torch.randn(N, n, device=dev, dtype=f32),
        "dalpha_static": torch.randn(n, n + 1, device=dev, dtype=f32),
        "dbeta_static": torch.randn(n, device=dev, dtype=f32),
        "dH_new": torch.randn(N, n, d, device=dev, dtype=dtype),
    }


# Argument names, output names and gradient outputs of each op.
OP_ARGS = {
    "hc_pre": ("H", "A", "B", "W", "s_a", "s_b"),
    "hc_pre_shc": ("H", "A", "B"),
    "hc_post": ("H", "y", "alpha", "beta"),
    "hc_sublayer": ("H", "A", "B", "W", "s_a", "s_b"),
}
OP_OUTS = {
    "hc_pre": ("x", "alpha", "beta"),
    "hc_pre_shc": ("x", "alpha", "beta"),
    "hc_post": ("H'",),
    "hc_sublayer": ("H'",),
}
OP_GRAD_OUTS = {
    "hc_pre": ("dx", "dalpha", "dbeta"),
    "hc_pre_shc": ("dx", "dalpha_static", "dbeta_static"),
    "hc_post": ("dH_new",),
    "hc_sublayer": ("dH_new",),
}


@dataclass
class Case:
    """One (op, mode) at one size: the call's arguments, the leaves whose .grad the
    backward writes, the gradient outputs, and the names of what the gate compares."""
    op: str
    mode: str
    args: list
    leaves: list = field(default_factory=list)
    grads: list = field(default_factory=list)
    names: list = field(default_factory=list)


def make_case(op: str, mode: str, base: dict, grads: dict | None) -> Case:
    names = list(OP_ARGS[op])
    if mode == "fwd":
        return Case(op, mode, [base[k] for k in names], names=list(OP_OUTS[op]))
    # Leaves sharing the inputs' memory; their .grad is fresh each run.
    args = [base[k].detach().requires_grad_(True) for k in names]
    return Case(op, mode, args, leaves=args, grads=[grads[k] for k in OP_GRAD_OUTS[op]],
                names=list(OP_OUTS[op]) + [f"d{k}" for k in names])


def op_function(op: str, hc_pre, hc_post) -> Callable:
    """The callable a variant times, built from a pair of hc_pre / hc_post."""
    if op == "hc_pre":
        def hc_pre_(H, A, B, W, s_a, s_b):
            return hc_pre(H, A, B, W, s_a, s_b)
        return hc_pre_
    if op == "hc_pre_shc":
        def hc_pre_shc(H, A, B):
            return hc_pre(H, A, B)
        return hc_pre_shc
    if op == "hc_post":
        def hc_post_(H, y, alpha, beta):
            return hc_post(H, y, alpha, beta)
        return hc_post_
    if op == "hc_sublayer":
        def hc_sublayer(H, A, B, W, s_a, s_b):
            x, alpha, beta = hc_pre(H, A, B, W, s_a, s_b)
            return hc_post(H, x, alpha, beta)  # identity branch: y = x
        return hc_sublayer
    raise ValueError(f"unknown op {op!r}")


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def run_outputs(f: Callable, case: Case) -> list:
    """Run f once; the tensors the gate compares (outputs, then the leaves' grads)."""
    if case.mode == "fwd":
        return [t.detach() if t is not None else None for t in _as_tuple(f(*case.args))]
    for t in case.leaves:
        t.grad = None
    outs = _as_tuple(f(*case.args))
    torch.autograd.backward(outs, case.grads)
    res = [o.detach() for o in outs] + [t.grad for t in case.leaves]
    for t in case.leaves:
        t.grad = None
    return res


def fused_status(op: str, ops) -> tuple[Callable | None, str, str]:
    """(callable or None, status, note) of the fused variant of `op`.

    status: "ok"; "missing" (crosslayer.ops lacks a function: the row fails);
    "not-fused" (ops.fused_ops() says False: the row is timed, then marked).
    """
    needs = FUSED_NEEDS[op]
    missing = [name for name in needs if getattr(ops, name, None) is None]
    if missing:
        return None, "missing", (f"crosslayer.ops has no {', '.join(missing)} "
                                 "(the fused op is not in this tree)")
    try:
        fused = ops.fused_ops()
    except Exception as e:  # noqa: BLE001
        fused = {}
        print(f"warning: crosslayer.ops.fused_ops() failed: {e}", file=sys.stderr)
    off = [name for name in needs if not fused.get(name, False)]
    f = op_function(op, getattr(ops, "hc_pre", None), getattr(ops, "hc_post", None))
    if off:
        return f, "not-fused", (f"crosslayer.ops.fused_ops() says False for "
                                f"{', '.join(off)}: the row timed the oracle fallback")
    return f, "ok", ""


# --------------------------------------------------------------------------- bench

def bench_group(op: str, mode: str, N: int, n: int, d: int, dtype: torch.dtype,
                base: dict, grads: dict | None, variants: Sequence[str],
                timing_kw: dict, ops, ref) -> list[harness.Row]:
    """Rows of every variant of one (op, mode, size): gate, then time. Never raises."""
    shape = shape_str(N, n, d)
    dname = harness.DTYPE_NAMES[dtype]
    elem = torch.empty((), dtype=dtype).element_size()
    case = make_case(op, mode, base, grads)
    torch._dynamo.reset()  # fresh compile cache per group: no recompile limit
    ref_f = op_function(op, ref.hc_pre, ref.hc_post)
    refs: list | None = None
    rows: list[harness.Row] = []
    for variant in variants:
        row = harness.Row(op=op, variant=variant, mode=mode, shape=shape, dtype=dname,
                          floor_bytes=floor_bytes(op, mode, N, n, d, elem))
        fstatus, fnote = "ok", ""
        if variant == "eager_oracle":
            f = ref_f
        elif variant == "compile_oracle":
            f = torch.compile(ref_f, fullgraph=True, dynamic=False)
        else:
            f, fstatus, fnote = fused_status(op, ops)

        timed = harness.timer(lambda f=f: f(*case.args), mode, case.grads, case.leaves, **timing_kw)

        if f is None:
            row.status = "failed: missing op"
            row.note = fnote
            print(f"FAILED: {op} {variant} {mode} {shape} {dname}: {fnote}",
                  file=sys.stderr, flush=True)
        else:
            refs = harness.run_gated(row, lambda f=f: run_outputs(f, case), timed, refs, dtype, case.names)
            if variant == "fused" and fstatus == "not-fused" and row.status == "ok":
                row.status = "not-fused"
                row.note = fnote
        t = f"{row.time_ms:.3f} ms" if row.time_ms is not None else "-"
        print(f"  [{op} {shape} {dname} {mode}] {variant:<15} {t:>12}  {row.status}"
              + (f"  ({row.note})" if row.note and variant == "compile_oracle" else ""),
              flush=True)
        rows.append(row)
    rows.sort(key=lambda r: DISPLAY_ORDER.index(r.variant))
    return rows


def bench_size(n: int, d: int, ops_to_run: Sequence[str], modes: Sequence[str], N: int,
               dtype: torch.dtype, variants: Sequence[str], copy_bw: float,
               timing_kw: dict, ops, ref) -> list[harness.Row]:
    base = make_base_inputs(N, n, d, dtype, ref)
    grads = make_base_grads(N, n, d, dtype) if "fwd+bwd" in modes else None
    rows: list[harness.Row] = []
    for op in ops_to_run:
        for mode in modes:
            rows += bench_group(op, mode, N, n, d, dtype, base, grads, variants,
                                timing_kw, ops, ref)
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    del base, grads
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    harness.finalize_rows(rows, copy_bw)
    return rows


def summary_lines(rows: Sequence[harness.Row], dname: str) -> tuple[list[str], bool]:
    """One SUMMARY line per (op, shape): per mode the fused time vs its floor, the
    compiled and eager oracles' times and x floor. ok is False when any fused row is
    not status ok (WRONG, failed, missing, not-fused)."""
    return harness.summary_lines(rows, dname, _summary_part)


def _summary_part(mode: str, by: dict) -> tuple[str, bool]:
    ok = True
    floor = next(iter(by.values())).derived.get("floor_ms")
    s = f"{mode}: floor {floor:.3f} ms" if floor is not None else f"{mode}:"
    fused = by.get("fused")
    if fused is not None:
        if fused.status != "ok" or fused.time_ms is None:
            ok = False
            t = f" {fused.time_ms:.3f} ms" if fused.time_ms is not None else ""
            s += f", fused{t} {fused.status}"
        else:
            s += (f", fused {fused.time_ms:.3f} ms = "
                  f"{fused.derived['x_floor']:.2f}x floor")
    for v in ("compile_oracle", "eager_oracle"):
        r = by.get(v)
        if r is None:
            continue
        if r.time_ms is None or r.status not in ("ok", "ref"):
            s += f", {v} {r.status}"
            continue
        s += f", {v} {r.time_ms:.3f} ms ({r.derived['x_floor']:.1f}x floor"
        if fused is not None and fused.status == "ok" and fused.time_ms:
            s += f", fused {r.time_ms / fused.time_ms:.2f}x faster"
        s += ")"
    return s, ok


def main(argv=None) -> int:
    args = parse_args(argv)
    harness.require_cuda()  # before crosslayer is imported: exit 2 without a GPU
    dtype = harness.parse_dtype(args.dtype)

    import crosslayer.ops as ops
    import crosslayer.ref as ref

    if "fused" in args.variants:
        for name in ("hc_pre", "hc_post"):
            if getattr(ops, name, None) is None:
                print(f"warning: crosslayer.ops has no {name}: its fused rows are marked "
                      f"failed (exit 3)", file=sys.stderr)
            elif not ops.fused_ops().get(name, False):
                print(f"warning: crosslayer.ops.fused_ops()[{name!r}] is False: its fused "
                      f"rows time the fallback and are marked not-fused (exit 3)",
                      file=sys.stderr)
    timing_kw = harness.timing_kwargs(args.quick, args.warmup_ms, args.rep_ms)

    dname = harness.DTYPE_NAMES[dtype]
    report = harness.Report(args.csv, lambda rows: summary_lines(rows, dname)[0])
    copy_bw = harness.measure_copy_bandwidth()
    harness.print_header(copy_bw)
    elem = torch.empty((), dtype=dtype).element_size()
    print(floor_table(args.plan, args.N, elem, copy_bw), flush=True)
    for n, d, ops_to_run, modes in args.plan:
        report.add(bench_size(n, d, ops_to_run, modes, args.N, dtype, args.variants, copy_bw,
                              timing_kw, ops, ref), copy_bw)
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
