// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// The RoPE row primitives (portable and AVX-512, picked after a self-test) and the fused
// qkv_rope_write driver: one pass over the packed rows, each head converted to float once.

#include <cmath>
#include <cstring>
#include <functional>

#include "backend/cpu/rope_kernels.h"
#include "ops/paged_checks.h"
#include "ops/quantize.h"

#if defined(__x86_64__)
#include "backend/cpu/x86_intrinsics.h"
#endif

namespace kvcache::cpu {
namespace {

// --- portable ---

void load_portable(DType dtype, const void* src, float* dst, int64_t n) {
  to_float(dtype, src, dst, static_cast<size_t>(n));
}

void store_portable(const float* src, DType dtype, void* dst, int64_t n, bool) {
  from_float(src, dtype, dst, static_cast<size_t>(n));
}

float quantize_portable(const float* src, DType dtype, void* dst, int64_t n, bool) {
  if (dtype == DType::int8) return ops::quantize_row(src, n, static_cast<int8_t*>(dst));
  return ops::quantize_row(src, n, static_cast<fp8_e4m3_t*>(dst));
}

float norm_factor(float sum_squares, float eps, int64_t n) {
  return 1.0f / std::sqrt(sum_squares / static_cast<float>(n) + eps);
}

void rms_norm_portable(float* x, const float* w, float offset, float eps, int64_t n) {
  float ss = 0.0f;
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float r = norm_factor(ss, eps, n);
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] * r * (offset + w[i]);
}

void rotate_pairs(float* x, int64_t stride_pair, int64_t step, const float* c, const float* s,
                  int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    float* a = x + i * step;
    float* b = a + stride_pair;
    const float x1 = *a;
    const float x2 = *b;
    *a = x1 * c[i] - x2 * s[i];
    *b = x2 * c[i] + x1 * s[i];
  }
}

// neox: pair i is (x[i], x[i + nf]); gptj: (x[2i], x[2i + 1]).
void rotate_range(float* x, const float* c, const float* s, int64_t nf, RopeStyle style,
                  int64_t begin) {
  if (style == RopeStyle::neox) {
    rotate_pairs(x, nf, 1, c, s, begin, nf);
  } else {
    rotate_pairs(x, 1, 2, c, s, begin, nf);
  }
}

void rotate_portable(float* x, const float* c, const float* s, int64_t nf, RopeStyle style) {
  rotate_range(x, c, s, nf, style, 0);
}

void copy_portable(const void* src, void* dst, size_t bytes, bool) { std::memcpy(dst, src, bytes); }

void fence_portable() {}

void rope_head_portable(const void* src, DType dtype, const float* w, float offset, float eps,
                        const float* c, const float* s, int64_t nf, RopeStyle style, int64_t n,
                        float* x) {
  load_portable(dtype, src, x, n);
  if (w != nullptr) rms_norm_portable(x, w, offset, eps, n);
  rotate_portable(x, c, s, nf, style);
}

constexpr RopeKernels kPortable{CpuIsa::portable,  load_portable,   store_portable,
                                quantize_portable, copy_portable,   fence_portable,
                                rms_norm_portable, rotate_portable, rope_head_portable};

// --- AVX-512 ---
#if defined(__x86_64__)
#define KV_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

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
    _mm512_mask_storeu_ps(dst + i, m, v);
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
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 v = _mm512_maskz_loadu_ps(m, src + i);
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
  if (dtype != DType::int8) return quantize_portable(src, dtype, dst, n, stream);
  __m512 amax = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_maskz_loadu_ps(tail_mask(n - i), src + i)));
  }
  const float absmax = _mm512_reduce_max_ps(amax);
  // The same float operations as ops::quantize_row: x * (127 / absmax), rounded to nearest even.
  const float inv = absmax > 0.0f ? 127.0f / absmax : 0.0f;
  const __m512 vinv = _mm512_set1_ps(inv);
  auto* out = static_cast<int8_t*>(dst);
  const bool nt = stream && aligned(dst, 16);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 q = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, src + i), vinv);
    const __m512i r = _mm512_cvt_roundps_epi32(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    if (nt && m == 0xffff) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(out + i), _mm512_cvtsepi32_epi8(r));
    } else {
      _mm512_mask_cvtsepi32_storeu_epi8(out + i, m, r);
    }
  }
  return absmax / 127.0f;
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
    _mm512_mask_storeu_ps(x + i, m, _mm512_mul_ps(v, g));
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

constexpr RopeKernels kAvx512{CpuIsa::avx512,  load_avx512,   store_avx512,
                              quantize_avx512, copy_avx512,   fence_avx512,
                              rms_norm_avx512, rotate_avx512, rope_head_avx512};

