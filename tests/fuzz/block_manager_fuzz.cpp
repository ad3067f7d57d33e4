// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// libFuzzer target: the input bytes are a small program for a BlockManager. The first bytes pick
// the options (a tiny pool, page size 1..8, prefix caching on or off, sometimes a weak hash that
// makes key collisions common); the rest is a sequence of operations on a handful of sequence ids
// with prompts built from a few shared prefixes over a 4-token alphabet, so pages repeat and
// prefix hits, duplicates, copy-on-write and exhaustion are all reached. Besides the sequence ops:
// match_prefix, add/match_prefix with the prompt's keys given (right, wrong or miscounted),
// plan_preemption (checked against a count from the page tables, sometimes carried out), page
// events (replayed into the set of cached keys) and can_admit. Bad inputs (unknown ids,
// over-commit, bad spans, negative counts, repeated victims) are sent on purpose.
//
// A shadow model keeps each sequence's tokens and reserved slots and a token id per pool slot
// (commit writes the slots, pending copies run in order). After every operation: the manager's
// own invariants hold, its counts agree, every live sequence's pages hold exactly its tokens, no
// reserved slot overwrites a token another sequence reads, and every prefix hit is a run that was
// committed under the same key extras. A refusal must change nothing. Any violation prints what
// went wrong and traps, so libFuzzer saves the input.

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

