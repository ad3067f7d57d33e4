// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// RoPE: the rotary position embedding configuration the fused write (qkv_rope_write) and the
// context shift (rope_shift) share, and the process-wide cache of its cos/sin tables.
//
// Frequency i (i in [0, rotary_dim / 2)) rotates one pair of a head's first rotary_dim elements by
// the angle position * inv_freq[i], inv_freq[i] = base^(-2i / rotary_dim) adjusted by the scaling:
//  - linear: inv_freq / factor (position interpolation);
//  - llama3: Llama 3.1's wavelength-banded rule (low/high_freq_factor, original_max_position);
//  - yarn: the YaRN ramp between interpolated and extrapolated frequencies (beta_fast, beta_slow,
//    original_max_position), cos and sin multiplied by the attention factor.
// Pairs: neox rotates (x[i], x[i + rotary_dim / 2]); gptj rotates (x[2i], x[2i + 1]). Elements past
// rotary_dim pass through unchanged.
// Multi-section RoPE (Qwen2-VL "mrope"): mrope_section lists up to 4 section sizes in frequency
// pairs (summing to rotary_dim / 2); frequency i uses position stream s when i falls in section s.
// Positions are then [num_sections, num_tokens] (stream-major), else [num_tokens].
//
// Table cache: cos/sin tables [max_position, rotary_dim / 2] (float, computed in double) are built
// once per configuration and kept in a process-wide cache bounded by kRopeTableCacheBudgetBytes:
// plans hold their table, and tables no plan holds are evicted least-recently-used first while the
// total exceeds the budget. The cache is thread-safe. RopeConfig is a value: intentionally
// copyable.

#include <array>
#include <cstdint>
#include <string_view>

#include "kvcache/export.h"
#include "kvcache/status.h"

namespace kvcache {

enum class RopeStyle : uint8_t { neox, gptj };
enum class RopeScaling : uint8_t { none, linear, llama3, yarn };
// "neox", "gptj" / "none", "linear", "llama3", "yarn".
[[nodiscard]] KVCACHE_API const char* name(RopeStyle style);
[[nodiscard]] KVCACHE_API const char* name(RopeScaling scaling);

inline constexpr int kMaxRopeSections = 4;

struct RopeConfig {
  // --- the rotation ---
  int64_t rotary_dim = 0;  // even, <= head_dim; 0 means head_dim
  RopeStyle style = RopeStyle::neox;
  double base = 10000.0;        // theta; > 1
  int64_t max_position = 8192;  // positions lie in [0, max_position); bounds the table
  // --- scaling ---
  RopeScaling scaling = RopeScaling::none;
  double factor = 1.0;                   // linear: > 0; llama3, yarn: >= 1
  double low_freq_factor = 1.0;          // llama3
  double high_freq_factor = 4.0;         // llama3; > low_freq_factor
  int64_t original_max_position = 8192;  // llama3, yarn: the pre-training context
  double beta_fast = 32.0;               // yarn; > beta_slow
  double beta_slow = 1.0;                // yarn; > 0
  double attention_factor = 0.0;         // yarn; 0 means 0.1 * ln(factor) + 1 (YaRN paper)
  // --- multi-section RoPE ---
  // Section sizes in frequency pairs; all zero: one position stream. Non-zero sizes come first.
  std::array<int32_t, kMaxRopeSections> mrope_section{};

  // rotary_dim with 0 resolved to head_dim.
  [[nodiscard]] int64_t rotary_dim_for(int64_t head_dim) const {
    return rotary_dim == 0 ? head_dim : rotary_dim;
  }
  // How many position streams positions holds: the number of sections, or 1.
  [[nodiscard]] int num_position_streams() const {
    int n = 0;
    while (n < kMaxRopeSections && mrope_section[static_cast<size_t>(n)] != 0) ++n;
    return n == 0 ? 1 : n;
  }
};

// Validates a configuration for heads of head_dim: rotary_dim even and in (0, head_dim], base > 1,
// max_position in [1, 2^24], the scaling's parameters in range (see the fields), mrope sections
// non-negative, non-zero ones first, summing to rotary_dim / 2. invalid_argument prefixed with op.
[[nodiscard]] KVCACHE_API Status check_rope_config(const RopeConfig& config, int64_t head_dim,
                                                   std::string_view op);

// --- the table cache ---

inline constexpr size_t kRopeTableCacheBudgetBytes = size_t{256} << 20;

// Counters since process start (hits, misses) and the current contents (entries, bytes).
struct RopeTableCacheStats {
  uint64_t hits = 0;
  uint64_t misses = 0;
  int64_t entries = 0;
  size_t bytes = 0;
};
[[nodiscard]] KVCACHE_API RopeTableCacheStats rope_table_cache_stats();

}  // namespace kvcache
