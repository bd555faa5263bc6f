// Dropout's noise on the CPU, bit for bit stock's: the tensor torch.nn.functional.dropout
// multiplies its input by in training (ATen's _dropout_impl: noise = empty_like(input),
// noise.bernoulli_(1 - p), noise.div_(1 - p)), drawn from the default CPU generator as
// bernoulli_ draws it, which leaves the generator where stock's leaves it.
// Math: stock's torch.nn.functional.dropout (fastlenet/nn/dropout.py calls this where it
// computes the same). Saves nothing: the caller multiplies with stock's mul, whose autograd node
// keeps the noise for backward.
//
// Stock's bernoulli_ on the CPU is a serial loop of one virtual generator call per element
// (ATen's templates::cpu::bernoulli_kernel): 7 ns an element, 4.2 ms for pytorch/examples' MNIST
// Net's first dropout at batch 64 (64 x 9216), more than its convolutions' forward. Here the
// same draws: per element, two 32-bit outputs of the generator's MT19937 (random64: the first
// as the high half), the low 53 bits as a double in [0, 1), kept where below 1 - p. The engine's
// state is advanced 624 words at a time by vectorised loops and tempered in bulk.
#include "dropout_cpu.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/MT19937RNGEngine.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <mutex>

#include "cpu_reuse.h"

namespace fastlenet {
namespace {

constexpr int kN = 624;  // MT19937's state words (at::MERSENNE_STATE_N)
constexpr int kM = 397;  // its recurrence's offset (at::MERSENNE_STATE_M)
constexpr uint32_t kMatrixA = 0x9908b0dfu, kUpper = 0x80000000u, kLower = 0x7fffffffu;
// Elements per block: the block's 2 x kBlock draws sit in a stack buffer (16 KB).
constexpr int64_t kBlock = 2048;

inline uint32_t twist(uint32_t u, uint32_t v) {
  return (((u & kUpper) | (v & kLower)) >> 1) ^ ((0u - (v & 1u)) & kMatrixA);
}

// The engine's next 624 words, as at::mt19937's next_state: the first loop reads only words it
// has not yet replaced, the second reads words replaced 227 steps before, so both vectorise.
void next_state(uint32_t* s) {
  for (int i = 0; i < kN - kM; ++i) s[i] = s[i + kM] ^ twist(s[i], s[i + 1]);
  for (int i = kN - kM; i < kN - 1; ++i) s[i] = s[i + kM - kN] ^ twist(s[i], s[i + 1]);
  s[kN - 1] = s[kM - 1] ^ twist(s[kN - 1], s[0]);
}

// `count` outputs of the engine `d`, as `count` calls of at::mt19937's operator() would return
// them. Each call first decrements left_ and, where it reaches 0, refills the state; so after a
// refill 624 words are read with left_ going 624 .. 1.
void draw(at::mt19937_data_pod& d, uint32_t* out, int64_t count) {
  while (count > 0) {
    if (d.left_ == 1) {
      next_state(d.state_.data());
      d.left_ = kN + 1;
      d.next_ = 0;
    }
    const int64_t n = std::min<int64_t>(count, d.left_ - 1);
    const uint32_t* s = d.state_.data() + d.next_;
    for (int64_t i = 0; i < n; ++i) {  // MT19937's tempering
      uint32_t y = s[i];
      y ^= y >> 11;
      y ^= (y << 7) & 0x9d2c5680u;
      y ^= (y << 15) & 0xefc60000u;
      y ^= y >> 18;
      out[i] = y;
    }
    d.next_ += static_cast<uint32_t>(n);
    d.left_ -= static_cast<int>(n);
    out += n;
    count -= n;
  }
}

template <typename T>
void fill_noise(at::mt19937_data_pod& d, double p, T* noise, int64_t numel) {
  const double keep = 1.0 - p;  // bernoulli_(1 - p): 1 where the draw is below it
  // div_(1 - p): the scalar in the tensor's type, divided in it.
  const T scale = T(1) / static_cast<T>(keep);
  // uniform < keep for uniform = bits * 2^-53 (exact): bits < keep * 2^53, compared as doubles
  // (exact: both sides hold at most 53 significant bits).
  const double bound = keep * 0x1p53;
  constexpr uint64_t kLow53 = (uint64_t{1} << 53) - 1;
  uint32_t buf[2 * kBlock];
  for (int64_t e0 = 0; e0 < numel; e0 += kBlock) {
    const int64_t len = std::min(kBlock, numel - e0);
    draw(d, buf, 2 * len);
    T* __restrict out = noise + e0;
    for (int64_t i = 0; i < len; ++i) {
      const uint64_t bits = ((uint64_t{buf[2 * i]} << 32) | buf[2 * i + 1]) & kLow53;
      out[i] = static_cast<double>(bits) < bound ? scale : T(0);
    }
  }
}

}  // namespace

// The noise stock's dropout(input, p, train=True) multiplies `like` by: empty_like(like), as
// stock's, 1 / (1 - p) where kept, else 0; from the default CPU generator, which it advances as
// stock's does. empty_like's result is dense (like's strides where like is dense, else
// contiguous), and stock's bernoulli_ walks it in memory order (TensorIterator orders a
// nullary op's dimensions by stride), as this fills it.
at::Tensor dropout_noise(const at::Tensor& like, double p) {
  TORCH_CHECK(like.device().is_cpu(), "input must be a CPU tensor, got ", like.device());
  TORCH_CHECK(like.layout() == at::kStrided, "input must be strided, got ", like.layout());
  TORCH_CHECK(like.scalar_type() == at::kFloat || like.scalar_type() == at::kDouble,
              "input must be float32 or float64, got ", like.scalar_type());
  TORCH_CHECK(p > 0.0 && p < 1.0,
              "p must be in (0, 1) (stock's dropout draws no noise at 0 or 1), got ", p);
  // empty_like's strides for a dense `like` (its own), with memory kept for reuse
  // (csrc/cpu_reuse.h).
  at::Tensor noise = like.is_non_overlapping_and_dense()
                         ? cpu::empty_strided_reused(like.sizes(), like.strides(), like.options())
                         : at::empty_like(like);
  TORCH_INTERNAL_ASSERT(noise.is_non_overlapping_and_dense());
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(
      std::nullopt, at::detail::getDefaultCPUGenerator());
  const std::lock_guard<std::mutex> lock(gen->mutex_);
  at::mt19937 engine = gen->engine();
  at::mt19937_data_pod d = engine.data();
  AT_DISPATCH_FLOATING_TYPES(noise.scalar_type(), "dropout_noise", [&] {
    fill_noise<scalar_t>(d, p, noise.data_ptr<scalar_t>(), noise.numel());
  });
  engine.set_data(d);
  gen->set_engine(engine);
  return noise;
}

}  // namespace fastlenet
