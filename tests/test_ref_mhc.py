"""Oracle tests for the mHC coefficients and Sinkhorn (crosslayer.ref.mhc), CPU only.

- forward against a literal per-token loop of the DESIGN.md formulas;
- Sinkhorn marginals, and the exact hand-derived backward against autograd (fp64,
  logits far from convergence) and finite differences;
- mhc_coeffs_bwd against autograd and finite differences;
- the structure of alpha / beta, and validator messages.
"""

import itertools

import pytest
import torch

import crosslayer.ref.hc as hc
import crosslayer.ref.mhc as mhc

from test_ref_hc import F64, TOL, rand


def mhc_params(n, d, grad=False):
    """Random phi (scaled so z = O(1)), a_* in [0.5, 1.5], b ~ N(0, 0.5²)."""
    m = n * n + 2 * n
    phi = rand(n * d, m, scale=1.0 / (n * d) ** 0.5, grad=grad)
    a = [(0.5 + torch.rand((), dtype=F64)).requires_grad_(grad) for _ in range(3)]
    b = rand(m, scale=0.5, grad=grad)
    return (phi, *a, b)


def autograd_grads(outputs, cotangents, inputs):
    loss = sum((o * c).sum() for o, c in zip(outputs, cotangents) if c is not None)
    grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, grads)]


def sinkhorn_loop(L, iters, eps):
    """Literal Sinkhorn on one n x n matrix, one entry at a time."""
    n = L.shape[0]
    P = torch.softmax(L, -1) + eps
    col = lambda P: torch.stack([P[:, k] / (sum(P[j, k] for j in range(n)) + eps)
                                 for k in range(n)], dim=1)
    row = lambda P: torch.stack([P[j] / (sum(P[j, k] for k in range(n)) + eps)
                                 for j in range(n)], dim=0)
    P = col(P)
    for _ in range(iters - 1):
        P = col(row(P))
    return P


# --------------------------------------------------------------------------- sinkhorn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_sinkhorn_marginals(dtype, n):
    """After 20 iterations the columns sum to 1 for any logits (the last step is a
    column normalisation: column sum = s/(s + eps)). The rows converge only as fast
    as Sinkhorn-Knopp does: within 1e-5 after 20 iterations for logits of scale
    <= 0.5 (the mHC regime: a_res = 0.01 at init), but NOT for scale 1 (row errors
    up to ~2e-3 at n = 2), 10 or 50 (~0.2; near one-hot softmax rows with the 1e-6
    floor converge very slowly). For those we check that the row error is finite
    and shrinks with more iterations, and that scale-1 logits converge by 300."""
    torch.manual_seed(n)
    for scale in (0.1, 0.5, 1.0, 10.0, 50.0):
        L = torch.randn(256, n, n, dtype=dtype) * scale
        P = mhc.sinkhorn(L)
        assert P.dtype == dtype and torch.isfinite(P).all() and (P > 0).all()
        col_err = (P.sum(-2) - 1).abs().max()
        assert col_err < 1e-5, (scale, col_err)
        row_err = (P.sum(-1) - 1).abs().amax(-1)
        if scale <= 0.5:
            assert row_err.max() < 1e-5, (scale, row_err.max())
        else:
            row_err_200 = (mhc.sinkhorn(L, iters=200).sum(-1) - 1).abs().amax(-1)
            assert (row_err_200 <= row_err + 1e-6).all()
    if dtype == F64:
        L = torch.randn(256, n, n, dtype=dtype)
        P = mhc.sinkhorn(L, iters=300)
        assert (P.sum(-1) - 1).abs().max() < 1e-5
        assert (P.sum(-2) - 1).abs().max() < 1e-5


@pytest.mark.parametrize("iters", [1, 2, 5])
def test_sinkhorn_matches_loop(iters):
    torch.manual_seed(iters)
    L = rand(2, 3, 3, scale=2.0)
    P = mhc.sinkhorn(L, iters=iters, eps=1e-3)
    for t in range(2):
        torch.testing.assert_close(P[t], sinkhorn_loop(L[t], iters, 1e-3), **TOL)


