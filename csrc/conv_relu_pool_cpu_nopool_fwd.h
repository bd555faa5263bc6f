// Forward of conv2d -> ReLU without pooling (pool_size 1) on the CPU, for the layers where
// oneDNN's convolution runs far from the FMA peak (flat_suits): channel counts off oneDNN's
// blocks of 16 (few input channels among them), shallow patches, planes of 30x30 and more.
// Math and saved state: fastlenet/reference.py (conv_relu_pool).
// Computes: out (N, O, OH, OW) = ReLU(conv(x, w) + b), and the ReLU codes (argmax: 0, or kNoGrad
// where ReLU passes no gradient) unless inference. Stride 1, any kernel size and padding.
// Accumulates in the data's own type (float32 or float64): each output is b, then every tap
// (c, kh, kw) in that order, whatever the threads.
// Saves nothing itself: the caller's op returns the codes, which the backward reads.
//
// Lanes over flattened conv positions: one sample's input is copied into a zero-padded buffer
// of rows of wp = W + 2 * padw, and output (y, x) is computed at position y * wp + x, so tap
// (c, kh, kw) of VW consecutive positions is one contiguous load at offset c * hp * wp + kh * wp
// + kw. The K - 1 positions past each conv row's end are computed and dropped. A register block
// holds OB output channels by XB vectors of positions; per tap it loads XB input vectors and
// broadcasts OB weights (repacked [O/OB][C*KH*KW][OB], zero past O). A block's outputs go to
// a per-thread stage, from which ReLU and the codes (relu_codes_rows) write the conv rows out.
// The loop (flat_conv) also computes the input gradient without pooling, as a transposed conv
// (conv_relu_pool_cpu_nopool_gi.h), and the conv of pooled layers with few output channels over
// large planes (conv_relu_pool_cpu_flat_pool.h).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "checks.h"
#include "conv_relu_pool_cpu_pool.h"
#include "cpu_parallel.h"
#include "cpu_vec.h"

