"""conv2d -> ReLU -> max_pool2d at LeNet-5's two layer shapes: fastlenet backends against the
stock composition (eager and torch.compile), forward / backward / full, per batch size; and
the bytes each saves for backward.

conv1: (N, 1, 32, 32) -> conv 6@5x5 -> (N, 6, 28, 28) -> pool 2 -> (N, 6, 14, 14); its input
is the data, so (as in LeNet-5) no input gradient is computed.
conv2: (N, 6, 14, 14) -> conv 16@5x5 -> (N, 16, 10, 10) -> pool 2 -> (N, 16, 5, 5).
"""

import dataclasses

import harness
import pytest
import torch
import torch.nn.functional as F

from fastlenet import reference
from fastlenet.conv_relu_pool import conv_relu_pool2d

OP = "conv_relu_pool"


@dataclasses.dataclass(frozen=True)
class ConvShape:
    in_ch: int
    out_ch: int
    hw: int
    kernel: int
    input_grad: bool

    @property
    def conv_hw(self) -> int:
        return self.hw - self.kernel + 1

    def describe(self, layer: str) -> str:
        return f"{layer} {self.in_ch}->{self.out_ch} {self.hw}x{self.hw} k{self.kernel}"

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


def stock(x, w, b):
    """The composition users write: conv2d, relu, max_pool2d."""
    return F.max_pool2d(F.relu(F.conv2d(x, w, b)), 2)


def make_inputs(shape: ConvShape, batch: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    fan_in = shape.in_ch * shape.kernel**2
    x = torch.randn(batch, shape.in_ch, shape.hw, shape.hw, generator=gen)
    w = torch.randn(shape.out_ch, shape.in_ch, shape.kernel, shape.kernel, generator=gen)
    w /= fan_in**0.5
    b = torch.randn(shape.out_ch, generator=gen) * 0.1
    pooled = shape.conv_hw // 2
    g = torch.randn(batch, shape.out_ch, pooled, pooled, generator=gen)
    dev = S.device
    x = x.to(dev).requires_grad_(shape.input_grad)
    return x, w.to(dev).requires_grad_(), b.to(dev).requires_grad_(), g.to(dev)


def check(provider, f, x, w, b, g):
    """Forward output and every gradient of f against the float64 stock composition."""
    xd, wd, bd = (t.detach().double().requires_grad_(t.requires_grad) for t in (x, w, b))
    yd = reference.conv_relu_pool2d(xd, wd, bd, (1, 1), (0, 0), (2, 2), (2, 2))
    yd.backward(g.double())
    harness.clear_grads([x, w, b])
    y = f(x, w, b)
    y.backward(g)
    harness.check_parity(provider, "output", y, yd, "forward")
    harness.check_parity(provider, "grad_weight", w.grad, wd.grad, "grad")
    harness.check_parity(provider, "grad_bias", b.grad, bd.grad, "grad")
    if x.requires_grad:
        harness.check_parity(provider, "grad_input", x.grad, xd.grad, "grad")
    harness.clear_grads([x, w, b])


def fused(backend):
    return lambda x, w, b: conv_relu_pool2d(x, w, b, backend=backend)


def providers(layer, batch, compiled, x, w, b, g):
    """{provider: f(x, w, b)} and {provider: compile seconds}."""
    fns, compile_s = {}, {}
    for name in S.providers:
        if name.startswith("fastlenet-"):
            fns[name] = fused(name.removeprefix("fastlenet-"))
        elif name == "eager":
            fns[name] = stock

    if "compile" in S.providers:

        def build():
            c = torch.compile(stock, dynamic=False)
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
        check(name, f, x, w, b, g)
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
    fns = {n: fused(n.removeprefix("fastlenet-")) for n in S.fastlenet_providers}
    fns["eager"] = stock
    if "compile" in S.providers:

        def build():
            c = torch.compile(stock, dynamic=False)
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
