"""What a compiler says about every fastlenet GPU kernel, without a GPU: registers and stack per
thread, shared memory and threads per block, and the warps per SM their launches leave room
for, on sm_80 and sm_90.

  python benchmarks/gpu_static.py [--save]   the table (--save: benchmarks/results/gpu_static.md)

- Triton: the launch configuration each launcher uses (kernels.<op>.launch_plan) at the model
  shapes and over the shape envelope, compiled natively for each arch and dtype (in a process
  without TRITON_INTERPRET, as tests/test_*_triton.py's native compile does); registers and
  stack from `cuobjdump -res-usage` of the cubin, dynamic shared memory from Triton's
  metadata. Each distinct configuration (blocks, warps, stages and the geometry constexprs:
  kernel and pool sizes) is compiled once; Triton's cache (~/.triton/cache) keeps the cubins.
- CUDA: the cubins in the extension's fatbinary (fastlenet/_C*.so), and the launches its
  launchers make for each shape (fastlenet_cuda_*_launches, csrc/cuda_launchers.h, called
  through ctypes: no GPU needed).

Warps per SM: the blocks of the launch that fit in one SM by threads, registers (allocated per
warp in units of 256, on 4 sub-partitions of 16384), shared memory (static + dynamic + the
1 KiB the driver reserves per block, with the largest carveout: 164 KiB on sm_80, 228 KiB on
sm_90) and the 32-block limit, times the warps per block (CUDA occupancy calculator rules).
tests/test_gpu_budgets.py checks the budgets on the same rows.
"""

import argparse
import ctypes
import glob
import importlib.util
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "gpu_static.md"
ARCHS = (80, 90)
# dtype modes: name -> (torch dtype name, TF32 on)
DTYPES = {
    "float32": ("float32", False),
    "tf32": ("float32", True),
    "float16": ("float16", False),
    "bfloat16": ("bfloat16", False),
    "float64": ("float64", False),
}
#: Budgets (the issue's): every dtype but float64 without spills; at most MAX_REGISTERS
#: registers per thread; at least MIN_WARPS warps resident per SM; whole warps per block.
NO_SPILL_DTYPES = ("float32", "tf32", "float16", "bfloat16")
MAX_REGISTERS = 128
MIN_WARPS = 4

# (N, C, H, W, O, K, padding, pool, pool_stride); stride 1.
MODEL_CONV = {
    "lenet5.conv1": (64, 1, 32, 32, 6, 5, 0, 2, 2),
    "lenet5.conv2": (64, 6, 14, 14, 16, 5, 0, 2, 2),
    "fashion.conv1": (64, 1, 28, 28, 16, 5, 2, 2, 2),
    "fashion.conv2": (64, 16, 14, 14, 32, 5, 2, 2, 2),
}
# (rows, in_features, out_features)
MODEL_LINEAR = {
    "lenet5.fc1": (64, 400, 120),
    "lenet5.fc2": (64, 120, 84),
    "lenet5.fc3": (64, 84, 10),
    "fashion.fc": (64, 1568, 10),
}
# The any-shape envelope: C_in 1-128, C_out 6-128, kernel 3x3 and 5x5, stride 1, padding 0 to
# k // 2, input 8x8 to 32x32, pool 2 (stride 2), 3 (stride 2) or 1, and batches from 1 sample
# (the launch rules depend on the batch through the row count).
ENVELOPE = {
    "batch": (1, 2, 64, 256),
    "c_in": (1, 3, 6, 16, 32, 64, 128),
    "c_out": (6, 16, 32, 64, 128),
    "kernel": (3, 5),
    "size": (8, 12, 16, 28, 32),
    "pool": ((1, 1), (2, 2), (3, 2)),
}
# The linear layers' envelope: the models' layers at these batches.
LINEAR_BATCHES = (1, 64, 256)


