// conv2d -> ReLU -> max_pool2d on the CPU: checks, allocation, kernel choice and the
// TORCH_LIBRARY_IMPL(fastlenet, CPU) registration of the forward and backward ops.
// Math and saved state: fastlenet/reference.py (conv_relu_pool).
// Computes: out and argmax (N, O, PH, PW) (conv_relu_pool_infer: out alone); grad_input,
// grad_weight, grad_bias in one call.
// Saves for backward (the autograd Function does): x, w and argmax, one byte per pooled output.
//
// float32 and float64, contiguous NCHW (inputs are made contiguous); the conv output is stored
// only where ATen's convolution computes it: layers without pooling (pool_size 1, forward and
// backward; see forward_op) but for the tap GEMM's and flat_forward's (flat_suits), few outputs
// from deep input (kAtenConvMinChannels), deep float32 patches over few conv outputs
// (cl_conv_suits: channels-last operands), and one sample's at a time by the tap GEMM
// (tap_gemm_suits) and the flat kernel (flat_pool_suits). Kernels: conv_relu_pool_cpu_fwd.h
// (forward), conv_relu_pool_cpu_pool.h (ReLU/pool pass after ATen's conv, tap GEMM),
// conv_relu_pool_cpu_flat_pool.h (few outputs over large planes), conv_relu_pool_cpu_bwd.h and
// conv_relu_pool_cpu_bwd_wide.h (backward), conv_relu_pool_cpu_nopool_fwd.h (forward without
// pooling where oneDNN runs far from the peak), conv_relu_pool_cpu_nopool.h (weight gradient
// without pooling, few input channels), conv_relu_pool_cpu_nopool_gi.h (input gradient without
// pooling where oneDNN's is slow: the flat kernel's transposed conv),
// conv_relu_pool_cpu_nopool_cl.h (gradients without pooling from oneDNN's channels-last backward:
// cl_backward_suits); a gradient that Inf/NaN reach through the zeros the sparse backward skips is
// recomputed here with dense_backward, as stock's dense backward computes it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>

#include "checks.h"
#include "conv_relu_pool_cpu_bwd.h"
#include "conv_relu_pool_cpu_flat_pool.h"
#include "conv_relu_pool_cpu_fwd.h"
#include "conv_relu_pool_cpu_nopool.h"
#include "conv_relu_pool_cpu_nopool_cl.h"
#include "conv_relu_pool_cpu_nopool_fwd.h"
#include "conv_relu_pool_cpu_nopool_gi.h"
#include "conv_relu_pool_cpu_pool.h"
#include "cpu_reuse.h"

