// linear -> ReLU on the CPU (also plain linear, `relu` = false).
// Math and saved state: fastlenet/reference.py (linear_relu).
// Computes: out (B, O) from input (B, I), weight (O, I), bias (O); grad_input, grad_weight and
// grad_bias in one call.
// Saves for backward (the autograd Function does): input, weight and out, the ReLU mask.
//
// The float32 products go to the hand AVX-512 kernel (linear_relu_cpu_gemm.h) where it suits
// (hand_gemm_suits, kPackMinRows; where the BLAS runs AVX-512 code the backward's never and the
// forward's only where hand_forward_beats_mkl, hand_allowed), forwards of 8-12 outputs, of fewer
// than kPackMinRows rows, or of a few rows by a large weight to dot products (dot_suits; where the
// BLAS runs AVX-512 code only where dot_beats_mkl), the rest to the BLAS that ATen uses
// (sgemm_/dgemm_ directly; at::mm where it cannot take the sizes); what is fused is everything
// around them: bias and ReLU in one pass over the product, and the mask, the masked gradient and
// grad_bias in one pass (each task owns a column range: deterministic grad_bias). With two threads
// the backward's two products run side by side, one thread each, unless an output is large
// (side_by_side).
#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif

#include "checks.h"
#include "cpu_parallel.h"
#include "cpu_reuse.h"
#include "cpu_vec.h"
#include "linear_relu_cpu_gemm.h"

#if AT_BUILD_WITH_BLAS()
// The BLAS behind ATen's own products (MKL in the x86 wheels), declared as ATen declares it
// (aten/src/ATen/native/CPUBlas.cpp: the LP64 Fortran interface).
extern "C" {
void sgemm_(char* transa, char* transb, int* m, int* n, int* k, float* alpha, const float* a,
            int* lda, const float* b, int* ldb, float* beta, float* c, int* ldc);
void dgemm_(char* transa, char* transb, int* m, int* n, int* k, double* alpha, const double* a,
            int* lda, const double* b, int* ldb, double* beta, double* c, int* ldc);
}
#endif
#if AT_MKL_ENABLED()
// MKL's per-thread limit on its threads (0: its global setting); returns the one it replaces.
extern "C" int MKL_Set_Num_Threads_Local(int nt);  // mkl_set_num_threads_local in mkl_service.h
#endif

namespace fastlenet {
namespace {

// Inside an op that runs serially (cpu::SerialBelow) MKL still opened a parallel region of its
// own for a small product: its sgemv, which it takes for one row, woke the other thread for
// LeNet-5's fc1 backward at batch 1 on every step. There MKL is now held to the calling thread
// for the call (that op alone, 2 threads, best of 7 x 3000 calls, alternating processes:
// 10.4-11.2 -> 9.5-9.8 us).
class SerialBlas {
 public:
  SerialBlas() {
#if AT_MKL_ENABLED()
    if (held_) saved_ = MKL_Set_Num_Threads_Local(1);
#endif
  }
  ~SerialBlas() {
#if AT_MKL_ENABLED()
    if (held_) MKL_Set_Num_Threads_Local(saved_);
#endif
  }
  SerialBlas(const SerialBlas&) = delete;
  SerialBlas& operator=(const SerialBlas&) = delete;

 private:
  const bool held_ = cpu::num_threads() == 1 && at::get_num_threads() > 1;
  int saved_ = 0;
};

// Column-major c (m x n, leading dimension m) = op(a) . op(b), op given by `ta`/`tb` ('N' or
// 'T'): the same BLAS call at::mm makes (bit-identical results), without its ~0.6 us of
// dispatch, checks and views around it. The op against its at::mm version at batch 64,
// alternating medians in one process, 2-core Zen 4 VM: forward 120->84 13.29 -> 12.69 us,
// 400->120 42.30 -> 41.20 us; backward 120->84 23.83 -> 22.05 us. False, computing nothing,
// where the BLAS cannot take the sizes (empty, or beyond its int) or there is none: the caller
// uses at::mm.
template <typename T>
bool blas_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda,
               const T* b, int64_t ldb, T* c) {
#if AT_BUILD_WITH_BLAS()
  const int64_t largest = std::max({m, n, k, lda, ldb});
  if (std::min({m, n, k}) < 1 || largest > INT_MAX) return false;
  const SerialBlas serial;
  int m_ = static_cast<int>(m), n_ = static_cast<int>(n), k_ = static_cast<int>(k);
  int lda_ = static_cast<int>(lda), ldb_ = static_cast<int>(ldb), ldc_ = m_;
  T one = 1, zero = 0;
  if constexpr (std::is_same_v<T, float>) {
    sgemm_(&ta, &tb, &m_, &n_, &k_, &one, a, &lda_, b, &ldb_, &zero, c, &ldc_);
    return true;
  } else if constexpr (std::is_same_v<T, double>) {
    dgemm_(&ta, &tb, &m_, &n_, &k_, &one, a, &lda_, b, &ldb_, &zero, c, &ldc_);
    return true;
  }
#endif
  return false;
}

// Which kernel takes the backward's products where the hand kernel suits. The hand kernel was
// written on a CPU where the BLAS (MKL) runs its AVX2 code (an AMD EPYC: linear_relu_cpu_gemm.h).
// MKL runs its AVX-512 code on Intel CPUs only, and there it beats the hand kernel on the
// backward's products. Both products side by side, 2 threads, an Intel Xeon VM with AVX-512,
// 2026-12-04, in-process medians, hand -> BLAS, shapes batch x in x out: 64x400x120 71 -> 65 us,
// 256x400x120 203 -> 171 us, 256x120x84 87 -> 73 us, 256x784x512 1775 -> 1346 us,
// 256x9216x128 6.50 -> 4.03 ms, 256x12544x512 37.1 -> 22.9 ms; the hand kernel ahead only with
// 10 outputs (1.05-1.09x). The forward keeps the hand kernel there only where
// hand_forward_beats_mkl says, its dot products only where dot_beats_mkl. FASTLENET_CPU_GEMM=hand
// or =blas forces one kernel for both passes (hand: the dot products where dot_suits, else the
// hand GEMM; blas: the BLAS everywhere); each op call reads it once, on the calling thread, so
// that the tests run both kernels on any CPU.
enum class GemmChoice { kAuto, kHand, kBlas };

GemmChoice gemm_choice() {
  const char* v = std::getenv("FASTLENET_CPU_GEMM");
  if (v == nullptr) return GemmChoice::kAuto;
  const std::string_view s(v);
  if (s == "hand") return GemmChoice::kHand;
  if (s == "blas") return GemmChoice::kBlas;
  TORCH_CHECK(s.empty() || s == "auto", "FASTLENET_CPU_GEMM must be auto, hand or blas, got '", s,
              "'");
  return GemmChoice::kAuto;
}

// True where ATen's BLAS is MKL on an Intel CPU (cpuid's vendor string), which runs its AVX-512
// code.
bool blas_runs_avx512() {
  static const bool v = [] {
#if defined(__x86_64__) && defined(__GNUC__)
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!at::hasMKL() || __get_cpuid(0, &a, &b, &c, &d) == 0) return false;
    char vendor[13] = {};
    std::memcpy(vendor, &b, 4);
    std::memcpy(vendor + 4, &d, 4);
    std::memcpy(vendor + 8, &c, 4);
    return std::string_view(vendor) == "GenuineIntel";
#else
    return false;
#endif
  }();
  return v;
}