// What a refusal must leave alone.
struct Observed {
  std::vector<PageId> table;
  int64_t num_tokens = -1;
  int64_t num_reserved = -1;
  bool contains = false;
  int64_t num_sequences = 0;
  int64_t num_free = 0;
  int64_t num_cached = 0;
  int64_t num_evictable = 0;
  int64_t num_used = 0;
  size_t num_copies = 0;
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
      check();
    }
  }

 private:
  struct Seq {
    int extras = 0;
    Tokens tokens;               // committed
    Tokens todo;                 // prompt tokens not yet committed
    std::vector<int64_t> slots;  // reserved, not committed
  };

  bool configure() {
    BlockManagerOptions o;
    o.num_pages = in_.ConsumeIntegralInRange<int64_t>(1, 64);
    o.page_size = in_.ConsumeIntegralInRange<int64_t>(1, 8);
    o.enable_prefix_caching = in_.ConsumeIntegralInRange<int>(0, 3) != 0;
    o.record_events = in_.ConsumeBool();
    o.watermark_pages = in_.ConsumeIntegralInRange<int64_t>(0, o.num_pages);
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
    pages_.assign(static_cast<size_t>(o.num_pages), Tokens(static_cast<size_t>(ps_), -1));
    for (auto& p : prefixes_) p = random_tokens(in_.ConsumeIntegralInRange<int64_t>(0, 3 * ps_));
    return true;
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
      const auto t = manager_->page_table(id);
      FUZZ_CHECK(t.ok(), "page_table of a live sequence: %s", t.status().to_string().c_str());
      o.table.assign(t->begin(), t->end());
      o.num_tokens = *manager_->num_tokens(id);
      o.num_reserved = *manager_->num_reserved(id);
    }
    o.num_sequences = manager_->num_sequences();
    o.num_free = manager_->num_free_pages();
    o.num_cached = manager_->num_cached_pages();
    o.num_evictable = manager_->num_evictable_pages();
    o.num_used = manager_->num_used_pages();
    o.num_copies = manager_->pending_copies().size();
    o.num_events = manager_->events().size();
    o.stats = manager_->stats();
    return o;
  }

  // A refused call: the right code, and nothing changed for `id` or the pool.
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
    FUZZ_CHECK(hit.ok(), "add: %s", hit.status().to_string().c_str());
    FUZZ_CHECK(*hit == *matched, "add hit %lld tokens, match_prefix said %lld",
               static_cast<long long>(*hit), static_cast<long long>(*matched));
    check_hit(prompt, e, *hit, mode != KeyMode::wrong);
    for (int64_t j = 0; j < *hit / ps_ && mode == KeyMode::right; ++j) {
      FUZZ_CHECK(manager_->is_cached(keys[static_cast<size_t>(j)]), "hit page %lld not cached",
                 static_cast<long long>(j));
    }
    Seq& s = seqs_[id];
    s.extras = e;
    s.tokens.assign(prompt.begin(), prompt.begin() + *hit);
    s.todo.assign(prompt.begin() + *hit, prompt.end());
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
    if (!exact || !options_.enable_prefix_caching || weak_hash_ ||
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
      // Only when even the most the call could need (a copy-on-write page included) is more
      // than the free and evictable pages plus those the new reservation gives back.
      const int64_t len = static_cast<int64_t>(s->tokens.size());
      const int64_t have = static_cast<int64_t>(before.table.size());
      const int64_t need = (len + n + ps_ - 1) / ps_;
      const int64_t most = std::max<int64_t>(0, need - have) + (n > 0 && len % ps_ != 0 ? 1 : 0);
      const int64_t available =
          before.num_free + before.num_evictable + std::max<int64_t>(0, have - need);
      FUZZ_CHECK(most > available, "reserve(%lld) refused (%s) with %lld pages available",
                 static_cast<long long>(n), r.status().to_string().c_str(),
                 static_cast<long long>(available));
      return refused(r.status(), Code::resource_exhausted, before, id, "reserve");
    }
    FUZZ_CHECK(static_cast<int64_t>(r->size()) == n, "reserve(%lld) gave %zu slots",
               static_cast<long long>(n), r->size());
    s->slots.assign(r->begin(), r->end());
    // The caller's part: run the copies in order, before this step's writes.
    const std::span<const PageCopy> copies = manager_->pending_copies();
    FUZZ_CHECK(manager_->stats().cow_copies - copies_before == static_cast<int64_t>(copies.size()),
               "cow_copies counted %lld, %zu pending",
               static_cast<long long>(manager_->stats().cow_copies - copies_before), copies.size());
    for (const PageCopy& c : copies) {
      FUZZ_CHECK(c.src >= 0 && c.src < options_.num_pages && c.dst >= 0 &&
                     c.dst < options_.num_pages && c.src != c.dst,
                 "bad copy %d -> %d", c.src, c.dst);
      pages_[static_cast<size_t>(c.dst)] = pages_[static_cast<size_t>(c.src)];
    }
    manager_->clear_pending_copies();
  }

  void commit() {
    const SeqId id = random_id();
    Seq* s = find(id);
    const int64_t reserved = s == nullptr ? 0 : static_cast<int64_t>(s->slots.size());
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
    const int64_t old = static_cast<int64_t>(s->tokens.size());
    for (size_t i = 0; i < t.size(); ++i) {
      const int64_t slot = s->slots[i];
      pages_[static_cast<size_t>(slot / ps_)][static_cast<size_t>(slot % ps_)] = t[i];
    }
    s->slots.erase(s->slots.begin(), s->slots.begin() + static_cast<ptrdiff_t>(t.size()));
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
    FUZZ_CHECK(st.ok(), "truncate: %s", st.to_string().c_str());
    s->tokens.resize(static_cast<size_t>(n));
    s->slots.clear();
    s->todo.clear();  // a rolled back sequence decodes from here
  }

  void fork() {
    const SeqId parent = random_id();
    const SeqId child = random_id();
    const Observed before = observe(parent);
    const Observed before_child = observe(child);
    const Status st = manager_->fork(parent, child);
    if (find(parent) == nullptr) return refused(st, Code::not_found, before, parent, "fork");
    if (find(child) != nullptr) {
      refused(st, Code::invalid_argument, before_child, child, "fork (child exists)");
      return;
    }
    FUZZ_CHECK(st.ok(), "fork: %s", st.to_string().c_str());
    Seq c = seqs_[parent];
    c.slots.clear();
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

  // The pages freeing `victims` would make available: those no other sequence holds.
  int64_t available_after(std::span<const SeqId> victims) const {
    std::map<PageId, int64_t> refs;    // references of every live sequence
    std::map<PageId, int64_t> victim;  // ... of the victims
    for (const auto& [id, s] : seqs_) {
      const bool is_victim = std::find(victims.begin(), victims.end(), id) != victims.end();
      const std::span<const PageId> table = *manager_->page_table(id);
      for (PageId p : table) {
        ++refs[p];
        if (is_victim) ++victim[p];
      }
    }
    int64_t n = manager_->num_free_pages() + manager_->num_evictable_pages();
    for (const auto& [p, k] : victim) n += k == refs[p] ? 1 : 0;
    return n;
  }

  void plan_preemption() {
    const int64_t need = in_.ConsumeIntegralInRange<int64_t>(-1, options_.num_pages + 1);
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
      FUZZ_CHECK(manager_->num_free_pages() + manager_->num_evictable_pages() >= need,
                 "the planned preemption freed too little");
    }
  }

  // Const queries: unknown ids are not_found, can_admit follows the free and evictable counts.
  void queries() {
    const SeqId id = random_id();
    const Observed before = observe(id);
    if (find(id) == nullptr) {
      FUZZ_CHECK(manager_->page_table(id).status().code() == Code::not_found, "page_table");
      FUZZ_CHECK(manager_->num_tokens(id).status().code() == Code::not_found, "num_tokens");
      FUZZ_CHECK(manager_->num_reserved(id).status().code() == Code::not_found, "num_reserved");
    }
    const int64_t n = in_.ConsumeIntegralInRange<int64_t>(-1, options_.num_pages * ps_ + ps_);
    const int64_t room =
        manager_->num_free_pages() + manager_->num_evictable_pages() - options_.watermark_pages;
    const bool want = n >= 0 && (n + ps_ - 1) / ps_ <= room;
    FUZZ_CHECK(manager_->can_admit(n) == want, "can_admit(%lld) with %lld pages of room",
               static_cast<long long>(n), static_cast<long long>(room));
    FUZZ_CHECK(observe(id) == before, "a const query changed the manager");
  }

  // Replaying the events in order gives exactly the keys cached now.
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
      FUZZ_CHECK(ev.num_tokens == ps_ && ev.layer_group == 0, "event %zu fields", i);
      if (ev.kind == PageEventKind::cached) {
        FUZZ_CHECK(cached_keys_.insert(ev.key.bytes).second, "cached event of a cached key %s",
                   ev.key.hex().c_str());
      } else {
        FUZZ_CHECK(cached_keys_.erase(ev.key.bytes) == 1, "evicted event of an uncached key %s",
                   ev.key.hex().c_str());
      }
    }
    num_events_seen_ = events.size();
    for (const auto& bytes : cached_keys_) {
      FUZZ_CHECK(manager_->is_cached(PageKey{bytes}), "key %s of a cached event is not cached",
                 PageKey{bytes}.hex().c_str());
    }
    FUZZ_CHECK(static_cast<int64_t>(cached_keys_.size()) == manager_->num_cached_pages(),
               "events say %zu keys cached, the manager %lld", cached_keys_.size(),
               static_cast<long long>(manager_->num_cached_pages()));
  }

  void check() {
    const Status inv = manager_->check_invariants();
    FUZZ_CHECK(inv.ok(), "check_invariants: %s", inv.to_string().c_str());
    FUZZ_CHECK(manager_->num_sequences() == static_cast<int64_t>(seqs_.size()),
               "num_sequences %lld, model has %zu",
               static_cast<long long>(manager_->num_sequences()), seqs_.size());
    FUZZ_CHECK(
        manager_->num_free_pages() + manager_->num_evictable_pages() + manager_->num_used_pages() ==
            options_.num_pages,
        "free + evictable + used != num_pages");
    FUZZ_CHECK(manager_->num_evictable_pages() <= manager_->num_cached_pages(),
               "more evictable than cached pages");
    FUZZ_CHECK(manager_->pending_copies().empty(), "copies pending after they were cleared");
    check_events();
    // Which sequences read each slot: a reservation must not overwrite another's token.
    std::map<int64_t, SeqId> readers;
    for (const auto& [id, s] : seqs_) {
      FUZZ_CHECK(manager_->contains(id), "sequence %lld lost", static_cast<long long>(id));
      const int64_t len = static_cast<int64_t>(s.tokens.size());
      const int64_t reserved = static_cast<int64_t>(s.slots.size());
      FUZZ_CHECK(*manager_->num_tokens(id) == len, "sequence %lld num_tokens %lld, expected %lld",
                 static_cast<long long>(id), static_cast<long long>(*manager_->num_tokens(id)),
                 static_cast<long long>(len));
      FUZZ_CHECK(*manager_->num_reserved(id) == reserved, "sequence %lld num_reserved",
                 static_cast<long long>(id));
      const std::span<const PageId> table = *manager_->page_table(id);
      FUZZ_CHECK(static_cast<int64_t>(table.size()) == (len + reserved + ps_ - 1) / ps_,
                 "sequence %lld has %zu pages for %lld + %lld tokens", static_cast<long long>(id),
                 table.size(), static_cast<long long>(len), static_cast<long long>(reserved));
      for (int64_t i = 0; i < len; ++i) {
        const PageId page = table[static_cast<size_t>(i / ps_)];
        FUZZ_CHECK(page >= 0 && page < options_.num_pages, "page id %d", page);
        const int32_t held = pages_[static_cast<size_t>(page)][static_cast<size_t>(i % ps_)];
        FUZZ_CHECK(held == s.tokens[static_cast<size_t>(i)],
                   "sequence %lld token %lld is %d but page %d slot %lld holds %d",
                   static_cast<long long>(id), static_cast<long long>(i),
                   s.tokens[static_cast<size_t>(i)], page, static_cast<long long>(i % ps_), held);
        readers.emplace(static_cast<int64_t>(page) * ps_ + i % ps_, id);
      }
      for (int64_t i = 0; i < reserved; ++i) {
        const int64_t pos = len + i;
        const int64_t want = table[static_cast<size_t>(pos / ps_)] * ps_ + pos % ps_;
        FUZZ_CHECK(s.slots[static_cast<size_t>(i)] == want,
                   "sequence %lld reserved slot %lld is %lld, page table says %lld",
                   static_cast<long long>(id), static_cast<long long>(i),
                   static_cast<long long>(s.slots[static_cast<size_t>(i)]),
                   static_cast<long long>(want));
      }
    }
    for (const auto& [id, s] : seqs_) {
      for (int64_t slot : s.slots) {
        auto it = readers.find(slot);
        FUZZ_CHECK(it == readers.end(), "slot %lld reserved by sequence %lld holds a token of %lld",
                   static_cast<long long>(slot), static_cast<long long>(id),
                   static_cast<long long>(it->second));
      }
    }
  }

  FuzzedDataProvider& in_;
  BlockManagerOptions options_;
  int64_t ps_ = 1;
  bool weak_hash_ = false;
  KeyHashFn hash_;
  size_t num_events_seen_ = 0;
  std::set<std::array<uint8_t, 32>> cached_keys_;  // replayed from the events
  std::unique_ptr<BlockManager> manager_;
  std::vector<Tokens> pages_;  // the simulated pool: token id per slot
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
