// The extern "C" entry points: each checks its arguments, translates them once into plain C++ and
// calls the layer below. Nothing below this file sees a C struct or a DLTensor.
#include <cmath>
#include <new>
#include <string>
#include <system_error>

#include "fmt/format.h"
#include "internal.h"
#include "kvplug/attention/cpu_engine.h"
#include "kvplug/attention/engine.h"
#include "kvplug/kv_cache/cuda_kernels.h"
#include "kvplug/kv_cache/device.h"

using kvplug::DType;
using kvplug::Device;
using kvplug::TensorView;
using namespace kvplug::abi;
namespace attn = kvplug::attn;
namespace kv = kvplug::kv;
namespace paged = kvplug::paged;

namespace {


kvp_status CheckDType(int32_t dtype, const char* name) {
  KVP_REQUIRE(dtype >= 0 && dtype <= KVP_DTYPE_FP8_E4M3, "{}={} is not a kvp_dtype (0..3)", name, dtype);
  return KVP_OK;
}

}  // namespace

extern "C" {

KVP_API uint32_t kvp_abi_version(void) { return KVP_ABI_VERSION_NUMBER; }

KVP_API const char* kvp_version_string(void) {
#define KVP_STR2(x) #x
#define KVP_STR(x) KVP_STR2(x)
  // The CPU engine's instruction set is chosen at run time, so the string is made once, here.
  try {
    static const std::string version = fmt::format(
        "{} simd={}",
        KVP_STR(KVP_ABI_VERSION_MAJOR) "." KVP_STR(KVP_ABI_VERSION_MINOR) "." KVP_STR(
            KVP_ABI_VERSION_PATCH) " (" KVP_FLAVOUR ")",
        attn::CpuEngineIsa());
    return version.c_str();
  } catch (...) {
    return KVP_STR(KVP_ABI_VERSION_MAJOR) "." KVP_STR(KVP_ABI_VERSION_MINOR) "." KVP_STR(
        KVP_ABI_VERSION_PATCH) " (" KVP_FLAVOUR ")";
  }
}

/* ---------------------------------------------------------------- capabilities */

KVP_API kvp_status kvp_backend_count(int32_t* out_count) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(out_count, "out_count is NULL");
    *out_count = static_cast<int32_t>(attn::Backends().size());
    return KVP_OK;
  });
}

KVP_API kvp_status kvp_backend_name(int32_t index, const char** out_name) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(out_name, "out_name is NULL");
    const auto backends = attn::Backends();
    if (index < 0 || index >= static_cast<int32_t>(backends.size()))
      return Fail(KVP_ERR_OUT_OF_RANGE, fmt::format("index={} out of range [0, {})", index, backends.size()));
    *out_name = backends[index].name.data();  // names are string literals: NUL-terminated
    return KVP_OK;
  });
}

KVP_API kvp_status kvp_backend_info_get(const char* name, kvp_backend_info* out_info) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(name, "name is NULL");
    const attn::BackendInfo* info = attn::FindBackend(name);
    if (!info) return Fail(KVP_ERR_NOT_FOUND, fmt::format("no backend named '{}'", name));
    kvp_backend_info v{};
    v.struct_size = sizeof(v);
    v.name = info->name.data();
    v.dtype_mask = info->dtype_mask();
    v.device_mask = info->device_mask();
    v.head_sizes = info->cpu.head_sizes.data();
    v.num_head_sizes = static_cast<int32_t>(info->cpu.head_sizes.size());
    v.supports_lse = info->supports_lse;
    v.needs_state_slots = info->needs_state_slots;
    return WriteOutput(v, out_info, "out_info");
  });
}

KVP_API kvp_status kvp_backend_device_info_get(const char* name, int32_t device_type,
                                               kvp_backend_device_info* out_info) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(name, "name is NULL");
    KVP_REQUIRE(device_type == kDLCPU || device_type == kDLCUDA,
                "device_type={} is not kDLCPU (1) or kDLCUDA (2)", device_type);
    const attn::BackendInfo* info = attn::FindBackend(name);
    if (!info) return Fail(KVP_ERR_NOT_FOUND, fmt::format("no backend named '{}'", name));
    const attn::DeviceCaps* caps = info->caps(static_cast<Device>(device_type));
    kvp_backend_device_info v{};
    v.struct_size = sizeof(v);
    v.device_type = device_type;
    v.available = caps != nullptr;
    if (caps) {
      v.dtype_mask = caps->dtype_mask;
      v.head_sizes = caps->head_sizes.data();
      v.num_head_sizes = static_cast<int32_t>(caps->head_sizes.size());
    }
    v.supports_lse = info->supports_lse;
    v.supports_entropy = info->supports_entropy;
    v.needs_state_slots = info->needs_state_slots;
    v.experimental = info->experimental;
    return WriteOutput(v, out_info, "out_info");
  });
}

/* ---------------------------------------------------------------- context */

KVP_API kvp_status kvp_context_create(const kvp_context_options* options, kvp_context** out_context) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(out_context, "out_context is NULL");
    kvp_context_options o{};
    o.struct_size = sizeof(o);
    if (options) KVP_RETURN_IF_ERROR(ReadOptions(options, "options", &o));
    if (o.device_type == 0) o.device_type = kDLCPU;
    KVP_REQUIRE(o.num_threads >= 0 && o.num_threads <= 256, "num_threads={} must be in [0, 256]", o.num_threads);
    auto ctx = std::make_unique<kvp_context>();
    if (o.device_type == kDLCPU) {
      KVP_REQUIRE(o.device_id == 0, "device_id={} must be 0 for the CPU", o.device_id);
      ctx->exec.device = Device::kCpu;
    } else if (o.device_type == kDLCUDA) {
      if (!kv::BuiltWithCuda())
        return Fail(KVP_ERR_NOT_SUPPORTED, "device_type=kDLCUDA but this library was built without CUDA");
      const int32_t count = kv::CudaDeviceCount();
      if (o.device_id < 0 || o.device_id >= count)
        return Fail(KVP_ERR_OUT_OF_RANGE, fmt::format("CUDA device_id={} but {} devices are visible", o.device_id, count));
      ctx->exec.device = Device::kCuda;
      ctx->exec.device_id = o.device_id;
      ctx->exec.stream = o.stream;
    } else {
      return Fail(KVP_ERR_NOT_SUPPORTED,
                  fmt::format("device_type={} is not kDLCPU (1) or kDLCUDA (2)", o.device_type));
    }
    try {
      ctx->pool = std::make_unique<attn::ThreadPool>(o.device_type == kDLCPU ? o.num_threads : 1);
    } catch (const std::system_error& e) {
      return Fail(KVP_ERR_OUT_OF_MEMORY, fmt::format("starting the CPU worker threads failed: {}", e.what()));
    }
    if (ctx->exec.device == Device::kCuda) ctx->exec.num_sms = kv::CudaSmCount(o.device_id);
    ctx->exec.pool = ctx->pool.get();
    *out_context = ctx.release();
    return KVP_OK;
  });
}

