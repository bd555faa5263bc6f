"""linear_relu / linear on the Triton backend: parity with the float64 reference on forward and
every gradient, float64 gradcheck, odd and empty shapes, NaN, low precision, opcheck of the
two registered ops, determinism.

Without a GPU every test runs on CPU tensors through Triton's interpreter (tests/conftest.py
sets TRITON_INTERPRET=1 before triton is imported). The `gpu` versions run the same checks
natively on CUDA tensors: `pytest -m gpu tests/test_linear_relu_triton.py`.
"""

import os
import subprocess
import sys

import pytest
import torch
from conftest import rel_err
from geometry import TRITON_LINEAR, linear_inputs, linear_rows
from parity import check_linear_relu

from fastlenet import backends, reference
from fastlenet.functional import linear, linear_relu
from fastlenet.kernels import launch
from fastlenet.kernels import linear_relu as triton_linear

# A skipif mark, not a module-level skip: the native compile check imports this module in a
# process without the interpreter (see test_kernels_compile_natively).
pytestmark = pytest.mark.skipif(
    not backends.available_backends()["triton"],
    reason=f"triton backend: {backends.available_backends()['triton']}",
)

INTERPRETED = backends.triton_interpreted()
DEVICES = ["cpu"] if INTERPRETED else [pytest.param("cuda", marks=pytest.mark.gpu)]

# The small rows of the shared table (geometry.TRITON_LINEAR); the tests below index them.
SHAPES = linear_rows(*TRITON_LINEAR)
# float32 against float64: sums of at most 400 products (measured rel_err ~1e-7).
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}
FUNCS = {True: linear_relu, False: linear}


