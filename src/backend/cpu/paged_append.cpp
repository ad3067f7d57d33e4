// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// paged_append on the CPU: per (token, kv head) row, a copy, a conversion or a quantization into
// the slot's row of the pool. Portable rows use dtype.h's scalar conversions; the AVX-512 rows
// reproduce them bit for bit with integer rounding on the float bits (not vcvtneps2bf16, which
// flushes denormals), checked by a known-answer self-test before use.

#include <cmath>
#include <cstring>
#include <iterator>
#include <limits>
#include <type_traits>

#include "backend/cpu/append_kernels.h"
#include "backend/cpu/x86_intrinsics.h"
#include "ops/quantize.h"

namespace kvcache::cpu {
namespace {

// --- portable rows ---

template <class T>
float load_float(const T* p, int64_t i) {
  if constexpr (std::is_same_v<T, float>) {
    return p[i];
  } else if constexpr (std::is_same_v<T, f16_t>) {
    return f16_to_float(p[i].bits);
  } else {
    return bf16_to_float(p[i].bits);
  }
}

template <class Dst>
void store_float(Dst* p, int64_t i, float x) {
  if constexpr (std::is_same_v<Dst, float>) {
    p[i] = x;
  } else if constexpr (std::is_same_v<Dst, f16_t>) {
    p[i] = f16_t{float_to_f16(x)};
  } else if constexpr (std::is_same_v<Dst, bf16_t>) {
    p[i] = bf16_t{float_to_bf16(x)};
  } else if constexpr (std::is_same_v<Dst, int8_t>) {
    p[i] = float_to_int8(x);
  } else {
    p[i] = fp8_e4m3_t{float_to_fp8_e4m3(x, Saturation::finite)};
  }
}

template <class Dst>
constexpr bool kQuantized = std::is_same_v<Dst, int8_t> || std::is_same_v<Dst, fp8_e4m3_t>;
template <class Dst>
constexpr float kQMax = std::is_same_v<Dst, int8_t> ? 127.0f : 448.0f;

// quantize_row's float operations (ops/quantize.h) on a row read through load_float, so no
// float copy of the row is needed.
template <class Src, class Dst>
float portable_row(const void* src, int64_t n, void* dst) {
  const auto* s = static_cast<const Src*>(src);
  auto* d = static_cast<Dst*>(dst);
  if constexpr (std::is_same_v<Src, Dst>) {
    std::memcpy(d, s, static_cast<size_t>(n) * sizeof(Src));
    return 0.0f;
  } else if constexpr (kQuantized<Dst>) {
    float absmax = 0.0f;
    for (int64_t i = 0; i < n; ++i) absmax = std::fmax(absmax, std::fabs(load_float(s, i)));
    const float inv = absmax > 0.0f ? kQMax<Dst> / absmax : 0.0f;
    for (int64_t i = 0; i < n; ++i) store_float(d, i, load_float(s, i) * inv);
    return absmax / kQMax<Dst>;
  } else {
    for (int64_t i = 0; i < n; ++i) store_float(d, i, load_float(s, i));
    return 0.0f;
  }
}

// Calls f(std::type_identity<Src>{}, std::type_identity<Dst>{}) for the storage types of a
// supported (source, storage) pair.
template <class F>
WriteRowFn pick(DType src, DType dst, F&& f) {
  auto with_src = [&]<class Src>(std::type_identity<Src>) -> WriteRowFn {
    switch (dst) {
      case DType::f32:
        return f(std::type_identity<Src>{}, std::type_identity<float>{});
      case DType::f16:
        return f(std::type_identity<Src>{}, std::type_identity<f16_t>{});
      case DType::bf16:
        return f(std::type_identity<Src>{}, std::type_identity<bf16_t>{});
      case DType::int8:
        return f(std::type_identity<Src>{}, std::type_identity<int8_t>{});
      default:
        return f(std::type_identity<Src>{}, std::type_identity<fp8_e4m3_t>{});
    }
  };
  if (src == DType::f16) return with_src(std::type_identity<f16_t>{});
  if (src == DType::bf16) return with_src(std::type_identity<bf16_t>{});
  return with_src(std::type_identity<float>{});
}

}  // namespace

WriteRowFn portable_write_row(DType src, DType dst) {
  return pick(src, dst, []<class S, class D>(std::type_identity<S>, std::type_identity<D>) {
    return &portable_row<S, D>;
  });
}

// --- AVX-512 rows ---

#if defined(__x86_64__)
#define KV_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

namespace {

KV_AVX512 inline __m512i splat(uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); }

// Lanes holding a NaN (float bits with the sign cleared above the infinity pattern).
KV_AVX512 inline __mmask16 nan_lanes(__m512i bits) {
  return _mm512_cmpgt_epu32_mask(_mm512_and_si512(bits, splat(0x7fffffffu)), splat(0x7f800000u));
}

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

KV_AVX512 inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
// Round to nearest even on the bits (overflow carries into inf); NaN -> sign | 0x7fc0.
KV_AVX512 inline void store16(bf16_t* p, __m512 v, __mmask16 m) {
  const __m512i x = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), splat(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(x, splat(0x7fffu)), lsb), 16);
  const __m512i qnan = _mm512_or_si512(
      _mm512_srli_epi32(_mm512_and_si512(x, splat(0x80000000u)), 16), splat(0x7fc0u));
  r = _mm512_mask_mov_epi32(r, nan_lanes(x), qnan);
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
}
// The hardware conversion rounds to nearest even with IEEE subnormals and overflow to inf, as
// float_to_f16 does; only its NaN payloads differ: NaN -> sign | 0x7e00.
KV_AVX512 inline void store16(f16_t* p, __m512 v, __mmask16 m) {
  const __m512i x = _mm512_castps_si512(v);
  const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512i qnan = _mm512_or_si512(
      _mm512_srli_epi32(_mm512_and_si512(x, splat(0x80000000u)), 16), splat(0x7e00u));
  const __m256i r = _mm256_mask_mov_epi16(h, nan_lanes(x), _mm512_cvtepi32_epi16(qnan));
  _mm256_mask_storeu_epi16(p, m, r);
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
// float_to_fp8_e4m3 with Saturation::finite. Normal results (|x| >= 2^-6): round the float bits
// to 3 mantissa bits and rebias the exponent (127 - 7); subnormals (step 2^-9): add 2^14, whose
// ulp is 2^-9, and read the count of steps off the low bits. Then clamp to 448 (0x7e), NaN 0x7f.
KV_AVX512 inline void store16(fp8_e4m3_t* p, __m512 v, __mmask16 m) {
  const __m512i x = _mm512_castps_si512(v);
  const __m512i abs = _mm512_and_si512(x, splat(0x7fffffffu));
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(abs, 20), splat(1));
  const __m512i normal = _mm512_sub_epi32(
      _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(abs, splat(0x7ffffu)), lsb), 20),
      splat(120u << 3));
  const __m512 magic = _mm512_set1_ps(16384.0f);
  const __m512 shifted = _mm512_add_round_ps(_mm512_castsi512_ps(abs), magic,
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512i sub = _mm512_sub_epi32(_mm512_castps_si512(shifted), _mm512_castps_si512(magic));
  const __mmask16 is_sub = _mm512_cmplt_epu32_mask(abs, splat(0x3c800000u));  // 2^-6
  __m512i r = _mm512_min_epu32(_mm512_mask_mov_epi32(normal, is_sub, sub), splat(0x7eu));
  r = _mm512_mask_mov_epi32(r, nan_lanes(x), splat(0x7fu));
  r = _mm512_or_si512(r, _mm512_srli_epi32(_mm512_and_si512(x, splat(0x80000000u)), 24));
  store_bytes(p, _mm512_cvtepi32_epi8(r), m);
}

