// Backward kernels of conv2d -> ReLU -> max_pool2d on the CPU for wide layers: patch rows of
// many channels (KW * C values), too long for conv_relu_pool_cpu_bwd.h's per-window registers.
// Math and saved state: fastlenet/reference.py (conv_relu_pool).
// Computes: per sample, grad_w and grad_b (accumulated into [O][KH][rowsize] and [O]) and
// grad_x (into a channels-last, zero-padded buffer), visiting only each window's argmax patch,
// as blocked work over the argmax positions. Accumulates in the data's own type. Saves nothing;
// reads x (channels-last copy), w (repacked), grad_out and argmax. Buffers, chunking and the
// Inf/NaN fallback: backward_kernel in conv_relu_pool_cpu_bwd.h, which calls these.
//
// - grad_w: a tile of RB patch rows x TV vectors of one output channel's accumulators stays in
//   registers across that channel's windows; each FMA loads one vector of the argmax patch
//   (L1, the sample's channels-last copy, or its packed patch rows: PackedRows).
// - grad_x: per window the output channels are grouped by argmax position q; per q and tile of
//   TV vectors of a patch row, sum_o g[o] * w[o, tile] is accumulated in registers (two sets,
//   alternating channels, for independent FMA chains) from the weight tile, repacked so that
//   a tile of every output channel is contiguous and stays in L1, then added to the grad_x
//   patch in one read-modify-write per (q, tile), instead of one per FMA.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "checks.h"
#include "cpu_parallel.h"
#include "cpu_vec.h"

