// Backward kernels of conv2d -> ReLU -> max_pool2d on the CPU.
//
// From the saved x, w and argmax (forward: conv_relu_pool_cpu_fwd.h), only (oh, ow) = the
// argmax of a window with argmax != 255 receives g = grad_out[n,o,ph,pw]:
//   grad_b[o] += g;  grad_w[o] += g * xpad[n, :, oh*SH:+KH, ow*SW:+KW]
//   grad_x[n, :, oh*SH-PADH:+KH, ow*SW-PADW:+KW] += g * w[o]
//
// Both work on a channels-last, zero-padded copy of each sample, where a patch row (KW * C
// values) is contiguous: the patch of a window's argmax is KH rows of NV full vectors. For
// grad_w the accumulators of one output channel stay in registers across its windows; for
// grad_x the weight rows of one output channel do. grad_w/grad_b: samples are split into a
// fixed number of chunks (one per thread), each summing into its own buffer, added in chunk
// order: bitwise identical run to run for a given thread count.
// The inner loops step a row pointer by the row stride and index vectors with constants: with
// `base + kh * stride + v * VW`, GCC keeps all KH * NV runtime offsets live, spills them and
// recomputes addresses per window (conv2, AVX2, alternating both in one process: grad_w 10%,
// grad_x 5% faster this way).
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
#include "cpu_vec.h"

namespace fastlenet::cpu {

// Backward vectors: the widest the target has (64 bytes with AVX-512: LeNet-5's conv2 patch
// row, KW * C = 30 values, is two of them) where a patch row is long, at most 32 bytes where it
// fits in that (conv1: 5 values), since AVX-512 CPUs issue two 32-byte FMAs per cycle but one
// 64-byte FMA.
constexpr int kBwdNarrowBytes = std::min(32, kVecBytes);
inline int bwd_bytes(const ConvPoolGeometry& g, int elem_size) {
  return g.kw * g.c * elem_size <= kBwdNarrowBytes ? kBwdNarrowBytes : kVecBytes;
}
// Patch shapes with a register-blocked backward: KH <= 7 rows of NV <= 4 vectors.
constexpr int kMaxKH = 7;
constexpr int kMaxNV = 4;
// Patch rows one pass of the register-blocked grad_w kernel holds: its KHB * NV accumulators
// plus a few temporaries fit the vector registers, so AVX2 does conv2's 5 rows of 4 vectors in
// two passes (3 + 2 rows) instead of spilling accumulators (b64, one thread: 0.34 -> 0.30 ms).
// grad_x keeps all rows in one pass: its spilled weights become memory operands of the FMAs,
// and a second pass would cost more (0.39 -> 0.49 ms).
inline int64_t rows_per_pass(int64_t kh, int64_t nv) {
  return std::clamp<int64_t>((kVecRegs - 4) / nv, 1, kh);
}

// What the backward kernels share: strides into a channels-last, zero-padded sample
// buf[y][x][c] (y < HP, x < WP) and, per window position q, the offset of its conv
// output's first tap relative to the window's first (q = 255 maps to 0 with no gradient).
template <typename T, int Bytes>
struct BwdLayout {
  static constexpr int VW = VecOf<T, Bytes>::kLanes;
  int64_t wpc;     // elements per padded row: WP * C
  int64_t rowlen;  // one patch row: KW * C
  int64_t nv;      // vectors per patch row
  int64_t size;    // buffer elements, with a tail so full-vector loads stay in bounds
  std::array<int64_t, 256> qoff{};
  // Per pooled output k = ph * PW + pw: the offset of its window's first tap. One flat loop
  // over k with this table beats nested ph/pw loops with runtime strides (conv2 grad_w, AVX2,
  // in a standalone loop: 0.21 -> 0.17 ms for 64 samples).
  std::vector<int64_t> woff;

