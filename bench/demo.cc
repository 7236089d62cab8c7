// kvplug-demo: what an engine does with kvplug, end to end. Loads libkvplug.so with dlopen, builds
// a block manager and a paged KV cache, and serves a small batch through every registered backend:
// ragged prompts sharing a system prompt (prefix-cache hits), chunked prefill mixed with decode, a
// forked sequence (copy-on-write), then decode steps. Every output is checked against a naive
// contiguous attention in double precision. Usage: kvplug-demo [path/to/libkvplug.so]
#include <algorithm>
#include <chrono>
#include <cstring>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include <unistd.h>

#include "common/naive_attention.h"
#include "kvplug/kvplug_dl.h"
#ifdef KVP_DEMO_CUDA
#include <cuda_runtime.h>
#endif

namespace {

kvp_api api;

void Check(kvp_status s, const char* what) {
  if (s != KVP_OK) {
    std::fprintf(stderr, "%s failed: %s: %s\n", what, api.kvp_status_string(s), api.kvp_last_error());
    std::exit(1);
  }
}
#define CHECK(call) Check(api.call, #call)

constexpr int kLayers = 2, kQHeads = 8, kKvHeads = 2, kHead = 128, kBlock = 16, kBlocks = 96;
constexpr int kChunk = 32;  // prefill tokens per sequence per step (chunked prefill)

// K, V and Q are functions of (token, position, layer, head, i): a shared prefix has the same K/V
// in every sequence, as a real model's would.
float Feature(uint64_t token, int pos, int layer, int head, int i, int which) {
  uint64_t x = token * 0x9E3779B97F4A7C15ull ^ (uint64_t(pos) << 20) ^ (uint64_t(layer) << 40) ^
               (uint64_t(head) << 48) ^ (uint64_t(i) << 8) ^ (uint64_t(which) << 60);
  x ^= x >> 33; x *= 0xff51afd7ed558ccdull; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ull; x ^= x >> 33;
  return static_cast<float>(static_cast<double>(x >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

DLTensor Tensor(void* data, DLDataType dt, int ndim, int64_t* shape) {
  DLTensor t{};
  t.data = data;
  t.device = {kDLCPU, 0};
  t.ndim = ndim;
  t.dtype = dt;
  t.shape = shape;
  return t;
}

struct Sequence {
  uint64_t id;
  std::vector<int32_t> tokens;  // all tokens so far
  int computed = 0;             // tokens whose K/V is in the cache
  int decode_left;
  int context_len = 0;          // the prompt: Star's phase 1 (its decodes are phase 2)
};

float RoundToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

// Host <-> device staging for the GPU rows (the library itself never copies behind the caller's back).
struct DeviceTensors {
#ifdef KVP_DEMO_CUDA
  std::vector<void*> buffers;
  void* Upload(const std::vector<float>& host) {  // as bfloat16
    std::vector<uint16_t> bits(host.size());
    for (size_t i = 0; i < host.size(); ++i) {
      const float r = RoundToBf16(host[i]);
      uint32_t u;
      std::memcpy(&u, &r, 4);
      bits[i] = static_cast<uint16_t>(u >> 16);
    }
    void* d = Alloc(bits.size() * 2);
    cudaMemcpy(d, bits.data(), bits.size() * 2, cudaMemcpyHostToDevice);
    return d;
  }
  void* Alloc(size_t bytes) {
    void* d = nullptr;
    if (cudaMalloc(&d, bytes) != cudaSuccess) {
      std::fprintf(stderr, "cudaMalloc of %zu bytes failed\n", bytes);
      std::exit(1);
    }
    buffers.push_back(d);
    return d;
  }
  void DownloadBf16(const void* d, std::vector<float>* host) {
    std::vector<uint16_t> bits(host->size());
    cudaMemcpy(bits.data(), d, bits.size() * 2, cudaMemcpyDeviceToHost);
    for (size_t i = 0; i < bits.size(); ++i) {
      const uint32_t u = uint32_t{bits[i]} << 16;
      std::memcpy(&(*host)[i], &u, 4);
    }
  }
  ~DeviceTensors() {
    for (void* d : buffers) cudaFree(d);
  }
#endif
};

struct Row {
  std::string backend, dtype, device = "cpu";
  int seqs = 0, prefill_tokens = 0, decode_tokens = 0, cached_tokens = 0, cow_copies = 0;
  int64_t kv_bytes = 0;
  double ms = 0, max_err = 0;
  std::vector<double> entropy_sum, entropy_rows;  // entropy: per layer, from the run's summary
};

Row Serve(const char* backend, int32_t kv_dtype, kvp_context* ctx, bool gpu = false) {
  Row row;
  row.backend = backend;
  row.device = gpu ? "cuda" : "cpu";
  row.dtype = kv_dtype == KVP_DTYPE_FLOAT32 ? "float32" : kv_dtype == KVP_DTYPE_BFLOAT16 ? "bfloat16" : "float16";
  kvp_block_manager_options bo{sizeof(bo)};
  bo.block_size = kBlock;
  bo.num_device_blocks = kBlocks;
  bo.enable_prefix_caching = 1;
  bo.watermark = 0.01;
  // KV shifting attention: K^_i = a1 K_i + a2 K_{i-1}, V^_i = b1 V_i + b2 V_{i-1} per KV head, fused
  // into the write; each sequence's state slot keeps the raw K/V of its last token.
  const bool kv_shift = std::strcmp(backend, "kv_shift") == 0;
  static const char kShiftConfig[] =
      R"({"backend_config_type": "KvShiftConfig", "backend_config": {"alpha_k": [0.75, 0.5, 1.25, -0.625],)"
      R"( "alpha_v": [0.5, 0.75, -1.5, 2.0]}})";
  const double shift_k[kKvHeads][2] = {{0.75, 0.5}, {1.25, -0.625}}, shift_v[kKvHeads][2] = {{0.5, 0.75}, {-1.5, 2.0}};
  if (kv_shift) bo.num_state_slots = 16;
  kvp_block_manager* bm;
  CHECK(kvp_block_manager_create(&bo, &bm));
  kvp_kv_cache_options co{sizeof(co)};
  co.num_layers = kLayers; co.num_blocks = kBlocks; co.block_size = kBlock; co.num_kv_heads = kKvHeads;
  co.head_size = kHead; co.dtype = kv_dtype; co.layout = KVP_LAYOUT_KV_FIRST;
  if (kv_shift) { co.num_state_slots = 16; co.state_bytes_per_layer = 2LL * kKvHeads * kHead * 4; }
  kvp_kv_cache* cache;
  CHECK(kvp_kv_cache_create(ctx, &co, &cache));
  kvp_attention_options ao{sizeof(ao)};
  ao.backend = backend; ao.num_q_heads = kQHeads; ao.num_kv_heads = kKvHeads; ao.head_size = kHead; ao.kv_dtype = kv_dtype;
  kvp_attention* attn;
  // Star Attention: blocks of 32 context tokens, each seeing a 16-token anchor and itself.
  const bool star = std::strcmp(backend, "star") == 0;
  static const char kStarConfig[] =
      R"({"backend_config_type": "StarConfig", "backend_config": {"context_block_size": 32, "anchor_block_size": 16}})";
  if (star) {
    ao.config_format = KVP_CONFIG_JSON;
    ao.config = kStarConfig;
    ao.config_size = sizeof(kStarConfig) - 1;
  }
  // Entropy-guided attention: a temperature per query head (t = 0.5 .. 2.25), and the per-head
  // entropy summary of every run, read back as telemetry.
  const bool entropy = std::strcmp(backend, "entropy") == 0;
  static const char kEntropyConfig[] =
      R"({"backend_config_type": "EntropyConfig", "backend_config": {"temperature": )"
      R"([0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25]}})";
  auto temperature = [&](int h) { return entropy ? 0.5 + 0.25 * h : 1.0; };
  if (entropy) {
    ao.config_format = KVP_CONFIG_JSON;
    ao.config = kEntropyConfig;
    ao.config_size = sizeof(kEntropyConfig) - 1;
    row.entropy_sum.assign(kLayers, 0.0);
    row.entropy_rows.assign(kLayers, 0.0);
  }
  if (kv_shift) {
    ao.config_format = KVP_CONFIG_JSON;
    ao.config = kShiftConfig;
    ao.config_size = sizeof(kShiftConfig) - 1;
  }
  CHECK(kvp_attention_create(ctx, &ao, &attn));
  if (kv_shift) {
    int64_t need = 0;
    CHECK(kvp_attention_state_bytes(attn, &need));
    if (need > co.state_bytes_per_layer) { std::fprintf(stderr, "kv_shift: state slots too small\n"); std::exit(1); }
  }
  kvp_plan_options po{sizeof(po), 16, 512, kBlocks};
  kvp_plan* plan;
  CHECK(kvp_plan_create(ctx, &po, &plan));

  // A 48-token system prompt shared by every request, then ragged user prompts.
  std::vector<int32_t> system(48);
  for (int i = 0; i < 48; ++i) system[i] = 1000 + i;
  std::vector<Sequence> seqs;
  const int user_lens[] = {13, 29, 7, 50};
  // Request r arrives at step arrival[r]: the later ones find the system prompt already computed.
  const int arrival[] = {0, 2, 2, 3};
  int admitted = 0;
  // kv_shift after a prefix-cache hit of c tokens: the cache holds mixed K^ only (inverting the mix
  // is unstable), so token c-1 runs once more with slot_mapping -1: its raw K/V refill the state
  // without touching the shared pages (its output is discarded).
  auto refill_shift_state = [&](const Sequence& s) {
    const int c = s.computed;
    int32_t qsl1[2] = {0, 1}, len1 = c, state = -1, nb = 0;
    int64_t slot = -1;
    std::vector<int32_t> table1(kBlocks);
    CHECK(kvp_block_manager_state_slot(bm, s.id, &state));
    CHECK(kvp_block_manager_block_tables(bm, &s.id, 1, table1.data(), kBlocks, &nb));
    kvp_batch rb{sizeof(rb)};
    rb.num_seqs = 1; rb.block_size = kBlock; rb.query_start_loc = qsl1; rb.seq_lens = &len1;
    rb.block_table = table1.data(); rb.block_table_stride = kBlocks; rb.slot_mapping = &slot; rb.state_slots = &state;
    CHECK(kvp_plan_update(plan, &rb));
    for (int layer = 0; layer < kLayers; ++layer) {
      std::vector<float> k(size_t(kKvHeads) * kHead), v(k.size()), q(size_t(kQHeads) * kHead), out(q.size());
      const uint64_t tok = uint64_t(s.tokens[c - 1]);
      for (int h = 0; h < kKvHeads; ++h)
        for (int x = 0; x < kHead; ++x) {
          k[size_t(h) * kHead + x] = Feature(tok, c - 1, layer, h, x, 0);
          v[size_t(h) * kHead + x] = Feature(tok, c - 1, layer, h, x, 1);
        }
      int64_t kshape[3] = {1, kKvHeads, kHead}, qshape[3] = {1, kQHeads, kHead};
      const DLDataType f32{kDLFloat, 32, 1};
      DLTensor kt = Tensor(k.data(), f32, 3, kshape), vt = Tensor(v.data(), f32, 3, kshape);
      DLTensor qt = Tensor(q.data(), f32, 3, qshape), ot = Tensor(out.data(), f32, 3, qshape);
      DeviceTensors staged;
#ifdef KVP_DEMO_CUDA
      if (gpu) {
        const DLDataType bf16{kDLBfloat, 16, 1};
        kt = Tensor(staged.Upload(k), bf16, 3, kshape);
        vt = Tensor(staged.Upload(v), bf16, 3, kshape);
        qt = Tensor(staged.Upload(q), bf16, 3, qshape);
        ot = Tensor(staged.Alloc(out.size() * 2), bf16, 3, qshape);
        for (DLTensor* t : {&kt, &vt, &qt, &ot}) t->device = {kDLCUDA, 0};
      }
#endif
      CHECK(kvp_attention_write_kv(attn, plan, cache, layer, &kt, &vt));
      CHECK(kvp_attention_run(attn, plan, cache, layer, &qt, &ot, nullptr));
#ifdef KVP_DEMO_CUDA
      if (gpu) cudaDeviceSynchronize();
#endif
    }
  };
  auto admit = [&](int step) {
    for (; admitted < 4 && arrival[admitted] <= step; ++admitted) {
      const int r = admitted;
      Sequence s{uint64_t(r + 1), system, 0, 8};
      for (int i = 0; i < user_lens[r]; ++i) s.tokens.push_back(5000 + 100 * r + i);
      s.context_len = int(s.tokens.size());
      int64_t cached = 0;
      CHECK(kvp_block_manager_allocate(bm, s.id, s.tokens.data(), int64_t(s.tokens.size()), 0, &cached));
      s.computed = int(cached);
      row.cached_tokens += int(cached);
      if (kv_shift && cached > 0) refill_shift_state(s);
      seqs.push_back(s);
    }
  };
  const double scale = 1.0 / std::sqrt(double(kHead));
  kvplug::testing::NaiveParams np{kQHeads, kKvHeads, kHead, scale};
  bool forked = false;
  int64_t peak_used_blocks = 0;
  for (int step = 0;; ++step) {
    admit(step);
    // Schedule: each sequence contributes its next prefill chunk, or one decode token.
    std::vector<int> q_lens;
    std::vector<Sequence*> batch;
    for (auto& s : seqs) {
      const int pending = int(s.tokens.size()) - s.computed;
      if (pending > 0) { batch.push_back(&s); q_lens.push_back(std::min(pending, kChunk)); continue; }
      if (s.decode_left == 0) continue;
      // Decode: append the next token (greedy stand-in: a function of the sequence and step).
      const int32_t next = int32_t(7 + (s.id * 131 + s.tokens.size() * 17) % 9000);
      kvp_block_copy copy;
      int32_t need_copy = 0;
      CHECK(kvp_block_manager_append(bm, s.id, &next, 1, &copy, &need_copy));
      if (need_copy) { CHECK(kvp_kv_cache_copy_blocks(cache, &copy, 1)); ++row.cow_copies; }
      s.tokens.push_back(next);
      --s.decode_left;
      ++row.decode_tokens;
      batch.push_back(&s);
      q_lens.push_back(1);
    }
    if (batch.empty() && admitted == 4) break;
    if (batch.empty()) continue;
    const int nseq = int(batch.size());
    std::vector<uint64_t> ids;
    std::vector<int32_t> qsl{0};
    for (int b = 0; b < nseq; ++b) { ids.push_back(batch[b]->id); qsl.push_back(qsl.back() + q_lens[b]); }
    const int T = qsl.back();
    const int max_blocks = kBlocks;
    std::vector<int32_t> table(size_t(nseq) * max_blocks), lens(nseq);
    CHECK(kvp_block_manager_block_tables(bm, ids.data(), nseq, table.data(), max_blocks, lens.data()));
    // seq_lens for attention: tokens computed after this step (the rest of a prompt comes later).
    std::vector<int64_t> slots(T);
    for (int b = 0; b < nseq; ++b) {
      const int start = batch[b]->computed;
      lens[b] = start + q_lens[b];
      CHECK(kvp_block_manager_slot_mapping(bm, ids[b], start, q_lens[b], slots.data() + qsl[b]));
    }
    std::vector<int32_t> context_lens(nseq);
    for (int b = 0; b < nseq; ++b) context_lens[b] = batch[b]->context_len;
    kvp_batch kb{sizeof(kb)};
    kb.context_lens = context_lens.data();  // only Star reads it
    kb.num_seqs = nseq; kb.block_size = kBlock; kb.query_start_loc = qsl.data(); kb.seq_lens = lens.data();
    kb.block_table = table.data(); kb.block_table_stride = max_blocks; kb.slot_mapping = slots.data();
    std::vector<int32_t> state_slots(nseq, -1);
    if (kv_shift) {
      for (int b = 0; b < nseq; ++b) CHECK(kvp_block_manager_state_slot(bm, ids[b], &state_slots[b]));
      kb.state_slots = state_slots.data();
    }
    const auto t0 = std::chrono::steady_clock::now();
    CHECK(kvp_plan_update(plan, &kb));
    row.ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    for (int layer = 0; layer < kLayers; ++layer) {
      std::vector<float> k(size_t(T) * kKvHeads * kHead), v(k.size()), q(size_t(T) * kQHeads * kHead), out(q.size());
      std::vector<float> lse(size_t(T) * kQHeads);
      for (int b = 0; b < nseq; ++b)
        for (int i = 0; i < q_lens[b]; ++i) {
          const int pos = batch[b]->computed + i, t = qsl[b] + i;
          const uint64_t tok = uint64_t(batch[b]->tokens[pos]);
          for (int h = 0; h < kKvHeads; ++h)
            for (int x = 0; x < kHead; ++x) {
              k[(size_t(t) * kKvHeads + h) * kHead + x] = Feature(tok, pos, layer, h, x, 0);
              v[(size_t(t) * kKvHeads + h) * kHead + x] = Feature(tok, pos, layer, h, x, 1);
            }
          for (int h = 0; h < kQHeads; ++h)
            for (int x = 0; x < kHead; ++x)
              q[(size_t(t) * kQHeads + h) * kHead + x] = Feature(tok ^ batch[b]->id, pos, layer, h, x, 2);
        }
      int64_t kshape[3] = {T, kKvHeads, kHead}, qshape[3] = {T, kQHeads, kHead}, lshape[2] = {T, kQHeads};
      const DLDataType f32{kDLFloat, 32, 1};
      DLTensor kt = Tensor(k.data(), f32, 3, kshape), vt = Tensor(v.data(), f32, 3, kshape);
      DLTensor qt = Tensor(q.data(), f32, 3, qshape), ot = Tensor(out.data(), f32, 3, qshape);
      DLTensor lt = Tensor(lse.data(), f32, 2, lshape);
      DeviceTensors staged;
#ifdef KVP_DEMO_CUDA
      if (gpu) {  // bfloat16 tensors on the device
        const DLDataType bf16{kDLBfloat, 16, 1};
        kt = Tensor(staged.Upload(k), bf16, 3, kshape);
        vt = Tensor(staged.Upload(v), bf16, 3, kshape);
        qt = Tensor(staged.Upload(q), bf16, 3, qshape);
        ot = Tensor(staged.Alloc(out.size() * 2), bf16, 3, qshape);
        lt = Tensor(staged.Alloc(lse.size() * 4), f32, 2, lshape);
        for (DLTensor* t : {&kt, &vt, &qt, &ot, &lt}) t->device = {kDLCUDA, 0};
        for (auto& x : q) x = RoundToBf16(x);  // the reference sees the queries the GPU sees
      }
#endif
      const auto t1 = std::chrono::steady_clock::now();
      CHECK(kvp_attention_write_kv(attn, plan, cache, layer, &kt, &vt));
      std::vector<float> summary(size_t(kQHeads) * 6);
      int64_t sshape[2] = {kQHeads, 6};
      DLTensor st = Tensor(summary.data(), f32, 2, sshape);
#ifdef KVP_DEMO_CUDA
      if (gpu) st = Tensor(staged.Alloc(summary.size() * 4), f32, 2, sshape), st.device = {kDLCUDA, 0};
#endif
      if (entropy) {
        kvp_attention_outputs outs{sizeof(outs)};
        outs.out = &ot;
        outs.lse = &lt;
        outs.entropy_summary = &st;
        CHECK(kvp_attention_run_v2(attn, plan, cache, layer, &qt, &outs));
      } else {
        CHECK(kvp_attention_run(attn, plan, cache, layer, &qt, &ot, &lt));
      }
#ifdef KVP_DEMO_CUDA
      if (gpu) {
        cudaDeviceSynchronize();
        staged.DownloadBf16(ot.data, &out);
        if (entropy) cudaMemcpy(summary.data(), st.data, summary.size() * 4, cudaMemcpyDeviceToHost);
      }
#endif
      if (entropy)
        for (int h = 0; h < kQHeads; ++h) {
          row.entropy_sum[layer] += double(summary[h * 6]) * summary[h * 6 + 1];
          row.entropy_rows[layer] += summary[h * 6];
        }
      row.ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t1).count();
      // Reference: contiguous K/V of each sequence rebuilt from the features, in double.
      for (int b = 0; b < nseq; ++b) {
        const int len = lens[b];
        std::vector<double> kd, vd, qd, ref, ref_lse;
        for (int pos = 0; pos < len; ++pos)
          for (int h = 0; h < kKvHeads; ++h)
            for (int x = 0; x < kHead; ++x) {
              auto round = [&](float f) -> double { return kv_dtype == KVP_DTYPE_FLOAT32 ? f : RoundToBf16(f); };
              kd.push_back(round(Feature(uint64_t(batch[b]->tokens[pos]), pos, layer, h, x, 0)));
              vd.push_back(round(Feature(uint64_t(batch[b]->tokens[pos]), pos, layer, h, x, 1)));
            }
        if (kv_shift) {
          // The shift, explicitly, from the raw features of the whole sequence (K_{-1} = 0), mixed
          // in float as the write does, then rounded as the cache stores it (bfloat16 inputs on the GPU).
          for (int pos = 0; pos < len; ++pos)
            for (int h = 0; h < kKvHeads; ++h)
              for (int x = 0; x < kHead; ++x) {
                const size_t i = (size_t(pos) * kKvHeads + h) * kHead + x;
                for (int which = 0; which < 2; ++which) {
                  auto raw = [&](int p) -> float {
                    if (p < 0) return 0.0f;
                    const float f = Feature(uint64_t(batch[b]->tokens[p]), p, layer, h, x, which);
                    return gpu ? RoundToBf16(f) : f;
                  };
                  const double* w = which == 0 ? shift_k[h] : shift_v[h];
                  const double mixed = kv_dtype == KVP_DTYPE_FLOAT32
                                           ? w[0] * raw(pos) + w[1] * raw(pos - 1)
                                           : RoundToBf16(float(w[0]) * raw(pos) + float(w[1]) * raw(pos - 1));
                  (which == 0 ? kd : vd)[i] = mixed;
                }
              }
        }
        // Entropy's temperature divides the logits: the reference scales each head's query by 1/t.
        for (size_t i = size_t(qsl[b]) * kQHeads * kHead; i < size_t(qsl[b + 1]) * kQHeads * kHead; ++i)
          qd.push_back(q[i] / temperature(int(i / kHead % kQHeads)));
        if (star) {
          // The paper's phase 1, explicitly: a context token of block k > 0 attends to the
          // sequence [anchor ; block k up to itself]; everything else is causal over all.
          const size_t kv_row = size_t(kKvHeads) * kHead, q_row = size_t(kQHeads) * kHead;
          for (int i = 0; i < q_lens[b]; ++i) {
            const int pos = len - q_lens[b] + i;
            std::vector<int> keys;
            for (int j = 0; j <= pos; ++j)
              if (pos >= batch[b]->context_len || pos < 32 || j < 16 || j / 32 == pos / 32) keys.push_back(j);
            std::vector<double> ks, vs, one(qd.begin() + i * q_row, qd.begin() + (i + 1) * q_row), o, l;
            for (int j : keys) {
              ks.insert(ks.end(), kd.begin() + j * kv_row, kd.begin() + (j + 1) * kv_row);
              vs.insert(vs.end(), vd.begin() + j * kv_row, vd.begin() + (j + 1) * kv_row);
            }
            kvplug::testing::NaiveAttention(np, int(keys.size()), 1, one, ks, vs, &o, &l);
            ref.insert(ref.end(), o.begin(), o.end());
          }
        } else {
          kvplug::testing::NaiveAttention(np, len, q_lens[b], qd, kd, vd, &ref, &ref_lse);
        }
        for (size_t i = 0; i < ref.size(); ++i)
          row.max_err = std::max(row.max_err, std::abs(ref[i] - out[size_t(qsl[b]) * kQHeads * kHead + i]));
      }
    }
    for (int b = 0; b < nseq; ++b) {
      batch[b]->computed += q_lens[b];
      CHECK(kvp_block_manager_mark_computed(bm, batch[b]->id, batch[b]->computed));
    }
    // Once request 1's prompt is in, fork it (parallel sampling): its partial last block is shared
    // until the first append copies it.
    kvp_block_manager_stats now{sizeof(now)};
    CHECK(kvp_block_manager_stats_get(bm, &now));
    peak_used_blocks = std::max<int64_t>(peak_used_blocks, now.num_used_blocks);
    if (!forked && seqs[0].computed == int(seqs[0].tokens.size())) {
      CHECK(kvp_block_manager_fork(bm, 1, 99));
      if (kv_shift) {  // the child continues the parent's recurrence: copy its state slot
        int32_t parent_slot = -1, child_slot = -1;
        CHECK(kvp_block_manager_state_slot(bm, 1, &parent_slot));
        CHECK(kvp_block_manager_state_slot(bm, 99, &child_slot));
        CHECK(kvp_kv_cache_copy_state(cache, parent_slot, child_slot));
      }
      Sequence child = seqs[0];
      child.id = 99;
      child.decode_left = 8;
      seqs.push_back(child);
      forked = true;
    }
  }
  const int64_t bytes_per_block = 2LL * kBlock * kKvHeads * kHead * (kv_dtype == KVP_DTYPE_FLOAT32 ? 4 : 2) * kLayers;
  row.kv_bytes = peak_used_blocks * bytes_per_block;  // peak, all layers
  row.seqs = int(seqs.size());
  int prompt_total = 0;
  for (int r = 0; r < 4; ++r) prompt_total += 48 + user_lens[r];
  row.prefill_tokens = prompt_total - row.cached_tokens;
  for (const auto& s : seqs) CHECK(kvp_block_manager_free(bm, s.id));
  kvp_block_manager_stats end{sizeof(end)};
  CHECK(kvp_block_manager_stats_get(bm, &end));
  if (end.num_used_blocks != 0) { std::fprintf(stderr, "block leak: %d used after freeing all\n", end.num_used_blocks); std::exit(1); }
  api.kvp_plan_destroy(plan);
  api.kvp_attention_destroy(attn);
  api.kvp_kv_cache_destroy(cache);
  api.kvp_block_manager_destroy(bm);
  return row;
}

// Attamba as an engine serves it: per layer, K = x + out_proj_k(SSM_k(in_proj_k(x))) and V alike,
// the engine's GEMMs here on the host, the chunk-local SSMs in kvplug (kvp_attention_ssm, state in
// the cache's state slots); the cache keeps chunk-end rows plus the window's token pages, laid out
// as kvp_attention_cache_layout says, from the demo's own page pool (token pages the window no
// longer reaches are freed as decoding goes on). Checked against naive attention with the paper's
// mask over the same K/V (the SSM itself is checked in tests/attention/attamba_cpu_test.cc).
constexpr int kAttambaChunk = 8, kAttambaWindow = 16;
constexpr int kSsmHeads = 4, kSsmHeadDim = 16, kSsmState = 8, kConvWidth = 4;
constexpr int kModelDim = kKvHeads * kHead, kDInner = kSsmHeads * kSsmHeadDim;
constexpr int kConvDim = kDInner + 2 * kSsmState, kInDim = 2 * kDInner + 2 * kSsmState + kSsmHeads;

struct SsmWeights {
  std::vector<float> in_proj, out_proj, conv_w, dt_bias, a_log, d, norm;  // in [kInDim][kModelDim], out [kModelDim][kDInner]
};

SsmWeights MakeSsmWeights(int layer, int which) {
  SsmWeights w;
  auto f = [&](int i, int salt, double scale) {
    return float(scale * Feature(uint64_t(77 + salt), i, layer, which, i % 61, 3));
  };
  for (int i = 0; i < kInDim * kModelDim; ++i) w.in_proj.push_back(f(i, 1, 1.0 / 16));
  for (int i = 0; i < kModelDim * kDInner; ++i) w.out_proj.push_back(f(i, 2, 0.125));
  for (int i = 0; i < kConvDim * kConvWidth; ++i) w.conv_w.push_back(f(i, 3, 0.5));
  for (int h = 0; h < kSsmHeads; ++h) {
    w.dt_bias.push_back(f(h, 4, 1.0));
    w.a_log.push_back(f(h, 5, 1.0));
    w.d.push_back(f(h, 6, 1.0));
  }
  for (int i = 0; i < kDInner; ++i) w.norm.push_back(1.0f + f(i, 7, 0.2));
  return w;
}

Row ServeAttamba(int32_t kv_dtype, kvp_context* ctx) {
  Row row;
  row.backend = "attamba";
  row.dtype = kv_dtype == KVP_DTYPE_FLOAT32 ? "float32" : "bfloat16";
  const int kSlots = 16;
  std::vector<kvp_attention*> attn(kLayers);
  for (int l = 0; l < kLayers; ++l) {
    const std::string config = "{\"backend_config_type\": \"AttambaConfig\", \"backend_config\": {\"chunk_size\": " +
                               std::to_string(kAttambaChunk) + ", \"window\": " + std::to_string(kAttambaWindow) +
                               ", \"layer_index\": " + std::to_string(l) + ", \"num_layers\": " +
                               std::to_string(kLayers) + ", \"ssm_heads\": " + std::to_string(kSsmHeads) +
                               ", \"ssm_head_dim\": " + std::to_string(kSsmHeadDim) + ", \"state_size\": " +
                               std::to_string(kSsmState) + ", \"conv_width\": " + std::to_string(kConvWidth) + "}}";
    kvp_attention_options ao{sizeof(ao)};
    ao.backend = "attamba"; ao.num_q_heads = kQHeads; ao.num_kv_heads = kKvHeads; ao.head_size = kHead;
    ao.kv_dtype = kv_dtype; ao.config_format = KVP_CONFIG_JSON; ao.config = config.data(); ao.config_size = config.size();
    CHECK(kvp_attention_create(ctx, &ao, &attn[l]));
  }
  int64_t state_bytes = 0;
  CHECK(kvp_attention_state_bytes(attn[0], &state_bytes));
  kvp_kv_cache_options co{sizeof(co)};
  co.num_layers = kLayers; co.num_blocks = kBlocks; co.block_size = kBlock; co.num_kv_heads = kKvHeads;
  co.head_size = kHead; co.dtype = kv_dtype; co.layout = KVP_LAYOUT_KV_FIRST;
  co.num_state_slots = kSlots; co.state_bytes_per_layer = state_bytes;
  kvp_kv_cache* cache;
  CHECK(kvp_kv_cache_create(ctx, &co, &cache));
  kvp_plan_options po{sizeof(po), 16, 512, kBlocks};
  kvp_plan* plan;
  CHECK(kvp_plan_create(ctx, &po, &plan));
  std::vector<SsmWeights> wk, wv;
  for (int l = 0; l < kLayers; ++l) wk.push_back(MakeSsmWeights(l, 0)), wv.push_back(MakeSsmWeights(l, 1));

  // The demo's page pool with reference counts (a fork shares full pages, copies partial ones).
  std::vector<int32_t> free_pages;
  for (int i = kBlocks - 1; i >= 0; --i) free_pages.push_back(i);
  std::vector<int> refs(kBlocks, 0);
  auto take = [&] {
    if (free_pages.empty()) { std::fprintf(stderr, "attamba: page pool exhausted\n"); std::exit(1); }
    const int32_t p = free_pages.back();
    free_pages.pop_back();
    refs[p] = 1;
    return p;
  };
  auto release = [&](int32_t p) { if (--refs[p] == 0) free_pages.push_back(p); };
  struct Seq {
    uint64_t id;
    std::vector<int32_t> tokens;
    int computed = 0, decode_left = 8, slot = 0;
    std::vector<int32_t> compressed;
    std::map<int, int32_t> token_pages;
    std::vector<std::vector<float>> k, v;  // per layer: every position's K/V, for the reference
  };
  std::vector<Seq> seqs;
  std::vector<int32_t> system(48);
  for (int i = 0; i < 48; ++i) system[i] = 1000 + i;
  const int user_lens[] = {13, 29, 7, 50}, arrival[] = {0, 2, 2, 3};
  int admitted = 0, next_slot = 0;
  bool forked = false;
  int64_t peak_pages = 0;
  kvplug::testing::NaiveParams np{kQHeads, kKvHeads, kHead, 1.0 / std::sqrt(double(kHead))};
  auto layout_of = [&](int n, int p0) {
    kvp_cache_layout lay{sizeof(lay)};
    CHECK(kvp_attention_cache_layout(attn[0], kBlock, n, p0, &lay));
    return lay;
  };
  for (int step = 0;; ++step) {
    for (; admitted < 4 && arrival[admitted] <= step; ++admitted) {
      Seq s{uint64_t(admitted + 1), system};
      for (int i = 0; i < user_lens[admitted]; ++i) s.tokens.push_back(5000 + 100 * admitted + i);
      s.slot = next_slot++;
      s.k.resize(kLayers);
      s.v.resize(kLayers);
      seqs.push_back(s);
    }
    std::vector<Seq*> batch;
    std::vector<int> q_lens;
    for (auto& s : seqs) {
      const int pending = int(s.tokens.size()) - s.computed;
      if (pending > 0) { batch.push_back(&s); q_lens.push_back(std::min(pending, kChunk)); continue; }
      if (s.decode_left == 0) continue;
      s.tokens.push_back(int32_t(7 + (s.id * 131 + s.tokens.size() * 17) % 9000));
      --s.decode_left;
      ++row.decode_tokens;
      batch.push_back(&s);
      q_lens.push_back(1);
    }
    if (batch.empty() && admitted == 4) break;
    if (batch.empty()) continue;
    const int nseq = int(batch.size());
    std::vector<int32_t> qsl{0}, indptr{0}, indices, lens, p0s, state_slots;
    std::vector<int64_t> slots;
    for (int b = 0; b < nseq; ++b) {
      Seq& s = *batch[b];
      const int p0 = s.computed, n = p0 + q_lens[b];
      const kvp_cache_layout lay = layout_of(n, p0);
      for (auto it = s.token_pages.begin(); it != s.token_pages.end();)
        if (it->first < lay.window_first_page) { release(it->second); it = s.token_pages.erase(it); } else ++it;
      while (int(s.compressed.size()) < lay.compressed_pages) s.compressed.push_back(take());
      for (int j = lay.window_first_page; j < lay.window_first_page + lay.window_pages; ++j)
        if (!s.token_pages.count(j)) s.token_pages[j] = take();
      for (int i = 0; i < lay.compressed_pages; ++i) indices.push_back(s.compressed[i]);
      for (int j = lay.window_first_page; j < lay.window_first_page + lay.window_pages; ++j)
        indices.push_back(s.token_pages[j]);
      indptr.push_back(int32_t(indices.size()));
      qsl.push_back(qsl.back() + q_lens[b]);
      lens.push_back(lay.seq_len);
      p0s.push_back(p0);
      state_slots.push_back(s.slot);
      for (int p = p0; p < n; ++p) slots.push_back(int64_t{s.token_pages[p / kBlock]} * kBlock + p % kBlock);
      if (q_lens[b] > 1) row.prefill_tokens += q_lens[b];
    }
    peak_pages = std::max<int64_t>(peak_pages, kBlocks - int64_t(free_pages.size()));
    const int T = qsl.back();
    kvp_batch kb{sizeof(kb)};
    kb.num_seqs = nseq; kb.block_size = kBlock; kb.query_start_loc = qsl.data(); kb.seq_lens = lens.data();
    kb.kv_indptr = indptr.data(); kb.kv_indices = indices.data(); kb.slot_mapping = slots.data();
    kb.state_slots = state_slots.data(); kb.query_pos_starts = p0s.data();
    const auto t0 = std::chrono::steady_clock::now();
    CHECK(kvp_plan_update(plan, &kb));
    const DLDataType f32{kDLFloat, 32, 1};
    for (int layer = 0; layer < kLayers; ++layer) {
      std::vector<float> x(size_t(T) * kModelDim), q(size_t(T) * kQHeads * kHead), kv[2];
      for (int b = 0; b < nseq; ++b)
        for (int i = 0; i < q_lens[b]; ++i) {
          const int pos = batch[b]->computed + i, t = qsl[b] + i;
          const uint64_t tok = uint64_t(batch[b]->tokens[pos]);
          for (int c = 0; c < kModelDim; ++c) x[size_t(t) * kModelDim + c] = Feature(tok, pos, layer, c / kHead, c % kHead, 0);
          for (int h = 0; h < kQHeads; ++h)
            for (int c = 0; c < kHead; ++c)
              q[(size_t(t) * kQHeads + h) * kHead + c] = Feature(tok ^ batch[b]->id, pos, layer, h, c, 2);
        }
      for (int which = 0; which < 2; ++which) {
        const SsmWeights& w = which == 0 ? wk[layer] : wv[layer];
        std::vector<float> in(size_t(T) * kInDim, 0.0f), y(size_t(T) * kDInner);
        for (int t = 0; t < T; ++t)  // the engine's in_proj
          for (int o = 0; o < kInDim; ++o) {
            float acc = 0;
            for (int c = 0; c < kModelDim; ++c) acc += w.in_proj[size_t(o) * kModelDim + c] * x[size_t(t) * kModelDim + c];
            in[size_t(t) * kInDim + o] = acc;
          }
        int64_t in_shape[2] = {T, kInDim}, y_shape[2] = {T, kDInner}, cw_shape[2] = {kConvDim, kConvWidth};
        int64_t h_shape[1] = {kSsmHeads}, n_shape[1] = {kDInner};
        DLTensor it = Tensor(in.data(), f32, 2, in_shape), yt = Tensor(y.data(), f32, 2, y_shape);
        DLTensor cw = Tensor(const_cast<float*>(w.conv_w.data()), f32, 2, cw_shape);
        DLTensor db = Tensor(const_cast<float*>(w.dt_bias.data()), f32, 1, h_shape);
        DLTensor al = Tensor(const_cast<float*>(w.a_log.data()), f32, 1, h_shape);
        DLTensor dd = Tensor(const_cast<float*>(w.d.data()), f32, 1, h_shape);
        DLTensor nw = Tensor(const_cast<float*>(w.norm.data()), f32, 1, n_shape);
        kvp_ssm_args sa{sizeof(sa)};
        sa.which = which; sa.in = &it; sa.conv_weight = &cw; sa.dt_bias = &db; sa.a_log = &al; sa.d_skip = &dd;
        sa.norm_weight = &nw; sa.out = &yt;
        CHECK(kvp_attention_ssm(attn[layer], plan, cache, layer, &sa));
        kv[which] = x;  // K = x + out_proj(y) (V alike): the paper's residual form
        for (int t = 0; t < T; ++t)
          for (int o = 0; o < kModelDim; ++o) {
            float acc = 0;
            for (int c = 0; c < kDInner; ++c) acc += w.out_proj[size_t(o) * kDInner + c] * y[size_t(t) * kDInner + c];
            kv[which][size_t(t) * kModelDim + o] += acc;
          }
      }
      std::vector<float> out(q.size());
      int64_t kshape[3] = {T, kKvHeads, kHead}, qshape[3] = {T, kQHeads, kHead};
      DLTensor kt = Tensor(kv[0].data(), f32, 3, kshape), vt = Tensor(kv[1].data(), f32, 3, kshape);
      DLTensor qt = Tensor(q.data(), f32, 3, qshape), ot = Tensor(out.data(), f32, 3, qshape);
      CHECK(kvp_attention_write_kv(attn[layer], plan, cache, layer, &kt, &vt));
      CHECK(kvp_attention_run(attn[layer], plan, cache, layer, &qt, &ot, nullptr));
      // Reference: the paper's mask over every position's K/V, in double.
      const int off = std::min(kAttambaChunk - 1, layer * (kAttambaChunk / kLayers));
      auto is_end = [&](int k) { return k == 0 || (k >= kAttambaChunk - 1 - off && (k - (kAttambaChunk - 1 - off)) % kAttambaChunk == 0); };
      for (int b = 0; b < nseq; ++b) {
        Seq& s = *batch[b];
        for (int i = 0; i < q_lens[b]; ++i)
          for (int which = 0; which < 2; ++which)
            for (int c = 0; c < kModelDim; ++c) {
              const float f = kv[which][size_t(qsl[b] + i) * kModelDim + c];
              (which == 0 ? s.k : s.v)[layer].push_back(kv_dtype == KVP_DTYPE_FLOAT32 ? f : RoundToBf16(f));
            }
        for (int i = 0; i < q_lens[b]; ++i) {
          const int t = s.computed + i;
          std::vector<double> ks, vs, qd(q.begin() + size_t(qsl[b] + i) * kQHeads * kHead,
                                         q.begin() + size_t(qsl[b] + i + 1) * kQHeads * kHead), o, l;
          int keys = 0;
          for (int k = 0; k <= t; ++k) {
            if (!((k < t && is_end(k)) || k >= t - kAttambaWindow)) continue;
            ks.insert(ks.end(), s.k[layer].begin() + size_t(k) * kModelDim, s.k[layer].begin() + size_t(k + 1) * kModelDim);
            vs.insert(vs.end(), s.v[layer].begin() + size_t(k) * kModelDim, s.v[layer].begin() + size_t(k + 1) * kModelDim);
            ++keys;
          }
          kvplug::testing::NaiveAttention(np, keys, 1, qd, ks, vs, &o, &l);
          for (size_t j = 0; j < o.size(); ++j)
            row.max_err = std::max(row.max_err, std::abs(o[j] - out[size_t(qsl[b] + i) * kQHeads * kHead + j]));
        }
      }
    }
    row.ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    for (int b = 0; b < nseq; ++b) batch[b]->computed += q_lens[b];
    if (!forked && seqs[0].computed == int(seqs[0].tokens.size())) {
      // Parallel sampling: the child shares the parent's full pages (immutable), copies the partial
      // ones and the SSM state.
      Seq child = seqs[0];
      child.id = 99;
      child.decode_left = 8;
      child.slot = next_slot++;
      const kvp_cache_layout lay = layout_of(child.computed, child.computed);
      std::vector<kvp_block_copy> copies;
      for (size_t i = 0; i < child.compressed.size(); ++i) {
        if (int64_t(i + 1) * kBlock <= lay.stable_rows) { ++refs[child.compressed[i]]; continue; }
        const int32_t dst = take();
        copies.push_back({child.compressed[i], dst});
        child.compressed[i] = dst;
      }
      for (auto& [j, page] : child.token_pages) {
        if ((j + 1) * kBlock <= child.computed) { ++refs[page]; continue; }
        const int32_t dst = take();
        copies.push_back({page, dst});
        page = dst;
      }
      CHECK(kvp_kv_cache_copy_blocks(cache, copies.data(), int32_t(copies.size())));
      CHECK(kvp_kv_cache_copy_state(cache, seqs[0].slot, child.slot));
      row.cow_copies += int(copies.size());
      seqs.push_back(child);
      forked = true;
    }
  }
  row.seqs = int(seqs.size());
  const int64_t bytes_per_block = 2LL * kBlock * kKvHeads * kHead * (kv_dtype == KVP_DTYPE_FLOAT32 ? 4 : 2) * kLayers;
  row.kv_bytes = peak_pages * bytes_per_block;
  for (auto& s : seqs) {
    for (int32_t p : s.compressed) release(p);
    for (auto& [j, p] : s.token_pages) release(p);
  }
  if (int(free_pages.size()) != kBlocks) { std::fprintf(stderr, "attamba: %zu pages leaked\n", kBlocks - free_pages.size()); std::exit(1); }
  api.kvp_plan_destroy(plan);
  for (kvp_attention* a : attn) api.kvp_attention_destroy(a);
  api.kvp_kv_cache_destroy(cache);
  return row;
}

std::string DefaultLibraryPath(const char* argv0) {
  if (const char* env = std::getenv("KVP_LIBRARY")) return env;
  char exe[4096];
  const ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  std::string dir = n > 0 ? std::string(exe, size_t(n)) : std::string(argv0);
  dir = dir.substr(0, dir.rfind('/'));
  return dir + "/../abi/libkvplug.so";
}

}  // namespace

int main(int argc, char** argv) {
  const std::string path = argc > 1 ? argv[1] : DefaultLibraryPath(argv[0]);
  char error[512];
  if (kvp_api_load(&api, path.c_str(), error, sizeof error) != 0) {
    std::fprintf(stderr, "%s\n", error);
    return 1;
  }
  const uint32_t v = api.kvp_abi_version();
  std::printf("kvplug %s loaded from %s (ABI %u.%u.%u)\n", api.kvp_version_string(), path.c_str(), v / 10000,
              v / 100 % 100, v % 100);
  int32_t count = 0;
  CHECK(kvp_backend_count(&count));
  std::printf("backends:");
  for (int i = 0; i < count; ++i) {
    const char* name;
    CHECK(kvp_backend_name(i, &name));
    std::printf(" %s", name);
  }
  std::printf("\nmodel: %d layers, %d query / %d KV heads, head size %d, block size %d; 4 requests sharing a "
              "48-token system prompt, chunked prefill (%d tokens), a fork, 8 decode steps each\n\n",
              kLayers, kQHeads, kKvHeads, kHead, kBlock, kChunk);
  kvp_context* ctx;
  CHECK(kvp_context_create(nullptr, &ctx));
  std::vector<Row> rows;
  for (int i = 0; i < count; ++i) {
    const char* name;
    CHECK(kvp_backend_name(i, &name));
    kvp_backend_info info{sizeof(info)};
    CHECK(kvp_backend_info_get(name, &info));
    const bool attamba = std::strcmp(name, "attamba") == 0;  // its own page layout (kvp_attention_cache_layout)
    rows.push_back(attamba ? ServeAttamba(KVP_DTYPE_FLOAT32, ctx) : Serve(name, KVP_DTYPE_FLOAT32, ctx));
    if (info.dtype_mask & (1u << KVP_DTYPE_BFLOAT16))
      rows.push_back(attamba ? ServeAttamba(KVP_DTYPE_BFLOAT16, ctx) : Serve(name, KVP_DTYPE_BFLOAT16, ctx));
#ifdef KVP_DEMO_CUDA
    // The GPU where there is one and the backend has CUDA kernels.
    kvp_context_options go{sizeof(go)};
    go.device_type = kDLCUDA;
    kvp_context* gctx = nullptr;
    if ((info.device_mask & (1u << kDLCUDA)) && api.kvp_context_create(&go, &gctx) == KVP_OK) {
      rows.push_back(Serve(name, KVP_DTYPE_BFLOAT16, gctx, true));
      api.kvp_context_destroy(gctx);
    } else if (i == 0) {
      std::printf("(no GPU rows: %s)\n", (info.device_mask & (1u << kDLCUDA)) ? api.kvp_last_error()
                                                                               : "the library has no CUDA kernels");
    }
#endif
  }
  std::printf("%-10s %-6s %-9s %5s %8s %7s %7s %4s %10s %9s %12s\n", "backend", "device", "kv dtype", "seqs",
              "prefill", "cached", "decode", "cow", "KV bytes", "time ms", "max |err|");
  bool ok = true;
  for (const Row& r : rows) {
    // GPU rows compute in bfloat16 (output and softmax weights rounded): a bfloat16 tolerance.
    const double tol = r.device == "cuda" ? 2e-2 : r.dtype == "float32" ? 1e-5 : 1e-4;
    ok = ok && r.max_err <= tol;
    std::printf("%-10s %-6s %-9s %5d %8d %7d %7d %4d %10lld %9.2f %12.3g%s\n", r.backend.c_str(), r.device.c_str(),
                r.dtype.c_str(), r.seqs, r.prefill_tokens, r.cached_tokens, r.decode_tokens, r.cow_copies,
                static_cast<long long>(r.kv_bytes), r.ms, r.max_err, r.max_err <= tol ? "" : "  <-- over tolerance");
  }
  for (const Row& r : rows)
    if (!r.entropy_sum.empty()) {
      std::printf("entropy %s %s: mean attention entropy per layer (nats, all heads):", r.device.c_str(),
                  r.dtype.c_str());
      for (size_t l = 0; l < r.entropy_sum.size(); ++l)
        std::printf(" L%zu %.3f", l, r.entropy_rows[l] > 0 ? r.entropy_sum[l] / r.entropy_rows[l] : 0.0);
      std::printf("\n");
    }
  std::printf("\nentropy: entropy-guided attention with a temperature per head (0.5 .. 2.25), checked against "
              "naive attention over the temperature-scaled queries; the entropies come from the run's summary.\n");
  std::printf("star: Star Attention with blocks of 32 context tokens and a 16-token anchor (the prompt is the "
              "context, decodes are phase 2), checked against the paper's explicit anchor-prefixed sequences.\n");
  std::printf("kv_shift: KV shifting attention (K^_i = a1 K_i + a2 K_{i-1}, V alike, per KV head) fused into the write, "
              "state copied at the fork, prefix hits refilled by recomputing the last cached token; checked against "
              "the shift computed explicitly over each whole sequence.\n");
  std::printf("attamba: Attamba with chunks of %d tokens (cyclic offsets per layer) and a %d-token window; K and V "
              "from chunk-local Mamba-2 SSMs run by kvplug (kvp_attention_ssm), the cache holding chunk-end rows plus the "
              "window's token pages (no prefix caching in this demo); checked against the paper's mask over the same "
              "K/V. Its KV bytes are the peak of the pages it holds.\n", kAttambaChunk, kAttambaWindow);
  std::printf("max |err|: against naive contiguous attention in double precision (tolerance 1e-5 for a "
              "float32 cache; 1e-4 for bfloat16 on the CPU, with the reference fed the same rounded K/V; 2e-2 on the "
              "GPU, which also rounds queries, softmax weights and outputs to bfloat16).\n");
  api.kvp_context_destroy(ctx);
  kvp_api_unload(&api);
  return ok ? 0 : 2;
}
