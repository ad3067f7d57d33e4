// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// The fast attention row loops (AVX2 and AVX-512, one parametrized suite; the AVX-512 dot-product
// loops on 8-bit rows, their own suite) against a float64 loop written here, for every storage
// dtype, odd and real head dims, GQA groups 1..8, strided rows and run lengths 1..70. Padding
// between rows is poisoned (NaN, or the largest value), so reading it shows; outputs are poisoned
// before the call and the floats after them must stay untouched. Tolerance: |got - want| <= (terms
// + 4) * 2^-23 * sum |term|, float rounding of a sum of `terms` products (score: dim products per
// entry; accumulate: count products plus the old value). The dot-product loops on 8-bit rows
// (AttentionDot8Rows) add the rounding they state: q and the weights to bf16 (fp8: 2^-9 of each
// term) or to int16 steps of the largest / 32767 (int8: 2^-16 of max|q| * sum |k| per score, of max
// |w| * sum |v| per accumulated element); the tests allow twice that.
// The dot-product loops over listed rows (paged 8-bit K/V) read runs over shuffled pages of odd
// sizes, starting mid-page, from pools whose unlisted rows, pages and scales are poisoned.

#include "backend/cpu/attention_kernels.h"

#include <algorithm>
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

// The first element of got from index `from` on whose bits are not poison_bits (a written guard),
// or -1.
int64_t first_written_guard(const std::vector<float>& got, size_t from, uint32_t poison_bits) {
  for (size_t i = from; i < got.size(); ++i) {
    uint32_t bits = 0;
    std::memcpy(&bits, &got[i], 4);
    if (bits != poison_bits) return static_cast<int64_t>(i);
  }
  return -1;
}

// The first output index outside |got - want| <= (terms + 4) * 2^-23 * mag, or -1; guards after
// `count` must keep their poison bits.
int64_t first_mismatch(const std::vector<float>& got, const std::vector<double>& want,
                       const std::vector<double>& mag, int64_t terms, uint32_t poison_bits) {
  for (size_t i = 0; i < want.size(); ++i) {
    const double tol = static_cast<double>(terms + 4) * 0x1p-23 * mag[i];
    if (!(std::fabs(static_cast<double>(got[i]) - want[i]) <= tol)) return static_cast<int64_t>(i);
  }
  return first_written_guard(got, want.size(), poison_bits);
}

struct Case {
  DType dtype;
  int64_t dim;
  int64_t group;
  int64_t count;
  int64_t stride;
};