  explicit BwdLayout(const ConvPoolGeometry& g) {
    const int64_t wp = g.w + 2 * g.padw;
    wpc = wp * g.c;
    rowlen = g.kw * g.c;
    nv = (rowlen + VW - 1) / VW;
    const int64_t rowstep = g.psh * g.sh * wpc;  // between pooled rows
    const int64_t colstep = g.psw * g.sw * g.c;  // between pooled columns
    // The tail keeps full-vector loads of the last patch row, and the stores and loads of the
    // layout conversions (8 values per pixel), in bounds.
    size = (g.h + 2 * g.padh) * wpc + std::max<int64_t>(nv * VW, kTransposeLanes);
    for (int64_t q = 0; q < g.poolh * g.poolw; ++q)
      qoff[q] = (q / g.poolw) * g.sh * wpc + (q % g.poolw) * g.sw * g.c;
    woff.resize(g.ph * g.pw);
    for (int64_t k = 0; k < g.ph * g.pw; ++k) woff[k] = (k / g.pw) * rowstep + (k % g.pw) * colstep;
  }
};

// One sample, planar (C, H, W) to channels-last and padded. float: blocks of 8 pixels x 8
// channels are transposed in registers (in-process A/B, conv2 batch 64 and 256: both backward
// ops ~2% faster than the scalar copy, which does the rest). Each pixel's 8 values are stored
// at row + p * C + c0, in increasing p; lanes past C hold zeros (the rows loaded for channels
// past C) and land on the next pixel's first channels, or on padding, before those are
// written. Channel blocks go from the last to the first for the same reason.
template <typename T, typename Layout>
void to_padded_cl(const T* xs, const ConvPoolGeometry& g, const Layout& L, T* dst) {
  if (g.c == 1) {  // channels-last is the same layout: whole rows
    for (int64_t y = 0; y < g.h; ++y)
      std::memcpy(dst + (y + g.padh) * L.wpc + g.padw, xs + y * g.w, g.w * sizeof(T));
    return;
  }
  int64_t x0 = 0;  // pixels [0, x0) of each row are done by blocks of 8 x 8
  if constexpr (std::is_same_v<T, float>) {
    x0 = g.w / kTransposeLanes * kTransposeLanes;
    for (int64_t y = 0; y < g.h; ++y) {
      T* row = dst + (y + g.padh) * L.wpc + g.padw * g.c;
      for (int64_t c0 = (g.c - 1) / kTransposeLanes * kTransposeLanes; c0 >= 0;
           c0 -= kTransposeLanes) {
        const int64_t nc = std::min<int64_t>(kTransposeLanes, g.c - c0);
        for (int64_t x = 0; x < x0; x += kTransposeLanes) {
          Float8 r[kTransposeLanes];
          for (int64_t i = 0; i < kTransposeLanes; ++i)
            r[i] = i < nc ? load<Float8>(xs + ((c0 + i) * g.h + y) * g.w + x) : Float8{};
          transpose8(r);
          for (int64_t p = 0; p < kTransposeLanes; ++p) store(row + (x + p) * g.c + c0, r[p]);
        }
      }
    }
  }
  for (int64_t c = 0; c < g.c; ++c)
    for (int64_t y = 0; y < g.h; ++y) {
      T* row = dst + (y + g.padh) * L.wpc + g.padw * g.c + c;
      const T* src = xs + (c * g.h + y) * g.w;
      for (int64_t x = x0; x < g.w; ++x) row[x * g.c] = src[x];
    }
}

// The inverse for one sample: channels-last (padded) src to planar (C, H, W) dst. Loads of
// 8 values per pixel read past its channels into the next pixel, padding or the buffer's tail.
template <typename T, typename Layout>
void from_padded_cl(const T* src, const ConvPoolGeometry& g, const Layout& L, T* dst) {
  int64_t x0 = 0;
  if constexpr (std::is_same_v<T, float>) {
    x0 = g.w / kTransposeLanes * kTransposeLanes;
    for (int64_t y = 0; y < g.h; ++y) {
      const T* row = src + (y + g.padh) * L.wpc + g.padw * g.c;
      for (int64_t c0 = 0; c0 < g.c; c0 += kTransposeLanes) {
        const int64_t nc = std::min<int64_t>(kTransposeLanes, g.c - c0);
        for (int64_t x = 0; x < x0; x += kTransposeLanes) {
          Float8 r[kTransposeLanes];
          for (int64_t p = 0; p < kTransposeLanes; ++p)
            r[p] = load<Float8>(row + (x + p) * g.c + c0);
          transpose8(r);
          for (int64_t i = 0; i < nc; ++i) store(dst + ((c0 + i) * g.h + y) * g.w + x, r[i]);
        }
      }
    }
  }
  for (int64_t c = 0; c < g.c; ++c)
    for (int64_t y = 0; y < g.h; ++y) {
      const T* row = src + (y + g.padh) * L.wpc + g.padw * g.c + c;
      T* out = dst + (c * g.h + y) * g.w;
      for (int64_t x = x0; x < g.w; ++x) out[x] = row[x * g.c];
    }
}

// True when every value is finite (x * 0 is 0 for finite x, NaN for Inf and NaN).
template <typename T>
bool all_finite(const at::Tensor& t) {
  const T* p = t.const_data_ptr<T>();
  const int64_t n = t.numel();
  // Elements per task: a parallel task must outweigh its start-up cost.
  constexpr int64_t kGrain = 1 << 16;
  std::vector<char> ok((n + kGrain - 1) / kGrain + 1, 1);
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    using V = typename VecOf<T, kVecBytes>::type;
    constexpr int VW = VecOf<T, kVecBytes>::kLanes;
    V acc{};
    int64_t i = b;
    for (; i + VW <= e; i += VW) acc += load<V>(p + i) * T(0);
    T tail = T(0);
    for (; i < e; ++i) tail += p[i] * T(0);
    for (int l = 0; l < VW; ++l) tail += acc[l];
    ok[b / kGrain] = tail == T(0);
  });
  return std::all_of(ok.begin(), ok.end(), [](char v) { return v != 0; });
}

