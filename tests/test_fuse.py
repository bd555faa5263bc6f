"""fastlenet.fuse and torch.compile(backend="fastlenet") on models written with stock layers."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from torch import nn

import fastlenet
from fastlenet import chain
from fastlenet.dropout import dropout
from fastlenet.fuse import compile_backend
from fastlenet.models import CifarTutorialNet, ExamplesNet, LeNet5
from fastlenet.nn import ConvReLUPool2d, LinearReLU

F64 = {"dtype": torch.float64}


class FashionBlocks(nn.Module):
    """The Fashion-MNIST CNN as nn.Sequential blocks (pool before ReLU in the second)."""

    def __init__(self):
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2))
        self.layer2 = nn.Sequential(
            nn.Conv2d(16, 32, 5, padding=2), nn.MaxPool2d(2), nn.ReLU(inplace=True)
        )
        self.fc = nn.Linear(32 * 7 * 7, 10)

    def forward(self, x):
        return self.fc(self.layer2(self.layer1(x)).flatten(1))


def _no_pool_net():
    """3x3 convolutions without pooling."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding="same"),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 12 * 12, 10),
    )


class ReLUForms(nn.Module):
    """The other ways of writing a ReLU: a method, torch.relu, in place."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.conv2 = nn.Conv2d(4, 6, 3)
        self.fc = nn.Linear(6 * 2 * 2, 10)

    def forward(self, x):
        x = F.max_pool2d(self.conv1(x).relu(), (2, 2))
        x = F.max_pool2d(F.relu(self.conv2(x), inplace=True), 2, 2)
        return torch.relu(self.fc(x.flatten(1)))


def _mlp():
    return nn.Sequential(
        nn.Flatten(), nn.Linear(144, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)
    )


class Flattened(nn.Module):
    """A LeNet-like network flattening its conv output by `form`, as older tutorials and many
    repositories write it; `features` is the K of x.view(-1, K)."""

    def __init__(self, form, features=16 * 2 * 2, channels=1):
        super().__init__()
        self.form, self.features = form, features
        self.conv1 = nn.Conv2d(channels, 6, 3)
        self.conv2 = nn.Conv2d(6, 16, 3)
        self.fc1 = nn.Linear(features, 24)
        self.fc2 = nn.Linear(24, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        if self.form == "view_size":
            x = x.view(x.size(0), -1)
        elif self.form == "view_features":
            x = x.view(-1, self.features)
        elif self.form == "reshape_shape":
            x = x.reshape(x.shape[0], -1)
        else:  # "torch_reshape"
            x = torch.reshape(x, (x.size()[0], -1))
        return self.fc2(F.relu(self.fc1(x)))


FLATTEN_FORMS = ("view_size", "view_features", "reshape_shape", "torch_reshape")


class FlatMLP(nn.Module):
    """An MLP on images that flattens them first by x.view(-1, 144) or x.view(x.size(0), -1)."""

    def __init__(self, form):
        super().__init__()
        self.form = form
        self.fc1 = nn.Linear(144, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = x.view(-1, 144) if self.form == "view_features" else x.view(x.size(0), -1)
        return self.fc2(F.relu(self.fc1(x)))


# name: (model factory, input size, number of fused layers)
NETWORKS = {
    # the PyTorch tutorial's LeNet: layers as modules, ReLU and pooling functional
    "tutorial": (lambda: LeNet5(fused=False), (1, 32, 32), 4),
    "fashion_blocks": (FashionBlocks, (1, 28, 28), 2),
    "no_pool": (_no_pool_net, (1, 12, 12), 2),
    "examples": (lambda: ExamplesNet(input_size=(1, 14, 14)), (1, 14, 14), 3),
    "mlp": (_mlp, (1, 12, 12), 2),
    "relu_forms": (ReLUForms, (1, 14, 14), 3),
    # PyTorch's CIFAR-10 tutorial: three input channels, one pooling module called twice
    "cifar_tutorial": (CifarTutorialNet, (3, 32, 32), 4),
    # flattened by x.view(x.size(0), -1) and its like instead of torch.flatten
    **{form: (lambda form=form: Flattened(form), (1, 14, 14), 3) for form in FLATTEN_FORMS},
    **{f"mlp_{f}": (lambda f=f: FlatMLP(f), (1, 12, 12), 1) for f in FLATTEN_FORMS[:2]},
}


def _fused_count(model):
    return sum(isinstance(m, ConvReLUPool2d | LinearReLU) for m in model.modules())


def _stock_and_fused(make):
    """A float64 stock model from a fixed seed and fastlenet.fuse of it."""
    torch.manual_seed(0)
    model = make().double()
    return model, fastlenet.fuse(model)


def _forward(model, x, seed):
    torch.manual_seed(seed)  # dropout draws the same masks on both sides
    return model(x)


@pytest.mark.parametrize("name", NETWORKS)
def test_fused_network_matches_stock(name):
    make, size, count = NETWORKS[name]
    model, fused = _stock_and_fused(make)
    assert _fused_count(fused) == count == len(fused.fuse_report.fused)
    assert _fused_count(model) == 0  # the original is unchanged
    assert list(fused.state_dict()) == list(model.state_dict())
    assert {id(p) for p in fused.parameters()} == {id(p) for p in model.parameters()}
    x = torch.randn(3, *size, **F64, requires_grad=True)
    got, want = _forward(fused, x, 1), _forward(model, x, 1)
    assert rel_err(got, want) < 1e-12
    grad = torch.randn_like(want)
    params = list(model.parameters())
    got_g = torch.autograd.grad(got, [x, *params], grad)
    want_g = torch.autograd.grad(want, [x, *params], grad)
    for g, w in zip(got_g, want_g, strict=True):
        assert rel_err(g, w) < 1e-12


@pytest.mark.parametrize("name", NETWORKS)
def test_twenty_training_steps_match_stock(name):
    """An optimizer built on the stock model before fuse() trains the fused one."""
    make, size, _ = NETWORKS[name]
    torch.manual_seed(0)
    stock = make().double()
    twin = make().double()
    twin.load_state_dict(stock.state_dict())
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.02, momentum=0.9)
    opt = torch.optim.SGD(stock.parameters(), lr=0.02, momentum=0.9)
    fused = fastlenet.fuse(stock)
    for step in range(20):
        x, y = torch.randn(8, *size, **F64), torch.randint(0, 10, (8,))
        for model, o in ((fused, opt), (twin, opt_twin)):
            o.zero_grad()
            F.cross_entropy(_forward(model, x, step), y).backward()
            o.step()
    want = twin.state_dict()
    for key, got in stock.state_dict().items():
        assert rel_err(got, want[key]) < 1e-9, key


def test_state_dict_loads_both_ways():
    torch.manual_seed(0)
    fused = fastlenet.fuse(LeNet5(fused=False))
    other = LeNet5(fused=False)
    fused.load_state_dict(other.state_dict())
    assert torch.equal(fused.conv1.weight, other.conv1.weight)
    other.load_state_dict(fastlenet.fuse(LeNet5(fused=False)).state_dict())


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = F.relu(self.conv(x))
        return F.max_pool2d(y, 2) + F.avg_pool2d(y, 2)  # the ReLU output feeds two nodes


class _CeilPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        return F.max_pool2d(F.relu(self.conv(x)), 2, ceil_mode=True)


class _InplaceKept(nn.Module):
    """An in-place ReLU whose result is not used: the conv output, changed in place, is."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        y.relu_()
        return F.max_pool2d(y, 2) * 2


