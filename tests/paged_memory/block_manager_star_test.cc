// Star Attention-aware prefix keys (BlockManager::AllocateStar): context blocks keyed by the anchor,
// their own tokens and their start position; query pages keyed by the whole context.
#include <map>
#include <numeric>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kvplug/paged_memory/block_manager.h"

namespace kvplug::paged {
namespace {

using I32s = std::vector<int32_t>;
using U8s = std::vector<uint8_t>;

#define EXPECT_INVARIANTS(m) EXPECT_TRUE((m).CheckInvariants().ok()) << (m).CheckInvariants()
#define EXPECT_CONTAINS(text, sub)                                                 \
  EXPECT_NE(std::string(text).find(sub), std::string::npos)                        \
      << "\"" << std::string(text) << "\" does not contain \"" << (sub) << "\""

// Pages of 4 tokens, Star blocks of 8 (two pages), an anchor of 4 (page 0).
constexpr int32_t kBs = 4;

BlockManagerOptions Opts(int32_t device, bool caching = true, int32_t host = 0) {
  BlockManagerOptions o;
  o.block_size = kBs;
  o.num_device_blocks = device;
  o.num_host_blocks = host;
  o.enable_prefix_caching = caching;
  o.hash_seed = 7;
  return o;
}

std::unique_ptr<BlockManager> Make(BlockManagerOptions o) {
  auto m = BlockManager::Create(o);
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? std::move(*m) : nullptr;
}

I32s Tok(int32_t first, int32_t n) {
  I32s v(n);
  std::iota(v.begin(), v.end(), first);
  return v;
}
I32s Cat(std::initializer_list<I32s> parts) {
  I32s out;
  for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

StarLayout Layout(int64_t context_len, int32_t cbs = 8, int32_t anchor = 4) {
  return StarLayout{context_len, cbs, anchor};
}

// A document: three Star blocks of context (24 tokens) and a query of 5 tokens (29 tokens, 8 pages:
// 6 context pages, a full query page 6, a partial page 7).
I32s Doc(int32_t block1_first = 200, int32_t anchor_first = 100) {
  return Cat({Tok(anchor_first, 8), Tok(block1_first, 8), Tok(300, 8), Tok(900, 5)});
}
constexpr int64_t kCtx = 24;

// AllocateStar, then everything computed.
StarAllocation StarComputed(BlockManager& m, uint64_t id, const I32s& t, const StarLayout& l,
                            uint64_t key = 0) {
  auto r = m.AllocateStar(id, t, key, l);
  EXPECT_TRUE(r.ok()) << r.status();
  if (!r.ok()) return {};
  EXPECT_TRUE(m.MarkComputed(id, static_cast<int64_t>(t.size())).ok());
  EXPECT_INVARIANTS(m);
  return *r;
}

TEST(BlockManagerStar, ReusesUnchangedStarBlocksAfterAChangedOne) {
  auto m = Make(Opts(32));
  StarComputed(*m, 1, Doc(), Layout(kCtx));
  const auto before = m->Stats();
  auto r = m->AllocateStar(2, Doc(250), 0, Layout(kCtx));
  ASSERT_TRUE(r.ok()) << r.status();
  // Star block 0 (pages 0, 1) and Star block 2 (pages 4, 5) hit; block 1 and the query miss.
  EXPECT_EQ(r->cached_blocks, (U8s{1, 1, 0, 0, 1, 1, 0, 0}));
  EXPECT_EQ(r->num_cached_tokens, 16);
  const auto after = m->Stats();
  EXPECT_EQ(after.prefix_queried_blocks - before.prefix_queried_blocks, 7);
  EXPECT_EQ(after.prefix_hit_blocks - before.prefix_hit_blocks, 4);
  const I32s t1(m->BlockTable(1)->begin(), m->BlockTable(1)->end());
  const I32s t2(m->BlockTable(2)->begin(), m->BlockTable(2)->end());
  for (int i : {0, 1, 4, 5}) EXPECT_EQ(t1[i], t2[i]) << i;
  for (int i : {2, 3, 6, 7}) EXPECT_NE(t1[i], t2[i]) << i;
  EXPECT_INVARIANTS(*m);
}

TEST(BlockManagerStar, NormalKeysMissEveryPageAfterTheChange) {
  auto m = Make(Opts(32));
  ASSERT_TRUE(m->Allocate(1, Doc(), 0).ok());
  ASSERT_TRUE(m->MarkComputed(1, 29).ok());
  auto r = m->Allocate(2, Doc(250), 0);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, 8);  // Star block 0 only: block 2's pages miss
  EXPECT_INVARIANTS(*m);
}

TEST(BlockManagerStar, DifferentAnchorMissesEverything) {
  auto m = Make(Opts(32));
  StarComputed(*m, 1, Doc(), Layout(kCtx));
  auto r = m->AllocateStar(2, Doc(200, 500), 0, Layout(kCtx));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->cached_blocks, U8s(8, 0));
  EXPECT_EQ(r->num_cached_tokens, 0);
  // Only the last anchor token differs: still every page misses.
  I32s t = Doc();
  t[3] = 4242;
  auto r2 = m->AllocateStar(3, t, 0, Layout(kCtx));
  ASSERT_TRUE(r2.ok());
  EXPECT_EQ(r2->cached_blocks, U8s(8, 0));
  EXPECT_INVARIANTS(*m);
}

TEST(BlockManagerStar, AnchorSizeAndExtraKeyArePartOfTheKey) {
  auto m = Make(Opts(40));
  StarComputed(*m, 1, Doc(), Layout(kCtx));
  // A smaller anchor: Star block 0 is causal attention either way (hits), later blocks miss.
  auto r = m->AllocateStar(2, Doc(), 0, Layout(kCtx, 8, 2));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->cached_blocks, (U8s{1, 1, 0, 0, 0, 0, 0, 0}));
  auto r2 = m->AllocateStar(3, Doc(), 1, Layout(kCtx));
  ASSERT_TRUE(r2.ok());
  EXPECT_EQ(r2->cached_blocks, U8s(8, 0));
  EXPECT_INVARIANTS(*m);
}

