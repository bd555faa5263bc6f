// Forward kernels of conv2d -> ReLU -> max_pool2d on the CPU.
// Math and saved state: fastlenet/reference.py (conv_relu_pool).
// Computes: out and argmax (N, O, PH, PW) from contiguous NCHW x, w, b; the conv output is never
// stored. Accumulates in the data's own type (float32 or float64).
// Saves for backward (the caller does): x, w and argmax, one byte per pooled output. Backward:
// conv_relu_pool_cpu_bwd.h.
//
// Two ways to fill the vector lanes, chosen per layer by conv_relu_pool_cpu.cpp:
// - forward_channels: lanes over output channels, NV vectors of them (NV = 2 with more than one
//   vector of channels: a one-vector block reloads its inputs too often; weight repacked
//   [O/(NV*VW)][C][KH][KW][NV*VW]); a register block holds R conv outputs of one conv row;
//   each (c, kh) loads KW * NV weight vectors and broadcasts each of its R + KW - 1 inputs once
//   (unit stride, 3 or 5 wide; else each (c, kh, kw) loads NV weight vectors and broadcasts R
//   inputs). Conv rows of one pooled row go to a per-thread tile (L1), a ring of pool-height
//   rows, and are reduced to max/argmax at once; where pooled rows overlap (pool 3 stride 2),
//   a conv row they share is computed once. Best with many output channels (LeNet-5 conv2).
// - forward_columns: lanes over pooled output columns, every window position and up to
//   kColumnsMaxOut output channels in registers at once; the input is split by column
//   phase so that the inputs of 16 pooled columns are one contiguous load. Max/argmax never
//   leave registers. Best with few output channels and wide outputs (LeNet-5 conv1), and with
//   one input channel whatever the output channels (the Fashion CNN's conv1: columns_suits).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "checks.h"
#include "cpu_parallel.h"
#include "cpu_vec.h"

namespace fastlenet::cpu {

// Channel vectors per forward_channels block with many output channels: two, whose two weight
// vectors per broadcast input halve the loads per FMA. On AVX2 every broadcast input is a load
// of its own (measured faster). On AVX-512 (Zen 5, 2 threads, batch 64) too, despite its
// embedded broadcasts: forward 20-28% faster at 32 -> 64, 64 -> 128 and 128 -> 128 (3x3), 15% at
// 48 -> 96 (3x3, batch 256), the same at 16 -> 32 and 37 -> 77 (5x5).
constexpr int kChannelVectors = 2;

// The argmax code per lane, in the lanes of M: the window position of the max, or kNoGrad
// where ReLU passes no gradient (`dead`: the max is <= 0).
template <typename M>
inline M argmax_lanes(const M& dead, const M& pos) {
  using MI = std::remove_cvref_t<decltype(pos[0])>;
  return dead ? M{} + static_cast<MI>(kNoGrad) : pos;
}

// The argmax byte saved per lane (argmax_lanes, narrowed).
template <typename M>
inline auto argmax_codes(const M& dead, const M& pos) {
  return low_bytes(argmax_lanes(dead, pos));
}

// Most conv outputs one register block holds, for NV channel vectors: R * NV accumulators, NV
// weight vectors and the broadcast input fit the vector registers; at most 14 (half of LeNet-5's
// 28-wide conv1 row).
template <int NV>
constexpr int kMaxBlock = std::min(14, (kVecRegs - NV - 1) / NV);

struct Plane {
  int64_t chan;  // elements between channels of the (padded) input plane
  int64_t row;   // elements between rows
};

// R conv outputs at columns ow0 .. ow0+R-1 of one conv row, for NV * VW output channels:
// acc[r] = bias + sum_{c,kh,kw} wt[c,kh,kw,:] * x[c, kh, r*SW + kw], x pointing at the top-left
// input of the first output; written to dst[r][NV * VW]. KW > 0 (unit stride, kernel width KW
// known at compile time): per (c, kh) the KW * NV weight vectors stay in registers and each of
// the R + KW - 1 inputs of the row is broadcast once for its up to KW outputs, instead of once
// per (output, kw) pair (the loads of a broadcast per FMA bound that loop). The sums are taken
// in the same (c, kh, kw) order either way: the same bits. KW = 0: any width and stride.
template <typename T, int Bytes, int NV, int R, bool UnitStride, int KW>
void conv_block(const T* x, Plane p, int64_t sw, const T* wt, int64_t C, int64_t KH, int64_t kw_rt,
                const T* bias, T* dst) {
  using V = typename VecOf<T, Bytes>::type;
  constexpr int VW = VecOf<T, Bytes>::kLanes;
  V acc[R][NV];
  for (int u = 0; u < NV; ++u) {
    const V b = load<V>(bias + u * VW);
    for (int r = 0; r < R; ++r) acc[r][u] = b;
  }
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t kh = 0; kh < KH; ++kh) {
      const T* xr = x + c * p.chan + kh * p.row;
      if constexpr (KW > 0) {
        static_assert(UnitStride);
        const T* wr = wt + (c * KH + kh) * KW * NV * VW;
        V w[KW][NV];
        for (int kw = 0; kw < KW; ++kw)
          for (int u = 0; u < NV; ++u) w[kw][u] = load<V>(wr + (kw * NV + u) * VW);
#pragma GCC unroll 32
        for (int i = 0; i < R + KW - 1; ++i) {
          const T xv = xr[i];
#pragma GCC unroll 8
          for (int kw = 0; kw < KW; ++kw) {
            const int r = i - kw;
            if (r >= 0 && r < R)
              for (int u = 0; u < NV; ++u) acc[r][u] += w[kw][u] * xv;
          }
        }
      } else {
        const T* wr = wt + (c * KH + kh) * kw_rt * NV * VW;
        for (int64_t kw = 0; kw < kw_rt; ++kw) {
          V w[NV];
          for (int u = 0; u < NV; ++u) w[u] = load<V>(wr + (kw * NV + u) * VW);
          for (int r = 0; r < R; ++r) {
            const T xv = xr[(UnitStride ? r : r * sw) + kw];
            for (int u = 0; u < NV; ++u) acc[r][u] += w[u] * xv;
          }
        }
      }
    }
  }
  std::memcpy(dst, acc, sizeof(acc));
}

