// The CPU engine's fast path: tiled, vectorised paged attention for every variant of the family.
//
// A work item is (a tile of the batch's query tokens, KV head, up to kMaxRows query rows: tokens x
// the KV head's query heads); it runs each query span the tile touches. It walks the span's key
// segments in tiles of kKeyTile keys: the K/V rows of a tile are converted to fp32 once, the variant's
// scale, soft cap and mask apply to the score tile, and an online softmax per row carries (m, l, u)
// across tiles. Keys outside a tile's reach are never visited: the key range comes from the segment's
// lag bounds (binary search over a position map), rounded out to tiles aligned at the segment's start.
//
// Every row's arithmetic is the same whatever the tiling and the batch: query rows sit in vector
// lanes (scores, softmax) and head elements in lanes (P.V), so each score is one FMA chain over the
// head in order and each output one FMA chain over the keys in order; key tiles are aligned to the
// segment, not to the query tile. A token decoded alone therefore gets the bits it gets inside a
// prefill of many tokens (kv_shift's tests check that), as a batch-invariant engine should.
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
#include "kvplug/attention/thread_pool.h"

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
constexpr int32_t kMaxRows = 128;  // query rows per work item (tokens x query heads), a multiple of 16
constexpr int32_t kKeyTile = 32;   // keys per tile
constexpr int32_t kKeyBlock = 4;   // keys per score register block
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// A thread's scratch, carved from its ThreadPool::scratch (allocated with the pool: no run allocates).
struct Scratch {
  float* qt;     // [kMaxHead][ldr]: the item's query rows, transposed (rows in lanes)
  float* o;      // [kMaxRows][kMaxHead]: unnormalised outputs
  float* k;      // [KV heads][kKeyTile][d]: the key tile in fp32 (zeros past its last key)
  float* v;      // [KV heads][kKeyTile][d]
  float* st;     // [kKeyTile][ldr]: scores, then probabilities, of the tile (rows in lanes)
  float* scale;  // [kMaxRows] per row: softmax scale, running max, sum, sum of p * logit, correction
  float* m;
  float* l;
  float* u;
  float* c;
  int32_t* qpos;  // [kMaxRows]
  // K (and V) tiles of several KV heads: 8 heads of 128, 4 of 256.
  static constexpr size_t kTileFloats = size_t{kKeyTile} * 1024;
  static constexpr size_t kFloats = size_t{kMaxHead} * kMaxRows * 2 + kTileFloats * 2 +
                                    size_t{kKeyTile} * kMaxRows + size_t{kMaxRows} * 6;
  explicit Scratch(void* base) {
    float* p = static_cast<float*>(base);
    auto take = [&](size_t n) { float* r = p; p += n; return r; };
    qt = take(size_t{kMaxHead} * kMaxRows);
    o = take(size_t{kMaxRows} * kMaxHead);
    k = take(kTileFloats);
    v = take(kTileFloats);
    st = take(size_t{kKeyTile} * kMaxRows);
    scale = take(kMaxRows);
    m = take(kMaxRows);
    l = take(kMaxRows);
    u = take(kMaxRows);
    c = take(kMaxRows);
    qpos = reinterpret_cast<int32_t*>(take(kMaxRows));
  }
};
static_assert(Scratch::kFloats * sizeof(float) <= ThreadPool::kScratchBytes);

// How the batch is cut into work items: tokens per item and query heads per item.
struct Tiling {
  int32_t tokens_per_item;
  int32_t heads_per_item;
  int32_t head_chunks;
};

