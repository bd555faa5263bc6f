// Input gradient of conv2d -> ReLU without pooling (pool_size 1) on the CPU, by the flat conv
// kernel of the forward (conv_relu_pool_cpu_nopool_fwd.h), and of pooled layers with few output
// channels from deep inputs (flat_pool_grad_input_suits). Math and saved state:
// fastlenet/reference.py (conv_relu_pool).
// Computes: grad_x[n][c][y][x] = sum over o, kh, kw of gm[n][o][y + padh - kh][x + padw - kw] *
// w[o][c][kh][kw] (terms outside gm dropped), where gm is grad_out where the saved ReLU code
// passes gradient, else 0 (pooled: each window's gradient at its argmax, zeros elsewhere): the
// stride-1 conv of gm, zero-padded by K - 1 - pad, with the weight transposed (C outputs from O
// inputs) and flipped. Accumulates in the data's own type (float32 or float64): each value is
// the sum of its taps (o, then kh and kw descending) in that order, whatever the threads.
// Saves nothing: it reads what the forward saved (the ReLU codes) and the weight.
//
// Why: oneDNN's backward of the input (stock's, and what these layers took before) pads the
// input channels to its blocks of 16: with few of them it ran at 120-170 GFLOP/s (6 -> 16 3x3
// 30x30 and 5x5 pad 2 16x16, batch 64), this kernel at 310-450; and on its blocks over large
// planes its one call for both gradients took longer than its weight gradient alone and this
// kernel (flat_grad_input_suits has the shapes). gm is masked as each sample is copied into the
// kernel's padded buffer: no tensor the size of the conv output is written for it.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "checks.h"
#include "conv_relu_pool_cpu_bwd.h"
#include "conv_relu_pool_cpu_nopool_fwd.h"
#include "cpu_reuse.h"
#include "cpu_vec.h"

