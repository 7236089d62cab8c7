// kvp_block_manager_allocate_star (ABI 0.4) through the loaded library: argument checks with their
// messages, the cached-block output, and that a failing call writes no output and changes nothing.
#include <dlfcn.h>

#include <numeric>
#include <vector>

#include "abi_harness.h"

namespace {

// kvplug_dl.h's table predates ABI 0.4: the new entry point is looked up by name.
struct StarApi {
  kvp_status (*kvp_block_manager_allocate_star)(kvp_block_manager*, uint64_t, const int32_t*, int64_t,
                                                uint64_t, const kvp_star_layout*, uint8_t*,
                                                int64_t*) = nullptr;
};
StarApi star_api;

class StarPrefixAbi : public LoadedAbi {
 protected:
  void SetUp() override {
    LoadedAbi::SetUp();
    void* lib = dlopen(std::getenv("KVP_LIBRARY"), RTLD_NOW | RTLD_LOCAL);
    ASSERT_NE(lib, nullptr) << dlerror();
    star_api.kvp_block_manager_allocate_star = reinterpret_cast<decltype(star_api.kvp_block_manager_allocate_star)>(
        dlsym(lib, "kvp_block_manager_allocate_star"));
    ASSERT_NE(star_api.kvp_block_manager_allocate_star, nullptr) << "kvp_block_manager_allocate_star not exported";
  }

  Handle<kvp_block_manager> Manager(int32_t caching, int32_t blocks = 32) {
    kvp_block_manager_options o{};
    o.struct_size = sizeof o;
    o.block_size = 4;
    o.num_device_blocks = blocks;
    o.enable_prefix_caching = caching;
    kvp_block_manager* m = nullptr;
    EXPECT_EQ(api.kvp_block_manager_create(&o, &m), KVP_OK) << api.kvp_last_error();
    return Handle<kvp_block_manager>(m);
  }

  static kvp_star_layout Layout(int64_t context_len, int32_t cbs = 8, int32_t anchor = 4) {
    kvp_star_layout l{};
    l.struct_size = sizeof l;
    l.context_len = context_len;
    l.context_block_size = cbs;
    l.anchor_size = anchor;
    return l;
  }

  static std::vector<int32_t> Doc(int32_t block1_first) {
    std::vector<int32_t> t(29);
    std::iota(t.begin(), t.begin() + 8, 100);
    std::iota(t.begin() + 8, t.begin() + 16, block1_first);
    std::iota(t.begin() + 16, t.begin() + 24, 300);
    std::iota(t.begin() + 24, t.end(), 900);
    return t;
  }

