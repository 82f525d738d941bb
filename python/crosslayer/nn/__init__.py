"""Modules users put in models (DESIGN.md "HC family" and "MUDD family").

    HyperConnections          SHC / DHC around one sublayer: H = hc(H, branch), or
                              x, post = hc.pre(H); H = post(branch(x))
    ManifoldHyperConnections  mHC (Sinkhorn-projected mixing), same call forms
    PendingStreams            post.defer(y) / hc(H, branch, defer_post=True): the next
                              connection's pre takes it (SHC/DHC fuse the post into it)
    expand_streams / reduce_streams   entry (repeat n times) and exit (sum) of the streams
    param_groups              optimizer groups with no weight decay on static connection parameters
    DepthStack                one preallocated (L+1, *tok, d) stack per forward pass, one
                              gradient buffer per backward pass (no per-layer copies)
    MUDDConnection            multiway dynamic dense connection (MUDDFormer)
    DenseFormerDWA            static depth-weighted average (DenseFormer)
"""

from crosslayer.nn.depth_stack import DepthStack
from crosslayer.nn.hc import (HyperConnections, ManifoldHyperConnections, PendingStreams, StreamPost, expand_streams,
                              param_groups, reduce_streams, static_connection_parameters)
from crosslayer.nn.mudd import DenseFormerDWA, MUDDConnection, mudd_hidden

__all__ = ["HyperConnections", "ManifoldHyperConnections", "PendingStreams", "StreamPost", "expand_streams",
           "reduce_streams",
           "param_groups", "static_connection_parameters", "DepthStack", "MUDDConnection",
           "DenseFormerDWA", "mudd_hidden"]
