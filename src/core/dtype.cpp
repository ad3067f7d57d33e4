// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "kvcache/dtype.h"

#include <bit>
#include <cmath>
#include <cstring>
#include <string>

#include "core/check.h"

namespace kvcache {
namespace {

// A binary floating-point format narrower than float, described by its fields. The exponent
// bias is the IEEE one, 2^(exp_bits-1) - 1, for all four formats.
struct Format {
  int exp_bits;
  int man_bits;
  // IEEE-like: the all-ones exponent field holds inf (mantissa 0) and NaN. Otherwise (OCP e4m3)
  // there is no inf and only S.1..1.1..1 is NaN.
  bool ieee;
};

constexpr Format kF16{5, 10, true};
constexpr Format kBf16{8, 7, true};
constexpr Format kE4m3{4, 3, false};
constexpr Format kE5m2{5, 2, true};

constexpr int bias(Format f) { return (1 << (f.exp_bits - 1)) - 1; }
constexpr uint32_t sign_bit(Format f) { return 1u << (f.exp_bits + f.man_bits); }
constexpr uint32_t exp_mask(Format f) { return ((1u << f.exp_bits) - 1) << f.man_bits; }
constexpr uint32_t man_mask(Format f) { return (1u << f.man_bits) - 1; }
constexpr uint32_t inf_bits(Format f) { return exp_mask(f); }
// Quiet NaN: for IEEE formats the top mantissa bit set; for e4m3 the one NaN pattern.
constexpr uint32_t nan_bits(Format f) {
  return f.ieee ? exp_mask(f) | (1u << (f.man_bits - 1)) : exp_mask(f) | man_mask(f);
}
constexpr uint32_t max_finite_bits(Format f) { return f.ieee ? inf_bits(f) - 1 : nan_bits(f) - 1; }

constexpr uint32_t kFloatSign = 0x80000000u;
constexpr uint32_t kFloatInf = 0x7f800000u;
constexpr uint32_t kFloatQuiet = 0x00400000u;

// Float to format f, round to nearest even, on the bit patterns only.
uint32_t encode(Format f, float value, Saturation sat) {
  const uint32_t x = std::bit_cast<uint32_t>(value);
  const uint32_t sign = (x & kFloatSign) ? sign_bit(f) : 0;
  const uint32_t abs = x & ~kFloatSign;
  if (abs > kFloatInf) return sign | nan_bits(f);
  const uint32_t overflow = sat == Saturation::finite ? max_finite_bits(f)
                            : f.ieee                  ? inf_bits(f)
                                                      : nan_bits(f);
  if (abs == kFloatInf) return sign | overflow;

  // value = m * 2^(e - 23), with e the unbiased exponent (float subnormals: e = -126, no implicit
  // bit). emin >= -126 for every format here, so float subnormals land in the subnormal range.
  const int float_exp = static_cast<int>(abs >> 23);
  const int e = float_exp == 0 ? -126 : float_exp - 127;
  const uint32_t m = float_exp == 0 ? (abs & 0x7fffffu) : (abs & 0x7fffffu) | 0x800000u;
  // The result's quantum is 2^(max(e, emin) - man_bits); shift m down to count quanta.
  const int emin = 1 - bias(f);
  const int e_eff = e > emin ? e : emin;
  const int shift = e_eff - f.man_bits - (e - 23);  // > 0: man_bits < 23
  uint32_t q = 0;
  if (shift < 26) {  // otherwise m < 2^24 is below a quarter quantum: rounds to zero
    q = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) ++q;
  }
  // In the normal range q carries the implicit bit, which adds one to the exponent field; a
  // carry out of the mantissa moves to the next binade (or past the largest finite value).
  const uint32_t bits = (static_cast<uint32_t>(e_eff + bias(f) - 1) << f.man_bits) + q;
  if (bits > max_finite_bits(f)) return sign | overflow;
  return sign | bits;
}

// Format f (not bf16: its subnormals are float subnormals) to float, exactly.
float decode(Format f, uint32_t bits) {
  const uint32_t sign = (bits & sign_bit(f)) ? kFloatSign : 0;
  const uint32_t exp_field = (bits & exp_mask(f)) >> f.man_bits;
  uint32_t man = bits & man_mask(f);
  const int float_man_shift = 23 - f.man_bits;
  const uint32_t all_ones = (1u << f.exp_bits) - 1;
  if (f.ieee ? exp_field == all_ones : (bits & ~sign_bit(f)) == nan_bits(f)) {
    if (man == 0 && f.ieee) return std::bit_cast<float>(sign | kFloatInf);
    return std::bit_cast<float>(sign | kFloatInf | kFloatQuiet | (man << float_man_shift));
  }
  int e = static_cast<int>(exp_field) - bias(f);
  if (exp_field == 0) {
    if (man == 0) return std::bit_cast<float>(sign);
    // Subnormal: normalize so the leading one becomes the implicit bit.
    e = 1 - bias(f);
    while ((man & (1u << f.man_bits)) == 0) {
      man <<= 1;
      --e;
    }
    man &= man_mask(f);
  }
  return std::bit_cast<float>(sign | (static_cast<uint32_t>(e + 127) << 23) |
                              (man << float_man_shift));
}

template <class T>
T load(const void* src, size_t i) {
  T v;
  std::memcpy(&v, static_cast<const unsigned char*>(src) + i * sizeof(T), sizeof(T));
  return v;
}

template <class T>
void store(void* dst, size_t i, T v) {
  std::memcpy(static_cast<unsigned char*>(dst) + i * sizeof(T), &v, sizeof(T));
}

float one_to_float(float v) { return v; }
float one_to_float(double v) { return static_cast<float>(v); }
float one_to_float(f16_t v) { return f16_to_float(v.bits); }
float one_to_float(bf16_t v) { return bf16_to_float(v.bits); }
float one_to_float(fp8_e4m3_t v) { return fp8_e4m3_to_float(v.bits); }
float one_to_float(fp8_e5m2_t v) { return fp8_e5m2_to_float(v.bits); }
float one_to_float(int8_t v) { return static_cast<float>(v); }

template <class T>
T one_from_float(float v, Saturation sat) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, double>) {
    return static_cast<double>(v);
  } else if constexpr (std::is_same_v<T, f16_t>) {
    return f16_t{float_to_f16(v, sat)};
  } else if constexpr (std::is_same_v<T, bf16_t>) {
    return bf16_t{float_to_bf16(v, sat)};
  } else if constexpr (std::is_same_v<T, fp8_e4m3_t>) {
    return fp8_e4m3_t{float_to_fp8_e4m3(v, sat)};
  } else if constexpr (std::is_same_v<T, fp8_e5m2_t>) {
    return fp8_e5m2_t{float_to_fp8_e5m2(v, sat)};
  } else {
    static_assert(std::is_same_v<T, int8_t>);
    return float_to_int8(v);
  }
}

}  // namespace

