// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// Model-based test of RotatingKVCache: a naive model (every token ever appended, per position)
// and the header's rules give the expected window and update() views; random operations run
// against both and the bytes are compared after every step.

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "kvcache/buffer.h"
#include "kvcache/cache.h"
#include "kvcache/dtype.h"
#include "kvcache/rotating_cache.h"
#include "kvcache/tensor.h"

#include "testing/test_util.h"

namespace kvcache {
namespace {

using ::kvcache::testing::has_error;
using ::kvcache::testing::seed_trace;
using ::kvcache::testing::test_seed;
using ::kvcache::testing::view_bytes;

using Bytes = std::vector<uint8_t>;
using Positions = std::vector<int64_t>;

// The model: every token appended, per position, as [B, H, D] bytes.
struct Tokens {
  std::vector<Bytes> k;
  std::vector<Bytes> v;
  [[nodiscard]] int64_t size() const { return static_cast<int64_t>(k.size()); }
  void truncate(int64_t n) {
    k.resize(static_cast<size_t>(n));
    v.resize(static_cast<size_t>(n));
  }
};

Bytes buffer_bytes(const Buffer& b) {
  const auto* p = static_cast<const uint8_t*>(b.data());
  return p ? Bytes(p, p + b.num_bytes()) : Bytes();
}

Positions positions(int64_t num_pinned, int64_t first, int64_t end) {
  Positions out;
  for (int64_t p = 0; p < num_pinned; ++p) out.push_back(p);
  for (int64_t p = first; p < end; ++p) out.push_back(p);
  return out;
}

// The rules of rotating_cache.h.
struct Rules {
  int64_t max_size;
  int64_t keep;
  [[nodiscard]] int64_t rolling() const { return max_size - keep; }
  [[nodiscard]] Positions window(int64_t n) const {
    return positions(std::min(keep, n), std::max(keep, n - rolling()), n);
  }
  [[nodiscard]] Positions update_view(int64_t begin, int64_t end) const {
    if (end <= max_size) return positions(0, 0, end);
    return positions(keep, std::max(keep, begin - rolling() + 1), end);
  }
};

// A [B, H, L, D] input pair that owns its memory.
struct Input {
  std::vector<float> k_storage;  // float for alignment; holds any of f32/f16/bf16
  std::vector<float> v_storage;
  TensorView k;
  TensorView v;
};

class Harness {
 public:
  Harness(const RotatingKVCacheOptions& o, uint32_t seed) : o_(o), rng_(seed) {}

  // `count` random (finite, non-zero) tokens appended to `tokens`; `strided` lays the input out
  // as [B, L, H, D] in memory.
  Input make_input(int64_t count, bool strided, Tokens& tokens) {
    Input in;
    in.k = fill(in.k_storage, o_.head_dim, count, strided, tokens.k);
    in.v = fill(in.v_storage, o_.head_dim_v, count, strided, tokens.v);
    return in;
  }

  // heads_first: [B, H, n, D] as update() returns; else [B, n, H, D] as state() and snapshots.
  [[nodiscard]] Bytes gather(const std::vector<Bytes>& tokens, int64_t dim, const Positions& p,
                             bool heads_first) const {
    Bytes out;
    const size_t row = static_cast<size_t>(dim) * size_of(o_.dtype);
    const auto append = [&](int64_t pos, int64_t b, int64_t h) {
      const uint8_t* src = tokens[static_cast<size_t>(pos)].data() +
                           static_cast<size_t>(b * o_.num_kv_heads + h) * row;
      out.insert(out.end(), src, src + row);
    };
    for (int64_t b = 0; b < o_.batch; ++b) {
      if (heads_first) {
        for (int64_t h = 0; h < o_.num_kv_heads; ++h) {
          for (int64_t pos : p) append(pos, b, h);
        }
      } else {
        for (int64_t pos : p) {
          for (int64_t h = 0; h < o_.num_kv_heads; ++h) append(pos, b, h);
        }
      }
    }
    return out;
  }

  std::mt19937& rng() { return rng_; }

