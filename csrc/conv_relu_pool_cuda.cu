// conv2d -> ReLU -> max_pool2d on CUDA: launchers (raw pointers, sizes, a cudaStream_t).
// Math and saved state: fastlenet/reference.py (conv_relu_pool); the kernels are described in
// conv_relu_pool_cuda.cuh, the tensor checks and the op registration are in
// conv_relu_pool_cuda_ops.cpp.
#include "conv_relu_pool_cuda.cuh"

namespace fastlenet::cuda {
namespace {

// Output channels per forward block: each thread keeps OCB accumulators and OCB running
// maxima in registers and reuses every staged input value OCB times; 4 keeps the registers
// low and splits LeNet-5's 6 and 16 channels into 2 and 4 blocks (2 idle lanes for conv1).
constexpr int kOcb = 4;
// Pooled outputs per forward block edge: an 8 x 8 tile is 64 threads (two warps); smaller
// pooled planes get a tile of their own size (LeNet-5's conv2: 5 x 5).
constexpr int64_t kTile = 8;
// Threads per block of the element-wise kernels (bwd_input, reduce): a common default that
// keeps 8 blocks of 256 resident per SM on sm_80/sm_90.
constexpr int kThreads = 256;
// Weight elements per bwd_weight block (one warp's width of consecutive kernel taps, so that
// input loads coalesce) and pooled-position lanes per element (8: 256 threads per block).
constexpr int kWeightLanes = 32;
constexpr int kPositionLanes = 8;
// Pooled positions per bwd_weight slice: 1024 gives each of the 8 position lanes 128
// positions per weight element, and LeNet-5 at batch 256 about 50 (conv1) and 7 (conv2)
// slices per output channel. At most 1024 slices bound the workspace and the reduce loop.
constexpr int64_t kPositionsPerSlice = 1024;
constexpr int64_t kMaxSlices = 1024;

int64_t slices_of(const ConvGeom& g) {
  const int64_t p = g.n * g.ph * g.pw;
  return imax<int64_t>(1, imin(kMaxSlices, ceil_div<int64_t>(p, kPositionsPerSlice)));
}

// Blocks for a grid-stride loop over `total` elements: enough to fill any current GPU, capped
// so that the grid stays within limits.
unsigned grid_for(int64_t total) {
  return static_cast<unsigned>(
      imax<int64_t>(1, imin<int64_t>(ceil_div<int64_t>(total, kThreads), int64_t(1) << 20)));
}

}  // namespace

cudaError_t conv_relu_pool_fwd(DType dtype, const void* input, const void* weight, const void* bias,
                               void* out, uint8_t* argmax, const ConvGeom& g, cudaStream_t stream,
                               int64_t smem_budget) {
  if (g.n == 0) return cudaSuccess;
  const int64_t tph = imin(kTile, g.ph), tpw = imin(kTile, g.pw);
  const int64_t tiles_h = ceil_div(g.ph, tph), tiles_w = ceil_div(g.pw, tpw);
  const int64_t tih = ((tph - 1) * g.psh + g.poolh - 1) * g.sh + g.kh;
  const int64_t tiw = ((tpw - 1) * g.psw + g.poolw - 1) * g.sw + g.kw;
  const int64_t per_channel = (tih * tiw + kOcb * g.kh * g.kw) * acc_size(dtype);
  const int64_t chunk = imin(g.c, smem_budget / per_channel);
  const dim3 grid(static_cast<unsigned>(tiles_h * tiles_w),
                  static_cast<unsigned>(ceil_div<int64_t>(g.o, kOcb)),
                  static_cast<unsigned>(imin(g.n, kMaxGridYZ)));
  const dim3 block(static_cast<unsigned>(tpw), static_cast<unsigned>(tph));
  return dispatch(dtype, [&]<typename T>() {
    const auto* x = static_cast<const T*>(input);
    const auto* w = static_cast<const T*>(weight);
    const auto* b = static_cast<const T*>(bias);
    if (chunk >= 1) {
      auto kernel = conv_relu_pool_fwd_kernel<T, kOcb, true>;
      FASTLENET_LAUNCH(kernel, grid, block, chunk * per_channel, stream, x, w, b,
                       static_cast<T*>(out), argmax, g, chunk, tiles_w);
    } else {  // a patch of one channel does not fit: read global memory (L1/L2) directly
      auto kernel = conv_relu_pool_fwd_kernel<T, kOcb, false>;
      FASTLENET_LAUNCH(kernel, grid, block, 0, stream, x, w, b, static_cast<T*>(out), argmax, g,
                       int64_t(0), tiles_w);
    }
    return cudaGetLastError();
  });
}

cudaError_t conv_relu_pool_bwd_input(DType dtype, const void* grad_out, const uint8_t* argmax,
                                     const void* weight, void* grad_input, const ConvGeom& g,
                                     cudaStream_t stream) {
  const int64_t total = g.n * g.c * g.h * g.w;
  if (total == 0) return cudaSuccess;
  return dispatch(dtype, [&]<typename T>() {
    auto kernel = conv_relu_pool_bwd_input_kernel<T>;
    FASTLENET_LAUNCH(kernel, dim3(grid_for(total)), dim3(kThreads), 0, stream,
                     static_cast<const T*>(grad_out), argmax, static_cast<const T*>(weight),
                     static_cast<T*>(grad_input), g);
    return cudaGetLastError();
  });
}

// Workspace: the partial sums ([slices][O][K + 1] accumulators; one set with atomics), then the
// int flag of nonfinite_kernel.
static size_t partials_bytes(DType dtype, const ConvGeom& g, bool atomics) {
  const int64_t elems = g.o * (g.c * g.kh * g.kw + 1);
  return static_cast<size_t>((atomics ? 1 : slices_of(g)) * elems) * acc_size(dtype);
}

size_t conv_relu_pool_bwd_weight_workspace(DType dtype, const ConvGeom& g, bool atomics) {
  return partials_bytes(dtype, g, atomics) + sizeof(int);
}

cudaError_t conv_relu_pool_bwd_weight(DType dtype, const void* grad_out, const uint8_t* argmax,
                                      const void* input, void* grad_weight, void* grad_bias,
                                      void* workspace, const ConvGeom& g, bool atomics,
                                      cudaStream_t stream) {
  const int64_t elems = g.o * (g.c * g.kh * g.kw + 1);
  const int64_t slices = slices_of(g);
  const size_t partials = partials_bytes(dtype, g, atomics);
  int* nonfinite = reinterpret_cast<int*>(static_cast<unsigned char*>(workspace) + partials);
  // The flag, and with atomics the sums, start at 0.
  const cudaError_t e0 = atomics ? cudaMemsetAsync(workspace, 0, partials + sizeof(int), stream)
                                 : cudaMemsetAsync(nonfinite, 0, sizeof(int), stream);
  if (e0 != cudaSuccess) return e0;
  return dispatch(dtype, [&]<typename T>() {
    auto* partial = static_cast<acc_t<T>*>(workspace);
    if (g.n > 0) {
      const int64_t xs = g.n * g.c * g.h * g.w;
      auto check = nonfinite_kernel<T>;
      FASTLENET_LAUNCH(check, dim3(grid_for(xs)), dim3(kThreads), 0, stream,
                       static_cast<const T*>(input), xs, nonfinite);
      cudaError_t e = cudaGetLastError();
      if (e != cudaSuccess) return e;
      auto kernel = conv_relu_pool_bwd_weight_partial_kernel<T, kWeightLanes, kPositionLanes>;
      FASTLENET_LAUNCH(kernel, dim3(static_cast<unsigned>(slices), static_cast<unsigned>(g.o)),
                       dim3(kWeightLanes, kPositionLanes), 0, stream,
                       static_cast<const T*>(grad_out), argmax, static_cast<const T*>(input),
                       partial, g, static_cast<const int*>(nonfinite), atomics);
      e = cudaGetLastError();
      if (e != cudaSuccess) return e;
    } else if (!atomics) {  // no sample: every gradient is zero
      const cudaError_t e = cudaMemsetAsync(workspace, 0, elems * sizeof(acc_t<T>), stream);
      if (e != cudaSuccess) return e;
    }
    auto reduce = conv_relu_pool_bwd_weight_reduce_kernel<T>;
    FASTLENET_LAUNCH(reduce, dim3(grid_for(elems)), dim3(kThreads), 0, stream,
                     static_cast<const acc_t<T>*>(partial), static_cast<T*>(grad_weight),
                     static_cast<T*>(grad_bias), g, (atomics || g.n == 0) ? int64_t(1) : slices);
    return cudaGetLastError();
  });
}

}  // namespace fastlenet::cuda
