"""The HC family's CUDA launchers and kernels on the CPU emulator (tools/cuemu).

hc_post (csrc/hc_post.cu, csrc/kernels/hc_post.cuh), stream_mix (csrc/stream_mix.cu,
csrc/kernels/stream_mix.cuh) and dynamic-HC hc_pre (csrc/hc_pre.cu, csrc/kernels/hc_pre.cuh) run unchanged on CPU tensors; each
result is held to DESIGN.md's policy (tests/policy.py) against the float64 oracle
(python/crosslayer/ref/hc.py), outputs poisoned with NaN, on the GPU tests' kinds of
input: n in {1, 2, 3, 4, 8, 16} (2, 4, 8 exact instantiations, the others generic),
d = 1, 7, 129, 4099 (mostly the scalar path) and 136, 2056 (16-byte path with a cut chunk and a
cut round), token counts that are not a multiple of the tile, every dtype, static and
per-token coefficients, strided / folded / padded / misaligned layouts, empty shapes,
the dW partials in shared memory and in the global workspace, blocks that walk more
than one tile, and the launchers' messages. Shapes are small: emulation is about a
thousand times slower than a GPU. What only a GPU shows (speed, streams, graphs,
determinism under the hardware's scheduling) stays with the `gpu` tests in
test_hc_mix.py and test_hc_pre.py.
"""

import re

import pytest
import torch

from crosslayer import ref
from hc_inputs import is_dense, make_streams, make_vec
from policy import assert_policy
from test_hc_mix import (DTYPES, check_hc_post_bwd, check_stream_mix_bwd, make_coeffs, make_hc_post,
                         make_stream_mix, oracle_pair)
from test_hc_pre import EPS, double, fwd_oracle, make_grads, make_params

pytestmark = pytest.mark.cuemu

STREAMS = [1, 2, 3, 4, 8, 16]
LAYOUTS = ["padded", "stream_stride", "folded", "tokens_transposed", "misaligned"]

# (lead, d). d = 1, 7, 129, 4099 take the scalar path (a stride is not a multiple of the
# vector width); 136 and 2056 the 16-byte path, 136 with a row of threads only partly
# used and 2056 with a second chunk round that only some threads reach (bf16: 257
# chunks of 8). () is one token with no token dims; 11 tokens of d = 7 are one full
# tile of 8 rows and a partial one, 5 tokens of d = 136 in fp32 two tiles of 4.
# Streams: every n on d <= 7, n <= 8 on d = 129 and 136 (n = 16 costs the emulator
# n² dots per chunk), an exact and a generic instantiation on the large d.
CASES = [((), 7), ((3,), 1), ((11,), 7), ((3,), 129), ((5,), 136), ((1,), 4099), ((2,), 2056)]
CASE_STREAMS = {7: STREAMS, 1: STREAMS, 129: STREAMS[:-1], 136: STREAMS[:-1], 4099: [2, 3], 2056: [1, 4]}


def _cases(flag):
    """(shape, n, flag) for every shape and its streams; the boolean `flag` (static
    coefficients, coefficient gradients) alternates along the list, so that every n and
    every shape sees both values while each case runs once per dtype."""
    out, k = [], 0
    for lead, d in CASES:
        for n in CASE_STREAMS[d]:
            val = k % 2 == 1
            k += 1
            name = "N%s-d%d-n%d" % ("x".join(map(str, lead)) or "1", d, n)
            if flag:
                name += "-" + (flag if val else "no_" + flag)
            out.append(pytest.param((lead, d), n, val, id=name))
    return out


# --------------------------------------------------------------------------- hc_post


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, n, static", _cases("static"))
def test_hc_post(cuemu, poisoned, dtype, shape, n, static):
    lead, d = shape
    H, y, alpha, beta = make_hc_post(lead, n, d, dtype=dtype, device="cpu", static=static)
    out = cuemu.hc_post_fwd(H, y, alpha, beta)
    assert out.stride() == H.stride()
    assert_policy("H'", out, *oracle_pair(ref.hc_post, H, y, alpha, beta))

    dHn = torch.randn(*lead, n, d).to(dtype)
    got = cuemu.hc_post_bwd(dHn, H, y, alpha, beta)
    assert got[2].shape == alpha.shape and got[3].shape == beta.shape
    check_hc_post_bwd(dHn, H, y, alpha, beta, got)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, n, static", _cases("static"))