namespace fastlenet::cpu {

// Vectors of the wide kernels: the target's widest. Their rows have many channels, so most
// vectors are full; on AVX-512 (Zen 5, 2 threads, batch 64) 64-byte vectors measured faster
// than 32-byte ones: the whole backward 1.6x at 16 -> 32 (5x5), 1.45x at 64 -> 128 (3x3), 1.2x
// at 37 -> 77 (5x5), the same at 10 -> 22 (5x5).
constexpr int kWideBytes = kVecBytes;
// Accumulator vectors of one grad_w tile (RB * TV): three quarters of the vector registers,
// leaving room for the broadcast gradient and loaded inputs.
constexpr int kWideAcc = kVecRegs * 3 / 4;
// Patch rows per grad_w tile and vectors per tile of a patch row (both kernels).
constexpr int kWideMaxRows = 7;
constexpr int kWideMaxTV = 12;
// Vectors per grad_x tile (RB rows x TV vectors): at most kWideXVecs (two sets of accumulators,
// alternating channels, fill 16 registers: independent FMA chains) and such that the tile of
// every output channel's weights takes at most kWideXTileBytes (L1 holds it with the grad_x
// patch and the lists; at 128 output channels 4 vectors, 8 FMA chains: 4 cycles of latency x 2
// FMA pipes).
constexpr int kWideXVecs = 8;
constexpr int64_t kWideXTileBytes = 32 << 10;
// Weight elements per parallel task of the per-call repacks and sums of the weight (below a few
// such tasks a parallel region costs more than it saves).
constexpr int64_t kRepackGrain = 1 << 14;
// Sample bytes one band of grad_w's windows reads (whole pooled rows: psh * sh input rows
// each): every output channel's tile goes over a band's windows, then the next band's, so the
// rows it reads stay in L1 from one channel to the next; a channel over the whole plane
// evicted them where the sample's copy is larger than L1. Each accumulator adds the same
// products in the same order: the same bits. grad_w alone, batch 64, 2 threads, 4 rounds of
// alternating processes, median us: examples-conv2 (32 -> 64 3x3 26x26, 86 KiB a sample)
// whole plane ~1430, 24 KiB bands ~1310, 32 KiB ~1240 (12 KiB: the whole backward slower than
// with no bands); planes within a band (vgg-64-128 8x8, LeNet-5's conv2) as before.
constexpr int64_t kWideBandBytes = 32 << 10;
// Up to this many bytes of rows (every pooled row's), the plane is one band: each channel's
// tile then loads and stores its accumulators once per sample instead of once per band
// (vgg-128-128: bands of 3 and 1 pooled rows at 32 KiB, 2 and 2 at 20 KiB, both ~2.2 ms on the
// twenty-ninth session's Xeon VM; one band of 4 below). grad_w alone, 2 threads, Xeon VM,
// alternating in one process, the same bits; plane (KiB of rows) and speedup over 32 KiB bands
// at batch 64, 3x3 pad 1 pool 2 unless noted: 128 -> 128 8x8 (41) 1.19-1.21x (batch 256 1.20x;
// the whole backward 1.11x), 128 -> 128 9x9 (45) 1.14x, 96 -> 96 10x10 (46) 1.07x, 64 -> 96
// 12x12 pool 3 (36) 1.10-1.14x, 32 -> 64 16x16 (37) 1.05x, 64 -> 64 12x12 (43) 1.03x, 24 -> 40
// 5x5 pad 0 20x20 (41) 0.98-1.02x. Larger planes keep their bands: as one band, 32 -> 64 pad 0
// 26x26 (80) 0.85x and 16 -> 32 32x32 pool 3 (65) 0.90x; in 48 KiB bands 0.92x and 0.96x.
constexpr int64_t kWideOneBandBytes = 48 << 10;

// Where each tap (kh, kw) of one output channel's weight rows starts, rows of `rowsize`
// elements per kh and `pix` per kw (the offsets rows_at and from_rows_at take).
inline AlignedVector<int64_t> tap_rows(const ConvPoolGeometry& g, int64_t rowsize, int64_t pix) {
  AlignedVector<int64_t> off(g.kh * g.kw);
  for (int64_t kh = 0; kh < g.kh; ++kh)
    for (int64_t kw = 0; kw < g.kw; ++kw) off[kh * g.kw + kw] = kh * rowsize + kw * pix;
  return off;
}

template <typename T>
struct WideVec {
  using V = typename VecOf<T, kWideBytes>::type;
  static constexpr int VW = VecOf<T, kWideBytes>::kLanes;
};

// Vectors per patch row of `rowlen` values, and that split into tiles of at most `max_tv`
// vectors of equal size (the last may be shorter).
inline int64_t wide_vectors(int64_t rowlen, int vw) { return (rowlen + vw - 1) / vw; }
inline int64_t wide_tile(int64_t nv, int64_t max_tv) {
  const int64_t tiles = (nv + max_tv - 1) / max_tv;
  return (nv + tiles - 1) / tiles;
}

// What to add to a patch row starting `at` elements into grad_w's copy of the sample to read it
// from a whole vector boundary: 0, or `twin` where the copy has a twin half a vector along
// (conv_relu_pool_cpu_bwd.h: aligned_wide_weight) and the row starts off a boundary. 0 without
// a twin.
template <typename T>
int64_t wide_twin_shift(int64_t at, int64_t twin) {
  return (at & (WideVec<T>::VW - 1)) != 0 ? twin : 0;
}

// grad_w of RB patch rows (from kh0) x TV vectors (from column c0 of the row) for every output
// channel of one sample, `band` windows at a time (kWideBandBytes): gw is [O][KH][rowsize], gb
// [O] (summed in the pass with kh0 = c0 = 0); `twin`: wide_twin_shift.
// A window with no gradient is visited with g = 0 (branch-free; x is finite here).
template <typename T, int RB, int TV>
void wide_weight_tile(const T* xcl, const T* go, const uint8_t* am, const ConvPoolGeometry& g,
                      const int64_t* woff, const int64_t* qoff, int64_t wpc, int64_t twin,
                      int64_t rowsize, T* gw, T* gb, int64_t kh0, int64_t c0, int64_t band) {
  using V = typename WideVec<T>::V;
  constexpr int VW = WideVec<T>::VW;
  const int64_t plane = g.ph * g.pw;
  if (plane == 0) return;
  xcl += kh0 * wpc + c0;
  const auto channels = [&](auto has_twin, int64_t k0, int64_t k1) {
    for (int64_t o = 0; o < g.o; ++o) {
      V acc[RB][TV];
      T* gwo = gw + (o * g.kh + kh0) * rowsize + c0;
      for (int r = 0; r < RB; ++r)
        for (int v = 0; v < TV; ++v) acc[r][v] = load<V>(gwo + r * rowsize + v * VW);
      T bsum = gb[o];
      const T* gop = go + o * plane;
      const uint8_t* amo = am + o * plane;
      // Window k's gradient and patch row, read two windows ahead of its FMAs: with the argmax
      // byte and the offset tables (two loads) on the path to each FMA's address, a stand-alone
      // copy of the 5x3-vector loop ran 12.7 cycles a window on Zen 5, 11.0 read ahead. grad_w
      // alone, batch 64, 2 threads, in one process: LeNet-5's conv2 1.035x, examples-conv2 1.055x,
      // vgg-32-64 1.036x, vgg-128-128 1.047x, mid-24-40-k5 1.056x, fashion-conv2 1.011x,
      // odd-10-22 0.99x, pool3-16-32 1.00x.
      const auto window = [&](int64_t k, const T*& row, T& gv) {
        const uint8_t q = amo[k];
        gv = keep_or_zero(q != kNoGrad, gop[k]);
        const int64_t at = woff[k] + qoff[q];
        if constexpr (decltype(has_twin)::value)
          row = xcl + at + wide_twin_shift<T>(at, twin);
        else
          row = xcl + at;
      };
      const T *row1, *row2;
      T g1, g2;
      window(k0, row1, g1);
      window(std::min(k0 + 1, k1 - 1), row2, g2);
      for (int64_t k = k0; k < k1; ++k) {
        const T* row = row1;
        const T gv = g1;
        row1 = row2;
        g1 = g2;
        window(std::min(k + 2, k1 - 1), row2, g2);
        bsum += gv;
        for (int r = 0; r < RB; ++r, row += wpc)
          for (int v = 0; v < TV; ++v) acc[r][v] += gv * load<V>(row + v * VW);
      }
      for (int r = 0; r < RB; ++r)
        for (int v = 0; v < TV; ++v) store(gwo + r * rowsize + v * VW, acc[r][v]);
      if (kh0 == 0 && c0 == 0) gb[o] = bsum;
    }
  };
  // Without a twin (packed rows, most layouts) the loop computes no shift: a test, a select and
  // an add fewer per window. grad_w alone, 2 threads, in one process, batch 64 / 256: LeNet-5's
  // conv2 1.03x / 1.02x, fashion-conv2 1.04x / 1.04x, vgg-32-64 1.02x / 1.04x, mid-24-40-k5
  // 1.04x / 1.03x, odd-10-22 1.03x / 1.03x, 6 -> 120 5x5 1.04x / 1.04x, pool3-16-32 1.06x / 1.05x.
  for (int64_t k0 = 0; k0 < plane; k0 += band) {
    const int64_t k1 = std::min(plane, k0 + band);
    if (twin != 0)
      channels(std::true_type{}, k0, k1);
    else
      channels(std::false_type{}, k0, k1);
  }
}

template <typename T>
using WideWeightFn = void (*)(const T*, const T*, const uint8_t*, const ConvPoolGeometry&,
                              const int64_t*, const int64_t*, int64_t, int64_t, int64_t, T*, T*,
                              int64_t, int64_t, int64_t);

template <typename T, int RB, int TV>
constexpr WideWeightFn<T> wide_weight_fn() {
  if constexpr (RB * TV <= kWideAcc)
    return &wide_weight_tile<T, RB, TV>;
  else
    return nullptr;
}

template <typename T, int RB, int... TVs>
constexpr std::array<WideWeightFn<T>, kWideMaxTV> wide_weight_row(
    std::integer_sequence<int, TVs...>) {
  return {wide_weight_fn<T, RB, TVs + 1>()...};
}

// wide_weight_tile<RB, TV> by [RB - 1][TV - 1], for RB * TV <= kWideAcc (nullptr elsewhere).
template <typename T>
struct WideWeightTable {
  std::array<std::array<WideWeightFn<T>, kWideMaxTV>, kWideMaxRows> fn{};
  WideWeightTable() { fill<1, 2, 3, 4, 5, 6, 7>(); }
  template <int... RBs>
  void fill() {
    ((fn[RBs - 1] = wide_weight_row<T, RBs>(std::make_integer_sequence<int, kWideMaxTV>{})), ...);
  }
};

// How the grad_w tiles cover a patch: rows of `nv` vectors in tiles of `tv`, `rb` rows each.
struct WideWeightPlan {
  int64_t nv, tv, rb;
};

inline WideWeightPlan wide_weight_plan(int64_t kh, int64_t rowlen, int vw) {
  const int64_t nv = wide_vectors(rowlen, vw);
  const int64_t tv = wide_tile(nv, std::min<int64_t>(kWideMaxTV, kWideAcc));
  const int64_t rb = std::clamp<int64_t>(kWideAcc / tv, 1, std::min<int64_t>(kh, kWideMaxRows));
  return {nv, tv, rb};
}

// All grad_w tiles of one sample.
template <typename T>
void wide_weight_sample(const T* xcl, const T* go, const uint8_t* am, const ConvPoolGeometry& g,
                        const int64_t* woff, const int64_t* qoff, int64_t wpc, int64_t twin,
                        const WideWeightPlan& p, T* gw, T* gb) {
  static const WideWeightTable<T> table;
  constexpr int VW = WideVec<T>::VW;
  const int64_t rowsize = p.nv * VW;
  const int64_t row_bytes = std::max<int64_t>(1, g.psh * g.sh * wpc * int64_t{sizeof(T)});
  const int64_t rows = row_bytes * g.ph <= kWideOneBandBytes ? g.ph : kWideBandBytes / row_bytes;
  const int64_t band = std::clamp<int64_t>(rows, 1, std::max<int64_t>(g.ph, 1)) * g.pw;
  for (int64_t kh0 = 0; kh0 < g.kh; kh0 += p.rb) {
    const int64_t rb = std::min(p.rb, g.kh - kh0);
    for (int64_t v0 = 0; v0 < p.nv; v0 += p.tv) {
      const int64_t tv = std::min(p.tv, p.nv - v0);
      table.fn[rb - 1][tv - 1](xcl, go, am, g, woff, qoff, wpc, twin, rowsize, gw, gb, kh0, v0 * VW,
                               band);
    }
  }
}

// grad_w's packed patch rows: per input row y and conv output column ox, the KW pixels of C
// channels that a patch row at that column reads, stored contiguously (KW * C values) and
// padded to whole wide vectors (`rl`), so that every load of wide_weight_tile is aligned and
// a patch row is as few vectors as its values allow. The pixel layouts of the sample copy pad
// each pixel instead (weight_pixel: 6 channels to 8, 10 to 16, 24 to 32), which costs vectors
// per row: LeNet-5's conv2 (6 channels, 5x5) 2 instead of 3. Each lane sums the same products
// in the same order as with the padded pixels: the same bits. Lanes past KW * C read the next
// pixels' values (finite: x is checked) into accumulators that are dropped.
// Rows are built from a channels-last copy with C values per pixel (to_padded_cl), one row of
// `rl` values per (y, ox): KW times the sample's values.
template <typename T>
struct PackedRows {
  int64_t rl;    // elements per stored row: KW * C, rounded up to whole wide vectors
  int64_t step;  // elements between patch rows (one input row down): OW * rl
  int64_t size;  // elements of the buffer: every padded input row's OW rows
  // Per pooled output k = ph * PW + pw: its window's first patch row; per window position q:
  // the offset of its conv output's first patch row from the window's (q = 255 maps to 0).
  AlignedVector<int64_t> woff;
  std::array<int64_t, 256> qoff{};

