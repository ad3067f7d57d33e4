// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// The AVX-512 inner loops of CPU attention (attention_kernels.h). Each function carries its own
// target attribute, so the file builds for any x86-64 CPU; callers reach it only after
// cpu_supports(CpuIsa::avx512). Rows convert to float in registers, 16 elements at a time, and q,
// p and acc stay float32, so results differ from the portable loops by float rounding only.
// score: a tile of 16 (row, head) partial dot products is reduced by one transpose-add tree.
// accumulate: a [heads, dims] tile of acc stays in registers over the whole run.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "kvcache/op_plan.h"

#include "backend/cpu/attention_kernels.h"

#if defined(__x86_64__)
#include "backend/cpu/attention_avx512_rows.h"

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

constexpr __mmask16 kFullMask = 0xFFFF;

// Converters: 16 stored elements to 16 floats, unmasked (load) or zero-filled past `m` (load_tail).
struct LoadF32 {
  using T = float;
  static constexpr float kFactor = 1.0f;
  static KV_AVX512_INLINE __m512 load(const T* p) { return _mm512_loadu_ps(p); }
  static KV_AVX512_INLINE __m512 load_tail(const T* p, __mmask16 m) {
    return _mm512_maskz_loadu_ps(m, p);
  }
};
struct LoadF16 {
  using T = f16_t;
  static constexpr float kFactor = 1.0f;
  static KV_AVX512_INLINE __m512 load(const T* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static KV_AVX512_INLINE __m512 load_tail(const T* p, __mmask16 m) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  }
};
// bf16 is the high half of a float: one word permute puts element i in the high half of lane i and
// zeroes the low halves (one shuffle, where zero-extend + shift costs two).
struct LoadBF16 {
  using T = bf16_t;
  static constexpr float kFactor = 1.0f;
  static KV_AVX512_INLINE __m512 widen(__m256i x) {
    const __m512i idx =
        _mm512_setr_epi32(0, 0x10001, 0x20002, 0x30003, 0x40004, 0x50005, 0x60006, 0x70007, 0x80008,
                          0x90009, 0xA000A, 0xB000B, 0xC000C, 0xD000D, 0xE000E, 0xF000F);
    return _mm512_castsi512_ps(
        _mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, idx, _mm512_castsi256_si512(x)));
  }
  static KV_AVX512_INLINE __m512 load(const T* p) {
    return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static KV_AVX512_INLINE __m512 load_tail(const T* p, __mmask16 m) {
    return widen(_mm256_maskz_loadu_epi16(m, p));
  }
};
struct LoadInt8 {
  using T = int8_t;
  static constexpr float kFactor = 1.0f;
  static KV_AVX512_INLINE __m512 load(const T* p) {
    return _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static KV_AVX512_INLINE __m512 load_tail(const T* p, __mmask16 m) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
  }
};
// e4m3's exponent and mantissa bits, moved to bit 7 of an f16 (sign to bit 15), are an f16 of
// 2^-8 times the value; kFactor restores it (folded into the row scale). Subnormals map exactly.
struct LoadFp8 {
  using T = fp8_e4m3_t;
  static constexpr float kFactor = 256.0f;
  static KV_AVX512_INLINE __m512 widen(__m128i x) {
    const __m256i w = _mm256_slli_epi16(_mm256_cvtepi8_epi16(x), 7);  // sign lands at 15 and 14
    return _mm512_cvtph_ps(_mm256_and_si256(w, _mm256_set1_epi16(static_cast<int16_t>(0xBF80))));
  }
  static KV_AVX512_INLINE __m512 load(const T* p) {
    return widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static KV_AVX512_INLINE __m512 load_tail(const T* p, __mmask16 m) {
    return widen(_mm_maskz_loadu_epi8(m, p));
  }
};

// Scores of heads [0, G) (q, s already offset to the pass's first head) over all k rows. Rows go
// in blocks of R = 16 / G, so one block fills one reduce16; leftover rows reduce one at a time.
template <class L, int G, bool kIntoL2>
KV_AVX512 void score_pass(const float* q, const KVRows& k, float* s) {
  constexpr int R = 16 / G;
  using T = typename L::T;
  const T* base = static_cast<const T*>(k.data);
  const int64_t n = k.count;
  const int64_t dim = k.dim;
  const int64_t full = dim / 16;
  const auto tail = static_cast<__mmask16>((1u << (dim % 16)) - 1u);
  const bool scaled = k.scales != nullptr || L::kFactor != 1.0f;
  const KVRows pf = k;  // a local copy: the stores to s cannot alias it
  int64_t t = 0;
  for (; t + R <= n; t += R) {
    const T* rows[R];
    for (int r = 0; r < R; ++r) rows[r] = base + (t + r) * k.stride;
    for (int r = 0; r < R; ++r) prefetch_row<T, kIntoL2>(pf, t + kPrefetchRows + r);
    __m512 acc[16];
    for (auto& a : acc) a = _mm512_setzero_ps();
    for (int64_t c = 0; c < full; ++c) {
      __m512 kv[R];
      for (int r = 0; r < R; ++r) kv[r] = L::load(rows[r] + 16 * c);
      for (int g = 0; g < G; ++g) {
        const __m512 qv = _mm512_loadu_ps(q + g * dim + 16 * c);
        for (int r = 0; r < R; ++r) {
          const int slot = slot_of_lane(g * R + r);
          acc[slot] = _mm512_fmadd_ps(qv, kv[r], acc[slot]);
        }
      }
    }
    if (tail != 0) {
      __m512 kv[R];
      for (int r = 0; r < R; ++r) kv[r] = L::load_tail(rows[r] + 16 * full, tail);
      for (int g = 0; g < G; ++g) {
        const __m512 qv = _mm512_maskz_loadu_ps(tail, q + g * dim + 16 * full);
        for (int r = 0; r < R; ++r) {
          const int slot = slot_of_lane(g * R + r);
          acc[slot] = _mm512_fmadd_ps(qv, kv[r], acc[slot]);
        }
      }
    }
    __m512 sum = reduce16(acc);  // lane g * R + r: head g, row t + r
    if (scaled) sum = _mm512_mul_ps(sum, replicate_scales<R>(k, t, L::kFactor));
    store_score_lanes<G, R>(sum, s, n, t);
  }
  for (; t < n; ++t) {
    const T* row = base + t * k.stride;
    __m512 acc[G];
    for (auto& a : acc) a = _mm512_setzero_ps();
    for (int64_t c = 0; c < full; ++c) {
      const __m512 kv = L::load(row + 16 * c);
      for (int g = 0; g < G; ++g) {
        acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * dim + 16 * c), kv, acc[g]);
      }
    }
    if (tail != 0) {
      const __m512 kv = L::load_tail(row + 16 * full, tail);
      for (int g = 0; g < G; ++g) {
        acc[g] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, q + g * dim + 16 * full), kv, acc[g]);
      }
    }
    const float sc = row_scale(k, t, L::kFactor);
    for (int g = 0; g < G; ++g) {
      const float dot = _mm512_reduce_add_ps(acc[g]);
      s[g * n + t] = scaled ? dot * sc : dot;
    }
  }
}

