// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// The AVX-512 RoPE row primitives (heads of 64, 128 and 256 kept in registers from load to store
// or quantization), their known-answer self-test against the portable set, and fold_norm_avx512.

#include <cmath>
#include <cstring>

#include "backend/cpu/rope_kernels.h"

#if defined(__x86_64__)
#include "backend/cpu/quantize_avx512.h"
#endif

namespace kvcache::cpu {

#if defined(__x86_64__)
namespace {

KV_AVX512 __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xffff)
                    : static_cast<__mmask16>((1u << static_cast<unsigned>(left)) - 1u);
}

KV_AVX512 void load_avx512(DType dtype, const void* src, float* dst, int64_t n) {
  if (dtype == DType::f32) {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
    return;
  }
  const auto* p = static_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m256i h = _mm256_maskz_loadu_epi16(m, p + i);
    __m512 v;
    if (dtype == DType::bf16) {
      v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      v = _mm512_cvtph_ps(h);
    }
    if (m == 0xffff) {  // a masked store would not forward to the loads that read the row next
      _mm512_storeu_ps(dst + i, v);
    } else {
      _mm512_mask_storeu_ps(dst + i, m, v);
    }
  }
}

// Round to nearest even, as float_to_bf16 (NaN stays NaN, made quiet).
KV_AVX512 __m256i to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(r);
}

// to_bf16 of 32 floats, a then b: vcvtne2ps2bf16 rounds and quiets NaN the same way but reads
// denormal inputs as zero, so a pair holding one takes to_bf16.
KV_AVX512 __m512i to_bf16_pair(__m512 a, __m512 b) {
  if ((_mm512_fpclass_ps_mask(a, 0x20) | _mm512_fpclass_ps_mask(b, 0x20)) != 0) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(to_bf16(a)), to_bf16(b), 1);
  }
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));
}

bool aligned(const void* p, size_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

KV_AVX512 void copy_avx512(const void* src, void* dst, size_t bytes, bool stream) {
  if (!stream || !aligned(dst, 64)) {
    std::memcpy(dst, src, bytes);
    return;
  }
  const auto* s = static_cast<const char*>(src);
  auto* d = static_cast<char*>(dst);
  size_t i = 0;
  for (; i + 64 <= bytes; i += 64) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d + i), _mm512_loadu_si512(s + i));
  }
  std::memcpy(d + i, s + i, bytes - i);
}

KV_AVX512 void store_avx512(const float* src, DType dtype, void* dst, int64_t n, bool stream) {
  if (dtype == DType::f32) {
    copy_avx512(src, dst, static_cast<size_t>(n) * sizeof(float), stream);
    return;
  }
  auto* p = static_cast<uint16_t*>(dst);
  const bool nt = stream && aligned(dst, 32);
  int64_t i = 0;
  if (dtype == DType::bf16) {
    for (; i + 32 <= n; i += 32) {
      const __m512i h = to_bf16_pair(_mm512_loadu_ps(src + i), _mm512_loadu_ps(src + i + 16));
      if (nt && aligned(p + i, 64)) {
        _mm512_stream_si512(reinterpret_cast<__m512i*>(p + i), h);
      } else {
        _mm512_storeu_si512(p + i, h);
      }
    }
  }
  for (; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 v = m == 0xffff ? _mm512_loadu_ps(src + i) : _mm512_maskz_loadu_ps(m, src + i);
    const __m256i h = dtype == DType::bf16
                          ? to_bf16(v)
                          : _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    if (nt && m == 0xffff) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p + i), h);
    } else {
      _mm256_mask_storeu_epi16(p + i, m, h);
    }
  }
}

KV_AVX512 void fence_avx512() { _mm_sfence(); }

KV_AVX512 float quantize_avx512(const float* src, DType dtype, void* dst, int64_t n, bool stream) {
  if (dtype == DType::int8) return q512::quantize_row(src, n, static_cast<int8_t*>(dst), stream);
  return q512::quantize_row(src, n, static_cast<fp8_e4m3_t*>(dst), stream);
}

KV_AVX512 void rms_norm_avx512(float* x, const float* w, float offset, float eps, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(tail_mask(n - i), x + i);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  const __m512 r = _mm512_set1_ps(norm_factor(_mm512_reduce_add_ps(acc), eps, n));
  const __m512 off = _mm512_set1_ps(offset);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), r);
    const __m512 g = _mm512_add_ps(off, _mm512_maskz_loadu_ps(m, w + i));
    q512::store_floats(x + i, _mm512_mul_ps(v, g), m);
  }
}