KVP_API void kvp_context_destroy(kvp_context* context) { delete context; }

KVP_API kvp_status kvp_context_set_stream(kvp_context* context, void* stream) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(context, "context is NULL");
    context->exec.stream = stream;
    return KVP_OK;
  });
}

/* ---------------------------------------------------------------- block manager */

KVP_API kvp_status kvp_block_manager_create(const kvp_block_manager_options* options,
                                            kvp_block_manager** out_manager) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(out_manager, "out_manager is NULL");
    kvp_block_manager_options o{};
    KVP_RETURN_IF_ERROR(ReadOptions(options, "options", &o));
    KVP_REQUIRE(o.enable_prefix_caching == 0 || o.enable_prefix_caching == 1,
                "enable_prefix_caching={} must be 0 or 1", o.enable_prefix_caching);
    paged::BlockManagerOptions p;
    p.block_size = o.block_size;
    p.num_device_blocks = o.num_device_blocks;
    p.num_host_blocks = o.num_host_blocks;
    p.enable_prefix_caching = o.enable_prefix_caching != 0;
    p.watermark = o.watermark;
    p.num_state_slots = o.num_state_slots;
    p.hash_seed = o.hash_seed;
    auto made = paged::BlockManager::Create(p);
    if (!made.ok()) return FromStatus(made.status());
    auto handle = std::make_unique<kvp_block_manager>();
    handle->manager = std::move(*made);
    *out_manager = handle.release();
    return KVP_OK;
  });
}

KVP_API void kvp_block_manager_destroy(kvp_block_manager* manager) { delete manager; }

extern "C++" {
namespace {
// Token ids are optional only when prefix caching is off (nothing needs them then).
kvp_status TokenSpan(const kvp_block_manager* m, const int32_t* ids, int64_t n, bool required_for_cache,
                     absl::Span<const int32_t>* out) {
  KVP_REQUIRE(n >= 0 && n <= (int64_t{1} << 31), "num_tokens={} must be in [0, 2^31]", n);
  if (!ids) {
    KVP_REQUIRE(!(required_for_cache && m->manager->options().enable_prefix_caching),
                "token_ids is NULL but prefix caching is on (num_tokens={})", n);
    *out = {};
    return KVP_OK;
  }
  *out = absl::Span<const int32_t>(ids, static_cast<size_t>(n));
  return KVP_OK;
}
}  // namespace
}  // extern "C++"

KVP_API kvp_status kvp_block_manager_can_allocate(const kvp_block_manager* manager, const int32_t* token_ids,
                                                  int64_t num_tokens, uint64_t extra_key,
                                                  kvp_alloc_verdict* out_verdict) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(manager, "manager is NULL");
    KVP_REQUIRE(out_verdict, "out_verdict is NULL");
    absl::Span<const int32_t> ids;
    KVP_RETURN_IF_ERROR(TokenSpan(manager, token_ids, num_tokens, false, &ids));
    *out_verdict = static_cast<kvp_alloc_verdict>(manager->manager->CanAllocate(ids, num_tokens, extra_key));
    return KVP_OK;
  });
}

KVP_API kvp_status kvp_block_manager_allocate(kvp_block_manager* manager, uint64_t seq_id, const int32_t* token_ids,
                                              int64_t num_tokens, uint64_t extra_key,
                                              int64_t* out_num_cached_tokens) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(manager, "manager is NULL");
    KVP_REQUIRE(num_tokens >= 1, "num_tokens={} must be >= 1", num_tokens);
    KVP_REQUIRE(token_ids || !manager->manager->options().enable_prefix_caching,
                "token_ids is NULL but prefix caching is on");
    // Without prefix caching the ids are not needed: stand in zeros (never read for hashing).
    std::vector<int32_t> zeros;
    absl::Span<const int32_t> ids;
    if (token_ids) {
      KVP_RETURN_IF_ERROR(TokenSpan(manager, token_ids, num_tokens, true, &ids));
    } else {
      KVP_REQUIRE(num_tokens <= (int64_t{1} << 31), "num_tokens={} too large", num_tokens);
      zeros.assign(static_cast<size_t>(num_tokens), 0);
      ids = zeros;
    }
    auto cached = manager->manager->Allocate(seq_id, ids, extra_key);
    if (!cached.ok()) return BmStatus(cached.status());
    if (out_num_cached_tokens) *out_num_cached_tokens = *cached;
    return KVP_OK;
  });
}

KVP_API kvp_status kvp_block_manager_can_append(const kvp_block_manager* manager, uint64_t seq_id,
                                                int64_t num_tokens, int32_t* out_can_append) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(manager, "manager is NULL");
    KVP_REQUIRE(out_can_append, "out_can_append is NULL");
    KVP_REQUIRE(num_tokens >= 1, "num_tokens={} must be >= 1", num_tokens);
    auto can = manager->manager->CanAppend(seq_id, num_tokens);
    if (!can.ok()) return BmStatus(can.status());
    *out_can_append = *can ? 1 : 0;
    return KVP_OK;
  });
}

KVP_API kvp_status kvp_block_manager_append(kvp_block_manager* manager, uint64_t seq_id, const int32_t* token_ids,
                                            int64_t num_tokens, kvp_block_copy* out_copy,
                                            int32_t* out_copy_needed) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(manager, "manager is NULL");
    KVP_REQUIRE(out_copy && out_copy_needed, "out_copy and out_copy_needed are required");
    KVP_REQUIRE(num_tokens >= 1, "num_tokens={} must be >= 1", num_tokens);
    absl::Span<const int32_t> ids;
    KVP_RETURN_IF_ERROR(TokenSpan(manager, token_ids, num_tokens, true, &ids));
    auto copy = manager->manager->Append(seq_id, ids, num_tokens);
    if (!copy.ok()) return BmStatus(copy.status());
    *out_copy_needed = copy->has_value() ? 1 : 0;
    if (copy->has_value()) *out_copy = kvp_block_copy{(*copy)->src, (*copy)->dst};
    return KVP_OK;
  });
}