  PackedRows(const ConvPoolGeometry& g, int64_t nv) : rl(nv * WideVec<T>::VW), step(g.ow * rl) {
    size = (g.h + 2 * g.padh) * step;
    for (int64_t q = 0; q < g.poolh * g.poolw; ++q)
      qoff[q] = (q / g.poolw) * g.sh * step + (q % g.poolw) * rl;
    woff.resize(g.ph * g.pw);
    for (int64_t ph = 0, k = 0; ph < g.ph; ++ph)
      for (int64_t pw = 0; pw < g.pw; ++pw, ++k)
        woff[k] = ph * g.psh * g.sh * step + pw * g.psw * rl;
  }
};

// Largest packed buffer per thread: the rows of neighbouring conv outputs share all but one
// of their pixels, so the buffer is ~KW times the sample, and past L1 (48 KiB on Zen 5, with
// the sample's gradient and argmax beside it) its loads cost more than the vectors saved.
// grad_w alone, batch 64 / 256, 2 threads, in one process, packed against padded pixels:
// LeNet-5's conv2 (18 KiB, 3 -> 2 vectors a row) 1.10x / 1.11x; odd-10-22 (56 KiB, 3 -> 2)
// 0.91x / 0.89x, odd-10-22-pool3 (82 KiB, 5 -> 4) 0.85x / 0.86x, mid-24-40-k5 (164 KiB, 10 -> 8)
// 0.75x / 0.74x.
constexpr int64_t kPackedMaxBytes = 32 << 10;

// Wide vectors per patch row when packed, where that is fewer than `nv` (the padded pixels')
// and the buffer fits kPackedMaxBytes; else 0.
template <typename T>
int64_t packed_vectors(const ConvPoolGeometry& g, int64_t nv) {
  const int64_t packed = wide_vectors(g.kw * g.c, WideVec<T>::VW);
  const int64_t bytes = (g.h + 2 * g.padh) * g.ow * packed * WideVec<T>::VW * int64_t{sizeof(T)};
  return packed < nv && bytes <= kPackedMaxBytes ? packed : 0;
}

// The packed rows of one sample into dst (P.size elements), from its channels-last copy src
// (`wpc` elements per padded row, C per pixel, readable to rl elements past a row's last pixel).
// NV > 0: rows of NV vectors, the copy unrolled; 0: any length. The sizes are locals: read
// through P, GCC reloaded P.rl after every vector store (which may alias it) and kept the
// one-vector loop. grad_w alone, LeNet-5's conv2 (two vectors a row): the rolled loop took 9% of
// the op's samples at batch 256.
template <typename T, int NV>
void pack_rows_nv(const T* src, const ConvPoolGeometry& g, int64_t wpc, int64_t rl, T* dst) {
  using V = typename WideVec<T>::V;
  constexpr int VW = WideVec<T>::VW;
  const int64_t hp = g.h + 2 * g.padh, ow = g.ow, colstep = g.sw * g.c;
  for (int64_t y = 0; y < hp; ++y) {
    const T* s = src + y * wpc;
    for (int64_t ox = 0; ox < ow; ++ox, s += colstep, dst += rl) {
      if constexpr (NV > 0) {
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) store(dst + v * VW, load<V>(s + v * VW));
      } else {
        for (int64_t v = 0; v < rl; v += VW) store(dst + v, load<V>(s + v));
      }
    }
  }
}

