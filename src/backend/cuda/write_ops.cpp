// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// Host side of the CUDA write ops that launches nothing: the error record a plan keeps, and the
// RoPE tables uploaded once per (configuration, GPU) and shared by the plans that hold them.

#include <algorithm>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <cuda_runtime.h>

#include "backend/cuda/device_errors.h"
#include "backend/cuda_write_ops.h"
#include "backend/device_memory.h"
#include "ops/rope_table.h"

namespace kvcache::backend {
namespace {

// Live device tables by (host table, GPU, with the attention factor). The device table holds its
// host table, so a key's address cannot be reused while its entry can still be locked.
struct RopeTableCache {
  std::mutex mu;
  std::map<std::tuple<const ops::RopeTable*, int, bool>, std::weak_ptr<const CudaRopeTable>> tables;
};

RopeTableCache& rope_cache() {
  static RopeTableCache* cache = new RopeTableCache();  // never destroyed: plans may outlive main
  return *cache;
}

// s with `prefix` before its message, same code.
Status prefixed(const Status& s, const std::string& prefix) {
  std::string m = prefix + s.message();
  switch (s.code()) {
    case Code::resource_exhausted:
      return Status::resource_exhausted(std::move(m));
    case Code::unavailable:
      return Status::unavailable(std::move(m));
    default:
      return Status::internal(std::move(m));
  }
}

Result<std::shared_ptr<const CudaRopeTable>> upload(std::shared_ptr<const ops::RopeTable> table,
                                                    Device device, std::string_view op,
                                                    bool with_attention_factor) {
  const size_t n = table->cos.size();
  // cos and sin (times the attention factor, in float, as the CPU kernels multiply them).
  const float factor = with_attention_factor ? table->attention_factor : 1.0f;
  std::vector<float> host(2 * n);
  for (size_t i = 0; i < n; ++i) {
    host[i] = table->cos[i] * factor;
    host[n + i] = table->sin[i] * factor;
  }
  const size_t bytes = std::max<size_t>(host.size() * sizeof(float), 16);
  Result<void*> mem = cuda_malloc(device.index, bytes);
  if (!mem.ok()) return prefixed(mem.status(), std::string(op) + ": RoPE table upload: ");
  Status copied = cuda_copy(*mem, device, host.data(), Device::cpu(), host.size() * sizeof(float));
  // A copy from pageable memory may return before its DMA lands, and the plan's kernels run on
  // streams that do not wait for the legacy default stream: wait for it here.
  if (copied.ok()) {
    if (cudaError_t err = cudaStreamSynchronize(cudaStreamLegacy); err != cudaSuccess) {
      copied = Status::internal(std::string(op) +
                                ": cudaStreamSynchronize failed: " + cudaGetErrorName(err));
    }
  }
  if (!copied.ok()) {
    cuda_free(device.index, *mem);
    return copied;
  }
  auto* raw = new CudaRopeTable();
  raw->device = device;
  raw->cos = static_cast<const float*>(*mem);
  raw->sin = static_cast<const float*>(*mem) + n;
  raw->max_position = table->max_position;
  raw->num_freqs = table->num_freqs;
  // The deleter keeps the host table alive with the device copy (the cache's key) and frees it.
  return std::shared_ptr<const CudaRopeTable>(
      raw, [index = device.index, mem = *mem, keep = std::move(table)](const CudaRopeTable* t) {
        cuda_free(index, mem);
        delete t;
      });
}

}  // namespace

Result<void*> cuda_write_error_record(Device device, std::string_view op) {
  Result<cuda::DeviceErrorRecord*> record = cuda::device_error_record(device);
  if (record.ok()) return static_cast<void*>(*record);
  if (record.status().code() != Code::unavailable) {
    return prefixed(record.status(), std::string(op) + ": ");
  }
  return Status::unavailable(std::string(op) + ": device " + to_string(device) +
                             " is not a usable GPU (" + std::to_string(cuda_device_count()) +
                             " found), expected cpu or cuda:i with i below that");
}

Result<std::shared_ptr<const CudaRopeTable>> cuda_rope_table(
    std::shared_ptr<const ops::RopeTable> table, Device device, std::string_view op,
    bool with_attention_factor) {
  RopeTableCache& cache = rope_cache();
  std::lock_guard<std::mutex> lock(cache.mu);
  const std::tuple<const ops::RopeTable*, int, bool> key{table.get(), device.index,
                                                         with_attention_factor};
  if (auto it = cache.tables.find(key); it != cache.tables.end()) {
    if (std::shared_ptr<const CudaRopeTable> live = it->second.lock()) return live;
  }
  for (auto it = cache.tables.begin(); it != cache.tables.end();) {  // drop dead entries
    it = it->second.expired() ? cache.tables.erase(it) : std::next(it);
  }
  Result<std::shared_ptr<const CudaRopeTable>> made =
      upload(std::move(table), device, op, with_attention_factor);
  if (made.ok()) cache.tables[key] = *made;
  return made;
}

}  // namespace kvcache::backend
