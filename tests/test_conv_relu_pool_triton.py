"""conv_relu_pool2d on the Triton backend alone: the split reduction, the TF32 option,
torch.compile, and every kernel compiled natively. What every backend has (parity, gradcheck,
the raw ops against the reference, ties, NaN, opcheck, determinism...) runs on Triton too, from
tests/test_conv_relu_pool.py and tests/test_ops.py, on the small rows of tests/geometry.py.

Without a GPU every test runs on CPU tensors through Triton's interpreter (tests/conftest.py
sets TRITON_INTERPRET=1 before triton is imported). The `gpu` versions run the same checks
natively on CUDA tensors: `pytest -m gpu tests/test_conv_relu_pool_triton.py`.
"""

import os
import subprocess
import sys

import pytest
import torch
from conftest import rel_err
from geometry import CONV, conv_inputs
from inductor_copy import inductor_copy

import fastlenet
from fastlenet import backends, reference
from fastlenet.kernels import conv_relu_pool as triton_conv
from fastlenet.kernels import launch

# A skipif mark, not a module-level skip: the native compile check imports this module in a
# process without the interpreter (see test_kernels_compile_natively).
pytestmark = pytest.mark.skipif(
    not backends.available_backends()["triton"],
    reason=f"triton backend: {backends.available_backends()['triton']}",
)

INTERPRETED = backends.triton_interpreted()
# CPU tensors only through the interpreter; CUDA tensors only natively (with a GPU).
DEVICES = ["cpu"] if INTERPRETED else [pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.skipif(not INTERPRETED, reason="the split count is the GPU's choice natively")
def test_small_shapes_run_the_multi_split_reduction():
    # CONV["lenet_conv1_small"]: 4 window positions x 2 x 6 x 6 pooled outputs = 288 rows.
    cfg = launch.gemm_blocks(6, 25, 288)
    assert launch.num_splits(288, cfg["BLOCK_K"], 1, torch.device("cpu")) > 1


@pytest.mark.gpu
def test_tf32_option():
    x, weight, bias, conv = conv_inputs(
        CONV["lenet_conv2"], torch.float32, "cuda", requires_grad=False
    )
    ref, _ = reference.conv_relu_pool_fwd(x.double(), weight.double(), bias.double(), *conv)
    assert launch.dot_precision(torch.float32) == "ieee"
    launch.set_allow_tf32(True)
    try:
        assert launch.dot_precision(torch.float32) == "tf32"
        out, _ = triton_conv.OPS.fwd(x, weight, bias, *conv)
    finally:
        launch.set_allow_tf32(False)
    # TF32 rounds the operands to 10 mantissa bits: ~1e-3 relative error, not ~1e-7.
    assert rel_err(out, ref) < 5e-3


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    # Under the interpreter the ops are opaque custom ops (inductor calls them); natively they
    # are triton_ops and inductor traces into their kernels.
    model = torch.nn.Sequential(
        fastlenet.ConvReLUPool2d(1, 4, 3, backend="triton"),
        torch.nn.Flatten(),
        fastlenet.LinearReLU(4 * 3 * 3, 5, backend="triton"),
    ).to(device)
    x = torch.randn(3, 1, 8, 8, device=device)
    eager = model(x)
    eager_grads = torch.autograd.grad(eager.sum(), list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    grads = torch.autograd.grad(out.sum(), list(model.parameters()))
    assert rel_err(out, eager) < 1e-6
    for got, want in zip(grads, eager_grads, strict=True):
        assert rel_err(got, want) < 1e-6


def test_importing_the_kernels_package_does_not_import_triton():
    code = "import sys, fastlenet, fastlenet.kernels; sys.exit('triton' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


_POINTER = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
_POINTER[torch.float64] = "*fp64"


def compile_all_natively(arch, inductor=False):
    """Every kernel of this op (and the shared split reduction) for each dtype, compiled to a
    cubin for sm_<arch> with the launchers' native settings; with `inductor`, each as
    torch.compile rebuilds it (tests/inductor_copy.py). Run without TRITON_INTERPRET."""
    assert not launch.INTERPRETED
    source = inductor_copy if inductor else (lambda kernel: kernel)
    k = triton_conv
    for dtype, ptr in _POINTER.items():
        acc = "*fp64" if dtype == torch.float64 else "*fp32"
        for tf32 in [False, True] if dtype == torch.float32 else [False]:
            common = {
                "KH": 5,
                "KW": 5,
                "ACC_FP64": launch.acc_is_fp64(dtype),
                "DOT_PRECISION": "tf32" if tf32 else "ieee",
                "DOT_UPCAST": False,
                **{n: v for n, v in launch.gemm_blocks(500, 16, 150).items() if n != "num_warps"},
            }
            pool = {"POOL_H": 3, "POOL_W": 3, "WIN_H": 2, "WIN_W": 2}
            fwd_ptrs = {"x_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "out_ptr": ptr}
            launch.compile_natively(
                source(k._fwd_kernel),
                {**fwd_ptrs, "argmax_ptr": "*u8"},
                {**common, "POOL_H": 2, "POOL_W": 2, "HAS_BIAS": True},
                arch,
            )
            ptrs = {"g_ptr": ptr, "argmax_ptr": "*u8", "w_ptr": ptr, "gx_ptr": ptr}
            launch.compile_natively(source(k._bwd_input_kernel), ptrs, {**common, **pool}, arch)
            fma = launch.dot_fma_needed(dtype)
            weight_cfg = {**common, **pool, "DOT_FMA": fma}
            if fma:
                weight_cfg.update(launch.FMA_BLOCKS)
            ptrs = {"g_ptr": ptr, "argmax_ptr": "*u8", "x_ptr": ptr}
            ptrs |= {"part_w_ptr": acc, "part_b_ptr": acc}
            launch.compile_natively(source(k._bwd_weight_kernel), ptrs, weight_cfg, arch)
        launch.compile_natively(
            source(launch._sum_splits_kernel),
            {"part_ptr": acc, "out_ptr": ptr},
            {"BLOCK": 1024},
            arch,
        )


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "inductor"), [(80, False), (90, False), (90, True)])
def test_kernels_compile_natively(arch, inductor):
    """The interpreter runs kernels Triton cannot compile (it found a float64 dot the GPU
    lowering rejects): compile every kernel and dtype for the GPU, in a process without the
    interpreter. Needs no GPU; it does not run the kernels."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = os.path.dirname(os.path.abspath(__file__))
    code = (
        f"import sys, triton; sys.path.insert(0, {here!r}); "
        f"import {__name__.rpartition('.')[2]} as t; t.compile_all_natively({arch}, {inductor})"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
