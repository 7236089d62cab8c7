#include "kvplug/attention/entropy/entropy.h"

#include <cmath>
#include <vector>

#include "fmt/format.h"
#include "kvplug/attention/engine.h"

namespace kvplug::attn::entropy {
namespace {

class Entropy final : public VariantBackend {
 public:
  Entropy(const HeadConfig& heads, std::vector<float> inv_t, int32_t positions, Device device)
      : VariantBackend(heads, device, std::make_shared<CausalPlanner>(-1)), inv_t_(std::move(inv_t)),
        positions_(positions) {}

  // The table lives where the engine reads it: uploaded once at creation on CUDA.
  absl::Status Upload(const ExecContext& exec) {
    if (device() != Device::kCuda) return absl::OkStatus();
    return device_table_.Upload(inv_t_.data(), int64_t(inv_t_.size()) * 4, exec, "entropy: the temperature table");
  }

 private:
  VariantParams Variant() const override {
    VariantParams v = VariantBackend::Variant();
    v.scale_table = device() == Device::kCuda ? static_cast<const float*>(device_table_.get()) : inv_t_.data();
    v.scale_table_len = positions_;
    return v;
  }
  std::vector<float> inv_t_;  // [num_q_heads, positions_]: 1 / t
  int32_t positions_;
  DeviceCopy device_table_;
};

}  // namespace

BackendInfo Info() {
  BackendInfo info = FamilyBackendInfo("entropy");
  info.create = [](const HeadConfig& heads, const BackendConfig& config,
                   const ExecContext& exec) -> absl::StatusOr<std::unique_ptr<AttentionBackend>> {
    auto parsed = ConfigOrDefault<EntropyConfig>(config, "entropy", "EntropyConfig");
    if (!parsed.ok()) return parsed.status();
    EntropyConfig cfg = *std::move(parsed);
    const size_t hq = size_t(heads.num_q_heads);
    if (cfg.temperature.empty()) cfg.temperature.assign(hq, 1.0f);
    if (cfg.temperature.size() % hq != 0)
      return absl::InvalidArgumentError(fmt::format(
          "entropy: temperature has {} entries, not a multiple of num_q_heads={} (the table is [num_q_heads, T])",
          cfg.temperature.size(), hq));
    const size_t positions = cfg.temperature.size() / hq;
    if (positions > (size_t{1} << 20))
      return absl::InvalidArgumentError(fmt::format("entropy: T={} positions per head is more than 2^20", positions));
    std::vector<float> inv_t(cfg.temperature.size());
    for (size_t i = 0; i < inv_t.size(); ++i) {
      const float t = cfg.temperature[i];
      if (!std::isfinite(t) || !(t > 0.0f) || !std::isfinite(1.0f / t))
        return absl::InvalidArgumentError(fmt::format(
            "entropy: temperature[{}] (head {}, position {})={} must be finite and > 0", i, i / positions,
            i % positions, t));
      inv_t[i] = 1.0f / t;
    }
    if (exec.device == Device::kCuda)
      if (absl::Status s = CheckCudaEngineSupport(heads); !s.ok()) return s;
    auto backend = std::make_unique<Entropy>(heads, std::move(inv_t), int32_t(positions), exec.device);
    if (absl::Status s = backend->Upload(exec); !s.ok()) return s;
    return backend;
  };
  return info;
}

}  // namespace kvplug::attn::entropy
