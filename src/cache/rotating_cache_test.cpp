// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "kvcache/rotating_cache.h"

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "kvcache/buffer.h"
#include "kvcache/cache.h"
#include "kvcache/dtype.h"
#include "kvcache/tensor.h"

#include "testing/test_util.h"

namespace kvcache {
namespace {

using ::kvcache::testing::CacheFingerprint;
using ::kvcache::testing::fingerprint;
using ::kvcache::testing::has_error;
using ::kvcache::testing::seed_trace;
using ::kvcache::testing::test_seed;
using ::kvcache::testing::view_bytes;

using Positions = std::vector<int64_t>;
using Bytes = std::vector<uint8_t>;

RotatingKVCacheOptions small_options(int64_t max_size, int64_t keep, DType dtype = DType::f32,
                                     int64_t batch = 1) {
  RotatingKVCacheOptions o;
  o.max_size = max_size;
  o.keep = keep;
  o.num_kv_heads = 2;
  o.head_dim = 3;
  o.head_dim_v = 4;
  o.dtype = dtype;
  o.batch = batch;
  return o;
}

std::unique_ptr<RotatingKVCache> make_cache(const RotatingKVCacheOptions& o) {
  return ::kvcache::testing::value_or_fail(RotatingKVCache::create(o));
}

// "[2, 5, 2, 3]", as TensorView::shape_string() writes a shape.
std::string shape_of(std::initializer_list<int64_t> dims) {
  std::string out = "[";
  for (int64_t d : dims) {
    if (out.size() > 1) out += ", ";
    out += std::to_string(d);
  }
  out += "]";
  return out;
}

// [first, end) after [0, num_pinned).
Positions positions(int64_t num_pinned, int64_t first, int64_t end) {
  Positions out;
  for (int64_t p = 0; p < num_pinned; ++p) out.push_back(p);
  for (int64_t p = first; p < end; ++p) out.push_back(p);
  return out;
}

// What the header promises: the window at offset n.
Positions window_positions(const RotatingKVCacheOptions& o, int64_t n) {
  return positions(std::min(o.keep, n), std::max(o.keep, n - (o.max_size - o.keep)), n);
}

// What update() of tokens [begin, end) returns.
Positions update_positions(const RotatingKVCacheOptions& o, int64_t begin, int64_t end) {
  if (end <= o.max_size) return positions(0, 0, end);
  return positions(o.keep, std::max(o.keep, begin - (o.max_size - o.keep) + 1), end);
}

using Input = ::kvcache::testing::TokenHistory::Input;

// Every token appended so far, with its own random stream for the inputs.
class History : public ::kvcache::testing::TokenHistory {
 public:
  History(const RotatingKVCacheOptions& o, uint32_t seed)
      : TokenHistory(o.dtype, o.batch, o.num_kv_heads, o.head_dim,
                     o.head_dim_v == 0 ? o.head_dim : o.head_dim_v),
        rng_(seed) {}

  // `count` new tokens; `strided` lays the input out as [B, L, H, D] in memory.
  Input next(int64_t count, bool strided = false) {
    return TokenHistory::next(count, rng_, strided);
  }

