#include "kvplug/kv_cache/kv_cache.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <new>

#include "fmt/format.h"
#include "kvplug/kv_cache/alloc_hook.h"
#include "kvplug/kv_cache/cuda_kernels.h"
#include "kvplug/kv_cache/device.h"

namespace kvplug::kv {

absl::StatusOr<KvCache::Buffer> KvCache::Allocate(int64_t bytes, Device device, int32_t device_id,
                                                  bool pinned) {
  if (bytes == 0) return Buffer(nullptr, [](void*) {});
  if (ShouldFailAllocation())
    return absl::ResourceExhaustedError(fmt::format("allocating {} bytes failed (injected)", bytes));
  if (device == Device::kCuda || pinned) {
    void* p = nullptr;
    const int e = pinned ? cuda::PinnedAlloc(&p, bytes) : cuda::DeviceAlloc(&p, bytes, device_id);
    if (e != 0)
      return absl::ResourceExhaustedError(fmt::format("allocating {} {} bytes failed: {}", bytes,
                                                      pinned ? "pinned host" : "device", cuda::ErrorString(e)));
    return Buffer(p, pinned ? &cuda::PinnedFree : &cuda::DeviceFree);
  }
  void* p = ::operator new[](static_cast<size_t>(bytes), std::nothrow);
  if (!p) return absl::ResourceExhaustedError(fmt::format("allocating {} host bytes failed", bytes));
  std::memset(p, 0, static_cast<size_t>(bytes));
  return Buffer(p, [](void* q) { ::operator delete[](q); });
}

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
  if (o.dtype == DType::kFP8E4M3 && o.device != Device::kCuda)
    return absl::UnimplementedError("dtype=fp8_e4m3 caches live on CUDA devices only");
  for (const auto* scales : {&o.k_scales, &o.v_scales}) {
    if (!scales->empty() && static_cast<int32_t>(scales->size()) != o.num_layers)
      return bad(fmt::format("{} scales given for num_layers={}", scales->size(), o.num_layers));
    for (size_t l = 0; l < scales->size(); ++l)
      if (!std::isfinite((*scales)[l]) || !((*scales)[l] > 0.0f))
        return bad(fmt::format("{}[{}]={} must be finite and > 0", scales == &o.k_scales ? "k_scales" : "v_scales", l,
                               (*scales)[l]));
  }
  if (o.device == Device::kCuda && o.dtype == DType::kF32)
    return absl::UnimplementedError("CUDA caches hold float16 or bfloat16 (dtype=float32 is CPU-only)");
  if (o.device == Device::kCuda && !BuiltWithCuda())
    return absl::UnimplementedError("a CUDA cache needs a library built with CUDA");
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
  std::vector<Buffer> owned;
  layers.reserve(options.num_layers);
  owned.reserve(options.num_layers);
  for (int32_t l = 0; l < options.num_layers; ++l) {
    auto pages = Allocate(layer_elems * static_cast<int64_t>(DTypeSize(options.dtype)), options.device,
                          options.device_id, false);
    if (!pages.ok())
      return absl::ResourceExhaustedError(fmt::format("layer {} of {}: {}", l, options.num_layers,
                                                      std::string(pages.status().message())));
    layers.push_back(MakeContiguousLayer(pages->get(), options, options.num_blocks));
    owned.push_back(std::move(*pages));
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
  std::unique_ptr<KvCache> cache(ShouldFailAllocation() ? nullptr
                                                        : new (std::nothrow) KvCache(options, std::move(layers)));
  if (!cache) return absl::ResourceExhaustedError("allocating the cache object failed");
  const int64_t host_bytes = 2LL * options.num_host_blocks * options.block_size *
                             options.num_kv_heads * options.head_size *
                             static_cast<int64_t>(DTypeSize(options.dtype));
  cache->host_layers_.reserve(options.num_layers);
  // Host swap pages are pinned for CUDA caches so swaps run asynchronously on the stream.
  const bool pinned = options.device == Device::kCuda;
  for (int32_t l = 0; l < options.num_layers; ++l) {
    auto pages = Allocate(host_bytes, Device::kCpu, 0, pinned && host_bytes > 0);
    if (!pages.ok())
      return absl::ResourceExhaustedError(fmt::format("host swap pages of layer {}: {}", l, std::string(pages.status().message())));
    cache->host_layers_.push_back(MakeContiguousLayer(pages->get(), options, options.num_host_blocks));
    cache->owned_.push_back(std::move(*pages));
  }
  const int64_t state_bytes =
      static_cast<int64_t>(options.num_layers) * options.num_state_slots * options.state_bytes_per_layer;
  auto state = Allocate(state_bytes, options.device, options.device_id, false);
  if (!state.ok()) return state.status();
  cache->state_ = std::move(*state);
  return cache;
}

absl::Status KvCache::CheckLayer(int32_t layer) const {
  if (layer < 0 || layer >= options_.num_layers)
    return absl::OutOfRangeError(
        fmt::format("layer={} out of range [0, {})", layer, options_.num_layers));
  return absl::OkStatus();
}

absl::Status KvCache::LaunchWrite(const PagedLayer& pages, const TensorView& key, const TensorView& value,
                                  const int64_t* device_slots, int64_t num_tokens, void* stream) const {
    cuda::KvWriteParams p;
    p.page_dtype = static_cast<int32_t>(pages.dtype);
    p.input_dtype = static_cast<int32_t>(key.dtype);
    if (value.dtype != key.dtype)
      return absl::InvalidArgumentError(fmt::format("key dtype {} differs from value dtype {}",
                                                    DTypeName(key.dtype), DTypeName(value.dtype)));
    p.key = key.data;
    p.value = value.data;
    p.k_stride_token = key.strides[0];
    p.k_stride_head = key.strides[1];
    p.v_stride_token = value.strides[0];
    p.v_stride_head = value.strides[1];
    p.pages = pages.View();
    p.slot_mapping = device_slots;
    p.num_tokens = static_cast<int32_t>(num_tokens);
    p.num_slots = static_cast<int64_t>(options_.num_blocks) * options_.block_size;
    const int32_t layer = static_cast<int32_t>(&pages - layers_.data());
    p.k_inv_scale = 1.0f / k_scale(layer);
    p.v_inv_scale = 1.0f / v_scale(layer);
    p.num_kv_heads = options_.num_kv_heads;
    p.head_size = options_.head_size;
    p.block_size = options_.block_size;
    // 16-byte vector moves need 16-byte aligned rows; otherwise the kernel takes its scalar path.
    const bool aligned = reinterpret_cast<uintptr_t>(key.data) % 16 == 0 && reinterpret_cast<uintptr_t>(value.data) % 16 == 0 &&
                         key.strides[0] % 8 == 0 && key.strides[1] % 8 == 0 && value.strides[0] % 8 == 0 &&
                         value.strides[1] % 8 == 0;
    p.vectorized = aligned && p.input_dtype == p.page_dtype && options_.head_size % 8 == 0;
    if (const int e = cuda::LaunchKvWrite(p, stream); e != 0)
      return absl::InternalError(fmt::format("KV write kernel: {}", cuda::ErrorString(e)));
    return absl::OkStatus();
  }

absl::Status KvCache::WriteDeviceSlots(int32_t layer, const TensorView& key, const TensorView& value,
                                       const int64_t* device_slots, int64_t num_tokens, void* stream) {
  if (absl::Status s = CheckLayer(layer); !s.ok()) return s;
  if (options_.device != Device::kCuda)
    return absl::InvalidArgumentError("slots in device memory need a CUDA cache");
  for (const TensorView* v : {&key, &value})
    if (v->ndim != 3 || v->shape[0] != num_tokens || v->shape[1] != options_.num_kv_heads ||
        v->shape[2] != options_.head_size || v->strides[2] != 1)
      return absl::InvalidArgumentError(fmt::format("{}: expected [{}, {}, {}] with a contiguous last axis",
                                                    v == &key ? "key" : "value", num_tokens,
                                                    options_.num_kv_heads, options_.head_size));
  return LaunchWrite(layers_[layer], key, value, device_slots, num_tokens, stream);
}

absl::Status KvCache::Write(int32_t layer, const TensorView& key, const TensorView& value,
                            absl::Span<const int64_t> slots, const int64_t* device_slots, void* stream) {
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
  if (options_.device == Device::kCuda) {
    if (!device_slots) return absl::InvalidArgumentError("a CUDA cache write needs the slots in device memory");
    return LaunchWrite(pages, key, value, device_slots, static_cast<int64_t>(slots.size()), stream);
  }
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

absl::Status KvCache::Move(void* dst, const void* src, int64_t bytes, void* stream) const {
  if (options_.device == Device::kCpu) {
    std::memmove(dst, src, static_cast<size_t>(bytes));
    return absl::OkStatus();
  }
  if (const int e = cuda::MemcpyAsync(dst, src, bytes, stream); e != 0)
    return absl::InternalError(fmt::format("cudaMemcpyAsync of {} bytes: {}", bytes, cuda::ErrorString(e)));
  return absl::OkStatus();
}

absl::Status KvCache::CopyBlock(const PagedLayer& from, int32_t src, const PagedLayer& to, int32_t dst,
                                void* stream) const {
  const int64_t elem = static_cast<int64_t>(DTypeSize(from.dtype));
  const int64_t row_bytes = from.head_size * elem;
  // Packed blocks (kvplug's own pages, and packed caller tensors) move as one copy per K and V.
  const bool packed = from.stride_head == from.head_size && to.stride_head == to.head_size &&
                      from.stride_pos == from.stride_head * from.num_kv_heads &&
                      to.stride_pos == to.stride_head * to.num_kv_heads;
  for (int kv = 0; kv < 2; ++kv) {
    if (packed) {
      if (absl::Status s = Move(to.Row(kv, dst, 0, 0), from.Row(kv, src, 0, 0),
                                from.stride_pos * from.block_size * elem, stream);
          !s.ok())
        return s;
      continue;
    }
    for (int64_t pos = 0; pos < from.block_size; ++pos)
      for (int64_t h = 0; h < from.num_kv_heads; ++h)
        if (absl::Status s = Move(to.Row(kv, dst, pos, h), from.Row(kv, src, pos, h), row_bytes, stream); !s.ok())
          return s;
  }
  return absl::OkStatus();
}

absl::Status KvCache::CopyBlocks(absl::Span<const paged::BlockCopy> copies, void* stream) {
  if (absl::Status s = CheckCopies(copies, options_.num_blocks, options_.num_blocks, "copy_blocks");
      !s.ok())
    return s;
  for (const PagedLayer& l : layers_)
    for (const auto& c : copies)
      if (absl::Status s = CopyBlock(l, c.src, l, c.dst, stream); !s.ok()) return s;
  return absl::OkStatus();
}

absl::Status KvCache::SwapOut(absl::Span<const paged::BlockCopy> copies, void* stream) {
  if (absl::Status s = CheckCopies(copies, options_.num_blocks, options_.num_host_blocks, "swap_out");
      !s.ok())
    return s;
  for (int32_t l = 0; l < options_.num_layers; ++l)
    for (const auto& c : copies)
      if (absl::Status s = CopyBlock(layers_[l], c.src, host_layers_[l], c.dst, stream); !s.ok()) return s;
  return absl::OkStatus();
}

absl::Status KvCache::SwapIn(absl::Span<const paged::BlockCopy> copies, void* stream) {
  if (absl::Status s = CheckCopies(copies, options_.num_host_blocks, options_.num_blocks, "swap_in");
      !s.ok())
    return s;
  for (int32_t l = 0; l < options_.num_layers; ++l)
    for (const auto& c : copies)
      if (absl::Status s = CopyBlock(host_layers_[l], c.src, layers_[l], c.dst, stream); !s.ok()) return s;
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

absl::Status KvCache::CopyState(int32_t src_slot, int32_t dst_slot, void* stream) {
  for (int32_t slot : {src_slot, dst_slot})
    if (slot < 0 || slot >= options_.num_state_slots)
      return absl::OutOfRangeError(fmt::format("state slot={} out of range [0, {}) (copy {} -> {})",
                                               slot, options_.num_state_slots, src_slot, dst_slot));
  for (int32_t l = 0; l < options_.num_layers; ++l) {
    auto src = *State(l, src_slot);
    auto dst = *State(l, dst_slot);
    if (!src.empty())
      if (absl::Status s = Move(dst.data(), src.data(), static_cast<int64_t>(src.size()), stream); !s.ok()) return s;
  }
  return absl::OkStatus();
}

}  // namespace kvplug::kv
