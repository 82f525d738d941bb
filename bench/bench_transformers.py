"""Hugging Face DeepSeek-V4 (transformers 5.23.0) with crosslayer.integrations.transformers:
what its mHC connections cost, on a GPU in time and memory, on the CPU in bytes, launches
and error against float64.

Napkin math (DESIGN.md "Traffic floors"; activation-dtype elements per token). A decoder
layer has two mHC connections, each a pre (coefficients from H, x = Σ pre_i·H_i) and a
post (H' = post·y + combᵀ·H). Unfused, one connection must move at least (3n + 2)·d
forward and (9n + 5)·d forward+backward; crosslayer fuses every boundary (one
connection's post with the next one's pre, ops.mhc_boundary), which goes below that
(DESIGN.md's chain floor). bf16, n = 4, d = 2048, N = 16384 tokens, H100 at 3.0 TB/s:

    per layer (2 connections)   elems    bytes       floor time
    forward                       28d    1.879 GB    0.626 ms
    forward+backward              82d    5.503 GB    1.834 ms

(114688 and 335872 B/token.) The model's own connections (eager torch: coefficients through F.linear in float32, the
Sinkhorn loop as ~40 small ops, the mixing as a bf16 matmul) move ~1.8 MB/token per
connection forward+backward in ~475 ops (bench/NOTES.md): ~10x the floor before launch
overhead.

Rows on a GPU (harness variants: eager_oracle = the model's own forward, fused = the
same model after accelerate(), compile_oracle = the model's own forward under
torch.compile):
  dsv4_connections  L decoder layers' connections alone: attention and experts are y = x,
                    the layer norms identity (the shape of traffic.py's sublayer rows).
                    Floor: 2L unfused connections. Gated: the final streams against the
                    model's own forward.
  dsv4_stack        a DeepseekV4Model decoder stack at hidden 2048 (hc_mult 4, 16 heads,
                    16 experts of 1024, top 2), a training step's forward+backward of
                    its last hidden state; no floor (attention and experts dominate); the
                    note has the peak memory of the step.
On the CPU (no GPU, or --cpu):
  errors   a small causal LM (hidden 256, 3 layers, every expert routed) and its
           connections alone (identity blocks), in float32 and bf16, the model's own
           forward and the accelerated one (crosslayer's kernels on the emulator,
           tools/cuemu), against the model's math at float64 (model_math_in_float64):
           per tensor max |got - ref| / max |ref| of the output (logits or streams) and
           of the gradients (the worst, the worst of a connection parameter, the
           median), and ||got - ref|| / ||ref|| over all gradients together.
  traffic  dsv4_connections counted on the emulator (bench/traffic.py's counter: every
           kernel's sectors and every ATen op): bytes and launches per connection
           (per layer / 2), the model's own forward against the accelerated one, and
           per kernel.

Run: python bench/bench_transformers.py [--quick] [--cpu] [--layers 4] [--d 2048]
     [--n 4] [--N 16384] [--dtype bf16] [--rows dsv4_connections,dsv4_stack]
     [--variants eager_oracle,fused,compile_oracle] [--csv PATH] [--sms 1,2]
--quick: GPU rows at N = 8192, shorter timing; CPU: the traffic at one pair of sizes.
Without a GPU it runs the CPU section. Exit: 0 ok; 3 an accelerated row was WRONG or
failed; 4 no transformers with DeepSeek-V4 (the integration needs 5.23.0).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import harness  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

ROWS = ("dsv4_connections", "dsv4_stack")
DEVICE = "cuda"  # where the GPU rows allocate (the tests run them on the CPU)
VARIANT_NAMES = {"eager_oracle": "model's own", "fused": "accelerated", "compile_oracle": "own, compiled"}


# --------------------------------------------------------------------------- models

def dsv4_config(d: int, n: int, layers: int, blocks: str):
    """A DeepseekV4Config of `layers` layers at hidden d with hc_mult n. blocks="tiny":
    the smallest attention and experts (replaced by identities, or for error checks);
    "stack": a realistic 2048-wide layer (16 heads of 128, 16 experts of 1024, top 2)."""
    from transformers import DeepseekV4Config

    if blocks == "tiny":
        width = dict(num_attention_heads=2, num_key_value_heads=1, head_dim=32, q_lora_rank=32, o_lora_rank=32,
                     o_groups=1, qk_rope_head_dim=16, index_head_dim=16, index_n_heads=2, index_topk=8,
                     moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2)
    else:
        width = dict(num_attention_heads=16, num_key_value_heads=1, head_dim=128, q_lora_rank=512, o_lora_rank=512,
                     o_groups=4, qk_rope_head_dim=64, index_head_dim=64, index_n_heads=8, index_topk=128,
                     moe_intermediate_size=1024, n_routed_experts=16, num_experts_per_tok=2)
    cfg = DeepseekV4Config(hidden_size=d, num_hidden_layers=layers, n_shared_experts=1, vocab_size=32000,
                           hc_mult=n, num_nextn_predict_layers=0, default_num_hash_layers=0, sliding_window=128,
                           max_position_embeddings=65536, **width)
    return cfg


def perturb_connections(model: nn.Module) -> None:
    """The init leaves every connection's base at 0 and scale at 1: move them so each
    term of the coefficients counts (the tests do the same)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("hc.base", "hc.scale", "hc_base", "hc_scale")):
                p.add_(0.3 * torch.randn_like(p))