KV_AVX512 inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xffff)
                    : static_cast<__mmask16>((1u << static_cast<unsigned>(left)) - 1u);
}

// bf16 without the NaN quieting of load16, for uses where a NaN's payload cannot show.
KV_AVX512 inline __m512 load16_raw(const bf16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
template <class T>
KV_AVX512 inline __m512 load16_raw(const T* p, __mmask16 m) {
  return load16(p, m);
}

// ops::row_absmax of a row, on the bit patterns: with the sign cleared, the patterns of non-NaN
// values order as their magnitudes, so an unsigned max over them (NaN lanes dropped, as fmax drops
// a quiet NaN) gives the same float. NaN for an f32 row holding a signaling NaN, on which glibc's
// fmax returns NaN and the rule's result depends on the order: the caller takes the portable loop.
KV_AVX512 inline float row_absmax_avx512(const float* s, int64_t n) {
  __m512i m = _mm512_setzero_si512();
  __mmask16 signaling = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __m512i a = _mm512_and_si512(
        _mm512_castps_si512(_mm512_maskz_loadu_ps(tail_mask(n - i), s + i)), splat(0x7fffffffu));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(a, splat(0x7f800000u));
    signaling =
        static_cast<__mmask16>(signaling | (nan & _mm512_cmplt_epu32_mask(a, splat(0x7fc00000u))));
    m = _mm512_max_epu32(m, _mm512_maskz_mov_epi32(static_cast<__mmask16>(~nan), a));
  }
  if (signaling != 0) return std::numeric_limits<float>::quiet_NaN();
  const uint32_t bits = _mm512_reduce_max_epu32(m);
  float absmax;
  std::memcpy(&absmax, &bits, sizeof absmax);
  return absmax;
}
// f16 and bf16: 32 patterns per vector; NaN is above 0x7c00 (f16) or 0x7f80 (bf16).
template <class T>
KV_AVX512 inline float row_absmax_avx512(const T* s, int64_t n) {
  constexpr uint16_t kInf = std::is_same_v<T, f16_t> ? 0x7c00 : 0x7f80;
  const __m512i magnitude = _mm512_set1_epi16(0x7fff);
  const __m512i inf = _mm512_set1_epi16(static_cast<short>(kInf));
  __m512i m = _mm512_setzero_si512();
  for (int64_t i = 0; i < n; i += 32) {
    const __mmask32 k = n - i >= 32
                            ? ~__mmask32{0}
                            : static_cast<__mmask32>((1u << static_cast<unsigned>(n - i)) - 1u);
    const __m512i a = _mm512_and_si512(_mm512_maskz_loadu_epi16(k, s + i), magnitude);
    m = _mm512_max_epu16(m, _mm512_maskz_mov_epi16(~_mm512_cmpgt_epu16_mask(a, inf), a));
  }
  m = _mm512_max_epu32(_mm512_and_si512(m, splat(0xffffu)), _mm512_srli_epi32(m, 16));
  const uint32_t bits = _mm512_reduce_max_epu32(m);  // not NaN: converts exactly
  if constexpr (std::is_same_v<T, f16_t>) {
    return _mm512_cvtss_f32(_mm512_cvtph_ps(_mm256_set1_epi16(static_cast<short>(bits))));
  }
  const uint32_t wide = bits << 16;
  float absmax;
  std::memcpy(&absmax, &wide, sizeof absmax);
  return absmax;
}

