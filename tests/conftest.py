"""Shared test settings.

Without a CUDA device the Triton kernels run on CPU tensors through Triton's interpreter,
which must be switched on before triton is first imported: that happens here, before any
test module is collected. Tests marked `gpu` need a CUDA device: without one they are
deselected (reported as such, never counted as passed); `pytest -m gpu` runs them on a GPU.
"""

import os
import sys

import pytest
import torch

# The C++ kernels fill their outputs with garbage before writing them (csrc/checks.h).
os.environ.setdefault("FASTLENET_POISON", "1")

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastlenet  # noqa: E402
from fastlenet import backends  # noqa: E402
from fastlenet.reference import rel_err  # noqa: E402, F401  (the tests' comparison)

#: backends that run on CPU tensors here, in the order the tests use them (Triton only under
#: its interpreter: on a GPU machine it is available but runs on CUDA tensors alone).
CPU_BACKENDS = [
    name
    for name in ("cpu", "triton", "reference")
    if fastlenet.available_backends()[name] and (name != "triton" or backends.triton_interpreted())
]


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def write_idx_files(directory, seed=2):
    """A small synthetic dataset as the four standard idx files (gzipped) in `directory`."""
    from fastlenet import data

    directory.mkdir()
    arrays = data.synthetic_arrays(n_train=128, n_test=32, seed=seed)
    for key, stem in data.IDX_FILES.items():
        data.write_idx(directory / (stem + ".gz"), arrays[key])
    return directory


@pytest.fixture
def idx_dir(tmp_path):
    """write_idx_files in a fresh directory: what --data-dir reads in the CLI tests."""
    return write_idx_files(tmp_path / "idx")


def benchmark_script(name):
    """benchmarks/<name>.py loaded as a module: tests that check what `make bench` reports
    (and share its helpers) import it this way, benchmarks/ not being a package."""
    import importlib.util
    from pathlib import Path

    if name not in sys.modules:
        path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]
