// The float32 products of linear_relu on CPUs with AVX-512 (linear_relu_cpu.cpp chooses):
// c[i][j] = sum_p a(i, p) * b[p][j], a read through two strides (row and depth), so the one
// kernel serves the forward (x . w^T, with w^T packed), grad_input (g . w) and grad_weight
// (g^T . x) without copying the activations. Math: fastlenet/reference.py (linear_relu); this
// file computes only the products, saves nothing and reads no mask.
//
// Why by hand: the BLAS that ATen's x86 wheels use (MKL) runs its AVX2 code on this AMD CPU,
// ~90-100 GFLOP/s per core, where the core's two 64-byte FMA pipes allow ~220. (On Intel CPUs
// MKL runs its AVX-512 code and takes the backward's products: gemm_choice in
// linear_relu_cpu.cpp.) Each tile here is
// kGemmRows rows by kGemmVecs 64-byte vectors of columns, all accumulators in registers, one
// broadcast per row and one load per vector per depth step. The op's forward alone against
// F.linear (2 threads, 2-core Zen 5 VM, in-process medians): 64x400 . 400x120 18.9 us against
// 36.8 us, 64x120 . 120x84 6.9 us against 11.4 us, 256x784 . 784x512 510 us against 1024 us.
#pragma once

#if defined(__AVX512F__)
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "cpu_parallel.h"
#include "cpu_vec.h"

namespace fastlenet::cpu {

constexpr int kGemmLanes = 16;  // floats per 64-byte vector
// 8 rows x 2 vectors: 16 accumulators (each FMA pipe needs 4 chains in flight to hide the
// latency of 4 cycles), 2 loads and 8 broadcasts per 16 FMAs, within 32 registers.
constexpr int kGemmRows = 8;
constexpr int kGemmVecs = 2;  // gemm_f32 handles a column tail of one vector or two
constexpr int64_t kGemmCols = kGemmLanes * kGemmVecs;
// Depth up to which the backward's products take the hand kernel (batches or output counts
// beyond 4096 were not measured; they go to the BLAS). The forward takes any depth, in panels
// (gemm_nt_panels in linear_relu_cpu.cpp).
constexpr int64_t kGemmMaxDepth = 4096;
// Multiply-adds per parallel task: an OpenMP region costs ~1 us, this much work ~0.5 us.
constexpr int64_t kGemmGrain = int64_t{1} << 16;

// One tile: R rows of c, NV vectors of columns, the last vector's lanes masked by `last`;
// with `accumulate` the chains go on from the values in c (a later depth block: the same FMAs in
// the same order as one pass over the whole depth, so the same bits). The accumulators are zeroed
// one by one and stored by value: with `= {}` (a memset) or an address taken (cpu::store's
// reference) GCC 12 kept the array in registers but also stored it to the stack on every depth
// step, which made the tile 2-3x slower.
template <int R, int NV>
inline void gemm_tile(int64_t depth, const float* a, int64_t a_row, int64_t a_depth, const float* b,
                      int64_t ldb, float* c, int64_t ldc, __mmask16 last, bool accumulate) {
  using V = VecOf<float, 64>::type;
  V acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 2
    for (int v = 0; v + 1 < NV; ++v)
      acc[r][v] = accumulate ? V(_mm512_loadu_ps(c + r * ldc + v * kGemmLanes)) : V{};
    acc[r][NV - 1] =
        accumulate ? V(_mm512_maskz_loadu_ps(last, c + r * ldc + (NV - 1) * kGemmLanes)) : V{};
  }
  for (int64_t p = 0; p < depth; ++p) {
    const float* bp = b + p * ldb;
    V bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v + 1 < NV; ++v) bv[v] = load<V>(bp + v * kGemmLanes);
    bv[NV - 1] = V(_mm512_maskz_loadu_ps(last, bp + (NV - 1) * kGemmLanes));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const V av = V(_mm512_set1_ps(a[r * a_row + p * a_depth]));
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* cr = c + r * ldc;
#pragma GCC unroll 2
    for (int v = 0; v + 1 < NV; ++v) _mm512_storeu_ps(cr + v * kGemmLanes, __m512(acc[r][v]));
    _mm512_mask_storeu_ps(cr + (NV - 1) * kGemmLanes, last, __m512(acc[r][NV - 1]));
  }
}

template <int NV>
inline void gemm_rows(int rows, int64_t depth, const float* a, int64_t a_row, int64_t a_depth,
                      const float* b, int64_t ldb, float* c, int64_t ldc, __mmask16 last,
                      bool accumulate) {
  switch (rows) {
#define FASTLENET_GEMM_ROWS(R)                                                    \
  case R:                                                                         \
    gemm_tile<R, NV>(depth, a, a_row, a_depth, b, ldb, c, ldc, last, accumulate); \
    break;
    FASTLENET_GEMM_ROWS(1)
    FASTLENET_GEMM_ROWS(2)
    FASTLENET_GEMM_ROWS(3)
    FASTLENET_GEMM_ROWS(4)
    FASTLENET_GEMM_ROWS(5)
    FASTLENET_GEMM_ROWS(6)
    FASTLENET_GEMM_ROWS(7)
    FASTLENET_GEMM_ROWS(8)
#undef FASTLENET_GEMM_ROWS
    default:
      break;
  }
}

