// grad_w and grad_b of conv2d -> ReLU -> max_pool2d on the CPU for one-channel inputs, with
// vector lanes over pooled columns.
// Math and saved state: fastlenet/reference.py (conv_relu_pool).
// Computes: per sample, grad_w and grad_b summed per lane ([O][KH][KW][VW] and [O][VW]; the
// lanes are added at the end of a chunk of samples, lane_weight_finish), visiting only each
// window's argmax patch. Accumulates in the data's own type. Saves nothing; reads x, grad_out
// and argmax. Buffers, chunking and the Inf/NaN fallback: backward_kernel in
// conv_relu_pool_cpu_bwd.h, which calls these.
//
// One input channel gives a patch row of KW values: the per-window kernel (bwd_weight_sample)
// spends one vector load and one FMA of a few useful lanes per patch row (LeNet-5's conv1: 5 of
// 8), ~5.6 cycles a window. Here the lanes are VW windows of a pooled row instead. With conv
// stride 1 and pool stride 2 the argmax tap of lane pw for weight column kw is input column
// 2 * pw + dx + kw: of the input row's even or odd columns (j = dx + kw odd or even), the
// element pw + j / 2. Each sample's rows are split so once (the candidates, LanePlan); the
// POOLH * J candidate vectors of a pooled row (per row shift dy and column j) are then aligned
// loads shared by the output channels of a pass, and each channel picks its lanes' dy, then dx,
// by blends on its argmax offsets: 11 blends and 5 FMAs for a 5x5 patch row of 16 windows
// (AVX-512 issues 4 blends or 2 FMAs a cycle), against 16 windows' worth of one load and one
// FMA per patch row.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "checks.h"
#include "cpu_vec.h"

