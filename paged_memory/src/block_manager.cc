// Block manager: reference-counted device blocks, a hash-chained prefix cache with LRU eviction of
// unreferenced cached blocks, copy-on-write after fork, swap plans and per-sequence state slots.
//
// Device block states (disjoint, they partition [0, num_device_blocks)):
//   free         ref 0, no content; on `free_blocks` (a stack).
//   cached-free  ref 0, published in the prefix cache; in the intrusive LRU list (oldest at head).
//   used         ref > 0; may or may not be published.
// A block is "published" iff prefix_map[block_hash[b]] == b. Only full blocks are published, and a
// hash is published at most once (a duplicate block of an already published hash stays private).
#include "kvplug/paged_memory/block_manager.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "fmt/format.h"

namespace kvplug::paged {
namespace {

enum class BlockState : uint8_t { kFree = 0, kCachedFree = 1, kUsed = 2 };

constexpr int32_t kNil = -1;

inline uint64_t Fmix64(uint64_t k) {
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdULL;
  k ^= k >> 33;
  k *= 0xc4ceb9fe1a85ec53ULL;
  k ^= k >> 33;
  return k;
}

inline uint64_t Rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

// Hash of one full block, chained from its parent's hash (hash_seed for the first block).
uint64_t HashBlock(uint64_t parent, uint64_t extra_key, const int32_t* tokens, int32_t n) {
  constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ULL;
  constexpr uint64_t kC1 = 0x87c37b91114253d5ULL;
  constexpr uint64_t kC2 = 0x4cf5ad432745937fULL;
  uint64_t h = Fmix64(parent ^ kGolden);
  h = Rotl64(h ^ Fmix64(extra_key + kC2), 27) * 5 + 0x52dce729;
  int32_t i = 0;
  for (; i + 1 < n; i += 2) {
    const uint64_t w = static_cast<uint64_t>(static_cast<uint32_t>(tokens[i])) |
                       (static_cast<uint64_t>(static_cast<uint32_t>(tokens[i + 1])) << 32);
    h = Rotl64(h ^ Rotl64(w * kC1, 31) * kC2, 27) * 5 + 0x52dce729;
  }
  if (i < n) {
    const uint64_t w = static_cast<uint32_t>(tokens[i]);
    h = Rotl64(h ^ Rotl64(w * kC1, 31) * kC2, 27) * 5 + 0x52dce729;
  }
  h ^= static_cast<uint64_t>(n);
  return Fmix64(h);
}

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Star keys (BlockManager::AllocateStar). Each root of a Star chain mixes its own tag into the
// hash_seed, so no Star key is ever the ordinary chain's key of the same tokens.
constexpr uint64_t kStarBlock0Tag = 0x53544152424c4b30ULL;  // "STARBLK0": Star block 0's pages
constexpr uint64_t kStarBlockTag = 0x53544152424c4b4bULL;   // "STARBLKK": Star block k > 0
constexpr uint64_t kStarAnchorTag = 0x535441524e43484fULL;  // "STARNCHO": the anchor's tokens
constexpr uint64_t kStarQueryTag = 0x5354415251525953ULL;   // "STARQRYS": past the context

inline uint64_t Combine(uint64_t h, uint64_t v) {
  return Fmix64((Rotl64(h, 29) * 0x9e3779b97f4a7c15ULL) ^ Fmix64(v + 0x632be59bd9b4e019ULL));
}

// Allocation failures must leave the manager as it was, so every allocation of a mutating call
// happens before its first change. Two helpers make room ahead of time:
//
// Grows `v` (geometrically) so that it holds `n` elements without allocating again.
template <class T>
void ReserveVector(std::vector<T>& v, size_t n) {
  if (v.capacity() < n) v.reserve(std::max(n, 2 * v.capacity()));
}

// Makes room for `k` more entries in `m`, so that inserting them allocates nothing. Abseil's own
// growth is not exception-safe (20220623: raw_hash_set::resize sets the new capacity before it
// allocates, so a std::bad_alloc leaves a table whose capacity overstates its storage, which the
// destructor then frees as if it were its own). A table built at its final size instead fails, if
// it must, in its constructor, before anything changes.
template <class Map>
void ReserveForInserts(Map& m, size_t k) {
  const size_t need = m.size() + k;
  // A table of capacity > 16 that stays <= 25/32 full at most rehashes in place (dropping
  // tombstones) on insert: no allocation.
  if (m.capacity() > 16 && need * 32 <= m.capacity() * 25) return;
  Map bigger(std::max<size_t>(2 * need, 32));
  for (auto& entry : m) bigger.emplace(entry.first, std::move(entry.second));
  m.swap(bigger);
}

}  // namespace

struct BlockManager::Impl {
  struct Seq {
    std::vector<int32_t> blocks;   // device block table, or host blocks while swapped
    std::vector<int32_t> tokens;   // token ids (only with prefix caching)
    std::vector<uint64_t> hashes;  // chained hash of every full block (only with prefix caching)
    int64_t num_tokens = 0;
    int64_t num_published = 0;     // leading full blocks already offered to the prefix cache
    uint64_t extra_key = 0;
    int32_t state_slot = -1;
    bool swapped = false;
    std::optional<StarLayout> star;  // set: Star keys (AllocateStar)
  };

  BlockManagerOptions opts;
  bool caching = false;

  // Device blocks.
  std::vector<int32_t> ref;
  std::vector<BlockState> state;
  std::vector<uint8_t> published;
  std::vector<uint64_t> block_hash;
  std::vector<int32_t> free_blocks;  // stack; back is taken first
  std::vector<int32_t> lru_prev, lru_next;
  int32_t lru_head = kNil, lru_tail = kNil, lru_size = 0;
  absl::flat_hash_map<uint64_t, int32_t> prefix_map;

  // Host blocks and state slots.
  std::vector<int32_t> free_host_blocks;  // stack
  std::vector<int32_t> free_state_slots;  // stack

  absl::flat_hash_map<uint64_t, Seq> seqs;
  int32_t num_swapped = 0;

  int64_t prefix_queried_blocks = 0;
  int64_t prefix_hit_blocks = 0;
  int64_t num_evictions = 0;

