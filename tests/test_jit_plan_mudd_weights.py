"""The JIT path's launch plans against the C++ launchers' (crosslayer._jit.mudd_weights vs
csrc/mudd_weights.cu) for mudd_weights_fwd and _bwd: both paths (tensor cores for 16-bit
x with d >= 32, at::mm otherwise), every dtype, odd d and K, 1 to 128 slots and 1 to 4
ways, no to a few thousand tokens (token groups, head blocks) over SM counts, permuted /
uncollapsible / feature-strided / misaligned x, parameters that need a conversion, a
copy or padding, dW2 summed in the head kernel or by a GEMM, dx written or added into a
given buffer of any layout, and the head's shared-memory refusal
(tests/jit_plan_support.py compares)."""

import pytest
import torch

from jit_plan_support import cpp_launches, emulator, jit_launches, same_plans

pytestmark = pytest.mark.cuemu
__all__ = ["emulator"]  # the fixture

EPS = 3e-5  # not the default, so it must reach the params


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def tokens(dtype, lead, d, layout="contiguous"):
    """x or dx (*lead, d): "permuted" (the first two token dims swapped), "sliced" (three
    token dims, each > 1, sliced from a bigger tensor: no TokenLayout, copied),
    "feature_strided" (every other feature), "misaligned" (one element off 16 bytes)."""
    if layout == "permuted":
        return torch.randn((lead[1], lead[0], *lead[2:], d), dtype=dtype).transpose(0, 1)
    if layout == "sliced":
        a, b, c = lead
        return torch.randn((a, b + 1, c + 1, d), dtype=dtype)[:, :b, :c]
    if layout == "feature_strided":
        return torch.randn((*lead, 2 * d), dtype=dtype)[..., ::2]
    if layout == "misaligned":
        n = 1
        for s in lead:
            n *= s
        return torch.randn(n * d + 1, dtype=dtype)[1:].view(*lead, d)
    return torch.randn((*lead, d), dtype=dtype)


def parameters(d, K, C, l, acc, kind="plain"):
    """W1 (d, K), W2 (K, C·l), bias: "plain" (the accumulator dtype, contiguous, bias
    (C·l,)), "bf16" (converted), "strided" (W1 and W2 transposed, bias (C, l) from (l, C):
    copies), "misaligned" (fp32 W1 4 bytes off 16: fp32_rows_ld4's clone when K % 4 == 0),
    "bias_2d" (bias (C, l))."""
    dtype = torch.bfloat16 if kind == "bf16" else acc
    if kind == "strided":
        return (torch.randn((K, d), dtype=dtype).t() * 0.1, torch.randn((C * l, K), dtype=dtype).t() * 0.1,
                torch.randn((l, C), dtype=dtype).t())
    W1 = (torch.randn(d * K + 1, dtype=torch.float32)[1:].view(d, K) if kind == "misaligned"
          else torch.randn((d, K), dtype=dtype)) * 0.1
    bias = torch.randn((C, l) if kind == "bias_2d" else (C * l,), dtype=dtype)
    return W1, torch.randn((K, C * l), dtype=dtype) * 0.1, bias


def saved(lead, K, C, l, acc, kind="plain"):
    """dA (*lead, C, l), u (*lead, K), r (*lead): in the accumulator dtype, or "bf16", or
    "permuted" (dA and u with the first two token dims swapped)."""
    dtype = torch.bfloat16 if kind == "bf16" else acc
    if kind == "permuted":
        lead_t = (lead[1], lead[0], *lead[2:])
        return (torch.randn((*lead_t, C, l), dtype=dtype).transpose(0, 1),
                torch.randn((*lead_t, K), dtype=dtype).transpose(0, 1), torch.rand(lead, dtype=dtype) + 0.5)
    return torch.randn((*lead, C, l), dtype=dtype), torch.randn((*lead, K), dtype=dtype), \
        torch.rand(lead, dtype=dtype) + 0.5


