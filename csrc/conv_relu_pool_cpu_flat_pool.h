// Forward of conv2d -> ReLU -> max_pool2d on the CPU by the flat conv kernel
// (conv_relu_pool_cpu_nopool_fwd.h) for pooled layers with few output channels and deep inputs
// over large planes (flat_pool_suits), where the fused kernels fill few lanes.
// Math and saved state: fastlenet/reference.py (conv_relu_pool).
// Computes: out and argmax (N, O, PH, PW): each conv plane of one sample (b, then every tap (c,
// kh, kw) in that order, the padding's zeros among them) into flat_conv's stage, then
// relu_pool_plane's max, argmax and ReLU from its rows. Accumulates in the data's own type.
// Saves nothing itself: the caller's op returns argmax, one byte per pooled output, which the
// backward reads.
#pragma once

#include <ATen/ATen.h>

#include "checks.h"
#include "conv_relu_pool_cpu_bwd.h"
#include "conv_relu_pool_cpu_nopool_fwd.h"
#include "conv_relu_pool_cpu_pool.h"
#include "cpu_vec.h"

namespace fastlenet::cpu {

// Pooled layers with at most a vector of float output channels (kVecBytes / 4) from at least
// kFlatPoolMinChannels inputs (the layers the tap GEMM and ATen's convolution took) that take
// flat_pool_forward: stride 1, at most kFlatMaxChannels inputs and kFlatMaxTaps taps, at least
// kFlatPoolMinPixels conv outputs per plane, and 3x3 kernels or fewer outputs than oneDNN's
// block (kDnnBlock). Measured (forward alone under no_grad, 2 threads, Xeon VM (AVX-512), one
// process, us, previous path -> flat, batch 64 / 256): tap GEMM: 64 -> 6 3x3 pad 1 16x16 552 ->
// 479 / 2405 -> 2052, 32 -> 8 3x3 pad 1 24x24 916 -> 740 / 4023 -> 3098, 32 -> 8 3x3 pad 1 14x14
// 377 -> 270 / 1684 -> 1168, 64 -> 6 5x5 20x20 1784 -> 1125 / 7195 -> 4416, 128 -> 6 3x3 pad 1
// 32x32 3452 -> 3484 / 17372 -> 16170, 64 -> 6 3x3 pad 1 12x12 pool 3 362 -> 340 / 1366 -> 1301;
// ATen's convolution: 64 -> 10 3x3 16x16 1166 -> 710 / 4030 -> 2950, 64 -> 16 3x3 pad 1 16x16
// 1303 -> 1092 / 5082 -> 4416, 48 -> 16 3x3 pad 1 16x16 1165 -> 866 / 5256 -> 3448; 5x5 kernels
// with 9-15 outputs (with the blocks of 5 and 7 outputs of flat_conv; each pair twice in one
// process): 64 -> 10 5x5 20x20 2832-2881 -> 1664-1709 / 10241-10592 -> 5938-6028, 32 -> 10 5x5
// pad 2 20x20 2039-2059 -> 1406-1542 / 7003-7135 -> 5379-5477, 48 -> 9 5x5 pad 2 16x16 1725-1816
// -> 1161-1184 / 7014-7017 -> 4946-4983, 32 -> 12 5x5 pad 2 20x20 1935-1990 -> 1657-1681 /
// 7209-7384 -> 6664-6867 (2116 -> 2829 / 8556 -> 7796 in an earlier measurement), 32 -> 12 5x5
// pad 2 14x14 962-1044 -> 769-872, 64 -> 14 5x5 16x16 1620-1688 -> 1460-1493 / 6711-7008 ->
// 5567-6097. Left: small planes (the K - 1 positions past each conv row and the plane's last
// vector weigh more): 128 -> 6 3x3 pad 1 8x8 229 -> 311 / 1077 -> 1275, 128 -> 16 8x8 699 -> 670
// / 2362 -> 2803, 32 -> 5 3x3 pad 1 9x9 117 -> 112 / 422 -> 442; 5x5 kernels with 16 outputs,
// which fill oneDNN's blocks: 32 -> 16 5x5 pad 2 20x20 1886-1906 -> 1968-2010 / 7679-7948 ->
// 8056-8827, 32 -> 16 5x5 16x16 926-930 -> 836-840 / 3236-3351 -> 3239-3287, 48 -> 16 5x5 pad 2
// 16x16 1705-1872 -> 1581-1596 / 6837-6863 -> 6655-6703, 128 -> 16 5x5 pad 2 16x16 4267-4487 ->
// 4153-4235.
constexpr int64_t kFlatPoolMinChannels = 32;
constexpr int64_t kFlatPoolMinPixels = 144;  // 12x12 conv outputs

inline bool flat_pool_suits(const ConvPoolGeometry& g) {
  return !windows_are_outputs(g) && g.sh == 1 && g.sw == 1 && g.o <= kVecBytes / 4 &&
         g.c >= kFlatPoolMinChannels && g.c <= kFlatMaxChannels && g.kh * g.kw <= kFlatMaxTaps &&
         g.oh * g.ow >= kFlatPoolMinPixels && (g.kh * g.kw <= 9 || g.o < kDnnBlock);
}

// The caller requires a finite weight, as for flat_forward: the padding's zeros times Inf would
// be NaN where stock's convolution, which skips the padding, has none.
template <typename T>
void flat_pool_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                       const ConvPoolGeometry& g, at::Tensor& out, at::Tensor& argmax) {
  T* y = out.data_ptr<T>();
  uint8_t* am = argmax.data_ptr<uint8_t>();
  const int64_t outplane = g.ph * g.pw;
  flat_conv_input<T>(input, weight, bias, g, [&](int64_t n, int64_t o, const T* st, int64_t pitch) {
    const int64_t at = (n * g.o + o) * outplane;
    relu_pool_plane(st, pitch, g, y + at, am + at);
  });
}

}  // namespace fastlenet::cpu
