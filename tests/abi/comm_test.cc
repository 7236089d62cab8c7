// Communicators (ABI 0.4) through dlopen, on the CPU: the in-process communicator merges S partial
// attention states (each over a disjoint part of a query's keys) into the attention over all keys,
// for every rank, whatever the order of the contributions and from threads; empty partials weigh
// nothing; every bad input is driven to its exact status and message. NCCL: the unique id (or a
// clean NOT_SUPPORTED where libnccl is absent) and a clean refusal on a CPU context.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "abi/abi_harness.h"
#include "common/partial_softmax.h"
#include "kvplug/kv_cache/dtype.h"

namespace {

// The kvp_comm_* entry points, resolved from the loaded library (named `capi` so that EXPECT_KVP
// finds "api.kvp_..." in the checked expression).
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

struct CommDeleter {
  void operator()(kvp_comm* c) const { capi.kvp_comm_destroy(c); }
};
using CommHandle = std::unique_ptr<kvp_comm, CommDeleter>;

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr DLDataType kF16{kDLFloat, 16, 1};

class Comm : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(LoadLibrary());
    ASSERT_GE(api.kvp_abi_version(), 400u) << "the library is older than ABI 0.4";
    ASSERT_TRUE(ResolveComm("kvp_comm_nccl_unique_id", &capi.kvp_comm_nccl_unique_id) &&
                ResolveComm("kvp_comm_create", &capi.kvp_comm_create) &&
                ResolveComm("kvp_comm_destroy", &capi.kvp_comm_destroy) &&
                ResolveComm("kvp_comm_merge_attention", &capi.kvp_comm_merge_attention) &&
                ResolveComm("kvp_comm_pending", &capi.kvp_comm_pending))
        << "a kvp_comm_* symbol is missing";
    ctx_ = MakeContext(2);
    ASSERT_TRUE(ctx_);
  }
  Handle<kvp_context> ctx_;
};

kvp_comm_options Options(int32_t num_ranks, int32_t max_tokens, int32_t heads, int32_t head_size, kvp_dtype dtype) {
  kvp_comm_options o{};
  o.struct_size = sizeof o;
  o.kind = KVP_COMM_IN_PROCESS;
  o.num_ranks = num_ranks;
  o.rank = 0;
  o.nccl_unique_id = nullptr;
  o.max_num_tokens = max_tokens;
  o.num_heads = heads;
  o.head_size = head_size;
  o.out_dtype = dtype;
  o.validate_each_call = 0;
  return o;
}

CommHandle MakeComm(const kvp_context* ctx, const kvp_comm_options& o) {
  kvp_comm* c = nullptr;
  EXPECT_KVP(capi.kvp_comm_create(ctx, &o, &c), KVP_OK);
  return CommHandle(c);
}

