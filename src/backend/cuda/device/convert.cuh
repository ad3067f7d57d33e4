// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// Device-side element conversions that agree bit for bit with include/kvcache/dtype.h (round to
// nearest even; NaN stays NaN with the CPU's bit pattern; int8 saturates and maps NaN to 0; fp8
// e4m3 from float saturates to +-448 as Saturation::finite does). Storage types are raw-bit
// structs with the layout of kvcache::f16_t / bf16_t / fp8_e4m3_t (this header includes nothing
// from outside device/, so it cannot name those). Pure functions; include from .cu files only.
//
//   float x = to_float(v);            // v: float, double, F16, BF16, E4M3, int8_t
//   S s = from_float<S>(x);           // S: float, double, F16, BF16 (saturate = false: overflow
//                                     //    to inf, as Saturation::none), E4M3 (saturating), int8_t
//   unpack_bf16x2 / unpack_f16x2 / pack_*: two elements in one 32-bit word, low half first.

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

namespace kvcache::cuda {

struct F16 {
  uint16_t bits;
};
struct BF16 {
  uint16_t bits;
};
struct E4M3 {
  uint8_t bits;
};

// --- to float (exact) ---

__device__ __forceinline__ float to_float(float v) { return v; }
// Round to nearest even, as the CPU's static_cast<float>(double).
__device__ __forceinline__ float to_float(double v) { return __double2float_rn(v); }

__device__ __forceinline__ float bf16_bits_to_float(uint32_t bits) {
  uint32_t x = bits << 16;
  if ((x & 0x7fffffffu) > 0x7f800000u) x |= 0x00400000u;  // quiet NaN, payload kept
  return __uint_as_float(x);
}
__device__ __forceinline__ float to_float(BF16 v) { return bf16_bits_to_float(v.bits); }

__device__ __forceinline__ float f16_bits_to_float(uint32_t bits) {
  if ((bits & 0x7c00u) == 0x7c00u && (bits & 0x03ffu) != 0) {  // NaN: quiet, payload kept
    return __uint_as_float(((bits & 0x8000u) << 16) | 0x7fc00000u | ((bits & 0x03ffu) << 13));
  }
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}
__device__ __forceinline__ float to_float(F16 v) { return f16_bits_to_float(v.bits); }

// e4m3 -> float: place exponent and mantissa under the float's fields and rescale by 2^(127-7);
// the multiply is exact and also covers the subnormals. S.1111.111 is NaN (the CPU's pattern).
__device__ __forceinline__ float fp8_e4m3_bits_to_float(uint32_t bits) {
  const uint32_t sign = (bits & 0x80u) << 24;
  const uint32_t mag = bits & 0x7fu;
  if (mag == 0x7fu) return __uint_as_float(sign | 0x7ff00000u);  // the CPU's quiet NaN
  return __uint_as_float(sign | __float_as_uint(__uint_as_float(mag << 20) * 0x1p120f));
}
__device__ __forceinline__ float to_float(E4M3 v) { return fp8_e4m3_bits_to_float(v.bits); }

__device__ __forceinline__ float to_float(int8_t v) { return static_cast<float>(v); }

// --- from float ---

// The CPU's NaN result for a 16-bit format: sign | the quiet pattern.
__device__ __forceinline__ uint16_t nan16(float x, uint16_t quiet) {
  return static_cast<uint16_t>(((__float_as_uint(x) >> 16) & 0x8000u) | quiet);
}

// saturate: Saturation::finite (clamp to +-max finite instead of inf).
__device__ __forceinline__ uint16_t float_to_bf16_bits(float x, bool saturate = false) {
  if (x != x) return nan16(x, 0x7fc0u);
  uint16_t b = __bfloat16_as_ushort(__float2bfloat16_rn(x));
  if (saturate && (b & 0x7fffu) == 0x7f80u) b = static_cast<uint16_t>((b & 0x8000u) | 0x7f7fu);
  return b;
}

__device__ __forceinline__ uint16_t float_to_f16_bits(float x, bool saturate = false) {
  if (x != x) return nan16(x, 0x7e00u);
  uint16_t b = __half_as_ushort(__float2half_rn(x));
  if (saturate && (b & 0x7fffu) == 0x7c00u) b = static_cast<uint16_t>((b & 0x8000u) | 0x7bffu);
  return b;
}

// Saturating (finite) e4m3: cvt.rn.satfinite; NaN gets the CPU's sign | 0x7f.
__device__ __forceinline__ uint8_t float_to_fp8_e4m3_bits(float x) {
  if (x != x) return static_cast<uint8_t>(((__float_as_uint(x) >> 24) & 0x80u) | 0x7fu);
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3));
}