KV_AVX512 void rotate_avx512(float* x, const float* c, const float* s, int64_t nf,
                             RopeStyle style) {
  int64_t i = 0;
  if (style == RopeStyle::neox) {
    for (; i + 16 <= nf; i += 16) {
      const __m512 x1 = _mm512_loadu_ps(x + i);
      const __m512 x2 = _mm512_loadu_ps(x + nf + i);
      const __m512 vc = _mm512_loadu_ps(c + i);
      const __m512 vs = _mm512_loadu_ps(s + i);
      _mm512_storeu_ps(x + i, _mm512_fmsub_ps(x1, vc, _mm512_mul_ps(x2, vs)));
      _mm512_storeu_ps(x + nf + i, _mm512_fmadd_ps(x2, vc, _mm512_mul_ps(x1, vs)));
    }
  } else {
    // 8 pairs per vector: o = x * [c0 c0 c1 c1 ..] + swap_pairs(x) * [-s0 s0 -s1 s1 ..].
    const __m512i dup = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512 even_sign = _mm512_castsi512_ps(
        _mm512_set_epi32(0, INT32_MIN, 0, INT32_MIN, 0, INT32_MIN, 0, INT32_MIN, 0, INT32_MIN, 0,
                         INT32_MIN, 0, INT32_MIN, 0, INT32_MIN));
    for (; i + 8 <= nf; i += 8) {
      const __m512 v = _mm512_loadu_ps(x + 2 * i);
      const __m512 vc = _mm512_permutexvar_ps(dup, _mm512_castps256_ps512(_mm256_loadu_ps(c + i)));
      __m512 vs = _mm512_permutexvar_ps(dup, _mm512_castps256_ps512(_mm256_loadu_ps(s + i)));
      vs = _mm512_xor_ps(vs, even_sign);
      const __m512 swapped = _mm512_permute_ps(v, 0xB1);
      _mm512_storeu_ps(x + 2 * i, _mm512_fmadd_ps(v, vc, _mm512_mul_ps(swapped, vs)));
    }
  }
  rotate_range(x, c, s, nf, style, i);
}

KV_AVX512 __m512 load16(const void* src, DType dtype, int64_t i) {
  if (dtype == DType::f32) return _mm512_loadu_ps(static_cast<const float*>(src) + i);
  const __m256i h =
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(src) + i));
  if (dtype == DType::bf16) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  return _mm512_cvtph_ps(h);
}

// neox with whole vectors of frequencies: both halves loaded, normed and rotated in registers.
KV_AVX512 void rope_head_avx512(const void* src, DType dtype, const float* w, float offset,
                                float eps, const float* c, const float* s, int64_t nf,
                                RopeStyle style, int64_t n, float* x) {
  if (style != RopeStyle::neox || nf % 16 != 0 || n % 16 != 0) {
    load_avx512(dtype, src, x, n);
    if (w != nullptr) rms_norm_avx512(x, w, offset, eps, n);
    rotate_avx512(x, c, s, nf, style);
    return;
  }
  __m512 r = _mm512_set1_ps(1.0f);
  const __m512 off = _mm512_set1_ps(offset);
  if (w != nullptr) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
      const __m512 v = load16(src, dtype, i);
      acc = _mm512_fmadd_ps(v, v, acc);
    }
    r = _mm512_set1_ps(norm_factor(_mm512_reduce_add_ps(acc), eps, n));
  }
  auto normed = [&](int64_t i) KV_AVX512 {
    const __m512 v = load16(src, dtype, i);
    if (w == nullptr) return v;
    return _mm512_mul_ps(_mm512_mul_ps(v, r), _mm512_add_ps(off, _mm512_loadu_ps(w + i)));
  };
  for (int64_t i = 0; i < nf; i += 16) {
    const __m512 x1 = normed(i);
    const __m512 x2 = normed(nf + i);
    const __m512 vc = _mm512_loadu_ps(c + i);
    const __m512 vs = _mm512_loadu_ps(s + i);
    _mm512_storeu_ps(x + i, _mm512_fmsub_ps(x1, vc, _mm512_mul_ps(x2, vs)));
    _mm512_storeu_ps(x + nf + i, _mm512_fmadd_ps(x2, vc, _mm512_mul_ps(x1, vs)));
  }
  for (int64_t i = 2 * nf; i < n; i += 16) _mm512_storeu_ps(x + i, normed(i));
}

