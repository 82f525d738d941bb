"""Input builders shared by the HC tests: streams H in the memory layouts the kernels
must handle, and per-token vectors (y, dx)."""

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


def is_dense(t):
    """Non-overlapping and dense (a permutation of a contiguous tensor): the layouts
    empty_like keeps, so the launchers' outputs must have their input's strides."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True
