// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// libFuzzer target: the input bytes are a small program for a BlockManager. The first bytes pick
// the options (a tiny pool, page size 1..8, prefix caching on or off, sometimes a weak hash that
// makes key collisions common, and about half the time a hybrid list of 1..3 layer groups: full,
// sliding_window with a window of 1..3 pages, or at most one recurrent group with a few state
// slots); the rest is a sequence of operations on a handful of sequence ids with prompts built
// from a few shared prefixes over a 4-token alphabet, so pages repeat and prefix hits, duplicates,
// copy-on-write and exhaustion are all reached. Besides the sequence ops: match_prefix,
// add/match_prefix with the prompt's keys given (right, wrong or miscounted), plan_preemption
// (checked against a count from the page tables, sometimes carried out), page events (replayed
// into the set of cached keys per group) and can_admit. Bad inputs (unknown ids, over-commit, bad
// spans, negative counts, repeated victims, truncates a window or a state cannot undo, bad groups)
// are sent on purpose.
//
// A shadow model keeps each sequence's tokens and reserved slots, a token id per pool slot per
// page group (commit writes the slots, pending copies run in order in their own group's pool) and
// a toy state per slot per recurrent group (a running hash: commit steps the live slot before its
// checkpoint copies run; a state copy from kNoStateSlot resets). After every operation: the
// manager's own invariants hold, its counts agree per group, every live sequence's pages hold
// exactly its tokens (sliding-window tables kNullPage exactly for pages wholly out of the window),
// its live state is the hash of its tokens, no reserved slot overwrites a token another sequence
// reads, and every prefix hit is a run that was committed under the same key extras. A refusal
// must change nothing in any group. Any violation prints what went wrong and traps, so libFuzzer
// saves the input.

#include <algorithm>
#include <array>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <set>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "kvcache/block_manager.h"
#include "kvcache/page_key.h"
#include "kvcache/status.h"

#include <fuzzer/FuzzedDataProvider.h>