 private:
  std::mt19937 rng_;
};

// Appends `count` tokens and checks the returned views against the history.
void update_and_check(RotatingKVCache& cache, History& history, int64_t count,
                      bool strided = false) {
  const RotatingKVCacheOptions& o = cache.options();
  const int64_t begin = cache.offset();
  const Input in = history.next(count, strided);
  Result<CacheViews> views = cache.update(in.k, in.v);
  ASSERT_OK(views);
  const int64_t end = begin + count;
  const Positions want = update_positions(o, begin, end);
  const auto n = static_cast<int64_t>(want.size());
  EXPECT_EQ(views->keys.shape_string(), shape_of({o.batch, 2, n, 3}));
  EXPECT_EQ(view_bytes(views->keys), history.keys(want, true));
  EXPECT_EQ(view_bytes(views->values), history.values(want, true));
  EXPECT_EQ(views->num_pinned, end > o.max_size ? o.keep : 0);
  EXPECT_EQ(views->first_pos,
            end > o.max_size ? std::max(o.keep, begin - (o.max_size - o.keep) + 1) : 0);
  EXPECT_EQ(cache.offset(), end);
  EXPECT_EQ(cache.window_len(), std::min(end, o.max_size));
  EXPECT_EQ(cache.has_wrapped(), end > o.max_size);
}

void expect_window(const RotatingKVCache& cache, const History& history) {
  const Positions want = window_positions(cache.options(), cache.offset());
  const std::vector<TensorView> s = cache.state();
  ASSERT_EQ(s.size(), 2u);
  const auto n = static_cast<int64_t>(want.size());
  EXPECT_EQ(s[0].shape_string(), shape_of({cache.options().batch, n, 2, 3}));
  EXPECT_EQ(s[1].shape_string(), shape_of({cache.options().batch, n, 2, 4}));
  EXPECT_EQ(view_bytes(s[0]), history.keys(want, false));
  EXPECT_EQ(view_bytes(s[1]), history.values(want, false));
}

// --- create ---

TEST(RotatingKVCacheTest, CreateRefusesBadOptions) {
  const auto refused = [](RotatingKVCacheOptions o, const std::string& fragment) {
    return has_error(RotatingKVCache::create(o), Code::invalid_argument, fragment);
  };
  RotatingKVCacheOptions o = small_options(4, 1);
  o.max_size = 0;
  EXPECT_TRUE(refused(o, "RotatingKVCache.create: max_size is 0, expected > 0"));
  o = small_options(4, 4);
  EXPECT_TRUE(refused(o, "keep is 4, expected 0 <= keep < max_size (4)"));
  o = small_options(4, -1);
  EXPECT_TRUE(refused(o, "keep is -1"));
  o = small_options(4, 1);
  o.num_kv_heads = 0;
  EXPECT_TRUE(refused(o, "num_kv_heads is 0, expected > 0"));
  o = small_options(4, 1);
  o.head_dim = -3;
  EXPECT_TRUE(refused(o, "head_dim is -3, expected > 0"));
  o = small_options(4, 1);
  o.head_dim_v = -1;
  EXPECT_TRUE(refused(o, "head_dim_v is -1, expected >= 0"));
  o = small_options(4, 1);
  o.batch = 0;
  EXPECT_TRUE(refused(o, "batch is 0, expected > 0"));
  o = small_options(4, 1, DType::f64);
  EXPECT_TRUE(refused(o, "dtype is f64, expected f32, f16 or bf16"));
  o = small_options(4, 1, DType::int8);
  EXPECT_TRUE(refused(o, "dtype is int8"));
}

TEST(RotatingKVCacheTest, CreateResolvesHeadDimVAndStartsEmpty) {
  RotatingKVCacheOptions o = small_options(4, 1);
  o.head_dim_v = 0;
  std::unique_ptr<RotatingKVCache> cache = make_cache(o);
  ASSERT_NE(cache, nullptr);
  EXPECT_EQ(cache->options().head_dim_v, 3);
  EXPECT_EQ(cache->kind(), CacheKind::rotating);
  EXPECT_EQ(cache->max_size(), 4);
  EXPECT_EQ(cache->keep(), 1);
  EXPECT_EQ(cache->offset(), 0);
  EXPECT_EQ(cache->window_len(), 0);
  EXPECT_FALSE(cache->has_wrapped());
  const std::vector<TensorView> s = cache->state();
  ASSERT_EQ(s.size(), 2u);
  EXPECT_EQ(s[0].shape_string(), "[1, 0, 2, 3]");
  EXPECT_EQ(s[1].shape_string(), "[1, 0, 2, 3]");
  std::unique_ptr<RotatingKVCache> other = make_cache(o);
  EXPECT_NE(cache->id(), other->id());
}

// --- update: decode ---

TEST(RotatingKVCacheTest, DecodeWithoutKeepSlidesAcrossWrapAndCompaction) {
  const RotatingKVCacheOptions o = small_options(4, 0);
  std::unique_ptr<RotatingKVCache> cache = make_cache(o);
  History history(o, test_seed());
  // 4 * max_size steps: the buffer of 2 * max_size slots compacts several times.
  for (int step = 0; step < 16; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    update_and_check(*cache, history, 1);
    expect_window(*cache, history);
  }
  EXPECT_EQ(window_positions(o, cache->offset()), (Positions{12, 13, 14, 15}));
}

TEST(RotatingKVCacheTest, DecodeWithKeepPinsTheFirstTokens) {
  const RotatingKVCacheOptions o = small_options(5, 2);
  std::unique_ptr<RotatingKVCache> cache = make_cache(o);
  History history(o, test_seed());
  for (int step = 0; step < 7; ++step) update_and_check(*cache, history, 1);
  // Offset 7: pinned 0, 1 and the last three.
  const Input in = history.next(1);
  Result<CacheViews> views = cache->update(in.k, in.v);
  ASSERT_OK(views);
  EXPECT_EQ(views->num_pinned, 2);
  EXPECT_EQ(views->first_pos, 5);
  EXPECT_EQ(view_bytes(views->keys), history.keys({0, 1, 5, 6, 7}, true));
  EXPECT_EQ(view_bytes(views->values), history.values({0, 1, 5, 6, 7}, true));
  for (int step = 8; step < 40; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    update_and_check(*cache, history, 1);
    expect_window(*cache, history);
  }
}

TEST(RotatingKVCacheTest, ViewIsExactlyMaxSizeBeforeAnyDrop) {
  const RotatingKVCacheOptions o = small_options(4, 1);
  std::unique_ptr<RotatingKVCache> cache = make_cache(o);
  History history(o, test_seed());
  const Input in = history.next(4);
  Result<CacheViews> views = cache->update(in.k, in.v);
  ASSERT_OK(views);
  // Nothing dropped: the view is [0, 4) and reported as unpinned from position 0.
  EXPECT_EQ(views->num_pinned, 0);
  EXPECT_EQ(views->first_pos, 0);
  EXPECT_EQ(view_bytes(views->keys), history.keys({0, 1, 2, 3}, true));
  EXPECT_FALSE(cache->has_wrapped());
  update_and_check(*cache, history, 1);
  EXPECT_TRUE(cache->has_wrapped());
  expect_window(*cache, history);
  EXPECT_EQ(window_positions(o, 5), (Positions{0, 2, 3, 4}));
}

// --- update: chunks ---

TEST(RotatingKVCacheTest, ChunksWithKeepReturnEverythingTheQueriesSee) {
  const RotatingKVCacheOptions o = small_options(4, 1);  // 3 rolling slots
  std::unique_ptr<RotatingKVCache> cache = make_cache(o);
  History history(o, test_seed());
  const auto step = [&](int64_t count, const Positions& view, int64_t first_pos,
                        const Positions& window) {
    SCOPED_TRACE("chunk of " + std::to_string(count) + " at " + std::to_string(cache->offset()));
    const Input in = history.next(count);
    Result<CacheViews> views = cache->update(in.k, in.v);
    ASSERT_OK(views);
    EXPECT_EQ(views->num_pinned, 1);
    EXPECT_EQ(views->first_pos, first_pos);
    EXPECT_EQ(view_bytes(views->keys), history.keys(view, true));
    EXPECT_EQ(view_bytes(views->values), history.values(view, true));
    const std::vector<TensorView> s = cache->state();
    EXPECT_EQ(view_bytes(s[0]), history.keys(window, false));
    EXPECT_EQ(view_bytes(s[1]), history.values(window, false));
    // state() does not disturb the view: it stays valid until the next mutation.
    EXPECT_EQ(view_bytes(views->keys), history.keys(view, true));
  };
  step(6, {0, 1, 2, 3, 4, 5}, 1, {0, 3, 4, 5});       // L > max_size from empty
  step(2, {0, 4, 5, 6, 7}, 4, {0, 5, 6, 7});          // query 6 sees 4, 5
  step(1, {0, 6, 7, 8}, 6, {0, 6, 7, 8});             // decode after a chunk
  step(10, positions(1, 7, 19), 7, {0, 16, 17, 18});  // L > max_size on a full window
  for (int i = 0; i < 12; ++i) update_and_check(*cache, history, 1 + i % 3);
  expect_window(*cache, history);
}

TEST(RotatingKVCacheTest, ChunksWithoutKeep) {
  const RotatingKVCacheOptions o = small_options(3, 0);
  std::unique_ptr<RotatingKVCache> cache = make_cache(o);
  History history(o, test_seed());
  Input in = history.next(5);
  Result<CacheViews> views = cache->update(in.k, in.v);
  ASSERT_OK(views);
  EXPECT_EQ(views->num_pinned, 0);
  EXPECT_EQ(views->first_pos, 0);
  EXPECT_EQ(view_bytes(views->keys), history.keys({0, 1, 2, 3, 4}, true));
  expect_window(*cache, history);
  EXPECT_EQ(window_positions(o, 5), (Positions{2, 3, 4}));
  in = history.next(2);
  views = cache->update(in.k, in.v);
  ASSERT_OK(views);
  EXPECT_EQ(views->first_pos, 3);
  EXPECT_EQ(view_bytes(views->values), history.values({3, 4, 5, 6}, true));
  expect_window(*cache, history);
  for (int64_t count : {7, 1, 2, 3, 1, 1, 9, 2}) {
    update_and_check(*cache, history, count);
    expect_window(*cache, history);
  }
}

TEST(RotatingKVCacheTest, ChunkCrossingThePinnedBoundary) {
  const RotatingKVCacheOptions o = small_options(5, 3);
  std::unique_ptr<RotatingKVCache> cache = make_cache(o);
  History history(o, test_seed());
  update_and_check(*cache, history, 2);  // positions 0, 1: pinned, not yet full
  expect_window(*cache, history);
  const Input in = history.next(4);  // 2 pinned, 3, 4, 5 rolling
  Result<CacheViews> views = cache->update(in.k, in.v);
  ASSERT_OK(views);
  EXPECT_EQ(views->num_pinned, 3);
  EXPECT_EQ(views->first_pos, 3);
  EXPECT_EQ(view_bytes(views->keys), history.keys({0, 1, 2, 3, 4, 5}, true));
  expect_window(*cache, history);
  EXPECT_EQ(window_positions(o, 6), (Positions{0, 1, 2, 4, 5}));
}

// Batch > 1, every dtype, head_dim_v != head_dim, strided inputs, random chunk sizes.
class RotatingKVCacheDTypeTest : public ::testing::TestWithParam<DType> {};

TEST_P(RotatingKVCacheDTypeTest, RandomChunksMatchTheHistory) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  for (int64_t keep : {0, 2}) {
    const RotatingKVCacheOptions o = small_options(6, keep, GetParam(), 3);
    std::unique_ptr<RotatingKVCache> cache = make_cache(o);
    History history(o, seed + static_cast<uint32_t>(keep));
    for (int step = 0; step < 40; ++step) {
      SCOPED_TRACE("keep " + std::to_string(keep) + " step " + std::to_string(step));
      const int64_t count = std::uniform_int_distribution<int64_t>(1, 8)(rng);
      update_and_check(*cache, history, count, step % 2 == 1);
      expect_window(*cache, history);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(RotatingKVCache, RotatingKVCacheDTypeTest,
                         ::testing::Values(DType::f32, DType::f16, DType::bf16),
                         [](const ::testing::TestParamInfo<DType>& param) {
                           return std::string(name(param.param));
                         });

TEST(RotatingKVCacheTest, UpdateRefusesBadInputsAndChangesNothing) {
  const RotatingKVCacheOptions o = small_options(4, 1, DType::f32, 2);
  std::unique_ptr<RotatingKVCache> cache = make_cache(o);
  History history(o, test_seed());
  for (int i = 0; i < 6; ++i) update_and_check(*cache, history, 1);  // wrapped
  const CacheFingerprint before = fingerprint(*cache);

  const auto refused = [&](const TensorView& k, const TensorView& v, const std::string& fragment) {
    const bool ok = has_error(cache->update(k, v), Code::invalid_argument, fragment);
    return ok && fingerprint(*cache) == before;
  };
  const Input good = history.next(2);
  history.truncate(6);  // `good` is never appended
  TensorView k = good.k;
  k.dtype = DType::f16;
  EXPECT_TRUE(refused(k, good.v, "RotatingKVCache.update: keys has dtype f16, expected f32"));
  k = good.k;
  k.shape[0] = 1;
  EXPECT_TRUE(refused(k, good.v, "keys dim 0 (batch) is 1, expected 2"));
  k = good.k;
  k.shape[1] = 1;
  EXPECT_TRUE(refused(k, good.v, "keys dim 1 (num_kv_heads) is 1, expected 2"));
  TensorView v = good.v;
  v.shape[3] = 3;
  EXPECT_TRUE(refused(good.k, v, "values dim 3 (head_dim_v) is 3, expected 4"));
  k = good.k;
  k.shape[3] = 4;
  EXPECT_TRUE(refused(k, good.v, "keys dim 3 (head_dim) is 4, expected 3"));
  k = good.k;
  k.rank = 3;
  EXPECT_TRUE(refused(k, good.v, "keys has rank 3"));
  v = good.v;
  v.shape[2] = 1;
  EXPECT_TRUE(refused(good.k, v, "values has 1 tokens (L), expected 2 (as many as keys)"));
  k = good.k;
  v = good.v;
  k.shape[2] = 0;
  v.shape[2] = 0;
  EXPECT_TRUE(refused(k, v, "keys has 0 tokens (L), expected at least 1"));
  v = good.v;
  v.dtype = DType::bf16;
  EXPECT_TRUE(refused(good.k, v, "values has dtype bf16, expected f32"));
  k = good.k;
  k.device = Device::cuda(0);
  EXPECT_TRUE(refused(k, good.v, "keys is on cuda:0, expected cpu"));
  k = good.k;
  k.data = nullptr;
  EXPECT_TRUE(refused(k, good.v, "keys has null data"));
  // Still usable, with the refused inputs never appended.
  update_and_check(*cache, history, 1);
  expect_window(*cache, history);
}

// --- restore(target) ---

TEST(RotatingKVCacheTest, RestoreRewindsAnUnwrappedWindow) {
  const RotatingKVCacheOptions o = small_options(6, 2);
  std::unique_ptr<RotatingKVCache> cache = make_cache(o);
  History history(o, test_seed());
  update_and_check(*cache, history, 5);
  ASSERT_OK(cache->restore(1));  // inside the pinned tokens
  history.truncate(1);
  EXPECT_EQ(cache->offset(), 1);
  expect_window(*cache, history);
  update_and_check(*cache, history, 3);
  expect_window(*cache, history);
  update_and_check(*cache, history, 2);  // exactly full: [0, 6), nothing dropped yet
  ASSERT_OK(cache->restore(3));
  history.truncate(3);
  expect_window(*cache, history);
  ASSERT_OK(cache->restore(3));          // target == offset: a no-op
  update_and_check(*cache, history, 4);  // wraps
  expect_window(*cache, history);
  EXPECT_TRUE(has_error(cache->restore(0), Code::invalid_argument, "overwritten"));
  cache->free();
  ASSERT_OK(cache->restore(0));
  history.truncate(0);
  expect_window(*cache, history);
  for (int i = 0; i < 10; ++i) update_and_check(*cache, history, 1);
  expect_window(*cache, history);
}

TEST(RotatingKVCacheTest, RestoreRefusesAndChangesNothing) {
  const RotatingKVCacheOptions o = small_options(4, 1);
  std::unique_ptr<RotatingKVCache> cache = make_cache(o);
  History history(o, test_seed());
  update_and_check(*cache, history, 3);
  CacheFingerprint before = fingerprint(*cache);
  EXPECT_TRUE(
      has_error(cache->restore(-1), Code::invalid_argument,
                "RotatingKVCache.restore: target is -1, expected 0 <= target <= offset (3)"));
  EXPECT_TRUE(has_error(cache->restore(4), Code::invalid_argument, "target is 4"));
  EXPECT_EQ(fingerprint(*cache), before);

  update_and_check(*cache, history, 3);  // offset 6 > max_size: wrapped
  before = fingerprint(*cache);
  EXPECT_TRUE(has_error(cache->restore(5), Code::invalid_argument,
                        "tokens before 5 were overwritten, expected target == offset or a "
                        "snapshot"));
  EXPECT_TRUE(has_error(cache->restore(0), Code::invalid_argument, "overwritten"));
  EXPECT_TRUE(has_error(cache->restore(7), Code::invalid_argument, "offset (6)"));
  EXPECT_EQ(fingerprint(*cache), before);
  EXPECT_OK(cache->restore(6));  // target == offset is always fine
  EXPECT_EQ(fingerprint(*cache), before);
}

// --- snapshots ---

TEST(RotatingKVCacheTest, SnapshotCopiesTheWindow) {
  const RotatingKVCacheOptions o = small_options(5, 2, DType::bf16, 2);
  std::unique_ptr<RotatingKVCache> cache = make_cache(o);
  History history(o, test_seed());
  Result<std::optional<Snapshot>> none = cache->snapshot(0);
  ASSERT_OK(none);
  EXPECT_FALSE(none->has_value());
  update_and_check(*cache, history, 8);
  const CacheFingerprint before = fingerprint(*cache);
  EXPECT_TRUE(has_error(cache->snapshot(-1), Code::invalid_argument,
                        "RotatingKVCache.snapshot: from is -1, expected 0 <= from <= offset (8)"));
  EXPECT_TRUE(has_error(cache->snapshot(9), Code::invalid_argument, "from is 9"));
  none = cache->snapshot(8);
  ASSERT_OK(none);
  EXPECT_FALSE(none->has_value());

  Result<std::optional<Snapshot>> snap = cache->snapshot(3);
  ASSERT_OK(snap);
  ASSERT_TRUE(snap->has_value());
  const Snapshot& s = **snap;
  EXPECT_EQ(s.kind(), CacheKind::rotating);
  EXPECT_EQ(s.cache_id(), cache->id());
  EXPECT_EQ(s.begin(), 3);
  EXPECT_EQ(s.end(), 8);
  EXPECT_EQ(s.layout(), (std::vector<int64_t>{5, 2, 2, 2, 3, 4, static_cast<int64_t>(o.dtype)}));
  ASSERT_EQ(s.arrays().size(), 2u);
  const Positions window = window_positions(o, 8);
  EXPECT_EQ(view_bytes(s.arrays()[0].view(o.dtype, {2, 5, 2, 3})), history.keys(window, false));
  EXPECT_EQ(view_bytes(s.arrays()[1].view(o.dtype, {2, 5, 2, 4})), history.values(window, false));
  EXPECT_EQ(s.num_bytes(), size_t{2 * 5 * 2 * (3 + 4) * 2});
  EXPECT_EQ(fingerprint(*cache), before);
}

TEST(RotatingKVCacheTest, RestoreFromSnapshotBringsBackAnOverwrittenWindow) {
  for (int64_t keep : {0, 2}) {
    SCOPED_TRACE("keep " + std::to_string(keep));
    const RotatingKVCacheOptions o = small_options(5, keep, DType::f16, 2);
    std::unique_ptr<RotatingKVCache> cache = make_cache(o);
    History history(o, test_seed());
    update_and_check(*cache, history, 7);
    Result<std::optional<Snapshot>> snap = cache->snapshot(6);
    ASSERT_OK(snap);
    const History at_7 = history;
    const CacheFingerprint frozen_7 = fingerprint(*cache);
    // A later wrap overwrites every slot of that window.
    for (int i = 0; i < 12; ++i) update_and_check(*cache, history, 1 + i % 4);
    ASSERT_NE(fingerprint(*cache), frozen_7);
    EXPECT_TRUE(has_error(cache->restore(7), Code::invalid_argument, "overwritten"));

    ASSERT_OK(cache->restore(**snap, 7));
    EXPECT_EQ(fingerprint(*cache), frozen_7);
    EXPECT_TRUE(cache->has_wrapped());
    history = at_7;
    for (int i = 0; i < 10; ++i) {
      update_and_check(*cache, history, 1 + i % 3);
      expect_window(*cache, history);
    }
    // Also into a freed cache: the snapshot carries everything.
    cache->free();
    ASSERT_OK(cache->restore(**snap, 7));
    EXPECT_EQ(fingerprint(*cache), frozen_7);
    history = at_7;
    update_and_check(*cache, history, 1);
    expect_window(*cache, history);
  }
}

TEST(RotatingKVCacheTest, RestoreUnwrappedSnapshotToAnEarlierTarget) {
  const RotatingKVCacheOptions o = small_options(6, 1);
  std::unique_ptr<RotatingKVCache> cache = make_cache(o);
  History history(o, test_seed());
  update_and_check(*cache, history, 5);
  Result<std::optional<Snapshot>> snap = cache->snapshot(2);  // [2, 5), never wrapped
  ASSERT_OK(snap);
  const History at_5 = history;
  for (int i = 0; i < 9; ++i) update_and_check(*cache, history, 2);
  for (int64_t target : {2, 3, 5}) {
    SCOPED_TRACE("target " + std::to_string(target));
    ASSERT_OK(cache->restore(**snap, target));
    EXPECT_EQ(cache->offset(), target);
    EXPECT_FALSE(cache->has_wrapped());
    history = at_5;
    history.truncate(target);
    expect_window(*cache, history);
    for (int i = 0; i < 6; ++i) update_and_check(*cache, history, 1 + i % 2);
    expect_window(*cache, history);
  }
}

TEST(RotatingKVCacheTest, RestoreFromSnapshotRefusesAndChangesNothing) {
  const RotatingKVCacheOptions o = small_options(4, 1);
  std::unique_ptr<RotatingKVCache> cache = make_cache(o);
  History history(o, test_seed());
  update_and_check(*cache, history, 6);
  Result<std::optional<Snapshot>> wrapped = cache->snapshot(5);  // [5, 6), wrapped
  ASSERT_OK(wrapped);
  update_and_check(*cache, history, 3);
  const CacheFingerprint before = fingerprint(*cache);
  const auto refused = [&](const Snapshot& s, int64_t target, const std::string& fragment) {
    const bool ok = has_error(cache->restore(s, target), Code::invalid_argument, fragment);
    return ok && fingerprint(*cache) == before;
  };
  EXPECT_TRUE(refused(**wrapped, 5,
                      "RotatingKVCache.restore: target is 5 but the snapshot's window wrapped at "
                      "6 (max_size 4), so tokens before 5 were overwritten, expected target == 6"));
  EXPECT_TRUE(refused(**wrapped, 4, "target is 4, expected 5 <= target <= 6"));
  EXPECT_TRUE(refused(**wrapped, 7, "target is 7, expected 5 <= target <= 6"));

  // Another layout: another keep, another dtype.
  for (RotatingKVCacheOptions other : {small_options(4, 2), small_options(4, 1, DType::f16)}) {
    std::unique_ptr<RotatingKVCache> foreign = make_cache(other);
    History foreign_history(other, test_seed() + 1);
    const Input in = foreign_history.next(3);
    ASSERT_OK(foreign->update(in.k, in.v));
    Result<std::optional<Snapshot>> s = foreign->snapshot(0);
    ASSERT_OK(s);
    EXPECT_TRUE(refused(**s, 3, "snapshot has layout"));
  }
  // Another kind, and hand-made snapshots with bad arrays or ranges.
  const std::vector<int64_t> layout = (*wrapped)->layout();
  EXPECT_TRUE(refused(Snapshot(CacheKind::contiguous, cache->id(), layout, 0, 1, {}), 1,
                      "snapshot is of a contiguous cache, expected rotating"));
  EXPECT_TRUE(refused(Snapshot(CacheKind::rotating, cache->id(), layout, 0, 1, {}), 1,
                      "snapshot has 0 arrays, expected 2"));
  std::vector<Buffer> short_arrays;
  for (int i = 0; i < 2; ++i) {
    Result<Buffer> b = Buffer::allocate(Device::cpu(), 8);
    ASSERT_OK(b);
    short_arrays.push_back(std::move(*b));
  }
  EXPECT_TRUE(
      refused(Snapshot(CacheKind::rotating, cache->id(), layout, 0, 1, std::move(short_arrays)), 1,
              "snapshot array 0 has 8 bytes on cpu, expected 24 on cpu"));
  EXPECT_TRUE(refused(Snapshot(CacheKind::rotating, cache->id(), layout, 3, 1, {}), 1,
                      "covers [3, 1), expected 0 <= begin <= end"));
}

TEST(RotatingKVCacheTest, WrapStartsOneTokenPastMaxSize) {
  const RotatingKVCacheOptions o = small_options(4, 1);
  std::unique_ptr<RotatingKVCache> cache = make_cache(o);
  History history(o, test_seed());
  update_and_check(*cache, history, 4);
  Result<std::optional<Snapshot>> full = cache->snapshot(1);  // [1, 4): full, not wrapped
  ASSERT_OK(full);
  const History at_4 = history;
  update_and_check(*cache, history, 1);
  Result<std::optional<Snapshot>> wrapped = cache->snapshot(4);  // [4, 5): wrapped by one
  ASSERT_OK(wrapped);
  EXPECT_TRUE(has_error(cache->restore(4), Code::invalid_argument, "overwritten"));
  EXPECT_TRUE(
      has_error(cache->restore(**wrapped, 4), Code::invalid_argument, "expected target == 5"));
  ASSERT_OK(cache->restore(**full, 2));
  history = at_4;
  history.truncate(2);
  expect_window(*cache, history);
  update_and_check(*cache, history, 2);  // offset 4 == max_size: still a rewindable window
  ASSERT_OK(cache->restore(3));
  history.truncate(3);
  expect_window(*cache, history);
}

// --- merge and split ---

TEST(RotatingKVCacheTest, MergeKeepsTheChildWindow) {
  const RotatingKVCacheOptions o = small_options(5, 1);
  std::unique_ptr<RotatingKVCache> cache = make_cache(o);
  History history(o, test_seed());
  update_and_check(*cache, history, 3);
  Result<std::optional<Snapshot>> parent = cache->snapshot(1);  // [1, 3)
  ASSERT_OK(parent);
  update_and_check(*cache, history, 6);
  Result<std::optional<Snapshot>> child = cache->snapshot(3);  // [3, 9)
  ASSERT_OK(child);
  const CacheFingerprint at_9 = fingerprint(*cache);
  const void* child_keys = (**child).arrays()[0].data();
  Result<Snapshot> merged = cache->merge(std::move(*parent), std::move(*child));
  ASSERT_OK(merged);
  EXPECT_FALSE(parent->has_value());
  EXPECT_FALSE(child->has_value());
  EXPECT_EQ(merged->arrays()[0].data(), child_keys);  // the child's window, adopted, not copied
  EXPECT_EQ(merged->begin(), 1);
  EXPECT_EQ(merged->end(), 9);
  EXPECT_EQ(merged->cache_id(), cache->id());
  update_and_check(*cache, history, 4);
  ASSERT_OK(cache->restore(*merged, 9));
  EXPECT_EQ(fingerprint(*cache), at_9);
  // The merged window wrapped: only its end is a valid target.
  EXPECT_TRUE(has_error(cache->restore(*merged, 3), Code::invalid_argument, "overwritten"));
}

TEST(RotatingKVCacheTest, MergeOfUnwrappedSnapshotsRestoresAnyTargetInRange) {
  const RotatingKVCacheOptions o = small_options(8, 2);
  std::unique_ptr<RotatingKVCache> cache = make_cache(o);
  History history(o, test_seed());
  update_and_check(*cache, history, 2);
  Result<std::optional<Snapshot>> parent = cache->snapshot(0);  // [0, 2)
  update_and_check(*cache, history, 4);
  Result<std::optional<Snapshot>> child = cache->snapshot(2);  // [2, 6)
  ASSERT_OK(parent);
  ASSERT_OK(child);
  Result<Snapshot> merged = cache->merge(std::move(*parent), std::move(*child));
  ASSERT_OK(merged);
  const History at_6 = history;
  update_and_check(*cache, history, 9);
  ASSERT_OK(cache->restore(*merged, 1));
  history = at_6;
  history.truncate(1);
  expect_window(*cache, history);
  update_and_check(*cache, history, 3);
}

TEST(RotatingKVCacheTest, MergeRefusesAndMovesNothing) {
  const RotatingKVCacheOptions o = small_options(4, 1);
  std::unique_ptr<RotatingKVCache> cache = make_cache(o);
  std::unique_ptr<RotatingKVCache> twin = make_cache(o);  // same layout, another cache
  std::unique_ptr<RotatingKVCache> wide = make_cache(small_options(5, 1));
  History history(o, test_seed());
  History twin_history(o, test_seed() + 1);
  History wide_history(small_options(5, 1), test_seed() + 2);
  const auto take = [](RotatingKVCache& c, History& h, int64_t count, int64_t from) {
    const Input in = h.next(count);
    EXPECT_OK(c.update(in.k, in.v));
    Result<std::optional<Snapshot>> s = c.snapshot(from);
    EXPECT_OK(s);
    return std::move(*s);
  };
  std::optional<Snapshot> a = take(*cache, history, 2, 0);      // [0, 2)
  std::optional<Snapshot> c = take(*cache, history, 3, 3);      // [3, 5)
  std::optional<Snapshot> t = take(*twin, twin_history, 5, 2);  // [2, 5), twin
  std::optional<Snapshot> w = take(*wide, wide_history, 5, 2);  // [2, 5), other layout
  const auto intact = [](const std::optional<Snapshot>& s, int64_t begin, int64_t end) {
    return s.has_value() && s->begin() == begin && s->end() == end && s->arrays().size() == 2 &&
           s->num_bytes() > 0;
  };
  std::optional<Snapshot> missing;
  EXPECT_TRUE(has_error(cache->merge(std::move(missing), std::move(a)), Code::invalid_argument,
                        "RotatingKVCache.merge: parent is missing, expected a snapshot"));
  EXPECT_TRUE(has_error(cache->merge(std::move(a), std::move(missing)), Code::invalid_argument,
                        "child is missing"));
  EXPECT_TRUE(intact(a, 0, 2));
  EXPECT_TRUE(has_error(cache->merge(std::move(a), std::move(c)), Code::invalid_argument,
                        "parent covers [0, 2) and child [3, 5), expected adjacent ranges"));
  EXPECT_TRUE(has_error(cache->merge(std::move(a), std::move(t)), Code::invalid_argument,
                        "child comes from cache"));
  EXPECT_TRUE(has_error(cache->merge(std::move(a), std::move(w)), Code::invalid_argument,
                        "child has layout"));
  EXPECT_TRUE(has_error(cache->merge(std::move(w), std::move(c)), Code::invalid_argument,
                        "parent has layout"));
  EXPECT_TRUE(intact(a, 0, 2));
  EXPECT_TRUE(intact(c, 3, 5));
  EXPECT_TRUE(intact(t, 2, 5));
  EXPECT_TRUE(intact(w, 2, 5));
}

TEST(RotatingKVCacheTest, SplitReturnsTheWholeSnapshotSecond) {
  const RotatingKVCacheOptions o = small_options(4, 1);
  std::unique_ptr<RotatingKVCache> cache = make_cache(o);
  History history(o, test_seed());
  update_and_check(*cache, history, 6);
  Result<std::optional<Snapshot>> snap = cache->snapshot(2);
  ASSERT_OK(snap);
  const Bytes keys = view_bytes((*snap)->arrays()[0].view(o.dtype, {1, 4, 2, 3}));
  Snapshot s = std::move(**snap);
  for (int64_t at : {0, 2, 4, 6, 9}) {
    SCOPED_TRACE("at " + std::to_string(at));
    Result<SnapshotPair> pair = cache->split(std::move(s), at);
    ASSERT_OK(pair);
    EXPECT_FALSE(pair->first.has_value());
    ASSERT_TRUE(pair->second.has_value());
    EXPECT_EQ(pair->second->begin(), 2);
    EXPECT_EQ(pair->second->end(), 6);
    EXPECT_EQ(view_bytes(pair->second->arrays()[0].view(o.dtype, {1, 4, 2, 3})), keys);
    s = std::move(*pair->second);
  }
  std::unique_ptr<RotatingKVCache> other = make_cache(small_options(4, 0));
  EXPECT_TRUE(has_error(other->split(std::move(s), 4), Code::invalid_argument,
                        "RotatingKVCache.split: s has layout"));
  EXPECT_EQ(s.begin(), 2);
  EXPECT_EQ(view_bytes(s.arrays()[0].view(o.dtype, {1, 4, 2, 3})), keys);
}

// --- free ---

TEST(RotatingKVCacheTest, FreeEmptiesAndTheCacheIsUsableAgain) {
  const RotatingKVCacheOptions o = small_options(4, 2, DType::f32, 2);
  std::unique_ptr<RotatingKVCache> cache = make_cache(o);
  History history(o, test_seed());
  update_and_check(*cache, history, 9);
  cache->free();
  EXPECT_EQ(cache->offset(), 0);
  EXPECT_EQ(cache->window_len(), 0);
  EXPECT_FALSE(cache->has_wrapped());
  EXPECT_EQ(cache->state()[0].numel(), 0);
  EXPECT_OK(cache->restore(0));
  history.truncate(0);
  for (int i = 0; i < 8; ++i) update_and_check(*cache, history, 1 + i % 3);
  expect_window(*cache, history);
  cache->free();
  cache->free();
  EXPECT_EQ(cache->offset(), 0);
}

}  // namespace
}  // namespace kvcache

namespace kvcache {
namespace {

// Tokens [first, first + n) of an update() view [B, H, n_view, D].
TensorView tokens_of(const TensorView& view, int64_t first, int64_t n) {
  TensorView out = view;
  out.shape[2] = n;
  out.data = static_cast<char*>(view.data) +
             first * view.strides[2] * static_cast<int64_t>(size_of(view.dtype));
  return out;
}

TEST(RotatingKVCacheTest, UpdateFromItsOwnViewsEqualsUpdateFromACopy) {
  // Feeding back tokens of a returned view (they alias the storage the update moves) must act as
  // if they had been copied first.
  for (const int64_t keep : {0, 2}) {
    SCOPED_TRACE("keep " + std::to_string(keep));
    const RotatingKVCacheOptions o = small_options(5, keep);
    std::unique_ptr<RotatingKVCache> aliased = make_cache(o);
    std::unique_ptr<RotatingKVCache> copied = make_cache(o);
    History history(o, test_seed());
    for (int step = 0; step < 30; ++step) {
      SCOPED_TRACE("step " + std::to_string(step));
      const int64_t count = 1 + step % 3;
      const Input in = history.next(count);
      Result<CacheViews> a = aliased->update(in.k, in.v);
      ASSERT_OK(a);
      ASSERT_OK(copied->update(in.k, in.v));
      // Re-append the oldest token(s) straight from the aliased cache's own view: the pinned
      // block moves over them.
      const int64_t again = std::min<int64_t>(2, a->keys.shape[2]);
      const TensorView k_alias = tokens_of(a->keys, 0, again);
      const TensorView v_alias = tokens_of(a->values, 0, again);
      std::vector<uint8_t> k_bytes = view_bytes(k_alias);
      std::vector<uint8_t> v_bytes = view_bytes(v_alias);
      const TensorView k_copy = TensorView::contiguous(
          k_bytes.data(), o.dtype, {o.batch, o.num_kv_heads, again, o.head_dim});
      const TensorView v_copy = TensorView::contiguous(
          v_bytes.data(), o.dtype, {o.batch, o.num_kv_heads, again, o.head_dim_v});
      Result<CacheViews> from_alias = aliased->update(k_alias, v_alias);
      Result<CacheViews> from_copy = copied->update(k_copy, v_copy);
      ASSERT_OK(from_alias);
      ASSERT_OK(from_copy);
      EXPECT_EQ(view_bytes(from_alias->keys), view_bytes(from_copy->keys));
      EXPECT_EQ(view_bytes(from_alias->values), view_bytes(from_copy->values));
      const std::vector<TensorView> sa = aliased->state();
      const std::vector<TensorView> sc = copied->state();
      EXPECT_EQ(view_bytes(sa[0]), view_bytes(sc[0]));
      EXPECT_EQ(view_bytes(sa[1]), view_bytes(sc[1]));
    }
  }
}

}  // namespace
}  // namespace kvcache
