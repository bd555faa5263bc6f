"""Parity of a fused op with the stock composition in float64, forward and every gradient: the
one check the CPU, Triton and CUDA test files share."""

import torch
from conftest import rel_err

from fastlenet import reference
from fastlenet.functional import conv_relu_pool2d, linear, linear_relu


def _as_float64_leaves(tensors):
    return [
        None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors
    ]


def _check_inference(run, out):
    """Under no_grad the op runs without its autograd Function: the same values and strides."""
    with torch.no_grad():
        plain = run()
    assert plain.grad_fn is None
    assert torch.equal(plain, out.detach()) and plain.stride() == out.stride()


def _check(out, ref, inputs, ref_inputs, tol):
    x = inputs[0]
    assert out.shape == ref.shape and out.dtype == x.dtype and out.device == x.device
    assert rel_err(out, ref) < tol
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    if not leaves:
        return
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad, allow_unused=True)
    want = torch.autograd.grad(
        ref, [t for t in ref_inputs if t is not None and t.requires_grad], grad.double()
    )
    for g, r in zip(got, want, strict=True):
        if g is None:  # empty batch: nothing reaches the leaf
            g = torch.zeros_like(r)
        else:
            assert g.dtype == x.dtype
        assert g.shape == r.shape
        assert rel_err(g, r) < tol


def check_conv_relu_pool(x, weight, bias, conv, backend, tol):
    """conv_relu_pool2d(x, weight, bias, *conv) on `backend` against the stock composition."""
    conv = [(v, v) if isinstance(v, int) else tuple(v) for v in conv]
    out = conv_relu_pool2d(x, weight, bias, *conv, backend=backend)
    _check_inference(lambda: conv_relu_pool2d(x, weight, bias, *conv, backend=backend), out)
    ref_inputs = _as_float64_leaves((x, weight, bias))
    ref = reference.conv_relu_pool2d(*ref_inputs, *conv)
    _check(out, ref, (x, weight, bias), ref_inputs, tol)


def check_linear_relu(x, weight, bias, relu, backend, tol):
    """linear_relu (relu) or linear on `backend` against the stock composition."""
    out = (linear_relu if relu else linear)(x, weight, bias, backend=backend)
    _check_inference(
        lambda: (linear_relu if relu else linear)(x, weight, bias, backend=backend), out
    )
    ref_inputs = _as_float64_leaves((x, weight, bias))
    ref = reference.linear_relu(*ref_inputs, relu=relu)
    _check(out, ref, (x, weight, bias), ref_inputs, tol)