// acc[g][d0, d0 + 16 * T) += sum_t w[g * w_stride + t] * v[t][d0, ...) for g < G, t < n; the
// last 16-element chunk is masked by `last` when kMasked. The first tile of a row prefetches
// whole rows ahead (row t_base + t + kPrefetchRows of `ahead`, when given), so later tiles find
// them in cache.
template <class L, int G, int T, bool kMasked, bool kIntoL2>
KV_AVX512 void accumulate_tile(const float* w, int64_t w_stride, const typename L::T* rows,
                               int64_t stride, int64_t n, int64_t dim, int64_t d0, __mmask16 last,
                               const KVRows* ahead, int64_t t_base, float* acc) {
  __m512 a[G][T];
  for (int g = 0; g < G; ++g) {
    for (int j = 0; j < T; ++j) {
      float* p = acc + g * dim + d0 + 16 * j;
      a[g][j] = kMasked && j == T - 1 ? _mm512_maskz_loadu_ps(last, p) : _mm512_loadu_ps(p);
    }
  }
  const KVRows pf = ahead != nullptr ? *ahead : KVRows{};  // a local copy: fields stay in registers
  for (int64_t t = 0; t < n; ++t) {
    const typename L::T* row = rows + t * stride + d0;
    if (ahead != nullptr) prefetch_row<typename L::T, kIntoL2>(pf, t_base + t + kPrefetchRows);
    __m512 v[T];
    for (int j = 0; j < T; ++j) {
      v[j] = kMasked && j == T - 1 ? L::load_tail(row + 16 * j, last) : L::load(row + 16 * j);
    }
    for (int g = 0; g < G; ++g) {
      const __m512 wb = _mm512_set1_ps(w[g * w_stride + t]);
      for (int j = 0; j < T; ++j) a[g][j] = _mm512_fmadd_ps(wb, v[j], a[g][j]);
    }
  }
  for (int g = 0; g < G; ++g) {
    for (int j = 0; j < T; ++j) {
      float* p = acc + g * dim + d0 + 16 * j;
      if (kMasked && j == T - 1) {
        _mm512_mask_storeu_ps(p, last, a[g][j]);
      } else {
        _mm512_storeu_ps(p, a[g][j]);
      }
    }
  }
}

