// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// The AVX2 + FMA + F16C inner loops of CPU attention (attention_kernels.h), for CPUs without
// AVX-512. Each function carries its own target attribute, so the file builds for any x86-64 CPU;
// callers reach it only after cpu_supports(CpuIsa::avx2). Rows convert to float in registers, 8
// elements at a time, and q, p and acc stay float32, so results differ from the portable loops by
// float rounding only. Tails (dim % 8) go through a zero-filled copy of the row's last elements.
// score: a tile of 8 (head, row) partial dot products is reduced by one hadd tree.
// accumulate: a [heads, dims] tile of acc stays in registers over the whole run.

#include "backend/cpu/attention_avx2.h"

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "kvcache/op_plan.h"

#if defined(__x86_64__)
#include "backend/cpu/x86_intrinsics.h"

#define KV_AVX2 __attribute__((target("avx2,fma,f16c")))
#define KV_AVX2_INLINE KV_AVX2 inline __attribute__((always_inline))

namespace kvcache::cpu {
namespace {

// Rows ahead of the one being read, within the run only: rows past `count` may be another page.
constexpr int64_t kPrefetchRows = 16;
constexpr int64_t kSegmentRows = 64;  // accumulate scales p in segments of this many rows

// Converters: 8 stored elements to 8 floats; load_tail reads m < 8 and zero-fills the rest.
template <class Derived, class T>
struct TailLoad {
  static KV_AVX2_INLINE __m256 load_tail(const T* p, int64_t m) {
    alignas(32) std::byte buf[8 * sizeof(T)] = {};
    std::memcpy(buf, p, static_cast<size_t>(m) * sizeof(T));
    return Derived::load(reinterpret_cast<const T*>(buf));
  }
};
struct LoadF32 : TailLoad<LoadF32, float> {
  using T = float;
  static constexpr float kFactor = 1.0f;
  static KV_AVX2_INLINE __m256 load(const T* p) { return _mm256_loadu_ps(p); }
};
struct LoadF16 : TailLoad<LoadF16, f16_t> {
  using T = f16_t;
  static constexpr float kFactor = 1.0f;
  static KV_AVX2_INLINE __m256 load(const T* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
};
// bf16 is the high half of a float.
struct LoadBF16 : TailLoad<LoadBF16, bf16_t> {
  using T = bf16_t;
  static constexpr float kFactor = 1.0f;
  static KV_AVX2_INLINE __m256 load(const T* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
};
struct LoadInt8 : TailLoad<LoadInt8, int8_t> {
  using T = int8_t;
  static constexpr float kFactor = 1.0f;
  static KV_AVX2_INLINE __m256 load(const T* p) {
    return _mm256_cvtepi32_ps(
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
};
// e4m3's exponent and mantissa bits, moved to bit 7 of an f16 (sign to bit 15), are an f16 of
// 2^-8 times the value; kFactor restores it (folded into the row scale). Subnormals map exactly.
struct LoadFp8 : TailLoad<LoadFp8, fp8_e4m3_t> {
  using T = fp8_e4m3_t;
  static constexpr float kFactor = 256.0f;
  static KV_AVX2_INLINE __m256 load(const T* p) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    const __m128i w = _mm_slli_epi16(_mm_cvtepi8_epi16(b), 7);  // sign lands at 15 and 14
    return _mm256_cvtph_ps(_mm_and_si128(w, _mm_set1_epi16(static_cast<int16_t>(0xBF80))));
  }
};

template <class T>
inline void prefetch_span(const T* p, int64_t elements) {
  const char* c = reinterpret_cast<const char*>(p);
  const int64_t bytes = elements * static_cast<int64_t>(sizeof(T));
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(c + off, _MM_HINT_T0);
  _mm_prefetch(c + bytes - 1, _MM_HINT_T0);
}

inline float row_scale(const KVRows& rows, int64_t t, float factor) {
  return rows.scales == nullptr ? factor : rows.scales[t * rows.scale_stride] * factor;
}

// Lanes [0, m) set: the mask of maskload / maskstore for the first m floats.
KV_AVX2_INLINE __m256i lane_mask(int64_t m) {
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(m)), iota);
}

// Sums each of 8 vectors; lane i of the result holds the sum of v[i].
KV_AVX2_INLINE __m256 reduce8(const __m256 (&v)[8]) {
  const __m256 t0 = _mm256_hadd_ps(v[0], v[1]);
  const __m256 t1 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 t2 = _mm256_hadd_ps(v[4], v[5]);
  const __m256 t3 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1);  // 128-bit half h: v[0..3] over half h of each
  const __m256 u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

KV_AVX2_INLINE float reduce1(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// Scores of heads [0, G) (q, s already offset to the pass's first head) over all k rows. Rows go
// in blocks of R = 8 / G, so one block fills one reduce8; leftover rows reduce one at a time.
template <class L, int G>
KV_AVX2 void score_pass(const float* q, const KVRows& k, float* s) {
  constexpr int R = 8 / G;
  using T = typename L::T;
  const T* base = static_cast<const T*>(k.data);
  const int64_t n = k.count;
  const int64_t dim = k.dim;
  const int64_t full = dim / 8;
  const int64_t tail = dim % 8;
  const __m256i tail_mask = lane_mask(tail);
  const bool scaled = k.scales != nullptr || L::kFactor != 1.0f;
  int64_t t = 0;
  for (; t + R <= n; t += R) {
    const T* rows[R];
    for (int r = 0; r < R; ++r) rows[r] = base + (t + r) * k.stride;
    for (int64_t r = t + kPrefetchRows; r < t + kPrefetchRows + R && r < n; ++r) {
      prefetch_span(base + r * k.stride, dim);
    }
    __m256 acc[8];
    for (auto& a : acc) a = _mm256_setzero_ps();
    for (int64_t c = 0; c < full; ++c) {
      __m256 kv[R];
      for (int r = 0; r < R; ++r) kv[r] = L::load(rows[r] + 8 * c);
      for (int g = 0; g < G; ++g) {
        const __m256 qv = _mm256_loadu_ps(q + g * dim + 8 * c);
        for (int r = 0; r < R; ++r) acc[g * R + r] = _mm256_fmadd_ps(qv, kv[r], acc[g * R + r]);
      }
    }
    if (tail != 0) {
      __m256 kv[R];
      for (int r = 0; r < R; ++r) kv[r] = L::load_tail(rows[r] + 8 * full, tail);
      for (int g = 0; g < G; ++g) {
        const __m256 qv = _mm256_maskload_ps(q + g * dim + 8 * full, tail_mask);
        for (int r = 0; r < R; ++r) acc[g * R + r] = _mm256_fmadd_ps(qv, kv[r], acc[g * R + r]);
      }
    }
    alignas(32) float sum[8];
    _mm256_store_ps(sum, reduce8(acc));  // lane g * R + r: head g, row t + r
    for (int r = 0; r < R; ++r) {
      const float sc = scaled ? row_scale(k, t + r, L::kFactor) : 1.0f;
      for (int g = 0; g < G; ++g) s[g * n + t + r] = scaled ? sum[g * R + r] * sc : sum[g * R + r];
    }
  }
  for (; t < n; ++t) {
    const T* row = base + t * k.stride;
    __m256 acc[G];
    for (auto& a : acc) a = _mm256_setzero_ps();
    for (int64_t c = 0; c < full; ++c) {
      const __m256 kv = L::load(row + 8 * c);
      for (int g = 0; g < G; ++g) {
        acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * dim + 8 * c), kv, acc[g]);
      }
    }
    if (tail != 0) {
      const __m256 kv = L::load_tail(row + 8 * full, tail);
      for (int g = 0; g < G; ++g) {
        acc[g] = _mm256_fmadd_ps(_mm256_maskload_ps(q + g * dim + 8 * full, tail_mask), kv, acc[g]);
      }
    }
    const float sc = row_scale(k, t, L::kFactor);
    for (int g = 0; g < G; ++g) {
      const float dot = reduce1(acc[g]);
      s[g * n + t] = scaled ? dot * sc : dot;
    }
  }
}

// acc[g][d0, d0 + 8 * T) += sum_t w[g * w_stride + t] * v[t][d0, ...) for g < G, t < n; the last
// vector holds only `last` elements when kMasked. The first tile of a row prefetches the whole
// row ahead (`prefetch` elements), so later tiles find it in cache.
template <class L, int G, int T, bool kMasked>
KV_AVX2 void accumulate_tile(const float* w, int64_t w_stride, const typename L::T* rows,
                             int64_t stride, int64_t n, int64_t dim, int64_t d0, int64_t last,
                             int64_t prefetch, float* acc) {
  const __m256i mask = lane_mask(last);
  __m256 a[G][T];
  for (int g = 0; g < G; ++g) {
    for (int j = 0; j < T; ++j) {
      float* p = acc + g * dim + d0 + 8 * j;
      a[g][j] = kMasked && j == T - 1 ? _mm256_maskload_ps(p, mask) : _mm256_loadu_ps(p);
    }
  }
  for (int64_t t = 0; t < n; ++t) {
    const typename L::T* row = rows + t * stride + d0;
    if (prefetch > 0 && t + kPrefetchRows < n) {
      prefetch_span(rows + (t + kPrefetchRows) * stride, prefetch);
    }
    __m256 v[T];
    for (int j = 0; j < T; ++j) {
      v[j] = kMasked && j == T - 1 ? L::load_tail(row + 8 * j, last) : L::load(row + 8 * j);
    }
    for (int g = 0; g < G; ++g) {
      const __m256 wb = _mm256_broadcast_ss(w + g * w_stride + t);
      for (int j = 0; j < T; ++j) a[g][j] = _mm256_fmadd_ps(wb, v[j], a[g][j]);
    }
  }
  for (int g = 0; g < G; ++g) {
    for (int j = 0; j < T; ++j) {
      float* p = acc + g * dim + d0 + 8 * j;
      if (kMasked && j == T - 1) {
        _mm256_maskstore_ps(p, mask, a[g][j]);
      } else {
        _mm256_storeu_ps(p, a[g][j]);
      }
    }
  }
}

// Heads [0, G) of acc over rows [0, n): full vectors in tiles of up to 8 / G (at least 1), then
// the masked tail vector.
template <class L, int G>
KV_AVX2 void accumulate_pass(const float* w, int64_t w_stride, const typename L::T* rows,
                             int64_t stride, int64_t n, int64_t dim, float* acc) {
  constexpr int kMaxTile = 8 / G > 0 ? 8 / G : 1;
  int64_t chunks = dim / 8;
  int64_t d0 = 0;
  while (chunks > 0) {
    int tile = kMaxTile;
    while (tile > chunks) tile /= 2;
    const int64_t pf = d0 == 0 ? dim : 0;
    if constexpr (kMaxTile >= 8) {
      if (tile == 8)
        accumulate_tile<L, G, 8, false>(w, w_stride, rows, stride, n, dim, d0, 8, pf, acc);
    }
    if constexpr (kMaxTile >= 4) {
      if (tile == 4)
        accumulate_tile<L, G, 4, false>(w, w_stride, rows, stride, n, dim, d0, 8, pf, acc);
    }
    if constexpr (kMaxTile >= 2) {
      if (tile == 2)
        accumulate_tile<L, G, 2, false>(w, w_stride, rows, stride, n, dim, d0, 8, pf, acc);
    }
    if (tile == 1)
      accumulate_tile<L, G, 1, false>(w, w_stride, rows, stride, n, dim, d0, 8, pf, acc);
    chunks -= tile;
    d0 += 8 * tile;
  }
  if (dim % 8 != 0) {
    accumulate_tile<L, G, 1, true>(w, w_stride, rows, stride, n, dim, d0, dim % 8,
                                   d0 == 0 ? dim : 0, acc);
  }
}

// Weights w[g][t] = p[g][t] * v_scale[t] for heads [0, G) and rows [0, n): p itself when rows
// carry no scale, else this segment's products in `buf` [G, kSegmentRows].
template <class L, int G>
KV_AVX2 void accumulate_heads(const float* p, int64_t n_total, const KVRows& v, float* acc) {
  const bool scaled = v.scales != nullptr || L::kFactor != 1.0f;
  const auto* base = static_cast<const typename L::T*>(v.data);
  alignas(32) float buf[G * kSegmentRows];
  for (int64_t t0 = 0; t0 < v.count; t0 += kSegmentRows) {
    const int64_t n = v.count - t0 < kSegmentRows ? v.count - t0 : kSegmentRows;
    const float* w = p + t0;
    int64_t w_stride = n_total;
    if (scaled) {
      alignas(32) float sc[kSegmentRows];
      for (int64_t t = 0; t < n; ++t) sc[t] = row_scale(v, t0 + t, L::kFactor);
      for (int g = 0; g < G; ++g) {
        for (int64_t t = 0; t < n; ++t) buf[g * kSegmentRows + t] = p[g * n_total + t0 + t] * sc[t];
      }
      w = buf;
      w_stride = kSegmentRows;
    }
    accumulate_pass<L, G>(w, w_stride, base + t0 * v.stride, v.stride, n, v.dim, acc);
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

void score_any(const float* q, int64_t group, const KVRows& k, float* s) {
  with_loader(k.dtype, [&]<class L>(L) {
    for_each_pass<4>(group, [&]<int G>(std::integral_constant<int, G>, int64_t g) {
      score_pass<L, G>(q + g * k.dim, k, s + g * k.count);
    });
  });
}

void accumulate_any(const float* p, int64_t group, const KVRows& v, float* acc) {
  with_loader(v.dtype, [&]<class L>(L) {
    for_each_pass<8>(group, [&]<int G>(std::integral_constant<int, G>, int64_t g) {
      accumulate_heads<L, G>(p + g * v.count, v.count, v, acc + g * v.dim);
    });
  });
}

}  // namespace

// score_bf16 stays null: without AVX-512 BF16 dot products, q converts to float32 once.
AttentionRowKernels avx2_attention_rows() {
  AttentionRowKernels k;
  k.score = &score_any;
  k.accumulate = &accumulate_any;
  k.isa = "avx2";
  return k;
}

}  // namespace kvcache::cpu

#else  // not x86-64: no AVX2 loops; the portable ones serve.

namespace kvcache::cpu {

AttentionRowKernels avx2_attention_rows() { return portable_attention_rows(); }

}  // namespace kvcache::cpu

#endif

// --- self-test (interface only, so it builds everywhere; it fails where AVX2 is missing) ---

namespace kvcache::cpu {
namespace {

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

// One dtype at dim 37 (a tail) and 128, group 7 (passes of 4, 2 and 1), 21 rows (a leftover
// after every block size), strided rows and scales.
bool self_test_dtype(DType dtype, int64_t dim, AttentionRowKernels fast, AttentionRowKernels ref) {
  constexpr int64_t kGroup = 7;
  constexpr int64_t kRows = 21;
  const int64_t stride = dim + 3;
  const bool quantized = dtype == DType::int8 || dtype == DType::fp8_e4m3;
  const float range = dtype == DType::int8 ? 120.0f : dtype == DType::fp8_e4m3 ? 300.0f : 2.0f;
  uint32_t state = static_cast<uint32_t>(dtype) * 613u + static_cast<uint32_t>(dim);
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

  std::vector<double> s_mag(p.size(), 0.0);
  std::vector<double> acc_mag(acc0.size(), 0.0);
  for (int64_t g = 0; g < kGroup; ++g) {
    for (int64_t d = 0; d < dim; ++d) {
      const auto i = static_cast<size_t>(g * dim + d);
      acc_mag[i] = std::fabs(static_cast<double>(acc0[i]));
      for (int64_t t = 0; t < kRows; ++t) {
        const auto j = static_cast<size_t>(g * kRows + t);
        const double scale = quantized ? scales[static_cast<size_t>(t * 2)] : 1.0;
        const double stored =
            std::fabs(static_cast<double>(values[static_cast<size_t>(t * stride + d)]) * scale);
        s_mag[j] += std::fabs(static_cast<double>(q[i])) * stored;
        acc_mag[i] += static_cast<double>(p[j]) * stored;
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
  if (!cpu_supports(CpuIsa::avx2)) return false;
  const AttentionRowKernels fast = avx2_attention_rows();
  const AttentionRowKernels ref = portable_attention_rows();
  for (const DType dtype : {DType::f32, DType::f16, DType::bf16, DType::int8, DType::fp8_e4m3}) {
    for (const int64_t dim : {int64_t{37}, int64_t{128}}) {
      if (!self_test_dtype(dtype, dim, fast, ref)) return false;
    }
  }
  return true;
}

}  // namespace

bool avx2_attention_rows_self_test() {
  static const bool passed = run_self_test();
  return passed;
}

}  // namespace kvcache::cpu