// Where MKL runs its AVX-512 code, the forward's product by the hand kernel only from
// kHandMinRows rows and up to kHandMaxWeights weights: with fewer rows its packing of w (which
// MKL's small-matrix code does without) costs more than the product, and a larger w packed
// outgrows the cache the kernel blocks for. Forward alone (the op, bias + ReLU), us, hand /
// BLAS, stock F.linear + relu in parentheses, 2 threads, Intel Xeon VM, 2026-12-04 18:10Z
// (/tmp script, best of 5): 400->120 4 rows 16.7 / 6.5 (11.1), 16 rows 23.8 / 14.9 (23.6),
// 64 rows 43.3 / 38.9 (53.1); 120->84 16 rows 8.6 / 9.7 (11.9), 64 rows 13.5 / 21.7 (23.0)
// (the rows' bound between: both ahead of stock at 16-32 rows, the hand kernel not always);
// 256->256 64 rows 46.4 / 52.5 (65.5); 784->128 64 rows 65.8 / 80.5 (84.8); 784->512 16 rows
// 137 / 107 (118), 256 rows 943 / 853 (862).
constexpr int64_t kHandMinRows = 32;
constexpr int64_t kHandMaxWeights = int64_t{1} << 17;

bool hand_forward_beats_mkl(int64_t rows, int64_t cols, int64_t k) {
  return rows >= kHandMinRows && cols * k <= kHandMaxWeights;
}

// Whether a product may take the hand kernel (the GEMM or the dot products): forced by
// FASTLENET_CPU_GEMM (`choice`, read once per op call), or unforced where the BLAS runs no
// AVX-512 code or the hand kernel beats it (`beats_mkl`; the backward: never).
bool hand_allowed(GemmChoice choice, bool beats_mkl) {
  return choice == GemmChoice::kHand ||
         (choice == GemmChoice::kAuto && (!blas_runs_avx512() || beats_mkl));
}

// Products that the hand kernel (linear_relu_cpu_gemm.h) computes: float32 in a build with
// AVX-512, no empty side, depth up to kGemmMaxDepth unless `any_depth` (the forward, which
// packs w^T panel by panel: gemm_nt_panels). Elsewhere the BLAS does.
template <typename T>
bool hand_gemm_suits(int64_t m, int64_t n, int64_t depth, bool any_depth = false) {
#if defined(__AVX512F__)
  return std::is_same_v<T, float> && (any_depth || depth <= cpu::kGemmMaxDepth) &&
         std::min({m, n, depth}) >= 1;
#else
  return false;
#endif
}

// c (m x n, row-major) = a . b where hand_gemm_suits, else false (nothing computed): a(i, p) at
// a[i * a_row + p * a_depth], b (depth x n) row-major. Over the threads by column ranges
// (inline inside a parallel region: the backward's side-by-side products).
template <typename T>
bool hand_gemm(int64_t m, int64_t n, int64_t depth, const T* a, int64_t a_row, int64_t a_depth,
               const T* b, T* c) {
  if (!hand_gemm_suits<T>(m, n, depth)) return false;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>)
    cpu::gemm_columns(n, m, depth, [&](int64_t j0, int64_t j1) {
      cpu::gemm_f32(m, j1 - j0, depth, a, a_row, a_depth, b + j0, n, c + j0, n);
    });
#endif
  return true;
}

// Rows from which the forward packs w for the hand kernel; fewer take the dot-product path
// (dot_suits), which needs no packing. Forward alone against F.linear, 400 -> 120 (2 threads):
// 1 row 0.41x, 4 rows 1.59x, 8 rows 1.49x, 32 rows 1.73x.
constexpr int64_t kPackMinRows = 4;
// The packing of w counted as this many rows of multiply-adds when deciding whether the hand
// kernel's op runs serially (SerialBelow): with 4 or 5 rows, 400 -> 120 packed 48k weights on
// one thread (forward alone, 2 threads, us, stock F.linear + relu in parentheses): 4 rows
// 15.5 -> 7.1 (11.1), 5 rows 15.7 -> 8.6 (11.7).
constexpr int64_t kPackCostRows = 2;

