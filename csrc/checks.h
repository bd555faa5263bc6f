// Argument checks shared by every fastlenet kernel binding (the Python side has its own, in
// fastlenet/_checks.py). Each TORCH_CHECK names the argument and what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>

namespace fastlenet {

// Window positions are stored in one byte; this value means "no gradient flows".
constexpr uint8_t kNoGrad = 255;
// Windows per block of the backward's vector-built tables and lists (stack_table,
// window_lists_vec): one vector of 16 int32 lanes. A block's codes index a 16-entry table of
// window positions by their low 4 bits, so kNoGrad reads entry 15 (masked out by the caller).
constexpr int kWindowBlock = 16;

// Largest padding accepted: a plane padded by more than this (over 2^42 elements) could never
// be allocated, and the bound keeps every size product of the kernels far from int64 overflow.
constexpr int64_t kMaxPadding = int64_t{1} << 20;

// Whether stock's convolution lays out its output and gradients channels_last for `t` as an
// input or weight: ATen's own reading of its strides (fastlenet/_checks.py, channels_last, writes
// the same rule out for the other backends). A tensor can be contiguous and still read so: one
// input channel converted with .to(memory_format=torch.channels_last).
inline bool suggests_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && t.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

// FASTLENET_POISON=1 (set by the test suite) fills every output with garbage before a kernel
// writes it, so an element a kernel forgets to write shows up as a mismatch, not as a stale 0.
inline bool poison_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("FASTLENET_POISON");
    return v != nullptr && v[0] == '1';
  }();
  return on;
}

inline void maybe_poison(at::Tensor& t) {
  if (!poison_enabled()) return;
  if (t.is_floating_point())
    t.fill_(std::numeric_limits<double>::quiet_NaN());
  else
    t.fill_(0xAB);  // not a window position of a small pool, and not kNoGrad
}

// Geometry of conv2d -> ReLU -> max_pool2d on NCHW input.
struct ConvPoolGeometry {
  int64_t n, c, h, w;          // input
  int64_t o, kh, kw;           // weight (O, C, KH, KW)
  int64_t sh, sw, padh, padw;  // conv stride and padding
  int64_t oh, ow;              // conv output
  int64_t poolh, poolw, psh, psw;
  int64_t ph, pw;  // pooled output
};

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              " must be float32 or float64, got ", t.scalar_type());
}

// The CUDA kernels also take float16 and bfloat16 (accumulating in float32).
inline void check_float(const at::Tensor& t, const char* name, bool reduced_precision) {
  if (!reduced_precision) return check_float(t, name);
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, name,
              " must be float32, float64, float16 or bfloat16, got ", s);
}

inline void check_like(const at::Tensor& t, const at::Tensor& input, const char* name) {
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), name, " has dtype ", t.scalar_type(),
              " but input has dtype ", input.scalar_type());
  TORCH_CHECK(t.device() == input.device(), name, " is on ", t.device(), " but input is on ",
              input.device());
}

inline ConvPoolGeometry conv_pool_geometry(const at::Tensor& input, const at::Tensor& weight,
                                           at::IntArrayRef stride, at::IntArrayRef padding,
                                           at::IntArrayRef pool_size, at::IntArrayRef pool_stride,
                                           bool reduced_precision = false) {
  TORCH_CHECK(input.dim() == 4, "input must be 4-D (N, C, H, W), got ", input.dim(), "-D");
  TORCH_CHECK(weight.dim() == 4, "weight must be 4-D (O, C, KH, KW), got ", weight.dim(), "-D");
  check_float(input, "input", reduced_precision);
  check_like(weight, input, "weight");
  TORCH_CHECK(
      stride.size() == 2 && padding.size() == 2 && pool_size.size() == 2 && pool_stride.size() == 2,
      "stride, padding, pool_size and pool_stride must each have 2 values");
  ConvPoolGeometry g{};
  g.n = input.size(0);
  g.c = input.size(1);
  g.h = input.size(2);
  g.w = input.size(3);
  g.o = weight.size(0);
  g.kh = weight.size(2);
  g.kw = weight.size(3);
  TORCH_CHECK(weight.size(1) == g.c, "input has ", g.c, " channels but weight expects ",
              weight.size(1));
  TORCH_CHECK(g.o >= 1 && g.c >= 1 && g.kh >= 1 && g.kw >= 1,
              "weight must have no zero-size dimension, got ", weight.sizes());
  g.sh = stride[0];
  g.sw = stride[1];
  g.padh = padding[0];
  g.padw = padding[1];
  g.poolh = pool_size[0];
  g.poolw = pool_size[1];
  g.psh = pool_stride[0];
  g.psw = pool_stride[1];
  TORCH_CHECK(g.sh >= 1 && g.sw >= 1, "stride must be >= 1, got ", stride);
  TORCH_CHECK(g.padh >= 0 && g.padw >= 0, "padding must be >= 0, got ", padding);
  TORCH_CHECK(g.padh <= kMaxPadding && g.padw <= kMaxPadding, "padding must be at most ",
              kMaxPadding, ", got ", padding);
  TORCH_CHECK(g.poolh >= 1 && g.poolw >= 1, "pool_size must be >= 1, got ", pool_size);
  // Each side is bounded first, so that the product cannot overflow.
  TORCH_CHECK(g.poolh <= kNoGrad && g.poolw <= kNoGrad && g.poolh * g.poolw <= kNoGrad,
              "pool_size must have at most ", int(kNoGrad), " positions, got ", pool_size);
  TORCH_CHECK(g.psh >= 1 && g.psw >= 1, "pool_stride must be >= 1, got ", pool_stride);
  g.oh = (g.h + 2 * g.padh - g.kh) / g.sh + 1;
  g.ow = (g.w + 2 * g.padw - g.kw) / g.sw + 1;
  TORCH_CHECK(g.h + 2 * g.padh >= g.kh && g.w + 2 * g.padw >= g.kw, "input of size (", g.h, ", ",
              g.w, ") with padding ", padding, " is smaller than the kernel (", g.kh, ", ", g.kw,
              ")");
  TORCH_CHECK(g.oh >= g.poolh && g.ow >= g.poolw, "convolution output (", g.oh, ", ", g.ow,
              ") is smaller than the pooling window ", pool_size);
  g.ph = (g.oh - g.poolh) / g.psh + 1;
  g.pw = (g.ow - g.poolw) / g.psw + 1;
  return g;
}