size_t size_of(DType dtype) {
  switch (dtype) {
    case DType::f32:
      return 4;
    case DType::f64:
      return 8;
    case DType::f16:
    case DType::bf16:
      return 2;
    case DType::fp8_e4m3:
    case DType::fp8_e5m2:
    case DType::int8:
      return 1;
  }
  KV_CHECK(false && "DType out of range");
  return 0;
}

const char* name(DType dtype) {
  switch (dtype) {
    case DType::f32:
      return "f32";
    case DType::f64:
      return "f64";
    case DType::f16:
      return "f16";
    case DType::bf16:
      return "bf16";
    case DType::fp8_e4m3:
      return "fp8_e4m3";
    case DType::fp8_e5m2:
      return "fp8_e5m2";
    case DType::int8:
      return "int8";
  }
  KV_CHECK(false && "DType out of range");
  return "";
}

Result<DType> parse_dtype(std::string_view text) {
  std::string valid;
  for (DType d : kAllDTypes) {
    if (text == name(d)) return d;
    if (!valid.empty()) valid += ", ";
    valid += name(d);
  }
  return Status::invalid_argument("parse_dtype: unknown dtype '" + std::string(text) +
                                  "', expected one of " + valid);
}

float f16_to_float(uint16_t bits) { return decode(kF16, bits); }
uint16_t float_to_f16(float value, Saturation sat) {
  return static_cast<uint16_t>(encode(kF16, value, sat));
}

// bf16 is the top half of a float, so decoding is a shift (NaN made quiet).
float bf16_to_float(uint16_t bits) {
  uint32_t x = static_cast<uint32_t>(bits) << 16;
  if ((x & ~kFloatSign) > kFloatInf) x |= kFloatQuiet;
  return std::bit_cast<float>(x);
}
uint16_t float_to_bf16(float value, Saturation sat) {
  return static_cast<uint16_t>(encode(kBf16, value, sat));
}

float fp8_e4m3_to_float(uint8_t bits) { return decode(kE4m3, bits); }
uint8_t float_to_fp8_e4m3(float value, Saturation sat) {
  return static_cast<uint8_t>(encode(kE4m3, value, sat));
}

float fp8_e5m2_to_float(uint8_t bits) { return decode(kE5m2, bits); }
uint8_t float_to_fp8_e5m2(float value, Saturation sat) {
  return static_cast<uint8_t>(encode(kE5m2, value, sat));
}

int8_t float_to_int8(float value) {
  if (std::isnan(value)) return 0;
  const float clamped = value < -128.0f ? -128.0f : (value > 127.0f ? 127.0f : value);
  // Exact in float for |v| <= 128; ties go to the even neighbour.
  const float r = std::floor(clamped);
  const float frac = clamped - r;
  int i = static_cast<int>(r);
  if (frac > 0.5f || (frac == 0.5f && (i & 1) != 0)) ++i;
  return static_cast<int8_t>(i);
}

void to_float(DType src_dtype, const void* src, float* dst, size_t n) {
  dispatch_dtype(src_dtype, [&]<class T>(std::type_identity<T>) {
    for (size_t i = 0; i < n; ++i) dst[i] = one_to_float(load<T>(src, i));
  });
}

void from_float(const float* src, DType dst_dtype, void* dst, size_t n, Saturation sat) {
  dispatch_dtype(dst_dtype, [&]<class T>(std::type_identity<T>) {
    for (size_t i = 0; i < n; ++i) store<T>(dst, i, one_from_float<T>(src[i], sat));
  });
}

}  // namespace kvcache
