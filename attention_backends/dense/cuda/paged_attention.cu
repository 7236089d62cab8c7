// Dense paged attention on NVIDIA GPUs (sm_80 and later): FlashAttention-2 structure on mma.sync
// tensor-core instructions, reading K/V pages through the block table with cp.async.
//
// One CTA computes a tile of "rows" for one KV head: row r is (query token r / G, query head
// r % G) with G = num_q_heads / num_kv_heads, so all query heads of a KV head share each K/V load
// (GQA packing, as FlashInfer does). K/V tiles stream through shared memory in two stages. Two
// tile shapes: prefill (4 warps split the rows) and decode (4 warps split the keys of a tile, then
// merge), both with optional split-KV across CTAs merged by a second kernel (flash-decoding).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "paged_attention.h"

namespace kvplug::attn::cuda {
namespace {

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
  static constexpr int kSmemBytes = kQSmem * sizeof(T) + kKvRegionBytes;
  static_assert(BLOCK_M % (WARPS_M * 16) == 0, "each warp owns whole 16-row atoms");
  static_assert(WARPS_N == 1 || kAtoms == 1, "the split-key merge assumes one atom per warp");
  static_assert(kWarpCols % 16 == 0, "P -> A fragments need 16-key steps");
  // The cross-warp merge reuses the K/V stages: [WARPS_N][16 * WARPS_M][D] floats plus stats.
  static_assert(WARPS_N == 1 || WARPS_N * BLOCK_M * (D + 2) * 4 <= kKvRegionBytes,
                "merge buffer must fit in the K/V stages");
};

template <typename T, int D, int BLOCK_M, int BLOCK_N, int WARPS_M, int WARPS_N, int STAGES, bool FP8>
__global__ void __launch_bounds__(WARPS_M * WARPS_N * 32)
    PagedAttentionKernel(const PagedAttentionParams p) {
  using Cfg = Config<T, D, BLOCK_M, BLOCK_N, WARPS_M, WARPS_N, STAGES, FP8>;
  using Tr = Traits<T>;
  constexpr int A = Cfg::kAtoms;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* q_smem = reinterpret_cast<T*>(smem_raw);
  T* kv_smem = q_smem + Cfg::kQSmem;  // [stage][K|V][BLOCK_N * D] (bytes per element with FP8)
  uint8_t* fp8_stages = reinterpret_cast<uint8_t*>(kv_smem);
  T* widened = reinterpret_cast<T*>(fp8_stages + Cfg::kStageBytes);  // FP8: [K|V][BLOCK_N * D]

  const int group = p.num_q_heads / p.num_kv_heads;
  const int tiles_per_seq = (p.max_q_len * group + BLOCK_M - 1) / BLOCK_M;
  const int seq = blockIdx.x / tiles_per_seq;
  // Causal work grows with the tile index: launch the heavy (late) tiles first.
  const int tile = tiles_per_seq - 1 - static_cast<int>(blockIdx.x % tiles_per_seq);
  const int kv_head = blockIdx.y;
  const int split = blockIdx.z;
  if (seq >= p.num_seqs) return;
  const int q_begin = p.qo_indptr[seq];
  const int q_len = p.qo_indptr[seq + 1] - q_begin;
  const int num_rows = q_len * group;
  const int row0 = tile * BLOCK_M;
  if (row0 >= num_rows) return;
  const int kv_len = p.kv_lens[seq];
  const int* pages = p.kv_indices + p.kv_indptr[seq];

  // This CTA's keys: its split of [0, kv_len), cut at the causal edge of its last row and the
  // window of its first.
  const int chunk = ((kv_len + p.num_splits - 1) / p.num_splits + BLOCK_N - 1) / BLOCK_N * BLOCK_N;
  int kv_begin = split * chunk;
  const int last_row = min(row0 + BLOCK_M, num_rows) - 1;
  const int last_pos = kv_len - q_len + last_row / group;
  const int kv_end = min(min(kv_begin + chunk, kv_len), last_pos + 1);
  if (p.window_left >= 0) {
    const int first_pos = kv_len - q_len + row0 / group;
    kv_begin = max(kv_begin, (max(0, first_pos - p.window_left) / BLOCK_N) * BLOCK_N);
  }

  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  const int warp_m = warp % WARPS_M, warp_n = warp / WARPS_M;
  const int g = lane / 4, t = lane % 4;
  const int warp_row0 = warp_m * 16 * A;  // first row of this warp within the tile

  // Load the Q tile (rows past the sequence are zeros).
  for (int i = tid; i < BLOCK_M * (D / 8); i += Cfg::kThreads) {
    const int r = i / (D / 8), c = i % (D / 8);
    const int row = row0 + r;
    const bool valid = row < num_rows;
    const int token = q_begin + (valid ? row / group : 0);
    const int head = kv_head * group + (valid ? row % group : 0);
    const T* src = static_cast<const T*>(p.q) + token * p.q_stride_token + head * p.q_stride_head + c * 8;
    CpAsync16(q_smem + SwizzledOffset<D>(r, c), src, valid);
  }
  CpAsyncCommit();

  auto load_kv = [&](int stage, int start) {
    if constexpr (FP8) {
      uint8_t* k_dst = fp8_stages + stage * 2 * Cfg::kKvSmem;
      uint8_t* v_dst = k_dst + Cfg::kKvSmem;
      constexpr int kChunks = D / 16;  // 16 e4m3 values per 16 bytes
      constexpr int kRowsPerPass = Cfg::kThreads / kChunks;
      const int c = tid % kChunks;
      for (int r = tid / kChunks; r < BLOCK_N; r += kRowsPerPass) {
        const int pos = start + r;
        const bool valid = pos < kv_end;
        const int page_index = p.block_shift >= 0 ? pos >> p.block_shift : pos / p.block_size;
        const int in_page = p.block_shift >= 0 ? pos & (p.block_size - 1) : pos - page_index * p.block_size;
        const int page = valid ? __ldg(pages + page_index) : 0;
        const int64_t off = valid ? static_cast<int64_t>(page) * p.kv_stride_block + in_page * p.kv_stride_pos +
                                        kv_head * p.kv_stride_head + c * 16
                                  : 0;
        CpAsync16(k_dst + r * D + c * 16, static_cast<const uint8_t*>(p.k_pages) + off, valid);
        CpAsync16(v_dst + r * D + c * 16, static_cast<const uint8_t*>(p.v_pages) + off, valid);
      }
      return;
    }
    T* k_dst = kv_smem + stage * 2 * Cfg::kKvSmem;
    T* v_dst = k_dst + Cfg::kKvSmem;
    // Each thread keeps one 16-byte column chunk and walks rows: one page lookup per row.
    constexpr int kChunks = D / 8;
    static_assert(Cfg::kThreads % kChunks == 0, "threads cover whole rows");
    const int c = tid % kChunks;
    for (int r = tid / kChunks; r < BLOCK_N; r += Cfg::kThreads / kChunks) {
      const int pos = start + r;
      const bool valid = pos < kv_end;
      // Power-of-two block sizes (all common ones) index by shift and mask, not division.
      const int page_index = p.block_shift >= 0 ? pos >> p.block_shift : pos / p.block_size;
      const int in_page = p.block_shift >= 0 ? pos & (p.block_size - 1) : pos - page_index * p.block_size;
      const int page = valid ? __ldg(pages + page_index) : 0;
      const int64_t off = static_cast<int64_t>(page) * p.kv_stride_block + (valid ? in_page : 0) * p.kv_stride_pos +
                          kv_head * p.kv_stride_head + c * 8;
      const T* k_src = static_cast<const T*>(p.k_pages) + (valid ? off : 0);
      const T* v_src = static_cast<const T*>(p.v_pages) + (valid ? off : 0);
      CpAsync16(k_dst + SwizzledOffset<D>(r, c), k_src, valid);
      CpAsync16(v_dst + SwizzledOffset<D>(r, c), v_src, valid);
    }
  };

  float o_acc[A][Cfg::kDTiles][4];
#pragma unroll
  for (int a = 0; a < A; ++a)
#pragma unroll
    for (int i = 0; i < Cfg::kDTiles; ++i) o_acc[a][i][0] = o_acc[a][i][1] = o_acc[a][i][2] = o_acc[a][i][3] = 0.f;
  float row_max[A][2], row_sum[A][2];  // rows g and g + 8 of each atom; max in log2 units, sum partial
  int my_pos[A][2];
#pragma unroll
  for (int a = 0; a < A; ++a)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row_max[a][h] = kNegInf;
      row_sum[a][h] = 0.f;
      my_pos[a][h] = kv_len - q_len + (row0 + warp_row0 + a * 16 + g + 8 * h) / group;
    }
  const float scale_log2 = p.sm_scale * kLog2e * (FP8 ? p.k_scale : 1.f);

