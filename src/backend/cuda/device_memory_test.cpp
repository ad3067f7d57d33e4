// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// GPU memory through the public Buffer API. Skips (never fails) where no GPU is present.
#include <cstdint>
#include <vector>

#include <gtest/gtest.h>

#include "kvcache/buffer.h"

#include "testing/test_util.h"

namespace kvcache {
namespace {

class CudaBuffer : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device on this machine";
  }
};

TEST_F(CudaBuffer, RoundTripThroughTheDevice) {
  std::vector<uint8_t> host(1 << 20);
  for (size_t i = 0; i < host.size(); ++i) host[i] = static_cast<uint8_t>(i * 31 + 7);
  Result<Buffer> dev = Buffer::allocate(Device::cuda(0), host.size());
  ASSERT_OK(dev);
  EXPECT_EQ(dev->device(), Device::cuda(0));
  ASSERT_OK(copy_bytes(dev->data(), Device::cuda(0), host.data(), Device::cpu(), host.size()));
  Result<Buffer> twin = dev->clone();  // device-to-device
  ASSERT_OK(twin);
  std::vector<uint8_t> back(host.size(), 0);
  ASSERT_OK(copy_bytes(back.data(), Device::cpu(), twin->data(), Device::cuda(0), back.size()));
  EXPECT_EQ(back, host);
}

TEST_F(CudaBuffer, MissingOrdinalIsUnavailable) {
  Result<Buffer> b = Buffer::allocate(Device::cuda(cuda_device_count()), 64);
  EXPECT_TRUE(testing::has_error(b, Code::unavailable, "does not exist"));
}

TEST_F(CudaBuffer, OutOfMemoryIsResourceExhausted) {
  Result<Buffer> b = Buffer::allocate(Device::cuda(0), size_t{1} << 50);  // 1 PiB
  EXPECT_TRUE(testing::has_error(b, Code::resource_exhausted, "cudaMalloc"));
}

// The kernels' bad-index reports start empty and a CPU stream has none (the ops' CUDA tests
// trip the record and read it back).
TEST_F(CudaBuffer, DeviceErrorRecordStartsClear) {
  EXPECT_OK(check_device_errors(Stream{Device::cuda(0), nullptr, nullptr}));
  EXPECT_OK(check_device_errors(Stream{}));
  EXPECT_TRUE(testing::has_error(
      check_device_errors(Stream{Device::cuda(cuda_device_count()), nullptr, nullptr}),
      Code::unavailable, "not a usable GPU"));
}

}  // namespace
}  // namespace kvcache
