// Exact causal attention on the CPU: one work item per (query token, KV head), all query heads of
// that KV head sharing each K/V row load; online softmax with fp32 accumulation.
#include <algorithm>
#include <array>
#include <cmath>
#include <limits>

#include "fmt/format.h"
#include "kvplug/attention/dense/dense.h"

namespace kvplug::attn::dense {
namespace {

constexpr int32_t kMaxHeadSize = 256;
constexpr int32_t kHeadChunk = 8;  // query heads processed together per K/V pass
constexpr std::array<int32_t, 9> kHeadSizes = {32, 64, 80, 96, 112, 128, 160, 192, 256};

class DenseCpu final : public AttentionBackend {
 public:
  DenseCpu(const HeadConfig& heads, const DenseConfig& config) : heads_(heads), config_(config) {}

  absl::Status Run(const RunArgs& a) const override {
    const int32_t num_items = a.plan.num_tokens() * heads_.num_kv_heads;
    a.exec.pool->ParallelFor(num_items, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) RunItem(a, item);
    });
    return absl::OkStatus();
  }

 private:
  void RunItem(const RunArgs& a, int64_t item) const {
    const int32_t d = heads_.head_size;
    const int32_t group = heads_.num_q_heads / heads_.num_kv_heads;
    const int32_t t = static_cast<int32_t>(item / heads_.num_kv_heads);
    const int32_t g = static_cast<int32_t>(item % heads_.num_kv_heads);
    const BatchPlan& plan = a.plan;
    const int32_t b = plan.token_seq()[t];
    const int32_t q_begin = plan.query_start_loc()[b];
    const int32_t q_len = plan.query_start_loc()[b + 1] - q_begin;
    const int32_t pos = plan.seq_lens()[b] - q_len + (t - q_begin);
    const int32_t lo = config_.window_left >= 0 ? std::max(0, pos - config_.window_left) : 0;
    const int32_t* blocks = plan.kv_indices().data() + plan.kv_indptr()[b];
    const int32_t bs = plan.block_size();
    const kv::PagedLayer& pages = a.cache.layer(a.layer);
    const float cap = config_.logits_soft_cap;

    alignas(64) float q[kHeadChunk][kMaxHeadSize];
    alignas(64) float acc[kHeadChunk][kMaxHeadSize];
    alignas(64) float kbuf[kMaxHeadSize];
    alignas(64) float vbuf[kMaxHeadSize];
    float m[kHeadChunk], l[kHeadChunk];

    for (int32_t r0 = 0; r0 < group; r0 += kHeadChunk) {
      const int32_t rows = std::min(kHeadChunk, group - r0);
      for (int32_t r = 0; r < rows; ++r) {
        LoadRow(a.query.At(t, g * group + r0 + r), a.query.dtype, d, q[r]);
        std::fill_n(acc[r], d, 0.0f);
        m[r] = -std::numeric_limits<float>::infinity();
        l[r] = 0.0f;
      }
      for (int32_t j = lo; j <= pos; ++j) {
        const int32_t block = blocks[j / bs];
        const void* krow = pages.Row(0, block, j % bs, g);
        const void* vrow = pages.Row(1, block, j % bs, g);
        const float* k = kbuf;
        const float* v = vbuf;
        if (pages.dtype == DType::kF32) {
          k = static_cast<const float*>(krow);
          v = static_cast<const float*>(vrow);
        } else {
          LoadRow(krow, pages.dtype, d, kbuf);
          LoadRow(vrow, pages.dtype, d, vbuf);
        }
        for (int32_t r = 0; r < rows; ++r) {
          float dot = 0.0f;
          for (int32_t i = 0; i < d; ++i) dot += q[r][i] * k[i];
          float s = dot * heads_.sm_scale;
          if (cap > 0.0f) s = cap * std::tanh(s / cap);
          if (s > m[r]) {
            const float correction = std::exp(m[r] - s);  // exp(-inf) = 0 on the first key
            l[r] *= correction;
            for (int32_t i = 0; i < d; ++i) acc[r][i] *= correction;
            m[r] = s;
          }
          const float w = std::exp(s - m[r]);
          l[r] += w;
          for (int32_t i = 0; i < d; ++i) acc[r][i] += w * v[i];
        }
      }
      for (int32_t r = 0; r < rows; ++r) {
        const int32_t h = g * group + r0 + r;
        const float inv = 1.0f / l[r];
        void* out = a.out.At(t, h);
        for (int32_t i = 0; i < d; ++i) StoreFromFloat(out, a.out.dtype, i, acc[r][i] * inv);
        if (a.lse) *static_cast<float*>(a.lse->At(t, h)) = m[r] + std::log(l[r]);
      }
    }
  }

  HeadConfig heads_;
  DenseConfig config_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<AttentionBackend>> CreateCpu(const HeadConfig& heads,
                                                            const DenseConfig& config) {
  if (absl::Status s = ValidateHeads(Info(), heads, Device::kCpu); !s.ok()) return s;
  if (heads.kv_dtype == DType::kFP8E4M3)
    return absl::UnimplementedError("dense (CPU): fp8_e4m3 caches are CUDA-only");
  if (!(config.logits_soft_cap >= 0.0f) || !std::isfinite(config.logits_soft_cap))
    return absl::InvalidArgumentError(
        fmt::format("dense: logits_soft_cap={} must be finite and >= 0", config.logits_soft_cap));
  return std::make_unique<DenseCpu>(heads, config);
}

int64_t CudaWorkspaceBytes(const HeadConfig& heads) {
  constexpr int64_t kPartialRows = 2048;  // token x split rows of partial results
  return kPartialRows * heads.num_q_heads * (heads.head_size + 1) * 4;
}

BackendInfo Info() {
  BackendInfo info;
  info.name = "dense";
  info.dtype_mask = (1u << static_cast<int>(DType::kF32)) | (1u << static_cast<int>(DType::kF16)) |
                    (1u << static_cast<int>(DType::kBF16));
  info.device_mask = 1u << static_cast<int>(Device::kCpu);
#ifdef KVP_HAVE_CUDA
  info.device_mask |= 1u << static_cast<int>(Device::kCuda);
  info.dtype_mask |= 1u << static_cast<int>(DType::kFP8E4M3);  // CUDA caches only
#endif
  info.head_sizes = kHeadSizes;
  info.supports_lse = true;
  info.needs_state_slots = false;
  info.create = [](const HeadConfig& heads, const BackendConfig& config,
                   Device device) -> absl::StatusOr<std::unique_ptr<AttentionBackend>> {
    DenseConfig dense;
    if (const auto* c = std::get_if<DenseConfig>(&config)) dense = *c;
    else if (!std::holds_alternative<std::monostate>(config))
      return absl::InvalidArgumentError("dense: the config is not a DenseConfig");
#ifdef KVP_HAVE_CUDA
    if (device == Device::kCuda) return CreateCuda(heads, dense);
#endif
    if (device != Device::kCpu) return absl::UnimplementedError("dense: no CUDA kernels in this build");
    return CreateCpu(heads, dense);
  };
  return info;
}

}  // namespace kvplug::attn::dense
