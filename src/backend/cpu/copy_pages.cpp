// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// copy_pages on the CPU: a page is one contiguous block in every pool (the page axis is outermost
// in both layouts), so each copy is one memcpy per pool.

#include <cstring>

#include "backend/cpu/append_kernels.h"

namespace kvcache::cpu {

void copy_pages(const CopyPagesParams& p, ThreadPool* pool) {
  const auto count = static_cast<int64_t>(p.src.size());
  auto work = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t from = p.src[static_cast<size_t>(i)];
      const int64_t to = p.dst[static_cast<size_t>(i)];
      for (int a = 0; a < 4; ++a) {
        if (p.base[a] == nullptr) continue;
        std::memcpy(p.base[a] + to * p.page_bytes[a], p.base[a] + from * p.page_bytes[a],
                    static_cast<size_t>(p.page_bytes[a]));
      }
    }
  };
  if (pool != nullptr && count > 1) {
    pool->parallel_for(count, work);
  } else {
    work(0, count);
  }
}

}  // namespace kvcache::cpu
