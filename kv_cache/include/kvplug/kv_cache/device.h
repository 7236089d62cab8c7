// What the build and the machine offer in devices. Without CUDA in the build these report none.
#pragma once

#include <cstdint>

namespace kvplug::kv {

bool BuiltWithCuda();
// Number of visible CUDA devices; 0 without CUDA, without a driver or without a GPU.
int32_t CudaDeviceCount();
// Multiprocessors of CUDA device `device` (1 when unknown).
int32_t CudaSmCount(int32_t device);

}  // namespace kvplug::kv
