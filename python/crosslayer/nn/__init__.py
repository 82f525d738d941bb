"""Modules users put in models: the depth stack and the MUDD / DenseFormer
connections over it (DESIGN.md "MUDD family").

    DepthStack       one preallocated (L+1, *tok, d) stack per forward pass, one
                     gradient buffer per backward pass (no per-layer copies)
    MUDDConnection   multiway dynamic dense connection (MUDDFormer)
    DenseFormerDWA   static depth-weighted average (DenseFormer)
"""

from crosslayer.nn.depth_stack import DepthStack
from crosslayer.nn.mudd import DenseFormerDWA, MUDDConnection, mudd_hidden

__all__ = ["DepthStack", "MUDDConnection", "DenseFormerDWA", "mudd_hidden"]
