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

BlockPool::Allocation BlockPool::allocate() {
  Allocation a;
  if (num_free_ > 0) {
    a.page = next_[free_head()];
  } else if (num_lru_ > 0) {
    a.page = next_[lru_head()];
    a.evicted = true;
    cached_[a.page] = 0;
  } else {
    return a;
  }
  unlink(a.page);
  refcount_[a.page] = 1;
  return a;
}

void BlockPool::ref(PageId page) {
  if (refcount_[page] == 0) {
    KV_CHECK(list_[page] == kLru);
    unlink(page);
  }
  ++refcount_[page];
}

void BlockPool::unref(PageId page) {
  KV_CHECK(refcount_[page] > 0);
  if (--refcount_[page] > 0) return;
  if (cached_[page] != 0) {
    push_back(lru_head(), page);
  } else {
    push_front(free_head(), page);
  }
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

void BlockPool::push_front(int32_t head, PageId page) { insert_after(head, head, page); }

void BlockPool::push_back(int32_t head, PageId page) { insert_after(head, prev_[head], page); }

void BlockPool::insert_after(int32_t head, int32_t node, PageId page) {
  const int32_t after = next_[node];
  prev_[page] = node;
  next_[page] = after;
  prev_[after] = page;
  next_[node] = page;
  const bool free = head == free_head();
  list_[page] = free ? kFreeList : kLru;
  ++(free ? num_free_ : num_lru_);
}

void BlockPool::unlink(PageId page) {
  KV_CHECK(list_[page] != kNoList);
  --(list_[page] == kFreeList ? num_free_ : num_lru_);
  next_[prev_[page]] = next_[page];
  prev_[next_[page]] = prev_[page];
  list_[page] = kNoList;
}

std::vector<PageId> BlockPool::walk(int32_t head) const {
  std::vector<PageId> pages;
  for (int32_t p = next_[head]; p != head; p = next_[p]) pages.push_back(p);
  return pages;
}

}  // namespace kvcache::paged
