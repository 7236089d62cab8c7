// Cost of crossing the C ABI, measured through dlopen'd function pointers as an engine calls them:
// a trivial query, the per-step plan of a 256-sequence decode batch, and the argument checks of a
// minimal attention run (1 token over 1 cached position, so the work itself is negligible).
#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "kvplug/kvplug_dl.h"

namespace {

kvp_api api;

void Must(kvp_status s) {
  if (s != KVP_OK) {
    std::fprintf(stderr, "%s: %s\n", api.kvp_status_string(s), api.kvp_last_error());
    std::abort();
  }
}

void BM_TrivialCall(benchmark::State& state) {
  kvp_block_manager_options o{sizeof(o)};
  o.block_size = 16;
  o.num_device_blocks = 64;
  kvp_block_manager* bm;
  Must(api.kvp_block_manager_create(&o, &bm));
  Must(api.kvp_block_manager_allocate(bm, 1, nullptr, 10, 0, nullptr));
  int64_t n = 0;
  for (auto _ : state) {
    api.kvp_block_manager_num_tokens(bm, 1, &n);
    benchmark::DoNotOptimize(n);
  }
  api.kvp_block_manager_destroy(bm);
}
BENCHMARK(BM_TrivialCall);

void BM_PlanUpdateDecode256(benchmark::State& state) {
  const int B = 256, max_blocks = 64;
  kvp_context* ctx;
  Must(api.kvp_context_create(nullptr, &ctx));
  kvp_plan_options po{sizeof(po), B, B, B * max_blocks};
  kvp_plan* plan;
  Must(api.kvp_plan_create(ctx, &po, &plan));
  std::vector<int32_t> qsl(B + 1), lens(B), table(size_t(B) * max_blocks);
  for (int b = 0; b <= B; ++b) qsl[b] = b;
  for (int b = 0; b < B; ++b) lens[b] = 500 + b;
  for (size_t i = 0; i < table.size(); ++i) table[i] = int32_t(i);
  kvp_batch kb{sizeof(kb)};
  kb.num_seqs = B; kb.block_size = 16; kb.query_start_loc = qsl.data(); kb.seq_lens = lens.data();
  kb.block_table = table.data(); kb.block_table_stride = max_blocks;
  for (auto _ : state) Must(api.kvp_plan_update(plan, &kb));
  api.kvp_plan_destroy(plan);
  api.kvp_context_destroy(ctx);
}
BENCHMARK(BM_PlanUpdateDecode256);

void BM_AttentionRunMinimal(benchmark::State& state) {
  kvp_context_options co{sizeof(co)};
  co.num_threads = 1;
  kvp_context* ctx;
  Must(api.kvp_context_create(&co, &ctx));
  kvp_kv_cache_options ko{sizeof(ko)};
  ko.num_layers = 1; ko.num_blocks = 4; ko.block_size = 16; ko.num_kv_heads = 1; ko.head_size = 64;
  kvp_kv_cache* cache;
  Must(api.kvp_kv_cache_create(ctx, &ko, &cache));
  kvp_attention_options ao{sizeof(ao)};
  ao.backend = "dense"; ao.num_q_heads = 1; ao.num_kv_heads = 1; ao.head_size = 64;
  kvp_attention* attn;
  Must(api.kvp_attention_create(ctx, &ao, &attn));
  kvp_plan_options po{sizeof(po), 1, 1, 1};
  kvp_plan* plan;
  Must(api.kvp_plan_create(ctx, &po, &plan));
  int32_t qsl[2] = {0, 1}, lens[1] = {1}, table[1] = {0};
  kvp_batch kb{sizeof(kb)};
  kb.num_seqs = 1; kb.block_size = 16; kb.query_start_loc = qsl; kb.seq_lens = lens; kb.block_table = table;
  kb.block_table_stride = 1;
  Must(api.kvp_plan_update(plan, &kb));
  std::vector<float> q(64, 0.5f), out(64);
  int64_t shape[3] = {1, 1, 64};
  DLTensor qt{q.data(), {kDLCPU, 0}, 3, {kDLFloat, 32, 1}, shape, nullptr, 0};
  DLTensor ot{out.data(), {kDLCPU, 0}, 3, {kDLFloat, 32, 1}, shape, nullptr, 0};
  for (auto _ : state) {
    Must(api.kvp_attention_run(attn, plan, cache, 0, &qt, &ot, nullptr));
    benchmark::DoNotOptimize(out.data());
  }
  api.kvp_plan_destroy(plan);
  api.kvp_attention_destroy(attn);
  api.kvp_kv_cache_destroy(cache);
  api.kvp_context_destroy(ctx);
}
BENCHMARK(BM_AttentionRunMinimal);

}  // namespace

int main(int argc, char** argv) {
  std::string path = std::getenv("KVP_LIBRARY") ? std::getenv("KVP_LIBRARY") : "abi/libkvplug.so";
  char error[512];
  if (kvp_api_load(&api, path.c_str(), error, sizeof error) != 0) {
    std::fprintf(stderr, "%s (set KVP_LIBRARY)\n", error);
    return 1;
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