class _PoolIndices(nn.Module):
    """max_pool2d with return_indices given positionally (the 7th argument)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        out, _ = F.max_pool2d(F.relu(self.conv(x)), 2, 2, 0, 1, False, True)
        return out


# What is not the fused op stays as it was: the pool whose input feeds something else too, or
# whose settings differ (conv + ReLU alone still fuse: the op with pool_size 1), and convs the
# op does not support.
NOT_FUSED = {
    "reused ReLU output": (_Residual, "conv2d -> ReLU", None),
    "ceil_mode pool": (_CeilPool, "conv2d -> ReLU", None),
    "unused in-place ReLU": (_InplaceKept, None, "conv: its output feeds 2 nodes"),
    "pool indices": (_PoolIndices, "conv2d -> ReLU", None),
    "dilated conv": (
        lambda: nn.Sequential(nn.Conv2d(4, 4, 3, dilation=2), nn.ReLU()),
        None,
        "0: dilation (2, 2)",
    ),
    "grouped conv": (
        lambda: nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.ReLU(), nn.MaxPool2d(2)),
        None,
        "0: groups 2",
    ),
}


@pytest.mark.parametrize("case", NOT_FUSED)
def test_what_must_not_fuse_is_left_alone(case):
    make, fused_what, left_reason = NOT_FUSED[case]
    model, fused = _stock_and_fused(make)
    report = fused.fuse_report
    if fused_what is None:
        assert report.fused == []
        assert _fused_count(fused) == 0
    else:
        assert [line.split(": ")[1] for line in report.fused] == [fused_what]
        assert fused.conv.pool_size == (1, 1)
    if left_reason is not None:
        assert left_reason in report.left
    x = torch.randn(2, 4, 9, 9, **F64)
    assert rel_err(fused(x), model(x)) < 1e-12


class _Untraceable(nn.Module):
    """`body` behind data-dependent control flow: fuse searches its nn.Sequential only."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: torch.fx cannot trace it
            x = -x
        return self.body(x)


