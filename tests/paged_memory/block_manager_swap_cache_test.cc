// Prefix-cache gaps against vLLM (reliability round 2, gaps 2 and 3): blocks swapped back in keep
// their keys and are back in the prefix cache at once (no MarkComputed needed), and with
// swap_in_reuses_cached_blocks a swap-in takes a device copy still cached under the same key
// instead of copying it from the host. Contents are modelled per block: a fake device and host
// memory hold, for each block, the tokens its key stands for (the chained prefix up to the block's
// end), moved by the swap plans as an engine moves K/V; every read back must find its own prefix.
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kvplug/paged_memory/block_manager.h"

namespace kvplug::paged {
namespace {

#define EXPECT_INVARIANTS(m) EXPECT_TRUE((m).CheckInvariants().ok()) << (m).CheckInvariants()

using I32s = std::vector<int32_t>;

I32s Tok(int32_t first, int32_t n) {
  I32s v(n);
  std::iota(v.begin(), v.end(), first);
  return v;
}

I32s Cat(I32s a, const I32s& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

std::unique_ptr<BlockManager> Make(int32_t device, int32_t host, bool reuse) {
  BlockManagerOptions o;
  o.block_size = 4;
  o.num_device_blocks = device;
  o.num_host_blocks = host;
  o.enable_prefix_caching = true;
  o.swap_in_reuses_cached_blocks = reuse;
  auto m = BlockManager::Create(o);
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? std::move(*m) : nullptr;
}

I32s Table(const BlockManager& m, uint64_t id) {
  auto t = m.BlockTable(id);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? I32s(t->begin(), t->end()) : I32s();
}

// Block contents by key: block i of a sequence holds the prefix its chained key covers.
class Memory {
 public:
  Memory(int32_t device, int32_t host) : dev_(device, kGarbage), host_(host, kGarbage) {}

  static I32s Content(const I32s& tokens, size_t block) {
    const size_t end = std::min(tokens.size(), (block + 1) * kBs);
    return I32s(tokens.begin(), tokens.begin() + static_cast<std::ptrdiff_t>(end));
  }

  // The engine computes blocks [from, end) of `id` (a prefill after `cached` tokens, say).
  void Compute(const BlockManager& m, uint64_t id, const I32s& tokens, size_t from) {
    const I32s t = Table(m, id);
    for (size_t i = from; i < t.size(); ++i) dev_[t[i]] = Content(tokens, i);
  }
  // Allocate and compute the whole prompt (the prefix hits are already there).
  int64_t Prefill(BlockManager& m, uint64_t id, const I32s& tokens) {
    auto r = m.Allocate(id, tokens, 0);
    EXPECT_TRUE(r.ok()) << r.status();
    if (!r.ok()) return -1;
    Compute(m, id, tokens, static_cast<size_t>(*r / kBs));
    EXPECT_TRUE(m.MarkComputed(id, static_cast<int64_t>(tokens.size())).ok());
    return *r;
  }
  void SwapOut(const std::vector<BlockCopy>& plan) {
    for (const BlockCopy& c : plan) host_[c.dst] = dev_[c.src];
  }
  void SwapIn(const std::vector<BlockCopy>& plan) {
    for (const BlockCopy& c : plan) {
      dev_[c.dst] = host_[c.src];
      host_[c.src] = kGarbage;
    }
  }
  // What the caller reads through the block table (its first `blocks` blocks, all by default) must
  // be the sequence's own prefixes.
  void ExpectReads(const BlockManager& m, uint64_t id, const I32s& tokens, size_t blocks = SIZE_MAX) const {
    const I32s t = Table(m, id);
    ASSERT_EQ(t.size(), (tokens.size() + kBs - 1) / kBs);
    for (size_t i = 0; i < std::min(blocks, t.size()); ++i)
      EXPECT_EQ(dev_[t[i]], Content(tokens, i)) << "seq " << id << " block " << i << " (device block " << t[i] << ")";
  }

 private:
  static constexpr size_t kBs = 4;
  inline static const I32s kGarbage = {-1};
  std::vector<I32s> dev_, host_;
};

// (a) Swapped-in blocks are republished without MarkComputed: freed afterwards, they serve an
// identical prompt although the originals were evicted while the sequence was out.
TEST(BlockManagerSwapCache, SwappedInBlocksAreRepublished) {
  auto m = Make(6, 8, false);
  Memory mem(6, 8);
  const I32s p = Tok(100, 9);  // two full blocks and one token
  ASSERT_EQ(mem.Prefill(*m, 1, p), 0);
  auto out = m->SwapOut(1);
  ASSERT_TRUE(out.ok());
  mem.SwapOut(*out);
  // Other work takes every device block: the cached originals are evicted and overwritten.
  const I32s filler = Tok(500, 24);
  ASSERT_EQ(*m->Allocate(2, filler, 0), 0);
  mem.Compute(*m, 2, filler, 0);  // written but never marked: freed, it leaves nothing cached
  EXPECT_EQ(m->Stats().num_evictions, 2);
  ASSERT_TRUE(m->Free(2).ok());
  auto in = m->SwapIn(1);
  ASSERT_TRUE(in.ok()) << in.status();
  ASSERT_EQ(in->size(), 3u);  // nothing cached to reuse: every block is copied
  mem.SwapIn(*in);
  ASSERT_NO_FATAL_FAILURE(mem.ExpectReads(*m, 1, p));
  EXPECT_INVARIANTS(*m);
  // No MarkComputed after the swap-in: the copies are cached already (vLLM keeps their hashes).
  ASSERT_TRUE(m->Free(1).ok());
  EXPECT_EQ(m->Stats().num_cached_free_blocks, 2);
  EXPECT_INVARIANTS(*m);
  auto again = m->Allocate(3, p, 0);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, 8) << "both full blocks served from the swapped-in copies";
  mem.ExpectReads(*m, 3, p, 2);
  EXPECT_INVARIANTS(*m);
}

// (a) A swap-in that evicts the sequence's own cached originals (the pool is that tight) republishes
// its copies in their place, so an identical prompt hits while the sequence still runs.
TEST(BlockManagerSwapCache, ASwapInThatEvictsTheOriginalsRepublishesTheCopies) {
  auto m = Make(5, 8, false);
  Memory mem(5, 8);
  const I32s p = Tok(100, 9);
  ASSERT_EQ(mem.Prefill(*m, 1, p), 0);
  const I32s t1 = Table(*m, 1);
  auto out = m->SwapOut(1);
  ASSERT_TRUE(out.ok());
  mem.SwapOut(*out);
  const I32s other = Tok(500, 8);
  ASSERT_EQ(*m->Allocate(2, other, 0), 0);  // 2 of the 3 free blocks; never marked
  mem.Compute(*m, 2, other, 0);
  ASSERT_EQ(m->Stats().num_free_blocks, 1);
  ASSERT_EQ(m->Stats().num_cached_free_blocks, 2);
  auto in = m->SwapIn(1);  // one free block, then both cached originals are evicted
  ASSERT_TRUE(in.ok()) << in.status();
  ASSERT_EQ(in->size(), 3u);
  mem.SwapIn(*in);
  EXPECT_EQ(m->Stats().num_evictions, 2);
  ASSERT_NO_FATAL_FAILURE(mem.ExpectReads(*m, 1, p));
  EXPECT_INVARIANTS(*m);
  ASSERT_TRUE(m->Free(2).ok());
  auto dup = m->Allocate(3, p, 0);
  ASSERT_TRUE(dup.ok());
  EXPECT_EQ(*dup, 8) << "the swapped-in copies replace the originals evicted by the swap-in";
  const I32s t1b = Table(*m, 1), t3 = Table(*m, 3);
  EXPECT_EQ(t3[0], t1b[0]);
  EXPECT_EQ(t3[1], t1b[1]);
  mem.ExpectReads(*m, 3, p, 2);
  // MarkComputed after the swap-in changes nothing more (never goes backwards).
  const BlockManagerStats before = m->Stats();
  ASSERT_TRUE(m->MarkComputed(1, 9).ok());
  EXPECT_EQ(m->Stats().num_cached_free_blocks, before.num_cached_free_blocks);
  EXPECT_INVARIANTS(*m);
}

// (a) Blocks that were not computed before the swap (a chunked prefill that had not reached them)
// are not published by the swap-in: their host copies hold no K/V yet.
TEST(BlockManagerSwapCache, UncomputedBlocksStayUnpublished) {
  auto m = Make(8, 8, true);
  const I32s p = Tok(100, 9);
  ASSERT_EQ(*m->Allocate(1, p, 0), 0);
  ASSERT_TRUE(m->MarkComputed(1, 4).ok());  // the first block only
  auto out = m->SwapOut(1);
  ASSERT_TRUE(out.ok());
  auto in = m->SwapIn(1);
  ASSERT_TRUE(in.ok());
  EXPECT_EQ(in->size(), 2u) << "block 0 reused from the cache, blocks 1 and 2 copied";
  const I32s t = Table(*m, 1);
  EXPECT_EQ(t[0], (*out)[0].src);
  ASSERT_TRUE(m->Free(1).ok());
  EXPECT_EQ(m->Stats().num_cached_free_blocks, 1);
  auto again = m->Allocate(2, p, 0);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, 4) << "only the computed block is served";
  EXPECT_INVARIANTS(*m);
}

// (b) The sequence's own blocks are still cached-free on the device when it comes back: they are
// taken again, not copied; only the partial block travels.
TEST(BlockManagerSwapCache, SwapInReusesCachedFreeCopies) {
  auto m = Make(8, 8, true);
  Memory mem(8, 8);
  const I32s p = Tok(100, 9);
  ASSERT_EQ(mem.Prefill(*m, 1, p), 0);
  const I32s t1 = Table(*m, 1);
  EXPECT_EQ(*m->NumBlocks(1), 3);
  auto out = m->SwapOut(1);
  ASSERT_TRUE(out.ok());
  ASSERT_EQ(out->size(), 3u);
  mem.SwapOut(*out);
  EXPECT_EQ(m->Stats().num_cached_free_blocks, 2);
  EXPECT_EQ(*m->NumBlocks(1), 3);  // the capacity a plan may need
  auto in = m->SwapIn(1);
  ASSERT_TRUE(in.ok()) << in.status();
  const I32s t1b = Table(*m, 1);
  EXPECT_EQ(t1b[0], t1[0]);
  EXPECT_EQ(t1b[1], t1[1]);
  ASSERT_EQ(in->size(), 1u) << "only the partial block is copied";
  EXPECT_EQ((*in)[0].src, (*out)[2].dst);
  EXPECT_EQ((*in)[0].dst, t1b[2]);
  mem.SwapIn(*in);
  ASSERT_NO_FATAL_FAILURE(mem.ExpectReads(*m, 1, p));
  BlockManagerStats st = m->Stats();
  EXPECT_EQ(st.num_used_blocks, 3);
  EXPECT_EQ(st.num_cached_free_blocks, 0);
  EXPECT_EQ(st.num_free_blocks, 5);
  EXPECT_EQ(st.num_free_host_blocks, 8);  // the reused blocks' host copies are released too
  EXPECT_EQ(st.num_evictions, 0);
  EXPECT_EQ(st.prefix_queried_blocks, 2);  // admissions only
  EXPECT_INVARIANTS(*m);
  // The sequence runs on: appending fills its partial block in place, no copy on write.
  auto app = m->Append(1, Tok(109, 3), 3);
  ASSERT_TRUE(app.ok());
  EXPECT_FALSE(app->has_value());
  ASSERT_TRUE(m->MarkComputed(1, 12).ok());
  ASSERT_TRUE(m->Free(1).ok());
  st = m->Stats();
  EXPECT_EQ(st.num_used_blocks, 0);
  EXPECT_EQ(st.num_cached_free_blocks, 3);
  EXPECT_EQ(st.num_free_blocks, 5);
  EXPECT_INVARIANTS(*m);
}

// (b) Blocks shared with a resident sequence are taken again (ref counted); a block whose cached
// copy was evicted while the sequence was out is copied and republished.
TEST(BlockManagerSwapCache, SwapInSharesBlocksStillHeldByAnotherSequence) {
  auto m = Make(8, 8, true);
  Memory mem(8, 8);
  const I32s p1 = Tok(100, 9);
  const I32s p2 = Cat(Tok(100, 8), Tok(700, 5));  // shares p1's two full blocks, then 2 of its own
  ASSERT_EQ(mem.Prefill(*m, 1, p1), 0);
  ASSERT_EQ(mem.Prefill(*m, 2, p2), 8);
  const I32s t1 = Table(*m, 1), t2 = Table(*m, 2);
  ASSERT_EQ(m->Stats().num_used_blocks, 5);
  auto out = m->SwapOut(2);
  ASSERT_TRUE(out.ok());
  mem.SwapOut(*out);
  // A filler takes the 4 free blocks and evicts seq 2's cached block 2, overwriting both.
  const I32s filler = Tok(900, 17);
  ASSERT_EQ(*m->Allocate(3, filler, 0), 0);
  mem.Compute(*m, 3, filler, 0);
  EXPECT_EQ(m->Stats().num_evictions, 1);
  ASSERT_TRUE(m->Free(3).ok());
  auto in = m->SwapIn(2);
  ASSERT_TRUE(in.ok()) << in.status();
  const I32s t2b = Table(*m, 2);
  EXPECT_EQ(t2b[0], t1[0]);
  EXPECT_EQ(t2b[1], t1[1]);
  ASSERT_EQ(in->size(), 2u);
  std::set<int32_t> copied;
  for (const BlockCopy& c : *in) copied.insert(c.dst);
  EXPECT_EQ(copied, (std::set<int32_t>{t2b[2], t2b[3]})) << "the shared blocks are not in the plan";
  EXPECT_EQ((*in)[0].src, (*out)[2].dst);
  EXPECT_EQ((*in)[1].src, (*out)[3].dst);
  mem.SwapIn(*in);
  ASSERT_NO_FATAL_FAILURE(mem.ExpectReads(*m, 1, p1));
  ASSERT_NO_FATAL_FAILURE(mem.ExpectReads(*m, 2, p2));
  EXPECT_EQ(m->Stats().num_used_blocks, 5);
  EXPECT_EQ(m->Stats().num_free_host_blocks, 8);
  EXPECT_INVARIANTS(*m);
  // Freeing both leaves the three computed full blocks cached: no leak, no double free.
  ASSERT_TRUE(m->Free(1).ok());
  EXPECT_EQ(m->Stats().num_used_blocks, 4);
  ASSERT_TRUE(m->Free(2).ok());
  BlockManagerStats st = m->Stats();
  EXPECT_EQ(st.num_used_blocks, 0);
  EXPECT_EQ(st.num_cached_free_blocks, 3);
  EXPECT_EQ(st.num_free_blocks, 5);
  EXPECT_INVARIANTS(*m);
  auto again = m->Allocate(4, p2, 0);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, 12);
  mem.ExpectReads(*m, 4, p2, 3);
  EXPECT_INVARIANTS(*m);
}