// Three runs per (dtype, dim, group): rows with padding (stride dim + 0..9, like NHD pages), one
// run random in [1, 70] and one a page or block size; and a page or block size of rows without
// gaps (stride dim, like HND pages and contiguous caches: the AVX-512 loops prefetch 16-bit and
// 32-bit rows without gaps in their own instantiation).
template <class F>
void for_each_case(std::mt19937& rng, F&& f) {
  constexpr int64_t kRuns[] = {16, 32, 64};
  int k = 0;
  for (const DType dtype : kStorage) {
    for (const int64_t dim : kDims) {
      for (int64_t group = 1; group <= 8; ++group) {
        const int64_t run = kRuns[k++ % 3];
        for (const Case c : {Case{dtype, dim, group, uniform_int(rng, 1, 70), 0},
                             Case{dtype, dim, group, run, 0}, Case{dtype, dim, group, run, dim}}) {
          const Case cs{c.dtype, c.dim, c.group, c.count,
                        c.stride > 0 ? c.stride : dim + uniform_int(rng, 0, 9)};
          SCOPED_TRACE(::testing::Message() << name(dtype) << " dim " << dim << " group " << group
                                            << " count " << cs.count << " stride " << cs.stride);
          f(cs);
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

// --- the dot-product loops on 8-bit rows ---

constexpr DType kDot8Storage[] = {DType::int8, DType::fp8_e4m3};
constexpr int64_t kDot8Dims[] = {64, 128, 192, 256, 512};

class AttentionDot8Rows : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!cpu_has_dot8()) GTEST_SKIP() << "no AVX-512 with BF16, VNNI and VBMI";
  }
};

// Two run lengths per (dtype, dim, group): one random in [1, 150] (several 64-row segments), one
// a page or block size.
template <class F>
void for_each_dot8_case(std::mt19937& rng, F&& f) {
  constexpr int64_t kRuns[] = {16, 32, 64};
  int k = 0;
  for (const DType dtype : kDot8Storage) {
    for (const int64_t dim : kDot8Dims) {
      for (int64_t group = 1; group <= 8; ++group) {
        for (const int64_t count : {uniform_int(rng, 1, 150), kRuns[k++ % 3]}) {
          const Case c{dtype, dim, group, count, dim + uniform_int(rng, 0, 9)};
          SCOPED_TRACE(::testing::Message() << name(dtype) << " dim " << dim << " group " << group
                                            << " count " << count << " stride " << c.stride);
          f(c);
        }
      }
    }
  }
}

// q rows converted by prepare_q (a copy: the float rows stay for the reference).
std::vector<float> prepared(const AttentionRowKernels& k, const std::vector<float>& q,
                            int64_t group, int64_t dim) {
  std::vector<float> out = q;
  for (int64_t g = 0; g < group; ++g) k.prepare_q(out.data() + g * dim, dim);
  return out;
}

TEST_F(AttentionDot8Rows, ScoreMatchesFloat64WithinStatedRounding) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  for_each_dot8_case(rng, [&](const Case& c) {
    const AttentionRowKernels kernels = avx512_dot8_attention_rows(c.dtype, c.dim);
    ASSERT_NE(kernels.prepare_q, nullptr);
    Rows k = random_rows(c.dtype, c.count, c.dim, c.stride, rng);
    with_next_rows(k);
    const std::vector<float> q =
        random_floats(static_cast<size_t>(c.group * c.dim), -1.0f, 1.0f, rng);
    const size_t n_out = static_cast<size_t>(c.group * c.count);
    std::vector<double> want(n_out, 0.0);
    std::vector<double> tol(n_out, 0.0);
    for (int64_t g = 0; g < c.group; ++g) {
      double q_max = 0.0;
      for (int64_t d = 0; d < c.dim; ++d) {
        q_max =
            std::max(q_max, std::fabs(static_cast<double>(q[static_cast<size_t>(g * c.dim + d)])));
      }
      for (int64_t t = 0; t < c.count; ++t) {
        double mag = 0.0;
        double k_abs = 0.0;
        const auto i = static_cast<size_t>(g * c.count + t);
        for (int64_t d = 0; d < c.dim; ++d) {
          const double kv = k.values[static_cast<size_t>(t * c.dim + d)] * row_scale(k, t);
          const double term = static_cast<double>(q[static_cast<size_t>(g * c.dim + d)]) * kv;
          want[i] += term;
          mag += std::fabs(term);
          k_abs += std::fabs(kv);
        }
        const double rounding = c.dtype == DType::int8 ? 0x1p-15 * q_max * k_abs : 0x1p-8 * mag;
        tol[i] = rounding + static_cast<double>(c.dim + 4) * 0x1p-23 * mag;
      }
    }
    std::vector<float> s(n_out + kGuard, std::nanf(""));
    uint32_t poison = 0;
    std::memcpy(&poison, &s[0], 4);
    kernels.score(prepared(kernels, q, c.group, c.dim).data(), c.group, k.view, s.data());
    for (size_t i = 0; i < n_out; ++i) {
      ASSERT_LE(std::fabs(static_cast<double>(s[i]) - want[i]), tol[i])
          << "s[" << i << "] = " << s[i] << ", want " << want[i];
    }
    ASSERT_EQ(first_written_guard(s, n_out, poison), -1) << "a guard after s was written";
  });
}

TEST_F(AttentionDot8Rows, AccumulateMatchesFloat64WithinStatedRounding) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  for_each_dot8_case(rng, [&](const Case& c) {
    const AttentionRowKernels kernels = avx512_dot8_attention_rows(c.dtype, c.dim);
    Rows v = random_rows(c.dtype, c.count, c.dim, c.stride, rng);
    with_next_rows(v);
    const std::vector<float> p =
        random_floats(static_cast<size_t>(c.group * c.count), 0.0f, 1.0f, rng);
    const size_t n_acc = static_cast<size_t>(c.group * c.dim);
    std::vector<float> acc = random_floats(n_acc, -1.0f, 1.0f, rng);
    std::vector<double> want(acc.begin(), acc.end());
    std::vector<double> tol(n_acc);
    for (int64_t g = 0; g < c.group; ++g) {
      double w_max = 0.0;
      for (int64_t t = 0; t < c.count; ++t) {
        w_max = std::max(w_max, p[static_cast<size_t>(g * c.count + t)] * row_scale(v, t));
      }
      for (int64_t d = 0; d < c.dim; ++d) {
        const auto i = static_cast<size_t>(g * c.dim + d);
        double mag = std::fabs(want[i]);
        double v_abs = 0.0;
        double terms_abs = 0.0;
        for (int64_t t = 0; t < c.count; ++t) {
          const double w =
              static_cast<double>(p[static_cast<size_t>(g * c.count + t)]) * row_scale(v, t);
          const double term = w * v.values[static_cast<size_t>(t * c.dim + d)];
          want[i] += term;
          terms_abs += std::fabs(term);
          v_abs += std::fabs(v.values[static_cast<size_t>(t * c.dim + d)]);
        }
        mag += terms_abs;
        const double rounding =
            c.dtype == DType::int8 ? 0x1p-15 * w_max * v_abs : 0x1p-8 * terms_abs;
        tol[i] = rounding + static_cast<double>(c.count + 4) * 0x1p-23 * mag;
      }
    }
    const float poison = std::nanf("");
    acc.resize(n_acc + kGuard, poison);
    uint32_t poison_bits = 0;
    std::memcpy(&poison_bits, &poison, 4);
    kernels.accumulate(p.data(), c.group, v.view, acc.data());
    for (size_t i = 0; i < n_acc; ++i) {
      ASSERT_LE(std::fabs(static_cast<double>(acc[i]) - want[i]), tol[i])
          << "acc[" << i << "] = " << acc[i] << ", want " << want[i];
    }
    ASSERT_EQ(first_written_guard(acc, n_acc, poison_bits), -1) << "a guard after acc was written";
  });
}

