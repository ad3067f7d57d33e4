// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// BlockManager: which page of a paged KV pool holds each token of each sequence. Metadata only
// (page ids, refcounts, token ids, prefix keys); the K/V bytes live in pools the ops read and
// write. Slot s of the pool is token s % page_size of page s / page_size.
//
// A sequence (a SeqId the caller picks) owns one reference to each page of its page table.
// Pages are shared between sequences by fork() (copy-on-write) and by prefix caching: every page
// that fills up gets a key (include/kvcache/page_key.h) and enters a prefix index, and add()
// reuses the longest run of cached full pages that matches the prompt. A hit is verified against
// the page's stored token ids, tenant salt, adapter, multimodal spans and parent page, so a key
// collision never hands out another request's K/V. Cached pages are never written: a sequence
// that must write into a shared or cached page gets a copy (a PageCopy the caller applies with
// copy_pages before this step's writes). Cached pages nobody uses wait in an LRU and are evicted
// only when no free page is left.
//
// Per step the caller: reserve(seq, n) -> slots for the next n tokens; applies
// pending_copies() in order and clear_pending_copies(); runs the model writing K/V to the slots;
// commit(seq, token ids).
//
// For a router (with record_events): every page that enters the prefix index or leaves it appends
// a PageEvent; replaying cached/evicted in order gives exactly the keys cached now. Drain with
// events() and clear_events(). A caller that already has a prompt's page_keys() (a router or the
// scheduler computed them once) passes them to add() / match_prefix() to skip hashing; hits are
// verified either way. plan_preemption() tells the scheduler which sequences to free when the pool
// runs dry.
//
// Hybrid models (BlockManagerOptions::groups): one manager, several layer groups, each with its
// own pool and LayerGroupSpec. All groups see the same tokens and share one key chain (the keys of
// fingerprint, as without groups); each group keeps its own prefix index, and its events carry
// layer_group = fingerprint.layer_group + the group's index.
//  - full: as described above.
//  - sliding_window: a page wholly before [num_tokens - window, num_tokens) is released at commit
//    (its page-table entry becomes kNullPage), so a sequence holds ~window / page_size + 1 pages.
//    A prefix hit needs the group's whole verified chain of pages up to the boundary still cached
//    (the simple rule), but references only the pages inside the window ending at the boundary.
//  - recurrent: no pages; one live state slot per sequence (state_slot()). When a commit ends on a
//    page boundary, the live state is checkpointed into another slot keyed by that boundary's key
//    (with the whole prefix's tokens and extras kept to verify hits). Checkpoints nobody restores
//    wait in the group's LRU and are evicted like cached pages; a hit is taken only at a boundary
//    with a verified checkpoint, so a commit that crosses a boundary without ending there leaves
//    no checkpoint for it. State slots are copied by the caller: pending_state_copies().
// The prefix hit of a request is the longest boundary every group can serve. Calls without a group
// argument (page_table(), reserve()'s slots, the page counts) are about group 0.
//
// A BlockManager is not thread-safe; one scheduler thread owns it (const methods included).
// Refusals return a Status and change nothing.

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "kvcache/export.h"
#include "kvcache/page_key.h"
#include "kvcache/status.h"

