// ReLU -> max_pool2d -> argmax of a conv output on the CPU for layers with few output channels
// and many input channels, where the fused kernels fill few lanes, or deep patches over few conv
// outputs, where oneDNN runs nearer the FMA peak (conv_relu_pool_cpu.cpp chooses;
// conv_relu_pool_cpu_fwd.h has the fused ones): relu_pool (relu_pool_cl for channels-last) after
// ATen's convolution (oneDNN), or tap_gemm_forward, whose GEMM (tap_gemm, register-blocked)
// gives each tap's contribution at every pixel and whose pass sums the shifted taps per conv
// plane before pooling it.
// Math and saved state: fastlenet/reference.py (conv_relu_pool).
// Computes:
// - relu_pool: out and argmax (N, O, PH, PW) from the conv output y (N, O, OH, OW), contiguous,
//   with max_pool2d's rule (the first strictly larger value or a NaN takes the window) and ReLU
//   after it (argmax kNoGrad where the max is <= 0); relu_pool_cl the same from a channels-last
//   y (N, OH, OW, O);
// - relu_codes, without pooling (every conv output a window of its own): ReLU in place on y,
//   which becomes the output, and argmax 0 or kNoGrad per output (no argmax for inference);
//   relu_codes_span the same over a span (flat_forward's conv rows too).
// Saves nothing itself: the caller's op returns argmax, one byte per pooled output, which the
// backward reads.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "checks.h"
#include "cpu_parallel.h"
#include "cpu_vec.h"

