// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "kvcache/device.h"

#include "backend/device_memory.h"

namespace kvcache {

std::string to_string(Device device) {
  if (device.is_cpu()) return "cpu";
  return "cuda:" + std::to_string(device.index);
}

int cuda_device_count() { return backend::cuda_device_count(); }

Status check_device_errors(const Stream& stream) { return backend::take_device_errors(stream); }

}  // namespace kvcache
