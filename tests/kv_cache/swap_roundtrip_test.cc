// Swap out and back in round-trips K/V content bit-exactly through the real KvCache (CPU), driven by
// the block manager's plans, as an engine does: sequences are allocated, written (random bit
// patterns, NaN payloads and signed zeros included, so any conversion or partial copy shows), forked
// with copy-on-write copies applied, swapped out under pressure (their device blocks are then reused
// and overwritten by other sequences) and swapped back in to different blocks. After every swap in,
// every position of every layer of the sequence must hold exactly the bytes written for it. Every
// dtype and both layouts, in caches kvplug owns and in caller tensors with padded strides.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kvplug/kv_cache/kv_cache.h"
#include "kvplug/paged_memory/block_manager.h"

namespace kvplug::kv {
namespace {

using paged::BlockCopy;
using paged::BlockManager;

constexpr int32_t kBS = 4, kLayers = 3, kHeads = 2, kHead = 8, kBlocks = 24, kHostBlocks = 16;

struct Param {
  DType dtype;
  Layout layout;
  bool external;  // caller tensors with padded strides
};

class SwapRoundTrip : public ::testing::TestWithParam<Param> {
 protected:
  void SetUp() override {
    KvCacheOptions o;
    o.num_layers = kLayers;
    o.num_blocks = kBlocks;
    o.block_size = kBS;
    o.num_kv_heads = kHeads;
    o.head_size = kHead;
    o.dtype = GetParam().dtype;
    o.layout = GetParam().layout;
    o.num_host_blocks = kHostBlocks;
    esize_ = DTypeSize(o.dtype);
    if (GetParam().external) {
      // Padded head and position strides: rows are not packed, so copies go row by row.
      std::vector<PagedLayer> layers;
      for (int32_t l = 0; l < kLayers; ++l) {
        PagedLayer p = MakeContiguousLayer(nullptr, o, kBlocks);
        p.stride_head = kHead + 3;
        p.stride_pos = p.stride_head * kHeads + 5;
        const int64_t block = p.stride_pos * kBS + 2;
        if (o.layout == Layout::kKvFirst) {
          p.stride_block = block;
          p.stride_kv = block * kBlocks;
        } else {
          p.stride_kv = block;
          p.stride_block = 2 * block;
        }
        storage_.emplace_back(static_cast<size_t>(2 * block * kBlocks) * esize_, uint8_t{0xee});
        p.data = storage_.back().data();
        layers.push_back(p);
      }
      auto c = KvCache::CreateExternal(o, std::move(layers));
      ASSERT_TRUE(c.ok()) << c.status();
      cache_ = std::move(*c);
    } else {
      auto c = KvCache::Create(o);
      ASSERT_TRUE(c.ok()) << c.status();
      cache_ = std::move(*c);
    }
    paged::BlockManagerOptions bo;
    bo.block_size = kBS;
    bo.num_device_blocks = kBlocks;
    bo.num_host_blocks = kHostBlocks;
    bo.enable_prefix_caching = true;
    auto m = BlockManager::Create(bo);
    ASSERT_TRUE(m.ok()) << m.status();
    bm_ = std::move(*m);
  }

  size_t RowBytes() const { return static_cast<size_t>(kHead) * esize_; }

  // Random bytes for one token of one layer: K and V rows of every head, in the cache's dtype.
  std::vector<uint8_t> RandomToken() {
    std::vector<uint8_t> bytes(2 * kHeads * RowBytes());
    for (auto& b : bytes) b = static_cast<uint8_t>(rng_());
    return bytes;
  }