// grad_w of patch rows kh0 .. kh0+KH-1 of one sample, all output channels, accumulated into gw
// ([O][g.kh][NV*VW]), and grad_b into gb ([O]) in the pass with kh0 = 0. A window with no
// gradient is visited with g = 0 (branch-free: x is finite here).
template <typename T, int Bytes, int KH, int NV>
void bwd_weight_sample(const T* xcl, const T* go, const uint8_t* am, const ConvPoolGeometry& g,
                       const BwdLayout<T, Bytes>& L, T* gw, T* gb, int64_t kh0) {
  using V = typename VecOf<T, Bytes>::type;
  constexpr int VW = VecOf<T, Bytes>::kLanes;
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
    for (int64_t k = 0; k < plane; ++k) {
      const uint8_t q = amo[k];
      const T gv = keep_or_zero(q != kNoGrad, gop[k]);
      const T* row = xcl + woff[k] + L.qoff[q];
      bsum += gv;
      for (int kh = 0; kh < KH; ++kh, row += wpc)
        for (int v = 0; v < NV; ++v) acc[kh][v] += gv * load<V>(row + v * VW);
    }
    for (int kh = 0; kh < KH; ++kh)
      for (int v = 0; v < NV; ++v) store(gwo + (kh * NV + v) * VW, acc[kh][v]);
    if (kh0 == 0) gb[o] = bsum;
  }
}

