// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// The AVX-512 attention row loops with dot-product instructions on 8-bit rows
// (avx512_dot8_attention_rows in attention_kernels.h). With int8 / fp8 rows the float loops of
// attention_avx512.cpp are bound by their FMAs (Zen 4: 64 of ~98 cycles per int8 K+V row pair at
// 4 query heads, dim 128); vpdpwssd and vdpbf16ps do two multiply-adds per float lane.
//  - int8: rows widen to int16 words by one vpmovsxbw per 32 elements. q rows become int16 words
//    q_d * 32767 / max|q| (rounded), followed by the float max|q| / 32767; the weights
//    p_t * v_scale_t of a segment of 64 rows become int16 steps of the segment's largest / 32767.
//    Sums are exact int32 (|word| <= 32767, |row| <= 128: 512 dims or 64 rows cannot overflow),
//    scaled to float once per row (score) or per segment (accumulate).
//  - fp8_e4m3: every value is exact in bf16; rows become bf16 words by two byte table lookups
//    (vpermi2b: the high and the low byte of the bf16 of each of the 128 magnitudes) and the sign
//    bit. q and the weights are rounded to bf16 (to nearest even); float sums.
// score: a dword lane holds two dims of one row, against the same two dims of q. accumulate: a
// dword lane holds one dim of two rows (t, t + 1), against the weight pair (w_t, w_t+1). The byte
// unpacks leave lanes in a fixed order, which the prepared q (fp8) and the accumulator flush
// follow.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kvcache/dtype.h"
#include "kvcache/op_plan.h"

#include "backend/cpu/attention_kernels.h"

namespace kvcache::cpu {

bool dot8_applies(DType dtype, int64_t dim) {
  return (dtype == DType::int8 || dtype == DType::fp8_e4m3) && dim > 0 && dim % 64 == 0 &&
         dim <= 512;
}

}  // namespace kvcache::cpu

#if defined(__x86_64__)
#include "backend/cpu/attention_avx512_dot8.h"

namespace kvcache::cpu::dot8 {

const Fp8ByteTables& fp8_byte_tables() {
  static const Fp8ByteTables tables = [] {
    Fp8ByteTables t{};
    for (int c = 0; c < 128; ++c) {
      const float x = fp8_e4m3_to_float(static_cast<uint8_t>(c));
      uint32_t bits = 0;
      std::memcpy(&bits, &x, sizeof(float));
      const auto b = static_cast<uint16_t>(std::isnan(x) ? 0x7FC0u : bits >> 16);
      t.hi[c] = static_cast<uint8_t>(b >> 8);
      t.lo[c] = static_cast<uint8_t>(b & 0xFFu);
    }
    return t;
  }();
  return tables;
}

}  // namespace kvcache::cpu::dot8

namespace kvcache::cpu {
namespace {

using avx512::kPrefetchRows;
using avx512::kSegmentRows;
using avx512::prefetch_row;
using avx512::reduce16;
using avx512::replicate_scales;
using avx512::row_scale;
using avx512::slot_of_lane;
using avx512::store_score_lanes;

using dot8::DotFp8;
using dot8::DotInt8;
using dot8::kInt16Steps;
using dot8::kMaxDim;
using dot8::kPairs;
using dot8::kUnit;

// --- int8: vpdpwssd ---

KV_DOT8 void prepare_q_int8(float* q, int64_t dim) {
  __m512 top = _mm512_setzero_ps();
  for (int64_t d = 0; d < dim; d += 16)
    top = _mm512_max_ps(top, _mm512_abs_ps(_mm512_loadu_ps(q + d)));
  const float amax = _mm512_reduce_max_ps(top);
  const __m512 steps = _mm512_set1_ps(amax > 0.0f ? kInt16Steps / amax : 0.0f);
  const __m512 limit = _mm512_set1_ps(kInt16Steps);
  alignas(64) int16_t words[kMaxDim];
  for (int64_t d = 0; d < dim; d += 16) {
    const __m512 x = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_loadu_ps(q + d), steps),
                                                 _mm512_sub_ps(_mm512_setzero_ps(), limit)),
                                   limit);
    _mm256_store_si256(reinterpret_cast<__m256i*>(words + d),
                       _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(x)));
  }
  const float factor = amax / kInt16Steps;
  std::memcpy(q, words, static_cast<size_t>(dim) * sizeof(int16_t));
  std::memcpy(reinterpret_cast<std::byte*>(q) + 2 * dim, &factor, sizeof(float));
}

