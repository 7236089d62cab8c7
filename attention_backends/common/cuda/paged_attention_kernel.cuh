// The CUDA engine's paged-attention kernel, templated on a variant (FlashAttention-2 structure on
// mma.sync tensor-core instructions, sm_80 and later, K/V pages read through the page list with
// cp.async). Included by one translation unit per (dtype, head size, variant) under instances/.
//
// One CTA computes one work item for one KV head: a tile of "rows" (row r is query token r / G and
// query head r % G, G = num_q_heads / num_kv_heads, so all query heads of a KV head share each K/V
// load: GQA packing, as FlashInfer does) over the item's key segments, pipelined across segment
// boundaries. Two tile shapes: prefill (4 warps split the rows) and decode (4 warps split the keys of
// a tile, then merge). Items that are one split of their rows' keys write partials that
// MergeSplitsKernel (merge.cu) combines with the family's merge rule.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "engine_params.h"

namespace kvplug::attn::cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -INFINITY;

template <typename T> struct Traits;
template <> struct Traits<__half> {
  using T2 = __half2;
  static __device__ __forceinline__ uint32_t Pack(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ void Mma(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
  static __device__ __forceinline__ void Store(__half* p, float v) { *p = __float2half_rn(v); }
  // Two e4m3 values to two halves: exact (every e4m3 value is a half).
  static __device__ __forceinline__ uint32_t FromFp8x2(uint16_t x) {
    __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(x), __NV_E4M3);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};
template <> struct Traits<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static __device__ __forceinline__ uint32_t Pack(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ void Mma(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
  static __device__ __forceinline__ void Store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
  // Two e4m3 values to two bfloat16: exact (3 mantissa bits, exponents within range).
  static __device__ __forceinline__ uint32_t FromFp8x2(uint16_t x) {
    __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(x), __NV_E4M3);
    const float2 f = __half22float2(*reinterpret_cast<__half2*>(&h));
    return Pack(f.x, f.y);
  }
};

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; src_bytes = 0 zero-fills (rows past the sequence must read as zeros, not
// garbage that 0 * NaN would turn into NaN).
__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(SmemAddr(smem)), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void LdMatrixX4(uint32_t* r, const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddr(smem)));
}
__device__ __forceinline__ void LdMatrixX4Trans(uint32_t* r, const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddr(smem)));
}

// Shared-memory tiles of D columns (16-byte chunks swizzled by row so that ldmatrix's 8 rows hit
// 8 different bank groups).
template <int D>
__device__ __forceinline__ int SwizzledOffset(int row, int chunk) {
  constexpr int kChunks = D / 8;
  return row * D + ((chunk ^ (row & 7)) & (kChunks - 1)) * 8;
}

template <typename T, int D, int BLOCK_M, int BLOCK_N, int WARPS_M, int WARPS_N, int STAGES = 2, bool FP8 = false>
struct Config {
  static constexpr int kStages = STAGES;
  static constexpr int kAtoms = BLOCK_M / (WARPS_M * 16);  // 16-row MMA atoms per warp
  static constexpr int kWarps = WARPS_M * WARPS_N;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kWarpCols = BLOCK_N / WARPS_N;  // keys per warp in a tile
  static constexpr int kNTiles = kWarpCols / 8;        // S n-tiles per warp
  static constexpr int kDTiles = D / 8;                // O n-tiles per warp
  static constexpr int kQSmem = BLOCK_M * D;
  static constexpr int kKvSmem = BLOCK_N * D;          // one of K or V, one stage
  // fp8 pages stream through byte-sized stages and are widened into one K/V buffer of T per tile.
  static constexpr int kStageBytes = FP8 ? 2 * STAGES * kKvSmem : 2 * STAGES * kKvSmem * (int)sizeof(T);
  static constexpr int kKvRegionBytes = kStageBytes + (FP8 ? 2 * kKvSmem * (int)sizeof(T) : 0);
  // The item's segment table lives after the tiles, inside the dynamic region: a static __shared__
  // array would shift the dynamic base off the 128-byte alignment the swizzle relies on (measured:
  // bank-conflicted cp.async writes replayed every K/V sector to L2 twice, -17% decode).
  static constexpr int kTableBytes = (kMaxSegmentsPerItem * (int)sizeof(KeySegment) + (3 * kMaxSegmentsPerItem + 1) * 4 + 15) / 16 * 16;
  static constexpr int kSmemBytes = kQSmem * sizeof(T) + kKvRegionBytes + kTableBytes;
  static_assert(BLOCK_M % (WARPS_M * 16) == 0, "each warp owns whole 16-row atoms");
  static_assert(WARPS_N == 1 || kAtoms == 1, "the split-key merge assumes one atom per warp");
  static_assert(kWarpCols % 16 == 0, "P -> A fragments need 16-key steps");
  // The cross-warp merge reuses the Q tile and the K/V stages: [WARPS_N][16 * WARPS_M][D] floats
  // plus stats.
  static_assert(WARPS_N == 1 || WARPS_N * BLOCK_M * (D + 3) * 4 <= kQSmem * (int)sizeof(T) + kKvRegionBytes,
                "merge buffer must fit in the Q tile and the K/V stages");
};

