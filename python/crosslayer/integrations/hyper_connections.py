"""crosslayer for models built with lucidrains' `hyper-connections` package (PyPI; written
against and tested with version 0.4.11): run its HyperConnections modules on
crosslayer.ops in place.

    from crosslayer.integrations.hyper_connections import accelerate
    report = accelerate(model)          # strict=True raises if any module is unsupported

What changes: the class of each supported `hyper_connections.HyperConnections` instance
becomes `FusedHyperConnections`, a subclass whose forward calls `crosslayer.ops.hc_pre`
and `crosslayer.ops.hc_post` (the fused kernels for CUDA tensors when the extension is
built, the oracle otherwise). Nothing else changes: the module objects, their parameters,
buffers, hooks and branches stay the same objects, so `model.state_dict()` is unchanged,
checkpoints load both ways and optimizers built before the call keep working.
`restore(model)` switches the modules back.

Math. With num_fracs = 1, one input view and tanh, the package computes per token, from
the streams H_i (i < n) of width d:

    normed_i = F.normalize(H_i)·√d·(γ + 1)            F.normalize: x / max(‖x‖, 1e-12)
    alpha    = static_alpha + dynamic_alpha_scale·tanh(normed_i @ dynamic_alpha_fn)
    beta     = static_beta  + dynamic_beta_scale·tanh(normed_i @ dynamic_beta_fn)
    branch input = Σ_i alpha[i,0]·H_i;     H'_k = beta_k·y + Σ_i alpha[i,1+k]·H_i

which is crosslayer's DHC (DESIGN.md, HC family) with A = static_alpha, B = static_beta,
s_a, s_b = the two scales, and the norm weight folded into
W = diag(γ + 1)·[dynamic_alpha_fn | dynamic_beta_fn]  (d, n+2), rebuilt on every call
from the parameters with differentiable ops, so gradients reach the package's own
parameters. The norm factor √d / max(‖x‖, 1e-12) is crosslayer's rsqrt(mean x² + eps)
with eps = (1e-12)² / d: the two agree to rounding unless ‖H_i‖ is below about 1e-10
(the package clamps, crosslayer smooths); both give H_i = 0 zero dynamic terms.

Layout. The package folds the streams into the batch dim: residuals are ((b·n), ..., d)
with the stream index minor. The fused forward views them as H (b, ..., n, d) without a
copy (crosslayer's ops take any token and stream strides) and folds H' back, so the
package's expand / reduce stream functions, StreamEmbed and everything between layers
stay as they are. (crosslayer.ref.expand_streams uses the (..., n, d) layout instead;
do not mix the two.)

Supported: `hyper_connections.HyperConnections` itself (not a subclass) with
num_fracs = 1, num_input_views = 1, tanh = True, channel_first = False,
add_branch_out_to_residual = True, the default depth_residual_fn (add), the package's
RMSNorm, 1 to 16 streams, any dropout (applied to the new residuals as the package
does), any branch. Every other module of the package that mixes streams (other
configurations, the channel-first / multi-input variants, mHC) keeps the package's
forward and is listed in the report.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from crosslayer import ops
from crosslayer.contracts import MAX_STREAMS
from crosslayer.integrations._report import AccelerationReport, check_model

try:
    from hyper_connections import hyper_connections as hc_lib
except ImportError as e:
    raise ImportError(
        "crosslayer.integrations.hyper_connections needs the `hyper-connections` package: "
        "pip install hyper-connections==0.4.11"
    ) from e

__all__ = ["accelerate", "restore", "FusedHyperConnections", "AccelerationReport",
           "UnsupportedHyperConnections", "TESTED_VERSION"]

TESTED_VERSION = "0.4.11"

# F.normalize's default clamp on ‖x‖ (the package's RMSNorm calls it with defaults).
_NORMALIZE_EPS = 1e-12

# Classes of the package, other than HyperConnections itself, that mix residual streams
# and are reported as unsupported when found in a model.
_VARIANT_NAMES = ("HyperConnections", "ManifoldConstrainedHyperConnections")


class UnsupportedHyperConnections(ValueError):
    """accelerate(model, strict=True) found modules it cannot map exactly."""


class FusedHyperConnections(hc_lib.HyperConnections):
    """`hyper_connections.HyperConnections` with its forward on crosslayer.ops.

    Same constructor, parameters and call forms as the package's class: `hc(residuals)`
    with a branch returns the new residuals; without one it returns
    `(branch_input, add_residual)`. Usually made by `accelerate(model)` from existing
    modules; constructing one directly checks that the configuration is supported.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        problem = _config_problem(self)
        if problem is not None:
            raise UnsupportedHyperConnections(
                f"FusedHyperConnections does not support this configuration: {problem}; "
                "use hyper_connections.HyperConnections for it"
            )

    def forward(self, residuals: Tensor, *branch_args, **branch_kwargs):
        """residuals: ((b·n), ..., d), the n streams folded into the batch dim.
        With a branch: returns the new residuals, same shape (or the branch's output
        pytree with its first leaf replaced by them, as the package does). Without:
        returns branch_input (b, ..., d) and add_residual(branch_output)."""
        H = self._unfold(residuals)
        A, B, W, s_a, s_b = self._dhc_parameters(H)
        x, alpha, beta = ops.hc_pre(H, A, B, W, s_a, s_b, eps=_NORMALIZE_EPS**2 / H.shape[-1])

        def add_residual(branch_out):
            (y, *rest), spec = tree_flatten(branch_out)
            new = self._fold(ops.hc_post(H, y, alpha, beta))
            return tree_unflatten((self.dropout(new), *rest), spec)

        if self.branch is None:
            return x, add_residual
        return add_residual(self.branch(x, *branch_args, **branch_kwargs))

    def _unfold(self, residuals: Tensor) -> Tensor:
        """((b·n), ..., d) -> H (b, ..., n, d), a view."""
        n, d = self.num_residual_streams, self.norm.gamma.shape[0]
        if residuals.dim() < 2 or residuals.shape[0] % n != 0 or residuals.shape[-1] != d:
            raise ValueError(
                f"residuals must have shape (batch·{n}, ..., {d}): the {n} streams folded "
                f"into the batch dim (stream index minor) and {d} features last; got "
                f"{tuple(residuals.shape)}"
            )
        return residuals.unflatten(0, (-1, n)).movedim(1, -2)

    @staticmethod
    def _fold(H: Tensor) -> Tensor:
        """H' (b, ..., n, d) -> ((b·n), ..., d); a view when H' is laid out like the
        residuals (the fused kernels allocate it so)."""
        return H.movedim(-2, 1).flatten(0, 1)

    def _dhc_parameters(self, H: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(A, B, W, s_a, s_b) of crosslayer's DHC from the package's parameters, in the
        ops' arithmetic dtype (float64 when H or a parameter is float64, else float32)."""
        params = (self.static_alpha, self.static_beta, self.dynamic_alpha_fn,
                  self.dynamic_beta_fn, self.norm.gamma)
        wide = H.dtype == torch.float64 or any(p.dtype == torch.float64 for p in params)
        acc = torch.float64 if wide else torch.float32
        gain = self.norm.gamma.to(acc) + 1
        W = torch.cat([self.dynamic_alpha_fn.to(acc), self.dynamic_beta_fn.to(acc).unsqueeze(-1)],
                      dim=-1) * gain.unsqueeze(-1)
        return (self.static_alpha.to(acc), self.static_beta.to(acc), W,
                self.dynamic_alpha_scale.to(acc), self.dynamic_beta_scale.to(acc))


def _config_problem(m: hc_lib.HyperConnections) -> Optional[str]:
    """Why this HyperConnections configuration cannot run on crosslayer.ops exactly;
    None when it can."""
    problems = []
    if m.num_fracs != 1:
        problems.append(f"num_fracs = {m.num_fracs} (frac-connections; crosslayer mixes whole streams)")
    if m.num_input_views != 1:
        problems.append(f"num_input_views = {m.num_input_views} (crosslayer's hc_pre makes one "
                        "branch input)")
    if not isinstance(m.act, nn.Tanh):
        problems.append("tanh = False (crosslayer's DHC applies tanh)")
    if m.channel_first:
        problems.append("channel_first = True (crosslayer's ops take features last)")
    if not m.add_branch_out_to_residual:
        problems.append("add_branch_out_to_residual = False")
    if m.depth_residual_fn is not hc_lib.add:
        problems.append("a custom depth_residual_fn (crosslayer's hc_post adds)")
    if type(m.norm) is not hc_lib.RMSNorm:
        problems.append(f"norm is {type(m.norm).__name__}, not the package's RMSNorm")
    if not 1 <= m.num_residual_streams <= MAX_STREAMS:
        problems.append(f"num_residual_streams = {m.num_residual_streams} (crosslayer takes 1 "
                        f"to {MAX_STREAMS})")
    return "; ".join(problems) or None


def _mixes_streams(m: nn.Module) -> bool:
    """`m` is one of the package's stream-mixing modules (any variant)."""
    cls = type(m)
    return isinstance(m, hc_lib.HyperConnections) or (
        cls.__module__.startswith("hyper_connections.") and cls.__name__ in _VARIANT_NAMES)


def _unsupported_reason(m: nn.Module) -> Optional[str]:
    """Why accelerate() leaves this stream-mixing module alone; None when it converts it."""
    cls = type(m)
    if cls in (hc_lib.HyperConnections, FusedHyperConnections):
        return _config_problem(m)
    where = f"{cls.__module__}.{cls.__qualname__}"
    if isinstance(m, hc_lib.HyperConnections):
        return f"{where} subclasses HyperConnections and may change its math"
    if cls.__name__ == "ManifoldConstrainedHyperConnections":
        return (f"{where} (mHC): crosslayer.ops has no op for this package's mHC "
                "(per-stream projection, sigmoid pre/post, Sinkhorn)")
    return f"{where}: only hyper_connections.HyperConnections is mapped"


def _warn_if_untested_version() -> None:
    try:
        version = importlib.metadata.version("hyper-connections")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    if version != TESTED_VERSION:
        warnings.warn(
            f"crosslayer.integrations.hyper_connections maps the math of hyper-connections "
            f"{TESTED_VERSION}; installed: {version}. Check outputs against the package's "
            "forward (restore(model)) before relying on it.",
            stacklevel=3,
        )


def accelerate(model: nn.Module, *, strict: bool = False) -> AccelerationReport:
    """Run every supported `hyper_connections.HyperConnections` in `model` (the model
    itself included) on crosslayer.ops, in place.

    Supported modules change class to FusedHyperConnections (parameters, state_dict and
    module identity unchanged); modules already converted count as accelerated. Every
    other stream-mixing module of the package is left on its own forward and listed in
    the report with the reason. strict=True raises UnsupportedHyperConnections instead,
    before converting anything.
    """
    check_model("accelerate", model, "the model whose hyper_connections.HyperConnections modules to convert")
    _warn_if_untested_version()
    report = AccelerationReport(kind="hyper-connection module")
    convert = []
    for name, m in model.named_modules():
        if not _mixes_streams(m):
            continue
        reason = _unsupported_reason(m)
        if reason is None:
            report.accelerated.append(name)
            convert.append(m)
        else:
            report.unsupported[name] = reason
    if strict and report.unsupported:
        raise UnsupportedHyperConnections(
            "accelerate(strict=True): these modules cannot run on crosslayer.ops exactly, "
            "nothing was converted:\n"
            + "\n".join(f"  {name or '<model>'}: {why}" for name, why in report.unsupported.items())
        )
    for m in convert:
        m.__class__ = FusedHyperConnections
    return report


def restore(model: nn.Module) -> List[str]:
    """Undo accelerate(): every FusedHyperConnections in `model` goes back to the
    package's HyperConnections (parameters untouched). Returns their names."""
    check_model("restore", model, "the model accelerate() converted")
    names = []
    for name, m in model.named_modules():
        if type(m) is FusedHyperConnections:
            m.__class__ = hc_lib.HyperConnections
            names.append(name)
    return names
