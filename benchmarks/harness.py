"""The measurement engine of the fastlenet benchmarks: settings, providers, alternating timer,
parity checks, FLOP counts, saved-for-backward bytes and the CSV schema.

How a ratio is made honest on a noisy, shared machine: every provider of a case (one op or
model, one pass, one batch size) is timed inside the same loop. One *round* times each
provider once, in an order rotated by one position every round, so no provider always runs
first or last; one *sample* is one untimed call, then k back-to-back calls (k chosen per
provider so a sample lasts at least `min_sample_s`) divided by k: each provider is timed warm,
as a training loop that runs one model step after step runs it (the provider before it left
cold caches and a sleeping thread pool); a backward-only sample first builds its graphs,
untimed. The speedup of A over B is the median over
rounds of t_B[r] / t_A[r]: both times of a pair come from the same few milliseconds, so load
from other processes inflates both and largely cancels. Medians (p20, p80) of the per-round
times are reported too, never a best-of. The Python garbage collector is paused during a round.

Settings come from environment variables (make passes them through):
  FASTLENET_BENCH_BATCHES    batch sizes, default "1,16,64,256,1024"
  FASTLENET_BENCH_PASSES     passes of the op benchmarks, default "forward,backward,full"
  FASTLENET_BENCH_PROVIDERS  which providers to time (default: every fastlenet backend
                             available on the device, "eager" and "compile")
  FASTLENET_BENCH_THREADS    torch threads, default os.cpu_count()
  FASTLENET_BENCH_CASE_S     time budget of one case's timed rounds, default 1.5 s
  FASTLENET_BENCH_SWEEP_CASE_S  the same for each case of the shape sweeps, default 0.3 s
  FASTLENET_BENCH_MIN_ROUNDS, FASTLENET_BENCH_MAX_ROUNDS   default 7 and 41
  FASTLENET_BENCH_MIN_SAMPLE_S  default 0.005 s
  FASTLENET_BENCH_DEVICE     "cpu" or "cuda", default cuda when present
  FASTLENET_BENCH_CSV        results file (empty: write none), default results/bench.csv
  FASTLENET_BENCH_LABEL      free label stored with every row, e.g. "smoke" or "final"
  FASTLENET_BENCH_RUN        run id shared by several pytest invocations of one `make bench`
"""

import csv
import dataclasses
import datetime
import functools
import gc
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

import fastlenet
from fastlenet import backends
from fastlenet.reference import rel_err

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_CSV = RESULTS / "bench.csv"
SAVED_CSV_NAME = "saved_for_backward.csv"

#: Columns of results/bench.csv, in order. Times are per call, in milliseconds.
COLUMNS = (
    "run",  # one id per `make bench` (all pytest invocations of it share it)
    "date",  # UTC, ISO 8601
    "git_rev",  # short hash, "-dirty" when tracked files differ from it
    "label",  # FASTLENET_BENCH_LABEL, e.g. "smoke", "final"
    "machine",  # CPU model (/proc/cpuinfo) and vector ISA, or GPU name; never the hostname
    "device",  # cpu or cuda
    "threads",  # torch.get_num_threads()
    "torch",
    "triton",
    "alloc",  # "default", or the allocator environment that was set (MALLOC_*, LD_PRELOAD)
    "provider",  # fastlenet-<backend>, eager, compile, torch.mm
    "op",  # conv_relu_pool, linear_relu, lenet5, fuse, mm_peak; <op>_sweep: the shape sweeps
    "pass",  # forward, backward, full, train_step, inference
    "shape",
    "batch",
    "dtype",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "rounds",  # number of alternating rounds
    "calls_per_sample",  # k: back-to-back calls in one timed sample
    "samples_per_s",  # batch / median
    "gflops",  # useful FLOPs (see flops below) / median
    "peak_frac",  # gflops / the torch.mm peak measured in the same run
    "mm_frac",  # sweeps: median over rounds of gflops / PAIRED_MM's GFLOP/s in the same round
    "vs_eager",  # median over rounds of t_eager / t_provider (blank for eager)
    "vs_compile",  # median over rounds of t_compile / t_provider (fastlenet rows)
    "compile_s",  # torch.compile rows: wall time of the first (compiling) call(s)
)