namespace fastlenet::cpu {

// Register block: OB * XB accumulators, XB input vectors and one broadcast weight within the
// vector registers (AVX-512: 14 x 2, 12 x 2, 10 x 2, 8 x 3, 7 x 3, 6 x 4, 5 x 5 or 4 x 6
// accumulators, 23-31 registers).
template <int OB>
constexpr int flat_vectors() {
  return std::max(1, std::min(6, (kVecRegs - 2) / (OB + 1)));
}

// The next sample's input, prefetched into L2 a line per tap while this sample's blocks run,
// where the caller names the input its pad copies (the forwards): the copy then reads L2 instead
// of memory. Forward alone, batch 64, 2 threads, Xeon VM, alternating in one process, with the
// prefetch against without: 32 -> 32 3x3 pad 1 32x32 1.02x, 1 -> 32 3x3 28x28 1.05x, 6 -> 16
// 5x5 pad 2 16x16 1.02x, 13 -> 29 3x3 11x11 1.03x, 6 -> 16 3x3 30x30 1.01x, 3 -> 16 3x3 pad 1
// 32x32 0.99x; pooled (flat_pool_forward) 128 -> 6 3x3 pad 1 32x32 1.05x (batch 256 1.11x),
// 64 -> 6 3x3 pad 1 16x16 1.04x (batch 256).
struct Ahead {
  const char* at = nullptr;
  const char* end = nullptr;
};

// NB vectors of positions (src: offsets into xp, dst: into each stage plane) of one sample's
// padded input xp into stage ([OB][pitch]) for one block of output channels: wk its packed
// weights ([taps][OB]), off the taps' offsets into xp.
template <typename T, int OB, int NB>
void flat_block(const T* xp, const T* wk, const T* bias, const int64_t* off, int64_t taps,
                const int64_t* src, const int64_t* dst, T* stage, int64_t pitch, Ahead& ahead) {
  using V = typename VecOf<T, kVecBytes>::type;
  const char* pf = ahead.at;
  const char* const pf_end = ahead.end;
  V acc[OB][NB];
  for (int j = 0; j < OB; ++j)
    for (int i = 0; i < NB; ++i) acc[j][i] = V{} + bias[j];
  for (int64_t t = 0; t < taps; ++t) {
    if (pf < pf_end) {
      __builtin_prefetch(pf, 0, 2);
      pf += 64;
    }
    const T* xr = xp + off[t];
    V xv[NB];
    for (int i = 0; i < NB; ++i) xv[i] = load<V>(xr + src[i]);
    for (int j = 0; j < OB; ++j) {
      const V wv = broadcast<V>(wk + t * OB + j);
      for (int i = 0; i < NB; ++i) acc[j][i] += wv * xv[i];
    }
  }
  for (int j = 0; j < OB; ++j)
    for (int i = 0; i < NB; ++i) store(stage + j * pitch + dst[i], acc[j][i]);
  ahead.at = pf;
}

// One register block of nb vectors (1 <= nb <= NB): flat_block's instance of that width.
template <typename T, int OB, int NB>
void flat_block_of(int64_t nb, const T* xp, const T* wk, const T* bias, const int64_t* off,
                   int64_t taps, const int64_t* src, const int64_t* dst, T* stage, int64_t pitch,
                   Ahead& ahead) {
  if constexpr (NB > 1)
    if (nb < NB)
      return flat_block_of<T, OB, NB - 1>(nb, xp, wk, bias, off, taps, src, dst, stage, pitch,
                                          ahead);
  flat_block<T, OB, NB>(xp, wk, bias, off, taps, src, dst, stage, pitch, ahead);
}

// The vectors src/dst[0 .. nv) in the fewest register blocks of at most XB vectors, their
// widths differing by one at most: a narrow last block runs far below the FMA peak (at one
// vector, a load and OB broadcasts for OB FMAs). 16 vectors of 5 x 5 accumulators as 4, 4, 4, 4
// rather than 5, 5, 5, 1 (the same sums, bit for bit): 64 -> 10 3x3 pad 1 16x16 pool 2,
// inference, 2 threads, Xeon VM, alternating in one process, us, batch 64 / 256: 736-792 ->
// 723-756 / 2986-3056 -> 2898-2978.
template <typename T, int OB>
void flat_blocks(const T* xp, const T* wk, const T* bias, const int64_t* off, int64_t taps,
                 const int64_t* src, const int64_t* dst, int64_t nv, T* stage, int64_t pitch,
                 Ahead& ahead) {
  constexpr int XB = flat_vectors<OB>();
  const int64_t blocks = (nv + XB - 1) / XB, narrow = nv / blocks, wide = nv % blocks;
  for (int64_t b = 0, v = 0; b < blocks; ++b) {
    const int64_t nb = narrow + (b < wide);
    flat_block_of<T, OB, XB>(nb, xp, wk, bias, off, taps, src + v, dst + v, stage, pitch, ahead);
    v += nb;
  }
}

// ReLU and codes of one conv plane from its stage rows (`pitch` apart) into out and am (rows of
// ow; am null: inference) by whole vectors: each row's last vector runs past the row's end into
// the next row, which is written after it, so that only the plane's last row takes
// relu_codes_span's masked tail (the next plane may be another task's). Where a row's vectors
// span more than two rows' worth of values (ow < VW / 2 and the like) row by row as before.
// The same values and codes (bit for bit). The op's forward (with codes), 2 threads, Zen 5 VM,
// processes alternating with the row-by-row version, us, batch 64 / 256: 1 -> 32 3x3 28x28
// ~200 -> 162-174 / 812-828 -> 585-616, 1 -> 16 3x3 pad 1 14x14 39-43 -> 27-32 / 151-153 ->
// 100-104, 3 -> 6 5x5 32x32 134-148 -> 128-135 / 540-544 -> 503-506. Its own copy of
// relu_codes_span's vector loop: a relu_codes_span call per row for the whole vectors measured
// slower (batch 64, three process pairs: 1 -> 32 152-161 -> 159-171 us, 1 -> 16 28-33 -> 33-34).
template <typename T>
void relu_codes_rows(const T* st, int64_t pitch, int64_t oh, int64_t ow, T* out, uint8_t* am) {
  using Vec = VecOf<T, kVecBytes>;
  using V = typename Vec::type;
  using M = typename Vec::mask;
  using MI = typename Vec::mask_int;
  constexpr int VW = Vec::kLanes;
  const int64_t span = (ow + VW - 1) / VW * VW;
  int64_t r = 0;
  if (span <= 2 * ow)  // a row's spill stays inside the next row
    for (; r + 1 < oh; ++r)
      for (int64_t xb = 0; xb < ow; xb += VW) {
        const V v = load<V>(st + r * pitch + xb);
        const M dead = v <= V{};  // false for NaN, which ReLU passes as stock's does
        store(out + r * ow + xb, dead ? V{} : v);
        if (am) store(am + r * ow + xb, low_bytes(dead & static_cast<MI>(kNoGrad)));
      }
  for (; r < oh; ++r) relu_codes_span(st + r * pitch, ow, out + r * ow, am ? am + r * ow : nullptr);
}

// The flat conv (stride 1) of geometry g: w its weight ([O][C * KH * KW]), bias O values or
// null (zeros); pad(n, xp) writes sample n's C planes into the zero-padded buffer xp (rows of W +
// 2 * padw, rows padh .. padh + H - 1; the rest stays zero); write(n, o, st, pitch) takes
// output plane (n, o) from its stage rows (`pitch` apart, OW values each); x, unless null, the
// (N, C, H, W) input pad copies from (Ahead). flat_forward's conv -> ReLU, flat_pool_forward's
// conv (conv_relu_pool_cpu_flat_pool.h) and flat_grad_input's transposed conv
// (conv_relu_pool_cpu_nopool_gi.h).
template <typename T, int OB, typename Pad, typename Write>
void flat_conv_ob(const ConvPoolGeometry& g, const T* w, const T* bias, Pad pad, Write write,
                  const T* x) {
  constexpr int VW = VecOf<T, kVecBytes>::kLanes;
  const int64_t hp = g.h + 2 * g.padh, wp = g.w + 2 * g.padw, plane = hp * wp;
  const int64_t taps = g.c * g.kh * g.kw;
  // Vectors of positions: consecutive over the flattened rows (K - 1 dropped per row), or per
  // conv row (rounded up to whole vectors), whichever are fewer.
  const int64_t npos = (g.oh - 1) * wp + g.ow;  // through the last conv row's last output
  const int64_t owv = (g.ow + VW - 1) / VW;
  const bool flat = (npos + VW - 1) / VW <= g.oh * owv;
  const int64_t pitch = flat ? wp : owv * VW;  // a stage row
  std::vector<int64_t> src, dst;
  if (flat)
    for (int64_t f = 0; f < npos; f += VW) src.push_back(f), dst.push_back(f);
  else
    for (int64_t r = 0; r < g.oh; ++r)
      for (int64_t xb = 0; xb < g.ow; xb += VW)
        src.push_back(r * wp + xb), dst.push_back(r * pitch + xb);
  const int64_t nv = static_cast<int64_t>(src.size());
  const int64_t splane = std::max(dst.back() + VW, g.oh * pitch);
  // Reads end before off[taps - 1] + src.back() + VW <= c * plane + VW.
  const int64_t xsize = g.c * plane + VW;
  const int64_t blocks = (g.o + OB - 1) / OB;

  std::vector<int64_t> off(taps);
  for (int64_t c = 0; c < g.c; ++c)
    for (int64_t kh = 0; kh < g.kh; ++kh)
      for (int64_t kw = 0; kw < g.kw; ++kw)
        off[(c * g.kh + kh) * g.kw + kw] = c * plane + kh * wp + kw;
  AlignedVector<T> wk(blocks * taps * OB, T(0)), bk(blocks * OB, T(0));
  for (int64_t o = 0; o < g.o; ++o) {
    for (int64_t t = 0; t < taps; ++t) wk[((o / OB) * taps + t) * OB + o % OB] = w[o * taps + t];
    if (bias != nullptr) bk[o] = bias[o];
  }
  const int64_t inplane = g.c * g.h * g.w;
  // Tasks of (sample, block): a thread's tasks are consecutive, so it pads each sample once.
  cpu::parallel_for(0, g.n * blocks, 1, [&](int64_t begin, int64_t end) {
    AlignedVector<T> xp(xsize, T(0)), stage(OB * splane);
    int64_t padded = -1;
    Ahead ahead;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, b = task % blocks;
      if (n != padded) {
        pad(n, xp.data());
        padded = n;
        ahead = Ahead{};
        if (x != nullptr && n + 1 <= (end - 1) / blocks) {  // the thread's next sample
          ahead.at = reinterpret_cast<const char*>(x + (n + 1) * inplane);
          ahead.end = ahead.at + inplane * int64_t{sizeof(T)};
        }
      }
      flat_blocks<T, OB>(xp.data(), wk.data() + b * taps * OB, bk.data() + b * OB, off.data(), taps,
                         src.data(), dst.data(), nv, stage.data(), splane, ahead);
      for (int j = 0; j < OB && b * OB + j < g.o; ++j)
        write(n, b * OB + j, stage.data() + j * splane, pitch);
    }
  });
}