class IdentityAttention(nn.Module):
    """Stands in for DeepseekV4Attention: the block output is its input."""

    def forward(self, hidden_states, **kwargs):
        return hidden_states, None


class IdentityExperts(nn.Module):
    """Stands in for DeepseekV4SparseMoeBlock: the block output is its input."""

    def forward(self, hidden_states, input_ids=None):
        return hidden_states


def connections_model(d: int, n: int, layers: int, dtype, device):
    """A DeepseekV4Model whose layers keep only their connections (identity blocks and
    norms): run_connections() of it is the dsv4_connections row."""
    from transformers import DeepseekV4Model

    torch.manual_seed(0)
    model = DeepseekV4Model(dsv4_config(d, n, layers, "tiny"))
    perturb_connections(model)
    for layer in model.layers:
        layer.self_attn, layer.mlp = IdentityAttention(), IdentityExperts()
        layer.input_layernorm, layer.post_attention_layernorm = nn.Identity(), nn.Identity()
    return model.to(device=device, dtype=dtype)


def run_connections(model, H: torch.Tensor) -> torch.Tensor:
    """The streams H (B, S, n, d) through every layer, as DeepseekV4Model's loop runs them."""
    for layer in model.layers:
        H = layer(H)
    return H


def connection_parameters(model) -> list:
    return [p for name, p in model.named_parameters() if "_hc." in name]


# --------------------------------------------------------------------------- GPU rows

def floor_bytes(mode: str, N: int, n: int, d: int, layers: int, elem: int) -> int:
    from crosslayer.contracts import CONTRACTS

    return 2 * layers * CONTRACTS["hc_sublayer"].floor_elements(mode, d=d, n=n) * N * elem


def variant_forward(model, variant: str, call):
    """(forward, model, accelerate report or None): the zero-argument forward a variant
    times, `call(model)` on the model itself (eager_oracle), on an accelerated copy
    (fused) or under torch.compile (compile_oracle)."""
    from crosslayer.integrations.transformers import accelerate

    if variant == "fused":
        fused = copy.deepcopy(model)
        report = accelerate(fused, strict=True)
        return (lambda: call(fused)), fused, report
    if variant == "compile_oracle":
        return torch.compile(lambda: call(model)), model, None
    return (lambda: call(model)), model, None


def connections_rows(args, dtype, timing_kw) -> list:
    N, n, d, L = args.N, args.n, args.d, args.layers
    elem = torch.empty((), dtype=dtype).element_size()
    model = connections_model(d, n, L, dtype, DEVICE)
    H = torch.randn(1, N, n, d, device=DEVICE, dtype=dtype, requires_grad=True)
    dH = torch.randn_like(H)
    rows = []
    for mode in args.modes:
        refs = None
        for variant in args.variants:
            forward, m, report = variant_forward(model, variant, lambda m: run_connections(m, H))
            row = harness.Row("dsv4_connections", variant, mode, f"L={L} N={N} n={n} d={d}",
                              harness.DTYPE_NAMES[dtype], floor_bytes(mode, N, n, d, L, elem))
            if report is not None:
                row.note = f"{len(report.fused_boundaries)} boundaries fused"
            timed = harness.timer(forward, mode, dH, [H, *connection_parameters(m)], **timing_kw)
            refs = harness.run_gated(row, lambda: [forward()], timed, refs, dtype, ["H"])
            rows.append(row)
    return rows


