// `attamba` on CUDA against the CPU backend (the reference, itself checked against a straightforward
// double-precision reference by tests/attention/attamba_cpu_test.cc): two layers with cyclic chunk
// offsets, P in {1, 4, 8}, L in {0, 8}, float16/bfloat16 caches, head sizes 64, 128 and 256 (one
// test instance each, skipped where the CUDA engine is not built for it), over one
// ragged schedule of prefills, chunked prefills (on and off chunk ends) and decodes across chunk
// ends. Per step and layer: the chunk-local SSM (kvp_attention_ssm) for keys and values on the GPU
// vs the CPU (outputs), the compressed write (chunk ends to their compressed rows, slots uploaded
// with the plan step) and attention (out, lse); at the end every state slot (conv + scan state) and
// the stored pages. Without a GPU every test skips with a message.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <random>
#include <string>

#include "fmt/format.h"
#include "kvplug/attention/attamba/attamba.h"
#include "kvplug/attention/backend.h"
#include "kvplug/attention/engine.h"
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

constexpr int kHq = 8, kHkv = 2, kBs = 16, kBlocks = 96, kSlots = 6, kLayers = 2;

struct Entry {
  int doc = 0, from = 0, to = 0;
};

// The SSM weights of one (layer, which): float32 host arrays.
struct SsmWeights {
  std::vector<float> conv_w, conv_b, dt_b, a_log, d_skip, norm_w;
};

struct Docs {
  int D = 0;
  attamba::SsmShape shape;
  std::vector<int> lens;
  // [doc][layer][which]: in_proj outputs [len, in_dim]; [doc][layer]: queries [len, Hq, D].
  std::vector<std::vector<std::vector<std::vector<float>>>> in;
  std::vector<std::vector<std::vector<float>>> q;
  std::vector<std::vector<int32_t>> compressed, token_pages;
  SsmWeights w[kLayers][2];
};

// One side (CPU or GPU): a backend per layer, one cache.
struct Side {
  Device device;
  HeadConfig heads;
  ThreadPool pool{2};
  ExecContext exec;
  std::unique_ptr<DeviceBuffer> workspace;
  std::unique_ptr<AttentionBackend> backend[kLayers];
  std::unique_ptr<kv::KvCache> cache;
  std::vector<std::unique_ptr<DeviceBuffer>> weights;  // GPU copies of the SSM weights
  TensorView wv[kLayers][2][6];
};

class AttambaGpu : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!HaveGpu()) GTEST_SKIP() << "no CUDA device: GPU test skipped";
  }
};

AttambaConfig Cfg(int P, int L, int layer, const attamba::SsmShape& sh) {
  AttambaConfig c;
  c.chunk_size = P;
  c.window = L;
  c.layer_index = layer;
  c.num_layers = kLayers;
  c.chunk_offsets = ChunkOffsets::kCyclic;
  c.ssm_heads = sh.heads;
  c.ssm_head_dim = sh.head_dim;
  c.state_size = sh.state;
  c.ssm_groups = sh.groups;
  c.conv_width = sh.conv_width;
  c.norm_eps = 1e-5f;
  return c;
}

