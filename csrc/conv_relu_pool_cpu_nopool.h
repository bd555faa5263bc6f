// Weight and bias gradients of conv2d -> ReLU without pooling (pool_size 1) on the CPU.
// Math and saved state: fastlenet/reference.py (conv_relu_pool).
// Computes: grad_w[o][c][kh][kw] = sum over n, y, x of gm[n][o][y][x] * xpad[n][c][y+kh][x+kw]
// and grad_b[o] = sum of gm, where gm is grad_out where the saved ReLU code passes gradient,
// else 0: dense, as every conv output is a window of its own. Stride 1, square 3x3 or 5x5
// kernels. Accumulates in the data's own type (float32 or float64).
// Saves nothing: it reads what the forward saved (x and the ReLU codes).
//
// Instead of ATen's convolution_backward of a masked copy of grad_out (what layers whose input
// gradient is asked for still do, conv_relu_pool_cpu.cpp): no tensor the size of the conv
// output is written (the copy, and oneDNN's reorders of it), gm stays one sample at a time in a
// per-thread buffer, and the weight gradient of a layer with few input channels keeps every
// accumulator of a block of output channels in registers. Lanes over conv output columns;
// samples are split into a fixed number of chunks (one per thread), each summing into its own
// buffer, added in chunk order: bitwise identical run to run for a given thread count.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "checks.h"
#include "conv_relu_pool_cpu_bwd.h"
#include "cpu_parallel.h"
#include "cpu_vec.h"

