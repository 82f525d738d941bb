"""mhc_coeffs's CUDA launchers and kernels on the CPU emulator (tools/cuemu).

The launchers (csrc/mhc_coeffs.cu) and kernels (csrc/kernels/mhc_coeffs.cuh) run
unchanged on CPU tensors, outputs poisoned with NaN, each result held to DESIGN.md's
policy against the oracle (crosslayer.ref.mhc) at the input dtype and in float64:

- bf16 / fp16 H with d >= 32 take the tensor-core kernels (split-K projection, Sinkhorn
  epilogues, dH on mma.sync); fp32 / fp64 H and 16-bit H with d < 32 take the at::mm
  paths with the same epilogue kernels;
- n in {1, 2, 3, 4, 5, 8, 16} (4 is the fast instantiation, the others the generic one);
  odd d (1, 7, 129, 515) and N not a multiple of the 16-token tile, small enough that
  the projection is split over many chunks (one chunk a split at these N), plus shapes
  where splits hold several chunks and the last one fewer, and more than one block of
  warps;
- iters 1, 2, 20 (and 45 / 60: the Sinkhorn scale buffer in global memory), the fp64
  backward exact against autograd through the oracle;
- strided / folded / padded / misaligned H (the scalar kVec = false path), strided phi
  and b, absent dalpha / dbeta, empty token sets, bit-identical reruns and the
  launchers' messages.

The emulator is ~1000x slower than a GPU (mma.sync slower still), so N·n·d stays small.
What only a GPU shows (speed, streams, graphs) stays with the `gpu` tests in
test_mhc_coeffs.py, whose input builders and oracles these tests reuse.
"""

import pytest
import torch

from crosslayer import ref
from hc_inputs import STREAM_LAYOUTS, make_streams
from policy import FLOOR, assert_policy
from test_mhc_coeffs import (
    DTYPES,
    EPS,
    FLOATS,
    GRAD_NAMES,
    POST_MULT,
    PRE_EPS,
    SK_EPS,
    double,
    make_grads,
    make_params,
    oracle,
    oracle_bwd,
    run_bwd,
)

pytestmark = pytest.mark.cuemu

# (lead, d): d = 1 and 7 take the at::mm path for 16-bit H, 129 and 515 the tensor-core
# path with a ragged last chunk; N = 1, 5, 19, 3·7 (none a multiple of 16).
SHAPES = [((1,), 1), ((5,), 7), ((19,), 129), ((3, 7), 515)]
NS = [1, 2, 3, 4, 8]


def _shape_id(shape):
    lead, d = shape
    return "N%s-d%d" % ("x".join(map(str, lead)), d)


def floats(iters):
    return (EPS, PRE_EPS, POST_MULT, iters, SK_EPS)


def check_forward(cuemu, H, params, iters=20):
    alpha, beta, u, r = cuemu.mhc_coeffs_fwd(H, *params, *floats(iters))
    low = oracle(H, params, iters)
    high = oracle(*double((H,)), double(params), iters)
    for name, got, lo, hi in zip(("alpha", "beta"), (alpha, beta), low, high):
        assert_policy(name, got, lo, hi)
    # u and r are what the backward consumes: the oracle's projection.
    acc = alpha.dtype
    xf, x64 = H.to(acc).flatten(-2), H.double().flatten(-2)
    assert_policy("u", u, xf @ params[0].to(acc), x64 @ params[0].double())
    assert_policy("r", r, torch.rsqrt(xf.square().mean(-1) + EPS), torch.rsqrt(x64.square().mean(-1) + EPS))
    assert alpha.is_contiguous() and beta.is_contiguous() and u.is_contiguous() and r.is_contiguous()
    return alpha, beta, u, r


def check_backward(cuemu, H, params, dalpha, dbeta, u, r, iters=20):
    got = run_bwd(cuemu.mhc_coeffs_bwd, dalpha, dbeta, H, params, u, r, *floats(iters))
    low = oracle_bwd(dalpha, dbeta, H, params, iters)
    high = oracle_bwd(*double((dalpha, dbeta, H)), double(params), iters)
    for name, g, lo, hi in zip(GRAD_NAMES, got, low, high):
        assert_policy(name, g, lo.to(g.dtype), hi)
    dH = got[0]
    assert dH.stride() == torch.empty_like(H).stride(), "dH must be allocated like H"
    for name, g, p in zip(GRAD_NAMES[1:], got[1:], params):
        assert g.dtype == p.dtype and g.shape == p.shape, name
    return got


