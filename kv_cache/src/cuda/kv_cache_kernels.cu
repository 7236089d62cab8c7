// CUDA side of the KV cache: the slot-mapping write (vLLM's reshape_and_cache) and thin wrappers
// over the runtime's memory calls, so that host code needs no CUDA headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstring>

#include "kvplug/kv_cache/cuda_kernels.h"

namespace kvplug::kv::cuda {
namespace {

__device__ __forceinline__ float Load(const void* base, int dtype, int64_t i) {
  switch (dtype) {
    case 0: return static_cast<const float*>(base)[i];
    case 1: return __half2float(static_cast<const __half*>(base)[i]);
    default: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
  }
}

__device__ __forceinline__ void Store(void* base, int dtype, int64_t i, float v) {
  if (dtype == 3) static_cast<__nv_fp8_e4m3*>(base)[i] = __nv_fp8_e4m3(v);  // round to nearest, saturate
  else if (dtype == 1) static_cast<__half*>(base)[i] = __float2half_rn(v);
  else static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(v);
}

// One CTA per token; threads stride over (head, d). Same-dtype rows move as 16-byte vectors.
__global__ void KvWriteKernel(const KvWriteParams p) {
  const int token = blockIdx.x;
  const int64_t slot = p.slot_mapping[token];
  if (slot < 0 || slot >= p.num_slots) return;  // device-side slots cannot be checked on the host
  const int64_t block = slot / p.block_size, pos = slot % p.block_size;
  const int64_t dst_row = block * p.pages.stride_block + pos * p.pages.stride_pos;
  if (p.vectorized) {
    const int chunks = p.head_size / 8;
    for (int i = threadIdx.x; i < p.num_kv_heads * chunks; i += blockDim.x) {
      const int h = i / chunks, c = i % chunks;
      const int4* ks = reinterpret_cast<const int4*>(static_cast<const uint16_t*>(p.key) + token * p.k_stride_token + h * p.k_stride_head) + c;
      const int4* vs = reinterpret_cast<const int4*>(static_cast<const uint16_t*>(p.value) + token * p.v_stride_token + h * p.v_stride_head) + c;
      const int64_t dst = dst_row + h * p.pages.stride_head + c * 8;
      *reinterpret_cast<int4*>(static_cast<uint16_t*>(p.pages.k) + dst) = *ks;
      *reinterpret_cast<int4*>(static_cast<uint16_t*>(p.pages.v) + dst) = *vs;
    }
    return;
  }
  for (int i = threadIdx.x; i < p.num_kv_heads * p.head_size; i += blockDim.x) {
    const int h = i / p.head_size, d = i % p.head_size;
    const int64_t dst = dst_row + h * p.pages.stride_head + d;
    const float ks = p.page_dtype == 3 ? p.k_inv_scale : 1.0f, vs = p.page_dtype == 3 ? p.v_inv_scale : 1.0f;
    Store(p.pages.k, p.page_dtype, dst, ks * Load(p.key, p.input_dtype, token * p.k_stride_token + h * p.k_stride_head + d));
    Store(p.pages.v, p.page_dtype, dst, vs * Load(p.value, p.input_dtype, token * p.v_stride_token + h * p.v_stride_head + d));
  }
}

}  // namespace

int LaunchKvWrite(const KvWriteParams& p, void* stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  KvWriteKernel<<<p.num_tokens, 128, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return cudaGetLastError();
}

int DeviceAlloc(void** ptr, int64_t bytes, int32_t device) {
  int previous = 0;
  cudaGetDevice(&previous);
  cudaError_t e = cudaSetDevice(device);
  if (e == cudaSuccess) e = cudaMalloc(ptr, static_cast<size_t>(bytes));
  if (e == cudaSuccess) e = cudaMemset(*ptr, 0, static_cast<size_t>(bytes));
  cudaSetDevice(previous);
  if (e != cudaSuccess) cudaGetLastError();  // clear the sticky-free error state for the caller
  return e;
}

void DeviceFree(void* ptr) {
  if (ptr) cudaFree(ptr);
}

int PinnedAlloc(void** ptr, int64_t bytes) {
  cudaError_t e = cudaMallocHost(ptr, static_cast<size_t>(bytes));
  if (e == cudaSuccess) memset(*ptr, 0, static_cast<size_t>(bytes));
  else cudaGetLastError();
  return e;
}

void PinnedFree(void* ptr) {
  if (ptr) cudaFreeHost(ptr);
}

int MemcpyAsync(void* dst, const void* src, int64_t bytes, void* stream) {
  return cudaMemcpyAsync(dst, src, static_cast<size_t>(bytes), cudaMemcpyDefault,
                         static_cast<cudaStream_t>(stream));
}

int Memcpy2DAsync(void* dst, int64_t dpitch, const void* src, int64_t spitch, int64_t width,
                  int64_t height, void* stream) {
  return cudaMemcpy2DAsync(dst, static_cast<size_t>(dpitch), src, static_cast<size_t>(spitch),
                           static_cast<size_t>(width), static_cast<size_t>(height), cudaMemcpyDefault,
                           static_cast<cudaStream_t>(stream));
}

int StreamSynchronize(void* stream) { return cudaStreamSynchronize(static_cast<cudaStream_t>(stream)); }

const char* ErrorString(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

}  // namespace kvplug::kv::cuda
