/* C helpers for the Go binding. Each one does in a single cgo call what would otherwise take
 * several, or builds a struct that must not live in Go memory: a DLTensor or a kvp_batch holds
 * pointers, and cgo forbids passing C a Go struct that contains Go pointers. Go slices arrive as
 * plain pointer arguments (pinned by cgo for the duration of the call) and the structs pointing at
 * them are built here, on the C stack, so nothing of Go's outlives the call. */
#ifndef KVPLUG_BINDINGS_GO_KVPLUG_GO_H_
#define KVPLUG_BINDINGS_GO_KVPLUG_GO_H_

#include <stdlib.h>
#include <string.h>

#include <kvplug/kvplug.h>

/* Element types of tensors crossing the ABI: kvp_dtype values for the floats, plus int64. */
enum { KVPG_INT64 = 100 };

/* A tensor's description without its data pointer (so Go may keep it in Go memory). */
typedef struct kvpg_desc {
  int32_t dtype; /* kvp_dtype (float32, float16, bfloat16) or KVPG_INT64 */
  int32_t ndim;  /* <= 4 */
  int64_t shape[4];
} kvpg_desc;

/* A compact row-major CPU DLTensor over `data`. Its shape points into `d`, which outlives the call. */
static inline DLTensor kvpg_tensor(void* data, const kvpg_desc* d) {
  DLTensor t;
  memset(&t, 0, sizeof t);
  t.data = data;
  t.device.device_type = kDLCPU;
  t.device.device_id = 0;
  t.ndim = d->ndim;
  t.shape = (int64_t*)d->shape;
  t.strides = NULL; /* compact row-major */
  t.byte_offset = 0;
  t.dtype.lanes = 1;
  switch (d->dtype) {
    case KVP_DTYPE_FLOAT32: t.dtype.code = kDLFloat; t.dtype.bits = 32; break;
    case KVP_DTYPE_FLOAT16: t.dtype.code = kDLFloat; t.dtype.bits = 16; break;
    case KVP_DTYPE_BFLOAT16: t.dtype.code = kDLBfloat; t.dtype.bits = 16; break;
    default: t.dtype.code = kDLInt; t.dtype.bits = 64; break;
  }
  return t;
}

static inline kvp_status kvpg_context_create(int32_t num_threads, kvp_context** out) {
  kvp_context_options o;
  memset(&o, 0, sizeof o);
  o.struct_size = sizeof o;
  o.device_type = kDLCPU;
  o.num_threads = num_threads;
  return kvp_context_create(&o, out);
}

static inline kvp_status kvpg_kv_cache_write(kvp_kv_cache* cache, int32_t layer, void* key, const kvpg_desc* kd,
                                             void* value, const kvpg_desc* vd, int64_t* slots,
                                             int64_t num_slots) {
  DLTensor k = kvpg_tensor(key, kd), v = kvpg_tensor(value, vd);
  kvpg_desc sd;
  memset(&sd, 0, sizeof sd);
  sd.dtype = KVPG_INT64;
  sd.ndim = 1;
  sd.shape[0] = num_slots;
  DLTensor s = kvpg_tensor(slots, &sd);
  return kvp_kv_cache_write(cache, layer, &k, &v, &s);
}

static inline kvp_status kvpg_attention_write_kv(const kvp_attention* attention, const kvp_plan* plan,
                                                 kvp_kv_cache* cache, int32_t layer, void* key,
                                                 const kvpg_desc* kd, void* value, const kvpg_desc* vd) {
  DLTensor k = kvpg_tensor(key, kd), v = kvpg_tensor(value, vd);
  return kvp_attention_write_kv(attention, plan, cache, layer, &k, &v);
}

