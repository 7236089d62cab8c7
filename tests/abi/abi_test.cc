// The C ABI, exercised the way a serving engine uses it: libkvplug.so is loaded with dlopen through
// kvplug_dl.h (path in $KVP_LIBRARY, set by CTest) and nothing of kvplug is linked. Every bad input
// is driven to its exact status code and its kvp_last_error() message is checked; the happy path
// runs a ragged batch end to end (prefix caching, fork, copy on write, chunked prefill, decodes,
// swap) and compares with the double-precision reference.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "common/naive_attention.h"
#include "abi/abi_harness.h"

namespace {

class Abi : public LoadedAbi {};


// ------------------------------------------------------------------------------------------------
// Handles, options, tensors
// ------------------------------------------------------------------------------------------------




kvp_block_manager_options BmOptions(int32_t block_size, int32_t device_blocks, int32_t host_blocks,
                                    int32_t caching, int32_t state_slots = 0) {
  kvp_block_manager_options o{};
  o.struct_size = sizeof o;
  o.block_size = block_size;
  o.num_device_blocks = device_blocks;
  o.num_host_blocks = host_blocks;
  o.enable_prefix_caching = caching;
  o.watermark = 0.0;
  o.num_state_slots = state_slots;
  o.hash_seed = 7;
  return o;
}

Handle<kvp_block_manager> MakeManager(const kvp_block_manager_options& o) {
  kvp_block_manager* m = nullptr;
  EXPECT_KVP(api.kvp_block_manager_create(&o, &m), KVP_OK);
  return Handle<kvp_block_manager>(m);
}

kvp_kv_cache_options CacheOptions(int32_t layers, int32_t blocks, int32_t block_size, int32_t kv_heads,
                                  int32_t head_size, int32_t dtype = KVP_DTYPE_FLOAT32,
                                  int32_t layout = KVP_LAYOUT_KV_FIRST) {
  kvp_kv_cache_options o{};
  o.struct_size = sizeof o;
  o.num_layers = layers;
  o.num_blocks = blocks;
  o.block_size = block_size;
  o.num_kv_heads = kv_heads;
  o.head_size = head_size;
  o.dtype = dtype;
  o.layout = layout;
  o.num_host_blocks = 4;
  o.num_state_slots = 2;
  o.state_bytes_per_layer = 16;
  return o;
}

Handle<kvp_kv_cache> MakeCache(const kvp_context* ctx, const kvp_kv_cache_options& o) {
  kvp_kv_cache* c = nullptr;
  EXPECT_KVP(api.kvp_kv_cache_create(ctx, &o, &c), KVP_OK);
  return Handle<kvp_kv_cache>(c);
}

kvp_attention_options AttnOptions(int32_t q_heads, int32_t kv_heads, int32_t head_size,
                                  int32_t kv_dtype = KVP_DTYPE_FLOAT32, const char* backend = "dense") {
  kvp_attention_options o{};
  o.struct_size = sizeof o;
  o.backend = backend;
  o.num_q_heads = q_heads;
  o.num_kv_heads = kv_heads;
  o.head_size = head_size;
  o.kv_dtype = kv_dtype;
  o.sm_scale = 0.0f;
  o.config_format = KVP_CONFIG_NONE;
  return o;
}

Handle<kvp_attention> MakeAttention(const kvp_context* ctx, const kvp_attention_options& o) {
  kvp_attention* a = nullptr;
  EXPECT_KVP(api.kvp_attention_create(ctx, &o, &a), KVP_OK);
  return Handle<kvp_attention>(a);
}

Handle<kvp_plan> MakePlan(const kvp_context* ctx, int32_t seqs, int32_t tokens, int32_t blocks) {
  kvp_plan_options o{};
  o.struct_size = sizeof o;
  o.max_num_seqs = seqs;
  o.max_num_tokens = tokens;
  o.max_num_blocks = blocks;
  kvp_plan* p = nullptr;
  EXPECT_KVP(api.kvp_plan_create(ctx, &o, &p), KVP_OK);
  return Handle<kvp_plan>(p);
}

std::vector<float> Random(size_t n, std::mt19937& rng, float lo = -1.0f, float hi = 1.0f) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

uint16_t ToBf16(float f) {  // round to nearest even, as the contract's conversion
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
float FromBf16(uint16_t h) {
  const uint32_t u = uint32_t{h} << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// A layer view of a cache, addressed by (K or V, block, position, head, element) in either layout.
struct View {
  DLTensor t{};
  int32_t layout = KVP_LAYOUT_KV_FIRST;
  size_t esize() const { return t.dtype.bits / 8; }
  uint8_t* Row(int kv, int64_t block, int64_t pos, int64_t head) const {
    const int64_t kv_first[5] = {kv, block, pos, head, 0};
    const int64_t block_first[5] = {block, kv, pos, head, 0};
    const int64_t* idx = layout == KVP_LAYOUT_KV_FIRST ? kv_first : block_first;
    int64_t off = 0;
    for (int i = 0; i < 5; ++i) off += idx[i] * t.strides[i];
    return static_cast<uint8_t*>(t.data) + t.byte_offset + off * static_cast<int64_t>(esize());
  }
  int64_t num_blocks() const { return t.shape[layout == KVP_LAYOUT_KV_FIRST ? 1 : 0]; }
  int64_t block_size() const { return t.shape[2]; }
  int64_t heads() const { return t.shape[3]; }
  int64_t head_size() const { return t.shape[4]; }
  double Load(int kv, int64_t block, int64_t pos, int64_t head, int64_t i) const {
    const uint8_t* r = Row(kv, block, pos, head) + i * esize();
    if (t.dtype.code == kDLBfloat) {
      uint16_t h;
      std::memcpy(&h, r, 2);
      return FromBf16(h);
    }
    float f;
    std::memcpy(&f, r, 4);
    return f;
  }
  // Every byte of one block (K and V, all positions and heads), in a fixed order.
  std::vector<uint8_t> BlockBytes(int64_t block) const {
    std::vector<uint8_t> out;
    const size_t row = head_size() * esize();
    for (int kv = 0; kv < 2; ++kv)
      for (int64_t pos = 0; pos < block_size(); ++pos)
        for (int64_t h = 0; h < heads(); ++h) {
          const uint8_t* r = Row(kv, block, pos, h);
          out.insert(out.end(), r, r + row);
        }
    return out;
  }
  void FillBlock(int64_t block, uint8_t byte) const {
    const size_t row = head_size() * esize();
    for (int kv = 0; kv < 2; ++kv)
      for (int64_t pos = 0; pos < block_size(); ++pos)
        for (int64_t h = 0; h < heads(); ++h) std::memset(Row(kv, block, pos, h), byte, row);
  }
  // Every byte of the layer.
  std::vector<uint8_t> AllBytes() const {
    std::vector<uint8_t> out;
    for (int64_t b = 0; b < num_blocks(); ++b) {
      auto bytes = BlockBytes(b);
      out.insert(out.end(), bytes.begin(), bytes.end());
    }
    return out;
  }
};

View LayerView(const kvp_kv_cache* cache, int32_t layer, int32_t host, int32_t layout) {
  View v;
  v.layout = layout;
  EXPECT_KVP(api.kvp_kv_cache_layer_view(cache, layer, host, &v.t), KVP_OK);
  return v;
}

std::vector<int32_t> BlockTable(const kvp_block_manager* m, uint64_t seq) {
  std::vector<int32_t> table(64, -7);
  int32_t n = -1;
  EXPECT_KVP(api.kvp_block_manager_block_table(m, seq, table.data(), 64, &n), KVP_OK);
  table.resize(std::max(n, 0));
  return table;
}

// ------------------------------------------------------------------------------------------------
// Versions, status strings, last error
// ------------------------------------------------------------------------------------------------

TEST_F(Abi, VersionsMatchTheHeader) {
  EXPECT_EQ(api.kvp_abi_version() / 10000, static_cast<uint32_t>(KVP_ABI_VERSION_MAJOR));
  EXPECT_EQ(api.kvp_abi_version(), static_cast<uint32_t>(KVP_ABI_VERSION_NUMBER));
  const char* v = api.kvp_version_string();
  ASSERT_NE(v, nullptr);
  EXPECT_GT(std::strlen(v), 0u);
  const std::string want = std::to_string(KVP_ABI_VERSION_MAJOR) + "." + std::to_string(KVP_ABI_VERSION_MINOR);
  EXPECT_EQ(std::string(v).rfind(want, 0), 0u) << v;
}

TEST_F(Abi, StatusStringsNameEveryCode) {
  const std::map<kvp_status, std::string> names = {
      {KVP_OK, "KVP_OK"},
      {KVP_ERR_INVALID_ARGUMENT, "KVP_ERR_INVALID_ARGUMENT"},
      {KVP_ERR_OUT_OF_MEMORY, "KVP_ERR_OUT_OF_MEMORY"},
      {KVP_ERR_NOT_SUPPORTED, "KVP_ERR_NOT_SUPPORTED"},
      {KVP_ERR_OUT_OF_RANGE, "KVP_ERR_OUT_OF_RANGE"},
      {KVP_ERR_INTERNAL, "KVP_ERR_INTERNAL"},
      {KVP_ERR_INVALID_CONFIG, "KVP_ERR_INVALID_CONFIG"},
      {KVP_ERR_NOT_FOUND, "KVP_ERR_NOT_FOUND"},
      {KVP_ERR_ALREADY_EXISTS, "KVP_ERR_ALREADY_EXISTS"},
      {KVP_ERR_NO_FREE_BLOCKS, "KVP_ERR_NO_FREE_BLOCKS"},
      {KVP_ERR_FAILED_PRECONDITION, "KVP_ERR_FAILED_PRECONDITION"},
      {KVP_ERR_DEVICE, "KVP_ERR_DEVICE"},
  };
  EXPECT_EQ(names.size(), 12u);
  for (const auto& [code, name] : names) EXPECT_EQ(Name(code), name);
  // Pinned values.
  EXPECT_EQ(static_cast<int>(KVP_ERR_INVALID_CONFIG), 6);
  EXPECT_EQ(static_cast<int>(KVP_ERR_DEVICE), 11);
  for (int unknown : {-1, 12, 99, 1 << 30}) {
    const char* s = api.kvp_status_string(static_cast<kvp_status>(unknown));
    ASSERT_NE(s, nullptr);
    EXPECT_STREQ(s, "KVP_UNKNOWN_STATUS") << unknown;
  }
}

TEST_F(Abi, LastErrorIsEmptyInAFreshThreadAndNamesTheCallAfterAFailure) {
  std::string initial = "unset", after_success = "unset", after_failure;
  kvp_status failed = KVP_OK;
  std::thread([&] {
    initial = api.kvp_last_error();
    int32_t count = 0;
    (void)api.kvp_backend_count(&count);
    after_success = api.kvp_last_error();  // a success does not invent a message
    failed = api.kvp_backend_name(12345, nullptr);
    after_failure = api.kvp_last_error();
  }).join();
  EXPECT_EQ(initial, "");
  EXPECT_EQ(after_success, "");
  EXPECT_EQ(failed, KVP_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(after_failure.rfind("kvp_backend_name:", 0), 0u) << after_failure;
  EXPECT_NE(after_failure.find("out_name"), std::string::npos) << after_failure;

  // A later failure replaces the message and names its own entry point and values.
  auto ctx = MakeContext();
  auto cache = MakeCache(ctx.get(), CacheOptions(1, 4, 4, 2, 32));
  ASSERT_TRUE(cache);
  std::vector<float> k(2 * 64, 0.5f), v(2 * 64, 0.25f);
  std::vector<int64_t> slots = {3, 4242};
  Tensor kt(k.data(), kF32, {2, 2, 32}), vt(v.data(), kF32, {2, 2, 32}), st(slots.data(), kI64, {2});
  EXPECT_KVP(api.kvp_kv_cache_write(cache.get(), 0, kt.p(), vt.p(), st.p()), KVP_ERR_OUT_OF_RANGE,
             "kvp_kv_cache_write", "4242", "slot_mapping[1]");
  const char* e1 = api.kvp_last_error();
  ASSERT_NE(e1, nullptr);
  EXPECT_NE(std::string(e1).find("4242"), std::string::npos);
}

TEST_F(Abi, LastErrorIsThreadLocal) {
  const char* name = nullptr;
  ASSERT_EQ(api.kvp_backend_name(-777, &name), KVP_ERR_OUT_OF_RANGE);
  const std::string mine = api.kvp_last_error();
  ASSERT_NE(mine.find("-777"), std::string::npos) << mine;

  std::string other;
  std::thread([&] {
    EXPECT_EQ(std::string(api.kvp_last_error()), "");
    EXPECT_EQ(api.kvp_block_manager_free(nullptr, 5), KVP_ERR_INVALID_ARGUMENT);
    other = api.kvp_last_error();
  }).join();
  EXPECT_EQ(other.rfind("kvp_block_manager_free:", 0), 0u) << other;
  EXPECT_EQ(std::string(api.kvp_last_error()), mine);

  // Many threads failing at once each see only their own message.
  std::vector<std::thread> threads;
  std::vector<int> mismatches(4, 0);
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([t, &mismatches] {
      const std::string want = "index=" + std::to_string(-1000 - t) + " ";
      for (int i = 0; i < 2000; ++i) {
        const char* n = nullptr;
        if (api.kvp_backend_name(-1000 - t, &n) != KVP_ERR_OUT_OF_RANGE) ++mismatches[t];
        if (std::string(api.kvp_last_error()).find(want) == std::string::npos) ++mismatches[t];
      }
    });
  for (auto& th : threads) th.join();
  for (int t = 0; t < 4; ++t) EXPECT_EQ(mismatches[t], 0) << "thread " << t;
  EXPECT_EQ(std::string(api.kvp_last_error()), mine);
}

TEST_F(Abi, DestroyNullIsANoOp) {
  SetMarker();
  api.kvp_context_destroy(nullptr);
  api.kvp_block_manager_destroy(nullptr);
  api.kvp_kv_cache_destroy(nullptr);
  api.kvp_plan_destroy(nullptr);
  api.kvp_attention_destroy(nullptr);
  EXPECT_NE(std::string(api.kvp_last_error()).find(kMarker), std::string::npos);
  // The library still works afterwards.
  int32_t count = 0;
  EXPECT_KVP(api.kvp_backend_count(&count), KVP_OK);
  EXPECT_GE(count, 1);
}

// ------------------------------------------------------------------------------------------------
// Capabilities
// ------------------------------------------------------------------------------------------------

TEST_F(Abi, BackendRegistry) {
  int32_t count = -1;
  EXPECT_KVP(api.kvp_backend_count(nullptr), KVP_ERR_INVALID_ARGUMENT, "out_count");
  EXPECT_KVP(api.kvp_backend_count(&count), KVP_OK);
  ASSERT_GE(count, 1);
  bool has_dense = false;
  for (int32_t i = 0; i < count; ++i) {
    const char* name = nullptr;
    EXPECT_KVP(api.kvp_backend_name(i, &name), KVP_OK);
    ASSERT_NE(name, nullptr);
    has_dense |= std::string(name) == "dense";
  }
  EXPECT_TRUE(has_dense);
  const char* untouched = "sentinel";
  const char* name = untouched;
  EXPECT_KVP(api.kvp_backend_name(count, &name), KVP_ERR_OUT_OF_RANGE, "index=" + std::to_string(count));
  EXPECT_KVP(api.kvp_backend_name(-1, &name), KVP_ERR_OUT_OF_RANGE, "index=-1");
  EXPECT_EQ(name, untouched);
  EXPECT_KVP(api.kvp_backend_name(0, nullptr), KVP_ERR_INVALID_ARGUMENT, "out_name");

  kvp_backend_info info{};
  info.struct_size = sizeof info;
  EXPECT_KVP(api.kvp_backend_info_get("dense", &info), KVP_OK);
  EXPECT_STREQ(info.name, "dense");
  EXPECT_TRUE(info.dtype_mask & (1u << KVP_DTYPE_FLOAT32));
  EXPECT_TRUE(info.dtype_mask & (1u << KVP_DTYPE_BFLOAT16));
  EXPECT_TRUE(info.device_mask & (1u << kDLCPU));
  EXPECT_EQ(info.supports_lse, 1);
  EXPECT_EQ(info.needs_state_slots, 0);
  ASSERT_GT(info.num_head_sizes, 0);
  ASSERT_NE(info.head_sizes, nullptr);
  EXPECT_NE(std::find(info.head_sizes, info.head_sizes + info.num_head_sizes, 32),
            info.head_sizes + info.num_head_sizes);
  EXPECT_EQ(std::find(info.head_sizes, info.head_sizes + info.num_head_sizes, 48),
            info.head_sizes + info.num_head_sizes);

  EXPECT_KVP(api.kvp_backend_info_get("no_such_backend", &info), KVP_ERR_NOT_FOUND, "no_such_backend");
  EXPECT_KVP(api.kvp_backend_info_get(nullptr, &info), KVP_ERR_INVALID_ARGUMENT, "name");
  EXPECT_KVP(api.kvp_backend_info_get("dense", nullptr), KVP_ERR_INVALID_ARGUMENT, "out_info");

  // Output struct sizes: 0 and too small rejected, too large not supported, older filled partially.
  kvp_backend_info bad{};
  bad.struct_size = 0;
  EXPECT_KVP(api.kvp_backend_info_get("dense", &bad), KVP_ERR_INVALID_ARGUMENT, "struct_size=0");
  bad.struct_size = 4;
  EXPECT_KVP(api.kvp_backend_info_get("dense", &bad), KVP_ERR_INVALID_ARGUMENT, "struct_size=4");
  bad.struct_size = sizeof(kvp_backend_info) + 8;
  EXPECT_KVP(api.kvp_backend_info_get("dense", &bad), KVP_ERR_NOT_SUPPORTED,
             "struct_size=" + std::to_string(sizeof(kvp_backend_info) + 8));
  EXPECT_EQ(bad.name, nullptr);  // untouched on failure
  kvp_backend_info old{};
  old.struct_size = offsetof(kvp_backend_info, num_head_sizes);
  old.num_head_sizes = -5;
  old.supports_lse = -5;
  EXPECT_KVP(api.kvp_backend_info_get("dense", &old), KVP_OK);
  EXPECT_STREQ(old.name, "dense");
  EXPECT_EQ(old.struct_size, offsetof(kvp_backend_info, num_head_sizes));
  EXPECT_EQ(old.num_head_sizes, -5);  // past the caller's struct: not written
  EXPECT_EQ(old.supports_lse, -5);
}

// ------------------------------------------------------------------------------------------------
// Context
// ------------------------------------------------------------------------------------------------

TEST_F(Abi, ContextOptions) {
  kvp_context* const sentinel = reinterpret_cast<kvp_context*>(0x1234);
  kvp_context* ctx = sentinel;
  EXPECT_KVP(api.kvp_context_create(nullptr, nullptr), KVP_ERR_INVALID_ARGUMENT, "out_context");
  EXPECT_KVP(api.kvp_context_create(nullptr, &ctx), KVP_OK);  // NULL options: CPU defaults
  ASSERT_NE(ctx, sentinel);
  api.kvp_context_destroy(ctx);

  kvp_context_options o{};
  o.struct_size = 0;
  ctx = sentinel;
  EXPECT_KVP(api.kvp_context_create(&o, &ctx), KVP_ERR_INVALID_ARGUMENT, "struct_size=0");
  o.struct_size = 4;
  EXPECT_KVP(api.kvp_context_create(&o, &ctx), KVP_ERR_INVALID_ARGUMENT, "struct_size=4");
  o.struct_size = sizeof(kvp_context_options) + 16;
  EXPECT_KVP(api.kvp_context_create(&o, &ctx), KVP_ERR_NOT_SUPPORTED,
             "struct_size=" + std::to_string(sizeof(kvp_context_options) + 16));
  EXPECT_EQ(ctx, sentinel);

  // An older, shorter struct (before `stream`): accepted; the missing field takes its default.
  struct {
    kvp_context_options o;
    char tail[64];
  } older{};
  std::memset(&older, 0xAB, sizeof older);
  older.o.struct_size = offsetof(kvp_context_options, stream);
  older.o.device_type = kDLCPU;
  older.o.device_id = 0;
  older.o.num_threads = 1;
  EXPECT_KVP(api.kvp_context_create(&older.o, &ctx), KVP_OK);
  ASSERT_NE(ctx, sentinel);
  EXPECT_KVP(api.kvp_context_set_stream(ctx, nullptr), KVP_OK);
  api.kvp_context_destroy(ctx);

  // Bad values.
  o = kvp_context_options{};
  o.struct_size = sizeof o;
  o.device_type = kDLVulkan;
  ctx = sentinel;
  EXPECT_KVP(api.kvp_context_create(&o, &ctx), KVP_ERR_NOT_SUPPORTED, "device_type=7");
  o.device_type = 99;
  EXPECT_KVP(api.kvp_context_create(&o, &ctx), KVP_ERR_NOT_SUPPORTED, "device_type=99");
  o.device_type = kDLCPU;
  o.device_id = 3;
  EXPECT_KVP(api.kvp_context_create(&o, &ctx), KVP_ERR_INVALID_ARGUMENT, "device_id=3");
  o.device_id = 0;
  o.num_threads = -1;
  EXPECT_KVP(api.kvp_context_create(&o, &ctx), KVP_ERR_INVALID_ARGUMENT, "num_threads=-1");
  EXPECT_EQ(ctx, sentinel);
  if (std::string(api.kvp_version_string()).find("(cpu)") != std::string::npos) {
    o.num_threads = 0;
    o.device_type = kDLCUDA;
    EXPECT_KVP(api.kvp_context_create(&o, &ctx), KVP_ERR_NOT_SUPPORTED, "CUDA");
    EXPECT_EQ(ctx, sentinel);
  }
  EXPECT_KVP(api.kvp_context_set_stream(nullptr, nullptr), KVP_ERR_INVALID_ARGUMENT, "context");
}

// ------------------------------------------------------------------------------------------------
// Block manager
// ------------------------------------------------------------------------------------------------

TEST_F(Abi, BlockManagerCreateRejectsBadOptions) {
  kvp_block_manager* const sentinel = reinterpret_cast<kvp_block_manager*>(0x99);
  kvp_block_manager* m = sentinel;
  auto o = BmOptions(4, 8, 2, 1);
  EXPECT_KVP(api.kvp_block_manager_create(&o, nullptr), KVP_ERR_INVALID_ARGUMENT, "out_manager");
  EXPECT_KVP(api.kvp_block_manager_create(nullptr, &m), KVP_ERR_INVALID_ARGUMENT, "options is NULL");
  o.struct_size = 0;
  EXPECT_KVP(api.kvp_block_manager_create(&o, &m), KVP_ERR_INVALID_ARGUMENT, "struct_size=0");
  o.struct_size = 7;
  EXPECT_KVP(api.kvp_block_manager_create(&o, &m), KVP_ERR_INVALID_ARGUMENT, "struct_size=7");
  o.struct_size = sizeof(o) + 8;
  EXPECT_KVP(api.kvp_block_manager_create(&o, &m), KVP_ERR_NOT_SUPPORTED, "struct_size=");
  o = BmOptions(0, 8, 2, 1);
  EXPECT_KVP(api.kvp_block_manager_create(&o, &m), KVP_ERR_INVALID_ARGUMENT, "block_size=0");
  o = BmOptions(70000, 8, 2, 1);
  EXPECT_KVP(api.kvp_block_manager_create(&o, &m), KVP_ERR_INVALID_ARGUMENT, "block_size=70000");
  o = BmOptions(4, 0, 2, 1);
  EXPECT_KVP(api.kvp_block_manager_create(&o, &m), KVP_ERR_INVALID_ARGUMENT, "num_device_blocks=0");
  o = BmOptions(4, 8, -1, 1);
  EXPECT_KVP(api.kvp_block_manager_create(&o, &m), KVP_ERR_INVALID_ARGUMENT, "num_host_blocks=-1");
  o = BmOptions(4, 8, 2, 2);
  EXPECT_KVP(api.kvp_block_manager_create(&o, &m), KVP_ERR_INVALID_ARGUMENT, "enable_prefix_caching=2");
  o = BmOptions(4, 8, 2, 1);
  o.watermark = 1.0;
  EXPECT_KVP(api.kvp_block_manager_create(&o, &m), KVP_ERR_INVALID_ARGUMENT, "watermark=1");
  o.watermark = std::nan("");
  EXPECT_KVP(api.kvp_block_manager_create(&o, &m), KVP_ERR_INVALID_ARGUMENT, "watermark");
  o = BmOptions(4, 8, 2, 1, -2);
  EXPECT_KVP(api.kvp_block_manager_create(&o, &m), KVP_ERR_INVALID_ARGUMENT, "num_state_slots=-2");
  EXPECT_EQ(m, sentinel);

  // An older struct without the trailing num_state_slots and hash_seed: defaults (no state slots).
  struct {
    kvp_block_manager_options o;
    char tail[32];
  } older{};
  std::memset(&older, 0xCD, sizeof older);
  older.o = BmOptions(4, 8, 2, 0);
  older.o.struct_size = offsetof(kvp_block_manager_options, num_state_slots);
  older.o.num_state_slots = -9;  // past struct_size: must be ignored
  EXPECT_KVP(api.kvp_block_manager_create(&older.o, &m), KVP_OK);
  ASSERT_NE(m, sentinel);
  Handle<kvp_block_manager> owned(m);
  EXPECT_KVP(api.kvp_block_manager_allocate(m, 1, nullptr, 5, 0, nullptr), KVP_OK);
  int32_t slot = 123;
  EXPECT_KVP(api.kvp_block_manager_state_slot(m, 1, &slot), KVP_OK);
  EXPECT_EQ(slot, -1);
}

TEST_F(Abi, BlockManagerNullArguments) {
  auto m = MakeManager(BmOptions(4, 8, 4, 0));
  ASSERT_TRUE(m);
  ASSERT_OK(api.kvp_block_manager_allocate(m.get(), 1, nullptr, 5, 0, nullptr));
  int32_t i32 = 0;
  int64_t i64 = 0;
  int32_t table[8];
  uint64_t ids[1] = {1};
  kvp_block_copy copy{};
  kvp_alloc_verdict verdict{};
  kvp_block_manager_stats stats{};
  stats.struct_size = sizeof stats;
  const int32_t tokens[4] = {1, 2, 3, 4};

  EXPECT_KVP(api.kvp_block_manager_can_allocate(nullptr, tokens, 4, 0, &verdict), KVP_ERR_INVALID_ARGUMENT, "manager");
  EXPECT_KVP(api.kvp_block_manager_can_allocate(m.get(), tokens, 4, 0, nullptr), KVP_ERR_INVALID_ARGUMENT, "out_verdict");
  EXPECT_KVP(api.kvp_block_manager_allocate(nullptr, 2, tokens, 4, 0, &i64), KVP_ERR_INVALID_ARGUMENT, "manager");
  EXPECT_KVP(api.kvp_block_manager_can_append(nullptr, 1, 1, &i32), KVP_ERR_INVALID_ARGUMENT, "manager");
  EXPECT_KVP(api.kvp_block_manager_can_append(m.get(), 1, 1, nullptr), KVP_ERR_INVALID_ARGUMENT, "out_can_append");
  EXPECT_KVP(api.kvp_block_manager_append(nullptr, 1, tokens, 1, &copy, &i32), KVP_ERR_INVALID_ARGUMENT, "manager");
  EXPECT_KVP(api.kvp_block_manager_append(m.get(), 1, tokens, 1, nullptr, &i32), KVP_ERR_INVALID_ARGUMENT, "out_copy");
  EXPECT_KVP(api.kvp_block_manager_append(m.get(), 1, tokens, 1, &copy, nullptr), KVP_ERR_INVALID_ARGUMENT, "out_copy_needed");
  EXPECT_KVP(api.kvp_block_manager_mark_computed(nullptr, 1, 1), KVP_ERR_INVALID_ARGUMENT, "manager");
  EXPECT_KVP(api.kvp_block_manager_fork(nullptr, 1, 2), KVP_ERR_INVALID_ARGUMENT, "manager");
  EXPECT_KVP(api.kvp_block_manager_free(nullptr, 1), KVP_ERR_INVALID_ARGUMENT, "manager");
  EXPECT_KVP(api.kvp_block_manager_num_tokens(nullptr, 1, &i64), KVP_ERR_INVALID_ARGUMENT, "manager");
  EXPECT_KVP(api.kvp_block_manager_num_tokens(m.get(), 1, nullptr), KVP_ERR_INVALID_ARGUMENT, "out_num_tokens");
  EXPECT_KVP(api.kvp_block_manager_block_table(nullptr, 1, table, 8, &i32), KVP_ERR_INVALID_ARGUMENT, "manager");
  EXPECT_KVP(api.kvp_block_manager_block_table(m.get(), 1, table, 8, nullptr), KVP_ERR_INVALID_ARGUMENT, "out_num_blocks");
  EXPECT_KVP(api.kvp_block_manager_block_table(m.get(), 1, nullptr, 8, &i32), KVP_ERR_INVALID_ARGUMENT, "out_blocks is NULL with capacity=8");
  EXPECT_KVP(api.kvp_block_manager_block_table(m.get(), 1, table, -1, &i32), KVP_ERR_INVALID_ARGUMENT, "capacity=-1");
  EXPECT_KVP(api.kvp_block_manager_block_tables(nullptr, ids, 1, table, 8, nullptr), KVP_ERR_INVALID_ARGUMENT, "manager");
  EXPECT_KVP(api.kvp_block_manager_block_tables(m.get(), nullptr, 1, table, 8, nullptr), KVP_ERR_INVALID_ARGUMENT, "seq_ids");
  EXPECT_KVP(api.kvp_block_manager_block_tables(m.get(), ids, 1, nullptr, 8, nullptr), KVP_ERR_INVALID_ARGUMENT, "out_table");
  EXPECT_KVP(api.kvp_block_manager_block_tables(m.get(), ids, 1, table, 0, nullptr), KVP_ERR_INVALID_ARGUMENT, "max_blocks_per_seq=0");
  EXPECT_KVP(api.kvp_block_manager_block_tables(m.get(), ids, -1, table, 8, nullptr), KVP_ERR_INVALID_ARGUMENT, "num_seqs=-1");
  EXPECT_KVP(api.kvp_block_manager_slot_mapping(nullptr, 1, 0, 1, &i64), KVP_ERR_INVALID_ARGUMENT, "manager");
  EXPECT_KVP(api.kvp_block_manager_slot_mapping(m.get(), 1, 0, 2, nullptr), KVP_ERR_INVALID_ARGUMENT, "out_slots is NULL with count=2");
  EXPECT_KVP(api.kvp_block_manager_slot_mapping(m.get(), 1, 0, -1, &i64), KVP_ERR_INVALID_ARGUMENT, "count=-1");
  EXPECT_KVP(api.kvp_block_manager_state_slot(nullptr, 1, &i32), KVP_ERR_INVALID_ARGUMENT, "manager");
  EXPECT_KVP(api.kvp_block_manager_state_slot(m.get(), 1, nullptr), KVP_ERR_INVALID_ARGUMENT, "out_slot");
  EXPECT_KVP(api.kvp_block_manager_swap_out(nullptr, 1, &copy, 1, &i32), KVP_ERR_INVALID_ARGUMENT, "manager");
  EXPECT_KVP(api.kvp_block_manager_swap_out(m.get(), 1, &copy, 1, nullptr), KVP_ERR_INVALID_ARGUMENT, "out_num_copies");
  EXPECT_KVP(api.kvp_block_manager_swap_out(m.get(), 1, nullptr, 4, &i32), KVP_ERR_INVALID_ARGUMENT, "out_plan is NULL with capacity=4");
  EXPECT_KVP(api.kvp_block_manager_swap_in(nullptr, 1, &copy, 1, &i32), KVP_ERR_INVALID_ARGUMENT, "manager");
  EXPECT_KVP(api.kvp_block_manager_swap_in(m.get(), 1, &copy, 1, nullptr), KVP_ERR_INVALID_ARGUMENT, "out_num_copies");
  EXPECT_KVP(api.kvp_block_manager_is_swapped(nullptr, 1, &i32), KVP_ERR_INVALID_ARGUMENT, "manager");
  EXPECT_KVP(api.kvp_block_manager_is_swapped(m.get(), 1, nullptr), KVP_ERR_INVALID_ARGUMENT, "out_is_swapped");
  EXPECT_KVP(api.kvp_block_manager_stats_get(nullptr, &stats), KVP_ERR_INVALID_ARGUMENT, "manager");
  EXPECT_KVP(api.kvp_block_manager_stats_get(m.get(), nullptr), KVP_ERR_INVALID_ARGUMENT, "out_stats");
  stats.struct_size = 0;
  EXPECT_KVP(api.kvp_block_manager_stats_get(m.get(), &stats), KVP_ERR_INVALID_ARGUMENT, "struct_size=0");
  stats.struct_size = sizeof(stats) + 8;
  EXPECT_KVP(api.kvp_block_manager_stats_get(m.get(), &stats), KVP_ERR_NOT_SUPPORTED, "struct_size=");
  EXPECT_EQ(stats.num_device_blocks, 0);  // untouched on failure

  // An older stats struct gets only its own fields.
  kvp_block_manager_stats old{};
  old.struct_size = offsetof(kvp_block_manager_stats, prefix_queried_blocks);
  old.prefix_queried_blocks = -3;
  old.num_evictions = -3;
  EXPECT_KVP(api.kvp_block_manager_stats_get(m.get(), &old), KVP_OK);
  EXPECT_EQ(old.num_device_blocks, 8);
  EXPECT_EQ(old.num_sequences, 1);
  EXPECT_EQ(old.prefix_queried_blocks, -3);
  EXPECT_EQ(old.num_evictions, -3);

  // Bad counts.
  EXPECT_KVP(api.kvp_block_manager_allocate(m.get(), 2, nullptr, 0, 0, &i64), KVP_ERR_INVALID_ARGUMENT, "num_tokens=0");
  EXPECT_KVP(api.kvp_block_manager_can_append(m.get(), 1, 0, &i32), KVP_ERR_INVALID_ARGUMENT, "num_tokens=0");
  EXPECT_KVP(api.kvp_block_manager_append(m.get(), 1, nullptr, 0, &copy, &i32), KVP_ERR_INVALID_ARGUMENT, "num_tokens=0");
}

TEST_F(Abi, BlockManagerUnknownAndDuplicateSequences) {
  auto m = MakeManager(BmOptions(4, 8, 4, 1));
  ASSERT_TRUE(m);
  const int32_t tokens[6] = {1, 2, 3, 4, 5, 6};
  int64_t cached = -1;
  ASSERT_OK(api.kvp_block_manager_allocate(m.get(), 10, tokens, 6, 0, &cached));
  EXPECT_EQ(cached, 0);
  int32_t i32 = -5;
  int64_t i64 = -5;
  int32_t table[4] = {-5, -5, -5, -5};
  kvp_block_copy copy{-5, -5};
  uint64_t ids[2] = {10, 77};

  EXPECT_KVP(api.kvp_block_manager_free(m.get(), 77), KVP_ERR_NOT_FOUND, "77");
  EXPECT_KVP(api.kvp_block_manager_num_tokens(m.get(), 77, &i64), KVP_ERR_NOT_FOUND, "77");
  EXPECT_KVP(api.kvp_block_manager_block_table(m.get(), 77, table, 4, &i32), KVP_ERR_NOT_FOUND, "77");
  EXPECT_KVP(api.kvp_block_manager_block_tables(m.get(), ids, 2, table, 2, nullptr), KVP_ERR_NOT_FOUND, "77");
  EXPECT_KVP(api.kvp_block_manager_fork(m.get(), 77, 78), KVP_ERR_NOT_FOUND, "77");
  EXPECT_KVP(api.kvp_block_manager_append(m.get(), 77, tokens, 1, &copy, &i32), KVP_ERR_NOT_FOUND, "77");
  EXPECT_KVP(api.kvp_block_manager_can_append(m.get(), 77, 1, &i32), KVP_ERR_NOT_FOUND, "77");
  EXPECT_KVP(api.kvp_block_manager_mark_computed(m.get(), 77, 1), KVP_ERR_NOT_FOUND, "77");
  EXPECT_KVP(api.kvp_block_manager_slot_mapping(m.get(), 77, 0, 1, &i64), KVP_ERR_NOT_FOUND, "77");
  EXPECT_KVP(api.kvp_block_manager_state_slot(m.get(), 77, &i32), KVP_ERR_NOT_FOUND, "77");
  EXPECT_KVP(api.kvp_block_manager_is_swapped(m.get(), 77, &i32), KVP_ERR_NOT_FOUND, "77");
  EXPECT_KVP(api.kvp_block_manager_swap_out(m.get(), 77, &copy, 1, &i32), KVP_ERR_NOT_FOUND, "77");
  EXPECT_KVP(api.kvp_block_manager_swap_in(m.get(), 77, &copy, 1, &i32), KVP_ERR_NOT_FOUND, "77");
  // Failed calls left every output alone.
  EXPECT_EQ(i32, -5);
  EXPECT_EQ(i64, -5);
  EXPECT_EQ(table[0], -5);
  EXPECT_EQ(copy.src, -5);

  EXPECT_KVP(api.kvp_block_manager_allocate(m.get(), 10, tokens, 6, 0, &cached), KVP_ERR_ALREADY_EXISTS, "10");
  EXPECT_KVP(api.kvp_block_manager_fork(m.get(), 10, 10), KVP_ERR_ALREADY_EXISTS, "10");
  ASSERT_OK(api.kvp_block_manager_allocate(m.get(), 11, tokens, 2, 0, nullptr));
  EXPECT_KVP(api.kvp_block_manager_fork(m.get(), 10, 11), KVP_ERR_ALREADY_EXISTS, "11");
  // Prefix caching needs the token ids.
  EXPECT_KVP(api.kvp_block_manager_allocate(m.get(), 12, nullptr, 4, 0, nullptr), KVP_ERR_INVALID_ARGUMENT,
             "token_ids is NULL");
  EXPECT_KVP(api.kvp_block_manager_append(m.get(), 10, nullptr, 1, &copy, &i32), KVP_ERR_INVALID_ARGUMENT,
             "token_ids is NULL");
  // Positions and computed counts past the sequence.
  EXPECT_KVP(api.kvp_block_manager_mark_computed(m.get(), 10, 7), KVP_ERR_OUT_OF_RANGE, "num_computed_tokens=7");
  EXPECT_KVP(api.kvp_block_manager_slot_mapping(m.get(), 10, 4, 3, &i64), KVP_ERR_OUT_OF_RANGE, "start=4");
  EXPECT_KVP(api.kvp_block_manager_slot_mapping(m.get(), 10, -1, 1, &i64), KVP_ERR_OUT_OF_RANGE, "start=-1");
  int64_t n = 0;
  EXPECT_KVP(api.kvp_block_manager_num_tokens(m.get(), 10, &n), KVP_OK);
  EXPECT_EQ(n, 6);
  EXPECT_KVP(api.kvp_block_manager_free(m.get(), 10), KVP_OK);
  EXPECT_KVP(api.kvp_block_manager_free(m.get(), 10), KVP_ERR_NOT_FOUND, "10");
}

TEST_F(Abi, BlockManagerExhaustionChangesNothing) {
  auto m = MakeManager(BmOptions(4, 4, 0, 0));
  ASSERT_TRUE(m);
  ASSERT_OK(api.kvp_block_manager_allocate(m.get(), 1, nullptr, 12, 0, nullptr));  // 3 of 4 blocks
  kvp_block_manager_stats before{}, after{};
  before.struct_size = after.struct_size = sizeof before;
  ASSERT_OK(api.kvp_block_manager_stats_get(m.get(), &before));
  EXPECT_EQ(before.num_used_blocks, 3);
  EXPECT_EQ(before.num_free_blocks, 1);
  const auto table_before = BlockTable(m.get(), 1);

  int64_t cached = -9;
  EXPECT_KVP(api.kvp_block_manager_allocate(m.get(), 2, nullptr, 8, 0, &cached), KVP_ERR_NO_FREE_BLOCKS, "seq 2");
  EXPECT_EQ(cached, -9);
  kvp_block_copy copy{-9, -9};
  int32_t needed = -9;
  EXPECT_KVP(api.kvp_block_manager_append(m.get(), 1, nullptr, 5, &copy, &needed), KVP_ERR_NO_FREE_BLOCKS, "seq 1");
  EXPECT_EQ(needed, -9);
  ASSERT_OK(api.kvp_block_manager_stats_get(m.get(), &after));
  EXPECT_EQ(std::memcmp(&before, &after, sizeof before), 0);
  int64_t n = 0;
  ASSERT_OK(api.kvp_block_manager_num_tokens(m.get(), 1, &n));
  EXPECT_EQ(n, 12);
  EXPECT_EQ(BlockTable(m.get(), 1), table_before);

  int32_t can = -1;
  EXPECT_KVP(api.kvp_block_manager_can_append(m.get(), 1, 5, &can), KVP_OK);
  EXPECT_EQ(can, 0);
  EXPECT_KVP(api.kvp_block_manager_can_append(m.get(), 1, 4, &can), KVP_OK);
  EXPECT_EQ(can, 1);
  kvp_alloc_verdict v{};
  EXPECT_KVP(api.kvp_block_manager_can_allocate(m.get(), nullptr, 8, 0, &v), KVP_OK);
  EXPECT_EQ(v, KVP_ALLOC_LATER);
  EXPECT_KVP(api.kvp_block_manager_can_allocate(m.get(), nullptr, 100, 0, &v), KVP_OK);
  EXPECT_EQ(v, KVP_ALLOC_NEVER);
  EXPECT_KVP(api.kvp_block_manager_can_allocate(m.get(), nullptr, 4, 0, &v), KVP_OK);
  EXPECT_EQ(v, KVP_ALLOC_OK);

  // State slots run out as blocks do.
  auto ms = MakeManager(BmOptions(4, 16, 0, 0, 1));
  ASSERT_TRUE(ms);
  ASSERT_OK(api.kvp_block_manager_allocate(ms.get(), 1, nullptr, 4, 0, nullptr));
  int32_t slot = -9;
  ASSERT_OK(api.kvp_block_manager_state_slot(ms.get(), 1, &slot));
  EXPECT_EQ(slot, 0);
  EXPECT_KVP(api.kvp_block_manager_allocate(ms.get(), 2, nullptr, 4, 0, nullptr), KVP_ERR_NO_FREE_BLOCKS, "state slot");
  EXPECT_KVP(api.kvp_block_manager_fork(ms.get(), 1, 3), KVP_ERR_NO_FREE_BLOCKS, "state slot");
}

TEST_F(Abi, BlockManagerTableCapacities) {
  auto m = MakeManager(BmOptions(4, 16, 8, 0));
  ASSERT_TRUE(m);
  ASSERT_OK(api.kvp_block_manager_allocate(m.get(), 1, nullptr, 10, 0, nullptr));  // 3 blocks
  int32_t table[4] = {-5, -5, -5, -5};
  int32_t n = -1;
  EXPECT_KVP(api.kvp_block_manager_block_table(m.get(), 1, table, 2, &n), KVP_ERR_OUT_OF_RANGE, "capacity=2");
  EXPECT_EQ(n, 3);  // the needed length
  EXPECT_EQ(table[0], -5);
  EXPECT_KVP(api.kvp_block_manager_block_table(m.get(), 1, nullptr, 0, &n), KVP_ERR_OUT_OF_RANGE, "capacity=0");
  EXPECT_EQ(n, 3);
  EXPECT_KVP(api.kvp_block_manager_block_table(m.get(), 1, table, 3, &n), KVP_OK);
  EXPECT_EQ(n, 3);

  uint64_t ids[1] = {1};
  int32_t dense[2] = {-5, -5};
  int32_t lens[1] = {-5};
  EXPECT_KVP(api.kvp_block_manager_block_tables(m.get(), ids, 1, dense, 2, lens), KVP_ERR_OUT_OF_RANGE,
             "max_blocks_per_seq=2");
  EXPECT_EQ(dense[0], -5);
  EXPECT_EQ(lens[0], -5);

  // Slot mapping follows the block table.
  int64_t slots[10];
  ASSERT_OK(api.kvp_block_manager_slot_mapping(m.get(), 1, 0, 10, slots));
  for (int p = 0; p < 10; ++p) EXPECT_EQ(slots[p], int64_t{table[p / 4]} * 4 + p % 4) << p;

  // Swap plans: too small a capacity reports the needed length and swaps nothing.
  kvp_block_copy plan[4] = {};
  int32_t num = -1;
  EXPECT_KVP(api.kvp_block_manager_swap_out(m.get(), 1, plan, 2, &num), KVP_ERR_OUT_OF_RANGE, "capacity=2");
  EXPECT_EQ(num, 3);
  int32_t swapped = -1;
  ASSERT_OK(api.kvp_block_manager_is_swapped(m.get(), 1, &swapped));
  EXPECT_EQ(swapped, 0);
  EXPECT_KVP(api.kvp_block_manager_swap_in(m.get(), 1, plan, 4, &num), KVP_ERR_FAILED_PRECONDITION, "resident");
  EXPECT_KVP(api.kvp_block_manager_swap_out(m.get(), 1, plan, 4, &num), KVP_OK);
  EXPECT_EQ(num, 3);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(plan[i].src, table[i]);
  ASSERT_OK(api.kvp_block_manager_is_swapped(m.get(), 1, &swapped));
  EXPECT_EQ(swapped, 1);
  num = -1;
  EXPECT_KVP(api.kvp_block_manager_swap_in(m.get(), 1, plan, 1, &num), KVP_ERR_OUT_OF_RANGE, "capacity=1");
  EXPECT_EQ(num, 3);
  ASSERT_OK(api.kvp_block_manager_is_swapped(m.get(), 1, &swapped));
  EXPECT_EQ(swapped, 1);

  // Swapping in needs free device blocks: NO_FREE_BLOCKS leaves it swapped out.
  ASSERT_OK(api.kvp_block_manager_allocate(m.get(), 2, nullptr, 16 * 4, 0, nullptr));  // every device block
  num = -1;
  EXPECT_KVP(api.kvp_block_manager_swap_in(m.get(), 1, plan, 4, &num), KVP_ERR_NO_FREE_BLOCKS, "seq 1", "device");
  EXPECT_EQ(num, -1);
  ASSERT_OK(api.kvp_block_manager_is_swapped(m.get(), 1, &swapped));
  EXPECT_EQ(swapped, 1);
  ASSERT_OK(api.kvp_block_manager_free(m.get(), 2));
  EXPECT_KVP(api.kvp_block_manager_swap_in(m.get(), 1, plan, 4, &num), KVP_OK);
  EXPECT_EQ(num, 3);

  // No host space: NO_FREE_BLOCKS, nothing swapped.
  auto m0 = MakeManager(BmOptions(4, 16, 0, 0));
  ASSERT_TRUE(m0);
  ASSERT_OK(api.kvp_block_manager_allocate(m0.get(), 1, nullptr, 4, 0, nullptr));
  EXPECT_KVP(api.kvp_block_manager_swap_out(m0.get(), 1, plan, 4, &num), KVP_ERR_NO_FREE_BLOCKS, "host");
  ASSERT_OK(api.kvp_block_manager_is_swapped(m0.get(), 1, &swapped));
  EXPECT_EQ(swapped, 0);
}

TEST_F(Abi, SwappedSequenceCannotBeUsed) {
  auto m = MakeManager(BmOptions(4, 16, 8, 1));
  ASSERT_TRUE(m);
  const int32_t tokens[6] = {1, 2, 3, 4, 5, 6};
  ASSERT_OK(api.kvp_block_manager_allocate(m.get(), 1, tokens, 6, 0, nullptr));
  kvp_block_copy plan[4];
  int32_t num = 0;
  ASSERT_OK(api.kvp_block_manager_swap_out(m.get(), 1, plan, 4, &num));
  ASSERT_EQ(num, 2);
  int32_t i32 = -5;
  int64_t i64 = -5;
  int32_t table[4];
  kvp_block_copy copy{};
  uint64_t ids[1] = {1};
  EXPECT_KVP(api.kvp_block_manager_block_table(m.get(), 1, table, 4, &i32), KVP_ERR_FAILED_PRECONDITION, "swapped");
  EXPECT_KVP(api.kvp_block_manager_block_tables(m.get(), ids, 1, table, 4, nullptr), KVP_ERR_FAILED_PRECONDITION, "swapped");
  EXPECT_KVP(api.kvp_block_manager_append(m.get(), 1, tokens, 1, &copy, &i32), KVP_ERR_FAILED_PRECONDITION, "swapped");
  EXPECT_KVP(api.kvp_block_manager_can_append(m.get(), 1, 1, &i32), KVP_ERR_FAILED_PRECONDITION, "swapped");
  EXPECT_KVP(api.kvp_block_manager_mark_computed(m.get(), 1, 4), KVP_ERR_FAILED_PRECONDITION, "swapped");
  EXPECT_KVP(api.kvp_block_manager_slot_mapping(m.get(), 1, 0, 1, &i64), KVP_ERR_FAILED_PRECONDITION, "swapped");
  EXPECT_KVP(api.kvp_block_manager_fork(m.get(), 1, 2), KVP_ERR_FAILED_PRECONDITION, "swapped");
  EXPECT_KVP(api.kvp_block_manager_swap_out(m.get(), 1, plan, 4, &num), KVP_ERR_FAILED_PRECONDITION, "already swapped");
  EXPECT_EQ(i32, -5);
  EXPECT_EQ(i64, -5);
  // Still known: its length and state can be read, and it can be freed.
  EXPECT_KVP(api.kvp_block_manager_num_tokens(m.get(), 1, &i64), KVP_OK);
  EXPECT_EQ(i64, 6);
  kvp_block_manager_stats st{};
  st.struct_size = sizeof st;
  ASSERT_OK(api.kvp_block_manager_stats_get(m.get(), &st));
  EXPECT_EQ(st.num_swapped_sequences, 1);
  EXPECT_EQ(st.num_free_host_blocks, 6);
  EXPECT_KVP(api.kvp_block_manager_free(m.get(), 1), KVP_OK);
  ASSERT_OK(api.kvp_block_manager_stats_get(m.get(), &st));
  EXPECT_EQ(st.num_free_host_blocks, 8);
  EXPECT_EQ(st.num_sequences, 0);
}

// ------------------------------------------------------------------------------------------------
// KV cache
// ------------------------------------------------------------------------------------------------

TEST_F(Abi, KvCacheCreateRejectsBadOptions) {
  auto ctx = MakeContext();
  ASSERT_TRUE(ctx);
  kvp_kv_cache* const sentinel = reinterpret_cast<kvp_kv_cache*>(0x77);
  kvp_kv_cache* c = sentinel;
  auto o = CacheOptions(2, 8, 4, 2, 32);
  EXPECT_KVP(api.kvp_kv_cache_create(nullptr, &o, &c), KVP_ERR_INVALID_ARGUMENT, "context");
  EXPECT_KVP(api.kvp_kv_cache_create(ctx.get(), &o, nullptr), KVP_ERR_INVALID_ARGUMENT, "out_cache");
  EXPECT_KVP(api.kvp_kv_cache_create(ctx.get(), nullptr, &c), KVP_ERR_INVALID_ARGUMENT, "options is NULL");
  o.struct_size = 0;
  EXPECT_KVP(api.kvp_kv_cache_create(ctx.get(), &o, &c), KVP_ERR_INVALID_ARGUMENT, "struct_size=0");
  o.struct_size = 2;
  EXPECT_KVP(api.kvp_kv_cache_create(ctx.get(), &o, &c), KVP_ERR_INVALID_ARGUMENT, "struct_size=2");
  o.struct_size = sizeof(o) + 4;
  EXPECT_KVP(api.kvp_kv_cache_create(ctx.get(), &o, &c), KVP_ERR_NOT_SUPPORTED, "struct_size=");
  o = CacheOptions(2, 8, 4, 2, 32, 7);
  EXPECT_KVP(api.kvp_kv_cache_create(ctx.get(), &o, &c), KVP_ERR_INVALID_ARGUMENT, "dtype=7");
  o = CacheOptions(2, 8, 4, 2, 32, -1);
  EXPECT_KVP(api.kvp_kv_cache_create(ctx.get(), &o, &c), KVP_ERR_INVALID_ARGUMENT, "dtype=-1");
  o = CacheOptions(2, 8, 4, 2, 32, KVP_DTYPE_FP8_E4M3);
  EXPECT_KVP(api.kvp_kv_cache_create(ctx.get(), &o, &c), KVP_ERR_NOT_SUPPORTED, "fp8");
  o = CacheOptions(2, 8, 4, 2, 32, KVP_DTYPE_FLOAT32, 2);
  EXPECT_KVP(api.kvp_kv_cache_create(ctx.get(), &o, &c), KVP_ERR_INVALID_ARGUMENT, "layout=2");
  o = CacheOptions(0, 8, 4, 2, 32);
  EXPECT_KVP(api.kvp_kv_cache_create(ctx.get(), &o, &c), KVP_ERR_INVALID_ARGUMENT, "num_layers=0");
  o = CacheOptions(2, -1, 4, 2, 32);
  EXPECT_KVP(api.kvp_kv_cache_create(ctx.get(), &o, &c), KVP_ERR_INVALID_ARGUMENT, "num_blocks=-1");
  o = CacheOptions(2, 8, 0, 2, 32);
  EXPECT_KVP(api.kvp_kv_cache_create(ctx.get(), &o, &c), KVP_ERR_INVALID_ARGUMENT, "block_size=0");
  o = CacheOptions(2, 8, 4, 0, 32);
  EXPECT_KVP(api.kvp_kv_cache_create(ctx.get(), &o, &c), KVP_ERR_INVALID_ARGUMENT, "num_kv_heads=0");
  o = CacheOptions(2, 8, 4, 2, 0);
  EXPECT_KVP(api.kvp_kv_cache_create(ctx.get(), &o, &c), KVP_ERR_INVALID_ARGUMENT, "head_size=0");
  o = CacheOptions(2, 8, 4, 2, 32);
  o.num_host_blocks = -1;
  EXPECT_KVP(api.kvp_kv_cache_create(ctx.get(), &o, &c), KVP_ERR_INVALID_ARGUMENT, "num_host_blocks=-1");
  o = CacheOptions(2, 8, 4, 2, 32);
  o.state_bytes_per_layer = -1;
  EXPECT_KVP(api.kvp_kv_cache_create(ctx.get(), &o, &c), KVP_ERR_INVALID_ARGUMENT, "state_bytes_per_layer=-1");
  EXPECT_EQ(c, sentinel);

  // An older struct without the host/state fields: defaults (none), whatever lies past it.
  struct {
    kvp_kv_cache_options o;
    char tail[32];
  } older{};
  std::memset(&older, 0xEE, sizeof older);
  older.o = CacheOptions(1, 4, 4, 2, 32);
  older.o.struct_size = offsetof(kvp_kv_cache_options, num_host_blocks);
  older.o.num_host_blocks = -7;
  older.o.num_state_slots = -7;
  older.o.state_bytes_per_layer = -7;
  EXPECT_KVP(api.kvp_kv_cache_create(ctx.get(), &older.o, &c), KVP_OK);
  ASSERT_NE(c, sentinel);
  Handle<kvp_kv_cache> cache(c);
  View host = LayerView(c, 0, 1, KVP_LAYOUT_KV_FIRST);
  EXPECT_EQ(host.t.shape[1], 0);  // no host blocks
  void* data = nullptr;
  int64_t bytes = -1;
  EXPECT_KVP(api.kvp_kv_cache_state(c, 0, 0, &data, &bytes), KVP_ERR_OUT_OF_RANGE, "slot=0");
}

TEST_F(Abi, KvCacheLayerViewDescribesThePages) {
  auto ctx = MakeContext();
  for (int32_t layout : {KVP_LAYOUT_KV_FIRST, KVP_LAYOUT_BLOCK_FIRST}) {
    auto cache = MakeCache(ctx.get(), CacheOptions(2, 6, 4, 2, 32, KVP_DTYPE_BFLOAT16, layout));
    ASSERT_TRUE(cache);
    DLTensor v{};
    EXPECT_KVP(api.kvp_kv_cache_layer_view(cache.get(), 1, 0, &v), KVP_OK);
    EXPECT_EQ(v.ndim, 5);
    EXPECT_EQ(v.device.device_type, kDLCPU);
    EXPECT_EQ(v.dtype.code, kDLBfloat);
    EXPECT_EQ(v.dtype.bits, 16);
    const std::vector<int64_t> want = layout == KVP_LAYOUT_KV_FIRST ? std::vector<int64_t>{2, 6, 4, 2, 32}
                                                                     : std::vector<int64_t>{6, 2, 4, 2, 32};
    EXPECT_EQ(std::vector<int64_t>(v.shape, v.shape + 5), want);
    EXPECT_EQ(v.strides[4], 1);
    EXPECT_NE(v.data, nullptr);
    EXPECT_KVP(api.kvp_kv_cache_layer_view(cache.get(), 0, 1, &v), KVP_OK);
    EXPECT_EQ(v.shape[layout == KVP_LAYOUT_KV_FIRST ? 1 : 0], 4);  // host blocks

    DLTensor untouched{};
    EXPECT_KVP(api.kvp_kv_cache_layer_view(cache.get(), 2, 0, &untouched), KVP_ERR_OUT_OF_RANGE, "layer=2");
    EXPECT_KVP(api.kvp_kv_cache_layer_view(cache.get(), -1, 0, &untouched), KVP_ERR_OUT_OF_RANGE, "layer=-1");
    EXPECT_KVP(api.kvp_kv_cache_layer_view(cache.get(), 0, 2, &untouched), KVP_ERR_INVALID_ARGUMENT, "host=2");
    EXPECT_EQ(untouched.data, nullptr);
    EXPECT_KVP(api.kvp_kv_cache_layer_view(nullptr, 0, 0, &untouched), KVP_ERR_INVALID_ARGUMENT, "cache");
    EXPECT_KVP(api.kvp_kv_cache_layer_view(cache.get(), 0, 0, nullptr), KVP_ERR_INVALID_ARGUMENT, "out_view");
  }
}

// Every way a key/value/slot tensor can be wrong, each with its status and message; none writes.
TEST_F(Abi, KvCacheWriteChecksEveryTensor) {
  constexpr int T = 3, H = 2, D = 32, kBlocks = 4, kBs = 4;
  auto ctx = MakeContext();
  auto cache = MakeCache(ctx.get(), CacheOptions(2, kBlocks, kBs, H, D));
  ASSERT_TRUE(cache);
  std::mt19937 rng(5);
  auto k = Random(2 * T * H * D, rng), v = Random(2 * T * H * D, rng);  // room for strided variants
  std::vector<int64_t> slots = {0, 5, 9};
  Tensor kt(k.data(), kF32, {T, H, D}), vt(v.data(), kF32, {T, H, D}), st(slots.data(), kI64, {T});
  ASSERT_OK(api.kvp_kv_cache_write(cache.get(), 0, kt.p(), vt.p(), st.p()));
  const View view = LayerView(cache.get(), 0, 0, KVP_LAYOUT_KV_FIRST);
  const std::vector<uint8_t> written = view.AllBytes();
  EXPECT_EQ(view.Load(0, 1, 1, 1, 3), k[(1 * H + 1) * D + 3]);  // slot 5 = block 1, position 1
  EXPECT_EQ(view.Load(1, 2, 1, 0, 0), v[(2 * H + 0) * D + 0]);  // slot 9 = block 2, position 1

  // Fresh values for the failing calls, so that any write would show.
  auto k2 = Random(2 * T * H * D, rng), v2 = Random(2 * T * H * D, rng);
  Tensor k2t(k2.data(), kF32, {T, H, D}), v2t(v2.data(), kF32, {T, H, D});
  kvp_kv_cache* c = cache.get();
  auto with = [&](auto edit) {
    DLTensor t = *k2t.p();
    edit(t);
    return t;
  };

  EXPECT_KVP(api.kvp_kv_cache_write(nullptr, 0, k2t.p(), v2t.p(), st.p()), KVP_ERR_INVALID_ARGUMENT, "cache is NULL");
  EXPECT_KVP(api.kvp_kv_cache_write(c, 0, nullptr, v2t.p(), st.p()), KVP_ERR_INVALID_ARGUMENT, "key is NULL");
  EXPECT_KVP(api.kvp_kv_cache_write(c, 0, k2t.p(), nullptr, st.p()), KVP_ERR_INVALID_ARGUMENT, "value is NULL");
  EXPECT_KVP(api.kvp_kv_cache_write(c, 0, k2t.p(), v2t.p(), nullptr), KVP_ERR_INVALID_ARGUMENT, "slot_mapping is NULL");
  DLTensor bad = with([](DLTensor& t) { t.device = DLDevice{kDLCUDA, 0}; });
  EXPECT_KVP(api.kvp_kv_cache_write(c, 0, &bad, v2t.p(), st.p()), KVP_ERR_INVALID_ARGUMENT, "key: device (type=2");
  bad = with([](DLTensor& t) { t.device = DLDevice{kDLVulkan, 0}; });
  EXPECT_KVP(api.kvp_kv_cache_write(c, 0, &bad, v2t.p(), st.p()), KVP_ERR_INVALID_ARGUMENT, "key: device (type=7");
  bad = with([](DLTensor& t) { t.dtype = kI32; });
  EXPECT_KVP(api.kvp_kv_cache_write(c, 0, &bad, v2t.p(), st.p()), KVP_ERR_INVALID_ARGUMENT, "key: dtype (code=0, bits=32");
  bad = with([](DLTensor& t) { t.dtype = kF64; });
  EXPECT_KVP(api.kvp_kv_cache_write(c, 0, &bad, v2t.p(), st.p()), KVP_ERR_INVALID_ARGUMENT, "key: dtype (code=2, bits=64");
  bad = with([](DLTensor& t) { t.dtype = DLDataType{kDLFloat, 32, 2}; });
  EXPECT_KVP(api.kvp_kv_cache_write(c, 0, &bad, v2t.p(), st.p()), KVP_ERR_INVALID_ARGUMENT, "lanes=2");
  bad = with([](DLTensor& t) { t.ndim = 2; });
  EXPECT_KVP(api.kvp_kv_cache_write(c, 0, &bad, v2t.p(), st.p()), KVP_ERR_INVALID_ARGUMENT, "key: ndim=2, expected 3");
  bad = with([](DLTensor& t) { t.ndim = 4; });
  EXPECT_KVP(api.kvp_kv_cache_write(c, 0, &bad, v2t.p(), st.p()), KVP_ERR_INVALID_ARGUMENT, "key: ndim=4");
  bad = with([](DLTensor& t) { t.shape = nullptr; });
  EXPECT_KVP(api.kvp_kv_cache_write(c, 0, &bad, v2t.p(), st.p()), KVP_ERR_INVALID_ARGUMENT, "key: shape is NULL");
  std::vector<int64_t> neg_shape = {T, -2, D};
  bad = with([&](DLTensor& t) { t.shape = neg_shape.data(); });
  EXPECT_KVP(api.kvp_kv_cache_write(c, 0, &bad, v2t.p(), st.p()), KVP_ERR_INVALID_ARGUMENT, "key: shape[1]=-2");
  std::vector<int64_t> neg_strides = {-H * D, D, 1};
  bad = with([&](DLTensor& t) { t.strides = neg_strides.data(); });
  EXPECT_KVP(api.kvp_kv_cache_write(c, 0, &bad, v2t.p(), st.p()), KVP_ERR_INVALID_ARGUMENT,
             "key: strides[0]=" + std::to_string(-H * D) + " is negative");
  std::vector<int64_t> wrong_heads = {T, 1, 2 * D};
  bad = with([&](DLTensor& t) { t.shape = wrong_heads.data(); });
  EXPECT_KVP(api.kvp_kv_cache_write(c, 0, &bad, &bad, st.p()), KVP_ERR_INVALID_ARGUMENT, "key: expected [3, 2, 32]");
  std::vector<int64_t> wrong_dim = {T, H, D / 2};
  bad = with([&](DLTensor& t) { t.shape = wrong_dim.data(); });
  EXPECT_KVP(api.kvp_kv_cache_write(c, 0, &bad, &bad, st.p()), KVP_ERR_INVALID_ARGUMENT, "key: expected [3, 2, 32]");
  EXPECT_KVP(api.kvp_kv_cache_write(c, 0, &bad, v2t.p(), st.p()), KVP_ERR_INVALID_ARGUMENT, "key and value shapes differ");
  // Shapes whose element count overflows int64 are refused as such, not wrapped around.
  std::vector<int64_t> huge = {int64_t{1} << 40, int64_t{1} << 40, int64_t{1} << 40};
  std::vector<int64_t> zero_strides = {0, 0, 1};
  for (int64_t* strides : {static_cast<int64_t*>(nullptr), zero_strides.data()}) {
    bad = with([&](DLTensor& t) {
      t.shape = huge.data();
      t.strides = strides;
      t.data = nullptr;
    });
    EXPECT_KVP(api.kvp_kv_cache_write(c, 0, &bad, &bad, st.p()), KVP_ERR_INVALID_ARGUMENT, "key: ");
  }
  std::vector<int64_t> gappy = {2 * H * D, 2 * D, 2};  // every other element: head axis not contiguous
  bad = with([&](DLTensor& t) { t.strides = gappy.data(); });
  EXPECT_KVP(api.kvp_kv_cache_write(c, 0, &bad, v2t.p(), st.p()), KVP_ERR_INVALID_ARGUMENT, "contiguous");
  bad = with([](DLTensor& t) { t.byte_offset = 1; });
  EXPECT_KVP(api.kvp_kv_cache_write(c, 0, &bad, v2t.p(), st.p()), KVP_ERR_INVALID_ARGUMENT, "not aligned to 4 bytes");
  bad = with([](DLTensor& t) { t.data = nullptr; });
  EXPECT_KVP(api.kvp_kv_cache_write(c, 0, &bad, v2t.p(), st.p()), KVP_ERR_INVALID_ARGUMENT, "key: data is NULL");
  DLTensor bad_v = *v2t.p();
  bad_v.dtype = kI64;
  EXPECT_KVP(api.kvp_kv_cache_write(c, 0, k2t.p(), &bad_v, st.p()), KVP_ERR_INVALID_ARGUMENT, "value: dtype");

  // Slot mappings.
  std::vector<int32_t> slots32 = {0, 1, 2};
  Tensor s32(slots32.data(), kI32, {T});
  EXPECT_KVP(api.kvp_kv_cache_write(c, 0, k2t.p(), v2t.p(), s32.p()), KVP_ERR_INVALID_ARGUMENT, "slot_mapping", "int64");
  std::vector<int64_t> slots4 = {0, 1, 2, 3};
  Tensor s4(slots4.data(), kI64, {T + 1});
  EXPECT_KVP(api.kvp_kv_cache_write(c, 0, k2t.p(), v2t.p(), s4.p()), KVP_ERR_INVALID_ARGUMENT, "slot_mapping: expected shape [3]");
  Tensor s2d(slots4.data(), kI64, {T, 1});
  EXPECT_KVP(api.kvp_kv_cache_write(c, 0, k2t.p(), v2t.p(), s2d.p()), KVP_ERR_INVALID_ARGUMENT, "slot_mapping: expected shape [3], got ndim=2");
  DLTensor bad_s = *st.p();
  bad_s.device = DLDevice{kDLCUDA, 0};
  EXPECT_KVP(api.kvp_kv_cache_write(c, 0, k2t.p(), v2t.p(), &bad_s), KVP_ERR_INVALID_ARGUMENT, "slot_mapping: device");
  bad_s = *st.p();
  bad_s.byte_offset = 4;
  EXPECT_KVP(api.kvp_kv_cache_write(c, 0, k2t.p(), v2t.p(), &bad_s), KVP_ERR_INVALID_ARGUMENT, "8-byte aligned");
  bad_s = *st.p();
  bad_s.data = nullptr;
  EXPECT_KVP(api.kvp_kv_cache_write(c, 0, k2t.p(), v2t.p(), &bad_s), KVP_ERR_INVALID_ARGUMENT, "slot_mapping: data is NULL");
  std::vector<int64_t> slot_stride = {2};
  Tensor s_strided(slots4.data(), kI64, {T}, slot_stride);
  // {0, 2, ...} would read past slots4 only with stride 2 and T = 3; rejected before reading.
  EXPECT_KVP(api.kvp_kv_cache_write(c, 0, k2t.p(), v2t.p(), s_strided.p()), KVP_ERR_INVALID_ARGUMENT, "stride 2 must be 1");

  // One bad slot, last in the batch: nothing of the batch is written.
  std::vector<int64_t> one_bad = {1, 6, kBlocks * kBs};
  Tensor sb(one_bad.data(), kI64, {T});
  EXPECT_KVP(api.kvp_kv_cache_write(c, 0, k2t.p(), v2t.p(), sb.p()), KVP_ERR_OUT_OF_RANGE,
             "slot_mapping[2]=" + std::to_string(kBlocks * kBs), "out of range");
  std::vector<int64_t> minus2 = {1, 6, -2};
  Tensor sm2(minus2.data(), kI64, {T});
  EXPECT_KVP(api.kvp_kv_cache_write(c, 0, k2t.p(), v2t.p(), sm2.p()), KVP_ERR_OUT_OF_RANGE, "slot_mapping[2]=-2");
  EXPECT_KVP(api.kvp_kv_cache_write(c, 2, k2t.p(), v2t.p(), st.p()), KVP_ERR_OUT_OF_RANGE, "layer=2");
  EXPECT_KVP(api.kvp_kv_cache_write(c, -1, k2t.p(), v2t.p(), st.p()), KVP_ERR_OUT_OF_RANGE, "layer=-1");
  EXPECT_EQ(view.AllBytes(), written) << "a failed write changed the cache";

  // -1 skips a token; a bfloat16 input is converted.
  std::vector<int64_t> skip = {-1, 2, -1};
  Tensor ss(skip.data(), kI64, {T});
  ASSERT_OK(api.kvp_kv_cache_write(c, 0, k2t.p(), v2t.p(), ss.p()));
  const std::vector<uint8_t> after_skip = view.AllBytes();
  EXPECT_EQ(view.Load(0, 0, 2, 1, 5), k2[(1 * H + 1) * D + 5]);
  EXPECT_EQ(view.Load(0, 0, 0, 0, 0), k[0]);  // slot 0 kept its first value
  std::vector<uint16_t> kb(T * H * D), vb(T * H * D);
  for (size_t i = 0; i < kb.size(); ++i) kb[i] = ToBf16(k2[i]), vb[i] = ToBf16(v2[i]);
  Tensor kbt(kb.data(), kBF16, {T, H, D}), vbt(vb.data(), kBF16, {T, H, D});
  std::vector<int64_t> slot3 = {-1, -1, 3};
  Tensor s3(slot3.data(), kI64, {T});
  ASSERT_OK(api.kvp_kv_cache_write(c, 0, kbt.p(), vbt.p(), s3.p()));
  EXPECT_EQ(view.Load(1, 0, 3, 0, 7), FromBf16(vb[(2 * H + 0) * D + 7]));
  EXPECT_NE(view.AllBytes(), after_skip);
}

TEST_F(Abi, KvCacheCopiesSwapsAndState) {
  constexpr int H = 2, D = 32, kBs = 4;
  auto ctx = MakeContext();
  auto cache = MakeCache(ctx.get(), CacheOptions(2, 4, kBs, H, D));  // 4 host blocks, 2 state slots
  ASSERT_TRUE(cache);
  kvp_kv_cache* c = cache.get();
  std::mt19937 rng(9);
  auto k = Random(kBs * H * D, rng), v = Random(kBs * H * D, rng);
  std::vector<int64_t> slots = {0, 1, 2, 3};  // all of block 0
  Tensor kt(k.data(), kF32, {kBs, H, D}), vt(v.data(), kF32, {kBs, H, D}), st(slots.data(), kI64, {kBs});
  ASSERT_OK(api.kvp_kv_cache_write(c, 1, kt.p(), vt.p(), st.p()));
  const View l1 = LayerView(c, 1, 0, KVP_LAYOUT_KV_FIRST);
  const View h1 = LayerView(c, 1, 1, KVP_LAYOUT_KV_FIRST);
  const auto block0 = l1.BlockBytes(0);
  const auto all_before = l1.AllBytes();
  const auto host_before = h1.AllBytes();

  // A list with one bad copy (last) copies nothing.
  kvp_block_copy copies[2] = {{0, 1}, {9, 0}};
  EXPECT_KVP(api.kvp_kv_cache_copy_blocks(c, copies, 2), KVP_ERR_OUT_OF_RANGE, "(9 -> 0)");
  copies[1] = {0, -1};
  EXPECT_KVP(api.kvp_kv_cache_copy_blocks(c, copies, 2), KVP_ERR_OUT_OF_RANGE, "(0 -> -1)");
  EXPECT_EQ(l1.AllBytes(), all_before);
  EXPECT_KVP(api.kvp_kv_cache_copy_blocks(nullptr, copies, 1), KVP_ERR_INVALID_ARGUMENT, "cache is NULL");
  EXPECT_KVP(api.kvp_kv_cache_copy_blocks(c, nullptr, 1), KVP_ERR_INVALID_ARGUMENT, "num_copies=1");
  EXPECT_KVP(api.kvp_kv_cache_copy_blocks(c, copies, -1), KVP_ERR_INVALID_ARGUMENT, "num_copies=-1");
  EXPECT_KVP(api.kvp_kv_cache_copy_blocks(c, nullptr, 0), KVP_OK);
  EXPECT_KVP(api.kvp_kv_cache_copy_blocks(c, copies, 1), KVP_OK);
  EXPECT_EQ(l1.BlockBytes(1), block0);

  kvp_block_copy out_bad[1] = {{0, 4}};  // host has 4 blocks
  EXPECT_KVP(api.kvp_kv_cache_swap_out(c, out_bad, 1), KVP_ERR_OUT_OF_RANGE, "swap_out", "(0 -> 4)");
  kvp_block_copy in_bad[1] = {{4, 0}};
  EXPECT_KVP(api.kvp_kv_cache_swap_in(c, in_bad, 1), KVP_ERR_OUT_OF_RANGE, "swap_in", "(4 -> 0)");
  EXPECT_KVP(api.kvp_kv_cache_swap_out(nullptr, out_bad, 1), KVP_ERR_INVALID_ARGUMENT, "cache is NULL");
  EXPECT_KVP(api.kvp_kv_cache_swap_in(nullptr, in_bad, 1), KVP_ERR_INVALID_ARGUMENT, "cache is NULL");
  EXPECT_EQ(h1.AllBytes(), host_before);
  kvp_block_copy out_ok[1] = {{0, 3}};
  EXPECT_KVP(api.kvp_kv_cache_swap_out(c, out_ok, 1), KVP_OK);
  EXPECT_EQ(h1.BlockBytes(3), block0);
  kvp_block_copy in_ok[1] = {{3, 2}};
  EXPECT_KVP(api.kvp_kv_cache_swap_in(c, in_ok, 1), KVP_OK);
  EXPECT_EQ(l1.BlockBytes(2), block0);

  // State slots.
  void* data = nullptr;
  int64_t bytes = -1;
  EXPECT_KVP(api.kvp_kv_cache_state(c, 1, 1, &data, &bytes), KVP_OK);
  ASSERT_NE(data, nullptr);
  ASSERT_EQ(bytes, 16);
  std::memset(data, 0x3C, 16);
  void* untouched = reinterpret_cast<void*>(0x1);
  EXPECT_KVP(api.kvp_kv_cache_state(c, 1, 2, &untouched, &bytes), KVP_ERR_OUT_OF_RANGE, "slot=2");
  EXPECT_KVP(api.kvp_kv_cache_state(c, 1, -1, &untouched, &bytes), KVP_ERR_OUT_OF_RANGE, "slot=-1");
  EXPECT_KVP(api.kvp_kv_cache_state(c, 2, 0, &untouched, &bytes), KVP_ERR_OUT_OF_RANGE, "layer=2");
  EXPECT_KVP(api.kvp_kv_cache_state(c, 0, 0, nullptr, &bytes), KVP_ERR_INVALID_ARGUMENT, "out_data");
  EXPECT_KVP(api.kvp_kv_cache_state(c, 0, 0, &untouched, nullptr), KVP_ERR_INVALID_ARGUMENT, "out_num_bytes");
  EXPECT_KVP(api.kvp_kv_cache_state(nullptr, 0, 0, &untouched, &bytes), KVP_ERR_INVALID_ARGUMENT, "cache");
  EXPECT_EQ(untouched, reinterpret_cast<void*>(0x1));
  EXPECT_KVP(api.kvp_kv_cache_copy_state(c, 1, 5), KVP_ERR_OUT_OF_RANGE, "slot=5");
  EXPECT_KVP(api.kvp_kv_cache_copy_state(c, -3, 0), KVP_ERR_OUT_OF_RANGE, "slot=-3");
  EXPECT_KVP(api.kvp_kv_cache_copy_state(nullptr, 0, 1), KVP_ERR_INVALID_ARGUMENT, "cache is NULL");
  void* slot0 = nullptr;
  ASSERT_OK(api.kvp_kv_cache_state(c, 1, 0, &slot0, &bytes));
  EXPECT_EQ(static_cast<uint8_t*>(slot0)[0], 0);
  EXPECT_KVP(api.kvp_kv_cache_copy_state(c, 1, 0), KVP_OK);
  EXPECT_EQ(std::memcmp(slot0, data, 16), 0);
}

TEST_F(Abi, KvCacheFromTensorsChecksTheTensors) {
  constexpr int L = 2, NB = 4, BS = 4, H = 2, D = 32;
  auto ctx = MakeContext();
  auto o = CacheOptions(L, NB, BS, H, D, KVP_DTYPE_FLOAT32, KVP_LAYOUT_BLOCK_FIRST);
  std::vector<std::vector<float>> mem(L, std::vector<float>(2 * NB * BS * H * D * 2));
  std::vector<std::unique_ptr<Tensor>> ts;
  for (int l = 0; l < L; ++l)
    ts.push_back(std::make_unique<Tensor>(mem[l].data(), kF32, std::vector<int64_t>{NB, 2, BS, H, D}));
  std::vector<DLTensor> layers = {ts[0]->t, ts[1]->t};
  kvp_kv_cache* const sentinel = reinterpret_cast<kvp_kv_cache*>(0x5);
  kvp_kv_cache* c = sentinel;
  EXPECT_KVP(api.kvp_kv_cache_create_from_tensors(nullptr, &o, layers.data(), L, &c), KVP_ERR_INVALID_ARGUMENT, "context");
  EXPECT_KVP(api.kvp_kv_cache_create_from_tensors(ctx.get(), &o, nullptr, L, &c), KVP_ERR_INVALID_ARGUMENT, "layer_tensors");
  EXPECT_KVP(api.kvp_kv_cache_create_from_tensors(ctx.get(), &o, layers.data(), L, nullptr), KVP_ERR_INVALID_ARGUMENT, "out_cache");
  EXPECT_KVP(api.kvp_kv_cache_create_from_tensors(ctx.get(), &o, layers.data(), 1, &c), KVP_ERR_INVALID_ARGUMENT, "num_layer_tensors=1");
  auto kvfirst = o;
  kvfirst.layout = KVP_LAYOUT_KV_FIRST;  // the tensors have the block-first shape
  EXPECT_KVP(api.kvp_kv_cache_create_from_tensors(ctx.get(), &kvfirst, layers.data(), L, &c), KVP_ERR_INVALID_ARGUMENT,
             "layer_tensors[0]: shape[0]=4 but the layout needs 2");
  auto bf16 = o;
  bf16.dtype = KVP_DTYPE_BFLOAT16;
  EXPECT_KVP(api.kvp_kv_cache_create_from_tensors(ctx.get(), &bf16, layers.data(), L, &c), KVP_ERR_INVALID_ARGUMENT,
             "layer_tensors[0]: dtype float32", "bfloat16");
  std::vector<DLTensor> bad = layers;
  bad[1].device = DLDevice{kDLCUDA, 0};
  EXPECT_KVP(api.kvp_kv_cache_create_from_tensors(ctx.get(), &o, bad.data(), L, &c), KVP_ERR_INVALID_ARGUMENT, "layer_tensors[1]: device");
  bad = layers;
  bad[1].ndim = 4;
  EXPECT_KVP(api.kvp_kv_cache_create_from_tensors(ctx.get(), &o, bad.data(), L, &c), KVP_ERR_INVALID_ARGUMENT, "layer_tensors[1]: ndim=4");
  std::vector<int64_t> gappy = {2 * BS * H * D * 2, BS * H * D * 2, H * D * 2, D * 2, 2};
  bad = layers;
  bad[0].strides = gappy.data();
  EXPECT_KVP(api.kvp_kv_cache_create_from_tensors(ctx.get(), &o, bad.data(), L, &c), KVP_ERR_INVALID_ARGUMENT, "head axis must be contiguous");
  bad = layers;
  bad[0].byte_offset = 2;
  EXPECT_KVP(api.kvp_kv_cache_create_from_tensors(ctx.get(), &o, bad.data(), L, &c), KVP_ERR_INVALID_ARGUMENT, "aligned");
  bad = layers;
  bad[0].data = nullptr;
  EXPECT_KVP(api.kvp_kv_cache_create_from_tensors(ctx.get(), &o, bad.data(), L, &c), KVP_ERR_INVALID_ARGUMENT, "data is NULL");
  EXPECT_EQ(c, sentinel);
  EXPECT_KVP(api.kvp_kv_cache_create_from_tensors(ctx.get(), &o, layers.data(), L, &c), KVP_OK);
  ASSERT_NE(c, sentinel);
  Handle<kvp_kv_cache> cache(c);
  DLTensor v{};
  ASSERT_OK(api.kvp_kv_cache_layer_view(c, 1, 0, &v));
  EXPECT_EQ(v.data, mem[1].data());  // zero copy
}

// ------------------------------------------------------------------------------------------------
// Plans and attention: bad inputs
// ------------------------------------------------------------------------------------------------

// One small valid setup for the run checks: 1 sequence of 5 tokens, 3 of them queries.
struct RunSetup {
  static constexpr int QH = 4, KH = 2, D = 32, BS = 4, NB = 4;
  Handle<kvp_context> ctx;
  Handle<kvp_kv_cache> cache;
  Handle<kvp_attention> attn;
  Handle<kvp_plan> plan;
  std::vector<int32_t> qsl = {0, 3}, seq_lens = {5}, table = {2, 0};
  std::vector<float> q, out, lse;
  std::unique_ptr<Tensor> qt, ot, lt;

  kvp_batch Batch() const {
    kvp_batch b{};
    b.struct_size = sizeof b;
    b.num_seqs = 1;
    b.block_size = BS;
    b.query_start_loc = qsl.data();
    b.seq_lens = seq_lens.data();
    b.block_table = table.data();
    b.block_table_stride = 2;
    return b;
  }
  void Init() {
    ctx = MakeContext();
    cache = MakeCache(ctx.get(), CacheOptions(2, NB, BS, KH, D));
    attn = MakeAttention(ctx.get(), AttnOptions(QH, KH, D));
    plan = MakePlan(ctx.get(), 2, 8, 4);
    std::mt19937 rng(3);
    q = Random(3 * QH * D, rng);
    out.assign(3 * QH * D, -7.0f);
    lse.assign(3 * QH, -7.0f);
    qt = std::make_unique<Tensor>(q.data(), kF32, std::vector<int64_t>{3, QH, D});
    ot = std::make_unique<Tensor>(out.data(), kF32, std::vector<int64_t>{3, QH, D});
    lt = std::make_unique<Tensor>(lse.data(), kF32, std::vector<int64_t>{3, QH});
  }
};

TEST_F(Abi, PlanRejectsBadBatchesAndEmptiesItself) {
  RunSetup s;
  s.Init();
  ASSERT_TRUE(s.ctx && s.cache && s.attn && s.plan);
  kvp_plan* p = s.plan.get();

  // Plan creation.
  kvp_plan_options po{};
  po.struct_size = sizeof po;
  po.max_num_seqs = 1;
  po.max_num_tokens = 1;
  po.max_num_blocks = 1;
  kvp_plan* const sentinel = reinterpret_cast<kvp_plan*>(0x3);
  kvp_plan* made = sentinel;
  EXPECT_KVP(api.kvp_plan_create(nullptr, &po, &made), KVP_ERR_INVALID_ARGUMENT, "context");
  EXPECT_KVP(api.kvp_plan_create(s.ctx.get(), &po, nullptr), KVP_ERR_INVALID_ARGUMENT, "out_plan");
  EXPECT_KVP(api.kvp_plan_create(s.ctx.get(), nullptr, &made), KVP_ERR_INVALID_ARGUMENT, "options is NULL");
  po.struct_size = 0;
  EXPECT_KVP(api.kvp_plan_create(s.ctx.get(), &po, &made), KVP_ERR_INVALID_ARGUMENT, "struct_size=0");
  po.struct_size = 3;
  EXPECT_KVP(api.kvp_plan_create(s.ctx.get(), &po, &made), KVP_ERR_INVALID_ARGUMENT, "struct_size=3");
  po.struct_size = sizeof(po) + 8;
  EXPECT_KVP(api.kvp_plan_create(s.ctx.get(), &po, &made), KVP_ERR_NOT_SUPPORTED, "struct_size=");
  po.struct_size = offsetof(kvp_plan_options, max_num_blocks);  // older: max_num_blocks takes 0
  EXPECT_KVP(api.kvp_plan_create(s.ctx.get(), &po, &made), KVP_ERR_INVALID_ARGUMENT, "max_num_blocks=0");
  po.struct_size = sizeof po;
  po.max_num_seqs = 0;
  EXPECT_KVP(api.kvp_plan_create(s.ctx.get(), &po, &made), KVP_ERR_INVALID_ARGUMENT, "max_num_seqs=0");
  po.max_num_seqs = 1 << 25;
  EXPECT_KVP(api.kvp_plan_create(s.ctx.get(), &po, &made), KVP_ERR_INVALID_ARGUMENT, "too large");
  EXPECT_EQ(made, sentinel);

  // Each bad batch: its status and message, then the plan is empty and a run is refused.
  auto expect_empty = [&](const char* what) {
    SCOPED_TRACE(what);
    EXPECT_KVP(api.kvp_attention_run(s.attn.get(), p, s.cache.get(), 0, s.qt->p(), s.ot->p(), s.lt->p()),
               KVP_ERR_FAILED_PRECONDITION, "plan", "kvp_plan_update");
    EXPECT_EQ(s.out[0], -7.0f);
    // Re-arm with the good batch for the next case.
    const kvp_batch good = s.Batch();
    ASSERT_OK(api.kvp_plan_update(p, &good));
  };
  const kvp_batch good = s.Batch();
  ASSERT_OK(api.kvp_plan_update(p, &good));
  kvp_batch b = good;

  EXPECT_KVP(api.kvp_plan_update(nullptr, &b), KVP_ERR_INVALID_ARGUMENT, "plan is NULL");
  EXPECT_KVP(api.kvp_plan_update(p, nullptr), KVP_ERR_INVALID_ARGUMENT, "batch is NULL");
  expect_empty("NULL batch");
  b.struct_size = 0;
  EXPECT_KVP(api.kvp_plan_update(p, &b), KVP_ERR_INVALID_ARGUMENT, "struct_size=0");
  expect_empty("struct_size 0");
  b.struct_size = sizeof(kvp_batch) + 8;
  EXPECT_KVP(api.kvp_plan_update(p, &b), KVP_ERR_NOT_SUPPORTED, "struct_size=");
  expect_empty("struct_size too large");

  // Capacities: 2 sequences, 8 tokens, 4 blocks.
  b = good;
  b.num_seqs = 3;
  std::vector<int32_t> qsl3 = {0, 1, 2, 3}, lens3 = {1, 1, 1}, table3 = {0, 1, 2};
  b.query_start_loc = qsl3.data();
  b.seq_lens = lens3.data();
  b.block_table = table3.data();
  b.block_table_stride = 1;
  EXPECT_KVP(api.kvp_plan_update(p, &b), KVP_ERR_OUT_OF_RANGE, "num_seqs=3", "max_num_seqs");
  expect_empty("too many sequences");
  b = good;
  b.num_seqs = 0;
  EXPECT_KVP(api.kvp_plan_update(p, &b), KVP_ERR_OUT_OF_RANGE, "num_seqs=0");
  expect_empty("no sequences");
  b = good;
  std::vector<int32_t> qsl9 = {0, 9}, lens9 = {9}, table9 = {0, 1, 2};
  b.query_start_loc = qsl9.data();
  b.seq_lens = lens9.data();
  b.block_table = table9.data();
  b.block_table_stride = 3;
  EXPECT_KVP(api.kvp_plan_update(p, &b), KVP_ERR_OUT_OF_RANGE, "max_num_tokens=8");
  expect_empty("too many tokens");
  b = good;
  std::vector<int32_t> qsl2 = {0, 1, 2}, lens12 = {12, 12}, table6 = {0, 1, 2, 3, 0, 1};
  b.num_seqs = 2;
  b.query_start_loc = qsl2.data();
  b.seq_lens = lens12.data();
  b.block_table = table6.data();
  b.block_table_stride = 3;
  EXPECT_KVP(api.kvp_plan_update(p, &b), KVP_ERR_OUT_OF_RANGE, "max_num_blocks=4");
  expect_empty("too many blocks");

  // Inconsistent descriptions.
  b = good;
  std::vector<int32_t> decreasing = {0, 2, 1}, lens2 = {2, 2}, table2 = {0, 1};
  b.num_seqs = 2;
  b.query_start_loc = decreasing.data();
  b.seq_lens = lens2.data();
  b.block_table = table2.data();
  b.block_table_stride = 1;
  EXPECT_KVP(api.kvp_plan_update(p, &b), KVP_ERR_INVALID_ARGUMENT, "non-decreasing");
  expect_empty("decreasing query_start_loc");
  b = good;
  std::vector<int32_t> from1 = {1, 3};
  b.query_start_loc = from1.data();
  EXPECT_KVP(api.kvp_plan_update(p, &b), KVP_ERR_INVALID_ARGUMENT, "query_start_loc[0]=1");
  expect_empty("query_start_loc not from 0");
  b = good;
  std::vector<int32_t> short_len = {2};
  b.seq_lens = short_len.data();
  EXPECT_KVP(api.kvp_plan_update(p, &b), KVP_ERR_INVALID_ARGUMENT, "seq_lens[0]=2", "3 query tokens");
  expect_empty("seq_len shorter than its queries");
  b = good;
  b.query_start_loc = nullptr;
  EXPECT_KVP(api.kvp_plan_update(p, &b), KVP_ERR_INVALID_ARGUMENT, "query_start_loc is NULL");
  expect_empty("NULL query_start_loc");
  b = good;
  b.seq_lens = nullptr;
  EXPECT_KVP(api.kvp_plan_update(p, &b), KVP_ERR_INVALID_ARGUMENT, "seq_lens is NULL");
  expect_empty("NULL seq_lens");
  b = good;
  b.block_size = 0;
  EXPECT_KVP(api.kvp_plan_update(p, &b), KVP_ERR_INVALID_ARGUMENT, "block_size=0");
  expect_empty("block_size 0");
  b = good;
  b.block_table_stride = 1;
  EXPECT_KVP(api.kvp_plan_update(p, &b), KVP_ERR_INVALID_ARGUMENT, "block_table_stride=1");
  expect_empty("stride too small");
  b = good;
  std::vector<int32_t> neg_block = {2, -1};
  b.block_table = neg_block.data();
  EXPECT_KVP(api.kvp_plan_update(p, &b), KVP_ERR_INVALID_ARGUMENT, "id -1");
  expect_empty("negative block id");
  b = good;
  b.block_table = nullptr;
  EXPECT_KVP(api.kvp_plan_update(p, &b), KVP_ERR_INVALID_ARGUMENT, "no block table");
  expect_empty("no block table");
  b = good;
  b.block_table = nullptr;
  std::vector<int32_t> indptr_short = {0, 1}, indices = {2, 0};
  b.kv_indptr = indptr_short.data();
  b.kv_indices = indices.data();
  EXPECT_KVP(api.kvp_plan_update(p, &b), KVP_ERR_INVALID_ARGUMENT, "kv_indptr", "needs 2");
  expect_empty("CSR too short");
  std::vector<int32_t> indptr_from1 = {1, 3};
  b.kv_indptr = indptr_from1.data();
  EXPECT_KVP(api.kvp_plan_update(p, &b), KVP_ERR_INVALID_ARGUMENT, "kv_indptr[0]=1");
  expect_empty("CSR not from 0");
  b = good;
  std::vector<int64_t> bad_slots = {0, -5, 1};
  b.slot_mapping = bad_slots.data();
  EXPECT_KVP(api.kvp_plan_update(p, &b), KVP_ERR_INVALID_ARGUMENT, "slot_mapping[1]=-5");
  expect_empty("slot below -1");
  b = good;
  std::vector<int32_t> bad_state = {-2};
  b.state_slots = bad_state.data();
  EXPECT_KVP(api.kvp_plan_update(p, &b), KVP_ERR_INVALID_ARGUMENT, "state_slots[0]=-2");
  expect_empty("negative state slot");

  // An older kvp_batch without slot_mapping/state_slots: whatever lies past struct_size is ignored.
  b = good;
  std::vector<int64_t> slots = {1, 2, 3};
  b.slot_mapping = slots.data();
  b.struct_size = offsetof(kvp_batch, slot_mapping);
  EXPECT_KVP(api.kvp_plan_update(p, &b), KVP_OK);
  std::vector<float> kv(3 * RunSetup::KH * RunSetup::D, 0.5f);
  Tensor kt(kv.data(), kF32, {3, RunSetup::KH, RunSetup::D});
  EXPECT_KVP(api.kvp_attention_write_kv(s.attn.get(), p, s.cache.get(), 0, kt.p(), kt.p()),
             KVP_ERR_FAILED_PRECONDITION, "slot_mapping");
  EXPECT_KVP(api.kvp_attention_run(s.attn.get(), p, s.cache.get(), 0, s.qt->p(), s.ot->p(), s.lt->p()), KVP_OK);
  EXPECT_NE(s.out[0], -7.0f);
}

TEST_F(Abi, AttentionCreateRejectsBadOptions) {
  auto ctx = MakeContext();
  ASSERT_TRUE(ctx);
  kvp_attention* const sentinel = reinterpret_cast<kvp_attention*>(0x11);
  kvp_attention* a = sentinel;
  auto o = AttnOptions(4, 2, 32);
  EXPECT_KVP(api.kvp_attention_create(nullptr, &o, &a), KVP_ERR_INVALID_ARGUMENT, "context");
  EXPECT_KVP(api.kvp_attention_create(ctx.get(), &o, nullptr), KVP_ERR_INVALID_ARGUMENT, "out_attention");
  EXPECT_KVP(api.kvp_attention_create(ctx.get(), nullptr, &a), KVP_ERR_INVALID_ARGUMENT, "options is NULL");
  o.struct_size = 0;
  EXPECT_KVP(api.kvp_attention_create(ctx.get(), &o, &a), KVP_ERR_INVALID_ARGUMENT, "struct_size=0");
  o.struct_size = 1;
  EXPECT_KVP(api.kvp_attention_create(ctx.get(), &o, &a), KVP_ERR_INVALID_ARGUMENT, "struct_size=1");
  o.struct_size = sizeof(o) + 8;
  EXPECT_KVP(api.kvp_attention_create(ctx.get(), &o, &a), KVP_ERR_NOT_SUPPORTED,
             "struct_size=" + std::to_string(sizeof(o) + 8));
  o = AttnOptions(4, 2, 32, KVP_DTYPE_FLOAT32, nullptr);
  EXPECT_KVP(api.kvp_attention_create(ctx.get(), &o, &a), KVP_ERR_INVALID_ARGUMENT, "backend is NULL");
  o = AttnOptions(4, 2, 32, KVP_DTYPE_FLOAT32, "warp_drive");
  EXPECT_KVP(api.kvp_attention_create(ctx.get(), &o, &a), KVP_ERR_NOT_FOUND, "warp_drive");
  o = AttnOptions(4, 2, 48);
  EXPECT_KVP(api.kvp_attention_create(ctx.get(), &o, &a), KVP_ERR_NOT_SUPPORTED, "head_size=48");
  o = AttnOptions(6, 4, 32);
  EXPECT_KVP(api.kvp_attention_create(ctx.get(), &o, &a), KVP_ERR_INVALID_ARGUMENT, "num_q_heads=6", "num_kv_heads=4");
  o = AttnOptions(4, 0, 32);
  EXPECT_KVP(api.kvp_attention_create(ctx.get(), &o, &a), KVP_ERR_INVALID_ARGUMENT, "num_kv_heads=0");
  o = AttnOptions(-4, 2, 32);
  EXPECT_KVP(api.kvp_attention_create(ctx.get(), &o, &a), KVP_ERR_INVALID_ARGUMENT, "num_q_heads=-4");
  o = AttnOptions(4, 2, 32, 9);
  EXPECT_KVP(api.kvp_attention_create(ctx.get(), &o, &a), KVP_ERR_INVALID_ARGUMENT, "kv_dtype=9");
  o = AttnOptions(4, 2, 32, KVP_DTYPE_FP8_E4M3);
  // FP8 is a CUDA-only cache format: whether the dtype or the device is refused, it is NOT_SUPPORTED.
  EXPECT_KVP(api.kvp_attention_create(ctx.get(), &o, &a), KVP_ERR_NOT_SUPPORTED, "dense");
  o = AttnOptions(4, 2, 32);
  o.sm_scale = -1.0f;
  EXPECT_KVP(api.kvp_attention_create(ctx.get(), &o, &a), KVP_ERR_INVALID_ARGUMENT, "sm_scale=-1");
  o.sm_scale = std::nanf("");
  EXPECT_KVP(api.kvp_attention_create(ctx.get(), &o, &a), KVP_ERR_INVALID_ARGUMENT, "sm_scale");
  o.sm_scale = 0.0f;
  o.config_format = 5;
  EXPECT_KVP(api.kvp_attention_create(ctx.get(), &o, &a), KVP_ERR_INVALID_ARGUMENT, "config_format=5");
  o.config_format = -1;
  EXPECT_KVP(api.kvp_attention_create(ctx.get(), &o, &a), KVP_ERR_INVALID_ARGUMENT, "config_format=-1");
  o.config_format = KVP_CONFIG_JSON;
  o.config = nullptr;
  o.config_size = 10;
  EXPECT_KVP(api.kvp_attention_create(ctx.get(), &o, &a), KVP_ERR_INVALID_ARGUMENT, "config is NULL");
  EXPECT_EQ(a, sentinel);

  // An older struct that ends before config_format: garbage past it is ignored (no config).
  struct {
    kvp_attention_options o;
    char tail[32];
  } older{};
  std::memset(&older, 0x77, sizeof older);
  older.o = AttnOptions(4, 2, 32);
  older.o.struct_size = offsetof(kvp_attention_options, config_format);
  older.o.config_format = 77;
  older.o.config = reinterpret_cast<const void*>(0x10);
  older.o.config_size = 12345;
  EXPECT_KVP(api.kvp_attention_create(ctx.get(), &older.o, &a), KVP_OK);
  ASSERT_NE(a, sentinel);
  api.kvp_attention_destroy(a);
}

TEST_F(Abi, AttentionRunChecksItsArguments) {
  RunSetup s;
  s.Init();
  ASSERT_TRUE(s.ctx && s.cache && s.attn && s.plan);
  const kvp_batch good = s.Batch();
  ASSERT_OK(api.kvp_plan_update(s.plan.get(), &good));
  const kvp_attention* at = s.attn.get();
  const kvp_plan* p = s.plan.get();
  const kvp_kv_cache* c = s.cache.get();
  DLTensor* q = s.qt->p();
  DLTensor* o = s.ot->p();
  DLTensor* l = s.lt->p();

  EXPECT_KVP(api.kvp_attention_run(nullptr, p, c, 0, q, o, l), KVP_ERR_INVALID_ARGUMENT, "attention");
  EXPECT_KVP(api.kvp_attention_run(at, nullptr, c, 0, q, o, l), KVP_ERR_INVALID_ARGUMENT, "plan");
  EXPECT_KVP(api.kvp_attention_run(at, p, nullptr, 0, q, o, l), KVP_ERR_INVALID_ARGUMENT, "cache");
  EXPECT_KVP(api.kvp_attention_run(at, p, c, 0, nullptr, o, l), KVP_ERR_INVALID_ARGUMENT, "query is NULL");
  EXPECT_KVP(api.kvp_attention_run(at, p, c, 0, q, nullptr, l), KVP_ERR_INVALID_ARGUMENT, "out is NULL");
  EXPECT_KVP(api.kvp_attention_run(at, p, c, 2, q, o, l), KVP_ERR_OUT_OF_RANGE, "layer=2");
  EXPECT_KVP(api.kvp_attention_run(at, p, c, -1, q, o, l), KVP_ERR_OUT_OF_RANGE, "layer=-1");

  DLTensor bad = *q;
  bad.dtype = kI32;
  EXPECT_KVP(api.kvp_attention_run(at, p, c, 0, &bad, o, l), KVP_ERR_INVALID_ARGUMENT, "query: dtype");
  bad = *q;
  bad.device = DLDevice{kDLCUDA, 0};
  EXPECT_KVP(api.kvp_attention_run(at, p, c, 0, &bad, o, l), KVP_ERR_INVALID_ARGUMENT, "query: device");
  bad = *q;
  bad.byte_offset = 2;
  EXPECT_KVP(api.kvp_attention_run(at, p, c, 0, &bad, o, l), KVP_ERR_INVALID_ARGUMENT, "query: data + byte_offset");
  std::vector<int64_t> two_tokens = {2, RunSetup::QH, RunSetup::D};
  bad = *q;
  bad.shape = two_tokens.data();
  EXPECT_KVP(api.kvp_attention_run(at, p, c, 0, &bad, o, l), KVP_ERR_INVALID_ARGUMENT, "query: expected shape [3, 4, 32]");
  std::vector<int64_t> gappy = {RunSetup::QH * RunSetup::D, RunSetup::D / 2, 2};
  std::vector<int64_t> half = {3, RunSetup::QH, RunSetup::D / 2};
  bad = *q;
  bad.strides = gappy.data();
  bad.shape = half.data();
  EXPECT_KVP(api.kvp_attention_run(at, p, c, 0, &bad, o, l), KVP_ERR_INVALID_ARGUMENT, "query: expected shape");
  std::vector<int64_t> wide_strides = {2 * RunSetup::QH * RunSetup::D, 2 * RunSetup::D, 2};
  std::vector<float> qwide(2 * 3 * RunSetup::QH * RunSetup::D);
  Tensor qw(qwide.data(), kF32, {3, RunSetup::QH, RunSetup::D}, wide_strides);
  EXPECT_KVP(api.kvp_attention_run(at, p, c, 0, qw.p(), o, l), KVP_ERR_INVALID_ARGUMENT, "query: the head axis must be contiguous");
  std::vector<uint16_t> obf(3 * RunSetup::QH * RunSetup::D);
  Tensor obt(obf.data(), kBF16, {3, RunSetup::QH, RunSetup::D});
  EXPECT_KVP(api.kvp_attention_run(at, p, c, 0, q, obt.p(), l), KVP_ERR_INVALID_ARGUMENT, "out dtype bfloat16", "float32");
  std::vector<float> lse_big(4 * RunSetup::QH);
  Tensor lbig(lse_big.data(), kF32, {4, RunSetup::QH});
  EXPECT_KVP(api.kvp_attention_run(at, p, c, 0, q, o, lbig.p()), KVP_ERR_INVALID_ARGUMENT, "lse: expected shape [3, 4]");
  Tensor l3(lse_big.data(), kF32, {3, RunSetup::QH, 1});
  EXPECT_KVP(api.kvp_attention_run(at, p, c, 0, q, o, l3.p()), KVP_ERR_INVALID_ARGUMENT, "lse: ndim=3, expected 2");
  std::vector<uint16_t> lse_bf(3 * RunSetup::QH);
  Tensor lbf(lse_bf.data(), kBF16, {3, RunSetup::QH});
  EXPECT_KVP(api.kvp_attention_run(at, p, c, 0, q, o, lbf.p()), KVP_ERR_INVALID_ARGUMENT, "lse: dtype must be float32");
  EXPECT_EQ(s.out[0], -7.0f);  // no failed run wrote its output
  EXPECT_EQ(s.lse[0], -7.0f);

  // Caches that do not match the attention or the plan.
  auto other_heads = MakeCache(s.ctx.get(), CacheOptions(1, RunSetup::NB, RunSetup::BS, 1, RunSetup::D));
  EXPECT_KVP(api.kvp_attention_run(at, p, other_heads.get(), 0, q, o, l), KVP_ERR_INVALID_ARGUMENT,
             "num_kv_heads=1", "num_kv_heads=2");
  auto other_dtype = MakeCache(s.ctx.get(), CacheOptions(1, RunSetup::NB, RunSetup::BS, RunSetup::KH, RunSetup::D,
                                                         KVP_DTYPE_BFLOAT16));
  EXPECT_KVP(api.kvp_attention_run(at, p, other_dtype.get(), 0, q, o, l), KVP_ERR_INVALID_ARGUMENT,
             "dtype=bfloat16", "kv_dtype=float32");
  auto other_bs = MakeCache(s.ctx.get(), CacheOptions(1, RunSetup::NB, 8, RunSetup::KH, RunSetup::D));
  EXPECT_KVP(api.kvp_attention_run(at, p, other_bs.get(), 0, q, o, l), KVP_ERR_INVALID_ARGUMENT, "block_size=4", "8");
  auto few_blocks = MakeCache(s.ctx.get(), CacheOptions(1, 2, RunSetup::BS, RunSetup::KH, RunSetup::D));
  EXPECT_KVP(api.kvp_attention_run(at, p, few_blocks.get(), 0, q, o, l), KVP_ERR_OUT_OF_RANGE, "block 2", "2 blocks");
  std::vector<float> kv(3 * RunSetup::KH * RunSetup::D, 0.5f);
  Tensor kt(kv.data(), kF32, {3, RunSetup::KH, RunSetup::D});
  EXPECT_KVP(api.kvp_attention_write_kv(at, p, other_heads.get(), 0, kt.p(), kt.p()), KVP_ERR_INVALID_ARGUMENT,
             "does not match");
  EXPECT_KVP(api.kvp_attention_write_kv(nullptr, p, s.cache.get(), 0, kt.p(), kt.p()), KVP_ERR_INVALID_ARGUMENT,
             "attention");
  EXPECT_KVP(api.kvp_attention_write_kv(at, nullptr, s.cache.get(), 0, kt.p(), kt.p()), KVP_ERR_INVALID_ARGUMENT,
             "plan");
  EXPECT_KVP(api.kvp_attention_write_kv(at, p, nullptr, 0, kt.p(), kt.p()), KVP_ERR_INVALID_ARGUMENT, "cache");
  EXPECT_KVP(api.kvp_attention_write_kv(at, p, s.cache.get(), 0, nullptr, kt.p()), KVP_ERR_INVALID_ARGUMENT,
             "key is NULL");
  EXPECT_KVP(api.kvp_attention_write_kv(at, p, s.cache.get(), 0, kt.p(), nullptr), KVP_ERR_INVALID_ARGUMENT,
             "value is NULL");
  EXPECT_EQ(s.out[0], -7.0f);

  // Without lse, then with.
  EXPECT_KVP(api.kvp_attention_run(at, p, c, 0, q, o, nullptr), KVP_OK);
  EXPECT_EQ(s.lse[0], -7.0f);
  EXPECT_TRUE(std::isfinite(s.out[0]));
  EXPECT_KVP(api.kvp_attention_run(at, p, c, 0, q, o, l), KVP_OK);
  EXPECT_TRUE(std::isfinite(s.lse[0]));
  EXPECT_NE(s.lse[0], -7.0f);
}

TEST_F(Abi, ConcurrentRunsOnOneHandleAgree) {
  RunSetup s;
  s.Init();
  ASSERT_TRUE(s.ctx && s.cache && s.attn && s.plan);
  std::mt19937 rng(8);
  auto k = Random(5 * RunSetup::KH * RunSetup::D, rng), v = Random(5 * RunSetup::KH * RunSetup::D, rng);
  std::vector<int64_t> slots = {8, 9, 10, 11, 0};  // blocks 2 then 0, as the batch's table
  Tensor kt(k.data(), kF32, {5, RunSetup::KH, RunSetup::D}), vt(v.data(), kF32, {5, RunSetup::KH, RunSetup::D});
  Tensor st(slots.data(), kI64, {5});
  ASSERT_OK(api.kvp_kv_cache_write(s.cache.get(), 0, kt.p(), vt.p(), st.p()));
  const kvp_batch good = s.Batch();
  ASSERT_OK(api.kvp_plan_update(s.plan.get(), &good));
  ASSERT_OK(api.kvp_attention_run(s.attn.get(), s.plan.get(), s.cache.get(), 0, s.qt->p(), s.ot->p(), s.lt->p()));
  const std::vector<float> want = s.out;
  std::vector<int> bad(4, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      std::vector<float> out(want.size(), 0.0f), lse(3 * RunSetup::QH);
      Tensor ot(out.data(), kF32, {3, RunSetup::QH, RunSetup::D}), lt(lse.data(), kF32, {3, RunSetup::QH});
      for (int i = 0; i < 50; ++i) {
        std::fill(out.begin(), out.end(), 0.0f);
        if (api.kvp_attention_run(s.attn.get(), s.plan.get(), s.cache.get(), 0, s.qt->p(), ot.p(), lt.p()) != KVP_OK ||
            out != want)
          ++bad[t];
      }
    });
  for (auto& th : threads) th.join();
  for (int t = 0; t < 4; ++t) EXPECT_EQ(bad[t], 0) << "thread " << t;
}

TEST_F(Abi, PrefixCacheHitsAreWholeBlocksAndLeaveOneToCompute) {
  auto m = MakeManager(BmOptions(4, 16, 0, 1));
  ASSERT_TRUE(m);
  const int32_t tokens[8] = {5, 6, 7, 8, 9, 10, 11, 12};
  int64_t cached = -1;
  ASSERT_OK(api.kvp_block_manager_allocate(m.get(), 1, tokens, 8, 0, &cached));
  EXPECT_EQ(cached, 0);
  int64_t again = -1;
  ASSERT_OK(api.kvp_block_manager_allocate(m.get(), 2, tokens, 8, 0, &again));
  EXPECT_EQ(again, 0);  // nothing is served before it is marked computed
  ASSERT_OK(api.kvp_block_manager_mark_computed(m.get(), 1, 8));
  ASSERT_OK(api.kvp_block_manager_allocate(m.get(), 3, tokens, 8, 0, &cached));
  EXPECT_EQ(cached, 4);  // both blocks are cached, but the last token must still be computed
  ASSERT_OK(api.kvp_block_manager_allocate(m.get(), 4, tokens, 8, 99, &cached));
  EXPECT_EQ(cached, 0);  // another extra key shares nothing
  ASSERT_OK(api.kvp_block_manager_allocate(m.get(), 5, tokens, 7, 0, &cached));
  EXPECT_EQ(cached, 4);
  EXPECT_EQ(BlockTable(m.get(), 5)[0], BlockTable(m.get(), 1)[0]);
  EXPECT_NE(BlockTable(m.get(), 4)[0], BlockTable(m.get(), 1)[0]);
}

// ------------------------------------------------------------------------------------------------
// End to end
// ------------------------------------------------------------------------------------------------

constexpr int kL = 2, kBs = 4, kKH = 2, kQH = 4, kD = 32, kNB = 32, kHostNB = 16;
constexpr size_t kRow = static_cast<size_t>(kKH) * kD;

struct ScenarioResult {
  std::vector<float> out[kL];
  std::vector<float> lse[kL];
};

// Caller-owned pages for kvp_kv_cache_create_from_tensors in the block-first layout, with padded
// (non-compact) strides on every axis but the head dimension.
struct ExternalPages {
  static constexpr int64_t kStrideHead = kD + 8;
  static constexpr int64_t kStridePos = kKH * kStrideHead + 4;
  static constexpr int64_t kStrideKv = kBs * kStridePos + 16;
  static constexpr int64_t kStrideBlock = 2 * kStrideKv + 32;
  std::vector<std::vector<uint8_t>> mem;
  std::vector<std::unique_ptr<Tensor>> tensors;
  std::vector<DLTensor> layers;
  ExternalPages(int32_t dtype) {
    const DLDataType dt = dtype == KVP_DTYPE_BFLOAT16 ? kBF16 : kF32;
    const size_t esize = dt.bits / 8;
    for (int l = 0; l < kL; ++l) {
      mem.emplace_back(static_cast<size_t>(kNB * kStrideBlock) * esize, 0);
      tensors.push_back(std::make_unique<Tensor>(mem.back().data(), dt, std::vector<int64_t>{kNB, 2, kBs, kKH, kD},
                                                 std::vector<int64_t>{kStrideBlock, kStrideKv, kStridePos, kStrideHead, 1}));
      layers.push_back(tensors.back()->t);
    }
  }
};

// Logical K/V of each sequence, per layer: [position][kv head][dim].
using SeqKv = std::array<std::vector<float>, kL>;

void RunScenario(int32_t dtype, int32_t layout, bool external, ScenarioResult* result) {
  const bool bf16 = dtype == KVP_DTYPE_BFLOAT16;
  auto stored = [bf16](float x) -> double { return bf16 ? FromBf16(ToBf16(x)) : x; };
  auto ctx = MakeContext(2);
  ASSERT_TRUE(ctx);
  auto bm = MakeManager(BmOptions(kBs, kNB, kHostNB, 1));
  ASSERT_TRUE(bm);
  kvp_kv_cache_options co = CacheOptions(kL, kNB, kBs, kKH, kD, dtype, layout);
  co.num_host_blocks = kHostNB;
  Handle<kvp_kv_cache> cache;
  std::unique_ptr<ExternalPages> pages;
  if (external) {
    pages = std::make_unique<ExternalPages>(dtype);
    kvp_kv_cache* c = nullptr;
    ASSERT_OK(api.kvp_kv_cache_create_from_tensors(ctx.get(), &co, pages->layers.data(), kL, &c));
    cache.reset(c);
  } else {
    cache = MakeCache(ctx.get(), co);
  }
  ASSERT_TRUE(cache);
  auto attn = MakeAttention(ctx.get(), AttnOptions(kQH, kKH, kD, dtype));
  ASSERT_TRUE(attn);
  std::array<View, kL> views, host_views;
  for (int l = 0; l < kL; ++l) {
    views[l] = LayerView(cache.get(), l, 0, layout);
    host_views[l] = LayerView(cache.get(), l, 1, layout);
    ASSERT_NE(views[l].t.data, nullptr);
    if (external) {
      EXPECT_EQ(views[l].t.data, pages->mem[l].data());
      EXPECT_EQ(views[l].t.strides[0], ExternalPages::kStrideBlock);
      EXPECT_EQ(views[l].t.strides[3], ExternalPages::kStrideHead);
    }
  }

  std::mt19937 rng(2024);
  std::map<uint64_t, SeqKv> K, V;
  auto extend = [&](uint64_t seq, size_t positions) {
    for (int l = 0; l < kL; ++l) {
      auto k = Random(positions * kRow, rng), v = Random(positions * kRow, rng);
      K[seq][l].insert(K[seq][l].end(), k.begin(), k.end());
      V[seq][l].insert(V[seq][l].end(), v.begin(), v.end());
    }
  };
  // Writes positions [start, start + count) of `seq` in every layer with kvp_kv_cache_write.
  auto write = [&](uint64_t seq, int64_t start, int64_t count) {
    std::vector<int64_t> slots(count);
    EXPECT_KVP(api.kvp_block_manager_slot_mapping(bm.get(), seq, start, count, slots.data()), KVP_OK);
    for (int l = 0; l < kL; ++l) {
      Tensor kt(K[seq][l].data() + start * kRow, kF32, {count, kKH, kD});
      Tensor vt(V[seq][l].data() + start * kRow, kF32, {count, kKH, kD});
      Tensor st(slots.data(), kI64, {count});
      EXPECT_KVP(api.kvp_kv_cache_write(cache.get(), l, kt.p(), vt.p(), st.p()), KVP_OK);
    }
  };

  constexpr uint64_t kA = 1001, kB = 1002, kC = 1003;
  // A: a 10-token prompt, prefilled whole and marked computed (publishes its 2 full blocks).
  std::vector<int32_t> toks_a(10);
  for (int i = 0; i < 10; ++i) toks_a[i] = 100 + i;
  int64_t cached = -1;
  ASSERT_OK(api.kvp_block_manager_allocate(bm.get(), kA, toks_a.data(), 10, 0, &cached));
  EXPECT_EQ(cached, 0);
  extend(kA, 10);
  write(kA, 0, 10);
  ASSERT_OK(api.kvp_block_manager_mark_computed(bm.get(), kA, 10));

  // B: 14 tokens sharing A's first 8: its first two blocks come from the prefix cache.
  std::vector<int32_t> toks_b(toks_a.begin(), toks_a.begin() + 8);
  for (int i = 0; i < 6; ++i) toks_b.push_back(200 + i);
  kvp_alloc_verdict verdict{};
  ASSERT_OK(api.kvp_block_manager_can_allocate(bm.get(), toks_b.data(), 14, 0, &verdict));
  EXPECT_EQ(verdict, KVP_ALLOC_OK);
  ASSERT_OK(api.kvp_block_manager_allocate(bm.get(), kB, toks_b.data(), 14, 0, &cached));
  EXPECT_GT(cached, 0);
  EXPECT_EQ(cached, 8);
  for (int l = 0; l < kL; ++l) {
    K[kB][l].assign(K[kA][l].begin(), K[kA][l].begin() + 8 * kRow);
    V[kB][l].assign(V[kA][l].begin(), V[kA][l].begin() + 8 * kRow);
  }
  extend(kB, 6);
  const auto table_a = BlockTable(bm.get(), kA);
  const auto table_b = BlockTable(bm.get(), kB);
  ASSERT_EQ(table_a.size(), 3u);
  ASSERT_EQ(table_b.size(), 4u);
  EXPECT_EQ(table_b[0], table_a[0]);
  EXPECT_EQ(table_b[1], table_a[1]);
  EXPECT_NE(table_b[2], table_a[2]);
  kvp_block_manager_stats stats{};
  stats.struct_size = sizeof stats;
  ASSERT_OK(api.kvp_block_manager_stats_get(bm.get(), &stats));
  EXPECT_EQ(stats.prefix_hit_blocks, 2);

  // C: a fork of A. Appending to C copies A's shared, partly filled last block first.
  ASSERT_OK(api.kvp_block_manager_fork(bm.get(), kA, kC));
  K[kC] = K[kA];
  V[kC] = V[kA];
  EXPECT_EQ(BlockTable(bm.get(), kC), table_a);
  kvp_block_copy copy{-1, -1};
  int32_t copy_needed = -1;
  const int32_t tok_c = 300, tok_a = 301;
  ASSERT_OK(api.kvp_block_manager_append(bm.get(), kC, &tok_c, 1, &copy, &copy_needed));
  ASSERT_EQ(copy_needed, 1);
  EXPECT_EQ(copy.src, table_a[2]);
  EXPECT_NE(copy.dst, copy.src);
  ASSERT_OK(api.kvp_kv_cache_copy_blocks(cache.get(), &copy, 1));
  const auto table_c = BlockTable(bm.get(), kC);
  ASSERT_EQ(table_c.size(), 3u);
  EXPECT_EQ(table_c[2], copy.dst);
  extend(kC, 1);
  ASSERT_OK(api.kvp_block_manager_append(bm.get(), kA, &tok_a, 1, &copy, &copy_needed));
  EXPECT_EQ(copy_needed, 0);  // A's last block is private again
  extend(kA, 1);

  // The step: B prefills its 6 new tokens (chunked prefill after the cached prefix); A and C decode.
  const std::vector<uint64_t> seqs = {kB, kA, kC};
  const std::vector<int32_t> q_lens = {6, 1, 1}, starts = {8, 10, 10};
  const std::vector<int32_t> qsl = {0, 6, 7, 8};
  constexpr int kT = 8;
  std::vector<int64_t> slots;
  for (size_t i = 0; i < seqs.size(); ++i) {
    std::vector<int64_t> s(q_lens[i]);
    ASSERT_OK(api.kvp_block_manager_slot_mapping(bm.get(), seqs[i], starts[i], q_lens[i], s.data()));
    slots.insert(slots.end(), s.begin(), s.end());
  }
  std::array<std::vector<float>, kL> step_k, step_v;
  for (int l = 0; l < kL; ++l)
    for (size_t i = 0; i < seqs.size(); ++i) {
      const auto& k = K[seqs[i]][l];
      const auto& v = V[seqs[i]][l];
      step_k[l].insert(step_k[l].end(), k.begin() + starts[i] * kRow, k.begin() + (starts[i] + q_lens[i]) * kRow);
      step_v[l].insert(step_v[l].end(), v.begin() + starts[i] * kRow, v.begin() + (starts[i] + q_lens[i]) * kRow);
    }

  // Dense block table from the block manager.
  constexpr int kMaxBlocks = 5;
  std::vector<int32_t> dense(seqs.size() * kMaxBlocks, -9), seq_lens(seqs.size(), -9);
  ASSERT_OK(api.kvp_block_manager_block_tables(bm.get(), seqs.data(), 3, dense.data(), kMaxBlocks, seq_lens.data()));
  EXPECT_EQ(seq_lens, (std::vector<int32_t>{14, 11, 11}));
  EXPECT_EQ(dense[4], -1);  // padding
  EXPECT_EQ(std::vector<int32_t>(dense.begin(), dense.begin() + 4), table_b);
  // CSR form of the same tables.
  std::vector<int32_t> indptr = {0}, indices;
  for (uint64_t s : seqs) {
    const auto t = BlockTable(bm.get(), s);
    indices.insert(indices.end(), t.begin(), t.end());
    indptr.push_back(static_cast<int32_t>(indices.size()));
  }

  auto plan_dense = MakePlan(ctx.get(), 4, 16, 16);
  auto plan_csr = MakePlan(ctx.get(), 4, 16, 16);
  ASSERT_TRUE(plan_dense && plan_csr);
  kvp_batch b{};
  b.struct_size = sizeof b;
  b.num_seqs = 3;
  b.block_size = kBs;
  b.query_start_loc = qsl.data();
  b.seq_lens = seq_lens.data();
  b.block_table = dense.data();
  b.block_table_stride = kMaxBlocks;
  b.slot_mapping = slots.data();
  ASSERT_OK(api.kvp_plan_update(plan_dense.get(), &b));
  kvp_batch bc = b;
  bc.block_table = nullptr;
  bc.block_table_stride = 0;
  bc.kv_indptr = indptr.data();
  bc.kv_indices = indices.data();
  bc.slot_mapping = nullptr;
  ASSERT_OK(api.kvp_plan_update(plan_csr.get(), &bc));

  // Layer 0's new K/V through kvp_kv_cache_write, layer 1's through the backend.
  {
    Tensor kt(step_k[0].data(), kF32, {kT, kKH, kD}), vt(step_v[0].data(), kF32, {kT, kKH, kD});
    Tensor st(slots.data(), kI64, {kT});
    ASSERT_OK(api.kvp_kv_cache_write(cache.get(), 0, kt.p(), vt.p(), st.p()));
    Tensor k1(step_k[1].data(), kF32, {kT, kKH, kD}), v1(step_v[1].data(), kF32, {kT, kKH, kD});
    ASSERT_OK(api.kvp_attention_write_kv(attn.get(), plan_dense.get(), cache.get(), 1, k1.p(), v1.p()));
  }

  // The cache holds exactly what each sequence's block table says (prefix sharing, COW copy).
  for (uint64_t s : {kA, kB, kC}) {
    const auto table = BlockTable(bm.get(), s);
    const size_t len = K[s][0].size() / kRow;
    size_t mismatches = 0;
    for (int l = 0; l < kL; ++l)
      for (size_t p = 0; p < len; ++p)
        for (int h = 0; h < kKH; ++h)
          for (int i = 0; i < kD; ++i) {
            const size_t at = p * kRow + h * kD + i;
            mismatches += views[l].Load(0, table[p / kBs], p % kBs, h, i) != stored(K[s][l][at]);
            mismatches += views[l].Load(1, table[p / kBs], p % kBs, h, i) != stored(V[s][l][at]);
          }
    EXPECT_EQ(mismatches, 0u) << "sequence " << s;
  }

  std::vector<float> query = Random(kT * kQH * kD, rng);
  Tensor qt(query.data(), kF32, {kT, kQH, kD});
  const double tolerance = bf16 ? 1e-3 : 1e-5;
  for (int l = 0; l < kL; ++l) {
    std::vector<float> out_d(kT * kQH * kD, std::nanf("")), out_c = out_d;
    std::vector<float> lse_d(kT * kQH, std::nanf("")), lse_c = lse_d;
    Tensor od(out_d.data(), kF32, {kT, kQH, kD}), oc(out_c.data(), kF32, {kT, kQH, kD});
    Tensor ld(lse_d.data(), kF32, {kT, kQH}), lc(lse_c.data(), kF32, {kT, kQH});
    ASSERT_OK(api.kvp_attention_run(attn.get(), plan_dense.get(), cache.get(), l, qt.p(), od.p(), ld.p()));
    ASSERT_OK(api.kvp_attention_run(attn.get(), plan_csr.get(), cache.get(), l, qt.p(), oc.p(), lc.p()));
    EXPECT_EQ(std::memcmp(out_d.data(), out_c.data(), out_d.size() * 4), 0) << "dense and CSR plans differ, layer " << l;
    EXPECT_EQ(std::memcmp(lse_d.data(), lse_c.data(), lse_d.size() * 4), 0) << "layer " << l;

    kvplug::testing::NaiveParams np;
    np.num_q_heads = kQH;
    np.num_kv_heads = kKH;
    np.head_size = kD;
    np.sm_scale = 1.0 / std::sqrt(static_cast<double>(kD));
    double max_out = 0, max_lse = 0;
    for (size_t i = 0; i < seqs.size(); ++i) {
      const uint64_t s = seqs[i];
      const int len = seq_lens[i];
      std::vector<double> q(query.begin() + qsl[i] * kQH * kD, query.begin() + qsl[i + 1] * kQH * kD);
      std::vector<double> k(len * kRow), v(len * kRow);
      for (size_t j = 0; j < k.size(); ++j) k[j] = stored(K[s][l][j]), v[j] = stored(V[s][l][j]);
      std::vector<double> ref_out, ref_lse;
      kvplug::testing::NaiveAttention(np, len, q_lens[i], q, k, v, &ref_out, &ref_lse);
      for (size_t j = 0; j < ref_out.size(); ++j)
        max_out = std::max(max_out, std::abs(ref_out[j] - out_d[qsl[i] * kQH * kD + j]));
      for (size_t j = 0; j < ref_lse.size(); ++j)
        max_lse = std::max(max_lse, std::abs(ref_lse[j] - lse_d[qsl[i] * kQH + j]));
    }
    EXPECT_LE(max_out, tolerance) << "layer " << l;
    EXPECT_LE(max_lse, tolerance) << "layer " << l;
    EXPECT_FALSE(std::isnan(max_out));
    result->out[l] = out_d;
    result->lse[l] = lse_d;
  }
  for (size_t i = 0; i < seqs.size(); ++i)
    ASSERT_OK(api.kvp_block_manager_mark_computed(bm.get(), seqs[i], seq_lens[i]));

  // Swap B out and back in: the bytes travel exactly, whatever happens to the freed device blocks.
  kvp_block_copy out_plan[kHostNB];
  int32_t n_out = -1;
  EXPECT_KVP(api.kvp_block_manager_swap_out(bm.get(), kB, out_plan, 0, &n_out), KVP_ERR_OUT_OF_RANGE, "capacity=0");
  EXPECT_EQ(n_out, 4);
  ASSERT_OK(api.kvp_block_manager_swap_out(bm.get(), kB, out_plan, kHostNB, &n_out));
  ASSERT_EQ(n_out, 4);
  std::vector<std::array<std::vector<uint8_t>, kL>> saved(n_out);
  for (int i = 0; i < n_out; ++i) {
    EXPECT_EQ(out_plan[i].src, table_b[i]);
    for (int l = 0; l < kL; ++l) saved[i][l] = views[l].BlockBytes(out_plan[i].src);
  }
  ASSERT_OK(api.kvp_kv_cache_swap_out(cache.get(), out_plan, n_out));
  for (int i = 0; i < n_out; ++i)
    for (int l = 0; l < kL; ++l) EXPECT_EQ(host_views[l].BlockBytes(out_plan[i].dst), saved[i][l]) << i;
  int32_t swapped = 0;
  ASSERT_OK(api.kvp_block_manager_is_swapped(bm.get(), kB, &swapped));
  EXPECT_EQ(swapped, 1);
  // Scribble over every device block no resident sequence holds.
  std::set<int32_t> resident;
  for (uint64_t s : {kA, kC})
    for (int32_t blk : BlockTable(bm.get(), s)) resident.insert(blk);
  for (int32_t blk = 0; blk < kNB; ++blk)
    if (!resident.count(blk))
      for (int l = 0; l < kL; ++l) views[l].FillBlock(blk, 0x5A);
  kvp_block_copy in_plan[kHostNB];
  int32_t n_in = -1;
  ASSERT_OK(api.kvp_block_manager_swap_in(bm.get(), kB, in_plan, kHostNB, &n_in));
  ASSERT_EQ(n_in, 4);
  ASSERT_OK(api.kvp_kv_cache_swap_in(cache.get(), in_plan, n_in));
  for (int i = 0; i < n_in; ++i) {
    EXPECT_EQ(in_plan[i].src, out_plan[i].dst);
    for (int l = 0; l < kL; ++l) EXPECT_EQ(views[l].BlockBytes(in_plan[i].dst), saved[i][l]) << i;
  }
  // The same step over B's new blocks gives the same outputs, bit for bit.
  ASSERT_OK(api.kvp_block_manager_block_tables(bm.get(), seqs.data(), 3, dense.data(), kMaxBlocks, seq_lens.data()));
  b.slot_mapping = nullptr;
  ASSERT_OK(api.kvp_plan_update(plan_dense.get(), &b));
  for (int l = 0; l < kL; ++l) {
    std::vector<float> out(kT * kQH * kD, std::nanf("")), lse(kT * kQH, std::nanf(""));
    Tensor ot(out.data(), kF32, {kT, kQH, kD}), lt(lse.data(), kF32, {kT, kQH});
    ASSERT_OK(api.kvp_attention_run(attn.get(), plan_dense.get(), cache.get(), l, qt.p(), ot.p(), lt.p()));
    EXPECT_EQ(std::memcmp(out.data(), result->out[l].data(), out.size() * 4), 0) << "layer " << l;
    EXPECT_EQ(std::memcmp(lse.data(), result->lse[l].data(), lse.size() * 4), 0) << "layer " << l;
  }
  for (uint64_t s : seqs) EXPECT_KVP(api.kvp_block_manager_free(bm.get(), s), KVP_OK);
  ASSERT_OK(api.kvp_block_manager_stats_get(bm.get(), &stats));
  EXPECT_EQ(stats.num_used_blocks, 0);
  EXPECT_EQ(stats.num_free_host_blocks, kHostNB);
}

TEST_F(Abi, EndToEndFloat32MatchesReference) {
  ScenarioResult r;
  RunScenario(KVP_DTYPE_FLOAT32, KVP_LAYOUT_KV_FIRST, false, &r);
}

TEST_F(Abi, EndToEndBfloat16CacheMatchesRoundedReference) {
  ScenarioResult r;
  RunScenario(KVP_DTYPE_BFLOAT16, KVP_LAYOUT_KV_FIRST, false, &r);
}

TEST_F(Abi, EndToEndCallerMemoryBlockFirstMatchesOwnedKvFirst) {
  ScenarioResult owned, external;
  RunScenario(KVP_DTYPE_FLOAT32, KVP_LAYOUT_KV_FIRST, false, &owned);
  RunScenario(KVP_DTYPE_FLOAT32, KVP_LAYOUT_BLOCK_FIRST, true, &external);
  for (int l = 0; l < kL; ++l) {
    ASSERT_EQ(owned.out[l].size(), external.out[l].size());
    ASSERT_FALSE(owned.out[l].empty());
    EXPECT_EQ(std::memcmp(owned.out[l].data(), external.out[l].data(), owned.out[l].size() * 4), 0) << "layer " << l;
    EXPECT_EQ(std::memcmp(owned.lse[l].data(), external.lse[l].data(), owned.lse[l].size() * 4), 0) << "layer " << l;
  }
}

TEST_F(Abi, EndToEndCallerMemoryBfloat16BlockFirst) {
  ScenarioResult r;
  RunScenario(KVP_DTYPE_BFLOAT16, KVP_LAYOUT_BLOCK_FIRST, true, &r);
}

}  // namespace