template <typename T>
void pack_rows(const T* src, const ConvPoolGeometry& g, int64_t wpc, const PackedRows<T>& P,
               T* dst) {
  constexpr int VW = WideVec<T>::VW;
  switch (P.rl / VW) {
    case 1:
      return pack_rows_nv<T, 1>(src, g, wpc, P.rl, dst);
    case 2:
      return pack_rows_nv<T, 2>(src, g, wpc, P.rl, dst);
    case 3:
      return pack_rows_nv<T, 3>(src, g, wpc, P.rl, dst);
    case 4:
      return pack_rows_nv<T, 4>(src, g, wpc, P.rl, dst);
    default:
      return pack_rows_nv<T, 0>(src, g, wpc, P.rl, dst);
  }
}

// How the grad_x tiles cover a patch: RB rows x TV vectors each; rows of `nv` vectors in `ct`
// column tiles, `rt` row tiles (the last with KH - (rt - 1) * RB rows).
struct WideInputPlan {
  int64_t nv, tv, ct, rb, rt;
};

inline WideInputPlan wide_input_plan(const ConvPoolGeometry& g, int64_t rowlen, int vw,
                                     int64_t vec_bytes) {
  const int64_t nv = wide_vectors(rowlen, vw);
  const int64_t budget = std::clamp<int64_t>(kWideXTileBytes / (g.o * vec_bytes), 2, kWideXVecs);
  const int64_t tv = wide_tile(nv, budget), ct = (nv + tv - 1) / tv;
  const int64_t rb = std::clamp<int64_t>(budget / tv, 1, g.kh), rt = (g.kh + rb - 1) / rb;
  return {nv, tv, ct, rb, rt};
}

