#include "kvplug/attention/kv_shift/kv_shift.h"

#include <cmath>
#include <memory>
#include <vector>

#include "fmt/format.h"
#include "kvplug/attention/engine.h"
#include "kvplug/attention/kv_write.h"
#include "kvplug/kv_cache/cuda_kernels.h"

namespace kvplug::attn::kv_shift {

absl::Status ValidateConfig(const KvShiftConfig& c, int32_t num_kv_heads, int32_t head_size) {
  const size_t want = size_t(num_kv_heads) * 2;
  for (const auto& [name, values] : {std::pair<const char*, const std::vector<float>*>{"alpha_k", &c.alpha_k},
                                     std::pair<const char*, const std::vector<float>*>{"alpha_v", &c.alpha_v}}) {
    if (values->size() != want)
      return absl::InvalidArgumentError(fmt::format(
          "kv_shift: {} has {} values, expected num_kv_heads * 2 = {} (per KV head: current, previous)", name,
          values->size(), want));
    for (size_t i = 0; i < values->size(); ++i)
      if (!std::isfinite((*values)[i]))
        return absl::InvalidArgumentError(fmt::format("kv_shift: {}[{}]={} must be finite (KV head {}, {} weight)",
                                                      name, i, (*values)[i], i / 2, i % 2 == 0 ? "current" : "previous"));
  }
  if (!std::isfinite(c.rope_theta) || c.rope_theta < 0.0f)
    return absl::InvalidArgumentError(
        fmt::format("kv_shift: rope_theta={} must be finite and >= 0 (0: no RoPE)", c.rope_theta));
  if (c.rotary_dim < 0 || c.rotary_dim % 2 != 0 || c.rotary_dim > head_size)
    return absl::InvalidArgumentError(fmt::format(
        "kv_shift: rotary_dim={} must be 0 (head_size) or even and in [2, head_size={}]", c.rotary_dim, head_size));
  if (c.rope_style != RopeStyle::kNeoX && c.rope_style != RopeStyle::kGptJ)
    return absl::InvalidArgumentError(fmt::format("kv_shift: rope_style={} must be 0 (NeoX) or 1 (GPT-J)",
                                                  static_cast<int32_t>(c.rope_style)));
  return absl::OkStatus();
}

namespace {

class KvShift final : public VariantBackend {
 public:
  KvShift(const HeadConfig& heads, const KvShiftConfig& config, Device device)
      : VariantBackend(heads, device, std::make_shared<CausalPlanner>(-1)) {
    const int32_t H = heads.num_kv_heads;
    // One array [4][H]: k_cur, k_prev, v_cur, v_prev (the layout the CUDA write requires).
    coef_.resize(size_t(4) * H);
    for (int32_t h = 0; h < H; ++h) {
      coef_[h] = config.alpha_k[2 * h];
      coef_[H + h] = config.alpha_k[2 * h + 1];
      coef_[2 * H + h] = config.alpha_v[2 * h];
      coef_[3 * H + h] = config.alpha_v[2 * h + 1];
    }
    mix_.rope_theta = config.rope_theta;
    mix_.rotary_dim = config.rope_theta > 0.0f ? (config.rotary_dim == 0 ? heads.head_size : config.rotary_dim) : 0;
    mix_.rope_style = config.rope_style;
    SetCoefficients(coef_.data());
  }
  // CUDA: the coefficients in one device array, uploaded once (the creation may synchronize).
  absl::Status Upload(const ExecContext& exec) {
    if (absl::Status s = device_coef_.Upload(coef_.data(), int64_t(coef_.size()) * 4, exec, "kv_shift: the coefficients");
        !s.ok())
      return s;
    SetCoefficients(static_cast<const float*>(device_coef_.get()));
    return absl::OkStatus();
  }

  absl::Status WriteKv(const WriteArgs& a) const override {
    if (a.cache.device() != device())
      return absl::InvalidArgumentError(fmt::format("kv_shift: the cache is on device type {}, the attention on {}",
                                                    static_cast<int32_t>(a.cache.device()), static_cast<int32_t>(device())));
    return WritePagedKv(a, &mix_);
  }

  int64_t state_bytes_per_layer() const override {
    return PrevTokenStateBytes(heads().num_kv_heads, heads().head_size);
  }

 private:
  void SetCoefficients(const float* base) {
    const int32_t H = heads().num_kv_heads;
    mix_.k_cur = base;
    mix_.k_prev = base + H;
    mix_.v_cur = base + 2 * H;
    mix_.v_prev = base + 3 * H;
  }

  std::vector<float> coef_;  // host copy, [4][num_kv_heads]
  DeviceCopy device_coef_;   // CUDA: the same on the device
  PrevTokenMix mix_;
};

}  // namespace

BackendInfo Info() {
  BackendInfo info = FamilyBackendInfo("kv_shift");
  info.needs_state_slots = true;
  info.create = [](const HeadConfig& heads, const BackendConfig& config,
                   const ExecContext& exec) -> absl::StatusOr<std::unique_ptr<AttentionBackend>> {
    const auto* c = std::get_if<KvShiftConfig>(&config);
    if (!c) {
      if (std::holds_alternative<std::monostate>(config))
        return absl::InvalidArgumentError(fmt::format(
            "kv_shift: a KvShiftConfig is required (alpha_k and alpha_v: num_kv_heads * 2 = {} values each)",
            2 * heads.num_kv_heads));
      return absl::InvalidArgumentError("kv_shift: the config is not a KvShiftConfig");
    }
    if (absl::Status s = ValidateConfig(*c, heads.num_kv_heads, heads.head_size); !s.ok()) return s;
    if (exec.device == Device::kCuda)
      if (absl::Status s = CheckCudaEngineSupport(heads); !s.ok()) return s;
    auto backend = std::make_unique<KvShift>(heads, *c, exec.device);
    if (exec.device == Device::kCuda)
      if (absl::Status s = backend->Upload(exec); !s.ok()) return s;
    return backend;
  };
  return info;
}

}  // namespace kvplug::attn::kv_shift