namespace fastlenet::cpu {

// Output planes per task of relu_pool: a few keep the tasks' overhead small next to their work.
constexpr int64_t kPoolGrain = 4;

// VW values at p, p + 2, ..., p + 2 * (VW - 1) (p[0 .. 2 * VW) readable): two loads and a
// shuffle.
template <typename V, size_t... I>
inline V every_other(const typename std::remove_cvref_t<decltype(V{}[0])>* p,
                     std::index_sequence<I...>) {
  constexpr size_t VW = sizeof...(I);
  const V a = load<V>(p), b = load<V>(p + VW);
  return __builtin_shufflevector(a, b, (2 * I)...);
}

// One vector of pooling windows: the running max and its window position q = i * poolw + j
// under max_pool2d's rule (the first value takes the window, then a strictly larger value or a
// NaN replaces the max), and the ReLU of the max with its argmax code (kNoGrad where ReLU
// passes no gradient; a NaN max passes it).
template <typename T>
struct WindowMax {
  using Vec = VecOf<T, kVecBytes>;
  using V = typename Vec::type;
  using M = typename Vec::mask;
  using MI = typename Vec::mask_int;
  V best{};
  M pos{};
  void take(V v, int64_t q) {
    if (q == 0) {
      best = v;
      return;
    }
    const M larger = (v > best) | (v != v);
    best = larger ? v : best;
    pos = larger ? M{} + static_cast<MI>(q) : pos;
  }
  M dead() const { return best <= V{}; }
  V relu() const { return dead() ? V{} : best; }
  M codes() const { return dead() ? M{} + static_cast<MI>(kNoGrad) : pos; }
};

// Scratch of relu_pool_plane: one pooled row's conv rows with a tail (rowlen values each).
inline int64_t relu_pool_rowlen(const ConvPoolGeometry& g, int vw) {
  const int64_t blocks = (g.pw + vw - 1) / vw;
  return blocks * vw * g.psw + g.poolw + 2 * vw;
}

// relu_pool_plane for 2 x 2 windows of stride 2 (nearly every pooled layer), read in place: per
// VW pooled columns of a pooled row, each of its two conv rows is two vectors (the tail's lanes
// past OW masked) split into even and odd columns, taken in relu_pool_plane's window order; the
// results by masked stores. The same values and codes (bit for bit). The generic loop below
// copies every conv row into its scratch and stores lane by lane: 9.4% of wide-in-16x16's
// inference (64 -> 10 3x3 pad 1 16x16 pool 2, batch 64, perf). Inference, 2 threads, Xeon VM,
// alternating in one process, us, generic -> this, batch 64 / 256: 64 -> 10 3x3 pad 1 16x16
// 849-874 -> 753-757 / 3032-3082 -> 2816-2857, 128 -> 6 3x3 pad 1 32x32 3839-3921 -> 3720-3789
// / 16497-17139 -> 16289-16459, 32 -> 8 3x3 pad 1 24x24 774-788 -> 704-717 / 2883-2952 ->
// 2570-2613, 64 -> 6 3x3 pad 1 12x12 335-338 -> 316-321 (the flat kernel's conv planes).
template <typename T, size_t... I>
void relu_pool_plane_2x2(const T* y, int64_t pitch, const ConvPoolGeometry& g, T* outp,
                         uint8_t* amp, std::index_sequence<I...>) {
  using Vec = VecOf<T, kVecBytes>;
  using V = typename Vec::type;
  constexpr int VW = Vec::kLanes;
  for (int64_t ph = 0; ph < g.ph; ++ph)
    for (int64_t p0 = 0; p0 < g.pw; p0 += VW) {
      const int lanes = static_cast<int>(std::min<int64_t>(VW, g.pw - p0));
      const int64_t x0 = 2 * p0;                                  // the block's first conv column
      const int64_t cols = std::min<int64_t>(2 * VW, g.ow - x0);  // readable from x0
      WindowMax<T> win;
      for (int i = 0; i < 2; ++i) {
        const T* r = y + (2 * ph + i) * pitch + x0;
        V a, b;
        if (cols == 2 * VW) {
          a = load<V>(r);
          b = load<V>(r + VW);
        } else {
          a = load_lanes<V>(r, 0, static_cast<int>(std::min<int64_t>(VW, cols)));
          b = cols > VW ? load_lanes<V>(r + VW, 0, static_cast<int>(cols - VW)) : V{};
        }
        win.take(__builtin_shufflevector(a, b, (2 * I)...), 2 * i);
        win.take(__builtin_shufflevector(a, b, (2 * I + 1)...), 2 * i + 1);
      }
      const int64_t at = ph * g.pw + p0;
      store_lanes(outp + at, win.relu(), lanes);
      store_bytes<VW>(amp + at, low_bytes(win.codes()), lanes);
    }
}

// One output plane: y is the conv plane (OH rows of OW, `pitch` apart), out and am the pooled
// plane (PH, PW). Pools of 2 with stride 2 read y in place (relu_pool_plane_2x2); the others copy
// each pooled row's conv rows into the thread's scratch (poolh * relu_pool_rowlen values), whose
// tails past OW reach only lanes past the pooled row, which are not stored.
template <typename T>
void relu_pool_plane(const T* y, int64_t pitch, const ConvPoolGeometry& g, T* outp, uint8_t* amp) {
  using Vec = VecOf<T, kVecBytes>;
  using V = typename Vec::type;
  constexpr int VW = Vec::kLanes;
  if (g.poolh == 2 && g.poolw == 2 && g.psh == 2 && g.psw == 2)
    return relu_pool_plane_2x2(y, pitch, g, outp, amp, std::make_index_sequence<VW>{});
  const int64_t blocks = (g.pw + VW - 1) / VW;
  // A window row's inputs for VW pooled columns: contiguous loads every other element where the
  // pool's column stride is 2 (2 x 2 pools of stride 2 excepted: they read in place above), lane
  // by lane elsewhere.
  const bool pairs = g.psw == 2;
  // The pooled row's conv rows, copied with a tail so the last block's loads stay in bounds.
  const int64_t rowlen = relu_pool_rowlen(g, VW);
  thread_local std::vector<T> scratch;
  if (static_cast<int64_t>(scratch.size()) < g.poolh * rowlen)
    scratch.assign(g.poolh * rowlen, T(0));
  T* const rows = scratch.data();
  for (int64_t ph = 0; ph < g.ph; ++ph) {
    for (int64_t i = 0; i < g.poolh; ++i)
      copy_row(rows + i * rowlen, y + (ph * g.psh + i) * pitch, g.ow);
    for (int64_t b = 0; b < blocks; ++b) {
      WindowMax<T> win;
      for (int64_t i = 0; i < g.poolh; ++i)
        for (int64_t j = 0; j < g.poolw; ++j) {
          const T* first = rows + i * rowlen + b * VW * g.psw + j;
          V v;
          if (pairs) {
            v = every_other<V>(first, std::make_index_sequence<VW>{});
          } else {
            for (int l = 0; l < VW; ++l) v[l] = first[l * g.psw];
          }
          win.take(v, i * g.poolw + j);
        }
      const V relu = win.relu();
      const auto codes = win.codes();
      const int64_t at = ph * g.pw + b * VW;
      const int64_t lanes = std::min<int64_t>(VW, g.pw - b * VW);
      for (int64_t l = 0; l < lanes; ++l) {
        outp[at + l] = relu[l];
        amp[at + l] = static_cast<uint8_t>(codes[l]);
      }
    }
  }
}

template <typename T>
void relu_pool(const at::Tensor& conv, const ConvPoolGeometry& g, at::Tensor& out,
               at::Tensor& argmax) {
  const T* y = conv.const_data_ptr<T>();
  T* outp = out.data_ptr<T>();
  uint8_t* amp = argmax.data_ptr<uint8_t>();
  const int64_t plane_in = g.oh * g.ow, plane_out = g.ph * g.pw;
  cpu::parallel_for(0, g.n * g.o, kPoolGrain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      relu_pool_plane(y + p * plane_in, g.ow, g, outp + p * plane_out, amp + p * plane_out);
  });
}

