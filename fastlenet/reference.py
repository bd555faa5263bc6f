"""Pure-PyTorch reference of every fastlenet op: the oracle of tests and benchmarks, and the one
statement of each op's math and semantics (every kernel file points here instead of restating
them).

Two layers of reference live here:
- the stock compositions (`conv_relu_pool2d`, `linear_relu`), which autograd differentiates;
- the same forward/backward split as the registered kernels (`*_fwd`, `*_bwd`), with the
  same signatures (csrc/fastlenet.cpp) and saved state, used as the "reference" backend behind
  the same autograd Function.

conv_relu_pool: conv2d -> ReLU -> max_pool2d
--------------------------------------------
Shapes: input x (N, C, H, W); weight w (O, C, KH, KW); bias b (O,); conv output
y (N, O, OH, OW), never stored; pooled output out and argmax (N, O, PH, PW). Stride (SH, SW),
padding (PADH, PADW), pool_size (POOLH, POOLW), pool_stride (PSH, PSW); floor mode, dilation 1,
groups 1: OH = (H + 2*PADH - KH) // SH + 1 and PH = (OH - POOLH) // PSH + 1, likewise for the
widths (_checks.conv_pool_shapes).

Forward:
    y[n,o,oh,ow] = b[o] + sum_{c,kh,kw} w[o,c,kh,kw] * xpad[n,c,oh*SH+kh,ow*SW+kw]
  where xpad is x with PADH zero rows and PADW zero columns on each side.
    m[n,o,ph,pw] = max of y[n,o,ph*PSH+i,pw*PSW+j] over the window (i, j), i < POOLH, j < POOLW
  The window is visited in row-major order, position p = i*POOLW + j: the first value, then a
  strictly larger value or a NaN replaces the max. So the first max in row-major order wins a
  tie, and a NaN wins over numbers (the last NaN of the window when it holds several), as in
  max_pool2d.
    out = relu(m)    (a NaN m stays NaN, as in torch.relu)
    argmax = p of the max (uint8), or 255 (`NO_GRAD`) where m <= 0: ReLU passes no gradient
             there. A NaN m passes gradient, as stock's ReLU backward does (threshold_backward
             zeroes only where out <= 0). `m <= 0` is decided on m rounded to the output dtype: a
             tiny positive float32 max that rounds to 0 in float16 passes no gradient either.
  A window holds at most 255 positions (_checks.MAX_POOL_WINDOW), so a position fits the byte
  beside NO_GRAD; a byte that is neither a window position nor 255 is an invalid argmax.
  pool_size 1 is conv + ReLU alone.
Saved for backward: input, weight and argmax: one byte per pooled output (the conv output y is
  not kept).
Backward: only the conv output at the argmax of a window with argmax != 255,
  (oh, ow) = (ph*PSH + i, pw*PSW + j) for argmax p = i*POOLW + j, receives
  g = grad_out[n,o,ph,pw]; grad_out of a window with argmax 255 is dropped (zeroed, never
  multiplied). The conv output's gradient
    dy[n,o,oh,ow] = sum of g over the windows whose argmax is (oh, ow)  (several windows when
                    they overlap; 0 where there is none)
  then goes through the conv's backward:
    grad_b[o]         = sum_{n,oh,ow} dy[n,o,oh,ow]
    grad_w[o,c,kh,kw] = sum_{n,oh,ow} dy[n,o,oh,ow] * xpad[n,c,oh*SH+kh,ow*SW+kw]
    grad_x[n,c,yy,xx] = sum over (o, kh, kw, oh, ow) with oh*SH + kh = yy + PADH and
                        ow*SW + kw = xx + PADW of dy[n,o,oh,ow] * w[o,c,kh,kw]
                        (a transposed convolution of dy)
  dy is nonzero at one conv output per pooled output, so a kernel that visits only those
  patches does a quarter of a dense conv backward's work for 2x2 pools (1 / (POOLH*POOLW) for
  pools that do not overlap).
  conv_relu_pool_bwd returns grad_input when `input_grad`, grad_weight and grad_bias when
  `weight_grad`, from one call (one pass over argmax); a gradient not asked for has no
  elements.
Non-finite values: every output and gradient holds Inf/NaN exactly where stock's dense
  composition (this module's, run in float64) holds them. Its backward multiplies the zero dy of
  every conv output that is no argmax by x (grad_w) and by w (grad_x), and padding is a 0 that
  multiplies as well: 0 * Inf = NaN. So an Inf/NaN in x reaches every grad_w[:, c, kh, kw]
  whose tap meets it from some conv output, an Inf/NaN in w reaches grad_x wherever that tap
  meets a conv output (not at inputs no conv output reads through it: the transposed
  convolution never multiplies there), and an Inf/NaN g at an argmax multiplies the padding
  zeros of its patch. A kernel that skips the zeros of dy must reproduce this.

linear_relu: linear -> ReLU (and plain linear, `relu` false)
------------------------------------------------------------
Shapes: input x (B, I); weight w (O, I), as in nn.Linear; bias b (O,); out (B, O).
Forward:  out = relu(x @ w.T + b)    (no ReLU when `relu` is false; a NaN stays NaN)
Saved for backward: input, weight and out (out <= 0 is the ReLU mask).
Backward: g = where(out <= 0, 0, grad_out)    (g = grad_out when `relu` is false): a masked
          entry is 0 even where grad_out is Inf/NaN, and a NaN out passes its gradient, as
          stock ReLU's backward (threshold_backward) does.
          grad_input = g @ w (B, I);  grad_weight = g.T @ x (O, I);  grad_bias = g.sum(0) (O,)
          linear_relu_bwd always returns grad_bias (the autograd Function drops it without bias).
"""