 private:
  TensorView fill(std::vector<float>& storage, int64_t dim, int64_t count, bool strided,
                  std::vector<Bytes>& tokens) {
    const int64_t b_n = o_.batch;
    const int64_t h_n = o_.num_kv_heads;
    const size_t elem = size_of(o_.dtype);
    storage.assign(static_cast<size_t>(b_n * h_n * count * dim), 0.0f);
    TensorView t;
    t.data = storage.data();
    t.dtype = o_.dtype;
    t.rank = 4;
    t.shape = {b_n, h_n, count, dim};
    t.strides = strided ? std::array<int64_t, kMaxRank>{count * h_n * dim, dim, h_n * dim, 1}
                        : std::array<int64_t, kMaxRank>{h_n * count * dim, count * dim, dim, 1};
    std::uniform_real_distribution<float> magnitude(0.25f, 4.0f);
    std::bernoulli_distribution negative(0.5);
    for (int64_t i = 0; i < count; ++i) {
      Bytes token(static_cast<size_t>(b_n * h_n * dim) * elem);
      for (int64_t b = 0; b < b_n; ++b) {
        for (int64_t h = 0; h < h_n; ++h) {
          for (int64_t d = 0; d < dim; ++d) {
            const float x = negative(rng_) ? -magnitude(rng_) : magnitude(rng_);
            uint8_t* dst = token.data() + static_cast<size_t>((b * h_n + h) * dim + d) * elem;
            from_float(&x, o_.dtype, dst, 1);
            const int64_t index[] = {b, h, i, d};
            std::memcpy(t.element_ptr(index), dst, elem);
          }
        }
      }
      tokens.push_back(std::move(token));
    }
    return t;
  }

  RotatingKVCacheOptions o_;
  std::mt19937 rng_;
};

// A snapshot and the model tokens [0, end) of the history it was taken from.
struct Entry {
  std::optional<Snapshot> snap;
  Tokens tokens;
  bool foreign_layout = false;  // taken from a cache of another layout
};

// Per operation: how many calls were accepted and how many refused.
using Tally = std::map<std::string, std::array<int64_t, 2>>;

class RotatingModelRun {
 public:
  RotatingModelRun(const RotatingKVCacheOptions& o, uint32_t seed, Tally* tally)
      : o_(o), rules_{o.max_size, o.keep}, h_(o, seed), tally_(tally) {
    cache_ = std::move(*RotatingKVCache::create(o));
    twin_ = std::move(*RotatingKVCache::create(o));
    RotatingKVCacheOptions other = o;
    other.keep = (o.keep + 1) % o.max_size;
    foreign_ = std::move(*RotatingKVCache::create(other));
    Harness foreign_h(other, seed + 1);
    // A few snapshots of another cache with the same layout, and of another layout.
    for (int64_t end : {2, 4, 9}) {
      twin_entries_.push_back(take(*twin_, h_, twin_tokens_, end, false));
      foreign_entries_.push_back(take(*foreign_, foreign_h, foreign_tokens_, end, true));
    }
  }

  void run(int num_steps) {
    for (int step = 0; step < num_steps && !::testing::Test::HasFatalFailure(); ++step) {
      SCOPED_TRACE("step " + std::to_string(step) + " offset " + std::to_string(model_.size()));
      const int64_t op = pick(0, 99);
      if (op < 40) {
        do_update();
      } else if (op < 52) {
        do_restore();
      } else if (op < 66) {
        do_snapshot();
      } else if (op < 80) {
        do_restore_snapshot();
      } else if (op < 91) {
        do_merge();
      } else if (op < 96) {
        do_split();
      } else {
        cache_->free();
        model_.truncate(0);
      }
      check_state();
    }
  }

 private:
  int64_t pick(int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(h_.rng());
  }

  Entry take(RotatingKVCache& c, Harness& h, Tokens& tokens, int64_t end, bool foreign) {
    const Input in = h.make_input(end - c.offset(), false, tokens);
    EXPECT_OK(c.update(in.k, in.v));
    Result<std::optional<Snapshot>> s = c.snapshot(c.offset() - 1);
    EXPECT_OK(s);
    return Entry{std::move(*s), tokens, foreign};
  }

