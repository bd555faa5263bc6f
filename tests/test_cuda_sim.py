"""The CUDA kernels (csrc/*_cuda.cuh) and their launchers (csrc/*_cuda.cu), run on the CPU by
the simulator of tests/cuda_sim/ and compared with fastlenet.reference in float64.

tests/cuda_sim/build.sh compiles the same CUDA sources with g++ against cuda_sim.h (one
std::thread per CUDA thread, __syncthreads a std::barrier); sim_driver runs one launcher on
tensors passed as raw files. Every launcher and every kernel variant is run: forward, every
gradient, odd shapes, strides, padding, overlapping and 1x1 pools, ties, NaN, all-negative
windows, several output-channel blocks, pooled tiles and bwd_weight slices, the
channel-chunked and the unstaged forward, the opt-in atomics, both GEMM tiles, each dtype.
A subset runs again under ThreadSanitizer, which must report no race; race_demo shows that it
does report a planted missing __syncthreads.

What this cannot show (a GPU run must): code generation by nvcc and the real memory model
(warps, concurrent blocks, caches), shared-memory limits and occupancy, speed.
"""

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import rel_err
from geometry import CONV, SIM_CONV, pairs

from fastlenet import reference

SIM_DIR = Path(__file__).parent / "cuda_sim"
BUILD_DIR = SIM_DIR / "build"

# Relative-error tolerance per dtype, against the float64 reference computed from the same
# (rounded) inputs: float64 sums in another order; float32 accumulation over at most a few
# hundred terms; float16/bfloat16 add the rounding of the output (2^-11, 2^-8 relative).
DTYPES = {
    "f64": (torch.float64, 1e-12),
    "f32": (torch.float32, 1e-5),
    "f16": (torch.float16, 2e-3),
    "bf16": (torch.bfloat16, 1.6e-2),
}
_NP_BITS = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}  # raw storage per byte width


def _build(variant: str) -> dict[str, Path]:
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.fail("the CUDA simulator needs g++ (or $CXX) with C++20")
    subprocess.run(["bash", str(SIM_DIR / "build.sh"), variant], check=True)
    suffix = "-tsan" if variant == "tsan" else ""
    return {name: BUILD_DIR / f"{name}{suffix}" for name in ("sim_driver", "race_demo")}


@pytest.fixture(scope="session")
def sim():
    return _build("plain")


@pytest.fixture(scope="session")
def sim_tsan():
    return _build("tsan")


def _write(path: Path, t: torch.Tensor) -> None:
    t = t.detach().contiguous()
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    t.view(bits).numpy().tofile(path)


def _read(path: Path, dtype: torch.dtype, shape) -> torch.Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.from_numpy(np.fromfile(path, dtype=_NP_BITS[size]))
    return raw.view(dtype).reshape(shape)


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str = "") -> None:
    """NaN and +-Inf exactly where the reference has them, rel_err < tol elsewhere."""
    want = want.to(got.device)
    assert got.shape == want.shape, what
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN positions differ"
    inf = want.isinf()
    assert torch.equal(got.isinf(), inf) and torch.equal(got[inf].double(), want[inf]), what
    finite = want.isfinite()
    assert rel_err(got[finite], want[finite]) < tol, what


def run_sim(driver: Path, op: str, tmp: Path, inputs: dict, params: dict, outputs: dict) -> dict:
    """Runs `op` in the simulator on `inputs`; `outputs` maps each output to (dtype, shape)."""
    tmp.mkdir(parents=True, exist_ok=True)
    for name, t in inputs.items():
        _write(tmp / f"{name}.bin", t)
    args = [str(driver), op, str(tmp), *(f"{k}={v}" for k, v in params.items())]
    env = {**os.environ, "TSAN_OPTIONS": "halt_on_error=1 exitcode=66"}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert "ThreadSanitizer" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stderr
    return {name: _read(tmp / f"{name}.bin", *spec) for name, spec in outputs.items()}


# ---------------------------------------------------------------------------------------------
# conv2d -> ReLU -> max_pool2d

