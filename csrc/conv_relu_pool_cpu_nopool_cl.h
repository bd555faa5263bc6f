// Input and weight gradients of conv2d -> ReLU without pooling (pool_size 1) on the CPU, from
// oneDNN's convolution backward of channels-last operands. Math and saved state:
// fastlenet/reference.py (conv_relu_pool). Computes what ATen's convolution_backward of the
// masked gradient (grad_out where the saved ReLU code passes gradient, else 0) computes, and the
// bias gradient (the masked gradient's sum) from the same pass; float32 on AVX-512 CPUs.
// Saves nothing: it reads what the forward saved (x and the ReLU codes).
//
// Why: oneDNN's backward of NCHW operands (what stock runs, and what the other no-pool layers
// take) measured 1.1-1.6x slower than of channels-last ones (both gradients, batch 64 / 256, 2
// threads, AVX-512 Xeon VM, ms, NCHW -> channels-last): 6 -> 16 5x5 pad 2 16x16 1.11 / 4.35 ->
// 0.74 / 2.71, 13 -> 29 3x3 11x11 0.56 / 2.27 -> 0.43 / 1.42, 128 -> 128 3x3 pad 1 8x8 5.98 /
// 23.4 -> 5.47 / 20.8. The conversions are transposes of each sample's (C, H*W) matrix in 16 x
// 16 blocks in registers; the masking pass writes its output channels-last directly, so only x
// and grad_input take a pass of their own.
#pragma once

#if defined(__AVX512F__)
#include <ATen/ATen.h>
#include <immintrin.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "checks.h"
#include "cpu_parallel.h"
#include "cpu_reuse.h"
#include "cpu_vec.h"

namespace fastlenet::cpu {

// Lane j of the mask set where code a[j] (j < n <= 16) passes gradient: one widening load and
// compare for a whole vector, byte by byte at a row's end.
inline __mmask16 passing_lanes(const uint8_t* a, int n) {
  if (n == 16) {
    const __m512i codes =
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a)));
    return _mm512_cmpneq_epi32_mask(codes, _mm512_set1_epi32(kNoGrad));
  }
  __mmask16 keep = 0;
  for (int j = 0; j < n; ++j) keep |= static_cast<__mmask16>(a[j] != kNoGrad) << j;
  return keep;
}

// dst (cols x rows) = src (rows x cols) transposed, in 16 x 16 blocks (edges by masked loads and
// stores). With codes (rows x cols), a value whose code is kNoGrad becomes 0 (NaN and Inf too,
// as masked_grad), and with sums, sums[r] is row r's sum after masking, added in column order.
inline void transpose_plane(const float* src, int64_t rows, int64_t cols, float* dst,
                            const uint8_t* codes = nullptr, float* sums = nullptr) {
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const int nr = static_cast<int>(std::min<int64_t>(16, rows - r0));
    const auto row_lanes = static_cast<__mmask16>((1u << nr) - 1);
    Float16 acc{};
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      const int nc = static_cast<int>(std::min<int64_t>(16, cols - c0));
      const auto col_lanes = static_cast<__mmask16>((1u << nc) - 1);
      Float16 r[16];
      for (int i = 0; i < 16; ++i) {
        if (i >= nr) {
          r[i] = Float16{};
          continue;
        }
        __mmask16 keep = col_lanes;
        if (codes != nullptr) keep = passing_lanes(codes + (r0 + i) * cols + c0, nc);
        r[i] = Float16(_mm512_maskz_loadu_ps(keep, src + (r0 + i) * cols + c0));
      }
      transpose16(r);
      for (int j = 0; j < nc; ++j) {
        _mm512_mask_storeu_ps(dst + (c0 + j) * rows + r0, row_lanes, r[j]);
        acc += r[j];
      }
    }
    if (sums != nullptr) _mm512_mask_storeu_ps(sums + r0, row_lanes, acc);
  }
}

// Each sample's (C, H, W) planes as (H, W, C): t as a channels-last tensor. With codes, masked as
// in transpose_plane and each sample's channel sums into sums ([N][C]).
inline at::Tensor to_channels_last(const at::Tensor& t, const uint8_t* codes = nullptr,
                                   float* sums = nullptr) {
  at::Tensor d = empty_reused(t.sizes(), t.options(), at::MemoryFormat::ChannelsLast);
  const int64_t c = t.size(1), p = t.size(2) * t.size(3);
  const float* src = t.const_data_ptr<float>();
  float* dst = d.data_ptr<float>();
  cpu::parallel_for(0, t.size(0), 1, [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      transpose_plane(src + i * c * p, c, p, dst + i * c * p, codes ? codes + i * c * p : nullptr,
                      sums ? sums + i * c : nullptr);
  });
  return d;
}

// The inverse: a channels-last tensor's samples as contiguous (C, H, W) planes. ATen's
// backward returns channels-last gradients of channels-last operands (oneDNN's and, with oneDNN
// off, its own); were a backend to return another layout, ATen copies it.
inline at::Tensor from_channels_last(const at::Tensor& t) {
  if (!t.is_contiguous(at::MemoryFormat::ChannelsLast)) return t.contiguous();
  at::Tensor d = empty_reused(t.sizes(), t.options());
  const int64_t c = t.size(1), p = t.size(2) * t.size(3);
  const float* src = t.const_data_ptr<float>();
  float* dst = d.data_ptr<float>();
  cpu::parallel_for(0, t.size(0), 1, [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) transpose_plane(src + i * c * p, p, c, dst + i * c * p);
  });
  return d;
}

// grad_input (undefined unless input_grad) and grad_weight of a layer without pooling, from go,
// the ReLU codes am, x and w (contiguous NCHW float32); grad_bias (O values) written here.
inline std::pair<at::Tensor, at::Tensor> nopool_backward_cl(
    const at::Tensor& go, const at::Tensor& am, const at::Tensor& x, const at::Tensor& w,
    const ConvPoolGeometry& g, bool input_grad, at::Tensor& grad_bias) {
  std::vector<float> sums(g.n * g.o);
  const at::Tensor masked = to_channels_last(go, am.const_data_ptr<uint8_t>(), sums.data());
  auto [gi, gw, unused] = at::convolution_backward(
      masked, to_channels_last(x), w.contiguous(at::MemoryFormat::ChannelsLast),
      at::IntArrayRef{g.o}, {g.sh, g.sw}, {g.padh, g.padw}, {1, 1}, false, {0, 0}, 1,
      {input_grad, true, false});
  float* gb = grad_bias.data_ptr<float>();
  for (int64_t o = 0; o < g.o; ++o) {  // sample by sample, in order: the same for any threads
    float total = 0.0f;
    for (int64_t i = 0; i < g.n; ++i) total += sums[i * g.o + o];
    gb[o] = total;
  }
  return {input_grad ? from_channels_last(gi) : at::Tensor(), gw.contiguous()};
}

}  // namespace fastlenet::cpu
#endif
