// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// Internal, header-only: ops/quantize.h's rule (scale = absmax / qmax, stored = convert(x * (qmax /
// absmax))) in AVX-512, bit for bit, for rows of f32 / f16 / bf16 into int8 / fp8_e4m3, and the
// bf16 / f16 conversions the write kernels share. Every function carries its own target attribute
// (no global -m flags); callers use them only after cpu_supports(CpuIsa::avx512) and their own
// known-answer self-test against the portable path. Stateless, so thread-safe.
//
// Two paths per row. A "clean" row (no NaN or infinity, and qmax / absmax finite) has every
// product finite and within the storage range, so 64 elements at a time convert with no NaN or
// saturation handling and pack with vpack*; any other row, and the tail of a row past its last
// whole 64, takes the careful per-16 path that reproduces dtype.h's conversions for every input.

#if defined(__x86_64__)

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kvcache/dtype.h"

#include "backend/cpu/x86_intrinsics.h"
#include "ops/quantize.h"

#ifndef KV_AVX512
#define KV_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#endif

namespace kvcache::cpu::q512 {

template <class Dst>
inline constexpr bool kQuantized = std::is_same_v<Dst, int8_t> || std::is_same_v<Dst, fp8_e4m3_t>;
template <class Dst>
inline constexpr float kQMax = std::is_same_v<Dst, int8_t> ? 127.0f : 448.0f;

KV_AVX512 inline __m512i splat(uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); }

KV_AVX512 inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xffff)
                    : static_cast<__mmask16>((1u << static_cast<unsigned>(left)) - 1u);
}
KV_AVX512 inline __mmask32 tail_mask32(int64_t left) {
  return left >= 32 ? ~__mmask32{0}
                    : static_cast<__mmask32>((1u << static_cast<unsigned>(left)) - 1u);
}

// Lanes holding a NaN (float bits with the sign cleared above the infinity pattern).
KV_AVX512 inline __mmask16 nan_lanes(__m512i bits) {
  return _mm512_cmpgt_epu32_mask(_mm512_and_si512(bits, splat(0x7fffffffu)), splat(0x7f800000u));
}

// --- loads: 16 elements to float, in order ---

KV_AVX512 inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
KV_AVX512 inline __m512 load16(const f16_t* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
// bf16 is the top half of a float; NaN made quiet as bf16_to_float does.
KV_AVX512 inline __m512 load16(const bf16_t* p, __mmask16 m) {
  __m512i x = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16);
  x = _mm512_mask_or_epi32(x, nan_lanes(x), x, splat(0x00400000u));
  return _mm512_castsi512_ps(x);
}
// bf16 without the quieting, where a NaN's payload cannot show (NaN * inv is a NaN either way).
KV_AVX512 inline __m512 load16_raw(const bf16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
template <class T>
KV_AVX512 inline __m512 load16_raw(const T* p, __mmask16 m) {
  return load16(p, m);
}

// --- careful stores: dtype.h's conversions for every input, 16 lanes (masked) ---

// float_to_bf16: round to nearest even on the bits (overflow carries into inf); NaN -> sign|0x7fc0.
KV_AVX512 inline __m256i bf16_bits(__m512 v) {
  const __m512i x = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), splat(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(x, splat(0x7fffu)), lsb), 16);
  const __m512i qnan = _mm512_or_si512(
      _mm512_srli_epi32(_mm512_and_si512(x, splat(0x80000000u)), 16), splat(0x7fc0u));
  r = _mm512_mask_mov_epi32(r, nan_lanes(x), qnan);
  return _mm512_cvtepi32_epi16(r);
}
// float_to_f16: the hardware conversion rounds to nearest even with IEEE subnormals and overflow
// to inf; only its NaN payloads differ: NaN -> sign | 0x7e00.
KV_AVX512 inline __m256i f16_bits(__m512 v) {
  const __m512i x = _mm512_castps_si512(v);
  const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512i qnan = _mm512_or_si512(
      _mm512_srli_epi32(_mm512_and_si512(x, splat(0x80000000u)), 16), splat(0x7e00u));
  return _mm256_mask_mov_epi16(h, nan_lanes(x), _mm512_cvtepi32_epi16(qnan));
}

