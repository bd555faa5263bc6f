"""Prints the table of one benchmark run from results/bench.csv (default: the latest run).

    python benchmarks/report.py [--csv PATH] [--run RUN_ID] [--save]

--save also writes the table to results/table_<device>.md (what the README quotes), and the
shape sweeps' (issue 16) to results/sweep_<device>.md.

The tables are Markdown (pipes aligned), so the output reads in a terminal and pastes into
the README as it is. Reads only the CSV files: no torch import, no timing.
"""

import argparse
import csv
import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SAVED_NAME = "saved_for_backward.csv"
OPS = ("lenet5", "fuse", "conv_relu_pool", "linear_relu", "dropout")  # the order of the sections
#: the shape sweeps (issue 16), tabled apart in sweep_<device>.md, and their passes
SWEEP_OPS = ("conv_relu_pool_sweep", "linear_relu_sweep")
SWEEP_PASSES = ("inference", "backward", "full")
#: issue 16's targets against stock eager: never slower (1.0x); 1.6x for forward + backward
#: (pass full) of the pooled conv layers
SWEEP_TARGETS = (1.0, 1.6)
#: Issue 16's target for conv inference: >= 75% of the torch.mm peak where the layer is
#: compute-bound, C_in x k x k >= 144 (the sweep's `% mm`: harness.PAIRED_MM_N).
INFERENCE_MM_TARGET = 0.75
COMPUTE_BOUND_DEPTH = 144
PASS_ORDER = {
    "train_step": 0,
    "train_step_sgd": 1,
    "inference": 2,
    "forward": 3,
    "backward": 4,
    "full": 5,
}
#: LeNet-5's useful FLOPs per sample (2 x dense MACs; see harness.py), quoted in the header.
LENET_FWD_MFLOP = 0.833040
LENET_BWD_MFLOP = 1.430880


def default_csv() -> Path:
    """FASTLENET_BENCH_CSV when set (as for the benchmarks), else results/bench.csv."""
    return Path(os.environ.get("FASTLENET_BENCH_CSV") or RESULTS / "bench.csv")


def read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def num(row: dict, key: str) -> float | None:
    value = row.get(key, "")
    return float(value) if value not in ("", None) else None


def fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def ms(value: float | None) -> str:
    """Milliseconds with 4 significant digits for the usual range, no exponent."""
    if value is None:
        return ""
    return f"{value:.1f}" if value >= 100 else f"{value:.3f}" if value >= 1 else f"{value:.4f}"


def small(value: float | None) -> str:
    """One decimal, or three significant digits below 1 (batch-1 GFLOP/s, % of peak)."""
    if value is None:
        return ""
    return f"{value:.1f}" if value >= 1 else f"{value:.3g}"


def table(headers: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells):
        out = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(out) + " |"

    sep = ["-" * (w - 1) + (":" if i in right else "-") for i, w in enumerate(widths)]
    return "\n".join([line(headers), "| " + " | ".join(sep) + " |", *map(line, rows)])


def provider_label(row: dict, alloc_tags: dict[str, str]) -> str:
    tag = alloc_tags.get(row["alloc"], "")
    return f"{row['provider']} {tag}".strip()


def timing_table(rows: list[dict], alloc_tags) -> str:
    rows = sorted(
        rows,
        key=lambda r: (
            PASS_ORDER.get(r["pass"], 9),
            int(r["batch"]),
            r["alloc"] != "default",
            not r["provider"].startswith("fastlenet-"),
            r["provider"] == "compile",
        ),
    )
    headers = [
        "pass",
        "batch",
        "provider",
        "median ms",
        "p20-p80 ms",
        "samples/s",
        "GFLOP/s",
        "% peak",
        "x eager",
        "x compile",
        "compile s",
    ]
    body = []
    for r in rows:
        body.append(
            [
                r["pass"],
                r["batch"],
                provider_label(r, alloc_tags),
                ms(num(r, "median_ms")),
                f"{ms(num(r, 'p20_ms'))}-{ms(num(r, 'p80_ms'))}",
                fmt(num(r, "samples_per_s"), ",.0f"),
                small(num(r, "gflops")),
                small(100 * num(r, "peak_frac") if num(r, "peak_frac") is not None else None),
                fmt(num(r, "vs_eager"), ".2f"),
                fmt(num(r, "vs_compile"), ".2f"),
                fmt(num(r, "compile_s"), ".1f"),
            ]
        )
    return table(headers, body, right={1, 3, 4, 5, 6, 7, 8, 9, 10})


