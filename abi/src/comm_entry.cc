// kvp_comm_* (ABI 0.4): communicators for Star Attention's phase 2. The conventions of
// entry_points.cc: Guard, KVP_REQUIRE, ReadOptions for the struct_size-led options, the DLTensor
// checks of dlpack_check.cc; the C++ communicator (attention/communicator.h) does the work.
#include <cstring>
#include <memory>

#include "fmt/format.h"
#include "fmt/ranges.h"
#include "internal.h"
#include "kvplug/attention/communicator.h"
#include "kvplug/kv_cache/device.h"

using kvplug::DType;
using kvplug::Device;
using kvplug::TensorView;
using namespace kvplug::abi;
namespace attn = kvplug::attn;
namespace kv = kvplug::kv;

// A communicator and the context it runs on (its device, its stream at each call, its CPU pool).
struct kvp_comm {
  const kvp_context* context = nullptr;
  std::unique_ptr<attn::Communicator> impl;
};

namespace {

// The communicator reports a failed CUDA or NCCL call as Unavailable: KVP_ERR_DEVICE here.
kvp_status CommStatus(const absl::Status& s) {
  if (s.code() == absl::StatusCode::kUnavailable) return Fail(KVP_ERR_DEVICE, std::string(s.message()));
  return FromStatus(s, KVP_ERR_OUT_OF_MEMORY);
}

// Compact row-major, as the header requires (axes of extent 1 may have any stride).
kvp_status CheckContiguous(const TensorView& v, const char* name) {
  int64_t stride = 1;
  for (int d = v.ndim - 1; d >= 0; --d) {
    KVP_REQUIRE(v.shape[d] <= 1 || v.strides[d] == stride,
                "{}: not contiguous: strides[{}]={} but a compact [{}] tensor has {}", name, d, v.strides[d],
                fmt::join(v.shape.begin(), v.shape.begin() + v.ndim, ", "), stride);
    stride *= v.shape[d];
  }
  return KVP_OK;
}

}  // namespace

extern "C" {

KVP_API kvp_status kvp_comm_nccl_unique_id(uint8_t* out_id) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(out_id, "out_id is NULL");
    return CommStatus(attn::NcclGetUniqueId(out_id));
  });
}

KVP_API kvp_status kvp_comm_create(const kvp_context* context, const kvp_comm_options* options,
                                   kvp_comm** out_comm) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(context, "context is NULL");
    KVP_REQUIRE(out_comm, "out_comm is NULL");
    *out_comm = nullptr;
    kvp_comm_options o{};
    KVP_RETURN_IF_ERROR(ReadOptions(options, "options", &o));
    KVP_REQUIRE(o.kind == KVP_COMM_IN_PROCESS || o.kind == KVP_COMM_NCCL,
                "options->kind={} is not KVP_COMM_IN_PROCESS (1) or KVP_COMM_NCCL (2)", o.kind);
    KVP_REQUIRE(o.num_ranks >= 1 && o.num_ranks <= attn::kMaxCommRanks, "options->num_ranks={} must be in [1, {}]",
                o.num_ranks, attn::kMaxCommRanks);
    if (o.kind == KVP_COMM_IN_PROCESS)
      KVP_REQUIRE(o.rank == 0, "options->rank={} must be 0 for KVP_COMM_IN_PROCESS (one handle serves every rank)",
                  o.rank);
    else
      KVP_REQUIRE(o.rank >= 0 && o.rank < o.num_ranks, "options->rank={} must be in [0, num_ranks={})", o.rank,
                  o.num_ranks);
    KVP_REQUIRE(o.max_num_tokens > 0, "options->max_num_tokens={} must be > 0", o.max_num_tokens);
    KVP_REQUIRE(o.num_heads > 0, "options->num_heads={} must be > 0", o.num_heads);
    KVP_REQUIRE(o.head_size > 0, "options->head_size={} must be > 0", o.head_size);
    KVP_REQUIRE(o.out_dtype == KVP_DTYPE_FLOAT32 || o.out_dtype == KVP_DTYPE_FLOAT16 ||
                    o.out_dtype == KVP_DTYPE_BFLOAT16,
                "options->out_dtype={} must be KVP_DTYPE_FLOAT32 (0), KVP_DTYPE_FLOAT16 (1) or KVP_DTYPE_BFLOAT16 (2)",
                o.out_dtype);
    KVP_REQUIRE(o.validate_each_call == 0 || o.validate_each_call == 1, "options->validate_each_call={} must be 0 or 1",
                o.validate_each_call);

    attn::CommOptions c;
    c.kind = static_cast<attn::CommKind>(o.kind);
    c.num_ranks = o.num_ranks;
    c.rank = o.rank;
    c.max_num_tokens = o.max_num_tokens;
    c.num_heads = o.num_heads;
    c.head_size = o.head_size;
    c.out_dtype = static_cast<DType>(o.out_dtype);
    c.validate_each_call = o.validate_each_call == 1;
    if (o.kind == KVP_COMM_NCCL) {
      if (!kv::BuiltWithCuda())
        return Fail(KVP_ERR_NOT_SUPPORTED, "options->kind=KVP_COMM_NCCL but this library was built without CUDA");
      if (context->exec.device != Device::kCuda)
        return Fail(KVP_ERR_NOT_SUPPORTED,
                    "options->kind=KVP_COMM_NCCL needs a CUDA context, and this context is on the CPU (use "
                    "KVP_COMM_IN_PROCESS there)");
      KVP_REQUIRE(o.nccl_unique_id, "options->nccl_unique_id is NULL (KVP_COMM_NCCL needs the {} bytes of "
                  "kvp_comm_nccl_unique_id)", KVP_NCCL_UNIQUE_ID_BYTES);
      std::memcpy(c.nccl_unique_id.data(), o.nccl_unique_id, attn::kNcclUniqueIdBytes);
    }
    auto comm = std::make_unique<kvp_comm>();
    comm->context = context;
    auto impl = o.kind == KVP_COMM_NCCL ? attn::CreateNcclCommunicator(c, context->exec)
                                        : attn::CreateInProcessCommunicator(c, context->exec);
    if (!impl.ok()) return CommStatus(impl.status());
    comm->impl = std::move(*impl);
    *out_comm = comm.release();
    return KVP_OK;
  });
}

