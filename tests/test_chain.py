"""The chain path (fastlenet/chain.py): a straight chain of fastlenet layers as one autograd
node. It must compute what the per-layer path computes, bit for bit (the same kernels), and
what stock computes; fall back to the per-layer path wherever a user could see a difference
(hooks, layouts, compile); and its two registered ops pass opcheck and reject a bad spec."""

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

import fastlenet
from fastlenet import _ext, chain
from fastlenet import nn as fnn
from fastlenet.models import FashionCNN, LeNet5

pytestmark = pytest.mark.skipif(
    not fastlenet.available_backends()["cpu"], reason="the chain runs on the C++ CPU backend"
)

MODELS = {"lenet5": (LeNet5, (1, 32, 32)), "fashion-cnn": (FashionCNN, (1, 28, 28))}


def _pair(name, dtype=torch.float32):
    """The fused model twice with the same weights: one to run as a chain, one layer by layer."""
    cls, size = MODELS[name]
    torch.manual_seed(1)
    a = cls(fused=True, backend="cpu").to(dtype)
    b = cls(fused=True, backend="cpu").to(dtype)
    b.load_state_dict(a.state_dict())
    return a, b, size


def _data(size, batch=8, dtype=torch.float32, seed=3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *size, generator=gen, dtype=dtype)
    return x, torch.randint(0, 10, (batch,), generator=gen)


def _warm_pair(name="lenet5", dtype=torch.float64, **data):
    """_pair's two models and _data's batch, the chained model's first call done: its next call
    of the batch's shape takes the chain."""
    chained, layered, size = _pair(name, dtype)
    x, y = _data(size, dtype=dtype, **data)
    _chained(chained, x)
    return chained, layered, x, y


def _chained(model, x):
    """model(x) on the chain: a first call of each shape runs layer by layer (its checks)."""
    with torch.no_grad():
        model(x)
    out = model(x)
    assert chain.on_chain(out)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(MODELS))
def test_chain_equals_layers_bitwise(name, dtype):
    chained, layered, size = _pair(name, dtype)
    x, y = _data(size, dtype=dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a = _chained(chained, xa)
    out_b = layered._layered(xb)
    assert not chain.on_chain(out_b)
    assert torch.equal(out_a, out_b)
    F.cross_entropy(out_a, y).backward()
    F.cross_entropy(out_b, y).backward()
    assert torch.equal(xa.grad, xb.grad)
    for (key, pa), pb in zip(chained.named_parameters(), layered.parameters(), strict=True):
        assert torch.equal(pa.grad, pb.grad), key


def test_chain_200_sgd_steps_equal_layers():
    chained, layered, size = _pair("lenet5")
    steps = []
    for model, forward in ((chained, chained), (layered, layered._layered)):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for i in range(200):
            x, y = _data(size, batch=4, seed=i)
            opt.zero_grad()
            F.cross_entropy(forward(x), y).backward()
            opt.step()
        steps.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*steps, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(MODELS))
def test_chain_matches_stock_step_by_step(name):
    """float64, from shared weights: every step's loss and every parameter after it."""
    cls, size = MODELS[name]
    torch.manual_seed(2)
    fused = cls(fused=True, backend="cpu").double()
    stock = cls(fused=False).double()
    stock.load_state_dict(fused.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (fused, stock)]
    for i in range(20):
        x, y = _data(size, batch=8, dtype=torch.float64, seed=100 + i)
        losses = []
        for model, opt in zip((fused, stock), opts, strict=True):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        if i > 0:  # the first call of a shape runs layer by layer
            assert chain.on_chain(fused(x))
        assert rel_err(losses[0], losses[1]) < 1e-12
        for pf, ps in zip(fused.parameters(), stock.parameters(), strict=True):
            assert rel_err(pf, ps) < 1e-10


