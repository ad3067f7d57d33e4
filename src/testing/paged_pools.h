// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// Test helpers for the paged ops (paged_append, copy_pages): the page pools of a PagedKVDesc,
// filled with random bytes (any bit pattern: the poison a write must replace), owned by value so a
// test can copy them, run the op on one copy and the reference on another, and compare every
// byte. Header-only; thread-compatible.

#include <cstdint>
#include <initializer_list>
#include <random>
#include <tuple>
#include <utility>
#include <vector>

#include "kvcache/dtype.h"
#include "kvcache/paged_kv.h"
#include "kvcache/tensor.h"

namespace kvcache::testing {

// A contiguous CPU array of random bytes; the view points into storage (re-point it after a copy).
struct Bytes {
  std::vector<uint64_t> storage;  // uint64_t for alignment; holds any dtype
  TensorView view;
};

inline Bytes random_bytes(DType dtype, std::initializer_list<int64_t> shape, std::mt19937& rng) {
  Bytes b;
  b.view = TensorView::contiguous(nullptr, dtype, shape);
  b.storage.resize(b.view.num_bytes() / 8 + 1);
  for (uint64_t& word : b.storage) word = (uint64_t{rng()} << 32) | rng();
  b.view.data = b.storage.data();
  return b;
}

// Pools (and scales for quantized storage) of a paged cache, in the descriptor's layout; copyable:
// a copy owns its bytes. Absent scales have a null view.
struct Pools {
  Bytes k, v, k_scales, v_scales;

  Pools(const PagedKVDesc& d, std::mt19937& rng) {
    const PageFormat& p = d.pages;
    const int64_t h = d.kv.num_kv_heads;
    const bool nhd = p.layout == PageLayout::nhd;
    for (auto [bytes, dtype, dim] : {std::tuple{&k, d.kv.k_dtype, d.kv.head_dim},
                                     std::tuple{&v, d.kv.v_dtype, d.kv.dim_v()}}) {
      *bytes = nhd ? random_bytes(dtype, {p.num_pages, p.page_size, h, dim}, rng)
                   : random_bytes(dtype, {p.num_pages, h, p.page_size, dim}, rng);
    }
    for (auto [bytes, dtype] :
         {std::pair{&k_scales, d.kv.k_dtype}, std::pair{&v_scales, d.kv.v_dtype}}) {
      if (!is_quantized(dtype)) continue;
      *bytes = nhd ? random_bytes(DType::f32, {p.num_pages, p.page_size, h}, rng)
                   : random_bytes(DType::f32, {p.num_pages, h, p.page_size}, rng);
    }
  }
  Pools(const Pools& o) : k(o.k), v(o.v), k_scales(o.k_scales), v_scales(o.v_scales) {
    for (Bytes* b : {&k, &v, &k_scales, &v_scales}) {
      if (b->view.data != nullptr) b->view.data = b->storage.data();
    }
  }
  Pools& operator=(const Pools&) = delete;

  [[nodiscard]] PagedKV kv() const { return {k.view, v.view, k_scales.view, v_scales.view}; }
  // Every byte of every pool equal.
  bool operator==(const Pools& o) const {
    return k.storage == o.k.storage && v.storage == o.v.storage &&
           k_scales.storage == o.k_scales.storage && v_scales.storage == o.v_scales.storage;
  }
};

}  // namespace kvcache::testing
