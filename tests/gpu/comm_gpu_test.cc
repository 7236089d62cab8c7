// Communicators (ABI 0.4) on a CUDA context, through dlopen: the in-process communicator for 1, 2
// and 4 ranks against a double-precision host reference (softmax over all keys), and the NCCL path
// with one rank (the merge of one partial is that partial) and, where two GPUs are visible, with
// two ranks on two devices from two threads. Without a GPU every test skips with a message (CTest
// label `gpu`); without libnccl the NCCL tests skip.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/partial_softmax.h"
#include "kvplug/kv_cache/dtype.h"
#include "kvplug/kvplug_dl.h"

namespace {

kvp_api api;
bool api_loaded = false;

using comm_nccl_unique_id_fn = decltype(&kvp_comm_nccl_unique_id);
using comm_create_fn = decltype(&kvp_comm_create);
using comm_destroy_fn = decltype(&kvp_comm_destroy);
using comm_merge_attention_fn = decltype(&kvp_comm_merge_attention);
using comm_pending_fn = decltype(&kvp_comm_pending);
struct CommApi {
  comm_nccl_unique_id_fn kvp_comm_nccl_unique_id = nullptr;
  comm_create_fn kvp_comm_create = nullptr;
  comm_destroy_fn kvp_comm_destroy = nullptr;
  comm_merge_attention_fn kvp_comm_merge_attention = nullptr;
  comm_pending_fn kvp_comm_pending = nullptr;
} capi;

template <class F>
bool ResolveComm(const char* name, F* fn) {
  *reinterpret_cast<void**>(fn) = dlsym(api.handle, name);
  return *fn != nullptr;
}

#define KVP_OK_OR_FAIL(call) ASSERT_EQ(call, KVP_OK) << #call << ": " << api.kvp_last_error()
#define CUDA_OK(call) ASSERT_EQ((call), cudaSuccess) << #call

constexpr double kInf = std::numeric_limits<double>::infinity();

DLDataType Dl(kvp_dtype t) {
  switch (t) {
    case KVP_DTYPE_FLOAT16: return DLDataType{kDLFloat, 16, 1};
    case KVP_DTYPE_BFLOAT16: return DLDataType{kDLBfloat, 16, 1};
    default: return DLDataType{kDLFloat, 32, 1};
  }
}
size_t ElemSize(kvp_dtype t) { return t == KVP_DTYPE_FLOAT32 ? 4 : 2; }

void Store(kvp_dtype t, uint8_t* p, double v) {
  const float f = static_cast<float>(v);
  if (t == KVP_DTYPE_FLOAT32) {
    std::memcpy(p, &f, 4);
    return;
  }
  const uint16_t h = t == KVP_DTYPE_FLOAT16 ? kvplug::FloatToF16(f) : kvplug::FloatToBf16(f);
  std::memcpy(p, &h, 2);
}
double Load(kvp_dtype t, const uint8_t* p) {
  if (t == KVP_DTYPE_FLOAT32) {
    float f;
    std::memcpy(&f, p, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, p, 2);
  return t == KVP_DTYPE_FLOAT16 ? kvplug::F16ToFloat(h) : kvplug::Bf16ToFloat(h);
}

// S partials over disjoint parts of each (token, head)'s keys and the attention over all keys.
struct Problem {
  int S, T, H, D;
  kvp_dtype dtype;
  std::vector<std::vector<uint8_t>> out;  // per rank [T, H, D]
  std::vector<std::vector<float>> lse;    // per rank [T, H]
  std::vector<double> want_out, want_lse;
};

Problem MakeProblem(int S, int T, int H, int D, kvp_dtype dtype, int num_keys, uint32_t seed) {
  Problem p{S, T, H, D, dtype, {}, {}, {}, {}};
  std::mt19937 rng(seed);
  std::normal_distribution<double> logit(0.0, 2.0);
  std::uniform_real_distribution<double> value(-1.0, 1.0);
  p.out.assign(S, std::vector<uint8_t>(static_cast<size_t>(T) * H * D * ElemSize(dtype)));
  p.lse.assign(S, std::vector<float>(static_cast<size_t>(T) * H));
  p.want_out.assign(static_cast<size_t>(T) * H * D, 0.0);
  p.want_lse.assign(static_cast<size_t>(T) * H, -kInf);
  std::vector<double> s(num_keys), v(static_cast<size_t>(num_keys) * D);
  std::vector<int> owner(num_keys);
  for (int t = 0; t < T; ++t) {
    for (int h = 0; h < H; ++h) {
      for (int j = 0; j < num_keys; ++j) {
        s[j] = logit(rng);
        for (int d = 0; d < D; ++d) v[j * D + d] = value(rng);
        owner[j] = static_cast<int>(rng() % S);
      }
      const size_t row = static_cast<size_t>(t) * H + h;
      auto softmax = [&](auto in_part, double* out_row) {
        return ::kvplug::testing::PartialSoftmax(s.data(), v.data(), num_keys, D, in_part, out_row);
      };
      std::vector<double> part(D);
      for (int r = 0; r < S; ++r) {
        const double lse = softmax([&](int j) { return owner[j] == r; }, part.data());
        p.lse[r][row] = static_cast<float>(lse);
        for (int d = 0; d < D; ++d) Store(dtype, &p.out[r][(row * D + d) * ElemSize(dtype)], part[d]);
      }
      p.want_lse[row] = softmax([](int) { return true; }, &p.want_out[row * D]);
    }
  }
  return p;
}

double OutTolerance(kvp_dtype t) {
  switch (t) {
    case KVP_DTYPE_FLOAT16: return 3e-3;
    case KVP_DTYPE_BFLOAT16: return 2e-2;
    default: return 5e-5;  // the merge kernel builds with --use_fast_math
  }
}

// A rank's partial in device memory and the DLTensors over it.
struct DevicePartial {
  void* out = nullptr;
  float* lse = nullptr;
  int64_t out_shape[3];
  int64_t lse_shape[2];
  DLTensor out_t{}, lse_t{};
  int device = 0;
  DevicePartial() = default;
  DevicePartial(const DevicePartial&) = delete;
  DevicePartial& operator=(const DevicePartial&) = delete;
  ~DevicePartial() {
    if (out) cudaFree(out);
    if (lse) cudaFree(lse);
  }
  ::testing::AssertionResult Upload(const Problem& p, int r, int dev) {
    device = dev;
    cudaSetDevice(dev);
    if (cudaMalloc(&out, p.out[r].size()) != cudaSuccess ||
        cudaMalloc(reinterpret_cast<void**>(&lse), p.lse[r].size() * 4) != cudaSuccess ||
        cudaMemcpy(out, p.out[r].data(), p.out[r].size(), cudaMemcpyHostToDevice) != cudaSuccess ||
        cudaMemcpy(lse, p.lse[r].data(), p.lse[r].size() * 4, cudaMemcpyHostToDevice) != cudaSuccess)
      return ::testing::AssertionFailure() << "device allocation or upload failed";
    out_shape[0] = p.T;
    out_shape[1] = p.H;
    out_shape[2] = p.D;
    lse_shape[0] = p.T;
    lse_shape[1] = p.H;
    out_t.data = out;
    out_t.device = DLDevice{kDLCUDA, dev};
    out_t.ndim = 3;
    out_t.dtype = Dl(p.dtype);
    out_t.shape = out_shape;
    lse_t.data = lse;
    lse_t.device = DLDevice{kDLCUDA, dev};
    lse_t.ndim = 2;
    lse_t.dtype = DLDataType{kDLFloat, 32, 1};
    lse_t.shape = lse_shape;
    return ::testing::AssertionSuccess();
  }
  // Copies the device values back over rank r's host buffers.
  ::testing::AssertionResult Download(Problem& p, int r) const {
    cudaSetDevice(device);
    if (cudaDeviceSynchronize() != cudaSuccess ||
        cudaMemcpy(p.out[r].data(), out, p.out[r].size(), cudaMemcpyDeviceToHost) != cudaSuccess ||
        cudaMemcpy(p.lse[r].data(), lse, p.lse[r].size() * 4, cudaMemcpyDeviceToHost) != cudaSuccess)
      return ::testing::AssertionFailure() << "download failed";
    return ::testing::AssertionSuccess();
  }
};

void ExpectRankMerged(const Problem& p, int r, const std::string& what) {
  const double tol = OutTolerance(p.dtype);
  int bad = 0;
  for (size_t i = 0; i < p.want_lse.size() && bad < 5; ++i) {
    const double want = p.want_lse[i], got = p.lse[r][i];
    if (want == -kInf ? got != -kInf : !(std::fabs(got - want) <= 5e-5 * std::max(1.0, std::fabs(want))))
      ++bad, ADD_FAILURE() << what << " rank " << r << " lse[" << i << "]=" << got << ", want " << want;
  }
  for (size_t i = 0; i < p.want_out.size() && bad < 5; ++i) {
    const double got = Load(p.dtype, &p.out[r][i * ElemSize(p.dtype)]);
    if (!(std::fabs(got - p.want_out[i]) <= tol))
      ++bad, ADD_FAILURE() << what << " rank " << r << " out[" << i << "]=" << got << ", want " << p.want_out[i];
  }
}

kvp_comm_options Options(kvp_comm_kind kind, int32_t num_ranks, int32_t rank, int32_t max_tokens, int32_t heads,
                         int32_t head_size, kvp_dtype dtype, const uint8_t* id) {
  kvp_comm_options o{};
  o.struct_size = sizeof o;
  o.kind = kind;
  o.num_ranks = num_ranks;
  o.rank = rank;
  o.nccl_unique_id = id;
  o.max_num_tokens = max_tokens;
  o.num_heads = heads;
  o.head_size = head_size;
  o.out_dtype = dtype;
  o.validate_each_call = kind == KVP_COMM_NCCL ? 1 : 0;
  return o;
}

class CommGpu : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const char* path = std::getenv("KVP_LIBRARY");
    char err[512];
    api_loaded = path && kvp_api_load(&api, path, err, sizeof err) == 0;
    if (!api_loaded) {
      std::fprintf(stderr, "cannot load KVP_LIBRARY: %s\n", path ? err : "(unset)");
      return;
    }
    api_loaded = ResolveComm("kvp_comm_nccl_unique_id", &capi.kvp_comm_nccl_unique_id) &&
                 ResolveComm("kvp_comm_create", &capi.kvp_comm_create) &&
                 ResolveComm("kvp_comm_destroy", &capi.kvp_comm_destroy) &&
                 ResolveComm("kvp_comm_merge_attention", &capi.kvp_comm_merge_attention) &&
                 ResolveComm("kvp_comm_pending", &capi.kvp_comm_pending);
    if (!api_loaded) std::fprintf(stderr, "%s lacks a kvp_comm_* symbol\n", path);
  }
  void SetUp() override {
    ASSERT_TRUE(api_loaded);
    if (cudaGetDeviceCount(&num_devices_) != cudaSuccess || num_devices_ == 0)
      GTEST_SKIP() << "no CUDA device: GPU test skipped";
    setenv("NCCL_NVLS_ENABLE", "0", 1);  // NVLink multicast stays off on these machines
    gpu_ = MakeGpuContext(0);
    ASSERT_NE(gpu_, nullptr);
  }
  void TearDown() override {
    if (gpu_) api.kvp_context_destroy(gpu_);
  }
  static kvp_context* MakeGpuContext(int device) {
    kvp_context_options o{sizeof(o)};
    o.device_type = kDLCUDA;
    o.device_id = device;
    kvp_context* c = nullptr;
    EXPECT_EQ(api.kvp_context_create(&o, &c), KVP_OK) << api.kvp_last_error();
    return c;
  }
  // The NCCL unique id, or false (and a skip message) where NCCL is absent.
  static bool NcclId(uint8_t* id, std::string* why) {
    const kvp_status s = capi.kvp_comm_nccl_unique_id(id);
    if (s == KVP_OK) return true;
    *why = std::string(api.kvp_status_string(s)) + ": " + api.kvp_last_error();
    return false;
  }
  int num_devices_ = 0;
  kvp_context* gpu_ = nullptr;
};

