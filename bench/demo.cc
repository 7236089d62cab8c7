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
  kvp_block_manager* bm;
  CHECK(kvp_block_manager_create(&bo, &bm));
  kvp_kv_cache_options co{sizeof(co)};
  co.num_layers = kLayers; co.num_blocks = kBlocks; co.block_size = kBlock; co.num_kv_heads = kKvHeads;
  co.head_size = kHead; co.dtype = kv_dtype; co.layout = KVP_LAYOUT_KV_FIRST;
  kvp_kv_cache* cache;
  CHECK(kvp_kv_cache_create(ctx, &co, &cache));
  kvp_attention_options ao{sizeof(ao)};
  ao.backend = backend; ao.num_q_heads = kQHeads; ao.num_kv_heads = kKvHeads; ao.head_size = kHead; ao.kv_dtype = kv_dtype;
  kvp_attention* attn;
  CHECK(kvp_attention_create(ctx, &ao, &attn));
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
  auto admit = [&](int step) {
    for (; admitted < 4 && arrival[admitted] <= step; ++admitted) {
      const int r = admitted;
      Sequence s{uint64_t(r + 1), system, 0, 8};
      for (int i = 0; i < user_lens[r]; ++i) s.tokens.push_back(5000 + 100 * r + i);
      int64_t cached = 0;
      CHECK(kvp_block_manager_allocate(bm, s.id, s.tokens.data(), int64_t(s.tokens.size()), 0, &cached));
      s.computed = int(cached);
      row.cached_tokens += int(cached);
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
    kvp_batch kb{sizeof(kb)};
    kb.num_seqs = nseq; kb.block_size = kBlock; kb.query_start_loc = qsl.data(); kb.seq_lens = lens.data();
    kb.block_table = table.data(); kb.block_table_stride = max_blocks; kb.slot_mapping = slots.data();
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
      CHECK(kvp_attention_run(attn, plan, cache, layer, &qt, &ot, &lt));
#ifdef KVP_DEMO_CUDA
      if (gpu) {
        cudaDeviceSynchronize();
        staged.DownloadBf16(ot.data, &out);
      }
#endif
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
        for (size_t i = size_t(qsl[b]) * kQHeads * kHead; i < size_t(qsl[b + 1]) * kQHeads * kHead; ++i) qd.push_back(q[i]);
        kvplug::testing::NaiveAttention(np, len, q_lens[b], qd, kd, vd, &ref, &ref_lse);
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
    rows.push_back(Serve(name, KVP_DTYPE_FLOAT32, ctx));
    if (info.dtype_mask & (1u << KVP_DTYPE_BFLOAT16)) rows.push_back(Serve(name, KVP_DTYPE_BFLOAT16, ctx));
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
  std::printf("\nmax |err|: against naive contiguous attention in double precision (tolerance 1e-5 for a "
              "float32 cache; 1e-4 for bfloat16 on the CPU, with the reference fed the same rounded K/V; 2e-2 on the "
              "GPU, which also rounds queries, softmax weights and outputs to bfloat16).\n");
  api.kvp_context_destroy(ctx);
  kvp_api_unload(&api);
  return ok ? 0 : 2;
}
