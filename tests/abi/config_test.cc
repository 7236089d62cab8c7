// Backend configs through the C ABI, loaded with dlopen as an engine does ($KVP_LIBRARY, set by
// CTest): JSON text parsed against the built-in schema, FlatBuffers binary built here with the
// generated header, every truncation and thousands of byte flips of a valid buffer (never a crash,
// only KVP_OK or KVP_ERR_INVALID_CONFIG), and configs that really change what attention computes.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "common/naive_attention.h"
#include "flatbuffers/flatbuffers.h"
#include "abi/abi_harness.h"
#include "kvplug_config_generated.h"

namespace {

namespace fb = kvplug::fb;

class Config : public LoadedAbi {};


// kvp_config_check on a JSON string (config_size = its length, no NUL needed).
kvp_status CheckJson(const char* backend, std::string_view json) {
  return api.kvp_config_check(backend, KVP_CONFIG_JSON, json.data(), json.size());
}
kvp_status CheckBinary(const char* backend, const std::vector<uint8_t>& buf) {
  return api.kvp_config_check(backend, KVP_CONFIG_BINARY, buf.data(), buf.size());
}

std::vector<uint8_t> Bytes(const flatbuffers::FlatBufferBuilder& b) {
  return std::vector<uint8_t>(b.GetBufferPointer(), b.GetBufferPointer() + b.GetSize());
}

std::vector<uint8_t> DenseBinary(int32_t window_left, float soft_cap, bool identifier = true) {
  flatbuffers::FlatBufferBuilder b;
  auto dense = fb::CreateDenseConfig(b, window_left, soft_cap);
  auto root = fb::CreateAttentionConfig(b, fb::BackendConfig::DenseConfig, dense.Union());
  if (identifier) {
    fb::FinishAttentionConfigBuffer(b, root);
  } else {
    b.Finish(root);
  }
  return Bytes(b);
}

bool Registered(const std::string& backend) {
  int32_t count = 0;
  EXPECT_EQ(api.kvp_backend_count(&count), KVP_OK);
  for (int32_t i = 0; i < count; ++i) {
    const char* name = nullptr;
    EXPECT_EQ(api.kvp_backend_name(i, &name), KVP_OK);
    if (name && backend == name) return true;
  }
  return false;
}

// ------------------------------------------------------------------------------------------------
// Arguments
// ------------------------------------------------------------------------------------------------

TEST_F(Config, CheckArguments) {
  const std::string json = R"({"backend_config_type":"DenseConfig","backend_config":{"window_left":8}})";
  EXPECT_KVP(CheckJson("dense", json), KVP_OK);
  EXPECT_KVP(api.kvp_config_check(nullptr, KVP_CONFIG_JSON, json.data(), json.size()), KVP_ERR_INVALID_ARGUMENT,
             "backend is NULL");
  EXPECT_KVP(api.kvp_config_check("no_such_backend", KVP_CONFIG_JSON, json.data(), json.size()), KVP_ERR_NOT_FOUND,
             "no_such_backend");
  EXPECT_KVP(api.kvp_config_check("dense", KVP_CONFIG_NONE, nullptr, 0), KVP_OK);
  EXPECT_KVP(api.kvp_config_check("dense", KVP_CONFIG_NONE, "garbage", 7), KVP_OK);  // NONE ignores the bytes
  EXPECT_KVP(api.kvp_config_check("dense", 3, json.data(), json.size()), KVP_ERR_INVALID_ARGUMENT, "config_format=3");
  EXPECT_KVP(api.kvp_config_check("dense", -1, json.data(), json.size()), KVP_ERR_INVALID_ARGUMENT, "config_format=-1");
  EXPECT_KVP(api.kvp_config_check("dense", KVP_CONFIG_JSON, nullptr, 10), KVP_ERR_INVALID_ARGUMENT,
             "config is NULL", "KVP_CONFIG_JSON");
  EXPECT_KVP(api.kvp_config_check("dense", KVP_CONFIG_BINARY, nullptr, 64), KVP_ERR_INVALID_ARGUMENT,
             "config is NULL", "KVP_CONFIG_BINARY");
}

// ------------------------------------------------------------------------------------------------
// JSON
// ------------------------------------------------------------------------------------------------

struct TypedJson {
  const char* backend;
  const char* type;
  const char* json;
};
const TypedJson kValidJson[] = {
    {"dense", "DenseConfig",
     R"({"backend_config_type":"DenseConfig","backend_config":{"window_left":8,"logits_soft_cap":30.0}})"},
    {"star", "StarConfig",
     R"({"backend_config_type":"StarConfig","backend_config":{"context_block_size":1024,"anchor_block_size":512}})"},
    {"attamba", "AttambaConfig",
     R"({"backend_config_type":"AttambaConfig","backend_config":{"chunk_size":8,"window":16,"state_size":16,"conv_width":4}})"},
    {"kv_shift", "KvShiftConfig",
     R"({"backend_config_type":"KvShiftConfig","backend_config":{"alpha_k":[0.5,0.5,1.0,0.0],"alpha_v":[1.0,0.0,0.25,0.75]}})"},
    {"entropy", "EntropyConfig",
     R"({"backend_config_type":"EntropyConfig","backend_config":{"temperature":[1.0,0.5,2.0,1.0],"collect_entropy":true}})"},
};

TEST_F(Config, JsonOfEveryTypeIsAcceptedByItsBackendWhereRegistered) {
  ASSERT_TRUE(Registered("dense"));
  int registered = 0;
  for (const TypedJson& t : kValidJson) {
    SCOPED_TRACE(t.backend);
    if (Registered(t.backend)) {
      ++registered;
      EXPECT_KVP(CheckJson(t.backend, t.json), KVP_OK);
    } else {
      EXPECT_KVP(CheckJson(t.backend, t.json), KVP_ERR_NOT_FOUND, std::string("'") + t.backend + "'");
    }
    // Each is valid against the schema: "dense" refuses the other types for the type alone.
    if (std::string(t.backend) == "dense") {
      EXPECT_KVP(CheckJson("dense", t.json), KVP_OK);
    } else {
      EXPECT_KVP(CheckJson("dense", t.json), KVP_ERR_INVALID_CONFIG,
                 std::string("config holds a ") + t.type + " but backend 'dense' takes a DenseConfig");
    }
  }
  EXPECT_GE(registered, 1);
  // No config type at all: the backend's defaults.
  EXPECT_KVP(CheckJson("dense", "{}"), KVP_OK);
  EXPECT_KVP(CheckJson("dense", R"({"backend_config_type":"NONE"})"), KVP_OK);
  EXPECT_KVP(CheckJson("dense", R"({"backend_config_type":"DenseConfig","backend_config":{}})"), KVP_OK);
  // config_size bounds the text: bytes after it are never read (no NUL needed).
  const std::string valid = kValidJson[0].json;
  const std::string padded = valid + "this is not JSON at all";
  EXPECT_KVP(api.kvp_config_check("dense", KVP_CONFIG_JSON, padded.data(), valid.size()), KVP_OK);
  EXPECT_KVP(api.kvp_config_check("dense", KVP_CONFIG_JSON, padded.data(), padded.size()), KVP_ERR_INVALID_CONFIG,
             "JSON config");
}

TEST_F(Config, InvalidJsonIsInvalidConfig) {
  const struct {
    const char* what;
    std::string json;
    const char* part;
  } cases[] = {
      {"unknown field", R"({"backend_config_type":"DenseConfig","backend_config":{"window_size":8}})", "window_size"},
      {"unknown top-level field", R"({"backend":"dense"})", "backend"},
      {"string for int", R"({"backend_config_type":"DenseConfig","backend_config":{"window_left":"eight"}})", "JSON"},
      {"object for int", R"({"backend_config_type":"DenseConfig","backend_config":{"window_left":{}}})", "JSON"},
      {"unknown config type", R"({"backend_config_type":"WarpConfig","backend_config":{}})", "WarpConfig"},
      {"missing colon", R"({"backend_config_type" "DenseConfig"})", "JSON"},
      {"unbalanced", R"({"backend_config_type":"DenseConfig","backend_config":{"window_left":8})", "JSON"},
      {"not an object", "[1, 2, 3]", "JSON"},
      {"empty text", "", "JSON"},
      {"whitespace", "   \n\t ", "JSON"},
      {"config type for another backend", kValidJson[1].json, "StarConfig"},
      {"negative soft cap",
       R"({"backend_config_type":"DenseConfig","backend_config":{"logits_soft_cap":-1.0}})", "logits_soft_cap=-1"},
      {"type without value", R"({"backend_config_type":"DenseConfig"})", "DenseConfig"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    EXPECT_KVP(CheckJson("dense", c.json), KVP_ERR_INVALID_CONFIG, c.part);
  }
  // An embedded NUL inside config_size, wherever it is.
  const std::string valid = kValidJson[0].json;
  for (size_t at : {size_t{0}, size_t{1}, valid.size() / 2, valid.size() - 1}) {
    std::string with_nul = valid;
    with_nul[at] = '\0';
    EXPECT_KVP(CheckJson("dense", with_nul), KVP_ERR_INVALID_CONFIG, "NUL");
  }
  std::string nul_after = valid + std::string(1, '\0') + "xyz";
  EXPECT_KVP(CheckJson("dense", nul_after), KVP_ERR_INVALID_CONFIG, "NUL");
  // Every truncation of valid text fails cleanly.
  for (size_t n = 0; n < valid.size(); ++n) {
    SCOPED_TRACE(n);
    const std::unique_ptr<char[]> copy(new char[n + 1]);
    std::memcpy(copy.get(), valid.data(), n);
    copy[n] = '}';  // a byte past config_size that must not be read as part of the text
    EXPECT_KVP(api.kvp_config_check("dense", KVP_CONFIG_JSON, copy.get(), n), KVP_ERR_INVALID_CONFIG, "JSON config");
  }
}

// ------------------------------------------------------------------------------------------------
// Binary
// ------------------------------------------------------------------------------------------------

TEST_F(Config, BinaryBuiltWithTheGeneratedHeader) {
  const auto dense = DenseBinary(8, 0.5f);
  EXPECT_TRUE(fb::AttentionConfigBufferHasIdentifier(dense.data()));
  EXPECT_KVP(CheckBinary("dense", dense), KVP_OK);

  // Defaults only (an empty DenseConfig table) and no union at all.
  EXPECT_KVP(CheckBinary("dense", DenseBinary(-1, 0.0f)), KVP_OK);
  {
    flatbuffers::FlatBufferBuilder b;
    fb::FinishAttentionConfigBuffer(b, fb::CreateAttentionConfig(b));
    EXPECT_KVP(CheckBinary("dense", Bytes(b)), KVP_OK);
  }
  // Another backend's table.
  {
    flatbuffers::FlatBufferBuilder b;
    auto star = fb::CreateStarConfig(b, 256, 128);
    fb::FinishAttentionConfigBuffer(b, fb::CreateAttentionConfig(b, fb::BackendConfig::StarConfig, star.Union()));
    EXPECT_KVP(CheckBinary("dense", Bytes(b)), KVP_ERR_INVALID_CONFIG, "StarConfig", "DenseConfig");
  }
  // A union type naming DenseConfig with no table behind it.
  {
    flatbuffers::FlatBufferBuilder b;
    fb::FinishAttentionConfigBuffer(b, fb::CreateAttentionConfig(b, fb::BackendConfig::DenseConfig, 0));
    EXPECT_KVP(CheckBinary("dense", Bytes(b)), KVP_ERR_INVALID_CONFIG, "DenseConfig");
  }
  // A union type this library does not know.
  {
    flatbuffers::FlatBufferBuilder b;
    auto dense_table = fb::CreateDenseConfig(b, 4, 0.0f);
    fb::FinishAttentionConfigBuffer(
        b, fb::CreateAttentionConfig(b, static_cast<fb::BackendConfig>(77), dense_table.Union()));
    EXPECT_KVP(CheckBinary("dense", Bytes(b)), KVP_ERR_INVALID_CONFIG, "config");
  }
  // Values the verifier accepts but the config does not.
  EXPECT_KVP(CheckBinary("dense", DenseBinary(8, -0.5f)), KVP_ERR_INVALID_CONFIG, "logits_soft_cap=-0.5");
  EXPECT_KVP(CheckBinary("dense", DenseBinary(8, std::numeric_limits<float>::quiet_NaN())), KVP_ERR_INVALID_CONFIG,
             "logits_soft_cap");
  EXPECT_KVP(CheckBinary("dense", DenseBinary(8, std::numeric_limits<float>::infinity())), KVP_ERR_INVALID_CONFIG,
             "logits_soft_cap");

  // Without the file identifier.
  const auto bare = DenseBinary(8, 0.5f, false);
  EXPECT_FALSE(fb::AttentionConfigBufferHasIdentifier(bare.data()));
  EXPECT_KVP(CheckBinary("dense", bare), KVP_ERR_INVALID_CONFIG, "identifier", "KVPC");
  // Too short to hold a header.
  EXPECT_KVP(api.kvp_config_check("dense", KVP_CONFIG_BINARY, dense.data(), 0), KVP_ERR_INVALID_CONFIG, "0 bytes");
  EXPECT_KVP(api.kvp_config_check("dense", KVP_CONFIG_BINARY, dense.data(), 7), KVP_ERR_INVALID_CONFIG, "7 bytes");
  // JSON text handed over as binary.
  const std::string json = kValidJson[0].json;
  EXPECT_KVP(api.kvp_config_check("dense", KVP_CONFIG_BINARY, json.data(), json.size()), KVP_ERR_INVALID_CONFIG,
             "binary config");
}

TEST_F(Config, EveryTruncationOfABinaryFailsCleanly) {
  for (const auto& full : {DenseBinary(8, 0.5f), DenseBinary(-1, 0.0f), DenseBinary(3, 0.0f)}) {
    ASSERT_EQ(CheckBinary("dense", full), KVP_OK) << api.kvp_last_error();
    for (size_t n = 0; n < full.size(); ++n) {
      SCOPED_TRACE(n);
      // A fresh heap copy of exactly n bytes, so that any read past it is a real overread.
      std::vector<uint8_t> prefix(full.begin(), full.begin() + n);
      prefix.shrink_to_fit();
      EXPECT_KVP(api.kvp_config_check("dense", KVP_CONFIG_BINARY, n ? prefix.data() : full.data(), n),
                 KVP_ERR_INVALID_CONFIG, "binary config");
    }
  }
}

TEST_F(Config, RandomByteFlipsNeverCrash) {
  const std::vector<std::vector<uint8_t>> seeds = {DenseBinary(8, 0.5f), DenseBinary(-1, 0.0f)};
  std::mt19937 rng(12345);
  int ok = 0, invalid = 0, other = 0;
  std::string other_message;
  for (int iter = 0; iter < 4000; ++iter) {
    std::vector<uint8_t> buf = seeds[iter % seeds.size()];
    const int flips = 1 + static_cast<int>(rng() % 3);
    for (int f = 0; f < flips; ++f) buf[rng() % buf.size()] ^= static_cast<uint8_t>(1 + rng() % 255);
    const kvp_status s = CheckBinary("dense", buf);
    if (s == KVP_OK) {
      ++ok;
      // Whatever verified must also create an attention handle (or fail as a config would).
      kvp_context* ctx = nullptr;
      ASSERT_OK(api.kvp_context_create(nullptr, &ctx));
      kvp_attention_options o{};
      o.struct_size = sizeof o;
      o.backend = "dense";
      o.num_q_heads = 2;
      o.num_kv_heads = 1;
      o.head_size = 32;
      o.kv_dtype = KVP_DTYPE_FLOAT32;
      o.config_format = KVP_CONFIG_BINARY;
      o.config = buf.data();
      o.config_size = buf.size();
      kvp_attention* a = nullptr;
      EXPECT_EQ(api.kvp_attention_create(ctx, &o, &a), KVP_OK) << api.kvp_last_error();
      api.kvp_attention_destroy(a);
      api.kvp_context_destroy(ctx);
    } else if (s == KVP_ERR_INVALID_CONFIG) {
      ++invalid;
      EXPECT_NE(std::string(api.kvp_last_error()).rfind("kvp_config_check:", 0), std::string::npos);
    } else {
      ++other;
      other_message = std::string(Name(s)) + ": " + api.kvp_last_error();
    }
  }
  EXPECT_EQ(other, 0) << "last unexpected status: " << other_message;
  EXPECT_GT(invalid, 0);
  EXPECT_GT(ok, 0);
  EXPECT_EQ(ok + invalid + other, 4000);
}

// ------------------------------------------------------------------------------------------------
// Configs change what attention computes
// ------------------------------------------------------------------------------------------------

constexpr int kQH = 4, kKH = 2, kD = 32, kBs = 4, kLen = 10;

struct Dense10 {
  kvp_context* ctx = nullptr;
  kvp_kv_cache* cache = nullptr;
  kvp_plan* plan = nullptr;
  std::vector<float> q, k, v;
  ~Dense10() {
    api.kvp_plan_destroy(plan);
    api.kvp_kv_cache_destroy(cache);
    api.kvp_context_destroy(ctx);
  }
};

// One 10-token sequence prefilled whole: K/V written, all 10 positions queried.
void MakeDense10(Dense10* d) {
  ASSERT_OK(api.kvp_context_create(nullptr, &d->ctx));
  kvp_kv_cache_options co{};
  co.struct_size = sizeof co;
  co.num_layers = 1;
  co.num_blocks = 4;
  co.block_size = kBs;
  co.num_kv_heads = kKH;
  co.head_size = kD;
  co.dtype = KVP_DTYPE_FLOAT32;
  co.layout = KVP_LAYOUT_KV_FIRST;
  ASSERT_OK(api.kvp_kv_cache_create(d->ctx, &co, &d->cache));
  kvp_plan_options po{};
  po.struct_size = sizeof po;
  po.max_num_seqs = 1;
  po.max_num_tokens = kLen;
  po.max_num_blocks = 4;
  ASSERT_OK(api.kvp_plan_create(d->ctx, &po, &d->plan));
  std::mt19937 rng(77);
  std::uniform_real_distribution<float> dist(-2.0f, 2.0f);
  for (auto* vec : {&d->q, &d->k, &d->v}) {
    vec->resize(static_cast<size_t>(kLen) * (vec == &d->q ? kQH : kKH) * kD);
    for (float& x : *vec) x = dist(rng);
  }
  // Blocks 3, 1, 2 in that order: positions 0-3, 4-7, 8-9.
  const int32_t table[3] = {3, 1, 2};
  std::vector<int64_t> slots(kLen);
  for (int p = 0; p < kLen; ++p) slots[p] = int64_t{table[p / kBs]} * kBs + p % kBs;
  int64_t kv_shape[3] = {kLen, kKH, kD}, slot_shape[1] = {kLen};
  DLTensor kt{d->k.data(), {kDLCPU, 0}, 3, {kDLFloat, 32, 1}, kv_shape, nullptr, 0};
  DLTensor vt{d->v.data(), {kDLCPU, 0}, 3, {kDLFloat, 32, 1}, kv_shape, nullptr, 0};
  DLTensor st{slots.data(), {kDLCPU, 0}, 1, {kDLInt, 64, 1}, slot_shape, nullptr, 0};
  ASSERT_OK(api.kvp_kv_cache_write(d->cache, 0, &kt, &vt, &st));
  const int32_t qsl[2] = {0, kLen}, lens[1] = {kLen};
  kvp_batch b{};
  b.struct_size = sizeof b;
  b.num_seqs = 1;
  b.block_size = kBs;
  b.query_start_loc = qsl;
  b.seq_lens = lens;
  b.block_table = table;
  b.block_table_stride = 3;
  ASSERT_OK(api.kvp_plan_update(d->plan, &b));
}

// Runs dense attention with the given config and sm_scale; returns out and lse.
void RunDense(const Dense10& d, int32_t format, const void* config, size_t size, float sm_scale,
              std::vector<float>* out, std::vector<float>* lse) {
  kvp_attention_options o{};
  o.struct_size = sizeof o;
  o.backend = "dense";
  o.num_q_heads = kQH;
  o.num_kv_heads = kKH;
  o.head_size = kD;
  o.kv_dtype = KVP_DTYPE_FLOAT32;
  o.sm_scale = sm_scale;
  o.config_format = format;
  o.config = config;
  o.config_size = size;
  kvp_attention* a = nullptr;
  ASSERT_OK(api.kvp_attention_create(d.ctx, &o, &a));
  out->assign(static_cast<size_t>(kLen) * kQH * kD, std::nanf(""));
  lse->assign(static_cast<size_t>(kLen) * kQH, std::nanf(""));
  int64_t q_shape[3] = {kLen, kQH, kD}, lse_shape[2] = {kLen, kQH};
  DLTensor qt{const_cast<float*>(d.q.data()), {kDLCPU, 0}, 3, {kDLFloat, 32, 1}, q_shape, nullptr, 0};
  DLTensor ot{out->data(), {kDLCPU, 0}, 3, {kDLFloat, 32, 1}, q_shape, nullptr, 0};
  DLTensor lt{lse->data(), {kDLCPU, 0}, 2, {kDLFloat, 32, 1}, lse_shape, nullptr, 0};
  const kvp_status s = api.kvp_attention_run(a, d.plan, d.cache, 0, &qt, &ot, &lt);
  api.kvp_attention_destroy(a);
  ASSERT_EQ(s, KVP_OK) << api.kvp_last_error();
}

double MaxError(const Dense10& d, const kvplug::testing::NaiveParams& p, const std::vector<float>& out,
                const std::vector<float>& lse) {
  const std::vector<double> q(d.q.begin(), d.q.end()), k(d.k.begin(), d.k.end()), v(d.v.begin(), d.v.end());
  std::vector<double> ref_out, ref_lse;
  kvplug::testing::NaiveAttention(p, kLen, kLen, q, k, v, &ref_out, &ref_lse);
  double err = 0;
  for (size_t i = 0; i < ref_out.size(); ++i) err = std::max(err, std::abs(ref_out[i] - out[i]));
  for (size_t i = 0; i < ref_lse.size(); ++i) err = std::max(err, std::abs(ref_lse[i] - lse[i]));
  return std::isnan(err) ? std::numeric_limits<double>::infinity() : err;
}

TEST_F(Config, DenseWindowLeftChangesTheOutput) {
  Dense10 d;
  MakeDense10(&d);
  ASSERT_TRUE(d.plan);
  kvplug::testing::NaiveParams p;
  p.num_q_heads = kQH;
  p.num_kv_heads = kKH;
  p.head_size = kD;
  p.sm_scale = 1.0 / std::sqrt(static_cast<double>(kD));

  std::vector<float> full_out, full_lse, win_out, win_lse, bin_out, bin_lse;
  RunDense(d, KVP_CONFIG_NONE, nullptr, 0, 0.0f, &full_out, &full_lse);
  const std::string json = R"({"backend_config_type":"DenseConfig","backend_config":{"window_left":2}})";
  EXPECT_KVP(CheckJson("dense", json), KVP_OK);
  RunDense(d, KVP_CONFIG_JSON, json.data(), json.size(), 0.0f, &win_out, &win_lse);
  const auto bin = DenseBinary(2, 0.0f);
  RunDense(d, KVP_CONFIG_BINARY, bin.data(), bin.size(), 0.0f, &bin_out, &bin_lse);

  EXPECT_LE(MaxError(d, p, full_out, full_lse), 1e-5);
  p.window_left = 2;
  EXPECT_LE(MaxError(d, p, win_out, win_lse), 1e-5);
  EXPECT_EQ(win_out, bin_out);  // JSON and binary forms of one config
  EXPECT_EQ(win_lse, bin_lse);
  // The window matters from position 3 on: the first 3 positions agree, later ones do not.
  double early = 0, late = 0;
  for (int t = 0; t < kLen; ++t)
    for (int i = 0; i < kQH * kD; ++i) {
      const double diff = std::abs(full_out[t * kQH * kD + i] - win_out[t * kQH * kD + i]);
      (t < 3 ? early : late) = std::max(t < 3 ? early : late, diff);
    }
  EXPECT_LE(early, 1e-6);
  EXPECT_GT(late, 1e-2);

  // A window wider than the sequence is no window.
  const auto wide = DenseBinary(kLen, 0.0f);
  std::vector<float> wide_out, wide_lse;
  RunDense(d, KVP_CONFIG_BINARY, wide.data(), wide.size(), 0.0f, &wide_out, &wide_lse);
  EXPECT_EQ(wide_out, full_out);
}

TEST_F(Config, DenseLogitsSoftCap) {
  Dense10 d;
  MakeDense10(&d);
  ASSERT_TRUE(d.plan);
  kvplug::testing::NaiveParams p;
  p.num_q_heads = kQH;
  p.num_kv_heads = kKH;
  p.head_size = kD;
  p.sm_scale = 1.0;  // large logits, so the cap bites
  std::vector<float> plain_out, plain_lse, cap_out, cap_lse;
  RunDense(d, KVP_CONFIG_NONE, nullptr, 0, 1.0f, &plain_out, &plain_lse);
  const std::string json = R"({"backend_config_type":"DenseConfig","backend_config":{"logits_soft_cap":5.0}})";
  RunDense(d, KVP_CONFIG_JSON, json.data(), json.size(), 1.0f, &cap_out, &cap_lse);
  EXPECT_LE(MaxError(d, p, plain_out, plain_lse), 1e-4);
  p.logits_soft_cap = 5.0;
  EXPECT_LE(MaxError(d, p, cap_out, cap_lse), 1e-4);
  double diff = 0;
  for (size_t i = 0; i < cap_out.size(); ++i) diff = std::max(diff, double(std::abs(cap_out[i] - plain_out[i])));
  EXPECT_GT(diff, 1e-2);

  // Negative caps are refused by the check and by creation, which leaves its output alone.
  const std::string neg = R"({"backend_config_type":"DenseConfig","backend_config":{"logits_soft_cap":-5.0}})";
  EXPECT_KVP(CheckJson("dense", neg), KVP_ERR_INVALID_CONFIG, "logits_soft_cap=-5");
  kvp_attention_options o{};
  o.struct_size = sizeof o;
  o.backend = "dense";
  o.num_q_heads = kQH;
  o.num_kv_heads = kKH;
  o.head_size = kD;
  o.kv_dtype = KVP_DTYPE_FLOAT32;
  o.config_format = KVP_CONFIG_JSON;
  o.config = neg.data();
  o.config_size = neg.size();
  kvp_attention* const sentinel = reinterpret_cast<kvp_attention*>(0x42);
  kvp_attention* a = sentinel;
  EXPECT_KVP(api.kvp_attention_create(d.ctx, &o, &a), KVP_ERR_INVALID_CONFIG, "logits_soft_cap=-5");
  const auto neg_bin = DenseBinary(-1, -5.0f);
  o.config_format = KVP_CONFIG_BINARY;
  o.config = neg_bin.data();
  o.config_size = neg_bin.size();
  EXPECT_KVP(api.kvp_attention_create(d.ctx, &o, &a), KVP_ERR_INVALID_CONFIG, "logits_soft_cap=-5");
  const std::string star = kValidJson[1].json;
  o.config_format = KVP_CONFIG_JSON;
  o.config = star.data();
  o.config_size = star.size();
  EXPECT_KVP(api.kvp_attention_create(d.ctx, &o, &a), KVP_ERR_INVALID_CONFIG, "StarConfig");
  const std::string broken = R"({"backend_config_type":"DenseConfig","backend_config":{"window_left":)";
  o.config = broken.data();
  o.config_size = broken.size();
  EXPECT_KVP(api.kvp_attention_create(d.ctx, &o, &a), KVP_ERR_INVALID_CONFIG, "JSON config");
  EXPECT_EQ(a, sentinel);
}

}  // namespace
