"""mudd_weights' CUDA launchers and kernels on the CPU emulator (tools/cuemu).

The launchers (csrc/mudd_weights.cu) and kernels (csrc/kernels/mudd_weights.cuh) run
unchanged on CPU tensors: bf16/fp16 x with d >= 32 take the tensor-core kernels
(mudd_weights_fwd_proj_kernel with W1 split hi + lo, mudd_weights_bwd_dx_kernel) around the head
kernels, fp32/fp64 x (and 16-bit x with d < 32) the at::mm paths around the same head
kernels. Each result (A, u, r; dx, dW1, dW2, dbias) is held to DESIGN.md's policy
against the oracle at the input dtype and in float64, outputs poisoned with NaN, on
the GPU tests' kinds of shapes scaled down for the emulator: every dtype, both GELU
forms, C in {1, 4}, l in {1, 3, 25}, K in {1, 3, 5, 24, 40, 64, 128, 130, 200} (> 128:
two projection column passes), d in {1, 7, 33, 40, 64, 96, 129, 1031, 1032, 4099}
(the scalar and the 16-byte paths, chunk tails), N not a multiple of the 16-token warp
tile or the 8-token head tile, two proj blocks, head blocks taking a second tile;
token-strided, two- and three-dim-strided and misaligned x; fp16's dW1 scaling at small and
large gradients; small W1 (1e-2, 1e-4 of N(0, 1/d): fp16's W1 scaling in the projection,
which without it left A 0.8x and 70-115x of its bound); N = 2000 tokens at d = 32 (dW1,
dW2, dbias summed over many tokens), several seeds; 16-bit parameters; empty N; fp64 gradcheck through the emulated
launchers; the launchers' messages. What only a GPU shows (speed, streams, graphs,
cuBLAS) stays with the `gpu` tests in test_mudd_weights.py.
"""

import pytest
import torch

from crosslayer.ops.mudd_weights import split_dW2b
from policy import FLOOR, assert_policy
from test_mudd_weights import DTYPES, EPS, bwd_pair, check_forward, fwd_pair, make_dA, make_params, make_x

pytestmark = pytest.mark.cuemu

# (lead, d, K, C, l). Emulated mma.sync is slow: N·d·K stays small for the 16-bit dtypes.
SHAPES = [
    ((1,), 1, 5, 4, 3),  # d = 1: the fp32 path for 16-bit x too
    ((5,), 7, 1, 1, 1),  # K = 1
    ((37,), 129, 40, 4, 3),  # N = 37: a partial warp tile (tokens 32..36); scalar x loads
    ((3, 5), 1031, 24, 4, 25),  # d > 1024, odd: 33 chunks, the last one 7 features
    ((3,), 4099, 128, 4, 25),  # DESIGN.md's odd width: 129 chunks, one full column pass
    ((9,), 1032, 5, 1, 25),  # d > 1024, a multiple of 8: 16-byte loads with a chunk tail
    ((19,), 33, 200, 1, 25),  # K = 200: two column passes, the second 72 wide
    ((2, 9), 1, 130, 4, 1),  # K just over one pass; l = 1
    ((17,), 96, 130, 4, 3),  # 16-byte path, two passes
    ((21,), 64, 128, 4, 25),  # K = 128: exactly one pass, no column tail
    ((150,), 40, 64, 1, 3),  # two proj/dx blocks (128 tokens a block), the second partial
]


def _bwd(module, dA, x, W1, W2, bias, u, r, C, eps, approximate):
    """(dx, dW1, dW2, dbias) from the launcher, dW2b split as the custom op's backward does."""
    dx, dW1, dW2b = module.mudd_weights_bwd(dA, x, W1, W2, bias, u, r, C, eps, approximate, None)
    return (dx, dW1, *split_dW2b(dW2b, W2, bias))


def _ids(shape):
    lead, d, K, C, l = shape
    return "N%s-d%d-K%d-C%d-l%d" % ("x".join(map(str, lead)), d, K, C, l)