namespace kvcache {

using SeqId = int64_t;
using PageId = int32_t;
using StateSlot = int32_t;  // a recurrent group's state slot

// A sliding-window page table's entry for a page that fell out of the window.
inline constexpr PageId kNullPage = -1;
// StateCopy::src meaning "reset dst to the model's initial state".
inline constexpr StateSlot kNoStateSlot = -1;

enum class LayerGroupKind : uint8_t { full, sliding_window, recurrent };
// "full", "sliding_window", "recurrent".
[[nodiscard]] KVCACHE_API const char* name(LayerGroupKind kind);

// One layer group of a hybrid model. Intentionally copyable.
struct LayerGroupSpec {
  LayerGroupKind kind = LayerGroupKind::full;
  int64_t num_pages = 0;  // pages in the group's pool; state slots for recurrent; >= 1
  int64_t window = 0;     // sliding_window only: tokens a query sees, >= 1
};

struct BlockManagerOptions {
  // --- affects behaviour ---
  int64_t num_pages = 0;        // pages in the pool, >= 1
  int64_t page_size = 16;       // tokens per page, >= 1; must equal fingerprint.page_size
  int64_t watermark_pages = 0;  // pages can_admit() keeps back for running sequences to grow
  bool enable_prefix_caching = true;
  bool record_events = false;  // queue a PageEvent per page cached / evicted (for a router)
  HashKind hash_kind = HashKind::sha256;
  KeyFingerprint fingerprint;  // model/layout identity at the root of every key chain
  KeyHashFn hash_override;     // replaces hash_kind's function when set (tests inject weak ones)
  // Empty: one full-attention group of num_pages pages. Else the groups (num_pages is ignored).
  std::vector<LayerGroupSpec> groups;
  // --- affects performance ---
  int64_t max_pages_per_seq_hint = 64;  // page-table capacity reserved per sequence at add()
};

// One page to copy before this step's writes: all page_size slots of src to dst, in the pool of
// layer group `group` (0 without groups).
struct PageCopy {
  PageId src = 0;
  PageId dst = 0;
  int32_t group = 0;
  friend bool operator==(const PageCopy&, const PageCopy&) = default;
};

// One state slot to copy (or, with src == kNoStateSlot, to reset) before the model next reads or
// writes dst. Emitted by add() (restore a checkpoint or reset the new live slot), fork() (parent's
// live slot to the child's) and commit() (live slot to a new checkpoint, after the model has
// consumed the committed tokens). Apply in order, in the state pool of recurrent group `group`.
struct StateCopy {
  StateSlot src = kNoStateSlot;
  StateSlot dst = 0;
  int32_t group = 0;
  friend bool operator==(const StateCopy&, const StateCopy&) = default;
};

// A page entered the prefix index (cached) or its key was dropped (evicted).
enum class PageEventKind : uint8_t { cached, evicted };
// "cached", "evicted".
[[nodiscard]] KVCACHE_API const char* name(PageEventKind kind);

// What a router needs to track which prefixes this instance holds. Intentionally copyable.
struct PageEvent {
  PageEventKind kind = PageEventKind::cached;
  PageKey key;
  PageKey parent;           // the previous page's key; the chain root for a sequence's first page
  int64_t num_tokens = 0;   // tokens the page holds (page_size)
  int64_t layer_group = 0;  // fingerprint.layer_group
  friend bool operator==(const PageEvent&, const PageEvent&) = default;
};

// Counters since construction (pages used / free / cached are queries of BlockManager).
// Intentionally copyable.
struct BlockManagerStats {
  int64_t prefix_queries = 0;         // add() calls with prefix caching on
  int64_t prefix_hits = 0;            // ... that reused at least one page
  int64_t prefix_tokens_queried = 0;  // prompt tokens of those calls
  int64_t prefix_tokens_hit = 0;      // prompt tokens served from cached pages
  int64_t evictions = 0;        // cached keys dropped (page reused or replaced): evicted events
  int64_t cow_copies = 0;       // PageCopy entries produced
  int64_t duplicate_pages = 0;  // full pages not cached because an identical one already was
  // prefix_tokens_hit / prefix_tokens_queried; 0 before any query.
  [[nodiscard]] double prefix_hit_rate() const {
    return prefix_tokens_queried == 0 ? 0.0
                                      : static_cast<double>(prefix_tokens_hit) /
                                            static_cast<double>(prefix_tokens_queried);
  }
  // prefix_hits / prefix_queries; 0 before any query.
  [[nodiscard]] double prefix_query_hit_rate() const {
    return prefix_queries == 0
               ? 0.0
               : static_cast<double>(prefix_hits) / static_cast<double>(prefix_queries);
  }
  friend bool operator==(const BlockManagerStats&, const BlockManagerStats&) = default;
};

class KVCACHE_API BlockManager {
 public:
  // invalid_argument for num_pages outside [1, 2^30], page_size < 1, fingerprint.page_size !=
  // page_size, watermark_pages outside [0, num_pages] or a negative hint; with groups, for a
  // group's num_pages outside [1, 2^30], a sliding window < 1, or watermark_pages above a page
  // group's num_pages.
  static Result<std::unique_ptr<BlockManager>> create(const BlockManagerOptions& options);
  ~BlockManager();
  BlockManager(const BlockManager&) = delete;
  BlockManager& operator=(const BlockManager&) = delete;

