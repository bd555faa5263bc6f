// Host-side interface of fastlenet's CUDA kernels: plain structs and launchers that take raw
// device pointers, sizes and a cudaStream_t. No torch header here or in the .cu files (nvcc
// compiles them in about a second); the tensor checks and the op registration live in
// csrc/*_cuda_ops.cpp. Under FASTLENET_CUDA_SIM the same declarations compile against the CPU
// simulator of tests/cuda_sim/ (cuda_sim.h), which runs the kernels with one std::thread per
// CUDA thread.
//
// Every launcher returns the first error of its launches (cudaGetLastError() after each one),
// cudaSuccess otherwise; the caller turns it into a TORCH_CHECK.
#pragma once

#include <cstddef>
#include <cstdint>

#ifdef FASTLENET_CUDA_SIM
#include "cuda_sim.h"
#else
#include <cuda_runtime.h>
#endif

namespace fastlenet::cuda {

// Element type of every floating tensor argument of one call; accumulation is float32 for the
// three 32-bit-or-less types and float64 for float64.
enum class DType { kFloat32, kFloat64, kFloat16, kBFloat16 };

// conv2d -> ReLU -> max_pool2d geometry (same fields as ConvPoolGeometry in checks.h).
struct ConvGeom {
  int64_t n, c, h, w;          // input (N, C, H, W)
  int64_t o, kh, kw;           // weight (O, C, KH, KW)
  int64_t sh, sw, padh, padw;  // conv stride and padding
  int64_t oh, ow;              // conv output
  int64_t poolh, poolw, psh, psw;
  int64_t ph, pw;  // pooled output
};

// Shared memory one block of the conv forward kernel may use: 48 KiB is what every GPU since
// sm_20 grants without cudaFuncSetAttribute opt-in. Tests pass smaller budgets to reach the
// channel-chunked and the unstaged paths on small shapes. A 4-warp block that uses all of it
// still leaves room for 3 blocks (12 warps) per SM on sm_80 (164 KiB) and 4 on sm_90 (228 KiB).
constexpr int64_t kConvSmemBudget = 48 * 1024;

// Threads per conv forward block, at most: 4 warps. (No __launch_bounds__ on the kernel: with
// it ptxas traded registers for 16-72 bytes of spills, seen with CUDA 13.0.)
constexpr int kConvFwdThreads = 128;

// The conv forward's launch (conv_relu_pool_fwd_plan): a block computes one tile of
// tph x tpw pooled outputs of OCB output channels for `samples` samples, one thread per pooled
// output, so that a small pooled plane still fills whole warps (LeNet-5's conv2: 5 x 5 pooled
// outputs, 5 samples = 125 threads of a 128-thread block, where one sample alone was a
// 25-thread block).
struct ConvFwdPlan {
  int64_t tph, tpw;  // pooled tile
  int64_t tiles_w;   // tiles per pooled row
  int64_t samples;   // samples per block
  int64_t threads;   // samples * tph * tpw rounded up to whole warps
  int64_t chunk;     // input channels staged in shared memory at once; 0: unstaged
  int64_t smem;      // dynamic shared memory per block, bytes
};
ConvFwdPlan conv_relu_pool_fwd_plan(DType dtype, const ConvGeom& g,
                                    int64_t smem_budget = kConvSmemBudget);

// out, argmax: (N, O, PH, PW). bias may be null.
cudaError_t conv_relu_pool_fwd(DType dtype, const void* input, const void* weight, const void* bias,
                               void* out, uint8_t* argmax, const ConvGeom& g, cudaStream_t stream,
                               int64_t smem_budget = kConvSmemBudget);

// Bytes of device workspace conv_relu_pool_bwd_input needs (the conv outputs' gradient).
size_t conv_relu_pool_bwd_input_workspace(DType dtype, const ConvGeom& g);

// grad_input (N, C, H, W) from grad_out and argmax (N, O, PH, PW) and weight.
cudaError_t conv_relu_pool_bwd_input(DType dtype, const void* grad_out, const uint8_t* argmax,
                                     const void* weight, void* grad_input, void* workspace,
                                     const ConvGeom& g, cudaStream_t stream);

// Bytes of device workspace conv_relu_pool_bwd_weight needs (per-block partial sums).
size_t conv_relu_pool_bwd_weight_workspace(DType dtype, const ConvGeom& g, bool atomics);

// grad_weight (O, C, KH, KW) and grad_bias (O). Deterministic (partial sums per block, added
// in a fixed order) unless `atomics`, which adds the block sums with float atomics instead.
cudaError_t conv_relu_pool_bwd_weight(DType dtype, const void* grad_out, const uint8_t* argmax,
                                      const void* input, void* grad_weight, void* grad_bias,
                                      void* workspace, const ConvGeom& g, bool atomics,
                                      cudaStream_t stream);

// GEMM tile edge of the linear kernels: 0 chooses by size; tests force 32 or 64.
constexpr int kAutoTile = 0;

// out (B, O) = relu?(input (B, I) @ weight (O, I)^T + bias (O)); bias may be null.
cudaError_t linear_relu_fwd(DType dtype, const void* input, const void* weight, const void* bias,
                            void* out, int64_t batch, int64_t in_features, int64_t out_features,
                            bool relu, cudaStream_t stream, int tile = kAutoTile);

// grad_input (B, I), grad_weight (O, I) and grad_bias (O) of linear_relu (fastlenet/reference.py)
// from grad_out and out (B, O), the ReLU mask (out may be null when !relu).
cudaError_t linear_relu_bwd(DType dtype, const void* grad_out, const void* out, const void* input,
                            const void* weight, void* grad_input, void* grad_weight,
                            void* grad_bias, int64_t batch, int64_t in_features,
                            int64_t out_features, bool relu, cudaStream_t stream,
                            int tile = kAutoTile);

}  // namespace fastlenet::cuda

// Every kernel launch the launchers above make for one shape, for tools that check the
// kernels' resources without a GPU (tests/test_gpu_budgets.py and benchmarks/gpu_static.py call
// them through ctypes): one line per launch, "<kernel>|<threads per block>|<dynamic shared
// memory bytes>", the kernel written as its demangled name with T for the element type
// ("conv_relu_pool_fwd_kernel<T, 4, true>"). dtype: a DType value. conv: the 19 ConvGeom
// fields in order. Returns the length written (NUL excluded), or -1 when `size` is too small.
extern "C" int64_t fastlenet_cuda_conv_relu_pool_launches(int dtype, const int64_t* conv, char* out,
                                                          int64_t size);
extern "C" int64_t fastlenet_cuda_linear_relu_launches(int dtype, int64_t batch,
                                                       int64_t in_features, int64_t out_features,
                                                       char* out, int64_t size);