@pytest.mark.parametrize("iters", [1, 2, 20])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_sinkhorn_bwd_matches_autograd(iters, n):
    """Logits of scale 3 are far from convergence at these iteration counts, so the
    converged-point shortcut would fail here; the exact backward must not."""
    torch.manual_seed(10 * n + iters)
    for eps in (1e-6, 1e-2):
        L = rand(3, 5, n, n, scale=3.0, grad=True)
        P = mhc.sinkhorn(L, iters=iters, eps=eps)
        g = rand(*P.shape)
        (ref,) = autograd_grads((P,), (g,), (L,))
        got = mhc.sinkhorn_bwd(g, L, iters=iters, eps=eps)
        torch.testing.assert_close(got, ref, **TOL)


class SinkhornFn(torch.autograd.Function):
    """sinkhorn whose backward is the hand-derived sinkhorn_bwd."""

    @staticmethod
    def forward(ctx, L, iters, eps):
        ctx.save_for_backward(L)
        ctx.iters, ctx.eps = iters, eps
        return mhc.sinkhorn(L, iters, eps)

    @staticmethod
    def backward(ctx, dP):
        (L,) = ctx.saved_tensors
        return mhc.sinkhorn_bwd(dP, L, ctx.iters, ctx.eps), None, None


def test_gradcheck_sinkhorn():
    torch.manual_seed(0)
    L = rand(2, 3, 3, scale=2.0, grad=True)
    assert torch.autograd.gradcheck(lambda L: mhc.sinkhorn(L, 4, 1e-3), (L,))
    assert torch.autograd.gradcheck(lambda L: SinkhornFn.apply(L, 4, 1e-3), (L,))


# ------------------------------------------------------------------------- mhc_coeffs


def test_mhc_coeffs_match_loop():
    """Per token: one rms over the flattened n·d vector, z = r·(xf·phi), pre / post /
    comb in that order of z, comb = row-major view, placed as alpha[i,0] = pre_i,
    alpha[j,1+k] = comb[j,k], beta = post."""
    torch.manual_seed(1)
    lead, n, d = (2, 3), 3, 4
    eps, pre_eps, post_mult, iters, s_eps = 1e-6, 1e-3, 2.0, 7, 1e-4
    H = rand(*lead, n, d)
    phi, a_pre, a_post, a_res, b = mhc_params(n, d)
    alpha, beta = mhc.mhc_coeffs(H, phi, a_pre, a_post, a_res, b, eps=eps, pre_eps=pre_eps,
                                 post_mult=post_mult, iters=iters, sinkhorn_eps=s_eps)
    assert alpha.shape == (*lead, n, n + 1) and beta.shape == (*lead, n)
    for t in itertools.product(*(range(s) for s in lead)):
        xf = torch.cat([H[t][i] for i in range(n)])
        r = 1.0 / torch.sqrt((xf**2).sum() / (n * d) + eps)
        z = [r * (xf @ phi[:, j]) for j in range(n * n + 2 * n)]
        pre = [torch.sigmoid(a_pre * z[i] + b[i]) + pre_eps for i in range(n)]
        post = [post_mult * torch.sigmoid(a_post * z[n + k] + b[n + k]) for k in range(n)]
        logits = torch.stack([torch.stack([a_res * z[2 * n + j * n + k] + b[2 * n + j * n + k]
                                           for k in range(n)]) for j in range(n)])
        comb = sinkhorn_loop(logits, iters, s_eps)
        for i in range(n):
            torch.testing.assert_close(alpha[t][i, 0], pre[i], **TOL)
            torch.testing.assert_close(beta[t][i], post[i], **TOL)
        torch.testing.assert_close(alpha[t][:, 1:], comb, **TOL)