namespace fastlenet {
namespace {

using namespace cpu;

// Input channels from which a layer of at most one vector of output channels (kWide: the fused
// kernels then fill few lanes) takes ATen's convolution (oneDNN) and relu_pool instead of the
// fused forward. Measured (forward alone, batch 64, 2 threads, AVX-512, us, fused -> ATen conv
// alone): 32 -> 8 3x3 745 -> 498, 64 -> 10 3x3 1257 -> 891, 128 -> 6 3x3 2462 -> 1666,
// 64 -> 6 5x5 2238 -> 1906, 32 -> 12 5x5 1513 -> 980; with fewer input channels oneDNN measured
// slower: 16 -> 6 5x5 684 -> 1348, 20 -> 10 5x5 1480 -> 1758, 8 -> 6 5x5 360 -> 717.
constexpr int64_t kAtenConvMinChannels = 32;

// Layers whose forward takes the tap GEMM (tap_gemm_forward) instead of ATen's convolution:
// stride 1, at most 8 output channels (and at least kAtenConvMinChannels inputs), where
// flat_pool_suits does not take them first (pooled, large planes). Measured
// (forward alone, batch 64, 2 threads, AVX-512, us, ATen conv -> tap GEMM, 3x3 pad 1 pool 2
// unless noted): 128 -> 6 32x32 16629 -> 8913 (b256 26880 -> 14127), 64 -> 6 16x16 905 -> 437,
// 128 -> 6 8x8 438 -> 195, 32 -> 8 24x24 1213 -> 715, 32 -> 8 14x14 546 -> 500, 32 -> 5 9x9
// 263 -> 156, 64 -> 6 12x12 pool 3 562 -> 289, 64 -> 6 20x20 5x5 pad 0 2814 -> 1711; with
// more outputs it is not always faster: 64 -> 10 16x16 pad 0 954 -> 839, 64 -> 16 16x16
// 1162 -> 1338, 32 -> 12 20x20 5x5 pad 2 1983 -> 2529, 32 -> 16 16x16 5x5 1308 -> 2408.
constexpr int64_t kTapMaxOut = 8;

bool tap_gemm_suits(const ConvPoolGeometry& g) {
  return g.sh == 1 && g.sw == 1 && g.o <= kTapMaxOut && g.c >= kAtenConvMinChannels;
}

// Float32 layers whose forward takes ATen's convolution (oneDNN) of channels-last operands and
// relu_pool_cl: deep patches (C * KH * KW) over few conv outputs per plane, where oneDNN's
// channels-last kernels run near the FMA peak and the fused ones do not, with more output
// channels than ATen's NCHW path above takes. Measured (forward alone, 2 threads, AVX-512,
// speedup over the fused kernels, batch 64 / 256): 128 -> 128 3x3 8x8 1.21 / 1.33x (pool 3
// 1.24 / 1.29x), 64 -> 128 3x3 8x8 1.13 / 1.29x, 64 -> 64 3x3 8x8 1.06 / 1.23x, 128 -> 64 5x5
// 8x8 1.37 / 1.34x, 64 -> 32 5x5 16x16 pool 3 1.28 / 1.29x; not kept: 64 -> 128 3x3 16x16
// 1.02 / 0.77x, 16 -> 32 5x5 14x14 1.24 / 0.66x, 32 -> 64 3x3 16x16 0.70 / 0.68x, 128 -> 128
// 3x3 32x32 0.60x, 37 -> 77 5x5 12x12 0.99x (b256), 128 -> 16 3x3 8x8 0.93x (b64).
constexpr int64_t kClConvMinDepth = 576;       // with at most kClConvMaxPixels conv outputs
constexpr int64_t kClConvMaxPixels = 64;       // per plane
constexpr int64_t kClConvDeepMinDepth = 1600;  // with at most kClConvDeepMaxPixels
constexpr int64_t kClConvDeepMaxPixels = 256;

bool cl_conv_suits(const ConvPoolGeometry& g) {
  const int64_t depth = g.c * g.kh * g.kw, pixels = g.oh * g.ow;
  return g.o > kVecBytes / 4 && ((depth >= kClConvMinDepth && pixels <= kClConvMaxPixels) ||
                                 (depth >= kClConvDeepMinDepth && pixels <= kClConvDeepMaxPixels));
}

// Layers without pooling whose float32 gradients come from oneDNN's backward of channels-last
// operands (conv_relu_pool_cpu_nopool_cl.h) where ATen computes the weight gradient: channel
// counts that are not multiples of 16 (oneDNN's NCHW path pads them to its blocks of 16:
// on_dnn_blocks, conv_relu_pool_cpu_nopool_fwd.h) or planes of at most kClBackwardMaxPixels conv
// outputs. Measured (backward alone, batch 64 / 256, 2 threads, AVX-512 Xeon VM, ms, NCHW ->
// channels-last, in alternating processes): 6 -> 16 5x5 pad 2 16x16 1.20 / 4.69 -> 1.01 / 3.74,
// 13 -> 29 3x3 11x11 0.63 / 2.39 -> 0.58 / 2.03, 10 ->
// 22 3x3 pad 1 20x20 2.03 / 8.03 -> 1.52 / 5.55, 24 -> 40 5x5 20x20 6.85 / 27.2 -> 6.17 / 23.9,
// 128 -> 128 3x3 pad 1 8x8 6.44 / 24.6 -> 6.26 / 24.2; not taken: 16 -> 16 3x3 pad 1 24x24
// 1.45 / 5.42 -> 1.55 / 5.75, 64 -> 64 16x16 6.56 / 25.9 -> 6.63 / 26.9, 32 -> 64 16x16 3.74 /
// 14.1 -> 3.79 / 14.8, 16 -> 32 16x16 1.27 / 4.67 -> 1.25 / 4.77. Layers whose weight gradient
// is conv_relu_pool_cpu_nopool.h's keep NCHW: their input gradient alone measured slower
// channels-last (6 -> 16 3x3 30x30 1.94 / 7.16 -> 2.21 / 8.84 ms).
#if defined(__AVX512F__)
constexpr int64_t kClBackwardMaxPixels = 64;

bool cl_backward_suits(const ConvPoolGeometry& g) {
  return !on_dnn_blocks(g) || g.oh * g.ow <= kClBackwardMaxPixels;
}

// Float32 layers on oneDNN's blocks whose input gradient is flat_grad_input's (planes of 30x30
// and more) take oneDNN's channels-last backward for the weight gradient alone where each input
// plane is a whole number of kClWeightPlaneBytes (32x32 floats): there its NCHW weight gradient
// ran 1.1-1.45x slower (the forward's NCHW kernels also read 4 KB planes lowest). Measured (the
// op's backward, both gradients, 2 threads, Zen 5 VM, processes alternating, us, NCHW ->
// channels-last weight gradient, batch 64 / 256): 16 -> 16 3x3 pad 1 32x32 1745-1770 ->
// 1662-1664 / 12536-12564 -> 9370-9500, 64 -> 64 3x3 pad 1 32x32 31380-32308 -> 24880-25018 /
// 131278-132734 -> 100149-100678, 16 -> 32 5x5 pad 2 32x32 7917-8207 -> 7400-8057 / 43650-44247
// -> 33799-34603, 32 -> 32 3x3 pad 1 32x32 6129-7249 -> 5626-6925 / 42075-46639 -> 30738-31142
// (batch 128: 21507-21898 -> 14648-14959); not kept at 30x30 (3600-byte planes), batch 128: 32
// -> 32 3x3 pad 1 12490-12871 -> 13164-13235, 32 -> 48 18312-18518 -> 19867-20067.
constexpr int64_t kClWeightPlaneBytes = 4096;

bool cl_weight_suits(const ConvPoolGeometry& g) {
  return g.h * g.w * int64_t{sizeof(float)} % kClWeightPlaneBytes == 0;
}
#endif

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
}

// Lanes over pooled columns when that fills them at least as well as lanes over output
// channels; narrow (at most 32-byte) vectors when there are few channels.
template <typename T>
void forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
             const ConvPoolGeometry& g, at::Tensor& out, at::Tensor& argmax) {
  constexpr int kNarrow = kNarrowBytes / sizeof(T), kWide = kVecBytes / sizeof(T);
  const bool few = g.o <= kNarrow;
  if (std::is_same_v<T, float> && cl_conv_suits(g)) {
    const auto cl = at::MemoryFormat::ChannelsLast;
    const at::Tensor conv = at::convolution(input.contiguous(cl), weight.contiguous(cl),
                                            bias.defined() ? bias : at::Tensor(), {g.sh, g.sw},
                                            {g.padh, g.padw}, {1, 1}, false, {0, 0}, 1);
    relu_pool_cl<T>(conv.contiguous(cl), g, out, argmax);
  } else if (flat_pool_suits(g) && span_finite(weight.const_data_ptr<T>(), weight.numel())) {
    flat_pool_forward<T>(input, weight, bias, g, out, argmax);  // finite weight: see there
  } else if (tap_gemm_suits(g) && span_finite(weight.const_data_ptr<T>(), weight.numel())) {
    tap_gemm_forward<T>(input, weight, bias, g, out, argmax);        // finite weight: see there
  } else if (g.o <= kVecBytes / 4 && g.c >= kAtenConvMinChannels) {  // float lanes: same in F64
    const at::Tensor conv =
        at::convolution(input, weight, bias.defined() ? bias : at::Tensor(), {g.sh, g.sw},
                        {g.padh, g.padw}, {1, 1}, false, {0, 0}, 1);
    relu_pool<T>(conv.contiguous(), g, out, argmax);
  } else if (columns_suits<T>(g, few ? kNarrow : kWide))
    forward_columns<T>(input, weight, bias, g, out, argmax);
  else if (few)
    forward_channels<T, kNarrowBytes, 1>(input, weight, bias, g, out, argmax);
  else if (g.o > kWide) {  // two vectors of channels per block (kChannelVectors)
    // A remainder of at most one vector after whole pairs takes a block of one vector (a
    // narrow one for at most kNarrow channels) instead of two mostly empty ones: 40 channels
    // fill 48 lanes instead of 64. Forward alone, batch 64, 2 threads, best of 7, alternating
    // processes, us: 24 -> 40 5x5 20x20 3359-3518 -> 2727-2844, 16 -> 48 3x3 16x16 991-1199 ->
    // 878-992, 9 -> 77 5x5 13x13 1216-1467 -> 1040-1164. The same sums: the same bits.
    const int64_t pair = kChannelVectors * kWide, rest = g.o % pair;
    const int64_t paired = g.o > pair && rest > 0 && rest <= kWide ? g.o - rest : g.o;
    forward_channels<T, kVecBytes, kChannelVectors>(input, weight, bias, g, out, argmax, 0, paired);
    if (paired < g.o && rest <= kNarrow)
      forward_channels<T, kNarrowBytes, 1>(input, weight, bias, g, out, argmax, paired, g.o);
    else if (paired < g.o)
      forward_channels<T, kVecBytes, 1>(input, weight, bias, g, out, argmax, paired, g.o);
  } else
    forward_channels<T, kVecBytes, 1>(input, weight, bias, g, out, argmax);
}