KVP_API kvp_status kvp_block_manager_mark_computed(kvp_block_manager* manager, uint64_t seq_id,
                                                   int64_t num_computed_tokens) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(manager, "manager is NULL");
    return BmStatus(manager->manager->MarkComputed(seq_id, num_computed_tokens));
  });
}

KVP_API kvp_status kvp_block_manager_fork(kvp_block_manager* manager, uint64_t parent_id, uint64_t child_id) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(manager, "manager is NULL");
    return BmStatus(manager->manager->Fork(parent_id, child_id));
  });
}

KVP_API kvp_status kvp_block_manager_free(kvp_block_manager* manager, uint64_t seq_id) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(manager, "manager is NULL");
    return BmStatus(manager->manager->Free(seq_id));
  });
}

KVP_API kvp_status kvp_block_manager_num_tokens(const kvp_block_manager* manager, uint64_t seq_id,
                                                int64_t* out_num_tokens) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(manager && out_num_tokens, "manager and out_num_tokens are required");
    auto n = manager->manager->NumTokens(seq_id);
    if (!n.ok()) return BmStatus(n.status());
    *out_num_tokens = *n;
    return KVP_OK;
  });
}

KVP_API kvp_status kvp_block_manager_block_table(const kvp_block_manager* manager, uint64_t seq_id,
                                                 int32_t* out_blocks, int32_t capacity, int32_t* out_num_blocks) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(manager && out_num_blocks, "manager and out_num_blocks are required");
    KVP_REQUIRE(capacity >= 0 && (out_blocks || capacity == 0), "out_blocks is NULL with capacity={}", capacity);
    auto table = manager->manager->BlockTable(seq_id);
    if (!table.ok()) return BmStatus(table.status());
    const auto n = static_cast<int32_t>(table->size());
    if (n > capacity) {
      *out_num_blocks = n;
      return Fail(KVP_ERR_OUT_OF_RANGE, fmt::format("seq {} has {} blocks but capacity={}", seq_id, n, capacity));
    }
    std::copy(table->begin(), table->end(), out_blocks);
    *out_num_blocks = n;
    return KVP_OK;
  });
}

KVP_API kvp_status kvp_block_manager_block_tables(const kvp_block_manager* manager, const uint64_t* seq_ids,
                                                  int32_t num_seqs, int32_t* out_table, int32_t max_blocks_per_seq,
                                                  int32_t* out_seq_lens) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(manager && seq_ids && out_table, "manager, seq_ids and out_table are required");
    KVP_REQUIRE(num_seqs >= 0 && max_blocks_per_seq > 0, "num_seqs={} must be >= 0, max_blocks_per_seq={} > 0",
                num_seqs, max_blocks_per_seq);
    // Check everything first so a failure writes nothing.
    for (int32_t i = 0; i < num_seqs; ++i) {
      auto table = manager->manager->BlockTable(seq_ids[i]);
      if (!table.ok()) return BmStatus(table.status());
      if (static_cast<int64_t>(table->size()) > max_blocks_per_seq)
        return Fail(KVP_ERR_OUT_OF_RANGE, fmt::format("seq_ids[{}]={} has {} blocks > max_blocks_per_seq={}", i,
                                                      seq_ids[i], table->size(), max_blocks_per_seq));
    }
    for (int32_t i = 0; i < num_seqs; ++i) {
      auto table = *manager->manager->BlockTable(seq_ids[i]);
      int32_t* row = out_table + static_cast<int64_t>(i) * max_blocks_per_seq;
      std::copy(table.begin(), table.end(), row);
      std::fill(row + table.size(), row + max_blocks_per_seq, -1);
      if (out_seq_lens) out_seq_lens[i] = static_cast<int32_t>(*manager->manager->NumTokens(seq_ids[i]));
    }
    return KVP_OK;
  });
}

KVP_API kvp_status kvp_block_manager_slot_mapping(const kvp_block_manager* manager, uint64_t seq_id, int64_t start,
                                                  int64_t count, int64_t* out_slots) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(manager, "manager is NULL");
    KVP_REQUIRE(out_slots || count == 0, "out_slots is NULL with count={}", count);
    KVP_REQUIRE(count >= 0 && count <= (int64_t{1} << 31), "count={} must be in [0, 2^31]", count);
    return BmStatus(manager->manager->SlotMapping(seq_id, start, count,
                                                  absl::Span<int64_t>(out_slots, static_cast<size_t>(count))));
  });
}

KVP_API kvp_status kvp_block_manager_state_slot(const kvp_block_manager* manager, uint64_t seq_id,
                                                int32_t* out_slot) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(manager && out_slot, "manager and out_slot are required");
    auto slot = manager->manager->StateSlot(seq_id);
    if (!slot.ok()) return BmStatus(slot.status());
    *out_slot = *slot;
    return KVP_OK;
  });
}

extern "C++" {
namespace {
template <class Swap>
kvp_status DoSwap(kvp_block_manager* manager, uint64_t seq_id, kvp_block_copy* out_plan, int32_t capacity,
                  int32_t* out_num_copies, Swap swap) {
  KVP_REQUIRE(manager && out_num_copies, "manager and out_num_copies are required");
  KVP_REQUIRE(capacity >= 0 && (out_plan || capacity == 0), "out_plan is NULL with capacity={}", capacity);
  auto n = manager->manager->NumBlocks(seq_id);
  if (!n.ok()) return BmStatus(n.status());
  if (*n > capacity) {
    *out_num_copies = *n;
    return Fail(KVP_ERR_OUT_OF_RANGE, fmt::format("seq {} needs a plan of {} copies but capacity={}", seq_id, *n,
                                                  capacity));
  }
  auto plan = swap(seq_id);
  if (!plan.ok()) return BmStatus(plan.status());
  for (size_t i = 0; i < plan->size(); ++i) out_plan[i] = kvp_block_copy{(*plan)[i].src, (*plan)[i].dst};
  *out_num_copies = static_cast<int32_t>(plan->size());
  return KVP_OK;
}
}  // namespace
}  // extern "C++"

KVP_API kvp_status kvp_block_manager_swap_out(kvp_block_manager* manager, uint64_t seq_id, kvp_block_copy* out_plan,
                                              int32_t capacity, int32_t* out_num_copies) {
  return Guard(__func__, [&] {
    return DoSwap(manager, seq_id, out_plan, capacity, out_num_copies,
                  [&](uint64_t id) { return manager->manager->SwapOut(id); });
  });
}

