#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "kvplug/kv_cache/kv_cache.h"

namespace kvplug::kv {
namespace {

KvCacheOptions Small(DType dt = DType::kF32, Layout layout = Layout::kKvFirst) {
  KvCacheOptions o;
  o.num_layers = 2;
  o.num_blocks = 6;
  o.block_size = 4;
  o.num_kv_heads = 2;
  o.head_size = 8;
  o.dtype = dt;
  o.layout = layout;
  o.num_host_blocks = 3;
  o.num_state_slots = 3;
  o.state_bytes_per_layer = 24;
  return o;
}

TensorView View3(void* data, DType dt, int64_t a, int64_t b, int64_t c) {
  TensorView v;
  v.data = data;
  v.dtype = dt;
  v.ndim = 3;
  v.shape = {a, b, c};
  v.strides = {b * c, c, 1};
  return v;
}

float ReadK(const KvCache& c, int layer, int64_t slot, int head, int i, int kv = 0) {
  const PagedLayer& l = c.layer(layer);
  return LoadAsFloat(l.Row(kv, slot / l.block_size, slot % l.block_size, head), l.dtype, i);
}

TEST(DType, HalfConversionsRoundTripAndRound) {
  for (float f : {0.0f, -0.0f, 1.0f, -2.5f, 65504.0f, 6.1035156e-05f, 5.9604645e-08f, 3.14159f}) {
    EXPECT_EQ(F16ToFloat(FloatToF16(f)), f == 3.14159f ? 3.140625f : f) << f;
  }
  EXPECT_TRUE(std::isinf(F16ToFloat(FloatToF16(1e6f))));
  EXPECT_TRUE(std::isnan(F16ToFloat(FloatToF16(std::nanf("")))));
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.0f)), 1.0f);
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.00390625f)), 1.0f);    // ties to even
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.01171875f)), 1.015625f);  // rounds up
  // Every f16 value survives f16 -> f32 -> f16.
  for (uint32_t h = 0; h < 0x10000; ++h) {
    if (((h >> 10) & 0x1f) == 0x1f && (h & 0x3ff)) continue;  // NaN payloads
    ASSERT_EQ(FloatToF16(F16ToFloat(static_cast<uint16_t>(h))), h) << h;
  }
}

