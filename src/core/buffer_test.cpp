// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "kvcache/buffer.h"

#include <cstdint>
#include <cstring>

#include <gtest/gtest.h>

#include "testing/test_util.h"

namespace kvcache {
namespace {

TEST(Buffer, CpuAllocationIsAlignedAndOwned) {
  for (size_t n : {1u, 63u, 64u, 1000u, 1u << 20}) {
    Result<Buffer> b = Buffer::allocate(Device::cpu(), n);
    ASSERT_OK(b);
    EXPECT_EQ(b->num_bytes(), n);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(b->data()) % kCpuAlignment, 0u);
    std::memset(b->data(), 0xab, n);  // the whole range is writable (ASan checks)
  }
}

TEST(Buffer, EmptyAndMove) {
  Result<Buffer> empty = Buffer::allocate(Device::cpu(), 0);
  ASSERT_OK(empty);
  EXPECT_TRUE(empty->empty());

  Result<Buffer> a = Buffer::allocate(Device::cpu(), 128);
  ASSERT_OK(a);
  void* p = a->data();
  Buffer moved = std::move(*a);
  EXPECT_EQ(moved.data(), p);
  EXPECT_TRUE(a->empty());  // NOLINT: moved-from is empty by contract
  Buffer assigned;
  assigned = std::move(moved);
  EXPECT_EQ(assigned.data(), p);
}

TEST(Buffer, CloneCopiesContents) {
  Result<Buffer> a = Buffer::allocate(Device::cpu(), 256);
  ASSERT_OK(a);
  auto* bytes = static_cast<uint8_t*>(a->data());
  for (int i = 0; i < 256; ++i) bytes[i] = static_cast<uint8_t>(i * 7 + 3);
  Result<Buffer> c = a->clone();
  ASSERT_OK(c);
  EXPECT_NE(c->data(), a->data());
  EXPECT_EQ(std::memcmp(c->data(), a->data(), 256), 0);
}

TEST(Buffer, ViewCoversTheFront) {
  Result<Buffer> a = Buffer::allocate(Device::cpu(), 4 * 6);
  ASSERT_OK(a);
  const TensorView t = a->view(DType::f32, {2, 3});
  EXPECT_EQ(t.data, a->data());
  EXPECT_EQ(t.numel(), 6);
}

TEST(Buffer, HugeCpuAllocationIsResourceExhausted) {
  Result<Buffer> b = Buffer::allocate(Device::cpu(), SIZE_MAX - 8);
  EXPECT_TRUE(testing::has_error(b, Code::resource_exhausted, "Buffer.allocate"));
}

TEST(Buffer, CudaWithoutGpuIsUnavailable) {
  if (cuda_device_count() > 0) GTEST_SKIP() << "a GPU is present; cuda_tests cover it";
  Result<Buffer> b = Buffer::allocate(Device::cuda(0), 64);
  EXPECT_TRUE(testing::has_error(b, Code::unavailable, "expected"));
}

}  // namespace
}  // namespace kvcache
