"""What a user of stock layers can observe, and fastlenet must match: second-order gradients,
exception types, memory formats and nn.Conv2d's constructor arguments."""

import warnings

import geometry
import pytest
import torch
import torch.nn.functional as F
from conftest import CPU_BACKENDS, rel_err
from torch import nn

import fastlenet
from fastlenet.functional import conv_relu_pool2d, linear, linear_relu
from fastlenet.models import LeNet5

F64 = {"dtype": torch.float64}


def _conv_case(geometry, seed=0):
    n, c, h, w, o, kh, kw, *conv = geometry
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen, **F64)
    weight = torch.randn(o, c, kh, kw, generator=gen, **F64)
    bias = torch.randn(o, generator=gen, **F64)
    return [t.requires_grad_() for t in (x, weight, bias)], conv


# Rows of the shared table that gradgradcheck can afford (every input element is perturbed;
# fast_mode checks a random projection of the Jacobians): pool 2, pool 3 stride 2 with odd
# sizes, no pool, strides and padding everywhere, pool_stride > pool_size.
GRADGRAD_ROWS = ("tiny", "no_pool", "pool_gaps", "odd_small", "strides")


@pytest.mark.parametrize(("backend", "name"), geometry.conv_cases(geometry.BACKENDS, GRADGRAD_ROWS))
def test_conv_gradgradcheck(backend, name):
    x, weight, bias, conv = geometry.conv_inputs(
        geometry.CONV[name], torch.float64, geometry.device(backend)
    )

    def fn(x, weight, bias):
        return conv_relu_pool2d(x, weight, bias, *conv, backend=backend)

    # The second derivative is the reference's (fastlenet/_autograd.py): on CUDA, cuDNN's
    # convolution backward, whose default algorithms may sum in another order on every call
    # (seen on an H200 at three rows). gradgradcheck wants two backward calls bitwise equal, so
    # cuDNN is held to its deterministic algorithms, as stock's conv2d would have to be.
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        assert torch.autograd.gradgradcheck(fn, (x, weight, bias), fast_mode=True)


@pytest.mark.parametrize(
    ("backend", "relu"), geometry.backend_cases(geometry.BACKENDS, (True, False))
)
def test_linear_gradgradcheck(backend, relu):
    x, weight, bias = geometry.linear_inputs((5, 7, 6), torch.float64, geometry.device(backend))
    fn = linear_relu if relu else linear
    assert torch.autograd.gradgradcheck(lambda *a: fn(*a, backend=backend), (x, weight, bias))