// Column vectors up to which the forward's threads split the rows instead of the columns where
// the vectors do not divide evenly among them. Split by columns, 10 or 16 outputs (one vector)
// ran on one thread and 40 (three) two to one. Forward alone (the op, bias + ReLU), 2 threads,
// Intel Xeon VM, in one process alternately, us, columns -> rows (stock F.linear + relu in
// parentheses): 784->16 batch 64 17.8 -> 13.4 (21.0), 128 31.8 -> 20.5 (33.6), 256 56.9 -> 32.9
// (54.2), 1024 252 -> 128 (123); 256->16 batch 256 20.7 -> 13.7 (17.0); 400->16 batch 512 54.7 ->
// 33.4 (37.2); 128->10 batch 1024 41.6 -> 29.4 (33.7); 400->40 batch 256 50.0 -> 43.9 (49.5);
// 784->48 batch 256 93.0 -> 79.9 (89.0); 256->40 batch 1024 121 -> 100 (99.0); 784->80 batch 256
// 151 -> 131 (140), batch 64 43.9 -> 43.5 (49.0). With the rows split each thread packs all of
// w^T (a copy per thread: one packed by the calling thread and read by the other took 784->16
// at batch 64 from 18.3 to 26.4 us).
constexpr int64_t kRowSplitMaxVectors = 5;

// Depth (w's columns) packed and multiplied at a time: a panel of w^T of at most
// kGemmRowOrderBytes, so that gemm_f32 goes row block by row block over it while it stays in L2,
// at least kPanelMinDepth deep (each further panel reloads the tiles of c). A packed w^T of
// 9216 x 128 (pytorch/examples' fc1) or 12544 x 512 whole is 4.7 or 26 MB, packed and read
// again from memory at every call (forward alone, 2 threads, Zen 5 VM, against stock F.linear +
// relu: 256 x 12544 -> 512 1.33x whole, 16 rows 0.87x).
constexpr int64_t kPanelMinDepth = 256;

#if defined(__AVX512F__)
// Rows [p0, p1) of w^T (w's columns) by its columns [j0, j1) (w's rows) packed into the calling
// thread's buffer, kept between calls (no allocation per call): p1 - p0 rows of `ld` floats,
// whole vectors from a cache line on, so that no load of it straddles two lines.
inline const float* packed_wt(const float* w, int64_t k, int64_t p0, int64_t p1, int64_t j0,
                              int64_t j1, int64_t ld) {
  thread_local cpu::AlignedVector<float> packed;
  if (packed.size() < static_cast<size_t>(ld * (p1 - p0))) packed.resize(ld * (p1 - p0));
  cpu::transpose_f32(w + j0 * k + p0, j1 - j0, p1 - p0, k, packed.data(), ld);
  return packed.data();
}

// out's columns [j0, j1) (rows x cols, row-major) = x (rows x k) . (w's rows [j0, j1))^T on the
// calling thread, one panel of depth at a time (kPanelMinDepth): each element one chain of FMAs
// in depth order, as in one pass.
inline void gemm_nt_panels(int64_t rows, int64_t cols, int64_t k, const float* x, const float* w,
                           int64_t j0, int64_t j1, float* out) {
  const int64_t ld = (j1 - j0 + cpu::kGemmLanes - 1) / cpu::kGemmLanes * cpu::kGemmLanes;
  const int64_t panel = std::max<int64_t>(
      kPanelMinDepth, cpu::kGemmRowOrderBytes / (ld * static_cast<int64_t>(sizeof(float))));
  for (int64_t p0 = 0; p0 < k; p0 += panel) {
    const int64_t p1 = std::min(k, p0 + panel);
    const float* wt = packed_wt(w, k, p0, p1, j0, j1, ld);
    cpu::gemm_f32(rows, j1 - j0, p1 - p0, x + p0, k, 1, wt, ld, out + j0, cols, p0 > 0);
  }
}
#endif

// out (rows x cols) = x (rows x k) . w^T, w (cols x k), by the hand kernel where it suits
// (float32, AVX-512, no empty side; any depth), else false. Each thread packs the part of w^T
// it multiplies by (gemm_nt_panels): its own column range, or all of it where the threads split
// the rows (kRowSplitMaxVectors).
template <typename T>
bool hand_gemm_nt(int64_t rows, int64_t cols, int64_t k, const T* x, const T* w, T* out) {
  if (rows < kPackMinRows || !hand_gemm_suits<T>(rows, cols, k, /*any_depth=*/true)) return false;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    const int64_t vectors = (cols + cpu::kGemmLanes - 1) / cpu::kGemmLanes;
    if (vectors % cpu::num_threads() != 0 && vectors <= kRowSplitMaxVectors &&
        rows > cpu::kGemmRows) {
      const int64_t blocks = (rows + cpu::kGemmRows - 1) / cpu::kGemmRows;
      const int64_t grain = cpu::kGemmGrain / (cpu::kGemmRows * cols * k);
      cpu::parallel_for(0, blocks, std::max<int64_t>(1, grain), [&](int64_t b0, int64_t b1) {
        const int64_t r0 = b0 * cpu::kGemmRows, r1 = std::min(rows, b1 * cpu::kGemmRows);
        gemm_nt_panels(r1 - r0, cols, k, x + r0 * k, w, 0, cols, out + r0 * cols);
      });
    } else {
      cpu::gemm_columns(cols, rows, k, [&](int64_t j0, int64_t j1) {
        gemm_nt_panels(rows, cols, k, x, w, j0, j1, out);
      });
    }
  }