def test_mhc_coeffs_structure_and_mixing():
    """pre in (pre_eps, 1 + pre_eps), post in (0, post_mult), comb positive with unit
    column sums (and unit row sums for these moderate logits); the HC mixing ops then
    compute x = Σ_i pre_i·H_i and H'_k = post_k·y + Σ_j comb[j,k]·H_j."""
    torch.manual_seed(2)
    n, d, pre_eps, post_mult = 4, 9, 1e-6, 2.0
    H = torch.randn(5, 7, n, d)
    phi, a_pre, a_post, a_res, b = (p.float() for p in mhc_params(n, d))
    phi = phi * 0.3
    alpha, beta = mhc.mhc_coeffs(H, phi, a_pre, a_post, a_res, b)
    assert alpha.dtype == beta.dtype == torch.float32
    pre, comb = alpha[..., 0], alpha[..., 1:]
    assert (pre > pre_eps).all() and (pre < 1 + pre_eps).all()
    assert (beta > 0).all() and (beta < post_mult).all()
    assert (comb > 0).all()
    torch.testing.assert_close(comb.sum(-2), torch.ones_like(comb.sum(-2)), atol=1e-5, rtol=0)
    torch.testing.assert_close(comb.sum(-1), torch.ones_like(comb.sum(-1)), atol=1e-5, rtol=0)

    x = hc.stream_mix(H, pre)
    torch.testing.assert_close(x, torch.einsum("...i,...id->...d", pre, H))
    y = torch.randn(5, 7, d)
    H_new = hc.hc_post(H, y, alpha, beta)
    want = beta.unsqueeze(-1) * y.unsqueeze(-2) + torch.einsum("...jk,...jd->...kd", comb, H)
    torch.testing.assert_close(H_new, want)


@pytest.mark.parametrize("n,d", [(1, 1), (1, 7), (2, 33), (3, 7), (4, 5)])
def test_mhc_coeffs_bwd_matches_autograd(n, d):
    torch.manual_seed(10 * n + d)
    lead = (3, 5)
    kw = dict(eps=1e-6, pre_eps=1e-6, post_mult=2.0, iters=20, sinkhorn_eps=1e-6)
    H = rand(*lead, n, d, grad=True)
    params = mhc_params(n, d, grad=True)
    inputs = (H, *params)
    alpha, beta = mhc.mhc_coeffs(*inputs, **kw)
    dalpha, dbeta = rand(*alpha.shape), rand(*beta.shape)
    for da, db in ((dalpha, dbeta), (dalpha, None), (None, dbeta)):
        ref = autograd_grads((alpha, beta), (da, db), inputs)
        got = mhc.mhc_coeffs_bwd(da, db, *inputs, **kw)
        names = ["dH", "dphi", "da_pre", "da_post", "da_res", "db"]
        for name, g, r in zip(names, got, ref):
            torch.testing.assert_close(g, r, **TOL, msg=lambda m: f"{name}: {m}")


class MhcCoeffsFn(torch.autograd.Function):
    """mhc_coeffs whose backward is the hand-derived mhc_coeffs_bwd."""

    @staticmethod
    def forward(ctx, H, phi, a_pre, a_post, a_res, b, kw):
        ctx.save_for_backward(H, phi, a_pre, a_post, a_res, b)
        ctx.kw = kw
        return mhc.mhc_coeffs(H, phi, a_pre, a_post, a_res, b, **kw)

    @staticmethod
    def backward(ctx, dalpha, dbeta):
        return (*mhc.mhc_coeffs_bwd(dalpha, dbeta, *ctx.saved_tensors, **ctx.kw), None)


def test_gradcheck_mhc_coeffs():
    torch.manual_seed(3)
    kw = dict(iters=3, sinkhorn_eps=1e-3, pre_eps=1e-3)
    H = rand(2, 2, 3, grad=True)
    params = mhc_params(2, 3, grad=True)
    assert torch.autograd.gradcheck(lambda *a: mhc.mhc_coeffs(*a, **kw), (H, *params))
    assert torch.autograd.gradcheck(lambda *a: MhcCoeffsFn.apply(*a, kw), (H, *params))


# ------------------------------------------------------------------------- validators


