// The in-process communicator: every rank of one process contributes to one object; the
// contribution that completes a round gathers the partials into scratch sized at creation, merges
// them with merge_states and writes the merge into every rank's out and lse.
#include "kvplug/attention/communicator.h"

#include <cstring>
#include <limits>
#include <new>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "fmt/format.h"
#include "kvplug/attention/cpu_engine.h"
#include "kvplug/attention/engine.h"
#include "kvplug/kv_cache/alloc_hook.h"
#include "kvplug/kv_cache/cuda_kernels.h"

namespace kvplug::attn {
namespace {

constexpr int kCudaErrorMemoryAllocation = 2;  // cudaErrorMemoryAllocation

bool IsFloatDType(DType t) { return t == DType::kF32 || t == DType::kF16 || t == DType::kBF16; }

// Bytes of the gathered partials: [S, T, H, D] outs and [S, T, H] float32 lses.
std::pair<int64_t, int64_t> ScratchBytes(const CommOptions& o) {
  const int64_t rows = int64_t{o.num_ranks} * o.max_num_tokens * o.num_heads;
  return {rows * o.head_size * static_cast<int64_t>(DTypeSize(o.out_dtype)), rows * 4};
}

// [first byte, one past the last byte] of a view (non-empty).
std::pair<uintptr_t, uintptr_t> Extent(const TensorView& v) {
  int64_t last = 0;
  for (int i = 0; i < v.ndim; ++i) last += (v.shape[i] - 1) * v.strides[i];
  const auto begin = reinterpret_cast<uintptr_t>(v.data);
  return {begin, begin + static_cast<uintptr_t>((last + 1) * static_cast<int64_t>(DTypeSize(v.dtype)))};
}

bool Overlap(const TensorView& a, const TensorView& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const auto [a0, a1] = Extent(a);
  const auto [b0, b1] = Extent(b);
  return a0 < b1 && b0 < a1;
}

TensorView Compact(void* data, DType dtype, Device device, int32_t device_id,
                   std::initializer_list<int64_t> shape) {
  TensorView v;
  v.data = data;
  v.dtype = dtype;
  v.device = device;
  v.device_id = device_id;
  v.ndim = static_cast<int32_t>(shape.size());
  int i = 0;
  for (int64_t s : shape) v.shape[i++] = s;
  int64_t stride = 1;
  for (int d = v.ndim - 1; d >= 0; --d) {
    v.strides[d] = stride;
    stride *= v.shape[d];
  }
  return v;
}

// Scratch memory on the host or on a CUDA device, freed the way it was allocated.
class Scratch {
 public:
  Scratch() = default;
  ~Scratch() { Reset(); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

  absl::Status Allocate(int64_t bytes, const ExecContext& exec, const char* what) {
    Reset();
    if (bytes <= 0) return absl::OkStatus();
    if (ShouldFailAllocation())
      return absl::ResourceExhaustedError(fmt::format("communicator scratch for {} ({} bytes): allocation failed",
                                                      what, bytes));
    device_ = exec.device;
    if (exec.device == Device::kCuda) {
      if (const int e = kv::cuda::DeviceAlloc(&data_, bytes, exec.device_id); e != 0) {
        data_ = nullptr;
        const std::string msg = fmt::format("communicator scratch for {} ({} bytes on CUDA device {}): {}", what,
                                            bytes, exec.device_id, kv::cuda::ErrorString(e));
        return e == kCudaErrorMemoryAllocation ? absl::ResourceExhaustedError(msg) : absl::UnavailableError(msg);
      }
    } else {
      data_ = ::operator new(static_cast<size_t>(bytes), std::align_val_t{64}, std::nothrow);
      if (!data_)
        return absl::ResourceExhaustedError(
            fmt::format("communicator scratch for {} ({} bytes of host memory): allocation failed", what, bytes));
    }
    return absl::OkStatus();
  }
  void* data() const { return data_; }

 private:
  void Reset() {
    if (!data_) return;
    if (device_ == Device::kCuda) kv::cuda::DeviceFree(data_);
    else ::operator delete(data_, std::align_val_t{64}, std::nothrow);
    data_ = nullptr;
  }
  void* data_ = nullptr;
  Device device_ = Device::kCpu;
};

class InProcessCommunicator final : public Communicator {
 public:
  explicit InProcessCommunicator(const CommOptions& o)
      : Communicator(o), parts_(static_cast<size_t>(o.num_ranks)), contributed_(static_cast<size_t>(o.num_ranks), 0) {}

