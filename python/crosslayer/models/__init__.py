"""Language models built on crosslayer's connections (DESIGN.md "models/").

    CrossLayerLM, LMConfig   a small Llama-style decoder whose cross-layer connection
                             is switchable: residual, shc, dhc, mhc, dwa, mudd
    MUDDFormer               the released MUDDFormer: its PyTorch checkpoints load with
                             strict=True; its dense connections run on crosslayer's ops
    MUDDFormerConfig         its config (the release's field names; from_json for config.json)
    MUDDPythia               the released MUDDPythia (LayerNorm, biases, parallel residual,
                             partial RoPE): the same, for its checkpoints
    MUDDPythiaConfig         its config (the release's field names; from_json for config.json)
"""

from crosslayer.models.lm import CONNECTIONS, CrossLayerLM, LMConfig
from crosslayer.models.muddformer import MUDDFormer, MUDDFormerConfig
from crosslayer.models.muddpythia import MUDDPythia, MUDDPythiaConfig

__all__ = ["CONNECTIONS", "CrossLayerLM", "LMConfig", "MUDDFormer", "MUDDFormerConfig", "MUDDPythia",
           "MUDDPythiaConfig"]