// The forward op's work; `codes` false (conv_relu_pool_infer: nothing will be recorded) leaves
// the argmax of layers without pooling unwritten and undefined.
std::tuple<at::Tensor, at::Tensor> forward_op(const at::Tensor& input_, const at::Tensor& weight_,
                                              const std::optional<at::Tensor>& bias_,
                                              at::IntArrayRef stride, at::IntArrayRef padding,
                                              at::IntArrayRef pool_size,
                                              at::IntArrayRef pool_stride, bool codes) {
  const ConvPoolGeometry g =
      conv_pool_geometry(input_, weight_, stride, padding, pool_size, pool_stride);
  check_bias(bias_, input_, g.o);
  check_cpu(input_, "input");
  const SerialBelow serial(g.n * g.o * g.oh * g.ow * g.c * g.kh * g.kw);
  const at::Tensor input = input_.contiguous();
  const at::Tensor weight = weight_.contiguous();
  const at::Tensor bias = bias_.has_value() ? bias_->contiguous() : at::Tensor();
  // No pooling: the fusion saves no multiply-adds, and ATen's convolution (oneDNN) measured
  // faster than the pooling kernels at every such layer of the sweep (benchmarks/results/
  // sweep_cpu.md: 0.27-1.03x of stock's conv + ReLU before, forward alone). Its output becomes
  // ours after ReLU in place; stock's composition writes a second tensor for the ReLU. The
  // tap GEMM beats it where it suits (forward below), flat_forward with few input channels or
  // channel counts off oneDNN's blocks (flat_suits).
  const bool no_pool = windows_are_outputs(g) && g.n > 0 && !tap_gemm_suits(g);
  bool flat = false;
  if (no_pool && flat_suits(g))
    AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "conv_relu_fwd_cpu", [&] {
      flat = span_finite(weight.const_data_ptr<scalar_t>(), weight.numel());  // see flat_suits
    });
  const bool aten_conv = no_pool && !flat;
  at::Tensor argmax;
  if (codes || !(aten_conv || flat)) {
    argmax = cpu::empty_reused({g.n, g.o, g.ph, g.pw}, input.options().dtype(at::kByte));
    maybe_poison(argmax);
  }
  if (aten_conv) {
    at::Tensor out = at::convolution(input, weight, bias, {g.sh, g.sw}, {g.padh, g.padw}, {1, 1},
                                     false, {0, 0}, 1)
                         .contiguous();
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv_relu_fwd_cpu", [&] {
      relu_codes<scalar_t>(out, argmax.defined() ? &argmax : nullptr);
    });
    return {out, argmax};
  }
  at::Tensor out = cpu::empty_reused({g.n, g.o, g.ph, g.pw}, input.options());
  maybe_poison(out);
  if (g.n == 0) return {out, argmax};
  if (flat) {
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv_relu_fwd_cpu", [&] {
      flat_forward<scalar_t>(input, weight, bias, g, out, argmax.defined() ? &argmax : nullptr);
    });
    return {out, argmax};
  }
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv_relu_pool_fwd_cpu",
                             [&] { forward<scalar_t>(input, weight, bias, g, out, argmax); });
  return {out, argmax};
}

