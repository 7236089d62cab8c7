// Launch interface of the CUDA engine of the kernel family. Plain C++17 with no CUDA types, so the
// C++20 host code includes it without nvcc; the kernels live in paged_attention_kernel.cuh and are
// instantiated one translation unit per (dtype, head size, variant) under instances/.
#pragma once

#include <cstdint>

#include "kvplug/attention/variant.h"
#include "kvplug/kv_cache/paged_kv_view.h"

namespace kvplug::attn::cuda {

enum class ElemType : int32_t { kF16 = 0, kBF16 = 1 };

// Compile-time variants of the kernel: kIdentity has only a scalar scale and contiguous key
// positions (dense, the fast path); kGeneral adds the per-(head, position) scale table, the soft
// cap, position maps and the entropy accumulator.
enum class KernelVariant : int32_t { kIdentity = 0, kGeneral = 1 };

constexpr int kMaxSegmentsPerItem = 4;
constexpr int kMaxMergeSplits = 256;

// One CTA's work (per KV head): rows [row0, row0 + tile) of a span's packed rows (row = token *
// group + head in group), over its own list of key segments. partial >= 0: the item is one split of
// its rows' keys and writes normalized partials to slots partial + (token - token_begin).
struct WorkItem {
  int32_t token_begin = 0;
  int32_t num_tokens = 0;
  int32_t pos_begin = 0;
  int32_t row0 = 0;
  int32_t seg_begin = 0;
  int32_t seg_end = 0;
  int32_t partial = -1;
  int32_t split = 0;  // which split of its rows this item is (0 when unsplit)
};

struct PagedAttentionParams {
  ElemType dtype = ElemType::kBF16;  // of query, out and the K/V pages
  const void* q = nullptr;           // [num_tokens, num_q_heads, head_size]
  void* o = nullptr;                 // same shape
  float* lse = nullptr;              // optional [num_tokens, num_q_heads], natural log
  float* entropy = nullptr;          // optional [num_tokens, num_q_heads], nats (kGeneral only)
  int64_t q_stride_token = 0, q_stride_head = 0;
  int64_t o_stride_token = 0, o_stride_head = 0;
  int64_t lse_stride_token = 0, lse_stride_head = 0;
  int64_t entropy_stride_token = 0, entropy_stride_head = 0;
  kv::PagedKvView pages;
  const int32_t* kv_indices = nullptr;  // page ids (the plan's CSR indices)
  const WorkItem* items = nullptr;      // this launch's items
  int32_t num_items = 0;
  int32_t heads_fastest = 0;            // CTA order: KV heads of one item adjacent, or items of one head
  int32_t round_size = 0;               // > 0: rounds of this many items, the heads inside a round
  const KeySegment* segments = nullptr;
  const int32_t* pos_map = nullptr;
  int32_t num_q_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_size = 0;
  int32_t block_size = 0;
  int32_t block_shift = -1;  // log2(block_size) when it is a power of two, else -1
  VariantParams variant;
  // fp8 (e4m3) pages: real values are stored values times these scales.
  bool kv_fp8 = false;
  float k_scale = 1.0f;
  float v_scale = 1.0f;
  // Split partials: [slot][num_q_heads][head_size] floats, [slot][num_q_heads] lse and mean logit.
  float* partial_o = nullptr;
  float* partial_lse = nullptr;
  float* partial_mean = nullptr;
  // Merge of split partials: entry e merges slots merge_slots[merge_indptr[e] .. [e + 1]) of token
  // merge_tokens[e].
  const int32_t* merge_tokens = nullptr;
  const int32_t* merge_indptr = nullptr;
  const int32_t* merge_slots = nullptr;
  int32_t num_merges = 0;
  // Decode tile pipeline (KVP_CUDA_DECODE): 0 CTA-wide key tiles, 1 warp-private tiles, 2
  // warp-private tiles with K and V in separate async groups over one stage, 3 (default) 1 for
  // 16-bit pages and 2 for fp8 pages.
  int32_t decode_kernel = 3;
};

// Launches `items` (all of one tile shape: decode = true for 16-row tiles) of one variant.
// Returns a cudaError_t value (0 = success).
int LaunchPagedAttention(const PagedAttentionParams& params, KernelVariant variant, bool decode, void* stream);
// Merges split partials into out / lse / entropy (params.num_merges entries).
int LaunchMergeSplits(const PagedAttentionParams& params, void* stream);

// Tile rows of each shape for a head size (the planner cuts spans into items of these).
constexpr int DecodeTileRows() { return 16; }
constexpr int PrefillTileRows(int head_size) { return head_size == 256 ? 64 : 128; }
constexpr int KeyTile() { return 64; }

// The public merge_states on the GPU: strided partials, any float dtypes (codes: 0 f32, 1 f16,
// 2 bf16 as kvplug::DType).
struct MergeStatesParams {
  int32_t num_partials = 0, num_tokens = 0, num_heads = 0, head_size = 0;
  const void* partial_out = nullptr;
  int32_t partial_out_dtype = 0;
  int64_t po_stride[4] = {0, 0, 0, 0};
  const float* partial_lse = nullptr;
  int64_t pl_stride[3] = {0, 0, 0};
  const float* partial_entropy = nullptr;
  int64_t pe_stride[3] = {0, 0, 0};
  void* out = nullptr;
  int32_t out_dtype = 0;
  int64_t o_stride[3] = {0, 0, 0};
  float* lse = nullptr;
  int64_t l_stride[2] = {0, 0};
  float* entropy = nullptr;
  int64_t e_stride[2] = {0, 0};
};
int LaunchMergeStates(const MergeStatesParams& params, void* stream);

// The previous-token mix write (kv_write.h): input K/V (float32/float16/bfloat16 as kvplug::DType
// codes 0/1/2) into pages of float16/bfloat16/fp8 (codes 1/2/3; fp8 stored as value * inv_scale).
struct MixWriteParams {
  const void* key = nullptr;
  const void* value = nullptr;
  int32_t input_dtype = 0;
  int64_t k_stride_token = 0, k_stride_head = 0, v_stride_token = 0, v_stride_head = 0;
  kv::PagedKvView pages;
  float k_inv_scale = 1.0f, v_inv_scale = 1.0f;
  const int64_t* slot_mapping = nullptr;  // device, [num_tokens]
  const int32_t* token_seq = nullptr;     // device, [num_tokens]
  const int32_t* qo_indptr = nullptr;     // device, [num_seqs + 1]
  const int32_t* seq_lens = nullptr;      // device, [num_seqs]
  const int32_t* state_slots = nullptr;   // device, [num_seqs]
  uint8_t* state = nullptr;               // this layer's slot 0; slot s at state + s * state_stride
  int64_t state_stride = 0;
  const float* coef = nullptr;            // device, [4][num_kv_heads]: k_cur, k_prev, v_cur, v_prev
  int32_t num_tokens = 0, num_seqs = 0;
  // Optional RoPE of the mixed key (kv_write.h's PrevTokenMix): rope_theta > 0 turns it on.
  float rope_theta = 0.0f;
  int32_t rotary_dim = 0;
  int32_t rope_gptj = 0;  // 0: NeoX halves, 1: GPT-J interleaved pairs
};
int LaunchMixWrite(const MixWriteParams& params, void* stream);


}  // namespace kvplug::attn::cuda
