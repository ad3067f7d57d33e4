// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// kv_append on CUDA: a byte copy. One launch covers the K and V rows of every (sample, head, new
// token): each thread copies up to kUnroll units (16 bytes where the row, the strides and the
// pointers allow, else the widest of 8 / 4 / 2 / 1 bytes that does) with all its loads issued
// before its stores. The flat unit index is split into (sample, head, token, unit) by
// multiply-shift divisions. Samples whose offsets / new_lens entry is out of range are skipped and
// counted once, by the thread of their first unit.

#include <cstdint>

#include "backend/cuda/device/write_common.cuh"
#include "backend/cuda/write_launch.cuh"
#include "backend/cuda_write_ops.h"

namespace kvcache::backend {
namespace {

using cuda::FastDiv;

constexpr int kMaxUnroll = 4;

struct KVAppendKernelSide {
  std::byte* cache = nullptr;
  const std::byte* src = nullptr;  // contiguous: unit u of the side lies at src + u * unit
  int64_t sample_stride = 0;       // bytes
  int64_t head_stride = 0;
  int64_t token_stride = 0;
  int32_t unit = 1;  // bytes per copy: 16, 8, 4, 2 or 1
  int32_t units_per_row = 0;
  FastDiv row_div;  // by units_per_row
  int64_t units = 0;
};

struct KVAppendKernelParams {
  KVAppendKernelSide side[2];  // K, V
  int64_t num_kv_heads = 0;
  int64_t max_new_tokens = 0;
  int64_t capacity = 0;
  FastDiv heads_div;
  FastDiv tokens_div;  // by max_new_tokens
  const int32_t* offsets = nullptr;
  const int32_t* new_lens = nullptr;
  int32_t unroll = 1;  // units per thread, <= kMaxUnroll
  cuda::DeviceErrorRecord* errors = nullptr;
};

__global__ void __launch_bounds__(cuda::kWriteThreads)
    kv_append_kernel(const __grid_constant__ KVAppendKernelParams p) {
  cuda::begin_write_kernel();
  const int64_t total = p.side[0].units + p.side[1].units;
  const int64_t first =
      static_cast<int64_t>(blockIdx.x) * cuda::kWriteThreads * p.unroll + threadIdx.x;
  uint4 value[kMaxUnroll];
  std::byte* dst[kMaxUnroll];
  int unit[kMaxUnroll];
#pragma unroll
  for (int r = 0; r < kMaxUnroll; ++r) {
    dst[r] = nullptr;
    unit[r] = 1;
    const int64_t item = first + static_cast<int64_t>(r) * cuda::kWriteThreads;
    if (r >= p.unroll || item >= total) continue;
    const int s = item < p.side[0].units ? 0 : 1;
    const KVAppendKernelSide& side = p.side[s];
    const auto local = static_cast<uint32_t>(s == 0 ? item : item - p.side[0].units);
    const uint32_t row = side.row_div.div(local);  // (sample * heads + head) * L + token
    const uint32_t u = local - row * static_cast<uint32_t>(side.units_per_row);
    const uint32_t sample_head = p.tokens_div.div(row);
    const int64_t token = row - static_cast<int64_t>(sample_head) * p.max_new_tokens;
    const uint32_t sample = p.heads_div.div(sample_head);
    const int64_t head = sample_head - static_cast<int64_t>(sample) * p.num_kv_heads;
    const int64_t len = p.new_lens != nullptr ? p.new_lens[sample] : p.max_new_tokens;
    const int64_t offset = p.offsets[sample];
    const bool len_ok = len >= 0 && len <= p.max_new_tokens;
    if (!len_ok || offset < 0 || offset + len > p.capacity) {
      if (s == 0 && head == 0 && token == 0 && u == 0) {
        if (!len_ok) {
          cuda::record_error(p.errors, cuda::ErrorOp::kv_append, cuda::ErrorArg::new_lens, sample,
                             len, 0, p.max_new_tokens + 1);
        } else {
          cuda::record_error(p.errors, cuda::ErrorOp::kv_append, cuda::ErrorArg::offsets, sample,
                             offset, 0, p.capacity - len + 1);
        }
      }
      continue;
    }
    if (token >= len) continue;
    unit[r] = side.unit;
    dst[r] = side.cache + sample * side.sample_stride + head * side.head_stride +
             (offset + token) * side.token_stride + static_cast<int64_t>(u) * side.unit;
    value[r] = cuda::load_unit(side.src + static_cast<int64_t>(local) * side.unit, side.unit);
  }
#pragma unroll
  for (int r = 0; r < kMaxUnroll; ++r) {
    if (dst[r] != nullptr) cuda::store_unit(dst[r], unit[r], value[r]);
  }
}

// The widest unit (16 .. 1 bytes) dividing the row, the strides and both pointers.
int unit_of(const CudaKVAppendSide& s) {
  for (int unit = 16; unit > 1; unit /= 2) {
    if (s.row_bytes % unit == 0 && s.sample_stride % unit == 0 && s.head_stride % unit == 0 &&
        s.token_stride % unit == 0 && cuda::aligned(s.cache, static_cast<size_t>(unit)) &&
        cuda::aligned(s.src, static_cast<size_t>(unit))) {
      return unit;
    }
  }
  return 1;
}

}  // namespace

Status cuda_kv_append(const CudaKVAppendParams& p, const Stream& stream) {
  constexpr std::string_view kOp = "kv_append";
  KVAppendKernelParams k;
  const CudaKVAppendSide* sides[2] = {&p.k, &p.v};
  for (int s = 0; s < 2; ++s) {
    const CudaKVAppendSide& from = *sides[s];
    KVAppendKernelSide& to = k.side[s];
    to.cache = from.cache;
    to.src = from.src;
    to.sample_stride = from.sample_stride;
    to.head_stride = from.head_stride;
    to.token_stride = from.token_stride;
    to.unit = unit_of(from);
    to.units_per_row = static_cast<int32_t>(from.row_bytes / to.unit);
    to.row_div = FastDiv::make(static_cast<uint32_t>(to.units_per_row));
    to.units = p.batch * p.num_kv_heads * p.max_new_tokens * to.units_per_row;
  }
  const int64_t total = k.side[0].units + k.side[1].units;
  if (total == 0) return Status();
  if (k.side[0].units > kCudaMaxElements || k.side[1].units > kCudaMaxElements) {
    return Status::invalid_argument(std::string(kOp) +
                                    ": the new tokens span more than 2^31 - 1 copy units, "
                                    "expected fewer (split the call)");
  }
  k.num_kv_heads = p.num_kv_heads;
  k.max_new_tokens = p.max_new_tokens;
  k.capacity = p.capacity;
  k.heads_div = FastDiv::make(static_cast<uint32_t>(p.num_kv_heads));
  k.tokens_div = FastDiv::make(static_cast<uint32_t>(p.max_new_tokens));
  k.offsets = p.offsets;
  k.new_lens = p.new_lens;
  k.errors = static_cast<cuda::DeviceErrorRecord*>(p.errors);
  // Large copies: four units per thread (more bytes in flight, one wave of blocks); small ones:
  // one, so that every unit has its own thread.
  k.unroll = total >= (int64_t{1} << 18) ? kMaxUnroll : 1;
  const auto blocks = static_cast<unsigned>(cuda::ceil_div(total, cuda::kWriteThreads * k.unroll));
  cuda::ScopedDevice device(stream.device.index);
  if (device.error() != cudaSuccess) return cuda::launch_status(kOp, device.error());
  return cuda::launch_status(
      kOp, cuda::launch_write_kernel(kv_append_kernel, dim3(blocks), dim3(cuda::kWriteThreads),
                                     static_cast<cudaStream_t>(stream.cuda_stream), k));
}

}  // namespace kvcache::backend
