// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "reference/append.h"

#include <cstddef>
#include <cstring>
#include <vector>

#include "ops/quantize.h"
#include "reference/element.h"

namespace kvcache::reference {
namespace {

// Stores x (a value of a float, f16 or bf16 input: exact in float) as element i of dtype.
void write(void* base, DType dtype, int64_t i, double x) {
  auto* p = static_cast<std::byte*>(base) + i * static_cast<int64_t>(size_of(dtype));
  const auto f = static_cast<float>(x);
  switch (dtype) {
    case DType::f64:
      std::memcpy(p, &x, sizeof x);
      return;
    case DType::f16:
    case DType::bf16: {
      const uint16_t bits = dtype == DType::f16 ? float_to_f16(f) : float_to_bf16(f);
      std::memcpy(p, &bits, sizeof bits);
      return;
    }
    default:
      std::memcpy(p, &f, sizeof f);
      return;
  }
}

// Element i of a buffer copied to element j of another of the same dtype, bits unchanged.
void copy_element(const void* src, int64_t i, void* dst, int64_t j, DType dtype) {
  const auto size = static_cast<int64_t>(size_of(dtype));
  std::memcpy(static_cast<std::byte*>(dst) + j * size,
              static_cast<const std::byte*>(src) + i * size, static_cast<size_t>(size));
}

// The element offset of (page, slot, head, d) in a pool of the given layout.
int64_t pool_index(const PageFormat& pages, int64_t heads, int64_t dim, int64_t page, int64_t slot,
                   int64_t head, int64_t d) {
  if (pages.layout == PageLayout::nhd) {
    return ((page * pages.page_size + slot) * heads + head) * dim + d;
  }
  return ((page * heads + head) * pages.page_size + slot) * dim + d;
}

void append_side(const KVAppendDesc& desc, const KVAppendArgs& args, const TensorView& cache,
                 const TensorView& src, int64_t dim) {
  for (int64_t b = 0; b < desc.batch; ++b) {
    const int64_t len =
        args.new_lens.empty() ? desc.max_new_tokens : args.new_lens[static_cast<size_t>(b)];
    const int64_t off = args.offsets[static_cast<size_t>(b)];
    for (int64_t h = 0; h < desc.num_kv_heads; ++h) {
      for (int64_t l = 0; l < len; ++l) {
        for (int64_t d = 0; d < dim; ++d) {
          const int64_t to[] = {b, h, off + l, d};
          const int64_t from = ((b * desc.num_kv_heads + h) * desc.max_new_tokens + l) * dim + d;
          write(cache.element_ptr(to), desc.dtype, 0, read_element(src.data, desc.dtype, from));
        }
      }
    }
  }
}

}  // namespace

void kv_append(const KVAppendDesc& desc, const KVAppendArgs& args) {
  append_side(desc, args, args.k_cache, args.k_new, desc.head_dim);
  append_side(desc, args, args.v_cache, args.v_new, desc.dim_v());
}

namespace {

// The slot of token i, from whichever form of TokenSlots is given.
int64_t slot_of(const PageFormat& pages, const TokenSlots& slots, int64_t i) {
  const auto t = static_cast<size_t>(i);
  if (!slots.slot_mapping.empty()) return slots.slot_mapping[t];
  const int64_t b = slots.batch_indices[t];
  const int64_t pos = slots.positions[t];
  const int64_t first = slots.table.indptr[static_cast<size_t>(b)];
  const int64_t page = slots.table.indices[static_cast<size_t>(first + pos / pages.page_size)];
  return page * pages.page_size + pos % pages.page_size;
}

void paged_side(const PagedAppendDesc& desc, const PagedAppendArgs& args, const TensorView& src,
                const TensorView& pool, const TensorView& scales, DType dtype, int64_t dim) {
  const PageFormat& pages = desc.cache.pages;
  const int64_t heads = desc.cache.kv.num_kv_heads;
  const int64_t num_tokens = src.dim(0);
  std::vector<float> row(static_cast<size_t>(dim));
  std::vector<int8_t> q8(static_cast<size_t>(dim));
  std::vector<fp8_e4m3_t> qf8(static_cast<size_t>(dim));
  for (int64_t i = 0; i < num_tokens; ++i) {
    const int64_t slot = slot_of(pages, args.slots, i);
    const int64_t page = slot / pages.page_size;
    const int64_t in_page = slot % pages.page_size;
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t from = (i * heads + h) * dim;
      const int64_t to = pool_index(pages, heads, dim, page, in_page, h, 0);
      if (!is_quantized(dtype)) {
        for (int64_t d = 0; d < dim; ++d) {
          if (dtype == desc.input_dtype) {  // the same format: the value itself, NaN bits too
            copy_element(src.data, from + d, pool.data, to + d, dtype);
          } else {
            write(pool.data, dtype, to + d, read_element(src.data, desc.input_dtype, from + d));
          }
        }
        continue;
      }
      for (int64_t d = 0; d < dim; ++d) {
        row[static_cast<size_t>(d)] =
            static_cast<float>(read_element(src.data, desc.input_dtype, from + d));
      }
      float scale = 0.0f;
      if (dtype == DType::int8) {
        scale = ops::quantize_row(row.data(), dim, q8.data());
        std::memcpy(static_cast<int8_t*>(pool.data) + to, q8.data(), q8.size());
      } else {
        scale = ops::quantize_row(row.data(), dim, qf8.data());
        std::memcpy(static_cast<fp8_e4m3_t*>(pool.data) + to, qf8.data(), qf8.size());
      }
      scales.data_as<float>()[pool_index(pages, heads, 1, page, in_page, h, 0)] = scale;
    }
  }
}

// All elements of page `from` of a pool (dim elements per (slot, head)) to page `to`.
void copy_page(const TensorView& pool, const PageFormat& pages, int64_t heads, int64_t dim,
               int64_t from, int64_t to) {
  for (int64_t slot = 0; slot < pages.page_size; ++slot) {
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t d = 0; d < dim; ++d) {
        copy_element(pool.data, pool_index(pages, heads, dim, from, slot, h, d), pool.data,
                     pool_index(pages, heads, dim, to, slot, h, d), pool.dtype);
      }
    }
  }
}

}  // namespace

void paged_append(const PagedAppendDesc& desc, const PagedAppendArgs& args) {
  const KVFormat& kv = desc.cache.kv;
  paged_side(desc, args, args.k, args.cache.k_pages, args.cache.k_scales, kv.k_dtype, kv.head_dim);
  paged_side(desc, args, args.v, args.cache.v_pages, args.cache.v_scales, kv.v_dtype, kv.dim_v());
}

void copy_pages(const CopyPagesDesc& desc, const CopyPagesArgs& args) {
  const KVFormat& kv = desc.cache.kv;
  const PageFormat& pages = desc.cache.pages;
  for (size_t i = 0; i < args.src.size(); ++i) {
    const int64_t from = args.src[i];
    const int64_t to = args.dst[i];
    copy_page(args.cache.k_pages, pages, kv.num_kv_heads, kv.head_dim, from, to);
    copy_page(args.cache.v_pages, pages, kv.num_kv_heads, kv.dim_v(), from, to);
    if (is_quantized(kv.k_dtype))
      copy_page(args.cache.k_scales, pages, kv.num_kv_heads, 1, from, to);
    if (is_quantized(kv.v_dtype))
      copy_page(args.cache.v_scales, pages, kv.num_kv_heads, 1, from, to);
  }
}

}  // namespace kvcache::reference
