// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// What the dot-product loops on 8-bit rows share (attention_avx512_dot8.cpp: rows a stride apart;
// attention_avx512_dot8_listed.cpp: rows listed over the pages of a run): the target attribute,
// the steps and word orders of int8 rows (vpdpwssd) and fp8_e4m3 rows (vdpbf16ps). Every
// function carries its target attribute, so including files build for any x86-64 CPU.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kvcache/dtype.h"

#include "backend/cpu/attention_avx512_rows.h"

#define KV_DOT8                                                                     \
  __attribute__((                                                                   \
      target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,avx512vbmi," \
             "f16c,fma")))
#define KV_DOT8_INLINE KV_DOT8 inline __attribute__((always_inline))

namespace kvcache::cpu::dot8 {

constexpr int64_t kUnit = 64;                         // dims per step of the loops
constexpr int64_t kMaxDim = 512;                      // the largest dim dot8_applies takes
constexpr int64_t kPairs = avx512::kSegmentRows / 2;  // weight pairs per head and segment
constexpr float kInt16Steps = 32767.0f;

// --- int8: vpdpwssd ---

struct DotInt8 {
  using T = int8_t;
  using Acc = __m512i;
  using Add = avx512::AddI32;
  static KV_DOT8_INLINE Acc zero() { return _mm512_setzero_si512(); }
  static KV_DOT8_INLINE Acc dot(Acc acc, __m512i a, __m512i b) {
    return _mm512_dpwssd_epi32(acc, a, b);
  }
  static KV_DOT8_INLINE __m512 bits(Acc a) { return _mm512_castsi512_ps(a); }
  static KV_DOT8_INLINE __m512 to_float(__m512 bits) {
    return _mm512_cvtepi32_ps(_mm512_castps_si512(bits));
  }
  static KV_DOT8_INLINE float reduce(Acc a) {
    return static_cast<float>(_mm512_reduce_add_epi32(a));
  }
  // Dims [0, 64) of a row as words, in order: [0, 32) in w[0], [32, 64) in w[1].
  KV_DOT8_INLINE void row_words(const T* p, __m512i (&w)[2]) const {
    w[0] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    w[1] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32)));
  }
  // Dims [0, 64) of rows r0 and r1 as word pairs; 128-bit block b of w[2h] holds dims
  // 32h + {0-3, 4-7, 16-19, 20-23}[b], of w[2h + 1] dims 32h + {8-11, 12-15, 24-27, 28-31}[b].
  KV_DOT8_INLINE void pair_words(const T* r0, const T* r1, __m512i (&w)[4]) const {
    for (int h = 0; h < 2; ++h) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + 32 * h));
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1 + 32 * h));
      w[2 * h] = _mm512_cvtepi8_epi16(_mm256_unpacklo_epi8(a, b));
      w[2 * h + 1] = _mm512_cvtepi8_epi16(_mm256_unpackhi_epi8(a, b));
    }
  }
  // Sums in pair_words' lane order -> dims [16k, 16k + 16) in o[k].
  static KV_DOT8_INLINE void to_natural(const __m512 (&y)[4], __m512 (&o)[4]) {
    for (int h = 0; h < 2; ++h) {
      o[2 * h] = _mm512_shuffle_f32x4(y[2 * h], y[2 * h + 1], 0x44);
      o[2 * h + 1] = _mm512_shuffle_f32x4(y[2 * h], y[2 * h + 1], 0xEE);
    }
  }
  // The factor of a prepared q row's words.
  static float q_multiplier(const float* q, int64_t dim) {
    float m = 0.0f;
    std::memcpy(&m, reinterpret_cast<const std::byte*>(q) + 2 * dim, sizeof(float));
    return m;
  }
  // words[t / 2] = the int16 pair (w_t, w_t+1) for w = p * scale, t < n (zeros up to a multiple
  // of 16 rows); returns the factor of the words.
  static KV_DOT8_INLINE float weights(const float* p, const float* scale, int64_t n,
                                      uint32_t* words) {
    const int64_t vectors = (n + 15) / 16;
    __m512 w[avx512::kSegmentRows / 16];
    __m512 top = _mm512_setzero_ps();
    for (int i = 0; i < vectors; ++i) {
      const int64_t left = std::min<int64_t>(n - 16 * i, 16);
      const auto m = static_cast<__mmask16>((1u << left) - 1u);
      w[i] = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p + 16 * i), _mm512_load_ps(scale + 16 * i));
      top = _mm512_max_ps(top, _mm512_abs_ps(w[i]));
    }
    const float wmax = _mm512_reduce_max_ps(top);
    const __m512 steps = _mm512_set1_ps(wmax > 0.0f ? kInt16Steps / wmax : 0.0f);
    auto* out = reinterpret_cast<__m256i*>(words);
    for (int i = 0; i < vectors; ++i) {
      _mm256_store_si256(out + i,
                         _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(w[i], steps))));
    }
    return wmax / kInt16Steps;
  }
};