#endif
  return true;
}

// Elements per parallel task of the elementwise passes: below this a parallel region costs
// more than the pass (LeNet-5's layers at batch 64 run serially).
constexpr int64_t kElementGrain = 1 << 15;
// With this many threads the backward's two products (the same number of multiply-adds) run
// side by side, one thread each: the BLAS splits one small product over two threads poorly
// (measured faster this way for each of LeNet-5's three fc layers, most at small batches). With
// more threads each product keeps all of them, one after the other (side by side would leave
// most of them idle).
constexpr int kSideBySideThreads = 2;
// Except where one product writes a large output and the other a small one (a few rows of a
// wide layer: grad_weight is the whole weight, grad_input a few rows): its thread would then
// take every page fault of a freshly allocated gradient alone, while the BLAS or the hand
// kernel, one product after the other, splits those over the threads. Outputs of at least
// kSideBySideMaxBytes, kSideBySideMaxRatio times the other's size. Forward + backward against
// F.linear + relu, stock / fastlenet, us, 2 threads, Xeon VM, with every allocation fresh
// (MALLOC_MMAP_THRESHOLD_=65536; in a long process glibc does that at times): 4 x 12544 -> 512
// 8865 / 12135 (0.73x), 8 rows 9992 / 13179 (0.76x), 4 x 9216 -> 128 2032 / 2496 (0.81x).
constexpr int64_t kSideBySideMaxBytes = int64_t{1} << 22;
constexpr int64_t kSideBySideMaxRatio = 4;
// And where an output reaches kSideBySideMaxBytes, only from kSideBySideMinRows rows: below,
// grad_weight's product is shallow (its depth is the rows) and its thread, alone on it, ends
// well after the other's. Forward + backward against F.linear + relu, 2 threads, Xeon VM, one
// process alternately, side by side / one after the other (stock's time over ours): 64 x 9216
// -> 128 (pytorch/examples' fc1) 0.58-0.85x / 0.92-1.12x in four runs, 128 x 9216 -> 128
// 0.99x / 1.02x, 128 x 12544 -> 128 0.95x / 0.98x; from 256 rows side by side stays ahead:
// 256 x 9216 -> 128 1.07-1.11x / 1.00-1.05x, 256 x 12544 -> 512 1.09x / 1.01x.
constexpr int64_t kSideBySideMinRows = 256;

bool side_by_side(int64_t rows, int64_t grad_input_bytes, int64_t grad_weight_bytes) {
  const int64_t big = std::max(grad_input_bytes, grad_weight_bytes);
  const int64_t small = std::min(grad_input_bytes, grad_weight_bytes);
  return cpu::num_threads() == kSideBySideThreads &&
         (big < kSideBySideMaxBytes ||
          (rows >= kSideBySideMinRows && big < kSideBySideMaxRatio * small));
}

