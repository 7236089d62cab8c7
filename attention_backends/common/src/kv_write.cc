#include "kvplug/attention/kv_write.h"

#include <algorithm>
#include <cmath>

#include "fmt/format.h"

namespace kvplug::attn {
namespace {

constexpr int32_t kMaxHeadSize = 256;  // the CPU engine's largest head size

absl::Status CheckMixState(const WriteArgs& a, const PrevTokenMix& mix) {
  const kv::KvCacheOptions& o = a.cache.options();
  if (!std::isfinite(mix.rope_theta) || mix.rope_theta < 0.0f)
    return absl::InvalidArgumentError(fmt::format("rope_theta={} must be finite and >= 0 (0: no RoPE)", mix.rope_theta));
  if (mix.rope_theta > 0.0f && (mix.rotary_dim < 2 || mix.rotary_dim % 2 != 0 || mix.rotary_dim > o.head_size))
    return absl::InvalidArgumentError(fmt::format("rotary_dim={} must be even and in [2, head_size={}]", mix.rotary_dim,
                                                  o.head_size));
  if (mix.rope_style != RopeStyle::kNeoX && mix.rope_style != RopeStyle::kGptJ)
    return absl::InvalidArgumentError(fmt::format("rope_style={} must be 0 (NeoX) or 1 (GPT-J)",
                                                  static_cast<int32_t>(mix.rope_style)));
  if (!a.plan.has_state_slots())
    return absl::FailedPreconditionError(
        "a previous-token mix keeps per-sequence state: set kvp_batch.state_slots (one per sequence)");
  if (o.num_state_slots <= 0)
    return absl::FailedPreconditionError(fmt::format(
        "a previous-token mix keeps per-sequence state: the cache has num_state_slots={}; create it with state slots "
        "(num_state_slots > 0, state_bytes_per_layer >= {})", o.num_state_slots,
        PrevTokenStateBytes(o.num_kv_heads, o.head_size)));
  if (a.plan.max_state_slot() >= o.num_state_slots)
    return absl::OutOfRangeError(fmt::format("the plan references state slot {} but the cache has {}",
                                             a.plan.max_state_slot(), o.num_state_slots));
  if (o.device == Device::kCpu && o.head_size > kMaxHeadSize)
    return absl::UnimplementedError(fmt::format("head_size={} > {} on the CPU", o.head_size, kMaxHeadSize));
  const int64_t need = PrevTokenStateBytes(o.num_kv_heads, o.head_size);
  if (o.state_bytes_per_layer < need)
    return absl::FailedPreconditionError(fmt::format(
        "the cache's state_bytes_per_layer={} is below the {} bytes the write keeps per layer (raw K and V of "
        "the last token: 2 x num_kv_heads={} x head_size={} x 4)", o.state_bytes_per_layer, need, o.num_kv_heads,
        o.head_size));
  const int64_t capacity = int64_t{o.num_blocks} * o.block_size;
  const auto slots = a.plan.slot_mapping();
  for (size_t i = 0; i < slots.size(); ++i)
    if (slots[i] < -1 || slots[i] >= capacity)
      return absl::OutOfRangeError(fmt::format("slot_mapping[{}]={} out of range [-1, {})", i, slots[i], capacity));
  return absl::OkStatus();
}

// cos/sin of pos * theta^(-2j / rotary_dim) for j < rotary_dim / 2, evaluated in double.
void RopeTable(const PrevTokenMix& mix, int32_t pos, float* cos_out, float* sin_out) {
  const int32_t half = mix.rotary_dim / 2;
  for (int32_t j = 0; j < half; ++j) {
    const double angle = double(pos) * std::pow(double(mix.rope_theta), -2.0 * j / mix.rotary_dim);
    cos_out[j] = static_cast<float>(std::cos(angle));
    sin_out[j] = static_cast<float>(std::sin(angle));
  }
}

// Rotates the leading rotary_dim entries of one head's row (NeoX: pairs (j, j + half); GPT-J: (2j, 2j + 1)).
void RotateRow(const PrevTokenMix& mix, const float* cos_t, const float* sin_t, float* x) {
  const int32_t half = mix.rotary_dim / 2;
  const bool gptj = mix.rope_style == RopeStyle::kGptJ;
  for (int32_t j = 0; j < half; ++j) {
    const int32_t i0 = gptj ? 2 * j : j, i1 = gptj ? 2 * j + 1 : j + half;
    const float x0 = x[i0], x1 = x[i1];
    x[i0] = x0 * cos_t[j] - x1 * sin_t[j];
    x[i1] = x1 * cos_t[j] + x0 * sin_t[j];
  }
}

void WriteMixCpu(const WriteArgs& a, const PrevTokenMix& mix) {
  const kv::KvCacheOptions& o = a.cache.options();
  const kv::PagedLayer& pages = a.cache.layer(a.layer);
  const int32_t H = o.num_kv_heads, D = o.head_size, bs = o.block_size;
  const BatchPlan& plan = a.plan;
  const auto qsl = plan.query_start_loc();
  auto state_of = [&](int32_t b) {
    return reinterpret_cast<float*>(a.cache.State(a.layer, plan.state_slots()[b])->data());
  };
  // Phase 1: every token's mixed rows, reading predecessors from the input or the state.
  a.exec.pool->ParallelFor(plan.num_tokens(), 1, [&](int64_t begin, int64_t end) {
    float cur[kMaxHeadSize], prev[kMaxHeadSize], mixed[kMaxHeadSize];  // no allocation on the write path
    float cos_t[kMaxHeadSize / 2], sin_t[kMaxHeadSize / 2];
    const bool rope = mix.rope_theta > 0.0f;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = plan.slot_mapping()[t];
      if (slot < 0) continue;  // not stored; still the next token's predecessor and maybe the state (phase 2)
      const int32_t b = plan.token_seq()[t];
      const int32_t q0 = qsl[b];
      const int32_t pos = plan.seq_lens()[b] - (qsl[b + 1] - q0) + static_cast<int32_t>(t - q0);
      if (rope) RopeTable(mix, pos, cos_t, sin_t);
      for (int32_t h = 0; h < H; ++h)
        for (int kv = 0; kv < 2; ++kv) {
          const TensorView& in = kv == 0 ? a.key : a.value;
          LoadRow(in.At(t, h), in.dtype, D, cur);
          if (t > q0) LoadRow(in.At(t - 1, h), in.dtype, D, prev);
          else if (pos > 0) std::copy_n(state_of(b) + (int64_t{kv} * H + h) * D, D, prev);
          else std::fill_n(prev, D, 0.0f);
          const float c = (kv == 0 ? mix.k_cur : mix.v_cur)[h], p = (kv == 0 ? mix.k_prev : mix.v_prev)[h];
          for (int32_t x = 0; x < D; ++x) mixed[x] = c * cur[x] + p * prev[x];
          if (rope && kv == 0) RotateRow(mix, cos_t, sin_t, mixed);  // after the mix, keys only
          void* dst = pages.Row(kv, slot / bs, slot % bs, h);
          for (int32_t x = 0; x < D; ++x) StoreFromFloat(dst, pages.dtype, x, mixed[x]);
        }
    }
  });
  // Phase 2 (after every read of the old state): the raw rows of each sequence's last token, whether
  // or not it was stored (slot -1: the state refill after a prefix-cache hit).
  for (int32_t b = 0; b < plan.num_seqs(); ++b) {
    if (qsl[b + 1] == qsl[b]) continue;
    float* st = state_of(b);
    for (int32_t h = 0; h < H; ++h)
      for (int kv = 0; kv < 2; ++kv) {
        const TensorView& in = kv == 0 ? a.key : a.value;
        LoadRow(in.At(qsl[b + 1] - 1, h), in.dtype, D, st + (int64_t{kv} * H + h) * D);
      }
  }
}

}  // namespace

absl::Status WritePagedKv(const WriteArgs& a, const PrevTokenMix* mix) {
  if (!mix)
    return a.cache.Write(a.layer, a.key, a.value, a.plan.slot_mapping(), a.plan.device_slot_mapping(), a.exec.stream);
  if (absl::Status s = CheckMixState(a, *mix); !s.ok()) return s;
  if (a.key.dtype == DType::kFP8E4M3 || a.value.dtype == DType::kFP8E4M3)
    return absl::InvalidArgumentError("key/value: fp8_e4m3 is not an input type");
  if (a.cache.device() == Device::kCuda) return WritePagedKvMixCuda(a, *mix);
  if (a.cache.options().dtype == DType::kFP8E4M3)
    return absl::UnimplementedError("fp8_e4m3 caches are CUDA-only");
  WriteMixCpu(a, *mix);
  return absl::OkStatus();
}

}  // namespace kvplug::attn
