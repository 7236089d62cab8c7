// The host side of the CUDA engine: turns a step's key sets into work items (tiles of each span's
// rows, split-KV for decode-shaped items while the grid is below about four CTAs per SM, merge
// lists), uploads them once per step, and launches per layer with no allocation and no
// synchronization (capturable in a CUDA graph).
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <vector>

#include "fmt/format.h"
#include "engine_params.h"
#include "instances.h"
#include "kvplug/attention/engine.h"
#include "kvplug/attention/kv_write.h"
#include "kvplug/attention/step_work.h"
#include "kvplug/kv_cache/alloc_hook.h"
#include "kvplug/kv_cache/cuda_kernels.h"
#ifdef KVP_HAVE_FLASHINFER
#include "fi_instances.h"
#endif

namespace kvplug::attn {
namespace {

std::atomic<int64_t> g_flashinfer_prefill_launches{0};
std::atomic<int64_t> g_kvplug_prefill_launches{0};

// KVP_CUDA_PREFILL: "kvplug" keeps every prefill span on kvplug's own kernel; "flashinfer" makes a
// plan fail when this build or device cannot run FlashInfer's kernel (so a benchmark or test never
// measures the fallback by accident); unset / "auto": FlashInfer where it is exact, else kvplug.
enum class PrefillMode { kAuto, kKvplug, kFlashInfer };
PrefillMode PrefillModeFromEnv() {
  const char* e = std::getenv("KVP_CUDA_PREFILL");
  if (!e) return PrefillMode::kAuto;
  const std::string_view v(e);
  if (v == "kvplug") return PrefillMode::kKvplug;
  if (v == "flashinfer") return PrefillMode::kFlashInfer;
  return PrefillMode::kAuto;
}

// KVP_CUDA_DECODE forces one decode tile pipeline (A/B runs): "cta" CTA-wide key tiles (the earlier
// kernel), "warp" warp-private tiles, "kv1" warp-private tiles with K and V in separate async
// groups over one stage; unset: warp for 16-bit pages, kv1 for fp8 pages (the measured best). Read
// when a plan is made (not per step); the forced ones exist only in builds with
// -DKVP_CUDA_DECODE_AB=ON, elsewhere planning fails.
constexpr int32_t kDecodeDefault = 3;
int32_t DecodeKernelFromEnv() {
  const char* e = std::getenv("KVP_CUDA_DECODE");
  if (!e) return kDecodeDefault;
  const std::string_view v(e);
  if (v == "cta") return 0;
  if (v == "warp") return 1;
  if (v == "kv1") return 2;
  return kDecodeDefault;
}

// KVP_CUDA_DECODE_CTAS_PER_SM: the decode grid the split rule aims at (default 4; A/B runs).
int64_t DecodeCtasPerSm() {
  const char* e = std::getenv("KVP_CUDA_DECODE_CTAS_PER_SM");
  const int64_t v = e ? std::atoll(e) : 0;
  return v >= 1 && v <= 64 ? v : 4;
}

// KVP_CUDA_DECODE_WAVEFILL=0 keeps the plain split count (A/B runs); default: fill whole waves.
bool DecodeWaveFill() {
  const char* e = std::getenv("KVP_CUDA_DECODE_WAVEFILL");
  return !(e && std::string_view(e) == "0");
}

using cuda::WorkItem;

constexpr int64_t kPartialSlots = 2048;  // token rows of split partials the workspace holds
constexpr int32_t kMinKeysPerSplit = 512;
constexpr int32_t kMinKeysPerSplitUnderWave = 128;  // two key tiles

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
  ~CudaEngineWork() override {
    kv::cuda::DeviceFree(device);
    kv::cuda::DeviceFree(fi_int_ws);
    kv::cuda::DeviceFree(fi_lse);
    kv::cuda::DeviceFree(fi_tokens_dev);
  }

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
  int32_t decode_kernel = kDecodeDefault;  // PagedAttentionParams::decode_kernel, from the plan's env
  bool has_pos_map = false;
  const WorkItem* d_items = nullptr;
  const KeySegment* d_segments = nullptr;
  const int32_t *d_pos_map = nullptr, *d_merge_tokens = nullptr, *d_merge_indptr = nullptr,
                *d_merge_slots = nullptr;
  // Prefill items of the spans FlashInfer cannot run come first among the prefill items; the
  // FlashInfer spans' own items follow (num_prefill in all), for runs whose variant FlashInfer
  // lacks (scale table, soft cap, entropy).
  int32_t num_prefill_kvplug = 0;

