// The ABI 0.3 entry points, through dlopen as an engine uses them: kvp_backend_device_info_get,
// kvp_plan_attach, kvp_attention_run_v2 (out / lse / entropy), kvp_attention_merge_states and
// kvp_attention_state_bytes. Every bad input is driven to its exact status, its kvp_last_error()
// message is checked for the entry point and the offending argument or value, and every output the
// failed call could have touched is checked to still hold its sentinel. The happy paths are compared
// with double-precision references computed here (explicit softmax, explicit merge).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "abi/abi_harness.h"

namespace {

class AbiV03 : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(LoadLibrary());
    ASSERT_GE(api.kvp_abi_version(), 300u) << "the library is older than ABI 0.3";
  }
};

// ------------------------------------------------------------------------------------------------
// Tensors and handles
// ------------------------------------------------------------------------------------------------

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kSentinel = -7.0f;



Handle<kvp_kv_cache> MakeCache(const kvp_context* ctx, int32_t layers, int32_t blocks, int32_t block_size,
                               int32_t kv_heads, int32_t head_size) {
  kvp_kv_cache_options o{};
  o.struct_size = sizeof o;
  o.num_layers = layers;
  o.num_blocks = blocks;
  o.block_size = block_size;
  o.num_kv_heads = kv_heads;
  o.head_size = head_size;
  o.dtype = KVP_DTYPE_FLOAT32;
  o.layout = KVP_LAYOUT_KV_FIRST;
  o.num_host_blocks = 0;
  o.num_state_slots = 0;
  o.state_bytes_per_layer = 0;
  kvp_kv_cache* c = nullptr;
  EXPECT_KVP(api.kvp_kv_cache_create(ctx, &o, &c), KVP_OK);
  return Handle<kvp_kv_cache>(c);
}

