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
};

struct AttambaConfig {
  int32_t chunk_size = 8;
  int32_t window = 0;
  int32_t state_size = 16;
  int32_t conv_width = 4;
};

struct KvShiftConfig {
  std::vector<float> alpha_k;  // [num_kv_heads, 2]: weights of the current and previous key
  std::vector<float> alpha_v;
};

struct EntropyConfig {
  std::vector<float> temperature;  // [num_q_heads]
  bool collect_entropy = false;
};

using BackendConfig =
    std::variant<std::monostate, DenseConfig, StarConfig, AttambaConfig, KvShiftConfig, EntropyConfig>;

}  // namespace kvplug::attn
