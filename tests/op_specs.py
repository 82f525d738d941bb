"""The tests' op registry: one OpSpec per public op of crosslayer.ops.

An entry holds what every contract check needs (tests/test_contract.py runs them all
over every backend):
  sample(case, dtype, device)   fresh random inputs: the differentiable tensors and the
                                call of the op on a module (crosslayer.ops or .ref)
  cases                         representative shapes (odd sizes, strided layouts,
                                static and per-token coefficients): the default tier
  exhaustive_cases              more of them, run behind the `exhaustive` marker
  opcheck_calls(dtype, device)  every custom op of the public op with sample arguments
  launcher_errors(kernels, dev) calls of the launchers with bad arguments and the
                                message each must raise
  big                           a GPU-sized case (many blocks: determinism, streams)
  tiny                          a float64 gradcheck case (finite differences per element)
  empty                         no tokens at all
  wide                          several warps a token, several tokens a block (the
                                emulator's thread-order check)
  contract                      crosslayer.contracts' validator and traffic floor

Adding an op: its contract in crosslayer/contracts.py, then one OpSpec here; the
op-specific tests (paths only that op has) go in tests/test_<op>.py.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from crosslayer._checks import acc_dtype
from crosslayer.contracts import CONTRACTS, Contract
from crosslayer.ops.depth_aggregate import depth_aggregate_bwd_op, depth_aggregate_op, depth_aggregate_slots_op
from crosslayer.ops.depth_aggregate_qkv_norm import (depth_aggregate_qkv_norm_bwd_op, depth_aggregate_qkv_norm_op,
                                                     depth_aggregate_qkv_norm_slots_op)
from crosslayer.ops.hc_boundary import (hc_boundary_bwd_op, hc_boundary_mix_bwd_op, hc_boundary_mix_op,
                                       hc_boundary_op)
from crosslayer.ops.hc_post import hc_post_bwd_op, hc_post_op
from crosslayer.ops.hc_pre import hc_pre_bwd_op, hc_pre_op
from crosslayer.ops.mhc_boundary import mhc_boundary_bwd_op, mhc_boundary_op
from crosslayer.ops.mhc_coeffs import mhc_coeffs_bwd_op, mhc_coeffs_op, mhc_pre_op
from crosslayer.ops.mudd_weights import mudd_weights_bwd_into_op, mudd_weights_bwd_op, mudd_weights_op
from crosslayer.ops.stream_mix import stream_mix_bwd_op, stream_mix_dots_op, stream_mix_op
from hc_inputs import STREAM_LAYOUTS, make_streams, make_vec

EPS = 1e-6
SLOT_LAYOUTS = ("stride2", "tokens_transposed", "misaligned")


@dataclass(frozen=True)
class Case:
    """One input configuration; `id` names it in test ids, `p` holds its sizes/flags.
    `grad_outputs` (optional): the indices of the outputs that receive a gradient (the
    others' backward input is None, the kernels' absent-gradient path); default all."""

    id: str
    p: Dict = field(default_factory=dict)

    def __getitem__(self, key):
        return self.p[key]

    def get(self, key, default=None):
        return self.p.get(key, default)


@dataclass
class Sample:
    """Inputs of one call: `tensors` are the differentiable inputs; call(module, *tensors)
    runs the op of `module` (crosslayer.ops or crosslayer.ref) with the fixed arguments
    bound, returning a tensor or a tuple of tensors."""

    tensors: List[torch.Tensor]
    call: Callable


@dataclass(frozen=True)
class OpSpec:
    name: str
    sample: Callable[[Case, torch.dtype, torch.device], Sample]
    cases: Tuple[Case, ...]
    exhaustive_cases: Tuple[Case, ...]
    opcheck_calls: Callable[[torch.dtype, torch.device], List[Tuple[object, tuple]]]
    launcher_errors: Callable[[object, torch.device], List[Tuple[Callable[[], object], str]]]
    big: Case  # many tokens at a real width: multi-block reductions (determinism on a GPU)
    wide: Case  # several warps a token and several tokens a block, emulator-sized
    tiny: Case  # gradcheck-sized
    empty: Case  # zero tokens

    @property
    def contract(self) -> Contract:
        return CONTRACTS[self.name]


def rand(*shape, dtype=torch.float32, device="cpu", scale=1.0):
    return (torch.randn(*shape, device=device) * scale).to(dtype)


# ----------------------------------------------------------------------------- hc_pre


def hc_pre_params(n, d, dtype, device, dynamic=True):
    """Random A, B (and W ~ N(0, 1/d), s_a, s_b of order one for DHC) in the arithmetic
    dtype: far from the init, so every backward term matters."""
    cd = acc_dtype(dtype)
    A = torch.randn(n, n + 1, device=device, dtype=cd)
    B = torch.randn(n, device=device, dtype=cd)
    if not dynamic:
        return [A, B]
    W = torch.randn(d, n + 2, device=device, dtype=cd) / math.sqrt(d)
    s_a = torch.rand((), device=device, dtype=cd) + 0.5
    s_b = torch.rand((), device=device, dtype=cd) + 0.5
    return [A, B, W, s_a, s_b]


def hc_pre_sample(case, dtype, device):
    lead, n, d = case["lead"], case["n"], case["d"]
    H = make_streams(lead, n, d, dtype=dtype, device=device, layout=case.get("layout", "contiguous"))
    params = hc_pre_params(n, d, dtype, device, dynamic=not case.get("static", False))
    return Sample([H, *params], lambda m, *t: m.hc_pre(*t, eps=EPS))


def hc_pre_opcheck(dtype, device):
    n, d = 3, 20
    calls = []
    for layout in ("contiguous", "folded", "stream_stride"):  # dH allocated like H
        H = make_streams((2, 3), n, d, dtype=dtype, device=device, layout=layout)
        params = hc_pre_params(n, d, dtype, device)
        _, alpha, beta, q, r, Wt = hc_pre_op(H, *params, EPS)
        A, B, W, s_a, s_b = params
        dx = rand(2, 3, d, dtype=dtype, device=device)
        calls += [(hc_pre_op, (H, *params, EPS)),
                  (hc_pre_op, tuple(t.detach().clone().requires_grad_(True) for t in (H, *params)) + (EPS,)),
                  (hc_pre_bwd_op, (torch.empty_like(H), False, dx, torch.randn_like(alpha), torch.randn_like(beta), H,
                                   A, B, W, Wt, s_a, s_b, q, r, EPS)),
                  (hc_pre_bwd_op, (torch.randn_like(H), True, dx, None, None, H, A, B, W, Wt, s_a, s_b, q, r, EPS))]
    return calls


def hc_pre_launcher_errors(kernels, device):
    H = torch.randn(3, 4, 8, device=device)
    A, B, W, s_a, s_b = hc_pre_params(4, 8, torch.float32, device)
    x, alpha, beta, q, r, Wt = kernels.hc_pre_fwd(H, A, B, W, s_a, s_b, EPS)
    dx = torch.randn(3, 8, device=device)
    H17 = torch.randn(3, 17, 8, device=device)
    dH = torch.empty_like(H)
    fwd, bwd = kernels.hc_pre_fwd, kernels.hc_pre_bwd
    return [
        (lambda: fwd(H, A, B, W[:, :5], s_a, s_b, EPS), re.escape("W must have shape (d, n+2) = [8, 6], got [8, 5]")),
        (lambda: fwd(H, A[:, :4], B, W, s_a, s_b, EPS), re.escape("A must have shape (n, n+1) = [4, 5]")),
        (lambda: fwd(H, A, B, W, s_a.reshape(1), s_b, EPS), r"s_a must be a 0-dim tensor"),
        (lambda: fwd(H[..., :0], A, B, W[:0], s_a, s_b, EPS), "d >= 1"),
        (lambda: fwd(H17, H17.new_zeros(17, 18), H17.new_zeros(17), H17.new_zeros(8, 19), s_a, s_b, EPS),
         "H must have 1 to 16 streams"),
        (lambda: fwd(H, A, B, W.to("meta"), s_a, s_b, EPS), "W is on meta but H is on"),
        (lambda: bwd(dH, False, dx, alpha[:, :, :4], None, H, A, B, W, Wt, s_a, s_b, q, r), r"dalpha must have shape \(\.\.\., n, n\+1\)"),
        (lambda: bwd(dH, False, dx, None, beta[:2], H, A, B, W, Wt, s_a, s_b, q, r), r"dbeta must have shape \(\.\.\., n\)"),
        (lambda: bwd(dH, False, dx, None, None, H, A, B, W, Wt, s_a, s_b, q[..., :5], r), r"q must have shape \(\.\.\., n, n\+2\)"),
        (lambda: bwd(dH, False, dx.double(), None, None, H, A, B, W, Wt, s_a, s_b, q, r), "dx must have H's dtype"),
        (lambda: bwd(dH[:, :3], True, dx, None, None, H, A, B, W, Wt, s_a, s_b, q, r),
         re.escape("dH must have shape (..., n, d) = [3, 4, 8], got [3, 3, 8]")),
        (lambda: bwd(dH, False, dx, None, None, H, A, B, W, W, s_a, s_b, q, r),
         re.escape("Wt (W packed by the forward) must have shape (n+2, ldw) = [6, 8], got [8, 6]")),
        (lambda: bwd(dH, False, dx, None, None, H, A, B, W, Wt.double(), s_a, s_b, q, r),
         "Wt must be the forward's packed W: contiguous Float, got Double"),
    ]


# ------------------------------------------------------------------ hc_post, stream_mix


def hc_coeffs(lead, n, dtype, device, static):
    """Random alpha (n, n+1) or (*lead, n, n+1) and beta (n,) or (*lead, n), arithmetic dtype."""
    shape = () if static else tuple(lead)
    cd = acc_dtype(dtype)
    return (torch.randn(*shape, n, n + 1, device=device, dtype=cd),
            torch.randn(*shape, n, device=device, dtype=cd))


def hc_post_sample(case, dtype, device):
    lead, n, d, layout = case["lead"], case["n"], case["d"], case.get("layout", "contiguous")
    H = make_streams(lead, n, d, dtype=dtype, device=device, layout=layout)
    y = make_vec(lead, d, dtype=dtype, device=device, misaligned=layout == "misaligned")
    alpha, beta = hc_coeffs(lead, n, dtype, device, case.get("static", False))
    return Sample([H, y, alpha, beta], lambda m, *t: m.hc_post(*t))


def stream_mix_sample(case, dtype, device):
    lead, n, d = case["lead"], case["n"], case["d"]
    H = make_streams(lead, n, d, dtype=dtype, device=device, layout=case.get("layout", "contiguous"))
    alpha, w = hc_coeffs(lead, n, dtype, device, case.get("static", False))
    if case.get("w_column"):  # static w read in place with an element stride (SHC's alpha[:, 0])
        w = alpha[:, 0]
    return Sample([H, w], lambda m, *t: m.stream_mix(*t))


def hc_post_opcheck(dtype, device):
    calls = []
    for static, layout in ((False, "contiguous"), (True, "folded"), (False, "stream_stride")):
        H = make_streams((2, 3), 3, 20, dtype=dtype, device=device, layout=layout)
        y = rand(2, 3, 20, dtype=dtype, device=device)
        alpha, beta = hc_coeffs((2, 3), 3, dtype, device, static)
        calls += [(hc_post_op, (H, y, alpha, beta)),
                  (hc_post_bwd_op, (torch.randn_like(H), H, y, alpha, beta))]
    return calls


def stream_mix_opcheck(dtype, device):
    calls = []
    for static, layout in ((False, "contiguous"), (True, "folded"), (False, "stream_stride")):
        H = make_streams((2, 3), 3, 20, dtype=dtype, device=device, layout=layout)
        w = hc_coeffs((2, 3), 3, dtype, device, static)[1]
        calls += [(stream_mix_op, (H, w)),
                  (stream_mix_bwd_op, (torch.empty_like(H), False, rand(2, 3, 20, dtype=dtype, device=device), H, w)),
                  (stream_mix_bwd_op, (torch.randn_like(H), True, rand(2, 3, 20, dtype=dtype, device=device), H, w)),
                  (stream_mix_dots_op, (rand(2, 3, 20, dtype=dtype, device=device), H))]
    return calls


def hc_post_launcher_errors(kernels, device):
    H = torch.randn(3, 4, 8, device=device)
    y = torch.randn(3, 8, device=device)
    alpha, beta = torch.randn(4, 5, device=device), torch.randn(4, device=device)
    fwd = kernels.hc_post_fwd
    return [
        (lambda: fwd(H, y[:, :7], alpha, beta), re.escape("y must have shape (*lead, d) = [3, 8], got [3, 7]")),
        (lambda: fwd(H, y, torch.randn_like(H[..., :4]), beta), re.escape("alpha must have shape (*lead, n, n+1) = [3, 4, 5]")),
        (lambda: fwd(H, y, alpha, beta.new_zeros(3, 5)), re.escape("beta must have shape (*lead, n) = [3, 4]")),
        (lambda: fwd(H, y.double(), alpha, beta), "y must have H's dtype"),
        (lambda: fwd(H, y, alpha.int(), beta), "alpha must have dtype float32, bfloat16, float16 or float64"),
        (lambda: fwd(H, y, alpha.to("meta"), beta), "alpha is on meta but H is on"),
        (lambda: kernels.hc_post_bwd(torch.randn_like(H[..., :1]).expand(3, 4, 9).contiguous(), H, y, alpha, beta),
         re.escape("dH_new must have shape (*lead, n, d) = [3, 4, 8]")),
    ]


def stream_mix_launcher_errors(kernels, device):
    H = torch.randn(3, 4, 8, device=device)
    w = torch.randn(4, device=device)
    dH, bwd = torch.empty_like(H), kernels.stream_mix_bwd
    return [
        (lambda: kernels.stream_mix_fwd(H.int(), w), "H must have dtype float32, bfloat16, float16 or float64"),
        (lambda: kernels.stream_mix_fwd(H.new_zeros(3, 17, 8), H.new_zeros(17)), "H must have 1 to 16 streams"),
        (lambda: kernels.stream_mix_fwd(H.new_zeros(8), H.new_zeros(1)),
         re.escape("H must have shape (*lead, n, d) with at least 2 dims")),
        (lambda: bwd(dH, False, H[:, 0], H, w.new_zeros(5)), re.escape("w must have shape (*lead, n) = [3, 4]")),
        (lambda: bwd(dH, False, H.new_zeros(3, 9), H, w), re.escape("dx must have shape (*lead, d) = [3, 8]")),
        (lambda: bwd(dH, False, H[:, 0].double(), H, w), "dx must have H's dtype"),
        (lambda: bwd(dH[:, :3], True, H[:, 0], H, w), re.escape("dH must have shape (*lead, n, d) = [3, 4, 8]")),
        (lambda: kernels.stream_mix_dots(H.new_zeros(3, 9), H), re.escape("dx must have shape (*lead, d) = [3, 8]")),
    ]


# ------------------------------------------------------------------------ hc_boundary


def hc_boundary_sample(case, dtype, device):
    lead, n, d, layout = case["lead"], case["n"], case["d"], case.get("layout", "contiguous")
    H = make_streams(lead, n, d, dtype=dtype, device=device, layout=layout)
    y = make_vec(lead, d, dtype=dtype, device=device, misaligned=layout == "misaligned")
    alpha, beta = hc_coeffs(lead, n, dtype, device, case.get("static", False))
    params = hc_pre_params(n, d, dtype, device, dynamic=not case.get("shc", False))
    return Sample([H, y, alpha, beta, *params], lambda m, *t: m.hc_boundary(*t, eps=EPS))


def hc_boundary_opcheck(dtype, device):
    n, d = 3, 20
    calls = []
    for static, layout in ((False, "contiguous"), (True, "folded"), (False, "stream_stride")):
        H = make_streams((2, 3), n, d, dtype=dtype, device=device, layout=layout)
        y = rand(2, 3, d, dtype=dtype, device=device)
        alpha, beta = hc_coeffs((2, 3), n, dtype, device, static)
        params = hc_pre_params(n, d, dtype, device)
        H_next, _, alpha_next, beta_next, q, r, Wt = hc_boundary_op(H, y, alpha, beta, *params, EPS)
        A, B, W, s_a, s_b = params
        dx = rand(2, 3, d, dtype=dtype, device=device)
        calls += [(hc_boundary_op, (H, y, alpha, beta, *params, EPS)),
                  (hc_boundary_op, tuple(t.detach().clone().requires_grad_(True)
                                         for t in (H, y, alpha, beta, *params)) + (EPS,)),
                  (hc_boundary_bwd_op, (torch.randn_like(H_next), dx, torch.randn_like(alpha_next),
                                        torch.randn_like(beta_next), H, y, alpha, beta, A, B, W, Wt, s_a, s_b,
                                        q, r, EPS)),
                  (hc_boundary_bwd_op, (torch.randn_like(H_next), dx, None, None, H, y, alpha, beta, A, B, W, Wt,
                                        s_a, s_b, q, r, EPS)),
                  (hc_boundary_mix_op, (H, y, alpha, beta, A)),
                  (hc_boundary_mix_bwd_op, (torch.randn_like(H_next), dx, H, y, alpha, beta, A))]
    return calls


def boundary_error_inputs(device):
    """H (3, 4, 8), y, and per-token alpha, beta: a boundary's valid post inputs."""
    H = torch.randn(3, 4, 8, device=device)
    y = torch.randn(3, 8, device=device)
    return H, y, torch.randn(3, 4, 5, device=device), torch.randn(3, 4, device=device)