inline Tiling MakeTiling(int32_t group) {
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

// st[j][r0 + lanes of RB vectors] = q_r . k_j for the tile's kKeyTile keys (k: [kKeyTile][d]; past
// the last key zeros): rows in lanes, the key element broadcast, one FMA chain over the head per
// score. RB * KB chains run side by side to cover the FMA latency.
template <class D, int RB, int KB>
void Scores(D df, const float* HWY_RESTRICT qt, int32_t ldr, int32_t r0, const float* HWY_RESTRICT k, int32_t d,
            float* HWY_RESTRICT st) {
  static_assert(kKeyTile % KB == 0);
  const int32_t N = static_cast<int32_t>(hn::Lanes(df));
  for (int32_t j = 0; j < kKeyTile; j += KB) {
    hn::Vec<D> acc[RB][KB];
    for (int b = 0; b < RB; ++b)
      for (int x = 0; x < KB; ++x) acc[b][x] = hn::Zero(df);
    const float* kj = k + size_t(j) * d;
    for (int32_t i = 0; i < d; ++i) {
      hn::Vec<D> q[RB];
      for (int b = 0; b < RB; ++b) q[b] = hn::LoadU(df, qt + size_t(i) * ldr + r0 + b * N);
      for (int x = 0; x < KB; ++x) {
        const hn::Vec<D> kb = hn::Set(df, kj[size_t(x) * d + i]);
        for (int b = 0; b < RB; ++b) acc[b][x] = hn::MulAdd(q[b], kb, acc[b][x]);
      }
    }
    for (int x = 0; x < KB; ++x)
      for (int b = 0; b < RB; ++b) hn::StoreU(acc[b][x], df, st + size_t(j + x) * ldr + r0 + b * N);
  }
}

// O[r] += sum_j P[j][r] v_j for R rows (p: P[j][r] at p[j * ldp + r]), nk keys, two vectors of the
// head at a time: one FMA chain over the keys per output element.
template <int R>
void AccumulatePV(const float* HWY_RESTRICT p, int32_t ldp, const float* HWY_RESTRICT v, int32_t nk, int32_t d,
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
      const VF x0 = hn::LoadU(df, v + size_t(j) * d + i), x1 = hn::LoadU(df, v + size_t(j) * d + i + N);
      for (int r = 0; r < R; ++r) {
        const VF b = hn::Set(df, p[size_t(j) * ldp + r]);
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
      const VF x0 = hn::LoadU(df, v + size_t(j) * d + i);
      for (int r = 0; r < R; ++r) a0[r] = hn::MulAdd(hn::Set(df, p[size_t(j) * ldp + r]), x0, a0[r]);
    }
    for (int r = 0; r < R; ++r) hn::StoreU(a0[r], df, o + r * ldo + i);
  }
}

void AccumulatePVRows(const float* p, int32_t ldp, const float* v, int32_t nk, int32_t d, int32_t rows,
                      float* o) {
  int32_t r = 0;
  for (; r + 4 <= rows; r += 4) AccumulatePV<4>(p + r, ldp, v, nk, d, o + size_t(r) * d, d);
  switch (rows - r) {
    case 3: AccumulatePV<3>(p + r, ldp, v, nk, d, o + size_t(r) * d, d); break;
    case 2: AccumulatePV<2>(p + r, ldp, v, nk, d, o + size_t(r) * d, d); break;
    case 1: AccumulatePV<1>(p + r, ldp, v, nk, d, o + size_t(r) * d, d); break;
    default: break;
  }
}

