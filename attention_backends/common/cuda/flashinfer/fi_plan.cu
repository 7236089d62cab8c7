// Host side of the FlashInfer prefill path: FlashInfer's sm_90 scheduler (PrefillSM90Plan) run once
// per step from kvplug's plan, and the base-2 to natural lse conversion. A FlashInfer translation
// unit (its CCCL first in the include order), behind fi_prefill.h.
#include <cuda_runtime.h>

#include <flashinfer/attention/scheduler.cuh>

#include <algorithm>
#include <cstdio>
#include <exception>

#include "fi_prefill.h"

namespace kvplug::attn::cuda::fi {

bool DeviceSupported(int device_id) {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device_id) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device_id) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return major == 9 && minor == 0;
}

int64_t IntWorkspaceBytes(int64_t max_rows, int64_t max_requests, int32_t num_q_heads, int32_t num_sms) {
  // Per head at most ceil(rows / 128) + requests - 1 tiles (128-row CTA tiles, 192 for head 64);
  // seven arrays of one entry per (tile, head), the per-CTA work offsets, 16-byte alignment each.
  const int64_t works = int64_t{num_q_heads} * ((max_rows + 127) / 128 + std::max<int64_t>(max_requests, 1));
  return 7 * (works * 4 + 16) + (int64_t{std::max(num_sms, 1)} + 1) * 4 + 16 + 256;
}

int Plan(const PlanArgs& a, PlanInfo* out, char* error, int error_len) {
  auto fail = [&](const char* what) {
    if (error && error_len > 0) std::snprintf(error, size_t(error_len), "FlashInfer plan: %s", what);
    return -1;
  };
  if (a.num_requests <= 0 || !a.qo_indptr || !a.token_begin || !a.kv_page_offset || !a.kv_len || !a.int_ws ||
      !a.int_ws_host || !out)
    return fail("bad arguments");
  try {
    flashinfer::PrefillPlanSM90Info info;
    cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
    cudaError_t e = flashinfer::PrefillSM90Plan<int32_t>(
        /*float_buffer=*/nullptr, 0, a.int_ws, a.int_ws_host, size_t(a.int_ws_bytes), info,
        const_cast<int32_t*>(a.qo_indptr), const_cast<int32_t*>(a.kv_page_offset), const_cast<int32_t*>(a.kv_len),
        uint32_t(a.qo_indptr[a.num_requests]), uint32_t(a.num_requests), uint32_t(a.num_q_heads),
        uint32_t(a.num_kv_heads), uint32_t(a.head_size), uint32_t(a.head_size), uint32_t(a.page_size),
        /*causal=*/true, /*enable_cuda_graph=*/false, /*sizeof_dtype_o=*/2, stream);
    if (e != cudaSuccess) return fail(cudaGetErrorString(e));
    // The plan was given compact row offsets (FlashInfer's CSR); kvplug's requests sit anywhere in
    // the step's query rows, so each work's row offset becomes its request's first row. The upload
    // above staged the pageable buffer before returning (as kvplug's own step upload relies on), so
    // the host copy may be patched and the changed range sent again, behind it on the stream.
    const auto* works_of_cta = flashinfer::GetPtrFromBaseOffset<int32_t>(a.int_ws_host, info.work_indptr_offset);
    int num_sms = 0, device = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device);
    const int32_t total_works = works_of_cta[num_sms];
    auto* qo_offset = flashinfer::GetPtrFromBaseOffset<int32_t>(a.int_ws_host, info.qo_indptr_offset);
    const auto* batch = flashinfer::GetPtrFromBaseOffset<int32_t>(a.int_ws_host, info.batch_indices_offset);
    for (int32_t w = 0; w < total_works; ++w) qo_offset[w] = a.token_begin[batch[w]];
    e = cudaMemcpyAsync(static_cast<char*>(a.int_ws) + info.qo_indptr_offset, qo_offset,
                        size_t(total_works) * 4, cudaMemcpyHostToDevice, stream);
    if (e != cudaSuccess) return fail(cudaGetErrorString(e));
    const std::vector<int64_t> v = info.ToVector();
    for (int i = 0; i < kPlanInfoLen; ++i) out->info[i] = v[size_t(i)];
    out->same_schedule_for_all_heads = info.same_schedule_for_all_heads;
    return 0;
  } catch (const std::exception& ex) {
    return fail(ex.what());
  } catch (...) {
    return fail("unknown exception");
  }
}

namespace {
__global__ void LseToNaturalKernel(const float* __restrict__ src, float* dst, int64_t st, int64_t sh,
                                   const int32_t* __restrict__ tokens, int32_t num_tokens, int32_t num_heads) {
  const int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (i >= int64_t{num_tokens} * num_heads) return;
  const int64_t t = tokens[i / num_heads];
  const int64_t h = i % num_heads;
  dst[t * st + h * sh] = src[t * num_heads + h] * 0.69314718055994530942f;
}
}  // namespace

int LseToNatural(const float* src, float* dst, int64_t st, int64_t sh, const int32_t* tokens, int32_t num_tokens,
                 int32_t num_heads, void* stream) {
  const int64_t n = int64_t{num_tokens} * num_heads;
  if (n == 0) return 0;
  LseToNaturalKernel<<<unsigned((n + 255) / 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(
      src, dst, st, sh, tokens, num_tokens, num_heads);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace kvplug::attn::cuda::fi
