// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// The CUDA backend of decode_attention and extend_attention, as src/ops/attention_cuda.cpp calls
// it. Defined in backend/cuda (CUDA builds) or backend/no_cuda (every call returns unavailable).
// No CUDA types here: src/ops is compiled by the host compiler.
//
// Two kernels serve both ops: "mma" (tensor cores; K and V of one type among bf16, f16, int8,
// fp8_e4m3, head_dim 64, 128, 256, 8-bit from 128) and "simt" (CUDA cores; every supported dtype
// and head_dim, K and V of any two supported types). A work
// item is (query row, kv head, sub-group of the kv head's query heads: up to 16 for mma, 8 for
// simt, chunk of chunk_size keys); its CTA reads the chunk's K/V rows once for all query heads
// of the sub-group. A row whose keys span several chunks is merged by the last of its
// CTAs to finish (log-sum-exp rule), through the workspace; a counter per (row, kv head,
// sub-group) finds the last one and resets itself. The launcher trusts its parameters (the plan
// validated everything that is not in device memory); entries that are in device memory
// (seq_lens, q_indptr, the page table) are checked by the kernel, which skips what it must not
// follow and counts it in the GPU's error record. Thread-safe; no allocation, no synchronization.

#include <cstddef>
#include <cstdint>

#include "kvcache/device.h"
#include "kvcache/dtype.h"
#include "kvcache/status.h"

