"""fastlenet's dropout against stock's: the same outputs, gradients and generator state, bit for
bit, on the kernel's path (csrc/dropout_cpu.cpp) and on every path it leaves to stock."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastlenet
from fastlenet import _ext
from fastlenet.dropout import dropout

needs_ext = pytest.mark.skipif(not _ext.LOADED, reason="the C++ extension is not built")

# Element counts around the generator's 624-word state (each element takes two words), and a
# dropout layer of pytorch/examples' MNIST Net at batch 4.
SHAPES = [(1,), (311,), (312,), (313,), (3, 5, 7), (1249,), (4, 64, 12, 12)]
# Draws before the dropout (_both): `offset` float64 draws of two words each, and one float32
# draw of one word where it is odd. The dropout then starts at word 0, 3, 1247 (one before a
# refill), 1248 (on one) or 2000 of the stream.
OFFSETS = [0, 1, 623, 624, 1000]


def _both(fn, x, seed, offset):
    """fn(x) for stock's dropout and fastlenet's from the same generator state; each result
    with the generator's state after it."""
    out = []
    for f in (F.dropout, dropout):
        torch.manual_seed(seed)
        torch.rand(offset, dtype=torch.float64)  # each float64 takes two words
        torch.rand(offset % 2)
        out.append((fn(f, x), torch.get_rng_state()))
    return out


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.75])
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_same_output_and_generator_state_as_stock(shape, offset, p, dtype):
    x = torch.randn(shape, dtype=dtype)
    (want, want_state), (got, got_state) = _both(lambda f, t: f(t, p, True), x, 7, offset)
    assert torch.equal(got, want)
    assert torch.equal(got_state, want_state)
    assert 0 < (got == 0).sum() < got.numel() or got.numel() < 20  # it did drop, and keep


@needs_ext
def test_gradients_of_every_order_are_stocks():
    x = torch.randn(4, 64, 12, 12, dtype=torch.float64, requires_grad=True)
    grads = []
    for f in (F.dropout, dropout):
        torch.manual_seed(3)
        out = f(x * x, 0.25, True)
        assert out.grad_fn.name() == "MulBackward0"
        (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        (gg,) = torch.autograd.grad((g * g).sum(), x)
        grads.append((g, gg))
    for got, want in zip(grads[1], grads[0], strict=True):
        assert torch.equal(got, want)


@needs_ext
def test_inplace_is_stocks():
    results = []
    for f in (F.dropout, dropout):
        torch.manual_seed(5)
        x = torch.randn(2, 700)
        version = x._version
        out = f(x, 0.3, True, inplace=True)
        assert out is x and x._version > version
        results.append(x)
        leaf = torch.randn(3, 4, requires_grad=True)
        with pytest.raises(RuntimeError, match="leaf Variable"):
            f(leaf, 0.3, True, inplace=True)
    assert torch.equal(results[0], results[1])


# Layouts: stock's noise is empty_like(input) -- the input's strides where it is dense, else
# contiguous -- drawn in memory order; the kernel's too.
LAYOUTS = {
    "transposed": lambda t: t.t(),
    "channels_last": lambda t: t.view(2, 3, 5, 7).to(memory_format=torch.channels_last),
    "columns sliced": lambda t: t[:, ::3],
    "expanded": lambda t: t[:1].expand(15, 14),
    "permuted 3-d": lambda t: t.view(3, 5, 14).permute(2, 0, 1),
}


@needs_ext
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_take_the_kernel_and_match_stock(layout, monkeypatch):
    x = LAYOUTS[layout](torch.randn(15, 14))
    (want, want_state), (got, got_state) = _both(lambda f, t: f(t, 0.4, True), x, 13, 5)
    assert got.stride() == want.stride()
    assert torch.equal(got, want)
    assert torch.equal(got_state, want_state)
    refuse = lambda *a, **k: pytest.fail("left to stock's F.dropout")  # noqa: E731
    monkeypatch.setattr(fastlenet.dropout.F, "dropout", refuse)
    dropout(x, 0.4, True)


# Calls the kernel does not take: stock's F.dropout answers them, with the same draws.
STOCK_PATHS = {
    "eval": lambda f, x: f(x, 0.5, False),
    "p 0": lambda f, x: f(x, 0.0, True),
    "p 1": lambda f, x: f(x, 1.0, True),
    "float16": lambda f, x: f(x.half(), 0.5, True),
    "bfloat16": lambda f, x: f(x.bfloat16(), 0.5, True),
    "empty": lambda f, x: f(x[:0], 0.5, True),
}


@pytest.mark.parametrize("case", STOCK_PATHS)
def test_paths_left_to_stock_match_it(case):
    x = torch.randn(15, 14)
    (want, want_state), (got, got_state) = _both(STOCK_PATHS[case], x, 11, 2)
    assert got.dtype == want.dtype and got.stride() == want.stride()
    assert torch.equal(got, want)
    assert torch.equal(got_state, want_state)


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_bad_p_raises_what_stock_raises(p):
    x = torch.randn(4, 4)
    with pytest.raises(ValueError, match="dropout probability"):
        F.dropout(x, p, True)
    with pytest.raises(ValueError, match="dropout probability"):
        dropout(x, p, True)


def test_vmap_raises_as_stock():
    x = torch.randn(3, 4)
    for f in (F.dropout, dropout):
        with pytest.raises(RuntimeError, match="randomness"):
            torch.func.vmap(lambda t, f=f: f(t, 0.5, True))(x)


@needs_ext
@pytest.mark.parametrize(
    ("like", "p", "match"),
    [
        (torch.randn(4, 6).to_sparse(), 0.5, "input must be strided"),
        (torch.randn(4, 6).half(), 0.5, "input must be float32 or float64"),
        (torch.randn(4, 6), 1.0, "p must be in"),
        (torch.randn(4, 6), 0.0, "p must be in"),
    ],
)
def test_kernel_refuses_what_it_cannot_draw(like, p, match):
    with pytest.raises(RuntimeError, match=match):
        _ext._C.dropout_noise(like, p)


def test_module_is_a_drop_in():
    stock, ours = nn.Dropout(0.3, inplace=False), fastlenet.nn.Dropout(0.3)
    assert isinstance(ours, nn.Dropout)
    assert repr(ours) == repr(stock)
    assert ours.state_dict() == stock.state_dict() == {}
    x = torch.randn(8, 100)
    torch.manual_seed(2)
    want = stock(x)
    torch.manual_seed(2)
    assert torch.equal(ours(x), want)
    ours.eval()
    assert ours(x) is x
