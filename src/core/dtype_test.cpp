// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "kvcache/dtype.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "testing/test_util.h"

namespace kvcache {
namespace {

using testing::has_error;
using testing::seed_trace;
using testing::test_seed;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int kMaxFailures = 10;  // per loop, so a broken conversion does not flood the log

std::string hex(uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

std::string describe(float v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.9g (bits 0x%08x)", static_cast<double>(v),
                std::bit_cast<uint32_t>(v));
  return buf;
}

uint32_t u32(std::mt19937& rng) { return static_cast<uint32_t>(rng()); }

// --- the reference: each format built from its definition, independent of dtype.cpp ---

// IEEE binary16, bfloat16, OCP OFP8 E4M3 and E5M2: sign, exp_bits, man_bits, bias 2^(e-1)-1.
struct RefFormat {
  const char* name;
  int exp_bits;
  int man_bits;
  // IEEE-like: exponent field all ones is inf (mantissa 0) or NaN. Otherwise (E4M3) there is no
  // inf and only the all-ones magnitude S.1111.111 is NaN.
  bool ieee;
  float (*decode)(uint32_t bits);
  uint32_t (*encode)(float value, Saturation sat);
};

void PrintTo(const RefFormat& f, std::ostream* os) { *os << f.name; }

int bias(const RefFormat& f) { return (1 << (f.exp_bits - 1)) - 1; }
uint32_t sign_bit(const RefFormat& f) { return 1u << (f.exp_bits + f.man_bits); }
uint32_t exp_all_ones(const RefFormat& f) { return (1u << f.exp_bits) - 1; }
uint32_t max_finite(const RefFormat& f) {
  return f.ieee ? (exp_all_ones(f) << f.man_bits) - 1 : sign_bit(f) - 2;
}
bool is_nan_pattern(const RefFormat& f, uint32_t bits) {
  const uint32_t mag = bits & ~sign_bit(f);
  if (!f.ieee) return mag == sign_bit(f) - 1;
  return (mag >> f.man_bits) == exp_all_ones(f) && (mag & ((1u << f.man_bits) - 1)) != 0;
}
// What an out-of-range magnitude becomes: inf, NaN for E4M3 (no inf), or max finite.
uint32_t overflow_pattern(const RefFormat& f, Saturation sat) {
  if (sat == Saturation::finite) return max_finite(f);
  return f.ieee ? exp_all_ones(f) << f.man_bits : sign_bit(f) - 1;
}

// The exact value of a bit pattern, with std::ldexp.
double ref_value(const RefFormat& f, uint32_t bits) {
  const bool negative = (bits & sign_bit(f)) != 0;
  const uint32_t mag = bits & ~sign_bit(f);
  const uint32_t exp_field = mag >> f.man_bits;
  const uint32_t man = mag & ((1u << f.man_bits) - 1);
  double v = 0;
  if (is_nan_pattern(f, bits)) {
    v = std::numeric_limits<double>::quiet_NaN();
  } else if (f.ieee && exp_field == exp_all_ones(f)) {
    v = std::numeric_limits<double>::infinity();
  } else if (exp_field == 0) {
    v = std::ldexp(static_cast<double>(man), 1 - bias(f) - f.man_bits);
  } else {
    v = std::ldexp(static_cast<double>(man + (1u << f.man_bits)),
                   static_cast<int>(exp_field) - bias(f) - f.man_bits);
  }
  return negative ? -v : v;
}

// The finite non-negative values in pattern order, which is value order.
std::vector<double> finite_values(const RefFormat& f) {
  std::vector<double> v(max_finite(f) + 1);
  for (uint32_t m = 0; m <= max_finite(f); ++m) v[m] = ref_value(f, m);
  return v;
}

// Nearest value by search over all finite values; ties to the even pattern (even mantissa), then
// the overflow rule past the midpoint between max finite and the next, unrepresentable, step.
uint32_t ref_encode(const RefFormat& f, const std::vector<double>& values, float x,
                    Saturation sat) {
  const uint32_t sign = std::signbit(x) ? sign_bit(f) : 0;
  if (std::isnan(x)) return sign | (sign_bit(f) - 1);  // a NaN; callers compare NaN-ness
  const double a = std::fabs(static_cast<double>(x));
  const auto it = std::lower_bound(values.begin(), values.end(), a);
  uint32_t mag = 0;
  if (it == values.end()) {
    const double top = values.back();
    const double step = top - values[values.size() - 2];
    const double mid = top + step / 2;
    const uint32_t max = max_finite(f);
    const bool round_down = a < mid || (a == mid && (max & 1u) == 0);
    mag = round_down ? max : overflow_pattern(f, sat);
  } else if (*it == a) {
    mag = static_cast<uint32_t>(it - values.begin());
  } else {
    const auto hi = static_cast<uint32_t>(it - values.begin());
    const uint32_t lo = hi - 1;  // values[0] is 0 and a > 0 here
    const double twice = 2 * a;  // exact, as is values[lo] + values[hi]
    const double sum = values[lo] + values[hi];
    mag = twice < sum ? lo : twice > sum ? hi : ((lo & 1u) == 0 ? lo : hi);
  }
  return sign | mag;
}

const RefFormat kF16{"f16",
                     5,
                     10,
                     true,
                     [](uint32_t b) { return f16_to_float(static_cast<uint16_t>(b)); },
                     [](float v, Saturation s) -> uint32_t { return float_to_f16(v, s); }};
const RefFormat kBf16{"bf16",
                      8,
                      7,
                      true,
                      [](uint32_t b) { return bf16_to_float(static_cast<uint16_t>(b)); },
                      [](float v, Saturation s) -> uint32_t { return float_to_bf16(v, s); }};
const RefFormat kE4m3{"fp8_e4m3",
                      4,
                      3,
                      false,
                      [](uint32_t b) { return fp8_e4m3_to_float(static_cast<uint8_t>(b)); },
                      [](float v, Saturation s) -> uint32_t { return float_to_fp8_e4m3(v, s); }};
const RefFormat kE5m2{"fp8_e5m2",
                      5,
                      2,
                      true,
                      [](uint32_t b) { return fp8_e5m2_to_float(static_cast<uint8_t>(b)); },
                      [](float v, Saturation s) -> uint32_t { return float_to_fp8_e5m2(v, s); }};

constexpr Saturation kBothSat[] = {Saturation::none, Saturation::finite};

const char* sat_name(Saturation s) { return s == Saturation::none ? "none" : "finite"; }

// Compares an encoded pattern with the expected one; NaN patterns only need to be NaN of the
// right sign. Returns false once too many failures were reported.
bool check_encode(const RefFormat& f, float x, Saturation sat, uint32_t got, uint32_t want,
                  int* failures) {
  const bool ok = is_nan_pattern(f, want)
                      ? is_nan_pattern(f, got) && (got & sign_bit(f)) == (want & sign_bit(f))
                      : got == want;
  if (ok) return true;
  ADD_FAILURE() << f.name << " encode " << describe(x) << " sat=" << sat_name(sat) << ": got "
                << hex(got) << ", expected " << hex(want);
  return ++*failures < kMaxFailures;
}

class DTypeFormat : public ::testing::TestWithParam<RefFormat> {};

TEST_P(DTypeFormat, DecodesEveryPattern) {
  const RefFormat& f = GetParam();
  int failures = 0;
  for (uint32_t bits = 0; bits < 2 * sign_bit(f); ++bits) {
    const float got = f.decode(bits);
    const double want = ref_value(f, bits);
    bool ok = false;
    if (std::isnan(want)) {
      // Quiet NaN with the pattern's sign.
      const uint32_t g = std::bit_cast<uint32_t>(got);
      ok = std::isnan(got) && std::signbit(got) == std::signbit(want) && (g & 0x400000u) != 0;
    } else {
      ok = static_cast<double>(got) == want &&
           std::bit_cast<uint32_t>(got) == std::bit_cast<uint32_t>(static_cast<float>(want));
    }
    if (!ok) {
      ADD_FAILURE() << f.name << " decode " << hex(bits) << ": got " << describe(got)
                    << ", expected " << want;
      if (++failures >= kMaxFailures) return;
    }
  }
}

TEST_P(DTypeFormat, EncodesEveryValueAndMidpoint) {
  const RefFormat& f = GetParam();
  int failures = 0;
  for (uint32_t mag = 0; mag <= max_finite(f); ++mag) {
    for (const uint32_t sign : {0u, sign_bit(f)}) {
      const double v = ref_value(f, sign | mag);
      const auto vf = static_cast<float>(v);
      for (const Saturation sat : kBothSat) {
        if (!check_encode(f, vf, sat, f.encode(vf, sat), sign | mag, &failures)) return;
      }
      if (mag == max_finite(f)) continue;  // the top midpoint is DTypeFormat.Saturates'
      const uint32_t next = mag + 1;
      const double mid = (v + ref_value(f, sign | next)) / 2;
      const auto mid_f = static_cast<float>(mid);
      ASSERT_EQ(static_cast<double>(mid_f), mid) << f.name << " midpoint above " << hex(mag);
      const uint32_t even = (mag & 1u) == 0 ? mag : next;
      const float away = sign ? -kInf : kInf;
      const float above = std::nextafter(mid_f, away);
      const float below = std::nextafter(mid_f, 0.0f);
      const Saturation sat = Saturation::none;
      if (!check_encode(f, mid_f, sat, f.encode(mid_f, sat), sign | even, &failures) ||
          !check_encode(f, above, sat, f.encode(above, sat), sign | next, &failures) ||
          !check_encode(f, below, sat, f.encode(below, sat), sign | mag, &failures)) {
        return;
      }
    }
  }
}

TEST_P(DTypeFormat, Saturates) {
  const RefFormat& f = GetParam();
  const uint32_t max = max_finite(f);
  const double top = ref_value(f, max);
  const double mid = top + (top - ref_value(f, max - 1)) / 2;
  ASSERT_EQ(static_cast<double>(static_cast<float>(mid)), mid);
  const auto top_f = static_cast<float>(top);
  const auto mid_f = static_cast<float>(mid);
  // At the top midpoint ties go to even: E4M3's max (S.1111.110) is even and wins; the IEEE
  // formats' max has an odd mantissa (all ones), so the tie goes to the next step: overflow.
  const bool tie_stays = !f.ieee;
  int failures = 0;
  for (const uint32_t sign : {0u, sign_bit(f)}) {
    const float s = sign ? -1.0f : 1.0f;
    for (const Saturation sat : kBothSat) {
      const uint32_t over = sign | overflow_pattern(f, sat);
      const struct {
        float x;
        uint32_t want;
      } cases[] = {
          {s * top_f, sign | max},
          {std::nextafter(s * mid_f, 0.0f), sign | max},
          {s * mid_f, tie_stays ? sign | max : over},
          {std::nextafter(s * mid_f, s * kInf), over},
          {s * mid_f * 2, over},
          {s * std::numeric_limits<float>::max(), over},
          {s * kInf, over},
      };
      for (const auto& c : cases) {
        if (!check_encode(f, c.x, sat, f.encode(c.x, sat), c.want, &failures)) return;
      }
      // NaN stays NaN with its sign whatever the mode, quiet or signalling.
      for (const float nan :
           {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::signaling_NaN(),
            std::bit_cast<float>(0x7f800001u), std::bit_cast<float>(0x7fffffffu)}) {
        const float x = std::copysign(nan, s);
        if (!check_encode(f, x, sat, f.encode(x, sat), sign | (sign_bit(f) - 1), &failures)) {
          return;
        }
      }
    }
  }
  if (!f.ieee) return;
  // Infinities decode to infinities and encode back to themselves without saturation.
  const uint32_t inf = exp_all_ones(f) << f.man_bits;
  EXPECT_EQ(f.decode(inf), kInf);
  EXPECT_EQ(f.decode(sign_bit(f) | inf), -kInf);
  EXPECT_EQ(f.encode(kInf, Saturation::none), inf);
  EXPECT_EQ(f.encode(-kInf, Saturation::none), sign_bit(f) | inf);
}

// A float with a random sign whose exponent is in [lo, hi] (clamped to float's), random mantissa;
// exponent below -126 gives a float subnormal. A quarter get a tie pattern below the format's
// mantissa so exact halfway cases come up in the normal range too.
float random_float_around(std::mt19937& rng, const RefFormat& f, int lo, int hi) {
  const int biased_lo = std::max(lo + 127, 0);
  const int biased_hi = std::min(hi + 127, 254);
  const auto biased =
      static_cast<uint32_t>(std::uniform_int_distribution<int>(biased_lo, biased_hi)(rng));
  uint32_t man = u32(rng) & 0x7fffffu;
  if (u32(rng) % 4 == 0) {
    const int low = 23 - f.man_bits;
    man = (man >> low << low) | (1u << (low - 1));
  }
  return std::bit_cast<float>((u32(rng) & 0x80000000u) | (biased << 23) | man);
}

// Floats that every format must handle: zeros, infinities, NaNs, float subnormals, extremes.
std::vector<float> special_floats() {
  std::vector<float> v = {0.0f,
                          1.0f,
                          std::numeric_limits<float>::max(),
                          std::numeric_limits<float>::min(),
                          std::numeric_limits<float>::denorm_min(),
                          std::bit_cast<float>(0x007fffffu),
                          std::bit_cast<float>(0x00400000u),
                          kInf,
                          std::numeric_limits<float>::quiet_NaN(),
                          std::numeric_limits<float>::signaling_NaN(),
                          std::bit_cast<float>(0x7fc00001u)};
  const size_t n = v.size();
  for (size_t i = 0; i < n; ++i) v.push_back(-v[i]);
  return v;
}

TEST_P(DTypeFormat, RoundsLikeNearestValueSearch) {
  const RefFormat& f = GetParam();
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  const std::vector<double> values = finite_values(f);
  // Float exponents from below the smallest subnormal to past the largest finite value.
  const int emin = 1 - bias(f);
  const int emax = static_cast<int>(f.ieee ? exp_all_ones(f) - 1 : exp_all_ones(f)) - bias(f);
  std::vector<float> inputs = special_floats();
  constexpr int kSamples = 60000;
  for (int i = 0; i < kSamples; ++i) {
    switch (i % 3) {
      case 0:
        inputs.push_back(random_float_around(rng, f, emin - f.man_bits - 3, emax + 2));
        break;
      case 1:
        inputs.push_back(std::bit_cast<float>(u32(rng)));
        break;
      default:  // float subnormals
        inputs.push_back(std::bit_cast<float>(u32(rng) & 0x807fffffu));
        break;
    }
  }
  int failures = 0;
  for (const float x : inputs) {
    for (const Saturation sat : kBothSat) {
      if (!check_encode(f, x, sat, f.encode(x, sat), ref_encode(f, values, x, sat), &failures)) {
        return;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(DType, DTypeFormat, ::testing::Values(kF16, kBf16, kE4m3, kE5m2),
                         [](const ::testing::TestParamInfo<RefFormat>& p) {
                           return std::string(p.param.name);
                         });

// Hand-checked values, so the reference above is anchored too.
TEST(DTypeKnownValues, MatchTheSpecifications) {
  EXPECT_EQ(float_to_f16(1.0f), 0x3c00);
  EXPECT_EQ(float_to_f16(-2.0f), 0xc000);
  EXPECT_EQ(float_to_f16(65504.0f), 0x7bff);
  EXPECT_EQ(float_to_f16(65519.0f), 0x7bff);
  EXPECT_EQ(float_to_f16(65520.0f), 0x7c00);  // the tie above max goes to inf
  EXPECT_EQ(float_to_f16(65520.0f, Saturation::finite), 0x7bff);
  EXPECT_EQ(float_to_f16(std::ldexp(1.0f, -24)), 0x0001);
  EXPECT_EQ(float_to_f16(std::ldexp(1.0f, -25)), 0x0000);  // tie between 0 and 2^-24: even
  EXPECT_EQ(float_to_f16(std::ldexp(3.0f, -26)), 0x0001);
  EXPECT_EQ(float_to_f16(-0.0f), 0x8000);
  EXPECT_EQ(f16_to_float(0x3555), 0.333251953125f);

  EXPECT_EQ(float_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(float_to_bf16(std::bit_cast<float>(0x3f808000u)), 0x3f80);  // tie, even
  EXPECT_EQ(float_to_bf16(std::bit_cast<float>(0x3f818000u)), 0x3f82);  // tie, even
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::max()), 0x7f80);
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::max(), Saturation::finite), 0x7f7f);
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::denorm_min()), 0x0000);
  EXPECT_EQ(float_to_bf16(std::bit_cast<float>(0x00018000u)), 0x0002);  // subnormal tie, even
  EXPECT_EQ(bf16_to_float(0x0001), std::ldexp(1.0f, -133));