def _check_forward(cuemu, x, params, C, approximate):
    outputs = cuemu.mudd_weights_fwd(x, *params, C, EPS, approximate)
    check_forward(outputs, x, params, C, approximate)
    return outputs


def _check_backward(cuemu, x, params, C, l, approximate):
    lead = x.shape[:-1]
    dA = make_dA(lead, C, l, dtype=x.dtype, device="cpu")
    _, u, r = cuemu.mudd_weights_fwd(x, *params, C, EPS, approximate)
    got = _bwd(cuemu, dA, x, *params, u, r, C, EPS, approximate)
    low, high = bwd_pair(dA, x, *params, C, approximate)
    for name, g, lo, hi in zip(("dx", "dW1", "dW2", "dbias"), got, low, high):
        assert g.is_contiguous(), name
        assert_policy(name, g, lo, hi)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [((37,), 129, 40, 4, 3), ((2, 9), 64, 24, 4, 5), ((5,), 7, 3, 1, 2)], ids=_ids)
@pytest.mark.parametrize("strided", [False, True])
def test_dx_accumulates_into_a_given_tensor(cuemu, poisoned, dtype, shape, strided):
    """dx_acc (a depth stack's gradient slot): dx is added into it in place (+=, one
    rounding of prior + dx for the 16-bit kernels) and the launcher returns it; the
    parameter gradients are those of the plain backward. Strided: a slot view of a
    token-transposed buffer (the launcher adds through a scratch copy)."""
    lead, d, K, C, l = shape
    x = make_x(lead, d, dtype=dtype, device="cpu")
    params = make_params(d, K, C, l, dtype=dtype, device="cpu")
    dA = make_dA(lead, C, l, dtype=dtype, device="cpu")
    _, u, r = cuemu.mudd_weights_fwd(x, *params, C, EPS, "none")
    prior = torch.randn(*lead, d).to(dtype)
    if strided:
        dx_acc = torch.empty(d, *lead, dtype=dtype).movedim(0, -1)
        dx_acc.copy_(prior)
    else:
        dx_acc = prior.clone()
    got_dx, got_dW1, got_dW2b = cuemu.mudd_weights_bwd(dA, x, *params, u, r, C, EPS, "none", dx_acc)
    assert got_dx.data_ptr() == dx_acc.data_ptr()
    low, high = bwd_pair(dA, x, *params, C, "none")
    assert_policy("dx", dx_acc, prior + low[0].to(dtype), prior.double() + high[0])
    dx, dW1, dW2b = cuemu.mudd_weights_bwd(dA, x, *params, u, r, C, EPS, "none", None)
    assert torch.equal(got_dW1, dW1) and torch.equal(got_dW2b, dW2b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_forward(cuemu, poisoned, dtype, approximate, shape):
    lead, d, K, C, l = shape
    x = make_x(lead, d, dtype=dtype, device="cpu")
    params = make_params(d, K, C, l, dtype=dtype, device="cpu")
    A, u, r = _check_forward(cuemu, x, params, C, approximate)
    assert A.shape == (*lead, C, l) and u.shape == (*lead, K) and r.shape == lead


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_backward(cuemu, poisoned, dtype, approximate, shape):
    lead, d, K, C, l = shape
    x = make_x(lead, d, dtype=dtype, device="cpu")
    params = make_params(d, K, C, l, dtype=dtype, device="cpu", bias_2d=True)
    _check_backward(cuemu, x, params, C, l, approximate)


def _layout(kind, dtype):
    """x of 13 (15, 24) tokens, d = 136 (a multiple of 8), in a non-contiguous layout."""
    d = 136
    if kind == "token_stride_odd":  # rows d + 3 apart: the scalar path
        x = make_x((13,), d, dtype=dtype, device="cpu", strided=True)
    elif kind == "token_stride_vec":  # rows d + 8 apart: 16-byte loads through the stride
        x = torch.randn(13, d + 8).to(dtype)[:, :d]
    elif kind == "two_dims":  # tokens (3, 5) with strides (7d, d): two TokenLayout dims
        x = torch.randn(3, 7, d).to(dtype)[:, :5]
    elif kind == "three_dims":  # tokens (3, 2, 4) in three strides: the launcher copies x once
        x = torch.randn(2, 3, 4, d).to(dtype).permute(1, 0, 2, 3)
    elif kind == "misaligned":  # base one element past a 16-byte boundary: the scalar path
        x = torch.randn(13 * d + 1).to(dtype)[1:].view(13, d)
    assert x.stride(-1) == 1
    assert kind == "misaligned" or not x.is_contiguous()
    return x


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ["token_stride_odd", "token_stride_vec", "two_dims", "three_dims", "misaligned"])
def test_strided_x(cuemu, poisoned, dtype, kind):
    x = _layout(kind, dtype)
    C, l = 4, 3
    params = make_params(x.shape[-1], 24, C, l, dtype=dtype, device="cpu")
    _check_forward(cuemu, x, params, C, "none")
    _check_backward(cuemu, x, params, C, l, "none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_tokens(cuemu, poisoned, dtype):
    x = torch.randn(0, 64).to(dtype)
    params = make_params(64, 16, 4, 3, dtype=dtype, device="cpu")
    A, u, r = cuemu.mudd_weights_fwd(x, *params, 4, EPS, "none")
    assert A.shape == (0, 4, 3) and u.shape == (0, 16) and r.shape == (0,)
    dx, *grads = _bwd(cuemu, A, x, *params, u, r, 4, EPS, "none")
    assert dx.shape == x.shape
    for g, p in zip(grads, params):
        assert torch.equal(g, torch.zeros_like(p))


def test_head_shared_memory_limit_is_messaged(cuemu):
    """The head kernels stage kHeadTokens tokens of u (and dA) in shared memory; a K
    too wide for the device is refused with the sizes, not launched."""
    x = torch.randn(2, 4, dtype=torch.float64)
    W1, W2, bias = make_params(4, 8192, 1, 1, dtype=torch.float64, device="cpu")
    with pytest.raises(RuntimeError, match=r"mudd_weights_fwd: needs 524288 bytes of shared memory \(K = 8192"):
        cuemu.mudd_weights_fwd(x, W1, W2, bias, 1, EPS, "none")
    # K = 3000, C·l = 1000: the forward's 192000 bytes fit (above 48 KB: the opt-in),
    # the backward's 8 x (1000 + 3000) x 8 = 256000 do not.
    W1, W2, bias = make_params(4, 3000, 8, 125, dtype=torch.float64, device="cpu")
    A, u, r = cuemu.mudd_weights_fwd(x, W1, W2, bias, 8, EPS, "none")
    low, high = fwd_pair(x, W1, W2, bias, 8, "none")
    assert_policy("A", A, low, high)
    with pytest.raises(RuntimeError, match=r"mudd_weights_bwd: needs 256000 bytes of shared memory \(K = 3000, C\*l = 1000\)"):
        _bwd(cuemu, A, x, W1, W2, bias, u, r, 8, EPS, "none")


# (N, d, K, C, l, dtype): where the backward's [dW2; dbias] is summed (the launcher's rule:
# in the head when its (K + 1)·C·l sums fit the head's shared memory, the blocks' sums
# added in block order; else one GEMM).
DW2_CASES = [
    # in the head: 1100 tokens, 138 tiles over 132 blocks (some sum two), 132 blocks added
    # in turn; bf16 d = 40: the dx kernel's 9 token groups add into dW1 in turn, two units
    # a group, so a warp waits for an earlier warp of its own block
    ((1100,), 40, 8, 4, 2, torch.bfloat16),
    ((1100,), 7, 8, 4, 2, torch.float32),
    # K = C·l = 200: fits in fp32 (8·600·4 + 201·200·4 = 180 KB of 227), one block;
    # in fp64 (360 KB) it does not: one GEMM
    ((19,), 40, 200, 4, 50, torch.bfloat16),
    ((19,), 7, 200, 4, 50, torch.float64),
]


@pytest.mark.parametrize("case", DW2_CASES, ids=lambda c: "N%d-K%d-Cl%d-%s" % (c[0][0], c[2], c[3] * c[4], str(c[5])[6:]))
def test_dW2_in_the_head_or_by_gemm(cuemu, poisoned, case):
    lead, d, K, C, l, dtype = case
    x = make_x(lead, d, dtype=dtype, device="cpu")
    params = make_params(d, K, C, l, dtype=dtype, device="cpu", bias_2d=True)
    _check_backward(cuemu, x, params, C, l, "none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_grid_stride(cuemu, poisoned, dtype):
    """N > kHeadTokens x 8 x SMs (8 x 1056 = 8448 tokens): the head kernels' blocks take
    a second token tile. d = 7 keeps 16-bit x on the at::mm path (cheap to emulate)."""
    lead, d, K, C, l = (8457,), 7, 3, 1, 2
    x = make_x(lead, d, dtype=dtype, device="cpu")
    params = make_params(d, K, C, l, dtype=dtype, device="cpu", bias_2d=True)
    _check_forward(cuemu, x, params, C, "none")
    _check_backward(cuemu, x, params, C, l, "tanh")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e-4, 1e3])
