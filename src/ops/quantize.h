// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// Quantized storage: one float scale per (token, kv head), from the row's absolute maximum.
//   scale = absmax / qmax,  stored = convert(x * (qmax / absmax))  (qmax: 127 int8, 448 fp8_e4m3)
// absmax is the largest |x| over the row's entries that are not NaN (a NaN entry stores int8 0 or
// the fp8 NaN), so it does not depend on the order of the row: every backend reduces in its own
// order and agrees. (std::fmax would not do: glibc returns NaN for a signaling NaN, and the
// result would then depend on where in the row it sits.)
// An all-zero row gets scale 0 and zeros. Conversion rounds to nearest even and saturates, so a
// stored value is within half a step of x / scale (int8: scale / 2 absolute; fp8: 2^-4 relative,
// or half the smallest subnormal step, 2^-10 * scale). Every backend quantizes with these exact
// float operations, so CPU kernels agree bit for bit with each other.

#include <cmath>
#include <cstdint>

#include "kvcache/dtype.h"

namespace kvcache::ops {

// One step of the row maximum: m, or |x| when larger (never for NaN).
inline float absmax_step(float m, float x) {
  const float a = std::fabs(x);
  return a > m ? a : m;
}

inline float row_absmax(const float* x, int64_t n) {
  float m = 0.0f;
  for (int64_t i = 0; i < n; ++i) m = absmax_step(m, x[i]);
  return m;
}

// Writes n quantized values of x to out and returns the scale. Store: int8_t or fp8_e4m3_t.
template <class Store>
float quantize_row(const float* x, int64_t n, Store* out) {
  constexpr float kMax = std::is_same_v<Store, int8_t> ? 127.0f : 448.0f;
  const float absmax = row_absmax(x, n);
  const float inv = absmax > 0.0f ? kMax / absmax : 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (std::is_same_v<Store, int8_t>) {
      out[i] = float_to_int8(x[i] * inv);
    } else {
      out[i] = fp8_e4m3_t{float_to_fp8_e4m3(x[i] * inv, Saturation::finite)};
    }
  }
  return absmax / kMax;
}

// The float a stored quantized value stands for.
inline float dequantize(int8_t q, float scale) { return static_cast<float>(q) * scale; }
inline float dequantize(fp8_e4m3_t q, float scale) { return fp8_e4m3_to_float(q.bits) * scale; }

}  // namespace kvcache::ops
