// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "kvcache/recurrent_cache.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "kvcache/cache.h"
#include "kvcache/dtype.h"
#include "kvcache/tensor.h"

#include "testing/test_util.h"

namespace kvcache {
namespace {

using ::kvcache::testing::buffer_bytes;
using ::kvcache::testing::CacheFingerprint;
using ::kvcache::testing::fingerprint;
using ::kvcache::testing::has_error;
using ::kvcache::testing::random_tensor;
using ::kvcache::testing::RandomTensor;
using ::kvcache::testing::seed_trace;
using ::kvcache::testing::test_seed;
using ::kvcache::testing::view_bytes;

RecurrentCacheOptions small_options(DType dtype = DType::f32, int64_t conv_tail = 3) {
  RecurrentCacheOptions o;
  o.conv_tail = conv_tail;
  o.conv_dim = 4;
  o.num_v_heads = 2;
  o.head_v_dim = 3;
  o.head_k_dim = 5;
  o.dtype = dtype;
  o.batch = 2;
  return o;
}

std::unique_ptr<RecurrentCache> make_cache(const RecurrentCacheOptions& o) {
  return ::kvcache::testing::value_or_fail(RecurrentCache::create(o));
}

float read_float(const void* p, DType dtype) {
  float value = 0.0f;
  to_float(dtype, p, &value, 1);
  return value;
}

void write_float(void* p, DType dtype, float value) { from_float(&value, dtype, p, 1); }

// Random states; `strided` ones are not contiguous (see testing::strided_layout).
RandomTensor random_conv(const RecurrentCacheOptions& o, std::mt19937& rng, bool strided = false) {
  return random_tensor(o.dtype, {o.batch, o.conv_tail, o.conv_dim}, rng, strided);
}
RandomTensor random_delta(const RecurrentCacheOptions& o, std::mt19937& rng, bool strided = false) {
  return random_tensor(o.dtype, {o.batch, o.num_v_heads, o.head_v_dim, o.head_k_dim}, rng, strided);
}

// A cache with random state at offset `offset`.
std::unique_ptr<RecurrentCache> filled_cache(const RecurrentCacheOptions& o, std::mt19937& rng,
                                             int64_t offset) {
  std::unique_ptr<RecurrentCache> cache = make_cache(o);
  if (cache == nullptr) return nullptr;
  RandomTensor conv = random_conv(o, rng);
  RandomTensor delta = random_delta(o, rng);
  EXPECT_OK(cache->update(conv.view, delta.view));
  EXPECT_OK(cache->advance(offset));
  return cache;
}

Snapshot take_snapshot(const RecurrentCache& cache, int64_t from) {
  Result<std::optional<Snapshot>> s = cache.snapshot(from);
  EXPECT_OK(s);
  EXPECT_TRUE(s.ok() && s->has_value());
  return std::move(**s);
}

// --- create ---

TEST(RecurrentCacheTest, CreateZeroesBothStatesWithTheDocumentedShapes) {
  for (DType dtype : {DType::f32, DType::f16, DType::bf16}) {
    SCOPED_TRACE(name(dtype));
    const RecurrentCacheOptions o = small_options(dtype);
    std::unique_ptr<RecurrentCache> cache = make_cache(o);
    ASSERT_NE(cache, nullptr);
    EXPECT_EQ(cache->kind(), CacheKind::recurrent);
    EXPECT_EQ(cache->offset(), 0);
    EXPECT_EQ(cache->options().head_k_dim, 5);
    const TensorView conv = cache->conv_state();
    const TensorView delta = cache->delta_state();
    EXPECT_EQ(conv.shape_string(), "[2, 3, 4]");
    EXPECT_EQ(delta.shape_string(), "[2, 2, 3, 5]");
    EXPECT_TRUE(conv.is_contiguous());
    EXPECT_TRUE(delta.is_contiguous());
    EXPECT_EQ(conv.dtype, dtype);
    EXPECT_EQ(delta.dtype, dtype);
    EXPECT_EQ(view_bytes(conv), std::vector<uint8_t>(conv.num_bytes(), 0));
    EXPECT_EQ(view_bytes(delta), std::vector<uint8_t>(delta.num_bytes(), 0));
    const std::vector<TensorView> state = cache->state();
    ASSERT_EQ(state.size(), 2u);
    EXPECT_EQ(state[0].data, conv.data);
    EXPECT_EQ(state[1].data, delta.data);
  }
}

TEST(RecurrentCacheTest, CreateAcceptsNoConvState) {
  for (int64_t conv_dim : {0, 7}) {
    RecurrentCacheOptions o = small_options(DType::f32, /*conv_tail=*/0);
    o.conv_dim = conv_dim;
    std::unique_ptr<RecurrentCache> cache = make_cache(o);
    ASSERT_NE(cache, nullptr);
    EXPECT_EQ(cache->conv_state().numel(), 0);
    EXPECT_EQ(cache->conv_state().rank, 3);
    EXPECT_EQ(cache->delta_state().numel(), 2 * 2 * 3 * 5);
  }
}

TEST(RecurrentCacheTest, CreateRefusesBadOptions) {
  struct Case {
    RecurrentCacheOptions options;
    const char* fragment;
  };
  std::vector<Case> cases;
  const auto with = [&](auto edit, const char* fragment) {
    RecurrentCacheOptions o = small_options();
    edit(o);
    cases.push_back({o, fragment});
  };
  with([](auto& o) { o.conv_tail = -1; }, "conv_tail is -1, expected >= 0");
  with([](auto& o) { o.conv_dim = 0; }, "conv_dim is 0, expected > 0 when conv_tail > 0");
  with(
      [](auto& o) {
        o.conv_tail = 0;
        o.conv_dim = -2;
      },
      "conv_dim is -2, expected >= 0");
  with([](auto& o) { o.num_v_heads = 0; }, "num_v_heads is 0, expected > 0");
  with([](auto& o) { o.head_v_dim = -3; }, "head_v_dim is -3, expected > 0");
  with([](auto& o) { o.head_k_dim = 0; }, "head_k_dim is 0, expected > 0");
  with([](auto& o) { o.batch = 0; }, "batch is 0, expected > 0");
  with([](auto& o) { o.dtype = DType::f64; }, "dtype is f64, expected f32, f16 or bf16");
  with([](auto& o) { o.dtype = DType::fp8_e4m3; }, "dtype is fp8_e4m3, expected f32");
  with([](auto& o) { o.dtype = DType::int8; }, "dtype is int8, expected f32");
  with([](auto& o) { o.head_k_dim = int64_t{1} << 62; }, "state size overflows");
  for (const Case& c : cases) {
    SCOPED_TRACE(c.fragment);
    EXPECT_TRUE(has_error(RecurrentCache::create(c.options), Code::invalid_argument,
                          std::string("RecurrentCache.create: ") + c.fragment));
  }
}

TEST(RecurrentCacheTest, CachesHaveDistinctIds) {
  std::unique_ptr<RecurrentCache> a = make_cache(small_options());
  std::unique_ptr<RecurrentCache> b = make_cache(small_options());
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  EXPECT_NE(a->id(), b->id());
}

// --- update / advance ---

class RecurrentCacheDTypeTest : public ::testing::TestWithParam<DType> {};

TEST_P(RecurrentCacheDTypeTest, UpdateReplacesTheStateFromAnyStrides) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  const RecurrentCacheOptions o = small_options(GetParam());
  std::unique_ptr<RecurrentCache> cache = make_cache(o);
  ASSERT_NE(cache, nullptr);
  for (bool strided : {false, true, false}) {
    RandomTensor conv = random_conv(o, rng, strided);
    RandomTensor delta = random_delta(o, rng, strided);
    Result<CacheViews> views = cache->update(conv.view, delta.view);
    ASSERT_OK(views);
    EXPECT_EQ(cache->offset(), 0);  // update never moves the offset
    EXPECT_EQ(view_bytes(cache->conv_state()), view_bytes(conv.view));
    EXPECT_EQ(view_bytes(cache->delta_state()), view_bytes(delta.view));
    EXPECT_EQ(views->keys.data, cache->conv_state().data);
    EXPECT_EQ(views->values.data, cache->delta_state().data);
    EXPECT_EQ(views->keys.shape_string(), "[2, 3, 4]");
    EXPECT_EQ(views->values.shape_string(), "[2, 2, 3, 5]");
    EXPECT_EQ(views->num_pinned, 0);
    EXPECT_EQ(views->first_pos, 0);
  }
}

TEST_P(RecurrentCacheDTypeTest, UpdateWithoutConvState) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  const RecurrentCacheOptions o = small_options(GetParam(), /*conv_tail=*/0);
  std::unique_ptr<RecurrentCache> cache = make_cache(o);
  ASSERT_NE(cache, nullptr);
  RandomTensor delta = random_delta(o, rng);
  TensorView empty_conv = TensorView::contiguous(nullptr, o.dtype, {o.batch, 0, o.conv_dim});
  ASSERT_OK(cache->update(empty_conv, delta.view));
  EXPECT_EQ(view_bytes(cache->delta_state()), view_bytes(delta.view));
  EXPECT_EQ(cache->conv_state().numel(), 0);
}