  EXPECT_EQ(float_to_fp8_e4m3(448.0f), 0x7e);
  EXPECT_EQ(float_to_fp8_e4m3(464.0f), 0x7e);  // the tie above max: 448's mantissa is even
  EXPECT_EQ(float_to_fp8_e4m3(465.0f), 0x7f);  // NaN: e4m3 has no inf
  EXPECT_EQ(float_to_fp8_e4m3(465.0f, Saturation::finite), 0x7e);
  EXPECT_EQ(float_to_fp8_e4m3(-kInf), 0xff);
  EXPECT_EQ(float_to_fp8_e4m3(-kInf, Saturation::finite), 0xfe);
  EXPECT_EQ(float_to_fp8_e4m3(std::ldexp(1.0f, -9)), 0x01);
  EXPECT_EQ(fp8_e4m3_to_float(0x7e), 448.0f);
  EXPECT_EQ(fp8_e4m3_to_float(0x08), std::ldexp(1.0f, -6));
  EXPECT_EQ(fp8_e4m3_to_float(0x78), 256.0f);  // exponent all ones is still finite in e4m3
  EXPECT_TRUE(std::isnan(fp8_e4m3_to_float(0x7f)));

  EXPECT_EQ(float_to_fp8_e5m2(57344.0f), 0x7b);
  EXPECT_EQ(float_to_fp8_e5m2(61439.0f), 0x7b);
  EXPECT_EQ(float_to_fp8_e5m2(61440.0f), 0x7c);  // the tie above max goes to inf
  EXPECT_EQ(float_to_fp8_e5m2(61440.0f, Saturation::finite), 0x7b);
  EXPECT_EQ(float_to_fp8_e5m2(std::ldexp(1.0f, -16)), 0x01);
  EXPECT_EQ(fp8_e5m2_to_float(0x7c), kInf);
  EXPECT_EQ(fp8_e5m2_to_float(0x3c), 1.0f);
}

#if defined(__FLT16_MAX__)
__extension__ typedef _Float16 Half;  // the compiler's binary16: a second, independent reference

uint16_t half_bits(float x) {
  const auto h = static_cast<Half>(x);
  return std::bit_cast<uint16_t>(h);
}
#endif

TEST(DTypeF16, DecodesLikeCompilerFloat16) {
#if defined(__FLT16_MAX__)
  int failures = 0;
  for (uint32_t bits = 0; bits < 0x10000u; ++bits) {
    const float want = static_cast<float>(std::bit_cast<Half>(static_cast<uint16_t>(bits)));
    const float got = f16_to_float(static_cast<uint16_t>(bits));
    const bool ok = std::isnan(want)
                        ? std::isnan(got) && std::signbit(got) == std::signbit(want)
                        : std::bit_cast<uint32_t>(got) == std::bit_cast<uint32_t>(want);
    if (!ok) {
      ADD_FAILURE() << "decode " << hex(bits) << ": got " << describe(got) << ", _Float16 gives "
                    << describe(want);
      if (++failures >= kMaxFailures) return;
    }
  }
#else
  GTEST_SKIP() << "this compiler has no _Float16";
#endif
}

TEST(DTypeF16, EncodesLikeCompilerFloat16) {
#if defined(__FLT16_MAX__)
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  constexpr int kSamples = 1 << 21;
  int failures = 0;
  for (int i = 0; i < kSamples; ++i) {
    // Half any bit pattern, half floats in and near f16's range (exponents -28..17).
    const float x =
        (i & 1) ? std::bit_cast<float>(u32(rng)) : random_float_around(rng, kF16, -28, 17);
    const uint16_t got = float_to_f16(x);
    const uint16_t want = half_bits(x);
    if (!check_encode(kF16, x, Saturation::none, got, want, &failures)) return;
  }
#else
  GTEST_SKIP() << "this compiler has no _Float16";
#endif
}

// Reference: the C library's rounding (default mode: to nearest even), then clamping.
int8_t ref_int8(float x) {
  if (std::isnan(x)) return 0;
  const float r = std::nearbyint(x);
  return static_cast<int8_t>(std::clamp(r, -128.0f, 127.0f));
}

TEST(DTypeInt8, RoundsToNearestEven) {
  EXPECT_EQ(float_to_int8(2.5f), 2);
  EXPECT_EQ(float_to_int8(3.5f), 4);
  EXPECT_EQ(float_to_int8(-2.5f), -2);
  EXPECT_EQ(float_to_int8(-3.5f), -4);
  EXPECT_EQ(float_to_int8(0.5f), 0);
  EXPECT_EQ(float_to_int8(-0.5f), 0);
  EXPECT_EQ(float_to_int8(1.5f), 2);
  EXPECT_EQ(float_to_int8(2.4999998f), 2);
  EXPECT_EQ(float_to_int8(2.5000002f), 3);
  EXPECT_EQ(float_to_int8(126.5f), 126);
  EXPECT_EQ(float_to_int8(-127.5f), -128);
  EXPECT_EQ(float_to_int8(std::numeric_limits<float>::denorm_min()), 0);
  for (int q = -140 * 4; q <= 140 * 4; ++q) {
    const float x = static_cast<float>(q) / 4;
    EXPECT_EQ(float_to_int8(x), ref_int8(x)) << x;
  }
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-300.0f, 300.0f);
  for (int i = 0; i < 20000; ++i) {
    const float x = dist(rng);
    ASSERT_EQ(float_to_int8(x), ref_int8(x)) << describe(x);
  }
}