  absl::Status Init(const ExecContext& exec) {
    device_ = exec.device;
    device_id_ = exec.device_id;
    const auto [out_bytes, lse_bytes] = ScratchBytes(options_);
    if (absl::Status s = scratch_out_.Allocate(out_bytes, exec, "the gathered outs"); !s.ok()) return s;
    return scratch_lse_.Allocate(lse_bytes, exec, "the gathered lses");
  }

  absl::Status MergeAttention(int32_t rank, const TensorView& out, const TensorView& lse,
                              const ExecContext& exec) override {
    if (absl::Status s = CheckPartial(rank, out, lse); !s.ok()) return s;
    if (exec.device != device_ || (device_ == Device::kCuda && exec.device_id != device_id_))
      return absl::InvalidArgumentError(fmt::format(
          "rank {}: the context runs on device (type={}, id={}) but the communicator was created on (type={}, id={})",
          rank, static_cast<int>(exec.device), exec.device_id, static_cast<int>(device_), device_id_));
    absl::MutexLock lock(&mu_);
    if (contributed_[rank])
      return absl::FailedPreconditionError(fmt::format(
          "rank {} already contributed to the round in progress ({} of {} ranks contributed)", rank, count_,
          options_.num_ranks));
    const int64_t T = out.shape[0];
    if (count_ > 0) {
      if (T != round_tokens_)
        return absl::InvalidArgumentError(fmt::format(
            "rank {}: out has T={} tokens but rank {} opened the round with T={}", rank, T, first_rank_, round_tokens_));
      for (int32_t r = 0; r < options_.num_ranks; ++r) {
        if (!contributed_[r]) continue;
        const Part& p = parts_[r];
        for (const auto& [mine, my_name] : {std::pair{&out, "out"}, std::pair{&lse, "lse"}})
          for (const auto& [theirs, their_name] : {std::pair{&p.out, "out"}, std::pair{&p.lse, "lse"}})
            if (Overlap(*mine, *theirs))
              return absl::InvalidArgumentError(fmt::format(
                  "rank {}: {} overlaps rank {}'s {} (each rank needs its own tensors)", rank, my_name, r,
                  their_name));
      }
    } else {
      round_tokens_ = T;
      first_rank_ = rank;
    }
    parts_[rank] = Part{out, lse};
    contributed_[rank] = 1;
    if (++count_ < options_.num_ranks) return absl::OkStatus();
    absl::Status s = Complete(exec);
    // The round closes whether or not the merge succeeded (a failed merge leaves outputs undefined).
    std::fill(contributed_.begin(), contributed_.end(), 0);
    count_ = 0;
    return s;
  }

  int32_t NumContributed() const override {
    absl::MutexLock lock(&mu_);
    return count_;
  }

 private:
  struct Part {
    TensorView out, lse;
  };