  // The FlashInfer prefill path (engine_cuda.cc: FlashInferEligible), set up at creation when the
  // build, the device and the heads allow it.
  bool fi_capable = false;
  void* fi_int_ws = nullptr;  // device: FlashInfer's work lists
  std::vector<uint8_t> fi_int_host;
  float* fi_lse = nullptr;         // device [max_num_tokens, num_q_heads]: base-2 lse before conversion
  int32_t* fi_tokens_dev = nullptr;  // device [max_num_tokens]: the rows FlashInfer writes
  std::vector<int32_t> fi_tokens, fi_qo_indptr, fi_token_begin, fi_page_offset, fi_kv_len;
  std::vector<uint8_t> span_on_fi;
  int32_t max_tokens = 0;
  // The last plan's FlashInfer part.
  bool fi_active = false;
  int32_t fi_num_tokens = 0;
#ifdef KVP_HAVE_FLASHINFER
  cuda::fi::PlanInfo fi_plan;
#endif
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

// Whether FlashInfer's bottom-right causal prefill computes `span` exactly: one segment of
// contiguous positions that starts on a page, no window that hides any of its keys, and keys that
// end exactly at the last query's position (query i of n then sees keys [0, kv_len - n + i], as
// FlashInfer's causal mask does), at least as many keys as queries. On success *page_offset is the
// first page and *kv_len the key count.
bool FlashInferEligible(const KeySets& keys, const QuerySpan& s, int32_t block_size, int32_t* page_offset,
                        int32_t* kv_len) {
  if (s.segment_end - s.segment_begin != 1) return false;
  const int32_t ntok = s.token_end - s.token_begin;
  const int32_t last = s.pos_begin + ntok - 1;
  KeySegment g;
  int32_t n = 0;
  if (ClipSegments(keys, s, s.pos_begin, last, &g, &n) == 0 || n != 1) return false;
  if (g.pos_map >= 0 || g.lag_min != 0 || g.key_begin % block_size != 0) return false;
  if (int64_t{last} - g.pos_base - g.key_begin > g.lag_max) return false;  // a window hides keys
  if (int64_t{g.pos_base} + g.key_end - 1 != last) return false;           // keys end at the last query
  if (g.key_end - g.key_begin < ntok) return false;
  *page_offset = g.page_offset + g.key_begin / block_size;
  *kv_len = g.key_end - g.key_begin;
  return true;
}

}  // namespace

CudaPrefillCounts GetCudaPrefillCounts() {
  return {g_flashinfer_prefill_launches.load(), g_kvplug_prefill_launches.load()};
}

bool CudaEngineHasFlashInfer() {
#ifdef KVP_HAVE_FLASHINFER
  return true;
#else
  return false;
#endif
}

bool CudaEngineHasFlashInfer(DType dtype, int32_t head_size) {
#ifdef KVP_HAVE_FLASHINFER
  return (dtype == DType::kF16 || dtype == DType::kBF16) &&
         cuda::fi::FindRun(dtype == DType::kBF16, head_size) != nullptr;
#else
  (void)dtype;
  (void)head_size;
  return false;
#endif
}

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
  work->max_tokens = capacity.max_num_tokens;
#ifdef KVP_HAVE_FLASHINFER
  // FlashInfer's buffers, once: its work lists, a base-2 lse scratch and the rows it writes.
  if ((heads.kv_dtype == DType::kF16 || heads.kv_dtype == DType::kBF16) &&
      (cuda::fi::FindRun(true, heads.head_size) || cuda::fi::FindRun(false, heads.head_size)) &&
      cuda::fi::DeviceSupported(exec.device_id)) {
    const int64_t bytes = cuda::fi::IntWorkspaceBytes(capacity.max_num_tokens, bounds.max_spans, heads.num_q_heads,
                                                      exec.num_sms);
    const int64_t lse_bytes = int64_t{capacity.max_num_tokens} * heads.num_q_heads * 4;
    void *ws = nullptr, *lse = nullptr, *tok = nullptr;
    if (kv::cuda::DeviceAlloc(&ws, bytes, exec.device_id) != 0 ||
        kv::cuda::DeviceAlloc(&lse, lse_bytes, exec.device_id) != 0 ||
        kv::cuda::DeviceAlloc(&tok, int64_t{capacity.max_num_tokens} * 4, exec.device_id) != 0) {
      kv::cuda::DeviceFree(ws);
      kv::cuda::DeviceFree(lse);
      return absl::ResourceExhaustedError(
          fmt::format("CUDA engine: allocating {} device bytes for FlashInfer's prefill", bytes + lse_bytes));
    }
    work->fi_int_ws = ws;
    work->fi_lse = static_cast<float*>(lse);
    work->fi_tokens_dev = static_cast<int32_t*>(tok);
    work->fi_int_host.resize(size_t(bytes));
    const size_t spans = size_t(std::max<int64_t>(bounds.max_spans, 1));
    work->fi_tokens.resize(size_t(capacity.max_num_tokens));
    work->fi_qo_indptr.resize(spans + 1);
    work->fi_token_begin.resize(spans);
    work->fi_page_offset.resize(spans);
    work->fi_kv_len.resize(spans);
    work->span_on_fi.resize(spans);
    work->fi_capable = true;
  }
#endif
  return work;
}

