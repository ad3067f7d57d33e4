// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// Buffer: owning, device-aware memory. CPU buffers are 64-byte aligned; CUDA buffers come from
// cudaMalloc (unavailable when built without CUDA). Move-only; a Buffer is thread-compatible.

#include <cstddef>
#include <initializer_list>

#include "kvcache/device.h"
#include "kvcache/export.h"
#include "kvcache/status.h"
#include "kvcache/tensor.h"

namespace kvcache {

inline constexpr size_t kCpuAlignment = 64;

class KVCACHE_API Buffer {
 public:
  Buffer() = default;  // empty: no memory
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& other) noexcept;
  Buffer& operator=(Buffer&& other) noexcept;
  ~Buffer();

  // num_bytes uninitialized bytes on `device`. resource_exhausted when the allocator fails,
  // unavailable for a CUDA device in a build without CUDA or without that GPU.
  static Result<Buffer> allocate(Device device, size_t num_bytes);
  // A copy of the contents, on the same device.
  [[nodiscard]] Result<Buffer> clone() const;

  [[nodiscard]] void* data() { return data_; }
  [[nodiscard]] const void* data() const { return data_; }
  [[nodiscard]] size_t num_bytes() const { return num_bytes_; }
  [[nodiscard]] Device device() const { return device_; }
  [[nodiscard]] bool empty() const { return num_bytes_ == 0; }

  // A row-major view of the front of the buffer. REQUIRES: the view fits in num_bytes().
  [[nodiscard]] TensorView view(DType dtype, std::initializer_list<int64_t> shape) const;

 private:
  void release();

  void* data_ = nullptr;
  size_t num_bytes_ = 0;
  Device device_ = Device::cpu();
};

// Copies num_bytes between any two devices (host<->device, device<->device, host<->host).
[[nodiscard]] KVCACHE_API Status copy_bytes(void* dst, Device dst_device, const void* src,
                                            Device src_device, size_t num_bytes);

}  // namespace kvcache
