#include "kvplug/attention/engine.h"

#include "kvplug/attention/step_work.h"
#include "kvplug/attention/telemetry.h"
#include "kvplug/kv_cache/cuda_kernels.h"
#include "fmt/format.h"

#include <array>

#include "kvplug/attention/kv_write.h"
#include "kvplug/attention/step_work.h"  // the CUDA step-work hooks stubbed below

namespace kvplug::attn {
namespace {
constexpr std::array<int32_t, 9> kCpuHeadSizes = {32, 64, 80, 96, 112, 128, 160, 192, 256};
constexpr std::array<int32_t, 3> kCudaHeadSizes = {64, 128, 256};
constexpr uint32_t Bit(DType t) { return 1u << static_cast<int>(t); }
}  // namespace

DeviceCaps CpuEngineCaps() {
  return {Bit(DType::kF32) | Bit(DType::kF16) | Bit(DType::kBF16), kCpuHeadSizes};
}

DeviceCaps CudaEngineCaps() {
#ifdef KVP_HAVE_CUDA
  return {Bit(DType::kF16) | Bit(DType::kBF16) | Bit(DType::kFP8E4M3), kCudaHeadSizes};
#else
  return {0, kCudaHeadSizes};
#endif
}

namespace {
absl::Status RunEngine(const RunArgs& a, const HeadConfig& heads, const VariantParams& variant) {
  if (a.exec.device == Device::kCuda) return RunCudaEngine(a, heads, variant);
  CpuAttentionArgs cpu{a.plan, a.work.keys, a.cache.layer(a.layer), a.query, a.outputs, variant,
                       heads.num_q_heads, heads.num_kv_heads, a.exec.pool};
  RunPagedAttentionCpu(cpu);
  return absl::OkStatus();
}
}  // namespace

absl::Status RunVariant(const RunArgs& a, const HeadConfig& heads, const VariantParams& variant) {
  const TensorView* summary = a.outputs.entropy_summary;
  if (!summary) return RunEngine(a, heads, variant);
  // The summary reduces the per-row entropies: the caller's, or the step's scratch.
  AttentionOutputs outputs = a.outputs;
  TensorView scratch;
  if (!outputs.entropy) {
    scratch.data = a.work.entropy_scratch;
    scratch.dtype = DType::kF32;
    scratch.device = a.exec.device;
    scratch.ndim = 2;
    scratch.shape = {a.plan.num_tokens(), heads.num_q_heads};
    scratch.strides = {heads.num_q_heads, 1};
    outputs.entropy = &scratch;
  }
  const RunArgs with_entropy{a.plan, a.work, a.cache, a.layer, a.query, outputs, a.exec};
  if (absl::Status s = RunEngine(with_entropy, heads, variant); !s.ok()) return s;
  if (a.exec.device == Device::kCuda)
    return EntropySummaryCuda(*outputs.entropy, a.work.device_row_keys, *summary, a.exec.stream);
  EntropySummaryCpu(*outputs.entropy, a.work.row_keys.data(), *summary);
  return absl::OkStatus();
}

#ifndef KVP_HAVE_CUDA
CudaPrefillCounts GetCudaPrefillCounts() { return {}; }
bool CudaEngineHasFlashInfer() { return false; }
bool CudaEngineHasFlashInfer(DType, int32_t) { return false; }
absl::Status RunCudaEngine(const RunArgs&, const HeadConfig&, const VariantParams&) {
  return absl::UnimplementedError("this library was built without CUDA");
}
absl::Status CheckCudaEngineSupport(const HeadConfig&) {
  return absl::UnimplementedError("this library was built without CUDA");
}
int64_t CudaEngineWorkspaceBytes(const HeadConfig&) { return 0; }
absl::Status WritePagedKvMixCuda(const WriteArgs&, const PrevTokenMix&) {
  return absl::UnimplementedError("this library was built without CUDA");
}
absl::Status MergeStatesCuda(const MergeStatesArgs&, void*) {
  return absl::UnimplementedError("this library was built without CUDA");
}
absl::StatusOr<std::unique_ptr<EngineWork>> CreateCudaEngineWork(const KeySetBounds&, const HeadConfig&,
                                                                  const PlanCapacity&, const ExecContext&) {
  return absl::UnimplementedError("this library was built without CUDA");
}
absl::Status PlanCudaEngineWork(const BatchPlan&, const KeySets&, const HeadConfig&, const ExecContext&,
                                EngineWork*) {
  return absl::UnimplementedError("this library was built without CUDA");
}
#endif


BackendInfo FamilyBackendInfo(std::string_view name) {
  BackendInfo info;
  info.name = name;
  info.cpu = CpuEngineCaps();
  info.cuda = CudaEngineCaps();
  info.supports_lse = true;
  info.supports_entropy = true;
  return info;
}

DeviceCopy::~DeviceCopy() { kv::cuda::DeviceFree(data_); }

absl::Status DeviceCopy::Upload(const void* host, int64_t bytes, const ExecContext& exec, std::string_view what) {
  if (const int e = kv::cuda::DeviceAlloc(&data_, bytes, exec.device_id); e != 0)
    return absl::ResourceExhaustedError(fmt::format("{}: allocating {} device bytes failed: {}", what, bytes,
                                                    kv::cuda::ErrorString(e)));
  if (const int e = kv::cuda::MemcpyAsync(data_, host, bytes, exec.stream); e != 0)
    return absl::UnavailableError(fmt::format("{}: uploading failed: {}", what, kv::cuda::ErrorString(e)));
  // The host array need not outlive the call: wait for the copy, once, at creation.
  if (const int e = kv::cuda::StreamSynchronize(exec.stream); e != 0)
    return absl::UnavailableError(fmt::format("{}: uploading failed: {}", what, kv::cuda::ErrorString(e)));
  return absl::OkStatus();
}

}  // namespace kvplug::attn
