"""CPU self-checks of bench/bench_hc.py: the floor arithmetic against DESIGN.md, the
argument parsing and plans, the exit without a GPU, and the row building (gate,
status, derived columns, SUMMARY lines, exit status) on tiny CPU tensors with the
timer and the compiler stubbed out. No CUDA needed."""

import types

import pytest
import torch

from bench_scripts import FAKE_MS, check_exits_2_without_gpu, check_stream_table, import_bench, run_bench, run_on_cpu_with_fake_timer


@pytest.fixture(scope="module")
def bh():
    return import_bench("bench_hc")


@pytest.fixture(scope="module")
def harness(bh):
    return bh.harness


# ------------------------------------------------------------------- floors

def test_import_needs_no_gpu(bh):
    assert bh.DEVICE == "cuda"  # importing did not exit or touch the device
    assert set(bh.OPS) == {"hc_pre", "hc_pre_shc", "hc_post", "hc_sublayer"}


@pytest.mark.parametrize("n,d", [(1, 1), (2, 1024), (4, 2048), (8, 8192), (16, 129)])
def test_floor_elements_match_design(bh, n, d):
    # DESIGN.md "Traffic floors", elements per token.
    want = {
        ("hc_pre", "fwd"): n * d + d,
        ("hc_pre", "fwd+bwd"): (n * d + d) + (2 * n * d + d),
        ("hc_post", "fwd"): 2 * n * d + d,
        ("hc_post", "fwd+bwd"): (2 * n * d + d) + (3 * n * d + 2 * d),
        ("hc_sublayer", "fwd"): 3 * n * d + 2 * d,
        ("hc_sublayer", "fwd+bwd"): 9 * n * d + 5 * d,
    }
    for op in bh.OPS:
        for mode in bh.MODES:
            assert bh.floor_elements(op, mode, n, d) == want[(bh.floor_kind(op), mode)]


def test_sublayer_floor_matches_design_yardsticks(bh):
    # DESIGN.md: DHC sublayer fwd+bwd, bf16, N=16384, n=4, 3.00 TB/s: 0.92 / 1.83 ms.
    ms2 = bh.floor_ms("hc_sublayer", "fwd+bwd", 16384, 4, 2048, 2, 3.00e12)
    ms4 = bh.floor_ms("hc_sublayer", "fwd+bwd", 16384, 4, 4096, 2, 3.00e12)
    assert round(ms2, 2) == 0.92 and round(ms4, 2) == 1.83
    assert bh.floor_bytes("hc_sublayer", "fwd+bwd", 16384, 4, 2048, 2) == 16384 * 41 * 2048 * 2


def test_bad_op_or_mode_raise(bh):
    with pytest.raises(ValueError, match="unknown op"):
        bh.floor_elements("hc_mix", "fwd", 4, 8)
    with pytest.raises(ValueError, match="unknown mode"):
        bh.floor_elements("hc_post", "bwd", 4, 8)


def test_docstring_table_matches_the_arithmetic(bh):
    """Every number of the docstring's worked table equals what the functions give."""
    check_stream_table(bh, {"hc_pre fwd": ("hc_pre", "fwd"), "hc_pre fwd+bwd": ("hc_pre", "fwd+bwd"),
                            "hc_post fwd": ("hc_post", "fwd"), "hc_post fwd+bwd": ("hc_post", "fwd+bwd"),
                            "sublayer fwd": ("hc_sublayer", "fwd"),
                            "sublayer fwd+bwd": ("hc_sublayer", "fwd+bwd")})


def test_floor_table_uses_given_bandwidth(bh):
    plan = [(4, 2048, ("hc_sublayer",), ("fwd+bwd",))]
    t3 = bh.floor_table(plan, 16384, 2, 3.00e12)
    t2 = bh.floor_table(plan, 16384, 2, 2.00e12)
    assert "0.917 ms" in t3 and "41d" in t3 and "2.751 GB" in t3
    assert "1.376 ms" in t2


# ------------------------------------------------------------------- args

def test_default_plan_covers_the_issue_grid(bh):
    args = bh.parse_args([])
    assert args.dtype == "bf16" and args.N == 16384
    sizes = {(n, d) for n, d, _, _ in args.plan}
    assert sizes == {(n, d) for n in (2, 4, 8) for d in (1024, 2048, 4096, 8192)}
    assert all(ops == bh.OPS and modes == bh.MODES for _, _, ops, modes in args.plan)
    assert args.variants[0] == "eager_oracle"


