// Call-sequence fuzzer of the block manager and the KV cache through the C ABI, driven the way an
// engine drives them: the input decodes into pool options and then a sequence of operations with
// arguments (allocate, allocate_star with fuzzed Star layouts, append, mark_computed, fork, free, swap out/in, every query with arbitrary
// capacities, positions and ids, and cache writes/copies with bad indices). Handles are always valid
// (invalid handles are undefined behaviour by the header); everything else is arbitrary.
//
// The harness is the engine: it writes each token's K/V into the real KvCache (a value derived from
// the token id and position, so prefix hits serve identical values), applies copy-on-write copies and
// swap plans, and copies state slots after a fork. After every operation it checks what the ABI lets
// it observe: stats add up (free + cached_free + used == device blocks; used == distinct blocks of
// resident tables; host blocks in use == blocks of swapped sequences; sequence counts), block tables
// have the right length and in-range, unique entries, a failed mutating call changed neither stats
// nor tables, and every computed position of every resident sequence reads back its K/V from the
// cache (so prefix hits, copies and swaps moved the right blocks), and state slots hold their bytes.
// Output buffers are exactly as large as the capacity passed, so ASan sees any write past it.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <set>
#include <vector>

#include "fuzz_input.h"
#include "kvplug/kvplug.h"

namespace {

using kvplug::fuzz::Input;

// The checks run after every operation and are the harness's hot loops: they are left out of the
// coverage instrumentation (which guides the fuzzer through the library, not through the checks).
#if defined(__clang__)
#define KVP_NO_COVERAGE __attribute__((no_sanitize("coverage")))
#else
#define KVP_NO_COVERAGE
#endif

constexpr int32_t kHead = 4;      // head_size of the tiny cache (1 KV head)
constexpr int64_t kStateBytes = 8;

struct Seq {
  std::vector<int32_t> tokens;
  int64_t written = 0;  // K/V of positions [0, written) are in the cache
  bool swapped = false;
  uint8_t state = 0;    // the byte its state slot holds
};

// K (kv = 0) or V (kv = 1) element i of a token at a position, in layer l: small integers, exact in
// bfloat16.
float KvValue(int kv, int32_t l, int32_t token, int64_t pos, int i) {
  return static_cast<float>((static_cast<int64_t>(token) * 7 + pos * 3 + i * 5 + kv * 11 + l * 13) % 241);
}

class Harness {
 public:
  explicit Harness(Input& in) : in_(in) {}
  ~Harness() {
    kvp_kv_cache_destroy(cache_);
    kvp_block_manager_destroy(bm_);
  }

  bool Init(kvp_context* ctx) {
    bs_ = 1 + in_.Below(8);
    blocks_ = 1 + in_.Below(40);
    host_ = in_.Below(20);
    const uint8_t flags = in_.Byte();
    caching_ = flags & 1;
    slots_ = (flags >> 1) % 6;
    layers_ = 1 + ((flags >> 4) & 1);
    const bool bf16 = (flags >> 5) & 1;
    const int32_t layout = (flags >> 6) & 1;
    kv_first_ = layout == KVP_LAYOUT_KV_FIRST;
    kvp_block_manager_options bo{};
    bo.struct_size = sizeof bo;
    bo.block_size = bs_;
    bo.num_device_blocks = blocks_;
    bo.num_host_blocks = host_;
    bo.enable_prefix_caching = caching_;
    bo.watermark = in_.Below(6) / 16.0;
    bo.num_state_slots = slots_;
    bo.hash_seed = in_.Byte();
    if (kvp_block_manager_create(&bo, &bm_) != KVP_OK) return false;
    kvp_kv_cache_options co{};
    co.struct_size = sizeof co;
    co.num_layers = layers_;
    co.num_blocks = blocks_;
    co.block_size = bs_;
    co.num_kv_heads = 1;
    co.head_size = kHead;
    co.dtype = bf16 ? KVP_DTYPE_BFLOAT16 : KVP_DTYPE_FLOAT32;
    co.layout = layout;
    co.num_host_blocks = host_;
    co.num_state_slots = slots_;
    co.state_bytes_per_layer = kStateBytes;
    if (kvp_kv_cache_create(ctx, &co, &cache_) != KVP_OK) return false;
    for (int32_t l = 0; l < layers_; ++l) {
      FUZZ_CHECK(kvp_kv_cache_layer_view(cache_, l, 0, &views_[l]) == KVP_OK);
    }
    return true;
  }

