// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// Host side of the device error record (device/errors.cuh): one record per GPU, allocated and
// zeroed on first use, kept for the life of the process (kernels hold its address inside
// captured CUDA graphs, so it never moves). Thread-safe.

#include "kvcache/device.h"
#include "kvcache/status.h"

#include "backend/cuda/device/errors.cuh"

namespace kvcache::cuda {

// The record of GPU `device`. Plans call this in select() (allocation is allowed there, not in
// run()) and pass the pointer to their kernels.
[[nodiscard]] Result<DeviceErrorRecord*> device_error_record(Device device);

}  // namespace kvcache::cuda
