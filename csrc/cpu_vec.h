// Portable SIMD for the CPU kernels: GCC/Clang vector extensions. With -march=native they
// compile to AVX-512 or AVX2 registers; a portable build (FASTLENET_PORTABLE=1) gets SSE2.
#pragma once

#include <algorithm>
#include <array>
#include <bit>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

namespace fastlenet::cpu {

// The compile target's widest float vector and how many vector registers it has: kernels size
// their vectors and register blocks from these, so a 64-byte vector never gets split in two
// (and its register block spilled) on a CPU without AVX-512.
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
constexpr int kVecRegs = 32;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
constexpr int kVecRegs = 16;
#else
constexpr int kVecBytes = 16;
constexpr int kVecRegs = 16;
#endif

// Narrow vectors: at most 32 bytes, for kernels whose rows are short or whose loads and stores
// would straddle cache lines with 64-byte vectors (AVX-512 CPUs issue two 32-byte FMAs per cycle
// but one 64-byte FMA).
constexpr int kNarrowBytes = kVecBytes < 32 ? kVecBytes : 32;

// A vector of `Bytes` bytes of T.
template <typename T, int Bytes>
struct VecOf {
  static constexpr int kLanes = Bytes / static_cast<int>(sizeof(T));
  typedef T type __attribute__((vector_size(Bytes)));
  using mask = decltype(type{} > type{});  // lane mask: integers of sizeof(T) bytes
  using mask_int = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
};

// N bytes as one vector.
template <int N>
struct ByteVec {
  typedef uint8_t type __attribute__((vector_size(N)));
};

// The low byte of each lane of an integer vector (argmax codes from a lane mask). AVX-512
// narrows in one instruction (vpmovdb); on AVX2 __builtin_convertvector extracts lane by lane,
// a byte shuffle does not (measured faster in LeNet-5 conv1's forward).
template <typename M, size_t... I>
inline typename ByteVec<sizeof...(I)>::type low_bytes(const M& m, std::index_sequence<I...>) {
  using Out = typename ByteVec<sizeof...(I)>::type;
#if defined(__AVX512F__)
  return __builtin_convertvector(m, Out);
#else
  using Bytes = typename ByteVec<sizeof(M)>::type;
  Bytes b;
  std::memcpy(&b, &m, sizeof(M));
  return Out(__builtin_shufflevector(b, b, (I * (sizeof(M) / sizeof...(I)))...));
#endif
}

template <typename M>
inline auto low_bytes(const M& m) {
  return low_bytes(m, std::make_index_sequence<sizeof(M) / sizeof(m[0])>{});
}

// v where keep, else +0, without a branch (compilers turn `keep ? v : 0` into a jump that an
// unpredictable keep mispredicts) and without a multiply (Inf * 0 would be NaN).
template <typename T>
inline T keep_or_zero(bool keep, T v) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  Bits b;
  std::memcpy(&b, &v, sizeof(T));
  b &= -static_cast<Bits>(keep);
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

// Bytes of a cache line (x86-64; the alignment of CacheLineAllocator and of per-thread partials).
constexpr int64_t kCacheLineBytes = 64;
// Elements of T in a cache line.
template <typename T>
constexpr int64_t kCacheLineElems = kCacheLineBytes / int64_t{sizeof(T)};

// Freed scratch buffers of this thread, kept for its next request of the same size class. A
// kernel's per-call buffers (weight repacks, padded copies, per-thread sums and lists) are the
// same sizes call after call; from glibc, the larger ones also made it consolidate its fast
// bins (perf at batch 1: malloc, free and malloc_consolidate ~8% of LeNet-5's conv2 backward).
// Op alone, batch 1, 2 threads, alternating processes, us: conv2 backward 10.2-10.8 -> 9.6-9.7,
// conv1's 6.3-6.6 -> 6.2, conv2 forward 6.2-6.5 -> 6.0-6.3 (batch 64: within noise). Sizes
// are rounded up to a power of two from 64 bytes; at most kPerClass blocks of a class and
// kMaxKeptBytes in all are kept, larger requests go to the heap each time; a thread's blocks are
// freed when it exits. Under AddressSanitizer every request goes to the heap, so that it sees
// each buffer's bounds and lifetime.
class ScratchCache {
 public:
  static constexpr int kMinShift = std::countr_zero(uint64_t{kCacheLineBytes});  // a line
  static constexpr int kClasses = 17;                                            // up to 4 MiB
  static constexpr int kPerClass = 4;  // blocks kept a class: an op's buffers span a few classes
  static constexpr size_t kMaxKeptBytes = size_t{16} << 20;
  static constexpr std::align_val_t kAlign{kCacheLineBytes};