TEST_F(CommGpu, InProcessMergeEqualsFullAttention) {
  std::mt19937 rng(11);
  for (kvp_dtype dtype : {KVP_DTYPE_FLOAT16, KVP_DTYPE_BFLOAT16, KVP_DTYPE_FLOAT32}) {
    for (int S : {1, 2, 4}) {
      const int T = 6, H = 4, D = 128;
      kvp_comm* comm = nullptr;
      const kvp_comm_options o = Options(KVP_COMM_IN_PROCESS, S, 0, 8, H, D, dtype, nullptr);
      KVP_OK_OR_FAIL(capi.kvp_comm_create(gpu_, &o, &comm));
      for (int round = 0; round < 2; ++round) {
        Problem p = MakeProblem(S, T - round, H, D, dtype, 64, static_cast<uint32_t>(rng()));
        std::vector<DevicePartial> parts(S);
        for (int r = 0; r < S; ++r) ASSERT_TRUE(parts[r].Upload(p, r, 0));
        std::vector<int> order(S);
        std::iota(order.begin(), order.end(), 0);
        std::shuffle(order.begin(), order.end(), rng);
        for (int r : order) KVP_OK_OR_FAIL(capi.kvp_comm_merge_attention(comm, r, &parts[r].out_t, &parts[r].lse_t));
        int32_t pending = -1;
        KVP_OK_OR_FAIL(capi.kvp_comm_pending(comm, &pending));
        EXPECT_EQ(pending, 0);
        for (int r = 0; r < S; ++r) {
          ASSERT_TRUE(parts[r].Download(p, r));
          ExpectRankMerged(p, r, "in-process S=" + std::to_string(S) + " dtype=" + std::to_string(dtype));
        }
      }
      capi.kvp_comm_destroy(comm);
    }
  }
}