  void check_state() {
    const int64_t n = model_.size();
    EXPECT_EQ(cache_->offset(), n);
    EXPECT_EQ(cache_->window_len(), std::min(n, o_.max_size));
    EXPECT_EQ(cache_->has_wrapped(), n > o_.max_size);
    const std::vector<TensorView> s = cache_->state();
    ASSERT_EQ(s.size(), 2u);
    const Positions w = rules_.window(n);
    EXPECT_EQ(view_bytes(s[0]), h_.gather(model_.k, o_.head_dim, w, false));
    EXPECT_EQ(view_bytes(s[1]), h_.gather(model_.v, o_.head_dim_v, w, false));
  }

  void expect_snapshot_holds(const Snapshot& s, const Tokens& tokens) {
    const Positions w = rules_.window(s.end());
    const int64_t n = static_cast<int64_t>(w.size());
    ASSERT_EQ(s.arrays().size(), 2u);
    EXPECT_EQ(view_bytes(s.arrays()[0].view(o_.dtype, {o_.batch, n, o_.num_kv_heads, o_.head_dim})),
              h_.gather(tokens.k, o_.head_dim, w, false));
    EXPECT_EQ(
        view_bytes(s.arrays()[1].view(o_.dtype, {o_.batch, n, o_.num_kv_heads, o_.head_dim_v})),
        h_.gather(tokens.v, o_.head_dim_v, w, false));
  }

  void count(const std::string& op, bool ok) { ++(*tally_)[op][ok ? 0 : 1]; }

  void do_update() {
    const int64_t count_tokens = pick(1, o_.max_size + 2);
    const int64_t begin = model_.size();
    const Input in = h_.make_input(count_tokens, pick(0, 1) == 1, model_);
    Result<CacheViews> views = cache_->update(in.k, in.v);
    ASSERT_OK(views);
    const int64_t end = model_.size();
    const Positions want = rules_.update_view(begin, end);
    EXPECT_EQ(view_bytes(views->keys), h_.gather(model_.k, o_.head_dim, want, true));
    EXPECT_EQ(view_bytes(views->values), h_.gather(model_.v, o_.head_dim_v, want, true));
    EXPECT_EQ(views->num_pinned, end > o_.max_size ? o_.keep : 0);
    EXPECT_EQ(views->first_pos, end > o_.max_size ? want[static_cast<size_t>(o_.keep)] : 0);
  }

  void do_restore() {
    const int64_t n = model_.size();
    const int64_t target = pick(0, 5) == 0 ? n : pick(-1, n + 1);
    const Status s = cache_->restore(target);
    if (target < 0 || target > n) {
      EXPECT_TRUE(has_error(s, Code::invalid_argument, "expected 0 <= target <= offset"));
      count("restore", false);
    } else if (target < n && n > o_.max_size) {
      EXPECT_TRUE(has_error(s, Code::invalid_argument, "were overwritten"));
      count("restore", false);
    } else {
      EXPECT_OK(s);
      count(target < model_.size() ? "restore (rewind)" : "restore", true);
      model_.truncate(target);
    }
  }

  void do_snapshot() {
    const int64_t n = model_.size();
    int64_t from = pick(-1, n + 1);
    // Often from the end of the latest snapshot, so that adjacent pairs arise for merge.
    if (!entries_.empty() && pick(0, 1) == 0) from = entries_.back().snap->end();
    Result<std::optional<Snapshot>> s = cache_->snapshot(from);
    if (from < 0 || from > n) {
      EXPECT_TRUE(has_error(s, Code::invalid_argument, "expected 0 <= from <= offset"));
      count("snapshot", false);
      return;
    }
    ASSERT_OK(s);
    count("snapshot", true);
    if (from == n) {
      EXPECT_FALSE(s->has_value());
      return;
    }
    ASSERT_TRUE(s->has_value());
    EXPECT_EQ((*s)->begin(), from);
    EXPECT_EQ((*s)->end(), n);
    EXPECT_EQ((*s)->cache_id(), cache_->id());
    expect_snapshot_holds(**s, model_);
    if (entries_.size() >= 8) entries_.erase(entries_.begin() + pick(0, 7));
    entries_.push_back(Entry{std::move(*s), model_, false});
  }

  // An entry of this cache, or now and then one of the twin or the foreign cache.
  Entry& pick_entry(bool allow_twin) {
    const int64_t r = pick(0, 9);
    if (r == 0 || entries_.empty()) {
      return foreign_entries_[static_cast<size_t>(pick(0, 2))];
    }
    if (r == 1 && allow_twin) return twin_entries_[static_cast<size_t>(pick(0, 2))];
    return entries_[static_cast<size_t>(pick(0, static_cast<int64_t>(entries_.size()) - 1))];
  }

