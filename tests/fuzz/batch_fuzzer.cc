// Fuzzes batch descriptions with the phase markers of ABI 0.4 (kvp_batch.context_lens and
// query_pos_starts) against the Star planner (random block, anchor, shard count, rank and
// appending shard), the Attamba planner (random chunk size, window, layers, offsets; often the batch
// kvp_attention_cache_layout describes) and dense: arbitrary sequence lengths, query lengths, page lists, context
// lengths and query positions. A batch kvp_plan_update accepts must then run, read only the
// cache's pages (ASan) and give finite outputs; a row that saw no key is zeros with lse -inf. Then
// in-process communicator calls with fuzzed options and ranks on those outputs.
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "fuzz_input.h"
#include "kvplug/kvplug.h"

namespace {

using kvplug::fuzz::Input;

constexpr int32_t kBlocks = 16, kBS = 4, kKH = 2, kQH = 4, kD = 32, kMaxSeqs = 4, kMaxTokens = 24;
constexpr DLDataType kF32{kDLFloat, 32, 1};

struct Fixture {
  kvp_context* ctx = nullptr;
  kvp_kv_cache* cache = nullptr;
  kvp_plan* plan = nullptr;
  Fixture() {
    kvp_context_options co{};
    co.struct_size = sizeof co;
    co.num_threads = 1;
    FUZZ_CHECK(kvp_context_create(&co, &ctx) == KVP_OK);
    kvp_kv_cache_options o{};
    o.struct_size = sizeof o;
    o.num_layers = 1;
    o.num_blocks = kBlocks;
    o.block_size = kBS;
    o.num_kv_heads = kKH;
    o.head_size = kD;
    o.dtype = KVP_DTYPE_FLOAT32;
    FUZZ_CHECK(kvp_kv_cache_create(ctx, &o, &cache) == KVP_OK);
    // Pages filled with small values so every logit is finite.
    std::vector<float> k(size_t(kBlocks) * kBS * kKH * kD), v(k.size());
    for (size_t i = 0; i < k.size(); ++i) k[i] = float(int(i % 13) - 6) / 8, v[i] = float(int(i % 7) - 3) / 4;
    std::vector<int64_t> slots(size_t(kBlocks) * kBS);
    for (size_t i = 0; i < slots.size(); ++i) slots[i] = int64_t(i);
    int64_t kv_shape[3] = {kBlocks * kBS, kKH, kD}, slot_shape[1] = {kBlocks * kBS};
    DLTensor kt{k.data(), {kDLCPU, 0}, 3, kF32, kv_shape, nullptr, 0};
    DLTensor vt{v.data(), {kDLCPU, 0}, 3, kF32, kv_shape, nullptr, 0};
    DLTensor st{slots.data(), {kDLCPU, 0}, 1, {kDLInt, 64, 1}, slot_shape, nullptr, 0};
    FUZZ_CHECK(kvp_kv_cache_write(cache, 0, &kt, &vt, &st) == KVP_OK);
    kvp_plan_options po{sizeof po, kMaxSeqs, kMaxTokens, 64};
    FUZZ_CHECK(kvp_plan_create(ctx, &po, &plan) == KVP_OK);
  }
};

int32_t Small(Input& in, int32_t lo, int32_t hi) { return lo + int32_t(in.Below(uint32_t(hi - lo + 1))); }

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Fixture f;
  Input in(data, size);
  // The attention: star or attamba with a fuzzed config, or dense.
  std::string config;
  const uint32_t kind = in.Below(6);
  const bool star = kind >= 1 && kind <= 3, attamba = kind >= 4;
  if (attamba) {
    const int32_t layers = Small(in, 0, 5);
    config = "{\"backend_config_type\": \"AttambaConfig\", \"backend_config\": {\"chunk_size\": " +
             std::to_string(Small(in, 0, 20)) + ", \"window\": " + std::to_string(Small(in, -1, 20)) +
             ", \"num_layers\": " + std::to_string(layers) + ", \"layer_index\": " +
             std::to_string(Small(in, -1, layers)) + ", \"chunk_offsets\": " + std::to_string(Small(in, 0, 2)) + "}}";
  }
  if (star) {
    const int32_t block = Small(in, 1, 40), anchor = Small(in, 0, block + 1), shards = Small(in, 1, 4);
    const int32_t rank = Small(in, -1, shards), append = Small(in, -2, shards);
    config = "{\"backend_config_type\": \"StarConfig\", \"backend_config\": {\"context_block_size\": " +
             std::to_string(block) + ", \"anchor_block_size\": " + std::to_string(anchor) +
             ", \"num_shards\": " + std::to_string(shards) + ", \"shard_rank\": " + std::to_string(rank) +
             ", \"append_shard\": " + std::to_string(append) + "}}";
  }
  kvp_attention_options ao{};
  ao.struct_size = sizeof ao;
  ao.backend = star ? "star" : attamba ? "attamba" : "dense";
  ao.num_q_heads = kQH;
  ao.num_kv_heads = kKH;
  ao.head_size = kD;
  ao.kv_dtype = KVP_DTYPE_FLOAT32;
  if (star || attamba) {
    ao.config_format = KVP_CONFIG_JSON;
    ao.config = config.data();
    ao.config_size = config.size();
  }
  kvp_attention* attn = nullptr;
  if (kvp_attention_create(f.ctx, &ao, &attn) != KVP_OK) return 0;  // a rejected config
  FUZZ_CHECK(kvp_plan_attach(f.plan, attn) == KVP_OK);