SAVED_COLUMNS = (
    "run",
    "date",
    "git_rev",
    "label",
    "machine",
    "torch",
    "provider",
    "op",
    "shape",
    "batch",
    "dtype",
    "saved_bytes",  # every distinct activation storage saved for backward (no parameters)
    "saved_bytes_excl_input",  # the same without the layer's input (alive anyway)
    "tensors",  # what was saved: dtype[shape] of each distinct storage
)


def append_rows(path, columns, rows) -> None:
    """Appends `rows` (dicts) to the CSV at `path` under the header `columns`. A file written
    under another header (an older schema: a column added since) is first rewritten under
    `columns`, its rows keeping their values by name, blank in the new columns: appending
    under the old header would shift every value after the new column."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if path.exists() and path.stat().st_size > 0:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != list(columns):
                old = list(reader)
    mode = "a" if path.exists() and path.stat().st_size > 0 and old is None else "w"
    with path.open(mode, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if mode == "w":
            writer.writeheader()
            writer.writerows(old or [])
        writer.writerows(rows)


def _env_list(name: str, default: str) -> list[str]:
    return [v.strip() for v in os.environ.get(name, default).split(",") if v.strip()]


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "")
    return float(value) if value else default


def _alloc_label() -> str:
    parts = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")]
    preload = os.environ.get("LD_PRELOAD", "")
    if preload:
        parts.append(f"LD_PRELOAD={Path(preload).name}")
    return " ".join(parts) if parts else "default"


def _machine(device: str) -> str:
    """GPU name, or CPU model with its widest vector ISA: machines sold under one model name
    ("AMD EPYC" in a VM) differ in it, and the CPU kernels are compiled for it."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    isa = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    return f"{_cpu_model()} ({'AVX-512' if isa == 'AVX512' else isa})"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_rev() -> str:
    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=HERE, capture_output=True, text=True, check=False
        ).stdout.strip()

    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"{rev}-dirty" if dirty else rev


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return ""
    return triton.__version__


@dataclasses.dataclass
class Settings:
    batches: list[int]
    passes: list[str]
    providers: list[str]
    threads: int
    device: str
    case_s: float
    sweep_case_s: float
    min_rounds: int
    max_rounds: int
    min_sample_s: float
    csv: Path | None
    label: str
    run: str
    alloc: str
    machine: str
    git_rev: str
    torch: str
    triton: str

    @property
    def fastlenet_providers(self) -> list[str]:
        return [p for p in self.providers if p.startswith("fastlenet-")]

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def device_backends(device: str) -> list[str]:
    """fastlenet backends timed on `device`: available ones, never "reference" (the oracle)
    and never Triton's CPU interpreter (it measures the interpreter, not a kernel)."""
    wanted = ("cuda", "triton") if device == "cuda" else ("cpu",)
    status = fastlenet.available_backends()
    return [name for name in wanted if status[name] and not backends.triton_interpreted()]


@functools.cache
def settings() -> Settings:
    """The settings of this process (read once from the environment)."""
    return load_settings()


def load_settings() -> Settings:
    device = os.environ.get("FASTLENET_BENCH_DEVICE") or (
        "cuda" if torch.cuda.is_available() else "cpu"
    )
    if device not in ("cpu", "cuda"):
        raise ValueError(f"FASTLENET_BENCH_DEVICE must be cpu or cuda, got {device!r}")
    default_providers = [f"fastlenet-{b}" for b in device_backends(device)] + ["eager", "compile"]
    providers = _env_list("FASTLENET_BENCH_PROVIDERS", ",".join(default_providers))
    unknown = set(providers) - {*default_providers, "fastlenet-reference"}
    if unknown:
        raise ValueError(
            f"FASTLENET_BENCH_PROVIDERS: {sorted(unknown)} cannot run here; "
            f"available: {default_providers} (and fastlenet-reference)"
        )
    passes = _env_list("FASTLENET_BENCH_PASSES", "forward,backward,full")
    if set(passes) - {"forward", "backward", "full"}:
        raise ValueError(f"FASTLENET_BENCH_PASSES must name forward/backward/full, got {passes}")
    csv = os.environ.get("FASTLENET_BENCH_CSV", str(DEFAULT_CSV))
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return Settings(
        batches=[int(b) for b in _env_list("FASTLENET_BENCH_BATCHES", "1,16,64,256,1024")],
        passes=passes,
        providers=providers,
        threads=int(os.environ.get("FASTLENET_BENCH_THREADS") or os.cpu_count() or 1),
        device=device,
        case_s=_env_float("FASTLENET_BENCH_CASE_S", 1.5),
        # ~200 sweep cases in 3-4 minutes on 2 cores: most of them are small enough that the
        # minimum rounds take less than this, the largest take their 7 rounds whatever it is.
        sweep_case_s=_env_float("FASTLENET_BENCH_SWEEP_CASE_S", 0.3),
        min_rounds=int(_env_float("FASTLENET_BENCH_MIN_ROUNDS", 7)),
        max_rounds=int(_env_float("FASTLENET_BENCH_MAX_ROUNDS", 41)),
        min_sample_s=_env_float("FASTLENET_BENCH_MIN_SAMPLE_S", 0.005),
        csv=Path(csv) if csv else None,
        label=os.environ.get("FASTLENET_BENCH_LABEL", ""),
        run=os.environ.get("FASTLENET_BENCH_RUN") or now,
        alloc=_alloc_label(),
        machine=_machine(device),
        git_rev=_git_rev(),
        torch=torch.__version__,
        triton=_triton_version(),
    )


