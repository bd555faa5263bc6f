"""What both ops have on every backend: opcheck of the registered ops, a deterministic backward,
an empty batch. Each test runs on the rows of its table, one per (op, backend) pair and shape;
the rows on CUDA tensors carry the `gpu` mark (see tests/geometry.py)."""

import pytest
import torch
from geometry import (
    BACKENDS,
    CONV,
    F32,
    LINEAR,
    backend_cases,
    conv_cases,
    conv_inputs,
    device,
    linear_cases,
    linear_inputs,
    param,
)

from fastlenet import backends
from fastlenet.functional import conv_relu_pool2d, linear_relu

CONV_OP, LINEAR_OP = "conv_relu_pool", "linear_relu"


def _with_op(op, params):
    """The rows of `params` with `op` in front."""
    return [pytest.param(op, *p.values, id=f"{op}-{p.id}", marks=p.marks) for p in params]


def _conv_calls(backend, geometry, dtype):
    """(op, arguments) of every call the autograd Function makes of the conv ops."""
    ops = backends.ops(CONV_OP, backend)
    x, weight, bias, conv = conv_inputs(geometry, dtype, device(backend), requires_grad=False)
    out, argmax = ops.fwd(x, weight, bias, *conv)
    grad = torch.randn_like(out)
    calls = [
        (ops.fwd, (x, weight, bias, *conv)),
        (ops.fwd, (x, weight, None, *conv)),
        *((ops.bwd, (grad, argmax, x, weight, *conv, *wanted)) for wanted in _WANTED),
    ]
    if backend == "cpu":  # the CPU's inference op (conv_relu_pool2d under no_grad)
        infer = torch.ops.fastlenet.conv_relu_pool_infer.default
        calls += [(infer, (x, weight, bias, *conv)), (infer, (x, weight, None, *conv))]
    return calls


_WANTED = ((True, True), (True, False), (False, True))  # (input_grad, weight_grad)


def _linear_calls(backend, shape, dtype):
    """(op, arguments) of every call the autograd Function makes of the linear ops."""
    ops = backends.ops(LINEAR_OP, backend)
    x, weight, bias = linear_inputs(shape, dtype, device(backend), requires_grad=False)
    calls = []
    for relu in (True, False):
        out = ops.fwd(x, weight, bias, relu)
        grad = torch.randn_like(out)
        calls += [
            (ops.fwd, (x, weight, bias, relu)),
            (ops.fwd, (x, weight, None, relu)),
            (ops.bwd, (grad, out, x, weight, relu)),
        ]
    return calls


def _calls(op, backend, shape, dtype):
    return (_conv_calls if op == CONV_OP else _linear_calls)(backend, shape, dtype)


# The reference's "ops" are Python functions, not registered ops: nothing to opcheck. The C++
# CPU ops take float32 and float64 only; CUDA's are checked in float16 too. opcheck calls each
# op a dozen times: Triton's interpreter gets the smallest rows.
_OPCHECK_CONV = ["lenet_conv1", "lenet_conv2", "fashion_conv2", "odd", "no_pool", "strides"]
_OPCHECK_LINEAR = ["lenet_fc1", "lenet_fc2", "lenet_fc3", "one_row", "odd", "empty_batch"]
_TRITON_CONV = ["odd", "no_pool", "strides", "pool_gaps"]
_TRITON_LINEAR = ["odd_small", "row_blocks"]
OPCHECK = [
    *_with_op(CONV_OP, conv_cases(["cpu", "cuda"], [*_OPCHECK_CONV, "pool_gaps"], [F32])),
    *_with_op(CONV_OP, conv_cases(["cuda"], _OPCHECK_CONV, [torch.float16])),
    *_with_op(CONV_OP, conv_cases(["triton"], _TRITON_CONV, [F32])),
    *_with_op(LINEAR_OP, linear_cases(["cpu", "cuda"], [*_OPCHECK_LINEAR, *_TRITON_LINEAR], [F32])),
    *_with_op(LINEAR_OP, linear_cases(["cuda"], _OPCHECK_LINEAR[:5], [torch.float16])),
    *_with_op(LINEAR_OP, linear_cases(["triton"], _TRITON_LINEAR, [F32])),
]


@pytest.mark.parametrize(("op", "backend", "name", "dtype"), OPCHECK)
def test_opcheck(op, backend, name, dtype):
    # The ops run inside the autograd Functions with grad mode off, so they are checked on
    # tensors that do not require grad (autograd is the Functions', tested elsewhere).
    shape = (CONV if op == CONV_OP else LINEAR)[name]
    for fn, args in _calls(op, backend, shape, dtype):
        torch.library.opcheck(fn, args)


def _batch(geometry, n):
    return (n, *geometry[1:])


# (op, backend, threads (None: as set), shape): batches that keep every thread and block busy;
# for Triton the interpreter's rows whose weight-gradient reductions are split (checked in
# tests/test_*_triton.py), the part whose order could change from run to run.
DETERMINISM = [
    (CONV_OP, "cpu", 1, _batch(CONV["lenet_conv2"], 64)),
    (CONV_OP, "cpu", 2, _batch(CONV["lenet_conv2"], 64)),
    (CONV_OP, "cpu", 2, _batch(CONV["wide_odd_pool3"], 16)),  # the wide backward kernels
    (CONV_OP, "cuda", None, _batch(CONV["lenet_conv2"], 256)),
    (CONV_OP, "triton", None, CONV["lenet_conv1_small"]),
    (LINEAR_OP, "cpu", 1, _batch(LINEAR["lenet_fc1"], 256)),
    (LINEAR_OP, "cpu", 2, _batch(LINEAR["lenet_fc1"], 256)),
    (LINEAR_OP, "cuda", None, _batch(LINEAR["lenet_fc1"], 256)),
    (LINEAR_OP, "triton", None, LINEAR["row_blocks"]),
]


def _determinism_cases():
    params = []
    for op, backend, threads, shape in DETERMINISM:
        suffix = "" if threads is None else f"-{threads}threads"
        params += param(backend, op, backend, threads, shape, id=f"{op}-{backend}{suffix}")
    return params


@pytest.mark.parametrize(("op", "backend", "threads", "shape"), _determinism_cases())
def test_backward_is_deterministic(op, backend, threads, shape):
    """Every backward request, three more times: bitwise the same gradients."""
    if threads is not None:
        torch.set_num_threads(threads)
    bwd = backends.ops(op, backend).bwd
    for fn, args in _calls(op, backend, shape, F32):
        if fn is not bwd:
            continue
        first = bwd(*args)
        for _ in range(3):
            for a, b in zip(first, bwd(*args), strict=True):
                assert torch.equal(a, b)


# op: (its empty-batch row, the output's shape)
EMPTY = {CONV_OP: (CONV["empty_batch"], (0, 4, 3, 3)), LINEAR_OP: (LINEAR["empty_batch"], (0, 4))}


@pytest.mark.parametrize(("backend", "op"), backend_cases(BACKENDS, EMPTY))
def test_empty_batch(backend, op):
    shape, out_shape = EMPTY[op]
    if op == CONV_OP:
        x, weight, bias, conv = conv_inputs(shape, F32, device(backend))
        out = conv_relu_pool2d(x, weight, bias, *conv, backend=backend)
    else:
        x, weight, bias = linear_inputs(shape, F32, device(backend))
        out = linear_relu(x, weight, bias, backend=backend)
    assert out.shape == out_shape
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    assert torch.equal(bias.grad, torch.zeros_like(bias))