// The score tile's scale, soft cap and mask, then the online-softmax update of the rows in
// [r0, r0 + lanes): the tile's probabilities (0 where masked) replace its scores, (m, l, u) advance
// and c gets each row's correction of its earlier outputs (1 where the max did not grow).
// Returns whether any of these rows saw a key in this tile.
template <class D>
bool SoftmaxTile(D df, float* HWY_RESTRICT st, int32_t ldr, int32_t r0, int32_t nk, float cap, bool full,
                 const KeySegment& seg, const int32_t* kpos, bool want_entropy, Scratch& w) {
  const hn::RebindToSigned<D> di;
  const hn::Vec<D> ninf = hn::Set(df, kNegInf);
  const hn::Vec<D> vscale = hn::LoadU(df, w.scale + r0);
  const auto qp = hn::LoadU(di, w.qpos + r0);
  // Lags are differences of int32 positions, so clamping the bounds to int32 keeps the mask.
  const auto lag_lo = hn::Set(di, static_cast<int32_t>(std::clamp<int64_t>(seg.lag_min, INT32_MIN, INT32_MAX)));
  const auto lag_hi = hn::Set(di, static_cast<int32_t>(std::clamp<int64_t>(seg.lag_max, INT32_MIN, INT32_MAX)));
  hn::Vec<D> vmax = ninf;
  for (int32_t j = 0; j < kKeyTile; ++j) {
    float* row = st + size_t(j) * ldr + r0;
    hn::Vec<D> x = ninf;
    if (j < nk) {
      x = hn::Mul(hn::LoadU(df, row), vscale);
      if (cap > 0.0f) x = hn::Mul(hn::Set(df, cap), hn::Tanh(df, hn::Mul(x, hn::Set(df, 1.0f / cap))));
      if (!full) {
        const auto lag = hn::Sub(qp, hn::Set(di, kpos[j]));
        const auto out = hn::Or(hn::Lt(lag, lag_lo), hn::Gt(lag, lag_hi));
        x = hn::IfThenElse(hn::RebindMask(df, out), ninf, x);
      }
    }
    hn::StoreU(x, df, row);
    vmax = hn::Max(vmax, x);
  }
  const auto seen_any = hn::Gt(vmax, ninf);
  if (hn::AllFalse(df, seen_any)) return false;
  const hn::Vec<D> m_old = hn::LoadU(df, w.m + r0);
  const auto grow = hn::Gt(vmax, m_old);
  const hn::Vec<D> m_new = hn::IfThenElse(grow, vmax, m_old);
  const hn::Vec<D> c = hn::IfThenElse(grow, hn::Exp(df, hn::Sub(m_old, m_new)), hn::Set(df, 1.0f));  // 0 on a first key
  hn::Vec<D> l = hn::Mul(hn::LoadU(df, w.l + r0), c);
  hn::Vec<D> u = hn::Mul(hn::LoadU(df, w.u + r0), c);
  for (int32_t j = 0; j < nk; ++j) {
    float* row = st + size_t(j) * ldr + r0;
    const hn::Vec<D> x = hn::LoadU(df, row);
    const auto seen = hn::Gt(x, ninf);
    const hn::Vec<D> p = hn::IfThenElseZero(seen, hn::Exp(df, hn::Sub(x, m_new)));
    l = hn::Add(l, p);
    if (want_entropy) u = hn::MulAdd(p, hn::IfThenElseZero(seen, x), u);
    hn::StoreU(p, df, row);
  }
  for (int32_t j = nk; j < kKeyTile; ++j) hn::StoreU(hn::Zero(df), df, st + size_t(j) * ldr + r0);
  hn::StoreU(m_new, df, w.m + r0);
  hn::StoreU(l, df, w.l + r0);
  hn::StoreU(u, df, w.u + r0);
  hn::StoreU(c, df, w.c + r0);
  return true;
}

// Rows [r0, r1) whose running max grew: their earlier outputs times the correction c.
void RescaleRows(Scratch& w, int32_t r0, int32_t r1, int32_t d) {
  const DF df;
  const int32_t N = static_cast<int32_t>(hn::Lanes(df));
  for (int32_t r = r0; r < r1; ++r) {
    const float c = w.c[r];
    if (c == 1.0f) continue;
    float* o = w.o + size_t(r) * d;
    const VF vc = hn::Set(df, c);
    for (int32_t i = 0; i < d; i += N) hn::StoreU(hn::Mul(hn::LoadU(df, o + i), vc), df, o + i);
  }
}

// Scores and softmax of one head's rows [r0, r0 + N / 2) on half vectors.
bool ScoresAndSoftmaxHalf(const float* qt, int32_t ldr, int32_t r0, const float* k, int32_t d, int32_t nk, float cap,
                 bool full, const KeySegment& seg, const int32_t* kpos, bool want_entropy, Scratch& w) {
  const hn::Half<DF> dh;
  Scores<hn::Half<DF>, 1, 8>(dh, qt, ldr, r0, k, d, w.st);
  return SoftmaxTile(dh, w.st, ldr, r0, nk, cap, full, seg, kpos, want_entropy, w);
}