// PIPE (decode tiles, WARPS_M == 1):
//   0: the CTA loads each tile (K and V together) and waits on a CTA barrier.
//   1: each warp loads, widens and consumes only its own kWarpCols keys of every tile, so a tile
//      needs a warp barrier, not a CTA barrier: warps drift apart and one warp's late page does not
//      stall the other three.
//   2: as 1, with K and V in separate async groups (FlashInfer's order): K of tile i + STAGES is
//      requested as soon as S(i) is done, V's after P V(i); so with STAGES = 1 a warp needs one
//      K and one V tile of shared memory and more CTAs fit per SM.
// MIN_BLOCKS: CTAs per SM the register allocation must allow (__launch_bounds__).
template <typename T, int D, int BLOCK_M, int BLOCK_N, int WARPS_M, int WARPS_N, int STAGES, bool FP8, KernelVariant V,
          int PIPE = 0, int MIN_BLOCKS = 1>
__global__ void __launch_bounds__(WARPS_M * WARPS_N * 32, MIN_BLOCKS)
    PagedAttentionKernel(const PagedAttentionParams p) {
  constexpr bool WARP_PIPE = PIPE >= 1, KV_SPLIT = PIPE == 2;
  static_assert(!WARP_PIPE || WARPS_M == 1, "warp-private key tiles need every warp to own all rows");
  using Cfg = Config<T, D, BLOCK_M, BLOCK_N, WARPS_M, WARPS_N, STAGES, FP8>;
  using Tr = Traits<T>;
  constexpr bool kGeneral = V == KernelVariant::kGeneral;
  constexpr int A = Cfg::kAtoms;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* q_smem = reinterpret_cast<T*>(smem_raw);
  T* kv_smem = q_smem + Cfg::kQSmem;  // [stage][K|V][BLOCK_N * D] (bytes per element with FP8)
  uint8_t* fp8_stages = reinterpret_cast<uint8_t*>(kv_smem);
  T* widened = reinterpret_cast<T*>(fp8_stages + Cfg::kStageBytes);  // FP8: [K|V][BLOCK_N * D]
  // The item's segments, clipped to the keys its rows can see, and where each one's tiles start.
  KeySegment* seg_s = reinterpret_cast<KeySegment*>(smem_raw + Cfg::kQSmem * sizeof(T) + Cfg::kKvRegionBytes);
  int* seg_lo = reinterpret_cast<int*>(seg_s + kMaxSegmentsPerItem);
  int* seg_hi = seg_lo + kMaxSegmentsPerItem;
  int* seg_tile0 = seg_hi + kMaxSegmentsPerItem;

  // One linear grid over (item, KV head) in the launch's order: KV heads of one item adjacent; items
  // of one head adjacent; or rounds of round_size items (split k of every span) with the heads inside
  // a round, the order of a [span, head, split] grid.
  int item_index, kv_head;
  if (p.round_size > 0) {
    const int per_round = p.round_size * p.num_kv_heads;
    const int rem = blockIdx.x % per_round;
    kv_head = rem / p.round_size;
    item_index = (blockIdx.x / per_round) * p.round_size + rem % p.round_size;
  } else if (p.heads_fastest) {
    item_index = blockIdx.x / p.num_kv_heads;
    kv_head = blockIdx.x % p.num_kv_heads;
  } else {
    item_index = blockIdx.x % p.num_items;
    kv_head = blockIdx.x / p.num_items;
  }
  const WorkItem item = p.items[item_index];
  const int group = p.num_q_heads / p.num_kv_heads;
  const int num_rows = item.num_tokens * group;
  const int row0 = item.row0;
  const int last_row = min(row0 + BLOCK_M, num_rows) - 1;
  const int num_segs = item.seg_end - item.seg_begin;

  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  const int warp_m = warp % WARPS_M, warp_n = warp / WARPS_M;
  const int g = lane / 4, t = lane % 4;
  const int warp_row0 = warp_m * 16 * A;  // first row of this warp within the tile

  // Load the Q tile (rows past the span are zeros).
  for (int i = tid; i < BLOCK_M * (D / 8); i += Cfg::kThreads) {
    const int r = i / (D / 8), c = i % (D / 8);
    const int row = row0 + r;
    const bool valid = row < num_rows;
    const int token = item.token_begin + (valid ? row / group : 0);
    const int head = kv_head * group + (valid ? row % group : 0);
    const T* src = static_cast<const T*>(p.q) + token * p.q_stride_token + head * p.q_stride_head + c * 8;
    CpAsync16(q_smem + SwizzledOffset<D>(r, c), src, valid);
  }
  CpAsyncCommit();
  if (tid == 0) {
    const int tile_first_pos = item.pos_begin + row0 / group;
    const int tile_last_pos = item.pos_begin + last_row / group;
    int tiles = 0;
    for (int s = 0; s < num_segs; ++s) {
      const KeySegment sg = p.segments[item.seg_begin + s];
      long long lo = sg.key_begin, hi = sg.key_end;
      if (!kGeneral || sg.pos_map < 0) {
        // Contiguous positions: only keys with first_pos - lag_max <= pos <= last_pos - lag_min.
        hi = min(hi, static_cast<long long>(tile_last_pos) - sg.lag_min - sg.pos_base + 1);
        lo = max(lo, static_cast<long long>(tile_first_pos) - sg.lag_max - sg.pos_base);
      }
      if (hi < lo) hi = lo;
      seg_s[s] = sg;
      seg_lo[s] = static_cast<int>(lo);
      seg_hi[s] = static_cast<int>(hi);
      seg_tile0[s] = tiles;
      tiles += static_cast<int>((hi - lo + BLOCK_N - 1) / BLOCK_N);
    }
    seg_tile0[num_segs] = tiles;
  }

  __syncthreads();  // segment table visible
  const int num_tiles = seg_tile0[num_segs];

  // Walks the item's tiles across segment boundaries (empty segments have no tiles).
  struct Cursor {
    int seg, start;
  };
  auto first_tile = [&]() {
    Cursor c{0, 0};
    if (num_segs == 0) return c;
    while (c.seg + 1 < num_segs && seg_tile0[c.seg + 1] == 0) ++c.seg;
    c.start = seg_lo[c.seg];
    return c;
  };
  auto next_tile = [&](Cursor c) {
    c.start += BLOCK_N;
    if (c.start >= seg_hi[c.seg]) {
      do ++c.seg;
      while (c.seg + 1 < num_segs && seg_tile0[c.seg + 1] == seg_tile0[c.seg]);
      c.start = c.seg < num_segs ? seg_lo[c.seg] : 0;
    }
    return c;
  };

  auto load_kv = [&](int stage, Cursor at, bool do_k = true, bool do_v = true) {
    const int start = at.start;
    const int kv_end = seg_hi[at.seg];
    const int* pages = p.kv_indices + seg_s[at.seg].page_offset;
    // Elements of T per 16 bytes: 8, or 16 e4m3 bytes; fp8 stages are plain [row][D] bytes, T
    // stages swizzled.
    constexpr int kPerChunk = FP8 ? 16 : 8;
    constexpr int kChunks = D / kPerChunk;
    // WARP_PIPE: this warp's kWarpCols rows only; else the CTA's threads cover all rows.
    constexpr int kLoaders = WARP_PIPE ? 32 : Cfg::kThreads;
    constexpr int kRows = WARP_PIPE ? Cfg::kWarpCols : BLOCK_N;
    static_assert((kRows * kChunks) % kLoaders == 0, "loaders cover whole tiles");
    constexpr int kIters = kRows * kChunks / kLoaders;
    const int me = WARP_PIPE ? lane : tid, row_base = WARP_PIPE ? warp_n * Cfg::kWarpCols : 0;
    using Elem = std::conditional_t<FP8, uint8_t, T>;
    Elem* const k_dst = reinterpret_cast<Elem*>(FP8 ? static_cast<void*>(fp8_stages) : static_cast<void*>(kv_smem)) +
                        stage * 2 * Cfg::kKvSmem;
    Elem* const v_dst = k_dst + Cfg::kKvSmem;
    auto dst_offset = [&](int r, int c) { return FP8 ? r * D + c * 16 : SwizzledOffset<D>(r, c); };
    const Elem* const k_pages = static_cast<const Elem*>(p.pages.k);
    const Elem* const v_pages = static_cast<const Elem*>(p.pages.v);
    // The rows this thread group copies, when they are all valid and on one page (a warp's 16 keys
    // with pages of 16 or more): one page lookup and one 64-bit address, then constant row steps.
    const int first_pos = start + row_base, last_pos = first_pos + kRows - 1;
    const int first_page = p.block_shift >= 0 ? first_pos >> p.block_shift : first_pos / p.block_size;
    const int last_page = p.block_shift >= 0 ? last_pos >> p.block_shift : last_pos / p.block_size;
    if (last_pos < kv_end && first_page == last_page) {
      const int64_t base = static_cast<int64_t>(__ldg(pages + first_page)) * p.pages.stride_block +
                           (first_pos - first_page * p.block_size) * p.pages.stride_pos + kv_head * p.pages.stride_head;
#pragma unroll
      for (int k = 0; k < kIters; ++k) {
        const int i = me + k * kLoaders;
        const int r = i / kChunks, c = i % kChunks;
        const int64_t off = base + r * p.pages.stride_pos + c * kPerChunk;
        if (do_k) CpAsync16(k_dst + dst_offset(row_base + r, c), k_pages + off, true);
        if (do_v) CpAsync16(v_dst + dst_offset(row_base + r, c), v_pages + off, true);
      }
      return;
    }
    // Each row's own page lookup; rows past the segment read as zeros.
#pragma unroll
    for (int k = 0; k < kIters; ++k) {
      const int i = me + k * kLoaders;
      const int r = row_base + i / kChunks, c = i % kChunks;
      const int pos = start + r;
      const bool valid = pos < kv_end;
      // Power-of-two block sizes (all common ones) index by shift and mask, not division.
      const int page_index = p.block_shift >= 0 ? pos >> p.block_shift : pos / p.block_size;
      const int in_page = p.block_shift >= 0 ? pos & (p.block_size - 1) : pos - page_index * p.block_size;
      const int page = valid ? __ldg(pages + page_index) : 0;
      const int64_t off = valid ? static_cast<int64_t>(page) * p.pages.stride_block + in_page * p.pages.stride_pos +
                                      kv_head * p.pages.stride_head + c * kPerChunk
                                : 0;
      if (do_k) CpAsync16(k_dst + dst_offset(r, c), k_pages + off, valid);
      if (do_v) CpAsync16(v_dst + dst_offset(r, c), v_pages + off, valid);
    }
  };

  float o_acc[A][Cfg::kDTiles][4];
#pragma unroll
  for (int a = 0; a < A; ++a)
#pragma unroll
    for (int i = 0; i < Cfg::kDTiles; ++i) o_acc[a][i][0] = o_acc[a][i][1] = o_acc[a][i][2] = o_acc[a][i][3] = 0.f;
  // Rows g and g + 8 of each atom: max in log2 units, partial sum, partial sum of p * s (entropy).
  float row_max[A][2], row_sum[A][2], row_u[A][2];
  float row_scale[A][2];  // kGeneral: each row's logit scale, in log2 units
  int my_pos[A][2];
#pragma unroll
  for (int a = 0; a < A; ++a)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + warp_row0 + a * 16 + g + 8 * h;
      row_max[a][h] = kNegInf;
      row_sum[a][h] = 0.f;
      row_u[a][h] = 0.f;
      my_pos[a][h] = item.pos_begin + row / group;
      if constexpr (kGeneral) {
        float sc = p.variant.sm_scale * (FP8 ? p.k_scale : 1.f);
        if (p.variant.scale_table) {
          const int head = kv_head * group + row % group;
          sc *= p.variant.scale_table[static_cast<int64_t>(head) * p.variant.scale_table_len +
                                      min(my_pos[a][h], p.variant.scale_table_len - 1)];
        }
        row_scale[a][h] = sc * kLog2e;
      }
    }
  const float scale_log2 = p.variant.sm_scale * kLog2e * (FP8 ? p.k_scale : 1.f);
  const float cap = p.variant.logits_soft_cap;
  const int warp_first_pos = item.pos_begin + (row0 + warp_row0) / group;
  const int warp_last_pos = item.pos_begin + (min(row0 + warp_row0 + 16 * A, num_rows) - 1) / group;

  // Prologue: STAGES - 1 tiles in flight before the first is used (KV_SPLIT: STAGES tiles, K and V
  // of each in their own groups).
  Cursor compute_at = first_tile(), load_at = compute_at;
  if constexpr (KV_SPLIT) {
#pragma unroll
    for (int st = 0; st < STAGES; ++st) {
      if (st < num_tiles) load_kv(st, load_at, true, false);
      CpAsyncCommit();
      if (st < num_tiles) {
        load_kv(st, load_at, false, true);
        load_at = next_tile(load_at);
      }
      CpAsyncCommit();
    }
  } else {
#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) {
      if (st < num_tiles) {
        load_kv(st, load_at);
        load_at = next_tile(load_at);
      }
      CpAsyncCommit();
    }
  }
  // fp8: widens this warp's (WARP_PIPE) or the CTA's rows of one stage's K (kv 0) or V (kv 1), or
  // both (kv -1), into the swizzled T layout the MMA path reads.
  auto widen = [&](int stage, int which) {
    const uint8_t* src = fp8_stages + stage * 2 * Cfg::kKvSmem;
    constexpr int kRows = WARP_PIPE ? Cfg::kWarpCols : BLOCK_N;
    constexpr int kWideners = WARP_PIPE ? 32 : Cfg::kThreads;
    const int me = WARP_PIPE ? lane : tid, row_base = WARP_PIPE ? warp_n * Cfg::kWarpCols : 0;
    const int first = which == 1 ? kRows * (D / 16) : 0, last = which == 0 ? kRows * (D / 16) : 2 * kRows * (D / 16);
    for (int i = first + me; i < last; i += kWideners) {
      const int kv = i / (kRows * (D / 16)), rem = i % (kRows * (D / 16));
      const int r = row_base + rem / (D / 16), c16 = rem % (D / 16);
      const uint4 bytes = *reinterpret_cast<const uint4*>(src + kv * Cfg::kKvSmem + r * D + c16 * 16);
      const uint16_t* pairs = reinterpret_cast<const uint16_t*>(&bytes);
      uint4 lo, hi;
      lo.x = Tr::FromFp8x2(pairs[0]); lo.y = Tr::FromFp8x2(pairs[1]);
      lo.z = Tr::FromFp8x2(pairs[2]); lo.w = Tr::FromFp8x2(pairs[3]);
      hi.x = Tr::FromFp8x2(pairs[4]); hi.y = Tr::FromFp8x2(pairs[5]);
      hi.z = Tr::FromFp8x2(pairs[6]); hi.w = Tr::FromFp8x2(pairs[7]);
      T* dst = widened + kv * Cfg::kKvSmem;
      *reinterpret_cast<uint4*>(dst + SwizzledOffset<D>(r, 2 * c16)) = lo;
      *reinterpret_cast<uint4*>(dst + SwizzledOffset<D>(r, 2 * c16 + 1)) = hi;
    }
  };

  for (int it = 0; it < num_tiles; ++it) {
    const int stage = it % STAGES;
    const int seg = compute_at.seg, start = compute_at.start;
    compute_at = next_tile(compute_at);
    const int ahead = KV_SPLIT ? it + STAGES : it + STAGES - 1;
    if constexpr (KV_SPLIT) {
      // Pending after K(it): V(it), then K and V of the STAGES - 1 tiles after it.
      CpAsyncWait<2 * STAGES - 1>();
    } else {
      if (ahead < num_tiles) {
        load_kv(ahead % STAGES, load_at);
        load_at = next_tile(load_at);
      }
      CpAsyncCommit();
      CpAsyncWait<STAGES - 1>();  // Q and this tile have landed; later ones may still fly
    }
    // Q is loaded by the whole CTA: the first tile needs a CTA barrier, later warp-private tiles a
    // warp barrier.
    if (WARP_PIPE && it > 0) {
      __syncwarp();
    } else {
      __syncthreads();
    }
    const T* k_s = kv_smem + stage * 2 * Cfg::kKvSmem;
    const T* v_s = k_s + Cfg::kKvSmem;
    if constexpr (FP8) {
      widen(stage, KV_SPLIT ? 0 : -1);
      if constexpr (WARP_PIPE) {
        __syncwarp();
      } else {
        __syncthreads();
      }
      k_s = widened;
      v_s = widened + Cfg::kKvSmem;
    }

    // S = Q K^T for this warp's rows x kWarpCols keys; each K fragment feeds every atom.
    float s[A][Cfg::kNTiles][4];
#pragma unroll
    for (int a = 0; a < A; ++a)
#pragma unroll
      for (int j = 0; j < Cfg::kNTiles; ++j) s[a][j][0] = s[a][j][1] = s[a][j][2] = s[a][j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t qa[A][4];
#pragma unroll
      for (int a = 0; a < A; ++a)
        LdMatrixX4(qa[a], q_smem + SwizzledOffset<D>(warp_row0 + a * 16 + (lane % 16), kk * 2 + lane / 16));
#pragma unroll
      for (int j = 0; j < Cfg::kNTiles; j += 2) {
        // Two n-tiles (16 keys) x one 16-wide k-step: matrices (keys 0-7, d 0-7), (0-7, 8-15),
        // (8-15, 0-7), (8-15, 8-15).
        uint32_t b[4];
        const int key = warp_n * Cfg::kWarpCols + j * 8 + (lane / 16) * 8 + (lane % 8);
        LdMatrixX4(b, k_s + SwizzledOffset<D>(key, kk * 2 + (lane / 8) % 2));
#pragma unroll
        for (int a = 0; a < A; ++a) {
          Tr::Mma(s[a][j], qa[a], b);
          Tr::Mma(s[a][j + 1], qa[a], b + 2);
        }
      }
    }

    if constexpr (KV_SPLIT) {
      // This warp has read its K rows of the stage: request K of the tile STAGES ahead.
      __syncwarp();
      if (ahead < num_tiles) load_kv(ahead % STAGES, load_at, true, false);
      CpAsyncCommit();
    }

    // Mask and online softmax (log2 domain). Masks are only needed on tiles that touch a segment's
    // end or a row's lag bounds.
    const int seg_end = seg_hi[seg];
    const int pos_base = seg_s[seg].pos_base, lag_min = seg_s[seg].lag_min, lag_max = seg_s[seg].lag_max;
    const int pos_map = kGeneral ? seg_s[seg].pos_map - seg_s[seg].key_begin : 0;
    const bool mapped = kGeneral && seg_s[seg].pos_map >= 0;
    const bool edge = start + BLOCK_N > seg_end || mapped ||
                      warp_first_pos - (pos_base + start + BLOCK_N - 1) < lag_min ||
                      static_cast<long long>(warp_last_pos) - (pos_base + start) > lag_max;
    // Scale (and soft-cap) the tile's logits, then mask it, each a whole-tile pass under one uniform
    // branch: a branch per element splits the unrolled loop into a basic block per element.
    if constexpr (kGeneral) {
#pragma unroll
      for (int a = 0; a < A; ++a)
#pragma unroll
        for (int j = 0; j < Cfg::kNTiles; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[a][j][e] *= row_scale[a][e / 2];
      if (cap > 0.f) {
        const float cap_log2 = cap * kLog2e, inv_cap_log2 = 1.f / cap_log2;
#pragma unroll
        for (int a = 0; a < A; ++a)
#pragma unroll
          for (int j = 0; j < Cfg::kNTiles; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[a][j][e] = cap_log2 * tanhf(s[a][j][e] * inv_cap_log2);
      }
    } else {
#pragma unroll
      for (int a = 0; a < A; ++a)
#pragma unroll
        for (int j = 0; j < Cfg::kNTiles; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[a][j][e] *= scale_log2;
    }
    if (edge) {
#pragma unroll
      for (int a = 0; a < A; ++a)
#pragma unroll
        for (int j = 0; j < Cfg::kNTiles; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = start + warp_n * Cfg::kWarpCols + j * 8 + 2 * t + (e % 2);
            bool ok = key < seg_end;
            int key_pos = pos_base + key;
            if (mapped) key_pos = ok ? __ldg(p.pos_map + pos_map + key) : 0;
            const int lag = my_pos[a][e / 2] - key_pos;
            ok = ok && lag >= lag_min && lag <= lag_max;
            s[a][j][e] = ok ? s[a][j][e] : kNegInf;
          }
    }
#pragma unroll
    for (int a = 0; a < A; ++a) {
      float tile_max[2] = {kNegInf, kNegInf};
#pragma unroll
      for (int j = 0; j < Cfg::kNTiles; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) tile_max[e / 2] = fmaxf(tile_max[e / 2], s[a][j][e]);
      float correction[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffff, tile_max[h], 1));
        tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffff, tile_max[h], 2));
        const float new_max = fmaxf(row_max[a][h], tile_max[h]);
        // A row that has seen only masked keys keeps max -inf: use 0 so exp2 gives 0, not NaN.
        const float safe_max = new_max == kNegInf ? 0.f : new_max;
        correction[h] = exp2f(row_max[a][h] - safe_max);
        row_max[a][h] = new_max;
        row_sum[a][h] *= correction[h];
        if constexpr (kGeneral) row_u[a][h] *= correction[h];
#pragma unroll
        for (int j = 0; j < Cfg::kNTiles; ++j)
#pragma unroll
          for (int e = 2 * h; e < 2 * h + 2; ++e) {
            const float logit = s[a][j][e];
            const float w = exp2f(logit - safe_max);
            if constexpr (kGeneral) row_u[a][h] += w > 0.f ? w * logit : 0.f;  // masked: 0, not 0 * -inf
            s[a][j][e] = w;
            row_sum[a][h] += w;
          }
      }
      // Once the running maxima settle, most tiles leave every correction at exactly 1: skip the
      // O rescale then (warp-uniform; multiplying by 1 would change nothing).
      if (__any_sync(0xffffffff, correction[0] != 1.f || correction[1] != 1.f)) {
#pragma unroll
        for (int i = 0; i < Cfg::kDTiles; ++i) {
          o_acc[a][i][0] *= correction[0];
          o_acc[a][i][1] *= correction[0];
          o_acc[a][i][2] *= correction[1];
          o_acc[a][i][3] *= correction[1];
        }
      }
    }

    if constexpr (KV_SPLIT) {
      // Pending after V(it): K and V of the STAGES - 1 tiles after it, and K(it + STAGES).
      CpAsyncWait<2 * STAGES - 1>();
      __syncwarp();
      if constexpr (FP8) {
        widen(stage, 1);
        __syncwarp();
      }
    }

    // O += P V: P from the S accumulators (FA2's register reuse), V through ldmatrix.trans; each V
    // fragment feeds every atom.