std::tuple<at::Tensor, at::Tensor> conv_relu_pool_fwd_cpu(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef pool_size,
    at::IntArrayRef pool_stride) {
  return forward_op(input, weight, bias, stride, padding, pool_size, pool_stride, true);
}

// Without pooling the argmax is as large as a quarter of the output (float32): inference skips
// allocating and writing it. Pooled layers write theirs (a sixteenth of the conv output or less)
// from the same kernels as training.
at::Tensor conv_relu_pool_infer_cpu(const at::Tensor& input, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef pool_size,
                                    at::IntArrayRef pool_stride) {
  return std::get<0>(
      forward_op(input, weight, bias, stride, padding, pool_size, pool_stride, false));
}

ConvPoolGeometry check_backward(const at::Tensor& grad_out, const at::Tensor& argmax,
                                const at::Tensor& input, const at::Tensor& weight,
                                at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef pool_size, at::IntArrayRef pool_stride) {
  const ConvPoolGeometry g = conv_pool_backward_geometry(grad_out, argmax, input, weight, stride,
                                                         padding, pool_size, pool_stride, false);
  check_cpu(input, "input");
  return g;
}

// The input gradient by the flat kernel's transposed conv (flat_grad_input) where the layer
// suits it (flat_grad_input_suits without pooling, flat_pool_grad_input_suits with) and its
// weight is finite (see flat_suits); else undefined.
at::Tensor flat_input_grad(const at::Tensor& go, const at::Tensor& am, const at::Tensor& w,
                           const ConvPoolGeometry& g) {
  at::Tensor grad_input;
  if (!(windows_are_outputs(g) ? flat_grad_input_suits(g) : flat_pool_grad_input_suits(g)))
    return grad_input;
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "flat_input_grad", [&] {
    if (span_finite(w.const_data_ptr<scalar_t>(), w.numel()))
      grad_input = flat_grad_input<scalar_t>(go, am, w, g);
  });
  return grad_input;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_relu_pool_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& argmax, const at::Tensor& input,
    const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef pool_size, at::IntArrayRef pool_stride, bool input_grad, bool weight_grad) {
  const ConvPoolGeometry g =
      check_backward(grad_out, argmax, input, weight, stride, padding, pool_size, pool_stride);
  // The sparse backward's multiply-adds: one patch per pooled output and gradient.
  const SerialBelow serial(g.n * g.o * g.ph * g.pw * g.c * g.kh * g.kw *
                           (int64_t{input_grad} + int64_t{weight_grad}));
  // A gradient not asked for comes back with no elements.
  const auto shape = [](bool wanted, std::vector<int64_t> sizes) {
    return wanted ? sizes : std::vector<int64_t>{0};
  };
  const at::Tensor go = grad_out.contiguous(), am = argmax.contiguous(), x = input.contiguous();
  const at::Tensor w = weight.contiguous();
  if (windows_are_outputs(g)) {
    // No pooling: every conv output passes gradient unless ReLU stops it, so the sparse
    // kernels save no work. The weight gradient of layers with few input channels comes from
    // conv_relu_pool_cpu_nopool.h, the input gradient where flat_grad_input_suits from
    // conv_relu_pool_cpu_nopool_gi.h: both read grad_out and the ReLU codes as they are; the
    // rest from ATen's dense backward (oneDNN) of the masked gradient, the bias gradient then
    // from the masking pass (masked_grad says why).
    // grad_weight is allocated here only for the own kernel; ATen's backward returns its own.
    const bool own_weight = weight_grad && nopool_weight_suits(g);
    at::Tensor grad_weight =
        cpu::empty_reused(shape(own_weight, {g.o, g.c, g.kh, g.kw}), weight.options());
    at::Tensor grad_bias = at::empty(shape(weight_grad, {g.o}), weight.options());
    maybe_poison(grad_weight);
    maybe_poison(grad_bias);
    bool weight_done = false;
    if (own_weight)
      AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv_relu_nopool_bwd_cpu", [&] {
        weight_done = nopool_weight_grad<scalar_t>(go, am, x, g, grad_weight, grad_bias);
      });
    const bool aten_weight = weight_grad && !weight_done;
    const auto none = [&](const at::Tensor& like) { return at::empty({0}, like.options()); };
    at::Tensor grad_input = input_grad ? flat_input_grad(go, am, w, g) : at::Tensor();
    const bool flat_input = grad_input.defined();
    if (!flat_input) grad_input = none(input);
    const bool aten_input = input_grad && !flat_input;
    if (!aten_input && !aten_weight) return {grad_input, grad_weight, grad_bias};