namespace fastlenet::cpu {

// The conv whose output is the input gradient of g (stride 1, pool 1): C outputs of H x W from
// gm's O planes of OH x OW, padded by K - 1 - pad.
inline ConvPoolGeometry transposed_conv(const ConvPoolGeometry& g) {
  ConvPoolGeometry t = g;
  t.c = g.o, t.h = g.oh, t.w = g.ow;
  t.o = g.c, t.oh = g.h, t.ow = g.w;
  t.padh = g.kh - 1 - g.padh, t.padw = g.kw - 1 - g.padw;
  t.poolh = t.poolw = t.psh = t.psw = 1;
  t.ph = t.oh, t.pw = t.ow;
  return t;
}

// Layers whose input gradient flat_grad_input computes (the caller also requires a finite
// weight, as flat_forward's): stride 1 without pooling, padding below the kernel size (the
// transposed conv's padding is then not negative), within flat_suits' channels and taps, a
// padded plane of at most kFlatGradInputMaxWaste times the conv's outputs (the kernel multiplies
// the K - 1 - pad rows and columns of zeros around gm; oneDNN skips them), and either at most
// kFlatGradInputMaxChannels input channels, or channel counts on oneDNN's blocks over input
// planes of at least kFlatLargePlane values: there the weight gradient comes from oneDNN's NCHW
// backward (cl_backward_suits in conv_relu_pool_cpu.cpp), whose call for both gradients took
// 1.1-2x as long as its weight gradient alone and flat's input gradient (the spread of the
// "before" figures below is that call's: its time moves with the allocator's state). Measured (the
// op's backward, the gradients each layer asks for: input, and weight and bias where
// nopool_weight_suits does not take them; 2 threads, Zen 5 VM (AVX-512), processes alternating with
// ATen's input gradient, us, ATen's -> flat): batch 64: 6 -> 16 3x3 30x30 1208-1287 -> 731-769, 6
// -> 16 5x5 pad 2 16x16 725-742 -> 436-453, 8 -> 16 3x3 pad 1 28x28 1224-1298 -> 886-907, 3 -> 16
// 3x3 pad 1 32x32 1265-1361 -> 493-506, 1 -> 6 5x5 pad 2 28x28 1859-1916 -> 299-359, 6 -> 16 5x5
// 16x16 (waste 1.78) 701-1244 -> 443-475; batch 256: 6 -> 16 3x3 30x30 6329-6629 -> 3744-4099, 3 ->
// 16 16695-16762 -> 3650-3858, 1 -> 32 3x3 28x28 8528-8680 -> 3761-4724; batch 1: 1 -> 6 5x5 pad 2
// 28x28 72-79 -> 14-15. On the blocks over large planes, batch 64 (/ 256): 32 -> 32 3x3 pad 1 32x32
// 18847-19604 -> 8428-9061 (80311-92746 -> 49554-52645), 32 -> 32 3x3 pad 1 30x30 7376-8924 ->
// 7328-7974, 16 -> 32 5x5 pad 2 30x30 9114-9894 -> 8391-8946 (36456-57808 -> 33624-34102), 32 -> 48
// 3x3 pad 1 30x30 12258-14145 -> 10402-10816 (84945-95425 -> 55417-55620), 64 -> 64 3x3 pad 1 32x32
// 41809-50259 -> 35779-37120, 16 -> 16 3x3 pad 1 30x30 1880-2489 -> 1967-2110. Not taken:
// 8 -> 40 5x5 12x12 (waste 2.25) 5078-5312 -> 5482-5514 at batch 256; with more input channels
// oneDNN's channels-last backward (cl_backward_suits) computes the input gradient at 300-400
// GFLOP/s: flat's input gradient and its weight gradient alone against both from it, one
// process, 10 -> 20 3x3 pad 1 16x16 0.98x, 12 -> 24 3x3 pad 1 24x24 1.04x, 13 -> 29 3x3 11x11
// 1.08x, 16 -> 16 3x3 pad 1 24x24 1.21x, 24 -> 40 5x5 20x20 1.13x, 37 -> 77 5x5 pad 2 12x12
// 1.19x; on the blocks over smaller planes (oneDNN's NCHW backward) 16 -> 16 3x3 pad 1 24x24
// 1.13x (the forward's rule, flat_suits of the transposed conv, would take these).
constexpr int64_t kFlatGradInputMaxChannels = 8;  // one register block of flat_conv's outputs
constexpr int64_t kFlatGradInputMaxWaste = 2;

inline bool flat_grad_input_suits(const ConvPoolGeometry& g) {
  const bool large = on_dnn_blocks(g) && g.h * g.w >= kFlatLargePlane;
  return g.sh == 1 && g.sw == 1 && g.padh < g.kh && g.padw < g.kw &&
         (g.c <= kFlatGradInputMaxChannels || large) &&
         g.h * g.w <= kFlatGradInputMaxWaste * g.oh * g.ow && flat_suits(transposed_conv(g));
}

// Pooled layers whose input gradient flat_grad_input computes from the unpooled gradient (the
// caller also requires a finite weight) rather than the sparse backward's wide grad_x
// (conv_relu_pool_cpu_bwd_wide.h), which visits only the argmax positions but, with few output
// channels, adds few products per read-modify-write of a patch: pools of 2 at stride 2, stride-1
// 3x3 kernels, at most kFlatGradPoolMaxOut outputs from at least kFlatGradPoolMinChannels inputs,
// samples of at least kFlatGradPoolMinSample values. The dense conv does 4x the multiply-adds.
// Measured (input gradient alone, 2 threads, Xeon VM, alternating in one process, us, sparse ->
// flat, batch 64): 128 -> 6 pad 1 32x32 5596 -> 3935 (batch 256 27867 -> 21772), 64 -> 10 pad 1
// 16x16 1020 -> 780 (batch 256 3789 -> 3330), 64 -> 6 pad 1 16x16 691 -> 555, 32 -> 8 pad 1 24x24
// 1041 -> 873, 128 -> 6 pad 1 8x8 420 -> 348; not taken: 16 outputs (32 -> 16, 48 -> 16 and 64 ->
// 16 pad 1 16x16 453 -> 644, 691 -> 851, 823 -> 1148), fewer inputs (10 -> 22 pad 1 20x20 345 ->
// 669, 16 -> 16 pad 1 24x24 833 -> 1560, 6 -> 16 5x5 14x14 93 -> 256), small samples (32 -> 5 pad
// 1 9x9 102 -> 113), 5x5 kernels (64 -> 6 20x20 1695 -> 1881), pools of 3 (64 -> 6 pad 1 12x12
// 297 -> 349).
constexpr int64_t kFlatGradPoolMaxOut = 10;
constexpr int64_t kFlatGradPoolMinChannels = 32;
constexpr int64_t kFlatGradPoolMinSample = 8192;  // 32 channels of 16x16

inline bool flat_pool_grad_input_suits(const ConvPoolGeometry& g) {
  return g.sh == 1 && g.sw == 1 && g.kh == 3 && g.kw == 3 && g.padh < g.kh && g.padw < g.kw &&
         g.poolh == 2 && g.poolw == 2 && g.psh == 2 && g.psw == 2 && g.o <= kFlatGradPoolMaxOut &&
         g.c >= kFlatGradPoolMinChannels && g.c * g.h * g.w >= kFlatGradPoolMinSample &&
         flat_suits(transposed_conv(g));
}

// src where codes pass gradient, else 0 (NaN and Inf too, as masked_grad), into dst: n values.
// Each vector a whole load and'ed with the lane mask: a select (or the and alone) compiles to a
// load masked by the codes' compare, which then waits for the codes before it reads src; both
// stream from memory here, and the two misses no longer overlapped (perf: 61% of the copy's
// time on that load, 18% of the op's). The asm keeps the load whole. Input gradient alone, 2
// threads, processes alternating, us, batch 256: 32 -> 32 3x3 pad 1 32x32 13484-13742 ->
// 12396-12513, 6 -> 16 3x3 30x30 1547-1550 -> 1479-1492, 3 -> 16 3x3 pad 1 32x32 1267-1645 ->
// 1103-1110 (batch 64: within the noise). The masking passes before ATen's backward
// (masked_planes, transpose_plane) measured no faster so (both gradients: 16 -> 32 3x3 pad 1
// 16x16, 13 -> 29 3x3 11x11, 128 -> 128 3x3 pad 1 8x8).
template <typename T>
void copy_row_masked(T* dst, const T* src, const uint8_t* codes, int64_t n) {
  using V = typename VecOf<T, kVecBytes>::type;
  using M = typename VecOf<T, kVecBytes>::mask;
  constexpr int VW = VecOf<T, kVecBytes>::kLanes;
  int64_t i = 0;
  for (; i + VW <= n; i += VW) {
    V v = load<V>(src + i);
    asm("" : "+v"(v));
    store(dst + i, reinterpret_cast<V>(reinterpret_cast<M>(v) & passes_gradient<T>(codes + i)));
  }
  for (; i < n; ++i) dst[i] = keep_or_zero(codes[i] != kNoGrad, src[i]);
}

// gm of one pooled plane into dst (OH rows of OW, `pitch` apart): zeros, and each window's
// gradient (go, PH x PW) added at its argmax (am) unless its code stops it; overlapping windows
// that chose the same position add both, as max_pool2d's backward does.
template <typename T>
void unpool_plane(T* dst, int64_t pitch, const T* go, const uint8_t* am,
                  const ConvPoolGeometry& g) {
  for (int64_t y = 0; y < g.oh; ++y) std::fill_n(dst + y * pitch, g.ow, T(0));
  for (int64_t ph = 0; ph < g.ph; ++ph)
    for (int64_t pw = 0; pw < g.pw; ++pw) {
      const uint8_t q = am[ph * g.pw + pw];
      if (q == kNoGrad) continue;
      dst[(ph * g.psh + q / g.poolw) * pitch + pw * g.psw + q % g.poolw] += go[ph * g.pw + pw];
    }
}

// grad_input (N, C, H, W) of a layer for which flat_grad_input_suits or
// flat_pool_grad_input_suits, from grad_out and the argmax codes (N, O, PH, PW) and the weight
// (O, C, KH, KW), all contiguous.
template <typename T>
at::Tensor flat_grad_input(const at::Tensor& grad_out, const at::Tensor& argmax,
                           const at::Tensor& weight, const ConvPoolGeometry& g) {
  const ConvPoolGeometry t = transposed_conv(g);
  at::Tensor grad_input = empty_reused({g.n, g.c, g.h, g.w}, grad_out.options());
  maybe_poison(grad_input);
  const int64_t taps = g.kh * g.kw;
  AlignedVector<T> wt(g.c * g.o * taps);  // [C][O][KH][KW], each kernel flipped
  const T* w = weight.const_data_ptr<T>();
  for (int64_t o = 0; o < g.o; ++o)
    for (int64_t c = 0; c < g.c; ++c)
      for (int64_t k = 0; k < taps; ++k)
        wt[(c * g.o + o) * taps + taps - 1 - k] = w[(o * g.c + c) * taps + k];
  const T* go = grad_out.const_data_ptr<T>();
  const uint8_t* am = argmax.const_data_ptr<uint8_t>();
  T* gi = grad_input.data_ptr<T>();
  const bool pooled = !windows_are_outputs(g);
  const int64_t gplane = g.ph * g.pw, iplane = g.h * g.w;
  const int64_t wp = t.w + 2 * t.padw, plane = (t.h + 2 * t.padh) * wp;
  flat_conv<T>(
      t, wt.data(), nullptr,
      [&](int64_t n, T* xp) {
        if (pooled) {
          for (int64_t o = 0; o < g.o; ++o) {
            const int64_t at = (n * g.o + o) * gplane;
            unpool_plane(xp + o * plane + t.padh * wp + t.padw, wp, go + at, am + at, g);
          }
          return;
        }
        for (int64_t o = 0; o < g.o; ++o)
          for (int64_t y = 0; y < g.oh; ++y) {
            const int64_t at = (n * g.o + o) * gplane + y * g.ow;
            copy_row_masked(xp + o * plane + (y + t.padh) * wp + t.padw, go + at, am + at, g.ow);
          }
      },
      [&](int64_t n, int64_t c, const T* st, int64_t pitch) {
        T* dst = gi + (n * g.c + c) * iplane;
        for (int64_t y = 0; y < g.h; ++y) copy_row(dst + y * g.w, st + y * pitch, g.w);
      });
  return grad_input;
}

}  // namespace fastlenet::cpu
