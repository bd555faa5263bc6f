// Portable SIMD for the CPU kernels: GCC/Clang vector extensions. With -march=native they
// compile to AVX-512 / AVX2 registers; a portable build (FASTLENET_PORTABLE=1) splits them.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fastlenet::cpu {

// A vector of `Bytes` bytes of T.
template <typename T, int Bytes>
struct VecOf {
  static constexpr int kLanes = Bytes / static_cast<int>(sizeof(T));
  typedef T type __attribute__((vector_size(Bytes)));
  using mask = decltype(type{} > type{});  // lane mask: integers of sizeof(T) bytes
  using mask_int = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
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

}  // namespace fastlenet::cpu
