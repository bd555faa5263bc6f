"""conv_relu_pool2d on the CUDA backend alone (hand-written kernels,
csrc/conv_relu_pool_cuda.cuh): the atomics opt-in, a batch beyond the grid limit, streams and
CUDA graphs, arguments on the wrong device. What every backend has (parity, gradcheck, the raw
ops against the reference, ties, NaN, opcheck, determinism...) runs on CUDA too, from
tests/test_conv_relu_pool.py and tests/test_ops.py. Needs a GPU: run with `pytest -m gpu`
(deselected elsewhere; tests/test_cuda_sim.py runs the same kernels in the CPU simulator).
"""

import pytest
import torch
from conftest import rel_err
from geometry import CONV, TOL, conv_inputs, conv_op_args
from parity import check_conv_relu_pool

from fastlenet import reference
from fastlenet.functional import conv_relu_pool2d

pytestmark = pytest.mark.gpu
DEVICE = "cuda"
BACKEND = "cuda"


def _inputs(geometry, dtype, requires_grad=True):
    return conv_inputs(geometry, dtype, DEVICE, requires_grad)


def _check_parity(x, weight, bias, conv, tol):
    check_conv_relu_pool(x, weight, bias, conv, BACKEND, tol)


def test_atomics_opt_in(monkeypatch):
    x, weight, _, conv, grad, argmax = conv_op_args(
        (256, *CONV["lenet_conv2"][1:]), torch.float32, BACKEND
    )
    args = (grad, argmax, x, weight, *conv)
    want = reference.conv_relu_pool_bwd(
        grad.double(), argmax, x.double(), weight.double(), *conv, False, True
    )[1:]
    monkeypatch.setenv("FASTLENET_CUDA_ATOMICS", "1")
    grads = torch.ops.fastlenet.conv_relu_pool_bwd(*args, False, True)[1:]
    for got, ref in zip(grads, want, strict=True):
        assert rel_err(got, ref) < TOL[torch.float32]


def test_batch_beyond_the_grid_limit():
    """70000 samples: more than the 65535 blocks of grid z, so the forward loops over them."""
    _check_parity(*_inputs((70000, 1, 6, 6, 2, 3, 3, 1, 0, 2, 2), torch.float32), 2e-5)


def test_runs_on_the_current_stream_and_in_a_cuda_graph():
    x, weight, bias, conv = _inputs(CONV["lenet_conv2"], torch.float32, requires_grad=False)
    want = reference.conv_relu_pool2d(x.double(), weight.double(), bias.double(), *conv)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = conv_relu_pool2d(x, weight, bias, *conv, backend=BACKEND)  # warm-up, side stream
    torch.cuda.current_stream().wait_stream(side)
    assert rel_err(out, want) < TOL[torch.float32]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = conv_relu_pool2d(x, weight, bias, *conv, backend=BACKEND)
    x.copy_(torch.randn_like(x))  # new data in the captured input
    graph.replay()
    torch.cuda.synchronize()
    want = reference.conv_relu_pool2d(x.double(), weight.double(), bias.double(), *conv)
    assert rel_err(captured, want) < TOL[torch.float32]


def test_bad_arguments_name_them():
    x, weight, bias, conv = _inputs(CONV["lenet_conv2"], torch.float32, requires_grad=False)
    ops = torch.ops.fastlenet
    with pytest.raises(RuntimeError, match="weight"):
        ops.conv_relu_pool_fwd(x, weight.cpu(), bias, *conv)
    with pytest.raises(RuntimeError, match="bias"):
        ops.conv_relu_pool_fwd(x, weight, bias[:-1], *conv)
    with pytest.raises(RuntimeError, match="input"):
        ops.conv_relu_pool_fwd(x.int(), weight.int(), None, *conv)
