"""conv_relu_pool2d on every backend: parity with stock PyTorch on forward and every gradient,
float64 gradcheck, the raw ops against the reference (saved argmax, every gradient, the ones
asked for), ties, NaN and Inf, all-negative windows.

Each test runs on the backends of its table (geometry.conv_cases): the C++ CPU and reference
backends and Triton (through its interpreter, on its small rows) here, CUDA (and Triton
natively) with `pytest -m gpu`. The opcheck, determinism and empty-batch tests of both ops are
in tests/test_ops.py; what only one backend has, in tests/test_conv_relu_pool_<backend>.py.
"""

import pytest
import torch
from conftest import rel_err
from geometry import (
    BACKENDS,
    CONV,
    F32,
    F64,
    HALF,
    KERNELS,
    TOL,
    backend_cases,
    conv_cases,
    conv_inputs,
    conv_op_args,
    device,
    pairs,
    randn,
)
from parity import check_conv_relu_pool

from fastlenet import backends, reference
from fastlenet.functional import conv_relu_pool2d

# The raw ops in float16 / bfloat16 against float64 on the rounded inputs: float32 accumulation,
# the error is the rounding of the inputs and outputs, measured rel_err ~3e-4 (float16) and
# ~3e-3 (bfloat16); the tolerances leave a factor of about 3.
LOW_TOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _ops(backend):
    return backends.ops("conv_relu_pool", backend)


PARITY = [
    # every row on the backends that can afford them (Triton: its small rows), float32/64
    *conv_cases(BACKENDS, list(CONV), [F32, F64]),
    *conv_cases(["cuda"], ["lenet_conv1", "lenet_conv2", "fashion_conv2", "odd"], HALF),
]


@pytest.mark.parametrize(("backend", "name", "dtype"), PARITY)
def test_parity_with_stock(backend, name, dtype):
    x, weight, bias, conv = conv_inputs(CONV[name], dtype, device(backend))
    check_conv_relu_pool(x, weight, bias, conv, backend, TOL[dtype])


GRADCHECK = [
    *conv_cases(["cpu", "reference", "cuda"], ["odd", "no_pool", "strides", "conv_1x1"], ["full"]),
    # Triton: fast_mode compares one random projection of the Jacobian, on one sample and two
    # output channels: the full one costs two forward passes per input element, 10-50 s each
    # under the interpreter; the full check runs on the tiny row.
    *conv_cases(["triton"], ["odd", "no_pool", "pool_gaps"], ["fast"]),
    *conv_cases(["triton"], ["tiny"], ["full"]),
]


@pytest.mark.parametrize(("backend", "name", "jacobian"), GRADCHECK)
def test_gradcheck_float64(backend, name, jacobian):
    geometry = CONV[name]
    if jacobian == "fast":  # one sample, two output channels
        geometry = (1, *geometry[1:4], 2, *geometry[5:])
    x, weight, bias, conv = conv_inputs(geometry, F64, device(backend))
    # Random inputs keep every window's max and every pre-activation away from the kinks
    # by far more than gradcheck's eps (1e-6), so the finite differences are exact.
    assert torch.autograd.gradcheck(
        lambda a, b, bb: conv_relu_pool2d(a, b, bb, *conv, backend=backend),
        (x, weight, bias),
        fast_mode=jacobian == "fast",
    )


@pytest.mark.parametrize(
    ("backend", "name", "needs"),
    conv_cases(BACKENDS, ["lenet_conv2", "strides"], ["x", "w", "b", "wb", "xw"]),
)
def test_requires_grad_subsets(backend, name, needs):
    x, weight, bias, conv = conv_inputs(CONV[name], F32, device(backend), requires_grad=False)
    for t, flag in zip((x, weight, bias), "xwb", strict=True):
        t.requires_grad_(flag in needs)
    check_conv_relu_pool(x, weight, bias, conv, backend, TOL[F32])


@pytest.mark.parametrize(("backend", "name"), conv_cases(BACKENDS, ["lenet_conv1", "odd"]))
def test_no_bias_and_unbatched(backend, name):
    x, weight, _, conv = conv_inputs(CONV[name], F32, device(backend))
    check_conv_relu_pool(x, weight, None, conv, backend, TOL[F32])
    single = x[0].detach().requires_grad_()
    out = conv_relu_pool2d(single, weight, None, *conv, backend=backend)
    ref = reference.conv_relu_pool2d(single[None].double(), weight.double(), None, *conv)
    assert out.shape == ref.shape[1:]
    assert rel_err(out, ref[0]) < TOL[F32]


@pytest.mark.parametrize(
    ("backend", "name", "layout"),
    conv_cases(BACKENDS, ["fashion_conv2", "lenet_conv2"], ["channels_last", "strided"]),
)
def test_noncontiguous_input(backend, name, layout):
    x, weight, bias, conv = conv_inputs(CONV[name], F32, device(backend), requires_grad=False)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    else:  # every other column of a wider input
        x = randn(*x.shape[:-1], 2 * x.shape[-1], device=x.device)[..., ::2]
    assert not x.is_contiguous()
    x.requires_grad_()
    weight.requires_grad_()
    check_conv_relu_pool(x, weight, bias, conv, backend, TOL[F32])


