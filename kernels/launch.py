"""Launch settings of the Triton kernels, in one place, plus the pieces both kernel files share.

Nothing here touches the GPU at import. Block sizes depend only on the problem shape and on
whether Triton runs natively or through its CPU interpreter (TRITON_INTERPRET=1, read once
when this module is imported, which is also when triton decides). The split count of the
two-stage weight-gradient reduction depends on the shape and, on a GPU, on its number of
SMs, queried at the first launch on that device and cached.

Registration: natively every op is a `torch.library.triton_op` whose kernels are launched
through `torch.library.wrap_triton`, so torch.compile traces into the kernels. Under the
interpreter `wrap_triton` hands back the bare interpreted kernel, which cannot run on the
fake tensors of tracing, so there the same function is registered with
`torch.library.custom_op` and an explicit fake kernel instead (same name, same schema).
"""

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastlenet import backends

#: True when the kernels run through Triton's CPU interpreter (decided at import).
INTERPRETED = backends.triton_interpreted()

#: Environment switch for TF32 tensor-core products of float32 inputs (off by default so
#: results match stock float32; `set_allow_tf32` changes it at run time).
TF32_ENV = "FASTLENET_TRITON_TF32"
_allow_tf32 = os.environ.get(TF32_ENV, "0") == "1"

#: Fill freshly allocated outputs with NaN (uint8 outputs with 254, a window position no test
#: geometry reaches) before a kernel writes them, so a position a kernel forgets shows up in
#: the tests. The same switch as the C++ kernels' (tests/conftest.py sets it).
POISON = os.environ.get("FASTLENET_POISON", "0") == "1"
_UINT8_POISON = 254


def set_allow_tf32(enabled: bool) -> None:
    """Let float32 products use TF32 tensor cores (10-bit mantissa inputs, about 1e-3
    relative error) instead of full float32. Read when an op launches; a graph already
    compiled by torch.compile keeps the setting it was traced with."""
    global _allow_tf32
    _allow_tf32 = bool(enabled)


def dot_precision(dtype: torch.dtype) -> str:
    """`input_precision` of tl.dot: "tf32" only for float32 inputs with TF32 allowed."""
    return "tf32" if dtype == torch.float32 and _allow_tf32 else "ieee"


def dot_upcast(dtype: torch.dtype) -> bool:
    """Whether tl.dot gets its bfloat16 operands as float32. Only under the interpreter,
    whose dot multiplies bfloat16 (stored as uint16 in numpy) as raw integers; a product of
    two bfloat16 values is exact in float32, so the result is the same as the native
    bfloat16 dot with float32 accumulation."""
    return INTERPRETED and dtype == torch.bfloat16


def acc_is_fp64(dtype: torch.dtype) -> bool:
    """float64 inputs accumulate in float64 (gradcheck needs it); all others in float32."""
    return dtype == torch.float64


def new_output(shape, dtype, device) -> torch.Tensor:
    if not POISON:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = _UINT8_POISON if dtype == torch.uint8 else float("nan")
    return torch.full(shape, fill, dtype=dtype, device=device)


