"""conv_relu_pool2d on the C++ CPU and reference backends: parity with stock PyTorch on
forward and every gradient, float64 gradcheck, opcheck of the registered ops, determinism."""

import pytest
import torch
from conftest import rel_err
from geometry import conv_inputs, conv_op_args, conv_rows
from hypothesis import given, settings
from hypothesis import strategies as st
from parity import check_conv_relu_pool

from fastlenet import _ext, reference
from fastlenet.functional import conv_relu_pool2d

BACKENDS = [b for b in ("cpu", "reference") if b == "reference" or _ext.LOADED]

# The rows of the shared table the C++ CPU and reference tests run; the tests below index them.
GEOMETRIES = conv_rows(
    "lenet_conv1",
    "lenet_conv2",
    "fashion_conv2",
    "odd",
    "no_pool",
    "strides",
    "conv_1x1",
    "empty_batch",
)
# float32 kernels are compared with a float64 reference: sums of up to a few hundred terms.
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def _check_parity(x, weight, bias, conv, backend, tol):
    check_conv_relu_pool(x, weight, bias, conv, backend, tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_parity_with_stock(geometry, dtype, backend):
    x, weight, bias, conv = conv_inputs(geometry, dtype)
    _check_parity(x, weight, bias, conv, backend, TOL[dtype])


@pytest.mark.skipif(not _ext.LOADED, reason="needs the C++ extension")
@pytest.mark.parametrize("channels", [3, 6, 7, 8, 9, 13, 17])
@pytest.mark.parametrize(("width", "padding"), [(7, 0), (8, 0), (14, 0), (15, 1), (16, 2), (17, 0)])
def test_layout_blocks(channels, width, padding):
    """The CPU backward moves float32 samples between layouts 8 pixels x 8 channels at a time,
    the last block of a row overlapping the one before it, and (AVX-512 builds) pads the pixels
    of its grad_x buffer (3 -> 4, 6 or 7 -> 8, 13 -> 16 channels): channel counts on either side
    of a block and of that padding, widths below one block, of whole blocks and in between."""
    geometry = (2, channels, 9, width, 5, 3, 3, 1, padding, 2, 2)
    x, weight, bias, conv = conv_inputs(geometry, torch.float32)
    _check_parity(x, weight, bias, conv, "cpu", TOL[torch.float32])


@pytest.mark.skipif(not _ext.LOADED, reason="needs the C++ extension")
@pytest.mark.parametrize("padding", [0, 1, 2])
@pytest.mark.parametrize("width", [30, 31, 32, 33])
def test_columns_phase_split(width, padding):
    """The CPU forward with lanes over pooled columns (LeNet-5's conv1, and these: 13 to 16
    pooled columns, 6 output channels) splits each input row into even and odd columns 16 at a
    time, the rest one by one (widths of whole steps and not, padding that puts the first
    column in either phase), and stores a pooled row of fewer than 16 columns as a whole vector
    where the rows after it have room for the excess, lane by lane in the last row."""
    geometry = (2, 2, 9, width, 6, 5, 5, 1, padding, 2, 2)
    x, weight, bias, conv = conv_inputs(geometry, torch.float32)
    _check_parity(x, weight, bias, conv, "cpu", TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("geometry", GEOMETRIES[3:7])
def test_gradcheck_float64(geometry, backend):
    x, weight, bias, conv = conv_inputs(geometry, torch.float64)
    # Random inputs keep every window's max and every pre-activation away from the kinks
    # by far more than gradcheck's eps (1e-6), so the finite differences are exact.
    assert torch.autograd.gradcheck(
        lambda a, b, c: conv_relu_pool2d(a, b, c, *conv, backend=backend), (x, weight, bias)
    )


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 3),
    c=st.integers(1, 3),
    o=st.integers(1, 19),
    kh=st.integers(1, 4),
    kw=st.integers(1, 4),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    pool=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    pool_stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    extra=st.tuples(st.integers(0, 6), st.integers(0, 6)),
    bias=st.booleans(),
)
def test_random_geometry_float64(n, c, o, kh, kw, stride, padding, pool, pool_stride, extra, bias):
    if not _ext.LOADED:
        pytest.fail(_ext.LOAD_ERROR)
    # The smallest input whose conv output holds one pooling window, plus `extra`.
    h = max(1, (pool[0] - 1) * stride[0] + kh - 2 * padding[0]) + extra[0]
    w = max(1, (pool[1] - 1) * stride[1] + kw - 2 * padding[1]) + extra[1]
    if h + 2 * padding[0] < kh or w + 2 * padding[1] < kw:
        h, w = h + kh, w + kw
    x = torch.randn(n, c, h, w, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(o, c, kh, kw, dtype=torch.float64, requires_grad=True)
    b = torch.randn(o, dtype=torch.float64, requires_grad=True) if bias else None
    conv = [stride, padding, pool, pool_stride]
    out = conv_relu_pool2d(x, weight, b, *conv, backend="cpu")
    ref = reference.conv_relu_pool2d(x, weight, b, *conv)
    assert rel_err(out, ref) < 1e-12
    if out.numel():
        grad = torch.randn_like(out)
        leaves = [t for t in (x, weight, b) if t is not None]
        got = torch.autograd.grad(out, leaves, grad)
        want = torch.autograd.grad(ref, leaves, grad)
        for g1, g2 in zip(got, want, strict=True):
            assert rel_err(g1, g2) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("subset", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1), (1, 1, 0)])
