"""FLOP formulas of fastlenet's ops for torch.utils.flop_counter.FlopCounterMode, so that a
fused model counts what its stock twin counts: 2 per multiply-add of each convolution and
matmul, forward (the conv before pooling: the pool and ReLU are free) and backward (one such
count per gradient of an input or a weight that the op computes). The fused backward skips
windows that pass no gradient; like the benchmarks' (benchmarks/harness.py), this counts the
dense work, the same gradients' cost in stock's ops.

`import fastlenet.flops` registers them (before FlopCounterMode is entered). fastlenet does not
import this module itself: torch.utils.flop_counter imports triton, which `import fastlenet`
must not (it costs seconds, and TRITON_INTERPRET must be set before it).
"""

import math

import torch
from torch.utils.flop_counter import register_flop_formula

from fastlenet import _checks, _ext
from fastlenet.chain import CONV, _unpacked


def conv_flops(input_shape, weight_shape, stride, padding, pool_size, pool_stride) -> int:
    """2 x the multiply-adds of the convolution of conv_relu_pool2d."""
    (oh, ow), _ = _checks.conv_pool_shapes(
        input_shape[-2:], weight_shape[-2:], stride, padding, pool_size, pool_stride
    )
    return 2 * input_shape[0] * oh * ow * math.prod(weight_shape)


def linear_flops(input_shape, weight_shape) -> int:
    """2 x the multiply-adds of input (N, in) @ weight.T (out, in)."""
    return 2 * input_shape[0] * math.prod(weight_shape)


def _chain_layers(input_shape, weight_shapes, spec):
    """Each layer's forward FLOPs, for a chain (fastlenet/chain.py) of that input."""
    shape = tuple(input_shape)
    for (kind, args), w in zip(_unpacked(spec), weight_shapes, strict=True):
        if kind == CONV:
            yield conv_flops(shape, w, *args)
            _, pooled = _checks.conv_pool_shapes(shape[-2:], w[-2:], *args)
            shape = (shape[0], w[0], *pooled)
        else:  # flattened first
            yield linear_flops((shape[0], math.prod(shape[1:])), w)
            shape = (shape[0], w[0])


def _register():
    ops = torch.ops.fastlenet

    @register_flop_formula([ops.conv_relu_pool_fwd, ops.conv_relu_pool_infer])
    def conv_fwd(input, weight, bias, stride, padding, pool_size, pool_stride, **kwargs):
        return conv_flops(input, weight, stride, padding, pool_size, pool_stride)

    @register_flop_formula(ops.conv_relu_pool_bwd)
    def conv_bwd(grad_out, argmax, input, weight, *geometry_and_flags, **kwargs):
        *geometry, input_grad, weight_grad = geometry_and_flags
        return conv_flops(input, weight, *geometry) * (int(input_grad) + int(weight_grad))

    @register_flop_formula(ops.linear_relu_fwd)
    def linear_fwd(input, weight, bias, relu, **kwargs):
        return linear_flops(input, weight)

    @register_flop_formula(ops.linear_relu_bwd)
    def linear_bwd(grad_out, out, input, weight, relu, **kwargs):
        return 2 * linear_flops(input, weight)  # grad_input and grad_weight, always both

    @register_flop_formula(ops.chain_fwd)
    def chain_fwd(input, weights, biases, spec, dropout, **kwargs):
        return sum(_chain_layers(input, weights, spec))

    @register_flop_formula(ops.chain_bwd)
    def chain_bwd(
        grad_out,
        input,
        out,
        activations,
        argmax,
        dropped,
        weights,
        spec,
        dropout,
        input_grad,
        **kwargs,
    ):
        layers = _chain_layers(input, weights, spec)
        # grad_weight of every layer; grad_input of every layer but the first unless asked.
        return sum(f * (2 if i > 0 or input_grad else 1) for i, f in enumerate(layers))


if _ext.LOADED:
    _register()
