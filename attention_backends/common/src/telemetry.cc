#include "kvplug/attention/telemetry.h"

#include <algorithm>
#include <cmath>

#include "fmt/format.h"
#include "kvplug/kv_cache/cuda_kernels.h"

namespace kvplug::attn {

void CountVisibleKeys(const KeySets& keys, absl::Span<int32_t> out) {
  std::fill(out.begin(), out.end(), 0);
  const auto pos_map = keys.pos_map();
  for (const QuerySpan& s : keys.spans()) {
    for (int32_t t = s.token_begin; t < s.token_end && size_t(t) < out.size(); ++t) {
      const int64_t q = int64_t{s.pos_begin} + (t - s.token_begin);
      int64_t n = 0;
      for (int32_t i = s.segment_begin; i < s.segment_end; ++i) {
        const KeySegment& g = keys.segments()[i];
        // Visible: lag_min <= q - p <= lag_max, i.e. p in [q - lag_max, q - lag_min].
        const int64_t lo = q - int64_t{g.lag_max}, hi = q - int64_t{g.lag_min};
        if (g.pos_map >= 0) {
          const int32_t* m = pos_map.data() + g.pos_map;
          const int32_t len = g.key_end - g.key_begin;
          n += std::upper_bound(m, m + len, hi) - std::lower_bound(m, m + len, lo);
        } else {
          const int64_t j0 = std::max<int64_t>(g.key_begin, lo - g.pos_base);
          const int64_t j1 = std::min<int64_t>(int64_t{g.key_end} - 1, hi - g.pos_base);
          n += std::max<int64_t>(0, j1 - j0 + 1);
        }
      }
      out[t] = static_cast<int32_t>(std::min<int64_t>(n, INT32_MAX));
    }
  }
}

void EntropySummaryCpu(const TensorView& entropy, const int32_t* row_keys, const TensorView& summary) {
  const int64_t rows = entropy.shape[0], heads = entropy.shape[1];
  for (int64_t h = 0; h < heads; ++h) {
    double n = 0, sum = 0, informative = 0, sum_norm = 0, collapse = 0, overload = 0;
    for (int64_t t = 0; t < rows; ++t) {
      const int32_t keys = row_keys[t];
      if (keys <= 0) continue;
      const double e = *static_cast<const float*>(entropy.At(t, h));
      n += 1;
      sum += e;
      if (keys < 2) continue;
      const double e_max = std::log(double(keys));
      informative += 1;
      sum_norm += e / e_max;
      collapse += e <= e_max / 4;
      overload += e >= 3 * e_max / 4;
    }
    float* s = static_cast<float*>(summary.At(h, 0));
    s[0] = float(n);
    s[1] = n > 0 ? float(sum / n) : 0.f;
    s[2] = float(informative);
    s[3] = informative > 0 ? float(sum_norm / informative) : 0.f;
    s[4] = float(collapse);
    s[5] = float(overload);
  }
}

#ifdef KVP_HAVE_CUDA
namespace cuda {
int LaunchEntropySummary(const float* entropy, int64_t stride_t, int64_t stride_h, const int32_t* row_keys,
                         int64_t rows, int64_t heads, float* summary, void* stream);
}  // namespace cuda

absl::Status EntropySummaryCuda(const TensorView& entropy, const int32_t* row_keys, const TensorView& summary,
                                void* stream) {
  const int e = cuda::LaunchEntropySummary(static_cast<const float*>(entropy.data), entropy.strides[0],
                                           entropy.strides[1], row_keys, entropy.shape[0], entropy.shape[1],
                                           static_cast<float*>(summary.data), stream);
  if (e != 0) return absl::UnavailableError(fmt::format("entropy summary launch failed: {}", kv::cuda::ErrorString(e)));
  return absl::OkStatus();
}
#else
absl::Status EntropySummaryCuda(const TensorView&, const int32_t*, const TensorView&, void*) {
  return absl::UnimplementedError("this library was built without CUDA");
}
#endif

}  // namespace kvplug::attn
