// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "kvcache/block_manager.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>

#include "core/check.h"
#include "paged/block_pool.h"

namespace kvcache {
namespace {

using paged::BlockPool;
using paged::kNoPage;

std::string seq_str(SeqId seq) { return "sequence " + std::to_string(seq); }

Status unknown_seq(std::string_view op, SeqId seq) {
  return Status::not_found(std::string(op) + ": unknown " + seq_str(seq) +
                           ", expected an added sequence");
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A multimodal span with its content hash owned.
struct StoredSpan {
  std::string content_hash;
  int64_t begin = 0;
  int64_t end = 0;
};

bool overlaps(int64_t begin, int64_t end, int64_t first_pos, int64_t page_size) {
  return begin < first_pos + page_size && end > first_pos;
}

// What a cached page holds besides its token ids, to verify a hit. The parent is identified by
// its uid: a number given to each cached page once and never reused, so an evicted and reused
// parent page cannot vouch for a child it never had.
struct PageMeta {
  PageKey key;
  PageKey parent;           // the previous page's key or the chain root (for events)
  uint64_t uid = 0;         // 0 while not cached
  uint64_t parent_uid = 0;  // 0 for the first page of a sequence (verified by salt instead)
  std::string salt;         // first pages only
  std::string adapter;
  std::vector<StoredSpan> spans;  // the multimodal spans overlapping the page, in order
};

// Prefix index: key -> cached page, open addressing with linear probing over page ids (the key
// lives in PageMeta). At most num_pages entries in >= 2 * num_pages slots, so it never fills and
// never allocates after construction.
class PrefixIndex {
 public:
  explicit PrefixIndex(int32_t num_pages)
      : slots_(std::bit_ceil(static_cast<size_t>(std::max(2 * num_pages, 4))), kNoPage),
        mask_(slots_.size() - 1) {}

  [[nodiscard]] PageId find(const PageKey& key, const std::vector<PageMeta>& meta) const {
    for (size_t i = home(key);; i = (i + 1) & mask_) {
      const PageId page = slots_[i];
      if (page == kNoPage || meta[page].key == key) return page;
    }
  }
  // REQUIRES: meta[page].key is not in the index.
  void insert(PageId page, const std::vector<PageMeta>& meta) {
    size_t i = home(meta[page].key);
    while (slots_[i] != kNoPage) i = (i + 1) & mask_;
    slots_[i] = page;
    ++size_;
  }
  // Backward-shift deletion: no tombstones, so probe chains stay short.
  void erase(PageId page, const std::vector<PageMeta>& meta) {
    size_t i = home(meta[page].key);
    while (slots_[i] != page) {
      KV_CHECK(slots_[i] != kNoPage);
      i = (i + 1) & mask_;
    }
    for (size_t j = (i + 1) & mask_; slots_[j] != kNoPage; j = (j + 1) & mask_) {
      const size_t k = home(meta[slots_[j]].key);
      // The entry at j may move to the hole at i unless its home lies cyclically in (i, j].
      const bool stays = i <= j ? (i < k && k <= j) : (i < k || k <= j);
      if (!stays) {
        slots_[i] = slots_[j];
        i = j;
      }
    }
    slots_[i] = kNoPage;
    --size_;
  }
  [[nodiscard]] int64_t size() const { return size_; }

 private:
  [[nodiscard]] size_t home(const PageKey& key) const {
    uint64_t h = 0;
    std::memcpy(&h, key.bytes.data(), sizeof(h));
    return static_cast<size_t>(h) & mask_;
  }

  std::vector<PageId> slots_;
  size_t mask_;
  int64_t size_ = 0;
};

// A sequence's share of one layer group.
struct SeqGroup {
  std::vector<PageId> pages;      // page groups: in token order, kNullPage once out of the window
  std::vector<uint64_t> uids;     // with prefix caching: per full page, the cached content's uid
  int64_t released = 0;           // sliding window: leading pages set to kNullPage
  StateSlot slot = kNoStateSlot;  // recurrent: the live state slot
};

// A sequence's per-group tables. Group 0's lives inline: the single-group step (reserve + commit
// per running sequence) then reaches its page table without another pointer chase.
class SeqGroups {
 public:
  [[nodiscard]] size_t size() const { return rest_.size() + 1; }
  void resize(size_t n) { rest_.resize(n - 1); }
  SeqGroup& operator[](size_t g) { return g == 0 ? first_ : rest_[g - 1]; }
  const SeqGroup& operator[](size_t g) const { return g == 0 ? first_ : rest_[g - 1]; }

 private:
  SeqGroup first_;
  std::vector<SeqGroup> rest_;
};

struct Sequence {
  std::vector<int32_t> tokens;  // committed
  int64_t num_reserved = 0;
  // With prefix caching: per full page, its key (shared by all groups).
  std::vector<PageKey> keys;
  PageKey root;
  std::string salt;
  std::string adapter;
  std::vector<StoredSpan> spans;
  SeqGroups groups;
};

Status bad_group(std::string_view op, int64_t group, size_t num_groups) {
  return Status::invalid_argument(std::string(op) + ": group is " + std::to_string(group) +
                                  ", expected 0 <= group < " + std::to_string(num_groups));
}

// 0 <= begin < end, sorted by begin.
Status check_extras(std::string_view op, const KeyExtras& extras) {
  int64_t prev_begin = 0;
  for (size_t i = 0; i < extras.multimodal.size(); ++i) {
    const MultimodalSpan& s = extras.multimodal[i];
    if (s.begin < 0 || s.end <= s.begin) {
      return Status::invalid_argument(std::string(op) + ": multimodal span " + std::to_string(i) +
                                      " is [" + std::to_string(s.begin) + ", " +
                                      std::to_string(s.end) + "), expected 0 <= begin < end");
    }
    if (s.begin < prev_begin) {
      return Status::invalid_argument(
          std::string(op) + ": multimodal span " + std::to_string(i) + " begins at " +
          std::to_string(s.begin) +
          ", expected spans sorted by begin (>= " + std::to_string(prev_begin) + ")");
    }
    prev_begin = s.begin;
  }
  return Status();
}

// keys.size() == prompt.size() / page_size.
Status check_keys(std::string_view op, std::span<const int32_t> prompt,
                  std::span<const PageKey> keys, int64_t page_size) {
  const int64_t want = static_cast<int64_t>(prompt.size()) / page_size;
  if (static_cast<int64_t>(keys.size()) == want) return Status();
  return Status::invalid_argument(
      std::string(op) + ": keys has " + std::to_string(keys.size()) +
      " entries, expected prompt.size() / page_size = " + std::to_string(prompt.size()) + " / " +
      std::to_string(page_size) + " = " + std::to_string(want));
}

// The pool, prefix index and cached-content metadata of one layer group.
struct Group {
  Group(const LayerGroupSpec& s, int64_t page_size, bool caching)
      : spec(s),
        pool(static_cast<int32_t>(s.num_pages)),
        meta(caching ? static_cast<size_t>(s.num_pages) : 0),
        page_tokens(caching && s.kind != LayerGroupKind::recurrent
                        ? static_cast<size_t>(s.num_pages * page_size)
                        : 0),
        prefix_tokens(
            caching && s.kind == LayerGroupKind::recurrent ? static_cast<size_t>(s.num_pages) : 0),
        index(caching ? static_cast<int32_t>(s.num_pages) : 0) {}

  [[nodiscard]] bool recurrent() const { return spec.kind == LayerGroupKind::recurrent; }
  [[nodiscard]] bool sliding() const { return spec.kind == LayerGroupKind::sliding_window; }
  // Sliding window: the leading pages no query at or after num_tokens can see.
  [[nodiscard]] int64_t out_of_window(int64_t num_tokens, int64_t page_size) const {
    return sliding() ? std::max<int64_t>(0, num_tokens - spec.window) / page_size : 0;
  }

  LayerGroupSpec spec;
  BlockPool pool;                    // pages, or state slots (live and checkpoints)
  std::vector<PageMeta> meta;        // per page / slot
  std::vector<int32_t> page_tokens;  // page groups: [num_pages, page_size] of cached pages
  // Recurrent: per checkpoint slot, the tokens of the whole prefix it follows (to verify hits).
  std::vector<std::vector<int32_t>> prefix_tokens;
  PrefixIndex index;
  std::vector<int64_t> slots;  // reserve()'s result for this group
};

// The keys of a prompt's pages: the given ones, or computed on demand into `computed`.
struct KeyChain {
  std::span<const PageKey> given;
  std::vector<PageKey>* computed;
  const KeyHashFn* hash;
  PageKey root;
  std::span<const int32_t> prompt;
  const KeyExtras* extras;
  int64_t page_size;

  // REQUIRES: i < prompt.size() / page_size.
  const PageKey& at(int64_t i) {
    if (!given.empty()) return given[static_cast<size_t>(i)];
    while (static_cast<int64_t>(computed->size()) <= i) {
      const int64_t j = static_cast<int64_t>(computed->size());
      const PageKey parent = j == 0 ? root : computed->back();
      computed->push_back(page_key(
          *hash, parent,
          prompt.subspan(static_cast<size_t>(j * page_size), static_cast<size_t>(page_size)),
          j * page_size, *extras));
    }
    return (*computed)[static_cast<size_t>(i)];
  }
};

}  // namespace

const char* name(PageEventKind kind) {
  switch (kind) {
    case PageEventKind::cached:
      return "cached";
    case PageEventKind::evicted:
      return "evicted";
  }
  return "unknown";
}

const char* name(LayerGroupKind kind) {
  switch (kind) {
    case LayerGroupKind::full:
      return "full";
    case LayerGroupKind::sliding_window:
      return "sliding_window";
    case LayerGroupKind::recurrent:
      return "recurrent";
  }
  return "unknown";
}

struct BlockManager::Rep {
  explicit Rep(const BlockManagerOptions& o)
      : options(o),
        page_size(o.page_size),
        hash(o.hash_override ? o.hash_override : key_hash_fn(o.hash_kind)) {
    std::vector<LayerGroupSpec> specs = o.groups;
    if (specs.empty()) specs.push_back({LayerGroupKind::full, o.num_pages, 0});
    int64_t max_pages = 0;
    for (const LayerGroupSpec& spec : specs) {
      groups.push_back(std::make_unique<Group>(spec, page_size, o.enable_prefix_caching));
      max_pages = std::max(max_pages, spec.num_pages);
      any_sliding = any_sliding || spec.kind == LayerGroupKind::sliding_window;
    }
    copies.reserve(static_cast<size_t>(std::min<int64_t>(max_pages, 1024)));
    state_copies.reserve(static_cast<size_t>(std::min<int64_t>(max_pages, 1024)));
    // Drained once per step by a router, so steady state grows it no further.
    if (o.record_events && o.enable_prefix_caching) {
      events.reserve(static_cast<size_t>(std::min<int64_t>(2 * max_pages, 4096)));
    }
  }

