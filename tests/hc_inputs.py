"""Input builders shared by the HC tests: streams H in the memory layouts the kernels
must handle, and per-token vectors (y, dx)."""

import pytest
import torch

# The non-contiguous layouts of make_streams (every kernel must handle each).
STREAM_LAYOUTS = ("padded", "stream_stride", "folded", "tokens_transposed", "misaligned")


def make_streams(lead, n, d, *, dtype, device, layout="contiguous"):
    """H (*lead, n, d), random, in one of several memory layouts.

    padded             rows padded to a multiple of 16 elements: vectorised, with tails
    stream_stride      every other stream of a 2n-stream buffer: stream stride 2·d_row
    folded             streams folded into the batch dim (hyper-connections package):
                       torch.randn(b·n, t, d).view(b, n, t, d).permute(0, 2, 1, 3)
    tokens_transposed  token dims (b, t) stored as (t, b)
    misaligned         base 2 elements past a 16-byte boundary, rows of d + 3
    """
    def rand(*shape):  # in the target dtype first: .to() of a strided tensor would copy
        return torch.randn(*shape, device=device).to(dtype)

    if layout == "contiguous":
        return rand(*lead, n, d)
    if layout == "padded":
        return rand(*lead, n, (d + 15) // 16 * 16)[..., :d]
    if layout == "stream_stride":
        return rand(*lead, 2 * n, d)[..., ::2, :]
    if layout == "folded":
        b, t = lead
        return rand(b * n, t, d).view(b, n, t, d).permute(0, 2, 1, 3)
    if layout == "tokens_transposed":
        b, t = lead
        return rand(t, b, n, d).transpose(0, 1)
    if layout == "misaligned":
        return rand(*lead, n, d + 3)[..., 2 : 2 + d]
    raise ValueError(layout)


def make_vec(lead, d, *, dtype, device, misaligned=False):
    """y, dx (*lead, d); misaligned: base 1 element past a 16-byte boundary, odd rows."""
    if misaligned:
        return torch.randn(*lead, d + 3, device=device).to(dtype)[..., 1 : 1 + d]
    return torch.randn(*lead, d, device=device).to(dtype)


def uncollapsible_streams(n, d, dtype):
    """H (3, 2, 4, n, d) whose three token dims merge into no fewer than three strided
    dims (strides 4nd, 12nd, nd): the launchers copy it, and write outputs allocated
    like it (empty_like keeps the dense permutation) through a scratch tensor."""
    return torch.randn(2, 3, 4, n, d).to(dtype).permute(1, 0, 2, 3, 4)


def is_dense(t):
    """Non-overlapping and dense (a permutation of a contiguous tensor): the layouts
    empty_like keeps, so the launchers' outputs must have their input's strides."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


# The emulator's matrix for the HC kernels: (lead, d) shapes and the stream counts each runs.
STREAMS = [1, 2, 3, 4, 8, 16]

# (lead, d). d = 1, 7, 129, 4099 take the scalar path (a stride is not a multiple of the
# vector width); 136 and 2056 the 16-byte path, 136 with a row of threads only partly
# used and 2056 with a second chunk round that only some threads reach (bf16: 257
# chunks of 8). () is one token with no token dims; 11 tokens of d = 7 are one full
# tile of 8 rows and a partial one, 5 tokens of d = 136 in fp32 two tiles of 4.
# Streams: every n on d <= 7, n <= 8 on d = 129 and 136 (n = 16 costs the emulator
# n² dots per chunk), an exact and a generic instantiation on the large d.
CASES = [((), 7), ((3,), 1), ((11,), 7), ((3,), 129), ((5,), 136), ((1,), 4099), ((2,), 2056)]
CASE_STREAMS = {7: STREAMS, 1: STREAMS, 129: STREAMS[:-1], 136: STREAMS[:-1], 4099: [2, 3], 2056: [1, 4]}


def stream_cases(flag):
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
