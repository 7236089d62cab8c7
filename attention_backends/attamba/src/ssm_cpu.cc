// Attamba's chunk-local Mamba-2 (SSD) block on the CPU: causal depthwise conv + SiLU over xBC, the
// selective scan with per-head A = -exp(A_log), dt = softplus(dt + dt_bias), B and C per group and
// the D skip, then y * silu(z) and a grouped RMSNorm (mamba_ssm's RMSNormGated with
// norm_before_gate = False). The conv and the scan restart at every chunk start of the layer, so
// they never read across a chunk boundary; the state slot holds what the next step needs (the
// last conv_width - 1 raw xBC rows and the scan state), and positions decide whether it is used.
#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "fmt/format.h"
#include "kvplug/attention/attamba/attamba.h"

namespace kvplug::attn::attamba {
namespace {

absl::Status Bad(std::string msg) { return absl::InvalidArgumentError("attamba ssm: " + std::move(msg)); }

float Silu(float x) { return x / (1.0f + std::exp(-x)); }
float Softplus(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }  // PyTorch's threshold

absl::Status CheckVector(const TensorView* v, const char* name, int64_t n, bool required) {
  if (!v) return required ? Bad(fmt::format("{} is required", name)) : absl::OkStatus();
  if (v->dtype != DType::kF32) return Bad(fmt::format("{}: dtype must be float32", name));
  if (v->ndim != 1 || v->shape[0] != n) return Bad(fmt::format("{}: expected shape [{}], got [{}] (ndim {})", name, n,
                                                               v->ndim > 0 ? v->shape[0] : -1, v->ndim));
  if (n > 1 && v->strides[0] != 1) return Bad(fmt::format("{}: stride {} must be 1", name, v->strides[0]));
  return absl::OkStatus();
}

absl::Status CheckRows(const TensorView& v, const char* name, int64_t rows, int64_t cols) {
  if (v.dtype != DType::kF32) return Bad(fmt::format("{}: dtype must be float32", name));
  if (v.ndim != 2 || v.shape[0] != rows || v.shape[1] != cols)
    return Bad(fmt::format("{}: expected shape [{}, {}], got ndim={} [{}, {}]", name, rows, cols, v.ndim, v.shape[0],
                           v.ndim > 1 ? v.shape[1] : -1));
  if (cols > 1 && v.strides[1] != 1) return Bad(fmt::format("{}: the last axis must be contiguous (stride {})", name,
                                                            v.strides[1]));
  return absl::OkStatus();
}

}  // namespace

// The checks of an SSM call, shared by the CPU and the CUDA paths (attamba.cc runs them first).
absl::Status ValidateSsmArgs(const SsmShape& sh, const SsmArgs& a) {
  const BatchPlan& plan = a.plan;
  const kv::KvCacheOptions& o = a.cache.options();
  if (a.which != 0 && a.which != 1) return Bad(fmt::format("which={} must be 0 (keys) or 1 (values)", a.which));
  if (a.layer < 0 || a.layer >= o.num_layers)
    return absl::OutOfRangeError(fmt::format("attamba ssm: layer={} out of range [0, {})", a.layer, o.num_layers));
  if (plan.empty()) return absl::FailedPreconditionError("attamba ssm: the plan holds no batch");
  if (!plan.has_query_pos_starts()) return Bad("kvp_batch.query_pos_starts is required (the tokens' positions)");
  if (!plan.has_state_slots()) return Bad("kvp_batch.state_slots is required (the SSM state of each sequence)");
  const int64_t state_bytes = 2 * sh.state_floats() * 4;
  if (o.num_state_slots <= 0 || o.state_bytes_per_layer < state_bytes)
    return absl::FailedPreconditionError(fmt::format(
        "attamba ssm: the cache has num_state_slots={} and state_bytes_per_layer={}; the SSMs need state slots of at "
        "least {} bytes per layer (kvp_attention_state_bytes)", o.num_state_slots, o.state_bytes_per_layer,
        state_bytes));
  if (plan.max_state_slot() >= o.num_state_slots)
    return absl::OutOfRangeError(fmt::format("attamba ssm: state slot {} out of range [0, {})", plan.max_state_slot(),
                                             o.num_state_slots));
  {  // two sequences on one state slot would race on it (and mix their states)
    std::vector<int32_t> used;
    for (int32_t b = 0; b < plan.num_seqs(); ++b)
      if (plan.query_start_loc()[b + 1] > plan.query_start_loc()[b]) used.push_back(plan.state_slots()[b]);
    std::sort(used.begin(), used.end());
    if (auto dup = std::adjacent_find(used.begin(), used.end()); dup != used.end())
      return Bad(fmt::format("state slot {} is given to two sequences of the step", *dup));
  }
  const int64_t T = plan.num_tokens(), Di = sh.d_inner(), Dc = sh.conv_dim(), H = sh.heads, W = sh.conv_width;
  if (absl::Status s = CheckRows(a.in, "in", T, sh.in_dim()); !s.ok()) return s;
  if (absl::Status s = CheckRows(a.out, "out", T, Di); !s.ok()) return s;
  if (!a.conv_weight) return Bad("conv_weight is required");
  if (absl::Status s = CheckRows(*a.conv_weight, "conv_weight", Dc, W); !s.ok()) return s;
  if (a.conv_weight->strides[0] != W && Dc > 1)
    return Bad(fmt::format("conv_weight: must be compact [{}, {}] (row stride {})", Dc, W, a.conv_weight->strides[0]));
  for (const auto& [v, name, n, required] :
       {std::tuple{a.conv_bias, "conv_bias", Dc, false}, std::tuple{a.dt_bias, "dt_bias", H, false},
        std::tuple{a.a_log, "a_log", H, true}, std::tuple{a.d_skip, "d_skip", H, false},
        std::tuple{a.norm_weight, "norm_weight", Di, false}})
    if (absl::Status s = CheckVector(v, name, n, required); !s.ok()) return s;
  return absl::OkStatus();
}

// The CPU SSM; `a` has passed ValidateSsmArgs.
absl::Status RunSsmCpu(const AttambaConfig& config, const SsmShape& sh, const SsmArgs& a) {
  const BatchPlan& plan = a.plan;
  const int64_t T = plan.num_tokens(), Di = sh.d_inner(), Dc = sh.conv_dim(), H = sh.heads, P = sh.head_dim,
                N = sh.state, G = sh.groups, W = sh.conv_width;
  const ChunkGeometry geo{config.chunk_size, ChunkGeometry::Offset(config, config.layer_index)};
  const auto qsl = plan.query_start_loc();
  auto state_of = [&](int32_t b) {
    return reinterpret_cast<float*>(a.cache.State(a.layer, plan.state_slots()[b])->data()) + a.which * sh.state_floats();
  };
  auto in_row = [&](int64_t t) { return static_cast<const float*>(a.in.At(t, 0)); };
  auto out_row = [&](int64_t t) { return static_cast<float*>(a.out.At(t, 0)); };
  auto vec = [](const TensorView* v) { return v ? static_cast<const float*>(v->data) : nullptr; };
  const float* conv_w = vec(a.conv_weight);
  const float *conv_b = vec(a.conv_bias), *dt_b = vec(a.dt_bias), *a_log = vec(a.a_log), *d_skip = vec(a.d_skip),
              *norm_w = vec(a.norm_weight);

  // A: conv + SiLU of xBC for every token, inputs before the step from the state's raw rows.
  std::vector<float> conv_out(size_t(T * Dc));  // read by the pool's threads: not thread_local
  a.exec.pool->ParallelFor(T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int32_t b = plan.token_seq()[t];
      const int64_t p0 = plan.query_pos_start(b), p = p0 + (t - qsl[b]), start = geo.ChunkStart(p);
      const float* conv_state = state_of(b);
      for (int64_t c = 0; c < Dc; ++c) {
        float acc = conv_b ? conv_b[c] : 0.0f;
        for (int64_t i = 0; i < W; ++i) {
          const int64_t pp = p - (W - 1) + i;
          if (pp < start) continue;  // before the chunk: zero
          const float x = pp >= p0 ? in_row(t - (p - pp))[Di + c] : conv_state[(pp - p0 + W - 1) * Dc + c];
          acc += conv_w[c * W + i] * x;
        }
        conv_out[size_t(t * Dc + c)] = Silu(acc);
      }
    }
  });
  // B: the scan per (sequence, head), restarting at chunk starts; y (before the gate) into out.
  const int64_t heads_per_group = H / G;
  a.exec.pool->ParallelFor(int64_t{plan.num_seqs()} * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const auto b = static_cast<int32_t>(item / H);
      const int64_t h = item % H, g = h / heads_per_group;
      if (qsl[b + 1] == qsl[b]) continue;
      float* hs = state_of(b) + (W - 1) * Dc + h * P * N;  // [P][N]
      const float A = -std::exp(a_log[h]);
      const int64_t p0 = plan.query_pos_start(b);
      for (int64_t t = qsl[b]; t < qsl[b + 1]; ++t) {
        const int64_t p = p0 + (t - qsl[b]);
        if (geo.ChunkStart(p) == p) std::fill_n(hs, P * N, 0.0f);
        const float dt = Softplus(in_row(t)[Di + Dc + h] + (dt_b ? dt_b[h] : 0.0f));
        const float decay = std::exp(dt * A);
        const float* xs = &conv_out[size_t(t * Dc + h * P)];
        const float* B = &conv_out[size_t(t * Dc + Di + g * N)];
        const float* C = &conv_out[size_t(t * Dc + Di + G * N + g * N)];
        float* y = out_row(t) + h * P;
        for (int64_t i = 0; i < P; ++i) {
          float* row = hs + i * N;
          float acc = 0.0f;
          for (int64_t n = 0; n < N; ++n) {
            row[n] = row[n] * decay + dt * xs[i] * B[n];
            acc += row[n] * C[n];
          }
          y[i] = acc + (d_skip ? d_skip[h] * xs[i] : 0.0f);
        }
      }
    }
  });
  // C: the raw xBC rows of each sequence's last W - 1 positions become its conv state (rows shift
  // down, so ascending order reads each old row before it is overwritten).
  for (int32_t b = 0; b < plan.num_seqs(); ++b) {
    if (qsl[b + 1] == qsl[b] || W == 1) continue;
    float* conv_state = state_of(b);
    const int64_t p0 = plan.query_pos_start(b), n = p0 + (qsl[b + 1] - qsl[b]);
    for (int64_t i = 0; i < W - 1; ++i) {
      const int64_t pos = n - (W - 1) + i;
      float* dst = conv_state + i * Dc;
      if (pos >= p0) std::copy_n(in_row(qsl[b] + (pos - p0)) + Di, Dc, dst);
      else if (pos >= 0) std::copy_n(conv_state + (pos - p0 + W - 1) * Dc, Dc, dst);
      else std::fill_n(dst, Dc, 0.0f);
    }
  }
  // D: the gate and the grouped RMSNorm.
  const int64_t group_size = Di / G;
  const float eps = config.norm_eps;
  a.exec.pool->ParallelFor(T * G, 8, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / G, g = item % G;
      float* y = out_row(t) + g * group_size;
      const float* z = in_row(t) + g * group_size;
      double sum_sq = 0.0;
      for (int64_t i = 0; i < group_size; ++i) {
        y[i] *= Silu(z[i]);
        sum_sq += double(y[i]) * y[i];
      }
      if (!norm_w) continue;
      const float inv = 1.0f / std::sqrt(float(sum_sq / double(group_size)) + eps);
      for (int64_t i = 0; i < group_size; ++i) y[i] = y[i] * inv * norm_w[g * group_size + i];
    }
  });
  return absl::OkStatus();
}

}  // namespace kvplug::attn::attamba
