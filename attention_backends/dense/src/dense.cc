#include <cmath>

#include "fmt/format.h"
#include "kvplug/attention/dense/dense.h"
#include "kvplug/attention/engine.h"

namespace kvplug::attn::dense {
namespace {

class Dense final : public VariantBackend {
 public:
  Dense(const HeadConfig& heads, const DenseConfig& config, Device device)
      : VariantBackend(heads, device, std::make_shared<CausalPlanner>(config.window_left)), config_(config) {}

 private:
  VariantParams Variant() const override {
    VariantParams v = VariantBackend::Variant();
    v.logits_soft_cap = config_.logits_soft_cap;
    return v;
  }
  DenseConfig config_;
};

}  // namespace

BackendInfo Info() {
  BackendInfo info = FamilyBackendInfo("dense");
  info.create = [](const HeadConfig& heads, const BackendConfig& config,
                   const ExecContext& exec) -> absl::StatusOr<std::unique_ptr<AttentionBackend>> {
    auto parsed = ConfigOrDefault<DenseConfig>(config, "dense", "DenseConfig");
    if (!parsed.ok()) return parsed.status();
    DenseConfig dense = *std::move(parsed);
    if (!(dense.logits_soft_cap >= 0.0f) || !std::isfinite(dense.logits_soft_cap))
      return absl::InvalidArgumentError(
          fmt::format("dense: logits_soft_cap={} must be finite and >= 0", dense.logits_soft_cap));
    if (exec.device == Device::kCuda)
      if (absl::Status s = CheckCudaEngineSupport(heads); !s.ok()) return s;
    return std::make_unique<Dense>(heads, dense, exec.device);
  };
  return info;
}

}  // namespace kvplug::attn::dense
