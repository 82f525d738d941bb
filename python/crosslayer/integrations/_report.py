"""What an integration's accelerate() did, and the check of the model it is given
(shared by crosslayer.integrations.*)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

from torch import nn


def check_model(fn: str, model, what: str) -> None:
    """TypeError unless `model` is a torch.nn.Module (`what`: the model `fn` expects)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module ({what}), got {type(model).__name__}")


@dataclass
class AccelerationReport:
    """What accelerate() did. Names are those of `model.named_modules()` ("" is the
    model itself); `kind` names the modules an integration converts."""

    kind: str = "module"
    accelerated: List[str] = field(default_factory=list)
    # name -> why the module was left on its own forward
    unsupported: Dict[str, str] = field(default_factory=dict)
    # "a -> b": a boundary between two converted modules that runs as one fused op
    fused_boundaries: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"crosslayer: {len(self.accelerated)} {self.kind}(s) accelerated, "
                 f"{len(self.unsupported)} left unchanged"
                 + (f", {len(self.fused_boundaries)} boundaries between them fused" if self.fused_boundaries else "")]
        lines += [f"  {name or '<model>'}: {why}" for name, why in self.unsupported.items()]
        return "\n".join(lines)
