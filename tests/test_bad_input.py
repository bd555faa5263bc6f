"""Bad input, table by table: every public function and layer, on every backend that runs on CPU
tensors here, and the registered C++ ops called directly (bypassing the Python checks).

Each bad call must raise the exception type stock PyTorch raises for it (RuntimeError) or
ValueError / TypeError, with a message naming the argument and what was expected; none may
crash the process (a crash fails the whole run, which is the point).
"""

import re

import pytest
import torch
from conftest import CPU_BACKENDS

from fastlenet import _ext
from fastlenet.functional import conv_relu_pool2d, linear, linear_relu
from fastlenet.nn import ConvReLUPool2d, Linear, LinearReLU

# Valid arguments each case starts from: input (N, C, H, W) = (2, 3, 10, 10), weight (4, 3, 3, 3)
# -> conv output 8x8 -> pooled 4x4.
N, C, H, W, O, K = 2, 3, 10, 10, 4, 3


def _params(cases):
    """pytest parameters from (id, *values) rows."""
    return [pytest.param(*case[1:], id=case[0]) for case in cases]


def _conv_args():
    return {
        "input": torch.randn(N, C, H, W),
        "weight": torch.randn(O, C, K, K),
        "bias": torch.randn(O),
        "stride": 1,
        "padding": 0,
        "pool_size": 2,
        "pool_stride": None,
    }


def _with(**changes):
    """A case's change to the valid arguments: values, or functions of the valid value."""

    def build():
        args = _conv_args()
        for key, value in changes.items():
            args[key] = value(args[key]) if callable(value) else value
        return args

    return build


def _call_conv(args, backend):
    args = dict(args)
    return conv_relu_pool2d(
        args.pop("input"), args.pop("weight"), args.pop("bias"), **args, backend=backend
    )


