"""Which backend runs an op, and the table of every backend's ops: the one place for both.

Backends: "cpu" (C++), "cuda" (C++/CUDA), "triton", "reference" (pure PyTorch, the oracle).
"auto" picks the fastest available for the input's device; the environment variable
FASTLENET_BACKEND overrides "auto". It is read when fastlenet is imported and by refresh().

Every backend implements every op with the signatures of the schemas in csrc/fastlenet.cpp:
ops(op, backend) returns its `fwd` and `bwd` (the CPU's conv_relu_pool_infer, its inference
path, is called by fastlenet/conv_relu_pool.py alone). Adding a backend or an op touches `_table`.
"""

import dataclasses
import importlib
import importlib.util
import os
from collections.abc import Callable
from typing import NamedTuple

import torch

from fastlenet import _ext, reference

BACKENDS = ("cpu", "cuda", "triton", "reference")
CHOICES = ("auto", *BACKENDS)
ENV_VAR = "FASTLENET_BACKEND"

# Preference order of "auto" per device type. On CUDA the hand-written kernels come before
# Triton; neither has been timed on a GPU by this project yet (see README).
_AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    available: bool
    reason: str = ""

    def __repr__(self) -> str:
        return "available" if self.available else f"unavailable ({self.reason})"

    def __bool__(self) -> bool:
        return self.available


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


_STATUS: dict[str, BackendStatus] = {}


def _status(name: str) -> BackendStatus:
    # A plain dict cache: torch.compile traces through it (it warns on functools caches).
    if name not in _STATUS:
        _STATUS[name] = _probe(name)
    return _STATUS[name]


def _probe(name: str) -> BackendStatus:
    if name == "reference":
        return BackendStatus(True)
    if name == "cpu":
        return BackendStatus(_ext.LOADED, _ext.LOAD_ERROR or "")
    if name == "cuda":
        if not _ext.LOADED:
            return BackendStatus(False, _ext.LOAD_ERROR)
        if not _ext.cuda_built():
            return BackendStatus(
                False, "fastlenet._C was built without CUDA (FASTLENET_CUDA=0 or no nvcc)"
            )
        if not torch.cuda.is_available():
            return BackendStatus(False, "no CUDA device")
        return BackendStatus(True)
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return BackendStatus(False, "triton is not installed")
        if importlib.util.find_spec("fastlenet.kernels") is None:
            return BackendStatus(
                False,
                "fastlenet.kernels is missing: an install (`pip install -e .`) maps kernels/ to "
                "it, an in-place `setup.py build_ext --inplace` does not",
            )
        if not (torch.cuda.is_available() or triton_interpreted()):
            return BackendStatus(
                False, "no CUDA device (set TRITON_INTERPRET=1 for the slow CPU interpreter)"
            )
        return BackendStatus(True)
    raise ValueError(f"backend must be one of {CHOICES}, got {name!r}")


def available_backends() -> dict[str, BackendStatus]:
    """Every backend with whether it works here and, if not, why."""
    return {name: _status(name) for name in BACKENDS}


def check_choice(backend) -> str:
    if not isinstance(backend, str) or backend not in CHOICES:
        raise ValueError(f"backend must be one of {CHOICES}, got {backend!r}")
    return backend


def _runs_on(name: str, device_type: str) -> bool:
    if name == "reference":
        return True
    if name == "triton":
        return device_type == "cuda" or (device_type == "cpu" and triton_interpreted())
    return name == device_type


# FASTLENET_BACKEND as last read, and resolve()'s answers per (backend, device). resolve() runs
# on every layer call: reading an unset variable from os.environ raises and catches a KeyError
# (~1.4 us), and the whole choice cost ~5 us per call in LeNet-5's training step (~25 us per
# forward at batch 64, in-process A/B against a stub). Triton's answer also depends on
# TRITON_INTERPRET and is not cached; errors are not cached (they are raised again).
_env_override: str | None = None
_RESOLVED: dict[tuple, str] = {}


