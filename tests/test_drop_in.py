"""What a user of stock layers can observe, and fastlenet must match: second-order gradients,
exception types, memory formats, nn.Conv2d's constructor arguments, half precision,
torch.autocast and torch.func's transforms."""

import warnings

import geometry
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CPU_BACKENDS, rel_err
from torch import nn

import fastlenet
from fastlenet import backends
from fastlenet.functional import conv_relu_pool2d, linear, linear_relu
from fastlenet.models import FashionCNN, LeNet5

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


@pytest.mark.parametrize(
    ("backend", "relu"), geometry.backend_cases(geometry.BACKENDS, (True, False))
)
def test_an_output_changed_in_place_before_backward_is_stock(backend, relu):
    """Stock's plain linear saves no output, so its output may change in place before backward
    (logits / temperature); its ReLU saves its output, so there it raises. The same here."""
    x, weight, bias = geometry.linear_inputs((5, 7, 6), torch.float64, geometry.device(backend))
    fn = linear_relu if relu else linear

    def stock(*args):
        return F.relu(F.linear(*args)) if relu else F.linear(*args)

    grads = []
    for f in (stock, lambda *args: fn(*args, backend=backend)):
        out = f(x, weight, bias).mul_(2)
        if relu:
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                out.sum().backward()
            continue
        grads.append(torch.autograd.grad(out.square().sum(), (x, weight, bias)))
    for a, b in zip(*grads, strict=True):
        assert rel_err(a, b) < 1e-12


class _GivesNoGradient(torch.autograd.Function):
    """Passes its input on; its backward gives it no gradient (None)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return None


def _no_gradient_fns(backend):
    """(stock, fastlenet) pairs of functions of (x, weight, bias)."""
    return {
        "conv_relu_pool": (
            lambda *a: F.max_pool2d(F.relu(F.conv2d(*a)), 2),
            lambda *a: conv_relu_pool2d(*a, backend=backend),
        ),
        "conv_relu": (
            lambda *a: F.relu(F.conv2d(*a)),
            lambda *a: conv_relu_pool2d(*a, pool_size=1, backend=backend),
        ),
        "linear_relu": (
            lambda *a: F.relu(F.linear(*a)),
            lambda *a: linear_relu(*a, backend=backend),
        ),
        "linear": (F.linear, lambda *a: linear(*a, backend=backend)),
    }


@pytest.mark.parametrize(
    ("backend", "fn"), geometry.backend_cases(geometry.BACKENDS, list(_no_gradient_fns("cpu")))
)
def test_no_gradient_from_after_leaves_none_as_stock(backend, fn):
    """Where a Function after the op gives it no gradient, stock's nodes give none on: input,
    weight and bias keep .grad None (a zero-filled gradient would read as a gradient of 0).
    Twice: the first call of a backend takes the Python Function, later ones the C++ node."""
    stock, ours = _no_gradient_fns(backend)[fn]
    conv = fn.startswith("conv")
    make = geometry.conv_inputs if conv else geometry.linear_inputs
    shape = (2, 3, 8, 8, 4, 3, 3) if conv else (5, 7, 6)
    for f in (stock, ours, ours):
        x, weight, bias = make(shape, torch.float64, geometry.device(backend))[:3]
        _GivesNoGradient.apply(f(x, weight, bias)).sum().backward()
        assert (x.grad, weight.grad, bias.grad) == (None, None, None)


def test_no_gradient_from_after_the_chain_leaves_none_as_stock():
    torch.manual_seed(0)
    model = LeNet5(fused=True, backend="cpu")
    x = torch.randn(2, 1, 32, 32, requires_grad=True)
    for _ in range(2):  # the second call on the chain
        out = model(x)
        _GivesNoGradient.apply(out).sum().backward()
        assert x.grad is None and all(p.grad is None for p in model.parameters())
    assert fastlenet.chain.on_chain(out)


@pytest.mark.parametrize("relu_last", [False, True])
def test_chain_logits_changed_in_place_before_backward_are_stock(relu_last):
    """The chain saves its output only where a ReLU last reads it, as stock's layers do."""
    torch.manual_seed(0)
    last = fastlenet.nn.LinearReLU(400, 10) if relu_last else fastlenet.nn.Linear(400, 10)
    model = fastlenet.nn.Sequential(
        fastlenet.nn.ConvReLUPool2d(1, 4, 5), torch.nn.Flatten(), last
    ).double()
    stock = nn.Sequential(nn.Conv2d(1, 4, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
    stock.append(nn.Linear(400, 10))
    if relu_last:
        stock.append(nn.ReLU())
    stock = stock.double()
    stock.load_state_dict(model.state_dict(), strict=False)
    stock[4].load_state_dict(last.state_dict())
    x = torch.randn(3, 1, 24, 24, **F64)
    model(x)  # a shape's first call checks layer by layer; the next takes the chain
    grads = []
    for m in (model, stock):
        out = m(x)
        out.div_(2)
        if relu_last:
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                out.sum().backward()
            continue
        out.square().sum().backward()
        grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads, strict=True):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("model", ["linear_relu", "conv_relu_pool", "lenet5"])
def test_input_gradient_of_a_frozen_network_keeps_its_graph(model, backend):
    """Every weight frozen, create_graph: stock's input gradient still has a graph (through
    ReLU's backward, which reads its output), whose derivative is zero; so here."""
    torch.manual_seed(0)
    if model == "lenet5":
        fused, x = LeNet5(fused=True, backend=backend).double(), torch.randn(2, 1, 32, 32, **F64)
        stock = LeNet5(fused=False).double()
        fused(x)  # a shape's first call checks layer by layer; the next takes the chain
    elif model == "conv_relu_pool":
        fused = fastlenet.ConvReLUPool2d(2, 3, 3, backend=backend).double()
        x = torch.randn(2, 2, 8, 8, **F64)
        stock = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.MaxPool2d(2)).double()
    else:
        fused, x = fastlenet.LinearReLU(6, 4, backend=backend).double(), torch.randn(3, 6, **F64)
        stock = nn.Sequential(nn.Linear(6, 4), nn.ReLU()).double()
    (stock if model == "lenet5" else stock[0]).load_state_dict(fused.state_dict())
    for m in (fused, stock):
        m.requires_grad_(False)
        xi = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(m(xi).sum(), xi, create_graph=True)
        assert g.requires_grad
        g.square().sum().backward()
        assert torch.equal(xi.grad, torch.zeros_like(x))


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