#pragma unroll
    for (int kk = 0; kk < Cfg::kWarpCols / 16; ++kk) {
      uint32_t pa[A][4];
#pragma unroll
      for (int a = 0; a < A; ++a) {
        pa[a][0] = Tr::Pack(s[a][2 * kk][0], s[a][2 * kk][1]);
        pa[a][1] = Tr::Pack(s[a][2 * kk][2], s[a][2 * kk][3]);
        pa[a][2] = Tr::Pack(s[a][2 * kk + 1][0], s[a][2 * kk + 1][1]);
        pa[a][3] = Tr::Pack(s[a][2 * kk + 1][2], s[a][2 * kk + 1][3]);
      }
#pragma unroll
      for (int i = 0; i < Cfg::kDTiles; i += 2) {
        // Matrices (keys 0-7, d 0-7), (keys 8-15, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 8-15),
        // transposed: b[0..1] feed d-tile i, b[2..3] d-tile i + 1.
        uint32_t b[4];
        const int key = warp_n * Cfg::kWarpCols + kk * 16 + ((lane / 8) % 2) * 8 + (lane % 8);
        LdMatrixX4Trans(b, v_s + SwizzledOffset<D>(key, i + lane / 16));
#pragma unroll
        for (int a = 0; a < A; ++a) {
          Tr::Mma(o_acc[a][i], pa[a], b);
          Tr::Mma(o_acc[a][i + 1], pa[a], b + 2);
        }
      }
    }
    // This stage is refilled by a later iteration's load (WARP_PIPE: by this warp only).
    if constexpr (WARP_PIPE) {
      __syncwarp();
    } else {
      __syncthreads();
    }
    if constexpr (KV_SPLIT) {
      if (ahead < num_tiles) {
        load_kv(ahead % STAGES, load_at, false, true);
        load_at = next_tile(load_at);
      }
      CpAsyncCommit();
    }
  }
  CpAsyncWait<0>();

  // Full row sums across the 4 threads that share a row.
