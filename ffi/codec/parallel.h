// Codec passes over std::threads. Work items (chunks, groups, elements) are cut into fixed
// blocks that threads take in increasing order as they come free, so a busy core delays one
// block and not a fixed share of the work; each block's result depends on the block alone,
// so the output does not depend on the thread count or on timing.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

namespace unweight {

// `threads <= 0` means one per hardware thread.
inline int resolve_threads(int threads) {
  if (threads > 0) return threads;
  const unsigned hw = std::thread::hardware_concurrency();
  return hw > 0 ? static_cast<int>(hw) : 1;
}

class Blocks {
 public:
  Blocks(int64_t count, int64_t block_size, int threads)
      : count_(count),
        size_(std::max<int64_t>(1, block_size)),
        blocks_((count + size_ - 1) / size_),
        workers_(static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(resolve_threads(threads), blocks_)))) {}

  int64_t blocks() const { return blocks_; }
  int workers() const { return workers_; }  // for per-worker state, indexed by run's `worker`
  int64_t begin(int64_t block) const { return block * size_; }
  int64_t end(int64_t block) const { return std::min(count_, (block + 1) * size_); }

  // Runs body(worker, block) for every block. The calling thread is worker 0; a worker whose
  // thread cannot be started leaves its blocks to the others. An exception in any worker (out
  // of memory) stops the handing out of blocks and is rethrown here once all have stopped.
  template <class Body>
  void run(Body&& body) const {
    std::atomic<int64_t> next{0};
    std::exception_ptr failure;
    std::mutex failure_mutex;
    auto work = [&](int worker) {
      try {
        for (int64_t b = next++; b < blocks_; b = next++) body(worker, b);
      } catch (...) {
        next = blocks_;
        const std::lock_guard<std::mutex> lock(failure_mutex);
        if (!failure) failure = std::current_exception();
      }
    };
    std::vector<std::thread> threads;
    threads.reserve(workers_ - 1);
    try {
      for (int w = 1; w < workers_; ++w) threads.emplace_back(work, w);
    } catch (const std::system_error&) {
      // out of threads: fewer workers share the blocks
    }
    work(0);
    for (auto& t : threads) t.join();
    if (failure) std::rethrow_exception(failure);
  }

 private:
  int64_t count_;
  int64_t size_;
  int64_t blocks_;
  int workers_;
};

}  // namespace unweight
