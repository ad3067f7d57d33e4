// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// The device error record. A CUDA kernel cannot return a Status, so an index it must not follow (a
// slot, page, offset or position out of range) is skipped, counted here, and its first instance
// kept; kvcache::check_device_errors() (include/kvcache/device.h) turns the record into a Status on
// the host. One record per GPU (backend/cuda/device_errors.h allocates it). Plain data.

#include <cstdint>

namespace kvcache::cuda {

enum class ErrorOp : uint32_t {
  none,
  kv_append,
  paged_append,
  copy_pages,
  qkv_rope_write,
  decode_attention,
  extend_attention,
  rope_shift,
};

// The argument that held the bad value.
enum class ErrorArg : uint32_t {
  offsets,
  new_lens,
  slot_mapping,
  batch_indices,
  positions,
  page_indptr,
  page_indices,
  seq_lens,
  q_indptr,
  src_pages,
  dst_pages,
  p0,
  p1,
  delta,
};

struct DeviceErrorRecord {
  uint32_t count;  // bad entries seen since the last check
  ErrorOp op;      // of the first one
  ErrorArg arg;
  uint32_t unused;
  int64_t index;  // arg[index] held value, expected in [lo, hi)
  int64_t value;
  int64_t lo;
  int64_t hi;
};

#ifdef __CUDACC__
// Counts a bad entry; the first one since the last check keeps its details.
__device__ inline void record_error(DeviceErrorRecord* record, ErrorOp op, ErrorArg arg,
                                    int64_t index, int64_t value, int64_t lo, int64_t hi) {
  if (atomicAdd(&record->count, 1u) != 0) return;
  record->op = op;
  record->arg = arg;
  record->index = index;
  record->value = value;
  record->lo = lo;
  record->hi = hi;
}
#endif

}  // namespace kvcache::cuda
