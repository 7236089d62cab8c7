#include "kvplug/attention/thread_pool.h"

#include <algorithm>
#include <system_error>

#include "kvplug/kv_cache/alloc_hook.h"

namespace kvplug::attn {

ThreadPool::ThreadPool(int32_t num_threads) {
  int32_t n = num_threads > 0 ? num_threads : static_cast<int32_t>(std::thread::hardware_concurrency());
  n = std::clamp(n, 1, 256);
  // Pages are committed on first touch, so threads that never use their scratch cost no memory.
  scratch_.reset(new (std::align_val_t{64}) std::byte[static_cast<size_t>(n) * kScratchBytes]);
  workers_.reserve(n - 1);
  try {
    for (int32_t i = 1; i < n; ++i) {
      if (ShouldFailAllocation())
        throw std::system_error(std::make_error_code(std::errc::resource_unavailable_try_again),
                                "starting a worker thread (injected)");
      workers_.emplace_back([this, i] { WorkerLoop(i); });
    }
  } catch (...) {
    Stop();  // a started (joinable) std::thread must be joined before it is destroyed
    throw;
  }
}

ThreadPool::~ThreadPool() { Stop(); }

void ThreadPool::Stop() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::RunChunks(int32_t thread) {
  for (;;) {
    int64_t begin;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (next_ >= n_) return;
      begin = next_;
      next_ = std::min(n_, next_ + chunk_);
    }
    (*body_)(thread, begin, std::min(n_, begin + chunk_));
  }
}

void ThreadPool::WorkerLoop(int32_t thread) {
  uint64_t seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      ++active_;
    }
    RunChunks(thread);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      --active_;
    }
    done_.notify_one();
  }
}

void ThreadPool::ParallelFor(int64_t n, int64_t grain, absl::FunctionRef<void(int64_t, int64_t)> body) {
  ParallelForThreads(n, grain, [&](int32_t, int64_t begin, int64_t end) { body(begin, end); });
}

void ThreadPool::ParallelForThreads(int64_t n, int64_t grain,
                                    absl::FunctionRef<void(int32_t, int64_t, int64_t)> body) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  // Also taken on the inline path: two callers on one pool would share thread 0's scratch.
  std::lock_guard<std::mutex> run_lock(run_mutex_);
  if (workers_.empty() || n <= grain) {
    body(0, 0, n);
    return;
  }
  const int64_t threads = num_threads();
  // A few chunks per thread balance uneven items (long and short sequences) without much locking.
  const int64_t chunk = std::max(grain, (n + threads * 4 - 1) / (threads * 4));
  {
    std::lock_guard<std::mutex> lock(mutex_);
    body_ = &body;
    n_ = n;
    chunk_ = chunk;
    next_ = 0;
    ++generation_;
  }
  wake_.notify_all();
  RunChunks(0);
  std::unique_lock<std::mutex> lock(mutex_);
  done_.wait(lock, [&] { return active_ == 0 && next_ >= n_; });
  body_ = nullptr;
}

}  // namespace kvplug::attn
