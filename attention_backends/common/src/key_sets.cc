#include "kvplug/attention/key_sets.h"

#include <algorithm>

#include "fmt/format.h"

namespace kvplug::attn {

KeySets::KeySets(const KeySetBounds& b)
    : bounds_(b),
      spans_(static_cast<size_t>(b.max_spans)),
      segments_(static_cast<size_t>(b.max_segments)),
      pos_map_(static_cast<size_t>(b.max_pos_map)) {}

void KeySets::Clear() {
  num_spans_ = num_segments_ = num_pos_map_ = 0;
  max_span_tokens_ = 0;
}

bool KeySets::AddSpan(const QuerySpan& span, absl::Span<const KeySegment> segments) {
  if (num_spans_ + 1 > spans_.size() || num_segments_ + segments.size() > segments_.size() ||
      static_cast<int64_t>(segments.size()) > bounds_.max_segments_per_span)
    return false;
  QuerySpan s = span;
  s.segment_begin = static_cast<int32_t>(num_segments_);
  s.segment_end = static_cast<int32_t>(num_segments_ + segments.size());
  std::copy(segments.begin(), segments.end(), segments_.begin() + num_segments_);
  num_segments_ += segments.size();
  spans_[num_spans_++] = s;
  max_span_tokens_ = std::max(max_span_tokens_, s.token_end - s.token_begin);
  return true;
}

int32_t KeySets::AddPositions(absl::Span<const int32_t> positions) {
  if (num_pos_map_ + positions.size() > pos_map_.size()) return -1;
  const auto offset = static_cast<int32_t>(num_pos_map_);
  std::copy(positions.begin(), positions.end(), pos_map_.begin() + num_pos_map_);
  num_pos_map_ += positions.size();
  return offset;
}

absl::Status KeySets::Validate(const BatchPlan& plan) const {
  const auto qsl = plan.query_start_loc();
  const auto indptr = plan.kv_indptr();
  const int32_t bs = plan.block_size();
  int32_t covered = 0;  // spans cover the tokens of every sequence with queries, in order, once
  for (size_t i = 0; i < num_spans_; ++i) {
    const QuerySpan& s = spans_[i];
    if (s.token_begin != covered)
      return absl::InternalError(fmt::format("key set: span {} starts at token {}, expected {}", i, s.token_begin,
                                             covered));
    covered = s.token_end;
    if (s.seq < 0 || s.seq >= plan.num_seqs())
      return absl::InternalError(fmt::format("key set: span {} names sequence {} of {}", i, s.seq, plan.num_seqs()));
    const int32_t q0 = qsl[s.seq], q1 = qsl[s.seq + 1];
    if (s.token_begin < q0 || s.token_end > q1 || s.token_begin >= s.token_end)
      return absl::InternalError(fmt::format("key set: span {} tokens [{}, {}) outside sequence {}'s [{}, {})", i,
                                             s.token_begin, s.token_end, s.seq, q0, q1));
    // Positions only drive masks and the scale table's clamped index: any non-negative run is safe.
    if (s.pos_begin < 0 || s.pos_begin > (1 << 30))
      return absl::InternalError(fmt::format("key set: span {} starts at position {}", i, s.pos_begin));
    for (int32_t j = s.segment_begin; j < s.segment_end; ++j) {
      const KeySegment& g = segments_[j];
      if (g.key_begin < 0 || g.key_end < g.key_begin || g.lag_min < 0 || g.lag_max < g.lag_min)
        return absl::InternalError(fmt::format("key set: segment {} keys [{}, {}) lags [{}, {}] are invalid", j,
                                               g.key_begin, g.key_end, g.lag_min, g.lag_max));
      if (g.key_end == g.key_begin) continue;
      const int64_t last_page = g.page_offset + static_cast<int64_t>(g.key_end - 1) / bs;
      if (g.page_offset < indptr[s.seq] || last_page >= indptr[s.seq + 1])
        return absl::InternalError(fmt::format(
            "key set: segment {} reads pages [{}, {}] outside sequence {}'s [{}, {})", j, g.page_offset, last_page,
            s.seq, indptr[s.seq], indptr[s.seq + 1]));
      if (g.pos_map >= 0 && static_cast<size_t>(g.pos_map) + (g.key_end - g.key_begin) > num_pos_map_)
        return absl::InternalError(fmt::format("key set: segment {} position map [{}, +{}) past {} entries", j,
                                               g.pos_map, g.key_end - g.key_begin, num_pos_map_));
    }
  }
  if (covered != plan.num_tokens())
    return absl::InternalError(fmt::format("key set: spans cover {} of {} tokens", covered, plan.num_tokens()));
  return absl::OkStatus();
}

std::string CausalPlanner::Key() const { return fmt::format("causal/w{}", window_left_); }

KeySetBounds CausalPlanner::Bounds(const PlanCapacity& c) const {
  return {c.max_num_seqs, c.max_num_seqs, 0, 1};
}

absl::Status CausalPlanner::Build(const BatchPlan& plan, KeySets* out) const {
  out->Clear();
  const auto qsl = plan.query_start_loc();
  for (int32_t b = 0; b < plan.num_seqs(); ++b) {
    const int32_t q_len = qsl[b + 1] - qsl[b];
    if (q_len == 0) continue;
    const int32_t len = plan.seq_lens()[b];
    const KeySegment all{plan.kv_indptr()[b], 0, len, 0, -1, 0,
                         window_left_ >= 0 ? window_left_ : kUnboundedLag};
    const QuerySpan span{b, qsl[b], qsl[b + 1], plan.query_pos_start(b), 0, 0};
    if (!out->AddSpan(span, {&all, 1}))
      return absl::InternalError("causal planner: key set bounds exceeded");
  }
  return absl::OkStatus();
}

}  // namespace kvplug::attn
