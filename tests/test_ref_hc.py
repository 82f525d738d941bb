"""Oracle tests for the Hyper-Connections ops (crosslayer.ref.hc), CPU only.

- forward against a literal per-token loop of the DESIGN.md formulas;
- every hand-derived backward against autograd through the forward (fp64, odd shapes,
  random coefficients away from the init so the tanh and rms terms matter), and
  gradcheck of the hand-derived backward against finite differences;
- the paper's claims: the init is a pre-norm residual; sequential-parallel duality;
- validator messages.
"""

import itertools

import pytest
import torch

import crosslayer.ref.hc as hc

F64 = torch.float64
TOL = dict(rtol=1e-9, atol=1e-11)


def rand(*shape, scale=1.0, grad=False):
    t = torch.randn(*shape, dtype=F64) * scale
    return t.requires_grad_(grad)


def dhc_params(n, d, grad=False):
    """Random DHC parameters: A, B near the init plus noise, W so that p = O(1),
    s_a, s_b around 0.5 so the tanh terms carry real weight."""
    A0, B0 = hc.hc_init_static(n, 1, dtype=F64)
    A = (A0 + 0.3 * torch.randn(n, n + 1, dtype=F64)).requires_grad_(grad)
    B = (B0 + 0.3 * torch.randn(n, dtype=F64)).requires_grad_(grad)
    W = rand(d, n + 2, scale=1.5 / d**0.5, grad=grad)
    s_a = (0.5 + 0.1 * torch.randn((), dtype=F64)).requires_grad_(grad)
    s_b = (0.5 + 0.1 * torch.randn((), dtype=F64)).requires_grad_(grad)
    return A, B, W, s_a, s_b


def autograd_grads(outputs, cotangents, inputs):
    loss = sum((o * c).sum() for o, c in zip(outputs, cotangents) if c is not None)
    grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, grads)]


def rmsnorm(x, eps=1e-6):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


# ------------------------------------------------------------------------ forward


@pytest.mark.parametrize("dynamic", [False, True])
def test_hc_pre_and_post_forward_match_loop(dynamic):
    """hc_pre and hc_post against a per-token, per-stream loop of the formulas."""
    torch.manual_seed(0)
    lead, n, d, eps = (2, 3), 3, 5, 1e-6
    H = rand(*lead, n, d)
    y = rand(*lead, d)
    A, B, W, s_a, s_b = dhc_params(n, d)
    if not dynamic:
        W = s_a = s_b = None
    x, alpha, beta = hc.hc_pre(H, A, B, W, s_a, s_b, eps=eps)
    H_new = hc.hc_post(H, y, alpha, beta)
    for t in itertools.product(*(range(s) for s in lead)):
        Ht = H[t]
        if dynamic:
            a_t = torch.empty(n, n + 1, dtype=F64)
            b_t = torch.empty(n, dtype=F64)
            for i in range(n):
                r = 1.0 / torch.sqrt((Ht[i] ** 2).mean() + eps)
                p = r * (Ht[i] @ W)
                a_t[i] = A[i] + s_a * torch.tanh(p[: n + 1])
                b_t[i] = B[i] + s_b * torch.tanh(p[n + 1])
            torch.testing.assert_close(alpha[t], a_t, **TOL)
            torch.testing.assert_close(beta[t], b_t, **TOL)
        else:
            a_t, b_t = A, B
            assert torch.equal(alpha, A) and torch.equal(beta, B)
        x_t = sum(a_t[i, 0] * Ht[i] for i in range(n))
        torch.testing.assert_close(x[t], x_t, **TOL)
        for k in range(n):
            h_k = b_t[k] * y[t] + sum(a_t[i, 1 + k] * Ht[i] for i in range(n))
            torch.testing.assert_close(H_new[t][k], h_k, **TOL)


def test_stream_mix_forward_matches_loop():
    torch.manual_seed(1)
    H, w = rand(4, 3, 6), rand(4, 3)
    x = hc.stream_mix(H, w)
    for t in range(4):
        torch.testing.assert_close(x[t], sum(w[t, i] * H[t, i] for i in range(3)), **TOL)
    ws = rand(3)
    torch.testing.assert_close(hc.stream_mix(H, ws), hc.stream_mix(H, ws.expand(4, 3)), **TOL)


