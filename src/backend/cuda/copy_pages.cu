// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// copy_pages on CUDA: a page is one contiguous block in every pool (the page axis is outermost in
// both layouts). One launch: blockIdx.y walks the copies, blockIdx.x the units (16 bytes where the
// page size and the pool allow) of the copy's K page, V page and scale pages laid end to end; each
// thread issues its kUnroll loads before its stores. A copy whose src or dst page is out of range
// is skipped and counted by the first thread of its first block.

#include <algorithm>
#include <cstdint>

#include "backend/cuda/device/write_common.cuh"
#include "backend/cuda/write_launch.cuh"
#include "backend/cuda_write_ops.h"

namespace kvcache::backend {
namespace {

constexpr int kUnroll = 4;
constexpr unsigned kMaxGridY = 65535;

struct CopyPagesKernelParams {
  std::byte* base[4] = {};  // K pages, V pages, K scales, V scales (null: none)
  int64_t page_bytes[4] = {};
  int32_t unit[4] = {1, 1, 1, 1};  // bytes per copy unit: 16, 8, 4, 2 or 1
  int64_t begin[5] = {};           // the units of array a are [begin[a], begin[a + 1]) of a copy
  const int32_t* src = nullptr;
  const int32_t* dst = nullptr;
  int64_t num_copies = 0;
  int64_t num_pages = 0;
  cuda::DeviceErrorRecord* errors = nullptr;
};

__global__ void __launch_bounds__(cuda::kWriteThreads)
    copy_pages_kernel(const __grid_constant__ CopyPagesKernelParams p) {
  cuda::begin_write_kernel();
  const int64_t first = static_cast<int64_t>(blockIdx.x) * cuda::kWriteThreads * kUnroll +
                        static_cast<int64_t>(threadIdx.x);
  for (int64_t c = blockIdx.y; c < p.num_copies; c += gridDim.y) {
    const int64_t from = p.src[c];
    const int64_t to = p.dst[c];
    const bool src_ok = from >= 0 && from < p.num_pages;
    const bool dst_ok = to >= 0 && to < p.num_pages;
    if (!src_ok || !dst_ok) {
      if (blockIdx.x == 0 && threadIdx.x == 0) {
        if (!src_ok) {
          cuda::record_error(p.errors, cuda::ErrorOp::copy_pages, cuda::ErrorArg::src_pages, c,
                             from, 0, p.num_pages);
        }
        if (!dst_ok) {
          cuda::record_error(p.errors, cuda::ErrorOp::copy_pages, cuda::ErrorArg::dst_pages, c, to,
                             0, p.num_pages);
        }
      }
      continue;
    }
    uint4 value[kUnroll];
    std::byte* out[kUnroll];
    int unit[kUnroll];
#pragma unroll
    for (int r = 0; r < kUnroll; ++r) {
      out[r] = nullptr;
      unit[r] = 16;
      const int64_t item = first + static_cast<int64_t>(r) * cuda::kWriteThreads;
      if (item >= p.begin[4]) continue;
      int a = 0;
      while (item >= p.begin[a + 1]) ++a;
      const int64_t at = (item - p.begin[a]) * p.unit[a];
      const std::byte* in = p.base[a] + from * p.page_bytes[a] + at;
      out[r] = p.base[a] + to * p.page_bytes[a] + at;
      unit[r] = p.unit[a];
      value[r] = cuda::load_unit(in, unit[r]);
    }
#pragma unroll
    for (int r = 0; r < kUnroll; ++r) {
      if (out[r] != nullptr) cuda::store_unit(out[r], unit[r], value[r]);
    }
  }
}

}  // namespace

Status cuda_copy_pages(const CudaCopyPagesParams& p, const Stream& stream) {
  constexpr std::string_view kOp = "copy_pages";
  if (p.num_copies == 0) return Status();
  CopyPagesKernelParams k;
  for (int a = 0; a < 4; ++a) {
    k.base[a] = p.base[a];
    k.page_bytes[a] = p.base[a] != nullptr ? p.page_bytes[a] : 0;
    // The widest unit dividing the page and the pool's address.
    int unit = 16;
    while (unit > 1 &&
           (k.page_bytes[a] % unit != 0 || !cuda::aligned(k.base[a], static_cast<size_t>(unit)))) {
      unit /= 2;
    }
    k.unit[a] = unit;
    k.begin[a + 1] = k.begin[a] + k.page_bytes[a] / unit;
  }
  if (k.begin[4] > kCudaMaxElements) {
    return Status::invalid_argument(std::string(kOp) +
                                    ": a page spans more than 2^31 - 1 copy units, expected fewer");
  }
  k.src = p.src;
  k.dst = p.dst;
  k.num_copies = p.num_copies;
  k.num_pages = p.num_pages;
  k.errors = static_cast<cuda::DeviceErrorRecord*>(p.errors);
  const dim3 grid(static_cast<unsigned>(cuda::ceil_div(k.begin[4], cuda::kWriteThreads * kUnroll)),
                  static_cast<unsigned>(std::min<int64_t>(p.num_copies, kMaxGridY)));
  cuda::ScopedDevice device(stream.device.index);
  if (device.error() != cudaSuccess) return cuda::launch_status(kOp, device.error());
  return cuda::launch_status(
      kOp, cuda::launch_write_kernel(copy_pages_kernel, grid, dim3(cuda::kWriteThreads),
                                     static_cast<cudaStream_t>(stream.cuda_stream), k));
}

}  // namespace kvcache::backend
