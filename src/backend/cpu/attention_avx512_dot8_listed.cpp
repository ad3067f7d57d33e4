// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// The dot-product loops on 8-bit rows (attention_avx512_dot8.cpp) over rows listed by offset
// (ListedRows, attention_kernels.h): one call per kv head walks every page of a run of keys, so
// paged 8-bit K/V pay no per-page call, logit copy or accumulator flush. The loops are a copy of
// the strided ones with each row's address read from the list, kept in their own file: strided
// loops that also took listed rows cost contiguous 8-bit 3-8% and paged bf16 6-8% from DRAM
// (docs/PERFORMANCE.md), so every other path keeps the strided code unchanged. Differences from
// the copy: a row's lines are prefetched once each, and a tile's scales are built in registers
// (the strided loops store them and reload them as one vector).

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "kvcache/dtype.h"

#include "backend/cpu/attention_kernels.h"

#if defined(__x86_64__)
#include "backend/cpu/attention_avx512_dot8.h"

namespace kvcache::cpu {
namespace {

using avx512::kPrefetchRows;
using avx512::kSegmentRows;
using avx512::reduce16;
using avx512::slot_of_lane;
using avx512::store_score_lanes;
using dot8::DotFp8;
using dot8::DotInt8;
using dot8::kPairs;
using dot8::kUnit;

// Every line of a row of `bytes` bytes: into L2 when rows lie apart (an NHD page's rows of one kv
// head share 8 of L1's 64 sets; see avx512::prefetch_one), else into L1.
KV_DOT8_INLINE void prefetch_lines(const void* row, int64_t bytes, bool apart) {
  const auto first = reinterpret_cast<uintptr_t>(row);
  const uintptr_t last = first + static_cast<uintptr_t>(bytes) - 1;
  for (uintptr_t p = first & ~uintptr_t{63}; p <= last; p += 64) {
    if (apart) {
      __builtin_prefetch(reinterpret_cast<const void*>(p), 0, 2);
    } else {
      __builtin_prefetch(reinterpret_cast<const void*>(p), 0, 3);
    }
  }
}

// Prefetches row r of `rows`; r past count reads into rows.next (if it has r), with its scale.
template <class T>
KV_DOT8_INLINE void prefetch_listed(const ListedRows& rows, int64_t r) {
  if (r < rows.count) {
    prefetch_lines(static_cast<const T*>(rows.data) + rows.offsets[r], rows.dim, rows.apart);
    return;
  }
  r -= rows.count;
  if (r >= rows.next_count) return;
  prefetch_lines(static_cast<const T*>(rows.next) + rows.next_offsets[r], rows.dim, rows.apart);
  if (rows.next_scales != nullptr) {
    _mm_prefetch(reinterpret_cast<const char*>(rows.next_scales + rows.next_scale_offsets[r]),
                 _MM_HINT_T0);
  }
}

inline float listed_scale(const ListedRows& rows, int64_t t) {
  return rows.scales == nullptr ? 1.0f : rows.scales[rows.scale_offsets[t]];
}

// The scales of rows [t, t + R) in lanes g * R + r for every g (avx512::replicate_scales).
template <int R>
KV_DOT8_INLINE __m512 listed_scales(const ListedRows& rows, int64_t t) {
  if constexpr (R == 16) {
    alignas(64) float sc[16];
    for (int r = 0; r < 16; ++r) sc[r] = listed_scale(rows, t + r);
    return _mm512_load_ps(sc);
  } else if constexpr (R == 8) {
    const __m256 v = _mm256_setr_ps(listed_scale(rows, t), listed_scale(rows, t + 1),
                                    listed_scale(rows, t + 2), listed_scale(rows, t + 3),
                                    listed_scale(rows, t + 4), listed_scale(rows, t + 5),
                                    listed_scale(rows, t + 6), listed_scale(rows, t + 7));
    return _mm512_broadcast_f32x8(v);
  } else {
    static_assert(R == 4, "score passes hold 1, 2 or 4 heads");
    const __m128 v = _mm_setr_ps(listed_scale(rows, t), listed_scale(rows, t + 1),
                                 listed_scale(rows, t + 2), listed_scale(rows, t + 3));
    return _mm512_broadcast_f32x4(v);
  }
}

// score_pass of attention_avx512_dot8.cpp over listed rows.
template <class D, int G>
KV_DOT8 void score_pass(const D& dd, const float* q, const ListedRows& k, float* s) {
  constexpr int R = 16 / G;
  using T = typename D::T;
  const T* base = static_cast<const T*>(k.data);
  const int64_t* offsets = k.offsets;
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
  const ListedRows pf = k;  // a local copy: the stores to s cannot alias it
  int64_t t = 0;
  for (; t + R <= n; t += R) {
    const T* rows[R];
    for (int r = 0; r < R; ++r) rows[r] = base + offsets[t + r];
    for (int r = 0; r < R; ++r) prefetch_listed<T>(pf, t + kPrefetchRows + r);
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
                                     _mm512_mul_ps(q_factor, listed_scales<R>(pf, t)));
    store_score_lanes<G, R>(sum, s, n, t);
  }
  for (; t < n; ++t) {
    const T* row = base + offsets[t];
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
    const float sc = listed_scale(pf, t);
    for (int g = 0; g < G; ++g) {
      s[g * n + t] = D::reduce(acc[g]) * qf[g] * sc;
    }
  }
}

// accumulate_tile of attention_avx512_dot8.cpp over listed rows: rows t of the segment at
// base + offsets[t].
template <class D, int G, int U>
KV_DOT8 void accumulate_tile(const D& dd, const uint32_t* pairs, const float* factor,
                             const typename D::T* base, const int64_t* offsets, int64_t n,
                             int64_t dim, int64_t d0, const ListedRows* ahead, int64_t t_base,
                             float* acc) {
  using T = typename D::T;
  typename D::Acc a[G][U][4];
  for (auto& ag : a) {
    for (auto& au : ag) {
      for (auto& x : au) x = D::zero();
    }
  }
  const ListedRows pf = ahead != nullptr ? *ahead : ListedRows{};
  for (int64_t t = 0; t < n; t += 2) {
    const T* r0 = base + offsets[t] + d0;
    const T* r1 = t + 1 < n ? base + offsets[t + 1] + d0 : r0;  // an odd count: the last row twice
    if (ahead != nullptr) {
      prefetch_listed<T>(pf, t_base + t + kPrefetchRows);
      prefetch_listed<T>(pf, t_base + t + 1 + kPrefetchRows);
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

// accumulate_heads of attention_avx512_dot8.cpp over listed rows: segments of kSegmentRows rows.
template <class D, int G>
KV_DOT8 void accumulate_heads(const D& dd, const float* p, int64_t n_total, const ListedRows& v,
                              float* acc) {
  constexpr int kMaxUnits = 4 / G;
  const auto* base = static_cast<const typename D::T*>(v.data);
  alignas(64) uint32_t pairs[G * kPairs];
  alignas(64) float scale[kSegmentRows];
  float factor[G];
  for (int64_t t0 = 0; t0 < v.count; t0 += kSegmentRows) {
    const int64_t n = std::min(v.count - t0, kSegmentRows);
    for (int64_t t = 0; t < n; ++t) scale[t] = listed_scale(v, t0 + t);
    std::fill(scale + n, scale + (n + 31) / 32 * 32, 0.0f);
    for (int g = 0; g < G; ++g) {
      factor[g] = D::weights(p + g * n_total + t0, scale, n, pairs + g * kPairs);
    }
    const int64_t* offsets = v.offsets + t0;
    for (int64_t d0 = 0; d0 < v.dim;) {
      const ListedRows* ahead = d0 == 0 ? &v : nullptr;
      const int64_t units = (v.dim - d0) / kUnit;
      if constexpr (kMaxUnits >= 4) {
        if (units >= 4) {
          accumulate_tile<D, G, 4>(dd, pairs, factor, base, offsets, n, v.dim, d0, ahead, t0, acc);
          d0 += 4 * kUnit;
          continue;
        }
      }
      if constexpr (kMaxUnits >= 2) {
        if (units >= 2) {
          accumulate_tile<D, G, 2>(dd, pairs, factor, base, offsets, n, v.dim, d0, ahead, t0, acc);
          d0 += 2 * kUnit;
          continue;
        }
      }
      accumulate_tile<D, G, 1>(dd, pairs, factor, base, offsets, n, v.dim, d0, ahead, t0, acc);
      d0 += kUnit;
    }
  }
}

template <class D>
KV_DOT8 D make_dot() {
  if constexpr (std::is_same_v<D, DotFp8>) {
    return DotFp8::make();
  } else {
    return D{};
  }
}

template <class D>
KV_DOT8 void score_listed(const float* q, int64_t group, const ListedRows& k, float* s) {
  const D dd = make_dot<D>();
  for_each_pass<4>(group, [&]<int G>(std::integral_constant<int, G>, int64_t g) {
    score_pass<D, G>(dd, q + g * k.dim, k, s + g * k.count);
  });
}

template <class D>
KV_DOT8 void accumulate_listed(const float* p, int64_t group, const ListedRows& v, float* acc) {
  const D dd = make_dot<D>();
  for_each_pass<4>(group, [&]<int G>(std::integral_constant<int, G>, int64_t g) {
    accumulate_heads<D, G>(dd, p + g * v.count, v.count, v, acc + g * v.dim);
  });
}

}  // namespace

ListedRowKernels avx512_dot8_listed_rows(DType dtype) {
  if (dtype == DType::int8) return {&score_listed<DotInt8>, &accumulate_listed<DotInt8>};
  return {&score_listed<DotFp8>, &accumulate_listed<DotFp8>};
}

}  // namespace kvcache::cpu

#else  // not x86-64: no dot-product loops.

namespace kvcache::cpu {

ListedRowKernels avx512_dot8_listed_rows(DType) { return {}; }

}  // namespace kvcache::cpu

#endif
