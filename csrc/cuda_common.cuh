// Device helpers shared by fastlenet's CUDA kernels, and the two macros that let the same
// kernel source run on a GPU (nvcc) and in the CPU simulator of tests/cuda_sim/ (g++ with
// -DFASTLENET_CUDA_SIM):
//   FASTLENET_LAUNCH(kernel, grid, block, smem, stream, args...)  replaces <<<...>>>
//   FASTLENET_DYNAMIC_SMEM(name)  declares `unsigned char* name`, the block's dynamic shared
//                                 memory (extern __shared__ on the GPU)
// Kernels stay inside what the simulator runs: __syncthreads, static __shared__ arrays,
// dynamic shared memory through the macro, atomicAdd; no warp intrinsics, no inline PTX.
#pragma once

#include <cstdint>
#include <cstdio>

#include "cuda_launchers.h"

#ifdef FASTLENET_CUDA_SIM
#define FASTLENET_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::cudasim::launch(kernel, grid, block, smem, stream, __VA_ARGS__)
#define FASTLENET_DYNAMIC_SMEM(name) unsigned char* name = ::cudasim::dynamic_smem()
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define FASTLENET_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define FASTLENET_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace fastlenet::cuda {

// Accumulator type: float32 for float32/float16/bfloat16 storage, float64 for float64.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ double from_acc<double>(double v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename I>
__host__ __device__ __forceinline__ I ceil_div(I a, I b) {
  return (a + b - 1) / b;
}
template <typename I>
__host__ __device__ __forceinline__ I imin(I a, I b) {
  return a < b ? a : b;
}
template <typename I>
__host__ __device__ __forceinline__ I imax(I a, I b) {
  return a > b ? a : b;
}

// Grid dimensions y and z are limited to 65535 blocks; kernels loop over the rest.
constexpr int64_t kMaxGridYZ = 65535;

// Calls f.template operator()<T>() with T the storage type named by `dtype`.
template <typename F>
cudaError_t dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f.template operator()<float>();
    case DType::kFloat64:
      return f.template operator()<double>();
    case DType::kFloat16:
      return f.template operator()<__half>();
    case DType::kBFloat16:
      return f.template operator()<__nv_bfloat16>();
  }
  return cudaErrorInvalidValue;
}

inline size_t acc_size(DType dtype) { return dtype == DType::kFloat64 ? 8 : 4; }

// Appends one launch line, "<kernel>|<threads>|<dynamic smem>\n", to `out` (the launch lists of
// cuda_launchers.h); false when it does not fit in `size` bytes with the NUL.
inline bool put_launch(char* out, int64_t size, int64_t& used, const char* kernel, int64_t threads,
                       int64_t smem) {
  const int len =
      std::snprintf(out + used, static_cast<size_t>(size - used), "%s|%lld|%lld\n", kernel,
                    static_cast<long long>(threads), static_cast<long long>(smem));
  if (len < 0 || used + len >= size) return false;
  used += len;
  return true;
}

}  // namespace fastlenet::cuda
