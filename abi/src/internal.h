// Shared by the ABI's translation units: error reporting, DLPack checks, config parsing, handles.
#pragma once

#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "kvplug/attention/backend.h"
#include "kvplug/attention/batch_plan.h"
#include "kvplug/attention/configs.h"
#include "kvplug/attention/step_work.h"
#include "kvplug/attention/thread_pool.h"
#include "kvplug/kv_cache/kv_cache.h"
#include "kvplug/kvplug.h"
#include "kvplug/paged_memory/block_manager.h"

struct kvp_context {
  // `exec` and `workspace` are mutable: the CUDA split-KV scratch is shared by every attention handle
  // of the context (they run in stream order) and grows, never shrinks, when an attention handle that
  // needs more is created (the header's thread rule for kvp_attention_create covers it).
  mutable kvplug::attn::ExecContext exec;
  std::unique_ptr<kvplug::attn::ThreadPool> pool;
  mutable std::unique_ptr<void, void (*)(void*)> workspace{nullptr, [](void*) {}};
};

struct kvp_block_manager {
  std::unique_ptr<kvplug::paged::BlockManager> manager;
};

struct kvp_kv_cache {
  const kvp_context* context = nullptr;
  std::unique_ptr<kvplug::kv::KvCache> cache;
  // Shapes and strides the layer views point into (device pages, then host pages).
  std::vector<std::array<int64_t, 5>> view_shapes;
  std::vector<std::array<int64_t, 5>> view_strides;
};

struct kvp_plan {
  kvp_plan(const kvp_context* ctx, const kvplug::attn::PlanCapacity& c) : context(ctx), plan(c) {}
  const kvp_context* context;
  kvplug::attn::BatchPlan plan;
  // Per-backend planning of each step (kvp_plan_attach). Mutable: a run on a plan its attention was
  // not attached to attaches it (the set guards itself with a mutex).
  mutable kvplug::attn::StepWorkSet steps;
};

struct kvp_attention {
  const kvp_context* context = nullptr;
  std::string backend;
  kvplug::attn::HeadConfig heads;
  std::unique_ptr<kvplug::attn::AttentionBackend> impl;
  std::string step_key;  // attn::StepKey(*impl, heads), once: run-time lookups never allocate
};

namespace kvplug::abi {

// Records `message` as this thread's last error, prefixed by the entry point's name.
kvp_status Fail(kvp_status status, std::string_view message);
// Maps an internal status; `exhausted` is the code ResourceExhausted stands for at this call site.
kvp_status FromStatus(const absl::Status& s, kvp_status exhausted = KVP_ERR_OUT_OF_MEMORY);

// Block-manager calls report pool exhaustion as KVP_ERR_NO_FREE_BLOCKS.
inline kvp_status BmStatus(const absl::Status& s) { return FromStatus(s, KVP_ERR_NO_FREE_BLOCKS); }

// Argument checks of every entry point (their message is formatted with fmt, included by the user).
#define KVP_REQUIRE(cond, ...)                                                      \
  do {                                                                              \
    if (!(cond)) return ::kvplug::abi::Fail(KVP_ERR_INVALID_ARGUMENT, fmt::format(__VA_ARGS__)); \
  } while (0)

#define KVP_RETURN_IF_ERROR(expr)                        \
  do {                                                   \
    if (kvp_status s_ = (expr); s_ != KVP_OK) return s_; \
  } while (0)

// Runs `body` with every exception caught and turned into a status; names the entry point.
template <class Body>
kvp_status Guard(const char* function, Body&& body) noexcept;

// Checks `t` and translates it. `name` names the argument in messages.
kvp_status ToTensorView(const DLTensor* t, const char* name, const kvp_context* context,
                        int32_t expected_ndim, TensorView* out);
// A writable tensor: no two elements at one address. Two tensors: their byte extents are disjoint.
kvp_status CheckWritable(const TensorView& v, const char* name);
kvp_status CheckDisjoint(const TensorView& a, const char* a_name, const TensorView& b, const char* b_name);
// A caller's cache layer (kv_axis: the K/V axis) overlaps neither itself nor K with V; no two layers
// share memory (layers with equal strides may interleave in one allocation).
kvp_status CheckCacheLayer(const TensorView& v, int kv_axis, const char* name);
kvp_status CheckCacheLayersDisjoint(const std::vector<TensorView>& layers);
kvp_status CheckSlotMapping(const DLTensor* t, int64_t num_tokens, const kvp_context* context,
                            const int64_t** out);

// Parses a config for `backend`; KVP_ERR_INVALID_CONFIG with the parser's message on failure.
kvp_status ParseConfig(std::string_view backend, int32_t format, const void* data, size_t size,
                       attn::BackendConfig* out);

// Options structs: copies the caller's struct (which may be an older, shorter version) over
// `defaults`. Rejects sizes smaller than the struct_size field or larger than this library knows.
template <class T>
kvp_status ReadOptions(const T* in, const char* name, T* out);
// Output structs: writes the fields the caller's struct_size has room for.
template <class T>
kvp_status WriteOutput(const T& value, T* out, const char* name);

// ---- implementation of the templates ----

void SetCurrentFunction(const char* function);

template <class Body>
kvp_status Guard(const char* function, Body&& body) noexcept {
  try {
    SetCurrentFunction(function);
    return body();
  } catch (const std::bad_alloc&) {
    return Fail(KVP_ERR_OUT_OF_MEMORY, "a host allocation failed");
  } catch (const std::exception& e) {
    return Fail(KVP_ERR_INTERNAL, std::string("unexpected exception: ") + e.what());
  } catch (...) {
    return Fail(KVP_ERR_INTERNAL, "unexpected non-standard exception");
  }
}

std::string SizeMessage(const char* name, size_t given, size_t known);

template <class T>
kvp_status ReadOptions(const T* in, const char* name, T* out) {
  if (!in) return Fail(KVP_ERR_INVALID_ARGUMENT, std::string(name) + " is NULL");
  if (in->struct_size < sizeof(size_t) || in->struct_size > sizeof(T))
    return Fail(in->struct_size > sizeof(T) ? KVP_ERR_NOT_SUPPORTED : KVP_ERR_INVALID_ARGUMENT,
                SizeMessage(name, in->struct_size, sizeof(T)));
  std::memcpy(static_cast<void*>(out), in, in->struct_size);
  out->struct_size = sizeof(T);
  return KVP_OK;
}

template <class T>
kvp_status WriteOutput(const T& value, T* out, const char* name) {
  if (!out) return Fail(KVP_ERR_INVALID_ARGUMENT, std::string(name) + " is NULL");
  const size_t size = out->struct_size;
  if (size < sizeof(size_t) || size > sizeof(T))
    return Fail(size > sizeof(T) ? KVP_ERR_NOT_SUPPORTED : KVP_ERR_INVALID_ARGUMENT,
                SizeMessage(name, size, sizeof(T)));
  std::memcpy(static_cast<void*>(out), &value, size);
  out->struct_size = size;
  return KVP_OK;
}

}  // namespace kvplug::abi
