#include "kvplug/attention/attamba/attamba.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "fmt/format.h"
#include "kvplug/attention/engine.h"
#include "kvplug/attention/step_work.h"
#include "kvplug/kv_cache/cuda_kernels.h"
#ifdef KVP_HAVE_CUDA
#include "ssm_cuda.h"
#endif

namespace kvplug::attn::attamba {

absl::Status ValidateSsmArgs(const SsmShape& shape, const SsmArgs& args);                          // ssm_cpu.cc
absl::Status RunSsmCpu(const AttambaConfig& config, const SsmShape& shape, const SsmArgs& args);  // ssm_cpu.cc

namespace {

absl::Status Bad(std::string msg) { return absl::InvalidArgumentError("attamba: " + std::move(msg)); }

SsmShape ShapeOf(const AttambaConfig& c) {
  return SsmShape{c.ssm_heads, c.ssm_head_dim, c.state_size, c.ssm_groups, c.conv_width};
}

}  // namespace

int32_t ChunkGeometry::Offset(const AttambaConfig& c, int32_t layer_index) {
  if (c.chunk_offsets == ChunkOffsets::kUniform) return 0;
  return static_cast<int32_t>(std::min<int64_t>(c.chunk_size - 1, int64_t{layer_index} * (c.chunk_size / c.num_layers)));
}

absl::Status ValidateConfig(const AttambaConfig& c) {
  if (c.chunk_size < 1 || c.chunk_size > 65536)
    return Bad(fmt::format("chunk_size={} must be in [1, 65536]", c.chunk_size));
  if (c.window < 0 || c.window > (1 << 20)) return Bad(fmt::format("window={} must be in [0, 2^20]", c.window));
  if (c.num_layers < 1 || c.num_layers > 4096 || c.layer_index < 0 || c.layer_index >= c.num_layers)
    return Bad(fmt::format("layer_index={} must be in [0, num_layers={}) and num_layers in [1, 4096]", c.layer_index,
                           c.num_layers));
  if (c.chunk_offsets != ChunkOffsets::kCyclic && c.chunk_offsets != ChunkOffsets::kUniform)
    return Bad(fmt::format("chunk_offsets={} must be 0 (cyclic) or 1 (uniform)", static_cast<int32_t>(c.chunk_offsets)));
  if (c.ssm_heads < 0 || c.ssm_heads > 4096) return Bad(fmt::format("ssm_heads={} must be in [0, 4096]", c.ssm_heads));
  if (c.ssm_heads > 0) {
    if (c.ssm_head_dim < 1 || c.ssm_head_dim > 4096 || int64_t{c.ssm_heads} * c.ssm_head_dim > 65536)
      return Bad(fmt::format("ssm_head_dim={} must be in [1, 4096] with ssm_heads x ssm_head_dim <= 65536 (ssm_heads={})",
                             c.ssm_head_dim, c.ssm_heads));
    if (c.state_size < 1 || c.state_size > 256) return Bad(fmt::format("state_size={} must be in [1, 256]", c.state_size));
    if (c.ssm_groups < 1 || c.ssm_heads % c.ssm_groups != 0)
      return Bad(fmt::format("ssm_groups={} must be >= 1 and divide ssm_heads={}", c.ssm_groups, c.ssm_heads));
    if (c.conv_width < 1 || c.conv_width > 8) return Bad(fmt::format("conv_width={} must be in [1, 8]", c.conv_width));
    if (!(c.norm_eps > 0.0f) || !std::isfinite(c.norm_eps))
      return Bad(fmt::format("norm_eps={} must be finite and > 0", c.norm_eps));
  }
  return absl::OkStatus();
}

CacheLayout Layout(const AttambaConfig& c, int32_t bs, int32_t n, int32_t p0) {
  CacheLayout l;
  if (n <= 0) return l;
  int64_t most = 0, least = INT64_MAX;
  // Offsets repeat past P distinct layers; num_layers is bounded (<= 4096).
  for (int32_t layer = 0; layer < c.num_layers; ++layer) {
    const ChunkGeometry g{c.chunk_size, ChunkGeometry::Offset(c, layer)};
    const int64_t rows = g.EndsBefore(n);
    most = std::max(most, rows);
    least = std::min(least, rows);
  }
  l.compressed_rows = static_cast<int32_t>(most);
  l.stable_rows = static_cast<int32_t>(least);
  l.compressed_pages = static_cast<int32_t>((most + bs - 1) / bs);
  l.window_first_page = std::max(0, p0 - c.window) / bs;
  l.window_pages = (n - 1) / bs + 1 - l.window_first_page;
  l.num_pages = l.compressed_pages + l.window_pages;
  l.seq_len = l.compressed_pages * bs + (n - l.window_first_page * bs);
  return l;
}

namespace {

// The step's positions of sequence b and its layout, checked against the batch.
struct SeqStep {
  int32_t p0 = 0, n = 0, page = 0;
  CacheLayout layout;
};

absl::Status ReadStep(const AttambaConfig& c, const BatchPlan& plan, int32_t b, SeqStep* out) {
  if (!plan.has_query_pos_starts())
    return Bad("kvp_batch.query_pos_starts is required (each sequence's first position in the step; seq_lens "
               "holds the rows of its compressed page list, kvp_cache_layout)");
  const int32_t q = plan.query_start_loc()[b + 1] - plan.query_start_loc()[b];
  out->p0 = plan.query_pos_start(b);
  out->n = out->p0 + q;
  out->page = plan.kv_indptr()[b];
  out->layout = Layout(c, plan.block_size(), out->n, out->p0);
  if (plan.seq_lens()[b] != out->layout.seq_len)
    return Bad(fmt::format("sequence {}: positions [{}, {}) with block_size {} need seq_lens = {} ({} compressed "
                           "pages for {} chunk-end rows, then {} window pages from token page {}), got {}",
                           b, out->p0, out->n, plan.block_size(), out->layout.seq_len, out->layout.compressed_pages,
                           out->layout.compressed_rows, out->layout.window_pages, out->layout.window_first_page,
                           plan.seq_lens()[b]));
  return absl::OkStatus();
}

// Every token's compressed slot (its chunk-end row's slot, -1 for other tokens and for rows below
// context_lens[b], held in shared prefix-cache pages) into `compressed` when it is non-null
// ([num_tokens]); with `check_window` and a slot_mapping in the plan, the slot_mapping is checked
// against each token's window slot (or -1). One walk of the step, shared by the CPU write (per
// layer) and, on CUDA, the plan step (BuildWriteSlots: once per step, so the write only launches).
// A plan without a slot_mapping is refused by ValidateWrite at any write.
absl::Status CompressedSlots(const AttambaConfig& config, const ChunkGeometry& geometry, const BatchPlan& plan,
                             bool check_window, int64_t* compressed) {
  const auto qsl = plan.query_start_loc();
  const auto slots = plan.slot_mapping();
  const auto indices = plan.kv_indices();
  const int32_t bs = plan.block_size();
  if (compressed) std::fill_n(compressed, plan.num_tokens(), int64_t{-1});
  check_window = check_window && plan.has_slot_mapping();
  for (int32_t b = 0; b < plan.num_seqs(); ++b) {
    if (qsl[b + 1] == qsl[b]) continue;
    SeqStep st;
    if (absl::Status s = ReadStep(config, plan, b, &st); !s.ok()) return s;
    const int32_t cached_rows = plan.context_len(b);
    for (int32_t t = qsl[b]; t < qsl[b + 1]; ++t) {
      const int32_t p = st.p0 + (t - qsl[b]);
      if (check_window) {
        const int64_t window_slot =
            int64_t{indices[st.page + st.layout.compressed_pages + p / bs - st.layout.window_first_page]} * bs + p % bs;
        if (slots[t] != -1 && slots[t] != window_slot)
          return Bad(fmt::format("slot_mapping[{}]={}: token {} of sequence {} (position {}) has window slot {} "
                                 "(page list entry {} + {}), or -1 to store nothing", t, slots[t], t - qsl[b], b, p,
                                 window_slot, st.layout.compressed_pages + p / bs - st.layout.window_first_page,
                                 p % bs));
      }
      if (compressed && geometry.IsChunkEnd(p)) {
        const int64_t row = geometry.EndsBefore(p);
        if (row >= cached_rows) compressed[t] = int64_t{indices[st.page + row / bs]} * bs + row % bs;
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace

class AttambaPlanner final : public KeySetPlanner {
 public:
  explicit AttambaPlanner(const AttambaConfig& c)
      : config_(c), geometry_{c.chunk_size, ChunkGeometry::Offset(c, c.layer_index)} {}

  std::string Key() const override {
    return fmt::format("attamba/P{}/L{}/o{}/n{}/m{}", config_.chunk_size, config_.window, geometry_.offset,
                       config_.num_layers, static_cast<int32_t>(config_.chunk_offsets));
  }
  KeySetBounds Bounds(const PlanCapacity& c) const override {
    // A span ends where the visible compressed prefix grows (at most once per chunk end crossed,
    // i.e. per token when P = 1) or where its sequence ends.
    const int64_t spans = int64_t{c.max_num_tokens} + 2 * int64_t{c.max_num_seqs};
    return {spans, 2 * spans, 0, 2};
  }

  absl::Status Build(const BatchPlan& plan, KeySets* out) const override {
    out->Clear();
    const auto qsl = plan.query_start_loc();
    const int32_t bs = plan.block_size(), L = config_.window;
    for (int32_t b = 0; b < plan.num_seqs(); ++b) {
      if (qsl[b + 1] == qsl[b]) continue;
      SeqStep st;
      if (absl::Status s = ReadStep(config_, plan, b, &st); !s.ok()) return s;
      // Window key j (from the sequence's first page) is at position window_base + j.
      const int32_t window_rows0 = st.layout.compressed_pages * bs;
      const int32_t window_base = st.layout.window_first_page * bs - window_rows0;
      for (int32_t t = st.p0; t < st.n;) {
        // Chunk ends before t - L are seen through the compressed rows (all of them: no mask); the
        // prefix grows when t - L - 1 reaches the next chunk end.
        const int64_t visible = geometry_.EndsBefore(int64_t{t} - L);
        const int64_t grows_at = geometry_.NextEnd(int64_t{t} - L) + L + 1;
        const int32_t e = static_cast<int32_t>(std::min<int64_t>(st.n, grows_at));
        KeySegment segs[2];
        int32_t num = 0;
        if (visible > 0)
          segs[num++] = KeySegment{st.page, 0, static_cast<int32_t>(visible), 0, -1, 0, kUnboundedLag};
        const int32_t lo = std::max(0, t - L);
        segs[num++] = KeySegment{st.page, lo - window_base, e - window_base, window_base, -1, 0, L};
        const QuerySpan span{b, qsl[b] + (t - st.p0), qsl[b] + (e - st.p0), t, 0, 0};
        if (!out->AddSpan(span, {segs, size_t(num)})) return absl::InternalError("attamba planner: key set bounds exceeded");
        t = e;
      }
    }
    return absl::OkStatus();
  }

  // The compressed slots of the step's chunk ends (CUDA: uploaded with the plan for WriteKv), and
  // the check of the plan's slot_mapping against the window slots: once per step here, so a bad
  // slot_mapping is refused by kvp_plan_update (or by the first write of an unattached plan) and the
  // per-layer CUDA write only launches.
  bool has_write_slots() const override { return true; }
  absl::Status BuildWriteSlots(const BatchPlan& plan, absl::Span<int64_t> out) const override {
    if (out.size() < size_t(plan.num_tokens())) return absl::InternalError("attamba planner: write slots too short");
    return CompressedSlots(config_, geometry_, plan, /*check_window=*/true, out.data());
  }

 private:
  AttambaConfig config_;
  ChunkGeometry geometry_;
};

namespace {

class Attamba final : public VariantBackend {
 public:
  Attamba(const HeadConfig& heads, const AttambaConfig& config, Device device)
      : VariantBackend(heads, device, std::make_shared<AttambaPlanner>(config)),
        config_(config),
        geometry_{config.chunk_size, ChunkGeometry::Offset(config, config.layer_index)} {}

  CacheLayout Layout(int32_t block_size, int32_t num_tokens, int32_t query_pos_start) const override {
    return attamba::Layout(config_, block_size, num_tokens, query_pos_start);
  }

  int64_t state_bytes_per_layer() const override {
    return config_.ssm_heads > 0 ? 2 * ShapeOf(config_).state_floats() * 4 : 0;
  }

  absl::Status WriteKv(const WriteArgs& a) const override {
    const BatchPlan& plan = a.plan;
    if (a.cache.device() == Device::kCuda) {
      // The compressed slots were built, and the slot_mapping checked against the window slots,
      // by the plan step (AttambaPlanner::BuildWriteSlots, uploaded with the plan). Every slot of
      // both lists is then a page-list entry's row or -1, in range since the plan's pages are
      // (ValidateWrite: max_block_id < num_blocks, rechecked here in O(1)): no walk over the
      // tokens per layer, only the step's generation and two launches (window, compressed).
      if (!a.work || !a.work->device_write_slots || a.work->generation != plan.generation())
        return absl::FailedPreconditionError(
            "attamba: the CUDA write needs this step's compressed slots from the plan step (kvp_plan_attach the "
            "attention, or write through kvp_attention_write_kv)");
      if (a.key.dtype == DType::kFP8E4M3 || a.value.dtype == DType::kFP8E4M3)
        return absl::InvalidArgumentError("attamba: key/value: dtype fp8_e4m3 is not an input type");
      if (plan.max_block_id() >= a.cache.options().num_blocks)
        return absl::OutOfRangeError(fmt::format("attamba: the plan references block {} but the cache has {} blocks",
                                                 plan.max_block_id(), a.cache.options().num_blocks));
      if (absl::Status s = a.cache.WriteDeviceSlots(a.layer, a.key, a.value, plan.device_slot_mapping(),
                                                    plan.num_tokens(), a.exec.stream);
          !s.ok())
        return s;
      return a.cache.WriteDeviceSlots(a.layer, a.key, a.value, a.work->device_write_slots, plan.num_tokens(),
                                      a.exec.stream);
    }
    if (a.cache.device() != Device::kCpu)
      return absl::UnimplementedError("attamba: the compressed write runs on the CPU only in this build");
    // Every token's slots are derived from the page list and checked before anything is written.
    static thread_local std::vector<int64_t> compressed;
    compressed.assign(size_t(plan.num_tokens()), -1);
    if (absl::Status s = CompressedSlots(config_, geometry_, plan, /*check_window=*/true, compressed.data()); !s.ok())
      return s;
    if (absl::Status s = a.cache.Write(a.layer, a.key, a.value, plan.slot_mapping(), nullptr, nullptr); !s.ok()) return s;
    return a.cache.Write(a.layer, a.key, a.value, compressed, nullptr, nullptr);
  }

  absl::Status RunSsm(const SsmArgs& a) const override {
    if (config_.ssm_heads == 0)
      return absl::FailedPreconditionError(
          "attamba: the config has ssm_heads = 0 (the engine runs its own SSM); set ssm_heads, ssm_head_dim, "
          "state_size, ssm_groups and conv_width to run it here");
#ifndef KVP_HAVE_CUDA
    if (a.cache.device() != Device::kCpu)
      return absl::UnimplementedError("attamba: the SSM runs on the CPU only in this build");
#endif
    const SsmShape shape = ShapeOf(config_);
    if (absl::Status s = ValidateSsmArgs(shape, a); !s.ok()) return s;
    if (a.cache.device() == Device::kCpu) return RunSsmCpu(config_, shape, a);
#ifdef KVP_HAVE_CUDA
    return RunSsmCuda(shape, a);
#else
    return absl::UnimplementedError("attamba: the SSM runs on the CPU only in this build");
#endif
  }

 private:
#ifdef KVP_HAVE_CUDA
  absl::Status RunSsmCuda(const SsmShape& shape, const SsmArgs& a) const {
    const BatchPlan& plan = a.plan;
    if (!plan.on_device() || a.in.device != Device::kCuda || a.out.device != Device::kCuda)
      return absl::InvalidArgumentError("attamba ssm: a CUDA cache needs a CUDA plan and in/out on the device");
    auto state = a.cache.State(a.layer, 0);  // slot 0 exists: ValidateSsmArgs checked num_state_slots > 0
    if (!state.ok()) return state.status();
    auto vec = [](const TensorView* v) { return v ? static_cast<const float*>(v->data) : nullptr; };
    cuda::SsmParams p;
    p.in = static_cast<const float*>(a.in.data);
    p.in_stride = a.in.strides[0];
    p.out = static_cast<float*>(a.out.data);
    p.out_stride = a.out.strides[0];
    p.conv_weight = vec(a.conv_weight);
    p.conv_bias = vec(a.conv_bias);
    p.dt_bias = vec(a.dt_bias);
    p.a_log = vec(a.a_log);
    p.d_skip = vec(a.d_skip);
    p.norm_weight = vec(a.norm_weight);
    p.state_base = state->data();
    p.state_slot_bytes = a.cache.options().state_bytes_per_layer;
    p.state_offset = a.which * shape.state_floats();
    p.query_start_loc = plan.device_query_start_loc();
    p.query_pos_starts = plan.device_query_pos_starts();
    p.state_slots = plan.device_state_slots();
    p.num_seqs = plan.num_seqs();
    p.num_tokens = plan.num_tokens();
    p.heads = shape.heads;
    p.head_dim = shape.head_dim;
    p.state = shape.state;
    p.groups = shape.groups;
    p.conv_width = shape.conv_width;
    p.chunk_size = geometry_.chunk_size;
    p.chunk_offset = geometry_.offset;
    p.norm_eps = config_.norm_eps;
    p.num_sms = a.exec.num_sms;
    const auto qsl = plan.query_start_loc();  // host copy: O(num_seqs)
    for (int32_t b = 0; b < plan.num_seqs(); ++b) p.max_seq_tokens = std::max(p.max_seq_tokens, qsl[b + 1] - qsl[b]);
    if (const int e = cuda::LaunchSsm(p, a.exec.stream); e != 0)
      return absl::InternalError(fmt::format("attamba ssm: kernel launch: {}", kv::cuda::ErrorString(e)));
    return absl::OkStatus();
  }
#endif

  AttambaConfig config_;
  ChunkGeometry geometry_;
};

}  // namespace

BackendInfo Info() {
  BackendInfo info = FamilyBackendInfo("attamba");
  // CUDA (in CUDA builds): the family's engine; the compressed write through the cache's write with
  // slots uploaded with the plan step, the SSM in cuda/ssm.cu.
  info.needs_state_slots = true;
  info.experimental = true;
  info.create = [](const HeadConfig& heads, const BackendConfig& config,
                   const ExecContext& exec) -> absl::StatusOr<std::unique_ptr<AttentionBackend>> {
    auto parsed = ConfigOrDefault<AttambaConfig>(config, "attamba", "AttambaConfig");
    if (!parsed.ok()) return parsed.status();
    if (absl::Status s = ValidateConfig(*parsed); !s.ok()) return s;
    if (exec.device == Device::kCuda)
      if (absl::Status s = CheckCudaEngineSupport(heads); !s.ok()) return s;
    return std::make_unique<Attamba>(heads, *parsed, exec.device);
  };
  return info;
}

}  // namespace kvplug::attn::attamba