def forward_backward(cuemu, lead, n, d, dtype):
    """Forward and backward on random H (*lead, n, d) and gradients, both checked."""
    H = torch.randn(*lead, n, d).to(dtype)
    params = make_params(n, d, dtype=dtype, device="cpu")
    _, _, u, r = check_forward(cuemu, H, params)
    dalpha, dbeta = make_grads(lead, n, dtype=dtype, device="cpu")
    check_backward(cuemu, H, params, dalpha, dbeta, u, r)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_forward_backward(cuemu, poisoned, dtype, n, shape):
    lead, d = shape
    forward_backward(cuemu, lead, n, d, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [((5,), 7), ((19,), 129)], ids=_shape_id)
def test_backward_prior_is_read_not_written(cuemu, poisoned, dtype, shape):
    """dH = prior + the terms with `prior` a tensor of its own (mhc_boundary's backward:
    the later gradient of H', which must stay as it was): the same bits as adding in
    place to a copy of it, and prior unchanged."""
    lead, d = shape
    n = 4
    H = make_streams(lead, n, d, dtype=dtype, device="cpu", layout="stream_stride")
    params = make_params(n, d, dtype=dtype, device="cpu")
    _, _, u, r = cuemu.mhc_coeffs_fwd(H, *params, *FLOATS)
    dalpha, dbeta = make_grads(lead, n, dtype=dtype, device="cpu")
    prior = torch.randn(*lead, n, d).to(dtype).transpose(0, -1).contiguous().transpose(0, -1)  # strided
    kept = prior.clone()
    dH = torch.full_like(H, float("nan"))
    got = cuemu.mhc_coeffs_bwd(dH, False, prior, dalpha, dbeta, None, None, H, *params, u, r, *FLOATS)
    want_dH, *want = run_bwd(cuemu.mhc_coeffs_bwd, dalpha, dbeta, H, params, u, r, *FLOATS, prior=kept)
    assert torch.equal(prior, kept), "prior must only be read"
    assert torch.equal(dH, want_dH)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 4, 5])
@pytest.mark.parametrize("shape", [((3, 7), 515), ((4, 10), 64), ((2, 1), 7)], ids=_shape_id)
@pytest.mark.parametrize("layout", ["contiguous", *STREAM_LAYOUTS])
def test_pre_forward(cuemu, poisoned, dtype, n, shape, layout):
    """mhc_pre_fwd, the connection's pre: the coefficients exactly as mhc_coeffs_fwd's, and
    x = Σ_i alpha[..., i, 0]·H_i (the 16-bit path computes it from the tile the
    coefficients' pass read; d = 515 the scalar tail, 64 the 16-byte path, 7 the at::mm
    path with x by stream_mix) against the oracle's mix under the policy."""
    lead, d = shape
    H = make_streams(lead, n, d, dtype=dtype, device="cpu", layout=layout)
    params = make_params(n, d, dtype=dtype, device="cpu")
    x, *coeffs = cuemu.mhc_pre_fwd(H, *params, *FLOATS)
    for name, got, want in zip(("alpha", "beta", "u", "r"), coeffs, cuemu.mhc_coeffs_fwd(H, *params, *FLOATS)):
        assert torch.equal(got, want), name
    alpha_low = oracle(H, params)[0]
    alpha_high = oracle(*double((H,)), double(params))[0]
    low = (alpha_low[..., 0].unsqueeze(-1) * H.to(alpha_low.dtype)).sum(-2).to(dtype)
    high = (alpha_high[..., 0].unsqueeze(-1) * H.double()).sum(-2)
    assert x.dtype == dtype and x.is_contiguous()
    assert_policy("x", x, low, high)


