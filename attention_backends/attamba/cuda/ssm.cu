// Attamba's chunk-local Mamba-2 (SSD) block on CUDA: exactly ssm_cpu.cc's computation (causal
// depthwise conv + SiLU over xBC with the conv state, the selective scan restarting at every chunk
// start with dt = softplus(dt + dt_bias), A = -exp(A_log), B/C per group and the D skip, then
// y * silu(z) and the grouped RMSNorm), fp32 throughout. Three launches on the caller's stream:
//  1. scan: CTAs per (sequence, SSM head, z), the step's tokens cut into chunk-local segments that
//     run in parallel (the state resets at every chunk start); each thread owns head-dim rows of the
//     scan state (in shared memory, or in the state slot when too large), B and C of each token are
//     convolved once per CTA into shared memory. Reads the OLD conv state only.
//  2. conv state: per sequence, the raw xBC rows of its last conv_width - 1 positions (after 1 on
//     the stream, so no CTA of 1 reads a row this overwrites).
//  3. gate + grouped RMSNorm: one CTA per (token, group).
// A sequence touches only its own state slot (the host refused duplicate slots), so forks, whose
// slots were copied, never interfere. Within a chunk the scan is sequential over its tokens.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../src/ssm_cuda.h"

namespace kvplug::attn::attamba::cuda {
namespace {

__device__ __forceinline__ float Silu(float x) { return x / (1.0f + expf(-x)); }
__device__ __forceinline__ float Softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

// ChunkGeometry::ChunkStart (attamba.h) on the device.
__device__ __forceinline__ int64_t ChunkStart(int64_t p, int32_t P, int32_t off) {
  if (p <= 0) return 0;
  const int64_t last_end = p - 1 - (p + off) % P;
  return (last_end > 0 ? last_end : 0) + 1;
}

__device__ __forceinline__ float* StateOf(const SsmParams& s, int32_t b) {
  return reinterpret_cast<float*>(s.state_base + int64_t{s.state_slots[b]} * s.state_slot_bytes) + s.state_offset;
}

// conv + SiLU of xBC channel c for token t at position p (inputs before p0 from the conv state).
__device__ float Conv(const SsmParams& s, const float* conv_state, int64_t t, int64_t p, int64_t p0, int64_t start,
                      int32_t c, int32_t Di, int32_t Dc) {
  const int32_t W = s.conv_width;
  float acc = s.conv_bias ? s.conv_bias[c] : 0.0f;
  for (int32_t i = 0; i < W; ++i) {
    const int64_t pp = p - (W - 1) + i;
    if (pp < start) continue;  // before the chunk: zero
    const float x = pp >= p0 ? s.in[(t - (p - pp)) * s.in_stride + Di + c] : conv_state[(pp - p0 + W - 1) * Dc + c];
    acc += s.conv_weight[int64_t{c} * W + i] * x;
  }
  return Silu(acc);
}

// The first chunk end at a position >= x (ChunkGeometry::NextEnd).
__device__ __forceinline__ int64_t NextEnd(int64_t x, int32_t P, int32_t off) {
  if (x <= 0) return 0;
  return x + (P - (x + 1 + off) % P) % P;
}

// The step's positions [p0, n) of a sequence cut at chunk ends into segments: segment 0 is
// [p0, b0 + 1) with b0 = NextEnd(p0), segment k >= 1 is [b_{k-1} + 1, b_k + 1) (clipped to n), where
// b1 = NextEnd(b0 + 1) and b_k = b1 + (k - 1) P (chunk ends past position 0 are P apart). Every
// segment but the first starts at a chunk start (its state starts empty); the first continues the
// state slot's state unless p0 is a chunk start.
struct Segments {
  int64_t p0, n, b0, b1;
  int32_t P;
  __device__ Segments(int64_t p0_, int64_t n_, int32_t P_, int32_t off) : p0(p0_), n(n_), P(P_) {
    b0 = NextEnd(p0, P, off);
    b1 = NextEnd(b0 + 1, P, off);
  }
  __device__ int64_t count() const {
    if (b0 + 1 >= n) return 1;
    return 2 + (b1 + 1 < n ? (n - 1 - b1 + P - 1) / P : 0);
  }
  __device__ int64_t lo(int64_t k) const { return k == 0 ? p0 : (k == 1 ? b0 : b1 + (k - 2) * P) + 1; }
  __device__ int64_t hi(int64_t k) const { return k == 0 ? (b0 + 1 < n ? b0 + 1 : n) : (b1 + (k - 1) * P + 1 < n ? b1 + (k - 1) * P + 1 : n); }
};

// One CTA per (sequence, SSM head, z): CTA z scans segments z, z + Z, ... below the last, and CTA 0
// also the last one, after its others: so the CTA that reads the slot's state (segment 0) is the one
// that writes the final state (the last segment), in that order, and segments run in parallel (the
// state resets at every chunk start, so chunks are independent). With `shared_state` each thread's
// rows of the scan state live in shared memory (row stride N + 1: no bank conflicts), loaded from the
// slot for a continuing first segment and stored to it after the last; without it (a state too large
// for shared memory) Z = 1 and the rows are the slot's, in global memory, as in a sequential scan.
__global__ void ScanKernel(SsmParams s, bool shared_state) {
  const int32_t b = blockIdx.x, h = blockIdx.y;
  const int32_t q0 = s.query_start_loc[b], q1 = s.query_start_loc[b + 1];
  if (q1 == q0) return;
  extern __shared__ float smem[];
  float* bc = smem;  // [2][N]: B, C of the current token
  const int32_t P = s.head_dim, N = s.state, G = s.groups, W = s.conv_width;
  const int32_t Di = s.heads * P, Dc = Di + 2 * G * N;
  const int32_t g = h / (s.heads / G);
  const float* conv_state = StateOf(s, b);
  float* slot = StateOf(s, b) + int64_t{W - 1} * Dc + int64_t{h} * P * N;  // [P][N]
  float* hs = shared_state ? smem + 2 * N : slot;
  const int32_t row_stride = shared_state ? N + 1 : N;
  const float A = -expf(s.a_log[h]);
  const float Dh = s.d_skip ? s.d_skip[h] : 0.0f;
  const int64_t p0 = s.query_pos_starts[b], n = p0 + (q1 - q0);
  const Segments segs(p0, n, s.chunk_size, s.chunk_offset);
  const int64_t num = segs.count();
  auto scan = [&](int64_t k) {
    const int64_t lo = segs.lo(k), hi = segs.hi(k);
    if (shared_state && lo == p0 && ChunkStart(p0, s.chunk_size, s.chunk_offset) < p0)
      for (int32_t i = threadIdx.x; i < P; i += blockDim.x)  // each thread's own rows: no barrier
        for (int32_t j = 0; j < N; ++j) hs[int64_t{i} * row_stride + j] = slot[int64_t{i} * N + j];
    for (int64_t t = q0 + (lo - p0); t < q0 + (hi - p0); ++t) {
      const int64_t p = p0 + (t - q0), start = ChunkStart(p, s.chunk_size, s.chunk_offset);
      for (int32_t j = threadIdx.x; j < 2 * N; j += blockDim.x) {
        const int32_t c = j < N ? Di + g * N + j : Di + G * N + g * N + (j - N);
        bc[j] = Conv(s, conv_state, t, p, p0, start, c, Di, Dc);
      }
      __syncthreads();
      const float dt = Softplus(s.in[t * s.in_stride + Di + Dc + h] + (s.dt_bias ? s.dt_bias[h] : 0.0f));
      const float decay = expf(dt * A);
      for (int32_t i = threadIdx.x; i < P; i += blockDim.x) {
        float* row = hs + int64_t{i} * row_stride;
        if (start == p)
          for (int32_t j = 0; j < N; ++j) row[j] = 0.0f;
        const float xs = Conv(s, conv_state, t, p, p0, start, h * P + i, Di, Dc);
        float acc = 0.0f;
        for (int32_t j = 0; j < N; ++j) {
          const float v = row[j] * decay + dt * xs * bc[j];
          row[j] = v;
          acc += v * bc[N + j];
        }
        s.out[t * s.out_stride + int64_t{h} * P + i] = acc + Dh * xs;
      }
      __syncthreads();  // bc is rewritten by the next token
    }
    if (shared_state && hi == n)
      for (int32_t i = threadIdx.x; i < P; i += blockDim.x)
        for (int32_t j = 0; j < N; ++j) slot[int64_t{i} * N + j] = hs[int64_t{i} * row_stride + j];
  };
  for (int64_t k = blockIdx.z; k < num - 1; k += gridDim.z) scan(k);
  if (blockIdx.z == 0) scan(num - 1);
}

__global__ void ConvStateKernel(SsmParams s) {
  const int32_t b = blockIdx.x;
  const int32_t q0 = s.query_start_loc[b], q1 = s.query_start_loc[b + 1];
  if (q1 == q0) return;
  const int32_t W = s.conv_width, Di = s.heads * s.head_dim, Dc = Di + 2 * s.groups * s.state;
  float* conv_state = StateOf(s, b);
  const int64_t p0 = s.query_pos_starts[b], n = p0 + (q1 - q0);
  for (int32_t c = blockIdx.y * blockDim.x + threadIdx.x; c < Dc; c += gridDim.y * blockDim.x) {
    // Ascending rows: each old row is read before it is overwritten (the source row is never below).
    for (int32_t i = 0; i < W - 1; ++i) {
      const int64_t pos = n - (W - 1) + i;
      float v = 0.0f;
      if (pos >= p0) v = s.in[(q0 + (pos - p0)) * s.in_stride + Di + c];
      else if (pos >= 0) v = conv_state[(pos - p0 + W - 1) * Dc + c];
      conv_state[int64_t{i} * Dc + c] = v;
    }
  }
}

constexpr int kNormThreads = 256;

__global__ void GateNormKernel(SsmParams s) {
  const int64_t t = blockIdx.x;
  const int32_t g = blockIdx.y;
  const int32_t Di = s.heads * s.head_dim, gs = Di / s.groups;
  float* y = s.out + t * s.out_stride + int64_t{g} * gs;
  const float* z = s.in + t * s.in_stride + int64_t{g} * gs;
  float sum_sq = 0.0f;
  for (int32_t i = threadIdx.x; i < gs; i += blockDim.x) {
    const float v = y[i] * Silu(z[i]);
    y[i] = v;
    sum_sq += v * v;
  }
  if (!s.norm_weight) return;
  __shared__ float partial[kNormThreads / 32];
  for (int o = 16; o > 0; o >>= 1) sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, o);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = sum_sq;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < kNormThreads / 32; ++w) total += partial[w];
  const float inv = 1.0f / sqrtf(total / float(gs) + s.norm_eps);
  for (int32_t i = threadIdx.x; i < gs; i += blockDim.x) y[i] = y[i] * inv * s.norm_weight[int64_t{g} * gs + i];
}

}  // namespace