  [[nodiscard]] bool caching() const { return options.enable_prefix_caching; }
  [[nodiscard]] bool valid_group(int64_t g) const {
    return g >= 0 && g < static_cast<int64_t>(groups.size());
  }
  [[nodiscard]] std::span<const int32_t> stored_tokens(const Group& G, PageId page) const {
    return std::span<const int32_t>(G.page_tokens)
        .subspan(static_cast<size_t>(page * page_size), static_cast<size_t>(page_size));
  }
  // The last sequence found is remembered: a step calls reserve() then commit() on the same one,
  // and unordered_map elements stay put until erased (free() forgets it).
  [[nodiscard]] Sequence* find(SeqId seq) {
    if (last_seq != nullptr && last_id == seq) return last_seq;
    auto it = seqs.find(seq);
    if (it == seqs.end()) return nullptr;
    last_id = seq;
    last_seq = &it->second;
    return last_seq;
  }
  [[nodiscard]] const Sequence* find(SeqId seq) const {
    if (last_seq != nullptr && last_id == seq) return last_seq;
    auto it = seqs.find(seq);
    return it == seqs.end() ? nullptr : &it->second;
  }

  // The key extras of a sequence, viewing its owned strings (span_scratch holds the spans).
  KeyExtras extras_of(const Sequence& s) {
    span_scratch.clear();
    for (const StoredSpan& sp : s.spans)
      span_scratch.push_back({sp.content_hash, sp.begin, sp.end});
    return KeyExtras{s.salt, s.adapter, span_scratch};
  }

  // True when cached page `page` of G holds exactly the page at first_pos of a request with
  // `extras` whose previous page has uid parent_uid.
  [[nodiscard]] bool verify(const Group& G, PageId page, std::span<const int32_t> tokens,
                            int64_t first_pos, const KeyExtras& extras, uint64_t parent_uid) const {
    const PageMeta& m = G.meta[static_cast<size_t>(page)];
    if (m.parent_uid != parent_uid) return false;
    if (first_pos == 0 && m.salt != extras.salt) return false;
    if (m.adapter != extras.adapter) return false;
    const std::span<const int32_t> stored = stored_tokens(G, page);
    if (!std::equal(stored.begin(), stored.end(), tokens.begin(), tokens.end())) return false;
    size_t i_span = 0;
    for (const MultimodalSpan& s : extras.multimodal) {
      if (!overlaps(s.begin, s.end, first_pos, page_size)) continue;
      if (i_span == m.spans.size()) return false;
      const StoredSpan& t = m.spans[i_span++];
      if (t.content_hash != s.content_hash || t.begin != s.begin || t.end != s.end) return false;
    }
    return i_span == m.spans.size();
  }

  // True when checkpoint `slot` of recurrent G follows exactly `prefix` under `extras`.
  [[nodiscard]] bool verify_checkpoint(const Group& G, StateSlot slot,
                                       std::span<const int32_t> prefix,
                                       const KeyExtras& extras) const {
    const PageMeta& m = G.meta[static_cast<size_t>(slot)];
    if (m.salt != extras.salt || m.adapter != extras.adapter) return false;
    const std::vector<int32_t>& stored = G.prefix_tokens[static_cast<size_t>(slot)];
    if (!std::equal(stored.begin(), stored.end(), prefix.begin(), prefix.end())) return false;
    const int64_t end = static_cast<int64_t>(prefix.size());
    size_t i_span = 0;
    for (const MultimodalSpan& s : extras.multimodal) {
      if (!overlaps(s.begin, s.end, 0, end)) continue;
      if (i_span == m.spans.size()) return false;
      const StoredSpan& t = m.spans[i_span++];
      if (t.content_hash != s.content_hash || t.begin != s.begin || t.end != s.end) return false;
    }
    return i_span == m.spans.size();
  }

