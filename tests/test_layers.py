"""The drop-in layers: parameters, init, state_dict and repr as the stock layers; the public
API's backend selection; torch.compile(fullgraph=True) through the registered ops."""

import importlib.util
import subprocess
import sys

import pytest
import torch
from conftest import rel_err
from torch import nn

import fastlenet
from fastlenet import _ext, backends


def _same_init(fused_cls, stock_cls, *args, **kwargs):
    torch.manual_seed(123)
    stock = stock_cls(*args, **kwargs)
    torch.manual_seed(123)
    fused = fused_cls(*args, **kwargs)
    return fused, stock


@pytest.mark.parametrize("bias", [True, False])
def test_conv_layer_matches_nn_conv2d(bias):
    fused, stock = _same_init(
        fastlenet.ConvReLUPool2d, nn.Conv2d, 3, 7, (5, 3), stride=2, padding=1, bias=bias
    )
    assert list(fused.state_dict()) == list(stock.state_dict())
    for key, value in stock.state_dict().items():
        assert torch.equal(fused.state_dict()[key], value)  # same init, same RNG draws
    x = torch.randn(2, 3, 17, 15)
    expected = nn.functional.max_pool2d(torch.relu(stock(x)), 2)
    assert rel_err(fused(x), expected) < 2e-5


@pytest.mark.parametrize("cls", [fastlenet.LinearReLU, fastlenet.Linear])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_layers_match_nn_linear(cls, bias):
    fused, stock = _same_init(cls, nn.Linear, 11, 5, bias=bias)
    assert list(fused.state_dict()) == list(stock.state_dict())
    for key, value in stock.state_dict().items():
        assert torch.equal(fused.state_dict()[key], value)
    x = torch.randn(4, 11)
    expected = stock(x)
    if cls is fastlenet.LinearReLU:
        expected = torch.relu(expected)
    assert rel_err(fused(x), expected) < 2e-5


def test_stock_checkpoint_loads_strict_both_ways():
    stock = nn.Conv2d(6, 16, 5)
    fused = fastlenet.ConvReLUPool2d(6, 16, 5)
    fused.load_state_dict(stock.state_dict(), strict=True)
    assert torch.equal(fused.weight, stock.weight) and torch.equal(fused.bias, stock.bias)
    back = nn.Conv2d(6, 16, 5)
    back.load_state_dict(fused.state_dict(), strict=True)
    assert torch.equal(back.weight, stock.weight)
    lin = nn.Linear(400, 120)
    fused_lin = fastlenet.LinearReLU(400, 120)
    fused_lin.load_state_dict(lin.state_dict(), strict=True)
    assert torch.equal(fused_lin.weight, lin.weight)