  // The batch.
  const int32_t nseq = Small(in, 1, kMaxSeqs);
  std::vector<int32_t> qsl{0}, lens, indptr{0}, indices, ctx_lens, starts;
  // Attamba: often the layout's own seq_lens and positions (batches it should accept), else random.
  const bool laid_out = attamba && in.Bit();
  for (int32_t b = 0; b < nseq; ++b) {
    qsl.push_back(qsl.back() + Small(in, 0, 6));
    int32_t len = Small(in, -1, 60);
    const int32_t start = Small(in, -1, 90);
    if (laid_out && start >= 0) {
      kvp_cache_layout lay{};
      lay.struct_size = sizeof lay;
      FUZZ_CHECK(kvp_attention_cache_layout(attn, kBS, start + (qsl[b + 1] - qsl[b]), start, &lay) == KVP_OK);
      len = lay.seq_len;
    }
    lens.push_back(len);
    const int32_t pages = len > 0 ? (len + kBS - 1) / kBS : 0;
    for (int32_t j = 0; j < pages; ++j) indices.push_back(Small(in, in.Below(16) == 0 ? -1 : 0, kBlocks - 1));
    indptr.push_back(int32_t(indices.size()));
    ctx_lens.push_back(Small(in, -1, 80));
    starts.push_back(start);
  }
  indices.push_back(0);  // never an empty vector (data() must not be NULL)
  kvp_batch batch{};
  batch.struct_size = sizeof batch;
  batch.num_seqs = nseq;
  batch.block_size = kBS;
  batch.query_start_loc = qsl.data();
  batch.seq_lens = lens.data();
  batch.kv_indptr = indptr.data();
  batch.kv_indices = indices.data();
  if (in.Bit()) batch.context_lens = ctx_lens.data();
  if (laid_out || in.Bit()) batch.query_pos_starts = starts.data();
  if (kvp_plan_update(f.plan, &batch) == KVP_OK) {
    const int32_t t = qsl.back();
    std::vector<float> q(size_t(t) * kQH * kD + 1, 0.25f), out(q.size(), 123.f), lse(size_t(t) * kQH + 1, 123.f);
    int64_t q_shape[3] = {t, kQH, kD}, l_shape[2] = {t, kQH};
    DLTensor qt{q.data(), {kDLCPU, 0}, 3, kF32, q_shape, nullptr, 0};
    DLTensor ot{out.data(), {kDLCPU, 0}, 3, kF32, q_shape, nullptr, 0};
    DLTensor lt{lse.data(), {kDLCPU, 0}, 2, kF32, l_shape, nullptr, 0};
    const kvp_status s = kvp_attention_run(attn, f.plan, f.cache, 0, &qt, &ot, &lt);
    if (s != KVP_OK) std::fprintf(stderr, "run after a successful update: %s\n", kvp_last_error());
    FUZZ_CHECK(s == KVP_OK);
    for (int64_t r = 0; r < int64_t(t) * kQH; ++r) {
      FUZZ_CHECK(std::isfinite(lse[r]) || lse[r] == -INFINITY);
      for (int32_t x = 0; x < kD; ++x) {
        const float o = out[size_t(r) * kD + x];
        FUZZ_CHECK(std::isfinite(o));
        if (lse[r] == -INFINITY) FUZZ_CHECK(o == 0.f);
      }
    }
    // Communicator calls on the run's outputs: fuzzed options, ranks (repeats, out of range) and
    // rounds left open at destroy; a completed round of copies of one partial is that partial.
    if (in.Bit()) {
      kvp_comm_options mo{};
      mo.struct_size = sizeof mo;
      mo.kind = Small(in, 0, 3);
      mo.num_ranks = Small(in, 0, 4);
      mo.max_num_tokens = Small(in, -1, 30);
      mo.num_heads = in.Bit() ? kQH : Small(in, 0, 8);
      mo.head_size = in.Bit() ? kD : Small(in, 0, 64);
      mo.out_dtype = in.Bit() ? KVP_DTYPE_FLOAT32 : Small(in, -1, 4);
      kvp_comm* comm = nullptr;
      if (kvp_comm_create(f.ctx, &mo, &comm) == KVP_OK) {
        std::vector<std::vector<float>> outs, lses;
        const int calls = Small(in, 0, 6);
        for (int c = 0; c < calls; ++c) {
          outs.push_back(out);
          lses.push_back(lse);
          DLTensor oc = ot, lc = lt;
          oc.data = outs.back().data();
          lc.data = lses.back().data();
          const int32_t rank = Small(in, -1, mo.num_ranks);
          int32_t before = -1, after = -1;
          FUZZ_CHECK(kvp_comm_pending(comm, &before) == KVP_OK);
          const kvp_status cs = kvp_comm_merge_attention(comm, rank, &oc, &lc);
          FUZZ_CHECK(kvp_comm_pending(comm, &after) == KVP_OK);
          if (cs == KVP_OK && after == 0) {  // the round completed: every copy merged to itself
            for (size_t i = 0; i + 1 < out.size(); ++i) FUZZ_CHECK(std::abs(outs.back()[i] - out[i]) <= 1e-4f);
          } else if (cs != KVP_OK) {
            FUZZ_CHECK(after == before);
          }
        }
        kvp_comm_destroy(comm);
      }
    }
  }
  kvp_attention_destroy(attn);
  return 0;
}
