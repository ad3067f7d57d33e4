// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "kvcache/tensor.h"

#include <numeric>
#include <vector>

#include <gtest/gtest.h>

#include "testing/test_util.h"

namespace kvcache {
namespace {

using testing::has_error;

TEST(TensorView, ContiguousStridesAndSizes) {
  std::vector<float> data(2 * 3 * 4);
  const TensorView t = TensorView::contiguous(data.data(), DType::f32, {2, 3, 4});
  EXPECT_EQ(t.rank, 3);
  EXPECT_EQ(t.stride(0), 12);
  EXPECT_EQ(t.stride(1), 4);
  EXPECT_EQ(t.stride(2), 1);
  EXPECT_EQ(t.numel(), 24);
  EXPECT_EQ(t.num_bytes(), 96u);
  EXPECT_TRUE(t.is_contiguous());
  EXPECT_EQ(t.shape_string(), "[2, 3, 4]");
  const int64_t idx[] = {1, 2, 3};
  EXPECT_EQ(t.element_ptr(idx), data.data() + 23);
}

TEST(TensorView, TransposedIsNotContiguous) {
  std::vector<float> data(6);
  TensorView t = TensorView::contiguous(data.data(), DType::f32, {2, 3});
  std::swap(t.shape[0], t.shape[1]);
  std::swap(t.strides[0], t.strides[1]);
  EXPECT_FALSE(t.is_contiguous());
  EXPECT_TRUE(
      has_error(check_contiguous(t, "op", "x"), Code::invalid_argument,
                "op: x is not contiguous (strides [1, 3]), expected row-major strides [2, 1]"));
}

TEST(TensorView, CheckShapeNamesTheDimension) {
  std::vector<float> data(1 * 7 * 3 * 64);
  const TensorView t = TensorView::contiguous(data.data(), DType::f32, {1, 7, 3, 64});
  EXPECT_OK(check_shape(t, {{1, "B"}, {7, "num_kv_heads"}, {-1, "L"}, {64, "head_dim"}}, "update",
                        "keys"));
  EXPECT_TRUE(has_error(
      check_shape(t, {{1, "B"}, {8, "num_kv_heads"}, {-1, "L"}, {64, "head_dim"}}, "update",
                  "keys"),
      Code::invalid_argument,
      "update: keys dim 1 (num_kv_heads) is 7, expected 8; shape [1, 7, 3, 64], expected [B=1, "
      "num_kv_heads=8, L, head_dim=64]"));
  EXPECT_TRUE(has_error(check_shape(t, {{7, "H"}, {-1, "L"}, {64, "D"}}, "append", "k"),
                        Code::invalid_argument, "append: k has rank 4"));
}

TEST(TensorView, CheckDtypeDeviceData) {
  float x = 1.0f;
  TensorView t = TensorView::contiguous(&x, DType::f32, {1});
  EXPECT_OK(check_dtype(t, DType::f32, "op", "x"));
  EXPECT_TRUE(has_error(check_dtype(t, DType::bf16, "op", "x"), Code::invalid_argument,
                        "op: x has dtype f32, expected bf16"));
  EXPECT_OK(check_device(t, Device::cpu(), "op", "x"));
  EXPECT_TRUE(has_error(check_device(t, Device::cuda(1), "op", "x"), Code::invalid_argument,
                        "op: x is on cpu, expected cuda:1"));
  t.data = nullptr;
  EXPECT_TRUE(has_error(check_data(t, "op", "x"), Code::invalid_argument, "null data"));
}

TEST(CopyInto, StridedToStridedPreservesEveryElement) {
  // src [2, 3, 4] contiguous; dst is the same shape laid out as [3, 2, 4] storage (axes 0,1
  // swapped).
  std::vector<int32_t> src(24);
  std::iota(src.begin(), src.end(), 100);
  std::vector<int32_t> dst(24, -1);
  const TensorView s = TensorView::contiguous(src.data(), DType::f32, {2, 3, 4});
  TensorView d = TensorView::contiguous(dst.data(), DType::f32, {2, 3, 4});
  d.strides = {4, 8, 1};
  ASSERT_OK(copy_into(s, d));
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 3; ++j)
      for (int k = 0; k < 4; ++k) EXPECT_EQ(dst[j * 8 + i * 4 + k], src[i * 12 + j * 4 + k]);

  // Last axis strided too (element-wise path).
  std::vector<int32_t> back(24, -1);
  TensorView b = TensorView::contiguous(back.data(), DType::f32, {4, 3, 2});
  std::vector<int32_t> expect(24);
  TensorView st = s;  // view s as [4, 3, 2] by reversing axes
  st.shape = {4, 3, 2};
  st.strides = {1, 4, 12};
  ASSERT_OK(copy_into(st, b));
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 3; ++j)
      for (int k = 0; k < 2; ++k) EXPECT_EQ(back[i * 6 + j * 2 + k], src[k * 12 + j * 4 + i]);
}

TEST(CopyInto, RefusesMismatches) {
  std::vector<float> a(6, 1.0f), b(6, 2.0f);
  const TensorView s = TensorView::contiguous(a.data(), DType::f32, {2, 3});
  EXPECT_TRUE(has_error(copy_into(s, TensorView::contiguous(b.data(), DType::f32, {3, 2})),
                        Code::invalid_argument,
                        "copy: src has shape [2, 3], expected dst's shape [3, 2]"));
  EXPECT_TRUE(has_error(copy_into(s, TensorView::contiguous(b.data(), DType::f16, {2, 3})),
                        Code::invalid_argument, "expected f16"));
  EXPECT_EQ(b, std::vector<float>(6, 2.0f));  // nothing written
}

TEST(ViewBytes, FollowsStrides) {
  std::vector<uint8_t> raw(8);
  std::iota(raw.begin(), raw.end(), 0);
  TensorView t = TensorView::contiguous(raw.data(), DType::int8, {2, 4});
  t.shape = {4, 2};
  t.strides = {1, 4};
  EXPECT_EQ(testing::view_bytes(t), (std::vector<uint8_t>{0, 4, 1, 5, 2, 6, 3, 7}));
}

}  // namespace
}  // namespace kvcache
