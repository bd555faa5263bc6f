"""Argument checks and output-shape arithmetic shared by every fastlenet op.

One set of checks for the Python side (csrc/checks.h is the C++ one). Errors name the
argument and what was expected: TypeError for an argument of the wrong Python type; for the
mistakes where stock PyTorch raises RuntimeError (a wrong shape, geometry, dtype or device), an
error that is also a RuntimeError, so that `except RuntimeError` written for stock still works:
ArgumentError (a ValueError) and ArgumentTypeError (a TypeError).
"""

import contextlib
import operator
import warnings
from collections.abc import Sequence

import torch


class ArgumentError(ValueError, RuntimeError):
    """A bad argument value: a ValueError, and the RuntimeError stock raises for it."""


class ArgumentTypeError(TypeError, RuntimeError):
    """A tensor of the wrong dtype: a TypeError, and the RuntimeError stock raises for it."""


#: argmax byte meaning "this window passes no gradient" (its max pre-activation is <= 0);
#: so a pooling window holds at most 255 positions.
NO_GRAD = 255
MAX_POOL_WINDOW = 255


@contextlib.contextmanager
def quiet_tracer():
    """While torch.jit.trace records: no warnings of the checks' Python comparisons of sizes.
    They only refuse bad input, and the traced graph computes its shapes itself (the layout a
    conv picks from its input's strides is fixed at trace time, as stock's is)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def _index(value):
    """An integer-like value (int, NumPy integer, integer tensor of one element) as an int, as
    stock's layers take them; None for anything else, bool included."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def pair(value, name: str) -> tuple[int, int]:
    """An int or a pair of ints as a tuple of two ints."""
    if type(value) is tuple and len(value) == 2 and type(value[0]) is type(value[1]) is int:
        return value  # already normalised (the layers pass their own tuples every call)
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got a bool")
    single = _index(value)
    if single is not None:
        return (single, single)
    if isinstance(value, Sequence) and len(value) == 2:
        both = tuple(map(_index, value))
        if None not in both:
            return both
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def size_int(value, name: str, minimum: int = 1) -> int:
    """A layer's size argument (channels, features) as an int: ValueError where it is not an
    integer of at least `minimum` (1: "a positive int", 0: "a non-negative int")."""
    size = _index(value)
    if size is None or size < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return size


def check_geometry(stride, padding, pool_size, pool_stride) -> None:
    """Convolution and pooling settings that the kernels support."""
    if min(stride) < 1:
        raise ArgumentError(f"stride must be >= 1, got {stride}")
    if min(padding) < 0:
        raise ArgumentError(f"padding must be >= 0, got {padding}")
    if min(pool_size) < 1:
        raise ArgumentError(f"pool_size must be >= 1, got {pool_size}")
    if pool_size[0] * pool_size[1] > MAX_POOL_WINDOW:
        raise ArgumentError(
            f"pool_size {pool_size} has more than {MAX_POOL_WINDOW} positions "
            "(the argmax of a window is stored in one byte)"
        )
    if min(pool_stride) < 1:
        raise ArgumentError(f"pool_stride must be >= 1, got {pool_stride}")


PADDING_STRINGS = ("valid", "same")


def check_padding_string(padding: str, stride) -> None:
    if padding not in PADDING_STRINGS:
        raise ArgumentError(
            f"padding must be an int, a pair of ints or one of {PADDING_STRINGS}, got {padding!r}"
        )
    if padding == "same" and tuple(stride) != (1, 1):
        raise ArgumentError(
            f"padding='same' is not supported for strided convolutions (stride {tuple(stride)})"
        )