// The weight for wide_input_sample: per tile (row tile, column tile) the tile of every output
// channel, [O][rows][TV * VW] (rows: RB, fewer in the last row tile), zero past each patch row
// (full vectors then add exact zeros to grad_x; g is finite here). `pix`: elements per pixel of
// the grad_x buffer. Tile (r, c) starts at (r * ct + c) * O * RB * TV * VW.
// Built per call, over the threads (kRepackGrain), with no division per element: on one
// thread with two divisions per element it took most of vgg-128-128's grad_x at small batches
// (128 -> 128 3x3, grad_x alone at batch 1: 723-761 -> 227-237 us; whole backward at batch
// 64: 5435-5691 -> 4817-5264 us).
template <typename T>
AlignedVector<T> wide_input_weight(const T* w, const ConvPoolGeometry& g, int64_t pix,
                                   const WideInputPlan& p) {
  constexpr int VW = WideVec<T>::VW;
  const int64_t tw = p.tv * VW, tile = g.o * p.rb * tw, taps = g.kh * g.kw;
  AlignedVector<T> wt(p.rt * p.ct * tile, T(0));
  T* wtp = wt.data();
  const int64_t grain = std::max<int64_t>(1, kRepackGrain / (g.c * taps));
  cpu::parallel_for(0, g.o, grain, [=](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o)
      for (int64_t kh = 0; kh < g.kh; ++kh) {
        const int64_t r = kh / p.rb, rows = std::min(p.rb, g.kh - r * p.rb);
        T* dst = wtp + r * p.ct * tile + (o * rows + kh % p.rb) * tw;
        for (int64_t kw = 0; kw < g.kw; ++kw) {
          const T* src = w + o * g.c * taps + kh * g.kw + kw;
          int64_t t = kw * pix / tw, col = kw * pix - t * tw;  // column tile, column in it
          for (int64_t c = 0; c < g.c; ++c, ++col) {
            if (col == tw) col = 0, ++t;
            dst[t * tile + col] = src[c * taps];
          }
        }
      }
  });
  return wt;
}

