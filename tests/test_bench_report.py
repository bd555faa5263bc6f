"""What `make bench` writes from results/bench.csv: the shape sweep's table and summary
(benchmarks/report.py) and its plot (benchmarks/plot.py), from a small CSV of known ratios."""

import csv

import pytest
from conftest import benchmark_script

harness = benchmark_script("harness")
report = benchmark_script("report")  # before plot, which imports it by name
plot = benchmark_script("plot")

RUN = "2026-12-02T16:00:00Z"
PEAK = 200.0
MM = 90.0  # GFLOP/s of the product timed beside every case (mm_frac)
#: (op, shape, batch, {pass: fastlenet's ratio to eager})
SWEEP = [
    ("conv_relu_pool_sweep", "a-pool 6->16 14x14 k5", 64, {"inference": 2.0, "backward": 1.5}),
    (
        "conv_relu_pool_sweep",
        "b-nopool 6->16 30x30 k3 no-pool",
        64,
        {"inference": 1.3, "full": 1.2},
    ),
    (
        "conv_relu_pool_sweep",
        "c-pool3 10->22 20x20 k5 pool3/2",
        64,
        {"inference": 0.9, "full": 0.8},
    ),
    ("conv_relu_pool_sweep", "c-pool3 10->22 20x20 k5 pool3/2", 256, {"full": 0.7}),
    ("linear_relu_sweep", "fc 400->120", 64, {"inference": 1.1, "full": 0.95}),
]
SHAPES = ["a-pool 6->16 14x14 k5", "b-nopool 6->16 30x30 k3 no-pool"]
SHAPES += ["c-pool3 10->22 20x20 k5 pool3/2", "fc 400->120"]


def row(**values):
    """A bench.csv row as the CSV reader returns it (every column, blank where not given)."""
    base = dict.fromkeys(harness.COLUMNS, "") | {
        "run": RUN,
        "git_rev": "abc1234",
        "machine": "test CPU (AVX2)",
        "device": "cpu",
        "threads": "2",
        "torch": "2.14.1",
        "alloc": "default",
        "dtype": "float32",
    }
    return {**base, **values}


def sweep_rows():
    rows = [
        row(
            provider="torch.mm",
            op="mm_peak",
            shape="2048x2048@2048x2048",
            batch=2048,
            gflops=PEAK,
            rounds=7,
        )
    ]
    for op, shape, batch, ratios in SWEEP:
        for pass_, ratio in ratios.items():
            gflops = 50.0 * ratio
            common = {"op": op, "shape": shape, "batch": batch, "pass": pass_}
            rows.append(
                row(
                    provider="fastlenet-cpu",
                    **common,
                    gflops=gflops,
                    peak_frac=gflops / PEAK,
                    mm_frac=gflops / MM,
                    vs_eager=ratio,
                )
            )
            eager = {"gflops": 50.0, "peak_frac": 50.0 / PEAK, "mm_frac": 50.0 / MM}
            rows.append(row(provider="eager", **common, **eager))
    return rows


def write_csv(path, rows):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=harness.COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def table_lines(text: str) -> tuple[list[str], list[list[str]]]:
    """Header and body lines, as lists of cells, of the first Markdown table in `text`."""
    lines = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("|")
    ]
    return lines[0], lines[2:]


def section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def summary(text: str, op: str, pass_: str) -> dict[str, str]:
    """The summary table's line of op and pass, and its lists of cases below the targets."""
    part = section(text, "Summary")
    head, body = table_lines(part)
    (line,) = [line for line in body if line[:3] == [op, "fastlenet-cpu", pass_]]
    out = dict(zip(head, line, strict=True))
    prefix = f"- {op} {pass_}, fastlenet-cpu, "
    for bullet in part.splitlines():
        if bullet.startswith(prefix):
            what, cases = bullet.removeprefix(prefix).split(": ", 1)
            out[f"{what} (list)"] = cases
    return out


def test_sweep_summary_lists_the_cases_below_the_targets():
    text = report.sweep_report(RUN, sweep_rows(), {})
    full = summary(text, "conv_relu_pool", "full")
    assert full["cases"] == "3"
    assert full["median"] == "0.80x"  # of 1.2, 0.8 and 0.7
    assert full["min"] == "0.70x c-pool3 b256"
    assert full["below 1.0x"] == "2"
    assert full["below 1.0x (list)"] == "c-pool3 (b64 0.80x, b256 0.70x)"
    # 1.6x is the target of pooled layers: b-nopool (1.2x) is not counted
    assert full["pooled, below 1.6x"] == "2 of 2"
    assert full["pooled, below 1.6x (list)"] == "c-pool3 (b64 0.80x, b256 0.70x)"
    inference = summary(text, "conv_relu_pool", "inference")
    assert inference["median"] == "1.30x"
    assert inference["below 1.0x (list)"] == "c-pool3 (b64 0.90x)"
    assert inference["pooled, below 1.6x"] == "1 of 2"
    backward = summary(text, "conv_relu_pool", "backward")
    assert backward["below 1.0x (list)"] == "none"
    assert backward["pooled, below 1.6x (list)"] == "a-pool (b64 1.50x)"
    linear = summary(text, "linear_relu", "full")
    assert linear["below 1.0x (list)"] == "fc (b64 0.95x)"
    assert linear["pooled, below 1.6x"] == ""
    assert "pooled, below 1.6x (list)" not in linear


