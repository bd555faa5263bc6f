# conv2d -> ReLU -> max_pool2d in Triton, forward and backward.
# Math and saved state: fastlenet/reference.py (conv_relu_pool).
# Computes: out and argmax (N, O, PH, PW); grad_input, grad_weight and grad_bias.
# Saves for backward (the caller does): input, weight and argmax (uint8, one byte per output).
#
# Layouts (all contiguous, NCHW): input x (N, C, H, W); weight w (O, C, KH, KW), read as the
# (O, K) matrix with K = C * KH * KW and k = (c * KH + kh) * KW + kw; bias b (O,); conv output
# y (N, O, OH, OW), never stored; pooled output and argmax (N, O, PH, PW).
#
# Forward, one program per (BLOCK_M pooled outputs) x (BLOCK_N output channels) tile: for each
#   window position p = i * pool_w + j in row-major order, the conv tile at
#   oh = ph * pool_sh + i, ow = pw * pool_sw + j is an implicit GEMM (tl.dot over K blocks of
#   the im2col rows gathered on the fly); the running max and its position stay in registers.
# Backward, with the conv-output gradient dy of the reference gathered from argmax and grad_out
#   inside the operand loads (never stored; each conv position lies in at most
#   ceil(pool / pool_stride) windows per axis):
#   grad_input (a transposed conv of dy): implicit GEMM over rows (n, ih, iw), columns c and
#     depth (o, kh, kw).
#   grad_weight and grad_bias: implicit GEMM over columns k with every conv position
#     (n, oh, ow) a reduction row, as in the stock dense backward, so an Inf/NaN in the input
#     reaches grad_weight exactly where it does in stock.
#     Deterministic two-stage reduction: each of S splits of the rows writes a partial (O, K)
#     and (O,) in the accumulation dtype, a second kernel sums the splits in order. No atomics.
# Non-finite values (their rule: the reference): grad_input takes NaN/Inf weights out of its dot
# and adds them on a rare path (see _add_nonfinite_taps), since the dot would multiply them by
# the zeros of taps that meet no conv position.
# Dtypes: float16/bfloat16 operands with float32 accumulation; float32 (TF32 off unless
# launch.set_allow_tf32(True)); float64 accumulates in float64 (its input and weight gradients
# on FMA units: Triton 3.8 cannot lower those float64 tl.dots, see launch.dot_fma_needed).
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fastlenet import _checks, backends
from fastlenet import conv_relu_pool as op_module
from fastlenet.kernels import launch

# The kernels call these helpers by their own names: torch.compile copies a user kernel's
# source with the source of each helper it names, under that name (tests/inductor_copy.py).
from fastlenet.kernels.launch import dot, dot_fma


