// Paged K/V storage of every layer on one device, host swap pages, and per-sequence state slots.
// The cache stores and moves bytes; which block holds which token is the block manager's business.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kvplug/kv_cache/dtype.h"
#include "kvplug/kv_cache/paged_kv_view.h"
#include "kvplug/kv_cache/tensor_view.h"
#include "kvplug/paged_memory/block_manager.h"

namespace kvplug::kv {

// Index 0 of the K/V axis holds keys, 1 values.
enum class Layout : int32_t {
  kKvFirst = 0,     // [2, num_blocks, block_size, num_kv_heads, head_size]  (vLLM)
  kBlockFirst = 1,  // [num_blocks, 2, block_size, num_kv_heads, head_size]  (FlashInfer)
};

struct KvCacheOptions {
  int32_t num_layers = 0;
  int32_t num_blocks = 0;
  int32_t block_size = 0;
  int32_t num_kv_heads = 0;
  int32_t head_size = 0;
  DType dtype = DType::kF32;
  Layout layout = Layout::kKvFirst;
  int32_t num_host_blocks = 0;
  int32_t num_state_slots = 0;
  int64_t state_bytes_per_layer = 0;
  Device device = Device::kCpu;  // where the pages and state live; host swap pages are pinned on CUDA
  int32_t device_id = 0;
  // fp8 caches: pages hold K / k_scale and V / v_scale, one scale per layer (empty: all 1.0).
  std::vector<float> k_scales;
  std::vector<float> v_scales;
};

absl::Status ValidateOptions(const KvCacheOptions& options);

// One layer's pages. Element strides for each axis; the head axis is contiguous (stride 1).
struct PagedLayer {
  void* data = nullptr;
  DType dtype = DType::kF32;
  int32_t num_blocks = 0;
  int32_t block_size = 0;
  int32_t num_kv_heads = 0;
  int32_t head_size = 0;
  int64_t stride_kv = 0;
  int64_t stride_block = 0;
  int64_t stride_pos = 0;
  int64_t stride_head = 0;

  // Start of the head_size elements of (K or V, block, position in block, KV head).
  void* Row(int kv, int64_t block, int64_t pos, int64_t head) const {
    const int64_t off = kv * stride_kv + block * stride_block + pos * stride_pos + head * stride_head;
    return static_cast<char*>(data) + off * static_cast<int64_t>(DTypeSize(dtype));
  }
  // The K and V pointers and strides, as the write path and the engines take them.
  PagedKvView View() const {
    return {Row(0, 0, 0, 0), Row(1, 0, 0, 0), static_cast<int32_t>(dtype), num_blocks, block_size,
            num_kv_heads, head_size, stride_block, stride_pos, stride_head};
  }
  // The 5-d shape and strides in the given layout.
  std::array<int64_t, 5> Shape(Layout layout) const;
  std::array<int64_t, 5> Strides(Layout layout) const;
};

// Densely packed strides of a layer in `layout`.
PagedLayer MakeContiguousLayer(void* data, const KvCacheOptions& options, int32_t num_blocks);

class KvCache {
 public:
  // Pages allocated (zero-filled) by kvplug.
  static absl::StatusOr<std::unique_ptr<KvCache>> Create(const KvCacheOptions& options);
  // Pages owned by the caller, one PagedLayer per layer, already checked against `options`.
  static absl::StatusOr<std::unique_ptr<KvCache>> CreateExternal(const KvCacheOptions& options,
                                                                 std::vector<PagedLayer> layers);
  ~KvCache();
  KvCache(const KvCache&) = delete;
  KvCache& operator=(const KvCache&) = delete;

  const KvCacheOptions& options() const { return options_; }
  Device device() const { return options_.device; }
  const PagedLayer& layer(int32_t l) const { return layers_[l]; }
  const PagedLayer& host_layer(int32_t l) const { return host_layers_[l]; }
  float k_scale(int32_t l) const { return options_.k_scales.empty() ? 1.0f : options_.k_scales[l]; }
  float v_scale(int32_t l) const { return options_.v_scales.empty() ? 1.0f : options_.v_scales[l]; }

  // key/value: 3-d [num_tokens, num_kv_heads, head_size] views (any float dtype, head contiguous)
  // on the cache's device; slots: block * block_size + offset, -1 skips, in host memory (every slot
  // is checked before any write). On CUDA, `device_slots` holds the same slots in device memory
  // and the write is launched on `stream`.
  absl::Status Write(int32_t layer, const TensorView& key, const TensorView& value,
                     absl::Span<const int64_t> slots, const int64_t* device_slots = nullptr,
                     void* stream = nullptr);

  // CUDA only: slots given in device memory alone (kvp_kv_cache_write with a device slot tensor).
  // They cannot be checked on the host without a synchronization: the kernel skips out-of-range
  // slots instead, so a bad slot never writes outside the pages.
  absl::Status WriteDeviceSlots(int32_t layer, const TensorView& key, const TensorView& value,
                                const int64_t* device_slots, int64_t num_tokens, void* stream);

  // Block copies within device pages, device -> host, host -> device; all layers. Every index is
  // checked before anything moves. On CUDA they are queued on `stream` (the caller synchronizes
  // before reading host pages).
  absl::Status CopyBlocks(absl::Span<const paged::BlockCopy> copies, void* stream = nullptr);
  absl::Status SwapOut(absl::Span<const paged::BlockCopy> copies, void* stream = nullptr);
  absl::Status SwapIn(absl::Span<const paged::BlockCopy> copies, void* stream = nullptr);

  // The bytes of a state slot, on the cache's device.
  absl::StatusOr<absl::Span<uint8_t>> State(int32_t layer, int32_t slot);
  absl::Status CopyState(int32_t src_slot, int32_t dst_slot, void* stream = nullptr);

 private:
  KvCache(const KvCacheOptions& options, std::vector<PagedLayer> layers);
  absl::Status CheckLayer(int32_t layer) const;
  absl::Status CheckCopies(absl::Span<const paged::BlockCopy> copies, int32_t num_src,
                           int32_t num_dst, const char* what) const;
  absl::Status CopyBlock(const PagedLayer& from, int32_t src, const PagedLayer& to, int32_t dst,
                         void* stream) const;
  absl::Status LaunchWrite(const PagedLayer& pages, const TensorView& key, const TensorView& value,
                           const int64_t* device_slots, int64_t num_tokens, void* stream) const;
  absl::Status Move(void* dst, const void* src, int64_t bytes, void* stream) const;

  using Buffer = std::unique_ptr<void, void (*)(void*)>;
  static absl::StatusOr<Buffer> Allocate(int64_t bytes, Device device, int32_t device_id, bool pinned);

  KvCacheOptions options_;
  std::vector<PagedLayer> layers_;
  std::vector<PagedLayer> host_layers_;
  std::vector<Buffer> owned_;           // owned device pages, host swap pages
  Buffer state_{nullptr, [](void*) {}};  // [num_layers][num_state_slots][bytes], on the device
};

}  // namespace kvplug::kv
