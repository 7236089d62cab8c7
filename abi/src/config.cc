// Backend configs: FlatBuffers binary (verified before it is read) or JSON parsed against the schema
// compiled into the library, then translated once into the plain C++ config of the backend.
#include <cmath>
#include <cstring>
#include <vector>

#include "flatbuffers/idl.h"
#include "fmt/format.h"
#include "internal.h"
#include "kvplug_config_generated.h"

#if defined(__SANITIZE_ADDRESS__)
#define KVP_LSAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(leak_sanitizer)
#define KVP_LSAN 1
#endif
#endif
#ifdef KVP_LSAN
#include <sanitizer/lsan_interface.h>
#endif

namespace kvplug::abi {
extern const char kConfigSchema[];

namespace {

using fb::BackendConfig;

struct BackendConfigName {
  std::string_view backend;
  BackendConfig type;
};
constexpr BackendConfigName kConfigTypes[] = {
    {"dense", BackendConfig::DenseConfig},     {"star", BackendConfig::StarConfig},
    {"attamba", BackendConfig::AttambaConfig}, {"kv_shift", BackendConfig::KvShiftConfig},
    {"entropy", BackendConfig::EntropyConfig},
};

kvp_status Invalid(std::string msg) { return Fail(KVP_ERR_INVALID_CONFIG, msg); }

std::vector<float> ToVector(const flatbuffers::Vector<float>* v) {
  return v ? std::vector<float>(v->begin(), v->end()) : std::vector<float>();
}

kvp_status Translate(const fb::AttentionConfig& config, std::string_view backend, attn::BackendConfig* out) {
  const BackendConfig type = config.backend_config_type();
  if (type == BackendConfig::NONE) {
    *out = std::monostate{};
    return KVP_OK;
  }
  BackendConfig want = BackendConfig::NONE;
  for (const auto& n : kConfigTypes)
    if (n.backend == backend) want = n.type;
  if (type != want)
    return Invalid(fmt::format("config holds a {} but backend '{}' takes a {}", fb::EnumNameBackendConfig(type),
                               backend, fb::EnumNameBackendConfig(want)));
  // The verifier accepts a union type without its table; the accessors below would read through NULL.
  if (!config.backend_config())
    return Invalid(fmt::format("config names a {} but holds no backend_config table", fb::EnumNameBackendConfig(type)));
  switch (type) {
    case BackendConfig::DenseConfig: {
      const auto* c = config.backend_config_as_DenseConfig();
      attn::DenseConfig d{c->window_left(), c->logits_soft_cap()};
      if (!std::isfinite(d.logits_soft_cap) || d.logits_soft_cap < 0)
        return Invalid(fmt::format("DenseConfig.logits_soft_cap={} must be finite and >= 0", d.logits_soft_cap));
      *out = d;
      return KVP_OK;
    }
    case BackendConfig::StarConfig: {
      const auto* c = config.backend_config_as_StarConfig();
      attn::StarConfig s{c->context_block_size(), c->anchor_block_size()};
      if (s.context_block_size <= 0 || s.anchor_block_size <= 0)
        return Invalid(fmt::format("StarConfig: context_block_size={} and anchor_block_size={} must be > 0",
                                   s.context_block_size, s.anchor_block_size));
      *out = s;
      return KVP_OK;
    }
    case BackendConfig::AttambaConfig: {
      const auto* c = config.backend_config_as_AttambaConfig();
      attn::AttambaConfig a{c->chunk_size(), c->window(), c->state_size(), c->conv_width()};
      if (a.chunk_size <= 0 || a.window < 0 || a.state_size <= 0 || a.conv_width <= 0)
        return Invalid(fmt::format("AttambaConfig: chunk_size={} (> 0), window={} (>= 0), state_size={} (> 0), "
                                   "conv_width={} (> 0)", a.chunk_size, a.window, a.state_size, a.conv_width));
      *out = a;
      return KVP_OK;
    }
    case BackendConfig::KvShiftConfig: {
      const auto* c = config.backend_config_as_KvShiftConfig();
      attn::KvShiftConfig k{ToVector(c->alpha_k()), ToVector(c->alpha_v())};
      for (float x : k.alpha_k) if (!std::isfinite(x)) return Invalid("KvShiftConfig.alpha_k holds a non-finite value");
      for (float x : k.alpha_v) if (!std::isfinite(x)) return Invalid("KvShiftConfig.alpha_v holds a non-finite value");
      *out = std::move(k);
      return KVP_OK;
    }
    case BackendConfig::EntropyConfig: {
      const auto* c = config.backend_config_as_EntropyConfig();
      attn::EntropyConfig e{ToVector(c->temperature()), c->collect_entropy()};
      for (float x : e.temperature)
        if (!std::isfinite(x) || x <= 0) return Invalid(fmt::format("EntropyConfig.temperature holds {}; must be > 0", x));
      *out = std::move(e);
      return KVP_OK;
    }
    default:
      return Invalid(fmt::format("unknown config type {}", static_cast<int>(type)));
  }
}

kvp_status FromBinary(const uint8_t* data, size_t size, std::string_view backend, attn::BackendConfig* out) {
  if (size < 8 || size > (size_t{1} << 30))
    return Invalid(fmt::format("binary config of {} bytes: too short or too long", size));
  // FlatBuffers reads scalars in place and assumes an aligned buffer (its verifier checks offsets
  // relative to the buffer's start): a buffer the caller did not align to 8 bytes is copied into one
  // that is (configs are small and read once), so no misaligned load happens wherever it lies.
  std::vector<uint64_t> aligned;
  if (reinterpret_cast<uintptr_t>(data) % alignof(uint64_t) != 0) {
    aligned.resize((size + 7) / 8);
    std::memcpy(aligned.data(), data, size);
    data = reinterpret_cast<const uint8_t*>(aligned.data());
  }
  if (!fb::AttentionConfigBufferHasIdentifier(data))
    return Invalid(fmt::format("binary config lacks the file identifier \"{}\" (finish the buffer with it)",
                               fb::AttentionConfigIdentifier()));
  flatbuffers::Verifier verifier(data, size);
  if (!fb::VerifyAttentionConfigBuffer(verifier))
    return Invalid(fmt::format("binary config of {} bytes fails FlatBuffers verification", size));
  return Translate(*fb::GetAttentionConfig(data), backend, out);
}

}  // namespace

kvp_status ParseConfig(std::string_view backend, int32_t format, const void* data, size_t size,
                       attn::BackendConfig* out) {
  switch (format) {
    case KVP_CONFIG_NONE:
      *out = std::monostate{};
      return KVP_OK;
    case KVP_CONFIG_BINARY:
      if (!data) return Fail(KVP_ERR_INVALID_ARGUMENT, "config is NULL with config_format=KVP_CONFIG_BINARY");
      return FromBinary(static_cast<const uint8_t*>(data), size, backend, out);
    case KVP_CONFIG_JSON: {
      if (!data) return Fail(KVP_ERR_INVALID_ARGUMENT, "config is NULL with config_format=KVP_CONFIG_JSON");
      if (size > (size_t{1} << 24)) return Invalid(fmt::format("JSON config of {} bytes is too long", size));
      const std::string text(static_cast<const char*>(data), size);
      if (text.find('\0') != std::string::npos)
        return Invalid("JSON config contains a NUL byte before config_size");
      // Parsers are not shared between threads: a fresh one per call (configs are not on a hot path).
      flatbuffers::IDLOptions options;
      options.strict_json = false;
      auto parser = std::make_unique<flatbuffers::Parser>(options);
      try {
        if (!parser->Parse(kConfigSchema))
          return Fail(KVP_ERR_INTERNAL, "the built-in schema does not parse: " + parser->error_);
        if (!parser->ParseJson(text.c_str()))
          return Invalid("JSON config does not match the schema: " + parser->error_);
      } catch (...) {
        // FlatBuffers' parser is not exception-safe (2.0.8: a std::bad_alloc while it defines the
        // schema's enums leaves an enum value owned twice, and its destructor frees it twice). After
        // an exception it is leaked, not destroyed: memory lost on an out-of-memory path, not a crash.
        flatbuffers::Parser* leaked = parser.release();
#ifdef KVP_LSAN
        __lsan_ignore_object(leaked);
#endif
        (void)leaked;
        throw;
      }
      return FromBinary(parser->builder_.GetBufferPointer(), parser->builder_.GetSize(), backend, out);
    }
    default:
      return Fail(KVP_ERR_INVALID_ARGUMENT,
                  fmt::format("config_format={} is not a kvp_config_format (0, 1, 2)", format));
  }
}

}  // namespace kvplug::abi