// Every non-NaN e4m3 pattern and every int8 value, in rows of 64: accumulate with p = 1 and score
// with one-hot q rows meet no rounding of q or p (bf16 and int16 hold 1 exactly), so each result
// is the stored value: exactly for fp8, within the int8 words' factor (1 / 32767 in float).
TEST_F(AttentionDot8Rows, EveryStoredValueWidensExactly) {
  for (const DType dtype : kDot8Storage) {
    SCOPED_TRACE(name(dtype));
    std::vector<uint8_t> bytes;
    for (int b = 0; b < 256; ++b) {
      if (dtype == DType::int8 || (b & 0x7f) != 0x7f) bytes.push_back(static_cast<uint8_t>(b));
    }
    bytes.resize(256, 0);  // whole rows of 64
    const auto value = [&](size_t i) {
      return dtype == DType::int8 ? static_cast<float>(static_cast<int8_t>(bytes[i]))
                                  : fp8_e4m3_to_float(bytes[i]);
    };
    const double rel = dtype == DType::int8 ? 0x1p-22 : 0.0;
    constexpr int64_t kDim = 64;
    const AttentionRowKernels kernels = avx512_dot8_attention_rows(dtype, kDim);
    const KVRows rows{bytes.data(), dtype, kDim, nullptr, 0, 4, kDim};
    std::vector<float> acc(bytes.size(), 0.0f);
    const float ones[4] = {1.0f, 1.0f, 1.0f, 1.0f};
    for (int64_t t = 0; t < 4; ++t) {  // one row per call: acc row t = row t
      const KVRows one{bytes.data() + t * kDim, dtype, kDim, nullptr, 0, 1, kDim};
      kernels.accumulate(ones, 1, one, acc.data() + t * kDim);
    }
    for (int64_t j = 0; j < kDim; ++j) {
      std::vector<float> q(kDim, 0.0f);
      q[static_cast<size_t>(j)] = 1.0f;
      kernels.prepare_q(q.data(), kDim);
      float s[4];
      kernels.score(q.data(), 1, rows, s);
      for (int64_t t = 0; t < 4; ++t) {
        const auto i = static_cast<size_t>(t * kDim + j);
        EXPECT_NEAR(s[t], value(i), rel * std::fabs(value(i)))
            << "byte 0x" << std::hex << int{bytes[i]};
        EXPECT_NEAR(acc[i], value(i), rel * std::fabs(value(i)))
            << "byte 0x" << std::hex << int{bytes[i]};
      }
    }
  }
}