def stack_rows(args, dtype, timing_kw) -> list:
    from transformers import DeepseekV4Model

    torch.manual_seed(0)
    model = DeepseekV4Model(dsv4_config(args.d, args.n, args.layers, "stack"))
    perturb_connections(model)
    model = model.to(device=DEVICE, dtype=dtype).train()
    ids = torch.randint(0, model.config.vocab_size, (1, args.N), device=DEVICE)
    grad = torch.randn(1, args.N, args.d, device=DEVICE, dtype=dtype)
    rows, refs = [], None
    for variant in args.variants:
        forward, m, _ = variant_forward(model, variant, lambda m: m(ids).last_hidden_state)
        params = [p for p in m.parameters() if p.requires_grad]
        row = harness.Row("dsv4_stack", variant, "fwd+bwd", f"L={args.layers} N={args.N} n={args.n} d={args.d}",
                          harness.DTYPE_NAMES[dtype], None)
        timed = harness.timer(forward, "fwd+bwd", grad, params, **timing_kw)
        refs = harness.run_gated(row, lambda: [forward()], timed, refs, dtype, ["last_hidden_state"])
        if not row.failed and DEVICE == "cuda":
            row.note = "; ".join(filter(None, [row.note, f"peak {peak_step_memory(forward, grad, params):.2f} GiB"]))
        rows.append(row)
    return rows


def peak_step_memory(forward, grad, params) -> float:
    """GiB allocated at the peak of one forward+backward beyond what was allocated
    before it (parameters, inputs), fresh gradients."""
    for p in params:
        p.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.autograd.backward(forward(), grad)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for p in params:
        p.grad = None
    return peak / 2 ** 30


def gpu_main(args) -> int:
    harness.require_cuda()
    dtype = harness.parse_dtype(args.dtype)
    timing_kw = harness.timing_kwargs(args.quick, args.warmup_ms, args.rep_ms)
    report = harness.Report(args.csv, summarize)
    copy_bw = harness.measure_copy_bandwidth()
    harness.print_header(copy_bw)
    elem = torch.empty((), dtype=dtype).element_size()
    for mode in args.modes:
        b = floor_bytes(mode, args.N, args.n, args.d, args.layers, elem)
        print(f"floor dsv4_connections {mode:<8} L={args.layers} n={args.n} d={args.d} {b / 1e9:7.3f} GB "
              f"{b / copy_bw * 1e3:7.3f} ms")
    for name, make in (("dsv4_connections", connections_rows), ("dsv4_stack", stack_rows)):
        if name in args.rows:
            rows = make(args, dtype, timing_kw)
            harness.finalize_rows(rows, copy_bw)
            report.add(rows, copy_bw)
    return report.finish()


def summarize(rows) -> list[str]:
    """One SUMMARY line per (op, mode): each variant's time, the accelerated one's
    speedup over the model's own forward, eager and compiled."""
    lines = []
    groups: dict[tuple, dict] = {}
    for r in rows:
        groups.setdefault((r.op, r.shape, r.mode), {})[r.variant] = r
    for (op, shape, mode), by in groups.items():
        parts = [f"{VARIANT_NAMES[v]} {r.time_ms:.3f} ms" if r.time_ms is not None else f"{VARIANT_NAMES[v]} {r.status}"
                 for v, r in by.items()]
        fused = by.get("fused")
        if fused is not None and fused.derived.get("speedup_vs_eager"):
            parts.append(f"accelerated {fused.derived['speedup_vs_eager']:.2f}x the model's own")
        if fused is not None and fused.derived.get("speedup_vs_compile"):
            parts.append(f"{fused.derived['speedup_vs_compile']:.2f}x it compiled")
        ok = fused is None or (fused.status == "ok" and not fused.failed)
        lines.append(f"SUMMARY {op} {shape} {mode} | " + " | ".join(parts) + (" | OK" if ok else " | FUSED NOT OK"))
    return lines


# --------------------------------------------------------------------------- CPU: errors

