/*
 * kvplug: paged-KV attention backends and a KV block manager behind a stable C ABI.
 *
 * This header is the contract: a function not declared here is not API.
 *
 * Conventions (hold for every entry point unless its comment says otherwise):
 *  - Every function returns a kvp_status. On failure it changes nothing that the caller can observe
 *    (handles keep their state, output arguments are left untouched), and kvp_last_error() returns a
 *    message naming the offending argument and its value. Exceptions never cross this boundary.
 *  - Output pointers must be non-NULL unless documented as optional.
 *  - Options structs begin with `struct_size`; set it to sizeof(the struct) as your header declares
 *    it. Newer libraries accept older, shorter structs (missing trailing fields take their documented
 *    defaults); a struct_size larger than the library knows is rejected with KVP_ERR_NOT_SUPPORTED.
 *  - X_destroy(NULL) is a no-op. Passing a handle after destroying it is undefined behaviour.
 *  - Tensors are DLPack DLTensors, checked on every call (device, dtype, ndim, shape, strides,
 *    alignment); never trusted.
 *  - Log-sum-exp values are natural logarithms (FlashInfer's are base 2: multiply theirs by ln 2).
 *  - Thread safety is stated per handle below. "Not thread-safe" means: calls on one handle must be
 *    serialized by the caller; different handles may be used from different threads at once.
 *
 * Versioning: KVP_ABI_VERSION_MAJOR changes only when something existing changes (the soname carries
 * it); a minor version only adds functions, enum values and trailing struct fields.
 */
#ifndef KVPLUG_KVPLUG_H_
#define KVPLUG_KVPLUG_H_

#include <stddef.h>
#include <stdint.h>

#include <dlpack/dlpack.h>

#if defined(_WIN32) && defined(KVP_BUILDING_LIBRARY)
#define KVP_API __declspec(dllexport)
#elif defined(_WIN32)
#define KVP_API __declspec(dllimport)
#elif defined(KVP_BUILDING_LIBRARY)
#define KVP_API __attribute__((visibility("default")))
#else
#define KVP_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------------------------------
 * Versions and errors
 * ---------------------------------------------------------------------------------------------- */

#define KVP_ABI_VERSION_MAJOR 0
#define KVP_ABI_VERSION_MINOR 5
#define KVP_ABI_VERSION_PATCH 0
/* major * 10000 + minor * 100 + patch, as zstd's ZSTD_VERSION_NUMBER. */
#define KVP_ABI_VERSION_NUMBER \
  (KVP_ABI_VERSION_MAJOR * 10000 + KVP_ABI_VERSION_MINOR * 100 + KVP_ABI_VERSION_PATCH)

/* Status codes. Values are pinned: they never change meaning. */
typedef enum kvp_status {
  KVP_OK = 0,
  KVP_ERR_INVALID_ARGUMENT = 1,    /* a NULL, a bad value, a tensor of the wrong shape/dtype/... */
  KVP_ERR_OUT_OF_MEMORY = 2,       /* a host or device allocation failed */
  KVP_ERR_NOT_SUPPORTED = 3,       /* valid, but not implemented by this build/backend/device */
  KVP_ERR_OUT_OF_RANGE = 4,        /* an index (layer, block, slot, position) past its bound */
  KVP_ERR_INTERNAL = 5,            /* a bug in kvplug: please report with kvp_last_error() */
  KVP_ERR_INVALID_CONFIG = 6,      /* a backend config that fails verification or parsing */
  KVP_ERR_NOT_FOUND = 7,           /* unknown backend name, unknown sequence id */
  KVP_ERR_ALREADY_EXISTS = 8,      /* a sequence id that is already in use */
  KVP_ERR_NO_FREE_BLOCKS = 9,      /* the block pool cannot satisfy the request now */
  KVP_ERR_FAILED_PRECONDITION = 10,/* the object is not in a state that allows the call */
  KVP_ERR_DEVICE = 11              /* a CUDA/NCCL call failed */
} kvp_status;

/* The ABI version of the loaded library, as KVP_ABI_VERSION_NUMBER. Check the major version after
 * dlopen: kvp_abi_version() / 10000 == KVP_ABI_VERSION_MAJOR. Never fails. */
KVP_API uint32_t kvp_abi_version(void);

/* Human-readable library version, build flavour and the instruction set the CPU engine dispatched
 * to on this machine, e.g. "0.5.0 (cpu) simd=AVX2" ("AVX3" is AVX-512). Static storage. */
KVP_API const char* kvp_version_string(void);

/* The name of a status code ("KVP_ERR_INVALID_ARGUMENT"); "KVP_UNKNOWN_STATUS" for others.
 * Static storage; never NULL. */
KVP_API const char* kvp_status_string(kvp_status status);

/* This thread's message for the last failed call ("" if none failed yet). Valid until the next kvplug
 * call on this thread. Never NULL. */
KVP_API const char* kvp_last_error(void);

/* ------------------------------------------------------------------------------------------------
 * Data types, devices, capabilities
 * ---------------------------------------------------------------------------------------------- */

/* Storage types of the KV cache. Tensors crossing the ABI use DLDataType; these name cache formats. */
typedef enum kvp_dtype {
  KVP_DTYPE_FLOAT32 = 0,
  KVP_DTYPE_FLOAT16 = 1,
  KVP_DTYPE_BFLOAT16 = 2,
  KVP_DTYPE_FP8_E4M3 = 3 /* CUDA caches only, with per-layer scales (kvp_kv_cache_options) */
} kvp_dtype;

/* The number of registered attention backends (dense, star, attamba, kv_shift, entropy as built). */
KVP_API kvp_status kvp_backend_count(int32_t* out_count);

/* The name of backend `index` in [0, count). Static storage. */
KVP_API kvp_status kvp_backend_name(int32_t index, const char** out_name);

