"""linear_relu and linear on the C++ CPU and reference backends: parity with stock PyTorch on
forward and every gradient, float64 gradcheck, opcheck of the registered ops."""

import pytest
import torch
from geometry import linear_inputs, linear_rows
from parity import check_linear_relu

from fastlenet import _ext
from fastlenet.functional import linear, linear_relu

BACKENDS = [b for b in ("cpu", "reference") if b == "reference" or _ext.LOADED]
# The rows of the shared table the C++ CPU and reference tests run; the tests below index them.
SHAPES = linear_rows("lenet_fc1", "lenet_fc2", "lenet_fc3", "one_row", "odd", "empty_batch")
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}
FUNCTIONS = {"linear_relu": (linear_relu, True), "linear": (linear, False)}


def _check(fn_name, x, weight, bias, backend, tol):
    check_linear_relu(x, weight, bias, FUNCTIONS[fn_name][1], backend, tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn_name", FUNCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_parity_with_stock(shape, dtype, fn_name, backend):
    x, weight, bias = linear_inputs(shape, dtype)
    _check(fn_name, x, weight, bias, backend, TOL[dtype])
    _check(fn_name, x, weight, None, backend, TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn_name", FUNCTIONS)
def test_leading_dims_and_unbatched(fn_name, backend):
    weight = torch.randn(6, 5, requires_grad=True)
    bias = torch.randn(6, requires_grad=True)
    for shape in [(5,), (3, 4, 5), (2, 1, 3, 5)]:
        x = torch.randn(*shape, requires_grad=True)
        _check(fn_name, x, weight, bias, backend, TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn_name", FUNCTIONS)
def test_gradcheck_float64(fn_name, backend):
    fn, _ = FUNCTIONS[fn_name]
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: fn(a, b, c, backend=backend), (x, weight, bias))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("subset", [(1, 0, 0), (0, 1, 0), (0, 0, 1)])
def test_requires_grad_subsets(subset, backend):
    tensors = [torch.randn(8, 9), torch.randn(3, 9), torch.randn(3)]
    for t, flag in zip(tensors, subset, strict=True):
        t.requires_grad_(bool(flag))
    _check("linear_relu", *tensors, backend, TOL[torch.float32])


@pytest.mark.skipif(not _ext.LOADED, reason="needs the C++ extension")
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("shape", SHAPES[3:])
def test_opcheck(shape, relu):
    # Called with grad mode off inside LinearReLUFunction: checked without requires_grad.
    x, weight, bias = linear_inputs(shape, torch.float32, requires_grad=False)
    ops = torch.ops.fastlenet
    torch.library.opcheck(ops.linear_relu_fwd, (x, weight, bias, relu))
    torch.library.opcheck(ops.linear_relu_fwd, (x, weight, None, relu))
    out = ops.linear_relu_fwd(x, weight, bias, relu)
    torch.library.opcheck(ops.linear_relu_bwd, (torch.randn_like(out), out, x, weight, relu))


@pytest.mark.skipif(not _ext.LOADED, reason="needs the C++ extension")
def test_relu_mask_is_the_output():
    # Pre-activations exactly 0 and negative get no gradient, positive ones all of it.
    x = torch.tensor([[1.0, -2.0], [0.5, 0.5]])
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    bias = torch.tensor([0.0, 2.0, -1.0])
    out = torch.ops.fastlenet.linear_relu_fwd(x, weight, bias, True)
    assert torch.equal(out, torch.tensor([[1.0, 0.0, 0.0], [0.5, 2.5, 0.0]]))
    grad = torch.ones(2, 3)
    gi, gw, gb = torch.ops.fastlenet.linear_relu_bwd(grad, out, x, weight, True)
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    assert torch.equal(gb, mask.sum(0))
    assert torch.equal(gi, mask @ weight)
    assert torch.equal(gw, mask.t() @ x)
