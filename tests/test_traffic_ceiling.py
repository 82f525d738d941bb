"""CI guard on traffic: every row of `bench/traffic.py --quick`, counted on the CPU
emulator, moves at most the bytes per token and makes at most the launches recorded in
bench/traffic_ceiling.csv. A change that adds traffic fails here; one that removes
traffic fails too, until the ceiling is tightened to the new count
(`python bench/traffic.py --quick --write-ceiling`), so the ceiling is always today's."""

import pytest

from bench_scripts import import_traffic

pytestmark = pytest.mark.cuemu

TIGHTEN_BELOW = 0.99  # a count this far under its ceiling must be recorded

traffic = import_traffic()
CEILING = traffic.read_ceiling()
OPS = sorted({key[0] for key in CEILING})
# depth_stack (a whole 8-layer DepthStack, about two minutes on 2 cores) and the HC
# chains (8 sublayers each) compose the kernels the depth_aggregate, mudd_weights and
# sublayer rows already guard: exhaustive tier.
SLOW_ROWS = {"depth_stack", "dhc_chain", "shc_chain", "mhc_chain"}


def test_ceiling_covers_every_quick_row():
    assert OPS == sorted({c.op for c in traffic.cases(quick=True, only=None)})


@pytest.mark.parametrize("op", [pytest.param(op, marks=pytest.mark.exhaustive) if op in SLOW_ROWS else op
                                for op in OPS])
def test_row_within_ceiling(op):
    rows = traffic.run(quick=True, only={op}, echo=False)
    assert rows, f"bench/traffic.py has no quick row {op}"
    for r in rows:
        key = tuple(r[k] for k in traffic.CEILING_KEYS)
        bytes_ceiling, launch_ceiling = CEILING[key]
        what = f"{op} {r['mode']} (d={r['d']}, l={r['l']})"
        assert r["bytes_per_token"] <= bytes_ceiling, (
            f"{what} moves {r['bytes_per_token']:.0f} B/token, above its ceiling {bytes_ceiling:.0f} "
            f"(floor {r['floor_bytes_per_token']}): run `python bench/traffic.py --quick --rows {op} -v` "
            f"to see which kernel or ATen op added it")
        assert r["launches"] <= launch_ceiling, f"{what}: {r['launches']} launches, ceiling {launch_ceiling}"
        assert r["bytes_per_token"] >= TIGHTEN_BELOW * bytes_ceiling and r["launches"] == launch_ceiling, (
            f"{what} now moves {r['bytes_per_token']:.0f} B/token in {r['launches']} launches, under its "
            f"ceiling ({bytes_ceiling:.0f} B/token, {launch_ceiling} launches): record the gain with "
            f"`python bench/traffic.py --quick --write-ceiling` and note it in bench/NOTES.md")