TEST(DTypeInt8, DecodesEveryPattern) {
  uint8_t src[256];
  for (int b = 0; b < 256; ++b) src[b] = static_cast<uint8_t>(b);
  float dst[256];
  to_float(DType::int8, src, dst, 256);
  for (int b = 0; b < 256; ++b) EXPECT_EQ(dst[b], static_cast<float>(b < 128 ? b : b - 256)) << b;
}

TEST(DTypeInt8, SaturatesAndMapsNanToZero) {
  EXPECT_EQ(float_to_int8(127.0f), 127);
  EXPECT_EQ(float_to_int8(127.5f), 127);
  EXPECT_EQ(float_to_int8(128.0f), 127);
  EXPECT_EQ(float_to_int8(1e30f), 127);
  EXPECT_EQ(float_to_int8(kInf), 127);
  EXPECT_EQ(float_to_int8(-128.0f), -128);
  EXPECT_EQ(float_to_int8(-128.5f), -128);
  EXPECT_EQ(float_to_int8(-129.0f), -128);
  EXPECT_EQ(float_to_int8(-std::numeric_limits<float>::max()), -128);
  EXPECT_EQ(float_to_int8(-kInf), -128);
  EXPECT_EQ(float_to_int8(std::numeric_limits<float>::quiet_NaN()), 0);
  EXPECT_EQ(float_to_int8(-std::numeric_limits<float>::quiet_NaN()), 0);
  EXPECT_EQ(float_to_int8(std::numeric_limits<float>::signaling_NaN()), 0);
}

