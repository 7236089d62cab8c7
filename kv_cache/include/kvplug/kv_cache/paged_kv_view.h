// Where one layer's K and V pages are and how they are strided: the one description the cache's
// write path and every attention engine share (plain C++17, no CUDA types, so .cu files include it).
#pragma once

#include <cstdint>

namespace kvplug::kv {

// Element (block, position in block, KV head, d) of K is at k + block * stride_block +
// pos * stride_pos + head * stride_head + d (in elements of `dtype`, a kvplug::DType value); V alike.
struct PagedKvView {
  void* k = nullptr;
  void* v = nullptr;
  int32_t dtype = 0;
  int32_t num_blocks = 0;
  int32_t block_size = 0;
  int32_t num_kv_heads = 0;
  int32_t head_size = 0;
  int64_t stride_block = 0;
  int64_t stride_pos = 0;
  int64_t stride_head = 0;
};

}  // namespace kvplug::kv
