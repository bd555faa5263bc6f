# linear -> ReLU (or plain linear) in Triton, forward and backward.
# Math and saved state: fastlenet/reference.py (linear_relu).
# Computes: out (M, N); grad_input, grad_weight and grad_bias.
# Saves for backward (the caller does): input, weight and out (the ReLU mask).
#
# Layouts (contiguous, row-major): input x (M, K); weight w (N, K) as in nn.Linear; bias b (N,);
# out (M, N).
#
# Forward, one program per (BLOCK_M rows) x (BLOCK_N features) tile, tl.dot over K blocks; bias
#   and ReLU (when RELU) in the epilogue.
# Backward, with the reference's masked gradient g formed inside the operand loads (not stored):
#   grad_input (M, K): one program per output tile, reduction over N.
#   grad_weight (N, K) and grad_bias (N,): deterministic two-stage reduction over the rows M:
#     each of S splits writes partial (N, K) and (N,) sums in the accumulation dtype, a second
#     kernel adds the splits in order. No atomics.
# Dtypes: float16/bfloat16 operands with float32 accumulation; float32 (TF32 off unless
# launch.set_allow_tf32(True)); float64 accumulates in float64.
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fastlenet import backends
from fastlenet import linear_relu as op_module
from fastlenet.kernels import launch

# The kernels call these helpers by their own names: torch.compile copies a user kernel's
# source with the source of each helper it names, under that name (tests/inductor_copy.py).
from fastlenet.kernels.launch import dot