// rotate_avx512's neox rotation of a row of 16 V = 2 nf floats in registers (the same operations).
template <int V>
KV_AVX512 void rotate_regs(const float* c, const float* s, __m512 (&v)[V]) {
  for (int j = 0; j < V / 2; ++j) {
    const __m512 vc = _mm512_loadu_ps(c + 16 * j);
    const __m512 vs = _mm512_loadu_ps(s + 16 * j);
    const __m512 x1 = v[j];
    const __m512 x2 = v[j + V / 2];
    v[j] = _mm512_fmsub_ps(x1, vc, _mm512_mul_ps(x2, vs));
    v[j + V / 2] = _mm512_fmadd_ps(x2, vc, _mm512_mul_ps(x1, vs));
  }
}

// A neox head with full rotary dimension (n = 16 V = 2 nf) in registers: rope_head_avx512's float
// operations in its order, so its results are the same bits. With folded (qkv_fold_norm's
// coefficients) and w, the norm weights and 1 / rms come out of the rotation instead: fewer float
// operations, rounded differently (within the stated float-math tolerance).
template <int V>
KV_AVX512 void rope_head_regs(const void* src, DType dtype, const float* w, float offset, float eps,
                              const float* c, const float* s, const float* folded, __m512 (&v)[V]) {
  for (int j = 0; j < V; ++j) v[j] = load16(src, dtype, 16 * j);
  if (w == nullptr) {
    rotate_regs<V>(c, s, v);
    return;
  }
  __m512 acc = _mm512_setzero_ps();
  for (int j = 0; j < V; ++j) acc = _mm512_fmadd_ps(v[j], v[j], acc);
  const __m512 r = _mm512_set1_ps(norm_factor(_mm512_reduce_add_ps(acc), eps, 16 * V));
  if (folded != nullptr) {
    constexpr int kNf = 8 * V;
    for (int j = 0; j < V / 2; ++j) {
      const float* f = folded + 16 * j;
      const __m512 x1 = v[j];
      const __m512 x2 = v[j + V / 2];
      const __m512 o1 =
          _mm512_fmsub_ps(x1, _mm512_loadu_ps(f), _mm512_mul_ps(x2, _mm512_loadu_ps(f + kNf)));
      const __m512 o2 = _mm512_fmadd_ps(x2, _mm512_loadu_ps(f + 2 * kNf),
                                        _mm512_mul_ps(x1, _mm512_loadu_ps(f + 3 * kNf)));
      v[j] = _mm512_mul_ps(o1, r);
      v[j + V / 2] = _mm512_mul_ps(o2, r);
    }
    return;
  }
  const __m512 off = _mm512_set1_ps(offset);
  for (int j = 0; j < V; ++j) {
    v[j] = _mm512_mul_ps(_mm512_mul_ps(v[j], r), _mm512_add_ps(off, _mm512_loadu_ps(w + 16 * j)));
  }
  rotate_regs<V>(c, s, v);
}

// The row in registers to out_dtype: converted, or quantized (returns the scale; x: scratch).
template <int V>
KV_AVX512 float store_regs(const __m512 (&v)[V], float* x, DType out_dtype, void* out,
                           bool stream) {
  auto* o = static_cast<char*>(out);
  if (out_dtype == DType::int8) return q512::quantize_regs(v, x, static_cast<int8_t*>(out), stream);
  if (out_dtype == DType::fp8_e4m3) {
    return q512::quantize_regs(v, x, static_cast<fp8_e4m3_t*>(out), stream);
  }
  for (int j = 0; j < V; j += 2) {
    if (out_dtype == DType::bf16) {
      q512::store64(o + 32 * j, to_bf16_pair(v[j], v[j + 1]), stream);
    } else if (out_dtype == DType::f16) {
      constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
      q512::store64(o + 32 * j,
                    _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtps_ph(v[j], kRound)),
                                       _mm512_cvtps_ph(v[j + 1], kRound), 1),
                    stream);
    } else {
      q512::store64(o + 64 * j, _mm512_castps_si512(v[j]), stream);
      q512::store64(o + 64 * (j + 1), _mm512_castps_si512(v[j + 1]), stream);
    }
  }
  return 0.0f;
}

