"""Models written with stock layers, as users have them: one training step (forward,
cross-entropy, backward, SGD momentum step) of the model in eager mode, after
`fastlenet.fuse(model)`, under `torch.compile(model)` and under
`torch.compile(model, backend="fastlenet")`. Models: LeNet-5 and the Fashion-MNIST CNN (their
stock variants), pytorch/examples' MNIST Net and the CIFAR-10 network of PyTorch's tutorial;
batch 64 and 256 (where FASTLENET_BENCH_BATCHES has them).

Like bench_lenet5, every provider steps with SGD(momentum=0.9, fused=True) at lr=0, so every
round times the same weights.
"""

import functools

import harness
import pytest
import torch
import torch.nn.functional as F
from bench_lenet5 import check, train_step_fn

import fastlenet
from fastlenet.models import CifarTutorialNet, ExamplesNet, FashionCNN, LeNet5

OP = "fuse"
S = harness.settings()
BATCHES = [b for b in S.batches if b in (64, 256)]
# name: (model factory, input size)
MODELS = {
    "LeNet-5 1x32x32": (lambda: LeNet5(fused=False), (1, 32, 32)),
    "FashionCNN 1x28x28": (lambda: FashionCNN(fused=False), (1, 28, 28)),
    "pytorch/examples Net 1x28x28": (ExamplesNet, (1, 28, 28)),
    "CIFAR-10 tutorial Net 3x32x32": (CifarTutorialNet, (3, 32, 32)),
}
PROVIDERS = ("fastlenet-fuse", "fastlenet-compile", "eager", "compile")
CASES = [(m, b) for m in MODELS for b in BATCHES]


@functools.cache
def initial_state(name):
    torch.manual_seed(0)
    return MODELS[name][0]().state_dict()


def make_model(name):
    model = MODELS[name][0]()
    model.load_state_dict(initial_state(name))
    return model.to(S.device)


def make_data(name, batch):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *MODELS[name][1], generator=gen)
    return x.to(S.device), torch.randint(0, 10, (batch,), generator=gen).to(S.device)


@pytest.mark.parametrize(("name", "batch"), CASES, ids=[f"{m.split()[0]}-b{b}" for m, b in CASES])
def test_fuse(bench, compiled, name, batch):
    x, y = make_data(name, batch)
    models = {"eager": make_model(name), "fastlenet-fuse": fastlenet.fuse(make_model(name))}

    def build():
        """Both compiled providers under one cache key: a new key resets Dynamo's caches."""
        built, seconds = {}, {}
        for provider, backend in (("compile", "inductor"), ("fastlenet-compile", "fastlenet")):
            c = torch.compile(make_model(name), backend=backend, dynamic=False)
            first = lambda c=c: F.cross_entropy(c(x), y).backward()  # noqa: E731
            built[provider], seconds[provider] = c, harness.timed_first_call(first, S)
        return built, seconds

    built, compile_s = compiled((OP, name, batch), build)
    models.update(built)
    fns = {}
    for provider in PROVIDERS:
        model = models[provider].eval()  # dropout off while checked
        check(provider, model, x, y, "train_step", ref=make_model(name).double())
        model.train()
        fns[provider] = train_step_fn(models[provider], x, y)
    bench.run(
        op=OP, pass_="train_step", shape=name, batch=batch, flops=0, fns=fns, compile_s=compile_s
    )
