#include "kvplug/attention/backend.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "fmt/format.h"
#include "fmt/ranges.h"
#include "kvplug/attention/dense/dense.h"

namespace kvplug::attn {

absl::Status AttentionBackend::WriteKv(const WriteArgs& args) const {
  return args.cache.Write(args.layer, args.key, args.value, args.plan.slot_mapping(),
                          args.plan.device_slot_mapping(), args.exec.stream);
}

std::span<const BackendInfo> Backends() {
  // Explicit registration (as ggml's backend registry does): no static-initialization order games,
  // and nothing is dropped by the linker when the library is built from static archives.
  static const std::vector<BackendInfo> backends = [] {
    std::vector<BackendInfo> list;
    list.push_back(dense::Info());
    return list;
  }();
  return backends;
}

const BackendInfo* FindBackend(std::string_view name) {
  for (const BackendInfo& info : Backends())
    if (info.name == name) return &info;
  return nullptr;
}

}  // namespace kvplug::attn

namespace kvplug::attn {
namespace {

absl::Status CheckCache(const HeadConfig& h, const BatchPlan& plan, const kv::KvCache& cache,
                        int32_t layer) {
  const kv::KvCacheOptions& o = cache.options();
  if (plan.empty())
    return absl::FailedPreconditionError("the plan holds no batch: call kvp_plan_update first (or it failed)");
  if (layer < 0 || layer >= o.num_layers)
    return absl::OutOfRangeError(fmt::format("layer={} out of range [0, {})", layer, o.num_layers));
  if (o.num_kv_heads != h.num_kv_heads || o.head_size != h.head_size || o.dtype != h.kv_dtype)
    return absl::InvalidArgumentError(fmt::format(
        "cache (num_kv_heads={}, head_size={}, dtype={}) does not match the backend (num_kv_heads={}, "
        "head_size={}, kv_dtype={})", o.num_kv_heads, o.head_size, DTypeName(o.dtype), h.num_kv_heads,
        h.head_size, DTypeName(h.kv_dtype)));
  if (o.block_size != plan.block_size())
    return absl::InvalidArgumentError(fmt::format("plan block_size={} but the cache's is {}",
                                                  plan.block_size(), o.block_size));
  if (o.device == Device::kCuda && !plan.on_device())
    return absl::InvalidArgumentError("the plan was created on the CPU but the cache lives on a CUDA device");
  if (plan.max_block_id() >= o.num_blocks)
    return absl::OutOfRangeError(fmt::format("the plan references block {} but the cache has {} blocks",
                                             plan.max_block_id(), o.num_blocks));
  if (plan.has_state_slots() && plan.max_state_slot() >= o.num_state_slots)
    return absl::OutOfRangeError(fmt::format("the plan references state slot {} but the cache has {}",
                                             plan.max_state_slot(), o.num_state_slots));
  return absl::OkStatus();
}

absl::Status CheckTokens(const TensorView& t, const char* name, int64_t tokens, int64_t heads, int64_t dim) {
  if (t.ndim != 3 || t.shape[0] != tokens || t.shape[1] != heads || t.shape[2] != dim)
    return absl::InvalidArgumentError(fmt::format("{}: expected shape [{}, {}, {}], got ndim={} [{}]", name,
                                                  tokens, heads, dim, t.ndim,
                                                  fmt::join(t.shape.begin(), t.shape.begin() + t.ndim, ", ")));
  if (t.strides[2] != 1)
    return absl::InvalidArgumentError(fmt::format("{}: the head axis must be contiguous (stride {})", name,
                                                  t.strides[2]));
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateRun(const HeadConfig& h, const RunArgs& a) {
  if (absl::Status s = CheckCache(h, a.plan, a.cache, a.layer); !s.ok()) return s;
  const int64_t t = a.plan.num_tokens();
  if (absl::Status s = CheckTokens(a.query, "query", t, h.num_q_heads, h.head_size); !s.ok()) return s;
  if (absl::Status s = CheckTokens(a.out, "out", t, h.num_q_heads, h.head_size); !s.ok()) return s;
  if (a.out.dtype != a.query.dtype)
    return absl::InvalidArgumentError(fmt::format("out dtype {} differs from query dtype {}",
                                                  DTypeName(a.out.dtype), DTypeName(a.query.dtype)));
  if (a.lse) {
    if (a.lse->ndim != 2 || a.lse->shape[0] != t || a.lse->shape[1] != h.num_q_heads)
      return absl::InvalidArgumentError(fmt::format("lse: expected shape [{}, {}], got ndim={}", t,
                                                    h.num_q_heads, a.lse->ndim));
    if (a.lse->dtype != DType::kF32)
      return absl::InvalidArgumentError(fmt::format("lse: dtype must be float32, got {}", DTypeName(a.lse->dtype)));
  }
  return absl::OkStatus();
}

absl::Status ValidateWrite(const HeadConfig& h, const WriteArgs& a) {
  if (absl::Status s = CheckCache(h, a.plan, a.cache, a.layer); !s.ok()) return s;
  if (!a.plan.has_slot_mapping())
    return absl::FailedPreconditionError("the plan has no slot_mapping: set kvp_batch.slot_mapping");
  const int64_t t = a.plan.num_tokens();
  if (absl::Status s = CheckTokens(a.key, "key", t, h.num_kv_heads, h.head_size); !s.ok()) return s;
  return CheckTokens(a.value, "value", t, h.num_kv_heads, h.head_size);
}

}  // namespace kvplug::attn

namespace kvplug::attn {

absl::Status ValidateHeads(const BackendInfo& info, const HeadConfig& h, Device device) {
  if (h.num_q_heads <= 0 || h.num_kv_heads <= 0 || h.num_q_heads % h.num_kv_heads != 0)
    return absl::InvalidArgumentError(fmt::format(
        "num_q_heads={} must be a positive multiple of num_kv_heads={}", h.num_q_heads, h.num_kv_heads));
  if (h.num_q_heads > 4096)
    return absl::InvalidArgumentError(fmt::format("num_q_heads={} must be <= 4096", h.num_q_heads));
  if (std::find(info.head_sizes.begin(), info.head_sizes.end(), h.head_size) == info.head_sizes.end())
    return absl::UnimplementedError(fmt::format("backend '{}' supports head sizes [{}], not head_size={}",
                                                info.name, fmt::join(info.head_sizes, ", "), h.head_size));
  const auto dt = static_cast<int32_t>(h.kv_dtype);
  if (dt < 0 || dt > 31 || !(info.dtype_mask & (1u << dt)))
    return absl::UnimplementedError(fmt::format("backend '{}' does not support kv_dtype={}", info.name, dt));
  if (!(info.device_mask & (1u << static_cast<int32_t>(device))))
    return absl::UnimplementedError(fmt::format("backend '{}' has no implementation for device type {}",
                                                info.name, static_cast<int32_t>(device)));
  if (!(h.sm_scale > 0.0f) || !std::isfinite(h.sm_scale))
    return absl::InvalidArgumentError(fmt::format("sm_scale={} must be finite and > 0", h.sm_scale));
  return absl::OkStatus();
}

}  // namespace kvplug::attn