def hc_boundary_launcher_errors(kernels, device):
    H, y, alpha, beta = boundary_error_inputs(device)
    A, B, W, s_a, s_b = hc_pre_params(4, 8, torch.float32, device)
    H_next, x, alpha_next, beta_next, q, r, Wt = kernels.hc_boundary_fwd(H, y, alpha, beta, A, B, W, s_a, s_b, EPS)
    fwd, bwd = kernels.hc_boundary_fwd, kernels.hc_boundary_bwd
    return [
        (lambda: fwd(H, y[:, :7], alpha, beta, A, B, W, s_a, s_b, EPS),
         re.escape("y must have shape (*lead, d) = [3, 8], got [3, 7]")),
        (lambda: fwd(H, y, alpha[..., :4], beta, A, B, W, s_a, s_b, EPS),
         re.escape("alpha must have shape (*lead, n, n+1) = [3, 4, 5]")),
        (lambda: fwd(H, y, alpha, beta, A, B, W[:, :5], s_a, s_b, EPS),
         re.escape("W must have shape (d, n+2) = [8, 6], got [8, 5]")),
        (lambda: fwd(H, y, alpha, beta, A, B, W, s_a.reshape(1), s_b, EPS), r"s_a must be a 0-dim tensor"),
        (lambda: fwd(H, y.double(), alpha, beta, A, B, W, s_a, s_b, EPS), "y must have H's dtype"),
        (lambda: bwd(H_next[:, :3], x, None, None, H, y, alpha, beta, A, B, W, Wt, s_a, s_b, q, r),
         re.escape("dH_next must have shape (..., n, d) = [3, 4, 8], got [3, 3, 8]")),
        (lambda: bwd(H_next, x[:, :7], None, None, H, y, alpha, beta, A, B, W, Wt, s_a, s_b, q, r),
         re.escape("dx must have shape (..., d) = [3, 8]")),
        (lambda: bwd(H_next, x, alpha_next[..., :4], None, H, y, alpha, beta, A, B, W, Wt, s_a, s_b, q, r),
         r"dalpha must have shape \(\.\.\., n, n\+1\)"),
        (lambda: bwd(H_next, x, None, None, H, y, alpha, beta, A, B, W, Wt, s_a, s_b, q[..., :5], r),
         r"q must have shape \(\.\.\., n, n\+2\)"),
        (lambda: kernels.hc_boundary_mix_fwd(H, y, alpha, beta, A[:3]),
         re.escape("A_next must have shape (n, n+1) = [4, 5], got [3, 5]")),
        (lambda: kernels.hc_boundary_mix_bwd(H_next, x.double(), H, y, alpha, beta, A), "dx must have H's dtype"),
    ]


