"""linear_relu and linear on the CUDA backend (hand-written GEMM kernels,
csrc/linear_relu_cuda.cuh) with CUDA tensors: parity with stock PyTorch and with the reference's
backward, float64 gradcheck, opcheck, float16/bfloat16, determinism, streams and CUDA graphs.
Needs a GPU: run with `pytest -m gpu` (deselected elsewhere; tests/test_cuda_sim.py runs the
same kernels in the CPU simulator).
"""

import pytest
import torch
from conftest import rel_err
from geometry import linear_inputs, linear_rows
from parity import check_linear_relu

from fastlenet import reference
from fastlenet.functional import linear, linear_relu

pytestmark = pytest.mark.gpu
DEVICE = "cuda"
BACKEND = "cuda"

# The rows of the shared table the CUDA tests run; the tests below index them.
SHAPES = linear_rows(
    "lenet_fc1", "lenet_fc2", "lenet_fc3", "one_row", "odd", "empty_batch", "tile_64"
)
# Against the float64 reference on the same (rounded) inputs: float32 sums of up to 1500
# terms; float16/bfloat16 accumulate in float32 and round the result (2^-11, 2^-8).
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
FUNCTIONS = {"linear_relu": (linear_relu, True), "linear": (linear, False)}


def _inputs(shape, dtype, requires_grad=True):
    return linear_inputs(shape, dtype, DEVICE, requires_grad)


def _check(fn_name, x, weight, bias, tol):
    check_linear_relu(x, weight, bias, FUNCTIONS[fn_name][1], BACKEND, tol)


@pytest.mark.parametrize("fn_name", FUNCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_parity_with_stock(shape, dtype, fn_name):
    x, weight, bias = _inputs(shape, dtype)
    _check(fn_name, x, weight, bias, TOL[dtype])
    _check(fn_name, x, weight, None, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES[:5])
def test_parity_half(shape, dtype):
    _check("linear_relu", *_inputs(shape, dtype), TOL[dtype])


@pytest.mark.parametrize("fn_name", FUNCTIONS)
def test_gradcheck_float64(fn_name):
    fn, _ = FUNCTIONS[fn_name]
    x, weight, bias = _inputs((6, 9, 5), torch.float64)
    assert torch.autograd.gradcheck(lambda a, b, c: fn(a, b, c, backend=BACKEND), (x, weight, bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("shape", SHAPES[:5])
def test_opcheck(shape, relu, dtype):
    x, weight, bias = _inputs(shape, dtype, requires_grad=False)
    ops = torch.ops.fastlenet
    torch.library.opcheck(ops.linear_relu_fwd, (x, weight, bias, relu))
    torch.library.opcheck(ops.linear_relu_fwd, (x, weight, None, relu))
    out = ops.linear_relu_fwd(x, weight, bias, relu)
    grad = torch.randn_like(out)
    torch.library.opcheck(ops.linear_relu_bwd, (grad, out, x, weight, relu))


def test_backward_matches_reference_with_nan_mask():
    """A NaN out passes its gradient (as stock ReLU's backward) and a NaN grad_out where
    out <= 0 is dropped, as the reference's where(out <= 0, 0, grad_out)."""
    x, weight, bias = _inputs((13, 33, 65), torch.float64, requires_grad=False)
    out = torch.ops.fastlenet.linear_relu_fwd(x, weight, bias, True)
    out[0, 0] = float("nan")
    grad = torch.randn_like(out)
    grad[out <= 0] = float("nan")
    got = torch.ops.fastlenet.linear_relu_bwd(grad, out, x, weight, True)
    want = reference.linear_relu_bwd(grad, out, x, weight, True)
    for g, w in zip(got, want, strict=True):
        assert not g.isnan().any()
        assert rel_err(g, w) < 1e-12


def test_backward_is_deterministic():
    x, weight, bias = _inputs((256, 400, 120), torch.float32, requires_grad=False)
    ops = torch.ops.fastlenet
    out = ops.linear_relu_fwd(x, weight, bias, True)
    grad = torch.randn_like(out)
    first = ops.linear_relu_bwd(grad, out, x, weight, True)
    for _ in range(3):
        for a, b in zip(first, ops.linear_relu_bwd(grad, out, x, weight, True), strict=True):
            assert torch.equal(a, b)


def test_runs_on_the_current_stream_and_in_a_cuda_graph():
    x, weight, bias = _inputs((64, 400, 120), torch.float32, requires_grad=False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = linear_relu(x, weight, bias, backend=BACKEND)  # warm-up, side stream
    torch.cuda.current_stream().wait_stream(side)
    want = reference.linear_relu(x.double(), weight.double(), bias.double())
    assert rel_err(out, want) < TOL[torch.float32]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = linear_relu(x, weight, bias, backend=BACKEND)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    want = reference.linear_relu(x.double(), weight.double(), bias.double())
    assert rel_err(captured, want) < TOL[torch.float32]


def test_bad_arguments_name_them():
    x, weight, bias = _inputs((4, 5, 3), torch.float32, requires_grad=False)
    ops = torch.ops.fastlenet
    with pytest.raises(RuntimeError, match="weight"):
        ops.linear_relu_fwd(x, weight.cpu(), bias, True)
    with pytest.raises(RuntimeError, match="bias"):
        ops.linear_relu_fwd(x, weight, bias[:-1], True)
    with pytest.raises(RuntimeError, match="grad_out"):
        ops.linear_relu_bwd(x, x, x, weight, True)
