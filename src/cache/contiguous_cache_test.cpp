// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "kvcache/contiguous_cache.h"

#include <cstdint>
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
#include "kvcache/status.h"
#include "kvcache/tensor.h"

#include "testing/test_util.h"

namespace kvcache {
namespace {

using Bytes = std::vector<uint8_t>;
using testing::fingerprint;
using testing::has_error;
using testing::random_tensor;
using testing::RandomTensor;
using testing::seed_trace;
using testing::state_bytes;
using testing::test_seed;
using testing::value_or_fail;
using testing::view_bytes;

// Batch row b of a [batch, n, H, D] view.
TensorView row(const TensorView& t, int64_t b) {
  TensorView out;
  out.dtype = t.dtype;
  out.rank = t.rank - 1;
  for (int i = 1; i < t.rank; ++i) {
    out.shape[i - 1] = t.shape[i];
    out.strides[i - 1] = t.strides[i];
  }
  out.data = static_cast<char*>(t.data) + b * t.strides[0] * static_cast<int64_t>(size_of(t.dtype));
  return out;
}

void append_to(Bytes& dst, const Bytes& src) { dst.insert(dst.end(), src.begin(), src.end()); }

// Everything observable about a cache's contents, for "a refusal changes nothing" checks.
struct Captured {
  testing::CacheFingerprint fingerprint;
  int64_t len = 0;
  int64_t capacity = 0;
};

Captured capture(const KVCache& cache) {
  return {fingerprint(cache), cache.len(), cache.capacity()};
}

void expect_unchanged(const KVCache& cache, const Captured& before) {
  const Captured now = capture(cache);
  EXPECT_EQ(now.len, before.len);
  EXPECT_EQ(now.capacity, before.capacity);
  EXPECT_EQ(now.fingerprint, before.fingerprint);
}

// The cache, or null (with a test failure) when create() refuses.
std::unique_ptr<KVCache> must_create(const KVCacheOptions& options) {
  return value_or_fail(KVCache::create(options));
}

KVCacheOptions small_options(DType dtype = DType::f32) {
  KVCacheOptions o;
  o.num_layers = 2;
  o.num_kv_heads = 2;
  o.head_dim = 3;
  o.head_dim_v = 4;
  o.dtype = dtype;
  return o;
}

// Appends n random tokens to every layer and advances; returns the inputs, [layer][k|v].
std::vector<RandomTensor> fill(KVCache& cache, int64_t n, std::mt19937& rng, bool strided = false) {
  const KVCacheOptions& o = cache.options();
  std::vector<RandomTensor> inputs;
  for (int64_t l = 0; l < o.num_layers; ++l) {
    inputs.push_back(
        random_tensor(o.dtype, {o.batch, n, o.num_kv_heads, o.head_dim}, rng, strided));
    inputs.push_back(
        random_tensor(o.dtype, {o.batch, n, o.num_kv_heads, o.head_dim_v}, rng, strided));
    EXPECT_OK(cache.append(l, inputs[inputs.size() - 2].view, inputs.back().view));
  }
  EXPECT_OK(cache.advance());
  return inputs;
}

// The expected state() bytes after appending `chunks` (each fill()'s result) in order.
std::vector<Bytes> expected_state(const KVCacheOptions& o,
                                  const std::vector<std::vector<RandomTensor>>& chunks) {
  std::vector<Bytes> out(2 * static_cast<size_t>(o.num_layers));
  for (size_t a = 0; a < out.size(); ++a) {
    for (int64_t b = 0; b < o.batch; ++b) {
      for (const auto& chunk : chunks) append_to(out[a], view_bytes(row(chunk[a].view, b)));
    }
  }
  return out;
}

// Tokens [first, first + n) of a [batch, len, H, D] view.
TensorView tokens(const TensorView& t, int64_t first, int64_t n) {
  TensorView out = t;
  out.shape[1] = n;
  out.data =
      static_cast<char*>(t.data) + first * t.strides[1] * static_cast<int64_t>(size_of(t.dtype));
  return out;
}

// The bytes of tokens [first, first + n) of every array of state().
std::vector<Bytes> state_range(const KVCache& cache, int64_t first, int64_t n) {
  std::vector<Bytes> out;
  for (const TensorView& t : cache.state()) out.push_back(view_bytes(tokens(t, first, n)));
  return out;
}

// The first n tokens of each array of `state`, whose arrays hold `len` tokens per batch row.
std::vector<Bytes> prefix_of(const std::vector<Bytes>& state, int64_t batch, int64_t len,
                             int64_t n) {
  std::vector<Bytes> out;
  for (const Bytes& array : state) {
    const auto row_bytes = static_cast<std::ptrdiff_t>(array.size()) / batch;
    const std::ptrdiff_t keep = row_bytes / len * n;
    Bytes want;
    for (int64_t b = 0; b < batch; ++b) {
      const auto begin = array.begin() + b * row_bytes;
      want.insert(want.end(), begin, begin + keep);
    }
    out.push_back(std::move(want));
  }
  return out;
}

std::vector<Bytes> snapshot_bytes(const KVCacheOptions& o, const Snapshot& s) {
  std::vector<Bytes> out;
  const int64_t n = s.end() - s.begin();
  for (size_t a = 0; a < s.arrays().size(); ++a) {
    const int64_t dim = a % 2 == 0 ? o.head_dim : o.head_dim_v;
    out.push_back(view_bytes(s.arrays()[a].view(o.dtype, {o.batch, n, o.num_kv_heads, dim})));
  }
  return out;
}

// A copy of s under another kind, range or set of arrays: snapshots no cache would make.
Snapshot forge(const Snapshot& s, CacheKind kind, size_t num_arrays) {
  std::vector<Buffer> arrays;
  for (size_t a = 0; a < num_arrays; ++a) {
    Result<Buffer> b = s.arrays()[a % s.arrays().size()].clone();
    EXPECT_OK(b);
    arrays.push_back(std::move(*b));
  }
  return Snapshot(kind, s.cache_id(), s.layout(), s.begin(), s.end(), std::move(arrays));
}

// --- create ---

TEST(KVCacheCreate, RefusesBadOptions) {
  struct Case {
    void (*edit)(KVCacheOptions&);
    const char* fragment;
  };
  const Case cases[] = {
      {[](KVCacheOptions& o) { o.num_layers = 0; }, "num_layers is 0, expected > 0"},
      {[](KVCacheOptions& o) { o.num_kv_heads = -1; }, "num_kv_heads is -1, expected > 0"},
      {[](KVCacheOptions& o) { o.head_dim = 0; }, "head_dim is 0, expected > 0"},
      {[](KVCacheOptions& o) { o.batch = 0; }, "batch is 0, expected > 0"},
      {[](KVCacheOptions& o) { o.head_dim_v = -2; }, "head_dim_v is -2, expected >= 0"},
      {[](KVCacheOptions& o) { o.dtype = DType::f64; }, "dtype is f64, expected f32, f16 or bf16"},
      {[](KVCacheOptions& o) { o.dtype = DType::int8; }, "dtype is int8, expected"},
      {[](KVCacheOptions& o) { o.dtype = DType::fp8_e4m3; }, "dtype is fp8_e4m3, expected"},
      {[](KVCacheOptions& o) { o.capacity = -1; }, "capacity is -1, expected >= 0"},
      {[](KVCacheOptions& o) { o.fixed_capacity = true; },
       "fixed_capacity is set with capacity 0, expected capacity > 0"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.fragment);
    KVCacheOptions o = small_options();
    c.edit(o);
    EXPECT_TRUE(has_error(KVCache::create(o), Code::invalid_argument,
                          std::string("KVCache.create: ") + c.fragment));
  }
  EXPECT_TRUE(has_error(KVCache::make(0, 2, 4), Code::invalid_argument, "num_layers is 0"));
  EXPECT_TRUE(has_error(KVCache::with_capacity(1, 2, 4, 0), Code::invalid_argument,
                        "expected capacity > 0"));
  EXPECT_TRUE(has_error(KVCache::with_capacity(1, 2, 4, 8, DType::fp8_e5m2), Code::invalid_argument,
                        "dtype is fp8_e5m2"));
}

TEST(KVCacheCreate, RefusesSizesBeyond64Bits) {
  KVCacheOptions o = small_options();
  o.capacity = int64_t{1} << 62;
  EXPECT_TRUE(has_error(KVCache::create(o), Code::resource_exhausted,
                        "KVCache.create: a capacity of 4611686018427387904 tokens overflows"));
  o.capacity = 0;
  o.head_dim = int64_t{1} << 61;
  EXPECT_TRUE(has_error(KVCache::create(o), Code::invalid_argument,
                        "KVCache.create: one token's K and V overflow 64 bits"));
}

TEST(KVCacheCreate, Shorthands) {
  Result<std::unique_ptr<KVCache>> grow = KVCache::make(3, 2, 4, DType::bf16);
  ASSERT_OK(grow);
  const KVCache& g = **grow;
  EXPECT_EQ(g.capacity(), 0);
  EXPECT_FALSE(g.options().fixed_capacity);
  EXPECT_EQ(g.options().head_dim_v, 4);  // 0 means head_dim
  EXPECT_EQ(g.num_layers(), 3);
  EXPECT_EQ(g.len(), 0);
  EXPECT_TRUE(g.is_empty());
  EXPECT_EQ(g.kind(), CacheKind::contiguous);
  EXPECT_EQ(g.entry_size(), 3u * 2 * (4 + 4) * 2);
  ASSERT_EQ(g.state().size(), 6u);
  EXPECT_EQ(g.state()[5].shape_string(), "[1, 0, 2, 4]");

  Result<std::unique_ptr<KVCache>> fixed = KVCache::with_capacity(2, 2, 4, 16);
  ASSERT_OK(fixed);
  EXPECT_EQ((*fixed)->capacity(), 16);
  EXPECT_EQ((*fixed)->options().capacity, 16);
  EXPECT_TRUE((*fixed)->options().fixed_capacity);
  EXPECT_EQ((*fixed)->options().dtype, DType::f32);
  EXPECT_NE((*fixed)->id(), g.id());

  KVCacheOptions o = small_options();
  o.capacity = 10;
  auto pre = must_create(o);
  ASSERT_NE(pre, nullptr);
  EXPECT_EQ(pre->capacity(), 10);
  EXPECT_FALSE(pre->options().fixed_capacity);
}

TEST(KVCache, EntrySizeCountsKAndVOfEveryLayerAndBatchRow) {
  KVCacheOptions o = small_options(DType::f16);
  o.batch = 3;
  o.head_dim_v = 5;
  auto cache = must_create(o);
  ASSERT_NE(cache, nullptr);
  EXPECT_EQ(cache->entry_size(), 2u * 3 * 2 * (3 + 5) * 2);
}

// --- append / advance / views, per storage dtype ---

class KVCacheDtypeTest : public ::testing::TestWithParam<DType> {};

TEST_P(KVCacheDtypeTest, AppendIsInvisibleUntilAdvance) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  auto cache = must_create(small_options(GetParam()));
  ASSERT_NE(cache, nullptr);
  // Rank 3 inputs (batch 1), then rank 4.
  std::vector<RandomTensor> first;
  for (int64_t l = 0; l < 2; ++l) {
    first.push_back(random_tensor(GetParam(), {3, 2, 3}, rng));
    first.push_back(random_tensor(GetParam(), {3, 2, 4}, rng));
    ASSERT_OK(cache->append(l, first[2 * l].view, first[2 * l + 1].view));
    EXPECT_EQ(cache->len(), 0);
    EXPECT_EQ((*cache->k(l)).shape_string(), "[0, 2, 3]");
  }
  ASSERT_OK(cache->advance());
  EXPECT_EQ(cache->len(), 3);
  std::vector<RandomTensor> second;
  for (int64_t l = 0; l < 2; ++l) {
    second.push_back(random_tensor(GetParam(), {1, 2, 2, 3}, rng));
    second.push_back(random_tensor(GetParam(), {1, 2, 2, 4}, rng));
    ASSERT_OK(cache->append(l, second[2 * l].view, second[2 * l + 1].view));
  }
  ASSERT_OK(cache->advance());
  EXPECT_EQ(cache->len(), 5);
  for (int64_t l = 0; l < 2; ++l) {
    Result<TensorView> k = cache->k(l);
    Result<TensorView> v = cache->v(l);
    ASSERT_OK(k);
    ASSERT_OK(v);
    EXPECT_EQ(k->dtype, GetParam());
    EXPECT_EQ(k->shape_string(), "[5, 2, 3]");
    EXPECT_EQ(v->shape_string(), "[5, 2, 4]");
    EXPECT_EQ(k->strides[0], 6);
    EXPECT_EQ(k->strides[1], 3);
    EXPECT_EQ(k->strides[2], 1);
    Bytes want_k = view_bytes(first[2 * l].view);
    append_to(want_k, view_bytes(second[2 * l].view));
    Bytes want_v = view_bytes(first[2 * l + 1].view);
    append_to(want_v, view_bytes(second[2 * l + 1].view));
    EXPECT_EQ(view_bytes(*k), want_k);
    EXPECT_EQ(view_bytes(*v), want_v);
  }
}

TEST_P(KVCacheDtypeTest, BatchRowsAndHeadDimV) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  KVCacheOptions o = small_options(GetParam());
  o.batch = 3;
  o.head_dim_v = 5;
  auto cache = must_create(o);
  ASSERT_NE(cache, nullptr);
  std::vector<std::vector<RandomTensor>> chunks;
  chunks.push_back(fill(*cache, 4, rng));
  chunks.push_back(fill(*cache, 3, rng, /*strided=*/true));
  ASSERT_EQ(cache->len(), 7);
  EXPECT_EQ(state_bytes(*cache), expected_state(o, chunks));
  for (int64_t l = 0; l < 2; ++l) {
    Result<TensorView> k = cache->k(l);
    Result<TensorView> v = cache->v(l);
    ASSERT_OK(k);
    ASSERT_OK(v);
    EXPECT_EQ(k->shape_string(), "[3, 7, 2, 3]");
    EXPECT_EQ(v->shape_string(), "[3, 7, 2, 5]");
    EXPECT_EQ(k->strides[0], cache->capacity() * 2 * 3);
    EXPECT_EQ(v->strides[0], cache->capacity() * 2 * 5);
    EXPECT_EQ(view_bytes(*k), view_bytes(cache->state()[2 * l]));
    EXPECT_EQ(view_bytes(*v), view_bytes(cache->state()[2 * l + 1]));
  }
}