void MakeSide(Side* s, Device device, const HeadConfig& heads, int P, int L, const Docs& docs) {
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
  const BackendInfo* info = FindBackend("attamba");
  ASSERT_NE(info, nullptr);
  ASSERT_NE(info->caps(device), nullptr) << "attamba reports no support for device " << int(device);
  for (int l = 0; l < kLayers; ++l) {
    auto b = CreateBackend(*info, heads, Cfg(P, L, l, docs.shape), s->exec);
    ASSERT_TRUE(b.ok()) << b.status();
    s->backend[l] = std::move(*b);
  }
  kv::KvCacheOptions o;
  o.num_layers = kLayers;
  o.num_blocks = kBlocks;
  o.block_size = kBs;
  o.num_kv_heads = kHkv;
  o.head_size = heads.head_size;
  o.dtype = heads.kv_dtype;
  o.device = device;
  o.num_state_slots = kSlots;
  o.state_bytes_per_layer = s->backend[0]->state_bytes_per_layer();
  auto c = kv::KvCache::Create(o);
  ASSERT_TRUE(c.ok()) << c.status();
  s->cache = std::move(*c);
  // The weights as views on the side's device.
  const int64_t Dc = docs.shape.conv_dim(), W = docs.shape.conv_width, H = docs.shape.heads, Di = docs.shape.d_inner();
  for (int l = 0; l < kLayers; ++l)
    for (int which = 0; which < 2; ++which) {
      const SsmWeights& w = docs.w[l][which];
      const std::vector<float>* arrays[6] = {&w.conv_w, &w.conv_b, &w.dt_b, &w.a_log, &w.d_skip, &w.norm_w};
      for (int i = 0; i < 6; ++i) {
        void* p = const_cast<float*>(arrays[i]->data());
        if (device == Device::kCuda) {
          s->weights.push_back(std::make_unique<DeviceBuffer>(arrays[i]->size() * 4));
          CUDA_OK(cudaMemcpy(s->weights.back()->p, p, arrays[i]->size() * 4, cudaMemcpyHostToDevice));
          p = s->weights.back()->p;
        }
        s->wv[l][which][i] = i == 0 ? View(p, DType::kF32, {Dc, W}, device)
                                    : View(p, DType::kF32, {i == 5 ? Di : (i == 1 ? Dc : H)}, device);
      }
    }
}

struct StepResult {
  std::vector<float> ssm[kLayers][2];  // [T, d_inner]
  std::vector<float> out[kLayers], lse[kLayers];
};

std::vector<float> ToHost(const void* p, size_t n, Device device) {
  std::vector<float> h(n);
  if (device == Device::kCuda) {
    if (cudaMemcpy(h.data(), p, n * 4, cudaMemcpyDeviceToHost) != cudaSuccess) ADD_FAILURE() << "cudaMemcpy";
  } else {
    std::memcpy(h.data(), p, n * 4);
  }
  return h;
}

