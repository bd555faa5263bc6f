"""The CPU fast path's C++ autograd nodes (csrc/*_autograd_cpu.cpp) against the Python
Functions they stand in for: the same output and gradients, bit for bit (the same ops on the
same tensors), only the gradients asked for, and second derivatives through the reference."""

import itertools

import pytest
import torch
from conftest import rel_err

from fastlenet import _ext, reference
from fastlenet.conv_relu_pool import ConvReLUPoolFunction
from fastlenet.functional import conv_relu_pool2d, linear, linear_relu
from fastlenet.linear_relu import LinearReLUFunction

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="needs the C++ extension")

DTYPES = [torch.float32, torch.float64]
# (which of input, weight, bias want a gradient; whether there is a bias): every case where
# some tensor wants one.
CASES = [
    (wants, bias)
    for wants in itertools.product([False, True], repeat=3)
    for bias in (True, False)
    if any(wants[:2]) or (bias and wants[2])
]
CONV_GEOMETRY = ((1, 1), (1, 1), (2, 2), (2, 2))


def _leaves(shapes, dtype, wants, bias):
    tensors = [torch.randn(s, dtype=dtype) for s in shapes]
    if not bias:
        tensors[2] = None
    return [t if t is None else t.requires_grad_(w) for t, w in zip(tensors, wants, strict=True)]


def _grads(out, leaves, grad):
    """The gradients of `out` (backward with `grad`) into every leaf that wants one."""
    for t in leaves:
        if t is not None:
            t.grad = None
    out.backward(grad)
    return [None if t is None else t.grad for t in leaves]


def _same_run(fast, python, leaves):
    """fast(*leaves) and python(*leaves) give bitwise equal outputs and gradients, each tensor
    that wants none getting none; returns fast's output."""
    out = fast(*leaves)
    grad = torch.randn_like(out)
    got = _grads(out, leaves, grad)
    expected_out = python(*leaves)
    expected = _grads(expected_out, leaves, grad)
    assert torch.equal(out, expected_out)
    for t, g, e in zip(leaves, got, expected, strict=True):
        if t is None or not t.requires_grad:
            assert g is None
        else:
            assert g is not None and torch.equal(g, e)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("wants", "bias"), CASES)
@pytest.mark.parametrize("relu", [True, False])
def test_linear_node_equals_the_function(dtype, wants, bias, relu):
    leaves = _leaves([(6, 9), (5, 9), (5,)], dtype, wants, bias)
    fast = linear_relu if relu else linear

    def python(x, w, b):
        return LinearReLUFunction.apply(x, w, b, relu, "cpu")

    out = _same_run(fast, python, leaves)
    assert out.grad_fn.name() == "torch::autograd::CppNode<fastlenet::LinearReLUNode>"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("wants", "bias"), CASES)
def test_conv_node_equals_the_function(dtype, wants, bias):
    leaves = _leaves([(3, 2, 10, 9), (4, 2, 3, 3), (4,)], dtype, wants, bias)

    def fast(x, w, b):
        return conv_relu_pool2d(x, w, b, 1, 1, 2)

    def python(x, w, b):
        return ConvReLUPoolFunction.apply(x, w, b, *CONV_GEOMETRY, "cpu")

    out = _same_run(fast, python, leaves)
    assert out.grad_fn.name() == "torch::autograd::CppNode<fastlenet::ConvReLUPoolNode>"


def test_nodes_match_the_reference():
    x, w, b = _leaves([(7, 12), (8, 12), (8,)], torch.float64, (True,) * 3, True)
    out = linear_relu(x, w, b)
    grad = torch.randn_like(out)
    got = _grads(out, [x, w, b], grad)
    ref = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    expected = _grads(reference.linear_relu(*ref), ref, grad)
    assert max(rel_err(g, e) for g, e in zip(got, expected, strict=True)) < 1e-12

    x, w, b = _leaves([(2, 3, 11, 12), (5, 3, 3, 3), (5,)], torch.float64, (True,) * 3, True)
    out = conv_relu_pool2d(x, w, b, 1, 1, 2)
    grad = torch.randn_like(out)
    got = _grads(out, [x, w, b], grad)
    ref = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    expected = _grads(reference.conv_relu_pool2d(*ref, *CONV_GEOMETRY), ref, grad)
    assert max(rel_err(g, e) for g, e in zip(got, expected, strict=True)) < 1e-12


def test_second_derivatives_through_the_nodes():
    """create_graph: the nodes' backward is the reference's, differentiable again."""
    x, w, b = _leaves([(5, 6), (4, 6), (4,)], torch.float64, (True,) * 3, True)
    assert torch.autograd.gradgradcheck(lambda *t: linear_relu(*t), (x, w, b))
    x, w = _leaves([(2, 2, 8, 8), (3, 2, 3, 3), (3,)], torch.float64, (True,) * 3, False)[:2]
    assert torch.autograd.gradgradcheck(lambda a, c: conv_relu_pool2d(a, c, None, 1, 1, 2), (x, w))


def test_functorch_transforms_step_around_the_nodes():
    """torch.func cannot trace a C++ autograd node (nor the Python Functions, which have no
    setup_context): under a transform the fast-path entry declines and the op runs stock's
    composition, so the gradient is stock's (it raised before; tests/test_drop_in.py has the
    other transforms)."""
    x, w, b = _leaves([(3, 4), (2, 4), (2,)], torch.float32, (False,) * 3, True)
    node = linear_relu(x, w.detach().requires_grad_(), b).grad_fn  # outside: the C++ node
    assert node.name() == "torch::autograd::CppNode<fastlenet::LinearReLUNode>"
    got = torch.func.grad(lambda w: linear_relu(x, w, b).sum())(w)
    want = torch.func.grad(lambda w: torch.relu(torch.nn.functional.linear(x, w, b)).sum())(w)
    assert torch.equal(got, want)