// --- bulk conversions against the scalar ones ---

// The bytes the scalar functions give for one element.
std::vector<uint8_t> scalar_bytes(DType dtype, float x, Saturation sat) {
  std::vector<uint8_t> out(size_of(dtype));
  auto put = [&](auto v) {
    ASSERT_EQ(sizeof(v), out.size());
    std::memcpy(out.data(), &v, sizeof(v));
  };
  switch (dtype) {
    case DType::f32:
      put(x);
      break;
    case DType::f64:
      put(static_cast<double>(x));
      break;
    case DType::f16:
      put(float_to_f16(x, sat));
      break;
    case DType::bf16:
      put(float_to_bf16(x, sat));
      break;
    case DType::fp8_e4m3:
      put(float_to_fp8_e4m3(x, sat));
      break;
    case DType::fp8_e5m2:
      put(float_to_fp8_e5m2(x, sat));
      break;
    case DType::int8:
      put(float_to_int8(x));
      break;
  }
  return out;
}

float scalar_float(DType dtype, const uint8_t* p) {
  auto get = [&]<class T>(T v) {
    std::memcpy(&v, p, sizeof(v));
    return v;
  };
  switch (dtype) {
    case DType::f32:
      return get(0.0f);
    case DType::f64:
      return static_cast<float>(get(0.0));
    case DType::f16:
      return f16_to_float(get(uint16_t{}));
    case DType::bf16:
      return bf16_to_float(get(uint16_t{}));
    case DType::fp8_e4m3:
      return fp8_e4m3_to_float(get(uint8_t{}));
    case DType::fp8_e5m2:
      return fp8_e5m2_to_float(get(uint8_t{}));
    case DType::int8:
      return static_cast<float>(get(int8_t{}));
  }
  return 0.0f;
}

