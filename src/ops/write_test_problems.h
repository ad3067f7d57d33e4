// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// Test inputs of the write ops, shared by their CPU tests (src/ops/*_test.cpp) and their CUDA tests
// (src/backend/cuda/*_cuda_test.cpp), so that both backends are checked on the same problems:
// kv_append's caches and new tokens, paged_append's token slots, and qkv_rope_write's packed rows,
// RoPE variants and poisoned outputs; and the byte comparison the CUDA tests make. Every value is
// random, finite and non-zero; the same seed builds the same bytes. Header-only, test-only;
// thread-compatible.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <utility>
#include <vector>

#include "kvcache/kv_append.h"
#include "kvcache/paged_kv.h"
#include "kvcache/qkv_rope_write.h"
#include "kvcache/rope.h"
#include "kvcache/tensor.h"

#include "testing/gpu_test.h"
#include "testing/test_util.h"

namespace kvcache::testing {

// =============================== bytes ===============================

// The bytes a host view's strides span.
inline std::vector<uint8_t> host_bytes(const TensorView& t) {
  const auto* p = static_cast<const uint8_t*>(t.data);
  return std::vector<uint8_t>(p, p + span_bytes(t));
}

// Equal bytes; else how many differ and the first that does.
inline ::testing::AssertionResult same_bytes(const std::vector<uint8_t>& got,
                                             const std::vector<uint8_t>& want) {
  if (got.size() != want.size()) {
    return ::testing::AssertionFailure() << got.size() << " bytes, expected " << want.size();
  }
  size_t differ = 0;
  size_t first = got.size();
  for (size_t i = 0; i < got.size(); ++i) {
    if (got[i] == want[i]) continue;
    ++differ;
    first = std::min(first, i);
  }
  if (differ == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << differ << " bytes differ, the first at " << first << ": 0x" << std::hex
         << int{got[first]} << ", expected 0x" << int{want[first]};
}

// =============================== kv_append ===============================

// An owned CPU array of random, finite, non-zero values (padding included), laid out with the
// view's axes in `order` from outermost to innermost and `pad` unused elements after each
// innermost run. Unlike RandomTensor it holds f64 too.
struct Array {
  std::vector<uint64_t> storage;
  TensorView view;

  Array() = default;
  Array(DType dtype, std::vector<int64_t> shape, std::mt19937& rng, std::vector<int> order = {},
        int64_t pad = 0) {
    const int rank = static_cast<int>(shape.size());
    if (order.empty()) {
      order.resize(shape.size());
      std::iota(order.begin(), order.end(), 0);
    }
    int64_t numel = 1;
    for (int m = rank - 1; m >= 0; --m) {
      const int axis = order[static_cast<size_t>(m)];
      view.strides[axis] = numel;
      numel *= shape[static_cast<size_t>(axis)] + (m == rank - 1 ? pad : 0);
    }
    const size_t elem = size_of(dtype);
    storage.resize(static_cast<size_t>(numel) * elem / 8 + 1);
    auto* bytes = reinterpret_cast<uint8_t*>(storage.data());
    std::uniform_real_distribution<double> value(0.5, 100.0);
    for (size_t i = 0; i < static_cast<size_t>(numel); ++i) {
      if (dtype == DType::f64) {
        const double v = (rng() & 1u) ? value(rng) : -value(rng);
        std::memcpy(bytes + i * elem, &v, elem);
      } else {
        const uint32_t bits = random_finite_bits(dtype, rng);
        std::memcpy(bytes + i * elem, &bits, elem);
      }
    }
    view.data = storage.data();
    view.dtype = dtype;
    view.rank = rank;
    for (int i = 0; i < rank; ++i) view.shape[i] = shape[static_cast<size_t>(i)];
  }
  // A deep copy whose view points at its own storage.
  [[nodiscard]] Array clone() const {
    Array a;
    a.storage = storage;
    a.view = view;
    a.view.data = a.storage.data();
    return a;
  }
};

// How the caches lie in memory: [B, H, L, D], [B, L, H, D] viewed as [B, H, L, D], or [B, H, L, D]
// with padding after every row.
enum class CacheLayout { head_major, token_major, padded };

struct KVAppendCase {
  int64_t batch, heads, head_dim, head_dim_v, capacity, max_new;
};

// One kv_append call's caches, new tokens and spans.
struct KVAppendFixture {
  KVAppendDesc desc;
  Array k_cache, v_cache, k_new, v_new;
  std::vector<int32_t> offsets, new_lens;

  KVAppendFixture(const KVAppendCase& c, DType dtype, CacheLayout layout, bool ragged,
                  std::mt19937& rng) {
    desc = {c.batch, c.heads, c.head_dim, c.head_dim_v, c.capacity, c.max_new, dtype};
    const std::vector<int> order =
        layout == CacheLayout::token_major ? std::vector<int>{0, 2, 1, 3} : std::vector<int>{};
    const int64_t pad = layout == CacheLayout::padded ? 2 : 0;
    k_cache = Array(dtype, {c.batch, c.heads, c.capacity, c.head_dim}, rng, order, pad);
    v_cache = Array(dtype, {c.batch, c.heads, c.capacity, desc.dim_v()}, rng, order, pad);
    k_new = Array(dtype, {c.batch, c.heads, c.max_new, c.head_dim}, rng);
    v_new = Array(dtype, {c.batch, c.heads, c.max_new, desc.dim_v()}, rng);
    for (int64_t b = 0; b < c.batch; ++b) {
      // Sample 0 appends at least one token, so that every call writes something.
      const int64_t min_len = b == 0 ? 1 : 0;
      const auto len =
          static_cast<int32_t>(ragged ? uniform_int(rng, min_len, c.max_new) : c.max_new);
      if (ragged) new_lens.push_back(len);
      offsets.push_back(static_cast<int32_t>(uniform_int(rng, 0, c.capacity - len)));
    }
  }
  [[nodiscard]] KVAppendArgs args() const {
    return {k_cache.view, v_cache.view, k_new.view, v_new.view, offsets, new_lens};
  }
};

// =============================== paged_append ===============================

// num_tokens distinct slots, in both forms: batch sequences own pages_each random pages each.
struct SlotLists {
  std::vector<int64_t> mapping;
  std::vector<int32_t> batch_indices, positions, indptr, indices;

  SlotLists(const PageFormat& pages, int64_t batch, int64_t pages_each, int64_t num_tokens,
            std::mt19937& rng) {
    std::vector<int32_t> perm(static_cast<size_t>(pages.num_pages));
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    indptr.push_back(0);
    std::vector<std::pair<int32_t, int32_t>> cells;  // (sequence, position)
    for (int32_t b = 0; b < batch; ++b) {
      for (int64_t j = 0; j < pages_each; ++j) indices.push_back(perm[indices.size()]);
      indptr.push_back(static_cast<int32_t>(indices.size()));
      for (int32_t pos = 0; pos < pages_each * pages.page_size; ++pos) cells.emplace_back(b, pos);
    }
    std::shuffle(cells.begin(), cells.end(), rng);
    for (int64_t i = 0; i < num_tokens; ++i) {
      auto [b, pos] = cells[static_cast<size_t>(i)];
      batch_indices.push_back(b);
      positions.push_back(pos);
      const int64_t page =
          indices[static_cast<size_t>(indptr[static_cast<size_t>(b)] + pos / pages.page_size)];
      mapping.push_back(page * pages.page_size + pos % pages.page_size);
    }
  }
  [[nodiscard]] TokenSlots view(bool tabled) const {
    if (!tabled) return TokenSlots{mapping, {}, {}, {}};
    return TokenSlots{{}, batch_indices, positions, PageTable{indptr, indices}};
  }
};

// =============================== qkv_rope_write ===============================

inline constexpr uint8_t kQkvPoison = 0x7f;

// Poisoned bytes whose data() is 64-byte aligned, as framework allocations are: the CPU kernels'
// non-temporal stores take aligned rows only, the CUDA kernels' 16-byte accesses aligned pointers.
struct AlignedBytes {
  std::vector<uint64_t> words;
  void* data() {
    const auto at = reinterpret_cast<uintptr_t>(words.data());
    return words.data() + (64 - at % 64) % 64 / 8;
  }
  static AlignedBytes poisoned(size_t n) {
    AlignedBytes b;
    b.words.resize((n + 7) / 8 + 8);
    std::memset(b.words.data(), kQkvPoison, b.words.size() * 8);
    return b;
  }
};

struct QkvCase {
  int64_t num_q_heads = 4;
  int64_t num_kv_heads = 2;
  int64_t head_dim = 6;
  int64_t head_dim_v = 5;
  int64_t num_tokens = 7;
  int64_t page_size = 3;
  int64_t row_pad = 3;  // elements after each packed row: the row stride exceeds the row
  PageLayout layout = PageLayout::nhd;
  DType qkv = DType::f32, q = DType::f32, k = DType::f32, v = DType::f32;
  bool qk_norm = false;
  float offset = 0.0f;
  bool slot_mapping = true;
  RopeConfig rope;
};

// Everything one run reads and writes, owned; outputs poisoned with kQkvPoison. Not copyable (the
// views point into it): build another from the same seed for a second run.
struct QkvProblem {
  QkvRopeWriteDesc desc;
  AlignedBytes qkv, q_out, k_pages, v_pages, k_scales, v_scales;
  std::vector<float> q_w, k_w;
  std::vector<int32_t> positions, batch_indices, token_pos, indptr, indices;
  std::vector<int64_t> slot_mapping;
  QkvRopeWriteArgs args;

  QkvProblem(const QkvCase& c, std::mt19937& rng) {
    desc.num_q_heads = c.num_q_heads;
    desc.cache.kv = {c.num_kv_heads, c.head_dim, c.head_dim_v, c.k, c.v};
    desc.qkv_dtype = c.qkv;
    desc.q_dtype = c.q;
    desc.qk_norm = c.qk_norm;
    desc.norm_weight_offset = c.offset;
    desc.rope = c.rope;
    const int64_t n = c.num_tokens;
    const int64_t width =
        (c.num_q_heads + c.num_kv_heads) * c.head_dim + c.num_kv_heads * c.head_dim_v;
    const int64_t stride = width + c.row_pad;
    std::uniform_real_distribution<float> mag(0.1f, 2.0f);  // never zero
    std::vector<float> values(static_cast<size_t>(n * stride));
    for (float& x : values) x = (rng() & 1u) != 0 ? mag(rng) : -mag(rng);
    qkv = AlignedBytes::poisoned(values.size() * size_of(c.qkv));
    from_float(values.data(), c.qkv, qkv.data(), values.size());
    args.qkv = TensorView::contiguous(qkv.data(), c.qkv, {n, width});
    args.qkv.strides[0] = stride;
    const int streams = c.rope.num_position_streams();
    for (int64_t i = 0; i < streams * n; ++i) {
      positions.push_back(static_cast<int32_t>(rng() % static_cast<uint32_t>(c.rope.max_position)));
    }
    args.positions = positions;
    if (c.qk_norm) {
      for (int64_t i = 0; i < 2 * c.head_dim; ++i) {
        (i < c.head_dim ? q_w : k_w).push_back(0.5f + static_cast<float>(rng() % 1000) / 1000.0f);
      }
      args.q_norm_weight = TensorView::contiguous(q_w.data(), DType::f32, {c.head_dim});
      args.k_norm_weight = TensorView::contiguous(k_w.data(), DType::f32, {c.head_dim});
    }
    q_out =
        AlignedBytes::poisoned(static_cast<size_t>(n * c.num_q_heads * c.head_dim) * size_of(c.q));
    args.q_out = TensorView::contiguous(q_out.data(), c.q, {n, c.num_q_heads, c.head_dim});
    // Pages: two sequences, tokens alternate between them; a spare page stays unwritten.
    const int64_t per_seq = (n + 1) / 2;
    const int64_t pages_per_seq = (per_seq + c.page_size - 1) / c.page_size;
    PageFormat& pf = desc.cache.pages;
    pf = {2 * pages_per_seq + 1, c.page_size, c.layout};
    std::vector<int32_t> perm(static_cast<size_t>(pf.num_pages));
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    indptr = {0, static_cast<int32_t>(pages_per_seq), static_cast<int32_t>(2 * pages_per_seq)};
    indices.assign(perm.begin(), perm.begin() + 2 * pages_per_seq);
    for (int64_t t = 0; t < n; ++t) {
      const auto b = static_cast<int32_t>(t % 2);
      const auto p = static_cast<int32_t>(t / 2);
      batch_indices.push_back(b);
      token_pos.push_back(p);
      const int64_t page =
          indices[static_cast<size_t>(indptr[static_cast<size_t>(b)] + p / c.page_size)];
      slot_mapping.push_back(page * c.page_size + p % c.page_size);
    }
    if (c.slot_mapping) {
      args.slots.slot_mapping = slot_mapping;
    } else {
      args.slots.batch_indices = batch_indices;
      args.slots.positions = token_pos;
      args.slots.table = {indptr, indices};
    }
    auto pool = [&](AlignedBytes& b, DType d, int64_t dim) {
      b = AlignedBytes::poisoned(
          static_cast<size_t>(pf.num_pages * c.page_size * c.num_kv_heads * dim) * size_of(d));
      return c.layout == PageLayout::nhd
                 ? TensorView::contiguous(b.data(), d,
                                          {pf.num_pages, c.page_size, c.num_kv_heads, dim})
                 : TensorView::contiguous(b.data(), d,
                                          {pf.num_pages, c.num_kv_heads, c.page_size, dim});
    };
    args.kv.k_pages = pool(k_pages, c.k, c.head_dim);
    args.kv.v_pages = pool(v_pages, c.v, c.head_dim_v);
    if (is_quantized(c.k)) args.kv.k_scales = pool(k_scales, DType::f32, 1);
    if (is_quantized(c.v)) args.kv.v_scales = pool(v_scales, DType::f32, 1);
    for (TensorView* s : {&args.kv.k_scales, &args.kv.v_scales}) {
      if (s->data != nullptr) s->rank = 3;  // [pages, page_size, heads] / [pages, heads, page_size]
    }
  }
  QkvProblem(const QkvProblem&) = delete;
  QkvProblem& operator=(const QkvProblem&) = delete;

  // Every output byte, for "unchanged on refusal".
  [[nodiscard]] std::vector<std::vector<uint64_t>> outputs() const {
    return {q_out.words, k_pages.words, v_pages.words, k_scales.words, v_scales.words};
  }
};

// RoPE variant i (of kNumRopeVariants) for heads of head_dim: neox / gptj, every scaling, multi-
// section with 2 and 3 streams, partial rotary dimensions of both styles, and 4 streams whose
// sections do not fall on multiples of 8 frequencies.
inline constexpr int kNumRopeVariants = 8;
inline RopeConfig rope_variant(int i, int64_t head_dim) {
  RopeConfig r;
  r.max_position = 97;
  switch (i % kNumRopeVariants) {
    case 0:
      break;
    case 1:
      r.style = RopeStyle::gptj;
      r.scaling = RopeScaling::linear;
      r.factor = 2.5;
      break;
    case 2:
      r.scaling = RopeScaling::llama3;
      r.base = 500000.0;
      r.factor = 8.0;
      r.original_max_position = 64;
      break;
    case 3:
      r.style = RopeStyle::gptj;
      r.scaling = RopeScaling::yarn;
      r.factor = 4.0;
      r.original_max_position = 32;
      break;
    case 4:  // multi-section over the whole rotary dimension
      r.mrope_section = {static_cast<int32_t>(head_dim / 2 - head_dim / 4),
                         static_cast<int32_t>(head_dim / 4), 0, 0};
      if (head_dim >= 8) {
        r.mrope_section = {static_cast<int32_t>(head_dim / 4), static_cast<int32_t>(head_dim / 8),
                           static_cast<int32_t>(head_dim / 2 - head_dim / 4 - head_dim / 8), 0};
      }
      break;
    case 5:  // partial rotary dimension, gptj
      r.rotary_dim = head_dim >= 4 ? (head_dim / 2) & ~int64_t{1} : 2;
      r.style = RopeStyle::gptj;
      break;
    case 6:  // partial rotary dimension, neox
      r.rotary_dim = head_dim >= 32 ? head_dim / 2 : 2;
      r.scaling = RopeScaling::yarn;
      r.factor = 2.0;
      r.original_max_position = 48;
      break;
    default:  // four streams over 5/8 of the head, sections off multiples of 8
      if (head_dim >= 16) {
        const auto nf = static_cast<int32_t>(head_dim / 16 * 5);
        r.rotary_dim = 2 * nf;
        r.mrope_section = {3, nf / 2 - 3, 1, nf - nf / 2 - 1};
      }
      break;
  }
  return r;
}

struct QkvDTypes {
  DType qkv, q, k, v;
};

// Odd case i (head dims 6 / 10, odd head counts, pages of 1 to 4) with dtypes d and a RoPE
// variant.
inline QkvCase odd_qkv_case(int i, const QkvDTypes& d, int variant) {
  QkvCase c;
  c.num_q_heads = 3 + i % 3;
  c.num_kv_heads = 1 + i % 3;
  c.head_dim = i % 2 == 0 ? 6 : 10;
  c.head_dim_v = 5;
  c.page_size = 1 + i % 4;
  c.layout = i % 3 == 0 ? PageLayout::hnd : PageLayout::nhd;
  c.qkv = d.qkv, c.q = d.q, c.k = d.k, c.v = d.v;
  c.qk_norm = i % 3 != 2;
  c.offset = i % 2 == 0 ? 0.0f : 1.0f;
  c.slot_mapping = i % 2 == 0;
  c.rope = rope_variant(variant, c.head_dim);
  return c;
}
inline constexpr QkvDTypes kQkvDTypes[] = {
    {DType::f32, DType::f32, DType::f32, DType::f32},
    {DType::bf16, DType::bf16, DType::bf16, DType::bf16},
    {DType::f16, DType::f32, DType::f16, DType::bf16},
    {DType::bf16, DType::bf16, DType::int8, DType::int8},
    {DType::f16, DType::f16, DType::fp8_e4m3, DType::int8},
    {DType::bf16, DType::f16, DType::int8, DType::fp8_e4m3},
    {DType::f32, DType::bf16, DType::f32, DType::int8},
};

}  // namespace kvcache::testing
