#include <string>

#include "fmt/format.h"
#include "internal.h"

namespace kvplug::abi {
namespace {
thread_local std::string last_error;
thread_local const char* current_function = "kvplug";
}  // namespace

void SetCurrentFunction(const char* function) { current_function = function; }

kvp_status Fail(kvp_status status, std::string_view message) {
  try {
    last_error = fmt::format("{}: {}", current_function, message);
  } catch (...) {
    last_error.clear();  // formatting itself ran out of memory; the status still says what failed
  }
  return status;
}

kvp_status FromStatus(const absl::Status& s, kvp_status exhausted) {
  if (s.ok()) return KVP_OK;
  kvp_status code;
  switch (s.code()) {
    case absl::StatusCode::kInvalidArgument: code = KVP_ERR_INVALID_ARGUMENT; break;
    case absl::StatusCode::kResourceExhausted: code = exhausted; break;
    case absl::StatusCode::kUnimplemented: code = KVP_ERR_NOT_SUPPORTED; break;
    case absl::StatusCode::kOutOfRange: code = KVP_ERR_OUT_OF_RANGE; break;
    case absl::StatusCode::kNotFound: code = KVP_ERR_NOT_FOUND; break;
    case absl::StatusCode::kAlreadyExists: code = KVP_ERR_ALREADY_EXISTS; break;
    case absl::StatusCode::kFailedPrecondition: code = KVP_ERR_FAILED_PRECONDITION; break;
    default: code = KVP_ERR_INTERNAL; break;
  }
  return Fail(code, std::string(s.message()));
}

std::string SizeMessage(const char* name, size_t given, size_t known) {
  return fmt::format("{}->struct_size={} but this library knows sizes from {} to {} (ABI {}.{})", name,
                     given, sizeof(size_t), known, KVP_ABI_VERSION_MAJOR, KVP_ABI_VERSION_MINOR);
}

}  // namespace kvplug::abi

extern "C" {

KVP_API const char* kvp_last_error(void) { return kvplug::abi::last_error.c_str(); }

KVP_API const char* kvp_status_string(kvp_status status) {
  switch (status) {
    case KVP_OK: return "KVP_OK";
    case KVP_ERR_INVALID_ARGUMENT: return "KVP_ERR_INVALID_ARGUMENT";
    case KVP_ERR_OUT_OF_MEMORY: return "KVP_ERR_OUT_OF_MEMORY";
    case KVP_ERR_NOT_SUPPORTED: return "KVP_ERR_NOT_SUPPORTED";
    case KVP_ERR_OUT_OF_RANGE: return "KVP_ERR_OUT_OF_RANGE";
    case KVP_ERR_INTERNAL: return "KVP_ERR_INTERNAL";
    case KVP_ERR_INVALID_CONFIG: return "KVP_ERR_INVALID_CONFIG";
    case KVP_ERR_NOT_FOUND: return "KVP_ERR_NOT_FOUND";
    case KVP_ERR_ALREADY_EXISTS: return "KVP_ERR_ALREADY_EXISTS";
    case KVP_ERR_NO_FREE_BLOCKS: return "KVP_ERR_NO_FREE_BLOCKS";
    case KVP_ERR_FAILED_PRECONDITION: return "KVP_ERR_FAILED_PRECONDITION";
    case KVP_ERR_DEVICE: return "KVP_ERR_DEVICE";
  }
  return "KVP_UNKNOWN_STATUS";
}

}  // extern "C"