def same_padding(kernel_hw) -> tuple[tuple[int, int], tuple[int, int]]:
    """padding="same" (stride 1) as stock's conv2d pads: per dimension, the k - 1 zeros split
    into `before` (k - 1) // 2 on each side and `extra`, the one more at the bottom / right
    that an even kernel needs."""
    total = [k - 1 for k in kernel_hw]
    before = tuple(t // 2 for t in total)
    extra = tuple(t - b - b for t, b in zip(total, before, strict=True))
    return before, extra


def conv_pool_shapes(in_hw, kernel_hw, stride, padding, pool_size, pool_stride):
    """(conv output H, W), (pooled output H, W) for floor-mode conv and pooling."""
    oh = (in_hw[0] + 2 * padding[0] - kernel_hw[0]) // stride[0] + 1
    ow = (in_hw[1] + 2 * padding[1] - kernel_hw[1]) // stride[1] + 1
    ph = (oh - pool_size[0]) // pool_stride[0] + 1
    pw = (ow - pool_size[1]) // pool_stride[1] + 1
    return (oh, ow), (ph, pw)


def channels_last(t: torch.Tensor) -> bool:
    """Whether stock's convolution treats `t` as channels_last: a strided 4-D tensor whose
    strides ATen's suggest_memory_format() reads as channels_last. Where size-1 dimensions let
    both layouts hold (one input channel; `x.to(memory_format=torch.channels_last)` sets C's
    stride to 1), only the strides tell, as in c10's is_channels_last_strides_2d_s4: dimensions
    C, W, H, N in that order, each stride at least the span of those before it, and an N whose
    stride equals C's read as NCHW."""
    if t.dim() != 4 or t.layout != torch.strided:
        return False
    contiguous = t.is_contiguous()
    if contiguous != t.is_contiguous(memory_format=torch.channels_last):
        return not contiguous  # one layout holds: no size-1 dimension makes it ambiguous
    sizes, strides = t.shape, t.stride()
    if strides[1] == 0:
        return False
    span = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < span or (d == 0 and span == strides[1]):
            return False
        span = strides[d] * sizes[d] if sizes[d] > 1 else strides[d]
    return True


def _tensor(value, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_params(input, weight, bias, weight_rank: int) -> None:
    """Types, dtypes and devices of input, weight and bias."""
    _tensor(input, "input")
    _tensor(weight, "weight")
    if bias is not None:
        _tensor(bias, "bias")
    if not input.is_floating_point():
        raise ArgumentTypeError(f"input must be a floating-point tensor, got dtype {input.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != input.dtype:
            raise ArgumentTypeError(f"{name} has dtype {t.dtype} but input has dtype {input.dtype}")
        if t.device != input.device:
            raise ArgumentError(f"{name} is on {t.device} but input is on {input.device}")
    if weight.dim() != weight_rank:
        raise ArgumentError(f"weight must be {weight_rank}-D, got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ArgumentError(
            f"bias must have shape ({weight.shape[0]},) to match weight, got {tuple(bias.shape)}"
        )


def check_conv_input(input, weight, stride, padding, pool_size, pool_stride):
    """Checks a 4-D conv input against weight; returns the pooled output (H, W)."""
    if input.dim() != 4:
        raise ArgumentError(
            f"input must be 3-D (C, H, W) or 4-D (N, C, H, W), got shape {tuple(input.shape)}"
        )
    if 0 in weight.shape:
        raise ArgumentError(
            f"weight must have no zero-size dimension, got shape {tuple(weight.shape)}"
        )
    if input.shape[1] != weight.shape[1]:
        raise ArgumentError(
            f"input has {input.shape[1]} channels but weight expects {weight.shape[1]} "
            f"(weight shape {tuple(weight.shape)})"
        )
    (oh, ow), (ph, pw) = conv_pool_shapes(
        input.shape[-2:], weight.shape[-2:], stride, padding, pool_size, pool_stride
    )
    if oh < 1 or ow < 1:
        raise ArgumentError(
            f"input of spatial size {tuple(input.shape[-2:])} (padding {padding}) is smaller "
            f"than the kernel {tuple(weight.shape[-2:])}"
        )
    if ph < 1 or pw < 1:
        raise ArgumentError(
            f"convolution output {(oh, ow)} is smaller than the pooling window {pool_size}"
        )
    return ph, pw


def check_linear(input, weight, bias) -> None:
    """check_params(input, weight, bias, 2) and check_linear_input: the arguments of linear_relu.

    A valid call is accepted by one expression, ~0.6 us where the two checks take ~1.7 us (84->10
    at batch 64 takes ~8 us in all, timeit on the 2-core Zen 4 VM); anything else goes through
    the two, which raise the error that names the mistake.
    """
    if (
        isinstance(input, torch.Tensor)
        and isinstance(weight, torch.Tensor)
        and input.is_floating_point()
        and weight.dim() == 2
        and input.dim() >= 1
        and input.shape[-1] == weight.shape[1]
        and weight.dtype == input.dtype
        and weight.device == input.device
        and (
            bias is None
            or (
                isinstance(bias, torch.Tensor)
                and bias.dtype == input.dtype
                and bias.device == input.device
                and bias.dim() == 1
                and bias.shape[0] == weight.shape[0]
            )
        )
    ):
        return
    check_params(input, weight, bias, weight_rank=2)
    check_linear_input(input, weight)


def check_linear_input(input, weight) -> None:
    if input.dim() < 1:
        raise ArgumentError("input must have at least 1 dimension (..., in_features), got a scalar")
    if input.shape[-1] != weight.shape[1]:
        raise ArgumentError(
            f"input has {input.shape[-1]} features in its last dimension but weight expects "
            f"{weight.shape[1]} (weight shape {tuple(weight.shape)})"
        )