INSTANTIATE_TEST_SUITE_P(RecurrentCache, RecurrentCacheDTypeTest,
                         ::testing::Values(DType::f32, DType::f16, DType::bf16),
                         [](const auto& param_info) {
                           return std::string(name(param_info.param));
                         });

TEST(RecurrentCacheTest, UpdateFromItsOwnViews) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  RecurrentCacheOptions o = small_options();
  o.head_v_dim = o.head_k_dim = 4;
  std::unique_ptr<RecurrentCache> cache = filled_cache(o, rng, 5);
  ASSERT_NE(cache, nullptr);
  const CacheFingerprint before = fingerprint(*cache);
  // The exact views update() returned: a no-op.
  ASSERT_OK(cache->update(cache->conv_state(), cache->delta_state()));
  EXPECT_EQ(fingerprint(*cache), before);
  // A transposed view of the cache's own delta state: the copy must not read what it wrote.
  TensorView transposed = cache->delta_state();
  std::swap(transposed.strides[2], transposed.strides[3]);
  std::vector<float> expected(static_cast<size_t>(transposed.numel()));
  for (int64_t i = 0; i < o.batch * o.num_v_heads; ++i) {
    for (int64_t r = 0; r < 4; ++r) {
      for (int64_t c = 0; c < 4; ++c) {
        expected[static_cast<size_t>(i * 16 + r * 4 + c)] =
            cache->delta_state().data_as<float>()[i * 16 + c * 4 + r];
      }
    }
  }
  ASSERT_OK(cache->update(cache->conv_state(), transposed));
  EXPECT_EQ(std::memcmp(cache->delta_state().data, expected.data(), expected.size() * 4), 0);
  EXPECT_EQ(fingerprint(*cache).arrays[0], before.arrays[0]);
}