def test_dW1_gradient_scale(cuemu, poisoned, dtype, scale):
    """dW1 = x^T g with g in bf16 hi + lo parts (the dx kernel's dW1 partials): a small dA
    (g's lo part would be subnormal in fp16, whose narrow exponent range the kernel
    avoids by splitting g in bf16, fp32's range, for either x dtype) and a large one;
    dW1 is linear in dA, so it is held to the policy after dividing out the scale."""
    lead, d, K, C, l = (19,), 40, 24, 4, 3
    x = make_x(lead, d, dtype=dtype, device="cpu")
    params = make_params(d, K, C, l, dtype=dtype, device="cpu")
    dA = make_dA(lead, C, l, dtype=dtype, device="cpu") * scale
    _, u, r = cuemu.mudd_weights_fwd(x, *params, C, EPS, "none")
    dx, dW1, dW2, dbias = _bwd(cuemu, dA, x, *params, u, r, C, EPS, "none")
    low, high = bwd_pair(dA, x, *params, C, "none")
    assert_policy("dW1", dW1 / scale, low[1] / scale, high[1] / scale)
    assert_policy("dW2", dW2 / scale, low[2] / scale, high[2] / scale)
    assert_policy("dx", (dx.double() / scale).to(torch.float32), (low[0].double() / scale).to(torch.float32),
                  high[0] / scale, floor=FLOOR[dtype])


