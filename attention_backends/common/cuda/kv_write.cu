// The previous-token mix write on the GPU: one CTA per token writes K^ = c K + p K_prev (V alike)
// for every KV head, reading the predecessor from the step's input or the sequence's state; a
// second kernel, ordered after it on the stream, stores each sequence's last raw K/V as its state
// (slot -1 tokens included). Optionally the mixed key is rotated (RoPE) at its position.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include "engine_params.h"

namespace kvplug::attn::cuda {
namespace {

constexpr int kMaxRopeHalf = 256;  // rotary_dim <= head_size <= 512 (host-checked in LaunchMixWrite)

__device__ __forceinline__ float LoadIn(const void* base, int32_t dtype, int64_t i) {
  if (dtype == 1) return __half2float(static_cast<const __half*>(base)[i]);
  if (dtype == 2) return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
  return static_cast<const float*>(base)[i];
}
__device__ __forceinline__ void StorePage(void* base, int32_t dtype, int64_t i, float v, float inv_scale) {
  if (dtype == 1) static_cast<__half*>(base)[i] = __float2half_rn(v);
  else if (dtype == 2) static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(v);
  else if (dtype == 3) static_cast<__nv_fp8_e4m3*>(base)[i] = __nv_fp8_e4m3(v * inv_scale);
  else static_cast<float*>(base)[i] = v;
}

__global__ void MixWriteKernel(const MixWriteParams p) {
  const int t = blockIdx.x;
  const int64_t slot = p.slot_mapping[t];
  const int64_t num_slots = int64_t{p.pages.num_blocks} * p.pages.block_size;
  // slot -1: not stored (its raw K/V still feed the next token from the input, and the state if it
  // is its sequence's last token: MixStateKernel stores it whatever its slot).
  if (slot < 0 || slot >= num_slots) return;  // host-checked; never write outside the pages
  const int b = p.token_seq[t];
  const int q0 = p.qo_indptr[b];
  const int pos = p.seq_lens[b] - (p.qo_indptr[b + 1] - q0) + (t - q0);
  const int H = p.pages.num_kv_heads, D = p.pages.head_size;
  const float* state = reinterpret_cast<const float*>(p.state + p.state_slots[b] * p.state_stride);
  const int64_t block = slot / p.pages.block_size, in_page = slot % p.pages.block_size;
  // The mixed value of element d of head h (kv 0: K, 1: V) of this token.
  auto mixed = [&](int kv, int h, int d) -> float {
    const void* in = kv == 0 ? p.key : p.value;
    const int64_t st = kv == 0 ? p.k_stride_token : p.v_stride_token;
    const int64_t sh = kv == 0 ? p.k_stride_head : p.v_stride_head;
    const float cur = LoadIn(in, p.input_dtype, t * st + h * sh + d);
    float prev = 0.f;
    if (t > q0) prev = LoadIn(in, p.input_dtype, (t - 1) * st + h * sh + d);
    else if (pos > 0) prev = state[(kv * H + h) * D + d];
    const float c = p.coef[(2 * kv) * H + h], w = p.coef[(2 * kv + 1) * H + h];
    return c * cur + w * prev;
  };
  const bool rope = p.rope_theta > 0.f;
  // The token's rotation angles, once per frequency instead of once per (head, element): cos/sin in
  // double, as the CPU write (--use_fast_math would make the float functions inexact at large angles).
  __shared__ float rope_cos[kMaxRopeHalf], rope_sin[kMaxRopeHalf];
  const int half = p.rotary_dim / 2;
  if (rope) {
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
      double sn, cs;
      sincos(double(pos) * pow(double(p.rope_theta), -2.0 * j / p.rotary_dim), &sn, &cs);
      rope_cos[j] = static_cast<float>(cs);
      rope_sin[j] = static_cast<float>(sn);
    }
    __syncthreads();
  }
  for (int i = threadIdx.x; i < 2 * H * D; i += blockDim.x) {
    const int kv = i / (H * D), h = (i / D) % H, d = i % D;
    float val = mixed(kv, h, d);
    if (rope && kv == 0 && d < p.rotary_dim) {
      // RoPE after the mix (keys only).
      const bool first = p.rope_gptj ? (d % 2 == 0) : (d < half);
      const int j = p.rope_gptj ? d / 2 : (first ? d : d - half);
      const int partner = p.rope_gptj ? (first ? d + 1 : d - 1) : (first ? d + half : d - half);
      const float other = mixed(0, h, partner);
      const float c = rope_cos[j], s = rope_sin[j];
      val = first ? val * c - other * s : val * c + other * s;
    }
    void* page = kv == 0 ? p.pages.k : p.pages.v;
    StorePage(page, p.pages.dtype, block * p.pages.stride_block + in_page * p.pages.stride_pos + h * p.pages.stride_head + d,
              val, kv == 0 ? p.k_inv_scale : p.v_inv_scale);
  }
}

__global__ void MixStateKernel(const MixWriteParams p) {
  const int b = blockIdx.x;
  const int last = p.qo_indptr[b + 1] - 1;
  if (last < p.qo_indptr[b]) return;  // no token of this sequence in the step
  const int H = p.pages.num_kv_heads, D = p.pages.head_size;
  float* state = reinterpret_cast<float*>(p.state + p.state_slots[b] * p.state_stride);
  for (int i = threadIdx.x; i < 2 * H * D; i += blockDim.x) {
    const int kv = i / (H * D), h = (i / D) % H, d = i % D;
    state[i] = kv == 0 ? LoadIn(p.key, p.input_dtype, last * p.k_stride_token + h * p.k_stride_head + d)
                       : LoadIn(p.value, p.input_dtype, last * p.v_stride_token + h * p.v_stride_head + d);
  }
}

}  // namespace

int LaunchMixWrite(const MixWriteParams& p, void* stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  if (p.rope_theta > 0.f && p.rotary_dim / 2 > kMaxRopeHalf) return cudaErrorInvalidValue;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  MixWriteKernel<<<p.num_tokens, 256, 0, s>>>(p);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  MixStateKernel<<<p.num_seqs, 256, 0, s>>>(p);
  return cudaGetLastError();
}

}  // namespace kvplug::attn::cuda
