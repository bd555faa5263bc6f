"""conv_relu_pool2d on the CUDA backend (hand-written kernels, csrc/conv_relu_pool_cuda.cuh) with
CUDA tensors: parity with stock PyTorch and with the reference's saved state, float64
gradcheck, opcheck, float16/bfloat16, determinism, the atomics opt-in, streams and CUDA graphs.
Needs a GPU: run with `pytest -m gpu` (deselected elsewhere; tests/test_cuda_sim.py runs the
same kernels in the CPU simulator).
"""

import pytest
import torch
from conftest import rel_err
from geometry import conv_inputs, conv_op_args, conv_rows, pairs
from parity import check_conv_relu_pool

from fastlenet import reference
from fastlenet.functional import conv_relu_pool2d

pytestmark = pytest.mark.gpu
DEVICE = "cuda"
BACKEND = "cuda"

# The rows of the shared table the CUDA tests run; the tests below index them.
GEOMETRIES = conv_rows(
    "lenet_conv1",
    "lenet_conv2",
    "fashion_conv2",
    "odd",
    "no_pool",
    "strides",
    "conv_1x1",
    "channels_64_7x7",
    "empty_batch",
)
# Against the float64 reference on the same (rounded) inputs: float32 sums of up to a few
# thousand terms; float16/bfloat16 accumulate in float32 and round the result (2^-11, 2^-8).
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _inputs(geometry, dtype, requires_grad=True):
    return conv_inputs(geometry, dtype, DEVICE, requires_grad)