  // The class of a request of `bytes`, or -1 where it bypasses the cache.
  static int size_class(size_t bytes) {
#if defined(__SANITIZE_ADDRESS__)
    (void)bytes;
    return -1;
#else
    const int shift = bytes <= (size_t{1} << kMinShift) ? kMinShift : std::bit_width(bytes - 1);
    return shift - kMinShift < kClasses ? shift - kMinShift : -1;
#endif
  }

  void* take(size_t bytes) {
    const int c = size_class(bytes);
    if (c < 0) return ::operator new(bytes, kAlign);
    if (count_[c] > 0) {
      kept_ -= block_bytes(c);
      return blocks_[c][--count_[c]];
    }
    return ::operator new(block_bytes(c), kAlign);
  }

  void give(void* p, size_t bytes) {
    const int c = size_class(bytes);
    if (c < 0) return ::operator delete(p, kAlign);
    if (alive_ && count_[c] < kPerClass && kept_ + block_bytes(c) <= kMaxKeptBytes) {
      blocks_[c][count_[c]++] = p;
      kept_ += block_bytes(c);
      return;
    }
    ::operator delete(p, kAlign);
  }

  ~ScratchCache() {
    alive_ = false;  // a buffer freed later on this thread (a static's) goes to the heap
    for (int c = 0; c < kClasses; ++c)
      while (count_[c] > 0) ::operator delete(blocks_[c][--count_[c]], kAlign);
  }

 private:
  static size_t block_bytes(int c) { return size_t{1} << (c + kMinShift); }
  void* blocks_[kClasses][kPerClass] = {};
  int count_[kClasses] = {};
  size_t kept_ = 0;
  bool alive_ = true;
};

inline ScratchCache& scratch_cache() {
  static thread_local ScratchCache cache;
  return cache;
}

// Scratch buffers on a cache-line boundary, from this thread's ScratchCache: malloc gives 16
// bytes, and where a kernel's vectors start on vector boundaries relative to the buffer
// (conv2's grad_x buffer with 8-channel pixels), whether they straddle cache lines would
// otherwise change with each allocation.
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(scratch_cache().take(n * sizeof(T))); }
  void deallocate(T* p, size_t n) { scratch_cache().give(p, n * sizeof(T)); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const {
    return true;
  }
};
template <typename T>
using AlignedVector = std::vector<T, CacheLineAllocator<T>>;

// What a thread's next task reads and writes, brought into L2 a slice per call of step() while
// the current task computes: up to three spans, each read or written. Without it a task's
// first loads (or stores) wait on memory where the data no longer stays in cache (batch 256),
// each stream restarting the hardware prefetcher after a phase of compute.
// The conv forwards (conv_relu_pool_cpu_fwd.h: a slice per conv row; the next task's sample's
// input where it starts a sample, its output and argmax planes): forward alone (inference), 2
// threads, one process alternately, Xeon VM, batch 256 / 64: 16 -> 32 3x3 pad 1 32x32 pool 3
// 1.22x / 1.01x, 16 -> 16 3x3 pad 1 24x24 1.03x / 1.01x, 24 -> 40 5x5 20x20 1.02x / 1.00x,
// 64 -> 64 3x3 pad 1 16x16 1.03x / 1.00x; 0.99-1.01x at LeNet-5's conv2, the Fashion CNN's,
// 10 -> 22 5x5 pool 3, 32 -> 64 3x3 16x16, 3 -> 7 5x5 pool 3 and 16 -> 32 3x3 32x32 pool 2.
// The weight gradient without pooling: see nopool_weight_chunk (conv_relu_pool_cpu_nopool.h).
class NextTaskPrefetch {
 public:
  // `bytes` from `p`, read (the input) or written (the outputs).
  struct Span {
    const void* p = nullptr;
    int64_t bytes = 0;
    bool write = false;
  };
  NextTaskPrefetch() = default;
  // Each span in `slices` slices of whole cache lines.
  NextTaskPrefetch(std::array<Span, 3> spans, int64_t slices) : spans_(spans) {
    for (size_t i = 0; i < spans_.size(); ++i)
      slice_[i] = (spans_[i].bytes / std::max<int64_t>(slices, 1) / kLine + 1) * kLine;
  }
  void step() {
    for (size_t i = 0; i < spans_.size(); ++i) {
      // Locals: through the members the loop stored its counter and reloaded the span's
      // fields at every line.
      const char* p = static_cast<const char*>(spans_[i].p);
      int64_t at = done_[i];
      const int64_t end = std::min(spans_[i].bytes, at + slice_[i]);
      if (spans_[i].write)
        for (; at < end; at += kLine) __builtin_prefetch(p + at, 1, 2);  // into L2
      else
        for (; at < end; at += kLine) __builtin_prefetch(p + at, 0, 2);
      done_[i] = at;
    }
  }