TEST(BlockManagerStar, DifferentStartPositionMisses) {
  auto m = Make(Opts(40));
  StarComputed(*m, 1, Doc(), Layout(kCtx));
  // Blocks 1 and 2 swapped: same tokens, other start positions.
  const I32s t = Cat({Tok(100, 8), Tok(300, 8), Tok(200, 8), Tok(900, 5)});
  auto r = m->AllocateStar(2, t, 0, Layout(kCtx));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->cached_blocks, (U8s{1, 1, 0, 0, 0, 0, 0, 0}));
  // Star blocks of 12: page 2 is inside block 0 (chained), page 3 starts block 1 at position 12.
  auto r2 = m->AllocateStar(3, Doc(), 0, Layout(kCtx, 12, 4));
  ASSERT_TRUE(r2.ok());
  EXPECT_EQ(r2->cached_blocks, (U8s{1, 1, 0, 0, 0, 0, 0, 0}));
  // Star blocks of 16 start at 16 too: Star block 2 of the first document (same anchor, tokens and
  // start) is Star block 1 here, and hits.
  auto r3 = m->AllocateStar(4, Doc(250), 0, Layout(kCtx, 16, 4));
  ASSERT_TRUE(r3.ok());
  EXPECT_EQ(r3->cached_blocks, (U8s{1, 1, 0, 0, 1, 1, 0, 0}));
  EXPECT_INVARIANTS(*m);
}