def test_sweep_summary_lists_compute_bound_inference_below_75_percent_of_mm():
    text = report.sweep_report(RUN, sweep_rows(), {})
    inference = summary(text, "conv_relu_pool", "inference")
    # a-pool (C_in x k x k = 150) at 100 of 90 GFLOP/s passes; b-nopool (54) is below 144 and
    # not listed at 72%; c-pool3 (250) at 50%
    listed = "C_in x k x k >= 144, below 75% of torch.mm (list)"
    assert inference[listed] == "c-pool3 (b64 50.0%)"
    assert listed not in summary(text, "conv_relu_pool", "full")
    assert listed not in summary(text, "linear_relu", "inference")


def test_sweep_table_has_each_pass_of_a_shape_on_its_line():
    text = report.sweep_report(RUN, sweep_rows(), {})
    conv = section(text, "conv_relu_pool")
    _, body = table_lines(conv)
    (line,) = [line for line in body if line[0].startswith("c-pool3 ") and line[1] == "64"]
    assert line[:3] == ["c-pool3 10->22 20x20 k5 pool3/2", "64", "fastlenet-cpu"]
    # inference: 45 GFLOP/s, 50% of the 90 GFLOP/s of the product timed beside it, 0.90x; no
    # backward row; full
    assert line[3:] == ["45.0", "50.0", "0.90", "", "", "", "40.0", "44.4", "0.80"]
    assert "fc 400->120" not in conv
    assert "torch.mm peak: 200 GFLOP/s" in text


def test_report_saves_the_sweep_table_apart(tmp_path, capsys):
    csv_path = write_csv(tmp_path / "bench.csv", sweep_rows())
    assert report.main(["--csv", str(csv_path), "--save"]) == 0
    assert (tmp_path / "sweep_cpu.md").read_text().startswith(f"# fastlenet benchmarks: run {RUN}")
    assert not (tmp_path / "table_cpu.md").exists()  # the run has no op/model rows
    peak = {**sweep_rows()[0], "run": "op-run"}
    op_row = row(
        run="op-run",
        provider="eager",
        op="conv_relu_pool",
        shape="conv2 6->16",
        batch=64,
        **{"pass": "full"},
    )
    write_csv(csv_path, [peak, op_row])
    assert report.main(["--csv", str(csv_path), "--save"]) == 0
    assert "## conv_relu_pool conv2 6->16\n" in (tmp_path / "table_cpu.md").read_text()
    assert "wrote" in capsys.readouterr().out


@pytest.fixture
def figure():
    fig = plot.sweep_figure(RUN, sweep_rows())
    yield fig
    plot.plt.close(fig)


def test_sweep_plot_names_every_shape_and_draws_the_targets(figure):
    panels = figure.axes
    assert [ax.get_title().split()[0] for ax in panels] == ["inference", "backward", "full"]
    assert [t.get_text() for t in panels[-1].get_xticklabels()] == SHAPES
    for ax in panels:
        levels = {line.get_ydata()[0] for line in ax.get_lines() if len(set(line.get_ydata())) == 1}
        assert {1.0, 1.6} <= levels
    b64, b256 = panels[2].get_lines()[:2]  # batch 64 left of each shape's slot, 256 right
    assert list(b64.get_xdata()) == pytest.approx([1 - 0.09, 2 - 0.09, 3 - 0.09])
    assert list(b64.get_ydata()) == [1.2, 0.8, 0.95]
    assert list(b256.get_xdata()) == pytest.approx([2 + 0.09])
    assert b256.get_label() == "fastlenet-cpu, batch 256"


def test_plot_writes_the_sweep_png_alone(tmp_path):
    csv_path = write_csv(tmp_path / "bench.csv", sweep_rows())
    assert plot.main(["--csv", str(csv_path)]) == 0
    assert (tmp_path / "sweep_cpu.png").stat().st_size > 10_000
    assert not (tmp_path / "speedup_cpu.png").exists()


def test_rows_appended_under_an_older_header_keep_their_columns(tmp_path):
    path = tmp_path / "bench.csv"
    old_columns = [c for c in harness.COLUMNS if c != "mm_frac"]  # the schema before mm_frac
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerow(row(provider="eager", gflops=50.0, vs_eager=""))
    harness.append_rows(path, harness.COLUMNS, [row(provider="fastlenet-cpu", mm_frac=0.5)])
    harness.append_rows(path, harness.COLUMNS, [row(provider="fastlenet-cpu", vs_eager=2.0)])
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == list(harness.COLUMNS)
        rows = list(reader)
    assert [r["provider"] for r in rows] == ["eager", "fastlenet-cpu", "fastlenet-cpu"]
    assert [r["gflops"] for r in rows] == ["50.0", "", ""]
    assert [r["mm_frac"] for r in rows] == ["", "0.5", ""]
    assert [r["vs_eager"] for r in rows] == ["", "", "2.0"]