  const int num_tiles = kv_end > kv_begin ? (kv_end - kv_begin + BLOCK_N - 1) / BLOCK_N : 0;
  // Prologue: STAGES - 1 tiles in flight before the first is used.
#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (st < num_tiles) load_kv(st, kv_begin + st * BLOCK_N);
    CpAsyncCommit();
  }

  for (int it = 0; it < num_tiles; ++it) {
    const int stage = it % STAGES;
    const int start = kv_begin + it * BLOCK_N;
    const int ahead = it + STAGES - 1;
    if (ahead < num_tiles) load_kv(ahead % STAGES, kv_begin + ahead * BLOCK_N);
    CpAsyncCommit();
    CpAsyncWait<STAGES - 1>();  // Q and this tile have landed; later ones may still fly
    __syncthreads();
    const T* k_s = kv_smem + stage * 2 * Cfg::kKvSmem;
    const T* v_s = k_s + Cfg::kKvSmem;
    if constexpr (FP8) {
      // Widen this tile's e4m3 bytes into the swizzled T layout the MMA path reads.
      const uint8_t* src = fp8_stages + stage * 2 * Cfg::kKvSmem;
      for (int i = tid; i < 2 * BLOCK_N * (D / 16); i += Cfg::kThreads) {
        const int kv = i / (BLOCK_N * (D / 16)), rem = i % (BLOCK_N * (D / 16));
        const int r = rem / (D / 16), c16 = rem % (D / 16);
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
      __syncthreads();
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

    // Mask and online softmax (log2 domain). Masks are only needed on tiles that touch an edge.
    const bool edge = start + BLOCK_N > kv_end || p.window_left >= 0 ||
                      start + BLOCK_N - 1 > kv_len - q_len + (row0 + warp_row0) / group;
#pragma unroll
    for (int a = 0; a < A; ++a) {
      float tile_max[2] = {kNegInf, kNegInf};
#pragma unroll
      for (int j = 0; j < Cfg::kNTiles; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int h = e / 2;
          float v = s[a][j][e] * scale_log2;
          if (edge) {
            const int key = start + warp_n * Cfg::kWarpCols + j * 8 + 2 * t + (e % 2);
            bool ok = key < kv_end && key <= my_pos[a][h];
            if (p.window_left >= 0) ok = ok && key >= my_pos[a][h] - p.window_left;
            v = ok ? v : kNegInf;
          }
          s[a][j][e] = v;
          tile_max[h] = fmaxf(tile_max[h], v);
        }
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
#pragma unroll
        for (int j = 0; j < Cfg::kNTiles; ++j) {
          s[a][j][2 * h] = exp2f(s[a][j][2 * h] - safe_max);
          s[a][j][2 * h + 1] = exp2f(s[a][j][2 * h + 1] - safe_max);
          row_sum[a][h] += s[a][j][2 * h] + s[a][j][2 * h + 1];
        }
      }
#pragma unroll
      for (int i = 0; i < Cfg::kDTiles; ++i) {
        o_acc[a][i][0] *= correction[0];
        o_acc[a][i][1] *= correction[0];
        o_acc[a][i][2] *= correction[1];
        o_acc[a][i][3] *= correction[1];
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
    __syncthreads();  // this stage is refilled by a later iteration's load
  }
  CpAsyncWait<0>();

  // Full row sums across the 4 threads that share a row.
#pragma unroll
  for (int a = 0; a < A; ++a)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row_sum[a][h] += __shfl_xor_sync(0xffffffff, row_sum[a][h], 1);
      row_sum[a][h] += __shfl_xor_sync(0xffffffff, row_sum[a][h], 2);
    }

  if constexpr (WARPS_N > 1) {
    // Merge the WARPS_N partial results of each row through shared memory (the K/V stages are free).
    __syncthreads();
    float* merge_o = reinterpret_cast<float*>(kv_smem);  // [WARPS_N][BLOCK_M][D]
    float* merge_m = merge_o + WARPS_N * BLOCK_M * D;    // [WARPS_N][BLOCK_M]
    float* merge_l = merge_m + WARPS_N * BLOCK_M;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = warp_row0 + g + 8 * h;
      if (t == 0) {
        merge_m[warp_n * BLOCK_M + r] = row_max[0][h];
        merge_l[warp_n * BLOCK_M + r] = row_sum[0][h];
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
      float l = 0.f, f[WARPS_N];
#pragma unroll
      for (int w = 0; w < WARPS_N; ++w) {
        f[w] = exp2f(merge_m[w * BLOCK_M + r] - safe);
        l += f[w] * merge_l[w * BLOCK_M + r];
      }
      row_max[0][h] = m;
      row_sum[0][h] = l;
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

  // Write: final (num_splits == 1) or this split's normalized partial and its LSE.
#pragma unroll
  for (int a = 0; a < A; ++a)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + warp_row0 + a * 16 + g + 8 * h;
      if (row >= num_rows) continue;
      const int token = q_begin + row / group;
      const int head = kv_head * group + row % group;
      const float sum = row_sum[a][h];
      const float inv = sum > 0.f ? (FP8 ? p.v_scale : 1.f) / sum : 0.f;
      const float lse = sum > 0.f ? row_max[a][h] * kLn2 + logf(sum) : kNegInf;
      if (p.num_splits == 1) {
        T* out = static_cast<T*>(p.o) + token * p.o_stride_token + head * p.o_stride_head;
#pragma unroll
        for (int i = 0; i < Cfg::kDTiles; ++i)
          *reinterpret_cast<uint32_t*>(out + i * 8 + 2 * t) =
              Tr::Pack(o_acc[a][i][2 * h] * inv, o_acc[a][i][2 * h + 1] * inv);
        if (p.lse && t == 0) p.lse[token * p.lse_stride_token + head] = lse;
      } else {
        const int64_t prow = (static_cast<int64_t>(split) * p.num_tokens + token) * p.num_q_heads + head;
        float* out = p.partial_o + prow * D;
#pragma unroll
        for (int i = 0; i < Cfg::kDTiles; ++i)
          *reinterpret_cast<float2*>(out + i * 8 + 2 * t) =
              make_float2(o_acc[a][i][2 * h] * inv, o_acc[a][i][2 * h + 1] * inv);
        if (t == 0) p.partial_lse[prow] = lse;
      }
    }
}

// Combines the splits of each (token, head): out = sum_s exp(lse_s - lse) * o_s, lse = logsumexp.
// The split weights are computed once into shared memory; then each thread walks the splits for
// its columns with independent loads in flight (a long sequence can have 256 splits).
constexpr int kMaxSplits = 256;

template <typename T, int D>
__global__ void __launch_bounds__(128) MergeSplitsKernel(const PagedAttentionParams p) {
  __shared__ float weight[kMaxSplits];
  __shared__ float reduce[2][4];
  const int token = blockIdx.x, head = blockIdx.y, tid = threadIdx.x;
  const int n = p.num_splits;
  auto lse_of = [&](int s) { return p.partial_lse[(static_cast<int64_t>(s) * p.num_tokens + token) * p.num_q_heads + head]; };
  float m = kNegInf;
  for (int s = tid; s < n; s += blockDim.x) m = fmaxf(m, lse_of(s));
  for (int o = 16; o > 0; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, o));
  if (tid % 32 == 0) reduce[0][tid / 32] = m;
  __syncthreads();
  m = fmaxf(fmaxf(reduce[0][0], reduce[0][1]), fmaxf(reduce[0][2], reduce[0][3]));
  const float safe = m == kNegInf ? 0.f : m;
  float sum = 0.f;
  for (int s = tid; s < n; s += blockDim.x) {
    const float w = __expf(lse_of(s) - safe);
    weight[s] = w;
    sum += w;
  }
  for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffff, sum, o);
  if (tid % 32 == 0) reduce[1][tid / 32] = sum;
  __syncthreads();
  sum = reduce[1][0] + reduce[1][1] + reduce[1][2] + reduce[1][3];
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  const int64_t split_stride = static_cast<int64_t>(p.num_tokens) * p.num_q_heads * D;
  const float* base = p.partial_o + (static_cast<int64_t>(token) * p.num_q_heads + head) * D;
  T* out = static_cast<T*>(p.o) + token * p.o_stride_token + head * p.o_stride_head;
  for (int d = tid; d < D; d += blockDim.x) {
    float acc = 0.f;
#pragma unroll 8
    for (int s = 0; s < n; ++s) acc += weight[s] * base[s * split_stride + d];
    Traits<T>::Store(out + d, acc * inv);
  }
  if (p.lse && tid == 0) p.lse[token * p.lse_stride_token + head] = safe + logf(sum);
}