template <class Src, class Dst>
KV_AVX512 float avx512_row(const void* src, int64_t n, void* dst) {
  const auto* s = static_cast<const Src*>(src);
  auto* d = static_cast<Dst*>(dst);
  if constexpr (std::is_same_v<Src, Dst>) {
    std::memcpy(d, s, static_cast<size_t>(n) * sizeof(Src));
    return 0.0f;
  } else if constexpr (kQuantized<Dst>) {
    const float absmax = row_absmax_avx512(s, n);
    if (std::isnan(absmax)) return portable_row<Src, Dst>(src, n, dst);
    const float inv = absmax > 0.0f ? kQMax<Dst> / absmax : 0.0f;
    const __m512 vinv = _mm512_set1_ps(inv);
    // NaN lanes need no quieting here: NaN * inv is a NaN of the same sign either way.
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 k = tail_mask(n - i);
      store16(d + i, _mm512_mul_ps(load16_raw(s + i, k), vinv), k);
    }
    return absmax / kQMax<Dst>;
  } else {
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 k = tail_mask(n - i);
      store16(d + i, load16(s + i, k), k);
    }
    return 0.0f;
  }
}

}  // namespace

WriteRowFn avx512_write_row(DType src, DType dst) {
  return pick(src, dst, []<class S, class D>(std::type_identity<S>, std::type_identity<D>) {
    return &avx512_row<S, D>;
  });
}

#else

WriteRowFn avx512_write_row(DType src, DType dst) { return portable_write_row(src, dst); }

#endif

// --- self-test ---

namespace {

// Deterministic test values: special floats, fp8 / int8 rounding ties, and magnitudes from 2^-30
// to 2^20 with random mantissas (an LCG, so every process tests the same inputs).
struct SelfTestInput {
  static constexpr int kN = 1536;
  float f32[kN];
  uint16_t f16[kN];
  uint16_t bf16[kN];

