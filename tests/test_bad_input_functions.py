"""Bad input to the functions, conv_relu_pool2d, linear_relu and linear, on every backend that
runs on CPU tensors here: one row per case (see tests/bad_input.py)."""

import re

import pytest
import torch
from bad_input import BACKEND_CASES, IN, OUT, C, H, K, N, O, W, cases, changed, check
from conftest import CPU_BACKENDS

from fastlenet import backends
from fastlenet.functional import conv_relu_pool2d, linear, linear_relu


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


def _lin_args():
    return {"input": torch.randn(4, IN), "weight": torch.randn(OUT, IN), "bias": torch.randn(OUT)}


def conv(**changes):
    return changed(_conv_args, **changes)


def lin(**changes):
    return changed(_lin_args, **changes)


def _call_conv(args, backend):
    args = dict(args)
    return conv_relu_pool2d(
        args.pop("input"), args.pop("weight"), args.pop("bias"), **args, backend=backend
    )


def _conv(build, backend):
    args = build()
    return lambda: _call_conv(args, backend)


def _linear(build, fn, backend):
    args = build()
    return lambda: fn(args["input"], args["weight"], args["bias"], backend=backend)


def _backend(backend, fn):
    if fn is conv_relu_pool2d:
        args = _conv_args()
        return lambda: _call_conv(args, backend)
    x, weight = torch.randn(5, 6), torch.randn(3, 6)
    return lambda: fn(x, weight, None, backend=backend)