namespace kvcache::backend {

// Where K (or V) of (sequence b, kv head h, key j) lives, in elements of its dtype:
//   paged:      base + indices[indptr[b] + j / page_size] * page_stride + (j % page_size) *
//               slot_stride + h * head_stride
//   contiguous: base + b * page_stride + j * slot_stride + h * head_stride
// Scales (int8 / fp8_e4m3) likewise with the scale_* strides.
struct CudaKVSide {
  const std::byte* base = nullptr;
  int64_t page_stride = 0, slot_stride = 0, head_stride = 0;
  const float* scales = nullptr;
  int64_t scale_page_stride = 0, scale_slot_stride = 0, scale_head_stride = 0;
};

struct CudaAttentionParams {
  // --- queries and outputs (element strides; head_dim has unit stride) ---
  const std::byte* q = nullptr;  // [num_rows, num_q_heads, head_dim]
  DType q_dtype = DType::bf16;
  int64_t q_row_stride = 0, q_head_stride = 0;
  std::byte* o = nullptr;  // [num_rows, num_q_heads, head_dim]
  DType o_dtype = DType::bf16;
  int64_t o_row_stride = 0, o_head_stride = 0;
  float* lse = nullptr;  // [num_rows, num_q_heads] or null
  int64_t lse_row_stride = 0, lse_head_stride = 0;
  // --- shapes ---
  int64_t num_rows = 0;  // decode: batch; extend: total_q
  int64_t batch = 0;
  int64_t num_q_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;  // of K and V (equal on CUDA)
  // --- K/V ---
  DType k_dtype = DType::bf16;
  DType v_dtype = DType::bf16;  // != k_dtype only with the CUDA-core kernel (mma false)
  CudaKVSide k, v;
  bool paged = false;
  int64_t page_size = 0;
  int64_t num_pages = 0;
  int64_t capacity = 0;              // contiguous: tokens per sequence
  const int32_t* indptr = nullptr;   // paged: [batch + 1], device
  const int32_t* indices = nullptr;  // paged: [num_indices], device
  int64_t num_indices = 0;
  const int32_t* seq_lens = nullptr;  // [batch], device
  const int32_t* q_indptr = nullptr;  // extend: [batch + 1], device; decode: null
  // --- softmax ---
  float sm_scale = 0.0f;  // resolved (never 0)
  float soft_cap = 0.0f;
  int64_t window = 0;
  int64_t sink_tokens = 0;
  const float* sinks = nullptr;  // [num_q_heads] or null
  // --- split ---
  int64_t chunk_size = 0;
  int64_t max_chunks = 1;
  std::byte* workspace = nullptr;  // cuda_attention_workspace_bytes(...) bytes, device
  void* errors = nullptr;          // the GPU's error record
  bool extend = false;
  bool mma = false;     // the tensor-core kernel (cuda_attention_has_mma)
  int64_t num_sms = 0;  // the GPU's multiprocessors (grids that fit one CTA each get wider CTAs)
  // Extend, tensor cores, no window: q_per_cta query tokens of one sequence per CTA (their K/V
  // read once), the grid covering max_q_blocks blocks per sequence; 1: one query row per CTA.
  int64_t q_per_cta = 1;
  int64_t max_q_blocks = 0;
};

// Whether the CUDA kernel supports these: head_dim in kHeadDims, K and V dtypes (each
// independently) in kKVDTypes.
inline constexpr int64_t kCudaAttentionHeadDims[] = {16, 32, 64, 128, 256};
inline constexpr DType kCudaAttentionKVDTypes[] = {DType::f32, DType::f16, DType::bf16, DType::int8,
                                                   DType::fp8_e4m3};

// The most chunks one row may be split into.
inline constexpr int64_t kCudaAttentionMaxChunks = 64;

// Whether the tensor-core kernel serves these K and V dtypes and head_dim: K and V of one type
// (mixed pairs run on CUDA cores).
[[nodiscard]] inline bool cuda_attention_has_mma(DType k_dtype, DType v_dtype, int64_t head_dim) {
  if (k_dtype != v_dtype) return false;
  switch (k_dtype) {
    case DType::f16:
    case DType::bf16:
      return head_dim == 64 || head_dim == 128 || head_dim == 256;
    case DType::int8:
    case DType::fp8_e4m3:
      return head_dim == 128 || head_dim == 256;
    default:
      return false;
  }
}
// Query heads per CTA: the MMA's 16 rows, or the CUDA-core kernel's 1, 4 or 8 (a padded group).
[[nodiscard]] inline int64_t cuda_attention_group_pad(bool mma, int64_t group) {
  if (mma) return 16;
  return group == 1 ? 1 : group <= 4 ? 4 : 8;
}
// The query-head sub-groups per kv head (CTAs per row, kv head and chunk).
[[nodiscard]] inline int64_t cuda_attention_subgroups(bool mma, int64_t num_q_heads,
                                                      int64_t num_kv_heads) {
  const int64_t group = num_q_heads / num_kv_heads;
  const int64_t pad = cuda_attention_group_pad(mma, group);
  return (group + pad - 1) / pad;
}
// Query tokens the tensor-core kernel packs into one CTA for extend (its 16 rows hold tokens x
// the group's heads): 16 / group for groups up to 8, else 1 (no packing).
[[nodiscard]] inline int64_t cuda_attention_q_per_cta(bool mma, int64_t group) {
  return mma && group <= 8 ? 16 / group : 1;
}
// Kernel rows (token, head) of one work item's partial result.
[[nodiscard]] inline int64_t cuda_attention_rows_per_item(bool mma, bool extend, int64_t group) {
  if (extend && cuda_attention_q_per_cta(mma, group) > 1) return 16;
  const int64_t pad = cuda_attention_group_pad(mma, group);
  return pad < group ? pad : group;
}
// Bytes of a workspace that holds `items` partial results of rows_per_item rows plus one counter
// per (row, kv head, sub-group) for max_rows rows.
[[nodiscard]] size_t cuda_attention_workspace_bytes(bool mma, int64_t rows_per_item, int64_t items,
                                                    int64_t max_rows, int64_t num_q_heads,
                                                    int64_t num_kv_heads, int64_t head_dim);

// Issues the attention on stream (a memset of the counters when max_chunks > 1, then one kernel).
// internal when a launch fails.
Status cuda_attention(const CudaAttentionParams& p, const Stream& stream);

// The CTAs of the chosen kernel one multiprocessor of `device` holds at once (the schedule sizes
// its waves by it). internal on a CUDA error, unavailable without that GPU.
[[nodiscard]] Result<int> cuda_attention_ctas_per_sm(Device device, bool mma, DType k_dtype,
                                                     DType v_dtype, int64_t head_dim,
                                                     int64_t group);

// The GPU's error record (device/errors.cuh), allocated on first use: select() fetches it, so that
// run() never allocates. unavailable without that GPU.
[[nodiscard]] Result<void*> cuda_error_record(Device device);

// The GPU's multiprocessor count (the schedule sizes its chunks by it); unavailable without one.
[[nodiscard]] Result<int> cuda_multiprocessor_count(Device device);

}  // namespace kvcache::backend