void RunStep(Side& s, const Docs& docs, const std::vector<Entry>& entries, StepResult* r) {
  const int D = docs.D;
  const int64_t in_dim = docs.shape.in_dim(), Di = docs.shape.d_inner();
  std::vector<int32_t> qsl{0}, lens, indptr{0}, indices, state_slots, p0s;
  std::vector<int64_t> slot_map;
  for (const Entry& e : entries) {
    const CacheLayout lay = s.backend[0]->Layout(kBs, e.to, e.from);
    for (int i = 0; i < lay.compressed_pages; ++i) indices.push_back(docs.compressed[e.doc][i]);
    for (int j = lay.window_first_page; j < lay.window_first_page + lay.window_pages; ++j)
      indices.push_back(docs.token_pages[e.doc][j]);
    indptr.push_back(int32_t(indices.size()));
    qsl.push_back(qsl.back() + e.to - e.from);
    lens.push_back(lay.seq_len);
    p0s.push_back(e.from);
    state_slots.push_back(e.doc);
    for (int p = e.from; p < e.to; ++p) slot_map.push_back(int64_t{docs.token_pages[e.doc][p / kBs]} * kBs + p % kBs);
  }
  const int T = qsl.back(), n = int(entries.size());
  BatchPlan plan(PlanCapacity{n, std::max(T, 1), std::max<int>(int(indices.size()), 1)});
  if (s.device == Device::kCuda) {
    ASSERT_TRUE(plan.EnableDevice(0).ok());
  }
  BatchInput in;
  in.num_seqs = n;
  in.block_size = kBs;
  in.query_start_loc = qsl.data();
  in.seq_lens = lens.data();
  in.kv_indptr = indptr.data();
  in.kv_indices = indices.data();
  in.slot_mapping = slot_map.data();
  in.state_slots = state_slots.data();
  in.query_pos_starts = p0s.data();
  ASSERT_TRUE(plan.Update(in).ok());
  const DType qdt = s.device == Device::kCuda ? s.heads.kv_dtype : DType::kF32;
  StepWorkSet steps;
  for (int l = 0; l < kLayers; ++l) {
    const AttentionBackend& backend = *s.backend[l];
    auto work = steps.Get(StepKey(backend, s.heads), backend, s.heads, plan, s.exec);
    ASSERT_TRUE(work.ok()) << work.status();
    // The SSMs (keys, values): in [T, in_dim] -> y [T, d_inner] = K (V) as [T, Hkv, D].
    std::vector<float> ins[2], ys[2];
    std::unique_ptr<DeviceBuffer> din[2], dy[2];
    void* yp[2];
    for (int which = 0; which < 2; ++which) {
      for (const Entry& e : entries) {
        const auto& src = docs.in[e.doc][l][which];
        ins[which].insert(ins[which].end(), src.begin() + size_t(e.from) * in_dim, src.begin() + size_t(e.to) * in_dim);
      }
      ys[which].assign(size_t(T) * Di, std::nanf(""));
      void* ip = ins[which].data();
      yp[which] = ys[which].data();
      if (s.device == Device::kCuda) {
        din[which] = std::make_unique<DeviceBuffer>(ins[which].size() * 4);
        dy[which] = std::make_unique<DeviceBuffer>(ys[which].size() * 4);
        CUDA_OK(cudaMemcpy(din[which]->p, ip, ins[which].size() * 4, cudaMemcpyHostToDevice));
        CUDA_OK(cudaMemset(dy[which]->p, 0xff, ys[which].size() * 4));
        ip = din[which]->p, yp[which] = dy[which]->p;
      }
      const TensorView iv = View(ip, DType::kF32, {T, in_dim}, s.device);
      const TensorView ov = View(yp[which], DType::kF32, {T, Di}, s.device);
      const TensorView* w = s.wv[l][which];
      const SsmArgs a{plan, *s.cache, l, which, iv, &w[0], &w[1], &w[2], &w[3], &w[4], &w[5], ov, s.exec};
      const absl::Status st = backend.RunSsm(a);
      ASSERT_TRUE(st.ok()) << st;
      if (s.device == Device::kCuda) {
        CUDA_OK(cudaDeviceSynchronize());
      }
      r->ssm[l][which] = ToHost(yp[which], ys[which].size(), s.device);
    }
    // The compressed write of K = y_k, V = y_v.
    TensorView kt = View(yp[0], DType::kF32, {T, kHkv, D}, s.device), vt = View(yp[1], DType::kF32, {T, kHkv, D}, s.device);
    WriteArgs w{plan, *s.cache, l, kt, vt, s.exec};
    w.work = *work;
    absl::Status st = ValidateWrite(s.heads, w);
    ASSERT_TRUE(st.ok()) << st;
    st = backend.WriteKv(w);
    ASSERT_TRUE(st.ok()) << st;
    // Attention.
    std::vector<float> q;
    for (const Entry& e : entries) {
      const auto& dq = docs.q[e.doc][l];
      q.insert(q.end(), dq.begin() + size_t(e.from) * kHq * D, dq.begin() + size_t(e.to) * kHq * D);
    }
    std::vector<uint8_t> qbytes(q.size() * DTypeSize(qdt)), obytes(qbytes.size());
    for (size_t i = 0; i < q.size(); ++i) StoreFromFloat(qbytes.data(), qdt, int64_t(i), q[i]);
    std::vector<float>& lse = r->lse[l];
    lse.assign(size_t(T) * kHq, 0.f);
    void *qp = qbytes.data(), *op = obytes.data(), *lp = lse.data();
    std::unique_ptr<DeviceBuffer> dq, dout, dlse;
    if (s.device == Device::kCuda) {
      dq = std::make_unique<DeviceBuffer>(qbytes.size());
      dout = std::make_unique<DeviceBuffer>(obytes.size());
      dlse = std::make_unique<DeviceBuffer>(lse.size() * 4);
      CUDA_OK(cudaMemcpy(dq->p, qbytes.data(), qbytes.size(), cudaMemcpyHostToDevice));
      CUDA_OK(cudaMemset(dout->p, 0xff, obytes.size()));
      qp = dq->p, op = dout->p, lp = dlse->p;
    }
    TensorView qv = View(qp, qdt, {T, kHq, D}, s.device), ov = View(op, qdt, {T, kHq, D}, s.device);
    TensorView lv = View(lp, DType::kF32, {T, kHq}, s.device);
    const RunArgs args{plan, **work, *s.cache, l, qv, {&ov, &lv, nullptr}, s.exec};
    st = ValidateRun(s.heads, args);
    ASSERT_TRUE(st.ok()) << st;
    st = backend.Run(args);
    ASSERT_TRUE(st.ok()) << st;
    if (s.device == Device::kCuda) {
      CUDA_OK(cudaDeviceSynchronize());
      CUDA_OK(cudaMemcpy(obytes.data(), dout->p, obytes.size(), cudaMemcpyDeviceToHost));
      CUDA_OK(cudaMemcpy(lse.data(), dlse->p, lse.size() * 4, cudaMemcpyDeviceToHost));
    }
    r->out[l].resize(q.size());
    for (size_t i = 0; i < q.size(); ++i) r->out[l][i] = LoadAsFloat(obytes.data(), qdt, int64_t(i));
  }
}