/* kvp_attention_run_v2 with its outputs struct built here; a NULL desc leaves that output unset. */
static inline kvp_status kvpg_attention_run(const kvp_attention* attention, const kvp_plan* plan,
                                            const kvp_kv_cache* cache, int32_t layer, void* query,
                                            const kvpg_desc* qd, void* out, const kvpg_desc* od, void* lse,
                                            const kvpg_desc* ld, void* entropy, const kvpg_desc* ed,
                                            void* summary, const kvpg_desc* sd) {
  DLTensor q = kvpg_tensor(query, qd), o = kvpg_tensor(out, od), l, e, s;
  kvp_attention_outputs outs;
  memset(&outs, 0, sizeof outs);
  outs.struct_size = sizeof outs;
  outs.out = &o;
  if (ld) {
    l = kvpg_tensor(lse, ld);
    outs.lse = &l;
  }
  if (ed) {
    e = kvpg_tensor(entropy, ed);
    outs.entropy = &e;
  }
  if (sd) { /* since ABI 0.4 */
    s = kvpg_tensor(summary, sd);
    outs.entropy_summary = &s;
  }
  return kvp_attention_run_v2(attention, plan, cache, layer, &q, &outs);
}

/* kvp_attention_merge_states; NULL descs mark the optional tensors absent. */
static inline kvp_status kvpg_merge_states(const kvp_context* context, void* partial_out, const kvpg_desc* pod,
                                           void* partial_lse, const kvpg_desc* pld, void* partial_entropy,
                                           const kvpg_desc* ped, void* out, const kvpg_desc* od, void* lse,
                                           const kvpg_desc* ld, void* entropy, const kvpg_desc* ed) {
  DLTensor po = kvpg_tensor(partial_out, pod), pl = kvpg_tensor(partial_lse, pld), pe, o = kvpg_tensor(out, od), l, e;
  kvp_merge_states_args a;
  memset(&a, 0, sizeof a);
  a.struct_size = sizeof a;
  a.partial_out = &po;
  a.partial_lse = &pl;
  a.out = &o;
  if (ped) {
    pe = kvpg_tensor(partial_entropy, ped);
    a.partial_entropy = &pe;
  }
  if (ld) {
    l = kvpg_tensor(lse, ld);
    a.lse = &l;
  }
  if (ed) {
    e = kvpg_tensor(entropy, ed);
    a.entropy = &e;
  }
  return kvp_attention_merge_states(context, &a);
}

/* kvp_attention_ssm (ABI 0.5); NULL descs mark the optional tensors absent. */
static inline kvp_status kvpg_attention_ssm(const kvp_attention* attention, const kvp_plan* plan, kvp_kv_cache* cache,
                                            int32_t layer, int32_t which, void* in, const kvpg_desc* ind,
                                            void* conv_weight, const kvpg_desc* cwd, void* conv_bias,
                                            const kvpg_desc* cbd, void* dt_bias, const kvpg_desc* dbd, void* a_log,
                                            const kvpg_desc* ald, void* d_skip, const kvpg_desc* dsd,
                                            void* norm_weight, const kvpg_desc* nwd, void* out, const kvpg_desc* od) {
  DLTensor x = kvpg_tensor(in, ind), cw = kvpg_tensor(conv_weight, cwd), al = kvpg_tensor(a_log, ald),
           o = kvpg_tensor(out, od), cb, db, ds, nw;
  kvp_ssm_args a;
  memset(&a, 0, sizeof a);
  a.struct_size = sizeof a;
  a.which = which;
  a.in = &x;
  a.conv_weight = &cw;
  a.a_log = &al;
  a.out = &o;
  if (cbd) {
    cb = kvpg_tensor(conv_bias, cbd);
    a.conv_bias = &cb;
  }
  if (dbd) {
    db = kvpg_tensor(dt_bias, dbd);
    a.dt_bias = &db;
  }
  if (dsd) {
    ds = kvpg_tensor(d_skip, dsd);
    a.d_skip = &ds;
  }
  if (nwd) {
    nw = kvpg_tensor(norm_weight, nwd);
    a.norm_weight = &nw;
  }
  return kvp_attention_ssm(attention, plan, cache, layer, &a);
}

/* kvp_batch built here from the Go slices' pointers (NULL for absent optional arrays). */
static inline kvp_status kvpg_plan_update(kvp_plan* plan, int32_t num_seqs, int32_t block_size,
                                          const int32_t* query_start_loc, const int32_t* seq_lens,
                                          const int32_t* block_table, int32_t block_table_stride,
                                          const int32_t* kv_indptr, const int32_t* kv_indices,
                                          const int64_t* slot_mapping, const int32_t* state_slots,
                                          const int32_t* context_lens, const int32_t* query_pos_starts) {
  kvp_batch b;
  memset(&b, 0, sizeof b);
  b.struct_size = sizeof b;
  b.num_seqs = num_seqs;
  b.block_size = block_size;
  b.query_start_loc = query_start_loc;
  b.seq_lens = seq_lens;
  b.block_table = block_table;
  b.block_table_stride = block_table_stride;
  b.kv_indptr = kv_indptr;
  b.kv_indices = kv_indices;
  b.slot_mapping = slot_mapping;
  b.state_slots = state_slots;
  b.context_lens = context_lens;
  b.query_pos_starts = query_pos_starts;
  return kvp_plan_update(plan, &b);
}

