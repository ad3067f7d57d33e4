// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// Host side of the write kernels' launches, shared by their .cu files (include from .cu only):
// the launch with a programmatic dependent-launch edge (the kernels' wait_for_previous_grid /
// allow_next_grid in device/write_common.cuh), the GPU made current for it, the input-type
// dispatch over backend::kCudaWriteInputTypes, and small host helpers.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>

#include <cuda_runtime.h>

#include "kvcache/device.h"
#include "kvcache/dtype.h"
#include "kvcache/status.h"

#include "backend/cuda/device/convert.cuh"
#include "backend/cuda/device/write_common.cuh"
#include "backend/cuda_write_ops.h"

namespace kvcache::cuda {

// The write kernels' block size: four warps.
inline constexpr int kWriteThreads = 128;

// Whether the write kernels are launched with a programmatic (dependent-launch) edge to the
// kernel before them. Off, they launch as <<<>>> would; the kernels are correct either way.
inline constexpr bool kProgrammaticLaunch = true;

// Launches kernel on stream with `smem` bytes of dynamic shared memory. With kProgrammaticLaunch
// (and a stream other than the legacy default one), with a dependent-launch edge to the kernel
// before it: this launch is set up while that one finishes, and the kernel waits for it before
// touching memory (write_common.cuh). Returns the launch's error (nothing is launched on an
// error).
template <class... Params, class... Args>
cudaError_t launch_write_kernel_smem(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                                     cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = kProgrammaticLaunch && stream != nullptr ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, static_cast<Args&&>(args)...);
}

// The same without dynamic shared memory.
template <class... Params, class... Args>
cudaError_t launch_write_kernel(void (*kernel)(Params...), dim3 grid, dim3 block,
                                cudaStream_t stream, Args&&... args) {
  return launch_write_kernel_smem(kernel, grid, block, 0, stream, static_cast<Args&&>(args)...);
}

// Makes the stream's GPU current for a launch and gives the caller's back afterwards (a kernel is
// launched from its stream's device).
class ScopedDevice {
 public:
  explicit ScopedDevice(int index) {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    if (previous_ != index) {
      error_ = cudaSetDevice(index);
      changed_ = error_ == cudaSuccess && previous_ >= 0;
    }
  }
  ~ScopedDevice() {
    if (changed_) (void)cudaSetDevice(previous_);
  }
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;
  [[nodiscard]] cudaError_t error() const { return error_; }

 private:
  int previous_ = -1;
  bool changed_ = false;
  cudaError_t error_ = cudaSuccess;
};

// internal naming the op and the call, or OK.
inline Status launch_status(std::string_view op, cudaError_t err) {
  if (err == cudaSuccess) return Status();
  (void)cudaGetLastError();  // a launch error is not sticky: clear it for the next call
  return Status::internal(std::string(op) + ": kernel launch failed: " + cudaGetErrorName(err) +
                          " (" + cudaGetErrorString(err) + ")");
}

// kvcache::DType -> Elem (the same numbers, checked here where both are known).
constexpr Elem to_elem(DType d) {
  static_assert(static_cast<int>(DType::f32) == static_cast<int>(Elem::f32) &&
                static_cast<int>(DType::f16) == static_cast<int>(Elem::f16) &&
                static_cast<int>(DType::bf16) == static_cast<int>(Elem::bf16) &&
                static_cast<int>(DType::fp8_e4m3) == static_cast<int>(Elem::e4m3) &&
                static_cast<int>(DType::int8) == static_cast<int>(Elem::int8));
  return static_cast<Elem>(static_cast<uint8_t>(d));
}

// Host storage type -> device storage type.
template <class T>
struct cuda_type {
  using type = T;
};
template <>
struct cuda_type<f16_t> {
  using type = F16;
};
template <>
struct cuda_type<bf16_t> {
  using type = BF16;
};
template <class T>
using cuda_type_t = typename cuda_type<T>::type;

// Calls f(std::type_identity<In>{}) with In the device type of `dtype`, one of
// backend::kCudaWriteInputTypes; invalid_argument listing them otherwise.
template <class F>
Status dispatch_input(DType dtype, std::string_view op, F&& f) {
  for (DType t : backend::kCudaWriteInputTypes) {
    if (t != dtype) continue;
    return dispatch_dtype(dtype, [&]<class T>(std::type_identity<T>) -> Status {
      if constexpr (std::is_same_v<T, float> || std::is_same_v<T, f16_t> ||
                    std::is_same_v<T, bf16_t>) {
        return f(std::type_identity<cuda_type_t<T>>{});
      } else {
        return Status::internal(std::string(op) + ": no kernel for " + name(dtype));
      }
    });
  }
  return Status::invalid_argument(std::string(op) + ": input dtype is " + name(dtype) +
                                  ", expected one of f32, f16, bf16");
}

// Whether p is a multiple of `bytes`.
inline bool aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// The smallest power of two >= n.
inline int pow2_at_least(int64_t n) {
  int w = 1;
  while (w < n) w *= 2;
  return w;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The device-side pool of a launcher's pool side.
inline DevicePool device_pool(const backend::CudaPoolSide& s) {
  DevicePool p;
  p.data = s.pool;
  p.scales = s.scales;
  p.elem = to_elem(s.dtype);
  p.dim = static_cast<int32_t>(s.dim);
  p.page_stride = s.page_stride;
  p.slot_stride = s.slot_stride;
  p.head_stride = s.head_stride;
  p.scale_page_stride = s.scale_page_stride;
  p.scale_slot_stride = s.scale_slot_stride;
  p.scale_head_stride = s.scale_head_stride;
  return p;
}

inline DeviceSlots device_slots(const backend::CudaTokenSlots& s) {
  DeviceSlots d;
  d.slot_mapping = s.slot_mapping;
  d.batch_indices = s.batch_indices;
  d.positions = s.positions;
  d.indptr = s.indptr;
  d.indices = s.indices;
  d.batch = s.batch;
  d.num_indices = s.num_indices;
  d.num_pages = s.num_pages;
  d.page_size = s.page_size;
  // A page of 2^31 slots or more divides every slot below 2^31 (the fast path) to page 0.
  d.page_div =
      FastDiv::make(static_cast<uint32_t>(std::min<int64_t>(s.page_size, int64_t{1} << 31)));
  return d;
}

// Whether a pool takes 8-element chunks: 16-byte aligned (its rows then start at multiples of 8
// elements when dim is one).
inline bool pool_vectorizable(const backend::CudaPoolSide& s) {
  return s.dim % 8 == 0 && aligned(s.pool, 16);
}

}  // namespace kvcache::cuda
