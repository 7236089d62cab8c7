// Attention-entropy telemetry (entropy-guided attention, arXiv 2501.03489): a per-head summary of a
// run's per-row entropies, computed on the run's device from the engine's entropy output, so an
// engine can watch every layer without a synchronization per layer.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "kvplug/attention/key_sets.h"
#include "kvplug/kv_cache/tensor_view.h"

namespace kvplug::attn {

// summary[h] = {rows, mean H, informative rows, mean H / E_max, collapse rows, overload rows}:
// `rows` saw at least one key; E_max = log(keys seen); rows with >= 2 keys are informative (E_max
// > 0) and only they enter the normalised mean and the paper's bands: collapse H <= E_max / 4,
// overload H >= 3 E_max / 4. Means are 0 over no rows. Counts are exact in float up to 2^24 rows.
constexpr int32_t kEntropySummaryFields = 6;

// The number of keys each token of the batch sees under `keys` (its masks and position maps).
void CountVisibleKeys(const KeySets& keys, absl::Span<int32_t> out);

// entropy: [T, H] float32 (any strides); row_keys: [T] keys per row; summary: [H, 6] float32, rows
// contiguous. On the CPU, or launched on `stream` with device pointers.
void EntropySummaryCpu(const TensorView& entropy, const int32_t* row_keys, const TensorView& summary);
absl::Status EntropySummaryCuda(const TensorView& entropy, const int32_t* row_keys, const TensorView& summary,
                                void* stream);

}  // namespace kvplug::attn