// relu_pool for a channels-last conv output y (N, OH, OW, O) (ATen's convolution of
// channels-last operands, conv_relu_pool_cpu.cpp): lanes over output channels, the same rule
// (WindowMax); each sample's pooled planes go through a [PH * PW][O] scratch, then are
// stored as (O, PH, PW).
template <typename T>
void relu_pool_cl(const at::Tensor& conv, const ConvPoolGeometry& g, at::Tensor& out,
                  at::Tensor& argmax) {
  using Vec = VecOf<T, kVecBytes>;
  using V = typename Vec::type;
  using MI = typename Vec::mask_int;
  constexpr int VW = Vec::kLanes;
  const T* y = conv.const_data_ptr<T>();
  T* outp = out.data_ptr<T>();
  uint8_t* amp = argmax.data_ptr<uint8_t>();
  const int64_t plane = g.ph * g.pw, ov = (g.o + VW - 1) / VW * VW;
  cpu::parallel_for(0, g.n, 1, [&](int64_t n0, int64_t n1) {
    // One pixel's channels with a zero tail, so full vectors stay in bounds.
    std::vector<T> px(ov, T(0)), best_s(plane * ov);
    std::vector<MI> pos_s(plane * ov);
    for (int64_t n = n0; n < n1; ++n) {
      const T* yn = y + n * g.oh * g.ow * g.o;
      for (int64_t k = 0; k < plane; ++k) {
        const int64_t ph = k / g.pw, pw = k % g.pw;
        for (int64_t v0 = 0; v0 < ov; v0 += VW) {
          const bool full = v0 + VW <= g.o;
          WindowMax<T> win;
          for (int64_t i = 0; i < g.poolh; ++i)
            for (int64_t j = 0; j < g.poolw; ++j) {
              const T* at = yn + ((ph * g.psh + i) * g.ow + pw * g.psw + j) * g.o + v0;
              if (!full) {
                std::memcpy(px.data(), at, (g.o - v0) * sizeof(T));
                at = px.data();
              }
              win.take(load<V>(at), i * g.poolw + j);
            }
          store(best_s.data() + k * ov + v0, win.relu());
          const auto codes = win.codes();
          for (int l = 0; l < VW; ++l) pos_s[k * ov + v0 + l] = codes[l];
        }
      }
      for (int64_t o = 0; o < g.o; ++o)
        for (int64_t k = 0; k < plane; ++k) {
          outp[(n * g.o + o) * plane + k] = best_s[k * ov + o];
          amp[(n * g.o + o) * plane + k] = static_cast<uint8_t>(pos_s[k * ov + o]);
        }
    }
  });
}