  void Run() {
    for (int op = 0; op < 200 && !in_.empty(); ++op) {
      Step();
      CheckAll();
    }
    for (auto& [id, s] : seqs_) FUZZ_CHECK(kvp_block_manager_free(bm_, id) == KVP_OK);
    seqs_.clear();
    CheckAll();
    const kvp_block_manager_stats st = Stats();
    FUZZ_CHECK(st.num_used_blocks == 0 && st.num_free_host_blocks == host_ && st.num_sequences == 0);
  }

 private:
  // ---- decoding ------------------------------------------------------------------------------
  uint64_t Id() {
    const uint8_t b = in_.Byte();
    if (b < 240) return b % 10;
    static const uint64_t kOdd[] = {~0ull, 1ull << 63, 0xdeadbeefull, 10, 11, 12, 1000, ~0ull - 1};
    return kOdd[b % 8];
  }
  // A prompt: one of three families' shared prefix (prefix hits), then arbitrary tokens.
  std::vector<int32_t> Tokens(int64_t n) {
    std::vector<int32_t> t(static_cast<size_t>(n));
    const int32_t family = in_.Below(3);
    const int64_t shared = in_.Below(static_cast<uint32_t>(n) + 1);
    for (int64_t i = 0; i < n; ++i) t[i] = i < shared ? family * 100 + static_cast<int32_t>(i) : in_.Below(4);
    return t;
  }
  int64_t Count() {
    const uint8_t b = in_.Byte();
    return b < 200 ? 1 + b % 12 : 1 + b % 64;
  }

  // ---- observation ---------------------------------------------------------------------------
  kvp_block_manager_stats Stats() {
    kvp_block_manager_stats st{};
    st.struct_size = sizeof st;
    FUZZ_CHECK(kvp_block_manager_stats_get(bm_, &st) == KVP_OK);
    return st;
  }

  KVP_NO_COVERAGE const std::vector<int32_t>& Table(uint64_t id) {
    table_.resize(256);
    int32_t n = -1;
    FUZZ_CHECK(kvp_block_manager_block_table(bm_, id, table_.data(), 256, &n) == KVP_OK);
    table_.resize(n);
    return table_;
  }

  // Stats and every table: what a failed call must leave unchanged.
  KVP_NO_COVERAGE std::vector<int64_t> Fingerprint() {
    const kvp_block_manager_stats st = Stats();
    std::vector<int64_t> f = {st.num_free_blocks, st.num_cached_free_blocks, st.num_used_blocks,
                              st.num_free_host_blocks, st.num_sequences, st.num_swapped_sequences,
                              st.prefix_queried_blocks, st.prefix_hit_blocks, st.num_evictions};
    for (const auto& [id, s] : seqs_) {
      f.push_back(static_cast<int64_t>(id));
      if (!s.swapped)
        for (int32_t b : Table(id)) f.push_back(b);
    }
    return f;
  }

  // Element i of K (kv = 0) or V of (block, pos) in layer l, read through the layer view.
  KVP_NO_COVERAGE float ReadK(int kv, int32_t l, int32_t block, int64_t pos, int i) const {
    const DLTensor& v = views_[l];
    // KV_FIRST views are [2, blocks, ...], BLOCK_FIRST ones [blocks, 2, ...].
    const int64_t j[5] = {kv_first_ ? kv : block, kv_first_ ? block : kv, pos, 0, i};
    int64_t off = 0;
    for (int d = 0; d < 5; ++d) off += j[d] * v.strides[d];
    const uint8_t* p = static_cast<const uint8_t*>(v.data) + off * (v.dtype.bits / 8);
    if (v.dtype.bits == 32) {
      float f;
      std::memcpy(&f, p, 4);
      return f;
    }
    uint16_t h;
    std::memcpy(&h, p, 2);
    const uint32_t u = uint32_t{h} << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }

