"""hc_post and stream_mix launchers and kernels (csrc/hc_post.cu, csrc/stream_mix.cu and
their kernel headers) on the CPU emulator (tools/cuemu), against the float64 oracle under
DESIGN.md's policy, outputs poisoned with NaN: n in {1, 2, 3, 4, 8, 16} (2, 4, 8 exact
instantiations, the others generic), d = 1, 7, 129, 4099 (mostly the scalar path) and 136,
2056 (16-byte path with a cut chunk and a cut round), token counts that are not a multiple
of the tile, every dtype, static and per-token coefficients, strided / folded / padded /
misaligned layouts, copied layouts, 16-bit and mixed coefficients, many tiles, empty
shapes. Shapes are small: emulation is about a thousand times slower than a GPU. The
checks every op shares are in test_contract.py.
"""


import pytest
import torch

from crosslayer import ref
from crosslayer._checks import acc_dtype
from hc_inputs import STREAM_LAYOUTS, is_dense, make_streams, make_vec, stream_cases, uncollapsible_streams
from policy import assert_policy, oracle_pair
from test_hc_post import (DTYPES, check_hc_post_bwd, check_stream_mix_bwd, stream_mix_grads, make_coeffs, make_hc_post,
                         make_stream_mix)

pytestmark = pytest.mark.cuemu


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, n, static", stream_cases("static"))
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