template <int V>
KV_AVX512 float rope_head_out_regs(const void* src, DType dtype, const float* w, float offset,
                                   float eps, const float* c, const float* s, const float* folded,
                                   float* x, DType out_dtype, void* out, bool stream) {
  __m512 v[V];
  rope_head_regs<V>(src, dtype, w, offset, eps, c, s, folded, v);
  return store_regs<V>(v, x, out_dtype, out, stream);
}

// rope_head then store or quantize, without the float row in memory for the common heads (64,
// 128, 256).
KV_AVX512 float rope_head_out_avx512(const void* src, DType dtype, const float* w, float offset,
                                     float eps, const float* c, const float* s, const float* folded,
                                     int64_t nf, RopeStyle style, int64_t n, float* x,
                                     DType out_dtype, void* out, bool stream) {
  if (style == RopeStyle::neox && n == 2 * nf) {
    switch (n) {
      case 64:
        return rope_head_out_regs<4>(src, dtype, w, offset, eps, c, s, folded, x, out_dtype, out,
                                     stream);
      case 128:
        return rope_head_out_regs<8>(src, dtype, w, offset, eps, c, s, folded, x, out_dtype, out,
                                     stream);
      case 256:
        return rope_head_out_regs<16>(src, dtype, w, offset, eps, c, s, folded, x, out_dtype, out,
                                      stream);
      default:
        break;
    }
  }
  rope_head_avx512(src, dtype, w, offset, eps, c, s, nf, style, n, x);
  if (is_quantized(out_dtype)) return quantize_avx512(x, out_dtype, out, n, stream);
  store_avx512(x, out_dtype, out, n, stream);
  return 0.0f;
}

KV_AVX512 void dequantize_avx512(DType dtype, const void* src, float scale, float* dst, int64_t n);

template <int V, class Q>
KV_AVX512 float rotate_quantized_regs(Q* q, float scale, const float* c, const float* s, float* x) {
  __m512 v[V];
  const __m512 vs = _mm512_set1_ps(scale);
  for (int j = 0; j < V; ++j) v[j] = q512::dequantize16(q + 16 * j, vs, 0xffff);
  rotate_regs<V>(c, s, v);
  return q512::quantize_regs(v, x, q, false);  // every code is read before the first store
}

// dequantize, rotate, quantize in place; in registers for neox heads of 64, 128, 256.
KV_AVX512 float rotate_quantized_avx512(DType dtype, void* q, float scale, const float* c,
                                        const float* s, int64_t nf, RopeStyle style, int64_t n,
                                        float* x) {
  const bool regs = style == RopeStyle::neox && n == 2 * nf && (n == 64 || n == 128 || n == 256);
  if (dtype == DType::int8 && regs) {
    auto* p = static_cast<int8_t*>(q);
    if (n == 64) return rotate_quantized_regs<4>(p, scale, c, s, x);
    if (n == 128) return rotate_quantized_regs<8>(p, scale, c, s, x);
    return rotate_quantized_regs<16>(p, scale, c, s, x);
  }
  auto* f = static_cast<fp8_e4m3_t*>(q);
  if (dtype == DType::fp8_e4m3 && regs && !q512::has_nan_code(f, n)) {
    if (n == 64) return rotate_quantized_regs<4>(f, scale, c, s, x);
    if (n == 128) return rotate_quantized_regs<8>(f, scale, c, s, x);
    return rotate_quantized_regs<16>(f, scale, c, s, x);
  }
  dequantize_avx512(dtype, q, scale, x, n);
  rotate_avx512(x, c, s, nf, style);
  return quantize_avx512(x, dtype, q, n, false);
}

template <class Src>
KV_AVX512 float quantize_from_avx512(const Src* src, DType dtype, void* dst, int64_t n,
                                     bool stream) {
  if (dtype == DType::int8) return q512::quantize_row(src, n, static_cast<int8_t*>(dst), stream);
  return q512::quantize_row(src, n, static_cast<fp8_e4m3_t*>(dst), stream);
}
KV_AVX512 float quantize_from_avx512(DType src_dtype, const void* src, DType dtype, void* dst,
                                     int64_t n, bool stream) {
  if (src_dtype == DType::bf16) {
    return quantize_from_avx512(static_cast<const bf16_t*>(src), dtype, dst, n, stream);
  }
  if (src_dtype == DType::f16) {
    return quantize_from_avx512(static_cast<const f16_t*>(src), dtype, dst, n, stream);
  }
  return quantize_from_avx512(static_cast<const float*>(src), dtype, dst, n, stream);
}

