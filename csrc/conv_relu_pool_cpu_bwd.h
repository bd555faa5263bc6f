// Backward kernels of conv2d -> ReLU -> max_pool2d on the CPU.
// Math and saved state: fastlenet/reference.py (conv_relu_pool).
// Computes: grad_x, grad_w and grad_b, visiting only the patch of each window's argmax; a
// gradient that Inf/NaN would reach through the skipped zeros is reported (BwdFallback) and
// recomputed densely by the caller. Accumulates in the data's own type (float32 or float64).
// Saves nothing: it reads what the forward saved (conv_relu_pool_cpu_fwd.h): x, w and argmax,
// one byte per pooled output.
//
// Both gradients work on a channels-last, zero-padded copy of each sample, where a patch row (KW
// pixels of C values, padded to `pix`: padded_pixel, weight_pixel) is contiguous: the patch of a
// window's argmax is KH rows of NV full vectors. For grad_w the accumulators of one output channel
// stay in registers across its windows; for grad_x the weight rows of one output channel do.
// Patches too large for that (wide layers) go to conv_relu_pool_cpu_bwd_wide.h's tiled kernels
// (grad_w from packed patch rows where those take fewer vectors and fit L1: PackedRows);
// grad_x, where a pooling window's whole region fits the registers and that measured faster, to
// conv_relu_pool_cpu_bwd_tile.h's; grad_w of one-channel float32 inputs to
// conv_relu_pool_cpu_bwd_stacks.h's (lanes over a patch's taps, from rows stacked by column).
// grad_w/grad_b: samples are split into a fixed number of chunks (one per thread), each summing
// into its own buffer, added in chunk order: bitwise identical run to run for a given thread
// count.
// The inner loops step a row pointer by the row stride and index vectors with constants: with
// `base + kh * stride + v * VW`, GCC keeps all KH * NV runtime offsets live, spills them and
// recomputes addresses per window (measured faster this way on AVX2, grad_w and grad_x).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "checks.h"
#include "conv_relu_pool_cpu_bwd_stacks.h"
#include "conv_relu_pool_cpu_bwd_tile.h"
#include "conv_relu_pool_cpu_bwd_wide.h"
#include "cpu_parallel.h"
#include "cpu_reuse.h"
#include "cpu_vec.h"