def check_device(*tensors) -> None:
    """Natively the kernels need CUDA tensors; the interpreter runs on CPU tensors."""
    want = "cpu" if INTERPRETED else "cuda"
    for t in tensors:
        if t is not None and t.device.type != want:
            raise ValueError(
                f"the Triton kernels {'under TRITON_INTERPRET=1 ' if INTERPRETED else ''}"
                f"need {want} tensors, got a tensor on {t.device}"
            )


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launchers: triton.cdiv and triton.next_power_of_2 are
    ConstexprFunctions (Triton 3.8), microseconds a call from Python, and a LeNet-5 training step
    made ~106 such calls."""
    return -(-a // b)


def _pow2_clamp(n: int, lo: int, hi: int) -> int:
    """The power of two >= n (at least 1), clamped to [lo, hi]."""
    return max(lo, min(hi, 1 << (max(int(n), 1) - 1).bit_length()))


# ---------------------------------------------------------------------------------------------
# Block sizes, warps and stages: the launch configuration of every GEMM-shaped kernel
#
# tl.dot needs every block dimension >= 16.
#
# Natively the rule keeps every kernel within the resource budget that tests/test_gpu_budgets.py
# checks on cubins compiled for sm_80 and sm_90 (no GPU needed): at most MAX_REGISTERS registers
# per thread and no spill to local memory in float32 (TF32 or not), float16 and bfloat16, so
# that at least 16 of an SM's 64 warps (25%) can be resident. The implicit-GEMM conv kernels
# gather their operands element by element (im2col addresses, and for the backward the argmax
# bytes and grad_out of up to WIN_H * WIN_W windows per element), so their registers grow with
# the gathered elements each thread holds per K step more than with the tile: one
# configuration for all shapes (64 x 64 x 32, 4 warps, 3 stages) took up to 255 registers and
# 1144 bytes of spills per thread in the float32 conv kernels, 8 warps per SM. The rule, per
# kernel kind (from sweeps of compiles for sm_80 and sm_90 with Triton 3.8; the resulting table
# is benchmarks/results/gpu_static.md):
#   BLOCK_K = 16 everywhere: the float32 dot runs on FMA units, where each thread holds whole
#     K-deep rows and columns of its outputs' operands; 32-deep steps took 25-60 more registers.
#   BLOCK_M, BLOCK_N: the next power of two of the rows / columns, clamped to [16, max]. The
#     gathered conv operands cap columns at 32 and grad_input's rows at 32 (each of its
#     elements gathers argmax and grad_out from up to 4 windows).
#   num_warps: 8 for the tiles whose 4-warp version took over 128 registers (the forward's of
#     64 rows, grad_input's of 32, grad_weight's of 64, dense tiles of 2048 outputs or more)
#     and for grad_weight's 32-row tiles (96-114 registers at 4 warps, 48-80 at 8); else 4.
#   num_stages: 1 for the gathered conv kernels (a second stage kept the next step's gathered
#     addresses live: 80 -> 141 registers for the forward's 64 x 16 tile), 2 for the linear
#     kernels' plain loads (104 -> 106 registers for a 64 x 64 tile).
# Under the interpreter every program and every K step costs Python overhead while numpy does
# the block math, so blocks are as large as the shape allows: a 64x400 by 400x120 product took
# 1.5 s with 16-wide blocks and 15 ms with 64-wide ones (issue 6).
# ---------------------------------------------------------------------------------------------

#: Registers per thread natively: the compile option `maxnreg` (PTX .maxnreg) of every launch.
#: Without it ptxas sometimes trades a few registers for 8-40 bytes of spills on its own, to
#: raise occupancy (seen at 64-80 registers); with it, a tile that needs more than the budget
#: spills, and the budget test fails.
MAX_REGISTERS = 128


@dataclass(frozen=True)
class _Rule:
    rows_max: int  # largest BLOCK_M
    cols_max: int  # largest BLOCK_N
    eight_warps: Callable[[int, int], bool]  # (BLOCK_M, BLOCK_N) -> use 8 warps
    num_stages: int


#: kind -> rule (see above). "dense": linear_relu's kernels; "conv_fwd", "conv_bwd_input" and
#: "conv_bwd_weight": conv_relu_pool's (rows, cols, depth as their launchers pass them).
_RULES = {
    "dense": _Rule(64, 64, lambda m, n: m * n >= 2048, 2),
    "conv_fwd": _Rule(64, 32, lambda m, n: m >= 64, 1),
    "conv_bwd_input": _Rule(32, 32, lambda m, n: m >= 32, 1),
    "conv_bwd_weight": _Rule(64, 32, lambda m, n: m >= 32, 1),
}
_INTERP = {"rows": 64, "cols_max": 64, "k_max": 64, "num_warps": 4}


def gemm_blocks(rows: int, cols: int, depth: int, kind: str = "dense") -> dict:
    """Block sizes and warps of a (rows x depth) @ (depth x cols) tile loop: BLOCK_M, BLOCK_N,
    BLOCK_K and num_warps (see the rule above; `kind` names the kernel's row of it)."""
    if INTERPRETED:
        cfg = _INTERP
        return {
            "BLOCK_M": _pow2_clamp(rows, 16, cfg["rows"]),
            "BLOCK_N": _pow2_clamp(cols, 16, cfg["cols_max"]),
            "BLOCK_K": _pow2_clamp(depth, 16, cfg["k_max"]),
            "num_warps": cfg["num_warps"],
        }
    rule = _RULES[kind]
    m = _pow2_clamp(rows, 16, rule.rows_max)
    n = _pow2_clamp(cols, 16, rule.cols_max)
    return {
        "BLOCK_M": m,
        "BLOCK_N": n,
        "BLOCK_K": 16,
        "num_warps": 8 if rule.eight_warps(m, n) else 4,
    }


def compile_options(kind: str = "dense") -> dict:
    """The launch's compile options besides num_warps: num_stages and maxnreg (natively)."""
    if INTERPRETED:
        return {}
    return {"num_stages": _RULES[kind].num_stages, "maxnreg": MAX_REGISTERS}


# Split count of the first stage of a weight-gradient reduction over `length` rows.
# Natively: enough programs for about two waves over the SMs, but every split keeps at least
# _MIN_SPLIT_BLOCKS row blocks so the second stage stays negligible. Under the interpreter at
# most _INTERP_SPLITS, small enough to stay fast and large enough that the small test shapes
# run the multi-split path.
_MIN_SPLIT_BLOCKS = 4
_MAX_SPLITS = 256
_INTERP_SPLITS = 3


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_counts.setdefault(
        index, torch.cuda.get_device_properties(index).multi_processor_count
    )


_sm_counts: dict[int, int] = {}


def num_splits(length: int, block_rows: int, tiles: int, device: torch.device) -> int:
    """How many row chunks the first reduction stage uses (a function of shape and device
    only, so results are bitwise reproducible). `tiles`: output tiles per split."""
    blocks = cdiv(max(length, 1), block_rows)
    if INTERPRETED:
        return min(blocks, _INTERP_SPLITS)
    wanted = cdiv(2 * _sm_count(device), max(tiles, 1))
    return max(1, min(wanted, cdiv(blocks, _MIN_SPLIT_BLOCKS), _MAX_SPLITS))


def split_chunk(length: int, splits: int, block_rows: int) -> tuple[int, int]:
    """(rows per split, a multiple of block_rows; the split count actually needed)."""
    chunk = cdiv(cdiv(max(length, 1), splits), block_rows) * block_rows
    return chunk, cdiv(max(length, 1), chunk)


@triton.jit
def dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b (see dot_precision and dot_upcast). out_dtype names the accumulator's type:
    Triton 3.6 takes float32 when it is not given and rejects a float64 accumulator."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)


@triton.jit
def dot_fma(a, b, acc):
    """acc + a @ b on the FMA units, for the float64 products Triton's MMA lowering rejects
    (see conv_relu_pool's weight gradient); the (M, K, N) temporary asks for small blocks."""
    return acc + tl.sum(a[:, :, None] * b[None, :, :], axis=1)


# float64 blocks of a dot_fma product natively: a 16 x 8 x 16 temporary is 16 float64 values
# per thread at 4 warps. Under the interpreter the usual (large) blocks are used.
FMA_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 8}


