// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// paged_append on the CPU: per (token, kv head) row, a copy, a conversion or a quantization into
// the slot's row of the pool. Portable rows use dtype.h's scalar conversions; the AVX-512 rows
// reproduce them bit for bit with integer rounding on the float bits (not vcvtneps2bf16, which
// flushes denormals) and quantize with backend/cpu/quantize_avx512.h (shared with the RoPE ops),
// checked by a known-answer self-test before use.

#include <cmath>
#include <cstring>
#include <iterator>
#include <limits>
#include <type_traits>

#include "backend/cpu/append_kernels.h"
#include "backend/cpu/quantize_avx512.h"
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
    for (int64_t i = 0; i < n; ++i) absmax = ops::absmax_step(absmax, load_float(s, i));
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

namespace {

template <class Src, class Dst>
KV_AVX512 float avx512_row(const void* src, int64_t n, void* dst) {
  const auto* s = static_cast<const Src*>(src);
  auto* d = static_cast<Dst*>(dst);
  if constexpr (std::is_same_v<Src, Dst>) {
    std::memcpy(d, s, static_cast<size_t>(n) * sizeof(Src));
    return 0.0f;
  } else if constexpr (kQuantized<Dst>) {
    return q512::quantize_row(s, n, d);
  } else {
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 k = q512::tail_mask(n - i);
      q512::store16(d + i, q512::load16(s + i, k), k);
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

// Deterministic test values: special floats, int8 rounding ties, magnitudes from 2^-30 to 2^20
// with random mantissas, fp8 rounding ties (an LCG, so every process tests the same inputs).
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
      } else if (i < 1280) {  // fp8 ties (code midpoints) next to 448: inv is 1
        const auto code = static_cast<uint8_t>((i * 7) % 0x7e);
        const float v =
            i % 32 == 0
                ? 448.0f
                : (fp8_e4m3_to_float(code) + fp8_e4m3_to_float(static_cast<uint8_t>(code + 1))) *
                      (next() % 2 == 0 ? 0.5f : -0.5f);
        std::memcpy(&bits, &v, sizeof v);
      } else {  // any bit pattern
        bits = next();
      }
      std::memcpy(&f32[i], &bits, sizeof bits);
      const bool exact = i < 512 || (i >= 1024 && i < 1280);  // values an f16 holds
      f16[i] = static_cast<uint16_t>(exact ? float_to_f16(f32[i]) : next() >> 16);
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