def _matches_stock(x, weight, bias, pool, backend, layout):
    """conv_relu_pool2d's output and every gradient equal stock's composition's, in value and
    in layout(t); returns stock's output."""
    got = conv_relu_pool2d(x, weight, bias, pool_size=pool, backend=backend)
    want = _stock_conv(x, weight, bias, pool=pool)
    assert layout(got) == layout(want)
    assert rel_err(got, want) < 1e-12
    grad = torch.randn(want.shape, **F64)
    got_g = torch.autograd.grad(got, (x, weight, bias), grad)
    want_g = torch.autograd.grad(want, (x, weight, bias), grad)
    for g, w in zip(got_g, want_g, strict=True):
        assert layout(g) == layout(w)
        assert rel_err(g, w) < 1e-12
    return want


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
    want = _matches_stock(x, weight, bias, pool, backend, _layout)
    assert _layout(want) == "channels_last"


def test_channels_last_module():
    torch.manual_seed(0)
    fused = fastlenet.ConvReLUPool2d(3, 8, 5).to(memory_format=torch.channels_last)
    stock = nn.Conv2d(3, 8, 5).to(memory_format=torch.channels_last)
    stock.load_state_dict(fused.state_dict())
    x = torch.randn(4, 3, 16, 16)
    got, want = fused(x), F.max_pool2d(F.relu(stock(x)), 2)
    assert _layout(got) == _layout(want) == "channels_last"
    assert rel_err(got, want) < 1e-5


# Inputs and weights whose layout stock's convolution reads from their strides alone: size-1
# dimensions make a tensor both contiguous and channels_last-contiguous, and only the strides tell
# which one ATen suggests (c10's is_channels_last_strides_2d_s4). `.to(memory_format=...)` sets
# the strides of size-1 dimensions too; `.contiguous(memory_format=...)` leaves such a tensor
# as it is.