typedef struct kvp_backend_info {
  size_t struct_size;
  const char* name;            /* static storage */
  uint32_t dtype_mask;         /* bit (1u << kvp_dtype) set for each supported cache dtype */
  uint32_t device_mask;        /* bit (1u << DLDeviceType) set for each supported device */
  const int32_t* head_sizes;   /* static storage, num_head_sizes entries */
  int32_t num_head_sizes;
  int32_t supports_lse;        /* 1 if kvp_attention_run can write the log-sum-exp */
  int32_t needs_state_slots;   /* 1 if the backend keeps per-sequence state in the cache */
} kvp_backend_info;

/* Describe backend `name` over every device of this build (head_sizes: the CPU's list, the widest).
 * KVP_ERR_NOT_FOUND for an unknown name; KVP_ERR_INVALID_ARGUMENT for NULLs or a bad struct_size. */
KVP_API kvp_status kvp_backend_info_get(const char* name, kvp_backend_info* out_info);

/* Since ABI 0.3: what backend `name` offers on one device type (capabilities differ per device:
 * e.g. the CUDA kernels take fewer head sizes than the CPU engine). */
typedef struct kvp_backend_device_info {
  size_t struct_size;
  int32_t device_type;         /* the DLDeviceType asked for */
  int32_t available;           /* 1 if the backend runs on this device in this build */
  uint32_t dtype_mask;         /* bit (1u << kvp_dtype) per cache dtype on this device */
  const int32_t* head_sizes;   /* static storage, num_head_sizes entries */
  int32_t num_head_sizes;
  int32_t supports_lse;        /* kvp_attention_outputs.lse can be set */
  int32_t supports_entropy;    /* kvp_attention_outputs.entropy can be set */
  int32_t needs_state_slots;   /* the cache needs state slots (kvp_attention_state_bytes) */
  int32_t experimental;        /* 1: its config table's fields may still change */
} kvp_backend_device_info;

/* KVP_ERR_NOT_FOUND for an unknown name; KVP_ERR_INVALID_ARGUMENT for NULLs, a bad struct_size or a
 * device_type other than kDLCPU / kDLCUDA; an unavailable device is reported as available = 0. */
KVP_API kvp_status kvp_backend_device_info_get(const char* name, int32_t device_type,
                                               kvp_backend_device_info* out_info);

/* ------------------------------------------------------------------------------------------------
 * Context: a device and the stream work is launched on.
 * Thread safety: every call that takes a context only reads it, except kvp_context_set_stream,
 * which must not race with other calls using the context, and kvp_attention_create on a CUDA
 * context, which may grow the context's shared device workspace (do not run attention on the
 * context meanwhile; create every attention handle before capturing runs in a CUDA graph). On
 * CUDA the caller's current device must be the context's device.
 * ---------------------------------------------------------------------------------------------- */

typedef struct kvp_context kvp_context;

typedef struct kvp_context_options {
  size_t struct_size;
  int32_t device_type;   /* DLDeviceType: kDLCPU (default when 0) or kDLCUDA */
  int32_t device_id;     /* ordinal for kDLCUDA; 0 for the CPU */
  int32_t num_threads;   /* CPU worker threads for CPU backends; 0 = all hardware threads */
  void* stream;          /* cudaStream_t for kDLCUDA (NULL = default stream); ignored on the CPU */
} kvp_context_options;

/* `options` may be NULL: CPU, all hardware threads. */
KVP_API kvp_status kvp_context_create(const kvp_context_options* options, kvp_context** out_context);
KVP_API void kvp_context_destroy(kvp_context* context);
KVP_API kvp_status kvp_context_set_stream(kvp_context* context, void* stream);

/* ------------------------------------------------------------------------------------------------
 * Block manager: host-side bookkeeping of a paged KV cache. Needs no backend and no device.
 *
 * A sequence (identified by the caller's 64-bit id) owns a list of physical block ids, its block
 * table. Token position p of a sequence lives in block table[p / block_size] at offset
 * p % block_size; its cache slot is block_id * block_size + offset (vLLM's slot mapping).
 *
 * Prefix caching: a full block is identified by a hash chained from its parent block's hash, its
 * token ids and the sequence's extra key (e.g. a tenant salt or LoRA id). A full block is published
 * to the prefix cache once the caller reports its K/V written (kvp_block_manager_mark_computed), so
 * chunked prefill never serves unwritten blocks. Unreferenced cached blocks stay reusable until
 * evicted, least recently used first, when free blocks run out.
 *
 * Thread safety: not thread-safe; kvp_block_manager_stats and the read-only queries may run
 * concurrently with each other but not with a mutating call.
 * ---------------------------------------------------------------------------------------------- */

typedef struct kvp_block_manager kvp_block_manager;

typedef struct kvp_block_manager_options {
  size_t struct_size;
  int32_t block_size;            /* tokens per block, in [1, 65536] */
  int32_t num_device_blocks;     /* > 0 */
  int32_t num_host_blocks;       /* >= 0: swap space on the host */
  int32_t enable_prefix_caching; /* 0 or 1 */
  double watermark;              /* in [0, 1): fraction of device blocks that admission of a new
                                    sequence must leave free (room for running sequences to grow) */
  int32_t num_state_slots;       /* >= 0: if > 0 each sequence gets a state slot at allocate/fork */
  uint64_t hash_seed;            /* seeds the block hash chain */
} kvp_block_manager_options;

/* One block copy: the unit of copy-on-write and swap plans. */
typedef struct kvp_block_copy {
  int32_t src;
  int32_t dst;
} kvp_block_copy;

typedef enum kvp_alloc_verdict {
  KVP_ALLOC_OK = 0,    /* can allocate now */
  KVP_ALLOC_LATER = 1, /* cannot now; can once other sequences free blocks */
  KVP_ALLOC_NEVER = 2  /* can never fit in this pool */
} kvp_alloc_verdict;

