// A build without CUDA: no devices, and every CUDA entry point reports that it is unavailable
// (callers check BuiltWithCuda() first; these keep the link whole).
#include "kvplug/kv_cache/cuda_kernels.h"
#include "kvplug/kv_cache/device.h"

namespace kvplug::kv {
bool BuiltWithCuda() { return false; }
int32_t CudaDeviceCount() { return 0; }
int32_t CudaSmCount(int32_t) { return 1; }

namespace cuda {
namespace {
constexpr int kUnavailable = 35;  // cudaErrorInsufficientDriver's value: "no CUDA here"
}  // namespace
int LaunchKvWrite(const KvWriteParams&, void*) { return kUnavailable; }
int DeviceAlloc(void**, int64_t, int32_t) { return kUnavailable; }
void DeviceFree(void*) {}
int PinnedAlloc(void**, int64_t) { return kUnavailable; }
void PinnedFree(void*) {}
int MemcpyAsync(void*, const void*, int64_t, void*) { return kUnavailable; }
int Memcpy2DAsync(void*, int64_t, const void*, int64_t, int64_t, int64_t, void*) { return kUnavailable; }
int StreamSynchronize(void*) { return kUnavailable; }
const char* ErrorString(int) { return "this library was built without CUDA"; }
}  // namespace cuda
}  // namespace kvplug::kv
