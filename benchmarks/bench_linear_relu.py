"""linear -> ReLU at LeNet-5's fully connected shapes (fc1 400->120, fc2 120->84) and the
plain linear fc3 84->10 (the same op with relu=False): fastlenet backends against stock
F.linear + F.relu (eager and torch.compile), forward / backward / full, per batch size.

input (N, in), weight (out, in), bias (out,), output (N, out); every input needs a gradient,
as inside LeNet-5.
"""

import dataclasses

import harness
import pytest
import torch
import torch.nn.functional as F

from fastlenet import reference
from fastlenet.linear_relu import linear, linear_relu

OP = "linear_relu"


@dataclasses.dataclass(frozen=True)
class LinearShape:
    in_f: int
    out_f: int
    relu: bool

    def describe(self, layer: str) -> str:
        return f"{layer} {self.in_f}->{self.out_f}" + ("" if self.relu else " no-relu")

    def flops(self, batch: int, pass_: str) -> int:
        fwd = harness.linear_flops(batch, self.in_f, self.out_f)
        return harness.pass_flops(fwd, True, pass_)


SHAPES = {
    "fc1": LinearShape(400, 120, relu=True),
    "fc2": LinearShape(120, 84, relu=True),
    "fc3": LinearShape(84, 10, relu=False),
}
S = harness.settings()
CASES = [(layer, b, p) for layer in SHAPES for b in S.batches for p in S.passes]


def stock_fn(relu: bool):
    if relu:
        return lambda x, w, b: F.relu(F.linear(x, w, b))
    return F.linear


def fused_fn(backend: str, relu: bool):
    fn = linear_relu if relu else linear
    return lambda x, w, b: fn(x, w, b, backend=backend)


def make_inputs(shape: LinearShape, batch: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, shape.in_f, generator=gen)
    w = torch.randn(shape.out_f, shape.in_f, generator=gen) / shape.in_f**0.5
    b = torch.randn(shape.out_f, generator=gen) * 0.1
    g = torch.randn(batch, shape.out_f, generator=gen)
    dev = S.device
    return (*(t.to(dev).requires_grad_() for t in (x, w, b)), g.to(dev))


def check(provider, f, relu, x, w, b, g):
    """Forward output and every gradient of f against the float64 stock composition."""
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    yd = reference.linear_relu(xd, wd, bd, relu)
    yd.backward(g.double())
    harness.clear_grads([x, w, b])
    y = f(x, w, b)
    y.backward(g)
    harness.check_parity(provider, "output", y, yd, "forward")
    for what, got, want in (("grad_input", x, xd), ("grad_weight", w, wd), ("grad_bias", b, bd)):
        harness.check_parity(provider, what, got.grad, want.grad, "grad")
    harness.clear_grads([x, w, b])


@pytest.mark.parametrize(
    ("layer", "batch", "pass_"), CASES, ids=[f"{c[0]}-b{c[1]}-{c[2]}" for c in CASES]
)
def test_linear_relu(bench, compiled, layer, batch, pass_):
    shape = SHAPES[layer]
    x, w, b, g = make_inputs(shape, batch)
    fns, compile_s = {}, {}
    for name in S.providers:
        if name.startswith("fastlenet-"):
            fns[name] = fused_fn(name.removeprefix("fastlenet-"), shape.relu)
        elif name == "eager":
            fns[name] = stock_fn(shape.relu)
    if "compile" in S.providers:

        def build():
            c = torch.compile(stock_fn(shape.relu), dynamic=False)
            seconds = harness.timed_first_call(lambda: c(x, w, b).backward(g), S)
            return c, seconds

        fns["compile"], compile_s["compile"] = compiled((OP, layer, batch), build)
    for name, f in fns.items():
        check(name, f, shape.relu, x, w, b, g)
    bench.run(
        op=OP,
        pass_=pass_,
        shape=shape.describe(layer),
        batch=batch,
        flops=shape.flops(batch, pass_),
        fns={name: harness.op_pass_fn(f, (x, w, b), g, pass_) for name, f in fns.items()},
        compile_s=compile_s,
    )