class _Emulated(torch.autograd.Function):
    """mudd_weights through the emulated launchers, for gradcheck."""

    @staticmethod
    def forward(ctx, module, x, W1, W2, bias, C, approximate):
        A, u, r = module.mudd_weights_fwd(x, W1, W2, bias, C, EPS, approximate)
        ctx.save_for_backward(x, W1, W2, bias, u, r)
        ctx.module, ctx.C, ctx.approximate = module, C, approximate
        return A

    @staticmethod
    def backward(ctx, dA):
        x, W1, W2, bias, u, r = ctx.saved_tensors
        grads = _bwd(ctx.module, dA.contiguous(), x, W1, W2, bias, u, r, ctx.C, EPS,
                                            ctx.approximate)
        return (None, *grads, None, None)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gradcheck_fp64(cuemu, approximate):
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    params = [t.requires_grad_(True) for t in make_params(5, 4, 2, 3, dtype=torch.float64, device="cpu")]
    assert torch.autograd.gradcheck(lambda *a: _Emulated.apply(cuemu, *a, 2, approximate), (x, *params))


def test_parameter_dtypes(cuemu, poisoned):
    """16-bit parameters: read as they are (W1 split into hi + lo exactly), gradients
    returned in each parameter's dtype; the oracle's, rounded to that dtype, is the
    low-precision reference."""
    lead, d, K, C, l = (23,), 48, 20, 4, 3
    x = make_x(lead, d, dtype=torch.bfloat16, device="cpu")
    W1, W2, bias = make_params(d, K, C, l, dtype=torch.bfloat16, device="cpu", bias_2d=True)
    params = (W1.to(torch.bfloat16), W2.to(torch.float16), bias.to(torch.bfloat16))
    A, u, r = cuemu.mudd_weights_fwd(x, *params, C, EPS, "tanh")
    low, high = fwd_pair(x, *params, C, "tanh")
    assert_policy("A", A, low, high)
    dA = make_dA(lead, C, l, dtype=torch.bfloat16, device="cpu")
    got = _bwd(cuemu, dA, x, *params, u, r, C, EPS, "tanh")
    low, high = bwd_pair(dA, x, *params, C, "tanh")
    for name, g, p, lo, hi in zip(("dx", "dW1", "dW2", "dbias"), got, (x, *params), low, high):
        assert g.dtype == p.dtype and g.shape == p.shape, name
        assert_policy(name, g, lo.to(p.dtype), hi)