def test_hooks_take_the_layer_path():
    model, _, size = _pair("lenet5")
    x, y = _data(size)
    _chained(model, x)
    seen = []
    handle = model.conv2.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    grads = []
    back = model.fc1.register_full_backward_hook(lambda m, gi, go: grads.append(go[0].shape))
    out = model(x)
    F.cross_entropy(out, y).backward()
    assert seen == [(8, 16, 5, 5)] and grads == [(8, 120)]
    handle.remove()
    back.remove()
    assert chain.on_chain(model(x))


def test_parameter_hooks_and_grad_accumulation():
    """Tensor hooks on parameters see the chain's gradients; .grad accumulates."""
    model, layered, size = _pair("lenet5")
    x, y = _data(size)
    _chained(model, x)
    seen = []
    model.fc3.weight.register_hook(lambda g: seen.append(g.clone()))
    for _ in range(2):
        F.cross_entropy(model(x), y).backward()
    for _ in range(2):
        F.cross_entropy(layered._layered(x), y).backward()
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])
    for pa, pb in zip(model.parameters(), layered.parameters(), strict=True):
        assert torch.equal(pa.grad, pb.grad)


def test_second_order_gradients_match_layers():
    """A gradient penalty through the chain: create_graph recomputes layer by layer, so the
    second derivative reaches every layer's weights."""
    chained, layered, x, y = _warm_pair()
    results = []
    for model, fwd in ((chained, chained), (layered, layered._layered)):
        loss = F.cross_entropy(fwd(x), y)
        grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
        penalty = sum((g**2).sum() for g in grads)
        results.append(torch.autograd.grad(penalty, list(model.parameters())))
    for a, b in zip(*results, strict=True):
        assert rel_err(a, b) < 1e-12
        assert a.abs().sum() > 0