# (id, arguments, exception type, regex the message must match)
CONV_CASES = [
    # rank
    ("input_2d", _with(input=lambda x: x[0, 0]), ValueError, r"input must be 3-D .* or 4-D"),
    ("input_5d", _with(input=lambda x: x[None]), ValueError, r"input must be 3-D .* or 4-D"),
    ("input_0d", _with(input=torch.tensor(1.0)), ValueError, r"input must be 3-D .* or 4-D"),
    ("weight_3d", _with(weight=lambda w: w[0]), ValueError, r"weight must be 4-D"),
    ("weight_5d", _with(weight=lambda w: w[None]), ValueError, r"weight must be 4-D"),
    # channel count
    (
        "channels",
        _with(input=lambda x: x[:, :2]),
        ValueError,
        r"input has 2 channels but weight expects 3",
    ),
    (
        "channels_unbatched",
        _with(input=lambda x: x[0, :2]),
        ValueError,
        r"input has 2 channels but weight expects 3",
    ),
    # too small
    (
        "smaller_than_kernel",
        _with(input=lambda x: x[..., :2, :5]),
        ValueError,
        r"input of spatial size \(2, 5\).*smaller than the kernel \(3, 3\)",
    ),
    (
        "smaller_than_pool",
        _with(input=lambda x: x[..., :3, :]),
        ValueError,
        r"convolution output \(1, 8\) is smaller than the pooling window \(2, 2\)",
    ),
    (
        "smaller_than_pool_after_stride",
        _with(stride=4, pool_size=3),
        ValueError,
        r"convolution output \(2, 2\) is smaller than the pooling window \(3, 3\)",
    ),
    # dtypes
    (
        "input_int",
        _with(input=lambda x: x.int(), weight=lambda w: w.int(), bias=lambda b: b.int()),
        TypeError,
        r"input must be a floating-point tensor, got dtype torch.int32",
    ),
    (
        "input_int64",
        _with(input=lambda x: x.long()),
        TypeError,
        r"input must be a floating-point tensor, got dtype torch.int64",
    ),
    (
        "input_bool",
        _with(input=lambda x: x > 0),
        TypeError,
        r"input must be a floating-point tensor, got dtype torch.bool",
    ),
    (
        "weight_int",
        _with(weight=lambda w: w.int()),
        TypeError,
        r"weight has dtype torch.int32 but input has dtype torch.float32",
    ),
    (
        "weight_float64",
        _with(weight=lambda w: w.double()),
        TypeError,
        r"weight has dtype torch.float64 but input has dtype torch.float32",
    ),
    (
        "input_float64",
        _with(input=lambda x: x.double()),
        TypeError,
        r"weight has dtype torch.float32 but input has dtype torch.float64",
    ),
    (
        "bias_bool",
        _with(bias=lambda b: b > 0),
        TypeError,
        r"bias has dtype torch.bool but input has dtype torch.float32",
    ),
    (
        "bias_float64",
        _with(bias=lambda b: b.double()),
        TypeError,
        r"bias has dtype torch.float64 but input has dtype torch.float32",
    ),
    # shapes of weight and bias
    (
        "bias_short",
        _with(bias=lambda b: b[:3]),
        ValueError,
        r"bias must have shape \(4,\) to match weight, got \(3,\)",
    ),
    (
        "bias_2d",
        _with(bias=lambda b: b[None]),
        ValueError,
        r"bias must have shape \(4,\) to match weight, got \(1, 4\)",
    ),
    (
        "bias_0d",
        _with(bias=torch.tensor(1.0)),
        ValueError,
        r"bias must have shape \(4,\) to match weight, got \(\)",
    ),
    (
        "weight_no_out_channels",
        _with(weight=lambda w: w[:0], bias=lambda b: b[:0]),
        ValueError,
        r"weight must have no zero-size dimension, got shape \(0, 3, 3, 3\)",
    ),
    (
        "weight_no_in_channels",
        _with(input=lambda x: x[:, :0], weight=lambda w: w[:, :0]),
        ValueError,
        r"weight must have no zero-size dimension, got shape \(4, 0, 3, 3\)",
    ),
    # devices ("meta" stands in for a second device: there is no GPU)
    (
        "weight_meta",
        _with(weight=lambda w: w.to("meta")),
        ValueError,
        r"weight is on meta but input is on cpu",
    ),
    ("bias_meta", _with(bias=lambda b: b.to("meta")), ValueError, r"bias is on meta but input"),
    (
        "input_meta",
        _with(input=lambda x: x.to("meta")),
        ValueError,
        r"weight is on cpu but input is on meta",
    ),
    # geometry
    ("stride_0", _with(stride=0), ValueError, r"stride must be >= 1, got \(0, 0\)"),
    ("stride_negative", _with(stride=(1, -2)), ValueError, r"stride must be >= 1, got \(1, -2\)"),
    ("padding_negative", _with(padding=-1), ValueError, r"padding must be >= 0, got \(-1, -1\)"),
    ("pool_size_0", _with(pool_size=0), ValueError, r"pool_size must be >= 1, got \(0, 0\)"),
    (
        "pool_size_negative",
        _with(pool_size=(2, -1)),
        ValueError,
        r"pool_size must be >= 1, got \(2, -1\)",
    ),
    (
        "pool_stride_0",
        _with(pool_stride=(0, 2)),
        ValueError,
        r"pool_stride must be >= 1, got \(0, 2\)",
    ),
    (
        "pool_window_256",
        _with(input=torch.randn(1, C, 20, 20), pool_size=16),
        ValueError,
        r"pool_size \(16, 16\) has more than 255 positions",
    ),
    (
        "pool_window_1x256",
        _with(input=torch.randn(1, C, 3, 260), pool_size=(1, 256)),
        ValueError,
        r"pool_size \(1, 256\) has more than 255 positions",
    ),
    # argument types
    (
        "stride_float",
        _with(stride=1.5),
        TypeError,
        r"stride must be an int or a pair of ints, got 1.5",
    ),
    ("stride_bool", _with(stride=True), TypeError, r"stride must be an int or a pair of ints"),
    (
        "stride_triple",
        _with(stride=(1, 1, 1)),
        TypeError,
        r"stride must be an int or a pair of ints, got \(1, 1, 1\)",
    ),
    ("stride_none", _with(stride=None), TypeError, r"stride must be an int or a pair of ints"),
    (
        "padding_string",
        _with(padding="full"),
        ValueError,
        r"padding must be an int, a pair of ints or one of \('valid', 'same'\), got 'full'",
    ),
    (
        "padding_same_strided",
        _with(padding="same", stride=2),
        ValueError,
        r"padding='same' is not supported for strided convolutions",
    ),
    (
        "pool_size_float_pair",
        _with(pool_size=(2.0, 2.0)),
        TypeError,
        r"pool_size must be an int or a pair of ints",
    ),
    (
        "pool_stride_tensor",
        _with(pool_stride=torch.tensor(2)),
        TypeError,
        r"pool_stride must be an int or a pair of ints",
    ),
    (
        "input_list",
        _with(input=lambda x: x.tolist()),
        TypeError,
        r"input must be a torch.Tensor, got list",
    ),
    ("input_none", _with(input=None), TypeError, r"input must be a torch.Tensor, got NoneType"),
    (
        "weight_ndarray",
        _with(weight=lambda w: w.numpy()),
        TypeError,
        r"weight must be a torch.Tensor, got ndarray",
    ),
    ("bias_float", _with(bias=1.0), TypeError, r"bias must be a torch.Tensor, got float"),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("build", "exc", "match"), _params(CONV_CASES))