// Rows the dot-product loops do not take (other dtypes, dims not a multiple of 64) go to the float
// AVX-512 loops: the same results, bit for bit.
TEST_F(AttentionDot8Rows, OtherRowsUseTheFloatLoops) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  const AttentionRowKernels fl = avx512_attention_rows();
  for (auto [dtype, dim] :
       {std::pair{DType::int8, int64_t{33}}, std::pair{DType::bf16, int64_t{128}},
        std::pair{DType::fp8_e4m3, int64_t{96}}}) {
    SCOPED_TRACE(::testing::Message() << name(dtype) << " dim " << dim);
    const AttentionRowKernels dot = avx512_dot8_attention_rows(dtype, dim);
    EXPECT_EQ(dot.prepare_q, nullptr);
    EXPECT_FALSE(dot8_applies(dtype, dim));
    Rows r = random_rows(dtype, 37, dim, dim + 3, rng);
    const std::vector<float> q = random_floats(static_cast<size_t>(3 * dim), -1.0f, 1.0f, rng);
    const std::vector<float> p = random_floats(static_cast<size_t>(3 * 37), 0.0f, 1.0f, rng);
    std::vector<float> s1(3 * 37), s2(3 * 37);
    dot.score(q.data(), 3, r.view, s1.data());
    fl.score(q.data(), 3, r.view, s2.data());
    EXPECT_EQ(s1, s2);
    std::vector<float> a1 = random_floats(static_cast<size_t>(3 * dim), -1.0f, 1.0f, rng);
    std::vector<float> a2 = a1;
    dot.accumulate(p.data(), 3, r.view, a1.data());
    fl.accumulate(p.data(), 3, r.view, a2.data());
    EXPECT_EQ(a1, a2);
  }
}

TEST_F(AttentionDot8Rows, SelfTestAgreesWithPortableLoops) {
  EXPECT_TRUE(avx512_dot8_attention_rows_self_test());
  EXPECT_TRUE(avx512_dot8_attention_rows_self_test());  // the cached answer
  EXPECT_STREQ(avx512_dot8_attention_rows(DType::int8, 128).isa, "avx512.dot8");
}

// --- the dot-product loops over listed rows (paged 8-bit K/V) ---

// A page pool of 8-bit rows (num_kv_heads 3, NHD or HND) where only the rows of one run of
// keys over shuffled pages hold values: every other byte is poison (int8 127, fp8 NaN) and every
// other scale NaN, so a row or scale read from the wrong slot, page or head shows. The run starts
// mid-page; ListedRows view kv head `head` of it the way the driver lists a run (offsets of head 0,
// data and scales moved to the head).
struct ListedRun {
  std::vector<std::byte> data;
  std::vector<float> scales;
  std::vector<int64_t> offsets;
  std::vector<int64_t> scale_offsets;
  std::vector<double> values;  // [count, dim]
  std::vector<double> row_scales;
  ListedRows view;
};

