// kvplug's own interface to FlashInfer's sm_90 (FA3-style) paged prefill. Plain C++17 with no CUDA
// or FlashInfer types: engine_cuda.cc (C++20, g++) includes it, and only the translation units in
// this folder include FlashInfer's headers (with the CCCL that FlashInfer pins first in their
// include order), so the toolkit's CCCL and FlashInfer's never meet in one TU.
//
// What it computes: bottom-right-aligned causal attention of each request's queries over its key
// list (query i of a request with qo_len queries and kv_len keys sees keys 0 .. kv_len - qo_len + i),
// a scalar softmax scale, no soft cap; fp16 or bf16 throughout. kvplug's engine maps the key sets it
// can run exactly onto this (engine_cuda.cc: FlashInferEligible) and runs everything else itself.
#pragma once

#include <cstdint>

namespace kvplug::attn::cuda::fi {

constexpr int kPlanInfoLen = 9;  // FlashInfer's PrefillPlanSM90Info::ToVector()

// Whether `device_id` can run the sm_90a kernels (compute capability 9.0).
bool DeviceSupported(int device_id);

// Bytes of the integer workspace a plan needs for at most `max_rows` query rows in at most
// `max_requests` requests (FlashInfer's per-head work lists plus alignment).
int64_t IntWorkspaceBytes(int64_t max_rows, int64_t max_requests, int32_t num_q_heads, int32_t num_sms);

struct PlanArgs {
  int32_t num_requests = 0;
  const int32_t* qo_indptr = nullptr;       // host [num_requests + 1]: compact row offsets (lengths)
  const int32_t* token_begin = nullptr;     // host [num_requests]: the request's first row in q / out
  const int32_t* kv_page_offset = nullptr;  // host [num_requests]: its first page in kv_indices
  const int32_t* kv_len = nullptr;          // host [num_requests]: keys (>= its query count)
  int32_t num_q_heads = 0, num_kv_heads = 0, head_size = 0, page_size = 0;
  void* int_ws = nullptr;       // device, IntWorkspaceBytes
  void* int_ws_host = nullptr;  // host (pageable) staging of the same size
  int64_t int_ws_bytes = 0;
  void* stream = nullptr;
};

struct PlanInfo {
  int64_t info[kPlanInfoLen] = {};
  bool same_schedule_for_all_heads = false;  // not compiled in: the engine falls back when set
};

// Runs FlashInfer's scheduler on the host (PrefillSM90Plan) and queues the work lists' upload on
// `stream`. Returns 0, or a non-zero code with a message in *error (no exceptions escape).
int Plan(const PlanArgs& args, PlanInfo* info, char* error, int error_len);

struct RunArgs {
  const void* q = nullptr;  // [nnz_qo, num_q_heads, head_size], element strides below
  int64_t q_stride_n = 0, q_stride_h = 0, nnz_qo = 0;
  void* o = nullptr;
  int64_t o_stride_n = 0, o_stride_h = 0;
  float* lse = nullptr;  // optional, contiguous [nnz_qo, num_q_heads], base 2 (FlashInfer's)
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t stride_block = 0, stride_pos = 0, stride_head = 0;  // of K and V pages, elements
  const int32_t* kv_indices = nullptr;                        // device page ids
  int32_t num_q_heads = 0, num_kv_heads = 0, page_size = 0;
  float sm_scale = 1.0f;
  void* int_ws = nullptr;
  const PlanInfo* plan = nullptr;
};

// One generated TU per (dtype, head size) defines Run_<dtype>_d<head>; FindRun (fi_instances.h)
// picks it. Returns a cudaError_t value (0 = success), -1 on a bad argument.
using RunFn = int (*)(const RunArgs&, void* stream);

// dst[t, h] = src[t * num_heads + h] * ln 2 for the rows tokens[0 .. num_tokens) (FlashInfer's
// base-2 lse to kvplug's natural log; src may alias dst when dst is contiguous).
int LseToNatural(const float* src, float* dst, int64_t dst_stride_token, int64_t dst_stride_head,
                 const int32_t* tokens, int32_t num_tokens, int32_t num_heads, void* stream);

}  // namespace kvplug::attn::cuda::fi
