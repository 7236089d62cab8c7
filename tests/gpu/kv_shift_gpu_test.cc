// `kv_shift` on the CUDA engine against the CPU backend (the reference, itself checked against a
// double-precision reference by tests/attention/kv_shift_cpu_test.cc): the same ragged schedule of
// chunked prefills (off page boundaries), decodes and a prefix-hit refill (token c-1 again with
// slot -1) through both, for float16/bfloat16 caches, head sizes 128 and 64, without RoPE and with
// fused NeoX / GPT-J RoPE. Compares every step's out and lse, the stored K^/V^ pages and the state
// slots. Without a GPU every test skips with a message.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>

#include "fmt/format.h"
#include "kvplug/attention/backend.h"
#include "kvplug/attention/engine.h"
#include "kvplug/attention/kv_write.h"
#include "kvplug/attention/step_work.h"
#include "kvplug/attention/thread_pool.h"

namespace kvplug::attn {
namespace {

#define CUDA_OK(call) ASSERT_EQ((call), cudaSuccess) << #call

bool HaveGpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

struct DeviceBuffer {
  void* p = nullptr;
  explicit DeviceBuffer(size_t bytes) {
    if (cudaMalloc(&p, std::max<size_t>(bytes, 1)) != cudaSuccess) p = nullptr;
  }
  ~DeviceBuffer() { cudaFree(p); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

TensorView View(void* data, DType dt, std::initializer_list<int64_t> shape, Device device) {
  TensorView v;
  v.data = data;
  v.dtype = dt;
  v.device = device;
  v.ndim = static_cast<int32_t>(shape.size());
  int i = 0;
  for (int64_t s : shape) v.shape[i++] = s;
  int64_t stride = 1;
  for (int j = v.ndim - 1; j >= 0; --j) v.strides[j] = stride, stride *= v.shape[j];
  return v;
}

constexpr int kHq = 8, kHkv = 2, kBs = 16, kBlocks = 96, kSlots = 8;

struct Entry {
  int doc = 0, from = 0, to = 0, unstored = 0;  // unstored: leading tokens with slot -1
};

// One side (CPU or GPU) of the comparison: a backend, a cache, and a step runner.
struct Side {
  Device device;
  HeadConfig heads;
  ThreadPool pool{2};
  ExecContext exec;
  std::unique_ptr<DeviceBuffer> workspace;
  std::unique_ptr<AttentionBackend> backend;
  std::unique_ptr<kv::KvCache> cache;
};

class KvShiftGpu : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!HaveGpu()) GTEST_SKIP() << "no CUDA device: GPU test skipped";
  }
};

void MakeSide(Side* s, Device device, const HeadConfig& heads, const KvShiftConfig& cfg) {
  s->device = device;
  s->heads = heads;
  if (device == Device::kCuda) {
    const int64_t ws = CudaEngineWorkspaceBytes(heads);
    s->workspace = std::make_unique<DeviceBuffer>(size_t(ws));
    int sms = 0;
    CUDA_OK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    s->exec = ExecContext{Device::kCuda, 0, nullptr, nullptr, s->workspace->p, ws, sms};
  } else {
    s->exec = ExecContext{Device::kCpu, 0, &s->pool, nullptr};
  }
  auto b = CreateBackend(*FindBackend("kv_shift"), heads, cfg, s->exec);
  ASSERT_TRUE(b.ok()) << b.status();
  s->backend = std::move(*b);
  kv::KvCacheOptions o;
  o.num_layers = 1;
  o.num_blocks = kBlocks;
  o.block_size = kBs;
  o.num_kv_heads = kHkv;
  o.head_size = heads.head_size;
  o.dtype = heads.kv_dtype;
  o.device = device;
  o.num_state_slots = kSlots;
  o.state_bytes_per_layer = s->backend->state_bytes_per_layer();
  auto c = kv::KvCache::Create(o);
  ASSERT_TRUE(c.ok()) << c.status();
  s->cache = std::move(*c);
}

struct Docs {
  int D = 0;
  std::vector<int> lens;
  std::vector<std::vector<float>> k, v, q;  // q already rounded to the kv dtype
  std::vector<std::vector<int32_t>> pages;
};

// Runs one step on a side; returns out (as float) and lse.
void RunStep(Side& s, const Docs& docs, const std::vector<Entry>& entries, std::vector<float>* out,
             std::vector<float>* lse) {
  const int D = docs.D;
  std::vector<int32_t> qsl{0}, lens, indptr{0}, indices, slots;
  std::vector<int64_t> slot_map;
  std::vector<float> k, v, q;
  for (const Entry& e : entries) {
    qsl.push_back(qsl.back() + e.to - e.from);
    lens.push_back(e.to);
    slots.push_back(e.doc);
    for (int j = 0; j < (e.to + kBs - 1) / kBs; ++j) indices.push_back(docs.pages[e.doc][j]);
    indptr.push_back(int32_t(indices.size()));
    for (int p = e.from; p < e.to; ++p) {
      slot_map.push_back(p - e.from < e.unstored ? -1 : int64_t{docs.pages[e.doc][p / kBs]} * kBs + p % kBs);
      const auto& dk = docs.k[e.doc];
      const auto& dv = docs.v[e.doc];
      const auto& dq = docs.q[e.doc];
      k.insert(k.end(), dk.begin() + size_t(p) * kHkv * D, dk.begin() + size_t(p + 1) * kHkv * D);
      v.insert(v.end(), dv.begin() + size_t(p) * kHkv * D, dv.begin() + size_t(p + 1) * kHkv * D);
      q.insert(q.end(), dq.begin() + size_t(p) * kHq * D, dq.begin() + size_t(p + 1) * kHq * D);
    }
  }
  const int t = qsl.back(), n = int(entries.size());
  BatchPlan plan(PlanCapacity{n, std::max(t, 1), std::max<int>(int(indices.size()), 1)});
  if (s.device == Device::kCuda) ASSERT_TRUE(plan.EnableDevice(0).ok());
  BatchInput in;
  in.num_seqs = n;
  in.block_size = kBs;
  in.query_start_loc = qsl.data();
  in.seq_lens = lens.data();
  in.kv_indptr = indptr.data();
  in.kv_indices = indices.data();
  in.slot_mapping = slot_map.data();
  in.state_slots = slots.data();
  ASSERT_TRUE(plan.Update(in).ok());
  const DType qdt = s.device == Device::kCuda ? s.heads.kv_dtype : DType::kF32;
  // Inputs: K/V as float32 on both sides (the CUDA write converts); queries in the kv dtype on the GPU.
  std::vector<uint8_t> qbytes(q.size() * DTypeSize(qdt));
  for (size_t i = 0; i < q.size(); ++i) StoreFromFloat(qbytes.data(), qdt, int64_t(i), q[i]);
  const size_t qout_bytes = qbytes.size();
  std::vector<uint8_t> obytes(qout_bytes);
  lse->assign(size_t(t) * kHq, 0.f);
  void* kp = k.data();
  void* vp = v.data();
  void* qp = qbytes.data();
  void* op = obytes.data();
  void* lp = lse->data();
  std::unique_ptr<DeviceBuffer> dk, dv, dq, dout, dlse;
  if (s.device == Device::kCuda) {
    dk = std::make_unique<DeviceBuffer>(k.size() * 4);
    dv = std::make_unique<DeviceBuffer>(v.size() * 4);
    dq = std::make_unique<DeviceBuffer>(qbytes.size());
    dout = std::make_unique<DeviceBuffer>(qout_bytes);
    dlse = std::make_unique<DeviceBuffer>(lse->size() * 4);
    CUDA_OK(cudaMemcpy(dk->p, k.data(), k.size() * 4, cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemcpy(dv->p, v.data(), v.size() * 4, cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemcpy(dq->p, qbytes.data(), qbytes.size(), cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemset(dout->p, 0xff, qout_bytes));
    kp = dk->p, vp = dv->p, qp = dq->p, op = dout->p, lp = dlse->p;
  }
  TensorView kt = View(kp, DType::kF32, {t, kHkv, D}, s.device), vt = View(vp, DType::kF32, {t, kHkv, D}, s.device);
  const WriteArgs w{plan, *s.cache, 0, kt, vt, s.exec};
  absl::Status st = ValidateWrite(s.heads, w);
  ASSERT_TRUE(st.ok()) << st;
  st = s.backend->WriteKv(w);
  ASSERT_TRUE(st.ok()) << st;
  StepWorkSet steps;
  auto work = steps.Get(StepKey(*s.backend, s.heads), *s.backend, s.heads, plan, s.exec);
  ASSERT_TRUE(work.ok()) << work.status();
  TensorView qv = View(qp, qdt, {t, kHq, D}, s.device), ov = View(op, qdt, {t, kHq, D}, s.device);
  TensorView lv = View(lp, DType::kF32, {t, kHq}, s.device);
  const RunArgs args{plan, **work, *s.cache, 0, qv, {&ov, &lv, nullptr}, s.exec};
  st = ValidateRun(s.heads, args);
  ASSERT_TRUE(st.ok()) << st;
  st = s.backend->Run(args);
  ASSERT_TRUE(st.ok()) << st;
  if (s.device == Device::kCuda) {
    CUDA_OK(cudaDeviceSynchronize());
    CUDA_OK(cudaMemcpy(obytes.data(), dout->p, qout_bytes, cudaMemcpyDeviceToHost));
    CUDA_OK(cudaMemcpy(lse->data(), dlse->p, lse->size() * 4, cudaMemcpyDeviceToHost));
  }
  out->resize(q.size());
  for (size_t i = 0; i < q.size(); ++i) (*out)[i] = LoadAsFloat(obytes.data(), qdt, int64_t(i));
}

void CompareOnGpu(DType dtype, int D, float theta, int rotary_dim, RopeStyle style) {
  SCOPED_TRACE(fmt::format("{} D={} rope_theta={} rotary_dim={} style={}", DTypeName(dtype), D, theta, rotary_dim,
                           int(style)));
  const HeadConfig heads{kHq, kHkv, D, dtype, 1.0f / std::sqrt(float(D))};
  if (!CheckCudaEngineSupport(heads).ok()) {
    std::printf("  head size %d not built for CUDA (KVP_CUDA_HEAD_SIZES): skipped\n", D);
    return;
  }
  std::mt19937 rng(31 + D + int(theta) % 7 + int(style));
  std::uniform_real_distribution<float> wide(-2.0f, 2.0f);
  std::normal_distribution<float> normal;
  KvShiftConfig cfg;
  for (int i = 0; i < 2 * kHkv; ++i) cfg.alpha_k.push_back(wide(rng)), cfg.alpha_v.push_back(wide(rng));
  cfg.rope_theta = theta;
  cfg.rotary_dim = rotary_dim;
  cfg.rope_style = style;
  Side cpu, gpu;
  MakeSide(&cpu, Device::kCpu, heads, cfg);
  MakeSide(&gpu, Device::kCuda, heads, cfg);
  ASSERT_TRUE(cpu.backend && gpu.backend);

  // Docs 0-2 fresh; doc 3 shares doc 0's first c = 64 tokens (4 full pages: a prefix-cache hit).
  Docs docs;
  docs.D = D;
  docs.lens = {300, 77, 5, 120};
  const int c = 64;
  std::vector<int32_t> ids(kBlocks);
  for (int i = 0; i < kBlocks; ++i) ids[i] = i;
  std::shuffle(ids.begin(), ids.end(), rng);
  size_t next = 0;
  for (size_t d = 0; d < docs.lens.size(); ++d) {
    const int len = docs.lens[d];
    docs.k.emplace_back(size_t(len) * kHkv * D);
    docs.v.emplace_back(size_t(len) * kHkv * D);
    docs.q.emplace_back(size_t(len) * kHq * D);
    for (auto* x : {&docs.k.back(), &docs.v.back(), &docs.q.back()})
      for (float& f : *x) f = normal(rng);
    for (float& f : docs.q.back()) {  // the queries the GPU sees
      uint8_t b[4];
      StoreFromFloat(b, dtype, 0, f);
      f = LoadAsFloat(b, dtype, 0);
    }
    docs.pages.emplace_back();
    for (int j = 0; j < (len + kBs - 1) / kBs; ++j) docs.pages.back().push_back(ids[next++]);
  }
  std::copy_n(docs.k[0].begin(), size_t(c) * kHkv * D, docs.k[3].begin());
  std::copy_n(docs.v[0].begin(), size_t(c) * kHkv * D, docs.v[3].begin());
  for (int j = 0; j < c / kBs; ++j) docs.pages[3][j] = docs.pages[0][j];

  // Ragged steps: chunks off page boundaries, decodes, the refill of doc 3 leading its first chunk.
  std::vector<std::vector<Entry>> steps = {{{0, 0, 100}, {1, 0, 23}, {2, 0, 1}},
                                           {{0, 100, 181}, {1, 23, 24}, {2, 1, 2}},
                                           {{3, c - 1, c + 30, 1}, {1, 24, 77}, {0, 181, 250}},
                                           {{0, 250, 300}, {3, c + 30, c + 31}, {2, 2, 5}}};
  for (int p = c + 31; p < 120; p += 9) steps.push_back({{3, p, std::min(120, p + 9)}});
  double worst_out = 0, worst_lse = 0;
  for (size_t i = 0; i < steps.size(); ++i) {
    std::vector<float> co, cl, go, gl;
    RunStep(cpu, docs, steps[i], &co, &cl);
    RunStep(gpu, docs, steps[i], &go, &gl);
    ASSERT_EQ(co.size(), go.size());
    double eo = 0, el = 0;
    for (size_t j = 0; j < co.size(); ++j) eo = std::max(eo, double(std::abs(co[j] - go[j])));
    for (size_t j = 0; j < cl.size(); ++j) el = std::max(el, double(std::abs(cl[j] - gl[j])));
    EXPECT_LE(eo, dtype == DType::kF16 ? 4e-3 : 2e-2) << "step " << i;
    EXPECT_LE(el, 1e-2) << "step " << i;
    worst_out = std::max(worst_out, eo), worst_lse = std::max(worst_lse, el);
  }
  // Pages: the same mixed (and rotated) values, up to one rounding of the page dtype.
  const kv::PagedLayer& cp = cpu.cache->layer(0);
  const kv::PagedLayer& gp = gpu.cache->layer(0);
  const size_t page_bytes = size_t(2 * cp.stride_kv) * DTypeSize(cp.dtype);
  std::vector<uint8_t> host(page_bytes);
  CUDA_OK(cudaMemcpy(host.data(), gp.data, page_bytes, cudaMemcpyDeviceToHost));
  double page_err = 0;
  for (int64_t i = 0; i < 2 * cp.stride_kv; ++i) {
    const float a = LoadAsFloat(cp.data, cp.dtype, i), b = LoadAsFloat(host.data(), cp.dtype, i);
    page_err = std::max(page_err, std::abs(double(a) - b) / std::max(1.0, std::abs(double(a))));
  }
  EXPECT_LE(page_err, dtype == DType::kF16 ? 2e-3 : 1.6e-2);
  // States: the raw last K/V of each sequence, copied exactly.
  for (int slot = 0; slot < int(docs.lens.size()); ++slot) {
    auto cs = cpu.cache->State(0, slot);
    auto gs = gpu.cache->State(0, slot);
    ASSERT_TRUE(cs.ok() && gs.ok());
    std::vector<uint8_t> g(gs->size());
    CUDA_OK(cudaMemcpy(g.data(), gs->data(), g.size(), cudaMemcpyDeviceToHost));
    const size_t used = size_t(PrevTokenStateBytes(kHkv, D));
    EXPECT_EQ(0, std::memcmp(cs->data(), g.data(), used)) << "state slot " << slot;
  }
  std::printf("  %-8s D=%3d rope_theta=%-7g rotary_dim=%3d style=%d | max|err| out %.2e lse %.2e pages %.2e\n",
              std::string(DTypeName(dtype)).c_str(), D, theta, rotary_dim, int(style), worst_out, worst_lse, page_err);
}

TEST_F(KvShiftGpu, WriteAndAttentionMatchTheCpuBackend) {
  for (const DType dt : {DType::kBF16, DType::kF16})
    for (const int D : {128, 64}) {
      CompareOnGpu(dt, D, 0.f, 0, RopeStyle::kNeoX);
      CompareOnGpu(dt, D, 10000.f, 0, RopeStyle::kNeoX);
      CompareOnGpu(dt, D, 500000.f, D / 2, RopeStyle::kGptJ);
    }
}

TEST_F(KvShiftGpu, CoefficientsLiveOnTheDeviceAndBadConfigsFail) {
  const HeadConfig heads{kHq, kHkv, 128, DType::kBF16, 0.088f};
  if (!CheckCudaEngineSupport(heads).ok()) GTEST_SKIP() << "head size 128 not built for CUDA";
  const ExecContext exec{Device::kCuda, 0, nullptr, nullptr, nullptr, 0, 1};
  KvShiftConfig bad;
  bad.alpha_k = {1.f, 0.f, 1.f};
  bad.alpha_v = {1.f, 0.f, 1.f, 0.f};
  auto b = CreateBackend(*FindBackend("kv_shift"), heads, bad, exec);
  ASSERT_FALSE(b.ok());
  EXPECT_NE(std::string(b.status().message()).find("alpha_k has 3 values"), std::string::npos) << b.status();
}

}  // namespace
}  // namespace kvplug::attn
