"""Dropouts on the chain (fastlenet/chain.py, csrc/chain_cpu.cpp): a dropout module between two
chained layers runs inside the chain's one autograd node. With the same seed the chain must
compute what its modules compute one by one, bit for bit (outputs, every gradient, second
derivatives), and leave the default generator where they leave it, from a shape's first call
on; a dropout the chain cannot run exactly sends the call layer by layer."""

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from torch import nn

import fastlenet
from fastlenet import chain
from fastlenet import nn as fnn

pytestmark = pytest.mark.skipif(
    not fastlenet.available_backends()["cpu"], reason="the chain runs on the C++ CPU backend"
)

DROPOUTS = {"stock": nn.Dropout, "fastlenet": fnn.Dropout}


def _children(drop):
    """A dropout after a conv, after a flatten (on the conv before it) and after a linear with
    ReLU, whose backward reads its output before the dropout as its ReLU mask."""
    torch.manual_seed(6)
    return [
        fnn.ConvReLUPool2d(1, 5, 3, padding=1),
        drop(0.3),
        fnn.ConvReLUPool2d(5, 7, 3, pool_size=3, pool_stride=2),
        nn.Flatten(),
        drop(0.2),
        fnn.LinearReLU(7 * 2 * 2, 11),
        drop(0.5),
        fnn.Linear(11, 10),
    ]


def _models(drop="fastlenet", dtype=torch.float64):
    """The same modules as a fastlenet.nn.Sequential (the chain) and an nn.Sequential (one by
    one)."""
    children = _children(DROPOUTS[drop])
    for m in children:
        m.to(dtype)
    return fnn.Sequential(*children), nn.Sequential(*children)


def _data(dtype=torch.float64):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 1, 14, 14, generator=gen, dtype=dtype)
    return x, torch.randint(0, 10, (6,), generator=gen)


def _step(model, x, y, seed, create_graph=False):
    """Output, input and parameter gradients of a cross-entropy, and the generator's state
    after them, from `seed`."""
    torch.manual_seed(seed)
    x = x.clone().requires_grad_()
    out = model(x)
    grads = torch.autograd.grad(
        F.cross_entropy(out, y), [x, *model.parameters()], create_graph=create_graph
    )
    return out, grads, torch.get_rng_state()


def _assert_same(got, want):
    (out_a, grads_a, rng_a), (out_b, grads_b, rng_b) = got, want
    assert torch.equal(out_a, out_b)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(rng_a, rng_b)


def _p_one(children):
    children[1].p = 1.0  # set after construction: stock multiplies by zeros, drawing nothing


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("drop", list(DROPOUTS))
def test_dropouts_on_the_chain_equal_the_modules(drop, dtype):
    chained, layered = _models(drop, dtype)
    x, y = _data(dtype)
    for seed in range(4):
        got = _step(chained, x, y, seed)
        assert chain.on_chain(got[0])
        _assert_same(got, _step(layered, x, y, seed))


def test_a_dropout_after_a_linear_without_relu():
    """Its backward reads no ReLU mask: the chain saves only the noise."""
    torch.manual_seed(7)
    children = [
        fnn.ConvReLUPool2d(1, 3, 3),
        nn.Flatten(),
        fnn.Linear(3 * 6 * 6, 9),
        fnn.Dropout(0.4),
        fnn.LinearReLU(9, 8),
        fnn.Dropout(0.1),
        fnn.Linear(8, 10),
    ]
    chained, layered = fnn.Sequential(*children).double(), nn.Sequential(*children).double()
    x, y = _data()
    for seed in range(2):
        got = _step(chained, x, y, seed)
        assert chain.on_chain(got[0])
        _assert_same(got, _step(layered, x, y, seed))


@pytest.mark.parametrize("chained", [True, False], ids=["chain", "layer-path"])
def test_a_first_call_leaves_the_generator_as_stock_does(chained):
    """A new shape's checks run the layers once, drawing noise; the generator is set back, so
    that the call's own draws are stock's, on the chain or (a dropout at p=1) off it."""
    children = _children(fnn.Dropout)
    if not chained:
        _p_one(children)
    model, layered = fnn.Sequential(*children).double(), nn.Sequential(*children).double()
    x, y = _data()
    for batch in (3, 2):  # shapes no other test has (the chain's checks are global)
        got = _step(model, x[:batch], y[:batch], batch)
        assert chain.on_chain(got[0]) == chained
        _assert_same(got, _step(layered, x[:batch], y[:batch], batch))