  // The prefix cache never holds more than one entry per device block: sized once, at most half
  // full, it never grows (see ReserveForInserts for why growing is avoided).
  explicit Impl(const BlockManagerOptions& o)
      : opts(o),
        caching(o.enable_prefix_caching),
        prefix_map(o.enable_prefix_caching ? std::max<size_t>(2 * static_cast<size_t>(o.num_device_blocks), 32) : 0) {
    const int32_t n = o.num_device_blocks;
    ref.assign(n, 0);
    state.assign(n, BlockState::kFree);
    published.assign(n, 0);
    block_hash.assign(n, 0);
    lru_prev.assign(n, kNil);
    lru_next.assign(n, kNil);
    free_blocks.reserve(n);
    for (int32_t b = n - 1; b >= 0; --b) free_blocks.push_back(b);
    free_host_blocks.reserve(o.num_host_blocks);
    for (int32_t b = o.num_host_blocks - 1; b >= 0; --b) free_host_blocks.push_back(b);
    free_state_slots.reserve(o.num_state_slots);
    for (int32_t s = o.num_state_slots - 1; s >= 0; --s) free_state_slots.push_back(s);
  }

  int32_t bs() const { return opts.block_size; }
  int32_t Available() const { return static_cast<int32_t>(free_blocks.size()) + lru_size; }
  bool SlotAvailable() const { return opts.num_state_slots == 0 || !free_state_slots.empty(); }
  int32_t WatermarkBlocks() const {
    return static_cast<int32_t>(opts.watermark * opts.num_device_blocks);
  }

  // --- LRU list of cached-free blocks -------------------------------------------------------
  void LruPushBack(int32_t b) {
    lru_prev[b] = lru_tail;
    lru_next[b] = kNil;
    if (lru_tail != kNil) {
      lru_next[lru_tail] = b;
    } else {
      lru_head = b;
    }
    lru_tail = b;
    ++lru_size;
  }
  void LruRemove(int32_t b) {
    const int32_t p = lru_prev[b], n = lru_next[b];
    if (p != kNil) {
      lru_next[p] = n;
    } else {
      lru_head = n;
    }
    if (n != kNil) {
      lru_prev[n] = p;
    } else {
      lru_tail = p;
    }
    lru_prev[b] = lru_next[b] = kNil;
    --lru_size;
  }

  // --- Block life cycle ------------------------------------------------------------------------
  // A fresh block with ref 1. The caller has checked Available() > 0.
  int32_t TakeFresh() {
    int32_t b;
    if (!free_blocks.empty()) {
      b = free_blocks.back();
      free_blocks.pop_back();
    } else {
      b = lru_head;
      LruRemove(b);
      prefix_map.erase(block_hash[b]);
      published[b] = 0;
      block_hash[b] = 0;
      ++num_evictions;
    }
    state[b] = BlockState::kUsed;
    ref[b] = 1;
    return b;
  }

  // Takes one more reference on a block found in the prefix cache.
  void Acquire(int32_t b) {
    if (state[b] == BlockState::kCachedFree) {
      LruRemove(b);
      state[b] = BlockState::kUsed;
    }
    ++ref[b];
  }

  void Release(int32_t b) {
    if (--ref[b] > 0) return;
    if (published[b]) {
      state[b] = BlockState::kCachedFree;
      LruPushBack(b);
    } else {
      state[b] = BlockState::kFree;
      free_blocks.push_back(b);
    }
  }

  // Publishes full block `b` under `h` unless the hash is already cached (then b stays private).
  void Publish(int32_t b, uint64_t h) {
    auto [it, inserted] = prefix_map.try_emplace(h, b);
    if (inserted) {
      published[b] = 1;
      block_hash[b] = h;
    }
  }

  // The key of full block i of `tokens` (at least (i + 1) * block_size of them) whose earlier
  // blocks' keys are prev[0..i): the ordinary chain, or Star keys (see AllocateStar in the header).
  uint64_t PageHash(const StarLayout* star, uint64_t extra_key, const int32_t* tokens, int64_t i,
                    const uint64_t* prev) const {
    const int64_t b = bs();
    uint64_t parent;
    if (star == nullptr) {
      parent = i == 0 ? opts.hash_seed : prev[i - 1];
    } else {
      const int64_t start = i * b;
      const int64_t first_query = star->context_len / b;  // first block not wholly context
      if (i < first_query) {
        if (start % star->context_block_size != 0) {
          parent = prev[i - 1];
        } else if (start == 0) {
          parent = Combine(opts.hash_seed, kStarBlock0Tag);
        } else {
          // Star block k > 0: the anchor and the start position, not the blocks between.
          const uint64_t anchor = HashBlock(Combine(opts.hash_seed, kStarAnchorTag), extra_key,
                                            tokens, star->anchor_size);
          parent = Combine(Combine(Combine(Combine(opts.hash_seed, kStarBlockTag), extra_key), anchor),
                           static_cast<uint64_t>(start));
        }
      } else if (i == first_query) {
        // Query and generated tokens see the whole context: a digest of every context block's key
        // and of the layout (a block straddling context_len holds tokens of both phases).
        uint64_t h = Combine(Combine(opts.hash_seed, kStarQueryTag), extra_key);
        for (int64_t j = 0; j < i; ++j) h = Combine(h, prev[j]);
        h = Combine(h, static_cast<uint64_t>(star->context_len));
        h = Combine(h, static_cast<uint64_t>(star->context_block_size));
        parent = Combine(h, static_cast<uint64_t>(star->anchor_size));
      } else {
        parent = prev[i - 1];
      }
    }
    return HashBlock(parent, extra_key, tokens + i * b, static_cast<int32_t>(b));
  }

  // Keys of the full blocks of `tokens`: chained hashes, or Star keys when `star` is set.
  void ComputeHashes(absl::Span<const int32_t> tokens, uint64_t extra_key,
                     std::vector<uint64_t>& out, const StarLayout* star = nullptr) const {
    const int64_t num_full = static_cast<int64_t>(tokens.size()) / bs();
    out.clear();
    out.reserve(num_full);
    for (int64_t i = 0; i < num_full; ++i) {
      out.push_back(PageHash(star, extra_key, tokens.data(), i, out.data()));
    }
  }

  // Star hits of a prompt of num_tokens tokens whose full-block keys are `hashes`: every cached
  // block except the one holding the last token. Sets hit[i] (hit has one entry per block).
  int64_t CountStarHits(const std::vector<uint64_t>& hashes, int64_t num_tokens,
                        std::vector<uint8_t>& hit, int64_t* cached_free_hits) const {
    int64_t hits = 0;
    *cached_free_hits = 0;
    for (size_t i = 0; i < hashes.size(); ++i) {
      if ((static_cast<int64_t>(i) + 1) * bs() >= num_tokens) break;  // holds the last token
      auto it = prefix_map.find(hashes[i]);
      if (it == prefix_map.end()) continue;
      hit[i] = 1;
      ++hits;
      if (state[it->second] == BlockState::kCachedFree) ++*cached_free_hits;
    }
    return hits;
  }