def test_stream_mix(cuemu, poisoned, dtype, shape, n, static):
    lead, d = shape
    H, w = make_stream_mix(lead, n, d, dtype=dtype, device="cpu", static=static)
    x = cuemu.stream_mix_fwd(H, w)
    assert_policy("x", x, *oracle_pair(ref.stream_mix, H, w))

    dx = torch.randn(*lead, d).to(dtype)
    got = cuemu.stream_mix_bwd(dx, H, w)
    assert got[1].shape == w.shape
    check_stream_mix_bwd(dx, H, w, got)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n", [1, 3, 4])
@pytest.mark.parametrize("d", [9, 136])
def test_hc_mix_layouts(cuemu, poisoned, dtype, layout, n, d):
    """Strided H (dH' in H's layout; y and dx misaligned too in the misaligned layout):
    the layouts the launchers address without a copy (folded, tokens_transposed,
    stream_stride, padded) and the misaligned base that forces the scalar path."""
    lead = (2, 3)
    H, y, alpha, beta = make_hc_post(lead, n, d, dtype=dtype, device="cpu", layout=layout)
    assert n == 1 or not H.is_contiguous()
    out = cuemu.hc_post_fwd(H, y, alpha, beta)
    if is_dense(H):
        assert out.stride() == H.stride()
    assert_policy("H'", out, *oracle_pair(ref.hc_post, H, y, alpha, beta))
    dHn = make_streams(lead, n, d, dtype=dtype, device="cpu", layout=layout)
    got = cuemu.hc_post_bwd(dHn, H, y, alpha, beta)
    if is_dense(H):
        assert got[0].stride() == H.stride()
    check_hc_post_bwd(dHn, H, y, alpha, beta, got)

    w = beta
    assert_policy("x", cuemu.stream_mix_fwd(H, w), *oracle_pair(ref.stream_mix, H, w))
    dx = make_vec(lead, d, dtype=dtype, device="cpu", misaligned=layout == "misaligned")
    check_stream_mix_bwd(dx, H, w, cuemu.stream_mix_bwd(dx, H, w))


def _uncollapsible(n, d, dtype):
    """H (3, 2, 4, n, d) whose three token dims merge into no fewer than three strided
    dims (strides 4nd, 12nd, nd): the launchers copy it, and write outputs allocated
    like it (empty_like keeps the dense permutation) through a scratch tensor."""
    return torch.randn(2, 3, 4, n, d).to(dtype).permute(1, 0, 2, 3, 4)


def test_hc_mix_copied_layouts(cuemu, poisoned):
    """Layouts the kernels cannot address: token dims that do not collapse to two, and
    a non-unit feature stride (H transposed in its last two dims). Both are copied."""
    H = _uncollapsible(3, 10, torch.float32)
    lead = H.shape[:-2]
    y = torch.randn(*lead, 10)
    alpha, beta = make_coeffs(lead, 3, dtype=torch.float32, device="cpu", static=False)
    out = cuemu.hc_post_fwd(H, y, alpha, beta)
    assert out.stride() == H.stride()
    assert_policy("H'", out, *oracle_pair(ref.hc_post, H, y, alpha, beta))
    dHn = _uncollapsible(3, 10, torch.float32)
    got = cuemu.hc_post_bwd(dHn, H, y, alpha, beta)
    assert got[0].stride() == H.stride()
    check_hc_post_bwd(dHn, H, y, alpha, beta, got)
    assert_policy("x", cuemu.stream_mix_fwd(H, beta), *oracle_pair(ref.stream_mix, H, beta))
    check_stream_mix_bwd(y, H, beta, cuemu.stream_mix_bwd(y, H, beta))

    H = torch.randn(4, 9, 3).transpose(-1, -2)  # (4, 3, 9), feature stride 3
    y = torch.randn(4, 18)[:, ::2]
    alpha, beta = make_coeffs((4,), 3, dtype=torch.float32, device="cpu", static=False)
    assert_policy("H'", cuemu.hc_post_fwd(H, y, alpha, beta), *oracle_pair(ref.hc_post, H, y, alpha, beta))
    dHn = torch.randn(4, 9, 3).transpose(-1, -2)
    check_hc_post_bwd(dHn, H, y, alpha, beta, cuemu.hc_post_bwd(dHn, H, y, alpha, beta))
    assert_policy("x", cuemu.stream_mix_fwd(H, beta), *oracle_pair(ref.stream_mix, H, beta))
    check_stream_mix_bwd(y, H, beta, cuemu.stream_mix_bwd(y, H, beta))