typedef struct kvp_block_manager_stats {
  size_t struct_size;
  int32_t num_device_blocks;
  int32_t num_free_blocks;       /* never used, or evicted: no content */
  int32_t num_cached_free_blocks;/* unreferenced but holding a cached prefix: reusable or evictable */
  int32_t num_used_blocks;       /* referenced by at least one sequence */
  int32_t num_host_blocks;
  int32_t num_free_host_blocks;
  int32_t num_sequences;         /* on device or swapped out */
  int32_t num_swapped_sequences;
  int64_t prefix_queried_blocks; /* full blocks looked up in the prefix cache */
  int64_t prefix_hit_blocks;     /* of those, found */
  int64_t num_evictions;
} kvp_block_manager_stats;

KVP_API kvp_status kvp_block_manager_create(const kvp_block_manager_options* options,
                                            kvp_block_manager** out_manager);
KVP_API void kvp_block_manager_destroy(kvp_block_manager* manager);

/* Could a new sequence with these `num_tokens` prompt tokens be allocated now? `token_ids` may be
 * NULL (no prefix-cache credit); with them, cached prefix blocks count as free. */
KVP_API kvp_status kvp_block_manager_can_allocate(const kvp_block_manager* manager,
                                                  const int32_t* token_ids, int64_t num_tokens,
                                                  uint64_t extra_key,
                                                  kvp_alloc_verdict* out_verdict);

/* Create sequence `seq_id` holding `num_tokens` (>= 1) prompt tokens, reusing cached prefix blocks.
 * `token_ids` may be NULL only without prefix caching.
 * `out_num_cached_tokens` (optional) receives how many leading tokens already have K/V in the cache
 * (a multiple of block_size, always < num_tokens so at least one token is computed).
 * KVP_ERR_ALREADY_EXISTS, KVP_ERR_NO_FREE_BLOCKS (nothing changed). */
KVP_API kvp_status kvp_block_manager_allocate(kvp_block_manager* manager, uint64_t seq_id,
                                              const int32_t* token_ids, int64_t num_tokens,
                                              uint64_t extra_key, int64_t* out_num_cached_tokens);

/* Could `num_tokens` more tokens be appended to `seq_id` now? */
KVP_API kvp_status kvp_block_manager_can_append(const kvp_block_manager* manager, uint64_t seq_id,
                                                int64_t num_tokens, int32_t* out_can_append);

/* Append `num_tokens` (>= 1) tokens to `seq_id`. If its last block is shared (after a fork) and
 * partially filled, it is first replaced by a private copy: `*out_copy_needed` is set to 1 and
 * `out_copy` (both required) receives the block copy the caller must perform before writing K/V;
 * otherwise `*out_copy_needed` is 0. KVP_ERR_NO_FREE_BLOCKS leaves the sequence unchanged. */
KVP_API kvp_status kvp_block_manager_append(kvp_block_manager* manager, uint64_t seq_id,
                                            const int32_t* token_ids, int64_t num_tokens,
                                            kvp_block_copy* out_copy, int32_t* out_copy_needed);

/* The K/V of the first `num_computed_tokens` tokens of `seq_id` is written: publish its full blocks
 * to the prefix cache (no-op without prefix caching; never goes backwards). Call it after each step.
 * KVP_ERR_OUT_OF_RANGE beyond the sequence's length; KVP_ERR_FAILED_PRECONDITION if swapped out. */
KVP_API kvp_status kvp_block_manager_mark_computed(kvp_block_manager* manager, uint64_t seq_id,
                                                   int64_t num_computed_tokens);

/* Create `child_id` sharing every block of `parent_id` (reference counted; copy on write). */
KVP_API kvp_status kvp_block_manager_fork(kvp_block_manager* manager, uint64_t parent_id,
                                          uint64_t child_id);

/* Release `seq_id` and its blocks (device or host) and state slot. KVP_ERR_NOT_FOUND if unknown. */
KVP_API kvp_status kvp_block_manager_free(kvp_block_manager* manager, uint64_t seq_id);

/* Number of tokens of `seq_id`. */
KVP_API kvp_status kvp_block_manager_num_tokens(const kvp_block_manager* manager, uint64_t seq_id,
                                                int64_t* out_num_tokens);

/* Copy the block table of `seq_id` into `out_blocks` (capacity entries); `*out_num_blocks` receives
 * its length. KVP_ERR_OUT_OF_RANGE (with the needed length in `*out_num_blocks`) if too small. */
KVP_API kvp_status kvp_block_manager_block_table(const kvp_block_manager* manager, uint64_t seq_id,
                                                 int32_t* out_blocks, int32_t capacity,
                                                 int32_t* out_num_blocks);

/* Batch form for a step: row i of `out_table` ([num_seqs, max_blocks_per_seq], row-major) receives
 * the block table of seq_ids[i], padded with -1; `out_seq_lens` (optional) their token counts. */
KVP_API kvp_status kvp_block_manager_block_tables(const kvp_block_manager* manager,
                                                  const uint64_t* seq_ids, int32_t num_seqs,
                                                  int32_t* out_table, int32_t max_blocks_per_seq,
                                                  int32_t* out_seq_lens);

/* Cache slots (block_id * block_size + offset) of positions [start, start + count) of `seq_id`. */
KVP_API kvp_status kvp_block_manager_slot_mapping(const kvp_block_manager* manager, uint64_t seq_id,
                                                  int64_t start, int64_t count, int64_t* out_slots);

/* The state slot of `seq_id` (-1 when the manager has no state slots). */
KVP_API kvp_status kvp_block_manager_state_slot(const kvp_block_manager* manager, uint64_t seq_id,
                                                int32_t* out_slot);

/* Swap `seq_id` out to host blocks. `out_plan` (capacity entries) receives (device block -> host
 * block) copies the caller performs (kvp_kv_cache_swap_out) before reusing the device blocks;
 * `*out_num_copies` its length. The sequence keeps its state slot. KVP_ERR_NO_FREE_BLOCKS if the
 * host pool is too small; KVP_ERR_OUT_OF_RANGE (needed length in `*out_num_copies`) if `capacity`
 * is; KVP_ERR_FAILED_PRECONDITION if already swapped out. Nothing changes on failure. */