KVP_API kvp_status kvp_block_manager_swap_in(kvp_block_manager* manager, uint64_t seq_id, kvp_block_copy* out_plan,
                                             int32_t capacity, int32_t* out_num_copies) {
  return Guard(__func__, [&] {
    return DoSwap(manager, seq_id, out_plan, capacity, out_num_copies,
                  [&](uint64_t id) { return manager->manager->SwapIn(id); });
  });
}

KVP_API kvp_status kvp_block_manager_is_swapped(const kvp_block_manager* manager, uint64_t seq_id,
                                                int32_t* out_is_swapped) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(manager && out_is_swapped, "manager and out_is_swapped are required");
    auto swapped = manager->manager->IsSwapped(seq_id);
    if (!swapped.ok()) return BmStatus(swapped.status());
    *out_is_swapped = *swapped ? 1 : 0;
    return KVP_OK;
  });
}

KVP_API kvp_status kvp_block_manager_stats_get(const kvp_block_manager* manager, kvp_block_manager_stats* out_stats) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(manager, "manager is NULL");
    const paged::BlockManagerStats s = manager->manager->Stats();
    kvp_block_manager_stats v{};
    v.struct_size = sizeof(v);
    v.num_device_blocks = s.num_device_blocks;
    v.num_free_blocks = s.num_free_blocks;
    v.num_cached_free_blocks = s.num_cached_free_blocks;
    v.num_used_blocks = s.num_used_blocks;
    v.num_host_blocks = s.num_host_blocks;
    v.num_free_host_blocks = s.num_free_host_blocks;
    v.num_sequences = s.num_sequences;
    v.num_swapped_sequences = s.num_swapped_sequences;
    v.prefix_queried_blocks = s.prefix_queried_blocks;
    v.prefix_hit_blocks = s.prefix_hit_blocks;
    v.num_evictions = s.num_evictions;
    return WriteOutput(v, out_stats, "out_stats");
  });
}

/* ---------------------------------------------------------------- KV cache */

extern "C++" {
namespace {

kvp_status ToCacheOptions(const kvp_context* context, const kvp_kv_cache_options* options, kv::KvCacheOptions* out) {
  kvp_kv_cache_options o{};
  KVP_RETURN_IF_ERROR(ReadOptions(options, "options", &o));
  KVP_RETURN_IF_ERROR(CheckDType(o.dtype, "dtype"));
  KVP_REQUIRE(o.layout == KVP_LAYOUT_KV_FIRST || o.layout == KVP_LAYOUT_BLOCK_FIRST,
              "layout={} is not a kvp_kv_layout (0, 1)", o.layout);
  out->num_layers = o.num_layers;
  out->num_blocks = o.num_blocks;
  out->block_size = o.block_size;
  out->num_kv_heads = o.num_kv_heads;
  out->head_size = o.head_size;
  out->dtype = static_cast<DType>(o.dtype);
  out->layout = static_cast<kv::Layout>(o.layout);
  out->num_host_blocks = o.num_host_blocks;
  out->num_state_slots = o.num_state_slots;
  out->state_bytes_per_layer = o.state_bytes_per_layer;
  out->device = context->exec.device;
  out->device_id = context->exec.device_id;
  // Fields appended in ABI 0.2: read only when the caller's struct has them.
  if (options->struct_size >= offsetof(kvp_kv_cache_options, v_scales) + sizeof(o.v_scales) && o.num_layers > 0 &&
      o.num_layers <= (1 << 20)) {
    if (o.k_scales) out->k_scales.assign(o.k_scales, o.k_scales + std::max(o.num_layers, 0));
    if (o.v_scales) out->v_scales.assign(o.v_scales, o.v_scales + std::max(o.num_layers, 0));
  }
  return FromStatus(kv::ValidateOptions(*out));
}

kvp_status FinishCache(const kvp_context* context, absl::StatusOr<std::unique_ptr<kv::KvCache>> made,
                       kvp_kv_cache** out_cache) {
  if (!made.ok()) return FromStatus(made.status());
  auto handle = std::make_unique<kvp_kv_cache>();
  handle->context = context;
  handle->cache = std::move(*made);
  const auto& o = handle->cache->options();
  for (int host = 0; host < 2; ++host)
    for (int32_t l = 0; l < o.num_layers; ++l) {
      const kv::PagedLayer& layer = host ? handle->cache->host_layer(l) : handle->cache->layer(l);
      handle->view_shapes.push_back(layer.Shape(o.layout));
      handle->view_strides.push_back(layer.Strides(o.layout));
    }
  *out_cache = handle.release();
  return KVP_OK;
}

}  // namespace
}  // extern "C++"

KVP_API kvp_status kvp_kv_cache_create(const kvp_context* context, const kvp_kv_cache_options* options,
                                       kvp_kv_cache** out_cache) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(context && out_cache, "context and out_cache are required");
    kv::KvCacheOptions o;
    KVP_RETURN_IF_ERROR(ToCacheOptions(context, options, &o));
    return FinishCache(context, kv::KvCache::Create(o), out_cache);
  });
}

KVP_API kvp_status kvp_kv_cache_create_from_tensors(const kvp_context* context, const kvp_kv_cache_options* options,
                                                    const DLTensor* layer_tensors, int32_t num_layer_tensors,
                                                    kvp_kv_cache** out_cache) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(context && out_cache && layer_tensors, "context, layer_tensors and out_cache are required");
    kv::KvCacheOptions o;
    KVP_RETURN_IF_ERROR(ToCacheOptions(context, options, &o));
    KVP_REQUIRE(num_layer_tensors == o.num_layers, "num_layer_tensors={} but num_layers={}", num_layer_tensors,
                o.num_layers);
    std::vector<kv::PagedLayer> layers;
    std::vector<TensorView> views;
    const kv::PagedLayer want = kv::MakeContiguousLayer(nullptr, o, o.num_blocks);
    const auto shape = want.Shape(o.layout);
    for (int32_t l = 0; l < o.num_layers; ++l) {
      const std::string name = fmt::format("layer_tensors[{}]", l);
      TensorView v;
      KVP_RETURN_IF_ERROR(ToTensorView(&layer_tensors[l], name.c_str(), context, 5, &v));
      if (v.dtype != o.dtype)
        return Fail(KVP_ERR_INVALID_ARGUMENT, fmt::format("{}: dtype {} but the options say {}", name,
                                                          kvplug::DTypeName(v.dtype), kvplug::DTypeName(o.dtype)));
      for (int i = 0; i < 5; ++i)
        KVP_REQUIRE(v.shape[i] == shape[i], "{}: shape[{}]={} but the layout needs {}", name, i, v.shape[i], shape[i]);
      KVP_REQUIRE(v.strides[4] == 1, "{}: the head axis must be contiguous (stride {})", name, v.strides[4]);
      const bool kv_first = o.layout == kv::Layout::kKvFirst;
      // The cache writes these pages: no two elements may share an address, K and V included.
      KVP_RETURN_IF_ERROR(CheckCacheLayer(v, kv_first ? 0 : 1, name.c_str()));
      views.push_back(v);
      kv::PagedLayer p = want;
      p.data = v.data;
      p.stride_kv = v.strides[kv_first ? 0 : 1];
      p.stride_block = v.strides[kv_first ? 1 : 0];
      p.stride_pos = v.strides[2];
      p.stride_head = v.strides[3];
      layers.push_back(p);
    }
    KVP_RETURN_IF_ERROR(CheckCacheLayersDisjoint(views));
    return FinishCache(context, kv::KvCache::CreateExternal(o, std::move(layers)), out_cache);
  });
}

