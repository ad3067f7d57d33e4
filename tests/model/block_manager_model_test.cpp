// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// BlockManager against a naive model: a map of sequence -> token ids, the set of token runs
// committed as full pages, and a simulated pool where each page holds token ids. Random
// operations (add with shared system prompts and salts, reserve/commit, truncate, fork, free,
// match_prefix, with the keys given or not, preemption plans) on small pools; after every step the
// manager's invariants hold, every sequence's pages hold exactly its tokens (so copy-on-write and
// prefix hits never hand out wrong data), every prefix hit is a run that was committed under the
// same key extras, and replaying the page events gives exactly the keys the manager has cached.

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iterator>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "kvcache/block_manager.h"
#include "kvcache/page_key.h"

#include "testing/test_util.h"

namespace kvcache {
namespace {

using ::kvcache::testing::has_error;
using ::kvcache::testing::seed_trace;
using ::kvcache::testing::test_seed;
using ::kvcache::testing::uniform_int;
using ::kvcache::testing::value_or_fail;
using Tokens = std::vector<int32_t>;

// Key extras the random requests pick from. The image starts at position 0, so requests of
// different extras never share a page, and the model can key its runs by extras index.
const MultimodalSpan kImage[] = {{"image-sha", 0, 2}};
const KeyExtras kExtras[] = {
    {"", "", {}},     {"tenant-a", "", {}}, {"tenant-b", "", {}}, {"tenant-a", "lora-1", {}},
    {"", "", kImage},
};
constexpr int kNumExtras = sizeof(kExtras) / sizeof(kExtras[0]);

struct Config {
  int64_t num_pages;
  int64_t page_size;
  bool caching;
  bool weak_hash;  // keys that collide whenever two pages hold the same bytes in any order
};

class Model {
 public:
  Model(const Config& config, uint32_t seed) : config_(config), rng_(seed) {
    BlockManagerOptions o;
    o.num_pages = config.num_pages;
    o.page_size = config.page_size;
    o.enable_prefix_caching = config.caching;
    o.fingerprint = KeyFingerprint{"model", "f16", config.page_size, kLayerGroup};
    o.hash_kind = (seed % 2 == 0) ? HashKind::sha256 : HashKind::xxh3_128;
    o.record_events = true;
    if (config.weak_hash) {
      o.hash_override = [](std::span<const uint8_t> msg) {
        uint64_t sum = 0;
        for (uint8_t b : msg) sum += b;
        PageKey k;
        std::memcpy(k.bytes.data(), &sum, sizeof(sum));
        return k;
      };
    }
    fingerprint_ = o.fingerprint;
    hash_ = o.hash_override ? o.hash_override : key_hash_fn(o.hash_kind);
    manager_ = value_or_fail(BlockManager::create(o));
    pages_.assign(static_cast<size_t>(config.num_pages),
                  Tokens(static_cast<size_t>(config.page_size), -1));
    for (int i = 0; i < 3; ++i) system_prompts_.push_back(random_tokens(uniform(0, 3 * ps())));
  }

  void step() {
    const int64_t r = uniform(0, 99);
    if (seqs_.empty() || (r < 15 && seqs_.size() < 12)) {
      add();
    } else if (r < 60) {
      reserve_commit(pick());
    } else if (r < 68) {
      truncate(pick());
    } else if (r < 76) {
      if (seqs_.size() < 12) fork(pick());
    } else if (r < 84) {
      free(pick());
    } else if (r < 92) {
      match();
    } else if (r < 95) {
      preempt(uniform(0, config_.num_pages));
    } else {
      refuse(pick());
    }
    if (::testing::Test::HasFatalFailure()) return;
    check();
    if (uniform(0, 3) != 0) drain_events();  // now and then they pile up over several steps
  }

 private:
  struct Seq {
    int extras = 0;
    Tokens tokens;               // committed
    Tokens todo;                 // prompt tokens still to commit
    std::vector<int64_t> slots;  // reserved, not committed
  };

  static constexpr int64_t kLayerGroup = 2;
  using KeyBytes = std::array<uint8_t, 32>;