ListedRun random_listed_run(DType dtype, int64_t dim, int64_t page_size, bool nhd, int64_t count,
                            std::mt19937& rng) {
  constexpr int64_t kHeads = 3;
  const int64_t head = uniform_int(rng, 0, kHeads - 1);
  const int64_t first_slot = uniform_int(rng, 0, page_size - 1);
  const int64_t used_pages = (first_slot + count + page_size - 1) / page_size;
  const int64_t num_pages = used_pages + 3;  // pages no run lists stay poisoned
  std::vector<int64_t> pages(static_cast<size_t>(num_pages));
  for (int64_t i = 0; i < num_pages; ++i) pages[static_cast<size_t>(i)] = i;
  std::shuffle(pages.begin(), pages.end(), rng);
  // element strides of (page, slot, head); scales the same without dim
  const int64_t page_stride = page_size * kHeads * dim;
  const int64_t slot_stride = nhd ? kHeads * dim : dim;
  const int64_t head_stride = nhd ? dim : page_size * dim;
  const int64_t scale_slot = nhd ? kHeads : 1;
  const int64_t scale_head = nhd ? 1 : page_size;

  ListedRun r;
  const auto poison = std::byte{0x7f};  // int8 127, an fp8_e4m3 NaN
  r.data.assign(static_cast<size_t>(num_pages * page_stride), poison);
  r.scales.assign(static_cast<size_t>(num_pages * page_size * kHeads), std::nanf(""));
  std::uniform_real_distribution<float> scale(0.01f, 1.0f);
  for (int64_t t = 0; t < count; ++t) {
    const int64_t key = first_slot + t;
    const int64_t page = pages[static_cast<size_t>(key / page_size)];
    const int64_t slot = key % page_size;
    r.offsets.push_back(page * page_stride + slot * slot_stride);
    r.scale_offsets.push_back(page * page_size * kHeads + slot * scale_slot);
    std::byte* row = r.data.data() + r.offsets.back() + head * head_stride;
    for (int64_t d = 0; d < dim; ++d) {
      uint8_t v = 0x7f;
      if (dtype == DType::int8) {
        v = static_cast<uint8_t>(static_cast<int8_t>(uniform_int(rng, -127, 127)));
        r.values.push_back(static_cast<int8_t>(v));
      } else {
        while ((v & 0x7f) == 0x7f) v = static_cast<uint8_t>(uniform_int(rng, 0, 255));
        r.values.push_back(fp8_e4m3_to_float(v));
      }
      row[d] = std::byte{v};
    }
    float& s = r.scales[static_cast<size_t>(r.scale_offsets.back() + head * scale_head)];
    s = scale(rng);
    r.row_scales.push_back(s);
  }
  r.view.data = r.data.data() + head * head_stride;
  r.view.dtype = dtype;
  r.view.offsets = r.offsets.data();
  r.view.scales = r.scales.data() + head * scale_head;
  r.view.scale_offsets = r.scale_offsets.data();
  r.view.count = count;
  r.view.dim = dim;
  r.view.apart = nhd;
  return r;
}

// Points the run's next rows at its own rows (as the next kv head of the same keys would be) for
// every other run length: the loops prefetch into them, which must not change any result.
void with_next_listed(ListedRun& r) {
  if (r.view.count % 2 != 0) return;
  r.view.next = r.view.data;
  r.view.next_offsets = r.view.offsets;
  r.view.next_scales = r.view.scales;
  r.view.next_scale_offsets = r.view.scale_offsets;
  r.view.next_count = r.view.count;
}