// Heads [0, G) of acc over rows [0, n): full chunks in tiles of up to 16 / G vectors (at most 8),
// then the masked tail chunk.
template <class L, int G, bool kIntoL2>
KV_AVX512 void accumulate_pass(const float* w, int64_t w_stride, const typename L::T* rows,
                               int64_t stride, int64_t n, int64_t dim, const KVRows* ahead,
                               int64_t t_base, float* acc) {
  constexpr int kMaxTile = 16 / G < 8 ? 16 / G : 8;
  int64_t chunks = dim / 16;
  int64_t d0 = 0;
  while (chunks > 0) {
    int tile = kMaxTile;
    while (tile > chunks) tile /= 2;
    if constexpr (kMaxTile >= 8) {
      if (tile == 8)
        accumulate_tile<L, G, 8, false, kIntoL2>(w, w_stride, rows, stride, n, dim, d0, kFullMask,
                                                 d0 == 0 ? ahead : nullptr, t_base, acc);
    }
    if constexpr (kMaxTile >= 4) {
      if (tile == 4)
        accumulate_tile<L, G, 4, false, kIntoL2>(w, w_stride, rows, stride, n, dim, d0, kFullMask,
                                                 d0 == 0 ? ahead : nullptr, t_base, acc);
    }
    if (tile == 2)
      accumulate_tile<L, G, 2, false, kIntoL2>(w, w_stride, rows, stride, n, dim, d0, kFullMask,
                                               d0 == 0 ? ahead : nullptr, t_base, acc);
    if (tile == 1)
      accumulate_tile<L, G, 1, false, kIntoL2>(w, w_stride, rows, stride, n, dim, d0, kFullMask,
                                               d0 == 0 ? ahead : nullptr, t_base, acc);
    chunks -= tile;
    d0 += 16 * tile;
  }
  if (dim % 16 != 0) {
    const auto last = static_cast<__mmask16>((1u << (dim % 16)) - 1u);
    accumulate_tile<L, G, 1, true, kIntoL2>(w, w_stride, rows, stride, n, dim, d0, last,
                                            d0 == 0 ? ahead : nullptr, t_base, acc);
  }
}

// Weights w[g][t] = p[g][t] * v_scale[t] for heads [0, G) and rows [0, n): p itself when rows
// carry no scale, else this segment's products in `buf` [G, kSegmentRows].
template <class L, int G, bool kIntoL2>
KV_AVX512 void accumulate_heads(const float* p, int64_t n_total, const KVRows& v, float* acc) {
  const bool scaled = v.scales != nullptr || L::kFactor != 1.0f;
  const auto* base = static_cast<const typename L::T*>(v.data);
  alignas(64) float buf[G * kSegmentRows];
  for (int64_t t0 = 0; t0 < v.count; t0 += kSegmentRows) {
    const int64_t n = v.count - t0 < kSegmentRows ? v.count - t0 : kSegmentRows;
    const float* w = p + t0;
    int64_t w_stride = n_total;
    if (scaled) {
      alignas(64) float sc[kSegmentRows];
      for (int64_t t = 0; t < n; ++t) sc[t] = row_scale(v, t0 + t, L::kFactor);
      for (int g = 0; g < G; ++g) {
        for (int64_t t = 0; t < n; ++t) buf[g * kSegmentRows + t] = p[g * n_total + t0 + t] * sc[t];
      }
      w = buf;
      w_stride = kSegmentRows;
    }
    accumulate_pass<L, G, kIntoL2>(w, w_stride, base + t0 * v.stride, v.stride, n, v.dim, &v, t0,
                                   acc);
  }
}