def _check_parity(x, weight, bias, conv, tol):
    check_conv_relu_pool(x, weight, bias, conv, BACKEND, tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_parity_with_stock(geometry, dtype):
    _check_parity(*_inputs(geometry, dtype), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("geometry", GEOMETRIES[:4])
def test_parity_half(geometry, dtype):
    _check_parity(*_inputs(geometry, dtype), TOL[dtype])


@pytest.mark.parametrize("geometry", GEOMETRIES[3:7])
def test_gradcheck_float64(geometry):
    x, weight, bias, conv = _inputs(geometry, torch.float64)
    # Random inputs keep every window's max and every pre-activation away from the kinks
    # by far more than gradcheck's eps (1e-6), so the finite differences are exact.
    assert torch.autograd.gradcheck(
        lambda a, b, c: conv_relu_pool2d(a, b, c, *conv, backend=BACKEND), (x, weight, bias)
    )


def _op_args(geometry, dtype):
    return conv_op_args(geometry, dtype, DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("geometry", GEOMETRIES[:6])
def test_opcheck(geometry, dtype):
    x, weight, bias, conv, grad, argmax = _op_args(geometry, dtype)
    ops = torch.ops.fastlenet
    torch.library.opcheck(ops.conv_relu_pool_fwd, (x, weight, bias, *conv))
    torch.library.opcheck(ops.conv_relu_pool_fwd, (x, weight, None, *conv))
    for wanted in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(ops.conv_relu_pool_bwd, (grad, argmax, x, weight, *conv, *wanted))


@pytest.mark.parametrize("geometry", GEOMETRIES[:6])
def test_saved_state_and_gradients_match_reference(geometry):
    x, weight, bias, conv, grad, argmax = _op_args(geometry, torch.float64)
    _, ref_argmax = reference.conv_relu_pool_fwd(x, weight, bias, *conv)
    assert argmax.dtype == torch.uint8 and torch.equal(argmax, ref_argmax)
    ops = torch.ops.fastlenet
    args = (grad, argmax, x, weight, *conv)
    want = reference.conv_relu_pool_bwd(*args, True, True)
    assert rel_err(ops.conv_relu_pool_bwd(*args, True, False)[0], want[0]) < 1e-12
    for got, ref in zip(ops.conv_relu_pool_bwd(*args, False, True)[1:], want[1:], strict=True):
        assert rel_err(got, ref) < 1e-12


def test_ties_nan_and_dead_windows():
    """Integer data makes exact ties (the first max wins); NaN wins (the last one) and passes
    gradient; windows with max <= 0 pass none: argmax equal to the reference's."""
    x = torch.randint(-2, 3, (3, 6, 14, 14), device=DEVICE).double()
    weight = torch.randint(-1, 2, (16, 6, 5, 5), device=DEVICE).double()
    bias = torch.randint(-1, 2, (16,), device=DEVICE).double()
    x.view(-1)[torch.randperm(x.numel(), device=DEVICE)[:4]] = float("nan")
    conv = pairs((1, 0, 2, 2))
    out, argmax = torch.ops.fastlenet.conv_relu_pool_fwd(x, weight, bias, *conv)
    ref_out, ref_argmax = reference.conv_relu_pool_fwd(x, weight, bias, *conv)
    assert torch.equal(argmax, ref_argmax)
    assert torch.equal(out.isnan(), ref_out.isnan()) and out.isnan().any()
    assert torch.equal(out.nan_to_num(), ref_out.nan_to_num())
    assert (argmax == 255).any()


@pytest.mark.parametrize("plant", ["x", "weight"])
def test_inf_and_nan_propagate_as_in_stock(plant):
    """Inf in the input or the weight: 0 * Inf = NaN wherever stock's dense backward (the
    reference) has it; the CUDA kernels flag it on the device and take their dense paths."""
    x, weight, _, conv, grad, argmax = _op_args(GEOMETRIES[2], torch.float64)
    (x if plant == "x" else weight).view(-1)[7] = float("inf")
    args = (grad, argmax, x, weight, *conv)
    ops = torch.ops.fastlenet
    got = ops.conv_relu_pool_bwd(*args, True, True)
    want = reference.conv_relu_pool_bwd(*args, True, True)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.isnan(), w.isnan()) and torch.equal(g.isinf(), w.isinf())
        finite = w.isfinite()
        assert rel_err(g[finite], w[finite]) < 1e-12


def test_backward_is_deterministic():
    x, weight, _, conv, grad, argmax = _op_args(
        (256, 6, 14, 14, 16, 5, 5, 1, 0, 2, 2), torch.float32
    )
    ops = torch.ops.fastlenet
    first = ops.conv_relu_pool_bwd(grad, argmax, x, weight, *conv, False, True)[1:]
    first_input = ops.conv_relu_pool_bwd(grad, argmax, x, weight, *conv, True, False)[0]
    for _ in range(3):
        again = ops.conv_relu_pool_bwd(grad, argmax, x, weight, *conv, False, True)[1:]
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a, b)
        assert torch.equal(
            first_input, ops.conv_relu_pool_bwd(grad, argmax, x, weight, *conv, True, False)[0]
        )


def test_atomics_opt_in(monkeypatch):
    x, weight, _, conv, grad, argmax = _op_args(
        (256, 6, 14, 14, 16, 5, 5, 1, 0, 2, 2), torch.float32
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


def test_noncontiguous_input():
    x, weight, bias, conv = _inputs(GEOMETRIES[2], torch.float32, requires_grad=False)
    x = x.to(memory_format=torch.channels_last).requires_grad_()
    assert not x.is_contiguous()
    _check_parity(x, weight.requires_grad_(), bias, conv, TOL[torch.float32])


def test_runs_on_the_current_stream_and_in_a_cuda_graph():
    x, weight, bias, conv = _inputs(GEOMETRIES[1], torch.float32, requires_grad=False)
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
    x, weight, bias, conv = _inputs(GEOMETRIES[1], torch.float32, requires_grad=False)
    ops = torch.ops.fastlenet
    with pytest.raises(RuntimeError, match="weight"):
        ops.conv_relu_pool_fwd(x, weight.cpu(), bias, *conv)
    with pytest.raises(RuntimeError, match="bias"):
        ops.conv_relu_pool_fwd(x, weight, bias[:-1], *conv)
    with pytest.raises(RuntimeError, match="input"):
        ops.conv_relu_pool_fwd(x.int(), weight.int(), None, *conv)
