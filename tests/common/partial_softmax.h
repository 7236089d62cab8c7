// The reference of partial attention states: softmax attention of one query row over the keys a
// predicate selects (a shard's part), in double: writes out_row [D] and returns the natural lse
// (-inf and zeros when the part is empty). Merging the parts must give the part of all keys.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

namespace kvplug::testing {

// logits [num_keys], values [num_keys, D] row-major.
template <class InPart>
double PartialSoftmax(const double* logits, const double* values, int num_keys, int D, InPart in_part,
                      double* out_row) {
  const double kInf = std::numeric_limits<double>::infinity();
  double m = -kInf;
  for (int j = 0; j < num_keys; ++j)
    if (in_part(j)) m = std::max(m, logits[j]);
  if (m == -kInf) {
    std::fill(out_row, out_row + D, 0.0);
    return -kInf;
  }
  double sum = 0.0;
  for (int j = 0; j < num_keys; ++j)
    if (in_part(j)) sum += std::exp(logits[j] - m);
  const double lse = m + std::log(sum);
  for (int d = 0; d < D; ++d) {
    double acc = 0.0;
    for (int j = 0; j < num_keys; ++j)
      if (in_part(j)) acc += std::exp(logits[j] - lse) * values[j * D + d];
    out_row[d] = acc;
  }
  return lse;
}

}  // namespace kvplug::testing
