// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// rope_shift on CUDA: every (token, kv head) K row of [p0[b], p1[b]) rotated by the angle of
// delta[b] in place, with the float operations of the CPU's portable kernels in their order
// (rope_write.cuh's rotate_first / rotate_second, ops/quantize.h's rule through append_row.cuh's
// store_row_scalar), so the result is the CPU's bits for finite inputs.
//
// Grid: blocks_per_seq blocks of four warps per sequence; a warp takes one row at a time (the
// sequence's rows strided over its blocks' warps), stages it in shared memory as floats
// (dequantized), rotates its pairs there (a lane per pair) and stores it back (requantized with a
// fresh scale). The per-sequence arguments live in device memory: each block checks its sequence
// first (seq_lens against the capacity or its pages, [p0, p1) against seq_lens, p1 and |delta|
// against the table, every page index the range touches); a sequence with a bad entry is left
// unchanged, counted once (by its first block) in the GPU's error record.

#include <cstdint>
#include <cstdlib>

#include "backend/cuda/device/append_row.cuh"
#include "backend/cuda/device/rope_write.cuh"
#include "backend/cuda/device/write_common.cuh"
#include "backend/cuda/write_launch.cuh"
#include "backend/cuda_write_ops.h"

namespace kvcache::backend {
namespace {

using cuda::DevicePool;
using cuda::ErrorArg;

constexpr int kWarps = cuda::kWriteThreads / 32;
// The blocks the grid aims at (about a wave on an H100: 132 SMs x 14 blocks of 16 KiB): a few
// sequences still spread over every multiprocessor; a large batch gets a block or more each.
constexpr int64_t kTargetBlocks = 2048;

struct RopeShiftKernelParams {
  DevicePool k;  // contiguous caches: page = sequence, slot = token
  bool paged = false;
  int32_t page_size = 1;
  int64_t num_pages = 0;
  const int32_t* indptr = nullptr;
  const int32_t* indices = nullptr;
  int64_t num_indices = 0;
  int64_t capacity = 0;  // contiguous
  const int32_t* p0 = nullptr;
  const int32_t* p1 = nullptr;
  const int32_t* delta = nullptr;
  const int32_t* seq_lens = nullptr;
  int32_t num_kv_heads = 0;
  int32_t blocks_per_seq = 1;
  const float* cos = nullptr;  // [max_position, num_freqs], the pure rotation
  const float* sin = nullptr;
  int64_t max_position = 0;
  int32_t num_freqs = 0;
  bool gptj = false;
  cuda::DeviceErrorRecord* errors = nullptr;
};

// Element i of a stored row as float (quantized: times scale, as ops::dequantize).
__device__ __forceinline__ float load_stored(const void* base, cuda::Elem e, int64_t i,
                                             float scale) {
  switch (e) {
    case cuda::Elem::f32:
      return static_cast<const float*>(base)[i];
    case cuda::Elem::f16:
      return cuda::to_float(static_cast<const cuda::F16*>(base)[i]);
    case cuda::Elem::bf16:
      return cuda::to_float(static_cast<const cuda::BF16*>(base)[i]);
    case cuda::Elem::int8:
      return __fmul_rn(cuda::to_float(static_cast<const int8_t*>(base)[i]), scale);
    default:
      return __fmul_rn(cuda::to_float(static_cast<const cuda::E4M3*>(base)[i]), scale);
  }
}

// The checks of sequence b (rope_shift.cpp's, on the device): false when it must be skipped
// (nothing to do, or a bad entry, recorded when `report`). Sets the range and the page list start.
__device__ bool check_sequence(const RopeShiftKernelParams& p, int b, bool report, int* first,
                               int* t0, int* t1, int* delta) {
  constexpr auto kOp = cuda::ErrorOp::rope_shift;
  const int len = p.seq_lens[b];
  *t0 = p.p0[b];
  *t1 = p.p1[b];
  *delta = p.delta[b];
  int64_t room = p.capacity;
  *first = 0;
  if (p.paged) {
    const int begin = p.indptr[b];
    const int end = p.indptr[b + 1];
    if (begin < 0 || begin > p.num_indices) {
      if (report)
        record_error(p.errors, kOp, ErrorArg::page_indptr, b, begin, 0, p.num_indices + 1);
      return false;
    }
    if (end < begin || end > p.num_indices) {
      if (report) {
        record_error(p.errors, kOp, ErrorArg::page_indptr, b + 1, end, begin, p.num_indices + 1);
      }
      return false;
    }
    *first = begin;
    room = static_cast<int64_t>(end - begin) * p.page_size;
  }
  if (len < 0 || len > room) {
    if (report) record_error(p.errors, kOp, ErrorArg::seq_lens, b, len, 0, room + 1);
    return false;
  }
  if (*t0 < 0 || *t0 > len) {
    if (report) record_error(p.errors, kOp, ErrorArg::p0, b, *t0, 0, int64_t{len} + 1);
    return false;
  }
  if (*t1 < *t0 || *t1 > len) {
    if (report) record_error(p.errors, kOp, ErrorArg::p1, b, *t1, *t0, int64_t{len} + 1);
    return false;
  }
  if (*t0 == *t1) return false;
  if (*t1 > p.max_position) {
    if (report) record_error(p.errors, kOp, ErrorArg::p1, b, *t1, *t0, p.max_position + 1);
    return false;
  }
  if (*delta <= -p.max_position || *delta >= p.max_position) {
    if (report) {
      record_error(p.errors, kOp, ErrorArg::delta, b, *delta, 1 - p.max_position, p.max_position);
    }
    return false;
  }
  return *delta != 0;
}

// Whether every page index of tokens [t0, t1) is in the pool; the first bad one is recorded when
// `report`. Every thread of the block calls it.
__device__ bool pages_ok(const RopeShiftKernelParams& p, int first, int t0, int t1, bool report) {
  const int lo = t0 / p.page_size;
  const int hi = (t1 - 1) / p.page_size;
  bool bad = false;
  for (int i = lo + static_cast<int>(threadIdx.x); i <= hi; i += cuda::kWriteThreads) {
    const int pg = p.indices[first + i];
    bad |= pg < 0 || pg >= p.num_pages;
  }
  if (!__syncthreads_or(bad)) return true;
  if (report) {
    for (int i = lo; i <= hi; ++i) {
      const int pg = p.indices[first + i];
      if (pg < 0 || pg >= p.num_pages) {
        record_error(p.errors, cuda::ErrorOp::rope_shift, ErrorArg::page_indices, first + i, pg, 0,
                     p.num_pages);
        break;
      }
    }
  }
  return false;
}

__global__ void __launch_bounds__(cuda::kWriteThreads)
    rope_shift_kernel(const __grid_constant__ RopeShiftKernelParams p) {
  cuda::begin_write_kernel();
  __shared__ float rows[kWarps][kCudaRopeShiftMaxHeadDim];
  const int b = static_cast<int>(blockIdx.x) / p.blocks_per_seq;
  const int part = static_cast<int>(blockIdx.x) - b * p.blocks_per_seq;
  const bool report = part == 0 && threadIdx.x == 0;
  int first = 0, t0 = 0, t1 = 0, delta = 0;
  if (!check_sequence(p, b, report, &first, &t0, &t1, &delta)) return;  // block-uniform
  if (p.paged && !pages_ok(p, first, t0, t1, report)) return;

  const int lane = cuda::lane_id();
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int dim = p.k.dim;
  const int nf = p.num_freqs;
  const int64_t table_row = static_cast<int64_t>(abs(delta)) * nf;
  const cuda::Elem e = p.k.elem;
  const bool quantized = cuda::is_quantized(e);
  float* x = rows[warp];
  const int64_t num_rows = static_cast<int64_t>(t1 - t0) * p.num_kv_heads;
  const int64_t step = static_cast<int64_t>(p.blocks_per_seq) * kWarps;
  for (int64_t r = static_cast<int64_t>(part) * kWarps + warp; r < num_rows; r += step) {
    const int t = t0 + static_cast<int>(r / p.num_kv_heads);
    const int h = static_cast<int>(r % p.num_kv_heads);
    int64_t page = b;
    int64_t in_page = t;
    if (p.paged) {
      const int local = t / p.page_size;
      page = p.indices[first + local];
      in_page = t - local * p.page_size;
    }
    const int64_t at = p.k.row(page, in_page, h);
    float* scale = quantized ? p.k.scales + p.k.scale_at(page, in_page, h) : nullptr;
    const float old_scale = quantized ? *scale : 1.0f;
    for (int i = lane; i < dim; i += 32) x[i] = load_stored(p.k.data, e, at + i, old_scale);
    __syncwarp();
    for (int i = lane; i < nf; i += 32) {
      const float c = __ldg(p.cos + table_row + i);
      const float s = delta < 0 ? -__ldg(p.sin + table_row + i) : __ldg(p.sin + table_row + i);
      const int i1 = p.gptj ? 2 * i : i;
      const int i2 = p.gptj ? 2 * i + 1 : i + nf;
      const float x1 = x[i1];
      const float x2 = x[i2];
      x[i1] = cuda::rotate_first(x1, x2, c, s);
      x[i2] = cuda::rotate_second(x1, x2, c, s);
    }
    __syncwarp();
    cuda::store_row_scalar([&](int i) { return x[i]; }, dim, true, lane, e, p.k.data, at, scale);
    __syncwarp();  // the row is stored before the next one is staged
  }
}

}  // namespace

Status cuda_rope_shift(const CudaRopeShiftParams& p, const CudaRopeTable& table,
                       const Stream& stream) {
  constexpr std::string_view kOp = "rope_shift";
  if (p.batch == 0) return Status();
  RopeShiftKernelParams k;
  k.k = cuda::device_pool(p.k);
  k.paged = p.paged;
  k.page_size = static_cast<int32_t>(p.page_size);
  k.num_pages = p.num_pages;
  k.indptr = p.indptr;
  k.indices = p.indices;
  k.num_indices = p.num_indices;
  k.capacity = p.capacity;
  k.p0 = p.p0;
  k.p1 = p.p1;
  k.delta = p.delta;
  k.seq_lens = p.seq_lens;
  k.num_kv_heads = static_cast<int32_t>(p.num_kv_heads);
  k.blocks_per_seq = static_cast<int32_t>(std::max<int64_t>(1, kTargetBlocks / p.batch));
  k.cos = table.cos;
  k.sin = table.sin;
  k.max_position = table.max_position;
  k.num_freqs = static_cast<int32_t>(table.num_freqs);
  k.gptj = p.gptj;
  k.errors = static_cast<cuda::DeviceErrorRecord*>(p.errors);
  const auto blocks = static_cast<unsigned>(p.batch * k.blocks_per_seq);
  cuda::ScopedDevice device(stream.device.index);
  if (device.error() != cudaSuccess) return cuda::launch_status(kOp, device.error());
  auto* s = static_cast<cudaStream_t>(stream.cuda_stream);
  return cuda::launch_status(kOp, cuda::launch_write_kernel(rope_shift_kernel, dim3(blocks),
                                                            dim3(cuda::kWriteThreads), s, k));
}

}  // namespace kvcache::backend