@pytest.mark.parametrize("create_graph", [False, True])
def test_a_layer_used_twice_gets_each_use_once(create_graph):
    """A layer twice in a chain (tied weights): its gradient is the sum of its two uses', with
    create_graph too (where the chain's backward differentiates a recomputed forward), and so
    is the second derivative."""
    torch.manual_seed(5)
    lin, last = fnn.LinearReLU(8, 8).double(), fnn.Linear(8, 3).double()
    chained = fnn.Sequential(torch.nn.Flatten(), lin, lin, last)
    s_lin, s_last = torch.nn.Linear(8, 8).double(), torch.nn.Linear(8, 3).double()
    s_lin.load_state_dict(lin.state_dict())
    s_last.load_state_dict(last.state_dict())
    relu = torch.nn.ReLU()
    stock = torch.nn.Sequential(torch.nn.Flatten(), s_lin, relu, s_lin, relu, s_last)
    x = torch.randn(4, 2, 2, 2, dtype=torch.float64)
    _chained(chained, x)
    results = []
    for model in (chained, stock):
        params = list(model.parameters())
        grads = torch.autograd.grad(model(x).square().sum(), params, create_graph=create_graph)
        second = None
        if create_graph:
            second = torch.autograd.grad(sum((g**2).sum() for g in grads), params)
        results.append((grads, second))
    for a, b in zip(results[0][0], results[1][0], strict=True):
        assert rel_err(a, b) < 1e-12
    if create_graph:
        for a, b in zip(results[0][1], results[1][1], strict=True):
            assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_on_a_first_call(reentrant):
    """torch.utils.checkpoint around the chain on the first call of a shape: the recomputation
    in backward must save what the forward saved (the non-reentrant form checks)."""
    chained, layered, size = _pair("lenet5", torch.float64)
    x, y = _data(size, batch=13, dtype=torch.float64, seed=11)  # a batch no other test uses
    grads = []
    for model, fwd in ((chained, chained), (layered, layered._layered)):
        xi = x.clone().requires_grad_()
        out = torch.utils.checkpoint.checkpoint(fwd, xi, use_reentrant=reentrant)
        F.cross_entropy(out, y).backward()
        grads.append([xi.grad, *(p.grad for p in model.parameters())])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_batched_gradients_through_the_chain():
    """autograd.grad(is_grads_batched=True) (as jacobian(vectorize=True) calls it) runs the
    chain's backward under vmap, on a batch of gradients."""
    chained, layered, size = _pair("lenet5", torch.float64)
    x, _ = _data(size, batch=2, dtype=torch.float64)
    _chained(chained, x)
    v = torch.randn(3, 2, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = []
    for model, fwd in ((chained, chained), (layered, layered._layered)):
        xi = x.clone().requires_grad_()
        out = fwd(xi)
        assert chain.on_chain(out) is (model is chained)
        grads.append(torch.autograd.grad(out, [xi, model.conv1.weight], v, is_grads_batched=True))
    for a, b in zip(*grads, strict=True):
        assert a.shape[0] == 3 and rel_err(a, b) < 1e-12


def test_create_graph_backward_under_autocast():
    """A create_graph backward called under torch.autocast, the forward outside it: the chain
    recomputes its forward as it ran (float32) and differentiates under autocast, as the
    per-layer path does."""
    chained, layered, size = _pair("lenet5")
    x, _ = _data(size)
    _chained(chained, x)
    grads = []
    for model, fwd in ((chained, chained), (layered, layered._layered)):
        out = fwd(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            params = list(model.parameters())
            got = torch.autograd.grad(out.square().sum(), params, create_graph=True)
        grads.append(got)
    for a, b in zip(*grads, strict=True):
        assert a.dtype == torch.float32 and rel_err(a, b) < 1e-6


def test_a_bias_changed_in_place_before_backward():
    """Stock's backward reads no bias, so a bias may change in place between forward and
    backward; so here. Only a create_graph backward, which recomputes the forward, needs the
    bias as it was: it raises as autograd does for a changed saved tensor."""
    chained, layered, x, y = _warm_pair()
    grads = []
    for model, fwd in ((chained, chained), (layered, layered._layered)):
        loss = F.cross_entropy(fwd(x), y)
        with torch.no_grad():
            model.fc1.bias.add_(1.0)
            model.conv2.bias.mul_(0.5)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)
    loss = F.cross_entropy(chained(x), y)
    with torch.no_grad():
        chained.fc1.bias.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, list(chained.parameters()), create_graph=True)


def test_gradcheck_chain_function():
    torch.manual_seed(4)
    layers = [fnn.ConvReLUPool2d(2, 3, 3, padding=1, backend="cpu"), fnn.LinearReLU(27, 5)]
    layers.append(fnn.Linear(5, 4, bias=False))
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    params = []
    for m in layers:
        for p in (m.weight, m.bias):
            params.append(None if p is None else p.detach().double().requires_grad_())
    spec = chain.spec(layers)
    assert torch.autograd.gradcheck(lambda x, *p: _ext._C.chain(x, list(p), spec), (x, *params))


def _channels_last_weight(model):
    w = model.conv2.weight
    w.data = w.data.contiguous(memory_format=torch.channels_last)


def _stock_fc2(model):
    fc2 = torch.nn.Linear(120, 84)
    fc2.load_state_dict(model.fc2.state_dict())
    model.fc2 = fc2


def _even_same_conv1(model):
    """conv1 with a 4x4 kernel and padding="same": the layer pads one more row and column at the
    bottom and right, which the chain's spec cannot say (28x28 inputs keep fc1's 400)."""
    torch.manual_seed(7)
    model.conv1 = fnn.ConvReLUPool2d(1, 6, 4, padding="same", backend="cpu")


def _fallbacks():
    x = torch.randn(2, 1, 32, 32)
    return {
        "stock_child": (_stock_fc2, x),
        "channels_last_weight": (_channels_last_weight, x),
        "non_contiguous_input": (lambda m: None, x.transpose(2, 3)),
        "global_hook": ("global", x),
        "even_same_padding": (_even_same_conv1, torch.randn(2, 1, 28, 28)),
        # geometry the chain's key cannot hash: the layers take it as they take a tuple
        "list_stride": (lambda m: setattr(m.conv1, "stride", [1, 1]), x),
    }