// flat_conv_ob with the block of output channels (kFlatBlocks) that pads the fewest; of equal
// ones the widest (it reads the input fewer times). Blocks of 5 and 7 against the 6 and 8 of
// before (forward alone under no_grad, batch 64, 2 threads, Xeon VM, one process, us, before ->
// after): 10 outputs 64 -> 10 3x3 pad 1 16x16 pool 2 744-859 -> 738-781, 128 -> 10 pad 1 32x32
// pool 2 5945-6151 -> 5240-5283, 6 -> 10 3x3 30x30 292 -> 256-257; 5: 64 -> 5 pad 1 16x16 pool
// 2 426-432 -> 402-404; 7: 32 -> 7 pad 1 24x24 pool 2 647-672 -> 607-632; 9: 16 -> 9 pad 1 28x28
// 658-689 -> 570-588; 14: 64 -> 14 pad 1 16x16 pool 2 992-1019 -> 928-964, 8 -> 14 pad 1
// 28x28 459-474 -> 428-433; 20: 5 -> 20 3x3 30x30 505-510 -> 464-467; 21: 12 -> 21 pad 1
// 24x24 680-688 -> 618-620; 28: 16 -> 28 pad 1 16x16 452-465 -> 419-433; 15 a tie of 5 and 8
// (48 -> 15 pad 1 16x16 pool 2 803-832 / 809-814, 64 -> 15 pad 1 16x16 969-976 / 952-956).
// Large samples consider kFlatWideBlocks (below) first.
constexpr int kFlatBlocks[] = {8, 7, 6, 5};

