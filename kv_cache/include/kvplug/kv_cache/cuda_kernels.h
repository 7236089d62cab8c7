// Launch interface of the KV cache's CUDA kernels. Plain C++17, no CUDA types: host code includes
// it without nvcc. Returns cudaError_t values (0 = success).
#pragma once

#include <cstdint>

#include "kvplug/kv_cache/paged_kv_view.h"

namespace kvplug::kv::cuda {

// Write new K/V by slot mapping (vLLM's reshape_and_cache), converting float32/float16/bfloat16
// input (kvplug::DType values 0/1/2) to the page dtype (1 = float16, 2 = bfloat16, 3 = fp8 e4m3,
// stored as value * inv_scale, saturated to +-448).
struct KvWriteParams {
  int32_t page_dtype = 2;
  int32_t input_dtype = 0;
  const void* key = nullptr;
  const void* value = nullptr;
  int64_t k_stride_token = 0, k_stride_head = 0;
  int64_t v_stride_token = 0, v_stride_head = 0;
  PagedKvView pages;
  const int64_t* slot_mapping = nullptr;  // device memory
  int32_t num_tokens = 0;
  int32_t num_kv_heads = 0;
  int32_t head_size = 0;
  int32_t block_size = 0;
  int64_t num_slots = 0;
  float k_inv_scale = 1.0f;
  float v_inv_scale = 1.0f;    // num_blocks * block_size: larger slots are skipped, never written
  bool vectorized = false;  // same dtype, 16-byte aligned rows: move 16-byte vectors
};
int LaunchKvWrite(const KvWriteParams& params, void* stream);

// Memory helpers, so host code needs no CUDA headers.
int DeviceAlloc(void** ptr, int64_t bytes, int32_t device);   // zero-filled
void DeviceFree(void* ptr);
int PinnedAlloc(void** ptr, int64_t bytes);                    // zero-filled host memory
void PinnedFree(void* ptr);
int MemcpyAsync(void* dst, const void* src, int64_t bytes, void* stream);  // cudaMemcpyDefault
int Memcpy2DAsync(void* dst, int64_t dpitch, const void* src, int64_t spitch, int64_t width,
                  int64_t height, void* stream);
int StreamSynchronize(void* stream);
const char* ErrorString(int error);

}  // namespace kvplug::kv::cuda
