"""Bad input to the registered C++ ops, called directly: one row per case (see
tests/bad_input.py).

These bypass every Python check, so only csrc/checks.h stands between a bad argument and the
kernels' raw pointers. A tensor on "meta" cannot stand in for a second device here: the
dispatcher sends any call with a meta tensor to the fake kernel, never to the CPU kernel.
"""

import pytest
import torch
from bad_input import IN, OUT, C, H, K, N, O, W, cases, changed, check

from fastlenet import _ext

GEOM = {"stride": [1, 1], "padding": [0, 0], "pool_size": [2, 2], "pool_stride": [2, 2]}


# The valid arguments of each op, by the names of its schema (csrc/fastlenet.cpp), in order.
def _fwd_args():
    return {
        "input": torch.randn(N, C, H, W),
        "weight": torch.randn(O, C, K, K),
        "bias": torch.randn(O),
        **GEOM,
    }


def _bwd_args():
    args = _fwd_args()
    _, argmax = torch.ops.fastlenet.conv_relu_pool_fwd(*args.values())
    return {
        "grad_out": torch.randn(N, O, 4, 4),
        "argmax": argmax,
        "input": args["input"],
        "weight": args["weight"],
        **GEOM,
        "input_grad": True,
        "weight_grad": True,
    }


def _lin_fwd_args():
    return {
        "input": torch.randn(4, IN),
        "weight": torch.randn(OUT, IN),
        "bias": torch.randn(OUT),
        "relu": True,
    }


def _lin_bwd_args():
    args = _lin_fwd_args()
    out = torch.ops.fastlenet.linear_relu_fwd(*args.values())
    return {
        "grad_out": torch.randn_like(out),
        "out": out,
        "input": args["input"],
        "weight": args["weight"],
        "relu": args["relu"],
    }


def fwd(**changes):
    return changed(_fwd_args, **changes)


def bwd(**changes):
    return changed(_bwd_args, **changes)


def lin_fwd(**changes):
    return changed(_lin_fwd_args, **changes)


def lin_bwd(**changes):
    return changed(_lin_bwd_args, **changes)