// Blocks of 14, 12 and 10 outputs (14 x 2, 12 x 2 and 10 x 2 accumulators: per tap two input
// vectors and 14, 12 or 10 broadcasts for 28, 24 or 20 FMAs, where a block of 7 x 3, 6 x 4 or 5 x 5
// loads three to five vectors and broadcasts 7, 6 or 5) where one sample's zero-padded input has at
// least kFlatWideSampleBytes: each block of outputs reads all of it, which then no longer stays in
// L1 from one block to the next, and one block of 10, 12 or 14 outputs reads it once where blocks
// of 5, 6 or 7 read it twice. Considered before kFlatBlocks (of equal padding the widest) for at
// most 14 outputs, one block for the layer: wider layers in several (20 and 24 outputs, below)
// gained 0-7%, and flat_grad_input's transposed conv (32 outputs and more) was not measured with
// them. A block of 16 x 1 (one input vector and 16 broadcasts for 16 FMAs) lost: 64 -> 16 pad 1
// 16x16 pool 2 1194-1280 -> 1483-1624, 32 -> 16 pad 1 24x24 pool 2 1489-1513 -> 1645-1676, 64 -> 15
// 1267-1393 -> 1554-1576. AVX-512 only (32 vector registers; with 16 a block of 10 would hold one
// vector of positions). Forward alone, 2 threads, Xeon VM, one process alternately, us, blocks of
// kFlatBlocks -> wide, batch 64 (/ 256): 10 outputs: 64 -> 10 3x3 pad 1 16x16 pool 2 762-769 ->
// 716-744 (2986-3174 -> 2820-2957), 128 -> 10 pad 1 32x32 pool 2 6218-6344 -> 5879-6000, 32 -> 10
// pad 1 24x24 pool 2 854-870 -> 842-845, 16 -> 10 pad 1 28x28 673-694 -> 633-651 (2505-2572 ->
// 2452-2528); 9 (one block of 10 for two of 5): 64 -> 9 pad 1 16x16 pool 2 709 -> 672-701
// (2862-2918 -> 2612-2757); 11 and 12 (12 for 6 and 6): 64 -> 11 pad 1 16x16 pool 2 880-900 ->
// 831-857, 64 -> 12 813-829 -> 776-794 (3335-3381 -> 3206-3443), 32 -> 12 pad 1 24x24 pool 2
// 982-1007 -> 926-967, 128 -> 12 pad 1 32x32 pool 2 6527-6739 -> 6562-6582; 13 and 14 (14 for 7 and
// 7): 48 -> 13 pad 1 16x16 pool 2 801-956 -> 758-769 (3214-3433 -> 3066-3100), 64 -> 14 1141-1180
// -> 882-1141 (4474-4562 -> 4132-4566), 32 -> 14 pad 1 24x24 pool 2 1344-1391 -> 1316-1345, 128 ->
// 14 pad 1 32x32 pool 2 10125-10460 -> 9243-9625, 16 -> 14 pad 1 28x28 982-991 -> 928-981, 32 -> 14
// pad 1 16x16 503-605 -> 525-530; 20 and 24 (not taken): 32 -> 20 pad 1 16x16 678-716 -> 643-668,
// 64 -> 20 1307-1363 -> 1300-1318, 32 -> 24 pad 1 24x24 1853-1976 -> 1783-1967. Smaller samples
// lose or tie: 6 -> 12 3x3 32x32 (24 KB) 349-435 -> 427-451, 3 -> 10 pad 1 32x32 241-248 ->
// 256-262, 5 -> 20 3x3 32x32 593-622 -> 585-607, 16 -> 20 pad 1 16x16 (21 KB) 361-362 -> 348-365, 8
// -> 24 pad 1 28x28 (29 KB) 774-871 -> 776-829. The same sums in the same order: the same bits.
constexpr int kFlatWideBlocks[] = {14, 12, 10};
constexpr int64_t kFlatWideSampleBytes = 32 << 10;

