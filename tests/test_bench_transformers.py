"""CPU self-checks of bench/bench_transformers.py: the floor arithmetic and the
docstring's table, argument parsing, the GPU rows built and gated on the CPU with a
stand-in timer, and the launches of the accelerated connections counted on the
emulator (a deterministic count, guarded here)."""

import pytest
import torch

pytest.importorskip("transformers", minversion="5.23.0")

from bench_scripts import docstring_row, floor_cells, import_bench, import_traffic, run_on_cpu_with_fake_timer  # noqa: E402


@pytest.fixture(scope="module")
def bt():
    return import_bench("bench_transformers")


def test_docstring_table_matches_the_arithmetic(bt):
    for label, mode in (("forward", "fwd"), ("forward+backward", "fwd+bwd")):
        elems, cells = docstring_row(bt.__doc__, label)
        per_layer = bt.floor_bytes(mode, 1, 4, 2048, 1, 2)
        assert elems * 2048 * 2 == per_layer, label
        assert cells == floor_cells(bt.floor_bytes(mode, 16384, 4, 2048, 1, 2)), label
        assert f"{per_layer}" in bt.__doc__


def test_args(bt):
    args = bt.parse_args([])
    assert (args.N, args.layers, args.d, args.n, args.sms) == (16384, 4, 2048, 4, [1, 2])
    assert args.variants == ["eager_oracle", "fused", "compile_oracle"]
    assert bt.parse_args(["--quick"]).N == 8192
    assert bt.parse_args(["--variants", "compile_oracle,eager_oracle"]).variants == ["eager_oracle", "compile_oracle"]
    for bad in (["--rows", "x"], ["--modes", "bwd"], ["--variants", ""], ["--sms", "1"]):
        with pytest.raises(SystemExit):
            bt.parse_args(bad)


def test_gpu_rows_on_cpu_with_stubbed_timer(bt, monkeypatch):
    """Both GPU rows at a tiny size on the CPU (the oracle behind the ops): every variant
    passes the gate against the model's own forward, the accelerated row says how many
    boundaries it fused, and the stack row has no floor."""
    run_on_cpu_with_fake_timer(bt, bt.harness, monkeypatch)
    args = bt.parse_args(["--d", "64", "--N", "12", "--layers", "2", "--dtype", "fp32"])
    timing = bt.harness.timing_kwargs(True)
    rows = bt.connections_rows(args, torch.float32, timing) + bt.stack_rows(args, torch.float32, timing)
    assert [(r.op, r.mode, r.variant) for r in rows] == [
        ("dsv4_connections", m, v) for m in ("fwd", "fwd+bwd") for v in ("eager_oracle", "fused", "compile_oracle")
    ] + [("dsv4_stack", "fwd+bwd", v) for v in ("eager_oracle", "fused", "compile_oracle")]
    assert [r.status for r in rows] == ["ref", "ok", "ok"] * 3, [(r.status, r.note) for r in rows]
    assert all(r.note == "1 boundaries fused" for r in rows[:6] if r.variant == "fused")
    assert all(r.floor_bytes is None for r in rows[6:]) and all(r.floor_bytes for r in rows[:6])
    bt.harness.finalize_rows(rows, 3.0e12)
    assert rows[7].derived == {"speedup_vs_eager": 1.0, "speedup_vs_compile": 1.0}
    assert bt.summarize(rows)[-1].endswith("| OK")


@pytest.mark.cuemu
def test_accelerated_connection_launches(bt):
    """Two layers' connections (4 connections: one pre, three fused boundaries, one
    post) counted on the emulator: 21 launches forward and 30 backward (kernels and the
    parameters' casts; bench/NOTES.md has the breakdown). A change that adds one fails
    here; one that removes one must lower these counts."""
    traffic = import_traffic()
    counter, module = traffic.cuemu_count.load()
    own, accelerated = bt.traffic_cases(256, 4, 2, torch.bfloat16)
    m = traffic.measure(accelerated, counter, module, 1, N=40)
    launches = [sum(r.launch for r in rows) for rows in (m.fwd.rows, m.bwd.rows)]
    kernels = [sum(r.launch for r in rows if r.kind == "kernel") for rows in (m.fwd.rows, m.bwd.rows)]
    assert (launches, kernels) == ([21, 30], [9, 14])
    m_own = traffic.measure(own, counter, module, 1, N=40)
    assert sum(r.launch for r in m_own.fwd.rows + m_own.bwd.rows) > 8 * sum(launches)


@pytest.mark.cuemu
def test_error_rows_measure_both_forwards(bt, cuemu):
    """The CPU section's error rows at a small size: the model's own forward and the
    accelerated one (emulated kernels), both models, both dtypes, each within its
    dtype's rounding of the float64 math."""
    rows = bt.error_rows(cuemu, d=64, n=2, layers=2)
    assert [(r["model"], r["dtype"], r["forward"].split(" (")[0]) for r in rows] == [
        (m, dt, f) for m in ("connections (identity blocks)", "causal LM") for dt in ("fp32", "bf16")
        for f in ("model's own", "accelerated")]
    for r in rows:
        bound = 1e-4 if r["dtype"] == "fp32" else 0.1
        assert r["output"] < bound and r["grad_norm"] < bound, r


def test_exits_4_without_deepseek_v4(bt, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "crosslayer.integrations.transformers", None)
    assert bt.main(["--cpu"]) == 4
    assert "transformers 5.23.0" in capsys.readouterr().err