  // Longest verified run of cached full pages of `prompt` in page group G, at most max_pages.
  // With `out`, the pages and uids are appended to it.
  int64_t walk(const Group& G, KeyChain& chain, const KeyExtras& extras, int64_t max_pages,
               SeqGroup* out) const {
    uint64_t parent_uid = 0;
    int64_t i = 0;
    for (; i < max_pages; ++i) {
      const auto tokens =
          chain.prompt.subspan(static_cast<size_t>(i * page_size), static_cast<size_t>(page_size));
      const PageId page = G.index.find(chain.at(i), G.meta);
      if (page == kNoPage || !verify(G, page, tokens, i * page_size, extras, parent_uid)) break;
      parent_uid = G.meta[static_cast<size_t>(page)].uid;
      if (out != nullptr) {
        out->pages.push_back(page);
        out->uids.push_back(parent_uid);
      }
    }
    return i;
  }

  // The verified checkpoint of recurrent G at boundary b (b pages), or kNoPage.
  [[nodiscard]] StateSlot find_checkpoint(const Group& G, KeyChain& chain, const KeyExtras& extras,
                                          int64_t b) const {
    const StateSlot slot = G.index.find(chain.at(b - 1), G.meta);
    if (slot == kNoPage) return kNoPage;
    const auto prefix = chain.prompt.first(static_cast<size_t>(b * page_size));
    return verify_checkpoint(G, slot, prefix, extras) ? slot : kNoPage;
  }

  // The longest boundary (in pages, <= max_pages) every group serves. With outs (one per group),
  // page groups' runs are appended (possibly longer than the hit) and recurrent groups' checkpoint
  // slots set in ckpts.
  int64_t find_hit(KeyChain& chain, const KeyExtras& extras, int64_t max_pages, SeqGroups* outs,
                   std::vector<StateSlot>* ckpts) const {
    int64_t limit = max_pages;
    for (size_t g = 0; g < groups.size(); ++g) {
      if (groups[g]->recurrent()) continue;
      limit = walk(*groups[g], chain, extras, limit, outs == nullptr ? nullptr : &(*outs)[g]);
    }
    for (int64_t b = limit; b > 0; --b) {
      bool all = true;
      for (size_t g = 0; g < groups.size() && all; ++g) {
        if (!groups[g]->recurrent()) continue;
        const StateSlot slot = find_checkpoint(*groups[g], chain, extras, b);
        all = slot != kNoPage;
        if (ckpts != nullptr) (*ckpts)[g] = slot;
      }
      if (all) return b;
    }
    if (ckpts != nullptr) std::fill(ckpts->begin(), ckpts->end(), kNoPage);
    return 0;
  }

  [[nodiscard]] int64_t max_hit_pages(int64_t num_prompt_tokens) const {
    return num_prompt_tokens == 0 ? 0 : (num_prompt_tokens - 1) / page_size;
  }

  void record(PageEventKind kind, size_t g, const PageMeta& m) {
    if (!options.record_events) return;
    events.push_back({kind, m.key, m.parent, page_size,
                      options.fingerprint.layer_group + static_cast<int64_t>(g)});
  }

  // Drops a cached page's (or checkpoint's) key: it is being reused or replaced.
  void uncache(size_t g, PageId page) {
    Group& G = *groups[g];
    record(PageEventKind::evicted, g, G.meta[static_cast<size_t>(page)]);
    G.index.erase(page, G.meta);
    G.meta[static_cast<size_t>(page)].uid = 0;
    ++stats.evictions;
  }

  // REQUIRES: groups[g]->pool.num_available() > 0.
  PageId allocate_page(size_t g) {
    const BlockPool::Allocation a = groups[g]->pool.allocate();
    KV_CHECK(a.page != kNoPage);
    if (a.evicted) uncache(g, a.page);
    return a.page;
  }

  // Page j of s (its key already in s.keys) just filled up in page group g: cache it unless an
  // identical page already is.
  void on_page_full(Sequence& s, size_t g, int64_t j) {
    Group& G = *groups[g];
    SeqGroup& sg = s.groups[g];
    const PageId page = sg.pages[static_cast<size_t>(j)];
    KV_CHECK(page != kNoPage && !G.pool.is_cached(page));
    const KeyExtras extras = extras_of(s);
    const int64_t first_pos = j * page_size;
    const auto tokens = std::span<const int32_t>(s.tokens).subspan(static_cast<size_t>(first_pos),
                                                                   static_cast<size_t>(page_size));
    const PageKey& parent = j == 0 ? s.root : s.keys[static_cast<size_t>(j - 1)];
    const uint64_t parent_uid = j == 0 ? 0 : sg.uids[static_cast<size_t>(j - 1)];
    const PageKey& key = s.keys[static_cast<size_t>(j)];

    const PageId other = G.index.find(key, G.meta);
    if (other != kNoPage) {
      if (verify(G, other, tokens, first_pos, extras, parent_uid)) {
        sg.uids.push_back(G.meta[static_cast<size_t>(other)].uid);
        ++stats.duplicate_pages;
        return;
      }
      if (G.pool.refcount(other) > 0) {
        // A collision with a page in use: this page stays private, under an identity nothing
        // in the index can match.
        sg.uids.push_back(next_uid++);
        return;
      }
      // A collision (or an orphan whose parent was evicted) nobody uses: replace it.
      uncache(g, other);
      G.pool.drop_cached(other);
    }
    PageMeta& m = G.meta[static_cast<size_t>(page)];
    m.key = key;
    m.parent = parent;
    m.uid = next_uid++;
    m.parent_uid = parent_uid;
    if (j == 0) {
      m.salt.assign(s.salt);
    } else {
      m.salt.clear();
    }
    m.adapter.assign(s.adapter);
    m.spans.clear();
    for (const StoredSpan& sp : s.spans) {
      if (overlaps(sp.begin, sp.end, first_pos, page_size)) m.spans.push_back(sp);
    }
    std::copy(tokens.begin(), tokens.end(),
              G.page_tokens.begin() + static_cast<ptrdiff_t>(page * page_size));
    G.pool.set_cached(page, true);
    G.index.insert(page, G.meta);
    sg.uids.push_back(m.uid);
    record(PageEventKind::cached, g, m);
  }