def _dense_strides(t):
    """t's layout as a user can observe it: the strides of its dimensions longer than one (a
    size-1 dimension's stride addresses nothing; stock's own kernels disagree on it)."""
    return tuple(s if n > 1 else None for n, s in zip(t.shape, t.stride(), strict=True))


CL, PLAIN = torch.channels_last, torch.contiguous_format
STRIDED_LAYOUTS = {
    "one channel, to channels_last": lambda t: t.to(memory_format=CL),
    "one channel, plain": lambda t: t.to(memory_format=CL).to(memory_format=PLAIN),
    "first of dim 0, to channels_last": lambda t: t[:1].to(memory_format=CL),
    "channels_last, columns sliced": lambda t: t.to(memory_format=CL)[..., ::2],
    "plain, channels sliced": lambda t: torch.cat([t, t], 1)[:, ::2],
}


def _strided_case(layout, where, channels):
    (x, weight, bias), _ = _conv_case((2, channels, 12, 12, 4, 3, 3), seed=3)
    make = STRIDED_LAYOUTS[layout]
    if where in ("input", "both"):
        x = make(x.detach()).requires_grad_()
    if where in ("weight", "both"):
        weight = make(weight.detach()).requires_grad_()
        bias = bias.detach()[: weight.shape[0]].requires_grad_()  # one output channel left
    return x, weight, bias


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("where", ["input", "weight", "both"])
@pytest.mark.parametrize("layout", STRIDED_LAYOUTS)
@pytest.mark.parametrize("pool", [2, 1])
def test_strides_follow_stock(layout, where, pool, backend):
    channels = 1 if layout.startswith("one channel") else 3
    x, weight, bias = _strided_case(layout, where, channels)
    want = _matches_stock(x, weight, bias, pool, backend, _dense_strides)
    with torch.no_grad():  # the inference path
        inferred = conv_relu_pool2d(x, weight, bias, pool_size=pool, backend=backend)
    assert _dense_strides(inferred) == _dense_strides(want)


def test_channels_last_lenet5_follows_stock():
    """LeNet-5 and its input converted to channels_last: conv1's one input channel leaves its
    input and weight contiguous, which stock's conv still reads as channels_last; the chain must
    not take them as plain NCHW (its parameters' gradients would come out NCHW)."""
    torch.manual_seed(0)
    fused = LeNet5(fused=True).to(memory_format=CL)
    stock = LeNet5(fused=False).to(memory_format=CL)
    stock.load_state_dict(fused.state_dict())
    x = torch.randn(8, 1, 32, 32).to(memory_format=CL)
    y = torch.randint(0, 10, (8,))
    for _ in range(2):  # the first call of a shape runs the layers' checks, the second the chain
        for model in (fused, stock):
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
        for (name, p), q in zip(fused.named_parameters(), stock.parameters(), strict=True):
            assert _dense_strides(p.grad) == _dense_strides(q.grad), name
            assert rel_err(p.grad, q.grad) < 1e-4, name
    seen = {}
    fused.conv1.register_forward_hook(lambda m, i, o: seen.update(fused=o))
    stock.conv1.register_forward_hook(lambda m, i, o: seen.update(stock=o))
    fused(x), stock(x)
    want = F.max_pool2d(F.relu(seen["stock"]), 2)
    assert want.is_contiguous(memory_format=CL) and not want.is_contiguous()
    assert _dense_strides(seen["fused"]) == _dense_strides(want)


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


def test_conv_attributes_tools_read_are_stock():
    """nn.Conv2d's attributes that model summaries and FLOP counters read."""
    layer = fastlenet.ConvReLUPool2d(3, 4, 5, stride=2, padding=1)
    stock = nn.Conv2d(3, 4, 5, stride=2, padding=1)
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                 "groups", "padding_mode", "transposed", "output_padding"):  # fmt: skip
        assert getattr(layer, name) == getattr(stock, name), name