TEST(RecurrentCacheTest, UpdateRefusesWrongInputsAndChangesNothing) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  const RecurrentCacheOptions o = small_options();
  std::unique_ptr<RecurrentCache> cache = filled_cache(o, rng, 7);
  ASSERT_NE(cache, nullptr);
  const CacheFingerprint before = fingerprint(*cache);
  RandomTensor conv = random_conv(o, rng);
  RandomTensor delta = random_delta(o, rng);

  struct Case {
    TensorView conv;
    TensorView delta;
    const char* fragment;
  };
  std::vector<Case> cases;
  const auto conv_with = [&](std::initializer_list<int64_t> shape, const char* fragment) {
    cases.push_back({TensorView::contiguous(conv.view.data, o.dtype, shape), delta.view, fragment});
  };
  const auto delta_with = [&](std::initializer_list<int64_t> shape, const char* fragment) {
    cases.push_back({conv.view, TensorView::contiguous(delta.view.data, o.dtype, shape), fragment});
  };
  conv_with({2, 3}, "conv_state has rank 2");
  conv_with({2, 3, 4, 1}, "conv_state has rank 4");
  conv_with({2, 2, 4}, "conv_state dim 1 (conv_tail) is 2, expected 3");
  conv_with({2, 3, 3}, "conv_state dim 2 (conv_dim) is 3, expected 4");
  delta_with({2, 2, 3}, "delta_state has rank 3");
  delta_with({2, 1, 3, 5}, "delta_state dim 1 (num_v_heads) is 1, expected 2");
  delta_with({2, 2, 2, 5}, "delta_state dim 2 (head_v_dim) is 2, expected 3");
  delta_with({2, 2, 3, 4}, "delta_state dim 3 (head_k_dim) is 4, expected 5");
  // A changed batch names both numbers, for either state.
  conv_with({1, 3, 4}, "conv_state batch is 1, expected batch 2");
  delta_with({1, 2, 3, 5}, "delta_state batch is 1, expected batch 2");
  const RandomTensor big_conv = random_tensor(o.dtype, {3, 3, 4}, rng);
  cases.push_back({big_conv.view, delta.view, "conv_state batch is 3, expected batch 2"});
  // Dtype, device and data.
  const RandomTensor conv16 = random_tensor(DType::f16, {2, 3, 4}, rng);
  cases.push_back({conv16.view, delta.view, "conv_state has dtype f16, expected f32"});
  const RandomTensor delta_bf16 = random_tensor(DType::bf16, {2, 2, 3, 5}, rng);
  cases.push_back({conv.view, delta_bf16.view, "delta_state has dtype bf16, expected f32"});
  TensorView on_gpu = delta.view;
  on_gpu.device = Device::cuda(0);
  cases.push_back({conv.view, on_gpu, "delta_state is on cuda:0, expected cpu"});
  TensorView null_conv = conv.view;
  null_conv.data = nullptr;
  cases.push_back({null_conv, delta.view, "conv_state has null data with 24 elements"});

  for (const Case& c : cases) {
    SCOPED_TRACE(c.fragment);
    EXPECT_TRUE(has_error(cache->update(c.conv, c.delta), Code::invalid_argument,
                          std::string("RecurrentCache.update: ") + c.fragment));
    EXPECT_EQ(fingerprint(*cache), before);
  }
}

TEST(RecurrentCacheTest, AdvanceMovesOnlyTheOffset) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  std::unique_ptr<RecurrentCache> cache = filled_cache(small_options(), rng, 0);
  ASSERT_NE(cache, nullptr);
  CacheFingerprint expected = fingerprint(*cache);
  for (int64_t n : {0, 1, 17, 0, 4}) {
    ASSERT_OK(cache->advance(n));
    expected.offset += n;
    EXPECT_EQ(fingerprint(*cache), expected);
  }
  EXPECT_EQ(cache->offset(), 22);
  EXPECT_TRUE(has_error(cache->advance(-1), Code::invalid_argument,
                        "RecurrentCache.advance: n is -1, expected n >= 0"));
  EXPECT_EQ(fingerprint(*cache), expected);
  EXPECT_TRUE(has_error(cache->advance(std::numeric_limits<int64_t>::max()), Code::invalid_argument,
                        "RecurrentCache.advance: n is"));
  EXPECT_EQ(fingerprint(*cache), expected);
}

// --- snapshot / restore ---

TEST(RecurrentCacheTest, SnapshotCopiesTheWholeState) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  for (int64_t conv_tail : {3, 0}) {
    const RecurrentCacheOptions o = small_options(DType::bf16, conv_tail);
    std::unique_ptr<RecurrentCache> cache = filled_cache(o, rng, 9);
    ASSERT_NE(cache, nullptr);
    const CacheFingerprint before = fingerprint(*cache);
    for (int64_t from : {0, 4, 8}) {
      Snapshot s = take_snapshot(*cache, from);
      EXPECT_EQ(s.kind(), CacheKind::recurrent);
      EXPECT_EQ(s.cache_id(), cache->id());
      EXPECT_EQ(s.begin(), from);
      EXPECT_EQ(s.end(), 9);
      EXPECT_EQ(s.layout(), (std::vector<int64_t>{conv_tail, 4, 2, 3, 5, 2,
                                                  static_cast<int64_t>(DType::bf16)}));
      ASSERT_EQ(s.arrays().size(), 2u);
      EXPECT_EQ(buffer_bytes(s.arrays()[0]), *before.arrays[0]);
      EXPECT_EQ(buffer_bytes(s.arrays()[1]), *before.arrays[1]);
      EXPECT_EQ(s.num_bytes(), cache->conv_state().num_bytes() + cache->delta_state().num_bytes());
      EXPECT_EQ(fingerprint(*cache), before);
    }
  }
}

