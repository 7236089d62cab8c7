// The kernel family on the CUDA engine: the variant harness's random ragged batches (every planner:
// causal, window, Star-like anchor + block, random segments with position maps; scale tables, soft
// cap, entropy; split-KV on long decodes) against the double-precision mask reference, and
// merge_states on the GPU against the CPU. Without a GPU every test skips with a message.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdlib>

#include "../attention/variant_harness.h"
#include "kvplug/attention/cpu_engine.h"
#include "kvplug/attention/engine.h"
#include "kvplug/attention/kv_write.h"
#include "kvplug/attention/star/star.h"
#include "kvplug/attention/telemetry.h"
#include "kvplug/attention/thread_pool.h"

namespace kvplug::testing {
namespace {

using attn::ExecContext;
using attn::HeadConfig;

#define CUDA_OK(call) ASSERT_EQ((call), cudaSuccess) << #call

bool HaveGpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

template <class T>
struct DeviceBuffer {
  T* p = nullptr;
  explicit DeviceBuffer(size_t n) {
    if (cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)) != cudaSuccess) p = nullptr;
  }
  ~DeviceBuffer() { cudaFree(p); }
};

TensorView DView(void* data, DType dtype, std::initializer_list<int64_t> shape, Device device = Device::kCuda) {
  return testing::View(data, dtype, shape, device);
}

struct GpuResult {
  std::vector<float> out, lse, entropy;
  bool ok = false;
};

