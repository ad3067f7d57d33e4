// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// The layout of K/V that the ops read and write: the format of one token's K/V (KVFormat), the
// page pools (PagedKVDesc + PagedKV), the contiguous per-sequence caches (ContiguousKV), and where
// new tokens go (TokenSlots). Plain values: intentionally copyable; they own no memory.
//
// Page pools. K and V live in separate pools of num_pages pages of page_size tokens:
//   NHD: k_pages [num_pages, page_size, num_kv_heads, head_dim]   (vLLM / FlashInfer default)
//   HND: k_pages [num_pages, num_kv_heads, page_size, head_dim]
// (v_pages likewise with head_dim_v). Quantized storage (int8, fp8_e4m3) carries one float32 scale
// per (token, kv head): k_scales mirrors k_pages without head_dim, i.e. [num_pages, page_size,
// num_kv_heads] (NHD) or [num_pages, num_kv_heads, page_size] (HND); stored = round(x / scale),
// x ~= stored * scale. Pools and scales are contiguous.
//
// Page tables are CSR, as FlashInfer passes them: sequence b owns pages
// page_indices[page_indptr[b] .. page_indptr[b + 1]) in token order; token position p of b lives in
// page page_indices[page_indptr[b] + p / page_size] at slot p % page_size.

#include <cstdint>
#include <span>

#include "kvcache/dtype.h"
#include "kvcache/export.h"
#include "kvcache/status.h"
#include "kvcache/tensor.h"

namespace kvcache {

// One token's K/V: heads, dims and storage dtypes (K and V chosen independently).
struct KVFormat {
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;         // of K
  int64_t head_dim_v = 0;       // of V; 0 means head_dim
  DType k_dtype = DType::bf16;  // f32, f16, bf16, int8 or fp8_e4m3
  DType v_dtype = DType::bf16;

  [[nodiscard]] int64_t dim_v() const { return head_dim_v == 0 ? head_dim : head_dim_v; }
};

// Whether a storage dtype carries per-(token, head) scales: int8 and fp8_e4m3.
[[nodiscard]] KVCACHE_API bool is_quantized(DType dtype);
// The largest stored magnitude of a quantized dtype: 127 (int8), 448 (fp8_e4m3).
[[nodiscard]] KVCACHE_API float quantized_max(DType dtype);

enum class PageLayout : uint8_t { nhd, hnd };
// "nhd", "hnd".
[[nodiscard]] KVCACHE_API const char* name(PageLayout layout);

struct PageFormat {
  int64_t num_pages = 0;
  int64_t page_size = 16;
  PageLayout layout = PageLayout::nhd;
};

struct PagedKVDesc {
  KVFormat kv;
  PageFormat pages;
};

// Validates a descriptor: positive dims and pages, storage dtypes in {f32, f16, bf16, int8,
// fp8_e4m3}. invalid_argument in the project format, prefixed with op.
[[nodiscard]] KVCACHE_API Status check_kv_format(const KVFormat& kv, std::string_view op);
[[nodiscard]] KVCACHE_API Status check_paged_kv_desc(const PagedKVDesc& desc, std::string_view op);

// The pools of a paged cache (shapes in the header paragraph). The scales are empty views (data
// nullptr, rank 0) for unquantized storage.
struct PagedKV {
  TensorView k_pages;
  TensorView v_pages;
  TensorView k_scales;
  TensorView v_scales;
};

// A page table: which pages each of `batch` sequences owns (header paragraph). int32, on the
// device the op runs on.
struct PageTable {
  std::span<const int32_t> indptr;   // [batch + 1], non-decreasing, indptr[0] == 0
  std::span<const int32_t> indices;  // [indptr[batch]], each in [0, num_pages)
};

// Contiguous per-sequence caches: k [batch, num_kv_heads, capacity, head_dim] and v likewise with
// head_dim_v, any strides on the first three axes, unit stride on the last. Both the head-major
// [B, H, L, D] arrays of kv_append and KVCache's token-major storage (a permuted view) fit.
// Scales (quantized storage): float32 [batch, num_kv_heads, capacity], any strides.
struct ContiguousKV {
  TensorView k;
  TensorView v;
  TensorView k_scales;
  TensorView v_scales;
};

// Where each of num_tokens new tokens is written; exactly one of the two forms:
//  - slot_mapping [num_tokens]: slot = page * page_size + offset in page (vLLM's form);
//  - batch_indices and positions [num_tokens] with a page table: token i belongs to sequence
//    batch_indices[i] at position positions[i] (FlashInfer's form).
struct TokenSlots {
  std::span<const int64_t> slot_mapping;
  std::span<const int32_t> batch_indices;
  std::span<const int32_t> positions;
  PageTable table;
};

}  // namespace kvcache
