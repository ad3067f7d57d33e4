// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// Model-based test of KVCache: a naive reference (per array, per batch row, one byte row per
// token) is driven alongside the real cache by random operations -- appends through both APIs,
// rewinds, snapshots, restores, merges, splits -- and every byte of the live cache is compared
// with it after every step. Refused operations must leave both unchanged.

#include <algorithm>
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
#include "kvcache/contiguous_cache.h"
#include "kvcache/dtype.h"
#include "kvcache/status.h"
#include "kvcache/tensor.h"

#include "testing/test_util.h"

namespace kvcache {
namespace {

using Bytes = std::vector<uint8_t>;
using testing::has_error;
using testing::random_tensor;
using testing::RandomTensor;
using testing::seed_trace;
using testing::test_seed;
using testing::uniform_int;
using testing::view_bytes;

// Token rows of every array: [array][batch row][token] -> the token's [H, dim] bytes. Arrays
// alternate K and V per layer, as KVCache::state() lists them.
using Tokens = std::vector<std::vector<std::vector<Bytes>>>;

constexpr int kSequences = 1200;
constexpr int kOpsPerSequence = 50;
constexpr size_t kMaxHeld = 8;

bool coin(std::mt19937& rng, int one_in = 2) { return uniform_int(rng, 1, one_in) == 1; }

// The [H, dim] bytes of token i of batch row b of a rank-4 view whose token axis is
// `token_axis` ([B, n, H, D]: 1, [B, H, L, D]: 2). Rank 3 [n, H, D] views have no batch axis.
Bytes token_row(const TensorView& t, int token_axis, int64_t b, int64_t i) {
  TensorView r;
  r.dtype = t.dtype;
  r.rank = 2;
  const int off = t.rank == 3 ? 1 : 0;  // a rank-3 view lacks axis 0
  const int head_axis = (token_axis == 1 ? 2 : 1) - off;
  r.shape[0] = t.shape[head_axis];
  r.shape[1] = t.shape[3 - off];
  r.strides[0] = t.strides[head_axis];
  r.strides[1] = t.strides[3 - off];
  const int64_t offset = (off ? 0 : b * t.strides[0]) + i * t.strides[token_axis - off];
  r.data = static_cast<char*>(t.data) + offset * static_cast<int64_t>(size_of(t.dtype));
  return view_bytes(r);
}

// A snapshot the test holds, with the tokens it should contain.
struct Held {
  std::optional<Snapshot> snapshot;
  Tokens tokens;  // [begin, end)
};

Tokens slice(const Tokens& all, int64_t first, int64_t n) {
  Tokens out(all.size());
  for (size_t a = 0; a < all.size(); ++a) {
    for (const auto& rows : all[a]) {
      out[a].emplace_back(rows.begin() + first, rows.begin() + first + n);
    }
  }
  return out;
}

void concat(Tokens& dst, const Tokens& src) {
  for (size_t a = 0; a < dst.size(); ++a) {
    for (size_t b = 0; b < dst[a].size(); ++b) {
      dst[a][b].insert(dst[a][b].end(), src[a][b].begin(), src[a][b].end());
    }
  }
}

// The bytes of an array of tokens in [batch, n, H, dim] order.
Bytes flatten(const std::vector<std::vector<Bytes>>& array) {
  Bytes out;
  for (const auto& rows : array) {
    for (const Bytes& r : rows) out.insert(out.end(), r.begin(), r.end());
  }
  return out;
}

class Runner {
 public:
  explicit Runner(uint32_t seed) : rng_(seed) {}

  void run() {
    make_caches();
    if (::testing::Test::HasFailure()) return;
    SCOPED_TRACE(config());
    for (step_ = 0; step_ < kOpsPerSequence; ++step_) {
      const int64_t op = uniform_int(rng_, 0, 99);
      const char* what = op < 30   ? "append"
                         : op < 40 ? "update"
                         : op < 45 ? "partial append"
                         : op < 52 ? "truncate"
                         : op < 62 ? "snapshot"
                         : op < 67 ? "restore(target)"
                         : op < 80 ? "restore(snapshot)"
                         : op < 88 ? "merge"
                         : op < 96 ? "split"
                         : op < 98 ? "clear"
                                   : "free";
      SCOPED_TRACE("step " + std::to_string(step_) + ": " + what + " at len " +
                   std::to_string(len()));
      if (op < 30) {
        append(uniform_int(rng_, 1, 5));
      } else if (op < 40) {
        update(uniform_int(rng_, 1, 5));
      } else if (op < 45) {
        partial_append(uniform_int(rng_, 1, 5));
      } else if (op < 52) {
        truncate();
      } else if (op < 62) {
        snapshot();
      } else if (op < 67) {
        restore_target();
      } else if (op < 80) {
        restore_snapshot();
      } else if (op < 88) {
        merge();
      } else if (op < 96) {
        split();
      } else if (op < 98) {
        cache_->clear();
        model_ = slice(model_, 0, 0);
      } else {
        cache_->free();
        model_ = slice(model_, 0, 0);
        EXPECT_EQ(cache_->capacity(), 0);
      }
      compare();
      if (::testing::Test::HasFailure()) return;
    }
  }

