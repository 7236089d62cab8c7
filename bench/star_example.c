/* Star Attention through the C ABI, the sequence of calls a serving engine makes (README "Star
 * Attention"). One layer, CPU, float32; the K/V/Q values are made up (an engine gets them from its
 * projections). It encodes a 100-token context in chunks of 40 (phase 1: blocks of 32 tokens, each
 * seeing a 16-token anchor), then a 4-token query and one decode (phase 2), and then the same
 * query on two in-process shards merged by a kvp_comm; it checks that the shards give the single
 * shard's output and exits non-zero otherwise. Usage: kvplug-star-example [path/to/libkvplug.so] */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvplug/kvplug_dl.h"

enum { kHq = 4, kHkv = 2, kD = 32, kPage = 8, kContext = 100, kQuery = 4, kBlock = 32, kAnchor = 16 };

static kvp_api api;
#define CHECK(call)                                                              \
  do {                                                                           \
    kvp_status s_ = api.call;                                                    \
    if (s_ != KVP_OK) {                                                          \
      fprintf(stderr, "%s: %s\n", #call, api.kvp_last_error());                  \
      exit(1);                                                                   \
    }                                                                            \
  } while (0)

static float value_of(int pos, int i, int which) { return sinf(0.37f * (float)pos + 0.11f * (float)i + (float)which); }

static DLTensor tensor(void* data, DLDataType dt, int ndim, int64_t* shape) {
  DLTensor t;
  memset(&t, 0, sizeof t);
  t.data = data;
  t.device.device_type = kDLCPU;
  t.ndim = ndim;
  t.dtype = dt;
  t.shape = shape;
  return t;
}

static kvp_attention* star_attention(kvp_context* ctx, int shards, int rank) {
  char config[256];
  snprintf(config, sizeof config,
           "{\"backend_config_type\": \"StarConfig\", \"backend_config\": {\"context_block_size\": %d, "
           "\"anchor_block_size\": %d, \"num_shards\": %d, \"shard_rank\": %d}}", kBlock, kAnchor, shards, rank);
  kvp_attention_options ao;
  memset(&ao, 0, sizeof ao);
  ao.struct_size = sizeof ao;
  ao.backend = "star";
  ao.num_q_heads = kHq;
  ao.num_kv_heads = kHkv;
  ao.head_size = kD;
  ao.kv_dtype = KVP_DTYPE_FLOAT32;
  ao.config_format = KVP_CONFIG_JSON;
  ao.config = config;
  ao.config_size = strlen(config);
  kvp_attention* attn;
  CHECK(kvp_attention_create(ctx, &ao, &attn));
  return attn;
}

/* One step of one sequence: write the K/V of `n` tokens at global positions `pos[]` into local
 * cache indices [len - n, len) (slot_mapping -1: not stored on this shard), then attend. */
static void step(kvp_attention* attn, kvp_plan* plan, kvp_kv_cache* cache, int first_page, const int* pos, int n,
                 int len, int context_len, int pos_start, int store, float* out, float* lse) {
  static float k[64 * kHkv * kD], v[64 * kHkv * kD], q[64 * kHq * kD];
  int64_t slots[64];
  int32_t pages[64] = {0};
  for (int j = 0; j < 64 - first_page; ++j) pages[j] = first_page + j;  /* local keys [8j, 8j+8) in page first_page + j */
  for (int t = 0; t < n; ++t) {
    slots[t] = store ? (int64_t)first_page * kPage + (len - n + t) : -1;
    for (int i = 0; i < kHkv * kD; ++i) k[t * kHkv * kD + i] = value_of(pos[t], i, 0), v[t * kHkv * kD + i] = value_of(pos[t], i, 1);
    for (int i = 0; i < kHq * kD; ++i) q[t * kHq * kD + i] = value_of(pos[t], i, 2);
  }
  int32_t qsl[2] = {0, n}, seq_lens[1] = {len}, indptr[2] = {0, (len + kPage - 1) / kPage};
  int32_t ctx_lens[1] = {context_len}, starts[1] = {pos_start};
  kvp_batch b;
  memset(&b, 0, sizeof b);
  b.struct_size = sizeof b;
  b.num_seqs = 1;
  b.block_size = kPage;
  b.query_start_loc = qsl;
  b.seq_lens = seq_lens;
  b.kv_indptr = indptr;
  b.kv_indices = pages;
  b.slot_mapping = slots;
  b.context_lens = ctx_lens;                         /* positions < 100 are context: phase 1 */
  b.query_pos_starts = pos_start >= 0 ? starts : NULL; /* shards: where this step's tokens are */
  CHECK(kvp_plan_update(plan, &b));
  const DLDataType f32 = {kDLFloat, 32, 1};
  int64_t kv_shape[3] = {n, kHkv, kD}, q_shape[3] = {n, kHq, kD}, l_shape[2] = {n, kHq};
  DLTensor kt = tensor(k, f32, 3, kv_shape), vt = tensor(v, f32, 3, kv_shape);
  DLTensor qt = tensor(q, f32, 3, q_shape), ot = tensor(out, f32, 3, q_shape), lt = tensor(lse, f32, 2, l_shape);
  CHECK(kvp_attention_write_kv(attn, plan, cache, 0, &kt, &vt));
  CHECK(kvp_attention_run(attn, plan, cache, 0, &qt, &ot, &lt));
}

int main(int argc, char** argv) {
  char error[512];
  if (kvp_api_load(&api, argc > 1 ? argv[1] : "libkvplug.so.0", error, sizeof error) != 0) {
    fprintf(stderr, "%s\n", error);
    return 1;
  }
  kvp_context* ctx;
  CHECK(kvp_context_create(NULL, &ctx));
  kvp_kv_cache_options co;
  memset(&co, 0, sizeof co);
  co.struct_size = sizeof co;
  co.num_layers = 1;
  co.num_blocks = 64;
  co.block_size = kPage;
  co.num_kv_heads = kHkv;
  co.head_size = kD;
  co.dtype = KVP_DTYPE_FLOAT32;
  kvp_plan_options po = {sizeof po, 1, 64, 64};
  kvp_plan* plan;
  CHECK(kvp_plan_create(ctx, &po, &plan));
  static float out[64 * kHq * kD], lse[64 * kHq], one_out[kQuery * kHq * kD], one_lse[kQuery * kHq];
  int pos[64];

  /* One shard. Phase 1: the context in chunks of 40 (chunks need not align with Star blocks). */
  kvp_kv_cache* cache;
  CHECK(kvp_kv_cache_create(ctx, &co, &cache));
  kvp_attention* star = star_attention(ctx, 1, 0);
  CHECK(kvp_plan_attach(plan, star));
  for (int begin = 0; begin < kContext; begin += 40) {
    const int n = begin + 40 <= kContext ? 40 : kContext - begin;
    for (int t = 0; t < n; ++t) pos[t] = begin + t;
    step(star, plan, cache, 0, pos, n, begin + n, kContext, -1, 1, out, lse);
  }
  /* Phase 2: the query sees every context key and, causally, itself; then one decode. */
  for (int t = 0; t < kQuery; ++t) pos[t] = kContext + t;
  step(star, plan, cache, 0, pos, kQuery, kContext + kQuery, kContext, -1, 1, one_out, one_lse);
  pos[0] = kContext + kQuery;
  step(star, plan, cache, 0, pos, 1, kContext + kQuery + 1, kContext, -1, 1, out, lse);
  printf("one shard: context %d in blocks of %d (anchor %d), query %d, one decode: out[0]=%.6f\n", kContext, kBlock,
         kAnchor, kQuery, out[0]);

  /* Two shards in one process: block k on shard k % 2. Shard 1 holds the anchor (recomputed there
   * in phase 1, dropped after it) then blocks 1 and 3; shard 0 blocks 0 and 2 (its first 16 keys
   * are the anchor). The query's K/V goes to the appending shard (the last, 1). */
  kvp_comm_options mo;
  memset(&mo, 0, sizeof mo);
  mo.struct_size = sizeof mo;
  mo.kind = KVP_COMM_IN_PROCESS;
  mo.num_ranks = 2;
  mo.max_num_tokens = kQuery;
  mo.num_heads = kHq;
  mo.head_size = kD;
  mo.out_dtype = KVP_DTYPE_FLOAT32;
  kvp_comm* comm;
  CHECK(kvp_comm_create(ctx, &mo, &comm));
  static float shard_out[2][kQuery * kHq * kD], shard_lse[2][kQuery * kHq];
  for (int r = 0; r < 2; ++r) {
    kvp_kv_cache* sc;
    CHECK(kvp_kv_cache_create(ctx, &co, &sc));
    kvp_plan* sp;  /* each shard plans its own batch (on its own device, in a real deployment) */
    CHECK(kvp_plan_create(ctx, &po, &sp));
    kvp_attention* sa = star_attention(ctx, 2, r);
    int n = 0;
    if (r == 1)
      for (int p = 0; p < kAnchor; ++p) pos[n++] = p;  /* the anchor, first */
    for (int p = 0; p < kContext; ++p)
      if ((p / kBlock) % 2 == r) pos[n++] = p;
    step(sa, sp, sc, 0, pos, n, n, kContext, pos[0], 1, out, lse);  /* phase 1 in one step */
    /* Phase 2: shard 1 drops the anchor's pages (16 tokens = 2 whole pages: with shards the anchor
     * must be page-aligned) and its blocks keep their pages. */
    const int first = r == 1 ? kAnchor / kPage : 0, m = r == 1 ? n - kAnchor : n;
    for (int t = 0; t < kQuery; ++t) pos[t] = kContext + t;
    step(sa, sp, sc, first, pos, kQuery, r == 1 ? m + kQuery : m, kContext, kContext, r == 1, shard_out[r],
         shard_lse[r]);
    const DLDataType f32 = {kDLFloat, 32, 1};
    int64_t o_shape[3] = {kQuery, kHq, kD}, l_shape[2] = {kQuery, kHq};
    DLTensor ot = tensor(shard_out[r], f32, 3, o_shape), lt = tensor(shard_lse[r], f32, 2, l_shape);
    CHECK(kvp_comm_merge_attention(comm, r, &ot, &lt));  /* the second call merges into both */
    api.kvp_attention_destroy(sa);
    api.kvp_kv_cache_destroy(sc);
    api.kvp_plan_destroy(sp);
  }
  double err = 0;
  for (int i = 0; i < kQuery * kHq * kD; ++i)
    for (int r = 0; r < 2; ++r) err = fmax(err, fabs((double)shard_out[r][i] - one_out[i]));
  printf("two shards merged by kvp_comm: max |out - one shard| = %.3g\n", err);
  api.kvp_comm_destroy(comm);
  api.kvp_attention_destroy(star);
  api.kvp_kv_cache_destroy(cache);
  api.kvp_plan_destroy(plan);
  api.kvp_context_destroy(ctx);
  return err < 1e-5 ? 0 : 2;
}