def _check_parity(x, weight, bias, relu, tol):
    check_linear_relu(x, weight, bias, relu, "triton", tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_parity_with_reference(shape, dtype, relu, device):
    x, weight, bias = linear_inputs(shape, dtype, device)
    _check_parity(x, weight, bias, relu, TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_no_bias_leading_dims_and_grad_subsets(device):
    x, weight, _ = linear_inputs(SHAPES[1], torch.float32, device)
    _check_parity(x, weight, None, True, TOL[torch.float32])
    x3 = torch.randn(2, 3, 50, device=device, requires_grad=True)
    out = linear_relu(x3, weight, None, backend="triton")
    ref = reference.linear_relu(x3.double(), weight.double(), None)
    assert out.shape == (2, 3, 23) and rel_err(out, ref) < TOL[torch.float32]
    for subset in [(1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1)]:
        leaves = linear_inputs(SHAPES[2], torch.float32, device, requires_grad=False)
        for t, flag in zip(leaves, subset, strict=True):
            t.requires_grad_(bool(flag))
        _check_parity(*leaves, True, TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_input(device):
    x = torch.randn(50, 37, device=device).t().requires_grad_()  # (37, 50), column-major
    weight = torch.randn(23, 50, device=device, requires_grad=True)
    assert not x.is_contiguous()
    _check_parity(x, weight, None, True, TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("relu", [True, False])
def test_gradcheck_float64(relu, device):
    # Random inputs keep every pre-activation far (>> eps = 1e-6) from the ReLU kink.
    x, weight, bias = linear_inputs((5, 7, 4), torch.float64, device)
    func = FUNCS[relu]
    assert torch.autograd.gradcheck(
        lambda a, b, c: func(a, b, c, backend="triton"), (x, weight, bias)
    )


def _check_ops(x, weight, bias, relu, tol):
    """Both passes of the raw ops against float64, backward fed the reference's saved out."""
    args64 = (x.double(), weight.double(), None if bias is None else bias.double())
    ref_out = reference.linear_relu_fwd(*args64, relu)
    out = triton_linear.OPS.fwd(x, weight, bias, relu)
    assert out.dtype == x.dtype
    assert rel_err(out, ref_out) < tol
    grad = torch.randn_like(ref_out)
    got = triton_linear.OPS.bwd(grad.to(x.dtype), ref_out.to(x.dtype), x, weight, relu)
    want = reference.linear_relu_bwd(grad, ref_out, args64[0], args64[1], relu)
    for g, r in zip(got, want, strict=True):
        assert g.dtype == x.dtype and g.shape == r.shape
        assert rel_err(g, r) < tol


# float32 accumulation of float16 / bfloat16 operands: the error is the rounding of inputs and
# outputs (2^-11 and 2^-8 relative), measured rel_err ~3e-4 (float16) and ~4e-3 (bfloat16)
# against float64 on the rounded inputs; the tolerances leave a factor of about 3.
LOW_TOL = {torch.float16: 1e-3, torch.bfloat16: 1.2e-2}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_low_precision_against_float64(shape, dtype, relu, device):
    x, weight, bias = linear_inputs(shape, dtype, device, requires_grad=False)
    _check_ops(x, weight, bias, relu, LOW_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["input", "weight", "bias"])
def test_nan_matches_stock(which, device):
    # Stock's ReLU backward zeroes the gradient only where out <= 0, so a NaN output passes
    # its gradient on; the oracle is stock autograd in float64 on the same values.
    tensors = list(linear_inputs(SHAPES[1], torch.float32, device, requires_grad=False))
    index = {"input": (3, 7), "weight": (5, 2), "bias": (4,)}[which]
    tensors[["input", "weight", "bias"].index(which)][index] = float("nan")
    leaves = [t.requires_grad_() for t in tensors]
    out = linear_relu(*leaves, backend="triton")
    ref_leaves = [t.detach().double().requires_grad_() for t in tensors]
    ref = torch.nn.functional.relu(torch.nn.functional.linear(*ref_leaves))
    assert ref.isnan().any()
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(ref, ref_leaves, grad.double())
    for g, r in zip((out, *got), (ref, *want), strict=True):
        bad = r.isnan()
        assert torch.equal(g.isnan(), bad)
        assert rel_err(g[~bad], r[~bad]) < TOL[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
def test_all_negative_rows_pass_no_gradient(device):
    x, weight, bias = linear_inputs(SHAPES[1], torch.float32, device, requires_grad=False)
    bias[::2] = -1e4
    out = triton_linear.OPS.fwd(x, weight, bias, True)
    assert (out[:, ::2] == 0).all() and (out[:, 1::2] > 0).any()
    grad = torch.randn_like(out)
    got = triton_linear.OPS.bwd(grad, out, x, weight, True)
    _, grad_weight, grad_bias = got
    assert (grad_weight[::2] == 0).all() and (grad_bias[::2] == 0).all()
    assert (grad_bias[1::2] != 0).all()
    want = reference.linear_relu_bwd(grad.double(), out.double(), x.double(), weight.double(), True)
    for g, r in zip(got, want, strict=True):
        assert rel_err(g, r) < TOL[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    x, weight, bias = linear_inputs(SHAPES[-1], torch.float32, device)
    out = linear_relu(x, weight, bias, backend="triton")
    assert out.shape == (0, 4)
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    assert torch.equal(bias.grad, torch.zeros_like(bias))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("shape", SHAPES[1:3])
def test_opcheck(shape, relu, device):
    # The ops run inside LinearReLUFunction with grad mode off: checked without requires_grad.
    x, weight, bias = linear_inputs(shape, torch.float32, device, requires_grad=False)
    ops = torch.ops.fastlenet
    torch.library.opcheck(ops.triton_linear_relu_fwd, (x, weight, bias, relu))
    torch.library.opcheck(ops.triton_linear_relu_fwd, (x, weight, None, relu))
    out = triton_linear.OPS.fwd(x, weight, bias, relu)
    grad = torch.randn_like(out)
    torch.library.opcheck(ops.triton_linear_relu_bwd, (grad, out, x, weight, relu))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_deterministic(device):
    x, weight, bias = linear_inputs(SHAPES[2], torch.float32, device, requires_grad=False)
    out = triton_linear.OPS.fwd(x, weight, bias, True)
    args = (torch.randn_like(out), out, x, weight, True)
    first = triton_linear.OPS.bwd(*args)
    for _ in range(2):
        for a, b in zip(first, triton_linear.OPS.bwd(*args), strict=True):
            assert torch.equal(a, b)


@pytest.mark.skipif(not INTERPRETED, reason="the split count is the GPU's choice natively")
def test_small_shapes_run_the_multi_split_reduction():
    m, k, n = SHAPES[2]
    cfg = launch.gemm_blocks(n, k, m)
    assert launch.num_splits(m, cfg["BLOCK_K"], 1, torch.device("cpu")) > 1


@pytest.mark.gpu
def test_tf32_option():
    x, weight, bias = linear_inputs(SHAPES[0], torch.float32, "cuda", requires_grad=False)
    ref = reference.linear_relu_fwd(x.double(), weight.double(), bias.double(), True)
    launch.set_allow_tf32(True)
    try:
        out = triton_linear.OPS.fwd(x, weight, bias, True)
    finally:
        launch.set_allow_tf32(False)
    # TF32 rounds the operands to 10 mantissa bits: ~1e-3 relative error, not ~1e-7.
    assert rel_err(out, ref) < 5e-3


_POINTER = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
_POINTER[torch.float64] = "*fp64"


def compile_all_natively(arch):
    """Every kernel of this op for each dtype, compiled to a cubin for sm_<arch> with the
    launchers' native settings. Run without TRITON_INTERPRET."""
    assert not launch.INTERPRETED
    k = triton_linear
    for dtype, ptr in _POINTER.items():
        acc = "*fp64" if dtype == torch.float64 else "*fp32"
        for tf32 in [False, True] if dtype == torch.float32 else [False]:
            common = {
                "RELU": True,
                "ACC_FP64": launch.acc_is_fp64(dtype),
                "DOT_PRECISION": "tf32" if tf32 else "ieee",
                "DOT_UPCAST": False,
                **{n: v for n, v in launch.gemm_blocks(256, 120, 400).items() if n != "num_warps"},
            }
            ptrs = {"x_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "out_ptr": ptr}
            launch.compile_natively(k._fwd_kernel, ptrs, {**common, "HAS_BIAS": True}, arch)
            ptrs = {"g_ptr": ptr, "out_ptr": ptr, "w_ptr": ptr, "gx_ptr": ptr}
            launch.compile_natively(k._bwd_input_kernel, ptrs, common, arch)
            ptrs = {"g_ptr": ptr, "out_ptr": ptr, "x_ptr": ptr}
            ptrs |= {"part_w_ptr": acc, "part_b_ptr": acc}
            launch.compile_natively(k._bwd_weight_kernel, ptrs, common, arch)


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_natively(arch):
    """Compile every kernel and dtype for the GPU, in a process without the interpreter (which
    runs kernels the GPU lowering may reject). Needs no GPU; it does not run the kernels."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = os.path.dirname(os.path.abspath(__file__))
    code = (
        f"import sys, triton; sys.path.insert(0, {here!r}); "
        f"import {__name__.rpartition('.')[2]} as t; t.compile_all_natively({arch})"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