// Runs the harness's batch on the GPU through `backend` (default: the harness's planner and
// variant); with `summary`, also the entropy telemetry summary.
void RunOnGpu(const HarnessData& d, GpuResult* r, const std::function<std::unique_ptr<attn::AttentionBackend>(
                                                      const ExecContext&)>& make_backend = nullptr,
              std::vector<float>* summary = nullptr) {
  const HarnessCase& c = d.c;
  const HeadConfig heads{c.num_q_heads, c.num_kv_heads, c.head_size, c.kv_dtype,
                         1.0f / std::sqrt(static_cast<float>(c.head_size))};
  ASSERT_TRUE(attn::CheckCudaEngineSupport(heads).ok());
  // The device cache, filled with the CPU cache's bytes (same options, same contiguous layout).
  kv::KvCacheOptions o = d.cache->options();
  o.device = Device::kCuda;
  auto gcache = kv::KvCache::Create(o);
  ASSERT_TRUE(gcache.ok()) << gcache.status();
  const kv::PagedLayer& cpu_pages = d.cache->layer(0);
  CUDA_OK(cudaMemcpy((*gcache)->layer(0).data, cpu_pages.data,
                     size_t(2 * cpu_pages.stride_kv) * DTypeSize(cpu_pages.dtype), cudaMemcpyHostToDevice));
  const int64_t ws_bytes = attn::CudaEngineWorkspaceBytes(heads);
  DeviceBuffer<uint8_t> ws{static_cast<size_t>(ws_bytes)};
  int sms = 0;
  CUDA_OK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const ExecContext exec{Device::kCuda, 0, nullptr, nullptr, ws.p, ws_bytes, sms};
  DeviceBuffer<float> table(d.scale_table.size());
  if (!d.scale_table.empty())
    CUDA_OK(cudaMemcpy(table.p, d.scale_table.data(), d.scale_table.size() * 4, cudaMemcpyHostToDevice));
  attn::VariantParams v{heads.sm_scale, c.soft_cap, c.scale_table ? table.p : nullptr, d.table_len};
  std::unique_ptr<attn::AttentionBackend> own =
      make_backend ? make_backend(exec) : std::make_unique<HarnessBackend>(c.planner, heads, v);
  ASSERT_TRUE(own);
  const attn::AttentionBackend& backend = *own;
  attn::BatchPlan plan(CapacityOf(d));
  ASSERT_TRUE(plan.EnableDevice(0).ok());
  ASSERT_TRUE(plan.Update(InputOf(d)).ok());
  attn::StepWorkSet steps;
  auto work = steps.Get(attn::StepKey(backend, heads), backend, heads, plan, exec);
  ASSERT_TRUE(work.ok()) << work.status();

  const int64_t T = d.num_tokens, Hq = c.num_q_heads, D = c.head_size;
  const size_t elems = size_t(T * Hq * D);
  std::vector<uint8_t> qhost(elems * DTypeSize(c.q_dtype));
  for (size_t i = 0; i < elems; ++i) StoreFromFloat(qhost.data(), c.q_dtype, int64_t(i), d.q[i]);
  DeviceBuffer<uint8_t> q(qhost.size()), out(qhost.size());
  DeviceBuffer<float> lse(size_t(T * Hq)), ent(size_t(T * Hq));
  CUDA_OK(cudaMemcpy(q.p, qhost.data(), qhost.size(), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemset(out.p, 0xff, qhost.size()));  // NaN patterns: an unwritten row shows
  TensorView qv = DView(q.p, c.q_dtype, {T, Hq, D}), ov = DView(out.p, c.q_dtype, {T, Hq, D});
  TensorView lv = DView(lse.p, DType::kF32, {T, Hq}), ev = DView(ent.p, DType::kF32, {T, Hq});
  DeviceBuffer<float> sum(size_t(Hq) * attn::kEntropySummaryFields);
  TensorView sv = DView(sum.p, DType::kF32, {Hq, attn::kEntropySummaryFields});
  const attn::RunArgs args{plan, **work, **gcache, 0, qv,
                           {&ov, &lv, c.entropy ? &ev : nullptr, summary ? &sv : nullptr}, exec};
  ASSERT_TRUE(attn::ValidateRun(heads, args).ok());
  const absl::Status s = backend.Run(args);
  ASSERT_TRUE(s.ok()) << s;
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<uint8_t> ohost(qhost.size());
  CUDA_OK(cudaMemcpy(ohost.data(), out.p, ohost.size(), cudaMemcpyDeviceToHost));
  r->out.resize(elems);
  for (size_t i = 0; i < elems; ++i) r->out[i] = LoadAsFloat(ohost.data(), c.q_dtype, int64_t(i));
  r->lse.resize(size_t(T * Hq));
  CUDA_OK(cudaMemcpy(r->lse.data(), lse.p, r->lse.size() * 4, cudaMemcpyDeviceToHost));
  if (summary) {
    summary->resize(size_t(Hq) * attn::kEntropySummaryFields);
    CUDA_OK(cudaMemcpy(summary->data(), sum.p, summary->size() * 4, cudaMemcpyDeviceToHost));
  }
  if (c.entropy) {
    r->entropy.resize(size_t(T * Hq));
    CUDA_OK(cudaMemcpy(r->entropy.data(), ent.p, r->entropy.size() * 4, cudaMemcpyDeviceToHost));
  }
  r->ok = true;
}

class VariantGpu : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!HaveGpu()) GTEST_SKIP() << "no CUDA device: GPU test skipped";
  }
};

void CheckOnGpu(const HarnessCase& c) {
  HarnessData d;
  BuildHarness(c, &d);
  GpuResult r;
  RunOnGpu(d, &r);
  ASSERT_TRUE(r.ok);
  const HarnessErrors e = Compare(d, r.out, r.lse, r.entropy);
  const double tol = c.q_dtype == DType::kF16 ? 4e-3 : 2e-2;
  std::printf("  %-22s Hq=%2d Hkv=%d D=%3d bs=%2d %s pairs=%8lld | max|err| out %.2e lse %.2e entropy %.2e\n",
              c.planner->Key().c_str(), c.num_q_heads, c.num_kv_heads, c.head_size, c.block_size,
              std::string(DTypeName(c.q_dtype)).c_str(), static_cast<long long>(d.visible_pairs), e.out, e.lse,
              e.entropy);
  EXPECT_LE(e.out, tol) << c.planner->Key();
  EXPECT_LE(e.lse, 1e-2) << c.planner->Key();
  if (c.entropy) EXPECT_LE(e.entropy, 2e-2) << c.planner->Key();
}

