"""Benchmark of the mHC coefficients (DESIGN.md "HC family", mHC) alone and of the mHC
sublayer: coeffs -> x = stream_mix(H, alpha[..., 0]) -> identity branch y = x ->
H' = hc_post(H, y, alpha, beta).

Napkin math (DESIGN.md "Traffic floors"; activation-dtype elements per token;
phi (n·d, n²+2n) fp32, coefficients and their gradients are left out as negligible):

    op           forward                       backward (fresh grads)          fwd+bwd
    mhc_coeffs   read H: n*d                   read H, write dH: 2n*d          3n*d
    sublayer     3n*d + 2d (DESIGN.md's HC     6n*d + 3d                       9n*d + 5d
                 sublayer floor: the coeffs'
                 read of H fused with the pre)

    floor time = N * elements * bytes per element / measured copy bandwidth

H100 80GB HBM3, 3.00 TB/s, bf16, N = 16384, n = 4:

    op / mode            elems    d = 2048: bytes  floor      d = 4096: bytes  floor
    coeffs fwd            4d      0.268 GB    0.089 ms        0.537 GB    0.179 ms
    coeffs fwd+bwd       12d      0.805 GB    0.268 ms        1.611 GB    0.537 ms
    sublayer fwd         14d      0.940 GB    0.313 ms        1.879 GB    0.626 ms
    sublayer fwd+bwd     41d      2.751 GB    0.917 ms        5.503 GB    1.834 ms

This version's kernels read H once more than the floor in the coefficient backward
(dphi = xfᵀ·du by cuBLAS), and the sublayer reads H in the coefficients and again in
stream_mix (separate ops), so expect the fused rows at ~1.3-1.5x these floors.

Ops: mhc_coeffs, mhc_sublayer. Modes: fwd, fwd+bwd (gradients w.r.t. H, phi, a_*, b;
the coefficient op's fwd+bwd feeds random gradients to alpha and beta). Variants:
fused (crosslayer.ops.mhc_coeffs [+ stream_mix, hc_post]), eager_oracle
(crosslayer.ref), compile_oracle (torch.compile(oracle, fullgraph=True, dynamic=False),
compiled afresh per op, mode and size), liger (Liger-Kernel's liger_mhc_coeffs /
liger_mhc_pre / liger_mhc_post_res when `liger_kernel` is importable; it applies h_res
untransposed and its gate is skipped: its timing is a yardstick, not checked here).
Inputs: H ~ N(0, 1); phi ~ N(0, 1/(n·d)); a_* = 0.01·(1 + U(0, 1)); b ~ N(0, 1).

Run: python bench/bench_mhc.py [--quick] [--dtype bf16] [--d 2048,4096,7168] [--n 4]
     [--N 16384] [--ops mhc_coeffs,mhc_sublayer] [--variants ...] [--modes ...]
--quick: n = 4, d = 2048 and 4096, both ops and modes.
Exit: 0 ok; 2 no CUDA device; 3 a fused op was WRONG, failed, missing or not fused.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_hc  # noqa: E402  (shared row building: Case, run_outputs, summary_lines)
import harness  # noqa: E402
import torch  # noqa: E402
from crosslayer.contracts import CONTRACTS  # noqa: E402
from harness import MODES  # noqa: E402

OPS = ("mhc_coeffs", "mhc_sublayer")
VARIANTS = harness.VARIANTS + ("liger",)
DISPLAY_ORDER = harness.DISPLAY_ORDER + ("liger",)
DEFAULT_N_TOKENS = 16384
DEFAULT_DS = (2048, 4096, 7168)
QUICK_DS = (2048, 4096)
FUSED_NEEDS = {"mhc_coeffs": ("mhc_coeffs",), "mhc_sublayer": ("mhc_coeffs", "stream_mix", "hc_post")}
DEVICE = "cuda"

# Floors (DESIGN.md): the mHC sublayer moves what the HC sublayer does.
FLOOR_CONTRACT = {"mhc_coeffs": "mhc_coeffs", "mhc_sublayer": "hc_sublayer"}


def floor_elements(op: str, mode: str, n: int, d: int) -> int:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    return CONTRACTS[FLOOR_CONTRACT[op]].floor_elements(mode, d=d, n=n)


def floor_bytes(op: str, mode: str, N: int, n: int, d: int, elem_bytes: int) -> int:
    return N * floor_elements(op, mode, n, d) * elem_bytes


def floor_ms(op: str, mode: str, N: int, n: int, d: int, elem_bytes: int, copy_bw: float) -> float:
    return floor_bytes(op, mode, N, n, d, elem_bytes) / copy_bw * 1e3


def parse_args(argv=None) -> argparse.Namespace:
    p = harness.bench_parser(__doc__, "d = 2048, 4096 only, fewer repetitions", VARIANTS)
    p.add_argument("--N", type=int, default=DEFAULT_N_TOKENS, help="tokens (default 16384)")
    p.add_argument("--d", type=bench_hc._int_list("--d"), default=None,
                   help="model widths (default 2048,4096,7168)")
    p.add_argument("--n", type=bench_hc._int_list("--n"), default=(4,), help="streams (default 4)")
    p.add_argument("--ops", type=harness.name_list, default=list(OPS))
    p.add_argument("--modes", type=harness.name_list, default=list(MODES))
    args = harness.parse_bench_args(p, argv, variants=VARIANTS, ops=OPS, modes=MODES)
    if any(n > 16 for n in args.n):
        p.error("--n: at most 16 streams")
    if args.N < 1:
        p.error("--N must be positive")
    ds = args.d or (QUICK_DS if args.quick else DEFAULT_DS)
    args.plan = [(n, d) for d in ds for n in args.n]
    return args


def make_inputs(N: int, n: int, d: int, dtype: torch.dtype) -> tuple[dict, dict]:
    """Realistic random inputs (never zeros) and gradient outputs."""
    dev, f32 = DEVICE, torch.float32
    m = n * n + 2 * n
    base = {
        "H": torch.randn(N, n, d, device=dev, dtype=dtype),
        "phi": torch.randn(n * d, m, device=dev, dtype=f32) / (n * d) ** 0.5,
        "a_pre": 0.01 * (1 + torch.rand((), device=dev, dtype=f32)),
        "a_post": 0.01 * (1 + torch.rand((), device=dev, dtype=f32)),
        "a_res": 0.01 * (1 + torch.rand((), device=dev, dtype=f32)),
        "b": torch.randn(m, device=dev, dtype=f32),
    }
    grads = {
        "dalpha": 0.1 * torch.randn(N, n, n + 1, device=dev, dtype=f32),
        "dbeta": 0.1 * torch.randn(N, n, device=dev, dtype=f32),
        "dH_new": torch.randn(N, n, d, device=dev, dtype=dtype),
    }
    return base, grads


ARGS = ("H", "phi", "a_pre", "a_post", "a_res", "b")
OUTS = {"mhc_coeffs": ("alpha", "beta"), "mhc_sublayer": ("H'",)}
GRAD_OUTS = {"mhc_coeffs": ("dalpha", "dbeta"), "mhc_sublayer": ("dH_new",)}


def op_function(op: str, coeffs, stream_mix, hc_post) -> Callable:
    if op == "mhc_coeffs":
        def mhc_coeffs(H, phi, a_pre, a_post, a_res, b):
            return coeffs(H, phi, a_pre, a_post, a_res, b)
        return mhc_coeffs

    def mhc_sublayer(H, phi, a_pre, a_post, a_res, b):
        alpha, beta = coeffs(H, phi, a_pre, a_post, a_res, b)
        x = stream_mix(H, alpha[..., 0])
        return hc_post(H, x, alpha, beta)  # identity branch: y = x
    return mhc_sublayer


def liger_function(op: str) -> tuple[Callable | None, str]:
    """Liger-Kernel's mHC in our argument order, or (None, why)."""
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return None, "not installed"
    lk = None
    for mod in ("liger_kernel.transformers.functional", "liger_kernel.ops.mhc",
                "liger_kernel.transformers.mhc"):
        try:
            m = __import__(mod, fromlist=["liger_mhc_coeffs"])
        except ImportError:
            continue
        if hasattr(m, "liger_mhc_coeffs"):
            lk = m
            break
    if lk is None:
        return None, "liger_kernel has no liger_mhc_coeffs"

    def coeffs(H, phi, a_pre, a_post, a_res, b):
        h_pre, h_post, h_res = lk.liger_mhc_coeffs(H, phi, b, a_pre, a_post, a_res, tmax=20,
                                                   pre_eps=1e-6, allow_fp32=True)
        return h_pre, h_post, h_res

    if op == "mhc_coeffs":
        return coeffs, ""

    def sublayer(H, phi, a_pre, a_post, a_res, b):
        h_pre, h_post, h_res = coeffs(H, phi, a_pre, a_post, a_res, b)
        x = lk.liger_mhc_pre(H, h_pre)
        return lk.liger_mhc_post_res(H, x, h_post, h_res)
    return sublayer, ""


