// Dense paged attention on the GPU against the CPU backend (the reference path), both driven
// through the C ABI as an engine drives them: random ragged batches mixing prefill with cached
// prefixes and decode, odd lengths, block boundaries, GQA 1/4/8, head sizes 64/128/256, float16
// and bfloat16, long sequences (split-KV), and a decode step replayed from a CUDA graph.
// Without a GPU every test skips with a message (CTest label `gpu`).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "kvplug/kv_cache/dtype.h"
#include "kvplug/kvplug_dl.h"

namespace {

kvp_api api;
bool api_loaded = false;

#define KVP_OK_OR_FAIL(call) ASSERT_EQ(api.call, KVP_OK) << #call << ": " << api.kvp_last_error()
#define CUDA_OK(call) ASSERT_EQ((call), cudaSuccess) << #call

class DenseGpu : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const char* path = std::getenv("KVP_LIBRARY");
    char err[512];
    api_loaded = path && kvp_api_load(&api, path, err, sizeof err) == 0;
    if (!api_loaded) std::fprintf(stderr, "cannot load KVP_LIBRARY: %s\n", path ? err : "(unset)");
  }
  void SetUp() override {
    ASSERT_TRUE(api_loaded);
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) GTEST_SKIP() << "no CUDA device: GPU test skipped";
    kvp_context_options o{sizeof(o)};
    o.device_type = kDLCUDA;
    KVP_OK_OR_FAIL(kvp_context_create(&o, &gpu_));
    KVP_OK_OR_FAIL(kvp_context_create(nullptr, &cpu_));
  }
  void TearDown() override {
    api_loaded ? api.kvp_context_destroy(gpu_) : void();
    api_loaded ? api.kvp_context_destroy(cpu_) : void();
  }
  kvp_context* gpu_ = nullptr;
  kvp_context* cpu_ = nullptr;
};

struct Case {
  int hq, hkv, d, block_size;
  kvp_dtype dtype;                        // of queries, outputs, and the cache unless fp8
  std::vector<std::pair<int, int>> seqs;  // (kv_len, q_len)
  int window_left = -1;
  bool fp8 = false;  // GPU cache in e4m3 with scales; the CPU reference gets the dequantized values
};

// Host e4m3 rounding as __nv_fp8_e4m3(float) does it: nearest even, saturating at +-448.
float QuantizeE4M3(float x) {
  if (std::isnan(x)) return x;
  const float a = std::min(std::fabs(x), 448.0f);
  float q;
  if (a < 0.015625f) {  // below 2^-6: subnormal steps of 2^-9
    q = std::nearbyint(a * 512.0f) / 512.0f;
  } else {
    int e;
    std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
    const float step = std::ldexp(1.0f, e - 4);  // 3 mantissa bits
    q = std::min(std::nearbyint(a / step) * step, 448.0f);
  }
  return std::copysign(q, x);
}

DLDataType Dl(kvp_dtype t) {
  return t == KVP_DTYPE_BFLOAT16 ? DLDataType{kDLBfloat, 16, 1} : DLDataType{kDLFloat, 16, 1};
}
kvplug::DType Dt(kvp_dtype t) { return t == KVP_DTYPE_BFLOAT16 ? kvplug::DType::kBF16 : kvplug::DType::kF16; }

struct Result {
  double max_abs = 0, rel_l2 = 0, lse_max = 0;
  int non_finite = 0;
};

struct Device16 {
  void* p = nullptr;
  explicit Device16(size_t bytes) { cudaMalloc(&p, bytes); }
  ~Device16() { cudaFree(p); }
};

