// Google Benchmark of the block manager's hot paths.
//   BM_DecodeStep256: one decode step of 256 resident sequences (prefix caching on): Append of one
//                     token plus a BlockTable read for each. Time is per step.
//   BM_AllocateFree:  allocate a 512-token prompt whose first 256 tokens are a cached prefix (held by
//                     a resident sequence), then free it.
//   BM_SlotMapping:   slot mapping of `count` positions of a 4096-token sequence.
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <vector>

#include "benchmark/benchmark.h"
#include "kvplug/paged_memory/block_manager.h"

namespace kvplug::paged {
namespace {

std::unique_ptr<BlockManager> MakeManager(int32_t block_size, int32_t blocks, bool caching) {
  BlockManagerOptions o;
  o.block_size = block_size;
  o.num_device_blocks = blocks;
  o.enable_prefix_caching = caching;
  auto m = BlockManager::Create(o);
  if (!m.ok()) {
    std::fprintf(stderr, "BlockManager::Create: %s\n", m.status().ToString().c_str());
    std::abort();
  }
  return std::move(*m);
}

void Check(const absl::Status& s) {
  if (!s.ok()) {
    std::fprintf(stderr, "%s\n", s.ToString().c_str());
    std::abort();
  }
}

constexpr int kNumSeqs = 256;
constexpr int kPromptLen = 128;
constexpr int kSharedPrefix = 64;
constexpr int kStepsPerRound = 512;  // sequences are re-created after this many steps

void AllocateBatch(BlockManager& m, const std::vector<int32_t>& prompt_base, int round) {
  std::vector<int32_t> prompt = prompt_base;
  for (int s = 0; s < kNumSeqs; ++s) {
    // Shared prefix, then a per-sequence (and per-round) tail.
    for (int i = kSharedPrefix; i < kPromptLen; ++i) prompt[i] = 100000 + s * 1000 + i + round;
    auto r = m.Allocate(static_cast<uint64_t>(s), prompt, 0);
    Check(r.status());
    Check(m.MarkComputed(static_cast<uint64_t>(s), kPromptLen));
  }
}

void BM_DecodeStep256(benchmark::State& state) {
  const bool caching = state.range(0) != 0;
  auto m = MakeManager(16, 16384, caching);
  std::vector<int32_t> prompt(kPromptLen);
  std::iota(prompt.begin(), prompt.end(), 1);
  int round = 0;
  AllocateBatch(*m, prompt, round);
  std::vector<int32_t> next_token(kNumSeqs);
  std::iota(next_token.begin(), next_token.end(), 7);
  int steps = 0;
  for (auto _ : state) {
    for (int s = 0; s < kNumSeqs; ++s) {
      const uint64_t id = static_cast<uint64_t>(s);
      auto r = m->Append(id, absl::MakeConstSpan(&next_token[s], 1), 1);
      benchmark::DoNotOptimize(r);
      // The engine reports the step computed, publishing blocks that just filled up.
      Check(m->MarkComputed(id, kPromptLen + steps + 1));
      auto table = m->BlockTable(id);
      benchmark::DoNotOptimize(table);
      next_token[s] = next_token[s] * 31 + 17;
    }
    if (++steps == kStepsPerRound) {
      state.PauseTiming();
      for (int s = 0; s < kNumSeqs; ++s) Check(m->Free(static_cast<uint64_t>(s)));
      AllocateBatch(*m, prompt, ++round);
      steps = 0;
      state.ResumeTiming();
    }
  }
  state.SetItemsProcessed(state.iterations() * kNumSeqs);
  state.counters["seqs"] = kNumSeqs;
}
BENCHMARK(BM_DecodeStep256)->Arg(1)->Arg(0)->ArgName("prefix_caching");

void BM_AllocateFree(benchmark::State& state) {
  auto m = MakeManager(16, 4096, true);
  std::vector<int32_t> prompt(512);
  std::iota(prompt.begin(), prompt.end(), 1);
  // A resident sequence keeps the 256-token prefix cached (and used).
  Check(m->Allocate(1u << 30, absl::MakeConstSpan(prompt.data(), 257), 0).status());
  Check(m->MarkComputed(1u << 30, 257));
  int32_t salt = 0;
  int64_t cached_total = 0;
  for (auto _ : state) {
    prompt[256] = 1000000 + (salt++);  // a new tail each time: 16 hits, 16 fresh blocks
    auto r = m->Allocate(7, prompt, 0);
    benchmark::DoNotOptimize(r);
    cached_total += r.ok() ? *r : 0;
    Check(m->MarkComputed(7, 512));
    Check(m->Free(7));
  }
  state.counters["cached_tokens"] =
      benchmark::Counter(static_cast<double>(cached_total), benchmark::Counter::kAvgIterations);
  state.counters["evictions"] = benchmark::Counter(static_cast<double>(m->Stats().num_evictions),
                                                   benchmark::Counter::kAvgIterations);
}
BENCHMARK(BM_AllocateFree);

void BM_SlotMapping(benchmark::State& state) {
  const int64_t count = state.range(0);
  auto m = MakeManager(16, 4096, false);
  std::vector<int32_t> prompt(4096, 1);
  Check(m->Allocate(1, prompt, 0).status());
  std::vector<int64_t> out(count);
  const int64_t start = 4096 - count;
  for (auto _ : state) {
    Check(m->SlotMapping(1, start, count, absl::MakeSpan(out)));
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * count);
}
BENCHMARK(BM_SlotMapping)->Arg(1)->Arg(256)->Arg(4096);

}  // namespace
}  // namespace kvplug::paged

BENCHMARK_MAIN();