@pytest.mark.parametrize("case", list(_fallbacks()))
def test_fallbacks_take_the_layer_path(case):
    model, layered, _ = _pair("lenet5")
    change, x = _fallbacks()[case]
    _chained(model, torch.randn(2, 1, 32, 32))
    handle = None
    if change == "global":
        handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    else:
        change(model)
        change(layered)
    try:
        outs = [model(x), model(x)]  # the second: a key seen before whose layers are no chain
    finally:
        if handle is not None:
            handle.remove()
    for out in outs:
        assert not chain.on_chain(out)
        assert torch.equal(out, layered._layered(x))


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("fused", [True, False])
def test_a_deleted_layer_raises_what_stock_raises(name, fused):
    cls, size = MODELS[name]
    model = cls(fused=fused)
    del model.conv2
    with pytest.raises(AttributeError, match="has no attribute 'conv2'"):
        model(torch.randn(2, *size))


def test_bad_input_raises_what_the_layers_raise():
    model, _, _ = _pair("lenet5")
    _chained(model, torch.randn(2, 1, 32, 32))
    with pytest.raises(fastlenet.ArgumentError, match="channels") as chained:
        model(torch.randn(2, 3, 32, 32))
    with pytest.raises(fastlenet.ArgumentError) as layered:
        model._layered(torch.randn(2, 3, 32, 32))
    assert str(chained.value) == str(layered.value)


def _op_args(dtype=torch.float32):
    torch.manual_seed(5)
    x = torch.randn(3, 2, 9, 9, dtype=dtype)
    weights = [torch.randn(4, 2, 3, 3, dtype=dtype), torch.randn(7, 36, dtype=dtype)]
    weights.append(torch.randn(5, 7, dtype=dtype))
    biases = [torch.randn(4, dtype=dtype), None, torch.randn(5, dtype=dtype)]
    spec = [0, 1, 1, 0, 0, 3, 3, 2, 2, 1, 1, *[0] * 7, 1, 0, *[0] * 7]
    return x, weights, biases, spec


@pytest.mark.parametrize("drop", [[], [0.25, 0.5, 0.0]], ids=["no-dropout", "dropouts"])
def test_opcheck_chain_ops(drop):
    x, weights, biases, spec = _op_args()
    fwd_args = (x, weights, biases, spec, drop)
    torch.library.opcheck(torch.ops.fastlenet.chain_fwd.default, fwd_args)
    out, activations, argmax, dropped = torch.ops.fastlenet.chain_fwd(*fwd_args)
    assert len(dropped) == (3 if drop else 0)  # a noise each, the ReLU-linear's output too
    grad = torch.randn_like(out)
    for input_grad in (True, False):
        args = (grad, x, out, activations, argmax, dropped, weights, spec, drop, input_grad)
        torch.library.opcheck(torch.ops.fastlenet.chain_bwd.default, args)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda s: s[:-1], "spec must hold 9 ints per layer"),
        (lambda s: [2, *s[1:]], "kind must be"),
        (lambda s: s[9:18] + s[:9] + s[18:], "conv after a linear"),
    ],
)
def test_chain_ops_reject_a_bad_spec(change, match):
    x, weights, biases, spec = _op_args()
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastlenet.chain_fwd(x, weights, biases, change(spec), [])
    out, activations, argmax, dropped = torch.ops.fastlenet.chain_fwd(x, weights, biases, spec, [])
    grad = torch.randn_like(out)
    bwd = torch.ops.fastlenet.chain_bwd
    with pytest.raises(RuntimeError, match=match):
        bwd(grad, x, out, activations, argmax, dropped, weights, change(spec), [], True)
    with pytest.raises(RuntimeError, match="activations must hold 2 tensors"):
        bwd(grad, x, out, activations[:-1], argmax, dropped, weights, spec, [], True)
    with pytest.raises(RuntimeError, match="argmax must hold 1 tensors"):
        bwd(grad, x, out, activations, [], dropped, weights, spec, [], True)


