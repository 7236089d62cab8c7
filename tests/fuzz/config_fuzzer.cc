// Fuzzes backend config parsing, binary (FlatBuffers, verified) and JSON (parsed against the schema
// built into the library), through kvp_config_check and kvp_attention_create.
//
// Input: byte 0 picks the format (mostly BINARY/JSON, sometimes NONE or an invalid value), the
// backend name and the config's alignment (odd, or an exact-size aligned copy); the rest is the
// config, passed with its exact size (its buffer is exactly that long, so a read past config_size is
// an ASan report; JSON need not be NUL-terminated).
// Checked: only the documented statuses come back, every failure leaves a message naming the entry
// point, kvp_attention_create agrees with kvp_config_check (but for checks that need the head shape),
// a created dense, star, entropy or attamba attention runs on a small
// batch (so config values such as window_left and logits_soft_cap reach the kernel), and its
// outputs are finite.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "fuzz_input.h"
#include "kvplug/kvplug.h"

namespace {

using kvplug::fuzz::Input;

constexpr int32_t kQH = 2, kKH = 1, kD = 32, kBS = 4, kTokens = 3;

struct Fixture {
  kvp_context* ctx = nullptr;
  kvp_kv_cache* cache = nullptr;
  kvp_plan* plan = nullptr;
  std::vector<float> q, out;
  int64_t q_shape[3] = {kTokens, kQH, kD};
  DLTensor qt{}, ot{};

  Fixture() {
    kvp_context_options co{};
    co.struct_size = sizeof co;
    co.num_threads = 1;
    FUZZ_CHECK(kvp_context_create(&co, &ctx) == KVP_OK);
    kvp_kv_cache_options o{};
    o.struct_size = sizeof o;
    o.num_layers = 1;
    o.num_blocks = 4;
    o.block_size = kBS;
    o.num_kv_heads = kKH;
    o.head_size = kD;
    o.dtype = KVP_DTYPE_FLOAT32;
    FUZZ_CHECK(kvp_kv_cache_create(ctx, &o, &cache) == KVP_OK);
    // K/V of 6 positions in blocks 2 and 0.
    std::vector<float> k(6 * kKH * kD), v(k.size());
    for (size_t i = 0; i < k.size(); ++i) {
      k[i] = std::sin(0.37f * i);
      v[i] = std::cos(0.11f * i);
    }
    std::vector<int64_t> slots = {8, 9, 10, 11, 0, 1};
    int64_t kv_shape[3] = {6, kKH, kD}, slot_shape[1] = {6};
    DLTensor kt = Tensor(k.data(), {kDLFloat, 32, 1}, kv_shape, 3), vt = Tensor(v.data(), {kDLFloat, 32, 1}, kv_shape, 3);
    DLTensor st = Tensor(slots.data(), {kDLInt, 64, 1}, slot_shape, 1);
    FUZZ_CHECK(kvp_kv_cache_write(cache, 0, &kt, &vt, &st) == KVP_OK);
    kvp_plan_options po{};
    po.struct_size = sizeof po;
    po.max_num_seqs = 2;
    po.max_num_tokens = 8;
    po.max_num_blocks = 8;
    FUZZ_CHECK(kvp_plan_create(ctx, &po, &plan) == KVP_OK);
    static const int32_t qsl[3] = {0, 2, 3}, lens[2] = {6, 6}, table[4] = {2, 0, 2, 0};
    kvp_batch b{};
    b.struct_size = sizeof b;
    b.num_seqs = 2;
    b.block_size = kBS;
    b.query_start_loc = qsl;
    b.seq_lens = lens;
    b.block_table = table;
    b.block_table_stride = 2;
    FUZZ_CHECK(kvp_plan_update(plan, &b) == KVP_OK);
    q.resize(kTokens * kQH * kD);
    out.resize(q.size());
    for (size_t i = 0; i < q.size(); ++i) q[i] = std::sin(1.3f * i);
    qt = Tensor(q.data(), {kDLFloat, 32, 1}, q_shape, 3);
    ot = Tensor(out.data(), {kDLFloat, 32, 1}, q_shape, 3);
  }