  // s just committed up to boundary b (b pages) in recurrent group g: checkpoint its live state
  // unless a verified checkpoint of this prefix exists or no slot is available.
  void checkpoint(Sequence& s, size_t g, int64_t b) {
    Group& G = *groups[g];
    const KeyExtras extras = extras_of(s);
    const auto prefix =
        std::span<const int32_t>(s.tokens).first(static_cast<size_t>(b * page_size));
    const PageKey& key = s.keys[static_cast<size_t>(b - 1)];
    const StateSlot other = G.index.find(key, G.meta);
    if (other != kNoPage) {
      if (verify_checkpoint(G, other, prefix, extras)) {
        ++stats.duplicate_pages;
        return;
      }
      uncache(g, other);  // a collision: checkpoints are never referenced, so replace it
      G.pool.drop_cached(other);
    }
    if (G.pool.num_available() == 0) return;
    const StateSlot slot = allocate_page(g);
    PageMeta& m = G.meta[static_cast<size_t>(slot)];
    m.key = key;
    m.parent = b == 1 ? s.root : s.keys[static_cast<size_t>(b - 2)];
    m.uid = next_uid++;
    m.parent_uid = 0;
    m.salt.assign(s.salt);
    m.adapter.assign(s.adapter);
    m.spans.clear();
    for (const StoredSpan& sp : s.spans) {
      if (overlaps(sp.begin, sp.end, 0, b * page_size)) m.spans.push_back(sp);
    }
    G.prefix_tokens[static_cast<size_t>(slot)].assign(prefix.begin(), prefix.end());
    G.pool.set_cached(slot, true);
    G.index.insert(slot, G.meta);
    record(PageEventKind::cached, g, m);
    state_copies.push_back({s.groups[g].slot, slot, static_cast<int32_t>(g)});
    G.pool.unref(slot);  // nobody holds it: it waits in the LRU until a hit restores it
  }

  // Last page first, so a sequence's tail pages reach the LRU first and are evicted first.
  void release_pages(Group& G, SeqGroup& sg, size_t keep) {
    while (sg.pages.size() > keep) {
      if (sg.pages.back() != kNoPage) G.pool.unref(sg.pages.back());
      sg.pages.pop_back();
    }
  }

  // Sliding window: releases the pages that fell out of the window at num_tokens.
  void slide(Group& G, SeqGroup& sg, int64_t num_tokens) {
    const int64_t out = G.out_of_window(num_tokens, page_size);
    for (; sg.released < out; ++sg.released) {
      PageId& page = sg.pages[static_cast<size_t>(sg.released)];
      G.pool.unref(page);
      page = kNoPage;
    }
  }

  // resource_exhausted naming the first recurrent group with fewer than `pinned` + 1 slots.
  Status check_state_slots(std::string_view op, SeqId seq,
                           const std::vector<StateSlot>* pinned) const {
    for (size_t g = 0; g < groups.size(); ++g) {
      if (!groups[g]->recurrent()) continue;
      const BlockPool& pool = groups[g]->pool;
      const int64_t pin = pinned != nullptr && (*pinned)[g] != kNoPage ? 1 : 0;
      if (pool.num_available() - pin >= 1) continue;
      return Status::resource_exhausted(std::string(op) + ": recurrent group " + std::to_string(g) +
                                        " has no state slot for " + seq_str(seq) +
                                        ", expected one available");
    }
    return Status();
  }

  // Both add() overloads: keys_given tells them apart.
  Result<int64_t> add(SeqId seq, std::span<const int32_t> prompt, std::span<const PageKey> keys,
                      bool keys_given, const KeyExtras& extras) {
    constexpr std::string_view kOp = "BlockManager.add";
    Rep& r = *this;
    if (r.find(seq) != nullptr) {
      return Status::invalid_argument(std::string(kOp) + ": " + seq_str(seq) +
                                      " exists, expected a new id");
    }
    if (Status st = check_extras(kOp, extras); !st.ok()) return st;
    if (keys_given) {
      if (Status st = check_keys(kOp, prompt, keys, r.page_size); !st.ok()) return st;
    }

    Sequence s;
    const size_t hint = static_cast<size_t>(r.options.max_pages_per_seq_hint);
    s.groups.resize(r.groups.size());
    for (size_t g = 0; g < r.groups.size(); ++g) {
      if (r.groups[g]->recurrent()) continue;
      s.groups[g].pages.reserve(hint);
      if (r.caching()) s.groups[g].uids.reserve(hint);
    }
    s.tokens.reserve(std::max(hint * static_cast<size_t>(r.page_size), prompt.size()));
    s.salt = extras.salt;
    s.adapter = extras.adapter;
    for (const MultimodalSpan& sp : extras.multimodal) {
      s.spans.push_back({std::string(sp.content_hash), sp.begin, sp.end});
    }
    int64_t hit_pages = 0;
    std::vector<StateSlot> ckpts(r.groups.size(), kNoPage);
    if (r.caching()) {
      s.keys.reserve(hint);
      s.root = root_key(r.hash, r.options.fingerprint, extras.salt);
      r.key_scratch.clear();
      KeyChain chain{keys, &r.key_scratch, &r.hash, s.root, prompt, &extras, r.page_size};
      hit_pages = r.find_hit(chain, extras, r.max_hit_pages(static_cast<int64_t>(prompt.size())),
                             &s.groups, &ckpts);
      for (int64_t i = 0; i < hit_pages; ++i) s.keys.push_back(chain.at(i));
    }
    if (Status st = r.check_state_slots(kOp, seq, &ckpts); !st.ok()) return st;

    if (r.caching()) {
      ++r.stats.prefix_queries;
      r.stats.prefix_tokens_queried += static_cast<int64_t>(prompt.size());
      if (hit_pages > 0) ++r.stats.prefix_hits;
      r.stats.prefix_tokens_hit += hit_pages * r.page_size;
    }
    const int64_t hit_tokens = hit_pages * r.page_size;
    for (size_t g = 0; g < r.groups.size(); ++g) {
      Group& G = *r.groups[g];
      SeqGroup& sg = s.groups[g];
      if (G.recurrent()) {
        if (ckpts[g] != kNoPage) G.pool.ref(ckpts[g]);  // not to be evicted by the allocation
        sg.slot = r.allocate_page(g);
        r.state_copies.push_back(
            {ckpts[g] == kNoPage ? kNoStateSlot : ckpts[g], sg.slot, static_cast<int32_t>(g)});
        if (ckpts[g] != kNoPage) G.pool.unref(ckpts[g]);
        continue;
      }
      sg.pages.resize(static_cast<size_t>(hit_pages));
      sg.uids.resize(static_cast<size_t>(hit_pages));
      sg.released = G.out_of_window(hit_tokens, r.page_size);
      for (size_t j = 0; j < sg.pages.size(); ++j) {
        if (static_cast<int64_t>(j) < sg.released) {
          sg.pages[j] = kNoPage;
        } else {
          G.pool.ref(sg.pages[j]);
        }
      }
    }
    s.tokens.assign(prompt.begin(), prompt.begin() + hit_tokens);
    r.seqs.emplace(seq, std::move(s));
    return hit_tokens;
  }

  // Both match_prefix() overloads.
  [[nodiscard]] Result<int64_t> match_prefix(std::span<const int32_t> prompt,
                                             std::span<const PageKey> keys, bool keys_given,
                                             const KeyExtras& extras) const {
    constexpr std::string_view kOp = "BlockManager.match_prefix";
    const Rep& r = *this;
    if (Status st = check_extras(kOp, extras); !st.ok()) return st;
    if (keys_given) {
      if (Status st = check_keys(kOp, prompt, keys, r.page_size); !st.ok()) return st;
    }
    if (!r.caching()) return int64_t{0};
    const int64_t max_pages = r.max_hit_pages(static_cast<int64_t>(prompt.size()));
    // With keys given the root is not needed (and not hashed).
    const PageKey root =
        keys_given ? PageKey{} : root_key(r.hash, r.options.fingerprint, extras.salt);
    r.key_scratch.clear();
    KeyChain chain{keys, &r.key_scratch, &r.hash, root, prompt, &extras, r.page_size};
    return r.find_hit(chain, extras, max_pages, nullptr, nullptr) * r.page_size;
  }