// Runs one case on both devices and compares. `graph` also replays the GPU run from a CUDA graph
// and requires it to match the direct run bit for bit.
void RunCase(kvp_context* gpu, kvp_context* cpu, const Case& c, uint32_t seed, Result* res, bool graph = false) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  const int B = static_cast<int>(c.seqs.size());
  int total_blocks = 0, T = 0, max_blocks = 0;
  for (auto [len, ql] : c.seqs) {
    const int nb = (len + c.block_size - 1) / c.block_size;
    total_blocks += nb;
    max_blocks = std::max(max_blocks, nb);
    T += ql;
  }
  const int num_blocks = total_blocks + 5;
  // Scattered pages.
  std::vector<int32_t> ids(num_blocks);
  for (int i = 0; i < num_blocks; ++i) ids[i] = i;
  std::shuffle(ids.begin(), ids.end(), rng);
  std::vector<int32_t> qsl{0}, lens, table(size_t(B) * max_blocks, 0);
  size_t next = 0;
  int64_t kv_tokens = 0;
  for (int b = 0; b < B; ++b) {
    lens.push_back(c.seqs[b].first);
    qsl.push_back(qsl.back() + c.seqs[b].second);
    for (int j = 0; j < (c.seqs[b].first + c.block_size - 1) / c.block_size; ++j) table[size_t(b) * max_blocks + j] = ids[next++];
    kv_tokens += c.seqs[b].first;
  }
  // All K/V of every sequence, written once through kvp_kv_cache_write on both caches.
  std::vector<int64_t> slots;
  for (int b = 0; b < B; ++b)
    for (int p = 0; p < lens[b]; ++p)
      slots.push_back(int64_t{table[size_t(b) * max_blocks + p / c.block_size]} * c.block_size + p % c.block_size);
  const size_t kv_elems = size_t(kv_tokens) * c.hkv * c.d, q_elems = size_t(T) * c.hq * c.d;
  std::vector<uint16_t> k(kv_elems), v(kv_elems), q(q_elems);
  for (auto& x : k) kvplug::StoreFromFloat(&x, Dt(c.dtype), 0, normal(rng));
  for (auto& x : v) kvplug::StoreFromFloat(&x, Dt(c.dtype), 0, normal(rng));
  for (auto& x : q) kvplug::StoreFromFloat(&x, Dt(c.dtype), 0, normal(rng));

  kvp_kv_cache_options co{sizeof(co)};
  co.num_layers = 1; co.num_blocks = num_blocks; co.block_size = c.block_size; co.num_kv_heads = c.hkv;
  co.head_size = c.d; co.dtype = c.dtype; co.layout = KVP_LAYOUT_KV_FIRST;
  const float k_scale = 0.02f, v_scale = 0.015f;
  kvp_kv_cache_options gco = co, cco = co;
  if (c.fp8) {
    gco.dtype = KVP_DTYPE_FP8_E4M3;
    gco.k_scales = &k_scale;
    gco.v_scales = &v_scale;
    cco.dtype = KVP_DTYPE_FLOAT32;
  }
  kvp_kv_cache *gcache, *ccache;
  KVP_OK_OR_FAIL(kvp_kv_cache_create(gpu, &gco, &gcache));
  KVP_OK_OR_FAIL(kvp_kv_cache_create(cpu, &cco, &ccache));
  kvp_attention_options ao{sizeof(ao)};
  ao.backend = "dense"; ao.num_q_heads = c.hq; ao.num_kv_heads = c.hkv; ao.head_size = c.d; ao.kv_dtype = c.dtype;
  std::string config = "{\"backend_config_type\":\"DenseConfig\",\"backend_config\":{\"window_left\":" +
                       std::to_string(c.window_left) + "}}";
  ao.config_format = KVP_CONFIG_JSON; ao.config = config.data(); ao.config_size = config.size();
  kvp_attention *gattn, *cattn;
  kvp_attention_options gao = ao, cao = ao;
  gao.kv_dtype = gco.dtype;
  cao.kv_dtype = cco.dtype;
  KVP_OK_OR_FAIL(kvp_attention_create(gpu, &gao, &gattn));
  KVP_OK_OR_FAIL(kvp_attention_create(cpu, &cao, &cattn));
  kvp_plan_options po{sizeof(po), B, std::max(T, 1), std::max(total_blocks, 1)};
  kvp_plan *gplan, *cplan;
  KVP_OK_OR_FAIL(kvp_plan_create(gpu, &po, &gplan));
  KVP_OK_OR_FAIL(kvp_plan_create(cpu, &po, &cplan));
  kvp_batch kb{sizeof(kb)};
  kb.num_seqs = B; kb.block_size = c.block_size; kb.query_start_loc = qsl.data(); kb.seq_lens = lens.data();
  kb.block_table = table.data(); kb.block_table_stride = max_blocks;
  KVP_OK_OR_FAIL(kvp_plan_update(gplan, &kb));
  KVP_OK_OR_FAIL(kvp_plan_update(cplan, &kb));

  // K/V: host copies for the CPU cache, device copies for the GPU cache.
  int64_t kv_shape[3] = {kv_tokens, c.hkv, c.d}, slot_shape[1] = {kv_tokens};
  DLTensor hk{k.data(), {kDLCPU, 0}, 3, Dl(c.dtype), kv_shape, nullptr, 0};
  DLTensor hv{v.data(), {kDLCPU, 0}, 3, Dl(c.dtype), kv_shape, nullptr, 0};
  // fp8: the reference holds exactly what the GPU pages hold, dequantized.
  std::vector<float> kq, vq;
  if (c.fp8) {
    for (uint16_t x : k) kq.push_back(QuantizeE4M3(kvplug::LoadAsFloat(&x, Dt(c.dtype), 0) * (1.0f / k_scale)) * k_scale);
    for (uint16_t x : v) vq.push_back(QuantizeE4M3(kvplug::LoadAsFloat(&x, Dt(c.dtype), 0) * (1.0f / v_scale)) * v_scale);
    hk = DLTensor{kq.data(), {kDLCPU, 0}, 3, {kDLFloat, 32, 1}, kv_shape, nullptr, 0};
    hv = DLTensor{vq.data(), {kDLCPU, 0}, 3, {kDLFloat, 32, 1}, kv_shape, nullptr, 0};
  }
  DLTensor hs{slots.data(), {kDLCPU, 0}, 1, {kDLInt, 64, 1}, slot_shape, nullptr, 0};
  KVP_OK_OR_FAIL(kvp_kv_cache_write(ccache, 0, &hk, &hv, &hs));
  Device16 dk(kv_elems * 2), dv(kv_elems * 2), ds(slots.size() * 8), dq(q_elems * 2), dout(q_elems * 2),
      dout2(q_elems * 2), dlse(size_t(T) * c.hq * 4);
  CUDA_OK(cudaMemcpy(dk.p, k.data(), kv_elems * 2, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(dv.p, v.data(), kv_elems * 2, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(ds.p, slots.data(), slots.size() * 8, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(dq.p, q.data(), q_elems * 2, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemset(dout.p, 0xff, q_elems * 2));  // poison: every element must be written
  DLTensor gk{dk.p, {kDLCUDA, 0}, 3, Dl(c.dtype), kv_shape, nullptr, 0};
  DLTensor gv{dv.p, {kDLCUDA, 0}, 3, Dl(c.dtype), kv_shape, nullptr, 0};
  DLTensor gs{ds.p, {kDLCUDA, 0}, 1, {kDLInt, 64, 1}, slot_shape, nullptr, 0};
  KVP_OK_OR_FAIL(kvp_kv_cache_write(gcache, 0, &gk, &gv, &gs));

  int64_t q_shape[3] = {T, c.hq, c.d}, lse_shape[2] = {T, c.hq};
  std::vector<uint16_t> cout(q_elems);
  std::vector<float> clse(size_t(T) * c.hq), glse(clse.size());
  DLTensor cq{q.data(), {kDLCPU, 0}, 3, Dl(c.dtype), q_shape, nullptr, 0};
  DLTensor co_t{cout.data(), {kDLCPU, 0}, 3, Dl(c.dtype), q_shape, nullptr, 0};
  DLTensor cl{clse.data(), {kDLCPU, 0}, 2, {kDLFloat, 32, 1}, lse_shape, nullptr, 0};
  KVP_OK_OR_FAIL(kvp_attention_run(cattn, cplan, ccache, 0, &cq, &co_t, &cl));
  DLTensor gq{dq.p, {kDLCUDA, 0}, 3, Dl(c.dtype), q_shape, nullptr, 0};
  DLTensor go{dout.p, {kDLCUDA, 0}, 3, Dl(c.dtype), q_shape, nullptr, 0};
  DLTensor gl{dlse.p, {kDLCUDA, 0}, 2, {kDLFloat, 32, 1}, lse_shape, nullptr, 0};
  KVP_OK_OR_FAIL(kvp_attention_run(gattn, gplan, gcache, 0, &gq, &go, &gl));
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<uint16_t> gout(q_elems);
  CUDA_OK(cudaMemcpy(gout.data(), dout.p, q_elems * 2, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(glse.data(), dlse.p, glse.size() * 4, cudaMemcpyDeviceToHost));

  double err2 = 0, ref2 = 0;
  for (size_t i = 0; i < q_elems; ++i) {
    const double g = kvplug::LoadAsFloat(&gout[i], Dt(c.dtype), 0), r = kvplug::LoadAsFloat(&cout[i], Dt(c.dtype), 0);
    if (!std::isfinite(g)) { ++res->non_finite; continue; }
    res->max_abs = std::max(res->max_abs, std::abs(g - r));
    err2 += (g - r) * (g - r);
    ref2 += r * r;
  }
  res->rel_l2 = std::sqrt(err2 / std::max(ref2, 1e-30));
  for (size_t i = 0; i < clse.size(); ++i) res->lse_max = std::max(res->lse_max, double(std::abs(clse[i] - glse[i])));

  if (graph) {
    // A decode step captured in a CUDA graph and replayed gives the same output as the direct run.
    cudaStream_t stream;
    CUDA_OK(cudaStreamCreate(&stream));
    KVP_OK_OR_FAIL(kvp_context_set_stream(gpu, stream));
    DLTensor go2{dout2.p, {kDLCUDA, 0}, 3, Dl(c.dtype), q_shape, nullptr, 0};
    cudaGraph_t g;
    cudaGraphExec_t exec;
    CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    const kvp_status s = api.kvp_attention_run(gattn, gplan, gcache, 0, &gq, &go2, nullptr);
    CUDA_OK(cudaStreamEndCapture(stream, &g));
    ASSERT_EQ(s, KVP_OK) << api.kvp_last_error();
    CUDA_OK(cudaGraphInstantiate(&exec, g, 0));
    CUDA_OK(cudaMemset(dout2.p, 0, q_elems * 2));
    for (int i = 0; i < 3; ++i) CUDA_OK(cudaGraphLaunch(exec, stream));
    CUDA_OK(cudaStreamSynchronize(stream));
    std::vector<uint16_t> replay(q_elems);
    CUDA_OK(cudaMemcpy(replay.data(), dout2.p, q_elems * 2, cudaMemcpyDeviceToHost));
    EXPECT_EQ(replay, gout) << "graph replay differs from the direct run";
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(g);
    KVP_OK_OR_FAIL(kvp_context_set_stream(gpu, nullptr));
    cudaStreamDestroy(stream);
  }
  api.kvp_plan_destroy(gplan); api.kvp_plan_destroy(cplan);
  api.kvp_attention_destroy(gattn); api.kvp_attention_destroy(cattn);
  api.kvp_kv_cache_destroy(gcache); api.kvp_kv_cache_destroy(ccache);
}

// bf16 keeps 8 mantissa bits, fp16 11; P is rounded to the input type before P.V (as FA2 does).
double AbsTol(kvp_dtype t) { return t == KVP_DTYPE_BFLOAT16 ? 3e-2 : 5e-3; }
double RelTol(kvp_dtype t) { return t == KVP_DTYPE_BFLOAT16 ? 1.5e-2 : 3e-3; }

void Expect(const Case& c, const Result& r, const std::string& what) {
  EXPECT_EQ(r.non_finite, 0) << what << ": unwritten or non-finite outputs";
  EXPECT_LE(r.max_abs, AbsTol(c.dtype)) << what;
  EXPECT_LE(r.rel_l2, RelTol(c.dtype)) << what;
  EXPECT_LE(r.lse_max, 2e-2) << what;
  std::printf("%-60s max|err| %.2e  rel %.2e  lse %.2e\n", what.c_str(), r.max_abs, r.rel_l2, r.lse_max);
}

TEST_F(DenseGpu, RaggedBatchesEveryHeadSizeDtypeAndGqa) {
  std::mt19937 rng(11);
  for (int d : {64, 128, 256})
    for (kvp_dtype dt : {KVP_DTYPE_BFLOAT16, KVP_DTYPE_FLOAT16})
      for (auto [hq, hkv] : std::vector<std::pair<int, int>>{{4, 4}, {8, 2}, {32, 4}})
        for (int bs : {16, 32}) {
          std::vector<std::pair<int, int>> seqs = {{1, 1}, {bs, bs}, {bs + 1, 1}, {3 * bs - 1, 7}, {129, 65}, {77, 1}};
          for (int i = 0; i < 3; ++i) {
            const int len = 1 + int(rng() % 300);
            seqs.push_back({len, rng() % 2 ? 1 : 1 + int(rng() % len)});
          }
          Case c{hq, hkv, d, bs, dt, seqs};
          Result r;
          ASSERT_NO_FATAL_FAILURE(RunCase(gpu_, cpu_, c, 100 + d + hq + bs, &r));
          Expect(c, r, "d=" + std::to_string(d) + (dt == KVP_DTYPE_BFLOAT16 ? " bf16" : " f16") + " gqa " +
                           std::to_string(hq) + "/" + std::to_string(hkv) + " bs=" + std::to_string(bs));
        }
}

TEST_F(DenseGpu, DecodeShapesSplitKvAndBlockSizes) {
  for (int bs : {16, 64, 128}) {
    Case c{32, 8, 128, bs, KVP_DTYPE_BFLOAT16, {{5000, 1}, {1, 1}, {4097, 1}, {333, 1}}};
    Result r;
    ASSERT_NO_FATAL_FAILURE(RunCase(gpu_, cpu_, c, 7 + bs, &r));
    Expect(c, r, "decode gqa 32/8 bs=" + std::to_string(bs));
  }
  Case mqa{16, 1, 128, 16, KVP_DTYPE_FLOAT16, {{2000, 1}, {700, 2}}};
  Result r;
  ASSERT_NO_FATAL_FAILURE(RunCase(gpu_, cpu_, mqa, 9, &r));
  Expect(mqa, r, "mqa 16/1 (two query tiles per KV head)");
}

TEST_F(DenseGpu, LongSequence100kSplitKv) {
  Case c{8, 1, 128, 16, KVP_DTYPE_BFLOAT16, {{100000, 1}}};
  Result r;
  ASSERT_NO_FATAL_FAILURE(RunCase(gpu_, cpu_, c, 3, &r));
  Expect(c, r, "one 100k-token sequence, decode");
}

TEST_F(DenseGpu, Fp8CacheAgainstDequantizedReference) {
  for (kvp_dtype dt : {KVP_DTYPE_BFLOAT16, KVP_DTYPE_FLOAT16})
    for (int d : {64, 128, 256}) {
      Case c{32, 8, d, 16, dt, {{3000, 1}, {1, 1}, {65, 65}, {400, 17}, {20000, 1}}};
      c.fp8 = true;
      Result r;
      ASSERT_NO_FATAL_FAILURE(RunCase(gpu_, cpu_, c, 31 + d, &r));
      Expect(c, r, std::string("fp8 cache, ") + (dt == KVP_DTYPE_BFLOAT16 ? "bf16" : "f16") + " queries d=" +
                       std::to_string(d));
    }
}

TEST_F(DenseGpu, SlidingWindow) {
  Case c{8, 2, 128, 16, KVP_DTYPE_BFLOAT16, {{300, 300}, {1000, 1}, {90, 5}}, 37};
  Result r;
  ASSERT_NO_FATAL_FAILURE(RunCase(gpu_, cpu_, c, 5, &r));
  Expect(c, r, "window_left=37");
}

TEST_F(DenseGpu, CudaGraphReplayMatches) {
  Case c{32, 8, 128, 16, KVP_DTYPE_BFLOAT16, {{1000, 1}, {17, 1}, {4096, 1}}};
  Result r;
  ASSERT_NO_FATAL_FAILURE(RunCase(gpu_, cpu_, c, 21, &r, /*graph=*/true));
  Expect(c, r, "graph-captured decode");
  // Prefill in the graph too (FlashInfer's sm_90 prefill where it is built: no allocation on run).
  Case p{32, 8, 128, 16, KVP_DTYPE_BFLOAT16, {{1000, 1000}, {700, 300}, {50, 1}}};
  Result rp;
  ASSERT_NO_FATAL_FAILURE(RunCase(gpu_, cpu_, p, 22, &rp, /*graph=*/true));
  Expect(p, rp, "graph-captured prefill");
}

TEST_F(DenseGpu, RejectsWhatTheKernelsCannotRun) {
  kvp_attention_options ao{sizeof(ao)};
  ao.backend = "dense"; ao.num_q_heads = 8; ao.num_kv_heads = 2; ao.head_size = 128; ao.kv_dtype = KVP_DTYPE_FLOAT32;
  kvp_attention* a = nullptr;
  EXPECT_EQ(api.kvp_attention_create(gpu_, &ao, &a), KVP_ERR_NOT_SUPPORTED);
  ao.kv_dtype = KVP_DTYPE_BFLOAT16; ao.head_size = 96;
  EXPECT_EQ(api.kvp_attention_create(gpu_, &ao, &a), KVP_ERR_NOT_SUPPORTED);
  // A host tensor handed to a GPU context is refused with the device named.
  kvp_kv_cache_options co{sizeof(co)};
  co.num_layers = 1; co.num_blocks = 4; co.block_size = 16; co.num_kv_heads = 2; co.head_size = 128; co.dtype = KVP_DTYPE_BFLOAT16;
  kvp_kv_cache* cache = nullptr;
  ASSERT_EQ(api.kvp_kv_cache_create(gpu_, &co, &cache), KVP_OK) << api.kvp_last_error();
  std::vector<uint16_t> host(2 * 128);
  std::vector<int64_t> slot{0};
  int64_t shape[3] = {1, 2, 128}, sshape[1] = {1};
  DLTensor k{host.data(), {kDLCPU, 0}, 3, {kDLBfloat, 16, 1}, shape, nullptr, 0};
  DLTensor s{slot.data(), {kDLCPU, 0}, 1, {kDLInt, 64, 1}, sshape, nullptr, 0};
  EXPECT_EQ(api.kvp_kv_cache_write(cache, 0, &k, &k, &s), KVP_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(api.kvp_last_error()).find("device"), std::string::npos) << api.kvp_last_error();
  api.kvp_kv_cache_destroy(cache);
}

}  // namespace