def test_dtypes_and_noncontiguous_streams():
    """Activations come back in H's dtype, coefficients in the arithmetic dtype; a
    strided stream dim gives the same result as a contiguous copy."""
    torch.manual_seed(2)
    n, d = 3, 7
    big = torch.randn(5, 2 * n, d)
    H = big[:, ::2]
    assert not H.is_contiguous()
    A, B, W, s_a, s_b = (t.float() for t in dhc_params(n, d))
    x, alpha, beta = hc.hc_pre(H, A, B, W, s_a, s_b)
    x_c, alpha_c, beta_c = hc.hc_pre(H.contiguous(), A, B, W, s_a, s_b)
    assert torch.equal(x, x_c) and torch.equal(alpha, alpha_c) and torch.equal(beta, beta_c)
    assert x.dtype == torch.float32 and alpha.dtype == torch.float32

    Hb = H.to(torch.bfloat16)
    xb, alphab, betab = hc.hc_pre(Hb, A, B, W, s_a, s_b)
    assert xb.dtype == torch.bfloat16 and alphab.dtype == torch.float32
    x64, alpha64, _ = hc.hc_pre(Hb.double(), A, B, W, s_a, s_b)
    torch.testing.assert_close(alphab.double(), alpha64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xb.double(), x64, rtol=1e-2, atol=1e-2)

    y = torch.randn(5, d, dtype=torch.bfloat16)
    out = hc.hc_post(Hb, y, alphab, betab)
    assert out.dtype == torch.bfloat16
    dH, dy, dalpha, dbeta = hc.hc_post_bwd(torch.randn_like(out), Hb, y, alphab, betab)
    assert dH.dtype == dy.dtype == torch.bfloat16
    assert dalpha.dtype == dbeta.dtype == torch.float32
    x_mixed, *_ = hc.hc_pre(H, A.double(), B, None)
    assert x_mixed.dtype == torch.float32


# --------------------------------------------------------------- backward vs autograd


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("d", [1, 7, 33])
def test_hc_pre_bwd_matches_autograd(dynamic, n, d):
    torch.manual_seed(100 * n + d + dynamic)
    lead = (3, 5)
    H = rand(*lead, n, d, grad=True)
    A, B, W, s_a, s_b = dhc_params(n, d, grad=True)
    args = (H, A, B, W, s_a, s_b) if dynamic else (H, A, B)
    x, alpha, beta = hc.hc_pre(*args)
    dx = rand(*lead, d)
    dalpha, dbeta = rand(*alpha.shape), rand(*beta.shape)
    ref = autograd_grads((x, alpha, beta), (dx, dalpha, dbeta), args)
    got = hc.hc_pre_bwd(dx, dalpha, dbeta, *args)
    if not dynamic:
        assert got[3:] == (None, None, None)
    for name, g, r in zip(["dH", "dA", "dB", "dW", "ds_a", "ds_b"], got, ref):
        torch.testing.assert_close(g, r, **TOL, msg=lambda m: f"{name}: {m}")

    ref = autograd_grads((x,), (dx,), args)
    got = hc.hc_pre_bwd(dx, None, None, *args)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, **TOL)


@pytest.mark.parametrize("alpha_static,beta_static",
                         [(False, False), (True, True), (True, False), (False, True)])
@pytest.mark.parametrize("n,d", [(1, 7), (2, 1), (3, 33), (4, 7)])
def test_hc_post_bwd_matches_autograd(alpha_static, beta_static, n, d):
    torch.manual_seed(10 * n + d + 2 * alpha_static + beta_static)
    lead = (3, 5)
    H, y = rand(*lead, n, d, grad=True), rand(*lead, d, grad=True)
    alpha = rand(*(() if alpha_static else lead), n, n + 1, grad=True)
    beta = rand(*(() if beta_static else lead), n, grad=True)
    out = hc.hc_post(H, y, alpha, beta)
    g = rand(*out.shape)
    ref = autograd_grads((out,), (g,), (H, y, alpha, beta))
    got = hc.hc_post_bwd(g, H, y, alpha, beta)
    assert got[2].shape == alpha.shape and got[3].shape == beta.shape
    assert torch.equal(got[2][..., 0], torch.zeros_like(got[2][..., 0]))
    for name, a, b in zip(["dH", "dy", "dalpha", "dbeta"], got, ref):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("n,d", [(1, 1), (2, 33), (3, 7), (4, 1)])