// (dtype, dim, page size, layout), one random group in [1, 8] and run length in [1, 150] each.
template <class F>
void for_each_listed_case(std::mt19937& rng, F&& f) {
  for (const DType dtype : kDot8Storage) {
    for (const int64_t dim : {int64_t{64}, int64_t{128}, int64_t{192}}) {
      for (const int64_t page_size :
           {int64_t{1}, int64_t{3}, int64_t{5}, int64_t{16}, int64_t{17}}) {
        for (const bool nhd : {true, false}) {
          const int64_t group = uniform_int(rng, 1, 8);
          const int64_t count = uniform_int(rng, 1, 150);
          SCOPED_TRACE(::testing::Message()
                       << name(dtype) << " dim " << dim << " page " << page_size
                       << (nhd ? " nhd" : " hnd") << " group " << group << " count " << count);
          ListedRun run = random_listed_run(dtype, dim, page_size, nhd, count, rng);
          with_next_listed(run);
          f(run, group);
        }
      }
    }
  }
}

TEST_F(AttentionDot8Rows, ListedScoreMatchesFloat64WithinStatedRounding) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  for_each_listed_case(rng, [&](const ListedRun& k, int64_t group) {
    const int64_t dim = k.view.dim;
    const int64_t count = k.view.count;
    const AttentionRowKernels kernels = avx512_dot8_attention_rows(k.view.dtype, dim);
    const std::vector<float> q = random_floats(static_cast<size_t>(group * dim), -1.0f, 1.0f, rng);
    const size_t n_out = static_cast<size_t>(group * count);
    std::vector<double> want(n_out, 0.0);
    std::vector<double> tol(n_out, 0.0);
    for (int64_t g = 0; g < group; ++g) {
      double q_max = 0.0;
      for (int64_t d = 0; d < dim; ++d) {
        q_max =
            std::max(q_max, std::fabs(static_cast<double>(q[static_cast<size_t>(g * dim + d)])));
      }
      for (int64_t t = 0; t < count; ++t) {
        double mag = 0.0;
        double k_abs = 0.0;
        const auto i = static_cast<size_t>(g * count + t);
        for (int64_t d = 0; d < dim; ++d) {
          const double kv =
              k.values[static_cast<size_t>(t * dim + d)] * k.row_scales[static_cast<size_t>(t)];
          const double term = static_cast<double>(q[static_cast<size_t>(g * dim + d)]) * kv;
          want[i] += term;
          mag += std::fabs(term);
          k_abs += std::fabs(kv);
        }
        const double rounding =
            k.view.dtype == DType::int8 ? 0x1p-15 * q_max * k_abs : 0x1p-8 * mag;
        tol[i] = rounding + static_cast<double>(dim + 4) * 0x1p-23 * mag;
      }
    }
    std::vector<float> s(n_out + kGuard, std::nanf(""));
    uint32_t poison = 0;
    std::memcpy(&poison, &s[0], 4);
    avx512_dot8_listed_rows(k.view.dtype)
        .score(prepared(kernels, q, group, dim).data(), group, k.view, s.data());
    for (size_t i = 0; i < n_out; ++i) {
      ASSERT_LE(std::fabs(static_cast<double>(s[i]) - want[i]), tol[i])
          << "s[" << i << "] = " << s[i] << ", want " << want[i];
    }
    ASSERT_EQ(first_written_guard(s, n_out, poison), -1) << "a guard after s was written";
  });
}

