// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// The bounds `kvcache bench ops` divides by, measured in the same run as the ops: how fast this
// machine can read memory (each byte of a large buffer read once, vectorized, on every thread of
// the pool) and copy it (read + write counted). Not thread-safe: one measurement at a time.

#include <cstddef>
#include <cstdint>

#include "kvcache/status.h"
#include "kvcache/thread_pool.h"

namespace kvcache::bench {

struct BandwidthOptions {
  int64_t bytes = int64_t{512} << 20;  // buffer size; >= 256 MiB so no cache holds it
  int passes = 7;                      // timed passes; the best one counts (the bound)
};

struct Bandwidth {
  double read_gbps = 0.0;  // bytes read / s
  double copy_gbps = 0.0;  // (bytes read + bytes written) / s
  const char* read_isa = "portable";
};

// Asks the kernel for transparent huge pages over [data, data + bytes) (best effort): fewer TLB
// misses when streaming large buffers. The bounds and the op benchmarks both use it.
void advise_huge_pages(void* data, size_t bytes);

// Measures both bounds with the pool's threads. resource_exhausted when the buffers cannot be
// allocated; invalid_argument for bytes < 1 MiB or passes < 1.
[[nodiscard]] Result<Bandwidth> measure_bandwidth(ThreadPool& pool,
                                                  const BandwidthOptions& options);

}  // namespace kvcache::bench