 private:
  static constexpr int64_t kLine = 64;
  std::array<Span, 3> spans_{};
  std::array<int64_t, 3> slice_{};
  std::array<int64_t, 3> done_{};
};

// Unaligned load and store (memcpy compiles to one vmovups).
template <typename V, typename T>
inline V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
inline void store(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// *p in every lane by one broadcast load on AVX-512 (float). For `V{} + *p` used more than once
// GCC loads the scalar and broadcasts it register to register, an extra shuffle per value.
template <typename V, typename T>
inline V broadcast(const T* p) {
#if defined(__AVX512F__)
  if constexpr (sizeof(V) == 64 && std::is_same_v<T, float>) return V(_mm512_set1_ps(*p));
#endif
  return V{} + *p;
}

// The values p[l] for lanes lo <= l < hi (0 <= lo <= hi <= lanes), zeros in the others, reading
// nothing outside [p + lo, p + hi): one masked load on AVX-512.
template <typename V, typename T>
inline V load_lanes(const T* p, int lo, int hi) {
#if defined(__AVX512F__)
  const unsigned keep = ((1u << hi) - 1) & ~((1u << lo) - 1);
  if constexpr (sizeof(V) == 64 && std::is_same_v<T, float>)
    return V(_mm512_maskz_loadu_ps(static_cast<__mmask16>(keep), p));
  else if constexpr (sizeof(V) == 64 && std::is_same_v<T, double>)
    return V(_mm512_maskz_loadu_pd(static_cast<__mmask8>(keep), p));
#endif
  V v{};
  for (int l = lo; l < hi; ++l) v[l] = p[l];
  return v;
}

// Stores lanes [0, n) of v to p[0 .. n), writing nothing past them (0 <= n <= lanes): one
// masked store on AVX-512.
template <typename V, typename T>
inline void store_lanes(T* p, const V& v, int n) {
#if defined(__AVX512F__)
  if constexpr (sizeof(V) == 64 && std::is_same_v<T, float>) {
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), __m512(v));
    return;
  } else if constexpr (sizeof(V) == 64 && std::is_same_v<T, double>) {
    _mm512_mask_storeu_pd(p, static_cast<__mmask8>((1u << n) - 1), __m512d(v));
    return;
  }
#endif
  for (int l = 0; l < n; ++l) p[l] = v[l];
}

// n values from src to dst. On AVX-512 by whole vectors and a masked last one, inline: the
// rows the conv kernels copy into padded buffers are short (tens of values), and libc's memcpy
// of a runtime size cost a call and its size dispatch per row. mid-16-16's forward (batch 256,
// perf): 8.3% of its samples in __memmove_avx512_unaligned_erms, then 5.7% in copy_padded.
template <typename T>
inline void copy_row(T* dst, const T* src, int64_t n) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    constexpr int64_t VW = 64 / sizeof(T);
    int64_t i = 0;
    for (; i + VW <= n; i += VW) std::memcpy(dst + i, src + i, 64);
    if (i == n) return;
    const int rest = static_cast<int>(n - i);
    store_lanes(dst + i, load_lanes<typename VecOf<T, 64>::type>(src + i, 0, rest), rest);
    return;
  }