#pragma unroll
  for (int a = 0; a < A; ++a)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row_sum[a][h] += __shfl_xor_sync(0xffffffff, row_sum[a][h], 1);
      row_sum[a][h] += __shfl_xor_sync(0xffffffff, row_sum[a][h], 2);
      if constexpr (kGeneral) {
        row_u[a][h] += __shfl_xor_sync(0xffffffff, row_u[a][h], 1);
        row_u[a][h] += __shfl_xor_sync(0xffffffff, row_u[a][h], 2);
      }
    }

  if constexpr (WARPS_N > 1) {
    // Merge the WARPS_N partial results of each row through shared memory (Q and the K/V stages are
    // free).
    __syncthreads();
    float* merge_o = reinterpret_cast<float*>(smem_raw);  // [WARPS_N][BLOCK_M][D]
    float* merge_m = merge_o + WARPS_N * BLOCK_M * D;    // [WARPS_N][BLOCK_M]
    float* merge_l = merge_m + WARPS_N * BLOCK_M;
    float* merge_u = merge_l + WARPS_N * BLOCK_M;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = warp_row0 + g + 8 * h;
      if (t == 0) {
        merge_m[warp_n * BLOCK_M + r] = row_max[0][h];
        merge_l[warp_n * BLOCK_M + r] = row_sum[0][h];
        if constexpr (kGeneral) merge_u[warp_n * BLOCK_M + r] = row_u[0][h];
      }
#pragma unroll
      for (int i = 0; i < Cfg::kDTiles; ++i)
        *reinterpret_cast<float2*>(merge_o + (warp_n * BLOCK_M + r) * D + i * 8 + 2 * t) =
            make_float2(o_acc[0][i][2 * h], o_acc[0][i][2 * h + 1]);
    }
    __syncthreads();
    if (warp_n != 0) return;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = warp_row0 + g + 8 * h;
      float m = kNegInf;