# The simulator's rows of the shared table (geometry.SIM_CONV), by name.
CONV_GEOMETRIES = {name: CONV[name] for name in SIM_CONV}


def _conv_case(name, dtype, kind="randn"):
    """Inputs (in `dtype`) and geometry of one case. kind: randn, ints (ties), nan, negative."""
    n, c, h, w, o, kh, kw, *rest = CONV_GEOMETRIES[name]
    stride, padding, pool, pool_stride = pairs(rest)
    if kind == "ints":  # small integers: exact in every dtype, so windows hold exact ties
        x = torch.randint(-2, 3, (n, c, h, w)).to(dtype)
        weight = torch.randint(-1, 2, (o, c, kh, kw)).to(dtype)
        bias = torch.randint(-1, 2, (o,)).to(dtype)
    else:
        x = torch.randn(n, c, h, w).to(dtype)
        weight = torch.randn(o, c, kh, kw).to(dtype)
        bias = torch.randn(o).to(dtype)
    if kind == "nan":
        x.view(-1)[torch.randperm(x.numel())[:3]] = float("nan")
    if kind == "negative":  # every conv output < 0: out 0, argmax 255 everywhere
        x, weight, bias = x.abs(), -weight.abs(), -bias.abs() - 1
    geom = dict(
        n=n, c=c, h=h, w=w, o=o, kh=kh, kw=kw, sh=stride[0], sw=stride[1], padh=padding[0],
        padw=padding[1], poolh=pool[0], poolw=pool[1], psh=pool_stride[0], psw=pool_stride[1],
    )  # fmt: skip
    return x, weight, bias, (stride, padding, pool, pool_stride), geom


def _check_conv_fwd(driver, tmp, name, dt, kind="randn", bias=True, smem=None):
    dtype, tol = DTYPES[dt]
    x, weight, b, conv, geom = _conv_case(name, dtype, kind)
    ref_out, ref_am = reference.conv_relu_pool_fwd(
        x.double(), weight.double(), b.double() if bias else None, *conv
    )
    inputs = {"x": x, "w": weight, **({"b": b} if bias else {})}
    params = {**geom, "dtype": dt, "bias": int(bias), **({"smem": smem} if smem else {})}
    got = run_sim(
        driver, "conv_fwd", tmp, inputs, params,
        {"out": (dtype, ref_out.shape), "argmax": (torch.uint8, ref_am.shape)},
    )  # fmt: skip
    assert torch.equal(got["argmax"], ref_am)
    assert_close(got["out"], ref_out, tol, "out")
    return got


def _check_conv_bwd(
    driver, tmp, name, dt, kind="randn", atomics=False, ops=("input", "weight"), edit=None
):
    """Backward kernels on the reference's argmax; `edit(x, weight, go, am)` may plant values
    (Inf/NaN) in place before the backward runs."""
    dtype, tol = DTYPES[dt]
    x, weight, b, conv, geom = _conv_case(name, dtype, kind)
    _, am = reference.conv_relu_pool_fwd(x.double(), weight.double(), b.double(), *conv)
    go = torch.randn(am.shape).to(dtype)
    if edit is not None:
        edit(x, weight, go, am)
    args = (go.double(), am, x.double(), weight.double(), *conv)
    params = {**geom, "dtype": dt, "atomics": int(atomics)}
    if "input" in ops:
        want = reference.conv_relu_pool_bwd(*args, True, False)[0]
        got = run_sim(
            driver, "conv_bwd_input", tmp / "input", {"go": go, "am": am, "w": weight}, params,
            {"gx": (dtype, x.shape)},
        )  # fmt: skip
        assert_close(got["gx"], want, tol, "grad_input")
    if "weight" in ops:
        _, want_w, want_b = reference.conv_relu_pool_bwd(*args, False, True)
        got = run_sim(
            driver, "conv_bwd_weight", tmp / "weight", {"go": go, "am": am, "x": x}, params,
            {"gw": (dtype, weight.shape), "gb": (dtype, b.shape)},
        )  # fmt: skip
        assert_close(got["gw"], want_w, tol, "grad_weight")
        assert_close(got["gb"], want_b, tol, "grad_bias")


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("name", CONV_GEOMETRIES)
def test_conv_fwd(sim, tmp_path, name, dt):
    _check_conv_fwd(sim["sim_driver"], tmp_path, name, dt)


