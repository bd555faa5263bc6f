"""conv2d -> ReLU -> max_pool2d: public function, autograd Function and fake kernels.

Forward: out[n,o,ph,pw] = relu(max over window (i, j) of conv(input, weight, bias)[n,o,oh,ow]),
with oh = ph * pool_stride_h + i, ow = pw * pool_stride_w + j.
Saved for backward: input, weight and argmax (uint8, one byte per pooled output: the window
position of the max, or 255 where the max is <= 0 and no gradient flows).
Backward: only the argmax position of a window whose max is not <= 0 receives grad_out; the
gradients of weight, bias and (when needed) input are computed from those positions alone.
"""

from types import SimpleNamespace

import torch
from torch.autograd.function import once_differentiable

from fastlenet import _checks, _ext, backends, reference

_CPP_OPS = (
    SimpleNamespace(
        fwd=torch.ops.fastlenet.conv_relu_pool_fwd,
        bwd_input=torch.ops.fastlenet.conv_relu_pool_bwd_input,
        bwd_weight=torch.ops.fastlenet.conv_relu_pool_bwd_weight,
    )
    if _ext.LOADED
    else None
)


def _triton_ops():
    from fastlenet.kernels import conv_relu_pool as triton_conv  # imports triton

    return triton_conv.OPS


_REFERENCE_OPS = SimpleNamespace(
    fwd=reference.conv_relu_pool_fwd,
    bwd_input=reference.conv_relu_pool_bwd_input,
    bwd_weight=reference.conv_relu_pool_bwd_weight,
)


def _ops(backend: str):
    if backend == "reference":
        return _REFERENCE_OPS
    if backend == "triton":
        return _triton_ops()
    return _CPP_OPS


class ConvReLUPoolFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, stride, padding, pool_size, pool_stride, backend):
        out, argmax = _ops(backend).fwd(
            input, weight, bias, stride, padding, pool_size, pool_stride
        )
        ctx.save_for_backward(input, weight, argmax)
        ctx.geometry = (stride, padding, pool_size, pool_stride)
        ctx.backend = backend
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        input, weight, argmax = ctx.saved_tensors
        ops = _ops(ctx.backend)
        grad_out = grad_out.contiguous()
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = ops.bwd_input(grad_out, argmax, input, weight, *ctx.geometry)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_weight, grad_bias = ops.bwd_weight(grad_out, argmax, input, weight, *ctx.geometry)
            if not ctx.needs_input_grad[1]:
                grad_weight = None
            if not (ctx.has_bias and ctx.needs_input_grad[2]):
                grad_bias = None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


def conv_relu_pool2d(
    input,
    weight,
    bias=None,
    stride=1,
    padding=0,
    pool_size=2,
    pool_stride=None,
    *,
    backend="auto",
):
    """max_pool2d(relu(conv2d(input, weight, bias, stride, padding)), pool_size, pool_stride).

    input: (N, C, H, W) or unbatched (C, H, W); weight: (O, C, KH, KW); bias: (O,) or None.
    stride, padding, pool_size, pool_stride: int or pair; pool_stride defaults to pool_size;
    pool_size=1 means conv + ReLU alone. Floor mode, dilation 1, groups 1.
    Returns (N, O, PH, PW), or (O, PH, PW) for unbatched input.
    """
    stride = _checks.pair(stride, "stride")
    padding = _checks.pair(padding, "padding")
    pool_size = _checks.pair(pool_size, "pool_size")
    pool_stride = pool_size if pool_stride is None else _checks.pair(pool_stride, "pool_stride")
    _checks.check_geometry(stride, padding, pool_size, pool_stride)
    _checks.check_params(input, weight, bias, weight_rank=4)
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    _checks.check_conv_input(input, weight, stride, padding, pool_size, pool_stride)
    name = backends.resolve(backend, input.device)
    out = ConvReLUPoolFunction.apply(
        input, weight, bias, stride, padding, pool_size, pool_stride, name
    )
    return out.squeeze(0) if unbatched else out


def _fake_shapes(input, weight, stride, padding, pool_size, pool_stride):
    _, (ph, pw) = _checks.conv_pool_shapes(
        input.shape[-2:], weight.shape[-2:], stride, padding, pool_size, pool_stride
    )
    return (input.shape[0], weight.shape[0], ph, pw)


if _ext.LOADED:

    @torch.library.register_fake("fastlenet::conv_relu_pool_fwd")
    def _(input, weight, bias, stride, padding, pool_size, pool_stride):
        shape = _fake_shapes(input, weight, stride, padding, pool_size, pool_stride)
        return input.new_empty(shape), input.new_empty(shape, dtype=torch.uint8)

    @torch.library.register_fake("fastlenet::conv_relu_pool_bwd_input")
    def _(grad_out, argmax, input, weight, stride, padding, pool_size, pool_stride):
        return torch.empty_like(input, memory_format=torch.contiguous_format)

    @torch.library.register_fake("fastlenet::conv_relu_pool_bwd_weight")
    def _(grad_out, argmax, input, weight, stride, padding, pool_size, pool_stride):
        return (
            torch.empty_like(weight, memory_format=torch.contiguous_format),
            weight.new_empty(weight.shape[0]),
        )
