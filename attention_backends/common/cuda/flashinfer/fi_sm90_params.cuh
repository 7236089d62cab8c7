// The parameter block FlashInfer 0.7.2.post1's sm_90 paged prefill templates read (the fields its
// generated "fa3" modules define; they are internal to FlashInfer, so this is pinned to the version
// .ci/setup.sh fetches). Only the FlashInfer translation units of this folder include it.
#pragma once
#include <flashinfer/attention/hopper/variants.cuh>
#include <flashinfer/cutlass_utils.cuh>

namespace kvplug::attn::cuda::fi {

template <class T>
struct Sm90PagedParams {
  using DTypeQ = flashinfer::cutlass_dtype_t<T>;
  using DTypeKV = DTypeQ;
  using DTypeO = DTypeQ;
  using IdType = int32_t;

  DTypeQ* q_ptr;
  DTypeKV* k_ptr;
  DTypeKV* v_ptr;
  DTypeO* o_ptr;
  float* lse_ptr;

  IdType* qo_tile_indices;
  IdType* qo_indptr;
  IdType* kv_indptr;
  IdType* kv_indices;
  IdType* qo_lens;
  IdType* kv_lens;
  IdType* head_indices;
  IdType* work_indptr;
  IdType* batch_indices;

  struct AdditionalParams {
    uint32_t* maybe_prefix_len_ptr;
    uint16_t* maybe_token_pos_in_items_ptr;
    uint16_t* maybe_max_item_len_ptr;
    float* maybe_scale_v;
    double logits_soft_cap;
    double sm_scale;
    double scale_v_scalar;
    int64_t token_pos_in_items_len;
  } additional_params;

  int64_t q_stride_n, k_stride_n, v_stride_n, o_stride_n;
  int64_t q_stride_h, k_stride_h, v_stride_h, o_stride_h;
  int64_t nnz_qo;
  int64_t k_page_stride, v_page_stride;

  int head_dim;
  int num_qo_heads;
  int num_kv_heads;
  int group_size;
  int page_size;
  int window_left;

  bool causal;
};

// Plain scaled softmax attention (no soft cap): kvplug's identity variant.
using Sm90Variant = flashinfer::DefaultAttention</*use_logits_soft_cap=*/false>;

}  // namespace kvplug::attn::cuda::fi
