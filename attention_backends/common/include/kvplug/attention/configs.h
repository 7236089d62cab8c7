// Plain C++ configs of every backend, translated once at the ABI from the FlatBuffers tables in
// abi/schema/kvplug_config.fbs. Field meanings and defaults are the schema's.
#pragma once

#include <cstdint>
#include <variant>
#include <vector>

namespace kvplug::attn {

struct DenseConfig {
  int32_t window_left = -1;      // < 0: unbounded; else keys at positions >= p - window_left
  float logits_soft_cap = 0.0f;  // > 0: logits become cap * tanh(logits / cap)
};

struct StarConfig {
  int32_t context_block_size = 4096;
  int32_t anchor_block_size = 4096;
  int32_t num_shards = 1;
  int32_t shard_rank = 0;
  int32_t append_shard = -1;  // -1: the last shard
};

enum class ChunkOffsets : int32_t { kCyclic = 0, kUniform = 1 };

struct AttambaConfig {
  int32_t chunk_size = 8;  // P: one cached K/V per chunk
  int32_t window = 0;      // L: recent tokens attended exactly (the paper's leading tokens)
  int32_t layer_index = 0;
  int32_t num_layers = 1;
  ChunkOffsets chunk_offsets = ChunkOffsets::kCyclic;
  // The chunk-local SSMs kvplug runs (kvp_attention_ssm); ssm_heads 0: the engine runs its own.
  int32_t ssm_heads = 0;
  int32_t ssm_head_dim = 0;
  int32_t state_size = 16;
  int32_t ssm_groups = 1;
  int32_t conv_width = 4;
  float norm_eps = 1e-5f;
};

// Rotary embedding layouts: NeoX rotates halves (pairs (j, j + d/2): Llama, HF rotate_half),
// GPT-J interleaved pairs (2j, 2j + 1).
enum class RopeStyle : int32_t { kNeoX = 0, kGptJ = 1 };

struct KvShiftConfig {
  std::vector<float> alpha_k;  // [num_kv_heads, 2]: weights of the current and previous key
  std::vector<float> alpha_v;
  float rope_theta = 0.0f;     // > 0: RoPE on the mixed key inside the write; 0: none
  int32_t rotary_dim = 0;      // 0: head_size; else even, in [2, head_size]
  RopeStyle rope_style = RopeStyle::kNeoX;
};

struct EntropyConfig {
  std::vector<float> temperature;  // [num_q_heads]
  bool collect_entropy = false;
};

using BackendConfig =
    std::variant<std::monostate, DenseConfig, StarConfig, AttambaConfig, KvShiftConfig, EntropyConfig>;

}  // namespace kvplug::attn
