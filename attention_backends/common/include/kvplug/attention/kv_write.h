// The family's paged write hook: this step's K/V go to their slots either unchanged (dense) or
// through a previous-token mix, K^_i = k_cur[h] K_i + k_prev[h] K_{i-1} and V^_i alike with
// K_{-1} = V_{-1} = 0 (KV shifting attention). The write knows each token's sequence and
// position; the raw (unmixed) K and V of each sequence's last written token are kept in its state
// slot, so chunked prefill, decode and forks (state copied with the blocks) continue the recurrence
// exactly. A token whose predecessor is in the same step reads it from the step's input.
// Every token of the step updates the recurrence, including tokens with slot_mapping -1: they are
// not written to the pages, but a sequence's last token (whatever its slot) becomes its state, and
// a token with slot -1 is the predecessor of the next token of the step as any other (this is how
// a caller refills the state after a prefix-cache hit: see kv_shift.h).
// Optionally the mixed key is rotated (RoPE) at its position after the mix, inside the same write;
// values are never rotated.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "kvplug/attention/backend.h"

namespace kvplug::attn {

struct PrevTokenMix {
  // [num_kv_heads] each, on the engine's device (host memory for CPU caches).
  const float* k_cur = nullptr;
  const float* k_prev = nullptr;
  const float* v_cur = nullptr;
  const float* v_prev = nullptr;
  // Optional rotary embedding of K^_i at position i, applied after the mix: rope_theta > 0 turns it
  // on; rotary_dim (even, in [2, head_size]) leading dims of each head are rotated, the rest kept;
  // frequencies theta^(-2j / rotary_dim), cos/sin of position * frequency evaluated in double.
  // kNeoX rotates pairs (j, j + rotary_dim / 2) (Llama, HF rotate_half), kGptJ pairs (2j, 2j + 1).
  float rope_theta = 0.0f;
  int32_t rotary_dim = 0;
  RopeStyle rope_style = RopeStyle::kNeoX;
};

// State the mix keeps per layer and sequence: the raw K and V of its last token, [2][Hkv][D] fp32.
constexpr int64_t PrevTokenStateBytes(int32_t num_kv_heads, int32_t head_size) {
  return int64_t{2} * num_kv_heads * head_size * 4;
}

// `mix` null: the plain write (vLLM's reshape_and_cache). With a mix the plan must carry state
// slots and the cache's state must hold PrevTokenStateBytes per layer; every slot is checked first.
absl::Status WritePagedKv(const WriteArgs& args, const PrevTokenMix* mix);

// CUDA part (kv_write.cu via engine_cuda.cc); absent without CUDA.
absl::Status WritePagedKvMixCuda(const WriteArgs& args, const PrevTokenMix& mix);

}  // namespace kvplug::attn
