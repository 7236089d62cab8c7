#include <gtest/gtest.h>

#include "kvplug/attention/batch_plan.h"
#include "kvplug/attention/thread_pool.h"

#include <atomic>

namespace kvplug::attn {
namespace {

TEST(BatchPlan, DenseAndCsrFormsGiveTheSamePlan) {
  // Sequences of 5 (3 new tokens), 8 (1 new) and 1 (1 new) tokens, block size 4.
  const int32_t qsl[] = {0, 3, 4, 5};
  const int32_t lens[] = {5, 8, 1};
  const int32_t table[] = {7, 2, -1, 4, 5, -1, 9, -1, -1};
  const int32_t indptr[] = {0, 2, 4, 5};
  const int32_t indices[] = {7, 2, 4, 5, 9};
  BatchPlan a(PlanCapacity{4, 8, 8}), b(PlanCapacity{4, 8, 8});
  BatchInput in{3, 4, qsl, lens, table, 3};
  ASSERT_TRUE(a.Update(in).ok());
  BatchInput csr{3, 4, qsl, lens, nullptr, 0, indptr, indices};
  ASSERT_TRUE(b.Update(csr).ok());
  for (const BatchPlan* p : {&a, &b}) {
    EXPECT_EQ(p->num_tokens(), 5);
    EXPECT_EQ(p->max_block_id(), 9);
    EXPECT_EQ(std::vector<int32_t>(p->kv_indptr().begin(), p->kv_indptr().end()), std::vector<int32_t>({0, 2, 4, 5}));
    EXPECT_EQ(std::vector<int32_t>(p->kv_indices().begin(), p->kv_indices().end()),
              std::vector<int32_t>({7, 2, 4, 5, 9}));
    EXPECT_EQ(std::vector<int32_t>(p->token_seq().begin(), p->token_seq().end()), std::vector<int32_t>({0, 0, 0, 1, 2}));
  }
}

TEST(BatchPlan, RejectsInconsistentBatchesAndEmptiesItself) {
  const int32_t qsl[] = {0, 3, 4};
  const int32_t lens[] = {5, 8};
  const int32_t table[] = {1, 2, 3, 4};
  BatchPlan p(PlanCapacity{2, 8, 4});
  ASSERT_TRUE(p.Update(BatchInput{2, 4, qsl, lens, table, 2}).ok());
  EXPECT_FALSE(p.empty());
  const int32_t short_lens[] = {2, 8};  // 3 queries in a 2-token sequence
  EXPECT_EQ(p.Update(BatchInput{2, 4, qsl, short_lens, table, 2}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(p.empty());
  const int32_t long_lens[] = {5, 9};  // needs 3 blocks with stride 2
  EXPECT_EQ(p.Update(BatchInput{2, 4, qsl, long_lens, table, 2}).code(), absl::StatusCode::kInvalidArgument);
  const int32_t bad_qsl[] = {0, 3, 2};
  EXPECT_EQ(p.Update(BatchInput{2, 4, bad_qsl, lens, table, 2}).code(), absl::StatusCode::kInvalidArgument);
  const int32_t neg_table[] = {1, -2, 3, 4};
  EXPECT_EQ(p.Update(BatchInput{2, 4, qsl, lens, neg_table, 2}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(p.Update(BatchInput{3, 4, qsl, lens, table, 2}).code(), absl::StatusCode::kOutOfRange);  // > max seqs
  BatchPlan tiny(PlanCapacity{2, 8, 3});
  EXPECT_EQ(tiny.Update(BatchInput{2, 4, qsl, lens, table, 2}).code(), absl::StatusCode::kOutOfRange);  // 4 blocks
  EXPECT_EQ(p.Update(BatchInput{2, 4, qsl, lens, nullptr, 0}).code(), absl::StatusCode::kInvalidArgument);
  const int64_t slots[] = {0, 1, -5, 3};
  BatchInput with_slots{2, 4, qsl, lens, table, 2};
  with_slots.slot_mapping = slots;
  EXPECT_EQ(p.Update(with_slots).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(p.empty());
  EXPECT_FALSE(BatchPlan::ValidateCapacity(PlanCapacity{0, 1, 1}).ok());
}

TEST(ThreadPool, CoversEveryItemExactlyOnce) {
  for (int threads : {1, 2, 3, 8}) {
    ThreadPool pool(threads);
    EXPECT_EQ(pool.num_threads(), threads);
    for (int64_t n : {0, 1, 7, 1000, 12345}) {
      std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
      pool.ParallelFor(n, 3, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) hits[i].fetch_add(1);
      });
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << "n=" << n << " i=" << i;
    }
  }
}

}  // namespace
}  // namespace kvplug::attn