 private:
  // --- setup ---

  void make_caches() {
    o_.num_layers = coin(rng_) ? 1 : uniform_int(rng_, 2, 3);
    o_.batch = uniform_int(rng_, 1, 2);
    o_.num_kv_heads = uniform_int(rng_, 1, 2);
    o_.head_dim = uniform_int(rng_, 2, 5);
    o_.head_dim_v = coin(rng_, 3) ? 0 : uniform_int(rng_, 2, 5);
    const DType dtypes[] = {DType::f32, DType::f16, DType::bf16};
    o_.dtype = dtypes[uniform_int(rng_, 0, 2)];
    o_.fixed_capacity = coin(rng_, 3);
    o_.capacity =
        o_.fixed_capacity ? uniform_int(rng_, 8, 40) : (coin(rng_) ? 0 : uniform_int(rng_, 1, 16));
    cache_ = create(o_);
    if (!cache_) return;
    o_ = cache_->options();  // head_dim_v resolved
    model_ = Tokens(2 * static_cast<size_t>(o_.num_layers),
                    std::vector<std::vector<Bytes>>(static_cast<size_t>(o_.batch)));

    // A cache of the same layout (its snapshots restore here but never merge with ours) and
    // one of another layout (its snapshots are refused everywhere).
    KVCacheOptions twin_options = o_;
    twin_options.fixed_capacity = false;
    twin_ = create(twin_options);
    KVCacheOptions other_options = o_;
    other_options.head_dim += 1;
    other_ = create(other_options);
    if (!twin_ || !other_) return;
    for (KVCache* c : {twin_.get(), other_.get()}) {
      const KVCacheOptions& co = c->options();
      for (int64_t l = 0; l < co.num_layers; ++l) {
        const RandomTensor k =
            random_tensor(co.dtype, {co.batch, 6, co.num_kv_heads, co.head_dim}, rng_);
        const RandomTensor v =
            random_tensor(co.dtype, {co.batch, 6, co.num_kv_heads, co.head_dim_v}, rng_);
        ASSERT_OK(c->append(l, k.view, v.view));
      }
      ASSERT_OK(c->advance());
    }
    Result<std::optional<Snapshot>> twin_snapshot = twin_->snapshot(0);
    ASSERT_OK(twin_snapshot);
    Tokens twin_tokens = model_;
    for (size_t a = 0; a < twin_tokens.size(); ++a) {
      for (int64_t b = 0; b < o_.batch; ++b) {
        const TensorView t = twin_->state()[a];
        for (int64_t i = 0; i < 6; ++i) twin_tokens[a][b].push_back(token_row(t, 1, b, i));
      }
    }
    held_.push_back(Held{std::move(*twin_snapshot), std::move(twin_tokens)});
    Result<std::optional<Snapshot>> other_snapshot = other_->snapshot(0);
    ASSERT_OK(other_snapshot);
    other_snapshot_ = std::move(*other_snapshot);
  }

  static std::unique_ptr<KVCache> create(const KVCacheOptions& options) {
    return testing::value_or_fail(KVCache::create(options));
  }

  std::string config() const {
    return "layers " + std::to_string(o_.num_layers) + ", batch " + std::to_string(o_.batch) +
           ", heads " + std::to_string(o_.num_kv_heads) + ", head_dim " +
           std::to_string(o_.head_dim) + "/" + std::to_string(o_.head_dim_v) + ", " +
           name(o_.dtype) + (o_.fixed_capacity ? ", fixed capacity " : ", capacity ") +
           std::to_string(o_.capacity);
  }

  // --- helpers ---