def test_integers_of_other_types_are_taken_as_stock_takes_them():
    """Sizes computed with NumPy (np.prod(shape), np.int64) or given as integer tensors."""
    three, four = np.int64(3), torch.tensor(4)
    conv = fastlenet.ConvReLUPool2d(three, four, three, stride=np.int64(1), padding=[1, three])
    stock = nn.Conv2d(three, four, three, stride=np.int64(1), padding=(1, 3))
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (3, 4, (3, 3))
    assert conv.padding == (1, 3) and conv.weight.shape == stock.weight.shape
    linear_layer = fastlenet.Linear(np.int64(6), four)
    assert linear_layer.weight.shape == nn.Linear(np.int64(6), four).weight.shape == (4, 6)
    stock.load_state_dict(conv.state_dict())
    x = torch.randn(2, 3, 8, 8)
    assert rel_err(conv(x), F.max_pool2d(F.relu(stock(x)), 2)) < 1e-5


@pytest.mark.parametrize("layer", [fastlenet.Linear, fastlenet.LinearReLU])
@pytest.mark.parametrize(("in_features", "out_features"), [(0, 3), (4, 0)])
def test_linear_layers_without_features_are_stock(layer, in_features, out_features):
    """nn.Linear(0, n) and nn.Linear(n, 0): an empty weight; out = bias, or an empty output."""
    torch.manual_seed(0)
    fused = layer(in_features, out_features).double()
    stock = nn.Linear(in_features, out_features).double()
    stock.load_state_dict(fused.state_dict())
    xa = torch.randn(5, in_features, **F64, requires_grad=True)
    xb = xa.detach().clone().requires_grad_()
    out = fused(xa)
    want = stock(xb).relu() if layer is fastlenet.LinearReLU else stock(xb)
    assert out.shape == want.shape and torch.equal(out, want)
    g = torch.randn_like(out)
    out.backward(g)
    want.backward(g)
    assert torch.equal(xa.grad, xb.grad)
    for p, q in zip(fused.parameters(), stock.parameters(), strict=True):
        assert p.grad.shape == q.grad.shape and rel_err(p.grad, q.grad) < 1e-12


TRACED = {
    "conv_relu_pool": (lambda: fastlenet.ConvReLUPool2d(2, 4, 3), (2, 10, 10)),
    "linear_relu": (lambda: fastlenet.LinearReLU(8, 4), (8,)),
    "linear": (lambda: fastlenet.Linear(8, 4), (8,)),
    "lenet5": (LeNet5, (1, 32, 32)),
}


def _outputs_and_grads(model, x):
    x = x.clone().requires_grad_()
    out = model(x)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(out.square().sum(), [x, *params.values()])
    return out, dict(zip(["input", *params], grads, strict=True))


@pytest.mark.parametrize("name", TRACED)
def test_a_jit_trace_trains_as_eager(name):
    """torch.jit.trace of a layer, or of LeNet-5 (whose chain steps aside while tracing): the
    trace holds the forward ops, whose autograd kernel records their node, so the traced module
    gives eager's outputs and gradients, at another batch size too, and its check passes; the
    layers' checks raise no TracerWarning."""
    make, size = TRACED[name]
    torch.manual_seed(0)
    model = make().double()
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated
        traced = torch.jit.trace(model, torch.randn(2, *size, **F64))
    assert not any(n.kind().startswith("prim::PythonOp") for n in traced.graph.nodes())
    x = torch.randn(5, *size, **F64)
    out, grads = _outputs_and_grads(traced, x)
    want, want_grads = _outputs_and_grads(model, x)
    assert torch.equal(out, want)
    for key, g in want_grads.items():
        assert rel_err(grads[key], g) < 1e-12, key


@pytest.mark.parametrize("name", [*TRACED, "fused stock lenet5"])
def test_fx_symbolic_trace_runs_as_eager(name):
    """torch.fx.symbolic_trace through fastlenet's layers (fx keeps only torch.nn's whole)
    records their functions as nodes; the graph module computes eager's outputs and
    gradients. A fused model's chain traces through its layers too."""
    if name == "fused stock lenet5":
        make, size = (lambda: fastlenet.fuse(LeNet5(fused=False))), (1, 32, 32)
    else:
        make, size = TRACED[name]
    torch.manual_seed(0)
    model = make().double()
    graph_module = torch.fx.symbolic_trace(model)
    x = torch.randn(3, *size, **F64)
    out, grads = _outputs_and_grads(graph_module, x)
    want, want_grads = _outputs_and_grads(model, x)
    assert rel_err(out, want) < 1e-12
    for key, g in want_grads.items():
        assert rel_err(grads[key], g) < 1e-12, key