# dtype, lead, d, K, C, l, x layout
CASES = [
    (torch.float32, (5,), 16, 8, 4, 3, "contiguous"),
    (torch.float64, (3, 2), 7, 5, 1, 2, "permuted"),
    (torch.bfloat16, (40,), 64, 32, 4, 4, "contiguous"),
    (torch.float16, (7,), 33, 20, 4, 2, "contiguous"),
    (torch.bfloat16, (6,), 31, 16, 4, 2, "contiguous"),
    (torch.float16, (9,), 48, 70, 2, 5, "misaligned"),
    (torch.bfloat16, (2, 3, 4), 40, 12, 4, 3, "sliced"),
    (torch.float16, (3, 4), 40, 12, 4, 3, "permuted"),
    (torch.bfloat16, (5,), 64, 8, 4, 3, "feature_strided"),
    (torch.float32, (2, 3, 4), 9, 6, 2, 2, "sliced"),
    (torch.bfloat16, (1000,), 32, 64, 4, 8, "contiguous"),
    (torch.float16, (3000,), 32, 16, 4, 2, "contiguous"),
    (torch.float32, (4,), 1, 1, 1, 1, "contiguous"),
    (torch.bfloat16, (3,), 2048, 24, 4, 2, "contiguous"),
    (torch.bfloat16, (1,), 40, 130, 1, 128, "contiguous"),
    (torch.float64, (6,), 12, 40, 4, 16, "contiguous"),
    (torch.float32, (3,), 4, 2000, 1, 1, "contiguous"),  # head tiles above 48 KB (opt-in)
    (torch.bfloat16, (0,), 32, 16, 4, 2, "contiguous"),
    (torch.float32, (0, 3), 8, 4, 4, 1, "contiguous"),
]
CASE_IDS = [f"{str(c[0])[6:]}-{'x'.join(map(str, c[1]))}-d{c[2]}-K{c[3]}-C{c[4]}-l{c[5]}-{c[6]}" for c in CASES]


def backward_plans(emulator, dtype, lead, d, K, C, l, x, params, approximate, saved_kind="plain", dx_layout=None):
    dA, u, r = saved(lead, K, C, l, acc_of(dtype), saved_kind)
    dx = tokens(dtype, lead, d, dx_layout) if dx_layout is not None else None
    same_plans(emulator, "mudd_weights_bwd", dA, x, *params, u, r, C, EPS, approximate, dx)


@pytest.mark.parametrize("dtype,lead,d,K,C,l,layout", CASES, ids=CASE_IDS)
def test_mudd_weights_plans_match(emulator, dtype, lead, d, K, C, l, layout):
    x = tokens(dtype, lead, d, layout)
    params = parameters(d, K, C, l, acc_of(dtype))
    same_plans(emulator, "mudd_weights_fwd", x, *params, C, EPS, "none")
    same_plans(emulator, "mudd_weights_fwd", x, *params, C, EPS, "tanh")
    for dx_layout in (None, "contiguous"):
        backward_plans(emulator, dtype, lead, d, K, C, l, x, params, "tanh", dx_layout=dx_layout)


# Parameters, saved tensors and dx buffers that need a conversion, a copy, padding or a
# scratch (dx += through writable / copy_back keeping its values), or lose the vector path.
VARIANTS = {
    "bf16_params": dict(params="bf16"),
    "strided_params": dict(params="strided"),
    "misaligned_w1": dict(params="misaligned"),
    "bias_2d": dict(params="bias_2d"),
    "bf16_saved": dict(saved="bf16"),
    "permuted_saved": dict(saved="permuted"),
    "dx_permuted": dict(dx="permuted"),
    "dx_sliced": dict(dx="sliced"),
    "dx_feature_strided": dict(dx="feature_strided"),
    "dx_misaligned": dict(dx="misaligned"),
}