  int64_t len() const { return model_.empty() ? 0 : static_cast<int64_t>(model_[0][0].size()); }
  bool fits(int64_t tokens) const { return !o_.fixed_capacity || tokens <= o_.capacity; }
  int64_t dim(size_t array) const { return array % 2 == 0 ? o_.head_dim : o_.head_dim_v; }

  // Random [batch, n, H, dim] inputs per array (rank 3 [n, H, dim] sometimes when batch is 1).
  std::vector<RandomTensor> token_inputs(int64_t n) {
    std::vector<RandomTensor> inputs;
    const bool rank3 = o_.batch == 1 && coin(rng_);
    const bool strided = coin(rng_, 3);
    for (size_t a = 0; a < model_.size(); ++a) {
      std::vector<int64_t> shape = {o_.batch, n, o_.num_kv_heads, dim(a)};
      if (rank3) shape.erase(shape.begin());
      inputs.push_back(random_tensor(o_.dtype, shape, rng_, strided));
    }
    return inputs;
  }

  // Tokens [first, first + n) of an input made by token_inputs().
  static TensorView token_slice(const TensorView& t, int64_t first, int64_t n) {
    const int axis = t.rank == 3 ? 0 : 1;
    TensorView out = t;
    out.shape[axis] = n;
    out.data = static_cast<char*>(t.data) +
               first * t.strides[axis] * static_cast<int64_t>(size_of(t.dtype));
    return out;
  }

  void push(const std::vector<RandomTensor>& inputs, int token_axis, int64_t n) {
    for (size_t a = 0; a < model_.size(); ++a) {
      for (int64_t b = 0; b < o_.batch; ++b) {
        for (int64_t i = 0; i < n; ++i) {
          model_[a][b].push_back(token_row(inputs[a].view, token_axis, b, i));
        }
      }
    }
  }

  void compare() {
    ASSERT_EQ(cache_->len(), len());
    ASSERT_EQ(cache_->offset(), len());
    EXPECT_GE(cache_->capacity(), len());
    if (o_.fixed_capacity) {
      EXPECT_TRUE(cache_->capacity() == o_.capacity || cache_->capacity() == 0);
    }
    const std::vector<TensorView> state = cache_->state();
    ASSERT_EQ(state.size(), model_.size());
    for (size_t a = 0; a < state.size(); ++a) {
      SCOPED_TRACE("array " + std::to_string(a));
      const Bytes want = flatten(model_[a]);
      ASSERT_EQ(view_bytes(state[a]), want);
      const auto layer = static_cast<int64_t>(a / 2);
      Result<TensorView> live = a % 2 == 0 ? cache_->k(layer) : cache_->v(layer);
      ASSERT_OK(live);
      EXPECT_EQ(live->rank, o_.batch == 1 ? 3 : 4);
      EXPECT_EQ(view_bytes(*live), want);
    }
  }

  void expect_snapshot(const Snapshot& s, const Tokens& tokens) {
    ASSERT_EQ(s.arrays().size(), tokens.size());
    const int64_t n = s.end() - s.begin();
    for (size_t a = 0; a < tokens.size(); ++a) {
      const TensorView t = s.arrays()[a].view(o_.dtype, {o_.batch, n, o_.num_kv_heads, dim(a)});
      ASSERT_EQ(view_bytes(t), flatten(tokens[a])) << "snapshot array " << a;
    }
  }

  void hold(Snapshot s, Tokens tokens) {
    if (held_.size() >= kMaxHeld)
      held_.erase(held_.begin() + uniform_int(rng_, 0, static_cast<int64_t>(kMaxHeld) - 1));
    held_.push_back(Held{std::move(s), std::move(tokens)});
  }

  // --- operations ---

