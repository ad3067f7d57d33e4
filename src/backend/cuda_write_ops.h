// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// The CUDA backend of the write ops (kv_append, paged_append, copy_pages, qkv_rope_write,
// rope_shift), as the
// plans in src/ops call it, and its support tables (read by the plans' select / can_implement, by
// the launchers' dispatch and by the GPU tests). Defined in backend/cuda (CUDA builds) or
// backend/no_cuda (every call returns unavailable). No CUDA types here: src/ops is compiled by the
// host compiler.
//
// The launchers trust their parameters (the plans validated everything that does not live in
// device memory); indices that do live there (offsets, new_lens, slots, page tables, positions,
// page lists) are checked by the kernels, which skip the writes that need a bad one and count it
// in the GPU's error record (`errors`, from cuda_write_error_record; read by check_device_errors).
// Each launcher issues one kernel on stream.cuda_stream (none for empty work): no allocation, no
// synchronization, no copy of arguments (graph-capturable); internal when the launch fails.
// Thread-safe.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string_view>

#include "kvcache/device.h"
#include "kvcache/dtype.h"
#include "kvcache/paged_kv.h"
#include "kvcache/status.h"
#include "kvcache/tensor.h"

namespace kvcache::ops {
struct RopeTable;
}  // namespace kvcache::ops

