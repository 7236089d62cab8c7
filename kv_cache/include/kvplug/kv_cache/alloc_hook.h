// Fault injection for tests: makes a chosen allocation fail so that every error path that follows
// an allocation can be driven (tests/reliability). Internal: not part of the C ABI and not exported
// from libkvplug.so; production code only calls ShouldFailAllocation(), which costs one relaxed
// atomic load while no countdown is set.
//
// Consulted before each allocation that has an error path of its own: KvCache pages (device, host,
// pinned), state slots and the cache object, BatchPlan device mirrors, and CPU worker threads.
#pragma once

#include <cstdint>

namespace kvplug {

// n >= 0: the n-th later call of ShouldFailAllocation (counting from 0) returns true, once; then
// the countdown is off again. n < 0: off.
void SetAllocationFailureCountdown(int64_t n);

// The countdown left (-1 when off, including after it has fired).
int64_t AllocationFailureCountdown();

// True when this allocation is the one chosen to fail.
bool ShouldFailAllocation();

}  // namespace kvplug
