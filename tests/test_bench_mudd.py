"""CPU self-checks of bench/bench_mudd.py: the floor arithmetic against DESIGN.md and
the docstring's table, argument parsing, the exit without a GPU, and the row building
(gate, status, exit status) on tiny CPU tensors with the timer and compiler stubbed."""

import types

import pytest
import torch

from bench_scripts import check_exits_2_without_gpu, docstring_row, floor_cells, import_bench, run_on_cpu_with_fake_timer


@pytest.fixture(scope="module")
def bm():
    return import_bench("bench_mudd")


def test_floors_match_design(bm):
    # DESIGN.md "Traffic floors": mudd_weights d / 2d; depth_aggregate (l+C)d / (2l+C)d.
    assert bm.weights_floor_elements("fwd") == 1
    assert bm.weights_floor_elements("fwd+bwd") == 3
    for l in (1, 13, 25, 49):
        assert bm.aggregate_floor_elements("fwd", l) == l + 4
        assert bm.aggregate_floor_elements("fwd+bwd", l) == (l + 4) + (2 * l + 4)
    ms = lambda e: bm.floor_bytes(e, 16384, 2048, 2) / 3.00e12 * 1e3  # noqa: E731
    assert round(ms(3), 2) == 0.07  # DESIGN.md mudd_weights yardstick
    assert round(ms(bm.aggregate_floor_elements("fwd", 25)), 2) == 0.65
    assert round(ms(bm.aggregate_floor_elements("fwd+bwd", 13)), 2) == 1.05
    assert round(ms(bm.aggregate_floor_elements("fwd+bwd", 25)), 2) == 1.86
    with pytest.raises(ValueError, match="unknown mode"):
        bm.weights_floor_elements("bwd")


def test_stack_floor_by_hand(bm):
    # L = 1: one layer, l = 2, C = 1 (last layer): fwd 2 + 1 + 3; bwd 2 + 3 + 2.
    assert bm.stack_floor_elements("fwd", 1) == 6
    assert bm.stack_floor_elements("fwd+bwd", 1) == 6 + 7
    # L = 2: layer 0 (l=2, C=4): fwd 9, bwd 2+6+4; layer 1 (l=3, C=1): fwd 7, bwd 2+4+3
    assert bm.stack_floor_elements("fwd", 2) == 16
    assert bm.stack_floor_elements("fwd+bwd", 2) == 16 + 12 + 9
    assert bm.stack_floor_elements("fwd", 24) == 489
    assert bm.stack_floor_elements("fwd+bwd", 24) == 1577


def test_docstring_table_matches_the_arithmetic(bm):
    rows = {"mudd_weights fwd+bwd": bm.weights_floor_elements("fwd+bwd"),
            "stack L=24 fwd": bm.stack_floor_elements("fwd", 24),
            "stack L=24 fwd+bwd": bm.stack_floor_elements("fwd+bwd", 24)}
    for l in (13, 25, 49):
        for mode in ("fwd", "fwd+bwd"):
            rows[f"aggregate l={l} {mode}"] = bm.aggregate_floor_elements(mode, l)
    for label, elems in rows.items():
        got, cells = docstring_row(bm.__doc__, label)
        assert got == elems, label
        assert cells == floor_cells(bm.floor_bytes(elems, 16384, 2048, 2)), label


def test_args(bm):
    a = bm.parse_args([])
    assert a.agg_ls == (13, 25, 49) and a.ops == list(bm.OPS) and a.N == 16384
    assert bm.parse_args(["--quick"]).agg_ls == (25,)
    assert bm.parse_args(["--variants", "fused"]).variants == ["eager_oracle", "fused"]
    for bad in (["--ops", "hc"], ["--variants", "einsum"], ["--N", "0"]):
        with pytest.raises(SystemExit):
            bm.parse_args(bad)


def test_main_without_gpu_exits_2():
    check_exits_2_without_gpu("bench_mudd")


@pytest.fixture
def cpu_bench(bm, monkeypatch):
    return run_on_cpu_with_fake_timer(bm, bm.harness, monkeypatch)


def test_rows_on_cpu(cpu_bench):
    from crosslayer import nn as cnn
    from crosslayer import ref
    bm = cpu_bench
    ops = types.SimpleNamespace(mudd_weights=ref.mudd_weights)
    cases = [bm.weights_case(6, 8, torch.float32, ops, ref),
             bm.aggregate_case(5, 6, 8, torch.float32, ops, ref, cnn),
             bm.stack_case(3, 6, 8, torch.float32, cnn)]
    rows = []
    for case in cases:
        rows += bm.run_case(case, bm.MODES, list(bm.VARIANTS), torch.float32, {}, True)
    bm.harness.finalize_rows(rows, 3.0e12)
    for r in rows:
        assert r.status == ("ref" if r.variant == "eager_oracle" else "ok"), (r.op, r.variant,
                                                                              r.mode, r.note)
    stack_rows = [r for r in rows if r.op == "stack" and r.mode == "fwd+bwd"]
    assert stack_rows[0].floor_bytes == 6 * bm.stack_floor_elements("fwd+bwd", 3) * 8 * 4
    lines, ok = bm.summary_lines(rows, "fp32")
    assert ok and all(line.endswith("| OK") for line in lines)
    assert bm.harness.exit_status(rows) == 0


def test_missing_and_wrong_fused_rows(cpu_bench):
    from crosslayer import ref
    bm = cpu_bench
    rows = bm.run_case(bm.weights_case(5, 8, torch.float32, types.SimpleNamespace(), ref),
                       ("fwd",), list(bm.VARIANTS), torch.float32, {}, True)
    fused = [r for r in rows if r.variant == "fused"]
    assert fused[0].status == "failed: missing op" and bm.harness.exit_status(rows) == 3

    def wrong(x, W1, W2, bias, C, *a):
        return ref.mudd_weights(x, W1, W2, bias, C, *a) * 1.01
    rows = bm.run_case(bm.weights_case(5, 8, torch.float32,
                                       types.SimpleNamespace(mudd_weights=wrong), ref),
                       ("fwd",), list(bm.VARIANTS), torch.float32, {}, True)
    assert [r.status for r in rows if r.variant == "fused"] == ["WRONG"]
    lines, ok = bm.summary_lines(rows, "fp32")
    assert not ok and bm.harness.exit_status(rows) == 3