inline bool flat_wide_suits(const ConvPoolGeometry& g, int64_t elem_bytes) {
  const int64_t sample = g.c * (g.h + 2 * g.padh) * (g.w + 2 * g.padw) * elem_bytes;
  return kVecRegs >= 32 && g.o <= kFlatWideBlocks[0] && sample >= kFlatWideSampleBytes;
}

template <typename T, typename Pad, typename Write>
void flat_conv(const ConvPoolGeometry& g, const T* w, const T* bias, Pad pad, Write write,
               const T* x = nullptr) {
  const auto padded = [&](int64_t ob) { return (g.o + ob - 1) / ob * ob - g.o; };
  int ob = 0;
  const auto consider = [&](int b) {
    if (ob == 0 || padded(b) < padded(ob)) ob = b;
  };
  if (flat_wide_suits(g, sizeof(T)))
    for (const int b : kFlatWideBlocks) consider(b);
  for (const int b : kFlatBlocks) consider(b);
  if (g.o <= 4) ob = 4;  // one block of 4 (4 x 6 accumulators)
  switch (ob) {
    case 14:
      return flat_conv_ob<T, 14>(g, w, bias, pad, write, x);
    case 12:
      return flat_conv_ob<T, 12>(g, w, bias, pad, write, x);
    case 10:
      return flat_conv_ob<T, 10>(g, w, bias, pad, write, x);
    case 4:
      return flat_conv_ob<T, 4>(g, w, bias, pad, write, x);
    case 5:
      return flat_conv_ob<T, 5>(g, w, bias, pad, write, x);
    case 6:
      return flat_conv_ob<T, 6>(g, w, bias, pad, write, x);
    case 7:
      return flat_conv_ob<T, 7>(g, w, bias, pad, write, x);
    default:
      return flat_conv_ob<T, 8>(g, w, bias, pad, write, x);
  }
}