bool same_float(float a, float b) {
  return std::isnan(a) ? std::isnan(b) && std::signbit(a) == std::signbit(b)
                       : std::bit_cast<uint32_t>(a) == std::bit_cast<uint32_t>(b);
}

class DTypeBulk : public ::testing::TestWithParam<DType> {};

TEST_P(DTypeBulk, FromFloatMatchesScalar) {
  const DType dtype = GetParam();
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  std::vector<float> src = special_floats();
  std::uniform_real_distribution<float> log2_dist(-30.0f, 20.0f);
  while (src.size() < 1001) {  // odd count; magnitudes 2^-30..2^20 cover every format's range
    const float x = std::exp2(log2_dist(rng));
    src.push_back(u32(rng) % 2 ? x : -x);
  }
  const size_t esize = size_of(dtype);
  for (const Saturation sat : kBothSat) {
    SCOPED_TRACE(sat_name(sat));
    // Offset by one byte: the bulk functions must not assume aligned storage.
    std::vector<uint8_t> dst(src.size() * esize + 1, 0xa5);
    from_float(src.data(), dtype, dst.data() + 1, src.size(), sat);
    EXPECT_EQ(dst[0], 0xa5);
    for (size_t i = 0; i < src.size(); ++i) {
      const std::vector<uint8_t> want = scalar_bytes(dtype, src[i], sat);
      ASSERT_EQ(0, std::memcmp(dst.data() + 1 + i * esize, want.data(), esize))
          << "element " << i << " = " << describe(src[i]);
    }
  }
  from_float(nullptr, dtype, nullptr, 0);  // n = 0 touches nothing
}

