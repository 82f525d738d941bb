"""CPU self-checks of bench/bench_mhc.py: the floor arithmetic against DESIGN.md and
the docstring's table, argument parsing, the Liger lookup without liger_kernel and the
exit without a GPU. No CUDA needed."""

import pytest

from bench_scripts import check_exits_2_without_gpu, check_stream_table, import_bench, run_on_cpu_with_fake_timer


@pytest.fixture(scope="module")
def bm():
    return import_bench("bench_mhc")


@pytest.mark.parametrize("n,d", [(1, 1), (4, 2048), (8, 129), (16, 7168)])
def test_floor_elements_match_design(bm, n, d):
    # DESIGN.md "Traffic floors": mhc_coeffs n·d / 2n·d; the sublayer is the HC one.
    assert bm.floor_elements("mhc_coeffs", "fwd", n, d) == n * d
    assert bm.floor_elements("mhc_coeffs", "fwd+bwd", n, d) == 3 * n * d
    assert bm.floor_elements("mhc_sublayer", "fwd", n, d) == 3 * n * d + 2 * d
    assert bm.floor_elements("mhc_sublayer", "fwd+bwd", n, d) == 9 * n * d + 5 * d


def test_sublayer_floor_matches_design_yardsticks(bm):
    # DESIGN.md: mHC sublayer fwd+bwd, bf16, N=16384, n=4, 3.00 TB/s: 0.92 / 1.83 ms.
    assert round(bm.floor_ms("mhc_sublayer", "fwd+bwd", 16384, 4, 2048, 2, 3.00e12), 2) == 0.92
    assert round(bm.floor_ms("mhc_sublayer", "fwd+bwd", 16384, 4, 4096, 2, 3.00e12), 2) == 1.83


def test_docstring_table_matches_the_arithmetic(bm):
    check_stream_table(bm, {"coeffs fwd": ("mhc_coeffs", "fwd"), "coeffs fwd+bwd": ("mhc_coeffs", "fwd+bwd"),
                            "sublayer fwd": ("mhc_sublayer", "fwd"),
                            "sublayer fwd+bwd": ("mhc_sublayer", "fwd+bwd")})


def test_args(bm):
    args = bm.parse_args([])
    assert args.plan == [(4, 2048), (4, 4096), (4, 7168)] and args.N == 16384
    assert bm.parse_args(["--quick"]).plan == [(4, 2048), (4, 4096)]
    args = bm.parse_args(["--variants", "fused", "--d", "64", "--n", "2,4"])
    assert args.variants == ["eager_oracle", "fused"] and args.plan == [(2, 64), (4, 64)]
    for bad in (["--ops", "hc_post"], ["--modes", "bwd"], ["--variants", "x"], ["--n", "17"]):
        with pytest.raises(SystemExit):
            bm.parse_args(bad)
    with pytest.raises(ValueError, match="unknown op"):
        bm.floor_elements("hc_post", "fwd", 4, 8)


def test_liger_lookup_says_why_when_absent(bm):
    f, why = bm.liger_function("mhc_coeffs")
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        assert f is None and why == "not installed"
    else:
        assert f is not None or why


def test_main_without_gpu_exits_2():
    check_exits_2_without_gpu("bench_mhc")


def test_rows_on_cpu_with_stubbed_timer(bm, monkeypatch):
    """bench_group on tiny CPU tensors: the timer reports FAKE_MS, torch.compile is the
    identity; the fused rows (the oracle fallback on CPU, so fused_ops() is stubbed
    True) pass the gate, and a wrong coefficient op is marked WRONG."""
    import types

    import torch

    from crosslayer import ops, ref

    run_on_cpu_with_fake_timer(bm, bm.harness, monkeypatch)
    fused = lambda: dict.fromkeys(("mhc_coeffs", "stream_mix", "hc_post"), True)  # noqa: E731
    good = types.SimpleNamespace(mhc_coeffs=ops.mhc_coeffs, stream_mix=ops.stream_mix,
                                 hc_post=ops.hc_post, fused_ops=fused)

    def wrong_coeffs(*a):
        alpha, beta = ref.mhc_coeffs(*a)
        return alpha, beta * 1.5

    bad = types.SimpleNamespace(mhc_coeffs=wrong_coeffs, stream_mix=ops.stream_mix,
                                hc_post=ops.hc_post, fused_ops=fused)
    base, grads = bm.make_inputs(5, 3, 24, torch.float32)
    variants = ["eager_oracle", "fused", "compile_oracle"]
    for op in bm.OPS:
        for mode in bm.MODES:
            rows = bm.bench_group(op, mode, 5, 3, 24, torch.float32, base, grads, variants, {},
                                  good, ref)
            assert [r.variant for r in rows] == ["fused", "eager_oracle", "compile_oracle"]
            assert [r.status for r in rows] == ["ok", "ref", "ok"], [(r.status, r.note) for r in rows]
            assert rows[0].floor_bytes == 5 * bm.floor_elements(op, mode, 3, 24) * 4
            rows = bm.bench_group(op, mode, 5, 3, 24, torch.float32, base, grads, variants, {},
                                  bad, ref)
            assert rows[0].status == "WRONG"