namespace fastlenet::cpu {

template <typename T>
struct LaneVec {
  using V = typename VecOf<T, kVecBytes>::type;
  using M = typename VecOf<T, kVecBytes>::mask;  // integer lanes of sizeof(T) bytes
  static constexpr int VW = VecOf<T, kVecBytes>::kLanes;
};

// Kernel widths and pool sizes the lane kernels are instantiated for (the envelope's 3x3 and
// 5x5, pools of 2 and 3).
constexpr int kLaneKW[] = {3, 5};
constexpr int kLanePools[] = {2, 3};
// Lane vectors per pooled row the candidates are built for (pooled rows of up to 64 windows).
constexpr int64_t kLaneMaxChunks = 4;

// Output channels of one pass (CB): their KW accumulators each, the POOLH * J candidate vectors
// (J = KW + POOLW - 1 columns) shared by them, and the gradient and POOLW + 1 row-selected
// vectors of the channel at hand fit the registers. Loads bound the kernel (this Zen 5 sustains
// ~1.4 64-byte loads a cycle from L1), so more channels per pass means fewer loads per FMA:
// LeNet-5's conv1 takes 3 (12 candidates, 15 accumulators).
template <int KW, int POOLH, int POOLW>
constexpr int lane_channels() {
  constexpr int J = KW + POOLW - 1;
  constexpr int free = kVecRegs - 1 - POOLH * J - (POOLW + 1);
  return std::clamp(free / KW, 0, 6);
}

// How the lane kernels cover a sample: pooled rows in `chunks` vectors of VW windows, and per
// padded input row and chunk the J = KW + POOLW - 1 candidate vectors (`cols`), one after the
// other: candidate j holds the row's columns 2 * (pw0 + l) + j for lanes l (its even or odd
// columns, j / 2 along). Every candidate load is then one aligned vector at a constant offset (a
// 64-byte load off a line boundary takes two).
struct LanePlan {
  int64_t chunks = 0, cols = 0;
  int64_t row() const { return chunks * cols; }  // vectors per padded row
  bool ok() const { return chunks > 0; }
};

// Scratch of one thread: the candidates [HP][chunks][cols][VW] (zero where no input column
// lands), the per-sample table of gradients and argmax codes, and the lane sums.
template <typename T>
struct LaneScratch {
  using M = typename LaneVec<T>::M;
  AlignedVector<T> cand;
  AlignedVector<T> grad;  // [O][PH][chunks][VW]: grad_out, zero where no gradient
  AlignedVector<M> pos;   // [O][PH][chunks]: each lane's argmax offsets, 4 * dy + dx
  AlignedVector<T> sums;  // [O][KH][KW][VW] grad_w, then [O][VW] grad_b
};

// This thread's scratch, sized for g and p: kept from call to call (the step calls the same
// shapes each time; allocating and zeroing it per call cost ~1 us at batch 1). The candidates of
// the padding rows are zeroed; every other row's are written per sample.
template <typename T>
LaneScratch<T>& lane_scratch(const ConvPoolGeometry& g, const LanePlan& p) {
  constexpr int VW = LaneVec<T>::VW;
  thread_local LaneScratch<T> s;
  const int64_t entries = g.o * g.ph * p.chunks, row = p.row() * VW;
  s.cand.resize((g.h + 2 * g.padh) * row);
  std::fill_n(s.cand.begin(), g.padh * row, T(0));
  std::fill_n(s.cand.end() - g.padh * row, g.padh * row, T(0));
  s.grad.resize(entries * VW);
  s.pos.resize(entries);
  s.sums.assign(g.o * (g.kh * g.kw + 1) * VW, T(0));
  return s;
}

// Lanes I of the even (s = 0) or odd (s = 1) elements of a then b.
template <typename V, size_t... I>
inline V lane_phase(const V& a, const V& b, int s, std::index_sequence<I...>) {
  return s == 0 ? __builtin_shufflevector(a, b, (2 * I)...)
                : __builtin_shufflevector(a, b, (2 * I + 1)...);
}

// Lanes I of a then b, starting U elements along.
template <int U, typename V, size_t... I>
inline V lane_shift(const V& a, const V& b, std::index_sequence<I...>) {
  if constexpr (U == 0)
    return a;
  else
    return __builtin_shufflevector(a, b, (U + I)...);
}

// One sample's input (planar, one channel) into the candidates (LanePlan). All in registers: a
// store read back at another offset would wait for the store to retire.
template <typename T, int J>
void lane_candidates(const T* x, const ConvPoolGeometry& g, const LanePlan& p, LaneScratch<T>& s) {
  using V = typename LaneVec<T>::V;
  constexpr int VW = LaneVec<T>::VW;
  constexpr auto lanes = std::make_index_sequence<VW>{};
  // Padded columns [b * VW, b * VW + VW) of a row: the lanes whose input column is in [0, w).
  const int64_t blocks = 2 * (p.chunks + 1);
  std::array<int64_t, 2 * (kLaneMaxChunks + 1)> at{};
  std::array<int, 2 * (kLaneMaxChunks + 1)> lo{}, hi{};
  for (int64_t b = 0; b < blocks; ++b) {
    at[b] = b * VW - g.padw;
    lo[b] = static_cast<int>(std::clamp<int64_t>(-at[b], 0, VW));
    hi[b] = static_cast<int>(std::clamp<int64_t>(g.w - at[b], lo[b], VW));
  }
  const auto block = [&](const T* src, int64_t b) {
    return load_lanes<V>(src + at[b], lo[b], hi[b]);
  };
  T* dst = s.cand.data() + g.padh * p.row() * VW;
  for (int64_t y = 0; y < g.h; ++y) {
    const T* src = x + y * g.w;
    V cur[2], next[2];
    for (int ph = 0; ph < 2; ++ph) cur[ph] = lane_phase(block(src, 0), block(src, 1), ph, lanes);
    for (int64_t c = 0; c < p.chunks; ++c) {
      const V a = block(src, 2 * c + 2), b = block(src, 2 * c + 3);
      for (int ph = 0; ph < 2; ++ph) next[ph] = lane_phase(a, b, ph, lanes);
      [&]<int... I>(std::integer_sequence<int, I...>) {
        (store(dst + I * VW, lane_shift<I / 2>(cur[I & 1], next[I & 1], lanes)), ...);
      }(std::make_integer_sequence<int, J>{});
      dst += J * VW;
      cur[0] = next[0];
      cur[1] = next[1];
    }
  }
}

// One sample's table: per (o, ph, chunk) the lanes' gradient (zero without one and past the
// row) and argmax offsets (dy, dx); grad_b's lane sums added. A row's VW values are one load,
// reading past the row, unless that would pass `left` (values from go to grad_out's end).
template <typename T, int POOLW>
void lane_table(const T* go, const uint8_t* am, int64_t left, const ConvPoolGeometry& g,
                const LanePlan& p, LaneScratch<T>& s) {
  using V = typename LaneVec<T>::V;
  using M = typename LaneVec<T>::M;
  using MI = typename VecOf<T, kVecBytes>::mask_int;
  constexpr int VW = LaneVec<T>::VW;
  using Codes = typename ByteVec<VW>::type;
  M iota;
  for (int l = 0; l < VW; ++l) iota[l] = l;
  // dy = q / POOLW for q < POOLW * POOLH <= 9: (q * ceil(32 / POOLW)) >> 5.
  constexpr MI div = (32 + POOLW - 1) / POOLW;
  T* bsum = s.sums.data() + g.o * g.kh * g.kw * VW;
  for (int64_t o = 0, e = 0; o < g.o; ++o) {
    V b = load<V>(bsum + o * VW);
    for (int64_t ph = 0; ph < g.ph; ++ph)
      for (int64_t c = 0; c < p.chunks; ++c, ++e) {
        const int64_t pw0 = c * VW, n = std::min<int64_t>(VW, g.pw - pw0);
        const int64_t at = (o * g.ph + ph) * g.pw + pw0;
        V gv{};
        Codes qb{};
        if (at + VW <= left) {
          gv = load<V>(go + at);
          qb = load<Codes>(am + at);
        } else {
          gv = load_lanes<V>(go + at, 0, static_cast<int>(n));
          std::memcpy(&qb, am + at, n);
        }
        const M q = __builtin_convertvector(qb, M);
        const M keep = (iota < static_cast<MI>(n)) & (q != static_cast<MI>(kNoGrad));
        gv = keep ? gv : V{};
        const M dy = (q * div) >> 5;
        store(s.grad.data() + e * VW, gv);
        s.pos[e] = (dy << 2) | (q - dy * POOLW);
        b += gv;
      }
    store(bsum + o * VW, b);
  }
}

// grad_w and grad_b lane sums of every output channel of one sample (x, and grad_out and argmax
// with `left` values from them to the tensors' end), per patch row kh, CB channels a pass.
template <typename T, int KW, int POOLH, int POOLW>
void lane_weight_sample(const T* x, const T* go, const uint8_t* am, int64_t left,
                        const ConvPoolGeometry& g, const LanePlan& p, LaneScratch<T>& s) {
  using V = typename LaneVec<T>::V;
  using M = typename LaneVec<T>::M;
  constexpr int VW = LaneVec<T>::VW;
  constexpr int J = KW + POOLW - 1, CB = lane_channels<KW, POOLH, POOLW>();
  lane_candidates<T, J>(x, g, p, s);
  lane_table<T, POOLW>(go, am, left, g, p, s);
  const int64_t rowstep = p.row() * VW, per_o = g.ph * p.chunks;
  for (int64_t kh = 0; kh < g.kh; ++kh)
    for (int64_t o0 = 0; o0 < g.o; o0 += CB) {
      const int64_t cb = std::min<int64_t>(CB, g.o - o0);
      V acc[CB][KW];
      T* sums = s.sums.data() + (o0 * g.kh + kh) * KW * VW;
      const int64_t ostep = g.kh * KW * VW;
      for (int i = 0; i < CB; ++i)
        for (int k = 0; k < KW; ++k) acc[i][k] = i < cb ? load<V>(sums + i * ostep + k * VW) : V{};
      for (int64_t ph = 0, e = 0; ph < g.ph; ++ph) {
        const T* rows = s.cand.data() + (ph * g.psh + kh) * rowstep;
        for (int64_t c = 0; c < p.chunks; ++c, ++e, rows += J * VW) {
          V cand[POOLH][J];
          for (int d = 0; d < POOLH; ++d)
            for (int j = 0; j < J; ++j) cand[d][j] = load<V>(rows + d * rowstep + j * VW);
          for (int i = 0; i < CB; ++i) {
            if (i >= cb) break;
            const int64_t at = (o0 + i) * per_o + e;
            const V gv = load<V>(s.grad.data() + at * VW);
            const M pos = s.pos[at], dx = pos & 3;
            // Candidate column j at the lane's row: the row shifts dy <= d in turn.
            const auto pick_row = [&](int j) {
              V r = cand[0][j];
              for (int d = 1; d < POOLH; ++d) r = pos >= (d << 2) ? cand[d][j] : r;
              return r;
            };
            // Columns k .. k + POOLW - 1 at the lane's row; each FMA takes column k + dx.
            V row[POOLW];
            for (int d = 0; d + 1 < POOLW; ++d) row[d] = pick_row(d);
            for (int k = 0; k < KW; ++k) {
              row[(k + POOLW - 1) % POOLW] = pick_row(k + POOLW - 1);
              V sel = row[k % POOLW];
              for (int d = 1; d < POOLW; ++d) sel = dx >= d ? row[(k + d) % POOLW] : sel;
              acc[i][k] += gv * sel;
            }
          }
        }
      }
      for (int i = 0; i < cb; ++i)
        for (int k = 0; k < KW; ++k) store(sums + i * ostep + k * VW, acc[i][k]);
    }
}

template <typename T>
using LaneWeightFn = void (*)(const T*, const T*, const uint8_t*, int64_t, const ConvPoolGeometry&,
                              const LanePlan&, LaneScratch<T>&);

template <typename T, int KW, int POOLH, int POOLW>
constexpr LaneWeightFn<T> lane_weight_fn() {
  if constexpr (lane_channels<KW, POOLH, POOLW>() > 0)
    return &lane_weight_sample<T, KW, POOLH, POOLW>;
  else
    return nullptr;
}

// lane_weight_sample for (KW, POOLH, POOLW), nullptr where not instantiated.
template <typename T>
LaneWeightFn<T> lane_weight_kernel(const ConvPoolGeometry& g) {
  LaneWeightFn<T> fn = nullptr;
  const auto pick = [&]<int KW, int PH, int PW>() {
    if (g.kw == KW && g.poolh == PH && g.poolw == PW) fn = lane_weight_fn<T, KW, PH, PW>();
  };
  [&]<int... I>(std::integer_sequence<int, I...>) {
    (pick.template operator()<kLaneKW[I / 4], kLanePools[I / 2 % 2], kLanePools[I % 2]>(), ...);
  }(std::make_integer_sequence<int, 8>{});
  return fn;
}

// The lane kernel costs per lane vector and patch column what the per-window kernel costs per
// window: it wins where a pooled row has at least VW * KW / kLaneRowDiv windows. grad_w alone,
// float32, 2 threads, one process, batch 64 / 256, one input channel: 5x5, 14 windows (LeNet-5's
// conv1, the Fashion CNN's) 1.25x / 1.29x and 1.24x / 1.26x, 8 windows 0.68x / 0.65x, 7 0.57x /
// 0.71x; 3x3, 14 windows (32 outputs) 1.92x / 1.74x, 8 windows 1.13x / 1.18x, 6 0.85x / 0.83x,
// 4 0.59x / 0.57x; 3x3 pool 3, 15 windows 1.48x / 1.59x, 5 0.53x / 0.52x.
constexpr int64_t kLaneRowDiv = 7;
// Below this batch its per-call work (table, candidates, lane sums) is not paid back: batch 1 / 2
// / 4 / 8, LeNet-5's conv1 0.97x / 0.96x / 0.99x / 1.10x, the Fashion CNN's 0.91x / 0.85x / 1.00x
// / 1.09x (1 -> 32 3x3 1.21x / 1.35x / 1.54x / 1.67x).
constexpr int64_t kLaneMinBatch = 8;

template <typename T>
LanePlan lane_weight_plan(const ConvPoolGeometry& g) {
  constexpr int VW = LaneVec<T>::VW;
  if (kVecRegs < 32 || g.c != 1 || g.sh != 1 || g.sw != 1 || g.psw != 2) return {};
  if (lane_weight_kernel<T>(g) == nullptr || g.pw * kLaneRowDiv < VW * g.kw || g.n < kLaneMinBatch)
    return {};
  const int64_t chunks = (g.pw + VW - 1) / VW;
  if (chunks > kLaneMaxChunks) return {};
  return {chunks, g.kw + g.poolw - 1};
}

// The lane sums of a chunk of samples into grad_w ([O][KH][rowsize], column kw at kw) and grad_b
// ([O]), added to what they hold (lane_scratch zeroes the sums at the next chunk's start).
template <typename T>
void lane_weight_finish(const LaneScratch<T>& s, const ConvPoolGeometry& g, int64_t rowsize, T* gw,
                        T* gb) {
  using V = typename LaneVec<T>::V;
  constexpr int VW = LaneVec<T>::VW;
  const T* sums = s.sums.data();
  const auto total = [&](int64_t at) {
    T t[VW];
    std::memcpy(t, sums + at * VW, sizeof(V));
    for (int w = VW / 2; w > 0; w /= 2)  // halves added pairwise: a fixed order
      for (int l = 0; l < w; ++l) t[l] += t[l + w];
    return t[0];
  };
  for (int64_t o = 0; o < g.o; ++o)
    for (int64_t kh = 0; kh < g.kh; ++kh)
      for (int64_t kw = 0; kw < g.kw; ++kw)
        gw[(o * g.kh + kh) * rowsize + kw] += total((o * g.kh + kh) * g.kw + kw);
  for (int64_t o = 0; o < g.o; ++o) gb[o] += total(g.o * g.kh * g.kw + o);
}

}  // namespace fastlenet::cpu