INSTANTIATE_TEST_SUITE_P(KVCacheDtypes, KVCacheDtypeTest,
                         ::testing::Values(DType::f32, DType::f16, DType::bf16),
                         [](const ::testing::TestParamInfo<DType>& param_info) {
                           return std::string(name(param_info.param));
                         });

TEST(KVCacheAppend, StridedInputs) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  for (int64_t batch : {1, 2}) {
    SCOPED_TRACE("batch " + std::to_string(batch));
    KVCacheOptions o = small_options(DType::bf16);
    o.num_layers = 1;
    o.batch = batch;
    auto cache = must_create(o);
    ASSERT_NE(cache, nullptr);
    // Rank 3 for batch 1: [n, H, D] with n and H swapped in memory.
    RandomTensor k = batch == 1 ? random_tensor(o.dtype, {4, 2, 3}, rng, true)
                                : random_tensor(o.dtype, {2, 4, 2, 3}, rng, true);
    RandomTensor v = batch == 1 ? random_tensor(o.dtype, {4, 2, 4}, rng, true)
                                : random_tensor(o.dtype, {2, 4, 2, 4}, rng, true);
    ASSERT_FALSE(k.view.is_contiguous());
    ASSERT_FALSE(v.view.is_contiguous());
    ASSERT_OK(cache->append(0, k.view, v.view));
    ASSERT_OK(cache->advance());
    EXPECT_EQ(view_bytes(*cache->k(0)), view_bytes(k.view));
    EXPECT_EQ(view_bytes(*cache->v(0)), view_bytes(v.view));
  }
}