// grad_x of one sample into dx (channels-last, padded); wcl is the weight as
// [O][KH][NV*VW], zero beyond each patch row, so full vectors add exact zeros past it (g is
// finite here).
template <typename T, int Bytes, int KH, int NV>
void bwd_input_sample(T* dx, const T* go, const uint8_t* am, const ConvPoolGeometry& g,
                      const BwdLayout<T, Bytes>& L, const T* wcl) {
  using V = typename VecOf<T, Bytes>::type;
  constexpr int VW = VecOf<T, Bytes>::kLanes;
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

template <typename T, int Bytes>
using WeightSampleFn = void (*)(const T*, const T*, const uint8_t*, const ConvPoolGeometry&,
                                const BwdLayout<T, Bytes>&, T*, T*, int64_t);
template <typename T, int Bytes>
using InputSampleFn = void (*)(T*, const T*, const uint8_t*, const ConvPoolGeometry&,
                               const BwdLayout<T, Bytes>&, const T*);

template <typename T, int Bytes, int KH, int... NVs>
constexpr void fill_row(std::integer_sequence<int, NVs...>,
                        std::array<std::array<WeightSampleFn<T, Bytes>, kMaxNV>, kMaxKH>& wt,
                        std::array<std::array<InputSampleFn<T, Bytes>, kMaxNV>, kMaxKH>& it) {
  ((wt[KH - 1][NVs] = &bwd_weight_sample<T, Bytes, KH, NVs + 1>), ...);
  ((it[KH - 1][NVs] = &bwd_input_sample<T, Bytes, KH, NVs + 1>), ...);
}

template <typename T, int Bytes>
struct BwdTables {
  std::array<std::array<WeightSampleFn<T, Bytes>, kMaxNV>, kMaxKH> weight{};
  std::array<std::array<InputSampleFn<T, Bytes>, kMaxNV>, kMaxKH> input{};
  BwdTables() { fill<1, 2, 3, 4, 5, 6, 7>(); }
  template <int... KHs>
  void fill() {
    (fill_row<T, Bytes, KHs>(std::make_integer_sequence<int, kMaxNV>{}, weight, input), ...);
  }
};

template <typename T, int Bytes>
const BwdTables<T, Bytes>& bwd_tables() {
  static const BwdTables<T, Bytes> tables;
  return tables;
}

inline bool register_blocked(const ConvPoolGeometry& g, int64_t nv) {
  return g.kh <= kMaxKH && nv <= kMaxNV;
}

// The conv output's gradient, dense: grad_out at each window's argmax, 0 elsewhere. Used
// where Inf/NaN must propagate exactly as in the stock composition's dense backward.
inline at::Tensor dense_grad(const at::Tensor& grad_out, const at::Tensor& argmax,
                             const ConvPoolGeometry& g) {
  const at::Tensor valid = argmax != kNoGrad;
  const at::Tensor pos = at::where(valid, argmax.to(at::kLong), 0);
  const auto lopt = argmax.options().dtype(at::kLong);
  const at::Tensor base =
      at::arange(g.ph, lopt).view({-1, 1}) * (g.psh * g.ow) + at::arange(g.pw, lopt) * g.psw;
  const at::Tensor flat = base + at::div(pos, g.poolw, "floor") * g.ow + pos.remainder(g.poolw);
  at::Tensor dense = at::zeros({g.n, g.o, g.oh * g.ow}, grad_out.options());
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

template <typename T, int Bytes>
void backward_weight_kernel(const at::Tensor& grad_out, const at::Tensor& argmax,
                            const at::Tensor& input, const ConvPoolGeometry& g,
                            at::Tensor& grad_weight, at::Tensor& grad_bias) {
  constexpr int VW = BwdLayout<T, Bytes>::VW;
  const BwdLayout<T, Bytes> L(g);
  const bool blocked = register_blocked(g, L.nv);
  // Accumulators as [O][KH][NV*VW] (register-blocked) or [O][KH][rowlen] (generic).
  const int64_t rowsize = blocked ? L.nv * VW : L.rowlen;
  const int64_t wsize = g.o * g.kh * rowsize;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), g.n));
  std::vector<T> partial(chunks * (wsize + g.o), T(0));
  const T* x = input.const_data_ptr<T>();
  const T* gop = grad_out.const_data_ptr<T>();
  const uint8_t* amp = argmax.const_data_ptr<uint8_t>();
  const int64_t plane_out = g.ph * g.pw;
  const int64_t khb = rows_per_pass(g.kh, L.nv);
  const auto& table = bwd_tables<T, Bytes>().weight;
  const auto fn = blocked ? table[khb - 1][L.nv - 1] : nullptr;
  const auto fn_last = blocked ? table[(g.kh - 1) % khb][L.nv - 1] : nullptr;  // last pass
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<T> xcl(L.size, T(0));
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      T* gw = partial.data() + chunk * (wsize + g.o);
      T* gb = gw + wsize;
      for (int64_t n = chunk * g.n / chunks; n < (chunk + 1) * g.n / chunks; ++n) {
        to_padded_cl(x + n * g.c * g.h * g.w, g, L, xcl.data());
        const T* go = gop + n * g.o * plane_out;
        const uint8_t* am = amp + n * g.o * plane_out;
        if (fn) {
          for (int64_t kh0 = 0; kh0 < g.kh; kh0 += khb)
            (kh0 + khb < g.kh ? fn : fn_last)(xcl.data(), go, am, g, L, gw, gb, kh0);
          continue;
        }
        for (int64_t o = 0; o < g.o; ++o)
          for (int64_t k = 0; k < plane_out; ++k) {
            const uint8_t q = am[o * plane_out + k];
            if (q == kNoGrad) continue;
            const T gv = go[o * plane_out + k];
            const T* base = xcl.data() + L.woff[k] + L.qoff[q];
            gb[o] += gv;
            for (int64_t kh = 0; kh < g.kh; ++kh) {
              T* dst = gw + (o * g.kh + kh) * rowsize;
              const T* src = base + kh * L.wpc;
              for (int64_t t = 0; t < L.rowlen; ++t) dst[t] += gv * src[t];
            }
          }
      }
    }
  });
  for (int64_t chunk = 1; chunk < chunks; ++chunk)
    for (int64_t k = 0; k < wsize + g.o; ++k) partial[k] += partial[chunk * (wsize + g.o) + k];
  // [O][KH][KW][C] (rows padded to rowsize) -> [O][C][KH][KW]
  T* gwp = grad_weight.data_ptr<T>();
  for (int64_t o = 0; o < g.o; ++o)
    for (int64_t kh = 0; kh < g.kh; ++kh)
      for (int64_t kw = 0; kw < g.kw; ++kw)
        for (int64_t c = 0; c < g.c; ++c)
          gwp[((o * g.c + c) * g.kh + kh) * g.kw + kw] =
              partial[(o * g.kh + kh) * rowsize + kw * g.c + c];
  std::memcpy(grad_bias.data_ptr<T>(), partial.data() + wsize, g.o * sizeof(T));
}

