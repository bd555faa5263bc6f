"""Draws the speedup of each fastlenet backend over stock eager PyTorch and over
torch.compile against batch size, from results/bench.csv (default: the latest run).

    python benchmarks/plot.py [--csv PATH] [--run RUN_ID] [--out PNG] [--sweep-out PNG]

One panel per benchmark (LeNet-5 training step and inference, then each op shape and pass);
solid lines: x stock eager, dashed: x torch.compile (paired ratios of the same run, see
harness.py); the dotted grey line is torch.compile over eager. Rows run with a non-default
allocator environment are drawn in their own colour and named in the legend.

A run with the shape sweeps (issue 16) also gets sweep_<device>.png: the ratio to stock eager
of every sweep shape, one panel per pass, with the 1.0x and 1.6x target lines.
"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
from report import SWEEP_OPS, SWEEP_PASSES, SWEEP_TARGETS, num, run_parser, run_rows, sweep_rows

PASSES = ("forward", "backward", "full")
#: The issue's speed target (3x over stock) drawn on every panel.
TARGET = 3.0


def panels(rows):
    """[(title, rows of that panel)] in reading order."""
    out = []
    for pass_, title in (("train_step", "training step"), ("inference", "inference")):
        sel = [r for r in rows if r["op"] == "lenet5" and r["pass"] == pass_]
        if sel:
            out.append((f"LeNet-5 {title}", sel))
    for op in ("conv_relu_pool", "linear_relu", "dropout"):
        shapes = dict.fromkeys(r["shape"] for r in rows if r["op"] == op)
        for shape in shapes:
            for pass_ in PASSES:
                sel = [
                    r for r in rows if r["op"] == op and r["shape"] == shape and r["pass"] == pass_
                ]
                if sel:
                    out.append((f"{op} {shape}\n{pass_}", sel))
    return out


def series(rows, provider, alloc, column):
    pts = sorted(
        (int(r["batch"]), num(r, column))
        for r in rows
        if r["provider"] == provider and r["alloc"] == alloc and num(r, column) is not None
    )
    return [p[0] for p in pts], [p[1] for p in pts]


def speedup_figure(run, rows):
    """The speedup panels of the op and model benchmarks (speedup_<device>.png)."""
    first = rows[0]
    fl_providers = sorted({r["provider"] for r in rows if r["provider"].startswith("fastlenet-")})
    allocs = sorted({r["alloc"] for r in rows}, key=lambda a: a != "default")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    style = {}
    for i, (p, a) in enumerate((p, a) for a in allocs for p in fl_providers):
        style[p, a] = colours[i % len(colours)]

    todo = panels(rows)
    ncols = 3
    nrows = -(-len(todo) // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(5 * ncols, 3.2 * nrows + 1.5), squeeze=False, layout="constrained"
    )
    ys = [num(r, c) for r in rows for c in ("vs_eager", "vs_compile") if num(r, c)]
    lo, hi = min([*ys, 0.5]) / 1.3, max([*ys, TARGET]) * 1.3
    batches = sorted({int(r["batch"]) for r in rows})
    handles = {}
    for ax, (title, sel) in zip(axes.flat, todo, strict=False):
        for a in allocs:
            tag = "" if a == "default" else f" [{a}]"
            for p in fl_providers:
                c = style[p, a]
                x, y = series(sel, p, a, "vs_eager")
                if x:
                    (h,) = ax.plot(x, y, "o-", color=c, label=f"{p} vs eager{tag}")
                    handles.setdefault(h.get_label(), h)
                x, y = series(sel, p, a, "vs_compile")
                if x:
                    (h,) = ax.plot(x, y, "s--", color=c, label=f"{p} vs torch.compile{tag}")
                    handles.setdefault(h.get_label(), h)
            x, y = series(sel, "compile", a, "vs_eager")
            if x and a == "default":
                (h,) = ax.plot(x, y, "x:", color="grey", label="torch.compile vs eager")
                handles.setdefault(h.get_label(), h)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(TARGET, color="tab:red", linewidth=0.8, linestyle="-.")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_ylim(lo, hi)
        ax.xaxis.set_major_locator(FixedLocator(batches))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("batch size")
        if ax in axes[:, 0]:
            ax.set_ylabel("speedup (baseline time / time)")
        ax.grid(True, which="major", alpha=0.3)
    for ax in list(axes.flat)[len(todo) :]:
        ax.axis("off")
    target_line = plt.Line2D([], [], color="tab:red", linestyle="-.", label=f"target {TARGET:g}x")
    fig.legend(
        [*handles.values(), target_line],
        [*handles, target_line.get_label()],
        loc="outside lower center",
        ncol=3,
        fontsize=9,
    )
    label = f" ({first['label']})" if first["label"] else ""
    fig.suptitle(
        f"fastlenet speedup over stock PyTorch vs batch size{label}\n"
        f"{first['machine']} ({first['device']}), {first['threads']} threads, "
        f"torch {first['torch']}, float32, rev {first['git_rev']}, run {run}",
        fontsize=12,
    )
    return fig


def sweep_figure(run, rows):
    """The shape sweeps (sweep_<device>.png): one panel per pass, the ratio to stock eager of
    every shape, one marker per fastlenet provider and batch size, the targets as lines."""
    first = rows[0]
    rows = sorted(sweep_rows(rows), key=lambda r: SWEEP_OPS.index(r["op"]))  # stable
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    n_conv = len({r["shape"] for r in rows if r["op"] == SWEEP_OPS[0]})
    keys = sorted({(r["provider"], int(r["batch"])) for r in rows})
    passes = [p for p in SWEEP_PASSES if any(r["pass"] == p for r in rows)]
    fig, axes = plt.subplots(
        len(passes),
        1,
        sharex=True,
        squeeze=False,
        figsize=(max(10, 0.4 * len(shapes) + 2), 3.3 * len(passes) + 3),
        layout="constrained",
    )
    ys = [num(r, "vs_eager") for r in rows]
    lo, hi = min([*ys, 0.8]) / 1.2, max([*ys, SWEEP_TARGETS[-1]]) * 1.2
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, pass_ in zip(axes[:, 0], passes, strict=True):
        for i, (provider, batch) in enumerate(keys):
            dx = (i - (len(keys) - 1) / 2) * 0.18  # side by side within a shape's slot
            pts = [
                (shapes.index(r["shape"]) + dx, num(r, "vs_eager"))
                for r in rows
                if r["pass"] == pass_ and r["provider"] == provider and int(r["batch"]) == batch
            ]
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                "os^v"[i % 4],
                color=colours[i % len(colours)],
                label=f"{provider}, batch {batch}",
            )
        ax.axhline(SWEEP_TARGETS[0], color="black", linewidth=0.8, label="1.0x: as fast as stock")
        ax.axhline(
            SWEEP_TARGETS[1],
            color="tab:red",
            linewidth=0.8,
            linestyle="-.",
            label=f"{SWEEP_TARGETS[1]:g}x: target of pooled conv layers, full",
        )
        if 0 < n_conv < len(shapes):
            ax.axvline(n_conv - 0.5, color="grey", linewidth=0.8, linestyle=":")
        ax.set_yscale("log", base=2)
        ax.set_ylim(lo, hi)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.set_ylabel("stock time / fastlenet time")
        ax.set_title(f"{pass_} (left: conv_relu_pool, right of the dotted line: linear)")
        ax.grid(True, axis="y", which="major", alpha=0.3)
    bottom = axes[-1, 0]
    bottom.set_xticks(range(len(shapes)), shapes, rotation=90, fontsize=8)
    bottom.set_xlim(-0.6, len(shapes) - 0.4)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=9)
    fig.suptitle(
        "fastlenet vs stock eager PyTorch over the shape sweep (issue 16)\n"
        f"{first['machine']} ({first['device']}), {first['threads']} threads, "
        f"torch {first['torch']}, float32, rev {first['git_rev']}, run {run}",
        fontsize=12,
    )
    return fig


def main(argv=None) -> int:
    parser = run_parser(__doc__)
    parser.add_argument("--out", type=Path, help="default: results/speedup_<device>.png")
    parser.add_argument("--sweep-out", type=Path, help="default: results/sweep_<device>.png")
    args = parser.parse_args(argv)
    found = run_rows(args)
    if found is None:
        return 1
    run, rows = found
    device = rows[0]["device"]
    figures = []  # (path, figure) for the benchmarks this run has rows of
    op_rows = [r for r in rows if r["op"] not in ("mm_peak", *SWEEP_OPS)]
    if op_rows:
        out = args.out or args.csv.with_name(f"speedup_{device}.png")
        figures.append((out, speedup_figure(run, op_rows)))
    if sweep_rows(rows):
        out = args.sweep_out or args.csv.with_name(f"sweep_{device}.png")
        figures.append((out, sweep_figure(run, rows)))
    if not figures:
        print(f"run {run!r} has no timing rows in {args.csv}", file=sys.stderr)
        return 1
    for out, fig in figures:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110, bbox_inches="tight")
        plt.close(fig)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