TEST_F(VariantGpu, RandomBatchesEveryPlannerAndFeature) {
  std::mt19937 rng(77);
  const int32_t gqa[][2] = {{4, 4}, {8, 2}, {16, 2}, {32, 4}};
  const int32_t heads[] = {64, 128, 256};
  const int32_t blocks[] = {16, 32, 24};
  // KVP_GPU_TRIALS trims the sweep for the compute-sanitizer runs.
  const int trials = std::getenv("KVP_GPU_TRIALS") ? std::atoi(std::getenv("KVP_GPU_TRIALS")) : 36;
  for (int trial = 0; trial < trials; ++trial) {
    HarnessCase c;
    c.num_q_heads = gqa[trial % 4][0];
    c.num_kv_heads = gqa[trial % 4][1];
    c.head_size = heads[(trial / 4) % 3];
    c.block_size = blocks[trial % 3];
    c.seqs = RandomSeqs(rng, c.block_size, 300);
    c.kv_dtype = c.q_dtype = trial % 2 ? DType::kBF16 : DType::kF16;
    c.soft_cap = trial % 5 == 1 ? 3.0f : 0.0f;
    c.scale_table = trial % 3 == 2;
    c.entropy = trial % 4 != 0;  // the identity kernel runs when nothing needs the general one
    c.seed = 500 + trial;
    switch (trial % 4) {
      case 0: c.planner = std::make_shared<attn::CausalPlanner>(-1); break;
      case 1: c.planner = std::make_shared<attn::CausalPlanner>(static_cast<int32_t>(rng() % 100)); break;
      case 2: c.planner = StarLikePlanner(32 + static_cast<int32_t>(rng() % 64), 1 + static_cast<int32_t>(rng() % 40)); break;
      default: c.planner = RandomPlanner(static_cast<uint32_t>(rng())); break;
    }
    CheckOnGpu(c);
  }
}

TEST_F(VariantGpu, LongDecodesSplitAcrossCtasAndMerge) {
  // Few long sequences, one query each: the planner splits their keys across CTAs.
  for (const bool entropy : {false, true}) {
    HarnessCase c;
    c.num_q_heads = 32;
    c.num_kv_heads = 8;
    c.head_size = 128;
    c.seqs = {{9000, 1}, {4097, 1}, {700, 1}};
    c.kv_dtype = c.q_dtype = DType::kBF16;
    c.entropy = entropy;
    c.planner = std::make_shared<attn::CausalPlanner>(entropy ? 3000 : -1);
    CheckOnGpu(c);
  }
}

TEST_F(VariantGpu, StarLikeLongContext) {
  HarnessCase c;
  c.num_q_heads = 8;
  c.num_kv_heads = 2;
  c.head_size = 128;
  c.seqs = {{2048, 2048}, {1500, 700}};
  c.kv_dtype = c.q_dtype = DType::kBF16;
  c.planner = StarLikePlanner(512, 512);
  CheckOnGpu(c);
}

bool DeviceIsSm90() {
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0);
  return major == 9 && minor == 0;
}

