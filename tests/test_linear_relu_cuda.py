"""linear_relu on the CUDA backend alone (hand-written GEMM kernels, csrc/linear_relu_cuda.cuh):
streams and CUDA graphs, arguments on the wrong device. What every backend has (parity,
gradcheck, the raw ops against the reference, NaN, opcheck, determinism...) runs on CUDA too,
from tests/test_linear_relu.py and tests/test_ops.py. Needs a GPU: run with `pytest -m gpu`
(deselected elsewhere; tests/test_cuda_sim.py runs the same kernels in the CPU simulator).
"""

import pytest
import torch
from conftest import rel_err
from geometry import LINEAR, TOL, linear_inputs

from fastlenet import reference
from fastlenet.functional import linear_relu

pytestmark = pytest.mark.gpu
DEVICE = "cuda"
BACKEND = "cuda"


def _inputs(shape, dtype, requires_grad=True):
    return linear_inputs(shape, dtype, DEVICE, requires_grad)


def test_runs_on_the_current_stream_and_in_a_cuda_graph():
    x, weight, bias = _inputs(LINEAR["lenet_fc1"], torch.float32, requires_grad=False)
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
