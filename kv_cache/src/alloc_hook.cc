#include "kvplug/kv_cache/alloc_hook.h"

#include <atomic>

namespace kvplug {
namespace {
std::atomic<int64_t> countdown{-1};
}  // namespace

void SetAllocationFailureCountdown(int64_t n) { countdown.store(n < 0 ? -1 : n, std::memory_order_relaxed); }

int64_t AllocationFailureCountdown() { return countdown.load(std::memory_order_relaxed); }

bool ShouldFailAllocation() {
  int64_t n = countdown.load(std::memory_order_relaxed);
  while (n >= 0) {
    // n == 0: this call fails and the countdown turns off; otherwise count one down.
    if (countdown.compare_exchange_weak(n, n - 1, std::memory_order_relaxed)) return n == 0;
  }
  return false;
}

}  // namespace kvplug
