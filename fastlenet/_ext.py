"""Loads the compiled extension `fastlenet._C`, remembering why when it cannot.

Importing `_C` registers the `fastlenet::*` operators (schemas in csrc/fastlenet.cpp)
with their CPU and, when built, CUDA kernels.
"""

try:
    from fastlenet import _C
except ImportError as exc:  # a source tree that was never built
    _C = None
    LOAD_ERROR: str | None = (
        f"the C++ extension fastlenet._C is not built ({exc}); "
        "build it with `make build` (or `pip install --no-build-isolation -e .`)"
    )
else:
    LOAD_ERROR = None

LOADED = _C is not None


def cuda_built() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return LOADED and bool(_C.cuda_built())