// Most conv outputs of a block with the kernel width KW in registers (conv_block's KW > 0): the
// R * NV accumulators, KW * NV weight vectors and the broadcast input fit the vector registers.
template <int NV, int KW>
constexpr int kMaxBlockKW =
    KW == 0 ? kMaxBlock<NV> : std::clamp((kVecRegs - KW * NV - 1) / NV, 1, kMaxBlock<NV>);

// Whether forward_channels takes conv_block's KW > 0 form for this kernel width: where its
// blocks still hold at least kMinBlockKW outputs (on AVX-512 every 3- and 5-wide case; on AVX2's
// 16 registers one channel vector only, not measured there). Measured on AVX-512 (forward alone,
// 2 threads, float32, us, KW = 0 -> KW > 0): batch 64: 6 -> 16 5x5 14x14 (LeNet-5's conv2) 95.6
// -> 79.8, 16 -> 32 5x5 pad 2 (FashionCNN's) 884 -> 724, 16 -> 16 3x3 24x24 639 -> 443,
// 32 -> 64 3x3 16x16 1800 -> 1495, 24 -> 40 5x5 20x20 3010 -> 2698, 10 -> 22 3x3 20x20 457 ->
// 430, 3 -> 7 5x5 pool 3 153 -> 145; batch 256: LeNet-5's conv2 498 -> 319; batch 1: 7.1 ->
// 6.6; float64 5-20% faster. Bitwise the same outputs.
constexpr int kMinBlockKW = 6;

template <int NV, int KW>
constexpr bool kw_blocks() {
  return kMaxBlockKW<NV, KW> >= kMinBlockKW;
}

template <typename T, int Bytes, bool UnitStride>
using BlockFn = void (*)(const T*, Plane, int64_t, const T*, int64_t, int64_t, int64_t, const T*,
                         T*);

template <typename T, int Bytes, int NV, bool UnitStride, int KW, int... Rs>
constexpr auto block_table(std::integer_sequence<int, Rs...>) {
  return std::array<BlockFn<T, Bytes, UnitStride>, sizeof...(Rs)>{
      &conv_block<T, Bytes, NV, Rs + 1, UnitStride, KW>...};
}

// Computes conv row `oh` for one block of NV * VW output channels into tile[ow][NV * VW],
// ow < width.
template <typename T, int Bytes, int NV, bool UnitStride, int KW>
void conv_row(const T* xpad, Plane p, const ConvPoolGeometry& g, int64_t oh, int64_t width,
              const T* wt, const T* bias, T* tile) {
  constexpr int VW = VecOf<T, Bytes>::kLanes;
  constexpr int kMax = kMaxBlockKW<NV, KW>;
  static constexpr auto table =
      block_table<T, Bytes, NV, UnitStride, KW>(std::make_integer_sequence<int, kMax>{});
  const int64_t blocks = (width + kMax - 1) / kMax;
  const int64_t step = (width + blocks - 1) / blocks;  // even blocks: 28 -> 14 + 14
  for (int64_t ow0 = 0; ow0 < width; ow0 += step) {
    const int64_t r = std::min(step, width - ow0);
    const T* x = xpad + oh * g.sh * p.row + ow0 * g.sw;
    table[r - 1](x, p, g.sw, wt, g.c, g.kh, g.kw, bias, tile + ow0 * NV * VW);
  }
}