// The shapes FlashInfer's sm_90 prefill takes (one causal key run ending at the last query: whole
// prompts, chunks after a prefix, off-power-of-two pages, beside decodes of the same step), checked
// against the CPU reference with the launch counts showing which path ran; then the shapes that
// must stay on kvplug's kernel (entropy, a window, Star-like anchor + block).
TEST_F(VariantGpu, FlashInferPrefillPathMatchesTheCpu) {
  const bool fi = attn::CudaEngineHasFlashInfer() && DeviceIsSm90() &&
                  std::string(std::getenv("KVP_CUDA_PREFILL") ? std::getenv("KVP_CUDA_PREFILL") : "") != "kvplug";
  if (!fi) std::printf("  (no FlashInfer path here: build %d, sm_90 %d; checking the kvplug path)\n",
                       attn::CudaEngineHasFlashInfer() ? 1 : 0, DeviceIsSm90() ? 1 : 0);
  struct Shape {
    int32_t hq, hkv, bs;
    DType dt;
    std::vector<std::pair<int32_t, int32_t>> seqs;
  };
  const Shape shapes[] = {
      {32, 8, 16, DType::kBF16, {{1000, 1000}}},
      {32, 8, 16, DType::kF16, {{700, 300}, {129, 129}, {2000, 1}, {64, 33}}},
      {8, 2, 24, DType::kBF16, {{333, 333}, {4097, 4}, {500, 250}}},
      {16, 2, 64, DType::kF16, {{1, 1}, {1500, 1500}, {77, 20}, {300, 299}}},
      {4, 4, 32, DType::kBF16, {{257, 257}, {90, 17}}},
  };
  for (const Shape& sh : shapes) {
    HarnessCase c;
    c.num_q_heads = sh.hq;
    c.num_kv_heads = sh.hkv;
    c.head_size = 128;
    c.block_size = sh.bs;
    c.seqs = sh.seqs;
    c.kv_dtype = c.q_dtype = sh.dt;
    c.entropy = false;
    c.seed = 900 + sh.bs;
    c.planner = std::make_shared<attn::CausalPlanner>(-1);
    const attn::CudaPrefillCounts before = attn::GetCudaPrefillCounts();
    CheckOnGpu(c);
    const attn::CudaPrefillCounts after = attn::GetCudaPrefillCounts();
    const bool built = attn::CudaEngineHasFlashInfer(sh.dt, 128);
    EXPECT_EQ(after.flashinfer_launches - before.flashinfer_launches, fi && built ? 1 : 0) << "FlashInfer path";
  }
  // Not exact on FlashInfer: entropy (k = 0) and a window (k = 1) stay on kvplug's kernel; a
  // Star-like step (k = 2) runs its first blocks (one causal run) on FlashInfer and the anchor +
  // block spans on kvplug's kernel in the same run.
  for (int k = 0; k < 3; ++k) {
    HarnessCase c;
    c.num_q_heads = 32;
    c.num_kv_heads = 8;
    c.head_size = 128;
    c.seqs = {{600, 600}, {300, 100}};
    c.kv_dtype = c.q_dtype = DType::kBF16;
    c.entropy = k == 0;
    c.planner = k == 1 ? std::shared_ptr<attn::KeySetPlanner>(std::make_shared<attn::CausalPlanner>(200))
                       : k == 2 ? StarLikePlanner(256, 64)
                                : std::shared_ptr<attn::KeySetPlanner>(std::make_shared<attn::CausalPlanner>(-1));
    const attn::CudaPrefillCounts before = attn::GetCudaPrefillCounts();
    CheckOnGpu(c);
    const attn::CudaPrefillCounts after = attn::GetCudaPrefillCounts();
    EXPECT_EQ(after.flashinfer_launches - before.flashinfer_launches,
              k == 2 && fi && attn::CudaEngineHasFlashInfer(DType::kBF16, 128) ? 1 : 0)
        << "case " << k;
    EXPECT_GT(after.kvplug_launches, before.kvplug_launches) << "case " << k;
  }
}

