// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// Argument checks and addressing shared by every op that reads or writes page pools or contiguous
// caches. The checks produce the project's error format, prefixed with the op name; the addressing
// helpers are what kernels use once the checks have passed.

#include <cstdint>
#include <string_view>

#include "kvcache/paged_kv.h"
#include "kvcache/status.h"
#include "kvcache/tensor.h"

namespace kvcache::ops {

// Element strides of a pool (or, with dim 1, of its scales) for the descriptor's layout.
struct PoolStrides {
  int64_t page = 0;
  int64_t slot = 0;
  int64_t head = 0;
};
[[nodiscard]] PoolStrides pool_strides(const PageFormat& pages, int64_t num_kv_heads, int64_t dim);

// The pools match the descriptor: dtypes, shapes (layout), contiguity, device, and scales present
// exactly for quantized storage.
[[nodiscard]] Status check_paged_kv(const PagedKVDesc& desc, const PagedKV& kv, Device device,
                                    std::string_view op);

// A page table for `batch` sequences: sizes, indptr non-decreasing from 0, every index in
// [0, num_pages). Reads the table: REQUIRES the table to be host-readable (CPU device).
[[nodiscard]] Status check_page_table(const PageFormat& pages, const PageTable& table,
                                      int64_t batch, std::string_view op);

// Sequence b's lengths fit its pages: seq_lens[b] <= pages of b * page_size (seq_lens has batch
// entries, each >= 0). REQUIRES check_page_table passed.
[[nodiscard]] Status check_seq_lens_fit(const PageFormat& pages, const PageTable& table,
                                        std::span<const int32_t> seq_lens, std::string_view op);

// Exactly one form of TokenSlots is given, sized num_tokens, and every token resolves to a slot in
// [0, num_pages * page_size) (a position past its sequence's pages is out_of_range). Reads the
// spans: REQUIRES host-readable (CPU device). num_sequences bounds batch_indices.
[[nodiscard]] Status check_token_slots(const PageFormat& pages, const TokenSlots& slots,
                                       int64_t num_tokens, std::string_view op);

// What check_page_table and check_token_slots check without reading an entry, for arrays that
// live on a GPU: sizes, and which form of TokenSlots is given. The CUDA kernels check the entries
// themselves, skip what they must not follow and count it in the device error record.
[[nodiscard]] Status check_page_table_sizes(const PageTable& table, int64_t batch,
                                            std::string_view op);
[[nodiscard]] Status check_token_slot_sizes(const TokenSlots& slots, int64_t num_tokens,
                                            std::string_view op);

// The slot of token i. REQUIRES check_token_slots passed.
[[nodiscard]] inline int64_t token_slot(const PageFormat& pages, const TokenSlots& slots,
                                        int64_t i) {
  if (!slots.slot_mapping.empty()) return slots.slot_mapping[static_cast<size_t>(i)];
  const int32_t b = slots.batch_indices[static_cast<size_t>(i)];
  const int32_t p = slots.positions[static_cast<size_t>(i)];
  const int64_t page = slots.table.indices[static_cast<size_t>(
      slots.table.indptr[static_cast<size_t>(b)] + p / pages.page_size)];
  return page * pages.page_size + p % pages.page_size;
}

// Contiguous caches for `batch` sequences: k, v [batch, num_kv_heads, capacity, dim] with unit
// stride on dim, dtypes, device, scales present exactly for quantized storage and shaped
// [batch, num_kv_heads, capacity].
[[nodiscard]] Status check_contiguous_kv(const KVFormat& kv, const ContiguousKV& caches,
                                         int64_t batch, Device device, std::string_view op);

}  // namespace kvcache::ops
