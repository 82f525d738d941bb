"""Launches at decode sizes (N = 1 to 64 tokens), counted on the CPU emulator: issue 13's
bound of at most 2 launches a fused boundary forward and 3 backward, and the exact
launch count of each connection call (pre + post of one sublayer, forward and backward),
so that a change adding a launch at small N fails here. bench/traffic.py counts the same
rows at full-size grids (tests/test_traffic_ceiling.py); these are the per-call counts
that dominate when N is small."""

import pytest
import torch

from bench_scripts import import_traffic

pytestmark = pytest.mark.cuemu

traffic = import_traffic()
D, N_STREAMS = 64, 4


@pytest.fixture(scope="module")
def counter_and_module():
    return traffic.cuemu_count.load()


def _launches(case, counter_and_module, N):
    counter, module = counter_and_module
    m = traffic.measure(case, counter, module, sms=1, N=N)
    return m.fwd.launches(), m.bwd.launches()


def _boundary_case(kind, static_alpha):
    """ops.hc_boundary of connection i (per-token coefficients, or static ones as in an
    SHC chain) fused with connection i+1's DHC or SHC pre; for kind "mhc",
    ops.mhc_boundary (an mHC pre of H')."""
    from crosslayer import ops

    n, d = N_STREAMS, D

    def setup(N):
        torch.manual_seed(0)
        lead = () if static_alpha else (N,)
        H = torch.randn(N, n, d, dtype=torch.bfloat16, requires_grad=True)
        y = torch.randn(N, d, dtype=torch.bfloat16, requires_grad=True)
        alpha = torch.randn(*lead, n, n + 1, requires_grad=True)
        beta = torch.randn(*lead, n, requires_grad=True)
        if kind == "mhc":
            m = n * n + 2 * n
            params = [torch.randn(n * d, m) / (n * d) ** 0.5, torch.tensor(1.0), torch.tensor(1.0),
                      torch.tensor(1.0), torch.randn(m)]
        else:
            params = [torch.randn(n, n + 1), torch.randn(n)]
        if kind == "dhc":
            params += [torch.randn(d, n + 2) / d ** 0.5, torch.tensor(0.5), torch.tensor(0.5)]
        params = [p.requires_grad_(True) for p in params]
        return {"inputs": [H, y, alpha, beta], "params": params,
                "dH_next": torch.randn(N, n, d, dtype=torch.bfloat16), "dx": torch.randn(N, d, dtype=torch.bfloat16)}

    def forward(s):
        boundary = ops.mhc_boundary if kind == "mhc" else ops.hc_boundary
        H_next, x, _, _ = boundary(*s["inputs"], *s["params"])
        return [H_next, x], [*s["inputs"], *s["params"]], [s["dH_next"], s["dx"]]

    return traffic.Case(f"{kind}_boundary", d, n, 0, lambda m: 0, setup, forward)


@pytest.mark.parametrize("N", [1, 5, 64])
@pytest.mark.parametrize("kind, static_alpha", [("dhc", False), ("dhc", True), ("shc", False), ("shc", True)])
def test_boundary_launches_at_small_n(counter_and_module, kind, static_alpha, N):
    fwd, bwd = _launches(_boundary_case(kind, static_alpha), counter_and_module, N)
    assert fwd <= 2, f"{kind} boundary forward: {fwd} launches at N = {N} (issue 13: at most 2)"
    assert bwd <= 3, f"{kind} boundary backward: {bwd} launches at N = {N} (issue 13: at most 3)"


@pytest.mark.parametrize("static_alpha", [False, True])
@pytest.mark.parametrize("N", [1, 5, 64])
def test_mhc_boundary_launches_at_small_n(counter_and_module, N, static_alpha):
    """The mHC boundary is issue 13's at most 2 forward (phi's packing, the kernel) and 3
    backward (the fused tile kernel, which reads phi as fp32 and needs no packing; the
    parameter token_sums of both connections; the dphi pass over H', one token group up
    to 64 tokens, so no partial sum), with the post's coefficients per token or static
    (their sums in the same token_sums launch)."""
    fwd, bwd = _launches(_boundary_case("mhc", static_alpha), counter_and_module, N)
    assert (fwd, bwd) == (2, 3), f"mHC boundary at N = {N}: {fwd} forward and {bwd} backward launches"


# One connection call, pre + post (identity branch), bf16: exact forward and backward
# launches. DHC: W's packing and hc_pre, hc_post; backward hc_post, hc_pre, the
# parameter sums. SHC: stream_mix, hc_post; backward hc_post and the static
# coefficients' token_sums, stream_mix's backward and its dw sum, and autograd's
# select_backward and add joining A's two gradients (alpha = A, w = A[:, 0]; a chain's
# interior runs the boundary instead: test above). mHC: phi's packing,
# the coefficients and x in one kernel, hc_post; backward hc_post, stream_mix_dots,
# the epilogue, the parameter token_sums, and the dH pass with dphi (phi read as fp32
# there: no packing; one token group up to 64 tokens: no partial sum).
CONNECTION_LAUNCHES = {"dhc": (3, 3), "shc": (2, 6), "mhc": (3, 5)}


@pytest.mark.parametrize("N", [1, 64])
@pytest.mark.parametrize("kind", sorted(CONNECTION_LAUNCHES))
def test_connection_launches_at_small_n(counter_and_module, kind, N):
    fwd, bwd = _launches(traffic.hc_case(kind, D, N_STREAMS, torch.bfloat16), counter_and_module, N)
    assert (fwd, bwd) == CONNECTION_LAUNCHES[kind], (
        f"{kind} connection at N = {N}: {fwd} forward and {bwd} backward launches, "
        f"expected {CONNECTION_LAUNCHES[kind]}")
