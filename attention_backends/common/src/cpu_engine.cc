#include "kvplug/attention/cpu_engine.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "fmt/format.h"

namespace kvplug::attn {
namespace {

constexpr int32_t kMaxHeadSize = 256;
constexpr int32_t kHeadChunk = 8;  // query heads processed together per K/V pass
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

int32_t KeyPosition(const KeySegment& g, absl::Span<const int32_t> pos_map, int32_t j) {
  return g.pos_map >= 0 ? pos_map[g.pos_map + (j - g.key_begin)] : g.pos_base + j;
}

// Online-softmax state of one query row: running max m, l = sum e^(s-m), u = sum e^(s-m) s (for the
// entropy), acc = sum e^(s-m) v.
struct RowState {
  float m, l, u;
  float* acc;
};

void RunTokenHead(const CpuAttentionArgs& a, const QuerySpan& span, int32_t t, int32_t g) {
  const kv::PagedLayer& pages = a.pages;
  const int32_t d = pages.head_size;
  const int32_t group = a.num_q_heads / a.num_kv_heads;
  const int32_t q_pos = span.pos_begin + (t - span.token_begin);
  const int32_t bs = pages.block_size;
  const auto kv_indices = a.plan.kv_indices();
  const auto pos_map = a.keys.pos_map();
  const VariantParams& vp = a.variant;
  const float cap = vp.logits_soft_cap;
  const bool want_entropy = a.outputs.entropy != nullptr;

  alignas(64) float q[kHeadChunk][kMaxHeadSize];
  alignas(64) float acc[kHeadChunk][kMaxHeadSize];
  alignas(64) float kbuf[kMaxHeadSize];
  alignas(64) float vbuf[kMaxHeadSize];
  float scale[kHeadChunk];
  RowState st[kHeadChunk];

  for (int32_t r0 = 0; r0 < group; r0 += kHeadChunk) {
    const int32_t rows = std::min(kHeadChunk, group - r0);
    for (int32_t r = 0; r < rows; ++r) {
      const int32_t h = g * group + r0 + r;
      LoadRow(a.query.At(t, h), a.query.dtype, d, q[r]);
      std::fill_n(acc[r], d, 0.0f);
      st[r] = {kNegInf, 0.0f, 0.0f, acc[r]};
      scale[r] = vp.sm_scale;
      if (vp.scale_table)
        scale[r] *= vp.scale_table[static_cast<int64_t>(h) * vp.scale_table_len +
                                   std::min(q_pos, vp.scale_table_len - 1)];
    }
    for (int32_t si = span.segment_begin; si < span.segment_end; ++si) {
      const KeySegment& seg = a.keys.segments()[si];
      for (int32_t j = seg.key_begin; j < seg.key_end; ++j) {
        const int64_t lag = static_cast<int64_t>(q_pos) - KeyPosition(seg, pos_map, j);
        if (lag < seg.lag_min || lag > seg.lag_max) continue;
        const int32_t block = kv_indices[seg.page_offset + j / bs];
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
          float s = dot * scale[r];
          if (cap > 0.0f) s = cap * std::tanh(s / cap);
          RowState& x = st[r];
          if (s > x.m) {
            const float correction = std::exp(x.m - s);  // exp(-inf) = 0 on the first key
            x.l *= correction;
            x.u *= correction;
            for (int32_t i = 0; i < d; ++i) x.acc[i] *= correction;
            x.m = s;
          }
          const float w = std::exp(s - x.m);
          x.l += w;
          if (want_entropy) x.u += w * s;
          for (int32_t i = 0; i < d; ++i) x.acc[i] += w * v[i];
        }
      }
    }
    for (int32_t r = 0; r < rows; ++r) {
      const int32_t h = g * group + r0 + r;
      const RowState& x = st[r];
      // A row that saw no key (possible with custom key sets) writes zeros and lse = -inf.
      const float inv = x.l > 0.0f ? 1.0f / x.l : 0.0f;
      void* out = a.outputs.out->At(t, h);
      for (int32_t i = 0; i < d; ++i) StoreFromFloat(out, a.outputs.out->dtype, i, x.acc[i] * inv);
      const float lse = x.l > 0.0f ? x.m + std::log(x.l) : kNegInf;
      if (a.outputs.lse) *static_cast<float*>(a.outputs.lse->At(t, h)) = lse;
      if (a.outputs.entropy)
        *static_cast<float*>(a.outputs.entropy->At(t, h)) = x.l > 0.0f ? std::max(0.0f, lse - x.u * inv) : 0.0f;
    }
  }
}

}  // namespace

void RunPagedAttentionPlain(const CpuAttentionArgs& a) {
  const auto spans = a.keys.spans();
  // Spans cover the batch's tokens in order (KeySets::Validate), so token t's span is found by a
  // binary search over span starts.
  const int64_t num_items = static_cast<int64_t>(a.plan.num_tokens()) * a.num_kv_heads;
  a.pool->ParallelFor(num_items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const auto t = static_cast<int32_t>(item / a.num_kv_heads);
      const auto g = static_cast<int32_t>(item % a.num_kv_heads);
      auto it = std::upper_bound(spans.begin(), spans.end(), t,
                                 [](int32_t tok, const QuerySpan& s) { return tok < s.token_begin; });
      if (it == spans.begin()) continue;
      const QuerySpan& span = *(it - 1);
      if (t >= span.token_end) continue;
      RunTokenHead(a, span, t, g);
    }
  });
}

namespace {
// The fast engine is the default; KVP_CPU_ENGINE=plain selects the plain one (an A/B and a check).
bool UsePlainEngine() {
  static const bool plain = [] {
    const char* e = std::getenv("KVP_CPU_ENGINE");
    return e != nullptr && std::strcmp(e, "plain") == 0;
  }();
  return plain;
}
}  // namespace

