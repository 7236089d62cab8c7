// The interface every attention backend implements, and the registry that finds them by name.
// Backends see plain C++ types only: the ABI has already checked and translated the caller's input.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvplug/attention/batch_plan.h"
#include "kvplug/attention/configs.h"
#include "kvplug/attention/thread_pool.h"
#include "kvplug/kv_cache/kv_cache.h"
#include "kvplug/kv_cache/tensor_view.h"

namespace kvplug::attn {

struct HeadConfig {
  int32_t num_q_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_size = 0;
  DType kv_dtype = DType::kF32;
  float sm_scale = 0.0f;  // already resolved: never 0 here
};

// Where a call runs: the CPU pool, or a CUDA stream on a device.
struct ExecContext {
  Device device = Device::kCpu;
  int32_t device_id = 0;
  ThreadPool* pool = nullptr;
  void* stream = nullptr;
  // CUDA: device scratch for split-KV partial results (sized when backends are created) and the
  // device's multiprocessor count (to size work partitions).
  void* workspace = nullptr;
  int64_t workspace_bytes = 0;
  int32_t num_sms = 0;
};

struct RunArgs {
  const BatchPlan& plan;
  const kv::KvCache& cache;
  int32_t layer;
  const TensorView& query;  // [num_tokens, num_q_heads, head_size]
  const TensorView& out;    // same shape and dtype as query
  const TensorView* lse;    // optional [num_tokens, num_q_heads] float32
  const ExecContext& exec;
};

struct WriteArgs {
  const BatchPlan& plan;  // has_slot_mapping() is true
  kv::KvCache& cache;
  int32_t layer;
  const TensorView& key;    // [num_tokens, num_kv_heads, head_size]
  const TensorView& value;
  const ExecContext& exec;
};

class AttentionBackend {
 public:
  virtual ~AttentionBackend() = default;
  // Writes this step's K/V into the cache. The default writes them unchanged at the slot mapping;
  // backends that transform K/V or carry state override it.
  virtual absl::Status WriteKv(const WriteArgs& args) const;
  virtual absl::Status Run(const RunArgs& args) const = 0;
};

using BackendFactory = std::function<absl::StatusOr<std::unique_ptr<AttentionBackend>>(
    const HeadConfig&, const BackendConfig&, Device)>;

struct BackendInfo {
  std::string_view name;
  uint32_t dtype_mask = 0;   // 1u << DType
  uint32_t device_mask = 0;  // 1u << Device
  std::span<const int32_t> head_sizes;
  bool supports_lse = false;
  bool needs_state_slots = false;
  BackendFactory create;
};

// The built-in backends, in a fixed order (registered on first use, thread-safe).
std::span<const BackendInfo> Backends();
const BackendInfo* FindBackend(std::string_view name);

}  // namespace kvplug::attn

namespace kvplug::attn {
// Checks what every backend needs of a run: the cache matches the heads, the plan's blocks and
// slots fit the cache, query/out/lse have the plan's shapes. Called once per run by the ABI.
absl::Status ValidateRun(const HeadConfig& heads, const RunArgs& args);
absl::Status ValidateWrite(const HeadConfig& heads, const WriteArgs& args);
}  // namespace kvplug::attn

namespace kvplug::attn {
// Checks head counts, head size, dtype and device against what `info` advertises.
absl::Status ValidateHeads(const BackendInfo& info, const HeadConfig& heads, Device device);
}  // namespace kvplug::attn