def test_stream_mix_bwd_matches_autograd(static, n, d):
    torch.manual_seed(7 * n + d + static)
    lead = (3, 5)
    H = rand(*lead, n, d, grad=True)
    w = rand(*(() if static else lead), n, grad=True)
    x = hc.stream_mix(H, w)
    g = rand(*x.shape)
    ref = autograd_grads((x,), (g,), (H, w))
    got = hc.stream_mix_bwd(g, H, w)
    assert got[1].shape == w.shape
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **TOL)


# ------------------------------------------------------------------------- gradcheck


class HcPreFn(torch.autograd.Function):
    """hc_pre (DHC) whose backward is the hand-derived hc_pre_bwd."""

    @staticmethod
    def forward(ctx, H, A, B, W, s_a, s_b):
        ctx.save_for_backward(H, A, B, W, s_a, s_b)
        return hc.hc_pre(H, A, B, W, s_a, s_b)

    @staticmethod
    def backward(ctx, dx, dalpha, dbeta):
        return hc.hc_pre_bwd(dx, dalpha, dbeta, *ctx.saved_tensors)


class HcPostFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, H, y, alpha, beta):
        ctx.save_for_backward(H, y, alpha, beta)
        return hc.hc_post(H, y, alpha, beta)

    @staticmethod
    def backward(ctx, dH_new):
        return hc.hc_post_bwd(dH_new, *ctx.saved_tensors)


class StreamMixFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, H, w):
        ctx.save_for_backward(H, w)
        return hc.stream_mix(H, w)

    @staticmethod
    def backward(ctx, dx):
        return hc.stream_mix_bwd(dx, *ctx.saved_tensors)


def test_gradcheck_hc_pre():
    torch.manual_seed(3)
    H = rand(2, 3, 4, grad=True)
    params = dhc_params(3, 4, grad=True)
    assert torch.autograd.gradcheck(hc.hc_pre, (H, *params))
    assert torch.autograd.gradcheck(HcPreFn.apply, (H, *params))


@pytest.mark.parametrize("static", [False, True])
def test_gradcheck_hc_post(static):
    torch.manual_seed(4)
    n = 3
    H, y = rand(2, n, 4, grad=True), rand(2, 4, grad=True)
    alpha = rand(*(() if static else (2,)), n, n + 1, grad=True)
    beta = rand(*(() if static else (2,)), n, grad=True)
    assert torch.autograd.gradcheck(hc.hc_post, (H, y, alpha, beta))
    assert torch.autograd.gradcheck(HcPostFn.apply, (H, y, alpha, beta))


@pytest.mark.parametrize("static", [False, True])
def test_gradcheck_stream_mix(static):
    torch.manual_seed(5)
    H = rand(2, 3, 4, grad=True)
    w = rand(*(() if static else (2,)), 3, grad=True)
    assert torch.autograd.gradcheck(hc.stream_mix, (H, w))
    assert torch.autograd.gradcheck(StreamMixFn.apply, (H, w))


# ------------------------------------------------------------------- paper claims