// Known-answer check of the AVX-512 set against the portable one on fixed rows that exercise the
// vector bodies and the tails: conversions and int8 quantization bit for bit, the float math
// within a few ulps.
bool avx512_self_test() {
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
    kPortable.store(x, d, h1, kN, false);
    kAvx512.store(x, d, h2, kN, true);
    kPortable.load(d, h1, f1, kN);
    kAvx512.load(d, h1, f2, kN);
    if (std::memcmp(h1, h2, sizeof h1) != 0 || std::memcmp(f1, f2, sizeof f1) != 0) return false;
  }
  alignas(64) char c1[200], c2[200];
  for (size_t i = 0; i < sizeof c1; ++i) c1[i] = static_cast<char>(i * 37);
  kAvx512.copy(c1, c2, sizeof c1, true);
  kAvx512.fence();
  if (std::memcmp(c1, c2, sizeof c1) != 0) return false;
  alignas(64) int8_t q1[kN], q2[kN];
  if (kPortable.quantize(x, DType::int8, q1, kN, false) !=
          kAvx512.quantize(x, DType::int8, q2, kN, true) ||
      std::memcmp(q1, q2, sizeof q1) != 0) {
    return false;
  }
  // The fused head: bf16 rows of 64 (the vector path) and 40 (the fallback), normed or not.
  uint16_t h[kN];
  kPortable.store(x, DType::bf16, h, kN, false);
  for (int64_t n : {64, 40}) {
    for (const float* weights :
         {static_cast<const float*>(w), static_cast<const float*>(nullptr)}) {
      float a[kN], b[kN];
      kPortable.rope_head(h, DType::bf16, weights, 1.0f, 1e-6f, c, s, 16, RopeStyle::neox, n, a);
      kAvx512.rope_head(h, DType::bf16, weights, 1.0f, 1e-6f, c, s, 16, RopeStyle::neox, n, b);
      if (!close(b, a, n)) return false;
    }
  }
  for (RopeStyle style : {RopeStyle::neox, RopeStyle::gptj}) {
    float a[kN], b[kN];
    std::memcpy(a, x, sizeof x);
    std::memcpy(b, x, sizeof x);
    kPortable.rms_norm(a, w, 1.0f, 1e-6f, 40);
    kAvx512.rms_norm(b, w, 1.0f, 1e-6f, 40);
    kPortable.rotate(a, c, s, 20, style);
    kAvx512.rotate(b, c, s, 20, style);
    if (!close(b, a, kN)) return false;
  }
  return true;
}
#endif

}  // namespace

const RopeKernels* rope_kernels(CpuIsa isa) {
#if defined(__x86_64__)
  static const bool avx512_ok = cpu_supports(CpuIsa::avx512) && avx512_self_test();
  if ((isa == CpuIsa::avx512 || isa == CpuIsa::best) && avx512_ok) return &kAvx512;
#endif
  if (isa == CpuIsa::portable || isa == CpuIsa::best) return &kPortable;
  return nullptr;
}

// --- the fused write ---