// (b) A block the sequence had not computed is copied even when an identical computed block is
// cached: sharing it would let the sequence's own prefill write into a shared block.
TEST(BlockManagerSwapCache, UncomputedBlocksAreNotReused) {
  auto m = Make(8, 8, true);
  Memory mem(8, 8);
  const I32s p = Tok(100, 9);
  ASSERT_EQ(*m->Allocate(2, p, 0), 0);  // chunked prefill not started
  ASSERT_EQ(mem.Prefill(*m, 1, p), 0);  // an identical prompt computed meanwhile
  auto out = m->SwapOut(2);
  ASSERT_TRUE(out.ok());
  auto in = m->SwapIn(2);
  ASSERT_TRUE(in.ok());
  EXPECT_EQ(in->size(), 3u);
  const I32s t1 = Table(*m, 1), t2 = Table(*m, 2);
  for (int32_t b : t2) EXPECT_EQ(std::count(t1.begin(), t1.end(), b), 0) << "block " << b;
  EXPECT_EQ(m->Stats().num_used_blocks, 6);
  EXPECT_INVARIANTS(*m);
}

// (b) Shared blocks cost no free block, so a swap-in fits that would not otherwise; cached-free
// ones still leave the pool. A failing swap-in changes nothing.
TEST(BlockManagerSwapCache, ReuseLowersWhatASwapInNeeds) {
  for (bool reuse : {false, true}) {
    SCOPED_TRACE(reuse ? "reuse" : "copy");
    auto m = Make(5, 8, reuse);
    Memory mem(5, 8);
    const I32s p = Tok(100, 9);
    ASSERT_EQ(mem.Prefill(*m, 1, p), 0);
    ASSERT_TRUE(m->Fork(1, 2).ok());
    auto out = m->SwapOut(2);  // every block stays with seq 1
    ASSERT_TRUE(out.ok());
    mem.SwapOut(*out);
    ASSERT_EQ(*m->Allocate(3, Tok(500, 4), 0), 0);
    ASSERT_EQ(m->Stats().num_free_blocks, 1);
    const BlockManagerStats before = m->Stats();
    auto in = m->SwapIn(2);
    if (!reuse) {
      ASSERT_EQ(in.status().code(), absl::StatusCode::kResourceExhausted);
      EXPECT_NE(std::string(in.status().message()).find("needs 3 free device blocks, only 1"), std::string::npos)
          << in.status();
      EXPECT_TRUE(*m->IsSwapped(2));
      EXPECT_EQ(m->Stats().num_free_blocks, before.num_free_blocks);
      EXPECT_EQ(m->Stats().num_free_host_blocks, before.num_free_host_blocks);
      EXPECT_INVARIANTS(*m);
      continue;
    }
    ASSERT_TRUE(in.ok()) << in.status();
    ASSERT_EQ(in->size(), 1u);  // the partial block: a private copy, not the one seq 1 writes
    mem.SwapIn(*in);
    ASSERT_NO_FATAL_FAILURE(mem.ExpectReads(*m, 2, p));
    const I32s t1 = Table(*m, 1), t2 = Table(*m, 2);
    EXPECT_EQ(t2[0], t1[0]);
    EXPECT_EQ(t2[1], t1[1]);
    EXPECT_NE(t2[2], t1[2]);
    EXPECT_EQ(m->Stats().num_free_blocks, 0);
    EXPECT_INVARIANTS(*m);
    // Now nothing is free: a swap-in needing a fresh block fails and changes nothing.
    auto out1 = m->SwapOut(1);
    ASSERT_TRUE(out1.ok());
    ASSERT_EQ(*m->Allocate(4, Tok(600, 4), 0), 0);  // the block seq 1's partial block left
    const BlockManagerStats full = m->Stats();
    const I32s t2_before = Table(*m, 2);
    auto in1 = m->SwapIn(1);
    ASSERT_EQ(in1.status().code(), absl::StatusCode::kResourceExhausted) << in1.status();
    EXPECT_TRUE(*m->IsSwapped(1));
    EXPECT_EQ(m->Stats().num_used_blocks, full.num_used_blocks);
    EXPECT_EQ(m->Stats().num_free_host_blocks, full.num_free_host_blocks);
    EXPECT_EQ(Table(*m, 2), t2_before);
    EXPECT_INVARIANTS(*m);
  }
}

}  // namespace
}  // namespace kvplug::paged