def _double_input(module, args):
    return (args[0] * 2,)


# Modules whose replacement would change what the model computes: hooks (prune and the old
# weight_norm are forward pre-hooks) would be dropped, a subclass's forward (a parametrized
# weight's generated class, torch.ao's QAT layers) would not run.
CHANGED_MODULES = {
    "forward hook": (lambda m: m.register_forward_hook(lambda mod, i, o: o * 0.5), "has hooks"),
    "forward pre-hook": (lambda m: m.register_forward_pre_hook(_double_input), "has hooks"),
    "parametrized weight": (
        torch.nn.utils.parametrizations.weight_norm,
        "is a subclass of nn.",
    ),
}


@pytest.mark.parametrize("traced", [True, False], ids=["traced", "sequential"])
@pytest.mark.parametrize("case", CHANGED_MODULES)
def test_modules_with_hooks_or_subclassed_are_left_alone(case, traced):
    change, reason = CHANGED_MODULES[case]
    torch.manual_seed(0)
    body = nn.Sequential(
        nn.Conv2d(4, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 5), nn.ReLU()
    ).double()
    change(body[0])
    change(body[4])
    model = body if traced else _Untraceable(body)
    fused = fastlenet.fuse(model)
    report = fused.fuse_report
    assert report.traced is traced
    assert report.fused == [] and _fused_count(fused) == 0
    assert len(report.left) == 2 and all(reason in line for line in report.left)
    x = torch.randn(3, 4, 8, 8, **F64)
    fused(x)
    assert rel_err(fused(x), model(x)) < 1e-12


def test_a_pool_window_the_op_cannot_hold_stays_a_pool():
    """More than 255 positions (a global max-pool over 16 x 16): conv + ReLU fuse alone."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(16), nn.Flatten(), nn.Linear(4, 2)
    ).double()
    fused = fastlenet.fuse(model)
    assert fused.fuse_report.fused == ["0: conv2d -> ReLU"]
    x = torch.randn(2, 1, 16, 16, **F64)
    assert rel_err(fused(x), model(x)) < 1e-12


class _ConvTwice(nn.Module):
    """One conv called at two sites with different patterns around it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(F.max_pool2d(F.relu(self.conv(x)), 2))


class _LinearTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return F.relu(self.fc(self.fc(x)))


@pytest.mark.parametrize(("make", "shape"), [(_ConvTwice, (2, 3, 8, 8)), (_LinearTwice, (4, 6))])
def test_a_module_called_at_two_sites_keeps_both(make, shape):
    """Fused where its pattern is, by fastlenet's functions on its Parameters: the module
    itself stays, for the other site."""
    model, fused = _stock_and_fused(make)
    assert len(fused.fuse_report.fused) == 1 and _fused_count(fused) == 0
    xa = torch.randn(*shape, **F64, requires_grad=True)
    xb = xa.detach().clone().requires_grad_()
    out, want = fused(xa), model(xb)
    assert out.shape == want.shape and rel_err(out, want) < 1e-12
    out.square().sum().backward()
    want.square().sum().backward()
    assert rel_err(xa.grad, xb.grad) < 1e-12