// Pooled columns whose results forward_channels stores as a run per channel. Its lanes are
// output channels and the output is NCHW, so each pooled value and code went to its plane by a
// store of its own (two lane extractions per pooled output, on the one shuffle port: LeNet-5's
// conv2 spent ~19% of its forward there, perf). kPooledRun columns of a 16-float vector of
// channels are now transposed in registers (an 8 x 16 transpose: three rounds of shuffles, rows
// 1, 2 then 4 apart) and each channel's run is one masked store of its values and one of its
// codes. Forward alone, 2 threads, in one process alternately, Xeon VM, batch 64 / 256 (the same
// bits): LeNet-5's conv2 1.026x / 1.035x, the Fashion CNN's 1.053x / 1.044x, mid-16-16
// 1.074x / 1.073x, vgg-32-64 1.051x / 1.052x, odd-10-22-pool3 1.031x / 1.024x, pool3-16-32
// 1.081x / 1.074x; the LeNet-5 step 1.003x / 1.008x.
constexpr int kPooledRun = 8;

// Lane `lane` of a round of the 8 x 16 transpose: rows of S columns' values for 16 / S
// channels each (lane = channel * S + row), two such vectors (l, then r's lanes from 16) to
// rows of 2 * S for the lower (Upper false) or upper half of the channels.
template <int S, bool Upper>
constexpr int pooled_lane(size_t lane) {
  const int at = static_cast<int>(lane % (2 * S)), channel = static_cast<int>(lane) / (2 * S);
  return (Upper ? 8 : 0) + channel * S + at % S + (at >= S ? 16 : 0);
}

template <int S, bool Upper, typename V, size_t... I>
inline V pooled_round(const V& l, const V& r, std::index_sequence<I...>) {
  return __builtin_shufflevector(l, r, pooled_lane<S, Upper>(I)...);
}

// a[8] (a pooled column's 16 channels each) to b[8]: b[k] holds channel 2k's 8 columns, then
// channel 2k + 1's.
template <typename V>
inline void transpose_pooled(const V (&a)[8], V (&b)[8]) {
  constexpr auto lanes = std::make_index_sequence<16>{};
  V t[8], u[8];
  for (int m = 0; m < 4; ++m) {
    t[m] = pooled_round<1, false>(a[2 * m], a[2 * m + 1], lanes);
    t[4 + m] = pooled_round<1, true>(a[2 * m], a[2 * m + 1], lanes);
  }
  for (int h = 0; h < 2; ++h)
    for (int p = 0; p < 2; ++p) {
      u[4 * h + 2 * p] = pooled_round<2, false>(t[4 * h + 2 * p], t[4 * h + 2 * p + 1], lanes);
      u[4 * h + 2 * p + 1] = pooled_round<2, true>(t[4 * h + 2 * p], t[4 * h + 2 * p + 1], lanes);
    }
  for (int h = 0; h < 2; ++h)
    for (int q = 0; q < 2; ++q) {
      b[4 * h + 2 * q] = pooled_round<4, false>(u[4 * h + q], u[4 * h + 2 + q], lanes);
      b[4 * h + 2 * q + 1] = pooled_round<4, true>(u[4 * h + q], u[4 * h + 2 + q], lanes);
    }
}

// The values and codes of `cols` <= kPooledRun pooled columns of 16 float channels (relu[r],
// code[r]: column r) as runs: channel l's at out + l * plane and am + l * plane. False, storing
// nothing, where the target lacks the masked stores (AVX-512 BW and VL).
template <typename V, typename M>
inline bool store_pooled_runs(const V (&relu)[kPooledRun], const M (&code)[kPooledRun], int cols,
                              float* out, uint8_t* am, int64_t plane) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  static_assert(sizeof(V) == 64 && sizeof(M) == 64, "16 lanes of 4 bytes");
  V v[kPooledRun];
  M c[kPooledRun];
  transpose_pooled(relu, v);
  transpose_pooled(code, c);
  const auto keep = static_cast<__mmask8>((1u << cols) - 1);
  for (int k = 0; k < kPooledRun; ++k) {
    const Float8 lo = __builtin_shufflevector(v[k], v[k], 0, 1, 2, 3, 4, 5, 6, 7);
    const Float8 hi = __builtin_shufflevector(v[k], v[k], 8, 9, 10, 11, 12, 13, 14, 15);
    _mm256_mask_storeu_ps(out + 2 * k * plane, keep, (__m256)lo);
    _mm256_mask_storeu_ps(out + (2 * k + 1) * plane, keep, (__m256)hi);
    // The zero-masked form: the plain one's undefined pass-through draws GCC 12's
    // -Wmaybe-uninitialized; with every lane kept it is the same vpmovdb.
    const __m128i bytes = _mm512_maskz_cvtepi32_epi8(__mmask16(0xffff), (__m512i)c[k]);
    _mm_mask_storeu_epi8(am + 2 * k * plane, keep, bytes);
    _mm_mask_storeu_epi8(am + (2 * k + 1) * plane, keep, _mm_srli_si128(bytes, 8));
  }
  return true;
#else
  return false;
#endif
}

