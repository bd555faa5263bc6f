// ReLU -> max_pool2d -> argmax of a stored conv output on the CPU: the forward's second half for
// the layers whose conv ATen's convolution (oneDNN) computes faster than the fused kernels
// (conv_relu_pool_cpu.cpp chooses; conv_relu_pool_cpu_fwd.h has the fused ones).
// Math and saved state: fastlenet/reference.py (conv_relu_pool).
// Computes:
// - relu_pool: out and argmax (N, O, PH, PW) from the conv output y (N, O, OH, OW), contiguous,
//   with max_pool2d's rule (the first strictly larger value or a NaN takes the window) and ReLU
//   after it (argmax kNoGrad where the max is <= 0);
// - relu_codes, without pooling (every conv output a window of its own): ReLU in place on y,
//   which becomes the output, and argmax 0 or kNoGrad per output.
// Saves nothing itself: the caller's op returns argmax, one byte per pooled output, which the
// backward reads.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "checks.h"
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

template <typename T>
void relu_pool(const at::Tensor& conv, const ConvPoolGeometry& g, at::Tensor& out,
               at::Tensor& argmax) {
  using Vec = VecOf<T, kVecBytes>;
  using V = typename Vec::type;
  using M = typename Vec::mask;
  using MI = typename Vec::mask_int;
  constexpr int VW = Vec::kLanes;
  const T* y = conv.const_data_ptr<T>();
  T* outp = out.data_ptr<T>();
  uint8_t* amp = argmax.data_ptr<uint8_t>();
  const int64_t plane_in = g.oh * g.ow, plane_out = g.ph * g.pw;
  const int64_t blocks = (g.pw + VW - 1) / VW;
  // A window row's inputs for VW pooled columns: contiguous loads every other element where the
  // pool stride is 2 (the common case), lane by lane elsewhere.
  const bool pairs = g.psw == 2;
  // The pooled row's conv rows, copied with a tail so the last block's loads stay in bounds.
  const int64_t rowlen = blocks * VW * g.psw + g.poolw + 2 * VW;
  at::parallel_for(0, g.n * g.o, kPoolGrain, [&](int64_t p0, int64_t p1) {
    std::vector<T> rows(g.poolh * rowlen, T(0));
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t ph = 0; ph < g.ph; ++ph) {
        for (int64_t i = 0; i < g.poolh; ++i)
          std::memcpy(rows.data() + i * rowlen, y + p * plane_in + (ph * g.psh + i) * g.ow,
                      g.ow * sizeof(T));
        for (int64_t b = 0; b < blocks; ++b) {
          V best{};
          M pos{};
          for (int64_t i = 0; i < g.poolh; ++i)
            for (int64_t j = 0; j < g.poolw; ++j) {
              const T* first = rows.data() + i * rowlen + b * VW * g.psw + j;
              V v;
              if (pairs) {
                v = every_other<V>(first, std::make_index_sequence<VW>{});
              } else {
                for (int l = 0; l < VW; ++l) v[l] = first[l * g.psw];
              }
              if (i == 0 && j == 0) {
                best = v;
                continue;
              }
              // max_pool2d's rule: a strictly larger value or a NaN replaces the max.
              const M take = (v > best) | (v != v);
              best = take ? v : best;
              pos = take ? M{} + static_cast<MI>(i * g.poolw + j) : pos;
            }
          const M dead = best <= V{};  // ReLU passes no gradient; false for a NaN max
          const V relu = dead ? V{} : best;
          const M codes = dead ? M{} + static_cast<MI>(kNoGrad) : pos;
          const int64_t at = p * plane_out + ph * g.pw + b * VW;
          const int64_t lanes = std::min<int64_t>(VW, g.pw - b * VW);
          for (int64_t l = 0; l < lanes; ++l) {
            outp[at + l] = relu[l];
            amp[at + l] = static_cast<uint8_t>(codes[l]);
          }
        }
      }
    }
  });
}

// Elements per task of relu_codes: below this a parallel region costs more than it saves.
constexpr int64_t kCodesGrain = 1 << 15;

template <typename T>
void relu_codes(at::Tensor& y, at::Tensor& argmax) {
  using Vec = VecOf<T, kVecBytes>;
  using V = typename Vec::type;
  using M = typename Vec::mask;
  using MI = typename Vec::mask_int;
  constexpr int VW = Vec::kLanes;
  T* p = y.data_ptr<T>();
  uint8_t* amp = argmax.data_ptr<uint8_t>();
  at::parallel_for(0, y.numel(), kCodesGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + VW <= end; i += VW) {
      const V v = load<V>(p + i);
      const M dead = v <= V{};  // false for NaN, which ReLU passes as stock's does
      store(p + i, dead ? V{} : v);
      store(amp + i, low_bytes(dead & static_cast<MI>(kNoGrad)));
    }
    for (; i < end; ++i) {
      const bool dead = p[i] <= T(0);
      p[i] = keep_or_zero(!dead, p[i]);
      amp[i] = dead ? kNoGrad : uint8_t(0);
    }
  });
}

}  // namespace fastlenet::cpu
