"""linear_relu on the Triton backend alone: the split reduction, the TF32 option, and every
kernel compiled natively. What every backend has (parity, gradcheck, the raw ops against the
reference, NaN, opcheck, determinism...) runs on Triton too, from tests/test_linear_relu.py and
tests/test_ops.py, on the small rows of tests/geometry.py.

Without a GPU every test runs on CPU tensors through Triton's interpreter (tests/conftest.py
sets TRITON_INTERPRET=1 before triton is imported). The `gpu` versions run the same checks
natively on CUDA tensors: `pytest -m gpu tests/test_linear_relu_triton.py`.
"""

import os
import subprocess
import sys

import pytest
import torch
from conftest import rel_err
from geometry import LINEAR, linear_inputs
from inductor_copy import inductor_copy

from fastlenet import backends, reference
from fastlenet.kernels import launch
from fastlenet.kernels import linear_relu as triton_linear

# A skipif mark, not a module-level skip: the native compile check imports this module in a
# process without the interpreter (see test_kernels_compile_natively).
pytestmark = pytest.mark.skipif(
    not backends.available_backends()["triton"],
    reason=f"triton backend: {backends.available_backends()['triton']}",
)

INTERPRETED = backends.triton_interpreted()


@pytest.mark.skipif(not INTERPRETED, reason="the split count is the GPU's choice natively")
def test_small_shapes_run_the_multi_split_reduction():
    m, k, n = LINEAR["row_blocks"]
    cfg = launch.gemm_blocks(n, k, m)
    assert launch.num_splits(m, cfg["BLOCK_K"], 1, torch.device("cpu")) > 1


@pytest.mark.gpu
def test_tf32_option():
    x, weight, bias = linear_inputs(
        LINEAR["lenet_fc1_small"], torch.float32, "cuda", requires_grad=False
    )
    ref = reference.linear_relu_fwd(x.double(), weight.double(), bias.double(), True)
    launch.set_allow_tf32(True)
    try:
        out = triton_linear.OPS.fwd(x, weight, bias, True)
    finally:
        launch.set_allow_tf32(False)
    # TF32 rounds the operands to 10 mantissa bits: ~1e-3 relative error, not ~1e-7.
    assert rel_err(out, ref) < 5e-3


_POINTER = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
_POINTER[torch.float64] = "*fp64"


def compile_all_natively(arch, inductor=False):
    """Every kernel of this op for each dtype, compiled to a cubin for sm_<arch> with the
    launchers' native settings; with `inductor`, each as torch.compile rebuilds it
    (tests/inductor_copy.py). Run without TRITON_INTERPRET."""
    assert not launch.INTERPRETED
    source = inductor_copy if inductor else (lambda kernel: kernel)
    k = triton_linear
    for dtype, ptr in _POINTER.items():
        acc = "*fp64" if dtype == torch.float64 else "*fp32"
        for tf32 in [False, True] if dtype == torch.float32 else [False]:
            common = {
                "RELU": True,
                "ACC_FP64": launch.acc_is_fp64(dtype),
                "DOT_PRECISION": "tf32" if tf32 else "ieee",
                "DOT_UPCAST": False,
                **{n: v for n, v in launch.gemm_blocks(256, 120, 400).items() if n != "num_warps"},
            }
            ptrs = {"x_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "out_ptr": ptr}
            launch.compile_natively(source(k._fwd_kernel), ptrs, {**common, "HAS_BIAS": True}, arch)
            ptrs = {"g_ptr": ptr, "out_ptr": ptr, "w_ptr": ptr, "gx_ptr": ptr}
            launch.compile_natively(source(k._bwd_input_kernel), ptrs, common, arch)
            ptrs = {"g_ptr": ptr, "out_ptr": ptr, "x_ptr": ptr}
            ptrs |= {"part_w_ptr": acc, "part_b_ptr": acc}
            launch.compile_natively(source(k._bwd_weight_kernel), ptrs, common, arch)


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "inductor"), [(80, False), (90, False), (90, True)])
def test_kernels_compile_natively(arch, inductor):
    """Compile every kernel and dtype for the GPU, in a process without the interpreter (which
    runs kernels the GPU lowering may reject). Needs no GPU; it does not run the kernels."""
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