int LaunchSsm(const SsmParams& s, void* stream) {
  if (s.num_seqs <= 0 || s.num_tokens <= 0) return 0;
  auto st = static_cast<cudaStream_t>(stream);
  // Scan state in shared memory when it fits the default 48 KiB (then segments spread over Z CTAs
  // per (sequence, head), enough for about 4 CTAs per multiprocessor), else in the slot, one CTA.
  const size_t state_shmem = size_t(s.head_dim) * (s.state + 1) * sizeof(float);
  const size_t bc_shmem = size_t(2) * s.state * sizeof(float);
  const bool shared_state = bc_shmem + state_shmem <= 48 * 1024;
  int64_t z = 1;
  if (shared_state) {
    const int64_t ctas = int64_t{s.num_seqs} * s.heads, want = 4 * int64_t{s.num_sms > 0 ? s.num_sms : 132};
    const int64_t most = int64_t{s.max_seq_tokens} / std::max(1, s.chunk_size) + 2;  // segments of the longest
    z = std::clamp<int64_t>((want + ctas - 1) / ctas, 1, std::min<int64_t>(most, 65535));
  }
  const int threads = std::min(256, std::max(32, (s.head_dim + 31) / 32 * 32));
  ScanKernel<<<dim3(unsigned(s.num_seqs), unsigned(s.heads), unsigned(z)), threads,
               bc_shmem + (shared_state ? state_shmem : 0), st>>>(s, shared_state);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  if (s.conv_width > 1) {
    const int32_t Dc = s.heads * s.head_dim + 2 * s.groups * s.state;
    const unsigned ys = unsigned(std::min<int64_t>((Dc + 255) / 256, 65535));
    ConvStateKernel<<<dim3(unsigned(s.num_seqs), ys), 256, 0, st>>>(s);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  GateNormKernel<<<dim3(unsigned(s.num_tokens), unsigned(s.groups)), kNormThreads, 0, st>>>(s);
  return cudaGetLastError();
}

}  // namespace kvplug::attn::attamba::cuda
