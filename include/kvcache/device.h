// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// Device names where bytes live and where work runs; Stream names the queue work is issued on.
// Both are plain values: intentionally copyable, thread-compatible.

#include <cstdint>
#include <string>

#include "kvcache/export.h"
#include "kvcache/status.h"

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

// CUDA kernels cannot return a Status: an index they must not follow (a slot, page, offset or
// position out of range) is skipped, counted, and the first one kept in a per-GPU error record.
// This synchronizes `stream`, then returns out_of_range naming the first bad entry and the count
// since the last check (and clears the record), or OK. Call it where the caller syncs anyway (end
// of a step): run() itself never syncs. Always OK for a CPU stream (CPU ops refuse bad input in
// run()). unavailable for a GPU that does not exist; internal for a CUDA runtime error.
[[nodiscard]] KVCACHE_API Status check_device_errors(const Stream& stream);

}  // namespace kvcache
