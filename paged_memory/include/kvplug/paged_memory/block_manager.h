// The block manager of a paged KV cache: which physical blocks hold which sequence's tokens, with
// reference-counted sharing (fork, prefix caching), copy-on-write, LRU eviction of cached blocks and
// swap plans. Host-side bookkeeping only: it never touches K/V memory, it tells the caller what to
// copy. Plain C++ and Abseil; no CUDA.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace kvplug::paged {

struct BlockManagerOptions {
  int32_t block_size = 16;
  int32_t num_device_blocks = 0;
  int32_t num_host_blocks = 0;
  bool enable_prefix_caching = false;
  // Fraction of device blocks that admitting a new sequence must leave free.
  double watermark = 0.0;
  // If > 0 every sequence holds one state slot in [0, num_state_slots).
  int32_t num_state_slots = 0;
  uint64_t hash_seed = 0;
};

struct BlockCopy {
  int32_t src = 0;
  int32_t dst = 0;
  friend bool operator==(const BlockCopy&, const BlockCopy&) = default;
};

enum class AllocVerdict { kOk = 0, kLater = 1, kNever = 2 };

struct BlockManagerStats {
  int32_t num_device_blocks = 0;
  int32_t num_free_blocks = 0;         // no content
  int32_t num_cached_free_blocks = 0;  // unreferenced, holding a cached prefix block
  int32_t num_used_blocks = 0;         // ref count > 0
  int32_t num_host_blocks = 0;
  int32_t num_free_host_blocks = 0;
  int32_t num_sequences = 0;
  int32_t num_swapped_sequences = 0;
  int64_t prefix_queried_blocks = 0;
  int64_t prefix_hit_blocks = 0;
  int64_t num_evictions = 0;
};

// Errors: InvalidArgument (bad values), NotFound (unknown seq id), AlreadyExists (seq id in use),
// ResourceExhausted (no free device/host blocks or state slots), FailedPrecondition (swapped
// sequence used as if resident, or resident one swapped in), OutOfRange (positions). Every
// failing call leaves the manager exactly as it was.
class BlockManager {
 public:
  static absl::StatusOr<std::unique_ptr<BlockManager>> Create(const BlockManagerOptions& options);
  ~BlockManager();
  BlockManager(const BlockManager&) = delete;
  BlockManager& operator=(const BlockManager&) = delete;

  const BlockManagerOptions& options() const;

  // `token_ids` may be empty (no prefix-cache credit); otherwise it holds num_tokens ids.
  AllocVerdict CanAllocate(absl::Span<const int32_t> token_ids, int64_t num_tokens,
                           uint64_t extra_key) const;

  // Creates `seq_id` with the prompt `token_ids` (non-empty). Returns the number of leading tokens
  // whose K/V is already cached: a multiple of block_size, < token_ids.size() (when every block
  // hits, the last block is not reused so at least one token is computed). New blocks reach the
  // prefix cache only through MarkComputed. Token ids are needed when prefix caching is on.
  absl::StatusOr<int64_t> Allocate(uint64_t seq_id, absl::Span<const int32_t> token_ids,
                                   uint64_t extra_key);

  absl::StatusOr<bool> CanAppend(uint64_t seq_id, int64_t num_tokens) const;

  // Appends tokens; returns the copy-on-write copy of the last block when it was shared and
  // partially filled. `token_ids` may be empty when prefix caching is off; else num_tokens ids.
  absl::StatusOr<std::optional<BlockCopy>> Append(uint64_t seq_id,
                                                  absl::Span<const int32_t> token_ids,
                                                  int64_t num_tokens);

  // The caller has written the K/V of the first `num_computed_tokens` tokens: their full blocks are
  // published to the prefix cache (a no-op without prefix caching). Never goes backwards.
  absl::Status MarkComputed(uint64_t seq_id, int64_t num_computed_tokens);

  absl::Status Fork(uint64_t parent_id, uint64_t child_id);
  absl::Status Free(uint64_t seq_id);

  absl::StatusOr<int64_t> NumTokens(uint64_t seq_id) const;
  // Valid until the next mutating call.
  absl::StatusOr<absl::Span<const int32_t>> BlockTable(uint64_t seq_id) const;
  absl::Status SlotMapping(uint64_t seq_id, int64_t start, int64_t count,
                           absl::Span<int64_t> out_slots) const;
  absl::StatusOr<int32_t> StateSlot(uint64_t seq_id) const;  // -1 without state slots
  absl::StatusOr<bool> IsSwapped(uint64_t seq_id) const;

  // Number of copies SwapOut/SwapIn would return (the blocks of the sequence).
  absl::StatusOr<int32_t> NumBlocks(uint64_t seq_id) const;
  absl::StatusOr<std::vector<BlockCopy>> SwapOut(uint64_t seq_id);  // device -> host
  absl::StatusOr<std::vector<BlockCopy>> SwapIn(uint64_t seq_id);   // host -> device

  BlockManagerStats Stats() const;

  // Full consistency check (tests): ref counts equal table references, no block both free and used,
  // cached hashes recomputed from the owning sequences' tokens, free/cached/used partition the pool.
  absl::Status CheckInvariants() const;

 private:
  struct Impl;
  explicit BlockManager(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvplug::paged
