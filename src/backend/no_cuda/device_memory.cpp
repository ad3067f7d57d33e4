// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// Built without CUDA: GPUs do not exist for this library.
#include "backend/device_memory.h"

namespace kvcache::backend {
namespace {
Status not_built(const char* op) {
  return Status::unavailable(std::string(op) +
                             ": kvcache was built without CUDA, expected a build with "
                             "-DKVCACHE_CUDA=ON (or AUTO with nvcc found)");
}
}  // namespace

int cuda_device_count() { return 0; }
Result<void*> cuda_malloc(int, size_t) { return not_built("Buffer.allocate"); }
void cuda_free(int, void*) {}
Status cuda_copy(void*, Device, const void*, Device, size_t) { return not_built("copy_bytes"); }
Status take_device_errors(const Stream& stream) {
  return stream.device.is_cpu() ? Status() : not_built("check_device_errors");
}

}  // namespace kvcache::backend
