// grad_w and grad_b of conv2d -> ReLU -> max_pool2d on the CPU for one-channel float32 inputs,
// with vector lanes over the taps of a patch.
// Math and saved state: fastlenet/reference.py (conv_relu_pool).
// Computes: per chunk of samples, grad_w and grad_b summed per lane (StackScratch; mapped to
// taps at the chunk's end, stack_weight_finish), visiting only each window's argmax patch.
// Accumulates in the data's own type. Saves nothing; reads x, grad_out and argmax. Buffers,
// chunking and the Inf/NaN fallback: backward_kernel in conv_relu_pool_cpu_bwd.h, which calls
// these.
//
// One input channel gives a patch row of KW values: a vector per patch row fills few lanes
// (LeNet-5's conv1: 5 of 8, a load and an FMA per row), and lanes over pooled columns need each
// lane's argmax tap picked by blends (11 blends and 5 FMAs per patch row of 16 windows at 5x5,
// on the ports the FMAs use). Here each sample's zero-padded input is rewritten as stacks: stack
// row r holds input rows r .. r + 2 interleaved by column (element 3c + j is row r + j, column
// c). Patch rows 3s .. 3s + 2 of the window at (y, x) are then the 3 * KW values from element 3x
// of stack row y + 3s, one float32 vector for KW <= 5: a window's argmax patch is NT = ceil(KH /
// 3) vector loads and FMAs per output channel, its gradient broadcast, no shuffle. Lanes past the
// patch (the next columns' values, or rows past KH) sum values that stack_weight_finish drops.
// Most of those loads straddle two cache lines; they, not the FMAs, bound the kernel (~3 cycles
// a window and output channel at 5x5).
//
// grad_w alone, float32, 2 threads, processes alternately, Xeon VM, against the kernels it
// replaced (lanes over pooled columns from batch 8, a vector per patch row below), batch 1 / 64 /
// 256: LeNet-5's conv1 1.06x / 1.31x / 1.35x, the Fashion CNN's 1.07x / 1.43x / 1.40x, 1 -> 32
// 3x3 28x28 1.17x / 1.27x / 1.21x, 1 -> 128 3x3 pad 1 32x32 1.52x / 1.01x / 1.01x; 1 -> 6 3x3
// 8x8 1.10x / 1.22x at batch 64 / 256. LeNet-5 step, fused SGD: 0.99x / 1.016x / 1.025x.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "checks.h"
#include "cpu_vec.h"

namespace fastlenet::cpu {

// Input rows per stack row: 3 rows of 5 taps fill 15 of a float32 vector's 16 lanes.
constexpr int kStackRows = 3;
// Stacks per patch and vectors per stack the kernel is instantiated for: patches of up to 6
// rows of up to 10 taps (two vectors a stack above 5).
constexpr int kStackMaxNT = 2;
constexpr int kStackMaxNV = 2;

template <typename T>
struct StackVec {
  using V = typename VecOf<T, kVecBytes>::type;
  static constexpr int VW = VecOf<T, kVecBytes>::kLanes;
};

template <typename T>
struct StackLayout;
template <typename T>
struct StackScratch;
template <typename T>
using StackWeightFn = void (*)(const T*, const uint8_t*, int64_t, const ConvPoolGeometry&,
                               const StackLayout<T>&, StackScratch<T>&);

// Where a sample's stacks and its windows' patches are, and the kernel for its patches
// (stack_weight_sample for its NT and NV, passes of CB output channels).
template <typename T>
struct StackLayout {
  static constexpr int VW = StackVec<T>::VW;
  int64_t wpr = 0;          // padded input row: WP rounded up to whole vectors
  int64_t rows = 0;         // stack rows built: those a patch starts in
  int64_t row = 0;          // elements per stack row: kStackRows * wpr
  int64_t size = 0;         // elements of the stacks
  int nt = 0, nv = 0;       // stacks per patch, vectors per stack
  std::vector<int> lo, hi;  // per block of VW padded columns: the lanes [lo, hi) on input columns
  // Per pooled output k = ph * PW + pw, the offset of its window's first tap in the stacks (in
  // whole blocks of kWindowBlock, zero past the plane), and per argmax position q that of its
  // patch relative to the window's (the first kWindowBlock; kNoGrad & 15 = 15 maps to 0).
  AlignedVector<int32_t> woff;
  std::array<int32_t, kWindowBlock> qoff{};
  StackWeightFn<T> fn = nullptr;
  int cb = 0;

