"""A user-defined Triton kernel as torch.compile rebuilds it on a GPU.

Natively, inductor does not launch a triton_op's kernels as they are: it writes each kernel's
source into a module of its own, after `import triton` and `import triton.language as tl`,
followed by the source of every @triton.jit helper the kernel names, under that name
(user_defined_triton_kernel_transitive_closure_source_code in torch/_inductor/codegen/wrapper.py).
A helper reached any other way, through an alias (`_dot = launch.dot`) or a module attribute
(`launch.dot_fma`), is a NameError there, and only on a GPU (seen on an H200, 2026-12-04).
Compiling these copies natively (test_kernels_compile_natively) finds it without one.
"""

import importlib.util
import tempfile
from pathlib import Path

# triton.jit reads a function's source from its file: each copy gets one here (removed at exit).
_SOURCES = tempfile.TemporaryDirectory(prefix="fastlenet-inductor-copy-")


def inductor_copy(kernel):
    """`kernel` rebuilt from the source inductor writes for it, as a JITFunction."""
    from torch._inductor.codegen.wrapper import (
        user_defined_triton_kernel_transitive_closure_source_code as closure_source,
    )

    source = "import triton\nimport triton.language as tl\n\n\n@triton.jit\n"
    source += closure_source(kernel)
    path = Path(_SOURCES.name) / f"{kernel.__name__}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"inductor_copy_{kernel.__name__}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, kernel.__name__)
