// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// DType: the element types kvcache stores, and exact scalar conversions to and from float.
// Conversions from float round to nearest, ties to even. fp8 follows the OCP 8-bit floating point
// specification (OFP8, v1.0): e4m3 has no infinities and one NaN pattern per sign (S.1111.111),
// max 448; e5m2 is IEEE-like with infinities, max 57344. All functions are pure and thread-safe.

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <type_traits>

#include "kvcache/export.h"
#include "kvcache/status.h"

namespace kvcache {

enum class DType : uint8_t { f32, f64, f16, bf16, fp8_e4m3, fp8_e5m2, int8 };

inline constexpr DType kAllDTypes[] = {DType::f32,      DType::f64,      DType::f16, DType::bf16,
                                       DType::fp8_e4m3, DType::fp8_e5m2, DType::int8};

// Bytes per element.
[[nodiscard]] KVCACHE_API size_t size_of(DType dtype);
// "f32", "f64", "f16", "bf16", "fp8_e4m3", "fp8_e5m2", "int8".
[[nodiscard]] KVCACHE_API const char* name(DType dtype);
// Inverse of name(); invalid_argument listing the valid names otherwise.
[[nodiscard]] KVCACHE_API Result<DType> parse_dtype(std::string_view text);

// Storage types for the 8- and 16-bit formats: raw bits, no arithmetic. Intentionally copyable.
struct f16_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};
struct fp8_e4m3_t {
  uint8_t bits;
};
struct fp8_e5m2_t {
  uint8_t bits;
};

// What to do with a finite value beyond a format's largest finite value (and with infinities).
// none: the IEEE / OCP default (overflow to inf for f16, bf16, e5m2; to NaN for e4m3, which has no
// inf). finite: clamp to ±max finite (OCP "saturating" conversion). NaN always stays NaN.
enum class Saturation : uint8_t { none, finite };

// --- scalar conversions ---
[[nodiscard]] KVCACHE_API float f16_to_float(uint16_t bits);
[[nodiscard]] KVCACHE_API uint16_t float_to_f16(float value, Saturation sat = Saturation::none);
[[nodiscard]] KVCACHE_API float bf16_to_float(uint16_t bits);
[[nodiscard]] KVCACHE_API uint16_t float_to_bf16(float value, Saturation sat = Saturation::none);
[[nodiscard]] KVCACHE_API float fp8_e4m3_to_float(uint8_t bits);
[[nodiscard]] KVCACHE_API uint8_t float_to_fp8_e4m3(float value, Saturation sat = Saturation::none);
[[nodiscard]] KVCACHE_API float fp8_e5m2_to_float(uint8_t bits);
[[nodiscard]] KVCACHE_API uint8_t float_to_fp8_e5m2(float value, Saturation sat = Saturation::none);
// int8 from float rounds to nearest even and always saturates to [-128, 127]; NaN gives 0.
[[nodiscard]] KVCACHE_API int8_t float_to_int8(float value);

// --- bulk conversions (n elements, contiguous) ---
// Any dtype to float (f64 rounds to nearest even).
KVCACHE_API void to_float(DType src_dtype, const void* src, float* dst, size_t n);
// Float to any dtype, rounding as the scalar functions do.
KVCACHE_API void from_float(const float* src, DType dst_dtype, void* dst, size_t n,
                            Saturation sat = Saturation::none);

// --- compile-time mapping between DType and its C++ storage type ---
template <class T>
struct dtype_of;
template <>
struct dtype_of<float> : std::integral_constant<DType, DType::f32> {};
template <>
struct dtype_of<double> : std::integral_constant<DType, DType::f64> {};
template <>
struct dtype_of<f16_t> : std::integral_constant<DType, DType::f16> {};
template <>
struct dtype_of<bf16_t> : std::integral_constant<DType, DType::bf16> {};
template <>
struct dtype_of<fp8_e4m3_t> : std::integral_constant<DType, DType::fp8_e4m3> {};
template <>
struct dtype_of<fp8_e5m2_t> : std::integral_constant<DType, DType::fp8_e5m2> {};
template <>
struct dtype_of<int8_t> : std::integral_constant<DType, DType::int8> {};
template <class T>
inline constexpr DType dtype_of_v = dtype_of<T>::value;

// Calls f(std::type_identity<T>{}) with T the storage type of dtype; returns what f returns.
// Call sites write a templated lambda: [&]<class T>(std::type_identity<T>) { ... }.
template <class F>
decltype(auto) dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f64:
      return f(std::type_identity<double>{});
    case DType::f16:
      return f(std::type_identity<f16_t>{});
    case DType::bf16:
      return f(std::type_identity<bf16_t>{});
    case DType::fp8_e4m3:
      return f(std::type_identity<fp8_e4m3_t>{});
    case DType::fp8_e5m2:
      return f(std::type_identity<fp8_e5m2_t>{});
    case DType::int8:
      return f(std::type_identity<int8_t>{});
    case DType::f32:
      break;
  }
  return f(std::type_identity<float>{});
}

}  // namespace kvcache
