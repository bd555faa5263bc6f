"""What the fused ops' autograd Functions share."""

import torch

from fastlenet import backends

# Names the ops' CPU fast paths (conv_relu_pool2d, linear_relu, linear) read on every call,
# bound once and imported as module globals: each `torch.x` lookup costs tens of ns per call.
CPU = torch.device("cpu")
Tensor = torch.Tensor
RESOLVED = backends._RESOLVED  # resolve()'s cache; refresh() clears it in place
is_compiling = torch.compiler.is_compiling
is_grad_enabled = torch.is_grad_enabled


def backward_backend(ctx) -> str:
    """The backend that computes a fused Function's backward.

    First-order gradients (grad mode off inside backward: every training step) come from the
    forward's own backend. With create_graph=True grad mode is on, and the gradients must carry
    a graph of their own so that they can be differentiated again (gradient penalties,
    Hessian-vector products): the reference's backward builds them from differentiable PyTorch
    ops, with the argmax and ReLU mask the forward saved, so the second derivative is stock's
    (the mask and the choice of maximum are piecewise constant).
    """
    return "reference" if torch.is_grad_enabled() else ctx.backend


def records_graph(input, weight, bias) -> bool:
    """Whether a fused op's call must go through its autograd Function: grad mode on and a
    tensor that wants a gradient. Otherwise (inference) the op alone runs: Function.apply would
    still build a ctx and save the tensors, ~2 us per call."""
    return torch.is_grad_enabled() and (
        input.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