def bench_group(op, mode, N, n, d, dtype, base, grads, variants, timing_kw, ops, ref):
    shape = bench_hc.shape_str(N, n, d)
    dname = harness.DTYPE_NAMES[dtype]
    elem = torch.empty((), dtype=dtype).element_size()
    if mode == "fwd":
        case = bench_hc.Case(op, mode, [base[k] for k in ARGS], names=list(OUTS[op]))
    else:
        args = [base[k].detach().requires_grad_(True) for k in ARGS]
        case = bench_hc.Case(op, mode, args, leaves=args, grads=[grads[k] for k in GRAD_OUTS[op]],
                             names=list(OUTS[op]) + [f"d{k}" for k in ARGS])
    torch._dynamo.reset()
    ref_f = op_function(op, ref.mhc_coeffs, ref.stream_mix, ref.hc_post)
    refs = None
    rows = []
    for variant in variants:
        row = harness.Row(op=op, variant=variant, mode=mode, shape=shape, dtype=dname,
                          floor_bytes=floor_bytes(op, mode, N, n, d, elem))
        note, not_fused = "", False
        if variant == "eager_oracle":
            f = ref_f
        elif variant == "compile_oracle":
            f = torch.compile(ref_f, fullgraph=True, dynamic=False)
        elif variant == "liger":
            f, note = liger_function(op)
        else:
            missing = [k for k in FUSED_NEEDS[op] if getattr(ops, k, None) is None]
            f = None if missing else op_function(op, ops.mhc_coeffs, ops.stream_mix, ops.hc_post)
            note = f"crosslayer.ops has no {', '.join(missing)}" if missing else ""
            not_fused = not missing and not all(ops.fused_ops().get(k, False) for k in FUSED_NEEDS[op])

        timed = harness.timer(lambda f=f: f(*case.args), mode, case.grads, case.leaves, **timing_kw)

        if f is None:
            row.status = "not installed" if variant == "liger" else "failed: missing op"
            row.note = note
            if variant != "liger":
                print(f"FAILED: {op} {variant} {mode} {shape} {dname}: {note}", file=sys.stderr)
        elif variant == "liger":
            harness.run_variant(row, None, timed)
            if row.status == "ok":
                row.note = "timed only (h_res convention differs; not gated)"
        else:
            refs = harness.run_gated(row, lambda f=f: bench_hc.run_outputs(f, case), timed, refs, dtype,
                                     case.names)
            if not_fused and row.status == "ok":
                row.status, row.note = "not-fused", "fused_ops() says False: timed the fallback"
        t = f"{row.time_ms:.3f} ms" if row.time_ms is not None else "-"
        print(f"  [{op} {shape} {dname} {mode}] {variant:<15} {t:>12}  {row.status}", flush=True)
        rows.append(row)
    rows.sort(key=lambda r: DISPLAY_ORDER.index(r.variant))
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    harness.require_cuda()
    dtype = harness.parse_dtype(args.dtype)

    import crosslayer.ops as ops
    import crosslayer.ref as ref

    timing_kw = harness.timing_kwargs(args.quick, args.warmup_ms, args.rep_ms)
    if "liger" in args.variants and liger_function("mhc_coeffs")[0] is None:
        print(f"liger: {liger_function('mhc_coeffs')[1]}")
    dname = harness.DTYPE_NAMES[dtype]
    report = harness.Report(args.csv, lambda rows: summarize(rows, dname))
    copy_bw = harness.measure_copy_bandwidth()
    harness.print_header(copy_bw)
    elem = torch.empty((), dtype=dtype).element_size()
    for n, d in args.plan:
        for op in args.ops:
            for mode in args.modes:
                b = floor_bytes(op, mode, args.N, n, d, elem)
                print(f"floor {op:<13} {mode:<8} n={n} d={d:<5} {b / 1e9:7.3f} GB "
                      f"{b / copy_bw * 1e3:7.3f} ms")
    for n, d in args.plan:
        base, grads = make_inputs(args.N, n, d, dtype)
        rows = []
        for op in args.ops:
            for mode in args.modes:
                rows += bench_group(op, mode, args.N, n, d, dtype, base, grads, args.variants,
                                    timing_kw, ops, ref)
                torch.cuda.empty_cache()
        del base, grads
        torch.cuda.empty_cache()
        harness.finalize_rows(rows, copy_bw)
        report.add(rows, copy_bw)
    return report.finish()


def summarize(rows, dname: str) -> list[str]:
    """bench_hc's SUMMARY lines of the gated rows, then a LIGER line per timed liger row."""
    lines = bench_hc.summary_lines([r for r in rows if r.variant != "liger"], dname)[0]
    return lines + [f"LIGER {r.op} {dname} {r.shape} {r.mode}: {r.time_ms:.3f} ms "
                    f"({r.derived['x_floor']:.1f}x floor)"
                    for r in rows if r.variant == "liger" and r.time_ms is not None]


if __name__ == "__main__":
    sys.exit(main())
