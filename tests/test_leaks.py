"""Leaks: long training keeps resident memory flat, and the autograd Functions free their graph
by reference counting alone (no reference cycles for the cycle collector to find)."""

import gc
import os
import subprocess
import sys
import threading
import types
import weakref

import pytest
import torch
import torch.nn.functional as F
from conftest import CPU_BACKENDS

from fastlenet import LeNet5
from fastlenet.backends import triton_interpreted
from fastlenet.functional import conv_relu_pool2d, linear, linear_relu

STEPS = 20_000
WARMUP = 4_000  # allocator pools, the autograd engine and OpenMP threads settle by then
# A leak of even one small tensor per step (the smallest, fc3's bias grad, is 40 bytes plus a
# ~300-byte TensorImpl) would add over 5 MB over the 16,000 measured steps.
MAX_GROWTH_BYTES = 4 * 2**20
PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()


@pytest.mark.slow
@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="needs the C++ extension")
def test_resident_memory_stops_growing():
    model = LeNet5(fused=True, backend="cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = [(torch.randn(2, 1, 32, 32), torch.randint(0, 10, (2,))) for _ in range(8)]
    samples = []
    for i in range(STEPS):
        x, y = batches[i % len(batches)]
        loss = _step(model, opt, x, y)
        if i >= WARMUP and i % 1000 == 0:
            samples.append(_rss_bytes())
    samples.append(_rss_bytes())
    assert torch.isfinite(torch.tensor(loss))
    growth = samples[-1] - samples[0]
    assert growth < MAX_GROWTH_BYTES, (
        f"resident memory grew by {growth / 2**20:.1f} MiB over {STEPS - WARMUP} steps: "
        f"{[round(s / 2**20, 1) for s in samples]} MiB"
    )


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="needs the C++ extension")
def test_short_lived_threads_leave_no_scratch_behind():
    """Each thread keeps the kernels' freed scratch buffers for its next call (csrc/cpu_vec.h,
    ScratchCache) and frees them when it exits: training steps on one short-lived thread after
    another keep resident memory flat. Left behind, a thread's buffers (its own and its OpenMP
    worker's) add ~0.5 MiB: 60 threads ~30 MiB (measured with the exit's free taken out); with
    them freed, glibc's per-thread arenas still add up to ~8 MiB over the first few hundred
    threads (as before the cache), hence the bound."""
    model = LeNet5(fused=True, backend="cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(64, 1, 32, 32), torch.randint(0, 10, (64,))
    errors = []

    def steps():
        try:
            for _ in range(2):
                _step(model, opt, x, y)
        except Exception as e:  # reported by the assertion below
            errors.append(e)

    def on_threads(count):
        for _ in range(count):
            t = threading.Thread(target=steps)
            t.start()
            t.join()

    on_threads(10)  # the allocators' arenas and pools settle
    before = _rss_bytes()
    on_threads(60)
    growth = _rss_bytes() - before
    assert not errors, errors
    assert growth < 16 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MiB"


def _one_graph(backend, run_backward):
    """Weak references to tensors saved for backward by each fused op, after the graph is
    built (and, if asked, backpropagated) and every strong reference is dropped."""
    x = torch.randn(2, 1, 12, 12, requires_grad=True)
    w1 = torch.randn(3, 1, 3, 3, requires_grad=True)
    w2 = torch.randn(4, 3 * 5 * 5, requires_grad=True)
    w3 = torch.randn(2, 4, requires_grad=True)
    h = conv_relu_pool2d(x, w1, None, backend=backend)
    h2 = linear_relu(h.flatten(1), w2, None, backend=backend)
    out = linear(h2, w3, None, backend=backend)
    refs = [weakref.ref(t) for t in (x, w1, w2, w3, h, h2, out)]
    if run_backward:
        out.sum().backward()
    return refs


def _run_isolated(request) -> bool:
    """Runs the calling test again in a fresh interpreter and asserts it passed there; returns
    False inside that interpreter, where the test does its own checks. Needed by the gc tests:
    once torch.compile has traced an autograd.Function in the same process, torch's functorch
    layer builds a new autograd.Function class (cyclic garbage of torch's own) on later eager
    calls, whatever the Function."""
    if os.environ.get("FASTLENET_ISOLATED") == "1":
        return False
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", request.node.nodeid],
        cwd=request.config.rootpath,
        env={**os.environ, "FASTLENET_ISOLATED": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-2000:]
    assert "1 passed" in child.stdout, child.stdout[-4000:]
    return True


def _outside_triton_interpreter(garbage):
    """The garbage objects not reachable from a function of Triton's CPU interpreter, whose
    GridExecutor builds recursive closures (a cycle per launch) to copy arguments: that is
    Triton's interpreter, not fastlenet, and GPU launches do not use it."""
    ids = {id(o) for o in garbage}
    stack = [
        o
        for o in garbage
        if isinstance(o, types.FunctionType) and o.__module__ == "triton.runtime.interpreter"
    ]
    seen = set()
    while stack:
        o = stack.pop()
        if id(o) not in seen:
            seen.add(id(o))
            stack.extend(r for r in gc.get_referents(o) if id(r) in ids)
    return [o for o in garbage if id(o) not in seen]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("run_backward", [True, False], ids=["backward", "forward_only"])
def test_graph_is_freed_without_the_cycle_collector(run_backward, backend, request):
    if _run_isolated(request):
        return
    _one_graph(backend, run_backward)  # first calls import, compile and cache things
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        refs = _one_graph(backend, run_backward)
        alive = [i for i, r in enumerate(refs) if r() is not None]
        gc.collect()
        cycles = _outside_triton_interpreter(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert cycles == [], f"reference cycles: {sorted({type(o).__name__ for o in cycles})}"
    if backend == "triton" and triton_interpreted():
        # Triton's interpreter keeps launch arguments in its own cycles (see above) until the
        # collector runs; then everything must be gone.
        gc.collect()
        alive = [i for i, r in enumerate(refs) if r() is not None]
    assert alive == [], f"tensors {alive} (of x, w1, w2, w3, h, h2, out) outlive their graph"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_training_steps_leave_no_garbage_cycles(backend, request):
    """After warm-up, fused training steps create nothing the cycle collector would have to
    free: every object they make is freed by reference counting."""
    if _run_isolated(request):
        return
    model = LeNet5(fused=True, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(2, 1, 32, 32), torch.randint(0, 10, (2,))
    _step(model, opt, x, y)  # first calls import and cache things
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(3):
            _step(model, opt, x, y)
            model(x)  # a graph that is never backpropagated
        gc.collect()
        garbage = _outside_triton_interpreter(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    kinds = sorted({type(o).__name__ for o in garbage})
    assert garbage == [], f"{len(garbage)} objects in reference cycles: {kinds}"
