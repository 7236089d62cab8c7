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
  // SwapIn takes a computed full block whose key is still cached on the device (cached-free, or
  // held by another sequence) instead of copying it from the host: that block leaves the plan,
  // which is then shorter than the block table. Off by default (the C ABI cannot turn it on):
  // kvp_block_manager_swap_in documents one copy per block in table order, and callers rely on a
  // swap-in never reading device blocks the swap-out left unreferenced (abi_test's end-to-end swap
  // overwrites them and expects 4 copies for 4 blocks; the block manager fuzzer checks the count).
  bool swap_in_reuses_cached_blocks = false;
};

struct BlockCopy {
  int32_t src = 0;
  int32_t dst = 0;
  friend bool operator==(const BlockCopy&, const BlockCopy&) = default;
};

enum class AllocVerdict { kOk = 0, kLater = 1, kNever = 2 };

// Star Attention's phase-1 layout of a prompt (kvp_star_layout): tokens [0, context_len) are
// context, cut into Star blocks of context_block_size tokens (a multiple of block_size); Star block
// k > 0 attends only to the anchor (the first anchor_size tokens) and to itself.
struct StarLayout {
  int64_t context_len = 0;         // in [0, num_tokens]
  int32_t context_block_size = 0;  // > 0, a multiple of block_size
  int32_t anchor_size = 0;         // in [1, context_block_size]
  friend bool operator==(const StarLayout&, const StarLayout&) = default;
};

struct StarAllocation {
  std::vector<uint8_t> cached_blocks;  // one per block of the prompt: 1 = K/V already cached
  int64_t num_cached_tokens = 0;       // block_size * (number of 1s)
};

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

  // Star keys (a sequence allocated this way keeps them for its whole life: Append, Fork, swap).
  // The key of full page i (tokens [i*bs, (i+1)*bs)):
  //  - inside the context ((i+1)*bs <= context_len): a page that starts Star block k > 0 chains
  //    from H(star tag, hash_seed, extra_key, anchor hash, start position), where the anchor hash
  //    covers the first anchor_size tokens; a page that starts Star block 0 chains from a
  //    Star-tagged hash_seed; every other page chains from the page before, as usual.
  //  - the first page not wholly context (i = context_len / bs; the query and generated tokens)
  //    chains from H(query tag, hash_seed, extra_key, every context page's key, the layout), so it
  //    and every later page (chained as usual) hit only when the entire context and layout match.
  // The tags keep Star keys apart from the ordinary chain: a normally keyed sequence never hits a
  // Star-keyed page, nor the reverse.
  // Every full page whose key is cached is reused, hits need not be leading; the page holding the
  // last prompt token is never reused. Without prefix caching this is Allocate (no hits).
  // InvalidArgument for a bad layout (see StarLayout), else the errors of Allocate.
  absl::StatusOr<StarAllocation> AllocateStar(uint64_t seq_id, absl::Span<const int32_t> token_ids,
                                              uint64_t extra_key, const StarLayout& layout);
  // CanAllocate for AllocateStar: kNever for a bad layout or request.
  AllocVerdict CanAllocateStar(absl::Span<const int32_t> token_ids, int64_t num_tokens,
                               uint64_t extra_key, const StarLayout& layout) const;
  // The checks of AllocateStar on `layout` for a prompt of num_tokens tokens.
  absl::Status ValidateStarLayout(const StarLayout& layout, int64_t num_tokens) const;

  absl::StatusOr<bool> CanAppend(uint64_t seq_id, int64_t num_tokens) const;

  // Appends tokens; returns the copy-on-write copy of the last block when it was shared and
  // partially filled. `token_ids` may be empty when prefix caching is off; else num_tokens ids.
  absl::StatusOr<std::optional<BlockCopy>> Append(uint64_t seq_id,
                                                  absl::Span<const int32_t> token_ids,
                                                  int64_t num_tokens);

  // The caller has written the K/V of the first `num_computed_tokens` tokens: their full blocks are
  // published to the prefix cache (a no-op without prefix caching). Never goes backwards. For a Star
  // sequence the blocks below the mark that were not hits are published (hits already are).
  absl::Status MarkComputed(uint64_t seq_id, int64_t num_computed_tokens);

  absl::Status Fork(uint64_t parent_id, uint64_t child_id);
  // Releases the sequence's blocks. A computed full block that stayed private because an identical
  // one was published first is published in its place when that one has left the prefix cache.
  absl::Status Free(uint64_t seq_id);

  absl::StatusOr<int64_t> NumTokens(uint64_t seq_id) const;
  // Valid until the next mutating call.
  absl::StatusOr<absl::Span<const int32_t>> BlockTable(uint64_t seq_id) const;
  absl::Status SlotMapping(uint64_t seq_id, int64_t start, int64_t count,
                           absl::Span<int64_t> out_slots) const;
  absl::StatusOr<int32_t> StateSlot(uint64_t seq_id) const;  // -1 without state slots
  absl::StatusOr<bool> IsSwapped(uint64_t seq_id) const;

  // Number of copies SwapOut/SwapIn would return (the blocks of the sequence; for SwapIn with
  // swap_in_reuses_cached_blocks, an upper bound).
  absl::StatusOr<int32_t> NumBlocks(uint64_t seq_id) const;
  absl::StatusOr<std::vector<BlockCopy>> SwapOut(uint64_t seq_id);  // device -> host
  // Host -> device copies, one per block in table order, except blocks reused from the device cache
  // (swap_in_reuses_cached_blocks). The full blocks that were computed (MarkComputed) before the
  // swap keep their keys and are back in the prefix cache at once, as in vLLM: the caller performs
  // the plan before any step reads them. Prefix stats count admissions only, not swap-ins.
  absl::StatusOr<std::vector<BlockCopy>> SwapIn(uint64_t seq_id);

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