# (id, arguments, exception type, regex the message must match)
# fmt: off
CONV_CASES = [
    # rank
    ("input_2d", conv(input=lambda x: x[0, 0]), ValueError, r"input must be 3-D .* or 4-D"),
    ("input_5d", conv(input=lambda x: x[None]), ValueError, r"input must be 3-D .* or 4-D"),
    ("input_0d", conv(input=torch.tensor(1.0)), ValueError, r"input must be 3-D .* or 4-D"),
    ("weight_3d", conv(weight=lambda w: w[0]), ValueError, r"weight must be 4-D"),
    ("weight_5d", conv(weight=lambda w: w[None]), ValueError, r"weight must be 4-D"),
    # channel count
    ("channels", conv(input=lambda x: x[:, :2]), ValueError,
     r"input has 2 channels but weight expects 3"),
    ("channels_unbatched", conv(input=lambda x: x[0, :2]), ValueError,
     r"input has 2 channels but weight expects 3"),
    # too small
    ("smaller_than_kernel", conv(input=lambda x: x[..., :2, :5]), ValueError,
     r"input of spatial size \(2, 5\).*smaller than the kernel \(3, 3\)"),
    ("smaller_than_pool", conv(input=lambda x: x[..., :3, :]), ValueError,
     r"convolution output \(1, 8\) is smaller than the pooling window \(2, 2\)"),
    ("smaller_than_pool_after_stride", conv(stride=4, pool_size=3), ValueError,
     r"convolution output \(2, 2\) is smaller than the pooling window \(3, 3\)"),
    # dtypes
    ("input_int",
     conv(input=lambda x: x.int(), weight=lambda w: w.int(), bias=lambda b: b.int()),
     TypeError, r"input must be a floating-point tensor, got dtype torch.int32"),
    ("input_int64", conv(input=lambda x: x.long()), TypeError,
     r"input must be a floating-point tensor, got dtype torch.int64"),
    ("input_bool", conv(input=lambda x: x > 0), TypeError,
     r"input must be a floating-point tensor, got dtype torch.bool"),
    ("weight_int", conv(weight=lambda w: w.int()), TypeError,
     r"weight has dtype torch.int32 but input has dtype torch.float32"),
    ("weight_float64", conv(weight=lambda w: w.double()), TypeError,
     r"weight has dtype torch.float64 but input has dtype torch.float32"),
    ("input_float64", conv(input=lambda x: x.double()), TypeError,
     r"weight has dtype torch.float32 but input has dtype torch.float64"),
    ("bias_bool", conv(bias=lambda b: b > 0), TypeError,
     r"bias has dtype torch.bool but input has dtype torch.float32"),
    ("bias_float64", conv(bias=lambda b: b.double()), TypeError,
     r"bias has dtype torch.float64 but input has dtype torch.float32"),
    # shapes of weight and bias
    ("bias_short", conv(bias=lambda b: b[:3]), ValueError,
     r"bias must have shape \(4,\) to match weight, got \(3,\)"),
    ("bias_2d", conv(bias=lambda b: b[None]), ValueError,
     r"bias must have shape \(4,\) to match weight, got \(1, 4\)"),
    ("bias_0d", conv(bias=torch.tensor(1.0)), ValueError,
     r"bias must have shape \(4,\) to match weight, got \(\)"),
    ("weight_no_out_channels", conv(weight=lambda w: w[:0], bias=lambda b: b[:0]), ValueError,
     r"weight must have no zero-size dimension, got shape \(0, 3, 3, 3\)"),
    ("weight_no_in_channels", conv(input=lambda x: x[:, :0], weight=lambda w: w[:, :0]), ValueError,
     r"weight must have no zero-size dimension, got shape \(4, 0, 3, 3\)"),
    # devices ("meta" stands in for a second device: there is no GPU)
    ("weight_meta", conv(weight=lambda w: w.to("meta")), ValueError,
     r"weight is on meta but input is on cpu"),
    ("bias_meta", conv(bias=lambda b: b.to("meta")), ValueError, r"bias is on meta but input"),
    ("input_meta", conv(input=lambda x: x.to("meta")), ValueError,
     r"weight is on cpu but input is on meta"),
    # geometry
    ("stride_0", conv(stride=0), ValueError, r"stride must be >= 1, got \(0, 0\)"),
    ("stride_negative", conv(stride=(1, -2)), ValueError, r"stride must be >= 1, got \(1, -2\)"),
    ("padding_negative", conv(padding=-1), ValueError, r"padding must be >= 0, got \(-1, -1\)"),
    ("pool_size_0", conv(pool_size=0), ValueError, r"pool_size must be >= 1, got \(0, 0\)"),
    ("pool_size_negative", conv(pool_size=(2, -1)), ValueError,
     r"pool_size must be >= 1, got \(2, -1\)"),
    ("pool_stride_0", conv(pool_stride=(0, 2)), ValueError,
     r"pool_stride must be >= 1, got \(0, 2\)"),
    ("pool_window_256", conv(input=torch.randn(1, C, 20, 20), pool_size=16), ValueError,
     r"pool_size \(16, 16\) has more than 255 positions"),
    ("pool_window_1x256", conv(input=torch.randn(1, C, 3, 260), pool_size=(1, 256)), ValueError,
     r"pool_size \(1, 256\) has more than 255 positions"),
    # argument types
    ("stride_float", conv(stride=1.5), TypeError,
     r"stride must be an int or a pair of ints, got 1.5"),
    ("stride_bool", conv(stride=True), TypeError, r"stride must be an int or a pair of ints"),
    ("stride_triple", conv(stride=(1, 1, 1)), TypeError,
     r"stride must be an int or a pair of ints, got \(1, 1, 1\)"),
    ("stride_none", conv(stride=None), TypeError, r"stride must be an int or a pair of ints"),
    ("padding_string", conv(padding="full"), ValueError,
     r"padding must be an int, a pair of ints or one of \('valid', 'same'\), got 'full'"),
    ("padding_same_strided", conv(padding="same", stride=2), ValueError,
     r"padding='same' is not supported for strided convolutions"),
    ("pool_size_float_pair", conv(pool_size=(2.0, 2.0)), TypeError,
     r"pool_size must be an int or a pair of ints"),
    ("pool_stride_tensor", conv(pool_stride=torch.tensor(2.0)), TypeError,
     r"pool_stride must be an int or a pair of ints"),
    ("input_list", conv(input=lambda x: x.tolist()), TypeError,
     r"input must be a torch.Tensor, got list"),
    ("input_none", conv(input=None), TypeError, r"input must be a torch.Tensor, got NoneType"),
    ("weight_ndarray", conv(weight=lambda w: w.numpy()), TypeError,
     r"weight must be a torch.Tensor, got ndarray"),
    ("bias_float", conv(bias=1.0), TypeError, r"bias must be a torch.Tensor, got float"),
]