  BlockManagerOptions options;
  int64_t page_size;
  KeyHashFn hash;
  std::vector<std::unique_ptr<Group>> groups;
  std::unordered_map<SeqId, Sequence> seqs;
  SeqId last_id = 0;  // find()'s memo
  Sequence* last_seq = nullptr;
  std::vector<PageCopy> copies;
  std::vector<StateCopy> state_copies;
  std::vector<PageEvent> events;
  std::vector<MultimodalSpan> span_scratch;
  mutable std::vector<PageKey> key_scratch;  // computed prompt keys (const lookups too)
  BlockManagerStats stats;
  uint64_t next_uid = 1;
  bool any_sliding = false;  // commit() must slide windows even when no page fills
};

Result<std::unique_ptr<BlockManager>> BlockManager::create(const BlockManagerOptions& options) {
  constexpr std::string_view kOp = "BlockManager.create";
  const auto bad = [&](const std::string& what) {
    return Status::invalid_argument(std::string(kOp) + ": " + what);
  };
  const auto bad_pages = [](int64_t n) { return n < 1 || n > BlockPool::kMaxPages; };
  if (options.groups.empty() && bad_pages(options.num_pages)) {
    return bad("num_pages is " + std::to_string(options.num_pages) +
               ", expected 1 <= num_pages <= " + std::to_string(BlockPool::kMaxPages));
  }
  if (options.page_size < 1) {
    return bad("page_size is " + std::to_string(options.page_size) + ", expected >= 1");
  }
  if (options.fingerprint.page_size != options.page_size) {
    return bad("fingerprint.page_size is " + std::to_string(options.fingerprint.page_size) +
               ", expected page_size = " + std::to_string(options.page_size));
  }
  if (options.watermark_pages < 0 ||
      (options.groups.empty() && options.watermark_pages > options.num_pages)) {
    return bad(
        "watermark_pages is " + std::to_string(options.watermark_pages) +
        ", expected 0 <= watermark_pages <= num_pages = " + std::to_string(options.num_pages));
  }
  for (size_t g = 0; g < options.groups.size(); ++g) {
    const LayerGroupSpec& spec = options.groups[g];
    const std::string what = "groups[" + std::to_string(g) + "]";
    if (spec.kind != LayerGroupKind::full && spec.kind != LayerGroupKind::sliding_window &&
        spec.kind != LayerGroupKind::recurrent) {
      return bad(what + ".kind is " + std::to_string(static_cast<int>(spec.kind)) +
                 ", expected a LayerGroupKind");
    }
    if (bad_pages(spec.num_pages)) {
      return bad(what + ".num_pages is " + std::to_string(spec.num_pages) +
                 ", expected 1 <= num_pages <= " + std::to_string(BlockPool::kMaxPages));
    }
    if (spec.kind == LayerGroupKind::sliding_window && spec.window < 1) {
      return bad(what + ".window is " + std::to_string(spec.window) + ", expected >= 1");
    }
    if (spec.kind != LayerGroupKind::recurrent && options.watermark_pages > spec.num_pages) {
      return bad("watermark_pages is " + std::to_string(options.watermark_pages) +
                 ", expected <= " + what + ".num_pages = " + std::to_string(spec.num_pages));
    }
  }
  if (options.max_pages_per_seq_hint < 0) {
    return bad("max_pages_per_seq_hint is " + std::to_string(options.max_pages_per_seq_hint) +
               ", expected >= 0");
  }
  return std::unique_ptr<BlockManager>(new BlockManager(std::make_unique<Rep>(options)));
}

BlockManager::BlockManager(std::unique_ptr<Rep> rep) : rep_(std::move(rep)) {}
BlockManager::~BlockManager() = default;

Result<int64_t> BlockManager::add(SeqId seq, std::span<const int32_t> prompt,
                                  const KeyExtras& extras) {
  return rep_->add(seq, prompt, {}, false, extras);
}

Result<int64_t> BlockManager::add(SeqId seq, std::span<const int32_t> prompt,
                                  std::span<const PageKey> keys, const KeyExtras& extras) {
  return rep_->add(seq, prompt, keys, true, extras);
}

Result<std::span<const int64_t>> BlockManager::reserve(SeqId seq, int64_t n) {
  constexpr std::string_view kOp = "BlockManager.reserve";
  Rep& r = *rep_;
  Sequence* s = r.find(seq);
  if (s == nullptr) return unknown_seq(kOp, seq);
  if (n < 0) {
    return Status::invalid_argument(std::string(kOp) + ": n is " + std::to_string(n) +
                                    ", expected n >= 0");
  }
  const int64_t ps = r.page_size;
  const int64_t num_tokens = static_cast<int64_t>(s->tokens.size());
  const size_t need = static_cast<size_t>(ceil_div(num_tokens + n, ps));
  // The partly filled page the first token goes to must be private and not cached.
  const size_t i_write = static_cast<size_t>(num_tokens / ps);
  const auto needs_cow = [&](const Group& G, const SeqGroup& sg) {
    if (n == 0 || num_tokens % ps == 0) return false;
    const PageId page = sg.pages[i_write];
    return G.pool.refcount(page) > 1 || G.pool.is_cached(page);
  };
  for (size_t g = 0; g < r.groups.size(); ++g) {
    const Group& G = *r.groups[g];
    if (G.recurrent()) continue;
    const SeqGroup& sg = s->groups[g];
    const size_t num_release = sg.pages.size() > need ? sg.pages.size() - need : 0;
    const int64_t num_alloc =
        static_cast<int64_t>(need - std::min(need, sg.pages.size())) + (needs_cow(G, sg) ? 1 : 0);
    const int64_t available = G.pool.num_available() + static_cast<int64_t>(num_release);
    if (num_alloc > available) {
      return Status::resource_exhausted(
          std::string(kOp) + ": " + std::to_string(num_alloc) + " new pages needed for " +
          std::to_string(n) + " tokens of " + seq_str(seq) +
          (r.groups.size() > 1 ? " in group " + std::to_string(g) : std::string()) +
          ", expected at most " + std::to_string(available) + " available (free + evictable)");
    }
  }

  for (size_t g = 0; g < r.groups.size(); ++g) {
    Group& G = *r.groups[g];
    if (G.recurrent()) continue;
    SeqGroup& sg = s->groups[g];
    const bool cow = needs_cow(G, sg);
    r.release_pages(G, sg, need);  // reservation pages only: private, they go to the free list
    PageId cow_src = kNoPage;
    if (cow) {
      cow_src = sg.pages[i_write];
      const PageId dst = r.allocate_page(g);
      r.copies.push_back({cow_src, dst, static_cast<int32_t>(g)});
      ++r.stats.cow_copies;
      sg.pages[i_write] = dst;
    }
    while (sg.pages.size() < need) sg.pages.push_back(r.allocate_page(g));
    // After the allocations: the source may join the LRU, and must not be handed out above.
    if (cow_src != kNoPage) G.pool.unref(cow_src);
    G.slots.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      const int64_t pos = num_tokens + i;
      G.slots[static_cast<size_t>(i)] = sg.pages[static_cast<size_t>(pos / ps)] * ps + pos % ps;
    }
  }
  s->num_reserved = n;
  // A recurrent group 0 has no slots.
  if (r.groups[0]->recurrent()) r.groups[0]->slots.clear();
  return std::span<const int64_t>(r.groups[0]->slots);
}

Status BlockManager::commit(SeqId seq, std::span<const int32_t> tokens) {
  constexpr std::string_view kOp = "BlockManager.commit";
  Rep& r = *rep_;
  Sequence* s = r.find(seq);
  if (s == nullptr) return unknown_seq(kOp, seq);
  const int64_t k = static_cast<int64_t>(tokens.size());
  if (k > s->num_reserved) {
    return Status::invalid_argument(std::string(kOp) + ": " + std::to_string(k) +
                                    " tokens, expected at most " + std::to_string(s->num_reserved) +
                                    " reserved for " + seq_str(seq));
  }
  const int64_t ps = r.page_size;
  const int64_t old = static_cast<int64_t>(s->tokens.size());
  if (k == 1) {
    s->tokens.push_back(tokens[0]);  // the decode step: no range-insert (memmove) call
  } else {
    s->tokens.insert(s->tokens.end(), tokens.begin(), tokens.end());
  }
  s->num_reserved -= k;
  const int64_t len = old + k;
  // No page filled: nothing to key, cache or checkpoint (a checkpoint needs len % ps == 0 with
  // k > 0, i.e. a filled page); only sliding windows may move.
  if (len / ps == old / ps && !r.any_sliding) return Status();
  if (r.caching() && len / ps > old / ps) {
    const KeyExtras extras = r.extras_of(*s);
    for (int64_t j = old / ps; j < len / ps; ++j) {
      const PageKey parent = j == 0 ? s->root : s->keys[static_cast<size_t>(j - 1)];
      s->keys.push_back(page_key(r.hash, parent,
                                 std::span<const int32_t>(s->tokens).subspan(
                                     static_cast<size_t>(j * ps), static_cast<size_t>(ps)),
                                 j * ps, extras));
    }
  }
  for (size_t g = 0; g < r.groups.size(); ++g) {
    Group& G = *r.groups[g];
    if (G.recurrent()) {
      if (r.caching() && k > 0 && len % ps == 0) r.checkpoint(*s, g, len / ps);
      continue;
    }
    if (r.caching()) {
      for (int64_t j = old / ps; j < len / ps; ++j) r.on_page_full(*s, g, j);
    }
    r.slide(G, s->groups[g], len);
  }
  return Status();
}

Status BlockManager::truncate(SeqId seq, int64_t n) {
  constexpr std::string_view kOp = "BlockManager.truncate";
  Rep& r = *rep_;
  Sequence* s = r.find(seq);
  if (s == nullptr) return unknown_seq(kOp, seq);
  const int64_t len = static_cast<int64_t>(s->tokens.size());
  if (n < 0 || n > len) {
    return Status::invalid_argument(std::string(kOp) + ": n is " + std::to_string(n) +
                                    ", expected 0 <= n <= " + std::to_string(len) +
                                    " (num_tokens of " + seq_str(seq) + ")");
  }
  for (size_t g = 0; g < r.groups.size(); ++g) {
    const Group& G = *r.groups[g];
    const SeqGroup& sg = s->groups[g];
    if (G.recurrent() && n != len) {
      return Status::invalid_argument(std::string(kOp) + ": n is " + std::to_string(n) +
                                      ", expected n == num_tokens = " + std::to_string(len) +
                                      " (recurrent group " + std::to_string(g) +
                                      " cannot roll back its state)");
    }
    if (G.sliding() && sg.released > G.out_of_window(n, r.page_size)) {
      return Status::invalid_argument(
          std::string(kOp) + ": n is " + std::to_string(n) +
          ", expected n >= " + std::to_string(sg.released * r.page_size + G.spec.window) +
          " (sliding-window group " + std::to_string(g) + " released the pages before)");
    }
  }
  for (size_t g = 0; g < r.groups.size(); ++g) {
    Group& G = *r.groups[g];
    if (G.recurrent()) continue;
    SeqGroup& sg = s->groups[g];
    r.release_pages(G, sg, static_cast<size_t>(ceil_div(n, r.page_size)));
    if (r.caching()) sg.uids.resize(static_cast<size_t>(n / r.page_size));
  }
  s->tokens.resize(static_cast<size_t>(n));
  s->num_reserved = 0;
  if (r.caching()) s->keys.resize(static_cast<size_t>(n / r.page_size));
  return Status();
}

Status BlockManager::fork(SeqId parent, SeqId child) {
  constexpr std::string_view kOp = "BlockManager.fork";
  Rep& r = *rep_;
  const Sequence* p = r.find(parent);
  if (p == nullptr) return unknown_seq(kOp, parent);
  if (r.find(child) != nullptr) {
    return Status::invalid_argument(std::string(kOp) + ": child " + seq_str(child) +
                                    " exists, expected a new id");
  }
  if (Status st = r.check_state_slots(kOp, child, nullptr); !st.ok()) return st;
  Sequence c = *p;
  c.num_reserved = 0;
  for (size_t g = 0; g < r.groups.size(); ++g) {
    Group& G = *r.groups[g];
    SeqGroup& cg = c.groups[g];
    if (G.recurrent()) {
      cg.slot = r.allocate_page(g);
      r.state_copies.push_back({p->groups[g].slot, cg.slot, static_cast<int32_t>(g)});
      continue;
    }
    cg.pages.resize(
        static_cast<size_t>(ceil_div(static_cast<int64_t>(p->tokens.size()), r.page_size)));
    for (PageId page : cg.pages) {
      if (page != kNoPage) G.pool.ref(page);
    }
  }
  r.seqs.emplace(child, std::move(c));
  return Status();
}

Status BlockManager::free(SeqId seq) {
  Rep& r = *rep_;
  auto it = r.seqs.find(seq);
  if (it == r.seqs.end()) return unknown_seq("BlockManager.free", seq);
  for (size_t g = 0; g < r.groups.size(); ++g) {
    Group& G = *r.groups[g];
    SeqGroup& sg = it->second.groups[g];
    if (G.recurrent()) {
      G.pool.unref(sg.slot);
    } else {
      r.release_pages(G, sg, 0);
    }
  }
  if (r.last_seq == &it->second) r.last_seq = nullptr;
  r.seqs.erase(it);
  return Status();
}

Result<std::span<const PageId>> BlockManager::page_table(SeqId seq) const {
  return page_table(seq, 0);
}

Result<std::span<const PageId>> BlockManager::page_table(SeqId seq, int64_t group) const {
  constexpr std::string_view kOp = "BlockManager.page_table";
  const Rep& r = *rep_;
  const Sequence* s = r.find(seq);
  if (s == nullptr) return unknown_seq(kOp, seq);
  if (!r.valid_group(group)) return bad_group(kOp, group, r.groups.size());
  return std::span<const PageId>(s->groups[static_cast<size_t>(group)].pages);
}

Result<std::span<const int64_t>> BlockManager::reserved_slots(int64_t group) const {
  const Rep& r = *rep_;
  if (!r.valid_group(group)) {
    return bad_group("BlockManager.reserved_slots", group, r.groups.size());
  }
  return std::span<const int64_t>(r.groups[static_cast<size_t>(group)]->slots);
}

Result<StateSlot> BlockManager::state_slot(SeqId seq, int64_t group) const {
  constexpr std::string_view kOp = "BlockManager.state_slot";
  const Rep& r = *rep_;
  const Sequence* s = r.find(seq);
  if (s == nullptr) return unknown_seq(kOp, seq);
  if (!r.valid_group(group)) return bad_group(kOp, group, r.groups.size());
  if (!r.groups[static_cast<size_t>(group)]->recurrent()) {
    return Status::invalid_argument(std::string(kOp) + ": group " + std::to_string(group) + " is " +
                                    name(r.groups[static_cast<size_t>(group)]->spec.kind) +
                                    ", expected a recurrent group");
  }
  return s->groups[static_cast<size_t>(group)].slot;
}

int64_t BlockManager::num_groups() const { return static_cast<int64_t>(rep_->groups.size()); }

Result<int64_t> BlockManager::num_tokens(SeqId seq) const {
  const Sequence* s = rep_->find(seq);
  if (s == nullptr) return unknown_seq("BlockManager.num_tokens", seq);
  return static_cast<int64_t>(s->tokens.size());
}

Result<int64_t> BlockManager::num_reserved(SeqId seq) const {
  const Sequence* s = rep_->find(seq);
  if (s == nullptr) return unknown_seq("BlockManager.num_reserved", seq);
  return s->num_reserved;
}

bool BlockManager::contains(SeqId seq) const { return rep_->find(seq) != nullptr; }
int64_t BlockManager::num_sequences() const { return static_cast<int64_t>(rep_->seqs.size()); }

Result<int64_t> BlockManager::match_prefix(std::span<const int32_t> prompt,
                                           const KeyExtras& extras) const {
  return rep_->match_prefix(prompt, {}, false, extras);
}

Result<int64_t> BlockManager::match_prefix(std::span<const int32_t> prompt,
                                           std::span<const PageKey> keys,
                                           const KeyExtras& extras) const {
  return rep_->match_prefix(prompt, keys, true, extras);
}

bool BlockManager::is_cached(const PageKey& key) const {
  const Rep& r = *rep_;
  return r.caching() && r.groups[0]->index.find(key, r.groups[0]->meta) != kNoPage;
}

Result<std::vector<SeqId>> BlockManager::plan_preemption(
    int64_t num_pages_needed, std::span<const SeqId> victims_in_order) const {
  constexpr std::string_view kOp = "BlockManager.plan_preemption";
  const Rep& r = *rep_;
  if (num_pages_needed < 0) {
    return Status::invalid_argument(std::string(kOp) + ": num_pages_needed is " +
                                    std::to_string(num_pages_needed) + ", expected >= 0");
  }
  std::unordered_map<SeqId, size_t> position;
  position.reserve(victims_in_order.size());
  for (size_t i = 0; i < victims_in_order.size(); ++i) {
    const SeqId v = victims_in_order[i];
    if (r.find(v) == nullptr) return unknown_seq(kOp, v);
    const auto [it, inserted] = position.emplace(v, i);
    if (!inserted) {
      return Status::invalid_argument(std::string(kOp) + ": victim " + std::to_string(i) + " (" +
                                      seq_str(v) + ") repeats victim " +
                                      std::to_string(it->second) + ", expected distinct sequences");
    }
  }
  // Per page group: pages available, and references the planned victims hold per page (a page is
  // released when they are all of them).
  std::vector<int64_t> available(r.groups.size(), 0);
  std::vector<std::unordered_map<PageId, int32_t>> dropped(r.groups.size());
  const auto short_group = [&]() -> int64_t {
    for (size_t g = 0; g < r.groups.size(); ++g) {
      if (!r.groups[g]->recurrent() && available[g] < num_pages_needed) {
        return static_cast<int64_t>(g);
      }
    }
    return -1;
  };
  for (size_t g = 0; g < r.groups.size(); ++g) available[g] = r.groups[g]->pool.num_available();
  std::vector<SeqId> plan;
  if (short_group() < 0) return plan;
  for (const SeqId v : victims_in_order) {
    plan.push_back(v);
    const Sequence& s = *r.find(v);
    for (size_t g = 0; g < r.groups.size(); ++g) {
      if (r.groups[g]->recurrent()) continue;
      for (const PageId page : s.groups[g].pages) {
        if (page == kNoPage) continue;
        if (++dropped[g][page] == r.groups[g]->pool.refcount(page)) ++available[g];
      }
    }
    if (short_group() < 0) return plan;
  }
  const size_t g = static_cast<size_t>(short_group());
  return Status::resource_exhausted(
      std::string(kOp) + ": freeing all " + std::to_string(victims_in_order.size()) +
      " victims leaves " + std::to_string(available[g]) + " pages available" +
      (r.groups.size() > 1 ? " in group " + std::to_string(g) : std::string()) +
      ", expected >= " + std::to_string(num_pages_needed) + " (num_pages_needed)");
}

bool BlockManager::can_admit(int64_t num_new_tokens) const {
  if (num_new_tokens < 0) return false;
  const Rep& r = *rep_;
  for (const auto& G : r.groups) {
    const int64_t available = G->pool.num_available();
    if (G->recurrent()
            ? available < 1
            : ceil_div(num_new_tokens, r.page_size) > available - r.options.watermark_pages) {
      return false;
    }
  }
  return true;
}

int64_t BlockManager::num_pages() const { return rep_->groups[0]->pool.num_pages(); }
int64_t BlockManager::page_size() const { return rep_->page_size; }
int64_t BlockManager::num_free_pages() const { return num_free_pages(0); }
int64_t BlockManager::num_cached_pages() const { return num_cached_pages(0); }
int64_t BlockManager::num_evictable_pages() const { return num_evictable_pages(0); }
int64_t BlockManager::num_used_pages() const { return num_used_pages(0); }
int64_t BlockManager::num_free_pages(int64_t group) const {
  return rep_->valid_group(group) ? rep_->groups[static_cast<size_t>(group)]->pool.num_free() : 0;
}
int64_t BlockManager::num_cached_pages(int64_t group) const {
  return rep_->valid_group(group) ? rep_->groups[static_cast<size_t>(group)]->index.size() : 0;
}
int64_t BlockManager::num_evictable_pages(int64_t group) const {
  return rep_->valid_group(group) ? rep_->groups[static_cast<size_t>(group)]->pool.num_evictable()
                                  : 0;
}
int64_t BlockManager::num_used_pages(int64_t group) const {
  return rep_->valid_group(group) ? rep_->groups[static_cast<size_t>(group)]->pool.num_used() : 0;
}
const BlockManagerStats& BlockManager::stats() const { return rep_->stats; }
std::span<const PageCopy> BlockManager::pending_copies() const { return rep_->copies; }
void BlockManager::clear_pending_copies() { rep_->copies.clear(); }
std::span<const StateCopy> BlockManager::pending_state_copies() const { return rep_->state_copies; }
void BlockManager::clear_pending_state_copies() { rep_->state_copies.clear(); }
std::span<const PageEvent> BlockManager::events() const { return rep_->events; }
void BlockManager::clear_events() { rep_->events.clear(); }

Status BlockManager::check_invariants() const {
  const Rep& r = *rep_;
  const auto fail = [](const std::string& what) {
    return Status::internal("BlockManager.check_invariants: " + what);
  };
  const int64_t ps = r.page_size;
  for (const auto& [id, s] : r.seqs) {
    const int64_t len = static_cast<int64_t>(s.tokens.size());
    if (s.num_reserved < 0) return fail(seq_str(id) + " has a negative reservation");
    if (r.caching() && s.keys.size() != static_cast<size_t>(len / ps)) {
      return fail(seq_str(id) + " has " + std::to_string(s.keys.size()) + " keys, expected " +
                  std::to_string(len / ps) + " (full pages)");
    }
    if (s.groups.size() != r.groups.size()) return fail(seq_str(id) + " has wrong group count");
  }
  for (size_t g = 0; g < r.groups.size(); ++g) {
    const Group& G = *r.groups[g];
    const std::string gname = "group " + std::to_string(g) + " ";
    const int32_t num_pages = G.pool.num_pages();
    std::vector<int32_t> refs(static_cast<size_t>(num_pages), 0);
    for (const auto& [id, s] : r.seqs) {
      const SeqGroup& sg = s.groups[g];
      const int64_t len = static_cast<int64_t>(s.tokens.size());
      if (G.recurrent()) {
        if (sg.slot < 0 || sg.slot >= num_pages || !sg.pages.empty()) {
          return fail(gname + seq_str(id) + " has a bad state slot or pages");
        }
        ++refs[static_cast<size_t>(sg.slot)];
        if (G.pool.is_cached(sg.slot)) {
          return fail(gname + seq_str(id) + " live slot is a checkpoint, expected private");
        }
        continue;
      }
      const int64_t want = ceil_div(len + s.num_reserved, ps);
      if (static_cast<int64_t>(sg.pages.size()) != want) {
        return fail(gname + seq_str(id) + " has " + std::to_string(sg.pages.size()) +
                    " pages for " + std::to_string(len) + " tokens + " +
                    std::to_string(s.num_reserved) + " reserved, expected " + std::to_string(want));
      }
      if (sg.released != G.out_of_window(len, ps)) {
        return fail(gname + seq_str(id) + " released " + std::to_string(sg.released) +
                    " pages, expected " + std::to_string(G.out_of_window(len, ps)) +
                    " (out of the window)");
      }
      for (size_t j = 0; j < sg.pages.size(); ++j) {
        const PageId page = sg.pages[j];
        if (static_cast<int64_t>(j) < sg.released) {
          if (page != kNoPage) return fail(gname + seq_str(id) + " holds an out-of-window page");
          continue;
        }
        if (page < 0 || page >= num_pages) return fail(gname + seq_str(id) + " holds bad page id");
        ++refs[static_cast<size_t>(page)];
        // Pages holding reserved tokens only were allocated by reserve(): private, not cached.
        if (static_cast<int64_t>(j) >= ceil_div(len, ps) &&
            (G.pool.refcount(page) != 1 || G.pool.is_cached(page))) {
          return fail(gname + seq_str(id) + " reservation page " + std::to_string(page) +
                      " is shared or cached, expected private");
        }
      }
      if (!r.caching()) continue;
      const size_t full = static_cast<size_t>(len / ps);
      if (sg.uids.size() != full) {
        return fail(gname + seq_str(id) + " has " + std::to_string(sg.uids.size()) +
                    " uids, expected " + std::to_string(full) + " (full pages)");
      }
      for (size_t j = static_cast<size_t>(sg.released); j < full; ++j) {
        const PageId page = sg.pages[j];
        if (!G.pool.is_cached(page)) continue;
        const PageMeta& m = G.meta[static_cast<size_t>(page)];
        const auto mine = std::span<const int32_t>(s.tokens).subspan(j * static_cast<size_t>(ps),
                                                                     static_cast<size_t>(ps));
        const auto stored = r.stored_tokens(G, page);
        if (m.key != s.keys[j] || m.uid != sg.uids[j] ||
            !std::equal(mine.begin(), mine.end(), stored.begin(), stored.end())) {
          return fail(gname + seq_str(id) + " page " + std::to_string(j) + " (page id " +
                      std::to_string(page) + ") is cached with other contents, expected its own");
        }
      }
    }

    int64_t num_cached = 0;
    int64_t num_used = 0;
    for (PageId page = 0; page < num_pages; ++page) {
      const int32_t rc = G.pool.refcount(page);
      const bool cached = G.pool.is_cached(page);
      const std::string pname = gname + "page " + std::to_string(page);
      if (rc != refs[static_cast<size_t>(page)]) {
        return fail(pname + " has refcount " + std::to_string(rc) + ", expected " +
                    std::to_string(refs[static_cast<size_t>(page)]) + " (references held)");
      }
      if (rc > 0) ++num_used;
      const bool free = G.pool.on_free_list(page);
      const bool lru = G.pool.on_lru(page);
      if (rc > 0 && (free || lru)) return fail(pname + " is used and on a list, expected neither");
      if (rc == 0 && free == lru) return fail(pname + " is unused, expected on exactly one list");
      if (free && cached) return fail(pname + " is free and cached, expected not cached");
      if (lru && !cached) return fail(pname + " is on the LRU, expected cached");
      if (!r.caching()) {
        if (cached) {
          return fail(pname + " is cached, expected nothing cached without prefix caching");
        }
        continue;
      }
      const PageMeta& m = G.meta[static_cast<size_t>(page)];
      if (cached != (m.uid != 0)) return fail(pname + " cached flag and uid disagree");
      if (!cached) continue;
      ++num_cached;
      if (G.index.find(m.key, G.meta) != page) {
        return fail(pname + " is cached, expected its key in the index pointing back to it");
      }
      if (G.recurrent() &&
          (rc != 0 || G.prefix_tokens[static_cast<size_t>(page)].empty() ||
           G.prefix_tokens[static_cast<size_t>(page)].size() % static_cast<size_t>(ps) != 0)) {
        return fail(pname + " is a checkpoint, expected unreferenced with a whole-page prefix");
      }
    }
    if (num_cached != G.index.size()) {
      return fail(gname + "index holds " + std::to_string(G.index.size()) + " keys, expected " +
                  std::to_string(num_cached) + " (cached pages)");
    }
    if (static_cast<int64_t>(G.pool.free_list().size()) != G.pool.num_free() ||
        static_cast<int64_t>(G.pool.lru().size()) != G.pool.num_evictable()) {
      return fail(gname + "list lengths disagree with the counts");
    }
    if (num_used != G.pool.num_used() ||
        G.pool.num_free() + G.pool.num_evictable() + num_used != num_pages) {
      return fail(gname + "free " + std::to_string(G.pool.num_free()) + " + evictable " +
                  std::to_string(G.pool.num_evictable()) + " + used " + std::to_string(num_used) +
                  ", expected num_pages = " + std::to_string(num_pages));
    }
  }
  return Status();
}

}  // namespace kvcache
