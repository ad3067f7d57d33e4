// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// `kvcache bench manager`: the paged block manager's scheduling costs, timed on this CPU.
// Rows: op, n (sequences, tokens or pages the op covers), median_us, p90_us, target_us, repeats.

#include <cstdint>

#include "kvcache/status.h"

#include "bench/report.h"

namespace kvcache::bench {

struct ManagerBenchOptions {
  int64_t repeats = 200;  // timed calls per op (the scheduling step uses repeats / 4)
};

// Runs every manager case; invalid_argument for repeats < 1, or an error a case hit.
[[nodiscard]] Result<Report> run_manager_bench(const ManagerBenchOptions& options);

}  // namespace kvcache::bench
