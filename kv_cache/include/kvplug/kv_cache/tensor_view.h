// A non-owning strided view of a tensor, the plain C++ form a DLTensor is translated to at the ABI.
// Strides are in elements, as in DLPack.
#pragma once

#include <array>
#include <cstdint>

#include "kvplug/kv_cache/dtype.h"

namespace kvplug {

struct TensorView {
  static constexpr int kMaxDims = 6;
  void* data = nullptr;
  DType dtype = DType::kF32;
  Device device = Device::kCpu;
  int32_t device_id = 0;
  int32_t ndim = 0;
  std::array<int64_t, kMaxDims> shape{};
  std::array<int64_t, kMaxDims> strides{};

  // An empty view is 0 however large its other extents (the ABI bounds the product of non-empty
  // shapes only), so a zero extent is looked for before anything is multiplied.
  int64_t numel() const {
    for (int i = 0; i < ndim; ++i)
      if (shape[i] == 0) return 0;
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
  // Address of element (i0, i1, i2) of a 3-d view (or (i0, i1) of a 2-d one with i2 = 0).
  void* At(int64_t i0, int64_t i1, int64_t i2 = 0) const {
    const int64_t off = i0 * strides[0] + i1 * strides[1] + (ndim > 2 ? i2 * strides[2] : 0);
    return static_cast<char*>(data) + off * static_cast<int64_t>(DTypeSize(dtype));
  }
};

}  // namespace kvplug