double MaxErr(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return INFINITY;
  double e = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::abs(double(a[i]) - b[i]);
    if (!(d == d)) return INFINITY;  // NaN: never written
    e = std::max(e, d / std::max(1.0, std::abs(double(a[i]))));
  }
  return e;
}

void CompareOnGpu(DType dtype, int D, int P, int L, uint32_t seed) {
  SCOPED_TRACE(fmt::format("{} D={} P={} L={}", DTypeName(dtype), D, P, L));
  const HeadConfig heads{kHq, kHkv, D, dtype, 1.0f / std::sqrt(float(D))};
  if (!CheckCudaEngineSupport(heads).ok()) {
    std::printf("  head size %d not built for CUDA (KVP_CUDA_HEAD_SIZES): skipped\n", D);
    return;
  }
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  Docs docs;
  docs.D = D;
  // d_inner = Hkv * D: the SSM's y is the layer's K (V) directly (no out_proj in the test).
  docs.shape = attamba::SsmShape{4, kHkv * D / 4, 16, 2, 4};
  const attamba::SsmShape& sh = docs.shape;
  for (int l = 0; l < kLayers; ++l)
    for (int which = 0; which < 2; ++which) {
      SsmWeights& w = docs.w[l][which];
      w.conv_w.resize(size_t(sh.conv_dim()) * sh.conv_width);
      for (float& f : w.conv_w) f = 0.5f * normal(rng);
      w.conv_b.resize(size_t(sh.conv_dim()));
      for (float& f : w.conv_b) f = 0.1f * normal(rng);
      for (auto* v : {&w.dt_b, &w.a_log, &w.d_skip}) v->resize(size_t(sh.heads));
      for (float& f : w.dt_b) f = -1.0f + unit(rng);
      for (float& f : w.a_log) f = -1.0f + 2.0f * unit(rng);
      for (float& f : w.d_skip) f = normal(rng);
      w.norm_w.resize(size_t(sh.d_inner()));
      for (float& f : w.norm_w) f = 0.5f + unit(rng);
    }
  docs.lens = {70, 33, 9};
  std::vector<int32_t> ids(kBlocks);
  for (int i = 0; i < kBlocks; ++i) ids[i] = i;
  std::shuffle(ids.begin(), ids.end(), rng);
  size_t next = 0;
  for (size_t d = 0; d < docs.lens.size(); ++d) {
    const int len = docs.lens[d];
    docs.in.emplace_back(kLayers);
    docs.q.emplace_back(kLayers);
    for (int l = 0; l < kLayers; ++l) {
      for (int which = 0; which < 2; ++which) {
        docs.in[d][l].emplace_back(size_t(len) * sh.in_dim());
        for (float& f : docs.in[d][l].back()) f = normal(rng);
      }
      docs.q[d][l].resize(size_t(len) * kHq * D);
      for (float& f : docs.q[d][l]) {  // the queries the GPU sees (rounded to the kv dtype)
        uint8_t b[4];
        StoreFromFloat(b, dtype, 0, normal(rng));
        f = LoadAsFloat(b, dtype, 0);
      }
    }
    const CacheLayout full = attamba::Layout(Cfg(P, L, 0, sh), kBs, len, len);
    docs.compressed.emplace_back();
    for (int i = 0; i < full.compressed_pages; ++i) docs.compressed.back().push_back(ids[next++]);
    docs.token_pages.emplace_back();
    for (int j = 0; j < (len + kBs - 1) / kBs; ++j) docs.token_pages.back().push_back(ids[next++]);
    ASSERT_LE(next, ids.size());
  }
  Side cpu, gpu;
  MakeSide(&cpu, Device::kCpu, heads, P, L, docs);
  MakeSide(&gpu, Device::kCuda, heads, P, L, docs);
  ASSERT_TRUE(cpu.backend[1] && gpu.backend[1] && cpu.cache && gpu.cache);

  // Prefill, chunked prefill (split on and off chunk ends for the P and offsets), decodes.
  std::vector<std::vector<Entry>> schedule = {{{0, 0, 40}, {1, 0, 17}, {2, 0, 1}},
                                              {{0, 40, 57}, {1, 17, 18}, {2, 1, 2}},
                                              {{1, 18, 33}, {0, 57, 58}, {2, 2, 9}}};
  for (int p = 58; p < 70; ++p) schedule.push_back({{0, p, p + 1}});
  double worst_ssm = 0, worst_out = 0, worst_lse = 0;
  for (size_t i = 0; i < schedule.size(); ++i) {
    StepResult c, g;
    RunStep(cpu, docs, schedule[i], &c);
    if (::testing::Test::HasFatalFailure()) return;
    RunStep(gpu, docs, schedule[i], &g);
    if (::testing::Test::HasFatalFailure()) return;
    for (int l = 0; l < kLayers; ++l) {
      const double es = std::max(MaxErr(c.ssm[l][0], g.ssm[l][0]), MaxErr(c.ssm[l][1], g.ssm[l][1]));
      const double eo = MaxErr(c.out[l], g.out[l]), el = MaxErr(c.lse[l], g.lse[l]);
      EXPECT_LE(es, 2e-3) << "step " << i << " layer " << l << ": SSM output";
      EXPECT_LE(eo, dtype == DType::kF16 ? 8e-3 : 3e-2) << "step " << i << " layer " << l << ": attention out";
      EXPECT_LE(el, 1e-2) << "step " << i << " layer " << l << ": lse";
      worst_ssm = std::max(worst_ssm, es), worst_out = std::max(worst_out, eo), worst_lse = std::max(worst_lse, el);
    }
  }
  // Final states (conv rows and scan state of both SSMs), every layer and sequence.
  double state_err = 0;
  const size_t floats = size_t(2 * sh.state_floats());
  for (int l = 0; l < kLayers; ++l)
    for (int slot = 0; slot < int(docs.lens.size()); ++slot) {
      auto cs = cpu.cache->State(l, slot);
      auto gs = gpu.cache->State(l, slot);
      ASSERT_TRUE(cs.ok() && gs.ok());
      std::vector<float> a(floats), b(floats);
      std::memcpy(a.data(), cs->data(), floats * 4);
      CUDA_OK(cudaMemcpy(b.data(), gs->data(), floats * 4, cudaMemcpyDeviceToHost));
      const double e = MaxErr(a, b);
      EXPECT_LE(e, 2e-3) << "state of layer " << l << " slot " << slot;
      state_err = std::max(state_err, e);
    }
  // Pages: the same chunk-end and window rows (up to one rounding of the page dtype).
  double page_err = 0;
  for (int l = 0; l < kLayers; ++l) {
    const kv::PagedLayer& cp = cpu.cache->layer(l);
    const kv::PagedLayer& gp = gpu.cache->layer(l);
    const size_t page_bytes = size_t(2 * cp.stride_kv) * DTypeSize(cp.dtype);
    std::vector<uint8_t> host(page_bytes);
    CUDA_OK(cudaMemcpy(host.data(), gp.data, page_bytes, cudaMemcpyDeviceToHost));
    for (int64_t i = 0; i < 2 * cp.stride_kv; ++i) {
      const float a = LoadAsFloat(cp.data, cp.dtype, i), b = LoadAsFloat(host.data(), cp.dtype, i);
      page_err = std::max(page_err, std::abs(double(a) - b) / std::max(1.0, std::abs(double(a))));
    }
  }
  EXPECT_LE(page_err, dtype == DType::kF16 ? 2e-3 : 1.6e-2);
  std::printf("  %-8s D=%3d P=%d L=%d | max err ssm %.2e out %.2e lse %.2e state %.2e pages %.2e\n",
              std::string(DTypeName(dtype)).c_str(), D, P, L, worst_ssm, worst_out, worst_lse, state_err, page_err);
}

