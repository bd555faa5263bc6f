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
// Pooled outputs per forward tile edge: an 8 x 8 tile is 64 threads (two warps); smaller
// pooled planes get a tile of their own size (LeNet-5's conv2: 5 x 5), and a block takes as many
// samples' tiles as fit in kConvFwdThreads threads (conv_relu_pool_fwd_plan).
constexpr int64_t kTile = 8;
constexpr int64_t kWarp = 32;
// Threads per block of the element-wise kernels (conv_output_grad, bwd_input, nonfinite): a
// common default that keeps 8 blocks of 256 resident per SM on sm_80/sm_90.
constexpr int kThreads = 256;
// Weight elements per bwd_weight block (one warp's width of consecutive kernel taps, so that
// input loads coalesce) and pooled-position lanes per element (8: 256 threads per block).
constexpr int kWeightLanes = 32;
constexpr int kPositionLanes = 8;
// Pooled positions per bwd_weight slice: at most 1024 (each of the 8 position lanes visits at
// most 128 per weight element), at least 64 (8 per lane), and in between as many slices as give
// kWeightBlocks blocks over the output channels. The partial kernel is bound by the latency of
// its dependent loads (argmax, then grad_out and x), so it needs many warps resident: with
// 1024-position slices, LeNet-5 at batch 256 got 294 (conv1) and 112 (conv2) blocks, two or one
// per SM of an H200, and the kernel took 168 us a call on average; with these, 84 us
// (2026-12-04). 1024 blocks of 256 threads are about 8 per SM of a 132-SM H100/H200. At most
// 1024 slices bound the workspace and the reduce.
constexpr int64_t kMaxPositionsPerSlice = 1024;
constexpr int64_t kMinPositionsPerSlice = 64;
constexpr int64_t kWeightBlocks = 1024;
constexpr int64_t kMaxSlices = 1024;
// The reduce's elements per block (a warp) and lanes per element (8: 256 threads per block, and
// 8 partials in flight per element; more lanes made the CPU simulator's runs much longer).
constexpr int kReduceElems = 32;
constexpr int kReduceLanes = 8;

int64_t slices_of(const ConvGeom& g) {
  const int64_t p = g.n * g.ph * g.pw;
  const int64_t most = imax<int64_t>(1, ceil_div(p, kMinPositionsPerSlice));
  const int64_t wanted =
      imax(ceil_div(p, kMaxPositionsPerSlice), ceil_div(kWeightBlocks, imax<int64_t>(1, g.o)));
  return imax<int64_t>(1, imin(kMaxSlices, imin(most, wanted)));
}

// Blocks for a grid-stride loop over `total` elements: enough to fill any current GPU, capped
// so that the grid stays within limits.
unsigned grid_for(int64_t total) {
  return static_cast<unsigned>(
      imax<int64_t>(1, imin<int64_t>(ceil_div<int64_t>(total, kThreads), int64_t(1) << 20)));
}

}  // namespace

ConvFwdPlan conv_relu_pool_fwd_plan(DType dtype, const ConvGeom& g, int64_t smem_budget) {
  ConvFwdPlan p{};
  p.tph = imax<int64_t>(1, imin(kTile, g.ph));
  p.tpw = imax<int64_t>(1, imin(kTile, g.pw));
  p.tiles_w = ceil_div(g.pw, p.tpw);
  const int64_t tsize = p.tph * p.tpw;
  const int64_t tih = ((p.tph - 1) * g.psh + g.poolh - 1) * g.sh + g.kh;
  const int64_t tiw = ((p.tpw - 1) * g.psw + g.poolw - 1) * g.sw + g.kw;
  // Bytes one staged channel takes: the patches of `samples` samples and the OCB filters.
  const auto per_channel = [&](int64_t samples) {
    return static_cast<int64_t>((samples * tih * tiw + kOcb * g.kh * g.kw) * acc_size(dtype));
  };
  p.samples = imax<int64_t>(1, imin<int64_t>(g.n, kConvFwdThreads / tsize));
  // The budget shrinks with the block's warps (12 KiB a warp of the default 48 KiB): a block of
  // one warp (a small batch of small pooled planes) that took all 48 KiB would leave room for
  // only 3 warps per SM on sm_80.
  const int64_t budget =
      smem_budget * ceil_div(p.samples * tsize, kWarp) / (kConvFwdThreads / kWarp);
  if (per_channel(1) > budget) {
    p.chunk = 0;  // a patch of one channel does not fit: read global memory (L1/L2) directly
  } else {
    // Fewer samples only where the patches of one channel would not fit otherwise (small test
    // budgets, or 128 samples of 1 x 1 pooled outputs in float64).
    while (per_channel(p.samples) > budget) p.samples /= 2;
    p.chunk = imin(g.c, budget / per_channel(p.samples));
  }
  p.smem = p.chunk * per_channel(p.samples);
  p.threads = ceil_div(p.samples * tsize, kWarp) * kWarp;
  return p;
}

