"""conv_relu_pool2d on the C++ CPU backend alone: the layout blocks of its backward, the
column phases of its forward, and random geometries in float64 against the reference. What
every backend has is in tests/test_conv_relu_pool.py and tests/test_ops.py."""

import pytest
import torch
from conftest import rel_err
from geometry import CONV, TOL, conv_inputs
from hypothesis import given, settings
from hypothesis import strategies as st
from parity import check_conv_relu_pool

from fastlenet import _ext, reference
from fastlenet.functional import conv_relu_pool2d


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
    check_conv_relu_pool(x, weight, bias, conv, "cpu", TOL[torch.float32])


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
    check_conv_relu_pool(x, weight, bias, conv, "cpu", TOL[torch.float32])


@pytest.mark.skipif(not _ext.LOADED, reason="needs the C++ extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("channels", "kernel", "padding"), [(1, 3, 0), (1, 3, 1), (2, 3, 1), (8, 3, 0), (1, 5, 2)]
)
@pytest.mark.parametrize("width", [9, 16, 17, 18, 34])
def test_no_pool_weight_gradient(channels, kernel, padding, width, dtype):
    """Without pooling, layers of one input channel (3x3, 5x5) or 3x3 with up to 8 take the CPU
    backward's own weight gradient (csrc/conv_relu_pool_cpu_nopool.h): lanes over conv output
    columns (widths below, at and past one and two vectors of 16 or 8), output channels in
    blocks of 2 for 3x3 plus one (5 and 7 channels), reads of a row's last vector that would
    pass the end of grad_out done element by element (the last sample's last rows); the input
    gradient still from ATen. Every gradient against the reference; grad_weight and grad_bias
    bitwise the same when computed again, and for an input that needs no gradient (a first
    layer: the op then calls no ATen backward at all)."""
    out_channels = 5 if kernel == 3 else 7
    geometry = (3, channels, 11, width, out_channels, kernel, kernel, 1, padding, 1, 1)
    x, weight, bias, conv = conv_inputs(geometry, dtype)
    check_conv_relu_pool(x, weight, bias, conv, "cpu", TOL[dtype])
    grads = []
    for data in (x, x, x.detach()):
        out = conv_relu_pool2d(data, weight, bias, *conv, backend="cpu")
        grad = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
        grads.append(torch.autograd.grad(out, (weight, bias), grad))
    for other in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], other, strict=True))


@pytest.mark.skipif(not _ext.LOADED, reason="needs the C++ extension")
@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("name", ["no_pool_cl", "no_pool_cl_planes", "no_pool_strided"])
def test_no_pool_channels_last_backward(name, onednn):
    """Without pooling, float32 layers whose weight gradient ATen computes take ATen's backward
    of channels-last copies where cl_backward_suits (csrc/conv_relu_pool_cpu_nopool_cl.h):
    every gradient against the reference with oneDNN on and off (ATen's own convolution then
    computes them from the same channels-last copies), and the same bits when computed again
    (the bias sums added in a fixed order)."""
    x, weight, bias, conv = conv_inputs(CONV[name], torch.float32)
    with torch.backends.mkldnn.flags(enabled=onednn):
        check_conv_relu_pool(x, weight, bias, conv, "cpu", TOL[torch.float32])
        grads = []
        for _ in range(2):
            out = conv_relu_pool2d(x, weight, bias, *conv, backend="cpu")
            grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
            grads.append(torch.autograd.grad(out, (x, weight, bias), grad))
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


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