def _grads_with_penalty(model, x, y):
    """Cross-entropy plus the squared norm of its gradient with respect to the input (the
    input-gradient regulariser): every parameter's gradient goes through a second backward."""
    x = x.clone().requires_grad_()
    loss = F.cross_entropy(model(x), y)
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    (loss + 10.0 * gx.pow(2).sum()).backward()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradient_penalty_step_matches_stock(backend):
    torch.manual_seed(0)
    fused = LeNet5(fused=True, backend=backend).double()
    stock = LeNet5(fused=False).double()
    stock.load_state_dict(fused.state_dict())
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.05, momentum=0.9)
    opt_s = torch.optim.SGD(stock.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        x, y = torch.randn(8, 1, 32, 32, **F64), torch.randint(0, 10, (8,))
        got, want = _grads_with_penalty(fused, x, y), _grads_with_penalty(stock, x, y)
        for name, g in want.items():
            assert rel_err(got[name], g) < 1e-10, name
        opt_f.step()
        opt_s.step()
        opt_f.zero_grad()
        opt_s.zero_grad()
    for (name, p), q in zip(fused.named_parameters(), stock.parameters(), strict=True):
        assert rel_err(p, q) < 1e-10, name


def _stock_conv(x, weight, bias, stride=1, padding=0, pool=2):
    return F.max_pool2d(F.relu(F.conv2d(x, weight, bias, stride, padding)), pool)


# Mistakes for which stock raises RuntimeError: fastlenet's error is a RuntimeError too (and
# the ValueError / TypeError it always was).
BAD_CALLS = {
    "channel mismatch": (lambda x, w: (x, w[:, :2]), {}, ValueError),
    "zero stride": (lambda x, w: (x, w), {"stride": 0}, ValueError),
    "negative padding": (lambda x, w: (x, w), {"padding": -1}, ValueError),
    "pool larger than the input": (lambda x, w: (x, w), {"pool": 9}, ValueError),
    "dtype mismatch": (lambda x, w: (x.double(), w), {}, TypeError),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_errors_are_the_runtime_errors_stock_raises(case):
    make, kw, also = BAD_CALLS[case]
    x, weight = make(torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3))
    with pytest.raises(RuntimeError):
        _stock_conv(x, weight, None, **kw)
    kw = {"pool_size" if k == "pool" else k: v for k, v in kw.items()}
    with pytest.raises(RuntimeError) as info:
        conv_relu_pool2d(x, weight, None, **kw)
    assert isinstance(info.value, also)


def test_linear_errors_are_runtime_errors():
    with pytest.raises(RuntimeError):
        F.linear(torch.randn(2, 5), torch.randn(3, 4))
    with pytest.raises(fastlenet.ArgumentError, match="5 features"):
        linear_relu(torch.randn(2, 5), torch.randn(3, 4))


def _layout(t):
    if t.is_contiguous():
        return "contiguous"
    return "channels_last" if t.is_contiguous(memory_format=torch.channels_last) else "strided"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("where", ["input", "weight", "both"])
@pytest.mark.parametrize("pool", [2, 1])
def test_memory_format_follows_stock(where, pool, backend):
    (x, weight, bias), _ = _conv_case((2, 3, 10, 10, 4, 3, 3, 1, 0, 2, 2))
    cl = torch.channels_last
    if where in ("input", "both"):
        x = x.detach().contiguous(memory_format=cl).requires_grad_()
    if where in ("weight", "both"):
        weight = weight.detach().contiguous(memory_format=cl).requires_grad_()
    got = conv_relu_pool2d(x, weight, bias, pool_size=pool, backend=backend)
    want = _stock_conv(x, weight, bias, pool=pool)
    assert _layout(got) == _layout(want) == "channels_last"
    assert rel_err(got, want) < 1e-12
    grad = torch.randn(want.shape, **F64)
    got_g = torch.autograd.grad(got, (x, weight, bias), grad)
    want_g = torch.autograd.grad(want, (x, weight, bias), grad)
    for g, w in zip(got_g, want_g, strict=True):
        assert _layout(g) == _layout(w)
        assert rel_err(g, w) < 1e-12


def test_channels_last_module():
    torch.manual_seed(0)
    fused = fastlenet.ConvReLUPool2d(3, 8, 5).to(memory_format=torch.channels_last)
    stock = nn.Conv2d(3, 8, 5).to(memory_format=torch.channels_last)
    stock.load_state_dict(fused.state_dict())
    x = torch.randn(4, 3, 16, 16)
    got, want = fused(x), F.max_pool2d(F.relu(stock(x)), 2)
    assert _layout(got) == _layout(want) == "channels_last"
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("kernel", [(3, 3), (4, 4), (2, 5)])
def test_string_padding_matches_stock(kernel, padding, backend):
    torch.manual_seed(0)
    fused = fastlenet.ConvReLUPool2d(3, 5, kernel, padding=padding, backend=backend).double()
    stock = nn.Conv2d(3, 5, kernel, padding=padding).double()
    stock.load_state_dict(fused.state_dict())
    assert fused.padding == stock.padding == padding
    assert f"padding={padding!r}" in repr(fused)
    x = torch.randn(2, 3, 11, 10, **F64, requires_grad=True)
    with warnings.catch_warnings():  # stock warns (once) that an even kernel copies the input
        warnings.simplefilter("ignore")
        want = F.max_pool2d(F.relu(stock(x)), 2)
    got = fused(x)
    assert got.shape == want.shape
    assert rel_err(got, want) < 1e-12
    grad = torch.randn(want.shape, **F64)
    leaves = (x, fused.weight, fused.bias)
    got_g = torch.autograd.grad(got, leaves, grad)
    want_g = torch.autograd.grad(want, (x, stock.weight, stock.bias), grad)
    for g, w in zip(got_g, want_g, strict=True):
        assert rel_err(g, w) < 1e-12


def test_stock_defaults_are_accepted():
    layer = fastlenet.ConvReLUPool2d(3, 4, 3, dilation=1, groups=1, padding_mode="zeros")
    assert layer(torch.randn(1, 3, 8, 8)).shape == (1, 4, 3, 3)