  absl::Status Complete(const ExecContext& exec) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const int64_t S = options_.num_ranks, T = round_tokens_, H = options_.num_heads, D = options_.head_size;
    if (T == 0) return absl::OkStatus();
    const int64_t out_bytes = T * H * D * static_cast<int64_t>(DTypeSize(options_.out_dtype));
    const int64_t lse_bytes = T * H * 4;
    auto* so = static_cast<char*>(scratch_out_.data());
    auto* sl = static_cast<char*>(scratch_lse_.data());
    const bool cuda = device_ == Device::kCuda;
    auto copy = [&](void* dst, const void* src, int64_t bytes, const char* what, int32_t r) -> absl::Status {
      if (!cuda) {
        std::memcpy(dst, src, static_cast<size_t>(bytes));
        return absl::OkStatus();
      }
      if (const int e = kv::cuda::MemcpyAsync(dst, src, bytes, exec.stream); e != 0)
        return absl::UnavailableError(
            fmt::format("copying rank {}'s {} ({} bytes): {}", r, what, bytes, kv::cuda::ErrorString(e)));
      return absl::OkStatus();
    };
    // Gather: rank s's partial becomes slice s of [S, T, H, D] / [S, T, H].
    for (int32_t r = 0; r < S; ++r) {
      if (auto s = copy(so + r * out_bytes, parts_[r].out.data, out_bytes, "out", r); !s.ok()) return s;
      if (auto s = copy(sl + r * lse_bytes, parts_[r].lse.data, lse_bytes, "lse", r); !s.ok()) return s;
    }
    const TensorView po = Compact(so, options_.out_dtype, device_, device_id_, {S, T, H, D});
    const TensorView pl = Compact(sl, DType::kF32, device_, device_id_, {S, T, H});
    // Merge into rank 0's tensors, then copy the result to the others (the same bytes everywhere).
    const MergeStatesArgs m{&po, &pl, nullptr, &parts_[0].out, &parts_[0].lse, nullptr};
    if (absl::Status s = ValidateMergeStates(m); !s.ok()) return s;
    if (cuda) {
      if (absl::Status s = MergeStatesCuda(m, exec.stream); !s.ok()) return absl::UnavailableError(s.message());
    } else {
      if (!exec.pool) return absl::InvalidArgumentError("the CPU context has no thread pool");
      MergeStatesCpu(m, exec.pool);
    }
    for (int32_t r = 1; r < S; ++r) {
      if (auto s = copy(parts_[r].out.data, parts_[0].out.data, out_bytes, "merged out", r); !s.ok()) return s;
      if (auto s = copy(parts_[r].lse.data, parts_[0].lse.data, lse_bytes, "merged lse", r); !s.ok()) return s;
    }
    return absl::OkStatus();
  }

  Device device_ = Device::kCpu;
  int32_t device_id_ = 0;
  Scratch scratch_out_, scratch_lse_;