TEST(KVCacheAppend, WithinCapacityDoesNotAllocate) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  Result<std::unique_ptr<KVCache>> fixed = KVCache::with_capacity(2, 2, 3, 16);
  ASSERT_OK(fixed);
  KVCache& cache = **fixed;
  std::vector<void*> data;
  for (const TensorView& t : cache.state()) data.push_back(t.data);
  void* k0 = cache.k(0)->data;
  for (int64_t n : {1, 1, 3, 5, 6}) {
    fill(cache, n, rng);
    EXPECT_EQ(cache.capacity(), 16);
    EXPECT_EQ(cache.k(0)->data, k0);
    for (size_t a = 0; a < data.size(); ++a) EXPECT_EQ(cache.state()[a].data, data[a]);
  }
  EXPECT_EQ(cache.len(), 16);

  // A growable cache keeps its buffers until it outgrows them.
  KVCacheOptions o = small_options();
  o.capacity = 8;
  auto grow = must_create(o);
  ASSERT_NE(grow, nullptr);
  void* g0 = grow->k(1)->data;
  for (int i = 0; i < 8; ++i) {
    fill(*grow, 1, rng);
    EXPECT_EQ(grow->k(1)->data, g0);
    EXPECT_EQ(grow->capacity(), 8);
  }
  fill(*grow, 1, rng);
  EXPECT_EQ(grow->capacity(), 16);
}

TEST(KVCacheAppend, GrowthDoublesAndKeepsContents) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  KVCacheOptions o = small_options(DType::f16);
  o.batch = 2;
  auto cache = must_create(o);
  ASSERT_NE(cache, nullptr);
  std::vector<std::vector<RandomTensor>> chunks;
  // max(2 * capacity, needed) after each chunk.
  const std::pair<int64_t, int64_t> steps[] = {{3, 3}, {1, 6}, {2, 6}, {1, 12}, {20, 27}};
  for (const auto& [n, capacity] : steps) {
    chunks.push_back(fill(*cache, n, rng));
    EXPECT_EQ(cache->capacity(), capacity);
    EXPECT_EQ(state_bytes(*cache), expected_state(o, chunks));
  }
}

TEST(KVCacheAppend, GrowthKeepsPendingTokensOfOtherLayers) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  KVCacheOptions o = small_options();
  auto cache = must_create(o);
  ASSERT_NE(cache, nullptr);
  std::vector<std::vector<RandomTensor>> chunks;
  chunks.push_back(fill(*cache, 3, rng));
  chunks.push_back(fill(*cache, 1, rng));
  ASSERT_EQ(cache->capacity(), 6);
  // Layer 0 gets 2 + 1 tokens; layer 1's 3 tokens in between force the growth.
  RandomTensor k0a = random_tensor(o.dtype, {2, 2, 3}, rng);
  RandomTensor v0a = random_tensor(o.dtype, {2, 2, 4}, rng);
  RandomTensor k0b = random_tensor(o.dtype, {1, 2, 3}, rng);
  RandomTensor v0b = random_tensor(o.dtype, {1, 2, 4}, rng);
  RandomTensor k1 = random_tensor(o.dtype, {3, 2, 3}, rng);
  RandomTensor v1 = random_tensor(o.dtype, {3, 2, 4}, rng);
  ASSERT_OK(cache->append(0, k0a.view, v0a.view));
  ASSERT_OK(cache->append(1, k1.view, v1.view));
  EXPECT_EQ(cache->capacity(), 12);
  ASSERT_OK(cache->append(0, k0b.view, v0b.view));
  ASSERT_OK(cache->advance());
  ASSERT_EQ(cache->len(), 7);
  std::vector<Bytes> want = expected_state(o, chunks);
  append_to(want[0], view_bytes(k0a.view));
  append_to(want[0], view_bytes(k0b.view));
  append_to(want[1], view_bytes(v0a.view));
  append_to(want[1], view_bytes(v0b.view));
  append_to(want[2], view_bytes(k1.view));
  append_to(want[3], view_bytes(v1.view));
  EXPECT_EQ(state_bytes(*cache), want);
}

TEST(KVCacheAppend, FixedCapacityExceeded) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  Result<std::unique_ptr<KVCache>> r = KVCache::with_capacity(1, 2, 4, 16);
  ASSERT_OK(r);
  KVCache& cache = **r;
  fill(cache, 14, rng);
  const Captured before = capture(cache);
  RandomTensor k = random_tensor(DType::f32, {5, 2, 4}, rng);
  RandomTensor v = random_tensor(DType::f32, {5, 2, 4}, rng);
  EXPECT_TRUE(has_error(cache.append(0, k.view, v.view), Code::resource_exhausted,
                        "KVCache.append: 5 tokens at length 14 exceed the fixed capacity 16, "
                        "expected at most 2"));
  expect_unchanged(cache, before);
  ASSERT_OK(cache.advance());  // nothing was left pending
  EXPECT_EQ(cache.len(), 14);
  fill(cache, 2, rng);
  EXPECT_EQ(cache.len(), 16);
  RandomTensor k1 = random_tensor(DType::f32, {1, 2, 4}, rng);
  RandomTensor v1 = random_tensor(DType::f32, {1, 2, 4}, rng);
  EXPECT_TRUE(has_error(cache.append(0, k1.view, v1.view), Code::resource_exhausted,
                        "1 tokens at length 16 exceed the fixed capacity 16, expected at most 0"));

  // Pending tokens count toward the length.
  Result<std::unique_ptr<KVCache>> r2 = KVCache::with_capacity(2, 2, 4, 16);
  ASSERT_OK(r2);
  fill(**r2, 10, rng);
  RandomTensor k6 = random_tensor(DType::f32, {6, 2, 4}, rng);
  RandomTensor v6 = random_tensor(DType::f32, {6, 2, 4}, rng);
  ASSERT_OK((*r2)->append(0, k6.view, v6.view));
  EXPECT_TRUE(has_error((*r2)->append(0, k1.view, v1.view), Code::resource_exhausted,
                        "1 tokens at length 16 exceed"));
  ASSERT_OK((*r2)->append(1, k6.view, v6.view));
  ASSERT_OK((*r2)->advance());
  EXPECT_EQ((*r2)->len(), 16);
}