def saved_table(rows: list[dict]) -> str:
    by_shape = defaultdict(dict)
    for r in rows:
        by_shape[r["shape"]][r["provider"]] = r
    headers = [
        "layer",
        "provider",
        "bytes/sample",
        "stock/this",
        "excl. input",
        "stock/this",
        "saved tensors (batch)",
    ]
    body = []
    for shape, provs in by_shape.items():
        stock = provs.get("eager")
        for name, r in provs.items():
            batch = int(r["batch"])
            total = int(r["saved_bytes"]) / batch
            excl = int(r["saved_bytes_excl_input"]) / batch
            ratio = ratio_excl = ""
            if stock:
                ratio = f"{int(stock['saved_bytes']) / int(r['saved_bytes']):.1f}x"
                excl_ratio = int(stock["saved_bytes_excl_input"]) / int(r["saved_bytes_excl_input"])
                ratio_excl = f"{excl_ratio:.1f}x"
            body.append(
                [shape, name, f"{total:,.0f}", ratio, f"{excl:,.0f}", ratio_excl, r["tensors"]]
            )
    return table(headers, body, right={2, 3, 4, 5})


def targets(rows: list[dict], saved: list[dict]) -> list[str]:
    """The issue's targets on this machine, read off the run (2 threads, CPU)."""
    out = []

    def find(op, pass_, batch, shape=None):
        return [
            r
            for r in rows
            if r["op"] == op
            and r["pass"] == pass_
            and int(r["batch"]) == batch
            and r["alloc"] == "default"
            and r["provider"].startswith("fastlenet-")
            and (shape is None or r["shape"].startswith(shape))
        ]

    for batch in (64, 256):
        for r in find("lenet5", "train_step", batch):
            e, c = num(r, "vs_eager"), num(r, "vs_compile")
            ok = e is not None and c is not None and e >= 3 and c >= 3
            out.append(
                f"- LeNet-5 train step, batch {batch}, {r['provider']}: {fmt(e, '.2f')}x eager, "
                f"{fmt(c, '.2f')}x torch.compile (target >= 3x both): {'met' if ok else 'NOT met'}"
            )
    for batch in (64, 256):
        for layer in ("conv1", "conv2"):
            for r in find("conv_relu_pool", "full", batch, layer):
                e = num(r, "vs_eager")
                ok = e is not None and e >= 3
                out.append(
                    f"- conv_relu_pool fwd+bwd {r['shape']}, batch {batch}, {r['provider']}: "
                    f"{fmt(e, '.2f')}x eager (target >= 3x): {'met' if ok else 'NOT met'}"
                )
    by_shape = defaultdict(dict)
    for r in saved:
        by_shape[r["shape"]][r["provider"]] = r
    for shape, provs in by_shape.items():
        stock = provs.get("eager")
        for name, r in provs.items():
            if not name.startswith("fastlenet-") or not stock:
                continue
            ratio = int(stock["saved_bytes"]) / int(r["saved_bytes"])
            excl = int(stock["saved_bytes_excl_input"]) / int(r["saved_bytes_excl_input"])
            verdict = (
                "met" if ratio >= 4 else "met only without the input" if excl >= 4 else "NOT met"
            )
            out.append(
                f"- saved for backward, {shape}, {name}: {ratio:.1f}x smaller than stock "
                f"counting the layer input, {excl:.1f}x without it (target >= 4x): {verdict}"
            )
    return out


def shape_name(row: dict) -> str:
    """The name of a sweep shape: the first word of its description."""
    return row["shape"].split()[0]


def conv_depth(row: dict) -> int:
    """C_in x k x k of a conv sweep row, from its description ("name 6->16 14x14 k5 ...")."""
    words = row["shape"].split()
    k = int(next(w for w in words[3:] if w.startswith("k"))[1:])
    return int(words[1].split("->")[0]) * k * k


def pooled(row: dict) -> bool:
    """A conv sweep row with pooling (the sweeps' shapes without say "no-pool" last)."""
    return row["op"] == "conv_relu_pool_sweep" and not row["shape"].endswith(" no-pool")


def sweep_rows(rows: list[dict]) -> list[dict]:
    """The fastlenet rows of the shape sweeps (the ones with a ratio to stock)."""
    return [
        r
        for r in rows
        if r["op"] in SWEEP_OPS
        and r["provider"].startswith("fastlenet-")
        and num(r, "vs_eager") is not None
    ]