TEST(BlockManagerStar, NormalAndStarKeysNeverCrossHit) {
  for (bool star_first : {false, true}) {
    auto m = Make(Opts(32));
    const I32s t = Doc();
    if (star_first) {
      StarComputed(*m, 1, t, Layout(kCtx));
      auto r = m->Allocate(2, t, 0);
      ASSERT_TRUE(r.ok());
      EXPECT_EQ(*r, 0);
    } else {
      ASSERT_TRUE(m->Allocate(1, t, 0).ok());
      ASSERT_TRUE(m->MarkComputed(1, 29).ok());
      auto r = m->AllocateStar(2, t, 0, Layout(kCtx));
      ASSERT_TRUE(r.ok());
      EXPECT_EQ(r->cached_blocks, U8s(8, 0));
    }
    EXPECT_INVARIANTS(*m);
    // No context at all (context_len = 0) is still a Star key: no cross hit either.
    auto r0 = m->AllocateStar(3, t, 0, Layout(0));
    ASSERT_TRUE(r0.ok());
    EXPECT_EQ(r0->num_cached_tokens, 0);
  }
}

TEST(BlockManagerStar, LastTokenIsNeverServedFromTheCache) {
  auto m = Make(Opts(32));
  // The prompt is exactly the context: 6 full pages, page 5 holds the last token.
  const I32s doc = Doc();
  const I32s ctx(doc.begin(), doc.begin() + kCtx);
  StarComputed(*m, 1, ctx, Layout(kCtx));
  auto r = m->AllocateStar(2, ctx, 0, Layout(kCtx));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->cached_blocks, (U8s{1, 1, 1, 1, 1, 0}));
  EXPECT_EQ(r->num_cached_tokens, 20);
  // With block 1 changed, the last page (block 2's second) would hit: it is not reused.
  I32s other = ctx;
  for (int i = 8; i < 16; ++i) other[i] += 50;
  auto r2 = m->AllocateStar(3, other, 0, Layout(kCtx));
  ASSERT_TRUE(r2.ok());
  EXPECT_EQ(r2->cached_blocks, (U8s{1, 1, 0, 0, 1, 0}));
  EXPECT_INVARIANTS(*m);
}

TEST(BlockManagerStar, QueryPagesHitOnlyWhenTheWholeContextMatches) {
  auto m = Make(Opts(64));
  const I32s t = Cat({Doc(), Tok(950, 4)});  // 33 tokens: query pages 6 and 7 full, page 8 partial
  StarComputed(*m, 1, t, Layout(kCtx));
  auto same = m->AllocateStar(2, t, 0, Layout(kCtx));
  ASSERT_TRUE(same.ok());
  EXPECT_EQ(same->cached_blocks, (U8s{1, 1, 1, 1, 1, 1, 1, 1, 0}));
  // Block 1 differs: block 2 hits, the query pages do not (they see the whole context).
  const I32s t2 = Cat({Doc(250), Tok(950, 4)});
  auto other = m->AllocateStar(3, t2, 0, Layout(kCtx));
  ASSERT_TRUE(other.ok());
  EXPECT_EQ(other->cached_blocks, (U8s{1, 1, 0, 0, 1, 1, 0, 0, 0}));
  // Same tokens, a shorter context (pages 5.. are query tokens now): context pages 0-4 hit, the
  // rest misses.
  auto shorter = m->AllocateStar(4, t, 0, Layout(20));
  ASSERT_TRUE(shorter.ok());
  EXPECT_EQ(shorter->cached_blocks, (U8s{1, 1, 1, 1, 1, 0, 0, 0, 0}));
  // A context ending inside a page (22): page 5 straddles the boundary and keys with the layout.
  auto straddle = m->AllocateStar(5, t, 0, Layout(22));
  ASSERT_TRUE(straddle.ok());
  EXPECT_EQ(straddle->cached_blocks, (U8s{1, 1, 1, 1, 1, 0, 0, 0, 0}));
  EXPECT_INVARIANTS(*m);
}

