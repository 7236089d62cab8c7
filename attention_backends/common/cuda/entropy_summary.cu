// The entropy telemetry summary on the GPU: one CTA per head reduces the run's rows (telemetry.h).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace kvplug::attn::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kEntropySummaryFields = 6;  // telemetry.h

__global__ void EntropySummaryKernel(const float* entropy, int64_t stride_t, int64_t stride_h, const int32_t* row_keys,
                                     int64_t rows, float* summary) {
  const int64_t h = blockIdx.x;
  float acc[kEntropySummaryFields] = {0, 0, 0, 0, 0, 0};
  for (int64_t t = threadIdx.x; t < rows; t += kThreads) {
    const int32_t keys = row_keys[t];
    if (keys <= 0) continue;
    const float e = entropy[t * stride_t + h * stride_h];
    acc[0] += 1.f;
    acc[1] += e;
    if (keys < 2) continue;
    const float e_max = logf(float(keys));
    acc[2] += 1.f;
    acc[3] += e / e_max;
    acc[4] += e <= 0.25f * e_max ? 1.f : 0.f;
    acc[5] += e >= 0.75f * e_max ? 1.f : 0.f;
  }
  __shared__ float partial[kEntropySummaryFields][kThreads / 32];
  for (int f = 0; f < kEntropySummaryFields; ++f) {
    float v = acc[f];
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffff, v, o);
    if (threadIdx.x % 32 == 0) partial[f][threadIdx.x / 32] = v;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float s[kEntropySummaryFields];
    for (int f = 0; f < kEntropySummaryFields; ++f) {
      s[f] = 0.f;
      for (int w = 0; w < kThreads / 32; ++w) s[f] += partial[f][w];
    }
    float* out = summary + h * kEntropySummaryFields;
    out[0] = s[0];
    out[1] = s[0] > 0.f ? s[1] / s[0] : 0.f;
    out[2] = s[2];
    out[3] = s[2] > 0.f ? s[3] / s[2] : 0.f;
    out[4] = s[4];
    out[5] = s[5];
  }
}

}  // namespace

int LaunchEntropySummary(const float* entropy, int64_t stride_t, int64_t stride_h, const int32_t* row_keys,
                         int64_t rows, int64_t heads, float* summary, void* stream) {
  if (heads == 0) return 0;
  EntropySummaryKernel<<<static_cast<unsigned>(heads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      entropy, stride_t, stride_h, row_keys, rows, summary);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace kvplug::attn::cuda
