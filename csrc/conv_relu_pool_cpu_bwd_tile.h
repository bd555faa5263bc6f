// grad_x of conv2d -> ReLU -> max_pool2d on the CPU, one pooling window's region at a time.
// Math and saved state: fastlenet/reference.py (conv_relu_pool).
// Computes: per sample, grad_x into a channels-last, zero-padded buffer (BwdLayout in
// conv_relu_pool_cpu_bwd.h), visiting only each window's argmax patch. Accumulates in the
// data's own type. Saves nothing; reads grad_out, argmax and w (repacked). Buffers and the
// Inf/NaN fallback: backward_kernel in conv_relu_pool_cpu_bwd.h, which calls this.
//
// Every argmax patch of a pooling window lies in the window's region: (poolh - 1) * sh + KH rows
// of (poolw - 1) * sw + KW pixels. Per window position the region stays in registers while the
// output channels' patches are added to it (g * w[o], the weight rows placed for the argmax
// position: a repacked copy per column shift; the row shift either a constant of the list the
// channel is in or a pointer offset into zero rows, TileInputPlan), then the region is added to
// grad_x in one read-modify-write. The channels whose window passes gradient are listed per
// window position first (TileLists), so the FMA loop reads only a gradient and an offset per
// channel. The per-channel kernel (bwd_input_sample) does one read-modify-write of the patch per
// window instead: its stores bound it (conv2 of LeNet-5: 25 stores of 32 bytes per window).
// tile_input_choice picks between them.
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
#include "conv_relu_pool_cpu_bwd_wide.h"
#include "cpu_vec.h"

