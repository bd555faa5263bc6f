// linear -> ReLU on CUDA (also plain linear, `relu` = false): kernel bodies (launchers in
// linear_relu_cuda.cu). The same source runs in the CPU simulator of tests/cuda_sim/.
//
// Math and saved state: fastlenet/reference.py (linear_relu).
// Computes: out (B, O); the backward's grad_x, grad_w and grad_b from grad_out and out.
// Saves for backward (the caller does): x, w and out, the ReLU mask.
//
// Shapes (contiguous, row-major): input x (B, I), weight w (O, I), bias b (O), out (B, O).
// Accumulation is in acc_t<T> (float32, or float64 for float64 data).
//
// Kernels:
//  - gemm_kernel<BM, BN, BK, TM, TN>: C (M, N) = A (M, K) @ B (K, N), A and B addressed
//    through strides so that the three products (out, grad_x, grad_w) read x, w and g in
//    place (no transposed copies). A block computes a BM x BN tile of C with
//    (BM/TM) x (BN/TN) threads, each holding a TM x TN register tile; BK-deep slices of A and
//    B are staged in shared memory (converted to acc_t once). The masked-gradient prologue
//    (A = g, 0 where out <= 0) is applied while staging A; the bias/ReLU epilogue while
//    writing C. No split over K: every output element is summed in one fixed order
//    (deterministic).
//  - column_sum_kernel: grad_b = sum over rows of the masked g; a block of (32, 8) threads per
//    32 columns, rows split over the 8 lanes, added by a shared-memory tree (deterministic).
#pragma once

#include "cuda_common.cuh"

namespace fastlenet::cuda {

template <typename T>
struct GemmArgs {
  const T* a;     // A (M, K): element (m, k) at a[m * sam + k * sak]
  const T* mask;  // null, or a tensor with A's strides: A(m, k) is 0 where mask <= 0
  int64_t sam, sak;
  const T* b;  // B (K, N): element (k, n) at b[k * sbk + n * sbn]
  int64_t sbk, sbn;
  const T* bias;  // null, or (N)
  T* c;           // C (M, N), row-major
  int64_t m, n, k;
  bool relu;
};

template <typename T, int BM, int BN, int BK, int TM, int TN>
__global__ void gemm_kernel(GemmArgs<T> p) {
  using A = acc_t<T>;
  constexpr int kThreadsX = BN / TN, kThreadsY = BM / TM, kThreads = kThreadsX * kThreadsY;
  static_assert(BM % TM == 0 && BN % TN == 0, "tile must split evenly into thread tiles");
  __shared__ A as[BK][BM];
  __shared__ A bs[BK][BN];
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kThreadsX + tx;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM,
                n0 = static_cast<int64_t>(blockIdx.x) * BN;
  A acc[TM][TN];
  for (int i = 0; i < TM; ++i)
    for (int j = 0; j < TN; ++j) acc[i][j] = A(0);
  // Staging order: consecutive threads take consecutive addresses of whichever index has unit
  // stride, so that the global loads coalesce.
  const bool a_k_fast = p.sak == 1, b_n_fast = p.sbn == 1;
  for (int64_t k0 = 0; k0 < p.k; k0 += BK) {
    for (int e = tid; e < BM * BK; e += kThreads) {
      const int mm = a_k_fast ? e / BK : e % BM, kk = a_k_fast ? e % BK : e / BM;
      const int64_t gm = m0 + mm, gk = k0 + kk;
      A v = A(0);
      if (gm < p.m && gk < p.k) {
        const int64_t off = gm * p.sam + gk * p.sak;
        // where(out <= 0, 0, g): a masked entry is 0 even when g is NaN or Inf; a NaN out
        // passes g (`<=` is false for NaN).
        if (p.mask == nullptr || !(to_acc(p.mask[off]) <= A(0))) v = to_acc(p.a[off]);
      }
      as[kk][mm] = v;
    }
    for (int e = tid; e < BK * BN; e += kThreads) {
      const int kk = b_n_fast ? e / BN : e % BK, nn = b_n_fast ? e % BN : e / BK;
      const int64_t gk = k0 + kk, gn = n0 + nn;
      bs[kk][nn] = (gk < p.k && gn < p.n) ? to_acc(p.b[gk * p.sbk + gn * p.sbn]) : A(0);
    }
    __syncthreads();
    for (int kk = 0; kk < BK; ++kk) {
      A af[TM], bf[TN];
      for (int i = 0; i < TM; ++i) af[i] = as[kk][ty * TM + i];
      for (int j = 0; j < TN; ++j) bf[j] = bs[kk][tx * TN + j];
      for (int i = 0; i < TM; ++i)
        for (int j = 0; j < TN; ++j) acc[i][j] += af[i] * bf[j];
    }
    __syncthreads();  // the next slice overwrites as/bs
  }
  for (int i = 0; i < TM; ++i) {
    const int64_t gm = m0 + ty * TM + i;
    if (gm >= p.m) break;
    for (int j = 0; j < TN; ++j) {
      const int64_t gn = n0 + tx * TN + j;
      if (gn >= p.n) break;
      A v = acc[i][j];
      if (p.bias != nullptr) v += to_acc(p.bias[gn]);
      if (p.relu && v <= A(0)) v = A(0);  // `v <= 0` is false for NaN: NaN propagates
      p.c[gm * p.n + gn] = from_acc<T>(v);
    }
  }
}

// grad_b[n] = sum_r (relu ? where(out[r, n] <= 0, 0, g[r, n]) : g[r, n]); blockDim = (CX, RY).
template <typename T, int CX, int RY>
__global__ void column_sum_kernel(const T* __restrict__ g, const T* __restrict__ out,
                                  T* __restrict__ sum, int64_t rows, int64_t cols) {
  using A = acc_t<T>;
  __shared__ A red[RY][CX];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * CX + tx;
  A acc = A(0);
  if (col < cols) {
    for (int64_t r = ty; r < rows; r += RY) {
      const int64_t off = r * cols + col;
      if (out == nullptr || !(to_acc(out[off]) <= A(0))) acc += to_acc(g[off]);
    }
  }
  red[ty][tx] = acc;
  __syncthreads();
  for (int s = RY / 2; s > 0; s /= 2) {
    if (ty < s) red[ty][tx] += red[ty + s][tx];
    __syncthreads();
  }
  if (ty == 0 && col < cols) sum[col] = from_acc<T>(red[0][tx]);
}

}  // namespace fastlenet::cuda
