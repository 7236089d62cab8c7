// `entropy`: entropy-guided attention (arXiv 2501.03489) as a variant of the kernel family. The
// logits are q.k / (t[h, p] sqrt(d)) with a learned temperature per query head and absolute query
// position (a [num_q_heads, T] table; positions >= T use the last entry, the paper's open end), so
// the variant is the family's per-(head, position) scale table holding 1 / t. Attention is causal
// (the dense key sets). The attention entropy H = m + log l - u / l comes from the family's third
// online-softmax accumulator, merged across split-KV partials like the lse; the per-head summary
// (telemetry.h) is computed on the run's device. The released code has only the training
// regulariser; this follows the paper's attention mechanism.
#pragma once

#include "kvplug/attention/backend.h"

namespace kvplug::attn::entropy {

BackendInfo Info();

}  // namespace kvplug::attn::entropy
