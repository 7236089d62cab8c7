// The host side of dense attention on CUDA: checks what the kernels assume (dtypes, 16-byte
// alignment), picks the split-KV partition and launches on the caller's stream. No allocation,
// no synchronization: capturable in a CUDA graph.
#include <cstdint>

#include "fmt/format.h"
#include "kvplug/attention/dense/dense.h"
#include "paged_attention.h"

namespace kvplug::attn::dense {
namespace {

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

absl::Status CheckVectorizable(const TensorView& t, const char* name) {
  if (!Aligned16(t.data) || t.strides[0] % 8 != 0 || t.strides[1] % 8 != 0)
    return absl::InvalidArgumentError(fmt::format(
        "{}: the CUDA kernels need 16-byte aligned rows (data {} , strides [{}, {}] elements)", name,
        t.data, t.strides[0], t.strides[1]));
  return absl::OkStatus();
}

class DenseCuda final : public AttentionBackend {
 public:
  DenseCuda(const HeadConfig& heads, const DenseConfig& config) : heads_(heads), config_(config) {}

  absl::Status Run(const RunArgs& a) const override {
    if (!a.plan.on_device()) return absl::InvalidArgumentError("dense (CUDA): the plan has no device arrays");
    const bool fp8 = heads_.kv_dtype == DType::kFP8E4M3;
    if (fp8 ? (a.query.dtype != DType::kF16 && a.query.dtype != DType::kBF16) : a.query.dtype != heads_.kv_dtype)
      return absl::InvalidArgumentError(fmt::format(
          "dense (CUDA): query dtype {} must be {} with a {} cache", DTypeName(a.query.dtype),
          fp8 ? "float16 or bfloat16" : DTypeName(heads_.kv_dtype), DTypeName(heads_.kv_dtype)));
    if (absl::Status s = CheckVectorizable(a.query, "query"); !s.ok()) return s;
    if (absl::Status s = CheckVectorizable(a.out, "out"); !s.ok()) return s;
    if (a.lse && a.lse->strides[1] != 1)
      return absl::InvalidArgumentError("dense (CUDA): lse must be contiguous along heads");
    const kv::PagedLayer& pages = a.cache.layer(a.layer);
    if (!Aligned16(pages.data) || pages.stride_block % 8 || pages.stride_pos % 8 || pages.stride_head % 8 ||
        pages.stride_kv % 8)
      return absl::InvalidArgumentError("dense (CUDA): cache pages must have 16-byte aligned rows");

    cuda::PagedAttentionParams p;
    p.dtype = a.query.dtype == DType::kBF16 ? cuda::ElemType::kBF16 : cuda::ElemType::kF16;
    p.kv_fp8 = fp8;
    p.k_scale = a.cache.k_scale(a.layer);
    p.v_scale = a.cache.v_scale(a.layer);
    p.q = a.query.data;
    p.o = a.out.data;
    p.lse = a.lse ? static_cast<float*>(a.lse->data) : nullptr;
    p.q_stride_token = a.query.strides[0];
    p.q_stride_head = a.query.strides[1];
    p.o_stride_token = a.out.strides[0];
    p.o_stride_head = a.out.strides[1];
    p.lse_stride_token = a.lse ? a.lse->strides[0] : 0;
    p.k_pages = pages.Row(0, 0, 0, 0);
    p.v_pages = pages.Row(1, 0, 0, 0);
    p.kv_stride_block = pages.stride_block;
    p.kv_stride_pos = pages.stride_pos;
    p.kv_stride_head = pages.stride_head;
    p.qo_indptr = a.plan.device_query_start_loc();
    p.kv_lens = a.plan.device_seq_lens();
    p.kv_indptr = a.plan.device_kv_indptr();
    p.kv_indices = a.plan.device_kv_indices();
    p.num_seqs = a.plan.num_seqs();
    p.max_q_len = a.plan.max_q_len();
    p.max_kv_len = a.plan.max_seq_len();
    p.num_q_heads = heads_.num_q_heads;
    p.num_kv_heads = heads_.num_kv_heads;
    p.head_size = heads_.head_size;
    p.block_size = a.plan.block_size();
    if ((p.block_size & (p.block_size - 1)) == 0) p.block_shift = __builtin_ctz(static_cast<unsigned>(p.block_size));
    p.sm_scale = heads_.sm_scale;
    p.window_left = config_.window_left;
    p.num_tokens = a.plan.num_tokens();
    if (p.num_tokens == 0) return absl::OkStatus();
    const int64_t row_bytes = static_cast<int64_t>(heads_.num_q_heads) * (heads_.head_size + 1) * 4;
    const int64_t workspace_rows = a.exec.workspace ? a.exec.workspace_bytes / row_bytes : 0;
    p.num_splits = cuda::ChooseNumSplits(p, a.exec.num_sms, workspace_rows);
    if (p.num_splits > 1) {
      p.partial_o = static_cast<float*>(a.exec.workspace);
      p.partial_lse = p.partial_o + static_cast<int64_t>(p.num_splits) * p.num_tokens * heads_.num_q_heads * heads_.head_size;
    }
    if (const int e = cuda::LaunchPagedAttention(p, a.exec.stream); e != 0)
      return absl::InternalError(fmt::format("dense (CUDA): kernel launch failed: CUDA error {}", e));
    return absl::OkStatus();
  }

 private:
  HeadConfig heads_;
  DenseConfig config_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<AttentionBackend>> CreateCuda(const HeadConfig& heads, const DenseConfig& config) {
  if (heads.kv_dtype != DType::kF16 && heads.kv_dtype != DType::kBF16 && heads.kv_dtype != DType::kFP8E4M3)
    return absl::UnimplementedError(fmt::format("dense (CUDA): kv_dtype {} not supported (float16, bfloat16, fp8_e4m3)",
                                                DTypeName(heads.kv_dtype)));
  if (heads.head_size != 64 && heads.head_size != 128 && heads.head_size != 256)
    return absl::UnimplementedError(
        fmt::format("dense (CUDA): head_size={} not supported (64, 128, 256)", heads.head_size));
  if (config.logits_soft_cap != 0.0f)
    return absl::UnimplementedError("dense (CUDA): logits_soft_cap is CPU-only for now");
  return std::make_unique<DenseCuda>(heads, config);
}


}  // namespace kvplug::attn::dense