class _ConvHead(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(36, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.max_pool2d(F.relu(self.conv(x)), 2), 1))


def test_a_chained_stock_linear_follows_new_parameters_and_a_new_module():
    """The last stock linear runs inside the chain on the Parameters the module holds at each
    call (load_state_dict(assign=True), a meta-device model filled later) and is itself called
    once replaced (a new head)."""
    model, fused = _stock_and_fused(_ConvHead)
    x = torch.randn(3, 1, 8, 8, **F64)
    fused(x)
    new = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    fused.load_state_dict(new, assign=True)
    model.load_state_dict(new)
    out = fused(x)
    assert chain.on_chain(out) and rel_err(out, model(x)) < 1e-12
    out.sum().backward()
    assert fused.fc.weight.grad is not None and fused.conv.weight.grad is not None
    with torch.device("meta"):
        empty = _ConvHead().double()
    filled = fastlenet.fuse(empty).to_empty(device="cpu")
    filled.load_state_dict(new)
    filled(x)
    assert rel_err(filled(x), model(x)) < 1e-12
    model.fc = fused.fc = nn.Linear(36, 3).double()
    assert fused(x).shape == (3, 3) and rel_err(fused(x), model(x)) < 1e-12


class _Mixed(nn.Module):
    """A fastlenet layer already, stock layers after it."""

    def __init__(self):
        super().__init__()
        self.conv = ConvReLUPool2d(1, 4, 3)
        self.fc = nn.Linear(4 * 3 * 3, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(F.relu(self.fc(torch.flatten(self.conv(x), 1))))


def test_a_model_holding_fastlenet_layers_keeps_them_whole():
    """fuse traces fastlenet's layers as module calls, as fx keeps torch.nn's: a hook on one
    still fires, and the run of layers becomes one chain."""
    model, fused = _stock_and_fused(_Mixed)
    chained = "conv, flatten, fc, out -> one autograd node (fastlenet_chain0)"
    assert fused.fuse_report.chains == [chained]
    x = torch.randn(2, 1, 8, 8, **F64)
    fused(x)
    assert chain.on_chain(fused(x)) and rel_err(fused(x), model(x)) < 1e-12
    seen = []
    model.conv.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    hooked = fastlenet.fuse(model)
    assert rel_err(hooked(x), model(x)) < 1e-12
    assert seen == [(2, 4, 3, 3)] * 2


def _conv_bn_net():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.5), nn.Linear(36, 3),
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["frozen batchnorm", "mc dropout"])
def test_each_module_keeps_its_mode_and_the_model_stays_as_it_was(mode):
    """fuse copies the model's modules (sharing Parameters and buffers): a module in another
    mode than the model (a frozen BatchNorm in training, dropout on at evaluation) stays so,
    and neither model's .train() / .eval() reaches the other."""
    torch.manual_seed(0)
    model = _conv_bn_net().double()
    odd = model[1] if mode == "frozen batchnorm" else model[7]
    model.train(mode == "frozen batchnorm")
    odd.train(mode == "mc dropout")
    fused = fastlenet.fuse(model)
    assert odd.training == (mode == "mc dropout")  # the user's module as it was
    x = torch.randn(4, 1, 10, 10, **F64)
    for _ in range(2):
        assert rel_err(_forward(fused, x, 3), _forward(model, x, 3)) < 1e-12
    fused.train(not fused.training)
    assert odd.training == (mode == "mc dropout")
    assert model.training == (mode == "frozen batchnorm")


