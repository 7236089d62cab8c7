/*
 * Optional helper for programs that load libkvplug.so at run time (as serving engines do):
 * one table of function pointers filled with dlsym, and a check of the ABI major version.
 * Header-only; needs dlfcn.h and GNU __typeof__ (GCC, Clang, in C or C++).
 *
 *   kvp_api api;
 *   char err[256];
 *   if (kvp_api_load(&api, "libkvplug.so.0", err, sizeof err) != 0) { puts(err); exit(1); }
 *   api.kvp_context_create(NULL, &ctx);
 */
#ifndef KVPLUG_KVPLUG_DL_H_
#define KVPLUG_KVPLUG_DL_H_

#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

#include "kvplug/kvplug.h"

/* Every entry point of this header version, in declaration order. */
#define KVP_FOR_EACH_FUNCTION(X) \
  X(kvp_abi_version) \
  X(kvp_version_string) \
  X(kvp_status_string) \
  X(kvp_last_error) \
  X(kvp_backend_count) \
  X(kvp_backend_name) \
  X(kvp_backend_info_get) \
  X(kvp_backend_device_info_get) \
  X(kvp_context_create) \
  X(kvp_context_destroy) \
  X(kvp_context_set_stream) \
  X(kvp_block_manager_create) \
  X(kvp_block_manager_destroy) \
  X(kvp_block_manager_can_allocate) \
  X(kvp_block_manager_allocate) \
  X(kvp_block_manager_can_append) \
  X(kvp_block_manager_append) \
  X(kvp_block_manager_mark_computed) \
  X(kvp_block_manager_fork) \
  X(kvp_block_manager_free) \
  X(kvp_block_manager_num_tokens) \
  X(kvp_block_manager_block_table) \
  X(kvp_block_manager_block_tables) \
  X(kvp_block_manager_slot_mapping) \
  X(kvp_block_manager_state_slot) \
  X(kvp_block_manager_swap_out) \
  X(kvp_block_manager_swap_in) \
  X(kvp_block_manager_is_swapped) \
  X(kvp_block_manager_stats_get) \
  X(kvp_kv_cache_create) \
  X(kvp_kv_cache_create_from_tensors) \
  X(kvp_kv_cache_destroy) \
  X(kvp_kv_cache_layer_view) \
  X(kvp_kv_cache_write) \
  X(kvp_kv_cache_copy_blocks) \
  X(kvp_kv_cache_swap_out) \
  X(kvp_kv_cache_swap_in) \
  X(kvp_kv_cache_state) \
  X(kvp_kv_cache_copy_state) \
  X(kvp_plan_create) \
  X(kvp_plan_destroy) \
  X(kvp_plan_update) \
  X(kvp_plan_attach) \
  X(kvp_attention_create) \
  X(kvp_attention_destroy) \
  X(kvp_config_check) \
  X(kvp_attention_write_kv) \
  X(kvp_attention_run) \
  X(kvp_attention_run_v2) \
  X(kvp_attention_merge_states) \
  X(kvp_attention_state_bytes) \
  X(kvp_block_manager_allocate_star) \
  X(kvp_comm_nccl_unique_id) \
  X(kvp_comm_create) \
  X(kvp_comm_destroy) \
  X(kvp_comm_merge_attention) \
  X(kvp_comm_pending) \
  X(kvp_attention_cache_layout) \
  X(kvp_attention_ssm) \

/* Pointer types first: C++ forbids a member whose declaration names what the member then renames. */
#define KVP_API_TYPEDEF(name) typedef __typeof__(&name) name##_fn;
KVP_FOR_EACH_FUNCTION(KVP_API_TYPEDEF)
#undef KVP_API_TYPEDEF

typedef struct kvp_api {
  void* handle;
#define KVP_API_MEMBER(name) name##_fn name;
  KVP_FOR_EACH_FUNCTION(KVP_API_MEMBER)
#undef KVP_API_MEMBER
} kvp_api;

/* Loads `path` (e.g. "libkvplug.so.0" or an absolute path) and resolves every function.
 * Returns 0 on success; otherwise writes a message into `error` and returns -1. The library's ABI
 * major version must equal this header's. */
static inline int kvp_api_load(kvp_api* api, const char* path, char* error, size_t error_size) {
  memset(api, 0, sizeof(*api));
  api->handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!api->handle) {
    snprintf(error, error_size, "dlopen(%s): %s", path, dlerror());
    return -1;
  }
#define KVP_API_RESOLVE(name)                                                     \
  *(void**)(&api->name) = dlsym(api->handle, #name);                              \
  if (!api->name) {                                                               \
    snprintf(error, error_size, "%s: missing symbol %s (library too old?)", path, #name); \
    dlclose(api->handle);                                                         \
    api->handle = NULL;                                                           \
    return -1;                                                                    \
  }
  KVP_FOR_EACH_FUNCTION(KVP_API_RESOLVE)
#undef KVP_API_RESOLVE
  if (api->kvp_abi_version() / 10000 != KVP_ABI_VERSION_MAJOR) {
    snprintf(error, error_size, "%s: ABI version %u, this program needs major %d", path,
             (unsigned)api->kvp_abi_version(), KVP_ABI_VERSION_MAJOR);
    dlclose(api->handle);
    api->handle = NULL;
    return -1;
  }
  return 0;
}

static inline void kvp_api_unload(kvp_api* api) {
  if (api->handle) dlclose(api->handle);
  api->handle = NULL;
}

#endif /* KVPLUG_KVPLUG_DL_H_ */
