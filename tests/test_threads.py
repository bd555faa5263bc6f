"""Thread safety: two Python threads training two fused models at the same time get bitwise the
results they get when trained one after the other."""

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from conftest import CPU_BACKENDS

from fastlenet import LeNet5
from fastlenet.backends import triton_interpreted

# Steps per model: enough for both threads to overlap for most of their run.
STEPS = 60


def _setup(backend, seed):
    torch.manual_seed(seed)
    model = LeNet5(fused=True, backend=backend)
    batches = [(torch.randn(8, 1, 32, 32), torch.randint(0, 10, (8,))) for _ in range(4)]
    return model, batches


def _train(model, batches, steps, start=None):
    """Trains in place; returns the loss of every step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if start is not None:
        start.wait()
    losses = []
    for i in range(steps):
        x, y = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_concurrent_training_is_bitwise_sequential(backend):
    if backend == "triton" and triton_interpreted():
        pytest.skip(
            "Triton's CPU interpreter keeps the launch grid in global state: one launch "
            "at a time (it fails with 'x >= grid_dim[0]' from two threads)"
        )
    steps = STEPS
    setups = [_setup(backend, seed) for seed in (1, 2)]
    sequential = [copy.deepcopy(model) for model, _ in setups]
    seq_losses = [
        _train(model, batches, steps)
        for model, (_, batches) in zip(sequential, setups, strict=True)
    ]

    concurrent = [copy.deepcopy(model) for model, _ in setups]
    results, errors = [None, None], []
    start = threading.Barrier(2)

    def worker(i):
        try:
            results[i] = _train(concurrent[i], setups[i][1], steps, start)
        except BaseException as exc:  # reported below, with the thread that raised it
            errors.append((i, exc))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []

    for i in range(2):
        assert torch.equal(results[i], seq_losses[i]), f"model {i}: losses differ"
        for (name, p), q in zip(
            concurrent[i].named_parameters(), sequential[i].parameters(), strict=True
        ):
            assert torch.equal(p, q), f"model {i}: {name} differs"
    # The two models did train, and differently (so the comparison is not vacuous).
    assert not torch.equal(seq_losses[0], seq_losses[1])
    for (model, _), trained in zip(setups, sequential, strict=True):
        for p, q in zip(model.parameters(), trained.parameters(), strict=True):
            assert not torch.equal(p, q)