@pytest.mark.parametrize("dt", ["f64", "f32"])
@pytest.mark.parametrize("name", CONV_GEOMETRIES)
def test_conv_bwd(sim, tmp_path, name, dt):
    _check_conv_bwd(sim["sim_driver"], tmp_path, name, dt)


@pytest.mark.parametrize("dt", ["f16", "bf16"])
@pytest.mark.parametrize("name", ["lenet_conv2", "odd_small"])
def test_conv_bwd_half(sim, tmp_path, name, dt):
    _check_conv_bwd(sim["sim_driver"], tmp_path, name, dt)


@pytest.mark.parametrize("name", ["lenet_conv2", "odd_small", "strides"])
def test_conv_ties_pick_the_first_max(sim, tmp_path, name):
    got = _check_conv_fwd(sim["sim_driver"], tmp_path, name, "f32", kind="ints")
    assert (got["argmax"] == 255).any() and (got["argmax"] != 255).any()
    _check_conv_bwd(sim["sim_driver"], tmp_path, name, "f32", kind="ints")


def test_conv_nan_wins_and_passes_gradient(sim, tmp_path):
    """A NaN in a window wins (the last NaN, as max_pool2d) and passes gradient, as stock
    ReLU's backward does (checked against the reference's argmax, which follows both)."""
    got = _check_conv_fwd(sim["sim_driver"], tmp_path, "lenet_conv2", "f32", kind="nan")
    assert got["out"].isnan().any()
    assert (got["argmax"][got["out"].isnan()] != 255).all()
    # Both gradients, NaN where the reference's dense backward has NaN: grad_weight takes the
    # dense path (x holds NaN), grad_input is finite (it reads argmax and weight alone).
    _check_conv_bwd(sim["sim_driver"], tmp_path, "lenet_conv2", "f32", kind="nan")


def _plant_inf_weight(x, weight, go, am):
    weight[1, -1, 1, 1] = float("inf")  # 0 * Inf = NaN where no gradient flows, as in stock


def _plant_inf_x(x, weight, go, am):
    x[0, -1, 4, 5] = float("-inf")


def _plant_inf_grad(x, weight, go, am):
    live = (am != 255).nonzero()
    go[tuple(live[0])] = float("inf")  # a live window: Inf * padding 0 = NaN, as in stock
    for dead in (am == 255).nonzero()[:1]:
        go[tuple(dead)] = float("nan")  # a window passing no gradient: dropped


@pytest.mark.parametrize("edit", [_plant_inf_weight, _plant_inf_x, _plant_inf_grad])
@pytest.mark.parametrize("name", ["lenet_conv1_padded", "odd_small"])
def test_conv_bwd_inf_and_nan_propagate_as_in_stock(sim, tmp_path, name, edit):
    _check_conv_bwd(sim["sim_driver"], tmp_path, name, "f64", edit=edit)


def test_conv_all_negative_windows(sim, tmp_path):
    got = _check_conv_fwd(sim["sim_driver"], tmp_path, "odd_small", "f32", kind="negative")
    assert (got["argmax"] == 255).all() and (got["out"] == 0).all()
    _check_conv_bwd(sim["sim_driver"], tmp_path, "odd_small", "f32", kind="negative")


def test_conv_fwd_without_bias(sim, tmp_path):
    _check_conv_fwd(sim["sim_driver"], tmp_path, "odd_small", "f32", bias=False)