Handle<kvp_attention> MakeAttention(const kvp_context* ctx, int32_t q_heads, int32_t kv_heads, int32_t head_size,
                                    const char* json_config = nullptr) {
  kvp_attention_options o{};
  o.struct_size = sizeof o;
  o.backend = "dense";
  o.num_q_heads = q_heads;
  o.num_kv_heads = kv_heads;
  o.head_size = head_size;
  o.kv_dtype = KVP_DTYPE_FLOAT32;
  o.sm_scale = 0.0f;
  o.config_format = json_config ? KVP_CONFIG_JSON : KVP_CONFIG_NONE;
  o.config = json_config;
  o.config_size = json_config ? std::strlen(json_config) : 0;
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

uint16_t ToBf16(float f) {  // round to nearest even
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

uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// Bit-for-bit equality of two float arrays, naming the first differing element.
::testing::AssertionResult BitwiseEqual(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return ::testing::AssertionFailure() << "sizes " << a.size() << " and " << b.size();
  for (size_t i = 0; i < a.size(); ++i)
    if (Bits(a[i]) != Bits(b[i]))
      return ::testing::AssertionFailure() << "element " << i << ": " << a[i] << " vs " << b[i];
  return ::testing::AssertionSuccess();
}

// Every element still holds `value` (a failed call must not have written it).
::testing::AssertionResult AllEqual(const std::vector<float>& v, float value) {
  for (size_t i = 0; i < v.size(); ++i)
    if (Bits(v[i]) != Bits(value))
      return ::testing::AssertionFailure() << "element " << i << " is " << v[i] << ", expected " << value;
  return ::testing::AssertionSuccess();
}

// ------------------------------------------------------------------------------------------------
// A small world: 3 sequences in one step (a 3-token prefill chunk, a decode, a first token), two
// layers of K/V written through kvp_kv_cache_write, and a double-precision reference.
// ------------------------------------------------------------------------------------------------

struct World {
  static constexpr int QH = 4, KH = 2, D = 32, BS = 4, NB = 6, L = 2;
  static constexpr int kSeqs = 3, T = 5;
  const std::vector<int32_t> seq_lens = {5, 7, 1};
  const std::vector<int32_t> qsl = {0, 3, 4, 5};
  static constexpr int kStride = 2;
  const std::vector<int32_t> table = {2, 0, /**/ 1, 3, /**/ 4, 5};  // seq 2 uses only block 4
  Handle<kvp_context> ctx;
  Handle<kvp_kv_cache> cache;
  Handle<kvp_attention> attn;
  Handle<kvp_plan> plan;
  std::vector<float> q;                                // [T][QH][D]
  std::vector<std::vector<std::vector<float>>> k, v;   // [layer][seq] -> [seq_len][KH][D]

  kvp_batch Batch() const {
    kvp_batch b{};
    b.struct_size = sizeof b;
    b.num_seqs = kSeqs;
    b.block_size = BS;
    b.query_start_loc = qsl.data();
    b.seq_lens = seq_lens.data();
    b.block_table = table.data();
    b.block_table_stride = kStride;
    return b;
  }

  void Init() {
    ctx = MakeContext();
    ASSERT_TRUE(ctx);
    cache = MakeCache(ctx.get(), L, NB, BS, KH, D);
    attn = MakeAttention(ctx.get(), QH, KH, D);
    plan = MakePlan(ctx.get(), 4, 8, 8);
    ASSERT_TRUE(cache && attn && plan);
    std::mt19937 rng(11);
    q = Random(static_cast<size_t>(T) * QH * D, rng, -2.0f, 2.0f);  // peaky enough to make entropies differ
    k.assign(L, {});
    v.assign(L, {});
    for (int l = 0; l < L; ++l)
      for (int b = 0; b < kSeqs; ++b) {
        const int n = seq_lens[b];
        k[l].push_back(Random(static_cast<size_t>(n) * KH * D, rng, -1.5f, 1.5f));
        v[l].push_back(Random(static_cast<size_t>(n) * KH * D, rng));
        std::vector<int64_t> slots(n);
        for (int p = 0; p < n; ++p) slots[p] = int64_t{table[b * kStride + p / BS]} * BS + p % BS;
        Tensor kt(k[l][b].data(), kF32, {n, KH, D}), vt(v[l][b].data(), kF32, {n, KH, D}),
            st(slots.data(), kI64, {n});
        ASSERT_OK(api.kvp_kv_cache_write(cache.get(), l, kt.p(), vt.p(), st.p()));
      }
    const kvp_batch b = Batch();
    ASSERT_OK(api.kvp_plan_update(plan.get(), &b));
  }

  // Explicit softmax in double: out [T][QH][D], lse and entropy (H = -sum a log a) [T][QH], and
  // the number of keys each row sees.
  void Reference(int layer, std::vector<double>* out, std::vector<double>* lse, std::vector<double>* ent,
                 std::vector<int>* keys) const {
    const double scale = 1.0f / std::sqrt(static_cast<float>(D));  // the library's default, in float
    const int group = QH / KH;
    out->assign(static_cast<size_t>(T) * QH * D, 0.0);
    lse->assign(static_cast<size_t>(T) * QH, 0.0);
    ent->assign(static_cast<size_t>(T) * QH, 0.0);
    keys->assign(static_cast<size_t>(T) * QH, 0);
    for (int b = 0; b < kSeqs; ++b) {
      const int q_len = qsl[b + 1] - qsl[b];
      for (int i = 0; i < q_len; ++i) {
        const int t = qsl[b] + i;
        const int pos = seq_lens[b] - q_len + i;
        for (int h = 0; h < QH; ++h) {
          const int g = h / group;
          std::vector<double> s(pos + 1);
          for (int j = 0; j <= pos; ++j) {
            double dot = 0;
            for (int x = 0; x < D; ++x)
              dot += double(q[(static_cast<size_t>(t) * QH + h) * D + x]) *
                     double(k[layer][b][(static_cast<size_t>(j) * KH + g) * D + x]);
            s[j] = dot * scale;
          }
          const double m = *std::max_element(s.begin(), s.end());
          double sum = 0;
          for (double x : s) sum += std::exp(x - m);
          double h_ent = 0;
          for (int j = 0; j <= pos; ++j) {
            const double a = std::exp(s[j] - m) / sum;
            if (a > 0) h_ent -= a * std::log(a);
            for (int x = 0; x < D; ++x)
              (*out)[(static_cast<size_t>(t) * QH + h) * D + x] +=
                  a * double(v[layer][b][(static_cast<size_t>(j) * KH + g) * D + x]);
          }
          (*lse)[static_cast<size_t>(t) * QH + h] = m + std::log(sum);
          (*ent)[static_cast<size_t>(t) * QH + h] = h_ent;
          (*keys)[static_cast<size_t>(t) * QH + h] = pos + 1;
        }
      }
    }
  }
};

// Output buffers of one run, pre-filled with the sentinel.
struct RunBufs {
  std::vector<float> out, lse, ent;
  std::unique_ptr<Tensor> ot, lt, et;
  RunBufs() {
    out.assign(static_cast<size_t>(World::T) * World::QH * World::D, kSentinel);
    lse.assign(static_cast<size_t>(World::T) * World::QH, kSentinel);
    ent.assign(static_cast<size_t>(World::T) * World::QH, kSentinel);
    ot = std::make_unique<Tensor>(out.data(), kF32, std::vector<int64_t>{World::T, World::QH, World::D});
    lt = std::make_unique<Tensor>(lse.data(), kF32, std::vector<int64_t>{World::T, World::QH});
    et = std::make_unique<Tensor>(ent.data(), kF32, std::vector<int64_t>{World::T, World::QH});
  }
  kvp_attention_outputs Outputs(bool with_lse, bool with_entropy) {
    kvp_attention_outputs o{};
    o.struct_size = sizeof o;
    o.out = ot->p();
    o.lse = with_lse ? lt->p() : nullptr;
    o.entropy = with_entropy ? et->p() : nullptr;
    return o;
  }
  ::testing::AssertionResult Untouched() const {
    if (auto r = AllEqual(out, kSentinel); !r) return r << " (out)";
    if (auto r = AllEqual(lse, kSentinel); !r) return r << " (lse)";
    if (auto r = AllEqual(ent, kSentinel); !r) return r << " (entropy)";
    return ::testing::AssertionSuccess();
  }
};

// ------------------------------------------------------------------------------------------------
// kvp_backend_device_info_get
// ------------------------------------------------------------------------------------------------

// A struct whose every byte past struct_size holds a sentinel pattern, to tell what a call wrote.
kvp_backend_device_info SentinelInfo(size_t struct_size) {
  kvp_backend_device_info info;
  std::memset(static_cast<void*>(&info), 0xA5, sizeof info);
  info.struct_size = struct_size;
  return info;
}

bool SameBytes(const kvp_backend_device_info& a, const kvp_backend_device_info& b) {
  return std::memcmp(&a, &b, sizeof a) == 0;
}

TEST_F(AbiV03, DeviceInfoRejectsBadArgumentsAndWritesNothing) {
  const kvp_backend_device_info before = SentinelInfo(sizeof(kvp_backend_device_info));
  kvp_backend_device_info info = before;

  EXPECT_KVP(api.kvp_backend_device_info_get(nullptr, kDLCPU, &info), KVP_ERR_INVALID_ARGUMENT, "name is NULL");
  EXPECT_KVP(api.kvp_backend_device_info_get("dense", kDLCPU, nullptr), KVP_ERR_INVALID_ARGUMENT,
             "out_info is NULL");
  EXPECT_KVP(api.kvp_backend_device_info_get("no_such_backend", kDLCPU, &info), KVP_ERR_NOT_FOUND,
             "no_such_backend");
  EXPECT_KVP(api.kvp_backend_device_info_get("", kDLCPU, &info), KVP_ERR_NOT_FOUND, "''");
  for (int32_t bad : {0, 7, -1, 3 /* kDLCUDAHost: not a device attention runs on */, 1 << 30}) {
    SCOPED_TRACE(bad);
    EXPECT_KVP(api.kvp_backend_device_info_get("dense", bad, &info), KVP_ERR_INVALID_ARGUMENT,
               "device_type=" + std::to_string(bad));
  }
  EXPECT_TRUE(SameBytes(info, before));

  for (size_t size : {size_t{0}, size_t{1}, sizeof(size_t) - 1}) {
    SCOPED_TRACE(size);
    kvp_backend_device_info small = SentinelInfo(size);
    const kvp_backend_device_info small_before = small;
    EXPECT_KVP(api.kvp_backend_device_info_get("dense", kDLCPU, &small), KVP_ERR_INVALID_ARGUMENT,
               "out_info", "struct_size=" + std::to_string(size));
    EXPECT_TRUE(SameBytes(small, small_before));
  }
  for (size_t size : {sizeof(kvp_backend_device_info) + 1, sizeof(kvp_backend_device_info) + 8, size_t{1} << 20}) {
    SCOPED_TRACE(size);
    // Only struct_size is read when it is too large: the rest of the struct is never touched.
    kvp_backend_device_info big = SentinelInfo(size);
    const kvp_backend_device_info big_before = big;
    EXPECT_KVP(api.kvp_backend_device_info_get("dense", kDLCPU, &big), KVP_ERR_NOT_SUPPORTED, "out_info",
               "struct_size=" + std::to_string(size));
    EXPECT_TRUE(SameBytes(big, big_before));
  }
}

TEST_F(AbiV03, DeviceInfoDescribesCpuDenseAndCudaAsBuilt) {
  kvp_backend_device_info cpu = SentinelInfo(sizeof(kvp_backend_device_info));
  EXPECT_KVP(api.kvp_backend_device_info_get("dense", kDLCPU, &cpu), KVP_OK);
  EXPECT_EQ(cpu.struct_size, sizeof(kvp_backend_device_info));
  EXPECT_EQ(cpu.device_type, kDLCPU);
  EXPECT_EQ(cpu.available, 1);
  EXPECT_TRUE(cpu.dtype_mask & (1u << KVP_DTYPE_FLOAT32));
  EXPECT_TRUE(cpu.dtype_mask & (1u << KVP_DTYPE_BFLOAT16));
  EXPECT_FALSE(cpu.dtype_mask & (1u << KVP_DTYPE_FP8_E4M3));  // fp8 caches are CUDA only
  ASSERT_GT(cpu.num_head_sizes, 0);
  ASSERT_NE(cpu.head_sizes, nullptr);
  EXPECT_NE(std::find(cpu.head_sizes, cpu.head_sizes + cpu.num_head_sizes, 128), cpu.head_sizes + cpu.num_head_sizes);
  EXPECT_NE(std::find(cpu.head_sizes, cpu.head_sizes + cpu.num_head_sizes, 32), cpu.head_sizes + cpu.num_head_sizes);
  EXPECT_EQ(cpu.supports_lse, 1);
  EXPECT_EQ(cpu.supports_entropy, 1);
  EXPECT_EQ(cpu.needs_state_slots, 0);
  EXPECT_EQ(cpu.experimental, 0);  // dense is stable

  // CUDA: available exactly when this is a CUDA build.
  const bool cuda_build = std::string(api.kvp_version_string()).find("(cuda)") != std::string::npos;
  kvp_backend_device_info cuda = SentinelInfo(sizeof(kvp_backend_device_info));
  EXPECT_KVP(api.kvp_backend_device_info_get("dense", kDLCUDA, &cuda), KVP_OK);
  EXPECT_EQ(cuda.device_type, kDLCUDA);
  EXPECT_EQ(cuda.available, cuda_build ? 1 : 0) << api.kvp_version_string();
  if (cuda.available) {
    EXPECT_NE(cuda.dtype_mask, 0u);
    EXPECT_GT(cuda.num_head_sizes, 0);
    EXPECT_NE(cuda.head_sizes, nullptr);
  } else {
    EXPECT_EQ(cuda.dtype_mask, 0u);
    EXPECT_EQ(cuda.num_head_sizes, 0);
  }

  // Agrees with the device-merged kvp_backend_info_get.
  kvp_backend_info merged{};
  merged.struct_size = sizeof merged;
  ASSERT_OK(api.kvp_backend_info_get("dense", &merged));
  EXPECT_EQ((merged.device_mask >> kDLCPU) & 1u, 1u);
  EXPECT_EQ(static_cast<int32_t>((merged.device_mask >> kDLCUDA) & 1u), cuda.available);
  EXPECT_EQ(merged.dtype_mask, cpu.dtype_mask | cuda.dtype_mask);
  EXPECT_EQ(merged.supports_lse, cpu.supports_lse);
  EXPECT_EQ(merged.needs_state_slots, cpu.needs_state_slots);

  // Every registered backend answers for both device types.
  int32_t count = 0;
  ASSERT_OK(api.kvp_backend_count(&count));
  for (int32_t i = 0; i < count; ++i) {
    const char* name = nullptr;
    ASSERT_OK(api.kvp_backend_name(i, &name));
    SCOPED_TRACE(name);
    for (int32_t dev : {int32_t{kDLCPU}, int32_t{kDLCUDA}}) {
      kvp_backend_device_info d{};
      d.struct_size = sizeof d;
      EXPECT_KVP(api.kvp_backend_device_info_get(name, dev, &d), KVP_OK);
      EXPECT_EQ(d.device_type, dev);
      EXPECT_TRUE(d.available == 0 || d.available == 1);
    }
  }
}

TEST_F(AbiV03, DeviceInfoAcceptsAnOlderShorterStructAndWritesOnlyItsPrefix) {
  kvp_backend_device_info full{};
  full.struct_size = sizeof full;
  ASSERT_OK(api.kvp_backend_device_info_get("dense", kDLCPU, &full));

  // An older caller whose struct ends at num_head_sizes.
  const size_t prefix = offsetof(kvp_backend_device_info, num_head_sizes) + sizeof(int32_t);
  kvp_backend_device_info old = SentinelInfo(prefix);
  const kvp_backend_device_info before = old;
  EXPECT_KVP(api.kvp_backend_device_info_get("dense", kDLCPU, &old), KVP_OK);
  EXPECT_EQ(old.struct_size, prefix);  // the caller's size is kept
  EXPECT_EQ(old.device_type, full.device_type);
  EXPECT_EQ(old.available, full.available);
  EXPECT_EQ(old.dtype_mask, full.dtype_mask);
  EXPECT_EQ(old.head_sizes, full.head_sizes);
  EXPECT_EQ(old.num_head_sizes, full.num_head_sizes);
  const auto* got = reinterpret_cast<const unsigned char*>(&old);
  const auto* was = reinterpret_cast<const unsigned char*>(&before);
  for (size_t i = prefix; i < sizeof old; ++i) EXPECT_EQ(got[i], was[i]) << "byte " << i << " past struct_size";

  // The smallest struct: struct_size alone. Nothing else is written.
  kvp_backend_device_info tiny = SentinelInfo(sizeof(size_t));
  const kvp_backend_device_info tiny_before = tiny;
  EXPECT_KVP(api.kvp_backend_device_info_get("dense", kDLCPU, &tiny), KVP_OK);
  EXPECT_TRUE(SameBytes(tiny, tiny_before));

  // One field short of the whole struct: all but `experimental`.
  const size_t all_but_last = offsetof(kvp_backend_device_info, experimental);
  kvp_backend_device_info most = SentinelInfo(all_but_last);
  EXPECT_KVP(api.kvp_backend_device_info_get("dense", kDLCPU, &most), KVP_OK);
  EXPECT_EQ(most.needs_state_slots, full.needs_state_slots);
  EXPECT_EQ(most.supports_entropy, full.supports_entropy);
  int32_t sentinel_field;
  std::memset(&sentinel_field, 0xA5, sizeof sentinel_field);
  EXPECT_EQ(most.experimental, sentinel_field);
}

// ------------------------------------------------------------------------------------------------
// kvp_attention_run_v2
// ------------------------------------------------------------------------------------------------

TEST_F(AbiV03, RunV2RejectsBadArgumentsAndWritesNothing) {
  World w;
  ASSERT_NO_FATAL_FAILURE(w.Init());
  const kvp_attention* at = w.attn.get();
  const kvp_plan* p = w.plan.get();
  const kvp_kv_cache* c = w.cache.get();
  Tensor qt(w.q.data(), kF32, {World::T, World::QH, World::D});
  const std::vector<float> q_before = w.q;
  RunBufs r;
  kvp_attention_outputs o = r.Outputs(true, true);

  // NULLs.
  EXPECT_KVP(api.kvp_attention_run_v2(nullptr, p, c, 0, qt.p(), &o), KVP_ERR_INVALID_ARGUMENT, "attention");
  EXPECT_KVP(api.kvp_attention_run_v2(at, nullptr, c, 0, qt.p(), &o), KVP_ERR_INVALID_ARGUMENT, "plan");
  EXPECT_KVP(api.kvp_attention_run_v2(at, p, nullptr, 0, qt.p(), &o), KVP_ERR_INVALID_ARGUMENT, "cache");
  EXPECT_KVP(api.kvp_attention_run_v2(at, p, c, 0, nullptr, &o), KVP_ERR_INVALID_ARGUMENT, "query is NULL");
  EXPECT_KVP(api.kvp_attention_run_v2(at, p, c, 0, qt.p(), nullptr), KVP_ERR_INVALID_ARGUMENT,
             "outputs is NULL");
  {
    kvp_attention_outputs no_out = o;
    no_out.out = nullptr;
    EXPECT_KVP(api.kvp_attention_run_v2(at, p, c, 0, qt.p(), &no_out), KVP_ERR_INVALID_ARGUMENT,
               "outputs->out is NULL");
  }
  // struct_size.
  for (size_t size : {size_t{0}, size_t{4}, sizeof(size_t) - 1}) {
    kvp_attention_outputs bad = o;
    bad.struct_size = size;
    EXPECT_KVP(api.kvp_attention_run_v2(at, p, c, 0, qt.p(), &bad), KVP_ERR_INVALID_ARGUMENT, "outputs",
               "struct_size=" + std::to_string(size));
  }
  for (size_t size : {sizeof(kvp_attention_outputs) + 8, size_t{4096}}) {
    kvp_attention_outputs bad = o;
    bad.struct_size = size;
    EXPECT_KVP(api.kvp_attention_run_v2(at, p, c, 0, qt.p(), &bad), KVP_ERR_NOT_SUPPORTED, "outputs",
               "struct_size=" + std::to_string(size));
  }
  EXPECT_KVP(api.kvp_attention_run_v2(at, p, c, 2, qt.p(), &o), KVP_ERR_OUT_OF_RANGE, "layer=2");

  // entropy: shape and dtype.
  {
    std::vector<float> big((World::T + 1) * World::QH, kSentinel);
    Tensor e_rows(big.data(), kF32, {World::T + 1, World::QH});
    Tensor e_heads(big.data(), kF32, {World::T, World::QH + 1});
    Tensor e_3d(big.data(), kF32, {World::T, World::QH, 1});
    std::vector<uint16_t> bf(World::T * World::QH, 0x5555);
    Tensor e_bf(bf.data(), kBF16, {World::T, World::QH});
    std::vector<int32_t> ints(World::T * World::QH, 77);
    Tensor e_int(ints.data(), kI32, {World::T, World::QH});
    kvp_attention_outputs bad = o;
    bad.entropy = e_rows.p();
    EXPECT_KVP(api.kvp_attention_run_v2(at, p, c, 0, qt.p(), &bad), KVP_ERR_INVALID_ARGUMENT, "entropy",
               "expected shape [5, 4]", "[6, 4]");
    bad.entropy = e_heads.p();
    EXPECT_KVP(api.kvp_attention_run_v2(at, p, c, 0, qt.p(), &bad), KVP_ERR_INVALID_ARGUMENT, "entropy",
               "expected shape [5, 4]", "[5, 5]");
    bad.entropy = e_3d.p();
    EXPECT_KVP(api.kvp_attention_run_v2(at, p, c, 0, qt.p(), &bad), KVP_ERR_INVALID_ARGUMENT, "entropy",
               "ndim=3, expected 2");
    bad.entropy = e_bf.p();
    EXPECT_KVP(api.kvp_attention_run_v2(at, p, c, 0, qt.p(), &bad), KVP_ERR_INVALID_ARGUMENT, "entropy",
               "float32", "bfloat16");
    bad.entropy = e_int.p();
    EXPECT_KVP(api.kvp_attention_run_v2(at, p, c, 0, qt.p(), &bad), KVP_ERR_INVALID_ARGUMENT, "entropy: dtype",
               "code=0, bits=32");
    EXPECT_TRUE(AllEqual(big, kSentinel));
    EXPECT_TRUE(std::all_of(bf.begin(), bf.end(), [](uint16_t x) { return x == 0x5555; }));
    EXPECT_TRUE(std::all_of(ints.begin(), ints.end(), [](int32_t x) { return x == 77; }));
  }

  // Writable tensors that overlap themselves: a token stride of 0 maps every token to one row.
  {
    Tensor out0(r.out.data(), kF32, {World::T, World::QH, World::D}, {0, World::D, 1});
    kvp_attention_outputs bad = o;
    bad.out = out0.p();
    EXPECT_KVP(api.kvp_attention_run_v2(at, p, c, 0, qt.p(), &bad), KVP_ERR_INVALID_ARGUMENT, "out",
               "strides [0, 32, 1]", "shape [5, 4, 32]", "overlap itself");
    // Heads interleaved over each other: head stride 16 < D.
    Tensor out_half(r.out.data(), kF32, {World::T, World::QH, World::D}, {World::QH * World::D, 16, 1});
    bad.out = out_half.p();
    EXPECT_KVP(api.kvp_attention_run_v2(at, p, c, 0, qt.p(), &bad), KVP_ERR_INVALID_ARGUMENT, "out",
               "strides [128, 16, 1]", "overlap itself");
    Tensor lse0(r.lse.data(), kF32, {World::T, World::QH}, {0, 1});
    bad = o;
    bad.lse = lse0.p();
    EXPECT_KVP(api.kvp_attention_run_v2(at, p, c, 0, qt.p(), &bad), KVP_ERR_INVALID_ARGUMENT, "lse",
               "strides [0, 1]", "overlap itself");
    Tensor ent0(r.ent.data(), kF32, {World::T, World::QH}, {1, 0});
    bad = o;
    bad.entropy = ent0.p();
    EXPECT_KVP(api.kvp_attention_run_v2(at, p, c, 0, qt.p(), &bad), KVP_ERR_INVALID_ARGUMENT, "entropy",
               "strides [1, 0]", "overlap itself");
  }

  // Writable tensors that overlap another argument.
  {
    Tensor lse_in_out(r.out.data() + 3, kF32, {World::T, World::QH});  // lse inside out's memory
    kvp_attention_outputs bad = o;
    bad.lse = lse_in_out.p();
    EXPECT_KVP(api.kvp_attention_run_v2(at, p, c, 0, qt.p(), &bad), KVP_ERR_INVALID_ARGUMENT, "lse", "overlaps",
               "out");
    Tensor lse_on_out(r.out.data(), kF32, {World::T, World::QH});  // same address exactly
    bad.lse = lse_on_out.p();
    EXPECT_KVP(api.kvp_attention_run_v2(at, p, c, 0, qt.p(), &bad), KVP_ERR_INVALID_ARGUMENT, "lse", "overlaps",
               "out");
    bad = o;
    bad.entropy = r.lt->p();  // entropy = lse
    EXPECT_KVP(api.kvp_attention_run_v2(at, p, c, 0, qt.p(), &bad), KVP_ERR_INVALID_ARGUMENT, "entropy",
               "overlaps", "lse");
    Tensor ent_in_out(r.out.data() + World::D, kF32, {World::T, World::QH});
    bad = o;
    bad.entropy = ent_in_out.p();
    EXPECT_KVP(api.kvp_attention_run_v2(at, p, c, 0, qt.p(), &bad), KVP_ERR_INVALID_ARGUMENT, "entropy",
               "overlaps", "out");
    // In place: out over the query.
    bad = o;
    Tensor out_on_q(w.q.data(), kF32, {World::T, World::QH, World::D});
    bad.out = out_on_q.p();
    EXPECT_KVP(api.kvp_attention_run_v2(at, p, c, 0, qt.p(), &bad), KVP_ERR_INVALID_ARGUMENT, "out", "overlaps",
               "query");
    Tensor lse_in_q(w.q.data() + 100, kF32, {World::T, World::QH});
    bad = o;
    bad.lse = lse_in_q.p();
    EXPECT_KVP(api.kvp_attention_run_v2(at, p, c, 0, qt.p(), &bad), KVP_ERR_INVALID_ARGUMENT, "lse", "overlaps",
               "query");
  }

  // out's own checks, through the struct.
  {
    std::vector<float> small(4 * World::QH * World::D, kSentinel);
    Tensor out4(small.data(), kF32, {4, World::QH, World::D});
    kvp_attention_outputs bad = o;
    bad.out = out4.p();
    EXPECT_KVP(api.kvp_attention_run_v2(at, p, c, 0, qt.p(), &bad), KVP_ERR_INVALID_ARGUMENT, "out",
               "expected shape [5, 4, 32]");
    EXPECT_TRUE(AllEqual(small, kSentinel));
  }

  // A plan from another context, and an empty plan.
  {
    auto other_ctx = MakeContext(1);
    auto other_plan = MakePlan(other_ctx.get(), 4, 8, 8);
    const kvp_batch b = w.Batch();
    ASSERT_OK(api.kvp_plan_update(other_plan.get(), &b));
    EXPECT_KVP(api.kvp_attention_run_v2(at, other_plan.get(), c, 0, qt.p(), &o), KVP_ERR_INVALID_ARGUMENT,
               "different contexts");
    auto empty_plan = MakePlan(w.ctx.get(), 4, 8, 8);
    EXPECT_KVP(api.kvp_attention_run_v2(at, empty_plan.get(), c, 0, qt.p(), &o), KVP_ERR_FAILED_PRECONDITION,
               "plan", "kvp_plan_update");
  }

  EXPECT_TRUE(r.Untouched());
  EXPECT_TRUE(BitwiseEqual(w.q, q_before));

  // The same struct, corrected, runs.
  EXPECT_KVP(api.kvp_attention_run_v2(at, p, c, 0, qt.p(), &o), KVP_OK);
  EXPECT_TRUE(std::isfinite(r.out[0]) && std::isfinite(r.lse[0]) && std::isfinite(r.ent[0]));
}

TEST_F(AbiV03, RunV2AcceptsAnOlderShorterOutputsStruct) {
  World w;
  ASSERT_NO_FATAL_FAILURE(w.Init());
  Tensor qt(w.q.data(), kF32, {World::T, World::QH, World::D});
  // A garbage pointer past struct_size: it must not be read.
  DLTensor* const garbage = reinterpret_cast<DLTensor*>(uintptr_t{0x10});
  RunBufs r;
  kvp_attention_outputs o = r.Outputs(true, false);
  o.entropy = garbage;
  o.struct_size = offsetof(kvp_attention_outputs, entropy);  // out and lse only
  EXPECT_KVP(api.kvp_attention_run_v2(w.attn.get(), w.plan.get(), w.cache.get(), 0, qt.p(), &o), KVP_OK);
  EXPECT_TRUE(AllEqual(r.ent, kSentinel));
  EXPECT_FALSE(AllEqual(r.lse, kSentinel));
  EXPECT_EQ(o.entropy, garbage);  // the caller's struct is not written

  RunBufs r2;
  kvp_attention_outputs o2 = r2.Outputs(false, false);
  o2.lse = garbage;
  o2.entropy = garbage;
  o2.struct_size = offsetof(kvp_attention_outputs, lse);  // out only
  EXPECT_KVP(api.kvp_attention_run_v2(w.attn.get(), w.plan.get(), w.cache.get(), 0, qt.p(), &o2), KVP_OK);
  EXPECT_TRUE(AllEqual(r2.lse, kSentinel));
  EXPECT_TRUE(AllEqual(r2.ent, kSentinel));
  EXPECT_TRUE(BitwiseEqual(r2.out, r.out));
}

TEST_F(AbiV03, RunV2EntropyMatchesAnExplicitSoftmax) {
  World w;
  ASSERT_NO_FATAL_FAILURE(w.Init());
  Tensor qt(w.q.data(), kF32, {World::T, World::QH, World::D});
  for (int layer = 0; layer < World::L; ++layer) {
    SCOPED_TRACE(layer);
    RunBufs r;
    kvp_attention_outputs o = r.Outputs(true, true);
    ASSERT_OK(api.kvp_attention_run_v2(w.attn.get(), w.plan.get(), w.cache.get(), layer, qt.p(), &o));
    std::vector<double> out, lse, ent;
    std::vector<int> keys;
    w.Reference(layer, &out, &lse, &ent, &keys);
    double max_h = 0;
    for (int t = 0; t < World::T; ++t)
      for (int h = 0; h < World::QH; ++h) {
        const size_t i = static_cast<size_t>(t) * World::QH + h;
        SCOPED_TRACE(testing::Message() << "token " << t << " head " << h << " keys " << keys[i]);
        const float e = r.ent[i];
        ASSERT_TRUE(std::isfinite(e));
        EXPECT_GE(e, 0.0f);
        // At most log(keys seen), the uniform distribution's; float rounding may reach 1e-6 past it.
        EXPECT_LE(e, std::log(static_cast<double>(keys[i])) + 1e-6);
        EXPECT_NEAR(e, ent[i], 1e-5);
        EXPECT_NEAR(r.lse[i], lse[i], 1e-5);
        for (int x = 0; x < World::D; ++x) EXPECT_NEAR(r.out[i * World::D + x], out[i * World::D + x], 1e-5);
        if (keys[i] == 1) {
          EXPECT_EQ(e, 0.0f);  // one key: all weight on it
        }
        max_h = std::max(max_h, ent[i]);
      }
    EXPECT_GT(max_h, 0.1);  // the batch is not degenerate

    // Entropy without lse: the same values.
    RunBufs r_e;
    kvp_attention_outputs oe = r_e.Outputs(false, true);
    ASSERT_OK(api.kvp_attention_run_v2(w.attn.get(), w.plan.get(), w.cache.get(), layer, qt.p(), &oe));
    EXPECT_TRUE(AllEqual(r_e.lse, kSentinel));
    for (size_t i = 0; i < r_e.ent.size(); ++i) EXPECT_NEAR(r_e.ent[i], r.ent[i], 1e-6) << i;
  }
}

TEST_F(AbiV03, RunV2WithOnlyOutEqualsRunBitForBit) {
  World w;
  ASSERT_NO_FATAL_FAILURE(w.Init());
  Tensor qt(w.q.data(), kF32, {World::T, World::QH, World::D});
  for (int layer = 0; layer < World::L; ++layer) {
    SCOPED_TRACE(layer);
    RunBufs v1, v2, v1l, v2l, v2e;
    ASSERT_OK(api.kvp_attention_run(w.attn.get(), w.plan.get(), w.cache.get(), layer, qt.p(), v1.ot->p(), nullptr));
    kvp_attention_outputs o = v2.Outputs(false, false);
    ASSERT_OK(api.kvp_attention_run_v2(w.attn.get(), w.plan.get(), w.cache.get(), layer, qt.p(), &o));
    EXPECT_TRUE(BitwiseEqual(v1.out, v2.out));
    EXPECT_TRUE(AllEqual(v2.lse, kSentinel));
    EXPECT_TRUE(AllEqual(v2.ent, kSentinel));

    // With lse too.
    ASSERT_OK(api.kvp_attention_run(w.attn.get(), w.plan.get(), w.cache.get(), layer, qt.p(), v1l.ot->p(),
                                    v1l.lt->p()));
    kvp_attention_outputs ol = v2l.Outputs(true, false);
    ASSERT_OK(api.kvp_attention_run_v2(w.attn.get(), w.plan.get(), w.cache.get(), layer, qt.p(), &ol));
    EXPECT_TRUE(BitwiseEqual(v1l.out, v2l.out));
    EXPECT_TRUE(BitwiseEqual(v1l.lse, v2l.lse));
    EXPECT_TRUE(BitwiseEqual(v1.out, v1l.out));

    // Asking for the entropy too changes neither out nor lse beyond float rounding.
    kvp_attention_outputs oe = v2e.Outputs(true, true);
    ASSERT_OK(api.kvp_attention_run_v2(w.attn.get(), w.plan.get(), w.cache.get(), layer, qt.p(), &oe));
    for (size_t i = 0; i < v2e.out.size(); ++i) EXPECT_NEAR(v2e.out[i], v1l.out[i], 1e-6) << i;
    for (size_t i = 0; i < v2e.lse.size(); ++i) EXPECT_NEAR(v2e.lse[i], v1l.lse[i], 1e-6) << i;
  }
}

// ------------------------------------------------------------------------------------------------
// kvp_attention_merge_states
// ------------------------------------------------------------------------------------------------

// Partial states [S, T, H, D] / [S, T, H] and merged outputs [T, H, D] / [T, H], float32, the outputs
// pre-filled with the sentinel.
struct MergeBufs {
  int S, T, H, D;
  std::vector<float> po, pl, pe, out, lse, ent;
  std::unique_ptr<Tensor> pot, plt, pet, ot, lt, et;
  MergeBufs(int s, int t, int h, int d, uint32_t seed = 5) : S(s), T(t), H(h), D(d) {
    std::mt19937 rng(seed);
    po = Random(static_cast<size_t>(S) * T * H * D, rng);
    pl = Random(static_cast<size_t>(S) * T * H, rng, -3.0f, 3.0f);
    pe = Random(static_cast<size_t>(S) * T * H, rng, 0.0f, 2.0f);
    out.assign(static_cast<size_t>(T) * H * D, kSentinel);
    lse.assign(static_cast<size_t>(T) * H, kSentinel);
    ent.assign(static_cast<size_t>(T) * H, kSentinel);
    pot = std::make_unique<Tensor>(po.data(), kF32, std::vector<int64_t>{S, T, H, D});
    plt = std::make_unique<Tensor>(pl.data(), kF32, std::vector<int64_t>{S, T, H});
    pet = std::make_unique<Tensor>(pe.data(), kF32, std::vector<int64_t>{S, T, H});
    ot = std::make_unique<Tensor>(out.data(), kF32, std::vector<int64_t>{T, H, D});
    lt = std::make_unique<Tensor>(lse.data(), kF32, std::vector<int64_t>{T, H});
    et = std::make_unique<Tensor>(ent.data(), kF32, std::vector<int64_t>{T, H});
  }
  kvp_merge_states_args Args(bool with_entropy = true) {
    kvp_merge_states_args a{};
    a.struct_size = sizeof a;
    a.partial_out = pot->p();
    a.partial_lse = plt->p();
    a.partial_entropy = with_entropy ? pet->p() : nullptr;
    a.out = ot->p();
    a.lse = lt->p();
    a.entropy = with_entropy ? et->p() : nullptr;
    return a;
  }
  size_t Row(int s, int t, int h) const { return (static_cast<size_t>(s) * T + t) * H + h; }
  size_t Row(int t, int h) const { return static_cast<size_t>(t) * H + h; }
  ::testing::AssertionResult Untouched() const {
    if (auto r = AllEqual(out, kSentinel); !r) return r << " (out)";
    if (auto r = AllEqual(lse, kSentinel); !r) return r << " (lse)";
    if (auto r = AllEqual(ent, kSentinel); !r) return r << " (entropy)";
    return ::testing::AssertionSuccess();
  }
  // The header's formulas in double.
  void Reference(std::vector<double>* r_out, std::vector<double>* r_lse, std::vector<double>* r_ent) const {
    r_out->assign(out.size(), 0.0);
    r_lse->assign(lse.size(), 0.0);
    r_ent->assign(ent.size(), 0.0);
    for (int t = 0; t < T; ++t)
      for (int h = 0; h < H; ++h) {
        double m = -std::numeric_limits<double>::infinity();
        for (int s = 0; s < S; ++s) m = std::max(m, double(pl[Row(s, t, h)]));
        double sum = 0, mean = 0;
        std::vector<double> acc(D, 0.0);
        if (std::isfinite(m))
          for (int s = 0; s < S; ++s) {
            const double l = pl[Row(s, t, h)];
            if (!std::isfinite(l)) continue;
            const double wgt = std::exp(l - m);
            sum += wgt;
            mean += wgt * (l - double(pe[Row(s, t, h)]));
            for (int x = 0; x < D; ++x) acc[x] += wgt * double(po[Row(s, t, h) * D + x]);
          }
        const double L = sum > 0 ? m + std::log(sum) : -std::numeric_limits<double>::infinity();
        for (int x = 0; x < D; ++x) (*r_out)[Row(t, h) * D + x] = sum > 0 ? acc[x] / sum : 0.0;
        (*r_lse)[Row(t, h)] = L;
        (*r_ent)[Row(t, h)] = sum > 0 ? L - mean / sum : 0.0;
      }
  }
};

TEST_F(AbiV03, MergeStatesRejectsBadArgumentsAndWritesNothing) {
  auto ctx = MakeContext();
  ASSERT_TRUE(ctx);
  const kvp_context* cx = ctx.get();
  MergeBufs m(2, 3, 4, 32);
  const std::vector<float> po0 = m.po, pl0 = m.pl, pe0 = m.pe;
  kvp_merge_states_args a = m.Args();

  // NULLs.
  EXPECT_KVP(api.kvp_attention_merge_states(nullptr, &a), KVP_ERR_INVALID_ARGUMENT, "context is NULL");
  EXPECT_KVP(api.kvp_attention_merge_states(cx, nullptr), KVP_ERR_INVALID_ARGUMENT, "args is NULL");
  {
    kvp_merge_states_args b = a;
    b.partial_out = nullptr;
    EXPECT_KVP(api.kvp_attention_merge_states(cx, &b), KVP_ERR_INVALID_ARGUMENT, "partial_out is NULL");
    b = a;
    b.partial_lse = nullptr;
    EXPECT_KVP(api.kvp_attention_merge_states(cx, &b), KVP_ERR_INVALID_ARGUMENT, "partial_lse is NULL");
    b = a;
    b.out = nullptr;
    EXPECT_KVP(api.kvp_attention_merge_states(cx, &b), KVP_ERR_INVALID_ARGUMENT, "out is NULL");
  }
  // struct_size.
  for (size_t size : {size_t{0}, size_t{3}, sizeof(size_t) - 1}) {
    kvp_merge_states_args b = a;
    b.struct_size = size;
    EXPECT_KVP(api.kvp_attention_merge_states(cx, &b), KVP_ERR_INVALID_ARGUMENT, "args",
               "struct_size=" + std::to_string(size));
  }
  for (size_t size : {sizeof(kvp_merge_states_args) + 8, size_t{1} << 16}) {
    kvp_merge_states_args b = a;
    b.struct_size = size;
    EXPECT_KVP(api.kvp_attention_merge_states(cx, &b), KVP_ERR_NOT_SUPPORTED, "args",
               "struct_size=" + std::to_string(size));
  }

  // Shapes: S, T, H, D each mismatched somewhere.
  std::vector<float> spare(4 * 4 * 5 * 33, kSentinel);
  auto expect_shape = [&](auto set, std::initializer_list<std::string_view> parts, const char* what) {
    SCOPED_TRACE(what);
    kvp_merge_states_args b = a;
    set(b);
    SetMarker();
    const kvp_status got = api.kvp_attention_merge_states(cx, &b);
    CheckStatus(got, KVP_ERR_INVALID_ARGUMENT, "api.kvp_attention_merge_states(cx, &b)", __FILE__, __LINE__,
                parts);
  };
  {
    Tensor pl_s(spare.data(), kF32, {3, 3, 4});
    Tensor pl_t(spare.data(), kF32, {2, 2, 4});
    Tensor pl_h(spare.data(), kF32, {2, 3, 5});
    Tensor o_t(spare.data(), kF32, {2, 4, 32});
    Tensor o_h(spare.data(), kF32, {3, 5, 32});
    Tensor o_d(spare.data(), kF32, {3, 4, 16});
    Tensor pe_s(spare.data(), kF32, {1, 3, 4});
    Tensor pe_h(spare.data(), kF32, {2, 3, 3});
    Tensor l_t(spare.data(), kF32, {4, 4});
    Tensor l_h(spare.data(), kF32, {3, 2});
    Tensor e_h(spare.data(), kF32, {3, 5});
    Tensor po_3d(m.po.data(), kF32, {2, 3, 128});
    Tensor pl_2d(m.pl.data(), kF32, {2, 12});
    expect_shape([&](auto& b) { b.partial_lse = pl_s.p(); }, {"partial_lse shape [3, 3, 4]", "S=2"}, "S");
    expect_shape([&](auto& b) { b.partial_lse = pl_t.p(); }, {"partial_lse shape [2, 2, 4]", "T=3"}, "T lse");
    expect_shape([&](auto& b) { b.partial_lse = pl_h.p(); }, {"partial_lse shape [2, 3, 5]", "H=4"}, "H lse");
    expect_shape([&](auto& b) { b.out = o_t.p(); }, {"out shape [2, 4, 32]", "T=3"}, "T out");
    expect_shape([&](auto& b) { b.out = o_h.p(); }, {"out shape [3, 5, 32]", "H=4"}, "H out");
    expect_shape([&](auto& b) { b.out = o_d.p(); }, {"out shape [3, 4, 16]", "D=32"}, "D out");
    expect_shape([&](auto& b) { b.partial_entropy = pe_s.p(); }, {"partial_entropy", "S=2"}, "S entropy");
    expect_shape([&](auto& b) { b.partial_entropy = pe_h.p(); }, {"partial_entropy", "H=4"}, "H entropy");
    expect_shape([&](auto& b) { b.lse = l_t.p(); }, {"lse", "T=3"}, "T merged lse");
    expect_shape([&](auto& b) { b.lse = l_h.p(); }, {"lse", "H=4"}, "H merged lse");
    expect_shape([&](auto& b) { b.entropy = e_h.p(); }, {"entropy", "H=4"}, "H merged entropy");
    expect_shape([&](auto& b) { b.partial_out = po_3d.p(); }, {"partial_out", "ndim=3, expected 4"}, "ndim po");
    expect_shape([&](auto& b) { b.partial_lse = pl_2d.p(); }, {"partial_lse", "ndim=2, expected 3"}, "ndim pl");
  }
  // dtypes: the lse tensors are float32 only.
  {
    std::vector<uint16_t> bf(2 * 3 * 4 * 32, 0x1234);
    Tensor pl_bf(bf.data(), kBF16, {2, 3, 4});
    Tensor pe_bf(bf.data(), kBF16, {2, 3, 4});
    Tensor l_bf(bf.data(), kBF16, {3, 4});
    Tensor e_bf(bf.data(), kBF16, {3, 4});
    std::vector<int32_t> ints(2 * 3 * 4, 9);
    Tensor pl_int(ints.data(), kI32, {2, 3, 4});
    expect_shape([&](auto& b) { b.partial_lse = pl_bf.p(); }, {"partial_lse", "float32"}, "partial_lse bf16");
    expect_shape([&](auto& b) { b.partial_lse = pl_int.p(); }, {"partial_lse: dtype", "code=0, bits=32"},
                 "partial_lse int32");
    expect_shape([&](auto& b) { b.partial_entropy = pe_bf.p(); }, {"partial_entropy", "float32"},
                 "partial_entropy bf16");
    expect_shape([&](auto& b) { b.lse = l_bf.p(); }, {"lse", "float32"}, "lse bf16");
    expect_shape([&](auto& b) { b.entropy = e_bf.p(); }, {"entropy", "float32"}, "entropy bf16");
    EXPECT_TRUE(std::all_of(bf.begin(), bf.end(), [](uint16_t x) { return x == 0x1234; }));
  }
  // Devices.
  {
    DLTensor cuda_po = *m.pot->p();
    cuda_po.device = DLDevice{kDLCUDA, 0};
    expect_shape([&](auto& b) { b.partial_out = &cuda_po; }, {"partial_out: device"}, "device");
  }
  // Entropy requested without partial entropies.
  expect_shape([&](auto& b) { b.partial_entropy = nullptr; }, {"entropy", "partial_entropy"}, "no partial_entropy");

  // Overlaps: an output over an input, an output over another output, an output over itself.
  {
    Tensor out_on_po(m.po.data(), kF32, {3, 4, 32});
    // partial_out and out in one buffer, out starting at partial_out's last element.
    std::vector<float> joint(m.po.size() + m.out.size(), kSentinel);
    std::copy(m.po.begin(), m.po.end(), joint.begin());
    const std::vector<float> joint0 = joint;
    Tensor po_joint(joint.data(), kF32, {2, 3, 4, 32});
    Tensor out_in_po(joint.data() + m.po.size() - 1, kF32, {3, 4, 32});
    std::vector<float> big(3 * 4 * 32 + 64, kSentinel);
    Tensor out_big(big.data(), kF32, {3, 4, 32});
    Tensor lse_in_out(big.data() + 7, kF32, {3, 4});
    Tensor ent_in_out(big.data() + 3 * 4 * 32 - 2, kF32, {3, 4});
    Tensor lse_on_pl(m.pl.data() + 12, kF32, {3, 4});
    Tensor ent_on_pe(m.pe.data(), kF32, {3, 4});
    Tensor lse_on_po(m.po.data() + 64, kF32, {3, 4});
    Tensor out_stride0(m.out.data(), kF32, {3, 4, 32}, {0, 32, 1});
    Tensor lse_stride0(m.lse.data(), kF32, {3, 4}, {4, 0});
    expect_shape([&](auto& b) { b.out = out_on_po.p(); }, {"out", "overlaps", "partial_out"}, "out = partial_out");
    expect_shape([&](auto& b) {
      b.partial_out = po_joint.p();
      b.out = out_in_po.p();
    }, {"out", "overlaps", "partial_out"}, "out sharing one element with partial_out");
    EXPECT_TRUE(BitwiseEqual(joint, joint0));
    expect_shape([&](auto& b) { b.lse = lse_on_pl.p(); }, {"lse", "overlaps", "partial_lse"}, "lse in partial_lse");
    expect_shape([&](auto& b) { b.lse = lse_on_po.p(); }, {"lse", "overlaps", "partial_out"}, "lse in partial_out");
    expect_shape([&](auto& b) { b.entropy = ent_on_pe.p(); }, {"entropy", "overlaps", "partial_entropy"},
                 "entropy = partial_entropy");
    expect_shape([&](auto& b) {
      b.out = out_big.p();
      b.lse = lse_in_out.p();
    }, {"lse", "overlaps", "out"}, "lse in out");
    expect_shape([&](auto& b) {
      b.out = out_big.p();
      b.entropy = ent_in_out.p();
    }, {"entropy", "overlaps", "out"}, "entropy in out");
    expect_shape([&](auto& b) { b.entropy = b.lse; }, {"entropy", "overlaps", "lse"}, "entropy = lse");
    expect_shape([&](auto& b) { b.out = out_stride0.p(); }, {"out", "strides [0, 32, 1]", "overlap itself"},
                 "out self-overlap");
    expect_shape([&](auto& b) { b.lse = lse_stride0.p(); }, {"lse", "strides [4, 0]", "overlap itself"},
                 "lse self-overlap");
    EXPECT_TRUE(AllEqual(big, kSentinel));
  }

  // No partials at all.
  {
    Tensor po_0(m.po.data(), kF32, {0, 3, 4, 32});
    Tensor pl_0(m.pl.data(), kF32, {0, 3, 4});
    Tensor pe_0(m.pe.data(), kF32, {0, 3, 4});
    expect_shape([&](auto& b) {
      b.partial_out = po_0.p();
      b.partial_lse = pl_0.p();
      b.partial_entropy = pe_0.p();
    }, {"partial_out", "0 partials"}, "S=0");
  }

  EXPECT_TRUE(m.Untouched());
  EXPECT_TRUE(BitwiseEqual(m.po, po0));
  EXPECT_TRUE(BitwiseEqual(m.pl, pl0));
  EXPECT_TRUE(BitwiseEqual(m.pe, pe0));

  // No tokens: nothing to do, nothing written.
  {
    Tensor po_t0(m.po.data(), kF32, {2, 0, 4, 32});
    Tensor pl_t0(m.pl.data(), kF32, {2, 0, 4});
    Tensor pe_t0(m.pe.data(), kF32, {2, 0, 4});
    Tensor o_t0(m.out.data(), kF32, {0, 4, 32});
    Tensor l_t0(m.lse.data(), kF32, {0, 4});
    Tensor e_t0(m.ent.data(), kF32, {0, 4});
    kvp_merge_states_args b{sizeof(kvp_merge_states_args), po_t0.p(), pl_t0.p(), pe_t0.p(), o_t0.p(), l_t0.p(),
                            e_t0.p()};
    EXPECT_KVP(api.kvp_attention_merge_states(cx, &b), KVP_OK);
    EXPECT_TRUE(m.Untouched());
  }

  // The arguments, corrected, merge.
  EXPECT_KVP(api.kvp_attention_merge_states(cx, &a), KVP_OK);
  EXPECT_FALSE(AllEqual(m.out, kSentinel));
}

TEST_F(AbiV03, MergeStatesAcceptsAnOlderShorterArgsStruct) {
  auto ctx = MakeContext();
  ASSERT_TRUE(ctx);
  MergeBufs m(2, 3, 4, 32);
  kvp_merge_states_args a = m.Args(false);
  const DLTensor* const garbage = reinterpret_cast<const DLTensor*>(uintptr_t{0x10});
  a.lse = const_cast<DLTensor*>(garbage);
  a.entropy = const_cast<DLTensor*>(garbage);
  a.struct_size = offsetof(kvp_merge_states_args, lse);  // no lse, no entropy
  EXPECT_KVP(api.kvp_attention_merge_states(ctx.get(), &a), KVP_OK);
  EXPECT_TRUE(AllEqual(m.lse, kSentinel));
  EXPECT_TRUE(AllEqual(m.ent, kSentinel));
  std::vector<double> r_out, r_lse, r_ent;
  m.Reference(&r_out, &r_lse, &r_ent);
  for (size_t i = 0; i < m.out.size(); ++i) EXPECT_NEAR(m.out[i], r_out[i], 1e-6) << i;
}

TEST_F(AbiV03, MergeStatesOfTwoPartialsMatchesADoubleReference) {
  auto ctx = MakeContext();
  ASSERT_TRUE(ctx);
  for (int S : {1, 2, 3}) {
    SCOPED_TRACE(testing::Message() << "S=" << S);
    MergeBufs m(S, 5, 4, 64, 100 + S);
    kvp_merge_states_args a = m.Args();
    ASSERT_OK(api.kvp_attention_merge_states(ctx.get(), &a));
    std::vector<double> r_out, r_lse, r_ent;
    m.Reference(&r_out, &r_lse, &r_ent);
    for (size_t i = 0; i < m.out.size(); ++i) ASSERT_NEAR(m.out[i], r_out[i], 1e-6) << i;
    for (size_t i = 0; i < m.lse.size(); ++i) ASSERT_NEAR(m.lse[i], r_lse[i], 1e-6) << i;
    for (size_t i = 0; i < m.ent.size(); ++i) ASSERT_NEAR(m.ent[i], r_ent[i], 1e-6) << i;
    if (S == 1) {  // one partial: itself
      EXPECT_TRUE(BitwiseEqual(m.out, m.po));
      EXPECT_TRUE(BitwiseEqual(m.lse, m.pl));
    }
  }

  // Strided inputs: partials laid out [T][S][H][D] in memory (as a split-KV kernel may write them),
  // outputs with a padded token stride.
  {
    const int S = 2, T = 3, H = 4, D = 32;
    MergeBufs m(S, T, H, D, 7);
    std::vector<float> po_t(m.po.size()), pl_t(m.pl.size()), pe_t(m.pe.size());
    for (int s = 0; s < S; ++s)
      for (int t = 0; t < T; ++t)
        for (int h = 0; h < H; ++h) {
          const size_t src = m.Row(s, t, h), dst = (static_cast<size_t>(t) * S + s) * H + h;
          pl_t[dst] = m.pl[src];
          pe_t[dst] = m.pe[src];
          for (int x = 0; x < D; ++x) po_t[dst * D + x] = m.po[src * D + x];
        }
    Tensor pot(po_t.data(), kF32, {S, T, H, D}, {H * D, S * H * D, D, 1});
    Tensor plt(pl_t.data(), kF32, {S, T, H}, {H, S * H, 1});
    Tensor pet(pe_t.data(), kF32, {S, T, H}, {H, S * H, 1});
    std::vector<float> out_pad(static_cast<size_t>(T) * (H * D + 8), kSentinel);
    Tensor ot(out_pad.data(), kF32, {T, H, D}, {H * D + 8, D, 1});
    kvp_merge_states_args a{};
    a.struct_size = sizeof a;
    a.partial_out = pot.p();
    a.partial_lse = plt.p();
    a.partial_entropy = pet.p();
    a.out = ot.p();
    a.lse = m.lt->p();
    a.entropy = m.et->p();
    ASSERT_OK(api.kvp_attention_merge_states(ctx.get(), &a));
    std::vector<double> r_out, r_lse, r_ent;
    m.Reference(&r_out, &r_lse, &r_ent);
    for (int t = 0; t < T; ++t) {
      for (int i = 0; i < H * D; ++i)
        EXPECT_NEAR(out_pad[static_cast<size_t>(t) * (H * D + 8) + i], r_out[static_cast<size_t>(t) * H * D + i], 1e-6);
      for (int i = H * D; i < H * D + 8; ++i) EXPECT_EQ(out_pad[static_cast<size_t>(t) * (H * D + 8) + i], kSentinel);
    }
    for (size_t i = 0; i < m.lse.size(); ++i) EXPECT_NEAR(m.lse[i], r_lse[i], 1e-6) << i;
    for (size_t i = 0; i < m.ent.size(); ++i) EXPECT_NEAR(m.ent[i], r_ent[i], 1e-6) << i;
  }

  // Partials whose head axis has stride 2 (every other float).
  {
    const int S = 2, T = 3, H = 2, D = 32;
    MergeBufs m(S, T, H, D, 9);
    std::vector<float> po2(2 * m.po.size(), 1e30f);
    for (size_t i = 0; i < m.po.size(); ++i) po2[2 * i] = m.po[i];
    Tensor pot(po2.data(), kF32, {S, T, H, D}, {2 * T * H * D, 2 * H * D, 2 * D, 2});
    kvp_merge_states_args a = m.Args();
    a.partial_out = pot.p();
    ASSERT_OK(api.kvp_attention_merge_states(ctx.get(), &a));
    std::vector<double> r_out, r_lse, r_ent;
    m.Reference(&r_out, &r_lse, &r_ent);
    for (size_t i = 0; i < m.out.size(); ++i) ASSERT_NEAR(m.out[i], r_out[i], 1e-6) << i;
  }

  // Mixed dtypes: bfloat16 partials into a float32 out, float32 partials into a bfloat16 out.
  {
    const int S = 2, T = 3, H = 4, D = 32;
    MergeBufs m(S, T, H, D, 13);
    std::vector<uint16_t> po_bf(m.po.size());
    for (size_t i = 0; i < po_bf.size(); ++i) {
      po_bf[i] = ToBf16(m.po[i]);
      m.po[i] = FromBf16(po_bf[i]);  // the reference reads what the tensor holds
    }
    Tensor pot(po_bf.data(), kBF16, {S, T, H, D});
    kvp_merge_states_args a = m.Args();
    a.partial_out = pot.p();
    ASSERT_OK(api.kvp_attention_merge_states(ctx.get(), &a));
    std::vector<double> r_out, r_lse, r_ent;
    m.Reference(&r_out, &r_lse, &r_ent);
    for (size_t i = 0; i < m.out.size(); ++i) ASSERT_NEAR(m.out[i], r_out[i], 1e-6) << i;

    MergeBufs f(S, T, H, D, 17);
    std::vector<uint16_t> out_bf(f.out.size(), 0x7777);
    Tensor ot(out_bf.data(), kBF16, {T, H, D});
    kvp_merge_states_args b = f.Args();
    b.out = ot.p();
    ASSERT_OK(api.kvp_attention_merge_states(ctx.get(), &b));
    f.Reference(&r_out, &r_lse, &r_ent);
    for (size_t i = 0; i < out_bf.size(); ++i)  // one bfloat16 rounding
      ASSERT_NEAR(FromBf16(out_bf[i]), r_out[i], std::fabs(r_out[i]) / 256 + 1e-7) << i;
    for (size_t i = 0; i < f.lse.size(); ++i) EXPECT_NEAR(f.lse[i], r_lse[i], 1e-6) << i;
  }
}

TEST_F(AbiV03, MergeStatesWithAnEmptyPartialYieldsTheOtherExactly) {
  auto ctx = MakeContext();
  ASSERT_TRUE(ctx);
  for (int empty : {0, 1}) {
    SCOPED_TRACE(testing::Message() << "empty partial " << empty);
    const int T = 3, H = 4, D = 32;
    MergeBufs m(2, T, H, D, 21 + empty);
    const int full = 1 - empty;
    for (int t = 0; t < T; ++t)
      for (int h = 0; h < H; ++h) {
        m.pl[m.Row(empty, t, h)] = -kInf;
        m.pe[m.Row(empty, t, h)] = 0.0f;
        // An empty partial's out is what a run writes for a row without keys (zeros); one row holds
        // other values: with weight 0 they must not matter.
        for (int x = 0; x < D; ++x) m.po[m.Row(empty, t, h) * D + x] = (t == 1) ? 123.0f : 0.0f;
      }
    kvp_merge_states_args a = m.Args();
    ASSERT_OK(api.kvp_attention_merge_states(ctx.get(), &a));
    for (int t = 0; t < T; ++t)
      for (int h = 0; h < H; ++h) {
        SCOPED_TRACE(testing::Message() << "t=" << t << " h=" << h);
        for (int x = 0; x < D; ++x)
          ASSERT_EQ(Bits(m.out[m.Row(t, h) * D + x]), Bits(m.po[m.Row(full, t, h) * D + x])) << "x=" << x;
        EXPECT_EQ(Bits(m.lse[m.Row(t, h)]), Bits(m.pl[m.Row(full, t, h)]));
        EXPECT_EQ(Bits(m.ent[m.Row(t, h)]), Bits(m.pe[m.Row(full, t, h)]));
      }
  }

  // bfloat16 partials into a bfloat16 out: also exact.
  {
    const int S = 2, T = 2, H = 2, D = 32;
    MergeBufs m(S, T, H, D, 31);
    std::vector<uint16_t> po_bf(m.po.size()), out_bf(static_cast<size_t>(T) * H * D, 0x7777);
    for (size_t i = 0; i < po_bf.size(); ++i) po_bf[i] = ToBf16(m.po[i]);
    for (int t = 0; t < T; ++t)
      for (int h = 0; h < H; ++h) m.pl[m.Row(0, t, h)] = -kInf;
    Tensor pot(po_bf.data(), kBF16, {S, T, H, D});
    Tensor ot(out_bf.data(), kBF16, {T, H, D});
    kvp_merge_states_args a = m.Args(false);
    a.partial_out = pot.p();
    a.out = ot.p();
    ASSERT_OK(api.kvp_attention_merge_states(ctx.get(), &a));
    for (int t = 0; t < T; ++t)
      for (int h = 0; h < H; ++h)
        for (int x = 0; x < D; ++x)
          ASSERT_EQ(out_bf[m.Row(t, h) * D + x], po_bf[m.Row(1, t, h) * D + x]) << t << " " << h << " " << x;
  }
}

TEST_F(AbiV03, MergeStatesWithAHugeLseGapIsFiniteAndEqualsTheDominantPartial) {
  auto ctx = MakeContext();
  ASSERT_TRUE(ctx);
  // Gaps of 200 nats (e^200 overflows float32), either partial dominant, around 0 and far from it.
  const std::pair<float, float> cases[] = {{100.0f, -100.0f}, {-100.0f, 100.0f}, {0.0f, -200.0f},
                                           {150.0f, -50.0f},  {-50.0f, 150.0f},  {1000.0f, 800.0f}};
  for (const auto& [l0, l1] : cases) {
    SCOPED_TRACE(testing::Message() << "lse " << l0 << ", " << l1);
    const int T = 2, H = 3, D = 32;
    MergeBufs m(2, T, H, D, 41);
    for (int t = 0; t < T; ++t)
      for (int h = 0; h < H; ++h) {
        m.pl[m.Row(0, t, h)] = l0;
        m.pl[m.Row(1, t, h)] = l1;
      }
    const int dom = l0 > l1 ? 0 : 1;
    kvp_merge_states_args a = m.Args();
    ASSERT_OK(api.kvp_attention_merge_states(ctx.get(), &a));
    for (int t = 0; t < T; ++t)
      for (int h = 0; h < H; ++h) {
        SCOPED_TRACE(testing::Message() << "t=" << t << " h=" << h);
        for (int x = 0; x < D; ++x) {
          const float got = m.out[m.Row(t, h) * D + x];
          ASSERT_TRUE(std::isfinite(got)) << x;
          // e^-200 relative to the dominant weight: far below float32 resolution.
          EXPECT_FLOAT_EQ(got, m.po[m.Row(dom, t, h) * D + x]) << x;
        }
        ASSERT_TRUE(std::isfinite(m.lse[m.Row(t, h)]));
        EXPECT_FLOAT_EQ(m.lse[m.Row(t, h)], m.pl[m.Row(dom, t, h)]);
        ASSERT_TRUE(std::isfinite(m.ent[m.Row(t, h)]));
        // The entropy is the dominant's, up to the float rounding of lse - (lse_i - H_i) at |lse| ~ 1000.
        EXPECT_NEAR(m.ent[m.Row(t, h)], m.pe[m.Row(dom, t, h)], 1e-4 * std::max(1.0f, std::fabs(l0)));
      }
  }
}

TEST_F(AbiV03, MergeStatesOfOnlyEmptyPartialsGivesZeroAndMinusInfinity) {
  auto ctx = MakeContext();
  ASSERT_TRUE(ctx);
  const int T = 2, H = 2, D = 32;
  MergeBufs m(3, T, H, D, 51);
  std::fill(m.pl.begin(), m.pl.end(), -kInf);
  std::fill(m.po.begin(), m.po.end(), 0.0f);
  std::fill(m.pe.begin(), m.pe.end(), 0.0f);
  kvp_merge_states_args a = m.Args();
  ASSERT_OK(api.kvp_attention_merge_states(ctx.get(), &a));
  for (float x : m.out) ASSERT_EQ(Bits(x), Bits(0.0f));
  for (float x : m.lse) EXPECT_EQ(x, -kInf);
  for (float x : m.ent) EXPECT_EQ(x, 0.0f);  // as a run writes for a row that saw no key
}

// Split KV end to end: the attention of one decode query over 8 keys equals the merge of its
// attentions over keys 0..3 and 4..7 (each computed by run_v2 straight into the partial buffers),
// plus an empty third partial; out, lse and entropy.
TEST_F(AbiV03, MergeOfSplitKvPartialsEqualsTheFullAttention) {
  constexpr int QH = 4, KH = 2, D = 64, BS = 4;
  auto ctx = MakeContext();
  ASSERT_TRUE(ctx);
  auto cache = MakeCache(ctx.get(), 1, 4, BS, KH, D);
  auto attn = MakeAttention(ctx.get(), QH, KH, D);
  ASSERT_TRUE(cache && attn);
  std::mt19937 rng(61);
  std::vector<float> k = Random(8 * KH * D, rng, -2.0f, 2.0f), v = Random(8 * KH * D, rng);
  std::vector<float> q = Random(QH * D, rng, -2.0f, 2.0f);
  std::vector<int64_t> slots(8);
  for (int p = 0; p < 8; ++p) slots[p] = (p < 4 ? 1 : 3) * BS + p % BS;  // blocks 1 and 3
  {
    Tensor kt(k.data(), kF32, {8, KH, D}), vt(v.data(), kF32, {8, KH, D}), st(slots.data(), kI64, {8});
    ASSERT_OK(api.kvp_kv_cache_write(cache.get(), 0, kt.p(), vt.p(), st.p()));
  }
  auto run = [&](std::vector<int32_t> table, int32_t seq_len, float* out, float* lse, float* ent) {
    auto plan = MakePlan(ctx.get(), 1, 1, 2);
    std::vector<int32_t> qsl = {0, 1}, lens = {seq_len};
    kvp_batch b{};
    b.struct_size = sizeof b;
    b.num_seqs = 1;
    b.block_size = BS;
    b.query_start_loc = qsl.data();
    b.seq_lens = lens.data();
    b.block_table = table.data();
    b.block_table_stride = static_cast<int32_t>(table.size());
    ASSERT_OK(api.kvp_plan_update(plan.get(), &b));
    Tensor qt(q.data(), kF32, {1, QH, D}), ot(out, kF32, {1, QH, D}), lt(lse, kF32, {1, QH}),
        et(ent, kF32, {1, QH});
    kvp_attention_outputs o{};
    o.struct_size = sizeof o;
    o.out = ot.p();
    o.lse = lt.p();
    o.entropy = et.p();
    ASSERT_OK(api.kvp_attention_run_v2(attn.get(), plan.get(), cache.get(), 0, qt.p(), &o));
  };
  std::vector<float> full_out(QH * D), full_lse(QH), full_ent(QH);
  ASSERT_NO_FATAL_FAILURE(run({1, 3}, 8, full_out.data(), full_lse.data(), full_ent.data()));
  const int S = 3;
  std::vector<float> po(S * QH * D, 0.0f), pl(S * QH, -kInf), pe(S * QH, 0.0f);  // partial 2 stays empty
  ASSERT_NO_FATAL_FAILURE(run({1}, 4, po.data(), pl.data(), pe.data()));
  ASSERT_NO_FATAL_FAILURE(run({3}, 4, po.data() + QH * D, pl.data() + QH, pe.data() + QH));
  std::vector<float> out(QH * D, kSentinel), lse(QH, kSentinel), ent(QH, kSentinel);
  Tensor pot(po.data(), kF32, {S, 1, QH, D}), plt(pl.data(), kF32, {S, 1, QH}), pet(pe.data(), kF32, {S, 1, QH});
  Tensor ot(out.data(), kF32, {1, QH, D}), lt(lse.data(), kF32, {1, QH}), et(ent.data(), kF32, {1, QH});
  kvp_merge_states_args a{};
  a.struct_size = sizeof a;
  a.partial_out = pot.p();
  a.partial_lse = plt.p();
  a.partial_entropy = pet.p();
  a.out = ot.p();
  a.lse = lt.p();
  a.entropy = et.p();
  ASSERT_OK(api.kvp_attention_merge_states(ctx.get(), &a));
  for (int i = 0; i < QH * D; ++i) EXPECT_NEAR(out[i], full_out[i], 1e-5) << i;
  for (int h = 0; h < QH; ++h) {
    EXPECT_NEAR(lse[h], full_lse[h], 1e-5) << h;
    EXPECT_NEAR(ent[h], full_ent[h], 1e-5) << h;
    EXPECT_GT(full_ent[h], 0.0f);
  }
}

// ------------------------------------------------------------------------------------------------
// kvp_plan_attach
// ------------------------------------------------------------------------------------------------

TEST_F(AbiV03, PlanAttachRejectsBadArgumentsAndChangesNothing) {
  World w;
  ASSERT_NO_FATAL_FAILURE(w.Init());
  Tensor qt(w.q.data(), kF32, {World::T, World::QH, World::D});
  RunBufs before;
  kvp_attention_outputs ob = before.Outputs(true, true);
  ASSERT_OK(api.kvp_attention_run_v2(w.attn.get(), w.plan.get(), w.cache.get(), 0, qt.p(), &ob));

  EXPECT_KVP(api.kvp_plan_attach(nullptr, w.attn.get()), KVP_ERR_INVALID_ARGUMENT, "plan");
  EXPECT_KVP(api.kvp_plan_attach(w.plan.get(), nullptr), KVP_ERR_INVALID_ARGUMENT, "attention");
  EXPECT_KVP(api.kvp_plan_attach(nullptr, nullptr), KVP_ERR_INVALID_ARGUMENT, "plan", "attention");

  // Handles of different contexts, both ways round.
  auto other_ctx = MakeContext(1);
  auto other_attn = MakeAttention(other_ctx.get(), World::QH, World::KH, World::D);
  auto other_plan = MakePlan(other_ctx.get(), 4, 8, 8);
  ASSERT_TRUE(other_attn && other_plan);
  EXPECT_KVP(api.kvp_plan_attach(w.plan.get(), other_attn.get()), KVP_ERR_INVALID_ARGUMENT, "different contexts");
  EXPECT_KVP(api.kvp_plan_attach(other_plan.get(), w.attn.get()), KVP_ERR_INVALID_ARGUMENT, "different contexts");

  // The plan still holds its batch and runs as before.
  RunBufs after;
  kvp_attention_outputs oa = after.Outputs(true, true);
  EXPECT_KVP(api.kvp_attention_run_v2(w.attn.get(), w.plan.get(), w.cache.get(), 0, qt.p(), &oa), KVP_OK);
  EXPECT_TRUE(BitwiseEqual(before.out, after.out));
  EXPECT_TRUE(BitwiseEqual(before.lse, after.lse));
  EXPECT_TRUE(BitwiseEqual(before.ent, after.ent));
}

TEST_F(AbiV03, PlanAttachIsIdempotentOutlivesTheAttentionAndChangesNoResult) {
  World w;
  ASSERT_NO_FATAL_FAILURE(w.Init());  // w.plan: never attached explicitly (attaches at its first run)
  Tensor qt(w.q.data(), kF32, {World::T, World::QH, World::D});
  const char* window = R"({"backend_config_type": "DenseConfig", "backend_config": {"window_left": 2}})";
  auto windowed = MakeAttention(w.ctx.get(), World::QH, World::KH, World::D, window);
  ASSERT_TRUE(windowed);

  // An attached plan: attach before its first batch, twice, then once more after it.
  auto attached = MakePlan(w.ctx.get(), 4, 8, 8);
  ASSERT_TRUE(attached);
  EXPECT_KVP(api.kvp_plan_attach(attached.get(), w.attn.get()), KVP_OK);
  EXPECT_KVP(api.kvp_plan_attach(attached.get(), w.attn.get()), KVP_OK);
  EXPECT_KVP(api.kvp_plan_attach(attached.get(), windowed.get()), KVP_OK);
  const kvp_batch b = w.Batch();
  ASSERT_OK(api.kvp_plan_update(attached.get(), &b));
  EXPECT_KVP(api.kvp_plan_attach(attached.get(), w.attn.get()), KVP_OK);

  // Attach attentions, destroy them, update: the plan keeps what it needs.
  {
    auto same_config = MakeAttention(w.ctx.get(), World::QH, World::KH, World::D);
    const char* other_window = R"({"backend_config_type": "DenseConfig", "backend_config": {"window_left": 1}})";
    auto own_planner = MakeAttention(w.ctx.get(), World::QH, World::KH, World::D, other_window);
    auto other_heads = MakeAttention(w.ctx.get(), 2 * World::QH, World::KH, World::D);
    ASSERT_TRUE(same_config && own_planner && other_heads);
    EXPECT_KVP(api.kvp_plan_attach(attached.get(), same_config.get()), KVP_OK);
    EXPECT_KVP(api.kvp_plan_attach(attached.get(), own_planner.get()), KVP_OK);
    EXPECT_KVP(api.kvp_plan_attach(attached.get(), other_heads.get()), KVP_OK);
  }  // all three destroyed here
  EXPECT_KVP(api.kvp_plan_update(attached.get(), &b), KVP_OK);
  EXPECT_KVP(api.kvp_plan_update(attached.get(), &b), KVP_OK);

  // Runs on the attached plan equal runs on the plan never attached, bit for bit.
  for (const kvp_attention* at : {static_cast<const kvp_attention*>(w.attn.get()),
                                  static_cast<const kvp_attention*>(windowed.get())}) {
    for (int layer = 0; layer < World::L; ++layer) {
      SCOPED_TRACE(testing::Message() << (at == w.attn.get() ? "causal" : "windowed") << " layer " << layer);
      RunBufs ra, rn;
      kvp_attention_outputs oa = ra.Outputs(true, true), on = rn.Outputs(true, true);
      EXPECT_KVP(api.kvp_attention_run_v2(at, attached.get(), w.cache.get(), layer, qt.p(), &oa), KVP_OK);
      EXPECT_KVP(api.kvp_attention_run_v2(at, w.plan.get(), w.cache.get(), layer, qt.p(), &on), KVP_OK);
      EXPECT_TRUE(BitwiseEqual(ra.out, rn.out));
      EXPECT_TRUE(BitwiseEqual(ra.lse, rn.lse));
      EXPECT_TRUE(BitwiseEqual(ra.ent, rn.ent));
    }
  }
  // The windowed run does differ from the causal one (the attached plan serves both key sets).
  RunBufs rc, rw;
  kvp_attention_outputs oc = rc.Outputs(false, false), ow = rw.Outputs(false, false);
  ASSERT_OK(api.kvp_attention_run_v2(w.attn.get(), attached.get(), w.cache.get(), 0, qt.p(), &oc));
  ASSERT_OK(api.kvp_attention_run_v2(windowed.get(), attached.get(), w.cache.get(), 0, qt.p(), &ow));
  EXPECT_FALSE(BitwiseEqual(rc.out, rw.out));

  // The causal run on the attached plan still equals the reference.
  std::vector<double> out, lse, ent;
  std::vector<int> keys;
  w.Reference(0, &out, &lse, &ent, &keys);
  for (size_t i = 0; i < out.size(); ++i) ASSERT_NEAR(rc.out[i], out[i], 1e-5) << i;

  // A new batch on the attached plan: the attached planners follow it.
  const std::vector<int32_t> lens2 = {6, 7, 2}, qsl2 = {0, 1, 2, 3};
  kvp_batch b2 = b;
  b2.seq_lens = lens2.data();
  b2.query_start_loc = qsl2.data();
  ASSERT_OK(api.kvp_plan_update(attached.get(), &b2));
  auto fresh = MakePlan(w.ctx.get(), 4, 8, 8);
  ASSERT_OK(api.kvp_plan_update(fresh.get(), &b2));
  std::vector<float> o1(3 * World::QH * World::D, kSentinel), o2(3 * World::QH * World::D, kSentinel);
  Tensor q3(w.q.data(), kF32, {3, World::QH, World::D}), t1(o1.data(), kF32, {3, World::QH, World::D}),
      t2(o2.data(), kF32, {3, World::QH, World::D});
  for (const kvp_attention* at : {static_cast<const kvp_attention*>(w.attn.get()),
                                  static_cast<const kvp_attention*>(windowed.get())}) {
    kvp_attention_outputs x1{sizeof(kvp_attention_outputs), t1.p(), nullptr, nullptr, nullptr};
    kvp_attention_outputs x2{sizeof(kvp_attention_outputs), t2.p(), nullptr, nullptr, nullptr};
    ASSERT_OK(api.kvp_attention_run_v2(at, attached.get(), w.cache.get(), 1, q3.p(), &x1));
    ASSERT_OK(api.kvp_attention_run_v2(at, fresh.get(), w.cache.get(), 1, q3.p(), &x2));
    EXPECT_TRUE(BitwiseEqual(o1, o2));
  }
}

// ------------------------------------------------------------------------------------------------
// kvp_attention_state_bytes
// ------------------------------------------------------------------------------------------------

TEST_F(AbiV03, StateBytesOfDenseIsZero) {
  auto ctx = MakeContext();
  ASSERT_TRUE(ctx);
  auto attn = MakeAttention(ctx.get(), 4, 2, 128);
  ASSERT_TRUE(attn);
  int64_t bytes = -12345;
  EXPECT_KVP(api.kvp_attention_state_bytes(nullptr, &bytes), KVP_ERR_INVALID_ARGUMENT, "attention");
  EXPECT_KVP(api.kvp_attention_state_bytes(attn.get(), nullptr), KVP_ERR_INVALID_ARGUMENT, "out_bytes_per_layer");
  EXPECT_EQ(bytes, -12345);
  EXPECT_KVP(api.kvp_attention_state_bytes(attn.get(), &bytes), KVP_OK);
  EXPECT_EQ(bytes, 0);
  // Agrees with the capabilities: dense needs no state slots.
  kvp_backend_device_info info{};
  info.struct_size = sizeof info;
  ASSERT_OK(api.kvp_backend_device_info_get("dense", kDLCPU, &info));
  EXPECT_EQ(info.needs_state_slots, 0);
}

}  // namespace
