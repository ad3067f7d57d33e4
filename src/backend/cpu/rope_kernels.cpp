// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// The portable RoPE row primitives and rope_kernels(), which picks the AVX-512 set instead when
// this CPU has it and its self-test passed.

#include "backend/cpu/rope_kernels.h"

#include <cstring>

#include "ops/quantize.h"

namespace kvcache::cpu {
namespace {

void load_portable(DType dtype, const void* src, float* dst, int64_t n) {
  to_float(dtype, src, dst, static_cast<size_t>(n));
}

void store_portable(const float* src, DType dtype, void* dst, int64_t n, bool) {
  from_float(src, dtype, dst, static_cast<size_t>(n));
}

float quantize_portable(const float* src, DType dtype, void* dst, int64_t n, bool) {
  if (dtype == DType::int8) return ops::quantize_row(src, n, static_cast<int8_t*>(dst));
  return ops::quantize_row(src, n, static_cast<fp8_e4m3_t*>(dst));
}

void rms_norm_portable(float* x, const float* w, float offset, float eps, int64_t n) {
  float ss = 0.0f;
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float r = norm_factor(ss, eps, n);
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] * r * (offset + w[i]);
}

void rotate_portable(float* x, const float* c, const float* s, int64_t nf, RopeStyle style) {
  rotate_range(x, c, s, nf, style, 0);
}

void copy_portable(const void* src, void* dst, size_t bytes, bool) { std::memcpy(dst, src, bytes); }

void fence_portable() {}

void rope_head_portable(const void* src, DType dtype, const float* w, float offset, float eps,
                        const float* c, const float* s, int64_t nf, RopeStyle style, int64_t n,
                        float* x) {
  load_portable(dtype, src, x, n);
  if (w != nullptr) rms_norm_portable(x, w, offset, eps, n);
  rotate_portable(x, c, s, nf, style);
}

void dequantize_portable(DType dtype, const void* src, float scale, float* dst, int64_t n) {
  if (dtype == DType::int8) {
    const auto* q = static_cast<const int8_t*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = ops::dequantize(q[i], scale);
  } else {
    const auto* q = static_cast<const fp8_e4m3_t*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = ops::dequantize(q[i], scale);
  }
}

float quantize_from_portable(DType src_dtype, const void* src, DType dtype, void* dst, int64_t n,
                             bool stream) {
  float x[kRopeMaxHeadDim];
  load_portable(src_dtype, src, x, n);
  return quantize_portable(x, dtype, dst, n, stream);
}

float rope_head_out_portable(const void* src, DType dtype, const float* w, float offset, float eps,
                             const float* c, const float* s, const float*, int64_t nf,
                             RopeStyle style, int64_t n, float* x, DType out_dtype, void* out,
                             bool stream) {
  rope_head_portable(src, dtype, w, offset, eps, c, s, nf, style, n, x);
  if (is_quantized(out_dtype)) return quantize_portable(x, out_dtype, out, n, stream);
  store_portable(x, out_dtype, out, n, stream);
  return 0.0f;
}

float rotate_quantized_portable(DType dtype, void* q, float scale, const float* c, const float* s,
                                int64_t nf, RopeStyle style, int64_t n, float* x) {
  dequantize_portable(dtype, q, scale, x, n);
  rotate_portable(x, c, s, nf, style);
  return quantize_portable(x, dtype, q, n, false);
}

constexpr RopeKernels kPortable{
    CpuIsa::portable,         load_portable,          store_portable,
    quantize_portable,        copy_portable,          fence_portable,
    rms_norm_portable,        rotate_portable,        rope_head_portable,
    dequantize_portable,      rope_head_out_portable, quantize_from_portable,
    rotate_quantized_portable};

}  // namespace

const RopeKernels* rope_kernels(CpuIsa isa) {
  static const RopeKernels* const avx512 = avx512_rope_kernels(kPortable);
  if ((isa == CpuIsa::avx512 || isa == CpuIsa::best) && avx512 != nullptr) return avx512;
  if (isa == CpuIsa::portable || isa == CpuIsa::best) return &kPortable;
  return nullptr;
}

}  // namespace kvcache::cpu
