"""Checks shared by the MUDDFormer and MUDDPythia model tests: each takes a `Family`
(our config class, our model class, the test-local reference transcription) and runs
the same comparison against the reference."""

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from policy import assert_policy

F64 = torch.float64
RELEASED = dict(use_qk_norm=True, expand_last=True, round64=True)  # the released flags


@dataclass(frozen=True)
class Family:
    config: type
    model: type
    reference: type

    def tiny(self, **kw):
        base = dict(block_size=64, vocab_size=97, n_layer=3, n_head=4, dim=64)
        return self.config(**{**base, **kw})


def pair(fam: Family, cfg, dtype=F64):
    """(reference with random weights, ours loaded from its state_dict with strict=True).
    Norm weights (and LayerNorm biases) are moved off their init so every weight matters."""
    ref = fam.reference(cfg).to(dtype)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    ours = fam.model(cfg).to(dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def shapes(m) -> dict:
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def check_forward(fam: Family, name: str, cfg) -> None:
    """Training forward: float64 within 1e-10, float32 by DESIGN's policy."""
    ref, ours = pair(fam, cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 13))
    ref64, out64 = ref(idx), ours(idx)
    ref32, out32 = ref.float()(idx), ours.float()(idx)
    torch.testing.assert_close(out64, ref64, rtol=0, atol=1e-10)
    assert_policy(f"{name} logits", out32, ref32, ref64)


def check_prefill_decode(fam: Family, name: str, cfg,
                         after_setup: Optional[Callable[[torch.nn.Module], None]] = None) -> None:
    """Prefill 6 tokens, decode 5 one at a time, batch 2 in caches for 3: every step's
    logits equal the reference's full forward at that position (float64 and float32)."""
    ref, ours = pair(fam, cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 11))
    P = 6
    ref64, ref32 = ref(idx).detach(), ref.float()(idx).detach()
    for dtype in (F64, torch.float32):
        ours.to(dtype).setup_caches(max_batch_size=3, max_seq_length=20)
        if after_setup is not None:
            after_setup(ours)
        steps = [ours(idx[:, :P], torch.arange(P))]
        steps += [ours(idx[:, t:t + 1], torch.tensor([t])) for t in range(P, idx.shape[1])]
        out = torch.cat(steps, 1)
        assert not out.requires_grad  # cached inference builds no graph
        if dtype == F64:
            torch.testing.assert_close(out, ref64, rtol=0, atol=1e-10)
        else:
            assert_policy(f"{name} prefill+decode", out, ref32, ref64)


def check_gradients(fam: Family, cfg) -> None:
    """Every parameter's float64 gradient equals the reference's autograd."""
    ref, ours = pair(fam, cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 9))
    dlogits = torch.randn(2, 9, cfg.vocab_size, dtype=F64)
    (ref(idx) * dlogits).sum().backward()
    (ours(idx) * dlogits).sum().backward()
    ref_grads = dict(ref.named_parameters())
    for k, p in ours.named_parameters():
        assert p.grad is not None, f"{k} got no gradient"
        torch.testing.assert_close(p.grad, ref_grads[k].grad, rtol=1e-9, atol=1e-11,
                                   msg=lambda m: f"{k}: {m}")


def check_mismatched_checkpoint(fam: Family, other: dict, match: str) -> None:
    """A checkpoint of another config fails to load with the config field named."""
    import pytest

    ckpt = fam.reference(fam.tiny(**{**RELEASED, **other})).state_dict()
    ours = fam.model(fam.tiny(**RELEASED))
    with pytest.raises(RuntimeError, match=f"does not fit this {fam.config.__name__}") as e:
        ours.load_state_dict(ckpt, strict=True)
    assert e.match(match)


def check_lowp_vs_fp64(fam: Family, device, dtype) -> None:
    """Ours on `device` in `dtype` (the fused ops on CUDA) against the float64 CPU
    reference: logits (training forward, and prefill + decode) by DESIGN's policy with
    the reference itself run on `device` in `dtype` as the low-precision oracle;
    gradients by relative 2-norm error (a max is too noisy at bf16), same rule."""
    cfg = fam.tiny(**RELEASED)
    ref, ours = pair(fam, cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 37))
    dlogits = torch.randn(2, 37, cfg.vocab_size, dtype=F64)
    ref64 = ref(idx)
    (ref64 * dlogits).sum().backward()
    ref_lp = fam.reference(cfg).to(device, dtype)
    ref_lp.load_state_dict(ref.state_dict())
    ours = ours.to(device, dtype)
    ic, dc = idx.to(device), dlogits.to(device, dtype)
    out, out_lp = ours(ic), ref_lp(ic)
    assert_policy(f"logits {dtype}", out.cpu(), out_lp.detach().cpu(), ref64.detach())
    (out * dc).sum().backward()
    (out_lp * dc).sum().backward()
    lp_grads, ref_grads = dict(ref_lp.named_parameters()), dict(ref.named_parameters())
    for k, p in ours.named_parameters():
        g64 = ref_grads[k].grad
        err, err_lp = (float((g.cpu().double() - g64).norm() / g64.norm()) for g in (p.grad, lp_grads[k].grad))
        assert err <= 2 * err_lp + 1e-3, f"grad {k} {dtype}: relative error {err:.3e} > 2 x {err_lp:.3e} + 1e-3"
    ours.setup_caches(2, 40)
    steps = [ours(ic[:, :30], torch.arange(30, device=device))]
    steps += [ours(ic[:, t:t + 1], torch.tensor([t], device=device)) for t in range(30, 37)]
    assert_policy(f"prefill+decode {dtype}", torch.cat(steps, 1).cpu(), out_lp.detach().cpu(), ref64.detach())
