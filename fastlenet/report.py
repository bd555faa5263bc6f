"""Reporting a training run: the lines it prints, its progress bar, its metrics and their JSON.

fastlenet.train calls these; `run` is its Run (settings, data, models, history). None of them
changes the run.
"""

import json
import os
import sys
import time

import torch

# Relative loss difference between fused and stock steps that the parity tests require over
# 200 steps (float32); --compare-stock reports for how many steps the runs stay within it.
PARITY_TOL = 1e-4


def _plural(n, word):
    return f"{n} {word}{'' if n == 1 else 's'}"


def _fmt_rate(x):
    return f"{x:,.0f}"


# ----------------------------------------------------------------------------- lines


def start_line(run) -> str:
    """What the run trains, on what, and how: the first line it prints."""
    config, n_train, n_test = (
        run.config,
        len(run.dataset.train_labels),
        len(run.dataset.test_labels),
    )
    return (
        f"fastlenet: {config.model} on {config.dataset} ({n_train:,} train / {n_test:,} test "
        f"images from {run.dataset.source}); backend {run.backend} on {run.device}, "
        f"{run.threads} threads"
        + (f" x {run.dist.world_size} processes" if run.dist.world_size > 1 else "")
        + f"; {config.optimizer} lr {config.peak_lr:g} ({config.schedule}), weight decay "
        f"{config.decay:g}, batch {config.batch_size}, {_plural(config.epochs, 'epoch')}"
        + _fuse_lines(run.fused.model)
    )


def _fuse_lines(model) -> str:
    """What fastlenet.fuse did to a user's model (module:Class), as lines after the first."""
    report = getattr(model, "fuse_report", None)
    return "" if report is None else "\n" + str(report)


def epoch_line(config, row) -> str:
    """The line printed at the end of an epoch, from its row of the history."""
    line = (
        f"epoch {row['epoch']}/{config.epochs}: train loss {row['train_loss']:.4f}, "
        f"test accuracy {100 * row['test_accuracy']:.2f}%, "
        f"{row['wall_seconds']:.1f} s ({_fmt_rate(row['samples_per_second'])} samples/s)"
    )
    if "stock_test_accuracy" in row:
        line += f"; stock test accuracy {100 * row['stock_test_accuracy']:.2f}%"
    return line


def summary(say, config, m, last_epoch):
    """The lines printed at the end of a run, from its metrics `m`."""
    if not m["epochs"]:
        return
    say(
        f"{m['model']} on {m['dataset']}: test accuracy {100 * m['test_accuracy']:.2f}% after "
        f"{_plural(m['epochs_done'], 'epoch')}; {m['train_seconds']:.1f} s training "
        f"({_fmt_rate(m['samples_per_second'])} samples/s), {m['wall_seconds']:.1f} s wall; "
        f"backend {m['backend']}, {m['threads']} threads"
        + (f" x {m['nproc']} processes" if m["nproc"] > 1 else "")
    )
    if "stock" in m:
        s = m["stock"]
        say(
            f"stock PyTorch from the same weights on the same batches: test accuracy "
            f"{100 * s['test_accuracy']:.2f}%, {s['train_seconds']:.1f} s training "
            f"({_fmt_rate(s['samples_per_second'])} samples/s); fused speedup "
            f"{s['speedup']:.2f}x; per-step relative loss difference "
            f"max {s['max_rel_loss_diff']:.2e}, "
            f"mean {s['mean_rel_loss_diff']:.2e}, last {s['final_rel_loss_diff']:.2e}; within "
            f"{PARITY_TOL:g} for the first {s['steps_within_parity_tol']} of "
            f"{len(s['step_loss_fused'])} steps"
        )
    if last_epoch < config.epochs and config.checkpoint:
        say(
            f"stopped after epoch {last_epoch}/{config.epochs}: continue with --resume "
            f"{config.checkpoint}"
        )


def tensorboard_line(config, run_dirs) -> str:
    """Where --tensorboard writes, and how to watch it."""
    return (
        f"tensorboard: {', '.join(run_dirs.values())}; watch with: tensorboard --logdir "
        f"{config.tensorboard}"
    )