TEST(BlockManagerStar, AppendAndMarkComputedPublishStarKeys) {
  auto m = Make(Opts(64));
  const I32s t = Cat({Doc(), Tok(950, 7)});  // 36 tokens: 9 full pages
  // The context first, computed one Star block at a time, then the query appended in pieces.
  const I32s ctx(t.begin(), t.begin() + kCtx);
  auto r = m->AllocateStar(1, ctx, 0, Layout(kCtx));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->num_cached_tokens, 0);
  for (int64_t mark : {8, 16, 24}) {
    ASSERT_TRUE(m->MarkComputed(1, mark).ok());
    EXPECT_INVARIANTS(*m);
  }
  ASSERT_TRUE(m->Append(1, I32s(t.begin() + 24, t.begin() + 27), 3).ok());
  EXPECT_INVARIANTS(*m);
  ASSERT_TRUE(m->Append(1, I32s(t.begin() + 27, t.end()), 9).ok());
  EXPECT_INVARIANTS(*m);
  ASSERT_TRUE(m->MarkComputed(1, 36).ok());
  ASSERT_TRUE(m->Free(1).ok());
  EXPECT_INVARIANTS(*m);
  // The identical request keyed at once hits every page but the one holding the last token.
  auto again = m->AllocateStar(2, t, 0, Layout(kCtx));
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->cached_blocks, (U8s{1, 1, 1, 1, 1, 1, 1, 1, 0}));
  EXPECT_EQ(again->num_cached_tokens, 32);
  EXPECT_INVARIANTS(*m);
}

TEST(BlockManagerStar, MarkComputedPublishesTheMissedBlocksBetweenHits) {
  auto m = Make(Opts(64));
  StarComputed(*m, 1, Doc(), Layout(kCtx));
  auto r = m->AllocateStar(2, Doc(250), 0, Layout(kCtx));
  ASSERT_TRUE(r.ok());
  ASSERT_EQ(r->cached_blocks, (U8s{1, 1, 0, 0, 1, 1, 0, 0}));
  // Nothing of block 1 is published before it is computed.
  auto early = m->AllocateStar(3, Doc(250), 0, Layout(kCtx));
  ASSERT_TRUE(early.ok());
  EXPECT_EQ(early->cached_blocks, (U8s{1, 1, 0, 0, 1, 1, 0, 0}));
  ASSERT_TRUE(m->Free(3).ok());
  // The caller recomputes Star block 1 and marks it computed (block 2 is a hit below the mark).
  ASSERT_TRUE(m->MarkComputed(2, 16).ok());
  EXPECT_INVARIANTS(*m);
  auto later = m->AllocateStar(4, Doc(250), 0, Layout(kCtx));
  ASSERT_TRUE(later.ok());
  EXPECT_EQ(later->cached_blocks, (U8s{1, 1, 1, 1, 1, 1, 0, 0}));
  ASSERT_TRUE(m->MarkComputed(2, 29).ok());
  ASSERT_TRUE(m->Free(4).ok());
  auto full = m->AllocateStar(5, Doc(250), 0, Layout(kCtx));
  ASSERT_TRUE(full.ok());
  EXPECT_EQ(full->cached_blocks, (U8s{1, 1, 1, 1, 1, 1, 1, 0}));
  EXPECT_INVARIANTS(*m);
}

TEST(BlockManagerStar, ForkKeepsStarKeys) {
  auto m = Make(Opts(64));
  const I32s t = Doc();
  StarComputed(*m, 1, t, Layout(kCtx));
  ASSERT_TRUE(m->Fork(1, 2).ok());
  EXPECT_INVARIANTS(*m);
  // The child's appended tokens fill page 7 (copy on write) and page 8; keys are the Star chain.
  auto copy = m->Append(2, Tok(960, 7), 7);
  ASSERT_TRUE(copy.ok());
  EXPECT_TRUE(copy->has_value());
  ASSERT_TRUE(m->MarkComputed(2, 36).ok());
  EXPECT_INVARIANTS(*m);
  const I32s all = Cat({t, Tok(960, 7)});
  auto r = m->AllocateStar(3, all, 0, Layout(kCtx));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->cached_blocks, (U8s{1, 1, 1, 1, 1, 1, 1, 1, 0}));
  // Keyed normally, the same tokens hit nothing.
  auto n = m->Allocate(4, all, 0);
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 0);
  EXPECT_INVARIANTS(*m);
}

