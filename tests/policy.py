"""DESIGN.md's correctness policy as one assertion.

A fast op's output `out` is compared with the oracle in float64 on the same inputs
(`ref64`). It passes when its error is at most twice the oracle's own error at the
same dtype (`ref_lowp`: the oracle run on the low-precision inputs), plus a small floor
scaled by the magnitude of the reference (FLOOR by dtype, or the caller's `floor`).
NaN never passes.
"""

import torch

from crosslayer._checks import acc_dtype

FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 1e-4,
    torch.bfloat16: 1e-3,
}


# Floors relative to the magnitude of the terms a sum adds (the `scale` of a sum that
# cancels): a few units in the last place of the accumulator.
TERMS_FLOOR = {
    torch.float64: 1e-14,
    torch.float32: 1e-6,
}


def assert_policy(name: str, out: torch.Tensor, ref_lowp: torch.Tensor, ref64: torch.Tensor,
                  floor: float | None = None, scale: float | None = None) -> None:
    """`scale`: what the floor is relative to, max(1, max |ref64|) by default. For an
    output that is a sum whose terms cancel, give the largest sum of |terms| (with a
    TERMS_FLOOR): rounding errors scale with the terms, not with what is left of them,
    and two correct associations of the same sum differ by that much."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert out.dtype == ref_lowp.dtype, f"{name}: dtype {out.dtype} != oracle's {ref_lowp.dtype}"
    nan = torch.isnan(out)
    assert not nan.any(), f"{name}: {int(nan.sum())} NaN of {out.numel()} (first at {nan.nonzero()[0].tolist()})"
    if out.numel() == 0:
        return
    out64, low64 = out.double(), ref_lowp.double()
    err = (out64 - ref64).abs()
    ref_err = (low64 - ref64).abs().max().item()
    scale = max(1.0, ref64.abs().max().item()) if scale is None else scale
    floor = FLOOR[out.dtype] if floor is None else floor
    bound = 2.0 * ref_err + floor * scale
    worst = err.max().item()
    if worst > bound:
        idx = tuple(int(i) for i in torch.nonzero(err == err.max())[0])
        raise AssertionError(
            f"{name}: max error {worst:.3e} > bound {bound:.3e} (2 x oracle error "
            f"{ref_err:.3e} + floor {floor:g} x {scale:.3g}); at {idx}: "
            f"got {out64[idx].item():.6g}, want {ref64[idx].item():.6g}; "
            f"{int((err > bound).sum())} of {out.numel()} elements over"
        )


def oracle_pair(fn, *tensors):
    """(the oracle at the inputs' dtype, the oracle in float64 on the same values): the
    two references of assert_policy."""
    return fn(*tensors), fn(*[t.double() for t in tensors])


def accumulated(dS0: torch.Tensor, dS: torch.Tensor) -> torch.Tensor:
    """The oracle of a backward kernel's in-place dS0 += dS: the sum in the arithmetic
    dtype (float64 for float64 dS0, float32 otherwise), rounded to dS0's dtype."""
    cd = acc_dtype(dS0.dtype)
    return (dS0.to(cd) + dS.to(cd)).to(dS0.dtype)


def poison_allocator(device, nbytes: int = 1 << 26) -> None:
    """Fill and free a block so the next allocations likely start as NaN: a kernel that
    skips an output element then fails assert_policy's NaN check."""
    if torch.device(device).type != "cuda":  # the emulated GPU tests poison every torch.empty
        return
    torch.full((nbytes // 4,), float("nan"), device=device).fill_(float("nan"))
    torch.cuda.synchronize()