// Layers that take flat_forward rather than ATen's convolution: stride 1, at most
// kFlatMaxChannels input channels and kFlatMaxTaps taps per channel, except where oneDNN's NCHW
// kernels run near the FMA peak: both channel counts multiples of its blocks of kDnnBlock, with
// at most kFlatMinPixels conv outputs per plane (flat_forward computes the K - 1 positions past
// each conv row and rounds the plane up to whole vectors: 64 of 80 at 8x8 with padding 1), or a
// patch of at least kDnnDeepPatch values over fewer than kFlatLargePlane outputs (from 30x30 on,
// oneDNN's rate on blocked counts falls to 320-440 GFLOP/s, the flat kernel's stays 416-490). The
// caller also requires a finite weight: a padded zero times Inf would be NaN where oneDNN, which
// skips the padding, has none. Measured (forward alone under no_grad, 2 threads, Zen 5 VM
// (AVX-512), after a freed 16 MB block (glibc then keeps freed buffers of that size), processes
// alternating with the previous rule (flat at most 5 input channels), us, batch 64 / 256): taken: 6
// -> 16 3x3 30x30 292-301 -> 242-246 / 1119-1569 -> 1012-1087, 8 -> 16 3x3 pad 1 28x28 349-353 ->
// 309-313 / 1366-1798 -> 1248-1431, 10 -> 20 3x3 pad 1 16x16 288-302 -> 165-170 / 1041-1132 ->
// 655-672, 13 -> 29 3x3 11x11 151-173 -> 123-125 / 497-538 -> 481-492, 16 -> 32 3x3 pad 1 16x16
// 394-403 -> 336-347 / 1550-1822 -> 1380-1437, 16 -> 16 3x3 pad 1 24x24 461-465
// -> 430-437 / 2035-2401 -> 1839-1950, 24 -> 40 5x5 20x20 2921-2955 -> 1624-1696 / 12239-12821
// -> 7042-7143, 37 -> 77 5x5 12x12 1953-1962 -> 1808-1857 / 8280-8461 -> 7513-7676, 72 -> 72 3x3
// pad 1 8x8 1090-1221 -> 1013-1039 / 4504-4813 -> 4138-4209, 100 -> 100 3x3 pad 1 8x8 2063-2124
// -> 2132-2185 / 8555-9054 -> 8747-8945 (a tie); left to oneDNN: 16 -> 32 5x5 pad 2 14x14
// 671-689 -> 749-778 (depth 400), 16 -> 32 3x3 pad 1 8x8 (64 outputs) 135-136 -> 122-125 /
// 408-427 -> 466-476, 32 -> 64 3x3 pad 1 12x12 800-809 -> 911-913, 64 -> 128 3x3 pad 1 8x8
// 1294-1306 -> 1575-1610, 128 -> 128 3x3 pad 1 8x8 2518-2521 -> 3049-3187, 128 -> 16 3x3 pad 1
// 8x8 376-377 -> 415-422 (32 -> 64 and 128 -> 128 at 16x16 and 48 -> 16 3x3 pad 1 16x16 would
// gain 3-13%; 24x24 and 28x28 planes were ties, 48 -> 48 3x3 pad 1 20x20 0.92-0.94x). Blocked
// counts over large planes, batch 64 (/ 256), oneDNN -> flat: 32 -> 32 3x3 pad 1 30x30
// 2839-2856 -> 2403-2408 (12250-13198 -> 9939-10215), 16 -> 32 5x5 pad 2 30x30 3344-3502 ->
// 3164-3223 (14745-15466 -> 13085-13205), 32 -> 48 3x3 pad 1 30x30 3926-3941 -> 3481-3665, 64
// -> 64 3x3 pad 1 30x30 9753-9963 -> 9258-9338, 32 -> 32 3x3 pad 1 32x32 3248-3249 ->
// 2475-2523, 64 -> 64 3x3 pad 1 32x32 11665-11885 -> 10045-10102, 32 -> 32 3x3 pad 1 40x40
// 4897-5200 -> 4108-4136. The flat kernel runs at 300-490 GFLOP/s at these shapes, oneDNN's at
// 190-350 with channel counts off its blocks and 420-480 on them over smaller planes.
constexpr int64_t kFlatMaxChannels = 128;  // issue 16's envelope: wider layers were not measured
constexpr int64_t kFlatMaxTaps = 25;    // 5x5 (1 -> 16 7x7 pad 3 28x28: 0.94-0.99x before 1f97f73)
constexpr int64_t kDnnBlock = 16;       // oneDNN's blocks of channels: its NCHW path pads to them
constexpr int64_t kDnnDeepPatch = 288;  // 32 channels of 3x3
constexpr int64_t kFlatMinPixels = 64;
constexpr int64_t kFlatLargePlane = 900;  // 30x30 conv outputs

