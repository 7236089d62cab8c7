/* An outside consumer of an installed kvplug: links libkvplug directly (no dlopen), found through
 * find_package(kvplug) or pkg-config, and runs one dense attention call whose result it checks:
 * zero queries weigh every key alike, so each output row is the mean of the values. */
#include <kvplug/kvplug.h>

#include <math.h>
#include <stdio.h>

#define CHECK(call)                                                                        \
  do {                                                                                     \
    kvp_status s_ = (call);                                                                \
    if (s_ != KVP_OK) {                                                                    \
      fprintf(stderr, "%s: %s: %s\n", #call, kvp_status_string(s_), kvp_last_error());     \
      return 1;                                                                            \
    }                                                                                      \
  } while (0)

int main(void) {
  if (kvp_abi_version() / 10000 != KVP_ABI_VERSION_MAJOR) {
    fprintf(stderr, "ABI major %u, header %d\n", kvp_abi_version() / 10000, KVP_ABI_VERSION_MAJOR);
    return 1;
  }
  enum { T = 3, D = 32 };
  kvp_context* ctx = NULL;
  CHECK(kvp_context_create(NULL, &ctx));
  kvp_kv_cache_options co = {sizeof co};
  co.num_layers = 1; co.num_blocks = 2; co.block_size = 4; co.num_kv_heads = 1; co.head_size = D;
  co.dtype = KVP_DTYPE_FLOAT32;
  kvp_kv_cache* cache = NULL;
  CHECK(kvp_kv_cache_create(ctx, &co, &cache));
  kvp_attention_options ao = {sizeof ao};
  ao.backend = "dense"; ao.num_q_heads = 1; ao.num_kv_heads = 1; ao.head_size = D; ao.kv_dtype = KVP_DTYPE_FLOAT32;
  kvp_attention* attn = NULL;
  CHECK(kvp_attention_create(ctx, &ao, &attn));
  kvp_plan_options po = {sizeof po, 1, T, 1};
  kvp_plan* plan = NULL;
  CHECK(kvp_plan_create(ctx, &po, &plan));
  int32_t qsl[2] = {0, T}, lens[1] = {T}, table[1] = {1};
  int64_t slots[T] = {4, 5, 6};
  kvp_batch b = {sizeof b};
  b.num_seqs = 1; b.block_size = 4; b.query_start_loc = qsl; b.seq_lens = lens; b.block_table = table;
  b.block_table_stride = 1; b.slot_mapping = slots;
  CHECK(kvp_plan_update(plan, &b));
  float k[T * D], v[T * D], q[T * D], out[T * D];
  for (int i = 0; i < T * D; ++i) { k[i] = (float)(i % 7); v[i] = (float)(i / D + 1); q[i] = 0.0f; out[i] = -1.0f; }
  int64_t shape[3] = {T, 1, D};
  DLTensor kt = {k, {kDLCPU, 0}, 3, {kDLFloat, 32, 1}, shape, NULL, 0};
  DLTensor vt = {v, {kDLCPU, 0}, 3, {kDLFloat, 32, 1}, shape, NULL, 0};
  DLTensor qt = {q, {kDLCPU, 0}, 3, {kDLFloat, 32, 1}, shape, NULL, 0};
  DLTensor ot = {out, {kDLCPU, 0}, 3, {kDLFloat, 32, 1}, shape, NULL, 0};
  CHECK(kvp_attention_write_kv(attn, plan, cache, 0, &kt, &vt));
  CHECK(kvp_attention_run(attn, plan, cache, 0, &qt, &ot, NULL));
  for (int t = 0; t < T; ++t) {
    const float want = (float)(t + 2) / 2.0f;  /* mean of 1 .. t+1 */
    if (fabsf(out[t * D] - want) > 1e-5f) {
      fprintf(stderr, "row %d: %f, expected %f\n", t, out[t * D], want);
      return 1;
    }
  }
  kvp_plan_destroy(plan);
  kvp_attention_destroy(attn);
  kvp_kv_cache_destroy(cache);
  kvp_context_destroy(ctx);
  printf("kvplug %s (ABI %u): one attention call from an outside consumer: ok\n", kvp_version_string(), kvp_abi_version());
  return 0;
}
