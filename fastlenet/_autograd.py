"""What the fused ops' autograd Functions share."""

import functools

import torch
from torch.autograd.function import once_differentiable


def first_order(backward):
    """`once_differentiable` where a second backward is possible, the plain call elsewhere.

    Only with create_graph=True is grad mode on inside backward; there the guard makes a second
    backward through these gradients raise. Without it (every training step) the guard's
    no_grad block and output checks are skipped: ~12 us less per backward on the 2-core CI
    machine, five times per LeNet-5 step.
    """
    guarded = once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            return guarded(ctx, *grads)
        return backward(ctx, *grads)

    return wrapper