// The Star backend's own planner (phase 1 anchor + block, phase 2, shards) on the CUDA engine.
TEST_F(VariantGpu, StarPlannerPhasesAndShards) {
  auto star_planner = [](int32_t block, int32_t anchor, int32_t shards, int32_t rank) {
    return std::make_shared<attn::star::StarPlanner>(attn::StarConfig{block, anchor, shards, rank, shards - 1});
  };
  HarnessCase c;
  c.num_q_heads = 8;
  c.num_kv_heads = 2;
  c.head_size = 128;
  c.kv_dtype = c.q_dtype = DType::kBF16;
  // A whole context in one step, a chunk crossing the context boundary, a decode after it.
  c.seqs = {{4096, 4096}, {3000, 700}, {5000, 1}};
  c.context_lens = {4096, 2800, 4900};
  c.planner = star_planner(1024, 1024, 1, 0);
  CheckOnGpu(c);
  // Anchor and block off page boundaries, fp16, head 64.
  c.head_size = 64;
  c.kv_dtype = c.q_dtype = DType::kF16;
  c.seqs = {{1337, 1337}, {900, 333}};
  c.context_lens = {1300, 900};
  c.planner = star_planner(100, 37, 1, 0);
  CheckOnGpu(c);
  // Shard 1 of 3 in phase 1: the anchor first, then its blocks 1, 4 (block 200, anchor 64).
  c.seqs = {{64 + 400, 464}};
  c.context_lens = {1000};
  c.query_pos_starts = {0};
  c.planner = star_planner(200, 64, 3, 1);
  CheckOnGpu(c);
  // Phase 2 on shards: a non-appending shard with keys, one with none (an empty partial), the
  // appending one with its query keys.
  c.seqs = {{400, 5}, {0, 3}};
  c.context_lens = {1000, 90};
  c.query_pos_starts = {1000, 90};
  c.planner = star_planner(200, 64, 3, 1);
  CheckOnGpu(c);
  c.seqs = {{200 + 9, 9}};
  c.context_lens = {1000};
  c.query_pos_starts = {1000};
  c.planner = star_planner(200, 64, 3, 2);
  CheckOnGpu(c);
}

// The entropy backend on CUDA (its temperature table uploaded at creation, the summary kernel)
// against the same backend on the CPU; dense's summary without per-row entropy (the scratch path).
TEST_F(VariantGpu, EntropyBackendAndTelemetryMatchTheCpu) {
  HarnessCase c;
  c.num_q_heads = 8;
  c.num_kv_heads = 2;
  c.head_size = 128;
  c.kv_dtype = c.q_dtype = DType::kBF16;
  c.seqs = {{1500, 1500}, {3000, 37}, {20000, 1}, {700, 1}};  // prefill, chunk, long decode (split-KV), decode
  HarnessData d;
  BuildHarness(c, &d);
  std::vector<float> temperature(size_t(c.num_q_heads) * 100);
  for (size_t i = 0; i < temperature.size(); ++i) temperature[i] = 0.4f + 0.02f * float(i % 97);
  const HeadConfig heads{c.num_q_heads, c.num_kv_heads, c.head_size, c.kv_dtype,
                         1.0f / std::sqrt(static_cast<float>(c.head_size))};
  for (const char* name : {"entropy", "dense"}) {
    const attn::BackendConfig cfg = std::string(name) == "entropy" ? attn::BackendConfig{attn::EntropyConfig{temperature, false}}
                                                                   : attn::BackendConfig{attn::DenseConfig{}};
    auto make = [&](const ExecContext& exec) {
      auto b = attn::CreateBackend(*attn::FindBackend(name), heads, cfg, exec);
      EXPECT_TRUE(b.ok()) << b.status();
      return b.ok() ? std::move(*b) : nullptr;
    };
    // The CPU reference: the same backend on the CPU engine over the CPU cache.
    attn::ThreadPool pool(4);
    const ExecContext cpu{Device::kCpu, 0, &pool, nullptr};
    auto cpu_backend = make(cpu);
    ASSERT_TRUE(cpu_backend);
    attn::BatchPlan plan(CapacityOf(d));
    ASSERT_TRUE(plan.Update(InputOf(d)).ok());
    attn::StepWorkSet steps;
    auto work = steps.Get(attn::StepKey(*cpu_backend, heads), *cpu_backend, heads, plan, cpu);
    ASSERT_TRUE(work.ok());
    const int64_t T = d.num_tokens, Hq = c.num_q_heads, D = c.head_size;
    std::vector<uint8_t> qh(size_t(T * Hq * D) * 2), oh(qh.size());
    for (size_t i = 0; i < size_t(T * Hq * D); ++i) StoreFromFloat(qh.data(), c.q_dtype, int64_t(i), d.q[i]);
    std::vector<float> lse(size_t(T * Hq)), ent(lse.size()), sum(size_t(Hq) * attn::kEntropySummaryFields);
    TensorView qv = View(qh.data(), c.q_dtype, {T, Hq, D}), ov = View(oh.data(), c.q_dtype, {T, Hq, D});
    TensorView lv = View(lse.data(), DType::kF32, {T, Hq}), ev = View(ent.data(), DType::kF32, {T, Hq});
    TensorView sv = View(sum.data(), DType::kF32, {Hq, attn::kEntropySummaryFields});
    const attn::RunArgs args{plan, **work, *d.cache, 0, qv, {&ov, &lv, &ev, &sv}, cpu};
    ASSERT_TRUE(cpu_backend->Run(args).ok());
    GpuResult r;
    std::vector<float> gsum;
    c.entropy = std::string(name) == "entropy";  // dense: the summary alone (scratch entropy)
    HarnessData& dm = d;
    dm.c.entropy = c.entropy;
    RunOnGpu(dm, &r, make, &gsum);
    ASSERT_TRUE(r.ok);
    double e_out = 0, e_ent = 0, e_sum = 0;
    for (size_t i = 0; i < r.out.size(); ++i)
      e_out = std::max(e_out, double(std::abs(r.out[i] - LoadAsFloat(oh.data(), c.q_dtype, int64_t(i)))));
    for (size_t i = 0; i < r.entropy.size(); ++i) e_ent = std::max(e_ent, double(std::abs(r.entropy[i] - ent[i])));
    for (size_t i = 0; i < sum.size(); ++i) {
      const int field = int(i % attn::kEntropySummaryFields);
      if (field == 0 || field == 2) EXPECT_EQ(gsum[i], sum[i]) << "head " << i / 6 << " field " << field;
      else if (field >= 4) EXPECT_LE(std::abs(gsum[i] - sum[i]), 2.0f) << "band counts: only rows at an edge";
      else e_sum = std::max(e_sum, double(std::abs(gsum[i] - sum[i])));
    }
    std::printf("  %-8s max|err| vs CPU: out %.2e entropy %.2e summary %.2e\n", name, e_out, e_ent, e_sum);
    EXPECT_LE(e_out, 2e-2);
    EXPECT_LE(e_ent, 2e-2);
    EXPECT_LE(e_sum, 2e-2);  // the means, to bf16 accuracy
  }
}

