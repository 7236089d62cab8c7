// Launch interface of the dense paged-attention CUDA kernels. Plain C++17 and no CUDA types, so the
// C++20 host code includes it without nvcc; the kernels live in paged_attention.cu.
#pragma once

#include <cstdint>

namespace kvplug::attn::cuda {

enum class ElemType : int32_t { kF16 = 0, kBF16 = 1 };

// Everything one launch needs. Pointers are device memory. Strides are in elements.
struct PagedAttentionParams {
  ElemType dtype = ElemType::kBF16;  // of query, out and the K/V pages
  const void* q = nullptr;           // [num_tokens, num_q_heads, head_size]
  void* o = nullptr;                 // same shape
  float* lse = nullptr;              // optional [num_tokens, num_q_heads], natural log
  int64_t q_stride_token = 0, q_stride_head = 0;
  int64_t o_stride_token = 0, o_stride_head = 0;
  int64_t lse_stride_token = 0;
  const void* k_pages = nullptr;     // element (block, pos, head, d) at block*sb + pos*sp + head*sh + d
  const void* v_pages = nullptr;
  int64_t kv_stride_block = 0, kv_stride_pos = 0, kv_stride_head = 0;
  const int32_t* qo_indptr = nullptr;   // [num_seqs + 1]
  const int32_t* kv_lens = nullptr;     // [num_seqs]
  const int32_t* kv_indptr = nullptr;   // [num_seqs + 1]
  const int32_t* kv_indices = nullptr;  // page ids
  int32_t num_seqs = 0;
  int32_t max_q_len = 0;
  int32_t max_kv_len = 0;
  int32_t num_q_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_size = 0;
  int32_t block_size = 0;
  int32_t block_shift = -1;  // log2(block_size) when it is a power of two, else -1
  float sm_scale = 0.0f;
  int32_t window_left = -1;
  // fp8 (e4m3) pages: real values are stored values times these scales.
  bool kv_fp8 = false;
  float k_scale = 1.0f;
  float v_scale = 1.0f;
  // Split-KV (flash-decoding): num_splits > 1 needs partial buffers of
  // [num_splits, num_tokens, num_q_heads, head_size] and [num_splits, num_tokens, num_q_heads] floats.
  int32_t num_splits = 1;
  int32_t num_tokens = 0;
  float* partial_o = nullptr;
  float* partial_lse = nullptr;
};

// Picks the kernel variant (decode- or prefill-shaped tiles) and launches it, plus the merge of the
// splits. Returns a cudaError_t value (0 = success).
int LaunchPagedAttention(const PagedAttentionParams& params, void* stream);

// How many splits to use so that a small batch of long sequences still fills the GPU, given how
// many partial rows (token x split) the workspace holds.
int32_t ChooseNumSplits(const PagedAttentionParams& params, int32_t num_sms, int64_t workspace_rows);

int32_t DeviceSmCount(int32_t device);

}  // namespace kvplug::attn::cuda