@pytest.mark.skipif(not _ext.LOADED, reason="needs the C++ extension")
@pytest.mark.parametrize(
    "geometry", [(16, 6, 14, 14, 16, 5, 5, 1, 0, 2, 2), (8, 1, 32, 32, 6, 5, 5, 1, 0, 2, 2)]
)
def test_serial_ops_match_parallel(geometry):
    """An op with fewer multiply-adds than kParallelMinMacs (csrc/cpu_parallel.h, 2^18) runs its
    kernels' regions on the calling thread. LeNet-5's layers: the batch is above it (conv2 at
    16 samples: 3.8M forward, 1.9M backward), one sample below (240k, 120k). Each sample's
    output, argmax and grad_input are bitwise the batch's (every sample goes through the same
    code either way); grad_weight and grad_bias, summed over the single samples, match the
    batch's."""
    x, weight, bias, conv = conv_inputs(geometry, torch.float32, requires_grad=False)
    fwd = torch.ops.fastlenet.conv_relu_pool_fwd.default
    bwd = torch.ops.fastlenet.conv_relu_pool_bwd.default
    conv = [list(v) for v in conv]
    out, argmax = fwd(x, weight, bias, *conv)
    grad = torch.randn_like(out)
    gi, gw, gb = bwd(grad, argmax, x, weight, *conv, True, True)
    sum_gw, sum_gb = (
        torch.zeros_like(gw, dtype=torch.float64),
        torch.zeros_like(gb, dtype=torch.float64),
    )
    for n in range(x.shape[0]):
        one = x[n : n + 1]
        out_n, argmax_n = fwd(one, weight, bias, *conv)
        assert torch.equal(out_n, out[n : n + 1]) and torch.equal(argmax_n, argmax[n : n + 1])
        gi_n, gw_n, gb_n = bwd(grad[n : n + 1], argmax_n, one, weight, *conv, True, True)
        assert torch.equal(gi_n, gi[n : n + 1])
        sum_gw += gw_n
        sum_gb += gb_n
    assert rel_err(gw, sum_gw) < TOL[torch.float32] and rel_err(gb, sum_gb) < TOL[torch.float32]


#: Channel counts for the forward without pooling: any, and oneDNN's blocks of 16, which decide
#: between flat_forward and ATen's convolution (flat_suits in csrc/conv_relu_pool_cpu_nopool_fwd.h).
_NO_POOL_CHANNELS = st.one_of(st.integers(1, 40), st.sampled_from([16, 32]))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 3),
    c=_NO_POOL_CHANNELS,
    o=_NO_POOL_CHANNELS,
    k=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    size=st.tuples(st.integers(0, 12), st.integers(0, 12)),
    half_padding=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_random_no_pool_channels(n, c, o, k, size, half_padding, dtype):
    """conv + ReLU without pooling over channel counts on and off oneDNN's blocks, kernels up to
    5x5 and padding 0 or k // 2: the forward (flat_forward or ATen's convolution, whichever
    flat_suits picks) is the reference's, and under no_grad bitwise the forward op's output."""
    if not _ext.LOADED:
        pytest.fail(_ext.LOAD_ERROR)
    padding = (k[0] // 2, k[1] // 2) if half_padding else (0, 0)
    x = torch.randn(n, c, k[0] + size[0], k[1] + size[1], dtype=dtype)
    weight = torch.randn(o, c, *k, dtype=dtype)
    bias = torch.randn(o, dtype=dtype)
    conv = [[1, 1], list(padding), [1, 1], [1, 1]]
    out, codes = torch.ops.fastlenet.conv_relu_pool_fwd.default(x, weight, bias, *conv)
    ref = reference.conv_relu_pool2d(x.double(), weight.double(), bias.double(), *conv)
    assert rel_err(out, ref) < TOL[dtype]
    assert torch.equal(codes == 0, out > 0)  # the ReLU codes: 0 where the gradient passes
    got = torch.ops.fastlenet.conv_relu_pool_infer.default(x, weight, bias, *conv)
    assert torch.equal(got, out)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 12),
    o=_NO_POOL_CHANNELS,
    k=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    size=st.tuples(st.integers(0, 10), st.integers(0, 10)),
    padding=st.tuples(st.integers(0, 5), st.integers(0, 5)),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_random_no_pool_input_grad(n, c, o, k, size, padding, dtype):
    """The backward without pooling over input channel counts on both sides of the flat input
    gradient's bound (8: flat_grad_input_suits in csrc/conv_relu_pool_cpu_nopool_gi.h), padding
    from 0 to the kernel size (the transposed conv's padding K - 1 - pad, negative past it:
    ATen's backward), padded planes under and over twice the conv outputs (its other bound):
    every gradient the reference's, with the weight's asked for or not (its own kernel, oneDNN's
    of NCHW or channels-last operands, or none)."""
    if not _ext.LOADED:
        pytest.fail(_ext.LOAD_ERROR)
    padding = (min(padding[0], k[0]), min(padding[1], k[1]))
    x = torch.randn(n, c, k[0] + size[0], k[1] + size[1], dtype=dtype)
    weight = torch.randn(o, c, *k, dtype=dtype)
    bias = torch.randn(o, dtype=dtype)
    conv = [[1, 1], list(padding), [1, 1], [1, 1]]
    out, codes = torch.ops.fastlenet.conv_relu_pool_fwd.default(x, weight, bias, *conv)
    grad = torch.randn_like(out)
    args = (grad, codes, x, weight, *conv)
    want = reference.conv_relu_pool_bwd(*[t.double() for t in args[:4]], *conv, True, True)
    got = torch.ops.fastlenet.conv_relu_pool_bwd.default(*args, True, True)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == dtype and rel_err(g, w) < TOL[dtype]
    alone = torch.ops.fastlenet.conv_relu_pool_bwd.default(*args, True, False)[0]
    assert rel_err(alone, want[0]) < TOL[dtype]


