"""linear -> ReLU at LeNet-5's fully connected shapes (fc1 400->120, fc2 120->84) and the
plain linear fc3 84->10 (the same op with relu=False): fastlenet backends against stock
F.linear + F.relu (eager and torch.compile), forward / backward / full, per batch size.

input (N, in), weight (out, in), bias (out,), output (N, out); every input needs a gradient,
as inside LeNet-5.

The shape sweep (issue 16: never slower than stock at the FC layers of LeNet-5, the
Fashion-MNIST CNN, pytorch/examples' Net and MLPs with 784-12544 inputs and 10-512 outputs):
SWEEP's shapes against stock eager, as bench_conv_relu_pool's sweep times its shapes (batch
64 and 256, inference / backward / full, FASTLENET_BENCH_SWEEP_CASE_S), and at FEW_ROWS' batches
(a handful of samples: the CPU forward's dot-product range); op `linear_relu_sweep`.
"""

import dataclasses
import functools

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
    """Forward output (recorded and under no_grad) against the float64 stock composition, and
    every gradient of f against the float64 reference's backward through f's own ReLU mask: an
    output within float32 rounding of 0 may fall on the other side of it than the float64
    forward's, and that one unit moves the whole row of grad_input (256 x 12544 -> 512: one
    such output of 131072 put its norm 7.7e-3 off, where a wrong kernel is O(1) off)."""
    xd, wd, bd = (t.detach().double() for t in (x, w, b))
    yd = reference.linear_relu(xd, wd, bd, relu)
    harness.clear_grads([x, w, b])
    y = f(x, w, b)
    y.backward(g)
    harness.check_parity(provider, "output", y, yd, "forward")
    with torch.no_grad():  # the inference pass's path
        harness.check_parity(provider, "output under no_grad", f(x, w, b), yd, "forward")
    want = reference.linear_relu_bwd(g.double(), y.detach().double(), xd, wd, relu)
    for what, got, ref in zip(
        ("grad_input", "grad_weight", "grad_bias"), (x, w, b), want, strict=True
    ):
        harness.check_parity(provider, what, got.grad, ref, "grad")
    harness.clear_grads([x, w, b])


def eager_providers(shape: LinearShape):
    """{provider: f(x, w, b)} of the fastlenet backends and stock eager."""
    fns = {}
    for name in S.providers:
        if name.startswith("fastlenet-"):
            fns[name] = fused_fn(name.removeprefix("fastlenet-"), shape.relu)
        elif name == "eager":
            fns[name] = stock_fn(shape.relu)
    return fns


@pytest.mark.parametrize(
    ("layer", "batch", "pass_"), CASES, ids=[f"{c[0]}-b{c[1]}-{c[2]}" for c in CASES]
)
def test_linear_relu(bench, compiled, layer, batch, pass_):
    shape = SHAPES[layer]
    x, w, b, g = make_inputs(shape, batch)
    fns, compile_s = eager_providers(shape), {}
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


# --------------------------------------------------------------------------------------------
# The shape sweep (see the module docstring)

SWEEP = {
    "lenet5-fc1": SHAPES["fc1"],
    "lenet5-fc2": SHAPES["fc2"],
    "lenet5-fc3": SHAPES["fc3"],
    "fashion-fc": LinearShape(1568, 10, relu=False),
    "examples-fc1": LinearShape(9216, 128, relu=True),
    "examples-fc2": LinearShape(128, 10, relu=False),
    "mlp-784-512": LinearShape(784, 512, relu=True),
    "mlp-784-10": LinearShape(784, 10, relu=False),
    "mlp-12544-512": LinearShape(12544, 512, relu=True),
    "mlp-12544-10": LinearShape(12544, 10, relu=False),
}
SWEEP_OP = "linear_relu_sweep"
# Batches of a few samples (inference of a handful of images, small online batches): the CPU
# forward takes dot products there instead of its packed GEMM (csrc/linear_relu_cpu.cpp,
# dot_suits), and stock's BLAS calls its matrix-vector paths.
FEW_ROWS = (4, 8)
SWEEP_CASES = harness.sweep_cases(SWEEP, S) + [
    (name, batch, pass_) for name in SWEEP for batch in FEW_ROWS for pass_ in ("inference", "full")
]


@functools.lru_cache(maxsize=1)
def checked_sweep_inputs(name: str, batch: int):
    """Once per shape and batch, not per pass (a shape's cases run one after another)."""
    shape = SWEEP[name]
    providers = eager_providers(shape)
    return harness.checked_inputs(
        make_inputs(shape, batch), providers, lambda p, f, *t: check(p, f, shape.relu, *t)
    )


@pytest.mark.parametrize(
    ("name", "batch", "pass_"), SWEEP_CASES, ids=[f"{c[0]}-b{c[1]}-{c[2]}" for c in SWEEP_CASES]
)
def test_linear_relu_sweep(bench, name, batch, pass_):
    inputs = checked_sweep_inputs(name, batch)
    fns = eager_providers(SWEEP[name])
    harness.run_sweep_case(bench, SWEEP_OP, name, SWEEP[name], batch, pass_, inputs, fns, S)
