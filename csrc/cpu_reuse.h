// Large CPU tensors of fastlenet's ops, their memory kept for reuse when they are freed.
//
// glibc maps a large allocation fresh, or, when a free leaves enough of the heap's top unused,
// gives that top back to the system; either way a buffer of the same size in the next training
// step is new memory, and its first touch takes a page fault per 4 KiB page (the kernel zeroes
// each). pytorch/examples' MNIST Net through fuse, batch 64, took 1250-3200 minor faults a
// step (5-13 MB; 84% of them in fastlenet's outputs: conv2's input gradient, fc1's gradients,
// the ReLU codes; perf -e page-faults), and ~20% of its step went to them (11.8-12.9 ms
// against 9.7-9.8 with glibc told to keep freed memory). Tensors of at least kReuseMinBytes
// made by empty_reused take their memory from ReuseAllocator, which keeps a freed block for
// the next request of the same rounded size: a step of the same shapes as the last one maps
// no new memory. Of several blocks of a size it hands out the one freed last, whose lines are
// the likeliest still in cache: with the one kept longest, examples-fc1's backward (9216 -> 128,
// batch 64) read 0.90x-0.97x stock's after benchmarks/bench_fuse.py (pytorch/examples' Net, the
// same layer) in one process, and 1.07x with the one freed last (1.05x-1.09x in processes
// without bench_fuse; Xeon VM). Smaller tensors go to the default CPU allocator as before. At
// most kReuseMaxCached bytes are kept: past it the blocks kept longest go back to the system
// first, when a block is freed as when a request finds none of its size, so that the sizes in
// use stay and those of an earlier model, shape or batch size go (reuse_evict_oldest).
// release_reused() frees the kept blocks (fastlenet.release_cached_buffers()).
//
// The storage is resizable, as at::empty's (a resize allocates through ReuseAllocator); the
// profiler sees each block's allocation and free, as the default allocator reports them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <map>
#include <mutex>
#include <vector>

