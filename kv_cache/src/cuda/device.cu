#include <cuda_runtime.h>

#include "kvplug/kv_cache/device.h"

namespace kvplug::kv {

bool BuiltWithCuda() { return true; }

int32_t CudaDeviceCount() {
  int count = 0;
  // No driver or no GPU is an answer (zero devices), not an error for the caller.
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

int32_t CudaSmCount(int32_t device) {
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    cudaGetLastError();
    return 1;
  }
  return n;
}

}  // namespace kvplug::kv
