// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "kvcache/block_manager.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "kvcache/page_key.h"

#include "testing/test_util.h"

namespace kvcache {
namespace {

using ::kvcache::testing::has_error;
using ::kvcache::testing::value_or_fail;
using Tokens = std::vector<int32_t>;
using Pages = std::vector<PageId>;

BlockManagerOptions options(int64_t num_pages, int64_t page_size = 4) {
  BlockManagerOptions o;
  o.num_pages = num_pages;
  o.page_size = page_size;
  o.fingerprint = KeyFingerprint{"test-model@1", "f16", page_size, 0};
  return o;
}

std::unique_ptr<BlockManager> make(const BlockManagerOptions& o) {
  return value_or_fail(BlockManager::create(o));
}

// n distinct token ids starting at `first`.
Tokens tokens(int64_t n, int32_t first = 100) {
  Tokens t;
  for (int64_t i = 0; i < n; ++i) t.push_back(first + static_cast<int32_t>(i));
  return t;
}

Tokens concat(const Tokens& a, const Tokens& b) {
  Tokens t = a;
  t.insert(t.end(), b.begin(), b.end());
  return t;
}

Pages table(const BlockManager& m, SeqId seq) {
  const auto t = value_or_fail(m.page_table(seq));
  return Pages(t.begin(), t.end());
}

std::vector<int64_t> slots(std::span<const int64_t> s) { return {s.begin(), s.end()}; }

// add(), then reserve + commit the rest of the prompt. Returns the cached tokens add() took.
int64_t prefill(BlockManager& m, SeqId seq, const Tokens& prompt, const KeyExtras& extras = {}) {
  const int64_t hit = value_or_fail(m.add(seq, prompt, extras));
  const int64_t rest = static_cast<int64_t>(prompt.size()) - hit;
  EXPECT_OK(m.reserve(seq, rest));
  EXPECT_OK(m.commit(seq, std::span<const int32_t>(prompt).subspan(static_cast<size_t>(hit))));
  EXPECT_OK(m.check_invariants());
  return hit;
}

// Everything a caller can observe, for the "a refusal changes nothing" checks.
struct Observed {
  std::map<SeqId, Pages> tables;
  std::map<SeqId, int64_t> num_tokens;
  std::map<SeqId, int64_t> num_reserved;
  int64_t num_sequences = 0;
  int64_t num_free = 0;
  int64_t num_cached = 0;
  int64_t num_evictable = 0;
  int64_t num_used = 0;
  BlockManagerStats stats;
  std::vector<PageCopy> copies;
  std::vector<PageEvent> events;
  bool operator==(const Observed&) const = default;
};

Observed observe(const BlockManager& m, const std::vector<SeqId>& ids) {
  Observed o;
  for (SeqId id : ids) {
    if (!m.contains(id)) continue;
    o.tables[id] = table(m, id);
    o.num_tokens[id] = value_or_fail(m.num_tokens(id));
    o.num_reserved[id] = value_or_fail(m.num_reserved(id));
  }
  o.num_sequences = m.num_sequences();
  o.num_free = m.num_free_pages();
  o.num_cached = m.num_cached_pages();
  o.num_evictable = m.num_evictable_pages();
  o.num_used = m.num_used_pages();
  o.stats = m.stats();
  o.copies.assign(m.pending_copies().begin(), m.pending_copies().end());
  o.events.assign(m.events().begin(), m.events().end());
  return o;
}

TEST(BlockManager, CreateRefusesBadOptions) {
  struct Case {
    const char* name;
    std::function<void(BlockManagerOptions&)> change;
    const char* fragment;
  };
  const Case cases[] = {
      {"no pages", [](auto& o) { o.num_pages = 0; }, "num_pages is 0, expected 1 <= num_pages"},
      {"page size", [](auto& o) { o.page_size = 0; }, "page_size is 0, expected >= 1"},
      {"fingerprint page size", [](auto& o) { o.fingerprint.page_size = 8; },
       "fingerprint.page_size is 8, expected page_size = 4"},
      {"watermark", [](auto& o) { o.watermark_pages = 9; },
       "watermark_pages is 9, expected 0 <= watermark_pages <= num_pages = 8"},
      {"negative watermark", [](auto& o) { o.watermark_pages = -1; }, "watermark_pages is -1"},
      {"hint", [](auto& o) { o.max_pages_per_seq_hint = -1; }, "max_pages_per_seq_hint is -1"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    BlockManagerOptions o = options(8);
    c.change(o);
    EXPECT_TRUE(has_error(BlockManager::create(o), Code::invalid_argument, c.fragment));
  }
  EXPECT_OK(BlockManager::create(options(8)));
}

TEST(BlockManager, AddReserveCommitMapsSlotsPageByPage) {
  auto m = make(options(8));
  EXPECT_EQ(value_or_fail(m->add(1, tokens(10))), 0);
  EXPECT_EQ(value_or_fail(m->num_tokens(1)), 0);
  EXPECT_EQ(table(*m, 1), Pages{});

  const auto s = value_or_fail(m->reserve(1, 10));
  EXPECT_EQ(slots(s), (std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}));
  EXPECT_EQ(table(*m, 1), (Pages{0, 1, 2}));
  EXPECT_EQ(value_or_fail(m->num_reserved(1)), 10);
  EXPECT_EQ(m->num_used_pages(), 3);
  EXPECT_EQ(m->num_free_pages(), 5);
  EXPECT_EQ(m->num_cached_pages(), 0);  // nothing committed yet

  ASSERT_OK(m->commit(1, tokens(6)));
  EXPECT_EQ(value_or_fail(m->num_tokens(1)), 6);
  EXPECT_EQ(value_or_fail(m->num_reserved(1)), 4);
  EXPECT_EQ(m->num_cached_pages(), 1);  // page 0 filled up
  ASSERT_OK(m->commit(1, tokens(4, 106)));
  EXPECT_EQ(m->num_cached_pages(), 2);
  EXPECT_EQ(value_or_fail(m->num_reserved(1)), 0);
  EXPECT_OK(m->check_invariants());

  // Decode: one slot per step, a new page at the boundary.
  EXPECT_EQ(slots(value_or_fail(m->reserve(1, 2))), (std::vector<int64_t>{10, 11}));
  ASSERT_OK(m->commit(1, Tokens{7, 8}));
  EXPECT_EQ(slots(value_or_fail(m->reserve(1, 1))), (std::vector<int64_t>{12}));
  EXPECT_EQ(table(*m, 1), (Pages{0, 1, 2, 3}));
  ASSERT_OK(m->commit(1, Tokens{9}));
  EXPECT_EQ(m->pending_copies().size(), 0u);
  EXPECT_OK(m->check_invariants());

  ASSERT_OK(m->free(1));
  EXPECT_FALSE(m->contains(1));
  EXPECT_EQ(m->num_used_pages(), 0);
  EXPECT_EQ(m->num_evictable_pages(), 3);  // the three full pages stay cached
  EXPECT_EQ(m->num_free_pages(), 5);
  EXPECT_OK(m->check_invariants());
}

TEST(BlockManager, ReserveReplacesTheEarlierReservation) {
  auto m = make(options(8));
  ASSERT_OK(m->add(1, {}));
  ASSERT_OK(m->reserve(1, 9));
  EXPECT_EQ(m->num_used_pages(), 3);
  EXPECT_EQ(slots(value_or_fail(m->reserve(1, 2))), (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(table(*m, 1), (Pages{0}));
  EXPECT_EQ(m->num_used_pages(), 1);
  ASSERT_OK(m->reserve(1, 0));
  EXPECT_EQ(table(*m, 1), Pages{});
  EXPECT_EQ(value_or_fail(m->reserve(1, 0)).size(), 0u);
  EXPECT_OK(m->check_invariants());
}

TEST(BlockManager, RefusalsAreClearAndChangeNothing) {
  BlockManagerOptions o = options(4);
  o.record_events = true;
  auto m = make(o);
  prefill(*m, 1, tokens(6));
  ASSERT_OK(m->reserve(1, 3));
  const std::vector<SeqId> ids = {1, 2, 9};
  const MultimodalSpan empty_span[] = {{"img", 3, 3}};
  const MultimodalSpan unsorted[] = {{"a", 4, 6}, {"b", 1, 2}};
  const Tokens five = tokens(5);
  const std::vector<PageKey> two_keys(2);  // five tokens have one full page
  const SeqId victims_unknown[] = {1, 9};
  const SeqId victims_repeated[] = {1, 1};
  const SeqId victims_all[] = {1};

  struct Case {
    const char* name;
    std::function<Status()> call;
    Code code;
    const char* fragment;
  };
  const Case cases[] = {
      {"add existing", [&] { return m->add(1, five).status(); }, Code::invalid_argument,
       "BlockManager.add: sequence 1 exists, expected a new id"},
      {"add empty span",
       [&] {
         return m->add(2, five, {"", "", empty_span}).status();
       },
       Code::invalid_argument, "multimodal span 0 is [3, 3), expected 0 <= begin < end"},
      {"add unsorted spans",
       [&] {
         return m->add(2, five, {"", "", unsorted}).status();
       },
       Code::invalid_argument, "multimodal span 1 begins at 1, expected spans sorted by begin"},
      {"reserve unknown", [&] { return m->reserve(9, 1).status(); }, Code::not_found,
       "BlockManager.reserve: unknown sequence 9, expected an added sequence"},
      {"reserve negative", [&] { return m->reserve(1, -1).status(); }, Code::invalid_argument,
       "BlockManager.reserve: n is -1, expected n >= 0"},
      {"reserve too much", [&] { return m->reserve(1, 100).status(); }, Code::resource_exhausted,
       "new pages needed for 100 tokens of sequence 1, expected at most"},
      {"commit unknown", [&] { return m->commit(9, five); }, Code::not_found,
       "BlockManager.commit: unknown sequence 9"},
      {"commit more than reserved", [&] { return m->commit(1, five); }, Code::invalid_argument,
       "BlockManager.commit: 5 tokens, expected at most 3 reserved"},
      {"truncate unknown", [&] { return m->truncate(9, 0); }, Code::not_found,
       "BlockManager.truncate: unknown sequence 9"},
      {"truncate beyond", [&] { return m->truncate(1, 7); }, Code::invalid_argument,
       "BlockManager.truncate: n is 7, expected 0 <= n <= 6 (num_tokens of sequence 1)"},
      {"truncate negative", [&] { return m->truncate(1, -1); }, Code::invalid_argument,
       "n is -1, expected 0 <= n <= 6"},
      {"fork unknown", [&] { return m->fork(9, 2); }, Code::not_found,
       "BlockManager.fork: unknown sequence 9"},
      {"fork into existing", [&] { return m->fork(1, 1); }, Code::invalid_argument,
       "BlockManager.fork: child sequence 1 exists, expected a new id"},
      {"free unknown", [&] { return m->free(9); }, Code::not_found,
       "BlockManager.free: unknown sequence 9"},
      {"page_table unknown", [&] { return m->page_table(9).status(); }, Code::not_found,
       "BlockManager.page_table: unknown sequence 9"},
      {"num_tokens unknown", [&] { return m->num_tokens(9).status(); }, Code::not_found,
       "BlockManager.num_tokens"},
      {"num_reserved unknown", [&] { return m->num_reserved(9).status(); }, Code::not_found,
       "BlockManager.num_reserved"},
      {"match_prefix bad span",
       [&] {
         return m->match_prefix(five, {"", "", unsorted}).status();
       },
       Code::invalid_argument, "BlockManager.match_prefix: multimodal span 1"},
      {"add wrong key count", [&] { return m->add(2, five, two_keys, {}).status(); },
       Code::invalid_argument,
       "BlockManager.add: keys has 2 entries, expected prompt.size() / page_size = 5 / 4 = 1"},
      {"match_prefix wrong key count",
       [&] { return m->match_prefix(five, std::span<const PageKey>(), {}).status(); },
       Code::invalid_argument, "BlockManager.match_prefix: keys has 0 entries, expected"},
      {"plan negative need", [&] { return m->plan_preemption(-1, victims_all).status(); },
       Code::invalid_argument,
       "BlockManager.plan_preemption: num_pages_needed is -1, expected >= 0"},
      {"plan unknown victim", [&] { return m->plan_preemption(1, victims_unknown).status(); },
       Code::not_found,
       "BlockManager.plan_preemption: unknown sequence 9, expected an added sequence"},
      {"plan repeated victim", [&] { return m->plan_preemption(1, victims_repeated).status(); },
       Code::invalid_argument,
       "victim 1 (sequence 1) repeats victim 0, expected distinct sequences"},
      {"plan not enough", [&] { return m->plan_preemption(5, victims_all).status(); },
       Code::resource_exhausted,
       "BlockManager.plan_preemption: freeing all 1 victims leaves 4 pages available, expected "
       ">= 5 (num_pages_needed)"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const Observed before = observe(*m, ids);
    EXPECT_TRUE(has_error(c.call(), c.code, c.fragment));
    EXPECT_EQ(observe(*m, ids), before);
    EXPECT_OK(m->check_invariants());
  }
  // A freed sequence is unknown afterwards.
  ASSERT_OK(m->free(1));
  EXPECT_TRUE(has_error(m->free(1), Code::not_found, "unknown sequence 1"));
  EXPECT_TRUE(has_error(m->fork(1, 3), Code::not_found, "BlockManager.fork: unknown sequence 1"));
}

TEST(BlockManager, ExhaustedReserveLeavesEvictablePagesAndCopiesAlone) {
  auto m = make(options(3));
  prefill(*m, 1, tokens(6));  // pages 0 (full, cached), 1 (2 tokens)
  ASSERT_OK(m->fork(1, 2));
  const Observed before = observe(*m, {1, 2});
  // CoW of page 1 plus 2 new pages: 3 needed, 1 free.
  EXPECT_TRUE(has_error(m->reserve(2, 8), Code::resource_exhausted,
                        "3 new pages needed for 8 tokens of sequence 2, expected at most 1"));
  EXPECT_EQ(observe(*m, {1, 2}), before);
  EXPECT_OK(m->check_invariants());
}

TEST(BlockManager, ForkSharesPagesAndCopiesThePartialPageOnFirstWrite) {
  auto m = make(options(8));
  prefill(*m, 1, tokens(6));  // pages {0 full, 1 with 2 tokens}
  ASSERT_OK(m->fork(1, 2));
  EXPECT_EQ(table(*m, 2), (Pages{0, 1}));
  EXPECT_EQ(value_or_fail(m->num_tokens(2)), 6);
  EXPECT_EQ(m->num_used_pages(), 2);
  EXPECT_OK(m->check_invariants());

  // The child writes first: page 1 is shared, so it gets a copy.
  EXPECT_EQ(slots(value_or_fail(m->reserve(2, 1))), (std::vector<int64_t>{2 * 4 + 2}));
  EXPECT_EQ(table(*m, 2), (Pages{0, 2}));
  ASSERT_EQ(m->pending_copies().size(), 1u);
  EXPECT_EQ(m->pending_copies()[0], (PageCopy{1, 2}));
  EXPECT_EQ(m->stats().cow_copies, 1);
  m->clear_pending_copies();
  EXPECT_EQ(m->pending_copies().size(), 0u);

  // The parent now owns page 1 alone and writes in place.
  EXPECT_EQ(slots(value_or_fail(m->reserve(1, 1))), (std::vector<int64_t>{1 * 4 + 2}));
  EXPECT_EQ(m->pending_copies().size(), 0u);
  ASSERT_OK(m->commit(1, Tokens{1}));
  ASSERT_OK(m->commit(2, Tokens{2}));
  EXPECT_EQ(table(*m, 1), (Pages{0, 1}));
  EXPECT_EQ(m->stats().cow_copies, 1);
  EXPECT_OK(m->check_invariants());

  ASSERT_OK(m->free(1));
  ASSERT_OK(m->free(2));
  EXPECT_EQ(m->num_used_pages(), 0);
  EXPECT_OK(m->check_invariants());
}

TEST(BlockManager, ForkAtAPageBoundaryCopiesNothing) {
  auto m = make(options(8));
  prefill(*m, 1, tokens(8));
  ASSERT_OK(m->fork(1, 2));
  EXPECT_EQ(slots(value_or_fail(m->reserve(2, 1))), (std::vector<int64_t>{2 * 4}));
  EXPECT_EQ(slots(value_or_fail(m->reserve(1, 1))), (std::vector<int64_t>{3 * 4}));
  EXPECT_EQ(m->pending_copies().size(), 0u);
  EXPECT_OK(m->check_invariants());
}

TEST(BlockManager, ForkSharesOnlyTokensNotTheReservation) {
  auto m = make(options(8));
  prefill(*m, 1, tokens(5));
  ASSERT_OK(m->reserve(1, 6));  // pages {0, 1, 2}
  ASSERT_OK(m->fork(1, 2));
  EXPECT_EQ(table(*m, 2), (Pages{0, 1}));
  EXPECT_EQ(value_or_fail(m->num_reserved(2)), 0);
  // The parent commits into the page it shares; the child's tokens there are untouched slots.
  ASSERT_OK(m->commit(1, tokens(6, 500)));
  EXPECT_OK(m->check_invariants());
  // Page 1 is now full and cached, so the child copies it before writing.
  ASSERT_OK(m->reserve(2, 1));
  EXPECT_EQ(m->pending_copies().size(), 1u);
  EXPECT_EQ(m->pending_copies()[0].src, 1);
  EXPECT_OK(m->check_invariants());
}

TEST(BlockManager, PrefixHitReusesFullPagesAndLeavesTheLastTokenToCompute) {
  auto m = make(options(16));
  const Tokens prompt = tokens(10);
  EXPECT_EQ(prefill(*m, 1, prompt), 0);
  const Pages first = table(*m, 1);

  EXPECT_EQ(value_or_fail(m->match_prefix(prompt)), 8);
  EXPECT_EQ(value_or_fail(m->add(2, prompt)), 8);
  EXPECT_EQ(table(*m, 2), (Pages{first[0], first[1]}));
  EXPECT_EQ(value_or_fail(m->num_tokens(2)), 8);
  EXPECT_EQ(m->num_used_pages(), 3);
  EXPECT_OK(m->check_invariants());

  // Exactly two full pages cached: a prompt of 8 tokens takes only one (its last token is
  // recomputed); 9 tokens take both.
  EXPECT_EQ(value_or_fail(m->match_prefix(tokens(8))), 4);
  EXPECT_EQ(value_or_fail(m->match_prefix(tokens(9))), 8);
  EXPECT_EQ(value_or_fail(m->match_prefix(tokens(1))), 0);
  EXPECT_EQ(value_or_fail(m->match_prefix(Tokens{})), 0);
  // A different continuation shares the first page only.
  EXPECT_EQ(value_or_fail(m->match_prefix(concat(tokens(4), tokens(8, 7)))), 4);

  const BlockManagerStats& st = m->stats();
  EXPECT_EQ(st.prefix_queries, 2);
  EXPECT_EQ(st.prefix_hits, 1);
  EXPECT_EQ(st.prefix_tokens_queried, 20);
  EXPECT_EQ(st.prefix_tokens_hit, 8);
}

TEST(BlockManager, MatchPrefixTakesNoReferences) {
  auto m = make(options(16));
  prefill(*m, 1, tokens(9));
  ASSERT_OK(m->free(1));
  const Observed before = observe(*m, {});
  EXPECT_EQ(value_or_fail(m->match_prefix(tokens(9))), 8);
  EXPECT_EQ(observe(*m, {}), before);
}

TEST(BlockManager, CachedPagesWaitInLruAndAreEvictedLast) {
  auto m = make(options(4));
  prefill(*m, 1, tokens(9));  // pages 0, 1 full; 2 partial
  ASSERT_OK(m->free(1));
  EXPECT_EQ(m->num_evictable_pages(), 2);
  EXPECT_EQ(m->num_free_pages(), 2);
  EXPECT_TRUE(m->can_admit(16));

  // A hit revives LRU pages.
  EXPECT_EQ(value_or_fail(m->add(2, tokens(9))), 8);
  EXPECT_EQ(m->num_evictable_pages(), 0);
  ASSERT_OK(m->free(2));

  // A new sequence takes the free pages first, then evicts (the tail page first).
  ASSERT_OK(m->add(3, tokens(12, 900)));
  ASSERT_OK(m->reserve(3, 8));
  EXPECT_EQ(m->stats().evictions, 0);
  EXPECT_EQ(value_or_fail(m->match_prefix(tokens(9))), 8);
  ASSERT_OK(m->reserve(3, 12));
  EXPECT_EQ(m->stats().evictions, 1);
  EXPECT_EQ(m->num_cached_pages(), 1);
  EXPECT_EQ(value_or_fail(m->match_prefix(tokens(9))), 4);
  EXPECT_OK(m->check_invariants());
  EXPECT_TRUE(has_error(m->reserve(3, 20), Code::resource_exhausted, "expected at most 1"));
}

TEST(BlockManager, CanAdmitKeepsTheWatermarkBack) {
  BlockManagerOptions o = options(10);
  o.watermark_pages = 2;
  auto m = make(o);
  EXPECT_TRUE(m->can_admit(0));
  EXPECT_TRUE(m->can_admit(32));
  EXPECT_FALSE(m->can_admit(33));
  EXPECT_FALSE(m->can_admit(-1));
  prefill(*m, 1, tokens(8));
  EXPECT_TRUE(m->can_admit(24));
  EXPECT_FALSE(m->can_admit(25));
  ASSERT_OK(m->free(1));  // cached pages count as available
  EXPECT_TRUE(m->can_admit(32));
}

TEST(BlockManager, SaltsNeverShare) {
  auto m = make(options(32));
  const Tokens prompt = tokens(13);
  prefill(*m, 1, prompt, {"tenant-a", "", {}});
  EXPECT_EQ(value_or_fail(m->match_prefix(prompt, {"tenant-a", "", {}})), 12);
  EXPECT_EQ(value_or_fail(m->match_prefix(prompt, {"tenant-b", "", {}})), 0);
  EXPECT_EQ(value_or_fail(m->match_prefix(prompt, {"", "", {}})), 0);
  EXPECT_EQ(value_or_fail(m->add(2, prompt, {"tenant-a", "", {}})), 12);
  EXPECT_EQ(value_or_fail(m->add(3, prompt, {"tenant-b", "", {}})), 0);
  // Tenant b computes its own pages; the two never share one.
  ASSERT_OK(m->reserve(3, 13));
  ASSERT_OK(m->commit(3, prompt));
  const Pages a = table(*m, 2);
  const Pages b = table(*m, 3);
  for (PageId p : a) EXPECT_EQ(std::count(b.begin(), b.end(), p), 0) << "page " << p;
  EXPECT_EQ(value_or_fail(m->match_prefix(prompt, {"tenant-b", "", {}})), 12);
  EXPECT_OK(m->check_invariants());
}

TEST(BlockManager, ChangingAnyKeyFieldTurnsAHitIntoAMiss) {
  const Tokens prompt = tokens(13);
  const MultimodalSpan image[] = {{"img-sha-1", 2, 6}};
  const MultimodalSpan other_image[] = {{"img-sha-2", 2, 6}};
  const MultimodalSpan moved_image[] = {{"img-sha-1", 3, 7}};
  const KeyExtras base{"salt", "lora-7", image};
  Tokens first_token = prompt;
  first_token[0] = 1;
  Tokens last_full_page_token = prompt;
  last_full_page_token[11] = 1;

  struct Case {
    const char* name;
    Tokens prompt;
    KeyExtras extras;
    int64_t expected;
  };
  const Case cases[] = {
      {"same request", prompt, base, 12},
      {"salt", prompt, {"other", "lora-7", image}, 0},
      {"adapter", prompt, {"salt", "lora-8", image}, 0},
      {"no adapter", prompt, {"salt", "", image}, 0},
      {"multimodal hash", prompt, {"salt", "lora-7", other_image}, 0},
      {"multimodal position", prompt, {"salt", "lora-7", moved_image}, 0},
      {"no multimodal", prompt, {"salt", "lora-7", {}}, 0},
      {"first token", first_token, base, 0},
      {"a token of the last full page", last_full_page_token, base, 8},
  };
  auto m = make(options(32));
  prefill(*m, 1, prompt, base);
  SeqId next = 2;
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    EXPECT_EQ(value_or_fail(m->match_prefix(c.prompt, c.extras)), c.expected);
    EXPECT_EQ(value_or_fail(m->add(next++, c.prompt, c.extras)), c.expected);
    EXPECT_OK(m->check_invariants());
  }
}

TEST(BlockManager, FingerprintChangesEveryKey) {
  // A manager's fingerprint is fixed, so pages of different fingerprints meet only where keys
  // travel (a router, a remote tier): there every key differs.
  const Tokens prompt = tokens(12);
  const KeyHashFn hash = key_hash_fn(HashKind::sha256);
  const KeyFingerprint base = options(1).fingerprint;
  KeyFingerprint changed[4] = {base, base, base, base};
  changed[0].model_id = "other-model";
  changed[1].kv_dtype = "bf16";
  changed[2].page_size = 6;
  changed[3].layer_group = 1;
  std::vector<PageKey> want;
  ASSERT_OK(page_keys(hash, base, prompt, {}, &want));
  for (const KeyFingerprint& f : changed) {
    std::vector<PageKey> got;
    ASSERT_OK(page_keys(hash, f, prompt, {}, &got));
    for (size_t i = 0; i < std::min(got.size(), want.size()); ++i) EXPECT_NE(got[i], want[i]);
  }
}

TEST(BlockManager, MultimodalHitsNeedTheSameSpans) {
  auto m = make(options(32));
  const Tokens prompt = tokens(13);
  const MultimodalSpan image[] = {{"img", 5, 7}};  // page 1 only
  prefill(*m, 1, prompt, {"", "", image});
  // Page 0 has no image, so a request without it shares page 0 but not page 1.
  EXPECT_EQ(value_or_fail(m->match_prefix(prompt)), 4);
  EXPECT_EQ(value_or_fail(m->match_prefix(prompt, {"", "", image})), 12);
}

// Every key collides (or the key ignores the order of tokens): hits must be refused by
// verification.
TEST(BlockManager, KeyCollisionsAreRefusedByVerification) {
  struct Case {
    const char* name;
    KeyHashFn hash;
  };
  const Case cases[] = {
      {"constant", [](std::span<const uint8_t>) { return PageKey{}; }},
      // Blind to the order of bytes: a page with its tokens permuted collides.
      {"byte sum",
       [](std::span<const uint8_t> msg) {
         uint64_t sum = 0;
         for (uint8_t b : msg) sum += b;
         PageKey k;
         std::memcpy(k.bytes.data(), &sum, sizeof(sum));
         return k;
       }},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    BlockManagerOptions o = options(32);
    o.hash_override = c.hash;
    auto m = make(o);
    const Tokens x = tokens(9, 100);
    // x with each full page's tokens reversed.
    const Tokens y = {103, 102, 101, 100, 107, 106, 105, 104, 108};
    prefill(*m, 1, x);
    const Pages px = table(*m, 1);
    // y collides with x's cached pages: refused, nothing of x's handed out.
    EXPECT_EQ(value_or_fail(m->match_prefix(y)), 0);
    EXPECT_EQ(prefill(*m, 2, y), 0);
    const Pages py = table(*m, 2);
    for (PageId p : px) EXPECT_EQ(std::count(py.begin(), py.end(), p), 0) << "page " << p;
    // x itself still hits its verified first page.
    EXPECT_GE(value_or_fail(m->match_prefix(x)), 4);
    // Different salt, same tokens, colliding keys: refused.
    EXPECT_EQ(value_or_fail(m->match_prefix(x, {"tenant", "", {}})), 0);
    EXPECT_OK(m->check_invariants());
    // Once x is gone its colliding pages are replaced by y's: y hits, x misses.
    ASSERT_OK(m->free(1));
    ASSERT_OK(m->free(2));
    EXPECT_EQ(prefill(*m, 3, y), 0);  // y's own pages were private, never cached
    EXPECT_GE(value_or_fail(m->match_prefix(y)), 4);
    EXPECT_EQ(value_or_fail(m->match_prefix(x)), 0);
    EXPECT_GE(m->stats().evictions, 1);
    EXPECT_OK(m->check_invariants());
  }
}

TEST(BlockManager, IdenticalPagesComputedTwiceAreCachedOnce) {
  auto m = make(options(16));
  const Tokens prompt = tokens(9);
  ASSERT_OK(m->add(1, prompt));
  ASSERT_OK(m->add(2, prompt));  // before 1 committed: no hit
  for (SeqId s : {1, 2}) {
    ASSERT_OK(m->reserve(s, 9));
    ASSERT_OK(m->commit(s, prompt));
  }
  EXPECT_EQ(m->num_cached_pages(), 2);
  EXPECT_EQ(m->stats().duplicate_pages, 2);
  EXPECT_OK(m->check_invariants());
  ASSERT_OK(m->free(1));
  EXPECT_EQ(value_or_fail(m->match_prefix(prompt)), 8);
  // Sequence 2's duplicates chain from the cached pages: its next full page is a hit too.
  ASSERT_OK(m->reserve(2, 3));
  ASSERT_OK(m->commit(2, Tokens{1, 2, 3}));
  EXPECT_EQ(value_or_fail(m->match_prefix(concat(prompt, Tokens{1, 2, 3, 4}))), 12);
  ASSERT_OK(m->free(2));
  EXPECT_EQ(m->num_used_pages(), 0);
  EXPECT_EQ(m->num_evictable_pages(), 3);
  EXPECT_OK(m->check_invariants());
}

TEST(BlockManager, TruncateReleasesPagesAndCopiesAKeptCachedPage) {
  auto m = make(options(16));
  prefill(*m, 1, tokens(10));  // pages 0, 1 full and cached; 2 partial
  ASSERT_OK(m->reserve(1, 4));
  ASSERT_OK(m->truncate(1, 6));
  EXPECT_EQ(table(*m, 1), (Pages{0, 1}));
  EXPECT_EQ(value_or_fail(m->num_tokens(1)), 6);
  EXPECT_EQ(value_or_fail(m->num_reserved(1)), 0);
  EXPECT_EQ(m->num_cached_pages(), 2);  // page 1 stays cached: its full contents are intact
  EXPECT_OK(m->check_invariants());
  // Writing into the kept part of cached page 1 copies it first.
  EXPECT_EQ(slots(value_or_fail(m->reserve(1, 1))), (std::vector<int64_t>{2 * 4 + 2}));
  ASSERT_EQ(m->pending_copies().size(), 1u);
  EXPECT_EQ(m->pending_copies()[0], (PageCopy{1, 2}));
  EXPECT_EQ(m->num_evictable_pages(), 1);  // page 1, now unused
  EXPECT_EQ(value_or_fail(m->match_prefix(tokens(10))), 8);
  ASSERT_OK(m->commit(1, Tokens{42}));
  EXPECT_OK(m->check_invariants());

  ASSERT_OK(m->truncate(1, 0));
  EXPECT_EQ(table(*m, 1), Pages{});
  EXPECT_EQ(m->num_used_pages(), 0);
  EXPECT_OK(m->check_invariants());
}

TEST(BlockManager, PrefixCachingOffNeverHits) {
  BlockManagerOptions o = options(16);
  o.enable_prefix_caching = false;
  auto m = make(o);
  prefill(*m, 1, tokens(9));
  EXPECT_EQ(m->num_cached_pages(), 0);
  EXPECT_EQ(value_or_fail(m->match_prefix(tokens(9))), 0);
  EXPECT_EQ(value_or_fail(m->add(2, tokens(9))), 0);
  EXPECT_EQ(m->stats().prefix_queries, 0);
  ASSERT_OK(m->free(1));
  EXPECT_EQ(m->num_free_pages(), 16);
  EXPECT_OK(m->check_invariants());
}

TEST(BlockManager, XxhKeysWorkToo) {
  BlockManagerOptions o = options(16);
  o.hash_kind = HashKind::xxh3_128;
  auto m = make(o);
  prefill(*m, 1, tokens(9));
  EXPECT_EQ(value_or_fail(m->add(2, tokens(9))), 8);
  EXPECT_OK(m->check_invariants());
}

// --- events ---

using KeyBytes = std::array<uint8_t, 32>;

// Replays events onto `cached` (key -> parent), failing on an event that contradicts it.
void replay(std::span<const PageEvent> events, std::map<KeyBytes, KeyBytes>* cached) {
  for (const PageEvent& e : events) {
    if (e.kind == PageEventKind::cached) {
      EXPECT_TRUE(cached->emplace(e.key.bytes, e.parent.bytes).second) << "cached twice";
    } else {
      const auto it = cached->find(e.key.bytes);
      ASSERT_NE(it, cached->end()) << "evicted, never cached";
      EXPECT_EQ(it->second, e.parent.bytes);
      cached->erase(it);
    }
  }
}

void expect_replay_matches(const BlockManager& m, const std::map<KeyBytes, KeyBytes>& cached) {
  EXPECT_EQ(static_cast<int64_t>(cached.size()), m.num_cached_pages());
  for (const auto& [key, parent] : cached) {
    PageKey k;
    k.bytes = key;
    EXPECT_TRUE(m.is_cached(k)) << k.hex();
  }
}

TEST(BlockManager, EventsReportPagesCachedAndEvicted) {
  BlockManagerOptions o = options(4);
  o.fingerprint.layer_group = 3;
  o.record_events = true;
  auto m = make(o);
  EXPECT_STREQ(name(PageEventKind::cached), "cached");
  EXPECT_STREQ(name(PageEventKind::evicted), "evicted");
  const KeyHashFn hash = key_hash_fn(HashKind::sha256);
  const KeyExtras salted{"tenant", "", {}};
  const Tokens prompt = tokens(9);
  std::vector<PageKey> keys;
  ASSERT_OK(page_keys(hash, o.fingerprint, prompt, salted, &keys));
  ASSERT_EQ(keys.size(), 2u);
  const PageKey root = root_key(hash, o.fingerprint, salted.salt);

  prefill(*m, 1, prompt, salted);
  ASSERT_EQ(m->events().size(), 2u);
  EXPECT_EQ(m->events()[0], (PageEvent{PageEventKind::cached, keys[0], root, 4, 3}));
  EXPECT_EQ(m->events()[1], (PageEvent{PageEventKind::cached, keys[1], keys[0], 4, 3}));
  EXPECT_TRUE(m->is_cached(keys[0]));
  EXPECT_TRUE(m->is_cached(keys[1]));
  EXPECT_FALSE(m->is_cached(root));
  std::map<KeyBytes, KeyBytes> cached;
  replay(m->events(), &cached);
  m->clear_events();
  EXPECT_EQ(m->events().size(), 0u);

  // A hit, a free and a partial page emit nothing: no key enters or leaves the index.
  EXPECT_EQ(value_or_fail(m->add(2, prompt, salted)), 8);
  ASSERT_OK(m->free(2));
  ASSERT_OK(m->free(1));
  EXPECT_EQ(m->events().size(), 0u);

  // Two free pages, two evictable: the third and fourth new pages evict, the tail page first.
  ASSERT_OK(m->add(3, tokens(16, 900)));
  ASSERT_OK(m->reserve(3, 16));
  ASSERT_EQ(m->events().size(), 2u);
  EXPECT_EQ(m->events()[0], (PageEvent{PageEventKind::evicted, keys[1], keys[0], 4, 3}));
  EXPECT_EQ(m->events()[1], (PageEvent{PageEventKind::evicted, keys[0], root, 4, 3}));
  EXPECT_FALSE(m->is_cached(keys[0]));
  EXPECT_EQ(m->stats().evictions, 2);
  replay(m->events(), &cached);
  m->clear_events();
  EXPECT_TRUE(cached.empty());

  ASSERT_OK(m->commit(3, tokens(16, 900)));
  EXPECT_EQ(m->events().size(), 4u);
  replay(m->events(), &cached);
  expect_replay_matches(*m, cached);
  EXPECT_OK(m->check_invariants());
}

TEST(BlockManager, EventsAreOffByDefault) {
  auto m = make(options(4));
  prefill(*m, 1, tokens(9));
  EXPECT_EQ(m->num_cached_pages(), 2);
  EXPECT_EQ(m->events().size(), 0u);
}

// With colliding keys a replaced page is evicted and its key cached again for the new contents;
// replaying the stream still gives exactly the cached keys.
TEST(BlockManager, EventsStayConsistentThroughCollisions) {
  BlockManagerOptions o = options(8);
  o.hash_override = [](std::span<const uint8_t>) { return PageKey{}; };
  o.record_events = true;
  auto m = make(o);
  std::map<KeyBytes, KeyBytes> cached;
  prefill(*m, 1, tokens(5, 100));
  prefill(*m, 2, tokens(5, 200));  // collides with 1's page, which is in use: stays private
  replay(m->events(), &cached);
  expect_replay_matches(*m, cached);
  EXPECT_EQ(m->events().size(), 1u);
  m->clear_events();
  ASSERT_OK(m->free(1));
  ASSERT_OK(m->free(2));
  prefill(*m, 3, tokens(5, 300));  // replaces 1's unused page
  ASSERT_EQ(m->events().size(), 2u);
  EXPECT_EQ(m->events()[0].kind, PageEventKind::evicted);
  EXPECT_EQ(m->events()[1].kind, PageEventKind::cached);
  replay(m->events(), &cached);
  expect_replay_matches(*m, cached);
  EXPECT_EQ(m->stats().evictions, 1);
}

// --- keys given by the caller ---

TEST(BlockManager, GivenKeysHitExactlyLikeComputedOnes) {
  auto m = make(options(32));
  const MultimodalSpan image[] = {{"img", 5, 7}};
  const KeyExtras extras[] = {{}, {"tenant", "lora", image}};
  const KeyHashFn hash = key_hash_fn(HashKind::sha256);
  const KeyFingerprint fp = options(32).fingerprint;
  prefill(*m, 1, tokens(13), extras[1]);
  prefill(*m, 2, tokens(10));
  const Tokens prompts[] = {tokens(13), tokens(12), tokens(9),
                            tokens(3),  Tokens{},   concat(tokens(4), tokens(9, 7)),
                            tokens(17)};
  SeqId next = 10;
  for (const KeyExtras& e : extras) {
    for (const Tokens& p : prompts) {
      SCOPED_TRACE(::testing::Message() << p.size() << " tokens, salt " << e.salt);
      std::vector<PageKey> keys;
      ASSERT_OK(page_keys(hash, fp, p, e, &keys));
      const int64_t want = value_or_fail(m->match_prefix(p, e));
      EXPECT_EQ(value_or_fail(m->match_prefix(p, keys, e)), want);
      // add() with keys takes the same pages as add() without.
      const SeqId a = next++;
      const SeqId b = next++;
      EXPECT_EQ(value_or_fail(m->add(a, p, keys, e)), want);
      EXPECT_EQ(value_or_fail(m->add(b, p, e)), want);
      EXPECT_EQ(table(*m, a), table(*m, b));
      ASSERT_OK(m->free(a));
      ASSERT_OK(m->free(b));
      EXPECT_OK(m->check_invariants());
    }
  }
  const BlockManagerStats& st = m->stats();
  EXPECT_EQ(st.prefix_queries, 2 + 2 * 2 * 7);
}

TEST(BlockManager, WrongKeysOnlyCauseMisses) {
  auto m = make(options(32));
  const KeyHashFn hash = key_hash_fn(HashKind::sha256);
  const KeyFingerprint fp = options(32).fingerprint;
  const Tokens prompt = tokens(13);
  prefill(*m, 1, prompt, {"a", "", {}});
  prefill(*m, 2, tokens(13, 500), {"a", "", {}});
  std::vector<PageKey> right;
  ASSERT_OK(page_keys(hash, fp, prompt, {"a", "", {}}, &right));
  std::vector<PageKey> other_salt;
  ASSERT_OK(page_keys(hash, fp, prompt, {"b", "", {}}, &other_salt));
  std::vector<PageKey> other_tokens;  // keys of cached pages holding other tokens
  ASSERT_OK(page_keys(hash, fp, tokens(13, 500), {"a", "", {}}, &other_tokens));
  std::vector<PageKey> second_wrong = right;
  second_wrong[1] = other_tokens[1];

  EXPECT_EQ(value_or_fail(m->match_prefix(prompt, right, {"a", "", {}})), 12);
  // Keys of the right tokens under another salt: not in the index.
  EXPECT_EQ(value_or_fail(m->match_prefix(prompt, other_salt, {"a", "", {}})), 0);
  // The right keys with the wrong salt: found, refused by verification.
  EXPECT_EQ(value_or_fail(m->match_prefix(prompt, right, {"b", "", {}})), 0);
  // Keys of cached pages with other tokens: found, refused.
  EXPECT_EQ(value_or_fail(m->match_prefix(prompt, other_tokens, {"a", "", {}})), 0);
  EXPECT_EQ(value_or_fail(m->match_prefix(prompt, second_wrong, {"a", "", {}})), 4);
  const Pages mine = table(*m, 1);
  const Pages others = table(*m, 2);
  EXPECT_EQ(value_or_fail(m->add(3, prompt, other_tokens, {"a", "", {}})), 0);
  EXPECT_EQ(value_or_fail(m->add(4, prompt, second_wrong, {"a", "", {}})), 4);
  EXPECT_EQ(table(*m, 4), (Pages{mine[0]}));
  for (PageId p : others) EXPECT_NE(p, mine[0]);
  EXPECT_OK(m->check_invariants());
  // The sequence added with partly wrong keys keys its own pages correctly.
  ASSERT_OK(m->reserve(4, 9));
  ASSERT_OK(m->commit(4, std::span<const int32_t>(prompt).subspan(4)));
  EXPECT_NE(table(*m, 4)[1], mine[1]);  // computed itself: a duplicate of 1's cached page
  EXPECT_EQ(m->stats().duplicate_pages, 2);
  EXPECT_OK(m->check_invariants());
}

TEST(BlockManager, GivenKeysWithPrefixCachingOff) {
  BlockManagerOptions o = options(8);
  o.enable_prefix_caching = false;
  auto m = make(o);
  const std::vector<PageKey> keys(2);
  EXPECT_EQ(value_or_fail(m->match_prefix(tokens(9), keys, {})), 0);
  EXPECT_EQ(value_or_fail(m->add(1, tokens(9), keys, {})), 0);
  EXPECT_TRUE(has_error(m->add(2, tokens(9), std::span<const PageKey>(keys).first(1), {}),
                        Code::invalid_argument, "keys has 1 entries"));
  EXPECT_FALSE(m->is_cached(PageKey{}));
}

// --- stats ---

TEST(BlockManager, HitRatesCountQueriesAndTokens) {
  auto m = make(options(16));
  EXPECT_EQ(m->stats().prefix_hit_rate(), 0.0);
  EXPECT_EQ(m->stats().prefix_query_hit_rate(), 0.0);
  prefill(*m, 1, tokens(9));                              // 9 tokens queried, 0 hit
  ASSERT_OK(m->add(2, tokens(9)));                        // 9 queried, 8 hit
  ASSERT_OK(m->add(3, concat(tokens(4), tokens(2, 7))));  // 6 queried, 4 hit
  const BlockManagerStats& st = m->stats();
  EXPECT_EQ(st.prefix_queries, 3);
  EXPECT_EQ(st.prefix_hits, 2);
  EXPECT_DOUBLE_EQ(st.prefix_hit_rate(), 12.0 / 24.0);
  EXPECT_DOUBLE_EQ(st.prefix_query_hit_rate(), 2.0 / 3.0);
}

// --- preemption ---

// Pages shared by fork and by prefix hits, cached and private pages, a reservation and evictable
// pages: built the same way each time it is called.
std::unique_ptr<BlockManager> preemption_scenario() {
  auto m = make(options(16));
  prefill(*m, 1, tokens(10));                                      // 2 cached pages + a partial one
  EXPECT_EQ(prefill(*m, 2, concat(tokens(8), tokens(3, 50))), 8);  // shares 1's full pages
  EXPECT_OK(m->fork(1, 3));                                        // shares all 3 of 1's pages
  prefill(*m, 4, tokens(6, 500));
  EXPECT_OK(m->reserve(4, 3));  // a page holding only reserved slots
  prefill(*m, 5, tokens(3, 900));
  prefill(*m, 6, tokens(8, 700));
  EXPECT_OK(m->free(6));  // 2 evictable pages
  EXPECT_OK(m->check_invariants());
  return m;
}

TEST(BlockManager, PlanPreemptionMatchesActuallyFreeing) {
  const std::vector<std::vector<SeqId>> orders = {
      {1, 2, 3, 4, 5}, {5, 4, 3, 2, 1}, {3, 1}, {1, 3}, {2, 3, 1}, {4}, {}, {3, 5, 2, 1, 4}};
  int64_t num_empty = 0;
  int64_t num_exhausted = 0;
  int64_t num_partial = 0;
  for (const std::vector<SeqId>& order : orders) {
    SCOPED_TRACE(::testing::Message()
                 << "order of " << order.size() << " starting " << (order.empty() ? -1 : order[0]));
    // Pages available after freeing the first k victims, on a copy of the scenario.
    std::vector<int64_t> available;
    {
      auto copy = preemption_scenario();
      available.push_back(copy->num_free_pages() + copy->num_evictable_pages());
      for (SeqId v : order) {
        ASSERT_OK(copy->free(v));
        available.push_back(copy->num_free_pages() + copy->num_evictable_pages());
      }
    }
    auto m = preemption_scenario();
    const Observed before = observe(*m, {1, 2, 3, 4, 5});
    for (int64_t need = 0; need <= 17; ++need) {
      SCOPED_TRACE("need " + std::to_string(need));
      const auto plan = m->plan_preemption(need, order);
      const auto enough =
          std::find_if(available.begin(), available.end(), [&](int64_t a) { return a >= need; });
      if (enough == available.end()) {
        EXPECT_TRUE(has_error(plan, Code::resource_exhausted,
                              "leaves " + std::to_string(available.back()) + " pages available"));
        ++num_exhausted;
        continue;
      }
      const size_t k = static_cast<size_t>(enough - available.begin());
      EXPECT_EQ(value_or_fail(plan), std::vector<SeqId>(order.begin(), order.begin() + k));
      ++(k == 0 ? num_empty : num_partial);
    }
    EXPECT_EQ(observe(*m, {1, 2, 3, 4, 5}), before);
    EXPECT_OK(m->check_invariants());
  }
  EXPECT_GT(num_empty, 0);
  EXPECT_GT(num_exhausted, 0);
  EXPECT_GT(num_partial, 0);
  // Freeing 3 alone releases nothing (1 holds all its pages); 1 then 3 release 1's partial page
  // and make both full pages evictable (2 still holds them: no).
  auto m = preemption_scenario();
  const int64_t base = m->num_free_pages() + m->num_evictable_pages();
  const SeqId only3[] = {3};
  EXPECT_TRUE(has_error(m->plan_preemption(base + 1, only3), Code::resource_exhausted,
                        "leaves " + std::to_string(base) + " pages"));
  const SeqId three_then_one[] = {3, 1};
  EXPECT_EQ(value_or_fail(m->plan_preemption(base + 1, three_then_one)),
            (std::vector<SeqId>{3, 1}));
  EXPECT_TRUE(has_error(m->plan_preemption(base + 2, three_then_one), Code::resource_exhausted,
                        "leaves " + std::to_string(base + 1) + " pages"));
}

// --- hybrid layer groups ---

BlockManagerOptions hybrid(std::vector<LayerGroupSpec> groups, int64_t page_size = 4) {
  BlockManagerOptions o = options(1, page_size);
  o.groups = std::move(groups);
  return o;
}

Pages table(const BlockManager& m, SeqId seq, int64_t group) {
  const auto t = value_or_fail(m.page_table(seq, group));
  return Pages(t.begin(), t.end());
}

TEST(BlockManagerHybrid, SlidingWindowReleasesPagesOutOfTheWindow) {
  constexpr int64_t kWindow = 8;
  auto m =
      make(hybrid({{LayerGroupKind::full, 32, 0}, {LayerGroupKind::sliding_window, 32, kWindow}}));
  ASSERT_EQ(m->num_groups(), 2);
  const Tokens t = tokens(40);
  ASSERT_OK(m->add(1, {}));
  for (int64_t len = 1; len <= 40; ++len) {
    ASSERT_OK(m->reserve(1, 1));
    ASSERT_OK(m->commit(1, std::span<const int32_t>(t).subspan(static_cast<size_t>(len - 1), 1)));
    ASSERT_OK(m->check_invariants());
    const Pages full = table(*m, 1, 0);
    const Pages window = table(*m, 1, 1);
    ASSERT_EQ(full.size(), window.size());
    const int64_t released = std::max<int64_t>(0, len - kWindow) / 4;
    int64_t held = 0;
    for (size_t j = 0; j < window.size(); ++j) {
      if (static_cast<int64_t>(j) < released) {
        EXPECT_EQ(window[j], kNullPage) << "len " << len << " page " << j;
      } else {
        EXPECT_NE(window[j], kNullPage) << "len " << len << " page " << j;
        ++held;
      }
    }
    EXPECT_LE(held, kWindow / 4 + 1);
    EXPECT_EQ(m->num_used_pages(1), held);
    EXPECT_EQ(m->num_used_pages(0), static_cast<int64_t>(full.size()));
  }
  // Released full pages stay cached (evictable), so a prefix hit still finds them.
  ASSERT_OK(m->free(1));
  const Tokens prompt = concat(t, tokens(3, 900));
  EXPECT_EQ(value_or_fail(m->add(2, prompt)), 40);
  const Pages window = table(*m, 2, 1);
  ASSERT_EQ(window.size(), 10u);
  for (size_t j = 0; j < 8; ++j) EXPECT_EQ(window[j], kNullPage);
  EXPECT_NE(window[8], kNullPage);
  EXPECT_NE(window[9], kNullPage);
  EXPECT_EQ(m->num_used_pages(1), 2);
  ASSERT_OK(m->check_invariants());

  // Truncating below the held window is refused and changes nothing.
  const Pages before = table(*m, 2, 1);
  EXPECT_TRUE(has_error(m->truncate(2, 20), Code::invalid_argument, "expected n >= 40"));
  EXPECT_EQ(table(*m, 2, 1), before);
  EXPECT_EQ(value_or_fail(m->num_tokens(2)), 40);
  EXPECT_OK(m->truncate(2, 40));
  ASSERT_OK(m->check_invariants());
}

// A toy recurrent model: a state is a running hash of the tokens, kept per slot.
constexpr uint64_t kInitialState = 0x9e3779b97f4a7c15ULL;
uint64_t step_state(uint64_t state, int32_t token) {
  return (state ^ static_cast<uint64_t>(token)) * 0x100000001b3ULL + 7;
}
uint64_t recompute(std::span<const int32_t> tokens) {
  uint64_t s = kInitialState;
  for (int32_t t : tokens) s = step_state(s, t);
  return s;
}

struct ToyStates {
  std::vector<uint64_t> state;
  explicit ToyStates(size_t n) : state(n, 0) {}
  void apply(BlockManager& m) {
    for (const StateCopy& c : m.pending_state_copies()) {
      state[static_cast<size_t>(c.dst)] =
          c.src == kNoStateSlot ? kInitialState : state[static_cast<size_t>(c.src)];
    }
    m.clear_pending_state_copies();
  }
  // reserve, run the model over `t` (updating the live state), commit, apply the checkpoints.
  void run(BlockManager& m, SeqId seq, std::span<const int32_t> t) {
    ASSERT_OK(m.reserve(seq, static_cast<int64_t>(t.size())));
    uint64_t& s = state[static_cast<size_t>(value_or_fail(m.state_slot(seq, 1)))];
    for (int32_t tok : t) s = step_state(s, tok);
    ASSERT_OK(m.commit(seq, t));
    apply(m);
    ASSERT_OK(m.check_invariants());
  }
  uint64_t live(const BlockManager& m, SeqId seq) const {
    return state[static_cast<size_t>(value_or_fail(m.state_slot(seq, 1)))];
  }
};

TEST(BlockManagerHybrid, RecurrentCheckpointRestoresTheRecomputedState) {
  constexpr int64_t kSlots = 8;
  auto m = make(hybrid({{LayerGroupKind::full, 32, 0}, {LayerGroupKind::recurrent, kSlots, 0}}));
  ToyStates toy(kSlots);
  const Tokens a = tokens(12, 500);
  ASSERT_EQ(value_or_fail(m->add(1, {})), 0);
  toy.apply(*m);
  EXPECT_TRUE(m->page_table(1, 1).ok() && value_or_fail(m->page_table(1, 1)).empty());
  for (size_t i = 0; i < a.size(); i += 4)
    toy.run(*m, 1, std::span<const int32_t>(a).subspan(i, 4));
  EXPECT_EQ(toy.live(*m, 1), recompute(a));
  EXPECT_EQ(m->num_cached_pages(1), 3);  // checkpoints at 4, 8 and 12 tokens
  ASSERT_OK(m->free(1));

  const Tokens prompt = concat(a, tokens(3, 700));
  EXPECT_EQ(value_or_fail(m->match_prefix(prompt)), 12);
  ASSERT_EQ(value_or_fail(m->add(2, prompt)), 12);
  toy.apply(*m);
  EXPECT_EQ(toy.live(*m, 2), recompute(std::span<const int32_t>(prompt).first(12)));
  toy.run(*m, 2, std::span<const int32_t>(prompt).subspan(12));
  EXPECT_EQ(toy.live(*m, 2), recompute(prompt));

  // A fork copies the live state.
  ASSERT_OK(m->fork(2, 3));
  toy.apply(*m);
  EXPECT_EQ(toy.live(*m, 3), recompute(prompt));
  EXPECT_NE(value_or_fail(m->state_slot(3, 1)), value_or_fail(m->state_slot(2, 1)));
  EXPECT_TRUE(has_error(m->truncate(3, 4), Code::invalid_argument, "cannot roll back"));
  EXPECT_TRUE(has_error(m->state_slot(3, 0), Code::invalid_argument, "expected a recurrent"));
  EXPECT_TRUE(has_error(m->page_table(3, 2), Code::invalid_argument, "expected 0 <= group < 2"));
  ASSERT_OK(m->check_invariants());
}

TEST(BlockManagerHybrid, NoHitAtABoundaryWithoutACheckpoint) {
  auto m = make(hybrid({{LayerGroupKind::full, 32, 0}, {LayerGroupKind::recurrent, 3, 0}}));
  ToyStates toy(3);
  // One commit across two boundaries leaves a checkpoint only at its end (8).
  const Tokens b = tokens(10, 300);
  ASSERT_OK(m->add(1, {}));
  toy.apply(*m);
  toy.run(*m, 1, std::span<const int32_t>(b).first(8));
  toy.run(*m, 1, std::span<const int32_t>(b).subspan(8));
  EXPECT_EQ(value_or_fail(m->match_prefix(std::span<const int32_t>(b).first(7))), 0);
  EXPECT_EQ(value_or_fail(m->match_prefix(b)), 8);
  ASSERT_OK(m->free(1));

  // Checkpoints at 4, 8, 12 with 3 slots (one live): 12's evicts 4's.
  const Tokens a = tokens(16, 500);
  ASSERT_OK(m->add(2, {}));
  toy.apply(*m);
  for (size_t i = 0; i < 12; i += 4) toy.run(*m, 2, std::span<const int32_t>(a).subspan(i, 4));
  ASSERT_OK(m->free(2));
  const auto first = [&](size_t n) { return std::span<const int32_t>(a).first(n); };
  EXPECT_EQ(value_or_fail(m->match_prefix(first(7))), 0);  // the full group alone would hit 4
  EXPECT_EQ(value_or_fail(m->match_prefix(first(11))), 8);
  EXPECT_EQ(value_or_fail(m->match_prefix(first(13))), 12);
  ASSERT_EQ(value_or_fail(m->add(3, first(11))), 8);
  toy.apply(*m);
  EXPECT_EQ(toy.live(*m, 3), recompute(first(8)));
  ASSERT_OK(m->check_invariants());
}

TEST(BlockManagerHybrid, OutOfStateSlotsIsRefusedAndChangesNothing) {
  auto m = make(hybrid({{LayerGroupKind::full, 8, 0}, {LayerGroupKind::recurrent, 1, 0}}));
  ASSERT_OK(m->add(1, tokens(3)));
  const size_t copies = m->pending_state_copies().size();
  const int64_t used0 = m->num_used_pages(0);
  EXPECT_FALSE(m->can_admit(1));
  EXPECT_TRUE(has_error(m->add(2, tokens(3)), Code::resource_exhausted, "no state slot"));
  EXPECT_TRUE(has_error(m->fork(1, 3), Code::resource_exhausted, "no state slot"));
  EXPECT_FALSE(m->contains(2));
  EXPECT_FALSE(m->contains(3));
  EXPECT_EQ(m->pending_state_copies().size(), copies);
  EXPECT_EQ(m->num_used_pages(0), used0);
  EXPECT_EQ(m->stats().prefix_queries, 1);
  ASSERT_OK(m->check_invariants());
}

TEST(BlockManagerHybrid, CreateRefusesBadGroups) {
  EXPECT_TRUE(has_error(BlockManager::create(hybrid({{LayerGroupKind::full, 0, 0}})),
                        Code::invalid_argument, "groups[0].num_pages is 0"));
  EXPECT_TRUE(has_error(BlockManager::create(hybrid({{LayerGroupKind::full, 4, 0},
                                                     {LayerGroupKind::sliding_window, 4, 0}})),
                        Code::invalid_argument, "groups[1].window is 0"));
}

}  // namespace
}  // namespace kvcache
