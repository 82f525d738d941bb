"""Dynamic-HC hc_pre launchers and kernels (csrc/hc_pre.cu, csrc/kernels/hc_pre.cuh) on
the CPU emulator (tools/cuemu), against the float64 oracle under DESIGN.md's policy,
outputs poisoned with NaN: the HC shape matrix of hc_inputs.stream_cases (every n, odd d
and token counts, every dtype), with and without coefficient gradients, strided and
copied layouts, the dW partials in shared memory and in the global workspace, the
persistent grid, one coefficient gradient, empty token sets. The checks every op shares
are in test_contract.py.
"""


import pytest
import torch

from crosslayer import ref
from hc_inputs import STREAM_LAYOUTS, make_streams, make_vec, stream_cases, uncollapsible_streams
from policy import assert_policy
from test_hc_post import DTYPES
from test_hc_pre import EPS, double, fwd_oracle, make_grads, make_params

pytestmark = pytest.mark.cuemu


def _pre_inputs(lead, n, d, dtype, layout="contiguous"):
    H = make_streams(lead, n, d, dtype=dtype, device="cpu", layout=layout)
    return H, make_params(n, d, dtype=dtype, device="cpu")


def _check_pre_fwd(H, params, outs):
    x, alpha, beta, q, r, Wt = outs
    for name, got, lo, hi in zip(("x", "alpha", "beta"), (x, alpha, beta), fwd_oracle(H, *params),
                                 fwd_oracle(*double((H, *params)))):
        assert_policy(name, got, lo, hi)
    # q and r are what the backward consumes: the oracle's projection.
    Hc = H.to(alpha.dtype)
    assert_policy("q", q, Hc @ params[2], H.double() @ params[2].double())
    assert_policy("r", r, torch.rsqrt(Hc.square().mean(-1) + EPS), torch.rsqrt(H.double().square().mean(-1) + EPS))
    # Wt is W packed for the backward: transposed, rows zero-padded to a multiple of 8.
    d = H.shape[-1]
    assert Wt.shape == (params[2].shape[1], (d + 7) // 8 * 8) and Wt.dtype == alpha.dtype
    torch.testing.assert_close(Wt[:, :d], params[2].to(Wt.dtype).t(), rtol=0, atol=0)
    assert not Wt[:, d:].any()


def _pre_bwd(cuemu, dx, dalpha, dbeta, H, params, q, r, Wt, prior=None):
    """(dH, dA, dB, dW, ds_a, ds_b) from the launcher: dH written into a NaN-filled
    tensor like H, or, given `prior` (another op's contribution), added to a copy of it."""
    dH = torch.full_like(H, float("nan")) if prior is None else prior.clone()
    A, B, W, s_a, s_b = params
    grads = cuemu.hc_pre_bwd(dH, prior is not None, dx, dalpha, dbeta, H, A, B, W, Wt, s_a, s_b, q, r)
    return (dH, *grads)


def _check_pre_bwd(dx, dalpha, dbeta, H, params, got, prior=None):
    low = list(ref.hc_pre_bwd(dx, dalpha, dbeta, H, *params, eps=EPS))
    high = list(ref.hc_pre_bwd(*double((dx, dalpha, dbeta, H, *params)), eps=EPS))
    if prior is not None:
        low[0] = low[0] + prior
        high[0] = high[0] + prior.double()
    for name, g, lo, hi, p in zip(("dH", "dA", "dB", "dW", "ds_a", "ds_b"), got, low, high, (H, *params)):
        assert g.dtype == p.dtype, f"{name}: dtype {g.dtype} != {p.dtype}"
        assert_policy(name, g, lo, hi)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, n, _", stream_cases(None))
def test_hc_pre_forward(cuemu, poisoned, dtype, shape, n, _):
    lead, d = shape
    H, params = _pre_inputs(lead, n, d, dtype)
    _check_pre_fwd(H, params, cuemu.hc_pre_fwd(H, *params, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, n, coeff_grads", stream_cases("coeff_grads"))
def test_hc_pre_backward(cuemu, poisoned, dtype, shape, n, coeff_grads):
    lead, d = shape
    H, params = _pre_inputs(lead, n, d, dtype)
    dx, dalpha, dbeta = make_grads(lead, n, d, dtype=dtype, device="cpu")
    if not coeff_grads:
        dalpha = dbeta = None
    _, _, _, q, r, Wt = cuemu.hc_pre_fwd(H, *params, EPS)
    _check_pre_bwd(dx, dalpha, dbeta, H, params, _pre_bwd(cuemu, dx, dalpha, dbeta, H, params, q, r, Wt))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", STREAM_LAYOUTS)
@pytest.mark.parametrize("n", [4, 3])
def test_hc_pre_layouts(cuemu, poisoned, dtype, layout, n):
    lead, d = (2, 3), 131 if layout == "misaligned" else 136
    H, params = _pre_inputs(lead, n, d, dtype, layout)
    assert not H.is_contiguous()
    _check_pre_fwd(H, params, cuemu.hc_pre_fwd(H, *params, EPS))
    dx = make_vec(lead, d, dtype=dtype, device="cpu", misaligned=layout == "misaligned")
    _, dalpha, dbeta = make_grads(lead, n, d, dtype=dtype, device="cpu")
    _, _, _, q, r, Wt = cuemu.hc_pre_fwd(H, *params, EPS)
    _check_pre_bwd(dx, dalpha, dbeta, H, params, _pre_bwd(cuemu, dx, dalpha, dbeta, H, params, q, r, Wt))


def test_hc_pre_copied_layouts(cuemu, poisoned):
    """Token dims that do not collapse to two and a non-unit feature stride: copied."""
    for H in (uncollapsible_streams(4, 12, torch.bfloat16), torch.randn(5, 12, 4).to(torch.bfloat16).transpose(-1, -2)):
        n, d, lead = H.shape[-2], H.shape[-1], H.shape[:-2]
        params = make_params(n, d, dtype=torch.bfloat16, device="cpu")
        outs = cuemu.hc_pre_fwd(H, *params, EPS)
        _check_pre_fwd(H, params, outs)
        dx, dalpha, dbeta = make_grads(lead, n, d, dtype=torch.bfloat16, device="cpu")
        _check_pre_bwd(dx, dalpha, dbeta, H, params, _pre_bwd(cuemu, dx, dalpha, dbeta, H, params, *outs[3:]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", *STREAM_LAYOUTS, "uncollapsible"])
def test_hc_pre_backward_accumulates(cuemu, poisoned, dtype, layout):
    """accumulate: dH += the gradient through hc_pre (another op's contribution already in
    dH, as hc_post's is in a connection), in place in every layout, through a scratch
    copy where the kernel cannot address dH's token dims."""
    n, d = 4, 136
    if layout == "uncollapsible":
        H = uncollapsible_streams(n, d, dtype)
        params, lead = make_params(n, d, dtype=dtype, device="cpu"), H.shape[:-2]
    else:
        lead = (2, 3)
        H, params = _pre_inputs(lead, n, d, dtype, layout)
    prior = torch.empty_like(H).copy_(torch.randn(H.shape))  # H's layout, as hc_post allocates it
    dx, dalpha, dbeta = make_grads(lead, n, d, dtype=dtype, device="cpu")
    _, _, _, q, r, Wt = cuemu.hc_pre_fwd(H, *params, EPS)
    got = _pre_bwd(cuemu, dx, dalpha, dbeta, H, params, q, r, Wt, prior=prior)
    _check_pre_bwd(dx, dalpha, dbeta, H, params, got, prior=prior)


@pytest.mark.parametrize("dtype, n, d", [
    (torch.float32, 16, 3300),   # generic: 18 rows of dW partials of ldw = 3304 floats > 227 KB
    (torch.bfloat16, 8, 5816),   # 10 rows of 5816 floats > 227 KB
    (torch.float64, 5, 1700),    # generic in fp64
])
def test_hc_pre_backward_dw_in_global_workspace(cuemu, poisoned, dtype, n, d):
    """(n+2)·d accumulator partials beyond shared memory: the kernel accumulates dW in
    its global workspace slice instead (and with d a multiple of 8, 16-byte accesses)."""
    lead = (3,)
    H, params = _pre_inputs(lead, n, d, dtype)
    dx, dalpha, dbeta = make_grads(lead, n, d, dtype=dtype, device="cpu")
    _, _, _, q, r, Wt = cuemu.hc_pre_fwd(H, *params, EPS)
    _check_pre_bwd(dx, dalpha, dbeta, H, params, _pre_bwd(cuemu, dx, dalpha, dbeta, H, params, q, r, Wt))


def test_hc_pre_backward_persistent_grid(cuemu, poisoned):
    """More token tiles than resident blocks: with 135 KB of shared memory (the dW
    partials of the generic instantiation, 18 rows of 1704 floats) one block fits an
    SM, so the grid is 132 blocks and the first five walk two tokens, their partials
    summed over both."""
    lead, n, d = (132 + 5,), 3, 1700
    H, params = _pre_inputs(lead, n, d, torch.float32)
    dx, dalpha, dbeta = make_grads(lead, n, d, dtype=torch.float32, device="cpu")
    outs = cuemu.hc_pre_fwd(H, *params, EPS)
    _check_pre_fwd(H, params, outs)
    _check_pre_bwd(dx, dalpha, dbeta, H, params, _pre_bwd(cuemu, dx, dalpha, dbeta, H, params, *outs[3:]))


@pytest.mark.parametrize("which", ["dalpha", "dbeta"])
def test_hc_pre_backward_one_coefficient_gradient(cuemu, poisoned, which):
    """Only one of dalpha / dbeta given: the other is zero."""
    lead, n, d = (5,), 4, 40
    H, params = _pre_inputs(lead, n, d, torch.float32)
    dx, dalpha, dbeta = make_grads(lead, n, d, dtype=torch.float32, device="cpu")
    if which == "dalpha":
        dbeta = None
    else:
        dalpha = None
    _, _, _, q, r, Wt = cuemu.hc_pre_fwd(H, *params, EPS)
    _check_pre_bwd(dx, dalpha, dbeta, H, params, _pre_bwd(cuemu, dx, dalpha, dbeta, H, params, q, r, Wt))


def test_hc_pre_empty_tokens(cuemu, poisoned):
    H = torch.randn(0, 4, 8)
    params = make_params(4, 8, dtype=torch.float32, device="cpu")
    x, alpha, beta, q, r, Wt = cuemu.hc_pre_fwd(H, *params, EPS)
    assert x.shape == (0, 8) and alpha.shape == (0, 4, 5) and beta.shape == (0, 4)
    assert q.shape == (0, 4, 6) and r.shape == (0, 4)
    got = _pre_bwd(cuemu, torch.randn(0, 8), None, None, H, params, q, r, Wt)
    assert got[0].shape == H.shape
    for g, p in zip(got[1:], params):
        assert torch.equal(g, torch.zeros_like(p))


