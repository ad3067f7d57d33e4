// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// CUDA runtime memory calls; runtime errors become Status at this first host frame.
#include "backend/device_memory.h"

#include <string>

#include <cuda_runtime.h>

namespace kvcache::backend {
namespace {

Status cuda_error(const char* op, const char* call, cudaError_t err) {
  const std::string msg = std::string(op) + ": " + call + " failed: " + cudaGetErrorName(err) +
                          " (" + cudaGetErrorString(err) + ")";
  if (err == cudaErrorMemoryAllocation) return Status::resource_exhausted(msg);
  if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver ||
      err == cudaErrorInvalidDevice) {
    return Status::unavailable(msg);
  }
  return Status::internal(msg);
}

Status set_device(const char* op, int index) {
  if (index < 0 || index >= cuda_device_count()) {
    return Status::unavailable(std::string(op) + ": cuda:" + std::to_string(index) +
                               " does not exist, expected an index below " +
                               std::to_string(cuda_device_count()));
  }
  const cudaError_t err = cudaSetDevice(index);
  return err == cudaSuccess ? Status() : cuda_error(op, "cudaSetDevice", err);
}

}  // namespace

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return count;
}

Result<void*> cuda_malloc(int index, size_t num_bytes) {
  if (Status s = set_device("Buffer.allocate", index); !s.ok()) return s;
  void* ptr = nullptr;
  const cudaError_t err = cudaMalloc(&ptr, num_bytes);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return cuda_error("Buffer.allocate", "cudaMalloc", err);
  }
  return ptr;
}

void cuda_free(int index, void* ptr) {
  if (cudaSetDevice(index) == cudaSuccess) (void)cudaFree(ptr);
}

Status cuda_copy(void* dst, Device dst_device, const void* src, Device src_device,
                 size_t num_bytes) {
  const int index = dst_device.is_cpu() ? src_device.index : dst_device.index;
  if (Status s = set_device("copy_bytes", index); !s.ok()) return s;
  const cudaError_t err = cudaMemcpy(dst, src, num_bytes, cudaMemcpyDefault);
  return err == cudaSuccess ? Status() : cuda_error("copy_bytes", "cudaMemcpy", err);
}

}  // namespace kvcache::backend
