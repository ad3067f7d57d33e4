// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// The bounds `kvcache bench ops` divides by, measured next to each op call in the same run: how
// fast this machine can read memory (each byte of a large buffer read once, vectorized, on every
// thread of the pool) and copy it (read + write counted). A probe keeps its buffers so that it
// can be measured again before every call: on a shared host the bandwidth drifts 25-49 GB/s
// within a minute. Not thread-safe: one measurement at a time.

#include <cstddef>
#include <cstdint>

#include "kvcache/buffer.h"
#include "kvcache/status.h"
#include "kvcache/thread_pool.h"

namespace kvcache::bench {

struct BandwidthOptions {
  int64_t bytes = int64_t{256} << 20;  // buffer size; >= 256 MiB so no cache holds it
  int passes = 1;                      // timed passes per measurement; the best one counts
};

// Asks the kernel for transparent huge pages over [data, data + bytes) (best effort): fewer TLB
// misses when streaming large buffers. The bounds and the op benchmarks both use it.
void advise_huge_pages(void* data, size_t bytes);

class BandwidthProbe {
 public:
  // Allocates and touches a source and a destination buffer of options.bytes each.
  // resource_exhausted when they cannot be allocated; invalid_argument for bytes < 1 MiB or
  // passes < 1. REQUIRES: pool outlives the probe.
  [[nodiscard]] static Result<BandwidthProbe> create(ThreadPool& pool,
                                                     const BandwidthOptions& options);

  BandwidthProbe(BandwidthProbe&&) noexcept = default;
  BandwidthProbe& operator=(BandwidthProbe&&) noexcept = default;
  BandwidthProbe(const BandwidthProbe&) = delete;
  BandwidthProbe& operator=(const BandwidthProbe&) = delete;

  // Bytes read / s over the best of `passes` passes, each reading every byte of the source once.
  [[nodiscard]] double read_gbps();
  // (Bytes read + bytes written) / s over the best of `passes` memcpy passes.
  [[nodiscard]] double copy_gbps();

 private:
  BandwidthProbe(ThreadPool& pool, const BandwidthOptions& options, Buffer src, Buffer dst);

  ThreadPool* pool_;
  BandwidthOptions options_;
  Buffer src_, dst_;
  uint64_t checksum_ = 0;  // the read passes' sums, kept so the loads are not optimized away
};

}  // namespace kvcache::bench
