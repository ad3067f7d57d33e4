// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// `kvcache bench ops`: every op over a fixed matrix of shapes and dtypes (Llama-3-8B heads: 32 q /
// 8 kv, head_dim 128; pages of 16), timed on this machine and set against a bound measured
// between its calls (one pass before each call; the median of those passes): the read bandwidth
// for attention (K/V read once), the copy bandwidth (read + write) for appends, writes and copies.
// Rows: op, shape, dtype, sku, timing, median_us, gbps, bound_gbps, bound_kind, fraction
// (docs/CLI.md).

#include <cstdint>
#include <string>

#include "kvcache/device.h"
#include "kvcache/status.h"

#include "bench/report.h"

namespace kvcache::bench {

struct OpsBenchOptions {
  Device device = Device::cpu();
  int64_t repeats = 10;  // timed calls per case (after 2 warm-up calls), each after a bound pass
  int threads = 0;       // CPU threads; 0: every core
  bool quick = false;    // small shapes only (a smoke test of every case, seconds)
  std::string filter;    // only the cases whose op, shape or dtype contains it (empty: all)
};

// Whether a case with these names passes options.filter.
[[nodiscard]] bool case_selected(const OpsBenchOptions& options, const std::string& op,
                                 const std::string& shape, const std::string& dtype);

// invalid_argument for repeats < 1 or threads < 0; unavailable for a device with no backend yet
// (cuda: issue 5); otherwise the first error an op returned.
[[nodiscard]] Result<Report> run_ops_bench(const OpsBenchOptions& options);

}  // namespace kvcache::bench
