"""The LeNet-5 training step by part on the CPU, fastlenet against the same network with stock
layers: `zero_grad`, the forward, the cross-entropy, `backward()` and the optimizer's step, each
timed with perf_counter inside the training loop, medians over the steps. The benchmarks time
whole steps (bench_lenet5.py); this says where a step's time goes between the kernels, and
gives the per-part figures of benchmarks/results/README.md.

  python benchmarks/step_parts.py [--batch 1 64 256] [--optimizer fused default] [--steps 500]

Random inputs and labels, SGD with momentum 0.9 and lr 0 (every step sees the same weights, as
in bench_lenet5.py), the garbage collector paused while timing. The two models alternate, a
round of steps each, so that the VM's drift hits both; a part of one step is a few us to a few
ms, so the medians carry perf_counter's ~0.1 us and the loop's Python.
"""

import argparse
import gc
import statistics
import time

import torch
import torch.nn.functional as F

from fastlenet.models import LeNet5

PARTS = ("zero_grad", "forward", "loss", "backward", "opt.step", "step")
WARMUP = 50  # steps before timing: allocator, caches and the chain's per-shape checks settled
#: A block as large as the torch.mm product that bench_lenet5.py's process frees before it times
#: anything (its peak measurement, 2048 x 2048 float32). glibc raises its mmap threshold to the
#: size of the largest mmapped block freed so far (to 32 MiB at most): after such a block, the
#: stock model's activations (conv1's output is 1.2 MiB at batch 64) come from the heap; before
#: it, each step maps and page-faults them afresh. A training process has freed its dataset's
#: decode buffers by then. Batch 64, default SGD, medians of 400 steps, stock's step without a
#: block 3566 us, after this block 2722 us, after the product 2707 us (fastlenet's 517-523 us).
SETTLE_BYTES = 2048 * 2048 * 4
ROUNDS = 4  # rounds per model, alternating


def time_steps(model, opt, x, y, steps: int) -> dict[str, list[float]]:
    """Seconds per part of each of `steps` training steps."""
    clock = time.perf_counter
    times: dict[str, list[float]] = {p: [] for p in PARTS}
    for _ in range(steps):
        t0 = clock()
        opt.zero_grad()
        t1 = clock()
        out = model(x)
        t2 = clock()
        loss = F.cross_entropy(out, y)
        t3 = clock()
        loss.backward()
        t4 = clock()
        opt.step()
        t5 = clock()
        for part, t in zip(
            PARTS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t5 - t0), strict=True
        ):
            times[part].append(t)
    return times


def settle_allocator() -> None:
    """glibc's mmap threshold where bench_lenet5.py's process has it (SETTLE_BYTES)."""
    block = torch.ones(SETTLE_BYTES // 4)  # written, so that it is really mapped
    del block


def run(batch: int, optimizer: str, steps: int) -> dict[str, dict[str, float]]:
    """Median us per part, per model."""
    settle_allocator()
    torch.manual_seed(0)
    x = torch.randn(batch, 1, 32, 32)
    y = torch.randint(0, 10, (batch,))
    kwargs = {"fused": True} if optimizer == "fused" else {}
    runs = {}
    for name, fused in (("fastlenet", True), ("stock", False)):
        model = LeNet5(fused=fused)
        opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, **kwargs)
        time_steps(model, opt, x, y, WARMUP)
        runs[name] = (model, opt, {p: [] for p in PARTS})
    gc.disable()
    try:
        for _ in range(ROUNDS):
            for model, opt, times in runs.values():
                for part, ts in time_steps(model, opt, x, y, steps // ROUNDS).items():
                    times[part] += ts
    finally:
        gc.enable()
    return {
        name: {p: statistics.median(ts) * 1e6 for p, ts in times.items()}
        for name, (_, _, times) in runs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--optimizer", nargs="+", choices=("fused", "default"), default=["fused"])
    parser.add_argument("--steps", type=int, default=500, help="timed steps per model")
    args = parser.parse_args()
    if args.steps < ROUNDS:
        parser.error(
            f"--steps must be at least {ROUNDS} (a round of steps per model, {ROUNDS} rounds)"
        )
    print(
        f"LeNet-5 training step by part, us (medians of {args.steps} steps), "
        f"{torch.get_num_threads()} threads"
    )
    print()
    print("| batch | SGD | model | " + " | ".join(PARTS) + " |")
    print("| ---: | --- | --- |" + " ---: |" * len(PARTS))
    for batch in args.batch:
        for optimizer in args.optimizer:
            medians = run(batch, optimizer, args.steps)
            for name, parts in medians.items():
                cells = " | ".join(f"{parts[p]:.1f}" for p in PARTS)
                print(f"| {batch} | {optimizer} | {name} | {cells} |")


if __name__ == "__main__":
    main()
