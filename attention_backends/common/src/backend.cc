#include "kvplug/attention/backend.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "fmt/format.h"
#include "kvplug/attention/kv_write.h"
#include "kvplug/attention/telemetry.h"
#include "fmt/ranges.h"

namespace kvplug::attn {

absl::Status AttentionBackend::WriteKv(const WriteArgs& args) const { return WritePagedKv(args, nullptr); }

uint32_t BackendInfo::device_mask() const {
  uint32_t mask = 1u << static_cast<int32_t>(Device::kCpu);
  if (cuda.dtype_mask != 0) mask |= 1u << static_cast<int32_t>(Device::kCuda);
  return mask;
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
  if (plan.has_state_slots() && o.num_state_slots == 0)
    return absl::FailedPreconditionError(
        "the plan gives state slots but the cache has none (num_state_slots=0): create the cache with "
        "num_state_slots > 0 and state_bytes_per_layer >= kvp_attention_state_bytes()");
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

CacheLayout AttentionBackend::Layout(int32_t block_size, int32_t num_tokens, int32_t) const {
  CacheLayout l;
  l.seq_len = num_tokens;
  l.window_pages = num_tokens > 0 ? (num_tokens - 1) / block_size + 1 : 0;
  l.num_pages = l.window_pages;
  return l;
}

absl::Status AttentionBackend::RunSsm(const SsmArgs&) const {
  return absl::UnimplementedError("this backend has no sequence-state operator (kvp_attention_ssm)");
}

absl::Status ValidateRun(const HeadConfig& h, const RunArgs& a) {
  if (absl::Status s = CheckCache(h, a.plan, a.cache, a.layer); !s.ok()) return s;
  const int64_t t = a.plan.num_tokens();
  if (absl::Status s = CheckTokens(a.query, "query", t, h.num_q_heads, h.head_size); !s.ok()) return s;
  if (!a.outputs.out) return absl::InvalidArgumentError("out is required");
  if (absl::Status s = CheckTokens(*a.outputs.out, "out", t, h.num_q_heads, h.head_size); !s.ok()) return s;
  if (a.outputs.out->dtype != a.query.dtype)
    return absl::InvalidArgumentError(fmt::format("out dtype {} differs from query dtype {}",
                                                  DTypeName(a.outputs.out->dtype), DTypeName(a.query.dtype)));
  if (const TensorView* s = a.outputs.entropy_summary) {
    if (s->ndim != 2 || s->shape[0] != h.num_q_heads || s->shape[1] != kEntropySummaryFields)
      return absl::InvalidArgumentError(fmt::format("entropy_summary: expected shape [{}, {}], got ndim={} [{}]",
                                                    h.num_q_heads, kEntropySummaryFields, s->ndim,
                                                    fmt::join(s->shape.begin(), s->shape.begin() + s->ndim, ", ")));
    if (s->dtype != DType::kF32)
      return absl::InvalidArgumentError(fmt::format("entropy_summary: dtype must be float32, got {}", DTypeName(s->dtype)));
    if (s->strides[1] != 1 || s->strides[0] != kEntropySummaryFields)
      return absl::InvalidArgumentError(fmt::format("entropy_summary: must be contiguous, got strides [{}, {}]",
                                                    s->strides[0], s->strides[1]));
  }
  for (const auto& [v, name] : {std::pair{a.outputs.lse, "lse"}, std::pair{a.outputs.entropy, "entropy"}}) {
    if (!v) continue;
    if (v->ndim != 2 || v->shape[0] != t || v->shape[1] != h.num_q_heads)
      return absl::InvalidArgumentError(fmt::format("{}: expected shape [{}, {}], got ndim={} [{}]", name, t,
                                                    h.num_q_heads, v->ndim,
                                                    fmt::join(v->shape.begin(), v->shape.begin() + v->ndim, ", ")));
    if (v->dtype != DType::kF32)
      return absl::InvalidArgumentError(fmt::format("{}: dtype must be float32, got {}", name, DTypeName(v->dtype)));
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
  const DeviceCaps* caps = info.caps(device);
  if (!caps)
    return absl::UnimplementedError(fmt::format("backend '{}' has no implementation for device type {}",
                                                info.name, static_cast<int32_t>(device)));
  const char* where = device == Device::kCuda ? "CUDA" : "CPU";
  if (std::find(caps->head_sizes.begin(), caps->head_sizes.end(), h.head_size) == caps->head_sizes.end())
    return absl::UnimplementedError(fmt::format("backend '{}' ({}) supports head sizes [{}], not head_size={}",
                                                info.name, where, fmt::join(caps->head_sizes, ", "), h.head_size));
  const auto dt = static_cast<int32_t>(h.kv_dtype);
  if (dt < 0 || dt > 31 || !(caps->dtype_mask & (1u << dt)))
    return absl::UnimplementedError(fmt::format("backend '{}' ({}) does not support kv_dtype={} ({})", info.name,
                                                where, dt, DTypeName(h.kv_dtype)));
  if (!(h.sm_scale > 0.0f) || !std::isfinite(h.sm_scale))
    return absl::InvalidArgumentError(fmt::format("sm_scale={} must be finite and > 0", h.sm_scale));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<AttentionBackend>> CreateBackend(const BackendInfo& info, const HeadConfig& heads,
                                                                const BackendConfig& config, const ExecContext& exec) {
  if (absl::Status s = ValidateHeads(info, heads, exec.device); !s.ok()) return s;
  return info.create(heads, config, exec);
}

}  // namespace kvplug::attn
