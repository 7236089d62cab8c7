// ABI 0.5 through dlopen: kvp_attention_cache_layout (every backend), kvp_attention_ssm and the
// attamba backend's config table and contract: arguments checked with their values, layouts
// against the documented formulas, an attamba step (SSM, write, run) end to end, and bad batches
// and tensors refused without writing.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "abi/abi_harness.h"

namespace {

class AbiV05 : public LoadedAbi {};

std::string AttambaJson(int P, int L, int layer = 0, int layers = 1, int ssm_heads = 0) {
  return "{\"backend_config_type\": \"AttambaConfig\", \"backend_config\": {\"chunk_size\": " + std::to_string(P) +
         ", \"window\": " + std::to_string(L) + ", \"layer_index\": " + std::to_string(layer) +
         ", \"num_layers\": " + std::to_string(layers) + ", \"ssm_heads\": " + std::to_string(ssm_heads) +
         ", \"ssm_head_dim\": 4, \"state_size\": 4, \"conv_width\": 2}}";
}

Handle<kvp_attention> Create(kvp_context* ctx, const char* backend, const std::string& json) {
  kvp_attention_options o{};
  o.struct_size = sizeof o;
  o.backend = backend;
  o.num_q_heads = 2;
  o.num_kv_heads = 1;
  o.head_size = 32;
  o.kv_dtype = KVP_DTYPE_FLOAT32;
  if (!json.empty()) {
    o.config_format = KVP_CONFIG_JSON;
    o.config = json.data();
    o.config_size = json.size();
  }
  kvp_attention* a = nullptr;
  EXPECT_KVP(api.kvp_attention_create(ctx, &o, &a), KVP_OK);
  return Handle<kvp_attention>(a);
}

TEST_F(AbiV05, VersionAndAttambaIsRegisteredAsExperimental) {
  EXPECT_GE(api.kvp_abi_version() / 100 % 100, 5u);
  kvp_backend_device_info info{};
  info.struct_size = sizeof info;
  ASSERT_OK(api.kvp_backend_device_info_get("attamba", kDLCPU, &info));
  EXPECT_EQ(info.available, 1);
  EXPECT_EQ(info.experimental, 1);
  EXPECT_EQ(info.needs_state_slots, 1);
  // On CUDA attamba runs wherever the family's CUDA engine does (its write and SSM have CUDA paths).
  kvp_backend_device_info dense{};
  dense.struct_size = sizeof dense;
  ASSERT_OK(api.kvp_backend_device_info_get("dense", kDLCUDA, &dense));
  ASSERT_OK(api.kvp_backend_device_info_get("attamba", kDLCUDA, &info));
  EXPECT_EQ(info.available, dense.available);
}

TEST_F(AbiV05, ConfigsAreCheckedWithTheirValues) {
  auto check = [](const std::string& json) { return api.kvp_config_check("attamba", KVP_CONFIG_JSON, json.data(), json.size()); };
  EXPECT_KVP(check(AttambaJson(8, 16, 3, 4)), KVP_OK);
  EXPECT_KVP(check(AttambaJson(0, 16)), KVP_ERR_INVALID_CONFIG, "chunk_size=0");
  EXPECT_KVP(check(AttambaJson(8, -1)), KVP_ERR_INVALID_CONFIG, "window=-1");
  EXPECT_KVP(check(AttambaJson(8, 0, 4, 4)), KVP_ERR_INVALID_CONFIG, "layer_index=4");
  EXPECT_KVP(check(AttambaJson(8, 0, 0, 1, 3)), KVP_OK);  // an SSM of 3 heads of 4
  const std::string groups = R"({"backend_config_type": "AttambaConfig", "backend_config": {"ssm_heads": 3, "ssm_head_dim": 4, "ssm_groups": 2}})";
  EXPECT_KVP(check(groups), KVP_ERR_INVALID_CONFIG, "ssm_groups=2");
  const std::string uniform = R"({"backend_config_type": "AttambaConfig", "backend_config": {"chunk_offsets": "Uniform"}})";
  EXPECT_KVP(check(uniform), KVP_OK);
}

TEST_F(AbiV05, CacheLayoutForDenseAndAttamba) {
  auto ctx = MakeContext();
  auto dense = Create(ctx.get(), "dense", "");
  kvp_cache_layout l{};
  l.struct_size = sizeof l;
  ASSERT_OK(api.kvp_attention_cache_layout(dense.get(), 16, 100, 90, &l));
  EXPECT_EQ(l.seq_len, 100);
  EXPECT_EQ(l.num_pages, 7);
  EXPECT_EQ(l.window_pages, 7);
  EXPECT_EQ(l.window_first_page, 0);
  EXPECT_EQ(l.compressed_pages, 0);
  auto att = Create(ctx.get(), "attamba", AttambaJson(8, 16, 0, 1));
  ASSERT_OK(api.kvp_attention_cache_layout(att.get(), 16, 100, 90, &l));
  // Chunk ends of [0, 100) with P = 8, offset 0: 0, 7, 15, ..., 95: 13 rows in one page; the window
  // of positions >= 74 starts in token page 4 and runs to page 6.
  EXPECT_EQ(l.compressed_rows, 13);
  EXPECT_EQ(l.compressed_pages, 1);
  EXPECT_EQ(l.window_first_page, 4);
  EXPECT_EQ(l.window_pages, 3);
  EXPECT_EQ(l.num_pages, 4);
  EXPECT_EQ(l.seq_len, 16 + 100 - 64);
  // Arguments.
  EXPECT_KVP(api.kvp_attention_cache_layout(att.get(), 0, 100, 90, &l), KVP_ERR_INVALID_ARGUMENT, "block_size=0");
  EXPECT_KVP(api.kvp_attention_cache_layout(att.get(), 16, 100, 101, &l), KVP_ERR_INVALID_ARGUMENT,
             "query_pos_start=101");
  EXPECT_KVP(api.kvp_attention_cache_layout(att.get(), 16, -1, 0, &l), KVP_ERR_INVALID_ARGUMENT, "num_tokens=-1");
  EXPECT_KVP(api.kvp_attention_cache_layout(nullptr, 16, 1, 0, &l), KVP_ERR_INVALID_ARGUMENT, "required");
  EXPECT_KVP(api.kvp_attention_cache_layout(att.get(), 16, 1, 0, nullptr), KVP_ERR_INVALID_ARGUMENT, "required");
  l.struct_size = sizeof l + 8;
  EXPECT_KVP(api.kvp_attention_cache_layout(att.get(), 16, 1, 0, &l), KVP_ERR_NOT_SUPPORTED);
  // An older, shorter struct gets only its prefix.
  struct Short {
    size_t struct_size;
    int32_t seq_len;
  } s{sizeof(Short), -5};
  ASSERT_OK(api.kvp_attention_cache_layout(att.get(), 16, 100, 90, reinterpret_cast<kvp_cache_layout*>(&s)));
  EXPECT_EQ(s.seq_len, 16 + 36);
}

// One sequence of 12 tokens with P = 4, L = 2 through kvp_attention_ssm (K and V), write and run.
TEST_F(AbiV05, AttambaStepEndToEndAndBadInput) {
  auto ctx = MakeContext();
  auto att = Create(ctx.get(), "attamba", AttambaJson(4, 2, 0, 1, 2));
  int64_t state = 0;
  ASSERT_OK(api.kvp_attention_state_bytes(att.get(), &state));
  // d_inner 8, conv_dim 16, per SSM: 1 conv row x 16 + 2 heads x 4 x 4; two SSMs; fp32.
  EXPECT_EQ(state, 2 * (16 + 32) * 4);
  kvp_kv_cache_options co{};
  co.struct_size = sizeof co;
  co.num_layers = 1;
  co.num_blocks = 8;
  co.block_size = 4;
  co.num_kv_heads = 1;
  co.head_size = 32;
  co.dtype = KVP_DTYPE_FLOAT32;
  co.num_state_slots = 2;
  co.state_bytes_per_layer = state;
  kvp_kv_cache* c = nullptr;
  ASSERT_OK(api.kvp_kv_cache_create(ctx.get(), &co, &c));
  Handle<kvp_kv_cache> cache(c);
  kvp_plan_options po{};
  po.struct_size = sizeof po;
  po.max_num_seqs = 1;
  po.max_num_tokens = 12;
  po.max_num_blocks = 8;
  kvp_plan* p = nullptr;
  ASSERT_OK(api.kvp_plan_create(ctx.get(), &po, &p));
  Handle<kvp_plan> plan(p);
  kvp_cache_layout l{};
  l.struct_size = sizeof l;
  ASSERT_OK(api.kvp_attention_cache_layout(att.get(), 4, 12, 0, &l));
  // Chunk ends 0, 3, 7, 11: one compressed page; window pages 0..2 (all tokens of this prefill).
  ASSERT_EQ(l.compressed_pages, 1);
  ASSERT_EQ(l.window_pages, 3);
  std::vector<int32_t> indptr{0, 4}, indices{5, 1, 2, 3};  // compressed page 5, token pages 1-3
  const int32_t qsl[2] = {0, 12}, lens[1] = {l.seq_len}, p0[1] = {0}, slot[1] = {1};
  std::vector<int64_t> slots(12);
  for (int t = 0; t < 12; ++t) slots[t] = int64_t{indices[1 + t / 4]} * 4 + t % 4;
  kvp_batch b{};
  b.struct_size = sizeof b;
  b.num_seqs = 1;
  b.block_size = 4;
  b.query_start_loc = qsl;
  b.seq_lens = lens;
  b.kv_indptr = indptr.data();
  b.kv_indices = indices.data();
  b.slot_mapping = slots.data();
  b.state_slots = slot;
  b.query_pos_starts = p0;
  ASSERT_OK(api.kvp_plan_update(plan.get(), &b));
  // The SSM: in [12, 2*8 + 2*4 + 2 = 26], conv [16, 2].
  std::vector<float> in(12 * 26), conv(16 * 2, 0.25f), alog(2, 0.1f), y(12 * 8, -1.f);
  for (size_t i = 0; i < in.size(); ++i) in[i] = std::sin(0.37f * float(i));
  Tensor it(in.data(), kF32, {12, 26}), ct(conv.data(), kF32, {16, 2}), at(alog.data(), kF32, {2}), yt(y.data(), kF32, {12, 8});
  kvp_ssm_args sa{};
  sa.struct_size = sizeof sa;
  sa.in = it.p();
  sa.conv_weight = ct.p();
  sa.a_log = at.p();
  sa.out = yt.p();
  ASSERT_OK(api.kvp_attention_ssm(att.get(), plan.get(), cache.get(), 0, &sa));
  for (float v : y) EXPECT_TRUE(std::isfinite(v) && v != -1.f);
  // Bad SSM input: named, nothing written.
  std::vector<float> y2(y.size(), 5.f);
  Tensor y2t(y2.data(), kF32, {12, 8}), short_in(in.data(), kF32, {12, 25}), bad_alog(alog.data(), kF32, {3});
  sa.out = y2t.p();
  sa.in = short_in.p();
  EXPECT_KVP(api.kvp_attention_ssm(att.get(), plan.get(), cache.get(), 0, &sa), KVP_ERR_INVALID_ARGUMENT, "in: expected shape",
             "[12, 26]");
  sa.in = it.p();
  sa.a_log = bad_alog.p();
  EXPECT_KVP(api.kvp_attention_ssm(att.get(), plan.get(), cache.get(), 0, &sa), KVP_ERR_INVALID_ARGUMENT, "a_log");
  sa.a_log = at.p();
  sa.which = 2;
  EXPECT_KVP(api.kvp_attention_ssm(att.get(), plan.get(), cache.get(), 0, &sa), KVP_ERR_INVALID_ARGUMENT, "which=2");
  sa.which = 0;
  sa.conv_weight = nullptr;
  EXPECT_KVP(api.kvp_attention_ssm(att.get(), plan.get(), cache.get(), 0, &sa), KVP_ERR_INVALID_ARGUMENT,
             "conv_weight is required");
  sa.conv_weight = ct.p();
  Tensor aliased(in.data(), kF32, {12, 8});  // out over the input
  sa.out = aliased.p();
  EXPECT_KVP(api.kvp_attention_ssm(att.get(), plan.get(), cache.get(), 0, &sa), KVP_ERR_INVALID_ARGUMENT, "overlaps");
  for (float v : y2) EXPECT_EQ(v, 5.f);
  sa.out = y2t.p();
  // Two sequences on one state slot are refused (they would race on it).
  {
    const int32_t qsl2[3] = {0, 6, 12}, lens2[2] = {l.seq_len, l.seq_len}, p02[2] = {0, 0}, slot2[2] = {1, 1};
    std::vector<int32_t> indptr2{0, 4, 8}, indices2{5, 1, 2, 3, 5, 1, 2, 3};
    kvp_batch b2 = b;
    b2.num_seqs = 2;
    b2.query_start_loc = qsl2;
    b2.seq_lens = lens2;
    b2.kv_indptr = indptr2.data();
    b2.kv_indices = indices2.data();
    b2.query_pos_starts = p02;
    b2.state_slots = slot2;
    b2.slot_mapping = nullptr;
    kvp_plan_options po2 = po;
    po2.max_num_seqs = 2;
    kvp_plan* pp = nullptr;
    ASSERT_OK(api.kvp_plan_create(ctx.get(), &po2, &pp));
    Handle<kvp_plan> plan2(pp);
    ASSERT_OK(api.kvp_plan_update(plan2.get(), &b2));
    EXPECT_KVP(api.kvp_attention_ssm(att.get(), plan2.get(), cache.get(), 0, &sa), KVP_ERR_INVALID_ARGUMENT,
               "state slot 1 is given to two sequences");
    for (float v : y2) EXPECT_EQ(v, 5.f);
  }
  // Dense has no SSM.
  auto dense = Create(ctx.get(), "dense", "");
  sa.out = y2t.p();
  EXPECT_KVP(api.kvp_attention_ssm(dense.get(), plan.get(), cache.get(), 0, &sa), KVP_ERR_NOT_SUPPORTED);
  // An attamba config without ssm_heads: the engine runs its own SSM.
  auto no_ssm = Create(ctx.get(), "attamba", AttambaJson(4, 2));
  EXPECT_KVP(api.kvp_attention_ssm(no_ssm.get(), plan.get(), cache.get(), 0, &sa), KVP_ERR_FAILED_PRECONDITION,
             "ssm_heads = 0");

  // Write and run: query 11 sees chunk ends 0, 3, 7 and the window 9..11.
  std::vector<float> kv(12 * 32), q(12 * 2 * 32, 0.0f), out(q.size(), 7.f), lse(24, 7.f);
  for (int t = 0; t < 12; ++t)
    for (int x = 0; x < 32; ++x) kv[t * 32 + x] = float(t);  // V of token t is t everywhere
  Tensor kt(kv.data(), kF32, {12, 1, 32}), qt(q.data(), kF32, {12, 2, 32}), ot(out.data(), kF32, {12, 2, 32}),
      lt(lse.data(), kF32, {12, 2});
  ASSERT_OK(api.kvp_attention_write_kv(att.get(), plan.get(), cache.get(), 0, kt.p(), kt.p()));
  ASSERT_OK(api.kvp_attention_run(att.get(), plan.get(), cache.get(), 0, qt.p(), ot.p(), lt.p()));
  // Zero queries: uniform weights over the visible keys; out = their mean, lse = log(count).
  EXPECT_NEAR(out[11 * 64], (0 + 3 + 7 + 9 + 10 + 11) / 6.0f, 1e-5f);
  EXPECT_NEAR(lse[22], std::log(6.0f), 1e-5f);
  EXPECT_NEAR(out[5 * 64], (0 + 3 + 4 + 5) / 4.0f, 1e-5f);  // chunk ends 0 (< 3) , window 3..5
  EXPECT_NEAR(out[0], 0.0f, 1e-6f);
  // A wrong window slot is refused with the expected one.
  slots[11] += 1;
  ASSERT_OK(api.kvp_plan_update(plan.get(), &b));
  EXPECT_KVP(api.kvp_attention_write_kv(att.get(), plan.get(), cache.get(), 0, kt.p(), kt.p()),
             KVP_ERR_INVALID_ARGUMENT, "slot_mapping[11]", "window slot 15");
  // seq_lens that disagree with the layout: the attention attached itself to the plan at its run,
  // so the update refuses them, naming the layout; an unattached plan takes them and the write
  // refuses them.
  slots[11] -= 1;
  const int32_t wrong[1] = {l.seq_len - 1};
  b.seq_lens = wrong;
  EXPECT_KVP(api.kvp_plan_update(plan.get(), &b), KVP_ERR_INVALID_ARGUMENT, "need seq_lens = 16", "got 15");
  kvp_plan* p2 = nullptr;
  ASSERT_OK(api.kvp_plan_create(ctx.get(), &po, &p2));
  Handle<kvp_plan> fresh(p2);
  ASSERT_OK(api.kvp_plan_update(fresh.get(), &b));
  EXPECT_KVP(api.kvp_attention_write_kv(att.get(), fresh.get(), cache.get(), 0, kt.p(), kt.p()),
             KVP_ERR_INVALID_ARGUMENT, "need seq_lens");
}

}  // namespace
