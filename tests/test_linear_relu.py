"""linear_relu and linear on every backend: parity with stock PyTorch on forward and every
gradient, float64 gradcheck, leading dimensions, the raw ops against the reference, the ReLU
mask, NaN, dead units.

Each test runs on the backends of its table (geometry.linear_cases): the C++ CPU and reference
backends and Triton (through its interpreter, on its small rows) here, CUDA (and Triton
natively) with `pytest -m gpu`. The opcheck, determinism and empty-batch tests of both ops are
in tests/test_ops.py; what only one backend has, in tests/test_linear_relu_<backend>.py.
"""

import pytest
import torch
from conftest import rel_err
from geometry import (
    BACKENDS,
    F32,
    F64,
    HALF,
    KERNELS,
    LINEAR,
    TOL,
    backend_cases,
    device,
    linear_cases,
    linear_inputs,
    randn,
)
from parity import check_linear_relu

from fastlenet import _ext, backends, reference
from fastlenet.functional import linear, linear_relu

# The raw ops in float16 / bfloat16 against float64 on the rounded inputs: float32 accumulation,
# the error is the rounding of inputs and outputs, measured rel_err ~3e-4 (float16) and ~4e-3
# (bfloat16); the tolerances leave a factor of about 3.
LOW_TOL = {torch.float16: 1e-3, torch.bfloat16: 1.2e-2}
#: the functions, by name, and whether they apply the ReLU
FUNCTIONS = {"linear_relu": (linear_relu, True), "linear": (linear, False)}


def _ops(backend):
    return backends.ops("linear_relu", backend)


def _check(fn_name, x, weight, bias, backend, tol):
    check_linear_relu(x, weight, bias, FUNCTIONS[fn_name][1], backend, tol)


PARITY = [
    # every row on the backends that can afford them (Triton: its small rows), float32/64
    *linear_cases(BACKENDS, list(LINEAR), [F32, F64], FUNCTIONS),
    *linear_cases(
        ["cuda"], ["lenet_fc1", "lenet_fc2", "lenet_fc3", "one_row", "odd"], HALF, ["linear_relu"]
    ),
]


@pytest.mark.parametrize(("backend", "name", "dtype", "fn_name"), PARITY)
def test_parity_with_stock(backend, name, dtype, fn_name):
    x, weight, bias = linear_inputs(LINEAR[name], dtype, device(backend))
    _check(fn_name, x, weight, bias, backend, TOL[dtype])
    _check(fn_name, x, weight, None, backend, TOL[dtype])


@pytest.mark.parametrize(("backend", "fn_name"), backend_cases(BACKENDS, FUNCTIONS))
def test_leading_dims_and_unbatched(backend, fn_name):
    dev = device(backend)
    weight = randn(6, 5, device=dev, requires_grad=True)
    bias = randn(6, device=dev, requires_grad=True)
    for shape in [(5,), (3, 4, 5), (2, 1, 3, 5)]:
        x = randn(*shape, device=dev, requires_grad=True)
        _check(fn_name, x, weight, bias, backend, TOL[F32])
        _check(fn_name, x, weight, None, backend, TOL[F32])


@pytest.mark.parametrize(
    ("backend", "name", "fn_name"), linear_cases(BACKENDS, ["tiny"], FUNCTIONS)
)
def test_gradcheck_float64(backend, name, fn_name):
    # Random inputs keep every pre-activation far (>> eps = 1e-6) from the ReLU kink.
    fn, _ = FUNCTIONS[fn_name]
    x, weight, bias = linear_inputs(LINEAR[name], F64, device(backend))
    assert torch.autograd.gradcheck(lambda a, b, c: fn(a, b, c, backend=backend), (x, weight, bias))


@pytest.mark.parametrize(
    ("backend", "name", "needs"),
    linear_cases(BACKENDS, ["row_blocks", "odd"], ["x", "w", "b", "wb"]),
)
def test_requires_grad_subsets(backend, name, needs):
    tensors = linear_inputs(LINEAR[name], F32, device(backend), requires_grad=False)
    for t, flag in zip(tensors, "xwb", strict=True):
        t.requires_grad_(flag in needs)
    _check("linear_relu", *tensors, backend, TOL[F32])


