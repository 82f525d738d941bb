"""crosslayer: fused CUDA kernels for learnable cross-layer connections.

    crosslayer.ref   the plain-PyTorch oracle, one function per op (the spec)
    crosslayer.ops   the same ops, fused on CUDA when the extension is built,
                     the oracle otherwise (CPU tensors, or no extension)
    crosslayer.nn    modules: DepthStack, MUDDConnection, DenseFormerDWA
    crosslayer.integrations.hyper_connections
                     accelerate(model): lucidrains' hyper-connections package on
                     crosslayer.ops, in place (import it explicitly; needs that package)

`python -m crosslayer.info` says what was built and which ops run fused.
"""

from crosslayer import nn, ops, ref
from crosslayer._extension import _C

__version__ = "0.1.0"

__all__ = ["nn", "ops", "ref", "__version__"]