TEST(RecurrentCacheTest, SnapshotOfNothingIsNoneAndBadRangesAreRefused) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  std::unique_ptr<RecurrentCache> cache = filled_cache(small_options(), rng, 6);
  ASSERT_NE(cache, nullptr);
  const CacheFingerprint before = fingerprint(*cache);
  Result<std::optional<Snapshot>> none = cache->snapshot(6);
  ASSERT_OK(none);
  EXPECT_FALSE(none->has_value());
  EXPECT_TRUE(has_error(cache->snapshot(-1), Code::invalid_argument,
                        "RecurrentCache.snapshot: from is -1, expected 0 <= from <= offset (6)"));
  EXPECT_TRUE(has_error(cache->snapshot(7), Code::invalid_argument, "from is 7, expected 0 <="));
  EXPECT_EQ(fingerprint(*cache), before);

  std::unique_ptr<RecurrentCache> fresh = make_cache(small_options());
  ASSERT_NE(fresh, nullptr);
  Result<std::optional<Snapshot>> empty = fresh->snapshot(0);
  ASSERT_OK(empty);
  EXPECT_FALSE(empty->has_value());
}

TEST(RecurrentCacheTest, RestoreWithoutSnapshotOnlyAcceptsTheOffset) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  std::unique_ptr<RecurrentCache> cache = filled_cache(small_options(), rng, 5);
  ASSERT_NE(cache, nullptr);
  const CacheFingerprint before = fingerprint(*cache);
  EXPECT_OK(cache->restore(5));
  EXPECT_EQ(fingerprint(*cache), before);
  for (int64_t target : {0, 4, 6, -1}) {
    SCOPED_TRACE(target);
    EXPECT_TRUE(has_error(cache->restore(target), Code::invalid_argument,
                          "RecurrentCache.restore: target is " + std::to_string(target) +
                              ", expected target == offset() = 5 (a recurrent state cannot "
                              "rewind without a snapshot)"));
    EXPECT_EQ(fingerprint(*cache), before);
  }
}

TEST(RecurrentCacheTest, RestoreFromSnapshotReplacesStateAndOffset) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  const RecurrentCacheOptions o = small_options(DType::f16);
  std::unique_ptr<RecurrentCache> cache = filled_cache(o, rng, 4);
  ASSERT_NE(cache, nullptr);
  const CacheFingerprint at4 = fingerprint(*cache);
  Snapshot s = take_snapshot(*cache, 1);  // [1, 4)
  // Move on, then come back.
  RandomTensor conv = random_conv(o, rng);
  RandomTensor delta = random_delta(o, rng);
  ASSERT_OK(cache->update(conv.view, delta.view));
  ASSERT_OK(cache->advance(6));
  ASSERT_NE(fingerprint(*cache), at4);
  ASSERT_OK(cache->restore(s, 4));
  EXPECT_EQ(fingerprint(*cache), at4);
  // Forward too: the state is whole, so nothing before 1 needs to be held.
  ASSERT_OK(cache->advance(2));  // offset 6
  ASSERT_OK(cache->restore(s, 4));
  EXPECT_EQ(fingerprint(*cache), at4);
  // The snapshot stays usable.
  EXPECT_EQ(buffer_bytes(s.arrays()[1]), *at4.arrays[1]);

  // A snapshot of another cache of the same layout restores too (only merge checks the cache).
  std::unique_ptr<RecurrentCache> other = filled_cache(o, rng, 11);
  ASSERT_NE(other, nullptr);
  Snapshot t = take_snapshot(*other, 10);
  ASSERT_OK(cache->restore(t, 11));
  EXPECT_EQ(fingerprint(*cache), fingerprint(*other));
}

TEST(RecurrentCacheTest, RestoreFromSnapshotRefusesOtherTargets) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  std::unique_ptr<RecurrentCache> cache = filled_cache(small_options(), rng, 8);
  ASSERT_NE(cache, nullptr);
  Snapshot s = take_snapshot(*cache, 3);  // [3, 8)
  RandomTensor conv = random_conv(small_options(), rng);
  RandomTensor delta = random_delta(small_options(), rng);
  ASSERT_OK(cache->update(conv.view, delta.view));
  ASSERT_OK(cache->advance(2));
  const CacheFingerprint before = fingerprint(*cache);
  for (int64_t target : {3, 5, 7, 9, 10, -1}) {
    SCOPED_TRACE(target);
    EXPECT_TRUE(has_error(cache->restore(s, target), Code::invalid_argument,
                          "RecurrentCache.restore: target is " + std::to_string(target) +
                              ", expected target == snapshot end 8 (a recurrent snapshot is "
                              "restored only to exactly that offset)"));
    EXPECT_EQ(fingerprint(*cache), before);
  }
}