KV_AVX512 void dequantize_avx512(DType dtype, const void* src, float scale, float* dst, int64_t n) {
  if (dtype == DType::int8) {
    q512::dequantize_row(static_cast<const int8_t*>(src), scale, dst, n);
  } else {
    q512::dequantize_row(static_cast<const fp8_e4m3_t*>(src), scale, dst, n);
  }
}

constexpr RopeKernels kAvx512{CpuIsa::avx512,         load_avx512,          store_avx512,
                              quantize_avx512,        copy_avx512,          fence_avx512,
                              rms_norm_avx512,        rotate_avx512,        rope_head_avx512,
                              dequantize_avx512,      rope_head_out_avx512, quantize_from_avx512,
                              rotate_quantized_avx512};

// Known-answer check of the AVX-512 set against the portable one on fixed rows that exercise the
// vector bodies and the tails: conversions, int8 / fp8 quantization and dequantization bit for
// bit, the float math within a few ulps; the fused register paths (rope_head_out,
// rotate_quantized) bit for bit against the AVX-512 calls they stand for.
bool avx512_self_test(const RopeKernels& portable) {
  constexpr int64_t kN = 64;
  float x[kN], w[kN], c[kN], s[kN];
  for (int64_t i = 0; i < kN; ++i) {
    const auto f = static_cast<float>(i);
    x[i] = std::sin(f * 1.7f) * (1.0f + f / 8.0f);
    w[i] = 0.5f + std::cos(f) * 0.25f;
    c[i] = std::cos(f * 0.3f);
    s[i] = std::sin(f * 0.3f);
  }
  auto close = [](const float* a, const float* b, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
      if (!(std::fabs(a[i] - b[i]) <= 1e-5f * (1.0f + std::fabs(b[i])))) return false;
    }
    return true;
  };
  for (DType d : {DType::bf16, DType::f16}) {
    alignas(64) uint16_t h1[kN], h2[kN];  // aligned: the streaming stores are taken
    float f1[kN], f2[kN];
    portable.store(x, d, h1, kN, false);
    kAvx512.store(x, d, h2, kN, true);
    portable.load(d, h1, f1, kN);
    kAvx512.load(d, h1, f2, kN);
    if (std::memcmp(h1, h2, sizeof h1) != 0 || std::memcmp(f1, f2, sizeof f1) != 0) return false;
  }
  alignas(64) char c1[200], c2[200];
  for (size_t i = 0; i < sizeof c1; ++i) c1[i] = static_cast<char>(i * 37);
  kAvx512.copy(c1, c2, sizeof c1, true);
  kAvx512.fence();
  if (std::memcmp(c1, c2, sizeof c1) != 0) return false;
  // Quantization, bit for bit: the smooth row (the 64-wide clean path, streamed, and a tail),
  // fp8 ties at inv = 1 (absmax 448), and rows with NaN, infinity or only denormals (careful path).
  float ties[kN], nan_row[kN], inf_row[kN], tiny[kN];
  for (int64_t i = 0; i < kN; ++i) {
    const auto code = static_cast<uint8_t>((i * 7) % 0x7e);
    ties[i] = i == 5
                  ? -448.0f
                  : (fp8_e4m3_to_float(code) + fp8_e4m3_to_float(static_cast<uint8_t>(code + 1))) *
                        (i % 2 == 0 ? 0.5f : -0.5f);
    nan_row[i] = i == 17 ? NAN : x[i];
    inf_row[i] = i == 3 ? -INFINITY : x[i];
    tiny[i] = x[i] * 1e-40f;
  }
  for (DType d : {DType::int8, DType::fp8_e4m3}) {
    for (const float* row : {x, ties, nan_row, inf_row, tiny}) {
      for (int64_t n : {kN, int64_t{40}}) {
        alignas(64) int8_t q1[kN], q2[kN];
        std::memset(q1, 0x5a, sizeof q1);
        std::memset(q2, 0x5a, sizeof q2);
        const float s1 = portable.quantize(row, d, q1, n, false);
        const float s2 = kAvx512.quantize(row, d, q2, n, true);
        kAvx512.fence();
        if (std::memcmp(&s1, &s2, sizeof s1) != 0 || std::memcmp(q1, q2, sizeof q1) != 0) {
          return false;
        }
      }
    }
  }
  // Quantization straight from bf16 / f16 / f32 rows (the same rows, rounded).
  for (DType src : {DType::bf16, DType::f16, DType::f32}) {
    alignas(64) float row[kN];
    portable.store(x, src, row, kN, false);
    for (DType d : {DType::int8, DType::fp8_e4m3}) {
      for (int64_t n : {kN, int64_t{40}}) {
        alignas(64) int8_t q1[kN], q2[kN];
        std::memset(q1, 0x5a, sizeof q1);
        std::memset(q2, 0x5a, sizeof q2);
        const float s1 = portable.quantize_from(src, row, d, q1, n, false);
        const float s2 = kAvx512.quantize_from(src, row, d, q2, n, false);
        if (std::memcmp(&s1, &s2, sizeof s1) != 0 || std::memcmp(q1, q2, sizeof q1) != 0) {
          return false;
        }
      }
    }
  }
  // Dequantization of every int8 and fp8 code (NaN codes in the first row, none in the second).
  alignas(64) uint8_t codes[256];
  for (int i = 0; i < 256; ++i) codes[i] = static_cast<uint8_t>(i);
  for (DType d : {DType::int8, DType::fp8_e4m3}) {
    for (auto [at, n] : {std::pair<int64_t, int64_t>{0, 256}, {128, 127}}) {
      float a[256], b[256];
      portable.dequantize(d, codes + at, 0.37f, a, n);
      kAvx512.dequantize(d, codes + at, 0.37f, b, n);
      if (std::memcmp(a, b, static_cast<size_t>(n) * sizeof(float)) != 0) return false;
    }
  }
  // The head straight to its output (registers for 64, 128, 256) against rope_head then store.
  {
    constexpr int64_t kBig = 256;
    float xb[kBig], wb[kBig], cb[kBig / 2], sb[kBig / 2], scratch[kBig];
    uint16_t hb[kBig];
    for (int64_t i = 0; i < kBig; ++i) {
      xb[i] = x[i % kN] * (i % 3 == 0 ? -1.5f : 1.0f);
      wb[i] = w[i % kN];
      if (i < kBig / 2) {
        cb[i] = c[i % kN];
        sb[i] = s[i % kN];
      }
    }
    portable.store(xb, DType::bf16, hb, kBig, false);
    for (int64_t n : {64, 128, 256, 96}) {
      for (DType d : {DType::bf16, DType::f16, DType::f32, DType::int8, DType::fp8_e4m3}) {
        alignas(64) unsigned char o1[kBig * 4], o2[kBig * 4];
        std::memset(o1, 0x5a, sizeof o1);
        std::memset(o2, 0x5a, sizeof o2);
        kAvx512.rope_head(hb, DType::bf16, wb, 1.0f, 1e-6f, cb, sb, n / 2, RopeStyle::neox, n,
                          scratch);
        float s1 = 0.0f;
        if (is_quantized(d)) {
          s1 = kAvx512.quantize(scratch, d, o1, n, false);
        } else {
          kAvx512.store(scratch, d, o1, n, false);
        }
        const float s2 = kAvx512.rope_head_out(hb, DType::bf16, wb, 1.0f, 1e-6f, cb, sb, nullptr,
                                               n / 2, RopeStyle::neox, n, scratch, d, o2, true);
        kAvx512.fence();
        if (std::memcmp(o1, o2, sizeof o1) != 0 || std::memcmp(&s1, &s2, sizeof s1) != 0) {
          return false;
        }
      }
      // The norm folded into the rotation: the same values up to float rounding.
      if (n != 96) {
        const int64_t nf = n / 2;
        float folded[2 * kBig], f1[kBig], f2[kBig];
        for (int64_t i = 0; i < nf; ++i) {
          folded[i] = (1.0f + wb[i]) * cb[i];
          folded[nf + i] = (1.0f + wb[nf + i]) * sb[i];
          folded[2 * nf + i] = (1.0f + wb[nf + i]) * cb[i];
          folded[3 * nf + i] = (1.0f + wb[i]) * sb[i];
        }
        kAvx512.rope_head_out(hb, DType::bf16, wb, 1.0f, 1e-6f, cb, sb, nullptr, nf,
                              RopeStyle::neox, n, scratch, DType::f32, f1, false);
        kAvx512.rope_head_out(hb, DType::bf16, wb, 1.0f, 1e-6f, cb, sb, folded, nf, RopeStyle::neox,
                              n, scratch, DType::f32, f2, false);
        if (!close(f2, f1, n)) return false;
      }
      // Re-rotating quantized rows in place (with a NaN code: the fallback) against the calls.
      for (DType d : {DType::int8, DType::fp8_e4m3}) {
        for (bool nan_code : {false, true}) {
          alignas(64) uint8_t q1[kBig], q2[kBig];
          std::memset(q1, 0x5a, sizeof q1);
          const float scale = kAvx512.quantize(xb, d, q1, n, false);
          if (nan_code) q1[3] = 0xff;
          std::memcpy(q2, q1, sizeof q1);
          kAvx512.dequantize(d, q1, scale, scratch, n);
          kAvx512.rotate(scratch, cb, sb, n / 2, RopeStyle::neox);
          const float s1 = kAvx512.quantize(scratch, d, q1, n, false);
          const float s2 =
              kAvx512.rotate_quantized(d, q2, scale, cb, sb, n / 2, RopeStyle::neox, n, scratch);
          if (std::memcmp(q1, q2, sizeof q1) != 0 || std::memcmp(&s1, &s2, sizeof s1) != 0) {
            return false;
          }
        }
      }
    }
  }
  // The fused head: bf16 rows of 64 (the vector path) and 40 (the fallback), normed or not.
  uint16_t h[kN];
  portable.store(x, DType::bf16, h, kN, false);
  for (int64_t n : {64, 40}) {
    for (const float* weights :
         {static_cast<const float*>(w), static_cast<const float*>(nullptr)}) {
      float a[kN], b[kN];
      portable.rope_head(h, DType::bf16, weights, 1.0f, 1e-6f, c, s, 16, RopeStyle::neox, n, a);
      kAvx512.rope_head(h, DType::bf16, weights, 1.0f, 1e-6f, c, s, 16, RopeStyle::neox, n, b);
      if (!close(b, a, n)) return false;
    }
  }
  for (RopeStyle style : {RopeStyle::neox, RopeStyle::gptj}) {
    float a[kN], b[kN];
    std::memcpy(a, x, sizeof x);
    std::memcpy(b, x, sizeof x);
    portable.rms_norm(a, w, 1.0f, 1e-6f, 40);
    kAvx512.rms_norm(b, w, 1.0f, 1e-6f, 40);
    portable.rotate(a, c, s, 20, style);
    kAvx512.rotate(b, c, s, 20, style);
    if (!close(b, a, kN)) return false;
  }
  return true;
}

