// A compact row-major TensorView over memory a test owns (the engines' view of a tensor).
#pragma once

#include <cstdint>
#include <initializer_list>

#include "kvplug/kv_cache/tensor_view.h"

namespace kvplug::testing {

inline TensorView View(void* data, DType dtype, std::initializer_list<int64_t> shape, Device device = Device::kCpu) {
  TensorView v;
  v.data = data;
  v.dtype = dtype;
  v.device = device;
  v.ndim = static_cast<int32_t>(shape.size());
  int i = 0;
  for (int64_t s : shape) v.shape[i++] = s;
  int64_t stride = 1;
  for (int j = v.ndim - 1; j >= 0; --j) {
    v.strides[j] = stride;
    stride *= v.shape[j];
  }
  return v;
}

}  // namespace kvplug::testing
