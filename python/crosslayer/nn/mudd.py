"""MUDD and DenseFormer connection modules over a depth stack.

Slot convention (crosslayer.ref.mudd): slot 0 = embedding, slot j = output of block
j-1; the connection after block i (`layer_index` i, 0-based) sees l = i + 2 slots.

    stack = DepthStack.start(x0, n_slots=L + 1)
    h = x0
    for i in range(L):
        x = blocks[i](h)            # block 0 takes x0; block i > 0 the ways of conn i-1
        stack.push(x)
        h = conns[i](stack)         # MUDDConnection: (C, *tok, d); DWA: (*tok, d)
    # last MUDD layer: h is (1, *tok, d), its single way; then the final norm

Both modules also take a plain Python list of the slot tensors instead of a
DepthStack: then they run the list-and-stack oracle (`torch.stack` of the slots and
`crosslayer.ref`), the baseline the DepthStack path is tested and benchmarked against.

Dispatch. On a DepthStack the aggregation runs `crosslayer.ops.depth_aggregate` (fused
on CUDA with the extension built, the oracle otherwise) and its backward adds into the
stack's one gradient buffer. The MUDD weights run `crosslayer.ops.mudd_weights` (fused
on CUDA, the oracle otherwise); on a DepthStack (DepthStack.mudd_weights) their x
gradient is added into the same buffer.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from crosslayer import ops, ref
from crosslayer._checks import check_index
from crosslayer.contracts import GELU_APPROXIMATIONS, MAX_SLOTS, check_norm_eps
from crosslayer.ref import mudd as ref_mudd
from crosslayer.nn.depth_stack import DepthStack

__all__ = ["MUDDConnection", "DenseFormerDWA", "mudd_hidden"]

StackLike = Union[DepthStack, Sequence[Tensor]]


def mudd_hidden(n_ways: int, n_slots: int, expand: int = 1, round64: bool = False) -> int:
    """Hidden width K of a MUDD weight MLP (MUDDFormer `__init__`): C·l·expand, then
    with round64 (K // 64 + 1)·64, which always rounds up (64 -> 128). n_ways, n_slots,
    expand: ints >= 1; round64: a bool."""
    check_index("mudd_hidden", "n_ways", n_ways, 1)
    check_index("mudd_hidden", "n_slots", n_slots, 1)
    check_index("mudd_hidden", "expand", expand, 1)
    if not isinstance(round64, bool):
        raise TypeError(f"mudd_hidden: round64 must be a bool, got {type(round64).__name__} ({round64!r})")
    K = n_ways * n_slots * expand
    return (K // 64 + 1) * 64 if round64 else K


def _check_stack(stack: StackLike, n_filled: int, who: str) -> None:
    have = len(stack)
    if have != n_filled:
        raise ValueError(f"{who} expects a stack with {n_filled} filled slots (slot 0 = "
                         f"embedding, then one per block so far), got {have}")


class MUDDConnection(nn.Module):
    """Multiway dynamic dense connection after block `layer_index` (MUDDFormer DA).

    A = GELU(rms(x) @ W1) @ W2 + bias  (per token, (*tok, C, l)), x = the newest slot;
    Y_c = Σ_j A[.., c, j]·S_j over the l = layer_index + 2 filled slots.

    d:                  model width
    layer_index:        i, 0-based block index this connection follows
    n_layers:           L; the last layer (i = L-1) has a single way (the last of
                        `ways`, 'r') and a hidden_expand_last-times wider MLP
    ways:               way names, one character each ('qkvr': C = 4; 'r': one way)
    hidden_expand_last: MLP width factor of the last layer (MUDDFormer expand_last: 4)
    round64:            hidden = (C·l·expand // 64 + 1)·64 (MUDDFormer round64)
    gelu:               'none' (erf, PyTorch release) or 'tanh' (JAX)
    eps:                rms-norm epsilon (norm_eps 1e-6)

    Parameters (float32 unless dtype is given), identity start (ref.mudd_init_weights):
    W1 (d, K) ~ N(0, 1/d); W2 (K, C·l) = 0; bias (C, l) one-hot on the newest slot, so
    at init every way equals the newest slot and the model is a plain residual stream.
    forward(stack) -> Y (C, *tok, d) in the stack's dtype.
    """

    static_parameter_names = ("bias",)  # no weight decay (crosslayer.nn.param_groups)

    def __init__(self, d: int, layer_index: int, n_layers: int, ways: str = "qkvr",
                 hidden_expand_last: int = 4, round64: bool = False, gelu: str = "none",
                 eps: float = 1e-6, *, device=None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        for name, v, lo in (("d", d, 1), ("layer_index", layer_index, 0),
                            ("n_layers", n_layers, 1), ("hidden_expand_last", hidden_expand_last, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if layer_index >= n_layers:
            raise ValueError(f"layer_index must be < n_layers = {n_layers}, got {layer_index}")
        if not isinstance(ways, str) or not ways or len(set(ways)) != len(ways):
            raise ValueError(f"ways must be a non-empty string of distinct way names, "
                             f"e.g. 'qkvr' or 'r', got {ways!r}")
        if gelu not in GELU_APPROXIMATIONS:
            raise ValueError(f"gelu must be 'none' or 'tanh', got {gelu!r}")
        check_norm_eps("MUDDConnection", eps)
        self.d, self.layer_index, self.n_layers = d, layer_index, n_layers
        self.is_last = layer_index == n_layers - 1
        self.ways = ways[-1] if self.is_last else ways
        self.n_ways = len(self.ways)
        self.n_slots = layer_index + 2
        if self.n_slots > MAX_SLOTS:
            raise ValueError(f"at most {MAX_SLOTS} slots: layer_index must be < "
                             f"{MAX_SLOTS - 1}, got {layer_index}")
        self.hidden = mudd_hidden(self.n_ways, self.n_slots,
                                  hidden_expand_last if self.is_last else 1, round64)
        self.gelu, self.eps, self.round64 = gelu, eps, round64
        kw = dict(device=device, dtype=dtype or torch.float32)
        self.W1 = nn.Parameter(torch.empty(d, self.hidden, **kw))
        self.W2 = nn.Parameter(torch.empty(self.hidden, self.n_ways * self.n_slots, **kw))
        self.bias = nn.Parameter(torch.empty(self.n_ways, self.n_slots, **kw))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """Identity start: W1 ~ N(0, 1/d), W2 = 0, bias one-hot on the newest slot."""
        W1, W2, bias = ref_mudd.mudd_init_weights(self.d, self.n_slots, self.n_ways, self.hidden,
                                             generator=generator)
        self.W1.copy_(W1)
        self.W2.copy_(W2)
        self.bias.copy_(bias)

    def extra_repr(self) -> str:
        return (f"d={self.d}, layer_index={self.layer_index}, ways={self.ways!r}, "
                f"slots={self.n_slots}, hidden={self.hidden}, gelu={self.gelu!r}")

    def weights(self, x: Tensor, fn: Optional[Callable[..., Tensor]] = None) -> Tensor:
        """A (*tok, C, l) from the newest slot x (*tok, d)."""
        fn = fn or ops.mudd_weights
        return fn(x, self.W1, self.W2, self.bias, self.n_ways, self.eps, self.gelu)

    def forward(self, stack: StackLike, norm_weights: Optional[Tensor] = None,
                norm_eps: float = 1e-6) -> Tensor:
        """Y (C, *tok, d). With norm_weights g (3, d) (ways 'qkvr' only), the next block's
        three pre-attention RMSNorms are applied in the same pass: Y_c = rms_norm(Y_c)·g_c
        for q, k, v (eps norm_eps) and Y_r raw (crosslayer.ops.depth_aggregate_qkv_norm)."""
        _check_stack(stack, self.n_slots, f"MUDDConnection(layer_index={self.layer_index})")
        if norm_weights is not None and self.ways != "qkvr":
            raise ValueError(f"norm_weights need the ways 'qkvr' (q, k, v normed, r raw); "
                             f"this connection has ways {self.ways!r}")
        slots = slice(0, self.n_slots)
        if isinstance(stack, DepthStack):
            # x's gradient goes into the stack's gradient buffer in place (DepthStack.mudd_weights)
            A = stack.mudd_weights(self.W1, self.W2, self.bias, self.n_ways, self.eps, self.gelu)
            if norm_weights is None:
                return stack.aggregate(A, slots)
            return stack.aggregate_qkv_norm(A, norm_weights, norm_eps, slots)
        # list-and-stack oracle
        A = self.weights(stack[-1], ref.mudd_weights)
        S = torch.stack(list(stack))
        if norm_weights is None:
            return ref.depth_aggregate(S, A)
        return ref.depth_aggregate_qkv_norm(S, A, norm_weights, norm_eps)


class DenseFormerDWA(nn.Module):
    """DenseFormer depth-weighted average after block `layer_index` (static weights).

    Y = Σ_j alpha[0, j]·S_j over the slots `ref.dwa_slots(layer_index, dilation,
    period)` (j ≡ i+1 mod dilation; a strided view of the stack), or no DWA at all
    when (i+1) % period != 0: then `active` is False, `alpha` is None and forward
    returns the newest slot. alpha (1, l) starts at the identity (ref.dwa_init_weights).
    forward(stack) -> (*tok, d), the next block's input.
    """

    static_parameter_names = ("alpha",)  # no weight decay (crosslayer.nn.param_groups)

    def __init__(self, layer_index: int, dilation: int = 1, period: int = 1, *,
                 device=None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        check_index("DenseFormerDWA", "layer_index", layer_index, 0)
        check_index("DenseFormerDWA", "dilation", dilation, 1)
        check_index("DenseFormerDWA", "period", period, 1)
        self.layer_index, self.dilation, self.period = layer_index, dilation, period
        self.slots = ref.dwa_slots(layer_index, dilation, period)
        self.active = self.slots is not None
        if self.active:
            w = ref_mudd.dwa_init_weights(layer_index, dilation)
            self.alpha = nn.Parameter(w.to(device=device, dtype=dtype or torch.float32))
        else:
            self.register_parameter("alpha", None)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.active:
            self.alpha.copy_(ref_mudd.dwa_init_weights(self.layer_index, self.dilation))

    def extra_repr(self) -> str:
        return (f"layer_index={self.layer_index}, dilation={self.dilation}, "
                f"period={self.period}, slots={self.slots}")

    def forward(self, stack: StackLike) -> Tensor:
        _check_stack(stack, self.layer_index + 2, f"DenseFormerDWA(layer_index={self.layer_index})")
        if not self.active:
            return stack.newest if isinstance(stack, DepthStack) else stack[-1]
        if isinstance(stack, DepthStack):
            return stack.aggregate(self.alpha, self.slots)[0]
        return ref.depth_aggregate(torch.stack(list(stack)[self.slots]), self.alpha)[0]
