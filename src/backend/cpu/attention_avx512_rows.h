// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// What the AVX-512 attention row loops share (attention_avx512.cpp: float multiply-adds;
// attention_avx512_dot8.cpp: dot-product instructions on 8-bit rows): prefetching rows ahead,
// row scales, the 16-vector reduction tree of the score loops and the store of its lanes. Every
// function carries its target attribute, so including files build for any x86-64 CPU.

#include <cstdint>
#include <type_traits>
#include <utility>

#include "backend/cpu/attention_kernels.h"
#include "backend/cpu/x86_intrinsics.h"

#define KV_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,f16c,fma")))
#define KV_AVX512_INLINE KV_AVX512 inline __attribute__((always_inline))

namespace kvcache::cpu::avx512 {

// Rows ahead of the one being read, within the run only: rows past `count` may be another page.
constexpr int64_t kPrefetchRows = 16;
constexpr int64_t kSegmentRows = 64;  // accumulate scales p in segments of this many rows

// kLocality: 3 into L1 (prefetcht0), 2 into L2 (prefetcht1).
template <int kLocality, class T>
KV_AVX512_INLINE void prefetch_span(const T* p, int64_t elements) {
  const char* c = reinterpret_cast<const char*>(p);
  const int64_t bytes = elements * static_cast<int64_t>(sizeof(T));
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, kLocality);
  __builtin_prefetch(c + bytes - 1, 0, kLocality);
}

// One row: into L1, or into L2 when rows lie apart. An NHD page's rows of one kv head are
// num_kv_heads * head_dim elements apart: at 1 KB (int8) or 2 KB (bf16) they fall into 8 of L1's
// 64 sets, and the rows prefetched 16 ahead evicted the ones in use (Zen 4, 2 threads from DRAM:
// NHD int8 0.32 -> 0.45 of the read bound, bf16 0.55 -> 0.67; rows without gaps kept in L1, but
// see score_any in attention_avx512.cpp: its 2- and 4-byte rows go to L2 through prefetch_into).
template <class T>
KV_AVX512_INLINE void prefetch_one(const KVRows& rows, const T* row) {
  if (rows.stride > rows.dim) {
    prefetch_span<2>(row, rows.dim);
  } else {
    prefetch_span<3>(row, rows.dim);
  }
}

// One row into L2 whatever the stride (kIntoL2), else as prefetch_one.
template <bool kIntoL2, class T>
KV_AVX512_INLINE void prefetch_into(const KVRows& rows, const T* row) {
  if constexpr (kIntoL2) {
    prefetch_span<2>(row, rows.dim);
  } else {
    prefetch_one(rows, row);
  }
}

// Prefetches row r of `rows`; r past count reads into rows.next (if it has r), with its scale
// (a page's scales are few lines, so they are fetched only as the walk enters it).
template <class T, bool kIntoL2 = false>
KV_AVX512_INLINE void prefetch_row(const KVRows& rows, int64_t r) {
  if (r < rows.count) {
    prefetch_into<kIntoL2>(rows, static_cast<const T*>(rows.data) + r * rows.stride);
    return;
  }
  r -= rows.count;
  if (r >= rows.next_count) return;
  prefetch_into<kIntoL2>(rows, static_cast<const T*>(rows.next) + r * rows.stride);
  if (rows.next_scales != nullptr) {
    _mm_prefetch(reinterpret_cast<const char*>(rows.next_scales + r * rows.scale_stride),
                 _MM_HINT_T0);
  }
}

inline float row_scale(const KVRows& rows, int64_t t, float factor) {
  return rows.scales == nullptr ? factor : rows.scales[t * rows.scale_stride] * factor;
}

// Lane-wise sums for reduce16: of floats, or of int32 held in __m512 bits.
struct AddF32 {
  static KV_AVX512_INLINE __m512 add(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
};
struct AddI32 {
  static KV_AVX512_INLINE __m512 add(__m512 a, __m512 b) {
    return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(a), _mm512_castps_si512(b)));
  }
};

// Sums each of 16 vectors; lane 4a + b of the result holds the sum of v[a + 4b].
template <class A = AddF32>
KV_AVX512_INLINE __m512 reduce16(const __m512 (&v)[16]) {
  __m512 w[8];
  for (int j = 0; j < 8; ++j) {  // halves: lanes 0-7 sum v[2j], 8-15 sum v[2j+1]
    w[j] = A::add(_mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0x44),
                  _mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0xEE));
  }
  __m512 x[4];
  for (int k = 0; k < 4; ++k) {  // 128-bit lane b sums v[4k + b]
    x[k] = A::add(_mm512_shuffle_f32x4(w[2 * k], w[2 * k + 1], 0x88),
                  _mm512_shuffle_f32x4(w[2 * k], w[2 * k + 1], 0xDD));
  }
  __m512 y[2];
  for (int j = 0; j < 2; ++j) {
    y[j] = A::add(_mm512_shuffle_ps(x[2 * j], x[2 * j + 1], 0x44),
                  _mm512_shuffle_ps(x[2 * j], x[2 * j + 1], 0xEE));
  }
  return A::add(_mm512_shuffle_ps(y[0], y[1], 0x88), _mm512_shuffle_ps(y[0], y[1], 0xDD));
}

// The scales of rows [t, t + R) times factor, in lanes g * R + r for every g.
template <int R>
KV_AVX512_INLINE __m512 replicate_scales(const KVRows& rows, int64_t t, float factor) {
  alignas(64) float sc[16] = {};
  for (int r = 0; r < R; ++r) sc[r] = row_scale(rows, t + r, factor);
  if constexpr (R == 16) {
    return _mm512_load_ps(sc);
  } else if constexpr (R == 8) {
    return _mm512_broadcast_f32x8(_mm256_load_ps(sc));
  } else {
    static_assert(R == 4, "score passes hold 1, 2 or 4 heads");
    return _mm512_broadcast_f32x4(_mm_load_ps(sc));
  }
}

// The reduce16 input slot whose sum lands in lane m.
constexpr int slot_of_lane(int m) { return m / 4 + 4 * (m % 4); }

// Spreads a score sum whose lane g * R + r holds head g, row t + r into s[g * n + t + r].
template <int G, int R>
KV_AVX512_INLINE void store_score_lanes(__m512 sum, float* s, int64_t n, int64_t t) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int g = 0; g < G; ++g) {
    const __m512 lanes =
        g == 0 ? sum : _mm512_permutexvar_ps(_mm512_add_epi32(iota, _mm512_set1_epi32(g * R)), sum);
    _mm512_mask_storeu_ps(s + g * n + t, static_cast<__mmask16>((1u << R) - 1u), lanes);
  }
}

}  // namespace kvcache::cpu::avx512