def _check_ops(backend, x, weight, bias, conv, tol):
    """Both raw ops against the float64 reference, backward fed the reference's saved argmax
    and asked for every gradient. Returns the kernel's (out, argmax), the reference's argmax
    and the backward's arguments and gradients."""
    args64 = (x.double(), weight.double(), None if bias is None else bias.double())
    ref_out, ref_argmax = reference.conv_relu_pool_fwd(*args64, *conv)
    out, argmax = _ops(backend).fwd(x, weight, bias, *conv)
    assert out.dtype == x.dtype and argmax.dtype == torch.uint8
    assert rel_err(out, ref_out) < tol
    grad = torch.randn_like(ref_out)
    bwd_args = (grad.to(x.dtype), ref_argmax, x, weight, *conv)
    got = _ops(backend).bwd(*bwd_args, True, True)
    want = reference.conv_relu_pool_bwd(grad, ref_argmax, *args64[:2], *conv, True, True)
    for g, r in zip(got, want, strict=True):
        assert g.dtype == x.dtype and g.shape == r.shape
        assert rel_err(g, r) < tol
    return out, argmax, ref_argmax, bwd_args, got


RAW_OPS = [
    *conv_cases(
        KERNELS,
        ["lenet_conv1", "lenet_conv2", "fashion_conv2", "odd", "no_pool", "strides"],
        [F64],
    ),
    *conv_cases(KERNELS, ["odd"], [F32]),
    # Triton in float16 / bfloat16 (the C++ CPU ops take float32 and float64 only)
    *conv_cases(["triton"], ["lenet_conv2", "odd"], HALF),
]


@pytest.mark.parametrize(("backend", "name", "dtype"), RAW_OPS)
def test_ops_match_reference(backend, name, dtype):
    """The saved argmax is the reference's; one backward op, three requests: each gradient
    matches the reference and does not depend on whether the other was asked for; the one not
    asked for has no elements."""
    x, weight, bias, conv = conv_inputs(CONV[name], dtype, device(backend), requires_grad=False)
    _, argmax, ref_argmax, args, both = _check_ops(
        backend, x, weight, bias, conv, LOW_TOL.get(dtype, TOL[dtype])
    )
    if dtype in LOW_TOL:
        # Near-ties may resolve differently once the products are summed in another order.
        assert (argmax != ref_argmax).float().mean().item() < 0.02
    else:
        assert torch.equal(argmax, ref_argmax)
        assert (argmax == 255).any() and (argmax != 255).any()  # both kinds of window occur
    grad_input, *weight_grads = _ops(backend).bwd(*args, True, False)
    assert torch.equal(grad_input, both[0])
    assert [t.numel() for t in weight_grads] == [0, 0]
    grad_input, *weight_grads = _ops(backend).bwd(*args, False, True)
    assert grad_input.numel() == 0
    for got, ref in zip(weight_grads, both[1:], strict=True):
        assert torch.equal(got, ref)


@pytest.mark.parametrize(
    ("backend", "name", "dtype"), conv_cases(KERNELS, ["lenet_conv1_small", "odd"], [F32, F64])
)
def test_ties_pick_first_max(backend, name, dtype):
    # Small integers make every conv sum exact in any order, so windows tie often and the
    # kernel must pick the first maximum in row-major order exactly as max_pool2d does.
    n, c, h, w, o, kh, kw, *conv = CONV[name]
    conv = pairs(conv)
    dev = device(backend)
    x = torch.randint(-1, 2, (n, c, h, w)).to(dev, dtype)
    weight = torch.randint(-1, 2, (o, c, kh, kw)).to(dev, dtype)
    bias = torch.randint(-1, 2, (o,)).to(dev, dtype)
    out, argmax, ref_argmax, *_ = _check_ops(backend, x, weight, bias, conv, TOL[dtype])
    assert torch.equal(argmax, ref_argmax)
    ref_out, _ = reference.conv_relu_pool_fwd(x.double(), weight.double(), bias.double(), *conv)
    assert torch.equal(out.double(), ref_out)


@pytest.mark.parametrize("backend", backend_cases(KERNELS))
def test_all_tied_windows(backend):
    # Each 2x2 block of the image repeats one value and the kernel is 1x1: every window of
    # the 2x2 pool is a 4-way tie, so the argmax is 0 wherever the max is positive.
    blocks = randn(2, 3, 4, 5, device=device(backend))
    x = blocks.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    weight = randn(4, 3, 1, 1, device=x.device)
    out, argmax = _ops(backend).fwd(x, weight, None, (1, 1), (0, 0), (2, 2), (2, 2))
    positive = out > 0
    assert positive.any() and (~positive).any()
    assert torch.equal(argmax[positive], torch.zeros_like(argmax[positive]))
    assert torch.equal(argmax[~positive], torch.full_like(argmax[~positive], 255))


