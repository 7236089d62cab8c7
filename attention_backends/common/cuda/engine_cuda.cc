// The host side of the CUDA engine: turns a step's key sets into work items (tiles of each span's
// rows, split-KV for decode-shaped items while the grid is below about four CTAs per SM, merge
// lists), uploads them once per step, and launches per layer with no allocation and no
// synchronization (capturable in a CUDA graph).
#include <algorithm>
#include <cstring>
#include <vector>

#include "fmt/format.h"
#include "engine_params.h"
#include "instances.h"
#include "kvplug/attention/engine.h"
#include "kvplug/attention/kv_write.h"
#include "kvplug/attention/step_work.h"
#include "kvplug/kv_cache/alloc_hook.h"
#include "kvplug/kv_cache/cuda_kernels.h"

namespace kvplug::attn {
namespace {

using cuda::WorkItem;

constexpr int64_t kPartialSlots = 2048;  // token rows of split partials the workspace holds
constexpr int32_t kMinKeysPerSplit = 512;

int64_t PartialRowBytes(const HeadConfig& h) { return int64_t{h.num_q_heads} * (h.head_size + 2) * 4; }

class CudaEngineWork final : public EngineWork {
 public:
  CudaEngineWork(int64_t max_items, int64_t max_segments, int64_t max_pos_map, int64_t max_merges,
                 int64_t max_merge_slots)
      : items(max_items), segments(max_segments), merge_tokens(max_merges), merge_indptr(max_merges + 1),
        merge_slots(max_merge_slots), pos_map_capacity(max_pos_map) {
    device_bytes = Align(max_items * int64_t{sizeof(WorkItem)}) + Align(max_segments * int64_t{sizeof(KeySegment)}) +
                   Align(max_pos_map * 4) + Align(max_merges * 4) + Align((max_merges + 1) * 4) +
                   Align(max_merge_slots * 4);
    staging.resize(static_cast<size_t>(device_bytes));
  }
  ~CudaEngineWork() override { kv::cuda::DeviceFree(device); }

  static int64_t Align(int64_t n) { return (n + 15) / 16 * 16; }