  mutable absl::Mutex mu_;
  std::vector<Part> parts_ ABSL_GUARDED_BY(mu_);
  std::vector<char> contributed_ ABSL_GUARDED_BY(mu_);
  int32_t count_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t round_tokens_ ABSL_GUARDED_BY(mu_) = 0;
  int32_t first_rank_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace

absl::Status ValidateCommOptions(const CommOptions& o) {
  if (o.kind != CommKind::kInProcess && o.kind != CommKind::kNccl)
    return absl::InvalidArgumentError(fmt::format("kind={} is not in-process (1) or NCCL (2)", static_cast<int>(o.kind)));
  if (o.num_ranks < 1 || o.num_ranks > kMaxCommRanks)
    return absl::InvalidArgumentError(fmt::format("num_ranks={} must be in [1, {}]", o.num_ranks, kMaxCommRanks));
  if (o.kind == CommKind::kInProcess && o.rank != 0)
    return absl::InvalidArgumentError(
        fmt::format("rank={} must be 0 for an in-process communicator (it serves every rank)", o.rank));
  if (o.kind == CommKind::kNccl && (o.rank < 0 || o.rank >= o.num_ranks))
    return absl::InvalidArgumentError(fmt::format("rank={} must be in [0, num_ranks={})", o.rank, o.num_ranks));
  if (o.max_num_tokens < 1 || o.max_num_tokens > (1 << 30))
    return absl::InvalidArgumentError(fmt::format("max_num_tokens={} must be in [1, 2^30]", o.max_num_tokens));
  if (o.num_heads < 1 || o.num_heads > 65535)
    return absl::InvalidArgumentError(fmt::format("num_heads={} must be in [1, 65535]", o.num_heads));
  if (o.head_size < 1 || o.head_size > 4096)
    return absl::InvalidArgumentError(fmt::format("head_size={} must be in [1, 4096]", o.head_size));
  if (!IsFloatDType(o.out_dtype))
    return absl::InvalidArgumentError(fmt::format("out_dtype={} ({}) must be float32 (0), float16 (1) or bfloat16 (2)",
                                                  static_cast<int>(o.out_dtype), DTypeName(o.out_dtype)));
  const __int128 bytes = static_cast<__int128>(o.num_ranks) * o.max_num_tokens * o.num_heads * o.head_size *
                         static_cast<int64_t>(DTypeSize(o.out_dtype));
  if (bytes > (__int128{1} << 50))
    return absl::InvalidArgumentError(fmt::format(
        "num_ranks={} x max_num_tokens={} x num_heads={} x head_size={} needs more than 2^50 bytes of scratch",
        o.num_ranks, o.max_num_tokens, o.num_heads, o.head_size));
  return absl::OkStatus();
}

absl::Status Communicator::CheckPartial(int32_t rank, const TensorView& out, const TensorView& lse) const {
  const CommOptions& o = options_;
  if (rank < 0 || rank >= o.num_ranks)
    return absl::InvalidArgumentError(fmt::format("rank={} must be in [0, num_ranks={})", rank, o.num_ranks));
  if (out.ndim != 3 || lse.ndim != 2)
    return absl::InvalidArgumentError(
        fmt::format("rank {}: out must be [T, H, D] and lse [T, H]; got ndim {} and {}", rank, out.ndim, lse.ndim));
  if (out.dtype != o.out_dtype)
    return absl::InvalidArgumentError(fmt::format("rank {}: out dtype {} is not the communicator's out_dtype {}", rank,
                                                  DTypeName(out.dtype), DTypeName(o.out_dtype)));
  if (lse.dtype != DType::kF32)
    return absl::InvalidArgumentError(fmt::format("rank {}: lse dtype {} must be float32", rank, DTypeName(lse.dtype)));
  const int64_t T = out.shape[0];
  if (out.shape[1] != o.num_heads || out.shape[2] != o.head_size)
    return absl::InvalidArgumentError(fmt::format(
        "rank {}: out shape [{}, {}, {}] but the communicator has num_heads={} and head_size={}", rank, out.shape[0],
        out.shape[1], out.shape[2], o.num_heads, o.head_size));
  if (T > o.max_num_tokens)
    return absl::InvalidArgumentError(
        fmt::format("rank {}: out has T={} tokens, more than max_num_tokens={}", rank, T, o.max_num_tokens));
  if (lse.shape[0] != T || lse.shape[1] != o.num_heads)
    return absl::InvalidArgumentError(fmt::format("rank {}: lse shape [{}, {}] is not [T={}, H={}]", rank,
                                                  lse.shape[0], lse.shape[1], T, o.num_heads));
  for (const auto& [v, name] : {std::pair{&out, "out"}, std::pair{&lse, "lse"}}) {
    int64_t stride = 1;
    for (int d = v->ndim - 1; d >= 0; --d) {
      if (v->shape[d] > 1 && v->strides[d] != stride)
        return absl::InvalidArgumentError(fmt::format("rank {}: {} is not contiguous (strides[{}]={}, expected {})",
                                                      rank, name, d, v->strides[d], stride));
      stride *= v->shape[d];
    }
  }
  if (Overlap(out, lse))
    return absl::InvalidArgumentError(fmt::format("rank {}: out and lse overlap", rank));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Communicator>> CreateInProcessCommunicator(const CommOptions& options,
                                                                          const ExecContext& exec) {
  if (absl::Status s = ValidateCommOptions(options); !s.ok()) return s;
  if (options.kind != CommKind::kInProcess)
    return absl::InvalidArgumentError("CreateInProcessCommunicator: kind is not in-process");
  auto comm = std::make_unique<InProcessCommunicator>(options);
  if (absl::Status s = comm->Init(exec); !s.ok()) return s;
  return std::unique_ptr<Communicator>(std::move(comm));
}

}  // namespace kvplug::attn
