#include "kvplug/attention/step_work.h"

#include "fmt/format.h"
#include "kvplug/attention/telemetry.h"
#include "kvplug/kv_cache/cuda_kernels.h"

namespace kvplug::attn {

std::string StepKey(const AttentionBackend& backend, const HeadConfig& heads) {
  return fmt::format("{}|q{}|kv{}|d{}", backend.planner()->Key(), heads.num_q_heads, heads.num_kv_heads,
                     heads.head_size);
}

StepWork::~StepWork() {
  if (scratch_on_device) {
    kv::cuda::DeviceFree(device_row_keys);
    kv::cuda::DeviceFree(entropy_scratch);
    kv::cuda::DeviceFree(device_write_slots);
  } else {
    delete[] entropy_scratch;
  }
}

absl::Status StepWork::AllocateTelemetry(const PlanCapacity& c, const ExecContext& exec) {
  row_keys.assign(size_t(c.max_num_tokens), 0);
  const int64_t scratch = int64_t{c.max_num_tokens} * heads.num_q_heads;
  if (exec.device != Device::kCuda) {
    entropy_scratch = new float[size_t(scratch)];
    return absl::OkStatus();
  }
  scratch_on_device = true;
  void* keys = nullptr;
  void* ent = nullptr;
  if (const int e = kv::cuda::DeviceAlloc(&keys, int64_t{c.max_num_tokens} * 4, exec.device_id); e != 0)
    return absl::ResourceExhaustedError(fmt::format("telemetry buffers: {}", kv::cuda::ErrorString(e)));
  device_row_keys = static_cast<int32_t*>(keys);
  if (const int e = kv::cuda::DeviceAlloc(&ent, scratch * 4, exec.device_id); e != 0)
    return absl::ResourceExhaustedError(fmt::format("entropy scratch of {} bytes: {}", scratch * 4,
                                                    kv::cuda::ErrorString(e)));
  entropy_scratch = static_cast<float*>(ent);
  if (planner->has_write_slots()) {
    void* slots = nullptr;
    write_slots.assign(size_t(c.max_num_tokens), -1);
    if (const int e = kv::cuda::DeviceAlloc(&slots, int64_t{c.max_num_tokens} * 8, exec.device_id); e != 0)
      return absl::ResourceExhaustedError(fmt::format("write slots: {}", kv::cuda::ErrorString(e)));
    device_write_slots = static_cast<int64_t*>(slots);
  }
  return absl::OkStatus();
}

absl::Status StepWorkSet::Build(StepWork* work, const BatchPlan& plan, const ExecContext& exec) {
  work->generation = 0;
  if (plan.empty()) return absl::OkStatus();
  if (absl::Status s = work->planner->Build(plan, &work->keys); !s.ok()) return s;
  if (absl::Status s = work->keys.Validate(plan); !s.ok()) return s;
  // Keys per token, for the entropy telemetry's E_max (once per step, not per layer).
  CountVisibleKeys(work->keys, absl::MakeSpan(work->row_keys).first(size_t(plan.num_tokens())));
  if (work->device_row_keys && plan.num_tokens() > 0)
    if (const int e = kv::cuda::MemcpyAsync(work->device_row_keys, work->row_keys.data(),
                                            int64_t{plan.num_tokens()} * 4, exec.stream); e != 0)
      return absl::UnavailableError(fmt::format("uploading the keys per token: {}", kv::cuda::ErrorString(e)));
  if (work->device_write_slots && plan.num_tokens() > 0) {
    const auto slots = absl::MakeSpan(work->write_slots).first(size_t(plan.num_tokens()));
    if (absl::Status s = work->planner->BuildWriteSlots(plan, slots); !s.ok()) return s;
    if (const int e = kv::cuda::MemcpyAsync(work->device_write_slots, slots.data(), int64_t{plan.num_tokens()} * 8,
                                            exec.stream); e != 0)
      return absl::UnavailableError(fmt::format("uploading the write slots: {}", kv::cuda::ErrorString(e)));
  }
  if (work->engine) {
    if (absl::Status s = PlanCudaEngineWork(plan, work->keys, work->heads, exec, work->engine.get()); !s.ok())
      return s;
  }
  work->generation = plan.generation();
  return absl::OkStatus();
}

absl::Status StepWorkSet::Attach(absl::string_view key, const AttentionBackend& backend, const HeadConfig& heads,
                                 const BatchPlan& plan, const ExecContext& exec) {
  absl::MutexLock lock(&mutex_);
  if (works_.contains(key)) return absl::OkStatus();
  auto planner = backend.planner();
  const KeySetBounds bounds = planner->Bounds(plan.capacity());
  auto work = std::make_unique<StepWork>(planner, bounds, heads);
  if (absl::Status s = work->AllocateTelemetry(plan.capacity(), exec); !s.ok()) return s;
  if (exec.device == Device::kCuda) {
    auto engine = CreateCudaEngineWork(bounds, heads, plan.capacity(), exec);
    if (!engine.ok()) return engine.status();
    work->engine = std::move(*engine);
  }
  if (absl::Status s = Build(work.get(), plan, exec); !s.ok()) return s;
  works_.emplace(std::string(key.data(), key.size()), std::move(work));
  return absl::OkStatus();
}

absl::Status StepWorkSet::UpdateAll(const BatchPlan& plan, const ExecContext& exec) {
  absl::MutexLock lock(&mutex_);
  for (auto& [key, work] : works_)
    if (absl::Status s = Build(work.get(), plan, exec); !s.ok()) return s;
  return absl::OkStatus();
}

absl::StatusOr<const StepWork*> StepWorkSet::Get(absl::string_view key, const AttentionBackend& backend,
                                                 const HeadConfig& heads, const BatchPlan& plan,
                                                 const ExecContext& exec) {
  {
    absl::MutexLock lock(&mutex_);
    auto it = works_.find(key);
    if (it != works_.end()) {
      if (it->second->generation != plan.generation())
        if (absl::Status s = Build(it->second.get(), plan, exec); !s.ok()) return s;
      return it->second.get();
    }
  }
  if (absl::Status s = Attach(key, backend, heads, plan, exec); !s.ok()) return s;
  absl::MutexLock lock(&mutex_);
  return works_.find(key)->second.get();
}

void StepWorkSet::Clear() {
  absl::MutexLock lock(&mutex_);
  works_.clear();
}


}  // namespace kvplug::attn