// Round to nearest even, saturate to [-128, 127], NaN -> 0 (kvcache::float_to_int8).
__device__ __forceinline__ int8_t float_to_int8_sat(float x) {
  if (x != x) return 0;
  const float c = fminf(fmaxf(x, -128.0f), 127.0f);
  return static_cast<int8_t>(__float2int_rn(c));
}

template <class S>
__device__ __forceinline__ S from_float(float x, bool saturate = false);
template <>
__device__ __forceinline__ float from_float<float>(float x, bool) {
  return x;
}
template <>
__device__ __forceinline__ double from_float<double>(float x, bool) {
  return static_cast<double>(x);
}
template <>
__device__ __forceinline__ BF16 from_float<BF16>(float x, bool saturate) {
  return BF16{float_to_bf16_bits(x, saturate)};
}
template <>
__device__ __forceinline__ F16 from_float<F16>(float x, bool saturate) {
  return F16{float_to_f16_bits(x, saturate)};
}
template <>
__device__ __forceinline__ E4M3 from_float<E4M3>(float x, bool) {
  return E4M3{float_to_fp8_e4m3_bits(x)};
}
template <>
__device__ __forceinline__ int8_t from_float<int8_t>(float x, bool) {
  return float_to_int8_sat(x);
}

// --- two 16-bit elements in one word (low half = first element) ---

__device__ __forceinline__ float2 unpack_bf16x2(uint32_t w) {
  return make_float2(bf16_bits_to_float(w & 0xffffu), bf16_bits_to_float(w >> 16));
}
__device__ __forceinline__ float2 unpack_f16x2(uint32_t w) {
  return make_float2(f16_bits_to_float(w & 0xffffu), f16_bits_to_float(w >> 16));
}
__device__ __forceinline__ uint32_t pack_bf16x2(float a, float b) {
  return static_cast<uint32_t>(float_to_bf16_bits(a)) |
         (static_cast<uint32_t>(float_to_bf16_bits(b)) << 16);
}
__device__ __forceinline__ uint32_t pack_f16x2(float a, float b) {
  return static_cast<uint32_t>(float_to_f16_bits(a)) |
         (static_cast<uint32_t>(float_to_f16_bits(b)) << 16);
}

// pack_16bit8's path for rows with a NaN: element by element. Not inlined, so that the usual path
// does not carry its per-element checks; arguments by value, so that they pass in registers.
static __device__ __noinline__ uint4 pack_16bit8_slow(bool bf16, float4 lo, float4 hi) {
  auto pack = [&](float a, float b) { return bf16 ? pack_bf16x2(a, b) : pack_f16x2(a, b); };
  return make_uint4(pack(lo.x, lo.y), pack(lo.z, lo.w), pack(hi.x, hi.y), pack(hi.z, hi.w));
}

// Eight floats as four words of 16-bit elements (bf16 or f16), as pack_bf16x2 / pack_f16x2 give
// them. Without a NaN among them (the usual row) by the paired conversion, one instruction per
// word (round to nearest even, overflow to inf, subnormals kept: the same bits as one element at
// a time); with one, element by element for the CPU's NaN pattern.
__device__ __forceinline__ uint4 pack_16bit8(bool bf16, const float (&x)[8]) {
  bool nan = false;
#pragma unroll
  for (int k = 0; k < 4; ++k) nan |= x[2 * k] != x[2 * k] || x[2 * k + 1] != x[2 * k + 1];
  if (nan) {
    return pack_16bit8_slow(bf16, make_float4(x[0], x[1], x[2], x[3]),
                            make_float4(x[4], x[5], x[6], x[7]));
  }
  uint32_t w[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if (bf16) {
      asm("cvt.rn.bf16x2.f32 %0, %2, %1;" : "=r"(w[k]) : "f"(x[2 * k]), "f"(x[2 * k + 1]));
    } else {
      asm("cvt.rn.f16x2.f32 %0, %2, %1;" : "=r"(w[k]) : "f"(x[2 * k]), "f"(x[2 * k + 1]));
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

}  // namespace kvcache::cuda