TEST(KVCacheAppend, RefusalsChangeNothing) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  KVCacheOptions o = small_options();
  o.batch = 2;
  o.capacity = 8;
  auto cache = must_create(o);
  ASSERT_NE(cache, nullptr);
  fill(*cache, 3, rng);
  // Layer 0 holds 2 pending tokens throughout.
  RandomTensor pk = random_tensor(o.dtype, {2, 2, 2, 3}, rng);
  RandomTensor pv = random_tensor(o.dtype, {2, 2, 2, 4}, rng);
  ASSERT_OK(cache->append(0, pk.view, pv.view));
  const Captured before = capture(*cache);

  const RandomTensor k = random_tensor(o.dtype, {2, 2, 2, 3}, rng);
  const RandomTensor v = random_tensor(o.dtype, {2, 2, 2, 4}, rng);
  const auto with = [](TensorView t, auto edit) {
    edit(t);
    return t;
  };
  const RandomTensor k_f16 = random_tensor(DType::f16, {2, 2, 2, 3}, rng);
  const RandomTensor v_bf16 = random_tensor(DType::bf16, {2, 2, 2, 4}, rng);
  const RandomTensor v3 = random_tensor(o.dtype, {2, 3, 2, 4}, rng);
  const RandomTensor k_rank3 = random_tensor(o.dtype, {2, 2, 3}, rng);
  const RandomTensor k_rank2 = random_tensor(o.dtype, {2, 6}, rng);
  const RandomTensor k_rank5 = random_tensor(o.dtype, {2, 2, 2, 3, 1}, rng);
  const RandomTensor k_batch1 = random_tensor(o.dtype, {1, 2, 2, 3}, rng);
  const RandomTensor k_heads3 = random_tensor(o.dtype, {2, 2, 3, 3}, rng);
  const RandomTensor k_dim4 = random_tensor(o.dtype, {2, 2, 2, 4}, rng);
  const RandomTensor v_dim3 = random_tensor(o.dtype, {2, 2, 2, 3}, rng);
  struct Case {
    int64_t layer;
    TensorView k;
    TensorView v;
    Code code;
    const char* fragment;
  };
  const Case cases[] = {
      {-1, k.view, v.view, Code::out_of_range,
       "KVCache.append: layer -1 is out of range, expected 0 <= layer < 2"},
      {2, k.view, v.view, Code::out_of_range, "layer 2 is out of range"},
      {1, k_rank3.view, v.view, Code::invalid_argument, "KVCache.append: k has rank 3"},
      {1, k_rank2.view, v.view, Code::invalid_argument, "k has rank 2"},
      {1, k_rank5.view, v.view, Code::invalid_argument, "k has rank 5"},
      {1, k_batch1.view, v.view, Code::invalid_argument, "k dim 0 (batch) is 1, expected 2"},
      {1, k_heads3.view, v.view, Code::invalid_argument, "k dim 2 (num_kv_heads) is 3, expected 2"},
      {1, k_dim4.view, v.view, Code::invalid_argument, "k dim 3 (head_dim) is 4, expected 3"},
      {1, k.view, v_dim3.view, Code::invalid_argument, "v dim 3 (head_dim_v) is 3, expected 4"},
      {1, k_f16.view, v.view, Code::invalid_argument, "k has dtype f16, expected f32"},
      {1, k.view, v_bf16.view, Code::invalid_argument, "v has dtype bf16, expected f32"},
      {1, with(k.view, [](TensorView& t) { t.shape[1] = 0; }),
       with(v.view, [](TensorView& t) { t.shape[1] = 0; }), Code::invalid_argument,
       "k has 0 tokens, expected at least 1"},
      {1, k.view, v3.view, Code::invalid_argument, "v has 3 tokens, expected 2 (as many as k)"},
      {1, with(k.view, [](TensorView& t) { t.data = nullptr; }), v.view, Code::invalid_argument,
       "k has null data"},
      {1, with(k.view, [](TensorView& t) { t.device = Device::cuda(0); }), v.view,
       Code::invalid_argument, "k is on cuda:0, expected cpu"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.fragment);
    EXPECT_TRUE(has_error(cache->append(c.layer, c.k, c.v), c.code, c.fragment));
    expect_unchanged(*cache, before);
  }
  // Layer 0 still has exactly 2 pending, layer 1 none.
  EXPECT_TRUE(has_error(cache->advance(), Code::invalid_argument, "layer 1 has 0 pending"));
  ASSERT_OK(cache->append(1, k.view, v.view));
  ASSERT_OK(cache->advance());
  EXPECT_EQ(cache->len(), 5);

  // Batch 1 accepts rank 3 and 4 only.
  auto one = must_create(small_options());
  ASSERT_NE(one, nullptr);
  const Captured empty = capture(*one);
  const RandomTensor v1 = random_tensor(o.dtype, {2, 2, 4}, rng);
  EXPECT_TRUE(
      has_error(one->append(0, k_rank2.view, v1.view), Code::invalid_argument, "k has rank 2"));
  EXPECT_TRUE(
      has_error(one->append(0, k_rank5.view, v1.view), Code::invalid_argument, "k has rank 5"));
  expect_unchanged(*one, empty);
}

TEST(KVCacheAdvance, RefusesUnequalPending) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  KVCacheOptions o = small_options();
  o.num_layers = 3;
  auto cache = must_create(o);
  ASSERT_NE(cache, nullptr);
  fill(*cache, 2, rng);
  ASSERT_OK(cache->advance());  // nothing pending: no-op
  EXPECT_EQ(cache->len(), 2);
  const RandomTensor k2 = random_tensor(o.dtype, {2, 2, 3}, rng);
  const RandomTensor v2 = random_tensor(o.dtype, {2, 2, 4}, rng);
  const RandomTensor k1 = random_tensor(o.dtype, {1, 2, 3}, rng);
  const RandomTensor v1 = random_tensor(o.dtype, {1, 2, 4}, rng);
  ASSERT_OK(cache->append(1, k2.view, v2.view));
  EXPECT_TRUE(has_error(cache->advance(), Code::invalid_argument,
                        "KVCache.advance: layer 1 has 2 pending tokens, expected 0 (as layer 0)"));
  ASSERT_OK(cache->append(0, k2.view, v2.view));
  ASSERT_OK(cache->append(2, k1.view, v1.view));
  const Captured before = capture(*cache);
  EXPECT_TRUE(has_error(cache->advance(), Code::invalid_argument,
                        "layer 2 has 1 pending tokens, expected 2 (as layer 0)"));
  expect_unchanged(*cache, before);
  ASSERT_OK(cache->append(2, k1.view, v1.view));
  ASSERT_OK(cache->advance());
  EXPECT_EQ(cache->len(), 4);
}

TEST(KVCacheViews, RefuseALayerOutOfRange) {
  auto cache = must_create(small_options());
  ASSERT_NE(cache, nullptr);
  EXPECT_TRUE(has_error(cache->k(-1), Code::out_of_range,
                        "KVCache.k: layer -1 is out of range, expected 0 <= layer < 2"));
  EXPECT_TRUE(has_error(cache->k(2), Code::out_of_range, "KVCache.k: layer 2 is out of range"));
  EXPECT_TRUE(has_error(cache->v(5), Code::out_of_range, "KVCache.v: layer 5 is out of range"));
}