// The weight as tap_gemm_forward's Wt: [KH * KW * O][C], row (kh * KW + kw) * O + o holding
// w[o, :, kh, kw].
inline at::Tensor tap_weight(const at::Tensor& weight, const ConvPoolGeometry& g) {
  return weight.detach().permute({2, 3, 0, 1}).reshape({g.kh * g.kw * g.o, g.c}).contiguous();
}

// Rows of the tap GEMM: y[m][0, ld) = sum_c wt[m][c] * x[c][0, ld) for MR rows m, ld a whole
// number of vectors, y's rows ld apart. A register block holds MR rows x kTapCols vectors of y;
// each c broadcasts MR weights and loads kTapCols vectors of x. Measured 1.9x faster than ATen's
// mm (MKL) at 54 x 128 x 1024 (128 -> 6 3x3 32x32, whole forward).
constexpr int kTapCols = 4;

// One register block: MR rows of y by NV <= kTapCols vectors, from x's rows xs apart. NV is a
// template argument: with a runtime count of vectors (a row's last block) GCC kept the
// accumulators of that loop on the stack (tap_gemm_block<float, 6>: 48 stack loads and stores
// per depth step).
template <typename T, int MR, int NV>
void tap_gemm_block(const T* wt, int64_t c, const T* x, int64_t xs, T* y, int64_t ld) {
  using V = typename VecOf<T, kVecBytes>::type;
  constexpr int VW = VecOf<T, kVecBytes>::kLanes;
  V acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  for (int64_t k = 0; k < c; ++k) {
    V xv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) xv[v] = load<V>(x + k * xs + v * VW);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const T wv = wt[r * c + k];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += wv * xv[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store(y + r * ld + v * VW, acc[r][v]);
}

constexpr int kTapRows = 6;  // MR: 6 x 4 accumulators, 4 inputs and a weight fill 29 registers

template <typename T>
using TapGemmFn = void (*)(const T*, int64_t, const T*, int64_t, T*, int64_t);

// tap_gemm_block<T, MR, NV> for every NV in 1 .. kTapCols.
template <typename T, int MR, int... NVs>
constexpr std::array<TapGemmFn<T>, sizeof...(NVs)> tap_gemm_row(
    std::integer_sequence<int, NVs...>) {
  return {&tap_gemm_block<T, MR, NVs + 1>...};
}

// tap_gemm_block<T, MR, NV> by [MR - 1][NV - 1], MR in 1 .. kTapRows.
template <typename T, int... MRs>
constexpr std::array<std::array<TapGemmFn<T>, kTapCols>, sizeof...(MRs)> tap_gemm_table(
    std::integer_sequence<int, MRs...>) {
  return {tap_gemm_row<T, MRs + 1>(std::make_integer_sequence<int, kTapCols>{})...};
}

// Column block by column block, every row block of y per column block, so that the block's
// C * kTapCols vectors of x are read from L1 by all of them. Where x's rows are a multiple of
// kTapAliasBytes apart (16x16 and 32x32 planes: 1 and 4 KiB), a block's rows fall on a few sets
// of L1 and evict each other, and each row is a page of its own to the hardware prefetcher: such
// blocks are copied into `panel` (C x kTapCols vectors, rows 256 bytes apart, spread over every
// set), which the row blocks then read, and the next block's rows are prefetched into L2 while
// this one is multiplied. Forward alone, 2 threads, best of 5, alternating processes (two
// each), us, before -> copy -> copy and prefetch: 128 -> 6 3x3 32x32 batch 64 4200-4878 ->
// 3567-3871 -> 3391-3507, batch 256 23708-24570 -> 19807-20009 -> 16970-17098; 32 -> 8 3x3
// 32x32 batch 256 6828-7559 -> 6313-6465 -> 5959-6118; 16x16 planes within the runs' spread.
constexpr int64_t kTapAliasBytes = 512;

template <typename T>
void tap_gemm(const T* wt, int64_t m, int64_t c, const T* x, int64_t ld, T* y, T* panel) {
  static constexpr auto fns = tap_gemm_table<T>(std::make_integer_sequence<int, kTapRows>{});
  constexpr int VW = VecOf<T, kVecBytes>::kLanes;
  constexpr int64_t cols = kTapCols * VW;
  const bool pack = ld * int64_t{sizeof(T)} % kTapAliasBytes == 0;
  for (int64_t j0 = 0; j0 < ld; j0 += cols) {
    const int nv = static_cast<int>(std::min<int64_t>(kTapCols, (ld - j0) / VW));
    const T* xb = x + j0;
    int64_t xs = ld;
    if (pack && nv == kTapCols) {
      const bool ahead = j0 + 2 * cols <= ld;  // a whole next block
      for (int64_t k = 0; k < c; ++k) {
        std::memcpy(panel + k * cols, xb + k * ld, sizeof(T) * cols);
        if (ahead)
          for (int64_t e = cols; e < 2 * cols; e += kCacheLineElems<T>)
            __builtin_prefetch(xb + k * ld + e, 0, 2);  // read, into L2
      }
      xb = panel;
      xs = cols;
    }
    for (int64_t m0 = 0; m0 < m; m0 += kTapRows) {
      const int64_t mr = std::min<int64_t>(kTapRows, m - m0);
      fns[mr - 1][nv - 1](wt + m0 * c, c, xb, xs, y + m0 * ld + j0, ld);
    }
  }
}

// The tap GEMM forward (stride 1): per sample one GEMM Y = Wt . x (tap_gemm), Wt the weight as
// [KH * KW * O][C] (row (kh * KW + kw) * O + o holds w[o, :, kh, kw]) and x the sample as
// [C][H * W] (rows padded to whole vectors), so Y's row of tap (kh, kw) and channel o is that tap's
// contribution at every input pixel; the conv plane of o is the bias plus each tap's row shifted by
// (kh - padh, kw - padw) (taps that land on padding skipped), then relu_pool_plane. With few output
// channels every FMA of the GEMM is useful and its K (C) is long, where a direct conv fills few
// lanes. Taps on the padding are skipped, not multiplied by zeros: the caller takes ATen's conv for
// a weight with Inf/NaN, whose products with the padding stock's conv may compute.
template <typename T>
void tap_gemm_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                      const ConvPoolGeometry& g, at::Tensor& out, at::Tensor& argmax) {
  constexpr int VW = VecOf<T, kVecBytes>::kLanes;
  const int64_t taps = g.kh * g.kw, hw = g.h * g.w, plane = g.oh * g.ow, plane_out = g.ph * g.pw;
  const int64_t ld = (hw + VW - 1) / VW * VW;  // tap_gemm's rows
  const at::Tensor wt = tap_weight(weight, g);
  const T* wtp = wt.const_data_ptr<T>();
  const T* xp = input.const_data_ptr<T>();
  const T* bp = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
  T* outp = out.data_ptr<T>();
  uint8_t* amp = argmax.data_ptr<uint8_t>();
  cpu::parallel_for(0, g.n, 1, [&](int64_t n0, int64_t n1) {
    AlignedVector<T> y(taps * g.o * ld), xpad(ld != hw ? g.c * ld : 0, T(0));
    AlignedVector<T> panel(g.c * kTapCols * VW);
    std::vector<T> conv(plane);
    for (int64_t n = n0; n < n1; ++n) {
      const T* xs = xp + n * g.c * hw;
      if (ld != hw) {  // rows of whole vectors, zero past the sample's pixels
        for (int64_t c = 0; c < g.c; ++c) copy_row(xpad.data() + c * ld, xs + c * hw, hw);
        xs = xpad.data();
      }
      tap_gemm(wtp, taps * g.o, g.c, xs, ld, y.data(), panel.data());
      const T* yp = y.data();
      for (int64_t o = 0; o < g.o; ++o) {
        std::fill(conv.begin(), conv.end(), bp ? bp[o] : T(0));
        for (int64_t kh = 0; kh < g.kh; ++kh)
          for (int64_t kw = 0; kw < g.kw; ++kw) {
            const T* src = yp + ((kh * g.kw + kw) * g.o + o) * ld;
            // conv (oh, ow) reads input (oh + kh - padh, ow + kw - padw) where that is inside.
            const int64_t oh0 = std::max<int64_t>(0, g.padh - kh);
            const int64_t oh1 = std::min<int64_t>(g.oh, g.h + g.padh - kh);
            const int64_t ow0 = std::max<int64_t>(0, g.padw - kw);
            const int64_t ow1 = std::min<int64_t>(g.ow, g.w + g.padw - kw);
            for (int64_t oh = oh0; oh < oh1; ++oh) {
              T* dst = conv.data() + oh * g.ow;
              const T* s = src + (oh + kh - g.padh) * g.w + (kw - g.padw);
              for (int64_t ow = ow0; ow < ow1; ++ow) dst[ow] += s[ow];
            }
          }
        const int64_t at = (n * g.o + o) * plane_out;
        relu_pool_plane(conv.data(), g.ow, g, outp + at, amp + at);
      }
    }
  });
}

