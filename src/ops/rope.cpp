// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// RopeConfig checks, the inverse frequencies of every scaling (Hugging Face / vLLM formulas), and
// the process-wide table cache.

#include "kvcache/rope.h"

#include <algorithm>
#include <cmath>
#include <list>
#include <mutex>
#include <new>
#include <numbers>
#include <string>

#include "backend/cuda_write_ops.h"
#include "ops/rope_table.h"

namespace kvcache {
namespace {

constexpr int64_t kMaxRopePosition = int64_t{1} << 24;

std::string str(double v) {
  std::string s = std::to_string(v);
  s.erase(s.find_last_not_of('0') + 1);
  if (!s.empty() && s.back() == '.') s.pop_back();
  return s;
}
std::string str(int64_t v) { return std::to_string(v); }

Status bad(std::string_view op, const std::string& what) {
  return Status::invalid_argument(std::string(op) + ": " + what);
}

// x > lo (finite).
bool above(double x, double lo) { return std::isfinite(x) && x > lo; }

Status check_scaling(const RopeConfig& c, std::string_view op) {
  const std::string s = std::string("rope ") + name(c.scaling) + " ";
  switch (c.scaling) {
    case RopeScaling::none:
      return Status();
    case RopeScaling::linear:
      if (!above(c.factor, 0.0))
        return bad(op, s + "factor is " + str(c.factor) + ", expected > 0");
      return Status();
    case RopeScaling::llama3:
      if (!(above(c.factor, 0.0) && c.factor >= 1.0)) {
        return bad(op, s + "factor is " + str(c.factor) + ", expected >= 1");
      }
      if (!above(c.low_freq_factor, 0.0)) {
        return bad(op, s + "low_freq_factor is " + str(c.low_freq_factor) + ", expected > 0");
      }
      if (!above(c.high_freq_factor, c.low_freq_factor)) {
        return bad(op, s + "high_freq_factor is " + str(c.high_freq_factor) +
                           ", expected > low_freq_factor (" + str(c.low_freq_factor) + ")");
      }
      break;
    case RopeScaling::yarn:
      if (!(above(c.factor, 0.0) && c.factor >= 1.0)) {
        return bad(op, s + "factor is " + str(c.factor) + ", expected >= 1");
      }
      if (!above(c.beta_slow, 0.0)) {
        return bad(op, s + "beta_slow is " + str(c.beta_slow) + ", expected > 0");
      }
      if (!above(c.beta_fast, c.beta_slow)) {
        return bad(op, s + "beta_fast is " + str(c.beta_fast) + ", expected > beta_slow (" +
                           str(c.beta_slow) + ")");
      }
      if (!(std::isfinite(c.attention_factor) && c.attention_factor >= 0.0)) {
        return bad(op, s + "attention_factor is " + str(c.attention_factor) +
                           ", expected >= 0 (0 for 0.1 * ln(factor) + 1)");
      }
      break;
  }
  if (c.original_max_position <= 0) {
    return bad(op,
               s + "original_max_position is " + str(c.original_max_position) + ", expected > 0");
  }
  return Status();
}

}  // namespace

const char* name(RopeStyle style) { return style == RopeStyle::neox ? "neox" : "gptj"; }

const char* name(RopeScaling scaling) {
  switch (scaling) {
    case RopeScaling::none:
      return "none";
    case RopeScaling::linear:
      return "linear";
    case RopeScaling::llama3:
      return "llama3";
    case RopeScaling::yarn:
      return "yarn";
  }
  return "?";
}

Status check_rope_config(const RopeConfig& c, int64_t head_dim, std::string_view op) {
  const int64_t rd = c.rotary_dim_for(head_dim);
  if (rd <= 0 || rd > head_dim || rd % 2 != 0) {
    return bad(op, "rope rotary_dim is " + str(c.rotary_dim) +
                       ", expected even and in (0, head_dim = " + str(head_dim) +
                       "] (0 for head_dim)");
  }
  if (c.style != RopeStyle::neox && c.style != RopeStyle::gptj) {
    return bad(op, "rope style is " + str(int64_t{static_cast<uint8_t>(c.style)}) +
                       ", expected neox or gptj");
  }
  if (!above(c.base, 1.0)) return bad(op, "rope base is " + str(c.base) + ", expected > 1");
  if (c.max_position < 1 || c.max_position > kMaxRopePosition) {
    return bad(op, "rope max_position is " + str(c.max_position) + ", expected in [1, " +
                       str(kMaxRopePosition) + "]");
  }
  if (Status s = check_scaling(c, op); !s.ok()) return s;
  int64_t sum = 0;
  bool ended = false;
  for (int s = 0; s < kMaxRopeSections; ++s) {
    const int64_t n = c.mrope_section[static_cast<size_t>(s)];
    if (n < 0 || (ended && n != 0)) {
      return bad(op, "rope mrope_section[" + str(int64_t{s}) + "] is " + str(n) +
                         ", expected >= 0 with the non-zero sections first");
    }
    ended = ended || n == 0;
    sum += n;
  }
  if (sum != 0 && sum != rd / 2) {
    return bad(op, "rope mrope_section sums to " + str(sum) +
                       ", expected rotary_dim / 2 = " + str(rd / 2) + " (or all zero)");
  }
  return Status();
}

namespace ops {

std::vector<double> rope_inv_freq(const RopeConfig& c, int64_t rotary_dim) {
  const int64_t n = rotary_dim / 2;
  const double dim = static_cast<double>(rotary_dim);
  std::vector<double> inv(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    inv[static_cast<size_t>(i)] = 1.0 / std::pow(c.base, static_cast<double>(2 * i) / dim);
  }
  const double orig = static_cast<double>(c.original_max_position);
  constexpr double kTwoPi = 2.0 * std::numbers::pi;
  if (c.scaling == RopeScaling::linear) {
    for (double& f : inv) f /= c.factor;
  } else if (c.scaling == RopeScaling::llama3) {
    // Wavelengths shorter than orig / high_freq_factor keep their frequency, longer than
    // orig / low_freq_factor are divided by factor, and the band between is interpolated.
    const double low_wavelen = orig / c.low_freq_factor;
    const double high_wavelen = orig / c.high_freq_factor;
    for (double& f : inv) {
      const double wavelen = kTwoPi / f;
      if (wavelen < high_wavelen) continue;
      if (wavelen > low_wavelen) {
        f /= c.factor;
        continue;
      }
      const double smooth =
          (orig / wavelen - c.low_freq_factor) / (c.high_freq_factor - c.low_freq_factor);
      f = (1.0 - smooth) * f / c.factor + smooth * f;
    }
  } else if (c.scaling == RopeScaling::yarn) {
    // The dimension index at which a frequency turns num_rotations times over orig positions.
    auto correction_dim = [&](double num_rotations) {
      return dim * std::log(orig / (num_rotations * kTwoPi)) / (2.0 * std::log(c.base));
    };
    const double low = std::max(std::floor(correction_dim(c.beta_fast)), 0.0);
    double high = std::min(std::ceil(correction_dim(c.beta_slow)), dim - 1.0);
    if (low == high) high += 0.001;
    for (int64_t i = 0; i < n; ++i) {
      const double ramp = std::clamp((static_cast<double>(i) - low) / (high - low), 0.0, 1.0);
      const double extrapolation = 1.0 - ramp;  // weight of the unscaled frequency
      double& f = inv[static_cast<size_t>(i)];
      f = f / c.factor * (1.0 - extrapolation) + f * extrapolation;
    }
  }
  return inv;
}

double rope_attention_factor(const RopeConfig& c) {
  if (c.scaling != RopeScaling::yarn) return 1.0;
  if (c.attention_factor != 0.0) return c.attention_factor;
  return c.factor <= 1.0 ? 1.0 : 0.1 * std::log(c.factor) + 1.0;
}

RopeSections rope_sections(const RopeConfig& config, int64_t num_freqs) {
  RopeSections out;
  out.num_streams = config.num_position_streams();
  if (config.mrope_section[0] == 0) {
    out.begin[1] = num_freqs;
    return out;
  }
  for (int s = 0; s < out.num_streams; ++s) {
    out.begin[static_cast<size_t>(s + 1)] =
        out.begin[static_cast<size_t>(s)] + config.mrope_section[static_cast<size_t>(s)];
  }
  return out;
}

namespace {

// What a table depends on: unused scaling parameters are zeroed so equal tables share a key.
struct TableKey {
  int64_t rotary_dim = 0;
  int64_t max_position = 0;
  double base = 0.0;
  RopeScaling scaling = RopeScaling::none;
  double factor = 0.0;
  double low_freq_factor = 0.0;
  double high_freq_factor = 0.0;
  int64_t original_max_position = 0;
  double beta_fast = 0.0;
  double beta_slow = 0.0;
  double attention_factor = 0.0;
  bool operator==(const TableKey&) const = default;
};

TableKey key_of(const RopeConfig& c, int64_t rotary_dim) {
  TableKey k;
  k.rotary_dim = rotary_dim;
  k.max_position = c.max_position;
  k.base = c.base;
  k.scaling = c.scaling;
  if (c.scaling == RopeScaling::none) return k;
  k.factor = c.factor;
  if (c.scaling == RopeScaling::linear) return k;
  k.original_max_position = c.original_max_position;
  if (c.scaling == RopeScaling::llama3) {
    k.low_freq_factor = c.low_freq_factor;
    k.high_freq_factor = c.high_freq_factor;
  } else {
    k.beta_fast = c.beta_fast;
    k.beta_slow = c.beta_slow;
    k.attention_factor = rope_attention_factor(c);
  }
  return k;
}

struct Entry {
  TableKey key;
  std::shared_ptr<const RopeTable> table;
};

// Most recently used first. Guarded by mu.
struct TableCache {
  std::mutex mu;
  std::list<Entry> entries;
  size_t bytes = 0;
  uint64_t hits = 0;
  uint64_t misses = 0;
};

TableCache& table_cache() {
  static TableCache* cache = new TableCache();  // never destroyed: plans may outlive statics
  return *cache;
}

std::shared_ptr<const RopeTable> build_table(const RopeConfig& c, int64_t rotary_dim) {
  auto t = std::make_shared<RopeTable>();
  t->max_position = c.max_position;
  t->num_freqs = rotary_dim / 2;
  t->attention_factor = static_cast<float>(rope_attention_factor(c));
  t->inv_freq = rope_inv_freq(c, rotary_dim);
  const size_t n = static_cast<size_t>(t->max_position * t->num_freqs);
  t->cos.resize(n);
  t->sin.resize(n);
  for (int64_t p = 0; p < t->max_position; ++p) {
    for (int64_t i = 0; i < t->num_freqs; ++i) {
      const double angle = static_cast<double>(p) * t->inv_freq[static_cast<size_t>(i)];
      const size_t at = static_cast<size_t>(p * t->num_freqs + i);
      t->cos[at] = static_cast<float>(std::cos(angle));
      t->sin[at] = static_cast<float>(std::sin(angle));
    }
  }
  return t;
}

// Evicts tables no plan holds (the cache's reference is the only one), least recently used
// first, while the total exceeds the budget. REQUIRES: cache.mu held.
void evict_over_budget(TableCache& cache) {
  for (auto it = cache.entries.end();
       cache.bytes > kRopeTableCacheBudgetBytes && it != cache.entries.begin();) {
    --it;
    if (it->table.use_count() != 1) continue;
    cache.bytes -= it->table->bytes();
    it = cache.entries.erase(it);
  }
}

}  // namespace

Result<std::shared_ptr<const RopeTable>> acquire_rope_table(const RopeConfig& config,
                                                            int64_t rotary_dim) {
  const TableKey key = key_of(config, rotary_dim);
  TableCache& cache = table_cache();
  {
    std::lock_guard<std::mutex> lock(cache.mu);
    for (auto it = cache.entries.begin(); it != cache.entries.end(); ++it) {
      if (it->key == key) {
        ++cache.hits;
        cache.entries.splice(cache.entries.begin(), cache.entries, it);
        return cache.entries.front().table;
      }
    }
  }
  // Built outside the lock: two threads missing at once both build; the second insert finds the
  // first and keeps it.
  std::shared_ptr<const RopeTable> table;
  try {
    table = build_table(config, rotary_dim);
  } catch (const std::bad_alloc&) {
    return Status::resource_exhausted("rope: a table of " + str(config.max_position) + " x " +
                                      str(rotary_dim / 2) +
                                      " cos/sin pairs cannot be allocated, expected a smaller "
                                      "max_position");
  }
  std::lock_guard<std::mutex> lock(cache.mu);
  ++cache.misses;
  for (const Entry& e : cache.entries) {
    if (e.key == key) return e.table;
  }
  cache.entries.push_front(Entry{key, table});
  cache.bytes += table->bytes();
  evict_over_budget(cache);
  return table;
}

Result<CudaRopePlanParts> acquire_cuda_rope(const RopeConfig& config, int64_t rotary_dim,
                                            Device device, std::string_view op,
                                            bool with_attention_factor) {
  CudaRopePlanParts parts;
  Result<void*> errors = backend::cuda_write_error_record(device, op);
  if (!errors.ok()) return errors.status();
  parts.errors = *errors;
  Result<std::shared_ptr<const RopeTable>> table = acquire_rope_table(config, rotary_dim);
  if (!table.ok()) return table.status();
  parts.table = *table;
  Result<std::shared_ptr<const backend::CudaRopeTable>> uploaded =
      backend::cuda_rope_table(std::move(*table), device, op, with_attention_factor);
  if (!uploaded.ok()) return uploaded.status();
  parts.cuda_table = std::move(*uploaded);
  return parts;
}

Status check_rope_positions(const RopeConfig& config, std::span<const int32_t> positions,
                            int64_t num_tokens, std::string_view op) {
  const int64_t streams = config.num_position_streams();
  const int64_t expected = streams * num_tokens;
  if (static_cast<int64_t>(positions.size()) != expected) {
    return bad(
        op, "positions has " + str(static_cast<int64_t>(positions.size())) + " entries, expected " +
                (streams == 1
                     ? "num_tokens = " + str(num_tokens)
                     : "num_sections * num_tokens = " + str(streams) + " * " + str(num_tokens)));
  }
  for (size_t i = 0; i < positions.size(); ++i) {
    if (positions[i] < 0 || positions[i] >= config.max_position) {
      return Status::out_of_range(std::string(op) + ": positions[" + std::to_string(i) + "] is " +
                                  str(int64_t{positions[i]}) + ", expected in [0, max_position = " +
                                  str(config.max_position) + ")");
    }
  }
  return Status();
}

}  // namespace ops

RopeTableCacheStats rope_table_cache_stats() {
  ops::TableCache& cache = ops::table_cache();
  std::lock_guard<std::mutex> lock(cache.mu);
  RopeTableCacheStats s;
  s.hits = cache.hits;
  s.misses = cache.misses;
  s.entries = static_cast<int64_t>(cache.entries.size());
  s.bytes = cache.bytes;
  return s;
}

}  // namespace kvcache