@pytest.mark.parametrize("backend", backend_cases(BACKENDS))
def test_noncontiguous_input(backend):
    x = randn(50, 37, device=device(backend)).t().requires_grad_()  # (37, 50), column-major
    weight = randn(23, 50, device=x.device, requires_grad=True)
    assert not x.is_contiguous()
    _check("linear_relu", x, weight, None, backend, TOL[F32])
    # a transposed weight view (the CPU op copies it before its BLAS call)
    weight_t = randn(50, 23, device=x.device).t().requires_grad_()
    assert not weight_t.is_contiguous()
    _check("linear_relu", x, weight_t, None, backend, TOL[F32])


@pytest.mark.parametrize("backend", backend_cases(BACKENDS))
def test_relu_mask_is_the_output(backend):
    # Pre-activations exactly 0 and negative get no gradient, positive ones all of it.
    dev = device(backend)
    x = torch.tensor([[1.0, -2.0], [0.5, 0.5]], device=dev)
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], device=dev)
    bias = torch.tensor([0.0, 2.0, -1.0], device=dev)
    out = _ops(backend).fwd(x, weight, bias, True)
    assert torch.equal(out, torch.tensor([[1.0, 0.0, 0.0], [0.5, 2.5, 0.0]], device=dev))
    grad = torch.ones(2, 3, device=dev)
    gi, gw, gb = _ops(backend).bwd(grad, out, x, weight, True)
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]], device=dev)
    assert torch.equal(gb, mask.sum(0))
    assert torch.equal(gi, mask @ weight)
    assert torch.equal(gw, mask.t() @ x)


@pytest.mark.parametrize("backend", backend_cases(KERNELS))
def test_backward_matches_reference_with_nan_mask(backend):
    """A NaN out passes its gradient (as stock ReLU's backward) and a NaN grad_out where
    out <= 0 is dropped, as the reference's where(out <= 0, 0, grad_out)."""
    x, weight, bias = linear_inputs(LINEAR["odd"], F64, device(backend), requires_grad=False)
    out = _ops(backend).fwd(x, weight, bias, True)
    out[0, 0] = float("nan")
    grad = torch.randn_like(out)
    grad[out <= 0] = float("nan")
    got = _ops(backend).bwd(grad, out, x, weight, True)
    want = reference.linear_relu_bwd(grad, out, x, weight, True)
    for g, w in zip(got, want, strict=True):
        assert not g.isnan().any()
        assert rel_err(g, w) < 1e-12


@pytest.mark.parametrize(("backend", "which"), backend_cases(BACKENDS, ["input", "weight", "bias"]))
def test_nan_matches_stock(backend, which):
    # Stock's ReLU backward zeroes the gradient only where out <= 0, so a NaN output passes
    # its gradient on; the oracle is stock autograd in float64 on the same values.
    tensors = list(linear_inputs(LINEAR["odd_small"], F32, device(backend), requires_grad=False))
    index = {"input": (3, 7), "weight": (5, 2), "bias": (4,)}[which]
    tensors[["input", "weight", "bias"].index(which)][index] = float("nan")
    leaves = [t.requires_grad_() for t in tensors]
    out = linear_relu(*leaves, backend=backend)
    ref_leaves = [t.detach().double().requires_grad_() for t in tensors]
    ref = torch.nn.functional.relu(torch.nn.functional.linear(*ref_leaves))
    assert ref.isnan().any()
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(ref, ref_leaves, grad.double())
    for g, r in zip((out, *got), (ref, *want), strict=True):
        bad = r.isnan()
        assert torch.equal(g.isnan(), bad)
        assert rel_err(g[~bad], r[~bad]) < TOL[F32]


