// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// BlockManager against a naive model: a map of sequence -> token ids, the set of token runs
// committed as full pages, and a simulated pool where each page holds token ids. Random
// operations (add with shared system prompts and salts, reserve/commit, truncate, fork, free,
// match_prefix, with the keys given or not, preemption plans) on small pools; after every step the
// manager's invariants hold, every sequence's pages hold exactly its tokens (so copy-on-write and
// prefix hits never hand out wrong data), every prefix hit is a run that was committed under the
// same key extras, and replaying the page events gives exactly the keys the manager has cached.
// Hybrid configurations (full, sliding-window and recurrent layer groups) check the same per page
// group (each group's pool simulated on its own, sliding-window tables null exactly out of the
// window), and per recurrent group a toy state per slot (a running hash of the tokens consumed,
// moved by pending_state_copies()) that must equal the hash of each sequence's tokens.

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
  std::vector<LayerGroupSpec> groups = {};  // empty: one full group of num_pages
};

// A toy recurrent model: a state is a running hash of the tokens it consumed.
constexpr uint64_t kInitialState = 0x9e3779b97f4a7c15ULL;
uint64_t step_state(uint64_t state, int32_t token) {
  return (state ^ static_cast<uint64_t>(token)) * 0x100000001b3ULL + 7;
}
uint64_t recompute(const Tokens& tokens) {
  uint64_t s = kInitialState;
  for (int32_t t : tokens) s = step_state(s, t);
  return s;
}

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
    o.groups = config.groups;
    fingerprint_ = o.fingerprint;
    hash_ = o.hash_override ? o.hash_override : key_hash_fn(o.hash_kind);
    manager_ = value_or_fail(BlockManager::create(o));
    specs_ = config.groups;
    if (specs_.empty()) specs_.push_back({LayerGroupKind::full, config.num_pages, 0});
    for (const LayerGroupSpec& g : specs_) {
      if (g.kind == LayerGroupKind::recurrent) {
        EXPECT_LT(recurrent_group_, 0) << "at most one recurrent group";
        recurrent_group_ = static_cast<int64_t>(pools_.size());
        // Garbage to start with, so a missing reset shows.
        std::vector<uint64_t> states;
        for (int64_t i = 0; i < g.num_pages; ++i) states.push_back(rng_());
        states_.push_back(std::move(states));
        pools_.emplace_back();
      } else {
        pools_.emplace_back(static_cast<size_t>(g.num_pages),
                            Tokens(static_cast<size_t>(config.page_size), -1));
        states_.emplace_back();
      }
    }
    cached_.resize(specs_.size());
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
      preempt(uniform(0, min_pool()));
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
    Tokens tokens;  // committed
    Tokens todo;    // prompt tokens still to commit
    // Per group, reserved and not committed (empty for a recurrent group).
    std::vector<std::vector<int64_t>> slots;
    int64_t num_reserved = 0;
  };

  static constexpr int64_t kLayerGroup = 2;
  using KeyBytes = std::array<uint8_t, 32>;

  int64_t ps() const { return config_.page_size; }
  size_t num_groups() const { return specs_.size(); }
  bool recurrent(size_t g) const { return specs_[g].kind == LayerGroupKind::recurrent; }
  bool sliding(size_t g) const { return specs_[g].kind == LayerGroupKind::sliding_window; }
  // Pages of a sliding-window group wholly before [len - window, len).
  int64_t out_of_window(size_t g, int64_t len) const {
    return sliding(g) ? std::max<int64_t>(0, len - specs_[g].window) / ps() : 0;
  }
  // The fewest pages available (free + evictable) in any page group, and the smallest page pool.
  int64_t min_available() const {
    int64_t n = INT64_MAX;
    for (size_t g = 0; g < num_groups(); ++g) {
      if (recurrent(g)) continue;
      const auto gi = static_cast<int64_t>(g);
      n = std::min(n, manager_->num_free_pages(gi) + manager_->num_evictable_pages(gi));
    }
    return n;
  }
  int64_t min_pool() const {
    int64_t n = INT64_MAX;
    for (size_t g = 0; g < num_groups(); ++g) {
      if (!recurrent(g)) n = std::min(n, specs_[g].num_pages);
    }
    return n;
  }
  // State slots available (free + evictable) in the emptiest recurrent group; INT64_MAX if none.
  int64_t min_state_slots() const {
    int64_t n = INT64_MAX;
    for (size_t g = 0; g < num_groups(); ++g) {
      if (!recurrent(g)) continue;
      const auto gi = static_cast<int64_t>(g);
      n = std::min(n, manager_->num_free_pages(gi) + manager_->num_evictable_pages(gi));
    }
    return n;
  }
  // The caller's part for the recurrent group: run the state copies in order (a reset for
  // kNoStateSlot) before the model next reads or writes their destinations. The configurations
  // have at most one recurrent group; every copy must name it.
  void apply_state_copies() {
    const std::span<const StateCopy> copies = manager_->pending_state_copies();
    for (const StateCopy& c : copies) {
      ASSERT_GE(recurrent_group_, 0) << "state copy without a recurrent group";
      ASSERT_EQ(c.group, recurrent_group_);
      std::vector<uint64_t>& st = states_[static_cast<size_t>(recurrent_group_)];
      ASSERT_GE(c.dst, 0);
      ASSERT_LT(c.dst, static_cast<int64_t>(st.size()));
      ASSERT_NE(c.src, c.dst);
      ASSERT_TRUE(c.src == kNoStateSlot || (c.src >= 0 && c.src < static_cast<int64_t>(st.size())))
          << c.src;
      st[static_cast<size_t>(c.dst)] =
          c.src == kNoStateSlot ? kInitialState : st[static_cast<size_t>(c.src)];
    }
    num_state_copies_ += static_cast<int64_t>(copies.size());
    manager_->clear_pending_state_copies();
  }
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
    // (A recurrent group checkpoints only where a commit ended, so its hits may be shorter.)
    if (!exact || !config_.caching || config_.weak_hash || recurrent_group_ >= 0 ||
        manager_->stats().evictions > 0) {
      return;
    }
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
    const int64_t slots_before = min_state_slots();
    const auto before = observe(-1);
    // The scheduler may hand over the keys a router computed.
    const Result<int64_t> r = uniform(0, 1) == 0
                                  ? manager_->add(id, prompt, kExtras[e])
                                  : manager_->add(id, prompt, keys_of(prompt, e), kExtras[e]);
    if (!r.ok()) {
      // Only when a recurrent group lacks a slot (besides the checkpoint a hit restores).
      ASSERT_TRUE(has_error(r, Code::resource_exhausted, "no state slot"))
          << r.status().to_string();
      ASSERT_LE(slots_before, 1);
      ASSERT_FALSE(manager_->contains(id));
      ASSERT_EQ(observe(-1), before);
      ++num_slot_exhausted_;
      return;
    }
    const int64_t hit = *r;
    ASSERT_EQ(hit, matched);
    check_hit(prompt, e, hit, true);
    Seq& s = seqs_[id];
    s.extras = e;
    s.slots.resize(num_groups());
    s.tokens.assign(prompt.begin(), prompt.begin() + hit);
    s.todo.assign(prompt.begin() + hit, prompt.end());
    // The live state is restored from a checkpoint (or reset); check() compares it with the
    // hash of the hit's tokens.
    apply_state_copies();
    if (hit > 0 && recurrent_group_ >= 0) ++num_state_restores_;
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
    const int64_t len = static_cast<int64_t>(s.tokens.size());
    // The page each group writes into first: a copy-on-write replaces it.
    std::vector<PageId> first_write(num_groups(), kNullPage);
    if (n > 0 && len % ps() != 0) {
      for (size_t g = 0; g < num_groups(); ++g) {
        if (!recurrent(g)) first_write[g] = table_of(id, g)[static_cast<size_t>(len / ps())];
      }
    }
    const auto before = observe(id);
    const int64_t cow_before = manager_->stats().cow_copies;
    const Result<std::span<const int64_t>> r = manager_->reserve(id, n);
    if (!r.ok()) {
      ASSERT_TRUE(has_error(r, Code::resource_exhausted, "BlockManager.reserve"));
      ASSERT_EQ(observe(id), before);
      ++num_exhausted_;
      // The scheduler preempts others for what this sequence's pages would take.
      preempt(std::min(min_pool(), min_available() + uniform(1, 2)));
      return;
    }
    ASSERT_EQ(static_cast<int64_t>(r->size()), recurrent(0) ? 0 : n);
    s.num_reserved = n;
    // The caller's part: run the copies before this step's writes. Each page group whose first
    // written page changed owes exactly one, {old page, new page, group}.
    std::vector<PageCopy> copies(manager_->pending_copies().begin(),
                                 manager_->pending_copies().end());
    ASSERT_EQ(manager_->stats().cow_copies - cow_before, static_cast<int64_t>(copies.size()));
    for (size_t g = 0; g < num_groups(); ++g) {
      if (recurrent(g)) {
        ASSERT_TRUE(value_or_fail(manager_->reserved_slots(static_cast<int64_t>(g))).empty());
        continue;
      }
      const std::span<const PageId> table = table_of(id, g);
      const std::span<const int64_t> slots =
          value_or_fail(manager_->reserved_slots(static_cast<int64_t>(g)));
      ASSERT_EQ(static_cast<int64_t>(slots.size()), n) << "group " << g;
      if (g == 0) {
        ASSERT_TRUE(std::equal(r->begin(), r->end(), slots.begin()));
      }
      s.slots[g].assign(slots.begin(), slots.end());
      for (int64_t i = 0; i < n; ++i) {
        const int64_t pos = len + i;
        ASSERT_NE(table[static_cast<size_t>(pos / ps())], kNullPage) << "group " << g;
        ASSERT_EQ(slots[static_cast<size_t>(i)],
                  table[static_cast<size_t>(pos / ps())] * ps() + pos % ps())
            << "group " << g;
      }
      if (first_write[g] == kNullPage) continue;
      const PageId now = table[static_cast<size_t>(len / ps())];
      if (now == first_write[g]) continue;
      const PageCopy want{first_write[g], now, static_cast<int32_t>(g)};
      const auto it = std::find(copies.begin(), copies.end(), want);
      ASSERT_NE(it, copies.end()) << "group " << g << " page " << want.src << " replaced by "
                                  << want.dst << " without a copy";
      copies.erase(it);
      std::vector<Tokens>& pool = pools_[g];
      pool[static_cast<size_t>(want.dst)] = pool[static_cast<size_t>(want.src)];
    }
    ASSERT_TRUE(copies.empty()) << copies.size() << " copies no group's page table explains";
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
    // The model consumes the tokens (the live state moves) before commit() checkpoints it.
    if (recurrent_group_ >= 0) {
      const StateSlot live = value_or_fail(manager_->state_slot(id, recurrent_group_));
      uint64_t& st = states_[static_cast<size_t>(recurrent_group_)][static_cast<size_t>(live)];
      for (int32_t tok : t) st = step_state(st, tok);
    }
    ASSERT_OK(manager_->commit(id, t));
    apply_state_copies();
    const int64_t old = static_cast<int64_t>(s.tokens.size());
    for (size_t g = 0; g < num_groups(); ++g) {
      if (recurrent(g)) continue;
      for (size_t i = 0; i < t.size(); ++i) {
        const int64_t slot = s.slots[g][i];
        pools_[g][static_cast<size_t>(slot / ps())][static_cast<size_t>(slot % ps())] = t[i];
      }
      s.slots[g].erase(s.slots[g].begin(), s.slots[g].begin() + static_cast<ptrdiff_t>(t.size()));
    }
    s.num_reserved -= static_cast<int64_t>(t.size());
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

  // Any n in [0, len] without groups; a recurrent group cannot roll back, and a sliding-window
  // group keeps only pages it still holds.
  void truncate(SeqId id) {
    Seq& s = seqs_[id];
    const int64_t len = static_cast<int64_t>(s.tokens.size());
    int64_t lowest = recurrent_group_ >= 0 ? len : 0;
    for (size_t g = 0; g < num_groups(); ++g) {
      const int64_t released = out_of_window(g, len);
      if (released > 0) lowest = std::max(lowest, released * ps() + specs_[g].window);
    }
    lowest = std::min(lowest, len);
    const int64_t n = uniform(0, 1) == 0 ? uniform(lowest, len) : uniform(0, len);
    if (n < lowest) {
      const auto before = observe(id);
      ASSERT_TRUE(has_error(manager_->truncate(id, n), Code::invalid_argument,
                            "BlockManager.truncate: n is " + std::to_string(n)))
          << "n " << n << " lowest " << lowest;
      ASSERT_EQ(observe(id), before);
      ++num_truncate_refused_;
      return;
    }
    ASSERT_OK(manager_->truncate(id, n));
    s.tokens.resize(static_cast<size_t>(n));
    for (auto& slots : s.slots) slots.clear();
    s.num_reserved = 0;
    s.todo.clear();  // a rolled back sequence decodes from here
  }

  void fork(SeqId parent) {
    const SeqId child = next_id_++;
    const int64_t slots_before = min_state_slots();
    const auto before = observe(parent);
    const Status st = manager_->fork(parent, child);
    if (!st.ok()) {
      ASSERT_TRUE(has_error(st, Code::resource_exhausted, "no state slot")) << st.to_string();
      ASSERT_EQ(slots_before, 0);
      ASSERT_EQ(observe(parent), before);
      ++num_slot_exhausted_;
      return;
    }
    apply_state_copies();  // the parent's live state to the child's slot
    Seq c = seqs_[parent];
    for (auto& slots : c.slots) slots.clear();
    c.num_reserved = 0;
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

  // Plans to free enough sequences (in a random priority order) for `need` pages in every page
  // group, checks the plan is pure, then carries it out and checks it was the shortest that
  // suffices.
  void preempt(int64_t need) {
    std::vector<SeqId> order;
    for (const auto& [id, s] : seqs_) {
      if (uniform(0, 3) != 0) order.push_back(id);
    }
    std::shuffle(order.begin(), order.end(), rng_);
    const auto before = observe(-1);
    const Result<std::vector<SeqId>> plan = manager_->plan_preemption(need, order);
    ASSERT_EQ(observe(-1), before);
    if (!plan.ok()) {
      ASSERT_TRUE(has_error(plan, Code::resource_exhausted, "BlockManager.plan_preemption"));
      for (SeqId v : order) free(v);
      ASSERT_LT(min_available(), need);
      ++num_preempt_exhausted_;
      return;
    }
    ASSERT_LE(plan->size(), order.size());
    ASSERT_TRUE(std::equal(plan->begin(), plan->end(), order.begin()));
    for (SeqId v : *plan) {
      ASSERT_LT(min_available(), need) << "a shorter plan would do";
      free(v);
    }
    ASSERT_GE(min_available(), need);
    if (!plan->empty()) ++num_preemptions_;
  }

  // Replays the queued events onto the model's view of each group's index, then checks it
  // against the manager: the same number of keys per group, group 0's each cached.
  void drain_events() {
    for (const PageEvent& e : manager_->events()) {
      ASSERT_EQ(e.num_tokens, ps());
      ASSERT_GE(e.layer_group, kLayerGroup);
      ASSERT_LT(e.layer_group, kLayerGroup + static_cast<int64_t>(num_groups()));
      auto& cached = cached_[static_cast<size_t>(e.layer_group - kLayerGroup)];
      if (e.kind == PageEventKind::cached) {
        ASSERT_TRUE(committed_keys_.count({e.key.bytes, e.parent.bytes}))
            << "cached event for a page never committed: " << e.key.hex();
        ASSERT_TRUE(cached.emplace(e.key.bytes, e.parent.bytes).second)
            << "cached twice: " << e.key.hex();
      } else {
        const auto it = cached.find(e.key.bytes);
        ASSERT_NE(it, cached.end()) << "evicted but not cached: " << e.key.hex();
        ASSERT_EQ(it->second, e.parent.bytes);
        cached.erase(it);
        ++num_evicted_events_;
      }
    }
    manager_->clear_events();
    ASSERT_EQ(num_evicted_events_, manager_->stats().evictions);
    for (size_t g = 0; g < num_groups(); ++g) {
      ASSERT_EQ(static_cast<int64_t>(cached_[g].size()),
                manager_->num_cached_pages(static_cast<int64_t>(g)))
          << "group " << g;
    }
    ASSERT_EQ(manager_->num_cached_pages(), manager_->num_cached_pages(0));
    for (const auto& [key, parent] : cached_[0]) {
      PageKey k;
      k.bytes = key;
      ASSERT_TRUE(manager_->is_cached(k)) << k.hex();
    }
  }

  // Refusals on a live sequence change nothing.
  void refuse(SeqId id) {
    Seq& s = seqs_[id];
    const auto before = observe(id);
    const Tokens too_many(static_cast<size_t>(s.num_reserved) + 1, 7);
    ASSERT_TRUE(has_error(manager_->commit(id, too_many), Code::invalid_argument,
                          "expected at most " + std::to_string(s.num_reserved) + " reserved"));
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
    const auto bad_group = static_cast<int64_t>(num_groups());
    ASSERT_TRUE(has_error(manager_->page_table(id, bad_group), Code::invalid_argument, "group"));
    ASSERT_TRUE(has_error(manager_->reserved_slots(-1), Code::invalid_argument, "group"));
    ASSERT_EQ(observe(id), before);
  }

  std::span<const PageId> table_of(SeqId id, size_t g) const {
    return value_or_fail(manager_->page_table(id, static_cast<int64_t>(g)));
  }

  // What a refusal must leave alone, per group.
  struct Observed {
    std::vector<std::vector<PageId>> tables;
    StateSlot live = kNoStateSlot;
    int64_t num_tokens = 0;
    int64_t num_reserved = 0;
    std::vector<int64_t> counts;  // free, cached, evictable, used per group
    BlockManagerStats stats;
    size_t num_events = 0;
    size_t num_copies = 0;
    size_t num_state_copies = 0;
    int64_t num_sequences = 0;
    bool operator==(const Observed&) const = default;
  };
  Observed observe(SeqId id) const {
    Observed o;
    if (id >= 0) {
      for (size_t g = 0; g < num_groups(); ++g) {
        const auto t = table_of(id, g);
        o.tables.emplace_back(t.begin(), t.end());
      }
      if (recurrent_group_ >= 0) o.live = value_or_fail(manager_->state_slot(id, recurrent_group_));
      o.num_tokens = value_or_fail(manager_->num_tokens(id));
      o.num_reserved = value_or_fail(manager_->num_reserved(id));
    }
    for (size_t g = 0; g < num_groups(); ++g) {
      const auto gi = static_cast<int64_t>(g);
      o.counts.push_back(manager_->num_free_pages(gi));
      o.counts.push_back(manager_->num_cached_pages(gi));
      o.counts.push_back(manager_->num_evictable_pages(gi));
      o.counts.push_back(manager_->num_used_pages(gi));
    }
    o.stats = manager_->stats();
    o.num_events = manager_->events().size();
    o.num_copies = manager_->pending_copies().size();
    o.num_state_copies = manager_->pending_state_copies().size();
    o.num_sequences = manager_->num_sequences();
    return o;
  }

  void check() {
    ASSERT_OK(manager_->check_invariants());
    ASSERT_EQ(manager_->num_sequences(), static_cast<int64_t>(seqs_.size()));
    ASSERT_EQ(manager_->num_groups(), static_cast<int64_t>(num_groups()));
    ASSERT_TRUE(manager_->pending_state_copies().empty());
    for (size_t g = 0; g < num_groups(); ++g) {
      const auto gi = static_cast<int64_t>(g);
      ASSERT_EQ(manager_->num_free_pages(gi) + manager_->num_evictable_pages(gi) +
                    manager_->num_used_pages(gi),
                specs_[g].num_pages)
          << "group " << g;
      if (recurrent(g)) {
        // One live slot per sequence; checkpoints are unreferenced.
        ASSERT_EQ(manager_->num_used_pages(gi), static_cast<int64_t>(seqs_.size()));
      }
    }
    std::set<StateSlot> live_slots;
    for (const auto& [id, s] : seqs_) {
      const int64_t len = static_cast<int64_t>(s.tokens.size());
      ASSERT_EQ(value_or_fail(manager_->num_tokens(id)), len) << "sequence " << id;
      ASSERT_EQ(value_or_fail(manager_->num_reserved(id)), s.num_reserved);
      const int64_t end = len + s.num_reserved;
      for (size_t g = 0; g < num_groups(); ++g) {
        const auto table = table_of(id, g);
        if (recurrent(g)) {
          ASSERT_TRUE(table.empty());
          const StateSlot live = value_or_fail(manager_->state_slot(id, static_cast<int64_t>(g)));
          ASSERT_TRUE(live_slots.insert(live).second) << "live slot " << live << " shared";
          ASSERT_EQ(states_[g][static_cast<size_t>(live)], recompute(s.tokens))
              << "sequence " << id << " live state (slot " << live << ") after " << len
              << " tokens";
          continue;
        }
        ASSERT_EQ(static_cast<int64_t>(table.size()), (end + ps() - 1) / ps()) << "group " << g;
        const int64_t released = out_of_window(g, len);
        for (int64_t j = 0; j < static_cast<int64_t>(table.size()); ++j) {
          ASSERT_EQ(table[static_cast<size_t>(j)] == kNullPage, j < released)
              << "sequence " << id << " group " << g << " page " << j << " of " << len << " tokens";
        }
        for (int64_t i = released * ps(); i < len; ++i) {
          const PageId page = table[static_cast<size_t>(i / ps())];
          ASSERT_EQ(pools_[g][static_cast<size_t>(page)][static_cast<size_t>(i % ps())],
                    s.tokens[static_cast<size_t>(i)])
              << "sequence " << id << " group " << g << " token " << i << " (page " << page << ")";
        }
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
  int64_t num_slot_exhausted_ = 0;  // add / fork refused for want of a state slot
  int64_t num_truncate_refused_ = 0;
  int64_t num_state_copies_ = 0;
  int64_t num_state_restores_ = 0;  // hits with a recurrent group (a checkpoint restored)
  const BlockManager& manager() const { return *manager_; }

 private:
  Config config_;
  std::mt19937 rng_;
  std::unique_ptr<BlockManager> manager_;
  std::vector<LayerGroupSpec> specs_;          // the groups (one full group without groups)
  std::vector<std::vector<Tokens>> pools_;     // per page group, token id per slot
  std::vector<std::vector<uint64_t>> states_;  // per recurrent group, toy state per slot
  int64_t recurrent_group_ = -1;
  std::map<SeqId, Seq> seqs_;
  std::set<std::pair<int, Tokens>> committed_;  // (extras, tokens [0, b)) for each full page b
  std::vector<Tokens> system_prompts_;
  SeqId next_id_ = 0;
  KeyFingerprint fingerprint_;
  KeyHashFn hash_;
  std::set<std::pair<KeyBytes, KeyBytes>> committed_keys_;  // (key, parent) of committed pages
  std::vector<std::map<KeyBytes, KeyBytes>> cached_;  // per group, replayed events: key -> parent
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
  int64_t slot_exhausted = 0;
  int64_t truncate_refused = 0;
  int64_t state_copies = 0;
  int64_t state_restores = 0;
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
    t.slot_exhausted += model.num_slot_exhausted_;
    t.truncate_refused += model.num_truncate_refused_;
    t.state_copies += model.num_state_copies_;
    t.state_restores += model.num_state_restores_;
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

std::string describe(const std::vector<LayerGroupSpec>& groups) {
  std::string d;
  for (const LayerGroupSpec& g : groups) {
    d += std::string(" ") + name(g.kind) + "(" + std::to_string(g.num_pages) +
         (g.kind == LayerGroupKind::sliding_window ? ", window " + std::to_string(g.window) : "") +
         ")";
  }
  return d;
}

TEST(BlockManagerModel, HybridGroupsMatchTheModel) {
  using K = LayerGroupKind;
  const Config configs[] = {
      // Small pools: exhaustion, evictions, state slots running out.
      {0, 4, true, false, {{K::full, 14, 0}, {K::sliding_window, 10, 8}, {K::recurrent, 12, 0}}},
      {0, 2, true, false, {{K::full, 12, 0}, {K::sliding_window, 8, 6}, {K::recurrent, 4, 0}}},
      {0, 3, true, true, {{K::sliding_window, 8, 7}, {K::full, 12, 0}, {K::recurrent, 10, 0}}},
      {0, 2, true, true, {{K::recurrent, 4, 0}, {K::full, 10, 0}, {K::sliding_window, 10, 4}}},
      {0, 2, false, false, {{K::full, 10, 0}, {K::sliding_window, 8, 5}, {K::recurrent, 4, 0}}},
      // Roomy, no recurrent group: nothing evicted, so every hit must be the longest.
      {0, 4, true, false, {{K::full, 512, 0}, {K::sliding_window, 512, 10}}},
  };
  for (const Config& c : configs) {
    SCOPED_TRACE("page_size " + std::to_string(c.page_size) +
                 (c.caching ? " caching" : " no caching") + (c.weak_hash ? " weak hash" : "") +
                 describe(c.groups));
    const Totals t = run(c, 6, 500);
    if (HasFatalFailure()) return;
    bool has_recurrent = false;
    bool few_slots = false;  // fewer state slots than the driver's 12 sequences
    for (const LayerGroupSpec& g : c.groups) {
      has_recurrent |= g.kind == LayerGroupKind::recurrent;
      few_slots |= g.kind == LayerGroupKind::recurrent && g.num_pages <= 6;
    }
    EXPECT_GT(t.copies, 0);
    EXPECT_GT(t.truncate_refused, 0);
    // (With few state slots, live ones crowd the checkpoints out: hits are rare there.)
    if (c.caching && !few_slots) {
      EXPECT_GT(t.hits, 0);
    }
    if (has_recurrent) {
      if (few_slots) {
        EXPECT_GT(t.slot_exhausted, 0);
      }
      EXPECT_GT(t.state_copies, 0);
      if (c.caching && !few_slots) {
        EXPECT_GT(t.state_restores, 0);
      }
    }
    if (c.groups[0].num_pages > 100) {
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