def test_hc_mix_16bit_coefficients(cuemu, poisoned):
    """Coefficients of another float dtype than the accumulator's are converted."""
    H, y, alpha, beta = make_hc_post((5,), 4, 33, dtype=torch.float32, device="cpu")
    ab, bh = alpha.to(torch.bfloat16), beta.to(torch.float16)
    assert_policy("H'", cuemu.hc_post_fwd(H, y, ab, bh), *oracle_pair(ref.hc_post, H, y, ab, bh))
    dHn = torch.randn_like(H)
    got = cuemu.hc_post_bwd(dHn, H, y, ab, bh)
    assert got[2].dtype == torch.float32 and got[3].dtype == torch.float32
    check_hc_post_bwd(dHn, H, y, ab, bh, got)


def test_hc_mix_mixed_static_and_strided_coefficients(cuemu, poisoned):
    """Static alpha with per-token beta (and the reverse), coefficients given as
    non-contiguous views: each is classified on its own and made one row per token."""
    lead, n, d = (6,), 3, 20
    H, y, _, _ = make_hc_post(lead, n, d, dtype=torch.bfloat16, device="cpu")
    alpha_s = torch.randn(n + 1, n).t()                     # (n, n+1), transposed view
    beta_t = torch.randn(n, 6).t()                          # (6, n), transposed view
    alpha_t = torch.randn(6, n, 2 * (n + 1))[..., ::2]      # (6, n, n+1), strided
    beta_s = torch.randn(2 * n)[::2]                        # (n,), strided
    dHn = torch.randn(*lead, n, d).to(torch.bfloat16)
    for alpha, beta in ((alpha_s, beta_t), (alpha_t, beta_s)):
        assert not alpha.is_contiguous() and not beta.is_contiguous()
        assert_policy("H'", cuemu.hc_post_fwd(H, y, alpha, beta), *oracle_pair(ref.hc_post, H, y, alpha, beta))
        check_hc_post_bwd(dHn, H, y, alpha, beta, cuemu.hc_post_bwd(dHn, H, y, alpha, beta))
    for w in (beta_t, beta_s):
        assert_policy("x", cuemu.stream_mix_fwd(H, w), *oracle_pair(ref.stream_mix, H, w))
        check_stream_mix_bwd(y, H, w, cuemu.stream_mix_bwd(y, H, w))


def test_hc_mix_many_tiles(cuemu, poisoned):
    """More tokens than one block's tile many times over (d = 1: 8 rows of one warp)."""
    lead, n, d = (203,), 2, 1
    for static in (False, True):
        H, y, alpha, beta = make_hc_post(lead, n, d, dtype=torch.float32, device="cpu", static=static)
        assert_policy("H'", cuemu.hc_post_fwd(H, y, alpha, beta), *oracle_pair(ref.hc_post, H, y, alpha, beta))
        dHn = torch.randn(*lead, n, d)
        check_hc_post_bwd(dHn, H, y, alpha, beta, cuemu.hc_post_bwd(dHn, H, y, alpha, beta))


def test_hc_mix_empty_shapes(cuemu, poisoned):
    for lead, n, d in (((0,), 4, 8), ((3, 0), 3, 5), ((3,), 4, 0), ((2, 2), 16, 0)):
        for static in (False, True):
            H, y, alpha, beta = make_hc_post(lead, n, d, dtype=torch.float32, device="cpu", static=static)
            assert cuemu.hc_post_fwd(H, y, alpha, beta).shape == H.shape
            dH, dy, da, db = cuemu.hc_post_bwd(torch.randn_like(H), H, y, alpha, beta)
            assert dH.shape == H.shape and dy.shape == y.shape
            assert torch.equal(da, torch.zeros_like(alpha)) and torch.equal(db, torch.zeros_like(beta))
            assert cuemu.stream_mix_fwd(H, beta).shape == y.shape
            dH, dw = cuemu.stream_mix_bwd(torch.randn_like(y), H, beta)
            assert dH.shape == H.shape and torch.equal(dw, torch.zeros_like(beta))