namespace fastlenet::cpu {

// Smallest tensor kept for reuse: below glibc's mmap threshold (128 KiB at start) the heap
// serves allocations without page faults in steady state, and a kept block would only hold
// memory.
constexpr size_t kReuseMinBytes = size_t{1} << 20;
// Block sizes are rounded up to this, so that the same shapes ask for the same sizes.
constexpr size_t kReuseGranule = size_t{1} << 16;
// Most bytes kept unused; pytorch/examples' Net at batch 256 frees ~100 MB of such tensors a
// step. With this much of other sizes kept (in `make bench`, the conv benchmarks' before the
// linear ones, in one process), the pool used to give a freed block that did not fit back to the
// system while blocks no call asked for again stayed, and the next call mapped it fresh: the
// linear backward 12544 -> 10 at batch 64 read 0.74x-0.75x stock's there (1.23x alone); with the
// oldest blocks going instead, 1.15x-1.26x (Xeon VM, 2026-12-07).
constexpr size_t kReuseMaxCached = size_t{512} << 20;

// A kept block and when it was freed (ReusePool::freed's count then): the lowest go first.
struct KeptBlock {
  void* ptr;
  uint64_t freed;
};

struct ReusePool {
  std::mutex mu;
  std::multimap<size_t, KeptBlock> kept;  // size -> blocks
  uint64_t freed = 0;                     // blocks freed into the pool so far
  size_t kept_bytes = 0;
  size_t live_bytes = 0;  // handed out, not yet freed (the profiler's total_allocated)
};

// The process's pool, never destroyed (tensors may be freed after static destructors ran). A
// child process after fork() starts a pool of its own: the parent's mutex may have been held by
// another thread at the fork.
inline std::atomic<ReusePool*>& reuse_pool_slot() {
  static std::atomic<ReusePool*> slot{[] {
    pthread_atfork(nullptr, nullptr, [] { reuse_pool_slot().store(new ReusePool); });
    return new ReusePool;
  }()};
  return slot;
}

inline ReusePool& reuse_pool() { return *reuse_pool_slot().load(); }

struct ReuseBlock {
  void* ptr;
  size_t size;
};

inline void reuse_report(void* ptr, int64_t bytes, const ReusePool& p) {
  if (c10::memoryProfilingEnabled())
    c10::reportMemoryUsageToProfiler(ptr, bytes, p.live_bytes, p.live_bytes + p.kept_bytes,
                                     c10::Device(c10::DeviceType::CPU));
}

// With p.mu held: the blocks kept longest out of the pool, into `evicted` (to be freed once the
// lock is released), until `size` more bytes fit under kReuseMaxCached. A linear search: the
// pool holds tens of blocks.
inline void reuse_evict_oldest(ReusePool& p, size_t size, std::vector<void*>& evicted) {
  while (!p.kept.empty() && p.kept_bytes + size > kReuseMaxCached) {
    auto oldest = p.kept.begin();
    for (auto it = p.kept.begin(); it != p.kept.end(); ++it)
      if (it->second.freed < oldest->second.freed) oldest = it;
    evicted.push_back(oldest->second.ptr);
    p.kept_bytes -= oldest->first;
    p.kept.erase(oldest);
  }
}

// The DataPtr's deleter: the block back to the pool (the oldest kept ones to the system where
// it would not fit), or to the system where it alone is larger than kReuseMaxCached.
inline void reuse_give_back(void* ctx) {
  auto* block = static_cast<ReuseBlock*>(ctx);
  ReusePool& p = reuse_pool();
  const bool keep = block->size <= kReuseMaxCached;
  std::vector<void*> evicted;
  {
    const std::lock_guard<std::mutex> lock(p.mu);
    // (In a fork()ed child a block of the parent's is not counted in its pool.)
    p.live_bytes -= std::min(p.live_bytes, block->size);
    if (keep) {
      reuse_evict_oldest(p, block->size, evicted);
      p.kept.emplace(block->size, KeptBlock{block->ptr, p.freed++});
      p.kept_bytes += block->size;
    }
    reuse_report(block->ptr, -static_cast<int64_t>(block->size), p);
  }
  for (void* e : evicted) c10::free_cpu(e);
  if (!keep) c10::free_cpu(block->ptr);
  delete block;
}

class ReuseAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < kReuseMinBytes) return c10::GetCPUAllocator()->allocate(n);
    const size_t size = (n + kReuseGranule - 1) / kReuseGranule * kReuseGranule;
    ReusePool& p = reuse_pool();
    void* ptr = nullptr;
    std::vector<void*> evicted;
    {
      const std::lock_guard<std::mutex> lock(p.mu);
      // The block of this size freed last (emplace puts it at the end of its size's range).
      const auto [first, end] = p.kept.equal_range(size);
      if (first != end) {
        const auto it = std::prev(end);
        ptr = it->second.ptr;
        p.kept.erase(it);
        p.kept_bytes -= size;
      } else {
        reuse_evict_oldest(p, size, evicted);
      }
    }
    for (void* e : evicted) c10::free_cpu(e);
    if (ptr == nullptr) ptr = c10::alloc_cpu(size);
    {
      const std::lock_guard<std::mutex> lock(p.mu);
      p.live_bytes += size;
      reuse_report(ptr, static_cast<int64_t>(size), p);
    }
    return {ptr, new ReuseBlock{ptr, size}, &reuse_give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

inline ReuseAllocator* reuse_allocator() {
  static auto* allocator = new ReuseAllocator;
  return allocator;
}

// at::empty(size, options.memory_format(format)) for a CPU tensor, its memory from
// ReuseAllocator (which passes small sizes on to the default allocator).
inline at::Tensor empty_reused(at::IntArrayRef size, const at::TensorOptions& options,
                               at::MemoryFormat format = at::MemoryFormat::Contiguous) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  return at::Tensor(at::detail::empty_generic(size, reuse_allocator(),
                                              c10::DispatchKeySet(c10::DispatchKey::CPU),
                                              c10::typeMetaToScalarType(options.dtype()), format));
}

// at::empty_strided(size, stride, options) for a CPU tensor, its memory from ReuseAllocator.
inline at::Tensor empty_strided_reused(at::IntArrayRef size, at::IntArrayRef stride,
                                       const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  return at::Tensor(at::detail::empty_strided_generic(size, stride, reuse_allocator(),
                                                      c10::DispatchKeySet(c10::DispatchKey::CPU),
                                                      c10::typeMetaToScalarType(options.dtype())));
}

// Frees every kept block; the bytes freed.
inline size_t release_reused() {
  ReusePool& p = reuse_pool();
  std::multimap<size_t, KeptBlock> kept;
  {
    const std::lock_guard<std::mutex> lock(p.mu);
    kept.swap(p.kept);
    p.kept_bytes = 0;
  }
  size_t bytes = 0;
  for (const auto& [size, block] : kept) {
    c10::free_cpu(block.ptr);
    bytes += size;
  }
  return bytes;
}

// (bytes kept for reuse, bytes handed out and not yet freed)
inline std::pair<size_t, size_t> reuse_stats() {
  ReusePool& p = reuse_pool();
  const std::lock_guard<std::mutex> lock(p.mu);
  return {p.kept_bytes, p.live_bytes};
}

}  // namespace fastlenet::cpu