// Pool positions (buckets per window) wide_input_sample's vector lists are instantiated for:
// pools up to 3x3.
constexpr int kWideListMaxPositions = 9;

// Per-window lists of output channels for the grad_x kernels that gather them (the region
// kernel's TileLists, wide_input_sample's WideLists), 16 windows by 16 channels at a time. Channel
// o's window k with argmax position q (not kNoGrad) goes to bucket k * W + which[q] (which[q] < B)
// as entry (bucket * stride + count[bucket]++): value[q] + o * scale, and its gradient; the
// entries of a bucket in channel order, as the scalar loops write them. The block's argmax codes
// and gradients are transposed in registers (a vector per window, lanes over channels); each
// bucket's entries of a window are then one compress and one masked store of its lanes. Windows
// with no gradient are not listed (the scalar loops wrote them past their bucket's count). Writes
// count[k * W + b] for b < B. float32 on AVX-512 (BW, VL), pools of fewer than 15 positions
// (`which` and `value` are one vector; kNoGrad's low 4 bits a zero entry), int32 entries; false,
// nothing written, elsewhere.
// The lists grad_x alone spent most time on after its FMAs at LeNet-5's conv2 (~17% of it, perf;
// one thread). Against the form before (lanes over 16 windows per channel, a channel's entries
// out by two masked scatters, ~20 cycles each here), the same entries, ns per sample, Zen 5 VM,
// one thread: 6 -> 16's lists (25 windows, 2 buckets) 326 -> 99, 16 -> 32 at 7x7 (2 buckets)
// 1242 -> 400; wide_input_sample's (4 buckets): 64 channels of 144 windows 5712 -> 4124, 32 of 49
// 1333 -> 708, 128 of 16 1258 -> 870.
template <typename T, int B>
bool window_lists_vec(const T* go, const uint8_t* am, int64_t plane, int64_t positions, int64_t W,
                      int64_t o0, int64_t o1, int64_t stride, const int64_t* which,
                      const int64_t* value, int64_t scale, int32_t* count, int32_t* entries,
                      T* grad) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  if constexpr (std::is_same_v<T, float>) {
    if (positions >= 15 || (plane + 1) * W * stride >= INT32_MAX ||
        o1 * scale + stride >= INT32_MAX)
      return false;
    alignas(64) int32_t wh[kWindowBlock] = {}, va[kWindowBlock] = {};
    for (int64_t q = 0; q < positions; ++q) {
      wh[q] = static_cast<int32_t>(which[q]);
      va[q] = static_cast<int32_t>(value[q]);
    }
    const __m512i which16 = _mm512_load_si512(wh), value16 = _mm512_load_si512(va);
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i nograd = _mm512_set1_epi32(kNoGrad), low = _mm512_set1_epi32(kWindowBlock - 1);
    const __m512i per_channel = _mm512_set1_epi32(static_cast<int32_t>(scale));
    for (int64_t k0 = 0; k0 < plane; k0 += kWindowBlock) {
      const int n = static_cast<int>(std::min<int64_t>(kWindowBlock, plane - k0));
      const __mmask16 lanes = static_cast<__mmask16>((1u << n) - 1);
      int32_t cnt[kWindowBlock][B] = {};
      for (int64_t c0 = o0; c0 < o1; c0 += kWindowBlock) {
        const int nc = static_cast<int>(std::min<int64_t>(kWindowBlock, o1 - c0));
        // Row i: channel c0 + i's codes and gradients of the block's windows (rows past the
        // channels repeat the last one; their lanes are masked out below).
        Float16 codes[kWindowBlock], grads[kWindowBlock];
        for (int i = 0; i < kWindowBlock; ++i) {
          const int64_t at = (c0 + std::min(i, nc - 1)) * plane + k0;
          codes[i] = Float16(_mm512_castsi512_ps(
              _mm512_maskz_cvtepu8_epi32(0xffff, _mm_maskz_loadu_epi8(lanes, am + at))));
          grads[i] = Float16(_mm512_maskz_loadu_ps(lanes, go + at));
        }
        transpose16(codes);  // a vector per window: lanes over channels
        transpose16(grads);
        const __mmask16 channels = static_cast<__mmask16>((1u << nc) - 1);
        const __m512i first =
            _mm512_mullo_epi32(_mm512_add_epi32(_mm512_set1_epi32(c0), iota), per_channel);
        for (int l = 0; l < n; ++l) {
          const __m512i q = _mm512_castps_si512(__m512(codes[l]));
          const __mmask16 keep = _mm512_mask_cmpneq_epi32_mask(channels, q, nograd);
          const __m512i qi = _mm512_and_si512(q, low);
          const __m512i b = _mm512_permutexvar_epi32(qi, which16);
          const __m512i v = _mm512_add_epi32(_mm512_permutexvar_epi32(qi, value16), first);
          for (int s = 0; s < B; ++s) {
            const __mmask16 in = keep & _mm512_cmpeq_epi32_mask(b, _mm512_set1_epi32(s));
            const int64_t at = ((k0 + l) * W + s) * stride + cnt[l][s];
            const int listed = __builtin_popcount(in);
            const auto head = static_cast<__mmask16>((1u << listed) - 1);
            _mm512_mask_storeu_epi32(entries + at, head, _mm512_maskz_compress_epi32(in, v));
            _mm512_mask_storeu_ps(grad + at, head, _mm512_maskz_compress_ps(in, __m512(grads[l])));
            cnt[l][s] += listed;
          }
        }
      }
      for (int l = 0; l < n; ++l)
        for (int s = 0; s < B; ++s) count[(k0 + l) * W + s] = cnt[l][s];
    }
    return true;
  }