namespace fastlenet::cpu {

// Backward vectors: at most 32 bytes (kNarrowBytes). AVX-512 CPUs issue two 32-byte FMAs per
// cycle but one 64-byte FMA, and the backward is bound by its loads and stores, most of which a
// 64-byte vector at a patch row's start would split over two cache lines (measured on AVX-512:
// grad_x faster with 32-byte vectors and 8-channel pixels, grad_w no slower).
constexpr int kBwdBytes = kNarrowBytes;
// Patch shapes with a register-blocked backward: KH <= 7 rows of NV <= 5 vectors (conv2's
// grad_x rows with 8 channels per pixel are 5 vectors of 8 floats).
constexpr int kMaxKH = 7;
constexpr int kMaxNV = 5;
// Patch rows one pass of the register-blocked grad_w kernel holds: its KHB * NV accumulators
// plus a few temporaries fit the vector registers, so AVX2 does conv2's 5 rows of 4 vectors in
// two passes (3 + 2 rows) instead of spilling accumulators (measured faster). grad_x keeps all
// rows in one pass: its spilled weights become memory operands of the FMAs, and a second pass
// measured slower.
inline int64_t rows_per_pass(int64_t kh, int64_t nv) {
  return std::clamp<int64_t>((kVecRegs - 4) / nv, 1, kh);
}

// Pixel stride of the grad_x buffer: C rounded up to a power of two below a vector, or to whole
// vectors above it, where that costs at most a third more lanes (conv2: 6 -> 8 channels). Its
// patch rows then start on a VW-aligned element: with 6 channels 3 in 8 of the 32-byte
// read-modify-writes of grad_x straddle two cache lines, and a window's rows partly overlap
// the stores of the window before it, which the CPU cannot forward. Measured faster on AVX-512
// (grad_x and the whole backward op) despite the extra vectors per window. On AVX2 the same
// padding measured no better (its stores cost the same aligned or not), so builds without
// AVX-512 keep C.
constexpr bool kPadPixels = kVecBytes >= 64;
inline int64_t padded_pixel(int64_t c, int64_t vw) {
  if (!kPadPixels) return c;
  int64_t pix = c;
  if (c < vw) {
    pix = 1;
    while (pix < c) pix *= 2;
  } else {
    pix = (c + vw - 1) / vw * vw;
  }
  return 3 * pix <= 4 * c ? pix : c;
}

// Pixel stride of grad_w's copy of the sample. grad_w loads each patch row as whole vectors
// from its first pixel, most of which straddle two cache lines unless pixels start on vector
// boundaries; the sums are the same either way (padding lanes hold zeros and are dropped).
// - float32 with more channels than a narrow (32-byte) vector holds: whole wide (64-byte)
//   vectors, on AVX-512 (kPadPixels). Rows of 3 or more such pixels then take the wide kernels,
//   whose 64-byte loads are all aligned. (float64 measured mixed, 0.91-1.04x: it keeps the rule
//   below.) Backward op with grad_w alone, batch 64, 2 threads, in one process, channels ->
//   pixel (elements): 9 -> 16 3x3 1.14x, 10 -> 16 3x3 1.13-1.16x (5x5 pool 3 1.20x), 11 -> 16
//   3x3 1.36x, 12 -> 16 5x5 1.15x, 13 -> 16 5x5 1.57x, 17 -> 32 3x3 1.11x, 20 -> 32 3x3 1.07x, 23
//   -> 32 3x3 1.12x, 24 -> 32 3x3 1.13x (5x5 1.01x), 33 -> 48 3x3 1.20x, 37 -> 48 3x3 pool 3 1.17x,
//   40 -> 48 3x3 1.17x. At 8 channels and fewer the narrow kernels' 32-byte loads lose to it (6 ->
//   16 5x5, LeNet-5's conv2, 0.75x; 8 -> 16 3x3 0.87x; 4 -> 16 5x5 0.57x).
// - Fewer: padded_pixel's where that adds no vector to a patch row of kw pixels, else C.
//   3 -> 4 and 6 -> 8 channels with 3x3 kernels 1.03x, 7 -> 8 1.04x (batch 64 and 256);
//   where it adds vectors it measured slower (LeNet-5's conv2, 6 -> 8: 5 vectors of 8 floats a
//   row instead of 4, 0.88x).
template <typename T>
int64_t weight_pixel(int64_t c, int64_t kw) {
  constexpr int64_t vw = VecOf<T, kBwdBytes>::kLanes, wide = WideVec<T>::VW;
  if (kPadPixels && std::is_same_v<T, float> && c > vw) return (c + wide - 1) / wide * wide;
  const int64_t pix = padded_pixel(c, vw);
  return (kw * pix + vw - 1) / vw == (kw * c + vw - 1) / vw ? pix : c;
}

// grad_w of 6 to 8 channels (pixels of 8 floats, padded_pixel) on AVX-512 takes the wide
// kernels' 64-byte loads, each on a cache line of its own: rows of whole lines and a twin copy
// half a line along (twin_offset), each window reading from the copy where its patch rows start
// on a line (wide_twin_shift). Where the wide tile has at least kWideMinAcc accumulators (below
// that its FMAs wait on the previous window's: the narrow kernel alternates two sets). grad_w
// alone, 2 threads, in one process, batch 64 / 256: 6 -> 16 5x5 (LeNet-5's conv2) 1.13x /
// 1.14x (1 thread 1.14x), 8 -> 16 5x5 1.30x / 1.33x, 6 -> 120 5x5 1.19x / 1.21x; not taken at 3x3
// (6 accumulators: 6 -> 16 0.88x, 8 -> 16 pool 3 and 7 -> 12 0.99x).
constexpr int64_t kWideMinAcc = 8;
template <typename T>
bool aligned_wide_weight(const ConvPoolGeometry& g) {
  constexpr int64_t vw = VecOf<T, kBwdBytes>::kLanes, wide = WideVec<T>::VW;
  return kPadPixels && std::is_same_v<T, float> && g.c <= vw && padded_pixel(g.c, vw) == vw &&
         g.kh * ((g.kw * vw + wide - 1) / wide) >= kWideMinAcc;
}

// grad_w's copy of the sample has a twin where its patch rows are one vector each (LeNet-5's
// and the Fashion CNN's first layers: 5 floats, loaded as 8): the copy's rows are a whole
// number of cache lines long and the twin starts half a line further along, so each window
// reads its patch from whichever copy holds it without a load straddling two cache lines (in
// one copy the rows of a patch start at the same place in their lines). Without, about half
// of those loads straddle. The same sums from the same values. grad_w alone, 2 threads, in one
// process, batch 64 / 256: LeNet-5's conv1 1.01-1.07x / 1.02-1.03x, the Fashion CNN's
// 1.04-1.05x / 1.04x, 1 -> 32 3x3 28x28 1.25-1.28x / 1.26-1.28x (float64 1.78x), 2 -> 16 3x3
// 24x24 2.06-2.10x / 1.68x. Not taken where pixels are 16 bytes or more (3 -> 4 floats, 2 wide:
// 0.97-0.99x) or a plane has fewer than kTwinMinWindows pooling windows (1 -> 6 3x3 8x8, 9
// windows: 0.96x): there the copy costs about what it saves.
constexpr int64_t kTwinMaxPixelBytes = 8;
constexpr int64_t kTwinMinWindows = 16;
// The elements from a buffer of `size` to its twin: half a cache line past a whole number of
// them.
template <typename T>
int64_t twin_offset(int64_t size) {
  constexpr int64_t line = kCacheLineElems<T>;
  return (size + line - 1) / line * line + line / 2;
}

// What to add to a one-vector row starting `at` elements into the copy to read it where it does
// not straddle a line: 0 (the copy) or `twin` (a narrow vector starting past the line's middle
// would straddle in the copy, and does not in the twin).
template <typename T>
int64_t twin_shift(int64_t at, int64_t twin) {
  constexpr int64_t line = kCacheLineElems<T>;
  return (at & (line - 1)) > line / 2 ? twin : 0;
}

// What the backward kernels share: strides into a channels-last, zero-padded sample
// buf[y][x][c] (y < HP, x < WP, c < pix: `pix` elements per pixel, C of them channels) and, per
// window position q, the offset of its conv output's first tap relative to the window's first
// (q = 255 maps to 0 with no gradient).
template <typename T>
struct BwdLayout {
  static constexpr int VW = VecOf<T, kBwdBytes>::kLanes;
  int64_t pix;     // elements per pixel: C, or more (padded_pixel)
  int64_t wpc;     // elements per padded row: WP * pix
  int64_t rowlen;  // one patch row: KW * pix
  int64_t nv;      // vectors per patch row
  int64_t size;    // buffer elements, with a tail so full-vector loads stay in bounds
  std::array<int64_t, 256> qoff{};
  // Per pooled output k = ph * PW + pw: the offset of its window's first tap. One flat loop
  // over k with this table beats nested ph/pw loops with runtime strides (measured on AVX2,
  // conv2's grad_w).
  AlignedVector<int64_t> woff;
  // Elements from the buffer's start to a second copy of it, placed half a cache line further
  // along (twin_offset), or 0: none.
  int64_t twin = 0;