template <typename T, int D, int BLOCK_M, int BLOCK_N, int WARPS_M, int WARPS_N, int STAGES, bool FP8>
cudaError_t LaunchKernel(const PagedAttentionParams& p, cudaStream_t stream);

template <typename T, int D, int BLOCK_M, int BLOCK_N, int WARPS_M, int WARPS_N, int STAGES = 2>
cudaError_t Launch(const PagedAttentionParams& p, cudaStream_t stream) {
  if (p.kv_fp8) return LaunchKernel<T, D, BLOCK_M, BLOCK_N, WARPS_M, WARPS_N, STAGES, true>(p, stream);
  return LaunchKernel<T, D, BLOCK_M, BLOCK_N, WARPS_M, WARPS_N, STAGES, false>(p, stream);
}

template <typename T, int D, int BLOCK_M, int BLOCK_N, int WARPS_M, int WARPS_N, int STAGES, bool FP8>
cudaError_t LaunchKernel(const PagedAttentionParams& p, cudaStream_t stream) {
  using Cfg = Config<T, D, BLOCK_M, BLOCK_N, WARPS_M, WARPS_N, STAGES, FP8>;
  auto kernel = PagedAttentionKernel<T, D, BLOCK_M, BLOCK_N, WARPS_M, WARPS_N, STAGES, FP8>;
  const int smem = Cfg::kSmemBytes;
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
  }
  const int group = p.num_q_heads / p.num_kv_heads;
  const int tiles = (p.max_q_len * group + BLOCK_M - 1) / BLOCK_M;
  dim3 grid(static_cast<unsigned>(p.num_seqs) * tiles, p.num_kv_heads, p.num_splits);
  kernel<<<grid, Cfg::kThreads, smem, stream>>>(p);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess || p.num_splits == 1) return e;
  MergeSplitsKernel<T, D><<<dim3(p.num_tokens, p.num_q_heads), 128, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t DispatchShape(const PagedAttentionParams& p, cudaStream_t stream) {
  const int group = p.num_q_heads / p.num_kv_heads;
  // Few rows per KV head (decode, short chunks): one 16-row tile, 4 warps split the keys.
  if (p.max_q_len * group <= 16) {
    // Three stages of 64 keys: more bytes in flight per CTA (measured on H100: +2% on average over
    // two stages, +8% at 1 x 128k; 32-key tiles with four stages were slower).
    return Launch<T, D, 16, 64, 1, 4, 3>(p, stream);
  }
  // Prefill: 4 warps of 32 rows (two MMA atoms share each K/V fragment, halving shared-memory
  // traffic per FLOP); d256 keeps one atom per warp to stay within the register file.
  if constexpr (D == 256) {
    return Launch<T, D, 64, 32, 4, 1>(p, stream);
  } else {
    return Launch<T, D, 128, 64, 4, 1>(p, stream);
  }
}