struct Item {
  const QuerySpan* span;
  int32_t t0, t1;   // query tokens, inside the span
  int32_t g0, g1;   // KV heads
  int32_t q0, q1;   // query heads of each KV head's group (offsets in the group)
};

// Rows of an item: KV head by KV head, each head's rows (tokens x query heads) padded to whole
// vectors, so that a vector of rows never mixes two heads' keys.
struct RowMap {
  int32_t heads, per_head, padded, ldr;
};

inline RowMap MapRows(const Item& it, int32_t lanes) {
  RowMap m;
  m.heads = it.q1 - it.q0;
  m.per_head = (it.t1 - it.t0) * m.heads;
  m.padded = (m.per_head + lanes - 1) / lanes * lanes;
  m.ldr = m.padded * (it.g1 - it.g0);
  return m;
}

void RunItem(const CpuAttentionArgs& a, const Item& it, Scratch& w) {
  const DF df;
  const int32_t N = static_cast<int32_t>(hn::Lanes(df));
  const kv::PagedLayer& pages = a.pages;
  const int32_t d = pages.head_size;
  const int32_t bs = pages.block_size;
  const int32_t group = a.num_q_heads / a.num_kv_heads;
  const RowMap rm = MapRows(it, N);
  const int32_t ldr = rm.ldr;
  const int32_t kv_heads = it.g1 - it.g0;
  const auto kv_indices = a.plan.kv_indices();
  const int32_t* pos_map = a.keys.pos_map().data();
  const VariantParams& vp = a.variant;
  const bool want_entropy = a.outputs.entropy != nullptr;
  auto row_token_head = [&](int32_t r, int32_t* t, int32_t* h) {
    const int32_t gi = r / rm.padded;
    const int32_t local = std::min(r % rm.padded, rm.per_head - 1);
    *t = it.t0 + local / rm.heads;
    *h = (it.g0 + gi) * group + it.q0 + local % rm.heads;
  };

  // Query rows, transposed; padding lanes get zeros and their head's last row's position and scale
  // (they are never read back).
  for (int32_t r = 0; r < ldr; ++r) {
    int32_t t, h;
    row_token_head(r, &t, &h);
    const int32_t q_pos = it.span->pos_begin + (t - it.span->token_begin);
    float* row = w.o;  // o is cleared below; it serves as the conversion buffer here
    if (r % rm.padded < rm.per_head)
      RowToFloat(a.query.At(t, h), a.query.dtype, d, row);
    else
      std::fill_n(row, d, 0.0f);
    for (int32_t i = 0; i < d; ++i) w.qt[size_t(i) * ldr + r] = row[i];
    w.qpos[r] = q_pos;
    float sc = vp.sm_scale;
    if (vp.scale_table)
      sc *= vp.scale_table[static_cast<int64_t>(h) * vp.scale_table_len + std::min(q_pos, vp.scale_table_len - 1)];
    w.scale[r] = sc;
    w.m[r] = kNegInf;
    w.l[r] = 0.0f;
    w.u[r] = 0.0f;
  }
  std::fill_n(w.o, size_t(ldr) * d, 0.0f);
  const int32_t p_lo = it.span->pos_begin + (it.t0 - it.span->token_begin);
  const int32_t p_hi = it.span->pos_begin + (it.t1 - 1 - it.span->token_begin);
  const size_t tile_floats = size_t{kKeyTile} * d;  // one KV head's K (or V) tile

  int32_t kpos[kKeyTile];
  for (int32_t si = it.span->segment_begin; si < it.span->segment_end; ++si) {
    const KeySegment& seg = a.keys.segments()[si];
    int32_t jlo, jhi;
    KeyRange(seg, pos_map, p_lo, p_hi, &jlo, &jhi);
    if (jlo >= jhi) continue;
    // Tiles start at the segment's start whatever the query tile, so each row meets the same tiles.
    jlo = seg.key_begin + (jlo - seg.key_begin) / kKeyTile * kKeyTile;
    for (int32_t j0 = jlo; j0 < jhi; j0 += kKeyTile) {
      const int32_t nk = std::min(kKeyTile, jhi - j0);
      // The tile's rows, per KV head contiguous in fp32, read token by token (all of the item's
      // heads of a token lie side by side in the common layout). fp32 caches are copied too: rows of
      // one KV head lie a token apart, often a multiple of 4 KiB, and would fall in the same L1 sets.
      for (int32_t x = 0; x < nk; ++x) {
        const int32_t j = j0 + x;
        const int32_t block = kv_indices[seg.page_offset + j / bs];
        for (int32_t gi = 0; gi < kv_heads; ++gi) {
          RowToFloat(pages.Row(0, block, j % bs, it.g0 + gi), pages.dtype, d, w.k + gi * tile_floats + size_t(x) * d);
          RowToFloat(pages.Row(1, block, j % bs, it.g0 + gi), pages.dtype, d, w.v + gi * tile_floats + size_t(x) * d);
        }
        kpos[x] = KeyPos(seg, pos_map, j);
      }
      if (nk < kKeyTile)
        for (int32_t gi = 0; gi < kv_heads; ++gi)
          std::fill(w.k + gi * tile_floats + size_t(nk) * d, w.k + (gi + 1) * tile_floats, 0.0f);
      // Every row sees every key of the tile when the extreme lags are inside the bounds.
      const bool full = int64_t{p_lo} - kpos[nk - 1] >= seg.lag_min && int64_t{p_hi} - kpos[0] <= seg.lag_max;
      for (int32_t gi = 0; gi < kv_heads; ++gi) {
        const float* k = w.k + gi * tile_floats;
        const float* v = w.v + gi * tile_floats;
        const int32_t rb = gi * rm.padded, re = rb + rm.padded;
        // A head with at most half a vector of rows (decode at small groups) runs on half vectors:
        // the same per-lane operations, half the work where wide vectors are split (Zen 1).
        const bool half = 2 * rm.per_head <= N && N >= 8;
        if (half) {
          if (!ScoresAndSoftmaxHalf(w.qt, ldr, rb, k, d, nk, vp.logits_soft_cap, full, seg, kpos, want_entropy, w)) continue;
          const int32_t r1 = rb + rm.per_head;
          RescaleRows(w, rb, r1, d);
          AccumulatePVRows(w.st + rb, ldr, v, nk, d, r1 - rb, w.o + size_t(rb) * d);
          continue;
        }
        int32_t r0 = rb;
        for (; r0 + 2 * N <= re; r0 += 2 * N) Scores<DF, 2, 4>(df, w.qt, ldr, r0, k, d, w.st);
        if (r0 < re) Scores<DF, 1, 8>(df, w.qt, ldr, r0, k, d, w.st);
        for (r0 = rb; r0 < re; r0 += N) {
          if (!SoftmaxTile(df, w.st, ldr, r0, nk, vp.logits_soft_cap, full, seg, kpos, want_entropy, w)) continue;
          const int32_t r1 = std::min(rb + rm.per_head, r0 + N);
          RescaleRows(w, r0, r1, d);
          AccumulatePVRows(w.st + r0, ldr, v, nk, d, r1 - r0, w.o + size_t(r0) * d);
        }
      }
    }
  }

  for (int32_t r = 0; r < ldr; ++r) {
    if (r % rm.padded >= rm.per_head) continue;
    int32_t t, h;
    row_token_head(r, &t, &h);
    const float l = w.l[r];
    // A row that saw no key (possible with custom key sets) writes zeros and lse = -inf.
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    void* out = a.outputs.out->At(t, h);
    const float* o = w.o + size_t(r) * d;
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

void RunFast(const CpuAttentionArgs& a) {
  const DF df;
  const int32_t N = static_cast<int32_t>(hn::Lanes(df));
  const auto spans = a.keys.spans();
  if (spans.empty()) return;
  const int32_t group = a.num_q_heads / a.num_kv_heads;
  const int32_t d = a.pages.head_size;
  // Short spans (decode, a few speculative tokens: at most kShortRows rows per KV head) are
  // bandwidth-bound: their items take several KV heads, so each token's K/V rows are read side by
  // side. Long spans are compute-bound: their items take one KV head and up to kMaxRows rows.
  constexpr int32_t kShortRows = 16;
  auto is_short = [&](const QuerySpan& s) { return int64_t{s.token_end - s.token_begin} * group <= kShortRows; };
  int64_t num_short = 0;
  for (const QuerySpan& s : spans) num_short += is_short(s);
  const int32_t threads = a.pool->num_threads();
  if (num_short > 0) {
    const int32_t padded = (kShortRows + N - 1) / N * N;
    int32_t per_item = std::min<int32_t>({a.num_kv_heads, kMaxRows / padded,
                                          static_cast<int32_t>(Scratch::kTileFloats / (size_t{kKeyTile} * d))});
    // Enough items to keep every thread busy (two per thread), at one KV head per item at least.
    while (per_item > 1 && num_short * ((a.num_kv_heads + per_item - 1) / per_item) < 2 * threads) per_item /= 2;
    const int32_t chunks = (a.num_kv_heads + per_item - 1) / per_item;
    a.pool->ParallelForThreads(static_cast<int64_t>(spans.size()) * chunks, 1,
                               [&](int32_t thread, int64_t begin, int64_t end) {
      Scratch w(a.pool->scratch(thread));
      for (int64_t item = begin; item < end; ++item) {
        const QuerySpan& s = spans[static_cast<size_t>(item / chunks)];
        if (!is_short(s) || s.token_begin >= s.token_end) continue;
        Item it;
        it.span = &s;
        it.t0 = s.token_begin;
        it.t1 = s.token_end;
        it.g0 = static_cast<int32_t>(item % chunks) * per_item;
        it.g1 = std::min(a.num_kv_heads, it.g0 + per_item);
        it.q0 = 0;
        it.q1 = group;
        RunItem(a, it, w);
      }
    });
  }
  if (num_short == static_cast<int64_t>(spans.size())) return;
  const Tiling tiling = MakeTiling(group);
  const int64_t per_tile = int64_t{a.num_kv_heads} * tiling.head_chunks;
  // Long spans' items cut the batch's tokens into tiles on one grid (a tile may hold parts of several
  // spans); the last tiles (the most keys under a causal mask) go first.
  const int32_t num_tokens = spans.back().token_end;
  const int64_t tiles = (num_tokens + tiling.tokens_per_item - 1) / tiling.tokens_per_item;
  a.pool->ParallelForThreads(tiles * per_tile, 1, [&](int32_t thread, int64_t begin, int64_t end) {
    Scratch w(a.pool->scratch(thread));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t tile = tiles - 1 - item / per_tile;
      const int32_t g = static_cast<int32_t>(item % per_tile / tiling.head_chunks);
      const int32_t hc = static_cast<int32_t>(item % tiling.head_chunks);
      const int32_t t0 = static_cast<int32_t>(tile) * tiling.tokens_per_item;
      const int32_t t1 = std::min(num_tokens, t0 + tiling.tokens_per_item);
      Item it;
      it.g0 = g;
      it.g1 = g + 1;
      it.q0 = hc * tiling.heads_per_item;
      it.q1 = std::min(group, it.q0 + tiling.heads_per_item);
      // Spans cover the batch's tokens in order (KeySets::Validate): the first one ending past t0.
      auto s = std::upper_bound(spans.begin(), spans.end(), t0,
                                [](int32_t tok, const QuerySpan& sp) { return tok < sp.token_end; });
      for (; s != spans.end() && s->token_begin < t1; ++s) {
        if (is_short(*s)) continue;
        it.span = &*s;
        it.t0 = std::max(t0, s->token_begin);
        it.t1 = std::min(t1, s->token_end);
        if (it.t0 < it.t1) RunItem(a, it, w);
      }
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