  // `row_align`: padded rows a whole number of these elements long.
  BwdLayout(const ConvPoolGeometry& g, int64_t pixel, int64_t row_align = 1) : pix(pixel) {
    const int64_t wp = g.w + 2 * g.padw;
    wpc = (wp * pix + row_align - 1) / row_align * row_align;
    rowlen = g.kw * pix;
    nv = (rowlen + VW - 1) / VW;
    const int64_t rowstep = g.psh * g.sh * wpc;  // between pooled rows
    const int64_t colstep = g.psw * g.sw * pix;  // between pooled columns
    // The tail keeps full-vector loads of the last patch row, and the stores and loads of the
    // layout conversions (8 values per pixel), in bounds.
    size = (g.h + 2 * g.padh) * wpc + std::max<int64_t>(nv * VW, kTransposeLanes);
    for (int64_t q = 0; q < g.poolh * g.poolw; ++q)
      qoff[q] = (q / g.poolw) * g.sh * wpc + (q % g.poolw) * g.sw * pix;
    woff.resize(g.ph * g.pw);
    // Nested loops: a division per entry cost ~2 us per op at LeNet-5's conv1 (196 entries,
    // two layouts), a quarter of its batch-1 backward.
    for (int64_t ph = 0, k = 0; ph < g.ph; ++ph)
      for (int64_t pw = 0; pw < g.pw; ++pw, ++k) woff[k] = ph * rowstep + pw * colstep;
  }
};

// Pixels of a row that the layout conversions transpose in blocks of 8: all of them when the row
// has at least 8, the last block then overlapping the one before it (its pixels are written
// twice, with the same values) instead of leaving a remainder to the scalar loop (measured
// faster; conv2's rows have 14 pixels); none in a shorter row.
inline int64_t transposed_pixels(int64_t w) { return w >= kTransposeLanes ? w : 0; }
inline int64_t block_start(int64_t xb, int64_t x0) { return std::min(xb, x0 - kTransposeLanes); }

// One sample, planar (C, H, W) to channels-last and padded. float: blocks of 8 pixels x 8
// channels are transposed in registers (measured slightly faster than the scalar copy, which
// does the rest). Each pixel's 8 values are stored at row + p * pix + c0, in increasing p; lanes
// past C hold zeros (the rows loaded for channels past C) and land on the pixel's own padding
// lanes, the next pixel's first channels, or on padding, before those are written. Channel
// blocks go from the last to the first for the same reason.
template <typename T, typename Layout>
void to_padded_cl(const T* xs, const ConvPoolGeometry& g, const Layout& L, T* dst) {
  if (L.pix == 1) {  // channels-last is the same layout: whole rows
    for (int64_t y = 0; y < g.h; ++y)
      copy_row(dst + (y + g.padh) * L.wpc + g.padw, xs + y * g.w, g.w);
    return;
  }
  int64_t x0 = 0;  // pixels [0, x0) of each row are done by blocks of 8 x 8
  if constexpr (std::is_same_v<T, float>) {
    x0 = transposed_pixels(g.w);
    for (int64_t y = 0; y < g.h; ++y) {
      T* row = dst + (y + g.padh) * L.wpc + g.padw * L.pix;
      for (int64_t c0 = (g.c - 1) / kTransposeLanes * kTransposeLanes; c0 >= 0;
           c0 -= kTransposeLanes) {
        const int64_t nc = std::min<int64_t>(kTransposeLanes, g.c - c0);
        for (int64_t xb = 0; xb < x0; xb += kTransposeLanes) {
          const int64_t x = block_start(xb, x0);
          Float8 r[kTransposeLanes];
          for (int64_t i = 0; i < kTransposeLanes; ++i)
            r[i] = i < nc ? load<Float8>(xs + ((c0 + i) * g.h + y) * g.w + x) : Float8{};
          transpose8(r);
          for (int64_t p = 0; p < kTransposeLanes; ++p) store(row + (x + p) * L.pix + c0, r[p]);
        }
      }
    }
  }
  for (int64_t c = 0; c < g.c; ++c)
    for (int64_t y = 0; y < g.h; ++y) {
      T* row = dst + (y + g.padh) * L.wpc + g.padw * L.pix + c;
      const T* src = xs + (c * g.h + y) * g.w;
      for (int64_t x = x0; x < g.w; ++x) row[x * L.pix] = src[x];
    }
}

// The inverse for one sample: channels-last (padded) src to planar (C, H, W) dst. Loads of
// 8 values per pixel read past its channels into the next pixel, padding or the buffer's tail.
template <typename T, typename Layout>
void from_padded_cl(const T* src, const ConvPoolGeometry& g, const Layout& L, T* dst) {
  int64_t x0 = 0;
  if constexpr (std::is_same_v<T, float>) {
    x0 = transposed_pixels(g.w);
    for (int64_t y = 0; y < g.h; ++y) {
      const T* row = src + (y + g.padh) * L.wpc + g.padw * L.pix;
      for (int64_t c0 = 0; c0 < g.c; c0 += kTransposeLanes) {
        const int64_t nc = std::min<int64_t>(kTransposeLanes, g.c - c0);
        for (int64_t xb = 0; xb < x0; xb += kTransposeLanes) {
          const int64_t x = block_start(xb, x0);
          Float8 r[kTransposeLanes];
          for (int64_t p = 0; p < kTransposeLanes; ++p)
            r[p] = load<Float8>(row + (x + p) * L.pix + c0);
          transpose8(r);
          for (int64_t i = 0; i < nc; ++i) store(dst + ((c0 + i) * g.h + y) * g.w + x, r[i]);
        }
      }
    }
  }
  for (int64_t c = 0; c < g.c; ++c)
    for (int64_t y = 0; y < g.h; ++y) {
      const T* row = src + (y + g.padh) * L.wpc + g.padw * L.pix + c;
      T* out = dst + (c * g.h + y) * g.w;
      for (int64_t x = x0; x < g.w; ++x) out[x] = row[x * L.pix];
    }
}

// grad_w of patch rows kh0 .. kh0+KH-1 of one sample, all output channels, accumulated into gw
// ([O][g.kh][NV*VW]), and grad_b into gb ([O]) in the pass with kh0 = 0. A window with no
// gradient is visited with g = 0 (branch-free: x is finite here).
template <typename T, int KH, int NV>
void bwd_weight_sample(const T* xcl, const T* go, const uint8_t* am, const ConvPoolGeometry& g,
                       const BwdLayout<T>& L, T* gw, T* gb, int64_t kh0) {
  using V = typename VecOf<T, kBwdBytes>::type;
  constexpr int VW = VecOf<T, kBwdBytes>::kLanes;
  const int64_t plane = g.ph * g.pw;
  xcl += kh0 * L.wpc;
  for (int64_t o = 0; o < g.o; ++o) {
    V acc[KH][NV];
    T* gwo = gw + (o * g.kh + kh0) * NV * VW;
    for (int kh = 0; kh < KH; ++kh)
      for (int v = 0; v < NV; ++v) acc[kh][v] = load<V>(gwo + (kh * NV + v) * VW);
    T bsum = gb[o];
    const T* gop = go + o * plane;
    const uint8_t* amo = am + o * plane;
    const int64_t* woff = L.woff.data();
    const int64_t wpc = L.wpc;
    const auto visit = [&](V(&a)[KH][NV], T& sum, int64_t k) {
      const uint8_t q = amo[k];
      const T gv = keep_or_zero(q != kNoGrad, gop[k]);
      const int64_t at = woff[k] + L.qoff[q];
      const T* row = xcl + at;
      if constexpr (NV == 1) row += twin_shift<T>(at, L.twin);
      sum += gv;
      for (int kh = 0; kh < KH; ++kh, row += wpc)
        for (int v = 0; v < NV; ++v) a[kh][v] += gv * load<V>(row + v * VW);
    };
    int64_t k = 0;
    if constexpr (2 * KH * NV <= kVecRegs - 4) {
      // Few accumulators (LeNet-5 conv1: 5): each window's FMAs would wait on the previous
      // window's (4 cycles of latency for KH * NV FMAs). Windows alternate between two sets.
      V acc2[KH][NV] = {};
      T bsum2 = T(0);
      for (; k + 1 < plane; k += 2) {
        visit(acc, bsum, k);
        visit(acc2, bsum2, k + 1);
      }
      for (int kh = 0; kh < KH; ++kh)
        for (int v = 0; v < NV; ++v) acc[kh][v] += acc2[kh][v];
      bsum += bsum2;
    }
    for (; k < plane; ++k) visit(acc, bsum, k);
    for (int kh = 0; kh < KH; ++kh)
      for (int v = 0; v < NV; ++v) store(gwo + (kh * NV + v) * VW, acc[kh][v]);
    if (kh0 == 0) gb[o] = bsum;
  }
}

// grad_x of one sample into dx (channels-last, padded); wcl is the weight as
// [O][KH][NV*VW], zero beyond each patch row, so full vectors add exact zeros past it (g is
// finite here).
template <typename T, int KH, int NV>
void bwd_input_sample(T* dx, const T* go, const uint8_t* am, const ConvPoolGeometry& g,
                      const BwdLayout<T>& L, const T* wcl) {
  using V = typename VecOf<T, kBwdBytes>::type;
  constexpr int VW = VecOf<T, kBwdBytes>::kLanes;
  const int64_t plane = g.ph * g.pw;
  for (int64_t o = 0; o < g.o; ++o) {
    V w[KH][NV];
    for (int kh = 0; kh < KH; ++kh)
      for (int v = 0; v < NV; ++v) w[kh][v] = load<V>(wcl + ((o * KH + kh) * NV + v) * VW);
    const T* gop = go + o * plane;
    const uint8_t* amo = am + o * plane;
    const int64_t* woff = L.woff.data();
    const int64_t wpc = L.wpc;
    for (int64_t k = 0; k < plane; ++k) {
      const uint8_t q = amo[k];
      if (q == kNoGrad) continue;
      const T gv = gop[k];
      T* row = dx + woff[k] + L.qoff[q];
      for (int kh = 0; kh < KH; ++kh, row += wpc)
        for (int v = 0; v < NV; ++v) store(row + v * VW, load<V>(row + v * VW) + gv * w[kh][v]);
    }
  }
}

// grad_x for patches too large to hold in registers (KH > kMaxKH or more than kMaxNV vectors
// per patch row) with few output channels (kWideInputMinOut): weight rows as [O][KH][rowlen],
// visiting each window that passes gradient: visit(o, g, patch offset of its argmax, row kh of
// that patch). grad_w of such patches: conv_relu_pool_cpu_bwd_wide.h.
template <typename T, typename Visit>
void each_patch_row(const T* go, const uint8_t* am, const ConvPoolGeometry& g,
                    const BwdLayout<T>& L, Visit visit) {
  const int64_t plane = g.ph * g.pw;
  for (int64_t o = 0; o < g.o; ++o)
    for (int64_t k = 0; k < plane; ++k) {
      const uint8_t q = am[o * plane + k];
      if (q == kNoGrad) continue;
      const T gv = go[o * plane + k];
      const int64_t base = L.woff[k] + L.qoff[q];
      for (int64_t kh = 0; kh < g.kh; ++kh) visit(o, gv, base + kh * L.wpc, kh);
    }
}

template <typename T>
void bwd_input_sample_generic(T* dx, const T* go, const uint8_t* am, const ConvPoolGeometry& g,
                              const BwdLayout<T>& L, const T* wcl) {
  each_patch_row(go, am, g, L, [&](int64_t o, T gv, int64_t at, int64_t kh) {
    const T* src = wcl + (o * g.kh + kh) * L.rowlen;
    for (int64_t t = 0; t < L.rowlen; ++t) dx[at + t] += gv * src[t];
  });
}

template <typename T>
using WeightSampleFn = void (*)(const T*, const T*, const uint8_t*, const ConvPoolGeometry&,
                                const BwdLayout<T>&, T*, T*, int64_t);
template <typename T>
using InputSampleFn = void (*)(T*, const T*, const uint8_t*, const ConvPoolGeometry&,
                               const BwdLayout<T>&, const T*);

template <typename T, int KH, int... NVs>
constexpr void fill_row(std::integer_sequence<int, NVs...>,
                        std::array<std::array<WeightSampleFn<T>, kMaxNV>, kMaxKH>& wt,
                        std::array<std::array<InputSampleFn<T>, kMaxNV>, kMaxKH>& it) {
  ((wt[KH - 1][NVs] = &bwd_weight_sample<T, KH, NVs + 1>), ...);
  ((it[KH - 1][NVs] = &bwd_input_sample<T, KH, NVs + 1>), ...);
}

template <typename T>
struct BwdTables {
  std::array<std::array<WeightSampleFn<T>, kMaxNV>, kMaxKH> weight{};
  std::array<std::array<InputSampleFn<T>, kMaxNV>, kMaxKH> input{};
  BwdTables() { fill<1, 2, 3, 4, 5, 6, 7>(); }
  template <int... KHs>
  void fill() {
    (fill_row<T, KHs>(std::make_integer_sequence<int, kMaxNV>{}, weight, input), ...);
  }
};

template <typename T>
const BwdTables<T>& bwd_tables() {
  static const BwdTables<T> tables;
  return tables;
}

inline bool register_blocked(const ConvPoolGeometry& g, int64_t nv) {
  return g.kh <= kMaxKH && nv <= kMaxNV;
}

// Output channels from which grad_x of patches too large for registers takes the wide kernel
// (conv_relu_pool_cpu_bwd_wide.h), whose groups of channels per argmax position then hold a few
// channels each: 16 -> 32 (5x5) and 10 -> 22 (5x5) measured 1.9x and 1.3x faster than the
// generic kernel, 128 -> 6 (3x3), 64 -> 6 (5x5) and 20 -> 10 (5x5, pool 3) 3-13% slower
// (grad_x alone, batch 64, 2 threads, AVX-512). grad_w takes the wide kernel at every such
// shape (1.5-3.8x faster at all five).
constexpr int64_t kWideInputMinOut = 16;

// Elements per task of masked_grad's pass: below this a parallel region costs more than it.
constexpr int64_t kMaskGrain = 1 << 15;

// True when every conv output is a pooling window of its own (pool_size 1, pool_stride 1).
inline bool windows_are_outputs(const ConvPoolGeometry& g) {
  return g.poolh == 1 && g.poolw == 1 && g.psh == 1 && g.psw == 1;
}

// Independent partial sums per plane in masked_planes: an add's latency (4 cycles) over the
// pass's one vector per cycle.
constexpr int kMaskSums = 4;

// Which of the vector's worth of argmax codes at `a` pass gradient, as a lane mask of T's
// widest vectors. The byte compare's lanes are signed, so the conversion to lane masks is one
// sign extension (vpmovsxbd); converting the unsigned codes themselves compiled to byte-by-byte
// inserts.
template <typename T>
inline typename VecOf<T, kVecBytes>::mask passes_gradient(const uint8_t* a) {
  using Vec = VecOf<T, kVecBytes>;
  constexpr int VW = Vec::kLanes;
  typedef int8_t Keep __attribute__((vector_size(VW)));
  const Keep keep = (Keep)(load<typename ByteVec<VW>::type>(a) != kNoGrad);
  return __builtin_convertvector(keep, typename Vec::mask) != typename Vec::mask_int{0};
}

// Planes (N * O of `plane` values each) of grad_out where argmax passes gradient, else 0, into
// o; with `sums`, each plane's sum too (one thread sums a whole plane: the same order for any
// thread count).
template <typename T>
void masked_planes(const T* go, const uint8_t* am, T* o, int64_t planes, int64_t plane, T* sums) {
  using Vec = VecOf<T, kVecBytes>;
  using V = typename Vec::type;
  constexpr int VW = Vec::kLanes;
  const int64_t grain = std::max<int64_t>(1, kMaskGrain / std::max<int64_t>(plane, 1));
  // By value: the stores could alias the captured references, which GCC then reloads.
  cpu::parallel_for(0, planes, grain, [=](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const T* g = go + p * plane;
      const uint8_t* a = am + p * plane;
      T* d = o + p * plane;
      // kMaskSums partial sums: one would make the pass wait on its add latency.
      V acc[kMaskSums] = {};
      const auto masked = [&](int64_t at) {
        const V v = passes_gradient<T>(a + at) ? load<V>(g + at) : V{};  // NaN, Inf pass as is
        store(d + at, v);
        return v;
      };
      int64_t i = 0;
      for (; i + kMaskSums * VW <= plane; i += kMaskSums * VW)
        for (int u = 0; u < kMaskSums; ++u) acc[u] += masked(i + u * VW);
      for (; i + VW <= plane; i += VW) acc[0] += masked(i);
      T sum = T(0);
      for (; i < plane; ++i) {
        d[i] = keep_or_zero(a[i] != kNoGrad, g[i]);
        sum += d[i];
      }
      if (sums == nullptr) continue;
      for (int u = 1; u < kMaskSums; ++u) acc[0] += acc[u];
      for (int l = 0; l < VW; ++l) sum += acc[0][l];
      sums[p] = sum;
    }
  });
}