def test_conv_relu_pool2d_rejects(build, exc, match, backend):
    with pytest.raises(exc, match=match):
        _call_conv(build(), backend)


def test_conv_cases_are_bad_only_in_the_changed_argument():
    """The valid arguments every case starts from do run (so each case fails for its own
    reason, not for a shared mistake)."""
    for backend in CPU_BACKENDS:
        out = _call_conv(_conv_args(), backend)
        assert out.shape == (N, O, 4, 4)


# --- backend choice -------------------------------------------------------------------------

BACKEND_CASES = [
    ("cuda", RuntimeError, r"backend 'cuda' is unavailable: "),
    ("tpu", ValueError, r"backend must be one of \('auto', 'cpu', 'cuda', 'triton', 'reference'\)"),
    ("CPU", ValueError, r"backend must be one of .*, got 'CPU'"),
    (None, ValueError, r"backend must be one of .*, got None"),
    (0, ValueError, r"backend must be one of .*, got 0"),
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="'cuda' is available on this machine")
@pytest.mark.parametrize(("backend", "exc", "match"), BACKEND_CASES, ids=str)
def test_unavailable_or_unknown_backend(backend, exc, match):
    args = _conv_args()
    with pytest.raises(exc, match=match):
        _call_conv(args, backend)
    x = torch.randn(5, 6)
    for fn in (linear_relu, linear):
        with pytest.raises(exc, match=match):
            fn(x, torch.randn(3, 6), None, backend=backend)
    if backend != "cuda":  # the layers check the name at construction, availability at forward
        for make in (
            lambda: ConvReLUPool2d(C, O, K, backend=backend),
            lambda: LinearReLU(6, 3, backend=backend),
            lambda: Linear(6, 3, backend=backend),
        ):
            with pytest.raises(exc, match=match):
                make()
    else:
        with pytest.raises(exc, match=match):
            ConvReLUPool2d(C, O, K, backend=backend)(args["input"])
        with pytest.raises(exc, match=match):
            LinearReLU(6, 3, backend=backend)(x)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_low_precision_dtype(backend):
    """float16 runs where a backend supports it (matching stock) and is refused, naming the
    input dtype, where it does not: the C++ CPU kernels take float32 and float64 only."""
    x, w, b = torch.randn(N, C, H, W), torch.randn(O, C, K, K), torch.randn(O)
    half = [t.half() for t in (x, w, b)]
    if backend == "cpu":
        with pytest.raises((RuntimeError, TypeError), match=r"input must be float32 or float64"):
            conv_relu_pool2d(*half, backend=backend)
        with pytest.raises((RuntimeError, TypeError), match=r"input must be float32 or float64"):
            linear_relu(half[0][:, :, 0, 0], half[1][:, :, 0, 0], half[2], backend=backend)
        return
    try:
        out = conv_relu_pool2d(*half, backend=backend)
    except (RuntimeError, TypeError) as exc:
        assert re.search(r"input.*(float|dtype)", str(exc)), str(exc)
        return
    ref = torch.nn.functional.max_pool2d(torch.relu(torch.nn.functional.conv2d(x, w, b)), 2)
    assert out.dtype == torch.float16
    assert torch.allclose(out.float(), ref, rtol=1e-2, atol=1e-2)


# --- the layers -------------------------------------------------------------------------------

