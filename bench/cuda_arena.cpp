// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "bench/cuda_arena.h"

#include <algorithm>

#include "backend/cuda_bench.h"

namespace kvcache::bench {

Result<void*> DeviceArena::allocate(size_t num_bytes) {
  Result<Buffer> b = Buffer::allocate(stream_.device, std::max<size_t>(num_bytes, 16));
  if (!b.ok()) return b.status();
  buffers_.push_back(std::move(*b));
  return buffers_.back().data();
}

Result<TensorView> DeviceArena::random(DType dtype, const std::vector<int64_t>& shape, float lo,
                                       float hi) {
  TensorView t = TensorView::contiguous(nullptr, dtype, shape, stream_.device);
  Result<void*> d = allocate(t.num_bytes());
  if (!d.ok()) return d.status();
  t.data = *d;
  if (Status s = backend::cuda_fill_random(stream_, t.data, dtype, static_cast<size_t>(t.numel()),
                                           ++seed_, lo, hi);
      !s.ok()) {
    return s;
  }
  return t;
}

Result<void*> DeviceArena::copy_bytes_in(const void* host, size_t num_bytes) {
  Result<void*> d = allocate(num_bytes);
  if (!d.ok()) return d.status();
  if (Status s = copy_bytes(*d, stream_.device, host, Device::cpu(), num_bytes); !s.ok()) return s;
  return *d;
}

Status DeviceArena::ready() const {
  if (Status s = backend::cuda_synchronize(stream_); !s.ok()) return s;
  return backend::cuda_synchronize(Stream{stream_.device, nullptr, nullptr});
}

}  // namespace kvcache::bench
