// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// BlockPool: the page bookkeeping of one layer group (internal to BlockManager). A fixed number of
// pages, each in exactly one of three states:
//  - free:   refcount 0, holds nothing worth keeping; on the free list (reused first, LIFO);
//  - cached: refcount 0 but holds a cached prefix; on the LRU list, reused only when the free list
//            is empty (the least recently released first: an eviction);
//  - used:   refcount > 0 (it may also be cached: a page in use can be a prefix hit for others).
// Both lists are intrusive doubly linked lists over arrays sized at construction, so every
// operation is O(1) and nothing allocates after the constructor. The pool knows nothing of keys:
// the owner drops an evicted page's key from its index when allocate() reports an eviction.
// Not thread-safe.

#include <cstdint>
#include <vector>

#include "core/check.h"

namespace kvcache {

using PageId = int32_t;  // as in kvcache/block_manager.h

namespace paged {

inline constexpr PageId kNoPage = -1;

class BlockPool {
 public:
  // REQUIRES: 0 <= num_pages <= kMaxPages. Pages start free; allocate() hands out 0, 1, 2, ...
  explicit BlockPool(int32_t num_pages);
  BlockPool(const BlockPool&) = delete;
  BlockPool& operator=(const BlockPool&) = delete;

  static constexpr int32_t kMaxPages = (int32_t{1} << 30);

  struct Allocation {
    PageId page = kNoPage;  // kNoPage when no page is free or cached
    bool evicted = false;   // the page came off the LRU: it held a cached prefix until now
  };
  // A page with refcount 1 and not cached: the free list's head, else the LRU's oldest page.
  Allocation allocate();
  // One more reference; a cached page with refcount 0 leaves the LRU (a prefix hit revives it).
  // REQUIRES: the page is used or cached.
  void ref(PageId page);
  // One reference less; at 0 a cached page joins the LRU as its newest entry, any other page goes
  // to the free list's head. REQUIRES: refcount(page) > 0.
  void unref(PageId page);
  // Marks a used page as holding (or no longer holding) a cached prefix.
  // REQUIRES: refcount(page) > 0.
  void set_cached(PageId page, bool cached);
  // Moves a cached page with refcount 0 from the LRU to the free list (its key was dropped).
  void drop_cached(PageId page);

  [[nodiscard]] int32_t num_pages() const { return num_pages_; }
  [[nodiscard]] int32_t num_free() const { return num_free_; }
  // Cached pages with refcount 0 (on the LRU).
  [[nodiscard]] int32_t num_evictable() const { return num_lru_; }
  // Pages allocate() can supply: free + evictable.
  [[nodiscard]] int32_t num_available() const { return num_free_ + num_lru_; }
  [[nodiscard]] int32_t num_used() const { return num_pages_ - num_free_ - num_lru_; }
  [[nodiscard]] int32_t refcount(PageId page) const { return refcount_[page]; }
  [[nodiscard]] bool is_cached(PageId page) const { return cached_[page] != 0; }
  // True when the page is on the free list / on the LRU (by list membership, for invariants).
  [[nodiscard]] bool on_free_list(PageId page) const { return list_[page] == kFreeList; }
  [[nodiscard]] bool on_lru(PageId page) const { return list_[page] == kLru; }
  // The pages on each list, head first (for invariant checks and tests; allocates).
  [[nodiscard]] std::vector<PageId> free_list() const { return walk(free_head()); }
  [[nodiscard]] std::vector<PageId> lru() const { return walk(lru_head()); }

 private:
  static constexpr uint8_t kNoList = 0;
  static constexpr uint8_t kFreeList = 1;
  static constexpr uint8_t kLru = 2;

  // Sentinel nodes after the pages: index num_pages_ heads the free list, num_pages_ + 1 the LRU.
  [[nodiscard]] int32_t free_head() const { return num_pages_; }
  [[nodiscard]] int32_t lru_head() const { return num_pages_ + 1; }
  void push_front(int32_t head, PageId page);
  void push_back(int32_t head, PageId page);
  // Links `page` after `node` (a sentinel or a page) of the list that `head` starts.
  void insert_after(int32_t head, int32_t node, PageId page);
  void unlink(PageId page);
  [[nodiscard]] std::vector<PageId> walk(int32_t head) const;

  int32_t num_pages_;
  int32_t num_free_ = 0;
  int32_t num_lru_ = 0;
  std::vector<int32_t> refcount_;
  std::vector<uint8_t> cached_;
  std::vector<uint8_t> list_;  // kNoList, kFreeList or kLru
  std::vector<int32_t> prev_;  // num_pages_ + 2 entries: pages, then the two sentinels
  std::vector<int32_t> next_;
};

// Inline: one call per page per scheduling step.
inline BlockPool::Allocation BlockPool::allocate() {
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

inline void BlockPool::ref(PageId page) {
  if (refcount_[page] == 0) {
    KV_CHECK(list_[page] == kLru);
    unlink(page);
  }
  ++refcount_[page];
}

inline void BlockPool::unref(PageId page) {
  KV_CHECK(refcount_[page] > 0);
  if (--refcount_[page] > 0) return;
  if (cached_[page] != 0) {
    push_back(lru_head(), page);
  } else {
    push_front(free_head(), page);
  }
}

inline void BlockPool::push_front(int32_t head, PageId page) { insert_after(head, head, page); }

inline void BlockPool::push_back(int32_t head, PageId page) {
  insert_after(head, prev_[head], page);
}

inline void BlockPool::insert_after(int32_t head, int32_t node, PageId page) {
  const int32_t after = next_[node];
  prev_[page] = node;
  next_[page] = after;
  prev_[after] = page;
  next_[node] = page;
  const bool free = head == free_head();
  list_[page] = free ? kFreeList : kLru;
  ++(free ? num_free_ : num_lru_);
}

inline void BlockPool::unlink(PageId page) {
  KV_CHECK(list_[page] != kNoList);
  --(list_[page] == kFreeList ? num_free_ : num_lru_);
  next_[prev_[page]] = next_[page];
  prev_[next_[page]] = prev_[page];
  list_[page] = kNoList;
}

}  // namespace paged
}  // namespace kvcache