CONV_LAYER_INIT_CASES = [
    ("in_channels_0", {"in_channels": 0}, ValueError, r"in_channels must be a positive int, got 0"),
    (
        "in_channels_float",
        {"in_channels": 2.5},
        ValueError,
        r"in_channels must be a positive int, got 2.5",
    ),
    (
        "in_channels_bool",
        {"in_channels": True},
        ValueError,
        r"in_channels must be a positive int, got True",
    ),
    (
        "out_channels_negative",
        {"out_channels": -4},
        ValueError,
        r"out_channels must be a positive int, got -4",
    ),
    (
        "out_channels_str",
        {"out_channels": "4"},
        ValueError,
        r"out_channels must be a positive int, got '4'",
    ),
    ("kernel_size_0", {"kernel_size": 0}, ValueError, r"kernel_size must be >= 1, got \(0, 0\)"),
    (
        "kernel_size_negative",
        {"kernel_size": (3, -1)},
        ValueError,
        r"kernel_size must be >= 1, got \(3, -1\)",
    ),
    (
        "kernel_size_triple",
        {"kernel_size": (3, 3, 3)},
        TypeError,
        r"kernel_size must be an int or a pair of ints",
    ),
    ("stride_0", {"stride": 0}, ValueError, r"stride must be >= 1, got \(0, 0\)"),
    ("padding_negative", {"padding": -2}, ValueError, r"padding must be >= 0, got \(-2, -2\)"),
    ("padding_string", {"padding": "full"}, ValueError, r"padding must be an int, a pair of ints"),
    ("padding_same_strided", {"padding": "same", "stride": 2}, ValueError, r"strided convolutions"),
    ("pool_size_0", {"pool_size": 0}, ValueError, r"pool_size must be >= 1, got \(0, 0\)"),
    (
        "pool_window_256",
        {"pool_size": (2, 128)},
        ValueError,
        r"pool_size \(2, 128\) has more than 255 positions",
    ),
    ("pool_stride_0", {"pool_stride": 0}, ValueError, r"pool_stride must be >= 1, got \(0, 0\)"),
    ("backend_unknown", {"backend": "gpu"}, ValueError, r"backend must be one of"),
    # nn.Conv2d's arguments: the fused kernels have dilation 1, groups 1 and zero padding only,
    # so the layer takes stock's defaults alone and names any other value.
    ("dilation", {"dilation": 2}, ValueError, r"dilation must be 1 .*, got 2"),
    ("groups", {"groups": 3}, ValueError, r"groups must be 1 .*, got 3"),
    ("padding_mode", {"padding_mode": "reflect"}, ValueError, r"padding_mode must be 'zeros'"),
]


@pytest.mark.parametrize(("kwargs", "exc", "match"), _params(CONV_LAYER_INIT_CASES))
def test_conv_layer_init_rejects(kwargs, exc, match):
    args = {"in_channels": C, "out_channels": O, "kernel_size": K, **kwargs}
    with pytest.raises(exc, match=match):
        ConvReLUPool2d(**args)


def _conv_layer_case(backend, change):
    layer = ConvReLUPool2d(C, O, K, backend=backend)
    x = torch.randn(N, C, H, W)
    return change(layer, x)


def _set(layer, name, value):
    setattr(layer, name, None if value is None else torch.nn.Parameter(value, False))


CONV_LAYER_FORWARD_CASES = [
    ("input_2d", lambda m, x: (m, x[0, 0]), ValueError, r"input must be 3-D .* or 4-D"),
    ("input_5d", lambda m, x: (m, x[None]), ValueError, r"input must be 3-D .* or 4-D"),
    (
        "channels",
        lambda m, x: (m, x[:, 1:]),
        ValueError,
        r"input has 2 channels but weight expects 3",
    ),
    (
        "smaller_than_kernel",
        lambda m, x: (m, x[..., :2, :2]),
        ValueError,
        r"smaller than the kernel \(3, 3\)",
    ),
    (
        "smaller_than_pool",
        lambda m, x: (m, x[..., :3, :3]),
        ValueError,
        r"convolution output \(1, 1\) is smaller than the pooling window \(2, 2\)",
    ),
    (
        "input_int",
        lambda m, x: (m, x.int()),
        TypeError,
        r"input must be a floating-point tensor, got dtype torch.int32",
    ),
    (
        "input_bool",
        lambda m, x: (m, x > 0),
        TypeError,
        r"input must be a floating-point tensor, got dtype torch.bool",
    ),
    (
        "input_float64",
        lambda m, x: (m, x.double()),
        TypeError,
        r"weight has dtype torch.float32 but input has dtype torch.float64",
    ),
    (
        "bias_float64",
        lambda m, x: (_set(m, "bias", m.bias.detach().double()) or m, x),
        TypeError,
        r"bias has dtype torch.float64 but input has dtype torch.float32",
    ),
    (
        "weight_3d",
        lambda m, x: (_set(m, "weight", m.weight.detach()[0]) or m, x),
        ValueError,
        r"weight must be 4-D",
    ),
    (
        "bias_short",
        lambda m, x: (_set(m, "bias", m.bias.detach()[:2]) or m, x),
        ValueError,
        r"bias must have shape \(4,\) to match weight, got \(2,\)",
    ),
    ("layer_on_meta", lambda m, x: (m.to("meta"), x), ValueError, r"weight is on meta"),
    ("input_on_meta", lambda m, x: (m, x.to("meta")), ValueError, r"but input is on meta"),
    ("input_ndarray", lambda m, x: (m, x.numpy()), TypeError, r"input must be a torch.Tensor"),
    ("input_none", lambda m, x: (m, None), TypeError, r"input must be a torch.Tensor"),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    ("change", "exc", "match"),
    _params(CONV_LAYER_FORWARD_CASES),
)
def test_conv_layer_forward_rejects(change, exc, match, backend):
    layer, x = _conv_layer_case(backend, change)
    with pytest.raises(exc, match=match):
        layer(x)


