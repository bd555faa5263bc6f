"""What the fused ops' autograd Functions share."""

import torch


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