KVP_API void kvp_kv_cache_destroy(kvp_kv_cache* cache) { delete cache; }

KVP_API kvp_status kvp_kv_cache_layer_view(const kvp_kv_cache* cache, int32_t layer, int32_t host,
                                           DLTensor* out_view) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(cache && out_view, "cache and out_view are required");
    KVP_REQUIRE(host == 0 || host == 1, "host={} must be 0 or 1", host);
    const auto& o = cache->cache->options();
    if (layer < 0 || layer >= o.num_layers)
      return Fail(KVP_ERR_OUT_OF_RANGE, fmt::format("layer={} out of range [0, {})", layer, o.num_layers));
    const kv::PagedLayer& p = host ? cache->cache->host_layer(layer) : cache->cache->layer(layer);
    const size_t index = static_cast<size_t>(host) * o.num_layers + layer;
    DLTensor v{};
    v.data = p.data;
    const bool cuda = o.device == Device::kCuda;
    v.device = host ? DLDevice{cuda ? kDLCUDAHost : kDLCPU, 0}
                    : DLDevice{cuda ? kDLCUDA : kDLCPU, cuda ? o.device_id : 0};
    v.ndim = 5;
    switch (o.dtype) {
      case DType::kF32: v.dtype = DLDataType{kDLFloat, 32, 1}; break;
      case DType::kF16: v.dtype = DLDataType{kDLFloat, 16, 1}; break;
      case DType::kBF16: v.dtype = DLDataType{kDLBfloat, 16, 1}; break;
      case DType::kFP8E4M3: v.dtype = DLDataType{kDLUInt, 8, 1}; break;
    }
    v.shape = const_cast<int64_t*>(cache->view_shapes[index].data());
    v.strides = const_cast<int64_t*>(cache->view_strides[index].data());
    v.byte_offset = 0;
    *out_view = v;
    return KVP_OK;
  });
}

KVP_API kvp_status kvp_kv_cache_write(kvp_kv_cache* cache, int32_t layer, const DLTensor* key, const DLTensor* value,
                                      const DLTensor* slot_mapping) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(cache, "cache is NULL");
    TensorView k, v;
    KVP_RETURN_IF_ERROR(ToTensorView(key, "key", cache->context, 3, &k));
    KVP_RETURN_IF_ERROR(ToTensorView(value, "value", cache->context, 3, &v));
    KVP_REQUIRE(k.shape == v.shape, "key and value shapes differ (key [{}, {}, {}], value [{}, {}, {}])", k.shape[0],
                k.shape[1], k.shape[2], v.shape[0], v.shape[1], v.shape[2]);
    const int64_t* slots;
    KVP_RETURN_IF_ERROR(CheckSlotMapping(slot_mapping, k.shape[0], cache->context, &slots));
    if (cache->cache->device() == Device::kCuda)
      return FromStatus(cache->cache->WriteDeviceSlots(layer, k, v, slots, k.shape[0], cache->context->exec.stream));
    return FromStatus(cache->cache->Write(layer, k, v, absl::Span<const int64_t>(slots, k.shape[0])));
  });
}

extern "C++" {
namespace {
template <class Op>
kvp_status BlockCopies(kvp_kv_cache* cache, const kvp_block_copy* copies, int32_t num_copies, Op op) {
  KVP_REQUIRE(cache, "cache is NULL");
  KVP_REQUIRE(num_copies >= 0 && (copies || num_copies == 0), "copies is NULL with num_copies={}", num_copies);
  static_assert(sizeof(kvp_block_copy) == sizeof(paged::BlockCopy));
  std::vector<paged::BlockCopy> list(static_cast<size_t>(num_copies));
  for (int32_t i = 0; i < num_copies; ++i) list[i] = {copies[i].src, copies[i].dst};
  return FromStatus(op(absl::Span<const paged::BlockCopy>(list)));
}
}  // namespace
}  // extern "C++"

KVP_API kvp_status kvp_kv_cache_copy_blocks(kvp_kv_cache* cache, const kvp_block_copy* copies, int32_t num_copies) {
  return Guard(__func__, [&] {
    return BlockCopies(cache, copies, num_copies, [&](auto list) { return cache->cache->CopyBlocks(list, cache->context->exec.stream); });
  });
}

KVP_API kvp_status kvp_kv_cache_swap_out(kvp_kv_cache* cache, const kvp_block_copy* copies, int32_t num_copies) {
  return Guard(__func__, [&] {
    return BlockCopies(cache, copies, num_copies, [&](auto list) { return cache->cache->SwapOut(list, cache->context->exec.stream); });
  });
}

KVP_API kvp_status kvp_kv_cache_swap_in(kvp_kv_cache* cache, const kvp_block_copy* copies, int32_t num_copies) {
  return Guard(__func__, [&] {
    return BlockCopies(cache, copies, num_copies, [&](auto list) { return cache->cache->SwapIn(list, cache->context->exec.stream); });
  });
}

KVP_API kvp_status kvp_kv_cache_state(kvp_kv_cache* cache, int32_t layer, int32_t slot, void** out_data,
                                      int64_t* out_num_bytes) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(cache && out_data && out_num_bytes, "cache, out_data and out_num_bytes are required");
    auto state = cache->cache->State(layer, slot);
    if (!state.ok()) return FromStatus(state.status());
    *out_data = state->data();
    *out_num_bytes = static_cast<int64_t>(state->size());
    return KVP_OK;
  });
}