@pytest.mark.parametrize(
    ("drop", "match"),
    [
        ([0.5, 0.5], "dropout must be empty or hold one p per layer"),
        ([1.0, 0.0, 0.0], "layer 0's p must be in \\[0, 1\\)"),
        ([-0.1, 0.0, 0.0], "layer 0's p must be in \\[0, 1\\)"),
        ([0.0, 0.0, 0.5], "the last layer's p must be 0"),
    ],
)
def test_chain_ops_reject_a_bad_dropout(drop, match):
    x, weights, biases, spec = _op_args()
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastlenet.chain_fwd(x, weights, biases, spec, drop)
    out, activations, argmax, _ = torch.ops.fastlenet.chain_fwd(x, weights, biases, spec, [])
    bwd = torch.ops.fastlenet.chain_bwd
    with pytest.raises(RuntimeError, match=match):
        bwd(torch.randn_like(out), x, out, activations, argmax, [], weights, spec, drop, True)
    # the right p but not its noise (and the ReLU-linear's output)
    with pytest.raises(RuntimeError, match="dropped must hold 2 tensors"):
        args = (out, activations, argmax, [], weights, spec, [0.0, 0.5, 0.0], True)
        bwd(torch.randn_like(out), x, *args)
    # a noise that a product would broadcast: rejected, not broadcast
    noise, before = torch.ones(out.shape[0], 1), torch.randn(out.shape[0], 7)
    with pytest.raises(RuntimeError, match="layer 1's noise must have the shape of its output"):
        args = (out, activations, argmax, [noise, before], weights, spec, [0.0, 0.5, 0.0], True)
        bwd(torch.randn_like(out), x, *args)


def _sequential(cls):
    torch.manual_seed(6)
    return cls(
        fnn.ConvReLUPool2d(1, 5, 3, padding=1),
        fnn.ConvReLUPool2d(5, 7, 3, pool_size=3, pool_stride=2),
        torch.nn.Flatten(),
        fnn.LinearReLU(7 * 1 * 1, 11),
        fnn.Linear(11, 10),
    )


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_string_padding_takes_the_chain(padding):
    """padding="valid" and "same" with odd kernels are numbers on the chain: the chain and the
    layers, each with the string, compute the same bits."""

    def make(cls):
        torch.manual_seed(8)
        return cls(
            fnn.ConvReLUPool2d(1, 5, 3, padding=padding),
            fnn.ConvReLUPool2d(5, 7, (5, 3), padding=padding, pool_size=1),
            torch.nn.Flatten(),
            fnn.Linear(7 * 6 * 6 if padding == "same" else 7 * 1 * 3, 10),  # 12x12 in
        )

    chained, stock = make(fnn.Sequential).double(), make(torch.nn.Sequential).double()
    _assert_chain_equals(chained, stock, *_data((1, 12, 12), dtype=torch.float64))


def _assert_chain_equals(chained, stock, x, y):
    """chained(x) runs on the chain and equals stock(x) (the same layers one by one), bit for
    bit, forward and every parameter's gradient of a cross-entropy with labels y."""
    out = _chained(chained, x)
    want = stock(x)
    assert torch.equal(out, want)
    F.cross_entropy(out, y).backward()
    F.cross_entropy(want, y).backward()
    for pa, pb in zip(chained.parameters(), stock.parameters(), strict=True):
        assert torch.equal(pa.grad, pb.grad)


def test_sequential_is_one_node_and_equals_nn_sequential():
    chained, stock = _sequential(fnn.Sequential), _sequential(torch.nn.Sequential)
    assert list(chained.state_dict()) == list(stock.state_dict())
    _assert_chain_equals(chained, stock, *_data((1, 12, 12)))