# (id, arguments, exception type, regex the message must match)
# fmt: off
FWD_CASES = [
    ("input_3d", fwd(input=lambda x: x[0]), RuntimeError, r"input must be 4-D \(N, C, H, W\)"),
    ("weight_2d", fwd(weight=lambda w: w[0, 0]), RuntimeError, r"weight must be 4-D"),
    ("channels", fwd(input=lambda x: x[:, :1]), RuntimeError,
     r"input has 1 channels but weight expects 3"),
    ("input_int",
     fwd(input=lambda x: x.int(), weight=lambda w: w.int(), bias=lambda b: b.int()),
     RuntimeError, r"input must be float32 or float64, got Int"),
    ("input_bool",
     fwd(input=lambda x: x > 0, weight=lambda w: w > 0, bias=lambda b: b > 0),
     RuntimeError, r"input must be float32 or float64, got Bool"),
    ("input_half",
     fwd(input=lambda x: x.half(), weight=lambda w: w.half(), bias=lambda b: b.half()),
     RuntimeError, r"input must be float32 or float64, got Half"),
    ("weight_float64", fwd(weight=lambda w: w.double()), RuntimeError,
     r"weight has dtype Double but input has dtype Float"),
    ("bias_int", fwd(bias=lambda b: b.int()), RuntimeError,
     r"bias has dtype Int but input has dtype Float"),
    ("bias_short", fwd(bias=lambda b: b[:1]), RuntimeError, r"bias must have shape \(4\)"),
    ("bias_2d", fwd(bias=lambda b: b[None]), RuntimeError, r"bias must have shape \(4\)"),
    ("weight_no_out_channels", fwd(weight=lambda w: w[:0], bias=lambda b: b[:0]), RuntimeError,
     r"weight must have no zero-size dimension"),
    ("weight_zero_kernel", fwd(weight=lambda w: w[..., :0]), RuntimeError,
     r"weight must have no zero-size dimension"),
    ("weight_no_in_channels", fwd(input=lambda x: x[:, :0], weight=lambda w: w[:, :0]),
     RuntimeError, r"weight must have no zero-size dimension"),
    ("smaller_than_kernel", fwd(input=lambda x: x[..., :2, :]), RuntimeError,
     r"input of size \(2, 10\) with padding \[0, 0\] is smaller than the kernel"),
    ("smaller_than_pool", fwd(input=lambda x: x[..., :, :3]), RuntimeError,
     r"convolution output \(8, 1\) is smaller than the pooling window \[2, 2\]"),
    ("stride_0", fwd(stride=[0, 1]), RuntimeError, r"stride must be >= 1, got \[0, 1\]"),
    ("stride_negative", fwd(stride=[1, -3]), RuntimeError, r"stride must be >= 1"),
    ("stride_3_values", fwd(stride=[1, 1, 1]), RuntimeError, r"stride, padding, .* 2 values"),
    ("padding_1_value", fwd(padding=[1]), RuntimeError, r"stride, padding, .* 2 values"),
    ("padding_negative", fwd(padding=[0, -1]), RuntimeError, r"padding must be >= 0"),
    ("padding_overflows", fwd(padding=[2**62, 0]), RuntimeError, r"padding must be at most"),
    ("pool_size_0", fwd(pool_size=[0, 2]), RuntimeError, r"pool_size must be >= 1"),
    ("pool_size_negative", fwd(pool_size=[-20, -20]), RuntimeError, r"pool_size must be >= 1"),
    ("pool_window_256", fwd(input=torch.randn(1, C, 20, 20), pool_size=[16, 16]), RuntimeError,
     r"pool_size must have at most 255 positions, got \[16, 16\]"),
    ("pool_window_product_overflows", fwd(pool_size=[2**32, 2**32]), RuntimeError,
     r"pool_size must have at most 255 positions"),
    ("pool_stride_0", fwd(pool_stride=[2, 0]), RuntimeError, r"pool_stride must be >= 1"),
]

BWD_CASES = [
    ("grad_out_shape", bwd(grad_out=lambda g: g[:1]), RuntimeError,
     r"grad_out must have shape \[2, 4, 4, 4\], got \[1, 4, 4, 4\]"),
    ("grad_out_float64", bwd(grad_out=lambda g: g.double()), RuntimeError,
     r"grad_out has dtype Double but input has dtype Float"),
    ("argmax_shape", bwd(argmax=lambda a: a[..., :3]), RuntimeError,
     r"argmax must have shape \[2, 4, 4, 4\], got \[2, 4, 4, 3\]"),
    ("argmax_int64", bwd(argmax=lambda a: a.long()), RuntimeError,
     r"argmax must be uint8, got Long"),
    # a position past the 2x2 window would write out of bounds
    ("argmax_out_of_window", bwd(argmax=lambda a: a.fill_(4)), RuntimeError,
     r"argmax holds 4 .* but a pooling window has 4 positions"),
    ("argmax_254", bwd(argmax=lambda a: a.index_fill_(3, torch.tensor([3]), 254)), RuntimeError,
     r"argmax holds 254 .* but a pooling window has 4 positions"),
    ("input_3d", bwd(input=lambda x: x[0]), RuntimeError, r"input must be 4-D"),
    ("weight_float64", bwd(weight=lambda w: w.double()), RuntimeError,
     r"weight has dtype Double but input has dtype Float"),
    ("geometry_mismatch", bwd(stride=[2, 2]), RuntimeError,
     r"grad_out must have shape \[2, 4, 2, 2\], got \[2, 4, 4, 4\]"),
    ("pool_stride_0", bwd(pool_stride=[0, 0]), RuntimeError, r"pool_stride must be >= 1"),
]