def test_hc_mix_launcher_errors_are_messaged(cuemu):
    H = torch.randn(3, 4, 8)
    y = torch.randn(3, 8)
    alpha, beta = torch.randn(4, 5), torch.randn(4)
    with pytest.raises(RuntimeError, match=re.escape("y must have shape (*lead, d) = [3, 8], got [3, 7]")):
        cuemu.hc_post_fwd(H, torch.randn(3, 7), alpha, beta)
    with pytest.raises(RuntimeError, match=re.escape("alpha must have shape (*lead, n, n+1) = [3, 4, 5]")):
        cuemu.hc_post_fwd(H, y, torch.randn(3, 4, 4), beta)
    with pytest.raises(RuntimeError, match=re.escape("beta must have shape (*lead, n) = [3, 4]")):
        cuemu.hc_post_fwd(H, y, alpha, torch.randn(3, 5))
    with pytest.raises(RuntimeError, match="y must have H's dtype"):
        cuemu.hc_post_fwd(H, y.double(), alpha, beta)
    with pytest.raises(RuntimeError, match="alpha must have dtype float32, bfloat16, float16 or float64"):
        cuemu.hc_post_fwd(H, y, alpha.int(), beta)
    with pytest.raises(RuntimeError, match="H must have dtype float32, bfloat16, float16 or float64"):
        cuemu.stream_mix_fwd(H.int(), beta)
    with pytest.raises(RuntimeError, match="H must have 1 to 16 streams"):
        cuemu.stream_mix_fwd(torch.randn(3, 17, 8), torch.randn(17))
    with pytest.raises(RuntimeError, match=re.escape("H must have shape (*lead, n, d) with at least 2 dims")):
        cuemu.stream_mix_fwd(torch.randn(8), torch.randn(1))
    with pytest.raises(RuntimeError, match=re.escape("dH_new must have shape (*lead, n, d) = [3, 4, 8]")):
        cuemu.hc_post_bwd(torch.randn(3, 4, 9), H, y, alpha, beta)
    with pytest.raises(RuntimeError, match=re.escape("w must have shape (*lead, n) = [3, 4]")):
        cuemu.stream_mix_bwd(y, H, torch.randn(5))
    with pytest.raises(RuntimeError, match=re.escape("dx must have shape (*lead, d) = [3, 8]")):
        cuemu.stream_mix_bwd(torch.randn(3, 9), H, beta)
    with pytest.raises(RuntimeError, match="alpha is on meta but H is on cpu"):
        cuemu.hc_post_fwd(H, y, alpha.to("meta"), beta)


# ---------------------------------------------------------------------------- hc_pre

def _pre_inputs(lead, n, d, dtype, layout="contiguous"):
    H = make_streams(lead, n, d, dtype=dtype, device="cpu", layout=layout)
    return H, make_params(n, d, dtype=dtype, device="cpu")


def _check_pre_fwd(H, params, outs):
    x, alpha, beta, q, r = outs
    for name, got, lo, hi in zip(("x", "alpha", "beta"), (x, alpha, beta), fwd_oracle(H, *params),
                                 fwd_oracle(*double((H, *params)))):
        assert_policy(name, got, lo, hi)
    # q and r are what the backward consumes: the oracle's projection.
    Hc = H.to(alpha.dtype)
    assert_policy("q", q, Hc @ params[2], H.double() @ params[2].double())
    assert_policy("r", r, torch.rsqrt(Hc.square().mean(-1) + EPS), torch.rsqrt(H.double().square().mean(-1) + EPS))


def _check_pre_bwd(dx, dalpha, dbeta, H, params, got):
    low = ref.hc_pre_bwd(dx, dalpha, dbeta, H, *params, eps=EPS)
    high = ref.hc_pre_bwd(*double((dx, dalpha, dbeta, H, *params)), eps=EPS)
    for name, g, lo, hi, p in zip(("dH", "dA", "dB", "dW", "ds_a", "ds_b"), got, low, high, (H, *params)):
        assert g.dtype == p.dtype, f"{name}: dtype {g.dtype} != {p.dtype}"
        assert_policy(name, g, lo, hi)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, n, _", _cases(None))