import torch
import torch.nn.functional as F

from fastlenet._checks import NO_GRAD


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64 (0 when both are zero): how tests and
    benchmarks compare a kernel's result with the reference's."""
    a, e = actual.detach().double(), expected.detach().double()
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff / denom if denom > 0 else diff


def conv_relu_pool2d(input, weight, bias, stride, padding, pool_size, pool_stride):
    """max_pool2d(relu(conv2d(input, weight, bias))), as stock PyTorch computes it."""
    y = F.relu(F.conv2d(input, weight, bias, stride, padding))
    return F.max_pool2d(y, pool_size, pool_stride)


def linear_relu(input, weight, bias, relu=True):
    y = F.linear(input, weight, bias)
    return F.relu(y) if relu else y


def _window_index(pool_size, pool_stride, oh_ow, ph_pw, device):
    """Flat conv-output index of window position 0 of every pooled output, shape (PH, PW)."""
    ph = torch.arange(ph_pw[0], device=device).view(-1, 1) * pool_stride[0]
    pw = torch.arange(ph_pw[1], device=device).view(1, -1) * pool_stride[1]
    return ph * oh_ow[1] + pw


def conv_relu_pool_fwd(input, weight, bias, stride, padding, pool_size, pool_stride):
    y = F.conv2d(input, weight, bias, stride, padding)
    pooled, flat = F.max_pool2d(y, pool_size, pool_stride, return_indices=True)
    base = _window_index(pool_size, pool_stride, y.shape[-2:], pooled.shape[-2:], y.device)
    rel = flat - base
    pos = torch.div(rel, y.shape[-1], rounding_mode="floor") * pool_size[1] + rel % y.shape[-1]
    argmax = torch.where(pooled <= 0, NO_GRAD, pos).to(torch.uint8)
    return torch.relu(pooled), argmax


def _dense_grad(grad_out, argmax, conv_hw, pool_size, pool_stride):
    """Gradient of the conv output: grad_out scattered to each window's argmax."""
    n, o, ph, pw = grad_out.shape
    valid = argmax != NO_GRAD
    pos = torch.where(valid, argmax.long(), 0)
    base = _window_index(pool_size, pool_stride, conv_hw, (ph, pw), grad_out.device)
    flat = base + (pos // pool_size[1]) * conv_hw[1] + pos % pool_size[1]
    dense = grad_out.new_zeros(n, o, conv_hw[0] * conv_hw[1])
    src = torch.where(valid, grad_out, 0)
    dense.scatter_add_(2, flat.reshape(n, o, ph * pw), src.reshape(n, o, ph * pw))
    return dense.view(n, o, *conv_hw)


def _mask_link(dense, input, weight):
    """`dense`, the same values, depending on input and weight with a zero derivative, as
    stock's gradient does under create_graph: its mask is the ReLU's output, a function of
    both (ReLU's backward reads it), where ours is the saved argmax, a function of neither. So
    with every weight frozen the input gradient still has a graph, as stock's. ReLU's own
    backward does the linking: at a threshold of -inf it passes every value, the anchor being
    0, or NaN where input or weight hold Inf/NaN (NaN <= -inf is false too)."""
    anchor = (input * 0).sum() + (weight * 0).sum()
    return torch.ops.aten.threshold_backward(dense, anchor, float("-inf"))


def _conv_hw(input, weight, stride, padding):
    return tuple(
        (input.shape[2 + d] + 2 * padding[d] - weight.shape[2 + d]) // stride[d] + 1
        for d in range(2)
    )


def conv_relu_pool_bwd(
    grad_out,
    argmax,
    input,
    weight,
    stride,
    padding,
    pool_size,
    pool_stride,
    input_grad,
    weight_grad,
):
    """(grad_input, grad_weight, grad_bias); a gradient not asked for has no elements."""
    dense = _dense_grad(
        grad_out, argmax, _conv_hw(input, weight, stride, padding), pool_size, pool_stride
    )
    if torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad):
        dense = _mask_link(dense, input, weight)
    grad_input = (
        torch.nn.grad.conv2d_input(input.shape, weight, dense, stride, padding)
        if input_grad
        else input.new_empty(0)
    )
    if not weight_grad:
        return grad_input, weight.new_empty(0), weight.new_empty(0)
    grad_weight = torch.nn.grad.conv2d_weight(input, weight.shape, dense, stride, padding)
    return grad_input, grad_weight, dense.sum((0, 2, 3))


def linear_relu_fwd(input, weight, bias, relu):
    return linear_relu(input, weight, bias, relu)


def linear_relu_bwd(grad_out, out, input, weight, relu):
    # stock ReLU's backward itself: zero only where out <= 0 (a NaN output passes its gradient),
    # and differentiable in `out` (a zero derivative), so that under create_graph the gradient
    # keeps stock's graph through the forward even where every weight is frozen.
    g = torch.ops.aten.threshold_backward(grad_out, out, 0) if relu else grad_out
    return g @ weight, g.t() @ input, g.sum(0)
