"""Test accuracy against training seconds: `fastlenet train --plot PATH`.

One point per epoch at the training seconds of the model's own steps so far (evaluation and
data set-up not counted): fastlenet and, with --compare-stock, stock PyTorch from the same
weights on the same batches, on the same axes, with the 99% line. The points are the
`epochs` rows of the --metrics JSON (`test_accuracy` at `elapsed_train_seconds`, and
`stock_test_accuracy` at `stock_elapsed_train_seconds`), so the picture can be redrawn:

    python -m fastlenet plot METRICS.json PATH

Drawn with matplotlib's object API (no pyplot: no display backend chosen or changed);
fastlenet.train imports this module only when --plot is given.
"""

import os

from matplotlib.figure import Figure

TARGET = 0.99
COLORS = {"fastlenet": "#1f77b4", "stock": "#ff7f0e"}
_LABELS = {"fastlenet": "fastlenet", "stock": "stock PyTorch"}


def curves(metrics) -> dict:
    """{"fastlenet": (seconds, accuracies), "stock": (...) with --compare-stock}: each
    model's test accuracy per epoch against its training seconds so far."""
    rows = metrics["epochs"]
    out = {}
    for name, prefix in (("fastlenet", ""), ("stock", "stock_")):
        if not rows or any(f"{prefix}test_accuracy" not in row for row in rows):
            continue
        elapsed = [row.get(f"{prefix}elapsed_train_seconds") for row in rows]
        if None in elapsed:  # rows of a checkpoint written before these keys
            per_epoch = [row.get(f"{prefix}train_seconds") for row in rows]
            if None in per_epoch:
                continue
            elapsed = [sum(per_epoch[: i + 1]) for i in range(len(per_epoch))]
        out[name] = (elapsed, [row[f"{prefix}test_accuracy"] for row in rows])
    return out


def seconds_to(seconds, accuracies, target=TARGET):
    """Training seconds at the first epoch whose test accuracy reaches `target`, or None."""
    return next((s for s, a in zip(seconds, accuracies, strict=True) if a >= target), None)


def figure(metrics, target=TARGET) -> Figure:
    """The picture of `metrics` (what fastlenet.train returns and --metrics writes)."""
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    series = curves(metrics)
    for name, (seconds, accuracies) in series.items():
        reached = seconds_to(seconds, accuracies, target)
        label = _LABELS[name] + (
            f": {100 * target:g}% after {reached:.1f} s"
            if reached is not None
            else f": below {100 * target:g}%"
        )
        ax.plot(
            seconds,
            [100 * a for a in accuracies],
            marker="o",
            color=COLORS[name],
            label=label,
        )
    ax.axhline(100 * target, color="0.4", linestyle="--", linewidth=1, label=f"{100 * target:g}%")
    right = max((max(seconds) for seconds, _ in series.values()), default=0.0)
    ax.set_xlim(0, 1.05 * right if right > 0 else None)
    ax.set_xlabel("training seconds (the model's own steps)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(
        f"{metrics['model']} on {metrics['dataset']}, {metrics['threads']} threads, "
        f"{metrics['epochs_done']} epochs: one point per epoch",
        fontsize="medium",
    )
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best")
    return fig


def save(metrics, path, target=TARGET) -> None:
    """Writes the picture of `metrics` to `path` (format from its suffix; directory made)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    figure(metrics, target).savefig(path, dpi=120)
