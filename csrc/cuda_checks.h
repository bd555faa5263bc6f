// Checks and conversions shared by the CUDA bindings (csrc/*_cuda_ops.cpp): device and dtype
// of the tensor arguments, and the error of a launcher (every launch is checked).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <cstdlib>

#include "cuda_launchers.h"

namespace fastlenet {

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
}

// The launchers' element type; float16 and bfloat16 accumulate in float32.
inline cuda::DType cuda_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kDouble:
      return cuda::DType::kFloat64;
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "input must be float32, float64, float16 or bfloat16, got ",
                  t.scalar_type());
  }
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastlenet::", op,
              ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// FASTLENET_CUDA_ATOMICS=1 opts into float atomics where a kernel offers them (conv
// grad_weight): one launch less and no workspace, but the sum order, hence the last bits of
// the result, changes from run to run. Off by default: results are bitwise reproducible.
inline bool cuda_atomics_enabled() {
  const char* v = std::getenv("FASTLENET_CUDA_ATOMICS");
  return v != nullptr && v[0] == '1';
}

}  // namespace fastlenet
