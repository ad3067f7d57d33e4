// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// The portable attention row loops (attention_kernels.h): plain C++ that the compiler may
// vectorize for the baseline ISA; always built, the oracle the AVX-512 loops are self-tested and
// tested against. Rows convert to float in blocks of kBlock elements.

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kvcache/dtype.h"

#include "backend/cpu/attention_kernels.h"

namespace kvcache::cpu {
namespace {

constexpr int64_t kBlock = 64;  // elements converted at a time

const std::array<float, 256>& fp8_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i)
      t[static_cast<size_t>(i)] = fp8_e4m3_to_float(static_cast<uint8_t>(i));
    return t;
  }();
  return table;
}

// Converts n elements of a row to float.
template <class T>
void load_block(const T* row, int64_t n, float* out) {
  for (int64_t d = 0; d < n; ++d) {
    if constexpr (std::is_same_v<T, float>) {
      out[d] = row[d];
    } else if constexpr (std::is_same_v<T, bf16_t>) {
      const uint32_t bits = static_cast<uint32_t>(row[d].bits) << 16;
      std::memcpy(&out[d], &bits, sizeof(float));
    } else if constexpr (std::is_same_v<T, f16_t>) {
      out[d] = f16_to_float(row[d].bits);
    } else if constexpr (std::is_same_v<T, int8_t>) {
      out[d] = static_cast<float>(row[d]);
    } else {
      out[d] = fp8_table()[row[d].bits];
    }
  }
}

float dot(const float* a, const float* b, int64_t n) {
  float lanes[8] = {};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) {
    for (int j = 0; j < 8; ++j) lanes[j] += a[d + j] * b[d + j];
  }
  float sum = 0.0f;
  for (; d < n; ++d) sum += a[d] * b[d];
  for (float x : lanes) sum += x;
  return sum;
}

template <class T>
void score_portable(const float* q, int64_t group, const KVRows& k, float* s) {
  const int64_t n = k.count;
  float buf[kBlock];
  for (int64_t t = 0; t < n; ++t) {
    const T* row = static_cast<const T*>(k.data) + t * k.stride;
    for (int64_t g = 0; g < group; ++g) s[g * n + t] = 0.0f;
    for (int64_t d0 = 0; d0 < k.dim; d0 += kBlock) {
      const int64_t len = std::min(kBlock, k.dim - d0);
      load_block(row + d0, len, buf);
      for (int64_t g = 0; g < group; ++g) s[g * n + t] += dot(q + g * k.dim + d0, buf, len);
    }
    if (k.scales != nullptr) {
      const float sc = k.scales[t * k.scale_stride];
      for (int64_t g = 0; g < group; ++g) s[g * n + t] *= sc;
    }
  }
}

template <class T>
void accumulate_portable(const float* p, int64_t group, const KVRows& v, float* acc) {
  const int64_t n = v.count;
  float buf[kBlock];
  for (int64_t t = 0; t < n; ++t) {
    const T* row = static_cast<const T*>(v.data) + t * v.stride;
    const float sc = v.scales != nullptr ? v.scales[t * v.scale_stride] : 1.0f;
    for (int64_t d0 = 0; d0 < v.dim; d0 += kBlock) {
      const int64_t len = std::min(kBlock, v.dim - d0);
      load_block(row + d0, len, buf);
      for (int64_t g = 0; g < group; ++g) {
        const float w = p[g * n + t] * sc;
        float* a = acc + g * v.dim + d0;
        for (int64_t d = 0; d < len; ++d) a[d] += w * buf[d];
      }
    }
  }
}

void score_any(const float* q, int64_t group, const KVRows& k, float* s) {
  dispatch_dtype(k.dtype, [&]<class T>(std::type_identity<T>) {
    if constexpr (std::is_same_v<T, double> || std::is_same_v<T, fp8_e5m2_t>) {
      return;  // not a storage dtype: the op refuses it before any loop runs
    } else {
      score_portable<T>(q, group, k, s);
    }
  });
}

void accumulate_any(const float* p, int64_t group, const KVRows& v, float* acc) {
  dispatch_dtype(v.dtype, [&]<class T>(std::type_identity<T>) {
    if constexpr (std::is_same_v<T, double> || std::is_same_v<T, fp8_e5m2_t>) {
      return;
    } else {
      accumulate_portable<T>(p, group, v, acc);
    }
  });
}

}  // namespace

AttentionRowKernels portable_attention_rows() {
  return AttentionRowKernels{score_any, accumulate_any, "portable"};
}

}  // namespace kvcache::cpu