TEST(KVCacheState, ListsKAndVPerLayerOverTheStorage) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  KVCacheOptions o = small_options();
  o.num_layers = 3;
  o.batch = 2;
  auto cache = must_create(o);
  ASSERT_NE(cache, nullptr);
  fill(*cache, 5, rng);
  const std::vector<TensorView> state = cache->state();
  ASSERT_EQ(state.size(), 6u);
  for (int64_t l = 0; l < 3; ++l) {
    const TensorView& k = state[2 * l];
    const TensorView& v = state[2 * l + 1];
    EXPECT_EQ(k.shape_string(), "[2, 5, 2, 3]");
    EXPECT_EQ(v.shape_string(), "[2, 5, 2, 4]");
    EXPECT_EQ(k.data, cache->k(l)->data);
    EXPECT_EQ(v.data, cache->v(l)->data);
    EXPECT_EQ(view_bytes(k), view_bytes(*cache->k(l)));
  }
}

// --- clear / truncate / restore(target) ---

TEST(KVCacheRewind, TruncateRestoreAndClear) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  KVCacheOptions o = small_options();
  o.batch = 2;
  auto cache = must_create(o);
  ASSERT_NE(cache, nullptr);
  fill(*cache, 6, rng);
  void* data = cache->k(0)->data;
  const std::vector<Bytes> first4 = state_range(*cache, 0, 4);
  ASSERT_OK(cache->truncate(4));
  EXPECT_EQ(cache->len(), 4);
  EXPECT_EQ(state_bytes(*cache), first4);

  Captured before = capture(*cache);
  EXPECT_TRUE(has_error(cache->truncate(-1), Code::invalid_argument,
                        "KVCache.truncate: n is -1, expected 0 <= n <= offset (4)"));
  EXPECT_TRUE(has_error(cache->truncate(5), Code::invalid_argument, "n is 5, expected"));
  EXPECT_TRUE(has_error(cache->restore(-1), Code::invalid_argument,
                        "KVCache.restore: target is -1, expected 0 <= target <= offset (4)"));
  EXPECT_TRUE(has_error(cache->restore(5), Code::invalid_argument, "target is 5, expected"));
  expect_unchanged(*cache, before);

  // Both drop what is pending.
  const RandomTensor k = random_tensor(o.dtype, {2, 1, 2, 3}, rng);
  const RandomTensor v = random_tensor(o.dtype, {2, 1, 2, 4}, rng);
  ASSERT_OK(cache->append(0, k.view, v.view));
  ASSERT_OK(cache->truncate(4));
  ASSERT_OK(cache->advance());
  EXPECT_EQ(cache->len(), 4);
  ASSERT_OK(cache->append(1, k.view, v.view));
  ASSERT_OK(cache->restore(3));
  ASSERT_OK(cache->advance());
  EXPECT_EQ(cache->len(), 3);
  EXPECT_EQ(state_bytes(*cache), state_range(*cache, 0, 3));
  ASSERT_OK(cache->restore(3));
  EXPECT_EQ(cache->len(), 3);

  // clear keeps the memory.
  const int64_t capacity = cache->capacity();
  ASSERT_OK(cache->append(0, k.view, v.view));
  cache->clear();
  ASSERT_OK(cache->advance());
  EXPECT_TRUE(cache->is_empty());
  EXPECT_EQ(cache->capacity(), capacity);
  fill(*cache, 1, rng);
  EXPECT_EQ(cache->k(0)->data, data);
}

// --- update (the Cache contract) ---

TEST(KVCacheUpdate, AppendsAndReturnsHeadMajorViews) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  KVCacheOptions o = small_options(DType::f16);
  o.num_layers = 1;
  o.batch = 2;
  o.head_dim_v = 5;
  auto cache = must_create(o);
  ASSERT_NE(cache, nullptr);
  // Expected bytes per (batch, head) in token order, and per batch in [len, H, D] order.
  std::vector<Bytes> want_k(4);
  std::vector<Bytes> want_v(4);
  std::vector<RandomTensor> chunks_k;
  std::vector<RandomTensor> chunks_v;
  int64_t len = 0;
  for (const auto& [n, strided] : {std::pair{3, false}, std::pair{1, true}, std::pair{4, true}}) {
    RandomTensor k = random_tensor(o.dtype, {2, 2, n, 3}, rng, strided);
    RandomTensor v = random_tensor(o.dtype, {2, 2, n, 5}, rng, strided);
    Result<CacheViews> views = cache->update(k.view, v.view);
    ASSERT_OK(views);
    len += n;
    for (int64_t b = 0; b < 2; ++b) {
      for (int64_t h = 0; h < 2; ++h) {
        append_to(want_k[2 * b + h], view_bytes(row(row(k.view, b), h)));
        append_to(want_v[2 * b + h], view_bytes(row(row(v.view, b), h)));
      }
    }
    EXPECT_EQ(cache->offset(), len);
    EXPECT_EQ(views->num_pinned, 0);
    EXPECT_EQ(views->first_pos, 0);
    EXPECT_EQ(views->keys.shape_string(), "[2, 2, " + std::to_string(len) + ", 3]");
    EXPECT_EQ(views->values.shape_string(), "[2, 2, " + std::to_string(len) + ", 5]");
    EXPECT_EQ(views->keys.data, cache->state()[0].data);
    Bytes all_k;
    Bytes all_v;
    for (int i = 0; i < 4; ++i) {
      append_to(all_k, want_k[i]);
      append_to(all_v, want_v[i]);
    }
    EXPECT_EQ(view_bytes(views->keys), all_k);
    EXPECT_EQ(view_bytes(views->values), all_v);
    chunks_k.push_back(std::move(k));
    chunks_v.push_back(std::move(v));
  }
  // state() holds the same tokens token-major.
  Bytes state_k;
  for (int64_t b = 0; b < 2; ++b) {
    for (const RandomTensor& t : chunks_k) {
      TensorView token_major = row(t.view, b);  // [H, n, D]
      std::swap(token_major.shape[0], token_major.shape[1]);
      std::swap(token_major.strides[0], token_major.strides[1]);
      append_to(state_k, view_bytes(token_major));
    }
  }
  EXPECT_EQ(view_bytes(cache->state()[0]), state_k);

  // The layer API and update() share one storage.
  const RandomTensor ak = random_tensor(o.dtype, {2, 1, 2, 3}, rng);
  const RandomTensor av = random_tensor(o.dtype, {2, 1, 2, 5}, rng);
  ASSERT_OK(cache->append(0, ak.view, av.view));
  ASSERT_OK(cache->advance());
  const RandomTensor k = random_tensor(o.dtype, {2, 2, 1, 3}, rng);
  const RandomTensor v = random_tensor(o.dtype, {2, 2, 1, 5}, rng);
  Result<CacheViews> views = cache->update(k.view, v.view);
  ASSERT_OK(views);
  EXPECT_EQ(views->keys.shape[2], len + 2);
}

