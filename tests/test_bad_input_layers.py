"""Bad input to the layers, ConvReLUPool2d, LinearReLU and Linear, at construction and at
forward on every backend that runs on CPU tensors here: one row per case (see
tests/bad_input.py)."""

import pytest
import torch
from bad_input import BACKEND_CASES, IN, OUT, C, H, K, N, O, W, cases, check
from conftest import CPU_BACKENDS

from fastlenet.nn import ConvReLUPool2d, Linear, LinearReLU


def _set(layer, name, value):
    """The layer with its parameter `name` replaced by `value` (None: no parameter)."""
    setattr(layer, name, None if value is None else torch.nn.Parameter(value, False))
    return layer


def _conv_init(kwargs):
    args = {"in_channels": C, "out_channels": O, "kernel_size": K, **kwargs}
    return lambda: ConvReLUPool2d(**args)


def _conv_forward(change, backend):
    layer, x = change(ConvReLUPool2d(C, O, K, backend=backend), torch.randn(N, C, H, W))
    return lambda: layer(x)


def _linear_init(kwargs, layer_cls):
    args = {"in_features": IN, "out_features": OUT, **kwargs}
    return lambda: layer_cls(**args)


def _linear_forward(change, layer_cls, backend):
    layer, x = change(layer_cls(IN, OUT, backend=backend), torch.randn(4, IN))
    return lambda: layer(x)


# (id, constructor arguments or change(layer, input) -> (layer, input), exception type, regex
# the message must match)
# fmt: off
CONV_INIT_CASES = [
    ("in_channels_0", {"in_channels": 0}, ValueError, r"in_channels must be a positive int, got 0"),
    ("in_channels_float", {"in_channels": 2.5}, ValueError,
     r"in_channels must be a positive int, got 2.5"),
    ("in_channels_bool", {"in_channels": True}, ValueError,
     r"in_channels must be a positive int, got True"),
    ("out_channels_negative", {"out_channels": -4}, ValueError,
     r"out_channels must be a positive int, got -4"),
    ("out_channels_str", {"out_channels": "4"}, ValueError,
     r"out_channels must be a positive int, got '4'"),
    ("kernel_size_0", {"kernel_size": 0}, ValueError, r"kernel_size must be >= 1, got \(0, 0\)"),
    ("kernel_size_negative", {"kernel_size": (3, -1)}, ValueError,
     r"kernel_size must be >= 1, got \(3, -1\)"),
    ("kernel_size_triple", {"kernel_size": (3, 3, 3)}, TypeError,
     r"kernel_size must be an int or a pair of ints"),
    ("stride_0", {"stride": 0}, ValueError, r"stride must be >= 1, got \(0, 0\)"),
    ("padding_negative", {"padding": -2}, ValueError, r"padding must be >= 0, got \(-2, -2\)"),
    ("padding_string", {"padding": "full"}, ValueError, r"padding must be an int, a pair of ints"),
    ("padding_same_strided", {"padding": "same", "stride": 2}, ValueError, r"strided convolutions"),
    ("pool_size_0", {"pool_size": 0}, ValueError, r"pool_size must be >= 1, got \(0, 0\)"),
    ("pool_window_256", {"pool_size": (2, 128)}, ValueError,
     r"pool_size \(2, 128\) has more than 255 positions"),
    ("pool_stride_0", {"pool_stride": 0}, ValueError, r"pool_stride must be >= 1, got \(0, 0\)"),
    ("backend_unknown", {"backend": "gpu"}, ValueError, r"backend must be one of"),
    # nn.Conv2d's arguments: the fused kernels have dilation 1, groups 1 and zero padding only,
    # so the layer takes stock's defaults alone and names any other value.
    ("dilation", {"dilation": 2}, ValueError, r"dilation must be 1 .*, got 2"),
    ("groups", {"groups": 3}, ValueError, r"groups must be 1 .*, got 3"),
    ("padding_mode", {"padding_mode": "reflect"}, ValueError, r"padding_mode must be 'zeros'"),
]

CONV_FORWARD_CASES = [
    ("input_2d", lambda m, x: (m, x[0, 0]), ValueError, r"input must be 3-D .* or 4-D"),
    ("input_5d", lambda m, x: (m, x[None]), ValueError, r"input must be 3-D .* or 4-D"),
    ("channels", lambda m, x: (m, x[:, 1:]), ValueError,
     r"input has 2 channels but weight expects 3"),
    ("smaller_than_kernel", lambda m, x: (m, x[..., :2, :2]), ValueError,
     r"smaller than the kernel \(3, 3\)"),
    ("smaller_than_pool", lambda m, x: (m, x[..., :3, :3]), ValueError,
     r"convolution output \(1, 1\) is smaller than the pooling window \(2, 2\)"),
    ("input_int", lambda m, x: (m, x.int()), TypeError,
     r"input must be a floating-point tensor, got dtype torch.int32"),
    ("input_bool", lambda m, x: (m, x > 0), TypeError,
     r"input must be a floating-point tensor, got dtype torch.bool"),
    ("input_float64", lambda m, x: (m, x.double()), TypeError,
     r"weight has dtype torch.float32 but input has dtype torch.float64"),
    ("bias_float64", lambda m, x: (_set(m, "bias", m.bias.detach().double()), x), TypeError,
     r"bias has dtype torch.float64 but input has dtype torch.float32"),
    ("weight_3d", lambda m, x: (_set(m, "weight", m.weight.detach()[0]), x), ValueError,
     r"weight must be 4-D"),
    ("bias_short", lambda m, x: (_set(m, "bias", m.bias.detach()[:2]), x), ValueError,
     r"bias must have shape \(4,\) to match weight, got \(2,\)"),
    ("layer_on_meta", lambda m, x: (m.to("meta"), x), ValueError, r"weight is on meta"),
    ("input_on_meta", lambda m, x: (m, x.to("meta")), ValueError, r"but input is on meta"),
    ("input_ndarray", lambda m, x: (m, x.numpy()), TypeError, r"input must be a torch.Tensor"),
    ("input_none", lambda m, x: (m, None), TypeError, r"input must be a torch.Tensor"),
]

