// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// The fast attention row loops (AVX2 and AVX-512, one parametrized suite) against a float64 loop
// written here, for every storage dtype,
// odd and real head dims, GQA groups 1..8, strided rows and run lengths 1..70. Padding between
// rows is poisoned (NaN, or the largest value), so reading it shows; outputs are poisoned before
// the call and the floats after them must stay untouched.
// Tolerance: |got - want| <= (terms + 4) * 2^-23 * sum |term|, float rounding of a sum of `terms`
// products (score: dim products per entry; accumulate: count products plus the old value).

#include "backend/cpu/attention_kernels.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <ostream>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "kvcache/dtype.h"
#include "kvcache/op_plan.h"

#include "backend/cpu/attention_avx2.h"
#include "testing/test_util.h"

namespace kvcache::cpu {
namespace {

using kvcache::testing::seed_trace;
using kvcache::testing::test_seed;
using kvcache::testing::uniform_int;

constexpr DType kStorage[] = {DType::f32, DType::f16, DType::bf16, DType::int8, DType::fp8_e4m3};
constexpr int64_t kDims[] = {1, 5, 16, 33, 64, 128, 256};
constexpr int64_t kGuard = 16;  // poisoned floats after every output

bool quantized(DType d) { return d == DType::int8 || d == DType::fp8_e4m3; }

// count rows of `dim` random elements, `stride` apart, padding poisoned; float copies of the
// stored values (padding excluded) and one scale per row (quantized dtypes), `scale_stride` apart.
struct Rows {
  std::vector<std::byte> data;  // exactly (count - 1) * stride + dim elements: overreads hit ASan
  std::vector<double> values;   // [count, dim]
  std::vector<float> scales;
  KVRows view;
};

Rows random_rows(DType dtype, int64_t count, int64_t dim, int64_t stride, std::mt19937& rng) {
  Rows r;
  const int64_t n = (count - 1) * stride + dim;
  const size_t esize = size_of(dtype);
  r.data.resize(static_cast<size_t>(n) * esize);
  std::uniform_real_distribution<float> real(-2.0f, 2.0f);
  for (int64_t i = 0; i < n; ++i) {
    std::byte* e = r.data.data() + static_cast<size_t>(i) * esize;
    const bool pad = i % stride >= dim;
    if (dtype == DType::int8) {
      const auto v = static_cast<int8_t>(pad ? 127 : uniform_int(rng, -127, 127));
      std::memcpy(e, &v, 1);
    } else if (dtype == DType::fp8_e4m3) {
      uint8_t v = 0x7f;  // NaN
      while (!pad && (v & 0x7f) == 0x7f) v = static_cast<uint8_t>(uniform_int(rng, 0, 255));
      std::memcpy(e, &v, 1);
    } else {
      const float nan = std::nanf("");
      const float x = pad ? nan : real(rng);
      from_float(&x, dtype, e, 1);
    }
  }
  r.values.resize(static_cast<size_t>(count * dim));
  for (int64_t t = 0; t < count; ++t) {
    for (int64_t d = 0; d < dim; ++d) {
      float x = 0.0f;
      to_float(dtype, r.data.data() + static_cast<size_t>(t * stride + d) * esize, &x, 1);
      r.values[static_cast<size_t>(t * dim + d)] = x;
    }
  }
  const int64_t scale_stride = 3;
  if (quantized(dtype)) {
    std::uniform_real_distribution<float> scale(0.01f, 1.0f);
    r.scales.resize(static_cast<size_t>((count - 1) * scale_stride + 1));
    for (float& s : r.scales) s = scale(rng);
  }
  r.view = KVRows{r.data.data(), dtype, stride, r.scales.empty() ? nullptr : r.scales.data(),
                  scale_stride,  count, dim};
  return r;
}

// Points rows.next at the rows themselves (a page that follows) for every other run length: the
// loops prefetch into it, which must not change any result.
void with_next_rows(Rows& r) {
  if (r.view.count % 2 != 0) return;
  r.view.next = r.view.data;
  r.view.next_scales = r.view.scales;
  r.view.next_count = r.view.count;
}

double row_scale(const Rows& r, int64_t t) {
  return r.scales.empty() ? 1.0 : r.scales[static_cast<size_t>(t * r.view.scale_stride)];
}

std::vector<float> random_floats(size_t n, float lo, float hi, std::mt19937& rng) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// The first output index outside |got - want| <= (terms + 4) * 2^-23 * mag, or -1; guards after
// `count` must keep their poison bits.
int64_t first_mismatch(const std::vector<float>& got, const std::vector<double>& want,
                       const std::vector<double>& mag, int64_t terms, uint32_t poison_bits) {
  for (size_t i = 0; i < want.size(); ++i) {
    const double tol = static_cast<double>(terms + 4) * 0x1p-23 * mag[i];
    if (!(std::fabs(static_cast<double>(got[i]) - want[i]) <= tol)) return static_cast<int64_t>(i);
  }
  for (size_t i = want.size(); i < got.size(); ++i) {
    uint32_t bits = 0;
    std::memcpy(&bits, &got[i], 4);
    if (bits != poison_bits) return static_cast<int64_t>(i);
  }
  return -1;
}

struct Case {
  DType dtype;
  int64_t dim;
  int64_t group;
  int64_t count;
  int64_t stride;
};

// Two run lengths per (dtype, dim, group): one random in [1, 70], one a page or block size.
template <class F>
void for_each_case(std::mt19937& rng, F&& f) {
  constexpr int64_t kRuns[] = {16, 32, 64};
  int k = 0;
  for (const DType dtype : kStorage) {
    for (const int64_t dim : kDims) {
      for (int64_t group = 1; group <= 8; ++group) {
        for (const int64_t count : {uniform_int(rng, 1, 70), kRuns[k++ % 3]}) {
          const Case c{dtype, dim, group, count, dim + uniform_int(rng, 0, 9)};
          SCOPED_TRACE(::testing::Message() << name(dtype) << " dim " << dim << " group " << group
                                            << " count " << count << " stride " << c.stride);
          f(c);
        }
      }
    }
  }
}

// One set of fast loops: how to ask whether the CPU has it, the loops, and their self-test.
struct FastLoops {
  const char* name;
  CpuIsa isa;
  AttentionRowKernels (*kernels)();
  bool (*self_test)();
};

void PrintTo(const FastLoops& f, std::ostream* os) { *os << f.name; }

class AttentionRows : public ::testing::TestWithParam<FastLoops> {
 protected:
  void SetUp() override {
    if (!cpu_supports(GetParam().isa)) GTEST_SKIP() << "no " << GetParam().name;
  }
  [[nodiscard]] AttentionRowKernels kernels() const { return GetParam().kernels(); }
};

TEST_P(AttentionRows, ScoreMatchesFloat64Loop) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  for_each_case(rng, [&](const Case& c) {
    Rows k = random_rows(c.dtype, c.count, c.dim, c.stride, rng);
    with_next_rows(k);
    const std::vector<float> q =
        random_floats(static_cast<size_t>(c.group * c.dim), -1.0f, 1.0f, rng);
    const size_t n_out = static_cast<size_t>(c.group * c.count);
    std::vector<double> want(n_out, 0.0);
    std::vector<double> mag(n_out, 0.0);
    for (int64_t g = 0; g < c.group; ++g) {
      for (int64_t t = 0; t < c.count; ++t) {
        for (int64_t d = 0; d < c.dim; ++d) {
          const double term = static_cast<double>(q[static_cast<size_t>(g * c.dim + d)]) *
                              k.values[static_cast<size_t>(t * c.dim + d)] * row_scale(k, t);
          want[static_cast<size_t>(g * c.count + t)] += term;
          mag[static_cast<size_t>(g * c.count + t)] += std::fabs(term);
        }
      }
    }
    std::vector<float> s(n_out + kGuard, std::nanf(""));
    uint32_t poison = 0;
    std::memcpy(&poison, &s[0], 4);
    kernels().score(q.data(), c.group, k.view, s.data());
    const int64_t bad = first_mismatch(s, want, mag, c.dim, poison);
    EXPECT_EQ(bad, -1) << "s[" << bad
                       << "] = " << s[static_cast<size_t>(std::max<int64_t>(bad, 0))];
  });
}

TEST_P(AttentionRows, AccumulateMatchesFloat64Loop) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  for_each_case(rng, [&](const Case& c) {
    Rows v = random_rows(c.dtype, c.count, c.dim, c.stride, rng);
    with_next_rows(v);
    const std::vector<float> p =
        random_floats(static_cast<size_t>(c.group * c.count), 0.0f, 1.0f, rng);
    const size_t n_acc = static_cast<size_t>(c.group * c.dim);
    std::vector<float> acc = random_floats(n_acc, -1.0f, 1.0f, rng);
    std::vector<double> want(acc.begin(), acc.end());
    std::vector<double> mag(n_acc);
    for (size_t i = 0; i < n_acc; ++i) mag[i] = std::fabs(want[i]);
    for (int64_t g = 0; g < c.group; ++g) {
      for (int64_t d = 0; d < c.dim; ++d) {
        for (int64_t t = 0; t < c.count; ++t) {
          const double term = static_cast<double>(p[static_cast<size_t>(g * c.count + t)]) *
                              row_scale(v, t) * v.values[static_cast<size_t>(t * c.dim + d)];
          want[static_cast<size_t>(g * c.dim + d)] += term;
          mag[static_cast<size_t>(g * c.dim + d)] += std::fabs(term);
        }
      }
    }
    const float poison = std::nanf("");
    acc.resize(n_acc + kGuard, poison);
    uint32_t poison_bits = 0;
    std::memcpy(&poison_bits, &poison, 4);
    kernels().accumulate(p.data(), c.group, v.view, acc.data());
    const int64_t bad = first_mismatch(acc, want, mag, c.count, poison_bits);
    EXPECT_EQ(bad, -1) << "acc[" << bad
                       << "] = " << acc[static_cast<size_t>(std::max<int64_t>(bad, 0))];
  });
}

