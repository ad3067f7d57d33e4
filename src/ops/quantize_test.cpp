// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "ops/quantize.h"

#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "testing/test_util.h"

namespace kvcache {
namespace {

using testing::seed_trace;
using testing::test_seed;

float from_bits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// NaN entries, quiet or signaling, anywhere in a row: the scale is that of the row without them
// (so no backend needs the host libm's NaN rules), each NaN stores int8 0 / the fp8 NaN with its
// sign, and every other code is the one of the row with 0 in their place.
TEST(QuantizeRow, NaNEntriesDoNotSetTheScale) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  const uint32_t nans[] = {0x7fc00000u, 0xffc01234u, 0x7f800001u, 0xff812345u, 0x7fbfffffu};
  for (int trial = 0; trial < 2000; ++trial) {
    const int64_t n = 1 + static_cast<int64_t>(rng() % 300);
    std::vector<float> x(static_cast<size_t>(n));
    std::uniform_real_distribution<float> value(-3.0f, 3.0f);
    for (float& v : x) v = value(rng);
    std::vector<float> zeroed = x;
    const int64_t num_nan = static_cast<int64_t>(rng() % static_cast<uint32_t>(n + 1));
    for (int64_t j = 0; j < num_nan; ++j) {
      const auto at = static_cast<size_t>(rng() % static_cast<uint32_t>(n));
      x[at] = from_bits(nans[rng() % std::size(nans)]);
      zeroed[at] = 0.0f;
    }
    ASSERT_EQ(bits_of(ops::row_absmax(x.data(), n)), bits_of(ops::row_absmax(zeroed.data(), n)));
    std::vector<int8_t> q(x.size()), q0(x.size());
    std::vector<fp8_e4m3_t> f(x.size()), f0(x.size());
    ASSERT_EQ(bits_of(ops::quantize_row(x.data(), n, q.data())),
              bits_of(ops::quantize_row(zeroed.data(), n, q0.data())));
    ASSERT_EQ(bits_of(ops::quantize_row(x.data(), n, f.data())),
              bits_of(ops::quantize_row(zeroed.data(), n, f0.data())));
    for (size_t i = 0; i < x.size(); ++i) {
      if (x[i] != x[i]) {
        ASSERT_EQ(q[i], 0) << i;
        ASSERT_EQ(f[i].bits, static_cast<uint8_t>(((bits_of(x[i]) >> 24) & 0x80u) | 0x7fu)) << i;
      } else {
        ASSERT_EQ(q[i], q0[i]) << i;
        ASSERT_EQ(f[i].bits, f0[i].bits) << i;
      }
    }
  }
}

TEST(QuantizeRow, AllNaNRowGetsScaleZero) {
  const float nan_row[3] = {from_bits(0x7f800001u), from_bits(0xffc00000u), from_bits(0x7fc01234u)};
  int8_t q[3];
  EXPECT_EQ(ops::quantize_row(nan_row, 3, q), 0.0f);
  EXPECT_EQ(q[0], 0);
  EXPECT_EQ(q[1], 0);
  EXPECT_EQ(q[2], 0);
}

}  // namespace
}  // namespace kvcache