namespace fastlenet::cpu {

// Output channels per register block: OB * K * K accumulators, OB gradient vectors and one input
// vector fit the vector registers (AVX-512: 3x3 two channels, 5x5 one; AVX2: 3x3 one).
constexpr int nopool_block(int k) { return std::min(2, (kVecRegs - 2) / (k * k + 1)); }

// Layers that take this kernel rather than ATen's: one input channel (3x3 or 5x5), or 3x3 with
// up to kNoPoolMaxChannels3x3 input channels. Measured (backward alone, batch 64, 2 threads,
// AVX-512, us, ATen -> this, two runs each; weight gradient, plus the input gradient where
// marked *): 1 -> 32 3x3 28x28 1463 / 1670 -> 317 / 462, 1 -> 32 5x5 pad 2 28x28 3684 -> 899,
// 6 -> 16 3x3 30x30* 1973 / 2065 -> 1711 / 1785; not kept (within the noise either way):
// 13 -> 29 3x3 11x11* 663 / 803 -> 763 / 750 (11 of 16 lanes filled), 6 -> 16 5x5 pad 2 16x16*
// 1254 / 1405 -> 1426 / 1333.
constexpr int64_t kNoPoolMaxChannels3x3 = 8;

inline bool nopool_weight_suits(const ConvPoolGeometry& g) {
  const bool shape =
      g.kh == g.kw && ((g.kh == 3 && g.c <= kNoPoolMaxChannels3x3) || (g.kh == 5 && g.c == 1));
  return shape && nopool_block(static_cast<int>(g.kh)) >= 1 && g.sh == 1 && g.sw == 1 &&
         windows_are_outputs(g);
}

// One sample's gm (rows of owp, zero past OW) into the partials gw ([O][C][K*K][VW]) for output
// channels o0 .. o0+OB-1, from the shifted input rows xs (shift_rows: [C][K][hp][owp]), so that
// every load is a whole aligned vector.
template <typename T, int K, int OB>
void nopool_block_sample(const T* gm, const T* xs, const ConvPoolGeometry& g, int64_t o0,
                         int64_t owp, int64_t hp, T* gw) {
  using V = typename VecOf<T, kVecBytes>::type;
  constexpr int VW = VecOf<T, kVecBytes>::kLanes;
  const int64_t gplane = g.oh * owp;
  for (int64_t c = 0; c < g.c; ++c) {
    V acc[OB][K * K] = {};
    for (int64_t y = 0; y < g.oh; ++y) {
      const T* gr = gm + o0 * gplane + y * owp;
      const T* xr = xs + (c * K * hp + y) * owp;
      for (int64_t xb = 0; xb < owp; xb += VW) {
        V gv[OB];
        for (int j = 0; j < OB; ++j) gv[j] = load<V>(gr + j * gplane + xb);
        for (int kh = 0; kh < K; ++kh)
          for (int kw = 0; kw < K; ++kw) {
            const V xv = load<V>(xr + (kw * hp + kh) * owp + xb);
            for (int j = 0; j < OB; ++j) acc[j][kh * K + kw] += gv[j] * xv;
          }
      }
    }
    for (int j = 0; j < OB; ++j)
      for (int t = 0; t < K * K; ++t) {
        T* p = gw + (((o0 + j) * g.c + c) * K * K + t) * VW;
        store(p, load<V>(p) + acc[j][t]);
      }
  }
}

// The padded planes xp ([C][hp][wp], wp >= owp + K - 1) as K copies shifted by 0 .. K - 1
// columns, rows of owp: xs[c][kw][y][x] = xp[c][y][x + kw]. Reading xp at x + kw directly, most
// of nopool_block_sample's vector loads straddle two cache lines (rows of owp + K - 1 values),
// and it ran at ~0.8 FMAs a cycle; from whole-vector rows ~1.5. The same values in the same
// lanes: the same sums, bit for bit. Weight gradient alone, one sample's blocks in a C++ loop,
// one thread, Zen 5 VM, us: 3 -> 16 3x3 pad 1 32x32 7.75 -> 4.32, 1 -> 32 3x3 28x28 4.85 -> 2.31.
template <typename T, int K>
void shift_rows(const T* xp, int64_t c, int64_t hp, int64_t wp, int64_t owp, T* xs) {
  for (int64_t ci = 0; ci < c; ++ci)
    for (int kw = 0; kw < K; ++kw)
      for (int64_t y = 0; y < hp; ++y)
        std::memcpy(xs + ((ci * K + kw) * hp + y) * owp, xp + (ci * hp + y) * wp + kw,
                    owp * sizeof(T));
}

// gm of sample n into rows of owp ([O][OH][owp]; lanes past OW keep their zeros) and its sums
// into gb ([O][VW]). A vector read past a row's end (into the next row, masked off) stays inside
// grad_out except at its very end, which is copied element by element.
template <typename T>
void nopool_masked_sample(const T* go, const uint8_t* am, int64_t total, const ConvPoolGeometry& g,
                          int64_t n, int64_t owp, T* gm, T* gb) {
  using Vec = VecOf<T, kVecBytes>;
  using V = typename Vec::type;
  using M = typename Vec::mask;
  using MI = typename Vec::mask_int;
  constexpr int VW = Vec::kLanes;
  M lane{};
  for (int l = 0; l < VW; ++l) lane[l] = l;
  for (int64_t o = 0; o < g.o; ++o) {
    V sum{};
    for (int64_t y = 0; y < g.oh; ++y) {
      const int64_t row = ((n * g.o + o) * g.oh + y) * g.ow;
      T* d = gm + (o * g.oh + y) * owp;
      for (int64_t xb = 0; xb < g.ow; xb += VW) {
        if (row + xb + VW > total) {  // the tensor's last elements
          for (int64_t x = xb; x < g.ow; ++x) {
            d[x] = keep_or_zero(am[row + x] != kNoGrad, go[row + x]);
            sum[0] += d[x];
          }
          continue;
        }
        const M keep = (lane < static_cast<MI>(g.ow - xb)) & passes_gradient<T>(am + row + xb);
        const V v = keep ? load<V>(go + row + xb) : V{};  // a select: NaN and Inf pass unchanged
        store(d + xb, v);
        sum += v;
      }
    }
    store(gb + o * VW, load<V>(gb + o * VW) + sum);
  }
}

template <typename T, int K>
void nopool_weight_chunk(const T* x, const T* go, const uint8_t* am, const ConvPoolGeometry& g,
                         int64_t n0, int64_t n1, T* gw, T* gb) {
  constexpr int VW = VecOf<T, kVecBytes>::kLanes;
  constexpr int OB = std::max(1, nopool_block(K));  // 1 where suits() is false: never called
  const int64_t owp = (g.ow + VW - 1) / VW * VW;
  const int64_t hp = g.h + 2 * g.padh;
  const int64_t wp = owp + K - 1;  // loads at xb + kw, xb < owp, kw < K: inside the row
  AlignedVector<T> gm(g.o * g.oh * owp, T(0)), xp(g.c * hp * wp, T(0)), xs(g.c * K * hp * owp);
  const int64_t total = g.n * g.o * g.oh * g.ow;
  const int64_t planes = g.o * g.oh * g.ow, sample = g.c * g.h * g.w;
  for (int64_t n = n0; n < n1; ++n) {
    copy_padded(x + n * sample, g.c, g.h, g.w, g.padh, g.padw, wp, xp.data());
    shift_rows<T, K>(xp.data(), g.c, hp, wp, owp, xs.data());
    nopool_masked_sample(go, am, total, g, n, owp, gm.data(), gb);
    // The next sample's grad_out, codes and input into L2 while this one's blocks compute
    // (NextTaskPrefetch): the masking pass waited on memory for them at batch 256 (perf: twice
    // the blocks' time). Backward alone, 1 -> 32 3x3 28x28, 2 threads, Zen 5 VM, 6 alternating
    // processes, median us: batch 256 ~2000 -> ~1620, batch 64 ~265 -> ~272 (noise).
    NextTaskPrefetch next;
    if (n + 1 < n1)
      next = NextTaskPrefetch({{{go + (n + 1) * planes, planes * int64_t{sizeof(T)}, false},
                                {am + (n + 1) * planes, planes, false},
                                {x + (n + 1) * sample, sample * int64_t{sizeof(T)}, false}}},
                              (g.o + OB - 1) / OB);
    int64_t o0 = 0;
    for (; o0 + OB <= g.o; o0 += OB) {
      next.step();
      nopool_block_sample<T, K, OB>(gm.data(), xs.data(), g, o0, owp, hp, gw);
    }
    for (; o0 < g.o; ++o0) {
      next.step();
      nopool_block_sample<T, K, 1>(gm.data(), xs.data(), g, o0, owp, hp, gw);
    }
  }
}

// grad_weight ([O][C][K][K]) and grad_bias ([O]) of a layer for which nopool_weight_suits;
// false, with nothing written, where x holds Inf or NaN: the lanes past a conv row's end multiply
// input columns by zeros, which such a value would turn into NaN where stock's dense backward
// has none (the caller then takes ATen's).
template <typename T>
bool nopool_weight_grad(const at::Tensor& grad_out, const at::Tensor& argmax,
                        const at::Tensor& input, const ConvPoolGeometry& g, at::Tensor& grad_weight,
                        at::Tensor& grad_bias) {
  if (!span_finite(input.const_data_ptr<T>(), input.numel())) return false;
  constexpr int VW = VecOf<T, kVecBytes>::kLanes;
  const int64_t taps = g.kh * g.kw;
  const int64_t wsize = g.o * g.c * taps * VW, bsize = g.o * VW;
  const int64_t chunks = weight_chunks(g.n);
  AlignedVector<T> partial(chunks * (wsize + bsize), T(0));
  const T* x = input.const_data_ptr<T>();
  const T* go = grad_out.const_data_ptr<T>();
  const uint8_t* am = argmax.const_data_ptr<uint8_t>();
  cpu::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t t = c0; t < c1; ++t) {
      T* gw = partial.data() + t * (wsize + bsize);
      const int64_t n0 = t * g.n / chunks, n1 = (t + 1) * g.n / chunks;
      if (g.kh == 3)
        nopool_weight_chunk<T, 3>(x, go, am, g, n0, n1, gw, gw + wsize);
      else
        nopool_weight_chunk<T, 5>(x, go, am, g, n0, n1, gw, gw + wsize);
    }
  });
  add_chunks(partial.data(), chunks, wsize + bsize, 0, wsize + bsize);
  // Each value the sum of its VW lanes, in lane order.
  const auto lane_sums = [&](const T* lanes, int64_t count, T* dst) {
    for (int64_t i = 0; i < count; ++i) {
      T s = T(0);
      for (int l = 0; l < VW; ++l) s += lanes[i * VW + l];
      dst[i] = s;
    }
  };
  lane_sums(partial.data(), g.o * g.c * taps, grad_weight.data_ptr<T>());
  lane_sums(partial.data() + wsize, g.o, grad_bias.data_ptr<T>());
  return true;
}

}  // namespace fastlenet::cpu