  static kvp_block_manager_stats Stats(kvp_block_manager* m) {
    kvp_block_manager_stats st{};
    st.struct_size = sizeof st;
    EXPECT_EQ(api.kvp_block_manager_stats_get(m, &st), KVP_OK);
    return st;
  }
};

TEST_F(StarPrefixAbi, ReportsNonLeadingCachedBlocks) {
  auto m = Manager(1);
  const auto a = Doc(200), b = Doc(250);
  const kvp_star_layout l = Layout(24);
  std::vector<uint8_t> cached(8, 9);
  int64_t n = -1;
  EXPECT_KVP(star_api.kvp_block_manager_allocate_star(m.get(), 1, a.data(), 29, 0, &l, cached.data(), &n), KVP_OK);
  EXPECT_EQ(cached, std::vector<uint8_t>(8, 0));
  EXPECT_EQ(n, 0);
  ASSERT_OK(api.kvp_block_manager_mark_computed(m.get(), 1, 29));
  EXPECT_KVP(star_api.kvp_block_manager_allocate_star(m.get(), 2, b.data(), 29, 0, &l, cached.data(), &n), KVP_OK);
  EXPECT_EQ(cached, (std::vector<uint8_t>{1, 1, 0, 0, 1, 1, 0, 0}));
  EXPECT_EQ(n, 16);
  EXPECT_EQ(Stats(m.get()).prefix_hit_blocks, 4);
  // Outputs are optional.
  EXPECT_KVP(star_api.kvp_block_manager_allocate_star(m.get(), 3, b.data(), 29, 0, &l, nullptr, nullptr), KVP_OK);
  // The block tables agree with the report: hit pages are the first document's blocks.
  std::vector<int32_t> t1(8), t2(8);
  int32_t len = 0;
  ASSERT_OK(api.kvp_block_manager_block_table(m.get(), 1, t1.data(), 8, &len));
  ASSERT_OK(api.kvp_block_manager_block_table(m.get(), 2, t2.data(), 8, &len));
  for (int i : {0, 1, 4, 5}) EXPECT_EQ(t1[i], t2[i]) << i;
  // Normal keys never hit Star pages.
  int64_t normal = -1;
  ASSERT_OK(api.kvp_block_manager_allocate(m.get(), 4, a.data(), 29, 0, &normal));
  EXPECT_EQ(normal, 0);
}

TEST_F(StarPrefixAbi, ArgumentErrorsNameTheArgumentAndChangeNothing) {
  auto m = Manager(1);
  const auto a = Doc(200);
  kvp_star_layout l = Layout(24);
  std::vector<uint8_t> cached(8, 9);
  int64_t n = -1;
  auto call = [&](kvp_block_manager* mm, const int32_t* ids, int64_t num, const kvp_star_layout* lay) {
    return star_api.kvp_block_manager_allocate_star(mm, 5, ids, num, 0, lay, cached.data(), &n);
  };
  EXPECT_KVP(star_api.kvp_block_manager_allocate_star(nullptr, 5, a.data(), 29, 0, &l, cached.data(), &n),
             KVP_ERR_INVALID_ARGUMENT, "manager is NULL");
  EXPECT_KVP(star_api.kvp_block_manager_allocate_star(m.get(), 5, a.data(), 29, 0, nullptr, cached.data(), &n),
             KVP_ERR_INVALID_ARGUMENT, "layout is NULL");
  EXPECT_KVP(star_api.kvp_block_manager_allocate_star(m.get(), 5, nullptr, 29, 0, &l, cached.data(), &n),
             KVP_ERR_INVALID_ARGUMENT, "token_ids is NULL", "prefix caching is on");
  EXPECT_KVP(star_api.kvp_block_manager_allocate_star(m.get(), 5, a.data(), 0, 0, &l, cached.data(), &n),
             KVP_ERR_INVALID_ARGUMENT, "num_tokens=0");
  l.struct_size = 0;
  EXPECT_KVP(star_api.kvp_block_manager_allocate_star(m.get(), 5, a.data(), 29, 0, &l, cached.data(), &n),
             KVP_ERR_INVALID_ARGUMENT, "layout->struct_size=0");
  l.struct_size = sizeof l - 2;  // cuts anchor_size
  EXPECT_KVP(star_api.kvp_block_manager_allocate_star(m.get(), 5, a.data(), 29, 0, &l, cached.data(), &n),
             KVP_ERR_INVALID_ARGUMENT, "layout->struct_size=22 must be >= 24");
  l.struct_size = sizeof l + 8;
  EXPECT_KVP(star_api.kvp_block_manager_allocate_star(m.get(), 5, a.data(), 29, 0, &l, cached.data(), &n),
             KVP_ERR_NOT_SUPPORTED, "layout->struct_size=");
  l = Layout(24, 6);
  EXPECT_KVP(star_api.kvp_block_manager_allocate_star(m.get(), 5, a.data(), 29, 0, &l, cached.data(), &n),
             KVP_ERR_INVALID_ARGUMENT, "seq 5", "context_block_size=6", "block_size=4");
  l = Layout(30);
  EXPECT_KVP(star_api.kvp_block_manager_allocate_star(m.get(), 5, a.data(), 29, 0, &l, cached.data(), &n),
             KVP_ERR_INVALID_ARGUMENT, "context_len=30", "num_tokens=29");
  l = Layout(24, 8, 9);
  EXPECT_KVP(star_api.kvp_block_manager_allocate_star(m.get(), 5, a.data(), 29, 0, &l, cached.data(), &n),
             KVP_ERR_INVALID_ARGUMENT, "anchor_size=9");
  // A pool too small: NO_FREE_BLOCKS, as kvp_block_manager_allocate reports it.
  auto small = Manager(1, 4);
  l = Layout(24);
  EXPECT_KVP(call(small.get(), a.data(), 29, &l), KVP_ERR_NO_FREE_BLOCKS);
  EXPECT_EQ(cached, std::vector<uint8_t>(8, 9));
  EXPECT_EQ(n, -1);
  const auto st = Stats(m.get());
  EXPECT_EQ(st.num_sequences, 0);
  EXPECT_EQ(st.num_used_blocks, 0);
  EXPECT_EQ(st.prefix_queried_blocks, 0);
  // Duplicate id.
  EXPECT_KVP(call(m.get(), a.data(), 29, &l), KVP_OK);
  EXPECT_KVP(star_api.kvp_block_manager_allocate_star(m.get(), 5, a.data(), 29, 0, &l, nullptr, nullptr),
             KVP_ERR_ALREADY_EXISTS, "seq 5");
}

TEST_F(StarPrefixAbi, WithoutCachingTokenIdsAreOptional) {
  auto m = Manager(0);
  const kvp_star_layout l = Layout(8);
  std::vector<uint8_t> cached(3, 9);
  int64_t n = -1;
  EXPECT_KVP(star_api.kvp_block_manager_allocate_star(m.get(), 1, nullptr, 10, 0, &l, cached.data(), &n), KVP_OK);
  EXPECT_EQ(cached, std::vector<uint8_t>(3, 0));
  EXPECT_EQ(n, 0);
  int64_t num = 0;
  ASSERT_OK(api.kvp_block_manager_num_tokens(m.get(), 1, &num));
  EXPECT_EQ(num, 10);
}

}  // namespace
