"""depth_aggregate_qkv_norm (oracle and fused op) and DenseFormer's strided-slot path.

CPU tests (run everywhere): the oracle's hand-derived backward against autograd in
float64 and gradcheck; the oracle against an independent composition (depth_aggregate
then F.rms_norm); the custom ops' registration
(schema, fake, autograd, mutation) matches the oracle through the CPU path; bad input raises clear errors; DenseFormer slot selection and
identity init through ops.depth_aggregate.

GPU tests (marked `gpu`): the fused kernels against the float64 oracle under
DESIGN.md's policy (tests/policy.py) for every dtype, d in {1, 7, 129, 2048, 4099}, l in
{1, 3, 25, 128}, static and per-token weights, strided slots, poisoned outputs, dS
written and accumulated, the shared-memory and global-workspace paths, gradcheck; and
depth_aggregate on DenseFormer's strided slot views without a copy.

The checks every op shares (oracle agreement on every backend, opcheck, torch.compile,
CUDA graphs, the current stream, determinism, the launchers' messages) run over every
op in tests/test_contract.py; this file keeps what only this op has.
"""

import pytest
import torch
import torch.nn.functional as F

from crosslayer import ops, ref
from crosslayer.ref.mudd import mudd_init_weights, qkv_norm_bwd_y
from crosslayer.ops.depth_aggregate_qkv_norm import depth_aggregate_qkv_norm_bwd_op, depth_aggregate_qkv_norm_op
from op_specs import depth_slots
from policy import TERMS_FLOOR, accumulated, assert_policy, oracle_pair, poison_allocator

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
F64 = torch.float64
EPS = 1e-6


def make_inputs(l, tok, d, *, dtype, device, static=False, layout="contiguous"):
    """S (l, *tok, d) in one of several layouts, A (*tok, 4, l) or (4, l), g (3, d)."""
    S = depth_slots(l, tok, d, dtype, device, layout)
    wdt = F64 if dtype == F64 else torch.float32  # weights: float32, float64 with float64 S
    A = torch.randn((4, l) if static else (*tok, 4, l), device=device, dtype=wdt)
    g = 1 + 0.5 * torch.randn(3, d, device=device, dtype=wdt)
    return S, A, g


def flat(S, A):
    """(l, N, d) and (N, 4, l) / (4, l) views for the custom ops."""
    l, d = S.shape[0], S.shape[-1]
    return S.reshape(l, -1, d), A if A.dim() == 2 else A.reshape(-1, 4, l)


# --------------------------------------------------------------------------- CPU: oracle