// Calls f(L{}) with the converter of dtype (f32, f16, bf16, int8 or fp8_e4m3, as KVRows admits).
template <class F>
void with_loader(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f16:
      return f(LoadF16{});
    case DType::bf16:
      return f(LoadBF16{});
    case DType::int8:
      return f(LoadInt8{});
    case DType::fp8_e4m3:
      return f(LoadFp8{});
    default:
      return f(LoadF32{});
  }
}

// Rows of 2- or 4-byte elements without gaps (HND pages, contiguous caches) are prefetched into
// L2, not L1: 16 bf16 rows ahead are 64 lines, and prefetched into L1 they waited on its miss
// buffers (perf, bf16 b8 x 4096: ~18% of the loops' samples on prefetcht0). Into L2, bf16 HND
// went 0.60 -> 0.78 of the read bound and contiguous 0.70 -> 0.86 (Zen 4, 2 threads, in-process
// A/B). 8-bit rows keep L1 (contiguous int8 and fp8 lost ~10% with L2). Rows with gaps keep
// prefetch_one's rule (into L2) in their own instantiation, the same machine code as before: one
// instantiation for both measured NHD bf16 4% slower (cause not found).
void score_any(const float* q, int64_t group, const KVRows& k, float* s) {
  with_loader(k.dtype, [&]<class L>(L) {
    for_each_pass<4>(group, [&]<int G>(std::integral_constant<int, G>, int64_t g) {
      if constexpr (sizeof(typename L::T) >= 2) {
        if (k.stride <= k.dim) return score_pass<L, G, true>(q + g * k.dim, k, s + g * k.count);
      }
      score_pass<L, G, false>(q + g * k.dim, k, s + g * k.count);
    });
  });
}

void accumulate_any(const float* p, int64_t group, const KVRows& v, float* acc) {
  with_loader(v.dtype, [&]<class L>(L) {
    for_each_pass<8>(group, [&]<int G>(std::integral_constant<int, G>, int64_t g) {
      if constexpr (sizeof(typename L::T) >= 2) {
        if (v.stride <= v.dim) {
          return accumulate_heads<L, G, true>(p + g * v.count, v.count, v, acc + g * v.dim);
        }
      }
      accumulate_heads<L, G, false>(p + g * v.count, v.count, v, acc + g * v.dim);
    });
  });
}

// --- self-test ---

// A fixed pseudo-random float in [-1, 1).
float next_value(uint32_t& state) {
  state = state * 1664525u + 1013904223u;
  return static_cast<float>(state >> 8) * (2.0f / 16777216.0f) - 1.0f;
}

// Whether got and want agree within float rounding of sums whose terms have magnitudes `mag`.
bool close(const std::vector<float>& got, const std::vector<float>& want,
           const std::vector<double>& mag, int64_t terms) {
  for (size_t i = 0; i < got.size(); ++i) {
    const double tol = static_cast<double>(terms + 4) * 0x1p-23 * mag[i];
    if (!(std::fabs(static_cast<double>(got[i]) - static_cast<double>(want[i])) <= tol)) {
      return false;
    }
  }
  return true;
}