template <typename T>
cudaError_t DispatchHead(const PagedAttentionParams& p, cudaStream_t stream) {
  switch (p.head_size) {
    case 64: return DispatchShape<T, 64>(p, stream);
    case 128: return DispatchShape<T, 128>(p, stream);
    case 256: return DispatchShape<T, 256>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

int LaunchPagedAttention(const PagedAttentionParams& p, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (p.dtype == ElemType::kBF16) return DispatchHead<__nv_bfloat16>(p, s);
  return DispatchHead<__half>(p, s);
}

int32_t ChooseNumSplits(const PagedAttentionParams& p, int32_t num_sms, int64_t workspace_rows) {
  const int group = p.num_q_heads / p.num_kv_heads;
  if (p.max_q_len * group > 16) return 1;  // prefill tiles already fill the GPU
  const int64_t ctas = static_cast<int64_t>(p.num_seqs) * p.num_kv_heads;
  // About 4 CTAs per SM in all (two full waves at the 2 CTAs per SM that shared memory allows):
  // measured on H100 against 2, 8 and 16 per SM, it reads the most bytes per second on 3 of the 4
  // decode shapes (more splits add per-CTA start-up and merge work; fewer leave SMs idle). Each
  // split keeps at least 512 keys so the partials stay cheap to merge.
  int64_t splits = (4LL * std::max(num_sms, 1) + ctas - 1) / ctas;
  splits = std::min<int64_t>(splits, std::max(1, p.max_kv_len / 512));
  splits = std::min<int64_t>(splits, kMaxSplits);
  if (p.num_tokens > 0) splits = std::min<int64_t>(splits, workspace_rows / p.num_tokens);
  return static_cast<int32_t>(std::max<int64_t>(splits, 1));
}

int32_t DeviceSmCount(int32_t device) {
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 1;
  return n;
}

}  // namespace kvplug::attn::cuda