# --- linear_relu / linear and their layers ---------------------------------------------------

IN, OUT = 6, 5


def _lin_args():
    return {"input": torch.randn(4, IN), "weight": torch.randn(OUT, IN), "bias": torch.randn(OUT)}


def _lin_with(**changes):
    def build():
        args = _lin_args()
        for key, value in changes.items():
            args[key] = value(args[key]) if callable(value) else value
        return args

    return build


LINEAR_CASES = [
    (
        "input_0d",
        _lin_with(input=torch.tensor(2.0)),
        ValueError,
        r"input must have at least 1 dimension",
    ),
    (
        "features",
        _lin_with(input=lambda x: x[:, :4]),
        ValueError,
        r"input has 4 features in its last dimension but weight expects 6",
    ),
    (
        "features_3d",
        _lin_with(input=torch.randn(2, 3, 7)),
        ValueError,
        r"input has 7 features in its last dimension but weight expects 6",
    ),
    ("weight_1d", _lin_with(weight=lambda w: w[0]), ValueError, r"weight must be 2-D"),
    ("weight_3d", _lin_with(weight=lambda w: w[None]), ValueError, r"weight must be 2-D"),
    (
        "bias_long",
        _lin_with(bias=torch.randn(OUT + 1)),
        ValueError,
        r"bias must have shape \(5,\) to match weight, got \(6,\)",
    ),
    (
        "bias_2d",
        _lin_with(bias=lambda b: b[:, None]),
        ValueError,
        r"bias must have shape \(5,\) to match weight, got \(5, 1\)",
    ),
    (
        "input_int",
        _lin_with(input=lambda x: x.int(), weight=lambda w: w.int(), bias=lambda b: b.int()),
        TypeError,
        r"input must be a floating-point tensor, got dtype torch.int32",
    ),
    (
        "input_bool",
        _lin_with(input=lambda x: x > 0),
        TypeError,
        r"input must be a floating-point tensor, got dtype torch.bool",
    ),
    (
        "weight_float64",
        _lin_with(weight=lambda w: w.double()),
        TypeError,
        r"weight has dtype torch.float64 but input has dtype torch.float32",
    ),
    (
        "weight_int",
        _lin_with(weight=lambda w: w.long()),
        TypeError,
        r"weight has dtype torch.int64 but input has dtype torch.float32",
    ),
    (
        "bias_int",
        _lin_with(bias=lambda b: b.int()),
        TypeError,
        r"bias has dtype torch.int32 but input has dtype torch.float32",
    ),
    (
        "weight_meta",
        _lin_with(weight=lambda w: w.to("meta")),
        ValueError,
        r"weight is on meta but input is on cpu",
    ),
    (
        "bias_meta",
        _lin_with(bias=lambda b: b.to("meta")),
        ValueError,
        r"bias is on meta but input is on cpu",
    ),
    (
        "input_meta",
        _lin_with(input=lambda x: x.to("meta")),
        ValueError,
        r"weight is on cpu but input is on meta",
    ),
    (
        "input_list",
        _lin_with(input=lambda x: x.tolist()),
        TypeError,
        r"input must be a torch.Tensor, got list",
    ),
    (
        "weight_ndarray",
        _lin_with(weight=lambda w: w.numpy()),
        TypeError,
        r"weight must be a torch.Tensor, got ndarray",
    ),
    ("bias_int_scalar", _lin_with(bias=3), TypeError, r"bias must be a torch.Tensor, got int"),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("fn", [linear_relu, linear], ids=["linear_relu", "linear"])
@pytest.mark.parametrize(("build", "exc", "match"), _params(LINEAR_CASES))
def test_linear_rejects(build, exc, match, fn, backend):
    args = build()
    with pytest.raises(exc, match=match):
        fn(args["input"], args["weight"], args["bias"], backend=backend)


LINEAR_LAYER_INIT_CASES = [
    ("in_features_0", {"in_features": 0}, r"in_features must be a positive int, got 0"),
    ("in_features_float", {"in_features": 6.0}, r"in_features must be a positive int, got 6.0"),
    ("out_features_negative", {"out_features": -1}, r"out_features must be a positive int"),
    ("out_features_bool", {"out_features": True}, r"out_features must be a positive int"),
    ("backend_unknown", {"backend": "gpu"}, r"backend must be one of"),
]


@pytest.mark.parametrize("layer_cls", [LinearReLU, Linear])
@pytest.mark.parametrize(("kwargs", "match"), _params(LINEAR_LAYER_INIT_CASES))
def test_linear_layer_init_rejects(kwargs, match, layer_cls):
    args = {"in_features": IN, "out_features": OUT, **kwargs}
    with pytest.raises(ValueError, match=match):
        layer_cls(**args)


LINEAR_LAYER_FORWARD_CASES = [
    ("input_0d", lambda m, x: (m, x[0, 0]), ValueError, r"input must have at least 1 dimension"),
    (
        "features",
        lambda m, x: (m, x[:, 1:]),
        ValueError,
        r"input has 5 features in its last dimension but weight expects 6",
    ),
    (
        "input_int",
        lambda m, x: (m, x.long()),
        TypeError,
        r"input must be a floating-point tensor, got dtype torch.int64",
    ),
    (
        "input_float64",
        lambda m, x: (m, x.double()),
        TypeError,
        r"weight has dtype torch.float32 but input has dtype torch.float64",
    ),
    (
        "weight_3d",
        lambda m, x: (_set(m, "weight", m.weight.detach()[None]) or m, x),
        ValueError,
        r"weight must be 2-D",
    ),
    (
        "bias_short",
        lambda m, x: (_set(m, "bias", m.bias.detach()[:1]) or m, x),
        ValueError,
        r"bias must have shape \(5,\) to match weight, got \(1,\)",
    ),
    ("layer_on_meta", lambda m, x: (m.to("meta"), x), ValueError, r"weight is on meta"),
    ("input_on_meta", lambda m, x: (m, x.to("meta")), ValueError, r"but input is on meta"),
    ("input_list", lambda m, x: (m, x.tolist()), TypeError, r"input must be a torch.Tensor"),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layer_cls", [LinearReLU, Linear])
@pytest.mark.parametrize(
    ("change", "exc", "match"),
    _params(LINEAR_LAYER_FORWARD_CASES),
)
def test_linear_layer_forward_rejects(change, exc, match, layer_cls, backend):
    layer, x = change(layer_cls(IN, OUT, backend=backend), torch.randn(4, IN))
    with pytest.raises(exc, match=match):
        layer(x)


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


# --- the registered C++ ops, called directly -------------------------------------------------
# These bypass every Python check, so only csrc/checks.h stands between a bad argument and the
# kernels' raw pointers. A tensor on "meta" cannot stand in for a second device here: the
# dispatcher sends any call with a meta tensor to the fake kernel, never to the CPU kernel.

GEOM = ([1, 1], [0, 0], [2, 2], [2, 2])


def _fwd_args():
    return [torch.randn(N, C, H, W), torch.randn(O, C, K, K), torch.randn(O), *GEOM]


def _bwd_args():
    x, w, b, *geom = _fwd_args()
    _, argmax = torch.ops.fastlenet.conv_relu_pool_fwd(x, w, b, *geom)
    return [torch.randn(N, O, 4, 4), argmax, x, w, *geom, True, True]


def _replace(builder, **changes):
    """Arguments from `builder` with positional entries replaced ("a3" is position 3)."""

    def build():
        args = builder()
        for key, value in changes.items():
            i = int(key[1:])
            args[i] = value(args[i]) if callable(value) else value
        return args

    return build


FWD_CASES = [
    ("input_3d", _replace(_fwd_args, a0=lambda x: x[0]), r"input must be 4-D \(N, C, H, W\)"),
    ("weight_2d", _replace(_fwd_args, a1=lambda w: w[0, 0]), r"weight must be 4-D"),
    (
        "channels",
        _replace(_fwd_args, a0=lambda x: x[:, :1]),
        r"input has 1 channels but weight expects 3",
    ),
    (
        "input_int",
        _replace(_fwd_args, a0=lambda x: x.int(), a1=lambda w: w.int(), a2=lambda b: b.int()),
        r"input must be float32 or float64, got Int",
    ),
    (
        "input_bool",
        _replace(_fwd_args, a0=lambda x: x > 0, a1=lambda w: w > 0, a2=lambda b: b > 0),
        r"input must be float32 or float64, got Bool",
    ),
    (
        "input_half",
        _replace(_fwd_args, a0=lambda x: x.half(), a1=lambda w: w.half(), a2=lambda b: b.half()),
        r"input must be float32 or float64, got Half",
    ),
    (
        "weight_float64",
        _replace(_fwd_args, a1=lambda w: w.double()),
        r"weight has dtype Double but input has dtype Float",
    ),
    (
        "bias_int",
        _replace(_fwd_args, a2=lambda b: b.int()),
        r"bias has dtype Int but input has dtype Float",
    ),
    ("bias_short", _replace(_fwd_args, a2=lambda b: b[:1]), r"bias must have shape \(4\)"),
    ("bias_2d", _replace(_fwd_args, a2=lambda b: b[None]), r"bias must have shape \(4\)"),
    (
        "weight_no_out_channels",
        _replace(_fwd_args, a1=lambda w: w[:0], a2=lambda b: b[:0]),
        r"weight must have no zero-size dimension",
    ),
    (
        "weight_zero_kernel",
        _replace(_fwd_args, a1=lambda w: w[..., :0]),
        r"weight must have no zero-size dimension",
    ),
    (
        "smaller_than_kernel",
        _replace(_fwd_args, a0=lambda x: x[..., :2, :]),
        r"input of size \(2, 10\) with padding \[0, 0\] is smaller than the kernel",
    ),
    (
        "smaller_than_pool",
        _replace(_fwd_args, a0=lambda x: x[..., :, :3]),
        r"convolution output \(8, 1\) is smaller than the pooling window \[2, 2\]",
    ),
    ("stride_0", _replace(_fwd_args, a3=[0, 1]), r"stride must be >= 1, got \[0, 1\]"),
    ("stride_negative", _replace(_fwd_args, a3=[1, -3]), r"stride must be >= 1"),
    ("stride_3_values", _replace(_fwd_args, a3=[1, 1, 1]), r"stride, padding, .* 2 values"),
    ("padding_1_value", _replace(_fwd_args, a4=[1]), r"stride, padding, .* 2 values"),
    ("padding_negative", _replace(_fwd_args, a4=[0, -1]), r"padding must be >= 0"),
    (
        "padding_overflows",
        _replace(_fwd_args, a4=[2**62, 0]),
        r"padding must be at most",
    ),
    ("pool_size_0", _replace(_fwd_args, a5=[0, 2]), r"pool_size must be >= 1"),
    ("pool_size_negative", _replace(_fwd_args, a5=[-20, -20]), r"pool_size must be >= 1"),
    (
        "pool_window_256",
        _replace(_fwd_args, a0=torch.randn(1, C, 20, 20), a5=[16, 16]),
        r"pool_size must have at most 255 positions, got \[16, 16\]",
    ),
    (
        "pool_window_product_overflows",
        _replace(_fwd_args, a5=[2**32, 2**32]),
        r"pool_size must have at most 255 positions",
    ),
    ("pool_stride_0", _replace(_fwd_args, a6=[2, 0]), r"pool_stride must be >= 1"),
]

BWD_CASES = [
    (
        "grad_out_shape",
        _replace(_bwd_args, a0=lambda g: g[:1]),
        r"grad_out must have shape \[2, 4, 4, 4\], got \[1, 4, 4, 4\]",
    ),
    (
        "grad_out_float64",
        _replace(_bwd_args, a0=lambda g: g.double()),
        r"grad_out has dtype Double but input has dtype Float",
    ),
    (
        "argmax_shape",
        _replace(_bwd_args, a1=lambda a: a[..., :3]),
        r"argmax must have shape \[2, 4, 4, 4\], got \[2, 4, 4, 3\]",
    ),
    (
        "argmax_int64",
        _replace(_bwd_args, a1=lambda a: a.long()),
        r"argmax must be uint8, got Long",
    ),
    (
        "argmax_out_of_window",  # a position past the 2x2 window would write out of bounds
        _replace(_bwd_args, a1=lambda a: a.fill_(4)),
        r"argmax holds 4 .* but a pooling window has 4 positions",
    ),
    (
        "argmax_254",
        _replace(_bwd_args, a1=lambda a: a.index_fill_(3, torch.tensor([3]), 254)),
        r"argmax holds 254 .* but a pooling window has 4 positions",
    ),
    ("input_3d", _replace(_bwd_args, a2=lambda x: x[0]), r"input must be 4-D"),
    (
        "weight_float64",
        _replace(_bwd_args, a3=lambda w: w.double()),
        r"weight has dtype Double but input has dtype Float",
    ),
    (
        "geometry_mismatch",
        _replace(_bwd_args, a4=[2, 2]),
        r"grad_out must have shape \[2, 4, 2, 2\], got \[2, 4, 4, 4\]",
    ),
    ("pool_stride_0", _replace(_bwd_args, a7=[0, 0]), r"pool_stride must be >= 1"),
]


def _lin_fwd_args():
    return [torch.randn(4, IN), torch.randn(OUT, IN), torch.randn(OUT), True]


def _lin_bwd_args():
    x, w, b, relu = _lin_fwd_args()
    out = torch.ops.fastlenet.linear_relu_fwd(x, w, b, relu)
    return [torch.randn_like(out), out, x, w, relu]


LIN_FWD_CASES = [
    ("input_1d", _replace(_lin_fwd_args, a0=lambda x: x[0]), r"input must be 2-D"),
    ("input_3d", _replace(_lin_fwd_args, a0=lambda x: x[None]), r"input must be 2-D"),
    ("weight_1d", _replace(_lin_fwd_args, a1=lambda w: w[0]), r"weight must be 2-D"),
    (
        "features",
        _replace(_lin_fwd_args, a0=lambda x: x[:, :2]),
        r"input has 2 features but weight expects 6",
    ),
    (
        "input_int",
        _replace(_lin_fwd_args, a0=lambda x: x.int(), a1=lambda w: w.int(), a2=lambda b: b.int()),
        r"input must be float32 or float64, got Int",
    ),
    (
        "weight_float64",
        _replace(_lin_fwd_args, a1=lambda w: w.double()),
        r"weight has dtype Double but input has dtype Float",
    ),
    (
        "bias_float64",
        _replace(_lin_fwd_args, a2=lambda b: b.double()),
        r"bias has dtype Double but input has dtype Float",
    ),
    ("bias_short", _replace(_lin_fwd_args, a2=lambda b: b[:2]), r"bias must have shape \(5\)"),
]

LIN_BWD_CASES = [
    (
        "grad_out_shape",
        _replace(_lin_bwd_args, a0=lambda g: g[:2]),
        r"grad_out must have shape \(4, 5\), got \[2, 5\]",
    ),
    (
        "grad_out_float64",
        _replace(_lin_bwd_args, a0=lambda g: g.double()),
        r"grad_out has dtype Double but input has dtype Float",
    ),
    (
        "out_shape",
        _replace(_lin_bwd_args, a1=lambda o: o[:, :2]),
        r"out must have shape \[4, 5\], got \[4, 2\]",
    ),
    (
        "out_int",
        _replace(_lin_bwd_args, a1=lambda o: o.int()),
        r"out has dtype Int but input has dtype Float",
    ),
    ("input_3d", _replace(_lin_bwd_args, a2=lambda x: x[None]), r"input must be 2-D"),
    (
        "features",
        _replace(_lin_bwd_args, a3=lambda w: w[:, :3]),
        r"input has 6 features but weight expects 3",
    ),
]

OP_CASES = (
    [("conv_relu_pool_fwd", *c) for c in FWD_CASES]
    + [("conv_relu_pool_bwd", *c) for c in BWD_CASES]
    + [("linear_relu_fwd", *c) for c in LIN_FWD_CASES]
    + [("linear_relu_bwd", *c) for c in LIN_BWD_CASES]
)


@pytest.mark.skipif(not _ext.LOADED, reason="needs the C++ extension")
@pytest.mark.parametrize(
    ("op", "build", "match"),
    [(c[0], c[2], c[3]) for c in OP_CASES],
    ids=[f"{c[0]}-{c[1]}" for c in OP_CASES],
)
def test_cpp_op_rejects(op, build, match):
    args = build()
    with pytest.raises(RuntimeError, match=match):
        getattr(torch.ops.fastlenet, op)(*args)


@pytest.mark.skipif(not _ext.LOADED, reason="needs the C++ extension")
def test_cpp_op_valid_arguments_run():
    """The valid arguments the C++ cases start from do run."""
    ops = torch.ops.fastlenet
    out, argmax = ops.conv_relu_pool_fwd(*_fwd_args())
    assert out.shape == argmax.shape == (N, O, 4, 4)
    args = _bwd_args()
    x, w = args[2], args[3]
    for wanted in ((True, True), (True, False), (False, True)):
        grads = ops.conv_relu_pool_bwd(*args[:-2], *wanted)
        shapes = [x.shape if wanted[0] else (0,), w.shape if wanted[1] else (0,)]
        shapes.append((O,) if wanted[1] else (0,))
        assert [t.shape for t in grads] == shapes
    assert ops.linear_relu_fwd(*_lin_fwd_args()).shape == (4, OUT)
    assert [t.shape for t in ops.linear_relu_bwd(*_lin_bwd_args())] == [
        (4, IN),
        (OUT, IN),
        (OUT,),
    ]
