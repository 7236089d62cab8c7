// `kv_shift`: KV shifting attention (arXiv 2411.19574) as a variant of the kernel family. Only the
// write differs from dense: per KV head h,
//   K^_i = a1[h] K_i + a2[h] K_{i-1},   V^_i = b1[h] V_i + b2[h] V_{i-1},   K_{-1} = V_{-1} = 0
// at a sequence's position 0, fused into the paged write (kv_write.h's previous-token mix), then,
// optionally, RoPE on K^_i at position i (after the mix, as the paper's model: the shift acts on
// pre-RoPE keys). The cache holds K^ (rotated when RoPE is on) and V^; attention is the family's
// plain causal variant over them (CausalPlanner + RunVariant, as dense).
//
// Config (KvShiftConfig, per attention instance: create one instance per layer for per-layer
// coefficients): alpha_k = [a1[0], a2[0], a1[1], a2[1], ...], alpha_v likewise with b1, b2,
// [num_kv_heads * 2] each, any finite values. rope_theta > 0 turns the fused RoPE on (rotary_dim
// leading dims of each head, 0 = head_size; rope_style NeoX halves or GPT-J pairs; frequencies
// theta^(-2j / rotary_dim), cos/sin in double). The caller hands PRE-RoPE k (and v) to write_kv,
// and must rotate its queries itself (same theta, rotary_dim, style, at the query's position)
// before run: kvplug never rotates queries.
//
// State: per layer and sequence, the RAW (unmixed, unrotated) K and V of the sequence's last
// written token, fp32 [2][num_kv_heads][head_size] (PrevTokenStateBytes) in the cache's state slot
// kvp_batch.state_slots[b]. The cache must be created with num_state_slots > 0 and
// state_bytes_per_layer >= kvp_attention_state_bytes(); every write needs kvp_batch.state_slots.
// (The paper's listing keeps the shifted K/V as state: its first decoded token mixes the wrong
// vector; kvplug keeps the raw ones, so prefill(n) then decode(m) equals prefill(n + m) bitwise.)
//
// Semantics the engine relies on:
//  (a) chunked prefill: the state carries across chunks (a chunk's first token reads its
//      predecessor from the state, later tokens from the step's input); chunks may end anywhere.
//  (b) decode: one token per step, predecessor from the state.
//  (c) fork: the child needs the parent's state: kvp_kv_cache_copy_state(parent slot, child slot)
//      after kvp_block_manager_fork (blocks are shared/copied as usual).
//  (d) swap out/in: state slots stay on the device (only pages move); nothing to do.
//  (e) recompute after preemption: the sequence restarts at position 0, where the state is
//      ignored (K_{-1} = 0), so a stale slot is harmless.
//  (f) prefix-cache hits: the cache holds mixed K^ only, and inverting the mix (K_{i-1} =
//      (K^_i - a1 K_i) / a2 ...) is an unstable recursion, so kvplug RECOMPUTES the raw K/V of
//      the last cached token: every token of a write updates the recurrence, including tokens
//      with slot_mapping -1, which are not stored. After a hit of c > 0 cached tokens the engine
//      runs token c-1 once more with slot -1, either alone (q_len 1, seq_len c) or as the first
//      token of the sequence's first chunk (q_len n+1, seq_len c+n, slots [-1, s_c, ...]); its
//      K/V projections (and, in a real model, the whole forward pass below each layer) are
//      recomputed, its pages are left as they are, its output may be discarded. The engine then
//      continues at c. (Storing the raw K/V per full block instead would cost state per block.)
//  (g) the shift never crosses sequences in a packed batch: a sequence's first token in a step
//      reads only its own state slot (or zero at position 0).
// A sequence that starts at position p > 0 without (f) or (c) reads whatever its state slot
// holds: kvplug cannot tell, the engine must keep to the rules above.
#pragma once

#include "absl/status/status.h"
#include "kvplug/attention/backend.h"

namespace kvplug::attn::kv_shift {

BackendInfo Info();

// Checks a KvShiftConfig against the heads: lengths num_kv_heads * 2, finite coefficients, RoPE
// fields (the ABI checks what it can without the heads at parse time; this is the full check).
absl::Status ValidateConfig(const KvShiftConfig& config, int32_t num_kv_heads, int32_t head_size);

}  // namespace kvplug::attn::kv_shift