def config_text(run, name) -> str:
    """The settings of `run` as a markdown table, for the TensorBoard run `name` (fastlenet or
    stock): the run settings (defaults resolved) and where and how it ran."""
    config = run.config
    rows = {
        "model": f"{config.model} ({'stock PyTorch' if name == 'stock' else 'fastlenet fused'})",
        **{k: v for k, v in config.run_settings().items() if k != "model"},
        "data": f"{run.dataset.source} ({len(run.dataset.train_labels):,} train / "
        f"{len(run.dataset.test_labels):,} test images)",
        "backend": run.backend if name == "fastlenet" else "stock",
        "device": str(run.device),
        "threads": run.threads,
        "processes": run.dist.world_size,
        "log every": f"{config.log_every} steps",
        "torch": torch.__version__,
    }
    return "\n".join(
        ["| setting | value |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows.items())]
    )


# ----------------------------------------------------------------------------- progress bar


def progress(config, main, epoch, total, stream=None, name="fastlenet"):
    """A tqdm bar on stderr for one epoch of `total` images of model `name`, or None: no bar
    wanted, not the main process, or stderr is not a terminal (a log file gets the one line
    per epoch that train prints, not a redrawn bar)."""
    stream = sys.stderr if stream is None else stream
    if not (config.progress and main and stream.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=f"epoch {epoch + 1}/{config.epochs}" + ("" if name == "fastlenet" else f" {name}"),
        unit="img",
        unit_scale=True,
        leave=False,
        dynamic_ncols=True,
        file=stream,
    )


def progress_step(bar, n, i, num_steps, loss, seconds):
    """Advances `bar` by the `n` images of step `i` (of `num_steps`); every 50 steps and at the
    last, shows the step's loss and the rate over the `seconds` of training so far."""
    bar.update(n)
    if i % 50 == 0 or i == num_steps - 1:
        rate = (bar.n / seconds) if seconds > 0 else 0
        bar.set_postfix_str(f"loss {loss.item():.4f}, {_fmt_rate(rate)} samples/s")


# ----------------------------------------------------------------------------- metrics


def metrics(run, wall0) -> dict:
    """What a run returns and writes to --metrics: its settings, the per-epoch history, the
    training time of the fused model's steps and, with --compare-stock, the stock model's and
    the per-step loss differences. wall0: time.perf_counter() when the run started."""
    config, history, step_log = run.config, run.history, run.step_log
    fused, stock = run.fused, run.stock
    samples = sum(row["train_seconds"] * row["samples_per_second"] for row in history)
    last = history[-1] if history else {}
    result = {
        "model": config.model,
        "dataset": config.dataset,
        "backend": run.backend,
        "threads": run.threads,
        "nproc": run.dist.world_size,
        "torch": torch.__version__,
        "config": config.run_settings(),
        "epochs_done": len(history),
        "test_accuracy": last.get("test_accuracy"),
        "train_seconds": fused.seconds,
        "samples_per_second": samples / fused.seconds if fused.seconds > 0 else None,
        "wall_seconds": time.perf_counter() - wall0,
        "epochs": history,
    }
    if stock is not None and step_log["fused"]:
        f = torch.tensor(step_log["fused"], dtype=torch.float64)
        s = torch.tensor(step_log["stock"], dtype=torch.float64)
        rel = (f - s).abs() / s.abs().clamp_min(1e-30)
        result["stock"] = {
            "test_accuracy": last.get("stock_test_accuracy"),
            "train_seconds": stock.seconds,
            "samples_per_second": samples / stock.seconds if stock.seconds > 0 else None,
            "speedup": stock.seconds / fused.seconds if fused.seconds > 0 else None,
            "max_rel_loss_diff": rel.max().item(),
            "mean_rel_loss_diff": rel.mean().item(),
            "final_rel_loss_diff": rel[-1].item(),
            # Float rounding differs between the kernels, and SGD amplifies any difference
            # over many steps: how long the two runs agree to PARITY_TOL tells more than the
            # maximum over a whole run.
            "steps_within_parity_tol": int((rel < PARITY_TOL).int().cumprod(0).sum().item()),
            "step_loss_fused": step_log["fused"],
            "step_loss_stock": step_log["stock"],
        }
    return result


def write_json(obj, path):
    """`obj` as indented JSON to `path` (its directory made as needed), through a temporary
    file renamed over it."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
