// Prefix-cache gaps against vLLM (reliability round 2): two sequences that computed the same full
// block at once keep one published copy; when it is evicted, the other copy takes its place once
// its holder frees it, so an identical prompt still hits.
#include <numeric>
#include <vector>

#include "gtest/gtest.h"
#include "kvplug/paged_memory/block_manager.h"

namespace kvplug::paged {
namespace {

#define EXPECT_INVARIANTS(m) EXPECT_TRUE((m).CheckInvariants().ok()) << (m).CheckInvariants()

std::vector<int32_t> Tok(int32_t first, int32_t n) {
  std::vector<int32_t> v(n);
  std::iota(v.begin(), v.end(), first);
  return v;
}

TEST(BlockManagerDuplicates, APrivateDuplicateReplacesAnEvictedCopy) {
  BlockManagerOptions o;
  o.block_size = 4;
  o.num_device_blocks = 6;
  o.enable_prefix_caching = true;
  auto made = BlockManager::Create(o);
  ASSERT_TRUE(made.ok());
  BlockManager& m = **made;
  const std::vector<int32_t> prompt = Tok(100, 9);  // two full blocks and one token
  // Two sequences compute the same prompt at once: both miss, both publish; the second's stay private.
  ASSERT_EQ(*m.Allocate(1, prompt, 0), 0);
  ASSERT_EQ(*m.Allocate(2, prompt, 0), 0);
  ASSERT_TRUE(m.MarkComputed(1, 9).ok());
  ASSERT_TRUE(m.MarkComputed(2, 9).ok());
  EXPECT_INVARIANTS(m);
  // The first frees and its cached copies are evicted by other work.
  ASSERT_TRUE(m.Free(1).ok());
  ASSERT_EQ(*m.Allocate(3, Tok(500, 12), 0), 0);  // 3 blocks: all free ones, then the LRU
  EXPECT_GE(m.Stats().num_evictions, 1);
  ASSERT_TRUE(m.Free(3).ok());
  EXPECT_INVARIANTS(m);
  // The second frees: its private copies are published in place of the evicted ones.
  ASSERT_TRUE(m.Free(2).ok());
  EXPECT_INVARIANTS(m);
  auto again = m.Allocate(4, prompt, 0);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, 8) << "both full blocks served from the second sequence's copies";
  ASSERT_TRUE(m.Free(4).ok());
  EXPECT_INVARIANTS(m);
}

TEST(BlockManagerDuplicates, APrivateCopyOfAStillCachedBlockIsDiscarded) {
  BlockManagerOptions o;
  o.block_size = 4;
  o.num_device_blocks = 8;
  o.enable_prefix_caching = true;
  auto made = BlockManager::Create(o);
  ASSERT_TRUE(made.ok());
  BlockManager& m = **made;
  const std::vector<int32_t> prompt = Tok(100, 9);
  ASSERT_EQ(*m.Allocate(1, prompt, 0), 0);
  ASSERT_EQ(*m.Allocate(2, prompt, 0), 0);
  ASSERT_TRUE(m.MarkComputed(1, 9).ok());
  ASSERT_TRUE(m.MarkComputed(2, 9).ok());
  ASSERT_TRUE(m.Free(2).ok());  // the published copies live on in sequence 1: 2's go back to free
  EXPECT_INVARIANTS(m);
  const BlockManagerStats st = m.Stats();
  EXPECT_EQ(st.num_cached_free_blocks, 0);
  EXPECT_EQ(st.num_used_blocks, 3);
  ASSERT_TRUE(m.Free(1).ok());
  EXPECT_EQ(m.Stats().num_cached_free_blocks, 2);
  EXPECT_INVARIANTS(m);
}

}  // namespace
}  // namespace kvplug::paged