@pytest.mark.parametrize("n, d, N, dtype", [(4, 515, 600, torch.bfloat16), (4, 515, 600, torch.float16),
                                             (8, 1000, 300, torch.bfloat16)])
def test_backward_token_groups(cuemu, poisoned, n, d, N, dtype):
    """Sizes where each warp of the dH kernel walks several 16-token tiles of its token
    group (dphi accumulated in registers across tiles, the groups' partials summed) and,
    for n = 8 (M = 80), the dphi columns take two passes. At 132 SMs: 10 groups of 4
    tiles (38 tiles), 5 of 4 (19)."""
    forward_backward(cuemu, (N,), n, d, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "stream_stride"])
@pytest.mark.parametrize("shape", [((5,), 7), ((19,), 129)], ids=_shape_id)
def test_backward_accumulates_and_takes_the_pre(cuemu, poisoned, dtype, layout, shape):
    """dH += the coefficients' term on top of another op's (one rounding of the sum in the
    kernel); dpre, a second gradient of alpha[..., 0], acting as if added to dalpha's
    column 0; and dx, the pre mix's gradient, adding alpha[..., i, 0]·dx to dH_i: what
    the mHC connection's pre hands over instead of autograd's sums."""
    lead, d = shape
    n = 4
    H = make_streams(lead, n, d, dtype=dtype, device="cpu", layout=layout)
    params = make_params(n, d, dtype=dtype, device="cpu")
    _, _, u, r = cuemu.mhc_coeffs_fwd(H, *params, *FLOATS)
    dalpha, dbeta = make_grads(lead, n, dtype=dtype, device="cpu")
    dpre = torch.randn(*lead, n, dtype=dalpha.dtype)
    dx = torch.randn(*lead, d).to(dtype)
    prior = torch.randn_like(H)
    got = run_bwd(cuemu.mhc_coeffs_bwd, dalpha, dbeta, H, params, u, r, *FLOATS, prior=prior, dpre=dpre, dx=dx)
    dalpha_all = dalpha.clone()
    dalpha_all[..., 0] += dpre
    low = list(oracle_bwd(dalpha_all, dbeta, H, params))
    high = list(oracle_bwd(*double((dalpha_all, dbeta, H)), double(params)))
    w_low = oracle(H, params)[0][..., 0]
    w_high = oracle(*double((H,)), double(params))[0][..., 0]
    low[0] = low[0] + prior.to(low[0].dtype) + (w_low.unsqueeze(-1) * dx.to(w_low.dtype).unsqueeze(-2)).to(low[0].dtype)
    high[0] = high[0] + prior.double() + w_high.unsqueeze(-1) * dx.double().unsqueeze(-2)
    for name, g, lo, hi in zip(GRAD_NAMES, got, low, high):
        assert_policy(name, g, lo.to(g.dtype), hi)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=_shape_id)
@pytest.mark.parametrize("which", ["alpha", "beta"])
def test_backward_absent_gradients(cuemu, poisoned, dtype, n, shape, which):
    """dalpha or dbeta None (zero): the epilogue reads no null pointer. The epilogue is
    the same kernel on every path, so the cheap shapes cover it."""
    lead, d = shape
    H = torch.randn(*lead, n, d).to(dtype)
    params = make_params(n, d, dtype=dtype, device="cpu")
    dalpha, dbeta = make_grads(lead, n, dtype=dtype, device="cpu")
    dalpha = dalpha if which == "alpha" else None
    dbeta = dbeta if which == "beta" else None
    _, _, u, r = cuemu.mhc_coeffs_fwd(H, *params, *FLOATS)
    check_backward(cuemu, H, params, dalpha, dbeta, u, r)