TEST(RecurrentCacheTest, RestoreRefusesSnapshotsOfAnotherShapeOrKind) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  const RecurrentCacheOptions o = small_options();
  std::unique_ptr<RecurrentCache> cache = filled_cache(o, rng, 4);
  ASSERT_NE(cache, nullptr);
  const CacheFingerprint before = fingerprint(*cache);

  std::vector<std::pair<RecurrentCacheOptions, Snapshot>> others;
  const auto other_with = [&](auto edit) {
    RecurrentCacheOptions p = o;
    edit(p);
    std::unique_ptr<RecurrentCache> other = filled_cache(p, rng, 4);
    ASSERT_NE(other, nullptr);
    others.emplace_back(p, take_snapshot(*other, 0));
  };
  other_with([](auto& p) { p.conv_tail = 2; });
  other_with([](auto& p) { p.conv_dim = 5; });
  other_with([](auto& p) { p.num_v_heads = 1; });
  other_with([](auto& p) { p.head_v_dim = 5; });
  other_with([](auto& p) { p.head_k_dim = 3; });
  other_with([](auto& p) { p.batch = 1; });
  other_with([](auto& p) { p.dtype = DType::bf16; });
  for (const auto& [p, snap] : others) {
    EXPECT_TRUE(has_error(
        cache->restore(snap, 4), Code::invalid_argument,
        "RecurrentCache.restore: snapshot has layout [" + std::to_string(p.conv_tail) + ", "));
    EXPECT_TRUE(has_error(cache->restore(snap, 4), Code::invalid_argument,
                          "expected [3, 4, 2, 3, 5, 2, 0] (conv_tail, conv_dim, num_v_heads, "
                          "head_v_dim, head_k_dim, batch, dtype)"));
    EXPECT_EQ(fingerprint(*cache), before);
  }

  // Another kind with the same layout numbers.
  std::vector<Buffer> arrays;
  arrays.push_back(std::move(*Buffer::allocate(Device::cpu(), 2 * 3 * 4 * 4)));
  arrays.push_back(std::move(*Buffer::allocate(Device::cpu(), 2 * 2 * 3 * 5 * 4)));
  Snapshot foreign(CacheKind::contiguous, cache->id(), {3, 4, 2, 3, 5, 2, 0}, 0, 4,
                   std::move(arrays));
  EXPECT_TRUE(has_error(cache->restore(foreign, 4), Code::invalid_argument,
                        "RecurrentCache.restore: snapshot is of a contiguous cache, expected "
                        "recurrent"));
  EXPECT_EQ(fingerprint(*cache), before);

  // Right kind and layout, arrays that do not match it (a hand-built snapshot).
  std::vector<Buffer> short_arrays;
  short_arrays.push_back(std::move(*Buffer::allocate(Device::cpu(), 2 * 3 * 4 * 4)));
  short_arrays.push_back(std::move(*Buffer::allocate(Device::cpu(), 8)));
  Snapshot bad(CacheKind::recurrent, cache->id(), {3, 4, 2, 3, 5, 2, 0}, 0, 4,
               std::move(short_arrays));
  EXPECT_TRUE(has_error(cache->restore(bad, 4), Code::invalid_argument,
                        "snapshot array 1 has 8 bytes on cpu, expected 240 on cpu"));
  // An empty range.
  Snapshot good = take_snapshot(*cache, 0);
  std::vector<Buffer> copies;
  for (const Buffer& b : good.arrays()) copies.push_back(std::move(*b.clone()));
  Snapshot empty(CacheKind::recurrent, cache->id(), good.layout(), 4, 4, std::move(copies));
  EXPECT_TRUE(
      has_error(cache->restore(empty, 4), Code::invalid_argument, "snapshot covers [4, 4)"));
  EXPECT_EQ(fingerprint(*cache), before);
}

// --- merge / split ---

TEST(RecurrentCacheTest, MergeKeepsTheChildState) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  const RecurrentCacheOptions o = small_options();
  std::unique_ptr<RecurrentCache> cache = filled_cache(o, rng, 3);
  ASSERT_NE(cache, nullptr);
  std::optional<Snapshot> parent = take_snapshot(*cache, 0);  // [0, 3)
  RandomTensor conv = random_conv(o, rng);
  RandomTensor delta = random_delta(o, rng);
  ASSERT_OK(cache->update(conv.view, delta.view));
  ASSERT_OK(cache->advance(4));
  std::optional<Snapshot> child = take_snapshot(*cache, 3);  // [3, 7)
  const CacheFingerprint before = fingerprint(*cache);
  const void* child_delta = child->arrays()[1].data();

  Result<Snapshot> merged = cache->merge(std::move(parent), std::move(child));
  ASSERT_OK(merged);
  EXPECT_FALSE(parent.has_value());
  EXPECT_FALSE(child.has_value());
  EXPECT_EQ(merged->arrays()[1].data(), child_delta);  // the child's state, adopted, not copied
  EXPECT_EQ(merged->begin(), 0);
  EXPECT_EQ(merged->end(), 7);
  EXPECT_EQ(merged->cache_id(), cache->id());
  EXPECT_EQ(merged->kind(), CacheKind::recurrent);
  EXPECT_EQ(buffer_bytes(merged->arrays()[0]), *before.arrays[0]);
  EXPECT_EQ(buffer_bytes(merged->arrays()[1]), *before.arrays[1]);
  EXPECT_EQ(fingerprint(*cache), before);
  // The merged snapshot restores like any other.
  ASSERT_OK(cache->advance(3));
  ASSERT_OK(cache->restore(*merged, 7));
  EXPECT_EQ(fingerprint(*cache), before);
}