#endif
  return false;
}

// Scratch of wide_input_sample: per window, its output channels ordered by argmax position.
template <typename T>
struct WideLists {
  AlignedVector<int32_t> chan;   // [plane][NQ + 1][O]: output channels, bucketed by q
  AlignedVector<T> grad;         // their grad_out values
  AlignedVector<int32_t> count;  // [plane][NQ + 1]: entries in each bucket
};

// Sum over the entries [e, end) of g * (tile of their channel: RB rows of TV vectors, `step`
// elements per channel in wt), added to the RB rows (wpc apart) of TV vectors at dst.
template <typename T, int RB, int TV>
[[gnu::always_inline]] inline void wide_input_group(const T* wt, int64_t step, const int32_t* chan,
                                                    const T* grad, int64_t e, int64_t end, T* dst,
                                                    int64_t wpc) {
  using V = typename WideVec<T>::V;
  constexpr int VW = WideVec<T>::VW;
  // Every loop over the tile unrolled: where one was not (the odd entry's, the final sums'),
  // GCC kept both arrays on the stack around the main loop, ~30 stack loads and stores per
  // call of a few entries.
  V a0[RB][TV], a1[RB][TV];
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < TV; ++v) a0[r][v] = a1[r][v] = V{};
  for (; e + 1 < end; e += 2) {
    const T* w0 = wt + chan[e] * step;
    const T* w1 = wt + chan[e + 1] * step;
    const T g0 = grad[e], g1 = grad[e + 1];
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < TV; ++v) {
        a0[r][v] += g0 * load<V>(w0 + (r * TV + v) * VW);
        a1[r][v] += g1 * load<V>(w1 + (r * TV + v) * VW);
      }
  }
  if (e < end) {
    const T* w0 = wt + chan[e] * step;
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < TV; ++v) a0[r][v] += grad[e] * load<V>(w0 + (r * TV + v) * VW);
  }
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < TV; ++v) {
      T* d = dst + r * wpc + v * VW;
      store(d, load<V>(d) + (a0[r][v] + a1[r][v]));
    }
}

// wide_input_group over every window's buckets of one tile (dx at the tile's first element):
// one call per tile, the buckets' loops inline.
template <typename T, int RB, int TV>
void wide_input_windows(const T* wtile, int64_t step, const int32_t* chan, const T* grad,
                        const int32_t* count, int64_t o, int64_t nq, int64_t plane,
                        const int64_t* woff, const int64_t* qoff, T* dx, int64_t wpc) {
  for (int64_t k = 0; k < plane; ++k) {
    T* base = dx + woff[k];
    for (int64_t q = 0; q < nq; ++q) {
      const int64_t bucket = k * (nq + 1) + q;
      if (count[bucket] > 0)
        wide_input_group<T, RB, TV>(wtile, step, chan, grad, bucket * o, bucket * o + count[bucket],
                                    base + qoff[q], wpc);
    }
  }
}

