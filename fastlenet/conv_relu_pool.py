"""conv2d -> ReLU -> max_pool2d: public function, autograd Function and fake kernels.

Math, argmax rule and saved state: fastlenet/reference.py (conv_relu_pool).
The Function runs the backend's fwd, saves input, weight and argmax (one byte per pooled
output), and asks the backend's bwd for all the gradients it needs in one call. The CPU fast
path (a contiguous 4-D input, eager) records the same as a C++ node instead
(csrc/conv_relu_pool_autograd_cpu.cpp).
"""

import torch
import torch.nn.functional as F

from fastlenet import _checks, _ext, backends, reference
from fastlenet._autograd import CPU as _CPU
from fastlenet._autograd import RESOLVED as _RESOLVED
from fastlenet._autograd import Tensor as _Tensor
from fastlenet._autograd import (
    autocast_inputs,
    backward_backend,
    records_graph,
    transforms_active,
)
from fastlenet._autograd import is_compiling as _is_compiling


class ConvReLUPoolFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, stride, padding, pool_size, pool_stride, backend):
        geometry = (stride, padding, pool_size, pool_stride)
        out, argmax, ctx.channels_last = _fwd(input, weight, bias, geometry, backend)
        ctx.save_for_backward(input, weight, argmax)
        ctx.geometry = geometry
        ctx.backend = backend
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)  # none reached out: none for the inputs, as stock's
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if grad_out is None:
            return (None,) * 8
        input, weight, argmax = ctx.saved_tensors
        need = ctx.needs_input_grad
        bwd = backends.ops("conv_relu_pool", backward_backend(ctx)).bwd
        grad_input, grad_weight, grad_bias = bwd(
            grad_out.contiguous(), argmax, input, weight, *ctx.geometry, need[0], need[1] or need[2]
        )
        grad_input = grad_input if need[0] else None
        grad_weight = grad_weight if need[1] else None
        grad_bias = grad_bias if ctx.has_bias and need[2] else None
        if ctx.channels_last:
            grad_input, grad_weight = (
                None if g is None else g.contiguous(memory_format=torch.channels_last)
                for g in (grad_input, grad_weight)
            )
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


def _fwd(input, weight, bias, geometry, backend, infer=False):
    """(out, argmax, channels_last) from the backend's forward op; `infer` (nothing recorded):
    argmax None, from the CPU's inference op."""
    if infer and backend == "cpu":
        out, argmax = _CPU_INFER(input, weight, bias, *geometry), None
    else:
        out, argmax = backends.ops("conv_relu_pool", backend).fwd(input, weight, bias, *geometry)
    channels_last = _checks.channels_last(input) or _checks.channels_last(weight)
    if channels_last:  # stock's conv: channels_last output and gradients
        out = out.contiguous(memory_format=torch.channels_last)
    return out, argmax, channels_last


