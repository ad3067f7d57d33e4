// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "kvcache/paged_kv.h"

#include <string>

#include "ops/paged_checks.h"

namespace kvcache {
namespace {

std::string str(int64_t v) { return std::to_string(v); }

bool is_storage_dtype(DType d) {
  return d == DType::f32 || d == DType::f16 || d == DType::bf16 || d == DType::int8 ||
         d == DType::fp8_e4m3;
}

Status bad(std::string_view op, const std::string& what) {
  return Status::invalid_argument(std::string(op) + ": " + what);
}

}  // namespace

bool is_quantized(DType dtype) { return dtype == DType::int8 || dtype == DType::fp8_e4m3; }

float quantized_max(DType dtype) {
  if (dtype == DType::int8) return 127.0f;
  if (dtype == DType::fp8_e4m3) return 448.0f;
  return 0.0f;
}

const char* name(PageLayout layout) { return layout == PageLayout::nhd ? "nhd" : "hnd"; }

Status check_kv_format(const KVFormat& kv, std::string_view op) {
  if (kv.num_kv_heads <= 0) {
    return bad(op, "num_kv_heads is " + str(kv.num_kv_heads) + ", expected > 0");
  }
  if (kv.head_dim <= 0) return bad(op, "head_dim is " + str(kv.head_dim) + ", expected > 0");
  if (kv.head_dim_v < 0) {
    return bad(op, "head_dim_v is " + str(kv.head_dim_v) + ", expected > 0 (or 0 for head_dim)");
  }
  for (auto [label, d] : {std::pair{"k_dtype", kv.k_dtype}, std::pair{"v_dtype", kv.v_dtype}}) {
    if (!is_storage_dtype(d)) {
      return bad(op, std::string(label) + " is " + name(d) +
                         ", expected one of f32, f16, bf16, int8, fp8_e4m3");
    }
  }
  return Status();
}

Status check_paged_kv_desc(const PagedKVDesc& desc, std::string_view op) {
  if (Status s = check_kv_format(desc.kv, op); !s.ok()) return s;
  if (desc.pages.num_pages <= 0) {
    return bad(op, "num_pages is " + str(desc.pages.num_pages) + ", expected > 0");
  }
  if (desc.pages.page_size <= 0) {
    return bad(op, "page_size is " + str(desc.pages.page_size) + ", expected > 0");
  }
  return Status();
}

namespace ops {

PoolStrides pool_strides(const PageFormat& pages, int64_t num_kv_heads, int64_t dim) {
  if (pages.layout == PageLayout::nhd) {
    return {pages.page_size * num_kv_heads * dim, num_kv_heads * dim, dim};
  }
  return {num_kv_heads * pages.page_size * dim, dim, pages.page_size * dim};
}

namespace {

// Checks one pool or scale array against its expected layout.
Status check_pool(const TensorView& t, DType dtype, const PageFormat& pages, int64_t heads,
                  int64_t dim, bool with_dim, Device device, std::string_view op,
                  std::string_view what) {
  if (Status s = check_dtype(t, dtype, op, what); !s.ok()) return s;
  const DimSpec n{pages.num_pages, "num_pages"};
  const DimSpec p{pages.page_size, "page_size"};
  const DimSpec h{heads, "num_kv_heads"};
  const DimSpec d{dim, "head_dim"};
  Status s;
  if (pages.layout == PageLayout::nhd) {
    s = with_dim ? check_shape(t, {n, p, h, d}, op, what) : check_shape(t, {n, p, h}, op, what);
  } else {
    s = with_dim ? check_shape(t, {n, h, p, d}, op, what) : check_shape(t, {n, h, p}, op, what);
  }
  if (!s.ok()) return s;
  if (s = check_contiguous(t, op, what); !s.ok()) return s;
  if (s = check_device(t, device, op, what); !s.ok()) return s;
  return check_data(t, op, what);
}

Status check_no_scales(const TensorView& t, DType dtype, std::string_view op,
                       std::string_view what) {
  if (t.data == nullptr && t.rank == 0) return Status();
  return bad(op, std::string(what) + " is given for " + name(dtype) +
                     " storage, expected none (only int8 and fp8_e4m3 carry scales)");
}

}  // namespace

Status check_paged_kv(const PagedKVDesc& desc, const PagedKV& kv, Device device,
                      std::string_view op) {
  const KVFormat& f = desc.kv;
  const int64_t dv = f.dim_v();
  if (Status s = check_pool(kv.k_pages, f.k_dtype, desc.pages, f.num_kv_heads, f.head_dim, true,
                            device, op, "k_pages");
      !s.ok()) {
    return s;
  }
  if (Status s = check_pool(kv.v_pages, f.v_dtype, desc.pages, f.num_kv_heads, dv, true, device, op,
                            "v_pages");
      !s.ok()) {
    return s;
  }
  for (auto [scales, dtype, what] : {std::tuple{&kv.k_scales, f.k_dtype, "k_scales"},
                                     std::tuple{&kv.v_scales, f.v_dtype, "v_scales"}}) {
    Status s = is_quantized(dtype) ? check_pool(*scales, DType::f32, desc.pages, f.num_kv_heads, 1,
                                                false, device, op, what)
                                   : check_no_scales(*scales, dtype, op, what);
    if (!s.ok()) return s;
  }
  return Status();
}

Status check_page_table_sizes(const PageTable& table, int64_t batch, std::string_view op) {
  if (static_cast<int64_t>(table.indptr.size()) != batch + 1) {
    return bad(op, "page_indptr has " + str(static_cast<int64_t>(table.indptr.size())) +
                       " entries, expected batch + 1 = " + str(batch + 1));
  }
  return Status();
}

Status check_page_table(const PageFormat& pages, const PageTable& table, int64_t batch,
                        std::string_view op) {
  if (Status s = check_page_table_sizes(table, batch, op); !s.ok()) return s;
  if (table.indptr[0] != 0) {
    return bad(op, "page_indptr[0] is " + str(table.indptr[0]) + ", expected 0");
  }
  for (int64_t b = 0; b < batch; ++b) {
    if (table.indptr[static_cast<size_t>(b + 1)] < table.indptr[static_cast<size_t>(b)]) {
      return bad(op, "page_indptr decreases at " + str(b + 1) + " (" +
                         str(table.indptr[static_cast<size_t>(b)]) + " -> " +
                         str(table.indptr[static_cast<size_t>(b + 1)]) +
                         "), expected non-decreasing");
    }
  }
  const int64_t nnz = table.indptr[static_cast<size_t>(batch)];
  if (static_cast<int64_t>(table.indices.size()) < nnz) {
    return bad(op, "page_indices has " + str(static_cast<int64_t>(table.indices.size())) +
                       " entries, expected at least page_indptr[batch] = " + str(nnz));
  }
  for (int64_t i = 0; i < nnz; ++i) {
    const int32_t page = table.indices[static_cast<size_t>(i)];
    if (page < 0 || page >= pages.num_pages) {
      return Status::out_of_range(std::string(op) + ": page_indices[" + str(i) + "] is " +
                                  str(page) + ", expected in [0, " + str(pages.num_pages) + ")");
    }
  }
  return Status();
}

Status check_seq_lens_fit(const PageFormat& pages, const PageTable& table,
                          std::span<const int32_t> seq_lens, std::string_view op) {
  const int64_t batch = static_cast<int64_t>(table.indptr.size()) - 1;
  if (static_cast<int64_t>(seq_lens.size()) != batch) {
    return bad(op, "seq_lens has " + str(static_cast<int64_t>(seq_lens.size())) +
                       " entries, expected batch = " + str(batch));
  }
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = seq_lens[static_cast<size_t>(b)];
    const int64_t room =
        (table.indptr[static_cast<size_t>(b + 1)] - table.indptr[static_cast<size_t>(b)]) *
        pages.page_size;
    if (len < 0) return bad(op, "seq_lens[" + str(b) + "] is " + str(len) + ", expected >= 0");
    if (len > room) {
      return Status::out_of_range(std::string(op) + ": seq_lens[" + str(b) + "] is " + str(len) +
                                  ", expected <= " + str(room) + " (its pages * page_size)");
    }
  }
  return Status();
}

Status check_token_slot_sizes(const TokenSlots& slots, int64_t num_tokens, std::string_view op) {
  const bool mapped = !slots.slot_mapping.empty();
  const bool tabled = !slots.batch_indices.empty() || !slots.positions.empty();
  if (num_tokens == 0) return Status();
  if (mapped == tabled) {
    return bad(op, std::string("token slots give ") + (mapped ? "both" : "neither") +
                       " a slot_mapping and batch_indices/positions, expected exactly one");
  }
  if (mapped) {
    if (static_cast<int64_t>(slots.slot_mapping.size()) != num_tokens) {
      return bad(op, "slot_mapping has " + str(static_cast<int64_t>(slots.slot_mapping.size())) +
                         " entries, expected num_tokens = " + str(num_tokens));
    }
    return Status();
  }
  for (auto [span, what] :
       {std::pair{slots.batch_indices, "batch_indices"}, std::pair{slots.positions, "positions"}}) {
    if (static_cast<int64_t>(span.size()) != num_tokens) {
      return bad(op, std::string(what) + " has " + str(static_cast<int64_t>(span.size())) +
                         " entries, expected num_tokens = " + str(num_tokens));
    }
  }
  if (slots.table.indptr.empty()) {
    return bad(op, "batch_indices/positions are given without a page table, expected one");
  }
  return Status();
}

Status check_token_slots(const PageFormat& pages, const TokenSlots& slots, int64_t num_tokens,
                         std::string_view op) {
  if (Status s = check_token_slot_sizes(slots, num_tokens, op); !s.ok() || num_tokens == 0) {
    return s;
  }
  const int64_t num_slots = pages.num_pages * pages.page_size;
  if (!slots.slot_mapping.empty()) {
    for (int64_t i = 0; i < num_tokens; ++i) {
      const int64_t slot = slots.slot_mapping[static_cast<size_t>(i)];
      if (slot < 0 || slot >= num_slots) {
        return Status::out_of_range(
            std::string(op) + ": slot_mapping[" + str(i) + "] is " + str(slot) +
            ", expected in [0, num_pages * page_size = " + str(num_slots) + ")");
      }
    }
    return Status();
  }
  const int64_t batch = static_cast<int64_t>(slots.table.indptr.size()) - 1;
  if (Status s = check_page_table(pages, slots.table, batch, op); !s.ok()) return s;
  for (int64_t i = 0; i < num_tokens; ++i) {
    const int64_t b = slots.batch_indices[static_cast<size_t>(i)];
    const int64_t p = slots.positions[static_cast<size_t>(i)];
    if (b < 0 || b >= batch) {
      return Status::out_of_range(std::string(op) + ": batch_indices[" + str(i) + "] is " + str(b) +
                                  ", expected in [0, " + str(batch) + ")");
    }
    const int64_t room = (slots.table.indptr[static_cast<size_t>(b + 1)] -
                          slots.table.indptr[static_cast<size_t>(b)]) *
                         pages.page_size;
    if (p < 0 || p >= room) {
      return Status::out_of_range(std::string(op) + ": positions[" + str(i) + "] is " + str(p) +
                                  ", expected in [0, " + str(room) + ") (sequence " + str(b) +
                                  "'s pages * page_size)");
    }
  }
  return Status();
}

Status check_contiguous_kv(const KVFormat& kv, const ContiguousKV& caches, int64_t batch,
                           Device device, std::string_view op) {
  int64_t capacity = -1;
  for (auto [t, dtype, dim, what] : {std::tuple{&caches.k, kv.k_dtype, kv.head_dim, "k"},
                                     std::tuple{&caches.v, kv.v_dtype, kv.dim_v(), "v"}}) {
    if (Status s = check_dtype(*t, dtype, op, what); !s.ok()) return s;
    const DimSpec cap{capacity, "capacity"};
    if (Status s = check_shape(
            *t, {{batch, "batch"}, {kv.num_kv_heads, "num_kv_heads"}, cap, {dim, "head_dim"}}, op,
            what);
        !s.ok()) {
      return s;
    }
    capacity = t->shape[2];
    if (dim > 1 && t->strides[3] != 1) {
      return bad(
          op, std::string(what) + " has stride " + str(t->strides[3]) + " on head_dim, expected 1");
    }
    if (Status s = check_device(*t, device, op, what); !s.ok()) return s;
    if (Status s = check_data(*t, op, what); !s.ok()) return s;
  }
  for (auto [scales, dtype, what] : {std::tuple{&caches.k_scales, kv.k_dtype, "k_scales"},
                                     std::tuple{&caches.v_scales, kv.v_dtype, "v_scales"}}) {
    if (!is_quantized(dtype)) {
      if (Status s = check_no_scales(*scales, dtype, op, what); !s.ok()) return s;
      continue;
    }
    if (Status s = check_dtype(*scales, DType::f32, op, what); !s.ok()) return s;
    if (Status s = check_shape(
            *scales, {{batch, "batch"}, {kv.num_kv_heads, "num_kv_heads"}, {capacity, "capacity"}},
            op, what);
        !s.ok()) {
      return s;
    }
    if (Status s = check_device(*scales, device, op, what); !s.ok()) return s;
    if (Status s = check_data(*scales, op, what); !s.ok()) return s;
  }
  return Status();
}

}  // namespace ops
}  // namespace kvcache
