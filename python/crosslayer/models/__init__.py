"""Reference models.

    CrossLayerLM, LMConfig   a small Llama-style decoder whose cross-layer connection
                             is switchable: residual, shc, dhc, mhc, dwa, mudd
"""

from crosslayer.models.lm import CONNECTIONS, CrossLayerLM, LMConfig

__all__ = ["CONNECTIONS", "CrossLayerLM", "LMConfig"]