// Per head size the CUDA engine is built for (KVP_CUDA_HEAD_SIZES; a size not built skips with a
// message): 12 configurations each (2 dtypes x P in {1, 4, 8} x L in {0, 8}).
constexpr int kHeadSizes[] = {64, 128, 256};
constexpr int kConfigsPerHead = 12;

class AttambaGpuHead : public AttambaGpu, public ::testing::WithParamInterface<int> {};

TEST_P(AttambaGpuHead, SsmWriteAndAttentionMatchTheCpuBackend) {
  const int D = GetParam();
  const HeadConfig probe{kHq, kHkv, D, DType::kBF16, 1.0f};
  if (!CheckCudaEngineSupport(probe).ok()) GTEST_SKIP() << "head size " << D << " not built for CUDA (KVP_CUDA_HEAD_SIZES)";
  // KVP_GPU_TRIALS=n (the sanitizer runs): about 4n of the 36 configurations over all head sizes,
  // spread over them (a global index, so each head size gets its share).
  const char* trials = std::getenv("KVP_GPU_TRIALS");
  const int total = kConfigsPerHead * int(std::size(kHeadSizes));
  const int stride = trials ? std::max(1, total / (4 * std::max(1, std::atoi(trials)))) : 1;
  const int head_index = int(std::find(std::begin(kHeadSizes), std::end(kHeadSizes), D) - std::begin(kHeadSizes));
  int index = head_index * kConfigsPerHead;
  uint32_t seed = 7 + uint32_t(index);
  for (const DType dt : {DType::kBF16, DType::kF16})
    for (const int P : {1, 4, 8})
      for (const int L : {0, 8}) {
        ++seed;
        if (index++ % stride != 0) continue;
        CompareOnGpu(dt, D, P, L, seed);
        if (::testing::Test::HasFatalFailure()) return;
      }
}

