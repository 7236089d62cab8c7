#include "kvplug/kv_cache/device.h"

namespace kvplug::kv {
bool BuiltWithCuda() { return false; }
int32_t CudaDeviceCount() { return 0; }
}  // namespace kvplug::kv
