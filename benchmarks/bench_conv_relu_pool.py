"""conv2d -> ReLU -> max_pool2d at LeNet-5's two layer shapes: fastlenet backends against the
stock composition (eager and torch.compile), forward / backward / full, per batch size; and
the bytes each saves for backward.

conv1: (N, 1, 32, 32) -> conv 6@5x5 -> (N, 6, 28, 28) -> pool 2 -> (N, 6, 14, 14); its input
is the data, so (as in LeNet-5) no input gradient is computed.
conv2: (N, 6, 14, 14) -> conv 16@5x5 -> (N, 16, 10, 10) -> pool 2 -> (N, 16, 5, 5).

The shape sweep (issue 16, `pytest benchmarks -k sweep`): the fastlenet backends against stock
eager at SWEEP's shapes (the conv layers of LeNet-5, the Fashion-MNIST CNN, pytorch/examples'
Net and VGG-style stacks, and the corners of the envelope: 1-128 input and 6-128 output
channels, odd counts among them, 3x3 and 5x5 kernels, padding 0 to k//2, 8x8 to 32x32 inputs,
pool 2, pool 3 stride 2 and no pool), batch 64 and 256 only, passes inference (forward under
torch.no_grad; FASTLENET_BENCH_PASSES' "forward" selects it), backward and full, each case with
the smaller budget FASTLENET_BENCH_SWEEP_CASE_S. Rows have op `conv_relu_pool_sweep`;
report.py tables them in results/sweep_<device>.md, plot.py draws results/sweep_<device>.png.
"""

import dataclasses
import functools

import harness
import pytest
import torch
import torch.nn.functional as F

from fastlenet import reference
from fastlenet.conv_relu_pool import conv_relu_pool2d

OP = "conv_relu_pool"


@dataclasses.dataclass(frozen=True)
class ConvShape:
    """A square conv layer with stride 1 and its pooling (pool=1: none)."""

    in_ch: int
    out_ch: int
    hw: int
    kernel: int
    input_grad: bool  # False for a network's first layer: its input is the data
    padding: int = 0
    pool: int = 2
    pool_stride: int = 2

    @property
    def conv_hw(self) -> int:
        return self.hw + 2 * self.padding - self.kernel + 1

    @property
    def pooled_hw(self) -> int:
        return (self.conv_hw - self.pool) // self.pool_stride + 1

    def describe(self, layer: str) -> str:
        """e.g. "conv1 1->6 32x32 k5", then " p2" for padding and " no-pool" or " pool3/2"
        where the pooling is not 2 with stride 2."""
        out = f"{layer} {self.in_ch}->{self.out_ch} {self.hw}x{self.hw} k{self.kernel}"
        if self.padding:
            out += f" p{self.padding}"
        if self.pool == 1:
            return out + " no-pool"
        if (self.pool, self.pool_stride) != (2, 2):
            out += f" pool{self.pool}/{self.pool_stride}"
        return out

    def flops(self, batch: int, pass_: str) -> int:
        hw, k = (self.conv_hw,) * 2, (self.kernel,) * 2
        fwd = harness.conv_flops(batch, self.in_ch, self.out_ch, hw, k)
        return harness.pass_flops(fwd, self.input_grad, pass_)


SHAPES = {
    "conv1": ConvShape(1, 6, 32, 5, input_grad=False),
    "conv2": ConvShape(6, 16, 14, 5, input_grad=True),
}
S = harness.settings()
CASES = [(layer, b, p) for layer in SHAPES for b in S.batches for p in S.passes]


def stock_fn(shape: ConvShape):
    """The composition users write: conv2d, relu, max_pool2d (none when pool is 1)."""

    def stock(x, w, b):
        y = F.relu(F.conv2d(x, w, b, padding=shape.padding))
        return y if shape.pool == 1 else F.max_pool2d(y, shape.pool, shape.pool_stride)

    return stock