@pytest.mark.skipif(not _ext.LOADED, reason="needs the C++ extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "geometry",
    [
        (16, 3, 20, 20, 12, 3, 3, 1, 1, 1, 1),  # tasks of samples
        (4, 8, 16, 16, 29, 3, 3, 1, 0, 1, 1),  # a block of 8 channels (no lane of it empty)
        (3, 2, 9, 31, 14, 5, 5, 1, 2, 1, 1),  # odd samples over two threads
        (3, 33, 17, 16, 9, 3, 3, 1, 1, 2, 2),  # pooled, few outputs: the unpooled gradient
    ],
)
def test_flat_grad_input_threads(geometry, dtype):
    """The input gradient without pooling of few input channels, and of pooled layers with few
    outputs from deep inputs (flat_grad_input: blocks of channels, tasks of samples over the
    threads): on one thread and on two, bitwise the same, with the weight's gradient asked for
    or not, and the reference's."""
    x, weight, bias, conv = conv_inputs(geometry, dtype, requires_grad=False)
    conv = [list(v) for v in conv]
    out, codes = torch.ops.fastlenet.conv_relu_pool_fwd.default(x, weight, bias, *conv)
    args = (torch.randn_like(out), codes, x, weight, *conv)
    bwd = torch.ops.fastlenet.conv_relu_pool_bwd.default
    torch.set_num_threads(1)  # conftest's _seed_and_threads restores the count
    alone = bwd(*args, True, True)[0]
    torch.set_num_threads(2)
    assert torch.equal(bwd(*args, True, True)[0], alone)
    assert torch.equal(bwd(*args, True, False)[0], alone)
    want = reference.conv_relu_pool_bwd(*[t.double() for t in args[:4]], *conv, True, False)[0]
    assert rel_err(alone, want) < TOL[dtype]


