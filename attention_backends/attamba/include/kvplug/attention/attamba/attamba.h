// `attamba`: Attamba (arXiv 2411.17685) as a variant of the kernel family. K = x + SSM_k(x) and
// V = x + SSM_v(x) come from chunk-local state-space models; attention runs over the K/V of chunk
// ends plus a recent window, so the cache keeps one K/V per chunk (plus the window).
//
// The math (the paper's). Layer l's chunk ends are position 0 (a one-token first chunk: the
// attention sink) and b_j = j*P + P - 1 - off_l, off_l = min(P - 1, l * (P / num_layers)) ("cyclic",
// the reference's default) or 0 ("uniform"). A query at position t sees key k when
//   (k < t and k is a chunk end)  or  (t - L <= k <= t),         P = chunk_size, L = window.
// The SSMs run within each chunk: their state (conv and scan) resets at every chunk start, so a chunk
// end's K/V summarises its own chunk. (The released training code passes each token's offset inside
// its chunk as mamba_ssm's seq_idx, which that kernel reads as a sequence id: its chunk ends do not
// summarise their chunk. kvplug follows the paper.)
//
// Division of work with the engine (as engines split Mamba layers): the engine keeps its GEMMs
// (in_proj and out_proj of both SSMs, Q and O) and RoPE; kvplug runs the chunk-local conv + scan +
// gated RMSNorm with per-sequence state (RunSsm / kvp_attention_ssm), stores chunk-end K/V and the
// window (WriteKv), and attends (Run).
//
// The cache of one sequence, one page list shared by every layer (CacheLayout):
//   [compressed pages][window pages]
//  - compressed row j of layer l holds its j-th chunk end (rows differ per layer by at most one; the
//    list has pages for the most any layer needs). Rows never move: full compressed pages are
//    immutable once every layer's rows in them are written (stable_rows) and can be prefix-cached.
//  - window pages are the ordinary token-stream pages j*bs.. of positions [window_first_page * bs,
//    n): the pages the window of this step's queries still reaches (from position p0 - L on). Older
//    pages are dropped from the list (freed) by the engine: the memory is ~ n/P + L + bs rows.
//  kvp_batch.seq_lens[b] is CacheLayout::seq_len (the rows the list covers) and
//  kvp_batch.query_pos_starts[b] is p0 (required). slot_mapping[t] is the token's window slot (as
//  dense's), or -1 to store nothing in the window (a token recomputed over pages it shares);
//  chunk ends are stored in their compressed row too, unless the row is below
//  kvp_batch.context_lens[b] (rows held in shared prefix-cache pages: never rewritten).
// Attention: per query span (the visible compressed prefix is constant over it) an unmasked
// segment of the compressed rows whose chunk ends lie before t - L, and a window segment (lags
// [0, L]) over the window pages: a position-mapped key set, never a mask over all positions, and no
// key counted twice.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "kvplug/attention/backend.h"

namespace kvplug::attn::attamba {

BackendInfo Info();

// Full check of a config (the ABI checks ranges at parse time).
absl::Status ValidateConfig(const AttambaConfig& config);

// Chunk geometry of one layer.
struct ChunkGeometry {
  int32_t chunk_size = 1;  // P
  int32_t offset = 0;      // off_l

  static int32_t Offset(const AttambaConfig& c, int32_t layer_index);
  bool IsChunkEnd(int64_t p) const { return p == 0 || (p + 1 + offset) % chunk_size == 0; }
  // Chunk ends among positions [0, n) (= the compressed row of the chunk end at n).
  int64_t EndsBefore(int64_t n) const {
    if (n <= 0) return 0;
    return 1 + (n + offset) / chunk_size - (1 + offset) / chunk_size;
  }
  // The first chunk end at a position >= x.
  int64_t NextEnd(int64_t x) const {
    if (x <= 0) return 0;
    return x + (chunk_size - (x + 1 + offset) % chunk_size) % chunk_size;
  }
  // The first position of p's chunk (its state starts empty there).
  int64_t ChunkStart(int64_t p) const {
    if (p <= 0) return 0;
    const int64_t last_end = p - 1 - (p + offset) % chunk_size;  // the latest end < p (or below 0)
    return (last_end > 0 ? last_end : 0) + 1;
  }
};

// The page-list layout of a sequence for a step over positions [p0, n) (block size bs).
CacheLayout Layout(const AttambaConfig& config, int32_t block_size, int32_t num_tokens, int32_t query_pos_start);

// The attention's SSM shapes (from the config): in_proj's output per token is
// [z: d_inner][xBC: conv_dim = d_inner + 2 G N][dt: heads].
struct SsmShape {
  int32_t heads = 0, head_dim = 0, state = 0, groups = 0, conv_width = 0;
  int32_t d_inner() const { return heads * head_dim; }
  int32_t conv_dim() const { return d_inner() + 2 * groups * state; }
  int32_t in_dim() const { return 2 * d_inner() + 2 * groups * state + heads; }
  // fp32 floats of one SSM's state: the last conv_width - 1 raw xBC rows and the scan state.
  int64_t state_floats() const {
    return int64_t{conv_width - 1} * conv_dim() + int64_t{heads} * head_dim * state;
  }
};

}  // namespace kvplug::attn::attamba