KVP_API kvp_status kvp_kv_cache_copy_state(kvp_kv_cache* cache, int32_t src_slot, int32_t dst_slot) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(cache, "cache is NULL");
    return FromStatus(cache->cache->CopyState(src_slot, dst_slot, cache->context->exec.stream));
  });
}

/* ---------------------------------------------------------------- plans */

KVP_API kvp_status kvp_plan_create(const kvp_context* context, const kvp_plan_options* options, kvp_plan** out_plan) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(context && out_plan, "context and out_plan are required");
    kvp_plan_options o{};
    KVP_RETURN_IF_ERROR(ReadOptions(options, "options", &o));
    const attn::PlanCapacity c{o.max_num_seqs, o.max_num_tokens, o.max_num_blocks};
    KVP_RETURN_IF_ERROR(FromStatus(attn::BatchPlan::ValidateCapacity(c)));
    auto plan = std::make_unique<kvp_plan>(context, c);
    if (context->exec.device == Device::kCuda)
      KVP_RETURN_IF_ERROR(FromStatus(plan->plan.EnableDevice(context->exec.device_id)));
    *out_plan = plan.release();
    return KVP_OK;
  });
}

KVP_API void kvp_plan_destroy(kvp_plan* plan) { delete plan; }

KVP_API kvp_status kvp_plan_update(kvp_plan* plan, const kvp_batch* batch) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(plan, "plan is NULL");
    kvp_batch b{};
    if (kvp_status s = ReadOptions(batch, "batch", &b); s != KVP_OK) {
      (void)plan->plan.Update(attn::BatchInput{});  // empty the plan: a failed update never leaves a stale one
      return s;
    }
    attn::BatchInput in;
    in.num_seqs = b.num_seqs;
    in.block_size = b.block_size;
    in.query_start_loc = b.query_start_loc;
    in.seq_lens = b.seq_lens;
    in.block_table = b.block_table;
    in.block_table_stride = b.block_table_stride;
    in.kv_indptr = b.kv_indptr;
    in.kv_indices = b.kv_indices;
    in.slot_mapping = b.slot_mapping;
    in.state_slots = b.state_slots;
    in.context_lens = b.context_lens;
    in.query_pos_starts = b.query_pos_starts;
    if (kvp_status s = FromStatus(plan->plan.Update(in, plan->context->exec.stream)); s != KVP_OK) return s;
    if (kvp_status s = FromStatus(plan->steps.UpdateAll(plan->plan, plan->context->exec)); s != KVP_OK) {
      (void)plan->plan.Update(attn::BatchInput{});  // a plan whose step work failed is never run
      return s;
    }
    return KVP_OK;
  });
}

KVP_API kvp_status kvp_plan_attach(kvp_plan* plan, const kvp_attention* attention) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(plan && attention, "plan and attention are required");
    KVP_REQUIRE(plan->context == attention->context, "plan and attention belong to different contexts");
    return FromStatus(plan->steps.Attach(attention->step_key, *attention->impl, attention->heads, plan->plan, plan->context->exec));
  });
}

/* ---------------------------------------------------------------- attention */

KVP_API kvp_status kvp_config_check(const char* backend, int32_t config_format, const void* config,
                                    size_t config_size) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(backend, "backend is NULL");
    if (!attn::FindBackend(backend)) return Fail(KVP_ERR_NOT_FOUND, fmt::format("no backend named '{}'", backend));
    attn::BackendConfig parsed;
    return ParseConfig(backend, config_format, config, config_size, &parsed);
  });
}

KVP_API kvp_status kvp_attention_create(const kvp_context* context, const kvp_attention_options* options,
                                        kvp_attention** out_attention) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(context && out_attention, "context and out_attention are required");
    kvp_attention_options o{};
    KVP_RETURN_IF_ERROR(ReadOptions(options, "options", &o));
    KVP_REQUIRE(o.backend, "options->backend is NULL");
    const attn::BackendInfo* info = attn::FindBackend(o.backend);
    if (!info) return Fail(KVP_ERR_NOT_FOUND, fmt::format("no backend named '{}'", o.backend));
    KVP_RETURN_IF_ERROR(CheckDType(o.kv_dtype, "kv_dtype"));
    KVP_REQUIRE(std::isfinite(o.sm_scale) && o.sm_scale >= 0, "sm_scale={} must be finite and >= 0 (0 = default)",
                o.sm_scale);
    attn::BackendConfig config;
    KVP_RETURN_IF_ERROR(ParseConfig(o.backend, o.config_format, o.config, o.config_size, &config));
    attn::HeadConfig heads;
    heads.num_q_heads = o.num_q_heads;
    heads.num_kv_heads = o.num_kv_heads;
    heads.head_size = o.head_size;
    heads.kv_dtype = static_cast<DType>(o.kv_dtype);
    heads.sm_scale = o.sm_scale > 0 ? o.sm_scale : 1.0f / std::sqrt(static_cast<float>(std::max(o.head_size, 1)));
    auto impl = attn::CreateBackend(*info, heads, config, context->exec);
    if (!impl.ok()) return FromStatus(impl.status());
    auto handle = std::make_unique<kvp_attention>();
    handle->context = context;
    handle->backend = std::string(info->name);
    handle->heads = heads;
    handle->impl = std::move(*impl);
    handle->step_key = attn::StepKey(*handle->impl, heads);
    if (const int64_t need = handle->impl->workspace_bytes();
        context->exec.device == Device::kCuda && need > context->exec.workspace_bytes) {
      // Size the context's shared scratch now: runs must not allocate.
      void* p = nullptr;
      if (const int e = kv::cuda::DeviceAlloc(&p, need, context->exec.device_id); e != 0)
        return Fail(KVP_ERR_OUT_OF_MEMORY, fmt::format("allocating {} bytes of attention workspace: {}", need,
                                                       kv::cuda::ErrorString(e)));
      context->workspace = std::unique_ptr<void, void (*)(void*)>(p, &kv::cuda::DeviceFree);
      context->exec.workspace = p;
      context->exec.workspace_bytes = need;
    }
    *out_attention = handle.release();
    return KVP_OK;
  });
}

KVP_API void kvp_attention_destroy(kvp_attention* attention) { delete attention; }