  void do_restore_snapshot() {
    Entry& e = pick_entry(true);
    const int64_t a = e.snap->begin();
    const int64_t b = e.snap->end();
    const int64_t target = pick(0, 2) == 0 ? b : pick(a - 1, b + 1);
    const Status s = cache_->restore(*e.snap, target);
    if (e.foreign_layout) {
      EXPECT_TRUE(has_error(s, Code::invalid_argument, "snapshot has layout"));
      count("restore_snapshot", false);
    } else if (target < a || target > b) {
      EXPECT_TRUE(
          has_error(s, Code::invalid_argument,
                    "expected " + std::to_string(a) + " <= target <= " + std::to_string(b)));
      count("restore_snapshot", false);
    } else if (target < b && b > o_.max_size) {
      EXPECT_TRUE(has_error(s, Code::invalid_argument,
                            "were overwritten, expected target == " + std::to_string(b)));
      count("restore_snapshot", false);
    } else {
      EXPECT_OK(s);
      model_ = e.tokens;
      model_.truncate(target);
      count(target < b ? "restore_snapshot (earlier)" : "restore_snapshot", true);
    }
  }

  void do_merge() {
    if (entries_.size() < 2) return;
    const int64_t last = static_cast<int64_t>(entries_.size()) - 1;
    size_t pi = static_cast<size_t>(pick(0, last));
    size_t ci = static_cast<size_t>(pick(0, last));
    // Mostly an adjacent pair, when there is one.
    std::vector<std::pair<size_t, size_t>> adjacent;
    for (size_t i = 0; i < entries_.size(); ++i) {
      for (size_t j = 0; j < entries_.size(); ++j) {
        if (i != j && entries_[i].snap->end() == entries_[j].snap->begin()) {
          adjacent.emplace_back(i, j);
        }
      }
    }
    if (!adjacent.empty() && pick(0, 3) != 0) {
      std::tie(pi, ci) =
          adjacent[static_cast<size_t>(pick(0, static_cast<int64_t>(adjacent.size()) - 1))];
    }
    if (pi == ci) return;
    const int64_t variant = pick(0, 9);
    Entry* parent = &entries_[pi];
    Entry* child = &entries_[ci];
    if (variant == 0) child = &foreign_entries_[static_cast<size_t>(pick(0, 2))];
    if (variant == 1) child = &twin_entries_[static_cast<size_t>(pick(0, 2))];
    if (variant == 2) parent = &foreign_entries_[static_cast<size_t>(pick(0, 2))];
    std::optional<Snapshot> missing;
    std::optional<Snapshot>& p = variant == 3 ? missing : parent->snap;
    std::optional<Snapshot>& c = variant == 4 ? missing : child->snap;

    std::string fragment;
    if (!p) {
      fragment = "parent is missing";
    } else if (!c) {
      fragment = "child is missing";
    } else if (parent->foreign_layout) {
      fragment = "parent has layout";
    } else if (child->foreign_layout) {
      fragment = "child has layout";
    } else if (p->cache_id() != c->cache_id()) {
      fragment = "child comes from cache";
    } else if (p->end() != c->begin()) {
      fragment = "expected adjacent ranges";
    }
    const int64_t a = p ? p->begin() : 0;
    const int64_t c_end = c ? c->end() : 0;
    const Bytes parent_bytes = buffer_bytes(parent->snap->arrays()[0]);
    const Bytes child_bytes = buffer_bytes(child->snap->arrays()[0]);
    Result<Snapshot> merged = cache_->merge(std::move(p), std::move(c));
    if (!fragment.empty()) {
      EXPECT_TRUE(has_error(merged, Code::invalid_argument, fragment));
      // Neither argument was moved from.
      EXPECT_TRUE(parent->snap.has_value());
      EXPECT_TRUE(child->snap.has_value());
      EXPECT_EQ(buffer_bytes(parent->snap->arrays()[0]), parent_bytes);
      EXPECT_EQ(buffer_bytes(child->snap->arrays()[0]), child_bytes);
      count("merge", false);
      return;
    }
    ASSERT_OK(merged);
    count("merge", true);
    EXPECT_FALSE(parent->snap.has_value());
    EXPECT_FALSE(child->snap.has_value());
    EXPECT_EQ(merged->begin(), a);
    EXPECT_EQ(merged->end(), c_end);
    EXPECT_EQ(merged->cache_id(), cache_->id());
    Entry out{std::move(*merged), child->tokens, false};
    expect_snapshot_holds(*out.snap, out.tokens);
    entries_.erase(entries_.begin() + static_cast<std::ptrdiff_t>(std::max(pi, ci)));
    entries_.erase(entries_.begin() + static_cast<std::ptrdiff_t>(std::min(pi, ci)));
    entries_.push_back(std::move(out));
  }