  KVP_NO_COVERAGE void CheckAll() {
    const kvp_block_manager_stats st = Stats();
    FUZZ_CHECK(st.num_free_blocks >= 0 && st.num_cached_free_blocks >= 0 && st.num_used_blocks >= 0);
    FUZZ_CHECK(st.num_free_blocks + st.num_cached_free_blocks + st.num_used_blocks == blocks_);
    FUZZ_CHECK(st.num_sequences == static_cast<int32_t>(seqs_.size()));
    std::set<int32_t> used;
    int32_t swapped = 0, host_used = 0;
    for (const auto& [id, s] : seqs_) {
      int64_t n = -1;
      FUZZ_CHECK(kvp_block_manager_num_tokens(bm_, id, &n) == KVP_OK && n == static_cast<int64_t>(s.tokens.size()));
      int32_t sw = -1;
      FUZZ_CHECK(kvp_block_manager_is_swapped(bm_, id, &sw) == KVP_OK && sw == s.swapped);
      const int64_t nb = (n + bs_ - 1) / bs_;
      int32_t slot = -2;
      FUZZ_CHECK(kvp_block_manager_state_slot(bm_, id, &slot) == KVP_OK);
      FUZZ_CHECK(slots_ == 0 ? slot == -1 : (slot >= 0 && slot < slots_));
      if (slots_ > 0) CheckState(slot, s.state);
      if (s.swapped) {
        ++swapped;
        host_used += static_cast<int32_t>(nb);
        continue;
      }
      const auto& table = Table(id);
      FUZZ_CHECK(static_cast<int64_t>(table.size()) == nb);
      std::set<int32_t> mine;
      for (int32_t b : table) {
        FUZZ_CHECK(b >= 0 && b < blocks_);
        FUZZ_CHECK(mine.insert(b).second);
        used.insert(b);
      }
      for (int64_t p = 0; p < s.written; ++p)
        for (int32_t l = 0; l < layers_; ++l)
          for (int kv = 0; kv < 2; ++kv)
            for (int i = 0; i < kHead; ++i)
              FUZZ_CHECK(ReadK(kv, l, table[p / bs_], p % bs_, i) == KvValue(kv, l, s.tokens[p], p, i));
    }
    FUZZ_CHECK(st.num_used_blocks == static_cast<int32_t>(used.size()));
    FUZZ_CHECK(st.num_swapped_sequences == swapped);
    FUZZ_CHECK(st.num_free_host_blocks == host_ - host_used);
  }

  KVP_NO_COVERAGE void CheckState(int32_t slot, uint8_t want) {
    for (int32_t l = 0; l < layers_; ++l) {
      void* p = nullptr;
      int64_t n = 0;
      FUZZ_CHECK(kvp_kv_cache_state(cache_, l, slot, &p, &n) == KVP_OK && n == kStateBytes);
      for (int64_t i = 0; i < n; ++i) FUZZ_CHECK(static_cast<uint8_t*>(p)[i] == want);
    }
  }

  void SetState(uint64_t id, uint8_t value) {
    if (slots_ == 0) return;
    int32_t slot = -1;
    FUZZ_CHECK(kvp_block_manager_state_slot(bm_, id, &slot) == KVP_OK);
    for (int32_t l = 0; l < layers_; ++l) {
      void* p = nullptr;
      int64_t n = 0;
      FUZZ_CHECK(kvp_kv_cache_state(cache_, l, slot, &p, &n) == KVP_OK);
      std::memset(p, value, static_cast<size_t>(n));
    }
    seqs_[id].state = value;
  }

  // ---- the engine's part ---------------------------------------------------------------------
  // Writes K/V of positions [start, end) of `id` through kvp_kv_cache_write at its slot mapping.
  void Write(uint64_t id, int64_t start, int64_t end) {
    Seq& s = seqs_[id];
    if (end <= start) return;
    const int64_t n = end - start;
    std::vector<int64_t> slots(static_cast<size_t>(n));
    FUZZ_CHECK(kvp_block_manager_slot_mapping(bm_, id, start, n, slots.data()) == KVP_OK);
    std::vector<float> k(static_cast<size_t>(n) * kHead), v(k.size());
    int64_t shape[3] = {n, 1, kHead}, slot_shape[1] = {n};
    for (int32_t l = 0; l < layers_; ++l) {
      for (int64_t t = 0; t < n; ++t)
        for (int i = 0; i < kHead; ++i) {
          k[t * kHead + i] = KvValue(0, l, s.tokens[start + t], start + t, i);
          v[t * kHead + i] = KvValue(1, l, s.tokens[start + t], start + t, i);
        }
      DLTensor kt = T(k.data(), {kDLFloat, 32, 1}, shape, 3), vt = T(v.data(), {kDLFloat, 32, 1}, shape, 3);
      DLTensor st = T(slots.data(), {kDLInt, 64, 1}, slot_shape, 1);
      FUZZ_CHECK(kvp_kv_cache_write(cache_, l, &kt, &vt, &st) == KVP_OK);
    }
    s.written = std::max(s.written, end);
  }