#if defined(__AVX512F__)
    if (aten_weight && input.scalar_type() == at::kFloat &&
        (cl_backward_suits(g) || (flat_input && cl_weight_suits(g)))) {
      auto [gi, gw] = nopool_backward_cl(go, am, x, w, g, aten_input, grad_bias);
      return {aten_input ? gi : grad_input, gw, grad_bias};
    }
#endif
    const at::Tensor masked = masked_grad(go, am, aten_weight ? &grad_bias : nullptr);
    auto [gi, gw, unused] =
        at::convolution_backward(masked, x, w, at::IntArrayRef{g.o}, {g.sh, g.sw}, {g.padh, g.padw},
                                 {1, 1}, false, {0, 0}, 1, {aten_input, aten_weight, false});
    return {aten_input ? gi : grad_input, aten_weight ? gw : grad_weight, grad_bias};
  }
  // The input gradient of few outputs from deep inputs by the flat kernel, dense over the
  // unpooled gradient; the sparse kernels do the rest.
  at::Tensor grad_input = input_grad ? flat_input_grad(go, am, w, g) : at::Tensor();
  const bool flat_input = grad_input.defined();
  if (!flat_input)
    grad_input = cpu::empty_reused(shape(input_grad, {g.n, g.c, g.h, g.w}), input.options());
  at::Tensor grad_weight =
      cpu::empty_reused(shape(weight_grad, {g.o, g.c, g.kh, g.kw}), weight.options());
  at::Tensor grad_bias = at::empty(shape(weight_grad, {g.o}), weight.options());
  if (!flat_input) maybe_poison(grad_input);
  maybe_poison(grad_weight);
  maybe_poison(grad_bias);
  if (flat_input && !weight_grad) return {grad_input, grad_weight, grad_bias};
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv_relu_pool_bwd_cpu", [&] {
    const BwdFallback fallback =
        backward_kernel<scalar_t>(go, am, x, w, g, input_grad && !flat_input, weight_grad,
                                  grad_input, grad_weight, grad_bias);
    if (fallback.input)
      grad_input.copy_(std::get<0>(dense_backward(go, am, x, w, g, {true, false, false})));
    if (fallback.weight) {
      const auto dense = dense_backward(go, am, x, w, g, {false, true, true});
      grad_weight.copy_(std::get<1>(dense));
      grad_bias.copy_(std::get<2>(dense));
    }
  });
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlenet, CPU, m) {
  m.impl("conv_relu_pool_fwd", &conv_relu_pool_fwd_cpu);
  m.impl("conv_relu_pool_bwd", &conv_relu_pool_bwd_cpu);
  m.impl("conv_relu_pool_infer", &conv_relu_pool_infer_cpu);
}

}  // namespace fastlenet