def test_requires_grad_subsets(subset, backend):
    x, weight, bias, conv = conv_inputs(GEOMETRIES[1], torch.float32, requires_grad=False)
    for t, flag in zip((x, weight, bias), subset, strict=True):
        t.requires_grad_(bool(flag))
    _check_parity(x, weight, bias, conv, backend, TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_bias_and_unbatched(backend):
    x, weight, _, conv = conv_inputs(GEOMETRIES[0], torch.float32)
    _check_parity(x, weight, None, conv, backend, TOL[torch.float32])
    single = x[0].detach().requires_grad_()
    out = conv_relu_pool2d(single, weight, None, *conv, backend=backend)
    ref = reference.conv_relu_pool2d(single.unsqueeze(0).double(), weight.double(), None, *conv)
    assert out.shape == ref.shape[1:]
    assert rel_err(out, ref[0]) < TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_noncontiguous_input(layout, backend):
    x, weight, bias, conv = conv_inputs(GEOMETRIES[2], torch.float32, requires_grad=False)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    else:
        x = torch.randn(2, 16, 28, 56)[..., ::2]
    assert not x.is_contiguous()
    x.requires_grad_()
    weight.requires_grad_()
    _check_parity(x, weight, bias, conv, backend, TOL[torch.float32])


@pytest.mark.skipif(not _ext.LOADED, reason="needs the C++ extension")
@pytest.mark.parametrize("geometry", GEOMETRIES[:6])
def test_opcheck(geometry):
    # The ops run inside ConvReLUPoolFunction with grad mode off, so they are checked on
    # tensors that do not require grad (autograd is the Function's, tested above).
    x, weight, bias, conv, grad, argmax = conv_op_args(geometry, torch.float32)
    ops = torch.ops.fastlenet
    torch.library.opcheck(ops.conv_relu_pool_fwd, (x, weight, bias, *conv))
    torch.library.opcheck(ops.conv_relu_pool_fwd, (x, weight, None, *conv))
    for wanted in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(ops.conv_relu_pool_bwd, (grad, argmax, x, weight, *conv, *wanted))


@pytest.mark.skipif(not _ext.LOADED, reason="needs the C++ extension")
@pytest.mark.parametrize("geometry", GEOMETRIES[1:4], ids=["blocked", "generic", "odd"])
def test_bwd_gives_the_gradients_asked_for(geometry):
    """One backward op, three requests: each gradient matches the reference and does not
    depend on whether the other was asked for; the one not asked for has no elements."""
    x, weight, _, conv, grad, argmax = conv_op_args(geometry, torch.float64)
    args = (grad, argmax, x, weight, *conv)
    ops = torch.ops.fastlenet
    both = ops.conv_relu_pool_bwd(*args, True, True)
    want = reference.conv_relu_pool_bwd(*args, True, True)
    for got, ref in zip(both, want, strict=True):
        assert got.shape == ref.shape and rel_err(got, ref) < TOL[torch.float64]
    grad_input, *weight_grads = ops.conv_relu_pool_bwd(*args, True, False)
    assert torch.equal(grad_input, both[0])
    assert [t.numel() for t in weight_grads] == [0, 0]
    grad_input, *weight_grads = ops.conv_relu_pool_bwd(*args, False, True)
    assert grad_input.numel() == 0
    for got, ref in zip(weight_grads, both[1:], strict=True):
        assert torch.equal(got, ref)


@pytest.mark.skipif(not _ext.LOADED, reason="needs the C++ extension")
def test_saved_state_matches_reference():
    x, weight, bias, conv, _, argmax = conv_op_args(GEOMETRIES[3], torch.float64)
    _, ref_argmax = reference.conv_relu_pool_fwd(x, weight, bias, *conv)
    assert argmax.dtype == torch.uint8
    assert torch.equal(argmax, ref_argmax)
    assert (argmax == 255).any() and (argmax != 255).any()  # both kinds of window occur


@pytest.mark.skipif(not _ext.LOADED, reason="needs the C++ extension")
@pytest.mark.parametrize("threads", [1, 2])
def test_backward_is_deterministic(threads):
    torch.set_num_threads(threads)
    x, weight, _, conv, grad, argmax = conv_op_args(
        (64, 6, 14, 14, 16, 5, 5, 1, 0, 2, 2), torch.float32
    )
    ops = torch.ops.fastlenet
    first = ops.conv_relu_pool_bwd(grad, argmax, x, weight, *conv, True, True)
    for _ in range(3):
        again = ops.conv_relu_pool_bwd(grad, argmax, x, weight, *conv, True, True)
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a, b)