# Splits of several chunks with a shorter last one, several blocks of warps, n = 5 and
# 16 (the emulator has 132 SMs: a launch aims at 132·16 warps): (lead, n, d) with
#   N = 5,  n = 3,  d = 5700: 3·179 = 537 chunks, 269 splits of 2 (the last of 1);
#   N = 70, n = 4,  d = 2200: 276 chunks, 138 splits of 2; two blocks (4 warps, then one
#                             warp with 6 tokens);
#   N = 70, n = 4,  d = 130:  20 splits of 1 chunk, two blocks;
#   N = 9,  n = 5,  d = 33:   a 1-feature tail chunk per stream;
#   N = 2,  n = 16, d = 40:   M = 288: five 64-column passes (m_pad 320), 18 dH k-steps;
#   N = 3,  n = 16, d = 1:    the at::mm path at the largest n.
MMA_SHAPES = [((5,), 3, 5700), ((70,), 4, 2200), ((70,), 4, 130), ((9,), 5, 33), ((2,), 16, 40),
              ((3,), 16, 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MMA_SHAPES, ids=lambda s: "N%d-n%d-d%d" % (s[0][0], s[1], s[2]))
def test_more_streams_and_splits(cuemu, poisoned, dtype, shape):
    lead, n, d = shape
    forward_backward(cuemu, lead, n, d, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3, 4])
@pytest.mark.parametrize("iters", [1, 2])
def test_few_iterations(cuemu, poisoned, dtype, n, iters):
    """iters = 1 (softmax and one column step only) and 2, forward and backward, random
    logits of scale 3 (far from any fixed point)."""
    lead, d = (7,), 65
    H = torch.randn(*lead, n, d).to(dtype)
    params = make_params(n, d, dtype=dtype, device="cpu", b_scale=3.0)
    _, _, u, r = check_forward(cuemu, H, params, iters)
    dalpha, dbeta = make_grads(lead, n, dtype=dtype, device="cpu")
    check_backward(cuemu, H, params, dalpha, dbeta, u, r, iters)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 16])