KVP_API kvp_status kvp_block_manager_swap_out(kvp_block_manager* manager, uint64_t seq_id,
                                              kvp_block_copy* out_plan, int32_t capacity,
                                              int32_t* out_num_copies);

/* Swap `seq_id` back in: (host block -> device block) copies for kvp_kv_cache_swap_in, one per block
 * of the sequence in block-table order (capacity as for swap_out; KVP_ERR_NO_FREE_BLOCKS if the
 * device pool is too small, KVP_ERR_FAILED_PRECONDITION if resident). The full blocks marked
 * computed before the swap keep their prefix-cache keys and are published again at once, as in vLLM
 * (no new mark_computed needed): perform the plan before any step reads them. Every block is copied
 * from the host, even if a copy is still cached on the device: after swap_out's copies the host
 * copy is authoritative and the plan has one entry per block. */
KVP_API kvp_status kvp_block_manager_swap_in(kvp_block_manager* manager, uint64_t seq_id,
                                             kvp_block_copy* out_plan, int32_t capacity,
                                             int32_t* out_num_copies);

/* 1 if `seq_id` is swapped out. */
KVP_API kvp_status kvp_block_manager_is_swapped(const kvp_block_manager* manager, uint64_t seq_id,
                                                int32_t* out_is_swapped);

KVP_API kvp_status kvp_block_manager_stats_get(const kvp_block_manager* manager,
                                               kvp_block_manager_stats* out_stats);

/* ------------------------------------------------------------------------------------------------
 * KV cache: pages per layer on a device, plus host swap pages and per-sequence state slots.
 *
 * Layouts of one layer (element strides may differ, but the head dimension must be contiguous):
 *  KVP_LAYOUT_KV_FIRST    [2, num_blocks, block_size, num_kv_heads, head_size]  (vLLM)
 *  KVP_LAYOUT_BLOCK_FIRST [num_blocks, 2, block_size, num_kv_heads, head_size]  (FlashInfer)
 * Index 0 of the "2" axis holds keys, 1 values.
 *
 * Thread safety: not thread-safe for writes; concurrent kvp_attention_run calls reading the same
 * cache are safe as long as no write, copy or swap on it runs at the same time.
 * ---------------------------------------------------------------------------------------------- */

typedef struct kvp_kv_cache kvp_kv_cache;

typedef enum kvp_kv_layout { KVP_LAYOUT_KV_FIRST = 0, KVP_LAYOUT_BLOCK_FIRST = 1 } kvp_kv_layout;

typedef struct kvp_kv_cache_options {
  size_t struct_size;
  int32_t num_layers;            /* > 0 */
  int32_t num_blocks;            /* > 0 device blocks per layer */
  int32_t block_size;            /* tokens per block; equal to the block manager's */
  int32_t num_kv_heads;          /* > 0 */
  int32_t head_size;             /* > 0 */
  int32_t dtype;                 /* kvp_dtype */
  int32_t layout;                /* kvp_kv_layout */
  int32_t num_host_blocks;       /* >= 0 host swap blocks per layer */
  int32_t num_state_slots;       /* >= 0 */
  int64_t state_bytes_per_layer; /* >= 0 bytes of each state slot, per layer */
  /* Since ABI 0.2. KVP_DTYPE_FP8_E4M3 caches (CUDA only) store K / k_scale and V / v_scale;
   * attention reads them back multiplied by the scale. Host arrays of num_layers scales, copied at
   * creation; NULL means 1.0 for every layer. Ignored by other dtypes. */
  const float* k_scales;
  const float* v_scales;
} kvp_kv_cache_options;

/* A cache whose pages kvplug allocates (zero-filled) on the context's device. */
KVP_API kvp_status kvp_kv_cache_create(const kvp_context* context,
                                       const kvp_kv_cache_options* options,
                                       kvp_kv_cache** out_cache);

/* A cache over the caller's tensors (zero copy), one per layer, each of the layout's 5-d shape on the
 * context's device with the options' dtype. The caller keeps them alive until destroy. Host swap
 * pages and state slots are still allocated by kvplug.
 * The cache writes these tensors, so no two of their elements may share an address: within a layer
 * (no block, position or head stride of 0 or too small, e.g. a block stride of half a block), K and V
 * must not overlap each other, and no two layers may share memory (layers interleaved in one
 * allocation, e.g. [num_blocks, num_layers, 2, ...], are fine). Tested as for every writable tensor:
 * with the axes of extent > 1 sorted by stride, each stride must be at least the span
 * 1 + sum (extent - 1) * stride of the axes before it (two layers: as one tensor with a layer axis).
 * KVP_ERR_INVALID_ARGUMENT otherwise, naming the tensor and its strides. */
KVP_API kvp_status kvp_kv_cache_create_from_tensors(const kvp_context* context,
                                                    const kvp_kv_cache_options* options,
                                                    const DLTensor* layer_tensors,
                                                    int32_t num_layer_tensors,
                                                    kvp_kv_cache** out_cache);

KVP_API void kvp_kv_cache_destroy(kvp_kv_cache* cache);

/* A view of layer `layer`'s device pages (`host` = 0) or host swap pages (`host` = 1; pinned,
 * kDLCUDAHost, for CUDA caches). Its shape and strides pointers stay valid until the cache is
 * destroyed. fp8 pages are described as uint8. */
KVP_API kvp_status kvp_kv_cache_layer_view(const kvp_kv_cache* cache, int32_t layer, int32_t host,
                                           DLTensor* out_view);

/* Write new keys and values ([num_tokens, num_kv_heads, head_size], float32/float16/bfloat16,
 * converted to the cache dtype) of `layer` to the slots in `slot_mapping` ([num_tokens] int64;
 * -1 skips a token), all on the cache's device. vLLM's reshape_and_cache. On the CPU every slot is
 * checked before anything is written (KVP_ERR_OUT_OF_RANGE). On CUDA the slots live in device
 * memory and cannot be read without a synchronization: the kernel skips slots outside the cache
 * instead (never writing out of bounds) and the call does not report them; kvp_attention_write_kv
 * checks the plan's host-side slot mapping and reports them. */