// One dtype at dim 37 (a masked tail) and 128, group 7 (passes of 4, 2 and 1), 21 rows (a
// leftover after every block size), rows with gaps (stride > dim) or without, and scales.
bool self_test_dtype(DType dtype, int64_t dim, int64_t stride, AttentionRowKernels fast,
                     AttentionRowKernels ref) {
  constexpr int64_t kGroup = 7;
  constexpr int64_t kRows = 21;
  const bool quantized = dtype == DType::int8 || dtype == DType::fp8_e4m3;
  const float range = dtype == DType::int8 ? 120.0f : dtype == DType::fp8_e4m3 ? 300.0f : 2.0f;
  uint32_t state = static_cast<uint32_t>(dtype) * 977u + static_cast<uint32_t>(dim);
  std::vector<float> values(static_cast<size_t>(kRows * stride));
  for (float& x : values) x = next_value(state) * range;
  std::vector<std::byte> data(values.size() * size_of(dtype));
  from_float(values.data(), dtype, data.data(), values.size(), Saturation::finite);
  to_float(dtype, data.data(), values.data(), values.size());  // the stored values, exactly
  std::vector<float> scales(static_cast<size_t>(kRows * 2));
  for (float& x : scales) x = 0.5f + 0.25f * next_value(state);
  const KVRows rows{data.data(), dtype, stride, quantized ? scales.data() : nullptr, 2, kRows, dim};
  std::vector<float> q(static_cast<size_t>(kGroup * dim));
  std::vector<float> p(static_cast<size_t>(kGroup * kRows));
  std::vector<float> acc0(static_cast<size_t>(kGroup * dim));
  for (float& x : q) x = next_value(state);
  for (float& x : p) x = 0.5f * (next_value(state) + 1.0f);
  for (float& x : acc0) x = next_value(state);

  const auto stored = [&](int64_t t, int64_t d) {
    const double scale = quantized ? scales[static_cast<size_t>(t * 2)] : 1.0;
    return std::fabs(static_cast<double>(values[static_cast<size_t>(t * stride + d)]) * scale);
  };
  std::vector<double> s_mag(p.size(), 0.0);
  std::vector<double> acc_mag(acc0.size(), 0.0);
  for (int64_t g = 0; g < kGroup; ++g) {
    for (int64_t d = 0; d < dim; ++d) {
      const auto i = static_cast<size_t>(g * dim + d);
      acc_mag[i] = std::fabs(static_cast<double>(acc0[i]));
      for (int64_t t = 0; t < kRows; ++t) {
        const auto j = static_cast<size_t>(g * kRows + t);
        s_mag[j] += std::fabs(static_cast<double>(q[i])) * stored(t, d);
        acc_mag[i] += static_cast<double>(p[j]) * stored(t, d);
      }
    }
  }
  std::vector<float> s_fast(p.size());
  std::vector<float> s_ref(p.size());
  fast.score(q.data(), kGroup, rows, s_fast.data());
  ref.score(q.data(), kGroup, rows, s_ref.data());
  std::vector<float> acc_fast = acc0;
  std::vector<float> acc_ref = acc0;
  fast.accumulate(p.data(), kGroup, rows, acc_fast.data());
  ref.accumulate(p.data(), kGroup, rows, acc_ref.data());
  return close(s_fast, s_ref, s_mag, dim) && close(acc_fast, acc_ref, acc_mag, kRows);
}

bool run_self_test() {
  if (!cpu_supports(CpuIsa::avx512)) return false;
  const AttentionRowKernels fast = avx512_attention_rows();
  const AttentionRowKernels ref = portable_attention_rows();
  for (const DType dtype : {DType::f32, DType::f16, DType::bf16, DType::int8, DType::fp8_e4m3}) {
    for (const int64_t dim : {int64_t{37}, int64_t{128}}) {
      for (const int64_t stride : {dim + 3, dim}) {
        if (!self_test_dtype(dtype, dim, stride, fast, ref)) return false;
      }
    }
  }
  return true;
}

}  // namespace

AttentionRowKernels avx512_attention_rows() { return {&score_any, &accumulate_any, "avx512"}; }

bool avx512_attention_rows_self_test() {
  static const bool passed = run_self_test();
  return passed;
}

}  // namespace kvcache::cpu

#else  // not x86-64: no AVX-512 loops; the portable ones serve.

namespace kvcache::cpu {

AttentionRowKernels avx512_attention_rows() { return portable_attention_rows(); }

bool avx512_attention_rows_self_test() { return false; }

}  // namespace kvcache::cpu

#endif