  // Writes positions [start, end) of `id` through Write() with the cache's own dtype (a memcpy).
  void WriteTokens(uint64_t id, int64_t start, int64_t end) {
    if (end <= start) return;
    const int64_t n = end - start;
    std::vector<int64_t> slots(n);
    ASSERT_TRUE(bm_->SlotMapping(id, start, n, absl::MakeSpan(slots)).ok());
    auto& seq = seqs_[id];
    for (int32_t l = 0; l < kLayers; ++l) {
      std::vector<uint8_t> k(n * kHeads * RowBytes()), v(k.size());
      for (int64_t t = 0; t < n; ++t) {
        std::vector<uint8_t> token = RandomToken();
        seq.bytes[l].resize(std::max<size_t>(seq.bytes[l].size(), end));
        seq.bytes[l][start + t] = token;
        std::memcpy(k.data() + t * kHeads * RowBytes(), token.data(), kHeads * RowBytes());
        std::memcpy(v.data() + t * kHeads * RowBytes(), token.data() + kHeads * RowBytes(), kHeads * RowBytes());
      }
      TensorView kv[2];
      for (int i = 0; i < 2; ++i) {
        kv[i].data = i == 0 ? k.data() : v.data();
        kv[i].dtype = GetParam().dtype;
        kv[i].ndim = 3;
        kv[i].shape = {n, kHeads, kHead};
        kv[i].strides = {kHeads * kHead, kHead, 1};
      }
      ASSERT_TRUE(cache_->Write(l, kv[0], kv[1], slots).ok());
    }
  }

  // Every written position of `id` holds exactly its bytes, in every layer.
  void Verify(uint64_t id) {
    const auto& seq = seqs_[id];
    auto table = bm_->BlockTable(id);
    ASSERT_TRUE(table.ok());
    for (int32_t l = 0; l < kLayers; ++l) {
      const PagedLayer& p = cache_->layer(l);
      for (int64_t pos = 0; pos < static_cast<int64_t>(seq.bytes[l].size()); ++pos) {
        const int32_t block = (*table)[pos / kBS];
        const auto& want = seq.bytes[l][pos];
        for (int kv = 0; kv < 2; ++kv)
          for (int h = 0; h < kHeads; ++h)
            ASSERT_EQ(std::memcmp(p.Row(kv, block, pos % kBS, h), want.data() + (kv * kHeads + h) * RowBytes(),
                                  RowBytes()),
                      0)
                << "seq " << id << " layer " << l << " position " << pos << " (block " << block << ") kv " << kv
                << " head " << h;
      }
    }
  }

  struct Seq {
    std::vector<int32_t> tokens;
    std::vector<std::vector<uint8_t>> bytes[kLayers];  // per layer, per position
    bool swapped = false;
  };

