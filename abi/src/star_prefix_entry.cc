// kvp_block_manager_allocate_star (ABI 0.4): Star Attention's context blocks in the prefix cache.
// The conventions of entry_points.cc: Guard, KVP_REQUIRE, ReadOptions for the struct_size-led
// layout, statuses mapped as the other block-manager calls map them.
#include <cstddef>
#include <vector>

#include "fmt/format.h"
#include "internal.h"

using namespace kvplug::abi;
namespace paged = kvplug::paged;

namespace {


}  // namespace

extern "C" {

KVP_API kvp_status kvp_block_manager_allocate_star(kvp_block_manager* manager, uint64_t seq_id,
                                                   const int32_t* token_ids, int64_t num_tokens,
                                                   uint64_t extra_key, const kvp_star_layout* layout,
                                                   uint8_t* out_cached_blocks,
                                                   int64_t* out_num_cached_tokens) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(manager, "manager is NULL");
    KVP_REQUIRE(num_tokens >= 1 && num_tokens <= (int64_t{1} << 31), "num_tokens={} must be in [1, 2^31]",
                num_tokens);
    const bool caching = manager->manager->options().enable_prefix_caching;
    KVP_REQUIRE(token_ids || !caching, "token_ids is NULL but prefix caching is on (num_tokens={})",
                num_tokens);
    kvp_star_layout l{};
    KVP_RETURN_IF_ERROR(ReadOptions(layout, "layout", &l));
    // Every field is ABI 0.4's: no shorter version exists, and a size cutting a field would read
    // part of it.
    constexpr size_t kMinSize = offsetof(kvp_star_layout, anchor_size) + sizeof(int32_t);
    KVP_REQUIRE(layout->struct_size >= kMinSize,
                "layout->struct_size={} must be >= {} (kvp_star_layout has had all its fields since ABI 0.4)",
                layout->struct_size, kMinSize);
    paged::StarLayout star;
    star.context_len = l.context_len;
    star.context_block_size = l.context_block_size;
    star.anchor_size = l.anchor_size;
    // Without prefix caching the ids are not needed: stand in zeros (never read for hashing).
    std::vector<int32_t> zeros;
    absl::Span<const int32_t> ids;
    if (token_ids) {
      ids = absl::Span<const int32_t>(token_ids, static_cast<size_t>(num_tokens));
    } else {
      zeros.assign(static_cast<size_t>(num_tokens), 0);
      ids = zeros;
    }
    auto alloc = manager->manager->AllocateStar(seq_id, ids, extra_key, star);
    if (!alloc.ok()) return BmStatus(alloc.status());
    if (out_cached_blocks) {
      for (size_t i = 0; i < alloc->cached_blocks.size(); ++i) out_cached_blocks[i] = alloc->cached_blocks[i];
    }
    if (out_num_cached_tokens) *out_num_cached_tokens = alloc->num_cached_tokens;
    return KVP_OK;
  });
}

}  // extern "C"