def test_an_exported_lenet5_trains_as_eager():
    """torch.export.export(LeNet5).module(): its graph holds the forward ops, which train."""
    torch.manual_seed(0)
    model = LeNet5().double()
    x = torch.randn(3, 1, 32, 32, **F64)
    exported = torch.export.export(model, (x,)).module()
    out, grads = _outputs_and_grads(exported, x)
    want, want_grads = _outputs_and_grads(model, x)
    assert rel_err(out, want) < 1e-12
    assert grads.keys() == want_grads.keys()
    for key, g in want_grads.items():
        assert rel_err(grads[key], g) < 1e-12, key


def _counted_flops(fn):
    import fastlenet.flops  # noqa: F401  (registers the FLOP formulas)

    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("model", ["lenet5", "conv_relu_pool", "linear_relu"])
def test_flop_counter_counts_what_stock_counts(model):
    """FlopCounterMode on a fused model counts its stock twin's FLOPs: forward (with and
    without autograd recording) and forward + backward, through the chain too."""
    torch.manual_seed(0)
    if model == "lenet5":
        fused, stock, x = LeNet5(), LeNet5(fused=False), torch.randn(4, 1, 32, 32)
        fused(x)  # a shape's first call checks layer by layer; the next takes the chain
    elif model == "conv_relu_pool":
        fused, x = fastlenet.ConvReLUPool2d(6, 16, 5), torch.randn(4, 6, 14, 14)
        stock = nn.Sequential(nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2))
    else:
        fused, x = fastlenet.LinearReLU(400, 120), torch.randn(4, 400)
        stock = nn.Sequential(nn.Linear(400, 120), nn.ReLU())
    x.requires_grad_()
    counts = []
    for m in (fused, stock):
        counts.append([_counted_flops(lambda m=m: m(x).sum().backward())])
        counts[-1].append(_counted_flops(lambda m=m: m(x)))
        with torch.no_grad():
            counts[-1].append(_counted_flops(lambda m=m: m(x)))
    assert counts[0] == counts[1] and min(counts[1]) > 0


HALF = [torch.bfloat16, torch.float16]