KVP_API kvp_status kvp_attention_write_kv(const kvp_attention* attention, const kvp_plan* plan, kvp_kv_cache* cache,
                                          int32_t layer, const DLTensor* key, const DLTensor* value) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(attention && plan && cache, "attention, plan and cache are required");
    KVP_REQUIRE(cache->context->exec.device == attention->context->exec.device,
                "cache and attention live on different devices");
    TensorView k, v;
    KVP_RETURN_IF_ERROR(ToTensorView(key, "key", attention->context, 3, &k));
    KVP_RETURN_IF_ERROR(ToTensorView(value, "value", attention->context, 3, &v));
    attn::WriteArgs args{plan->plan, *cache->cache, layer, k, v, attention->context->exec};
    KVP_RETURN_IF_ERROR(FromStatus(attn::ValidateWrite(attention->heads, args)));
    // Backends whose write reads extra slots from the plan step (attamba's compressed rows, uploaded
    // with the plan on CUDA): the step work, built at kvp_plan_update when attached.
    if (attention->context->exec.device == Device::kCuda && attention->impl->planner()->has_write_slots() &&
        !plan->plan.empty()) {
      auto work = plan->steps.Get(attention->step_key, *attention->impl, attention->heads, plan->plan,
                                  attention->context->exec);
      if (!work.ok()) return FromStatus(work.status());
      args.work = *work;
    }
    return FromStatus(attention->impl->WriteKv(args));
  });
}

extern "C++" {
namespace {
kvp_status RunAttention(const kvp_attention* attention, const kvp_plan* plan, const kvp_kv_cache* cache,
                        int32_t layer, const DLTensor* query, DLTensor* out, DLTensor* lse, DLTensor* entropy,
                        DLTensor* summary = nullptr) {
  KVP_REQUIRE(attention && plan && cache, "attention, plan and cache are required");
  KVP_REQUIRE(cache->context->exec.device == attention->context->exec.device,
              "cache and attention live on different devices");
  KVP_REQUIRE(plan->context == attention->context, "plan and attention belong to different contexts");
  const attn::BackendInfo* info = attn::FindBackend(attention->backend);
  TensorView q, o, l, e;
  KVP_RETURN_IF_ERROR(ToTensorView(query, "query", attention->context, 3, &q));
  KVP_RETURN_IF_ERROR(ToTensorView(out, "out", attention->context, 3, &o));
  KVP_RETURN_IF_ERROR(CheckWritable(o, "out"));
  KVP_RETURN_IF_ERROR(CheckDisjoint(o, "out", q, "query"));
  if (lse) {
    if (!info->supports_lse)
      return Fail(KVP_ERR_NOT_SUPPORTED, fmt::format("backend '{}' does not write lse", attention->backend));
    KVP_RETURN_IF_ERROR(ToTensorView(lse, "lse", attention->context, 2, &l));
    KVP_RETURN_IF_ERROR(CheckWritable(l, "lse"));
    KVP_RETURN_IF_ERROR(CheckDisjoint(l, "lse", q, "query"));
    KVP_RETURN_IF_ERROR(CheckDisjoint(l, "lse", o, "out"));
  }
  if (entropy) {
    if (!info->supports_entropy)
      return Fail(KVP_ERR_NOT_SUPPORTED, fmt::format("backend '{}' does not write entropy", attention->backend));
    KVP_RETURN_IF_ERROR(ToTensorView(entropy, "entropy", attention->context, 2, &e));
    KVP_RETURN_IF_ERROR(CheckWritable(e, "entropy"));
    KVP_RETURN_IF_ERROR(CheckDisjoint(e, "entropy", q, "query"));
    KVP_RETURN_IF_ERROR(CheckDisjoint(e, "entropy", o, "out"));
    if (lse) KVP_RETURN_IF_ERROR(CheckDisjoint(e, "entropy", l, "lse"));
  }
  TensorView sv;
  if (summary) {
    if (!info->supports_entropy)
      return Fail(KVP_ERR_NOT_SUPPORTED, fmt::format("backend '{}' does not compute entropy", attention->backend));
    KVP_RETURN_IF_ERROR(ToTensorView(summary, "entropy_summary", attention->context, 2, &sv));
    KVP_RETURN_IF_ERROR(CheckWritable(sv, "entropy_summary"));
    KVP_RETURN_IF_ERROR(CheckDisjoint(sv, "entropy_summary", q, "query"));
    KVP_RETURN_IF_ERROR(CheckDisjoint(sv, "entropy_summary", o, "out"));
    if (lse) KVP_RETURN_IF_ERROR(CheckDisjoint(sv, "entropy_summary", l, "lse"));
    if (entropy) KVP_RETURN_IF_ERROR(CheckDisjoint(sv, "entropy_summary", e, "entropy"));
  }
  const attn::AttentionOutputs outputs{&o, lse ? &l : nullptr, entropy ? &e : nullptr, summary ? &sv : nullptr};
  if (plan->plan.empty())
    return Fail(KVP_ERR_FAILED_PRECONDITION, "the plan holds no batch: call kvp_plan_update first (or it failed)");
  auto work = plan->steps.Get(attention->step_key, *attention->impl, attention->heads, plan->plan, attention->context->exec);
  if (!work.ok()) return FromStatus(work.status());
  const attn::RunArgs args{plan->plan, **work, *cache->cache, layer, q, outputs, attention->context->exec};
  KVP_RETURN_IF_ERROR(FromStatus(attn::ValidateRun(attention->heads, args)));
  return FromStatus(attention->impl->Run(args));
}
}  // namespace
}  // extern "C++"

KVP_API kvp_status kvp_attention_run(const kvp_attention* attention, const kvp_plan* plan, const kvp_kv_cache* cache,
                                     int32_t layer, const DLTensor* query, DLTensor* out, DLTensor* lse) {
  return Guard(__func__, [&] { return RunAttention(attention, plan, cache, layer, query, out, lse, nullptr); });
}

KVP_API kvp_status kvp_attention_run_v2(const kvp_attention* attention, const kvp_plan* plan,
                                        const kvp_kv_cache* cache, int32_t layer, const DLTensor* query,
                                        const kvp_attention_outputs* outputs) {
  return Guard(__func__, [&] {
    kvp_attention_outputs o{};
    KVP_RETURN_IF_ERROR(ReadOptions(outputs, "outputs", &o));
    KVP_REQUIRE(o.out, "outputs->out is NULL");
    return RunAttention(attention, plan, cache, layer, query, o.out, o.lse, o.entropy, o.entropy_summary);
  });
}