TEST(BlockManagerStar, SwapOutAndInKeepStarKeys) {
  auto m = Make(Opts(32, true, 16));
  const I32s t = Doc();
  StarComputed(*m, 1, t, Layout(kCtx));
  ASSERT_TRUE(m->SwapOut(1).ok());
  EXPECT_INVARIANTS(*m);
  ASSERT_TRUE(m->SwapIn(1).ok());
  EXPECT_INVARIANTS(*m);
  ASSERT_TRUE(m->Append(1, Tok(960, 3), 3).ok());
  ASSERT_TRUE(m->MarkComputed(1, 32).ok());
  EXPECT_INVARIANTS(*m);
  auto r = m->AllocateStar(2, Cat({t, Tok(960, 4)}), 0, Layout(kCtx));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->cached_blocks, (U8s{1, 1, 1, 1, 1, 1, 1, 1, 0}));
  EXPECT_INVARIANTS(*m);
}

TEST(BlockManagerStar, EvictionTakesTheMissedBlocksNotTheHits) {
  // A pool of exactly 8 blocks: the first document, freed, leaves 8 cached-free blocks.
  auto m = Make(Opts(8));
  StarComputed(*m, 1, Doc(), Layout(kCtx));
  const I32s t1(m->BlockTable(1)->begin(), m->BlockTable(1)->end());
  ASSERT_TRUE(m->Free(1).ok());
  EXPECT_EQ(m->Stats().num_cached_free_blocks, 7);  // the partial page is not cached
  EXPECT_EQ(m->CanAllocateStar(Doc(250), 29, 0, Layout(kCtx)), AllocVerdict::kOk);
  auto r = m->AllocateStar(2, Doc(250), 0, Layout(kCtx));
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->cached_blocks, (U8s{1, 1, 0, 0, 1, 1, 0, 0}));
  const I32s t2(m->BlockTable(2)->begin(), m->BlockTable(2)->end());
  for (int i : {0, 1, 4, 5}) EXPECT_EQ(t1[i], t2[i]) << i;
  EXPECT_EQ(m->Stats().num_evictions, 3);  // pages 2, 3 and 6 of the first document
  EXPECT_EQ(m->Stats().num_free_blocks + m->Stats().num_cached_free_blocks, 0);
  EXPECT_INVARIANTS(*m);
  ASSERT_TRUE(m->MarkComputed(2, 29).ok());
  ASSERT_TRUE(m->Free(2).ok());
  // The first document again: its block 1 and query were evicted, block 0 and 2 are cached.
  auto again = m->AllocateStar(3, Doc(), 0, Layout(kCtx));
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->cached_blocks, (U8s{1, 1, 0, 0, 1, 1, 0, 0}));
  EXPECT_INVARIANTS(*m);
}

TEST(BlockManagerStar, ExhaustionChangesNothing) {
  auto m = Make(Opts(10));
  StarComputed(*m, 1, Doc(), Layout(kCtx));  // 8 blocks used
  const auto before = m->Stats();
  auto r = m->AllocateStar(2, Doc(250), 0, Layout(kCtx));  // 4 hits, 4 fresh > 2 free
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(m->CanAllocateStar(Doc(250), 29, 0, Layout(kCtx)), AllocVerdict::kLater);
  const auto after = m->Stats();
  EXPECT_EQ(after.num_free_blocks, before.num_free_blocks);
  EXPECT_EQ(after.prefix_queried_blocks, before.prefix_queried_blocks);
  EXPECT_EQ(after.num_sequences, 1);
  EXPECT_INVARIANTS(*m);
}