def dot_fma_needed(dtype: torch.dtype) -> bool:
    """float64 operands take dot_fma where a kernel asks for it. Triton 3.8 fails to lower a
    float64 tl.dot whose operand is gathered as in conv_relu_pool's weight gradient, and its
    input gradient with windows that do not overlap (pool <= pool stride, LeNet-5's) ("fp64
    don't support largeK MMA", found compiling for sm_80 and sm_90 without a GPU). The
    interpreter runs the same path, so the tests cover it."""
    return dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# Second stage of the deterministic reductions: out[j] = sum over s (in order) of part[s, j].
# ---------------------------------------------------------------------------------------------
@triton.jit
def _sum_splits_kernel(
    part_ptr,  # (S, L) partial sums, accumulation dtype, contiguous
    out_ptr,  # (L,) result, output dtype
    S,  # number of splits
    L,  # number of sums
    BLOCK: tl.constexpr,  # sums per program
):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < L
    total = tl.load(part_ptr + cols, mask=mask, other=0.0)
    for s in range(1, S):
        total += tl.load(part_ptr + s * L + cols, mask=mask, other=0.0)
    tl.store(out_ptr + cols, total.to(out_ptr.dtype.element_ty), mask=mask)


# 1024 sums per program: a whole LeNet weight gradient (at most 48k values) in a few dozen
# programs natively, and few Python-level programs under the interpreter.
_SUM_BLOCK = 1024


def sum_splits(part: torch.Tensor, out: torch.Tensor) -> None:
    """out.view(-1)[j] = part[:, j].sum() in a fixed order (part: (S, out.numel()))."""
    length = out.numel()
    if length == 0:
        return
    grid = (cdiv(length, _SUM_BLOCK),)
    torch.library.wrap_triton(_sum_splits_kernel)[grid](
        part, out, part.shape[0], length, **sum_splits_config()
    )


def sum_splits_config() -> dict:
    """Constexprs and compile options of _sum_splits_kernel's launch."""
    return {"BLOCK": _SUM_BLOCK, "num_warps": 4, **compile_options("dense")}


def register(name: str, fake):
    """Decorator registering a launcher as `fastlenet::<name>` (see the module docstring)."""

    def wrap(fn):
        qualname = f"fastlenet::{name}"
        if not INTERPRETED:
            return torch.library.triton_op(qualname, fn, mutates_args=())
        op = torch.library.custom_op(qualname, fn, mutates_args=())
        op.register_fake(fake)
        return op

    return wrap


def compile_native(
    kernel, pointers: dict, constexprs: dict, arch: int, options: dict | None = None
):
    """Compiles `kernel` for sm_<arch> without a GPU (TRITON_INTERPRET unset): pointer arguments
    typed by `pointers` (name -> "*fp32", ...), scalars as i32, constexprs given, compile
    `options` (num_warps, num_stages, maxnreg) as a launch passes them. Returns triton's
    CompiledKernel (its asm["cubin"], and metadata.shared: dynamic shared memory in bytes)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature = {
        name: "constexpr" if name in constexprs else pointers.get(name, "i32") for name in names
    }
    source = ASTSource(
        fn=kernel,
        signature=signature,
        constexprs={(names.index(k),): v for k, v in constexprs.items()},
    )
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options or {})


def compile_natively(kernel, pointers: dict, constexprs: dict, arch: int, num_warps: int = 4):
    """The cubin of compile_native with `num_warps` (a machine without a GPU can check that
    every kernel lowers natively)."""
    return compile_native(kernel, pointers, constexprs, arch, {"num_warps": num_warps}).asm["cubin"]
