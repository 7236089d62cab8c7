// Issue 15, defects 1 and 3, through dlopen as every ABI test:
//  - writable tensors in which two elements map to one address are refused (KVP_ERR_INVALID_ARGUMENT,
//    naming the tensor and its strides): a cache's layer tensors (block stride 0, half-overlapping
//    blocks, K and V sharing memory, two layers sharing memory), and kvp_attention_run's out (token
//    stride 0) and lse (strides [0, 0]). Layouts that only look alike (layers interleaved in one
//    allocation) are still accepted and written where they should be;
//  - deeply nested JSON configs (10,000 '[' in a field value, 10,000 nested objects, an unterminated
//    run of brackets) are refused as KVP_ERR_INVALID_CONFIG with a message, and every byte-flip of a
//    binary config is either accepted or refused, never a crash or a hang.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "abi/abi_harness.h"

namespace {

class Reliability2 : public LoadedAbi {};

constexpr int L = 2, NB = 4, BS = 4, H = 2, D = 8;
constexpr int64_t kBlock = int64_t{BS} * H * D;  // elements of one block of K (or V)

kvp_kv_cache_options Options() {
  kvp_kv_cache_options o{};
  o.struct_size = sizeof o;
  o.num_layers = L;
  o.num_blocks = NB;
  o.block_size = BS;
  o.num_kv_heads = H;
  o.head_size = D;
  o.dtype = KVP_DTYPE_FLOAT32;
  o.layout = KVP_LAYOUT_KV_FIRST;  // [2, num_blocks, block_size, heads, head_size]
  return o;
}

// Layer 0 with the given strides over `mem`, layer 1 compact in its own memory.
kvp_status CreateWithLayer0(const kvp_context* ctx, std::vector<int64_t> strides, float* mem0, float* mem1,
                            kvp_kv_cache** out) {
  Tensor t0(mem0, kF32, {2, NB, BS, H, D}, std::move(strides));
  Tensor t1(mem1, kF32, {2, NB, BS, H, D});
  const DLTensor layers[L] = {t0.t, t1.t};
  const kvp_kv_cache_options o = Options();
  return api.kvp_kv_cache_create_from_tensors(ctx, &o, layers, L, out);
}

TEST_F(Reliability2, OverlappingCacheLayersAreRefused) {
  auto ctx = MakeContext();
  std::vector<float> mem0(2 * NB * kBlock * 2, 0.0f), mem1(2 * NB * kBlock, 0.0f);
  kvp_kv_cache* const sentinel = reinterpret_cast<kvp_kv_cache*>(0x5);
  kvp_kv_cache* c = sentinel;
  // Block stride 0: every block is block 0 (slot 0 and slot 16 would be one address).
  EXPECT_KVP(CreateWithLayer0(ctx.get(), {NB * kBlock, 0, H * D, D, 1}, mem0.data(), mem1.data(), &c),
             KVP_ERR_INVALID_ARGUMENT, "layer_tensors[0]", "strides [256, 0, 16, 8, 1]", "K (and V) view");
  // Blocks that half overlap: block stride = half a block.
  EXPECT_KVP(CreateWithLayer0(ctx.get(), {NB * kBlock, kBlock / 2, H * D, D, 1}, mem0.data(), mem1.data(), &c),
             KVP_ERR_INVALID_ARGUMENT, "layer_tensors[0]", "strides [256, 32, 16, 8, 1]", "to one address");
  // Heads over each other inside a position.
  EXPECT_KVP(CreateWithLayer0(ctx.get(), {NB * kBlock, kBlock, H * D, D / 2, 1}, mem0.data(), mem1.data(), &c),
             KVP_ERR_INVALID_ARGUMENT, "layer_tensors[0]", "strides [256, 64, 16, 4, 1]");
  // K and V on the same memory (kv stride 0), and V starting half-way into K.
  EXPECT_KVP(CreateWithLayer0(ctx.get(), {0, kBlock, H * D, D, 1}, mem0.data(), mem1.data(), &c),
             KVP_ERR_INVALID_ARGUMENT, "layer_tensors[0]", "strides [0, 64, 16, 8, 1]", "K and V views overlap");
  EXPECT_KVP(CreateWithLayer0(ctx.get(), {NB * kBlock / 2, kBlock, H * D, D, 1}, mem0.data(), mem1.data(), &c),
             KVP_ERR_INVALID_ARGUMENT, "layer_tensors[0]", "strides [128, 64, 16, 8, 1]", "K and V views overlap");
  // K and V interleaved per block (block-first memory seen as kv-first): fine.
  {
    kvp_kv_cache* ok = nullptr;
    EXPECT_KVP(CreateWithLayer0(ctx.get(), {kBlock, 2 * kBlock, H * D, D, 1}, mem0.data(), mem1.data(), &ok), KVP_OK);
    Handle<kvp_kv_cache> h(ok);
  }
  // Two layers on the same memory, or half a layer apart.
  {
    const kvp_kv_cache_options o = Options();
    Tensor a(mem0.data(), kF32, {2, NB, BS, H, D}), b(mem0.data(), kF32, {2, NB, BS, H, D});
    const DLTensor same[L] = {a.t, b.t};
    EXPECT_KVP(api.kvp_kv_cache_create_from_tensors(ctx.get(), &o, same, L, &c), KVP_ERR_INVALID_ARGUMENT,
               "layer_tensors[0]", "layer_tensors[1]", "share memory", "strides [256, 64, 16, 8, 1]");
    Tensor half(mem0.data() + NB * kBlock, kF32, {2, NB, BS, H, D});
    const DLTensor shifted[L] = {a.t, half.t};
    EXPECT_KVP(api.kvp_kv_cache_create_from_tensors(ctx.get(), &o, shifted, L, &c), KVP_ERR_INVALID_ARGUMENT,
               "share memory");
  }
  EXPECT_EQ(c, sentinel);
}

// Layers interleaved in one allocation [num_blocks, num_layers, 2, block_size, heads, head_size]:
// their byte ranges intersect but no element is shared; accepted, and each write lands in its place.
TEST_F(Reliability2, InterleavedLayersAreAcceptedAndWrittenApart) {
  auto ctx = MakeContext();
  std::vector<float> mem(static_cast<size_t>(NB) * L * 2 * kBlock, 0.0f);
  const std::vector<int64_t> strides = {kBlock, L * 2 * kBlock, H * D, D, 1};
  Tensor t0(mem.data(), kF32, {2, NB, BS, H, D}, strides), t1(mem.data() + 2 * kBlock, kF32, {2, NB, BS, H, D}, strides);
  const DLTensor layers[L] = {t0.t, t1.t};
  const kvp_kv_cache_options o = Options();
  kvp_kv_cache* c = nullptr;
  ASSERT_OK(api.kvp_kv_cache_create_from_tensors(ctx.get(), &o, layers, L, &c));
  Handle<kvp_kv_cache> cache(c);
  // Slot 0 (block 0) and slot 16 (block 4 does not exist: use slot 12, block 3) in both layers.
  int64_t slots[2] = {0, 12};
  for (int l = 0; l < L; ++l) {
    std::vector<float> k(2 * H * D), v(2 * H * D);
    for (size_t i = 0; i < k.size(); ++i) {
      k[i] = static_cast<float>(100 * l + 1 + (i >= H * D ? 10 : 0));
      v[i] = -k[i];
    }
    Tensor kt(k.data(), kF32, {2, H, D}), vt(v.data(), kF32, {2, H, D}), st(slots, kI64, {2});
    ASSERT_OK(api.kvp_kv_cache_write(cache.get(), l, kt.p(), vt.p(), st.p()));
  }
  auto at = [&](int block, int layer, int kv) { return mem[((static_cast<size_t>(block) * L + layer) * 2 + kv) * kBlock]; };
  EXPECT_EQ(at(0, 0, 0), 1.0f);
  EXPECT_EQ(at(0, 0, 1), -1.0f);
  EXPECT_EQ(at(0, 1, 0), 101.0f);
  EXPECT_EQ(at(0, 1, 1), -101.0f);
  EXPECT_EQ(at(3, 0, 0), 11.0f);
  EXPECT_EQ(at(3, 1, 1), -111.0f);
  EXPECT_EQ(at(1, 0, 0), 0.0f);
}

TEST_F(Reliability2, AttentionRunRefusesOverlappingOut) {
  constexpr int QH = 2, T = 3, D = 32;  // a head size the CPU dense backend takes
  auto ctx = MakeContext();
  kvp_kv_cache_options co = Options();
  co.head_size = D;
  kvp_kv_cache* c = nullptr;
  ASSERT_OK(api.kvp_kv_cache_create(ctx.get(), &co, &c));
  Handle<kvp_kv_cache> cache(c);
  kvp_attention_options ao{};
  ao.struct_size = sizeof ao;
  ao.backend = "dense";
  ao.num_q_heads = QH;
  ao.num_kv_heads = H;
  ao.head_size = D;
  ao.kv_dtype = KVP_DTYPE_FLOAT32;
  kvp_attention* a = nullptr;
  ASSERT_OK(api.kvp_attention_create(ctx.get(), &ao, &a));
  Handle<kvp_attention> attn(a);
  kvp_plan_options po{};
  po.struct_size = sizeof po;
  po.max_num_seqs = 1;
  po.max_num_tokens = T;
  po.max_num_blocks = 1;
  kvp_plan* p = nullptr;
  ASSERT_OK(api.kvp_plan_create(ctx.get(), &po, &p));
  Handle<kvp_plan> plan(p);
  const int32_t qsl[2] = {0, T}, seq_lens[1] = {T}, table[1] = {0};
  kvp_batch b{};
  b.struct_size = sizeof b;
  b.num_seqs = 1;
  b.block_size = BS;
  b.query_start_loc = qsl;
  b.seq_lens = seq_lens;
  b.block_table = table;
  b.block_table_stride = 1;
  ASSERT_OK(api.kvp_plan_update(plan.get(), &b));
  std::vector<float> q(T * QH * D, 0.5f), kv(T * H * D, 0.25f), out(T * QH * D, 7.0f), lse(T * QH, 7.0f);
  int64_t slots[T] = {0, 1, 2};
  Tensor kt(kv.data(), kF32, {T, H, D}), st(slots, kI64, {T});
  ASSERT_OK(api.kvp_kv_cache_write(cache.get(), 0, kt.p(), kt.p(), st.p()));
  Tensor qt(q.data(), kF32, {T, QH, D}), good_out(out.data(), kF32, {T, QH, D}), good_lse(lse.data(), kF32, {T, QH});
  Tensor out0(out.data(), kF32, {T, QH, D}, {0, D, 1}), lse00(lse.data(), kF32, {T, QH}, {0, 0});
  EXPECT_KVP(api.kvp_attention_run(attn.get(), plan.get(), cache.get(), 0, qt.p(), out0.p(), nullptr),
             KVP_ERR_INVALID_ARGUMENT, "out", "strides [0, 32, 1]", "one address");
  EXPECT_KVP(api.kvp_attention_run(attn.get(), plan.get(), cache.get(), 0, qt.p(), good_out.p(), lse00.p()),
             KVP_ERR_INVALID_ARGUMENT, "lse", "strides [0, 0]", "one address");
  // Nothing was written by the refused calls.
  for (float x : out) EXPECT_EQ(x, 7.0f);
  for (float x : lse) EXPECT_EQ(x, 7.0f);
  EXPECT_KVP(api.kvp_attention_run(attn.get(), plan.get(), cache.get(), 0, qt.p(), good_out.p(), good_lse.p()), KVP_OK);
  EXPECT_NEAR(out[0], 0.25f, 1e-6f);
}

// Found by the dlpack fuzzer: an empty query (one extent 0) whose other extents multiply past int64
// was counted by multiplying them all (signed overflow, UBSan). It is empty: counted as 0, and the
// run is refused for its shape, not read.
TEST_F(Reliability2, EmptyTensorsWithHugeExtentsAreCountedAsEmpty) {
  constexpr int QH = 2, T = 1, D = 32;
  auto ctx = MakeContext();
  kvp_kv_cache_options co = Options();
  co.head_size = D;
  kvp_kv_cache* c = nullptr;
  ASSERT_OK(api.kvp_kv_cache_create(ctx.get(), &co, &c));
  Handle<kvp_kv_cache> cache(c);
  kvp_attention_options ao{};
  ao.struct_size = sizeof ao;
  ao.backend = "dense";
  ao.num_q_heads = QH;
  ao.num_kv_heads = H;
  ao.head_size = D;
  ao.kv_dtype = KVP_DTYPE_FLOAT32;
  kvp_attention* a = nullptr;
  ASSERT_OK(api.kvp_attention_create(ctx.get(), &ao, &a));
  Handle<kvp_attention> attn(a);
  kvp_plan_options po{};
  po.struct_size = sizeof po;
  po.max_num_seqs = 1;
  po.max_num_tokens = T;
  po.max_num_blocks = 1;
  kvp_plan* p = nullptr;
  ASSERT_OK(api.kvp_plan_create(ctx.get(), &po, &p));
  Handle<kvp_plan> plan(p);
  const int32_t qsl[2] = {0, T}, seq_lens[1] = {T}, table[1] = {0};
  kvp_batch b{};
  b.struct_size = sizeof b;
  b.num_seqs = 1;
  b.block_size = BS;
  b.query_start_loc = qsl;
  b.seq_lens = seq_lens;
  b.block_table = table;
  b.block_table_stride = 1;
  ASSERT_OK(api.kvp_plan_update(plan.get(), &b));
  std::vector<float> out(T * QH * D, 7.0f);
  float q = 0.0f;
  std::vector<float> q_full(T * QH * D, 0.5f);
  const int64_t huge = int64_t{1} << 40;
  Tensor good_out(out.data(), kF32, {T, QH, D});
  for (const std::vector<int64_t>& shape :
       {std::vector<int64_t>{huge, huge, 0}, {0, huge, huge}, {huge, 0, huge}}) {
    Tensor qt(&q, kF32, shape, {1, 1, 1});
    EXPECT_KVP(api.kvp_attention_run(attn.get(), plan.get(), cache.get(), 0, qt.p(), good_out.p(), nullptr),
               KVP_ERR_INVALID_ARGUMENT, "query");
    Tensor empty_out(out.data(), kF32, shape, {1, 1, 1});
    Tensor real_q(q_full.data(), kF32, {T, QH, D});
    EXPECT_KVP(api.kvp_attention_run(attn.get(), plan.get(), cache.get(), 0, real_q.p(), empty_out.p(), nullptr),
               KVP_ERR_INVALID_ARGUMENT, "out");
  }
  for (float x : out) EXPECT_EQ(x, 7.0f);
}

std::string Repeat(const std::string& s, int n) {
  std::string r;
  r.reserve(s.size() * n);
  for (int i = 0; i < n; ++i) r += s;
  return r;
}

kvp_status CheckJson(const char* backend, const std::string& json) {
  return api.kvp_config_check(backend, KVP_CONFIG_JSON, json.data(), json.size());
}

TEST_F(Reliability2, DeeplyNestedJsonConfigsAreRefused) {
  const std::string brackets = "{\"backend_config_type\": \"KvShiftConfig\", \"backend_config\": {\"alpha_k\": " +
                               Repeat("[", 10000) + Repeat("]", 10000) + "}}";
  EXPECT_KVP(CheckJson("kv_shift", brackets), KVP_ERR_INVALID_CONFIG, "levels deep");
  const std::string objects = "{\"backend_config_type\": \"DenseConfig\", \"backend_config\": " +
                              Repeat("{\"window_left\": ", 10000) + "1" + Repeat("}", 10000) + "}";
  EXPECT_KVP(CheckJson("dense", objects), KVP_ERR_INVALID_CONFIG, "levels deep");
  EXPECT_KVP(CheckJson("dense", Repeat("[", 100000)), KVP_ERR_INVALID_CONFIG, "levels deep");
  EXPECT_KVP(CheckJson("dense", Repeat("{\"a\":", 100000)), KVP_ERR_INVALID_CONFIG, "levels deep");
  // Just past the bound, and just within it (then the schema refuses it, with the parser's message).
  EXPECT_KVP(CheckJson("dense", "{\"backend_config\": " + Repeat("[", 16) + Repeat("]", 16) + "}"),
             KVP_ERR_INVALID_CONFIG, "levels deep");
  EXPECT_KVP(CheckJson("dense", "{\"backend_config\": " + Repeat("[", 15) + Repeat("]", 15) + "}"),
             KVP_ERR_INVALID_CONFIG, "does not match the schema");
  // Brackets inside a string do not count.
  EXPECT_KVP(CheckJson("dense", "{\"backend_config_type\": \"" + Repeat("[{", 50) + "\"}"), KVP_ERR_INVALID_CONFIG,
             "does not match the schema");
  // Valid configs still pass.
  EXPECT_KVP(CheckJson("dense", "{\"backend_config_type\": \"DenseConfig\", \"backend_config\": {\"window_left\": 3}}"),
             KVP_OK);
  EXPECT_KVP(CheckJson("kv_shift", "{\"backend_config_type\": \"KvShiftConfig\", \"backend_config\": "
                                   "{\"alpha_k\": [1, 0, 1, 0], \"alpha_v\": [1, 0, 1, 0]}}"),
             KVP_OK);
}

// {"backend_config_type": "DenseConfig", "backend_config": {"window_left": 7, "logits_soft_cap": 5.0}}
// as flatc -b writes it (robustness_test.cc). The schema has no recursive table, so a binary config
// cannot nest deeper than 3; the verifier's depth and table bounds are set explicitly. Every
// single-byte change and every truncation is accepted or refused, never more.
const uint8_t kDenseBinary[] = {
    0x10, 0x00, 0x00, 0x00, 0x4b, 0x56, 0x50, 0x43, 0x08, 0x00, 0x0c, 0x00, 0x07, 0x00, 0x08, 0x00,
    0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x0c, 0x00, 0x00, 0x00, 0x08, 0x00, 0x0c, 0x00,
    0x04, 0x00, 0x08, 0x00, 0x08, 0x00, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0xa0, 0x40};

TEST_F(Reliability2, BinaryConfigMutationsAreAcceptedOrRefused) {
  alignas(8) uint8_t buf[sizeof kDenseBinary];
  ASSERT_EQ(api.kvp_config_check("dense", KVP_CONFIG_BINARY, kDenseBinary, sizeof kDenseBinary), KVP_OK)
      << api.kvp_last_error();
  for (size_t i = 0; i < sizeof kDenseBinary; ++i)
    for (int value : {0x00, 0x01, 0x04, 0x7f, 0x80, 0xfc, 0xff}) {
      std::memcpy(buf, kDenseBinary, sizeof buf);
      buf[i] = static_cast<uint8_t>(value);
      const kvp_status s = api.kvp_config_check("dense", KVP_CONFIG_BINARY, buf, sizeof buf);
      EXPECT_TRUE(s == KVP_OK || s == KVP_ERR_INVALID_CONFIG) << "byte " << i << " = " << value << ": " << Name(s);
      if (s != KVP_OK) {
        EXPECT_STRNE(api.kvp_last_error(), "") << "byte " << i;
      }
    }
  for (size_t n = 0; n < sizeof kDenseBinary; ++n)
    EXPECT_EQ(api.kvp_config_check("dense", KVP_CONFIG_BINARY, kDenseBinary, n), KVP_ERR_INVALID_CONFIG) << n;
}

}  // namespace