// Every non-NaN e4m3 pattern through accumulate (p = 1, no scale) and score (q = 1, one row per
// call): the products are exact, so both must equal fp8_e4m3_to_float (up to the sign of zero).
TEST_P(AttentionRows, Fp8WidensEveryPatternExactly) {
  std::vector<uint8_t> row;
  for (int b = 0; b < 256; ++b) {
    if ((b & 0x7f) != 0x7f) row.push_back(static_cast<uint8_t>(b));
  }
  ASSERT_EQ(row.size(), 254u);
  const auto dim = static_cast<int64_t>(row.size());
  const KVRows v{row.data(), DType::fp8_e4m3, dim, nullptr, 0, 1, dim};
  const float one = 1.0f;
  std::vector<float> acc(row.size(), 0.0f);
  kernels().accumulate(&one, 1, v, acc.data());
  // score: every pattern as its own 1-element row (stride 1), so each dot product is one term.
  const KVRows k{row.data(), DType::fp8_e4m3, 1, nullptr, 0, dim, 1};
  std::vector<float> s(row.size(), std::nanf(""));
  kernels().score(&one, 1, k, s.data());
  for (size_t i = 0; i < row.size(); ++i) {
    EXPECT_EQ(acc[i], fp8_e4m3_to_float(row[i])) << "pattern 0x" << std::hex << int{row[i]};
    EXPECT_EQ(s[i], fp8_e4m3_to_float(row[i])) << "pattern 0x" << std::hex << int{row[i]};
  }
}

TEST_P(AttentionRows, SelfTestAgreesWithPortableLoops) {
  EXPECT_TRUE(GetParam().self_test());
  EXPECT_TRUE(GetParam().self_test());  // the cached answer
  EXPECT_STREQ(kernels().isa, GetParam().name);
}

INSTANTIATE_TEST_SUITE_P(
    FastLoops, AttentionRows,
    ::testing::Values(FastLoops{"avx2", CpuIsa::avx2, avx2_attention_rows,
                                avx2_attention_rows_self_test},
                      FastLoops{"avx512", CpuIsa::avx512, avx512_attention_rows,
                                avx512_attention_rows_self_test}),
    [](const ::testing::TestParamInfo<FastLoops>& param) { return param.param.name; });

}  // namespace
}  // namespace kvcache::cpu
