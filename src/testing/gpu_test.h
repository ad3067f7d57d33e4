// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// A GoogleTest fixture for the CUDA ops' tests: it skips (GTEST_SKIP, reported as skipped) where
// no GPU is present, owns the device buffers a test uploads, and copies results back. Tests build
// their inputs on the host (random, never zeros), run the CPU plan or the float64 reference there,
// upload, run the CUDA plan and compare what comes back. Not thread-safe: one test at a time.

#include <cstdint>
#include <span>
#include <vector>

#include <gtest/gtest.h>

#include "kvcache/buffer.h"
#include "kvcache/device.h"
#include "kvcache/tensor.h"

namespace kvcache::testing {

class GpuTest : public ::testing::Test {
 protected:
  // Skips the test when cuda_device_count() is 0; else makes a non-default stream on cuda:0.
  void SetUp() override;
  void TearDown() override;

  [[nodiscard]] static Device gpu() { return Device::cuda(0); }
  // The test's stream on gpu() (a non-default cudaStream_t, so graph capture works).
  [[nodiscard]] const Stream& stream() const { return stream_; }

  // A device copy of a host view's bytes (the span its strides cover), viewed with the same shape
  // and strides on gpu(). An empty view stays empty. Fails the test on a CUDA error.
  TensorView upload(const TensorView& host);
  // A device copy of a host array.
  template <class T>
  std::span<const T> upload(std::span<const T> host) {
    if (host.empty()) return {};
    return {static_cast<const T*>(upload_bytes(host.data(), host.size_bytes())), host.size()};
  }
  template <class T>
  std::span<const T> upload(const std::vector<T>& host) {
    return upload(std::span<const T>(host));
  }
  // A contiguous device array of `shape` with every byte set to `poison` (an output to be written).
  TensorView poisoned(DType dtype, std::span<const int64_t> shape, uint8_t poison = 0xff);
  TensorView poisoned(DType dtype, std::initializer_list<int64_t> shape, uint8_t poison = 0xff) {
    return poisoned(dtype, std::span<const int64_t>(shape.begin(), shape.size()), poison);
  }
  // Raw device bytes, owned by the fixture.
  void* upload_bytes(const void* host, size_t num_bytes);
  // The bytes of a device view (the span its strides cover, in memory order), after the stream's
  // work finished. Fails the test on a CUDA error.
  std::vector<uint8_t> download(const TensorView& device_view);
  // Waits for the stream's work.
  void sync();

 private:
  Stream stream_;
  std::vector<Buffer> buffers_;
};

// The bytes a view's strides span, from its first element to one past its last.
[[nodiscard]] size_t span_bytes(const TensorView& t);

}  // namespace kvcache::testing
