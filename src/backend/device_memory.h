// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// The backend's memory entry points. Defined by backend/cuda (CUDA runtime) or backend/no_cuda
// (every call returns unavailable), chosen by CMake: no #ifdef above this line.

#include <cstddef>

#include "kvcache/device.h"
#include "kvcache/status.h"

namespace kvcache::backend {

// Number of usable GPUs; 0 without CUDA, driver or device.
int cuda_device_count();
// Device memory on GPU `index`; resource_exhausted when out of memory.
Result<void*> cuda_malloc(int index, size_t num_bytes);
void cuda_free(int index, void* ptr);
// Synchronous copy where at least one side is a GPU.
Status cuda_copy(void* dst, Device dst_device, const void* src, Device src_device,
                 size_t num_bytes);

// kvcache::check_device_errors: syncs the stream, reads and clears its GPU's error record.
Status take_device_errors(const Stream& stream);

}  // namespace kvcache::backend