def conv_shapes():
    """{name: shape}: the model layers, then the envelope (named env.<fields>)."""
    shapes = dict(MODEL_CONV)
    e = ENVELOPE
    for n, c, o, k, size, (pool, ps) in itertools.product(
        e["batch"], e["c_in"], e["c_out"], e["kernel"], e["size"], e["pool"]
    ):
        for pad in sorted({0, k // 2}):
            conv = size + 2 * pad - k + 1
            if conv < pool:
                continue
            shapes[f"env.n{n}c{c}o{o}k{k}s{size}p{pad}pool{pool}"] = (
                n, c, size, size, o, k, pad, pool, ps,
            )  # fmt: skip
    return shapes


def linear_shapes():
    shapes = dict(MODEL_LINEAR)
    for name, (_, k, n) in MODEL_LINEAR.items():
        for b in LINEAR_BATCHES:
            shapes[f"env.{name}.b{b}"] = (b, k, n)
    return shapes


def is_model(shape_name: str) -> bool:
    return not shape_name.startswith("env.")


@dataclass
class Row:
    """One kernel launch configuration on one arch and dtype."""

    backend: str  # "triton" or "cuda"
    op: str  # conv_relu_pool / linear_relu
    kernel: str  # Triton: the launcher's name of the kernel; CUDA: the template
    arch: int
    dtype: str  # a DTYPES key
    config: str  # launch configuration: Triton blocks, warps, stages; CUDA threads
    geometry: str  # Triton: the geometry constexprs; CUDA: the dynamic shared memory
    shapes: list  # the shape names that launch it
    regs: int
    stack: int  # bytes per thread of stack frame + local memory (spills)
    smem: int  # static + dynamic shared memory per block, bytes (without the reserved 1 KiB)
    threads: int  # per block
    warps_per_sm: int
    limit: str  # what limits warps_per_sm
    error: str = ""  # the compile error, when the configuration does not compile

    @property
    def label(self):
        """The model layers that launch it, or "envelope"."""
        models = sorted({s for s in self.shapes if is_model(s)})
        return ", ".join(models) if models else "envelope"


# ---------------------------------------------------------------------------------------------
# Occupancy
# ---------------------------------------------------------------------------------------------
_SM = {
    80: {"smem": 164 * 1024},
    90: {"smem": 228 * 1024},
}
_RESERVED_SMEM = 1024  # per block, on sm_80 and later
_MAX_WARPS, _MAX_BLOCKS, _SUBPARTITION_REGS = 64, 32, 16384


def warps_per_sm(arch: int, threads: int, regs: int, smem: int) -> tuple[int, str]:
    """Resident warps per SM of blocks of `threads` threads, `regs` registers per thread and
    `smem` bytes of shared memory per block, and the resource that limits them."""
    warps = -(-threads // 32)
    limits = {"threads": _MAX_WARPS // warps, "blocks": _MAX_BLOCKS}
    reg_warp = -(-max(regs, 1) * 32 // 256) * 256
    limits["registers"] = (_SUBPARTITION_REGS // reg_warp) * 4 // warps
    per_block = -(-(smem + _RESERVED_SMEM) // 128) * 128
    limits["shared memory"] = _SM[arch]["smem"] // per_block
    limit = min(limits, key=limits.get)
    return limits[limit] * warps, limit


# ---------------------------------------------------------------------------------------------
# cubins
# ---------------------------------------------------------------------------------------------
def cuobjdump() -> str | None:
    """The toolkit's cuobjdump, the one on PATH, or the one Triton ships."""
    roots = [os.environ.get("CUDA_HOME"), "/usr/local/cuda", *glob.glob("/usr/local/cuda-*")]
    candidates = [Path(r) / "bin" / "cuobjdump" for r in roots if r]
    candidates.append(shutil.which("cuobjdump"))
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin is not None:
        candidates.append(Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return str(c)
    return None


_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def resource_usage(tool: str, path: str) -> dict[int, dict[str, dict]]:
    """{arch: {function: {regs, stack, smem}}} of every cubin in a cubin or fatbinary file;
    stack counts the stack frame and local memory, smem the static shared memory without the
    1 KiB that sm_90 cubins include for the driver's reservation."""
    text = subprocess.run(
        [tool, "-res-usage", path], capture_output=True, text=True, check=True
    ).stdout
    found: dict[int, dict[str, dict]] = {}
    arch, function = None, None
    for line in text.splitlines():
        if m := re.match(r"\s*arch = sm_(\d+)", line):
            arch = int(m.group(1))
        elif m := re.match(r"\s*Function (\S+):", line):
            function = m.group(1)
        elif (m := _RES.search(line)) and function is not None:
            reg, stack, shared, local = map(int, m.groups())
            if arch is None:  # a lone cubin: the caller knows its arch
                arch = 0
            reserved = _RESERVED_SMEM if arch >= 90 else 0
            found.setdefault(arch, {})[function] = {
                "regs": reg,
                "stack": stack + local,
                "smem": max(shared - reserved, 0),
            }
    return found


# ---------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------
# Constexprs that are geometry (kernel and pool sizes, bias, ReLU), not launch configuration.
_GEOMETRY = ("KH", "KW", "POOL_H", "POOL_W", "WIN_H", "WIN_W", "HAS_BIAS", "RELU")
_OPTIONS = ("num_warps", "num_stages", "maxnreg")


def _config_words(config: dict) -> tuple[str, str]:
    """(launch configuration, geometry) of a Triton launch, in words."""
    if "BLOCK" in config:
        blocks = str(config["BLOCK"])
    else:
        blocks = "x".join(str(config[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    words = f"{blocks} w{config['num_warps']} s{config.get('num_stages', '-')}"
    geometry = " ".join(f"{k}={int(config[k])}" for k in _GEOMETRY if k in config)
    return words, geometry


def _pointer_types(kernel, dtype) -> dict:
    """Pointer argument types: data in the kernel's dtype, argmax uint8, partial sums in the
    accumulation dtype."""
    data = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16", "float64": "*fp64"}
    acc = "*fp64" if dtype == "float64" else "*fp32"
    types = {}
    for name in kernel.arg_names:
        if not name.endswith("_ptr"):
            continue
        if name == "argmax_ptr":
            types[name] = "*u8"
        elif name.startswith("part"):
            types[name] = acc
        else:
            types[name] = data[dtype]
    return types


def _triton_plans(dtypes):
    """{(op, kernel name, dtype mode, config items): (kernel, config, [shape names])} over
    every shape, with the configurations the launchers use natively."""
    import torch

    from fastlenet.kernels import conv_relu_pool, launch, linear_relu

    jobs: dict[tuple, tuple] = {}
    for mode in dtypes:
        dtype_name, tf32 = DTYPES[mode]
        dtype = getattr(torch, dtype_name)
        launch.set_allow_tf32(tf32)
        plans = []
        for name, (n, c, h, w, o, k, pad, pool, ps) in conv_shapes().items():
            plan = conv_relu_pool.launch_plan(
                (n, c, h, w), (o, c, k, k), (1, 1), (pad, pad), (pool, pool), (ps, ps), dtype
            )
            plans.append(("conv_relu_pool", name, plan))
        for name, (m, k, n) in linear_shapes().items():
            plans.append(("linear_relu", name, linear_relu.launch_plan(m, k, n, dtype)))
        for op, name, plan in plans:
            for kernel_name, kernel, config in plan:
                key = (op, kernel_name, mode, tuple(sorted(config.items())))
                jobs.setdefault(key, (kernel, config, []))[2].append(name)
        launch.set_allow_tf32(False)
    return jobs


def _triton_worker(archs: list[int], dtypes: list[str]) -> None:
    """Runs natively (no TRITON_INTERPRET): prints one JSON row per configuration and arch."""
    from fastlenet.kernels import launch

    assert not launch.INTERPRETED
    tool = cuobjdump()
    for (op, kernel_name, mode, _), (kernel, config, shapes) in _triton_plans(dtypes).items():
        constexprs = {k: v for k, v in config.items() if k not in _OPTIONS}
        options = {k: v for k, v in config.items() if k in _OPTIONS}
        threads = 32 * config["num_warps"]
        words, geometry = _config_words(config)
        for arch in archs:
            row = Row("triton", op, kernel_name, arch, mode, words, geometry, shapes, 0, 0, 0,
                      threads, 0, "")  # fmt: skip
            try:
                compiled = launch.compile_native(
                    kernel, _pointer_types(kernel, DTYPES[mode][0]), constexprs, arch, options
                )
            except Exception as e:  # reported as the row's budget failure
                row.error = str(e).strip().splitlines()[-1][:200]
                print(json.dumps(asdict(row)), flush=True)
                continue
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(compiled.asm["cubin"])
                f.flush()
                (res,) = resource_usage(tool, f.name)[0].values()
            row.regs, row.stack = res["regs"], res["stack"]
            # sm_90 cubins count the reserved 1 KiB; resource_usage took it off for arch 90 only,
            # and a lone cubin reads as arch 0.
            row.smem = max(res["smem"] - (_RESERVED_SMEM if arch >= 90 else 0), 0)
            row.smem += compiled.metadata.shared
            row.warps_per_sm, row.limit = warps_per_sm(arch, threads, row.regs, row.smem)
            print(json.dumps(asdict(row)), flush=True)


def triton_rows(archs=ARCHS, dtypes=tuple(DTYPES)) -> list[Row]:
    """The Triton rows, compiled in one process per arch (run in parallel) without
    TRITON_INTERPRET. Triton's own cache (~/.triton/cache) makes a second run fast."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--triton-worker", str(arch), ",".join(dtypes)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for arch in archs
    ]
    rows = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"Triton compile worker failed:\n{err[-4000:]}")
        rows += [Row(**json.loads(line)) for line in out.splitlines() if line.startswith("{")]
    return rows


# ---------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------
_CTYPES = {
    "float": "float32",
    "double": "float64",
    "__half": "float16",
    "__nv_bfloat16": "bfloat16",
}
_DTYPE_ENUM = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 3}  # cuda::DType


def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if tool is None:
        raise RuntimeError("c++filt (binutils) is needed to read the CUDA kernels' names")
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    return out.stdout.splitlines()


def cuda_kernels(tool: str, library: str) -> dict[tuple[int, str, str], dict]:
    """{(arch, dtype, template with T): resources} of the extension's kernels."""
    usage = resource_usage(tool, library)
    kernels = {}
    for arch, functions in usage.items():
        mangled = list(functions)
        for name, demangled in zip(mangled, _demangle(mangled), strict=True):
            m = re.match(r"void fastlenet::cuda::(\w+)<([^,>]+)(.*?>)\(", demangled)
            if m is None:
                continue
            base, ctype, rest = m.groups()
            kernels[(arch, _CTYPES[ctype], f"{base}<T{rest}")] = functions[name]
    return kernels


class CudaLaunches:
    """The launches of the extension's launchers for a shape (ctypes, csrc/cuda_launchers.h)."""

    def __init__(self, library: str):
        lib = ctypes.CDLL(library)
        self._conv = lib.fastlenet_cuda_conv_relu_pool_launches
        self._conv.restype = ctypes.c_int64
        self._conv.argtypes = [
            ctypes.c_int, ctypes.POINTER(ctypes.c_int64), ctypes.c_char_p, ctypes.c_int64
        ]  # fmt: skip
        self._linear = lib.fastlenet_cuda_linear_relu_launches
        self._linear.restype = ctypes.c_int64
        self._linear.argtypes = [
            ctypes.c_int,
            *[ctypes.c_int64] * 3,
            ctypes.c_char_p,
            ctypes.c_int64,
        ]
        self._buf = ctypes.create_string_buffer(4096)

    def _parse(self, length: int) -> list[tuple[str, int, int]]:
        if length < 0:
            raise RuntimeError("launch list longer than the buffer")
        rows = []
        for line in self._buf.value.decode().splitlines():
            kernel, threads, smem = line.split("|")
            rows.append((kernel, int(threads), int(smem)))
        return rows

    def conv(self, dtype: str, shape) -> list[tuple[str, int, int]]:
        from fastlenet import _checks

        n, c, h, w, o, k, pad, pool, ps = shape
        (oh, ow), (ph, pw) = _checks.conv_pool_shapes(
            (h, w), (k, k), (1, 1), (pad, pad), (pool, pool), (ps, ps)
        )
        geom = (n, c, h, w, o, k, k, 1, 1, pad, pad, oh, ow, pool, pool, ps, ps, ph, pw)
        g = (ctypes.c_int64 * 19)(*geom)
        return self._parse(self._conv(_DTYPE_ENUM[dtype], g, self._buf, len(self._buf)))

    def linear(self, dtype: str, shape) -> list[tuple[str, int, int]]:
        m, k, n = shape
        length = self._linear(_DTYPE_ENUM[dtype], m, k, n, self._buf, len(self._buf))
        return self._parse(length)


def cuda_rows(archs=ARCHS) -> list[Row]:
    """One row per (kernel, arch, dtype, threads, dynamic shared memory) over every shape."""
    from fastlenet import _ext

    tool = cuobjdump()
    if tool is None or not _ext.cuda_built():
        return []
    library = _ext._C.__file__
    kernels = cuda_kernels(tool, library)
    launches = CudaLaunches(library)
    rows: dict[tuple, Row] = {}
    for dtype in ("float32", "float16", "bfloat16", "float64"):
        todo = [("conv_relu_pool", n, launches.conv(dtype, s)) for n, s in conv_shapes().items()]
        todo += [("linear_relu", n, launches.linear(dtype, s)) for n, s in linear_shapes().items()]
        for op, name, plan in todo:
            for template, threads, dyn in plan:
                for arch in archs:
                    key = (op, template, arch, dtype, threads, dyn)
                    if key not in rows:
                        res = kernels[(arch, dtype, template)]
                        smem = res["smem"] + dyn
                        warps, limit = warps_per_sm(arch, threads, res["regs"], smem)
                        rows[key] = Row(
                            "cuda", op, template, arch, dtype, f"{threads} threads",
                            f"{dyn} B dynamic", [], res["regs"], res["stack"], smem, threads,
                            warps, limit,
                        )  # fmt: skip
                    rows[key].shapes.append(name)
    return list(rows.values())


# ---------------------------------------------------------------------------------------------
# Budgets and the table
# ---------------------------------------------------------------------------------------------
def violations(row: Row) -> list[str]:
    """The budgets a row breaks (empty when it keeps them all)."""
    if row.error:
        return [f"does not compile: {row.error}"]
    broken = []
    if row.dtype in NO_SPILL_DTYPES and row.stack > 0:
        broken.append(f"{row.stack} bytes of stack/local memory")
    if row.regs > MAX_REGISTERS:
        broken.append(f"{row.regs} registers")
    if row.threads % 32:
        broken.append(f"{row.threads} threads: not whole warps")
    if row.warps_per_sm < MIN_WARPS:
        broken.append(f"{row.warps_per_sm} warps per SM")
    return broken


def _cell(rows: list[Row]) -> str:
    """registers / stack B / shared memory KiB / warps per SM; the worst of several rows."""
    if any(r.error for r in rows):
        return "compile error"
    smem = max(r.smem for r in rows) / 1024
    return (
        f"{max(r.regs for r in rows)} / {max(r.stack for r in rows)} / {smem:.1f} / "
        f"{min(r.warps_per_sm for r in rows)}"
    )


def table(rows: list[Row], arch: int) -> str:
    """One line per kernel, launch configuration and model layers that use it (the envelope's
    other shapes: one line per kernel and launch configuration, the worst of its geometries and
    shared-memory sizes), one column per dtype."""
    dtypes = [d for d in DTYPES if any(r.dtype == d for r in rows)]
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        if r.arch == arch:
            key = (r.backend, r.op, r.kernel, r.config, r.label, r.threads)
            groups.setdefault(key, []).append(r)
    lines = [
        "| backend | op | kernel | launch | shapes | threads | " + " | ".join(dtypes) + " |",
        "|" + "---|" * (6 + len(dtypes)),
    ]
    for key in sorted(groups, key=lambda k: (*k[:3], k[4] == "envelope", k[4], k[3])):
        backend, op, kernel, config, label, threads = key
        cells = []
        for d in dtypes:
            sel = [r for r in groups[key] if r.dtype == d]
            cells.append(_cell(sel) if sel else "")
        kernel = kernel.replace("<", "&lt;")
        lines.append(
            f"| {backend} | {op} | {kernel} | {config} | {label} | {threads} | "
            + " | ".join(cells) + " |"
        )  # fmt: skip
    return "\n".join(lines)


def summary(rows: list[Row]) -> str:
    """Per backend, arch and dtype: the most registers and stack, the fewest warps per SM."""
    lines = [
        "| backend | arch | dtype | configurations | max regs | max stack B | min warps/SM "
        "| budgets |",
        "|" + "---|" * 8,
    ]
    keys = sorted({(r.backend, r.arch, r.dtype) for r in rows}, key=str)
    for backend, arch, dtype in keys:
        sel = [r for r in rows if (r.backend, r.arch, r.dtype) == (backend, arch, dtype)]
        ok = [r for r in sel if not r.error]
        broken = sum(bool(violations(r)) for r in sel)
        lines.append(
            f"| {backend} | sm_{arch} | {dtype} | {len(sel)} | {max(r.regs for r in ok)} "
            f"| {max(r.stack for r in ok)} | {min(r.warps_per_sm for r in ok)} "
            f"| {'kept' if not broken else f'{broken} broken'} |"
        )
    return "\n".join(lines)


def report(rows: list[Row]) -> str:
    legend = (
        "Cells: registers per thread / stack (spills) bytes per thread / shared memory KiB per "
        "block / resident warps per SM (of 64)."
    )
    parts = [summary(rows), legend]
    for arch in ARCHS:
        parts += [f"### sm_{arch}", table(rows, arch)]
    return "\n\n".join(parts) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--save", action="store_true", help=f"write {RESULTS.relative_to(ROOT)}")
    parser.add_argument("--triton-worker", nargs=2, metavar=("ARCH", "DTYPES"), help="internal")
    args = parser.parse_args(argv)
    if args.triton_worker:
        arch, dtypes = args.triton_worker
        _triton_worker([int(arch)], dtypes.split(","))
        return 0
    if cuobjdump() is None:
        print("gpu_static: no cuobjdump (CUDA toolkit or triton's bundled copy): nothing to read")
        return 0
    rows = cuda_rows()
    if importlib.util.find_spec("triton") is not None:
        rows += triton_rows()
    text = report(rows)
    print(text)
    for r in rows:
        if violations(r):
            print(f"budget broken: {r.backend} {r.kernel} {r.config} ({r.geometry}) sm_{r.arch} "
                  f"{r.dtype}: {'; '.join(violations(r))}")  # fmt: skip
    if args.save:
        write_results(text)
    return 0


def write_results(text: str) -> None:
    """Replaces the generated part of RESULTS (after its marker line), keeping the notes above."""
    marker = "<!-- generated by benchmarks/gpu_static.py --save -->"
    head = RESULTS.read_text().split(marker)[0] if RESULTS.exists() else "# GPU kernels\n\n"
    RESULTS.write_text(f"{head}{marker}\n\n{text}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
