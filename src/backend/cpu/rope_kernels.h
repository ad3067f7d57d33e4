// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// Internal: the CPU kernels of the RoPE ops. Row primitives on float (one set per ISA, picked at
// run time after a known-answer self-test against the portable set) and the two drivers the plans
// of qkv_rope_write and rope_shift call once their arguments are checked.

#include <cmath>
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
  // dst = ops::dequantize(src[i], scale); dtype int8 or fp8_e4m3.
  void (*dequantize)(DType dtype, const void* src, float scale, float* dst, int64_t n) = nullptr;
  // rope_head into x, then store(x, out_dtype, out, n, stream), or for int8 / fp8_e4m3 out_dtype
  // quantize (returning the scale; else 0). x is scratch the ISA may leave unwritten (it keeps the
  // row in registers). The same results as the two calls when folded is null; else folded holds
  // [g1 cos | g2 sin | g2 cos | g1 sin] (g = offset + w, g1 its first num_freqs, g2 the rest),
  // which an ISA may use for a neox head with n = 2 num_freqs and w set: the same values up to
  // float rounding (the norm weights multiplied into the rotation).
  float (*rope_head_out)(const void* src, DType src_dtype, const float* w, float offset, float eps,
                         const float* cos, const float* sin, const float* folded, int64_t num_freqs,
                         RopeStyle style, int64_t n, float* x, DType out_dtype, void* out,
                         bool stream) = nullptr;
  // load then quantize, without the float row in memory where the ISA can: the same results.
  float (*quantize_from)(DType src_dtype, const void* src, DType dst_dtype, void* dst, int64_t n,
                         bool stream) = nullptr;
  // In place on a quantized row (int8 / fp8_e4m3) of n codes with scale: dequantize into x,
  // rotate, quantize back into q; returns the new scale. The same results as the three calls.
  float (*rotate_quantized)(DType dtype, void* q, float scale, const float* cos, const float* sin,
                            int64_t num_freqs, RopeStyle style, int64_t n, float* x) = nullptr;
};

// Scalar pieces shared by the portable and the AVX-512 sets (the same float operations in both).

// 1 / sqrt(mean of the squares + eps): the rms_norm factor.
inline float norm_factor(float sum_squares, float eps, int64_t n) {
  return 1.0f / std::sqrt(sum_squares / static_cast<float>(n) + eps);
}

// Pairs i in [begin, end): (x[i step], x[i step + stride_pair]) rotated by (c[i], s[i]).
inline void rotate_pairs(float* x, int64_t stride_pair, int64_t step, const float* c,
                         const float* s, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    float* a = x + i * step;
    float* b = a + stride_pair;
    const float x1 = *a;
    const float x2 = *b;
    *a = x1 * c[i] - x2 * s[i];
    *b = x2 * c[i] + x1 * s[i];
  }
}

// neox: pair i is (x[i], x[i + nf]); gptj: (x[2i], x[2i + 1]).
inline void rotate_range(float* x, const float* c, const float* s, int64_t nf, RopeStyle style,
                         int64_t begin) {
  if (style == RopeStyle::neox) {
    rotate_pairs(x, nf, 1, c, s, begin, nf);
  } else {
    rotate_pairs(x, 1, 2, c, s, begin, nf);
  }
}

// The AVX-512 set (rope_kernels_avx512.cpp), or nullptr when this CPU lacks AVX-512 or the set
// failed its known-answer self-test against portable (run on every call: rope_kernels caches it).
[[nodiscard]] const RopeKernels* avx512_rope_kernels(const RopeKernels& portable);

#if defined(__x86_64__)
// qkv_rope_write's fold_norm coefficients with AVX-512.
// REQUIRES: avx512_rope_kernels is set, nf % 16 == 0.
void fold_norm_avx512(const float* g, const float* c, const float* s, int64_t nf, float* out);
#endif

// The primitives for isa (portable, or avx512 when this CPU has it and its self-test passed,
// checked once per process); nullptr otherwise. best: the fastest available.
[[nodiscard]] const RopeKernels* rope_kernels(CpuIsa isa);

// The drivers. REQUIRES: the plan's checks passed (can_implement), table matches desc.rope.
void qkv_rope_write(const QkvRopeWriteDesc& desc, const ops::RopeTable& table,
                    const RopeKernels& kernels, const QkvRopeWriteArgs& args, ThreadPool* pool);
void rope_shift(const RopeShiftDesc& desc, const ops::RopeTable& table, const RopeKernels& kernels,
                const RopeShiftArgs& args, ThreadPool* pool);

}  // namespace kvcache::cpu
