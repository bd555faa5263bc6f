// Shows that the simulator under ThreadSanitizer catches a missing __syncthreads, and that its
// barrier lets threads return before __syncthreads (tests/test_cuda_sim.py runs it).
//
//   race_demo racy   block sums with the barrier between the shared-memory writes and the
//                    reads left out: TSan must report a data race (the sums are often right)
//   race_demo fixed  the same with the barrier, a kernel whose upper half of threads returns
//                    before __syncthreads, and an atomicAdd total: no report, right results
// Exit status 0 when every sum is right, 3 otherwise.
#include <cstdio>
#include <string_view>
#include <vector>

#include "cuda_sim.h"

namespace {

constexpr int kThreads = 64;  // threads per block, two warps' worth
constexpr int kBlocks = 3;

// out[b] = sum of x[b * kThreads : (b + 1) * kThreads], thread 0 adding what the others wrote.
template <bool Sync>
__global__ void block_sum(const float* x, float* out) {
  __shared__ float buf[kThreads];
  buf[threadIdx.x] = x[blockIdx.x * kThreads + threadIdx.x];
  if constexpr (Sync) __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0;
    for (int i = 0; i < kThreads; ++i) s += buf[i];
    out[blockIdx.x] = s;
  }
}

// Only the first `live` threads take part; the others return at once, before the barrier.
__global__ void early_exit_sum(const float* x, float* out, int live, float* total) {
  __shared__ float buf[kThreads];
  if (static_cast<int>(threadIdx.x) >= live) return;
  buf[threadIdx.x] = x[blockIdx.x * kThreads + threadIdx.x];
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0;
    for (int i = 0; i < live; ++i) s += buf[i];
    out[blockIdx.x] = s;
    atomicAdd(total, s);
  }
}

bool expect(const char* what, float got, float want) {
  if (got == want) return true;
  std::printf("%s: got %g, expected %g\n", what, got, want);
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  const bool racy = argc > 1 && std::string_view(argv[1]) == "racy";
  // Small integers: every partial sum is exact in float, whatever the order of the atomics.
  std::vector<float> x(kBlocks * kThreads);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 7);
  std::vector<float> out(kBlocks, -1.0f);
  auto kernel = racy ? block_sum<false> : block_sum<true>;
  cudasim::launch(kernel, dim3(kBlocks), dim3(kThreads), 0, nullptr, x.data(), out.data());
  bool ok = cudaGetLastError() == cudaSuccess;
  for (int b = 0; b < kBlocks; ++b) {
    float want = 0;
    for (int i = 0; i < kThreads; ++i) want += x[b * kThreads + i];
    ok &= expect("block_sum", out[b], want);
  }
  if (!racy) {
    const int live = kThreads / 2 + 3;  // not a multiple of anything the shim might assume
    float total = 0, want_total = 0;
    cudasim::launch(early_exit_sum, dim3(kBlocks), dim3(kThreads), 0, nullptr, x.data(), out.data(),
                    live, &total);
    ok &= cudaGetLastError() == cudaSuccess;
    for (int b = 0; b < kBlocks; ++b) {
      float want = 0;
      for (int i = 0; i < live; ++i) want += x[b * kThreads + i];
      want_total += want;
      ok &= expect("early_exit_sum", out[b], want);
    }
    ok &= expect("atomicAdd total", total, want_total);
  }
  std::printf("%s\n", ok ? "sums right" : "sums wrong");
  return ok ? 0 : 3;
}