  std::vector<WorkItem> items;
  std::vector<KeySegment> segments;
  std::vector<int32_t> merge_tokens, merge_indptr, merge_slots;
  int64_t pos_map_capacity;
  std::vector<uint8_t> staging;
  int64_t device_bytes = 0;
  void* device = nullptr;
  // The last plan.
  int32_t num_decode = 0, num_prefill = 0, num_segments = 0, num_merges = 0, num_merge_slots = 0;
  int32_t slots_used = 0;
  int32_t decode_round = 0;  // decode items per split round when every decode span has as many splits
  bool has_pos_map = false;
  const WorkItem* d_items = nullptr;
  const KeySegment* d_segments = nullptr;
  const int32_t *d_pos_map = nullptr, *d_merge_tokens = nullptr, *d_merge_indptr = nullptr,
                *d_merge_slots = nullptr;
};


// Segments of `span` clipped to what positions [first, last] can see (contiguous positions only;
// mapped segments are masked in the kernel). Returns the visible key count.
int64_t ClipSegments(const KeySets& keys, const QuerySpan& span, int32_t first, int32_t last, KeySegment* out,
                     int32_t* count) {
  int64_t total = 0;
  *count = 0;
  for (int32_t j = span.segment_begin; j < span.segment_end; ++j) {
    KeySegment g = keys.segments()[j];
    if (g.pos_map < 0) {
      g.key_end = static_cast<int32_t>(std::min<int64_t>(g.key_end, int64_t{last} - g.lag_min - g.pos_base + 1));
      g.key_begin = static_cast<int32_t>(std::max<int64_t>(g.key_begin, int64_t{first} - g.lag_max - g.pos_base));
    }
    if (g.key_end <= g.key_begin) continue;
    total += g.key_end - g.key_begin;
    out[(*count)++] = g;
  }
  return total;
}

}  // namespace

int64_t CudaEngineWorkspaceBytes(const HeadConfig& heads) { return kPartialSlots * PartialRowBytes(heads); }

absl::Status CheckCudaEngineSupport(const HeadConfig& h) {
  if (h.kv_dtype != DType::kF16 && h.kv_dtype != DType::kBF16 && h.kv_dtype != DType::kFP8E4M3)
    return absl::UnimplementedError(fmt::format(
        "CUDA engine: kv_dtype {} not supported (float16, bfloat16, fp8_e4m3)", DTypeName(h.kv_dtype)));
  if (!cuda::FindLaunch(true, h.head_size, false))
    return absl::UnimplementedError(fmt::format(
        "CUDA engine: head_size={} is not built (KVP_CUDA_HEAD_SIZES; the full build has 64, 128, 256)", h.head_size));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<EngineWork>> CreateCudaEngineWork(const KeySetBounds& bounds, const HeadConfig& heads,
                                                                  const PlanCapacity& capacity,
                                                                  const ExecContext& exec) {
  if (bounds.max_segments_per_span > cuda::kMaxSegmentsPerItem)
    return absl::UnimplementedError(fmt::format("CUDA engine: {} key segments per span (at most {})",
                                                bounds.max_segments_per_span, cuda::kMaxSegmentsPerItem));
  const int64_t group = heads.num_q_heads / heads.num_kv_heads;
  // Every span's rows cut into tiles of >= 16 rows, plus one item per split partial.
  const int64_t tiles = (int64_t{capacity.max_num_tokens} * group + 15) / 16 + bounds.max_spans;
  const int64_t max_items = tiles + kPartialSlots;
  auto work = std::make_unique<CudaEngineWork>(max_items, max_items * std::max(1, bounds.max_segments_per_span),
                                               bounds.max_pos_map, capacity.max_num_tokens, kPartialSlots);
  if (ShouldFailAllocation())
    return absl::ResourceExhaustedError(fmt::format("CUDA engine: allocating {} device bytes failed (injected)",
                                                    work->device_bytes));
  if (const int e = kv::cuda::DeviceAlloc(&work->device, work->device_bytes, exec.device_id); e != 0)
    return absl::ResourceExhaustedError(fmt::format("CUDA engine: allocating {} device bytes of step work: {}",
                                                    work->device_bytes, kv::cuda::ErrorString(e)));
  return work;
}

absl::Status PlanCudaEngineWork(const BatchPlan& plan, const KeySets& keys, const HeadConfig& heads,
                                const ExecContext& exec, EngineWork* engine_work) {
  auto& w = *static_cast<CudaEngineWork*>(engine_work);
  const int32_t group = heads.num_q_heads / heads.num_kv_heads;
  const int32_t prefill_rows = cuda::PrefillTileRows(heads.head_size);
  const int64_t slot_cap =
      std::min<int64_t>(kPartialSlots, exec.workspace ? exec.workspace_bytes / PartialRowBytes(heads) : 0);
  size_t ni = 0, ns = 0;
  int32_t nm = 0, nslots = 0, slots = 0;
  w.has_pos_map = false;
  auto overflow = [] { return absl::InternalError("CUDA engine: step work capacity exceeded"); };
  auto emit = [&](const WorkItem& base, const KeySegment* segs, int32_t n) -> bool {
    if (ni >= w.items.size() || ns + n > w.segments.size()) return false;
    WorkItem it = base;
    it.seg_begin = static_cast<int32_t>(ns);
    for (int32_t i = 0; i < n; ++i) {
      w.segments[ns++] = segs[i];
      w.has_pos_map |= segs[i].pos_map >= 0;
    }
    it.seg_end = static_cast<int32_t>(ns);
    w.items[ni++] = it;
    return true;
  };

  // Decode-shaped spans (one 16-row tile) first; how many splits they get depends on their count.
  int64_t num_decode_spans = 0;
  for (const QuerySpan& s : keys.spans())
    if ((s.token_end - s.token_begin) * group <= cuda::DecodeTileRows()) ++num_decode_spans;
  const int64_t ctas = std::max<int64_t>(1, num_decode_spans * heads.num_kv_heads);
  // About 4 CTAs per SM in all (two full waves at the 2 CTAs per SM that shared memory allows):
  // measured on H100 against 2, 8 and 16 per SM. Each split keeps at least 512 keys so the
  // partials stay cheap to merge.
  const int64_t base_splits = (4LL * std::max(exec.num_sms, 1) + ctas - 1) / ctas;
  KeySegment clipped[cuda::kMaxSegmentsPerItem];
  for (const QuerySpan& s : keys.spans()) {
    const int32_t ntok = s.token_end - s.token_begin;
    if (ntok * group > cuda::DecodeTileRows()) continue;
    int32_t nseg = 0;
    const int64_t visible = ClipSegments(keys, s, s.pos_begin, s.pos_begin + ntok - 1, clipped, &nseg);
    const WorkItem base{s.token_begin, ntok, s.pos_begin, 0, 0, 0, -1, 0};
    int64_t splits = std::min<int64_t>({base_splits, std::max<int64_t>(1, visible / kMinKeysPerSplit),
                                        cuda::kMaxMergeSplits});
    if (splits > 1 && (slots + splits * ntok > slot_cap || nm + ntok > static_cast<int32_t>(w.merge_tokens.size()) ||
                       nslots + splits * ntok > static_cast<int64_t>(w.merge_slots.size())))
      splits = 1;  // the workspace is full: this span runs unsplit
    if (splits == 1) {
      if (!emit(base, clipped, nseg)) return overflow();
      continue;
    }
    // Cut the visible keys (concatenated over segments) into chunks of whole 64-key tiles.
    const int64_t chunk = (visible + splits - 1) / splits;
    const int64_t chunk_keys = (chunk + cuda::KeyTile() - 1) / cuda::KeyTile() * cuda::KeyTile();
    const int32_t made = static_cast<int32_t>((visible + chunk_keys - 1) / chunk_keys);
    for (int32_t k = 0; k < made; ++k) {
      KeySegment piece[cuda::kMaxSegmentsPerItem];
      int32_t np = 0;
      int64_t skip = k * chunk_keys, need = chunk_keys;
      for (int32_t j = 0; j < nseg && need > 0; ++j) {
        KeySegment g = clipped[j];
        const int64_t len = g.key_end - g.key_begin;
        if (skip >= len) {
          skip -= len;
          continue;
        }
        const int64_t take = std::min(len - skip, need);
        if (g.pos_map >= 0) g.pos_map += static_cast<int32_t>(skip);
        g.key_begin += static_cast<int32_t>(skip);
        g.key_end = g.key_begin + static_cast<int32_t>(take);
        piece[np++] = g;
        need -= take;
        skip = 0;
      }
      WorkItem it = base;
      it.partial = slots + k * ntok;
      it.split = k;
      if (!emit(it, piece, np)) return overflow();
    }
    for (int32_t k = 0; k < ntok; ++k) {
      w.merge_tokens[nm] = s.token_begin + k;
      w.merge_indptr[nm] = nslots;
      for (int32_t m = 0; m < made; ++m) w.merge_slots[nslots++] = slots + m * ntok + k;
      ++nm;
    }
    slots += made * ntok;
  }
  // Decode splits launch split-major (split k of every span before split k + 1; measured +3% to
  // +10% over span-major on the four decode shapes). std::sort works in place: no allocation.
  std::sort(w.items.begin(), w.items.begin() + ni, [](const WorkItem& a, const WorkItem& b) {
    return a.split != b.split ? a.split < b.split : a.token_begin < b.token_begin;
  });
  w.num_decode = static_cast<int32_t>(ni);
  {
    // Equal splits everywhere (the usual batch of equal-length decodes): launch as [span, head, split],
    // the old dense grid's order (measured on the H200: 2.89 -> 3.07 TB/s at 1 x 128k, +3-4% on the
    // other decode shapes, against the items of one head together).
    int32_t round0 = 0, max_split = 0;
    for (size_t i = 0; i < ni; ++i) {
      round0 += w.items[i].split == 0;
      max_split = std::max(max_split, w.items[i].split);
    }
    w.decode_round = round0 > 0 && int64_t{round0} * (max_split + 1) == int64_t(ni) ? round0 : 0;
  }

  // Prefill-shaped spans: tiles of prefill_rows rows, the heaviest (most visible keys) first.
  const size_t first_prefill = ni;
  for (const QuerySpan& s : keys.spans()) {
    const int32_t ntok = s.token_end - s.token_begin;
    const int32_t rows = ntok * group;
    if (rows <= cuda::DecodeTileRows()) continue;
    for (int32_t row0 = 0; row0 < rows; row0 += prefill_rows) {
      const int32_t first = s.pos_begin + row0 / group;
      const int32_t last = s.pos_begin + (std::min(row0 + prefill_rows, rows) - 1) / group;
      int32_t nseg = 0;
      ClipSegments(keys, s, first, last, clipped, &nseg);
      if (!emit(WorkItem{s.token_begin, ntok, s.pos_begin, row0, 0, 0, -1, 0}, clipped, nseg)) return overflow();
    }
  }
  w.num_prefill = static_cast<int32_t>(ni - first_prefill);
  // Causal work grows with the tile's last key: launch the heavy tiles first (against wave tails).
  auto visible_keys = [&](const WorkItem& it) {
    int64_t n = 0;
    for (int32_t j = it.seg_begin; j < it.seg_end; ++j) n += w.segments[j].key_end - w.segments[j].key_begin;
    return n;
  };
  // std::sort works in place (a plan update allocates nothing); ties keep span and tile order.
  std::sort(w.items.begin() + first_prefill, w.items.begin() + ni, [&](const WorkItem& a, const WorkItem& b) {
    const int64_t ka = visible_keys(a), kb = visible_keys(b);
    if (ka != kb) return ka > kb;
    return a.token_begin != b.token_begin ? a.token_begin < b.token_begin : a.row0 < b.row0;
  });
  w.merge_indptr[nm] = nslots;
  w.num_segments = static_cast<int32_t>(ns);
  w.num_merges = nm;
  w.num_merge_slots = nslots;
  w.slots_used = slots;

  // Pack and upload in one copy.
  const auto pos_map = keys.pos_map();
  if (static_cast<int64_t>(pos_map.size()) > w.pos_map_capacity) return overflow();
  uint8_t* host = w.staging.data();
  auto* dev = static_cast<uint8_t*>(w.device);
  int64_t off = 0;
  auto put = [&](const void* src, int64_t bytes) {
    std::memcpy(host + off, src, static_cast<size_t>(bytes));
    const uint8_t* d = dev + off;
    off += CudaEngineWork::Align(bytes);
    return d;
  };
  w.d_items = reinterpret_cast<const WorkItem*>(put(w.items.data(), int64_t(ni) * int64_t{sizeof(WorkItem)}));
  w.d_segments = reinterpret_cast<const KeySegment*>(put(w.segments.data(), int64_t(ns) * int64_t{sizeof(KeySegment)}));
  w.d_pos_map = reinterpret_cast<const int32_t*>(put(pos_map.data(), int64_t(pos_map.size()) * 4));
  w.d_merge_tokens = reinterpret_cast<const int32_t*>(put(w.merge_tokens.data(), int64_t{nm} * 4));
  w.d_merge_indptr = reinterpret_cast<const int32_t*>(put(w.merge_indptr.data(), int64_t{nm + 1} * 4));
  w.d_merge_slots = reinterpret_cast<const int32_t*>(put(w.merge_slots.data(), int64_t{nslots} * 4));
  // Pageable source: the copy is staged before the call returns, so the next plan may refill it.
  if (const int e = kv::cuda::MemcpyAsync(w.device, host, off, exec.stream); e != 0)
    return absl::InternalError(fmt::format("CUDA engine: step work upload of {} bytes: {}", off, kv::cuda::ErrorString(e)));
  return absl::OkStatus();
}

namespace {
// CTA orders, measured on the H200 (bench/RESULTS.md, 2026-12-02): prefill runs the KV heads of one
// tile together (172 against 156 TFLOP/s at 1 x 4k); decode runs every item of a head together.
constexpr bool kHeadsFastestDecode = false;
constexpr bool kHeadsFastestPrefill = true;
bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

absl::Status CheckVectorizable(const TensorView& t, const char* name) {
  if (!Aligned16(t.data) || t.strides[0] % 8 != 0 || t.strides[1] % 8 != 0)
    return absl::InvalidArgumentError(fmt::format(
        "{}: the CUDA kernels need 16-byte aligned rows (data {}, strides [{}, {}] elements)", name, t.data,
        t.strides[0], t.strides[1]));
  return absl::OkStatus();
}
}  // namespace

absl::Status RunCudaEngine(const RunArgs& a, const HeadConfig& heads, const VariantParams& variant) {
  if (!a.plan.on_device()) return absl::InvalidArgumentError("CUDA engine: the plan has no device arrays");
  const auto* w = static_cast<const CudaEngineWork*>(a.work.engine.get());
  if (!w) return absl::InternalError("CUDA engine: the step work was planned for the CPU");
  const bool fp8 = heads.kv_dtype == DType::kFP8E4M3;
  if (fp8 ? (a.query.dtype != DType::kF16 && a.query.dtype != DType::kBF16) : a.query.dtype != heads.kv_dtype)
    return absl::InvalidArgumentError(fmt::format(
        "CUDA engine: query dtype {} must be {} with a {} cache", DTypeName(a.query.dtype),
        fp8 ? "float16 or bfloat16" : DTypeName(heads.kv_dtype), DTypeName(heads.kv_dtype)));
  if (absl::Status s = CheckVectorizable(a.query, "query"); !s.ok()) return s;
  if (absl::Status s = CheckVectorizable(*a.outputs.out, "out"); !s.ok()) return s;
  const kv::PagedLayer& pages = a.cache.layer(a.layer);
  if (!Aligned16(pages.data) || pages.stride_block % 8 || pages.stride_pos % 8 || pages.stride_head % 8 ||
      pages.stride_kv % 8)
    return absl::InvalidArgumentError("CUDA engine: cache pages must have 16-byte aligned rows");
  const int64_t need = int64_t{w->slots_used} * PartialRowBytes(heads);
  if (need > a.exec.workspace_bytes)
    return absl::FailedPreconditionError(fmt::format(
        "CUDA engine: the step was planned for {} bytes of workspace, the context has {}", need,
        a.exec.workspace_bytes));
  const bool general = variant.logits_soft_cap > 0.0f || variant.scale_table || a.outputs.entropy || w->has_pos_map;
  const cuda::LaunchFn launch = cuda::FindLaunch(a.query.dtype == DType::kBF16, heads.head_size, general);
  if (!launch) return absl::UnimplementedError(fmt::format("CUDA engine: head_size={} is not built", heads.head_size));

  cuda::PagedAttentionParams p;
  p.dtype = a.query.dtype == DType::kBF16 ? cuda::ElemType::kBF16 : cuda::ElemType::kF16;
  p.kv_fp8 = fp8;
  p.k_scale = a.cache.k_scale(a.layer);
  p.v_scale = a.cache.v_scale(a.layer);
  p.q = a.query.data;
  p.o = a.outputs.out->data;
  p.q_stride_token = a.query.strides[0];
  p.q_stride_head = a.query.strides[1];
  p.o_stride_token = a.outputs.out->strides[0];
  p.o_stride_head = a.outputs.out->strides[1];
  if (a.outputs.lse) {
    p.lse = static_cast<float*>(a.outputs.lse->data);
    p.lse_stride_token = a.outputs.lse->strides[0];
    p.lse_stride_head = a.outputs.lse->strides[1];
  }
  if (a.outputs.entropy) {
    p.entropy = static_cast<float*>(a.outputs.entropy->data);
    p.entropy_stride_token = a.outputs.entropy->strides[0];
    p.entropy_stride_head = a.outputs.entropy->strides[1];
  }
  p.pages = pages.View();
  p.kv_indices = a.plan.device_kv_indices();
  p.segments = w->d_segments;
  p.pos_map = w->d_pos_map;
  p.num_q_heads = heads.num_q_heads;
  p.num_kv_heads = heads.num_kv_heads;
  p.head_size = heads.head_size;
  p.block_size = a.plan.block_size();
  if ((p.block_size & (p.block_size - 1)) == 0) p.block_shift = __builtin_ctz(static_cast<unsigned>(p.block_size));
  p.variant = variant;
  if (w->slots_used > 0) {
    p.partial_o = static_cast<float*>(a.exec.workspace);
    p.partial_lse = p.partial_o + int64_t{w->slots_used} * heads.num_q_heads * heads.head_size;
    p.partial_mean = p.partial_lse + int64_t{w->slots_used} * heads.num_q_heads;
  }
  p.merge_tokens = w->d_merge_tokens;
  p.merge_indptr = w->d_merge_indptr;
  p.merge_slots = w->d_merge_slots;
  p.num_merges = w->num_merges;
  for (const bool decode : {true, false}) {
    p.items = w->d_items + (decode ? 0 : w->num_decode);
    p.num_items = decode ? w->num_decode : w->num_prefill;
    p.heads_fastest = (decode ? kHeadsFastestDecode : kHeadsFastestPrefill) ? 1 : 0;
    p.round_size = decode ? w->decode_round : 0;
    if (p.num_items == 0) continue;
    if (const int e = launch(p, decode, a.exec.stream); e != 0)
      return absl::InternalError(fmt::format("CUDA engine: kernel launch failed: {}", kv::cuda::ErrorString(e)));
  }
  if (const int e = cuda::LaunchMergeSplits(p, a.exec.stream); e != 0)
    return absl::InternalError(fmt::format("CUDA engine: merge launch failed: {}", kv::cuda::ErrorString(e)));
  return absl::OkStatus();
}

absl::Status WritePagedKvMixCuda(const WriteArgs& a, const PrevTokenMix& mix) {
  const BatchPlan& plan = a.plan;
  if (!plan.on_device()) return absl::InvalidArgumentError("CUDA write: the plan has no device arrays");
  // The coefficients must be one device array [4][num_kv_heads] (k_cur, k_prev, v_cur, v_prev).
  const int32_t H = a.cache.options().num_kv_heads;
  if (mix.k_prev != mix.k_cur + H || mix.v_cur != mix.k_cur + 2 * H || mix.v_prev != mix.k_cur + 3 * H)
    return absl::InvalidArgumentError("CUDA write: the mix coefficients must be one [4, num_kv_heads] device array");
  cuda::MixWriteParams p;
  p.key = a.key.data;
  p.value = a.value.data;
  if (a.key.dtype != a.value.dtype)
    return absl::InvalidArgumentError(fmt::format("key dtype {} differs from value dtype {}", DTypeName(a.key.dtype),
                                                  DTypeName(a.value.dtype)));
  p.input_dtype = static_cast<int32_t>(a.key.dtype);
  p.k_stride_token = a.key.strides[0];
  p.k_stride_head = a.key.strides[1];
  p.v_stride_token = a.value.strides[0];
  p.v_stride_head = a.value.strides[1];
  p.pages = a.cache.layer(a.layer).View();
  p.k_inv_scale = 1.0f / a.cache.k_scale(a.layer);
  p.v_inv_scale = 1.0f / a.cache.v_scale(a.layer);
  p.slot_mapping = plan.device_slot_mapping();
  p.token_seq = plan.device_token_seq();
  p.qo_indptr = plan.device_query_start_loc();
  p.seq_lens = plan.device_seq_lens();
  p.state_slots = plan.device_state_slots();
  auto slot0 = a.cache.State(a.layer, 0);
  if (!slot0.ok()) return slot0.status();
  p.state = slot0->data();
  p.state_stride = a.cache.options().state_bytes_per_layer;
  p.coef = mix.k_cur;
  p.num_tokens = plan.num_tokens();
  p.num_seqs = plan.num_seqs();
  p.rope_theta = mix.rope_theta;
  p.rotary_dim = mix.rotary_dim;
  p.rope_gptj = mix.rope_style == RopeStyle::kGptJ ? 1 : 0;
  if (const int e = cuda::LaunchMixWrite(p, a.exec.stream); e != 0)
    return absl::InternalError(fmt::format("CUDA write: launch failed: {}", kv::cuda::ErrorString(e)));
  return absl::OkStatus();
}

absl::Status MergeStatesCuda(const MergeStatesArgs& a, void* stream) {
  cuda::MergeStatesParams p;
  const TensorView& po = *a.partial_out;
  p.num_partials = static_cast<int32_t>(po.shape[0]);
  p.num_tokens = static_cast<int32_t>(po.shape[1]);
  p.num_heads = static_cast<int32_t>(po.shape[2]);
  p.head_size = static_cast<int32_t>(po.shape[3]);
  if (po.shape[0] > (1 << 20) || po.shape[1] > (1 << 30) || po.shape[2] > 65535)
    return absl::InvalidArgumentError("merge_states (CUDA): S <= 2^20, T <= 2^30 and H <= 65535");
  p.partial_out = po.data;
  p.partial_out_dtype = static_cast<int32_t>(po.dtype);
  for (int i = 0; i < 4; ++i) p.po_stride[i] = po.strides[i];
  p.partial_lse = static_cast<const float*>(a.partial_lse->data);
  for (int i = 0; i < 3; ++i) p.pl_stride[i] = a.partial_lse->strides[i];
  if (a.partial_entropy) {
    p.partial_entropy = static_cast<const float*>(a.partial_entropy->data);
    for (int i = 0; i < 3; ++i) p.pe_stride[i] = a.partial_entropy->strides[i];
  }
  p.out = a.out->data;
  p.out_dtype = static_cast<int32_t>(a.out->dtype);
  for (int i = 0; i < 3; ++i) p.o_stride[i] = a.out->strides[i];
  if (a.lse) {
    p.lse = static_cast<float*>(a.lse->data);
    for (int i = 0; i < 2; ++i) p.l_stride[i] = a.lse->strides[i];
  }
  if (a.entropy) {
    p.entropy = static_cast<float*>(a.entropy->data);
    for (int i = 0; i < 2; ++i) p.e_stride[i] = a.entropy->strides[i];
  }
  if (const int e = cuda::LaunchMergeStates(p, stream); e != 0)
    return absl::InternalError(fmt::format("merge_states (CUDA): launch failed: {}", kv::cuda::ErrorString(e)));
  return absl::OkStatus();
}

}  // namespace kvplug::attn
