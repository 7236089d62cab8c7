// The NCCL communicator: one object per rank. libnccl.so.2 is loaded with dlopen on first use, so
// a process that already carries an NCCL (PyTorch does) shares it, and no NCCL header or library is
// needed at build time: the few types and functions used are declared here as nccl.h declares them
// (values checked against NCCL 2.28's nccl.h). The loader is plain host code and is built
// everywhere (a unique id needs no GPU); the communicator itself is built only with CUDA.
#include <dlfcn.h>

#include <cstring>
#include <string>
#include <vector>

#include "fmt/format.h"
#include "fmt/ranges.h"
#include "kvplug/attention/communicator.h"

#ifdef KVP_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "kvplug/attention/cpu_engine.h"
#include "kvplug/attention/engine.h"
#include "kvplug/kv_cache/cuda_kernels.h"
#endif

namespace kvplug::attn {
namespace {

// ---- NCCL's ABI, as nccl.h declares it ----
struct NcclComm;  // opaque
using ncclComm_t = NcclComm*;
struct ncclUniqueId {
  char internal[kNcclUniqueIdBytes];
};
using ncclResult_t = int;    // enum ncclResult_t: ncclSuccess = 0
using ncclDataType_t = int;  // enum ncclDataType_t
constexpr ncclResult_t ncclSuccess = 0;
[[maybe_unused]] constexpr ncclDataType_t ncclInt32 = 2;
[[maybe_unused]] constexpr ncclDataType_t ncclFloat16 = 6;
[[maybe_unused]] constexpr ncclDataType_t ncclFloat32 = 7;
[[maybe_unused]] constexpr ncclDataType_t ncclBfloat16 = 9;

struct NcclLibrary {
  void* handle = nullptr;
  std::string error;  // why loading failed (empty when it succeeded)
  ncclResult_t (*GetUniqueId)(ncclUniqueId*) = nullptr;
  ncclResult_t (*CommInitRank)(ncclComm_t*, int, ncclUniqueId, int) = nullptr;
  ncclResult_t (*CommDestroy)(ncclComm_t) = nullptr;
  ncclResult_t (*AllGather)(const void*, void*, size_t, ncclDataType_t, ncclComm_t, void*) = nullptr;
  const char* (*GetErrorString)(ncclResult_t) = nullptr;
  const char* (*GetLastError)(ncclComm_t) = nullptr;                   // optional (NCCL >= 2.13)
  ncclResult_t (*CommGetAsyncError)(ncclComm_t, ncclResult_t*) = nullptr;  // optional
  ncclResult_t (*GetVersion)(int*) = nullptr;                         // optional

  bool ok() const { return error.empty(); }

  // "<what> failed: <NCCL's name for r> (<r>): <NCCL's last message>".
  std::string Describe(const char* what, ncclResult_t r, ncclComm_t comm) const {
    const char* name = GetErrorString ? GetErrorString(r) : nullptr;
    const char* last = GetLastError ? GetLastError(comm) : nullptr;
    return fmt::format("{} failed: {} (ncclResult_t {}){}{}", what, name ? name : "unknown error", r,
                       last && *last ? ": " : "", last ? last : "");
  }
};

template <class F>
bool Resolve(void* handle, const char* name, F* fn) {
  *reinterpret_cast<void**>(fn) = dlsym(handle, name);
  return *fn != nullptr;
}

NcclLibrary LoadNccl() {
  NcclLibrary lib;
  std::string tried;
  for (const char* name : {"libnccl.so.2", "libnccl.so"}) {
    lib.handle = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (lib.handle) break;
    const char* e = dlerror();
    tried += fmt::format("{}dlopen({}): {}", tried.empty() ? "" : "; ", name, e ? e : "unknown error");
  }
  if (!lib.handle) {
    lib.error = fmt::format("NCCL is not available: libnccl.so.2 could not be loaded ({})", tried);
    return lib;
  }
  const bool ok = Resolve(lib.handle, "ncclGetUniqueId", &lib.GetUniqueId) &&
                  Resolve(lib.handle, "ncclCommInitRank", &lib.CommInitRank) &&
                  Resolve(lib.handle, "ncclCommDestroy", &lib.CommDestroy) &&
                  Resolve(lib.handle, "ncclAllGather", &lib.AllGather) &&
                  Resolve(lib.handle, "ncclGetErrorString", &lib.GetErrorString);
  if (!ok) {
    lib.error = "NCCL is not usable: libnccl.so.2 lacks one of ncclGetUniqueId, ncclCommInitRank, "
                "ncclCommDestroy, ncclAllGather, ncclGetErrorString";
    return lib;  // the handle stays open: the library may be shared with the host process
  }
  Resolve(lib.handle, "ncclGetLastError", &lib.GetLastError);
  Resolve(lib.handle, "ncclCommGetAsyncError", &lib.CommGetAsyncError);
  Resolve(lib.handle, "ncclGetVersion", &lib.GetVersion);
  return lib;
}

// Loaded once per process, on first use (a function-local static: thread-safe), never unloaded.
const NcclLibrary& Nccl() {
  static const NcclLibrary lib = LoadNccl();
  return lib;
}

#ifdef KVP_HAVE_CUDA

// Makes `device` current for a scope and restores the previous one.
class DeviceScope {
 public:
  explicit DeviceScope(int32_t device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    status_ = cudaSetDevice(device);
  }
  ~DeviceScope() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  int status() const { return status_; }