#pragma unroll
      for (int w = 0; w < WARPS_N; ++w) m = fmaxf(m, merge_m[w * BLOCK_M + r]);
      const float safe = m == kNegInf ? 0.f : m;
      float l = 0.f, u = 0.f, f[WARPS_N];
#pragma unroll
      for (int w = 0; w < WARPS_N; ++w) {
        f[w] = exp2f(merge_m[w * BLOCK_M + r] - safe);
        l += f[w] * merge_l[w * BLOCK_M + r];
        if constexpr (kGeneral) u += f[w] * merge_u[w * BLOCK_M + r];
      }
      row_max[0][h] = m;
      row_sum[0][h] = l;
      row_u[0][h] = u;
#pragma unroll
      for (int i = 0; i < Cfg::kDTiles; ++i)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float acc = 0.f;
#pragma unroll
          for (int w = 0; w < WARPS_N; ++w) acc += f[w] * merge_o[(w * BLOCK_M + r) * D + i * 8 + 2 * t + e];
          o_acc[0][i][2 * h + e] = acc;
        }
    }
  }

  // Write: final (no split) or this split's normalized partial, its LSE and mean logit.
#pragma unroll
  for (int a = 0; a < A; ++a)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + warp_row0 + a * 16 + g + 8 * h;
      if (row >= num_rows) continue;
      const int token = item.token_begin + row / group;
      const int head = kv_head * group + row % group;
      const float sum = row_sum[a][h];
      const float inv = sum > 0.f ? (FP8 ? p.v_scale : 1.f) / sum : 0.f;
      const float lse = sum > 0.f ? row_max[a][h] * kLn2 + logf(sum) : kNegInf;
      const float mean = sum > 0.f ? row_u[a][h] / sum * kLn2 : 0.f;  // sum_j a_j s_j, natural units
      if (item.partial < 0) {
        T* out = static_cast<T*>(p.o) + token * p.o_stride_token + head * p.o_stride_head;
#pragma unroll
        for (int i = 0; i < Cfg::kDTiles; ++i)
          *reinterpret_cast<uint32_t*>(out + i * 8 + 2 * t) =
              Tr::Pack(o_acc[a][i][2 * h] * inv, o_acc[a][i][2 * h + 1] * inv);
        if (t == 0) {
          if (p.lse) p.lse[token * p.lse_stride_token + head * p.lse_stride_head] = lse;
          if constexpr (kGeneral)
            if (p.entropy)
              p.entropy[token * p.entropy_stride_token + head * p.entropy_stride_head] =
                  sum > 0.f ? fmaxf(0.f, lse - mean) : 0.f;
        }
      } else {
        const int64_t prow = static_cast<int64_t>(item.partial + row / group) * p.num_q_heads + head;
        float* out = p.partial_o + prow * D;
#pragma unroll
        for (int i = 0; i < Cfg::kDTiles; ++i)
          *reinterpret_cast<float2*>(out + i * 8 + 2 * t) =
              make_float2(o_acc[a][i][2 * h] * inv, o_acc[a][i][2 * h + 1] * inv);
        if (t == 0) {
          p.partial_lse[prow] = lse;
          if (p.partial_mean) p.partial_mean[prow] = mean;
        }
      }
    }
}

