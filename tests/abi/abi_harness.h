// What every ABI test executable shares: the library loaded once through dlopen (from KVP_LIBRARY,
// as CTest sets it) and the helpers that check a failing call's status and message. Each test file
// is its own executable, so these live in an anonymous namespace.
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
#include <initializer_list>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "kvplug/kvplug_dl.h"

namespace {

kvp_api api;

::testing::AssertionResult LoadLibrary() {
  static bool loaded = false;
  if (loaded) return ::testing::AssertionSuccess();
  const char* path = std::getenv("KVP_LIBRARY");
  if (!path || !*path)
    return ::testing::AssertionFailure()
           << "KVP_LIBRARY is not set: it must name libkvplug.so (CTest sets it; run through ctest or "
              "export KVP_LIBRARY=/path/to/libkvplug.so)";
  char error[1024] = {};
  if (kvp_api_load(&api, path, error, sizeof error) != 0)
    return ::testing::AssertionFailure() << "kvp_api_load failed: " << error;
  loaded = true;
  return ::testing::AssertionSuccess();
}

// Owning handles: destroyed through the loaded library.
struct Deleter {
  void operator()(kvp_context* p) const { api.kvp_context_destroy(p); }
  void operator()(kvp_block_manager* p) const { api.kvp_block_manager_destroy(p); }
  void operator()(kvp_kv_cache* p) const { api.kvp_kv_cache_destroy(p); }
  void operator()(kvp_plan* p) const { api.kvp_plan_destroy(p); }
  void operator()(kvp_attention* p) const { api.kvp_attention_destroy(p); }
};
template <class T>
using Handle = std::unique_ptr<T, Deleter>;

// DLPack dtypes the tests pass.
[[maybe_unused]] constexpr DLDataType kF32{kDLFloat, 32, 1};
[[maybe_unused]] constexpr DLDataType kF64{kDLFloat, 64, 1};
[[maybe_unused]] constexpr DLDataType kBF16{kDLBfloat, 16, 1};
[[maybe_unused]] constexpr DLDataType kI32{kDLInt, 32, 1};
[[maybe_unused]] constexpr DLDataType kI64{kDLInt, 64, 1};

// A DLTensor over memory the test owns. Not copyable: the DLTensor points into shape/strides.
struct Tensor {
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // empty: compact row-major (NULL)
  DLTensor t{};
  Tensor(void* data, DLDataType dtype, std::vector<int64_t> s, std::vector<int64_t> st = {})
      : shape(std::move(s)), strides(std::move(st)) {
    t.data = data;
    t.device = DLDevice{kDLCPU, 0};
    t.ndim = static_cast<int32_t>(shape.size());
    t.dtype = dtype;
    t.shape = shape.data();
    t.strides = strides.empty() ? nullptr : strides.data();
    t.byte_offset = 0;
  }
  Tensor(const Tensor&) = delete;
  Tensor& operator=(const Tensor&) = delete;
  DLTensor* p() { return &t; }
};

// A fixture that loads the library before each test.
class LoadedAbi : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_TRUE(LoadLibrary()); }
};

[[maybe_unused]] std::string Name(kvp_status s) { return api.kvp_status_string(s); }

// A failure whose message no call under test produces: set before each checked call so that a
// call that fails without recording its own message is caught.
[[maybe_unused]] constexpr const char* kMarker = "kvp_backend_name: index=-424242";
[[maybe_unused]] void SetMarker() {
  const char* name = nullptr;
  (void)api.kvp_backend_name(-424242, &name);
}

// The entry point a checked expression calls: "api.kvp_x(...)" -> "kvp_x".
[[maybe_unused]] std::string EntryPoint(std::string_view expr) {
  const size_t at = expr.find("api.kvp_");
  if (at == std::string_view::npos) return "";
  const size_t begin = at + 4;
  return std::string(expr.substr(begin, expr.find('(', begin) - begin));
}

[[maybe_unused]] void CheckStatus(kvp_status got, kvp_status want, const char* expr, const char* file, int line,
                 std::initializer_list<std::string_view> parts) {
  const std::string msg = api.kvp_last_error();
  if (got != want) {
    ADD_FAILURE_AT(file, line) << expr << " returned " << Name(got) << ", expected " << Name(want)
                               << "; kvp_last_error: \"" << msg << "\"";
    return;
  }
  if (want == KVP_OK) return;
  if (msg.empty() || msg.find(kMarker) != std::string::npos) {
    ADD_FAILURE_AT(file, line) << expr << " failed without recording a message (\"" << msg << "\")";
    return;
  }
  const std::string fn = EntryPoint(expr);
  if (!fn.empty() && msg.rfind(fn + ":", 0) != 0)
    ADD_FAILURE_AT(file, line) << expr << ": message \"" << msg << "\" does not start with \"" << fn << ":\"";
  for (std::string_view p : parts)
    if (msg.find(p) == std::string::npos)
      ADD_FAILURE_AT(file, line) << expr << ": message \"" << msg << "\" lacks \"" << p << "\"";
}

// EXPECT_KVP(call, status, "substring", ...): the exact status, and on failure a fresh message that
// starts with the entry point's name and holds every substring.
#define EXPECT_KVP(expr, want, ...)                                               \
  do {                                                                            \
    SetMarker();                                                                  \
    const kvp_status got_ = (expr);                                               \
    CheckStatus(got_, (want), #expr, __FILE__, __LINE__, {__VA_ARGS__});          \
  } while (0)

#define ASSERT_OK(expr)                                                                     \
  do {                                                                                      \
    const kvp_status s_ = (expr);                                                           \
    ASSERT_EQ(s_, KVP_OK) << #expr << ": " << Name(s_) << ": " << api.kvp_last_error();     \
  } while (0)

// A CPU context with `num_threads` workers.
[[maybe_unused]] Handle<kvp_context> MakeContext(int32_t num_threads = 2) {
  kvp_context_options o{};
  o.struct_size = sizeof o;
  o.device_type = kDLCPU;
  o.num_threads = num_threads;
  kvp_context* c = nullptr;
  EXPECT_KVP(api.kvp_context_create(&o, &c), KVP_OK);
  return Handle<kvp_context>(c);
}

}  // namespace