@pytest.mark.skipif(not _ext.LOADED, reason="needs the C++ extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "name",
    [
        "no_pool",
        "flat_rows",
        "flat_wide",
        "no_pool_dnn_large",
        "no_pool_dnn_deep",
        "tap_gemm_no_pool",
        "odd",
        "cl_conv",
    ],
)
def test_infer_op_is_forward_output(name, dtype):
    """conv_relu_pool_infer, the CPU path under no_grad: bitwise the forward op's output, a NaN
    and an Inf in the input included, without pooling (flat_forward with no argmax, few and many
    input channels; ATen's conv and the ReLU in place with none; the tap GEMM's layers through
    the forward) and pooled (the forward's kernels)."""
    x, weight, bias, conv = conv_inputs(CONV[name], dtype, requires_grad=False)
    x.view(-1)[x.numel() // 3] = float("nan")
    x.view(-1)[-1] = float("inf")
    conv = [list(v) for v in conv]
    out, _ = torch.ops.fastlenet.conv_relu_pool_fwd.default(x, weight, bias, *conv)
    got = torch.ops.fastlenet.conv_relu_pool_infer.default(x, weight, bias, *conv)
    assert out.isnan().any() and (out > 0).any()
    torch.testing.assert_close(got, out, rtol=0, atol=0, equal_nan=True)
    assert got.stride() == out.stride()


@pytest.mark.skipif(not _ext.LOADED, reason="needs the C++ extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "geometry",
    [
        (16, 3, 20, 20, 12, 3, 3, 1, 1, 1, 1),  # tasks of samples
        (1, 3, 32, 32, 29, 3, 3, 1, 1, 1, 1),  # one sample: tasks of 5 channel blocks
        (3, 2, 9, 31, 14, 5, 5, 1, 2, 1, 1),  # 3 samples of 2 channel blocks
        (3, 37, 9, 10, 22, 5, 5, 1, 2, 1, 1),  # 37 input channels: 3 samples of 3 blocks
        (3, 33, 14, 14, 13, 3, 3, 1, 1, 2, 2),  # pooled (flat_pool_forward): 3 samples of 2 blocks
        (5, 32, 12, 13, 6, 3, 3, 1, 0, 3, 2),  # pooled, pool 3: 5 samples of one block
    ],
)
def test_flat_forward_threads(geometry, dtype):
    """The forward without pooling (flat_forward: few input channels, or counts off oneDNN's
    blocks) and the pooled one of few outputs over large planes (flat_pool_forward) split
    (sample, channel block) tasks over the threads, each thread prefetching its next sample:
    on one thread and on two, bitwise the same output and codes (each conv output one chain
    of multiply-adds in tap order), and the reference's."""
    x, weight, bias, conv = conv_inputs(geometry, dtype, requires_grad=False)
    fwd = torch.ops.fastlenet.conv_relu_pool_fwd.default
    conv = [list(v) for v in conv]
    torch.set_num_threads(1)  # conftest's _seed_and_threads restores the count
    alone = fwd(x, weight, bias, *conv)
    torch.set_num_threads(2)
    out = fwd(x, weight, bias, *conv)
    assert torch.equal(out[0], alone[0]) and torch.equal(out[1], alone[1])
    ref = reference.conv_relu_pool2d(x.double(), weight.double(), bias.double(), *conv)
    assert rel_err(out[0], ref) < TOL[dtype]


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3),
    c=st.integers(32, 40),
    o=st.integers(1, 16),
    k=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    size=st.tuples(st.integers(12, 20), st.integers(12, 20)),
    half_padding=st.booleans(),
    pool=st.sampled_from([2, 3]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_random_flat_pool(n, c, o, k, size, half_padding, pool, dtype):
    """Pooled layers of few outputs from deep inputs over planes of at least 144 conv outputs
    (flat_pool_forward where flat_pool_suits in csrc/conv_relu_pool_cpu_flat_pool.h takes them:
    3x3 kernels or fewer than 16 outputs; the tap GEMM and ATen's conv the others; their input
    gradient flat_grad_input's where flat_pool_grad_input_suits): the output against the
    reference, and the gradients against the reference's given the forward's own argmax (a
    near-tie of a window's values may pick another position in float64)."""
    if not _ext.LOADED:
        pytest.fail(_ext.LOAD_ERROR)
    padding = (k[0] // 2, k[1] // 2) if half_padding else (0, 0)
    geometry = (n, c, *size, o, *k, 1, padding, pool, 2)
    x, weight, bias, conv = conv_inputs(geometry, dtype, requires_grad=False)
    conv = [list(v) for v in conv]
    out, argmax = torch.ops.fastlenet.conv_relu_pool_fwd.default(x, weight, bias, *conv)
    ref = reference.conv_relu_pool2d(x.double(), weight.double(), bias.double(), *conv)
    assert rel_err(out, ref) < TOL[dtype]
    grad = torch.randn_like(out)
    got = torch.ops.fastlenet.conv_relu_pool_bwd.default(grad, argmax, x, weight, *conv, True, True)
    want = reference.conv_relu_pool_bwd(
        grad.double(), argmax, x.double(), weight.double(), *conv, True, True
    )
    for g1, g2 in zip(got, want, strict=True):
        assert rel_err(g1, g2) < TOL[dtype]