// Forward with few outputs (classifier heads: 10 classes): out = x . w^T as dot products along
// in_features, a block of kDotRows rows by kDotCols outputs at a time, each an accumulator
// vector. MKL's sgemm spends ~4 us on 64x84 . 84x10 (LeNet-5 fc3, 27 GFLOP/s; ~200 us at
// 64x12544 . 12544x10): with so few columns it packs more than it multiplies. Dot products need
// no packing; each block ends with one horizontal sum per accumulator.
// Output counts that take the dot-product path. Forward alone against F.linear (timeit medians,
// 2-core Zen 4 VM, batch 64 / 256): 84 inputs to 8, 10, 12 outputs 1.09-1.53x; 128->10
// 1.38x / 1.61x; 784->10 2.2x / 2.5x; 12544->10 2.3x / 2.5x. Outside it MKL wins: 16 outputs
// (its register tile) 0.80x / 0.68x at 84 inputs, 4 outputs 0.88x at 84 inputs, batch 256.
constexpr int64_t kDotMinOutputs = 8;
constexpr int64_t kDotMaxOutputs = 12;
// Weights (outputs x inputs) from which up to two blocks of kDotRows rows take the dot products
// too: the packing then costs more than it saves, and w is read from memory once per block instead.
// Forward alone (2 threads, us, packed/BLAS -> dot, stock in parentheses): 784 -> 512 4 rows
// 64.3 -> 22.8 (68.2), 8 rows 72.4 -> 44.4 (75.2); 12544 -> 128 4 rows 243 -> 84 (247), 8
// rows 279 -> 163 (275); 9216 -> 128 8 rows 219 -> 121 (221). Below it packing wins: 784 -> 128
// 4 rows 9.2 packed, 12.2 dot (18.4).
constexpr int64_t kDotMinWeights = int64_t{1} << 17;
// 4 rows x 5 outputs: 20 accumulators, 4 + 1 vectors loaded per 5 rows of FMAs; AVX2's 16
// registers hold 2 x 5 and their loads. Narrow vectors: Zen 4 runs two 32-byte FMAs per cycle, as
// many lanes as one 64-byte FMA, and a 32-byte accumulator takes one fewer step to sum.
constexpr int kDotRows = cpu::kVecRegs >= 32 ? 4 : 2;
constexpr int kDotCols = 5;
// Inputs of fewer than kPackMinRows rows take it at any output count: dot products with w's
// rows in place beat the BLAS's matrix-vector products (forward alone from Python, 2 threads,
// us, BLAS -> dot, stock F.linear + relu in parentheses): 1 row 400->120 6.2 -> 4.9 (8.0),
// 120->84 3.9 -> 3.5 (5.7), 784->512 31.6 -> 23.9 (33.9), 9216->128 76 -> 67 (80); 3 rows
// (one block, w read once) 784->512 float32 29.8 (67.1), float64 58.2 (89.6).
inline bool dot_suits(int64_t rows, int64_t cols, int64_t k) {
  return rows > 0 && ((cols >= kDotMinOutputs && cols <= kDotMaxOutputs) || rows < kPackMinRows ||
                      (rows <= 2 * kDotRows && cols * k >= kDotMinWeights));
}
// Where MKL runs its AVX-512 code, the dot products beat the GEMM path (the hand GEMM where
// hand_forward_beats_mkl, from kHandMinRows rows; MKL below) only with one row, with 8-12
// outputs from at least kDotMinDepthMkl inputs, or with a weight of at least kDotMinWeightsMkl
// values (dot_suits' other cases): the GEMM path is ahead with short rows of few outputs (the
// hand GEMM at 64 and 256 rows, MKL below 32), and with a few rows by a weight below ~1M values
// (MKL). Forward alone (the op, bias + ReLU), 2 threads, Intel Xeon VM, in one process
// alternately, us, dot / GEMM path (stock F.linear + relu): 1 row 400->120 4.0 / 4.9
// (6.5), 784->512 12.1 / 14.0 (15.6); 84->10 64 rows 5.3 / 4.2 (6.2), 256 rows 9.7 / 8.7
// (10.6); 120->12 64 rows 6.1 / 5.0 (6.6); 256->10 64 rows 6.2 / 7.7 (9.9); 784->10 64 rows
// 8.9 / 21.1 (23.9); 2 rows 784->512 14.9 / 11.4 (13.2), 400->120 5.0 / 4.8 (6.6), 120->84 3.3 /
// 3.4 (5.1); 8 rows 784->512 36.6 / 29.8 (32.9), 1568->256 37.2 / 31.6 (34.7), 4096->128 45.5 /
// 46.6 (51.9), 2048->512 101 / 131 (141), 9216->128 112 / 183 (190), 12544->128 174 / 335 (344).
constexpr int64_t kDotMinDepthMkl = 256;
constexpr int64_t kDotMinWeightsMkl = int64_t{1} << 20;
inline bool dot_beats_mkl(int64_t rows, int64_t cols, int64_t k) {
  return rows == 1 || (cols >= kDotMinOutputs && cols <= kDotMaxOutputs && k >= kDotMinDepthMkl) ||
         cols * k >= kDotMinWeightsMkl;
}
// Multiply-adds per parallel task of the dot-product path: an OpenMP region costs ~1 us; this
// much work takes ~4 us on one core (so LeNet-5 fc3 at batch 64, 54k, runs serially).
constexpr int64_t kDotGrain = int64_t{1} << 17;
// Row blocks up to which the dot-product tasks also split the outputs: with more, splitting them
// made each thread read all of x (64 x 12544 -> 10: 87-91 -> 94-99 us).
constexpr int64_t kDotSpanMaxBlocks = 2;

template <typename V>
inline auto hsum(V v) {
  constexpr int n = sizeof(V) / sizeof(v[0]);
  if constexpr (n == 1) {
    return v[0];
  } else {
    using T = std::remove_cvref_t<decltype(v[0])>;
    using H = typename cpu::VecOf<T, sizeof(V) / 2>::type;
    H lo, hi;
    std::memcpy(&lo, &v, sizeof(H));
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(H), sizeof(H));
    return hsum(lo + hi);
  }
}

// out[i][p] (i < R rows, p < P outputs) = x[i] . w[p] (+ bias[p], ReLU); rows `k` long.
template <typename T, int R, int P>
inline void dot_block(const T* x, const T* w, int64_t k, T* out, int64_t ldo, const T* bias,
                      bool relu) {
  using V = typename cpu::VecOf<T, cpu::kNarrowBytes>::type;
  constexpr int VW = cpu::VecOf<T, cpu::kNarrowBytes>::kLanes;
  V acc[R][P] = {};
  int64_t j = 0;
  for (; j + VW <= k; j += VW) {
    V xv[R];
    for (int i = 0; i < R; ++i) xv[i] = cpu::load<V>(x + i * k + j);
    for (int p = 0; p < P; ++p) {
      const V wv = cpu::load<V>(w + p * k + j);
      for (int i = 0; i < R; ++i) acc[i][p] += xv[i] * wv;
    }
  }
  if (j < k && k >= VW) {
    // The tail as the row's last vector with its lanes before `j` (already summed) zeroed in
    // both operands (0 * 0 = 0 even where the other holds an Inf): one FMA per accumulator
    // instead of k - j scalar ones (LeNet-5 fc3: 84 = 10 x 8 + 4).
    const int64_t t0 = k - VW;
    V lane;
    for (int l = 0; l < VW; ++l) lane[l] = T(l);
    const auto keep = lane >= T(j - t0);
    V xv[R];
    for (int i = 0; i < R; ++i) xv[i] = keep ? cpu::load<V>(x + i * k + t0) : V{};
    for (int p = 0; p < P; ++p) {
      const V wv = keep ? cpu::load<V>(w + p * k + t0) : V{};
      for (int i = 0; i < R; ++i) acc[i][p] += xv[i] * wv;
    }
    j = k;
  }
  for (int i = 0; i < R; ++i)
    for (int p = 0; p < P; ++p) {
      T s = hsum(acc[i][p]);
      for (int64_t t = j; t < k; ++t) s += x[i * k + t] * w[p * k + t];
      if (bias) s += bias[p];
      // `s <= 0` is false for NaN, so NaN propagates as in torch.relu.
      out[i * ldo + p] = relu && s <= T(0) ? T(0) : s;
    }
}