@pytest.mark.parametrize("backend", backend_cases(KERNELS))
def test_ties_nan_and_dead_windows(backend):
    """Integer data makes exact ties (the first max wins); NaN wins (the last one) and passes
    gradient; windows with max <= 0 pass none: argmax equal to the reference's."""
    dev = device(backend)
    x = torch.randint(-2, 3, (3, 6, 14, 14)).to(dev, F64)
    weight = torch.randint(-1, 2, (16, 6, 5, 5)).to(dev, F64)
    bias = torch.randint(-1, 2, (16,)).to(dev, F64)
    x.view(-1)[torch.randperm(x.numel())[:4].to(dev)] = float("nan")
    conv = ((1, 1), (0, 0), (2, 2), (2, 2))
    out, argmax = _ops(backend).fwd(x, weight, bias, *conv)
    ref_out, ref_argmax = reference.conv_relu_pool_fwd(x, weight, bias, *conv)
    assert torch.equal(argmax, ref_argmax)
    assert torch.equal(out.isnan(), ref_out.isnan()) and out.isnan().any()
    assert torch.equal(out.nan_to_num(), ref_out.nan_to_num())
    assert (argmax == 255).any()


def _same_with_nan(got, want, tol):
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert rel_err(got[~nan], want[~nan]) < tol


@pytest.mark.parametrize(("backend", "where"), backend_cases(KERNELS, ["inside", "outside"]))
def test_nan_input(backend, where):
    # Pools of 2 with stride 3 leave every third conv row in no window. "outside" puts NaNs
    # only there (a 1x1 kernel maps input rows to conv rows): the output and grad_input stay
    # finite, grad_weight is NaN as in stock's dense backward (0 * NaN).
    geometry = CONV["pool_gaps"] if where == "inside" else (2, 2, 8, 9, 4, 1, 1, 1, 0, 2, 3)
    x, weight, bias, conv = conv_inputs(geometry, F32, device(backend), requires_grad=False)
    if where == "inside":
        x[0, 1, 4, 4] = float("nan")
        x[1, 0, 2, 3] = float("nan")  # two NaNs in some windows: the last one wins
        x[1, 0, 3, 4] = float("nan")
    else:
        x[0, 0, 2, 1:6] = float("nan")
    out, argmax = _ops(backend).fwd(x, weight, bias, *conv)
    ref_out, ref_argmax = reference.conv_relu_pool_fwd(x, weight, bias, *conv)
    assert ref_out.isnan().any() == (where == "inside")
    _same_with_nan(out, ref_out, TOL[F32])
    # max_pool2d's choice (last NaN of the window); a NaN max passes gradient
    assert torch.equal(argmax, ref_argmax)
    grad = torch.randn_like(out)
    args = (grad, argmax, x, weight, *conv)
    got_x, got_w, got_b = _ops(backend).bwd(*args, True, True)
    want_x, want_w, want_b = reference.conv_relu_pool_bwd(*args, True, True)
    _same_with_nan(got_x, want_x, TOL[F32])
    assert want_w.isnan().any()
    _same_with_nan(got_w, want_w, TOL[F32])
    _same_with_nan(got_b, want_b, TOL[F32])


@pytest.mark.parametrize(
    ("backend", "name", "plant"), conv_cases(KERNELS, ["fashion_conv2"], ["x", "weight"])
)
def test_inf_and_nan_propagate_as_in_stock(backend, name, plant):
    """Inf in the input or the weight: 0 * Inf = NaN wherever stock's dense backward (the
    reference) has it; the CUDA kernels flag it on the device and take their dense paths."""
    x, weight, _, conv, grad, argmax = conv_op_args(CONV[name], F64, backend)
    (x if plant == "x" else weight).view(-1)[7] = float("inf")
    args = (grad, argmax, x, weight, *conv)
    got = _ops(backend).bwd(*args, True, True)
    want = reference.conv_relu_pool_bwd(*args, True, True)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.isnan(), w.isnan()) and torch.equal(g.isinf(), w.isinf())
        finite = w.isfinite()
        assert rel_err(g[finite], w[finite]) < 1e-12


@pytest.mark.parametrize("backend", backend_cases(KERNELS))
def test_all_negative_windows_pass_no_gradient(backend):
    x, weight, bias, conv = conv_inputs(
        CONV["lenet_conv2"], F32, device(backend), requires_grad=False
    )
    bias[::2] = -1e4  # every pre-activation of the even channels is negative
    out, argmax = _ops(backend).fwd(x, weight, bias, *conv)
    assert (out[:, ::2] == 0).all() and (argmax[:, ::2] == 255).all()
    assert (argmax[:, 1::2] != 255).any()
    grad = torch.randn_like(out)
    _, grad_weight, grad_bias = _ops(backend).bwd(grad, argmax, x, weight, *conv, False, True)
    assert (grad_weight[::2] == 0).all() and (grad_bias[::2] == 0).all()
    assert (grad_bias[1::2] != 0).all()
    x.requires_grad_()
    check_conv_relu_pool(x, weight.requires_grad_(), bias.requires_grad_(), conv, backend, TOL[F32])