def test_validators_name_the_argument():
    n, d = 3, 4
    H = torch.randn(2, n, d)
    phi, a_pre, a_post, a_res, b = (p.float() for p in mhc_params(n, d))
    m = n * n + 2 * n

    with pytest.raises(ValueError, match=r"logits must have shape \(\.\.\., n, n\), got \(2, 3, 4"):
        mhc.sinkhorn(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"logits must be n x n with 1 <= n <= 16, got n = 17"):
        mhc.sinkhorn(torch.randn(17, 17))
    with pytest.raises(ValueError, match=r"iters must be >= 1, got 0"):
        mhc.sinkhorn(torch.randn(3, 3), iters=0)
    with pytest.raises(TypeError, match=r"iters must be an int, got float"):
        mhc.sinkhorn(torch.randn(3, 3), iters=2.0)
    with pytest.raises(TypeError, match=r"logits must have dtype .* got torch.int64"):
        mhc.sinkhorn(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"dP must have shape \(3, 3\)"):
        mhc.sinkhorn_bwd(torch.randn(3, 4), torch.randn(3, 3))

    with pytest.raises(ValueError, match=r"H must have 1 to 16 streams.*n = 17"):
        mhc.mhc_coeffs(torch.randn(2, 17, d), phi, a_pre, a_post, a_res, b)
    with pytest.raises(ValueError, match=rf"phi must have shape \(12, {m}\).*got \(12, {m - 1}\)"):
        mhc.mhc_coeffs(H, phi[:, 1:], a_pre, a_post, a_res, b)
    with pytest.raises(ValueError, match=rf"b must have shape \({m}\).*got \({m + 1},\)"):
        mhc.mhc_coeffs(H, phi, a_pre, a_post, a_res, torch.zeros(m + 1))
    with pytest.raises(ValueError, match=r"a_post must be a 0-dim tensor, got shape \(3,\)"):
        mhc.mhc_coeffs(H, phi, a_pre, torch.ones(3), a_res, b)
    with pytest.raises(TypeError, match=r"a_res must be a float or a 0-dim .* got NoneType"):
        mhc.mhc_coeffs(H, phi, a_pre, a_post, None, b)
    with pytest.raises(TypeError, match=r"phi must have dtype .* got torch.int64"):
        mhc.mhc_coeffs(H, phi.long(), a_pre, a_post, a_res, b)
    with pytest.raises(ValueError, match=r"iters must be >= 1"):
        mhc.mhc_coeffs(H, phi, a_pre, a_post, a_res, b, iters=0)
    with pytest.raises(ValueError, match=r"dalpha must have shape \(2, 3, 4\)"):
        mhc.mhc_coeffs_bwd(torch.randn(n, n + 1), None, H, phi, a_pre, a_post, a_res, b)
    with pytest.raises(ValueError, match=r"phi is on cpu but H is on meta"):
        mhc.validate_mhc_coeffs(H.to("meta"), phi, a_pre, a_post, a_res, b)


def test_mhc_boundary_bwd_matches_autograd():
    """The boundary's hand-derived backward (the pre's dH terms and the mix's dots added to
    the later gradient of H', then hc_post's backward) against autograd through
    ref.mhc_boundary, float64, per-token and static post coefficients."""
    from crosslayer import ref

    torch.manual_seed(0)
    n, d, lead = 3, 5, (2, 3)
    for static in (False, True):
        coef = () if static else lead
        H = torch.randn(*lead, n, d, dtype=torch.float64, requires_grad=True)
        y = torch.randn(*lead, d, dtype=torch.float64, requires_grad=True)
        alpha = torch.randn(*coef, n, n + 1, dtype=torch.float64, requires_grad=True)
        beta = torch.randn(*coef, n, dtype=torch.float64, requires_grad=True)
        phi = (torch.randn(n * d, n * n + 2 * n, dtype=torch.float64) / 3).requires_grad_(True)
        a = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (0.7, 1.1, 0.9)]
        b = torch.randn(n * n + 2 * n, dtype=torch.float64, requires_grad=True)
        inputs = [H, y, alpha, beta, phi, *a, b]
        outs = ref.mhc_boundary(*inputs, iters=5)
        douts = [torch.randn_like(o) for o in outs]
        want = torch.autograd.grad(outs, inputs, douts)
        got = ref.mhc_boundary_bwd(*douts, *inputs, iters=5)
        for k, (g, w) in enumerate(zip(got, want)):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=f"gradient {k}")
