"""Draws the speedup of each fastlenet backend over stock eager PyTorch and over
torch.compile against batch size, from results/bench.csv (default: the latest run).

    python benchmarks/plot.py [--csv PATH] [--run RUN_ID] [--out PNG]

One panel per benchmark (LeNet-5 training step and inference, then each op shape and pass);
solid lines: x stock eager, dashed: x torch.compile (paired ratios of the same run, see
harness.py); the dotted grey line is torch.compile over eager. Rows run with a non-default
allocator environment are drawn in their own colour and named in the legend.
"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
from report import num, run_parser, run_rows

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
    for op in ("conv_relu_pool", "linear_relu"):
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


def main(argv=None) -> int:
    parser = run_parser(__doc__)
    parser.add_argument("--out", type=Path, help="default: results/speedup_<device>.png")
    args = parser.parse_args(argv)
    found = run_rows(args)
    if found is None:
        return 1
    run, rows = found
    rows = [r for r in rows if r["op"] != "mm_peak"]
    if not rows:
        print(f"run {run!r} has no timing rows in {args.csv}", file=sys.stderr)
        return 1
    first = rows[0]
    out = args.out or args.csv.with_name(f"speedup_{first['device']}.png")
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
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