def test_hc_pre_forward(cuemu, poisoned, dtype, shape, n, _):
    lead, d = shape
    H, params = _pre_inputs(lead, n, d, dtype)
    _check_pre_fwd(H, params, cuemu.hc_pre_fwd(H, *params, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, n, coeff_grads", _cases("coeff_grads"))
def test_hc_pre_backward(cuemu, poisoned, dtype, shape, n, coeff_grads):
    lead, d = shape
    H, params = _pre_inputs(lead, n, d, dtype)
    dx, dalpha, dbeta = make_grads(lead, n, d, dtype=dtype, device="cpu")
    if not coeff_grads:
        dalpha = dbeta = None
    _, _, _, q, r = cuemu.hc_pre_fwd(H, *params, EPS)
    got = cuemu.hc_pre_bwd(dx, dalpha, dbeta, H, *params, q, r)
    if is_dense(H):
        assert got[0].stride() == H.stride()
    _check_pre_bwd(dx, dalpha, dbeta, H, params, got)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n", [4, 3])
def test_hc_pre_layouts(cuemu, poisoned, dtype, layout, n):
    lead, d = (2, 3), 131 if layout == "misaligned" else 136
    H, params = _pre_inputs(lead, n, d, dtype, layout)
    assert not H.is_contiguous()
    _check_pre_fwd(H, params, cuemu.hc_pre_fwd(H, *params, EPS))
    dx = make_vec(lead, d, dtype=dtype, device="cpu", misaligned=layout == "misaligned")
    _, dalpha, dbeta = make_grads(lead, n, d, dtype=dtype, device="cpu")
    _, _, _, q, r = cuemu.hc_pre_fwd(H, *params, EPS)
    got = cuemu.hc_pre_bwd(dx, dalpha, dbeta, H, *params, q, r)
    if is_dense(H):
        assert got[0].stride() == H.stride()
    _check_pre_bwd(dx, dalpha, dbeta, H, params, got)


def test_hc_pre_copied_layouts(cuemu, poisoned):
    """Token dims that do not collapse to two and a non-unit feature stride: copied."""
    for H in (_uncollapsible(4, 12, torch.bfloat16), torch.randn(5, 12, 4).to(torch.bfloat16).transpose(-1, -2)):
        n, d, lead = H.shape[-2], H.shape[-1], H.shape[:-2]
        params = make_params(n, d, dtype=torch.bfloat16, device="cpu")
        outs = cuemu.hc_pre_fwd(H, *params, EPS)
        _check_pre_fwd(H, params, outs)
        dx, dalpha, dbeta = make_grads(lead, n, d, dtype=torch.bfloat16, device="cpu")
        got = cuemu.hc_pre_bwd(dx, dalpha, dbeta, H, *params, *outs[3:])
        assert got[0].stride() == H.stride()
        _check_pre_bwd(dx, dalpha, dbeta, H, params, got)


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
    _, _, _, q, r = cuemu.hc_pre_fwd(H, *params, EPS)
    _check_pre_bwd(dx, dalpha, dbeta, H, params, cuemu.hc_pre_bwd(dx, dalpha, dbeta, H, *params, q, r))


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
    _check_pre_bwd(dx, dalpha, dbeta, H, params, cuemu.hc_pre_bwd(dx, dalpha, dbeta, H, *params, *outs[3:]))


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
    _, _, _, q, r = cuemu.hc_pre_fwd(H, *params, EPS)
    _check_pre_bwd(dx, dalpha, dbeta, H, params, cuemu.hc_pre_bwd(dx, dalpha, dbeta, H, *params, q, r))


def test_results_do_not_depend_on_thread_order(cuemu, poisoned, monkeypatch):
    """Every output bit-identical whether the emulator runs a block's threads highest
    first (the default) or lowest first: no result depends on the order in which
    threads reach shared memory (the GPU's determinism tests ask the same of its
    scheduling). Several warps a row (d = 2056 in bf16: 8 warps) and several rows."""
    def run():
        outs = []
        for lead, n, d in (((3,), 4, 2056), ((11,), 3, 7)):
            H, y, alpha, beta = make_hc_post(lead, n, d, dtype=torch.bfloat16, device="cpu")
            dHn = torch.randn(*lead, n, d).to(torch.bfloat16)
            outs += [cuemu.hc_post_fwd(H, y, alpha, beta), *cuemu.hc_post_bwd(dHn, H, y, alpha, beta),
                     cuemu.stream_mix_fwd(H, beta), *cuemu.stream_mix_bwd(y, H, beta)]
            params = make_params(n, d, dtype=torch.bfloat16, device="cpu")
            dx, dalpha, dbeta = make_grads(lead, n, d, dtype=torch.bfloat16, device="cpu")
            fwd = cuemu.hc_pre_fwd(H, *params, EPS)
            outs += [*fwd, *cuemu.hc_pre_bwd(dx, dalpha, dbeta, H, *params, fwd[3], fwd[4])]
        return outs

    seed = torch.initial_seed()
    monkeypatch.setenv("CUEMU_ORDER", "reverse")
    first = run()
    torch.manual_seed(seed)
    monkeypatch.setenv("CUEMU_ORDER", "forward")
    second = run()
    for k, (a, b) in enumerate(zip(first, second)):
        assert not torch.isnan(a).any() and torch.equal(a, b), f"output {k} differs between thread orders"


def test_hc_pre_empty_tokens(cuemu, poisoned):
    H = torch.randn(0, 4, 8)
    params = make_params(4, 8, dtype=torch.float32, device="cpu")
    x, alpha, beta, q, r = cuemu.hc_pre_fwd(H, *params, EPS)
    assert x.shape == (0, 8) and alpha.shape == (0, 4, 5) and beta.shape == (0, 4)
    assert q.shape == (0, 4, 6) and r.shape == (0, 4)
    got = cuemu.hc_pre_bwd(torch.randn(0, 8), None, None, H, *params, q, r)
    assert got[0].shape == H.shape
    for g, p in zip(got[1:], params):
        assert torch.equal(g, torch.zeros_like(p))


def test_hc_pre_launcher_errors_are_messaged(cuemu):
    H = torch.randn(3, 4, 8)
    A, B, W, s_a, s_b = make_params(4, 8, dtype=torch.float32, device="cpu")
    with pytest.raises(RuntimeError, match=re.escape("W must have shape (d, n+2) = [8, 6], got [8, 5]")):
        cuemu.hc_pre_fwd(H, A, B, W[:, :5], s_a, s_b, EPS)
    with pytest.raises(RuntimeError, match=re.escape("A must have shape (n, n+1) = [4, 5]")):
        cuemu.hc_pre_fwd(H, A[:, :4], B, W, s_a, s_b, EPS)
    with pytest.raises(RuntimeError, match=r"s_a must be a 0-dim tensor"):
        cuemu.hc_pre_fwd(H, A, B, W, s_a.reshape(1), s_b, EPS)
    with pytest.raises(RuntimeError, match="d >= 1"):
        cuemu.hc_pre_fwd(H[..., :0], A, B, W[:0], s_a, s_b, EPS)
    with pytest.raises(RuntimeError, match="H must have 1 to 16 streams"):
        cuemu.hc_pre_fwd(torch.randn(3, 17, 8), torch.randn(17, 18), torch.randn(17), torch.randn(8, 19),
                             s_a, s_b, EPS)
    with pytest.raises(RuntimeError, match="W is on meta but H is on cpu"):
        cuemu.hc_pre_fwd(H, A, B, W.to("meta"), s_a, s_b, EPS)
    x, alpha, beta, q, r = cuemu.hc_pre_fwd(H, A, B, W, s_a, s_b, EPS)
    with pytest.raises(RuntimeError, match=r"dalpha must have shape \(\.\.\., n, n\+1\)"):
        cuemu.hc_pre_bwd(torch.randn(3, 8), alpha[:, :, :4], None, H, A, B, W, s_a, s_b, q, r)
    with pytest.raises(RuntimeError, match=r"dbeta must have shape \(\.\.\., n\)"):
        cuemu.hc_pre_bwd(torch.randn(3, 8), None, beta[:2], H, A, B, W, s_a, s_b, q, r)
    with pytest.raises(RuntimeError, match=r"q must have shape \(\.\.\., n, n\+2\)"):
        cuemu.hc_pre_bwd(torch.randn(3, 8), None, None, H, A, B, W, s_a, s_b, q[..., :5], r)
    with pytest.raises(RuntimeError, match="dx must have H's dtype"):
        cuemu.hc_pre_bwd(torch.randn(3, 8, dtype=torch.float64), None, None, H, A, B, W, s_a, s_b, q, r)
