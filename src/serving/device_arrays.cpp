// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "serving/device_arrays.h"

#include <algorithm>

namespace kvcache::serving {
namespace {

constexpr size_t kAlignment = 256;  // what cudaMalloc gives; enough for every element type
constexpr size_t kMinBlockBytes = size_t{1} << 16;

size_t round_up(size_t n) { return (n + kAlignment - 1) / kAlignment * kAlignment; }

}  // namespace

void DeviceArrays::reset() {
  // A step that needed several blocks gets one block of their total size next time.
  if (blocks_.size() > 1) {
    size_t total = 0;
    for (const Buffer& b : blocks_) total += b.num_bytes();
    blocks_.clear();
    if (Result<Buffer> b = Buffer::allocate(device_, total); b.ok()) {
      blocks_.push_back(std::move(*b));
    }  // else: take() allocates (and reports) again when needed
  }
  used_ = 0;
}

Result<void*> DeviceArrays::take(size_t num_bytes) {
  const size_t need = round_up(std::max<size_t>(num_bytes, 1));
  if (blocks_.empty() || used_ + need > blocks_.back().num_bytes()) {
    const size_t last = blocks_.empty() ? 0 : blocks_.back().num_bytes();
    Result<Buffer> b = Buffer::allocate(device_, std::max({need, 2 * last, kMinBlockBytes}));
    if (!b.ok()) return b.status();
    blocks_.push_back(std::move(*b));
    used_ = 0;
  }
  void* at = static_cast<std::byte*>(blocks_.back().data()) + used_;
  used_ += need;
  return at;
}

Result<void*> DeviceArrays::stage_bytes(const void* host, size_t num_bytes) {
  // The ops only read staged memory, so on the CPU the host array itself will do.
  if (device_.is_cpu()) return const_cast<void*>(host);
  Result<void*> at = take(num_bytes);
  if (!at.ok()) return at.status();
  if (num_bytes == 0) return *at;
  if (Status s = copy_bytes(*at, device_, host, Device::cpu(), num_bytes); !s.ok()) return s;
  return *at;
}

}  // namespace kvcache::serving
