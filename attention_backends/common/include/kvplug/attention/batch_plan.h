// The host-side plan of one batch step: sequence boundaries, lengths and page lists in one CSR form,
// checked once and reused by every layer. Buffers are sized at creation; Update never allocates.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"

namespace kvplug::attn {

struct PlanCapacity {
  int32_t max_num_seqs = 0;
  int32_t max_num_tokens = 0;
  int32_t max_num_blocks = 0;
};

// The caller's description of a step (host pointers, read during Update only). Either
// block_table (dense, row stride block_table_stride) or kv_indptr/kv_indices (CSR) is set.
struct BatchInput {
  int32_t num_seqs = 0;
  int32_t block_size = 0;
  const int32_t* query_start_loc = nullptr;
  const int32_t* seq_lens = nullptr;
  const int32_t* block_table = nullptr;
  int32_t block_table_stride = 0;
  const int32_t* kv_indptr = nullptr;
  const int32_t* kv_indices = nullptr;
  const int64_t* slot_mapping = nullptr;
  const int32_t* state_slots = nullptr;
  const int32_t* context_lens = nullptr;      // optional [num_seqs]: positions below are context
  const int32_t* query_pos_starts = nullptr;  // optional [num_seqs]: position of the step's first token
};

class BatchPlan {
 public:
  static absl::Status ValidateCapacity(const PlanCapacity& capacity);
  explicit BatchPlan(const PlanCapacity& capacity);  // capacity must be valid

  // Allocates device mirrors of the plan's arrays (at creation, never per step).
  absl::Status EnableDevice(int32_t device_id);

  // On failure the plan is left empty (num_seqs() == 0), so a stale plan is never run. With device
  // mirrors, the arrays are also queued for upload on `stream` (the caller's order is kept).
  absl::Status Update(const BatchInput& input, void* stream = nullptr);

  const PlanCapacity& capacity() const { return capacity_; }
  bool empty() const { return num_seqs_ == 0; }
  // Grows on every Update (successful or not), so per-backend step work can tell it is stale.
  uint64_t generation() const { return generation_; }
  int32_t num_seqs() const { return num_seqs_; }
  int32_t num_tokens() const { return num_tokens_; }
  int32_t block_size() const { return block_size_; }
  int32_t max_block_id() const { return max_block_id_; }  // -1 when no block is referenced
  int32_t max_seq_len() const { return max_seq_len_; }
  bool has_slot_mapping() const { return has_slot_mapping_; }
  bool has_state_slots() const { return has_state_slots_; }

  absl::Span<const int32_t> query_start_loc() const { return {query_start_loc_.data(), size_t(num_seqs_) + 1}; }
  absl::Span<const int32_t> seq_lens() const { return {seq_lens_.data(), size_t(num_seqs_)}; }
  absl::Span<const int32_t> kv_indptr() const { return {kv_indptr_.data(), size_t(num_seqs_) + 1}; }
  absl::Span<const int32_t> kv_indices() const { return {kv_indices_.data(), size_t(kv_indptr_[num_seqs_])}; }
  absl::Span<const int32_t> token_seq() const { return {token_seq_.data(), size_t(num_tokens_)}; }
  absl::Span<const int64_t> slot_mapping() const {
    return {slot_mapping_.data(), has_slot_mapping_ ? size_t(num_tokens_) : 0};
  }
  absl::Span<const int32_t> state_slots() const {
    return {state_slots_.data(), has_state_slots_ ? size_t(num_seqs_) : 0};
  }
  int32_t max_state_slot() const { return max_state_slot_; }
  // Context lengths (0 for every sequence when the batch gave none).
  bool has_context_lens() const { return has_context_lens_; }
  int32_t context_len(int32_t seq) const { return has_context_lens_ ? context_lens_[seq] : 0; }
  // Whether the caller gave the step's query positions; query_pos_start(b) either way.
  bool has_query_pos_starts() const { return has_query_pos_starts_; }
  int32_t query_pos_start(int32_t seq) const {
    return has_query_pos_starts_ ? query_pos_starts_[seq]
                                 : seq_lens_[seq] - (query_start_loc_[seq + 1] - query_start_loc_[seq]);
  }
  int32_t max_q_len() const { return max_q_len_; }

  // Device mirrors (nullptr without EnableDevice).
  bool on_device() const { return device_ != nullptr; }
  const int32_t* device_query_start_loc() const;
  const int32_t* device_seq_lens() const;
  const int32_t* device_kv_indptr() const;
  const int32_t* device_kv_indices() const;
  const int64_t* device_slot_mapping() const;
  const int32_t* device_token_seq() const;
  const int32_t* device_state_slots() const;
  const int32_t* device_query_pos_starts() const;  // valid when has_query_pos_starts()

 private:
  absl::Status Fill(const BatchInput& input);
  absl::Status Upload(void* stream);
  struct DeviceMirror;
  struct DeviceMirrorDeleter {
    void operator()(DeviceMirror* m) const;
  };

  PlanCapacity capacity_;
  uint64_t generation_ = 1;
  int32_t num_seqs_ = 0;
  int32_t num_tokens_ = 0;
  int32_t block_size_ = 0;
  int32_t max_block_id_ = -1;
  int32_t max_seq_len_ = 0;
  int32_t max_state_slot_ = -1;
  int32_t max_q_len_ = 0;
  std::unique_ptr<DeviceMirror, DeviceMirrorDeleter> device_;
  bool has_slot_mapping_ = false;
  bool has_state_slots_ = false;
  bool has_context_lens_ = false;
  bool has_query_pos_starts_ = false;
  std::vector<int32_t> query_start_loc_;
  std::vector<int32_t> seq_lens_;
  std::vector<int32_t> context_lens_;
  std::vector<int32_t> query_pos_starts_;
  std::vector<int32_t> kv_indptr_;
  std::vector<int32_t> kv_indices_;
  std::vector<int32_t> token_seq_;
  std::vector<int64_t> slot_mapping_;
  std::vector<int32_t> state_slots_;
};

}  // namespace kvplug::attn