# ------------------------------------------------------------------------- mhc_coeffs


def mhc_params(n, d, dtype, device):
    """phi ~ N(0, 1/(n·d)), a_* in [0.5, 1.5], b ~ N(0, 1): O(1), far-from-converged
    Sinkhorn logits, so every iterate matters in the backward."""
    cd, m = acc_dtype(dtype), n * n + 2 * n
    phi = torch.randn(n * d, m, device=device, dtype=cd) / math.sqrt(n * d)
    a = [torch.rand((), device=device, dtype=cd) + 0.5 for _ in range(3)]
    return [phi, *a, torch.randn(m, device=device, dtype=cd)]


def mhc_coeffs_sample(case, dtype, device):
    lead, n, d = case["lead"], case["n"], case["d"]
    H = make_streams(lead, n, d, dtype=dtype, device=device, layout=case.get("layout", "contiguous"))
    iters = case.get("iters", 20)
    return Sample([H, *mhc_params(n, d, dtype, device)], lambda m, *t: m.mhc_coeffs(*t, iters=iters))


MHC_FLOATS = (EPS, EPS, 2.0, 5, EPS)  # eps, pre_eps, post_mult, iters, sinkhorn_eps


def mhc_coeffs_opcheck(dtype, device):
    n, d = 3, 20
    calls = []
    for layout in ("contiguous", "folded", "stream_stride"):
        H = make_streams((2, 3), n, d, dtype=dtype, device=device, layout=layout)
        params = mhc_params(n, d, dtype, device)
        alpha, beta, u, r = mhc_coeffs_op(H, *params, *MHC_FLOATS)
        calls += [(mhc_coeffs_op, (H, *params, *MHC_FLOATS)),
                  (mhc_pre_op, (H, *params, *MHC_FLOATS)),
                  (mhc_coeffs_bwd_op, (torch.empty_like(H), False, None, torch.randn_like(alpha),
                                       torch.randn_like(beta), None, None, H, *params, u, r, *MHC_FLOATS)),
                  (mhc_coeffs_bwd_op, (torch.empty_like(H), False, torch.randn_like(H), None, torch.randn_like(beta),
                                       None, None, H, *params, u, r, *MHC_FLOATS)),
                  (mhc_coeffs_bwd_op, (torch.randn_like(H), True, None, None, torch.randn_like(beta), torch.randn_like(beta),
                                       rand(2, 3, d, dtype=dtype, device=device), H, *params, u, r, *MHC_FLOATS))]
    return calls