LINEAR_INIT_CASES = [
    ("in_features_negative", {"in_features": -1}, ValueError,
     r"in_features must be an int >= 0, got -1"),
    ("in_features_float", {"in_features": 6.0}, ValueError,
     r"in_features must be an int >= 0, got 6.0"),
    ("out_features_negative", {"out_features": -1}, ValueError,
     r"out_features must be an int >= 0"),
    ("out_features_bool", {"out_features": True}, ValueError,
     r"out_features must be an int >= 0"),
    ("backend_unknown", {"backend": "gpu"}, ValueError, r"backend must be one of"),
]

LINEAR_FORWARD_CASES = [
    ("input_0d", lambda m, x: (m, x[0, 0]), ValueError, r"input must have at least 1 dimension"),
    ("features", lambda m, x: (m, x[:, 1:]), ValueError,
     r"input has 5 features in its last dimension but weight expects 6"),
    ("input_int", lambda m, x: (m, x.long()), TypeError,
     r"input must be a floating-point tensor, got dtype torch.int64"),
    ("input_float64", lambda m, x: (m, x.double()), TypeError,
     r"weight has dtype torch.float32 but input has dtype torch.float64"),
    ("weight_3d", lambda m, x: (_set(m, "weight", m.weight.detach()[None]), x), ValueError,
     r"weight must be 2-D"),
    ("bias_short", lambda m, x: (_set(m, "bias", m.bias.detach()[:1]), x), ValueError,
     r"bias must have shape \(5,\) to match weight, got \(1,\)"),
    ("layer_on_meta", lambda m, x: (m.to("meta"), x), ValueError, r"weight is on meta"),
    ("input_on_meta", lambda m, x: (m, x.to("meta")), ValueError, r"but input is on meta"),
    ("input_list", lambda m, x: (m, x.tolist()), TypeError, r"input must be a torch.Tensor"),
]
# fmt: on


_LAYER_ARGS = {ConvReLUPool2d: (C, O, K), LinearReLU: (6, 3), Linear: (6, 3)}


def _construct(backend, layer_cls):
    return lambda: layer_cls(*_LAYER_ARGS[layer_cls], backend=backend)


def _forward(backend, layer_cls):
    x = torch.randn(N, C, H, W) if layer_cls is ConvReLUPool2d else torch.randn(5, 6)
    return lambda: layer_cls(*_LAYER_ARGS[layer_cls], backend=backend)(x)


LAYERS = [LinearReLU, Linear]
NOT_ON_CUDA = pytest.mark.skipif(
    torch.cuda.is_available(), reason="'cuda' is available on this machine"
)
# The layers check a backend's name at construction, its availability at forward.
UNKNOWN_BACKEND_CASES = [c for c in BACKEND_CASES if c[1] != "cuda"]
UNAVAILABLE_BACKEND_CASES = [c for c in BACKEND_CASES if c[1] == "cuda"]

CASES = [
    *cases("ConvReLUPool2d", CONV_INIT_CASES, _conv_init),
    *cases("ConvReLUPool2d", CONV_FORWARD_CASES, _conv_forward, CPU_BACKENDS),
    *cases("linear", LINEAR_INIT_CASES, _linear_init, LAYERS),
    *cases("linear", LINEAR_FORWARD_CASES, _linear_forward, LAYERS, CPU_BACKENDS),
    *cases(
        "backend",
        UNKNOWN_BACKEND_CASES,
        _construct,
        [ConvReLUPool2d, *LAYERS],
        marks=NOT_ON_CUDA,
    ),
    *cases(
        "backend",
        UNAVAILABLE_BACKEND_CASES,
        _forward,
        [ConvReLUPool2d, LinearReLU],
        marks=NOT_ON_CUDA,
    ),
]


@pytest.mark.parametrize(("make", "exc", "match"), CASES)
def test_rejects(make, exc, match):
    check(make, exc, match)


def test_valid_layers_run():
    """The valid layers and inputs the layer cases start from do run."""
    for backend in CPU_BACKENDS:
        assert ConvReLUPool2d(C, O, K, backend=backend)(torch.randn(N, C, H, W)).shape == (
            N,
            O,
            4,
            4,
        )
        for cls in (LinearReLU, Linear):
            assert cls(IN, OUT, backend=backend)(torch.randn(4, IN)).shape == (4, OUT)