TEST(KVCacheUpdate, RefusalsChangeNothing) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  const RandomTensor k = random_tensor(DType::f32, {2, 2, 3, 3}, rng);
  const RandomTensor v = random_tensor(DType::f32, {2, 2, 3, 4}, rng);

  KVCacheOptions o = small_options();
  o.batch = 2;
  auto two_layers = must_create(o);
  ASSERT_NE(two_layers, nullptr);
  fill(*two_layers, 1, rng);
  const Captured two_before = capture(*two_layers);
  EXPECT_TRUE(has_error(two_layers->update(k.view, v.view), Code::invalid_argument,
                        "KVCache.update: the cache has 2 layers, expected 1"));
  expect_unchanged(*two_layers, two_before);

  o.num_layers = 1;
  o.capacity = 8;
  auto cache = must_create(o);
  ASSERT_NE(cache, nullptr);
  ASSERT_OK(cache->update(k.view, v.view));
  const RandomTensor pk = random_tensor(o.dtype, {2, 2, 2, 3}, rng);
  const RandomTensor pv = random_tensor(o.dtype, {2, 2, 2, 4}, rng);
  ASSERT_OK(cache->append(0, pk.view, pv.view));
  Captured before = capture(*cache);
  EXPECT_TRUE(has_error(cache->update(k.view, v.view), Code::invalid_argument,
                        "KVCache.update: 2 tokens are pending from append, expected none"));
  expect_unchanged(*cache, before);
  ASSERT_OK(cache->advance());
  before = capture(*cache);

  const auto with = [](TensorView t, auto edit) {
    edit(t);
    return t;
  };
  const RandomTensor k_rank3 = random_tensor(o.dtype, {2, 3, 3}, rng);
  const RandomTensor k_batch1 = random_tensor(o.dtype, {1, 2, 3, 3}, rng);
  const RandomTensor k_heads3 = random_tensor(o.dtype, {2, 3, 3, 3}, rng);
  const RandomTensor k_dim4 = random_tensor(o.dtype, {2, 2, 3, 4}, rng);
  const RandomTensor v_dim3 = random_tensor(o.dtype, {2, 2, 3, 3}, rng);
  const RandomTensor k_bf16 = random_tensor(DType::bf16, {2, 2, 3, 3}, rng);
  const RandomTensor v_short = random_tensor(o.dtype, {2, 2, 2, 4}, rng);
  struct Case {
    TensorView k;
    TensorView v;
    const char* fragment;
  };
  const Case cases[] = {
      {k_rank3.view, v.view, "KVCache.update: keys has rank 3"},
      {k_batch1.view, v.view, "keys dim 0 (batch) is 1, expected 2"},
      {k_heads3.view, v.view, "keys dim 1 (num_kv_heads) is 3, expected 2"},
      {k_dim4.view, v.view, "keys dim 3 (head_dim) is 4, expected 3"},
      {k.view, v_dim3.view, "values dim 3 (head_dim_v) is 3, expected 4"},
      {k_bf16.view, v.view, "keys has dtype bf16, expected f32"},
      {with(k.view, [](TensorView& t) { t.shape[2] = 0; }),
       with(v.view, [](TensorView& t) { t.shape[2] = 0; }),
       "keys has 0 tokens (L), expected at least 1"},
      {k.view, v_short.view, "values has 2 tokens (L), expected 3 (as many as keys)"},
      {with(k.view, [](TensorView& t) { t.device = Device::cuda(1); }), v.view,
       "keys is on cuda:1, expected cpu"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.fragment);
    EXPECT_TRUE(has_error(cache->update(c.k, c.v), Code::invalid_argument, c.fragment));
    expect_unchanged(*cache, before);
  }

  o.fixed_capacity = true;
  o.capacity = 4;
  auto fixed = must_create(o);
  ASSERT_NE(fixed, nullptr);
  ASSERT_OK(fixed->update(k.view, v.view));
  before = capture(*fixed);
  const RandomTensor k2 = random_tensor(o.dtype, {2, 2, 2, 3}, rng);
  const RandomTensor v2 = random_tensor(o.dtype, {2, 2, 2, 4}, rng);
  EXPECT_TRUE(has_error(fixed->update(k2.view, v2.view), Code::resource_exhausted,
                        "KVCache.update: 2 tokens at length 3 exceed the fixed capacity 4, "
                        "expected at most 1"));
  expect_unchanged(*fixed, before);
}

// --- snapshots ---

TEST(KVCacheSnapshot, CopiesTheRangeAndLeavesTheCache) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  KVCacheOptions o = small_options(DType::bf16);
  o.batch = 2;
  auto cache = must_create(o);
  ASSERT_NE(cache, nullptr);
  fill(*cache, 4, rng);
  fill(*cache, 3, rng);
  const Captured before = capture(*cache);

  Result<std::optional<Snapshot>> none = cache->snapshot(7);
  ASSERT_OK(none);
  EXPECT_FALSE(none->has_value());
  EXPECT_TRUE(has_error(cache->snapshot(-1), Code::invalid_argument,
                        "KVCache.snapshot: from is -1, expected 0 <= from <= offset (7)"));
  EXPECT_TRUE(has_error(cache->snapshot(8), Code::invalid_argument, "from is 8, expected"));

  for (int64_t from : {0, 2, 6}) {
    SCOPED_TRACE("from " + std::to_string(from));
    Result<std::optional<Snapshot>> r = cache->snapshot(from);
    ASSERT_OK(r);
    ASSERT_TRUE(r->has_value());
    const Snapshot& s = **r;
    EXPECT_EQ(s.kind(), CacheKind::contiguous);
    EXPECT_EQ(s.cache_id(), cache->id());
    EXPECT_EQ(s.layout(), (std::vector<int64_t>{2, 2, 2, 3, 4, static_cast<int64_t>(o.dtype)}));
    EXPECT_EQ(s.begin(), from);
    EXPECT_EQ(s.end(), 7);
    ASSERT_EQ(s.arrays().size(), 4u);
    EXPECT_EQ(s.num_bytes(), static_cast<size_t>(7 - from) * cache->entry_size());
    EXPECT_EQ(snapshot_bytes(o, s), state_range(*cache, from, 7 - from));
  }
  expect_unchanged(*cache, before);
}