// Outputs [c0, c1) of R rows of x (all `cols` outputs a row apart in out).
template <typename T, int R>
inline void dot_rows(const T* x, const T* w, int64_t k, int64_t c0, int64_t c1, int64_t cols,
                     T* out, const T* bias, bool relu) {
  int64_t c = c0;
  for (; c + kDotCols <= c1; c += kDotCols)
    dot_block<T, R, kDotCols>(x, w + c * k, k, out + c, cols, bias ? bias + c : nullptr, relu);
  const T* wc = w + c * k;
  T* oc = out + c;
  const T* bc = bias ? bias + c : nullptr;
  switch (c1 - c) {
    case 4:
      dot_block<T, R, 4>(x, wc, k, oc, cols, bc, relu);
      break;
    case 3:
      dot_block<T, R, 3>(x, wc, k, oc, cols, bc, relu);
      break;
    case 2:
      dot_block<T, R, 2>(x, wc, k, oc, cols, bc, relu);
      break;
    case 1:
      dot_block<T, R, 1>(x, wc, k, oc, cols, bc, relu);
      break;
    default:
      break;
  }
}

// The threads of ATen's elementwise kernels each take one equal share of a tensor's elements,
// in order (at::parallel_for's chunks), from its grain of 32768 elements on
// (at::internal::GRAIN_SIZE). The optimizer's step runs on those kernels (torch.optim's default
// implementation; the fused one splits every parameter so): thread t updates the t-th share of
// each parameter and reads the t-th share of its gradient. A layer whose op runs on one thread
// (a few rows) then reads, every step, the shares of w that the other core wrote, and writes the
// grad_w shares that the other core reads next: each of their lines moves between the cores'
// caches. There the op splits w's rows (outputs) by those shares instead: thread t reads the rows
// of w and writes the rows of grad_w that thread t's step updates. LeNet-5's training step, 2
// threads, one process alternately, one thread -> shares (fc1 takes them; fc2's 10080 weights
// stay on one thread): fused SGD batch 1 1.16x (333 -> 287 us; 1.20x in the run before), batch
// 2 1.00-1.02x; default SGD batch 1 1.07x, batch 2 1.02x. The same split on one thread, the
// shares one after the other: 1.01x (what pays is where the lines are, not the loops). Where the
// op already runs on both threads it keeps its path: its backward by shares at batch 3 and 4,
// against MKL's products on both threads, measured 0.96-0.98x with the default SGD.
constexpr int64_t kOwnerMinWeights = int64_t{1} << 15;

// The shares of w's `cols` rows of k weights: `parts` of them (1: no split), part t from row
// row(t) on, the row where its first element (t * share) falls, rounded to the nearest.
struct OwnerSplit {
  int64_t parts = 1, share = 0, k = 1, cols = 0;
  int64_t row(int64_t t) const { return std::min(cols, (t * share + k / 2) / k); }
};

// The shares of a w of cols x k weights, for an op of `rows` rows that would otherwise run on
// one thread (`alone`). No rows: nothing to split (the usual paths write an empty batch's zero
// gradients).
inline OwnerSplit owner_split(int64_t rows, int64_t cols, int64_t k, bool alone) {
  const int64_t n = cols * k;
  if (rows < 1 || !alone || n < kOwnerMinWeights || at::in_parallel_region()) return {};
  const int64_t parts =
      std::min<int64_t>(at::get_num_threads(), (n + kOwnerMinWeights - 1) / kOwnerMinWeights);
  return {parts, (n + parts - 1) / parts, k, cols};
}

// Tasks are (block of kDotRows rows, span of outputs): a few rows still split over the threads
// by outputs (forward alone, 2 threads, us, one task per block -> spans, stock in parentheses:
// 3 rows 784 -> 512 29.3 -> 19.2 (65.9), 12544 -> 128 116 -> 63 (266)). The tasks depend on
// the sizes alone: the same sums on any number of threads.
template <typename T>
void linear_dot(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                at::Tensor& out, bool relu) {
  const int64_t rows = input.size(0), k = input.size(1), cols = weight.size(0);
  const T* x = input.const_data_ptr<T>();
  const T* w = weight.const_data_ptr<T>();
  const T* b = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
  T* o = out.data_ptr<T>();
  const int64_t blocks = (rows + kDotRows - 1) / kDotRows;
  // Outputs per task: all of them with more than kDotSpanMaxBlocks blocks (the blocks split the
  // work; each thread reads its rows of x once and all of w from cache), else whole blocks of
  // kDotCols with about kDotGrain multiply-adds.
  const int64_t per_col = std::min<int64_t>(rows, kDotRows) * std::max<int64_t>(k, 1);
  const int64_t span =
      blocks > kDotSpanMaxBlocks
          ? std::max<int64_t>(cols, 1)
          : std::clamp<int64_t>((kDotGrain / per_col + kDotCols - 1) / kDotCols * kDotCols,
                                kDotCols, std::max<int64_t>(cols, 1));
  // Outputs [c0, c1) of the block from row r.
  const auto task = [&](int64_t r, int64_t c0, int64_t c1) {
    const T* xr = x + r * k;
    T* orow = o + r * cols;
    // A last block of fewer rows in one pass over w (w is read once per block).
    const int64_t left = rows - r;
    if (left >= kDotRows)
      dot_rows<T, kDotRows>(xr, w, k, c0, c1, cols, orow, b, relu);
    else if (left == 3)
      dot_rows<T, 3>(xr, w, k, c0, c1, cols, orow, b, relu);
    else if (left == 2)
      dot_rows<T, 2>(xr, w, k, c0, c1, cols, orow, b, relu);
    else
      dot_rows<T, 1>(xr, w, k, c0, c1, cols, orow, b, relu);
  };
  const int64_t spans = (cols + span - 1) / span;
  const int64_t macs = per_col * span;  // multiply-adds of a full task
  const int64_t grain = std::max<int64_t>(1, kDotGrain / std::max<int64_t>(macs, 1));
  // Work for one thread: each thread its share of w's rows instead (owner_split).
  const OwnerSplit owner = owner_split(rows, cols, k, blocks * spans <= grain);
  if (owner.parts > 1) {
    at::parallel_for(0, owner.parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) task(0, owner.row(p), owner.row(p + 1));
    });
    return;
  }
  cpu::parallel_for(0, blocks * spans, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      // Consecutive tasks (one thread's) share outputs: their rows of w stay in cache.
      const int64_t c0 = t / blocks * span;
      task(t % blocks * kDotRows, c0, std::min(cols, c0 + span));
    }
  });
}