// Both channel counts whole blocks of oneDNN's (flat_suits here, cl_backward_suits for the
// backward in conv_relu_pool_cpu.cpp).
inline bool on_dnn_blocks(const ConvPoolGeometry& g) {
  return g.c % kDnnBlock == 0 && g.o % kDnnBlock == 0;
}

inline bool flat_suits(const ConvPoolGeometry& g) {
  if (g.sh != 1 || g.sw != 1 || g.c > kFlatMaxChannels || g.kh * g.kw > kFlatMaxTaps) return false;
  const int64_t pixels = g.oh * g.ow;
  return !on_dnn_blocks(g) || pixels >= kFlatLargePlane ||
         (g.c * g.kh * g.kw < kDnnDeepPatch && pixels > kFlatMinPixels);
}

// flat_conv of the (N, C, H, W) input: each sample copied into the zero-padded buffer
// (copy_padded), the thread's next one prefetched (Ahead); write as flat_conv's. The forwards'
// conv: flat_forward below, flat_pool_forward (conv_relu_pool_cpu_flat_pool.h).
template <typename T, typename Write>
void flat_conv_input(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                     const ConvPoolGeometry& g, Write write) {
  const T* x = input.const_data_ptr<T>();
  const int64_t inplane = g.c * g.h * g.w, wp = g.w + 2 * g.padw;
  flat_conv<T>(
      g, weight.const_data_ptr<T>(), bias.defined() ? bias.const_data_ptr<T>() : nullptr,
      [&](int64_t n, T* xp) {
        copy_padded(x + n * inplane, g.c, g.h, g.w, g.padh, g.padw, wp, xp);
      },
      write, x);
}

// out, and the ReLU codes into *argmax unless null (inference).
template <typename T>
void flat_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                  const ConvPoolGeometry& g, at::Tensor& out, at::Tensor* argmax) {
  T* y = out.data_ptr<T>();
  uint8_t* am = argmax ? argmax->data_ptr<uint8_t>() : nullptr;
  const int64_t outplane = g.oh * g.ow;
  flat_conv_input<T>(input, weight, bias, g, [&](int64_t n, int64_t o, const T* st, int64_t pitch) {
    const int64_t at = (n * g.o + o) * outplane;
    relu_codes_rows(st, pitch, g.oh, g.ow, y + at, am ? am + at : nullptr);
  });
}

}  // namespace fastlenet::cpu
