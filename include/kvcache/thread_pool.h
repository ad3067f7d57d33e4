// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// ThreadPool: a small persistent pool for CPU kernels. parallel_for splits [0, n) into one
// contiguous range per thread, runs one range on the calling thread and blocks until all are
// done. Idle workers spin briefly before sleeping, so back-to-back short regions do not pay a
// wake-up each time. One parallel_for at a time: callers serialize (the pool is owned by one
// stream); num_threads() may be called concurrently.

#include <cstdint>
#include <functional>
#include <memory>

#include "kvcache/export.h"

namespace kvcache {

class KVCACHE_API ThreadPool {
 public:
  // num_threads counts the caller: 1 runs everything inline. REQUIRES: num_threads >= 1.
  explicit ThreadPool(int num_threads);
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;
  ~ThreadPool();

  [[nodiscard]] int num_threads() const;

  // Calls fn(begin, end) over disjoint ranges covering [0, n); fn must not throw.
  void parallel_for(int64_t n, const std::function<void(int64_t begin, int64_t end)>& fn);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvcache
