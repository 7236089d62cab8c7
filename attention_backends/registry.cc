// The registry of built-in backends: the one place that names them (the role of ggml's
// ggml-backend-reg.cpp). Adding a backend is one line here plus its folder; nothing in common/ or
// abi/ changes.
#include <vector>

#include "kvplug/attention/attamba/attamba.h"
#include "kvplug/attention/backend.h"
#include "kvplug/attention/dense/dense.h"
#include "kvplug/attention/kv_shift/kv_shift.h"
#include "kvplug/attention/star/star.h"
#include "kvplug/attention/entropy/entropy.h"

namespace kvplug::attn {

std::span<const BackendInfo> Backends() {
  // Explicit registration (as ggml's backend registry does): no static-initialization order games,
  // and nothing is dropped by the linker when the library is built from static archives.
  static const std::vector<BackendInfo> backends = [] {
    std::vector<BackendInfo> list;
    list.push_back(dense::Info());
    list.push_back(star::Info());
    list.push_back(kv_shift::Info());
    list.push_back(entropy::Info());
    list.push_back(attamba::Info());
    return list;
  }();
  return backends;
}

absl::Status ValidateParsedConfig(const BackendConfig& config) {
  if (const auto* a = std::get_if<AttambaConfig>(&config)) return attamba::ValidateConfig(*a);
  return absl::OkStatus();
}

const BackendInfo* FindBackend(std::string_view name) {
  for (const BackendInfo& info : Backends())
    if (info.name == name) return &info;
  return nullptr;
}

}  // namespace kvplug::attn