LINEAR_CASES = [
    ("input_0d", lin(input=torch.tensor(2.0)), ValueError, r"input must have at least 1 dimension"),
    ("features", lin(input=lambda x: x[:, :4]), ValueError,
     r"input has 4 features in its last dimension but weight expects 6"),
    ("features_3d", lin(input=torch.randn(2, 3, 7)), ValueError,
     r"input has 7 features in its last dimension but weight expects 6"),
    ("weight_1d", lin(weight=lambda w: w[0]), ValueError, r"weight must be 2-D"),
    ("weight_3d", lin(weight=lambda w: w[None]), ValueError, r"weight must be 2-D"),
    ("bias_long", lin(bias=torch.randn(OUT + 1)), ValueError,
     r"bias must have shape \(5,\) to match weight, got \(6,\)"),
    ("bias_2d", lin(bias=lambda b: b[:, None]), ValueError,
     r"bias must have shape \(5,\) to match weight, got \(5, 1\)"),
    ("input_int",
     lin(input=lambda x: x.int(), weight=lambda w: w.int(), bias=lambda b: b.int()),
     TypeError, r"input must be a floating-point tensor, got dtype torch.int32"),
    ("input_bool", lin(input=lambda x: x > 0), TypeError,
     r"input must be a floating-point tensor, got dtype torch.bool"),
    ("weight_float64", lin(weight=lambda w: w.double()), TypeError,
     r"weight has dtype torch.float64 but input has dtype torch.float32"),
    ("weight_int", lin(weight=lambda w: w.long()), TypeError,
     r"weight has dtype torch.int64 but input has dtype torch.float32"),
    ("bias_int", lin(bias=lambda b: b.int()), TypeError,
     r"bias has dtype torch.int32 but input has dtype torch.float32"),
    ("weight_meta", lin(weight=lambda w: w.to("meta")), ValueError,
     r"weight is on meta but input is on cpu"),
    ("bias_meta", lin(bias=lambda b: b.to("meta")), ValueError,
     r"bias is on meta but input is on cpu"),
    ("input_meta", lin(input=lambda x: x.to("meta")), ValueError,
     r"weight is on cpu but input is on meta"),
    ("input_list", lin(input=lambda x: x.tolist()), TypeError,
     r"input must be a torch.Tensor, got list"),
    ("weight_ndarray", lin(weight=lambda w: w.numpy()), TypeError,
     r"weight must be a torch.Tensor, got ndarray"),
    ("bias_int_scalar", lin(bias=3), TypeError, r"bias must be a torch.Tensor, got int"),
]
# fmt: on

CASES = [
    *cases("conv_relu_pool2d", CONV_CASES, _conv, CPU_BACKENDS),
    *cases("linear", LINEAR_CASES, _linear, [linear_relu, linear], CPU_BACKENDS),
    # an unavailable or unknown backend (the row's arg) given to each function
    *cases(
        "backend",
        BACKEND_CASES,
        _backend,
        [conv_relu_pool2d, linear_relu, linear],
        marks=pytest.mark.skipif(
            torch.cuda.is_available(), reason="'cuda' is available on this machine"
        ),
    ),
]


@pytest.mark.parametrize(("make", "exc", "match"), CASES)
def test_rejects(make, exc, match):
    check(make, exc, match)


def test_conv_cases_are_bad_only_in_the_changed_argument():
    """The valid arguments every case starts from do run (so each case fails for its own
    reason, not for a shared mistake)."""
    for backend in CPU_BACKENDS:
        out = _call_conv(_conv_args(), backend)
        assert out.shape == (N, O, 4, 4)


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


def _requiring_grad(args):
    return {
        key: value.detach().requires_grad_()
        if isinstance(value, torch.Tensor) and value.is_floating_point()
        else value
        for key, value in args.items()
    }


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("resolved", [False, True], ids=["first_call", "resolved"])
@pytest.mark.parametrize(
    ("build", "exc", "match"), [row[1:] for row in LINEAR_CASES], ids=[r[0] for r in LINEAR_CASES]
)
@pytest.mark.parametrize("fn", [linear_relu, linear])
def test_linear_rejects_on_both_cpu_paths(fn, build, exc, match, resolved, requires_grad):
    """The CPU fast path (the backend already resolved: fastlenet/linear_relu.py, _apply)
    names each mistake as a first call does, with autograd recording and without."""
    backends.refresh()  # forgets every resolved backend
    if resolved:
        fn(torch.randn(2, 3), torch.randn(4, 3), backend="cpu")
        assert backends._RESOLVED.get(("cpu", torch.device("cpu"))) == "cpu"
    else:
        assert not backends._RESOLVED
    args = build()
    if requires_grad:
        args = _requiring_grad(args)
    with pytest.raises(exc, match=match):
        fn(args["input"], args["weight"], args["bias"], backend="cpu")
