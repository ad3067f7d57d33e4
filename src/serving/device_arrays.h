// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// DeviceArrays: puts the host arrays of one step (activations, slot mappings, page tables,
// sequence lengths) where the ops read them, and the ops' outputs back. On the CPU it copies and
// allocates nothing: the ops work on the host arrays themselves. On CUDA, stage() copies into
// device memory it owns, output_for() hands out device memory for a result and download() copies
// it back (copy_bytes, which waits for the device). Device memory grows to the largest step and
// is then reused; what it handed out stays valid until reset(). Not thread-safe: one scheduler
// thread owns it.

#include <cstddef>
#include <span>
#include <vector>

#include "kvcache/buffer.h"
#include "kvcache/device.h"
#include "kvcache/status.h"

namespace kvcache::serving {

class DeviceArrays {
 public:
  explicit DeviceArrays(Device device) : device_(device) {}
  DeviceArrays(const DeviceArrays&) = delete;
  DeviceArrays& operator=(const DeviceArrays&) = delete;
  DeviceArrays(DeviceArrays&&) = default;
  DeviceArrays& operator=(DeviceArrays&&) = default;

  [[nodiscard]] Device device() const { return device_; }

  // Starts a step: everything handed out before becomes invalid.
  // REQUIRES: the device is done with it (the caller synchronized, e.g. check_device_errors).
  void reset();

  // `host` on the device: the same memory on the CPU, a copy on CUDA. resource_exhausted when
  // device memory runs out; copy_bytes's errors.
  template <class T>
  [[nodiscard]] Result<std::span<const T>> stage(std::span<const T> host) {
    Result<void*> at = stage_bytes(host.data(), host.size_bytes());
    if (!at.ok()) return at.status();
    return std::span<const T>(static_cast<const T*>(*at), host.size());
  }
  template <class T>
  [[nodiscard]] Result<std::span<const T>> stage(const std::vector<T>& host) {
    return stage(std::span<const T>(host));
  }
  // Where an op should write a result bound for `host`: `host` itself on the CPU, uninitialized
  // device memory of the same size on CUDA (then download() it). resource_exhausted when device
  // memory runs out.
  template <class T>
  [[nodiscard]] Result<T*> output_for(std::span<T> host) {
    if (device_.is_cpu()) return host.data();
    Result<void*> at = take(host.size_bytes());
    if (!at.ok()) return at.status();
    return static_cast<T*>(*at);
  }
  // Copies `host.size()` elements at `src` (from output_for(host)) into host; nothing on the CPU.
  template <class T>
  [[nodiscard]] Status download(std::span<T> host, const T* src) const {
    if (src == host.data() || host.empty()) return Status();
    return copy_bytes(host.data(), Device::cpu(), src, device_, host.size_bytes());
  }

 private:
  Result<void*> stage_bytes(const void* host, size_t num_bytes);
  Result<void*> take(size_t num_bytes);

  Device device_;
  std::vector<Buffer> blocks_;  // the last one is being filled
  size_t used_ = 0;             // bytes taken from the last block
};

}  // namespace kvcache::serving
