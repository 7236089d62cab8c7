#include "kvplug/attention/batch_plan.h"

#include <algorithm>

#include <tuple>

#include "fmt/format.h"
#include "kvplug/kv_cache/alloc_hook.h"
#include "kvplug/kv_cache/cuda_kernels.h"

namespace kvplug::attn {
namespace {
absl::Status Bad(std::string msg) { return absl::InvalidArgumentError(std::move(msg)); }
// Positions stay far from int32 overflow in the engines' arithmetic (p + window, p - k).
constexpr int64_t kMaxPosition = int64_t{1} << 30;
}  // namespace

absl::Status BatchPlan::ValidateCapacity(const PlanCapacity& c) {
  if (c.max_num_seqs <= 0 || c.max_num_tokens <= 0 || c.max_num_blocks <= 0)
    return Bad(fmt::format("plan capacities must be > 0: max_num_seqs={} max_num_tokens={} max_num_blocks={}",
                           c.max_num_seqs, c.max_num_tokens, c.max_num_blocks));
  if (c.max_num_seqs > (1 << 24) || c.max_num_tokens > (1 << 28) || c.max_num_blocks > (1 << 28))
    return Bad(fmt::format("plan capacities too large: max_num_seqs={} (<= 2^24) max_num_tokens={} (<= 2^28) "
                           "max_num_blocks={} (<= 2^28)", c.max_num_seqs, c.max_num_tokens, c.max_num_blocks));
  return absl::OkStatus();
}

BatchPlan::BatchPlan(const PlanCapacity& c)
    : capacity_(c),
      query_start_loc_(c.max_num_seqs + 1),
      seq_lens_(c.max_num_seqs),
      context_lens_(c.max_num_seqs),
      query_pos_starts_(c.max_num_seqs),
      kv_indptr_(c.max_num_seqs + 1),
      kv_indices_(c.max_num_blocks),
      token_seq_(c.max_num_tokens),
      slot_mapping_(c.max_num_tokens),
      state_slots_(c.max_num_seqs) {}

struct BatchPlan::DeviceMirror {
  void* query_start_loc = nullptr;
  void* seq_lens = nullptr;
  void* kv_indptr = nullptr;
  void* kv_indices = nullptr;
  void* slot_mapping = nullptr;
  void* token_seq = nullptr;
  void* state_slots = nullptr;
  void* query_pos_starts = nullptr;
};

void BatchPlan::DeviceMirrorDeleter::operator()(DeviceMirror* m) const {
  for (void* p : {m->query_start_loc, m->seq_lens, m->kv_indptr, m->kv_indices, m->slot_mapping, m->token_seq,
                  m->state_slots, m->query_pos_starts})
    kv::cuda::DeviceFree(p);
  delete m;
}

absl::Status BatchPlan::EnableDevice(int32_t device_id) {
  std::unique_ptr<DeviceMirror, DeviceMirrorDeleter> m(new DeviceMirror);
  const std::pair<void**, int64_t> buffers[] = {
      {&m->query_start_loc, (capacity_.max_num_seqs + 1) * 4LL},
      {&m->seq_lens, capacity_.max_num_seqs * 4LL},
      {&m->kv_indptr, (capacity_.max_num_seqs + 1) * 4LL},
      {&m->kv_indices, capacity_.max_num_blocks * 4LL},
      {&m->slot_mapping, capacity_.max_num_tokens * 8LL},
      {&m->token_seq, capacity_.max_num_tokens * 4LL},
      {&m->state_slots, capacity_.max_num_seqs * 4LL},
      {&m->query_pos_starts, capacity_.max_num_seqs * 4LL}};
  for (const auto& [ptr, bytes] : buffers) {
    if (ShouldFailAllocation())
      return absl::ResourceExhaustedError(fmt::format("plan: allocating {} device bytes failed (injected)", bytes));
    if (const int e = kv::cuda::DeviceAlloc(ptr, bytes, device_id); e != 0)
      return absl::ResourceExhaustedError(
          fmt::format("plan: allocating {} device bytes failed: {}", bytes, kv::cuda::ErrorString(e)));
  }
  device_ = std::move(m);
  return absl::OkStatus();
}

const int32_t* BatchPlan::device_query_start_loc() const { return device_ ? static_cast<const int32_t*>(device_->query_start_loc) : nullptr; }
const int32_t* BatchPlan::device_seq_lens() const { return device_ ? static_cast<const int32_t*>(device_->seq_lens) : nullptr; }
const int32_t* BatchPlan::device_kv_indptr() const { return device_ ? static_cast<const int32_t*>(device_->kv_indptr) : nullptr; }
const int32_t* BatchPlan::device_kv_indices() const { return device_ ? static_cast<const int32_t*>(device_->kv_indices) : nullptr; }
const int64_t* BatchPlan::device_slot_mapping() const { return device_ ? static_cast<const int64_t*>(device_->slot_mapping) : nullptr; }
const int32_t* BatchPlan::device_token_seq() const { return device_ ? static_cast<const int32_t*>(device_->token_seq) : nullptr; }
const int32_t* BatchPlan::device_state_slots() const { return device_ ? static_cast<const int32_t*>(device_->state_slots) : nullptr; }
const int32_t* BatchPlan::device_query_pos_starts() const { return device_ ? static_cast<const int32_t*>(device_->query_pos_starts) : nullptr; }

absl::Status BatchPlan::Upload(void* stream) {
  // From the plan's own host vectors: pageable memory, so the copies are staged before these calls
  // return and the next Update may overwrite the vectors safely.
  const std::tuple<void*, const void*, int64_t> copies[] = {
      {device_->query_start_loc, query_start_loc_.data(), (num_seqs_ + 1) * 4LL},
      {device_->seq_lens, seq_lens_.data(), num_seqs_ * 4LL},
      {device_->kv_indptr, kv_indptr_.data(), (num_seqs_ + 1) * 4LL},
      {device_->kv_indices, kv_indices_.data(), kv_indptr_[num_seqs_] * 4LL},
      {device_->slot_mapping, slot_mapping_.data(), has_slot_mapping_ ? num_tokens_ * 8LL : 0},
      {device_->token_seq, token_seq_.data(), num_tokens_ * 4LL},
      {device_->state_slots, state_slots_.data(), has_state_slots_ ? num_seqs_ * 4LL : 0},
      {device_->query_pos_starts, query_pos_starts_.data(), has_query_pos_starts_ ? num_seqs_ * 4LL : 0}};
  for (const auto& [dst, src, bytes] : copies) {
    if (bytes == 0) continue;
    if (const int e = kv::cuda::MemcpyAsync(dst, src, bytes, stream); e != 0)
      return absl::InternalError(fmt::format("plan upload of {} bytes: {}", bytes, kv::cuda::ErrorString(e)));
  }
  return absl::OkStatus();
}

absl::Status BatchPlan::Update(const BatchInput& in, void* stream) {
  ++generation_;
  absl::Status s = Fill(in);
  if (s.ok() && device_) s = Upload(stream);
  if (!s.ok()) {
    num_seqs_ = 0;
    num_tokens_ = 0;
    kv_indptr_[0] = 0;
  }
  return s;
}

absl::Status BatchPlan::Fill(const BatchInput& in) {
  num_seqs_ = 0;
  const int32_t b_count = in.num_seqs;
  if (b_count <= 0 || b_count > capacity_.max_num_seqs)
    return absl::OutOfRangeError(
        fmt::format("num_seqs={} must be in [1, {}] (the plan's max_num_seqs)", b_count, capacity_.max_num_seqs));
  if (in.block_size <= 0 || in.block_size > 65536)
    return Bad(fmt::format("block_size={} must be in [1, 65536]", in.block_size));
  if (!in.query_start_loc) return Bad("query_start_loc is NULL");
  if (!in.seq_lens) return Bad("seq_lens is NULL");
  const bool dense = in.block_table != nullptr;
  if (!dense && (!in.kv_indptr || !in.kv_indices))
    return Bad("no block table: set block_table, or kv_indptr and kv_indices");
  if (dense && in.block_table_stride <= 0)
    return Bad(fmt::format("block_table_stride={} must be > 0", in.block_table_stride));
  if (in.query_start_loc[0] != 0)
    return Bad(fmt::format("query_start_loc[0]={} must be 0", in.query_start_loc[0]));

  int64_t blocks = 0;
  int32_t max_block = -1;
  int32_t max_len = 0;
  int32_t max_q = 0;
  for (int32_t b = 0; b < b_count; ++b) {
    const int32_t q0 = in.query_start_loc[b], q1 = in.query_start_loc[b + 1];
    if (q1 < q0)
      return Bad(fmt::format("query_start_loc must be non-decreasing: [{}]={} > [{}]={}", b, q0, b + 1, q1));
    if (q1 > capacity_.max_num_tokens)
      return absl::OutOfRangeError(fmt::format("query_start_loc[{}]={} exceeds the plan's max_num_tokens={}",
                                               b + 1, q1, capacity_.max_num_tokens));
    const int32_t len = in.seq_lens[b];
    if (len < 0) return Bad(fmt::format("seq_lens[{}]={} must be >= 0", b, len));
    if (in.query_pos_starts) {
      // Explicit positions: a shard may hold fewer keys than the step has query tokens.
      const int32_t p0 = in.query_pos_starts[b];
      if (p0 < 0 || static_cast<int64_t>(p0) + (q1 - q0) > kMaxPosition)
        return Bad(fmt::format("query_pos_starts[{}]={} must be in [0, {}] for its {} tokens", b, p0,
                               kMaxPosition - (q1 - q0), q1 - q0));
      query_pos_starts_[b] = p0;
    } else if (len < q1 - q0) {
      return Bad(fmt::format("seq_lens[{}]={} is shorter than its {} query tokens", b, len, q1 - q0));
    }
    if (in.context_lens) {
      if (in.context_lens[b] < 0 || in.context_lens[b] > kMaxPosition)
        return Bad(fmt::format("context_lens[{}]={} must be in [0, {}]", b, in.context_lens[b], kMaxPosition));
      context_lens_[b] = in.context_lens[b];
    }
    const int64_t need = (static_cast<int64_t>(len) + in.block_size - 1) / in.block_size;
    const int32_t* row;
    if (dense) {
      if (need > in.block_table_stride)
        return Bad(fmt::format("seq_lens[{}]={} needs {} blocks of {} but block_table_stride={}", b, len, need,
                               in.block_size, in.block_table_stride));
      row = in.block_table + static_cast<int64_t>(b) * in.block_table_stride;
    } else {
      const int32_t i0 = in.kv_indptr[b], i1 = in.kv_indptr[b + 1];
      if (b == 0 && i0 != 0) return Bad(fmt::format("kv_indptr[0]={} must be 0", i0));
      if (i1 < i0 || i1 - i0 < need)
        return Bad(fmt::format("kv_indptr[{}..{}]=({}, {}) gives {} blocks; seq_lens[{}]={} needs {}", b, b + 1,
                               i0, i1, static_cast<int64_t>(i1) - i0, b, len, need));
      row = in.kv_indices + i0;
    }
    if (blocks + need > capacity_.max_num_blocks)
      return absl::OutOfRangeError(fmt::format("the batch references more than the plan's max_num_blocks={}",
                                               capacity_.max_num_blocks));
    for (int64_t j = 0; j < need; ++j) {
      if (row[j] < 0)
        return Bad(fmt::format("sequence {}: block {} has id {} < 0", b, j, row[j]));
      max_block = std::max(max_block, row[j]);
      kv_indices_[blocks + j] = row[j];
    }
    query_start_loc_[b] = q0;
    seq_lens_[b] = len;
    kv_indptr_[b] = static_cast<int32_t>(blocks);
    for (int32_t t = q0; t < q1; ++t) token_seq_[t] = b;
    blocks += need;
    max_len = std::max(max_len, len);
    max_q = std::max(max_q, q1 - q0);
  }
  const int32_t num_tokens = in.query_start_loc[b_count];
  query_start_loc_[b_count] = num_tokens;
  kv_indptr_[b_count] = static_cast<int32_t>(blocks);

  has_context_lens_ = in.context_lens != nullptr;
  has_query_pos_starts_ = in.query_pos_starts != nullptr;
  has_slot_mapping_ = in.slot_mapping != nullptr;
  if (has_slot_mapping_) {
    for (int32_t t = 0; t < num_tokens; ++t) {
      if (in.slot_mapping[t] < -1)
        return Bad(fmt::format("slot_mapping[{}]={} must be >= -1", t, in.slot_mapping[t]));
      slot_mapping_[t] = in.slot_mapping[t];
    }
  }
  has_state_slots_ = in.state_slots != nullptr;
  max_state_slot_ = -1;
  if (has_state_slots_) {
    for (int32_t b = 0; b < b_count; ++b) {
      if (in.state_slots[b] < 0) return Bad(fmt::format("state_slots[{}]={} must be >= 0", b, in.state_slots[b]));
      state_slots_[b] = in.state_slots[b];
      max_state_slot_ = std::max(max_state_slot_, in.state_slots[b]);
    }
  }
  block_size_ = in.block_size;
  max_block_id_ = max_block;
  max_seq_len_ = max_len;
  max_q_len_ = max_q;
  num_tokens_ = num_tokens;
  num_seqs_ = b_count;
  return absl::OkStatus();
}

}  // namespace kvplug::attn