def mhc_coeffs_launcher_errors(kernels, device):
    H = torch.randn(3, 4, 8, device=device)
    phi, a_pre, a_post, a_res, b = mhc_params(4, 8, torch.float32, device)
    fwd, bwd = kernels.mhc_coeffs_fwd, kernels.mhc_coeffs_bwd
    alpha, beta, u, r = fwd(H, phi, a_pre, a_post, a_res, b, *MHC_FLOATS)
    dH = torch.empty_like(H)
    eps, pre_eps, post_mult, _, sk_eps = MHC_FLOATS
    return [
        (lambda: fwd(H, phi[:, :23], a_pre, a_post, a_res, b, *MHC_FLOATS), r"phi must have shape \(n·d, n²\+2n\)"),
        (lambda: kernels.mhc_pre_fwd(H, phi[:, :23], a_pre, a_post, a_res, b, *MHC_FLOATS),
         r"phi must have shape \(n·d, n²\+2n\)"),
        (lambda: fwd(H, phi, a_pre, a_post, a_res, b[:23], *MHC_FLOATS), r"b must have shape \(n²\+2n,\)"),
        (lambda: fwd(H, phi, a_pre, a_post, a_res.reshape(1), b, *MHC_FLOATS), r"a_res must be a 0-dim tensor"),
        (lambda: fwd(H, phi, a_pre, a_post, a_res, b, eps, pre_eps, post_mult, 0, sk_eps), "iters must be >= 1"),
        (lambda: fwd(H.new_zeros(2, 17, 2), H.new_zeros(34, 323), a_pre, a_post, a_res, H.new_zeros(323), *MHC_FLOATS),
         "H must have 1 to 16 streams"),
        (lambda: fwd(H[..., :0], phi[:0], a_pre, a_post, a_res, b, *MHC_FLOATS), r"H must have d >= 1"),
        (lambda: fwd(H.new_zeros(8), phi, a_pre, a_post, a_res, b, *MHC_FLOATS), r"H must have shape \(\*lead, n, d\)"),
        (lambda: bwd(dH, False, None, alpha[:, :, :4], None, None, None, H, phi, a_pre, a_post, a_res, b, u, r, *MHC_FLOATS),
         r"dalpha must have shape \(\.\.\., n, n\+1\)"),
        (lambda: bwd(dH, False, None, None, beta[:2], None, None, H, phi, a_pre, a_post, a_res, b, u, r, *MHC_FLOATS),
         r"dbeta must have shape \(\.\.\., n\)"),
        (lambda: bwd(dH, False, None, None, None, beta[:2], None, H, phi, a_pre, a_post, a_res, b, u, r, *MHC_FLOATS),
         r"dpre must have shape \(\.\.\., n\)"),
        (lambda: bwd(dH, False, None, None, None, None, H[:, 0, :7], H, phi, a_pre, a_post, a_res, b, u, r, *MHC_FLOATS),
         re.escape("dx must have shape (..., d) = [3, 8]")),
        (lambda: bwd(dH[:2], False, None, alpha, beta, None, None, H, phi, a_pre, a_post, a_res, b, u, r, *MHC_FLOATS),
         re.escape("dH must have shape (..., n, d) = [3, 4, 8], got [2, 4, 8]")),
        (lambda: bwd(dH, False, None, alpha, beta, None, None, H, phi, a_pre, a_post, a_res, b, u[:, :5], r, *MHC_FLOATS),
         r"u must have shape"),
        (lambda: bwd(dH, False, None, alpha, beta, None, None, H, phi, a_pre, a_post, a_res, b, u, r[:2], *MHC_FLOATS),
         r"r must have shape"),
        (lambda: bwd(dH, False, H[:2], alpha, beta, None, None, H, phi, a_pre, a_post, a_res, b, u, r, *MHC_FLOATS),
         re.escape("prior must have shape (..., n, d) = [3, 4, 8], got [2, 4, 8]")),
        (lambda: bwd(dH, True, H, alpha, beta, None, None, H, phi, a_pre, a_post, a_res, b, u, r, *MHC_FLOATS),
         "accumulate .* and prior .* are exclusive"),
    ]


# ----------------------------------------------------------------------- mhc_boundary


def mhc_boundary_sample(case, dtype, device):
    lead, n, d, layout = case["lead"], case["n"], case["d"], case.get("layout", "contiguous")
    H = make_streams(lead, n, d, dtype=dtype, device=device, layout=layout)
    y = make_vec(lead, d, dtype=dtype, device=device, misaligned=layout == "misaligned")
    alpha, beta = hc_coeffs(lead, n, dtype, device, case.get("static", False))
    iters = case.get("iters", 20)
    return Sample([H, y, alpha, beta, *mhc_params(n, d, dtype, device)],
                  lambda m, *t: m.mhc_boundary(*t, iters=iters))


def mhc_boundary_opcheck(dtype, device):
    n, d = 3, 20
    calls = []
    for layout, static in (("contiguous", False), ("folded", False), ("stream_stride", True)):
        H = make_streams((2, 3), n, d, dtype=dtype, device=device, layout=layout)
        y = rand(2, 3, d, dtype=dtype, device=device)
        alpha, beta = hc_coeffs((2, 3), n, dtype, device, static)
        calls.append((mhc_boundary_op, (H, y, alpha, beta, *mhc_params(n, d, dtype, device), *MHC_FLOATS)))
    # bf16, n = 4, d >= 32: the fused backward's launcher, through the forward op's
    # autograd and as its own op (without dx' and the coefficient gradients too).
    n, d, bf16 = 4, 40, torch.bfloat16
    H = make_streams((2, 3), n, d, dtype=bf16, device=device, layout="contiguous")
    y = rand(2, 3, d, dtype=bf16, device=device)
    alpha, beta = hc_coeffs((2, 3), n, bf16, device, False)
    params = mhc_params(n, d, bf16, device)
    calls.append((mhc_boundary_op, (H, y, alpha, beta, *params, *MHC_FLOATS)))
    H_next, x, alpha_n, beta_n, u, r = mhc_boundary_op(H, y, alpha, beta, *params, *MHC_FLOATS)
    for dx, dalpha_n, dbeta_n in ((torch.randn_like(x), torch.randn_like(alpha_n), torch.randn_like(beta_n)),
                                  (None, None, None)):
        calls.append((mhc_boundary_bwd_op, (torch.randn_like(H_next), dx, dalpha_n, dbeta_n, H, y, alpha, beta,
                                            H_next, *params, u, r, *MHC_FLOATS)))
    return calls


def mhc_boundary_launcher_errors(kernels, device):
    H, y, alpha, beta = boundary_error_inputs(device)
    phi, a_pre, a_post, a_res, b = mhc_params(4, 8, torch.float32, device)
    fwd = kernels.mhc_boundary_fwd
    return [
        (lambda: fwd(H, y[:, :7], alpha, beta, phi, a_pre, a_post, a_res, b, *MHC_FLOATS),
         re.escape("y must have shape (*lead, d)")),
        (lambda: fwd(H, y, alpha[:, :, :4], beta, phi, a_pre, a_post, a_res, b, *MHC_FLOATS), "alpha must have shape"),
        (lambda: fwd(H, y, alpha, beta, phi[:, :23], a_pre, a_post, a_res, b, *MHC_FLOATS),
         r"phi must have shape \(n·d, n²\+2n\)"),
        (lambda: fwd(H, y, alpha, beta, phi, a_pre, a_post, a_res, b, 1e-6, 1e-6, 2.0, 0, 1e-6), "iters must be >= 1"),
    ]