@pytest.mark.parametrize(
    "children",
    [
        [fnn.ConvReLUPool2d(1, 4, 3), fnn.LinearReLU(13, 5)],  # no flatten: acts on the last dim
        [fnn.ConvReLUPool2d(1, 4, 3), torch.nn.Flatten()],  # ends flattened, no linear
        [fnn.ConvReLUPool2d(1, 4, 3), torch.nn.Flatten(0), fnn.Linear(1352, 5)],
        [fnn.ConvReLUPool2d(1, 4, 3), torch.nn.ReLU(), fnn.ConvReLUPool2d(4, 4, 3)],
    ],
)
def test_sequentials_that_are_not_chains_run_as_nn_sequential(children):
    assert chain.of_modules(children) is None
    model = fnn.Sequential(*children)
    x = torch.randn(2, 1, 28, 28)
    want = torch.nn.Sequential(*children)(x)
    model(x)
    out = model(x)
    assert not chain.on_chain(out)
    assert torch.equal(out, want)


def test_a_changed_geometry_is_checked_again():
    model, _, _ = _pair("lenet5")
    x = torch.randn(2, 1, 32, 32)
    _chained(model, x)
    model.conv2.stride = (3, 3)  # conv2 then gives 2x2 pooled: fc1 expects 400 features
    with pytest.raises(fastlenet.ArgumentError, match="400"):
        model(x)


@pytest.mark.parametrize("name", ["stride", "padding", "pool_size", "pool_stride"])
def test_geometry_set_to_an_int_after_construction(name):
    """nn.Conv2d takes `conv.padding = 1`; so do the layer and the chain."""
    model, layered, _ = _pair("lenet5", torch.float64)
    value = getattr(model.conv2, name)[0]
    setattr(model.conv2, name, value)
    setattr(layered.conv2, name, (value, value))
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    out = _chained(model, x)
    assert torch.equal(out, layered._layered(x))


def test_a_weight_set_as_a_plain_tensor_is_used():
    """`del layer.weight; layer.weight = w` (fast weights computed from the parameters, as
    learned optimisers and MAML do): the chain reads the tensor, and gradients reach what it was
    computed from."""
    model, layered, _ = _pair("lenet5", torch.float64)
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    outs, grads = [], []
    for m, fwd in ((model, None), (layered, layered._layered)):
        base = m.fc1.weight
        del m.fc1.weight
        m.fc1.weight = base * 0.5
        out = _chained(m, x) if fwd is None else fwd(x)
        out.square().sum().backward()
        outs.append(out)
        grads.append(base.grad)
    assert torch.equal(*outs)
    assert torch.equal(*grads) and grads[0].abs().sum() > 0


def test_a_changed_parameter_shape_is_checked_again():
    model, _, _ = _pair("lenet5")
    x = torch.randn(2, 1, 32, 32)
    _chained(model, x)
    model.fc1.weight.data = torch.randn(120, 401)  # the layer's check, not the kernel's
    with pytest.raises(fastlenet.ArgumentError, match="401"):
        model(x)


def test_a_parameter_that_is_no_tensor_takes_the_layer_path():
    model, _, _ = _pair("lenet5")
    x = torch.randn(2, 1, 32, 32)
    del model.fc3.bias
    model.fc3.bias = 0.5  # a plain attribute, as bias=False leaves None
    assert chain._key(x, (model.conv1, model.conv2, model.fc1, model.fc2, model.fc3)) is None


def test_a_hook_on_a_sequential_identity_runs():
    seq = _sequential(fnn.Sequential)
    seq.insert(3, torch.nn.Identity())
    x = torch.randn(2, 1, 12, 12)
    _chained(seq, x)
    seen = []
    seq[3].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    out = seq(x)
    assert seen == [(2, 7)] and not chain.on_chain(out)