TEST(KVCacheRestore, FromSnapshot) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  KVCacheOptions o = small_options();
  o.batch = 2;
  auto cache = must_create(o);
  ASSERT_NE(cache, nullptr);
  fill(*cache, 5, rng);
  fill(*cache, 4, rng);
  const std::vector<Bytes> all9 = state_range(*cache, 0, 9);
  Result<std::optional<Snapshot>> r = cache->snapshot(5);
  ASSERT_OK(r);
  const Snapshot& snap = **r;
  ASSERT_OK(cache->truncate(5));
  fill(*cache, 2, rng);  // other tokens at 5 and 6

  ASSERT_OK(cache->restore(snap, 9));
  EXPECT_EQ(cache->len(), 9);
  EXPECT_EQ(state_bytes(*cache), all9);
  for (int64_t target : {6, 5}) {
    ASSERT_OK(cache->restore(snap, target));
    EXPECT_EQ(cache->len(), target);
    EXPECT_EQ(state_bytes(*cache), prefix_of(all9, 2, 9, target));
  }
  // A cache longer than the snapshot's end rewinds too.
  ASSERT_OK(cache->restore(snap, 9));
  fill(*cache, 3, rng);
  ASSERT_OK(cache->restore(snap, 7));
  EXPECT_EQ(cache->len(), 7);
  EXPECT_EQ(state_bytes(*cache), prefix_of(all9, 2, 9, 7));
  ASSERT_OK(cache->restore(snap, 9));
  EXPECT_EQ(state_bytes(*cache), all9);
  // It drops what is pending.
  const RandomTensor pk = random_tensor(o.dtype, {2, 1, 2, 3}, rng);
  const RandomTensor pv = random_tensor(o.dtype, {2, 1, 2, 4}, rng);
  ASSERT_OK(cache->append(1, pk.view, pv.view));
  ASSERT_OK(cache->restore(snap, 8));
  ASSERT_OK(cache->advance());
  EXPECT_EQ(cache->len(), 8);
  EXPECT_EQ(state_bytes(*cache), prefix_of(all9, 2, 9, 8));

  // Refusals.
  ASSERT_OK(cache->truncate(6));
  Captured before = capture(*cache);
  EXPECT_TRUE(has_error(cache->restore(snap, 4), Code::invalid_argument,
                        "KVCache.restore: target is 4, expected 5 <= target <= 9"));
  EXPECT_TRUE(has_error(cache->restore(snap, 10), Code::invalid_argument,
                        "target is 10, expected 5 <= target <= 9"));
  expect_unchanged(*cache, before);
  ASSERT_OK(cache->truncate(4));
  before = capture(*cache);
  EXPECT_TRUE(has_error(cache->restore(snap, 7), Code::invalid_argument,
                        "snapshot begins at 5 but the cache holds 4 tokens, expected begin <= 4"));
  expect_unchanged(*cache, before);

  // Snapshots of another kind, shape or make-up.
  KVCacheOptions other = o;
  other.num_kv_heads = 3;
  auto wide = must_create(other);
  ASSERT_NE(wide, nullptr);
  fill(*wide, 9, rng);
  Result<std::optional<Snapshot>> wide_snap = wide->snapshot(0);
  ASSERT_OK(wide_snap);
  EXPECT_TRUE(has_error(cache->restore(**wide_snap, 3), Code::invalid_argument,
                        "KVCache.restore: snapshot has layout [2, 2, 3, 3, 4, 0], expected "
                        "[2, 2, 2, 3, 4, 0]"));
  EXPECT_TRUE(has_error(cache->restore(forge(snap, CacheKind::rotating, 4), 7),
                        Code::invalid_argument,
                        "snapshot is of a rotating cache, expected contiguous"));
  EXPECT_TRUE(has_error(cache->restore(forge(snap, CacheKind::contiguous, 3), 7),
                        Code::invalid_argument, "snapshot has 3 arrays, expected 4"));
  {
    std::vector<Buffer> arrays;
    for (size_t a = 0; a < 4; ++a) arrays.push_back(std::move(*snap.arrays()[a ^ 1].clone()));
    const Snapshot swapped(CacheKind::contiguous, cache->id(), snap.layout(), 5, 9,
                           std::move(arrays));
    EXPECT_TRUE(
        has_error(cache->restore(swapped, 7), Code::invalid_argument, "snapshot array 0 has"));
  }
  expect_unchanged(*cache, before);
}

TEST(KVCacheRestore, FromAnotherCacheOfTheSameLayoutAndCapacity) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  KVCacheOptions o = small_options();
  auto big = must_create(o);
  ASSERT_NE(big, nullptr);
  fill(*big, 20, rng);
  Result<std::optional<Snapshot>> r = big->snapshot(0);
  ASSERT_OK(r);
  const Snapshot& snap = **r;

  // A growable cache grows to hold it.
  auto grow = must_create(o);
  ASSERT_NE(grow, nullptr);
  ASSERT_OK(grow->restore(snap, 20));
  EXPECT_EQ(grow->capacity(), 20);
  EXPECT_EQ(state_bytes(*grow), state_bytes(*big));

  // A fixed one refuses what it cannot hold and takes a prefix that fits.
  o.fixed_capacity = true;
  o.capacity = 16;
  auto fixed = must_create(o);
  ASSERT_NE(fixed, nullptr);
  fill(*fixed, 2, rng);
  const Captured before = capture(*fixed);
  EXPECT_TRUE(has_error(fixed->restore(snap, 17), Code::resource_exhausted,
                        "KVCache.restore: 17 tokens at length 0 exceed the fixed capacity 16, "
                        "expected at most 16"));
  expect_unchanged(*fixed, before);
  ASSERT_OK(fixed->restore(snap, 16));
  EXPECT_EQ(state_bytes(*fixed), state_range(*big, 0, 16));
}

TEST(KVCacheMerge, JoinsAdjacentSnapshots) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  KVCacheOptions o = small_options(DType::f16);
  o.batch = 2;
  auto cache = must_create(o);
  ASSERT_NE(cache, nullptr);
  fill(*cache, 3, rng);
  Result<std::optional<Snapshot>> parent = cache->snapshot(0);
  ASSERT_OK(parent);
  fill(*cache, 6, rng);
  Result<std::optional<Snapshot>> child = cache->snapshot(3);
  ASSERT_OK(child);
  Result<Snapshot> merged = cache->merge(std::move(*parent), std::move(*child));
  ASSERT_OK(merged);
  EXPECT_FALSE(parent->has_value());
  EXPECT_FALSE(child->has_value());
  EXPECT_EQ(merged->begin(), 0);
  EXPECT_EQ(merged->end(), 9);
  EXPECT_EQ(merged->cache_id(), cache->id());
  EXPECT_EQ(merged->kind(), CacheKind::contiguous);
  EXPECT_EQ(merged->layout(), (std::vector<int64_t>{2, 2, 2, 3, 4, 2}));
  EXPECT_EQ(snapshot_bytes(o, *merged), state_range(*cache, 0, 9));

  // Snapshots of another cache merge under that cache's id.
  auto other = must_create(o);
  ASSERT_NE(other, nullptr);
  fill(*other, 4, rng);
  Result<std::optional<Snapshot>> op = other->snapshot(1);
  fill(*other, 2, rng);
  Result<std::optional<Snapshot>> oc = other->snapshot(4);
  ASSERT_OK(op);
  ASSERT_OK(oc);
  Result<Snapshot> om = cache->merge(std::move(*op), std::move(*oc));
  ASSERT_OK(om);
  EXPECT_EQ(om->cache_id(), other->id());
  EXPECT_EQ(snapshot_bytes(o, *om), state_range(*other, 1, 5));
}

TEST(KVCacheMerge, RefusalsLoseNeitherInput) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  KVCacheOptions o = small_options();
  auto cache = must_create(o);
  ASSERT_NE(cache, nullptr);
  fill(*cache, 3, rng);
  std::optional<Snapshot> p03 = std::move(*cache->snapshot(0));
  fill(*cache, 6, rng);
  std::optional<Snapshot> c39 = std::move(*cache->snapshot(3));
  std::optional<Snapshot> c49 = std::move(*cache->snapshot(4));
  std::optional<Snapshot> p09 = std::move(*cache->snapshot(0));

  auto twin = must_create(o);  // same layout, another cache
  ASSERT_NE(twin, nullptr);
  fill(*twin, 9, rng);
  std::optional<Snapshot> twin39 = std::move(*twin->snapshot(3));

  KVCacheOptions narrow_options = o;
  narrow_options.head_dim_v = 2;
  auto narrow = must_create(narrow_options);
  ASSERT_NE(narrow, nullptr);
  fill(*narrow, 9, rng);
  std::optional<Snapshot> narrow39 = std::move(*narrow->snapshot(3));
  std::optional<Snapshot> rotating03 = forge(*p03, CacheKind::rotating, 4);

  struct Case {
    std::optional<Snapshot>* parent;
    std::optional<Snapshot>* child;
    const char* fragment;
  };
  std::optional<Snapshot> missing;
  const Case cases[] = {
      {&missing, &c39, "KVCache.merge: parent is missing, expected a snapshot"},
      {&p03, &missing, "KVCache.merge: child is missing, expected a snapshot"},
      {&p03, &c49, "parent covers [0, 3) and child [4, 9), expected adjacent ranges"},
      {&p09, &c39, "parent covers [0, 9) and child [3, 9), expected adjacent"},
      {&c39, &p03, "parent covers [3, 9) and child [0, 3)"},
      {&p03, &twin39, "child comes from cache"},
      {&p03, &narrow39, "KVCache.merge: child has layout [2, 1, 2, 3, 2, 0], expected"},
      {&rotating03, &c39, "parent is of a rotating cache, expected contiguous"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.fragment);
    const bool had_parent = c.parent->has_value();
    const bool had_child = c.child->has_value();
    const KVCacheOptions& po = c.parent == &narrow39 ? narrow_options : o;
    const KVCacheOptions& co = c.child == &narrow39 ? narrow_options : o;
    const std::vector<Bytes> parent_bytes =
        had_parent ? snapshot_bytes(po, **c.parent) : std::vector<Bytes>();
    const std::vector<Bytes> child_bytes =
        had_child ? snapshot_bytes(co, **c.child) : std::vector<Bytes>();
    EXPECT_TRUE(has_error(cache->merge(std::move(*c.parent), std::move(*c.child)),
                          Code::invalid_argument, c.fragment));
    ASSERT_EQ(c.parent->has_value(), had_parent);
    ASSERT_EQ(c.child->has_value(), had_child);
    if (had_parent) {
      EXPECT_EQ(snapshot_bytes(po, **c.parent), parent_bytes);
    }
    if (had_child) {
      EXPECT_EQ(snapshot_bytes(co, **c.child), child_bytes);
    }
  }
  // The inputs still merge.
  Result<Snapshot> merged = cache->merge(std::move(p03), std::move(c39));
  ASSERT_OK(merged);
  EXPECT_EQ(snapshot_bytes(o, *merged), state_range(*cache, 0, 9));
}