@pytest.mark.parametrize("iters", [1, 2, 20, 45])
def test_sinkhorn_backward_exact_fp64(cuemu, poisoned, n, iters):
    """fp64, random logits of scale 3: the kernels' gradients equal autograd through the
    oracle to float64 rounding, not merely near the converged point (iters = 45: the
    (2·45 − 1)·128·8 B scale buffer exceeds 48 KB and lives in global memory)."""
    lead, d = (23,), 5
    H = torch.randn(*lead, n, d, dtype=torch.float64)
    params = make_params(n, d, dtype=torch.float64, device="cpu", b_scale=3.0)
    leaves = [t.clone().requires_grad_(True) for t in (H, *params)]
    alpha, beta = ref.mhc_coeffs(*leaves, *floats(iters))
    dalpha, dbeta = make_grads(lead, n, dtype=torch.float64, device="cpu")
    want = torch.autograd.grad((alpha * dalpha).sum() + (beta * dbeta).sum(), leaves)
    a_k, b_k, u, r = cuemu.mhc_coeffs_fwd(H, *params, *floats(iters))
    torch.testing.assert_close(a_k, alpha.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(b_k, beta.detach(), rtol=1e-12, atol=1e-14)
    got = run_bwd(cuemu.mhc_coeffs_bwd, dalpha, dbeta, H, params, u, r, *floats(iters))
    if n > 1:
        assert want[-1].abs().max() > 1e-3
    for name, g, w in zip(GRAD_NAMES, got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_buffer_in_global_memory(cuemu, poisoned, dtype):
    """iters = 60: (2·60 − 1) steps × 128 threads × 4 B > 48 KB, so the Sinkhorn scales
    go to the global workspace."""
    lead, n, d = (45,), 4, 40
    H = torch.randn(*lead, n, d).to(dtype)
    params = make_params(n, d, dtype=dtype, device="cpu")
    _, _, u, r = check_forward(cuemu, H, params, 60)
    dalpha, dbeta = make_grads(lead, n, dtype=dtype, device="cpu")
    check_backward(cuemu, H, params, dalpha, dbeta, u, r, 60)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", STREAM_LAYOUTS)
@pytest.mark.parametrize("n", [4, 3])
def test_strided_layouts(cuemu, poisoned, dtype, layout, n):
    lead, d = (3, 5), 131
    H = make_streams(lead, n, d, dtype=dtype, device="cpu", layout=layout)
    assert not H.is_contiguous()
    params = make_params(n, d, dtype=dtype, device="cpu")
    _, _, u, r = check_forward(cuemu, H, params)
    dalpha, dbeta = make_grads(lead, n, dtype=dtype, device="cpu")
    check_backward(cuemu, H, params, dalpha, dbeta, u, r)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_parameters(cuemu, poisoned, dtype):
    """phi as a transposed view, b a strided slice, the gradients and u, r strided too:
    the launchers read any strides."""
    lead, n, d = (21,), 4, 96
    H = torch.randn(*lead, n, d).to(dtype)
    phi, a_pre, a_post, a_res, b = make_params(n, d, dtype=dtype, device="cpu")
    phi_t = phi.t().contiguous().t()
    b_s = torch.stack([b, b], 1)[:, 0]
    assert not phi_t.is_contiguous() and not b_s.is_contiguous()
    params = (phi_t, a_pre, a_post, a_res, b_s)
    _, _, u, r = check_forward(cuemu, H, params)
    dalpha, dbeta = make_grads(lead, n, dtype=dtype, device="cpu")
    dalpha_s = torch.stack([dalpha, dalpha], -1)[..., 1]
    u_s = torch.cat([u, u], -1)[..., : u.shape[-1]]
    assert not dalpha_s.is_contiguous() and not u_s.is_contiguous()
    check_backward(cuemu, H, params, dalpha_s, dbeta, u_s, r)


@pytest.mark.parametrize("n", [3, 1])
def test_phi_read_within_its_rows(cuemu, poisoned, n):
    """Odd n gives an odd row length M = n² + 2n: the backward kernels read phi as fp32
    element by element and nothing past a row's M columns (a column-pair load read one
    element past the end, NaN in dH when the memory after phi was poisoned). phi here
    is followed in memory by NaN, so such a read shows deterministically; the fused
    boundary's backward (n <= 4) reads phi the same way."""
    lead, d = (19,), 131
    dtype = torch.bfloat16
    H = torch.randn(*lead, n, d).to(dtype)
    phi, a_pre, a_post, a_res, b = make_params(n, d, dtype=dtype, device="cpu")
    guarded = torch.full((phi.numel() + 8,), float("nan"), dtype=phi.dtype)
    guarded[: phi.numel()] = phi.flatten()
    params = (guarded[: phi.numel()].view(phi.shape), a_pre, a_post, a_res, b)
    assert params[0].is_contiguous()
    _, _, u, r = check_forward(cuemu, H, params)
    dalpha, dbeta = make_grads(lead, n, dtype=dtype, device="cpu")
    check_backward(cuemu, H, params, dalpha, dbeta, u, r)
    y = torch.randn(*lead, d).to(dtype)
    alpha, beta = torch.randn(*lead, n, n + 1), torch.randn(*lead, n)
    H_next, x, alpha_n, beta_n, u, r = cuemu.mhc_boundary_fwd(H, y, alpha, beta, *params, *floats(20))
    grads = cuemu.mhc_boundary_bwd(torch.randn_like(H_next), torch.randn_like(x), None, None, H, y, alpha, beta,
                                   H_next, *params, u, r, *floats(20))
    for name, g in zip(("dH", "dy", "dalpha", "dbeta", "dphi", "da_pre", "da_post", "da_res", "db"), grads):
        assert not torch.isnan(g).any(), f"mhc_boundary_bwd {name}: NaN (a read past phi's rows)"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("phi_scale", [1e-4, 1e-2, 30.0])
def test_phi_magnitude(cuemu, poisoned, dtype, phi_scale):
    """phi far from 1/sqrt(n·d) (a trained phi carries the folded RMSNorm weight), the
    a_* scaled inversely so the logits stay O(1): fp16's narrow exponent range must
    not flush the low part of phi's 16-bit split (phi ~ 1e-4 left u 1e-2 off)."""
    lead, n, d = (5,), 4, 300
    H = torch.randn(*lead, n, d).to(dtype)
    phi, a_pre, a_post, a_res, b = make_params(n, d, dtype=dtype, device="cpu")
    params = (phi * phi_scale, a_pre / phi_scale, a_post / phi_scale, a_res / phi_scale, b)
    _, _, u, r = check_forward(cuemu, H, params)
    dalpha, dbeta = make_grads(lead, n, dtype=dtype, device="cpu")
    check_backward(cuemu, H, params, dalpha, dbeta, u, r)


@pytest.mark.parametrize("seed", range(4))
def test_bf16_parameter_gradients_accuracy(cuemu, poisoned, seed):
    """Sums over tokens of products with z (da_*, db: fp32 outputs, floor 1e-5) see the
    projection's error directly: with phi as bf16 hi + lo only (2^-17) da_post was
    1.117e-5 off against a bound of 1.113e-5 here."""
    torch.manual_seed(seed)
    lead, n, d = (19,), 2, 129
    H = torch.randn(*lead, n, d).bfloat16()
    params = make_params(n, d, dtype=torch.bfloat16, device="cpu")
    _, _, u, r = check_forward(cuemu, H, params)
    dalpha, dbeta = make_grads(lead, n, dtype=torch.bfloat16, device="cpu")
    check_backward(cuemu, H, params, dalpha, dbeta, u, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parameters_in_other_dtypes(cuemu, poisoned, dtype):
    """bf16 parameters for fp32 / bf16 H and fp64 a_* scalars: the launcher converts
    them to the arithmetic dtype; the gradients come back in each parameter's dtype. A
    float64 gradient computed in float32 arithmetic gets float32's floor: da_pre is one
    scalar, and the float32 oracle's own error on it is sometimes a lucky few ulps
    (6 of 30 seeds put the kernel's over twice that, whatever its summation order)."""
    lead, n, d = (6,), 4, 48
    H = torch.randn(*lead, n, d).to(dtype)
    phi, a_pre, a_post, a_res, b = make_params(n, d, dtype=dtype, device="cpu")
    params = (phi.bfloat16(), a_pre.double(), a_post, a_res.bfloat16(), b.bfloat16())
    acc_params = [p.float() for p in params]
    alpha, beta, u, r = cuemu.mhc_coeffs_fwd(H, *params, *FLOATS)
    for name, got, lo, hi in zip(("alpha", "beta"), (alpha, beta), oracle(H, acc_params),
                                 oracle(*double((H,)), double(acc_params))):
        assert_policy(name, got, lo, hi)
    dalpha, dbeta = make_grads(lead, n, dtype=dtype, device="cpu")
    got = run_bwd(cuemu.mhc_coeffs_bwd, dalpha, dbeta, H, params, u, r, *FLOATS)
    low = oracle_bwd(dalpha, dbeta, H, acc_params)
    high = oracle_bwd(*double((dalpha, dbeta, H)), double(acc_params))
    for name, g, p, lo, hi in zip(GRAD_NAMES, got, (H, *params), low, high):
        assert g.dtype == p.dtype, name
        assert_policy(name, g, lo.to(g.dtype), hi, floor=FLOOR[torch.float32] if g.dtype == torch.float64 else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_tokens(cuemu, poisoned, dtype):
    H = torch.randn(0, 4, 40).to(dtype)
    params = make_params(4, 40, dtype=dtype, device="cpu")
    alpha, beta, u, r = cuemu.mhc_coeffs_fwd(H, *params, *FLOATS)
    assert alpha.shape == (0, 4, 5) and beta.shape == (0, 4) and u.shape == (0, 24) and r.shape == (0,)
    dalpha, dbeta = make_grads((0,), 4, dtype=dtype, device="cpu")
    dH, *grads = run_bwd(cuemu.mhc_coeffs_bwd, dalpha, dbeta, H, params, u, r, *FLOATS)
    assert dH.shape == H.shape
    for g, p in zip(grads, params):
        assert torch.equal(g, torch.zeros_like(p))


def test_single_token_without_lead_dims(cuemu, poisoned):
    """H of shape (n, d): one token, 0-dim r."""
    n, d = 4, 40
    H = torch.randn(n, d).bfloat16()
    params = make_params(n, d, dtype=torch.bfloat16, device="cpu")
    _, _, u, r = check_forward(cuemu, H, params)
    assert r.shape == ()
    dalpha, dbeta = make_grads((), n, dtype=torch.bfloat16, device="cpu")
    check_backward(cuemu, H, params, dalpha, dbeta, u, r)


