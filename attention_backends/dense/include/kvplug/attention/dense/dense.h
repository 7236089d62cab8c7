// `dense`: exact causal attention over the paged cache (optionally windowed, optionally soft-capped),
// the baseline every other backend is checked against. It is the identity variant of the kernel
// family: the causal planner, the plain logit scale, out and lse (and entropy on request).
#pragma once

#include "kvplug/attention/backend.h"

namespace kvplug::attn::dense {

BackendInfo Info();

}  // namespace kvplug::attn::dense