LIN_FWD_CASES = [
    ("input_1d", lin_fwd(input=lambda x: x[0]), RuntimeError, r"input must be 2-D"),
    ("input_3d", lin_fwd(input=lambda x: x[None]), RuntimeError, r"input must be 2-D"),
    ("weight_1d", lin_fwd(weight=lambda w: w[0]), RuntimeError, r"weight must be 2-D"),
    ("features", lin_fwd(input=lambda x: x[:, :2]), RuntimeError,
     r"input has 2 features but weight expects 6"),
    ("input_int",
     lin_fwd(input=lambda x: x.int(), weight=lambda w: w.int(), bias=lambda b: b.int()),
     RuntimeError, r"input must be float32 or float64, got Int"),
    ("weight_float64", lin_fwd(weight=lambda w: w.double()), RuntimeError,
     r"weight has dtype Double but input has dtype Float"),
    ("bias_float64", lin_fwd(bias=lambda b: b.double()), RuntimeError,
     r"bias has dtype Double but input has dtype Float"),
    ("bias_short", lin_fwd(bias=lambda b: b[:2]), RuntimeError, r"bias must have shape \(5\)"),
]

LIN_BWD_CASES = [
    ("grad_out_shape", lin_bwd(grad_out=lambda g: g[:2]), RuntimeError,
     r"grad_out must have shape \(4, 5\), got \[2, 5\]"),
    ("grad_out_float64", lin_bwd(grad_out=lambda g: g.double()), RuntimeError,
     r"grad_out has dtype Double but input has dtype Float"),
    ("out_shape", lin_bwd(out=lambda o: o[:, :2]), RuntimeError,
     r"out must have shape \[4, 5\], got \[4, 2\]"),
    ("out_int", lin_bwd(out=lambda o: o.int()), RuntimeError,
     r"out has dtype Int but input has dtype Float"),
    ("input_3d", lin_bwd(input=lambda x: x[None]), RuntimeError, r"input must be 2-D"),
    ("features", lin_bwd(weight=lambda w: w[:, :3]), RuntimeError,
     r"input has 6 features but weight expects 3"),
]
# fmt: on


def _op(name):
    """The setup of `name`'s cases: builds the arguments, then the call passes them in order."""

    def setup(build):
        args = build()
        return lambda: getattr(torch.ops.fastlenet, name)(*args.values())

    return setup


NEEDS_EXT = pytest.mark.skipif(not _ext.LOADED, reason="needs the C++ extension")
CASES = [
    *cases("conv_relu_pool_fwd", FWD_CASES, _op("conv_relu_pool_fwd"), marks=NEEDS_EXT),
    *cases("conv_relu_pool_bwd", BWD_CASES, _op("conv_relu_pool_bwd"), marks=NEEDS_EXT),
    *cases("linear_relu_fwd", LIN_FWD_CASES, _op("linear_relu_fwd"), marks=NEEDS_EXT),
    *cases("linear_relu_bwd", LIN_BWD_CASES, _op("linear_relu_bwd"), marks=NEEDS_EXT),
]


@pytest.mark.parametrize(("make", "exc", "match"), CASES)
def test_rejects(make, exc, match):
    check(make, exc, match)


@NEEDS_EXT
def test_valid_arguments_run():
    """The valid arguments the cases start from do run."""
    ops = torch.ops.fastlenet
    out, argmax = ops.conv_relu_pool_fwd(*_fwd_args().values())
    assert out.shape == argmax.shape == (N, O, 4, 4)
    args = list(_bwd_args().values())
    x, w = args[2], args[3]
    for wanted in ((True, True), (True, False), (False, True)):
        grads = ops.conv_relu_pool_bwd(*args[:-2], *wanted)
        shapes = [x.shape if wanted[0] else (0,), w.shape if wanted[1] else (0,)]
        shapes.append((O,) if wanted[1] else (0,))
        assert [t.shape for t in grads] == shapes
    assert ops.linear_relu_fwd(*_lin_fwd_args().values()).shape == (4, OUT)
    assert [t.shape for t in ops.linear_relu_bwd(*_lin_bwd_args().values())] == [
        (4, IN),
        (OUT, IN),
        (OUT,),
    ]