TEST_F(CommGpu, NcclOneRankReturnsThePartial) {
  uint8_t id[KVP_NCCL_UNIQUE_ID_BYTES];
  std::string why;
  if (!NcclId(id, &why)) GTEST_SKIP() << "NCCL unavailable: " << why;
  for (kvp_dtype dtype : {KVP_DTYPE_FLOAT16, KVP_DTYPE_BFLOAT16}) {
    if (dtype != KVP_DTYPE_FLOAT16) ASSERT_TRUE(NcclId(id, &why)) << why;
    const int T = 5, H = 8, D = 128;
    kvp_comm* comm = nullptr;
    const kvp_comm_options o = Options(KVP_COMM_NCCL, 1, 0, 16, H, D, dtype, id);
    KVP_OK_OR_FAIL(capi.kvp_comm_create(gpu_, &o, &comm));
    Problem p = MakeProblem(1, T, H, D, dtype, 40, 5 + dtype);
    const std::vector<uint8_t> in_out = p.out[0];
    const std::vector<float> in_lse = p.lse[0];
    DevicePartial part;
    ASSERT_TRUE(part.Upload(p, 0, 0));
    for (int call = 0; call < 3; ++call) KVP_OK_OR_FAIL(capi.kvp_comm_merge_attention(comm, 0, &part.out_t, &part.lse_t));
    ASSERT_TRUE(part.Download(p, 0));
    EXPECT_EQ(p.out[0], in_out) << "the merge of one partial is that partial";
    for (size_t i = 0; i < in_lse.size(); ++i) EXPECT_NEAR(p.lse[0][i], in_lse[i], 1e-5) << i;
    ExpectRankMerged(p, 0, "NCCL one rank");
    // A call for another rank, or without lse, is refused.
    EXPECT_EQ(capi.kvp_comm_merge_attention(comm, 1, &part.out_t, &part.lse_t), KVP_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(capi.kvp_comm_merge_attention(comm, 0, &part.out_t, nullptr), KVP_ERR_INVALID_ARGUMENT);
    capi.kvp_comm_destroy(comm);
  }
}

TEST_F(CommGpu, NcclTwoRanksOnTwoDevices) {
  if (num_devices_ < 2) GTEST_SKIP() << "needs two CUDA devices";
  uint8_t id[KVP_NCCL_UNIQUE_ID_BYTES];
  std::string why;
  if (!NcclId(id, &why)) GTEST_SKIP() << "NCCL unavailable: " << why;
  const int S = 2, T = 7, H = 4, D = 128;
  const kvp_dtype dtype = KVP_DTYPE_BFLOAT16;
  Problem p = MakeProblem(S, T, H, D, dtype, 80, 77);
  std::vector<kvp_status> create(S, KVP_ERR_INTERNAL), merge(S, KVP_ERR_INTERNAL);
  std::vector<std::string> errors(S);
  std::vector<std::thread> threads;
  for (int r = 0; r < S; ++r) {
    threads.emplace_back([&, r] {
      kvp_context* ctx = MakeGpuContext(r);
      if (!ctx) return;
      DevicePartial part;
      if (!part.Upload(p, r, r)) return;
      kvp_comm* comm = nullptr;
      const kvp_comm_options o = Options(KVP_COMM_NCCL, S, r, 16, H, D, dtype, id);
      create[r] = capi.kvp_comm_create(ctx, &o, &comm);
      if (create[r] == KVP_OK) {
        merge[r] = capi.kvp_comm_merge_attention(comm, r, &part.out_t, &part.lse_t);
        if (merge[r] != KVP_OK) errors[r] = api.kvp_last_error();
        if (!part.Download(p, r)) merge[r] = KVP_ERR_DEVICE;
        capi.kvp_comm_destroy(comm);
      } else {
        errors[r] = api.kvp_last_error();
      }
      api.kvp_context_destroy(ctx);
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < S; ++r) {
    ASSERT_EQ(create[r], KVP_OK) << "rank " << r << ": " << errors[r];
    ASSERT_EQ(merge[r], KVP_OK) << "rank " << r << ": " << errors[r];
    ExpectRankMerged(p, r, "NCCL two ranks");
  }
}

}  // namespace