def max_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|, in float64."""
    got, ref = got.double(), ref.double()
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def causal_lm(d: int, n: int, layers: int):
    """A small DeepseekV4ForCausalLM in float64 for the error rows: every expert routed
    (top 2 of 2), so no routing choice flips between precisions and the errors measure
    rounding alone."""
    from transformers import DeepseekV4ForCausalLM

    cfg = dsv4_config(d, n, layers, "tiny")
    cfg.n_routed_experts = cfg.num_experts_per_tok = 2
    cfg._experts_implementation = "eager"  # grouped_mm has no float64
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(cfg).to(torch.float64)
    perturb_connections(model)
    return model


def error_setups(d: int, n: int, layers: int) -> list:
    """(row name, float64 model, run(model) -> (output, {name: gradient})) of the error
    section: the connections alone (identity blocks; the gradients of H and of every
    connection parameter) and a whole causal LM (logits; every parameter's gradient)."""
    conn = connections_model(d, n, layers, torch.float64, "cpu")
    H = torch.randn(2, 24, n, d, dtype=torch.float64)
    dH = torch.randn_like(H)

    def run_conn(model):
        h = H.to(next(model.parameters()).dtype).detach().requires_grad_(True)
        model.zero_grad(set_to_none=True)
        out = run_connections(model, h)
        torch.autograd.backward(out, dH.to(out.dtype))
        return out.detach(), {"H": h.grad, **{k: p.grad for k, p in model.named_parameters() if p.grad is not None}}

    lm = causal_lm(d, n, layers)
    ids = torch.randint(0, lm.config.vocab_size, (2, 24))

    def run_lm(model):
        model.zero_grad(set_to_none=True)
        logits = model(ids).logits
        (logits.double() * torch.linspace(-1, 1, logits.shape[-1], dtype=torch.float64)).sum().backward()
        return logits.detach(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}

    return [("connections (identity blocks)", conn, run_conn), ("causal LM", lm, run_lm)]


def error_rows(module, d: int = 256, n: int = 4, layers: int = 3) -> list[dict]:
    """The errors section: per model and dtype, the model's own forward and the
    accelerated one against the model's math at float64 (module docstring)."""
    from crosslayer._extension import emulate
    from crosslayer.integrations.transformers import accelerate, model_math_in_float64

    out = []
    for what, reference, run in error_setups(d, n, layers):
        with model_math_in_float64():
            want, want_grads = run(reference)
        for dtype in (torch.float32, torch.bfloat16):
            own = copy.deepcopy(reference).to(dtype)
            fused = copy.deepcopy(own)
            accelerate(fused, strict=True)
            for forward, model in (("model's own", own), ("accelerated (emulated kernels)", fused)):
                with emulate(module) if model is fused else contextlib.nullcontext():
                    got, grads = run(model)
                errs = {k: max_error(grads[k], g) for k, g in want_grads.items()}
                hc = {k: e for k, e in errs.items() if "hc" in k}
                flat = lambda gs: torch.cat([gs[k].double().flatten() for k in want_grads])  # noqa: E731
                worst, worst_hc = max(errs, key=errs.get), max(hc, key=hc.get)
                out.append({"model": what, "dtype": harness.DTYPE_NAMES[dtype], "forward": forward,
                            "output": max_error(got, want), "grad_worst": errs[worst], "grad_worst_name": worst,
                            "grad_hc_worst": hc[worst_hc], "grad_hc_worst_name": worst_hc,
                            "grad_median": sorted(errs.values())[len(errs) // 2],
                            "grad_norm": ((flat(grads) - flat(want_grads)).norm() / flat(want_grads).norm()).item()})
    return out


def print_errors(rows: list[dict], d: int, n: int, layers: int) -> None:
    print(f"\n== errors against the model's math at float64, d = {d}, n = {n}, {layers} layers, 48 tokens "
          "(max |got - ref| / max |ref| per tensor; output: the streams or the logits)")
    print(f"   {'model':30s} {'dtype':5s} {'forward':34s} {'output':>9s} {'grad worst':>10s} {'(of)':30s} "
          f"{'HC grad worst':>13s} {'(of)':30s} {'grad median':>11s} {'grad norm':>9s}")
    for r in rows:
        print(f"   {r['model']:30s} {r['dtype']:5s} {r['forward']:34s} {r['output']:9.2e} {r['grad_worst']:10.2e} "
              f"{r['grad_worst_name'][-30:]:30s} {r['grad_hc_worst']:13.2e} {r['grad_hc_worst_name'][-30:]:30s} "
              f"{r['grad_median']:11.2e} {r['grad_norm']:9.2e}")


# --------------------------------------------------------------------------- CPU: traffic

def traffic_cases(d: int, n: int, layers: int, dtype) -> list:
    """bench/traffic.py Cases of the dsv4_connections row: the model's own forward and
    the accelerated one, per connection (2 a layer) against the unfused connection floor."""
    import traffic
    from crosslayer.integrations.transformers import accelerate

    def case(op: str, accelerated: bool):
        def setup(N: int) -> dict:
            model = connections_model(d, n, layers, dtype, "cpu")
            if accelerated:
                accelerate(model, strict=True)
            H = torch.randn(1, N, n, d, dtype=dtype, requires_grad=True)
            return {"model": model, "H": H, "dH": torch.randn_like(H)}

        def forward(s):
            return [run_connections(s["model"], s["H"])], [s["H"], *connection_parameters(s["model"])], [s["dH"]]

        return traffic.Case(op, d, n, 0, lambda mode: traffic.floor_hc_sublayer(d, n, mode), setup, forward,
                            lambda s: {"H": s["H"], "dH": s["dH"]}, sublayers=2 * layers)

    return [case("dsv4_connections_own", False), case("dsv4_connections_accelerated", True)]


def cpu_main(args) -> int:
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tools", "cuemu"))
    import count as cuemu_count  # tools/cuemu/count.py: import before torch allocates
    import traffic

    t0 = time.time()
    counter, module = cuemu_count.load()
    commit = harness.git_commit()
    print(f"CPU mode (commit {commit}): DeepSeek-V4 (transformers {transformers_version()}) connections, "
          f"{args.dtype}, n = {args.n}, d = {args.d}, {args.layers} layers")
    print_errors(error_rows(module), 256, 4, 3)
    dtype = harness.parse_dtype(args.dtype)
    for case in traffic_cases(args.d, args.n, args.layers, dtype):
        ms = [traffic.measure(case, counter, module, s) for s in args.sms]
        summary = traffic.summarize(case, ms, itemsize=torch.empty((), dtype=dtype).element_size())
        traffic.print_case(case, summary, traffic.kernel_table(ms[-1]), ms, verbose=False)
    print(f"\ntotal {time.time() - t0:.0f} s")
    return 0


def transformers_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("transformers")


# --------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="GPU: N = 8192, short timing; CPU: unchanged")
    p.add_argument("--cpu", action="store_true", help="the CPU section even when a GPU is present")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d", type=int, default=2048)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--N", type=int, default=None, help="tokens (GPU; default 16384, --quick 8192)")
    p.add_argument("--dtype", default="bf16", choices=sorted(harness.DTYPES))
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--modes", default=",".join(harness.MODES))
    p.add_argument("--variants", default=",".join(harness.VARIANTS))
    p.add_argument("--sms", default="1,2", help="CPU traffic: emulated SM counts (two or more sizes)")
    p.add_argument("--csv", default=str(harness.DEFAULT_CSV))
    p.add_argument("--warmup-ms", type=float, default=None)
    p.add_argument("--rep-ms", type=float, default=None)
    args = p.parse_args(argv)
    for key, allowed in (("rows", ROWS), ("modes", harness.MODES), ("variants", harness.VARIANTS)):
        names = harness.name_list(getattr(args, key))
        bad = [x for x in names if x not in allowed]
        if bad or not names:
            p.error(f"--{key}: {', '.join(bad) or 'empty'} (choose from {', '.join(allowed)})")
        setattr(args, key, names)
    args.variants = [v for v in harness.VARIANTS if v in args.variants]  # the model's own first: the gate's reference
    args.sms = [int(s) for s in args.sms.split(",")]
    if len(args.sms) < 2:
        p.error("--sms: at least two sizes (bytes per token is the slope between them)")
    if args.N is None:
        args.N = 8192 if args.quick else 16384
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import crosslayer.integrations.transformers  # noqa: F401  (transformers with DeepSeek-V4)
    except ImportError as e:
        print(f"bench_transformers: {e}; the integration is written for transformers 5.23.0", file=sys.stderr)
        return 4
    if args.cpu or not torch.cuda.is_available():
        if not args.cpu:
            print(f"{harness.NO_GPU_MESSAGE}: the CPU section (errors, counted traffic) instead")
        return cpu_main(args)
    return gpu_main(args)


if __name__ == "__main__":
    sys.exit(main())
