// `dense`: exact causal attention over the paged cache, the baseline every other backend is checked
// against. CPU implementation here; CUDA kernels join it under the same name.
#pragma once

#include "kvplug/attention/backend.h"

namespace kvplug::attn::dense {

BackendInfo Info();

// Exposed for tests and for other backends that reuse the exact path on the CPU.
absl::StatusOr<std::unique_ptr<AttentionBackend>> CreateCpu(const HeadConfig& heads,
                                                            const DenseConfig& config);

// CUDA kernels (only in builds with CUDA; elsewhere Info() does not advertise the device).
absl::StatusOr<std::unique_ptr<AttentionBackend>> CreateCuda(const HeadConfig& heads,
                                                             const DenseConfig& config);
// Device scratch the CUDA path wants in the context's workspace for these heads.
int64_t CudaWorkspaceBytes(const HeadConfig& heads);

}  // namespace kvplug::attn::dense