namespace kvcache {
namespace {

using Tokens = std::vector<int32_t>;

constexpr int kMaxOps = 200;
constexpr int kNumIds = 8;        // sequence ids 0..7; others are always unknown
constexpr int32_t kAlphabet = 4;  // token ids 0..3, so unrelated prompts share pages
constexpr int64_t kMaxPrompt = 64;

// A toy recurrent model: a state is a running hash of the tokens it consumed.
constexpr uint64_t kInitialState = 0x9e3779b97f4a7c15ULL;
uint64_t step_state(uint64_t state, int32_t token) {
  return (state ^ static_cast<uint64_t>(token)) * 0x100000001b3ULL + 7;
}
uint64_t recompute(const std::vector<int32_t>& tokens) {
  uint64_t s = kInitialState;
  for (int32_t t : tokens) s = step_state(s, t);
  return s;
}

[[noreturn]] __attribute__((format(printf, 1, 2))) void fail(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  std::vfprintf(stderr, fmt, args);
  std::fprintf(stderr, "\n");
  va_end(args);
  __builtin_trap();
}

// Prints where and what, then traps so libFuzzer keeps the input.
#define FUZZ_CHECK(cond, ...)                                                             \
  do {                                                                                    \
    if (!(cond)) {                                                                        \
      std::fprintf(stderr, "block_manager_fuzz: %s:%d: %s\n", __FILE__, __LINE__, #cond); \
      fail(__VA_ARGS__);                                                                  \
    }                                                                                     \
  } while (0)

// Valid key extras: salt x adapter x image, every image at position 0 so requests of different
// extras never share a key and the model can name a run by its extras index.
constexpr const char* kSalts[] = {"", "tenant-a", "tenant-b"};
constexpr const char* kAdapters[] = {"", "lora-1"};
const MultimodalSpan kImageA[] = {{"image-a", 0, 2}};
const MultimodalSpan kImageB[] = {{"image-b", 0, 2}};
constexpr int kNumValidExtras = 3 * 2 * 3;
// Bad spans: empty, negative begin, unsorted.
const MultimodalSpan kEmptySpan[] = {{"x", 2, 2}};
const MultimodalSpan kNegativeSpan[] = {{"x", -1, 1}};
const MultimodalSpan kUnsortedSpans[] = {{"x", 3, 4}, {"y", 0, 1}};
constexpr int kNumExtras = kNumValidExtras + 3;

KeyExtras extras_of(int e) {
  if (e >= kNumValidExtras) {
    const int bad = e - kNumValidExtras;
    if (bad == 0) return {"", "", kEmptySpan};
    if (bad == 1) return {"", "", kNegativeSpan};
    return {"", "", kUnsortedSpans};
  }
  KeyExtras x;
  x.salt = kSalts[e / 6];
  x.adapter = kAdapters[(e / 3) % 2];
  const int image = e % 3;
  if (image == 1) x.multimodal = kImageA;
  if (image == 2) x.multimodal = kImageB;
  return x;
}

PageKey weak_key(uint64_t v) {
  PageKey k;
  std::memcpy(k.bytes.data(), &v, sizeof(v));
  return k;
}

// What a refusal must leave alone, per group.
struct Observed {
  std::vector<std::vector<PageId>> tables;  // per group
  std::vector<StateSlot> live;              // per group (kNoStateSlot for a page group)
  int64_t num_tokens = -1;
  int64_t num_reserved = -1;
  bool contains = false;
  int64_t num_sequences = 0;
  std::vector<int64_t> counts;  // free, cached, evictable, used per group
  size_t num_copies = 0;
  size_t num_state_copies = 0;
  size_t num_events = 0;
  BlockManagerStats stats;
  bool operator==(const Observed&) const = default;
};

class Fuzzer {
 public:
  explicit Fuzzer(FuzzedDataProvider* in) : in_(*in) {}

  void run() {
    if (!configure()) return;
    for (int op = 0; op < kMaxOps && in_.remaining_bytes() > 0; ++op) {
      step();
      apply_state_copies();
      check();
    }
  }

 private:
  struct Seq {
    int extras = 0;
    Tokens tokens;                            // committed
    Tokens todo;                              // prompt tokens not yet committed
    std::vector<std::vector<int64_t>> slots;  // per group, reserved, not committed
    int64_t reserved = 0;
  };

  bool configure() {
    BlockManagerOptions o;
    o.num_pages = in_.ConsumeIntegralInRange<int64_t>(1, 64);
    o.page_size = in_.ConsumeIntegralInRange<int64_t>(1, 8);
    o.enable_prefix_caching = in_.ConsumeIntegralInRange<int>(0, 3) != 0;
    o.record_events = in_.ConsumeBool();
    // About half the inputs: 1..3 layer groups, at least one with pages, at most one recurrent.
    const int hybrid = in_.ConsumeIntegralInRange<int>(0, 5);
    const int num_groups = hybrid < 3 ? 0 : hybrid - 2;
    bool have_recurrent = false;
    bool have_pages = false;
    for (int g = 0; g < num_groups; ++g) {
      auto kind = static_cast<LayerGroupKind>(in_.ConsumeIntegralInRange<int>(0, 2));
      if (kind == LayerGroupKind::recurrent &&
          (have_recurrent || (g + 1 == num_groups && !have_pages))) {
        kind = LayerGroupKind::full;
      }
      LayerGroupSpec spec;
      spec.kind = kind;
      if (kind == LayerGroupKind::recurrent) {
        have_recurrent = true;
        spec.num_pages = in_.ConsumeIntegralInRange<int64_t>(1, 6);
      } else {
        have_pages = true;
        spec.num_pages = in_.ConsumeIntegralInRange<int64_t>(1, 24);
      }
      if (kind == LayerGroupKind::sliding_window) {
        spec.window = in_.ConsumeIntegralInRange<int64_t>(1, 3 * o.page_size);
      }
      o.groups.push_back(spec);
    }
    specs_ = o.groups;
    if (specs_.empty()) specs_.push_back({LayerGroupKind::full, o.num_pages, 0});
    min_pool_ = INT64_MAX;
    max_pool_ = 0;
    for (const LayerGroupSpec& g : specs_) {
      if (g.kind == LayerGroupKind::recurrent) continue;
      min_pool_ = std::min(min_pool_, g.num_pages);
      max_pool_ = std::max(max_pool_, g.num_pages);
    }
    o.watermark_pages = in_.ConsumeIntegralInRange<int64_t>(0, min_pool_);
    o.max_pages_per_seq_hint = in_.ConsumeIntegralInRange<int64_t>(0, 4);
    o.fingerprint = KeyFingerprint{"fuzz-model", "f16", o.page_size, 0};
    const int hash = in_.ConsumeIntegralInRange<int>(0, 4);
    o.hash_kind = hash == 1 ? HashKind::xxh3_128 : HashKind::sha256;
    weak_hash_ = hash >= 2;
    if (hash == 2) {
      // Order-blind: pages holding the same tokens in any order collide.
      o.hash_override = [](std::span<const uint8_t> msg) {
        uint64_t sum = 0;
        for (uint8_t b : msg) sum += b;
        return weak_key(sum);
      };
    } else if (hash == 3) {
      o.hash_override = [](std::span<const uint8_t>) { return weak_key(0); };  // all collide
    } else if (hash == 4) {
      o.hash_override = [](std::span<const uint8_t> msg) { return weak_key(msg.size() % 3); };
    }
    hash_ = o.hash_override ? o.hash_override : key_hash_fn(o.hash_kind);
    Result<std::unique_ptr<BlockManager>> m = BlockManager::create(o);
    FUZZ_CHECK(m.ok(), "create refused valid options: %s", m.status().to_string().c_str());
    manager_ = std::move(*m);
    options_ = o;
    ps_ = o.page_size;
    pools_.assign(specs_.size(), {});
    states_.assign(specs_.size(), {});
    cached_keys_.assign(specs_.size(), {});
    for (size_t g = 0; g < specs_.size(); ++g) {
      const auto n = static_cast<size_t>(specs_[g].num_pages);
      if (recurrent(g)) {
        // Stale states, so a missing reset or copy shows.
        for (size_t i = 0; i < n; ++i) states_[g].push_back(0xdeadbeef00000000ULL + i);
      } else {
        pools_[g].assign(n, Tokens(static_cast<size_t>(ps_), -1));
      }
    }
    for (auto& p : prefixes_) p = random_tokens(in_.ConsumeIntegralInRange<int64_t>(0, 3 * ps_));
    return true;
  }

  size_t num_groups() const { return specs_.size(); }
  bool recurrent(size_t g) const { return specs_[g].kind == LayerGroupKind::recurrent; }
  bool has_recurrent() const {
    for (size_t g = 0; g < num_groups(); ++g) {
      if (recurrent(g)) return true;
    }
    return false;
  }
  // Pages of a sliding-window group wholly before [len - window, len).
  int64_t out_of_window(size_t g, int64_t len) const {
    if (specs_[g].kind != LayerGroupKind::sliding_window) return 0;
    return std::max<int64_t>(0, len - specs_[g].window) / ps_;
  }
  int64_t available(size_t g) const {
    const auto gi = static_cast<int64_t>(g);
    return manager_->num_free_pages(gi) + manager_->num_evictable_pages(gi);
  }
  // The fewest pages available (free + evictable) in any page group.
  int64_t min_available() const {
    int64_t n = INT64_MAX;
    for (size_t g = 0; g < num_groups(); ++g) {
      if (!recurrent(g)) n = std::min(n, available(g));
    }
    return n;
  }
  // State slots available in the emptiest recurrent group; INT64_MAX without one.
  int64_t min_state_slots() const {
    int64_t n = INT64_MAX;
    for (size_t g = 0; g < num_groups(); ++g) {
      if (recurrent(g)) n = std::min(n, available(g));
    }
    return n;
  }
  std::span<const PageId> table_of(SeqId id, size_t g) const {
    const auto t = manager_->page_table(id, static_cast<int64_t>(g));
    FUZZ_CHECK(t.ok(), "page_table(%lld, %zu): %s", static_cast<long long>(id), g,
               t.status().to_string().c_str());
    return *t;
  }
  StateSlot live_slot(SeqId id, size_t g) const {
    const auto s = manager_->state_slot(id, static_cast<int64_t>(g));
    FUZZ_CHECK(s.ok(), "state_slot(%lld, %zu): %s", static_cast<long long>(id), g,
               s.status().to_string().c_str());
    FUZZ_CHECK(*s >= 0 && *s < specs_[g].num_pages, "live slot %d of group %zu", *s, g);
    return *s;
  }

  // The caller's part for recurrent groups: run the state copies in order (a reset for
  // kNoStateSlot), each in its own group.
  void apply_state_copies() {
    for (const StateCopy& c : manager_->pending_state_copies()) {
      FUZZ_CHECK(c.group >= 0 && static_cast<size_t>(c.group) < num_groups() &&
                     recurrent(static_cast<size_t>(c.group)),
                 "state copy in group %d", c.group);
      std::vector<uint64_t>& st = states_[static_cast<size_t>(c.group)];
      const auto n = static_cast<StateSlot>(st.size());
      FUZZ_CHECK(c.dst >= 0 && c.dst < n && c.src != c.dst &&
                     (c.src == kNoStateSlot || (c.src >= 0 && c.src < n)),
                 "bad state copy %d -> %d in group %d", c.src, c.dst, c.group);
      st[static_cast<size_t>(c.dst)] =
          c.src == kNoStateSlot ? kInitialState : st[static_cast<size_t>(c.src)];
    }
    manager_->clear_pending_state_copies();
  }

  Tokens random_tokens(int64_t n) {
    Tokens t;
    for (int64_t i = 0; i < n; ++i)
      t.push_back(in_.ConsumeIntegralInRange<int32_t>(0, kAlphabet - 1));
    return t;
  }
  Tokens random_prompt() {
    Tokens p = prefixes_[in_.ConsumeIntegralInRange<size_t>(0, prefixes_.size() - 1)];
    const Tokens tail = random_tokens(in_.ConsumeIntegralInRange<int64_t>(0, 2 * ps_ + 1));
    p.insert(p.end(), tail.begin(), tail.end());
    if (static_cast<int64_t>(p.size()) > kMaxPrompt) p.resize(kMaxPrompt);
    return p;
  }
  SeqId random_id() { return in_.ConsumeIntegralInRange<SeqId>(0, kNumIds); }  // kNumIds: unknown
  int random_extras() { return in_.ConsumeIntegralInRange<int>(0, kNumExtras - 1); }
  Seq* find(SeqId id) {
    auto it = seqs_.find(id);
    return it == seqs_.end() ? nullptr : &it->second;
  }

  // How a prompt's keys reach add() / match_prefix(): not at all (the manager hashes), right, of
  // another extras (only misses may follow), or one too many (refused).
  enum class KeyMode { none, right, wrong, bad_count };
  KeyMode random_key_mode(int e) {
    if (e >= kNumValidExtras) return KeyMode::none;
    return static_cast<KeyMode>(in_.ConsumeIntegralInRange<int>(0, 3));
  }
  std::vector<PageKey> keys_for(const Tokens& prompt, int e, KeyMode mode) {
    std::vector<PageKey> keys;
    if (mode == KeyMode::none) return keys;
    const int ke = mode == KeyMode::wrong ? (e + 1) % kNumValidExtras : e;
    const Status st = page_keys(hash_, options_.fingerprint, prompt, extras_of(ke), &keys);
    FUZZ_CHECK(st.ok(), "page_keys: %s", st.to_string().c_str());
    if (mode == KeyMode::bad_count) keys.push_back(PageKey{});
    return keys;
  }
  Result<int64_t> call_add(SeqId id, const Tokens& prompt, int e, KeyMode mode,
                           const std::vector<PageKey>& keys) {
    if (mode == KeyMode::none) return manager_->add(id, prompt, extras_of(e));
    return manager_->add(id, prompt, keys, extras_of(e));
  }
  Result<int64_t> call_match(const Tokens& prompt, int e, KeyMode mode,
                             const std::vector<PageKey>& keys) const {
    if (mode == KeyMode::none) return manager_->match_prefix(prompt, extras_of(e));
    return manager_->match_prefix(prompt, keys, extras_of(e));
  }

  Observed observe(SeqId id) const {
    Observed o;
    o.contains = manager_->contains(id);
    if (o.contains) {
      for (size_t g = 0; g < num_groups(); ++g) {
        const auto t = table_of(id, g);
        o.tables.emplace_back(t.begin(), t.end());
        o.live.push_back(recurrent(g) ? live_slot(id, g) : kNoStateSlot);
      }
      o.num_tokens = *manager_->num_tokens(id);
      o.num_reserved = *manager_->num_reserved(id);
    }
    o.num_sequences = manager_->num_sequences();
    for (size_t g = 0; g < num_groups(); ++g) {
      const auto gi = static_cast<int64_t>(g);
      o.counts.push_back(manager_->num_free_pages(gi));
      o.counts.push_back(manager_->num_cached_pages(gi));
      o.counts.push_back(manager_->num_evictable_pages(gi));
      o.counts.push_back(manager_->num_used_pages(gi));
    }
    o.num_copies = manager_->pending_copies().size();
    o.num_state_copies = manager_->pending_state_copies().size();
    o.num_events = manager_->events().size();
    o.stats = manager_->stats();
    return o;
  }

  // A refused call: the right code, and nothing changed for `id` or any group's pool.
  void refused(const Status& st, Code code, const Observed& before, SeqId id, const char* op) {
    FUZZ_CHECK(!st.ok(), "%s succeeded, expected a refusal", op);
    FUZZ_CHECK(st.code() == code, "%s refused with %s, expected code %d", op,
               st.to_string().c_str(), static_cast<int>(code));
    FUZZ_CHECK(observe(id) == before, "%s refused (%s) but changed the manager", op,
               st.to_string().c_str());
  }

  void step() {
    switch (in_.ConsumeIntegralInRange<int>(0, 11)) {
      case 0:
      case 1:
        add();
        break;
      case 2:
      case 3:
        reserve();
        break;
      case 4:
        commit();
        break;
      case 5:
        truncate();
        break;
      case 6:
        fork();
        break;
      case 7:
        free();
        break;
      case 8:
        match();
        break;
      case 9:
        plan_preemption();
        break;
      case 10:
        manager_->clear_events();
        num_events_seen_ = 0;
        break;
      default:
        queries();
        break;
    }
  }

  void add() {
    const SeqId id = random_id();
    const int e = random_extras();
    const Tokens prompt = random_prompt();
    const KeyMode mode = random_key_mode(e);
    const std::vector<PageKey> keys = keys_for(prompt, e, mode);
    const Observed before = observe(id);
    const int64_t slots_before = min_state_slots();
    const Result<int64_t> matched = call_match(prompt, e, mode, keys);
    FUZZ_CHECK(observe(id) == before, "match_prefix changed the manager");
    const Result<int64_t> hit = call_add(id, prompt, e, mode, keys);
    if (mode == KeyMode::bad_count) {
      FUZZ_CHECK(!matched.ok() && matched.status().code() == Code::invalid_argument,
                 "match_prefix took %zu keys for %zu tokens", keys.size(), prompt.size());
      refused(hit.status(), Code::invalid_argument, before, id, "add (key count)");
      return;
    }
    if (e >= kNumValidExtras) {
      FUZZ_CHECK(!matched.ok() && matched.status().code() == Code::invalid_argument,
                 "match_prefix took bad spans");
      refused(hit.status(), Code::invalid_argument, before, id, "add (bad spans)");
      return;
    }
    FUZZ_CHECK(matched.ok(), "match_prefix: %s", matched.status().to_string().c_str());
    if (find(id) != nullptr) {
      refused(hit.status(), Code::invalid_argument, before, id, "add (existing id)");
      return;
    }
    if (!hit.ok()) {
      // Only for want of a state slot (besides the checkpoint a hit restores).
      FUZZ_CHECK(slots_before <= 1, "add refused (%s) with %lld state slots available",
                 hit.status().to_string().c_str(), static_cast<long long>(slots_before));
      return refused(hit.status(), Code::resource_exhausted, before, id, "add (state slot)");
    }
    FUZZ_CHECK(slots_before >= 1, "add took a state slot with none available");
    FUZZ_CHECK(*hit == *matched, "add hit %lld tokens, match_prefix said %lld",
               static_cast<long long>(*hit), static_cast<long long>(*matched));
    check_hit(prompt, e, *hit, mode != KeyMode::wrong);
    // (A recurrent group 0 caches checkpoints only where a commit ended.)
    for (int64_t j = 0; j < *hit / ps_ && mode == KeyMode::right && !recurrent(0); ++j) {
      FUZZ_CHECK(manager_->is_cached(keys[static_cast<size_t>(j)]), "hit page %lld not cached",
                 static_cast<long long>(j));
    }
    Seq& s = seqs_[id];
    s.extras = e;
    s.tokens.assign(prompt.begin(), prompt.begin() + *hit);
    s.todo.assign(prompt.begin() + *hit, prompt.end());
    s.slots.assign(num_groups(), {});
    s.reserved = 0;
  }

  // A hit is whole pages, leaves the last prompt token, and is a run committed under the same
  // extras; with strong keys and nothing evicted it is the longest such run.
  void check_hit(const Tokens& prompt, int e, int64_t hit, bool exact) {
    const int64_t n = static_cast<int64_t>(prompt.size());
    const int64_t cap = n == 0 ? 0 : (n - 1) / ps_ * ps_;
    FUZZ_CHECK(hit >= 0 && hit % ps_ == 0 && hit <= cap, "hit %lld of a %lld-token prompt",
               static_cast<long long>(hit), static_cast<long long>(n));
    FUZZ_CHECK(options_.enable_prefix_caching || hit == 0, "hit with prefix caching off");
    FUZZ_CHECK(hit == 0 || committed_.count({e, Tokens(prompt.begin(), prompt.begin() + hit)}),
               "hit of %lld tokens was never committed under extras %d",
               static_cast<long long>(hit), e);
    // (A recurrent group checkpoints only where a commit ended, so its hits may be shorter.)
    if (!exact || !options_.enable_prefix_caching || weak_hash_ || has_recurrent() ||
        manager_->stats().evictions > 0) {
      return;
    }
    int64_t best = 0;
    for (int64_t k = ps_; k <= cap; k += ps_) {
      if (!committed_.count({e, Tokens(prompt.begin(), prompt.begin() + k)})) break;
      best = k;
    }
    FUZZ_CHECK(hit == best, "hit %lld tokens, expected the longest committed run %lld",
               static_cast<long long>(hit), static_cast<long long>(best));
  }

  void reserve() {
    const SeqId id = random_id();
    Seq* s = find(id);
    int64_t n = in_.ConsumeIntegralInRange<int64_t>(-1, 2 * ps_ + 2);
    if (s != nullptr && !s->todo.empty() && in_.ConsumeBool()) {
      n = std::min<int64_t>(n, static_cast<int64_t>(s->todo.size()));  // prefill
    }
    const Observed before = observe(id);
    const int64_t copies_before = manager_->stats().cow_copies;
    const Result<std::span<const int64_t>> r = manager_->reserve(id, n);
    if (s == nullptr) return refused(r.status(), Code::not_found, before, id, "reserve (unknown)");
    if (n < 0) return refused(r.status(), Code::invalid_argument, before, id, "reserve (n < 0)");
    if (!r.ok()) {
      // Only when, in some page group, even the most the call could need (a copy-on-write page
      // included) is more than the free and evictable pages plus those the new reservation
      // gives back.
      const int64_t len = static_cast<int64_t>(s->tokens.size());
      bool short_somewhere = false;
      for (size_t g = 0; g < num_groups(); ++g) {
        if (recurrent(g)) continue;
        const int64_t have = static_cast<int64_t>(before.tables[g].size());
        const int64_t need = (len + n + ps_ - 1) / ps_;
        const int64_t most = std::max<int64_t>(0, need - have) + (n > 0 && len % ps_ != 0 ? 1 : 0);
        const int64_t avail =
            before.counts[g * 4] + before.counts[g * 4 + 2] + std::max<int64_t>(0, have - need);
        short_somewhere = short_somewhere || most > avail;
      }
      FUZZ_CHECK(short_somewhere, "reserve(%lld) refused (%s) with pages available in every group",
                 static_cast<long long>(n), r.status().to_string().c_str());
      return refused(r.status(), Code::resource_exhausted, before, id, "reserve");
    }
    FUZZ_CHECK(static_cast<int64_t>(r->size()) == (recurrent(0) ? 0 : n),
               "reserve(%lld) gave %zu slots", static_cast<long long>(n), r->size());
    const std::vector<int64_t> group0(r->begin(), r->end());
    const int64_t len = static_cast<int64_t>(s->tokens.size());
    s->reserved = n;
    for (size_t g = 0; g < num_groups(); ++g) {
      const auto slots = manager_->reserved_slots(static_cast<int64_t>(g));
      FUZZ_CHECK(slots.ok(), "reserved_slots(%zu): %s", g, slots.status().to_string().c_str());
      if (recurrent(g)) {
        FUZZ_CHECK(slots->empty(), "recurrent group %zu reserved %zu slots", g, slots->size());
        continue;
      }
      FUZZ_CHECK(static_cast<int64_t>(slots->size()) == n, "group %zu reserved %zu slots", g,
                 slots->size());
      FUZZ_CHECK(g != 0 || std::equal(group0.begin(), group0.end(), slots->begin()),
                 "reserve() and reserved_slots(0) differ");
      const std::span<const PageId> table = table_of(id, g);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t pos = len + i;
        const PageId page = table[static_cast<size_t>(pos / ps_)];
        FUZZ_CHECK(page != kNullPage, "group %zu reserved into a null page", g);
        const int64_t want = page * ps_ + pos % ps_;
        FUZZ_CHECK((*slots)[static_cast<size_t>(i)] == want,
                   "sequence %lld group %zu reserved slot %lld is %lld, page table says %lld",
                   static_cast<long long>(id), g, static_cast<long long>(i),
                   static_cast<long long>((*slots)[static_cast<size_t>(i)]),
                   static_cast<long long>(want));
      }
      s->slots[g].assign(slots->begin(), slots->end());
    }
    // The caller's part: run the copies in order, each in its group's pool, before this step's
    // writes.
    const std::span<const PageCopy> copies = manager_->pending_copies();
    FUZZ_CHECK(manager_->stats().cow_copies - copies_before == static_cast<int64_t>(copies.size()),
               "cow_copies counted %lld, %zu pending",
               static_cast<long long>(manager_->stats().cow_copies - copies_before), copies.size());
    for (const PageCopy& c : copies) {
      FUZZ_CHECK(c.group >= 0 && static_cast<size_t>(c.group) < num_groups() &&
                     !recurrent(static_cast<size_t>(c.group)),
                 "page copy in group %d", c.group);
      std::vector<Tokens>& pool = pools_[static_cast<size_t>(c.group)];
      const auto np = static_cast<PageId>(pool.size());
      FUZZ_CHECK(c.src >= 0 && c.src < np && c.dst >= 0 && c.dst < np && c.src != c.dst,
                 "bad copy %d -> %d in group %d", c.src, c.dst, c.group);
      pool[static_cast<size_t>(c.dst)] = pool[static_cast<size_t>(c.src)];
    }
    manager_->clear_pending_copies();
  }

  void commit() {
    const SeqId id = random_id();
    Seq* s = find(id);
    const int64_t reserved = s == nullptr ? 0 : s->reserved;
    // Mostly all or some of the reservation, sometimes one too many.
    int64_t k = in_.ConsumeIntegralInRange<int64_t>(0, reserved + 1);
    if (in_.ConsumeIntegralInRange<int>(0, 3) != 0) k = std::min(k, reserved);
    Tokens t;
    if (s != nullptr && !s->todo.empty()) {
      t.assign(s->todo.begin(), s->todo.begin() + std::min<int64_t>(k, s->todo.size()));
    }
    const Tokens extra = random_tokens(k - static_cast<int64_t>(t.size()));
    t.insert(t.end(), extra.begin(), extra.end());
    const Observed before = observe(id);
    const Status st = manager_->commit(id, t);
    if (s == nullptr) return refused(st, Code::not_found, before, id, "commit (unknown)");
    if (k > reserved) return refused(st, Code::invalid_argument, before, id, "commit (too many)");
    FUZZ_CHECK(st.ok(), "commit: %s", st.to_string().c_str());
    // The model consumed the tokens (the live state moved) before commit's checkpoint copies run.
    for (size_t g = 0; g < num_groups(); ++g) {
      if (!recurrent(g)) continue;
      uint64_t& state = states_[g][static_cast<size_t>(before.live[g])];
      for (int32_t tok : t) state = step_state(state, tok);
    }
    apply_state_copies();
    const int64_t old = static_cast<int64_t>(s->tokens.size());
    for (size_t g = 0; g < num_groups(); ++g) {
      if (recurrent(g)) continue;
      std::vector<int64_t>& slots = s->slots[g];
      for (size_t i = 0; i < t.size(); ++i) {
        const int64_t slot = slots[i];
        pools_[g][static_cast<size_t>(slot / ps_)][static_cast<size_t>(slot % ps_)] = t[i];
      }
      slots.erase(slots.begin(), slots.begin() + static_cast<ptrdiff_t>(t.size()));
    }
    s->reserved -= static_cast<int64_t>(t.size());
    s->todo.erase(s->todo.begin(),
                  s->todo.begin() + std::min<ptrdiff_t>(static_cast<ptrdiff_t>(t.size()),
                                                        static_cast<ptrdiff_t>(s->todo.size())));
    s->tokens.insert(s->tokens.end(), t.begin(), t.end());
    const int64_t len = static_cast<int64_t>(s->tokens.size());
    for (int64_t b = (old / ps_ + 1) * ps_; b <= len; b += ps_) {
      committed_.insert({s->extras, Tokens(s->tokens.begin(), s->tokens.begin() + b)});
    }
  }

  void truncate() {
    const SeqId id = random_id();
    Seq* s = find(id);
    const int64_t len = s == nullptr ? 0 : static_cast<int64_t>(s->tokens.size());
    const int64_t n = in_.ConsumeIntegralInRange<int64_t>(-1, len + 1);
    const Observed before = observe(id);
    const Status st = manager_->truncate(id, n);
    if (s == nullptr) return refused(st, Code::not_found, before, id, "truncate (unknown)");
    if (n < 0 || n > len) return refused(st, Code::invalid_argument, before, id, "truncate (n)");
    // A recurrent state cannot roll back; a sliding window must still hold the window ending at n.
    int64_t lowest = has_recurrent() ? len : 0;
    for (size_t g = 0; g < num_groups(); ++g) {
      const int64_t released = out_of_window(g, len);
      if (released > 0) lowest = std::max(lowest, released * ps_ + specs_[g].window);
    }
    lowest = std::min(lowest, len);
    if (n < lowest) {
      return refused(st, Code::invalid_argument, before, id, "truncate (window or state)");
    }
    FUZZ_CHECK(st.ok(), "truncate: %s", st.to_string().c_str());
    s->tokens.resize(static_cast<size_t>(n));
    for (auto& slots : s->slots) slots.clear();
    s->reserved = 0;
    s->todo.clear();  // a rolled back sequence decodes from here
  }

  void fork() {
    const SeqId parent = random_id();
    const SeqId child = random_id();
    const Observed before = observe(parent);
    const Observed before_child = observe(child);
    const int64_t slots_before = min_state_slots();
    const Status st = manager_->fork(parent, child);
    if (find(parent) == nullptr) return refused(st, Code::not_found, before, parent, "fork");
    if (find(child) != nullptr) {
      refused(st, Code::invalid_argument, before_child, child, "fork (child exists)");
      return;
    }
    if (slots_before == 0) {
      return refused(st, Code::resource_exhausted, before, parent, "fork (state slot)");
    }
    FUZZ_CHECK(st.ok(), "fork: %s", st.to_string().c_str());
    Seq c = seqs_[parent];
    for (auto& slots : c.slots) slots.clear();
    c.reserved = 0;
    seqs_[child] = std::move(c);
  }

  void free() {
    const SeqId id = random_id();
    const Observed before = observe(id);
    const Status st = manager_->free(id);
    if (find(id) == nullptr) return refused(st, Code::not_found, before, id, "free (unknown)");
    FUZZ_CHECK(st.ok(), "free: %s", st.to_string().c_str());
    seqs_.erase(id);
  }

  void match() {
    const int e = random_extras();
    const Tokens prompt = random_prompt();
    const KeyMode mode = random_key_mode(e);
    const std::vector<PageKey> keys = keys_for(prompt, e, mode);
    const Observed before = observe(-1);
    const Result<int64_t> hit = call_match(prompt, e, mode, keys);
    FUZZ_CHECK(observe(-1) == before, "match_prefix changed the manager");
    if (e >= kNumValidExtras || mode == KeyMode::bad_count) {
      FUZZ_CHECK(!hit.ok() && hit.status().code() == Code::invalid_argument,
                 "match_prefix took bad spans");
      return;
    }
    FUZZ_CHECK(hit.ok(), "match_prefix: %s", hit.status().to_string().c_str());
    check_hit(prompt, e, *hit, mode != KeyMode::wrong);
  }

  // The fewest pages, over page groups, that freeing `victims` would make available: those no
  // other sequence holds.
  int64_t available_after(std::span<const SeqId> victims) const {
    int64_t fewest = INT64_MAX;
    for (size_t g = 0; g < num_groups(); ++g) {
      if (recurrent(g)) continue;
      std::map<PageId, int64_t> refs;    // references of every live sequence
      std::map<PageId, int64_t> victim;  // ... of the victims
      for (const auto& [id, s] : seqs_) {
        const bool is_victim = std::find(victims.begin(), victims.end(), id) != victims.end();
        for (PageId p : table_of(id, g)) {
          if (p == kNullPage) continue;
          ++refs[p];
          if (is_victim) ++victim[p];
        }
      }
      int64_t n = available(g);
      for (const auto& [p, k] : victim) n += k == refs[p] ? 1 : 0;
      fewest = std::min(fewest, n);
    }
    return fewest;
  }

  void plan_preemption() {
    const int64_t need = in_.ConsumeIntegralInRange<int64_t>(-1, max_pool_ + 1);
    std::vector<SeqId> victims;
    const int num = in_.ConsumeIntegralInRange<int>(0, kNumIds);
    for (int i = 0; i < num; ++i) victims.push_back(random_id());
    const Observed before = observe(-1);
    const Result<std::vector<SeqId>> plan = manager_->plan_preemption(need, victims);
    bool repeated = false;
    bool unknown = false;
    for (size_t i = 0; i < victims.size(); ++i) {
      unknown = unknown || find(victims[i]) == nullptr;
      repeated = repeated || std::count(victims.begin(), victims.begin() + i, victims[i]) > 0;
    }
    if (need < 0) {
      return refused(plan.status(), Code::invalid_argument, before, -1, "plan_preemption (need)");
    }
    if (unknown || repeated) {
      // Victims are checked in order, so with both kinds either code may come first.
      const Code code = !unknown    ? Code::invalid_argument
                        : !repeated ? Code::not_found
                                    : plan.status().code();
      FUZZ_CHECK(code == Code::not_found || code == Code::invalid_argument, "code %d",
                 static_cast<int>(code));
      return refused(plan.status(), code, before, -1, "plan_preemption (victims)");
    }
    // The shortest prefix that frees enough, as the model counts it.
    size_t want = 0;
    while (want <= victims.size() && available_after(std::span(victims).first(want)) < need) {
      ++want;
    }
    if (want > victims.size()) {
      return refused(plan.status(), Code::resource_exhausted, before, -1,
                     "plan_preemption (not enough)");
    }
    FUZZ_CHECK(plan.ok(), "plan_preemption: %s", plan.status().to_string().c_str());
    FUZZ_CHECK(observe(-1) == before, "plan_preemption changed the manager");
    FUZZ_CHECK(plan->size() == want && std::equal(plan->begin(), plan->end(), victims.begin()),
               "plan_preemption(%lld) chose %zu victims, expected the first %zu",
               static_cast<long long>(need), plan->size(), want);
    if (in_.ConsumeBool()) {  // carry it out
      for (SeqId id : *plan) {
        FUZZ_CHECK(manager_->free(id).ok(), "free of a planned victim");
        seqs_.erase(id);
      }
      FUZZ_CHECK(min_available() >= need, "the planned preemption freed too little");
    }
  }

  // Const queries: unknown ids are not_found, bad groups invalid_argument, can_admit follows the
  // free and evictable counts of every page group and the state slots of every recurrent one.
  void queries() {
    const SeqId id = random_id();
    const Observed before = observe(id);
    if (find(id) == nullptr) {
      FUZZ_CHECK(manager_->page_table(id).status().code() == Code::not_found, "page_table");
      FUZZ_CHECK(manager_->num_tokens(id).status().code() == Code::not_found, "num_tokens");
      FUZZ_CHECK(manager_->num_reserved(id).status().code() == Code::not_found, "num_reserved");
    } else {
      const auto bad = static_cast<int64_t>(num_groups());
      FUZZ_CHECK(manager_->page_table(id, bad).status().code() == Code::invalid_argument,
                 "page_table of a bad group");
      for (size_t g = 0; g < num_groups(); ++g) {
        if (recurrent(g)) continue;
        FUZZ_CHECK(manager_->state_slot(id, static_cast<int64_t>(g)).status().code() ==
                       Code::invalid_argument,
                   "state_slot of page group %zu", g);
      }
    }
    FUZZ_CHECK(manager_->reserved_slots(-1).status().code() == Code::invalid_argument,
               "reserved_slots(-1)");
    const int64_t n = in_.ConsumeIntegralInRange<int64_t>(-1, max_pool_ * ps_ + ps_);
    bool want = n >= 0;
    for (size_t g = 0; g < num_groups(); ++g) {
      if (recurrent(g)) {
        want = want && available(g) >= 1;
      } else {
        want = want && (n + ps_ - 1) / ps_ <= available(g) - options_.watermark_pages;
      }
    }
    FUZZ_CHECK(manager_->can_admit(n) == want, "can_admit(%lld) is %d, expected %d",
               static_cast<long long>(n), static_cast<int>(!want), static_cast<int>(want));
    FUZZ_CHECK(observe(id) == before, "a const query changed the manager");
  }

  // Replaying the events in order gives exactly the keys cached now, per group.
  void check_events() {
    const std::span<const PageEvent> events = manager_->events();
    if (!options_.record_events || !options_.enable_prefix_caching) {
      FUZZ_CHECK(events.empty(), "%zu events without record_events", events.size());
      return;
    }
    FUZZ_CHECK(events.size() >= num_events_seen_, "events went from %zu to %zu", num_events_seen_,
               events.size());
    for (size_t i = num_events_seen_; i < events.size(); ++i) {
      const PageEvent& ev = events[i];
      FUZZ_CHECK(ev.num_tokens == ps_ && ev.layer_group >= 0 &&
                     ev.layer_group < static_cast<int64_t>(num_groups()),
                 "event %zu fields (layer_group %lld)", i, static_cast<long long>(ev.layer_group));
      auto& cached = cached_keys_[static_cast<size_t>(ev.layer_group)];
      if (ev.kind == PageEventKind::cached) {
        FUZZ_CHECK(cached.insert(ev.key.bytes).second, "cached event of a cached key %s",
                   ev.key.hex().c_str());
      } else {
        FUZZ_CHECK(cached.erase(ev.key.bytes) == 1, "evicted event of an uncached key %s",
                   ev.key.hex().c_str());
      }
    }
    num_events_seen_ = events.size();
    for (const auto& bytes : cached_keys_[0]) {
      FUZZ_CHECK(manager_->is_cached(PageKey{bytes}), "key %s of a cached event is not cached",
                 PageKey{bytes}.hex().c_str());
    }
    for (size_t g = 0; g < num_groups(); ++g) {
      FUZZ_CHECK(static_cast<int64_t>(cached_keys_[g].size()) ==
                     manager_->num_cached_pages(static_cast<int64_t>(g)),
                 "events say %zu keys cached in group %zu, the manager %lld",
                 cached_keys_[g].size(), g,
                 static_cast<long long>(manager_->num_cached_pages(static_cast<int64_t>(g))));
    }
  }

  void check() {
    const Status inv = manager_->check_invariants();
    FUZZ_CHECK(inv.ok(), "check_invariants: %s", inv.to_string().c_str());
    FUZZ_CHECK(manager_->num_sequences() == static_cast<int64_t>(seqs_.size()),
               "num_sequences %lld, model has %zu",
               static_cast<long long>(manager_->num_sequences()), seqs_.size());
    FUZZ_CHECK(manager_->num_groups() == static_cast<int64_t>(num_groups()), "num_groups");
    FUZZ_CHECK(manager_->num_free_pages() == manager_->num_free_pages(0) &&
                   manager_->num_cached_pages() == manager_->num_cached_pages(0) &&
                   manager_->num_evictable_pages() == manager_->num_evictable_pages(0) &&
                   manager_->num_used_pages() == manager_->num_used_pages(0),
               "the counts without a group are not group 0's");
    for (size_t g = 0; g < num_groups(); ++g) {
      const auto gi = static_cast<int64_t>(g);
      FUZZ_CHECK(manager_->num_free_pages(gi) + manager_->num_evictable_pages(gi) +
                         manager_->num_used_pages(gi) ==
                     specs_[g].num_pages,
                 "group %zu: free + evictable + used != num_pages", g);
      FUZZ_CHECK(manager_->num_evictable_pages(gi) <= manager_->num_cached_pages(gi),
                 "group %zu: more evictable than cached pages", g);
      FUZZ_CHECK(
          !recurrent(g) || manager_->num_used_pages(gi) == static_cast<int64_t>(seqs_.size()),
          "recurrent group %zu uses %lld slots for %zu sequences", g,
          static_cast<long long>(manager_->num_used_pages(gi)), seqs_.size());
    }
    FUZZ_CHECK(manager_->pending_copies().empty(), "copies pending after they were cleared");
    FUZZ_CHECK(manager_->pending_state_copies().empty(), "state copies pending after a clear");
    check_events();
    // Per group, which sequences read each slot: a reservation must not overwrite another's token.
    std::vector<std::map<int64_t, SeqId>> readers(num_groups());
    std::vector<std::set<StateSlot>> live_slots(num_groups());
    for (const auto& [id, s] : seqs_) {
      FUZZ_CHECK(manager_->contains(id), "sequence %lld lost", static_cast<long long>(id));
      const int64_t len = static_cast<int64_t>(s.tokens.size());
      FUZZ_CHECK(*manager_->num_tokens(id) == len, "sequence %lld num_tokens %lld, expected %lld",
                 static_cast<long long>(id), static_cast<long long>(*manager_->num_tokens(id)),
                 static_cast<long long>(len));
      FUZZ_CHECK(*manager_->num_reserved(id) == s.reserved, "sequence %lld num_reserved",
                 static_cast<long long>(id));
      for (size_t g = 0; g < num_groups(); ++g) {
        const std::span<const PageId> table = table_of(id, g);
        if (recurrent(g)) {
          FUZZ_CHECK(table.empty(), "recurrent group %zu has a page table", g);
          const StateSlot live = live_slot(id, g);
          FUZZ_CHECK(live_slots[g].insert(live).second, "live slot %d shared", live);
          FUZZ_CHECK(states_[g][static_cast<size_t>(live)] == recompute(s.tokens),
                     "sequence %lld group %zu live state (slot %d) is not the hash of its %lld "
                     "tokens",
                     static_cast<long long>(id), g, live, static_cast<long long>(len));
          continue;
        }
        FUZZ_CHECK(static_cast<int64_t>(table.size()) == (len + s.reserved + ps_ - 1) / ps_,
                   "sequence %lld group %zu has %zu pages for %lld + %lld tokens",
                   static_cast<long long>(id), g, table.size(), static_cast<long long>(len),
                   static_cast<long long>(s.reserved));
        const int64_t released = out_of_window(g, len);
        for (int64_t j = 0; j < static_cast<int64_t>(table.size()); ++j) {
          const PageId page = table[static_cast<size_t>(j)];
          FUZZ_CHECK((page == kNullPage) == (j < released),
                     "sequence %lld group %zu page %lld of %lld tokens is %d",
                     static_cast<long long>(id), g, static_cast<long long>(j),
                     static_cast<long long>(len), page);
          FUZZ_CHECK(page == kNullPage || (page >= 0 && page < specs_[g].num_pages), "page id %d",
                     page);
        }
        for (int64_t i = released * ps_; i < len; ++i) {
          const PageId page = table[static_cast<size_t>(i / ps_)];
          const int32_t held = pools_[g][static_cast<size_t>(page)][static_cast<size_t>(i % ps_)];
          FUZZ_CHECK(held == s.tokens[static_cast<size_t>(i)],
                     "sequence %lld group %zu token %lld is %d but page %d slot %lld holds %d",
                     static_cast<long long>(id), g, static_cast<long long>(i),
                     s.tokens[static_cast<size_t>(i)], page, static_cast<long long>(i % ps_), held);
          readers[g].emplace(static_cast<int64_t>(page) * ps_ + i % ps_, id);
        }
      }
    }
    for (const auto& [id, s] : seqs_) {
      for (size_t g = 0; g < num_groups(); ++g) {
        if (recurrent(g)) continue;
        for (int64_t slot : s.slots[g]) {
          auto it = readers[g].find(slot);
          FUZZ_CHECK(it == readers[g].end(),
                     "group %zu slot %lld reserved by sequence %lld holds a token of %lld", g,
                     static_cast<long long>(slot), static_cast<long long>(id),
                     static_cast<long long>(it->second));
        }
      }
    }
  }

  FuzzedDataProvider& in_;
  BlockManagerOptions options_;
  std::vector<LayerGroupSpec> specs_;  // the groups (one full group without groups)
  int64_t min_pool_ = 1;               // the smallest and largest page group
  int64_t max_pool_ = 1;
  int64_t ps_ = 1;
  bool weak_hash_ = false;
  KeyHashFn hash_;
  size_t num_events_seen_ = 0;
  std::vector<std::set<std::array<uint8_t, 32>>> cached_keys_;  // per group, from the events
  std::unique_ptr<BlockManager> manager_;
  std::vector<std::vector<Tokens>> pools_;     // per page group: token id per slot
  std::vector<std::vector<uint64_t>> states_;  // per recurrent group: toy state per slot
  std::map<SeqId, Seq> seqs_;
  std::set<std::pair<int, Tokens>> committed_;  // (extras, tokens [0, b)) for each full page b
  std::array<Tokens, 3> prefixes_;
};

}  // namespace
}  // namespace kvcache

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  kvcache::Fuzzer(&in).run();
  return 0;
}
