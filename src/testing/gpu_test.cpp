// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "testing/gpu_test.h"

#include <algorithm>
#include <cstring>

#include "backend/cuda_bench.h"

namespace kvcache::testing {

size_t span_bytes(const TensorView& t) {
  if (t.numel() == 0) return 0;
  int64_t last = 0;
  for (int a = 0; a < t.rank; ++a) last += (t.shape[a] - 1) * t.strides[a];
  return static_cast<size_t>(last + 1) * size_of(t.dtype);
}

void GpuTest::SetUp() {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA GPU on this machine";
  Result<Stream> s = backend::cuda_create_stream(gpu());
  ASSERT_TRUE(s.ok()) << s.status().to_string();
  stream_ = *s;
}

void GpuTest::TearDown() {
  if (stream_.cuda_stream != nullptr) {
    EXPECT_TRUE(backend::cuda_synchronize(stream_).ok());
    backend::cuda_destroy_stream(stream_);
  }
  buffers_.clear();
}

void* GpuTest::upload_bytes(const void* host, size_t num_bytes) {
  Result<Buffer> b = Buffer::allocate(gpu(), std::max<size_t>(num_bytes, 1));
  if (!b.ok()) {
    ADD_FAILURE() << b.status().to_string();
    return nullptr;
  }
  if (num_bytes > 0) {
    Status s = copy_bytes(b->data(), gpu(), host, Device::cpu(), num_bytes);
    // cudaMemcpy from pageable memory may return before its DMA lands, and the test's stream does
    // not wait for the legacy default stream: wait here.
    if (s.ok()) s = backend::cuda_synchronize(Stream{gpu(), nullptr, nullptr});
    if (!s.ok()) ADD_FAILURE() << s.to_string();
  }
  buffers_.push_back(std::move(*b));
  return buffers_.back().data();
}

TensorView GpuTest::upload(const TensorView& host) {
  if (host.data == nullptr) return host;
  TensorView d = host;
  d.data = upload_bytes(host.data, span_bytes(host));
  d.device = gpu();
  return d;
}

TensorView GpuTest::poisoned(DType dtype, std::span<const int64_t> shape, uint8_t poison) {
  TensorView host = TensorView::contiguous(nullptr, dtype, shape);
  std::vector<uint8_t> bytes(host.num_bytes(), poison);
  TensorView d = host;
  d.data = upload_bytes(bytes.data(), bytes.size());
  d.device = gpu();
  return d;
}

std::vector<uint8_t> GpuTest::download(const TensorView& device_view) {
  sync();
  std::vector<uint8_t> out(span_bytes(device_view));
  if (!out.empty()) {
    const Status s =
        copy_bytes(out.data(), Device::cpu(), device_view.data, device_view.device, out.size());
    if (!s.ok()) ADD_FAILURE() << s.to_string();
  }
  return out;
}

void GpuTest::sync() {
  const Status s = backend::cuda_synchronize(stream_);
  if (!s.ok()) ADD_FAILURE() << s.to_string();
}

}  // namespace kvcache::testing
