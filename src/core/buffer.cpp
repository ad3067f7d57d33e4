// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "kvcache/buffer.h"

#include <cstdlib>
#include <cstring>
#include <new>
#include <string>

#include "backend/device_memory.h"
#include "core/check.h"

namespace kvcache {

Buffer::Buffer(Buffer&& other) noexcept
    : data_(other.data_), num_bytes_(other.num_bytes_), device_(other.device_) {
  other.data_ = nullptr;
  other.num_bytes_ = 0;
}

Buffer& Buffer::operator=(Buffer&& other) noexcept {
  if (this != &other) {
    release();
    data_ = other.data_;
    num_bytes_ = other.num_bytes_;
    device_ = other.device_;
    other.data_ = nullptr;
    other.num_bytes_ = 0;
  }
  return *this;
}

Buffer::~Buffer() { release(); }

void Buffer::release() {
  if (data_ != nullptr) {
    if (device_.is_cpu()) {
      std::free(data_);
    } else {
      backend::cuda_free(device_.index, data_);
    }
  }
  data_ = nullptr;
  num_bytes_ = 0;
}

Result<Buffer> Buffer::allocate(Device device, size_t num_bytes) {
  Buffer b;
  b.device_ = device;
  if (num_bytes == 0) return b;
  if (device.is_cpu()) {
    // aligned_alloc wants a multiple of the alignment.
    const size_t rounded = (num_bytes + kCpuAlignment - 1) / kCpuAlignment * kCpuAlignment;
    b.data_ = rounded < num_bytes ? nullptr : std::aligned_alloc(kCpuAlignment, rounded);
    if (b.data_ == nullptr) {
      return Status::resource_exhausted("Buffer.allocate: " + std::to_string(num_bytes) +
                                        " bytes on cpu failed, expected the allocator to succeed");
    }
  } else {
    Result<void*> ptr = backend::cuda_malloc(device.index, num_bytes);
    if (!ptr.ok()) return ptr.status();
    b.data_ = *ptr;
  }
  b.num_bytes_ = num_bytes;
  return b;
}

Result<Buffer> Buffer::clone() const {
  Result<Buffer> copy = allocate(device_, num_bytes_);
  if (!copy.ok() || num_bytes_ == 0) return copy;
  if (Status s = copy_bytes(copy->data(), device_, data_, device_, num_bytes_); !s.ok()) return s;
  return copy;
}

TensorView Buffer::view(DType dtype, std::initializer_list<int64_t> shape) const {
  TensorView t = TensorView::contiguous(data_, dtype, shape, device_);
  KV_CHECK(t.num_bytes() <= num_bytes_);
  return t;
}

Status copy_bytes(void* dst, Device dst_device, const void* src, Device src_device,
                  size_t num_bytes) {
  if (num_bytes == 0) return Status();
  if (dst_device.is_cpu() && src_device.is_cpu()) {
    std::memcpy(dst, src, num_bytes);
    return Status();
  }
  return backend::cuda_copy(dst, dst_device, src, src_device, num_bytes);
}

}  // namespace kvcache