  static DLTensor Tensor(void* data, DLDataType dt, int64_t* shape, int32_t ndim) {
    DLTensor t{};
    t.data = data;
    t.device = {kDLCPU, 0};
    t.ndim = ndim;
    t.dtype = dt;
    t.shape = shape;
    return t;
  }
};

bool Known(kvp_status s) {
  return s == KVP_OK || s == KVP_ERR_INVALID_ARGUMENT || s == KVP_ERR_INVALID_CONFIG || s == KVP_ERR_NOT_FOUND;
}

bool MessageNames(const char* function) {
  const std::string m = kvp_last_error();
  return m.rfind(std::string(function) + ":", 0) == 0;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Fixture* fx = new Fixture();  // once per process; never destroyed (libFuzzer exits hard)
  if (size < 1) return 0;
  const uint8_t sel = data[0];
  const uint8_t* config = data + 1;
  const size_t config_size = size - 1;
  // Formats: NONE, BINARY, JSON, JSON, and now and then a value that is not a format.
  static const int32_t kFormats[8] = {KVP_CONFIG_BINARY, KVP_CONFIG_JSON, KVP_CONFIG_BINARY, KVP_CONFIG_JSON,
                                      KVP_CONFIG_BINARY, KVP_CONFIG_JSON, KVP_CONFIG_NONE,   -1};
  int32_t format = kFormats[sel & 7];
  if (format == -1) format = static_cast<int8_t>(sel) >> 3;  // -16..15
  // Bits 3-5 pick the backend (bit 6 below still picks the alignment: the two overlap on purpose).
  static const char* kBackends[8] = {"dense", "attamba", "star", "entropy", "kv_shift", "dense", "star",
                                     "no_such_backend"};
  const char* backend = kBackends[(sel >> 3) & 7];
  // Bit 6: the config at an 8-byte aligned address (an exact-size copy) rather than at an odd one.
  std::unique_ptr<uint8_t[]> copy;
  if (sel & 0x40) {
    copy.reset(new uint8_t[config_size]);
    std::memcpy(copy.get(), config, config_size);
    config = copy.get();
  }
  const void* ptr = (sel & 0x80) && config_size == 0 ? nullptr : config;

  const kvp_status check = kvp_config_check(backend, format, ptr, config_size);
  FUZZ_CHECK(Known(check));
  if (check != KVP_OK) FUZZ_CHECK(MessageNames("kvp_config_check"));

  if (std::strcmp(backend, "no_such_backend") == 0) return 0;
  // Checks that need the head shape happen at creation only: entropy's table length, kv_shift's
  // coefficient count and RoPE dimension.
  const bool shape_checked = std::strcmp(backend, "entropy") == 0 || std::strcmp(backend, "kv_shift") == 0;
  kvp_attention_options o{};
  o.struct_size = sizeof o;
  o.backend = backend;
  o.num_q_heads = kQH;
  o.num_kv_heads = kKH;
  o.head_size = kD;
  o.kv_dtype = KVP_DTYPE_FLOAT32;
  o.config_format = format;
  o.config = ptr;
  o.config_size = config_size;
  kvp_attention* attn = nullptr;
  const kvp_status created = kvp_attention_create(fx->ctx, &o, &attn);
  // The same parser and checks: the same verdict, except for the head-shape checks above.
  FUZZ_CHECK(created == check || (check == KVP_OK && shape_checked && created == KVP_ERR_INVALID_ARGUMENT));
  if (created != KVP_OK) {
    FUZZ_CHECK(attn == nullptr);
    FUZZ_CHECK(MessageNames("kvp_attention_create"));
    return 0;
  }
  if (std::strcmp(backend, "kv_shift") != 0) {  // kv_shift needs state slots the fixture's cache lacks
    const kvp_status run = kvp_attention_run(attn, fx->plan, fx->cache, 0, &fx->qt, &fx->ot, nullptr);
    // Star with shards and attamba need query_pos_starts, which the fixture's batch does not give.
    FUZZ_CHECK(run == KVP_OK || ((std::strcmp(backend, "star") == 0 || std::strcmp(backend, "attamba") == 0) &&
                                 run == KVP_ERR_INVALID_ARGUMENT));
    if (run == KVP_OK)
      for (float x : fx->out) FUZZ_CHECK(std::isfinite(x));
  }
  kvp_attention_destroy(attn);
  return 0;
}
