// A CUDA simulator for the CPU, in the spirit of numba's: the kernels of csrc/*_cuda.cuh and
// their launchers in csrc/*_cuda.cu compile with g++ -std=c++20 -DFASTLENET_CUDA_SIM against
// this header instead of the CUDA toolkit, and run on the CPU.
//
// Model: a launch runs its blocks one at a time; a block runs one std::thread per CUDA thread.
//  - threadIdx/blockIdx/blockDim/gridDim are thread_local, set before the kernel body runs.
//  - __shared__ is `static`: one array per kernel instantiation, seen by every thread of the
//    running block (blocks never overlap, so it is per block). Dynamic shared memory
//    (FASTLENET_DYNAMIC_SMEM) is a fresh buffer per block, filled with 0xFF bytes (NaN as
//    float16/32/64) so that reading it before writing shows.
//  - __syncthreads is a std::barrier over the block's threads; a thread leaving the kernel
//    (early return included) drops out of it with arrive_and_drop, as exited threads stop
//    counting on a GPU.
//  - atomicAdd is std::atomic_ref::fetch_add.
//  - __half / __nv_bfloat16 are 16-bit storage types with round-to-nearest-even conversions,
//    bit-compatible with torch.float16 / torch.bfloat16.
// Launch errors that a GPU reports (block of more than 1024 threads, more than 48 KiB of
// dynamic shared memory, a zero or too large grid) set the error cudaGetLastError returns.
// Not modelled: warps (no warp intrinsics), concurrency between blocks, streams (everything
// is synchronous), memory spaces (device pointers are host pointers), timing.
#pragma once

#include <atomic>
#include <barrier>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <tuple>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct CUstream_st;
typedef CUstream_st* cudaStream_t;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
};

inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
  }
  return "unknown error";
}

namespace cudasim {

struct ThreadState {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
  std::barrier<>* barrier = nullptr;
  unsigned char* smem = nullptr;
};
inline thread_local ThreadState tls;
inline cudaError_t last_error = cudaSuccess;  // launches come from one host thread

constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr size_t kMaxDynamicSmem = 48 * 1024;
constexpr unsigned kMaxGridX = 2147483647u, kMaxGridYZ = 65535;

inline unsigned char* dynamic_smem() { return tls.smem; }

template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t, A&&... args) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > kMaxThreadsPerBlock || block.z > 64 || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || grid.x > kMaxGridX || grid.y > kMaxGridYZ || grid.z > kMaxGridYZ ||
      smem > kMaxDynamicSmem) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  const std::tuple<P...> params(std::forward<A>(args)...);
  // 16 bytes more, so that the buffer can start 16-byte aligned as __align__(16) promises.
  std::vector<unsigned char> buffer(smem + 16);
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::fill(buffer.begin(), buffer.end(), 0xFF);
        auto base = reinterpret_cast<uintptr_t>(buffer.data());
        unsigned char* smem_ptr = buffer.data() + ((16 - base % 16) % 16);
        std::barrier<> barrier(static_cast<std::ptrdiff_t>(threads));
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned tz = 0; tz < block.z; ++tz) {
          for (unsigned ty = 0; ty < block.y; ++ty) {
            for (unsigned tx = 0; tx < block.x; ++tx) {
              pool.emplace_back([&, tx, ty, tz, bx, by, bz] {
                tls = ThreadState{dim3(tx, ty, tz), dim3(bx, by, bz), block, grid,
                                  &barrier,         smem_ptr};
                std::tuple<P...> mine = params;  // kernel arguments are per-thread copies
                std::apply(kernel, mine);
                barrier.arrive_and_drop();
              });
            }
          }
        }
        for (auto& t : pool) t.join();
      }
    }
  }
}

}  // namespace cudasim

#define threadIdx (::cudasim::tls.thread_idx)
#define blockIdx (::cudasim::tls.block_idx)
#define blockDim (::cudasim::tls.block_dim)
#define gridDim (::cudasim::tls.grid_dim)

inline void __syncthreads() { cudasim::tls.barrier->arrive_and_wait(); }

template <typename T>
inline T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = cudasim::last_error;
  cudasim::last_error = cudaSuccess;
  return e;
}

inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t = nullptr) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}

// 16-bit floating types: storage only, converted through float.
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1Fu, mant = h.bits & 0x3FFu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24
    const float v = std::ldexp(static_cast<float>(mant), -24);
    return sign ? -v : v;
  }
  if (exp == 31) return std::bit_cast<float>(sign | 0x7F800000u | (mant << 13));
  return std::bit_cast<float>(sign | ((exp + 112) << 23) | (mant << 13));
}

inline __half __float2half_rn(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t a = x & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return {static_cast<uint16_t>(sign | 0x7E00u)};   // NaN
  if (a >= 0x477FF000u) return {static_cast<uint16_t>(sign | 0x7C00u)};  // >= 65520: inf
  if (a >= 0x38800000u) {  // normal half: round the mantissa at bit 13, ties to even
    const uint32_t r = a + 0xFFFu + ((a >> 13) & 1u);
    return {static_cast<uint16_t>(sign | ((r - 0x38000000u) >> 13))};
  }
  // subnormal half: a multiple of 2^-24, rounded to nearest even (the default FP mode)
  const float scaled = std::nearbyint(std::bit_cast<float>(a) * 16777216.0f);
  return {static_cast<uint16_t>(sign | static_cast<uint32_t>(scaled))};
}

inline float __bfloat162float(__nv_bfloat16 b) {
  return std::bit_cast<float>(static_cast<uint32_t>(b.bits) << 16);
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return {static_cast<uint16_t>((x >> 16) | 0x0040u)};
  return {static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16)};
}
