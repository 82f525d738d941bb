"""Language models built on crosslayer's connections (DESIGN.md "models/").

    MUDDFormer        the released MUDDFormer: its PyTorch checkpoints load with
                      strict=True; its dense connections run on crosslayer's ops
    MUDDFormerConfig  its config (the release's field names; from_json for config.json)
"""

from crosslayer.models.muddformer import MUDDFormer, MUDDFormerConfig

__all__ = ["MUDDFormer", "MUDDFormerConfig"]
