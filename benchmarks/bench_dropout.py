"""Dropout in training at the shapes of pytorch/examples' MNIST Net (after conv2 and pooling,
64 x 12 x 12, p 0.25; after fc1, 128, p 0.5): fastlenet's dropout against stock's F.dropout in
eager mode, forward / full, per batch size. No torch.compile row: compiled dropout draws other
numbers (Inductor's own generator), so it computes something else.

Both draw the same noise from the default generator (fastlenet/dropout.py); each call is
checked to give stock's output and gradient bit for bit from the same generator state.
"""

import dataclasses

import harness
import pytest
import torch
import torch.nn.functional as F

from fastlenet.dropout import dropout

OP = "dropout"


@dataclasses.dataclass(frozen=True)
class DropoutShape:
    features: tuple
    p: float

    def describe(self, layer: str) -> str:
        return f"{layer} {'x'.join(map(str, self.features))} p {self.p}"


SHAPES = {
    "examples-dropout1": DropoutShape((64, 12, 12), 0.25),
    "examples-dropout2": DropoutShape((128,), 0.5),
}
S = harness.settings()
PASSES = [p for p in S.passes if p in ("forward", "full")]  # backward alone is stock's mul
CASES = [(layer, b, p) for layer in SHAPES for b in S.batches for p in PASSES]
PROVIDERS = {
    "fastlenet-cpu": lambda x, p: dropout(x, p, True),
    "eager": lambda x, p: F.dropout(x, p, True),
}


def check(provider, f, x, p, g):
    """Output and input gradient against stock's F.dropout from the same generator state."""
    results = []
    for fn in (F.dropout, f):
        torch.manual_seed(0)
        y = fn(x, p) if fn is f else fn(x, p, True)
        (gx,) = torch.autograd.grad(y, x, g)
        results.append((y, gx))
    for what, got, want in zip(("output", "grad_input"), results[1], results[0], strict=True):
        if not torch.equal(got, want):
            raise AssertionError(f"{provider}: {what} differs from stock's dropout")


@pytest.mark.skipif(S.device != "cpu", reason="the dropout kernel is the CPU's")
@pytest.mark.parametrize(
    ("layer", "batch", "pass_"), CASES, ids=[f"{c[0]}-b{c[1]}-{c[2]}" for c in CASES]
)
def test_dropout(bench, layer, batch, pass_):
    shape = SHAPES[layer]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape.features, generator=gen).requires_grad_()
    g = torch.randn(x.shape, generator=gen)
    fns = {name: PROVIDERS[name] for name in S.providers if name in PROVIDERS}
    for name, f in fns.items():
        check(name, f, x, shape.p, g)
    bench.run(
        op=OP,
        pass_=pass_,
        shape=shape.describe(layer),
        batch=batch,
        flops=0,
        fns={
            name: harness.op_pass_fn(lambda t, f=f: f(t, shape.p), (x,), g, pass_)
            for name, f in fns.items()
        },
    )