KV_AVX512 void fold_norm_vec(const float* g, const float* c, const float* s, int64_t nf,
                             float* out) {
  for (int64_t i = 0; i < nf; i += 16) {
    const __m512 g1 = _mm512_loadu_ps(g + i);
    const __m512 g2 = _mm512_loadu_ps(g + nf + i);
    const __m512 vc = _mm512_loadu_ps(c + i);
    const __m512 vs = _mm512_loadu_ps(s + i);
    _mm512_storeu_ps(out + i, _mm512_mul_ps(g1, vc));
    _mm512_storeu_ps(out + nf + i, _mm512_mul_ps(g2, vs));
    _mm512_storeu_ps(out + 2 * nf + i, _mm512_mul_ps(g2, vc));
    _mm512_storeu_ps(out + 3 * nf + i, _mm512_mul_ps(g1, vs));
  }
}

}  // namespace

void fold_norm_avx512(const float* g, const float* c, const float* s, int64_t nf, float* out) {
  fold_norm_vec(g, c, s, nf, out);
}
#endif

const RopeKernels* avx512_rope_kernels([[maybe_unused]] const RopeKernels& portable) {
#if defined(__x86_64__)
  if (cpu_supports(CpuIsa::avx512) && avx512_self_test(portable)) return &kAvx512;
#endif
  return nullptr;
}

}  // namespace kvcache::cpu
