// DLTensors are checked field by field before anything reads them: a wrong tensor is an error
// message naming the field and its value, never a crash or a silent misread.
#include <cstring>
#include <limits>

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
