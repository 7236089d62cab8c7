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
#include "kvplug/attention/cpu_engine.h"
#include "kvplug/attention/key_sets.h"
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

class StepWork;

struct RunArgs {
  const BatchPlan& plan;
  const StepWork& work;  // this backend's plan step for `plan` (key sets, engine work), current
  const kv::KvCache& cache;
  int32_t layer;
  const TensorView& query;  // [num_tokens, num_q_heads, head_size]
  AttentionOutputs outputs;  // out: same shape and dtype as query; lse, entropy: optional [T, Hq] f32
  const ExecContext& exec;
};

struct WriteArgs {
  const BatchPlan& plan;  // has_slot_mapping() is true
  kv::KvCache& cache;
  int32_t layer;
  const TensorView& key;    // [num_tokens, num_kv_heads, head_size]
  const TensorView& value;
  const ExecContext& exec;
  // This backend's plan step for `plan` when its planner has write slots (CUDA), else null.
  const StepWork* work = nullptr;
};

// Where a sequence's K/V rows live in its page list for a step over positions [p0, n) (see
// kvp_cache_layout). Token-stream backends: every position at row p (seq_len n); compressed ones
// (attamba) keep compressed rows first, then the window's token-stream pages.
struct CacheLayout {
  int32_t seq_len = 0;            // rows the page list covers: kvp_batch.seq_lens
  int32_t num_pages = 0;          // = compressed_pages + window_pages
  int32_t compressed_rows = 0;    // rows in use in the compressed pages (the most any layer needs)
  int32_t compressed_pages = 0;
  int32_t stable_rows = 0;        // compressed rows every layer has written for good (prefix-cacheable)
  int32_t window_first_page = 0;  // the first token-stream page the list holds
  int32_t window_pages = 0;
};

// A backend's sequence-state operator over this step's tokens (attamba: the chunk-local SSM that
// makes K or V). Tensors are float32 on the cache's device; optional ones may be null.
struct SsmArgs {
  const BatchPlan& plan;
  kv::KvCache& cache;
  int32_t layer;
  int32_t which;  // which of the backend's SSMs (attamba: 0 keys, 1 values)
  const TensorView& in;  // [num_tokens, in_dim]
  const TensorView* conv_weight;
  const TensorView* conv_bias;
  const TensorView* dt_bias;
  const TensorView* a_log;
  const TensorView* d_skip;
  const TensorView* norm_weight;
  const TensorView& out;  // [num_tokens, d_inner]
  const ExecContext& exec;
};

// A backend is a variant of the kernel family: a planner (which keys each query sees), a variant's
// parameters (transforms, accumulators) and optionally a write hook; the engines do the rest.
class AttentionBackend {
 public:
  virtual ~AttentionBackend() = default;
  // The step planner whose key sets Run reads (shared: plans keep it past this handle's life).
  virtual std::shared_ptr<const KeySetPlanner> planner() const = 0;
  // Writes this step's K/V into the cache. The default writes them unchanged at the slot mapping;
  // backends that transform K/V or carry state override it.
  virtual absl::Status WriteKv(const WriteArgs& args) const;
  virtual absl::Status Run(const RunArgs& args) const = 0;
  // Device scratch the backend's runs need in the context's shared workspace (CUDA split-KV).
  virtual int64_t workspace_bytes() const { return 0; }
  // Bytes of per-sequence state per layer the cache's state slots must hold (0: stateless).
  virtual int64_t state_bytes_per_layer() const { return 0; }
  // The page-list layout for a step over positions [query_pos_start, num_tokens).
  virtual CacheLayout Layout(int32_t block_size, int32_t num_tokens, int32_t query_pos_start) const;
  // The backend's sequence-state operator (Unimplemented unless it has one).
  virtual absl::Status RunSsm(const SsmArgs& args) const;
};

using BackendFactory = std::function<absl::StatusOr<std::unique_ptr<AttentionBackend>>(
    const HeadConfig&, const BackendConfig&, const ExecContext&)>;

// What a backend offers on one device.
struct DeviceCaps {
  uint32_t dtype_mask = 0;  // 1u << DType
  std::span<const int32_t> head_sizes;
};

struct BackendInfo {
  std::string_view name;
  DeviceCaps cpu;
  DeviceCaps cuda;           // dtype_mask 0: no CUDA implementation in this build
  bool supports_lse = false;
  bool supports_entropy = false;
  bool needs_state_slots = false;
  bool experimental = false;  // its config fields may still change
  BackendFactory create;

  const DeviceCaps* caps(Device device) const {
    if (device == Device::kCpu) return &cpu;
    if (device == Device::kCuda && cuda.dtype_mask != 0) return &cuda;
    return nullptr;
  }
  uint32_t device_mask() const;
  uint32_t dtype_mask() const { return cpu.dtype_mask | cuda.dtype_mask; }
};

// The built-in backends, in a fixed order (registered on first use, thread-safe).
std::span<const BackendInfo> Backends();
const BackendInfo* FindBackend(std::string_view name);
// The checks of a parsed config that need no head shapes (the registry routes it to its backend).
absl::Status ValidateParsedConfig(const BackendConfig& config);

}  // namespace kvplug::attn

namespace kvplug::attn {
// Checks what every backend needs of a run: the cache matches the heads, the plan's blocks and
// slots fit the cache, query/out/lse have the plan's shapes. Called once per run by the ABI.
absl::Status ValidateRun(const HeadConfig& heads, const RunArgs& args);
absl::Status ValidateWrite(const HeadConfig& heads, const WriteArgs& args);
}  // namespace kvplug::attn

namespace kvplug::attn {
// Checks head counts, head size, dtype and device against what `info` advertises for `device`.
absl::Status ValidateHeads(const BackendInfo& info, const HeadConfig& heads, Device device);
// ValidateHeads, then the backend's factory.
absl::StatusOr<std::unique_ptr<AttentionBackend>> CreateBackend(const BackendInfo& info, const HeadConfig& heads,
                                                                const BackendConfig& config, const ExecContext& exec);
}  // namespace kvplug::attn