cudaError_t conv_relu_pool_fwd(DType dtype, const void* input, const void* weight, const void* bias,
                               void* out, uint8_t* argmax, const ConvGeom& g, cudaStream_t stream,
                               int64_t smem_budget) {
  if (g.n == 0) return cudaSuccess;
  const ConvFwdPlan p = conv_relu_pool_fwd_plan(dtype, g, smem_budget);
  const dim3 grid(static_cast<unsigned>(ceil_div(g.ph, p.tph) * p.tiles_w),
                  static_cast<unsigned>(ceil_div<int64_t>(g.o, kOcb)),
                  static_cast<unsigned>(imin(ceil_div(g.n, p.samples), kMaxGridYZ)));
  const dim3 block(static_cast<unsigned>(p.threads));
  return dispatch(dtype, [&]<typename T>() {
    const auto* x = static_cast<const T*>(input);
    const auto* w = static_cast<const T*>(weight);
    const auto* b = static_cast<const T*>(bias);
    if (p.chunk >= 1) {
      auto kernel = conv_relu_pool_fwd_kernel<T, kOcb, true>;
      FASTLENET_LAUNCH(kernel, grid, block, p.smem, stream, x, w, b, static_cast<T*>(out), argmax,
                       g, p);
    } else {
      auto kernel = conv_relu_pool_fwd_kernel<T, kOcb, false>;
      FASTLENET_LAUNCH(kernel, grid, block, 0, stream, x, w, b, static_cast<T*>(out), argmax, g, p);
    }
    return cudaGetLastError();
  });
}

size_t conv_relu_pool_bwd_input_workspace(DType dtype, const ConvGeom& g) {
  return static_cast<size_t>(g.n * g.o * g.oh * g.ow) * acc_size(dtype);
}

cudaError_t conv_relu_pool_bwd_input(DType dtype, const void* grad_out, const uint8_t* argmax,
                                     const void* weight, void* grad_input, void* workspace,
                                     const ConvGeom& g, cudaStream_t stream) {
  const int64_t total = g.n * g.c * g.h * g.w, convs = g.n * g.o * g.oh * g.ow;
  if (total == 0) return cudaSuccess;
  return dispatch(dtype, [&]<typename T>() {
    auto* dy = static_cast<acc_t<T>*>(workspace);
    if (convs > 0) {
      auto grad = conv_output_grad_kernel<T>;
      FASTLENET_LAUNCH(grad, dim3(grid_for(convs)), dim3(kThreads), 0, stream,
                       static_cast<const T*>(grad_out), argmax, dy, g);
      const cudaError_t e = cudaGetLastError();
      if (e != cudaSuccess) return e;
    }
    auto kernel = conv_relu_pool_bwd_input_kernel<T>;
    FASTLENET_LAUNCH(kernel, dim3(grid_for(total)), dim3(kThreads), 0, stream,
                     static_cast<const acc_t<T>*>(dy), static_cast<const T*>(weight),
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
    auto reduce = conv_relu_pool_bwd_weight_reduce_kernel<T, kReduceElems, kReduceLanes>;
    const auto reduce_blocks = static_cast<unsigned>(
        imin<int64_t>(ceil_div<int64_t>(elems, kReduceElems), int64_t(1) << 20));
    FASTLENET_LAUNCH(reduce, dim3(reduce_blocks), dim3(kReduceElems, kReduceLanes), 0, stream,
                     static_cast<const acc_t<T>*>(partial), static_cast<T*>(grad_weight),
                     static_cast<T*>(grad_bias), g, (atomics || g.n == 0) ? int64_t(1) : slices);
    return cudaGetLastError();
  });
}

namespace {

// The launches of conv_relu_pool_fwd, _bwd_input and _bwd_weight (see cuda_launchers.h).
int64_t conv_launches(DType dtype, const ConvGeom& g, char* out, int64_t size) {
  const ConvFwdPlan p = conv_relu_pool_fwd_plan(dtype, g);
  char fwd[96];
  std::snprintf(fwd, sizeof fwd, "conv_relu_pool_fwd_kernel<T, %d, %s>", kOcb,
                p.chunk >= 1 ? "true" : "false");
  char partial[96];
  std::snprintf(partial, sizeof partial, "conv_relu_pool_bwd_weight_partial_kernel<T, %d, %d>",
                kWeightLanes, kPositionLanes);
  char reduce[96];
  std::snprintf(reduce, sizeof reduce, "conv_relu_pool_bwd_weight_reduce_kernel<T, %d, %d>",
                kReduceElems, kReduceLanes);
  int64_t used = 0;
  const bool ok = put_launch(out, size, used, fwd, p.threads, p.smem) &&
                  put_launch(out, size, used, "conv_output_grad_kernel<T>", kThreads, 0) &&
                  put_launch(out, size, used, "conv_relu_pool_bwd_input_kernel<T>", kThreads, 0) &&
                  put_launch(out, size, used, "nonfinite_kernel<T>", kThreads, 0) &&
                  put_launch(out, size, used, partial, kWeightLanes * kPositionLanes, 0) &&
                  put_launch(out, size, used, reduce, kReduceLanes * kReduceElems, 0);
  return ok ? used : -1;
}

}  // namespace
}  // namespace fastlenet::cuda

extern "C" int64_t fastlenet_cuda_conv_relu_pool_launches(int dtype, const int64_t* c, char* out,
                                                          int64_t size) {
  const fastlenet::cuda::ConvGeom g{c[0],  c[1],  c[2],  c[3],  c[4],  c[5],  c[6],
                                    c[7],  c[8],  c[9],  c[10], c[11], c[12], c[13],
                                    c[14], c[15], c[16], c[17], c[18]};
  return fastlenet::cuda::conv_launches(static_cast<fastlenet::cuda::DType>(dtype), g, out, size);
}