# Shared-memory budgets that force the other forward paths on small shapes. lenet_conv2 stages
# (10 x 10 input patch + 4 x 25 weights) x 4 bytes = 800 bytes per channel: a budget of 1700
# bytes holds 2 of its 6 channels (3 chunks, re-staged per window position), 16 bytes none
# (the unstaged kernel reading global memory).
@pytest.mark.parametrize("smem", [1700, 16])
@pytest.mark.parametrize("dt", ["f64", "f32"])
def test_conv_fwd_chunked_and_unstaged(sim, tmp_path, smem, dt):
    _check_conv_fwd(sim["sim_driver"], tmp_path, "lenet_conv2", dt, smem=smem)


@pytest.mark.parametrize("name", ["lenet_conv2", "slices"])
def test_conv_bwd_weight_atomics(sim, tmp_path, name):
    _check_conv_bwd(sim["sim_driver"], tmp_path, name, "f32", atomics=True, ops=("weight",))


def test_conv_bwd_skips_bytes_that_are_no_window_position(sim, tmp_path):
    """The CUDA bindings cannot read argmax values without a device sync: a byte that is no
    window position (the forward never writes one) must pass no gradient, as 255 does."""
    dtype, tol = DTYPES["f32"]
    x, weight, b, conv, geom = _conv_case("lenet_conv2", dtype)  # 2 x 2 pool: positions 0..3
    _, am = reference.conv_relu_pool_fwd(x.double(), weight.double(), b.double(), *conv)
    dead = am == 255
    assert dead.any() and not dead.all()
    bad = torch.where(dead, torch.randint(4, 255, am.shape, dtype=torch.uint8), am)
    go = torch.randn(am.shape)
    args = (go.double(), am, x.double(), weight.double(), *conv)
    params = {**geom, "dtype": "f32"}
    got = run_sim(
        sim["sim_driver"], "conv_bwd_input", tmp_path / "input", {"go": go, "am": bad, "w": weight},
        params, {"gx": (dtype, x.shape)},
    )  # fmt: skip
    assert rel_err(got["gx"], reference.conv_relu_pool_bwd(*args, True, False)[0]) < tol
    _, want_w, want_b = reference.conv_relu_pool_bwd(*args, False, True)
    got = run_sim(
        sim["sim_driver"], "conv_bwd_weight", tmp_path / "weight", {"go": go, "am": bad, "x": x},
        params, {"gw": (dtype, weight.shape), "gb": (dtype, b.shape)},
    )  # fmt: skip
    assert rel_err(got["gw"], want_w) < tol and rel_err(got["gb"], want_b) < tol


def test_conv_empty_batch(sim, tmp_path):
    x, weight, b, conv, params = _conv_case("odd_small", torch.float32)
    params["n"] = 0
    x = x[:0]
    _, am = reference.conv_relu_pool_fwd(x, weight, b, *conv)
    got = run_sim(
        sim["sim_driver"], "conv_bwd_weight", tmp_path,
        {"go": torch.empty(am.shape), "am": am, "x": x}, {**params, "dtype": "f32"},
        {"gw": (torch.float32, weight.shape), "gb": (torch.float32, b.shape)},
    )  # fmt: skip
    assert (got["gw"] == 0).all() and (got["gb"] == 0).all()


# ---------------------------------------------------------------------------------------------
# linear -> ReLU

# (batch, in_features, out_features, tile); tile 0 lets the launcher choose (32 here); an
# empty batch (grad_weight and grad_bias all zero).
LINEAR_SHAPES = [(5, 7, 3, 0), (33, 70, 65, 32), (33, 70, 65, 64), (64, 400, 120, 0), (0, 5, 4, 0)]


def _linear_case(batch, fin, fout, dtype):
    return (
        torch.randn(batch, fin).to(dtype),
        torch.randn(fout, fin).to(dtype),
        torch.randn(fout).to(dtype),
    )


