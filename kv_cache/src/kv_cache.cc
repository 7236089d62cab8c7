#include "kvplug/kv_cache/kv_cache.h"

#include <cstring>
#include <limits>
#include <new>

#include "fmt/format.h"

namespace kvplug::kv {
namespace {

std::unique_ptr<std::byte[]> AllocateZeroed(int64_t bytes) {
  if (bytes == 0) return nullptr;
  std::unique_ptr<std::byte[]> p(new (std::nothrow) std::byte[static_cast<size_t>(bytes)]());
  return p;
}

}  // namespace

absl::Status ValidateOptions(const KvCacheOptions& o) {
  auto bad = [](std::string msg) { return absl::InvalidArgumentError(std::move(msg)); };
  if (o.num_layers <= 0) return bad(fmt::format("num_layers={} must be > 0", o.num_layers));
  if (o.num_blocks <= 0) return bad(fmt::format("num_blocks={} must be > 0", o.num_blocks));
  if (o.block_size <= 0 || o.block_size > 65536)
    return bad(fmt::format("block_size={} must be in [1, 65536]", o.block_size));
  if (o.num_kv_heads <= 0) return bad(fmt::format("num_kv_heads={} must be > 0", o.num_kv_heads));
  if (o.head_size <= 0 || o.head_size > 1024)
    return bad(fmt::format("head_size={} must be in [1, 1024]", o.head_size));
  const auto dt = static_cast<int32_t>(o.dtype);
  if (dt < 0 || dt > 3) return bad(fmt::format("dtype={} is not a kvp_dtype", dt));
  if (o.dtype == DType::kFP8E4M3)
    return absl::UnimplementedError("dtype=fp8_e4m3 caches need the CUDA backend");
  const auto layout = static_cast<int32_t>(o.layout);
  if (layout != 0 && layout != 1) return bad(fmt::format("layout={} is not a kvp_kv_layout", layout));
  if (o.num_host_blocks < 0) return bad(fmt::format("num_host_blocks={} must be >= 0", o.num_host_blocks));
  if (o.num_state_slots < 0) return bad(fmt::format("num_state_slots={} must be >= 0", o.num_state_slots));
  if (o.state_bytes_per_layer < 0)
    return bad(fmt::format("state_bytes_per_layer={} must be >= 0", o.state_bytes_per_layer));
  // Every byte offset must fit in int64 (and sizes the host can address).
  const double layer_bytes = 2.0 * o.num_blocks * o.block_size * o.num_kv_heads * o.head_size *
                             static_cast<double>(DTypeSize(o.dtype));
  const double state_bytes = static_cast<double>(o.num_layers) * o.num_state_slots * o.state_bytes_per_layer;
  if (layer_bytes * o.num_layers > 9.0e18 || state_bytes > 9.0e18)
    return absl::ResourceExhaustedError(fmt::format(
        "cache of {} layers x {:.0f} bytes (+{:.0f} state bytes) is too large", o.num_layers,
        layer_bytes, state_bytes));
  return absl::OkStatus();
}

std::array<int64_t, 5> PagedLayer::Shape(Layout layout) const {
  if (layout == Layout::kKvFirst) return {2, num_blocks, block_size, num_kv_heads, head_size};
  return {num_blocks, 2, block_size, num_kv_heads, head_size};
}

std::array<int64_t, 5> PagedLayer::Strides(Layout layout) const {
  if (layout == Layout::kKvFirst) return {stride_kv, stride_block, stride_pos, stride_head, 1};
  return {stride_block, stride_kv, stride_pos, stride_head, 1};
}

PagedLayer MakeContiguousLayer(void* data, const KvCacheOptions& o, int32_t num_blocks) {
  PagedLayer l;
  l.data = data;
  l.dtype = o.dtype;
  l.num_blocks = num_blocks;
  l.block_size = o.block_size;
  l.num_kv_heads = o.num_kv_heads;
  l.head_size = o.head_size;
  l.stride_head = o.head_size;
  l.stride_pos = l.stride_head * o.num_kv_heads;
  const int64_t block_elems = l.stride_pos * o.block_size;
  if (o.layout == Layout::kKvFirst) {
    l.stride_block = block_elems;
    l.stride_kv = block_elems * num_blocks;
  } else {
    l.stride_kv = block_elems;
    l.stride_block = 2 * block_elems;
  }
  return l;
}

KvCache::KvCache(const KvCacheOptions& options, std::vector<PagedLayer> layers)
    : options_(options), layers_(std::move(layers)) {}

KvCache::~KvCache() = default;

absl::StatusOr<std::unique_ptr<KvCache>> KvCache::Create(const KvCacheOptions& options) {
  if (absl::Status s = ValidateOptions(options); !s.ok()) return s;
  const int64_t layer_elems = 2LL * options.num_blocks * options.block_size * options.num_kv_heads *
                              options.head_size;
  std::vector<PagedLayer> layers;
  std::vector<std::unique_ptr<std::byte[]>> owned;
  layers.reserve(options.num_layers);
  owned.reserve(options.num_layers);
  for (int32_t l = 0; l < options.num_layers; ++l) {
    auto pages = AllocateZeroed(layer_elems * static_cast<int64_t>(DTypeSize(options.dtype)));
    if (!pages)
      return absl::ResourceExhaustedError(fmt::format(
          "allocating layer {} of {} ({} bytes) failed", l, options.num_layers,
          layer_elems * DTypeSize(options.dtype)));
    layers.push_back(MakeContiguousLayer(pages.get(), options, options.num_blocks));
    owned.push_back(std::move(pages));
  }
  auto made = CreateExternal(options, std::move(layers));
  if (!made.ok()) return made.status();
  for (auto& p : owned) (*made)->owned_.push_back(std::move(p));
  return made;
}

absl::StatusOr<std::unique_ptr<KvCache>> KvCache::CreateExternal(const KvCacheOptions& options,
                                                                 std::vector<PagedLayer> layers) {
  if (absl::Status s = ValidateOptions(options); !s.ok()) return s;
  if (static_cast<int32_t>(layers.size()) != options.num_layers)
    return absl::InvalidArgumentError(fmt::format("{} layer tensors given for num_layers={}",
                                                  layers.size(), options.num_layers));
  std::unique_ptr<KvCache> cache(new (std::nothrow) KvCache(options, std::move(layers)));
  if (!cache) return absl::ResourceExhaustedError("allocating the cache object failed");
  const int64_t host_bytes = 2LL * options.num_host_blocks * options.block_size *
                             options.num_kv_heads * options.head_size *
                             static_cast<int64_t>(DTypeSize(options.dtype));
  cache->host_layers_.reserve(options.num_layers);
  for (int32_t l = 0; l < options.num_layers; ++l) {
    auto pages = AllocateZeroed(host_bytes);
    if (host_bytes > 0 && !pages)
      return absl::ResourceExhaustedError(
          fmt::format("allocating {} host swap bytes for layer {} failed", host_bytes, l));
    cache->host_layers_.push_back(MakeContiguousLayer(pages.get(), options, options.num_host_blocks));
    cache->owned_.push_back(std::move(pages));
  }
  const int64_t state_bytes =
      static_cast<int64_t>(options.num_layers) * options.num_state_slots * options.state_bytes_per_layer;
  cache->state_ = AllocateZeroed(state_bytes);
  if (state_bytes > 0 && !cache->state_)
    return absl::ResourceExhaustedError(fmt::format("allocating {} state bytes failed", state_bytes));
  return cache;
}

absl::Status KvCache::CheckLayer(int32_t layer) const {
  if (layer < 0 || layer >= options_.num_layers)
    return absl::OutOfRangeError(
        fmt::format("layer={} out of range [0, {})", layer, options_.num_layers));
  return absl::OkStatus();
}

absl::Status KvCache::Write(int32_t layer, const TensorView& key, const TensorView& value,
                            absl::Span<const int64_t> slots) {
  if (absl::Status s = CheckLayer(layer); !s.ok()) return s;
  const int64_t capacity = static_cast<int64_t>(options_.num_blocks) * options_.block_size;
  for (size_t i = 0; i < slots.size(); ++i) {
    if (slots[i] < -1 || slots[i] >= capacity)
      return absl::OutOfRangeError(fmt::format(
          "slot_mapping[{}]={} out of range [-1, {}) (num_blocks={} x block_size={})", i, slots[i],
          capacity, options_.num_blocks, options_.block_size));
  }
  for (const TensorView* v : {&key, &value}) {
    const char* name = v == &key ? "key" : "value";
    if (v->ndim != 3 || v->shape[0] != static_cast<int64_t>(slots.size()) ||
        v->shape[1] != options_.num_kv_heads || v->shape[2] != options_.head_size || v->strides[2] != 1)
      return absl::InvalidArgumentError(fmt::format(
          "{}: expected [{}, {}, {}] with a contiguous last axis, got ndim={} shape=[{}, {}, {}]",
          name, slots.size(), options_.num_kv_heads, options_.head_size, v->ndim, v->shape[0],
          v->shape[1], v->shape[2]));
    if (v->dtype == DType::kFP8E4M3)
      return absl::InvalidArgumentError(fmt::format("{}: dtype fp8_e4m3 is not an input type", name));
  }
  const PagedLayer& pages = layers_[layer];
  const int64_t d = options_.head_size;
  for (size_t t = 0; t < slots.size(); ++t) {
    if (slots[t] < 0) continue;
    const int64_t block = slots[t] / options_.block_size;
    const int64_t pos = slots[t] % options_.block_size;
    for (int64_t h = 0; h < options_.num_kv_heads; ++h) {
      const TensorView* src[2] = {&key, &value};
      for (int kv = 0; kv < 2; ++kv) {
        const void* row = src[kv]->At(static_cast<int64_t>(t), h, 0);
        void* dst = pages.Row(kv, block, pos, h);
        if (src[kv]->dtype == pages.dtype) {
          std::memcpy(dst, row, d * DTypeSize(pages.dtype));
        } else {
          for (int64_t i = 0; i < d; ++i)
            StoreFromFloat(dst, pages.dtype, i, LoadAsFloat(row, src[kv]->dtype, i));
        }
      }
    }
  }
  return absl::OkStatus();
}

absl::Status KvCache::CheckCopies(absl::Span<const paged::BlockCopy> copies, int32_t num_src,
                                  int32_t num_dst, const char* what) const {
  for (size_t i = 0; i < copies.size(); ++i) {
    const auto& c = copies[i];
    if (c.src < 0 || c.src >= num_src || c.dst < 0 || c.dst >= num_dst)
      return absl::OutOfRangeError(fmt::format(
          "{}: copies[{}] = ({} -> {}) out of range: src in [0, {}), dst in [0, {})", what, i, c.src,
          c.dst, num_src, num_dst));
  }
  return absl::OkStatus();
}

void KvCache::CopyBlock(const PagedLayer& from, int32_t src, const PagedLayer& to, int32_t dst) {
  const size_t row_bytes = static_cast<size_t>(from.head_size) * DTypeSize(from.dtype);
  for (int kv = 0; kv < 2; ++kv)
    for (int64_t pos = 0; pos < from.block_size; ++pos)
      for (int64_t h = 0; h < from.num_kv_heads; ++h)
        std::memmove(to.Row(kv, dst, pos, h), from.Row(kv, src, pos, h), row_bytes);
}

absl::Status KvCache::CopyBlocks(absl::Span<const paged::BlockCopy> copies) {
  if (absl::Status s = CheckCopies(copies, options_.num_blocks, options_.num_blocks, "copy_blocks");
      !s.ok())
    return s;
  for (const PagedLayer& l : layers_)
    for (const auto& c : copies) CopyBlock(l, c.src, l, c.dst);
  return absl::OkStatus();
}

absl::Status KvCache::SwapOut(absl::Span<const paged::BlockCopy> copies) {
  if (absl::Status s = CheckCopies(copies, options_.num_blocks, options_.num_host_blocks, "swap_out");
      !s.ok())
    return s;
  for (int32_t l = 0; l < options_.num_layers; ++l)
    for (const auto& c : copies) CopyBlock(layers_[l], c.src, host_layers_[l], c.dst);
  return absl::OkStatus();
}

absl::Status KvCache::SwapIn(absl::Span<const paged::BlockCopy> copies) {
  if (absl::Status s = CheckCopies(copies, options_.num_host_blocks, options_.num_blocks, "swap_in");
      !s.ok())
    return s;
  for (int32_t l = 0; l < options_.num_layers; ++l)
    for (const auto& c : copies) CopyBlock(host_layers_[l], c.src, layers_[l], c.dst);
  return absl::OkStatus();
}

absl::StatusOr<absl::Span<uint8_t>> KvCache::State(int32_t layer, int32_t slot) {
  if (absl::Status s = CheckLayer(layer); !s.ok()) return s;
  if (slot < 0 || slot >= options_.num_state_slots)
    return absl::OutOfRangeError(
        fmt::format("state slot={} out of range [0, {})", slot, options_.num_state_slots));
  const int64_t bytes = options_.state_bytes_per_layer;
  auto* base = reinterpret_cast<uint8_t*>(state_.get()) +
               (static_cast<int64_t>(layer) * options_.num_state_slots + slot) * bytes;
  return absl::Span<uint8_t>(base, static_cast<size_t>(bytes));
}

absl::Status KvCache::CopyState(int32_t src_slot, int32_t dst_slot) {
  for (int32_t slot : {src_slot, dst_slot})
    if (slot < 0 || slot >= options_.num_state_slots)
      return absl::OutOfRangeError(fmt::format("state slot={} out of range [0, {}) (copy {} -> {})",
                                               slot, options_.num_state_slots, src_slot, dst_slot));
  for (int32_t l = 0; l < options_.num_layers; ++l) {
    auto src = *State(l, src_slot);
    auto dst = *State(l, dst_slot);
    if (!src.empty()) std::memmove(dst.data(), src.data(), src.size());
  }
  return absl::OkStatus();
}

}  // namespace kvplug::kv