// --- fp8_e4m3: vdpbf16ps ---

// The bf16 of every e4m3 magnitude 0..127 (0x7F, a NaN: the bf16 quiet NaN), high and low bytes.
struct Fp8ByteTables {
  alignas(64) uint8_t hi[128];
  alignas(64) uint8_t lo[128];
};

// The tables (built once; defined in attention_avx512_dot8.cpp).
const Fp8ByteTables& fp8_byte_tables();

struct DotFp8 {
  using T = fp8_e4m3_t;
  using Acc = __m512;
  using Add = avx512::AddF32;
  __m512i hi0, hi1, lo0, lo1, sign;

  static KV_DOT8_INLINE DotFp8 make() {
    const Fp8ByteTables& t = fp8_byte_tables();
    return {_mm512_load_si512(t.hi), _mm512_load_si512(t.hi + 64), _mm512_load_si512(t.lo),
            _mm512_load_si512(t.lo + 64), _mm512_set1_epi8(static_cast<char>(0x80))};
  }
  static KV_DOT8_INLINE Acc zero() { return _mm512_setzero_ps(); }
  static KV_DOT8_INLINE Acc dot(Acc acc, __m512i a, __m512i b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
  }
  static KV_DOT8_INLINE __m512 bits(Acc a) { return a; }
  static KV_DOT8_INLINE __m512 to_float(__m512 bits) { return bits; }
  static KV_DOT8_INLINE float reduce(Acc a) { return _mm512_reduce_add_ps(a); }
  // 64 e4m3 bytes -> bf16 words: 128-bit block L of a holds bytes 16L + [0, 8), of b 16L + [8, 16).
  KV_DOT8_INLINE void words(__m512i x, __m512i& a, __m512i& b) const {
    __m512i hi = _mm512_permutex2var_epi8(hi0, x, hi1);  // index: the low 7 bits
    hi = _mm512_ternarylogic_epi32(hi, x, sign, 0xF8);   // hi | (x & 0x80)
    const __m512i lo = _mm512_permutex2var_epi8(lo0, x, lo1);
    a = _mm512_unpacklo_epi8(lo, hi);
    b = _mm512_unpackhi_epi8(lo, hi);
  }
  KV_DOT8_INLINE void row_words(const T* p, __m512i (&w)[2]) const {
    words(_mm512_loadu_si512(p), w[0], w[1]);
  }
  // Dims [0, 64) of rows r0 and r1 as bf16 pairs: 128-bit block L of w[k] holds dims
  // 16L + 4k + [0, 4).
  KV_DOT8_INLINE void pair_words(const T* r0, const T* r1, __m512i (&w)[4]) const {
    const __m512i a = _mm512_loadu_si512(r0);
    const __m512i b = _mm512_loadu_si512(r1);
    words(_mm512_unpacklo_epi8(a, b), w[0], w[1]);
    words(_mm512_unpackhi_epi8(a, b), w[2], w[3]);
  }
  // A 4 x 4 transpose of 128-bit blocks: dims [16k, 16k + 16) in o[k].
  static KV_DOT8_INLINE void to_natural(const __m512 (&y)[4], __m512 (&o)[4]) {
    const __m512 t0 = _mm512_shuffle_f32x4(y[0], y[1], 0x44);
    const __m512 t1 = _mm512_shuffle_f32x4(y[2], y[3], 0x44);
    const __m512 t2 = _mm512_shuffle_f32x4(y[0], y[1], 0xEE);
    const __m512 t3 = _mm512_shuffle_f32x4(y[2], y[3], 0xEE);
    o[0] = _mm512_shuffle_f32x4(t0, t1, 0x88);
    o[1] = _mm512_shuffle_f32x4(t0, t1, 0xDD);
    o[2] = _mm512_shuffle_f32x4(t2, t3, 0x88);
    o[3] = _mm512_shuffle_f32x4(t2, t3, 0xDD);
  }
  static float q_multiplier(const float*, int64_t) { return 1.0f; }
  // words[t / 2] = the bf16 pair (w_t, w_t+1) for w = p * scale, t < n (zeros up to a multiple
  // of 32 rows); the words need no factor.
  static KV_DOT8_INLINE float weights(const float* p, const float* scale, int64_t n,
                                      uint32_t* words) {
    for (int i = 0; i < (n + 31) / 32; ++i) {
      __m512 w[2];
      for (int j = 0; j < 2; ++j) {
        const int64_t left = std::clamp<int64_t>(n - 32 * i - 16 * j, 0, 16);
        const auto m = static_cast<__mmask16>((1u << left) - 1u);
        w[j] = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p + 32 * i + 16 * j),
                             _mm512_load_ps(scale + 32 * i + 16 * j));
      }
      _mm512_store_si512(words + 16 * i, (__m512i)_mm512_cvtne2ps_pbh(w[1], w[0]));
    }
    return 1.0f;
  }
};

}  // namespace kvcache::cpu::dot8
