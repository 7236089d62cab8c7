// DLTensors are checked field by field before anything reads them: a wrong tensor is an error
// message naming the field and its value, never a crash or a silent misread.
#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "fmt/format.h"
#include "fmt/ranges.h"
#include "internal.h"

namespace kvplug::abi {
namespace {

// The caller's device type as the integer it is: C callers may store any value in the enum field, and
// loading one that is not an enumerator through the C++ enum type is undefined behaviour.
int32_t DeviceType(const DLDevice& d) {
  static_assert(sizeof(d.device_type) == sizeof(int32_t));
  int32_t v;
  std::memcpy(&v, &d.device_type, sizeof v);
  return v;
}

bool DeviceMatches(const DLDevice& d, const kvp_context* context) {
  const Device want = context ? context->exec.device : Device::kCpu;
  const int32_t type = DeviceType(d);
  if (want == Device::kCpu) return type == kDLCPU || type == kDLCUDAHost;
  return type == kDLCUDA && d.device_id == (context ? context->exec.device_id : 0);
}

std::string DescribeDtype(const DLDataType& t) {
  return fmt::format("(code={}, bits={}, lanes={})", static_cast<int>(t.code), static_cast<int>(t.bits),
                     static_cast<int>(t.lanes));
}

}  // namespace

kvp_status ToTensorView(const DLTensor* t, const char* name, const kvp_context* context,
                        int32_t expected_ndim, TensorView* out) {
  if (!t) return Fail(KVP_ERR_INVALID_ARGUMENT, fmt::format("{} is NULL", name));
  if (!DeviceMatches(t->device, context))
    return Fail(KVP_ERR_INVALID_ARGUMENT,
                fmt::format("{}: device (type={}, id={}) is not the context's device (type={}, id={})", name,
                            DeviceType(t->device), t->device.device_id,
                            context ? static_cast<int>(context->exec.device) : 1,
                            context ? context->exec.device_id : 0));
  DType dtype;
  if (t->dtype.lanes != 1)
    return Fail(KVP_ERR_INVALID_ARGUMENT, fmt::format("{}: dtype {} has lanes != 1", name, DescribeDtype(t->dtype)));
  if (t->dtype.code == kDLFloat && t->dtype.bits == 32) dtype = DType::kF32;
  else if (t->dtype.code == kDLFloat && t->dtype.bits == 16) dtype = DType::kF16;
  else if (t->dtype.code == kDLBfloat && t->dtype.bits == 16) dtype = DType::kBF16;
  else
    return Fail(KVP_ERR_INVALID_ARGUMENT,
                fmt::format("{}: dtype {} is not float32, float16 or bfloat16", name, DescribeDtype(t->dtype)));
  if (t->ndim != expected_ndim)
    return Fail(KVP_ERR_INVALID_ARGUMENT, fmt::format("{}: ndim={}, expected {}", name, t->ndim, expected_ndim));
  if (!t->shape) return Fail(KVP_ERR_INVALID_ARGUMENT, fmt::format("{}: shape is NULL", name));
  TensorView v;
  v.dtype = dtype;
  v.device = context ? context->exec.device : Device::kCpu;
  v.device_id = t->device.device_id;
  v.ndim = expected_ndim;
  bool empty = false;
  for (int i = 0; i < expected_ndim; ++i) {
    if (t->shape[i] < 0 || t->shape[i] > (int64_t{1} << 40))
      return Fail(KVP_ERR_INVALID_ARGUMENT, fmt::format("{}: shape[{}]={} out of range", name, i, t->shape[i]));
    v.shape[i] = t->shape[i];
    empty |= t->shape[i] == 0;
  }
  // The element count must fit in int64 (a running product <= 2^63 times a shape <= 2^40 fits in
  // __int128); a wrapped-around count would skip the checks below.
  if (!empty) {
    __int128 numel = 1;
    for (int i = 0; i < expected_ndim; ++i) {
      numel *= v.shape[i];
      if (numel > std::numeric_limits<int64_t>::max())
        return Fail(KVP_ERR_INVALID_ARGUMENT, fmt::format("{}: shape [{}] holds more than 2^63 elements", name,
                                                          fmt::join(v.shape.begin(), v.shape.begin() + expected_ndim, ", ")));
    }
  }
  // NULL strides mean compact row-major (DLPack). The product saturates: past int64 only for an
  // empty tensor, whose strides are never used.
  int64_t compact = 1;
  for (int i = expected_ndim - 1; i >= 0; --i) {
    v.strides[i] = t->strides ? t->strides[i] : compact;
    compact = (v.shape[i] != 0 && compact > std::numeric_limits<int64_t>::max() / v.shape[i])
                  ? std::numeric_limits<int64_t>::max()
                  : compact * v.shape[i];
    if (v.strides[i] < 0)
      return Fail(KVP_ERR_INVALID_ARGUMENT, fmt::format("{}: strides[{}]={} is negative", name, i, v.strides[i]));
  }
  if (!empty) {
    // The furthest element must be addressable without overflow.
    __int128 extent = 0;
    for (int i = 0; i < expected_ndim; ++i) extent += static_cast<__int128>(v.shape[i] - 1) * v.strides[i];
    if (extent * static_cast<__int128>(DTypeSize(dtype)) > std::numeric_limits<int64_t>::max() / 2)
      return Fail(KVP_ERR_INVALID_ARGUMENT, fmt::format("{}: shape [{}] and strides [{}] overflow", name,
                                                        fmt::join(v.shape.begin(), v.shape.begin() + expected_ndim, ", "),
                                                        fmt::join(v.strides.begin(), v.strides.begin() + expected_ndim, ", ")));
    if (!t->data) return Fail(KVP_ERR_INVALID_ARGUMENT, fmt::format("{}: data is NULL", name));
  }
  const auto address = reinterpret_cast<uintptr_t>(t->data) + t->byte_offset;
  if (address % DTypeSize(dtype) != 0)
    return Fail(KVP_ERR_INVALID_ARGUMENT, fmt::format("{}: data + byte_offset = {:#x} is not aligned to {} bytes",
                                                      name, address, DTypeSize(dtype)));
  v.data = reinterpret_cast<void*>(address);
  *out = v;
  return KVP_OK;
}

namespace {
// [first byte, one past the last byte] a view can touch.
std::pair<uintptr_t, uintptr_t> ByteExtent(const TensorView& v) {
  int64_t last = 0;
  for (int i = 0; i < v.ndim; ++i) last += (v.shape[i] - 1) * v.strides[i];
  const auto begin = reinterpret_cast<uintptr_t>(v.data);
  return {begin, begin + static_cast<uintptr_t>((last + 1) * static_cast<int64_t>(DTypeSize(v.dtype)))};
}
}  // namespace

namespace {
// True when two elements of v may share an address: with the axes of extent > 1 sorted by stride,
// each stride must step past everything the smaller axes span (the classic non-overlap test for
// strided layouts; it is exact for every layout a framework produces, and never accepts an overlap).
bool MayOverlapItself(const TensorView& v) {
  if (v.numel() == 0) return false;
  std::array<std::pair<int64_t, int64_t>, TensorView::kMaxDims> axes{};
  int n = 0;
  for (int i = 0; i < v.ndim; ++i)
    if (v.shape[i] > 1) axes[n++] = {v.strides[i], v.shape[i]};
  for (int i = 1; i < n; ++i)  // insertion sort of at most 6 axes
    for (int j = i; j > 0 && axes[j].first < axes[j - 1].first; --j) std::swap(axes[j], axes[j - 1]);
  __int128 span = 1;  // elements covered by the smaller axes
  for (int i = 0; i < n; ++i) {
    if (axes[i].first < span) return true;
    span += static_cast<__int128>(axes[i].first) * (axes[i].second - 1);
  }
  return false;
}

std::string Join(const std::array<int64_t, TensorView::kMaxDims>& a, int n) {
  return fmt::format("{}", fmt::join(a.begin(), a.begin() + n, ", "));
}
}  // namespace

kvp_status CheckWritable(const TensorView& v, const char* name) {
  if (MayOverlapItself(v))
    return Fail(KVP_ERR_INVALID_ARGUMENT,
                fmt::format("{}: strides [{}] with shape [{}] map two elements to one address (a writable "
                            "tensor must not overlap itself)",
                            name, Join(v.strides, v.ndim), Join(v.shape, v.ndim)));
  return KVP_OK;
}

kvp_status CheckCacheLayer(const TensorView& v, int kv_axis, const char* name) {
  // K alone (the kv axis dropped; V has the same strides) first, so that the message says which.
  TensorView k = v;
  k.shape[kv_axis] = 1;
  if (MayOverlapItself(k))
    return Fail(KVP_ERR_INVALID_ARGUMENT,
                fmt::format("{}: strides [{}] with shape [{}] map two elements of the K (and V) view to one "
                            "address (blocks, positions or heads overlap; a cache layer is written and must "
                            "not overlap itself)",
                            name, Join(v.strides, v.ndim), Join(v.shape, v.ndim)));
  if (MayOverlapItself(v))
    return Fail(KVP_ERR_INVALID_ARGUMENT,
                fmt::format("{}: strides [{}] with shape [{}]: the K and V views overlap each other (kv stride "
                            "{}; a cache's K and V must not share memory)",
                            name, Join(v.strides, v.ndim), Join(v.shape, v.ndim), v.strides[kv_axis]));
  return KVP_OK;
}

kvp_status CheckCacheLayersDisjoint(const std::vector<TensorView>& layers) {
  // Layers sorted by their first byte; only layers whose byte extents intersect are compared
  // element-exactly (interleaved layers of one allocation, as [num_blocks, num_layers, 2, ...]).
  std::vector<std::pair<std::pair<uintptr_t, uintptr_t>, size_t>> order;
  for (size_t i = 0; i < layers.size(); ++i)
    if (layers[i].numel() > 0) order.push_back({ByteExtent(layers[i]), i});
  std::sort(order.begin(), order.end());
  int64_t budget = int64_t{1} << 24;  // pairs compared: bounds the time for absurd layer counts
  for (size_t x = 0; x < order.size(); ++x)
    for (size_t y = x + 1; y < order.size() && order[y].first.first < order[x].first.second; ++y) {
      const TensorView& a = layers[order[x].second];
      const TensorView& b = layers[order[y].second];
      const size_t ia = order[x].second, ib = order[y].second;
      if (--budget < 0)
        return Fail(KVP_ERR_INVALID_ARGUMENT,
                    fmt::format("layer_tensors: more than 2^24 pairs of interleaved layers to check for overlap"));
      const uintptr_t delta = order[y].first.first - order[x].first.first;
      const auto elem = static_cast<uintptr_t>(DTypeSize(a.dtype));
      bool disjoint = false;
      if (delta > 0 && delta % elem == 0 && a.ndim == b.ndim && a.shape == b.shape && a.strides == b.strides &&
          a.ndim < TensorView::kMaxDims) {
        // The pair as one tensor with a layer axis of extent 2 and stride delta: disjoint if that
        // tensor does not overlap itself.
        TensorView pair = a;
        pair.shape[a.ndim] = 2;
        pair.strides[a.ndim] = static_cast<int64_t>(delta / elem);
        pair.ndim = a.ndim + 1;
        disjoint = !MayOverlapItself(pair);
      }
      if (!disjoint)
        return Fail(KVP_ERR_INVALID_ARGUMENT,
                    fmt::format("layer_tensors[{}] (data {:#x}, strides [{}]) and layer_tensors[{}] (data {:#x}, "
                                "strides [{}]) share memory: the layers of a cache must not overlap each other",
                                ia, reinterpret_cast<uintptr_t>(a.data), Join(a.strides, a.ndim), ib,
                                reinterpret_cast<uintptr_t>(b.data), Join(b.strides, b.ndim)));
    }
  return KVP_OK;
}

kvp_status CheckDisjoint(const TensorView& a, const char* a_name, const TensorView& b, const char* b_name) {
  if (a.numel() == 0 || b.numel() == 0) return KVP_OK;
  const auto [a0, a1] = ByteExtent(a);
  const auto [b0, b1] = ByteExtent(b);
  if (a0 < b1 && b0 < a1)
    return Fail(KVP_ERR_INVALID_ARGUMENT,
                fmt::format("{} (bytes [{:#x}, {:#x})) overlaps {} (bytes [{:#x}, {:#x})): a writable tensor must "
                            "not share memory with another argument", a_name, a0, a1, b_name, b0, b1));
  return KVP_OK;
}

kvp_status CheckSlotMapping(const DLTensor* t, int64_t num_tokens, const kvp_context* context,
                            const int64_t** out) {
  if (!t) return Fail(KVP_ERR_INVALID_ARGUMENT, "slot_mapping is NULL");
  if (!DeviceMatches(t->device, context))
    return Fail(KVP_ERR_INVALID_ARGUMENT, fmt::format("slot_mapping: device type {} is not the context's",
                                                      DeviceType(t->device)));
  if (t->dtype.code != kDLInt || t->dtype.bits != 64 || t->dtype.lanes != 1)
    return Fail(KVP_ERR_INVALID_ARGUMENT,
                fmt::format("slot_mapping: dtype {} must be int64", DescribeDtype(t->dtype)));
  if (t->ndim != 1 || !t->shape || t->shape[0] != num_tokens)
    return Fail(KVP_ERR_INVALID_ARGUMENT,
                fmt::format("slot_mapping: expected shape [{}], got ndim={} shape[0]={}", num_tokens, t->ndim,
                            (t->ndim >= 1 && t->shape) ? t->shape[0] : -1));
  if (t->strides && num_tokens > 1 && t->strides[0] != 1)
    return Fail(KVP_ERR_INVALID_ARGUMENT, fmt::format("slot_mapping: stride {} must be 1", t->strides[0]));
  const auto address = reinterpret_cast<uintptr_t>(t->data) + t->byte_offset;
  if (num_tokens > 0 && !t->data) return Fail(KVP_ERR_INVALID_ARGUMENT, "slot_mapping: data is NULL");
  if (address % 8 != 0)
    return Fail(KVP_ERR_INVALID_ARGUMENT, fmt::format("slot_mapping: address {:#x} is not 8-byte aligned", address));
  *out = reinterpret_cast<const int64_t*>(address);
  return KVP_OK;
}

}  // namespace kvplug::abi
