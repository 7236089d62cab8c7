// The family's merge rule on the GPU: split-KV partials of the engine's work items, and the public
// merge_states over caller-given partials. Max first, weights exp(lse_i - max) <= 1 (no overflow
// for any gap), an empty partial (lse = -inf) weighs 0, entropy through each partial's mean logit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "engine_params.h"

namespace kvplug::attn::cuda {
namespace {

constexpr float kNegInf = -INFINITY;
constexpr int kThreads = 128;

// Block-wide max and sum of per-thread values (kThreads = 4 warps).
__device__ float BlockMax(float v, float* scratch) {
  for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  v = fmaxf(fmaxf(scratch[0], scratch[1]), fmaxf(scratch[2], scratch[3]));
  __syncthreads();
  return v;
}
__device__ float BlockSum(float v, float* scratch) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffff, v, o);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  v = scratch[0] + scratch[1] + scratch[2] + scratch[3];
  __syncthreads();
  return v;
}

__device__ __forceinline__ float LoadF(const void* base, int32_t dtype, int64_t i) {
  if (dtype == 1) return __half2float(static_cast<const __half*>(base)[i]);
  if (dtype == 2) return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
  return static_cast<const float*>(base)[i];
}
__device__ __forceinline__ void StoreF(void* base, int32_t dtype, int64_t i, float v) {
  if (dtype == 1) static_cast<__half*>(base)[i] = __float2half_rn(v);
  else if (dtype == 2) static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(v);
  else static_cast<float*>(base)[i] = v;
}

__device__ __forceinline__ void StoreT(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void StoreT(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// Split partials of work items: entry e merges its slots' rows for one (token, head). The weights
// are computed once into shared memory; then each thread walks the splits for its columns with
// independent loads in flight.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) MergeSplitsKernel(const PagedAttentionParams p) {
  __shared__ float weight[kMaxMergeSplits];
  __shared__ int64_t rows[kMaxMergeSplits];
  __shared__ float scratch[4];
  const int e = blockIdx.x, head = blockIdx.y, tid = threadIdx.x;
  const int token = p.merge_tokens[e];
  const int s0 = p.merge_indptr[e];
  const int n = p.merge_indptr[e + 1] - s0;
  for (int i = tid; i < n; i += kThreads) rows[i] = static_cast<int64_t>(p.merge_slots[s0 + i]) * p.num_q_heads + head;
  __syncthreads();
  auto row_of = [&](int i) { return rows[i]; };
  float m = kNegInf;
  for (int i = tid; i < n; i += kThreads) m = fmaxf(m, p.partial_lse[row_of(i)]);
  m = BlockMax(m, scratch);
  const float safe = m == kNegInf ? 0.f : m;
  float sum = 0.f, mean = 0.f;
  for (int i = tid; i < n; i += kThreads) {
    const float w = __expf(p.partial_lse[row_of(i)] - safe);
    weight[i] = w;
    sum += w;
    if (p.partial_mean) mean += w * p.partial_mean[row_of(i)];
  }
  sum = BlockSum(sum, scratch);
  if (p.entropy) mean = BlockSum(mean, scratch);
  __syncthreads();
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  T* out = static_cast<T*>(p.o) + token * p.o_stride_token + head * p.o_stride_head;
  for (int d = tid; d < D; d += kThreads) {
    float acc = 0.f;
#pragma unroll 8
    for (int i = 0; i < n; ++i) acc += weight[i] * p.partial_o[row_of(i) * D + d];
    StoreT(out + d, acc * inv);
  }
  if (tid == 0) {
    const float lse = sum > 0.f ? safe + logf(sum) : kNegInf;
    if (p.lse) p.lse[token * p.lse_stride_token + head * p.lse_stride_head] = lse;
    if (p.entropy)
      p.entropy[token * p.entropy_stride_token + head * p.entropy_stride_head] =
          sum > 0.f ? fmaxf(0.f, lse - mean * inv) : 0.f;
  }
}

template <typename T>
cudaError_t LaunchMergeSplitsT(const PagedAttentionParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.num_merges), p.num_q_heads);
  switch (p.head_size) {
    case 64: MergeSplitsKernel<T, 64><<<grid, kThreads, 0, stream>>>(p); break;
    case 128: MergeSplitsKernel<T, 128><<<grid, kThreads, 0, stream>>>(p); break;
    case 256: MergeSplitsKernel<T, 256><<<grid, kThreads, 0, stream>>>(p); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

// Public merge_states: strided [S, T, H, D] partials, one CTA per (token, head).
__global__ void __launch_bounds__(kThreads) MergeStatesKernel(const MergeStatesParams p) {
  __shared__ float scratch[4];
  const int t = blockIdx.x, h = blockIdx.y, tid = threadIdx.x;
  const int S = p.num_partials;
  auto lse_of = [&](int s) { return p.partial_lse[s * p.pl_stride[0] + t * p.pl_stride[1] + h * p.pl_stride[2]]; };
  float m = kNegInf;
  for (int s = tid; s < S; s += kThreads) m = fmaxf(m, lse_of(s));
  m = BlockMax(m, scratch);
  const float safe = m == kNegInf ? 0.f : m;
  float sum = 0.f, mean = 0.f;
  for (int s = tid; s < S; s += kThreads) {
    const float l = lse_of(s);
    const float w = l == kNegInf ? 0.f : __expf(l - safe);
    sum += w;
    if (p.partial_entropy && w > 0.f)
      mean += w * (l - p.partial_entropy[s * p.pe_stride[0] + t * p.pe_stride[1] + h * p.pe_stride[2]]);
  }
  sum = BlockSum(sum, scratch);
  mean = BlockSum(mean, scratch);
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  for (int d = tid; d < p.head_size; d += kThreads) {
    float acc = 0.f;
    for (int s = 0; s < S; ++s) {
      const float l = lse_of(s);
      if (l == kNegInf) continue;
      acc += __expf(l - safe) *
             LoadF(p.partial_out, p.partial_out_dtype,
                   s * p.po_stride[0] + t * p.po_stride[1] + h * p.po_stride[2] + d * p.po_stride[3]);
    }
    StoreF(p.out, p.out_dtype, t * p.o_stride[0] + h * p.o_stride[1] + d * p.o_stride[2], acc * inv);
  }
  if (tid == 0) {
    const float lse = sum > 0.f ? safe + logf(sum) : kNegInf;
    if (p.lse) p.lse[t * p.l_stride[0] + h * p.l_stride[1]] = lse;
    if (p.entropy) p.entropy[t * p.e_stride[0] + h * p.e_stride[1]] = sum > 0.f ? fmaxf(0.f, lse - mean * inv) : 0.f;
  }
}

}  // namespace

int LaunchMergeSplits(const PagedAttentionParams& p, void* stream) {
  if (p.num_merges == 0) return cudaSuccess;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return p.dtype == ElemType::kBF16 ? LaunchMergeSplitsT<__nv_bfloat16>(p, s) : LaunchMergeSplitsT<__half>(p, s);
}

int LaunchMergeStates(const MergeStatesParams& p, void* stream) {
  if (p.num_tokens == 0 || p.num_heads == 0) return cudaSuccess;
  MergeStatesKernel<<<dim3(p.num_tokens, p.num_heads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return cudaGetLastError();
}


}  // namespace kvplug::attn::cuda
