// The per-backend part of a batch step's plan. kvp_plan_update runs every attached backend's
// planner once (backends with equal planners and head shapes share one result), checks the key sets
// and, on CUDA, lets the engine turn them into work items and upload them; runs then only launch.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "kvplug/attention/backend.h"
#include "kvplug/attention/batch_plan.h"
#include "kvplug/attention/key_sets.h"

namespace kvplug::attn {

// An engine's device-side work for one step (CUDA: tiles, splits, merge lists); opaque here.
class EngineWork {
 public:
  virtual ~EngineWork() = default;
};

class StepWork {
 public:
  StepWork(std::shared_ptr<const KeySetPlanner> planner, const KeySetBounds& bounds, const HeadConfig& heads)
      : planner(std::move(planner)), keys(bounds), heads(heads) {}
  ~StepWork();
  StepWork(const StepWork&) = delete;
  StepWork& operator=(const StepWork&) = delete;
  // Telemetry buffers (sized once for the plan's capacity): the keys each token sees (host, and a
  // device mirror on CUDA) and a [max_num_tokens, num_q_heads] float32 entropy scratch for runs
  // that ask for the entropy summary without the per-row entropy.
  absl::Status AllocateTelemetry(const PlanCapacity& capacity, const ExecContext& exec);

  std::shared_ptr<const KeySetPlanner> planner;
  KeySets keys;
  HeadConfig heads;
  std::unique_ptr<EngineWork> engine;  // null on the CPU
  uint64_t generation = 0;             // the plan generation these results belong to (0: none)
  std::vector<int32_t> row_keys;       // [max_num_tokens]
  int32_t* device_row_keys = nullptr;  // CUDA mirror, or null
  float* entropy_scratch = nullptr;    // host (CPU) or device (CUDA) memory
  bool scratch_on_device = false;
  // The planner's extra write slots (KeySetPlanner::has_write_slots; CUDA only): host
  // [max_num_tokens] and its device mirror, filled for the plan's tokens by every build.
  std::vector<int64_t> write_slots;
  int64_t* device_write_slots = nullptr;
};

// Backends with equal keys share a step's work: the planner's key and the head shape (the engine's
// work depends on the GQA group and the head size).
std::string StepKey(const AttentionBackend& backend, const HeadConfig& heads);

// The step works of one plan, keyed by planner key and head shape.
class StepWorkSet {
 public:
  // Creates (allocating, once) the step work `backend` needs on `plan`, and builds it now if the
  // plan holds a batch. Idempotent.
  // `key` is StepKey(backend, heads), computed once per attention handle (lookups never allocate).
  absl::Status Attach(absl::string_view key, const AttentionBackend& backend, const HeadConfig& heads,
                      const BatchPlan& plan, const ExecContext& exec);
  // Rebuilds every attached step for the plan's current batch (called by kvp_plan_update).
  absl::Status UpdateAll(const BatchPlan& plan, const ExecContext& exec);
  // The current step work for a run; attaches (allocating) and builds when the backend was not
  // attached before the plan's last update.
  absl::StatusOr<const StepWork*> Get(absl::string_view key, const AttentionBackend& backend,
                                      const HeadConfig& heads, const BatchPlan& plan, const ExecContext& exec);
  void Clear();

 private:
  absl::Status Build(StepWork* work, const BatchPlan& plan, const ExecContext& exec);
  absl::Mutex mutex_;
  absl::flat_hash_map<std::string, std::unique_ptr<StepWork>> works_ ABSL_GUARDED_BY(mutex_);
};

// Engine hooks for the step work (implemented by the CUDA engine; absent in CPU-only builds).
absl::StatusOr<std::unique_ptr<EngineWork>> CreateCudaEngineWork(const KeySetBounds& bounds, const HeadConfig& heads,
                                                                  const PlanCapacity& capacity,
                                                                  const ExecContext& exec);
absl::Status PlanCudaEngineWork(const BatchPlan& plan, const KeySets& keys, const HeadConfig& heads,
                                const ExecContext& exec, EngineWork* work);

}  // namespace kvplug::attn
