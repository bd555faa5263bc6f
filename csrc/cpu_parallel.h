// How the CPU ops split their work over threads: at::parallel_for, except in an op whose whole
// work is too small to pay for a parallel region (SerialBelow), where every region of its
// kernels runs on the calling thread.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

namespace fastlenet::cpu {

// Multiply-adds below which an op runs on the calling thread. Handing half of a small op to
// the other core costs ~3.5 us on the 2-core VM even with the worker spinning (LeNet-5 fc1's
// backward at batch 1: 9.3 us with its two products side by side, 5.7 us one after the
// other), about what splitting 2^18 multiply-adds in two saves. The region itself is ~0.6 us
// (two empty tasks, back to back or from Python); the rest is likely the other core
// fetching the op's operands into its own caches. LeNet-5 step, default SGD, 2 threads, in one
// process alternately, every op parallel -> this: batch 1 268 -> 244 us, 2 308 -> 283, 8 342 ->
// 327, 64 776 -> 749 (2^17 and 2^19 measured within 1-3% of it).
constexpr int64_t kParallelMinMacs = int64_t{1} << 18;

inline thread_local bool t_serial = false;

// For the scope of one op: its kernels' regions run serially when the op does fewer than
// kParallelMinMacs multiply-adds.
class SerialBelow {
 public:
  explicit SerialBelow(int64_t macs) : saved_(t_serial) {
    t_serial = saved_ || macs < kParallelMinMacs;
  }
  ~SerialBelow() { t_serial = saved_; }
  SerialBelow(const SerialBelow&) = delete;
  SerialBelow& operator=(const SerialBelow&) = delete;

 private:
  bool saved_;
};

// at::parallel_for, or f(begin, end) on this thread inside a serial op.
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (!t_serial) return at::parallel_for(begin, end, grain, f);
  if (begin < end) f(begin, end);
}

// Threads the op's regions use.
inline int64_t num_threads() { return t_serial ? 1 : at::get_num_threads(); }

}  // namespace fastlenet::cpu
