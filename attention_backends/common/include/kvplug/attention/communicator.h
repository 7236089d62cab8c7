// Communicators: merge the partial attention states (out, lse) that several shards computed for the
// same queries over disjoint key sets, so that every rank ends with the attention over all keys
// (Star Attention's phase 2). The merge is merge_states' (cpu_engine.h): lse = max + log sum
// exp(lse_i - max), out = sum_i exp(lse_i - lse) out_i; a partial with lse = -inf weighs 0.
//
//  - In-process: one object for all ranks of one process (one ExecContext device). Each rank
//    contributes its partial; the contribution that completes the round gathers the partials into
//    scratch allocated once at creation, merges them and writes the result into every rank's
//    out and lse. Thread-safe.
//  - NCCL: one object per rank. libnccl.so.2 is loaded with dlopen on first use (no NCCL header or
//    library at build time). Each merge all-gathers the partials on the context's stream into
//    scratch allocated at creation and merges them there with MergeStatesCuda. Not thread-safe.
//
// Statuses: InvalidArgument (options, shapes, dtypes, ranks), FailedPrecondition (a rank that
// already contributed to the open round), ResourceExhausted (scratch allocation), Unimplemented
// (no NCCL library, a build without CUDA, NCCL on a CPU context), Unavailable (a CUDA or NCCL call
// failed: the ABI reports it as KVP_ERR_DEVICE).
#pragma once

#include <array>
#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvplug/attention/backend.h"
#include "kvplug/kv_cache/tensor_view.h"

namespace kvplug::attn {

enum class CommKind : int32_t { kInProcess = 1, kNccl = 2 };

inline constexpr int32_t kMaxCommRanks = 1024;
inline constexpr size_t kNcclUniqueIdBytes = 128;

struct CommOptions {
  CommKind kind = CommKind::kInProcess;
  int32_t num_ranks = 1;
  int32_t rank = 0;  // NCCL: this object's rank; in-process: 0
  std::array<uint8_t, kNcclUniqueIdBytes> nccl_unique_id{};
  int32_t max_num_tokens = 0;  // rows of one merge; the scratch is sized from these once
  int32_t num_heads = 0;
  int32_t head_size = 0;
  DType out_dtype = DType::kF32;  // float32, float16 or bfloat16
  bool validate_each_call = false;  // NCCL: all-gather and check (T, H, D, dtype) before each merge
};

// Ranges of the options (the same for both kinds; the rank rule depends on the kind).
absl::Status ValidateCommOptions(const CommOptions& options);

class Communicator {
 public:
  virtual ~Communicator() = default;
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  const CommOptions& options() const { return options_; }

  // Contributes `rank`'s partial: out [T, H, D] in the options' dtype and lse [T, H] float32, both
  // compact row-major on `exec`'s device, T <= max_num_tokens, H = num_heads, D = head_size. On
  // return from the call that completes the round (in-process) or from every call (NCCL; in stream
  // order on the device), out and lse hold the merge over all ranks.
  virtual absl::Status MergeAttention(int32_t rank, const TensorView& out, const TensorView& lse,
                                      const ExecContext& exec) = 0;

  // In-process: the ranks that contributed to the open round (0 when none is open). NCCL: 0.
  virtual int32_t NumContributed() const { return 0; }

 protected:
  explicit Communicator(const CommOptions& options) : options_(options) {}
  // Checks out/lse against the options (dtype, H, D, T <= max_num_tokens, compact strides).
  absl::Status CheckPartial(int32_t rank, const TensorView& out, const TensorView& lse) const;

  CommOptions options_;
};

// Scratch on `exec`'s device (host memory for the CPU, device memory for CUDA).
absl::StatusOr<std::unique_ptr<Communicator>> CreateInProcessCommunicator(const CommOptions& options,
                                                                          const ExecContext& exec);

// Collective over all ranks: initializes NCCL's communicator on `exec`'s device, then all-gathers
// every rank's options and checks that they agree (one stream synchronization). Unimplemented in a
// build without CUDA, on a CPU context, or when libnccl.so.2 cannot be loaded.
absl::StatusOr<std::unique_ptr<Communicator>> CreateNcclCommunicator(const CommOptions& options,
                                                                     const ExecContext& exec);

// ncclGetUniqueId into `out` (kNcclUniqueIdBytes bytes). Unimplemented when libnccl.so.2 cannot be
// loaded (the message says why); Unavailable when NCCL fails.
absl::Status NcclGetUniqueId(uint8_t* out);

}  // namespace kvplug::attn
