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

from fastlenet import _checks, _ext, backends, reference
from fastlenet._autograd import first_order

# The overloads themselves: calling the packet (torch.ops.fastlenet.conv_relu_pool_fwd) resolves the
# overload on every call, ~2 us more per call here.
_CPP_OPS = (
    SimpleNamespace(
        fwd=torch.ops.fastlenet.conv_relu_pool_fwd.default,
        bwd=torch.ops.fastlenet.conv_relu_pool_bwd.default,
    )
    if _ext.LOADED
    else None
)


def two_pass_bwd(bwd_input, bwd_weight):
    """conv_relu_pool_bwd's signature over a backend with one op per gradient (Triton, the
    reference): a gradient not asked for is None."""

    def bwd(
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
        args = (grad_out, argmax, input, weight, stride, padding, pool_size, pool_stride)
        grad_input = bwd_input(*args) if input_grad else None
        grad_weight, grad_bias = bwd_weight(*args) if weight_grad else (None, None)
        return grad_input, grad_weight, grad_bias

    return bwd


_TRITON_OPS = []  # built on first use: importing the Triton kernels imports triton


def _triton_ops():
    if not _TRITON_OPS:
        from fastlenet.kernels import conv_relu_pool as triton_conv

        ops = triton_conv.OPS
        _TRITON_OPS.append(
            SimpleNamespace(fwd=ops.fwd, bwd=two_pass_bwd(ops.bwd_input, ops.bwd_weight))
        )
    return _TRITON_OPS[0]


_REFERENCE_OPS = SimpleNamespace(
    fwd=reference.conv_relu_pool_fwd,
    bwd=two_pass_bwd(reference.conv_relu_pool_bwd_input, reference.conv_relu_pool_bwd_weight),
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
    @first_order
    def backward(ctx, grad_out):
        input, weight, argmax = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_input, grad_weight, grad_bias = _ops(ctx.backend).bwd(
            grad_out.contiguous(), argmax, input, weight, *ctx.geometry, need[0], need[1] or need[2]
        )
        grad_input = grad_input if need[0] else None
        grad_weight = grad_weight if need[1] else None
        grad_bias = grad_bias if ctx.has_bias and need[2] else None
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

    @torch.library.register_fake("fastlenet::conv_relu_pool_bwd")
    def _(
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
        def grad_like(t, wanted, shape):
            return t.new_empty(shape if wanted else (0,))

        return (
            grad_like(input, input_grad, input.shape),
            grad_like(weight, weight_grad, weight.shape),
            grad_like(weight, weight_grad, weight.shape[:1]),
        )
