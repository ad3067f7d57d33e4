// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// The CPU kernels behind kv_append, paged_append and copy_pages. The ops files (src/ops/) validate
// every argument first; these functions trust their parameters and cannot fail. Each spreads its
// work over `pool` when it is not null, else runs inline.

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "kvcache/device.h"
#include "kvcache/dtype.h"
#include "kvcache/op_plan.h"
#include "kvcache/paged_kv.h"
#include "kvcache/status.h"
#include "kvcache/thread_pool.h"

#include "ops/paged_checks.h"

namespace kvcache::cpu {

// --- plumbing the three ops share ---

// select(): unavailable for a CUDA device (issue 5) or an isa this CPU lacks.
[[nodiscard]] inline Status check_select_target(std::string_view op, Device device, CpuIsa isa) {
  if (!device.is_cpu()) {
    return Status::unavailable(std::string(op) + ": device " + to_string(device) +
                               " has no kernels (the CUDA backend is issue 5), expected cpu");
  }
  if (!cpu_supports(isa)) {
    return Status::unavailable(std::string(op) + ": isa " + name(isa) +
                               " is not supported by this CPU, expected one it supports");
  }
  return Status();
}

// run(): the stream is on the plan's device (the CPU).
[[nodiscard]] inline Status check_stream(std::string_view op, const Stream& stream) {
  if (stream.device.is_cpu()) return Status();
  return Status::invalid_argument(std::string(op) + ": stream is on " + to_string(stream.device) +
                                  ", expected cpu");
}

// --- kv_append ---

// One of K / V: rows of row_bytes bytes, new tokens contiguous [batch, heads, max_new_tokens, row].
struct AppendSide {
  std::byte* cache = nullptr;      // element (0, 0, 0, 0) of the cache
  int64_t sample_stride = 0;       // bytes between samples of the cache
  int64_t head_stride = 0;         // bytes between heads
  int64_t token_stride = 0;        // bytes between tokens
  const std::byte* src = nullptr;  // element (0, 0, 0, 0) of the new tokens
  int64_t row_bytes = 0;           // head_dim * element size
};

struct KVAppendParams {
  int64_t batch = 0;
  int64_t num_kv_heads = 0;
  int64_t max_new_tokens = 0;
  std::span<const int32_t> offsets;   // [batch]
  std::span<const int32_t> new_lens;  // [batch], or empty: all max_new_tokens
  AppendSide k;
  AppendSide v;
};

void kv_append(const KVAppendParams& p, ThreadPool* pool);

// --- paged_append ---

// Writes a row of n elements of the source dtype (f32, f16 or bf16) to dst in the storage dtype:
// converted (round to nearest even, Saturation::none) or, for int8 / fp8_e4m3, quantized with
// ops/quantize.h's rule; returns the scale (0 for unquantized storage).
using WriteRowFn = float (*)(const void* src, int64_t n, void* dst);

// The portable rows: always built, the oracle the AVX-512 rows are tested against.
[[nodiscard]] WriteRowFn portable_write_row(DType src, DType dst);
// The AVX-512 rows. REQUIRES cpu_supports(CpuIsa::avx512).
[[nodiscard]] WriteRowFn avx512_write_row(DType src, DType dst);
// Runs the AVX-512 rows against the portable ones on fixed inputs (special values included) for
// every (source, storage) pair, once per process. false when the CPU lacks AVX-512 or any output
// bit or scale differs.
[[nodiscard]] bool avx512_write_row_self_test();

struct PagedAppendSide {
  const std::byte* src = nullptr;  // [num_tokens, num_kv_heads, dim], contiguous
  DType src_dtype = DType::bf16;
  int64_t dim = 0;
  std::byte* pool = nullptr;  // element 0 of the pool
  DType dtype = DType::bf16;
  ops::PoolStrides strides;        // elements
  float* scales = nullptr;         // quantized storage only
  ops::PoolStrides scale_strides;  // elements
};

struct PagedAppendParams {
  PageFormat pages;
  TokenSlots slots;  // checked with ops::check_token_slots
  int64_t num_tokens = 0;
  int64_t num_kv_heads = 0;
  PagedAppendSide k;
  PagedAppendSide v;
};

// avx512: use the AVX-512 rows (REQUIRES their self-test passed).
void paged_append(const PagedAppendParams& p, bool avx512, ThreadPool* pool);

// --- copy_pages ---

struct CopyPagesParams {
  // K pages, V pages, K scales, V scales; a null base (unquantized scales) is skipped.
  std::byte* base[4] = {};
  int64_t page_bytes[4] = {};
  std::span<const int32_t> src;
  std::span<const int32_t> dst;
};

void copy_pages(const CopyPagesParams& p, ThreadPool* pool);

}  // namespace kvcache::cpu