#endif
  std::memcpy(dst, src, n * sizeof(T));
}

// One input sample's c planes of h x w values (xs, contiguous) into dst's planes of
// (h + 2 * padh) x wp values at row padh and column padw: the conv kernels' zero-padded copies.
// dst's padding keeps what it holds (the zeros it was allocated with).
template <typename T>
void copy_padded(const T* xs, int64_t c, int64_t h, int64_t w, int64_t padh, int64_t padw,
                 int64_t wp, T* dst) {
  const int64_t plane = (h + 2 * padh) * wp;
  for (int64_t ci = 0; ci < c; ++ci)
    for (int64_t y = 0; y < h; ++y)
      copy_row(dst + ci * plane + (y + padh) * wp + padw, xs + (ci * h + y) * w, w);
}

// Bytes [0, n) of b to p[0 .. n) (0 <= n <= N), writing nothing past them: one masked store
// on AVX-512 BW/VL.
template <int N>
inline void store_bytes(uint8_t* p, const typename ByteVec<N>::type& b, int n) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  if constexpr (N <= 16) {
    __m128i v = _mm_setzero_si128();
    std::memcpy(&v, &b, N);
    _mm_mask_storeu_epi8(p, static_cast<__mmask16>((1u << n) - 1), v);
    return;
  }
#endif
  for (int i = 0; i < n; ++i) p[i] = b[i];
}

// N bytes: p[0 .. n) and `fill` past them, reading nothing past p + n (one masked load on
// AVX-512 BW/VL).
template <int N>
inline typename ByteVec<N>::type load_bytes(const uint8_t* p, int n, uint8_t fill) {
  using B = typename ByteVec<N>::type;
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  if constexpr (N == 16) {
    const __mmask16 keep = static_cast<__mmask16>((1u << n) - 1);
    return B(_mm_mask_loadu_epi8(_mm_set1_epi8(static_cast<char>(fill)), keep, p));
  }
#endif
  B b = B{} + fill;
  for (int i = 0; i < n; ++i) b[i] = p[i];
  return b;
}

// Transposes 8 rows of 8 floats in registers: afterwards r[j][i] is the old r[i][j]. The
// shuffles are the classic AVX2 sequence (unpack pairs of rows, shuffle pairs of pairs, swap
// 128-bit halves: 24 shuffles per 64 values), written portably.
using Float8 = VecOf<float, 32>::type;
constexpr int kTransposeLanes = 8;