  std::mt19937_64 rng_{42};
  size_t esize_ = 4;
  std::vector<std::vector<uint8_t>> storage_;
  std::unique_ptr<KvCache> cache_;
  std::unique_ptr<BlockManager> bm_;
  std::map<uint64_t, Seq> seqs_;
};

TEST_P(SwapRoundTrip, ContentSurvivesSwapOutReuseAndSwapIn) {
  int swap_rounds = 0, cows = 0, reused_blocks = 0;
  uint64_t next = 1;
  std::uniform_int_distribution<int> coin(0, 9);
  for (int step = 0; step < 3000; ++step) {
    const int action = coin(rng_);
    if (action < 3 || seqs_.empty()) {
      // Allocate: unique tokens per sequence (no prefix hits: every byte is this sequence's own).
      const uint64_t id = next++;
      std::vector<int32_t> prompt(1 + coin(rng_) + coin(rng_));
      for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = static_cast<int32_t>(id * 1000 + i);
      auto r = bm_->Allocate(id, prompt, 0);
      if (!r.ok()) continue;
      ASSERT_EQ(*r, 0);
      seqs_[id].tokens = prompt;
      ASSERT_NO_FATAL_FAILURE(WriteTokens(id, 0, static_cast<int64_t>(prompt.size())));
      ASSERT_TRUE(bm_->MarkComputed(id, static_cast<int64_t>(prompt.size())).ok());
      continue;
    }
    auto it = std::next(seqs_.begin(), std::uniform_int_distribution<int>(0, static_cast<int>(seqs_.size()) - 1)(rng_));
    const uint64_t id = it->first;
    Seq& s = it->second;
    if (action < 5 && !s.swapped) {
      // Decode tokens; after a fork the shared last block is copied first.
      const int32_t k = 1 + coin(rng_) % 3;
      std::vector<int32_t> t(k);
      for (int32_t i = 0; i < k; ++i) t[i] = static_cast<int32_t>(id * 1000 + s.tokens.size() + i);
      auto r = bm_->Append(id, t, k);
      if (!r.ok()) continue;
      if (r->has_value()) {
        ASSERT_TRUE(cache_->CopyBlocks({**r}).ok());
        ++cows;
      }
      const int64_t start = static_cast<int64_t>(s.tokens.size());
      s.tokens.insert(s.tokens.end(), t.begin(), t.end());
      ASSERT_NO_FATAL_FAILURE(WriteTokens(id, start, static_cast<int64_t>(s.tokens.size())));
      ASSERT_TRUE(bm_->MarkComputed(id, static_cast<int64_t>(s.tokens.size())).ok());
    } else if (action < 6 && !s.swapped) {
      const uint64_t child = next++;
      if (!bm_->Fork(id, child).ok()) continue;
      seqs_[child] = seqs_[id];
    } else if (action < 8 && !s.swapped) {
      ASSERT_NO_FATAL_FAILURE(Verify(id));
      auto plan = bm_->SwapOut(id);
      if (!plan.ok()) continue;
      ASSERT_TRUE(cache_->SwapOut(*plan).ok());
      s.swapped = true;
      // The freed device blocks get reused and overwritten: a filler takes (and scribbles over)
      // every free block, then is freed again, so the swap in lands on overwritten blocks.
      const uint64_t filler = next++;
      std::vector<int32_t> prompt(static_cast<size_t>(bm_->Stats().num_free_blocks) * kBS);
      for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = static_cast<int32_t>(filler * 1000 + i);
      if (!prompt.empty() && bm_->Allocate(filler, prompt, 0).ok()) {
        seqs_[filler].tokens = prompt;
        ASSERT_NO_FATAL_FAILURE(WriteTokens(filler, 0, static_cast<int64_t>(prompt.size())));
        reused_blocks += static_cast<int>(plan->size());
        ASSERT_TRUE(bm_->Free(filler).ok());
        seqs_.erase(filler);
      }
    } else if (s.swapped) {
      auto plan = bm_->SwapIn(id);
      if (!plan.ok()) continue;
      ASSERT_TRUE(cache_->SwapIn(*plan).ok());
      s.swapped = false;
      ++swap_rounds;
      ASSERT_NO_FATAL_FAILURE(Verify(id)) << "after swap round " << swap_rounds;
    } else {
      ASSERT_TRUE(bm_->Free(id).ok());
      seqs_.erase(it);
    }
  }
  for (const auto& [id, s] : seqs_)
    if (!s.swapped) { ASSERT_NO_FATAL_FAILURE(Verify(id)); }
  ASSERT_TRUE(bm_->CheckInvariants().ok());
  std::printf("%d swap round trips, %d copy-on-write copies, %d swapped-out blocks overwritten\n", swap_rounds,
              cows, reused_blocks);
  EXPECT_GT(swap_rounds, 50);
  EXPECT_GT(cows, 10);
  EXPECT_GT(reused_blocks, 50);
}

INSTANTIATE_TEST_SUITE_P(
    DtypesAndLayouts, SwapRoundTrip,
    ::testing::Values(Param{DType::kF32, Layout::kKvFirst, false}, Param{DType::kF16, Layout::kBlockFirst, false},
                      Param{DType::kBF16, Layout::kKvFirst, false}, Param{DType::kF32, Layout::kBlockFirst, true},
                      Param{DType::kBF16, Layout::kKvFirst, true}, Param{DType::kF16, Layout::kKvFirst, true}));

}  // namespace
}  // namespace kvplug::kv