TEST(BlockManagerStar, BadLayoutsAreRejectedWithValuesAndChangeNothing) {
  auto m = Make(Opts(32));
  StarComputed(*m, 1, Doc(), Layout(kCtx));
  const auto before = m->Stats();
  struct Case {
    StarLayout l;
    const char* text;
  };
  const Case cases[] = {
      {Layout(-1), "context_len=-1"},
      {Layout(30), "context_len=30 must be in [0, num_tokens=29]"},
      {Layout(kCtx, 0), "context_block_size=0"},
      {Layout(kCtx, -8), "context_block_size=-8"},
      {Layout(kCtx, 6), "context_block_size=6 must be > 0 and a multiple of block_size=4"},
      {Layout(kCtx, 8, 0), "anchor_size=0"},
      {Layout(kCtx, 8, 9), "anchor_size=9 must be in [1, context_block_size=8]"},
  };
  for (const Case& c : cases) {
    auto r = m->AllocateStar(2, Doc(), 0, c.l);
    ASSERT_FALSE(r.ok()) << c.text;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_CONTAINS(r.status().message(), c.text);
    EXPECT_CONTAINS(r.status().message(), "seq 2");
    EXPECT_EQ(m->CanAllocateStar(Doc(), 29, 0, c.l), AllocVerdict::kNever) << c.text;
    EXPECT_FALSE(m->ValidateStarLayout(c.l, 29).ok());
  }
  EXPECT_FALSE(m->AllocateStar(2, {}, 0, Layout(0)).ok());
  EXPECT_EQ(m->AllocateStar(1, Doc(), 0, Layout(kCtx)).status().code(), absl::StatusCode::kAlreadyExists);
  const auto after = m->Stats();
  EXPECT_EQ(after.num_free_blocks, before.num_free_blocks);
  EXPECT_EQ(after.num_cached_free_blocks, before.num_cached_free_blocks);
  EXPECT_EQ(after.prefix_queried_blocks, before.prefix_queried_blocks);
  EXPECT_EQ(after.prefix_hit_blocks, before.prefix_hit_blocks);
  EXPECT_EQ(after.num_sequences, 1);
  EXPECT_FALSE(m->NumTokens(2).ok());
  EXPECT_INVARIANTS(*m);
  // Boundaries are accepted.
  EXPECT_TRUE(m->ValidateStarLayout(Layout(0, 4, 1), 29).ok());
  EXPECT_TRUE(m->ValidateStarLayout(Layout(29, 8, 8), 29).ok());
}

TEST(BlockManagerStar, WithoutPrefixCachingBehavesLikeAllocate) {
  auto m = Make(Opts(32, false));
  auto r = m->AllocateStar(1, Doc(), 0, Layout(kCtx));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->cached_blocks, U8s(8, 0));
  ASSERT_TRUE(m->MarkComputed(1, 29).ok());
  auto r2 = m->AllocateStar(2, Doc(), 0, Layout(kCtx));
  ASSERT_TRUE(r2.ok());
  EXPECT_EQ(r2->num_cached_tokens, 0);
  ASSERT_TRUE(m->Append(2, {}, 3).ok());
  EXPECT_EQ(m->Stats().prefix_queried_blocks, 0);
  EXPECT_INVARIANTS(*m);
  // Layouts are still checked.
  EXPECT_EQ(m->AllocateStar(3, Doc(), 0, Layout(kCtx, 5)).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(BlockManagerStar, CanAllocateStarCreditsHits) {
  auto m = Make(Opts(12));
  StarComputed(*m, 1, Doc(), Layout(kCtx));  // 8 used, 4 free
  // 4 hits (used blocks): 4 fresh blocks fit exactly.
  EXPECT_EQ(m->CanAllocateStar(Doc(250), 29, 0, Layout(kCtx)), AllocVerdict::kOk);
  EXPECT_EQ(m->CanAllocateStar({}, 29, 0, Layout(kCtx)), AllocVerdict::kLater);  // no credit
  EXPECT_EQ(m->CanAllocateStar(Doc(250), 28, 0, Layout(kCtx)), AllocVerdict::kNever);
  EXPECT_EQ(m->CanAllocateStar({}, 0, 0, Layout(0)), AllocVerdict::kNever);
  EXPECT_EQ(m->CanAllocateStar({}, 13 * kBs, 0, Layout(0)), AllocVerdict::kNever);
  ASSERT_TRUE(m->AllocateStar(2, Doc(250), 0, Layout(kCtx)).ok());
  EXPECT_EQ(m->Stats().num_free_blocks, 0);
  EXPECT_INVARIANTS(*m);
}

}  // namespace
}  // namespace kvplug::paged
