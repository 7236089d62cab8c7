// Fuzzes DLPack tensor validation: one tensor argument of a call is replaced by a tensor with
// arbitrary ndim, shape, strides (NULL, compact or arbitrary, negative and huge included), dtype,
// device and byte_offset; every other argument is valid. Calls: kvp_kv_cache_write (key, value,
// slot_mapping), kvp_attention_run (query, out, lse), kvp_attention_write_kv (key, value) and
// kvp_kv_cache_create_from_tensors (a layer tensor, which the cache then keeps, writes, copies, swaps
// and attention reads).
//
// Memory: the harness computes the bytes the tensor spans, [data + byte_offset + lowest element,
// data + byte_offset + highest element + 1), and when that is at most 1 MiB it allocates exactly that
// (data pointing inside it as the strides need), filled from the input; otherwise data is NULL. So a
// tensor the library accepts and then reads or writes out of its own bounds is an ASan report, and a
// non-empty tensor with NULL data must be refused. Accepted tensors are also checked against what
// the call needs (ndim, shape, dtype, device, non-negative strides, contiguous head axis).
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "fuzz_input.h"
#include "kvplug/kvplug.h"

namespace {

using kvplug::fuzz::Input;

constexpr int32_t kLayers = 2, kBlocks = 8, kBS = 4, kKH = 2, kQH = 4, kD = 32, kTokens = 3;
constexpr DLDataType kF32{kDLFloat, 32, 1}, kI64{kDLInt, 64, 1};

DLTensor T(void* data, DLDataType dt, int64_t* shape, int32_t ndim) {
  DLTensor t{};
  t.data = data;
  t.device = {kDLCPU, 0};
  t.ndim = ndim;
  t.dtype = dt;
  t.shape = shape;
  return t;
}

// Valid handles and tensors, built once.
struct Fixture {
  kvp_context* ctx = nullptr;
  kvp_kv_cache* cache[2] = {};  // float32 and bfloat16 pages
  kvp_attention* attn[2] = {};
  kvp_plan* plan = nullptr;
  std::vector<float> k, v, q, out, lse;
  std::vector<int64_t> slots = {7, 12, 22};  // seq 0: positions 3, 4 (blocks 1, 3); seq 1: position 2 (block 5)
  int64_t kv_shape[3] = {kTokens, kKH, kD}, q_shape[3] = {kTokens, kQH, kD}, lse_shape[2] = {kTokens, kQH};
  int64_t slot_shape[1] = {kTokens};

  Fixture() {
    kvp_context_options co{};
    co.struct_size = sizeof co;
    co.num_threads = 1;
    FUZZ_CHECK(kvp_context_create(&co, &ctx) == KVP_OK);
    for (int i = 0; i < 2; ++i) {
      const kvp_kv_cache_options o = CacheOptions(i ? KVP_DTYPE_BFLOAT16 : KVP_DTYPE_FLOAT32, KVP_LAYOUT_KV_FIRST);
      FUZZ_CHECK(kvp_kv_cache_create(ctx, &o, &cache[i]) == KVP_OK);
      kvp_attention_options ao{};
      ao.struct_size = sizeof ao;
      ao.backend = "dense";
      ao.num_q_heads = kQH;
      ao.num_kv_heads = kKH;
      ao.head_size = kD;
      ao.kv_dtype = o.dtype;
      FUZZ_CHECK(kvp_attention_create(ctx, &ao, &attn[i]) == KVP_OK);
    }
    kvp_plan_options po{};
    po.struct_size = sizeof po;
    po.max_num_seqs = 2;
    po.max_num_tokens = 8;
    po.max_num_blocks = 8;
    FUZZ_CHECK(kvp_plan_create(ctx, &po, &plan) == KVP_OK);
    static const int32_t qsl[3] = {0, 2, 3}, lens[2] = {5, 3}, table[4] = {1, 3, 5, -1};
    kvp_batch b{};
    b.struct_size = sizeof b;
    b.num_seqs = 2;
    b.block_size = kBS;
    b.query_start_loc = qsl;
    b.seq_lens = lens;
    b.block_table = table;
    b.block_table_stride = 2;
    b.slot_mapping = slots.data();
    FUZZ_CHECK(kvp_plan_update(plan, &b) == KVP_OK);
    k.resize(kTokens * kKH * kD);
    v.resize(k.size());
    q.resize(kTokens * kQH * kD);
    out.resize(q.size());
    lse.resize(kTokens * kQH);
    for (size_t i = 0; i < k.size(); ++i) k[i] = 0.01f * static_cast<float>(i % 97), v[i] = 1.0f - 0.02f * (i % 89);
    for (size_t i = 0; i < q.size(); ++i) q[i] = 0.03f * static_cast<float>(i % 61) - 0.9f;
    for (int i = 0; i < 2; ++i)
      for (int32_t l = 0; l < kLayers; ++l) {
        DLTensor kt = T(k.data(), kF32, kv_shape, 3), vt = T(v.data(), kF32, kv_shape, 3);
        FUZZ_CHECK(kvp_attention_write_kv(attn[i], plan, cache[i], l, &kt, &vt) == KVP_OK);
      }
  }