 private:
  int previous_ = -1;
  int status_ = 0;
};

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  ~DeviceBuffer() { kv::cuda::DeviceFree(data_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  absl::Status Allocate(int64_t bytes, int32_t device, const char* what) {
    if (bytes <= 0) return absl::OkStatus();
    if (const int e = kv::cuda::DeviceAlloc(&data_, bytes, device); e != 0) {
      data_ = nullptr;
      const std::string msg = fmt::format("NCCL communicator scratch for {} ({} bytes on CUDA device {}): {}", what,
                                          bytes, device, kv::cuda::ErrorString(e));
      return e == 2 /* cudaErrorMemoryAllocation */ ? absl::ResourceExhaustedError(msg)
                                                    : absl::UnavailableError(msg);
    }
    return absl::OkStatus();
  }
  void* data() const { return data_; }

 private:
  void* data_ = nullptr;
};

ncclDataType_t NcclType(DType t) {
  switch (t) {
    case DType::kF16: return ncclFloat16;
    case DType::kBF16: return ncclBfloat16;
    default: return ncclFloat32;
  }
}

// What every rank exchanges at creation; the fields after kMagic in this order.
constexpr int32_t kMagic = 0x6b76636d;  // "kvcm"
constexpr int kHeaderInts = 8;
constexpr const char* kHeaderNames[kHeaderInts] = {"magic",          "num_ranks", "rank",      "num_heads",
                                                    "head_size",      "max_num_tokens", "out_dtype",
                                                    "validate_each_call"};
constexpr const char* kShapeNames[4] = {"T", "H", "D", "dtype"};

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(const CommOptions& o, int32_t device_id) : Communicator(o), device_id_(device_id) {}
  ~NcclCommunicator() override {
    if (comm_) {
      DeviceScope scope(device_id_);
      Nccl().CommDestroy(comm_);
    }
  }

  absl::Status Init(const ExecContext& exec) {
    const NcclLibrary& nccl = Nccl();
    const CommOptions& o = options_;
    DeviceScope scope(device_id_);
    if (scope.status() != 0)
      return absl::UnavailableError(fmt::format("cudaSetDevice({}): {}", device_id_, kv::cuda::ErrorString(scope.status())));
    ncclUniqueId id;
    std::memcpy(id.internal, o.nccl_unique_id.data(), kNcclUniqueIdBytes);
    if (const ncclResult_t r = nccl.CommInitRank(&comm_, o.num_ranks, id, o.rank); r != ncclSuccess) {
      comm_ = nullptr;
      return absl::UnavailableError(
          nccl.Describe(fmt::format("ncclCommInitRank(num_ranks={}, rank={})", o.num_ranks, o.rank).c_str(), r, nullptr));
    }
    const int64_t rows = int64_t{o.num_ranks} * o.max_num_tokens * o.num_heads;
    if (auto s = scratch_out_.Allocate(rows * o.head_size * static_cast<int64_t>(DTypeSize(o.out_dtype)), device_id_,
                                       "the gathered outs");
        !s.ok())
      return s;
    if (auto s = scratch_lse_.Allocate(rows * 4, device_id_, "the gathered lses"); !s.ok()) return s;
    if (auto s = small_.Allocate(int64_t{kHeaderInts} * (o.num_ranks + 1) * 4, device_id_, "the option exchange");
        !s.ok())
      return s;
    const int32_t mine[kHeaderInts] = {kMagic,       o.num_ranks,    o.rank,
                                       o.num_heads,  o.head_size,    o.max_num_tokens,
                                       static_cast<int32_t>(o.out_dtype), o.validate_each_call ? 1 : 0};
    std::vector<int32_t> all;
    if (auto s = AllGatherInts(mine, kHeaderInts, exec.stream, &all); !s.ok()) return s;
    std::string diffs;
    std::vector<int32_t> bad;
    for (int32_t r = 0; r < o.num_ranks; ++r) {
      const int32_t* h = &all[static_cast<size_t>(r) * kHeaderInts];
      std::string d;
      for (int f = 0; f < kHeaderInts; ++f) {
        const int32_t want = f == 2 ? r : all[f];  // rank r must say rank=r; the rest as rank 0 says
        if (h[f] != want) d += fmt::format("{}{}={} (rank 0: {})", d.empty() ? "" : ", ", kHeaderNames[f], h[f], want);
      }
      if (d.empty()) continue;
      bad.push_back(r);
      diffs += fmt::format("; rank {}: {}", r, d);
    }
    if (!bad.empty())
      return absl::InvalidArgumentError(fmt::format("the ranks' communicator options differ: ranks [{}] differ from "
                                                    "rank 0{}",
                                                    fmt::join(bad, ", "), diffs));
    return absl::OkStatus();
  }

  absl::Status MergeAttention(int32_t rank, const TensorView& out, const TensorView& lse,
                              const ExecContext& exec) override {
    const CommOptions& o = options_;
    if (rank != o.rank)
      return absl::InvalidArgumentError(
          fmt::format("rank={} but this NCCL communicator is rank {} of {}", rank, o.rank, o.num_ranks));
    if (absl::Status s = CheckPartial(rank, out, lse); !s.ok()) return s;
    if (exec.device != Device::kCuda || exec.device_id != device_id_)
      return absl::InvalidArgumentError(fmt::format("the context's device (type={}, id={}) is not CUDA device {} the "
                                                    "communicator was created on",
                                                    static_cast<int>(exec.device), exec.device_id, device_id_));
    const NcclLibrary& nccl = Nccl();
    DeviceScope scope(device_id_);
    if (scope.status() != 0)
      return absl::UnavailableError(fmt::format("cudaSetDevice({}): {}", device_id_, kv::cuda::ErrorString(scope.status())));
    const int64_t S = o.num_ranks, T = out.shape[0], H = o.num_heads, D = o.head_size;
    if (o.validate_each_call) {
      const int32_t mine[4] = {static_cast<int32_t>(T), static_cast<int32_t>(out.shape[1]),
                               static_cast<int32_t>(out.shape[2]), static_cast<int32_t>(out.dtype)};
      std::vector<int32_t> all;
      if (auto s = AllGatherInts(mine, 4, exec.stream, &all); !s.ok()) return s;
      std::string diffs;
      std::vector<int64_t> bad;
      for (int64_t r = 0; r < S; ++r) {
        std::string d;
        for (int f = 0; f < 4; ++f)
          if (all[r * 4 + f] != all[f]) d += fmt::format("{}{}={} (rank 0: {})", d.empty() ? "" : ", ", kShapeNames[f],
                                                         all[r * 4 + f], all[f]);
        if (d.empty()) continue;
        bad.push_back(r);
        diffs += fmt::format("; rank {}: {}", r, d);
      }
      if (!bad.empty())
        return absl::InvalidArgumentError(
            fmt::format("the ranks' partials differ: ranks [{}] differ from rank 0{}", fmt::join(bad, ", "), diffs));
    }
    if (T == 0) return absl::OkStatus();
    if (const ncclResult_t r = nccl.AllGather(out.data, scratch_out_.data(), static_cast<size_t>(T * H * D),
                                              NcclType(o.out_dtype), comm_, exec.stream);
        r != ncclSuccess)
      return absl::UnavailableError(nccl.Describe("ncclAllGather(out)", r, comm_));
    if (const ncclResult_t r = nccl.AllGather(lse.data, scratch_lse_.data(), static_cast<size_t>(T * H), ncclFloat32,
                                              comm_, exec.stream);
        r != ncclSuccess)
      return absl::UnavailableError(nccl.Describe("ncclAllGather(lse)", r, comm_));
    TensorView po;
    po.data = scratch_out_.data();
    po.dtype = o.out_dtype;
    po.device = Device::kCuda;
    po.device_id = device_id_;
    po.ndim = 4;
    po.shape = {S, T, H, D, 0, 0};
    po.strides = {T * H * D, H * D, D, 1, 0, 0};
    TensorView pl = po;
    pl.data = scratch_lse_.data();
    pl.dtype = DType::kF32;
    pl.ndim = 3;
    pl.shape = {S, T, H, 0, 0, 0};
    pl.strides = {T * H, H, 1, 0, 0, 0};
    const MergeStatesArgs m{&po, &pl, nullptr, &out, &lse, nullptr};
    if (absl::Status s = ValidateMergeStates(m); !s.ok()) return s;
    // In stream order after the all-gathers, which have read out and lse: merging in place is safe.
    if (absl::Status s = MergeStatesCuda(m, exec.stream); !s.ok()) return absl::UnavailableError(s.message());
    return absl::OkStatus();
  }

 private:
  // All-gathers n int32 per rank into `all` ([num_ranks * n]) and synchronizes the stream.
  absl::Status AllGatherInts(const int32_t* mine, int n, void* stream, std::vector<int32_t>* all) {
    const NcclLibrary& nccl = Nccl();
    auto* send = static_cast<int32_t*>(small_.data());
    int32_t* recv = send + kHeaderInts;
    all->assign(static_cast<size_t>(options_.num_ranks) * n, 0);
    auto cuda_error = [](const char* what, int e) {
      return absl::UnavailableError(fmt::format("{}: {}", what, kv::cuda::ErrorString(e)));
    };
    if (const int e = kv::cuda::MemcpyAsync(send, mine, int64_t{n} * 4, stream); e != 0)
      return cuda_error("copying the exchange to the device", e);
    if (const ncclResult_t r = nccl.AllGather(send, recv, static_cast<size_t>(n), ncclInt32, comm_, stream);
        r != ncclSuccess)
      return absl::UnavailableError(nccl.Describe("ncclAllGather(options)", r, comm_));
    if (const int e = kv::cuda::MemcpyAsync(all->data(), recv, static_cast<int64_t>(all->size()) * 4, stream); e != 0)
      return cuda_error("copying the exchange to the host", e);
    if (const int e = kv::cuda::StreamSynchronize(stream); e != 0) return cuda_error("cudaStreamSynchronize", e);
    if (nccl.CommGetAsyncError) {
      ncclResult_t async = ncclSuccess;
      if (nccl.CommGetAsyncError(comm_, &async) == ncclSuccess && async != ncclSuccess)
        return absl::UnavailableError(nccl.Describe("the NCCL communicator", async, comm_));
    }
    return absl::OkStatus();
  }

  int32_t device_id_;
  ncclComm_t comm_ = nullptr;
  DeviceBuffer scratch_out_, scratch_lse_, small_;
};

#endif  // KVP_HAVE_CUDA

}  // namespace

absl::Status NcclGetUniqueId(uint8_t* out) {
  const NcclLibrary& nccl = Nccl();
  if (!nccl.ok()) return absl::UnimplementedError(nccl.error);
  ncclUniqueId id{};
  if (const ncclResult_t r = nccl.GetUniqueId(&id); r != ncclSuccess)
    return absl::UnavailableError(nccl.Describe("ncclGetUniqueId", r, nullptr));
  std::memcpy(out, id.internal, kNcclUniqueIdBytes);
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Communicator>> CreateNcclCommunicator(const CommOptions& options,
                                                                     const ExecContext& exec) {
  if (absl::Status s = ValidateCommOptions(options); !s.ok()) return s;
  if (options.kind != CommKind::kNccl) return absl::InvalidArgumentError("CreateNcclCommunicator: kind is not NCCL");
#ifdef KVP_HAVE_CUDA
  if (exec.device != Device::kCuda)
    return absl::UnimplementedError("an NCCL communicator needs a CUDA context; this context is on the CPU");
  if (const NcclLibrary& nccl = Nccl(); !nccl.ok()) return absl::UnimplementedError(nccl.error);
  auto comm = std::make_unique<NcclCommunicator>(options, exec.device_id);
  if (absl::Status s = comm->Init(exec); !s.ok()) return s;
  return std::unique_ptr<Communicator>(std::move(comm));
#else
  (void)exec;
  return absl::UnimplementedError("an NCCL communicator needs CUDA, and this library was built without CUDA");
#endif
}

}  // namespace kvplug::attn
