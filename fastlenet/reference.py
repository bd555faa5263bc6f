"""Pure-PyTorch reference of every fastlenet op: the oracle of tests and benchmarks.

Two layers of reference live here:
- the stock compositions (`conv_relu_pool2d`, `linear_relu`), which autograd differentiates;
- the same forward/backward split as the registered kernels (`*_fwd`, `*_bwd`), with the
  same signatures (csrc/fastlenet.cpp) and saved state, used as the "reference" backend behind
  the same autograd Function.

Shapes: input (N, C, H, W), weight (O, C, KH, KW), conv output (N, O, OH, OW), pooled output
and argmax (N, O, PH, PW). argmax holds the row-major position i * pool_w + j of the max in
each pooling window (max_pool2d's choice: the first of tied values, the last NaN), or 255
(`NO_GRAD`) where that max is <= 0: ReLU passes no gradient there. A NaN max passes
gradient, as stock's ReLU backward does (`threshold_backward` zeroes only where out <= 0).
"""

import torch
import torch.nn.functional as F

from fastlenet._checks import NO_GRAD


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64 (0 when both are zero): how tests and
    benchmarks compare a kernel's result with the reference's."""
    a, e = actual.detach().double(), expected.detach().double()
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff / denom if denom > 0 else diff


def conv_relu_pool2d(input, weight, bias, stride, padding, pool_size, pool_stride):
    """max_pool2d(relu(conv2d(input, weight, bias))), as stock PyTorch computes it."""
    y = F.relu(F.conv2d(input, weight, bias, stride, padding))
    return F.max_pool2d(y, pool_size, pool_stride)


def linear_relu(input, weight, bias, relu=True):
    y = F.linear(input, weight, bias)
    return F.relu(y) if relu else y


def _window_index(pool_size, pool_stride, oh_ow, ph_pw, device):
    """Flat conv-output index of window position 0 of every pooled output, shape (PH, PW)."""
    ph = torch.arange(ph_pw[0], device=device).view(-1, 1) * pool_stride[0]
    pw = torch.arange(ph_pw[1], device=device).view(1, -1) * pool_stride[1]
    return ph * oh_ow[1] + pw


def conv_relu_pool_fwd(input, weight, bias, stride, padding, pool_size, pool_stride):
    y = F.conv2d(input, weight, bias, stride, padding)
    pooled, flat = F.max_pool2d(y, pool_size, pool_stride, return_indices=True)
    base = _window_index(pool_size, pool_stride, y.shape[-2:], pooled.shape[-2:], y.device)
    rel = flat - base
    pos = torch.div(rel, y.shape[-1], rounding_mode="floor") * pool_size[1] + rel % y.shape[-1]
    argmax = torch.where(pooled <= 0, NO_GRAD, pos).to(torch.uint8)
    return torch.relu(pooled), argmax


def _dense_grad(grad_out, argmax, conv_hw, pool_size, pool_stride):
    """Gradient of the conv output: grad_out scattered to each window's argmax."""
    n, o, ph, pw = grad_out.shape
    valid = argmax != NO_GRAD
    pos = torch.where(valid, argmax.long(), 0)
    base = _window_index(pool_size, pool_stride, conv_hw, (ph, pw), grad_out.device)
    flat = base + (pos // pool_size[1]) * conv_hw[1] + pos % pool_size[1]
    dense = grad_out.new_zeros(n, o, conv_hw[0] * conv_hw[1])
    src = torch.where(valid, grad_out, 0)
    dense.scatter_add_(2, flat.reshape(n, o, ph * pw), src.reshape(n, o, ph * pw))
    return dense.view(n, o, *conv_hw)


def _conv_hw(input, weight, stride, padding):
    return tuple(
        (input.shape[2 + d] + 2 * padding[d] - weight.shape[2 + d]) // stride[d] + 1
        for d in range(2)
    )


def conv_relu_pool_bwd(
    grad_out,
    argmax,
    input,
    weight,
    stride,
    padding,
    pool_size,
    pool_stride,
    input_grad,
    weight_grad,
):
    """(grad_input, grad_weight, grad_bias); a gradient not asked for has no elements."""
    dense = _dense_grad(
        grad_out, argmax, _conv_hw(input, weight, stride, padding), pool_size, pool_stride
    )
    grad_input = (
        torch.nn.grad.conv2d_input(input.shape, weight, dense, stride, padding)
        if input_grad
        else input.new_empty(0)
    )
    if not weight_grad:
        return grad_input, weight.new_empty(0), weight.new_empty(0)
    grad_weight = torch.nn.grad.conv2d_weight(input, weight.shape, dense, stride, padding)
    return grad_input, grad_weight, dense.sum((0, 2, 3))


def linear_relu_fwd(input, weight, bias, relu):
    return linear_relu(input, weight, bias, relu)


def linear_relu_bwd(grad_out, out, input, weight, relu):
    # stock ReLU's backward zeroes only where out <= 0: a NaN output passes its gradient
    g = torch.where(out <= 0, 0, grad_out) if relu else grad_out
    return g @ weight, g.t() @ input, g.sum(0)