DLDataType Dl(kvp_dtype t) {
  switch (t) {
    case KVP_DTYPE_FLOAT16: return kF16;
    case KVP_DTYPE_BFLOAT16: return kBF16;
    default: return kF32;
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

// S partials of attention over disjoint parts of each (token, head)'s keys, and the attention over
// all keys (double precision, explicit softmax).
struct Problem {
  int S, T, H, D;
  kvp_dtype dtype;
  std::vector<std::vector<uint8_t>> out;  // per rank: [T, H, D] in dtype
  std::vector<std::vector<float>> lse;    // per rank: [T, H]
  std::vector<double> want_out;           // [T, H, D]
  std::vector<double> want_lse;           // [T, H]
};

// empty_rank >= 0: that rank sees no key (lse = -inf, out = 0).
Problem MakeProblem(int S, int T, int H, int D, kvp_dtype dtype, int num_keys, uint32_t seed, int empty_rank = -1) {
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
        int o = static_cast<int>(rng() % S);
        if (o == empty_rank) o = (o + 1) % S;
        owner[j] = o;
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

// Per-rank DLTensors over the problem's buffers.
struct RankTensors {
  std::vector<std::unique_ptr<Tensor>> out, lse;
  explicit RankTensors(Problem& p) {
    for (int r = 0; r < p.S; ++r) {
      out.push_back(std::make_unique<Tensor>(p.out[r].data(), Dl(p.dtype), std::vector<int64_t>{p.T, p.H, p.D}));
      lse.push_back(std::make_unique<Tensor>(p.lse[r].data(), kF32, std::vector<int64_t>{p.T, p.H}));
    }
  }
};

double OutTolerance(kvp_dtype t) {
  switch (t) {
    case KVP_DTYPE_FLOAT16: return 3e-3;
    case KVP_DTYPE_BFLOAT16: return 2e-2;
    default: return 1e-5;
  }
}

// Every rank holds the attention over all keys.
void ExpectMerged(const Problem& p, const char* what) {
  const double tol = OutTolerance(p.dtype);
  for (int r = 0; r < p.S; ++r) {
    int bad = 0;
    for (size_t i = 0; i < p.want_lse.size() && bad < 5; ++i) {
      const double want = p.want_lse[i], got = p.lse[r][i];
      if (want == -kInf) {
        if (got != -kInf) ++bad, ADD_FAILURE() << what << " rank " << r << " lse[" << i << "]=" << got << ", want -inf";
      } else if (!(std::fabs(got - want) <= 1e-5 * std::max(1.0, std::fabs(want)))) {
        ++bad, ADD_FAILURE() << what << " rank " << r << " lse[" << i << "]=" << got << ", want " << want;
      }
    }
    for (size_t i = 0; i < p.want_out.size() && bad < 5; ++i) {
      const double got = Load(p.dtype, &p.out[r][i * ElemSize(p.dtype)]);
      if (!(std::fabs(got - p.want_out[i]) <= tol))
        ++bad, ADD_FAILURE() << what << " rank " << r << " out[" << i << "]=" << got << ", want " << p.want_out[i];
    }
  }
}

int32_t Pending(const kvp_comm* c) {
  int32_t n = -1;
  EXPECT_KVP(capi.kvp_comm_pending(c, &n), KVP_OK);
  return n;
}

// ------------------------------------------------------------------------------------------------
// In-process merges
// ------------------------------------------------------------------------------------------------

TEST_F(Comm, InProcessMergeEqualsFullAttention) {
  std::mt19937 rng(7);
  for (kvp_dtype dtype : {KVP_DTYPE_FLOAT32, KVP_DTYPE_FLOAT16, KVP_DTYPE_BFLOAT16}) {
    for (int S : {1, 2, 3, 8}) {
      const int H = 3, D = 16, max_tokens = 8;
      CommHandle comm = MakeComm(ctx_.get(), Options(S, max_tokens, H, D, dtype));
      ASSERT_TRUE(comm);
      EXPECT_EQ(Pending(comm.get()), 0);
      for (int round = 0; round < 3; ++round) {
        const int T = round == 0 ? max_tokens : 1 + round * 2;
        Problem p = MakeProblem(S, T, H, D, dtype, 37, static_cast<uint32_t>(rng()));
        RankTensors ts(p);
        std::vector<int> order(S);
        std::iota(order.begin(), order.end(), 0);
        std::shuffle(order.begin(), order.end(), rng);
        for (int k = 0; k < S; ++k) {
          const int r = order[k];
          ASSERT_OK(capi.kvp_comm_merge_attention(comm.get(), r, ts.out[r]->p(), ts.lse[r]->p()));
          EXPECT_EQ(Pending(comm.get()), k + 1 < S ? k + 1 : 0) << "S=" << S << " after " << k + 1;
        }
        ExpectMerged(p, ("S=" + std::to_string(S) + " dtype=" + std::to_string(dtype) + " T=" + std::to_string(T)).c_str());
      }
    }
  }
}

TEST_F(Comm, InProcessFromThreads) {
  const int S = 8, T = 4, H = 2, D = 32;
  CommHandle comm = MakeComm(ctx_.get(), Options(S, T, H, D, KVP_DTYPE_FLOAT32));
  ASSERT_TRUE(comm);
  for (int round = 0; round < 10; ++round) {
    Problem p = MakeProblem(S, T, H, D, KVP_DTYPE_FLOAT32, 50, 1000 + round);
    RankTensors ts(p);
    std::vector<kvp_status> status(S, KVP_ERR_INTERNAL);
    std::vector<std::thread> threads;
    for (int r = 0; r < S; ++r)
      threads.emplace_back([&, r] { status[r] = capi.kvp_comm_merge_attention(comm.get(), r, ts.out[r]->p(), ts.lse[r]->p()); });
    for (auto& t : threads) t.join();
    for (int r = 0; r < S; ++r) EXPECT_EQ(status[r], KVP_OK) << "rank " << r;
    EXPECT_EQ(Pending(comm.get()), 0);
    ExpectMerged(p, ("threads round " + std::to_string(round)).c_str());
  }
}

TEST_F(Comm, EmptyPartialsWeighNothing) {
  const int H = 2, D = 8, T = 3;
  for (int S : {2, 3}) {
    CommHandle comm = MakeComm(ctx_.get(), Options(S, T, H, D, KVP_DTYPE_FLOAT32));
    Problem p = MakeProblem(S, T, H, D, KVP_DTYPE_FLOAT32, 20, 99 + S, /*empty_rank=*/S - 1);
    for (float l : p.lse[S - 1]) ASSERT_EQ(l, -std::numeric_limits<float>::infinity());
    RankTensors ts(p);
    for (int r = S - 1; r >= 0; --r)
      ASSERT_OK(capi.kvp_comm_merge_attention(comm.get(), r, ts.out[r]->p(), ts.lse[r]->p()));
    ExpectMerged(p, "one empty partial");
  }
  // Every partial empty: out = 0, lse = -inf on every rank.
  CommHandle comm = MakeComm(ctx_.get(), Options(2, T, H, D, KVP_DTYPE_FLOAT32));
  Problem p = MakeProblem(2, T, H, D, KVP_DTYPE_FLOAT32, 0, 5);
  RankTensors ts(p);
  for (int r = 0; r < 2; ++r) ASSERT_OK(capi.kvp_comm_merge_attention(comm.get(), r, ts.out[r]->p(), ts.lse[r]->p()));
  ExpectMerged(p, "all empty");
}

TEST_F(Comm, ZeroTokensCompletesARound) {
  CommHandle comm = MakeComm(ctx_.get(), Options(2, 4, 2, 8, KVP_DTYPE_FLOAT32));
  float dummy = 0.0f;
  Tensor out(&dummy, kF32, {0, 2, 8}), lse(&dummy, kF32, {0, 2});
  ASSERT_OK(capi.kvp_comm_merge_attention(comm.get(), 1, out.p(), lse.p()));
  EXPECT_EQ(Pending(comm.get()), 1);
  float dummy2 = 0.0f;
  Tensor out2(&dummy2, kF32, {0, 2, 8}), lse2(&dummy2, kF32, {0, 2});
  ASSERT_OK(capi.kvp_comm_merge_attention(comm.get(), 0, out2.p(), lse2.p()));
  EXPECT_EQ(Pending(comm.get()), 0);
}

TEST_F(Comm, DoubleContributionIsRejectedAndTheRoundStillCompletes) {
  const int S = 3, T = 2, H = 2, D = 8;
  CommHandle comm = MakeComm(ctx_.get(), Options(S, T, H, D, KVP_DTYPE_FLOAT32));
  Problem p = MakeProblem(S, T, H, D, KVP_DTYPE_FLOAT32, 30, 42);
  RankTensors ts(p);
  ASSERT_OK(capi.kvp_comm_merge_attention(comm.get(), 1, ts.out[1]->p(), ts.lse[1]->p()));
  EXPECT_KVP(capi.kvp_comm_merge_attention(comm.get(), 1, ts.out[1]->p(), ts.lse[1]->p()), KVP_ERR_FAILED_PRECONDITION,
             "rank 1 already contributed", "1 of 3");
  EXPECT_EQ(Pending(comm.get()), 1);
  // A different T from the round's first contribution.
  std::vector<float> other_out(1 * H * D), other_lse(1 * H);
  Tensor o1(other_out.data(), kF32, {1, H, D}), l1(other_lse.data(), kF32, {1, H});
  EXPECT_KVP(capi.kvp_comm_merge_attention(comm.get(), 0, o1.p(), l1.p()), KVP_ERR_INVALID_ARGUMENT, "T=1",
             "rank 1 opened the round with T=2");
  // Another rank's tensors.
  EXPECT_KVP(capi.kvp_comm_merge_attention(comm.get(), 0, ts.out[1]->p(), ts.lse[0]->p()), KVP_ERR_INVALID_ARGUMENT,
             "overlaps rank 1's out");
  EXPECT_EQ(Pending(comm.get()), 1);
  ASSERT_OK(capi.kvp_comm_merge_attention(comm.get(), 2, ts.out[2]->p(), ts.lse[2]->p()));
  ASSERT_OK(capi.kvp_comm_merge_attention(comm.get(), 0, ts.out[0]->p(), ts.lse[0]->p()));
  EXPECT_EQ(Pending(comm.get()), 0);
  ExpectMerged(p, "after the rejected contributions");
}

// ------------------------------------------------------------------------------------------------
// Bad input
// ------------------------------------------------------------------------------------------------

TEST_F(Comm, CreateRejectsBadOptions) {
  kvp_comm* c = reinterpret_cast<kvp_comm*>(0x1);
  const kvp_comm_options good = Options(2, 4, 2, 8, KVP_DTYPE_FLOAT32);
  EXPECT_KVP(capi.kvp_comm_create(nullptr, &good, &c), KVP_ERR_INVALID_ARGUMENT, "context is NULL");
  EXPECT_KVP(capi.kvp_comm_create(ctx_.get(), &good, nullptr), KVP_ERR_INVALID_ARGUMENT, "out_comm is NULL");
  EXPECT_KVP(capi.kvp_comm_create(ctx_.get(), nullptr, &c), KVP_ERR_INVALID_ARGUMENT, "options is NULL");
  EXPECT_EQ(c, nullptr);
  auto expect_bad = [&](auto edit, kvp_status want, std::initializer_list<std::string_view> parts) {
    kvp_comm_options o = good;
    edit(o);
    kvp_comm* out = nullptr;
    SetMarker();
    const kvp_status got = capi.kvp_comm_create(ctx_.get(), &o, &out);
    CheckStatus(got, want, "capi.kvp_comm_create(ctx, &o, &out)", __FILE__, __LINE__, parts);
    EXPECT_EQ(out, nullptr);
    if (out) capi.kvp_comm_destroy(out);
  };
  expect_bad([](auto& o) { o.kind = 0; }, KVP_ERR_INVALID_ARGUMENT, {"kind=0"});
  expect_bad([](auto& o) { o.kind = 3; }, KVP_ERR_INVALID_ARGUMENT, {"kind=3"});
  expect_bad([](auto& o) { o.num_ranks = 0; }, KVP_ERR_INVALID_ARGUMENT, {"num_ranks=0", "[1, 1024]"});
  expect_bad([](auto& o) { o.num_ranks = 1025; }, KVP_ERR_INVALID_ARGUMENT, {"num_ranks=1025"});
  expect_bad([](auto& o) { o.rank = 1; }, KVP_ERR_INVALID_ARGUMENT, {"rank=1", "KVP_COMM_IN_PROCESS"});
  expect_bad([](auto& o) { o.max_num_tokens = 0; }, KVP_ERR_INVALID_ARGUMENT, {"max_num_tokens=0"});
  expect_bad([](auto& o) { o.num_heads = -1; }, KVP_ERR_INVALID_ARGUMENT, {"num_heads=-1"});
  expect_bad([](auto& o) { o.head_size = 0; }, KVP_ERR_INVALID_ARGUMENT, {"head_size=0"});
  expect_bad([](auto& o) { o.head_size = 5000; }, KVP_ERR_INVALID_ARGUMENT, {"head_size=5000"});
  expect_bad([](auto& o) { o.out_dtype = KVP_DTYPE_FP8_E4M3; }, KVP_ERR_INVALID_ARGUMENT, {"out_dtype=3"});
  expect_bad([](auto& o) { o.out_dtype = 17; }, KVP_ERR_INVALID_ARGUMENT, {"out_dtype=17"});
  expect_bad([](auto& o) { o.validate_each_call = 2; }, KVP_ERR_INVALID_ARGUMENT, {"validate_each_call=2"});
  expect_bad([](auto& o) { o.struct_size = sizeof(kvp_comm_options) + 8; }, KVP_ERR_NOT_SUPPORTED,
             {"options->struct_size=", "ABI"});
  expect_bad([](auto& o) { o.struct_size = 0; }, KVP_ERR_INVALID_ARGUMENT, {"options->struct_size=0"});
  // Scratch that cannot be allocated.
  expect_bad([](auto& o) {
    o.num_ranks = 1024;
    o.max_num_tokens = 1 << 30;
    o.num_heads = 65535;
  }, KVP_ERR_INVALID_ARGUMENT, {"2^50 bytes"});
}

TEST_F(Comm, OlderShorterOptionsAreAccepted) {
  kvp_comm_options o = Options(1, 2, 1, 4, KVP_DTYPE_FLOAT32);
  o.struct_size = offsetof(kvp_comm_options, validate_each_call);  // a caller that predates the last field
  kvp_comm* c = nullptr;
  EXPECT_KVP(capi.kvp_comm_create(ctx_.get(), &o, &c), KVP_OK);
  CommHandle h(c);
  EXPECT_TRUE(h);
}

TEST_F(Comm, MergeRejectsBadTensors) {
  const int S = 2, T = 3, H = 2, D = 8, max_tokens = 4;
  CommHandle comm = MakeComm(ctx_.get(), Options(S, max_tokens, H, D, KVP_DTYPE_FLOAT32));
  ASSERT_TRUE(comm);
  std::vector<float> ob(static_cast<size_t>(max_tokens + 1) * H * D * 2), lb(static_cast<size_t>(max_tokens + 1) * H);
  Tensor out(ob.data(), kF32, {T, H, D}), lse(lb.data(), kF32, {T, H});
  EXPECT_KVP(capi.kvp_comm_merge_attention(nullptr, 0, out.p(), lse.p()), KVP_ERR_INVALID_ARGUMENT, "comm is NULL");
  EXPECT_KVP(capi.kvp_comm_merge_attention(comm.get(), 0, nullptr, lse.p()), KVP_ERR_INVALID_ARGUMENT, "out is NULL");
  EXPECT_KVP(capi.kvp_comm_merge_attention(comm.get(), 0, out.p(), nullptr), KVP_ERR_INVALID_ARGUMENT, "lse is NULL");
  EXPECT_KVP(capi.kvp_comm_merge_attention(comm.get(), -1, out.p(), lse.p()), KVP_ERR_INVALID_ARGUMENT, "rank=-1",
             "num_ranks=2");
  EXPECT_KVP(capi.kvp_comm_merge_attention(comm.get(), 2, out.p(), lse.p()), KVP_ERR_INVALID_ARGUMENT, "rank=2");
  {
    Tensor big(ob.data(), kF32, {max_tokens + 1, H, D}), big_lse(lb.data(), kF32, {max_tokens + 1, H});
    EXPECT_KVP(capi.kvp_comm_merge_attention(comm.get(), 0, big.p(), big_lse.p()), KVP_ERR_INVALID_ARGUMENT, "T=5",
               "max_num_tokens=4");
  }
  {
    Tensor bf(ob.data(), kBF16, {T, H, D});
    EXPECT_KVP(capi.kvp_comm_merge_attention(comm.get(), 0, bf.p(), lse.p()), KVP_ERR_INVALID_ARGUMENT, "out",
               "bfloat16", "float32");
    Tensor l16(lb.data(), kF16, {T, H});
    EXPECT_KVP(capi.kvp_comm_merge_attention(comm.get(), 0, out.p(), l16.p()), KVP_ERR_INVALID_ARGUMENT, "lse",
               "float16", "float32");
    Tensor i32(ob.data(), kI32, {T, H, D});
    EXPECT_KVP(capi.kvp_comm_merge_attention(comm.get(), 0, i32.p(), lse.p()), KVP_ERR_INVALID_ARGUMENT, "out: dtype");
  }
  {
    Tensor heads(ob.data(), kF32, {T, H + 1, D});
    EXPECT_KVP(capi.kvp_comm_merge_attention(comm.get(), 0, heads.p(), lse.p()), KVP_ERR_INVALID_ARGUMENT,
               "out: shape [3, 3, 8]", "num_heads=2");
    Tensor dims(ob.data(), kF32, {T, H, D + 1});
    EXPECT_KVP(capi.kvp_comm_merge_attention(comm.get(), 0, dims.p(), lse.p()), KVP_ERR_INVALID_ARGUMENT,
               "head_size=8");
    Tensor flat(ob.data(), kF32, {T * H * D});
    EXPECT_KVP(capi.kvp_comm_merge_attention(comm.get(), 0, flat.p(), lse.p()), KVP_ERR_INVALID_ARGUMENT, "out: ndim=1");
    Tensor lse_t(lb.data(), kF32, {T - 1, H});
    EXPECT_KVP(capi.kvp_comm_merge_attention(comm.get(), 0, out.p(), lse_t.p()), KVP_ERR_INVALID_ARGUMENT,
               "lse: shape [2, 2]", "T=3");
  }
  {
    Tensor gpu(ob.data(), kF32, {T, H, D});
    gpu.t.device = DLDevice{kDLCUDA, 0};
    EXPECT_KVP(capi.kvp_comm_merge_attention(comm.get(), 0, gpu.p(), lse.p()), KVP_ERR_INVALID_ARGUMENT, "out: device",
               "type=2");
  }
  {
    Tensor padded(ob.data(), kF32, {T, H, D}, {2 * H * D, D, 1});
    EXPECT_KVP(capi.kvp_comm_merge_attention(comm.get(), 0, padded.p(), lse.p()), KVP_ERR_INVALID_ARGUMENT,
               "out: not contiguous", "strides[0]=32");
    Tensor lse_strided(lb.data(), kF32, {T, H}, {1, T});
    EXPECT_KVP(capi.kvp_comm_merge_attention(comm.get(), 0, out.p(), lse_strided.p()), KVP_ERR_INVALID_ARGUMENT,
               "lse: not contiguous");
    Tensor self_overlap(ob.data(), kF32, {T, H, D}, {0, D, 1});
    EXPECT_KVP(capi.kvp_comm_merge_attention(comm.get(), 0, self_overlap.p(), lse.p()), KVP_ERR_INVALID_ARGUMENT,
               "out");
    Tensor lse_in_out(ob.data() + 4, kF32, {T, H});
    EXPECT_KVP(capi.kvp_comm_merge_attention(comm.get(), 0, out.p(), lse_in_out.p()), KVP_ERR_INVALID_ARGUMENT,
               "out", "overlaps lse");
  }
  EXPECT_EQ(Pending(comm.get()), 0) << "a rejected call must not contribute";
  int32_t n = 0;
  EXPECT_KVP(capi.kvp_comm_pending(nullptr, &n), KVP_ERR_INVALID_ARGUMENT, "comm is NULL");
  EXPECT_KVP(capi.kvp_comm_pending(comm.get(), nullptr), KVP_ERR_INVALID_ARGUMENT, "out_num_contributed is NULL");
  capi.kvp_comm_destroy(nullptr);  // a no-op
}

// ------------------------------------------------------------------------------------------------
// NCCL on this machine
// ------------------------------------------------------------------------------------------------

TEST_F(Comm, NcclUniqueIdOrNotSupported) {
  EXPECT_KVP(capi.kvp_comm_nccl_unique_id(nullptr), KVP_ERR_INVALID_ARGUMENT, "out_id is NULL");
  uint8_t id[KVP_NCCL_UNIQUE_ID_BYTES] = {};
  SetMarker();
  const kvp_status s = capi.kvp_comm_nccl_unique_id(id);
  const std::string msg = api.kvp_last_error();
  if (s == KVP_OK) {
    EXPECT_TRUE(std::any_of(std::begin(id), std::end(id), [](uint8_t b) { return b != 0; })) << "an all-zero id";
  } else if (s == KVP_ERR_NOT_SUPPORTED) {
    EXPECT_NE(msg.find("kvp_comm_nccl_unique_id:"), std::string::npos) << msg;
    EXPECT_NE(msg.find("libnccl"), std::string::npos) << msg;
  } else {
    // NCCL loaded but failed (no network interface, ...): a device error naming the call.
    EXPECT_EQ(s, KVP_ERR_DEVICE) << Name(s) << ": " << msg;
    EXPECT_NE(msg.find("ncclGetUniqueId"), std::string::npos) << msg;
  }
}

TEST_F(Comm, NcclOnACpuContextFailsCleanly) {
  uint8_t id[KVP_NCCL_UNIQUE_ID_BYTES] = {1};
  kvp_comm_options o = Options(1, 4, 2, 8, KVP_DTYPE_FLOAT16);
  o.kind = KVP_COMM_NCCL;
  o.nccl_unique_id = id;
  kvp_comm* c = nullptr;
  EXPECT_KVP(capi.kvp_comm_create(ctx_.get(), &o, &c), KVP_ERR_NOT_SUPPORTED, "KVP_COMM_NCCL");
  EXPECT_EQ(c, nullptr);
  const std::string msg = api.kvp_last_error();
  EXPECT_TRUE(msg.find("built without CUDA") != std::string::npos || msg.find("CUDA context") != std::string::npos)
      << msg;
  // The NCCL rank rule.
  o.rank = 1;
  EXPECT_KVP(capi.kvp_comm_create(ctx_.get(), &o, &c), KVP_ERR_INVALID_ARGUMENT, "rank=1", "num_ranks=1");
}

}  // namespace