@triton.jit
def _fwd_kernel(
    x_ptr,  # (M, K) input
    w_ptr,  # (N, K) weight
    b_ptr,  # (N,) bias (unused when not HAS_BIAS)
    out_ptr,  # (M, N) output
    M,
    N,
    K,
    HAS_BIAS: tl.constexpr,
    RELU: tl.constexpr,
    ACC_FP64: tl.constexpr,  # accumulate in float64 (float64 inputs)
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32"
    DOT_UPCAST: tl.constexpr,  # bfloat16 operands as float32 (interpreter only)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), acc_dtype)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(
            x_ptr + rows.to(tl.int64)[:, None] * K + ks[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            w_ptr + cols[None, :] * K + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0
        )
        acc = dot(a, b, acc, DOT_PRECISION, DOT_UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(acc_dtype)[None, :]
    if RELU:
        acc = tl.where(acc <= 0, 0.0, acc)  # NaN stays NaN, as in torch.relu
    tl.store(
        out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


@triton.jit
def _bwd_input_kernel(
    g_ptr,  # (M, N) grad_out
    out_ptr,  # (M, N) forward output (the ReLU mask)
    w_ptr,  # (N, K) weight
    gx_ptr,  # (M, K) grad_input
    M,
    N,
    K,
    RELU: tl.constexpr,
    ACC_FP64: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows m per program
    BLOCK_N: tl.constexpr,  # input features k per program
    BLOCK_K: tl.constexpr,  # output features n per reduction step
):
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < K
    acc = tl.zeros((BLOCK_M, BLOCK_N), acc_dtype)
    for n0 in range(0, N, BLOCK_K):
        ns = n0 + tl.arange(0, BLOCK_K)
        n_ok = ns < N
        off = rows.to(tl.int64)[:, None] * N + ns[None, :]
        mask = row_ok[:, None] & n_ok[None, :]
        g = tl.load(g_ptr + off, mask=mask, other=0.0).to(acc_dtype)
        if RELU:
            y = tl.load(out_ptr + off, mask=mask, other=0.0).to(acc_dtype)
            g = tl.where(y <= 0, 0.0, g)  # a NaN out passes gradient, as in stock
        b = tl.load(
            w_ptr + ns[:, None] * K + cols[None, :], mask=n_ok[:, None] & col_ok[None, :], other=0.0
        )
        acc = dot(g.to(w_ptr.dtype.element_ty), b, acc, DOT_PRECISION, DOT_UPCAST)
    tl.store(
        gx_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :],
        acc.to(gx_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


@triton.jit
def _bwd_weight_kernel(
    g_ptr,  # (M, N) grad_out
    out_ptr,  # (M, N) forward output (the ReLU mask)
    x_ptr,  # (M, K) input
    part_w_ptr,  # (S, N, K) partial grad_weight, accumulation dtype
    part_b_ptr,  # (S, N) partial grad_bias, accumulation dtype
    M,
    N,
    K,
    CHUNK,  # rows m per split, a multiple of BLOCK_K
    RELU: tl.constexpr,
    ACC_FP64: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,  # output features n per program
    BLOCK_N: tl.constexpr,  # input features k per program
    BLOCK_K: tl.constexpr,  # rows m per reduction step
):
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    feats = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    feat_ok = feats < N
    col_ok = cols < K
    acc = tl.zeros((BLOCK_M, BLOCK_N), acc_dtype)
    bias_acc = tl.zeros((BLOCK_M,), acc_dtype)
    start = split * CHUNK
    for m0 in range(start, start + CHUNK, BLOCK_K):
        ms = m0 + tl.arange(0, BLOCK_K)
        m_ok = ms < M
        # operand A = g.T (n, m)
        off = ms.to(tl.int64)[None, :] * N + feats[:, None]
        mask = feat_ok[:, None] & m_ok[None, :]
        g = tl.load(g_ptr + off, mask=mask, other=0.0).to(acc_dtype)
        if RELU:
            y = tl.load(out_ptr + off, mask=mask, other=0.0).to(acc_dtype)
            g = tl.where(y <= 0, 0.0, g)  # a NaN out passes gradient, as in stock
        bias_acc += tl.sum(g, axis=1)
        g = g.to(x_ptr.dtype.element_ty)
        b = tl.load(
            x_ptr + ms.to(tl.int64)[:, None] * K + cols[None, :],
            mask=m_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        acc = dot(g, b, acc, DOT_PRECISION, DOT_UPCAST)
    part_off = (split * N + feats[:, None]).to(tl.int64) * K + cols[None, :]
    tl.store(part_w_ptr + part_off, acc, mask=feat_ok[:, None] & col_ok[None, :])
    if tl.program_id(1) == 0:
        tl.store(part_b_ptr + split * N + feats, bias_acc, mask=feat_ok)


# ---------------------------------------------------------------------------------------------
# Launchers: tensors in, tensors out, registered as fastlenet::triton_linear_relu_<pass>.
# ---------------------------------------------------------------------------------------------
def _config(rows, cols, depth, dtype, relu):
    """Constexprs, num_warps and compile options of one launch (a rows x cols tile loop over
    depth): the launchers pass exactly these, and tests/test_gpu_budgets.py compiles them."""
    return {
        "RELU": relu,
        "ACC_FP64": launch.acc_is_fp64(dtype),
        "DOT_PRECISION": launch.dot_precision(dtype),
        "DOT_UPCAST": launch.dot_upcast(dtype),
        **launch.gemm_blocks(rows, cols, depth),
        **launch.compile_options(),
    }


def launch_plan(rows, in_features, out_features, dtype, has_bias=True, relu=True):
    """[(name, kernel, config)] of the launches of a forward and a full backward at this shape:
    config as the launchers pass it (constexprs, num_warps, compile options)."""
    m, k, n = rows, in_features, out_features
    return [
        ("fwd", _fwd_kernel, {**_config(m, n, k, dtype, relu), "HAS_BIAS": has_bias}),
        ("bwd_input", _bwd_input_kernel, _config(m, k, n, dtype, relu)),
        ("bwd_weight", _bwd_weight_kernel, _config(n, k, m, dtype, relu)),
        ("sum_splits", launch._sum_splits_kernel, launch.sum_splits_config()),
    ]


@launch.register("triton_linear_relu_fwd", op_module.fwd_fake)
def linear_relu_fwd(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool
) -> torch.Tensor:
    launch.check_device(input, weight, bias)
    input, weight = input.contiguous(), weight.contiguous()
    m, k = input.shape
    n = weight.shape[0]
    out = launch.new_output((m, n), input.dtype, input.device)
    if out.numel() == 0:
        return out
    cfg = _config(m, n, k, input.dtype, relu)
    grid = (launch.cdiv(m, cfg["BLOCK_M"]), launch.cdiv(n, cfg["BLOCK_N"]))
    wrap_triton(_fwd_kernel)[grid](
        input,
        weight,
        weight if bias is None else bias.contiguous(),
        out,
        m,
        n,
        k,
        HAS_BIAS=bias is not None,
        **cfg,
    )
    return out


@launch.register("triton_linear_relu_bwd", op_module.bwd_fake)
def linear_relu_bwd(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    launch.check_device(grad_out, out, input, weight)
    grad_out, out = grad_out.contiguous(), out.contiguous()
    input, weight = input.contiguous(), weight.contiguous()
    m, k = input.shape
    n = weight.shape[0]

    grad_input = launch.new_output((m, k), input.dtype, input.device)
    if grad_input.numel():
        cfg = _config(m, k, n, input.dtype, relu)
        grid = (launch.cdiv(m, cfg["BLOCK_M"]), launch.cdiv(k, cfg["BLOCK_N"]))
        wrap_triton(_bwd_input_kernel)[grid](grad_out, out, weight, grad_input, m, n, k, **cfg)

    if m == 0:  # no rows: the weight and bias gradients are zero
        return grad_input, torch.zeros_like(weight), weight.new_zeros(n)
    grad_weight = launch.new_output((n, k), weight.dtype, weight.device)
    grad_bias = launch.new_output((n,), weight.dtype, weight.device)
    if n == 0:
        return grad_input, grad_weight, grad_bias
    cfg = _config(n, k, m, input.dtype, relu)
    tiles = (launch.cdiv(n, cfg["BLOCK_M"]), launch.cdiv(max(k, 1), cfg["BLOCK_N"]))
    splits = launch.num_splits(m, cfg["BLOCK_K"], tiles[0] * tiles[1], input.device)
    chunk, splits = launch.split_chunk(m, splits, cfg["BLOCK_K"])
    acc_dtype = torch.float64 if cfg["ACC_FP64"] else torch.float32
    part_w = launch.new_output((splits, n, k), acc_dtype, input.device)
    part_b = launch.new_output((splits, n), acc_dtype, input.device)
    wrap_triton(_bwd_weight_kernel)[(*tiles, splits)](
        grad_out, out, input, part_w, part_b, m, n, k, chunk, **cfg
    )
    launch.sum_splits(part_w, grad_weight)
    launch.sum_splits(part_b, grad_bias)
    return grad_input, grad_weight, grad_bias


#: The two ops with the signatures of the schemas in csrc/fastlenet.cpp.
OPS = backends.Ops(
    torch.ops.fastlenet.triton_linear_relu_fwd, torch.ops.fastlenet.triton_linear_relu_bwd
)
