"""The whole LeNet-5: one training step (forward, cross-entropy loss, backward, SGD momentum
step) and forward-only inference, per batch size, for every fastlenet backend against the
stock model (eager and torch.compile of the model; the loss and optimizer stay eager).

Input (N, 1, 32, 32) standard normal, labels uniform in 0..9. In `train_step` every provider
steps with the optimizer `fastlenet.train` builds, SGD(momentum=0.9, fused=True): the fastest
stock one on CPU, so stock is not slowed by a per-parameter loop fastlenet's own training does
not run; `train_step_sgd` steps with torch.optim.SGD(momentum=0.9) as users write it (its
default implementation), on every side alike. The optimizer runs with lr=0: the step does
all its arithmetic, but every step sees the same weights. The fused backward skips pooling
windows and units that pass no gradient, so weights drifting over thousands of timed steps
would change how much work it does; with lr=0 all providers time the same model at every
round.
"""

import functools

import harness
import pytest
import torch
import torch.nn.functional as F

from fastlenet.models import LeNet5

OP = "lenet5"
PASSES = ("train_step", "train_step_sgd", "inference")
TRAINING = ("train_step", "train_step_sgd")
S = harness.settings()
CASES = [(b, p) for b in S.batches for p in PASSES]
SHAPE = "1x32x32 -> 10"


def flops(batch: int, pass_: str) -> int:
    """Useful FLOPs of one call (see harness: dense conv/matmul MACs x 2)."""
    convs = [(1, 6, (28, 28), False), (6, 16, (10, 10), True)]  # (in, out, conv hw, input grad)
    fcs = [(400, 120), (120, 84), (84, 10)]
    total = 0
    for cin, cout, hw, input_grad in convs:
        fwd = harness.conv_flops(batch, cin, cout, hw, (5, 5))
        total += harness.pass_flops(fwd, input_grad, "full" if pass_ in TRAINING else "forward")
    for fin, fout in fcs:
        fwd = harness.linear_flops(batch, fin, fout)
        total += harness.pass_flops(fwd, True, "full" if pass_ in TRAINING else "forward")
    return total


def make_data(batch: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 32, 32, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    return x.to(S.device), y.to(S.device)


@functools.cache
def initial_state():
    torch.manual_seed(0)
    return LeNet5(fused=False).state_dict()


def make_model(provider: str):
    if provider.startswith("fastlenet-"):
        model = LeNet5(fused=True, backend=provider.removeprefix("fastlenet-"))
    else:
        model = LeNet5(fused=False)
    model.load_state_dict(initial_state())
    return model.to(S.device)


def train_step_fn(model, x, y, fused_sgd=True):
    fused = {"fused": True} if fused_sgd else {}  # else SGD's default: a loop per parameter on CPU
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, **fused)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def inference_fn(model, x):
    model.eval()

    def infer():
        with torch.inference_mode():
            return model(x)

    return infer


def check(provider, model, x, y, pass_, ref=None):
    """Logits (and, for training, every parameter gradient) against the float64 stock model
    (`ref`, LeNet-5's by default; in eval mode, as `model` is checked)."""
    if ref is None:
        ref = LeNet5(fused=False).double().to(S.device)
        ref.load_state_dict(initial_state())
    ref.eval()
    if pass_ == "inference":
        with torch.inference_mode():
            harness.check_parity(provider, "logits", model(x), ref(x.double()), "forward")
        return
    model.zero_grad(set_to_none=True)
    logits = model(x)
    F.cross_entropy(logits, y).backward()
    ref_logits = ref(x.double())
    F.cross_entropy(ref_logits, y).backward()
    harness.check_parity(provider, "logits", logits, ref_logits, "forward")
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        name = name.removeprefix("_orig_mod.")  # torch.compile's wrapper module
        harness.check_parity(provider, f"{name}.grad", p.grad, ref_params[name].grad, "grad")
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize(("batch", "pass_"), CASES, ids=[f"b{b}-{p}" for b, p in CASES])
def test_lenet5(bench, compiled, batch, pass_):
    x, y = make_data(batch)
    models, compile_s = {}, {}
    for name in S.providers:
        if name != "compile":
            models[name] = make_model(name)
    if "compile" in S.providers:

        def build():
            model = make_model("compile")
            if pass_ == "inference":
                model.eval()
            c = torch.compile(model, dynamic=False)
            if pass_ == "inference":
                first = inference_fn(c, x)
            else:
                first = lambda: F.cross_entropy(c(x), y).backward()  # noqa: E731
            return c, harness.timed_first_call(first, S)

        # both training passes time the same compiled model (only the optimizer differs)
        key = (OP, "inference" if pass_ == "inference" else "train", batch)
        models["compile"], compile_s["compile"] = compiled(key, build)
    fns = {}
    for name, model in models.items():
        check(name, model, x, y, pass_)
        if pass_ in TRAINING:
            fns[name] = train_step_fn(model, x, y, fused_sgd=pass_ == "train_step")
        else:
            fns[name] = inference_fn(model, x)
    bench.run(
        op=OP,
        pass_=pass_,
        shape=SHAPE,
        batch=batch,
        flops=flops(batch, pass_),
        fns=fns,
        compile_s=compile_s,
    )
