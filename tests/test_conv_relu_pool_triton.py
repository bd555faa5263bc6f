"""conv_relu_pool2d on the Triton backend: parity with the float64 reference on forward and
every gradient, float64 gradcheck, ties, NaN, all-negative windows, empty batch, low
precision, opcheck of the three registered ops, determinism and torch.compile.

Without a GPU every test runs on CPU tensors through Triton's interpreter (tests/conftest.py
sets TRITON_INTERPRET=1 before triton is imported), on small shapes. The `gpu` versions run
the same checks natively on CUDA tensors: `pytest -m gpu tests/test_conv_relu_pool_triton.py`.
"""

import os
import subprocess
import sys

import pytest
import torch
from conftest import rel_err
from geometry import CONV, TRITON_CONV, conv_inputs, conv_rows, pairs
from parity import check_conv_relu_pool

import fastlenet
from fastlenet import backends, reference
from fastlenet.functional import conv_relu_pool2d
from fastlenet.kernels import conv_relu_pool as triton_conv
from fastlenet.kernels import launch

# A skipif mark, not a module-level skip: the native compile check imports this module in a
# process without the interpreter (see test_kernels_compile_natively).
pytestmark = pytest.mark.skipif(
    not backends.available_backends()["triton"],
    reason=f"triton backend: {backends.available_backends()['triton']}",
)

INTERPRETED = backends.triton_interpreted()
# CPU tensors only through the interpreter; CUDA tensors only natively (with a GPU).
DEVICES = ["cpu"] if INTERPRETED else [pytest.param("cuda", marks=pytest.mark.gpu)]

