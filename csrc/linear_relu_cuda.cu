// linear -> ReLU on CUDA: launchers (raw pointers, sizes, a cudaStream_t). Math and saved
// state: fastlenet/reference.py (linear_relu); the kernels are described in linear_relu_cuda.cuh,
// the tensor checks and the op registration are in linear_relu_cuda_ops.cpp.
//
// Why a hand-written GEMM rather than cuBLAS through torch: LeNet-5's products are small
// (batch x 400 x 120 at most), where a cuBLAS call is dominated by its launch and the separate
// bias/ReLU/mask passes around it would each cost another launch and a round trip through
// global memory; here bias, ReLU and the gradient mask are fused into the one kernel. (Not yet
// timed on a GPU: this project's machines have none.)
#include "linear_relu_cuda.cuh"

namespace fastlenet::cuda {
namespace {

// 256 threads (16 x 16) per GEMM block, each owning a 4 x 4 (large tile) or 2 x 2 (small
// tile) register tile. Large tile: 64 x 64 x 16, 8 KiB of float shared memory, 16 FMAs per 8
// shared loads. Small tile: 32 x 32 x 16, used when 64 x 64 tiles would make fewer blocks than
// kSmallTileBelow (an H100's 132 SMs; an A100 has 108) and leave SMs idle.
constexpr int kBK = 16;
constexpr int kEdge = 16;  // threads per block edge
constexpr int64_t kSmallTileBelow = 132;
// Column-sum block: 32 columns (one warp's width, coalesced rows) x 8 row lanes.
constexpr int kSumCols = 32;
constexpr int kSumRows = 8;

// The tile edge the GEMM of an (m x n) output uses when the caller leaves it to the size.
int auto_tile(int64_t m, int64_t n) {
  return ceil_div<int64_t>(m, 64) * ceil_div<int64_t>(n, 64) < kSmallTileBelow ? 32 : 64;
}

template <typename T>
cudaError_t gemm(const GemmArgs<T>& p, int tile, cudaStream_t stream) {
  if (p.m == 0 || p.n == 0) return cudaSuccess;
  if (tile == kAutoTile) tile = auto_tile(p.m, p.n);
  if (tile != 32 && tile != 64) return cudaErrorInvalidValue;
  const int64_t gy = ceil_div<int64_t>(p.m, tile);
  if (gy > kMaxGridYZ) return cudaErrorInvalidValue;  // more than 2 or 4 million rows
  const dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(p.n, tile)), static_cast<unsigned>(gy));
  if (tile == 64) {
    auto kernel = gemm_kernel<T, 64, 64, kBK, 4, 4>;
    FASTLENET_LAUNCH(kernel, grid, dim3(kEdge, kEdge), 0, stream, p);
  } else {
    auto kernel = gemm_kernel<T, 32, 32, kBK, 2, 2>;
    FASTLENET_LAUNCH(kernel, grid, dim3(kEdge, kEdge), 0, stream, p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t linear_relu_fwd(DType dtype, const void* input, const void* weight, const void* bias,
                            void* out, int64_t batch, int64_t in_features, int64_t out_features,
                            bool relu, cudaStream_t stream, int tile) {
  return dispatch(dtype, [&]<typename T>() {
    // C (B, O) = x (B, I) @ w^T: A = x, B(k = i, n = o) = w[o, i].
    const GemmArgs<T> p{static_cast<const T*>(input),
                        nullptr,
                        in_features,
                        1,
                        static_cast<const T*>(weight),
                        1,
                        in_features,
                        static_cast<const T*>(bias),
                        static_cast<T*>(out),
                        batch,
                        out_features,
                        in_features,
                        relu};
    return gemm(p, tile, stream);
  });
}

cudaError_t linear_relu_bwd(DType dtype, const void* grad_out, const void* out, const void* input,
                            const void* weight, void* grad_input, void* grad_weight,
                            void* grad_bias, int64_t batch, int64_t in_features,
                            int64_t out_features, bool relu, cudaStream_t stream, int tile) {
  return dispatch(dtype, [&]<typename T>() {
    const auto* g = static_cast<const T*>(grad_out);
    const auto* mask = relu ? static_cast<const T*>(out) : nullptr;
    // grad_x (B, I) = g (B, O) @ w (O, I)
    const GemmArgs<T> dx{g,
                         mask,
                         out_features,
                         1,
                         static_cast<const T*>(weight),
                         in_features,
                         1,
                         nullptr,
                         static_cast<T*>(grad_input),
                         batch,
                         in_features,
                         out_features,
                         false};
    cudaError_t e = gemm(dx, tile, stream);
    if (e != cudaSuccess) return e;
    // grad_w (O, I) = g^T (O, B) @ x (B, I): A(m = o, k = b) = g[b, o].
    const GemmArgs<T> dw{g,
                         mask,
                         1,
                         out_features,
                         static_cast<const T*>(input),
                         in_features,
                         1,
                         nullptr,
                         static_cast<T*>(grad_weight),
                         out_features,
                         in_features,
                         batch,
                         false};
    e = gemm(dw, tile, stream);
    if (e != cudaSuccess) return e;
    if (out_features == 0) return cudaSuccess;
    auto kernel = column_sum_kernel<T, kSumCols, kSumRows>;
    FASTLENET_LAUNCH(kernel, dim3(static_cast<unsigned>(ceil_div<int64_t>(out_features, kSumCols))),
                     dim3(kSumCols, kSumRows), 0, stream, g, mask, static_cast<T*>(grad_bias),
                     batch, out_features);
    return cudaGetLastError();
  });
}

namespace {

// The launches of linear_relu_fwd and linear_relu_bwd with automatic tiles (cuda_launchers.h).
int64_t linear_launches(int64_t batch, int64_t in_features, int64_t out_features, char* out,
                        int64_t size) {
  int64_t used = 0;
  // out (B, O), grad_x (B, I), grad_w (O, I): one GEMM each.
  const int64_t products[3][2] = {
      {batch, out_features}, {batch, in_features}, {out_features, in_features}};
  for (const auto& mn : products) {
    const int tile = auto_tile(mn[0], mn[1]);
    char name[96];
    std::snprintf(name, sizeof name, "gemm_kernel<T, %d, %d, %d, %d, %d>", tile, tile, kBK,
                  tile / kEdge, tile / kEdge);
    if (!put_launch(out, size, used, name, kEdge * kEdge, 0)) return -1;
  }
  char sum[64];
  std::snprintf(sum, sizeof sum, "column_sum_kernel<T, %d, %d>", kSumCols, kSumRows);
  return put_launch(out, size, used, sum, kSumCols * kSumRows, 0) ? used : -1;
}

}  // namespace
}  // namespace fastlenet::cuda

extern "C" int64_t fastlenet_cuda_linear_relu_launches(int, int64_t batch, int64_t in_features,
                                                       int64_t out_features, char* out,
                                                       int64_t size) {
  return fastlenet::cuda::linear_launches(batch, in_features, out_features, out, size);
}