INSTANTIATE_TEST_SUITE_P(HeadSizes, AttambaGpuHead, ::testing::ValuesIn(kHeadSizes),
                         [](const ::testing::TestParamInfo<int>& info) { return "D" + std::to_string(info.param); });

TEST_F(AttambaGpu, RegistryReportsCudaAndDuplicateStateSlotsFail) {
  const BackendInfo* info = FindBackend("attamba");
  ASSERT_NE(info, nullptr);
  ASSERT_NE(info->caps(Device::kCuda), nullptr) << "attamba reports no CUDA support";
  const HeadConfig heads{kHq, kHkv, 128, DType::kBF16, 0.088f};
  if (!CheckCudaEngineSupport(heads).ok()) GTEST_SKIP() << "head size 128 not built for CUDA";
  Docs docs;
  docs.D = 128;
  docs.shape = attamba::SsmShape{4, kHkv * 128 / 4, 16, 2, 4};
  const attamba::SsmShape& sh = docs.shape;
  for (int l = 0; l < kLayers; ++l)
    for (int which = 0; which < 2; ++which) {
      SsmWeights& w = docs.w[l][which];
      w.conv_w.assign(size_t(sh.conv_dim()) * sh.conv_width, 0.1f);
      w.conv_b.assign(size_t(sh.conv_dim()), 0.f);
      w.dt_b.assign(size_t(sh.heads), 0.f);
      w.a_log.assign(size_t(sh.heads), 0.f);
      w.d_skip.assign(size_t(sh.heads), 1.f);
      w.norm_w.assign(size_t(sh.d_inner()), 1.f);
    }
  Side gpu;
  MakeSide(&gpu, Device::kCuda, heads, 4, 0, docs);
  ASSERT_TRUE(gpu.backend[0] && gpu.cache);
  // Two sequences of one token each on state slot 0.
  const int32_t qsl[] = {0, 1, 2}, lens[] = {1 * kBs + 1, 1 * kBs + 1}, indptr[] = {0, 2, 4}, indices[] = {0, 1, 2, 3},
                slots[] = {0, 0}, p0s[] = {0, 0};
  const int64_t slot_map[] = {kBs, 3 * kBs};
  BatchPlan plan(PlanCapacity{2, 2, 4});
  ASSERT_TRUE(plan.EnableDevice(0).ok());
  BatchInput in;
  in.num_seqs = 2;
  in.block_size = kBs;
  in.query_start_loc = qsl;
  in.seq_lens = lens;
  in.kv_indptr = indptr;
  in.kv_indices = indices;
  in.slot_mapping = slot_map;
  in.state_slots = slots;
  in.query_pos_starts = p0s;
  ASSERT_TRUE(plan.Update(in).ok());
  DeviceBuffer din(size_t(2) * sh.in_dim() * 4), dout(size_t(2) * sh.d_inner() * 4);
  const TensorView iv = View(din.p, DType::kF32, {2, sh.in_dim()}, Device::kCuda);
  const TensorView ov = View(dout.p, DType::kF32, {2, sh.d_inner()}, Device::kCuda);
  const TensorView* w = gpu.wv[0][0];
  const SsmArgs a{plan, *gpu.cache, 0, 0, iv, &w[0], &w[1], &w[2], &w[3], &w[4], &w[5], ov, gpu.exec};
  const absl::Status st = gpu.backend[0]->RunSsm(a);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(std::string(st.message()).find("state slot 0 is given to two sequences"), std::string::npos) << st;
}