def test_quick_plan_covers_the_targets(bh):
    args = bh.parse_args(["--quick"])
    groups = {(n, d, op, mode) for n, d, ops, modes in args.plan for op in ops
              for mode in modes}
    assert (4, 2048, "hc_sublayer", "fwd+bwd") in groups
    assert (4, 4096, "hc_sublayer", "fwd+bwd") in groups
    assert {op for _, _, op, _ in groups} == set(bh.OPS)
    assert len(groups) <= 10  # each group is one torch.compile: keep quick quick


def test_explicit_sizes_modes_ops(bh):
    args = bh.parse_args(["--quick", "--d", "1024", "--n", "2,8", "--ops", "hc_post",
                          "--modes", "fwd", "--variants", "fused"])
    assert args.plan == [(2, 1024, ("hc_post",), ("fwd",)), (8, 1024, ("hc_post",), ("fwd",))]
    assert args.variants == ["eager_oracle", "fused"]
    for bad in (["--ops", "hc_mix"], ["--modes", "bwd"], ["--variants", "einsum"],
                ["--d", "0"], ["--n", "17"], ["--d", "x"]):
        with pytest.raises(SystemExit):
            bh.parse_args(bad)


def test_main_without_gpu_exits_2():
    check_exits_2_without_gpu("bench_hc")


def test_help_parses():
    p = run_bench("bench_hc", "--help")
    assert p.returncode == 0 and "--quick" in p.stdout


# ------------------------------------------------------------------- rows on CPU

@pytest.fixture
def cpu_bench(bh, harness, monkeypatch):
    return run_on_cpu_with_fake_timer(bh, harness, monkeypatch)


def _ops_module(hc_pre=None, hc_post=None, fused=True):
    m = types.SimpleNamespace(fused_ops=lambda: {"hc_pre": fused, "hc_post": fused})
    if hc_pre is not None:
        m.hc_pre = hc_pre
    if hc_post is not None:
        m.hc_post = hc_post
    return m


def _run(bh, ops, dtype=torch.float32, modes=("fwd", "fwd+bwd"), N=6, n=3, d=37):
    from crosslayer import ref
    rows = bh.bench_size(n, d, bh.OPS, modes, N, dtype, list(bh.VARIANTS), 3.0e12,
                         {}, ops, ref)
    return rows


def test_rows_with_correct_fused_ops(cpu_bench, harness):
    from crosslayer import ref
    bh = cpu_bench
    rows = _run(bh, _ops_module(ref.hc_pre, ref.hc_post))
    assert len(rows) == len(bh.OPS) * 2 * 3
    for r in rows:
        assert r.status == ("ref" if r.variant == "eager_oracle" else "ok"), (r.op, r.variant,
                                                                              r.status, r.note)
        n, d, N = 3, 37, 6
        assert r.floor_bytes == N * bh.floor_elements(r.op, r.mode, n, d) * 4
        fl = r.floor_bytes / 3.0e12 * 1e3
        assert r.derived["floor_ms"] == pytest.approx(fl)
        assert r.derived["x_floor"] == pytest.approx(FAKE_MS / fl)
        assert r.derived["gbps"] == pytest.approx(r.floor_bytes / (FAKE_MS * 1e-3) / 1e9)
        assert r.derived["pct_copy_bw"] == pytest.approx(100 * fl / FAKE_MS)
        assert r.derived["speedup_vs_eager"] == pytest.approx(1.0)
        assert r.derived["speedup_vs_compile"] == pytest.approx(1.0)
        if r.variant != "eager_oracle":
            assert r.rel_err is not None and r.rel_err < 1e-6
    comp = [r for r in rows if r.variant == "compile_oracle"]
    assert all("first call (compile)" in r.note for r in comp)
    # Display order within a group: fused first.
    assert [r.variant for r in rows[:3]] == ["fused", "eager_oracle", "compile_oracle"]
    lines, ok = bh.summary_lines(rows, "fp32")
    assert ok and len(lines) == len(bh.OPS)
    assert all(line.startswith("SUMMARY ") and line.endswith("| OK") for line in lines)
    assert "fwd+bwd: floor" in lines[-1] and "compile_oracle 2.000 ms" in lines[-1]
    assert bh.harness.exit_status(rows) == 0
    table = harness.format_table(rows)
    assert "hc_sublayer" in table and "x floor" in table


