"""CPU tests of the MUDD / DenseFormer oracle (crosslayer.ref.mudd).

The hand-derived backward formulas are checked against autograd through the forward
in float64 and with gradcheck; the forward against an explicit loop; the slot
selection against brute force; and the identity init against a plain residual stream.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from crosslayer.ref.mudd import (
    depth_aggregate,
    depth_aggregate_bwd,
    dwa_init_weights,
    dwa_slots,
    mudd_init_weights,
    mudd_weights,
    mudd_weights_bwd,
)
from crosslayer.contracts import validate_depth_aggregate, validate_mudd_weights

F64 = torch.float64


def make_stack(l, tok, d, layout, dtype=F64):
    """S: (l, *tok, d) in one of three memory layouts (all hold fresh random data)."""
    if layout == "contiguous":
        return torch.randn(l, *tok, d, dtype=dtype)
    if layout == "every_other_slot":
        full = torch.randn(2 * l + 1, *tok, d, dtype=dtype)
        S = full[1::2]
        assert not S.is_contiguous() or l == 1
        return S
    if layout == "tokens_transposed":
        base = torch.randn(*reversed(tok), l, d, dtype=dtype)
        S = base.permute(len(tok), *reversed(range(len(tok))), len(tok) + 1)
        assert S.shape == (l, *tok, d) and S.stride(-1) == 1
        return S
    raise AssertionError(layout)


def make_weights(tok, C, l, static, strided, dtype=F64):
    if static:
        A = torch.randn(l, C, dtype=dtype).t() if strided else torch.randn(C, l, dtype=dtype)
    else:
        A = torch.randn(*tok, l, C, dtype=dtype).transpose(-1, -2) if strided else torch.randn(*tok, C, l, dtype=dtype)
    return A


def aggregate_loop(S, A):
    """Independent forward: explicit loops over ways and slots, in float64."""
    l, C = S.shape[0], A.shape[-2]
    Y = torch.zeros(C, *S.shape[1:], dtype=F64)
    for c in range(C):
        for j in range(l):
            w = A[c, j] if A.dim() == 2 else A[..., c, j].unsqueeze(-1)
            Y[c] += w.to(F64) * S[j].to(F64)
    return Y


# ---------------------------------------------------------------------------
# depth_aggregate
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "every_other_slot", "tokens_transposed"])
def test_depth_aggregate_matches_loop(dtype, static, layout):
    tok, d, l, C = (3, 5), 129, 13, 4
    S = make_stack(l, tok, d, layout, dtype)
    A = make_weights(tok, C, l, static, strided=layout != "contiguous", dtype=torch.float32)
    Y = depth_aggregate(S, A)
    assert Y.shape == (C, *tok, d) and Y.dtype == dtype
    ref = aggregate_loop(S, A)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(Y.to(F64), ref.to(dtype).to(F64), atol=tol, rtol=tol)


@pytest.mark.parametrize("tok", [(3, 5), (7,)])
@pytest.mark.parametrize("d", [1, 7, 129])
@pytest.mark.parametrize("l", [1, 3, 13])
@pytest.mark.parametrize("C", [1, 4])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "every_other_slot", "tokens_transposed"])
def test_depth_aggregate_bwd_matches_autograd(tok, d, l, C, static, layout):
    S = make_stack(l, tok, d, layout).requires_grad_()
    A = make_weights(tok, C, l, static, strided=layout != "contiguous").requires_grad_()
    Y = depth_aggregate(S, A)
    dY = torch.randn_like(Y)
    dS_ref, dA_ref = torch.autograd.grad(Y, (S, A), dY)
    dS, dA = depth_aggregate_bwd(dY, S.detach(), A.detach())
    assert dS.shape == S.shape and dS.dtype == S.dtype
    assert dA.shape == A.shape and dA.dtype == F64
    torch.testing.assert_close(dS, dS_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(dA, dA_ref, atol=1e-11, rtol=1e-12)


def test_depth_aggregate_bwd_dtypes():
    S = torch.randn(5, 4, 7, dtype=torch.bfloat16)
    A = torch.randn(4, 3, 5, dtype=torch.float16)
    dY = torch.randn(3, 4, 7, dtype=torch.bfloat16)
    dS, dA = depth_aggregate_bwd(dY, S, A)
    assert dS.dtype == torch.bfloat16 and dA.dtype == torch.float32
    dS64, dA64 = depth_aggregate_bwd(dY.double(), S.double(), A.double())
    torch.testing.assert_close(dS.double(), dS64, atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(dA.double(), dA64, atol=1e-5, rtol=1e-5)


class _DepthAggregateFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, S, A):
        ctx.save_for_backward(S, A)
        return depth_aggregate(S, A)

    @staticmethod
    def backward(ctx, dY):
        return depth_aggregate_bwd(dY, *ctx.saved_tensors)


@pytest.mark.parametrize("static", [False, True])
def test_depth_aggregate_gradcheck(static):
    tok, d, l, C = (2, 3), 3, 4, 2
    S = make_stack(l, tok, d, "every_other_slot").requires_grad_()
    A = make_weights(tok, C, l, static, strided=True).requires_grad_()
    assert torch.autograd.gradcheck(_DepthAggregateFn.apply, (S, A))


def test_depth_aggregate_meta_no_sync():
    S = torch.empty(5, 4, 6, 33, device="meta")
    A = torch.empty(4, 6, 3, 5, device="meta")
    validate_depth_aggregate(S, A)
    assert depth_aggregate(S, A).shape == (3, 4, 6, 33)
    dS, dA = depth_aggregate_bwd(torch.empty(3, 4, 6, 33, device="meta"), S, A)
    assert dS.shape == S.shape and dA.shape == A.shape


# ---------------------------------------------------------------------------
# mudd_weights
# ---------------------------------------------------------------------------


def make_mudd(tok, d, K, C, l, bias_2d, strided_x, dtype=F64):
    x = torch.randn(*tok, d, dtype=dtype) * torch.rand(*tok, 1, dtype=dtype).mul(3).add(0.1)
    if strided_x:
        x = x.permute(*reversed(range(len(tok))), len(tok)).contiguous()
        x = x.permute(*reversed(range(len(tok))), len(tok))
    W1 = torch.randn(d, K, dtype=dtype) / math.sqrt(d)
    W2 = torch.randn(K, C * l, dtype=dtype)
    bias = torch.randn(C, l, dtype=dtype) if bias_2d else torch.randn(C * l, dtype=dtype)
    return x, W1, W2, bias


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_mudd_weights_forward_layout(approximate):
    tok, d, K, C, l, eps = (3, 5), 7, 6, 4, 3, 1e-6
    x, W1, W2, bias = make_mudd(tok, d, K, C, l, True, False)
    A = mudd_weights(x, W1, W2, bias, C, eps=eps, approximate=approximate)
    assert A.shape == (*tok, C, l) and A.dtype == F64
    xn = x / torch.sqrt((x * x).sum(-1, keepdim=True) / d + eps)
    flat = F.gelu(xn @ W1, approximate=approximate) @ W2
    for c in range(C):
        for j in range(l):
            torch.testing.assert_close(A[..., c, j], flat[..., c * l + j] + bias[c, j], atol=1e-12, rtol=1e-12)
    A1 = mudd_weights(x, W1, W2, bias.reshape(-1), C, eps=eps, approximate=approximate)
    torch.testing.assert_close(A1, A, atol=0, rtol=0)
    other = mudd_weights(x, W1, W2, bias, C, eps=eps, approximate="tanh" if approximate == "none" else "none")
    assert not torch.allclose(other, A)


@pytest.mark.parametrize("tok", [(3, 5), (7,)])
@pytest.mark.parametrize("d", [1, 7, 129])
@pytest.mark.parametrize("l", [1, 3, 13])
@pytest.mark.parametrize("C", [1, 4])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("bias_2d", [False, True])
def test_mudd_weights_bwd_matches_autograd(tok, d, l, C, approximate, bias_2d):
    K = 11
    eps = 1e-5
    strided_x = bias_2d
    x, W1, W2, bias = make_mudd(tok, d, K, C, l, bias_2d, strided_x)
    args = [t.requires_grad_() for t in (x, W1, W2, bias)]
    A = mudd_weights(*args, C, eps=eps, approximate=approximate)
    dA = torch.randn_like(A)
    ref = torch.autograd.grad(A, args, dA)
    got = mudd_weights_bwd(dA, *(t.detach() for t in args), C, eps=eps, approximate=approximate)
    for name, g, r, t in zip(("dx", "dW1", "dW2", "dbias"), got, ref, args):
        assert g.shape == t.shape and g.dtype == F64, name
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-10, msg=name)


def test_mudd_weights_dtypes():
    x, W1, W2, bias = make_mudd((4, 3), 16, 8, 4, 5, True, False, dtype=torch.bfloat16)
    W1 = W1.half()
    A = mudd_weights(x, W1, W2, bias, 4)
    assert A.dtype == torch.float32
    dA = torch.randn(4, 3, 4, 5)
    dx, dW1, dW2, dbias = mudd_weights_bwd(dA, x, W1, W2, bias, 4)
    assert dx.dtype == torch.bfloat16
    assert dW1.dtype == dW2.dtype == dbias.dtype == torch.float32
    ref = mudd_weights_bwd(dA.double(), x.double(), W1.double(), W2.double(), bias.double(), 4)
    torch.testing.assert_close(dx.double(), ref[0], atol=2e-2, rtol=2e-2)
    for g, r in zip((dW1, dW2, dbias), ref[1:]):
        torch.testing.assert_close(g.double(), r, atol=1e-4, rtol=1e-4)


class _MuddWeightsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W1, W2, bias, n_ways, approximate):
        ctx.save_for_backward(x, W1, W2, bias)
        ctx.n_ways, ctx.approximate = n_ways, approximate
        return mudd_weights(x, W1, W2, bias, n_ways, approximate=approximate)

    @staticmethod
    def backward(ctx, dA):
        grads = mudd_weights_bwd(dA, *ctx.saved_tensors, ctx.n_ways, approximate=ctx.approximate)
        return (*grads, None, None)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_mudd_weights_gradcheck(approximate):
    x, W1, W2, bias = make_mudd((2, 3), 5, 4, 2, 3, True, True)
    args = tuple(t.requires_grad_() for t in (x, W1, W2, bias))
    assert torch.autograd.gradcheck(
        lambda *a: _MuddWeightsFn.apply(*a, 2, approximate), args
    )


def test_mudd_weights_meta_no_sync():
    x = torch.empty(4, 6, 33, device="meta")
    W1, W2, bias = (torch.empty(*s, device="meta") for s in ((33, 64), (64, 20), (4, 5)))
    validate_mudd_weights(x, W1, W2, bias, 4)
    A = mudd_weights(x, W1, W2, bias, 4)
    assert A.shape == (4, 6, 4, 5)
    grads = mudd_weights_bwd(torch.empty_like(A), x, W1, W2, bias, 4)
    assert [g.shape for g in grads] == [x.shape, W1.shape, W2.shape, bias.shape]


def test_mudd_init_weights():
    d, l, C, K = 256, 6, 4, 128
    W1, W2, bias = mudd_init_weights(d, l, C, K, generator=torch.Generator().manual_seed(0))
    assert W1.shape == (d, K) and W2.shape == (K, C * l) and bias.shape == (C, l)
    assert torch.count_nonzero(W2) == 0
    expected = torch.zeros(C, l)
    expected[:, -1] = 1
    assert torch.equal(bias, expected)
    assert abs(W1.var().item() * d - 1) < 0.05
    W1b, _, _ = mudd_init_weights(d, l, C, K, generator=torch.Generator().manual_seed(0))
    assert torch.equal(W1, W1b)
    W1h, W2h, bh = mudd_init_weights(8, 2, 1, 4, dtype=torch.float64)
    assert W1h.dtype == W2h.dtype == bh.dtype == F64


# ---------------------------------------------------------------------------
# DenseFormer slots
# ---------------------------------------------------------------------------


def test_dwa_slots_brute_force():
    for i in range(40):
        for k in range(1, 7):
            for p in range(1, 6):
                sl = dwa_slots(i, k, p)
                if (i + 1) % p != 0:
                    assert sl is None, (i, k, p)
                    continue
                expected = [j for j in range(i + 2) if j % k == (i + 1) % k]
                got = list(range(i + 2))[sl]
                assert got == expected, (i, k, p)
                assert len(got) == (i + 1 + k) // k
                assert got[-1] == i + 1
                w = dwa_init_weights(i, k)
                assert w.shape == (1, len(got)) and w[0, -1] == 1 and w.sum() == 1


def test_dwa_slots_view_of_stack():
    full = torch.randn(9, 3, 4)
    S = full[dwa_slots(5, 2, 3)]
    assert S.data_ptr() == full[0].data_ptr() and S.shape[0] == 4
    torch.testing.assert_close(S, full[torch.tensor([0, 2, 4, 6])])
    with pytest.raises(ValueError, match="dilation"):
        dwa_slots(3, 0)
    with pytest.raises(ValueError, match="block_index"):
        dwa_slots(-1)
    with pytest.raises(TypeError, match="period"):
        dwa_slots(3, 1, 1.5)


# ---------------------------------------------------------------------------
# Identity start: DenseFormer and MUDD at init reproduce the residual stream
# ---------------------------------------------------------------------------


def make_blocks(L, d):
    """L random nonlinear branch functions f_b(q, k, v); f_b(x, x, x) is a plain branch."""
    blocks = []
    for _ in range(L):
        Wq, Wk, Wv = (torch.randn(d, d, dtype=F64) / math.sqrt(d) for _ in range(3))
        blocks.append(lambda q, k, v, Wq=Wq, Wk=Wk, Wv=Wv: torch.tanh(q @ Wq) * torch.sigmoid(k @ Wk) + F.gelu(v @ Wv))
    return blocks


def residual_stream(emb, blocks):
    x = emb
    for f in blocks:
        x = x + f(x, x, x)
    return x


@pytest.mark.parametrize("dilation,period", [(1, 1), (2, 1), (2, 2), (3, 2), (4, 5)])
def test_denseformer_init_is_residual(dilation, period):
    L, tok, d = 10, (2, 3), 8
    blocks = make_blocks(L, d)
    emb = torch.randn(*tok, d, dtype=F64)
    stack = torch.full((L + 1, *tok, d), float("nan"), dtype=F64)
    stack[0] = emb
    x = emb
    dwa_count = 0
    for i, f in enumerate(blocks):
        stack[i + 1] = x + f(x, x, x)  # X_{i+1} = B_i(input), the block holds the residual
        x = stack[i + 1]
        slots = dwa_slots(i, dilation, period)
        if slots is not None:
            x = depth_aggregate(stack[slots], dwa_init_weights(i, dilation, F64))[0]
            dwa_count += 1
    assert dwa_count == L // period
    torch.testing.assert_close(x, residual_stream(emb, blocks), atol=1e-12, rtol=0)


def test_mudd_init_is_residual():
    L, tok, d, C, K = 6, (3, 4), 16, 4, 32
    gen = torch.Generator().manual_seed(1)
    blocks = make_blocks(L, d)
    emb = torch.randn(*tok, d, dtype=F64)
    stack = torch.full((L + 1, *tok, d), float("nan"), dtype=F64)
    stack[0] = emb
    q = k = v = r = emb
    for b, f in enumerate(blocks):
        stack[b + 1] = r + f(q, k, v)
        ways = 1 if b == L - 1 else C
        hidden = 4 * K if b == L - 1 else K
        W1, W2, bias = mudd_init_weights(d, b + 2, ways, hidden, dtype=F64, generator=gen)
        A = mudd_weights(stack[b + 1], W1, W2, bias, ways)
        assert torch.equal(A, bias.expand(*tok, ways, b + 2))
        Y = depth_aggregate(stack[: b + 2], A)
        if b == L - 1:
            out = Y[0]
        else:
            q, k, v, r = Y
    torch.testing.assert_close(out, residual_stream(emb, blocks), atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------
# Validation messages
# ---------------------------------------------------------------------------


def test_validate_depth_aggregate_messages():
    S = torch.randn(5, 3, 4, 7)
    validate_depth_aggregate(S, torch.randn(3, 4, 2, 5))
    validate_depth_aggregate(S, torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"^A must have shape \(3, 4, \*, 5\).*got \(3, 4, 2, 6\)"):
        validate_depth_aggregate(S, torch.randn(3, 4, 2, 6))
    with pytest.raises(ValueError, match=r"^A must have shape \(\*, 5\).*got \(2, 4\)"):
        validate_depth_aggregate(S, torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"^A must have shape \(3, 4, \*, 5\).*got \(4, 3, 2, 5\)"):
        validate_depth_aggregate(S, torch.randn(4, 3, 2, 5))
    with pytest.raises(ValueError, match=r"^A must have 2 dims .* or 4 dims"):
        validate_depth_aggregate(S, torch.randn(12, 2, 5))
    with pytest.raises(ValueError, match=r"^A must have C >= 1"):
        validate_depth_aggregate(S, torch.randn(0, 5))
    with pytest.raises(ValueError, match=r"^S must have 1 to 128 depth slots.*got 129"):
        validate_depth_aggregate(torch.randn(129, 2, 3), torch.randn(1, 129))
    with pytest.raises(TypeError, match=r"^S must have dtype.*got torch.int64"):
        validate_depth_aggregate(torch.ones(5, 3, 7, dtype=torch.int64), torch.randn(1, 5))
    with pytest.raises(TypeError, match=r"^A must have dtype.*got torch.int32"):
        validate_depth_aggregate(S, torch.ones(2, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"^S must have shape \(l, \*tok, d\).*got 1 dims"):
        validate_depth_aggregate(torch.randn(5), torch.randn(1, 5))
    with pytest.raises(ValueError, match=r"^S must have shape \(l, \*tok, d\).*got 2 dims"):
        validate_depth_aggregate(torch.randn(5, 7), torch.randn(1, 5))
    with pytest.raises(ValueError, match=r"^A is on meta but S is on cpu"):
        validate_depth_aggregate(S, torch.randn(2, 5, device="meta"))
    with pytest.raises(ValueError, match=r"^dY must have shape \(2, 3, 4, 7\)"):
        depth_aggregate_bwd(torch.randn(3, 3, 4, 7), S, torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"^A must have shape"):
        depth_aggregate(S, torch.randn(2, 4))


def test_validate_mudd_weights_messages():
    x, W1, W2, bias = make_mudd((3,), 7, 5, 4, 3, True, False, dtype=torch.float32)
    validate_mudd_weights(x, W1, W2, bias, 4)
    validate_mudd_weights(x, W1, W2, bias.reshape(-1), 4)
    with pytest.raises(ValueError, match=r"^W1 must have shape \(7, \*\).*got \(6, 5\)"):
        validate_mudd_weights(x, torch.randn(6, 5), W2, bias, 4)
    with pytest.raises(ValueError, match=r"^W2 must have shape \(5, \*\).*got \(4, 12\)"):
        validate_mudd_weights(x, W1, torch.randn(4, 12), bias, 4)
    with pytest.raises(ValueError, match=r"^W2 must have shape \(K, C\*l\) with C = n_ways = 5"):
        validate_mudd_weights(x, W1, W2, bias, 5)
    with pytest.raises(ValueError, match=r"^W2 must have shape .*l <= 128"):
        validate_mudd_weights(x, W1, torch.randn(5, 129), torch.randn(1, 129), 1)
    with pytest.raises(ValueError, match=r"^bias must have shape \(4, 3\).*got \(3, 4\)"):
        validate_mudd_weights(x, W1, W2, torch.randn(3, 4), 4)
    with pytest.raises(ValueError, match=r"^bias must have shape \(12\).*got \(13,\)"):
        validate_mudd_weights(x, W1, W2, torch.randn(13), 4)
    with pytest.raises(ValueError, match=r"^n_ways must be >= 1"):
        validate_mudd_weights(x, W1, W2, bias, 0)
    with pytest.raises(TypeError, match=r"^x must have dtype"):
        validate_mudd_weights(x.int(), W1, W2, bias, 4)
    with pytest.raises(ValueError, match=r"^x must have shape \(\*tok, d\)"):
        validate_mudd_weights(x[0], W1, W2, bias, 4)
    with pytest.raises(ValueError, match=r"^approximate must be"):
        mudd_weights(x, W1, W2, bias, 4, approximate="erf")
    with pytest.raises(ValueError, match=r"^dA must have shape \(3, 4, 3\)"):
        mudd_weights_bwd(torch.randn(3, 3, 4), x, W1, W2, bias, 4)
    with pytest.raises(ValueError, match=r"^W2 is on meta but x is on cpu"):
        validate_mudd_weights(x, W1, W2.to("meta"), bias, 4)