RAW_OPS = [
    *linear_cases(KERNELS, ["odd_small"], [F32, F64], FUNCTIONS),
    # Triton in float16 / bfloat16 (the C++ CPU ops take float32 and float64 only)
    *linear_cases(["triton"], ["lenet_fc1_small", "odd_small", "row_blocks"], HALF, FUNCTIONS),
]


@pytest.mark.parametrize(("backend", "name", "dtype", "fn_name"), RAW_OPS)
def test_ops_match_reference(backend, name, dtype, fn_name):
    """Both raw ops against float64, backward fed the reference's saved out."""
    relu = FUNCTIONS[fn_name][1]
    x, weight, bias = linear_inputs(LINEAR[name], dtype, device(backend), requires_grad=False)
    tol = LOW_TOL.get(dtype, TOL[dtype])
    args64 = (x.double(), weight.double(), bias.double())
    ref_out = reference.linear_relu_fwd(*args64, relu)
    out = _ops(backend).fwd(x, weight, bias, relu)
    assert out.dtype == x.dtype
    assert rel_err(out, ref_out) < tol
    grad = torch.randn_like(ref_out)
    got = _ops(backend).bwd(grad.to(x.dtype), ref_out.to(x.dtype), x, weight, relu)
    want = reference.linear_relu_bwd(grad, ref_out, args64[0], args64[1], relu)
    for g, r in zip(got, want, strict=True):
        assert g.dtype == x.dtype and g.shape == r.shape
        assert rel_err(g, r) < tol


@pytest.mark.parametrize("backend", backend_cases(KERNELS))
def test_all_negative_rows_pass_no_gradient(backend):
    x, weight, bias = linear_inputs(LINEAR["odd_small"], F32, device(backend), requires_grad=False)
    bias[::2] = -1e4
    out = _ops(backend).fwd(x, weight, bias, True)
    assert (out[:, ::2] == 0).all() and (out[:, 1::2] > 0).any()
    grad = torch.randn_like(out)
    got = _ops(backend).bwd(grad, out, x, weight, True)
    _, grad_weight, grad_bias = got
    assert (grad_weight[::2] == 0).all() and (grad_bias[::2] == 0).all()
    assert (grad_bias[1::2] != 0).all()
    want = reference.linear_relu_bwd(grad.double(), out.double(), x.double(), weight.double(), True)
    for g, r in zip(got, want, strict=True):
        assert rel_err(g, r) < TOL[F32]


@pytest.mark.skipif(not _ext.LOADED, reason="needs the C++ extension")
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize(
    "name",
    [
        *("few_rows", "dot_wide", "dot_spans", "dot_tails", "shares_one_row", "shares_two_rows"),
        *("rows_split", "rows_split_3v", "lenet_fc1", "panels", "rows_split_panels"),
    ],
)
def test_cpu_dot_forward_threads(monkeypatch, name, relu):
    """The CPU forward's dot products (few rows, or up to 8 where w is large) split the rows into
    blocks and the outputs into spans, or w's rows into the optimizer's shares (shares_*), the
    tasks over the threads; the hand GEMM (rows_split*, lenet_fc1, panels) splits the rows or
    the columns, and the depth into panels of w^T as wide as a thread's columns allow: on one
    thread and on two, bitwise the same output (each output one chain of multiply-adds in input
    order), and the reference's. Forced (FASTLENET_CPU_GEMM=hand): where MKL runs AVX-512 code
    some of these shapes take the BLAS unforced, whose bits, like stock's F.linear, may depend
    on the thread count."""
    monkeypatch.setenv("FASTLENET_CPU_GEMM", "hand")
    x, weight, bias = linear_inputs(LINEAR[name], F32, requires_grad=False)
    fwd = backends.ops("linear_relu", "cpu").fwd
    torch.set_num_threads(1)  # conftest's _seed_and_threads restores the count
    alone = fwd(x, weight, bias, relu)
    torch.set_num_threads(2)
    out = fwd(x, weight, bias, relu)
    assert torch.equal(out, alone)
    ref = reference.linear_relu(x.double(), weight.double(), bias.double(), relu)
    assert rel_err(out, ref) < TOL[F32]