  void append(int64_t n) {
    const std::vector<RandomTensor> inputs = token_inputs(n);
    const int64_t capacity = cache_->capacity();
    const void* data = cache_->state()[0].data;
    if (!fits(len() + n)) {
      EXPECT_TRUE(has_error(cache_->append(0, inputs[0].view, inputs[1].view),
                            Code::resource_exhausted, "exceed the fixed capacity"));
      EXPECT_EQ(cache_->capacity(), capacity);
      ASSERT_OK(cache_->advance());  // nothing pending
      return;
    }
    // Each layer takes its tokens in one to three chunks, and the calls of all layers interleave
    // at random, so the cache also grows while other layers hold pending tokens.
    std::vector<std::vector<int64_t>> cuts(static_cast<size_t>(o_.num_layers));
    for (auto& c : cuts) {
      c = {0, n};
      for (int extra = 0; extra < 2; ++extra) c.push_back(uniform_int(rng_, 0, n));
      std::sort(c.begin(), c.end());
      c.erase(std::unique(c.begin(), c.end()), c.end());
    }
    std::vector<size_t> next(cuts.size(), 1);
    for (;;) {
      std::vector<size_t> open;
      for (size_t l = 0; l < cuts.size(); ++l) {
        if (next[l] < cuts[l].size()) open.push_back(l);
      }
      if (open.empty()) break;
      const size_t l = open[uniform_int(rng_, 0, static_cast<int64_t>(open.size()) - 1)];
      const int64_t first = cuts[l][next[l] - 1];
      const int64_t count = cuts[l][next[l]] - first;
      ++next[l];
      ASSERT_OK(cache_->append(static_cast<int64_t>(l),
                               token_slice(inputs[2 * l].view, first, count),
                               token_slice(inputs[2 * l + 1].view, first, count)));
    }
    EXPECT_EQ(cache_->len(), len());  // invisible until advance()
    ASSERT_OK(cache_->advance());
    push(inputs, 1, n);
    if (len() <= capacity) {
      EXPECT_EQ(cache_->capacity(), capacity);
      EXPECT_EQ(cache_->state()[0].data, data) << "appending within capacity allocated";
    }
  }

  void partial_append(int64_t n) {
    if (o_.num_layers == 1 || !fits(len() + n)) return append(n);
    const std::vector<RandomTensor> inputs = token_inputs(n);
    const int64_t last = o_.num_layers - 1;
    for (int64_t l = 0; l < last; ++l) {
      ASSERT_OK(cache_->append(l, inputs[2 * l].view, inputs[2 * l + 1].view));
    }
    EXPECT_TRUE(has_error(cache_->advance(), Code::invalid_argument,
                          "KVCache.advance: layer " + std::to_string(last) +
                              " has 0 pending tokens, expected " + std::to_string(n)));
    // Each of these drops what is pending.
    switch (uniform_int(rng_, 0, 4)) {
      case 0:
        ASSERT_OK(cache_->truncate(len()));
        break;
      case 1:
        ASSERT_OK(cache_->restore(len()));
        break;
      case 2: {
        // A snapshot restore to its start.
        const Held* h = nullptr;
        for (const Held& candidate : held_) {
          if (candidate.snapshot->begin() <= len()) h = &candidate;
        }
        const int64_t target = h ? h->snapshot->begin() : len();
        if (h) {
          ASSERT_OK(cache_->restore(*h->snapshot, target));
        } else {
          ASSERT_OK(cache_->restore(target));
        }
        model_ = slice(model_, 0, target);
        break;
      }
      case 3:
        cache_->clear();
        model_ = slice(model_, 0, 0);
        break;
      default:
        cache_->free();
        model_ = slice(model_, 0, 0);
        break;
    }
    ASSERT_OK(cache_->advance());
  }

  void update(int64_t n) {
    std::vector<RandomTensor> inputs;
    const bool strided = coin(rng_, 3);
    for (size_t a = 0; a < 2; ++a) {
      inputs.push_back(
          random_tensor(o_.dtype, {o_.batch, o_.num_kv_heads, n, dim(a)}, rng_, strided));
    }
    Result<CacheViews> views = cache_->update(inputs[0].view, inputs[1].view);
    if (o_.num_layers != 1) {
      EXPECT_TRUE(has_error(views, Code::invalid_argument, "layers, expected 1"));
      return;
    }
    if (!fits(len() + n)) {
      EXPECT_TRUE(has_error(views, Code::resource_exhausted, "exceed the fixed capacity"));
      return;
    }
    ASSERT_OK(views);
    push(inputs, 2, n);
    EXPECT_EQ(views->num_pinned, 0);
    EXPECT_EQ(views->first_pos, 0);
    for (size_t a = 0; a < 2; ++a) {
      const TensorView& t = a == 0 ? views->keys : views->values;
      ASSERT_EQ(t.rank, 4);
      ASSERT_EQ(t.shape[2], len());
      // [B, H, len, dim]: head h of each token row.
      const size_t head_bytes = static_cast<size_t>(dim(a)) * size_of(o_.dtype);
      Bytes want;
      for (const auto& rows : model_[a]) {
        for (int64_t h = 0; h < o_.num_kv_heads; ++h) {
          for (const Bytes& r : rows) {
            const auto begin = r.begin() + static_cast<std::ptrdiff_t>(h * head_bytes);
            want.insert(want.end(), begin, begin + static_cast<std::ptrdiff_t>(head_bytes));
          }
        }
      }
      EXPECT_EQ(view_bytes(t), want);
    }
  }