def sweep_table(rows: list[dict], alloc_tags) -> str:
    """One line per shape, batch and fastlenet provider: GFLOP/s, % of the torch.mm product
    timed beside it and the ratio to stock eager of each pass."""
    cells = {}  # (shape, batch, provider) -> {pass: row}
    for r in rows:
        key = (r["shape"], int(r["batch"]), provider_label(r, alloc_tags))
        cells.setdefault(key, {})[r["pass"]] = r
    headers = ["shape", "batch", "provider"]
    for pass_ in SWEEP_PASSES:
        headers += [f"{pass_} GFLOP/s", "% mm", "x eager"]
    body = []
    for (shape, batch, provider), by_pass in cells.items():  # in the order of the run
        line = [shape, str(batch), provider]
        for pass_ in SWEEP_PASSES:
            r = by_pass.get(pass_)
            frac = num(r, "mm_frac") if r else None
            line += [
                small(num(r, "gflops")) if r else "",
                small(100 * frac) if frac is not None else "",
                fmt(num(r, "vs_eager"), ".2f") if r else "",
            ]
        body.append(line)
    return table(headers, body, right=set(range(1, len(headers))) - {2})


def sweep_summary(rows: list[dict], alloc_tags) -> str:
    """Per op, provider and pass: median and minimum ratio to stock eager, how many cases are
    below 1.0x and how many pooled conv cases below 1.6x (the target is for pass full); then
    those cases by shape."""

    def by_shape(sel, value=lambda r: f"{num(r, 'vs_eager'):.2f}x"):
        """ "name (b64 0.42x, b256 0.52x), ..." of the rows `sel`, in the run's order."""
        shapes = {}
        for r in sel:
            shapes.setdefault(shape_name(r), []).append(f"b{r['batch']} {value(r)}")
        return ", ".join(f"{name} ({', '.join(cases)})" for name, cases in shapes.items())

    groups = {}  # (op, provider, pass) -> rows, ops then passes in their order
    for r in sorted(rows, key=lambda r: (SWEEP_OPS.index(r["op"]), SWEEP_PASSES.index(r["pass"]))):
        key = (r["op"].removesuffix("_sweep"), provider_label(r, alloc_tags), r["pass"])
        groups.setdefault(key, []).append(r)
    low, target = SWEEP_TARGETS
    headers = ["op", "provider", "pass", "cases", "median", "min", f"below {low:.1f}x"]
    headers.append(f"pooled, below {target:.1f}x")
    body, lists = [], []
    for (op, provider, pass_), sel in groups.items():
        ratios = [num(r, "vs_eager") for r in sel]
        worst = min(sel, key=lambda r: num(r, "vs_eager"))
        below = [r for r in sel if num(r, "vs_eager") < low]
        pooled_rows = [r for r in sel if pooled(r)]
        below_target = [r for r in pooled_rows if num(r, "vs_eager") < target]
        body.append(
            [
                op,
                provider,
                pass_,
                str(len(sel)),
                f"{statistics.median(ratios):.2f}x",
                f"{num(worst, 'vs_eager'):.2f}x {shape_name(worst)} b{worst['batch']}",
                str(len(below)),
                f"{len(below_target)} of {len(pooled_rows)}" if pooled_rows else "",
            ]
        )
        what = f"- {op} {pass_}, {provider}"
        lists.append(f"{what}, below {low:.1f}x: {by_shape(below) or 'none'}")
        if pooled_rows:
            lists.append(f"{what}, pooled, below {target:.1f}x: {by_shape(below_target) or 'none'}")
        bound = [r for r in sel if op == "conv_relu_pool" and pass_ == "inference"]
        bound = [
            r
            for r in bound
            if conv_depth(r) >= COMPUTE_BOUND_DEPTH and num(r, "mm_frac") is not None
        ]
        if bound:
            slow = [r for r in bound if num(r, "mm_frac") < INFERENCE_MM_TARGET]
            listed = by_shape(slow, lambda r: f"{100 * num(r, 'mm_frac'):.1f}%")
            lists.append(
                f"{what}, C_in x k x k >= {COMPUTE_BOUND_DEPTH}, below "
                f"{100 * INFERENCE_MM_TARGET:.0f}% of torch.mm: {listed or 'none'}"
            )
    return table(headers, body, right={3, 4, 6, 7}) + "\n\n" + "\n".join(lists)