def test_fwd_bwd_gate_covers_every_gradient(cpu_bench):
    """The fwd+bwd gate compares the outputs and the gradients of every input (a fused
    op that got dW wrong must be WRONG)."""
    from crosslayer import ref
    bh = cpu_bench

    class WrongW(torch.autograd.Function):
        @staticmethod
        def forward(ctx, W):
            return W.view_as(W)

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    def bad_pre(H, A, B, W=None, s_a=None, s_b=None, eps=1e-6):
        return ref.hc_pre(H, A, B, None if W is None else WrongW.apply(W), s_a, s_b, eps)

    rows = _run(bh, _ops_module(bad_pre, ref.hc_post))
    st = {(r.op, r.mode): r.status for r in rows if r.variant == "fused"}
    assert st[("hc_pre", "fwd")] == "ok" and st[("hc_pre_shc", "fwd+bwd")] == "ok"
    assert st[("hc_pre", "fwd+bwd")] == "WRONG"
    assert st[("hc_sublayer", "fwd+bwd")] == "WRONG"
    assert st[("hc_post", "fwd+bwd")] == "ok"
    assert bh.harness.exit_status(rows) == 3
    lines, ok = bh.summary_lines(rows, "fp32")
    assert not ok and any("WRONG" in line and "FUSED NOT OK" in line for line in lines)


def test_missing_fused_ops_fail_not_crash(cpu_bench, capsys):
    from crosslayer import ref
    bh = cpu_bench
    rows = _run(bh, _ops_module(hc_pre=None, hc_post=ref.hc_post), modes=("fwd",))
    st = {r.op: (r.status, r.note) for r in rows if r.variant == "fused"}
    assert st["hc_post"][0] == "ok"
    for op in ("hc_pre", "hc_pre_shc", "hc_sublayer"):
        assert st[op][0] == "failed: missing op" and "hc_pre" in st[op][1]
    # The oracle rows still ran.
    assert all(r.status in ("ref", "ok") for r in rows if r.variant != "fused")
    assert bh.harness.exit_status(rows) == 3
    assert "FAILED: hc_sublayer fused" in capsys.readouterr().err
    lines, ok = bh.summary_lines(rows, "fp32")
    assert not ok


def test_not_fused_is_marked(cpu_bench):
    from crosslayer import ref
    bh = cpu_bench
    rows = _run(bh, _ops_module(ref.hc_pre, ref.hc_post, fused=False), modes=("fwd",))
    fused = [r for r in rows if r.variant == "fused"]
    assert fused and all(r.status == "not-fused" and r.time_ms == FAKE_MS for r in fused)
    assert bh.harness.exit_status(rows) == 3


def test_real_ops_module_is_handled(cpu_bench):
    """Whatever crosslayer.ops holds in this tree (hc ops merged or not), the bench
    builds its rows without raising, and the status says which."""
    import crosslayer.ops as ops
    bh = cpu_bench
    rows = _run(bh, ops, modes=("fwd",), dtype=torch.bfloat16)
    for r in rows:
        if r.variant != "fused":
            assert r.status in ("ok", "ref"), (r.op, r.variant, r.status, r.note)
        elif getattr(ops, "hc_pre", None) is None and r.op != "hc_post":
            assert r.status == "failed: missing op"
        else:
            assert r.status in ("ok", "not-fused", "failed: missing op")


def test_inputs_are_realistic(bh, monkeypatch):
    from crosslayer import ref
    monkeypatch.setattr(bh, "DEVICE", "cpu")
    base = bh.make_base_inputs(5, 4, 64, torch.bfloat16, ref)
    assert base["W"].abs().max() > 0 and 0.01 < base["W"].std() < 0.04
    assert base["s_a"].dim() == 0 and base["s_a"].dtype == torch.float32
    A0, _ = ref.hc_init_static(4, 1)
    assert 0 < (base["A"] - A0).abs().max() < 0.2
    assert base["alpha"].shape == (5, 4, 5) and base["beta"].shape == (5, 4)
    assert base["H"].dtype == torch.bfloat16