namespace {

struct QkvJob {
  const QkvRopeWriteDesc* desc;
  const ops::RopeTable* table;
  const RopeKernels* k;
  const QkvRopeWriteArgs* args;
  ops::RopeSections sections;
  bool stream;  // outputs too large to stay in cache: non-temporal stores
};

// Past this many output bytes (more than a core's L2) the outputs go around the cache: a prefill
// chunk's K/V and q are read back only later, while a decode step's stay hot for attention.
constexpr double kStreamBytes = 4 << 20;

void qkv_tokens(const QkvJob& job, int64_t begin, int64_t end) {
  const QkvRopeWriteDesc& d = *job.desc;
  const QkvRopeWriteArgs& a = *job.args;
  const RopeKernels& k = *job.k;
  const ops::RopeTable& table = *job.table;
  const KVFormat& f = d.cache.kv;
  const int64_t dim = f.head_dim;
  const int64_t dim_v = f.dim_v();
  const int64_t nf = table.num_freqs;
  const size_t in_size = size_of(d.qkv_dtype);
  const size_t q_size = size_of(d.q_dtype);
  const size_t k_size = size_of(f.k_dtype);
  const size_t v_size = size_of(f.v_dtype);
  const ops::PoolStrides ks = ops::pool_strides(d.cache.pages, f.num_kv_heads, dim);
  const ops::PoolStrides vs = ops::pool_strides(d.cache.pages, f.num_kv_heads, dim_v);
  const ops::PoolStrides ss = ops::pool_strides(d.cache.pages, f.num_kv_heads, 1);
  const int64_t num_tokens = a.qkv.shape[0];
  const float* qw = a.q_norm_weight.data_as<const float>();
  const float* kw = a.k_norm_weight.data_as<const float>();
  float cs[kRopeMaxHeadDim / 2], sn[kRopeMaxHeadDim / 2], x[kRopeMaxHeadDim];
  for (int64_t t = begin; t < end; ++t) {
    for (int st = 0; st < job.sections.num_streams; ++st) {
      const int64_t pos = a.positions[static_cast<size_t>(st * num_tokens + t)];
      for (int64_t i = job.sections.begin[static_cast<size_t>(st)];
           i < job.sections.begin[static_cast<size_t>(st + 1)]; ++i) {
        cs[i] = table.cos[static_cast<size_t>(pos * nf + i)] * table.attention_factor;
        sn[i] = table.sin[static_cast<size_t>(pos * nf + i)] * table.attention_factor;
      }
    }
    const char* row =
        static_cast<const char*>(a.qkv.data) + static_cast<size_t>(t * a.qkv.strides[0]) * in_size;
    auto head_in = [&](int64_t h) { return row + static_cast<size_t>(h * dim) * in_size; };
    char* q_row =
        static_cast<char*>(a.q_out.data) + static_cast<size_t>(t * d.num_q_heads * dim) * q_size;
    for (int64_t h = 0; h < d.num_q_heads; ++h) {
      k.rope_head(head_in(h), d.qkv_dtype, d.qk_norm ? qw : nullptr, d.norm_weight_offset,
                  d.norm_eps, cs, sn, nf, d.rope.style, dim, x);
      k.store(x, d.q_dtype, q_row + static_cast<size_t>(h * dim) * q_size, dim, job.stream);
    }
    const int64_t slot = ops::token_slot(d.cache.pages, a.slots, t);
    const int64_t page = slot / d.cache.pages.page_size;
    const int64_t in_page = slot % d.cache.pages.page_size;
    for (int64_t h = 0; h < f.num_kv_heads; ++h) {
      k.rope_head(head_in(d.num_q_heads + h), d.qkv_dtype, d.qk_norm ? kw : nullptr,
                  d.norm_weight_offset, d.norm_eps, cs, sn, nf, d.rope.style, dim, x);
      const int64_t at = page * ks.page + in_page * ks.slot + h * ks.head;
      void* dst = static_cast<char*>(a.kv.k_pages.data) + static_cast<size_t>(at) * k_size;
      if (is_quantized(f.k_dtype)) {
        a.kv.k_scales.data_as<float>()[page * ss.page + in_page * ss.slot + h * ss.head] =
            k.quantize(x, f.k_dtype, dst, dim, job.stream);
      } else {
        k.store(x, f.k_dtype, dst, dim, job.stream);
      }
    }
    const char* v_in = head_in(d.num_q_heads + f.num_kv_heads);
    for (int64_t h = 0; h < f.num_kv_heads; ++h) {
      const char* src = v_in + static_cast<size_t>(h * dim_v) * in_size;
      const int64_t at = page * vs.page + in_page * vs.slot + h * vs.head;
      void* dst = static_cast<char*>(a.kv.v_pages.data) + static_cast<size_t>(at) * v_size;
      if (f.v_dtype == d.qkv_dtype) {
        k.copy(src, dst, static_cast<size_t>(dim_v) * v_size, job.stream);
        continue;
      }
      k.load(d.qkv_dtype, src, x, dim_v);
      if (is_quantized(f.v_dtype)) {
        a.kv.v_scales.data_as<float>()[page * ss.page + in_page * ss.slot + h * ss.head] =
            k.quantize(x, f.v_dtype, dst, dim_v, job.stream);
      } else {
        k.store(x, f.v_dtype, dst, dim_v, job.stream);
      }
    }
  }
  k.fence();
}

}  // namespace

void qkv_rope_write(const QkvRopeWriteDesc& desc, const ops::RopeTable& table,
                    const RopeKernels& kernels, const QkvRopeWriteArgs& args, ThreadPool* pool) {
  const KVFormat& f = desc.cache.kv;
  const int64_t n = args.qkv.shape[0];
  const double out_bytes =
      static_cast<double>(n) *
      static_cast<double>(desc.num_q_heads * f.head_dim *
                              static_cast<int64_t>(size_of(desc.q_dtype)) +
                          f.num_kv_heads * (f.head_dim * static_cast<int64_t>(size_of(f.k_dtype)) +
                                            f.dim_v() * static_cast<int64_t>(size_of(f.v_dtype))));
  const QkvJob job{&desc,
                   &table,
                   &kernels,
                   &args,
                   ops::rope_sections(desc.rope, table.num_freqs),
                   out_bytes > kStreamBytes};
  if (pool == nullptr || n < 2) {
    qkv_tokens(job, 0, n);
    return;
  }
  // One pointer of capture: std::function keeps it inline (no allocation).
  const QkvJob* j = &job;
  pool->parallel_for(n, [j](int64_t begin, int64_t end) { qkv_tokens(*j, begin, end); });
}

}  // namespace kvcache::cpu
