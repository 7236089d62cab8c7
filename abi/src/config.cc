// Backend configs: FlatBuffers binary (verified before it is read) or JSON parsed against the schema
// compiled into the library, then translated once into the plain C++ config of the backend.
#include <algorithm>
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

// The schema nests at most 3 levels (the root object, a backend's table, a vector): anything deeper
// is refused before a parser recurses into it.
constexpr flatbuffers::uoffset_t kMaxConfigDepth = 16;
constexpr flatbuffers::uoffset_t kMaxConfigTables = 1024;

// The deepest nesting of '{' and '[' in a JSON config, outside strings and comments (FlatBuffers'
// JSON: "..." or '...' strings with backslash escapes, // and /* */ comments). Stops counting once
// past the limit. FlatBuffers' own parser bounds its recursion too (FLATBUFFERS_MAX_PARSING_DEPTH);
// this check does not depend on the version or build of the library it links.
size_t JsonNestingDepth(std::string_view text, size_t limit) {
  size_t depth = 0, deepest = 0;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (c == '"' || c == '\'') {
      for (++i; i < text.size() && text[i] != c; ++i)
        if (text[i] == '\\') ++i;
    } else if (c == '/' && i + 1 < text.size() && text[i + 1] == '/') {
      while (i < text.size() && text[i] != '\n') ++i;
    } else if (c == '/' && i + 1 < text.size() && text[i + 1] == '*') {
      const size_t end = text.find("*/", i + 2);
      i = end == std::string_view::npos ? text.size() : end + 1;
    } else if (c == '{' || c == '[') {
      deepest = std::max(deepest, ++depth);
      if (deepest > limit) return deepest;
    } else if ((c == '}' || c == ']') && depth > 0) {
      --depth;
    }
  }
  return deepest;
}

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
      attn::StarConfig s{c->context_block_size(), c->anchor_block_size(), c->num_shards(), c->shard_rank(),
                         c->append_shard()};
      if (s.context_block_size <= 0 || s.anchor_block_size <= 0)
        return Invalid(fmt::format("StarConfig: context_block_size={} and anchor_block_size={} must be > 0",
                                   s.context_block_size, s.anchor_block_size));
      if (s.anchor_block_size > s.context_block_size)
        return Invalid(fmt::format("StarConfig: anchor_block_size={} must be <= context_block_size={} (the "
                                   "anchor lies inside block 0)", s.anchor_block_size, s.context_block_size));
      if (s.num_shards < 1 || s.num_shards > 1024)
        return Invalid(fmt::format("StarConfig: num_shards={} must be in [1, 1024]", s.num_shards));
      if (s.shard_rank < 0 || s.shard_rank >= s.num_shards)
        return Invalid(fmt::format("StarConfig: shard_rank={} must be in [0, num_shards={})", s.shard_rank,
                                   s.num_shards));
      if (s.append_shard < -1 || s.append_shard >= s.num_shards)
        return Invalid(fmt::format("StarConfig: append_shard={} must be -1 (the last) or in [0, num_shards={})",
                                   s.append_shard, s.num_shards));
      if (s.append_shard == -1) s.append_shard = s.num_shards - 1;
      *out = s;
      return KVP_OK;
    }
    case BackendConfig::AttambaConfig: {
      const auto* c = config.backend_config_as_AttambaConfig();
      attn::AttambaConfig a;
      a.chunk_size = c->chunk_size();
      a.window = c->window();
      a.state_size = c->state_size();
      a.conv_width = c->conv_width();
      a.layer_index = c->layer_index();
      a.num_layers = c->num_layers();
      a.chunk_offsets = static_cast<attn::ChunkOffsets>(static_cast<int32_t>(c->chunk_offsets()));
      a.ssm_heads = c->ssm_heads();
      a.ssm_head_dim = c->ssm_head_dim();
      a.ssm_groups = c->ssm_groups();
      a.norm_eps = c->norm_eps();
      if (absl::Status s = attn::ValidateParsedConfig(a); !s.ok())
        return Invalid(fmt::format("AttambaConfig: {}", std::string(s.message())));
      *out = a;
      return KVP_OK;
    }
    case BackendConfig::KvShiftConfig: {
      const auto* c = config.backend_config_as_KvShiftConfig();
      attn::KvShiftConfig k{ToVector(c->alpha_k()), ToVector(c->alpha_v())};
      // The lengths need num_kv_heads: checked when the attention is created.
      for (const auto& [name, values] : {std::pair<const char*, const std::vector<float>*>{"alpha_k", &k.alpha_k},
                                         std::pair<const char*, const std::vector<float>*>{"alpha_v", &k.alpha_v}}) {
        if (values->size() % 2 != 0)
          return Invalid(fmt::format("KvShiftConfig.{} has {} values: it must hold 2 per KV head (current, previous)",
                                     name, values->size()));
        for (size_t i = 0; i < values->size(); ++i)
          if (!std::isfinite((*values)[i]))
            return Invalid(fmt::format("KvShiftConfig.{}[{}]={} must be finite", name, i, (*values)[i]));
      }
      k.rope_theta = c->rope_theta();
      k.rotary_dim = c->rotary_dim();
      const int rope_style = static_cast<int>(c->rope_style());
      if (!std::isfinite(k.rope_theta) || k.rope_theta < 0.0f)
        return Invalid(fmt::format("KvShiftConfig.rope_theta={} must be finite and >= 0 (0: no RoPE)", k.rope_theta));
      if (k.rotary_dim < 0 || k.rotary_dim % 2 != 0)
        return Invalid(fmt::format("KvShiftConfig.rotary_dim={} must be 0 (head_size) or even and > 0", k.rotary_dim));
      if (rope_style != 0 && rope_style != 1)
        return Invalid(fmt::format("KvShiftConfig.rope_style={} must be NeoX (0) or GPTJ (1)", rope_style));
      k.rope_style = static_cast<attn::RopeStyle>(rope_style);
      *out = std::move(k);
      return KVP_OK;
    }
    case BackendConfig::EntropyConfig: {
      const auto* c = config.backend_config_as_EntropyConfig();
      attn::EntropyConfig e{ToVector(c->temperature()), c->collect_entropy()};
      for (size_t i = 0; i < e.temperature.size(); ++i)
        if (!std::isfinite(e.temperature[i]) || e.temperature[i] <= 0)
          return Invalid(fmt::format("EntropyConfig.temperature[{}]={}; every temperature must be finite and > 0", i,
                                     e.temperature[i]));
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
  // Depth and table count bounded explicitly (the schema nests root table -> union table -> vector:
  // depth 3, two tables), so a hostile buffer cannot make the verifier recurse or loop without end.
  flatbuffers::Verifier verifier(data, size, /*max_depth=*/kMaxConfigDepth, /*max_tables=*/kMaxConfigTables);
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
      if (JsonNestingDepth(text, kMaxConfigDepth) > kMaxConfigDepth)
        return Invalid(fmt::format("JSON config nests objects and arrays more than {} levels deep (the schema "
                                   "needs 3)", kMaxConfigDepth));
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