// The window check of the slot_mapping runs once per step in the plan step (the planner's
// BuildWriteSlots, kvp_plan_update on an attached attention) on CUDA, not in each layer's write: a
// wrong slot is refused there, naming the value and the expected slot, and a write with the step
// work of another plan generation is refused.
TEST_F(AttambaGpu, WrongWindowSlotIsRefusedAtPlanTime) {
  const HeadConfig heads{kHq, kHkv, 128, DType::kBF16, 0.088f};
  if (!CheckCudaEngineSupport(heads).ok()) GTEST_SKIP() << "head size 128 not built for CUDA";
  Docs docs;
  docs.D = 128;
  docs.shape = attamba::SsmShape{4, kHkv * 128 / 4, 16, 2, 4};
  for (int l = 0; l < kLayers; ++l)
    for (int which = 0; which < 2; ++which) {
      SsmWeights& w = docs.w[l][which];
      w.conv_w.assign(size_t(docs.shape.conv_dim()) * docs.shape.conv_width, 0.1f);
      w.conv_b.assign(size_t(docs.shape.conv_dim()), 0.f);
      w.dt_b.assign(size_t(docs.shape.heads), 0.f);
      w.a_log.assign(size_t(docs.shape.heads), 0.f);
      w.d_skip.assign(size_t(docs.shape.heads), 1.f);
      w.norm_w.assign(size_t(docs.shape.d_inner()), 1.f);
    }
  Side gpu;
  MakeSide(&gpu, Device::kCuda, heads, 4, 0, docs);
  ASSERT_TRUE(gpu.backend[1] && gpu.cache);
  // One sequence over positions [0, 6): compressed page 5, window (token) page 7.
  const CacheLayout lay = gpu.backend[0]->Layout(kBs, 6, 0);
  ASSERT_EQ(lay.compressed_pages, 1);
  ASSERT_EQ(lay.window_pages, 1);
  const int32_t qsl[] = {0, 6}, lens[] = {lay.seq_len}, indptr[] = {0, 2}, indices[] = {5, 7}, slots[] = {0}, p0s[] = {0};
  int64_t slot_map[6];
  for (int p = 0; p < 6; ++p) slot_map[p] = 7 * kBs + p;
  BatchPlan plan(PlanCapacity{1, 6, 2});
  ASSERT_TRUE(plan.EnableDevice(0).ok());
  BatchInput in;
  in.num_seqs = 1;
  in.block_size = kBs;
  in.query_start_loc = qsl;
  in.seq_lens = lens;
  in.kv_indptr = indptr;
  in.kv_indices = indices;
  in.slot_mapping = slot_map;
  in.state_slots = slots;
  in.query_pos_starts = p0s;
  ASSERT_TRUE(plan.Update(in).ok());
  StepWorkSet steps;
  const AttentionBackend& backend = *gpu.backend[0];
  const std::string key = StepKey(backend, heads);
  ASSERT_TRUE(steps.Attach(key, backend, heads, plan, gpu.exec).ok());  // kvp_plan_attach
  auto work = steps.Get(key, backend, heads, plan, gpu.exec);
  ASSERT_TRUE(work.ok()) << work.status();
  DeviceBuffer kv(size_t(6) * kHkv * 128 * 2);
  CUDA_OK(cudaMemset(kv.p, 0, size_t(6) * kHkv * 128 * 2));
  const TensorView kt = View(kv.p, DType::kBF16, {6, kHkv, 128}, Device::kCuda);
  WriteArgs w{plan, *gpu.cache, 0, kt, kt, gpu.exec};
  w.work = *work;
  ASSERT_TRUE(ValidateWrite(heads, w).ok());
  absl::Status st = backend.WriteKv(w);
  ASSERT_TRUE(st.ok()) << st;
  CUDA_OK(cudaDeviceSynchronize());
  // The next step's slot_mapping has token 4 in the wrong row: kvp_plan_update (plan.Update, then
  // every attached step work) refuses it, naming the value and the window slot.
  slot_map[4] = 7 * kBs + 5;
  ASSERT_TRUE(plan.Update(in).ok());
  st = steps.UpdateAll(plan, gpu.exec);
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_NE(std::string(st.message()).find(fmt::format("slot_mapping[4]={}", 7 * kBs + 5)), std::string::npos) << st;
  EXPECT_NE(std::string(st.message()).find(fmt::format("has window slot {}", 7 * kBs + 4)), std::string::npos) << st;
  // The write never walks the slots itself: with the step work of the earlier generation it refuses.
  st = backend.WriteKv(w);
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
  EXPECT_NE(std::string(st.message()).find("compressed slots from the plan step"), std::string::npos) << st;
  // -1 (store nothing in the window) is accepted.
  slot_map[4] = -1;
  ASSERT_TRUE(plan.Update(in).ok());
  ASSERT_TRUE(steps.UpdateAll(plan, gpu.exec).ok());
}

}  // namespace
}  // namespace kvplug::attn