// Elements per task of relu_codes: below this a parallel region costs more than it saves.
constexpr int64_t kCodesGrain = 1 << 15;

// ReLU of n values of src into dst (src itself allowed), with their codes into am unless null
// (inference): 0, or kNoGrad where ReLU passes no gradient.
template <typename T>
void relu_codes_span(const T* src, int64_t n, T* dst, uint8_t* am) {
  using Vec = VecOf<T, kVecBytes>;
  using V = typename Vec::type;
  using M = typename Vec::mask;
  using MI = typename Vec::mask_int;
  constexpr int VW = Vec::kLanes;
  int64_t i = 0;
  for (; i + VW <= n; i += VW) {
    const V v = load<V>(src + i);
    const M dead = v <= V{};  // false for NaN, which ReLU passes as stock's does
    store(dst + i, dead ? V{} : v);
    if (am) store(am + i, low_bytes(dead & static_cast<MI>(kNoGrad)));
  }
#if defined(__AVX512F__)
  // The tail as one masked vector: flat_forward's conv rows are short (1 -> 32 3x3 on 28x28:
  // a vector and 10 values each), and value by value the tails took more time than the conv.
  // That forward alone, batch 64, 2 threads, Zen 5 VM, us, best runs of two: with the codes
  // 304-307 -> 197-200, inference 218-220 -> 193-195.
  if (i < n) {
    const int rest = static_cast<int>(n - i);
    const V v = load_lanes<V>(src + i, 0, rest);
    const M dead = v <= V{};
    store_lanes(dst + i, dead ? V{} : v, rest);
    if (am) store_bytes<VW>(am + i, low_bytes(dead & static_cast<MI>(kNoGrad)), rest);
    return;
  }
#endif
  for (; i < n; ++i) {
    const bool dead = src[i] <= T(0);
    dst[i] = keep_or_zero(!dead, src[i]);
    if (am) am[i] = dead ? kNoGrad : uint8_t(0);
  }
}

// `argmax` null: the ReLU alone (inference), the same values.
template <typename T>
void relu_codes(at::Tensor& y, at::Tensor* argmax) {
  T* p = y.data_ptr<T>();
  uint8_t* amp = argmax ? argmax->data_ptr<uint8_t>() : nullptr;
  cpu::parallel_for(0, y.numel(), kCodesGrain, [&](int64_t begin, int64_t end) {
    relu_codes_span(p + begin, end - begin, p + begin, amp ? amp + begin : nullptr);
  });
}

}  // namespace fastlenet::cpu