inline void transpose8(Float8 r[kTransposeLanes]) {
  Float8 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4)
    for (int j = 0; j < 2; ++j) {
      u[i + 2 * j] = __builtin_shufflevector(t[i + j], t[i + j + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[i + 2 * j + 1] =
          __builtin_shufflevector(t[i + j], t[i + j + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  for (int i = 0; i < 4; ++i) {
    r[i] = __builtin_shufflevector(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    r[i + 4] = __builtin_shufflevector(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

#if defined(__AVX512F__)
// Transposes 16 rows of 16 floats in registers: afterwards r[j][i] is the old r[i][j]. Pairs
// of rows interleaved by floats, then by float pairs, then 128-bit lanes gathered twice (the
// shuffles of _mm512_unpack*_ps/pd and _mm512_shuffle_f32x4, written as vector shuffles: GCC 12
// warns about those intrinsics' undefined operand).
using Float16 = VecOf<float, 64>::type;

inline void transpose16(Float16 (&r)[16]) {
  Float16 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12, 28,
                                   13, 29);
    t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27,
                                       14, 30, 15, 31);
  }
  // r[4i + j], 128-bit lane L: rows 4i .. 4i + 3 of column 4L + j.
  for (int i = 0; i < 16; i += 4)
    for (int h = 0; h < 2; ++h) {
      r[i + 2 * h] = __builtin_shufflevector(t[i + h], t[i + h + 2], 0, 1, 16, 17, 4, 5, 20, 21, 8,
                                             9, 24, 25, 12, 13, 28, 29);
      r[i + 2 * h + 1] = __builtin_shufflevector(t[i + h], t[i + h + 2], 2, 3, 18, 19, 6, 7, 22, 23,
                                                 10, 11, 26, 27, 14, 15, 30, 31);
    }
  for (int j = 0; j < 4; ++j) {
    // lanes 0, 1 (u) and 2, 3 (v) of rows 0-7's and rows 8-15's column-j vectors
    const Float16 u = __builtin_shufflevector(r[j], r[4 + j], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18,
                                              19, 20, 21, 22, 23);
    const Float16 v = __builtin_shufflevector(r[j], r[4 + j], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25,
                                              26, 27, 28, 29, 30, 31);
    const Float16 u2 = __builtin_shufflevector(r[8 + j], r[12 + j], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17,
                                               18, 19, 20, 21, 22, 23);
    const Float16 v2 = __builtin_shufflevector(r[8 + j], r[12 + j], 8, 9, 10, 11, 12, 13, 14, 15,
                                               24, 25, 26, 27, 28, 29, 30, 31);
    // even lanes of each (column j of lane 0 / 2), odd lanes (lane 1 / 3)
    t[j] = __builtin_shufflevector(u, u2, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
    t[4 + j] =
        __builtin_shufflevector(u, u2, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    t[8 + j] =
        __builtin_shufflevector(v, v2, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
    t[12 + j] =
        __builtin_shufflevector(v, v2, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}
#endif

#if defined(__AVX512F__)
// An a x b transpose by 16 x 16 blocks through transpose16: load(k, b0, lanes) gives input
// vector k (k < a) of the block at b0, its `lanes` (a mask) from b0 on; store(k, a0, lanes, v)
// takes output vector k (k < b), its `lanes` from a0 on.
template <typename Load, typename Store>
void transpose_blocks(int64_t a, int64_t b, Load&& load, Store&& store) {
  for (int64_t a0 = 0; a0 < a; a0 += 16)
    for (int64_t b0 = 0; b0 < b; b0 += 16) {
      const int64_t na = std::min<int64_t>(16, a - a0), nb = std::min<int64_t>(16, b - b0);
      const auto a_lanes = static_cast<__mmask16>((1u << na) - 1);
      const auto b_lanes = static_cast<__mmask16>((1u << nb) - 1);
      Float16 r[16];
      for (int64_t k = 0; k < 16; ++k)
        r[k] = k < na ? Float16(load(a0 + k, b0, b_lanes)) : Float16{};
      transpose16(r);
      for (int64_t k = 0; k < nb; ++k) store(b0 + k, a0, a_lanes, r[k]);
    }
}
#endif

// A rows x cols block transposed between row-major (leading dimension ld) and rows placed at
// offsets: rows_at: dst[off[j] + i] = src[i * ld + j]; from_rows_at: dst[i * ld + j] =
// src[off[j] + i] (i < rows, j < cols). The conv kernels' weight layouts: a weight's or a weight
// gradient's [C][KH x KW] against rows of C channels per tap. Element by element these took
// ~0.9 ns a value on every call (LeNet-5's conv2 backward at batch 1: ~2 us each of its ~12);
// on AVX-512 (float) by transpose_blocks, masked at the edges. Values are only moved: the same
// bits either way.
template <typename T>
void rows_at(const T* src, int64_t ld, int64_t rows, int64_t cols, const int64_t* off, T* dst) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    transpose_blocks(
        rows, cols,
        [&](int64_t i, int64_t j0, __mmask16 m) {
          return _mm512_maskz_loadu_ps(m, src + i * ld + j0);
        },
        [&](int64_t j, int64_t i0, __mmask16 m, Float16 v) {
          _mm512_mask_storeu_ps(dst + off[j] + i0, m, v);
        });
    return;
  }
#endif
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[off[j] + i] = src[i * ld + j];
}

template <typename T>
void from_rows_at(const T* src, const int64_t* off, int64_t rows, int64_t cols, T* dst,
                  int64_t ld) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    transpose_blocks(
        cols, rows,
        [&](int64_t j, int64_t i0, __mmask16 m) {
          return _mm512_maskz_loadu_ps(m, src + off[j] + i0);
        },
        [&](int64_t i, int64_t j0, __mmask16 m, Float16 v) {
          _mm512_mask_storeu_ps(dst + i * ld + j0, m, v);
        });
    return;
  }
#endif
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[i * ld + j] = src[off[j] + i];
}

}  // namespace fastlenet::cpu