TEST(KVCacheSplit, SplitsAndRefuses) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  KVCacheOptions o = small_options(DType::bf16);
  o.batch = 3;
  auto cache = must_create(o);
  ASSERT_NE(cache, nullptr);
  fill(*cache, 9, rng);
  Snapshot s = std::move(**cache->snapshot(2));  // [2, 9)
  const void* data = s.arrays()[0].data();

  // Outside the range: the snapshot itself moves to one side.
  for (int64_t at : {2, 0, -3}) {
    Result<SnapshotPair> r = cache->split(std::move(s), at);
    ASSERT_OK(r);
    EXPECT_FALSE(r->first.has_value());
    ASSERT_TRUE(r->second.has_value());
    EXPECT_EQ(r->second->arrays()[0].data(), data);
    s = std::move(*r->second);
  }
  for (int64_t at : {9, 12}) {
    Result<SnapshotPair> r = cache->split(std::move(s), at);
    ASSERT_OK(r);
    ASSERT_TRUE(r->first.has_value());
    EXPECT_FALSE(r->second.has_value());
    EXPECT_EQ(r->first->arrays()[0].data(), data);
    s = std::move(*r->first);
  }

  // Inside: two copies.
  Result<SnapshotPair> r = cache->split(std::move(s), 5);
  ASSERT_OK(r);
  ASSERT_TRUE(r->first.has_value());
  ASSERT_TRUE(r->second.has_value());
  EXPECT_EQ(r->first->begin(), 2);
  EXPECT_EQ(r->first->end(), 5);
  EXPECT_EQ(r->second->begin(), 5);
  EXPECT_EQ(r->second->end(), 9);
  EXPECT_EQ(r->first->cache_id(), cache->id());
  EXPECT_EQ(r->second->cache_id(), cache->id());
  EXPECT_EQ(r->second->layout(), r->first->layout());
  EXPECT_EQ(snapshot_bytes(o, *r->first), state_range(*cache, 2, 3));
  EXPECT_EQ(snapshot_bytes(o, *r->second), state_range(*cache, 5, 4));
  Result<Snapshot> back = cache->merge(std::move(r->first), std::move(r->second));
  ASSERT_OK(back);
  EXPECT_EQ(snapshot_bytes(o, *back), state_range(*cache, 2, 7));

  // Refusals do not move from s.
  KVCacheOptions other_options = o;
  other_options.dtype = DType::f16;
  auto other = must_create(other_options);
  ASSERT_NE(other, nullptr);
  fill(*other, 9, rng);
  Snapshot foreign = std::move(**other->snapshot(2));
  const void* foreign_data = foreign.arrays()[0].data();
  EXPECT_TRUE(has_error(cache->split(std::move(foreign), 5), Code::invalid_argument,
                        "KVCache.split: s has layout [2, 3, 2, 3, 4, 2], expected "
                        "[2, 3, 2, 3, 4, 3]"));
  EXPECT_EQ(foreign.arrays()[0].data(), foreign_data);
  EXPECT_EQ(foreign.end(), 9);
  Snapshot rotating = forge(*back, CacheKind::rotating, 4);
  const void* rotating_data = rotating.arrays()[0].data();
  EXPECT_TRUE(has_error(cache->split(std::move(rotating), 1), Code::invalid_argument,
                        "KVCache.split: s is of a rotating cache, expected contiguous"));
  EXPECT_EQ(rotating.arrays()[0].data(), rotating_data);
}

// --- free ---

TEST(KVCacheFree, ReleasesAndIsUsableAgain) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  KVCacheOptions o = small_options();
  auto cache = must_create(o);
  ASSERT_NE(cache, nullptr);
  fill(*cache, 5, rng);
  Result<std::optional<Snapshot>> snap = cache->snapshot(0);
  ASSERT_OK(snap);
  const RandomTensor k = random_tensor(o.dtype, {1, 2, 3}, rng);
  const RandomTensor v = random_tensor(o.dtype, {1, 2, 4}, rng);
  ASSERT_OK(cache->append(0, k.view, v.view));
  cache->free();
  EXPECT_EQ(cache->len(), 0);
  EXPECT_EQ(cache->capacity(), 0);
  for (const TensorView& t : cache->state()) EXPECT_EQ(t.numel(), 0);
  ASSERT_OK(cache->advance());  // nothing pending any more
  EXPECT_EQ(cache->len(), 0);
  std::vector<std::vector<RandomTensor>> chunks;
  chunks.push_back(fill(*cache, 2, rng));
  EXPECT_EQ(cache->capacity(), 2);
  EXPECT_EQ(state_bytes(*cache), expected_state(o, chunks));
  ASSERT_OK(cache->restore(**snap, 5));
  EXPECT_EQ(snapshot_bytes(o, **snap), state_range(*cache, 0, 5));

  // Preallocated caches get their configured capacity back.
  o.capacity = 8;
  auto pre = must_create(o);
  ASSERT_NE(pre, nullptr);
  pre->free();
  fill(*pre, 1, rng);
  EXPECT_EQ(pre->capacity(), 8);

  Result<std::unique_ptr<KVCache>> fixed = KVCache::with_capacity(1, 2, 4, 16);
  ASSERT_OK(fixed);
  fill(**fixed, 10, rng);
  (*fixed)->free();
  EXPECT_EQ((*fixed)->capacity(), 0);
  fill(**fixed, 3, rng);
  EXPECT_EQ((*fixed)->capacity(), 16);
  const RandomTensor k14 = random_tensor(DType::f32, {14, 2, 4}, rng);
  EXPECT_TRUE(has_error((*fixed)->append(0, k14.view, k14.view), Code::resource_exhausted,
                        "14 tokens at length 3 exceed the fixed capacity 16, expected at most 13"));
}

}  // namespace
}  // namespace kvcache