# --------------------------------------------------------------------------------------------
# Alternating timer


def _quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a non-empty list."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclasses.dataclass
class Timing:
    """Per-call times (seconds) of one provider, one entry per round."""

    times: list[float]
    calls_per_sample: int

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def quantile(self, q: float) -> float:
        return _quantile(self.times, q)


class AlternatingTimer:
    """Times several providers of one case round by round (see the module docstring)."""

    def __init__(self, fns: dict[str, Callable[[], object]], settings: Settings):
        self.fns = fns
        self.settings = settings
        self.names = list(fns)
        self.times: dict[str, list[float]] = {name: [] for name in self.names}
        self.calls: dict[str, int] = {}
        self.rounds_done = 0

    def _sample(self, fn, k: int) -> float:
        sync = self.settings.sync
        prepare = getattr(fn, "prepare", None)
        if prepare is not None:  # untimed set-up of the k calls and the warm one (BackwardOnly)
            prepare(k + 1)
        # One untimed call first: the provider timed before this one has evicted its data from
        # the caches and let the thread pool sleep, and a training loop, which runs one model
        # step after step, never pays that (LeNet-5 step at batch 128: 1.58 ms warm, 2.87 ms
        # after a 32 MB cache flush, 2.05 ms after a 1 ms sleep).
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        sync()
        return (time.perf_counter() - t0) / k

    def calibrate(self) -> int:
        """Warms every provider up, picks its calls per sample; returns the number of rounds
        that fits the case budget."""
        round_s = 0.0
        for name, fn in self.fns.items():
            fn()  # warm-up: first-call allocations, lazy initialisation
            single = min(self._sample(fn, 1) for _ in range(3))
            k = max(1, min(10_000, math.ceil(self.settings.min_sample_s / max(single, 1e-9))))
            self.calls[name] = k
            round_s += k * single
        rounds = int(self.settings.case_s / max(round_s, 1e-9))
        return max(self.settings.min_rounds, min(self.settings.max_rounds, rounds))

    def round(self) -> None:
        """One round: every provider once, in an order rotated by one each round."""
        r = self.rounds_done
        order = self.names[r % len(self.names) :] + self.names[: r % len(self.names)]
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            for name in order:
                self.times[name].append(self._sample(self.fns[name], self.calls[name]))
        finally:
            if gc_was_enabled:
                gc.enable()
        self.rounds_done += 1

    def timing(self, name: str) -> Timing:
        return Timing(self.times[name], self.calls[name])

    def ratio(self, slow: str, fast: str) -> float:
        """Median over rounds of t_slow / t_fast (the speedup of `fast` over `slow`)."""
        pairs = zip(self.times[slow], self.times[fast], strict=True)
        return statistics.median(a / b for a, b in pairs)


# --------------------------------------------------------------------------------------------
# Parity (checked before any provider is timed, as llm.c does)

#: Relative error (||a - e|| / ||e||, against the float64 reference) allowed in float32.
#: Forward: float32 rounding of sums of <= 400 products stays below ~1e-6 relative; 1e-5 leaves
#: room for summation order. Gradients: where two values of a pooling window are within
#: float32 rounding of each other, the kernel and the float64 reference may pick different
#: argmax positions and route that window's gradient to a neighbour; a handful of such ties
#: at batch 1024 moves the gradient's norm by ~1e-4, hence 1e-3 (still 1000x below a wrong
#: kernel, whose error is O(1)).
PARITY_TOL = {"forward": 1e-5, "grad": 1e-3}