KVP_API kvp_status kvp_kv_cache_write(kvp_kv_cache* cache, int32_t layer, const DLTensor* key,
                                      const DLTensor* value, const DLTensor* slot_mapping);

/* Copy blocks src -> dst in every layer (copy-on-write plans). */
KVP_API kvp_status kvp_kv_cache_copy_blocks(kvp_kv_cache* cache, const kvp_block_copy* copies,
                                            int32_t num_copies);

/* Swap plans from the block manager: device -> host (out) and host -> device (in), every layer.
 * On CUDA, copies (and kvp_kv_cache_copy_blocks, kvp_kv_cache_copy_state) are queued on the
 * context's stream: synchronize it before reading host pages or reusing swapped-out blocks. */
KVP_API kvp_status kvp_kv_cache_swap_out(kvp_kv_cache* cache, const kvp_block_copy* copies,
                                         int32_t num_copies);
KVP_API kvp_status kvp_kv_cache_swap_in(kvp_kv_cache* cache, const kvp_block_copy* copies,
                                        int32_t num_copies);

/* The bytes of state slot `slot` in `layer` (on the cache's device), for backends with recurrent
 * state and for callers that inspect it. */
KVP_API kvp_status kvp_kv_cache_state(kvp_kv_cache* cache, int32_t layer, int32_t slot,
                                      void** out_data, int64_t* out_num_bytes);

/* Copy state slot src to dst in every layer (after a fork). */
KVP_API kvp_status kvp_kv_cache_copy_state(kvp_kv_cache* cache, int32_t src_slot, int32_t dst_slot);

/* ------------------------------------------------------------------------------------------------
 * Batch plans: the host-side description of one batch step, built once per step and used by every
 * layer's kvp_attention_run. All pointers in kvp_batch are host memory, read during the call only.
 *
 * The block table comes in either form (converted once, here):
 *  - dense: block_table [num_seqs, block_table_stride] row-major (vLLM), or
 *  - CSR: kv_indptr [num_seqs + 1] and kv_indices (FlashInfer), used when block_table is NULL.
 * Thread safety: not thread-safe for kvp_plan_update; concurrent runs reading one plan are safe.
 * ---------------------------------------------------------------------------------------------- */

typedef struct kvp_plan kvp_plan;
typedef struct kvp_attention kvp_attention;

typedef struct kvp_plan_options {
  size_t struct_size;
  int32_t max_num_seqs;       /* > 0 */
  int32_t max_num_tokens;     /* > 0: query tokens in one step */
  int32_t max_num_blocks;     /* > 0: blocks referenced by one step, all sequences together */
} kvp_plan_options;

typedef struct kvp_batch {
  size_t struct_size;
  int32_t num_seqs;                /* >= 1 */
  int32_t block_size;              /* tokens per block */
  const int32_t* query_start_loc;  /* [num_seqs + 1], non-decreasing, from 0 */
  const int32_t* seq_lens;         /* [num_seqs]: K/V length including this step's tokens */
  const int32_t* block_table;      /* dense form, or NULL */
  int32_t block_table_stride;      /* >= blocks needed by the longest sequence */
  const int32_t* kv_indptr;        /* CSR form when block_table is NULL */
  const int32_t* kv_indices;
  const int64_t* slot_mapping;     /* optional [num_tokens]: for kvp_attention_write_kv */
  const int32_t* state_slots;      /* optional [num_seqs]: for backends with state */
  /* Since ABI 0.4 (both optional; NULL keeps the 0.3 meaning). */
  const int32_t* context_lens;     /* [num_seqs], >= 0: global positions < context_lens[b] of
                                      sequence b are its context, the rest its query and generated
                                      tokens. Star Attention encodes the context in phase 1 and
                                      the rest in phase 2 (a chunk crossing the boundary is split
                                      by the plan). attamba (since 0.5) reads it as the compressed
                                      rows held in shared prefix-cache pages: chunk ends whose row
                                      is below it are not rewritten. Other backends ignore it.
                                      NULL: no context. */
  const int32_t* query_pos_starts; /* [num_seqs], >= 0: the global position of each sequence's
                                      first token of this step (the position id its RoPE used).
                                      NULL: seq_lens[b] - q_len_b. Given, seq_lens may be shorter
                                      than q_len_b (a Star shard that holds only context keys);
                                      dense sees its keys at positions 0..seq_lens[b]-1. */
} kvp_batch;

KVP_API kvp_status kvp_plan_create(const kvp_context* context, const kvp_plan_options* options,
                                   kvp_plan** out_plan);
KVP_API void kvp_plan_destroy(kvp_plan* plan);

/* Check `batch` and convert it into the plan's preallocated buffers (no allocation), then run the
 * step planner of every attention attached to the plan (kvp_plan_attach): key sets (Star's block
 * lists, split-KV partitions, ...) built once per step, uploaded on the context's stream, so that
 * kvp_attention_run only launches. KVP_ERR_OUT_OF_RANGE if it exceeds the plan's capacities.
 * On CUDA an attached attamba also builds its compressed write slots here and checks slot_mapping
 * against each token's window slot (KVP_ERR_INVALID_ARGUMENT naming slot_mapping[t], its value and
 * the expected slot), so kvp_attention_write_kv only launches; on the CPU (and for a plan it is not
 * attached to) that check is made by kvp_attention_write_kv.
 * On failure the plan is emptied. */
KVP_API kvp_status kvp_plan_update(kvp_plan* plan, const kvp_batch* batch);

/* Since ABI 0.3. Attach `attention` to `plan`: allocates (once) the plan-side buffers its step
 * planner needs and builds them for the plan's current batch; every later kvp_plan_update plans
 * for it too. Attentions whose planners agree (e.g. every dense layer of a model) share one step.
 * An attention run on a plan it was not attached to attaches itself at that run (allocating once,
 * and building on the host at each step): attach before capturing runs in a CUDA graph.
 * Both handles must belong to the same context. The plan keeps what it needs past the attention's
 * destroy. KVP_ERR_INVALID_ARGUMENT (NULLs, different contexts), KVP_ERR_OUT_OF_MEMORY. */