// --- fp8_e4m3: vdpbf16ps ---

// q rounded to bf16, each 64-dim unit in the word order of DotFp8::row_words: words [0, 32)
// hold dims 16L + [0, 8), words [32, 64) dims 16L + [8, 16), L = 0..3.
KV_DOT8 void prepare_q_fp8(float* q, int64_t dim) {
  alignas(64) uint16_t words[kMaxDim];
  for (int64_t d = 0; d < dim; d += kUnit) {
    // in dim order: blocks of 8 words = dims [0, 8), [8, 16), ...
    const auto w0 =
        (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(q + d + 16), _mm512_loadu_ps(q + d));
    const auto w1 =
        (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(q + d + 48), _mm512_loadu_ps(q + d + 32));
    _mm512_store_si512(words + d, _mm512_shuffle_i32x4(w0, w1, 0x88));
    _mm512_store_si512(words + d + 32, _mm512_shuffle_i32x4(w0, w1, 0xDD));
  }
  std::memcpy(q, words, static_cast<size_t>(dim) * sizeof(uint16_t));
}

// --- the loops ---

// Scores of heads [0, G) over all k rows (q: G prepared rows, dim floats apart): blocks of
// R = 16 / G rows fill one reduce16; leftover rows reduce one at a time.
template <class D, int G>
KV_DOT8 void score_pass(const D& dd, const float* q, const KVRows& k, float* s) {
  constexpr int R = 16 / G;
  using T = typename D::T;
  const T* base = static_cast<const T*>(k.data);
  const int64_t n = k.count;
  const int64_t dim = k.dim;
  const int64_t units = dim / kUnit;
  const auto* qw = reinterpret_cast<const int16_t*>(q);  // head g: qw + g * 2 * dim
  float qf[G];
  alignas(64) float qm[16] = {};
  for (int g = 0; g < G; ++g) {
    qf[g] = D::q_multiplier(q + g * dim, dim);
    for (int r = 0; r < R; ++r) qm[g * R + r] = qf[g];
  }
  const __m512 q_factor = _mm512_load_ps(qm);
  const KVRows pf = k;  // a local copy: the stores to s cannot alias it
  int64_t t = 0;
  for (; t + R <= n; t += R) {
    const T* rows[R];
    for (int r = 0; r < R; ++r) rows[r] = base + (t + r) * k.stride;
    for (int r = 0; r < R; ++r) prefetch_row<T>(pf, t + kPrefetchRows + r);
    typename D::Acc acc[16];
    for (auto& a : acc) a = D::zero();
    for (int64_t u = 0; u < units; ++u) {
      __m512i kw[R][2];
      for (int r = 0; r < R; ++r) dd.row_words(rows[r] + kUnit * u, kw[r]);
      for (int g = 0; g < G; ++g) {
        for (int h = 0; h < 2; ++h) {
          const __m512i qv = _mm512_loadu_si512(qw + g * 2 * dim + kUnit * u + 32 * h);
          for (int r = 0; r < R; ++r) {
            const int slot = slot_of_lane(g * R + r);
            acc[slot] = D::dot(acc[slot], qv, kw[r][h]);
          }
        }
      }
    }
    __m512 sums[16];
    for (int i = 0; i < 16; ++i) sums[i] = D::bits(acc[i]);
    // lane g * R + r: head g, row t + r
    const __m512 sum = _mm512_mul_ps(D::to_float(reduce16<typename D::Add>(sums)),
                                     _mm512_mul_ps(q_factor, replicate_scales<R>(k, t, 1.0f)));
    store_score_lanes<G, R>(sum, s, n, t);
  }
  for (; t < n; ++t) {
    const T* row = base + t * k.stride;
    typename D::Acc acc[G];
    for (auto& a : acc) a = D::zero();
    for (int64_t u = 0; u < units; ++u) {
      __m512i kw[2];
      dd.row_words(row + kUnit * u, kw);
      for (int g = 0; g < G; ++g) {
        for (int h = 0; h < 2; ++h) {
          acc[g] = D::dot(acc[g], _mm512_loadu_si512(qw + g * 2 * dim + kUnit * u + 32 * h), kw[h]);
        }
      }
    }
    const float sc = row_scale(k, t, 1.0f);
    for (int g = 0; g < G; ++g) {
      s[g * n + t] = D::reduce(acc[g]) * qf[g] * sc;
    }
  }
}