  // --- sequence ops ---

  // Registers `seq` and gives it the longest verified run of cached full pages that matches
  // `prompt` (refcount up), at most (prompt.size() - 1) / page_size pages so that the last prompt
  // token is always computed (its logits are needed). Returns the number of prompt tokens already
  // cached (a multiple of page_size); the caller reserves and commits the rest. `extras` is copied.
  // invalid_argument for an existing seq or bad multimodal spans (need 0 <= begin < end, sorted);
  // resource_exhausted when a recurrent group has no state slot left.
  Result<int64_t> add(SeqId seq, std::span<const int32_t> prompt, const KeyExtras& extras = {});
  // The same, given the prompt's keys: page_keys() of `prompt` under this manager's fingerprint
  // and hash (prompt.size() / page_size of them). Hits are still verified against the stored
  // tokens and extras, so wrong keys only cause misses. Also invalid_argument for a wrong count.
  Result<int64_t> add(SeqId seq, std::span<const int32_t> prompt, std::span<const PageKey> keys,
                      const KeyExtras& extras);
  // Makes room for tokens [num_tokens, num_tokens + n) and returns their slots (page_id *
  // page_size + offset), a span into manager-owned memory valid until the next call. Replaces any
  // earlier reservation (pages past the new end go back). A shared or cached page to be written
  // is copied first (copy-on-write). not_found for an unknown seq, invalid_argument for n < 0,
  // resource_exhausted when the pool cannot supply the pages.
  Result<std::span<const int64_t>> reserve(SeqId seq, int64_t n);
  // The next tokens.size() reserved positions now hold `tokens`; each page that fills up gets its
  // key and enters the prefix index (unless an identical verified page already is: that one stays,
  // this one stays private). not_found, or invalid_argument for more tokens than reserved.
  Status commit(SeqId seq, std::span<const int32_t> tokens);
  // Keeps tokens [0, n) and drops the reservation; pages past the end go back. A kept page that is
  // shared or cached is copied at the next reserve that writes into it. not_found, or
  // invalid_argument unless 0 <= n <= num_tokens(seq), and, with a recurrent group, n ==
  // num_tokens(seq) (a state cannot roll back), and with a sliding-window group, the window ending
  // at n still held.
  Status truncate(SeqId seq, int64_t n);
  // `child` shares all pages holding `parent`'s tokens (not its reservation), refcount up.
  // not_found for an unknown parent, invalid_argument for an existing child, resource_exhausted
  // when a recurrent group has no state slot for the child.
  Status fork(SeqId parent, SeqId child);
  // Drops the sequence's references: cached pages nobody uses go to the LRU, others are free.
  // not_found for an unknown seq.
  Status free(SeqId seq);

  // --- queries ---