  int64_t ps() const { return config_.page_size; }
  std::vector<PageKey> keys_of(const Tokens& tokens, int e) const {
    std::vector<PageKey> keys;
    EXPECT_OK(page_keys(hash_, fingerprint_, tokens, kExtras[e], &keys));
    return keys;
  }
  int64_t uniform(int64_t lo, int64_t hi) { return uniform_int(rng_, lo, hi); }
  Tokens random_tokens(int64_t n) {
    Tokens t;
    // A small alphabet, so unrelated requests also produce identical pages now and then.
    for (int64_t i = 0; i < n; ++i) t.push_back(static_cast<int32_t>(uniform(0, 3)));
    return t;
  }
  SeqId pick() {
    auto it = seqs_.begin();
    std::advance(it, uniform(0, static_cast<int64_t>(seqs_.size()) - 1));
    return it->first;
  }
  Tokens random_prompt() {
    Tokens p = system_prompts_[static_cast<size_t>(uniform(0, 2))];
    const Tokens suffix = random_tokens(uniform(0, 2 * ps() + 1));
    p.insert(p.end(), suffix.begin(), suffix.end());
    return p;
  }

  // The most cached tokens add(prompt) may take: whole pages committed under the same extras,
  // capped to leave the last token: `hit` must be one of them and, with `exact` while nothing
  // was evicted and keys are strong, the longest.
  void check_hit(const Tokens& prompt, int e, int64_t hit, bool exact) {
    const int64_t n = static_cast<int64_t>(prompt.size());
    const int64_t cap = n == 0 ? 0 : (n - 1) / ps() * ps();
    ASSERT_EQ(hit % ps(), 0);
    ASSERT_LE(hit, cap);
    if (!config_.caching) {
      ASSERT_EQ(hit, 0);
    }
    if (hit > 0) {
      ASSERT_TRUE(committed_.count({e, Tokens(prompt.begin(), prompt.begin() + hit)}))
          << "hit of " << hit << " tokens was never committed under these extras";
    }
    if (!exact || !config_.caching || config_.weak_hash || manager_->stats().evictions > 0) return;
    int64_t best = 0;
    for (int64_t k = ps(); k <= cap; k += ps()) {
      if (!committed_.count({e, Tokens(prompt.begin(), prompt.begin() + k)})) break;
      best = k;
    }
    ASSERT_EQ(hit, best) << "no eviction yet, so every committed page is still cached";
    if (hit > 0) ++num_exact_hits_;
  }

  void add() {
    const SeqId id = next_id_++;
    const int e = static_cast<int>(uniform(0, kNumExtras - 1));
    const Tokens prompt = random_prompt();
    const int64_t matched = value_or_fail(manager_->match_prefix(prompt, kExtras[e]));
    // The scheduler may hand over the keys a router computed.
    const int64_t hit =
        uniform(0, 1) == 0
            ? value_or_fail(manager_->add(id, prompt, kExtras[e]))
            : value_or_fail(manager_->add(id, prompt, keys_of(prompt, e), kExtras[e]));
    ASSERT_EQ(hit, matched);
    check_hit(prompt, e, hit, true);
    Seq& s = seqs_[id];
    s.extras = e;
    s.tokens.assign(prompt.begin(), prompt.begin() + hit);
    s.todo.assign(prompt.begin() + hit, prompt.end());
  }

  void reserve_commit(SeqId id) {
    Seq& s = seqs_[id];
    if (static_cast<int64_t>(s.tokens.size()) > 8 * ps()) {
      free(id);  // finished
      return;
    }
    const int64_t n = s.todo.empty() ? uniform(0, 2 * ps() + 1)
                                     : std::min<int64_t>(static_cast<int64_t>(s.todo.size()),
                                                         uniform(1, 3 * ps()));
    const auto before = observe(id);
    const Result<std::span<const int64_t>> r = manager_->reserve(id, n);
    if (!r.ok()) {
      ASSERT_TRUE(has_error(r, Code::resource_exhausted, "BlockManager.reserve"));
      ASSERT_EQ(observe(id), before);
      ++num_exhausted_;
      // The scheduler preempts others for what this sequence's pages would take.
      preempt(std::min(config_.num_pages, manager_->num_free_pages() +
                                              manager_->num_evictable_pages() + uniform(1, 2)));
      return;
    }
    s.slots.assign(r->begin(), r->end());
    const int64_t len = static_cast<int64_t>(s.tokens.size());
    const auto table = value_or_fail(manager_->page_table(id));
    for (int64_t i = 0; i < n; ++i) {
      const int64_t pos = len + i;
      ASSERT_EQ(s.slots[static_cast<size_t>(i)],
                table[static_cast<size_t>(pos / ps())] * ps() + pos % ps());
    }
    // The caller's part: run the copies in order, before this step's writes.
    for (const PageCopy& c : manager_->pending_copies()) {
      pages_[static_cast<size_t>(c.dst)] = pages_[static_cast<size_t>(c.src)];
    }
    num_copies_ += static_cast<int64_t>(manager_->pending_copies().size());
    manager_->clear_pending_copies();
    // Commit all, some or none of the reservation.
    const int64_t k = uniform(0, 3) == 0 ? uniform(0, n) : n;
    if (s.todo.empty()) {
      commit(id, random_tokens(k));
    } else {
      const Tokens t(s.todo.begin(), s.todo.begin() + k);
      s.todo.erase(s.todo.begin(), s.todo.begin() + k);
      commit(id, t);
    }
  }

