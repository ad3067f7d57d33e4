// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// The shared checks of paged and contiguous K/V arguments (src/ops/paged_checks.h).

#include "kvcache/paged_kv.h"

#include <cstdint>
#include <vector>

#include <gtest/gtest.h>

#include "ops/paged_checks.h"
#include "testing/test_util.h"

namespace kvcache::ops {
namespace {

using kvcache::testing::has_error;

PagedKVDesc small_desc(DType k = DType::bf16, DType v = DType::bf16,
                       PageLayout layout = PageLayout::nhd) {
  PagedKVDesc d;
  d.kv = {.num_kv_heads = 2, .head_dim = 5, .head_dim_v = 3, .k_dtype = k, .v_dtype = v};
  d.pages = {.num_pages = 4, .page_size = 3, .layout = layout};
  return d;
}

// Pools with real memory for a descriptor (scales only for quantized storage).
struct Pools {
  std::vector<float> k, v, ks, vs;
  PagedKV kv;
  explicit Pools(const PagedKVDesc& d) : k(4 * 3 * 2 * 5), v(4 * 3 * 2 * 3), ks(24), vs(24) {
    const bool nhd = d.pages.layout == PageLayout::nhd;
    auto shape = [&](int64_t dim) {
      return nhd ? std::vector<int64_t>{4, 3, 2, dim} : std::vector<int64_t>{4, 2, 3, dim};
    };
    auto scale_shape = nhd ? std::vector<int64_t>{4, 3, 2} : std::vector<int64_t>{4, 2, 3};
    kv.k_pages = TensorView::contiguous(k.data(), d.kv.k_dtype, shape(5));
    kv.v_pages = TensorView::contiguous(v.data(), d.kv.v_dtype, shape(3));
    if (is_quantized(d.kv.k_dtype))
      kv.k_scales = TensorView::contiguous(ks.data(), DType::f32, scale_shape);
    if (is_quantized(d.kv.v_dtype))
      kv.v_scales = TensorView::contiguous(vs.data(), DType::f32, scale_shape);
  }
};

TEST(PagedKV, DescriptorChecks) {
  EXPECT_OK(check_paged_kv_desc(small_desc(), "op"));
  PagedKVDesc d = small_desc();
  d.kv.k_dtype = DType::f64;
  EXPECT_TRUE(has_error(check_paged_kv_desc(d, "op"), Code::invalid_argument,
                        "op: k_dtype is f64, expected one of f32, f16, bf16, int8, fp8_e4m3"));
  d = small_desc();
  d.pages.page_size = 0;
  EXPECT_TRUE(has_error(check_paged_kv_desc(d, "op"), Code::invalid_argument,
                        "page_size is 0, expected > 0"));
  d = small_desc();
  d.kv.num_kv_heads = -1;
  EXPECT_TRUE(has_error(check_paged_kv_desc(d, "op"), Code::invalid_argument, "num_kv_heads"));
  EXPECT_TRUE(is_quantized(DType::int8));
  EXPECT_TRUE(is_quantized(DType::fp8_e4m3));
  EXPECT_FALSE(is_quantized(DType::bf16));
  EXPECT_EQ(quantized_max(DType::int8), 127.0f);
  EXPECT_EQ(quantized_max(DType::fp8_e4m3), 448.0f);
}

TEST(PagedKV, PoolsMatchTheLayoutAndScalesFollowTheDtype) {
  for (PageLayout layout : {PageLayout::nhd, PageLayout::hnd}) {
    const PagedKVDesc d = small_desc(DType::int8, DType::bf16, layout);
    Pools p(d);
    EXPECT_OK(check_paged_kv(d, p.kv, Device::cpu(), "op"));
    PagedKV missing = p.kv;
    missing.k_scales = TensorView{};
    EXPECT_TRUE(has_error(check_paged_kv(d, missing, Device::cpu(), "op"), Code::invalid_argument,
                          "k_scales"));
    PagedKV extra = p.kv;
    extra.v_scales = p.kv.k_scales;
    EXPECT_TRUE(has_error(check_paged_kv(d, extra, Device::cpu(), "op"), Code::invalid_argument,
                          "v_scales is given for bf16 storage, expected none"));
    // The other layout's shape is refused.
    PagedKVDesc other = d;
    other.pages.layout = layout == PageLayout::nhd ? PageLayout::hnd : PageLayout::nhd;
    EXPECT_TRUE(has_error(check_paged_kv(other, p.kv, Device::cpu(), "op"), Code::invalid_argument,
                          "k_pages"));
    EXPECT_TRUE(has_error(check_paged_kv(d, p.kv, Device::cuda(0), "op"), Code::invalid_argument,
                          "k_pages"));
  }
}

TEST(PagedKV, PoolStridesAddressEveryCellOnce) {
  for (PageLayout layout : {PageLayout::nhd, PageLayout::hnd}) {
    const PageFormat f{.num_pages = 3, .page_size = 4, .layout = layout};
    const PoolStrides s = pool_strides(f, 2, 5);
    std::vector<int> seen(3 * 4 * 2 * 5, 0);
    for (int64_t page = 0; page < 3; ++page) {
      for (int64_t slot = 0; slot < 4; ++slot) {
        for (int64_t head = 0; head < 2; ++head) {
          for (int64_t d = 0; d < 5; ++d) ++seen[page * s.page + slot * s.slot + head * s.head + d];
        }
      }
    }
    for (int count : seen) EXPECT_EQ(count, 1);
    EXPECT_EQ(layout == PageLayout::nhd ? s.slot : s.head, layout == PageLayout::nhd ? 10 : 20);
  }
}

TEST(PagedKV, PageTablesAndSeqLens) {
  const PageFormat f{.num_pages = 4, .page_size = 3};
  const std::vector<int32_t> indptr{0, 2, 2, 3};
  const std::vector<int32_t> indices{3, 0, 1};
  const PageTable t{indptr, indices};
  EXPECT_OK(check_page_table(f, t, 3, "op"));
  EXPECT_TRUE(has_error(check_page_table(f, t, 2, "op"), Code::invalid_argument,
                        "page_indptr has 4 entries, expected batch + 1 = 3"));
  const std::vector<int32_t> bad_indices{3, 4, 1};
  EXPECT_TRUE(has_error(check_page_table(f, {indptr, bad_indices}, 3, "op"), Code::out_of_range,
                        "page_indices[1] is 4, expected in [0, 4)"));
  const std::vector<int32_t> decreasing{0, 2, 1, 3};
  EXPECT_TRUE(has_error(check_page_table(f, {decreasing, indices}, 3, "op"), Code::invalid_argument,
                        "expected non-decreasing"));
  const std::vector<int32_t> lens{6, 0, 2};
  EXPECT_OK(check_seq_lens_fit(f, t, lens, "op"));
  const std::vector<int32_t> too_long{7, 0, 2};
  EXPECT_TRUE(has_error(check_seq_lens_fit(f, t, too_long, "op"), Code::out_of_range,
                        "seq_lens[0] is 7, expected <= 6"));
}

TokenSlots mapping(std::span<const int64_t> slots) {
  TokenSlots t;
  t.slot_mapping = slots;
  return t;
}

TokenSlots by_position(std::span<const int32_t> batch, std::span<const int32_t> pos,
                       PageTable table) {
  TokenSlots t;
  t.batch_indices = batch;
  t.positions = pos;
  t.table = table;
  return t;
}

TEST(PagedKV, TokenSlotsResolveBothForms) {
  const PageFormat f{.num_pages = 4, .page_size = 3};
  const std::vector<int32_t> indptr{0, 2, 3};
  const std::vector<int32_t> indices{3, 0, 1};
  const std::vector<int32_t> batch{0, 0, 1, 0};
  const std::vector<int32_t> pos{0, 4, 2, 5};
  const TokenSlots by_table = by_position(batch, pos, {indptr, indices});
  ASSERT_OK(check_token_slots(f, by_table, 4, "op"));
  const std::vector<int64_t> expected{9, 1, 5, 2};
  for (int64_t i = 0; i < 4; ++i) EXPECT_EQ(token_slot(f, by_table, i), expected[i]);
  const TokenSlots mapped = mapping(expected);
  ASSERT_OK(check_token_slots(f, mapped, 4, "op"));
  for (int64_t i = 0; i < 4; ++i) EXPECT_EQ(token_slot(f, mapped, i), expected[i]);

  const std::vector<int32_t> past{0, 6, 2, 5};
  EXPECT_TRUE(has_error(check_token_slots(f, by_position(batch, past, {indptr, indices}), 4, "op"),
                        Code::out_of_range, "positions[1] is 6, expected in [0, 6)"));
  const std::vector<int64_t> big{0, 12, 1, 2};
  EXPECT_TRUE(has_error(check_token_slots(f, mapping(big), 4, "op"), Code::out_of_range,
                        "slot_mapping[1] is 12"));
  TokenSlots both = by_table;
  both.slot_mapping = expected;
  EXPECT_TRUE(has_error(check_token_slots(f, both, 4, "op"), Code::invalid_argument,
                        "expected exactly one"));
  EXPECT_TRUE(
      has_error(check_token_slots(f, TokenSlots{}, 4, "op"), Code::invalid_argument, "neither"));
  EXPECT_TRUE(has_error(check_token_slots(f, mapped, 3, "op"), Code::invalid_argument,
                        "slot_mapping has 4 entries, expected num_tokens = 3"));
}

TEST(PagedKV, ContiguousCachesAcceptPermutedStrides) {
  const KVFormat kv{.num_kv_heads = 2,
                    .head_dim = 4,
                    .head_dim_v = 4,
                    .k_dtype = DType::f32,
                    .v_dtype = DType::int8};
  std::vector<float> k(3 * 5 * 2 * 4);
  std::vector<int8_t> v(3 * 5 * 2 * 4);
  std::vector<float> vs(3 * 5 * 2);
  // Token-major storage [batch, capacity, heads, dim] seen as [batch, heads, capacity, dim].
  auto permuted = [](void* data, DType dtype, int64_t dim) {
    TensorView t = TensorView::contiguous(data, dtype, {3, 5, 2, dim});
    std::swap(t.shape[1], t.shape[2]);
    std::swap(t.strides[1], t.strides[2]);
    return t;
  };
  ContiguousKV c{permuted(k.data(), DType::f32, 4),
                 permuted(v.data(), DType::int8, 4),
                 {},
                 permuted(vs.data(), DType::f32, 1)};
  c.v_scales.rank = 3;
  EXPECT_OK(check_contiguous_kv(kv, c, 3, Device::cpu(), "op"));
  ContiguousKV unit = c;
  unit.k.strides[3] = 2;
  EXPECT_TRUE(has_error(check_contiguous_kv(kv, unit, 3, Device::cpu(), "op"),
                        Code::invalid_argument, "k has stride 2 on head_dim, expected 1"));
  ContiguousKV short_v = c;
  short_v.v.shape[2] = 4;
  EXPECT_TRUE(has_error(check_contiguous_kv(kv, short_v, 3, Device::cpu(), "op"),
                        Code::invalid_argument, "capacity"));
  ContiguousKV no_scales = c;
  no_scales.v_scales = TensorView{};
  EXPECT_TRUE(has_error(check_contiguous_kv(kv, no_scales, 3, Device::cpu(), "op"),
                        Code::invalid_argument, "v_scales"));
}

}  // namespace
}  // namespace kvcache::ops