absl::Status PlanCudaEngineWork(const BatchPlan& plan, const KeySets& keys, const HeadConfig& heads,
                                const ExecContext& exec, EngineWork* engine_work) {
  auto& w = *static_cast<CudaEngineWork*>(engine_work);
  w.decode_kernel = DecodeKernelFromEnv();
#ifndef KVP_CUDA_DECODE_AB
  if (w.decode_kernel != kDecodeDefault)
    return absl::FailedPreconditionError(fmt::format(
        "CUDA engine: KVP_CUDA_DECODE={}, but this build has only the default decode pipelines "
        "(configure with -DKVP_CUDA_DECODE_AB=ON)", std::getenv("KVP_CUDA_DECODE")));
#endif
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
  // measured on H100 against 2, 8 and 16 per SM. Each split keeps at least kMinKeysPerSplit keys so
  // the partials stay cheap to merge, unless that leaves the grid under half a wave: short key sets
  // (attamba's compressed cache, windows) at small batches then split down to
  // kMinKeysPerSplitUnderWave keys, up to one wave (512 left a 2k-key set on 32 CTAs of 132 SMs;
  // on the H200, 128 everywhere, or up to a wave from 256 CTAs, made batch 8 slower: 4 -> 9 or 5
  // splits of a 2k-key set, 31 -> 41 us).
  int64_t base_splits = (DecodeCtasPerSm() * std::max(exec.num_sms, 1) + ctas - 1) / ctas;
  const int64_t wave = 2LL * std::max(exec.num_sms, 1);
  if (DecodeWaveFill() && ctas * base_splits > wave) {
    // Whole waves: of base_splits / 2 .. base_splits, the split count whose grid leaves the least of
    // its last wave idle (ties: more splits). 16 x 32k: 5 splits are 640 CTAs, 2.4 waves of 264;
    // 4 splits fill 2 waves.
    int64_t best = base_splits;
    double best_fill = 0;
    for (int64_t sp = base_splits; sp >= std::max<int64_t>(1, base_splits / 2); --sp) {
      const int64_t grid = ctas * sp;
      const double fill = static_cast<double>(grid) / static_cast<double>((grid + wave - 1) / wave * wave);
      if (fill > best_fill + 1e-9) {
        best_fill = fill;
        best = sp;
      }
    }
    base_splits = best;
  }
  KeySegment clipped[cuda::kMaxSegmentsPerItem];
  for (const QuerySpan& s : keys.spans()) {
    const int32_t ntok = s.token_end - s.token_begin;
    if (ntok * group > cuda::DecodeTileRows()) continue;
    int32_t nseg = 0;
    const int64_t visible = ClipSegments(keys, s, s.pos_begin, s.pos_begin + ntok - 1, clipped, &nseg);
    const WorkItem base{s.token_begin, ntok, s.pos_begin, 0, 0, 0, -1, 0};
    int64_t splits = std::min<int64_t>({base_splits, std::max<int64_t>(1, visible / kMinKeysPerSplit),
                                        cuda::kMaxMergeSplits});
    if (2 * ctas * splits < wave)
      splits = std::max<int64_t>(splits, std::min<int64_t>({(wave + ctas - 1) / ctas,
                                                            std::max<int64_t>(1, visible / kMinKeysPerSplitUnderWave),
                                                            cuda::kMaxMergeSplits}));
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

  // Which prefill-shaped spans FlashInfer's kernel can run exactly (planned with its scheduler
  // here, once per step); their kvplug items are still made, after the others', for runs whose
  // variant it lacks.
  const PrefillMode mode = PrefillModeFromEnv();
  w.fi_active = false;
  w.fi_num_tokens = 0;
  int32_t fi_requests = 0;
  if (mode == PrefillMode::kFlashInfer && !w.fi_capable)
    return absl::FailedPreconditionError(fmt::format(
        "CUDA engine: KVP_CUDA_PREFILL=flashinfer, but {}", !CudaEngineHasFlashInfer()
                                                                 ? "this build has no FlashInfer (KVP_WITH_FLASHINFER)"
                                                                 : "the device is not sm_90 or the heads/dtype are not built"));
#ifdef KVP_HAVE_FLASHINFER
  if (w.fi_capable && mode != PrefillMode::kKvplug) {
    int32_t rows_total = 0;
    w.fi_qo_indptr[0] = 0;
    for (size_t i = 0; i < keys.spans().size(); ++i) {
      const QuerySpan& s = keys.spans()[i];
      const int32_t ntok = s.token_end - s.token_begin;
      int32_t page = 0, kv_len = 0;
      w.span_on_fi[i] = ntok * group > cuda::DecodeTileRows() &&
                        FlashInferEligible(keys, s, plan.block_size(), &page, &kv_len);
      if (!w.span_on_fi[i]) continue;
      w.fi_token_begin[fi_requests] = s.token_begin;
      w.fi_page_offset[fi_requests] = page;
      w.fi_kv_len[fi_requests] = kv_len;
      rows_total += ntok;
      w.fi_qo_indptr[++fi_requests] = rows_total;
      for (int32_t t = 0; t < ntok; ++t) w.fi_tokens[w.fi_num_tokens++] = s.token_begin + t;
    }
    if (fi_requests > 0) {
      cuda::fi::PlanArgs pa;
      pa.num_requests = fi_requests;
      pa.qo_indptr = w.fi_qo_indptr.data();
      pa.token_begin = w.fi_token_begin.data();
      pa.kv_page_offset = w.fi_page_offset.data();
      pa.kv_len = w.fi_kv_len.data();
      pa.num_q_heads = heads.num_q_heads;
      pa.num_kv_heads = heads.num_kv_heads;
      pa.head_size = heads.head_size;
      pa.page_size = plan.block_size();
      pa.int_ws = w.fi_int_ws;
      pa.int_ws_host = w.fi_int_host.data();
      pa.int_ws_bytes = static_cast<int64_t>(w.fi_int_host.size());
      pa.stream = exec.stream;
      char error[256] = {0};
      if (cuda::fi::Plan(pa, &w.fi_plan, error, sizeof(error)) != 0)
        return absl::InternalError(fmt::format("CUDA engine: {}", error));
      // The one-schedule-for-all-heads kernel (over ~500k rows) is not compiled in.
      w.fi_active = !w.fi_plan.same_schedule_for_all_heads;
    }
    if (!w.fi_active) {
      w.fi_num_tokens = 0;
      std::fill(w.span_on_fi.begin(), w.span_on_fi.begin() + keys.spans().size(), uint8_t{0});
    }
  }
#endif
  auto on_fi = [&](size_t i) { return w.fi_active && w.span_on_fi[i] != 0; };

  // Prefill-shaped spans: tiles of prefill_rows rows, the heaviest (most visible keys) first; the
  // spans kvplug always runs, then the FlashInfer spans' (used only when FlashInfer cannot run).
  const size_t first_prefill = ni;
  // Causal work grows with the tile's last key: launch the heavy tiles first (against wave tails).
  auto visible_keys = [&](const WorkItem& it) {
    int64_t n = 0;
    for (int32_t j = it.seg_begin; j < it.seg_end; ++j) n += w.segments[j].key_end - w.segments[j].key_begin;
    return n;
  };
  size_t group_begin = first_prefill;
  for (const bool fi_group : {false, true}) {
    for (size_t i = 0; i < keys.spans().size(); ++i) {
      const QuerySpan& s = keys.spans()[i];
      const int32_t ntok = s.token_end - s.token_begin;
      const int32_t rows = ntok * group;
      if (rows <= cuda::DecodeTileRows() || on_fi(i) != fi_group) continue;
      for (int32_t row0 = 0; row0 < rows; row0 += prefill_rows) {
        const int32_t first = s.pos_begin + row0 / group;
        const int32_t last = s.pos_begin + (std::min(row0 + prefill_rows, rows) - 1) / group;
        int32_t nseg = 0;
        ClipSegments(keys, s, first, last, clipped, &nseg);
        if (!emit(WorkItem{s.token_begin, ntok, s.pos_begin, row0, 0, 0, -1, 0}, clipped, nseg)) return overflow();
      }
    }
    // std::sort works in place (a plan update allocates nothing); ties keep span and tile order.
    std::sort(w.items.begin() + group_begin, w.items.begin() + ni, [&](const WorkItem& a, const WorkItem& b) {
      const int64_t ka = visible_keys(a), kb = visible_keys(b);
      if (ka != kb) return ka > kb;
      return a.token_begin != b.token_begin ? a.token_begin < b.token_begin : a.row0 < b.row0;
    });
    if (!fi_group) w.num_prefill_kvplug = static_cast<int32_t>(ni - first_prefill);
    group_begin = ni;
  }
  w.num_prefill = static_cast<int32_t>(ni - first_prefill);
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
  if (w.fi_num_tokens > 0)
    if (const int e = kv::cuda::MemcpyAsync(w.fi_tokens_dev, w.fi_tokens.data(), int64_t{w.fi_num_tokens} * 4,
                                            exec.stream); e != 0)
      return absl::InternalError(fmt::format("CUDA engine: FlashInfer rows upload: {}", kv::cuda::ErrorString(e)));
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
  p.decode_kernel = w->decode_kernel;
  // FlashInfer runs its spans when the variant is plain scaled attention (no scale table, soft cap
  // or entropy) on a float16/bfloat16 cache; its spans' kvplug items are skipped then.
  bool fi_run = false;
#ifdef KVP_HAVE_FLASHINFER
  cuda::fi::RunFn fi_launch = nullptr;
  if (w->fi_active && !fp8 && variant.logits_soft_cap == 0.0f && !variant.scale_table && !a.outputs.entropy) {
    fi_launch = cuda::fi::FindRun(a.query.dtype == DType::kBF16, heads.head_size);
    fi_run = fi_launch != nullptr;
  }
#endif
  for (const bool decode : {true, false}) {
    p.items = w->d_items + (decode ? 0 : w->num_decode);
    p.num_items = decode ? w->num_decode : (fi_run ? w->num_prefill_kvplug : w->num_prefill);
    p.heads_fastest = (decode ? kHeadsFastestDecode : kHeadsFastestPrefill) ? 1 : 0;
    p.round_size = decode ? w->decode_round : 0;
    if (p.num_items == 0) continue;
    if (const int e = launch(p, decode, a.exec.stream); e != 0)
      return absl::InternalError(fmt::format("CUDA engine: kernel launch failed: {}", kv::cuda::ErrorString(e)));
    if (!decode) g_kvplug_prefill_launches.fetch_add(1, std::memory_order_relaxed);
  }
#ifdef KVP_HAVE_FLASHINFER
  if (fi_run) {
    // FlashInfer writes base-2 lse rows [token, head] contiguously: straight into a contiguous
    // lse, else into the scratch; either way converted to natural log (and scattered) after.
    float* lse_out = a.outputs.lse ? static_cast<float*>(a.outputs.lse->data) : nullptr;
    const bool lse_dense = lse_out && a.outputs.lse->strides[1] == 1 &&
                           a.outputs.lse->strides[0] == heads.num_q_heads;
    cuda::fi::RunArgs f;
    f.q = a.query.data;
    f.q_stride_n = a.query.strides[0];
    f.q_stride_h = a.query.strides[1];
    f.nnz_qo = a.query.shape[0];
    f.o = a.outputs.out->data;
    f.o_stride_n = a.outputs.out->strides[0];
    f.o_stride_h = a.outputs.out->strides[1];
    f.lse = lse_out ? (lse_dense ? lse_out : w->fi_lse) : nullptr;
    f.k = pages.View().k;
    f.v = pages.View().v;
    f.stride_block = pages.View().stride_block;
    f.stride_pos = pages.View().stride_pos;
    f.stride_head = pages.View().stride_head;
    f.kv_indices = a.plan.device_kv_indices();
    f.num_q_heads = heads.num_q_heads;
    f.num_kv_heads = heads.num_kv_heads;
    f.page_size = a.plan.block_size();
    f.sm_scale = variant.sm_scale;
    f.int_ws = w->fi_int_ws;
    f.plan = &w->fi_plan;
    if (const int e = fi_launch(f, a.exec.stream); e != 0)
      return absl::InternalError(fmt::format("CUDA engine: FlashInfer prefill launch failed: {}",
                                             e < 0 ? std::string("bad arguments") : kv::cuda::ErrorString(e)));
    g_flashinfer_prefill_launches.fetch_add(1, std::memory_order_relaxed);
    if (lse_out)
      if (const int e = cuda::fi::LseToNatural(f.lse, lse_out, a.outputs.lse->strides[0], a.outputs.lse->strides[1],
                                               w->fi_tokens_dev, w->fi_num_tokens, heads.num_q_heads, a.exec.stream);
          e != 0)
        return absl::InternalError(fmt::format("CUDA engine: lse conversion failed: {}", kv::cuda::ErrorString(e)));
  }
#endif
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
