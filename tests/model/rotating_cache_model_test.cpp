// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// Model-based test of RotatingKVCache: a naive model (every token ever appended, per position)
// and the header's rules give the expected window and update() views; random operations run
// against both and the bytes are compared after every step.

#include <algorithm>
#include <array>
#include <cstdint>
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

using ::kvcache::testing::buffer_bytes;
using ::kvcache::testing::has_error;
using ::kvcache::testing::seed_trace;
using ::kvcache::testing::test_seed;
using ::kvcache::testing::view_bytes;

using Bytes = std::vector<uint8_t>;
using Positions = std::vector<int64_t>;

// The model: every token appended, per position, as [B, H, D] bytes.
using Tokens = ::kvcache::testing::TokenHistory;
using Input = Tokens::Input;

Tokens tokens_for(const RotatingKVCacheOptions& o) {
  return Tokens(o.dtype, o.batch, o.num_kv_heads, o.head_dim, o.head_dim_v);
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
      : o_(o),
        rules_{o.max_size, o.keep},
        rng_(seed),
        model_(tokens_for(o)),
        twin_tokens_(tokens_for(o)),
        foreign_tokens_(tokens_for(o)),
        tally_(tally) {
    cache_ = std::move(*RotatingKVCache::create(o));
    twin_ = std::move(*RotatingKVCache::create(o));
    RotatingKVCacheOptions other = o;
    other.keep = (o.keep + 1) % o.max_size;
    foreign_ = std::move(*RotatingKVCache::create(other));
    std::mt19937 foreign_rng(seed + 1);
    // A few snapshots of another cache with the same layout, and of another layout.
    for (int64_t end : {2, 4, 9}) {
      twin_entries_.push_back(take(*twin_, rng_, twin_tokens_, end, false));
      foreign_entries_.push_back(take(*foreign_, foreign_rng, foreign_tokens_, end, true));
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
  int64_t pick(int64_t lo, int64_t hi) { return ::kvcache::testing::uniform_int(rng_, lo, hi); }

  Entry take(RotatingKVCache& c, std::mt19937& rng, Tokens& tokens, int64_t end, bool foreign) {
    const Input in = tokens.next(end - c.offset(), rng);
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
    EXPECT_EQ(view_bytes(s[0]), model_.keys(w, false));
    EXPECT_EQ(view_bytes(s[1]), model_.values(w, false));
  }

  void expect_snapshot_holds(const Snapshot& s, const Tokens& tokens) {
    const Positions w = rules_.window(s.end());
    const int64_t n = static_cast<int64_t>(w.size());
    ASSERT_EQ(s.arrays().size(), 2u);
    EXPECT_EQ(view_bytes(s.arrays()[0].view(o_.dtype, {o_.batch, n, o_.num_kv_heads, o_.head_dim})),
              tokens.keys(w, false));
    EXPECT_EQ(
        view_bytes(s.arrays()[1].view(o_.dtype, {o_.batch, n, o_.num_kv_heads, o_.head_dim_v})),
        tokens.values(w, false));
  }

  void count(const std::string& op, bool ok) { ++(*tally_)[op][ok ? 0 : 1]; }

  void do_update() {
    const int64_t count_tokens = pick(1, o_.max_size + 2);
    const int64_t begin = model_.size();
    const bool strided = pick(0, 1) == 1;
    const Input in = model_.next(count_tokens, rng_, strided);
    Result<CacheViews> views = cache_->update(in.k, in.v);
    ASSERT_OK(views);
    const int64_t end = model_.size();
    const Positions want = rules_.update_view(begin, end);
    EXPECT_EQ(view_bytes(views->keys), model_.keys(want, true));
    EXPECT_EQ(view_bytes(views->values), model_.values(want, true));
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
  std::mt19937 rng_;
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