# -------------------------------------------------------------------- depth_aggregate


def depth_slots(l, tok, d, dtype, device, layout):
    """S (l, *tok, d): contiguous, every other slot of a bigger stack (stride2), token
    dims transposed, or misaligned (base 2 elements past 16 bytes, odd row stride)."""
    if layout == "contiguous":
        return rand(l, *tok, d, dtype=dtype, device=device)
    if layout == "stride2":
        return rand(2 * l + 1, *tok, d, dtype=dtype, device=device)[1::2]
    if layout == "tokens_transposed":
        return rand(l, tok[1], tok[0], d, dtype=dtype, device=device).transpose(1, 2)
    if layout == "misaligned":
        return rand(l, *tok, d + 3, dtype=dtype, device=device)[..., 2:2 + d]
    raise ValueError(layout)


def depth_aggregate_sample(case, dtype, device):
    l, tok, d, C = case["l"], case["tok"], case["d"], case["C"]
    S = depth_slots(l, tok, d, dtype, device, case.get("layout", "contiguous"))
    A = torch.randn((C, l) if case.get("static", False) else (*tok, C, l), device=device, dtype=acc_dtype(dtype))
    return Sample([S, A], lambda m, *t: m.depth_aggregate(*t))


def depth_aggregate_opcheck(dtype, device):
    S = rand(4, 9, 20, dtype=dtype, device=device)
    slots = [rand(9, 20, dtype=dtype, device=device) for _ in range(4)]  # separate tensors (a DepthStack's)
    calls = []
    for A in (torch.randn(9, 3, 4, device=device), torch.randn(3, 4, device=device)):
        dS = rand(4, 9, 20, dtype=dtype, device=device)
        calls += [(depth_aggregate_op, (S, A)),
                  (depth_aggregate_slots_op, (slots, A)),
                  (depth_aggregate_bwd_op, (rand(3, 9, 20, dtype=dtype, device=device), slots, A, dS, True)),
                  (depth_aggregate_bwd_op, (rand(3, 9, 20, dtype=dtype, device=device), S.unbind(0), A, dS, False))]
    return calls


def depth_aggregate_launcher_errors(kernels, device):
    S = torch.randn(3, 4, 8, device=device).unbind(0)
    dY, A = torch.zeros(2, 4, 8, device=device), torch.zeros(4, 2, 3, device=device)
    return [
        (lambda: kernels.depth_aggregate_fwd(S, A.new_zeros(4, 2, 5)), r"A must have shape \(N, C, l\)"),
        (lambda: kernels.depth_aggregate_bwd(dY, S, A, dY.new_zeros(2, 4, 8), False), r"dS must have shape \(l, N, d\)"),
        (lambda: kernels.depth_aggregate_bwd(dY, S, A, dY.new_zeros(3, 4, 16)[..., ::2], False), "unit stride"),
        (lambda: kernels.depth_aggregate_fwd([S[0], S[1], S[2][:3]], A[:3]), r"S\[2\] must have S\[0\]'s shape"),
        (lambda: kernels.depth_aggregate_fwd([S[0], S[1].double(), S[2]], A), r"S\[1\] must have S\[0\]'s dtype"),
        (lambda: kernels.depth_aggregate_fwd([], A), "S must hold 1 to 128 slots, got 0"),
    ]


def qkv_norm_sample(case, dtype, device):
    l, tok, d = case["l"], case["tok"], case["d"]
    S = depth_slots(l, tok, d, dtype, device, case.get("layout", "contiguous"))
    cd = acc_dtype(dtype)
    A = torch.randn((4, l) if case.get("static", False) else (*tok, 4, l), device=device, dtype=cd)
    g = 1 + 0.5 * torch.randn(3, d, device=device, dtype=cd)
    return Sample([S, A, g], lambda m, *t: m.depth_aggregate_qkv_norm(*t, EPS))


def qkv_norm_opcheck(dtype, device):
    S = rand(4, 9, 20, dtype=dtype, device=device)
    A, g = torch.randn(9, 4, 4, device=device), torch.ones(3, 20, device=device)
    out, rstd = depth_aggregate_qkv_norm_op(S, A, g, EPS)
    dOut = rand(4, 9, 20, dtype=dtype, device=device)
    slots = [rand(9, 20, dtype=dtype, device=device) for _ in range(4)]  # separate tensors (a DepthStack's)
    return [(depth_aggregate_qkv_norm_op, (S, A, g, EPS)),
            (depth_aggregate_qkv_norm_slots_op, (slots, A, g, EPS)),
            (depth_aggregate_qkv_norm_bwd_op, (dOut, S.unbind(0), A, g, rstd,
                                               rand(4, 9, 20, dtype=dtype, device=device), False, EPS)),
            (depth_aggregate_qkv_norm_bwd_op, (dOut, slots, A, g, rstd, rand(4, 9, 20, dtype=dtype, device=device),
                                               True, EPS))]


def qkv_norm_launcher_errors(kernels, device):
    S3 = torch.randn(3, 4, 8, device=device)
    S = S3.unbind(0)
    A = torch.randn(4, 4, 3, device=device)
    g = torch.randn(3, 8, device=device)
    rstd = torch.ones(3, 4, device=device)
    dOut = torch.randn(4, 4, 8, device=device)
    fwd, bwd = kernels.depth_aggregate_qkv_norm_fwd, kernels.depth_aggregate_qkv_norm_bwd
    return [
        (lambda: fwd(S, A[:, :3], g, EPS), r"A must have shape \(N, 4, l\)"),
        (lambda: fwd(S, A[0, :, :2], g, EPS), r"A must have shape \(4, l\)"),
        (lambda: fwd(S, A, g.new_zeros(3, 9), EPS), r"norm_weights must have shape \(3, d\)"),
        (lambda: fwd(S3.new_zeros(129, 2, 4).unbind(0), S3.new_zeros(4, 129), S3.new_zeros(3, 4), EPS),
         r"S must hold 1 to 128 slots"),
        (lambda: bwd(dOut[:3], S, A, g, rstd, torch.empty_like(S3), False), r"dOut must have shape \(4, N, d\)"),
        (lambda: bwd(dOut, S, A, g, rstd, S3.new_zeros(2, 4, 8), False), r"dS must have shape \(l, N, d\)"),
        (lambda: bwd(dOut, S, A, g, rstd.new_ones(3, 5), torch.empty_like(S3), False), r"rstd must have shape \(3, N\)"),
        (lambda: bwd(dOut, S, A, g, rstd, S3.new_zeros(3, 4, 16)[..., ::2], False), "unit stride"),
        (lambda: bwd(dOut, S, A, g, rstd, S3.new_zeros(3, 4, 8).double(), False), "dS must have S's dtype"),
        (lambda: bwd(dOut.double(), S, A, g, rstd, torch.empty_like(S3), False), "dOut must have S's dtype"),
    ]


# ----------------------------------------------------------------------- mudd_weights


def mudd_params(d, K, C, l, dtype, device, bias_2d=False):
    """W1 ~ N(0, 1/d), W2 ~ N(0, 1/K), bias ~ N(0, 1) (far from the W2 = 0 init)."""
    cd = acc_dtype(dtype)
    W1 = torch.randn(d, K, device=device, dtype=cd) / math.sqrt(d)
    W2 = torch.randn(K, C * l, device=device, dtype=cd) / math.sqrt(K)
    bias = torch.randn(*((C, l) if bias_2d else (C * l,)), device=device, dtype=cd)
    return [W1, W2, bias]


