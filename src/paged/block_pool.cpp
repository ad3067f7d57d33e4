// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "paged/block_pool.h"

#include <cstddef>

#include "core/check.h"

namespace kvcache::paged {

BlockPool::BlockPool(int32_t num_pages)
    : num_pages_(num_pages),
      refcount_(static_cast<size_t>(num_pages), 0),
      cached_(static_cast<size_t>(num_pages), 0),
      list_(static_cast<size_t>(num_pages), kNoList),
      prev_(static_cast<size_t>(num_pages) + 2),
      next_(static_cast<size_t>(num_pages) + 2) {
  KV_CHECK(num_pages >= 0 && num_pages <= kMaxPages);
  for (int32_t head : {free_head(), lru_head()}) prev_[head] = next_[head] = head;
  for (PageId page = 0; page < num_pages; ++page) push_back(free_head(), page);
}

void BlockPool::set_cached(PageId page, bool cached) {
  KV_CHECK(refcount_[page] > 0);
  cached_[page] = cached ? 1 : 0;
}

void BlockPool::drop_cached(PageId page) {
  KV_CHECK(list_[page] == kLru);
  unlink(page);
  cached_[page] = 0;
  push_front(free_head(), page);
}

std::vector<PageId> BlockPool::walk(int32_t head) const {
  std::vector<PageId> pages;
  for (int32_t p = next_[head]; p != head; p = next_[p]) pages.push_back(p);
  return pages;
}

}  // namespace kvcache::paged