def make_branches(num, d, seed):
    """Nonlinear pre-norm branches f_l(x) = tanh(rmsnorm(x)·M_l)."""
    g = torch.Generator().manual_seed(seed)
    mats = [torch.randn(d, d, generator=g, dtype=F64) / d**0.5 for _ in range(num)]
    return [lambda x, M=M: torch.tanh(rmsnorm(x) @ M) for M in mats]


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_init_is_prenorm_residual(dynamic, n):
    """At the paper's init (HC §2.3) HC is a pre-norm residual network.

    Derivation. Init: alpha[:, 0] = e_m (m = layer index mod n), alpha[:, 1:] = I,
    beta = 1; for DHC also W = 0, so tanh(p) = 0 and alpha = A, beta = B exactly
    whatever s_a, s_b. Entry: H⁰_k = h⁰ for every k (expand_streams). If all streams
    equal h, the layer reads x = H_m = h, computes y = f(h), and writes
    H'_k = 1·y + Σ_i I[i,k]·H_i = h + f(h) into every stream. By induction every
    stream of Hˡ equals the pre-norm residual state hˡ, hˡ⁺¹ = hˡ + f_l(hˡ), whatever
    m is. Exit: reduce_streams(H^L) = n·h^L (the sum, not the mean, of n equal
    streams), and the final RMSNorm is scale invariant, so rmsnorm(n·h^L) equals
    rmsnorm(h^L) up to the norm's eps: the logits match the residual network's.
    Every coefficient is 0 or 1 here, so the per-stream equalities are exact.
    """
    torch.manual_seed(6)
    lead, d, L = (3, 5), 7, 2 * n + 1
    x0 = rand(*lead, d)
    branches = make_branches(L, d, seed=n)
    H = hc.expand_streams(x0, n)
    h = x0
    for layer, f in enumerate(branches):
        A, B = hc.hc_init_static(n, layer, dtype=F64)
        if dynamic:
            W = torch.zeros(d, n + 2, dtype=F64)
            x_in, alpha, beta = hc.hc_pre(H, A, B, W, 0.01, 0.01)
            assert torch.equal(alpha, A.expand_as(alpha)) and torch.equal(beta, B.expand_as(beta))
        else:
            x_in, alpha, beta = hc.hc_pre(H, A, B)
        assert torch.equal(x_in, h)
        H = hc.hc_post(H, f(x_in), alpha, beta)
        h = h + f(h)
    for k in range(n):
        assert torch.equal(H[..., k, :], h)
    out = hc.reduce_streams(H)
    torch.testing.assert_close(out, n * h, rtol=1e-14, atol=0)
    torch.testing.assert_close(rmsnorm(out), rmsnorm(h), rtol=1e-6, atol=1e-9)


# HC matrices in the paper's layout [[0, B], [A_m, A_r]] (row 0 = beta; row 1+i =
# [alpha[i, 0], alpha[i, 1:]]), n = 2.
#
# Sequential: HC_seq = [[0, 1, 1], [1, 1, 0], [0, 0, 1]] (the init): both streams track
# x -> x + F1(x) -> (.) + F2(.).
#
# Parallel (derived here for this package's H'_k = beta_k·y + Σ_i alpha[i,1+k]·H_i; the
# layer pair maps equal streams (x, x) back to equal streams, so the pattern repeats):
#   odd layer  HC_odd  = [[0, 1, 0], [1, 1, 0], [0, 0, 1]]: reads stream 0 = x, adds
#              F1(x) to stream 0 only, keeps stream 1 = x:      (x + F1(x), x)
#   even layer HC_even = [[0, 1, 1], [0, 1, 1], [1, 0, 0]]: reads stream 1 = x (the
#              same input as F1), and writes F2(x) + stream 0 into both streams:
#              (x + F1(x) + F2(x), x + F1(x) + F2(x)).
HC_SEQ = [[0, 1, 1], [1, 1, 0], [0, 0, 1]]
HC_ODD = [[0, 1, 0], [1, 1, 0], [0, 0, 1]]
HC_EVEN = [[0, 1, 1], [0, 1, 1], [1, 0, 0]]


def split_hc(m):
    m = torch.tensor(m, dtype=F64)
    return m[1:, :], m[0, 1:]


def run_static(x, mats, branches):
    H = hc.expand_streams(x, 2)
    for m, f in zip(mats, branches):
        A, B = split_hc(m)
        x_in, alpha, beta = hc.hc_pre(H, A, B)
        H = hc.hc_post(H, f(x_in), alpha, beta)
    return H


def test_sequential_parallel_duality():
    """HC §3: with n = 2, static HC matrices arrange layers in sequence or in parallel."""
    torch.manual_seed(8)
    d = 9
    x = rand(4, d)
    F = make_branches(4, d, seed=123)

    H = run_static(x, [HC_SEQ] * 4, F)
    seq = x
    for f in F:
        seq = seq + f(seq)
    torch.testing.assert_close(H[..., 0, :], seq, **TOL)
    torch.testing.assert_close(H[..., 1, :], seq, **TOL)

    H = run_static(x, [HC_ODD, HC_EVEN] * 2, F)
    par = x + F[0](x) + F[1](x)
    par = par + F[2](par) + F[3](par)
    torch.testing.assert_close(H[..., 0, :], par, **TOL)
    torch.testing.assert_close(H[..., 1, :], par, **TOL)
    assert (par - seq).abs().max() > 1e-2


# ------------------------------------------------------------------------- validators