def mudd_weights_sample(case, dtype, device):
    tok, d, K, C, l = case["tok"], case["d"], case["K"], case["C"], case["l"]
    if case.get("strided", False):
        x = rand(*tok, d + 3, dtype=dtype, device=device)[..., :d]
    else:
        x = rand(*tok, d, dtype=dtype, device=device)
    approximate = case.get("approximate", "none")
    params = mudd_params(d, K, C, l, dtype, device, case.get("bias_2d", False))
    return Sample([x, *params], lambda m, *t: m.mudd_weights(*t, C, EPS, approximate=approximate))


def mudd_weights_opcheck(dtype, device):
    calls = []
    x = rand(7, 40, dtype=dtype, device=device)
    for approximate in ("none", "tanh"):
        W1, W2, bias = mudd_params(40, 16, 4, 2, dtype, device)
        A, u, r = mudd_weights_op(x, W1, W2, bias, 4, EPS, approximate)
        calls += [(mudd_weights_op, (x, W1, W2, bias, 4, EPS, approximate)),
                  (mudd_weights_bwd_op, (torch.randn_like(A), x, W1, W2, bias, u, r, 4, EPS, approximate)),
                  (mudd_weights_bwd_into_op, (torch.randn_like(A), x, W1, W2, bias, u, r, 4, EPS, approximate,
                                              rand(7, 40, dtype=dtype, device=device)))]
    return calls


def mudd_weights_launcher_errors(kernels, device):
    x = torch.randn(3, 8, device=device)
    W1, W2, bias = mudd_params(8, 6, 4, 3, torch.float32, device)
    fwd, bwd = kernels.mudd_weights_fwd, kernels.mudd_weights_bwd
    A, u, r = fwd(x, W1, W2, bias, 4, EPS, "none")
    return [
        (lambda: fwd(x, W1[:7], W2, bias, 4, EPS, "none"), r"W1 must have shape \(d, K\) with d = x.shape\[-1\] = 8"),
        (lambda: fwd(x, W1, W2[:5], bias, 4, EPS, "none"), r"W2 must have shape \(K, C\*l\) with K = W1.shape\[1\] = 6"),
        (lambda: fwd(x, W1, W2, bias, 5, EPS, "none"), r"W2 must have shape \(K, C\*l\) with C = n_ways = 5"),
        (lambda: fwd(x, W1, W2, bias[:5], 4, EPS, "none"), r"bias must have shape"),
        (lambda: fwd(x, W1, W2, bias, 4, EPS, "erf"), "approximate must be 'none' or 'tanh'"),
        (lambda: fwd(x, W1, W2, bias, 0, EPS, "none"), "n_ways must be >= 1"),
        (lambda: fwd(x[:, :0], W1[:0], W2, bias, 4, EPS, "none"), "d >= 1"),
        (lambda: fwd(x.to(torch.int32), W1, W2, bias, 4, EPS, "none"), "x must have dtype"),
        (lambda: bwd(A[:, :3], x, W1, W2, bias, u, r, 4, EPS, "none", None), r"dA must have shape \(\*tok, C, l\)"),
        (lambda: bwd(A, x, W1, W2, bias, u[:, :5], r, 4, EPS, "none", None), r"u must have shape \(\*tok, K\)"),
        (lambda: bwd(A, x, W1, W2, bias, u, r[:2], 4, EPS, "none", None), r"r must have shape \(\*tok,\)"),
        (lambda: bwd(A, x, W1, W2, bias, u, r, 4, EPS, "sigmoid", None), "approximate must be 'none' or 'tanh'"),
        (lambda: bwd(A, x, W1, W2, bias, u, r, 4, EPS, "none", x.double()), "dx must have x's dtype"),
        (lambda: bwd(A, x, W1, W2, bias, u, r, 4, EPS, "none", x[:2]), r"dx must have shape \(\*tok, d\) like x"),
    ]


# ------------------------------------------------------------------ the GPU matrices
# Every dtype runs them on CUDA by default; the emulator runs them under --exhaustive.
# Odd token counts; d = 1, 7 (scalar path), 129, 4099 (vector path with tails), 2048.

HC_SHAPES = [((1,), 1), ((5,), 7), ((37,), 129), ((3, 11), 4099), ((64,), 2048)]


def hc_matrix(ns, shapes=HC_SHAPES, flags=((),)):
    """(lead, n, d) cases for every shape and n, cycling through `flags` (dicts of extra
    parameters) so that every shape and every n sees each."""
    out = []
    for k, ((lead, d), n) in enumerate((shape, n) for shape in shapes for n in ns):
        extra = dict(flags[k % len(flags)])
        tag = "-".join(key if v is True else "grads" + "".join(map(str, v)) if key == "grad_outputs" else key
                       for key, v in extra.items() if v is not False)
        out.append((f"N{'x'.join(map(str, lead))}-n{n}-d{d}" + (f"-{tag}" if tag else ""),
                    dict(lead=lead, n=n, d=d, **extra)))
    return out


DEPTH_SHAPES = [(1, (1,), 1, 1), (3, (5,), 7, 4), (13, (37,), 129, 4), (2, (3, 11), 4099, 3), (25, (64,), 2048, 4),
                (5, (17,), 300, 6), (128, (3,), 33, 1)]  # (l, tok, d, C); C = 6: two way groups
MUDD_SHAPES = [((1,), 1, 5, 4, 3), ((5,), 7, 1, 1, 1), ((37,), 129, 64, 4, 3), ((3, 11), 4099, 128, 4, 25),
               ((67,), 2048, 128, 4, 25), ((19,), 2048, 200, 1, 25), ((45,), 129, 5, 1, 25),
               ((2, 17), 1, 200, 4, 1)]  # (tok, d, K, C, l); K > 128: two column passes


# ---------------------------------------------------------------------------- registry


def _cases(*entries) -> Tuple[Case, ...]:
    return tuple(Case(id_, p) for id_, p in entries)


# big, wide, tiny and empty of hc_pre and hc_post (both read H (*lead, n, d)).
HC_EDGE_CASES = dict(big=Case("N4099-n4-d2048", dict(lead=(4099,), n=4, d=2048)),
                     wide=Case("N3-n4-d2056", dict(lead=(3,), n=4, d=2056)),
                     tiny=Case("N3-n2-d5", dict(lead=(3,), n=2, d=5)),
                     empty=Case("N0-n4-d8", dict(lead=(0,), n=4, d=8)))

