// The reference every attention path is checked against: causal attention over contiguous K/V of
// one sequence, in double precision, written as plainly as possible.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace kvplug::testing {

struct NaiveParams {
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int head_size = 0;
  double sm_scale = 0;
  int window_left = -1;        // < 0: unbounded
  double logits_soft_cap = 0;  // 0: off
};

// k, v: [seq_len][num_kv_heads][head_size]; q: [q_len][num_q_heads][head_size], the last q_len
// positions of the sequence. Writes out [q_len][num_q_heads][head_size] and lse [q_len][num_q_heads].
inline void NaiveAttention(const NaiveParams& p, int seq_len, int q_len, const std::vector<double>& q,
                           const std::vector<double>& k, const std::vector<double>& v, std::vector<double>* out,
                           std::vector<double>* lse) {
  const int d = p.head_size;
  const int group = p.num_q_heads / p.num_kv_heads;
  out->assign(static_cast<size_t>(q_len) * p.num_q_heads * d, 0.0);
  lse->assign(static_cast<size_t>(q_len) * p.num_q_heads, 0.0);
  for (int i = 0; i < q_len; ++i) {
    const int pos = seq_len - q_len + i;
    const int lo = p.window_left >= 0 ? std::max(0, pos - p.window_left) : 0;
    for (int h = 0; h < p.num_q_heads; ++h) {
      const int g = h / group;
      std::vector<double> logits;
      for (int j = lo; j <= pos; ++j) {
        double dot = 0;
        for (int x = 0; x < d; ++x)
          dot += q[(static_cast<size_t>(i) * p.num_q_heads + h) * d + x] *
                 k[(static_cast<size_t>(j) * p.num_kv_heads + g) * d + x];
        double s = dot * p.sm_scale;
        if (p.logits_soft_cap > 0) s = p.logits_soft_cap * std::tanh(s / p.logits_soft_cap);
        logits.push_back(s);
      }
      const double m = *std::max_element(logits.begin(), logits.end());
      double sum = 0;
      for (double s : logits) sum += std::exp(s - m);
      for (int j = lo; j <= pos; ++j) {
        const double w = std::exp(logits[j - lo] - m) / sum;
        for (int x = 0; x < d; ++x)
          (*out)[(static_cast<size_t>(i) * p.num_q_heads + h) * d + x] +=
              w * v[(static_cast<size_t>(j) * p.num_kv_heads + g) * d + x];
      }
      (*lse)[static_cast<size_t>(i) * p.num_q_heads + h] = m + std::log(sum);
    }
  }
}

}  // namespace kvplug::testing
