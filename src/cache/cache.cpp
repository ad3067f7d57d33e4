// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "kvcache/cache.h"

#include <atomic>

namespace kvcache {

const char* name(CacheKind kind) {
  switch (kind) {
    case CacheKind::contiguous:
      return "contiguous";
    case CacheKind::rotating:
      return "rotating";
    case CacheKind::recurrent:
      return "recurrent";
  }
  return "unknown";
}

Snapshot::Snapshot(CacheKind kind, uint64_t cache_id, std::vector<int64_t> layout, int64_t begin,
                   int64_t end, std::vector<Buffer> arrays)
    : kind_(kind),
      cache_id_(cache_id),
      layout_(std::move(layout)),
      begin_(begin),
      end_(end),
      arrays_(std::move(arrays)) {}

size_t Snapshot::num_bytes() const {
  size_t n = 0;
  for (const Buffer& b : arrays_) n += b.num_bytes();
  return n;
}

Cache::Cache() {
  static std::atomic<uint64_t> next_id{1};
  id_ = next_id.fetch_add(1, std::memory_order_relaxed);
}

}  // namespace kvcache