// grad_out (N, O, OH, OW) where argmax passes gradient, else 0: the conv output's gradient when
// every conv output is a window of its own (one parallel pass, no index arithmetic or
// scatter). With `grad_bias` (O values), also the bias gradient, its sum over samples and
// pixels, from the same pass: ATen's convolution_backward took 60-880 us more for it than
// without it at the no-pool layers of the sweep (batch 64, 2 threads: 6 -> 16 3x3 30x30 755 ->
// 1633 us, 13 -> 29 3x3 11x11 346 -> 418 us).
inline at::Tensor masked_grad(const at::Tensor& grad_out, const at::Tensor& argmax,
                              at::Tensor* grad_bias) {
  at::Tensor out = empty_reused(grad_out.sizes(), grad_out.options());
  const int64_t n = grad_out.size(0), channels = grad_out.size(1);
  const int64_t plane = grad_out.size(2) * grad_out.size(3);
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "masked_grad", [&] {
    AlignedVector<scalar_t> sums(grad_bias != nullptr ? n * channels : 0);
    masked_planes<scalar_t>(grad_out.const_data_ptr<scalar_t>(), argmax.const_data_ptr<uint8_t>(),
                            out.data_ptr<scalar_t>(), n * channels, plane,
                            grad_bias != nullptr ? sums.data() : nullptr);
    if (grad_bias == nullptr) return;
    scalar_t* gb = grad_bias->data_ptr<scalar_t>();
    for (int64_t o = 0; o < channels; ++o) {
      scalar_t total = scalar_t(0);
      for (int64_t i = 0; i < n; ++i) total += sums[i * channels + o];
      gb[o] = total;
    }
  });
  return out;
}