// Output channels o_lo .. o_hi - 1 (o_hi < 0: all of them).
template <typename T, int Bytes, int NV>
void forward_channels(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                      const ConvPoolGeometry& g, at::Tensor& out, at::Tensor& argmax,
                      int64_t o_lo = 0, int64_t o_hi = -1) {
  constexpr int BW = VecOf<T, Bytes>::kLanes * NV;  // output channels of one block
  using V = typename VecOf<T, Bytes>::type;
  using M = typename VecOf<T, Bytes>::mask;
  using MI = typename VecOf<T, Bytes>::mask_int;
  constexpr int VW = VecOf<T, Bytes>::kLanes;
  if (o_hi < 0) o_hi = g.o;
  const int64_t oblocks = (o_hi - o_lo + BW - 1) / BW;
  // Weight repacked to [O/BW][C][KH][KW][BW] and bias to [O/BW][BW], zero-padded lanes.
  AlignedVector<T> wt(oblocks * g.c * g.kh * g.kw * BW, T(0));
  AlignedVector<T> bt(oblocks * BW, T(0));
  const T* w = weight.const_data_ptr<T>();
  for (int64_t o = o_lo; o < o_hi; ++o) {
    const int64_t ob = (o - o_lo) / BW, lane = (o - o_lo) % BW;
    for (int64_t k = 0; k < g.c * g.kh * g.kw; ++k)
      wt[(ob * g.c * g.kh * g.kw + k) * BW + lane] = w[o * g.c * g.kh * g.kw + k];
    bt[ob * BW + lane] = bias.defined() ? bias.const_data_ptr<T>()[o] : T(0);
  }
  const bool padded = g.padh > 0 || g.padw > 0;
  const int64_t hp = g.h + 2 * g.padh, wp = g.w + 2 * g.padw;
  // The last pooled window's right edge: conv columns beyond it are never computed.
  const int64_t width = (g.pw - 1) * g.psw + g.poolw;
  const Plane p{hp * wp, wp};
  const T* x = input.const_data_ptr<T>();
  T* outp = out.data_ptr<T>();
  uint8_t* amp = argmax.data_ptr<uint8_t>();
  const int64_t plane_out = g.ph * g.pw;
  const bool unit = g.sw == 1;

  cpu::parallel_for(0, g.n * oblocks, 1, [&](int64_t t0, int64_t t1) {
    AlignedVector<T> pad_buf(padded ? g.c * hp * wp : 0, T(0));
    AlignedVector<T> tile(g.poolh * width * BW);
    // Locals for the pooling epilogue: its byte stores may alias anything reached through the
    // lambda's references, which would be reloaded after each of them.
    T* __restrict out_l = outp;
    uint8_t* __restrict am_l = amp;
    const int64_t npw = g.pw, poolh = g.poolh, poolw = g.poolw, psw = g.psw, nout = g.o;
    const int64_t plane = plane_out;
    const int64_t sample = g.c * g.h * g.w;
    const int64_t conv_rows = (g.ph - 1) * g.psh + g.poolh;  // a task computes at most these
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / oblocks, ob = t % oblocks;
      const T* xs = x + n * sample;
      NextTaskPrefetch next;
      if (t + 1 < t1) {
        const int64_t nn = (t + 1) / oblocks, o_first = o_lo + (t + 1) % oblocks * BW;
        const int64_t planes = std::min<int64_t>(BW, o_hi - o_first) * plane_out;
        const int64_t first = (nn * nout + o_first) * plane_out;
        const int64_t in_bytes = nn != n ? sample * static_cast<int64_t>(sizeof(T)) : 0;
        next = NextTaskPrefetch({{{x + nn * sample, in_bytes, false},
                                  {outp + first, planes * static_cast<int64_t>(sizeof(T)), true},
                                  {amp + first, planes, true}}},
                                conv_rows);
      }
      if (padded) {
        copy_padded(xs, g.c, g.h, g.w, g.padh, g.padw, wp, pad_buf.data());
        xs = pad_buf.data();
      }
      const T* wtb = wt.data() + ob * g.c * g.kh * g.kw * BW;
      const T* btb = bt.data() + ob * BW;
      // The tile is a ring: conv row oh in row oh % poolh, kept while a later pooled row needs
      // it; rows before next_oh are done. Pool 3 stride 2 computes 2 conv rows a pooled row
      // instead of 3 (forward alone, batch 64, 2 threads, best of 7, alternating processes, us:
      // 16 -> 32 3x3 32x32 2892-3306 -> 2369-2473, 10 -> 22 5x5 20x20 944-1083 -> 724-778;
      // pools of 2 at stride 2 share no rows and measured the same). The same sums: the same bits.
      int64_t next_oh = 0;
      for (int64_t ph = 0; ph < g.ph; ++ph) {
        const int64_t oh0 = ph * g.psh;  // the pooled row's first conv row
        for (int64_t oh = std::max(oh0, next_oh); oh < oh0 + poolh; ++oh) {
          T* rowtile = tile.data() + (oh % poolh) * width * BW;
          next.step();
          if (unit && g.kw == 5 && kw_blocks<NV, 5>())
            conv_row<T, Bytes, NV, true, 5>(xs, p, g, oh, width, wtb, btb, rowtile);
          else if (unit && g.kw == 3 && kw_blocks<NV, 3>())
            conv_row<T, Bytes, NV, true, 3>(xs, p, g, oh, width, wtb, btb, rowtile);
          else if (unit)
            conv_row<T, Bytes, NV, true, 0>(xs, p, g, oh, width, wtb, btb, rowtile);
          else
            conv_row<T, Bytes, NV, false, 0>(xs, p, g, oh, width, wtb, btb, rowtile);
        }
        next_oh = oh0 + poolh;
        const T* tiles = tile.data();
        const int64_t slot0 = oh0 % poolh;  // the tile row of the window's first row
        // The pooled value and argmax code of pooled column pw, channel vector u.
        const auto pooled = [&](int64_t pw, int u, V& relu, M& code) {
          const T* first = tiles + pw * psw * BW + u * VW;
          V best = load<V>(first + slot0 * width * BW);
          M pos = M{} + 0;
          for (int64_t i = 0, slot = slot0; i < poolh;
               ++i, slot = slot + 1 < poolh ? slot + 1 : 0) {
            for (int64_t j = 0; j < poolw; ++j) {
              const V v = load<V>(first + (slot * width + j) * BW);
              // max_pool2d's rule: a strictly larger value or a NaN replaces the max.
              const M take = (v > best) | (v != v);
              best = take ? v : best;
              pos = take ? M{} + static_cast<MI>(i * poolw + j) : pos;
            }
          }
          const M dead = best <= V{};  // ReLU passes no gradient; false for a NaN max
          relu = dead ? V{} : best;    // NaN stays NaN, as torch.relu
          code = argmax_lanes(dead, pos);
        };
        for (int u = 0; u < NV; ++u) {
          const int64_t o0 = o_lo + ob * BW + u * VW;
          if (o0 >= o_hi) break;
          const int64_t lanes = std::min<int64_t>(VW, o_hi - o0);
          const int64_t base = (n * nout + o0) * plane + ph * npw;
          for (int64_t pw0 = 0; pw0 < npw; pw0 += kPooledRun) {
            const int cols = static_cast<int>(std::min<int64_t>(kPooledRun, npw - pw0));
            V relu[kPooledRun];
            M code[kPooledRun];
            for (int r = 0; r < kPooledRun; ++r) {
              if (r < cols)
                pooled(pw0 + r, u, relu[r], code[r]);
              else
                relu[r] = V{}, code[r] = M{};
            }
            if constexpr (std::is_same_v<T, float> && VW == 16)
              if (lanes == VW &&
                  store_pooled_runs(relu, code, cols, out_l + base + pw0, am_l + base + pw0, plane))
                continue;
            for (int r = 0; r < cols; ++r) {
              const auto codes = low_bytes(code[r]);
              for (int64_t l = 0; l < lanes; ++l) {
                out_l[base + pw0 + r + l * plane] = relu[r][l];
                am_l[base + pw0 + r + l * plane] = codes[l];
              }
            }
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// forward_columns

// Column kernel vectors: the widest the target has (AVX-512: 16 floats, LeNet-5's conv1 has 14
// pooled columns).
constexpr int kColumnsBytes = kVecBytes;
// Accumulators of one block: output channels x window positions; three quarters of the vector
// registers (24 of AVX-512's 32, 12 of AVX2's 16), leaving room for the input vector, the
// broadcast weights and the pooling temporaries.
constexpr int kColumnsAccumulators = kVecRegs * 3 / 4;
constexpr int kColumnsMaxWindow = 4;
constexpr int kColumnsMaxOut = kColumnsAccumulators / kColumnsMaxWindow;

// The first `lanes` of a block's values and codes, one by one (columns_store near the end of the
// output). Out of line: in columns_store, the lane subscripts made GCC keep every accumulator
// and each channel's results in memory on the whole-vector path too.
template <typename T, typename V, typename C>
[[gnu::noinline]] void columns_store_lanes(const V relu, const C codes, T* out, uint8_t* am,
                                           int64_t lanes) {
  for (int64_t l = 0; l < lanes; ++l) {
    out[l] = relu[l];
    am[l] = codes[l];
  }
}

// The pooled block's max, argmax codes and ReLU from its accumulators, stored (columns_block).
// The channel and position loops are unrolled so that the accumulators stay in registers.
template <typename T, int OB, int NQ, typename V>
inline void columns_store(const V (&acc)[OB][NQ], T* out, uint8_t* am, int64_t plane, int64_t lanes,
                          int64_t room) {
  using Vec = VecOf<T, kColumnsBytes>;
  using M = typename Vec::mask;
  using MI = typename Vec::mask_int;
  constexpr int VW = Vec::kLanes;
#pragma GCC unroll 16
  for (int o = 0; o < OB; ++o) {
    V best = acc[o][0];
    M pos = M{};
#pragma GCC unroll 4
    for (int q = 1; q < NQ; ++q) {
      // max_pool2d's rule: a strictly larger value or a NaN replaces the max.
      const M take = (acc[o][q] > best) | (acc[o][q] != acc[o][q]);
      best = take ? acc[o][q] : best;
      pos = take ? M{} + static_cast<MI>(q) : pos;
    }
    const M dead = best <= V{};  // ReLU passes no gradient; false for a NaN max
    const V relu = dead ? V{} : best;
    const auto codes = argmax_codes(dead, pos);
    if (room >= VW) {  // one vector store each (no libc memcpy of a runtime size)
      store(out + o * plane, relu);
      store(am + o * plane, codes);
    } else {
      columns_store_lanes(relu, codes, out + o * plane, am + o * plane, lanes);
    }
  }
}

// One pooled row's block of VW pooled columns for OB output channels and NQ window positions.
// xs: the sample split by column phase, [C][HP][S][M]; xoff[q][kw]: offset of window position
// q, tap kw (row part included) relative to the block's first input; wt: [C][KH][KW][OB].
// `lanes` of the VW columns are outputs; `room`: elements from the block's first output to the
// end of its channel's plane. Where room >= VW the block stores whole vectors, the lanes past
// its row landing on the next pooled rows, which the caller writes later (LeNet-5 conv1: 14
// columns; measured faster than storing lane by lane); elsewhere lane by lane.
template <typename T, int OB, int NQ>
void columns_block(const T* xs, int64_t chan, int64_t row, const int64_t* xoff, const T* wt,
                   int64_t C, int64_t KH, int64_t KW, const T* bias, T* out, uint8_t* am,
                   int64_t plane, int64_t lanes, int64_t room) {
  using V = typename VecOf<T, kColumnsBytes>::type;
  V acc[OB][NQ];
  for (int o = 0; o < OB; ++o)
    for (int q = 0; q < NQ; ++q) acc[o][q] = V{} + bias[o];
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t kh = 0; kh < KH; ++kh) {
      const T* xr = xs + c * chan + kh * row;
      const T* wr = wt + (c * KH + kh) * KW * OB;
      // Per tap NQ input loads, then each weight broadcast once for its NQ FMAs (a broadcast
      // operand per FMA made 24 loads of 24 FMAs at LeNet-5's conv1, and loads bound it: 1.04x /
      // 1.05x at batch 64 / 256, forward alone). The same sums in the same order.
      for (int64_t kw = 0; kw < KW; ++kw) {
        V x[NQ];
        for (int q = 0; q < NQ; ++q) x[q] = load<V>(xr + xoff[q * KW + kw]);
        for (int o = 0; o < OB; ++o) {
          const V wv = broadcast<V>(wr + kw * OB + o);
          for (int q = 0; q < NQ; ++q) acc[o][q] += wv * x[q];
        }
      }
    }
  }
  columns_store<T, OB, NQ>(acc, out, am, plane, lanes, room);
}

// columns_block for 2x2 windows at pool stride 2 over a stride-1 conv (S = 2) with KW known:
// a window position's column j and tap kw read input column j + kw, so the vector at tap
// t = j + kw serves (j = 0, kw = t) and (j = 1, kw = t - 1): per tap and window row 1 load
// instead of 2, at offsets known at compile time but for the phase and row strides (xoff's
// table loads were on the path to every input load). The same sums in the same order: the
// same bits. Forward alone, 2 threads, in one process, batch 64 / 256: LeNet-5's conv1
// 1.021x / 1.024x, the Fashion CNN's 1.033x / 1.035x, 1 -> 32 3x3 pad 1 28x28 1.043x / 1.044x,
// 1 -> 128 3x3 pad 1 32x32 1.047x / 1.005x, 1 -> 6 5x5 20x20 1.022x / 1.023x.
template <typename T, int OB, int KW>
void columns_block_pairs(const T* xs, int64_t chan, int64_t row, const int64_t* xoff, const T* wt,
                         int64_t C, int64_t KH, int64_t, const T* bias, T* out, uint8_t* am,
                         int64_t plane, int64_t lanes, int64_t room) {
  using V = typename VecOf<T, kColumnsBytes>::type;
  const int64_t M = xoff[1], rq = xoff[2 * KW];  // phase stride; window row 1's offset
  V acc[OB][4];
  for (int o = 0; o < OB; ++o)
    for (int q = 0; q < 4; ++q) acc[o][q] = V{} + bias[o];
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t kh = 0; kh < KH; ++kh) {
      const T* xr = xs + c * chan + kh * row;
      const T* wr = wt + (c * KH + kh) * KW * OB;
      V a[2] = {load<V>(xr), load<V>(xr + rq)};  // tap kw for j = 0, per window row
#pragma GCC unroll 8
      for (int kw = 0; kw < KW; ++kw) {
        const int64_t at = (kw + 1) % 2 * M + (kw + 1) / 2;  // tap kw + 1
        const V b[2] = {load<V>(xr + at), load<V>(xr + rq + at)};
        for (int o = 0; o < OB; ++o) {
          const V wv = broadcast<V>(wr + kw * OB + o);
          for (int i = 0; i < 2; ++i) {
            acc[o][2 * i] += wv * a[i];
            acc[o][2 * i + 1] += wv * b[i];
          }
        }
        a[0] = b[0];
        a[1] = b[1];
      }
    }
  }
  columns_store<T, OB, 4>(acc, out, am, plane, lanes, room);
}

template <typename T>
using ColumnsFn = void (*)(const T*, int64_t, int64_t, const int64_t*, const T*, int64_t, int64_t,
                           int64_t, const T*, T*, uint8_t*, int64_t, int64_t, int64_t);

template <typename T, int NQ, int... OBs>
constexpr std::array<ColumnsFn<T>, sizeof...(OBs)> columns_row(std::integer_sequence<int, OBs...>) {
  return {&columns_block<T, OBs + 1, NQ>...};
}

template <typename T, int KW, int... OBs>
constexpr std::array<ColumnsFn<T>, sizeof...(OBs)> pairs_row(std::integer_sequence<int, OBs...>) {
  return {&columns_block_pairs<T, OBs + 1, KW>...};
}

// columns_block_pairs where it applies (2x2 windows, pool stride 2, stride-1 conv, 3 or 5 taps
// a row), else nullptr.
template <typename T>
ColumnsFn<T> pairs_fn(const ConvPoolGeometry& g, int64_t ob) {
  static const std::array<std::array<ColumnsFn<T>, kColumnsMaxOut>, 2> table{
      pairs_row<T, 3>(std::make_integer_sequence<int, kColumnsMaxOut>{}),
      pairs_row<T, 5>(std::make_integer_sequence<int, kColumnsMaxOut>{})};
  if (g.poolh != 2 || g.poolw != 2 || g.sw != 1 || g.psw != 2 || (g.kw != 3 && g.kw != 5))
    return nullptr;
  return table[g.kw == 5][ob - 1];
}

template <typename T>
const ColumnsFn<T>& columns_fn(int64_t ob, int64_t nq) {
  static const std::array<std::array<ColumnsFn<T>, kColumnsMaxOut>, kColumnsMaxWindow> table{
      columns_row<T, 1>(std::make_integer_sequence<int, kColumnsMaxOut>{}),
      columns_row<T, 2>(std::make_integer_sequence<int, kColumnsMaxOut>{}),
      columns_row<T, 3>(std::make_integer_sequence<int, kColumnsMaxOut>{}),
      columns_row<T, 4>(std::make_integer_sequence<int, kColumnsMaxOut>{})};
  return table[nq - 1][ob - 1];
}

// One-channel inputs take forward_columns where its lanes are at least this full, whatever
// forward_channels' fill: per tap it loads NQ input vectors for up to 6 x NQ FMAs, where the
// channel kernel's single input channel gives it few FMAs per load. Forward alone, 2 threads,
// in-process, batch 64 / 256, columns against channels: 1 -> 16 5x5 pad 2 28x28 (the Fashion
// CNN's conv1, 14 of 16 lanes) 1.33x / 1.36x, 1 -> 32 3x3 pad 1 28x28 1.49x / 1.40x, 1 -> 64
// 1.66x / 1.42x, 1 -> 6 5x5 20x20 (8 lanes) 1.34x / 1.30x, 1 -> 6 3x3 pad 1 16x16 (8 lanes) 1.55x /
// 1.63x; below half full slower: 6 lanes 0.62x / 0.59x, 4 lanes 0.42x / 0.41x, 3 lanes 0.64x /
// 0.59x. With 2 or 3 input channels the fill rule stands (2 -> 16 3x3: 0.98x / 0.93x).
constexpr double kColumnsOneChannelFill = 0.5;

// Whether forward_columns handles this layer, and fills its lanes at least as well as
// forward_channels would (or well enough, for one input channel).
template <typename T>
bool columns_suits(const ConvPoolGeometry& g, int channel_lanes) {
  const int64_t nq = g.poolh * g.poolw;
  if (nq > kColumnsMaxWindow) return false;
  const int64_t vw = VecOf<T, kColumnsBytes>::kLanes;
  const double col_fill = double(g.pw) / double((g.pw + vw - 1) / vw * vw);
  const double chan_fill =
      double(g.o) / double((g.o + channel_lanes - 1) / channel_lanes * channel_lanes);
  return col_fill >= chan_fill || (g.c == 1 && col_fill >= kColumnsOneChannelFill);
}

// Phase split of one input row with two phases (S = 2: stride-1 conv, pool stride 2): 16
// columns at a time, the 8 even ones to one phase and the 8 odd ones to the other, each a
// contiguous run at split[xx] and split[xx + 1]. Returns the columns done; the caller copies the
// rest one by one (the element-by-element copy was a measurable part of LeNet-5 conv1's forward;
// measured faster this way).
inline int64_t split_pairs(const float* in, int64_t w, const int64_t* split, float* dst) {
  constexpr int64_t kStep = 2 * kTransposeLanes;
  int64_t xx = 0;
  for (; xx + kStep <= w; xx += kStep) {
    const Float8 a = load<Float8>(in + xx), b = load<Float8>(in + xx + kTransposeLanes);
    store(dst + split[xx], Float8(__builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14)));
    store(dst + split[xx + 1], Float8(__builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15)));
  }
  return xx;
}