def _stock_twin(fused_net):
    """fused_net (fastlenet.nn.Sequential of ConvReLUPool2d, Flatten, LinearReLU, Linear)
    written with stock layers, from the same weights."""
    stock = nn.Sequential(
        nn.Conv2d(3, 8, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(8 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 10),
    )  # fmt: skip
    fused_state = list(fused_net.state_dict().values())
    stock.load_state_dict(dict(zip(stock.state_dict(), fused_state, strict=True)))
    return stock


def _fused_net():
    return fastlenet.nn.Sequential(
        fastlenet.ConvReLUPool2d(3, 8, 5, padding=2),
        nn.Flatten(),
        fastlenet.LinearReLU(8 * 8 * 8, 16),
        fastlenet.Linear(16, 10),
    )


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precision_on_cpu_is_stock(dtype):
    """A network moved to bfloat16 or float16 on the CPU runs as stock's does. The CPU kernels
    take float32 and float64; backend "auto" gives other dtypes to the reference, which is
    stock's own ops: the output and every gradient equal stock's, bit for bit (they raised
    before)."""
    torch.manual_seed(0)
    fused = _fused_net()
    stock = _stock_twin(fused)
    fused, stock = fused.to(dtype), stock.to(dtype)
    x = torch.randn(4, 3, 16, 16, dtype=dtype, requires_grad=True)
    got, want = fused(x), stock(x)
    assert got.dtype == want.dtype == dtype
    assert torch.equal(got, want)
    grad = torch.randn_like(want)
    got_g = torch.autograd.grad(got, (x, *fused.parameters()), grad)
    want_g = torch.autograd.grad(want, (x, *stock.parameters()), grad)
    for g, w in zip(got_g, want_g, strict=True):
        assert g.dtype == w.dtype == dtype
        assert torch.equal(g, w)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("model", [LeNet5, FashionCNN], ids=["lenet5", "fashion-cnn"])
def test_autocast_matches_stock(model, dtype):
    """Under torch.autocast on the CPU the fused layers cast as stock's conv2d and linear do
    (float32 inputs and parameters to the autocast dtype): the chain and the CPU fast paths
    step aside, and the output (its dtype too) and the float32 parameters' gradients equal the
    same network's with stock layers, bit for bit; inference as well. Before, the ops ran in
    float32 and returned float32 under autocast."""
    torch.manual_seed(0)
    fused, stock = model(), model(fused=False)
    stock.load_state_dict(fused.state_dict())
    x = torch.randn(8, *model.input_size)
    labels = torch.randint(0, 10, (8,))
    fused(x), fused(x)  # outside autocast: the backend resolved and the chain's key checked
    assert fastlenet.chain.on_chain(fused(x))
    for net in (fused, stock):
        net.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            out = net(x)
            loss = F.cross_entropy(out, labels)
        loss.backward()
        net.out = out
    assert fused.out.dtype == stock.out.dtype == dtype
    assert not fastlenet.chain.on_chain(fused.out)
    assert torch.equal(fused.out, stock.out)
    for p, q in zip(fused.parameters(), stock.parameters(), strict=True):
        assert p.grad.dtype == q.grad.dtype == torch.float32
        assert torch.equal(p.grad, q.grad)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        got, want = fused(x), stock(x)
    assert got.dtype == dtype
    assert torch.equal(got, want)
    assert fastlenet.chain.on_chain(fused(x))  # autocast off again: the chain again


@pytest.mark.parametrize("fn", [linear_relu, linear])
def test_autocast_casts_single_functions(fn):
    """The functional ops under torch.autocast, once the CPU fast path's backend is resolved:
    stock's dtype and values. Where autocast does not cast (float64), the CPU kernels run."""
    torch.manual_seed(0)
    x, w, b = torch.randn(6, 20), torch.randn(12, 20), torch.randn(12)
    fn(x, w, b)  # resolves the backend: the next calls would take the fast path
    stock = (lambda *a: F.relu(F.linear(*a))) if fn is linear_relu else F.linear
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = fn(x, w, b), stock(x, w, b)
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, want)
        x64, w64, b64 = (t.double() for t in (x, w, b))
        assert fn(x64, w64, b64).dtype == torch.float64
        assert rel_err(fn(x64, w64, b64), stock(x64, w64, b64)) < 1e-12
    xs, ws, bs = torch.randn(2, 3, 10, 10), torch.randn(4, 3, 3, 3), torch.randn(4)
    conv_relu_pool2d(xs, ws, bs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = conv_relu_pool2d(xs, ws, bs)
        want = F.max_pool2d(F.relu(F.conv2d(xs, ws, bs)), 2)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)


def test_auto_backend_gives_half_precision_to_the_reference(monkeypatch):
    """resolve(): "auto" passes over the CPU kernels for dtypes they do not take; a backend
    named outright (as an argument or FASTLENET_BACKEND) is kept, and its op names the dtype."""
    cpu = torch.device("cpu")
    assert backends.resolve("auto", cpu, torch.float32) == "cpu"
    assert backends.resolve("auto", cpu, torch.float64) == "cpu"
    assert backends.resolve("auto", cpu, torch.bfloat16) == "reference"
    assert backends.resolve("cpu", cpu, torch.bfloat16) == "cpu"
    monkeypatch.setenv(backends.ENV_VAR, "cpu")
    backends.refresh()
    try:
        assert backends.resolve("auto", cpu, torch.float16) == "cpu"
        with pytest.raises(RuntimeError, match="input must be float32 or float64"):
            linear_relu(torch.randn(2, 3).half(), torch.randn(4, 3).half())
    finally:
        monkeypatch.delenv(backends.ENV_VAR)
        backends.refresh()