// The conv output's gradient, dense: grad_out at each window's argmax, 0 elsewhere, for the
// pooled layers' gradients that Inf/NaN reach (they must propagate exactly as in the stock
// composition's dense backward). Layers without pooling take masked_grad instead.
inline at::Tensor dense_grad(const at::Tensor& grad_out, const at::Tensor& argmax,
                             const ConvPoolGeometry& g) {
  const at::Tensor valid = argmax != kNoGrad;
  const at::Tensor pos = at::where(valid, argmax.to(at::kLong), 0);
  const auto lopt = argmax.options().dtype(at::kLong);
  const at::Tensor base =
      at::arange(g.ph, lopt).view({-1, 1}) * (g.psh * g.ow) + at::arange(g.pw, lopt) * g.psw;
  const at::Tensor flat = base + at::div(pos, g.poolw, "floor") * g.ow + pos.remainder(g.poolw);
  at::Tensor dense = empty_reused({g.n, g.o, g.oh * g.ow}, grad_out.options()).zero_();
  dense.scatter_add_(2, flat.reshape({g.n, g.o, g.ph * g.pw}),
                     at::where(valid, grad_out, 0).reshape({g.n, g.o, g.ph * g.pw}));
  return dense.view({g.n, g.o, g.oh, g.ow});
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_backward(
    const at::Tensor& grad_out, const at::Tensor& argmax, const at::Tensor& input,
    const at::Tensor& weight, const ConvPoolGeometry& g, std::array<bool, 3> mask) {
  return at::convolution_backward(dense_grad(grad_out, argmax, g), input, weight,
                                  at::IntArrayRef{g.o}, {g.sh, g.sw}, {g.padh, g.padw}, {1, 1},
                                  false, {0, 0}, 1, mask);
}

// Independent sums of span_finite: each FMA waits on its sum's previous one, so with one sum
// the check ran at one vector per FMA latency (half of the backward op's own time outside its
// kernels, LeNet-5 step at batch 256, perf). 8 = FMA latency (4) x FMA ports (2): enough sums
// in flight to keep both FMA units busy. Backward op, 2 threads, in one process alternately,
// Xeon VM, batch 64 / 256: LeNet-5's conv2 1.018x / 1.018x, conv1 1.038x / 1.021x.
constexpr int kFiniteSums = 8;

// True when each of the n values at p is finite (x * 0 is 0 for finite x, NaN otherwise).
template <typename T>
bool span_finite(const T* p, int64_t n) {
  using V = typename VecOf<T, kVecBytes>::type;
  constexpr int VW = VecOf<T, kVecBytes>::kLanes;
  V acc[kFiniteSums] = {};
  int64_t i = 0;
  for (; i + kFiniteSums * VW <= n; i += kFiniteSums * VW)
    for (int k = 0; k < kFiniteSums; ++k) acc[k] += load<V>(p + i + k * VW) * T(0);
  for (; i + VW <= n; i += VW) acc[0] += load<V>(p + i) * T(0);
  for (int k = 1; k < kFiniteSums; ++k) acc[0] += acc[k];
  T tail = T(0);
  for (; i < n; ++i) tail += p[i] * T(0);
  for (int l = 0; l < VW; ++l) tail += acc[0][l];
  return tail == T(0);
}

// Chunks of the samples a weight gradient is summed in, each into a buffer of its own: one per
// thread, also in a serial op (cpu_parallel.h), whose one thread then takes every chunk. The
// sums then depend neither on the op's size nor on which gradients it is asked for.
inline int64_t weight_chunks(int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
}

// Adds chunks 1 .. chunks - 1 of `partial` (chunk c from partial + c * stride) into chunk 0 over
// the values [begin, end), in chunk order.
template <typename T>
void add_chunks(T* partial, int64_t chunks, int64_t stride, int64_t begin, int64_t end) {
  for (int64_t chunk = 1; chunk < chunks; ++chunk) {
    T* __restrict s0 = partial + begin;
    const T* __restrict sc = partial + chunk * stride + begin;
    for (int64_t k = 0; k < end - begin; ++k) s0[k] += sc[k];
  }
}

// grad_w from the backward's sums, [O][KH][rowsize] (each row [KW][pix], the first C of each
// pix used) into gw as [O][C][KH][KW], output channels [o0, o1) (from_rows_at).
template <typename T>
void repack_weight_grad(const T* sums, const ConvPoolGeometry& g, int64_t rowsize, int64_t pix,
                        int64_t o0, int64_t o1, T* gw) {
  const int64_t taps = g.kh * g.kw;
  const auto off = tap_rows(g, rowsize, pix);
  for (int64_t o = o0; o < o1; ++o)
    from_rows_at(sums + o * g.kh * rowsize, off.data(), g.c, taps, gw + o * g.c * taps, taps);
}

// The sparse gradients that backward_kernel could not give because Inf/NaN reached them (the
// caller computes those with dense_backward, as stock's dense backward would).
struct BwdFallback {
  bool input = false;
  bool weight = false;
};

// Both backward gradients of a batch in one parallel region: grad_w and grad_b when
// `want_weight`, grad_x (into grad_input) when `want_input`. The samples are split into parts,
// one per thread: a part's grad_w chunk (each chunk summing into its own buffer, added in chunk
// order: bitwise identical run to run for a given thread count), then grad_x of the part's
// samples, one at a time from the part's cursor; a thread done with its part takes samples from
// the others' cursors. One op, one parallel region and the finiteness checks inside the tasks
// (measured faster than one op per gradient).
//
// Part p runs on thread p (at::parallel_for's static split), the thread whose forward kernels
// wrote or read the same samples (they split the batch the same way): the samples' inputs,
// gradients and argmax are in that core's caches, and the next layer's backward finds grad_x
// there. One shared counter over all tasks handed the first task, chunk 0, to whichever thread
// came first. LeNet-5 step, fused SGD, 2 threads, in one process alternately, Xeon VM, batch 64
// / 256, median step-time ratio: 1.014-1.015x / 1.029-1.030x (two runs; 1.001x at batch 1).
template <typename T>
BwdFallback backward_kernel(const at::Tensor& grad_out, const at::Tensor& argmax,
                            const at::Tensor& input, const at::Tensor& weight,
                            const ConvPoolGeometry& g, bool want_input, bool want_weight,
                            at::Tensor& grad_input, at::Tensor& grad_weight,
                            at::Tensor& grad_bias) {
  constexpr int VW = BwdLayout<T>::VW;
  // grad_w: the input's samples; with a twin (twin_offset) where a patch row is one vector or
  // where whole-line rows of half-line pixels take the wide kernels (aligned_wide_weight).
  const bool half_lines = aligned_wide_weight<T>(g);
  int64_t wpix = half_lines ? VW : weight_pixel<T>(g.c, g.kw);
  // Patches the register-blocked kernels cannot hold take the wide kernels.
  const bool wide = half_lines || !register_blocked(g, (g.kw * wpix + VW - 1) / VW);
  // grad_w of one-channel inputs from stacks of rows where that applies.
  const bool stacks = want_weight && stack_weight_suits<T>(g);
  // The wide kernels read packed patch rows (PackedRows) where those take fewer vectors.
  const int64_t packed_nv = wide && want_weight && !stacks
                                ? packed_vectors<T>(g, wide_vectors(g.kw * wpix, WideVec<T>::VW))
                                : 0;
  if (packed_nv > 0) wpix = g.c;
  const bool twin =
      packed_nv == 0 && (half_lines || (g.kw * wpix <= VW && g.kh <= kMaxKH &&
                                        wpix * int64_t{sizeof(T)} <= kTwinMaxPixelBytes &&
                                        g.ph * g.pw >= kTwinMinWindows));
  BwdLayout<T> L(g, wpix, twin ? kCacheLineElems<T> : 1);
  const std::optional<StackLayout<T>> SL =
      stacks ? std::make_optional<StackLayout<T>>(g) : std::nullopt;
  BwdLayout<T> LX(g, padded_pixel(g.c, VW));  // grad_x
  const bool wide_x = !register_blocked(g, LX.nv) && g.o >= kWideInputMinOut;
  const WideWeightPlan plan = wide_weight_plan(g.kh, L.rowlen, WideVec<T>::VW);
  const std::optional<PackedRows<T>> packed =
      packed_nv > 0 ? std::make_optional<PackedRows<T>>(g, plan.nv) : std::nullopt;
  // The wide kernels' full vectors reach up to a whole number of wide vectors past a patch row.
  const int64_t hp = g.h + 2 * g.padh;
  if (wide) L.size = std::max(L.size, hp * L.wpc + plan.nv * WideVec<T>::VW);
  if (twin) L.twin = twin_offset<T>(L.size);  // past the copy's last vector
  const WideInputPlan xplan = wide_input_plan(g, LX.rowlen, WideVec<T>::VW, kWideBytes);
  if (wide_x) LX.size = std::max(LX.size, hp * LX.wpc + xplan.nv * WideVec<T>::VW);
  const bool blocked_x = register_blocked(g, LX.nv);
  // grad_x by pooling-window region (conv_relu_pool_cpu_bwd_tile.h) where that is expected to
  // beat the per-channel kernel; measured on AVX-512 only.
  const TileInputPlan tplan =
      kPadPixels && blocked_x
          ? tile_input_choice<T>(g, LX.pix, LX.nv, LX.pix * int64_t{sizeof(T)} % kBwdBytes == 0)
          : TileInputPlan{};
  if (tplan.ok()) LX.size = std::max(LX.size, tile_input_extent<T>(tplan, LX.woff, LX.wpc));
  // Accumulators as [O][KH][NV*VW] (NV vectors of the register-blocked or the wide kernel); the
  // weight for grad_x as [O][KH][NV*VW] (register-blocked) or [O][KH][rowlen], in LX's rows.
  const int64_t rowsize = wide ? plan.nv * WideVec<T>::VW : L.nv * VW;
  const int64_t rowsize_x = blocked_x ? LX.nv * VW : LX.rowlen;
  const int64_t wsize = g.o * g.kh * rowsize;
  const int64_t sample = g.c * g.h * g.w, plane_out = g.ph * g.pw;
  const T* w = weight.const_data_ptr<T>();
  BwdFallback fallback;
  // The sparse kernels skip windows with no gradient; stock's dense backward multiplies their
  // zeros by the weight (grad_x) or the input (grad_w): Inf/NaN there take the dense path.
  fallback.input = want_input && !span_finite(w, weight.numel());
  want_input = want_input && !fallback.input;
  // The weight as [O][KH][KW][pix], zero past C and past each row (wide: wide_input_weight).
  const bool narrow_x = want_input && !wide_x && !tplan.ok();
  AlignedVector<T> wcl(narrow_x ? g.o * g.kh * rowsize_x : 0, T(0));
  if (narrow_x) {
    const int64_t taps = g.kh * g.kw;
    const auto off = tap_rows(g, rowsize_x, LX.pix);
    for (int64_t o = 0; o < g.o; ++o)
      rows_at(w + o * g.c * taps, taps, g.c, taps, off.data(), wcl.data() + o * g.kh * rowsize_x);
  }
  const auto wtile =
      want_input && tplan.ok() ? tile_input_weight(w, g, LX.pix, tplan) : AlignedVector<T>();
  const TileInputFn<T> tfn = tplan.ok() ? tile_input_fn<T>(tplan) : nullptr;
  const auto wwide =
      want_input && wide_x ? wide_input_weight(w, g, LX.pix, xplan) : AlignedVector<T>();
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = want_weight ? weight_chunks(g.n) : 0;
  // Each chunk's sums start on a cache line of their own, so that no line is written by two
  // threads (LeNet-5 conv1's chunks were 984 bytes apart: chunk 0's grad_b and chunk 1's first
  // grad_w values shared one, written at every sample).
  constexpr int64_t kLine = kCacheLineElems<T>;
  const int64_t stride = (wsize + g.o + kLine - 1) / kLine * kLine;
  AlignedVector<T> partial(chunks * stride, T(0));
  const T* x = input.const_data_ptr<T>();
  const T* gop = grad_out.const_data_ptr<T>();
  const uint8_t* amp = argmax.const_data_ptr<uint8_t>();
  T* gi = want_input ? grad_input.data_ptr<T>() : nullptr;
  const auto& tables = bwd_tables<T>();
  const int64_t khb = wide ? g.kh : rows_per_pass(g.kh, L.nv);
  const WeightSampleFn<T> wfn = wide ? nullptr : tables.weight[khb - 1][L.nv - 1];
  const WeightSampleFn<T> wfn_last =  // the last pass over patch rows
      wide ? nullptr : tables.weight[(g.kh - 1) % khb][L.nv - 1];
  const InputSampleFn<T> ifn =
      blocked_x ? tables.input[g.kh - 1][LX.nv - 1] : &bwd_input_sample_generic<T>;
  std::atomic<bool> x_bad{false}, go_bad{false};
  const int64_t parts = want_weight ? chunks : std::min(threads, g.n);
  struct alignas(kCacheLineElems<char>) Cursor {  // a line each: no line written by two threads
    std::atomic<int64_t> next;
  };
  AlignedVector<Cursor> cursor(std::max<int64_t>(parts, 0));
  for (int64_t p = 0; p < parts; ++p) cursor[p].next = p * g.n / parts;
  cpu::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    AlignedVector<T> xcl(want_weight && !stacks ? L.size + L.twin : 0, T(0));
    AlignedVector<T> rows(packed ? packed->size : 0);
    AlignedVector<T> dx(want_input ? LX.size : 0);
    WideLists<T> lists;
    TileLists<T> tlists;
    const auto run = [&](int64_t t) {  // grad_w chunk t, or grad_x of sample t - chunks
      if (t < chunks) {
        T* gw = partial.data() + t * stride;
        StackScratch<T>* ss = stacks ? &stack_scratch<T>(*SL, g.o) : nullptr;
        for (int64_t n = t * g.n / chunks; n < (t + 1) * g.n / chunks; ++n) {
          if (!span_finite(x + n * sample, sample)) x_bad = true;
          if (ss) {
            const int64_t at = n * g.o * plane_out;
            build_stacks(x + n * sample, g, *SL, ss->stacks.data());
            SL->fn(gop + at, amp + at, g.n * g.o * plane_out - at, g, *SL, *ss);
            continue;
          }
          to_padded_cl(x + n * sample, g, L, xcl.data());
          if (L.twin) std::memcpy(xcl.data() + L.twin, xcl.data(), L.size * sizeof(T));
          const T* go = gop + n * g.o * plane_out;
          const uint8_t* am = amp + n * g.o * plane_out;
          if (packed) {
            pack_rows(xcl.data(), g, L.wpc, *packed, rows.data());
            wide_weight_sample(rows.data(), go, am, g, packed->woff.data(), packed->qoff.data(),
                               packed->step, 0, plan, gw, gw + wsize);
          } else if (wide)
            wide_weight_sample(xcl.data(), go, am, g, L.woff.data(), L.qoff.data(), L.wpc, L.twin,
                               plan, gw, gw + wsize);
          else
            for (int64_t kh0 = 0; kh0 < g.kh; kh0 += khb)
              (kh0 + khb < g.kh ? wfn : wfn_last)(xcl.data(), go, am, g, L, gw, gw + wsize, kh0);
        }
        if (ss) stack_weight_finish(*ss, g, *SL, rowsize, gw, gw + wsize);
      } else {
        const int64_t n = t - chunks;
        const T* go = gop + n * g.o * plane_out;
        if (!span_finite(go, g.o * plane_out)) go_bad = true;
        std::fill(dx.begin(), dx.end(), T(0));
        if (wide_x)
          wide_input_sample(dx.data(), go, amp + n * g.o * plane_out, g, LX.woff.data(),
                            LX.qoff.data(), LX.wpc, xplan, wwide.data(), lists);
        else if (tfn)
          tfn(dx.data(), go, amp + n * g.o * plane_out, g, LX.woff.data(), LX.wpc, tplan,
              wtile.data(), tlists);
        else
          ifn(dx.data(), go, amp + n * g.o * plane_out, g, LX, wcl.data());
        from_padded_cl(dx.data(), g, LX, gi + n * sample);
      }
    };
    const auto drain = [&](int64_t q) {
      const int64_t end = (q + 1) * g.n / parts;
      for (int64_t n = cursor[q].next++; n < end; n = cursor[q].next++) run(chunks + n);
    };
    for (int64_t p = p0; p < p1; ++p) {
      if (want_weight) run(p);
      if (want_input) drain(p);
    }
    if (want_input)
      for (int64_t q = 1; q < parts; ++q) drain((p1 - 1 + q) % parts);
  });
  fallback.weight = x_bad;
  fallback.input = fallback.input || go_bad;
  if (!want_weight) return fallback;
  // The chunks' sums added in chunk order (add_chunks) and rearranged from [O][KH][KW][pix]
  // (rows padded to rowsize) to [O][C][KH][KW] in one pass over the threads. vgg-128-128 (128 ->
  // 128 3x3), grad_w alone at batch 1, against a serial add, then a serial rearrangement:
  // 175-195 -> 159-169 us.
  T* gwp = grad_weight.data_ptr<T>();
  T* gbp = grad_bias.data_ptr<T>();
  T* sums = partial.data();
  const int64_t pix = L.pix;
  const int64_t grain = std::max<int64_t>(1, kRepackGrain / (g.c * g.kh * g.kw));
  cpu::parallel_for(0, g.o, grain, [=](int64_t o0, int64_t o1) {
    // The chunks added into chunk 0, then moved.
    const int64_t rows = g.kh * rowsize;
    add_chunks(sums, chunks, stride, o0 * rows, o1 * rows);
    add_chunks(sums, chunks, stride, wsize + o0, wsize + o1);
    repack_weight_grad(sums, g, rowsize, pix, o0, o1, gwp);
    for (int64_t o = o0; o < o1; ++o) gbp[o] = sums[wsize + o];
  });
  return fallback;
}

}  // namespace fastlenet::cpu