  SelfTestInput() {
    const uint32_t specials[] = {0x00000000u, 0x80000000u, 0x00000001u, 0x807fffffu, 0x00400000u,
                                 0x7f800000u, 0xff800000u, 0x7fc00000u, 0xffc12345u, 0x7f7fffffu,
                                 0x477fe000u, 0x477ff000u, 0x47800000u, 0x3f808000u, 0x3f818000u,
                                 0x3c800000u, 0x3c7fffffu, 0x43e00000u, 0x43e80000u, 0x43f00000u,
                                 0x33800000u, 0x33000000u, 0x387fc000u, 0xb3c00000u};
    uint32_t state = 0x2545f491u;
    auto next = [&state] {
      state = state * 1664525u + 1013904223u;
      return state;
    };
    for (int i = 0; i < kN; ++i) {
      uint32_t bits = 0;
      if (i < static_cast<int>(std::size(specials))) {
        bits = specials[i];
      } else if (i < 512) {  // ties for int8 (k + 0.5) next to 127, so that inv is exactly 1
        const float v = i % 64 == 0 ? 127.0f : static_cast<float>(i % 255) - 127.5f;
        std::memcpy(&bits, &v, sizeof v);
      } else if (i < 1024) {  // magnitudes 2^-30 .. 2^20, random mantissa and sign
        bits = (next() & 0x807fffffu) | ((97u + next() % 51u) << 23);
      } else {  // any bit pattern
        bits = next();
      }
      std::memcpy(&f32[i], &bits, sizeof bits);
      f16[i] = static_cast<uint16_t>(i < 512 ? float_to_f16(f32[i]) : next() >> 16);
      bf16[i] = static_cast<uint16_t>(bits >> 16);
    }
  }
};

bool rows_agree(DType src_dtype, DType dst_dtype, const SelfTestInput& in) {
  const WriteRowFn fast = avx512_write_row(src_dtype, dst_dtype);
  const WriteRowFn slow = portable_write_row(src_dtype, dst_dtype);
  const void* src = src_dtype == DType::f32   ? static_cast<const void*>(in.f32)
                    : src_dtype == DType::f16 ? static_cast<const void*>(in.f16)
                                              : static_cast<const void*>(in.bf16);
  const size_t in_size = size_of(src_dtype);
  alignas(64) unsigned char a[SelfTestInput::kN * 4];
  alignas(64) unsigned char b[SelfTestInput::kN * 4];
  for (int64_t n : {1, 15, 16, 17, 61, 128, 200}) {
    for (int64_t start = 0; start + n <= SelfTestInput::kN; start += n) {
      std::memset(a, 0x5a, sizeof a);
      std::memset(b, 0x5a, sizeof b);
      const void* row =
          static_cast<const unsigned char*>(src) + static_cast<size_t>(start) * in_size;
      const float sa = fast(row, n, a);
      const float sb = slow(row, n, b);
      if (std::memcmp(a, b, sizeof a) != 0 || std::memcmp(&sa, &sb, sizeof sa) != 0) return false;
    }
  }
  return true;
}

}  // namespace

bool avx512_write_row_self_test() {
  static const bool passed = [] {
    if (!cpu_supports(CpuIsa::avx512)) return false;
    const SelfTestInput in;
    for (DType s : {DType::f32, DType::f16, DType::bf16}) {
      for (DType d : {DType::f32, DType::f16, DType::bf16, DType::int8, DType::fp8_e4m3}) {
        if (!rows_agree(s, d, in)) return false;
      }
    }
    return true;
  }();
  return passed;
}

// --- the driver ---

namespace {

// Token i's rows of one side (K or V) into slot `in_page` of `page`.
void write_token(const PagedAppendSide& s, WriteRowFn fn, int64_t heads, int64_t i, int64_t page,
                 int64_t in_page) {
  const auto in_size = static_cast<int64_t>(size_of(s.src_dtype));
  const auto out_size = static_cast<int64_t>(size_of(s.dtype));
  const std::byte* src = s.src + i * heads * s.dim * in_size;
  std::byte* token = s.pool + (page * s.strides.page + in_page * s.strides.slot) * out_size;
  if (s.src_dtype == s.dtype && s.strides.head == s.dim) {  // the token's heads are one block
    std::memcpy(token, src, static_cast<size_t>(heads * s.dim * in_size));
    return;
  }
  for (int64_t h = 0; h < heads; ++h) {
    const float scale = fn(src + h * s.dim * in_size, s.dim, token + h * s.strides.head * out_size);
    if (s.scales != nullptr) {
      s.scales[page * s.scale_strides.page + in_page * s.scale_strides.slot +
               h * s.scale_strides.head] = scale;
    }
  }
}

constexpr int64_t kMinRowsToSpread = 64;  // below this, waking the pool costs more than it saves

}  // namespace

void paged_append(const PagedAppendParams& p, bool avx512, ThreadPool* pool) {
  const WriteRowFn k_fn = avx512 ? avx512_write_row(p.k.src_dtype, p.k.dtype)
                                 : portable_write_row(p.k.src_dtype, p.k.dtype);
  const WriteRowFn v_fn = avx512 ? avx512_write_row(p.v.src_dtype, p.v.dtype)
                                 : portable_write_row(p.v.src_dtype, p.v.dtype);
  auto work = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t slot = ops::token_slot(p.pages, p.slots, i);
      const int64_t page = slot / p.pages.page_size;
      const int64_t in_page = slot % p.pages.page_size;
      write_token(p.k, k_fn, p.num_kv_heads, i, page, in_page);
      write_token(p.v, v_fn, p.num_kv_heads, i, page, in_page);
    }
  };
  if (pool != nullptr && p.num_tokens * p.num_kv_heads >= kMinRowsToSpread) {
    pool->parallel_for(p.num_tokens, work);
  } else {
    work(0, p.num_tokens);
  }
}

}  // namespace kvcache::cpu
