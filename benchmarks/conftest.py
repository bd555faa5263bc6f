"""Fixtures and hooks of the fastlenet benchmarks (the engine is in harness.py).

- Settings are read once (environment variables, see harness.py) and printed in the header;
  torch's thread count is set here, before anything is timed.
- `peak` measures the float32 torch.mm peak at the start of the session, and again at its
  end: the faster of the two is the peak (one reading can fall on a busy moment), and every
  row's peak_frac is computed from it when the rows are written.
- `bench.run(...)` times one case's providers alternately, through pytest-benchmark's
  pedantic mode (one pytest-benchmark round = one alternating round of every provider), and
  records a row per provider; `bench.saved(...)` records saved-for-backward bytes.
- `compiled(key, build)` builds torch.compile providers from a fresh inductor cache and
  reports their compile time.
- At the end of the session the rows are appended to results/*.csv.
"""

import dataclasses
import os
import tempfile
import time

import harness
import pytest
import torch

import fastlenet

# A fresh inductor cache, so that the compile times in the table are cold-start times that do
# not depend on what earlier runs left in ~/.cache or /tmp.
_INDUCTOR_CACHE = None
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _INDUCTOR_CACHE = tempfile.TemporaryDirectory(prefix="fastlenet-bench-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _INDUCTOR_CACHE.name

SETTINGS = harness.settings()
torch.set_num_threads(SETTINGS.threads)


def pytest_collection_modifyitems(config, items):
    # The allocator-tuned run of `make bench` is about glibc's handling of CPU activation
    # buffers; on a GPU run it would only repeat the default run, so it times nothing.
    if SETTINGS.device == "cuda" and SETTINGS.alloc != "default":
        config.hook.pytest_deselected(items=list(items))
        items[:] = []


def pytest_report_header(config):
    s = SETTINGS
    return [
        f"fastlenet bench: device={s.device} machine={s.machine!r} threads={s.threads} "
        f"torch={s.torch} triton={s.triton or '-'} rev={s.git_rev} alloc={s.alloc!r}",
        f"fastlenet bench: providers={s.providers} batches={s.batches} passes={s.passes} "
        f"case budget={s.case_s}s (sweeps {s.sweep_case_s}s) rounds={s.min_rounds}..{s.max_rounds} "
        f"csv={s.csv or '(none)'} label={s.label!r} run={s.run}",
        *(
            f"fastlenet bench: backend {name!r} not timed: {status!r}"
            for name, status in fastlenet.available_backends().items()
            if name != "reference" and not status
        ),
    ]


class Recorder:
    def __init__(self):
        self.rows: list[dict] = []
        self.saved_rows: list[dict] = []
        self.peak_gflops: float | None = None
        self.peak_row: dict | None = None

    def common(self) -> dict:
        s = SETTINGS
        return {
            "run": s.run,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "git_rev": s.git_rev,
            "label": s.label,
            "machine": s.machine,
            "device": s.device,
            "threads": torch.get_num_threads(),
            "torch": s.torch,
            "triton": s.triton,
            "alloc": s.alloc,
        }


_RECORDER = Recorder()


def pytest_sessionfinish(session, exitstatus):
    if SETTINGS.csv is None:
        return
    if _RECORDER.rows:
        peak = _RECORDER.peak_gflops
        for row in _RECORDER.rows:
            row["peak_frac"] = row["gflops"] / peak
        harness.append_rows(SETTINGS.csv, harness.COLUMNS, [_RECORDER.peak_row, *_RECORDER.rows])
    if _RECORDER.saved_rows:
        harness.append_rows(
            SETTINGS.csv.with_name(harness.SAVED_CSV_NAME),
            harness.SAVED_COLUMNS,
            _RECORDER.saved_rows,
        )


def pytest_terminal_summary(terminalreporter):
    n = len(_RECORDER.rows)
    where = SETTINGS.csv if SETTINGS.csv else "nowhere (FASTLENET_BENCH_CSV is empty)"
    terminalreporter.write_line(f"fastlenet bench: {n} timing rows appended to {where}")


@pytest.fixture(scope="session")
def settings():
    return SETTINGS


def _measure_peak() -> None:
    n, gflops, timing = harness.peak_mm_gflops(SETTINGS)
    if _RECORDER.peak_gflops is not None and gflops <= _RECORDER.peak_gflops:
        return
    _RECORDER.peak_gflops = gflops
    _RECORDER.peak_row = {
        **_RECORDER.common(),
        "provider": "torch.mm",
        "op": "mm_peak",
        "pass": "forward",
        "shape": f"{n}x{n}@{n}x{n}",
        "batch": n,
        "dtype": "float32",
        "median_ms": timing.median * 1e3,
        "p20_ms": timing.quantile(0.2) * 1e3,
        "p80_ms": timing.quantile(0.8) * 1e3,
        "rounds": len(timing.times),
        "calls_per_sample": 1,
        "gflops": gflops,
        "peak_frac": 1.0,
    }


@pytest.fixture(scope="session", autouse=True)
def peak():
    """The float32 torch.mm peak (GFLOP/s) at this thread count: measured before the first
    benchmark, and again (keeping the faster) when the session ends."""
    _measure_peak()
    yield
    _measure_peak()


class Bench:
    """What a benchmark test calls to time its providers and record the rows."""

    def __init__(self, benchmark):
        self.benchmark = benchmark

    def run(
        self,
        *,
        op,
        pass_,
        shape,
        batch,
        flops,
        fns,
        compile_s=None,
        dtype="float32",
        case_s=None,
        paired_mm=None,
    ):
        """Times `fns` ({provider: no-argument callable}) alternately and records a row each.

        flops: useful FLOPs of one call; compile_s: {provider: seconds} for compiled ones;
        case_s: the case's budget of timed rounds, when not the settings' case_s; paired_mm:
        (product, its FLOPs) timed in the same rounds, which gives each row its mm_frac.
        """
        settings = SETTINGS if case_s is None else dataclasses.replace(SETTINGS, case_s=case_s)
        timed = dict(fns)
        if paired_mm is not None:
            timed[harness.PAIRED_MM] = paired_mm[0]
        timer = harness.AlternatingTimer(timed, settings)
        rounds = timer.calibrate()
        self.benchmark.extra_info["round"] = "every provider once: " + ", ".join(timed)
        self.benchmark.pedantic(timer.round, rounds=rounds, iterations=1, warmup_rounds=0)
        for name in fns:
            t = timer.timing(name)
            median = t.median
            row = {
                **_RECORDER.common(),
                "provider": name,
                "op": op,
                "pass": pass_,
                "shape": shape,
                "batch": batch,
                "dtype": dtype,
                "median_ms": median * 1e3,
                "p20_ms": t.quantile(0.2) * 1e3,
                "p80_ms": t.quantile(0.8) * 1e3,
                "rounds": len(t.times),
                "calls_per_sample": t.calls_per_sample,
                "samples_per_s": batch / median,
                "gflops": flops / median / 1e9,
            }
            if name != "eager" and "eager" in fns:
                row["vs_eager"] = timer.ratio("eager", name)
            if name.startswith("fastlenet-") and "compile" in fns:
                row["vs_compile"] = timer.ratio("compile", name)
            if paired_mm is not None:
                # median over rounds of (flops / t) / (mm_flops / t_mm)
                row["mm_frac"] = timer.ratio(harness.PAIRED_MM, name) * flops / paired_mm[1]
            if compile_s and name in compile_s:
                row["compile_s"] = compile_s[name]
            self.benchmark.extra_info[name] = {
                k: row[k] for k in ("median_ms", "p20_ms", "p80_ms") if k in row
            }
            _RECORDER.rows.append(row)


def record_saved(*, provider, op, shape, batch, saved, dtype="float32"):
    """Records the result of harness.saved_for_backward for one provider."""
    # Parameters are not per-sample and alive anyway; copies of them are held for backward.
    activations = [v for v in saved.values() if v[2] not in ("weight", "bias")]
    _RECORDER.saved_rows.append(
        {
            **_RECORDER.common(),
            "provider": provider,
            "op": op,
            "shape": shape,
            "batch": batch,
            "dtype": dtype,
            "saved_bytes": sum(v[0] for v in activations),
            "saved_bytes_excl_input": sum(v[0] for v in activations if v[2] != "input"),
            "tensors": " ".join(f"{v[2]}:{v[1]}" for v in saved.values()),
        }
    )


@pytest.fixture
def saved_recorder():
    return record_saved


@pytest.fixture
def bench(benchmark):
    return Bench(benchmark)


class _CompileCache:
    """torch.compile providers, built once per key (op, shape, batch) and kept while the
    tests of that key run (the parametrisation keeps them consecutive). Building a new key
    calls torch.compiler.reset(), so every key compiles from scratch with dynamic=False (one
    static graph per batch size) and no recompilation limit is reached; the time of the first
    call(s), which compile, is the reported compile time."""

    def __init__(self):
        self.key = None
        self.value = None
        self.warmed = False

    def get(self, key, build):
        """build() -> (provider callables dict, {provider: compile seconds})."""
        if key != self.key:
            self.key = self.value = None
            torch.compiler.reset()
            if not self.warmed:
                self._warm_up()
            self.value = build()
            self.key = key
        return self.value

    def _warm_up(self):
        # The first compilation of a process imports and initialises inductor (~15 s here);
        # doing it on a throw-away function keeps that out of every case's compile time.
        x = torch.randn(8, device=SETTINGS.device, requires_grad=True)
        torch.compile(lambda t: (t * 2).relu().sum(), dynamic=False)(x).backward()
        torch.compiler.reset()
        self.warmed = True


_COMPILE_CACHE = _CompileCache()


@pytest.fixture
def compiled():
    return _COMPILE_CACHE.get