TEST_P(DTypeBulk, ToFloatMatchesScalar) {
  const DType dtype = GetParam();
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  const size_t esize = size_of(dtype);
  constexpr size_t kCount = 1001;
  std::vector<uint8_t> src(kCount * esize + 1);
  for (uint8_t& b : src) b = static_cast<uint8_t>(u32(rng));
  // Every 8-bit pattern, and a spread of 16-bit ones, besides the random bytes.
  if (esize <= 2) {
    const size_t patterns = esize == 1 ? 256 : kCount;
    for (size_t i = 0; i < patterns; ++i) {
      const uint32_t bits = static_cast<uint32_t>(i) * (esize == 1 ? 1u : 65u);
      std::memcpy(src.data() + 1 + i * esize, &bits, esize);
    }
  }
  std::vector<float> dst(kCount + 1, -7.0f);
  to_float(dtype, src.data() + 1, dst.data(), kCount);
  EXPECT_EQ(dst[kCount], -7.0f);
  for (size_t i = 0; i < kCount; ++i) {
    const float want = scalar_float(dtype, src.data() + 1 + i * esize);
    ASSERT_TRUE(same_float(dst[i], want))
        << "element " << i << ": got " << describe(dst[i]) << ", expected " << describe(want);
  }
  to_float(dtype, nullptr, nullptr, 0);
}

