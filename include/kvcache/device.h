// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// Device names where bytes live and where work runs; Stream names the queue work is issued on.
// Both are plain values: intentionally copyable, thread-compatible.

#include <cstdint>
#include <string>

#include "kvcache/export.h"

namespace kvcache {

class ThreadPool;

enum class DeviceKind : uint8_t { cpu, cuda };

struct Device {
  DeviceKind kind = DeviceKind::cpu;
  int index = 0;  // GPU ordinal for cuda; 0 for cpu

  static constexpr Device cpu() { return Device{}; }
  static constexpr Device cuda(int index) { return Device{DeviceKind::cuda, index}; }
  [[nodiscard]] bool is_cpu() const { return kind == DeviceKind::cpu; }
  friend bool operator==(const Device&, const Device&) = default;
};

// "cpu" or "cuda:0".
[[nodiscard]] KVCACHE_API std::string to_string(Device device);

// The number of CUDA devices usable by this process: 0 when built without CUDA or when no GPU
// (or no driver) is present. Never fails.
[[nodiscard]] KVCACHE_API int cuda_device_count();

// Where work is issued. On the CPU: inline on the caller's thread, or spread over `pool` when set
// (not owned). On CUDA: `cuda_stream` is a cudaStream_t (nullptr is the default stream).
struct Stream {
  Device device = Device::cpu();
  ThreadPool* pool = nullptr;
  void* cuda_stream = nullptr;
};

}  // namespace kvcache