def test_validators_name_the_argument():
    n, d = 3, 5
    H = torch.randn(2, n, d)
    A, B = hc.hc_init_static(n, 0)
    W = torch.zeros(d, n + 2)
    y = torch.randn(2, d)

    with pytest.raises(ValueError, match=r"H must have 1 to 16 streams.*n = 17"):
        hc.hc_pre(torch.randn(2, 17, d), torch.zeros(17, 18), torch.ones(17))
    with pytest.raises(ValueError, match=r"H must have 1 to 16 streams.*n = 0"):
        hc.stream_mix(torch.randn(2, 0, d), torch.ones(0))
    with pytest.raises(ValueError, match=r"H must have shape \(\.\.\., n, d\)"):
        hc.hc_pre(torch.randn(d), A, B)
    with pytest.raises(ValueError, match=r"A must have shape \(3, 4\).*got \(3, 3\)"):
        hc.hc_pre(H, torch.zeros(n, n), B)
    with pytest.raises(ValueError, match=r"B must have shape \(3\).*got \(4,\)"):
        hc.hc_pre(H, A, torch.ones(n + 1))
    with pytest.raises(ValueError, match=r"W must have shape \(5, 5\).*got \(5, 4\)"):
        hc.hc_pre(H, A, B, torch.zeros(d, n + 1), 0.01, 0.01)
    with pytest.raises(ValueError, match=r"s_a is required"):
        hc.hc_pre(H, A, B, W)
    with pytest.raises(ValueError, match=r"s_b must be a 0-dim tensor, got shape \(1,\)"):
        hc.hc_pre(H, A, B, W, 0.01, torch.ones(1))
    with pytest.raises(TypeError, match=r"s_a must be a float"):
        hc.hc_pre(H, A, B, W, "0.01", 0.01)
    with pytest.raises(TypeError, match=r"H must have dtype .* got torch.int64"):
        hc.hc_pre(torch.ones(2, n, d, dtype=torch.int64), A, B)
    with pytest.raises(TypeError, match=r"A must have dtype .* got torch.int32"):
        hc.hc_pre(H, A.int(), B)
    with pytest.raises(TypeError, match=r"A must be a torch.Tensor, got list"):
        hc.hc_pre(H, [[1.0]], B)
    with pytest.raises(ValueError, match=r"dx must have shape \(2, 5\).*got \(2, 4\)"):
        hc.hc_pre_bwd(torch.randn(2, d - 1), None, None, H, A, B)
    with pytest.raises(ValueError, match=r"dalpha must have shape \(2, 3, 4\)"):
        hc.hc_pre_bwd(torch.randn(2, d), torch.randn(n, n + 1), None, H, A, B, W, 0.1, 0.1)

    with pytest.raises(ValueError, match=r"y must have shape \(2, 5\).*got \(2, 4\)"):
        hc.hc_post(H, torch.randn(2, d - 1), A, B)
    with pytest.raises(ValueError, match=r"alpha must have shape \(2, 3, 4\).*\(3, 4\) \(static\)"):
        hc.hc_post(H, y, torch.zeros(2, n, n), B)
    with pytest.raises(ValueError, match=r"beta must have shape \(2, 3\)"):
        hc.hc_post(H, y, A, torch.ones(3, n))
    with pytest.raises(ValueError, match=r"dH_new must have shape \(2, 3, 5\)"):
        hc.hc_post_bwd(torch.randn(2, n, d + 1), H, y, A, B)
    with pytest.raises(ValueError, match=r"w must have shape \(2, 3\).*got \(4,\)"):
        hc.stream_mix(H, torch.ones(n + 1))
    with pytest.raises(ValueError, match=r"dx must have shape"):
        hc.stream_mix_bwd(torch.randn(3, d), H, torch.ones(n))


def test_validators_check_devices():
    """Mixed devices are rejected (the meta device stands in for a GPU on CPU runs)."""
    n, d = 2, 4
    A, B = hc.hc_init_static(n, 0)
    H_meta = torch.empty(3, n, d, device="meta")
    with pytest.raises(ValueError, match=r"A is on cpu but H is on meta"):
        hc.validate_hc_pre(H_meta, A, B, None, None, None)
    with pytest.raises(ValueError, match=r"y is on cpu but H is on meta"):
        hc.validate_hc_post(H_meta, torch.randn(3, d), A.to("meta"), B.to("meta"))
    with pytest.raises(ValueError, match=r"w is on cpu but H is on meta"):
        hc.validate_stream_mix(H_meta, torch.ones(n))
