// attamba-bench: Attamba's compressed cache against dense on this CPU, through dlopen as an engine
// calls it. For each context n and chunk size P: a batch of sequences whose whole context is
// written through kvp_attention_write_kv (pages laid out by kvp_attention_cache_layout, token pages
// the window no longer reaches returned to the pool), then decode steps timed against dense's on
// the same batch and context, interleaved, medians of rounds. KV bytes are the pages the pool
// actually holds for the batch after the context is in, against dense's pages and against the
// target (1/P + L/n) of dense. Usage: attamba-bench [libkvplug.so] [threads]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kvplug/kvplug_dl.h"

namespace {

kvp_api api;

void Check(kvp_status s, const char* what) {
  if (s != KVP_OK) {
    std::fprintf(stderr, "%s failed: %s: %s\n", what, api.kvp_status_string(s), api.kvp_last_error());
    std::exit(1);
  }
}
#define CHECK(call) Check(api.call, #call)

constexpr int kHq = 32, kHkv = 8, kD = 128, kBs = 16, kWindow = 64;

DLTensor Tensor(void* data, DLDataType dt, int ndim, int64_t* shape) {
  DLTensor t{};
  t.data = data;
  t.device = {kDLCPU, 0};
  t.ndim = ndim;
  t.dtype = dt;
  t.shape = shape;
  return t;
}

struct Setup {
  kvp_attention* attn = nullptr;
  kvp_kv_cache* cache = nullptr;
  kvp_plan* plan = nullptr;
  int64_t pages_held = 0;
  std::vector<int32_t> qsl, indptr, indices, lens, p0s;
};

// Writes `batch` contexts of n tokens (random bf16-representable K/V) and plans one decode step.
Setup Build(kvp_context* ctx, const char* backend, int P, int batch, int n) {
  Setup s;
  kvp_attention_options ao{sizeof(ao)};
  ao.backend = backend; ao.num_q_heads = kHq; ao.num_kv_heads = kHkv; ao.head_size = kD;
  ao.kv_dtype = KVP_DTYPE_BFLOAT16;
  const std::string config = "{\"backend_config_type\": \"AttambaConfig\", \"backend_config\": {\"chunk_size\": " +
                             std::to_string(P) + ", \"window\": " + std::to_string(kWindow) + "}}";
  const bool attamba = std::strcmp(backend, "attamba") == 0;
  if (attamba) { ao.config_format = KVP_CONFIG_JSON; ao.config = config.data(); ao.config_size = config.size(); }
  CHECK(kvp_attention_create(ctx, &ao, &s.attn));
  // Pages per sequence: the layout of the step that decodes token n (context [0, n) in the cache).
  kvp_cache_layout lay{sizeof(lay)};
  CHECK(kvp_attention_cache_layout(s.attn, kBs, n + 1, n, &lay));
  // A prefill step holds its own token pages too: the pool is sized for the largest of them.
  kvp_cache_layout prefill{sizeof(prefill)};
  CHECK(kvp_attention_cache_layout(s.attn, kBs, n, std::max(0, n - 4096), &prefill));
  const int pages = std::max(lay.num_pages, prefill.num_pages) + 2;
  kvp_kv_cache_options co{sizeof(co)};
  co.num_layers = 1; co.num_blocks = pages * batch; co.block_size = kBs; co.num_kv_heads = kHkv; co.head_size = kD;
  co.dtype = KVP_DTYPE_BFLOAT16;
  CHECK(kvp_kv_cache_create(ctx, &co, &s.cache));
  kvp_plan_options po{sizeof(po), batch, std::max(n, batch), pages * batch};
  CHECK(kvp_plan_create(ctx, &po, &s.plan));
  // The context goes in one sequence at a time in steps of 4096 tokens (a chunked prefill's writes;
  // attention over the context is not timed here). Each sequence owns pages [b * pages, ...).
  std::vector<float> kv(size_t(4096) * kHkv * kD);
  uint32_t x = 12345;
  for (float& f : kv) { x = x * 1664525u + 1013904223u; f = float(int(x >> 20) - 2048) / 2048.0f; }
  int64_t held = 0;
  for (int b = 0; b < batch; ++b) {
    std::vector<int32_t> token_pages(size_t(n / kBs + 2), -1), compressed;
    int32_t next_page = b * pages;
    std::vector<int32_t> free_list;
    auto take = [&] {
      if (!free_list.empty()) { const int32_t p = free_list.back(); free_list.pop_back(); return p; }
      return next_page++;
    };
    for (int p0 = 0; p0 < n; p0 += 4096) {
      const int q = std::min(4096, n - p0), end = p0 + q;
      kvp_cache_layout l{sizeof(l)};
      CHECK(kvp_attention_cache_layout(s.attn, kBs, end, p0, &l));
      for (int j = 0; j < l.window_first_page; ++j)
        if (token_pages[j] >= 0) free_list.push_back(token_pages[j]), token_pages[j] = -1;
      while (int(compressed.size()) < l.compressed_pages) compressed.push_back(take());
      std::vector<int32_t> list(compressed.begin(), compressed.begin() + l.compressed_pages);
      for (int j = l.window_first_page; j < l.window_first_page + l.window_pages; ++j) {
        if (token_pages[j] < 0) token_pages[j] = take();
        list.push_back(token_pages[j]);
      }
      if (next_page > (b + 1) * pages) { std::fprintf(stderr, "page budget exceeded\n"); std::exit(1); }
      std::vector<int64_t> slots(q);
      for (int i = 0; i < q; ++i) slots[i] = int64_t{token_pages[(p0 + i) / kBs]} * kBs + (p0 + i) % kBs;
      int32_t qsl[2] = {0, q}, indptr[2] = {0, int32_t(list.size())}, len = l.seq_len, pos = p0;
      kvp_batch kb{sizeof(kb)};
      kb.num_seqs = 1; kb.block_size = kBs; kb.query_start_loc = qsl; kb.seq_lens = &len; kb.kv_indptr = indptr;
      kb.kv_indices = list.data(); kb.slot_mapping = slots.data(); kb.query_pos_starts = &pos;
      CHECK(kvp_plan_update(s.plan, &kb));
      int64_t shape[3] = {q, kHkv, kD};
      DLTensor kt = Tensor(kv.data(), {kDLFloat, 32, 1}, 3, shape);
      CHECK(kvp_attention_write_kv(s.attn, s.plan, s.cache, 0, &kt, &kt));
    }
    // The decode step of token n: its layout drops the token pages the window left behind.
    for (int j = 0; j < lay.window_first_page; ++j)
      if (token_pages[j] >= 0) free_list.push_back(token_pages[j]), token_pages[j] = -1;
    while (int(compressed.size()) < lay.compressed_pages) compressed.push_back(take());
    if (token_pages[n / kBs] < 0) token_pages[n / kBs] = take();
    held += (next_page - b * pages) - int64_t(free_list.size());
    s.indices.insert(s.indices.end(), compressed.begin(), compressed.begin() + lay.compressed_pages);
    for (int j = lay.window_first_page; j < lay.window_first_page + lay.window_pages; ++j) s.indices.push_back(token_pages[j]);
    s.indptr.push_back(int32_t(s.indices.size()));
    s.lens.push_back(lay.seq_len);
    s.p0s.push_back(n);
  }
  s.pages_held = held;
  s.qsl.resize(batch + 1);
  for (int b = 0; b <= batch; ++b) s.qsl[b] = b;
  s.indptr.insert(s.indptr.begin(), 0);
  kvp_batch kb{sizeof(kb)};
  kb.num_seqs = batch; kb.block_size = kBs; kb.query_start_loc = s.qsl.data(); kb.seq_lens = s.lens.data();
  kb.kv_indptr = s.indptr.data(); kb.kv_indices = s.indices.data(); kb.query_pos_starts = s.p0s.data();
  CHECK(kvp_plan_update(s.plan, &kb));
  return s;
}

double TimeDecode(const Setup& s, int batch) {
  std::vector<float> q(size_t(batch) * kHq * kD, 0.01f), out(q.size());
  int64_t shape[3] = {batch, kHq, kD};
  DLTensor qt = Tensor(q.data(), {kDLFloat, 32, 1}, 3, shape), ot = Tensor(out.data(), {kDLFloat, 32, 1}, 3, shape);
  const auto t0 = std::chrono::steady_clock::now();
  CHECK(kvp_attention_run(s.attn, s.plan, s.cache, 0, &qt, &ot, nullptr));
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void Destroy(Setup& s) {
  api.kvp_plan_destroy(s.plan);
  api.kvp_attention_destroy(s.attn);
  api.kvp_kv_cache_destroy(s.cache);
}

}  // namespace

int main(int argc, char** argv) {
  const char* path = argc > 1 ? argv[1] : "libkvplug.so";
  const int threads = argc > 2 ? std::atoi(argv[2]) : 1;
  char error[512];
  if (kvp_api_load(&api, path, error, sizeof error) != 0) { std::fprintf(stderr, "%s\n", error); return 1; }
  kvp_context_options cop{sizeof(cop)};
  cop.num_threads = threads;
  kvp_context* ctx;
  CHECK(kvp_context_create(&cop, &ctx));
  std::printf("attamba vs dense decode on the CPU: GQA %d/%d, head %d, bfloat16 cache, page %d, window L=%d, %d "
              "thread(s); medians of 7 interleaved rounds\n", kHq, kHkv, kD, kBs, kWindow, threads);
  std::printf("| context | batch | P | KV pages attamba / dense | ratio | target 1/P + L/n | decode ms attamba | "
              "decode ms dense | speedup | 0.8 P |\n|---|---|---|---|---|---|---|---|---|---|\n");
  for (const auto& [n, batch] : {std::pair{32768, 2}, std::pair{131072, 1}}) {
    Setup dense = Build(ctx, "dense", 1, batch, n);
    for (int P : {4, 8, 16}) {
      Setup att = Build(ctx, "attamba", P, batch, n);
      std::vector<double> ta, td;
      for (int r = 0; r < 7; ++r) {
        td.push_back(TimeDecode(dense, batch));
        ta.push_back(TimeDecode(att, batch));
      }
      std::sort(ta.begin(), ta.end());
      std::sort(td.begin(), td.end());
      const double dense_pages = double(batch) * ((n + 1 + kBs - 1) / kBs);
      const double ratio = double(att.pages_held) / dense_pages;
      std::printf("| %d | %d | %d | %lld / %.0f | %.4f | %.4f | %.2f | %.2f | %.2fx | %.1fx |\n", n, batch, P,
                  static_cast<long long>(att.pages_held), dense_pages, ratio, 1.0 / P + double(kWindow) / n,
                  ta[3] * 1e3, td[3] * 1e3, td[3] / ta[3], 0.8 * P);
      std::fflush(stdout);
      Destroy(att);
    }
    Destroy(dense);
  }
  api.kvp_context_destroy(ctx);
  kvp_api_unload(&api);
  return 0;
}
