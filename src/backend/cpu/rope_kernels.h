// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// Internal: the CPU kernels of the RoPE ops. Row primitives on float (one set per ISA, picked at
// run time after a known-answer self-test against the portable set) and the two drivers the plans
// of qkv_rope_write and rope_shift call once their arguments are checked.

#include <cstdint>

#include "kvcache/dtype.h"
#include "kvcache/op_plan.h"
#include "kvcache/qkv_rope_write.h"
#include "kvcache/rope.h"
#include "kvcache/rope_shift.h"
#include "kvcache/thread_pool.h"

#include "ops/rope_table.h"

namespace kvcache::cpu {

// The largest head_dim the kernels handle: their per-thread rows live on the stack.
inline constexpr int64_t kRopeMaxHeadDim = 1024;

// Primitives on one row of n floats.
struct RopeKernels {
  CpuIsa isa = CpuIsa::portable;
  // dst = src converted to float; src_dtype f32, f16 or bf16 (exact).
  void (*load)(DType src_dtype, const void* src, float* dst, int64_t n) = nullptr;
  // dst = src rounded to nearest even; dst_dtype f32, f16 or bf16. stream: the output is large
  // and read later, so aligned chunks may bypass the cache (non-temporal stores; same values).
  void (*store)(const float* src, DType dst_dtype, void* dst, int64_t n, bool stream) = nullptr;
  // dst = src quantized by ops::quantize_row's rule (same float ops); returns the scale.
  // dst_dtype int8 or fp8_e4m3.
  float (*quantize)(const float* src, DType dst_dtype, void* dst, int64_t n, bool stream) = nullptr;
  // memcpy, with stream as for store.
  void (*copy)(const void* src, void* dst, size_t bytes, bool stream) = nullptr;
  // Orders the non-temporal stores of this thread before what follows (a no-op without them).
  void (*fence)() = nullptr;
  // x = x * (1 / sqrt(mean(x^2) + eps)) * (offset + w[i]).
  void (*rms_norm)(float* x, const float* w, float offset, float eps, int64_t n) = nullptr;
  // Rotates the first 2 * num_freqs elements of x: pair i by (cos[i], sin[i]), neox or gptj pairs.
  void (*rotate)(float* x, const float* cos, const float* sin, int64_t num_freqs,
                 RopeStyle style) = nullptr;
  // One q or k head of n elements: load, rms_norm with w (skipped when w is null), rotate, into
  // x; the same float operations as the three calls, in one pass where the ISA can.
  void (*rope_head)(const void* src, DType src_dtype, const float* w, float offset, float eps,
                    const float* cos, const float* sin, int64_t num_freqs, RopeStyle style,
                    int64_t n, float* x) = nullptr;
};

// The primitives for isa (portable, or avx512 when this CPU has it and its self-test passed,
// checked once per process); nullptr otherwise. best: the fastest available.
[[nodiscard]] const RopeKernels* rope_kernels(CpuIsa isa);

// The drivers. REQUIRES: the plan's checks passed (can_implement), table matches desc.rope.
void qkv_rope_write(const QkvRopeWriteDesc& desc, const ops::RopeTable& table,
                    const RopeKernels& kernels, const QkvRopeWriteArgs& args, ThreadPool* pool);
void rope_shift(const RopeShiftDesc& desc, const ops::RopeTable& table, const RopeKernels& kernels,
                const RopeShiftArgs& args, ThreadPool* pool);

}  // namespace kvcache::cpu