  void truncate() {
    const int64_t n = uniform_int(rng_, -1, len() + 1);
    const Status s = cache_->truncate(n);
    if (n < 0 || n > len()) {
      EXPECT_TRUE(has_error(s, Code::invalid_argument, "KVCache.truncate: n is"));
      return;
    }
    ASSERT_OK(s);
    model_ = slice(model_, 0, n);
  }

  void restore_target() {
    const int64_t t = uniform_int(rng_, -1, len() + 1);
    const Status s = cache_->restore(t);
    if (t < 0 || t > len()) {
      EXPECT_TRUE(has_error(s, Code::invalid_argument, "KVCache.restore: target is"));
      return;
    }
    ASSERT_OK(s);
    model_ = slice(model_, 0, t);
  }

  void snapshot() {
    int64_t from = uniform_int(rng_, -1, len() + 1);
    // Often from the end of a held snapshot, so that adjacent pairs arise for merge.
    if (!held_.empty() && coin(rng_)) {
      const Held& h = held_[uniform_int(rng_, 0, static_cast<int64_t>(held_.size()) - 1)];
      if (h.snapshot && h.snapshot->end() <= len()) from = h.snapshot->end();
    }
    Result<std::optional<Snapshot>> r = cache_->snapshot(from);
    if (from < 0 || from > len()) {
      EXPECT_TRUE(has_error(r, Code::invalid_argument, "KVCache.snapshot: from is"));
      return;
    }
    ASSERT_OK(r);
    if (from == len()) {
      EXPECT_FALSE(r->has_value());
      return;
    }
    ASSERT_TRUE(r->has_value());
    const Snapshot& s = **r;
    EXPECT_EQ(s.begin(), from);
    EXPECT_EQ(s.end(), len());
    EXPECT_EQ(s.cache_id(), cache_->id());
    Tokens tokens = slice(model_, from, len() - from);
    expect_snapshot(s, tokens);
    hold(std::move(**r), std::move(tokens));
  }

  void restore_snapshot() {
    if (coin(rng_, 10)) {
      EXPECT_TRUE(has_error(cache_->restore(*other_snapshot_, 0), Code::invalid_argument,
                            "snapshot has layout"));
      return;
    }
    if (held_.empty()) return;
    const Held& h = held_[uniform_int(rng_, 0, static_cast<int64_t>(held_.size()) - 1)];
    const int64_t a = h.snapshot->begin();
    const int64_t b = h.snapshot->end();
    const int64_t t = uniform_int(rng_, a - 1, b + 1);
    const int64_t capacity = cache_->capacity();
    const Status s = cache_->restore(*h.snapshot, t);
    if (a > len()) {
      EXPECT_TRUE(has_error(s, Code::invalid_argument, "but the cache holds"));
    } else if (t < a || t > b) {
      EXPECT_TRUE(has_error(s, Code::invalid_argument, "KVCache.restore: target is"));
    } else if (!fits(t)) {
      EXPECT_TRUE(has_error(s, Code::resource_exhausted, "exceed the fixed capacity"));
    } else {
      ASSERT_OK(s);
      model_ = slice(model_, 0, a);
      concat(model_, slice(h.tokens, 0, t - a));
      return;
    }
    EXPECT_EQ(cache_->capacity(), capacity);
  }

