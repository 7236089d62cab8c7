// A fixed set of worker threads for the CPU backends, created with the context so that a run
// neither spawns threads nor allocates. ParallelFor calls on one pool are serialized.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <new>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/functional/function_ref.h"

namespace kvplug::attn {

class ThreadPool {
 public:
  // num_threads <= 0: std::thread::hardware_concurrency(). The calling thread is one of them.
  // Throws std::system_error (or std::bad_alloc) when a worker thread cannot be started.
  explicit ThreadPool(int32_t num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int32_t num_threads() const { return static_cast<int32_t>(workers_.size()) + 1; }

  // Calls body(begin, end) over disjoint ranges covering [0, n), `grain` items at least per call.
  void ParallelFor(int64_t n, int64_t grain, absl::FunctionRef<void(int64_t, int64_t)> body);
  // The same, telling body which thread runs it (0 = the caller, up to num_threads() - 1), so that
  // it can use that thread's scratch.
  void ParallelForThreads(int64_t n, int64_t grain, absl::FunctionRef<void(int32_t, int64_t, int64_t)> body);

  // kScratchBytes of 64-byte aligned memory per thread, allocated with the pool (a run allocates
  // nothing); only the thread `thread` of the current ParallelForThreads may use it.
  static constexpr size_t kScratchBytes = size_t{576} << 10;
  void* scratch(int32_t thread) const { return scratch_.get() + static_cast<size_t>(thread) * kScratchBytes; }

 private:
  struct AlignedFree {
    void operator()(std::byte* p) const { ::operator delete[](p, std::align_val_t{64}); }
  };
  void WorkerLoop(int32_t thread);
  void RunChunks(int32_t thread);
  void Stop();  // stops and joins the workers

  std::unique_ptr<std::byte[], AlignedFree> scratch_;
  std::vector<std::thread> workers_;
  std::mutex run_mutex_;  // one ParallelFor at a time
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  uint64_t generation_ = 0;
  int32_t active_ = 0;
  bool stop_ = false;
  // The current job.
  const absl::FunctionRef<void(int32_t, int64_t, int64_t)>* body_ = nullptr;
  int64_t n_ = 0;
  int64_t chunk_ = 1;
  int64_t next_ = 0;  // guarded by mutex_
};

}  // namespace kvplug::attn
