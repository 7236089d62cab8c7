// The CPU engine's fast path: tiled, vectorised paged attention for every variant of the family.
//
// A work item is (query span, KV head, a tile of up to kMaxRows query rows: tokens x the KV head's
// query heads). It walks the span's key segments in tiles of kKeyTile keys: the K/V rows of a tile
// are converted to fp32 once, scores are small matrix products (dot products against the key rows
// for a few rows, as decode has; an outer-product kernel over the transposed tile for many rows, as
// prefill has), the variant's scale, soft cap and mask apply to the score tile, and an online softmax
// per row carries (m, l, u) across tiles. Keys outside a tile's reach are never visited: the tile's
// key range comes from the segment's lag bounds (binary search over a position map).
//
// Vector code goes through Google Highway with run-time dispatch (foreach_target), so one build
// runs SSE4, AVX2 or AVX-512 on x86-64 and NEON on Arm, whatever the build machine was.
// cpu_engine.cc keeps the plain engine (one key row at a time) beside it as a check and an A/B.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kvplug/attention/cpu_engine.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "common/src/cpu_fast_engine.cc"
// The kernels keep small arrays of vectors (register blocks), which sizeless (SVE, RVV) vectors
// cannot be; NEON covers Arm.
#ifndef HWY_DISABLED_TARGETS
#define HWY_DISABLED_TARGETS (HWY_SVE | HWY_SVE2 | HWY_SVE_256 | HWY_SVE2_128 | HWY_RVV)
#endif
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "hwy/contrib/math/math-inl.h"

#ifndef KVP_CPU_FAST_ENGINE_ONCE_
#define KVP_CPU_FAST_ENGINE_ONCE_
namespace kvplug::attn::fast {

constexpr int32_t kMaxHead = 256;
constexpr int32_t kMaxRows = 128;  // query rows per work item (tokens x query heads)
constexpr int32_t kKeyTile = 32;   // keys per tile: a multiple of two vectors of 16 floats
constexpr int32_t kPackedMinRows = 8;  // from this many rows the transposed-tile kernel pays
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Per-thread scratch, grown once per thread (never per call once warm).
struct Scratch {
  std::vector<float> q, o, k, v, kt, s;
  std::vector<float> scale, m, l, u;
  std::vector<int32_t> qpos;
  void Reserve() {
    if (!q.empty()) return;
    q.resize(size_t{kMaxRows} * kMaxHead);
    o.resize(size_t{kMaxRows} * kMaxHead);
    k.resize(size_t{kKeyTile} * kMaxHead);
    v.resize(size_t{kKeyTile} * kMaxHead);
    kt.resize(size_t{kKeyTile} * kMaxHead);
    s.resize(size_t{kMaxRows} * kKeyTile);
    for (auto* x : {&scale, &m, &l, &u}) x->resize(kMaxRows);
    qpos.resize(kMaxRows);
  }
};

inline Scratch& ThreadScratch() {
  thread_local Scratch scratch;
  scratch.Reserve();
  return scratch;
}

// How a span is cut into work items: tokens per item and query heads per item.
struct SpanTiling {
  int32_t tokens_per_item;
  int32_t heads_per_item;
  int32_t head_chunks;
};

inline SpanTiling Tiling(int32_t group) {
  const int32_t heads = std::min(group, kMaxRows);
  return {std::max(1, kMaxRows / heads), heads, (group + heads - 1) / heads};
}

inline int32_t KeyPos(const KeySegment& g, const int32_t* pos_map, int32_t j) {
  return g.pos_map >= 0 ? pos_map[g.pos_map + (j - g.key_begin)] : g.pos_base + j;
}

// Keys of segment g that some query position in [p_lo, p_hi] may see: [*jlo, *jhi).
inline void KeyRange(const KeySegment& g, const int32_t* pos_map, int32_t p_lo, int32_t p_hi, int32_t* jlo,
                     int32_t* jhi) {
  const int64_t kmin = int64_t{p_lo} - g.lag_max;  // smallest key position any row sees
  const int64_t kmax = int64_t{p_hi} - g.lag_min;  // largest
  if (g.pos_map >= 0) {
    const int32_t* map = pos_map + g.pos_map;
    const int32_t n = g.key_end - g.key_begin;
    *jlo = g.key_begin + static_cast<int32_t>(
                             std::lower_bound(map, map + n, kmin, [](int32_t a, int64_t b) { return a < b; }) - map);
    *jhi = g.key_begin + static_cast<int32_t>(
                             std::upper_bound(map, map + n, kmax, [](int64_t a, int32_t b) { return a < b; }) - map);
  } else {
    *jlo = static_cast<int32_t>(std::clamp<int64_t>(kmin - g.pos_base, g.key_begin, g.key_end));
    *jhi = static_cast<int32_t>(std::clamp<int64_t>(kmax - g.pos_base + 1, g.key_begin, g.key_end));
  }
  if (*jhi < *jlo) *jhi = *jlo;
}

}  // namespace kvplug::attn::fast
#endif  // KVP_CPU_FAST_ENGINE_ONCE_