  void commit(SeqId id, const Tokens& t) {
    Seq& s = seqs_[id];
    ASSERT_OK(manager_->commit(id, t));
    const int64_t old = static_cast<int64_t>(s.tokens.size());
    for (size_t i = 0; i < t.size(); ++i) {
      const int64_t slot = s.slots[i];
      pages_[static_cast<size_t>(slot / ps())][static_cast<size_t>(slot % ps())] = t[i];
    }
    s.slots.erase(s.slots.begin(), s.slots.begin() + static_cast<ptrdiff_t>(t.size()));
    s.tokens.insert(s.tokens.end(), t.begin(), t.end());
    const int64_t len = static_cast<int64_t>(s.tokens.size());
    if (len / ps() == old / ps()) return;
    for (int64_t b = (old / ps() + 1) * ps(); b <= len; b += ps()) {
      committed_.insert({s.extras, Tokens(s.tokens.begin(), s.tokens.begin() + b)});
    }
    // The (key, parent) of every full page, for the cached events this commit may produce.
    const std::vector<PageKey> keys = keys_of(s.tokens, s.extras);
    for (size_t j = static_cast<size_t>(old / ps()); j < keys.size(); ++j) {
      const PageKey parent =
          j == 0 ? root_key(hash_, fingerprint_, kExtras[s.extras].salt) : keys[j - 1];
      committed_keys_.insert({keys[j].bytes, parent.bytes});
    }
  }

  void truncate(SeqId id) {
    Seq& s = seqs_[id];
    const int64_t n = uniform(0, static_cast<int64_t>(s.tokens.size()));
    ASSERT_OK(manager_->truncate(id, n));
    s.tokens.resize(static_cast<size_t>(n));
    s.slots.clear();
    s.todo.clear();  // a rolled back sequence decodes from here
  }

  void fork(SeqId parent) {
    const SeqId child = next_id_++;
    ASSERT_OK(manager_->fork(parent, child));
    Seq c = seqs_[parent];
    c.slots.clear();
    seqs_[child] = std::move(c);
  }

  void free(SeqId id) {
    ASSERT_OK(manager_->free(id));
    seqs_.erase(id);
  }

  void match() {
    const int e = static_cast<int>(uniform(0, kNumExtras - 1));
    const Tokens prompt = random_prompt();
    const auto before = observe(-1);
    const int64_t hit = value_or_fail(manager_->match_prefix(prompt, kExtras[e]));
    ASSERT_EQ(value_or_fail(manager_->match_prefix(prompt, keys_of(prompt, e), kExtras[e])), hit);
    // Keys of another request (other extras or tokens): any hit is still verified.
    const int e2 = static_cast<int>(uniform(0, kNumExtras - 1));
    std::vector<PageKey> wrong = keys_of(random_prompt(), e2);
    wrong.resize(prompt.size() / static_cast<size_t>(ps()));
    const int64_t wrong_hit = value_or_fail(manager_->match_prefix(prompt, wrong, kExtras[e]));
    ASSERT_EQ(observe(-1), before);
    check_hit(prompt, e, hit, true);
    check_hit(prompt, e, wrong_hit, false);
  }

  // Plans to free enough sequences (in a random priority order) for `need` pages, checks the
  // plan is pure, then carries it out and checks it was the shortest that suffices.
  void preempt(int64_t need) {
    std::vector<SeqId> order;
    for (const auto& [id, s] : seqs_) {
      if (uniform(0, 3) != 0) order.push_back(id);
    }
    std::shuffle(order.begin(), order.end(), rng_);
    const auto before = observe(-1);
    const Result<std::vector<SeqId>> plan = manager_->plan_preemption(need, order);
    ASSERT_EQ(observe(-1), before);
    const auto available = [&] {
      return manager_->num_free_pages() + manager_->num_evictable_pages();
    };
    if (!plan.ok()) {
      ASSERT_TRUE(has_error(plan, Code::resource_exhausted, "BlockManager.plan_preemption"));
      for (SeqId v : order) free(v);
      ASSERT_LT(available(), need);
      ++num_preempt_exhausted_;
      return;
    }
    ASSERT_LE(plan->size(), order.size());
    ASSERT_TRUE(std::equal(plan->begin(), plan->end(), order.begin()));
    for (SeqId v : *plan) {
      ASSERT_LT(available(), need) << "a shorter plan would do";
      free(v);
    }
    ASSERT_GE(available(), need);
    if (!plan->empty()) ++num_preemptions_;
  }