def refresh() -> None:
    """Reads FASTLENET_BACKEND again (after changing it from Python) and forgets every choice."""
    global _env_override
    _env_override = os.environ.get(ENV_VAR)
    _RESOLVED.clear()


refresh()


# The floating-point dtypes a backend's kernels take, where not every one: "auto" passes over a
# backend whose kernels do not take the input's dtype. Half precision on the CPU (a model moved
# to bfloat16 or float16, or torch.autocast) runs the reference: stock's own ops, as stock would.
KERNEL_DTYPES = {"cpu": (torch.float32, torch.float64)}


def resolve(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The concrete backend for a tensor of `dtype` on `device`; raises if it cannot run
    there. A backend named outright runs whatever the dtype (its op refuses one it does not
    take, naming it)."""
    check_choice(backend)
    key = (backend, device)
    name = _RESOLVED.get(key)
    if name is None:
        name = _resolve(backend, device.type)
        if name != "triton":
            _RESOLVED[key] = name
    taken = KERNEL_DTYPES.get(name)
    if taken is not None and dtype is not None and dtype not in taken and _auto(backend):
        return "reference"
    return name


def _auto(backend: str) -> bool:
    """Whether `backend` leaves the choice to resolve(): "auto", and FASTLENET_BACKEND unset or
    "auto"."""
    return backend == "auto" and _env_override in (None, "auto")


def _resolve(backend: str, device_type: str) -> str:
    if backend == "auto":
        backend = "auto" if _env_override is None else _env_override
        if backend not in CHOICES:
            raise ValueError(f"{ENV_VAR} must be one of {CHOICES}, got {backend!r}")
    if backend == "auto":
        for name in _AUTO_ORDER.get(device_type, ("reference",)):
            if _status(name).available:
                return name
    status = _status(backend)
    if not status.available:
        raise RuntimeError(f"backend {backend!r} is unavailable: {status.reason}")
    if not _runs_on(backend, device_type):
        raise ValueError(f"backend {backend!r} cannot run on {device_type} tensors")
    return backend


OPS = ("conv_relu_pool", "linear_relu")


class Ops(NamedTuple):
    """One op on one backend: its forward and backward, with the schemas' signatures."""

    fwd: Callable
    bwd: Callable


def _table(op: str, backend: str) -> Ops:
    if backend == "reference":
        return Ops(getattr(reference, f"{op}_fwd"), getattr(reference, f"{op}_bwd"))
    if backend == "triton":  # imported on first use: importing the kernels imports triton
        return importlib.import_module(f"fastlenet.kernels.{op}").OPS
    if backend in ("cpu", "cuda"):
        # The overloads themselves: calling the packet (torch.ops.fastlenet.<op>_fwd) resolves
        # the overload on every call, ~2 us more per call on the CI machine.
        if not _ext.LOADED:
            raise RuntimeError(_ext.LOAD_ERROR)
        packets = torch.ops.fastlenet
        return Ops(getattr(packets, f"{op}_fwd").default, getattr(packets, f"{op}_bwd").default)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


# Filled at import for every backend but Triton (whose import is deferred), so that
# torch.compile finds the entry and traces no construction of it: a first call inside a
# compiled region would otherwise break the graph.
_OPS: dict[tuple[str, str], Ops] = {
    (op, backend): _table(op, backend)
    for op in OPS
    for backend in ("reference", *(("cpu", "cuda") if _ext.LOADED else ()))
}


def traced(backend: str) -> str:
    """The backend whose forward op a torch.jit.trace records for `backend`: torch.jit.trace
    records ops, not autograd Functions, so the C++ forward op itself (cpu, cuda), whose
    autograd kernel (csrc/*_autograd_cpu.cpp) records its node with or without grad mode -- one
    graph, differentiable where it runs; the reference (stock's ops) for backends without such
    an op (Triton)."""
    return backend if backend in ("cpu", "cuda") else "reference"


def ops(op: str, backend: str) -> Ops:
    """`fwd` and `bwd` of `op` (one of OPS) on a concrete backend (see resolve())."""
    table = _OPS.get((op, backend))
    if table is None:
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
        table = _OPS[(op, backend)] = _table(op, backend)
    return table