KVP_API kvp_status kvp_plan_attach(kvp_plan* plan, const kvp_attention* attention);

/* ------------------------------------------------------------------------------------------------
 * Attention backends
 *
 * Configs: a FlatBuffers `kvplug.AttentionConfig` (abi/schema/kvplug_config.fbs), as verified binary
 * or as JSON text parsed against the schema built into the library, e.g.
 *   {"backend_config_type": "DenseConfig", "backend_config": {"window_left": -1}}
 * A NULL config takes the backend's defaults. The config's type must match the backend name.
 * Stable: DenseConfig, StarConfig, EntropyConfig and KvShiftConfig (since 0.4). EXPERIMENTAL (its
 * fields may still change until the backend lands and kvp_backend_device_info reports
 * experimental = 0): AttambaConfig.
 *
 * Thread safety: an attention handle is immutable after creation; runs on one handle from several
 * threads are safe if they write to different outputs.
 * ---------------------------------------------------------------------------------------------- */

/* kvp_attention: declared with the plans above. */

typedef enum kvp_config_format {
  KVP_CONFIG_NONE = 0,    /* defaults */
  KVP_CONFIG_BINARY = 1,  /* FlatBuffers binary, verified */
  KVP_CONFIG_JSON = 2     /* JSON text (need not be NUL-terminated; config_size bytes) */
} kvp_config_format;

typedef struct kvp_attention_options {
  size_t struct_size;
  const char* backend;      /* e.g. "dense" */
  int32_t num_q_heads;      /* > 0, a multiple of num_kv_heads */
  int32_t num_kv_heads;     /* > 0 */
  int32_t head_size;        /* a size listed by kvp_backend_info_get */
  int32_t kv_dtype;         /* kvp_dtype of the caches it will read */
  float sm_scale;           /* softmax scale; 0 = 1/sqrt(head_size) */
  int32_t config_format;    /* kvp_config_format */
  const void* config;
  size_t config_size;
} kvp_attention_options;

KVP_API kvp_status kvp_attention_create(const kvp_context* context,
                                        const kvp_attention_options* options,
                                        kvp_attention** out_attention);
KVP_API void kvp_attention_destroy(kvp_attention* attention);

/* Check a config without creating a backend. A JSON config nesting objects and arrays more than 16
 * levels deep is refused before it is parsed (KVP_ERR_INVALID_CONFIG; the schema needs 3). */
KVP_API kvp_status kvp_config_check(const char* backend, int32_t config_format, const void* config,
                                    size_t config_size);

/* Write this step's new keys/values of `layer` through the backend (a backend may transform them or
 * update per-sequence state; dense writes them as they are) at the plan's slot_mapping.
 * key/value: [num_tokens, num_kv_heads, head_size]. */
KVP_API kvp_status kvp_attention_write_kv(const kvp_attention* attention, const kvp_plan* plan,
                                          kvp_kv_cache* cache, int32_t layer, const DLTensor* key,
                                          const DLTensor* value);

/* Attention of this step's queries over `layer` of `cache`, causal (dense; other backends see the
 * key sets their paper defines): query token i of sequence b sits
 * at position seq_lens[b] - q_len_b + i and sees positions [0, that]. The cache must already hold
 * this step's K/V. query/out: [num_tokens, num_q_heads, head_size], float32/float16/bfloat16, same
 * dtype, on the context's device; `lse` (optional) [num_tokens, num_q_heads] float32 receives the
 * natural log-sum-exp of the scaled logits. No allocation; launches on the context's stream. */
KVP_API kvp_status kvp_attention_run(const kvp_attention* attention, const kvp_plan* plan,
                                     const kvp_kv_cache* cache, int32_t layer,
                                     const DLTensor* query, DLTensor* out, DLTensor* lse);

/* Since ABI 0.3: the outputs of kvp_attention_run_v2. Every writable tensor must not overlap any
 * other and no two of its elements may share an address (no stride of 0 over an axis of extent > 1:
 * with the axes of extent > 1 sorted by stride, each stride must be at least the span
 * 1 + sum (extent - 1) * stride of the axes before it; empty tensors always pass). The same holds for
 * kvp_attention_run's out and lse, kvp_attention_merge_states' outputs and every later output;
 * KVP_ERR_INVALID_ARGUMENT names the tensor and its strides. Read-only inputs may broadcast only
 * where their description says so. */
typedef struct kvp_attention_outputs {
  size_t struct_size;
  DLTensor* out;      /* required: [num_tokens, num_q_heads, head_size], the query's dtype */
  DLTensor* lse;      /* optional [num_tokens, num_q_heads] float32: natural log-sum-exp of the
                         scaled logits (-inf for a row that saw no key) */
  DLTensor* entropy;  /* optional [num_tokens, num_q_heads] float32: the attention entropy of each
                         row in nats, H = -sum_j a_j log a_j, computed inside the kernel from running
                         sums (no probabilities stored); needs supports_entropy */
  /* Since ABI 0.4. */
  DLTensor* entropy_summary; /* optional [num_q_heads, 6] float32, contiguous, needs supports_entropy:
                                per head over this run's rows, {rows that saw a key, their mean
                                entropy, informative rows (>= 2 keys, E_max = log(keys) > 0), their
                                mean H / E_max, rows in the collapse band H <= E_max/4, rows in the
                                overload band H >= 3 E_max/4} (entropy-guided attention's bands).
                                Computed on the run's device: no synchronization per layer. */
} kvp_attention_outputs;

/* kvp_attention_run with an outputs struct (room for more outputs later). Statuses as
 * kvp_attention_run: KVP_ERR_INVALID_ARGUMENT (NULLs, shapes, dtypes, devices, strides),
 * KVP_ERR_OUT_OF_RANGE (layer, blocks), KVP_ERR_FAILED_PRECONDITION (empty plan),
 * KVP_ERR_NOT_SUPPORTED (an output the backend does not offer), KVP_ERR_DEVICE (a launch failed). */