template <typename T, int Bytes>
void backward_input_kernel(const at::Tensor& grad_out, const at::Tensor& argmax,
                           const at::Tensor& weight, const ConvPoolGeometry& g,
                           at::Tensor& grad_input) {
  constexpr int VW = BwdLayout<T, Bytes>::VW;
  const BwdLayout<T, Bytes> L(g);
  const bool blocked = register_blocked(g, L.nv);
  const int64_t rowsize = blocked ? L.nv * VW : L.rowlen;
  // weight as [O][KH][KW][C], each patch row padded with zeros to rowsize.
  std::vector<T> wcl(g.o * g.kh * rowsize, T(0));
  const T* w = weight.const_data_ptr<T>();
  for (int64_t o = 0; o < g.o; ++o)
    for (int64_t c = 0; c < g.c; ++c)
      for (int64_t kh = 0; kh < g.kh; ++kh)
        for (int64_t kw = 0; kw < g.kw; ++kw)
          wcl[(o * g.kh + kh) * rowsize + kw * g.c + c] =
              w[((o * g.c + c) * g.kh + kh) * g.kw + kw];
  const T* gop = grad_out.const_data_ptr<T>();
  const uint8_t* amp = argmax.const_data_ptr<uint8_t>();
  T* gi = grad_input.data_ptr<T>();
  const int64_t plane_out = g.ph * g.pw;
  const auto fn = blocked ? bwd_tables<T, Bytes>().input[g.kh - 1][L.nv - 1] : nullptr;
  at::parallel_for(0, g.n, 1, [&](int64_t n0, int64_t n1) {
    std::vector<T> dx(L.size);
    for (int64_t n = n0; n < n1; ++n) {
      std::fill(dx.begin(), dx.end(), T(0));
      const T* go = gop + n * g.o * plane_out;
      const uint8_t* am = amp + n * g.o * plane_out;
      if (fn) {
        fn(dx.data(), go, am, g, L, wcl.data());
      } else {
        for (int64_t o = 0; o < g.o; ++o)
          for (int64_t k = 0; k < plane_out; ++k) {
            const uint8_t q = am[o * plane_out + k];
            if (q == kNoGrad) continue;
            const T gv = go[o * plane_out + k];
            T* base = dx.data() + L.woff[k] + L.qoff[q];
            for (int64_t kh = 0; kh < g.kh; ++kh) {
              T* dst = base + kh * L.wpc;
              const T* src = wcl.data() + (o * g.kh + kh) * rowsize;
              for (int64_t t = 0; t < L.rowlen; ++t) dst[t] += gv * src[t];
            }
          }
      }
      from_padded_cl(dx.data(), g, L, gi + n * g.c * g.h * g.w);
    }
  });
}

}  // namespace fastlenet::cpu
