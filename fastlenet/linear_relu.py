"""linear -> ReLU (and plain linear): public functions, autograd Function and fake kernels.

Math and saved state: fastlenet/reference.py (linear_relu).
The Function runs the backend's fwd, saves input, weight and, with a ReLU, out (its mask: a plain
linear's output may change in place before backward, as stock's may), and asks the backend's bwd
for all three gradients in one call. On the CPU backend, in eager mode, the same
is recorded by a C++ node instead (csrc/linear_relu_autograd_cpu.cpp).
"""

import torch

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


class LinearReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, relu, backend):
        ops = backends.ops("linear_relu", backend)
        out = ops.fwd(input, weight, bias, relu)
        ctx.save_for_backward(input, weight, out if relu else None)
        ctx.relu = relu
        ctx.backend = backend
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)  # none reached out: none for the inputs, as stock's
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if grad_out is None:
            return None, None, None, None, None
        input, weight, out = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_input, grad_weight, grad_bias = backends.ops("linear_relu", backward_backend(ctx)).bwd(
            grad_out, out if ctx.relu else grad_out, input, weight, ctx.relu
        )  # without ReLU the bwd reads nothing of `out`: the gradient stands in (its shape)
        needs = ctx.needs_input_grad
        return (
            grad_input if needs[0] else None,
            grad_weight if needs[1] else None,
            grad_bias if ctx.has_bias and needs[2] else None,
            None,
            None,
        )


# The CPU path's autograd node (csrc/linear_relu_autograd_cpu.cpp): LinearReLUFunction's
# forward and backward on the CPU ops, as a C++ node, whose backward runs no Python; where
# autograd records nothing, the forward op alone. None without the extension (the fast path
# then never runs).
_CPU_NODE = _ext._C.linear_relu if _ext.LOADED else None


def _function(relu: bool, name: str, doc: str):
    """linear_relu (relu) or linear: the fast path inline, everything else in _apply."""

    def function(input, weight, bias=None, *, backend="auto"):
        # The fast path: a plain 2-D CPU input, CPU parameters, and a backend that resolve()
        # has already answered "cpu" for (from its cache: FASTLENET_BACKEND holds). One call
        # into C++, which records the node or runs the op alone (or returns None for _apply:
        # csrc/cpu_autograd.h, fast_path_takes), in one Python frame instead of seven: under
        # no_grad, 84->10 at batch 64 5.25 -> 4.86 us per call (the op alone 4.21), 120->84
        # 14.20 -> 13.83 us (13.24), alternating medians in one process, 2-core
        # Zen 4 VM; with the names above and this frame inlined, 84->10 6.55 -> 6.39 us. The
        # op's checks (csrc/checks.h) cover the Python ones for these arguments: those run
        # only after it raised, to name the mistake as they always do. Not while
        # torch.compile traces (fake tensors run no checks); a first call resolves the backend
        # in _apply. A condition that raises (a weight that is no tensor, an unhashable
        # backend) leaves the rest to _apply.
        try:
            fast = (
                type(input) is _Tensor
                and input.is_cpu
                and weight.is_cpu
                and (bias is None or bias.is_cpu)
                and input.dim() == 2
                and _RESOLVED.get((backend, _CPU)) == "cpu"
                and not _is_compiling()
            )
        except (AttributeError, TypeError):
            fast = False
        if fast:
            try:  # the node where autograd records, else the op (both from C++)
                out = _CPU_NODE(input, weight, bias, relu)
                if out is not None:
                    return out
            except Exception as exc:  # re-raised below unless the checks name the mistake
                error = exc
            else:
                return _apply(input, weight, bias, relu, backend)
            _checks.check_linear(input, weight, bias)
            raise error
        return _apply(input, weight, bias, relu, backend)

    function.__name__ = function.__qualname__ = name
    function.__doc__ = doc
    return function


def _apply(input, weight, bias, relu, backend):
    if torch.jit.is_tracing():
        with _checks.quiet_tracer():
            return _full(input, weight, bias, relu, backend)
    return _full(input, weight, bias, relu, backend)


def _full(input, weight, bias, relu, backend):
    if type(input) is torch.Tensor and input.dim() == 2:
        out = _checked_in_cpp(input, weight, bias, relu, backend)
        if out is not None:
            return out
    input, weight, bias = autocast_inputs(input, weight, bias)
    _checks.check_linear(input, weight, bias)
    if transforms_active():  # stock's composition: torch.func and forward AD know it
        return reference.linear_relu(input, weight, bias, relu)
    name = backends.resolve(backend, input.device, input.dtype)
    if input.dim() == 2:  # the common case: no reshapes (each costs microseconds per call)
        return _call(input, weight, bias, relu, name)
    out = _call(input.reshape(-1, input.shape[-1]), weight, bias, relu, name)
    return out.reshape(*input.shape[:-1], weight.shape[0])


def _call(input, weight, bias, relu, name):
    if torch.jit.is_tracing():  # the forward op: backends.traced
        return backends.ops("linear_relu", backends.traced(name)).fwd(input, weight, bias, relu)
    if records_graph(input, weight, bias):
        if name == "cpu" and not _is_compiling():
            out = _CPU_NODE(input, weight, bias, relu)  # None: the op below names the dtype
            if out is not None:
                return out
        return LinearReLUFunction.apply(input, weight, bias, relu, name)
    # Nothing to record (inference): the op itself (84->10 at batch 64 takes ~8 us).
    return backends.ops("linear_relu", name).fwd(input, weight, bias, relu)


def _checked_in_cpp(input, weight, bias, relu, backend):
    """_call on the CPU op, whose checks (csrc/checks.h) cover the Python ones for a plain 2-D
    input: those run only after it raised, to name the mistake as they always do. This saves
    ~1.2 us per call of the ~8 us of 84->10 at batch 64 (timeit, 2-core Zen 4 VM).

    None where it does not apply: other backends (the reference checks nothing), tensors not
    all on the CPU (a meta weight would send the call to the fake kernel, which checks
    nothing), or while torch.compile traces (fake tensors run no checks).
    """
    if torch.compiler.is_compiling() or not (
        input.is_cpu
        and getattr(weight, "is_cpu", False)
        and (bias is None or getattr(bias, "is_cpu", False))
    ):
        return None
    if torch.is_autocast_enabled("cpu") or transforms_active():  # _apply's casts and choice
        return None
    try:
        name = backends.resolve(backend, input.device, input.dtype)
        if name != "cpu":
            return None
        return _call(input, weight, bias, relu, name)
    except Exception as exc:  # re-raised below unless the checks name the mistake
        error = exc
    _checks.check_linear(input, weight, bias)
    raise error


linear_relu = _function(
    True,
    "linear_relu",
    "relu(input @ weight.T + bias). input: (*, in_features); weight: (out, in); bias: (out,).",
)
linear = _function(
    False,
    "linear",
    "input @ weight.T + bias on fastlenet's kernels (the last layer of a fused model).",
)


def fwd_fake(input, weight, bias, relu):
    return input.new_empty(input.shape[0], weight.shape[0])


def bwd_fake(grad_out, out, input, weight, relu):
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        weight.new_empty(weight.shape[0]),
    )


if _ext.LOADED:
    torch.library.register_fake("fastlenet::linear_relu_fwd", fwd_fake)
    torch.library.register_fake("fastlenet::linear_relu_bwd", bwd_fake)
