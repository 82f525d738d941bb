"""Bytes, sectors and launches per op and per connection sublayer, counted on the CPU.

    python bench/traffic.py [--quick] [--csv PATH] [--rows dhc_sublayer,...] [-v]

No GPU needed: every call runs the ops' CUDA code path on the emulator (tools/cuemu,
the launchers and kernels compiled for the CPU) with the traffic counter on
(tools/cuemu/count.py): every kernel's global loads and stores, sector by sector, and
every ATen op around the kernels (launchers, custom ops, autograd).

Napkin math (DESIGN.md "Traffic floors"): a DHC sublayer forward+backward at bf16,
n = 4, d = 2048 must move at least (9n + 5)·d·2 B = 168 KB per token: 2.75 GB at
N = 16384, 0.92 ms at 3.0 TB/s. Counted bytes per token / that floor is the `ratio`
column; it is how every kernel is judged until a GPU measures time.

Tokens. The shapes are DESIGN.md's (bf16, d = 2048 and 4096, n = 4, C = 4, l = 13 /
25 / 49) with N scaled down, and the emulated device scaled with it: s SMs and
N = round(16384·s/132) tokens (124 per SM, as N = 16384 on an H100's 132 SMs), so grids
sized by the SM count (persistent grids, split-K) have the blocks per token they have at
full size. Each row runs at two (full: three) such sizes; a line through the totals
gives bytes per token (the slope, `bytes_per_token`) and the bytes of one call that do
not grow with tokens (`fixed_bytes`: weights, their gradients, packing). The per-size
columns show bytes/token does not change with N beyond that fixed part.

Predicted H100 time = bytes at N = 16384 / 3.0 TB/s + launches x LAUNCH_US. LAUNCH_US
(default 3 us) is the cost of one more kernel in a chain of memory-bound kernels on one
stream: about 1 us from one kernel's end to the next one's start, plus about 2 us in
which a short kernel's first and last waves do not keep HBM busy (a memory-bound kernel
reaches full bandwidth only once every SM has loads in flight, ~1 us of HBM latency at
each end). It leaves out the CPU: PyTorch eager spends 5-20 us of host time per op, so
a sublayer of many small ops can be bound by the host, which only a CUDA graph or fewer
launches remove.

Output: a table per row (fwd, fwd+bwd) with the floor and ratio, then per kernel the
sectors per request (loads and stores) against the ideal for its access width; with -v
every kernel launch and ATen op with its bytes and the tensors it touches.
CSV (--csv): op, mode, d, n, l, dtype, bytes_per_token, floor_bytes_per_token, ratio,
launches, plus fixed_bytes, bytes_per_token_N<k>, kernel_bytes_per_token,
aten_bytes_per_token, predicted_h100_us, git_commit.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tools", "cuemu"))
import count as cuemu_count  # noqa: E402  (tools/cuemu/count.py)
from crosslayer.contracts import CONTRACTS  # noqa: E402

TOKENS_FULL = 16384
SMS_FULL = 132
COPY_BANDWIDTH = 3.0e12  # B/s, DESIGN.md's measured H100 copy bandwidth
LAUNCH_US = 3.0


def tokens_for(sms: int) -> int:
    return round(TOKENS_FULL * sms / SMS_FULL)


# --------------------------------------------------------------------------- floors
# Elements of the activation dtype per token (DESIGN.md "Traffic floors").

def floor_hc_sublayer(d: int, n: int, mode: str) -> int:
    return CONTRACTS["hc_sublayer"].floor_elements(mode, d=d, n=n)


def floor_depth_aggregate(d: int, l: int, C: int, mode: str, accumulate: bool = False) -> int:
    return CONTRACTS["depth_aggregate"].floor_elements(mode, d=d, l=l, C=C, accumulate=accumulate)


def floor_mudd_weights(d: int, mode: str) -> int:
    return CONTRACTS["mudd_weights"].floor_elements(mode, d=d)


def floor_depth_stack(d: int, layers: int, mode: str) -> int:
    """Every layer's mudd_weights and depth_aggregate (C = 4, the last layer C = 1); in
    backward the stack's gradient accumulates in place except in the first aggregation
    backward (the last layer's). Slots are written by the blocks (DESIGN.md): the push
    copies are not in the floor."""
    total = 0
    for i in range(layers):
        last = i == layers - 1
        total += floor_mudd_weights(d, mode)
        total += floor_depth_aggregate(d, i + 2, 1 if last else 4, mode, accumulate=not last)
    return total


# --------------------------------------------------------------------------- cases

@dataclass
class Case:
    """One row: setup(N) builds the inputs for N tokens (not counted); forward(state)
    runs the forward (counted) and returns (outputs, tensors to differentiate, fresh
    output gradients) for the counted autograd.grad of `measure`. `named(state)` names
    tensors for the per-allocation detail of -v. floor(mode): elements per token.
    `sublayers` > 1: the row is a chain of that many sublayers and reports bytes and
    launches per sublayer (the totals divided by it)."""
    op: str
    d: int
    n: int
    l: int
    floor: Callable[[str], int]
    setup: Callable[[int], dict]
    forward: Callable[[dict], tuple]
    named: Callable[[dict], dict] = field(default=lambda s: {})
    sublayers: int = 1


def hc_case(kind: str, d: int, n: int, dtype) -> Case:
    import torch
    from crosslayer.nn import HyperConnections, ManifoldHyperConnections

    def setup(N: int) -> dict:
        torch.manual_seed(0)
        hc = (ManifoldHyperConnections(d, n) if kind == "mhc"
              else HyperConnections(d, n, layer_index=1, dynamic=(kind == "dhc")))
        H = torch.randn(N, n, d, dtype=dtype, requires_grad=True)
        return {"hc": hc, "H": H, "dH_next": torch.randn(N, n, d, dtype=dtype)}

    def forward(s):
        x, post = s["hc"].pre(s["H"])
        H_next = post(x)  # identity branch: y = x
        return [H_next], [s["H"], *s["hc"].parameters()], [s["dH_next"]]

    return Case(f"{kind}_sublayer", d, n, 0, lambda m: floor_hc_sublayer(d, n, m), setup, forward,
                lambda s: {"H": s["H"], "dH_next": s["dH_next"], **dict(s["hc"].named_parameters())})


def hc_chain_case(kind: str, d: int, n: int, dtype, sublayers: int = 8) -> Case:
    """`sublayers` consecutive connections of one kind with identity branches, each
    sublayer's post deferred to the next one's pre (PendingStreams: SHC and DHC run
    the fused boundary, ops.hc_boundary), bytes and launches per sublayer against the
    unfused sublayer floor: what the fused boundary saves shows as a ratio below 1
    (DESIGN.md's chain floor is 0.61 of it at n = 4)."""
    import torch
    from crosslayer.nn import HyperConnections, ManifoldHyperConnections

    def setup(N: int) -> dict:
        torch.manual_seed(0)
        hcs = [ManifoldHyperConnections(d, n) if kind == "mhc"
               else HyperConnections(d, n, layer_index=i, dynamic=(kind == "dhc")) for i in range(sublayers)]
        H = torch.randn(N, n, d, dtype=dtype, requires_grad=True)
        return {"hcs": hcs, "H": H, "dH_next": torch.randn(N, n, d, dtype=dtype)}

    def forward(s):
        H = s["H"]
        for hc in s["hcs"]:
            x, post = hc.pre(H)
            H = post.defer(x)  # identity branch: y = x; the next pre takes the pending post
        H = H.resolve()  # the chain's end: the last post unfused
        return [H], [s["H"], *(p for hc in s["hcs"] for p in hc.parameters())], [s["dH_next"]]

    return Case(f"{kind}_chain", d, n, 0, lambda m: floor_hc_sublayer(d, n, m), setup, forward,
                lambda s: {"H": s["H"], "dH_next": s["dH_next"]}, sublayers=sublayers)


def hc_boundary_case(kind: str, d: int, n: int, dtype) -> Case:
    """One boundary of a chain, ops.hc_boundary alone: connection i's post (per-token
    coefficients, as a DHC or mHC connection makes) fused with connection i+1's DHC or
    SHC pre, fresh gradients for H' and x' (the chain's interior), against
    crosslayer.contracts' hc_boundary floor (2n·d + 2d forward, 3n·d + 3d backward)."""
    import torch
    from crosslayer import ops

    def setup(N: int) -> dict:
        torch.manual_seed(0)
        H = torch.randn(N, n, d, dtype=dtype, requires_grad=True)
        y = torch.randn(N, d, dtype=dtype, requires_grad=True)
        alpha = torch.randn(N, n, n + 1, requires_grad=True)
        beta = torch.randn(N, n, requires_grad=True)
        params = [torch.randn(n, n + 1), torch.randn(n)]
        if kind == "dhc":
            params += [torch.randn(d, n + 2) / d ** 0.5, torch.tensor(0.5), torch.tensor(0.5)]
        params = [p.requires_grad_(True) for p in params]
        return {"inputs": [H, y, alpha, beta], "params": params,
                "dH_next": torch.randn(N, n, d, dtype=dtype), "dx": torch.randn(N, d, dtype=dtype)}

    def forward(s):
        H_next, x, _, _ = ops.hc_boundary(*s["inputs"], *s["params"])
        return [H_next, x], [*s["inputs"], *s["params"]], [s["dH_next"], s["dx"]]

    floor = CONTRACTS["hc_boundary"]
    return Case(f"{kind}_boundary", d, n, 0, lambda m: floor.floor_elements(m, d=d, n=n), setup, forward,
                lambda s: {"H": s["inputs"][0], "y": s["inputs"][1], "dH_next": s["dH_next"]})


def depth_aggregate_case(d: int, l: int, C: int, dtype, qkv_norm: bool) -> Case:
    import torch
    from crosslayer import ops

    def setup(N: int) -> dict:
        torch.manual_seed(0)
        S = torch.randn(l, N, d, dtype=dtype, requires_grad=True)
        A = torch.randn(N, C, l, requires_grad=True)
        g = torch.rand(3, d, requires_grad=True) + 0.5 if qkv_norm else None
        return {"S": S, "A": A, "g": g, "dY": torch.randn(C, N, d, dtype=dtype)}

    def forward(s):
        if qkv_norm:
            Y = ops.depth_aggregate_qkv_norm(s["S"], s["A"], s["g"])
            return [Y], [s["S"], s["A"], s["g"]], [s["dY"]]
        return [ops.depth_aggregate(s["S"], s["A"])], [s["S"], s["A"]], [s["dY"]]

    name = "depth_aggregate_qkv_norm" if qkv_norm else "depth_aggregate"
    return Case(name, d, 0, l, lambda m: floor_depth_aggregate(d, l, C, m), setup, forward,
                lambda s: {"S": s["S"], "A": s["A"], "dY": s["dY"]})


def mudd_weights_case(d: int, l: int, C: int, dtype) -> Case:
    import torch
    from crosslayer import ops
    from crosslayer.nn import MUDDConnection

    def setup(N: int) -> dict:
        torch.manual_seed(0)
        conn = MUDDConnection(d, layer_index=l - 2, n_layers=l)
        x = torch.randn(N, d, dtype=dtype, requires_grad=True)
        return {"conn": conn, "x": x, "dA": torch.randn(N, C, l)}

    def forward(s):
        m = s["conn"]
        A = ops.mudd_weights(s["x"], m.W1, m.W2, m.bias, m.n_ways, m.eps)
        return [A], [s["x"], m.W1, m.W2, m.bias], [s["dA"]]

    return Case("mudd_weights", d, 0, l, lambda m: floor_mudd_weights(d, m), setup, forward,
                lambda s: {"x": s["x"], "dA": s["dA"], **dict(s["conn"].named_parameters())})


def _filled_stack(N: int, d: int, l: int, n_slots: int, dtype):
    """A DepthStack with l slots filled outside the count. Each slot is a block output:
    a non-leaf, non-view tensor computed from a leaf (a leaf's push backward copies its
    slot gradient out; a view would be copied into its slot)."""
    import torch
    from crosslayer.nn import DepthStack

    leaves = [torch.randn(N, d, dtype=dtype, requires_grad=True) for _ in range(l)]
    outs = [x * 1 for x in leaves]
    stack = DepthStack.start(outs[0], n_slots)
    for v in outs[1:]:
        stack.push(v)
    return stack, outs


def _slot_names(stack) -> dict:
    return {f"slot{j}": t for j, t in enumerate(stack.slots)}


def mudd_layer_case(d: int, l: int, dtype) -> Case:
    """One MUDD connection (qkvr ways, q/k/v RMS-normed) over l filled slots: its weight
    MLP on the newest slot and the normed aggregation; the backward writes the stack's
    fresh gradient buffer (this is the pass's first aggregation backward)."""
    import torch
    from crosslayer.nn import MUDDConnection

    def setup(N: int) -> dict:
        torch.manual_seed(0)
        stack, views = _filled_stack(N, d, l, l, dtype)
        conn = MUDDConnection(d, layer_index=l - 2, n_layers=l)
        g = torch.rand(3, d, requires_grad=True) + 0.5
        return {"stack": stack, "views": views, "conn": conn, "g": g,
                "dX": torch.randn(4, N, d, dtype=dtype)}

    def forward(s):
        X = s["conn"](s["stack"], norm_weights=s["g"])
        return [X], [*s["views"], *s["conn"].parameters(), s["g"]], [s["dX"]]

    floor = lambda m: floor_mudd_weights(d, m) + floor_depth_aggregate(d, l, 4, m)  # noqa: E731
    return Case("mudd_layer", d, 0, l, floor, setup, forward,
                lambda s: {**_slot_names(s["stack"]), "dX": s["dX"], "g": s["g"],
                           **dict(s["conn"].named_parameters())})


def dwa_layer_case(d: int, l: int, dtype) -> Case:
    """One DenseFormer DWA (static weights, one output) over l filled slots."""
    import torch
    from crosslayer.nn import DenseFormerDWA

    def setup(N: int) -> dict:
        torch.manual_seed(0)
        stack, views = _filled_stack(N, d, l, l, dtype)
        dwa = DenseFormerDWA(layer_index=l - 2)
        return {"stack": stack, "views": views, "dwa": dwa, "dY": torch.randn(N, d, dtype=dtype)}

    def forward(s):
        Y = s["dwa"](s["stack"])
        return [Y], [*s["views"], s["dwa"].alpha], [s["dY"]]

    return Case("dwa_layer", d, 0, l, lambda m: floor_depth_aggregate(d, l, 1, m), setup, forward,
                lambda s: {**_slot_names(s["stack"]), "dY": s["dY"]})


def depth_stack_case(d: int, layers: int, dtype) -> Case:
    """A whole MUDD stack: `layers` blocks, each a stand-in that is not counted (its
    output x = the sum of its input's ways, its backward a fresh contiguous gradient for
    each way), pushed into a DepthStack and followed by its MUDDConnection (q/k/v-normed
    ways; the last layer one way, r, with a 4x wider MLP)."""
    import torch
    from crosslayer.nn import DepthStack, MUDDConnection

    class Block(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h):
            ctx.ways = h.shape[0]
            with cuemu_count.excluded():
                return h.sum(0)

        @staticmethod
        def backward(ctx, dx):
            with cuemu_count.excluded():
                return dx.expand(ctx.ways, *dx.shape).contiguous()

    def setup(N: int) -> dict:
        torch.manual_seed(0)
        conns = [MUDDConnection(d, i, layers) for i in range(layers)]
        gs = [torch.rand(3, d, requires_grad=True) + 0.5 for _ in range(layers - 1)]
        x0 = torch.randn(N, d, dtype=dtype, requires_grad=True)
        return {"conns": conns, "gs": gs, "x0": x0, "dout": torch.randn(1, N, d, dtype=dtype)}

    def forward(s):
        x0 = s["x0"].view_as(s["x0"])
        stack = DepthStack.start(x0, layers + 1)
        h = x0.unsqueeze(0)
        for i, conn in enumerate(s["conns"]):
            stack.push(Block.apply(h))
            h = conn(stack, norm_weights=s["gs"][i] if i < layers - 1 else None)
        params = [p for conn in s["conns"] for p in conn.parameters()]
        return [h], [x0, *params, *s["gs"]], [s["dout"]]

    return Case("depth_stack", d, 0, layers + 1, lambda m: floor_depth_stack(d, layers, m), setup,
                forward, lambda s: {"x0": s["x0"], "dout": s["dout"]})


def cases(quick: bool, only: Optional[set]) -> list[Case]:
    import torch
    dt = torch.bfloat16
    n, C = 4, 4
    ds = (2048,) if quick else (2048, 4096)
    ls = (13,) if quick else (13, 25, 49)
    out: list[Case] = []
    for d in ds:
        for kind in ("dhc", "shc", "mhc"):
            out.append(hc_case(kind, d, n, dt))
        for kind in ("dhc", "shc"):
            out.append(hc_boundary_case(kind, d, n, dt))
        for kind in ("dhc", "shc", "mhc"):
            out.append(hc_chain_case(kind, d, n, dt))
    for l in ls:
        out.append(depth_aggregate_case(2048, l, C, dt, qkv_norm=False))
        out.append(depth_aggregate_case(2048, l, C, dt, qkv_norm=True))
        out.append(mudd_weights_case(2048, l, C, dt))
        out.append(mudd_layer_case(2048, l, dt))
        out.append(dwa_layer_case(2048, l, dt))
    out.append(depth_stack_case(2048, 24, dt))
    return [c for c in out if only is None or c.op in only]


# --------------------------------------------------------------------------- counting

@dataclass
class Measured:
    N: int
    fwd: "cuemu_count.Count"
    bwd: "cuemu_count.Count"


def measure(case: Case, counter, module, sms: int, N: Optional[int] = None) -> Measured:
    """Counts case's forward and backward on the emulated device with `sms` SMs, at N
    tokens (default: tokens_for(sms), the full-size grids)."""
    import torch
    from crosslayer._extension import emulate

    N = tokens_for(sms) if N is None else N
    with cuemu_count.device_sms(counter, sms), emulate(module):
        state = case.setup(N)
        with cuemu_count.counting(counter) as fwd:
            outputs, wrt, grads = case.forward(state)
        wrt = [t for t in wrt if t.requires_grad]
        with cuemu_count.counting(counter) as bwd:
            torch.autograd.grad(outputs, wrt, grads, allow_unused=True)
        named = case.named(state)
        fwd.name_allocations(counter, named)
        bwd.name_allocations(counter, named)
    return Measured(N, fwd, bwd)


def rows_of(m: Measured, mode: str) -> list:
    return m.fwd.rows if mode == "fwd" else m.fwd.rows + m.bwd.rows


def fit(points: list[tuple[int, int]]) -> tuple[float, float, float]:
    """Least-squares line bytes = a·N + b through (N, bytes): (a, b, max relative residual)."""
    k = len(points)
    mx = sum(p[0] for p in points) / k
    my = sum(p[1] for p in points) / k
    sxx = sum((p[0] - mx) ** 2 for p in points)
    a = sum((p[0] - mx) * (p[1] - my) for p in points) / sxx
    b = my - a * mx
    resid = max(abs(a * p[0] + b - p[1]) / max(p[1], 1) for p in points)
    return a, b, resid


def summarize(case: Case, ms: list[Measured], itemsize: int) -> list[dict]:
    out = []
    for mode in ("fwd", "fwd+bwd"):
        per = case.sublayers
        totals = [(m.N, sum(r.bytes for r in rows_of(m, mode)) / per) for m in ms]
        a, b, resid = fit(totals)
        kern = fit([(m.N, sum(r.bytes for r in rows_of(m, mode) if r.kind == "kernel") / per) for m in ms])[0]
        launches = [sum(r.launch for r in rows_of(m, mode)) for m in ms]
        launches = launches if per == 1 else [round(k / per, 2) for k in launches]
        floor = case.floor(mode) * itemsize
        row = {
            "op": case.op, "mode": mode, "d": case.d, "n": case.n, "l": case.l, "dtype": "bf16",
            "bytes_per_token": round(a, 1), "floor_bytes_per_token": floor,
            "ratio": round(a / floor, 3), "launches": max(launches),
            "fixed_bytes": round(b), "fit_residual": f"{resid:.1e}",
            "kernel_bytes_per_token": round(kern, 1),
            "aten_bytes_per_token": round(a - kern, 1),
            "predicted_h100_us": round(((a * TOKENS_FULL + b) / COPY_BANDWIDTH) * 1e6
                                       + max(launches) * LAUNCH_US, 1),
            "floor_h100_us": round(floor * TOKENS_FULL / COPY_BANDWIDTH * 1e6, 1),
        }
        for N, total in totals:
            row[f"bytes_per_token_N{N}"] = round(total / N, 1)
        if len(set(launches)) != 1:
            row["launches_per_size"] = "/".join(map(str, launches))
        out.append(row)
    return out


def kernel_table(m: Measured) -> list[dict]:
    """Per kernel name (its launches in fwd and bwd summed): HBM and L2 bytes per token,
    sectors per request, and the sectors per request the same distinct bytes would need
    packed from a sector boundary (`ideal`; equal = perfectly coalesced)."""
    agg: dict[str, dict] = {}
    for r in m.fwd.kernels() + m.bwd.kernels():
        k = agg.setdefault(r.name, {"launches": 0, "hbm": 0})
        k["launches"] += 1
        k["hbm"] += r.bytes
        for key in ("requests", "sectors", "ideal_sectors"):
            for io in ("ld", "st"):
                k[f"{io}_{key}"] = k.get(f"{io}_{key}", 0) + r.detail[f"{io}_{key}"]
    out = []
    for name, k in agg.items():
        row = {"kernel": name, "launches": k["launches"], "hbm_bytes_per_token": k["hbm"] / m.N,
               "l2_bytes_per_token": (k["ld_sectors"] + k["st_sectors"]) * cuemu_count.SECTOR / m.N}
        for io in ("ld", "st"):
            req = k[f"{io}_requests"]
            row[f"{io}_sectors_per_request"] = k[f"{io}_sectors"] / req if req else 0.0
            row[f"{io}_ideal"] = k[f"{io}_ideal_sectors"] / req if req else 0.0
        out.append(row)
    return out


def short(name: str, width: int = 60) -> str:
    name = name.replace("void crosslayer::", "").replace("crosslayer::", "").replace("__nv_bfloat16", "bf16")
    name = name.split("(")[0]
    return name if len(name) <= width else name[: width - 1] + "…"


def print_case(case: Case, summary: list[dict], kernels: list[dict], ms: list[Measured], verbose: bool):
    sizes = ", ".join(str(m.N) for m in ms)
    print(f"\n== {case.op}  d={case.d} n={case.n} l={case.l} bf16   (N = {sizes}; "
          f"SMs = {', '.join(str(round(m.N * SMS_FULL / TOKENS_FULL)) for m in ms)})")
    print(f"   {'mode':8s} {'B/token':>10s} {'floor':>10s} {'ratio':>6s} {'launches':>8s} "
          f"{'kernels':>10s} {'aten':>9s} {'fixed B':>10s} {'per-N B/token':>22s} {'H100 us':>8s} {'floor us':>8s}")
    for r in summary:
        per_n = " ".join(f"{r[f'bytes_per_token_N{m.N}']:.0f}" for m in ms)
        print(f"   {r['mode']:8s} {r['bytes_per_token']:10.0f} {r['floor_bytes_per_token']:10d} "
              f"{r['ratio']:6.3f} {str(r['launches']):>8s} {r['kernel_bytes_per_token']:10.0f} "
              f"{r['aten_bytes_per_token']:9.0f} {r['fixed_bytes']:10d} {per_n:>22s} "
              f"{r['predicted_h100_us']:8.1f} {r['floor_h100_us']:8.1f}")
    print(f"   {'kernel':60s} {'n':>3s} {'B/token':>9s} {'L2 B/tok':>9s} {'ld sec/req':>10s} {'ideal':>6s} "
          f"{'st sec/req':>10s} {'ideal':>6s}")
    for k in kernels:
        print(f"   {short(k['kernel']):60s} {k['launches']:3d} {k['hbm_bytes_per_token']:9.0f} "
              f"{k['l2_bytes_per_token']:9.0f} "
              f"{k['ld_sectors_per_request']:10.2f} {k['ld_ideal']:6.2f} "
              f"{k['st_sectors_per_request']:10.2f} {k['st_ideal']:6.2f}")
    if verbose:
        m = ms[-1]
        for phase, cnt in (("fwd", m.fwd), ("bwd", m.bwd)):
            print(f"   -- {phase} at N = {m.N}: every row that moves bytes or launches (kind, name, "
                  f"launch on a GPU, bytes per token read / written, per tensor for kernels)")
            for r in cnt.rows:
                if not (r.bytes or r.launch):
                    continue
                where = ""
                if r.kind == "kernel":
                    where = "  " + ", ".join(
                        f"{a.get('name') or 'tmp'}:{(a['ld_unique_sectors'] * 32) / m.N:.0f}r/"
                        f"{(a['st_unique_sectors'] * 32) / m.N:.0f}w" for a in r.detail["allocs"])
                print(f"      {r.kind:7s} {short(r.name, 48):48s} {'launch' if r.launch else '-':6s} "
                      f"{r.read / m.N:9.0f} {r.written / m.N:9.0f}{where}")


CEILING = os.path.join(HERE, "traffic_ceiling.csv")
CEILING_KEYS = ("op", "mode", "d", "n", "l")


def run(quick: bool, only: Optional[set] = None, sms: Optional[list] = None, verbose: bool = False,
        echo: bool = True, launches: Optional[dict] = None) -> list[dict]:
    """Counts every row (all, or those named in `only`) at the SM counts `sms` and
    returns the summary rows; prints the tables when `echo`. `launches`, when given,
    collects {kernel name: (threads per block, dynamic shared memory bytes)} of the
    launches at the largest size."""
    counter, module = cuemu_count.load()
    from harness import git_commit  # bench/harness.py (imports torch: after the counter)

    sms = sms or ([1, 2] if quick else [1, 2, 3])
    if len(sms) < 2:
        raise ValueError("at least two sizes: bytes per token is the slope between them")
    commit = git_commit()
    rows = []
    for case in cases(quick, only):
        t0 = time.time()
        ms = [measure(case, counter, module, s) for s in sms]
        summary = summarize(case, ms, itemsize=2)
        if launches is not None:
            for r in ms[-1].fwd.kernels() + ms[-1].bwd.kernels():
                launches[r.name] = (math.prod(r.detail["block"]), r.detail["smem"])
        if echo:
            print_case(case, summary, kernel_table(ms[-1]), ms, verbose)
            print(f"   ({time.time() - t0:.0f} s)", flush=True)
        for r in summary:
            r["git_commit"] = commit
        rows += summary
    return rows


def read_ceiling(path: str = CEILING) -> dict:
    """{(op, mode, d, n, l): (bytes_per_token, launches)} recorded by --write-ceiling."""
    with open(path, newline="") as f:
        return {tuple(r[k] if k in ("op", "mode") else int(r[k]) for k in CEILING_KEYS):
                (float(r["bytes_per_token"]), float(r["launches"])) for r in csv.DictReader(f)}


def write_ceiling(rows: list[dict], path: str = CEILING) -> None:
    """The counts of `rows` as the new ceiling (bytes per token rounded up); the recorded
    rows not among them (a --rows run) are kept as they were."""
    def plain(v: float):
        return int(v) if float(v).is_integer() else v

    ceiling = read_ceiling(path) if os.path.exists(path) else {}
    for r in rows:
        ceiling[tuple(r[k] for k in CEILING_KEYS)] = (math.ceil(r["bytes_per_token"]), r["launches"])
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*CEILING_KEYS, "bytes_per_token", "launches"])
        for key, (nbytes, launches) in ceiling.items():
            w.writerow([*key, plain(nbytes), plain(launches)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="d = 2048 and l = 13 only, two sizes")
    p.add_argument("--csv", help="write the rows to this CSV file (replaced)")
    p.add_argument("--rows", help="comma-separated row names (default: all)")
    p.add_argument("--sms", help="SM counts of the sizes, e.g. 1,2 (default: 1,2 quick, 1,2,3 full)")
    p.add_argument("--write-ceiling", action="store_true",
                   help=f"record the counts as the CI guard's ceiling ({os.path.relpath(CEILING, ROOT)}; with --quick)")
    p.add_argument("--sass", action="store_true",
                   help="then tools/sass_report.py on the built extension's sm_90 code of every kernel "
                        "launched, at the launches' threads and shared memory")
    p.add_argument("-v", "--verbose", action="store_true", help="every kernel launch and ATen op")
    args = p.parse_args(argv)
    if args.write_ceiling and not args.quick:
        p.error("--write-ceiling records the --quick rows (the ones the CI guard counts)")

    start = time.time()
    sms = [int(s) for s in args.sms.split(",")] if args.sms else None
    launched: dict = {}
    try:
        all_rows = run(args.quick, set(args.rows.split(",")) if args.rows else None, sms, args.verbose,
                       launches=launched)
    except ValueError as e:
        p.error(str(e))
    if args.sass:
        print_sass(launched, args.verbose)
    print(f"\n{'op':26s} {'mode':8s} {'d':>5s} {'l':>3s} {'B/token':>10s} {'floor':>10s} {'ratio':>6s} {'launches':>8s}")
    for r in all_rows:
        print(f"{r['op']:26s} {r['mode']:8s} {r['d']:5d} {r['l']:3d} {r['bytes_per_token']:10.0f} "
              f"{r['floor_bytes_per_token']:10d} {r['ratio']:6.3f} {str(r['launches']):>8s}")
    print(f"({time.time() - start:.0f} s; counted on the CPU emulator, H100 shapes scaled to "
          f"{args.sms or ('1,2' if args.quick else '1,2,3')} SMs; predicted times assume "
          f"{COPY_BANDWIDTH / 1e12:.1f} TB/s and {LAUNCH_US:.0f} us a launch)")
    if args.csv:
        write_csv(args.csv, all_rows)
    if args.write_ceiling:
        write_ceiling(all_rows)
    return 0


def print_sass(launched: dict, verbose: bool) -> None:
    """Registers, blocks per SM and loads in flight (tools/sass_report.py) of the launched
    kernels, from the built extension's sm_90 code (what the emulator ran, compiled)."""
    import re
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import sass_report

    exact = {"^" + re.escape(name) + "$": cfg for name, cfg in launched.items()}
    rows = sass_report.report(sass_report.default_so(), "sm_90", "|".join(exact), exact)
    print("\n== SASS (sm_90) of the launched kernels, at their launches' threads and dynamic shared memory")
    print(sass_report.format_table(rows, verbose))


def write_csv(path: str, rows: list[dict]) -> None:
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    sys.exit(main())