# The small rows of the shared table (geometry.TRITON_CONV); the tests below index them.
GEOMETRIES = conv_rows(*TRITON_CONV)
# float32 kernels against the float64 reference: sums of at most a few hundred products
# (measured rel_err ~1e-7); float64 against float64: rounding only.
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def _check_parity(x, weight, bias, conv, tol):
    """Forward and the gradient of every leaf against the stock float64 composition."""
    check_conv_relu_pool(x, weight, bias, conv, "triton", tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_parity_with_reference(geometry, dtype, device):
    x, weight, bias, conv = conv_inputs(geometry, dtype, device)
    _check_parity(x, weight, bias, conv, TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_no_bias_unbatched_and_grad_subsets(device):
    x, weight, _, conv = conv_inputs(GEOMETRIES[2], torch.float32, device)
    _check_parity(x, weight, None, conv, TOL[torch.float32])
    single = x[0].detach().requires_grad_()
    out = conv_relu_pool2d(single, weight, None, *conv, backend="triton")
    ref = reference.conv_relu_pool2d(single[None].double(), weight.double(), None, *conv)
    assert out.shape == ref.shape[1:] and rel_err(out, ref[0]) < TOL[torch.float32]
    for subset in [(1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1)]:
        leaves = conv_inputs(GEOMETRIES[4], torch.float32, device, requires_grad=False)
        for t, flag in zip(leaves[:3], subset, strict=True):
            t.requires_grad_(bool(flag))
        _check_parity(*leaves, TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_input(device):
    x, weight, bias, conv = conv_inputs(GEOMETRIES[1], torch.float32, device, requires_grad=False)
    x = x.to(memory_format=torch.channels_last).requires_grad_()
    assert not x.is_contiguous()
    _check_parity(x, weight.requires_grad_(), bias, conv, TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("geometry", [GEOMETRIES[2], GEOMETRIES[3], GEOMETRIES[5]])
def test_gradcheck_float64(geometry, device):
    _, c, h, w, _, kh, kw, *conv = geometry
    # Random inputs keep every window's max and pre-activation far (>> eps = 1e-6) from a
    # kink, so finite differences are exact. fast_mode compares one random projection of the
    # Jacobian: the full one costs two forward passes per input element, 10-50 s each here
    # under the interpreter (the full check runs on the tiny shape below).
    x, weight, bias, conv = conv_inputs((1, c, h, w, 2, kh, kw, *conv), torch.float64, device)
    assert torch.autograd.gradcheck(
        lambda a, b, bb: conv_relu_pool2d(a, b, bb, *conv, backend="triton"),
        (x, weight, bias),
        fast_mode=True,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64_full_jacobian(device):
    x, weight, bias, conv = conv_inputs(CONV["tiny"], torch.float64, device)
    assert torch.autograd.gradcheck(
        lambda a, b, bb: conv_relu_pool2d(a, b, bb, *conv, backend="triton"), (x, weight, bias)
    )


def _op_state(geometry, dtype, device):
    """Inputs, the reference's saved argmax and a random grad_out for the raw ops."""
    x, weight, bias, conv = conv_inputs(geometry, dtype, device, requires_grad=False)
    ref_out, ref_argmax = reference.conv_relu_pool_fwd(
        x.double(), weight.double(), bias.double(), *conv
    )
    grad = torch.randn_like(ref_out)
    return x, weight, bias, conv, ref_out, ref_argmax, grad


def _check_ops(x, weight, bias, conv, tol):
    """Every pass of the raw ops against the float64 reference, backward fed the
    reference's saved argmax. Returns the kernel's (out, argmax)."""
    args64 = (x.double(), weight.double(), None if bias is None else bias.double())
    ref_out, ref_argmax = reference.conv_relu_pool_fwd(*args64, *conv)
    out, argmax = triton_conv.OPS.fwd(x, weight, bias, *conv)
    assert out.dtype == x.dtype and argmax.dtype == torch.uint8
    assert rel_err(out, ref_out) < tol
    grad = torch.randn_like(ref_out)
    bwd_args = (grad.to(x.dtype), ref_argmax, x, weight, *conv)
    grad_input, grad_weight, grad_bias = triton_conv.OPS.bwd(*bwd_args, True, True)
    ref_bwd = (grad, ref_argmax, args64[0], args64[1], *conv)
    ref_gi, ref_gw, ref_gb = reference.conv_relu_pool_bwd(*ref_bwd, True, True)
    assert rel_err(grad_input, ref_gi) < tol
    assert rel_err(grad_weight, ref_gw) < tol
    assert rel_err(grad_bias, ref_gb) < tol
    return out, argmax, ref_argmax


# float32 accumulation of float16 / bfloat16 operands: the error is the rounding of the inputs
# and outputs (2^-11 and 2^-8 relative), measured rel_err ~3e-4 (float16) and ~3e-3 (bfloat16)
# against float64 on the rounded inputs; tolerances leave a factor of about 3.
LOW_TOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("geometry", GEOMETRIES[1:3])
def test_low_precision_against_float64(geometry, dtype, device):
    x, weight, bias, conv = conv_inputs(geometry, dtype, device, requires_grad=False)
    _, argmax, ref_argmax = _check_ops(x, weight, bias, conv, LOW_TOL[dtype])
    # Near-ties may resolve differently once the products are summed in another order.
    assert (argmax != ref_argmax).float().mean().item() < 0.02


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_saved_argmax_matches_reference(dtype, device):
    x, weight, bias, conv = conv_inputs(GEOMETRIES[2], dtype, device, requires_grad=False)
    _, argmax, ref_argmax = _check_ops(x, weight, bias, conv, TOL[dtype])
    assert torch.equal(argmax, ref_argmax)
    assert (argmax == 255).any() and (argmax != 255).any()  # both kinds of window occur


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("geometry", [GEOMETRIES[0], GEOMETRIES[2]])
def test_ties_pick_first_max(geometry, dtype, device):
    # Small integers make every conv sum exact in any order, so windows tie often and the
    # kernel must pick the first maximum in row-major order exactly as max_pool2d does.
    n, c, h, w, o, kh, kw, *conv = geometry
    conv = pairs(conv)
    x = torch.randint(-1, 2, (n, c, h, w), device=device).to(dtype)
    weight = torch.randint(-1, 2, (o, c, kh, kw), device=device).to(dtype)
    bias = torch.randint(-1, 2, (o,), device=device).to(dtype)
    out, argmax, ref_argmax = _check_ops(x, weight, bias, conv, TOL[dtype])
    assert torch.equal(argmax, ref_argmax)
    ref_out, _ = reference.conv_relu_pool_fwd(x.double(), weight.double(), bias.double(), *conv)
    assert torch.equal(out.double(), ref_out)


@pytest.mark.parametrize("device", DEVICES)
def test_all_tied_windows(device):
    # Each 2x2 block of the image repeats one value and the kernel is 1x1: every window of
    # the 2x2 pool is a 4-way tie, so the argmax is 0 wherever the max is positive.
    blocks = torch.randn(2, 3, 4, 5, device=device)
    x = blocks.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    weight = torch.randn(4, 3, 1, 1, device=device)
    conv = pairs([1, 0, 2, 2])
    out, argmax = triton_conv.OPS.fwd(x, weight, None, *conv)
    positive = out > 0
    assert positive.any() and (~positive).any()
    assert torch.equal(argmax[positive], torch.zeros_like(argmax[positive]))
    assert torch.equal(argmax[~positive], torch.full_like(argmax[~positive], 255))


def _same_with_nan(got, want, tol):
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert rel_err(got[~nan], want[~nan]) < tol


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("where", ["inside", "outside"])
def test_nan_input(where, device):
    # Pools of 2 with stride 3 leave every third conv row in no window. "outside" puts NaNs
    # only there (a 1x1 kernel maps input rows to conv rows): the output and grad_input stay
    # finite, grad_weight is NaN as in stock's dense backward (0 * NaN).
    geometry = GEOMETRIES[5] if where == "inside" else (2, 2, 8, 9, 4, 1, 1, 1, 0, 2, 3)
    x, weight, bias, conv = conv_inputs(geometry, torch.float32, device, requires_grad=False)
    if where == "inside":
        x[0, 1, 4, 4] = float("nan")
        x[1, 0, 2, 3] = float("nan")  # two NaNs in some windows: the last one wins
        x[1, 0, 3, 4] = float("nan")
    else:
        x[0, 0, 2, 1:6] = float("nan")
    out, argmax = triton_conv.OPS.fwd(x, weight, bias, *conv)
    ref_out, ref_argmax = reference.conv_relu_pool_fwd(x, weight, bias, *conv)
    assert ref_out.isnan().any() == (where == "inside")
    _same_with_nan(out, ref_out, TOL[torch.float32])
    # max_pool2d's choice (last NaN of the window); a NaN max passes gradient
    assert torch.equal(argmax, ref_argmax)
    grad = torch.randn_like(out)
    args = (grad, argmax, x, weight, *conv)
    got_x, got_w, got_b = triton_conv.OPS.bwd(*args, True, True)
    want_x, want_w, want_b = reference.conv_relu_pool_bwd(*args, True, True)
    _same_with_nan(got_x, want_x, TOL[torch.float32])
    assert want_w.isnan().any()
    _same_with_nan(got_w, want_w, TOL[torch.float32])
    _same_with_nan(got_b, want_b, TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_all_negative_windows_pass_no_gradient(device):
    x, weight, bias, conv = conv_inputs(GEOMETRIES[1], torch.float32, device, requires_grad=False)
    bias[::2] = -1e4  # every pre-activation of the even channels is negative
    out, argmax = triton_conv.OPS.fwd(x, weight, bias, *conv)
    assert (out[:, ::2] == 0).all() and (argmax[:, ::2] == 255).all()
    assert (argmax[:, 1::2] != 255).any()
    grad = torch.randn_like(out)
    _, grad_weight, grad_bias = triton_conv.OPS.bwd(grad, argmax, x, weight, *conv, False, True)
    assert (grad_weight[::2] == 0).all() and (grad_bias[::2] == 0).all()
    assert (grad_bias[1::2] != 0).all()
    x.requires_grad_()
    _check_parity(x, weight.requires_grad_(), bias.requires_grad_(), conv, TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    x, weight, bias, conv = conv_inputs(GEOMETRIES[-1], torch.float32, device)
    out = conv_relu_pool2d(x, weight, bias, *conv, backend="triton")
    assert out.shape == (0, 4, 3, 3)
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    assert torch.equal(bias.grad, torch.zeros_like(bias))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("geometry", GEOMETRIES[2:6])
def test_opcheck(geometry, device):
    # The ops run inside ConvReLUPoolFunction with grad mode off, so they are checked on
    # tensors that do not require grad (autograd is the Function's, tested above).
    x, weight, bias, conv, _, argmax, grad = _op_state(geometry, torch.float32, device)
    grad = grad.float()
    ops = torch.ops.fastlenet
    torch.library.opcheck(ops.triton_conv_relu_pool_fwd, (x, weight, bias, *conv))
    torch.library.opcheck(ops.triton_conv_relu_pool_fwd, (x, weight, None, *conv))
    for wanted in ((True, True), (True, False), (False, True)):
        args = (grad, argmax, x, weight, *conv, *wanted)
        torch.library.opcheck(ops.triton_conv_relu_pool_bwd, args)


@pytest.mark.parametrize("device", DEVICES)
def test_weight_gradient_is_deterministic(device):
    x, weight, _, conv, _, argmax, grad = _op_state(GEOMETRIES[1], torch.float32, device)
    args = (grad.float(), argmax, x, weight, *conv)
    first = triton_conv.OPS.bwd(*args, False, True)
    for _ in range(2):
        for a, b in zip(first, triton_conv.OPS.bwd(*args, False, True), strict=True):
            assert torch.equal(a, b)


@pytest.mark.skipif(not INTERPRETED, reason="the split count is the GPU's choice natively")
def test_small_shapes_run_the_multi_split_reduction():
    # LeNet conv1 of GEOMETRIES[0]: 4 window positions x 2 x 6 x 6 pooled outputs = 288 rows.
    cfg = launch.gemm_blocks(6, 25, 288)
    assert launch.num_splits(288, cfg["BLOCK_K"], 1, torch.device("cpu")) > 1


@pytest.mark.gpu
def test_tf32_option():
    x, weight, bias, conv = conv_inputs(GEOMETRIES[1], torch.float32, "cuda", requires_grad=False)
    ref, _ = reference.conv_relu_pool_fwd(x.double(), weight.double(), bias.double(), *conv)
    assert launch.dot_precision(torch.float32) == "ieee"
    launch.set_allow_tf32(True)
    try:
        assert launch.dot_precision(torch.float32) == "tf32"
        out, _ = triton_conv.OPS.fwd(x, weight, bias, *conv)
    finally:
        launch.set_allow_tf32(False)
    # TF32 rounds the operands to 10 mantissa bits: ~1e-3 relative error, not ~1e-7.
    assert rel_err(out, ref) < 5e-3


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    # Under the interpreter the ops are opaque custom ops (inductor calls them); natively they
    # are triton_ops and inductor traces into their kernels.
    model = torch.nn.Sequential(
        fastlenet.ConvReLUPool2d(1, 4, 3, backend="triton"),
        torch.nn.Flatten(),
        fastlenet.LinearReLU(4 * 3 * 3, 5, backend="triton"),
    ).to(device)
    x = torch.randn(3, 1, 8, 8, device=device)
    eager = model(x)
    eager_grads = torch.autograd.grad(eager.sum(), list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    grads = torch.autograd.grad(out.sum(), list(model.parameters()))
    assert rel_err(out, eager) < 1e-6
    for got, want in zip(grads, eager_grads, strict=True):
        assert rel_err(got, want) < 1e-6


def test_importing_the_kernels_package_does_not_import_triton():
    code = "import sys, fastlenet, fastlenet.kernels; sys.exit('triton' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


_POINTER = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
_POINTER[torch.float64] = "*fp64"


def compile_all_natively(arch):
    """Every kernel of this op (and the shared split reduction) for each dtype, compiled to a
    cubin for sm_<arch> with the launchers' native settings. Run without TRITON_INTERPRET."""
    assert not launch.INTERPRETED
    k = triton_conv
    for dtype, ptr in _POINTER.items():
        acc = "*fp64" if dtype == torch.float64 else "*fp32"
        for tf32 in [False, True] if dtype == torch.float32 else [False]:
            common = {
                "KH": 5,
                "KW": 5,
                "ACC_FP64": launch.acc_is_fp64(dtype),
                "DOT_PRECISION": "tf32" if tf32 else "ieee",
                "DOT_UPCAST": False,
                **{n: v for n, v in launch.gemm_blocks(500, 16, 150).items() if n != "num_warps"},
            }
            pool = {"POOL_H": 3, "POOL_W": 3, "WIN_H": 2, "WIN_W": 2}
            fwd_ptrs = {"x_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "out_ptr": ptr}
            launch.compile_natively(
                k._fwd_kernel,
                {**fwd_ptrs, "argmax_ptr": "*u8"},
                {**common, "POOL_H": 2, "POOL_W": 2, "HAS_BIAS": True},
                arch,
            )
            ptrs = {"g_ptr": ptr, "argmax_ptr": "*u8", "w_ptr": ptr, "gx_ptr": ptr}
            launch.compile_natively(k._bwd_input_kernel, ptrs, {**common, **pool}, arch)
            fma = launch.dot_fma_needed(dtype)
            weight_cfg = {**common, **pool, "DOT_FMA": fma}
            if fma:
                weight_cfg.update(launch.FMA_BLOCKS)
            ptrs = {"g_ptr": ptr, "argmax_ptr": "*u8", "x_ptr": ptr}
            ptrs |= {"part_w_ptr": acc, "part_b_ptr": acc}
            launch.compile_natively(k._bwd_weight_kernel, ptrs, weight_cfg, arch)
        launch.compile_natively(
            launch._sum_splits_kernel, {"part_ptr": acc, "out_ptr": ptr}, {"BLOCK": 1024}, arch
        )


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_natively(arch):
    """The interpreter runs kernels Triton cannot compile (it found a float64 dot the GPU
    lowering rejects): compile every kernel and dtype for the GPU, in a process without the
    interpreter. Needs no GPU; it does not run the kernels."""
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