at::Tensor linear_relu_fwd_cpu(const at::Tensor& input_, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, bool relu) {
  check_linear(input_, weight);
  check_bias(bias, input_, weight.size(0));
  TORCH_CHECK(input_.device().is_cpu(), "input must be a CPU tensor, got ", input_.device());
  const at::Tensor input = input_.contiguous();
  // The dot-product path splits by its own grain (kDotGrain), not by SerialBelow's: its
  // multiply-adds are slower (LeNet-5 fc3 at batch 256, 215k: 10.5 us serially, 9.4 us on two
  // threads, stock 11.5-14.4 us; the 09:20Z bench read 0.91x stock's inference serially).
  const int64_t rows = input.size(0), cols = weight.size(0), k = input.size(1);
  const GemmChoice choice = gemm_choice();
  if (dot_suits(rows, cols, k) && hand_allowed(choice, dot_beats_mkl(rows, cols, k))) {
    const at::Tensor w = weight.contiguous();
    const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
    at::Tensor out = cpu::empty_reused({rows, cols}, input.options());
    maybe_poison(out);
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "linear_relu_fwd_cpu",
                               [&] { linear_dot<scalar_t>(input, w, b, out, relu); });
    return out;
  }
  const cpu::SerialBelow serial((rows + kPackCostRows) * cols * k);
  const at::Tensor w = weight.contiguous();
  at::Tensor out = cpu::empty_reused({rows, cols}, input.options());
  maybe_poison(out);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "linear_relu_fwd_cpu", [&] {
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const bool hand = hand_allowed(choice, hand_forward_beats_mkl(rows, cols, k)) &&
                      hand_gemm_nt<scalar_t>(rows, cols, k, x, wp, o);
    // out^T (cols x rows, column-major) = w^T' . input^T': w (cols x k) transposed, input as is.
    if (!hand && !blas_gemm<scalar_t>('T', 'N', cols, rows, k, wp, k, x, k, o))
      at::mm_out(out, input, w.t());
  });
  if (!relu && !bias.has_value()) return out;
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "linear_relu_fwd_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    const int64_t row_grain = std::max<int64_t>(1, kElementGrain / std::max<int64_t>(cols, 1));
    // One loop per case, each branch-free inside, so that each vectorises.
    cpu::parallel_for(0, rows, row_grain, [&](int64_t r0, int64_t r1) {
      const scalar_t* __restrict bias_row = bp;  // a local: see linear_relu_bwd_cpu
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* __restrict row = o + r * cols;
        if (bias_row && relu) {
          // `v <= 0` is false for NaN, so NaN propagates as in torch.relu.
          for (int64_t c = 0; c < cols; ++c) {
            const scalar_t v = row[c] + bias_row[c];
            row[c] = v <= scalar_t(0) ? scalar_t(0) : v;
          }
        } else if (bias_row) {
          for (int64_t c = 0; c < cols; ++c) row[c] += bias_row[c];
        } else {
          for (int64_t c = 0; c < cols; ++c) row[c] = row[c] <= scalar_t(0) ? scalar_t(0) : row[c];
        }
      }
    });
  });
  return out;
}