def check_parity(provider: str, what: str, actual, expected, kind: str) -> None:
    err = rel_err(actual, expected)
    tol = PARITY_TOL[kind]
    if not (err <= tol):  # also catches NaN
        raise AssertionError(
            f"{provider}: {what} differs from the float64 reference: rel err {err:.2e} > {tol}"
        )


# --------------------------------------------------------------------------------------------
# Useful FLOPs
#
# Only the dense multiply-adds of convolutions and matmuls count (2 FLOPs each); bias, ReLU,
# pooling, loss and optimizer are free. Forward of a layer = 2 * MACs. Backward = the dense
# grad_weight (same MACs as forward) plus the dense grad_input (same again) when the layer's
# input needs a gradient. The fused kernels skip the windows and units that pass no gradient;
# those skipped FLOPs still count, so GFLOP/s compares providers doing the same useful work.


def conv_flops(batch, in_ch, out_ch, conv_hw, kernel_hw) -> int:
    return 2 * batch * out_ch * conv_hw[0] * conv_hw[1] * in_ch * kernel_hw[0] * kernel_hw[1]


def linear_flops(batch, in_f, out_f) -> int:
    return 2 * batch * in_f * out_f


def pass_flops(fwd: int, input_grad: bool, pass_: str) -> int:
    bwd = fwd * (2 if input_grad else 1)
    return {"inference": fwd, "forward": fwd, "backward": bwd, "full": fwd + bwd}[pass_]


def sweep_cases(names, settings: Settings) -> list[tuple[str, int, str]]:
    """(shape name, batch, pass) of a shape sweep: batch 64 and 256 where the settings have
    them; the settings' passes, with forward timed under torch.no_grad ("inference": the
    forward a training step pays is in full, its difference from backward)."""
    batches = [b for b in settings.batches if b in (64, 256)]
    passes = ["inference" if p == "forward" else p for p in settings.passes]
    return [(n, b, p) for n in names for b in batches for p in passes]


def checked_inputs(inputs, fns, check):
    """`inputs` (x, w, b, grad_out), every provider in {provider: f} checked on them first
    with check(provider, f, x, w, b, grad_out)."""
    for provider, f in fns.items():
        check(provider, f, *inputs)
    return inputs


#: Side of the square float32 product timed beside each sweep case's providers, in the same
#: rounds (the rows' mm_frac, the sweep table's `% mm`). The run's peak (peak_mm_gflops) is the
#: fastest of 7 products at the start or the end of the run, and this VM's speed drifts by
#: 10-20% over minutes: a case's median against it read lower than against a product timed
#: beside it (LeNet-5's conv2 inference at batch 64: 65% of the run's peak in the 04:41Z
#: bench, 83-84% of 2048 products timed alternately with it in one process). CPU: 768, ~2.7
#: ms a call, whose median rate measured within 1-4% of the 2048 product's (384 to 1024 the
#: same). GPU: 4096, ~3 ms on an H100.
PAIRED_MM_N = {"cpu": 768, "cuda": 4096}
PAIRED_MM = "torch.mm"  # its provider name in a case's rounds (it records no row)


def paired_mm(settings: Settings) -> tuple[Callable[[], object], int]:
    """The product timed beside a sweep case (PAIRED_MM_N) and its FLOPs."""
    n = PAIRED_MM_N[settings.device]
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(settings.device) for _ in range(2))
    c = torch.empty(n, n, device=settings.device)
    return functools.partial(torch.mm, a, b, out=c), 2 * n**3


def run_sweep_case(bench, op, name, shape, batch, pass_, inputs, fns, settings) -> None:
    """One case of a shape sweep: {provider: f(x, w, b)} timed on `pass_` with the checked
    inputs (x, w, b, grad_out) of shape `name` (its `describe` and `flops` label the row),
    and PAIRED_MM timed in the same rounds."""
    x, w, b, g = inputs
    bench.run(
        op=op,
        pass_=pass_,
        shape=shape.describe(name),
        batch=batch,
        flops=shape.flops(batch, pass_),
        fns={n: op_pass_fn(f, (x, w, b), g, pass_) for n, f in fns.items()},
        case_s=settings.sweep_case_s,
        paired_mm=paired_mm(settings),
    )