def sweep_report(run: str, rows: list[dict], alloc_tags) -> str:
    """The shape sweeps of a run (sweep_<device>.md): summary, then one table per op."""
    sweep = sweep_rows(rows)
    low, target = SWEEP_TARGETS
    out = [
        *header(run, rows, alloc_tags),
        "\nShape sweep of issue 16: the fastlenet ops against the stock composition in eager "
        "mode (conv2d -> relu -> max_pool2d, no pool call without pooling; linear -> relu), "
        "float32, batch 64 and 256, timed alternately as the other benchmarks "
        "(FASTLENET_BENCH_SWEEP_CASE_S per case). "
        f"Targets: never below {low:.1f}x; {target:.1f}x for forward + backward (`full`) of "
        "pooled conv layers. inference = forward under torch.no_grad; backward = backward "
        "alone (graphs built untimed); full = both. `x eager` = median over rounds of "
        "t_eager / t_fastlenet (> 1: fastlenet faster). GFLOP/s count the dense FLOPs "
        "(2 x conv/matmul multiply-adds; backward: grad_weight, and grad_input except for "
        "first layers, whose input is the data) over fastlenet's time; `% mm` relates them "
        "to a float32 torch.mm timed in the same rounds (768x768 on the CPU; median over "
        "rounds of the ratio of the two rates; the run's peak above is a best-of at its start "
        "or end, which this VM's drift keeps from comparing with a median), and can exceed "
        "100 (the fused backward skips windows that pass no gradient and is credited them). "
        "Shapes: name, channels, input size, "
        "kernel, padding (pN), pooling (2 with stride 2 unless `pool3/2` or `no-pool`); "
        "linear: in->out, `no-relu` for plain linear.",
        "\n## Summary\n",
        sweep_summary(sweep, alloc_tags),
    ]
    for op in SWEEP_OPS:
        op_rows = [r for r in sweep if r["op"] == op]
        if op_rows:
            out += [f"\n## {op.removesuffix('_sweep')}\n", sweep_table(op_rows, alloc_tags)]
    return "\n".join(out)


def run_parser(doc: str) -> argparse.ArgumentParser:
    """The options of the scripts that read one run of the CSV (this one and plot.py)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=default_csv())
    parser.add_argument("--run", help="run id (column `run`); default: the latest in the file")
    return parser


def run_rows(args) -> tuple[str, list[dict]] | None:
    """(run id, its rows) of args.run (default: the latest) in args.csv, or None after saying
    on stderr why there are none."""
    rows = read(args.csv)
    if not rows:
        print(f"no benchmark rows in {args.csv}: run `make bench` first", file=sys.stderr)
        return None
    run = args.run or rows[-1]["run"]
    rows = [r for r in rows if r["run"] == run]
    if not rows:
        print(f"run {run!r} is not in {args.csv}", file=sys.stderr)
        return None
    return run, rows


def alloc_tags_of(rows: list[dict]) -> dict[str, str]:
    """{allocator environment: its tag in the tables} of the non-default ones."""
    allocs = sorted({r["alloc"] for r in rows} - {"default"})
    return {a: f"[env{i + 1}]" for i, a in enumerate(allocs)}


def header(run: str, rows: list[dict], alloc_tags: dict[str, str]) -> list[str]:
    """The title, machine and torch.mm peak lines of a run's report."""
    first = rows[0]
    out = [
        f"# fastlenet benchmarks: run {run}"
        + (f" ({first['label']})" if first["label"] else "")
        + f", rev {first['git_rev']}\n",
        f"Machine: {first['machine']} ({first['device']}), {first['threads']} threads, "
        f"torch {first['torch']}, triton {first['triton'] or '-'}, float32.",
    ]
    for p in (r for r in rows if r["op"] == "mm_peak"):
        tag = alloc_tags.get(p["alloc"], "")
        out.append(
            f"torch.mm peak{' ' + tag if tag else ''}: {num(p, 'gflops'):.0f} GFLOP/s "
            f"(float32 {p['shape']}, fastest of {p['rounds']} products at the start or the end of "
            "the same run, same thread count)"
        )
    return out