HWY_BEFORE_NAMESPACE();
namespace kvplug::attn {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using namespace fast;  // NOLINT: the shared constants above

// At most 16 lanes: every head size the CPU takes is a multiple of 16, so rows split into whole
// vectors on every target.
using DF = hn::CappedTag<float, 16>;
using VF = hn::Vec<DF>;

// n elements (a multiple of the lane count) of a row in the cache's dtype, as fp32.
void RowToFloat(const void* src, DType t, int32_t n, float* HWY_RESTRICT dst) {
  const DF df;
  const int32_t N = static_cast<int32_t>(hn::Lanes(df));
  if (t == DType::kBF16) {
    const hn::Rebind<hwy::bfloat16_t, DF> db;
    const auto* s = static_cast<const hwy::bfloat16_t*>(src);
    for (int32_t i = 0; i < n; i += N) hn::StoreU(hn::PromoteTo(df, hn::LoadU(db, s + i)), df, dst + i);
  } else if (t == DType::kF16) {
    const hn::Rebind<hwy::float16_t, DF> dh;
    const auto* s = static_cast<const hwy::float16_t*>(src);
    for (int32_t i = 0; i < n; i += N) hn::StoreU(hn::PromoteTo(df, hn::LoadU(dh, s + i)), df, dst + i);
  } else {
    std::memcpy(dst, src, sizeof(float) * static_cast<size_t>(n));
  }
}

// S[r][j] = q_r . k_j for R rows (q + r * ldq) and nk keys (kp[j]): dot products, two keys at a time.
template <int R>
void DotScores(const float* HWY_RESTRICT q, int32_t ldq, const float* const* kp, int32_t nk, int32_t d,
               float* HWY_RESTRICT s, int32_t lds) {
  const DF df;
  const int32_t N = static_cast<int32_t>(hn::Lanes(df));
  int32_t j = 0;
  for (; j + 2 <= nk; j += 2) {
    VF a0[R], a1[R];
    for (int r = 0; r < R; ++r) a0[r] = a1[r] = hn::Zero(df);
    const float* k0 = kp[j];
    const float* k1 = kp[j + 1];
    for (int32_t i = 0; i < d; i += N) {
      const VF x0 = hn::LoadU(df, k0 + i), x1 = hn::LoadU(df, k1 + i);
      for (int r = 0; r < R; ++r) {
        const VF qv = hn::LoadU(df, q + r * ldq + i);
        a0[r] = hn::MulAdd(qv, x0, a0[r]);
        a1[r] = hn::MulAdd(qv, x1, a1[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      s[r * lds + j] = hn::GetLane(hn::SumOfLanes(df, a0[r]));
      s[r * lds + j + 1] = hn::GetLane(hn::SumOfLanes(df, a1[r]));
    }
  }
  if (j < nk) {
    VF a0[R];
    for (int r = 0; r < R; ++r) a0[r] = hn::Zero(df);
    for (int32_t i = 0; i < d; i += N) {
      const VF x0 = hn::LoadU(df, kp[j] + i);
      for (int r = 0; r < R; ++r) a0[r] = hn::MulAdd(hn::LoadU(df, q + r * ldq + i), x0, a0[r]);
    }
    for (int r = 0; r < R; ++r) s[r * lds + j] = hn::GetLane(hn::SumOfLanes(df, a0[r]));
  }
}

// S[r][0..kKeyTile) = q_r . Kt[:, j] over the transposed tile kt ([d][kKeyTile]): outer products,
// two key vectors by R rows per step.
template <int R>
void PackedScores(const float* HWY_RESTRICT q, int32_t ldq, const float* HWY_RESTRICT kt, int32_t d,
                  float* HWY_RESTRICT s, int32_t lds) {
  const DF df;
  const int32_t N = static_cast<int32_t>(hn::Lanes(df));
  for (int32_t j = 0; j < kKeyTile; j += 2 * N) {
    VF a0[R], a1[R];
    for (int r = 0; r < R; ++r) a0[r] = a1[r] = hn::Zero(df);
    for (int32_t i = 0; i < d; ++i) {
      const VF x0 = hn::LoadU(df, kt + i * kKeyTile + j), x1 = hn::LoadU(df, kt + i * kKeyTile + j + N);
      for (int r = 0; r < R; ++r) {
        const VF b = hn::Set(df, q[r * ldq + i]);
        a0[r] = hn::MulAdd(b, x0, a0[r]);
        a1[r] = hn::MulAdd(b, x1, a1[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      hn::StoreU(a0[r], df, s + r * lds + j);
      hn::StoreU(a1[r], df, s + r * lds + j + N);
    }
  }
}

// O[r] += sum_j P[r][j] v_j for R rows, nk keys (vp[j]), two vectors of the head at a time.
template <int R>
void AccumulatePV(const float* HWY_RESTRICT p, int32_t ldp, const float* const* vp, int32_t nk, int32_t d,
                  float* HWY_RESTRICT o, int32_t ldo) {
  const DF df;
  const int32_t N = static_cast<int32_t>(hn::Lanes(df));
  int32_t i = 0;
  for (; i + 2 * N <= d; i += 2 * N) {
    VF a0[R], a1[R];
    for (int r = 0; r < R; ++r) {
      a0[r] = hn::LoadU(df, o + r * ldo + i);
      a1[r] = hn::LoadU(df, o + r * ldo + i + N);
    }
    for (int32_t j = 0; j < nk; ++j) {
      const VF x0 = hn::LoadU(df, vp[j] + i), x1 = hn::LoadU(df, vp[j] + i + N);
      for (int r = 0; r < R; ++r) {
        const VF b = hn::Set(df, p[r * ldp + j]);
        a0[r] = hn::MulAdd(b, x0, a0[r]);
        a1[r] = hn::MulAdd(b, x1, a1[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      hn::StoreU(a0[r], df, o + r * ldo + i);
      hn::StoreU(a1[r], df, o + r * ldo + i + N);
    }
  }
  for (; i < d; i += N) {
    VF a0[R];
    for (int r = 0; r < R; ++r) a0[r] = hn::LoadU(df, o + r * ldo + i);
    for (int32_t j = 0; j < nk; ++j) {
      const VF x0 = hn::LoadU(df, vp[j] + i);
      for (int r = 0; r < R; ++r) a0[r] = hn::MulAdd(hn::Set(df, p[r * ldp + j]), x0, a0[r]);
    }
    for (int r = 0; r < R; ++r) hn::StoreU(a0[r], df, o + r * ldo + i);
  }
}

// Runs kernel<R> over `rows` rows in blocks of four.
template <template <int> class K, typename... Args>
void ForRowBlocks(int32_t rows, int32_t row_stride_a, int32_t row_stride_b, const float* a, float* b,
                  Args... args) {
  int32_t r = 0;
  for (; r + 4 <= rows; r += 4) K<4>::Run(a + r * row_stride_a, b + r * row_stride_b, args...);
  switch (rows - r) {
    case 3: K<3>::Run(a + r * row_stride_a, b + r * row_stride_b, args...); break;
    case 2: K<2>::Run(a + r * row_stride_a, b + r * row_stride_b, args...); break;
    case 1: K<1>::Run(a + r * row_stride_a, b + r * row_stride_b, args...); break;
    default: break;
  }
}

template <int R>
struct DotScoresK {
  static void Run(const float* q, float* s, int32_t ldq, const float* const* kp, int32_t nk, int32_t d,
                  int32_t lds) {
    DotScores<R>(q, ldq, kp, nk, d, s, lds);
  }
};
template <int R>
struct PackedScoresK {
  static void Run(const float* q, float* s, int32_t ldq, const float* kt, int32_t d, int32_t lds) {
    PackedScores<R>(q, ldq, kt, d, s, lds);
  }
};
template <int R>
struct AccumulatePVK {
  static void Run(const float* p, float* o, int32_t ldp, const float* const* vp, int32_t nk, int32_t d,
                  int32_t ldo) {
    AccumulatePV<R>(p, ldp, vp, nk, d, o, ldo);
  }
};

// Scale, soft cap and mask of one score row, then its online-softmax update; leaves the row's
// probabilities (0 where masked) in s. Returns false when the row saw no key in this tile.
bool SoftmaxRow(float* HWY_RESTRICT s, int32_t nk, float scale, float cap, bool full, const KeySegment& seg,
                const int32_t* kpos, int32_t qpos, bool want_entropy, float* HWY_RESTRICT o, int32_t d,
                float* m, float* l, float* u) {
  const DF df;
  const int32_t N = static_cast<int32_t>(hn::Lanes(df));
  const VF vscale = hn::Set(df, scale);
  const VF ninf = hn::Set(df, kNegInf);
  for (int32_t j = 0; j < kKeyTile; j += N) {
    VF x = hn::Mul(hn::LoadU(df, s + j), vscale);
    if (cap > 0.0f) x = hn::Mul(hn::Set(df, cap), hn::Tanh(df, hn::Mul(x, hn::Set(df, 1.0f / cap))));
    hn::StoreU(x, df, s + j);
  }
  if (!full) {
    for (int32_t j = 0; j < nk; ++j) {
      const int64_t lag = int64_t{qpos} - kpos[j];
      if (lag < seg.lag_min || lag > seg.lag_max) s[j] = kNegInf;
    }
  }
  for (int32_t j = nk; j < kKeyTile; ++j) s[j] = kNegInf;
  VF vmax = ninf;
  for (int32_t j = 0; j < kKeyTile; j += N) vmax = hn::Max(vmax, hn::LoadU(df, s + j));
  const float tile_max = hn::GetLane(hn::MaxOfLanes(df, vmax));
  if (tile_max == kNegInf) return false;
  if (tile_max > *m) {
    const float correction = std::exp(*m - tile_max);  // 0 on the row's first key
    *l *= correction;
    *u *= correction;
    const VF c = hn::Set(df, correction);
    for (int32_t i = 0; i < d; i += N) hn::StoreU(hn::Mul(hn::LoadU(df, o + i), c), df, o + i);
    *m = tile_max;
  }
  const VF vm = hn::Set(df, *m);
  VF sum = hn::Zero(df), sum_s = hn::Zero(df);
  for (int32_t j = 0; j < kKeyTile; j += N) {
    const VF x = hn::LoadU(df, s + j);
    const auto seen = hn::Gt(x, ninf);
    const VF p = hn::IfThenElseZero(seen, hn::Exp(df, hn::Sub(x, vm)));
    sum = hn::Add(sum, p);
    if (want_entropy) sum_s = hn::MulAdd(p, hn::IfThenElseZero(seen, x), sum_s);
    hn::StoreU(p, df, s + j);
  }
  *l += hn::GetLane(hn::SumOfLanes(df, sum));
  if (want_entropy) *u += hn::GetLane(hn::SumOfLanes(df, sum_s));
  return true;
}

struct Item {
  const QuerySpan* span;
  int32_t t0, t1;   // query tokens
  int32_t g;        // KV head
  int32_t h0, h1;   // query heads (absolute)
};

void RunItem(const CpuAttentionArgs& a, const Item& it) {
  Scratch& w = ThreadScratch();
  const kv::PagedLayer& pages = a.pages;
  const int32_t d = pages.head_size;
  const int32_t bs = pages.block_size;
  const int32_t heads = it.h1 - it.h0;
  const int32_t rows = (it.t1 - it.t0) * heads;
  const auto kv_indices = a.plan.kv_indices();
  const int32_t* pos_map = a.keys.pos_map().data();
  const VariantParams& vp = a.variant;
  const bool want_entropy = a.outputs.entropy != nullptr;
  const bool packed = rows >= kPackedMinRows;

  for (int32_t t = it.t0; t < it.t1; ++t) {
    const int32_t q_pos = it.span->pos_begin + (t - it.span->token_begin);
    for (int32_t h = it.h0; h < it.h1; ++h) {
      const int32_t r = (t - it.t0) * heads + (h - it.h0);
      RowToFloat(a.query.At(t, h), a.query.dtype, d, &w.q[size_t(r) * d]);
      w.qpos[r] = q_pos;
      float sc = vp.sm_scale;
      if (vp.scale_table)
        sc *= vp.scale_table[static_cast<int64_t>(h) * vp.scale_table_len + std::min(q_pos, vp.scale_table_len - 1)];
      w.scale[r] = sc;
      w.m[r] = kNegInf;
      w.l[r] = 0.0f;
      w.u[r] = 0.0f;
    }
  }
  std::fill_n(w.o.data(), size_t(rows) * d, 0.0f);
  const int32_t p_lo = it.span->pos_begin + (it.t0 - it.span->token_begin);
  const int32_t p_hi = it.span->pos_begin + (it.t1 - 1 - it.span->token_begin);

  const float* kp[kKeyTile];
  const float* vrow[kKeyTile];
  int32_t kpos[kKeyTile];
  for (int32_t si = it.span->segment_begin; si < it.span->segment_end; ++si) {
    const KeySegment& seg = a.keys.segments()[si];
    int32_t jlo, jhi;
    KeyRange(seg, pos_map, p_lo, p_hi, &jlo, &jhi);
    // Rows of one KV head sit a whole token apart (heads x head size) on pages in any order, so the
    // hardware prefetcher rarely follows them: the next tile's rows are prefetched by hand.
    const size_t row_bytes = size_t(d) * DTypeSize(pages.dtype);
    auto prefetch_tile = [&](int32_t t0) {
      const int32_t t1 = std::min(jhi, t0 + kKeyTile);
      for (int32_t j = t0; j < t1; ++j) {
        const int32_t block = kv_indices[seg.page_offset + j / bs];
        const char* krow = static_cast<const char*>(pages.Row(0, block, j % bs, it.g));
        const char* vr = static_cast<const char*>(pages.Row(1, block, j % bs, it.g));
        for (size_t off = 0; off < row_bytes; off += 64) {
          __builtin_prefetch(krow + off);
          __builtin_prefetch(vr + off);
        }
      }
    };
    if (jlo < jhi) prefetch_tile(jlo);
    for (int32_t j0 = jlo; j0 < jhi; j0 += kKeyTile) {
      const int32_t nk = std::min(kKeyTile, jhi - j0);
      if (j0 + kKeyTile < jhi) prefetch_tile(j0 + kKeyTile);
      for (int32_t x = 0; x < nk; ++x) {
        const int32_t j = j0 + x;
        const int32_t block = kv_indices[seg.page_offset + j / bs];
        const void* krow = pages.Row(0, block, j % bs, it.g);
        const void* vr = pages.Row(1, block, j % bs, it.g);
        if (pages.dtype == DType::kF32) {
          kp[x] = static_cast<const float*>(krow);
          vrow[x] = static_cast<const float*>(vr);
        } else {
          RowToFloat(krow, pages.dtype, d, &w.k[size_t(x) * d]);
          RowToFloat(vr, pages.dtype, d, &w.v[size_t(x) * d]);
          kp[x] = &w.k[size_t(x) * d];
          vrow[x] = &w.v[size_t(x) * d];
        }
        kpos[x] = KeyPos(seg, pos_map, j);
      }
      // Every row sees every key of the tile when the extreme lags are inside the bounds.
      const bool full = int64_t{p_lo} - kpos[nk - 1] >= seg.lag_min && int64_t{p_hi} - kpos[0] <= seg.lag_max;
      if (packed) {
        for (int32_t i = 0; i < d; ++i) {
          float* dst = &w.kt[size_t(i) * kKeyTile];
          for (int32_t x = 0; x < nk; ++x) dst[x] = kp[x][i];
          for (int32_t x = nk; x < kKeyTile; ++x) dst[x] = 0.0f;
        }
        ForRowBlocks<PackedScoresK>(rows, d, kKeyTile, w.q.data(), w.s.data(), d, w.kt.data(), d, kKeyTile);
      } else {
        ForRowBlocks<DotScoresK>(rows, d, kKeyTile, w.q.data(), w.s.data(), d, kp, nk, d, kKeyTile);
      }
      bool any = false;
      for (int32_t r = 0; r < rows; ++r) {
        float* s = &w.s[size_t(r) * kKeyTile];
        if (SoftmaxRow(s, nk, w.scale[r], vp.logits_soft_cap, full, seg, kpos, w.qpos[r], want_entropy,
                       &w.o[size_t(r) * d], d, &w.m[r], &w.l[r], &w.u[r]))
          any = true;
        else
          std::fill_n(s, kKeyTile, 0.0f);
      }
      if (any) ForRowBlocks<AccumulatePVK>(rows, kKeyTile, d, w.s.data(), w.o.data(), kKeyTile, vrow, nk, d, d);
    }
  }

  for (int32_t t = it.t0; t < it.t1; ++t) {
    for (int32_t h = it.h0; h < it.h1; ++h) {
      const int32_t r = (t - it.t0) * heads + (h - it.h0);
      const float l = w.l[r];
      // A row that saw no key (possible with custom key sets) writes zeros and lse = -inf.
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;
      void* out = a.outputs.out->At(t, h);
      const float* o = &w.o[size_t(r) * d];
      if (a.outputs.out->dtype == DType::kF32) {
        for (int32_t i = 0; i < d; ++i) static_cast<float*>(out)[i] = o[i] * inv;
      } else {
        for (int32_t i = 0; i < d; ++i) StoreFromFloat(out, a.outputs.out->dtype, i, o[i] * inv);
      }
      const float lse = l > 0.0f ? w.m[r] + std::log(l) : kNegInf;
      if (a.outputs.lse) *static_cast<float*>(a.outputs.lse->At(t, h)) = lse;
      if (a.outputs.entropy)
        *static_cast<float*>(a.outputs.entropy->At(t, h)) = l > 0.0f ? std::max(0.0f, lse - w.u[r] * inv) : 0.0f;
    }
  }
}

void RunFast(const CpuAttentionArgs& a) {
  const auto spans = a.keys.spans();
  const int32_t group = a.num_q_heads / a.num_kv_heads;
  const SpanTiling tiling = Tiling(group);
  const int64_t per_tile = int64_t{a.num_kv_heads} * tiling.head_chunks;
  // Work items of span s are [first[s], first[s + 1]); per span, its query tiles from the last
  // (the most keys under a causal mask) to the first, so the long ones start early.
  thread_local std::vector<int64_t> first_storage;
  std::vector<int64_t>& first = first_storage;  // the caller's: workers read it through the lambda
  first.resize(spans.size() + 1);
  first[0] = 0;
  for (size_t s = 0; s < spans.size(); ++s) {
    const int32_t len = spans[s].token_end - spans[s].token_begin;
    const int64_t tiles = (len + tiling.tokens_per_item - 1) / tiling.tokens_per_item;
    first[s + 1] = first[s] + tiles * per_tile;
  }
  a.pool->ParallelFor(first.back(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const size_t s = static_cast<size_t>(std::upper_bound(first.begin(), first.end(), item) - first.begin()) - 1;
      const QuerySpan& span = spans[s];
      const int64_t local = item - first[s];
      const int64_t tiles = (first[s + 1] - first[s]) / per_tile;
      const int64_t tile = tiles - 1 - local / per_tile;
      const int32_t g = static_cast<int32_t>(local % per_tile / tiling.head_chunks);
      const int32_t hc = static_cast<int32_t>(local % tiling.head_chunks);
      Item it;
      it.span = &span;
      it.t0 = span.token_begin + static_cast<int32_t>(tile) * tiling.tokens_per_item;
      it.t1 = std::min(span.token_end, it.t0 + tiling.tokens_per_item);
      it.g = g;
      it.h0 = g * group + hc * tiling.heads_per_item;
      it.h1 = std::min((g + 1) * group, it.h0 + tiling.heads_per_item);
      RunItem(a, it);
    }
  });
}

const char* TargetName() { return hwy::TargetName(HWY_TARGET); }

}  // namespace HWY_NAMESPACE
}  // namespace kvplug::attn
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace kvplug::attn {
HWY_EXPORT(RunFast);
HWY_EXPORT(TargetName);

void RunPagedAttentionFast(const CpuAttentionArgs& args) { HWY_DYNAMIC_DISPATCH(RunFast)(args); }
const char* CpuEngineIsa() { return HWY_DYNAMIC_DISPATCH(TargetName)(); }
}  // namespace kvplug::attn
#endif
