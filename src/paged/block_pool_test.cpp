// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "paged/block_pool.h"

#include <vector>

#include <gtest/gtest.h>

namespace kvcache::paged {
namespace {

using Pages = std::vector<PageId>;

void expect_counts(const BlockPool& pool, int32_t free, int32_t evictable, int32_t used) {
  EXPECT_EQ(pool.num_free(), free);
  EXPECT_EQ(pool.num_evictable(), evictable);
  EXPECT_EQ(pool.num_used(), used);
  EXPECT_EQ(pool.num_available(), free + evictable);
  EXPECT_EQ(static_cast<int32_t>(pool.free_list().size()), free);
  EXPECT_EQ(static_cast<int32_t>(pool.lru().size()), evictable);
}

TEST(BlockPool, AllocatesInOrderThenReusesFreedPagesFirst) {
  BlockPool pool(4);
  expect_counts(pool, 4, 0, 0);
  EXPECT_EQ(pool.free_list(), (Pages{0, 1, 2, 3}));
  EXPECT_EQ(pool.allocate().page, 0);
  EXPECT_EQ(pool.allocate().page, 1);
  EXPECT_EQ(pool.allocate().page, 2);
  expect_counts(pool, 1, 0, 3);
  pool.unref(1);
  pool.unref(0);
  // LIFO: the page freed last comes back first.
  EXPECT_EQ(pool.free_list(), (Pages{0, 1, 3}));
  const BlockPool::Allocation a = pool.allocate();
  EXPECT_EQ(a.page, 0);
  EXPECT_FALSE(a.evicted);
  EXPECT_EQ(pool.refcount(0), 1);
  expect_counts(pool, 2, 0, 2);
}

TEST(BlockPool, RefcountsKeepPagesUsedUntilTheLastReference) {
  BlockPool pool(2);
  const PageId p = pool.allocate().page;
  pool.ref(p);
  pool.ref(p);
  EXPECT_EQ(pool.refcount(p), 3);
  pool.unref(p);
  pool.unref(p);
  EXPECT_EQ(pool.refcount(p), 1);
  EXPECT_FALSE(pool.on_free_list(p));
  expect_counts(pool, 1, 0, 1);
  pool.unref(p);
  EXPECT_EQ(pool.refcount(p), 0);
  EXPECT_TRUE(pool.on_free_list(p));
  expect_counts(pool, 2, 0, 0);
}

TEST(BlockPool, CachedPagesWaitInLruAndAreReusedLast) {
  BlockPool pool(4);
  for (int i = 0; i < 4; ++i) ASSERT_EQ(pool.allocate().page, i);
  pool.set_cached(1, true);
  pool.set_cached(2, true);
  pool.unref(2);  // LRU: 2
  pool.unref(1);  // LRU: 2, 1
  pool.unref(3);  // free: 3
  expect_counts(pool, 1, 2, 1);
  EXPECT_EQ(pool.lru(), (Pages{2, 1}));
  EXPECT_TRUE(pool.on_lru(2));
  EXPECT_TRUE(pool.is_cached(2));

  // The free page goes first, although the cached ones were released earlier.
  BlockPool::Allocation a = pool.allocate();
  EXPECT_EQ(a.page, 3);
  EXPECT_FALSE(a.evicted);
  // Then the least recently released cached page, reported as an eviction and no longer cached.
  a = pool.allocate();
  EXPECT_EQ(a.page, 2);
  EXPECT_TRUE(a.evicted);
  EXPECT_FALSE(pool.is_cached(2));
  EXPECT_EQ(pool.refcount(2), 1);
  expect_counts(pool, 0, 1, 3);
}

TEST(BlockPool, ReferencingAnLruPageRevivesItAndTouchesIt) {
  BlockPool pool(3);
  for (int i = 0; i < 3; ++i) {
    ASSERT_EQ(pool.allocate().page, i);
    pool.set_cached(i, true);
  }
  pool.unref(0);
  pool.unref(1);
  pool.unref(2);
  EXPECT_EQ(pool.lru(), (Pages{0, 1, 2}));
  pool.ref(0);  // a prefix hit on the oldest
  EXPECT_EQ(pool.lru(), (Pages{1, 2}));
  EXPECT_EQ(pool.refcount(0), 1);
  EXPECT_TRUE(pool.is_cached(0));
  pool.unref(0);  // back as the newest
  EXPECT_EQ(pool.lru(), (Pages{1, 2, 0}));
  EXPECT_EQ(pool.allocate().page, 1);
}

TEST(BlockPool, DropCachedMovesAnLruPageToTheFreeList) {
  BlockPool pool(2);
  const PageId p = pool.allocate().page;
  pool.set_cached(p, true);
  pool.unref(p);
  expect_counts(pool, 1, 1, 0);
  pool.drop_cached(p);
  EXPECT_FALSE(pool.is_cached(p));
  EXPECT_TRUE(pool.on_free_list(p));
  expect_counts(pool, 2, 0, 0);
  const BlockPool::Allocation a = pool.allocate();
  EXPECT_EQ(a.page, p);
  EXPECT_FALSE(a.evicted);
}

TEST(BlockPool, UncachedPageGoesToTheFreeList) {
  BlockPool pool(2);
  const PageId p = pool.allocate().page;
  pool.set_cached(p, true);
  pool.set_cached(p, false);
  pool.unref(p);
  expect_counts(pool, 2, 0, 0);
}

TEST(BlockPool, ExhaustionReturnsNoPageAndChangesNothing) {
  BlockPool pool(2);
  ASSERT_EQ(pool.allocate().page, 0);
  ASSERT_EQ(pool.allocate().page, 1);
  const BlockPool::Allocation a = pool.allocate();
  EXPECT_EQ(a.page, kNoPage);
  EXPECT_FALSE(a.evicted);
  expect_counts(pool, 0, 0, 2);
  EXPECT_EQ(pool.refcount(0), 1);
  EXPECT_EQ(pool.refcount(1), 1);
}

TEST(BlockPool, EmptyPool) {
  BlockPool pool(0);
  expect_counts(pool, 0, 0, 0);
  EXPECT_EQ(pool.allocate().page, kNoPage);
}

}  // namespace
}  // namespace kvcache::paged