def _dots_oracle(dx, H):
    """<dx, H_i> per token in the arithmetic dtype."""
    acc = acc_dtype(H.dtype)
    return (H.to(acc) * dx.to(acc).unsqueeze(-2)).sum(-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, n, static", stream_cases("static"))
def test_stream_mix(cuemu, poisoned, dtype, shape, n, static):
    lead, d = shape
    H, w = make_stream_mix(lead, n, d, dtype=dtype, device="cpu", static=static)
    x = cuemu.stream_mix_fwd(H, w)
    assert_policy("x", x, *oracle_pair(ref.stream_mix, H, w))

    dx = torch.randn(*lead, d).to(dtype)
    got = stream_mix_grads(cuemu.stream_mix_bwd, dx, H, w)
    assert got[1].shape == w.shape
    check_stream_mix_bwd(dx, H, w, got)
    # The dots alone (the mHC pre's): dw per token, whatever w.
    dots = cuemu.stream_mix_dots(dx, H)
    assert dots.shape == (*lead, n)
    assert_policy("dw", dots, *oracle_pair(_dots_oracle, dx, H))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", STREAM_LAYOUTS)
@pytest.mark.parametrize("n", [1, 3, 4])
@pytest.mark.parametrize("d", [9, 136])
def test_hc_post_and_stream_mix_layouts(cuemu, poisoned, dtype, layout, n, d):
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
    check_stream_mix_bwd(dx, H, w, stream_mix_grads(cuemu.stream_mix_bwd, dx, H, w))


def test_hc_post_and_stream_mix_copied_layouts(cuemu, poisoned):
    """Layouts the kernels cannot address: token dims that do not collapse to two, and
    a non-unit feature stride (H transposed in its last two dims). Both are copied."""
    H = uncollapsible_streams(3, 10, torch.float32)
    lead = H.shape[:-2]
    y = torch.randn(*lead, 10)
    alpha, beta = make_coeffs(lead, 3, dtype=torch.float32, device="cpu", static=False)
    out = cuemu.hc_post_fwd(H, y, alpha, beta)
    assert out.stride() == H.stride()
    assert_policy("H'", out, *oracle_pair(ref.hc_post, H, y, alpha, beta))
    dHn = uncollapsible_streams(3, 10, torch.float32)
    got = cuemu.hc_post_bwd(dHn, H, y, alpha, beta)
    assert got[0].stride() == H.stride()
    check_hc_post_bwd(dHn, H, y, alpha, beta, got)
    assert_policy("x", cuemu.stream_mix_fwd(H, beta), *oracle_pair(ref.stream_mix, H, beta))
    check_stream_mix_bwd(y, H, beta, stream_mix_grads(cuemu.stream_mix_bwd, y, H, beta))

    H = torch.randn(4, 9, 3).transpose(-1, -2)  # (4, 3, 9), feature stride 3
    y = torch.randn(4, 18)[:, ::2]
    alpha, beta = make_coeffs((4,), 3, dtype=torch.float32, device="cpu", static=False)
    assert_policy("H'", cuemu.hc_post_fwd(H, y, alpha, beta), *oracle_pair(ref.hc_post, H, y, alpha, beta))
    dHn = torch.randn(4, 9, 3).transpose(-1, -2)
    check_hc_post_bwd(dHn, H, y, alpha, beta, cuemu.hc_post_bwd(dHn, H, y, alpha, beta))
    assert_policy("x", cuemu.stream_mix_fwd(H, beta), *oracle_pair(ref.stream_mix, H, beta))
    check_stream_mix_bwd(y, H, beta, stream_mix_grads(cuemu.stream_mix_bwd, y, H, beta))


def test_hc_post_and_stream_mix_16bit_coefficients(cuemu, poisoned):
    """Coefficients of another float dtype than the accumulator's are converted."""
    H, y, alpha, beta = make_hc_post((5,), 4, 33, dtype=torch.float32, device="cpu")
    ab, bh = alpha.to(torch.bfloat16), beta.to(torch.float16)
    assert_policy("H'", cuemu.hc_post_fwd(H, y, ab, bh), *oracle_pair(ref.hc_post, H, y, ab, bh))
    dHn = torch.randn_like(H)
    got = cuemu.hc_post_bwd(dHn, H, y, ab, bh)
    assert got[2].dtype == torch.float32 and got[3].dtype == torch.float32
    check_hc_post_bwd(dHn, H, y, ab, bh, got)


def test_hc_post_and_stream_mix_mixed_static_and_strided_coefficients(cuemu, poisoned):
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
        check_stream_mix_bwd(y, H, w, stream_mix_grads(cuemu.stream_mix_bwd, y, H, w))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", *STREAM_LAYOUTS, "uncollapsible"])
def test_stream_mix_backward_accumulates(cuemu, poisoned, dtype, layout):
    """accumulate: dH += w_i·dx (hc_post's dH already there, as in a connection), in
    place in every layout, through a scratch copy where the kernel cannot address dH."""
    n, d = 4, 136
    if layout == "uncollapsible":
        H = uncollapsible_streams(n, d, dtype)
        w = torch.randn(*H.shape[:-2], n)
    else:
        H, w = make_stream_mix((2, 3), n, d, dtype=dtype, device="cpu", static=False, layout=layout)
    prior = torch.empty_like(H).copy_(torch.randn(H.shape))  # H's layout, as hc_post allocates it
    dx = torch.randn(*H.shape[:-2], d).to(dtype)
    got = stream_mix_grads(cuemu.stream_mix_bwd, dx, H, w, prior=prior)
    check_stream_mix_bwd(dx, H, w, got, prior=prior)


def test_hc_post_and_stream_mix_many_tiles(cuemu, poisoned):
    """More tokens than one block's tile many times over (d = 1: 8 rows of one warp)."""
    lead, n, d = (203,), 2, 1
    for static in (False, True):
        H, y, alpha, beta = make_hc_post(lead, n, d, dtype=torch.float32, device="cpu", static=static)
        assert_policy("H'", cuemu.hc_post_fwd(H, y, alpha, beta), *oracle_pair(ref.hc_post, H, y, alpha, beta))
        dHn = torch.randn(*lead, n, d)
        check_hc_post_bwd(dHn, H, y, alpha, beta, cuemu.hc_post_bwd(dHn, H, y, alpha, beta))


def test_hc_post_and_stream_mix_empty_shapes(cuemu, poisoned):
    for lead, n, d in (((0,), 4, 8), ((3, 0), 3, 5), ((3,), 4, 0), ((2, 2), 16, 0)):
        for static in (False, True):
            H, y, alpha, beta = make_hc_post(lead, n, d, dtype=torch.float32, device="cpu", static=static)
            assert cuemu.hc_post_fwd(H, y, alpha, beta).shape == H.shape
            dH, dy, da, db = cuemu.hc_post_bwd(torch.randn_like(H), H, y, alpha, beta)
            assert dH.shape == H.shape and dy.shape == y.shape
            assert torch.equal(da, torch.zeros_like(alpha)) and torch.equal(db, torch.zeros_like(beta))
            assert cuemu.stream_mix_fwd(H, beta).shape == y.shape
            dH, dw = stream_mix_grads(cuemu.stream_mix_bwd, torch.randn_like(y), H, beta)
            assert dH.shape == H.shape and torch.equal(dw, torch.zeros_like(beta))