# The CPU op's inference overload (None without the extension): the forward's output without
# the argmax that only a backward reads (_fwd's; the fast path's C++ entry calls the op too).
_CPU_INFER = torch.ops.fastlenet.conv_relu_pool_infer.default if _ext.LOADED else None
# The fast path's autograd node (csrc/conv_relu_pool_autograd_cpu.cpp): ConvReLUPoolFunction's
# forward and backward on the CPU ops, as a C++ node, whose backward runs no Python.
_CPU_NODE = _ext._C.conv_relu_pool if _ext.LOADED else None


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
    stride, padding, pool_size, pool_stride: int or pair; padding may also be "valid" (0) or
    "same" (stride 1; for an even kernel the extra row/column of zeros goes at the bottom/right,
    as stock's); pool_stride defaults to pool_size; pool_size=1 means conv + ReLU alone. Floor
    mode, dilation 1, groups 1. Returns (N, O, PH, PW), or (O, PH, PW) for unbatched input.
    """
    # The fast path, as linear_relu's (fastlenet/linear_relu.py): a plain 4-D CPU input and
    # weight, both contiguous, numeric geometry, and a backend that resolve() has already
    # answered "cpu" for. One call into C++, which records the node, runs the inference op where
    # autograd records nothing, or returns None for the full path below (a dtype the CPU kernels
    # do not take, torch.autocast, a torch.func transform or a forward-mode tangent:
    # csrc/cpu_autograd.h, fast_path_takes; a contiguous input or weight that stock's
    # convolution still reads as channels_last, one channel converted to it: _fwd converts).
    # The op's checks (csrc/checks.h) cover the Python ones for these arguments: those run only
    # after it raised, to name the mistake as they always do. Not while torch.compile traces.
    try:
        fast = (
            type(input) is _Tensor
            and input.is_cpu
            and weight.is_cpu
            and (bias is None or bias.is_cpu)
            and input.dim() == 4
            and type(padding) is not str
            and _RESOLVED.get((backend, _CPU)) == "cpu"
            and input.is_contiguous()
            and weight.is_contiguous()
            and not _is_compiling()
        )
    except (AttributeError, TypeError):
        fast = False
    if fast:
        stride = _checks.pair(stride, "stride")
        padding = _checks.pair(padding, "padding")
        pool_size = _checks.pair(pool_size, "pool_size")
        pool_stride = pool_size if pool_stride is None else _checks.pair(pool_stride, "pool_stride")
        try:
            out = _CPU_NODE(input, weight, bias, (*stride, *padding, *pool_size, *pool_stride))
            if out is not None:
                return out
        except Exception as exc:  # re-raised below unless the checks name the mistake
            error = exc
        else:
            error = None  # None from C++: the full path below
        if error is not None:
            _checks.check_params(input, weight, bias, weight_rank=4)
            _checks.check_geometry(stride, padding, pool_size, pool_stride)
            _checks.check_conv_input(input, weight, stride, padding, pool_size, pool_stride)
            raise error
    if torch.jit.is_tracing():
        with _checks.quiet_tracer():
            return _full(input, weight, bias, stride, padding, pool_size, pool_stride, backend)
    return _full(input, weight, bias, stride, padding, pool_size, pool_stride, backend)


def _full(input, weight, bias, stride, padding, pool_size, pool_stride, backend):
    """conv_relu_pool2d's full path: every input form, backend and mode."""
    stride = _checks.pair(stride, "stride")
    pool_size = _checks.pair(pool_size, "pool_size")
    pool_stride = pool_size if pool_stride is None else _checks.pair(pool_stride, "pool_stride")
    input, weight, bias = autocast_inputs(input, weight, bias)
    _checks.check_params(input, weight, bias, weight_rank=4)
    if isinstance(padding, str):
        input, padding = _string_padding(input, weight, stride, padding)
    else:
        padding = _checks.pair(padding, "padding")
    _checks.check_geometry(stride, padding, pool_size, pool_stride)
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    _checks.check_conv_input(input, weight, stride, padding, pool_size, pool_stride)
    if transforms_active():  # stock's composition: torch.func and forward AD know it
        out = reference.conv_relu_pool2d(
            input, weight, bias, stride, padding, pool_size, pool_stride
        )
        return out.squeeze(0) if unbatched else out
    name = backends.resolve(backend, input.device, input.dtype)
    if torch.jit.is_tracing():  # the forward op (not the inference op): backends.traced
        geometry = (stride, padding, pool_size, pool_stride)
        out = _fwd(input, weight, bias, geometry, backends.traced(name))[0]
    elif records_graph(input, weight, bias):
        out = ConvReLUPoolFunction.apply(
            input, weight, bias, stride, padding, pool_size, pool_stride, name
        )
    else:  # nothing to record (inference): the op alone, as linear_relu does
        out = _fwd(input, weight, bias, (stride, padding, pool_size, pool_stride), name, True)[0]
    return out.squeeze(0) if unbatched else out


def _string_padding(input, weight, stride, padding: str):
    """(input, padding pair) for padding="valid" or "same", as stock's conv2d pads."""
    _checks.check_padding_string(padding, stride)
    if padding == "valid":
        return input, (0, 0)
    before, extra = _checks.same_padding(weight.shape[-2:])
    if any(extra):
        input = F.pad(input, (0, extra[1], 0, extra[0]))
    return input, before


def _fake_shapes(input, weight, stride, padding, pool_size, pool_stride):
    _, (ph, pw) = _checks.conv_pool_shapes(
        input.shape[-2:], weight.shape[-2:], stride, padding, pool_size, pool_stride
    )
    return (input.shape[0], weight.shape[0], ph, pw)


def fwd_fake(input, weight, bias, stride, padding, pool_size, pool_stride):
    shape = _fake_shapes(input, weight, stride, padding, pool_size, pool_stride)
    return input.new_empty(shape), input.new_empty(shape, dtype=torch.uint8)


def infer_fake(input, weight, bias, stride, padding, pool_size, pool_stride):
    return input.new_empty(_fake_shapes(input, weight, stride, padding, pool_size, pool_stride))


def bwd_fake(grad_out, argmax, input, weight, *geometry_and_flags):
    """Shapes of conv_relu_pool_bwd's gradients (the geometry does not enter them)."""
    *_, input_grad, weight_grad = geometry_and_flags

    def grad_like(t, wanted, shape):
        return t.new_empty(shape if wanted else (0,))

    return (
        grad_like(input, input_grad, input.shape),
        grad_like(weight, weight_grad, weight.shape),
        grad_like(weight, weight_grad, weight.shape[:1]),
    )


if _ext.LOADED:
    torch.library.register_fake("fastlenet::conv_relu_pool_fwd", fwd_fake)
    torch.library.register_fake("fastlenet::conv_relu_pool_bwd", bwd_fake)
    torch.library.register_fake("fastlenet::conv_relu_pool_infer", infer_fake)