TEST_F(AttentionDot8Rows, ListedAccumulateMatchesFloat64WithinStatedRounding) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  for_each_listed_case(rng, [&](const ListedRun& v, int64_t group) {
    const int64_t dim = v.view.dim;
    const int64_t count = v.view.count;
    const std::vector<float> p = random_floats(static_cast<size_t>(group * count), 0.0f, 1.0f, rng);
    const size_t n_acc = static_cast<size_t>(group * dim);
    std::vector<float> acc = random_floats(n_acc, -1.0f, 1.0f, rng);
    std::vector<double> want(acc.begin(), acc.end());
    std::vector<double> tol(n_acc);
    for (int64_t g = 0; g < group; ++g) {
      double w_max = 0.0;
      for (int64_t t = 0; t < count; ++t) {
        w_max = std::max(
            w_max, p[static_cast<size_t>(g * count + t)] * v.row_scales[static_cast<size_t>(t)]);
      }
      for (int64_t d = 0; d < dim; ++d) {
        const auto i = static_cast<size_t>(g * dim + d);
        double mag = std::fabs(want[i]);
        double v_abs = 0.0;
        double terms_abs = 0.0;
        for (int64_t t = 0; t < count; ++t) {
          const double w = static_cast<double>(p[static_cast<size_t>(g * count + t)]) *
                           v.row_scales[static_cast<size_t>(t)];
          const double term = w * v.values[static_cast<size_t>(t * dim + d)];
          want[i] += term;
          terms_abs += std::fabs(term);
          v_abs += std::fabs(v.values[static_cast<size_t>(t * dim + d)]);
        }
        mag += terms_abs;
        const double rounding =
            v.view.dtype == DType::int8 ? 0x1p-15 * w_max * v_abs : 0x1p-8 * terms_abs;
        tol[i] = rounding + static_cast<double>(count + 4) * 0x1p-23 * mag;
      }
    }
    const float poison = std::nanf("");
    acc.resize(n_acc + kGuard, poison);
    uint32_t poison_bits = 0;
    std::memcpy(&poison_bits, &poison, 4);
    avx512_dot8_listed_rows(v.view.dtype).accumulate(p.data(), group, v.view, acc.data());
    for (size_t i = 0; i < n_acc; ++i) {
      ASSERT_LE(std::fabs(static_cast<double>(acc[i]) - want[i]), tol[i])
          << "acc[" << i << "] = " << acc[i] << ", want " << want[i];
    }
    ASSERT_EQ(first_written_guard(acc, n_acc, poison_bits), -1) << "a guard after acc was written";
  });
}

// Listed rows that happen to lie a stride apart give the strided loops' results bit for bit (the
// same words, weights and sums in the same order).
TEST_F(AttentionDot8Rows, ListedRowsEqualStridedRows) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  for (const DType dtype : kDot8Storage) {
    for (const int64_t count : {int64_t{16}, int64_t{64}, int64_t{101}}) {
      SCOPED_TRACE(::testing::Message() << name(dtype) << " count " << count);
      constexpr int64_t kDim = 128;
      constexpr int64_t kGroup = 4;
      Rows r = random_rows(dtype, count, kDim, 3 * kDim, rng);
      std::vector<int64_t> offsets;
      std::vector<int64_t> scale_offsets;
      for (int64_t t = 0; t < count; ++t) {
        offsets.push_back(t * r.view.stride);
        scale_offsets.push_back(t * r.view.scale_stride);
      }
      ListedRows listed;
      listed.data = r.view.data;
      listed.dtype = dtype;
      listed.offsets = offsets.data();
      listed.scales = r.view.scales;
      listed.scale_offsets = scale_offsets.data();
      listed.count = count;
      listed.dim = kDim;
      listed.apart = true;
      const AttentionRowKernels strided = avx512_dot8_attention_rows(dtype, kDim);
      const ListedRowKernels by_list = avx512_dot8_listed_rows(dtype);
      const std::vector<float> q =
          prepared(strided, random_floats(kGroup * kDim, -1.0f, 1.0f, rng), kGroup, kDim);
      std::vector<float> s1(static_cast<size_t>(kGroup * count));
      std::vector<float> s2(s1.size());
      strided.score(q.data(), kGroup, r.view, s1.data());
      by_list.score(q.data(), kGroup, listed, s2.data());
      EXPECT_EQ(s1, s2);
      const std::vector<float> p = random_floats(s1.size(), 0.0f, 1.0f, rng);
      std::vector<float> a1 = random_floats(kGroup * kDim, -1.0f, 1.0f, rng);
      std::vector<float> a2 = a1;
      strided.accumulate(p.data(), kGroup, r.view, a1.data());
      by_list.accumulate(p.data(), kGroup, listed, a2.data());
      EXPECT_EQ(a1, a2);
    }
  }
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