/* Shape, strides and dtype of a layer view, and the bytes its data spans. */
static inline kvp_status kvpg_layer_info(const kvp_kv_cache* cache, int32_t layer, int32_t host,
                                         int64_t* shape5, int64_t* strides5, int32_t* code, int32_t* bits,
                                         int64_t* span_bytes) {
  DLTensor v;
  kvp_status s = kvp_kv_cache_layer_view(cache, layer, host, &v);
  if (s != KVP_OK) return s;
  int64_t extent = 1, numel = 1;
  for (int i = 0; i < v.ndim && i < 5; ++i) {
    shape5[i] = v.shape[i];
    strides5[i] = v.strides[i];
    numel *= v.shape[i];
    extent += (v.shape[i] - 1) * v.strides[i];
  }
  *code = v.dtype.code;
  *bits = v.dtype.bits;
  *span_bytes = numel == 0 ? 0 : extent * (v.dtype.bits / 8);
  return KVP_OK;
}

/* Copy the first `num_bytes` of a layer view's data (sized by kvpg_layer_info) to `dst`. */
static inline kvp_status kvpg_layer_copy(const kvp_kv_cache* cache, int32_t layer, int32_t host, void* dst,
                                         int64_t num_bytes) {
  DLTensor v;
  kvp_status s = kvp_kv_cache_layer_view(cache, layer, host, &v);
  if (s != KVP_OK) return s;
  if (num_bytes > 0) memcpy(dst, (const char*)v.data + v.byte_offset, (size_t)num_bytes);
  return KVP_OK;
}

/* The size of a state slot and, if `capacity` suffices, a copy of its bytes in `dst`. */
static inline kvp_status kvpg_state_copy(kvp_kv_cache* cache, int32_t layer, int32_t slot, void* dst,
                                         int64_t capacity, int64_t* num_bytes) {
  void* data;
  kvp_status s = kvp_kv_cache_state(cache, layer, slot, &data, num_bytes);
  if (s != KVP_OK) return s;
  if (*num_bytes > 0 && *num_bytes <= capacity) memcpy(dst, data, (size_t)*num_bytes);
  return KVP_OK;
}

/* One in-process round (ABI 0.4): rank r's partial is outs[r] / lses[r] (C memory, described by
 * od / ld), contributed in rank order; stops at the first failure and reports its rank. */
static inline kvp_status kvpg_comm_merge_all(kvp_comm* comm, int32_t num_ranks, void** outs, const kvpg_desc* od,
                                             void** lses, const kvpg_desc* ld, DLTensor* tensors,
                                             int32_t* failed_rank) {
  for (int32_t r = 0; r < num_ranks; ++r) {
    /* The DLTensors live in C memory owned by the caller until the round completes. */
    tensors[2 * r] = kvpg_tensor(outs[r], od);
    tensors[2 * r + 1] = kvpg_tensor(lses[r], ld);
    kvp_status s = kvp_comm_merge_attention(comm, r, &tensors[2 * r], &tensors[2 * r + 1]);
    if (s != KVP_OK) {
      *failed_rank = r;
      return s;
    }
  }
  return KVP_OK;
}

/* One contribution over C memory (data, descs and DLTensors stay valid until the round completes). */
static inline kvp_status kvpg_comm_contribute(kvp_comm* comm, int32_t rank, void* out, const kvpg_desc* od, void* lse,
                                              const kvpg_desc* ld, DLTensor* tensors) {
  tensors[0] = kvpg_tensor(out, od);
  tensors[1] = kvpg_tensor(lse, ld);
  return kvp_comm_merge_attention(comm, rank, &tensors[0], &tensors[1]);
}

#endif /* KVPLUG_BINDINGS_GO_KVPLUG_GO_H_ */