namespace fastlenet::cpu {

// Bytes of the repacked weight one pass over the windows reads (TileInputPlan::ob): with the
// grad_x buffer beside it, most of a 48 KiB L1. LeNet-5's conv2 (all 16 channels, 37 KiB) ran
// 1.13x faster than in passes of 28 KiB; wide layers 1.03-1.07x faster than at 28-36 KiB and
// 1.2-1.6x faster than with every channel in one pass.
constexpr int64_t kTileWeightBytes = 40 << 10;
// Region tiles up to this many vectors stay in registers with the broadcast gradient and
// temporaries beside them.
constexpr int kTileMaxVecs = kVecRegs - 4;
// Region rows and vectors per row the kernels are instantiated for (7x7 patches, pool 3).
constexpr int kTileMaxRows = 9;
constexpr int kTileMaxNZ = 4;
// Largest row shift between a window's positions the kernels are instantiated for (pool 3 over
// a stride-1 conv: 2).
constexpr int kTileMaxLead = 2;

// How the region kernel reads the repacked weight. A region row of more vectors than the
// registers hold is split into `groups` column groups of `nz` vectors, one pass over the windows
// each. Two ways to place a channel's KH weight rows in the region's RH = lead + KH rows:
// - one list per row shift (`shifts` = lead + 1): each list's channels add their KH rows to
//   region rows d .. d + KH - 1, d a constant of the list;
// - one list (`shifts` = 1): every channel adds RH rows, its KH rows with zero rows around them
//   (`top` zero rows first, then per channel its KH rows and `lead` zero rows), the row shift a
//   pointer offset. lead * nz FMAs per channel more, but per window one list to walk instead of
//   lead + 1, each ending in a mispredicted branch (split_shifts).
// Per (group, column shift qx): `top` rows, then per output channel `block` elements; `per_qx`
// elements in all. wq[q] is the offset, within a group, of the rows read for argmax position q
// (channel 0); dq[q] the list it goes to (its row shift, or 0 with one list).
struct TileInputPlan {
  int64_t rh = 0, nz = 0;  // region rows, vectors per region row of a group
  int64_t groups = 0;      // column groups
  int64_t shifts = 0;      // lists per window: lead + 1, or 1
  int64_t top = 0;         // zero rows before each column shift's channels: 0, or lead
  int64_t block = 0, per_qx = 0, per_group = 0;
  int64_t ob = 0;  // output channels per pass over the windows (their weights stay in L1)
  std::array<int64_t, 256> wq{}, dq{};
  bool ok() const { return rh > 0; }
};

// Whether a window's channels go to one list per row shift: where a channel's KH rows of `nz`
// vectors are at least kTileSplitMinFmas FMAs (fewer, and the loop over a list waits on each
// entry's offset load whatever its FMAs: dropping some gains nothing), and a pass of `ob`
// channels saves at least kTileSplitMinSaved FMAs per extra list (ob * nz per unit of row shift,
// for the branch that ends the list). grad_x alone, Intel Xeon VM (AVX-512), 2 threads, float32,
// in one process alternately, batch 64 / 256, one list -> a list per shift (KH x nz, ob x nz):
// taken: LeNet-5's conv2 (15, 48) 1.12x / 1.10x, 6 -> 12 5x5 (15, 36) 1.10x / 1.16x, 8 -> 16
// 5x5 (15, 48) 1.08x / 1.07x, 6 -> 120 5x5 (15, 63) 1.15x / 1.18x, 4 -> 13 5x5 (10, 26) 1.10x /
// 1.09x, 5 -> 12 5x5 pool 3 (20, 48) 1.19x / 1.20x; not taken: 3 -> 6 5x5 pool 3 (10, 12) 0.97x
// / 0.97x, 2 -> 16 5x5 (5, 16) 0.95x / 0.88x, 1 -> 6 5x5 (5, 6) 0.96x / 0.96x, 6 -> 16 3x3 (6,
// 32) 0.99x / 0.96x, 6 -> 20 3x3 (6, 40) 1.00x / 1.02x, 7 -> 12 3x3 pool 3 (9, 36) 0.99x /
// 0.99x, 3 -> 8 3x3 (3, 8) 0.77x / 0.76x.
constexpr int64_t kTileSplitMinFmas = 10;
constexpr int64_t kTileSplitMinSaved = 24;
inline bool split_shifts(int64_t kh, int64_t nz, int64_t ob) {
  return kh * nz >= kTileSplitMinFmas && ob * nz >= kTileSplitMinSaved;
}

template <typename T>
TileInputPlan tile_input_plan(const ConvPoolGeometry& g, int64_t pix) {
  constexpr int VW = WideVec<T>::VW;
  TileInputPlan p;
  const int64_t lead = (g.poolh - 1) * g.sh;
  const int64_t rh = lead + g.kh;
  const int64_t vecs = (((g.poolw - 1) * g.sw + g.kw) * pix + VW - 1) / VW;
  if (rh > kTileMaxRows) return p;
  const int64_t max_nz = std::min<int64_t>(kTileMaxNZ, kTileMaxVecs / rh);
  if (max_nz < 1) return p;
  p.groups = (vecs + max_nz - 1) / max_nz;
  p.nz = (vecs + p.groups - 1) / p.groups;
  p.rh = rh;
  const int64_t rowsize = p.nz * VW;
  const auto channels = [&](int64_t block) {
    return std::clamp<int64_t>(kTileWeightBytes / (g.poolw * block * int64_t{sizeof(T)}), 1, g.o);
  };
  const bool split =
      lead > 0 && lead <= kTileMaxLead && split_shifts(g.kh, p.nz, channels(g.kh * rowsize));
  p.shifts = split ? lead + 1 : 1;
  p.top = split ? 0 : lead;
  p.block = (split ? g.kh : rh) * rowsize;
  p.ob = channels(p.block);
  p.per_qx = p.top * rowsize + g.o * p.block;
  p.per_group = g.poolw * p.per_qx;
  for (int64_t q = 0; q < g.poolh * g.poolw; ++q) {
    const int64_t dy = (q / g.poolw) * g.sh;
    p.wq[q] = (q % g.poolw) * p.per_qx + (split ? 0 : (lead - dy) * rowsize);
    p.dq[q] = split ? dy : 0;
  }
  return p;
}

// The region kernel's plan where it is expected to beat the per-channel kernel
// (bwd_input_sample: per window a read-modify-write of KH rows of `nv` narrow vectors), else an
// empty plan. Cycles per window, as measured on Zen 5 (grad_x alone, 2 threads, 18 shapes):
// the region kernel ~3/4 per region vector (an FMA and its weight load) plus the region's
// read-modify-write once per pass of `ob` channels; the per-channel kernel ~1 per vector, 2 where
// pixels do not start on a narrow vector (`aligned` false: its stores straddle cache lines and
// half-overlap the previous window's). grad_x alone, batch 64 / 256, per-channel time / region
// time: 6 -> 16 5x5 (LeNet-5's conv2) 1.21x / 1.42x, 6 -> 16 3x3 1.16x / 1.18x, 8 -> 16 5x5
// 1.30x / 1.38x, 6 -> 120 5x5 1.24x / 1.42x, 4 -> 8 5x5 1.32x / 1.35x, 3 -> 8 3x3 1.45x / 1.46x,
// 2 -> 16 3x3 2.08x / 1.99x, 1 -> 6 5x5 1.75x / 1.72x, 1 -> 32 3x3 2.24x / 2.34x; pool 3: 5 -> 12
// 3x3 1.26x / 1.27x, 3 -> 6 5x5 1.06x / 1.10x. Not taken, where the region kernel measured
// slower: pool 3 with 8-channel pixels (8 -> 16 3x3 0.76-0.78x, 6 -> 16 5x5 0.72x).
// (Measured with one list per window, before split_shifts; not measured again since.)
inline bool tile_input_wins(const TileInputPlan& p, int64_t kh, int64_t nv, bool aligned) {
  const int64_t vecs = p.rh * p.groups * p.nz;
  return 3 * vecs * p.ob + 8 * vecs < 4 * p.ob * kh * nv * (aligned ? 1 : 2);
}

// (Its lists hold int32 offsets into the repacked weight: taken only where those fit.)
template <typename T>
TileInputPlan tile_input_choice(const ConvPoolGeometry& g, int64_t pix, int64_t nv, bool aligned) {
  const TileInputPlan p = tile_input_plan<T>(g, pix);
  return p.ok() && p.groups * p.per_group < INT32_MAX && tile_input_wins(p, g.kh, nv, aligned)
             ? p
             : TileInputPlan{};
}

// Elements of the grad_x buffer the region kernel reaches: the last window's region, whose last
// vectors may run past the padded row (adding zeros).
template <typename T>
int64_t tile_input_extent(const TileInputPlan& p, const AlignedVector<int64_t>& woff, int64_t wpc) {
  if (woff.empty()) return 0;
  return woff.back() + (p.rh - 1) * wpc + p.groups * p.nz * WideVec<T>::VW;
}

// The weight as the region kernel reads it (TileInputPlan), zero elsewhere.
template <typename T>
AlignedVector<T> tile_input_weight(const T* w, const ConvPoolGeometry& g, int64_t pix,
                                   const TileInputPlan& p) {
  constexpr int VW = WideVec<T>::VW;
  const int64_t rowsize = p.nz * VW;
  AlignedVector<T> out(p.groups * p.per_group, T(0));
  // An output channel's patch rows once ([KW][pix] each, zero past C; rows_at), then copied to
  // where each column shift and group reads them: no division per element (this runs on every
  // call; at batch 1 it is a visible part of the op).
  const int64_t rowlen = g.kw * pix, taps = g.kh * g.kw;
  const auto off = tap_rows(g, rowlen, pix);
  AlignedVector<T> rows(g.kh * rowlen, T(0));
  for (int64_t o = 0; o < g.o; ++o) {
    rows_at(w + o * g.c * taps, taps, g.c, taps, off.data(), rows.data());
    for (int64_t kh = 0; kh < g.kh; ++kh) {
      const T* row = rows.data() + kh * rowlen;
      for (int64_t qx = 0; qx < g.poolw; ++qx) {
        const int64_t shift = qx * g.sw * pix;  // the row's first element in the region row
        for (int64_t grp = 0; grp < p.groups; ++grp) {
          const int64_t lo = std::max(shift, grp * rowsize);
          const int64_t hi = std::min(shift + rowlen, (grp + 1) * rowsize);
          if (lo >= hi) continue;
          T* dst = out.data() + grp * p.per_group + qx * p.per_qx + (p.top + kh) * rowsize +
                   o * p.block - grp * rowsize;
          std::copy(row + (lo - shift), row + (hi - shift), dst + lo);
        }
      }
    }
  }
  return out;
}

// Per pass of output channels, per window position k and list d (k * shifts + d; d the row
// shift of the argmax with a list per shift, else 0): the channels whose window passes gradient,
// as their gradient and the offset of the weight rows their argmax reads.
template <typename T>
struct TileLists {
  AlignedVector<int32_t> count, off;  // int32: window_lists_vec's lanes (tile_input_choice)
  AlignedVector<T> grad;
};

// grad_x of one sample into dx (channels-last, padded, wpc elements per row); woff[k] is the
// offset of pooled output k's window region. Windows with no gradient are skipped. RH region
// rows, LEAD + 1 lists per window (TileInputPlan::shifts), each channel adding KH = RH - LEAD
// weight rows.
template <typename T, int RH, int NZ, int LEAD>
void tile_input_sample(T* dx, const T* go, const uint8_t* am, const ConvPoolGeometry& g,
                       const int64_t* woff, int64_t wpc, const TileInputPlan& p, const T* wt,
                       TileLists<T>& lists) {
  using V = typename WideVec<T>::V;
  constexpr int VW = WideVec<T>::VW;
  constexpr int KH = RH - LEAD, SHIFTS = LEAD + 1;
  constexpr int64_t rowsize = NZ * VW;
  const int64_t plane = g.ph * g.pw, ob = p.ob;
  lists.count.resize(plane * SHIFTS);
  lists.off.resize(plane * SHIFTS * ob + 1);  // + 1: read one entry ahead
  lists.grad.resize(plane * SHIFTS * ob + 1);
  int32_t* count = lists.count.data();
  int32_t* off = lists.off.data();
  T* grad = lists.grad.data();
  for (int64_t o0 = 0; o0 < g.o; o0 += ob) {
    // The lists: window_lists_vec, or without a branch per window (a window with no gradient is
    // written and then overwritten by the next one of its list).
    const int64_t o1 = std::min(g.o, o0 + ob);
    if (!window_lists_vec<T, SHIFTS>(go, am, plane, g.poolh * g.poolw, SHIFTS, o0, o1, ob,
                                     p.dq.data(), p.wq.data(), p.block, count, off, grad)) {
      std::fill(count, count + plane * SHIFTS, 0);
      for (int64_t o = o0; o < o1; ++o)
        for (int64_t k = 0; k < plane; ++k) {
          const uint8_t q = am[o * plane + k];
          const int64_t list = SHIFTS == 1 ? k : k * SHIFTS + p.dq[q];
          const int64_t at = list * ob + count[list];
          off[at] = o * p.block + p.wq[q];
          grad[at] = go[o * plane + k];
          count[list] += q != kNoGrad;
        }
    }
    for (int64_t grp = 0; grp < p.groups; ++grp) {
      const T* wg = wt + grp * p.per_group;
      for (int64_t k = 0; k < plane; ++k) {
        V acc[RH][NZ] = {};
        // One list per row shift D: its channels' KH weight rows add to region rows D ..
        // D + KH - 1. The next entry's offset and gradient are read one entry ahead of its FMAs
        // (the offset is on the path to their addresses): grad_x alone, batch 64, 2 threads, in
        // one process, LeNet-5's conv2 1.043x, odd-10-22 1.031x.
        [&]<int... D>(std::integer_sequence<int, D...>) {
          (
              [&] {
                const int64_t first = (k * SHIFTS + D) * ob, last = first + count[k * SHIFTS + D];
                int64_t next_off = off[first];
                T next_g = grad[first];
                for (int64_t i = first; i < last; ++i) {
                  const T* wr = wg + next_off;
                  const T gv = next_g;
                  next_off = off[i + 1];
                  next_g = grad[i + 1];
                  for (int r = 0; r < KH; ++r)
                    for (int z = 0; z < NZ; ++z)
                      acc[D + r][z] += gv * load<V>(wr + r * rowsize + z * VW);
                }
              }(),
              ...);
        }(std::make_integer_sequence<int, SHIFTS>{});
        T* row = dx + woff[k] + grp * rowsize;
        for (int r = 0; r < RH; ++r, row += wpc)
          for (int z = 0; z < NZ; ++z) store(row + z * VW, load<V>(row + z * VW) + acc[r][z]);
      }
    }
  }
}

template <typename T>
using TileInputFn = void (*)(T*, const T*, const uint8_t*, const ConvPoolGeometry&, const int64_t*,
                             int64_t, const TileInputPlan&, const T*, TileLists<T>&);

template <typename T>
struct TileTables {
  std::array<std::array<std::array<TileInputFn<T>, kTileMaxLead + 1>, kTileMaxNZ>, kTileMaxRows>
      input{};
  TileTables() { rows(std::make_integer_sequence<int, kTileMaxRows>{}); }
  template <int... R>
  void rows(std::integer_sequence<int, R...>) {
    (cols<R + 1>(std::make_integer_sequence<int, kTileMaxNZ>{}), ...);
  }
  template <int RH, int... Z>
  void cols(std::integer_sequence<int, Z...>) {
    (leads<RH, Z + 1>(std::make_integer_sequence<int, kTileMaxLead + 1>{}), ...);
  }
  template <int RH, int NZ, int... L>
  void leads(std::integer_sequence<int, L...>) {
    (entry<RH, NZ, L>(), ...);
  }
  template <int RH, int NZ, int LEAD>
  void entry() {
    if constexpr (RH * NZ <= kTileMaxVecs && LEAD < RH)
      input[RH - 1][NZ - 1][LEAD] = &tile_input_sample<T, RH, NZ, LEAD>;
  }
};

template <typename T>
TileInputFn<T> tile_input_fn(const TileInputPlan& p) {
  static const TileTables<T> tables;
  return tables.input[p.rh - 1][p.nz - 1][p.shifts - 1];
}

}  // namespace fastlenet::cpu