template <typename T>
using WideWindowsFn = void (*)(const T*, int64_t, const int32_t*, const T*, const int32_t*, int64_t,
                               int64_t, int64_t, const int64_t*, const int64_t*, T*, int64_t);

template <typename T, int RB, int TV>
constexpr WideWindowsFn<T> wide_windows_fn() {
  if constexpr (RB * TV <= kWideXVecs)
    return &wide_input_windows<T, RB, TV>;
  else
    return nullptr;
}

template <typename T, int RB, int... TVs>
constexpr std::array<WideWindowsFn<T>, kWideXVecs> wide_windows_row(
    std::integer_sequence<int, TVs...>) {
  return {wide_windows_fn<T, RB, TVs + 1>()...};
}

// wide_input_windows<RB, TV> by [RB - 1][TV - 1], for RB * TV <= kWideXVecs (nullptr elsewhere).
template <typename T>
struct WideWindowsTable {
  std::array<std::array<WideWindowsFn<T>, kWideXVecs>, kWideXVecs> fn{};
  WideWindowsTable() { fill(std::make_integer_sequence<int, kWideXVecs>{}); }
  template <int... RBs>
  void fill(std::integer_sequence<int, RBs...>) {
    ((fn[RBs] = wide_windows_row<T, RBs + 1>(std::make_integer_sequence<int, kWideXVecs>{})), ...);
  }
};

// grad_x of one sample into dx (channels-last, padded as woff/qoff/wpc describe; zero on
// entry); wt from wide_input_weight with the same plan.
template <typename T>
void wide_input_sample(T* dx, const T* go, const uint8_t* am, const ConvPoolGeometry& g,
                       const int64_t* woff, const int64_t* qoff, int64_t wpc,
                       const WideInputPlan& p, const T* wt, WideLists<T>& lists) {
  static const WideWindowsTable<T> table;
  constexpr int VW = WideVec<T>::VW;
  const int64_t plane = g.ph * g.pw, nq = g.poolh * g.poolw, tw = p.tv * VW;
  // Each window's output channels bucketed by argmax position in one pass over argmax (in its
  // own order): bucket (k, q) holds up to O entries at (k * (nq + 1) + q) * O; bucket q = nq
  // takes the channels with no gradient (branch-free; never visited).
  const int64_t buckets = plane * (nq + 1);
  lists.chan.resize(buckets * g.o);
  lists.grad.resize(buckets * g.o);
  lists.count.assign(buckets, 0);
  int32_t* count = lists.count.data();
  int32_t* chan = lists.chan.data();
  T* grad = lists.grad.data();
  static const std::array<int64_t, kWindowBlock> position = [] {
    std::array<int64_t, kWindowBlock> a{};
    for (int q = 0; q < kWindowBlock; ++q) a[q] = q;
    return a;
  }();
  static const std::array<int64_t, kWindowBlock> zero{};
  const auto by_vectors = [&]<int... NQ>(std::integer_sequence<int, NQ...>) {
    bool done = false;
    ((done = done || (nq == NQ + 1 && window_lists_vec<T, NQ + 1>(go, am, plane, nq, nq + 1, 0, g.o,
                                                                  g.o, position.data(), zero.data(),
                                                                  1, count, chan, grad))),
     ...);
    return done;
  };
  if (!by_vectors(std::make_integer_sequence<int, kWideListMaxPositions>{}))
    for (int64_t o = 0; o < g.o; ++o)
      for (int64_t k = 0; k < plane; ++k) {
        const int64_t bucket = k * (nq + 1) + std::min<int64_t>(am[o * plane + k], nq);
        const int64_t at = bucket * g.o + count[bucket]++;
        chan[at] = static_cast<int32_t>(o);
        grad[at] = go[o * plane + k];
      }
  for (int64_t r = 0; r < p.rt; ++r) {
    const int64_t rows = std::min(p.rb, g.kh - r * p.rb), step = rows * tw;
    for (int64_t t = 0; t < p.ct; ++t) {
      const T* wtile = wt + (r * p.ct + t) * g.o * p.rb * tw;
      const int64_t tv = std::min(p.tv, p.nv - t * p.tv);
      table.fn[rows - 1][tv - 1](wtile, step, chan, grad, count, g.o, nq, plane, woff, qoff,
                                 dx + r * p.rb * wpc + t * tw, wpc);
    }
  }
}

}  // namespace fastlenet::cpu