SPECS: Tuple[OpSpec, ...] = (
    OpSpec("hc_pre", hc_pre_sample,
           cases=_cases(("N5x7-n4-d129", dict(lead=(5, 7), n=4, d=129)),
                        ("N11-n3-d7-misaligned", dict(lead=(11,), n=3, d=7, layout="misaligned")),
                        ("N2x5-n4-d40-folded-shc", dict(lead=(2, 5), n=4, d=40, layout="folded", static=True))),
           exhaustive_cases=_cases(*[(f"N{N}-n{n}-d{d}-{lay}", dict(lead=(N,), n=n, d=d, layout=lay))
                                     for N, n, d, lay in [(1, 1, 1, "contiguous"), (33, 2, 515, "padded"),
                                                          (9, 8, 64, "stream_stride"), (17, 16, 33, "contiguous"),
                                                          (70, 5, 2200, "misaligned")]]
                                   + [(f"N5x7-n{n}-d131-{lay}", dict(lead=(5, 7), n=n, d=131, layout=lay))
                                      for lay in STREAM_LAYOUTS for n in (4, 3)]
                                   + hc_matrix((1, 2, 3, 4, 8, 16), flags=({}, dict(grad_outputs=(0,)), dict(static=True)))),
           opcheck_calls=hc_pre_opcheck, launcher_errors=hc_pre_launcher_errors, **HC_EDGE_CASES),
    OpSpec("hc_post", hc_post_sample,
           cases=_cases(("N5x7-n4-d129", dict(lead=(5, 7), n=4, d=129)),
                        ("N11-n3-d7-misaligned-static", dict(lead=(11,), n=3, d=7, layout="misaligned", static=True)),
                        ("N2x5-n4-d40-folded", dict(lead=(2, 5), n=4, d=40, layout="folded"))),
           exhaustive_cases=_cases(*[(f"N{N}-n{n}-d{d}-{lay}-{'static' if st else 'token'}",
                                      dict(lead=(N,), n=n, d=d, layout=lay, static=st))
                                     for N, n, d, lay, st in [(1, 1, 1, "contiguous", False),
                                                              (33, 2, 515, "padded", True),
                                                              (9, 8, 64, "stream_stride", False),
                                                              (17, 16, 33, "contiguous", True),
                                                              (300, 4, 2048, "contiguous", False)]]
                                   + [(f"N3x7-n{n}-d{d}-{lay}", dict(lead=(3, 7), n=n, d=d, layout=lay))
                                      for lay in STREAM_LAYOUTS for n in (1, 4, 16) for d in (129, 2048)]
                                   + hc_matrix((1, 2, 3, 4, 8, 16), [((), 7), ((3,), 1), ((5,), 7), ((37,), 129), ((3, 9), 4099), ((33,), 2048)], flags=(dict(static=False), dict(static=True)))),
           opcheck_calls=hc_post_opcheck, launcher_errors=hc_post_launcher_errors, **HC_EDGE_CASES),
    OpSpec("hc_boundary", hc_boundary_sample,
           cases=_cases(("N5x7-n4-d129", dict(lead=(5, 7), n=4, d=129)),
                        ("N11-n3-d7-misaligned-static", dict(lead=(11,), n=3, d=7, layout="misaligned", static=True)),
                        ("N2x5-n8-d40-folded", dict(lead=(2, 5), n=8, d=40, layout="folded")),
                        ("N5x7-n4-d129-shc-static", dict(lead=(5, 7), n=4, d=129, shc=True, static=True)),
                        ("N11-n3-d7-misaligned-shc", dict(lead=(11,), n=3, d=7, layout="misaligned", shc=True))),
           exhaustive_cases=_cases(*[(f"N{N}-n{n}-d{d}-{lay}", dict(lead=(N,), n=n, d=d, layout=lay))
                                     for N, n, d, lay in [(1, 1, 1, "contiguous"), (33, 2, 515, "padded"),
                                                          (9, 8, 64, "stream_stride"), (17, 16, 33, "contiguous"),
                                                          (70, 5, 2200, "misaligned")]]
                                   + [(f"N5x7-n{n}-d131-{lay}", dict(lead=(5, 7), n=n, d=131, layout=lay))
                                      for lay in STREAM_LAYOUTS for n in (4, 3)]
                                   + hc_matrix((1, 2, 3, 4, 8, 16),
                                               flags=({}, dict(grad_outputs=(0, 1)), dict(static=True),
                                                      dict(shc=True), dict(shc=True, static=True)))),
           opcheck_calls=hc_boundary_opcheck, launcher_errors=hc_boundary_launcher_errors, **HC_EDGE_CASES),
    OpSpec("stream_mix", stream_mix_sample,
           cases=_cases(("N5x7-n4-d129", dict(lead=(5, 7), n=4, d=129)),
                        ("N11-n3-d7-misaligned-static", dict(lead=(11,), n=3, d=7, layout="misaligned", static=True)),
                        ("N6-n4-d40-static-w-column", dict(lead=(6,), n=4, d=40, static=True, w_column=True))),
           exhaustive_cases=_cases(*[(f"N{N}-n{n}-d{d}-{lay}", dict(lead=(N,), n=n, d=d, layout=lay))
                                     for N, n, d, lay in [(1, 1, 1, "contiguous"), (33, 16, 515, "padded"),
                                                          (9, 8, 64, "stream_stride")]]
                                   + [(f"N3x7-n{n}-d{d}-{lay}", dict(lead=(3, 7), n=n, d=d, layout=lay))
                                      for lay in STREAM_LAYOUTS for n in (1, 4, 16) for d in (129, 2048)]
                                   + hc_matrix((1, 2, 3, 4, 8, 16), [((), 7), ((3,), 1), ((5,), 7), ((37,), 129), ((3, 9), 4099), ((33,), 2048)], flags=(dict(static=False), dict(static=True)))),
           opcheck_calls=stream_mix_opcheck, launcher_errors=stream_mix_launcher_errors,
           big=Case("N4099-n4-d2048-static", dict(lead=(4099,), n=4, d=2048, static=True)),
           wide=Case("N3-n4-d2056", dict(lead=(3,), n=4, d=2056)),
           tiny=Case("N3-n2-d5-static", dict(lead=(3,), n=2, d=5, static=True)),
           empty=Case("N0x3-n4-d8", dict(lead=(0, 3), n=4, d=8))),
    OpSpec("mhc_coeffs", mhc_coeffs_sample,
           cases=_cases(("N7-n4-d24", dict(lead=(7,), n=4, d=24)),
                        ("N3x5-n3-d7-stream_stride", dict(lead=(3, 5), n=3, d=7, layout="stream_stride", iters=5))),
           exhaustive_cases=_cases(*[(f"N{N}-n{n}-d{d}-{lay}", dict(lead=(N,), n=n, d=d, layout=lay))
                                     for N, n, d, lay in [(1, 1, 1, "contiguous"), (19, 8, 129, "padded"),
                                                          (21, 5, 515, "misaligned"), (70, 4, 2200, "contiguous")]]
                                   + [(f"N5x7-n{n}-d131-{lay}", dict(lead=(5, 7), n=n, d=131, layout=lay))
                                      for lay in STREAM_LAYOUTS for n in (4, 3)]
                                   + hc_matrix((1, 2, 4, 5, 8), [((1,), 1), ((5,), 7), ((37,), 129), ((3, 11), 4099), ((70,), 2048)], flags=({}, dict(grad_outputs=(0,)), dict(grad_outputs=(1,))))),
           opcheck_calls=mhc_coeffs_opcheck, launcher_errors=mhc_coeffs_launcher_errors,
           big=Case("N4099-n4-d2048", dict(lead=(4099,), n=4, d=2048)),
           wide=Case("N3-n4-d2056", dict(lead=(3,), n=4, d=2056)),
           tiny=Case("N2-n2-d3", dict(lead=(2,), n=2, d=3, iters=4)),
           empty=Case("N0-n4-d8", dict(lead=(0,), n=4, d=8))),
    OpSpec("mhc_boundary", mhc_boundary_sample,
           cases=_cases(("N5x7-n4-d129", dict(lead=(5, 7), n=4, d=129)),
                        ("N11-n3-d7-misaligned-static", dict(lead=(11,), n=3, d=7, layout="misaligned", static=True,
                                                              iters=5)),
                        ("N2x5-n8-d40-folded", dict(lead=(2, 5), n=8, d=40, layout="folded")),
                        ("N37-n4-d64-stream_stride-static", dict(lead=(37,), n=4, d=64, layout="stream_stride",
                                                                 static=True)),
                        # the fused backward without dH_next, and without dx' and the coefficients'
                        ("N9-n4-d72-grads1", dict(lead=(9,), n=4, d=72, grad_outputs=(1,))),
                        ("N3x3-n2-d40-folded-grads0", dict(lead=(3, 3), n=2, d=40, layout="folded", grad_outputs=(0,)))),
           exhaustive_cases=_cases(*[(f"N{N}-n{n}-d{d}-{lay}", dict(lead=(N,), n=n, d=d, layout=lay))
                                     for N, n, d, lay in [(1, 1, 1, "contiguous"), (19, 8, 129, "padded"),
                                                          (21, 5, 515, "misaligned"), (70, 4, 2200, "contiguous")]]
                                   + [(f"N5x7-n{n}-d131-{lay}", dict(lead=(5, 7), n=n, d=131, layout=lay))
                                      for lay in STREAM_LAYOUTS for n in (4, 3)]
                                   + hc_matrix((1, 2, 3, 4, 5, 8), [((1,), 1), ((5,), 7), ((37,), 129), ((70,), 2048)],
                                               flags=({}, dict(static=True), dict(grad_outputs=(0, 1)),
                                                      dict(grad_outputs=(1,)), dict(grad_outputs=(0,))))),
           opcheck_calls=mhc_boundary_opcheck, launcher_errors=mhc_boundary_launcher_errors,
           big=Case("N4099-n4-d2048", dict(lead=(4099,), n=4, d=2048)),
           wide=Case("N3-n4-d2056", dict(lead=(3,), n=4, d=2056)),
           tiny=Case("N2-n2-d3", dict(lead=(2,), n=2, d=3, iters=4)),
           empty=Case("N0-n4-d8", dict(lead=(0,), n=4, d=8))),
    OpSpec("depth_aggregate", depth_aggregate_sample,
           cases=_cases(("l5-N3x4-d37-C4", dict(l=5, tok=(3, 4), d=37, C=4)),
                        ("l3-N9-d7-C1-static-stride2", dict(l=3, tok=(9,), d=7, C=1, static=True, layout="stride2")),
                        ("l4-N2x3-d40-C4-misaligned", dict(l=4, tok=(2, 3), d=40, C=4, layout="misaligned"))),
           exhaustive_cases=_cases(*[(f"l{l}-N{N}-d{d}-C{C}-{lay}", dict(l=l, tok=(N,), d=d, C=C, layout=lay))
                                     for l, N, d, C, lay in [(1, 1, 1, 1, "contiguous"), (25, 4, 2048, 4, "contiguous"),
                                                             (13, 33, 129, 6, "stride2"), (128, 3, 64, 4, "contiguous")]]
                                   + [(f"l6-N7x5-d131-C4-{lay}", dict(l=6, tok=(7, 5), d=131, C=4, layout=lay))
                                      for lay in SLOT_LAYOUTS]
                                   + [(f"l{l}-N{'x'.join(map(str, tok))}-d{d}-C{C}-{'static' if st else 'token'}", dict(l=l, tok=tok, d=d, C=C, static=st)) for l, tok, d, C in DEPTH_SHAPES for st in (False, True)]),
           opcheck_calls=depth_aggregate_opcheck, launcher_errors=depth_aggregate_launcher_errors,
           big=Case("l25-N4099-d2048-C4-static", dict(l=25, tok=(4099,), d=2048, C=4, static=True)),
           wide=Case("l5-N3-d2056-C4", dict(l=5, tok=(3,), d=2056, C=4)),
           tiny=Case("l3-N4-d5-C2", dict(l=3, tok=(4,), d=5, C=2)),
           empty=Case("l3-N0-d8-C4", dict(l=3, tok=(0,), d=8, C=4))),
    OpSpec("depth_aggregate_qkv_norm", qkv_norm_sample,
           cases=_cases(("l3-N6-d70", dict(l=3, tok=(6,), d=70)),
                        ("l5-N2x3-d7-static-stride2", dict(l=5, tok=(2, 3), d=7, static=True, layout="stride2"))),
           exhaustive_cases=_cases(*[(f"l{l}-N{N}-d{d}-{lay}", dict(l=l, tok=(N,), d=d, layout=lay))
                                     for l, N, d, lay in [(1, 1, 1, "contiguous"), (25, 4, 2048, "misaligned"),
                                                          (128, 3, 129, "contiguous")]]
                                   + [(f"l6-N7x5-d131-{lay}", dict(l=6, tok=(7, 5), d=131, layout=lay))
                                      for lay in SLOT_LAYOUTS]),
           opcheck_calls=qkv_norm_opcheck, launcher_errors=qkv_norm_launcher_errors,
           big=Case("l25-N4099-d2048-static", dict(l=25, tok=(4099,), d=2048, static=True)),
           wide=Case("l5-N3-d2056", dict(l=5, tok=(3,), d=2056)),
           tiny=Case("l2-N3-d4", dict(l=2, tok=(3,), d=4)),
           empty=Case("l3-N0-d8", dict(l=3, tok=(0,), d=8))),
    OpSpec("mudd_weights", mudd_weights_sample,
           cases=_cases(("N2x9-d40-K24-C4-l3", dict(tok=(2, 9), d=40, K=24, C=4, l=3)),
                        ("N5-d7-K5-C1-l2-tanh-strided", dict(tok=(5,), d=7, K=5, C=1, l=2, approximate="tanh",
                                                             strided=True, bias_2d=True))),
           exhaustive_cases=_cases(*[(f"N{N}-d{d}-K{K}-C{C}-l{l}", dict(tok=(N,), d=d, K=K, C=C, l=l))
                                     for N, d, K, C, l in [(1, 1, 1, 1, 1), (33, 129, 64, 4, 25),
                                                           (17, 2048, 200, 4, 3), (9, 4099, 128, 1, 13)]]
                                   + [(f"N5x7-d{d}-K128-C4-l25-strided", dict(tok=(5, 7), d=d, K=128, C=4, l=25,
                                                                             strided=True)) for d in (129, 2048)]
                                   + [(f"N{'x'.join(map(str, tok))}-d{d}-K{K}-C{C}-l{l}-{ap}", dict(tok=tok, d=d, K=K, C=C, l=l, approximate=ap, bias_2d=ap == "tanh")) for tok, d, K, C, l in MUDD_SHAPES for ap in ("none", "tanh")]),
           opcheck_calls=mudd_weights_opcheck, launcher_errors=mudd_weights_launcher_errors,
           big=Case("N4099-d2048-K128-C4-l25", dict(tok=(4099,), d=2048, K=128, C=4, l=25)),
           wide=Case("N9-d2056-K64-C4-l3", dict(tok=(9,), d=2056, K=64, C=4, l=3)),
           tiny=Case("N3-d6-K4-C2-l2", dict(tok=(3,), d=6, K=4, C=2, l=2)),
           empty=Case("N0-d64-K16-C4-l3", dict(tok=(0,), d=64, K=16, C=4, l=3))),
)

BY_NAME: Dict[str, OpSpec] = {s.name: s for s in SPECS}


def case_params(specs: Sequence[OpSpec], exhaustive: bool = False):
    """(spec, case) pairs with readable ids for pytest.mark.parametrize."""
    import pytest

    out = []
    for s in specs:
        for c in s.cases:
            out.append(pytest.param(s, c, id=f"{s.name}-{c.id}"))
        if exhaustive:
            for c in s.exhaustive_cases:
                out.append(pytest.param(s, c, id=f"{s.name}-{c.id}", marks=pytest.mark.exhaustive))
    return out
