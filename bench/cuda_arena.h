// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// The device memory of one `bench ops --device cuda` case, and how to fill it: random valid
// values made on the GPU (no host-side generation of gigabytes), host arrays copied over. Owns
// every buffer it hands out. Not thread-safe.

#include <cstdint>
#include <span>
#include <vector>

#include "kvcache/buffer.h"
#include "kvcache/device.h"
#include "kvcache/status.h"
#include "kvcache/tensor.h"

namespace kvcache::bench {

// Llama-3-8B heads and the page size of every GPU case.
inline constexpr int64_t kQHeads = 32;
inline constexpr int64_t kKVHeads = 8;
inline constexpr int64_t kHeadDim = 128;
inline constexpr int64_t kPageSize = 16;

class DeviceArena {
 public:
  explicit DeviceArena(Stream stream) : stream_(stream) {}
  DeviceArena(const DeviceArena&) = delete;
  DeviceArena& operator=(const DeviceArena&) = delete;

  // A contiguous array of random valid values of dtype in [lo, hi) (int8 / fp8: their whole
  // valid range), filled on the arena's stream.
  Result<TensorView> random(DType dtype, const std::vector<int64_t>& shape, float lo = -1.0f,
                            float hi = 1.0f);
  // A device copy of a host array.
  template <class T>
  Result<std::span<const T>> copy(const std::vector<T>& host) {
    Result<void*> d = copy_bytes_in(host.data(), host.size() * sizeof(T));
    if (!d.ok()) return d.status();
    return std::span<const T>(static_cast<const T*>(*d), host.size());
  }
  // Bytes on the device, uninitialized.
  Result<void*> allocate(size_t num_bytes);
  // Waits for the fills (on the arena's stream) and the copies (on the default stream, which the
  // arena's stream does not wait for): call once before the case is timed.
  [[nodiscard]] Status ready() const;

 private:
  Result<void*> copy_bytes_in(const void* host, size_t num_bytes);

  Stream stream_;
  uint32_t seed_ = 17;
  std::vector<Buffer> buffers_;
};

}  // namespace kvcache::bench