TEST(RecurrentCacheTest, MergeRefusesAndMovesNeitherInput) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  const RecurrentCacheOptions o = small_options();
  std::unique_ptr<RecurrentCache> cache = filled_cache(o, rng, 4);
  std::unique_ptr<RecurrentCache> other = filled_cache(o, rng, 9);  // same layout, other cache
  RecurrentCacheOptions wide = o;
  wide.conv_dim = 6;
  std::unique_ptr<RecurrentCache> shaped = filled_cache(wide, rng, 9);  // other layout
  ASSERT_NE(cache, nullptr);
  ASSERT_NE(other, nullptr);
  ASSERT_NE(shaped, nullptr);
  std::optional<Snapshot> a = take_snapshot(*cache, 0);  // [0, 4)
  ASSERT_OK(cache->advance(2));
  std::optional<Snapshot> gap = take_snapshot(*cache, 5);      // [5, 6)
  std::optional<Snapshot> overlap = take_snapshot(*cache, 3);  // [3, 6)
  std::optional<Snapshot> foreign = take_snapshot(*other, 4);  // [4, 9), other cache
  std::optional<Snapshot> wrong_shape = take_snapshot(*shaped, 4);
  std::vector<Buffer> arrays;
  for (const Buffer& b : a->arrays()) arrays.push_back(std::move(*b.clone()));
  std::optional<Snapshot> wrong_kind(
      Snapshot(CacheKind::rotating, cache->id(), a->layout(), 4, 6, std::move(arrays)));
  std::optional<Snapshot> none;
  const CacheFingerprint before = fingerprint(*cache);

  struct Case {
    std::optional<Snapshot>* parent;
    std::optional<Snapshot>* child;
    const char* fragment;
  };
  const std::vector<Case> cases = {
      {&none, &gap, "RecurrentCache.merge: parent is missing, expected a snapshot"},
      {&a, &none, "RecurrentCache.merge: child is missing, expected a snapshot"},
      {&a, &gap,
       "parent covers [0, 4) and child [5, 6), expected adjacent ranges (child begins at 4)"},
      {&a, &overlap, "parent covers [0, 4) and child [3, 6)"},
      {&a, &foreign, "RecurrentCache.merge: child comes from cache"},
      {&foreign, &gap, "expected the parent's cache"},
      {&a, &wrong_shape, "RecurrentCache.merge: child has layout [3, 6, 2, 3, 5, 2, 0]"},
      {&a, &wrong_kind, "RecurrentCache.merge: child is of a rotating cache, expected recurrent"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.fragment);
    std::vector<std::vector<uint8_t>> bytes_before;
    for (auto* side : {c.parent, c.child}) {
      if (side->has_value()) bytes_before.push_back(buffer_bytes((*side)->arrays()[1]));
    }
    const bool had_parent = c.parent->has_value();
    const bool had_child = c.child->has_value();
    EXPECT_TRUE(has_error(cache->merge(std::move(*c.parent), std::move(*c.child)),
                          Code::invalid_argument, c.fragment));
    ASSERT_EQ(c.parent->has_value(), had_parent);
    ASSERT_EQ(c.child->has_value(), had_child);
    std::vector<std::vector<uint8_t>> bytes_after;
    for (auto* side : {c.parent, c.child}) {
      if (side->has_value()) bytes_after.push_back(buffer_bytes((*side)->arrays()[1]));
    }
    EXPECT_EQ(bytes_after, bytes_before);
    EXPECT_EQ(fingerprint(*cache), before);
  }
  // Still whole: the refused pair merges once it is adjacent.
  std::optional<Snapshot> adjacent = take_snapshot(*cache, 4);  // [4, 6)
  Result<Snapshot> merged = cache->merge(std::move(a), std::move(adjacent));
  ASSERT_OK(merged);
  EXPECT_EQ(merged->begin(), 0);
  EXPECT_EQ(merged->end(), 6);
}

TEST(RecurrentCacheTest, SplitAlwaysReturnsTheWholeSnapshotSecond) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  const RecurrentCacheOptions o = small_options();
  std::unique_ptr<RecurrentCache> cache = filled_cache(o, rng, 8);
  ASSERT_NE(cache, nullptr);
  const CacheFingerprint before = fingerprint(*cache);
  for (int64_t at : {-1, 2, 3, 5, 8, 12}) {
    SCOPED_TRACE(at);
    Snapshot s = take_snapshot(*cache, 2);  // [2, 8)
    Result<SnapshotPair> pair = cache->split(std::move(s), at);
    ASSERT_OK(pair);
    EXPECT_FALSE(pair->first.has_value());
    ASSERT_TRUE(pair->second.has_value());
    EXPECT_EQ(pair->second->begin(), 2);
    EXPECT_EQ(pair->second->end(), 8);
    EXPECT_EQ(buffer_bytes(pair->second->arrays()[0]), *before.arrays[0]);
    EXPECT_EQ(buffer_bytes(pair->second->arrays()[1]), *before.arrays[1]);
  }
  EXPECT_EQ(fingerprint(*cache), before);
}

TEST(RecurrentCacheTest, SplitRefusesAnotherKindOrLayoutAndKeepsIt) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  const RecurrentCacheOptions o = small_options();
  std::unique_ptr<RecurrentCache> cache = filled_cache(o, rng, 8);
  RecurrentCacheOptions tall = o;
  tall.head_v_dim = 4;
  std::unique_ptr<RecurrentCache> shaped = filled_cache(tall, rng, 8);
  ASSERT_NE(cache, nullptr);
  ASSERT_NE(shaped, nullptr);
  Snapshot wrong_shape = take_snapshot(*shaped, 1);
  const std::vector<uint8_t> shape_bytes = buffer_bytes(wrong_shape.arrays()[1]);
  EXPECT_TRUE(has_error(cache->split(std::move(wrong_shape), 4), Code::invalid_argument,
                        "RecurrentCache.split: s has layout [3, 4, 2, 4, 5, 2, 0], expected "
                        "[3, 4, 2, 3, 5, 2, 0]"));
  EXPECT_EQ(buffer_bytes(wrong_shape.arrays()[1]), shape_bytes);  // not moved from
  EXPECT_EQ(wrong_shape.end(), 8);

  std::vector<Buffer> arrays;
  arrays.push_back(std::move(*Buffer::allocate(Device::cpu(), 16)));
  Snapshot wrong_kind(CacheKind::contiguous, cache->id(), {3, 4, 2, 3, 5, 2, 0}, 0, 8,
                      std::move(arrays));
  EXPECT_TRUE(has_error(cache->split(std::move(wrong_kind), 4), Code::invalid_argument,
                        "RecurrentCache.split: s is of a contiguous cache, expected recurrent"));
  EXPECT_EQ(wrong_kind.arrays().size(), 1u);
  EXPECT_EQ(wrong_kind.kind(), CacheKind::contiguous);
}

