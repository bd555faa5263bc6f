"""The built extension holds CUDA device code (SASS) for sm_80 and sm_90, every fastlenet kernel
in both: read from the fatbinary of fastlenet/_C*.so with cuobjdump, no GPU needed.

On a machine with nvcc (and the CUDA build of torch) an extension built without its CUDA
kernels fails this test rather than skipping it: a build machine without a GPU must not
silently drop them (FASTLENET_CUDA=0 is the explicit way to do that, and fails here too).
"""

import glob
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import benchmark_script

from fastlenet import _ext

ARCHS = ("sm_80", "sm_90")  # setup.py's default TORCH_CUDA_ARCH_LIST "8.0;9.0"
# Every __global__ kernel template of csrc/*_cuda.cuh.
KERNELS = (
    "conv_relu_pool_fwd_kernel",
    "conv_relu_pool_bwd_input_kernel",
    "conv_relu_pool_bwd_weight_partial_kernel",
    "conv_relu_pool_bwd_weight_reduce_kernel",
    "gemm_kernel",
    "column_sum_kernel",
)


def _cuda_home():
    """The toolkit root with a real nvcc, searched as setup.py does."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    roots += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in roots:
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return Path(root)
    return None


@pytest.fixture(scope="module")
def library():
    cuda_home = _cuda_home()
    if cuda_home is None or torch.version.cuda is None:
        pytest.skip("no nvcc or a CPU-only torch here: the extension is built without CUDA")
    assert _ext.LOADED, _ext.LOAD_ERROR
    assert _ext.cuda_built(), (
        f"nvcc is at {cuda_home} but fastlenet._C was built without its CUDA kernels "
        "(FASTLENET_CUDA=0, or the build fell back): rebuild with `make build`"
    )
    tool = benchmark_script("gpu_static").cuobjdump()
    if tool is None:
        pytest.fail("cuobjdump not found (CUDA toolkit bin/, PATH, or triton's bundled copy)")
    return tool, _ext._C.__file__


def _functions_per_arch(tool, path):
    """{arch: set of kernel function names} from cuobjdump's per-cubin resource listing."""
    text = subprocess.run(
        [tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True
    ).stdout
    found: dict[str, set[str]] = {}
    arch = None
    for line in text.splitlines():
        m = re.match(r"\s*arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
            found.setdefault(arch, set())
        m = re.match(r"\s*Function (\S+):", line)
        if m and arch is not None:
            found[arch].add(m.group(1))
    return found


def test_extension_holds_device_code_for_sm80_and_sm90(library):
    tool, path = library
    listing = subprocess.run(
        [tool, "--list-elf", path], capture_output=True, text=True, check=True
    ).stdout
    archs = set(re.findall(r"\.(sm_\d+)\.cubin", listing))
    assert set(ARCHS) <= archs, listing


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_is_compiled_for(library, arch):
    functions = _functions_per_arch(*library).get(arch, set())
    missing = [k for k in KERNELS if not any(k in f for f in functions)]
    assert not missing, f"{arch} lacks {missing}"
    # float32, float64, float16 and bfloat16 instantiations of the conv forward kernel.
    fwd = [f for f in functions if "conv_relu_pool_fwd_kernel" in f]
    for dtype in ("If", "Id", "I6__half", "I13__nv_bfloat16"):
        assert any(dtype in f for f in fwd), f"{arch}: no {dtype} conv forward in {fwd}"