TEST(KvCache, RejectsBadOptions) {
  auto o = Small();
  o.num_layers = 0;
  EXPECT_EQ(KvCache::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o = Small();
  o.block_size = -1;
  EXPECT_EQ(KvCache::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o = Small();
  o.layout = static_cast<Layout>(7);
  EXPECT_EQ(KvCache::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o = Small();
  o.num_blocks = 1 << 30;
  o.head_size = 1024;
  o.num_kv_heads = 1 << 20;
  EXPECT_FALSE(KvCache::Create(o).ok());
}

TEST(KvCache, WriteBySlotsEveryLayoutAndDtype) {
  for (Layout layout : {Layout::kKvFirst, Layout::kBlockFirst})
    for (DType dt : {DType::kF32, DType::kF16, DType::kBF16}) {
      auto cache = *KvCache::Create(Small(dt, layout));
      std::vector<float> k(3 * 2 * 8), v(k.size());
      for (size_t i = 0; i < k.size(); ++i) {
        k[i] = static_cast<float>(i) * 0.5f;
        v[i] = -static_cast<float>(i);
      }
      std::vector<int64_t> slots{5, -1, 23};
      ASSERT_TRUE(cache->Write(1, View3(k.data(), DType::kF32, 3, 2, 8), View3(v.data(), DType::kF32, 3, 2, 8), slots).ok());
      EXPECT_EQ(ReadK(*cache, 1, 5, 1, 3), k[1 * 8 + 3]);
      EXPECT_EQ(ReadK(*cache, 1, 23, 0, 7), k[2 * 16 + 7]);
      EXPECT_EQ(ReadK(*cache, 1, 23, 1, 2, 1), v[2 * 16 + 8 + 2]);
      EXPECT_EQ(ReadK(*cache, 0, 5, 1, 3), 0.0f);  // other layer untouched
    }
}

TEST(KvCache, BadSlotWritesNothing) {
  auto cache = *KvCache::Create(Small());
  std::vector<float> k(2 * 2 * 8, 1.0f);
  std::vector<int64_t> slots{0, 24};  // 24 = 6 blocks * 4: one past the end
  auto s = cache->Write(0, View3(k.data(), DType::kF32, 2, 2, 8), View3(k.data(), DType::kF32, 2, 2, 8), slots);
  EXPECT_EQ(s.code(), absl::StatusCode::kOutOfRange);
  EXPECT_NE(std::string(s.message()).find("24"), std::string::npos);
  EXPECT_EQ(ReadK(*cache, 0, 0, 0, 0), 0.0f);
  slots = {0, -2};
  EXPECT_FALSE(cache->Write(0, View3(k.data(), DType::kF32, 2, 2, 8), View3(k.data(), DType::kF32, 2, 2, 8), slots).ok());
  EXPECT_EQ(cache->Write(2, View3(k.data(), DType::kF32, 2, 2, 8), View3(k.data(), DType::kF32, 2, 2, 8), {0, 1}).code(),
            absl::StatusCode::kOutOfRange);
  // Shape disagreeing with the slots.
  EXPECT_EQ(cache->Write(0, View3(k.data(), DType::kF32, 1, 2, 8), View3(k.data(), DType::kF32, 1, 2, 8), {0, 1}).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(KvCache, CopyAndSwapRoundTripBitExact) {
  for (Layout layout : {Layout::kKvFirst, Layout::kBlockFirst}) {
    auto cache = *KvCache::Create(Small(DType::kBF16, layout));
    std::mt19937 rng(5);
    std::vector<float> k(24 * 2 * 8), v(k.size());
    for (auto& x : k) x = static_cast<float>(rng() % 1000) / 7.0f;
    for (auto& x : v) x = static_cast<float>(rng() % 1000) / 3.0f;
    std::vector<int64_t> slots(24);
    for (int i = 0; i < 24; ++i) slots[i] = i;
    for (int l = 0; l < 2; ++l)
      ASSERT_TRUE(cache->Write(l, View3(k.data(), DType::kF32, 24, 2, 8), View3(v.data(), DType::kF32, 24, 2, 8), slots).ok());
    auto snapshot = [&](int block) {
      std::vector<float> out;
      for (int l = 0; l < 2; ++l)
        for (int kv = 0; kv < 2; ++kv)
          for (int p = 0; p < 4; ++p)
            for (int h = 0; h < 2; ++h)
              for (int i = 0; i < 8; ++i) out.push_back(ReadK(*cache, l, block * 4 + p, h, i, kv));
      return out;
    };
    const auto b1 = snapshot(1), b4 = snapshot(4);
    ASSERT_TRUE(cache->SwapOut({{1, 0}, {4, 2}}).ok());
    // Overwrite the device blocks, then bring them back elsewhere.
    ASSERT_TRUE(cache->CopyBlocks({{0, 1}, {0, 4}}).ok());
    EXPECT_NE(snapshot(1), b1);
    ASSERT_TRUE(cache->SwapIn({{0, 5}, {2, 3}}).ok());
    EXPECT_EQ(snapshot(5), b1);
    EXPECT_EQ(snapshot(3), b4);
    EXPECT_EQ(cache->SwapOut({{6, 0}}).code(), absl::StatusCode::kOutOfRange);
    EXPECT_EQ(cache->SwapIn({{3, 0}}).code(), absl::StatusCode::kOutOfRange);
    EXPECT_EQ(cache->CopyBlocks({{0, 1}, {-1, 2}}).code(), absl::StatusCode::kOutOfRange);
    EXPECT_EQ(snapshot(1), snapshot(0));  // the failed batch moved nothing (block 1 still a copy of 0)
  }
}

TEST(KvCache, StateSlots) {
  auto cache = *KvCache::Create(Small());
  auto s = *cache->State(1, 2);
  ASSERT_EQ(s.size(), 24u);
  for (size_t i = 0; i < s.size(); ++i) s[i] = static_cast<uint8_t>(i + 1);
  ASSERT_TRUE(cache->CopyState(2, 0).ok());
  auto d = *cache->State(1, 0);
  EXPECT_EQ(std::memcmp(d.data(), s.data(), 24), 0);
  EXPECT_EQ((*cache->State(0, 0))[0], 0);  // layer 0's slot 0 was copied from layer 0's slot 2: zero
  EXPECT_EQ(cache->State(2, 0).status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(cache->State(0, 3).status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(cache->CopyState(0, -1).code(), absl::StatusCode::kOutOfRange);
}

}  // namespace
}  // namespace kvplug::kv