template <typename T>
void forward_columns(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                     const ConvPoolGeometry& g, at::Tensor& out, at::Tensor& argmax) {
  constexpr int VW = VecOf<T, kColumnsBytes>::kLanes;
  const int64_t nq = g.poolh * g.poolw;
  const int64_t ob_max = std::min<int64_t>(kColumnsAccumulators / nq, kColumnsMaxOut);
  const int64_t hp = g.h + 2 * g.padh;
  const int64_t S = g.psw * g.sw;  // input columns between neighbouring pooled columns
  const int64_t col_blocks = (g.pw + VW - 1) / VW;
  // Phase-split row: m < M covers every pooled column block plus the taps past its end.
  const int64_t M = col_blocks * VW + (g.poolw * g.sw + g.kw) / S + 1;
  const int64_t row = S * M, chan = hp * row;
  // xoff[q][kw] relative to (pooled row's first input row, block's first pooled column).
  AlignedVector<int64_t> xoff(nq * g.kw);
  for (int64_t q = 0; q < nq; ++q)
    for (int64_t kw = 0; kw < g.kw; ++kw) {
      const int64_t i = q / g.poolw, j = q % g.poolw, col = j * g.sw + kw;
      xoff[q * g.kw + kw] = i * g.sh * row + (col % S) * M + col / S;
    }
  // Weight as [O-block][C][KH][KW][ob] for each block of ob_max output channels.
  const int64_t ckk = g.c * g.kh * g.kw;
  AlignedVector<T> wt(g.o * ckk);
  const T* w = weight.const_data_ptr<T>();
  for (int64_t o0 = 0; o0 < g.o; o0 += ob_max) {
    const int64_t ob = std::min(ob_max, g.o - o0);
    for (int64_t k = 0; k < ckk; ++k)
      for (int64_t o = 0; o < ob; ++o) wt[o0 * ckk + k * ob + o] = w[(o0 + o) * ckk + k];
  }
  // Where input column xx lands in a phase-split row (no division in the per-sample copy).
  AlignedVector<int64_t> split(g.w);
  for (int64_t xx = 0; xx < g.w; ++xx) {
    const int64_t col = xx + g.padw;
    split[xx] = (col % S) * M + col / S;
  }
  AlignedVector<T> bvec(g.o, T(0));
  if (bias.defined()) std::copy_n(bias.const_data_ptr<T>(), g.o, bvec.begin());
  const T* x = input.const_data_ptr<T>();
  T* outp = out.data_ptr<T>();
  uint8_t* amp = argmax.data_ptr<uint8_t>();
  const int64_t plane = g.ph * g.pw;
  cpu::parallel_for(0, g.n, 1, [&](int64_t n0, int64_t n1) {
    AlignedVector<T> xs(g.c * chan + VW, T(0));
    for (int64_t n = n0; n < n1; ++n) {
      const T* src = x + n * g.c * g.h * g.w;
      for (int64_t c = 0; c < g.c; ++c)
        for (int64_t y = 0; y < g.h; ++y) {
          T* dst = xs.data() + c * chan + (y + g.padh) * row;
          const T* in = src + (c * g.h + y) * g.w;
          int64_t xx = 0;
          if constexpr (std::is_same_v<T, float>)
            if (S == 2) xx = split_pairs(in, g.w, split.data(), dst);
          for (; xx < g.w; ++xx) dst[split[xx]] = in[xx];
        }
      for (int64_t o0 = 0; o0 < g.o; o0 += ob_max) {
        const int64_t ob = std::min(ob_max, g.o - o0);
        const ColumnsFn<T> pairs = pairs_fn<T>(g, ob);
        const auto fn = pairs ? pairs : columns_fn<T>(ob, nq);
        for (int64_t ph = 0; ph < g.ph; ++ph)
          for (int64_t cb = 0; cb < col_blocks; ++cb) {
            const int64_t pw0 = cb * VW;
            const int64_t at = (n * g.o + o0) * plane + ph * g.pw + pw0;
            fn(xs.data() + ph * g.psh * g.sh * row + pw0, chan, row, xoff.data(),
               wt.data() + o0 * ckk, g.c, g.kh, g.kw, bvec.data() + o0, outp + at, amp + at, plane,
               std::min<int64_t>(VW, g.pw - pw0), g.pw - pw0 + (g.ph - 1 - ph) * g.pw);
          }
      }
    }
  });
}

}  // namespace fastlenet::cpu
