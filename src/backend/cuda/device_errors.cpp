// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "backend/cuda/device_errors.h"

#include <array>
#include <mutex>
#include <string>

#include <cuda_runtime.h>

#include "backend/device_memory.h"

namespace kvcache::cuda {
namespace {

constexpr int kMaxDevices = 64;

const char* name(ErrorOp op) {
  switch (op) {
    case ErrorOp::none:
      return "kernel";
    case ErrorOp::kv_append:
      return "kv_append";
    case ErrorOp::paged_append:
      return "paged_append";
    case ErrorOp::copy_pages:
      return "copy_pages";
    case ErrorOp::qkv_rope_write:
      return "qkv_rope_write";
    case ErrorOp::decode_attention:
      return "decode_attention";
    case ErrorOp::extend_attention:
      return "extend_attention";
    case ErrorOp::rope_shift:
      return "rope_shift";
  }
  return "kernel";
}

const char* name(ErrorArg arg) {
  switch (arg) {
    case ErrorArg::offsets:
      return "offsets";
    case ErrorArg::new_lens:
      return "new_lens";
    case ErrorArg::slot_mapping:
      return "slot_mapping";
    case ErrorArg::batch_indices:
      return "batch_indices";
    case ErrorArg::positions:
      return "positions";
    case ErrorArg::page_indptr:
      return "page_table.indptr";
    case ErrorArg::page_indices:
      return "page_table.indices";
    case ErrorArg::seq_lens:
      return "seq_lens";
    case ErrorArg::q_indptr:
      return "q_indptr";
    case ErrorArg::src_pages:
      return "src_pages";
    case ErrorArg::dst_pages:
      return "dst_pages";
    case ErrorArg::p0:
      return "p0";
    case ErrorArg::p1:
      return "p1";
    case ErrorArg::delta:
      return "delta";
  }
  return "argument";
}

Status runtime_error(const char* call, cudaError_t err) {
  return Status::internal(std::string("check_device_errors: ") + call + " failed: " +
                          cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

std::mutex g_mutex;
std::array<DeviceErrorRecord*, kMaxDevices> g_records{};

}  // namespace

Result<DeviceErrorRecord*> device_error_record(Device device) {
  if (device.is_cpu() || device.index < 0 || device.index >= kMaxDevices ||
      device.index >= backend::cuda_device_count()) {
    return Status::unavailable("device_error_record: " + to_string(device) +
                               " is not a usable GPU, expected cuda:i with i below " +
                               std::to_string(backend::cuda_device_count()));
  }
  std::lock_guard<std::mutex> lock(g_mutex);
  DeviceErrorRecord*& record = g_records[static_cast<size_t>(device.index)];
  if (record != nullptr) return record;
  Result<void*> mem = backend::cuda_malloc(device.index, sizeof(DeviceErrorRecord));
  if (!mem.ok()) return mem.status();
  // Synchronous: kernels on other (non-blocking) streams must never see the record unzeroed.
  cudaError_t err = cudaMemset(*mem, 0, sizeof(DeviceErrorRecord));
  if (err == cudaSuccess) err = cudaDeviceSynchronize();
  if (err != cudaSuccess) {
    backend::cuda_free(device.index, *mem);
    return runtime_error("cudaMemset", err);
  }
  record = static_cast<DeviceErrorRecord*>(*mem);
  return record;
}

}  // namespace kvcache::cuda

namespace kvcache::backend {

Status take_device_errors(const Stream& stream) {
  if (stream.device.is_cpu()) return Status();
  Result<cuda::DeviceErrorRecord*> record = cuda::device_error_record(stream.device);
  if (!record.ok()) return record.status();
  auto* s = static_cast<cudaStream_t>(stream.cuda_stream);
  cuda::DeviceErrorRecord host{};
  if (cudaError_t err = cudaMemcpyAsync(&host, *record, sizeof(host), cudaMemcpyDeviceToHost, s);
      err != cudaSuccess) {
    return cuda::runtime_error("cudaMemcpyAsync", err);
  }
  if (cudaError_t err = cudaStreamSynchronize(s); err != cudaSuccess) {
    return cuda::runtime_error("cudaStreamSynchronize", err);
  }
  if (host.count == 0) return Status();
  if (cudaError_t err = cudaMemsetAsync(*record, 0, sizeof(host), s); err != cudaSuccess) {
    return cuda::runtime_error("cudaMemsetAsync", err);
  }
  if (cudaError_t err = cudaStreamSynchronize(s); err != cudaSuccess) {
    return cuda::runtime_error("cudaStreamSynchronize", err);
  }
  return Status::out_of_range(std::string(cuda::name(host.op)) + ": " + cuda::name(host.arg) + "[" +
                              std::to_string(host.index) + "] is " + std::to_string(host.value) +
                              ", expected in [" + std::to_string(host.lo) + ", " +
                              std::to_string(host.hi) + ") (" + std::to_string(host.count) +
                              " bad entries skipped on " + to_string(stream.device) +
                              "; counted by the kernels since the last check)");
}

}  // namespace kvcache::backend