@pytest.mark.parametrize("dtype,d,K", [(torch.float32, 12, 8), (torch.float64, 5, 3), (torch.bfloat16, 40, 12),
                                       (torch.float16, 64, 6)])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mudd_weights_operand_plans_match(emulator, dtype, d, K, variant):
    kw = VARIANTS[variant]
    lead, C, l = (2, 3, 4), 4, 3
    x = tokens(dtype, lead, d)
    params = parameters(d, K, C, l, acc_of(dtype), kw.get("params", "plain"))
    same_plans(emulator, "mudd_weights_fwd", x, *params, C, EPS, "none")
    backward_plans(emulator, dtype, lead, d, K, C, l, x, params, "none", kw.get("saved", "plain"), kw.get("dx"))


# [dW2; dbias] in the head kernel while its sums fit the opt-in limit (227 KB emulated),
# else by one GEMM over h: with and without the tensor-core dx pass (the tickets then
# only the dx kernel's, or none).
@pytest.mark.parametrize("dtype,d,K,l,in_head", [(torch.float32, 8, 64, 128, True), (torch.float32, 8, 256, 128, False),
                                                 (torch.bfloat16, 64, 64, 128, True),
                                                 (torch.bfloat16, 64, 256, 128, False),
                                                 (torch.float64, 8, 64, 64, True), (torch.float64, 8, 64, 128, False)])
def test_mudd_weights_dw2_plans_match(emulator, dtype, d, K, l, in_head):
    lead, C = (10,), 4
    x = tokens(dtype, lead, d)
    params = parameters(d, K, C, l, acc_of(dtype))
    dA, u, r = saved(lead, K, C, l, acc_of(dtype))
    args = (dA, x, *params, u, r, C, EPS, "none", None)
    same_plans(emulator, "mudd_weights_bwd", *args)
    head = jit_launches(emulator, "mudd_weights_bwd", *args)[0]
    es = acc_of(dtype).itemsize
    assert head.smem == (8 * (C * l + K) + (8 * K + (K + 1) * C * l if in_head else 0)) * es
    assert (head.smem > 48 * 1024) == in_head  # the opt-in path with the sums


# SM counts: the head blocks (min(tiles, SMs · 1 or 8)) and the dx pass's token groups
# (min(tiles / max(4, K), SMs·16 / units)) with the SMs.
@pytest.mark.parametrize("sms", [1, 3, 132, 1000])
@pytest.mark.parametrize("dtype,lead,d,K", [(torch.bfloat16, (600,), 129, 12), (torch.float16, (160,), 512, 8),
                                            (torch.float32, (300,), 10, 8)])
def test_mudd_weights_sms_plans_match(emulator, sms, dtype, lead, d, K):
    count_mod, counter, _ = emulator
    C, l = 4, 2
    x = tokens(dtype, lead, d)
    params = parameters(d, K, C, l, acc_of(dtype))
    with count_mod.device_sms(counter, sms):
        same_plans(emulator, "mudd_weights_fwd", x, *params, C, EPS, "none")
        backward_plans(emulator, dtype, lead, d, K, C, l, x, params, "none")
        backward_plans(emulator, dtype, lead, d, K, C, l, x, params, "none", dx_layout="contiguous")


def test_mudd_weights_head_smem_refused(emulator):
    """A head tile beyond the opt-in limit (fp32: 8 tokens × K = 7300 × 4 B) is refused by
    both launchers, before any launch."""
    d, K, C, l = 2, 7300, 1, 1
    x = tokens(torch.float32, (3,), d)
    params = parameters(d, K, C, l, torch.float32)
    for fn, args in (("mudd_weights_fwd", (x, *params, C, EPS, "none")),
                     ("mudd_weights_bwd", (*saved((3,), K, C, l, torch.float32)[:1], x, *params,
                                           *saved((3,), K, C, l, torch.float32)[1:], C, EPS, "none", None))):
        with pytest.raises(RuntimeError, match="shared memory"):
            cpp_launches(emulator, fn, *args)
        with pytest.raises(RuntimeError, match="shared memory"):
            jit_launches(emulator, fn, *args)