def op_report(run: str, rows: list[dict], saved: list[dict], alloc_tags) -> str:
    """The table of the op and model benchmarks of a run (table_<device>.md)."""
    lines_out = header(run, rows, alloc_tags)
    emit = lines_out.append
    emit(
        "\nHow it is timed: in each case (op or model, pass, batch) every provider is timed in "
        "the same loop, round by round, in an order rotated each round; a sample is k "
        "back-to-back calls (k per provider, >= 5 ms) after one untimed call (each provider timed "
        "warm, as a training loop runs one model), the garbage collector paused. "
        "median/p20/p80 are over rounds. `x eager` and `x compile` are the median over rounds "
        "of the paired ratio t_stock[r] / t_fastlenet[r] (both times of a pair a few ms "
        "apart, so background load hits both): > 1 means fastlenet is faster. Every provider "
        "is first checked against the float64 reference (outputs and gradients). "
        "forward = forward with autograd recording; backward = backward alone (graphs built "
        "untimed); full = both. train_step = zero_grad, forward, cross-entropy, backward, "
        "SGD(momentum 0.9, fused=True) step; train_step_sgd = the same with torch.optim.SGD's "
        "default implementation; inference = forward under torch.inference_mode. "
        "compile = torch.compile(dynamic=False) of the stock model/composition, steady state; "
        "`compile s` = its first call(s) (compilation) from a fresh inductor cache. "
        "Inputs are seeded standard-normal tensors; LeNet-5 uses random labels and SGD with "
        "lr=0, so every timed step sees the same weights (the fused backward skips windows "
        "that pass no gradient, so drifting weights would change its work)."
    )
    emit(
        "\nFLOPs: useful = 2 x the dense multiply-adds of convolutions and matmuls (bias, "
        "ReLU, pool, loss, optimizer free). Backward = dense grad_weight + dense grad_input "
        "(conv1 has no input gradient). LeNet-5: forward "
        f"{LENET_FWD_MFLOP:.3f} MFLOP/sample, backward {LENET_BWD_MFLOP:.3f}. The fused "
        "backward skips windows that pass no gradient but is credited the dense FLOPs. "
        "% peak = GFLOP/s over the torch.mm peak above."
    )
    for alloc, tag in alloc_tags.items():
        emit(
            f"\n{tag} rows: a separate pytest run in the same `make bench` with the "
            f"environment `{alloc}` (glibc keeps freed activation buffers instead of "
            "returning them to the OS each step); their ratios pair them with each other, "
            "never with the default rows. Rows without a tag use the default allocator, "
            "as users run it."
        )

    for op in OPS:
        op_rows = [r for r in rows if r["op"] == op]
        for shape in dict.fromkeys(r["shape"] for r in op_rows):
            emit(f"\n## {op} {shape}\n")
            emit(timing_table([r for r in op_rows if r["shape"] == shape], alloc_tags))
    if saved:
        emit("\n## Saved for backward (conv layers, measured with saved_tensors_hooks)\n")
        emit(
            "Distinct storages autograd keeps from forward to backward, per sample, "
            "parameters excluded; `excl. input` also leaves out the layer's input, which "
            "the previous layer's output keeps alive anyway. A tensor counts as the input "
            "only if it shares the input's storage: the copies a compiled graph saves are "
            "counted as activations.\n"
        )
        emit(saved_table(saved))
    lines = targets(rows, saved) if rows[0]["device"] == "cpu" else []  # the issue's CPU targets
    if lines:
        emit("\n## Targets of issue 5\n")
        emit("\n".join(lines))
    return "\n".join(lines_out)


def main(argv=None) -> int:
    parser = run_parser(__doc__)
    parser.add_argument(
        "--save",
        action="store_true",
        help="also write results/table_<device>.md (and sweep_<device>.md for the sweeps)",
    )
    args = parser.parse_args(argv)
    found = run_rows(args)
    if found is None:
        return 1
    run, rows = found
    saved = [r for r in read(args.csv.with_name(SAVED_NAME)) if r["run"] == run]
    alloc_tags = alloc_tags_of(rows)
    reports = {}  # {file stem: text}, for the benchmarks this run has rows of
    if any(r["op"] in OPS for r in rows):
        reports["table"] = op_report(run, rows, saved, alloc_tags)
    if any(r["op"] in SWEEP_OPS for r in rows):
        reports["sweep"] = sweep_report(run, rows, alloc_tags)
    for stem, text in reports.items():
        print(text)
        if args.save:
            path = args.csv.with_name(f"{stem}_{rows[0]['device']}.md")
            path.write_text(text + "\n")
            print(f"\nwrote {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