  void merge() {
    if (held_.size() < 2) return;
    const auto pick = [&] { return uniform_int(rng_, 0, static_cast<int64_t>(held_.size()) - 1); };
    int64_t i = pick();
    int64_t j = pick();
    // Half the time look for an adjacent pair.
    if (coin(rng_)) {
      for (size_t x = 0; x < held_.size(); ++x) {
        for (size_t y = 0; y < held_.size(); ++y) {
          if (x != y && held_[x].snapshot->end() == held_[y].snapshot->begin() &&
              held_[x].snapshot->cache_id() == held_[y].snapshot->cache_id()) {
            i = static_cast<int64_t>(x);
            j = static_cast<int64_t>(y);
          }
        }
      }
    }
    if (i == j) {
      // A missing side.
      std::optional<Snapshot> none;
      const bool parent_missing = coin(rng_);
      Result<Snapshot> r = parent_missing
                               ? cache_->merge(std::move(none), std::move(held_[i].snapshot))
                               : cache_->merge(std::move(held_[i].snapshot), std::move(none));
      EXPECT_TRUE(has_error(r, Code::invalid_argument, "is missing, expected a snapshot"));
      ASSERT_TRUE(held_[i].snapshot.has_value());
      expect_snapshot(*held_[i].snapshot, held_[i].tokens);
      return;
    }
    Held& p = held_[i];
    Held& c = held_[j];
    const bool ok = p.snapshot->end() == c.snapshot->begin() &&
                    p.snapshot->cache_id() == c.snapshot->cache_id();
    const uint64_t id = p.snapshot->cache_id();
    const int64_t begin = p.snapshot->begin();
    const int64_t end = c.snapshot->end();
    Result<Snapshot> r = cache_->merge(std::move(p.snapshot), std::move(c.snapshot));
    if (!ok) {
      EXPECT_TRUE(has_error(r, Code::invalid_argument, "KVCache.merge: "));
      ASSERT_TRUE(p.snapshot.has_value());
      ASSERT_TRUE(c.snapshot.has_value());
      expect_snapshot(*p.snapshot, p.tokens);
      expect_snapshot(*c.snapshot, c.tokens);
      return;
    }
    ASSERT_OK(r);
    EXPECT_FALSE(p.snapshot.has_value());
    EXPECT_FALSE(c.snapshot.has_value());
    EXPECT_EQ(r->begin(), begin);
    EXPECT_EQ(r->end(), end);
    EXPECT_EQ(r->cache_id(), id);
    Tokens tokens = p.tokens;
    concat(tokens, c.tokens);
    expect_snapshot(*r, tokens);
    held_.erase(held_.begin() + std::max(i, j));
    held_.erase(held_.begin() + std::min(i, j));
    hold(std::move(*r), std::move(tokens));
  }

  void split() {
    if (held_.empty()) return;
    const auto i = uniform_int(rng_, 0, static_cast<int64_t>(held_.size()) - 1);
    if (coin(rng_, 10)) {
      const void* data = other_snapshot_->arrays()[0].data();
      EXPECT_TRUE(has_error(cache_->split(std::move(*other_snapshot_), 1), Code::invalid_argument,
                            "KVCache.split: s has layout"));
      EXPECT_EQ(other_snapshot_->arrays()[0].data(), data);
      return;
    }
    Held h = std::move(held_[i]);
    held_.erase(held_.begin() + i);
    const int64_t a = h.snapshot->begin();
    const int64_t c = h.snapshot->end();
    const uint64_t id = h.snapshot->cache_id();
    const int64_t at = uniform_int(rng_, a - 1, c + 1);
    Result<SnapshotPair> r = cache_->split(std::move(*h.snapshot), at);
    ASSERT_OK(r);
    const int64_t mid = std::clamp(at, a, c);
    ASSERT_EQ(r->first.has_value(), mid > a);
    ASSERT_EQ(r->second.has_value(), mid < c);
    if (r->first) {
      EXPECT_EQ(r->first->begin(), a);
      EXPECT_EQ(r->first->end(), mid);
      EXPECT_EQ(r->first->cache_id(), id);
      Tokens tokens = slice(h.tokens, 0, mid - a);
      expect_snapshot(*r->first, tokens);
      hold(std::move(*r->first), std::move(tokens));
    }
    if (r->second) {
      EXPECT_EQ(r->second->begin(), mid);
      EXPECT_EQ(r->second->end(), c);
      EXPECT_EQ(r->second->cache_id(), id);
      Tokens tokens = slice(h.tokens, mid - a, c - mid);
      expect_snapshot(*r->second, tokens);
      hold(std::move(*r->second), std::move(tokens));
    }
  }

  std::mt19937 rng_;
  int step_ = 0;
  KVCacheOptions o_;
  std::unique_ptr<KVCache> cache_;
  std::unique_ptr<KVCache> twin_;
  std::unique_ptr<KVCache> other_;
  std::optional<Snapshot> other_snapshot_;
  Tokens model_;
  std::vector<Held> held_;
};

TEST(ContiguousModel, RandomOperationsMatchTheReference) {
  const uint32_t base = test_seed();
  for (int i = 0; i < kSequences; ++i) {
    const uint32_t seed = base + static_cast<uint32_t>(i);
    SCOPED_TRACE(seed_trace(seed));
    Runner runner(seed);
    runner.run();
    if (::testing::Test::HasFailure()) return;
  }
}

}  // namespace
}  // namespace kvcache
