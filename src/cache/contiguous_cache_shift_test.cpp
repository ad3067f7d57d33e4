// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// KVCache::shift and KVCache::erase: a context shift against a cache filled directly with K
// rotated at the new positions.

#include <cmath>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "kvcache/contiguous_cache.h"

#include "reference/rope.h"
#include "testing/test_util.h"

namespace kvcache {
namespace {

using testing::fingerprint;
using testing::has_error;
using testing::seed_trace;
using testing::test_seed;

constexpr int64_t kLayers = 2, kBatch = 2, kHeads = 3, kDim = 8, kLen = 20;

struct Tokens {
  // Per (layer, batch, position, head): un-rotated K and V values.
  std::vector<std::vector<double>> k0, v;
  std::vector<double>& at(std::vector<std::vector<double>>& a, int64_t l, int64_t b, int64_t p,
                          int64_t h) {
    return a[static_cast<size_t>(((l * kBatch + b) * kLen + p) * kHeads + h)];
  }
};

RopeConfig rope_for(int i) {
  RopeConfig r;
  r.max_position = 32;
  if (i == 1) {
    r.style = RopeStyle::gptj;
    r.scaling = RopeScaling::yarn;
    r.factor = 2.0;
    r.original_max_position = 16;
  } else if (i == 2) {
    r.rotary_dim = 4;
    r.scaling = RopeScaling::llama3;
    r.factor = 4.0;
    r.original_max_position = 16;
  }
  return r;
}

// Appends tokens: position j of the cache holds K0[src(j)] rotated at j and V[src(j)].
template <class Src>
void fill(KVCache& cache, Tokens& t, const RopeConfig& rope, int64_t n, Src src) {
  const DType dtype = cache.options().dtype;
  for (int64_t l = 0; l < kLayers; ++l) {
    std::vector<float> k, v;
    for (int64_t b = 0; b < kBatch; ++b) {
      for (int64_t j = 0; j < n; ++j) {
        for (int64_t h = 0; h < kHeads; ++h) {
          std::vector<double> x = t.at(t.k0, l, b, src(j), h);
          const int64_t pos[] = {j};
          reference::rope_apply(rope, x, pos);
          k.insert(k.end(), x.begin(), x.end());
          const std::vector<double>& vv = t.at(t.v, l, b, src(j), h);
          v.insert(v.end(), vv.begin(), vv.end());
        }
      }
    }
    std::vector<uint64_t> kb(k.size()), vb(v.size());
    from_float(k.data(), dtype, kb.data(), k.size());
    from_float(v.data(), dtype, vb.data(), v.size());
    ASSERT_OK(cache.append(l, TensorView::contiguous(kb.data(), dtype, {kBatch, n, kHeads, kDim}),
                           TensorView::contiguous(vb.data(), dtype, {kBatch, n, kHeads, kDim})));
  }
  ASSERT_OK(cache.advance());
}

std::unique_ptr<KVCache> make(DType dtype) {
  KVCacheOptions o;
  o.num_layers = kLayers;
  o.num_kv_heads = kHeads;
  o.head_dim = kDim;
  o.dtype = dtype;
  o.batch = kBatch;
  o.capacity = kLen;
  return testing::value_or_fail(KVCache::create(o));
}

Tokens random_tokens(std::mt19937& rng) {
  Tokens t;
  std::uniform_real_distribution<double> mag(0.1, 2.0);
  for (auto* a : {&t.k0, &t.v}) {
    a->resize(static_cast<size_t>(kLayers * kBatch * kLen * kHeads));
    for (auto& x : *a) {
      for (int64_t i = 0; i < kDim; ++i) {
        // Values that every dtype holds exactly, so V compares bit for bit.
        const float f = static_cast<float>((rng() & 1u) ? mag(rng) : -mag(rng));
        x.push_back(bf16_to_float(float_to_bf16(f)));
      }
    }
  }
  return t;
}

TEST(KVCacheShift, ContextShiftEqualsDirectFill) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  constexpr int64_t kKeep = 4, kDrop = 6;
  for (DType dtype : {DType::f32, DType::f16, DType::bf16}) {
    for (int r = 0; r < 3; ++r) {
      SCOPED_TRACE(std::string(name(dtype)) + " rope " + std::to_string(r));
      std::mt19937 rng(seed);
      Tokens t = random_tokens(rng);
      const RopeConfig rope = rope_for(r);
      std::unique_ptr<KVCache> shifted = make(dtype);
      std::unique_ptr<KVCache> direct = make(dtype);
      ASSERT_TRUE(shifted && direct);
      fill(*shifted, t, rope, kLen, [](int64_t j) { return j; });
      ASSERT_OK(shifted->erase(kKeep, kKeep + kDrop));
      ASSERT_OK(shifted->shift(kKeep, kLen - kDrop, -kDrop, rope));
      ASSERT_EQ(shifted->len(), kLen - kDrop);
      fill(*direct, t, rope, kLen - kDrop, [](int64_t j) { return j < kKeep ? j : j + kDrop; });
      const double tol = 2.0 * (dtype == DType::bf16  ? 0x1p-8
                                : dtype == DType::f16 ? 0x1p-11
                                                      : 0x1p-24);
      for (int64_t l = 0; l < kLayers; ++l) {
        // V and the kept prefix of K are moved bytes: identical.
        const std::vector<uint8_t> sv = testing::view_bytes(*shifted->v(l));
        EXPECT_EQ(sv, testing::view_bytes(*direct->v(l)));
        const TensorView sk = *shifted->k(l);
        const TensorView dk = *direct->k(l);
        for (int64_t b = 0; b < kBatch; ++b) {
          for (int64_t j = 0; j < kLen - kDrop; ++j) {
            for (int64_t h = 0; h < kHeads; ++h) {
              for (int64_t i = 0; i < kDim; ++i) {
                const int64_t idx[] = {b, j, h, i};
                float got = 0.0f, want = 0.0f;
                to_float(dtype, sk.element_ptr(idx), &got, 1);
                to_float(dtype, dk.element_ptr(idx), &want, 1);
                if (j < kKeep) {
                  ASSERT_EQ(got, want);
                } else {
                  ASSERT_NEAR(got, want, tol * 3.0 + 1e-5) << "l " << l << " b " << b << " j " << j;
                }
              }
            }
          }
        }
      }
    }
  }
}

TEST(KVCacheShift, RefusalsChangeNothing) {
  std::mt19937 rng(test_seed());
  Tokens t = random_tokens(rng);
  const RopeConfig rope = rope_for(0);
  std::unique_ptr<KVCache> cache = make(DType::bf16);
  ASSERT_TRUE(cache);
  fill(*cache, t, rope, kLen, [](int64_t j) { return j; });
  const testing::CacheFingerprint before = fingerprint(*cache);
  EXPECT_TRUE(
      has_error(cache->shift(3, 21, 1, rope), Code::out_of_range,
                "KVCache.shift: [p0, p1) is [3, 21), expected 0 <= p0 <= p1 <= len() = 20"));
  EXPECT_TRUE(has_error(cache->shift(5, 4, 1, rope), Code::out_of_range, "[5, 4)"));
  EXPECT_TRUE(has_error(cache->shift(0, 5, -32, rope), Code::out_of_range,
                        "KVCache.shift: tokens [0, 5) moved by -32, expected p1 <= "
                        "rope.max_position and |delta| < rope.max_position = 32"));
  EXPECT_TRUE(has_error(cache->shift(10, 20, 32, rope), Code::out_of_range, "moved by 32"));
  RopeConfig small = rope;
  small.max_position = 10;
  EXPECT_TRUE(has_error(cache->shift(5, 15, -5, small), Code::out_of_range,
                        "|delta| < rope.max_position = 10"));
  RopeConfig odd = rope;
  odd.rotary_dim = 3;
  EXPECT_TRUE(has_error(cache->shift(0, 5, 1, odd), Code::invalid_argument,
                        "KVCache.shift: rope rotary_dim is 3"));
  EXPECT_TRUE(has_error(cache->erase(5, 3), Code::out_of_range,
                        "KVCache.erase: [p0, p1) is [5, 3), expected 0 <= p0 <= p1 <= len() = 20"));
  EXPECT_TRUE(has_error(cache->erase(-1, 3), Code::out_of_range, "[-1, 3)"));
  EXPECT_TRUE(has_error(cache->erase(0, 21), Code::out_of_range, "[0, 21)"));
  EXPECT_EQ(fingerprint(*cache), before);
  // Empty ranges are no-ops.
  EXPECT_OK(cache->shift(7, 7, 100, rope));
  EXPECT_OK(cache->erase(7, 7));
  EXPECT_OK(cache->shift(0, 20, 0, rope));
  EXPECT_EQ(fingerprint(*cache), before);
}

TEST(KVCacheShift, EraseMovesLaterTokensDown) {
  std::mt19937 rng(test_seed());
  Tokens t = random_tokens(rng);
  const RopeConfig rope = rope_for(0);
  std::unique_ptr<KVCache> cache = make(DType::f32);
  std::unique_ptr<KVCache> want = make(DType::f32);
  ASSERT_TRUE(cache && want);
  fill(*cache, t, rope, kLen, [](int64_t j) { return j; });
  ASSERT_OK(cache->erase(15, 20));  // the tail: a truncate
  ASSERT_OK(cache->erase(0, 3));    // the head
  // Without a shift the K bytes move unchanged: what a fill at the old positions holds.
  ASSERT_EQ(cache->len(), 12);
  fill(*want, t, rope, kLen, [](int64_t j) { return j; });
  ASSERT_OK(want->erase(0, 3));
  ASSERT_OK(want->truncate(12));
  EXPECT_EQ(fingerprint(*cache), fingerprint(*want));
}

}  // namespace
}  // namespace kvcache