  explicit StackLayout(const ConvPoolGeometry& g);
};

// Element `l` of output vector `Out` of three interleaved vectors a, b, c (element 3i + j is
// vector j's lane i): the lane each of the two shuffles takes (of a then b, of that then c).
template <int VW, int Out>
constexpr int stack_first(int l) {
  const int e = Out * VW + l;
  return (e % kStackRows == 1 ? VW : 0) + e / kStackRows;
}
template <int VW, int Out>
constexpr int stack_second(int l) {
  const int e = Out * VW + l;
  return e % kStackRows == 2 ? VW + e / kStackRows : l;
}

template <int Out, typename V, size_t... I>
inline V interleave3(const V& a, const V& b, const V& c, std::index_sequence<I...>) {
  constexpr int VW = sizeof...(I);
  const V ab = __builtin_shufflevector(a, b, stack_first<VW, Out>(I)...);
  return __builtin_shufflevector(ab, c, stack_second<VW, Out>(I)...);
}

// One sample (one plane, h x w) into the stacks, a block of VW padded columns at a time: each
// input row's vector is read once, by one masked load (zeros on the padding), and interleaved
// with the two rows below it in registers.
template <typename T>
void build_stacks(const T* x, const ConvPoolGeometry& g, const StackLayout<T>& L, T* st) {
  using V = typename StackVec<T>::V;
  constexpr int VW = StackVec<T>::VW;
  static_assert(kStackRows == 3, "interleave3 interleaves three rows");
  constexpr auto lanes = std::make_index_sequence<VW>{};
  for (int64_t b = 0; b < L.wpr / VW; ++b) {
    const T* src = x + b * VW - g.padw;
    const int lo = L.lo[b], hi = L.hi[b];
    const auto row = [&](int64_t r) {  // padded row r
      const int64_t y = r - g.padh;
      return y < 0 || y >= g.h ? V{} : load_lanes<V>(src + y * g.w, lo, hi);
    };
    V a = row(0), c = row(1);
    T* dst = st + b * kStackRows * VW;
    for (int64_t r = 0; r < L.rows; ++r, dst += L.row) {
      const V bb = c;
      c = row(r + 2);
      store(dst, interleave3<0>(a, bb, c, lanes));
      store(dst + VW, interleave3<1>(a, bb, c, lanes));
      store(dst + 2 * VW, interleave3<2>(a, bb, c, lanes));
      a = bb;
    }
  }
}

// A thread's scratch: the stacks; one pass's table ([KB][CB][kWindowBlock]: per block of
// kWindowBlock windows and output channel of the pass, each window's argmax patch as its offset in
// the stacks and its gradient, zero without one); and the chunk's lane sums (grad_w
// [OP][NT * NV][VW], OP: the output channels rounded up to whole passes; grad_b
// [O][kWindowBlock]).
template <typename T>
struct StackScratch {
  AlignedVector<T> stacks;
  AlignedVector<int32_t> off;
  AlignedVector<T> grad;
  AlignedVector<T> sums, bias;
};

// This thread's scratch for L and o output channels, lane sums zeroed: kept from call to call
// (the step calls the same shapes each time; allocating it per call cost ~1 us at batch 1).
// The stacks' elements past the rows build_stacks writes are only read into lanes
// stack_weight_finish drops: whatever they hold.
template <typename T>
StackScratch<T>& stack_scratch(const StackLayout<T>& L, int64_t o) {
  thread_local StackScratch<T> s;
  const int64_t table = L.woff.size() * L.cb;
  s.stacks.resize(L.size);
  s.off.resize(table);
  s.grad.resize(table);
  s.sums.assign((o + L.cb - 1) / L.cb * L.cb * L.nt * L.nv * StackVec<T>::VW, T(0));
  s.bias.assign(o * kWindowBlock, T(0));
  return s;
}

// Table rows of output channels o0 .. o0 + CB - 1 of one sample (channels past O: offset 0,
// gradient 0), 16 windows at a time, so that the kernel's inner loop is loads and FMAs only;
// their gradients added to the grad_b lane sums. `left`: values from go and am to the tensors'
// end.
template <typename T, int CB>
void stack_table(const T* go, const uint8_t* am, int64_t left, const ConvPoolGeometry& g,
                 const StackLayout<T>& L, int64_t o0, StackScratch<T>& t) {
  typedef int32_t I __attribute__((vector_size(4 * kWindowBlock)));
  typedef T G __attribute__((vector_size(sizeof(T) * kWindowBlock)));
  using Codes = typename ByteVec<kWindowBlock>::type;
  using GM = decltype(G{} > G{});
  const int64_t plane = g.ph * g.pw;
  const int64_t blocks = static_cast<int64_t>(L.woff.size()) / kWindowBlock;
  const I qoff = load<I>(L.qoff.data());
  for (int i = 0; i < CB; ++i) {
    const int64_t o = o0 + i;
    if (o >= g.o) {
      for (int64_t kb = 0; kb < blocks; ++kb) {
        store(t.off.data() + (kb * CB + i) * kWindowBlock, I{});
        store(t.grad.data() + (kb * CB + i) * kWindowBlock, G{});
      }
      continue;
    }
    G b = load<G>(t.bias.data() + o * kWindowBlock);
    for (int64_t kb = 0; kb < blocks; ++kb) {
      const int64_t k0 = kb * kWindowBlock, at = o * plane + k0;
      const int n = static_cast<int>(std::min<int64_t>(kWindowBlock, plane - k0));
      Codes qb;
      G gv;
      if (n == kWindowBlock && at + kWindowBlock <= left) {
        qb = load<Codes>(am + at);
        gv = load<G>(go + at);
      } else {
        qb = load_bytes<kWindowBlock>(am + at, n, kNoGrad);
        gv = load_lanes<G>(go + at, 0, n);
      }
      const I q = __builtin_convertvector(qb, I);
      const I keep = q != I{} + kNoGrad;
      const I patch = __builtin_shuffle(qoff, q & (kWindowBlock - 1));
      const int64_t e = (kb * CB + i) * kWindowBlock;
      store(t.off.data() + e, (load<I>(L.woff.data() + k0) + patch) & keep);
      gv = __builtin_convertvector(keep, GM) ? gv : G{};  // NaN, Inf pass where kept
      store(t.grad.data() + e, gv);
      b += gv;
    }
    store(t.bias.data() + o * kWindowBlock, b);
  }
}

// Output channels per pass (CB): their NT * NV accumulators fit the vector registers with a few
// to spare.
template <int NT, int NV>
constexpr int stack_max_channels() {
  return std::min(12, (kVecRegs - 4) / (NT * NV));
}

// grad_w and grad_b lane sums of every output channel of one sample (its stacks in t; grad_out
// and argmax with `left` values from them to the tensors' end), CB output channels a pass: the
// pass's table, then its windows. A window with no gradient adds 0 times its patch (x is finite
// here).
template <typename T, int NT, int NV, int CB>
void stack_weight_sample(const T* go, const uint8_t* am, int64_t left, const ConvPoolGeometry& g,
                         const StackLayout<T>& L, StackScratch<T>& t) {
  using V = typename StackVec<T>::V;
  constexpr int VW = StackVec<T>::VW;
  const int64_t plane = g.ph * g.pw;
  const int64_t blocks = static_cast<int64_t>(L.woff.size()) / kWindowBlock;
  const T* stack[NT];  // each stack of a patch from a base of its own: no address arithmetic
  for (int s = 0; s < NT; ++s) stack[s] = t.stacks.data() + s * kStackRows * L.row;
  for (int64_t o0 = 0; o0 < g.o; o0 += CB) {
    stack_table<T, CB>(go, am, left, g, L, o0, t);
    T* sums = t.sums.data() + o0 * NT * NV * VW;
    V acc[CB][NT * NV];
    for (int i = 0; i < CB; ++i)
      for (int a = 0; a < NT * NV; ++a) acc[i][a] = load<V>(sums + (i * NT * NV + a) * VW);
    for (int64_t kb = 0; kb < blocks; ++kb) {
      const int32_t* off = t.off.data() + kb * CB * kWindowBlock;
      const T* gr = t.grad.data() + kb * CB * kWindowBlock;
      const int64_t n = std::min<int64_t>(kWindowBlock, plane - kb * kWindowBlock);
      for (int64_t k = 0; k < n; ++k)
        for (int i = 0; i < CB; ++i) {
          const int64_t at = off[i * kWindowBlock + k];
          const V gb = broadcast<V>(gr + i * kWindowBlock + k);
          for (int s = 0; s < NT; ++s)
            for (int v = 0; v < NV; ++v) acc[i][s * NV + v] += gb * load<V>(stack[s] + at + v * VW);
        }
    }
    for (int i = 0; i < CB; ++i)
      for (int a = 0; a < NT * NV; ++a) store(sums + (i * NT * NV + a) * VW, acc[i][a]);
  }
}

// Passes of CB output channels: of these, the CB that fits the registers and pads O the least
// (then the largest).
constexpr int kStackPasses[] = {4, 6, 8, 12};

template <typename T, int NT, int NV>
std::pair<StackWeightFn<T>, int> stack_pass(int64_t o) {
  std::pair<StackWeightFn<T>, int> best{nullptr, 0};
  int64_t best_pad = 0;
  const auto pick = [&]<int CB>() {
    if constexpr (CB <= stack_max_channels<NT, NV>()) {
      const int64_t pad = (o + CB - 1) / CB * CB;
      if (best.first == nullptr || pad <= best_pad) {
        best = {&stack_weight_sample<T, NT, NV, CB>, CB};
        best_pad = pad;
      }
    }
  };
  [&]<size_t... I>(std::index_sequence<I...>) {
    (pick.template operator()<kStackPasses[I]>(), ...);
  }(std::make_index_sequence<std::size(kStackPasses)>{});
  return best;
}

template <typename T>
StackLayout<T>::StackLayout(const ConvPoolGeometry& g) {
  const int64_t wp = g.w + 2 * g.padw;
  wpr = (wp + VW - 1) / VW * VW;
  nt = static_cast<int>((g.kh + kStackRows - 1) / kStackRows);
  nv = static_cast<int>((kStackRows * g.kw + VW - 1) / VW);
  rows = (g.oh - 1) * g.sh + kStackRows * (nt - 1) + 1;
  row = kStackRows * wpr;
  // A patch's last vector ends up to nv * VW past its stack row's end (the last window's patch
  // starts at most 3 * (WP - KW) along it).
  size = rows * row + nv * VW;
  for (int64_t c0 = 0; c0 < wpr; c0 += VW) {
    lo.push_back(static_cast<int>(std::clamp<int64_t>(g.padw - c0, 0, VW)));
    hi.push_back(static_cast<int>(std::clamp<int64_t>(g.w + g.padw - c0, lo.back(), VW)));
  }
  woff.assign((g.ph * g.pw + kWindowBlock - 1) / kWindowBlock * kWindowBlock, 0);
  for (int64_t ph = 0, k = 0; ph < g.ph; ++ph)
    for (int64_t pw = 0; pw < g.pw; ++pw, ++k)
      woff[k] = static_cast<int32_t>(ph * g.psh * g.sh * row + pw * g.psw * g.sw * kStackRows);
  for (int64_t q = 0; q < g.poolh * g.poolw; ++q)
    qoff[q] = static_cast<int32_t>((q / g.poolw) * g.sh * row + (q % g.poolw) * g.sw * kStackRows);
  static_assert(kStackMaxNT == 2 && kStackMaxNV == 2, "one branch per instantiation");
  std::tie(fn, cb) = nt == 1 ? (nv == 1 ? stack_pass<T, 1, 1>(g.o) : stack_pass<T, 1, 2>(g.o))
                             : (nv == 1 ? stack_pass<T, 2, 1>(g.o) : stack_pass<T, 2, 2>(g.o));
}

// Below this many pooling windows in the batch the per-window kernel's smaller set-up wins: 1 -> 6
// 3x3 8x8 (9 windows a sample) at batch 4 / 8 / 16 / 32 0.90x / 0.96x / 1.01x / 1.04x; LeNet-5's
// conv1 at batch 1 (196 windows) 1.06x.
constexpr int64_t kStackMinWindows = 128;

// Whether the stack kernel takes grad_w of this layer: float32 (float64 rows of 5 taps take two
// vectors: 0.61-1.03x the lanes over pooled columns at batch 64, where the per-window kernel is
// 0.70-1.20x), one input channel, at least kStackMinWindows windows, patches of up to kStackMaxNT
// stacks of kStackMaxNV vectors, pools of fewer than kWindowBlock positions (qoff), offsets that
// fit int32, and 32 vector registers (its register blocks assume AVX-512's).
template <typename T>
bool stack_weight_suits(const ConvPoolGeometry& g) {
  constexpr int64_t VW = StackVec<T>::VW;
  const int64_t wpr = (g.w + 2 * g.padw + VW - 1) / VW * VW;
  return kVecRegs >= 32 && std::is_same_v<T, float> && g.c == 1 &&
         g.n * g.ph * g.pw >= kStackMinWindows && g.kh <= kStackRows * kStackMaxNT &&
         kStackRows * g.kw <= kStackMaxNV * VW && g.poolh * g.poolw < kWindowBlock &&
         (g.h + 2 * g.padh + 4) * kStackRows * wpr < INT32_MAX;
}

// The lane sums of a chunk of samples into grad_w ([O][KH][rowsize], column kw at kw) and grad_b
// ([O]), added to what they hold.
template <typename T>
void stack_weight_finish(const StackScratch<T>& t, const ConvPoolGeometry& g,
                         const StackLayout<T>& L, int64_t rowsize, T* gw, T* gb) {
  constexpr int VW = StackVec<T>::VW;
  const int64_t per_stack = int64_t{L.nv} * VW;
  for (int64_t o = 0; o < g.o; ++o) {
    const T* sums = t.sums.data() + o * L.nt * per_stack;
    for (int64_t s = 0; s < L.nt; ++s)
      for (int64_t e = 0; e < per_stack; ++e) {  // element e of a patch's stack s
        const int64_t kh = s * kStackRows + e % kStackRows, kw = e / kStackRows;
        if (kh < g.kh && kw < g.kw) gw[(o * g.kh + kh) * rowsize + kw] += sums[s * per_stack + e];
      }
    T b[kWindowBlock];
    std::memcpy(b, t.bias.data() + o * kWindowBlock, sizeof(b));
    for (int w = kWindowBlock / 2; w > 0; w /= 2)  // halves added pairwise: a fixed order
      for (int l = 0; l < w; ++l) b[l] += b[l + w];
    gb[o] += b[0];
  }
}

}  // namespace fastlenet::cpu