def make_inputs(shape: ConvShape, batch: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    fan_in = shape.in_ch * shape.kernel**2
    x = torch.randn(batch, shape.in_ch, shape.hw, shape.hw, generator=gen)
    w = torch.randn(shape.out_ch, shape.in_ch, shape.kernel, shape.kernel, generator=gen)
    w /= fan_in**0.5
    b = torch.randn(shape.out_ch, generator=gen) * 0.1
    pooled = shape.pooled_hw
    g = torch.randn(batch, shape.out_ch, pooled, pooled, generator=gen)
    dev = S.device
    x = x.to(dev).requires_grad_(shape.input_grad)
    return x, w.to(dev).requires_grad_(), b.to(dev).requires_grad_(), g.to(dev)


def check(provider, f, shape, x, w, b, g):
    """Forward output (recorded and under no_grad) and every gradient of f against the float64
    stock composition."""
    xd, wd, bd = (t.detach().double().requires_grad_(t.requires_grad) for t in (x, w, b))
    pad, pool, pool_stride = ((v, v) for v in (shape.padding, shape.pool, shape.pool_stride))
    yd = reference.conv_relu_pool2d(xd, wd, bd, (1, 1), pad, pool, pool_stride)
    yd.backward(g.double())
    harness.clear_grads([x, w, b])
    y = f(x, w, b)
    y.backward(g)
    harness.check_parity(provider, "output", y, yd, "forward")
    with torch.no_grad():  # the inference pass's path
        harness.check_parity(provider, "output under no_grad", f(x, w, b), yd, "forward")
    harness.check_parity(provider, "grad_weight", w.grad, wd.grad, "grad")
    harness.check_parity(provider, "grad_bias", b.grad, bd.grad, "grad")
    if x.requires_grad:
        harness.check_parity(provider, "grad_input", x.grad, xd.grad, "grad")
    harness.clear_grads([x, w, b])


def fused_fn(backend, shape: ConvShape):
    def fused(x, w, b):
        return conv_relu_pool2d(
            x, w, b, 1, shape.padding, shape.pool, shape.pool_stride, backend=backend
        )

    return fused


def eager_providers(shape: ConvShape):
    """{provider: f(x, w, b)} of the fastlenet backends and stock eager."""
    fns = {}
    for name in S.providers:
        if name.startswith("fastlenet-"):
            fns[name] = fused_fn(name.removeprefix("fastlenet-"), shape)
        elif name == "eager":
            fns[name] = stock_fn(shape)
    return fns


def providers(layer, batch, compiled, x, w, b, g):
    """{provider: f(x, w, b)} and {provider: compile seconds}."""
    shape = SHAPES[layer]
    fns, compile_s = eager_providers(shape), {}
    if "compile" in S.providers:

        def build():
            c = torch.compile(stock_fn(shape), dynamic=False)
            seconds = harness.timed_first_call(lambda: c(x, w, b).backward(g), S)
            return c, seconds

        fns["compile"], compile_s["compile"] = compiled((OP, layer, batch), build)
    return fns, compile_s


@pytest.mark.parametrize(
    ("layer", "batch", "pass_"), CASES, ids=[f"{c[0]}-b{c[1]}-{c[2]}" for c in CASES]
)
def test_conv_relu_pool(bench, compiled, layer, batch, pass_):
    shape = SHAPES[layer]
    x, w, b, g = make_inputs(shape, batch)
    fns, compile_s = providers(layer, batch, compiled, x, w, b, g)
    for name, f in fns.items():
        check(name, f, shape, x, w, b, g)
    bench.run(
        op=OP,
        pass_=pass_,
        shape=shape.describe(layer),
        batch=batch,
        flops=shape.flops(batch, pass_),
        fns={name: harness.op_pass_fn(f, (x, w, b), g, pass_) for name, f in fns.items()},
        compile_s=compile_s,
    )


#: batch of the saved-for-backward measurement (bytes scale linearly with it).
SAVED_BATCH = 64


@pytest.mark.parametrize("layer", list(SHAPES))
def test_conv_relu_pool_saved_bytes(saved_recorder, compiled, layer):
    """Bytes autograd keeps for backward, per provider, measured with saved_tensors_hooks.

    A saved tensor counts as the layer's input (or a parameter) only when it shares that
    tensor's storage: a copy that a compiled graph saves (another layout, say) is counted
    as an activation, since it is memory held for backward on top of the input.
    """
    shape = SHAPES[layer]
    x, w, b, g = make_inputs(shape, SAVED_BATCH)
    fns = {n: fused_fn(n.removeprefix("fastlenet-"), shape) for n in S.fastlenet_providers}
    fns["eager"] = stock_fn(shape)
    if "compile" in S.providers:

        def build():
            c = torch.compile(stock_fn(shape), dynamic=False)
            c(x, w, b).backward(g)
            return c

        fns["compile"] = compiled((OP, "saved", layer), build)
    results = {}
    for name, f in fns.items():
        saved = harness.saved_for_backward(
            lambda f=f: f(x, w, b), {"input": x, "weight": w, "bias": b}
        )
        results[name] = saved
        saved_recorder(
            provider=name, op=OP, shape=shape.describe(layer), batch=SAVED_BATCH, saved=saved
        )
    for name, saved in results.items():
        assert saved, f"{name}: nothing was saved for backward (hooks not reached?)"


# --------------------------------------------------------------------------------------------
# The shape sweep (see the module docstring)

NO_POOL = {"pool": 1, "pool_stride": 1}
SWEEP = {
    # the conv layers of the networks fastlenet is used with
    "lenet5-conv1": ConvShape(1, 6, 32, 5, input_grad=False),
    "lenet5-conv2": ConvShape(6, 16, 14, 5, input_grad=True),
    "fashion-conv1": ConvShape(1, 16, 28, 5, input_grad=False, padding=2),
    "fashion-conv2": ConvShape(16, 32, 14, 5, input_grad=True, padding=2),
    "examples-conv1": ConvShape(1, 32, 28, 3, input_grad=False, **NO_POOL),
    "examples-conv2": ConvShape(32, 64, 26, 3, input_grad=True),
    "vgg-32-64": ConvShape(32, 64, 16, 3, input_grad=True, padding=1),
    "vgg-64-128": ConvShape(64, 128, 8, 3, input_grad=True, padding=1),
    "vgg-128-128": ConvShape(128, 128, 8, 3, input_grad=True, padding=1),
    "vgg-128-128-nopool": ConvShape(128, 128, 8, 3, input_grad=True, padding=1, **NO_POOL),
    # a VGG block's first conv on CIFAR-sized input: channels on oneDNN's blocks, a large plane
    "vgg-32-32-nopool": ConvShape(32, 32, 32, 3, input_grad=True, padding=1, **NO_POOL),
    "nopool-6-16": ConvShape(6, 16, 30, 3, input_grad=True, **NO_POOL),
    "nopool-3-16": ConvShape(3, 16, 32, 3, input_grad=False, padding=1, **NO_POOL),  # RGB input
    # the corners of the envelope, odd channel counts and sizes
    "min-8x8": ConvShape(1, 6, 8, 3, input_grad=False),
    "min-8x8-pool3": ConvShape(1, 6, 8, 5, input_grad=False, padding=2, pool=3),
    "odd-10-22": ConvShape(10, 22, 20, 3, input_grad=True, padding=1),
    "odd-10-22-pool3": ConvShape(10, 22, 20, 5, input_grad=True, pool=3),
    "odd-3-7-pool3": ConvShape(3, 7, 17, 5, input_grad=False, padding=1, pool=3),
    "odd-13-29-nopool": ConvShape(13, 29, 11, 3, input_grad=True, **NO_POOL),
    "wide-out-32x32": ConvShape(1, 128, 32, 3, input_grad=False, padding=1),
    "wide-in-32x32": ConvShape(128, 6, 32, 3, input_grad=True, padding=1),
    # few outputs from deep input over a mid-sized plane, off oneDNN's blocks of 16 outputs
    "wide-in-16x16": ConvShape(64, 10, 16, 3, input_grad=True, padding=1),
    "pool3-16-32": ConvShape(16, 32, 32, 3, input_grad=True, padding=1, pool=3),
    "pool3-64-96": ConvShape(64, 96, 12, 3, input_grad=True, padding=1, pool=3),
    "nopool-6-16-k5": ConvShape(6, 16, 16, 5, input_grad=True, padding=2, **NO_POOL),
    "mid-16-16": ConvShape(16, 16, 24, 3, input_grad=True, padding=1),
    "mid-24-40-k5": ConvShape(24, 40, 20, 5, input_grad=True),
}
SWEEP_OP = "conv_relu_pool_sweep"
SWEEP_CASES = harness.sweep_cases(SWEEP, S)


@functools.lru_cache(maxsize=1)
def checked_sweep_inputs(name: str, batch: int):
    """Once per shape and batch, not per pass (a shape's cases run one after another)."""
    shape = SWEEP[name]
    providers = eager_providers(shape)
    return harness.checked_inputs(
        make_inputs(shape, batch), providers, lambda p, f, *t: check(p, f, shape, *t)
    )


@pytest.mark.parametrize(
    ("name", "batch", "pass_"), SWEEP_CASES, ids=[f"{c[0]}-b{c[1]}-{c[2]}" for c in SWEEP_CASES]
)
def test_conv_relu_pool_sweep(bench, name, batch, pass_):
    inputs = checked_sweep_inputs(name, batch)
    fns = eager_providers(SWEEP[name])
    harness.run_sweep_case(bench, SWEEP_OP, name, SWEEP[name], batch, pass_, inputs, fns, S)
