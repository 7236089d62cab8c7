// The engines beneath the variants: one per device. A backend hands its variant parameters to
// RunVariant; which engine runs, and how (tiles, splits, merges), is decided here and below.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvplug/attention/backend.h"
#include "kvplug/attention/variant.h"

namespace kvplug::attn {

// Runs `variant` over the run's step work on the engine of the run's device.
absl::Status RunVariant(const RunArgs& args, const HeadConfig& heads, const VariantParams& variant);

// What each engine supports (backends advertise these unless they narrow them).
DeviceCaps CpuEngineCaps();
DeviceCaps CudaEngineCaps();  // dtype_mask 0 in builds without CUDA

// CUDA: checks the heads and variant features the kernels are compiled for; device scratch the
// engine wants for split-KV partials of these heads.
absl::Status CheckCudaEngineSupport(const HeadConfig& heads);
int64_t CudaEngineWorkspaceBytes(const HeadConfig& heads);

// merge_states on the GPU (launched on `stream`); arguments checked by ValidateMergeStates.
absl::Status MergeStatesCuda(const MergeStatesArgs& args, void* stream);

// Implemented by the CUDA engine (engine_cuda.cc).
absl::Status RunCudaEngine(const RunArgs& args, const HeadConfig& heads, const VariantParams& variant);

// The CUDA engine's prefill paths. Where the build has FlashInfer (KVP_WITH_FLASHINFER) and the
// device is sm_90, prefill spans that are plain causal attention over one contiguous key run
// ending at the last query (dense, chunked prefill) run on FlashInfer's sm_90 FA3 paged prefill
// when the run's variant is plain scaled attention; everything else runs on kvplug's own kernels.
// KVP_CUDA_PREFILL=kvplug turns FlashInfer off, =flashinfer makes planning fail where it is
// unavailable (read at every plan update). Process-wide launch counts of each prefill path, for
// tests and benchmarks.
struct CudaPrefillCounts {
  int64_t flashinfer_launches = 0;
  int64_t kvplug_launches = 0;
};
CudaPrefillCounts GetCudaPrefillCounts();
bool CudaEngineHasFlashInfer();
// Whether the build carries FlashInfer's prefill for this query/cache dtype and head size
// (KVP_FLASHINFER_DTYPES x KVP_FLASHINFER_HEAD_SIZES).
bool CudaEngineHasFlashInfer(DType dtype, int32_t head_size);


// A backend's registry entry on the family's engines (their dtypes and head sizes on each device,
// lse and entropy outputs); the backend adds its factory and flags.
BackendInfo FamilyBackendInfo(std::string_view name);

// The backend's own config type out of `config` (a default one for "no config"), or an error
// naming the backend.
template <class Config>
absl::StatusOr<Config> ConfigOrDefault(const BackendConfig& config, std::string_view backend,
                                       std::string_view type_name) {
  if (const auto* c = std::get_if<Config>(&config)) return *c;
  if (std::holds_alternative<std::monostate>(config)) return Config{};
  std::string message(backend);
  message.append(": the config's type is not ").append(type_name);
  return absl::InvalidArgumentError(message);
}

// The common body of a backend: its planner and variant parameters over the engine of its device.
// Subclasses choose the planner, and override Variant() where the logits differ from plain scaled
// attention (and WriteKv / state_bytes_per_layer where they keep state).
class VariantBackend : public AttentionBackend {
 public:
  VariantBackend(const HeadConfig& heads, Device device, std::shared_ptr<const KeySetPlanner> planner)
      : heads_(heads), device_(device), planner_(std::move(planner)) {}
  std::shared_ptr<const KeySetPlanner> planner() const final { return planner_; }
  absl::Status Run(const RunArgs& args) const final { return RunVariant(args, heads_, Variant()); }
  int64_t workspace_bytes() const final {
    return device_ == Device::kCuda ? CudaEngineWorkspaceBytes(heads_) : 0;
  }

 protected:
  virtual VariantParams Variant() const {
    VariantParams v;
    v.sm_scale = heads_.sm_scale;
    return v;
  }
  const HeadConfig& heads() const { return heads_; }
  Device device() const { return device_; }

 private:
  HeadConfig heads_;
  Device device_;
  std::shared_ptr<const KeySetPlanner> planner_;
};

// A small host array a variant reads on the device (a scale table, mix coefficients), copied once
// at creation (the copy synchronizes the stream, once) and freed with its owner.
class DeviceCopy {
 public:
  DeviceCopy() = default;
  ~DeviceCopy();
  DeviceCopy(const DeviceCopy&) = delete;
  DeviceCopy& operator=(const DeviceCopy&) = delete;
  // `what` names the array in errors.
  absl::Status Upload(const void* host, int64_t bytes, const ExecContext& exec, std::string_view what);
  const void* get() const { return data_; }

 private:
  void* data_ = nullptr;
};

}  // namespace kvplug::attn