KVP_API kvp_status kvp_attention_run_v2(const kvp_attention* attention, const kvp_plan* plan,
                                        const kvp_kv_cache* cache, int32_t layer,
                                        const DLTensor* query, const kvp_attention_outputs* outputs);

/* Since ABI 0.3: merge S partial attention states of the same queries over disjoint key sets (split
 * KV, shards of a sequence held on other GPUs or hosts, a caller's own partials) into one, exactly
 * and stably: lse = max_i lse_i + log sum_i exp(lse_i - max), out = sum_i exp(lse_i - lse) out_i.
 * A partial with lse = -inf is empty and has weight 0 (merging it with another yields the other
 * exactly); gaps of any size neither overflow nor give NaN. With entropies, each partial's mean
 * logit lse_i - H_i is merged with the same weights: H = lse - sum_i w_i (lse_i - H_i).
 * FlashInfer's merge_state uses base-2 lse: multiply those by ln 2 first. */
typedef struct kvp_merge_states_args {
  size_t struct_size;
  const DLTensor* partial_out;      /* [S, T, H, D] float32/float16/bfloat16 */
  const DLTensor* partial_lse;      /* [S, T, H] float32, natural log */
  const DLTensor* partial_entropy;  /* optional [S, T, H] float32 (required for entropy) */
  DLTensor* out;                    /* [T, H, D], any of the three float dtypes */
  DLTensor* lse;                    /* optional [T, H] float32 */
  DLTensor* entropy;                /* optional [T, H] float32 */
} kvp_merge_states_args;

/* All tensors on the context's device (CPU: computed on the context's threads; CUDA: launched on its
 * stream, D a multiple of 8 up to 512, 16-byte aligned rows). KVP_ERR_INVALID_ARGUMENT for NULLs,
 * shapes, dtypes, devices, or writable outputs that overlap each other or the inputs. */
KVP_API kvp_status kvp_attention_merge_states(const kvp_context* context, const kvp_merge_states_args* args);

/* Since ABI 0.3: bytes of per-sequence state per layer that `attention` keeps in a cache's state
 * slots (0 for stateless backends such as dense). Create caches with state_bytes_per_layer at least
 * this. */
KVP_API kvp_status kvp_attention_state_bytes(const kvp_attention* attention, int64_t* out_bytes_per_layer);

/* Since ABI 0.5: where a sequence's K/V rows live in its page list for a step over positions
 * [query_pos_start, num_tokens) (num_tokens: the sequence's length after the step). Token-stream
 * backends (dense, star, kv_shift, entropy): seq_len = num_tokens, every position p at row p,
 * window_pages = ceil(num_tokens / block_size), nothing compressed. Compressed caches (attamba):
 * the list is [compressed_pages pages of chunk-end rows][window_pages token-stream pages, the
 * first being token page window_first_page]; kvp_batch.seq_lens[b] must be seq_len and
 * query_pos_starts[b] the step's first position. Token pages before window_first_page are no
 * longer read (free them); the first stable_rows compressed rows never change again (their full
 * pages can be prefix-cached). */
typedef struct kvp_cache_layout {
  size_t struct_size;
  int32_t seq_len;            /* kvp_batch.seq_lens value: rows the page list covers */
  int32_t num_pages;          /* compressed_pages + window_pages */
  int32_t compressed_rows;    /* compressed rows in use (the most any layer needs) */
  int32_t compressed_pages;
  int32_t stable_rows;        /* compressed rows every layer has written for good */
  int32_t window_first_page;  /* the first token-stream page in the list */
  int32_t window_pages;
} kvp_cache_layout;

KVP_API kvp_status kvp_attention_cache_layout(const kvp_attention* attention, int32_t block_size, int32_t num_tokens,
                                              int32_t query_pos_start, kvp_cache_layout* out_layout);

/* Since ABI 0.5: a backend's sequence-state operator over the plan's tokens (attamba: the
 * chunk-local Mamba-2 block that makes K or V: causal depthwise conv + SiLU over xBC, selective scan,
 * D skip, y * silu(z), grouped RMSNorm; state reset at every chunk start of the layer). The engine
 * runs in_proj before and out_proj after (K = x + out_proj(y)). State: the cache's state slots
 * (kvp_batch.state_slots, kvp_attention_state_bytes); kvp_batch.query_pos_starts required. Tensors
 * float32 on the cache's device (CPU so far), last axis contiguous. Shapes with d_inner = ssm_heads x
 * ssm_head_dim, conv_dim = d_inner + 2 ssm_groups state_size: in [T, 2 d_inner + 2 G N + heads]
 * (in_proj's output [z | xBC | dt]), conv_weight [conv_dim, conv_width] (the last column multiplies
 * the current token), conv_bias [conv_dim], dt_bias, a_log, d_skip [heads], norm_weight [d_inner],
 * out [T, d_inner]. Optional (NULL): conv_bias, dt_bias, d_skip (0), norm_weight (gate only).
 * KVP_ERR_NOT_SUPPORTED for backends without one. */
typedef struct kvp_ssm_args {
  size_t struct_size;
  int32_t which;  /* attamba: 0 the key SSM, 1 the value SSM (separate state) */
  const DLTensor* in;
  const DLTensor* conv_weight;
  const DLTensor* conv_bias;
  const DLTensor* dt_bias;
  const DLTensor* a_log;
  const DLTensor* d_skip;
  const DLTensor* norm_weight;
  DLTensor* out;
} kvp_ssm_args;

KVP_API kvp_status kvp_attention_ssm(const kvp_attention* attention, const kvp_plan* plan, kvp_kv_cache* cache,
                                     int32_t layer, const kvp_ssm_args* args);

