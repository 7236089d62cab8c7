// Launch interface of Attamba's CUDA SSM (cuda/ssm.cu). Plain C++17, no CUDA types, so host code
// includes it without nvcc. Every pointer is device memory; the arguments were checked on the host
// (ValidateSsmArgs). Returns cudaError_t values (0 = success).
#pragma once

#include <cstdint>

namespace kvplug::attn::attamba::cuda {

struct SsmParams {
  const float* in = nullptr;  // [num_tokens, in_dim], row stride in_stride
  int64_t in_stride = 0;
  float* out = nullptr;  // [num_tokens, d_inner], row stride out_stride
  int64_t out_stride = 0;
  const float* conv_weight = nullptr;  // [conv_dim, conv_width], compact
  const float* conv_bias = nullptr;    // optional [conv_dim]
  const float* dt_bias = nullptr;      // optional [heads]
  const float* a_log = nullptr;        // [heads]
  const float* d_skip = nullptr;       // optional [heads]
  const float* norm_weight = nullptr;  // optional [d_inner]
  // State of sequence b: (float*)(state_base + state_slots[b] * state_slot_bytes) + state_offset.
  uint8_t* state_base = nullptr;
  int64_t state_slot_bytes = 0;
  int64_t state_offset = 0;  // floats: which * state_floats
  const int32_t* query_start_loc = nullptr;   // [num_seqs + 1]
  const int32_t* query_pos_starts = nullptr;  // [num_seqs]
  const int32_t* state_slots = nullptr;       // [num_seqs]
  int32_t num_seqs = 0, num_tokens = 0;
  int32_t heads = 0, head_dim = 0, state = 0, groups = 0, conv_width = 0;
  int32_t chunk_size = 1, chunk_offset = 0;
  float norm_eps = 1e-6f;
  int32_t max_seq_tokens = 0;  // the most tokens of one sequence in the step (sizes the scan's grid)
  int32_t num_sms = 0;         // multiprocessors (0: assume 132)
};

int LaunchSsm(const SsmParams& params, void* stream);

}  // namespace kvplug::attn::attamba::cuda