// acc[g][d0, d0 + 64 U) += factor[g] * sum_t w[g][t] * v[t][...) for g < G, t < n, with the weight
// pairs of one segment. The first tile of a segment prefetches whole rows ahead (row
// t_base + t + kPrefetchRows of `ahead`, when given), so later tiles find them in cache.
template <class D, int G, int U>
KV_DOT8 void accumulate_tile(const D& dd, const uint32_t* pairs, const float* factor,
                             const typename D::T* rows, int64_t stride, int64_t n, int64_t dim,
                             int64_t d0, const KVRows* ahead, int64_t t_base, float* acc) {
  using T = typename D::T;
  typename D::Acc a[G][U][4];
  for (auto& ag : a) {
    for (auto& au : ag) {
      for (auto& x : au) x = D::zero();
    }
  }
  const KVRows pf = ahead != nullptr ? *ahead : KVRows{};  // a local copy: fields stay in registers
  for (int64_t t = 0; t < n; t += 2) {
    const T* r0 = rows + t * stride + d0;
    const T* r1 = t + 1 < n ? r0 + stride : r0;  // an odd count pairs the last row with itself
    if (ahead != nullptr) {
      prefetch_row<T>(pf, t_base + t + kPrefetchRows);
      prefetch_row<T>(pf, t_base + t + 1 + kPrefetchRows);
    }
    for (int u = 0; u < U; ++u) {
      __m512i w[4];
      dd.pair_words(r0 + kUnit * u, r1 + kUnit * u, w);
      for (int g = 0; g < G; ++g) {
        const __m512i wb = _mm512_set1_epi32(static_cast<int>(pairs[g * kPairs + t / 2]));
        for (int k = 0; k < 4; ++k) a[g][u][k] = D::dot(a[g][u][k], wb, w[k]);
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    const __m512 f = _mm512_set1_ps(factor[g]);
    for (int u = 0; u < U; ++u) {
      __m512 y[4];
      __m512 o[4];
      for (int k = 0; k < 4; ++k) y[k] = D::to_float(D::bits(a[g][u][k]));
      D::to_natural(y, o);
      for (int k = 0; k < 4; ++k) {
        float* p = acc + g * dim + d0 + kUnit * u + 16 * k;
        _mm512_storeu_ps(p, _mm512_fmadd_ps(o[k], f, _mm512_loadu_ps(p)));
      }
    }
  }
}

// Heads [0, G) of acc over all v rows, in segments of kSegmentRows rows: the segment's weight
// pairs, then its dims in tiles of U = 4 / G units (16 accumulators), fewer at the end.
template <class D, int G>
KV_DOT8 void accumulate_heads(const D& dd, const float* p, int64_t n_total, const KVRows& v,
                              float* acc) {
  constexpr int kMaxUnits = 4 / G;
  const auto* base = static_cast<const typename D::T*>(v.data);
  alignas(64) uint32_t pairs[G * kPairs];
  alignas(64) float scale[kSegmentRows];
  float factor[G];
  for (int64_t t0 = 0; t0 < v.count; t0 += kSegmentRows) {
    const int64_t n = std::min(v.count - t0, kSegmentRows);
    for (int64_t t = 0; t < n; ++t) scale[t] = row_scale(v, t0 + t, 1.0f);
    std::fill(scale + n, scale + (n + 31) / 32 * 32, 0.0f);
    for (int g = 0; g < G; ++g) {
      factor[g] = D::weights(p + g * n_total + t0, scale, n, pairs + g * kPairs);
    }
    const typename D::T* rows = base + t0 * v.stride;
    for (int64_t d0 = 0; d0 < v.dim;) {
      const KVRows* ahead = d0 == 0 ? &v : nullptr;
      const int64_t units = (v.dim - d0) / kUnit;
      if constexpr (kMaxUnits >= 4) {
        if (units >= 4) {
          accumulate_tile<D, G, 4>(dd, pairs, factor, rows, v.stride, n, v.dim, d0, ahead, t0, acc);
          d0 += 4 * kUnit;
          continue;
        }
      }
      if constexpr (kMaxUnits >= 2) {
        if (units >= 2) {
          accumulate_tile<D, G, 2>(dd, pairs, factor, rows, v.stride, n, v.dim, d0, ahead, t0, acc);
          d0 += 2 * kUnit;
          continue;
        }
      }
      accumulate_tile<D, G, 1>(dd, pairs, factor, rows, v.stride, n, v.dim, d0, ahead, t0, acc);
      d0 += kUnit;
    }
  }
}

template <class D>
KV_DOT8 void score_rows(const float* q, int64_t group, const KVRows& k, float* s) {
  D dd{};
  if constexpr (std::is_same_v<D, DotFp8>) dd = DotFp8::make();
  for_each_pass<4>(group, [&]<int G>(std::integral_constant<int, G>, int64_t g) {
    score_pass<D, G>(dd, q + g * k.dim, k, s + g * k.count);
  });
}

KV_DOT8 void accumulate_any(const float* p, int64_t group, const KVRows& v, float* acc) {
  if (!dot8_applies(v.dtype, v.dim)) return avx512_attention_rows().accumulate(p, group, v, acc);
  const auto run = [&]<class D>(const D& dd) {
    for_each_pass<4>(group, [&]<int G>(std::integral_constant<int, G>, int64_t g) {
      accumulate_heads<D, G>(dd, p + g * v.count, v.count, v, acc + g * v.dim);
    });
  };
  if (v.dtype == DType::int8) {
    run(DotInt8{});
  } else {
    run(DotFp8::make());
  }
}

// --- self-test ---

// A fixed pseudo-random float in [-1, 1).
float next_value(uint32_t& state) {
  state = state * 1664525u + 1013904223u;
  return static_cast<float>(state >> 8) * (2.0f / 16777216.0f) - 1.0f;
}

// One dtype at one dim, group 7 (passes of 4, 2 and 1), 21 rows (odd; a leftover after every
// block), strided rows and scales, against the portable loops within the rounding the header
// states: q and weights to int16 steps of their largest / 32767 (int8) or to bf16 (fp8), plus
// float sums.
bool self_test_dtype(DType dtype, int64_t dim) {
  constexpr int64_t kGroup = 7;
  constexpr int64_t kRows = 21;
  const int64_t stride = dim + 5;
  const bool is_int8 = dtype == DType::int8;
  uint32_t state = static_cast<uint32_t>(dtype) * 131u + static_cast<uint32_t>(dim);
  std::vector<float> values(static_cast<size_t>(kRows * stride));
  for (float& x : values) x = next_value(state) * (is_int8 ? 128.0f : 400.0f);
  std::vector<std::byte> data(values.size());
  from_float(values.data(), dtype, data.data(), values.size(), Saturation::finite);
  to_float(dtype, data.data(), values.data(), values.size());
  std::vector<float> scales(static_cast<size_t>(kRows * 3));
  for (float& x : scales) x = 0.5f + 0.25f * next_value(state);
  const KVRows rows{data.data(), dtype, stride, scales.data(), 3, kRows, dim};
  std::vector<float> q(static_cast<size_t>(kGroup * dim));
  std::vector<float> p(static_cast<size_t>(kGroup * kRows));
  std::vector<float> acc0(static_cast<size_t>(kGroup * dim));
  for (float& x : q) x = next_value(state);
  for (float& x : p) x = 0.5f * (next_value(state) + 1.0f);
  for (float& x : acc0) x = next_value(state);

  const AttentionRowKernels fast = avx512_dot8_attention_rows(dtype, dim);
  const AttentionRowKernels ref = portable_attention_rows();
  std::vector<float> s_fast(p.size());
  std::vector<float> s_ref(p.size());
  std::vector<float> q_prepared = q;
  for (int64_t g = 0; g < kGroup; ++g) fast.prepare_q(q_prepared.data() + g * dim, dim);
  fast.score(q_prepared.data(), kGroup, rows, s_fast.data());
  ref.score(q.data(), kGroup, rows, s_ref.data());
  std::vector<float> acc_fast = acc0;
  std::vector<float> acc_ref = acc0;
  fast.accumulate(p.data(), kGroup, rows, acc_fast.data());
  ref.accumulate(p.data(), kGroup, rows, acc_ref.data());

  const auto at = [&](int64_t t, int64_t d) {
    return std::fabs(static_cast<double>(values[static_cast<size_t>(t * stride + d)]));
  };
  const double float_sums = static_cast<double>(std::max(dim, kRows) + 4) * 0x1p-23;
  for (int64_t g = 0; g < kGroup; ++g) {
    double q_max = 0.0;
    for (int64_t d = 0; d < dim; ++d) {
      q_max = std::max(q_max, std::fabs(static_cast<double>(q[static_cast<size_t>(g * dim + d)])));
    }
    double w_max = 0.0;
    for (int64_t t = 0; t < kRows; ++t) {
      w_max = std::max(w_max, static_cast<double>(p[static_cast<size_t>(g * kRows + t)]) *
                                  scales[static_cast<size_t>(t * 3)]);
    }
    for (int64_t t = 0; t < kRows; ++t) {
      double mag = 0.0;
      double row_abs = 0.0;
      for (int64_t d = 0; d < dim; ++d) {
        mag += std::fabs(static_cast<double>(q[static_cast<size_t>(g * dim + d)])) * at(t, d);
        row_abs += at(t, d);
      }
      const double sc = scales[static_cast<size_t>(t * 3)];
      const double tol =
          (is_int8 ? 0x1p-15 * q_max * row_abs * sc : 0x1p-8 * mag * sc) + float_sums * mag * sc;
      const auto i = static_cast<size_t>(g * kRows + t);
      if (!(std::fabs(static_cast<double>(s_fast[i]) - s_ref[i]) <= tol)) return false;
    }
    for (int64_t d = 0; d < dim; ++d) {
      const auto i = static_cast<size_t>(g * dim + d);
      double mag = std::fabs(static_cast<double>(acc0[i]));
      double col_abs = 0.0;
      for (int64_t t = 0; t < kRows; ++t) {
        mag += static_cast<double>(p[static_cast<size_t>(g * kRows + t)]) *
               scales[static_cast<size_t>(t * 3)] * at(t, d);
        col_abs += at(t, d);
      }
      const double tol = (is_int8 ? 0x1p-15 * w_max * col_abs : 0x1p-8 * mag) + float_sums * mag;
      if (!(std::fabs(static_cast<double>(acc_fast[i]) - acc_ref[i]) <= tol)) return false;
    }
  }
  return true;
}

bool run_self_test() {
  if (!cpu_has_dot8()) return false;
  for (const DType dtype : {DType::int8, DType::fp8_e4m3}) {
    for (const int64_t dim : {int64_t{64}, int64_t{192}}) {
      if (!self_test_dtype(dtype, dim)) return false;
    }
  }
  return true;
}

}  // namespace

AttentionRowKernels avx512_dot8_attention_rows(DType k_dtype, int64_t head_dim) {
  AttentionRowKernels k = avx512_attention_rows();
  k.accumulate = &accumulate_any;
  k.isa = "avx512.dot8";
  if (dot8_applies(k_dtype, head_dim)) {
    const bool is_int8 = k_dtype == DType::int8;
    k.score = is_int8 ? &score_rows<DotInt8> : &score_rows<DotFp8>;
    k.prepare_q = is_int8 ? &prepare_q_int8 : &prepare_q_fp8;
  }
  return k;
}

bool cpu_has_dot8() {
  return cpu_supports(CpuIsa::avx512) && __builtin_cpu_supports("avx512vnni") &&
         __builtin_cpu_supports("avx512vbmi");
}

bool avx512_dot8_attention_rows_self_test() {
  static const bool passed = run_self_test();
  return passed;
}

}  // namespace kvcache::cpu

#else  // not x86-64: no dot-product loops.

namespace kvcache::cpu {

AttentionRowKernels avx512_dot8_attention_rows(DType, int64_t) { return portable_attention_rows(); }

bool cpu_has_dot8() { return false; }

bool avx512_dot8_attention_rows_self_test() { return false; }

}  // namespace kvcache::cpu

#endif