/* ------------------------------------------------------------------------------------------------
 * Communicators (since ABI 0.4): merge partial attention states held by several shards (Star
 * Attention's phase 2: every shard attends the query to the context keys it holds; the partials
 * (out, lse) are all-gathered and merged exactly, as kvp_attention_merge_states does, so that every
 * rank ends with the attention over all keys).
 *
 *  - KVP_COMM_IN_PROCESS: one handle for all ranks of one process (one context, one device). Each
 *    rank contributes its partial with kvp_comm_merge_attention, in any order, from any thread; the
 *    call that completes the round merges and writes the result into every rank's out (and lse).
 *    Until then earlier ranks' tensors must stay alive and unread. Not a barrier: with threads, the
 *    caller synchronizes before reading.
 *  - KVP_COMM_NCCL: one handle per rank (one process or thread per GPU). NCCL is loaded with dlopen
 *    on first use (libnccl.so.2; KVP_ERR_NOT_SUPPORTED if absent); the caller distributes the
 *    unique id from kvp_comm_nccl_unique_id to every rank as it likes. Each call all-gathers the
 *    partials on the context's stream and merges them there (every rank must call with the same
 *    number of tokens: set validate_each_call to check it, at the price of a synchronization).
 *    Leave NVLink multicast off (NCCL_NVLS_ENABLE=0).
 * Thread safety: in-process handles are thread-safe; an NCCL handle is not.
 * ---------------------------------------------------------------------------------------------- */

typedef struct kvp_comm kvp_comm;

#define KVP_NCCL_UNIQUE_ID_BYTES 128

typedef enum kvp_comm_kind {
  KVP_COMM_IN_PROCESS = 1,
  KVP_COMM_NCCL = 2
} kvp_comm_kind;

typedef struct kvp_comm_options {
  size_t struct_size;
  int32_t kind;                    /* kvp_comm_kind */
  int32_t num_ranks;               /* in [1, 1024] */
  int32_t rank;                    /* NCCL: this handle's rank in [0, num_ranks); in-process: 0 */
  const uint8_t* nccl_unique_id;   /* NCCL: KVP_NCCL_UNIQUE_ID_BYTES bytes; else NULL */
  int32_t max_num_tokens;          /* > 0: rows of one merge (scratch is sized once from these) */
  int32_t num_heads;               /* > 0: query heads */
  int32_t head_size;               /* > 0 */
  int32_t out_dtype;               /* kvp_dtype of the partial outputs (float32/float16/bfloat16) */
  int32_t validate_each_call;      /* NCCL: 1 = check that all ranks pass equal shapes per call */
} kvp_comm_options;

/* NCCL's unique id for a new communicator, on the rank that creates it (out_id: 128 bytes).
 * KVP_ERR_NOT_SUPPORTED without libnccl.so.2; KVP_ERR_DEVICE if NCCL fails. */
KVP_API kvp_status kvp_comm_nccl_unique_id(uint8_t* out_id);

/* NCCL: collective over all ranks (each must call it); shapes, kinds and head counts are exchanged
 * and checked once here (KVP_ERR_INVALID_ARGUMENT naming the ranks that differ). KVP_ERR_NOT_SUPPORTED
 * for NCCL on a CPU context, in a build without CUDA, or without libnccl.so.2. */
KVP_API kvp_status kvp_comm_create(const kvp_context* context, const kvp_comm_options* options,
                                   kvp_comm** out_comm);
KVP_API void kvp_comm_destroy(kvp_comm* comm);

/* Contribute `rank`'s partial attention (out [T, H, D] contiguous, the comm's dtype; lse [T, H]
 * float32, natural log, -inf for rows that saw no key) and receive the merge over all ranks in
 * place. T <= max_num_tokens. KVP_ERR_FAILED_PRECONDITION if `rank` already contributed to the
 * round in progress; KVP_ERR_INVALID_ARGUMENT for a rank outside [0, num_ranks), shapes, dtypes or
 * devices that differ from the
 * comm's or from the round's first contribution; KVP_ERR_DEVICE for a failed NCCL call. */
KVP_API kvp_status kvp_comm_merge_attention(kvp_comm* comm, int32_t rank, DLTensor* out, DLTensor* lse);

/* In-process: the ranks that contributed to the round in progress (0 when none is open). */
KVP_API kvp_status kvp_comm_pending(const kvp_comm* comm, int32_t* out_num_contributed);

/* ------------------------------------------------------------------------------------------------
 * Star Attention's context blocks in the prefix cache (since ABI 0.4).
 *
 * A Star context block (Star phase 1) depends only on the anchor (the first anchor_size tokens) and
 * its own tokens at their positions, not on the blocks between. The chained hash keys a block by
 * its whole prefix, so a document whose middle differs misses every block after the change; the
 * Star key (anchor hash, the block's tokens, its start position) reuses every unchanged block.
 * Query and generated tokens attend to the whole context and keep a key chained from all of it.
 * ---------------------------------------------------------------------------------------------- */

typedef struct kvp_star_layout {
  size_t struct_size;
  int64_t context_len;        /* >= 0: tokens [0, context_len) are context */
  int32_t context_block_size; /* > 0, a multiple of the manager's block_size */
  int32_t anchor_size;        /* in [1, context_block_size] */
} kvp_star_layout;

/* kvp_block_manager_allocate with Star keys for the context. `out_cached_blocks` (optional,
 * ceil(num_tokens / block_size) entries) receives 1 for each block whose K/V is already cached
 * (hits need not be leading: recompute only the Star blocks with a 0, in increasing order, then
 * kvp_block_manager_mark_computed as usual); `out_num_cached_tokens` (optional) the tokens in those
 * blocks. The last token is never served from the cache. The sequence keeps Star keys when
 * appended to. Statuses as kvp_block_manager_allocate, KVP_ERR_INVALID_ARGUMENT for the layout. */
KVP_API kvp_status kvp_block_manager_allocate_star(kvp_block_manager* manager, uint64_t seq_id,
                                                   const int32_t* token_ids, int64_t num_tokens,
                                                   uint64_t extra_key, const kvp_star_layout* layout,
                                                   uint8_t* out_cached_blocks,
                                                   int64_t* out_num_cached_tokens);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* KVPLUG_KVPLUG_H_ */