  // Prefix hits of a prompt whose full-block hashes are `hashes` (num_blocks blocks in all):
  // leading hits, less the last one when every block of the prompt hits. `cached_free_hits`
  // receives how many of them are currently cached-free (they leave the free pool when taken).
  int64_t CountHits(const std::vector<uint64_t>& hashes, int64_t num_blocks,
                    int64_t* cached_free_hits) const {
    int64_t hits = 0;
    *cached_free_hits = 0;
    for (uint64_t h : hashes) {
      auto it = prefix_map.find(h);
      if (it == prefix_map.end()) break;
      ++hits;
    }
    if (hits == num_blocks && hits > 0) --hits;
    for (int64_t i = 0; i < hits; ++i) {
      if (state[prefix_map.find(hashes[i])->second] == BlockState::kCachedFree) ++*cached_free_hits;
    }
    return hits;
  }

  int32_t TakeStateSlot() {
    if (opts.num_state_slots == 0) return -1;
    const int32_t s = free_state_slots.back();
    free_state_slots.pop_back();
    return s;
  }
  void ReleaseStateSlot(int32_t s) {
    if (s >= 0) free_state_slots.push_back(s);
  }

  // --- Lookups -----------------------------------------------------------------------------------
  absl::StatusOr<const Seq*> Find(uint64_t seq_id) const {
    auto it = seqs.find(seq_id);
    if (it == seqs.end()) {
      return absl::NotFoundError(fmt::format("seq {}: unknown sequence id", seq_id));
    }
    return &it->second;
  }
  absl::StatusOr<const Seq*> FindResident(uint64_t seq_id) const {
    auto s = Find(seq_id);
    if (s.ok() && (*s)->swapped) {
      return absl::FailedPreconditionError(
          fmt::format("seq {}: sequence is swapped out (swap it in first)", seq_id));
    }
    return s;
  }
  // The same lookups for mutating calls.
  absl::StatusOr<Seq*> Find(uint64_t seq_id) {
    auto s = std::as_const(*this).Find(seq_id);
    if (!s.ok()) return s.status();
    return const_cast<Seq*>(*s);
  }
  absl::StatusOr<Seq*> FindResident(uint64_t seq_id) {
    auto s = std::as_const(*this).FindResident(seq_id);
    if (!s.ok()) return s.status();
    return const_cast<Seq*>(*s);
  }

  // Fresh blocks an append of n tokens needs (including a copy-on-write block).
  int64_t AppendNeed(const Seq& s, int64_t n) const {
    const int64_t cur = s.num_tokens;
    if (n > static_cast<int64_t>(opts.num_device_blocks) * bs()) {
      return int64_t{opts.num_device_blocks} + 1;  // can never fit; avoids overflow below
    }
    int64_t need = CeilDiv(cur + n, bs()) - static_cast<int64_t>(s.blocks.size());
    if (cur % bs() != 0 && ref[s.blocks.back()] > 1) ++need;  // copy on write
    return need;
  }

