// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// Model-based test of RecurrentCache: a naive reference (state bytes, offset, held snapshots as
// byte vectors) driven alongside the real cache by random operations, compared after every step.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "kvcache/cache.h"
#include "kvcache/dtype.h"
#include "kvcache/recurrent_cache.h"
#include "kvcache/tensor.h"

#include "testing/test_util.h"

namespace kvcache {
namespace {

using ::kvcache::testing::buffer_bytes;
using ::kvcache::testing::CacheFingerprint;
using ::kvcache::testing::random_tensor;
using ::kvcache::testing::RandomTensor;
using ::kvcache::testing::seed_trace;
using ::kvcache::testing::test_seed;
using ::kvcache::testing::view_bytes;

using Bytes = std::vector<uint8_t>;

constexpr int kNumSeeds = 1200;
constexpr int kStepsPerSeed = 50;
constexpr size_t kMaxHeld = 8;

struct ModelSnapshot {
  uint64_t cache_id;
  int64_t begin;
  int64_t end;
  Bytes conv;
  Bytes delta;
};

// The reference: what the cache should hold, in the plainest terms.
struct Model {
  size_t conv_bytes = 0;
  size_t delta_bytes = 0;
  bool freed = false;  // a freed state reads as null data, and snapshots of it as zeros
  Bytes conv;
  Bytes delta;
  int64_t offset = 0;

  [[nodiscard]] CacheFingerprint observed() const {
    CacheFingerprint o;
    if (freed) {
      o.arrays.emplace_back(conv_bytes == 0 ? std::optional<Bytes>(Bytes())
                                            : std::optional<Bytes>());
      o.arrays.emplace_back();
    } else {
      o.arrays.emplace_back(conv);
      o.arrays.emplace_back(delta);
    }
    o.offset = offset;
    return o;
  }
  [[nodiscard]] ModelSnapshot snapshot(uint64_t id, int64_t from) const {
    if (freed) return {id, from, offset, Bytes(conv_bytes, 0), Bytes(delta_bytes, 0)};
    return {id, from, offset, conv, delta};
  }
};

RecurrentCacheOptions random_options(std::mt19937& rng) {
  const auto pick = [&](int64_t lo, int64_t hi) { return testing::uniform_int(rng, lo, hi); };
  RecurrentCacheOptions o;
  o.conv_tail = pick(0, 3);
  o.conv_dim = pick(o.conv_tail == 0 ? 0 : 1, 5);
  o.num_v_heads = pick(1, 2);
  o.head_v_dim = pick(2, 4);
  o.head_k_dim = pick(2, 4);
  o.batch = pick(1, 2);
  const DType dtypes[] = {DType::f32, DType::f16, DType::bf16};
  o.dtype = dtypes[pick(0, 2)];
  return o;
}

class Harness {
 public:
  explicit Harness(uint32_t seed) : rng_(seed) {
    o_ = random_options(rng_);
    cache_ = std::move(*RecurrentCache::create(o_));
    other_ = std::move(*RecurrentCache::create(o_));
    model_.conv_bytes = cache_->conv_state().num_bytes();
    model_.delta_bytes = cache_->delta_state().num_bytes();
    model_.conv = Bytes(model_.conv_bytes, 0);
    model_.delta = Bytes(model_.delta_bytes, 0);
  }

  void step() {
    const int64_t op = pick(0, 99);
    if (op < 25) {
      update_and_advance();
    } else if (op < 30) {
      bad_update();
    } else if (op < 40) {
      restore_live();
    } else if (op < 58) {
      snapshot();
    } else if (op < 73) {
      restore_snapshot();
    } else if (op < 85) {
      merge();
    } else if (op < 93) {
      split();
    } else if (op < 96) {
      cache_->free();
      model_.freed = true;
      model_.offset = 0;
    } else {
      foreign_snapshot();
    }
    check();
  }

 private:
  int64_t pick(int64_t lo, int64_t hi) { return testing::uniform_int(rng_, lo, hi); }
  bool chance(double p) { return std::bernoulli_distribution(p)(rng_); }

  RandomTensor conv_input(int64_t batch, DType dtype) {
    const bool strided = chance(0.3);
    return random_tensor(dtype, {batch, o_.conv_tail, o_.conv_dim}, rng_, strided);
  }
  RandomTensor delta_input(int64_t batch, DType dtype, int64_t extra_k = 0) {
    const bool strided = chance(0.3);
    return random_tensor(dtype, {batch, o_.num_v_heads, o_.head_v_dim, o_.head_k_dim + extra_k},
                         rng_, strided);
  }