template <typename T, int D, int BLOCK_M, int BLOCK_N, int WARPS_M, int WARPS_N, int STAGES, bool FP8, KernelVariant V,
          int PIPE = 0, int MIN_BLOCKS = 1>
cudaError_t LaunchKernel(const PagedAttentionParams& p, cudaStream_t stream) {
  using Cfg = Config<T, D, BLOCK_M, BLOCK_N, WARPS_M, WARPS_N, STAGES, FP8>;
  auto kernel = PagedAttentionKernel<T, D, BLOCK_M, BLOCK_N, WARPS_M, WARPS_N, STAGES, FP8, V, PIPE, MIN_BLOCKS>;
  const int smem = Cfg::kSmemBytes;
  // The segment table is static shared memory on top of this: opt in whenever the sum can pass 48 KiB.
  if (smem > 40 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
  }
  kernel<<<static_cast<unsigned>(p.num_items) * p.num_kv_heads, Cfg::kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D, int BLOCK_M, int BLOCK_N, int WARPS_M, int WARPS_N, int STAGES, KernelVariant V>
cudaError_t LaunchFp8OrNot(const PagedAttentionParams& p, cudaStream_t stream) {
  if (p.kv_fp8) return LaunchKernel<T, D, BLOCK_M, BLOCK_N, WARPS_M, WARPS_N, STAGES, true, V>(p, stream);
  return LaunchKernel<T, D, BLOCK_M, BLOCK_N, WARPS_M, WARPS_N, STAGES, false, V>(p, stream);
}

// The tile shapes of one (dtype, head size, variant); instances/ instantiate this once each.
template <typename T, int D, KernelVariant V>
cudaError_t LaunchShape(const PagedAttentionParams& p, bool decode, cudaStream_t stream) {
  static_assert(D == 256 ? PrefillTileRows(D) == 64 : PrefillTileRows(D) == 128, "planner and kernel agree");
  // Few rows per KV head (decode, short chunks): one 16-row tile, 4 warps split the keys. Three
  // stages of 64 keys: more bytes in flight per CTA (measured on H100: +2% on average over two
  // stages, +8% at 1 x 128k; 32-key tiles with four stages were slower).
  if (decode) {
#ifndef KVP_CUDA_DECODE_AB
    // Only the default pipelines are built (CMake KVP_CUDA_DECODE_AB=ON adds the others).
    if (p.decode_kernel != 3) return cudaErrorNotSupported;
    if (p.kv_fp8) return LaunchKernel<T, D, 16, 64, 1, 4, 1, true, V, 2, 4>(p, stream);
    return LaunchKernel<T, D, 16, 64, 1, 4, 3, false, V, 1>(p, stream);
#else
    switch (p.decode_kernel) {
      case 0:
        return LaunchFp8OrNot<T, D, 16, 64, 1, 4, 3, V>(p, stream);
      case 1:
        // Warp-private tiles; fp8 stages hold half the bytes, so one more stage keeps as many bytes
        // in flight as bf16's three.
        if (p.kv_fp8) return LaunchKernel<T, D, 16, 64, 1, 4, 4, true, V, 1>(p, stream);
        return LaunchKernel<T, D, 16, 64, 1, 4, 3, false, V, 1>(p, stream);
      case 2:
        // K and V in separate groups over one stage: a third of the shared memory, 4 CTAs per SM.
        if (p.kv_fp8) return LaunchKernel<T, D, 16, 64, 1, 4, 1, true, V, 2, 4>(p, stream);
        return LaunchKernel<T, D, 16, 64, 1, 4, 1, false, V, 2, 4>(p, stream);
      default:
        // The measured best of each (H200, bench/RESULTS.md): bf16 / f16 pages on warp-private
        // three-stage tiles, fp8 pages on the split K/V groups (their widening pass hides better
        // behind twice the CTAs per SM: 1.02-1.18x the three-stage fp8 kernel's tokens/s).
        if (p.kv_fp8) return LaunchKernel<T, D, 16, 64, 1, 4, 1, true, V, 2, 4>(p, stream);
        return LaunchKernel<T, D, 16, 64, 1, 4, 3, false, V, 1>(p, stream);
    }
#endif
  }
  // Prefill: 4 warps of 32 rows (two MMA atoms share each K/V fragment, halving shared-memory
  // traffic per FLOP); d256 keeps one atom per warp to stay within the register file.
  if constexpr (D == 256) {
    return LaunchFp8OrNot<T, D, 64, 32, 4, 1, 2, V>(p, stream);
  } else {
    return LaunchFp8OrNot<T, D, 128, 64, 4, 1, 2, V>(p, stream);
  }
}

}  // namespace kvplug::attn::cuda