// The backward by the shares of owner_split: part p computes grad_w's and grad_b's rows of its
// share and its share's terms of grad_input (g's columns of the share times w's rows), summed
// after the parts in part order: the same bits for a given thread count (the parts follow the
// threads). grad_w = g^T . x and grad_input = g . w, the ReLU mask applied to g first
// (fastlenet/reference.py, linear_relu).
template <typename T>
void owner_backward(const OwnerSplit& owner, const T* go, const T* out, const T* x, const T* w,
                    int64_t rows, T* gi, T* gw, T* gb) {
  const int64_t k = owner.k, cols = owner.cols;
  cpu::AlignedVector<T> partial(owner.parts * rows * k, T(0));
  at::parallel_for(0, owner.parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      T* __restrict part = partial.data() + p * rows * k;
      for (int64_t c = owner.row(p); c < owner.row(p + 1); ++c) {
        T* __restrict gwr = gw + c * k;
        const T* __restrict wr = w + c * k;
        T sum = T(0);
        for (int64_t r = 0; r < rows; ++r) {
          // `v <= 0` is false for NaN: NaN passes, as the other paths let it.
          const T g = out != nullptr && out[r * cols + c] <= T(0) ? T(0) : go[r * cols + c];
          const T* __restrict xr = x + r * k;
          T* __restrict pr = part + r * k;
          sum += g;
          if (r == 0)
            for (int64_t i = 0; i < k; ++i) gwr[i] = g * xr[i];
          else
            for (int64_t i = 0; i < k; ++i) gwr[i] += g * xr[i];
          for (int64_t i = 0; i < k; ++i) pr[i] += g * wr[i];
        }
        gb[c] = sum;
      }
    }
  });
  std::copy(partial.begin(), partial.begin() + rows * k, gi);
  for (int64_t p = 1; p < owner.parts; ++p) {
    const T* __restrict part = partial.data() + p * rows * k;
    for (int64_t i = 0; i < rows * k; ++i) gi[i] += part[i];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_relu_bwd_cpu(const at::Tensor& grad_out_,
                                                                   const at::Tensor& out_,
                                                                   const at::Tensor& input_,
                                                                   const at::Tensor& weight,
                                                                   bool relu) {
  check_linear(input_, weight);
  const int64_t rows = input_.size(0), cols = weight.size(0);
  check_linear_grad(grad_out_, out_, input_, weight, relu);
  const int64_t in_f = weight.size(1), macs = 2 * rows * cols * in_f;
  const at::Tensor grad_out = grad_out_.contiguous();
  const at::Tensor out = relu ? out_.contiguous() : at::Tensor();
  const at::Tensor input = input_.contiguous();
  const at::Tensor w = weight.contiguous();
  at::Tensor grad_input = cpu::empty_reused({rows, in_f}, grad_out.options());
  at::Tensor grad_weight = cpu::empty_reused({cols, in_f}, grad_out.options());
  at::Tensor grad_bias = at::empty({cols}, grad_out.options());
  maybe_poison(grad_input);
  maybe_poison(grad_weight);
  maybe_poison(grad_bias);
  const OwnerSplit owner = owner_split(rows, cols, in_f, macs < cpu::kParallelMinMacs);
  if (owner.parts > 1) {
    AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "linear_relu_bwd_cpu", [&] {
      owner_backward<scalar_t>(owner, grad_out.const_data_ptr<scalar_t>(),
                               relu ? out.const_data_ptr<scalar_t>() : nullptr,
                               input.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), rows,
                               grad_input.data_ptr<scalar_t>(), grad_weight.data_ptr<scalar_t>(),
                               grad_bias.data_ptr<scalar_t>());
    });
    return {grad_input, grad_weight, grad_bias};
  }
  const cpu::SerialBelow serial(macs);
  at::Tensor g = relu ? cpu::empty_reused(grad_out.sizes(), grad_out.options()) : grad_out;
  if (relu) maybe_poison(g);
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "linear_relu_bwd_cpu", [&] {
    const scalar_t* go = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* op = relu ? out.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* gb = grad_bias.data_ptr<scalar_t>();
    // Each task owns a column range and sums its rows in order: deterministic grad_bias.
    const int64_t col_grain = std::max<int64_t>(16, kElementGrain / std::max<int64_t>(rows, 1));
    cpu::parallel_for(0, cols, col_grain, [&](int64_t c0, int64_t c1) {
      // Local restrict pointers: through the lambda's references the compiler would reload
      // them after every store and not vectorise.
      scalar_t* __restrict sum = gb + c0;
      const int64_t width = c1 - c0;
      for (int64_t c = 0; c < width; ++c) sum[c] = scalar_t(0);
      for (int64_t r = 0; r < rows; ++r) {
        const scalar_t* __restrict gor = go + r * cols + c0;
        if (op) {  // branch-free inside, so that it vectorises
          const scalar_t* __restrict outr = op + r * cols + c0;
          scalar_t* __restrict gr = gp + r * cols + c0;
          for (int64_t c = 0; c < width; ++c) {
            const scalar_t v = outr[c] <= scalar_t(0) ? scalar_t(0) : gor[c];
            gr[c] = v;
            sum[c] += v;
          }
        } else {
          for (int64_t c = 0; c < width; ++c) sum[c] += gor[c];
        }
      }
    });
  });
  const bool hand_ok = hand_allowed(gemm_choice(), false);
  const auto products = [&](int64_t first, int64_t last) {
    // out= variants refuse inputs that require grad while grad mode is on (it is thread-local:
    // set here, on the thread that runs the product).
    const at::NoGradGuard no_grad;
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "linear_relu_bwd_cpu", [&] {
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      for (int64_t i = first; i < last; ++i) {
        // Column-major, as blas_gemm: grad_input^T (in_f x rows) = w^T . g^T, grad_weight^T
        // (in_f x cols) = input^T . g.
        // Row-major for hand_gemm: grad_input = g . w, grad_weight = g^T . input.
        const scalar_t* wp = w.const_data_ptr<scalar_t>();
        const scalar_t* x = input.const_data_ptr<scalar_t>();
        scalar_t* gi = grad_input.data_ptr<scalar_t>();
        scalar_t* gw = grad_weight.data_ptr<scalar_t>();
        if (i == 0) {
          if (!(hand_ok && hand_gemm<scalar_t>(rows, in_f, cols, gp, cols, 1, wp, gi)) &&
              !blas_gemm<scalar_t>('N', 'N', in_f, rows, cols, wp, in_f, gp, cols, gi))
            at::mm_out(grad_input, g, w);
        } else if (!(hand_ok && hand_gemm<scalar_t>(cols, in_f, rows, gp, 1, cols, x, gw)) &&
                   !blas_gemm<scalar_t>('N', 'T', in_f, cols, rows, x, in_f, gp, cols, gw)) {
          at::mm_out(grad_weight, g.t(), input);
        }
      }
    });
  };
  if (side_by_side(rows, grad_input.nbytes(), grad_weight.nbytes()))
    cpu::parallel_for(0, 2, 1, products);  // one product per thread: the BLAS runs serially
  else
    products(0, 2);
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlenet, CPU, m) {
  m.impl("linear_relu_fwd", &linear_relu_fwd_cpu);
  m.impl("linear_relu_bwd", &linear_relu_bwd_cpu);
}

}  // namespace fastlenet