KVP_API kvp_status kvp_attention_merge_states(const kvp_context* context, const kvp_merge_states_args* args) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(context, "context is NULL");
    kvp_merge_states_args a{};
    KVP_RETURN_IF_ERROR(ReadOptions(args, "args", &a));
    TensorView po, pl, pe, o, l, e;
    KVP_RETURN_IF_ERROR(ToTensorView(a.partial_out, "partial_out", context, 4, &po));
    KVP_RETURN_IF_ERROR(ToTensorView(a.partial_lse, "partial_lse", context, 3, &pl));
    if (a.partial_entropy) KVP_RETURN_IF_ERROR(ToTensorView(a.partial_entropy, "partial_entropy", context, 3, &pe));
    KVP_RETURN_IF_ERROR(ToTensorView(a.out, "out", context, 3, &o));
    if (a.lse) KVP_RETURN_IF_ERROR(ToTensorView(a.lse, "lse", context, 2, &l));
    if (a.entropy) KVP_RETURN_IF_ERROR(ToTensorView(a.entropy, "entropy", context, 2, &e));
    const attn::MergeStatesArgs m{&po, &pl, a.partial_entropy ? &pe : nullptr, &o, a.lse ? &l : nullptr,
                                  a.entropy ? &e : nullptr};
    KVP_RETURN_IF_ERROR(FromStatus(attn::ValidateMergeStates(m), KVP_ERR_INVALID_ARGUMENT));
    // Outputs: none overlaps itself, another output or an input.
    const std::pair<const TensorView*, const char*> inputs[] = {
        {&po, "partial_out"}, {&pl, "partial_lse"}, {m.partial_entropy, "partial_entropy"}};
    const std::pair<const TensorView*, const char*> outs[] = {{&o, "out"}, {m.lse, "lse"}, {m.entropy, "entropy"}};
    for (size_t i = 0; i < 3; ++i) {
      if (!outs[i].first) continue;
      KVP_RETURN_IF_ERROR(CheckWritable(*outs[i].first, outs[i].second));
      for (const auto& [in, name] : inputs)
        if (in) KVP_RETURN_IF_ERROR(CheckDisjoint(*outs[i].first, outs[i].second, *in, name));
      for (size_t j = 0; j < i; ++j)
        if (outs[j].first) KVP_RETURN_IF_ERROR(CheckDisjoint(*outs[i].first, outs[i].second, *outs[j].first, outs[j].second));
    }
    if (context->exec.device == Device::kCuda)
      return FromStatus(attn::MergeStatesCuda(m, context->exec.stream), KVP_ERR_INVALID_ARGUMENT);
    attn::MergeStatesCpu(m, context->exec.pool);
    return KVP_OK;
  });
}

KVP_API kvp_status kvp_attention_cache_layout(const kvp_attention* attention, int32_t block_size, int32_t num_tokens,
                                              int32_t query_pos_start, kvp_cache_layout* out_layout) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(attention && out_layout, "attention and out_layout are required");
    KVP_REQUIRE(block_size >= 1 && block_size <= 65536, "block_size={} must be in [1, 65536]", block_size);
    KVP_REQUIRE(num_tokens >= 0 && num_tokens <= (1 << 30), "num_tokens={} must be in [0, 2^30]", num_tokens);
    KVP_REQUIRE(query_pos_start >= 0 && query_pos_start <= num_tokens,
                "query_pos_start={} must be in [0, num_tokens={}]", query_pos_start, num_tokens);
    const attn::CacheLayout l = attention->impl->Layout(block_size, num_tokens, query_pos_start);
    kvp_cache_layout v{};
    v.struct_size = sizeof v;
    v.seq_len = l.seq_len;
    v.num_pages = l.num_pages;
    v.compressed_rows = l.compressed_rows;
    v.compressed_pages = l.compressed_pages;
    v.stable_rows = l.stable_rows;
    v.window_first_page = l.window_first_page;
    v.window_pages = l.window_pages;
    return WriteOutput(v, out_layout, "out_layout");
  });
}

KVP_API kvp_status kvp_attention_ssm(const kvp_attention* attention, const kvp_plan* plan, kvp_kv_cache* cache,
                                     int32_t layer, const kvp_ssm_args* args) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(attention && plan && cache, "attention, plan and cache are required");
    KVP_REQUIRE(cache->context->exec.device == attention->context->exec.device,
                "cache and attention live on different devices");
    KVP_REQUIRE(plan->context == attention->context, "plan and attention belong to different contexts");
    kvp_ssm_args a{};
    KVP_RETURN_IF_ERROR(ReadOptions(args, "args", &a));
    const kvp_context* ctx = attention->context;
    TensorView in, out;
    KVP_RETURN_IF_ERROR(ToTensorView(a.in, "in", ctx, 2, &in));
    KVP_RETURN_IF_ERROR(ToTensorView(a.out, "out", ctx, 2, &out));
    KVP_RETURN_IF_ERROR(CheckWritable(out, "out"));
    KVP_RETURN_IF_ERROR(CheckDisjoint(out, "out", in, "in"));
    TensorView views[6];
    const TensorView* ptrs[6] = {};
    const std::pair<const DLTensor*, const char*> params[6] = {{a.conv_weight, "conv_weight"}, {a.conv_bias, "conv_bias"},
                                                               {a.dt_bias, "dt_bias"},         {a.a_log, "a_log"},
                                                               {a.d_skip, "d_skip"},           {a.norm_weight, "norm_weight"}};
    for (int i = 0; i < 6; ++i) {
      if (!params[i].first) continue;
      KVP_RETURN_IF_ERROR(ToTensorView(params[i].first, params[i].second, ctx, i == 0 ? 2 : 1, &views[i]));
      KVP_RETURN_IF_ERROR(CheckDisjoint(out, "out", views[i], params[i].second));
      ptrs[i] = &views[i];
    }
    const attn::SsmArgs s{plan->plan, *cache->cache, layer, a.which, in, ptrs[0], ptrs[1], ptrs[2], ptrs[3],
                          ptrs[4], ptrs[5], out, ctx->exec};
    return FromStatus(attention->impl->RunSsm(s));
  });
}

KVP_API kvp_status kvp_attention_state_bytes(const kvp_attention* attention, int64_t* out_bytes_per_layer) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(attention && out_bytes_per_layer, "attention and out_bytes_per_layer are required");
    *out_bytes_per_layer = attention->impl->state_bytes_per_layer();
    return KVP_OK;
  });
}

}  // extern "C"