  // Pages of `seq` in token order: ceil((num_tokens + num_reserved) / page_size) of them; valid
  // until the next non-const call. not_found for an unknown seq.
  [[nodiscard]] Result<std::span<const PageId>> page_table(SeqId seq) const;
  // The same for group `group` (empty for a recurrent group). Also invalid_argument for a bad
  // group.
  [[nodiscard]] Result<std::span<const PageId>> page_table(SeqId seq, int64_t group) const;
  // The slots of the last reserve() in group `group` (empty for a recurrent group; reserve()
  // returns group 0's); valid until the next non-const call. invalid_argument for a bad group.
  [[nodiscard]] Result<std::span<const int64_t>> reserved_slots(int64_t group) const;
  // The live state slot of `seq` in recurrent group `group`. not_found for an unknown seq,
  // invalid_argument for a bad group or one that is not recurrent.
  [[nodiscard]] Result<StateSlot> state_slot(SeqId seq, int64_t group) const;
  [[nodiscard]] int64_t num_groups() const;
  [[nodiscard]] Result<int64_t> num_tokens(SeqId seq) const;
  [[nodiscard]] Result<int64_t> num_reserved(SeqId seq) const;
  [[nodiscard]] bool contains(SeqId seq) const;
  [[nodiscard]] int64_t num_sequences() const;
  // The tokens add(prompt, extras) would find cached now (same cap), without taking references
  // or counting in stats. invalid_argument for bad multimodal spans.
  [[nodiscard]] Result<int64_t> match_prefix(std::span<const int32_t> prompt,
                                             const KeyExtras& extras = {}) const;
  // The same with the prompt's keys given (see add()); invalid_argument for a wrong key count.
  [[nodiscard]] Result<int64_t> match_prefix(std::span<const int32_t> prompt,
                                             std::span<const PageKey> keys,
                                             const KeyExtras& extras) const;
  // True when a page with this key is in the prefix index (used or evictable).
  [[nodiscard]] bool is_cached(const PageKey& key) const;
  // True when pages for num_new_tokens tokens (ceil(num_new_tokens / page_size); subtract a
  // prefix hit first) fit in the free and evictable pages with watermark_pages kept back, in every
  // page group, and every recurrent group has a state slot available.
  [[nodiscard]] bool can_admit(int64_t num_new_tokens) const;
  // The shortest prefix of victims_in_order (the scheduler's lowest priority first) whose free()
  // would leave at least num_pages_needed pages available (free + evictable; a page another
  // sequence still holds frees nothing, a cached one becomes evictable) in every page group. Empty
  // when enough are available already. Changes nothing. invalid_argument for num_pages_needed < 0
  // or a repeated victim, not_found for an unknown one, resource_exhausted when freeing all is not
  // enough.
  [[nodiscard]] Result<std::vector<SeqId>> plan_preemption(
      int64_t num_pages_needed, std::span<const SeqId> victims_in_order) const;

  [[nodiscard]] int64_t num_pages() const;
  [[nodiscard]] int64_t page_size() const;
  [[nodiscard]] int64_t num_free_pages() const;       // refcount 0, no cached prefix
  [[nodiscard]] int64_t num_cached_pages() const;     // holding a key, used or not
  [[nodiscard]] int64_t num_evictable_pages() const;  // cached with refcount 0 (on the LRU)
  [[nodiscard]] int64_t num_used_pages() const;       // refcount > 0
  // Group `group`'s pool (pages, or state slots and checkpoints); 0 for a bad group.
  [[nodiscard]] int64_t num_free_pages(int64_t group) const;
  [[nodiscard]] int64_t num_cached_pages(int64_t group) const;
  [[nodiscard]] int64_t num_evictable_pages(int64_t group) const;
  [[nodiscard]] int64_t num_used_pages(int64_t group) const;
  [[nodiscard]] const BlockManagerStats& stats() const;

  // Copies produced by reserve() since the last clear, in the order they must run.
  [[nodiscard]] std::span<const PageCopy> pending_copies() const;
  void clear_pending_copies();
  // State copies produced since the last clear (recurrent groups), in the order they must run.
  [[nodiscard]] std::span<const StateCopy> pending_state_copies() const;
  void clear_pending_state_copies();
  // Page events (with record_events) since the last clear, oldest first.
  [[nodiscard]] std::span<const PageEvent> events() const;
  void clear_events();

  // Every internal invariant, per group (refcounts equal the references held, no page both free
  // and used, free + evictable + used == num_pages, page tables cover exactly the tokens with
  // exactly the out-of-window pages null, the prefix index and the cached pages agree, one live
  // slot per sequence and checkpoints unreferenced). internal naming the first violation.
  [[nodiscard]] Status check_invariants() const;

 private:
  struct Rep;
  explicit BlockManager(std::unique_ptr<Rep> rep);
  std::unique_ptr<Rep> rep_;
};

}  // namespace kvcache