  void update_and_advance() {
    RandomTensor conv = conv_input(o_.batch, o_.dtype);
    RandomTensor delta = delta_input(o_.batch, o_.dtype);
    const int64_t n = pick(0, 4);
    ASSERT_OK(cache_->update(conv.view, delta.view));
    ASSERT_OK(cache_->advance(n));
    model_.freed = false;
    model_.conv = view_bytes(conv.view);
    model_.delta = view_bytes(delta.view);
    model_.offset += n;
  }

  void bad_update() {
    const int64_t kind = pick(0, 2);
    const int64_t batch = kind == 0 ? o_.batch + pick(1, 2) : o_.batch;
    const DType dtype = kind == 1 ? (o_.dtype == DType::f32 ? DType::bf16 : DType::f32) : o_.dtype;
    RandomTensor conv = conv_input(batch, dtype);
    RandomTensor delta = delta_input(batch, dtype, kind == 2 ? 1 : 0);
    const char* fragment = kind == 0 ? "batch is" : kind == 1 ? "has dtype" : "head_k_dim";
    EXPECT_TRUE(::kvcache::testing::has_error(cache_->update(conv.view, delta.view),
                                              Code::invalid_argument, fragment));
    if (chance(0.3)) {
      EXPECT_TRUE(::kvcache::testing::has_error(cache_->advance(-pick(1, 3)),
                                                Code::invalid_argument, "expected n >= 0"));
    }
  }

  void restore_live() {
    const int64_t target = chance(0.5) ? model_.offset : pick(-1, model_.offset + 2);
    const Status s = cache_->restore(target);
    if (target == model_.offset) {
      EXPECT_OK(s);
    } else {
      EXPECT_TRUE(::kvcache::testing::has_error(s, Code::invalid_argument, "cannot rewind"));
    }
  }

  void make_room() {
    if (held_.size() < kMaxHeld) return;
    const auto idx = static_cast<size_t>(pick(0, static_cast<int64_t>(held_.size()) - 1));
    held_.erase(held_.begin() + static_cast<std::ptrdiff_t>(idx));
    model_held_.erase(model_held_.begin() + static_cast<std::ptrdiff_t>(idx));
  }

  void snapshot() {
    int64_t from = pick(-1, model_.offset + 1);
    // Often start where a held snapshot ends, so merge finds adjacent pairs.
    if (!model_held_.empty() && chance(0.5)) {
      from = model_held_[static_cast<size_t>(pick(0, static_cast<int64_t>(model_held_.size()) - 1))]
                 .end;
    }
    Result<std::optional<Snapshot>> s = cache_->snapshot(from);
    if (from < 0 || from > model_.offset) {
      EXPECT_TRUE(::kvcache::testing::has_error(s, Code::invalid_argument, "from is"));
      return;
    }
    ASSERT_OK(s);
    if (from == model_.offset) {
      EXPECT_FALSE(s->has_value());
      return;
    }
    ASSERT_TRUE(s->has_value());
    make_room();
    held_.push_back(std::move(*s));
    model_held_.push_back(model_.snapshot(cache_->id(), from));
  }

  void foreign_snapshot() {
    RandomTensor conv = conv_input(o_.batch, o_.dtype);
    RandomTensor delta = delta_input(o_.batch, o_.dtype);
    ASSERT_OK(other_->update(conv.view, delta.view));
    ASSERT_OK(other_->advance(pick(1, 5)));
    const int64_t from = pick(0, other_->offset() - 1);
    Result<std::optional<Snapshot>> s = other_->snapshot(from);
    ASSERT_OK(s);
    ASSERT_TRUE(s->has_value());
    make_room();
    held_.push_back(std::move(*s));
    model_held_.push_back(
        {other_->id(), from, other_->offset(), view_bytes(conv.view), view_bytes(delta.view)});
  }

  void restore_snapshot() {
    if (held_.empty()) return;
    const auto idx = static_cast<size_t>(pick(0, static_cast<int64_t>(held_.size()) - 1));
    const ModelSnapshot& m = model_held_[idx];
    const int64_t target = chance(0.6) ? m.end : pick(m.begin - 1, m.end + 1);
    const Status s = cache_->restore(*held_[idx], target);
    if (target != m.end) {
      EXPECT_TRUE(::kvcache::testing::has_error(s, Code::invalid_argument,
                                                "restored only to exactly that offset"));
      return;
    }
    ASSERT_OK(s);
    model_.freed = false;
    model_.conv = m.conv;
    model_.delta = m.delta;
    model_.offset = m.end;
  }

