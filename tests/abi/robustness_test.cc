// Regressions found by the fuzzers (tests/fuzz), through dlopen as every ABI test:
//  - a binary config at an address that is not 8-byte aligned was read in place by FlatBuffers with
//    misaligned loads (undefined behaviour: UBSan reports it, strict-alignment CPUs fault): it must
//    be accepted, and read correctly, wherever it lies;
//  - a DLTensor whose device_type holds a value that is no DLDeviceType enumerator (C callers may
//    store any int there) was loaded through the C++ enum type (undefined behaviour): it must be
//    refused as KVP_ERR_INVALID_ARGUMENT naming the value. The sanitizer build (UBSan) runs these.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "abi/abi_harness.h"

namespace {

class Robustness : public LoadedAbi {};

// {"backend_config_type": "DenseConfig", "backend_config": {"window_left": 7, "logits_soft_cap": 5.0}}
// as flatc -b writes it.
const uint8_t kDenseBinary[] = {
    0x10, 0x00, 0x00, 0x00, 0x4b, 0x56, 0x50, 0x43, 0x08, 0x00, 0x0c, 0x00, 0x07, 0x00, 0x08, 0x00,
    0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x0c, 0x00, 0x00, 0x00, 0x08, 0x00, 0x0c, 0x00,
    0x04, 0x00, 0x08, 0x00, 0x08, 0x00, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0xa0, 0x40};

TEST_F(Robustness, BinaryConfigAtAnyAlignmentIsAccepted) {
  alignas(16) uint8_t storage[sizeof kDenseBinary + 16];
  for (size_t offset = 0; offset < 16; ++offset) {
    std::memcpy(storage + offset, kDenseBinary, sizeof kDenseBinary);
    EXPECT_EQ(api.kvp_config_check("dense", KVP_CONFIG_BINARY, storage + offset, sizeof kDenseBinary), KVP_OK)
        << "offset " << offset << ": " << api.kvp_last_error();
    // A truncated copy is still refused, wherever it lies.
    EXPECT_EQ(api.kvp_config_check("dense", KVP_CONFIG_BINARY, storage + offset, sizeof kDenseBinary - 4),
              KVP_ERR_INVALID_CONFIG)
        << "offset " << offset;
  }
  // And the config's values come through: window_left=7 (only the last 8 keys are seen).
  std::memcpy(storage + 5, kDenseBinary, sizeof kDenseBinary);
  kvp_context* ctx = nullptr;
  ASSERT_EQ(api.kvp_context_create(nullptr, &ctx), KVP_OK);
  kvp_attention_options o{};
  o.struct_size = sizeof o;
  o.backend = "dense";
  o.num_q_heads = 1;
  o.num_kv_heads = 1;
  o.head_size = 32;
  o.kv_dtype = KVP_DTYPE_FLOAT32;
  o.config_format = KVP_CONFIG_BINARY;
  o.config = storage + 5;
  o.config_size = sizeof kDenseBinary;
  kvp_attention* attn = nullptr;
  EXPECT_EQ(api.kvp_attention_create(ctx, &o, &attn), KVP_OK) << api.kvp_last_error();
  api.kvp_attention_destroy(attn);
  api.kvp_context_destroy(ctx);
}

TEST_F(Robustness, DeviceTypeOutsideTheEnumIsRefused) {
  kvp_context_options co{};
  co.struct_size = sizeof co;
  co.num_threads = 1;
  kvp_context* ctx = nullptr;
  ASSERT_EQ(api.kvp_context_create(&co, &ctx), KVP_OK) << api.kvp_last_error();
  kvp_kv_cache_options o{};
  o.struct_size = sizeof o;
  o.num_layers = 1;
  o.num_blocks = 2;
  o.block_size = 2;
  o.num_kv_heads = 1;
  o.head_size = 8;
  o.dtype = KVP_DTYPE_FLOAT32;
  kvp_kv_cache* cache = nullptr;
  ASSERT_EQ(api.kvp_kv_cache_create(ctx, &o, &cache), KVP_OK) << api.kvp_last_error();
  std::vector<float> k(8, 1.0f);
  int64_t slot = 0;
  int64_t shape[3] = {1, 1, 8}, slot_shape[1] = {1};
  DLTensor kt{}, st{};
  kt.data = k.data();
  kt.ndim = 3;
  kt.shape = shape;
  kt.dtype = {kDLFloat, 32, 1};
  st.data = &slot;
  st.ndim = 1;
  st.shape = slot_shape;
  st.dtype = {kDLInt, 64, 1};
  st.device = {kDLCPU, 0};
  for (int32_t type : {99, -1, 0, 1000000, 2}) {
    const int32_t raw[2] = {type, 0};
    std::memcpy(&kt.device, raw, sizeof kt.device);  // as a C caller stores it
    EXPECT_EQ(api.kvp_kv_cache_write(cache, 0, &kt, &kt, &st), KVP_ERR_INVALID_ARGUMENT) << "device_type " << type;
    EXPECT_NE(std::string(api.kvp_last_error()).find("type=" + std::to_string(type)), std::string::npos)
        << api.kvp_last_error();
    std::memcpy(&st.device, raw, sizeof st.device);
    kt.device = {kDLCPU, 0};
    EXPECT_EQ(api.kvp_kv_cache_write(cache, 0, &kt, &kt, &st), KVP_ERR_INVALID_ARGUMENT) << "device_type " << type;
    st.device = {kDLCPU, 0};
  }
  EXPECT_EQ(api.kvp_kv_cache_write(cache, 0, &kt, &kt, &st), KVP_OK) << api.kvp_last_error();
  api.kvp_kv_cache_destroy(cache);
  api.kvp_context_destroy(ctx);
}

}  // namespace