namespace kvcache::backend {

// --- support tables ---

// kv_append: any of these (the kernel copies bytes).
inline constexpr DType kCudaKVAppendTypes[] = {DType::f32, DType::f64, DType::f16, DType::bf16};
// paged_append's k / v and qkv_rope_write's qkv and q_out.
inline constexpr DType kCudaWriteInputTypes[] = {DType::f32, DType::f16, DType::bf16};
// Pools of paged_append, qkv_rope_write and copy_pages (K and V chosen independently).
inline constexpr DType kCudaStorageTypes[] = {DType::f32, DType::f16, DType::bf16, DType::int8,
                                              DType::fp8_e4m3};
// The kernels index with 32 bits: the most elements (or bytes, for copy_pages) one call may move.
inline constexpr int64_t kCudaMaxElements = (int64_t{1} << 31) - 1;

// The device error record of `device` (allocated once per GPU): what select() stores in a plan.
// unavailable, naming op, for a device that is not a usable GPU or a build without CUDA.
[[nodiscard]] Result<void*> cuda_write_error_record(Device device, std::string_view op);

// --- kv_append ---

// One of K / V. Byte strides; every pointer is device memory.
struct CudaKVAppendSide {
  std::byte* cache = nullptr;  // element (0, 0, 0, 0)
  int64_t sample_stride = 0;
  int64_t head_stride = 0;
  int64_t token_stride = 0;
  const std::byte* src = nullptr;  // [batch, heads, max_new_tokens, row], contiguous
  int64_t row_bytes = 0;
};

struct CudaKVAppendParams {
  int64_t batch = 0;
  int64_t num_kv_heads = 0;
  int64_t max_new_tokens = 0;
  int64_t capacity = 0;
  const int32_t* offsets = nullptr;   // [batch], device
  const int32_t* new_lens = nullptr;  // [batch], device; null: every sample appends max_new_tokens
  CudaKVAppendSide k;
  CudaKVAppendSide v;
  void* errors = nullptr;
};

Status cuda_kv_append(const CudaKVAppendParams& p, const Stream& stream);

// --- paged pools (paged_append, qkv_rope_write) ---

// One pool and its scales; strides in elements of the pool (of the scales for scale_*).
struct CudaPoolSide {
  std::byte* pool = nullptr;
  DType dtype = DType::bf16;  // one of kCudaStorageTypes
  int64_t dim = 0;
  int64_t page_stride = 0, slot_stride = 0, head_stride = 0;
  float* scales = nullptr;  // int8 / fp8_e4m3 only
  int64_t scale_page_stride = 0, scale_slot_stride = 0, scale_head_stride = 0;
};

// TokenSlots with device pointers: slot_mapping, or batch_indices + positions + page table.
struct CudaTokenSlots {
  const int64_t* slot_mapping = nullptr;   // [num_tokens]
  const int32_t* batch_indices = nullptr;  // [num_tokens]
  const int32_t* positions = nullptr;      // [num_tokens]
  const int32_t* indptr = nullptr;         // [batch + 1]
  const int32_t* indices = nullptr;        // [num_indices]
  int64_t batch = 0;
  int64_t num_indices = 0;
  int64_t num_pages = 0;
  int64_t page_size = 0;
};

// The side of a checked pool (ops::check_paged_kv passed): strides read off the views.
inline CudaPoolSide cuda_pool_side(const TensorView& pool, const TensorView& scales,
                                   PageLayout layout) {
  const bool nhd = layout == PageLayout::nhd;
  CudaPoolSide s;
  s.pool = static_cast<std::byte*>(pool.data);
  s.dtype = pool.dtype;
  s.dim = pool.shape[3];
  s.page_stride = pool.strides[0];
  s.slot_stride = pool.strides[nhd ? 1 : 2];
  s.head_stride = pool.strides[nhd ? 2 : 1];
  if (scales.data != nullptr) {
    s.scales = static_cast<float*>(scales.data);
    s.scale_page_stride = scales.strides[0];
    s.scale_slot_stride = scales.strides[nhd ? 1 : 2];
    s.scale_head_stride = scales.strides[nhd ? 2 : 1];
  }
  return s;
}

// The device form of checked slots (ops::check_token_slot_sizes passed).
inline CudaTokenSlots cuda_token_slots(const TokenSlots& slots, const PageFormat& pages) {
  CudaTokenSlots s;
  s.num_pages = pages.num_pages;
  s.page_size = pages.page_size;
  if (!slots.slot_mapping.empty()) {
    s.slot_mapping = slots.slot_mapping.data();
    return s;
  }
  s.batch_indices = slots.batch_indices.data();
  s.positions = slots.positions.data();
  s.indptr = slots.table.indptr.data();
  s.indices = slots.table.indices.data();
  s.batch = static_cast<int64_t>(slots.table.indptr.size()) - 1;
  s.num_indices = static_cast<int64_t>(slots.table.indices.size());
  return s;
}

struct CudaPagedAppendParams {
  int64_t num_tokens = 0;
  int64_t num_kv_heads = 0;
  DType src_dtype = DType::bf16;     // one of kCudaWriteInputTypes
  const std::byte* k_src = nullptr;  // [num_tokens, num_kv_heads, k.dim], contiguous
  const std::byte* v_src = nullptr;  // [num_tokens, num_kv_heads, v.dim], contiguous
  CudaPoolSide k;
  CudaPoolSide v;
  CudaTokenSlots slots;
  void* errors = nullptr;
};

Status cuda_paged_append(const CudaPagedAppendParams& p, const Stream& stream);

// --- copy_pages ---

struct CudaCopyPagesParams {
  // K pages, V pages, K scales, V scales; a null base (unquantized scales) is skipped.
  std::byte* base[4] = {};
  int64_t page_bytes[4] = {};
  const int32_t* src = nullptr;  // [num_copies], device
  const int32_t* dst = nullptr;  // [num_copies], device
  int64_t num_copies = 0;
  int64_t num_pages = 0;
  void* errors = nullptr;
};

Status cuda_copy_pages(const CudaCopyPagesParams& p, const Stream& stream);

// --- qkv_rope_write ---

// A RoPE table on one GPU: cos and sin [max_position, num_freqs], the very floats the CPU kernels
// use: multiplied by the attention factor in float (qkv_rope_write rotates raw K), or not
// (rope_shift re-rotates K that already carries it). Immutable; the device memory is freed with
// the last holder. Plans of one configuration, kind and GPU share it.
struct CudaRopeTable {
  Device device;
  const float* cos = nullptr;
  const float* sin = nullptr;
  int64_t max_position = 0;
  int64_t num_freqs = 0;
};

// The table of `table` on `device`, times the attention factor when with_attention_factor:
// uploaded at the first request (select() time: allocates and copies synchronously), shared while
// a holder lives. resource_exhausted / unavailable / internal from the runtime, naming op.
[[nodiscard]] Result<std::shared_ptr<const CudaRopeTable>> cuda_rope_table(
    std::shared_ptr<const ops::RopeTable> table, Device device, std::string_view op,
    bool with_attention_factor);

struct CudaQkvRopeWriteParams {
  int64_t num_tokens = 0;
  int64_t num_q_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;    // of q and k
  int64_t head_dim_v = 0;  // resolved (never 0)
  DType qkv_dtype = DType::bf16;
  DType q_dtype = DType::bf16;
  const std::byte* qkv = nullptr;  // [num_tokens, row], row stride qkv_row_stride elements
  int64_t qkv_row_stride = 0;
  std::byte* q_out = nullptr;            // [num_tokens, num_q_heads, head_dim], contiguous
  const float* q_norm_weight = nullptr;  // [head_dim], or null: no QK-norm
  const float* k_norm_weight = nullptr;
  float norm_eps = 0.0f;
  float norm_weight_offset = 0.0f;
  bool gptj = false;       // pairs (2i, 2i + 1); else neox (i, i + rotary_dim / 2)
  int64_t rotary_dim = 0;  // resolved; 2 * the table's num_freqs
  int num_streams = 1;
  int64_t section_begin[5] = {};       // frequencies [begin[s], begin[s + 1]) use position stream s
  const int32_t* positions = nullptr;  // [num_streams, num_tokens], device
  CudaPoolSide k;
  CudaPoolSide v;
  CudaTokenSlots slots;
  void* errors = nullptr;
};

Status cuda_qkv_rope_write(const CudaQkvRopeWriteParams& p, const CudaRopeTable& table,
                           const Stream& stream);

// --- rope_shift ---

// The longest K row the kernel takes (a warp stages one in shared memory).
inline constexpr int64_t kCudaRopeShiftMaxHeadDim = 1024;

struct CudaRopeShiftParams {
  int64_t batch = 0;
  int64_t num_kv_heads = 0;
  bool gptj = false;  // pairs (2i, 2i + 1); else neox (i, i + num_freqs)
  // K (f32, f16, bf16, int8, fp8_e4m3; dim = head_dim <= kCudaRopeShiftMaxHeadDim) and its
  // scales. Contiguous caches: page = sequence, slot = token.
  CudaPoolSide k;
  bool paged = false;
  int64_t page_size = 1;
  int64_t num_pages = 0;
  const int32_t* indptr = nullptr;   // paged: [batch + 1], device
  const int32_t* indices = nullptr;  // paged: [num_indices], device
  int64_t num_indices = 0;
  int64_t capacity = 0;  // contiguous: tokens per sequence
  // [batch] each, device: sequence b rotates tokens [p0[b], p1[b]) by delta[b].
  const int32_t* p0 = nullptr;
  const int32_t* p1 = nullptr;
  const int32_t* delta = nullptr;
  const int32_t* seq_lens = nullptr;
  void* errors = nullptr;
};

// table: without the attention factor. A sequence with a bad entry (length, range, delta, page
// list) is left unchanged and counted in the error record.
Status cuda_rope_shift(const CudaRopeShiftParams& p, const CudaRopeTable& table,
                       const Stream& stream);

}  // namespace kvcache::backend