// --- free ---

TEST(RecurrentCacheTest, FreeReleasesAndUpdateReallocates) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  const RecurrentCacheOptions o = small_options(DType::bf16);
  std::unique_ptr<RecurrentCache> cache = filled_cache(o, rng, 6);
  ASSERT_NE(cache, nullptr);
  Snapshot s = take_snapshot(*cache, 0);
  const CacheFingerprint at6 = fingerprint(*cache);
  cache->free();
  EXPECT_EQ(cache->offset(), 0);
  EXPECT_EQ(cache->conv_state().data, nullptr);
  EXPECT_EQ(cache->delta_state().data, nullptr);
  EXPECT_EQ(cache->delta_state().shape_string(), "[2, 2, 3, 5]");
  for (const TensorView& v : cache->state()) EXPECT_EQ(v.data, nullptr);
  Result<std::optional<Snapshot>> none = cache->snapshot(0);
  ASSERT_OK(none);
  EXPECT_FALSE(none->has_value());
  EXPECT_OK(cache->restore(0));
  EXPECT_TRUE(has_error(cache->restore(6), Code::invalid_argument, "cannot rewind"));

  // A freed state is zero: a snapshot after advance() holds zeros.
  ASSERT_OK(cache->advance(2));
  Snapshot zeros = take_snapshot(*cache, 0);
  EXPECT_EQ(buffer_bytes(zeros.arrays()[1]), std::vector<uint8_t>(zeros.arrays()[1].num_bytes()));
  EXPECT_EQ(cache->delta_state().data, nullptr);

  // restore(snapshot) reallocates ...
  ASSERT_OK(cache->restore(s, 6));
  EXPECT_EQ(fingerprint(*cache), at6);
  // ... and so does update().
  cache->free();
  RandomTensor conv = random_conv(o, rng, /*strided=*/true);
  RandomTensor delta = random_delta(o, rng);
  ASSERT_OK(cache->update(conv.view, delta.view));
  EXPECT_EQ(view_bytes(cache->conv_state()), view_bytes(conv.view));
  EXPECT_EQ(view_bytes(cache->delta_state()), view_bytes(delta.view));
  EXPECT_EQ(cache->offset(), 0);
  cache->free();
  cache->free();  // twice is fine
  EXPECT_EQ(cache->offset(), 0);
}

TEST(RecurrentCacheTest, RefusalsAfterFreeChangeNothing) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  const RecurrentCacheOptions o = small_options();
  std::unique_ptr<RecurrentCache> cache = filled_cache(o, rng, 3);
  ASSERT_NE(cache, nullptr);
  Snapshot s = take_snapshot(*cache, 0);
  cache->free();
  const CacheFingerprint before = fingerprint(*cache);
  const RandomTensor conv = random_tensor(o.dtype, {1, 3, 4}, rng);
  RandomTensor delta = random_delta(o, rng);
  EXPECT_TRUE(has_error(cache->update(conv.view, delta.view), Code::invalid_argument,
                        "batch is 1, expected batch 2"));
  EXPECT_TRUE(has_error(cache->restore(s, 2), Code::invalid_argument, "target is 2"));
  EXPECT_EQ(fingerprint(*cache), before);
}

// --- a real use: a toy delta-rule layer driven through the cache ---

float round_to(float value, DType dtype) {
  if (dtype == DType::f32) return value;
  uint16_t bits = 0;
  write_float(&bits, dtype, value);
  return read_float(&bits, dtype);
}

// Token t of a deterministic input stream: a conv input row x [B, conv_dim] and the outer-product
// factors v [B, Hv, Dv], k [B, Hv, Dk] of a delta-rule-like update S = a * S + v k^T.
struct ToyLayer {
  RecurrentCacheOptions o;
  uint32_t stream_seed;

  std::vector<float> token_values(int64_t t, int64_t n) const {
    std::mt19937 rng(stream_seed * 7919u + static_cast<uint32_t>(t));
    std::uniform_real_distribution<float> mag(0.25f, 1.0f);
    std::bernoulli_distribution neg(0.5);
    std::vector<float> out(static_cast<size_t>(n));
    for (float& x : out) x = neg(rng) ? -mag(rng) : mag(rng);
    return out;
  }