KV_AVX512 inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
KV_AVX512 inline void store16(bf16_t* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, bf16_bits(v));
}
KV_AVX512 inline void store16(f16_t* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, f16_bits(v));
}
// 16 bytes, or the masked ones (a full store avoids the slow masked form of vpmovdb to memory).
KV_AVX512 inline void store_bytes(void* p, __m128i v, __mmask16 m) {
  if (m == 0xffff) {
    _mm_storeu_si128(static_cast<__m128i*>(p), v);
  } else {
    _mm_mask_storeu_epi8(p, m, v);
  }
}
// float_to_int8: NaN -> 0, saturate to [-128, 127], round to nearest even.
KV_AVX512 inline void store16(int8_t* p, __m512 v, __mmask16 m) {
  const __mmask16 ordered = _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q);
  const __m512 c = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-128.0f)), _mm512_set1_ps(127.0f));
  const __m512i i = _mm512_maskz_mov_epi32(
      ordered, _mm512_cvt_roundps_epi32(c, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  store_bytes(p, _mm512_cvtepi32_epi8(i), m);
}

// fp8_e4m3 magnitude codes of |x| <= 448 (float bits, sign cleared), rounded to nearest even. One
// rule for normals and subnormals: add 2^(e + 20), e = max(exponent of x, -6), whose ulp is the
// fp8 step of x's binade (2^(e - 3)), so the float add rounds; the sum's bits minus the magic's
// count the steps above 2^e (8 + mantissa, or the subnormal count for e = -6), and adding 8 * (e
// + 6) gives the code (8 * (e + 7) + mantissa).
KV_AVX512 inline __m512i fp8_magnitude_codes(__m512i abs) {
  const __m512i e = _mm512_max_epu32(_mm512_and_si512(abs, splat(0x7f800000u)), splat(0x3c800000u));
  const __m512i magic = _mm512_add_epi32(e, splat(20u << 23));
  const __m512 sum = _mm512_add_round_ps(_mm512_castsi512_ps(abs), _mm512_castsi512_ps(magic),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512i steps = _mm512_sub_epi32(_mm512_castps_si512(sum), magic);
  return _mm512_add_epi32(steps, _mm512_sub_epi32(_mm512_srli_epi32(e, 20), splat(0x3c8u)));
}
// With the sign bit of x on top: x's bit 31 moved to bit 7 (ternary: a | (b & c)).
KV_AVX512 inline __m512i with_fp8_sign(__m512i code, __m512i x) {
  return _mm512_ternarylogic_epi32(code, _mm512_srli_epi32(x, 24), splat(0x80u), 0xf8);
}
// float_to_fp8_e4m3 with Saturation::finite: clamp to 448 (0x7e), NaN -> 0x7f, sign on top.
KV_AVX512 inline void store16(fp8_e4m3_t* p, __m512 v, __mmask16 m) {
  const __m512i x = _mm512_castps_si512(v);
  const __m512i abs = _mm512_min_epu32(_mm512_and_si512(x, splat(0x7fffffffu)), splat(0x43e00000u));
  const __m512i r = _mm512_mask_mov_epi32(fp8_magnitude_codes(abs), nan_lanes(x), splat(0x7fu));
  store_bytes(p, _mm512_cvtepi32_epi8(with_fp8_sign(r, x)), m);
}

// --- fast codes: finite x with |x| <= qmax (1 + 2^-22), as products of a clean row are ---
//
// int8: the rounded dword. fp8: 16 (code + kFp8Bias) as a dword, sign left out. The sum's low
// word counts the steps (as in fp8_magnitude_codes) and its high word is 128 * (exponent field of
// the magic), so one vpmaddwd by (16, 1) gives 16 steps + 128 * field = 16 (code + kFp8Bias),
// which fits a word; shift and bias come off after the first pack (per 32 elements) and the
// sign bits go on last, from a mask (per 64).

inline constexpr short kFp8Bias = (121 + 20) << 3;

KV_AVX512 inline __m512i fast_codes(__m512 v, std::type_identity<int8_t>) {
  return _mm512_cvt_roundps_epi32(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
KV_AVX512 inline __m512i fast_codes(__m512 v, std::type_identity<fp8_e4m3_t>) {
  const __m512i x = _mm512_castps_si512(v);
  const __m512i e = _mm512_max_epu32(_mm512_and_si512(x, splat(0x7f800000u)), splat(0x3c800000u));
  const __m512i magic = _mm512_add_epi32(e, splat(20u << 23));
  const __m512i sum = _mm512_castps_si512(_mm512_add_round_ps(
      _mm512_abs_ps(v), _mm512_castsi512_ps(magic), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return _mm512_madd_epi16(sum, splat(0x00010010u));
}
// Two vectors of dword codes to words, in order within each 128-bit lane (signed saturation for
// int8's codes in [-128, 127]; fp8's 16 (code + bias) are below 2^15), then words to bytes.
template <class Dst>
KV_AVX512 inline __m512i pack32(__m512i a, __m512i b) {
  if constexpr (std::is_same_v<Dst, int8_t>) return _mm512_packs_epi32(a, b);
  return _mm512_sub_epi16(_mm512_srli_epi16(_mm512_packs_epi32(a, b), 4),
                          _mm512_set1_epi16(kFp8Bias));
}
template <class Dst>
KV_AVX512 inline __m512i pack16(__m512i a, __m512i b) {
  if constexpr (std::is_same_v<Dst, int8_t>) return _mm512_packs_epi16(a, b);
  return _mm512_packus_epi16(a, b);
}
// The signs of fp8 codes (bit 7) from the inputs' sign bits: inv >= 0, so x * inv has x's sign.
template <class Dst>
KV_AVX512 inline __m512i with_sign(__m512i codes, __mmask64 negative) {
  if constexpr (std::is_same_v<Dst, int8_t>) return codes;
  return _mm512_mask_add_epi8(codes, negative, codes, _mm512_set1_epi8(-128));  // codes < 0x80
}

KV_AVX512 inline void store64(void* p, __m512i v, bool stream) {
  if (stream && reinterpret_cast<uintptr_t>(p) % 64 == 0) {
    _mm512_stream_si512(static_cast<__m512i*>(p), v);
  } else {
    _mm512_storeu_si512(p, v);
  }
}

// 64 elements of a clean row (x[0..3], in order) times inv, stored as 64 codes in order.
template <class Dst>
KV_AVX512 inline void quantize64(const __m512* x, __m512 inv, Dst* d, bool stream) {
  constexpr std::type_identity<Dst> kTo;
  __m512i c[4];
  uint64_t negative = 0;
  for (int j = 0; j < 4; ++j) {
    negative |= uint64_t{_mm512_movepi32_mask(_mm512_castps_si512(x[j]))} << (16 * j);
    c[j] = fast_codes(_mm512_mul_ps(x[j], inv), kTo);
  }
  // Lane L of the packed bytes holds elements 4L..4L+3 of c0, c1, c2, c3: gather the dwords back.
  const __m512i packed = pack16<Dst>(pack32<Dst>(c[0], c[1]), pack32<Dst>(c[2], c[3]));
  const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  store64(d, with_sign<Dst>(_mm512_permutexvar_epi32(order, packed), negative), stream);
}
template <class Dst>
KV_AVX512 inline void quantize64(const float* s, __m512 inv, Dst* d, bool stream) {
  const __m512 x[4] = {_mm512_loadu_ps(s), _mm512_loadu_ps(s + 16), _mm512_loadu_ps(s + 32),
                       _mm512_loadu_ps(s + 48)};
  quantize64(x, inv, d, stream);
}
template <class Dst>
KV_AVX512 inline void quantize64(const f16_t* s, __m512 inv, Dst* d, bool stream) {
  float x[64];
  for (int i = 0; i < 64; i += 16) _mm512_storeu_ps(x + i, load16(s + i, 0xffff));
  quantize64(x, inv, d, stream);
}
// bf16: interleaving zero words below each pair of 32 elements gives floats whose packs come back
// in order within each lane; one qword permute puts the two halves together.
template <class Dst>
KV_AVX512 inline __m512i quantize32(__m512i v, __m512 inv) {
  constexpr std::type_identity<Dst> kTo;
  const __m512i zero = _mm512_setzero_si512();
  const __m512 lo = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, v));
  const __m512 hi = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, v));
  return pack32<Dst>(fast_codes(_mm512_mul_ps(lo, inv), kTo),
                     fast_codes(_mm512_mul_ps(hi, inv), kTo));
}
template <class Dst>
KV_AVX512 inline void quantize64(const bf16_t* s, __m512 inv, Dst* d, bool stream) {
  const __m512i v0 = _mm512_loadu_si512(s);
  const __m512i v1 = _mm512_loadu_si512(s + 32);
  const __mmask64 negative = _mm512_kunpackd(_mm512_movepi16_mask(v1), _mm512_movepi16_mask(v0));
  const __m512i packed = pack16<Dst>(quantize32<Dst>(v0, inv), quantize32<Dst>(v1, inv));
  const __m512i order = _mm512_set_epi64(7, 5, 3, 1, 6, 4, 2, 0);
  store64(d, with_sign<Dst>(_mm512_permutexvar_epi64(order, packed), negative), stream);
}

// --- absmax ---

// The largest magnitude pattern of the row (sign cleared), NaN and inf included: above the
// infinity pattern exactly when the row holds a NaN. f32: 32-bit patterns; f16 / bf16: 16-bit.
KV_AVX512 inline uint32_t max_magnitude_bits(const float* s, int64_t n) {
  __m512i m = _mm512_setzero_si512();
  const __m512i magnitude = splat(0x7fffffffu);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {  // plain loads: a row just stored forwards to them
    m = _mm512_max_epu32(m, _mm512_and_si512(_mm512_loadu_si512(s + i), magnitude));
  }
  if (i < n) {
    const __m512 tail = _mm512_maskz_loadu_ps(tail_mask(n - i), s + i);
    m = _mm512_max_epu32(m, _mm512_and_si512(_mm512_castps_si512(tail), magnitude));
  }
  return _mm512_reduce_max_epu32(m);
}
template <class T>
KV_AVX512 inline uint32_t max_magnitude_bits(const T* s, int64_t n) {
  const __m512i magnitude = _mm512_set1_epi16(0x7fff);
  __m512i m = _mm512_setzero_si512();
  for (int64_t i = 0; i < n; i += 32) {
    m = _mm512_max_epu16(
        m, _mm512_and_si512(_mm512_maskz_loadu_epi16(tail_mask32(n - i), s + i), magnitude));
  }
  m = _mm512_max_epu32(_mm512_and_si512(m, splat(0xffffu)), _mm512_srli_epi32(m, 16));
  return _mm512_reduce_max_epu32(m);
}
template <class T>
inline constexpr uint32_t kInfBits = std::is_same_v<T, float>
                                         ? 0x7f800000u
                                         : (std::is_same_v<T, f16_t> ? 0x7c00u : 0x7f80u);

// The float of a magnitude pattern that is not NaN (exact).
KV_AVX512 inline float magnitude_value(uint32_t bits, std::type_identity<float>) {
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}
KV_AVX512 inline float magnitude_value(uint32_t bits, std::type_identity<bf16_t>) {
  return magnitude_value(bits << 16, std::type_identity<float>{});
}
KV_AVX512 inline float magnitude_value(uint32_t bits, std::type_identity<f16_t>) {
  return _mm512_cvtss_f32(_mm512_cvtph_ps(_mm256_set1_epi16(static_cast<short>(bits))));
}

// ops::row_absmax: the largest magnitude over the non-NaN lanes (with the sign cleared, non-NaN
// patterns order as their magnitudes).
KV_AVX512 inline float careful_absmax(const float* s, int64_t n) {
  __m512i m = _mm512_setzero_si512();
  for (int64_t i = 0; i < n; i += 16) {
    const __m512i a = _mm512_and_si512(
        _mm512_castps_si512(_mm512_maskz_loadu_ps(tail_mask(n - i), s + i)), splat(0x7fffffffu));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(a, splat(0x7f800000u));
    m = _mm512_max_epu32(m, _mm512_maskz_mov_epi32(static_cast<__mmask16>(~nan), a));
  }
  return magnitude_value(_mm512_reduce_max_epu32(m), std::type_identity<float>{});
}
template <class T>
KV_AVX512 inline float careful_absmax(const T* s, int64_t n) {
  const __m512i magnitude = _mm512_set1_epi16(0x7fff);
  const __m512i inf = _mm512_set1_epi16(static_cast<short>(kInfBits<T>));
  __m512i m = _mm512_setzero_si512();
  for (int64_t i = 0; i < n; i += 32) {
    const __m512i a =
        _mm512_and_si512(_mm512_maskz_loadu_epi16(tail_mask32(n - i), s + i), magnitude);
    m = _mm512_max_epu16(m, _mm512_maskz_mov_epi16(~_mm512_cmpgt_epu16_mask(a, inf), a));
  }
  m = _mm512_max_epu32(_mm512_and_si512(m, splat(0xffffu)), _mm512_srli_epi32(m, 16));
  return magnitude_value(_mm512_reduce_max_epu32(m), std::type_identity<T>{});
}

// --- the row ---

// ops::quantize_row's result for a row of n elements of Src (float, f16_t or bf16_t) read as
// floats: writes n codes of Dst (int8_t or fp8_e4m3_t) and returns the scale. stream: whole
// 64-byte blocks at 64-byte aligned addresses bypass the cache (same values).
template <class Src, class Dst>
KV_AVX512 inline float quantize_row(const Src* s, int64_t n, Dst* d, bool stream = false) {
  static_assert(kQuantized<Dst>);
  const uint32_t bits = max_magnitude_bits(s, n);
  const bool clean = bits < kInfBits<Src>;
  const float absmax =
      clean ? magnitude_value(bits, std::type_identity<Src>{}) : careful_absmax(s, n);
  const float inv = absmax > 0.0f ? kQMax<Dst> / absmax : 0.0f;
  const __m512 vinv = _mm512_set1_ps(inv);
  int64_t i = 0;
  if (clean && std::isfinite(inv)) {
    for (; i + 64 <= n; i += 64) quantize64(s + i, vinv, d + i, stream);
  }
  for (; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    store16(d + i, _mm512_mul_ps(load16_raw(s + i, k), vinv), k);
  }
  return absmax / kQMax<Dst>;
}

// quantize_row of the 16 V floats v[0..V) (V a multiple of 4), kept in registers on a clean row;
// any other row goes through x (16 V floats of scratch) and quantize_row.
template <int V, class Dst>
KV_AVX512 inline float quantize_regs(const __m512 (&v)[V], float* x, Dst* d, bool stream) {
  static_assert(V % 4 == 0);
  const __m512i magnitude = splat(0x7fffffffu);
  __m512i m = _mm512_setzero_si512();
  for (int j = 0; j < V; ++j)
    m = _mm512_max_epu32(m, _mm512_and_si512(_mm512_castps_si512(v[j]), magnitude));
  const uint32_t bits = _mm512_reduce_max_epu32(m);
  const float absmax = magnitude_value(bits, std::type_identity<float>{});
  const float inv = absmax > 0.0f ? kQMax<Dst> / absmax : 0.0f;
  if (bits >= kInfBits<float> || !std::isfinite(inv)) {
    for (int j = 0; j < V; ++j) _mm512_storeu_ps(x + 16 * j, v[j]);
    return quantize_row(x, 16 * V, d, stream);
  }
  const __m512 vinv = _mm512_set1_ps(inv);
  for (int j = 0; j < V; j += 4) quantize64(v + j, vinv, d + 16 * j, stream);
  return absmax / kQMax<Dst>;
}

// --- dequantization: dst[i] = ops::dequantize(q[i], scale) ---

// 16 floats, unmasked when whole: a masked store does not forward to the loads that read the row
// next, which then wait for it to retire.
KV_AVX512 inline void store_floats(float* p, __m512 v, __mmask16 m) {
  if (m == 0xffff) {
    _mm512_storeu_ps(p, v);
  } else {
    _mm512_mask_storeu_ps(p, m, v);
  }
}

// 16 codes (masked) to floats times scale.
KV_AVX512 inline __m512 dequantize16(const int8_t* q, __m512 scale, __mmask16 m) {
  const __m512i v = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, q));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(v), scale);
}
// fp8_e4m3 -> float exactly: the magnitude bits shifted into an f16 (exponent bias 15, not 7)
// are the value times 2^-8, subnormals included, and 256 * that is exact. Not for NaN codes
// (0x7f / 0xff): rows holding one take the scalar decoding (has_nan_code).
KV_AVX512 inline __m512 dequantize16(const fp8_e4m3_t* q, __m512 scale, __mmask16 m) {
  const __m256i w = _mm256_cvtepu8_epi16(_mm_maskz_loadu_epi8(m, q));
  const __m256i h =
      _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x7f)), 7),
                      _mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x80)), 8));
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtph_ps(h), _mm512_set1_ps(256.0f)), scale);
}
KV_AVX512 inline bool has_nan_code(const int8_t*, int64_t) { return false; }
KV_AVX512 inline bool has_nan_code(const fp8_e4m3_t* q, int64_t n) {
  const auto* b = reinterpret_cast<const uint8_t*>(q);
  __mmask64 nan = 0;
  for (int64_t i = 0; i < n; i += 64) {
    const __mmask64 m =
        n - i >= 64 ? ~__mmask64{0} : (__mmask64{1} << static_cast<unsigned>(n - i)) - 1u;
    const __m512i v = _mm512_and_si512(_mm512_maskz_loadu_epi8(m, b + i), _mm512_set1_epi8(0x7f));
    nan |= _mm512_mask_cmpeq_epi8_mask(m, v, _mm512_set1_epi8(0x7f));
  }
  return nan != 0;
}

template <class Q>
KV_AVX512 inline void dequantize_row(const Q* q, float scale, float* dst, int64_t n) {
  if (has_nan_code(q, n)) {
    for (int64_t i = 0; i < n; ++i) dst[i] = ops::dequantize(q[i], scale);
    return;
  }
  const __m512 vs = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    store_floats(dst + i, dequantize16(q + i, vs, m), m);
  }
}

}  // namespace kvcache::cpu::q512

#endif  // __x86_64__