def _check_all(cuemu, x, params, C, l, approximate, dA=None):
    """Forward (A, u, r) and backward (dx, dW1, dW2, dbias) held to the policy."""
    _check_forward(cuemu, x, params, C, approximate)
    lead = x.shape[:-1]
    if dA is None:
        dA = make_dA(lead, C, l, dtype=x.dtype, device="cpu")
    _, u, r = cuemu.mudd_weights_fwd(x, *params, C, EPS, approximate)
    got = _bwd(cuemu, dA, x, *params, u, r, C, EPS, approximate)
    low, high = bwd_pair(dA, x, *params, C, approximate)
    for name, g, lo, hi in zip(("dx", "dW1", "dW2", "dbias"), got, low, high):
        assert_policy(name, g, lo, hi)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("w1_scale", [1e-2, 1e-4])
@pytest.mark.parametrize("seed", range(2))
def test_small_W1(cuemu, poisoned, dtype, w1_scale, seed):
    """W1 ~ N(0, 1/d)·w1_scale (a trained W1 may carry a folded norm weight), W2 scaled
    inversely so that u·W2 and A stay O(1): fp16's narrow exponent range must not
    flush W1's 16-bit parts (hi, let alone lo, of W1 ~ 1e-6 are fp16 subnormals)."""
    torch.manual_seed(seed)
    lead, d, K, C, l = (37,), 96, 40, 4, 3
    x = make_x(lead, d, dtype=dtype, device="cpu")
    W1, W2, bias = make_params(d, K, C, l, dtype=dtype, device="cpu")
    params = (W1 * w1_scale, W2 / w1_scale, bias)
    _check_all(cuemu, x, params, C, l, "none")
    # u itself ~ w1_scale: the policy's absolute floor would not see a relative error
    # in it, so u / w1_scale against the oracle's projection of W1 / w1_scale' values.
    _, u, r = cuemu.mudd_weights_fwd(x, *params, C, EPS, "none")
    xc, x64 = x.float(), x.double()
    r_lo = torch.rsqrt(xc.square().mean(-1) + EPS)
    r_hi = torch.rsqrt(x64.square().mean(-1) + EPS)
    assert_policy("u / w1_scale", u / w1_scale, ((xc * r_lo[..., None]) @ params[0]) / w1_scale,
                  ((x64 * r_hi[..., None]) @ params[0].double()) / w1_scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", range(3))
def test_many_tokens_parameter_gradients(cuemu, poisoned, dtype, seed):
    """dW1, dW2, dbias are sums over tokens (fp32 outputs, floor 1e-5): N = 2000 at
    small d stresses the projection's and dW1's 16-bit splits against the oracle's own
    fp32 error."""
    torch.manual_seed(seed)
    lead, d, K, C, l = (2000,), 32, 24, 4, 3
    x = make_x(lead, d, dtype=dtype, device="cpu")
    params = make_params(d, K, C, l, dtype=dtype, device="cpu", bias_2d=True)
    _check_all(cuemu, x, params, C, l, "tanh")