  // Feeds tokens [cache.offset(), cache.offset() + n) through the layer, reading the state from
  // the cache and writing the new one back with update() + advance(n), as a model layer would.
  void run(RecurrentCache& cache, int64_t n) const {
    const int64_t b_n = o.batch;
    const int64_t hv = o.num_v_heads;
    const int64_t dv = o.head_v_dim;
    const int64_t dk = o.head_k_dim;
    const TensorView conv_in = cache.conv_state();
    const TensorView delta_in = cache.delta_state();
    std::vector<float> conv(static_cast<size_t>(conv_in.numel()));
    std::vector<float> delta(static_cast<size_t>(delta_in.numel()));
    const size_t elem = size_of(o.dtype);
    for (size_t i = 0; i < conv.size(); ++i) {
      conv[i] = read_float(static_cast<const uint8_t*>(conv_in.data) + i * elem, o.dtype);
    }
    for (size_t i = 0; i < delta.size(); ++i) {
      delta[i] = read_float(static_cast<const uint8_t*>(delta_in.data) + i * elem, o.dtype);
    }
    for (int64_t t = cache.offset(); t < cache.offset() + n; ++t) {
      const std::vector<float> x = token_values(t, b_n * (o.conv_dim + hv * (dv + dk)));
      for (int64_t b = 0; b < b_n; ++b) {
        const float* xb = x.data() + b * (o.conv_dim + hv * (dv + dk));
        // Conv state: the last conv_tail inputs, oldest first.
        float* cb = conv.data() + b * o.conv_tail * o.conv_dim;
        if (o.conv_tail > 0) {
          std::memmove(cb, cb + o.conv_dim, sizeof(float) * (o.conv_tail - 1) * o.conv_dim);
          std::memcpy(cb + (o.conv_tail - 1) * o.conv_dim, xb, sizeof(float) * o.conv_dim);
        }
        const float* v = xb + o.conv_dim;
        const float* k = v + hv * dv;
        for (int64_t h = 0; h < hv; ++h) {
          for (int64_t i = 0; i < dv; ++i) {
            for (int64_t j = 0; j < dk; ++j) {
              float& s = delta[static_cast<size_t>(((b * hv + h) * dv + i) * dk + j)];
              // Rounded to the state dtype every token, so chunking cannot change the result.
              s = round_to(0.75f * s + v[h * dv + i] * k[h * dk + j], o.dtype);
            }
          }
        }
      }
    }
    // Store in the cache dtype, as a layer computing in float would.
    std::vector<uint8_t> conv_out(conv.size() * elem);
    std::vector<uint8_t> delta_out(delta.size() * elem);
    from_float(conv.data(), o.dtype, conv_out.data(), conv.size());
    from_float(delta.data(), o.dtype, delta_out.data(), delta.size());
    ASSERT_OK(cache.update(
        TensorView::contiguous(conv_out.data(), o.dtype, {b_n, o.conv_tail, o.conv_dim}),
        TensorView::contiguous(delta_out.data(), o.dtype, {b_n, hv, dv, dk})));
    ASSERT_OK(cache.advance(n));
  }
};

class RecurrentCacheToyLayerTest
    : public ::testing::TestWithParam<std::tuple<DType, int64_t /*conv_tail*/>> {};

TEST_P(RecurrentCacheToyLayerTest, RestoredSnapshotReplaysToTheSameState) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  const auto [dtype, conv_tail] = GetParam();
  const ToyLayer layer{small_options(dtype, conv_tail), seed};
  constexpr int64_t kTokens = 23;
  const std::vector<int64_t> chunks = {5, 1, 1, 7, 1, 3, 1, 4};  // prefill, decode, prefill, ...

  // From scratch, snapshotting at every chunk boundary.
  std::unique_ptr<RecurrentCache> cache = make_cache(layer.o);
  ASSERT_NE(cache, nullptr);
  std::vector<Snapshot> snapshots;
  for (int64_t n : chunks) {
    const int64_t from = cache->offset();
    layer.run(*cache, n);
    ASSERT_FALSE(::testing::Test::HasFatalFailure());
    snapshots.push_back(take_snapshot(*cache, from));
  }
  ASSERT_EQ(cache->offset(), kTokens);
  const CacheFingerprint full = fingerprint(*cache);

  // Every state the layer went through differs from the last (the recurrence is live).
  for (size_t i = 0; i + 1 < snapshots.size(); ++i) {
    EXPECT_NE(buffer_bytes(snapshots[i].arrays()[1]), *full.arrays[1]);
  }

  // Restore each snapshot (after a divergent branch), replay the tail: the same final state.
  for (const Snapshot& s : snapshots) {
    SCOPED_TRACE(s.end());
    layer.run(*cache, 2);  // tokens past the end: a branch that the restore discards
    ASSERT_OK(cache->restore(s, s.end()));
    EXPECT_EQ(cache->offset(), s.end());
    int64_t left = kTokens - cache->offset();
    while (left > 0) {
      const int64_t n = std::min<int64_t>(left, 3);  // other chunking, same tokens
      layer.run(*cache, n);
      left -= n;
    }
    EXPECT_EQ(fingerprint(*cache), full);
  }

  // And a fresh cache restored from a mid-stream snapshot, merged with its successor.
  std::unique_ptr<RecurrentCache> other = make_cache(layer.o);
  ASSERT_NE(other, nullptr);
  std::optional<Snapshot> parent = std::move(snapshots[2]);
  std::optional<Snapshot> child = std::move(snapshots[3]);
  Result<Snapshot> merged = cache->merge(std::move(parent), std::move(child));
  ASSERT_OK(merged);
  ASSERT_OK(other->restore(*merged, merged->end()));
  layer.run(*other, kTokens - other->offset());
  EXPECT_EQ(fingerprint(*other), full);
}

INSTANTIATE_TEST_SUITE_P(RecurrentCache, RecurrentCacheToyLayerTest,
                         ::testing::Combine(::testing::Values(DType::f32, DType::f16, DType::bf16),
                                            ::testing::Values(int64_t{0}, int64_t{1}, int64_t{3})),
                         [](const auto& param_info) {
                           return std::string(name(std::get<0>(param_info.param))) + "_conv_tail" +
                                  std::to_string(std::get<1>(param_info.param));
                         });

}  // namespace
}  // namespace kvcache