  // Replays the queued events onto the model's view of the index, then checks it against the
  // manager: the same number of keys, each of them cached.
  void drain_events() {
    for (const PageEvent& e : manager_->events()) {
      ASSERT_EQ(e.num_tokens, ps());
      ASSERT_EQ(e.layer_group, kLayerGroup);
      if (e.kind == PageEventKind::cached) {
        ASSERT_TRUE(committed_keys_.count({e.key.bytes, e.parent.bytes}))
            << "cached event for a page never committed: " << e.key.hex();
        ASSERT_TRUE(cached_.emplace(e.key.bytes, e.parent.bytes).second)
            << "cached twice: " << e.key.hex();
      } else {
        const auto it = cached_.find(e.key.bytes);
        ASSERT_NE(it, cached_.end()) << "evicted but not cached: " << e.key.hex();
        ASSERT_EQ(it->second, e.parent.bytes);
        cached_.erase(it);
        ++num_evicted_events_;
      }
    }
    manager_->clear_events();
    ASSERT_EQ(num_evicted_events_, manager_->stats().evictions);
    ASSERT_EQ(static_cast<int64_t>(cached_.size()), manager_->num_cached_pages());
    for (const auto& [key, parent] : cached_) {
      PageKey k;
      k.bytes = key;
      ASSERT_TRUE(manager_->is_cached(k)) << k.hex();
    }
  }

  // Refusals on a live sequence change nothing.
  void refuse(SeqId id) {
    Seq& s = seqs_[id];
    const auto before = observe(id);
    const Tokens too_many(s.slots.size() + 1, 7);
    ASSERT_TRUE(has_error(manager_->commit(id, too_many), Code::invalid_argument,
                          "expected at most " + std::to_string(s.slots.size()) + " reserved"));
    ASSERT_TRUE(has_error(manager_->truncate(id, static_cast<int64_t>(s.tokens.size()) + 1),
                          Code::invalid_argument, "BlockManager.truncate"));
    ASSERT_TRUE(has_error(manager_->fork(id, id), Code::invalid_argument, "exists"));
    ASSERT_TRUE(has_error(manager_->add(id, s.tokens), Code::invalid_argument, "exists"));
    ASSERT_TRUE(has_error(manager_->reserve(next_id_, 1), Code::not_found, "unknown sequence"));
    const Tokens prompt = random_prompt();
    const std::vector<PageKey> keys(prompt.size() / static_cast<size_t>(ps()) + 1);
    ASSERT_TRUE(has_error(manager_->add(next_id_, prompt, keys, kExtras[0]), Code::invalid_argument,
                          "keys has"));
    const SeqId twice[] = {id, id};
    ASSERT_TRUE(has_error(manager_->plan_preemption(1, twice), Code::invalid_argument, "repeats"));
    const SeqId unknown[] = {id, next_id_};
    ASSERT_TRUE(has_error(manager_->plan_preemption(1, unknown), Code::not_found, "unknown"));
    ASSERT_EQ(observe(id), before);
  }

  // What a refusal must leave alone.
  struct Observed {
    std::vector<PageId> table;
    int64_t num_tokens = 0;
    int64_t num_reserved = 0;
    int64_t num_free = 0;
    int64_t num_cached = 0;
    int64_t num_used = 0;
    BlockManagerStats stats;
    size_t num_events = 0;
    bool operator==(const Observed&) const = default;
  };
  Observed observe(SeqId id) const {
    Observed o;
    if (id >= 0) {
      const auto t = value_or_fail(manager_->page_table(id));
      o.table.assign(t.begin(), t.end());
      o.num_tokens = value_or_fail(manager_->num_tokens(id));
      o.num_reserved = value_or_fail(manager_->num_reserved(id));
    }
    o.num_free = manager_->num_free_pages();
    o.num_cached = manager_->num_cached_pages();
    o.num_used = manager_->num_used_pages();
    o.stats = manager_->stats();
    o.num_events = manager_->events().size();
    return o;
  }