# --------------------------------------------------------------------------------------------
# Saved-for-backward bytes, measured with torch.autograd.graph.saved_tensors_hooks


def saved_for_backward(run: Callable[[], object], exclude: dict[str, torch.Tensor]):
    """Distinct storages that autograd saves while `run()` builds its graph.

    Returns {storage key: (bytes, description, role)}; role is the name in `exclude` when the
    storage is one of those tensors (parameters, the layer's input), "<name>-copy" for a
    tensor of another storage holding the same values, else "activation".
    Tensors saved twice (a ReLU output that max_pool2d saves again) count once.
    """
    known = {t.untyped_storage().data_ptr(): role for role, t in exclude.items()}
    saved: dict[int, tuple[int, str, str]] = {}

    def role_of(t, key):
        if key in known:
            return known[key]
        for role, e in exclude.items():  # a copy (another storage) of the input or a parameter
            if t.shape == e.shape and t.dtype == e.dtype and torch.equal(t.detach(), e.detach()):
                return f"{role}-copy"
        return "activation"

    def pack(t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in saved:
            desc = f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"
            saved[key] = (storage.nbytes(), desc, role_of(t, key))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    del out
    return saved


#: Side of the square float32 matrices of the peak measurement. CPU: 17 GFLOP per product,
#: ~0.1 s on 2 cores, large enough that torch.mm runs at its best blocking and threading.
#: GPU: 1.1 TFLOP, ~20 ms on an H100 in float32, well above launch and clock ramp-up times.
PEAK_N = {"cpu": 2048, "cuda": 8192}


def peak_mm_gflops(settings: Settings, reps: int = 7) -> tuple[int, float, Timing]:
    """float32 torch.mm of two n x n matrices at the current thread count: the machine's
    matmul peak as this torch reaches it. Returns (n, GFLOP/s of the fastest rep, all reps)."""
    n = PEAK_N[settings.device]
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(settings.device)
    b = torch.randn(n, n, generator=gen).to(settings.device)
    c = torch.empty(n, n, device=settings.device)
    torch.mm(a, b, out=c)  # warm-up
    times = []
    for _ in range(reps):
        settings.sync()
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        settings.sync()
        times.append(time.perf_counter() - t0)
    return n, 2 * n**3 / min(times) / 1e9, Timing(times, 1)


def timed_first_call(fn, settings: Settings) -> float:
    """Wall time of fn() (its first call compiles), synchronised on CUDA."""
    settings.sync()
    t0 = time.perf_counter()
    fn()
    settings.sync()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# The three passes of an op benchmark


def clear_grads(tensors) -> None:
    for t in tensors:
        t.grad = None


class BackwardOnly:
    """Times backward alone: prepare(k), untimed, builds k graphs with y = f(*args); each
    call then runs one y.backward(grad_out), so every graph is used once and freed as in
    training (retain_graph is not an option: torch.compile's backward donates its buffers)."""

    def __init__(self, f, args, grad_out, leaves):
        self.f, self.args, self.grad_out, self.leaves = f, args, grad_out, leaves
        self.pending = []

    def prepare(self, k: int) -> None:
        self.pending = [self.f(*self.args) for _ in range(k)]

    def __call__(self) -> None:
        if not self.pending:  # a call outside a prepared sample (warm-up)
            self.prepare(1)
        clear_grads(self.leaves)
        self.pending.pop().backward(self.grad_out)


def op_pass_fn(f, args, grad_out, pass_):
    """A callable running `pass_` of y = f(*args) once.

    forward: f(*args) with autograd recording (what a training step's forward costs);
    inference: f(*args) under torch.no_grad (what evaluation costs); backward: see
    BackwardOnly; full: forward then backward. Gradients are reset to None before each
    backward so that no provider pays for accumulating them.
    """
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    if pass_ == "forward":
        return lambda: f(*args)
    if pass_ == "inference":

        def inference():
            with torch.no_grad():
                f(*args)

        return inference
    if pass_ == "backward":
        return BackwardOnly(f, args, grad_out, leaves)

    def full():
        clear_grads(leaves)
        f(*args).backward(grad_out)

    return full