inline void check_bias(const std::optional<at::Tensor>& bias, const at::Tensor& input,
                       int64_t out_features) {
  if (!bias.has_value()) return;
  check_like(*bias, input, "bias");
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features, "bias must have shape (",
              out_features, "), got ", bias->sizes());
}

// The backward kernels index the conv output with each argmax byte: a byte that is neither a
// window position nor kNoGrad would make them read and write out of bounds. One pass over one
// byte per pooled output; CPU tensors only (on a GPU the check would cost a device sync, so the
// CUDA kernels must skip such bytes themselves).
inline void check_argmax_values(const at::Tensor& argmax, const ConvPoolGeometry& g) {
  if (!argmax.device().is_cpu()) return;
  const at::Tensor am = argmax.contiguous();
  const uint8_t* p = am.const_data_ptr<uint8_t>();
  const int64_t positions = g.poolh * g.poolw;
  const uint8_t* end = p + am.numel();
  // A branch-free pass on bytes first (it vectorises: 32 codes per compare with AVX2); the
  // search for the culprit only on failure. A window of 255 or more positions has no bad code.
  const uint8_t limit = static_cast<uint8_t>(std::min<int64_t>(positions, kNoGrad));
  uint8_t any_bad = 0;
  for (const uint8_t* q = p; q < end; ++q) any_bad |= (*q != kNoGrad) & (*q >= limit);
  const uint8_t* bad =
      any_bad ? std::find_if(p, end, [&](uint8_t q) { return q != kNoGrad && q >= positions; })
              : end;
  TORCH_CHECK(bad == end, "argmax holds ", int(bad == end ? 0 : *bad), " at flat index ", bad - p,
              " but a pooling window has ", positions, " positions (", int(kNoGrad),
              " means no gradient)");
}

// grad_out and argmax of the backward ops: shaped like the pooled output.
inline void check_pooled_grad(const at::Tensor& grad_out, const at::Tensor& argmax,
                              const at::Tensor& input, const ConvPoolGeometry& g) {
  check_like(grad_out, input, "grad_out");
  const std::vector<int64_t> shape{g.n, g.o, g.ph, g.pw};
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(shape), "grad_out must have shape ",
              at::IntArrayRef(shape), ", got ", grad_out.sizes());
  TORCH_CHECK(argmax.scalar_type() == at::kByte, "argmax must be uint8, got ",
              argmax.scalar_type());
  TORCH_CHECK(argmax.device() == input.device(), "argmax is on ", argmax.device(),
              " but input is on ", input.device());
  TORCH_CHECK(argmax.sizes() == at::IntArrayRef(shape), "argmax must have shape ",
              at::IntArrayRef(shape), ", got ", argmax.sizes());
  check_argmax_values(argmax, g);
}

// Linear: input (B, in), weight (out, in).
inline void check_linear(const at::Tensor& input, const at::Tensor& weight,
                         bool reduced_precision = false) {
  TORCH_CHECK(input.dim() == 2, "input must be 2-D (batch, in_features), got ", input.dim(), "-D");
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D (out_features, in_features), got ",
              weight.dim(), "-D");
  check_float(input, "input", reduced_precision);
  check_like(weight, input, "weight");
  TORCH_CHECK(input.size(1) == weight.size(1), "input has ", input.size(1),
              " features but weight expects ", weight.size(1));
}

// The backward ops' geometry, grad_out and argmax checks (the device check is the caller's).
inline ConvPoolGeometry conv_pool_backward_geometry(
    const at::Tensor& grad_out, const at::Tensor& argmax, const at::Tensor& input,
    const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef pool_size, at::IntArrayRef pool_stride, bool reduced_precision = false) {
  const ConvPoolGeometry g =
      conv_pool_geometry(input, weight, stride, padding, pool_size, pool_stride, reduced_precision);
  check_pooled_grad(grad_out, argmax, input, g);
  return g;
}

// linear_relu_bwd's grad_out (B, O) and, with ReLU, out (B, O).
inline void check_linear_grad(const at::Tensor& grad_out, const at::Tensor& out,
                              const at::Tensor& input, const at::Tensor& weight, bool relu) {
  const int64_t rows = input.size(0), cols = weight.size(0);
  check_like(grad_out, input, "grad_out");
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == rows && grad_out.size(1) == cols,
              "grad_out must have shape (", rows, ", ", cols, "), got ", grad_out.sizes());
  if (relu) {
    check_like(out, input, "out");
    TORCH_CHECK(out.sizes() == grad_out.sizes(), "out must have shape ", grad_out.sizes(), ", got ",
                out.sizes());
  }
}

}  // namespace fastlenet