def test_torch_func_transforms_match_stock():
    """torch.func's transforms over the fused ops (grad, vmap, jvp, hessian) equal stock's bit
    for bit: under a transform the ops run stock's composition, as the C++ nodes and autograd
    Functions define no vmap or jvp rule (before, grad raised). The backend is resolved first,
    so that the CPU fast paths would take the calls."""
    torch.manual_seed(0)
    x, w, b = torch.randn(4, 2, 12, 12), torch.randn(3, 2, 3, 3), torch.randn(3)
    conv_relu_pool2d(x, w, b)
    ours = lambda w: conv_relu_pool2d(x, w, b).sum()  # noqa: E731
    stock = lambda w: _stock_conv(x, w, b).sum()  # noqa: E731
    assert torch.equal(torch.func.grad(ours)(w), torch.func.grad(stock)(w))
    tangent = torch.randn_like(w)
    for got, want in zip(
        torch.func.jvp(ours, (w,), (tangent,)), torch.func.jvp(stock, (w,), (tangent,)), strict=True
    ):
        assert torch.equal(got, want)
    got = torch.func.vmap(lambda xi: conv_relu_pool2d(xi, w, b))(x)
    assert torch.equal(got, torch.func.vmap(lambda xi: _stock_conv(xi, w, b))(x))
    h, wl = torch.randn(5, 8), torch.randn(4, 8)
    linear_relu(h, wl)
    for fn, ref in ((linear_relu, lambda h, w: F.relu(F.linear(h, w))), (linear, F.linear)):
        got = torch.func.hessian(lambda w_, fn=fn: (fn(h, w_) ** 2).sum())(wl)
        want = torch.func.hessian(lambda w_, ref=ref: (ref(h, w_) ** 2).sum())(wl)
        assert torch.equal(got, want)


def test_per_sample_gradients_match_stock():
    """Per-sample gradients of LeNet-5 the torch.func way (vmap of grad over functional_call)
    equal the stock model's, bit for bit; the chain steps aside under the transforms and takes
    the next plain call again."""
    torch.manual_seed(0)
    fused, stock = LeNet5(), LeNet5(fused=False)
    stock.load_state_dict(fused.state_dict())
    x, labels = torch.randn(6, 1, 32, 32), torch.randint(0, 10, (6,))
    fused(x), fused(x)  # the backend resolved and the chain's key checked
    params = {k: v.detach() for k, v in fused.named_parameters()}

    def per_sample(model):
        def loss(p, xi, yi):
            return F.cross_entropy(torch.func.functional_call(model, p, (xi[None],)), yi[None])

        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, labels)

    got, want = per_sample(fused), per_sample(stock)
    for name, g in got.items():
        assert g.shape == (6, *params[name].shape)
        assert torch.equal(g, want[name])
    assert fastlenet.chain.on_chain(fused(x))


def test_forward_mode_ad_matches_stock():
    """Dual tensors of torch.autograd.forward_ad through the fused ops and LeNet-5: the output's
    tangent is stock's, bit for bit. The Functions and C++ nodes have no jvp rule, so under a
    dual level the ops run stock's composition; before, the fast paths returned no tangent at
    all (a silently wrong jvp)."""
    import torch.autograd.forward_ad as fwad

    torch.manual_seed(0)
    fused, stock = LeNet5(), LeNet5(fused=False)
    stock.load_state_dict(fused.state_dict())
    x, tangent = torch.randn(4, 1, 32, 32), torch.randn(4, 1, 32, 32)
    h, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
    xc, wc = torch.randn(2, 2, 10, 10), torch.randn(4, 2, 3, 3)
    fused(x), fused(x), linear_relu(h, w, b), conv_relu_pool2d(xc, wc)  # the fast paths resolved
    cases = [
        (fused, stock, x, tangent),
        (lambda t: linear_relu(t, w, b), lambda t: F.relu(F.linear(t, w, b)), h, torch.randn(3, 8)),
        (lambda t: linear(t, w, b), lambda t: F.linear(t, w, b), h, torch.randn(3, 8)),
        (lambda t: conv_relu_pool2d(t, wc), lambda t: _stock_conv(t, wc, None), xc, xc.flip(0)),
    ]
    for ours, theirs, primal, tan in cases:
        with fwad.dual_level():
            got = fwad.unpack_dual(ours(fwad.make_dual(primal, tan)))
            want = fwad.unpack_dual(theirs(fwad.make_dual(primal, tan)))
        assert got.tangent is not None
        assert torch.equal(got.primal, want.primal)
        assert torch.equal(got.tangent, want.tangent)
    assert fastlenet.chain.on_chain(fused(x))
