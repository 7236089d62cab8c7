// Key sets of one batch step (what each query token attends to), built by a backend's planner
// inside kvp_plan_update and read by the engines on every layer's run.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "kvplug/attention/batch_plan.h"
#include "kvplug/attention/variant.h"

namespace kvplug::attn {

// Upper bounds of a planner's output for a plan's capacity: buffers are sized once from them.
struct KeySetBounds {
  int64_t max_spans = 0;
  int64_t max_segments = 0;
  int64_t max_pos_map = 0;
  int32_t max_segments_per_span = 1;
};

// Preallocated host arrays; Clear + Add* never allocate past the bounds they were sized for.
class KeySets {
 public:
  explicit KeySets(const KeySetBounds& bounds);

  void Clear();
  // Returns false (adding nothing) when a bound would be exceeded: the planner reports it.
  bool AddSpan(const QuerySpan& span, absl::Span<const KeySegment> segments);
  // Reserves `n` position-map entries; returns their offset or -1.
  int32_t AddPositions(absl::Span<const int32_t> positions);

  const KeySetBounds& bounds() const { return bounds_; }
  absl::Span<const QuerySpan> spans() const { return {spans_.data(), num_spans_}; }
  absl::Span<const KeySegment> segments() const { return {segments_.data(), num_segments_}; }
  absl::Span<const int32_t> pos_map() const { return {pos_map_.data(), num_pos_map_}; }
  int32_t max_span_tokens() const { return max_span_tokens_; }

  // Checks every span and segment against the plan (tokens, pages, positions): planners are ours,
  // but a bad key set would read outside the cache, so it is checked once per step, not trusted.
  absl::Status Validate(const BatchPlan& plan) const;

 private:
  KeySetBounds bounds_;
  std::vector<QuerySpan> spans_;
  std::vector<KeySegment> segments_;
  std::vector<int32_t> pos_map_;
  size_t num_spans_ = 0, num_segments_ = 0, num_pos_map_ = 0;
  int32_t max_span_tokens_ = 0;
};

// A backend's step planner: turns a checked batch into key sets. Immutable and shared (a plan keeps
// it after the attention handle that made it is gone).
class KeySetPlanner {
 public:
  virtual ~KeySetPlanner() = default;
  // Planners with equal keys build equal key sets: a plan builds each key once per step.
  virtual std::string Key() const = 0;
  virtual KeySetBounds Bounds(const PlanCapacity& capacity) const = 0;
  virtual absl::Status Build(const BatchPlan& plan, KeySets* out) const = 0;
  // Optional per-token write slots the backend's write needs beside the plan's slot_mapping
  // (attamba: each chunk end's compressed row, -1 elsewhere). Built once per step with the key sets
  // and, on CUDA, uploaded with them (StepWork::write_slots / device_write_slots), so the write
  // only launches. `out` has plan.num_tokens() entries.
  virtual bool has_write_slots() const { return false; }
  virtual absl::Status BuildWriteSlots(const BatchPlan& /*plan*/, absl::Span<int64_t> /*out*/) const {
    return absl::OkStatus();
  }
};

// Exact causal attention over each sequence's whole page list, optionally windowed (dense and every
// backend that changes only transforms or outputs).
class CausalPlanner final : public KeySetPlanner {
 public:
  explicit CausalPlanner(int32_t window_left = -1) : window_left_(window_left) {}
  std::string Key() const override;
  KeySetBounds Bounds(const PlanCapacity& capacity) const override;
  absl::Status Build(const BatchPlan& plan, KeySets* out) const override;

 private:
  int32_t window_left_;
};

}  // namespace kvplug::attn