  absl::Status CheckInvariants() const;
};

// ------------------------------------------------------------------------------------------------

BlockManager::BlockManager(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
BlockManager::~BlockManager() = default;

absl::StatusOr<std::unique_ptr<BlockManager>> BlockManager::Create(
    const BlockManagerOptions& options) {
  if (options.block_size < 1 || options.block_size > 65536) {
    return absl::InvalidArgumentError(
        fmt::format("block_size={} must be in [1, 65536]", options.block_size));
  }
  if (options.num_device_blocks <= 0) {
    return absl::InvalidArgumentError(
        fmt::format("num_device_blocks={} must be > 0", options.num_device_blocks));
  }
  if (options.num_host_blocks < 0) {
    return absl::InvalidArgumentError(
        fmt::format("num_host_blocks={} must be >= 0", options.num_host_blocks));
  }
  if (!std::isfinite(options.watermark) || options.watermark < 0.0 || options.watermark >= 1.0) {
    return absl::InvalidArgumentError(
        fmt::format("watermark={} must be finite and in [0, 1)", options.watermark));
  }
  if (options.num_state_slots < 0) {
    return absl::InvalidArgumentError(
        fmt::format("num_state_slots={} must be >= 0", options.num_state_slots));
  }
  return std::unique_ptr<BlockManager>(new BlockManager(std::make_unique<Impl>(options)));
}

const BlockManagerOptions& BlockManager::options() const { return impl_->opts; }

AllocVerdict BlockManager::CanAllocate(absl::Span<const int32_t> token_ids, int64_t num_tokens,
                                       uint64_t extra_key) const {
  const Impl& m = *impl_;
  // Invalid requests can never be allocated.
  if (num_tokens < 1) return AllocVerdict::kNever;
  if (!token_ids.empty() && static_cast<int64_t>(token_ids.size()) != num_tokens) {
    return AllocVerdict::kNever;
  }
  const int64_t num_blocks = CeilDiv(num_tokens, m.bs());
  const int64_t wm = m.WatermarkBlocks();
  // Every block of a sequence is a distinct device block, whether it hits the prefix cache or not,
  // so a prompt longer than the pool (less the watermark) never fits, whatever is cached.
  if (num_blocks > static_cast<int64_t>(m.opts.num_device_blocks) - wm) return AllocVerdict::kNever;
  if (!m.SlotAvailable()) return AllocVerdict::kLater;
  int64_t hits = 0, cached_free_hits = 0;
  if (m.caching && !token_ids.empty()) {
    std::vector<uint64_t> hashes;
    m.ComputeHashes(token_ids, extra_key, hashes);
    hits = m.CountHits(hashes, num_blocks, &cached_free_hits);
  }
  // Blocks leaving the free + cached-free pool: the fresh ones and the cached-free hits.
  const int64_t consumed = (num_blocks - hits) + cached_free_hits;
  return m.Available() - consumed >= wm ? AllocVerdict::kOk : AllocVerdict::kLater;
}

absl::StatusOr<int64_t> BlockManager::Allocate(uint64_t seq_id, absl::Span<const int32_t> token_ids,
                                               uint64_t extra_key) {
  Impl& m = *impl_;
  if (token_ids.empty()) {
    return absl::InvalidArgumentError(
        fmt::format("seq {}: token_ids must be non-empty (num_tokens=0 must be >= 1)", seq_id));
  }
  if (m.seqs.contains(seq_id)) {
    return absl::AlreadyExistsError(fmt::format("seq {}: sequence id already in use", seq_id));
  }
  if (!m.SlotAvailable()) {
    return absl::ResourceExhaustedError(fmt::format(
        "seq {}: no free state slot (all {} in use)", seq_id, m.opts.num_state_slots));
  }
  const int64_t num_tokens = static_cast<int64_t>(token_ids.size());
  const int64_t num_blocks = CeilDiv(num_tokens, m.bs());

  Impl::Seq seq;
  int64_t hits = 0, cached_free_hits = 0;
  if (m.caching) {
    m.ComputeHashes(token_ids, extra_key, seq.hashes);
    hits = m.CountHits(seq.hashes, num_blocks, &cached_free_hits);
  }
  const int64_t fresh = num_blocks - hits;
  const int64_t available = m.Available() - cached_free_hits;
  if (fresh > available) {
    return absl::ResourceExhaustedError(fmt::format(
        "seq {}: {} tokens need {} new device blocks ({} prefix hits), only {} available", seq_id,
        num_tokens, fresh, hits, available));
  }

  // Allocations first (a failure changes nothing), then commit.
  seq.blocks.reserve(num_blocks);
  if (m.caching) seq.tokens.assign(token_ids.begin(), token_ids.end());
  ReserveForInserts(m.seqs, 1);
  for (int64_t i = 0; i < hits; ++i) {
    const int32_t b = m.prefix_map.find(seq.hashes[i])->second;
    m.Acquire(b);
    seq.blocks.push_back(b);
  }
  const int64_t num_full = num_tokens / m.bs();
  // Fresh blocks are published only once the caller reports their K/V computed (MarkComputed):
  // with chunked prefill a full block may stay unwritten for several steps.
  for (int64_t i = hits; i < num_blocks; ++i) seq.blocks.push_back(m.TakeFresh());
  seq.num_published = hits;
  if (m.caching) {
    m.prefix_queried_blocks += num_full;
    m.prefix_hit_blocks += hits;
  }
  seq.num_tokens = num_tokens;
  seq.extra_key = extra_key;
  seq.state_slot = m.TakeStateSlot();
  m.seqs.emplace(seq_id, std::move(seq));
  return hits * m.bs();
}

absl::Status BlockManager::ValidateStarLayout(const StarLayout& layout, int64_t num_tokens) const {
  const int32_t bs = impl_->bs();
  if (layout.context_len < 0 || layout.context_len > num_tokens) {
    return absl::InvalidArgumentError(fmt::format(
        "layout context_len={} must be in [0, num_tokens={}]", layout.context_len, num_tokens));
  }
  if (layout.context_block_size <= 0 || layout.context_block_size % bs != 0) {
    return absl::InvalidArgumentError(
        fmt::format("layout context_block_size={} must be > 0 and a multiple of block_size={}",
                    layout.context_block_size, bs));
  }
  if (layout.anchor_size < 1 || layout.anchor_size > layout.context_block_size) {
    return absl::InvalidArgumentError(
        fmt::format("layout anchor_size={} must be in [1, context_block_size={}]", layout.anchor_size,
                    layout.context_block_size));
  }
  return absl::OkStatus();
}

AllocVerdict BlockManager::CanAllocateStar(absl::Span<const int32_t> token_ids, int64_t num_tokens,
                                           uint64_t extra_key, const StarLayout& layout) const {
  const Impl& m = *impl_;
  if (num_tokens < 1) return AllocVerdict::kNever;
  if (!token_ids.empty() && static_cast<int64_t>(token_ids.size()) != num_tokens) {
    return AllocVerdict::kNever;
  }
  if (!ValidateStarLayout(layout, num_tokens).ok()) return AllocVerdict::kNever;
  const int64_t num_blocks = CeilDiv(num_tokens, m.bs());
  const int64_t wm = m.WatermarkBlocks();
  if (num_blocks > static_cast<int64_t>(m.opts.num_device_blocks) - wm) return AllocVerdict::kNever;
  if (!m.SlotAvailable()) return AllocVerdict::kLater;
  int64_t hits = 0, cached_free_hits = 0;
  if (m.caching && !token_ids.empty()) {
    std::vector<uint64_t> hashes;
    m.ComputeHashes(token_ids, extra_key, hashes, &layout);
    std::vector<uint8_t> hit(static_cast<size_t>(num_blocks), 0);
    hits = m.CountStarHits(hashes, num_tokens, hit, &cached_free_hits);
  }
  const int64_t consumed = (num_blocks - hits) + cached_free_hits;
  return m.Available() - consumed >= wm ? AllocVerdict::kOk : AllocVerdict::kLater;
}

absl::StatusOr<StarAllocation> BlockManager::AllocateStar(uint64_t seq_id,
                                                          absl::Span<const int32_t> token_ids,
                                                          uint64_t extra_key,
                                                          const StarLayout& layout) {
  Impl& m = *impl_;
  if (token_ids.empty()) {
    return absl::InvalidArgumentError(
        fmt::format("seq {}: token_ids must be non-empty (num_tokens=0 must be >= 1)", seq_id));
  }
  const int64_t num_tokens = static_cast<int64_t>(token_ids.size());
  if (absl::Status v = ValidateStarLayout(layout, num_tokens); !v.ok()) {
    return absl::InvalidArgumentError(fmt::format("seq {}: {}", seq_id, std::string(v.message())));
  }
  if (m.seqs.contains(seq_id)) {
    return absl::AlreadyExistsError(fmt::format("seq {}: sequence id already in use", seq_id));
  }
  if (!m.SlotAvailable()) {
    return absl::ResourceExhaustedError(fmt::format(
        "seq {}: no free state slot (all {} in use)", seq_id, m.opts.num_state_slots));
  }
  const int64_t num_blocks = CeilDiv(num_tokens, m.bs());

  // Allocations first (a failure changes nothing), then commit.
  StarAllocation out;
  out.cached_blocks.assign(static_cast<size_t>(num_blocks), 0);
  Impl::Seq seq;
  seq.star = layout;
  int64_t hits = 0, cached_free_hits = 0;
  if (m.caching) {
    m.ComputeHashes(token_ids, extra_key, seq.hashes, &layout);
    hits = m.CountStarHits(seq.hashes, num_tokens, out.cached_blocks, &cached_free_hits);
  }
  const int64_t fresh = num_blocks - hits;
  const int64_t available = m.Available() - cached_free_hits;
  if (fresh > available) {
    return absl::ResourceExhaustedError(fmt::format(
        "seq {}: {} tokens need {} new device blocks ({} prefix hits), only {} available", seq_id,
        num_tokens, fresh, hits, available));
  }
  seq.blocks.assign(static_cast<size_t>(num_blocks), kNil);
  if (m.caching) seq.tokens.assign(token_ids.begin(), token_ids.end());
  ReserveForInserts(m.seqs, 1);

  // Hits first: taking fresh blocks may evict cached-free ones, never one this prompt reuses.
  int64_t leading = 0;
  while (leading < num_blocks && out.cached_blocks[leading]) ++leading;
  for (int64_t i = 0; i < num_blocks; ++i) {
    if (!out.cached_blocks[i]) continue;
    const int32_t b = m.prefix_map.find(seq.hashes[i])->second;
    m.Acquire(b);
    seq.blocks[i] = b;
  }
  for (int64_t i = 0; i < num_blocks; ++i) {
    if (!out.cached_blocks[i]) seq.blocks[i] = m.TakeFresh();
  }
  // MarkComputed publishes from the first miss on; the later hits are published already (and
  // Publish leaves a block already cached under its key as it is).
  seq.num_published = leading;
  if (m.caching) {
    m.prefix_queried_blocks += num_tokens / m.bs();
    m.prefix_hit_blocks += hits;
  }
  seq.num_tokens = num_tokens;
  seq.extra_key = extra_key;
  seq.state_slot = m.TakeStateSlot();
  m.seqs.emplace(seq_id, std::move(seq));
  out.num_cached_tokens = hits * m.bs();
  return out;
}

absl::StatusOr<bool> BlockManager::CanAppend(uint64_t seq_id, int64_t num_tokens) const {
  const Impl& m = *impl_;
  if (num_tokens < 1) {
    return absl::InvalidArgumentError(fmt::format("num_tokens={} must be >= 1", num_tokens));
  }
  auto s = m.FindResident(seq_id);
  if (!s.ok()) return s.status();
  return m.AppendNeed(**s, num_tokens) <= m.Available();
}

absl::StatusOr<std::optional<BlockCopy>> BlockManager::Append(uint64_t seq_id,
                                                              absl::Span<const int32_t> token_ids,
                                                              int64_t num_tokens) {
  Impl& m = *impl_;
  if (num_tokens < 1) {
    return absl::InvalidArgumentError(fmt::format("num_tokens={} must be >= 1", num_tokens));
  }
  if (m.caching ? static_cast<int64_t>(token_ids.size()) != num_tokens
                : !token_ids.empty() && static_cast<int64_t>(token_ids.size()) != num_tokens) {
    return absl::InvalidArgumentError(fmt::format(
        "seq {}: token_ids has {} ids but num_tokens={}{}", seq_id, token_ids.size(), num_tokens,
        m.caching ? " (token ids are required with prefix caching)" : ""));
  }
  auto found = m.FindResident(seq_id);
  if (!found.ok()) return found.status();
  Impl::Seq& s = **found;
  const int64_t need = m.AppendNeed(s, num_tokens);
  if (need > m.Available()) {
    return absl::ResourceExhaustedError(
        fmt::format("seq {}: appending {} tokens needs {} device blocks, only {} available", seq_id,
                    num_tokens, need, m.Available()));
  }

  const int32_t bs = m.bs();
  const int64_t cur = s.num_tokens;
  // Allocations first (a failure changes nothing).
  ReserveVector(s.blocks, static_cast<size_t>(CeilDiv(cur + num_tokens, bs)));
  if (m.caching) {
    ReserveVector(s.tokens, static_cast<size_t>(cur + num_tokens));
    ReserveVector(s.hashes, static_cast<size_t>((cur + num_tokens) / bs));
  }
  std::optional<BlockCopy> copy;
  if (cur % bs != 0 && m.ref[s.blocks.back()] > 1) {
    const int32_t old_block = s.blocks.back();
    const int32_t new_block = m.TakeFresh();
    m.Release(old_block);  // still referenced by the sharers
    s.blocks.back() = new_block;
    copy = BlockCopy{old_block, new_block};
  }
  const int64_t total = cur + num_tokens;
  const int64_t new_num_blocks = CeilDiv(total, bs);
  while (static_cast<int64_t>(s.blocks.size()) < new_num_blocks) s.blocks.push_back(m.TakeFresh());
  s.num_tokens = total;

  if (m.caching) {
    s.tokens.insert(s.tokens.end(), token_ids.begin(), token_ids.end());
    const int64_t new_full = total / bs;
    const StarLayout* star = s.star ? &*s.star : nullptr;
    for (int64_t i = cur / bs; i < new_full; ++i) {
      s.hashes.push_back(m.PageHash(star, s.extra_key, s.tokens.data(), i, s.hashes.data()));
    }
  }
  return copy;
}

absl::Status BlockManager::MarkComputed(uint64_t seq_id, int64_t num_computed_tokens) {
  Impl& m = *impl_;
  auto found = m.FindResident(seq_id);
  if (!found.ok()) return found.status();
  Impl::Seq& s = **found;
  if (num_computed_tokens < 0 || num_computed_tokens > s.num_tokens) {
    return absl::OutOfRangeError(fmt::format("seq {}: num_computed_tokens={} out of range [0, {}]",
                                             seq_id, num_computed_tokens, s.num_tokens));
  }
  if (!m.caching) return absl::OkStatus();
  const int64_t full = num_computed_tokens / m.bs();
  for (int64_t i = s.num_published; i < full; ++i) m.Publish(s.blocks[i], s.hashes[i]);
  s.num_published = std::max(s.num_published, full);
  return absl::OkStatus();
}

absl::Status BlockManager::Fork(uint64_t parent_id, uint64_t child_id) {
  Impl& m = *impl_;
  ReserveForInserts(m.seqs, 1);  // first: it may move the parent
  auto p = m.FindResident(parent_id);
  if (!p.ok()) return p.status();
  if (m.seqs.contains(child_id)) {
    return absl::AlreadyExistsError(fmt::format("seq {}: sequence id already in use", child_id));
  }
  if (!m.SlotAvailable()) {
    return absl::ResourceExhaustedError(
        fmt::format("seq {}: no free state slot for fork of seq {} (all {} in use)", child_id,
                    parent_id, m.opts.num_state_slots));
  }
  Impl::Seq child = **p;  // copy before inserting (insertion may move the parent)
  child.state_slot = m.TakeStateSlot();
  for (int32_t b : child.blocks) ++m.ref[b];
  m.seqs.emplace(child_id, std::move(child));
  return absl::OkStatus();
}

absl::Status BlockManager::Free(uint64_t seq_id) {
  Impl& m = *impl_;
  auto it = m.seqs.find(seq_id);
  if (it == m.seqs.end()) {
    return absl::NotFoundError(fmt::format("seq {}: unknown sequence id", seq_id));
  }
  Impl::Seq& s = it->second;
  if (s.swapped) {
    for (int32_t h : s.blocks) m.free_host_blocks.push_back(h);
    --m.num_swapped;
  } else {
    // Tail first: the last blocks of a sequence are the least likely to be shared, so with equal
    // recency the LRU evicts them before the prefix they hang from.
    for (size_t i = s.blocks.size(); i-- > 0;) {
      const int32_t b = s.blocks[i];
      // A computed full block that stayed private because an identical one was published first
      // (two sequences computed it at once): when that one has left the cache, this copy takes its
      // place instead of being discarded, so an identical prompt still hits (vLLM keeps every
      // computed copy reachable). While both live, the published copy serves.
      if (m.caching && static_cast<int64_t>(i) < s.num_published && i < s.hashes.size() && !m.published[b] &&
          m.ref[b] == 1 && !m.prefix_map.contains(s.hashes[i]))
        m.Publish(b, s.hashes[i]);
      m.Release(b);
    }
  }
  m.ReleaseStateSlot(s.state_slot);
  m.seqs.erase(it);
  return absl::OkStatus();
}

absl::StatusOr<int64_t> BlockManager::NumTokens(uint64_t seq_id) const {
  auto s = impl_->Find(seq_id);
  if (!s.ok()) return s.status();
  return (*s)->num_tokens;
}

absl::StatusOr<absl::Span<const int32_t>> BlockManager::BlockTable(uint64_t seq_id) const {
  auto s = impl_->FindResident(seq_id);
  if (!s.ok()) return s.status();
  return absl::Span<const int32_t>((*s)->blocks);
}

absl::Status BlockManager::SlotMapping(uint64_t seq_id, int64_t start, int64_t count,
                                       absl::Span<int64_t> out_slots) const {
  auto sp = impl_->FindResident(seq_id);
  if (!sp.ok()) return sp.status();
  const Impl::Seq& s = **sp;
  if (start < 0 || count < 0 || start > s.num_tokens || count > s.num_tokens - start) {
    return absl::OutOfRangeError(
        fmt::format("seq {}: positions [start={}, start+count={}) out of range [0, {})", seq_id,
                    start, start + count, s.num_tokens));
  }
  if (static_cast<int64_t>(out_slots.size()) < count) {
    return absl::InvalidArgumentError(fmt::format(
        "seq {}: out_slots has {} entries, count={} needed", seq_id, out_slots.size(), count));
  }
  // out[i] = table[p / bs] * bs + p % bs for p = start + i, filled one block run at a time.
  const int64_t bs = impl_->bs();
  const int64_t end = start + count;
  int64_t* out = out_slots.data();
  int64_t pos = start;
  while (pos < end) {
    const int64_t off = pos % bs;
    const int64_t run = std::min(bs - off, end - pos);
    const int64_t base = static_cast<int64_t>(s.blocks[pos / bs]) * bs + off;
    for (int64_t j = 0; j < run; ++j) *out++ = base + j;
    pos += run;
  }
  return absl::OkStatus();
}

absl::StatusOr<int32_t> BlockManager::StateSlot(uint64_t seq_id) const {
  auto s = impl_->Find(seq_id);
  if (!s.ok()) return s.status();
  return (*s)->state_slot;
}

absl::StatusOr<bool> BlockManager::IsSwapped(uint64_t seq_id) const {
  auto s = impl_->Find(seq_id);
  if (!s.ok()) return s.status();
  return (*s)->swapped;
}

absl::StatusOr<int32_t> BlockManager::NumBlocks(uint64_t seq_id) const {
  auto s = impl_->Find(seq_id);
  if (!s.ok()) return s.status();
  return static_cast<int32_t>((*s)->blocks.size());
}

absl::StatusOr<std::vector<BlockCopy>> BlockManager::SwapOut(uint64_t seq_id) {
  Impl& m = *impl_;
  auto it = m.seqs.find(seq_id);
  if (it == m.seqs.end()) {
    return absl::NotFoundError(fmt::format("seq {}: unknown sequence id", seq_id));
  }
  Impl::Seq& s = it->second;
  if (s.swapped) {
    return absl::FailedPreconditionError(
        fmt::format("seq {}: sequence is already swapped out", seq_id));
  }
  const size_t n = s.blocks.size();
  if (n > m.free_host_blocks.size()) {
    return absl::ResourceExhaustedError(
        fmt::format("seq {}: swap out needs {} free host blocks, only {} available", seq_id, n,
                    m.free_host_blocks.size()));
  }
  std::vector<BlockCopy> plan(n);
  for (size_t i = 0; i < n; ++i) {
    const int32_t host = m.free_host_blocks.back();
    m.free_host_blocks.pop_back();
    plan[i] = BlockCopy{s.blocks[i], host};
    s.blocks[i] = host;
  }
  // Release tail first, as Free does.
  for (size_t i = n; i-- > 0;) m.Release(plan[i].src);
  s.swapped = true;
  ++m.num_swapped;
  return plan;
}

absl::StatusOr<std::vector<BlockCopy>> BlockManager::SwapIn(uint64_t seq_id) {
  Impl& m = *impl_;
  auto it = m.seqs.find(seq_id);
  if (it == m.seqs.end()) {
    return absl::NotFoundError(fmt::format("seq {}: unknown sequence id", seq_id));
  }
  Impl::Seq& s = it->second;
  if (!s.swapped) {
    return absl::FailedPreconditionError(
        fmt::format("seq {}: sequence is resident, not swapped out", seq_id));
  }
  const size_t n = s.blocks.size();
  // The leading full blocks the caller marked computed before the swap: their host copies hold
  // their K/V, and they keep their keys (vLLM's swapped blocks keep their content hashes).
  const size_t computed =
      m.caching ? static_cast<size_t>(std::min<int64_t>(s.num_published, static_cast<int64_t>(s.hashes.size())))
                : 0;
  // Optionally reuse a device block already cached under the same key: no copy (vLLM's allocator
  // returns the cached block for a known hash). A cached-free one still leaves the free pool.
  int64_t reused = 0, cached_free_reused = 0;
  if (m.opts.swap_in_reuses_cached_blocks) {
    for (size_t i = 0; i < computed; ++i) {
      auto found = m.prefix_map.find(s.hashes[i]);
      if (found == m.prefix_map.end()) continue;
      ++reused;
      if (m.state[found->second] == BlockState::kCachedFree) ++cached_free_reused;
    }
  }
  const int64_t fresh = static_cast<int64_t>(n) - reused;
  if (fresh + cached_free_reused > m.Available()) {
    return absl::ResourceExhaustedError(
        reused == 0 ? fmt::format("seq {}: swap in needs {} free device blocks, only {} available", seq_id, n,
                                  m.Available())
                    : fmt::format("seq {}: swap in needs {} free device blocks ({} fresh, {} cached-free reused), "
                                  "only {} available",
                                  seq_id, fresh + cached_free_reused, fresh, cached_free_reused, m.Available()));
  }
  // Allocations first (a failure changes nothing).
  std::vector<BlockCopy> plan;
  plan.reserve(static_cast<size_t>(fresh));
  std::vector<uint8_t> is_reused(reused > 0 ? n : 0, 0);
  // Reused blocks first: taking fresh ones may evict cached-free blocks, never one reused here.
  if (reused > 0) {
    for (size_t i = 0; i < computed; ++i) {
      auto found = m.prefix_map.find(s.hashes[i]);
      if (found == m.prefix_map.end()) continue;
      m.Acquire(found->second);
      m.free_host_blocks.push_back(s.blocks[i]);
      s.blocks[i] = found->second;
      is_reused[i] = 1;
    }
  }
  for (size_t i = 0; i < n; ++i) {
    if (reused > 0 && is_reused[i]) continue;
    const int32_t dev = m.TakeFresh();
    plan.push_back(BlockCopy{s.blocks[i], dev});
    m.free_host_blocks.push_back(s.blocks[i]);
    s.blocks[i] = dev;
  }
  // Republish the copied computed blocks once every fresh block is taken, so that one evicted by
  // this very swap-in is replaced by its copy (a key still cached elsewhere keeps that block).
  for (size_t i = 0; i < computed; ++i) {
    if (reused > 0 && is_reused[i]) continue;
    m.Publish(s.blocks[i], s.hashes[i]);
  }
  s.swapped = false;
  --m.num_swapped;
  return plan;
}

BlockManagerStats BlockManager::Stats() const {
  const Impl& m = *impl_;
  BlockManagerStats st;
  st.num_device_blocks = m.opts.num_device_blocks;
  st.num_free_blocks = static_cast<int32_t>(m.free_blocks.size());
  st.num_cached_free_blocks = m.lru_size;
  st.num_used_blocks = st.num_device_blocks - st.num_free_blocks - st.num_cached_free_blocks;
  st.num_host_blocks = m.opts.num_host_blocks;
  st.num_free_host_blocks = static_cast<int32_t>(m.free_host_blocks.size());
  st.num_sequences = static_cast<int32_t>(m.seqs.size());
  st.num_swapped_sequences = m.num_swapped;
  st.prefix_queried_blocks = m.prefix_queried_blocks;
  st.prefix_hit_blocks = m.prefix_hit_blocks;
  st.num_evictions = m.num_evictions;
  return st;
}

absl::Status BlockManager::CheckInvariants() const { return impl_->CheckInvariants(); }

absl::Status BlockManager::Impl::CheckInvariants() const {
  auto fail = [](std::string msg) { return absl::InternalError(std::move(msg)); };
  const int32_t n = opts.num_device_blocks;
  const int32_t nh = opts.num_host_blocks;

  // Free list: in range, unique, state kFree, ref 0, unpublished.
  std::vector<uint8_t> seen(n, 0);
  for (int32_t b : free_blocks) {
    if (b < 0 || b >= n) return fail(fmt::format("free list holds block {} outside [0, {})", b, n));
    if (seen[b]) return fail(fmt::format("block {} is on the free list twice", b));
    seen[b] = 1;
    if (state[b] != BlockState::kFree) {
      return fail(fmt::format("block {} is on the free list but in state {}", b,
                              static_cast<int>(state[b])));
    }
    if (ref[b] != 0) return fail(fmt::format("free block {} has ref count {}", b, ref[b]));
    if (published[b]) return fail(fmt::format("free block {} is published in the prefix cache", b));
  }
  // LRU list: consistent links, state kCachedFree, ref 0, published.
  int32_t count = 0;
  int32_t prev = kNil;
  for (int32_t b = lru_head; b != kNil; prev = b, b = lru_next[b]) {
    if (b < 0 || b >= n) return fail(fmt::format("LRU list holds block {} outside [0, {})", b, n));
    if (seen[b]) {
      return fail(fmt::format("block {} is on the LRU list twice or also on the free list", b));
    }
    seen[b] = 1;
    if (lru_prev[b] != prev) {
      return fail(fmt::format("LRU block {} has prev {} but follows {}", b, lru_prev[b], prev));
    }
    if (state[b] != BlockState::kCachedFree) {
      return fail(fmt::format("block {} is on the LRU list but in state {}", b,
                              static_cast<int>(state[b])));
    }
    if (ref[b] != 0) return fail(fmt::format("cached-free block {} has ref count {}", b, ref[b]));
    if (!published[b]) return fail(fmt::format("cached-free block {} is not published", b));
    if (++count > n) return fail("LRU list has a cycle");
  }
  if (prev != lru_tail) return fail(fmt::format("LRU tail is {} but the list ends at {}", lru_tail, prev));
  if (count != lru_size) return fail(fmt::format("LRU list has {} blocks, lru_size={}", count, lru_size));
  // Every block off both lists is used.
  for (int32_t b = 0; b < n; ++b) {
    if (seen[b]) continue;
    if (state[b] != BlockState::kUsed) {
      return fail(fmt::format("block {} is on no list but in state {}", b, static_cast<int>(state[b])));
    }
    if (ref[b] <= 0) return fail(fmt::format("used block {} has ref count {}", b, ref[b]));
  }

  // Ref counts equal table references of resident sequences; host blocks owned by one sequence.
  std::vector<int32_t> refs(n, 0);
  std::vector<uint64_t> host_owner(nh, 0);
  std::vector<uint8_t> host_owned(nh, 0);
  std::vector<uint8_t> slot_used(std::max(opts.num_state_slots, 0), 0);
  std::vector<uint64_t> recomputed;
  std::vector<int64_t> table_pos(n, -1);  // position of a block in the table being checked
  std::vector<uint64_t> table_stamp(n, 0);
  uint64_t stamp = 0;
  int32_t swapped = 0;
  for (const auto& [id, s] : seqs) {
    if (s.num_tokens < 1) return fail(fmt::format("seq {}: num_tokens={} < 1", id, s.num_tokens));
    if (s.star && (s.star->context_len < 0 || s.star->context_block_size <= 0 ||
                   s.star->context_block_size % bs() != 0 || s.star->anchor_size < 1 ||
                   s.star->anchor_size > s.star->context_block_size)) {
      return fail(fmt::format("seq {}: invalid Star layout (context_len={}, context_block_size={}, "
                              "anchor_size={})",
                              id, s.star->context_len, s.star->context_block_size,
                              s.star->anchor_size));
    }
    if (s.num_published < 0 || s.num_published > s.num_tokens / bs()) {
      return fail(fmt::format("seq {}: {} blocks offered to the prefix cache but {} full blocks", id,
                              s.num_published, s.num_tokens / bs()));
    }
    if (static_cast<int64_t>(s.blocks.size()) != CeilDiv(s.num_tokens, bs())) {
      return fail(fmt::format("seq {}: {} blocks for {} tokens (block_size {})", id, s.blocks.size(),
                              s.num_tokens, bs()));
    }
    if (opts.num_state_slots > 0) {
      if (s.state_slot < 0 || s.state_slot >= opts.num_state_slots) {
        return fail(fmt::format("seq {}: state slot {} outside [0, {})", id, s.state_slot,
                                opts.num_state_slots));
      }
      if (slot_used[s.state_slot]) {
        return fail(fmt::format("seq {}: state slot {} held by two sequences", id, s.state_slot));
      }
      slot_used[s.state_slot] = 1;
    } else if (s.state_slot != -1) {
      return fail(fmt::format("seq {}: state slot {} without state slots", id, s.state_slot));
    }
    if (caching) {
      if (static_cast<int64_t>(s.tokens.size()) != s.num_tokens) {
        return fail(fmt::format("seq {}: {} token ids for num_tokens={}", id, s.tokens.size(),
                                s.num_tokens));
      }
      ComputeHashes(s.tokens, s.extra_key, recomputed, s.star ? &*s.star : nullptr);
      if (recomputed != s.hashes) {
        return fail(fmt::format("seq {}: stored hash chain ({} hashes) differs from the one "
                                "recomputed from its tokens ({} hashes)",
                                id, s.hashes.size(), recomputed.size()));
      }
    } else if (!s.tokens.empty() || !s.hashes.empty()) {
      return fail(fmt::format("seq {}: holds token ids without prefix caching", id));
    }
    if (s.swapped) {
      ++swapped;
      for (int32_t h : s.blocks) {
        if (h < 0 || h >= nh) return fail(fmt::format("seq {}: host block {} outside [0, {})", id, h, nh));
        if (host_owned[h]) {
          return fail(fmt::format("host block {} owned by seq {} and seq {}", h, host_owner[h], id));
        }
        host_owned[h] = 1;
        host_owner[h] = id;
      }
      continue;
    }
    const int64_t num_full = s.num_tokens / bs();
    ++stamp;
    for (size_t i = 0; i < s.blocks.size(); ++i) {
      const int32_t b = s.blocks[i];
      if (b < 0 || b >= n) return fail(fmt::format("seq {}: block {} outside [0, {})", id, b, n));
      if (table_stamp[b] == stamp) {
        return fail(fmt::format("seq {}: block {} at table positions {} and {}", id, b,
                                table_pos[b], i));
      }
      table_stamp[b] = stamp;
      table_pos[b] = static_cast<int64_t>(i);
      ++refs[b];
      if (published[b]) {
        if (static_cast<int64_t>(i) >= num_full) {
          return fail(fmt::format("seq {}: published block {} at position {} is not full ({} tokens)",
                                  id, b, i, s.num_tokens));
        }
        if (block_hash[b] != s.hashes[i]) {
          return fail(fmt::format("seq {}: block {} at position {} is cached under hash {:#x} but its "
                                  "tokens hash to {:#x}",
                                  id, b, i, block_hash[b], s.hashes[i]));
        }
      }
    }
  }
  for (int32_t b = 0; b < n; ++b) {
    if (refs[b] != ref[b]) {
      return fail(fmt::format("block {}: ref count {} but {} table references", b, ref[b], refs[b]));
    }
  }
  if (swapped != num_swapped) {
    return fail(fmt::format("{} swapped sequences but num_swapped={}", swapped, num_swapped));
  }
  std::vector<uint8_t> host_free(nh, 0);
  for (int32_t h : free_host_blocks) {
    if (h < 0 || h >= nh) return fail(fmt::format("free host block {} outside [0, {})", h, nh));
    if (host_free[h]) return fail(fmt::format("host block {} is on the free list twice", h));
    if (host_owned[h]) {
      return fail(fmt::format("host block {} is free but owned by seq {}", h, host_owner[h]));
    }
    host_free[h] = 1;
  }
  for (int32_t h = 0; h < nh; ++h) {
    if (!host_free[h] && !host_owned[h]) return fail(fmt::format("host block {} is leaked", h));
  }

  // Prefix cache: map and block hashes agree both ways.
  if (!caching && !prefix_map.empty()) {
    return fail(fmt::format("prefix cache holds {} entries with prefix caching off", prefix_map.size()));
  }
  for (const auto& [h, b] : prefix_map) {
    if (b < 0 || b >= n) return fail(fmt::format("hash {:#x} maps to block {} outside [0, {})", h, b, n));
    if (!published[b] || block_hash[b] != h) {
      return fail(fmt::format("hash {:#x} maps to block {} whose stored hash is {:#x} (published={})",
                              h, b, block_hash[b], static_cast<int>(published[b])));
    }
  }
  int32_t num_published = 0;
  for (int32_t b = 0; b < n; ++b) {
    if (!published[b]) continue;
    ++num_published;
    auto it = prefix_map.find(block_hash[b]);
    if (it == prefix_map.end() || it->second != b) {
      return fail(fmt::format("block {} is marked published under {:#x} but the cache maps it to {}",
                              b, block_hash[b], it == prefix_map.end() ? -1 : it->second));
    }
  }
  if (num_published != static_cast<int32_t>(prefix_map.size())) {
    return fail(fmt::format("{} published blocks but {} cache entries", num_published,
                            prefix_map.size()));
  }

  // State slots: free ones unique and disjoint from held ones, none lost.
  if (opts.num_state_slots > 0) {
    for (int32_t sl : free_state_slots) {
      if (sl < 0 || sl >= opts.num_state_slots) {
        return fail(fmt::format("free state slot {} outside [0, {})", sl, opts.num_state_slots));
      }
      if (slot_used[sl]) return fail(fmt::format("state slot {} is both free and held (or free twice)", sl));
      slot_used[sl] = 1;
    }
    for (int32_t sl = 0; sl < opts.num_state_slots; ++sl) {
      if (!slot_used[sl]) return fail(fmt::format("state slot {} is leaked", sl));
    }
  } else if (!free_state_slots.empty()) {
    return fail("free state slots exist without state slots");
  }
  return absl::OkStatus();
}

}  // namespace kvplug::paged
