// ABI 0.4 through dlopen: the phase markers in kvp_batch (context_lens, query_pos_starts), the
// `star` backend's config table and planner errors, and older kvp_batch structs still accepted.
#include <cmath>
#include <cstddef>
#include <cstring>
#include <string>

#include "abi/abi_harness.h"

namespace {

constexpr int32_t kQH = 4, kKH = 2, kD = 32, kBS = 4, kBlocks = 32;

kvp_status CheckStar(const std::string& fields) {
  const std::string json = R"({"backend_config_type": "StarConfig", "backend_config": {)" + fields + "}}";
  return api.kvp_config_check("star", KVP_CONFIG_JSON, json.data(), json.size());
}

class AbiV04 : public LoadedAbi {};

TEST_F(AbiV04, VersionAndStarIsRegisteredAndStable) {
  EXPECT_GE(api.kvp_abi_version() / 100 % 100, 4u);  // 0.4 or a later minor
  kvp_backend_device_info info{};
  info.struct_size = sizeof info;
  ASSERT_OK(api.kvp_backend_device_info_get("star", kDLCPU, &info));
  EXPECT_EQ(info.available, 1);
  EXPECT_EQ(info.experimental, 0);
  EXPECT_EQ(info.supports_lse, 1);
  EXPECT_EQ(info.needs_state_slots, 0);
}

TEST_F(AbiV04, StarConfigIsChecked) {
  EXPECT_KVP(CheckStar(R"("context_block_size": 64, "anchor_block_size": 64)"), KVP_OK);
  EXPECT_KVP(CheckStar(R"("context_block_size": 64, "anchor_block_size": 65)"), KVP_ERR_INVALID_CONFIG,
             "anchor_block_size=65", "context_block_size=64");
  EXPECT_KVP(CheckStar(R"("context_block_size": 0)"), KVP_ERR_INVALID_CONFIG, "context_block_size=0");
  EXPECT_KVP(CheckStar(R"("num_shards": 0)"), KVP_ERR_INVALID_CONFIG, "num_shards=0");
  EXPECT_KVP(CheckStar(R"("num_shards": 1025)"), KVP_ERR_INVALID_CONFIG, "num_shards=1025");
  EXPECT_KVP(CheckStar(R"("num_shards": 2, "shard_rank": 2)"), KVP_ERR_INVALID_CONFIG, "shard_rank=2");
  EXPECT_KVP(CheckStar(R"("num_shards": 2, "shard_rank": -1)"), KVP_ERR_INVALID_CONFIG, "shard_rank=-1");
  EXPECT_KVP(CheckStar(R"("num_shards": 2, "append_shard": 2)"), KVP_ERR_INVALID_CONFIG, "append_shard=2");
  EXPECT_KVP(CheckStar(R"("num_shards": 2, "append_shard": -2)"), KVP_ERR_INVALID_CONFIG, "append_shard=-2");
  EXPECT_KVP(CheckStar(R"("num_shards": 3, "shard_rank": 1, "append_shard": 0)"), KVP_OK);
  // A config of another backend's type.
  const std::string dense = R"({"backend_config_type": "DenseConfig", "backend_config": {}})";
  EXPECT_KVP(api.kvp_config_check("star", KVP_CONFIG_JSON, dense.data(), dense.size()), KVP_ERR_INVALID_CONFIG);
}

struct StarRig {
  Handle<kvp_context> ctx = MakeContext(1);
  Handle<kvp_kv_cache> cache;
  Handle<kvp_plan> plan;
  std::vector<float> k, v;
  StarRig() {
    kvp_kv_cache_options o{sizeof o};
    o.num_layers = 1;
    o.num_blocks = kBlocks;
    o.block_size = kBS;
    o.num_kv_heads = kKH;
    o.head_size = kD;
    o.dtype = KVP_DTYPE_FLOAT32;
    kvp_kv_cache* c = nullptr;
    EXPECT_KVP(api.kvp_kv_cache_create(ctx.get(), &o, &c), KVP_OK);
    cache.reset(c);
    // Every slot written with made-up K/V.
    const int64_t n = int64_t{kBlocks} * kBS;
    k.resize(size_t(n) * kKH * kD);
    v.resize(k.size());
    for (size_t i = 0; i < k.size(); ++i) k[i] = std::sin(0.1f * float(i)), v[i] = std::cos(0.07f * float(i));
    std::vector<int64_t> slots(n);
    for (int64_t i = 0; i < n; ++i) slots[i] = i;
    Tensor kt(k.data(), kF32, {n, kKH, kD}), vt(v.data(), kF32, {n, kKH, kD}), st(slots.data(), kI64, {n});
    EXPECT_KVP(api.kvp_kv_cache_write(cache.get(), 0, kt.p(), vt.p(), st.p()), KVP_OK);
    kvp_plan_options po{sizeof po, 4, 64, kBlocks};
    kvp_plan* p = nullptr;
    EXPECT_KVP(api.kvp_plan_create(ctx.get(), &po, &p), KVP_OK);
    plan.reset(p);
  }
  Handle<kvp_attention> Attention(const char* backend, const std::string& config = "") {
    kvp_attention_options ao{sizeof ao};
    ao.backend = backend;
    ao.num_q_heads = kQH;
    ao.num_kv_heads = kKH;
    ao.head_size = kD;
    ao.kv_dtype = KVP_DTYPE_FLOAT32;
    if (!config.empty()) {
      ao.config_format = KVP_CONFIG_JSON;
      ao.config = config.data();
      ao.config_size = config.size();
    }
    kvp_attention* a = nullptr;
    EXPECT_KVP(api.kvp_attention_create(ctx.get(), &ao, &a), KVP_OK);
    return Handle<kvp_attention>(a);
  }
};

std::string StarJson(int block, int anchor, int shards = 1, int rank = 0) {
  return R"({"backend_config_type": "StarConfig", "backend_config": {"context_block_size": )" +
         std::to_string(block) + R"(, "anchor_block_size": )" + std::to_string(anchor) + R"(, "num_shards": )" +
         std::to_string(shards) + R"(, "shard_rank": )" + std::to_string(rank) + "}}";
}

// One sequence over pages 0..: seq_len `len`, the last `q` tokens are queries.
struct OneSeq {
  std::vector<int32_t> qsl, lens, indptr{0, kBlocks}, indices, ctx, starts;
  kvp_batch b{sizeof b};
  OneSeq(int32_t len, int32_t q) : qsl{0, q}, lens{len} {
    for (int i = 0; i < kBlocks; ++i) indices.push_back(i);
    b.num_seqs = 1;
    b.block_size = kBS;
    b.query_start_loc = qsl.data();
    b.seq_lens = lens.data();
    b.kv_indptr = indptr.data();
    b.kv_indices = indices.data();
  }
};

TEST_F(AbiV04, PhaseMarkersAreValidated) {
  StarRig s;
  OneSeq one(40, 8);
  one.ctx = {-1};
  one.b.context_lens = one.ctx.data();
  EXPECT_KVP(api.kvp_plan_update(s.plan.get(), &one.b), KVP_ERR_INVALID_ARGUMENT, "context_lens[0]=-1");
  one.ctx = {1 << 30 | 1};
  one.b.context_lens = one.ctx.data();
  EXPECT_KVP(api.kvp_plan_update(s.plan.get(), &one.b), KVP_ERR_INVALID_ARGUMENT, "context_lens[0]=1073741825");
  one.ctx = {32};
  one.b.context_lens = one.ctx.data();
  one.starts = {-3};
  one.b.query_pos_starts = one.starts.data();
  EXPECT_KVP(api.kvp_plan_update(s.plan.get(), &one.b), KVP_ERR_INVALID_ARGUMENT, "query_pos_starts[0]=-3");
  // With explicit positions a sequence may hold fewer keys than it has query tokens.
  OneSeq shard(2, 8);
  shard.starts = {100};
  shard.b.query_pos_starts = shard.starts.data();
  EXPECT_KVP(api.kvp_plan_update(s.plan.get(), &shard.b), KVP_OK);
  shard.b.query_pos_starts = nullptr;
  EXPECT_KVP(api.kvp_plan_update(s.plan.get(), &shard.b), KVP_ERR_INVALID_ARGUMENT, "seq_lens[0]=2");
}

TEST_F(AbiV04, AnOlderBatchStructIsStillAccepted) {
  StarRig s;
  OneSeq one(40, 8);
  one.b.struct_size = offsetof(kvp_batch, context_lens);  // an ABI 0.3 caller
  EXPECT_KVP(api.kvp_plan_update(s.plan.get(), &one.b), KVP_OK);
}

TEST_F(AbiV04, StarPlannerErrorsSurfaceAtPlanUpdate) {
  StarRig s;
  auto star = s.Attention("star", StarJson(16, 8, 2, 1));
  ASSERT_OK(api.kvp_plan_attach(s.plan.get(), star.get()));
  OneSeq one(24, 4);
  one.ctx = {64};
  one.b.context_lens = one.ctx.data();
  EXPECT_KVP(api.kvp_plan_update(s.plan.get(), &one.b), KVP_ERR_INVALID_ARGUMENT, "query_pos_starts");
  // The plan is emptied: a run now fails cleanly.
  std::vector<float> q(4 * kQH * kD), out(q.size());
  Tensor qt(q.data(), kF32, {4, kQH, kD}), ot(out.data(), kF32, {4, kQH, kD});
  EXPECT_KVP(api.kvp_attention_run(star.get(), s.plan.get(), s.cache.get(), 0, qt.p(), ot.p(), nullptr),
             KVP_ERR_FAILED_PRECONDITION);
  // An anchor that is not page-aligned on shard 1.
  auto odd = s.Attention("star", StarJson(16, 6, 2, 1));
  ASSERT_OK(api.kvp_plan_attach(s.plan.get(), odd.get()));
  OneSeq whole(24, 24);  // the anchor (8) then block 1 (16): a valid phase-1 step for the first attention
  whole.ctx = {64};
  whole.starts = {0};
  whole.b.context_lens = whole.ctx.data();
  whole.b.query_pos_starts = whole.starts.data();
  EXPECT_KVP(api.kvp_plan_update(s.plan.get(), &whole.b), KVP_ERR_INVALID_ARGUMENT, "anchor_block_size=6");
}

TEST_F(AbiV04, StarWithTheBlockCoveringTheContextEqualsDense) {
  StarRig s;
  auto star = s.Attention("star", StarJson(64, 32));
  auto dense = s.Attention("dense");
  OneSeq one(60, 20);
  one.ctx = {50};
  one.b.context_lens = one.ctx.data();
  ASSERT_OK(api.kvp_plan_update(s.plan.get(), &one.b));
  std::vector<float> q(20 * kQH * kD), a(q.size()), b(q.size());
  for (size_t i = 0; i < q.size(); ++i) q[i] = std::sin(0.3f * float(i));
  Tensor qt(q.data(), kF32, {20, kQH, kD}), at(a.data(), kF32, {20, kQH, kD}), bt(b.data(), kF32, {20, kQH, kD});
  ASSERT_OK(api.kvp_attention_run(star.get(), s.plan.get(), s.cache.get(), 0, qt.p(), at.p(), nullptr));
  ASSERT_OK(api.kvp_attention_run(dense.get(), s.plan.get(), s.cache.get(), 0, qt.p(), bt.p(), nullptr));
  for (size_t i = 0; i < a.size(); ++i) ASSERT_NEAR(a[i], b[i], 1e-6) << i;
  // With a smaller block the context tokens past the first block differ from dense.
  auto small = s.Attention("star", StarJson(16, 8));
  ASSERT_OK(api.kvp_plan_update(s.plan.get(), &one.b));
  ASSERT_OK(api.kvp_attention_run(small.get(), s.plan.get(), s.cache.get(), 0, qt.p(), at.p(), nullptr));
  double diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff = std::max(diff, double(std::abs(a[i] - b[i])));
  EXPECT_GT(diff, 1e-3);
}

TEST_F(AbiV04, EntropySummaryThroughRunV2) {
  StarRig s;
  const std::string cfg = R"({"backend_config_type": "EntropyConfig", "backend_config": {"temperature": [0.5, 1, 2, 4]}})";
  auto ent = s.Attention("entropy", cfg);
  OneSeq one(30, 30);
  ASSERT_OK(api.kvp_plan_update(s.plan.get(), &one.b));
  std::vector<float> q(30 * kQH * kD), out(q.size()), ent_rows(30 * kQH), summary(kQH * 6, -1.f);
  for (size_t i = 0; i < q.size(); ++i) q[i] = std::sin(0.7f * float(i));
  Tensor qt(q.data(), kF32, {30, kQH, kD}), ot(out.data(), kF32, {30, kQH, kD}), et(ent_rows.data(), kF32, {30, kQH});
  Tensor st(summary.data(), kF32, {kQH, 6});
  kvp_attention_outputs o{};
  o.struct_size = sizeof o;
  o.out = ot.p();
  o.entropy = et.p();
  o.entropy_summary = st.p();
  ASSERT_OK(api.kvp_attention_run_v2(ent.get(), s.plan.get(), s.cache.get(), 0, qt.p(), &o));
  for (int h = 0; h < kQH; ++h) {
    double mean = 0;
    for (int t = 0; t < 30; ++t) mean += ent_rows[t * kQH + h] / 30.0;
    EXPECT_EQ(summary[h * 6 + 0], 30.f);  // every row saw a key
    EXPECT_NEAR(summary[h * 6 + 1], mean, 1e-5);
    EXPECT_EQ(summary[h * 6 + 2], 29.f);  // the first row saw one key: not informative
  }
  // Hotter heads spread attention: mean entropy grows with the temperature.
  EXPECT_LT(summary[0 * 6 + 1], summary[3 * 6 + 1]);
  // Shapes, dtypes, contiguity, overlap.
  std::vector<float> wrong(kQH * 5);
  Tensor bad(wrong.data(), kF32, {kQH, 5});
  o.entropy_summary = bad.p();
  EXPECT_KVP(api.kvp_attention_run_v2(ent.get(), s.plan.get(), s.cache.get(), 0, qt.p(), &o), KVP_ERR_INVALID_ARGUMENT,
             "entropy_summary", "[4, 6]");
  Tensor strided(summary.data(), kF32, {kQH, 3}, {6, 2});
  o.entropy_summary = strided.p();
  EXPECT_KVP(api.kvp_attention_run_v2(ent.get(), s.plan.get(), s.cache.get(), 0, qt.p(), &o), KVP_ERR_INVALID_ARGUMENT,
             "entropy_summary");
  Tensor overlap(ent_rows.data(), kF32, {kQH, 6});
  o.entropy_summary = overlap.p();
  EXPECT_KVP(api.kvp_attention_run_v2(ent.get(), s.plan.get(), s.cache.get(), 0, qt.p(), &o), KVP_ERR_INVALID_ARGUMENT,
             "entropy_summary", "entropy");
  // Bad temperature tables are config errors.
  const std::string zero = R"({"backend_config_type": "EntropyConfig", "backend_config": {"temperature": [1, 0, 1, 1]}})";
  EXPECT_KVP(api.kvp_config_check("entropy", KVP_CONFIG_JSON, zero.data(), zero.size()), KVP_ERR_INVALID_CONFIG,
             "temperature[1]=0");
  kvp_attention_options ao{};
  ao.struct_size = sizeof ao;
  ao.backend = "entropy";
  ao.num_q_heads = kQH;
  ao.num_kv_heads = kKH;
  ao.head_size = kD;
  ao.kv_dtype = KVP_DTYPE_FLOAT32;
  const std::string three = R"({"backend_config_type": "EntropyConfig", "backend_config": {"temperature": [1, 1, 1]}})";
  ao.config_format = KVP_CONFIG_JSON;
  ao.config = three.data();
  ao.config_size = three.size();
  kvp_attention* a = nullptr;
  EXPECT_KVP(api.kvp_attention_create(s.ctx.get(), &ao, &a), KVP_ERR_INVALID_ARGUMENT, "3 entries", "num_q_heads=4");
}

}  // namespace