@triton.jit
def _fwd_kernel(
    x_ptr,  # (N, C, H, W) input
    w_ptr,  # (O, K) weight
    b_ptr,  # (O,) bias (unused when not HAS_BIAS)
    out_ptr,  # (N, O, PH, PW) pooled output, input dtype
    argmax_ptr,  # (N, O, PH, PW) uint8 window position of the max, or 255 (_checks.NO_GRAD)
    M,  # N * PH * PW: pooled outputs per channel
    C,
    H,
    W,
    O,
    PH,
    PW,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    pool_sh,  # pool strides
    pool_sw,
    KH: tl.constexpr,
    KW: tl.constexpr,
    POOL_H: tl.constexpr,
    POOL_W: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC_FP64: tl.constexpr,  # accumulate in float64 (float64 inputs)
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32"
    DOT_UPCAST: tl.constexpr,  # bfloat16 operands as float32 (interpreter only)
    BLOCK_M: tl.constexpr,  # pooled outputs per program
    BLOCK_N: tl.constexpr,  # output channels per program
    BLOCK_K: tl.constexpr,  # depth (c, kh, kw) per step
):
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    K = C * KH * KW
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    chans = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    chan_ok = chans < O
    n = rows // (PH * PW)
    rem = rows % (PH * PW)
    ph = rem // PW
    pw = rem % PW
    x_base = n.to(tl.int64) * C * H * W
    if HAS_BIAS:
        bias = tl.load(b_ptr + chans, mask=chan_ok, other=0.0).to(acc_dtype)
    best = tl.full((BLOCK_M, BLOCK_N), float("-inf"), acc_dtype)
    best_pos = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
    for i in range(POOL_H):
        ih0 = (ph * pool_sh + i) * stride_h - pad_h
        for j in range(POOL_W):
            iw0 = (pw * pool_sw + j) * stride_w - pad_w
            acc = tl.zeros((BLOCK_M, BLOCK_N), acc_dtype)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < K
                c = ks // (KH * KW)
                kh = (ks // KW) % KH
                kw = ks % KW
                ih = ih0[:, None] + kh[None, :]
                iw = iw0[:, None] + kw[None, :]
                a_mask = (
                    row_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                )
                a_off = x_base[:, None] + (c[None, :] * H + ih) * W + iw
                a = tl.load(x_ptr + a_off, mask=a_mask, other=0.0)
                b_off = chans[None, :] * K + ks[:, None]
                b = tl.load(w_ptr + b_off, mask=chan_ok[None, :] & k_ok[:, None], other=0.0)
                acc = dot(a, b, acc, DOT_PRECISION, DOT_UPCAST)
            if HAS_BIAS:
                acc += bias[None, :]
            # strictly greater keeps the first max; every NaN replaces it (max_pool2d's rule)
            take = (acc > best) | (acc != acc)
            best = tl.where(take, acc, best)
            best_pos = tl.where(take, i * POOL_W + j, best_pos)
    out = best.to(out_ptr.dtype.element_ty)
    # the reference decides on the rounded max: a tiny positive float32 max that rounds to 0
    # in float16 passes no gradient there either
    rounded = out.to(acc_dtype)
    relu = tl.where(rounded <= 0, 0.0, rounded).to(out_ptr.dtype.element_ty)
    argmax = tl.where(rounded <= 0, 255, best_pos).to(tl.uint8)
    off = (n.to(tl.int64)[:, None] * O + chans[None, :]) * (PH * PW) + rem[:, None]
    mask = row_ok[:, None] & chan_ok[None, :]
    tl.store(out_ptr + off, relu, mask=mask)
    tl.store(argmax_ptr + off, argmax, mask=mask)


@triton.jit
def _conv_grad(
    g_ptr,
    argmax_ptr,
    chan_base,  # (n * O + o) as int64, broadcast to the tile
    oh,  # conv output position, broadcast to the tile
    ow,
    ok,  # tile mask: (oh, ow) is a conv output position of a real row
    PH,
    PW,
    pool_sh,
    pool_sw,
    POOL_H: tl.constexpr,
    POOL_W: tl.constexpr,
    WIN_H: tl.constexpr,  # ceil(POOL_H / pool_sh): windows holding one conv row, at most
    WIN_W: tl.constexpr,
    ACC_FP64: tl.constexpr,
):
    """dy[n, o, oh, ow]: the grad_out of every window holding (oh, ow) whose argmax points
    there (argmax 255 never matches: a window holds at most 255 positions, 0..254)."""
    dy = tl.zeros(oh.shape, tl.float64 if ACC_FP64 else tl.float32)
    oh = tl.where(ok, oh, 0)
    ow = tl.where(ok, ow, 0)
    for a in range(WIN_H):
        ph = oh // pool_sh - a
        di = oh - ph * pool_sh
        ok_h = ok & (ph >= 0) & (ph < PH) & (di < POOL_H)
        for b in range(WIN_W):
            pw = ow // pool_sw - b
            dj = ow - pw * pool_sw
            ok_w = ok_h & (pw >= 0) & (pw < PW) & (dj < POOL_W)
            off = (chan_base * PH + ph) * PW + pw
            am = tl.load(argmax_ptr + off, mask=ok_w, other=255).to(tl.int32)
            g = tl.load(g_ptr + off, mask=ok_w, other=0.0).to(dy.dtype)
            dy += tl.where(am == di * POOL_W + dj, g, 0.0)
    return dy


@triton.jit
def _add_nonfinite_taps(acc, a, ok, w, finite, BLOCK_K: tl.constexpr):
    """acc + sum over taps k with ok[:, k] of a[:, k] * w[k, :], for the non-finite w only.
    a, ok: (BLOCK_M, BLOCK_K); w, finite: (BLOCK_K, BLOCK_N). One rank-1 update per tap."""
    taps = tl.arange(0, BLOCK_K)
    for kk in range(BLOCK_K):
        sel = taps == kk
        a_col = tl.sum(tl.where(sel[None, :], a, 0.0), axis=1)
        ok_col = tl.sum(tl.where(sel[None, :] & ok, 1, 0), axis=1) > 0
        bad = sel[:, None] & ~finite
        w_row = tl.sum(tl.where(bad, w, 0.0), axis=0)
        bad_row = tl.sum(bad.to(tl.int32), axis=0) > 0
        hit = ok_col[:, None] & bad_row[None, :]
        acc += tl.where(hit, a_col[:, None] * w_row[None, :], 0.0)
    return acc


@triton.jit
def _bwd_input_kernel(
    g_ptr,  # (N, O, PH, PW) grad_out
    argmax_ptr,  # (N, O, PH, PW) uint8
    w_ptr,  # (O, C, KH, KW) weight
    gx_ptr,  # (N, C, H, W) grad_input
    M,  # N * H * W
    C,
    H,
    W,
    O,
    OH,  # conv output size
    OW,
    PH,
    PW,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    pool_sh,
    pool_sw,
    KH: tl.constexpr,
    KW: tl.constexpr,
    POOL_H: tl.constexpr,
    POOL_W: tl.constexpr,
    WIN_H: tl.constexpr,  # ceil(POOL_H / pool_sh)
    WIN_W: tl.constexpr,
    ACC_FP64: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,  # input positions (n, ih, iw) per program
    BLOCK_N: tl.constexpr,  # input channels per program
    BLOCK_K: tl.constexpr,  # depth (o, kh, kw) per step
):
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    K = O * KH * KW
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    chans = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    chan_ok = chans < C
    n = rows // (H * W)
    rem = rows % (H * W)
    ih = rem // W
    iw = rem % W
    acc = tl.zeros((BLOCK_M, BLOCK_N), acc_dtype)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        o = ks // (KH * KW)
        kh = (ks // KW) % KH
        kw = ks % KW
        # conv output position that input (ih, iw) meets through tap (kh, kw)
        sh = ih[:, None] + pad_h - kh[None, :]
        sw = iw[:, None] + pad_w - kw[None, :]
        ok = row_ok[:, None] & k_ok[None, :] & (sh >= 0) & (sw >= 0)
        sh = tl.where(ok, sh, 0)
        sw = tl.where(ok, sw, 0)
        oh = sh // stride_h
        ow = sw // stride_w
        ok = ok & (sh % stride_h == 0) & (sw % stride_w == 0) & (oh < OH) & (ow < OW)
        chan_base = n.to(tl.int64)[:, None] * O + o[None, :]
        dy = _conv_grad(
            g_ptr, argmax_ptr, chan_base, oh, ow, ok, PH, PW, pool_sh, pool_sw,
            POOL_H, POOL_W, WIN_H, WIN_W, ACC_FP64,
        )  # fmt: skip
        a_tile = dy.to(w_ptr.dtype.element_ty)
        b_off = (o[:, None] * C + chans[None, :]) * (KH * KW) + (kh * KW + kw)[:, None]
        b_tile = tl.load(w_ptr + b_off, mask=k_ok[:, None] & chan_ok[None, :], other=0.0)
        # The dot multiplies the taps that meet no conv position by a zero of dy; a NaN/Inf
        # weight would turn those into NaN where stock's transposed convolution never
        # multiplies. So the dot takes the finite weights, and a rare-path loop adds the
        # non-finite ones on the taps that exist (as stock does, 0 * Inf = NaN included).
        w_acc = b_tile.to(acc_dtype)
        finite = tl.abs(w_acc) < float("inf")  # false for NaN and +/-Inf
        if ACC_FP64:  # float64 inputs: the dot on FMA units, as in the weight gradient
            acc = dot_fma(a_tile, tl.where(finite, b_tile, 0.0), acc)
        else:
            acc = dot(a_tile, tl.where(finite, b_tile, 0.0), acc, DOT_PRECISION, DOT_UPCAST)
        if tl.sum((~finite).to(tl.int32)) > 0:
            acc = _add_nonfinite_taps(acc, a_tile.to(acc_dtype), ok, w_acc, finite, BLOCK_K)
    off = (n.to(tl.int64)[:, None] * C + chans[None, :]) * (H * W) + rem[:, None]
    tl.store(gx_ptr + off, acc.to(gx_ptr.dtype.element_ty), mask=row_ok[:, None] & chan_ok[None, :])


@triton.jit
def _bwd_weight_kernel(
    g_ptr,  # (N, O, PH, PW) grad_out
    argmax_ptr,  # (N, O, PH, PW) uint8
    x_ptr,  # (N, C, H, W) input
    part_w_ptr,  # (S, O, K) partial grad_weight, accumulation dtype
    part_b_ptr,  # (S, O) partial grad_bias, accumulation dtype
    R,  # N * OH * OW reduction rows (conv output positions)
    CHUNK,  # rows per split, a multiple of BLOCK_K
    C,
    H,
    W,
    O,
    OH,
    OW,
    PH,
    PW,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    pool_sh,
    pool_sw,
    KH: tl.constexpr,
    KW: tl.constexpr,
    POOL_H: tl.constexpr,
    POOL_W: tl.constexpr,
    WIN_H: tl.constexpr,  # ceil(POOL_H / pool_sh)
    WIN_W: tl.constexpr,
    ACC_FP64: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    DOT_FMA: tl.constexpr,  # float64: launch.dot_fma instead of tl.dot
    BLOCK_M: tl.constexpr,  # output channels o per program
    BLOCK_N: tl.constexpr,  # weight columns k = (c, kh, kw) per program
    BLOCK_K: tl.constexpr,  # reduction rows (n, oh, ow) per step
):
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    K = C * KH * KW
    chans = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    chan_ok = chans < O
    col_ok = cols < K
    c = cols // (KH * KW)
    kh = (cols // KW) % KH
    kw = cols % KW
    acc = tl.zeros((BLOCK_M, BLOCK_N), acc_dtype)
    bias_acc = tl.zeros((BLOCK_M,), acc_dtype)
    start = split * CHUNK
    for r0 in range(start, start + CHUNK, BLOCK_K):
        rs = r0 + tl.arange(0, BLOCK_K)
        r_ok = rs < R
        n = rs // (OH * OW)
        rem = rs % (OH * OW)
        oh = rem // OW
        ow = rem % OW
        # operand A (o, r): dy
        chan_base = n.to(tl.int64)[None, :] * O + chans[:, None]
        ok = chan_ok[:, None] & r_ok[None, :]
        zero = tl.zeros((BLOCK_M, BLOCK_K), tl.int32)
        dy = _conv_grad(
            g_ptr, argmax_ptr, chan_base, oh[None, :] + zero, ow[None, :] + zero, ok,
            PH, PW, pool_sh, pool_sw, POOL_H, POOL_W, WIN_H, WIN_W, ACC_FP64,
        )  # fmt: skip
        bias_acc += tl.sum(dy, axis=1)
        a_tile = dy.to(x_ptr.dtype.element_ty)
        # operand B (r, k): the input patch under conv position (oh, ow)
        ih = (oh * stride_h - pad_h)[:, None] + kh[None, :]
        iw = (ow * stride_w - pad_w)[:, None] + kw[None, :]
        x_mask = r_ok[:, None] & col_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_off = (n.to(tl.int64)[:, None] * C + c[None, :]) * (H * W) + ih * W + iw
        b_tile = tl.load(x_ptr + x_off, mask=x_mask, other=0.0)
        if DOT_FMA:
            acc = dot_fma(a_tile, b_tile, acc)
        else:
            acc = dot(a_tile, b_tile, acc, DOT_PRECISION, DOT_UPCAST)
    part_off = (split * O + chans[:, None]).to(tl.int64) * K + cols[None, :]
    tl.store(part_w_ptr + part_off, acc, mask=chan_ok[:, None] & col_ok[None, :])
    if tl.program_id(1) == 0:
        tl.store(part_b_ptr + split * O + chans, bias_acc, mask=chan_ok)


# ---------------------------------------------------------------------------------------------
# Launchers: tensors in, tensors out, registered as fastlenet::triton_conv_relu_pool_{fwd,bwd}.
# ---------------------------------------------------------------------------------------------
def _shapes(input, weight, stride, padding, pool_size, pool_stride):
    return _checks.conv_pool_shapes(
        input.shape[-2:], weight.shape[-2:], stride, padding, pool_size, pool_stride
    )


def _common(kernel_size, dtype):
    return {
        "KH": kernel_size[0],
        "KW": kernel_size[1],
        "ACC_FP64": launch.acc_is_fp64(dtype),
        "DOT_PRECISION": launch.dot_precision(dtype),
        "DOT_UPCAST": launch.dot_upcast(dtype),
    }


def _pool(pool_size, pool_stride):
    """The backward's pool constexprs: window and the windows holding one conv output."""
    return {
        "POOL_H": pool_size[0],
        "POOL_W": pool_size[1],
        "WIN_H": launch.cdiv(pool_size[0], pool_stride[0]),
        "WIN_W": launch.cdiv(pool_size[1], pool_stride[1]),
    }


# The launch configuration of each kernel (constexprs, num_warps and compile options) from the
# sizes alone: the launchers pass exactly these, and tests/test_gpu_budgets.py compiles them.
def _fwd_config(rows, o, depth, kernel_size, pool_size, has_bias, dtype):
    return {
        "POOL_H": pool_size[0],
        "POOL_W": pool_size[1],
        "HAS_BIAS": has_bias,
        **_common(kernel_size, dtype),
        **launch.gemm_blocks(rows, o, depth, "conv_fwd"),
        **launch.compile_options("conv_fwd"),
    }


def _bwd_input_config(rows, c, depth, kernel_size, pool_size, pool_stride, dtype):
    cfg = launch.gemm_blocks(rows, c, depth, "conv_bwd_input")
    if launch.dot_fma_needed(dtype) and not launch.INTERPRETED:  # the kernel's ACC_FP64 path
        cfg.update(launch.FMA_BLOCKS, num_warps=4)
    return {
        **_pool(pool_size, pool_stride),
        **_common(kernel_size, dtype),
        **cfg,
        **launch.compile_options("conv_bwd_input"),
    }


def _bwd_weight_config(o, depth, rows, kernel_size, pool_size, pool_stride, dtype):
    cfg = launch.gemm_blocks(o, depth, rows, "conv_bwd_weight")
    fma = launch.dot_fma_needed(dtype)
    if fma and not launch.INTERPRETED:
        cfg.update(launch.FMA_BLOCKS, num_warps=4)
    return {
        **_pool(pool_size, pool_stride),
        **_common(kernel_size, dtype),
        "DOT_FMA": fma,
        **cfg,
        **launch.compile_options("conv_bwd_weight"),
    }


def launch_plan(
    input_shape, weight_shape, stride, padding, pool_size, pool_stride, dtype, has_bias=True
):
    """[(name, kernel, config)] of the launches of a forward and a full backward at this shape:
    config as the launchers pass it (constexprs, num_warps, compile options)."""
    n, c, h, w = input_shape
    o, _, kh, kw = weight_shape
    shapes = _checks.conv_pool_shapes((h, w), (kh, kw), stride, padding, pool_size, pool_stride)
    (oh, ow), (ph, pw) = shapes
    depth = c * kh * kw
    return [
        (
            "fwd",
            _fwd_kernel,
            _fwd_config(n * ph * pw, o, depth, (kh, kw), pool_size, has_bias, dtype),
        ),
        (
            "bwd_input",
            _bwd_input_kernel,
            _bwd_input_config(n * h * w, c, o * kh * kw, (kh, kw), pool_size, pool_stride, dtype),
        ),
        (
            "bwd_weight",
            _bwd_weight_kernel,
            _bwd_weight_config(o, depth, n * oh * ow, (kh, kw), pool_size, pool_stride, dtype),
        ),
        ("sum_splits", launch._sum_splits_kernel, launch.sum_splits_config()),
    ]


@launch.register("triton_conv_relu_pool_fwd", op_module.fwd_fake)
def conv_relu_pool_fwd(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    pool_size: list[int],
    pool_stride: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    launch.check_device(input, weight, bias)
    input, weight = input.contiguous(), weight.contiguous()
    n, c, h, w = input.shape
    o = weight.shape[0]
    _, (ph, pw) = _shapes(input, weight, stride, padding, pool_size, pool_stride)
    out = launch.new_output((n, o, ph, pw), input.dtype, input.device)
    argmax = launch.new_output((n, o, ph, pw), torch.uint8, input.device)
    rows, depth = n * ph * pw, c * weight.shape[2] * weight.shape[3]
    if out.numel() == 0:
        return out, argmax
    kernel_size = weight.shape[2:]
    cfg = _fwd_config(rows, o, depth, kernel_size, pool_size, bias is not None, input.dtype)
    grid = (launch.cdiv(rows, cfg["BLOCK_M"]), launch.cdiv(o, cfg["BLOCK_N"]))
    wrap_triton(_fwd_kernel)[grid](
        input,
        weight,
        weight if bias is None else bias.contiguous(),
        out,
        argmax,
        rows,
        c,
        h,
        w,
        o,
        ph,
        pw,
        stride[0],
        stride[1],
        padding[0],
        padding[1],
        pool_stride[0],
        pool_stride[1],
        **cfg,
    )
    return out, argmax


def _bwd_input(
    grad_out: torch.Tensor,
    argmax: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor,
    stride: list[int],
    padding: list[int],
    pool_size: list[int],
    pool_stride: list[int],
) -> torch.Tensor:
    weight = weight.contiguous()
    n, c, h, w = input.shape
    o = weight.shape[0]
    (oh, ow), (ph, pw) = _shapes(input, weight, stride, padding, pool_size, pool_stride)
    grad_input = launch.new_output((n, c, h, w), input.dtype, input.device)
    rows, depth = n * h * w, o * weight.shape[2] * weight.shape[3]
    if grad_input.numel() == 0:
        return grad_input
    kernel_size = weight.shape[2:]
    cfg = _bwd_input_config(rows, c, depth, kernel_size, pool_size, pool_stride, input.dtype)
    grid = (launch.cdiv(rows, cfg["BLOCK_M"]), launch.cdiv(c, cfg["BLOCK_N"]))
    wrap_triton(_bwd_input_kernel)[grid](
        grad_out,
        argmax,
        weight,
        grad_input,
        rows,
        c,
        h,
        w,
        o,
        oh,
        ow,
        ph,
        pw,
        stride[0],
        stride[1],
        padding[0],
        padding[1],
        pool_stride[0],
        pool_stride[1],
        **cfg,
    )
    return grad_input


def _bwd_weight(
    grad_out: torch.Tensor,
    argmax: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor,
    stride: list[int],
    padding: list[int],
    pool_size: list[int],
    pool_stride: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    input = input.contiguous()
    n, c, h, w = input.shape
    o, _, kh, kw = weight.shape
    (oh, ow), (ph, pw) = _shapes(input, weight, stride, padding, pool_size, pool_stride)
    depth = c * kh * kw
    rows = n * oh * ow
    if rows == 0 or o * depth == 0:  # nothing reaches the weights: the gradient is zero
        return torch.zeros_like(weight, memory_format=torch.contiguous_format), weight.new_zeros(o)
    grad_weight = launch.new_output((o, c, kh, kw), weight.dtype, weight.device)
    grad_bias = launch.new_output((o,), weight.dtype, weight.device)
    cfg = _bwd_weight_config(o, depth, rows, (kh, kw), pool_size, pool_stride, input.dtype)
    tiles = (launch.cdiv(o, cfg["BLOCK_M"]), launch.cdiv(depth, cfg["BLOCK_N"]))
    splits = launch.num_splits(rows, cfg["BLOCK_K"], tiles[0] * tiles[1], input.device)
    chunk, splits = launch.split_chunk(rows, splits, cfg["BLOCK_K"])
    acc_dtype = torch.float64 if launch.acc_is_fp64(input.dtype) else torch.float32
    part_w = launch.new_output((splits, o, depth), acc_dtype, input.device)
    part_b = launch.new_output((splits, o), acc_dtype, input.device)
    wrap_triton(_bwd_weight_kernel)[(*tiles, splits)](
        grad_out,
        argmax,
        input,
        part_w,
        part_b,
        rows,
        chunk,
        c,
        h,
        w,
        o,
        oh,
        ow,
        ph,
        pw,
        stride[0],
        stride[1],
        padding[0],
        padding[1],
        pool_stride[0],
        pool_stride[1],
        **cfg,
    )
    launch.sum_splits(part_w, grad_weight)
    launch.sum_splits(part_b, grad_bias)
    return grad_weight, grad_bias


@launch.register("triton_conv_relu_pool_bwd", op_module.bwd_fake)
def conv_relu_pool_bwd(
    grad_out: torch.Tensor,
    argmax: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor,
    stride: list[int],
    padding: list[int],
    pool_size: list[int],
    pool_stride: list[int],
    input_grad: bool,
    weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    launch.check_device(grad_out, argmax, input, weight)
    args = (grad_out.contiguous(), argmax.contiguous(), input, weight)
    geometry = (stride, padding, pool_size, pool_stride)
    grad_input = _bwd_input(*args, *geometry) if input_grad else input.new_empty(0)
    if not weight_grad:
        return grad_input, weight.new_empty(0), weight.new_empty(0)
    return grad_input, *_bwd_weight(*args, *geometry)


#: The two ops with the signatures of the schemas in csrc/fastlenet.cpp.
OPS = backends.Ops(
    torch.ops.fastlenet.triton_conv_relu_pool_fwd, torch.ops.fastlenet.triton_conv_relu_pool_bwd
)