  static DLTensor T(void* data, DLDataType dt, int64_t* shape, int32_t ndim) {
    DLTensor t{};
    t.data = data;
    t.device = {kDLCPU, 0};
    t.ndim = ndim;
    t.dtype = dt;
    t.shape = shape;
    return t;
  }

  // Computes (writes and marks) up to `upto` tokens of `id`, never past what is written.
  void Compute(uint64_t id, int64_t upto) {
    Seq& s = seqs_[id];
    upto = std::min<int64_t>(upto, static_cast<int64_t>(s.tokens.size()));
    Write(id, s.written, upto);
    FUZZ_CHECK(kvp_block_manager_mark_computed(bm_, id, upto) == KVP_OK);
  }

  template <class Call>
  kvp_status Mutate(Call call) {
    const auto before = Fingerprint();
    const kvp_status s = call();
    if (s != KVP_OK) FUZZ_CHECK(Fingerprint() == before);
    return s;
  }

  void Step() {
    switch (in_.Below(21)) {
      case 0: {  // can_allocate
        const int64_t n = Count();
        const auto t = Tokens(n);
        kvp_alloc_verdict v;
        const bool with = in_.Bit();
        FUZZ_CHECK(kvp_block_manager_can_allocate(bm_, with ? t.data() : nullptr, n, 0, &v) == KVP_OK);
        FUZZ_CHECK(v == KVP_ALLOC_OK || v == KVP_ALLOC_LATER || v == KVP_ALLOC_NEVER);
        break;
      }
      case 1:
      case 2: {  // allocate, then compute all or part of the prompt
        const uint64_t id = Id();
        const int64_t n = Count();
        const auto t = Tokens(n);
        const uint64_t key = in_.Below(2);
        kvp_alloc_verdict v;
        FUZZ_CHECK(kvp_block_manager_can_allocate(bm_, t.data(), n, key, &v) == KVP_OK);
        int64_t cached = -7;
        const kvp_status s =
            Mutate([&] { return kvp_block_manager_allocate(bm_, id, t.data(), n, key, &cached); });
        if (seqs_.count(id)) {
          FUZZ_CHECK(s == KVP_ERR_ALREADY_EXISTS);
          break;
        }
        if (v == KVP_ALLOC_OK) FUZZ_CHECK(s == KVP_OK);
        if (s != KVP_OK) {
          FUZZ_CHECK(s == KVP_ERR_NO_FREE_BLOCKS && cached == -7);
          break;
        }
        FUZZ_CHECK(cached >= 0 && cached < n && cached % bs_ == 0);
        if (!caching_) FUZZ_CHECK(cached == 0);
        seqs_[id] = Seq{t, cached, false, 0};
        SetState(id, static_cast<uint8_t>(in_.Byte() | 1));
        Compute(id, in_.Bit() ? n : cached + in_.Below(static_cast<uint32_t>(n - cached) + 1));
        break;
      }
      case 3: {  // allocate without token ids: only without prefix caching
        const uint64_t id = Id();
        const int64_t n = Count();
        const kvp_status s = Mutate([&] { return kvp_block_manager_allocate(bm_, id, nullptr, n, 0, nullptr); });
        if (caching_) {
          FUZZ_CHECK(s == KVP_ERR_INVALID_ARGUMENT);
        } else if (s == KVP_OK) {
          FUZZ_CHECK(!seqs_.count(id));
          seqs_[id] = Seq{std::vector<int32_t>(n, 0), 0, false, 0};
          SetState(id, 0x55);
          Compute(id, n);
        }
        break;
      }
      case 4:
      case 5: {  // append (the rest of a prefill first), with copy on write
        const uint64_t id = Id();
        auto it = seqs_.find(id);
        if (it != seqs_.end() && !it->second.swapped && it->second.written < static_cast<int64_t>(it->second.tokens.size())) {
          Compute(id, static_cast<int64_t>(it->second.tokens.size()));
          break;
        }
        const int64_t n = in_.Below(4) ? 1 : Count();
        std::vector<int32_t> t(static_cast<size_t>(n));
        for (auto& x : t) x = in_.Below(4);
        int32_t can = -1;
        const kvp_status cs = kvp_block_manager_can_append(bm_, id, n, &can);
        kvp_block_copy copy{-5, -5};
        int32_t needed = -5;
        const kvp_status s = Mutate([&] { return kvp_block_manager_append(bm_, id, t.data(), n, &copy, &needed); });
        if (it == seqs_.end()) {
          FUZZ_CHECK(s == KVP_ERR_NOT_FOUND && cs == KVP_ERR_NOT_FOUND);
          break;
        }
        if (it->second.swapped) {
          FUZZ_CHECK(s == KVP_ERR_FAILED_PRECONDITION);
          break;
        }
        FUZZ_CHECK(cs == KVP_OK && (s == KVP_OK) == (can == 1));
        if (s != KVP_OK) {
          FUZZ_CHECK(s == KVP_ERR_NO_FREE_BLOCKS && needed == -5);
          break;
        }
        if (needed) {
          FUZZ_CHECK(needed == 1 && copy.src >= 0 && copy.src < blocks_ && copy.dst >= 0 && copy.dst < blocks_);
          FUZZ_CHECK(kvp_kv_cache_copy_blocks(cache_, &copy, 1) == KVP_OK);
        } else {
          FUZZ_CHECK(needed == 0);
        }
        it->second.tokens.insert(it->second.tokens.end(), t.begin(), t.end());
        Compute(id, static_cast<int64_t>(it->second.tokens.size()));
        break;
      }
      case 6: {  // mark_computed: backwards (no-op), within what is written, or out of range
        const uint64_t id = Id();
        auto it = seqs_.find(id);
        const int64_t n = it == seqs_.end() ? 0 : static_cast<int64_t>(it->second.tokens.size());
        const uint8_t how = in_.Below(3);
        const int64_t value = how == 0   ? n + 1 + in_.Below(5)
                              : how == 1 ? -1 - static_cast<int64_t>(in_.Below(3))
                                         : (it == seqs_.end() ? 0 : in_.Below(static_cast<uint32_t>(it->second.written) + 1));
        const kvp_status s = Mutate([&] { return kvp_block_manager_mark_computed(bm_, id, value); });
        if (it == seqs_.end()) FUZZ_CHECK(s == KVP_ERR_NOT_FOUND);
        else if (it->second.swapped) FUZZ_CHECK(s == KVP_ERR_FAILED_PRECONDITION);
        else FUZZ_CHECK((s == KVP_OK) == (how == 2) && (s == KVP_OK || s == KVP_ERR_OUT_OF_RANGE));
        break;
      }
      case 7: {  // fork (of a computed sequence) and copy the state slot
        const uint64_t parent = Id(), child = Id();
        auto it = seqs_.find(parent);
        if (it != seqs_.end() && it->second.written < static_cast<int64_t>(it->second.tokens.size())) break;
        const kvp_status s = Mutate([&] { return kvp_block_manager_fork(bm_, parent, child); });
        if (it == seqs_.end()) {
          FUZZ_CHECK(s == KVP_ERR_NOT_FOUND);
        } else if (it->second.swapped) {
          FUZZ_CHECK(s == KVP_ERR_FAILED_PRECONDITION);
        } else if (seqs_.count(child)) {
          FUZZ_CHECK(s == KVP_ERR_ALREADY_EXISTS);
        } else if (slots_ > 0 && static_cast<int32_t>(seqs_.size()) >= slots_) {
          FUZZ_CHECK(s == KVP_ERR_NO_FREE_BLOCKS);
        } else {
          FUZZ_CHECK(s == KVP_OK);
        }
        if (s != KVP_OK) break;
        seqs_[child] = seqs_[parent];
        if (slots_ > 0) {
          int32_t ps = -1, cs = -1;
          FUZZ_CHECK(kvp_block_manager_state_slot(bm_, parent, &ps) == KVP_OK);
          FUZZ_CHECK(kvp_block_manager_state_slot(bm_, child, &cs) == KVP_OK && cs != ps);
          FUZZ_CHECK(kvp_kv_cache_copy_state(cache_, ps, cs) == KVP_OK);
        }
        break;
      }
      case 8: {  // free
        const uint64_t id = Id();
        const kvp_status s = Mutate([&] { return kvp_block_manager_free(bm_, id); });
        FUZZ_CHECK((s == KVP_OK) == (seqs_.count(id) == 1));
        seqs_.erase(id);
        break;
      }
      case 9: {  // block_table with an arbitrary capacity (an exact-size buffer)
        const uint64_t id = Id();
        const int32_t capacity = in_.Below(24);
        std::vector<int32_t> out(capacity);
        int32_t n = -3;
        const kvp_status s = kvp_block_manager_block_table(bm_, id, capacity ? out.data() : nullptr, capacity, &n);
        auto it = seqs_.find(id);
        if (it == seqs_.end()) {
          FUZZ_CHECK(s == KVP_ERR_NOT_FOUND);
        } else if (it->second.swapped) {
          FUZZ_CHECK(s == KVP_ERR_FAILED_PRECONDITION);
        } else {
          const int64_t need = (static_cast<int64_t>(it->second.tokens.size()) + bs_ - 1) / bs_;
          FUZZ_CHECK(n == need);
          FUZZ_CHECK((s == KVP_OK) == (need <= capacity));
        }
        break;
      }
      case 10: {  // block_tables of several ids, arbitrary width (an exact-size buffer)
        const int32_t num = in_.Below(5);
        const int32_t width = in_.Below(12);
        std::vector<uint64_t> ids(num);
        for (auto& id : ids) id = Id();
        std::vector<int32_t> table(static_cast<size_t>(num) * width, -9), lens(num, -9);
        const kvp_status s = kvp_block_manager_block_tables(bm_, num ? ids.data() : nullptr, num,
                                                            table.empty() ? nullptr : table.data(), width,
                                                            in_.Bit() ? lens.data() : nullptr);
        bool ok = width > 0 && num > 0;
        for (uint64_t id : ids) {
          auto it = seqs_.find(id);
          ok = ok && it != seqs_.end() && !it->second.swapped &&
               (static_cast<int64_t>(it->second.tokens.size()) + bs_ - 1) / bs_ <= width;
        }
        if (s == KVP_OK) {
          FUZZ_CHECK(ok);
          for (int32_t i = 0; i < num; ++i) {
            const auto want = Table(ids[i]);
            for (int32_t j = 0; j < width; ++j)
              FUZZ_CHECK(table[i * width + j] == (j < static_cast<int32_t>(want.size()) ? want[j] : -1));
          }
        } else {
          FUZZ_CHECK(!ok);
          FUZZ_CHECK(std::all_of(table.begin(), table.end(), [](int32_t x) { return x == -9; }));
        }
        break;
      }
      case 11: {  // slot_mapping of arbitrary positions (an exact-size buffer)
        const uint64_t id = Id();
        const int64_t start = static_cast<int64_t>(in_.Below(64)) - 4;
        const int64_t count = in_.Below(64);
        std::vector<int64_t> out(static_cast<size_t>(count), -9);
        const kvp_status s = kvp_block_manager_slot_mapping(bm_, id, start, count, count ? out.data() : nullptr);
        auto it = seqs_.find(id);
        if (s != KVP_OK) {
          FUZZ_CHECK(std::all_of(out.begin(), out.end(), [](int64_t x) { return x == -9; }));
          break;
        }
        FUZZ_CHECK(it != seqs_.end() && !it->second.swapped && start >= 0 &&
                   start + count <= static_cast<int64_t>(it->second.tokens.size()));
        const auto table = Table(id);
        for (int64_t i = 0; i < count; ++i)
          FUZZ_CHECK(out[i] == int64_t{table[(start + i) / bs_]} * bs_ + (start + i) % bs_);
        break;
      }
      case 12:
      case 13: {  // swap out / in with an arbitrary plan capacity; the cache follows the plan
        const bool out = in_.Bit();
        const uint64_t id = Id();
        const int32_t capacity = in_.Below(4) ? 64 : in_.Below(8);
        std::vector<kvp_block_copy> plan(capacity, kvp_block_copy{-9, -9});
        int32_t n = -3;
        const kvp_status s = Mutate([&] {
          return out ? kvp_block_manager_swap_out(bm_, id, capacity ? plan.data() : nullptr, capacity, &n)
                     : kvp_block_manager_swap_in(bm_, id, capacity ? plan.data() : nullptr, capacity, &n);
        });
        auto it = seqs_.find(id);
        if (s != KVP_OK) {
          if (it == seqs_.end()) FUZZ_CHECK(s == KVP_ERR_NOT_FOUND);
          else if (it->second.swapped == out) FUZZ_CHECK(s == KVP_ERR_FAILED_PRECONDITION || s == KVP_ERR_OUT_OF_RANGE);
          break;
        }
        FUZZ_CHECK(it != seqs_.end() && it->second.swapped != out && n <= capacity);
        FUZZ_CHECK(n == static_cast<int32_t>((it->second.tokens.size() + bs_ - 1) / bs_));
        FUZZ_CHECK((out ? kvp_kv_cache_swap_out(cache_, plan.data(), n) : kvp_kv_cache_swap_in(cache_, plan.data(), n)) ==
                   KVP_OK);
        it->second.swapped = out;
        break;
      }
      case 14: {  // copy_blocks: out-of-range indices are refused; a block onto itself changes nothing
        kvp_block_copy c[2];
        const bool bad = in_.Bit();
        const int32_t b = in_.Below(static_cast<uint32_t>(blocks_));
        c[0] = {b, b};
        c[1] = bad ? kvp_block_copy{in_.Bit() ? -1 - static_cast<int32_t>(in_.Below(3)) : b,
                                    blocks_ + static_cast<int32_t>(in_.Below(3))}
                   : c[0];
        const kvp_status s = kvp_kv_cache_copy_blocks(cache_, c, 2);
        FUZZ_CHECK((s == KVP_OK) == !bad);
        const kvp_block_copy host{static_cast<int32_t>(in_.Below(8)), host_ + static_cast<int32_t>(in_.Below(3))};
        FUZZ_CHECK(kvp_kv_cache_swap_out(cache_, &host, 1) == KVP_ERR_OUT_OF_RANGE);
        break;
      }
      case 15: {  // a cache write whose slots are all -1 (skips), or valid slots and one out of range:
                  // refused before anything is written (the content check would see a partial write)
        const int64_t n = 1 + in_.Below(6);
        std::vector<int64_t> slots(static_cast<size_t>(n), -1);
        const bool bad = in_.Bit();
        if (bad) {
          for (auto& x : slots) x = in_.Below(static_cast<uint32_t>(blocks_ * bs_));
          slots[in_.Below(static_cast<uint32_t>(n))] = in_.Bit() ? int64_t{blocks_} * bs_ + in_.Below(4) : -2;
        }
        std::vector<float> k(static_cast<size_t>(n) * kHead, 1000.0f);  // no KvValue is 1000
        int64_t shape[3] = {n, 1, kHead}, slot_shape[1] = {n};
        DLTensor kt = T(k.data(), {kDLFloat, 32, 1}, shape, 3);
        DLTensor st = T(slots.data(), {kDLInt, 64, 1}, slot_shape, 1);
        const kvp_status s = kvp_kv_cache_write(cache_, in_.Below(static_cast<uint32_t>(layers_) + 1), &kt, &kt, &st);
        FUZZ_CHECK(s != KVP_OK || !bad);
        break;
      }
      case 16: {  // queries of unknown or odd ids
        const uint64_t id = Id();
        int64_t n;
        int32_t x;
        const bool known = seqs_.count(id);
        FUZZ_CHECK((kvp_block_manager_num_tokens(bm_, id, &n) == KVP_OK) == known);
        FUZZ_CHECK((kvp_block_manager_is_swapped(bm_, id, &x) == KVP_OK) == known);
        FUZZ_CHECK((kvp_block_manager_state_slot(bm_, id, &x) == KVP_OK) == known);
        break;
      }
      case 17: {  // rewrite the state of a sequence
        const uint64_t id = Id();
        if (seqs_.count(id)) SetState(id, in_.Byte());
        break;
      }
      case 20: {  // allocate_star with a fuzzed layout; hits need not be leading
        const uint64_t id = Id();
        const int64_t n = Count();
        const auto t = Tokens(n);
        const uint64_t key = in_.Below(2);
        kvp_star_layout l{};
        l.struct_size = in_.Below(8) ? sizeof l : in_.Below(sizeof l + 9);
        const uint8_t how = in_.Below(8);  // 0-2: one field drawn from a range with bad values
        l.context_len = how == 0 ? static_cast<int64_t>(in_.Below(80)) - 4
                                 : static_cast<int64_t>(in_.Below(static_cast<uint32_t>(n) + 1));
        l.context_block_size = how == 1 ? static_cast<int32_t>(in_.Below(20)) - 2
                                        : bs_ * static_cast<int32_t>(1 + in_.Below(4));
        l.anchor_size = how == 2 ? static_cast<int32_t>(in_.Below(40)) - 2
                                 : 1 + static_cast<int32_t>(in_.Below(static_cast<uint32_t>(
                                           l.context_block_size > 0 ? l.context_block_size : 1)));
        const bool size_ok = l.struct_size == sizeof l;
        const bool valid = size_ok && l.context_len >= 0 && l.context_len <= n && l.context_block_size > 0 &&
                           l.context_block_size % bs_ == 0 && l.anchor_size >= 1 &&
                           l.anchor_size <= l.context_block_size;
        const int64_t nb = (n + bs_ - 1) / bs_;
        std::vector<uint8_t> cached(static_cast<size_t>(nb), 9);  // exact size: ASan sees overruns
        int64_t num_cached = -7;
        const bool ids = caching_ || in_.Bit();
        const kvp_status s = Mutate([&] {
          return kvp_block_manager_allocate_star(bm_, id, ids ? t.data() : nullptr, n, key, &l,
                                                 in_.Below(4) ? cached.data() : nullptr, &num_cached);
        });
        if (!valid) {
          FUZZ_CHECK(s == (l.struct_size > sizeof l ? KVP_ERR_NOT_SUPPORTED : KVP_ERR_INVALID_ARGUMENT));
        } else if (seqs_.count(id)) {
          FUZZ_CHECK(s == KVP_ERR_ALREADY_EXISTS);
        } else if (s != KVP_OK) {
          FUZZ_CHECK(s == KVP_ERR_NO_FREE_BLOCKS);
        }
        if (s != KVP_OK) {
          FUZZ_CHECK(num_cached == -7 && std::all_of(cached.begin(), cached.end(), [](uint8_t x) { return x == 9; }));
          break;
        }
        FUZZ_CHECK(num_cached >= 0 && num_cached < n && num_cached % bs_ == 0);
        if (!caching_) FUZZ_CHECK(num_cached == 0);
        int64_t leading = 0;
        if (cached[0] != 9) {  // the output was asked for
          int64_t ones = 0;
          for (uint8_t c : cached) {
            FUZZ_CHECK(c == 0 || c == 1);
            ones += c;
          }
          FUZZ_CHECK(ones * bs_ == num_cached);
          FUZZ_CHECK(cached[static_cast<size_t>((n - 1) / bs_)] == 0);  // the last token is computed
          while (leading < nb && cached[static_cast<size_t>(leading)]) ++leading;
          // Every hit block already holds this prompt's K/V (same tokens at the same positions).
          const auto& table = Table(id);
          for (int64_t b = 0; b < nb; ++b) {
            if (!cached[static_cast<size_t>(b)]) continue;
            for (int64_t p = b * bs_; p < (b + 1) * bs_; ++p)
              for (int32_t l2 = 0; l2 < layers_; ++l2)
                FUZZ_CHECK(ReadK(0, l2, table[b], p % bs_, 0) == KvValue(0, l2, t[p], p, 0));
          }
        }
        seqs_[id] = Seq{ids ? t : std::vector<int32_t>(static_cast<size_t>(n), 0), leading * bs_, false, 0};
        SetState(id, static_cast<uint8_t>(in_.Byte() | 1));
        // The engine recomputes from the first missed block on (hits in between are rewritten with
        // the values they hold), all of the prompt or part of it.
        Compute(id, in_.Bit() ? n : leading * bs_ + in_.Below(static_cast<uint32_t>(n - leading * bs_) + 1));
        break;
      }
      default: {  // finish every prefill (an engine step)
        for (auto& [id, s] : seqs_)
          if (!s.swapped) Compute(id, static_cast<int64_t>(s.tokens.size()));
        break;
      }
    }
  }

  Input& in_;
  kvp_block_manager* bm_ = nullptr;
  kvp_kv_cache* cache_ = nullptr;
  DLTensor views_[2]{};
  int32_t bs_ = 1, blocks_ = 1, host_ = 0, slots_ = 0, layers_ = 1;
  bool caching_ = false, kv_first_ = true;
  std::vector<int32_t> table_;  // Table()'s buffer
  std::map<uint64_t, Seq> seqs_;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static kvp_context* ctx = [] {
    kvp_context_options o{};
    o.struct_size = sizeof o;
    o.num_threads = 1;
    kvp_context* c = nullptr;
    FUZZ_CHECK(kvp_context_create(&o, &c) == KVP_OK);
    return c;
  }();
  Input in(data, size);
  Harness h(in);
  if (!h.Init(ctx)) return 0;
  h.Run();
  return 0;
}