class _RunsItsSequential(nn.Module):
    """Untraceable (data-dependent control flow); runs its Sequential item by item and keeps
    the intermediates."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        outs, y = [], x
        for layer in self.body:
            y = layer(y)
            outs.append(y)
        return outs[0].sum() + outs[-1].sum() + self.body(x).square().sum()


def test_an_untraceable_models_sequential_still_runs_item_by_item():
    model, fused = _stock_and_fused(_RunsItsSequential)
    assert not fused.fuse_report.traced and fused.fuse_report.fused
    x = torch.randn(2, 1, 10, 10, **F64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, want = fused(xa), model(xb)
    assert rel_err(out, want) < 1e-12
    out.backward()
    want.backward()
    assert rel_err(xa.grad, xb.grad) < 1e-12


class _OptionalScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x, scale=None):  # fx would trace `scale is not None` as true
        y = torch.max_pool2d(torch.relu(self.conv(x)), 2, [])  # torch.max_pool2d's own default
        return y if scale is None else y * scale


def test_an_argument_defaulting_to_none_and_torch_max_pool2d_defaults():
    model, fused = _stock_and_fused(_OptionalScale)
    assert not fused.fuse_report.traced and "defaults to None" in fused.fuse_report.note
    x = torch.randn(2, 1, 8, 8, **F64)
    assert rel_err(fused(x), model(x)) < 1e-12
    assert rel_err(fused(x, 2.0), model(x, 2.0)) < 1e-12
    traced = fastlenet.fuse(nn.Sequential(model.conv, nn.ReLU(), _MaxPoolDefaultStride()))
    assert traced.fuse_report.fused == ["0: conv2d -> ReLU -> max_pool2d"]


class _MaxPoolDefaultStride(nn.Module):
    def forward(self, x):
        return torch.max_pool2d(x, 2, [])


class _BranchOnMode(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return F.relu(self.fc(x)) * (2 if self.training else 1)


def test_a_forward_reading_the_training_flag_follows_train_and_eval():
    """F.dropout(x, training=self.training) reads the fused model's flag at each call; control
    flow on the flag makes the model untraceable for fuse."""
    torch.manual_seed(0)
    model = _FunctionalDropoutNet().double()  # traced in training mode
    fused = fastlenet.fuse(model).eval()
    model.eval()
    x = torch.randn(6, 20, **F64)
    assert torch.equal(fused(x), fused(x)) and rel_err(fused(x), model(x)) < 1e-12
    fused.train()
    model.train()
    torch.manual_seed(4)
    want = model(x)
    torch.manual_seed(4)
    out = fused(x)
    assert not torch.equal(out, fused.fc(x)) and rel_err(out, want) < 1e-12
    branchy = fastlenet.fuse(_BranchOnMode())
    assert not branchy.fuse_report.traced
    assert "differs between training and eval" in branchy.fuse_report.note


def test_untraceable_model_falls_back_to_sequentials(caplog):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 5)
            )

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: torch.fx cannot trace it
                x = -x
            return self.body(x)

    torch.manual_seed(0)
    model = Branchy().double()
    with caplog.at_level(logging.INFO, logger="fastlenet.fuse"):
        fused = fastlenet.fuse(model)
    report = fused.fuse_report
    assert not report.traced and "could not trace" in report.note
    assert report.fused == ["body.0: conv2d -> ReLU -> max_pool2d"]
    assert "1 fused" in caplog.text
    # The Sequential keeps its stock children (the model's code may run them one by one) and
    # runs its fused layers, a chain: one autograd node (from a shape's second call).
    assert type(fused.body[0]) is type(model.body[0]) is nn.Conv2d
    assert fused.body[0].weight is model.body[0].weight
    assert list(fused.state_dict()) == list(model.state_dict())
    assert report.chains == ["body -> one autograd node (FusedSequential)"]
    assert type(model.body) is nn.Sequential
    x = torch.randn(2, 1, 10, 10, **F64)
    fused(x)
    out = fused(x)
    assert chain.on_chain(out)
    assert rel_err(out, model(x)) < 1e-12


def test_an_untraceable_models_sequential_runs_its_dropouts_in_the_chain():
    torch.manual_seed(0)
    body = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.3), nn.Flatten(),
        nn.Linear(64, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 5),
    )  # fmt: skip
    model = _Untraceable(body).double()
    fused = fastlenet.fuse(model)
    report = fused.fuse_report
    assert report.chains == ["body -> one autograd node (FusedSequential)"]
    assert report.dropouts == ["body.3", "body.7"]
    x = torch.randn(3, 1, 10, 10, **F64, requires_grad=True)
    fused(x)  # the shape's first call: its checks
    results = []
    for m in (fused, model):
        out = _forward(m, x, 2)
        grads = torch.autograd.grad(out.sum(), [x, *model.parameters()])
        results.append((out, grads, torch.get_rng_state()))
    (out, grads, rng), (want, want_grads, want_rng) = results
    assert chain.on_chain(out)
    assert rel_err(out, want) < 1e-12  # the same masks: dropped values would differ by O(1)
    for g, w in zip(grads, want_grads, strict=True):
        assert rel_err(g, w) < 1e-12
    assert torch.equal(rng, want_rng)


@pytest.mark.parametrize("backend", ["fastlenet", compile_backend], ids=["by-name", "function"])
def test_compile_backend_trains_like_eager(backend, caplog):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = (
        ExamplesNet(input_size=(1, 14, 14)).double().eval()
    )  # no dropout: compiled and eager draw differently
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    x = torch.randn(4, 1, 14, 14, **F64)
    with caplog.at_level(logging.INFO, logger="fastlenet.fuse"):
        got = compiled(x)
    assert "3 fused" in caplog.text
    want = model(x)
    assert rel_err(got, want) < 1e-12
    grad = torch.randn_like(want)
    params = list(model.parameters())
    for g, w in zip(
        torch.autograd.grad(got, params, grad),
        torch.autograd.grad(want, params, grad),
        strict=True,
    ):
        assert rel_err(g, w) < 1e-12


# name: the chain fuse() makes of the network's layers (fastlenet/chain.py)
CHAINS = {
    "tutorial": "conv1, conv2, flatten, fc1, fc2, fc3",
    "fashion_blocks": "layer1.0, layer2.0, flatten, fc",
    "mlp": "0, 1, 3, 5",
    "no_pool": "0, 2, 4, 5",  # padding="same" (a 3x3 kernel: one on each side)
    "view_size": "conv1, conv2, view, fc1, fc2",
    "view_features": "conv1, conv2, view, fc1, fc2",
    "reshape_shape": "conv1, conv2, reshape, fc1, fc2",
    "torch_reshape": "conv1, conv2, reshape, fc1, fc2",
    "mlp_view_size": "view, fc1, fc2",
    "mlp_view_features": "view, fc1, fc2",
    "cifar_tutorial": "conv1, conv2, flatten, fc1, fc2, fc3",
    # its dropout modules run in the chain
    "examples": "conv1, conv2, dropout1, flatten, fc1, dropout2, fc2",
}


@pytest.mark.parametrize("name", CHAINS)
def test_straight_runs_become_one_autograd_node(name):
    make, size, _ = NETWORKS[name]
    model, fused = _stock_and_fused(make)
    assert fused.fuse_report.chains == [f"{CHAINS[name]} -> one autograd node (fastlenet_chain0)"]
    x = torch.randn(3, *size, **F64)
    fused(x)  # a shape's first call runs layer by layer (its checks)
    out = _forward(fused, x, 1)
    # the chain's output, or (pytorch/examples' Net) its log-softmax
    node = out.grad_fn if chain.on_chain(out) else out.grad_fn.next_functions[0][0]
    assert node.name() == chain.NODE
    assert rel_err(out, _forward(model, x, 1)) < 1e-12


def test_a_view_that_folds_the_batch_stays_the_models():
    """x.view(-1, K) where a sample has 2K values: stock's result has twice the rows; the fused
    model computes it, layer by layer, on every call."""
    model, fused = _stock_and_fused(lambda: Flattened("view_features", features=32))
    x = torch.randn(3, 1, 14, 14, **F64)
    for _ in range(3):
        out = fused(x)
        assert out.shape == (6, 10) and not chain.on_chain(out)
        assert rel_err(out, model(x)) < 1e-12


def test_a_batch_size_read_twice_keeps_its_reshape_out_of_the_chain():
    class Reused(Flattened):
        def forward(self, x):
            x = F.max_pool2d(F.relu(self.conv2(F.max_pool2d(F.relu(self.conv1(x)), 2))), 2)
            n = x.size(0)
            return self.fc2(F.relu(self.fc1(x.view(n, -1)))).view(n, 10)

    model, fused = _stock_and_fused(lambda: Reused("view_size"))
    assert fused.fuse_report.chains == ["conv1, conv2 -> one autograd node (fastlenet_chain0)"]
    x = torch.randn(3, 1, 14, 14, **F64)
    assert rel_err(fused(x), model(x)) < 1e-12


def test_a_view_the_layout_refuses_raises_as_stock_raises():
    """The layer path runs the model's own view: a channels-last input keeps its layout
    through every layer, and view(N, -1) of a channels-last conv output raises, in both."""
    model, fused = _stock_and_fused(lambda: Flattened("view_size", channels=3))
    x = torch.randn(3, 3, 14, 14, **F64).contiguous(memory_format=torch.channels_last)
    for m in (model, fused):
        with pytest.raises(RuntimeError, match="view size is not compatible"):
            m(x)
    contiguous = x.contiguous()
    fused(contiguous)
    out = fused(contiguous)
    assert chain.on_chain(out) and rel_err(out, model(contiguous)) < 1e-12


def test_a_hook_on_a_chained_stock_linear_still_fires():
    """The stock last linear runs inside the chain; a hook on it (the module the user sees)
    sends the call layer by layer, through it."""
    model, fused = _stock_and_fused(NETWORKS["tutorial"][0])
    x = torch.randn(3, 1, 32, 32, **F64)
    fused(x)
    seen = []
    fused.fc3.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    out = fused(x)
    assert seen == [(3, 10)]
    assert not chain.on_chain(out)
    assert rel_err(out, model(x)) < 1e-12


class _FunctionalDropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(20, 10)

    def forward(self, x):
        return self.fc(F.dropout(x, 0.4, training=self.training))


def test_fuse_swaps_dropout_modules_and_calls():
    torch.manual_seed(0)
    net = ExamplesNet(input_size=(1, 14, 14))
    fused = fastlenet.fuse(net)
    assert fused.fuse_report.dropouts == ["dropout1", "dropout2"]
    assert type(fused.dropout1) is fastlenet.nn.Dropout and type(net.dropout1) is nn.Dropout
    assert fused.dropout2.p == 0.5
    functional = fastlenet.fuse(_FunctionalDropoutNet())
    assert functional.fuse_report.dropouts == ["dropout"]
    calls = [n.target for n in functional.graph.nodes if n.op == "call_function"]
    assert dropout in calls and F.dropout not in calls
    x = torch.randn(6, 20)
    torch.manual_seed(4)
    want = _FunctionalDropoutNet.forward(functional, x)  # stock's F.dropout, the same weights
    torch.manual_seed(4)
    assert torch.equal(functional(x), want)


class _WithEncoderLayer(nn.Module):
    """A dropout of its own, and a torch.nn layer (which fx keeps whole) holding dropouts."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.drop = nn.Dropout(0.2)
        self.layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)

    def forward(self, x):
        return self.layer(self.drop(self.fc(x)))


def test_fuse_leaves_the_users_modules_as_they_are():
    torch.manual_seed(0)
    model = _WithEncoderLayer()
    fused = fastlenet.fuse(model)
    assert fused.fuse_report.dropouts == ["drop"]
    assert type(fused.drop) is fastlenet.nn.Dropout and type(model.drop) is nn.Dropout
    assert type(model.layer.dropout1) is type(fused.layer.dropout1) is nn.Dropout
    assert fused.layer.linear1.weight is model.layer.linear1.weight
    x = torch.randn(3, 5, 16)
    torch.manual_seed(1)
    want = model(x)
    torch.manual_seed(1)
    assert torch.equal(fused(x), want)


@pytest.mark.parametrize("make", [ExamplesNet, _RunsItsSequential], ids=["traced", "untraced"])
def test_a_deepcopy_keeps_the_report_and_computes_the_same(make):
    torch.manual_seed(0)
    fused = fastlenet.fuse(make())
    twin = copy.deepcopy(fused)
    assert twin.fuse_report == fused.fuse_report and twin.fuse_report.fused
    x = torch.randn(2, *((1, 28, 28) if make is ExamplesNet else (1, 10, 10)))
    fused.eval()
    twin.eval()
    assert torch.equal(twin(x), fused(x))