def _check_linear(driver, tmp, shape, dt, relu=True, bias=True, nan=False):
    dtype, tol = DTYPES[dt]
    batch, fin, fout, tile = shape
    x, w, b = _linear_case(batch, fin, fout, dtype)
    params = {"batch": batch, "in": fin, "out": fout, "relu": int(relu), "tile": tile, "dtype": dt}
    want = reference.linear_relu_fwd(x.double(), w.double(), b.double() if bias else None, relu)
    got = run_sim(
        driver, "linear_fwd", tmp / "fwd", {"x": x, "w": w, **({"b": b} if bias else {})},
        {**params, "bias": int(bias)}, {"out": (dtype, want.shape)},
    )["out"]  # fmt: skip
    assert_close(got, want, tol, "out")
    out = want.to(dtype)  # the saved output: the gradient stops where out <= 0
    go = torch.randn(batch, fout).to(dtype)
    if nan:
        out[0, 0] = float("nan")  # passes its gradient, as in stock's ReLU backward
        go[out <= 0] = float("nan")  # dropped where the gradient stops
        w = w.clone()
        w[0, 1] = float("inf")  # 0 * Inf = NaN in grad_input, as in stock
    want_gx, want_gw, want_gb = reference.linear_relu_bwd(
        go.double(), out.double(), x.double(), w.double(), relu
    )
    got = run_sim(
        driver, "linear_bwd", tmp / "bwd",
        {"go": go, **({"out": out} if relu else {}), "x": x, "w": w}, params,
        {"gx": (dtype, x.shape), "gw": (dtype, w.shape), "gb": (dtype, b.shape)},
    )  # fmt: skip
    for name, ref in (("gx", want_gx), ("gw", want_gw), ("gb", want_gb)):
        assert_close(got[name], ref, tol, name)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("shape", LINEAR_SHAPES)
def test_linear(sim, tmp_path, shape, dt):
    _check_linear(sim["sim_driver"], tmp_path, shape, dt)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_without_relu(sim, tmp_path, bias):
    _check_linear(sim["sim_driver"], tmp_path, (33, 70, 65, 32), "f32", relu=False, bias=bias)


@pytest.mark.parametrize("relu", [True, False])
def test_linear_nan_and_inf_propagate_as_in_stock(sim, tmp_path, relu):
    _check_linear(sim["sim_driver"], tmp_path, (5, 7, 3, 0), "f64", relu=relu, nan=True)


# ---------------------------------------------------------------------------------------------
# ThreadSanitizer


def test_tsan_catches_a_missing_syncthreads(sim_tsan):
    env = {**os.environ, "TSAN_OPTIONS": "exitcode=66"}
    racy = subprocess.run(
        [str(sim_tsan["race_demo"]), "racy"], capture_output=True, text=True, env=env
    )
    assert "WARNING: ThreadSanitizer: data race" in racy.stderr
    assert "block_sum<false>" in racy.stderr
    fixed = subprocess.run(
        [str(sim_tsan["race_demo"]), "fixed"], capture_output=True, text=True, env=env
    )
    assert "ThreadSanitizer" not in fixed.stderr, fixed.stderr
    assert fixed.returncode == 0 and "sums right" in fixed.stdout


def test_tsan_no_race_in_the_kernels(sim_tsan, tmp_path):
    """Every kernel and launcher path once under TSan (run_sim fails on any report)."""
    d = sim_tsan["sim_driver"]
    _check_conv_fwd(d, tmp_path / "fwd", "odd_small", "f32")
    _check_conv_fwd(d, tmp_path / "chunked", "lenet_conv2", "f32", smem=1700)
    _check_conv_fwd(d, tmp_path / "unstaged", "odd_small", "f32", smem=16)
    _check_conv_bwd(d, tmp_path / "bwd", "odd_small", "f32")
    _check_conv_bwd(d, tmp_path / "atomics", "odd_small", "f32", atomics=True, ops=("weight",))
    _check_conv_bwd(d, tmp_path / "dense", "odd_small", "f32", kind="nan", ops=("weight",))
    _check_linear(d, tmp_path / "lin32", (33, 20, 40, 32), "f32")
    _check_linear(d, tmp_path / "lin64", (9, 20, 10, 64), "f32")
