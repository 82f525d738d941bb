"""torch.compile check shared by the op tests."""

from typing import Callable, Sequence

import torch


def assert_compiles_like_eager(f: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
                               exact_grads: Sequence[int] = ()) -> None:
    """torch.compile(f, fullgraph=True) traces f with no graph break and gives eager's
    output and the gradients of every input; the gradients of the inputs listed in
    `exact_grads` must be bitwise equal (deterministic kernels under both).

    f: inputs -> a scalar tensor; inputs: floating tensors (copied, made leaves)."""
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    leaves_c = [t.detach().clone().requires_grad_(True) for t in inputs]
    leaves_e = [t.detach().clone().requires_grad_(True) for t in inputs]
    out_c, out_e = compiled(*leaves_c), f(*leaves_e)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    for i, (a, b) in enumerate(zip(leaves_c, leaves_e)):
        if i in exact_grads:
            assert torch.equal(a.grad, b.grad), f"input {i}: compiled gradient differs from eager"
        else:
            torch.testing.assert_close(a.grad, b.grad, msg=lambda m: f"input {i}: {m}")