@pytest.mark.parametrize("static", [False, True])
def test_oracle_backward_matches_autograd(static):
    S, A, g = make_inputs(5, (3, 4), 7, dtype=F64, device="cpu", static=static)
    S.requires_grad_(True)
    A.requires_grad_(True)
    g.requires_grad_(True)
    out = ref.depth_aggregate_qkv_norm(S, A, g, EPS)
    dOut = torch.randn_like(out)
    out.backward(dOut)
    dS, dA, dg = ref.depth_aggregate_qkv_norm_bwd(dOut, S.detach(), A.detach(), g.detach(), EPS)
    torch.testing.assert_close(dS, S.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dA, A.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dg, g.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("static", [False, True])
def test_oracle_gradcheck(static):
    S, A, g = make_inputs(3, (2, 3), 5, dtype=F64, device="cpu", static=static)
    args = (S.requires_grad_(True), A.requires_grad_(True), g.requires_grad_(True))
    assert torch.autograd.gradcheck(lambda *a: ref.depth_aggregate_qkv_norm(*a, eps=EPS), args)


def test_oracle_is_aggregate_then_rms_norm():
    S, A, g = make_inputs(4, (6,), 9, dtype=F64, device="cpu")
    out = ref.depth_aggregate_qkv_norm(S, A, g, EPS)
    Y = ref.depth_aggregate(S, A)
    for c in range(3):
        torch.testing.assert_close(out[c], F.rms_norm(Y[c], (9,), g[c], eps=EPS))
    torch.testing.assert_close(out[3], Y[3], rtol=0, atol=0)


def test_oracle_identity_start_normalises_newest_slot():
    """MUDD init (bias one-hot on the newest slot): q, k, v = rms_norm(S_{l-1})·g, r = S_{l-1}."""
    S, _, g = make_inputs(3, (5,), 8, dtype=F64, device="cpu")
    _, _, bias = mudd_init_weights(8, 3, 4, 16, dtype=F64)
    out = ref.depth_aggregate_qkv_norm(S, bias, g, EPS)
    for c in range(3):
        torch.testing.assert_close(out[c], F.rms_norm(S[-1], (8,), g[c], eps=EPS))
    torch.testing.assert_close(out[3], S[-1], rtol=0, atol=0)


def test_oracle_low_precision_returns_activation_dtype():
    S, A, g = make_inputs(3, (4,), 8, dtype=torch.bfloat16, device="cpu")
    out = ref.depth_aggregate_qkv_norm(S, A, g)
    assert out.dtype == torch.bfloat16 and out.shape == (4, 4, 8)
    dS, dA, dg = ref.depth_aggregate_qkv_norm_bwd(torch.randn(4, 4, 8).to(torch.bfloat16), S, A, g)
    assert dS.dtype == torch.bfloat16 and dA.dtype == torch.float32 and dg.dtype == torch.float32


# --------------------------------------------------------------------------- CPU: op


@pytest.mark.parametrize("static", [False, True])
def test_custom_op_gradients_match_oracle_cpu(static):
    S, A, g = make_inputs(3, (6,), 5, dtype=F64, device="cpu", static=static)
    args = [t.clone().requires_grad_(True) for t in (S, A, g)]
    out, rstd = depth_aggregate_qkv_norm_op(*args, EPS)
    torch.testing.assert_close(out, ref.depth_aggregate_qkv_norm(S, A, g, EPS))
    Y = ref.depth_aggregate(S, A)[:3]
    torch.testing.assert_close(rstd, torch.rsqrt(Y.square().mean(-1) + EPS))
    dOut = torch.randn_like(out)
    out.backward(dOut)
    for got, want in zip((a.grad for a in args), ref.depth_aggregate_qkv_norm_bwd(dOut, S, A, g, EPS)):
        torch.testing.assert_close(got, want)


def test_custom_op_bwd_accumulates_cpu():
    S, A, g = make_inputs(3, (5,), 4, dtype=F64, device="cpu")
    _, rstd = depth_aggregate_qkv_norm_op(S, A, g, EPS)
    dOut = torch.randn(4, 5, 4, dtype=F64)
    dS0 = torch.randn(3, 5, 4, dtype=F64)
    dS = dS0.clone()
    dA, dg = depth_aggregate_qkv_norm_bwd_op(dOut, S.unbind(0), A, g, rstd, dS, True, EPS)
    want_dS, want_dA, want_dg = ref.depth_aggregate_qkv_norm_bwd(dOut, S, A, g, EPS)
    torch.testing.assert_close(dS, dS0 + want_dS)
    torch.testing.assert_close(dA, want_dA)
    torch.testing.assert_close(dg, want_dg)


@pytest.mark.parametrize(
    "S_shape, A_shape, g_shape, exc, match",
    [
        ((3, 4, 8), (4, 3, 3), (3, 8), ValueError, r"A must have C = 4 ways"),
        ((3, 4, 8), (2, 3), (3, 8), ValueError, r"A must have C = 4 ways"),
        ((3, 4, 8), (4, 4, 2), (3, 8), ValueError, r"A must have shape"),
        ((3, 4, 8), (4, 4, 3), (4, 8), ValueError, r"norm_weights must have shape \(3, 8\)"),
        ((3, 4, 8), (4, 4, 3), (3, 7), ValueError, r"norm_weights must have shape"),
        ((129, 2, 4), (4, 129), (3, 4), ValueError, r"S must have 1 to 128"),
        ((3, 8), (4, 3), (3, 8), ValueError, r"S must have shape \(l, \*tok, d\)"),
    ],
)
def test_bad_shapes_raise(S_shape, A_shape, g_shape, exc, match):
    with pytest.raises(exc, match=match):
        ops.depth_aggregate_qkv_norm(torch.randn(S_shape), torch.randn(A_shape), torch.randn(g_shape))


def test_bad_dtypes_raise():
    with pytest.raises(TypeError, match=r"norm_weights must have dtype"):
        ops.depth_aggregate_qkv_norm(torch.randn(3, 4, 8), torch.randn(4, 3), torch.ones(3, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"S must have dtype"):
        ops.depth_aggregate_qkv_norm(torch.ones(3, 4, 8, dtype=torch.int32), torch.randn(4, 3), torch.ones(3, 8))


def test_oracle_bwd_rejects_bad_dout():
    S, A, g = make_inputs(3, (4,), 8, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match=r"dOut must have shape \(4, 4, 8\)"):
        ref.depth_aggregate_qkv_norm_bwd(torch.randn(3, 4, 8), S, A, g)


# --------------------------------------------------------------------------- CPU: DenseFormer


@pytest.mark.parametrize("dilation, period", [(1, 1), (2, 1), (3, 2), (4, 5)])
def test_dwa_strided_slots_identity_start_cpu(dilation, period):
    """S_full[dwa_slots(i, k, p)] is a view of the stack (no copy) and with
    dwa_init_weights the aggregate is the newest slot, through the public op."""
    L, tok, d = 11, (2, 3), 5
    S_full = torch.randn(L + 1, *tok, d, dtype=F64)
    for i in range(L):
        slots = ref.dwa_slots(i, dilation, period)
        if (i + 1) % period != 0:
            assert slots is None
            continue
        S = S_full[slots]
        assert S.data_ptr() == S_full[slots.start].data_ptr() and S._base is S_full
        assert S.stride(0) == dilation * S_full.stride(0)
        w = ref.dwa_init_weights(i, dilation, F64)
        assert w.shape == (1, S.shape[0])
        Y = ops.depth_aggregate(S, w)
        torch.testing.assert_close(Y[0], S_full[i + 1], rtol=0, atol=0)
        A = torch.randn_like(w)
        torch.testing.assert_close(ops.depth_aggregate(S, A), ref.depth_aggregate(S_full[slots].contiguous(), A))


# --------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu


@pytest.fixture
def cuda(gpu_device):
    return gpu_device("depth_aggregate_qkv_norm")


def tok_for(l, d):
    """Token dims for a shape: odd counts, fewer tokens for big slots × features."""
    if l * d >= 100_000:
        return (5,)
    if d >= 129:
        return (3, 13)
    return (37,)


SHAPES = [(l, d) for l in (1, 3, 25, 128) for d in (1, 7, 129, 2048, 4099)]


def fwd_oracle(S, A, g, eps=EPS):
    return ref.depth_aggregate_qkv_norm(S, A, g, eps)


def eps_for(d):
    """RMSNorm over d = 1 feature is y·g/sqrt(y² + eps): near y = 0 it amplifies the
    rounding error of y by up to 1/sqrt(eps), and the policy's 2× bound would measure
    that conditioning, not the kernel. The d = 1 cases use a larger eps."""
    return EPS if d > 1 else 0.1


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("static", [False, True])
def test_forward_matches_oracle(cuda, dtype, shape, static):
    l, d = shape
    S, A, g = make_inputs(l, tok_for(l, d), d, dtype=dtype, device=cuda, static=static)
    eps = eps_for(d)
    poison_allocator(cuda)
    out = ops.depth_aggregate_qkv_norm(S, A, g, eps)
    assert_policy("Out", out, *oracle_pair(lambda *t: fwd_oracle(*t, eps), S, A, g))
    _, rstd = depth_aggregate_qkv_norm_op(*flat(S, A), g, eps)
    Y = ref.depth_aggregate(*[t.double() for t in flat(S, A)])[:3]
    want = torch.rsqrt(Y.square().mean(-1) + eps)
    torch.testing.assert_close(rstd.double(), want, rtol=1e-4 if dtype != F64 else 1e-10, atol=0)


def dy_terms(dOut, S, A, g, eps):
    """The magnitude of dY's terms before they cancel, float64: dY_n = r·z − k·Y_n with
    z = g·dOut_n and k·Y_n = r·Ŷ·mean(z·Ŷ) (Ŷ = r·Y_n) has |terms| r·|z| + r·|Ŷ|·mean|z·Ŷ|;
    dY_3 = dOut_3. (Measured after the cancellation, |dY| would understate them: for
    d = 1, dY_n = r·z·(1 − Ŷ²) = r³·z·eps, and every association rounds r·z and Ŷ².)"""
    S, A, g, dO = S.double(), A.double(), g.double(), dOut.double()
    Y = ref.depth_aggregate(S, A)[:3]
    r = torch.rsqrt(Y.square().mean(-1, keepdim=True) + eps)
    Yh = (Y * r).abs()
    z = (g.view(3, *([1] * (Y.dim() - 2)), -1) * dO[:3]).abs()
    return torch.cat([r * (z + Yh * (z * Yh).mean(-1, keepdim=True)), dO[3:].abs()], 0)


def aggregate_rounding_twin(dOut, S, A, g, eps):
    """The fp64 oracle's dA with the aggregate Y moved by the bound on its rounding,
    l·2⁻⁵³·Σ_j |A_j·S_j| (recursive summation of l terms): how far two correct fp64
    evaluations that sum Y in different orders can be apart, to first order."""
    S, A, g, dO = S.double(), A.double(), g.double(), dOut.double()
    Y = ref.depth_aggregate(S, A) + S.shape[0] * 2.0**-53 * ref.depth_aggregate(S.abs(), A.abs())
    dY, _ = qkv_norm_bwd_y(dO, Y, g, eps)
    return ref.depth_aggregate_bwd(dY, S, A)[1]


def check_backward(dS, dA, dg, dOut, S, A, g, dS0, accumulate, eps):
    """dS (written, or added to dS0 when accumulate), dA and dg of a backward launcher
    under the policy, against the oracle at the inputs' dtype and in float64."""

    def oracle(dOut, S, A, g, dS0):
        dS_ref, dA_ref, dg_ref = ref.depth_aggregate_qkv_norm_bwd(dOut, S, A, g, eps)
        return (accumulated(dS0, dS_ref) if accumulate else dS_ref), dA_ref.to(A.dtype), dg_ref.to(g.dtype)

    low, high = oracle_pair(oracle, dOut, S, A, g, dS0)
    for name, got, lo, hi in zip(("dS", "dg"), (dS, dg), low[::2], high[::2]):
        assert_policy(name, got, lo, hi)
    # dA = <dY_c, S_j> sums terms that cancel (for l = 1, S_0 is parallel to Y and
    # <dY_n, Y_n> is ~0 by the norm's construction); the kernel forms it as
    # r·<z, S> − k·<Y, S>, another association of the same terms. In fp32 / fp64 its
    # floor is relative to their magnitude, the sum over the features (and tokens, for
    # static A) of the terms' |r·z·S| + |k·Y·S| (dy_terms); a 16-bit dA is bound by its
    # own rounding (the default).
    # In fp64 the oracle is the reference and has no lower-precision twin, but dA also
    # inherits the rounding of the aggregate Y, an l-term sum that the kernel and the
    # oracle associate differently (up to l·u·Σ|A·S| apart), which the norm's backward
    # passes on (about 3x for d = 1: dY = r³·z·eps) and the terms' floor does not cover
    # at l = 128: the oracle's error is taken as dA's change when Y moves by that much
    # (aggregate_rounding_twin).
    if dA.dtype in TERMS_FLOOR:
        terms = ref.depth_aggregate_bwd(dy_terms(dOut, S, A, g, eps), S.double().abs(), A.double())[1]
        low_dA = aggregate_rounding_twin(dOut, S, A, g, eps) if dA.dtype == torch.float64 else low[1]
        assert_policy("dA", dA, low_dA, high[1], floor=TERMS_FLOOR[dA.dtype],
                      scale=max(1.0, terms.abs().max().item()))
    else:
        assert_policy("dA", dA, low[1], high[1])


def check_backward_op(S3, A3, g, dtype, accumulate):
    l, N, d = S3.shape
    dev = S3.device
    eps = eps_for(d)
    _, rstd = depth_aggregate_qkv_norm_op(S3, A3, g, eps)
    dOut = torch.randn(4, N, d, device=dev).to(dtype)
    dS0 = torch.randn(l, N, d, device=dev).to(dtype)
    dS = dS0.clone() if accumulate else torch.full_like(dS0, float("nan"))
    poison_allocator(dev)
    dA, dg = depth_aggregate_qkv_norm_bwd_op(dOut, S3.unbind(0), A3, g, rstd, dS, accumulate, eps)
    check_backward(dS, dA, dg, dOut, S3, A3, g, dS0, accumulate, eps)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("accumulate", [False, True])
def test_backward_op_matches_oracle(cuda, dtype, shape, static, accumulate):
    l, d = shape
    S, A, g = make_inputs(l, tok_for(l, d), d, dtype=dtype, device=cuda, static=static)
    check_backward_op(*flat(S, A), g, dtype, accumulate)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_global_workspace_path(cuda, dtype):
    """d so large that the rows' stash and dg buffers leave shared memory for global
    workspaces (fp32 accumulators: 2·3·d·4 bytes > 227 KB in the backward, 3·d·4 in
    the forward)."""
    d = 12_007 if dtype != F64 else 6_007  # backward buffers global, forward's in smem
    S, A, g = make_inputs(3, (6,), d, dtype=dtype, device=cuda)
    out = ops.depth_aggregate_qkv_norm(S, A, g, EPS)
    assert_policy("Out", out, *oracle_pair(fwd_oracle, S, A, g))
    check_backward_op(*flat(S, A), g, dtype, False)
    d = 60_013 if dtype != F64 else 30_011  # the forward's stash global too
    S, A, g = make_inputs(2, (3,), d, dtype=dtype, device=cuda, static=True)
    out = ops.depth_aggregate_qkv_norm(S, A, g, EPS)
    assert_policy("Out", out, *oracle_pair(fwd_oracle, S, A, g))
    check_backward_op(*flat(S, A), g, dtype, True)


# --------------------------------------------------------------------------- GPU: DenseFormer


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dilation, period", [(1, 1), (2, 1), (4, 5)])
def test_dwa_strided_slots_fused_without_copy(cuda, dtype, dilation, period):
    """ops.depth_aggregate(S_full[dwa_slots(i, k, p)], A_static) runs the kernel on the
    strided view: the only allocations are Y and the fp32 weights (a copy of the slots
    would add l·N·d elements), and it matches the oracle; identity init gives the
    newest slot; gradients reach the stack."""
    L, tok, d = 12, (3, 67), 520
    S_full = torch.randn(L + 1, *tok, d, device=cuda).to(dtype)
    N = tok[0] * tok[1]
    elt = S_full.element_size()
    for i in range(L):
        slots = ref.dwa_slots(i, dilation, period)
        if slots is None:
            continue
        S = S_full[slots]
        A = torch.randn(1, S.shape[0], device=cuda)
        allocator_stats = cuda.type == "cuda"  # not on the emulated tier (CPU tensors)
        if allocator_stats:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(cuda)
            before = torch.cuda.memory_allocated(cuda)
        Y = ops.depth_aggregate(S, A)
        if allocator_stats:
            torch.cuda.synchronize()
            extra = torch.cuda.max_memory_allocated(cuda) - before
            assert extra <= N * d * elt + (64 << 10), (extra, S.shape)  # Y only: a copy adds >= N·d·elt
        assert_policy("Y", Y, *oracle_pair(ref.depth_aggregate, S, A))
        w = ref.dwa_init_weights(i, dilation).to(cuda)
        torch.testing.assert_close(ops.depth_aggregate(S, w)[0], S_full[i + 1], rtol=0, atol=0)
    i = L - 1 if (L % period == 0) else period - 1
    slots = ref.dwa_slots(i, dilation, period)
    full = S_full.clone().requires_grad_(True)
    A = torch.randn(1, full[slots].shape[0], device=cuda, requires_grad=True)
    dY = torch.randn(1, *tok, d, device=cuda).to(dtype)
    ops.depth_aggregate(full[slots], A).backward(dY)
    dS_lo, dA_lo = ref.depth_aggregate_bwd(dY, S_full[slots], A.detach())
    dS_hi, dA_hi = ref.depth_aggregate_bwd(dY.double(), S_full[slots].double(), A.detach().double())
    assert_policy("dS", full.grad[slots], dS_lo, dS_hi)
    assert_policy("dA", A.grad, dA_lo.to(A.dtype), dA_hi)  # dA in A's dtype (fp32 A with fp64 slots)
    untouched = torch.ones(L + 1, dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(full.grad[untouched.to(cuda)], torch.zeros_like(full.grad[untouched.to(cuda)]))
