// The vocabulary of the paged-attention kernel family, shared by the CPU engine, the CUDA engine and
// every backend (plain C++17 PODs so that .cu files include it too).
//
// A backend is a *variant*: it says WHAT is computed:
//  - key sets: which keys each query token sees, as query spans and key segments built by the
//    backend's planner once per batch step (dense: one span per sequence with one causal segment;
//    Star phase 1: a span per context block with an anchor segment and its own segment; Attamba: a
//    compressed segment with a position map plus a window segment);
//  - the mask by positions inside a segment (lag bounds, see KeySegment);
//  - the logit transform (scale, a per-(head, position) scale table, soft cap);
//  - the softmax accumulators and outputs (out, lse, and optionally the attention entropy).
// An engine (one per device) decides HOW: tiles, splits across CTAs, merges. Split-KV is just more
// segments of one span, merged with the same merge_states rule as shards are.
#pragma once

#include <cstdint>

namespace kvplug::attn {

constexpr int32_t kUnboundedLag = 0x7fffffff;

// A run of keys of one sequence's page list. Key index j in [key_begin, key_end) lives at page
// kv_indices[page_offset + j / block_size], row j % block_size. Its position is pos_base + j, or,
// with a position map (pos_map >= 0), pos_map_data[pos_map + j - key_begin] (maps must be
// non-decreasing). A query at position q sees key position k iff lag_min <= q - k <= lag_max:
// causal is lag_min = 0; a window of w keys back is lag_max = w.
struct KeySegment {
  int32_t page_offset = 0;
  int32_t key_begin = 0;
  int32_t key_end = 0;
  int32_t pos_base = 0;
  int32_t pos_map = -1;
  int32_t lag_min = 0;
  int32_t lag_max = kUnboundedLag;
};

// Query tokens [token_begin, token_end) of sequence `seq` (rows of the batch's query tensor), at
// positions pos_begin, pos_begin + 1, ...; they see segments [segment_begin, segment_end).
struct QuerySpan {
  int32_t seq = 0;
  int32_t token_begin = 0;
  int32_t token_end = 0;
  int32_t pos_begin = 0;
  int32_t segment_begin = 0;
  int32_t segment_end = 0;
};

// The logit transform and the accumulators. s = q.k * sm_scale * scale(h, p), then with a soft cap
// s = cap * tanh(s / cap). scale(h, p) = scale_table[h * scale_table_len + min(p, len - 1)] when a
// table is given (entropy-guided attention's 1 / temperature), else 1.
struct VariantParams {
  float sm_scale = 1.0f;
  float logits_soft_cap = 0.0f;        // 0: off
  const float* scale_table = nullptr;  // [num_q_heads, scale_table_len], on the engine's device
  int32_t scale_table_len = 0;
};

}  // namespace kvplug::attn