void RunPagedAttentionCpu(const CpuAttentionArgs& a) {
  if (UsePlainEngine())
    RunPagedAttentionPlain(a);
  else
    RunPagedAttentionFast(a);
}

absl::Status ValidateMergeStates(const MergeStatesArgs& a) {
  const TensorView* po = a.partial_out;
  const TensorView* pl = a.partial_lse;
  if (!po || !pl || !a.out) return absl::InvalidArgumentError("partial_out, partial_lse and out are required");
  if (po->ndim != 4 || pl->ndim != 3 || a.out->ndim != 3)
    return absl::InvalidArgumentError(fmt::format(
        "expected partial_out [S, T, H, D], partial_lse [S, T, H], out [T, H, D]; got ndim {}, {}, {}", po->ndim,
        pl->ndim, a.out->ndim));
  const int64_t S = po->shape[0], T = po->shape[1], H = po->shape[2], D = po->shape[3];
  if (S < 1) return absl::InvalidArgumentError(fmt::format("partial_out has {} partials; need at least 1", S));
  auto same = [](const TensorView* v, std::initializer_list<int64_t> dims) {
    int i = 0;
    for (int64_t x : dims)
      if (v->shape[i++] != x) return false;
    return true;
  };
  if (!same(pl, {S, T, H}))
    return absl::InvalidArgumentError(fmt::format("partial_lse shape [{}, {}, {}] does not match partial_out's "
                                                  "[S={}, T={}, H={}]", pl->shape[0], pl->shape[1], pl->shape[2],
                                                  S, T, H));
  if (!same(a.out, {T, H, D}))
    return absl::InvalidArgumentError(fmt::format("out shape [{}, {}, {}] is not [T={}, H={}, D={}]",
                                                  a.out->shape[0], a.out->shape[1], a.out->shape[2], T, H, D));
  if (pl->dtype != DType::kF32) return absl::InvalidArgumentError("partial_lse must be float32");
  for (const auto& [v, name] : {std::pair{a.lse, "lse"}, std::pair{a.entropy, "entropy"}}) {
    if (!v) continue;
    if (v->ndim != 2 || !same(v, {T, H}) || v->dtype != DType::kF32)
      return absl::InvalidArgumentError(fmt::format("{}: expected float32 [T={}, H={}]", name, T, H));
  }
  if (a.partial_entropy) {
    if (a.partial_entropy->ndim != 3 || !same(a.partial_entropy, {S, T, H}) || a.partial_entropy->dtype != DType::kF32)
      return absl::InvalidArgumentError(fmt::format("partial_entropy: expected float32 [S={}, T={}, H={}]", S, T, H));
  }
  if (a.entropy && !a.partial_entropy)
    return absl::InvalidArgumentError("entropy is requested but partial_entropy is not given");
  if (D > 4096) return absl::InvalidArgumentError(fmt::format("head size D={} must be <= 4096", D));
  return absl::OkStatus();
}

void MergeStatesCpu(const MergeStatesArgs& a, ThreadPool* pool) {
  const TensorView& po = *a.partial_out;
  const TensorView& pl = *a.partial_lse;
  const int64_t S = po.shape[0], T = po.shape[1], H = po.shape[2], D = po.shape[3];
  auto at = [](const TensorView& v, std::initializer_list<int64_t> idx) {
    int64_t off = 0;
    int i = 0;
    for (int64_t x : idx) off += x * v.strides[i++];
    return static_cast<char*>(v.data) + off * static_cast<int64_t>(DTypeSize(v.dtype));
  };
  pool->ParallelFor(T * H, 16, [&](int64_t begin, int64_t end) {
    std::vector<double> acc(static_cast<size_t>(D));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / H, h = item % H;
      double m = -std::numeric_limits<double>::infinity();
      for (int64_t s = 0; s < S; ++s) m = std::max(m, double(*reinterpret_cast<const float*>(at(pl, {s, t, h}))));
      std::fill(acc.begin(), acc.end(), 0.0);
      double sum = 0.0, mean_logit = 0.0;
      if (m != -std::numeric_limits<double>::infinity()) {
        for (int64_t s = 0; s < S; ++s) {
          const double l = *reinterpret_cast<const float*>(at(pl, {s, t, h}));
          if (l == -std::numeric_limits<double>::infinity()) continue;  // an empty partial weighs 0
          const double w = std::exp(l - m);  // <= 1: no overflow whatever the gap
          sum += w;
          const void* row = at(po, {s, t, h, 0});
          for (int64_t i = 0; i < D; ++i) acc[i] += w * LoadAsFloat(row, po.dtype, i * po.strides[3]);
          if (a.partial_entropy) mean_logit += w * (l - *reinterpret_cast<const float*>(at(*a.partial_entropy, {s, t, h})));
        }
      }
      const double inv = sum > 0.0 ? 1.0 / sum : 0.0;
      void* out = at(*a.out, {t, h, 0});
      for (int64_t i = 0; i < D; ++i) StoreFromFloat(out, a.out->dtype, i * a.out->strides[2], float(acc[i] * inv));
      const double lse = sum > 0.0 ? m + std::log(sum) : -std::numeric_limits<double>::infinity();
      if (a.lse) *reinterpret_cast<float*>(at(*a.lse, {t, h})) = static_cast<float>(lse);
      if (a.entropy)
        *reinterpret_cast<float*>(at(*a.entropy, {t, h})) =
            sum > 0.0 ? static_cast<float>(std::max(0.0, lse - mean_logit * inv)) : 0.0f;
    }
  });
}

}  // namespace kvplug::attn