def test_second_order_gradients_with_dropouts():
    chained, layered = _models()
    x, y = _data()
    _step(chained, x, y, 0)  # the shape's first call
    hessians = []
    for model in (chained, layered):
        out, grads, _ = _step(model, x, y, 5, create_graph=True)
        assert chain.on_chain(out) == (model is chained)
        total = sum((g * g).sum() for g in grads)
        hessians.append(torch.autograd.grad(total, list(model.parameters())))
    # the engine sums the second-order terms in its own order (test_chain's own test): close,
    # where noise drawn again would give other masks
    for a, b in zip(*hessians, strict=True):
        assert rel_err(a, b) < 1e-12
        assert a.abs().sum() > 0


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_recomputes_the_same_noise(reentrant):
    """torch.utils.checkpoint restores the generator before it recomputes the forward in
    backward, on a shape's first call too: the chain draws the forward's noise again."""
    chained, layered = _models()
    x, y = _data()
    batch = 4 if reentrant else 5  # a shape no other call has had (the chain's checks are global)
    x, y = x[:batch], y[:batch]
    got = []
    for model in (chained, layered):
        torch.manual_seed(9)
        xi = x.clone().requires_grad_()
        out = torch.utils.checkpoint.checkpoint(model, xi, use_reentrant=reentrant)
        F.cross_entropy(out, y).backward()
        got.append([out, xi.grad, *(p.grad for p in model.parameters())])
        for p in model.parameters():
            p.grad = None
    for a, b in zip(*got, strict=True):
        assert torch.equal(a, b)


def test_twenty_sgd_steps_with_dropouts_equal_the_modules():
    chained, _ = _models()
    _, layered = _models()  # the same initial weights, other Parameters
    x, y = _data()
    for model in (chained, layered):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for step in range(20):
            torch.manual_seed(step)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    for a, b in zip(chained.parameters(), layered.parameters(), strict=True):
        assert torch.equal(a, b)


def test_in_evaluation_the_dropouts_pass_the_input_on_the_chain():
    chained, layered = _models()
    chained.eval()
    x, y = _data()
    _step(chained, x, y, 0)
    _assert_same(_step(chained, x, y, 1), _step(layered, x, y, 1))
    assert chain.on_chain(chained(x))


def _hooked(children):
    children[1].register_forward_hook(lambda m, i, o: None)


@pytest.mark.parametrize("change", [_p_one, _hooked])
def test_a_dropout_the_chain_cannot_run_sends_the_call_layer_by_layer(change):
    children = _children(fnn.Dropout)
    change(children)
    chained, layered = fnn.Sequential(*children).double(), nn.Sequential(*children).double()
    x, y = _data()
    for seed in range(2):
        got = _step(chained, x, y, seed)
        assert not chain.on_chain(got[0])
        _assert_same(got, _step(layered, x, y, seed))


def test_an_inplace_dropout_raises_as_stock_does():
    """In place after a linear with ReLU it changes the output that the layer's backward reads:
    stock's autograd raises, and so does the fastlenet.nn.Sequential, off the chain."""
    children = _children(fnn.Dropout)
    children[6].inplace = True
    for model in (fnn.Sequential(*children), nn.Sequential(*children)):
        x, y = _data(torch.float32)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            F.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize(
    "children",
    [
        [fnn.Dropout(0.5), fnn.ConvReLUPool2d(1, 4, 3), nn.Flatten(), fnn.Linear(676, 5)],
        [fnn.ConvReLUPool2d(1, 4, 3), nn.Flatten(), fnn.Linear(676, 5), fnn.Dropout(0.5)],
        [fnn.ConvReLUPool2d(1, 4, 3), fnn.Dropout(0.5), nn.Dropout(), fnn.ConvReLUPool2d(4, 4, 3)],
    ],
    ids=["first", "last", "two-in-a-row"],
)
def test_a_dropout_first_last_or_doubled_is_no_chain(children):
    assert chain.of_modules(children) is None
    assert chain.dropout(children) is None