  void check() {
    ASSERT_OK(manager_->check_invariants());
    ASSERT_EQ(manager_->num_sequences(), static_cast<int64_t>(seqs_.size()));
    ASSERT_EQ(
        manager_->num_free_pages() + manager_->num_evictable_pages() + manager_->num_used_pages(),
        config_.num_pages);
    for (const auto& [id, s] : seqs_) {
      const int64_t len = static_cast<int64_t>(s.tokens.size());
      ASSERT_EQ(value_or_fail(manager_->num_tokens(id)), len) << "sequence " << id;
      ASSERT_EQ(value_or_fail(manager_->num_reserved(id)), static_cast<int64_t>(s.slots.size()));
      const auto table = value_or_fail(manager_->page_table(id));
      const int64_t end = len + static_cast<int64_t>(s.slots.size());
      ASSERT_EQ(static_cast<int64_t>(table.size()), (end + ps() - 1) / ps());
      for (int64_t i = 0; i < len; ++i) {
        const PageId page = table[static_cast<size_t>(i / ps())];
        ASSERT_EQ(pages_[static_cast<size_t>(page)][static_cast<size_t>(i % ps())],
                  s.tokens[static_cast<size_t>(i)])
            << "sequence " << id << " token " << i << " (page " << page << ")";
      }
    }
  }

 public:
  int64_t num_exhausted_ = 0;
  int64_t num_copies_ = 0;
  int64_t num_exact_hits_ = 0;  // hits checked to be the longest possible
  int64_t num_preemptions_ = 0;
  int64_t num_preempt_exhausted_ = 0;
  int64_t num_evicted_events_ = 0;
  const BlockManager& manager() const { return *manager_; }

 private:
  Config config_;
  std::mt19937 rng_;
  std::unique_ptr<BlockManager> manager_;
  std::vector<Tokens> pages_;  // the simulated pool: token id per slot
  std::map<SeqId, Seq> seqs_;
  std::set<std::pair<int, Tokens>> committed_;  // (extras, tokens [0, b)) for each full page b
  std::vector<Tokens> system_prompts_;
  SeqId next_id_ = 0;
  KeyFingerprint fingerprint_;
  KeyHashFn hash_;
  std::set<std::pair<KeyBytes, KeyBytes>> committed_keys_;  // (key, parent) of committed pages
  std::map<KeyBytes, KeyBytes> cached_;                     // replayed events: key -> parent
};

// What the runs of one configuration went through, to show they reach the states under test.
struct Totals {
  int64_t exhausted = 0;
  int64_t copies = 0;
  int64_t hits = 0;
  int64_t exact_hits = 0;
  int64_t evictions = 0;
  int64_t preemptions = 0;
  int64_t preempt_exhausted = 0;
};

Totals run(const Config& config, int num_seeds, int num_steps) {
  Totals t;
  for (int i = 0; i < num_seeds; ++i) {
    const uint32_t seed = test_seed() + static_cast<uint32_t>(i);
    SCOPED_TRACE(seed_trace(seed));
    Model model(config, seed);
    for (int step = 0; step < num_steps; ++step) {
      SCOPED_TRACE("step " + std::to_string(step));
      model.step();
      if (::testing::Test::HasFatalFailure()) return t;
    }
    t.exhausted += model.num_exhausted_;
    t.copies += model.num_copies_;
    t.hits += model.manager().stats().prefix_hits;
    t.exact_hits += model.num_exact_hits_;
    t.evictions += model.manager().stats().evictions;
    t.preemptions += model.num_preemptions_;
    t.preempt_exhausted += model.num_preempt_exhausted_;
  }
  return t;
}

TEST(BlockManagerModel, RandomOperationsMatchTheModel) {
  const Config configs[] = {
      {512, 4, true, false},  // roomy: no evictions, so every hit must be the longest
      {10, 4, true, false},   // tight: exhaustion and evictions
      {12, 2, true, false},  {16, 1, true, false}, {10, 3, false, false},  // prefix caching off
      {16, 4, true, true},                                                 // colliding keys
      {8, 2, true, true},
  };
  for (const Config& c : configs) {
    SCOPED_TRACE("num_pages " + std::to_string(c.num_pages) + " page_size " +
                 std::to_string(c.page_size) + (c.caching ? " caching" : " no caching") +
                 (c.weak_hash ? " weak hash" : ""));
    const Totals t = run(c, 10, 600);
    if (HasFatalFailure()) return;
    EXPECT_GT(t.preemptions, 0);
    EXPECT_GT(t.preempt_exhausted, 0);
    if (c.page_size > 1) {
      EXPECT_GT(t.copies, 0);  // (with one token per page no page is ever partly filled)
    }
    if (c.caching) {
      EXPECT_GT(t.hits, 0);
    }
    if (c.num_pages > 100) {
      EXPECT_EQ(t.evictions, 0);
      EXPECT_GT(t.exact_hits, 0);
    } else {
      EXPECT_GT(t.exhausted, 0);
      if (c.caching) {
        EXPECT_GT(t.evictions, 0);
      }
    }
  }
}

}  // namespace
}  // namespace kvcache