  static kvp_kv_cache_options CacheOptions(int32_t dtype, int32_t layout) {
    kvp_kv_cache_options o{};
    o.struct_size = sizeof o;
    o.num_layers = kLayers;
    o.num_blocks = kBlocks;
    o.block_size = kBS;
    o.num_kv_heads = kKH;
    o.head_size = kD;
    o.dtype = dtype;
    o.layout = layout;
    o.num_host_blocks = 2;
    return o;
  }
};

// A fuzzed tensor and the memory behind it.
struct Fuzzed {
  int32_t ndim = 0;
  std::vector<int64_t> shape, strides;
  bool has_strides = false;
  DLDataType dtype{};
  DLDevice device{kDLCPU, 0};
  uint64_t byte_offset = 0;
  bool want_null = false;
  // Exactly sized arrays (ASan sees a read past ndim entries).
  std::unique_ptr<int64_t[]> shape_mem, strides_mem;
  std::unique_ptr<uint8_t[]> buffer;
  size_t buffer_size = 0;
  bool empty = false;
  DLTensor t{};

  void Resize(int32_t n) {
    ndim = n;
    shape.resize(std::max(n, 0), 1);
    strides.resize(std::max(n, 0), 1);
  }
};

const int64_t kExtremes[] = {0,  1,  -1, 2,  std::numeric_limits<int64_t>::max(), std::numeric_limits<int64_t>::min(),
                             int64_t{1} << 40, (int64_t{1} << 40) + 1, int64_t{1} << 62, int64_t{1} << 31,
                             -(int64_t{1} << 62), 3, 1 << 20};
const uint64_t kOffsets[] = {0, 1, 2, 4, 8, 64, 4096, uint64_t{1} << 63, ~uint64_t{0}, ~uint64_t{0} - 3,
                             uint64_t{1} << 40, 1 << 21};
const DLDataType kDtypes[] = {{kDLFloat, 32, 1},  {kDLFloat, 16, 1}, {kDLBfloat, 16, 1}, {kDLInt, 64, 1},
                              {kDLFloat, 64, 1},  {kDLFloat, 32, 2}, {kDLInt, 32, 1},   {kDLUInt, 8, 1},
                              {kDLFloat, 32, 0},  {kDLBfloat, 32, 1}, {kDLFloat, 0, 1},  {kDLFloat, 12, 1}};
const DLDevice kDevices[] = {{kDLCPU, 0}, {kDLCUDAHost, 0}, {kDLCUDA, 0}, {kDLCPU, 1}, {kDLCUDAHost, 3},
                             {kDLROCM, 0}, {static_cast<DLDeviceType>(0), 0}, {static_cast<DLDeviceType>(99), -1}};

void Mutate(Input& in, Fuzzed& f) {
  for (int m = in.Below(10); m > 0; --m) {
    const uint32_t i = f.ndim > 0 ? in.Below(static_cast<uint32_t>(f.ndim)) : 0;
    switch (in.Below(11)) {
      case 0: f.Resize(static_cast<int32_t>(in.Below(9)) - 1); break;
      case 1: if (f.ndim > 0) f.shape[i] = static_cast<int64_t>(in.Below(70)) - 2; break;
      case 2: if (f.ndim > 0) f.shape[i] = kExtremes[in.Below(std::size(kExtremes))]; break;
      case 3: {  // compact strides made explicit
        f.has_strides = true;
        int64_t s = 1;
        for (int32_t d = f.ndim - 1; d >= 0; --d) {
          f.strides[d] = s;
          if (f.shape[d] > 0 && f.shape[d] < (int64_t{1} << 20) && s < (int64_t{1} << 40)) s *= f.shape[d];
        }
        break;
      }
      case 4: f.has_strides = true; if (f.ndim > 0) f.strides[i] = static_cast<int64_t>(in.Below(200)) - 3; break;
      case 5: f.has_strides = true; if (f.ndim > 0) f.strides[i] = kExtremes[in.Below(std::size(kExtremes))]; break;
      case 6: f.dtype = in.Below(4) ? kDtypes[in.Below(std::size(kDtypes))] : DLDataType{in.Byte(), in.Byte(), static_cast<uint16_t>(in.Byte())}; break;
      case 7: f.device = kDevices[in.Below(std::size(kDevices))]; break;
      case 8: f.byte_offset = in.Bit() ? in.Below(64) : kOffsets[in.Below(std::size(kOffsets))]; break;
      case 9: f.want_null = !f.want_null; break;
      default: f.has_strides = false; break;
    }
  }
}

// Builds the DLTensor, and its memory when the span it covers is small enough.
void Materialize(Input& in, Fuzzed& f, bool slot_values) {
  const int32_t n = std::max(f.ndim, 0);
  f.shape_mem.reset(new int64_t[n]);
  std::copy(f.shape.begin(), f.shape.begin() + n, f.shape_mem.get());
  if (f.has_strides) {
    f.strides_mem.reset(new int64_t[n]);
    std::copy(f.strides.begin(), f.strides.begin() + n, f.strides_mem.get());
  }
  f.t = DLTensor{};
  f.t.ndim = f.ndim;
  f.t.shape = f.shape_mem.get();
  f.t.strides = f.has_strides ? f.strides_mem.get() : nullptr;
  f.t.dtype = f.dtype;
  f.t.device = f.device;
  f.t.byte_offset = f.byte_offset;
  f.t.data = nullptr;

  // The span, in bytes relative to data: [lo, hi).
  bool ok = !f.want_null && f.dtype.bits > 0 && f.dtype.bits % 8 == 0 && f.dtype.lanes > 0;
  __int128 lo = 0, hi = 0, compact = 1;
  f.empty = false;
  for (int32_t d = n - 1; d >= 0 && ok; --d) {
    if (f.shape[d] < 0) ok = false;
    if (f.shape[d] == 0) f.empty = true;
  }
  if (ok && !f.empty) {
    const __int128 esize = (f.dtype.bits / 8) * static_cast<__int128>(f.dtype.lanes);
    // Spans past 2^40 elements in any axis cannot be allocated: no need to compute them exactly
    // (and the arithmetic stays far from overflow).
    constexpr __int128 kBig = __int128{1} << 40;
    __int128 min_el = 0, max_el = 0;
    for (int32_t d = n - 1; d >= 0 && ok; --d) {
      const __int128 stride = f.has_strides ? f.strides[d] : compact;
      compact = std::min<__int128>(compact * std::min<__int128>(f.shape[d], kBig), kBig * kBig);
      if (f.shape[d] == 1) continue;
      if (f.shape[d] > kBig || stride > kBig || stride < -kBig) {
        ok = false;
        break;
      }
      const __int128 reach = (f.shape[d] - 1) * stride;
      (reach > 0 ? max_el : min_el) += reach;
    }
    lo = f.byte_offset + min_el * esize;
    hi = f.byte_offset + (max_el + 1) * esize;
    ok = ok && f.byte_offset <= (1u << 20) && lo >= -(__int128{1} << 20) && hi <= (__int128{1} << 20);
  } else if (ok) {
    ok = f.byte_offset <= (1u << 20);
  }
  if (!ok) return;  // data stays NULL
  const size_t shift = lo < 0 ? static_cast<size_t>(-lo) : 0;
  f.buffer_size = static_cast<size_t>(hi + shift);
  f.buffer.reset(new uint8_t[f.buffer_size]);
  for (size_t i = 0; i < f.buffer_size; ++i) f.buffer[i] = in.Byte();
  if (slot_values)  // mostly slots in range [-2, 34): the cache has 32
    for (size_t i = 0; i + 8 <= f.buffer_size; i += 8) {
      const int64_t s = static_cast<int64_t>(f.buffer[i] % 36) - 2;
      std::memcpy(&f.buffer[i], &s, 8);
    }
  f.t.data = f.buffer.get() + shift;
}

bool KnownStatus(kvp_status s) { return s >= KVP_OK && s <= KVP_ERR_DEVICE; }

// What an accepted tensor must be.
void CheckAccepted(const Fuzzed& f, const std::vector<int64_t>& shape, bool floating, bool contiguous_last) {
  FUZZ_CHECK(f.ndim == static_cast<int32_t>(shape.size()));
  for (int32_t d = 0; d < f.ndim; ++d) FUZZ_CHECK(f.shape[d] == shape[d]);
  FUZZ_CHECK(f.device.device_type == kDLCPU || f.device.device_type == kDLCUDAHost);
  FUZZ_CHECK(f.dtype.lanes == 1);
  if (floating)
    FUZZ_CHECK((f.dtype.code == kDLFloat && (f.dtype.bits == 32 || f.dtype.bits == 16)) ||
               (f.dtype.code == kDLBfloat && f.dtype.bits == 16));
  else
    FUZZ_CHECK(f.dtype.code == kDLInt && f.dtype.bits == 64);
  if (f.has_strides) {
    for (int32_t d = 0; d < f.ndim; ++d)
      if (shape[d] > 1 || (contiguous_last && d == f.ndim - 1)) FUZZ_CHECK(f.strides[d] >= 0);
    if (contiguous_last && shape.back() > 1) FUZZ_CHECK(f.strides[f.ndim - 1] == 1);
  }
  FUZZ_CHECK(f.t.data != nullptr || f.empty);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Fixture* fx = new Fixture();
  Input in(data, size);
  const uint32_t target = in.Below(9);
  const int which = in.Below(2);  // float32 or bfloat16 pages
  const int32_t layer = in.Below(8) ? static_cast<int32_t>(in.Below(kLayers)) : static_cast<int32_t>(in.Below(5)) - 2;

  // The template of the replaced argument, then mutations.
  Fuzzed f;
  std::vector<int64_t> want;
  bool floating = true, contiguous_last = true;
  int32_t layout = KVP_LAYOUT_KV_FIRST;
  switch (target) {
    case 0: case 1: case 6: case 7: want = {kTokens, kKH, kD}; break;
    case 2: want = {kTokens}; floating = false; contiguous_last = false; break;
    case 3: case 4: want = {kTokens, kQH, kD}; break;
    case 5: want = {kTokens, kQH}; contiguous_last = false; break;
    default:
      layout = in.Bit() ? KVP_LAYOUT_BLOCK_FIRST : KVP_LAYOUT_KV_FIRST;
      want = layout == KVP_LAYOUT_KV_FIRST ? std::vector<int64_t>{2, kBlocks, kBS, kKH, kD}
                                           : std::vector<int64_t>{kBlocks, 2, kBS, kKH, kD};
      break;
  }
  f.Resize(static_cast<int32_t>(want.size()));
  std::copy(want.begin(), want.end(), f.shape.begin());
  f.dtype = floating ? (which && target == 8 ? DLDataType{kDLBfloat, 16, 1} : kF32) : kI64;
  Mutate(in, f);
  Materialize(in, f, target == 2);

  DLTensor kt = T(fx->k.data(), kF32, fx->kv_shape, 3), vt = T(fx->v.data(), kF32, fx->kv_shape, 3);
  DLTensor st = T(fx->slots.data(), kI64, fx->slot_shape, 1);
  DLTensor qt = T(fx->q.data(), kF32, fx->q_shape, 3), ot = T(fx->out.data(), kF32, fx->q_shape, 3);
  DLTensor lt = T(fx->lse.data(), kF32, fx->lse_shape, 2);
  kvp_status s;
  switch (target) {
    case 0: s = kvp_kv_cache_write(fx->cache[which], layer, &f.t, &vt, &st); break;
    case 1: s = kvp_kv_cache_write(fx->cache[which], layer, &kt, &f.t, &st); break;
    case 2: s = kvp_kv_cache_write(fx->cache[which], layer, &kt, &vt, &f.t); break;
    case 3: s = kvp_attention_run(fx->attn[which], fx->plan, fx->cache[which], layer, &f.t, &ot, in.Bit() ? &lt : nullptr); break;
    case 4: s = kvp_attention_run(fx->attn[which], fx->plan, fx->cache[which], layer, &qt, &f.t, in.Bit() ? &lt : nullptr); break;
    case 5: s = kvp_attention_run(fx->attn[which], fx->plan, fx->cache[which], layer, &qt, &ot, &f.t); break;
    case 6: s = kvp_attention_write_kv(fx->attn[which], fx->plan, fx->cache[which], layer, &f.t, &vt); break;
    case 7: s = kvp_attention_write_kv(fx->attn[which], fx->plan, fx->cache[which], layer, &kt, &f.t); break;
    default: {
      // A cache over caller memory: the fuzzed tensor is layer `l`, the other one is valid.
      const kvp_kv_cache_options o = Fixture::CacheOptions(which ? KVP_DTYPE_BFLOAT16 : KVP_DTYPE_FLOAT32, layout);
      const size_t elems = 2ull * kBlocks * kBS * kKH * kD;
      std::vector<uint16_t> other(elems * (which ? 1 : 2), 0);
      int64_t other_shape[5];
      std::copy(want.begin(), want.end(), other_shape);
      DLTensor layers[kLayers];
      const int32_t l = in.Below(kLayers);
      for (int32_t i = 0; i < kLayers; ++i)
        layers[i] = i == l ? f.t : T(other.data(), which ? DLDataType{kDLBfloat, 16, 1} : kF32, other_shape, 5);
      kvp_kv_cache* cache = nullptr;
      s = kvp_kv_cache_create_from_tensors(fx->ctx, &o, layers, kLayers, &cache);
      FUZZ_CHECK(KnownStatus(s));
      if (s != KVP_OK) {
        FUZZ_CHECK(cache == nullptr);
        break;
      }
      CheckAccepted(f, want, true, true);
      // Use every byte the cache may touch: writes, copies, swaps, attention.
      for (int32_t i = 0; i < kLayers; ++i) {
        FUZZ_CHECK(kvp_kv_cache_write(cache, i, &kt, &vt, &st) == KVP_OK);
        FUZZ_CHECK(kvp_attention_write_kv(fx->attn[which], fx->plan, cache, i, &kt, &vt) == KVP_OK);
        FUZZ_CHECK(kvp_attention_run(fx->attn[which], fx->plan, cache, i, &qt, &ot, &lt) == KVP_OK);
      }
      const kvp_block_copy copies[2] = {{0, kBlocks - 1}, {kBlocks - 1, 2}};
      const kvp_block_copy swaps[2] = {{kBlocks - 1, 0}, {3, 1}};
      FUZZ_CHECK(kvp_kv_cache_copy_blocks(cache, copies, 2) == KVP_OK);
      FUZZ_CHECK(kvp_kv_cache_swap_out(cache, swaps, 2) == KVP_OK);
      const kvp_block_copy back[2] = {{0, 6}, {1, 4}};
      FUZZ_CHECK(kvp_kv_cache_swap_in(cache, back, 2) == KVP_OK);
      DLTensor view{};
      FUZZ_CHECK(kvp_kv_cache_layer_view(cache, l, 0, &view) == KVP_OK &&
                 view.data == static_cast<uint8_t*>(f.t.data) + f.t.byte_offset);
      kvp_kv_cache_destroy(cache);
      return 0;
    }
  }
  FUZZ_CHECK(KnownStatus(s));
  if (s == KVP_OK && layer >= 0 && layer < kLayers) CheckAccepted(f, want, floating, contiguous_last);
  FUZZ_CHECK(s != KVP_OK || (layer >= 0 && layer < kLayers));
  return 0;
}