KVP_API void kvp_comm_destroy(kvp_comm* comm) { delete comm; }

KVP_API kvp_status kvp_comm_merge_attention(kvp_comm* comm, int32_t rank, DLTensor* out, DLTensor* lse) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(comm, "comm is NULL");
    const attn::CommOptions& c = comm->impl->options();
    KVP_REQUIRE(rank >= 0 && rank < c.num_ranks, "rank={} must be in [0, num_ranks={})", rank, c.num_ranks);
    KVP_REQUIRE(out, "out is NULL");
    KVP_REQUIRE(lse, "lse is NULL (merging needs each partial's lse: float32 [T, H])");
    TensorView o, l;
    KVP_RETURN_IF_ERROR(ToTensorView(out, "out", comm->context, 3, &o));
    KVP_RETURN_IF_ERROR(ToTensorView(lse, "lse", comm->context, 2, &l));
    KVP_REQUIRE(o.dtype == c.out_dtype, "out: dtype {} is not the communicator's out_dtype {}",
                kvplug::DTypeName(o.dtype), kvplug::DTypeName(c.out_dtype));
    KVP_REQUIRE(l.dtype == DType::kF32, "lse: dtype {} must be float32", kvplug::DTypeName(l.dtype));
    KVP_REQUIRE(o.shape[1] == c.num_heads && o.shape[2] == c.head_size,
                "out: shape [{}, {}, {}] but the communicator has num_heads={} and head_size={}", o.shape[0],
                o.shape[1], o.shape[2], c.num_heads, c.head_size);
    KVP_REQUIRE(o.shape[0] <= c.max_num_tokens, "out: T={} tokens exceed the communicator's max_num_tokens={}",
                o.shape[0], c.max_num_tokens);
    KVP_REQUIRE(l.shape[0] == o.shape[0] && l.shape[1] == c.num_heads, "lse: shape [{}, {}] is not [T={}, H={}]",
                l.shape[0], l.shape[1], o.shape[0], c.num_heads);
    KVP_RETURN_IF_ERROR(CheckContiguous(o, "out"));
    KVP_RETURN_IF_ERROR(CheckContiguous(l, "lse"));
    KVP_RETURN_IF_ERROR(CheckWritable(o, "out"));
    KVP_RETURN_IF_ERROR(CheckWritable(l, "lse"));
    KVP_RETURN_IF_ERROR(CheckDisjoint(o, "out", l, "lse"));
    return CommStatus(comm->impl->MergeAttention(rank, o, l, comm->context->exec));
  });
}

KVP_API kvp_status kvp_comm_pending(const kvp_comm* comm, int32_t* out_num_contributed) {
  return Guard(__func__, [&] {
    KVP_REQUIRE(comm, "comm is NULL");
    KVP_REQUIRE(out_num_contributed, "out_num_contributed is NULL");
    *out_num_contributed = comm->impl->NumContributed();
    return KVP_OK;
  });
}

}  // extern "C"