// Bytes of b up to which gemm_f32 goes row block by row block (each block re-reads all of b,
// from L2 when it fits: 1 MiB per core here, half of it left for a and c).
constexpr int64_t kGemmRowOrderBytes = 512 << 10;
// Row stride of b (floats: a 4 KiB page) from which gemm_f32's column-block order copies each
// panel of b before its row blocks read it (and only where there are two row blocks or more).
// Backward alone (both products), 2 threads, Zen 5 VM, 4 alternating processes, us: 64 x 12544
// -> 512 5498-6327 -> 4636-4874; 64 x 9216 -> 128 797-885 -> 783-888; 64 x 784 -> 512 (a 3 KiB
// stride) packed: 236-239 -> 247-253, hence the bound.
constexpr int64_t kGemmPackMinStride = 1024;

// The tile of c at row i, column j; bj is b's column j (b itself, or a packed panel of it).
inline void gemm_block(int64_t m, int64_t n, int64_t depth, const float* a, int64_t a_row,
                       int64_t a_depth, const float* bj, int64_t ldb, float* c, int64_t ldc,
                       int64_t i, int64_t j, bool accumulate) {
  const int rows = static_cast<int>(std::min<int64_t>(kGemmRows, m - i));
  const int64_t cols = std::min<int64_t>(kGemmCols, n - j);
  const int64_t tail = cols > kGemmLanes ? cols - kGemmLanes : cols;
  const auto last = static_cast<__mmask16>((1u << tail) - 1);
  const float* at = a + i * a_row;
  if (cols > kGemmLanes)
    gemm_rows<kGemmVecs>(rows, depth, at, a_row, a_depth, bj, ldb, c + i * ldc + j, ldc, last,
                         accumulate);
  else
    gemm_rows<1>(rows, depth, at, a_row, a_depth, bj, ldb, c + i * ldc + j, ldc, last, accumulate);
}

// c (m x n, row stride ldc) = a . b on the calling thread: a(i, p) at a[i * a_row + p * a_depth],
// b (depth x n) with row stride ldb. Each element is one chain of FMAs in depth order
// (deterministic). Tile order: row block by row block while b fits kGemmRowOrderBytes (a
// tile's rows of a stay in L1 across the column blocks; column-block order measured 2.7x
// slower at 64x400 . 400x120), else column block by column block (each panel of b read once:
// grad_weight of 12544 inputs at batch 64, whose b is 3.2 MB, took 1.7x stock's time row
// block by row block). With `accumulate`, c += a . b, each chain going on from c's value (see
// gemm_tile).
inline void gemm_f32(int64_t m, int64_t n, int64_t depth, const float* a, int64_t a_row,
                     int64_t a_depth, const float* b, int64_t ldb, float* c, int64_t ldc,
                     bool accumulate = false) {
  if (depth * n * static_cast<int64_t>(sizeof(float)) <= kGemmRowOrderBytes) {
    for (int64_t i = 0; i < m; i += kGemmRows)
      for (int64_t j = 0; j < n; j += kGemmCols)
        gemm_block(m, n, depth, a, a_row, a_depth, b + j, ldb, c, ldc, i, j, accumulate);
  } else if (m > kGemmRows && ldb >= kGemmPackMinStride) {
    // Each column block's panel of b copied together first (kGemmCols-float rows): the row
    // blocks then read one contiguous 128-byte row per depth step instead of a line of
    // another page at every step.
    thread_local AlignedVector<float> panel;
    if (panel.size() < static_cast<size_t>(depth * kGemmCols)) panel.resize(depth * kGemmCols);
    for (int64_t j = 0; j < n; j += kGemmCols) {
      const int64_t cols = std::min<int64_t>(kGemmCols, n - j);
      for (int64_t p = 0; p < depth; ++p)
        copy_row(panel.data() + p * kGemmCols, b + p * ldb + j, cols);
      for (int64_t i = 0; i < m; i += kGemmRows)
        gemm_block(m, n, depth, a, a_row, a_depth, panel.data(), kGemmCols, c, ldc, i, j,
                   accumulate);
    }
  } else {
    for (int64_t j = 0; j < n; j += kGemmCols)
      for (int64_t i = 0; i < m; i += kGemmRows)
        gemm_block(m, n, depth, a, a_row, a_depth, b + j, ldb, c, ldc, i, j, accumulate);
  }
}

// Columns of c per thread task, in vectors: each thread computes (and, in the forward, packs
// the operand for) its own column range, so no packed buffer is shared between threads.
// Splitting by vectors keeps two threads even at 84 or 120 columns; the forward splits the rows
// where the vectors divide unevenly among the threads (hand_gemm_nt in linear_relu_cpu.cpp).
// `columns(j0, j1)` computes columns [j0, j1).
template <typename F>
inline void gemm_columns(int64_t n, int64_t m, int64_t depth, const F& columns) {
  const int64_t vectors = (n + kGemmLanes - 1) / kGemmLanes;
  const int64_t per_vector = std::max<int64_t>(1, m * depth * kGemmLanes);
  cpu::parallel_for(
      0, vectors, std::max<int64_t>(1, kGemmGrain / per_vector),
      [&](int64_t v0, int64_t v1) { columns(v0 * kGemmLanes, std::min(n, v1 * kGemmLanes)); });
}

// dst (cols x rows, row stride ldd >= rows) = src (rows x cols, row stride lds) transposed, by
// transpose_blocks (16 x 16 blocks in registers, masked at the edges).
inline void transpose_f32(const float* src, int64_t rows, int64_t cols, int64_t lds, float* dst,
                          int64_t ldd) {
  transpose_blocks(
      rows, cols,
      [&](int64_t r, int64_t c0, __mmask16 m) {
        return _mm512_maskz_loadu_ps(m, src + r * lds + c0);
      },
      [&](int64_t c, int64_t r0, __mmask16 m, Float16 v) {
        _mm512_mask_storeu_ps(dst + c * ldd + r0, m, v);
      });
}

}  // namespace fastlenet::cpu
#endif