  void do_split() {
    Entry& e = pick_entry(true);
    const int64_t a = e.snap->begin();
    const int64_t b = e.snap->end();
    const int64_t at = pick(a - 1, b + 1);
    Result<SnapshotPair> pair = cache_->split(std::move(*e.snap), at);
    if (e.foreign_layout) {
      EXPECT_TRUE(has_error(pair, Code::invalid_argument, "s has layout"));
      ASSERT_TRUE(e.snap.has_value());  // not moved from
      EXPECT_EQ(e.snap->begin(), a);
      EXPECT_EQ(e.snap->arrays().size(), 2u);
      count("split", false);
      return;
    }
    ASSERT_OK(pair);
    count("split", true);
    EXPECT_FALSE(pair->first.has_value());
    ASSERT_TRUE(pair->second.has_value());
    EXPECT_EQ(pair->second->begin(), a);
    EXPECT_EQ(pair->second->end(), b);
    e.snap = std::move(pair->second);
    expect_snapshot_holds(*e.snap, e.tokens);
  }

  RotatingKVCacheOptions o_;
  Rules rules_;
  Harness h_;
  std::unique_ptr<RotatingKVCache> cache_;
  std::unique_ptr<RotatingKVCache> twin_;     // same layout, another cache
  std::unique_ptr<RotatingKVCache> foreign_;  // another keep
  Tokens model_;
  Tokens twin_tokens_;
  Tokens foreign_tokens_;
  std::vector<Entry> entries_;
  std::vector<Entry> twin_entries_;
  std::vector<Entry> foreign_entries_;
  Tally* tally_;
};

// Many short random sequences, each with its own configuration and seed.
constexpr uint32_t kNumSequences = 1200;
constexpr int kStepsPerSequence = 50;

TEST(RotatingModel, RandomOperationsMatchTheModel) {
  const uint32_t base_seed = test_seed();
  constexpr DType kDTypes[] = {DType::f32, DType::f16, DType::bf16};
  Tally tally;
  // Each seed picks its own configuration, so rerunning with a reported seed reproduces it.
  for (uint32_t run = 0; run < kNumSequences; ++run) {
    const uint32_t seed = base_seed + run;
    SCOPED_TRACE(seed_trace(seed));
    std::mt19937 rng(seed);
    RotatingKVCacheOptions o;
    o.max_size = std::uniform_int_distribution<int64_t>(5, 9)(rng);
    o.keep = std::uniform_int_distribution<int64_t>(0, 3)(rng);
    o.num_kv_heads = 2;
    o.head_dim = 3;
    o.head_dim_v = 4;
    o.dtype = kDTypes[seed % 3];
    o.batch = 1 + (seed / 3) % 2;
    SCOPED_TRACE("max_size " + std::to_string(o.max_size) + " keep " + std::to_string(o.keep) +
                 " dtype " + name(o.dtype) + " batch " + std::to_string(o.batch));
    RotatingModelRun(o, seed, &tally).run(kStepsPerSequence);
    if (HasFatalFailure()) return;
  }
  // The random mix reached both outcomes of every operation.
  for (const char* op : {"restore", "snapshot", "restore_snapshot", "merge", "split"}) {
    SCOPED_TRACE(op);
    EXPECT_GT(tally[op][0], 0);
    EXPECT_GT(tally[op][1], 0);
  }
  EXPECT_GT((tally["restore (rewind)"][0]), 0);
  EXPECT_GT((tally["restore_snapshot (earlier)"][0]), 0);
}

}  // namespace
}  // namespace kvcache
