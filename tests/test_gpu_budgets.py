"""Every GPU kernel keeps its resource budgets, checked on cubins without a GPU
(benchmarks/gpu_static.py reads them; `make bench` prints the same rows as a table):

- no spill (stack or local memory) in float32, TF32, float16 and bfloat16 (float64 may spill);
- at most 128 registers per thread;
- whole warps per block, and at least 4 warps per SM resident for every launch;
- and every Triton configuration compiles for sm_80 and sm_90.

CUDA: the extension's own cubins (fastlenet/_C*.so) with the block sizes and shared memory its
launchers choose for each shape (read from the extension through ctypes). Triton: every distinct
launch configuration the launchers choose at the model shapes and over the any-shape envelope,
compiled natively in a subprocess without TRITON_INTERPRET, as the native compile tests do
(about 3.5 minutes on 2 cores with a cold Triton cache, 15 s with a warm one).
"""

import importlib.util

import pytest
import torch
from conftest import benchmark_script

from fastlenet import _ext

gpu_static = benchmark_script("gpu_static")


def _report(rows) -> str:
    lines = []
    for r in rows:
        if broken := gpu_static.violations(r):
            lines.append(
                f"{r.backend} {r.op} {r.kernel} [{r.config}; {r.geometry}] sm_{r.arch} "
                f"{r.dtype} ({r.label}): {'; '.join(broken)}"
            )
    return "\n".join(lines)


@pytest.fixture(scope="module")
def cuda_rows():
    if torch.version.cuda is None or gpu_static.cuobjdump() is None:
        pytest.skip("a CPU-only torch or no cuobjdump: the extension has no CUDA kernels here")
    if not _ext.cuda_built():
        pytest.skip("fastlenet._C was built without its CUDA kernels (see test_cuda_build.py)")
    return gpu_static.cuda_rows()


def test_cuda_kernels_keep_the_budgets(cuda_rows):
    assert not _report(cuda_rows), "\n" + _report(cuda_rows)


def test_cuda_rows_cover_every_model_layer(cuda_rows):
    """Each model layer's launches were read for both archs and all four dtypes."""
    for arch in gpu_static.ARCHS:
        for dtype in ("float32", "float16", "bfloat16", "float64"):
            shapes = {s for r in cuda_rows if (r.arch, r.dtype) == (arch, dtype) for s in r.shapes}
            assert set(gpu_static.MODEL_CONV) | set(gpu_static.MODEL_LINEAR) <= shapes


def test_cuda_forward_block_fills_whole_warps(cuda_rows):
    """LeNet-5's conv2 (5 x 5 pooled outputs) runs 5 samples in a 128-thread block, where one
    sample per block was a 25-thread block."""
    fwd = [r for r in cuda_rows if "fwd_kernel" in r.kernel and "lenet5.conv2" in r.shapes]
    assert fwd and all(r.threads == 128 for r in fwd)


@pytest.mark.slow
def test_triton_kernels_compile_and_keep_the_budgets():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    rows = gpu_static.triton_rows()
    assert rows
    assert not _report(rows), "\n" + _report(rows)
    # The launch configuration follows the shape: several per kernel over the envelope.
    fwd = {r.config for r in rows if (r.op, r.kernel) == ("conv_relu_pool", "fwd")}
    assert len(fwd) > 1, fwd