  void merge() {
    if (held_.size() < 2) return;
    const auto n = static_cast<int64_t>(held_.size());
    auto p = static_cast<size_t>(pick(0, n - 1));
    auto c = static_cast<size_t>(pick(0, n - 2));
    if (c >= p) ++c;
    if (chance(0.5)) {  // look for an adjacent pair of this cache
      for (size_t i = 0; i < held_.size(); ++i) {
        for (size_t j = 0; j < held_.size(); ++j) {
          if (i != j && model_held_[i].end == model_held_[j].begin &&
              model_held_[i].cache_id == cache_->id() && model_held_[j].cache_id == cache_->id()) {
            p = i;
            c = j;
          }
        }
      }
    }
    std::optional<Snapshot> none;
    const bool drop_parent = chance(0.08);
    const bool drop_child = !drop_parent && chance(0.08);
    std::optional<Snapshot>& parent = drop_parent ? none : held_[p];
    std::optional<Snapshot>& child = drop_child ? none : held_[c];
    const ModelSnapshot& mp = model_held_[p];
    const ModelSnapshot& mc = model_held_[c];
    Result<Snapshot> merged = cache_->merge(std::move(parent), std::move(child));

    // Missing sides first, then the two must come from one cache, then adjacency.
    const char* why = nullptr;
    if (drop_parent) {
      why = "parent is missing";
    } else if (drop_child) {
      why = "child is missing";
    } else if (mp.cache_id != mc.cache_id) {
      why = "expected the parent's cache";
    } else if (mp.end != mc.begin) {
      why = "expected adjacent ranges";
    }
    if (why != nullptr) {
      EXPECT_TRUE(::kvcache::testing::has_error(merged, Code::invalid_argument, why));
      return;  // check() verifies that neither input was moved from
    }
    ASSERT_OK(merged);
    EXPECT_FALSE(held_[p].has_value());
    EXPECT_FALSE(held_[c].has_value());
    ModelSnapshot result{mp.cache_id, mp.begin, mc.end, mc.conv, mc.delta};
    for (size_t idx : {std::max(p, c), std::min(p, c)}) {
      held_.erase(held_.begin() + static_cast<std::ptrdiff_t>(idx));
      model_held_.erase(model_held_.begin() + static_cast<std::ptrdiff_t>(idx));
    }
    held_.push_back(std::move(*merged));
    model_held_.push_back(std::move(result));
  }

  void split() {
    if (held_.empty()) return;
    const auto idx = static_cast<size_t>(pick(0, static_cast<int64_t>(held_.size()) - 1));
    const ModelSnapshot& m = model_held_[idx];
    Result<SnapshotPair> pair = cache_->split(std::move(*held_[idx]), pick(m.begin - 2, m.end + 2));
    ASSERT_OK(pair);
    EXPECT_FALSE(pair->first.has_value());
    ASSERT_TRUE(pair->second.has_value());
    held_[idx] = std::move(pair->second);
  }

  void check() {
    ASSERT_EQ(testing::fingerprint(*cache_), model_.observed());
    ASSERT_EQ(held_.size(), model_held_.size());
    for (size_t i = 0; i < held_.size(); ++i) {
      SCOPED_TRACE("held snapshot " + std::to_string(i));
      ASSERT_TRUE(held_[i].has_value());
      const Snapshot& s = *held_[i];
      const ModelSnapshot& m = model_held_[i];
      ASSERT_EQ(s.kind(), CacheKind::recurrent);
      ASSERT_EQ(s.cache_id(), m.cache_id);
      ASSERT_EQ(s.begin(), m.begin);
      ASSERT_EQ(s.end(), m.end);
      ASSERT_EQ(s.arrays().size(), 2u);
      ASSERT_EQ(buffer_bytes(s.arrays()[0]), m.conv);
      ASSERT_EQ(buffer_bytes(s.arrays()[1]), m.delta);
    }
  }

  std::mt19937 rng_;
  RecurrentCacheOptions o_;
  std::unique_ptr<RecurrentCache> cache_;
  std::unique_ptr<RecurrentCache> other_;  // source of same-layout snapshots of another cache
  Model model_;
  std::vector<std::optional<Snapshot>> held_;
  std::vector<ModelSnapshot> model_held_;
};

TEST(RecurrentModelTest, RandomOperationsMatchTheModel) {
  for (int k = 0; k < kNumSeeds; ++k) {
    const uint32_t seed = test_seed() + static_cast<uint32_t>(k);
    SCOPED_TRACE(seed_trace(seed));
    Harness harness(seed);
    for (int i = 0; i < kStepsPerSeed; ++i) {
      SCOPED_TRACE("step " + std::to_string(i));
      harness.step();
      if (::testing::Test::HasFailure()) return;
    }
  }
}

}  // namespace
}  // namespace kvcache