def test_factory_kwargs_and_repr():
    layer = fastlenet.ConvReLUPool2d(1, 6, 5, dtype=torch.float64, device="cpu")
    assert layer.weight.dtype == torch.float64 and layer.bias.shape == (6,)
    assert "kernel_size=(5, 5)" in repr(layer) and "pool_size=(2, 2)" in repr(layer)
    lin = fastlenet.nn.LinearReLU(4, 3, bias=False, backend="reference")
    assert lin.bias is None
    assert repr(lin) == "LinearReLU(in_features=4, out_features=3, bias=False, backend='reference')"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"backend": "gpu"}, "backend must be one of"),
        ({"pool_size": 0}, "pool_size must be >= 1"),
        ({"stride": (1, 0)}, "stride must be >= 1"),
        ({"padding": -1}, "padding must be >= 0"),
        ({"pool_size": 16}, "more than 255 positions"),
        ({"kernel_size": 2.5}, "kernel_size must be an int or a pair"),
    ],
)
def test_bad_layer_arguments(kwargs, message):
    args = {"in_channels": 1, "out_channels": 2, "kernel_size": 3, **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        fastlenet.ConvReLUPool2d(**args)


def test_available_backends_says_why():
    status = fastlenet.available_backends()
    assert set(status) == set(backends.BACKENDS)
    assert status["reference"].available
    assert status["cpu"].available == _ext.LOADED
    if not torch.cuda.is_available():
        assert not status["cuda"].available and status["cuda"].reason
        assert "unavailable (" in repr(status["cuda"])


def test_triton_says_when_its_kernels_are_not_installed(monkeypatch):
    """An in-place build has fastlenet but no fastlenet.kernels: the Triton backend says so
    rather than passing as available and failing at its first call (seen on a GPU machine)."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "fastlenet.kernels" else find_spec(name, *args),
    )
    monkeypatch.setattr(backends, "_STATUS", {})
    status = backends.available_backends()["triton"]
    assert not status.available
    assert "fastlenet.kernels is missing" in status.reason


@pytest.fixture
def env_backend(monkeypatch):
    """Sets FASTLENET_BACKEND and has fastlenet read it; both undone after the test."""

    def set_(value):
        monkeypatch.setenv(backends.ENV_VAR, value)
        backends.refresh()

    yield set_
    monkeypatch.undo()
    backends.refresh()


def test_auto_backend_and_env_override(env_backend):
    cpu = torch.device("cpu")
    expected = "cpu" if _ext.LOADED else "reference"
    assert backends.resolve("auto", cpu) == expected
    env_backend("reference")
    assert backends.resolve("auto", cpu) == "reference"
    assert backends.resolve("cpu", cpu) == "cpu" or not _ext.LOADED
    x = torch.randn(2, 3)
    assert torch.equal(fastlenet.functional.linear(x, torch.eye(3)), x)  # a layer call with it
    env_backend("fastest")
    with pytest.raises(ValueError, match=backends.ENV_VAR):
        backends.resolve("auto", cpu)
    # An error is not remembered as an answer: the second call raises too.
    with pytest.raises(ValueError, match=backends.ENV_VAR):
        backends.resolve("auto", cpu)


def test_resolve_remembers_answers_not_errors():
    cpu = torch.device("cpu")
    first = backends.resolve("auto", cpu)
    assert backends.resolve("auto", cpu) == first
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.resolve(["cpu"], cpu)  # unhashable: checked before the cache is asked
    if _ext.LOADED:
        with pytest.raises(ValueError, match="cannot run on cuda"):
            backends.resolve("cpu", torch.device("cuda"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message seen without a GPU")
def test_unavailable_backend_is_a_clear_error():
    x, w = torch.randn(1, 1, 8, 8), torch.randn(2, 1, 3, 3)
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable: "):
        fastlenet.functional.conv_relu_pool2d(x, w, backend="cuda")


@pytest.mark.skipif(not _ext.LOADED, reason="needs the C++ extension")
def test_compile_fullgraph_lenet5():
    torch.manual_seed(0)
    model = fastlenet.LeNet5(backend="cpu")
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(8, 1, 32, 32)
    target = torch.randint(0, 10, (8,))
    eager_loss = nn.functional.cross_entropy(model(x), target)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    loss = nn.functional.cross_entropy(compiled(x), target)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert rel_err(loss, eager_loss) < 1e-6
    for got, want in zip(grads, eager_grads, strict=True):
        assert rel_err(got, want) < 1e-5


_COMPILE_FIRST = """
import torch, fastlenet
model = fastlenet.LeNet5(backend="cpu")
compiled = torch.compile(model, fullgraph=True)
compiled(torch.randn(4, 1, 32, 32)).sum().backward()
assert model.conv1.weight.grad is not None
"""


@pytest.mark.skipif(not _ext.LOADED, reason="needs the C++ extension")
def test_compile_fullgraph_as_the_first_call():
    """In a fresh process, no eager call before the compiled one: whatever fastlenet builds on
    first use must not be built inside the traced region (a graph break under fullgraph)."""
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_FIRST], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