TEST(DTypeBulkF64, RoundsToNearestEven) {
  // 1 + 2^-24 is halfway between 1 and 1 + 2^-23: even goes to 1; just above goes up.
  const double src[] = {1.0 + std::ldexp(1.0, -24), std::nextafter(1.0 + std::ldexp(1.0, -24), 2.0),
                        -(1.0 + 3 * std::ldexp(1.0, -24)), 1e300, -1e-300};
  const float want[] = {1.0f, 1.0f + std::ldexp(1.0f, -23), -(1.0f + std::ldexp(1.0f, -22)), kInf,
                        -0.0f};
  float dst[5];
  to_float(DType::f64, src, dst, 5);
  for (int i = 0; i < 5; ++i) EXPECT_TRUE(same_float(dst[i], want[i])) << i << ": " << dst[i];
}

INSTANTIATE_TEST_SUITE_P(DType, DTypeBulk, ::testing::ValuesIn(kAllDTypes),
                         [](const ::testing::TestParamInfo<DType>& p) {
                           return std::string(name(p.param));
                         });

// --- names ---

TEST(DTypeNames, RoundTripAndSizes) {
  const char* const names[] = {"f32", "f64", "f16", "bf16", "fp8_e4m3", "fp8_e5m2", "int8"};
  const size_t sizes[] = {4, 8, 2, 2, 1, 1, 1};
  ASSERT_EQ(std::size(kAllDTypes), std::size(names));
  for (size_t i = 0; i < std::size(kAllDTypes); ++i) {
    const DType d = kAllDTypes[i];
    EXPECT_STREQ(name(d), names[i]);
    EXPECT_EQ(size_of(d), sizes[i]) << names[i];
    // dispatch_dtype and dtype_of agree with each other and with size_of.
    const size_t storage = dispatch_dtype(d, [&]<class T>(std::type_identity<T>) {
      EXPECT_TRUE(dtype_of_v<T> == d) << names[i];
      return sizeof(T);
    });
    EXPECT_EQ(storage, sizes[i]) << names[i];
    const Result<DType> parsed = parse_dtype(name(d));
    ASSERT_OK(parsed);
    EXPECT_EQ(*parsed, d);
  }
}

TEST(DTypeNames, RejectsUnknownNames) {
  EXPECT_TRUE(has_error(parse_dtype("x"), Code::invalid_argument,
                        "parse_dtype: unknown dtype 'x', expected one of f32, f64, f16, bf16, "
                        "fp8_e4m3, fp8_e5m2, int8"));
  for (const char* bad : {"", "F32", "f32 ", "float", "fp8", "e4m3", "int8_t"}) {
    EXPECT_TRUE(has_error(parse_dtype(bad), Code::invalid_argument,
                          "unknown dtype '" + std::string(bad) + "'"))
        << bad;
  }
}

}  // namespace
}  // namespace kvcache