TEST_F(VariantGpu, MergeStatesMatchesTheCpu) {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  const int64_t S = 5, T = 7, H = 6, D = 128;
  std::vector<float> po(size_t(S * T * H * D)), pl(size_t(S * T * H)), pe(pl.size());
  for (auto& x : po) x = normal(rng);
  for (auto& x : pe) x = std::abs(normal(rng));
  for (size_t i = 0; i < pl.size(); ++i) pl[i] = i % 7 == 0 ? -INFINITY : normal(rng) * 60.0f;  // gaps > 100 nats
  DeviceBuffer<float> dpo(po.size()), dpl(pl.size()), dpe(pe.size()), dout(size_t(T * H * D)), dl(size_t(T * H)),
      de(size_t(T * H));
  CUDA_OK(cudaMemcpy(dpo.p, po.data(), po.size() * 4, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(dpl.p, pl.data(), pl.size() * 4, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(dpe.p, pe.data(), pe.size() * 4, cudaMemcpyHostToDevice));
  TensorView g[6] = {DView(dpo.p, DType::kF32, {S, T, H, D}), DView(dpl.p, DType::kF32, {S, T, H}),
                     DView(dpe.p, DType::kF32, {S, T, H}),    DView(dout.p, DType::kF32, {T, H, D}),
                     DView(dl.p, DType::kF32, {T, H}),        DView(de.p, DType::kF32, {T, H})};
  ASSERT_TRUE(attn::MergeStatesCuda({&g[0], &g[1], &g[2], &g[3], &g[4], &g[5]}, nullptr).ok());
  std::vector<float> out(size_t(T * H * D)), lse(size_t(T * H)), ent(lse.size());
  CUDA_OK(cudaMemcpy(out.data(), dout.p, out.size() * 4, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(lse.data(), dl.p, lse.size() * 4, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(ent.data(), de.p, ent.size() * 4, cudaMemcpyDeviceToHost));
  std::vector<float> rout(out.size()), rlse(lse.size()), rent(ent.size());
  TensorView c[6] = {DView(po.data(), DType::kF32, {S, T, H, D}, Device::kCpu),
                     DView(pl.data(), DType::kF32, {S, T, H}, Device::kCpu),
                     DView(pe.data(), DType::kF32, {S, T, H}, Device::kCpu),
                     DView(rout.data(), DType::kF32, {T, H, D}, Device::kCpu),
                     DView(rlse.data(), DType::kF32, {T, H}, Device::kCpu),
                     DView(rent.data(), DType::kF32, {T, H}, Device::kCpu)};
  attn::ThreadPool pool(1);
  attn::MergeStatesCpu({&c[0], &c[1], &c[2], &c[3], &c[4], &c[5]}, &pool);
  for (size_t i = 0; i < out.size(); ++i) ASSERT_NEAR(out[i], rout[i], 1e-5) << i;
  for (size_t i = 0; i < lse.size(); ++i) {
    if (std::isinf(rlse[i])) ASSERT_EQ(lse[i], rlse[i]) << i;
    else ASSERT_NEAR(lse[i], rlse[i], 1e-4) << i;
    ASSERT_NEAR(ent[i], rent[i], 1e-3) << i;
  }
}


// The previous-token mix write on the GPU, chunked across steps (state carried in device state
// slots), against the formula over each whole sequence.
TEST_F(VariantGpu, PrevTokenMixWriteIsExactAcrossChunks) {
  constexpr int H = 8, D = 128, BS = 16;
  const std::vector<int32_t> lens = {300, 37, 1};
  std::mt19937 rng(9);
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> wide(-3.0f, 3.0f);
  std::vector<float> coef(4 * H);
  for (auto& x : coef) x = wide(rng);
  std::vector<std::vector<float>> k(lens.size()), v(lens.size());
  std::vector<std::vector<int32_t>> tables(lens.size());
  int32_t next = 0;
  for (size_t b = 0; b < lens.size(); ++b) {
    k[b].resize(size_t(lens[b]) * H * D);
    v[b].resize(k[b].size());
    for (auto& x : k[b]) x = normal(rng);
    for (auto& x : v[b]) x = normal(rng);
    for (int j = 0; j < (lens[b] + BS - 1) / BS; ++j) tables[b].push_back(next++);
  }
  std::reverse(tables[0].begin(), tables[0].end());  // shuffled pages
  kv::KvCacheOptions o;
  o.num_layers = 1;
  o.num_blocks = next;
  o.block_size = BS;
  o.num_kv_heads = H;
  o.head_size = D;
  o.dtype = DType::kBF16;
  o.num_state_slots = 3;
  o.state_bytes_per_layer = attn::PrevTokenStateBytes(H, D);
  o.device = Device::kCuda;
  auto cache = kv::KvCache::Create(o);
  ASSERT_TRUE(cache.ok()) << cache.status();
  DeviceBuffer<float> dcoef(coef.size());
  CUDA_OK(cudaMemcpy(dcoef.p, coef.data(), coef.size() * 4, cudaMemcpyHostToDevice));
  const attn::PrevTokenMix mix{dcoef.p, dcoef.p + H, dcoef.p + 2 * H, dcoef.p + 3 * H};
  const ExecContext exec{Device::kCuda, 0, nullptr, nullptr, nullptr, 0, 1};
  // Steps: (from, to) per sequence; a chunk off the block boundary, decodes, a sequence absent.
  const std::vector<std::vector<std::pair<int32_t, int32_t>>> steps = {
      {{0, 100}, {0, 20}, {0, 1}}, {{100, 250}, {20, 21}, {1, 1}}, {{250, 299}, {21, 37}, {1, 1}}, {{299, 300}, {37, 37}, {1, 1}}};
  for (const auto& step : steps) {
    std::vector<int32_t> qsl{0}, seq_lens, indptr{0}, indices, state_slots;
    std::vector<int64_t> slots;
    std::vector<float> kin, vin;
    for (size_t b = 0; b < step.size(); ++b) {
      const auto [from, to] = step[b];
      qsl.push_back(qsl.back() + to - from);
      seq_lens.push_back(std::max(to, 1));
      for (int j = 0; j < (std::max(to, 1) + BS - 1) / BS; ++j) indices.push_back(tables[b][j]);
      indptr.push_back(int32_t(indices.size()));
      state_slots.push_back(int32_t(b));
      for (int32_t pos = from; pos < to; ++pos) {
        slots.push_back(int64_t{tables[b][pos / BS]} * BS + pos % BS);
        kin.insert(kin.end(), k[b].begin() + size_t(pos) * H * D, k[b].begin() + size_t(pos + 1) * H * D);
        vin.insert(vin.end(), v[b].begin() + size_t(pos) * H * D, v[b].begin() + size_t(pos + 1) * H * D);
      }
    }
    const int64_t T = qsl.back();
    attn::BatchPlan plan(attn::PlanCapacity{3, 512, 64});
    ASSERT_TRUE(plan.EnableDevice(0).ok());
    attn::BatchInput in;
    in.num_seqs = 3;
    in.block_size = BS;
    in.query_start_loc = qsl.data();
    in.seq_lens = seq_lens.data();
    in.kv_indptr = indptr.data();
    in.kv_indices = indices.data();
    in.slot_mapping = slots.data();
    in.state_slots = state_slots.data();
    ASSERT_TRUE(plan.Update(in).ok());
    DeviceBuffer<float> dk(kin.size()), dv(vin.size());
    CUDA_OK(cudaMemcpy(dk.p, kin.data(), kin.size() * 4, cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemcpy(dv.p, vin.data(), vin.size() * 4, cudaMemcpyHostToDevice));
    TensorView kt = DView(dk.p, DType::kF32, {T, H, D}), vt = DView(dv.p, DType::kF32, {T, H, D});
    const absl::Status s = attn::WritePagedKv(attn::WriteArgs{plan, **cache, 0, kt, vt, exec}, &mix);
    ASSERT_TRUE(s.ok()) << s;
    CUDA_OK(cudaDeviceSynchronize());
  }
  const kv::PagedLayer& pages = (*cache)->layer(0);
  std::vector<uint16_t> host(size_t(2 * pages.stride_kv));
  CUDA_OK(cudaMemcpy(host.data(), pages.data, host.size() * 2, cudaMemcpyDeviceToHost));
  double err = 0;
  for (size_t b = 0; b < lens.size(); ++b)
    for (int pos = 0; pos < lens[b]; ++pos)
      for (int h = 0; h < H; ++h)
        for (int kvi = 0; kvi < 2; ++kvi)
          for (int d = 0; d < D; ++d) {
            const auto& raw = kvi == 0 ? k[b] : v[b];
            const double want = coef[(2 * kvi) * H + h] * raw[(size_t(pos) * H + h) * D + d] +
                                (pos > 0 ? coef[(2 * kvi + 1) * H + h] * raw[(size_t(pos - 1) * H + h) * D + d] : 0.0);
            const int64_t at = kvi * pages.stride_kv + tables[b][pos / BS] * pages.stride_block +
                               (pos % BS) * pages.stride_pos + h * pages.stride_head + d;
            err = std::max(err, std::abs(Bf16ToFloat(host[at]) - want) / std::max(1.0, std::abs(want)));
          }
  std::printf("  prev-token mix write, 4 chunked steps: max rel err %.2e (bf16 pages)\n", err);
  EXPECT_LE(err, 8e-3);
}

}  // namespace
}  // namespace kvplug::testing
